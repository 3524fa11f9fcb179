"""Joint training on every task's data at once: the upper bound of continual learning."""

import keras
import numpy as np

from keras_fip.baselines.continual_base import ContinualBaseline
from keras_fip.baselines.continual_base import check_labelled
from keras_fip.baselines.continual_base import cross_entropy
from keras_fip.core import data_adapter


@keras.saving.register_keras_serializable(package="keras_fip")
class JointTraining(ContinualBaseline):
    """Learns the new task together with all old tasks' full labelled data (upper bound).

    Trains on the union of `old_tasks` and `new_task` for `epochs` passes over the union,
    from the current model. Not a continual method (it keeps all data): it shows what the
    network can hold at once.

    Args:
        new_task: The new task, `(x, y)` (labels 0..k-1 for `"append"`).
        old_tasks: List of the old tasks' `(x, y)`, labels in the model's output indices.
            Defaults to `()`.
        head: `"append"` or `"shared"`. Defaults to `"append"`.
        learning_rate: Initial Adam learning rate, cosine-decayed, or `"auto"` (the best
            of a grid on a held-out split of the new task; `ContinualBaseline`).
            Defaults to `"auto"`.
        walk: A `keras_fip.Walk` with the budget (`epochs` over the union, or `steps`),
            `batch_size`, `seed` and `verbose` (`ContinualBaseline`). Defaults to `None`
            (5 epochs of 32 examples a step).
        **kwargs: Other `ContinualBaseline` arguments (`eval_tasks`, `eval_every`,
            `name`).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1), num_classes=5)
        >>> old, new = y < 5, y >= 5
        >>> JointTraining((x[new], y[new] - 5), old_tasks=[(x[old], y[old])],
        ...               walk=keras_fip.Walk(epochs=1, verbose=0))(model).output_shape
        (None, 10)
    """

    def __init__(self, new_task, old_tasks=(), **kwargs):
        super().__init__(new_task, **kwargs)
        if not isinstance(old_tasks, (list, tuple)):
            raise ValueError(
                f"`old_tasks` must be a list of `(x, y)`. Received: old_tasks={old_tasks!r}"
            )
        self._old = [check_labelled(task, f"old_tasks[{i}]") for i, task in enumerate(old_tasks)]
        self.old_tasks = old_tasks

    def read_datasets(self, model):
        super().read_datasets(model)
        self._old = self.read_dataset_arguments(model, self.old_tasks, self._old, "old_tasks")

    def check(self, model):
        for i, (x, y) in enumerate(self._old):
            self.check_inputs(model, x, f"old_tasks[{i}]")
            if y.min() < 0 or y.max() >= model.output_shape[-1]:
                raise ValueError(
                    f"`old_tasks[{i}]` labels must be outputs of the model, in "
                    f"0..{model.output_shape[-1] - 1}. Received: labels in "
                    f"{int(y.min())}..{int(y.max())}"
                )

    def training_data(self, x, labels):
        xs = [x] + [old_x for old_x, _ in self._old]
        ys = [labels] + [old_y.astype("int32") for _, old_y in self._old]
        return data_adapter.concatenate(xs), np.concatenate(ys)

    def loss(self, model, batch):
        x, y = batch["task"]
        return cross_entropy(y, model(x, training=True))

    def get_config(self):
        return {**super().get_config(), "old_tasks": ()}
