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
        epochs: Passes over the new task. Defaults to `5`.
        learning_rate: Initial Adam learning rate, cosine-decayed, or `"auto"` (the best
            of a grid on a held-out split of the new task; `ContinualBaseline`).
            Defaults to `"auto"`.
        batch_size: Examples per step. Defaults to `32`.
        seed: Shuffle and initialisation seed. Defaults to `None`.
        **kwargs: `Operation` arguments.

    Returns:
        Calling it returns the fine-tuned model (a new `keras.Model`).

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1), num_classes=5)
    >>> new = y >= 5
    >>> FineTune((x[new], y[new] - 5), epochs=1)(model).output_shape
    (None, 10)
    """

    def loss(self, model, batch):
        x, y = batch["task"]
        return cross_entropy(y, model(x, training=True))
