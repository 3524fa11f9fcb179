"""Naive fine-tuning: learn the new task with its cross-entropy alone (the lower bound)."""

import keras

from keras_fip.baselines.continual_base import ContinualBaseline
from keras_fip.baselines.continual_base import cross_entropy


@keras.saving.register_keras_serializable(package="keras_fip")
class FineTune(ContinualBaseline):
    """Learns a new task by plain training on it: what forgetting looks like.

    Same head handling and budget as `keras_fip.ContinualLearn` (see
    `keras_fip.baselines.continual_base`).

    Args:
        new_task: The new task, `(x, y)` (labels 0..k-1 for `"append"`).
        head: `"append"` or `"shared"`. Defaults to `"append"`.
        learning_rate: Initial Adam learning rate, cosine-decayed, or `"auto"` (the best
            of a grid on a held-out split of the new task; `ContinualBaseline`).
            Defaults to `"auto"`.
        walk: A `keras_fip.Walk` with the budget (`epochs` over the new task, or `steps`),
            `batch_size`, `seed` and `verbose` (`ContinualBaseline`). Defaults to `None`
            (5 epochs of 32 new-task examples a step).
        **kwargs: Other `ContinualBaseline` arguments (`eval_tasks`, `eval_every`,
            `name`).

    Returns:
        Calling it returns the fine-tuned model (a new `keras.Model`).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1), num_classes=5)
        >>> new = y >= 5
        >>> walk = keras_fip.Walk(epochs=1, verbose=0)
        >>> FineTune((x[new], y[new] - 5), walk=walk)(model).output_shape
        (None, 10)
    """

    def loss(self, model, batch):
        x, y = batch["task"]
        return cross_entropy(y, model(x, training=True))
