"""Learning without Forgetting: distil the old network's outputs on the new task's inputs."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.baselines.continual_base import ContinualBaseline
from keras_fip.baselines.continual_base import cross_entropy
from keras_fip.core.data_adapter import reference_outputs


@keras.saving.register_keras_serializable(package="keras_fip")
class LwF(ContinualBaseline):
    """Learning without Forgetting (Li & Hoiem 2017): CE on the new task plus
    `distillation_weight`·T²·KL between the old network's softened outputs and the model's
    on the new task's own inputs (no memory).

    The old network's logits are recorded once, in inference mode, before the head grows;
    the distillation covers the outputs that existed before the task (`"append"`) or the
    outputs that are not the new task's classes (`"shared"`). The authors' defaults:
    temperature T = 2 and weight λ_o = 1 (the T² factor keeps the gradient scale of the
    soft targets, as Hinton et al. recommend).

    Args:
        new_task: The new task, `(x, y)` (labels 0..k-1 for `"append"`).
        temperature: T. Defaults to `2.0`.
        distillation_weight: λ_o. Defaults to `1.0`.
        head: `"append"` or `"shared"`. Defaults to `"append"`.
        learning_rate: Initial Adam learning rate, cosine-decayed, or `"auto"` (the best
            of a grid on a held-out split of the new task; `ContinualBaseline`).
            Defaults to `"auto"`.
        walk: A `keras_fip.Walk` with the budget (`epochs` over the new task, or `steps`),
            `batch_size`, `seed` and `verbose` (`ContinualBaseline`). Defaults to `None`
            (5 epochs of 32 new-task examples a step).
        **kwargs: Other `ContinualBaseline` arguments (`eval_tasks`, `eval_every`,
            `name`).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1), num_classes=5)
        >>> new = y >= 5
        >>> walk = keras_fip.Walk(epochs=1, verbose=0)
        >>> LwF((x[new], y[new] - 5), walk=walk)(model).output_shape
        (None, 10)
    """

    def __init__(self, new_task, *, temperature=2.0, distillation_weight=1.0, **kwargs):
        super().__init__(new_task, **kwargs)
        self.temperature = self.check_number(temperature, "temperature", low=0.0)
        self.distillation_weight = self.check_number(
            distillation_weight, "distillation_weight", low=0.0, low_inclusive=True
        )

    def prepare(self, old_model, model, x, labels):
        old = np.asarray(reference_outputs(old_model, x, 256), "float32")
        if self.head == "shared":
            kept = np.setdiff1d(np.arange(old.shape[-1]), np.unique(labels))
        else:
            kept = np.arange(old.shape[-1])
        self._kept = tf.constant(kept, "int32")
        self._old_logits = old[:, kept]

    def training_data(self, x, labels):
        # The old logits travel with their inputs through the shuffle.
        return x, (labels, self._old_logits)

    def loss(self, model, batch):
        x, (y, old_logits) = batch["task"]
        logits = model(x, training=True)
        task = cross_entropy(y, logits)
        temperature = self.temperature
        old = tf.nn.softmax(old_logits / temperature, axis=-1)
        new = tf.nn.log_softmax(tf.gather(logits, self._kept, axis=-1) / temperature, axis=-1)
        kl = tf.reduce_mean(tf.reduce_sum(old * (tf.math.log(old + 1e-12) - new), axis=-1))
        return task + self.distillation_weight * temperature**2 * kl

    def get_config(self):
        return {
            **super().get_config(),
            "temperature": self.temperature,
            "distillation_weight": self.distillation_weight,
        }
