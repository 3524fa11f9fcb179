"""A-GEM: the new task's gradient projected so that the memory's loss does not rise."""

import keras
import tensorflow as tf

from keras_fip.baselines.continual_base import cross_entropy
from keras_fip.baselines.replay import MemoryBaseline
from keras_fip.engine import step_rules


@keras.saving.register_keras_serializable(package="keras_fip")
class AGEM(MemoryBaseline):
    """Averaged GEM (Chaudhry et al. 2019): project the step on the memory's gradient.

    Each step computes the new-task gradient g and the gradient g_ref of the loss on a
    labelled memory batch; if g·g_ref < 0 the step uses g − (g·g_ref / g_ref·g_ref)·g_ref,
    so that, to first order, the memory loss does not increase. The projected gradient is
    then handed to Adam (the same optimizer as every other method here).

    Args:
        new_task: The new task, `(x, y)` (labels 0..k-1 for `"append"`).
        memory: Labelled old-task examples `(x, y)` (labels in output indices). Required.
        memory_batch_size: Memory examples per step (A-GEM's reference batch). Defaults to
            `None` (`batch_size`).
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
        >>> old, new = y < 5, y >= 5
        >>> AGEM((x[new], y[new] - 5), memory=(x[old][:50], y[old][:50]),
        ...      walk=keras_fip.Walk(epochs=1, verbose=0))(model).output_shape
        (None, 10)
    """

    def loss(self, model, batch):
        x, y = batch["task"]
        return cross_entropy(y, model(x, training=True))

    def transform_gradients(self, model, batch, gradients):
        memory_x, memory_y = batch["memory"]
        variables = model.trainable_variables
        replicas = step_rules.num_replicas()
        with tf.GradientTape() as tape:
            reference_loss = cross_entropy(memory_y, model(memory_x, training=True))
            reference_loss = reference_loss / replicas
        reference = tape.gradient(reference_loss, [v.value for v in variables])
        reference = [tf.zeros_like(g) if r is None else r for r, g in zip(reference, gradients)]
        if replicas > 1:
            # The projection is not linear: project the global gradients (every replica
            # the same), then hand each replica 1/replicas of the result to be summed.
            context = tf.distribute.get_replica_context()
            gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            reference = context.all_reduce(tf.distribute.ReduceOp.SUM, reference)
        dot = tf.add_n([tf.reduce_sum(g * r) for g, r in zip(gradients, reference)])
        norm = tf.add_n([tf.reduce_sum(r * r) for r in reference])
        scale = tf.where(dot < 0.0, dot / tf.maximum(norm, 1e-12), 0.0)
        return [(g - scale * r) / replicas for g, r in zip(gradients, reference)]
