"""Experience replay: the new task's batches mixed with labelled memory batches."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.baselines.continual_base import ContinualBaseline
from keras_fip.baselines.continual_base import check_labelled
from keras_fip.baselines.continual_base import cross_entropy
from keras_fip.baselines.continual_base import repeated_batches
from keras_fip.core import data_adapter
from keras_fip.core import tuning


class MemoryBaseline(ContinualBaseline):
    """A baseline that keeps a labelled memory of old tasks (labels in output indices).

    Args:
        new_task: The new task, `(x, y)`.
        memory: Old-task examples with labels, `(x, y)`, labels in the model's output
            indices. Required.
        memory_batch_size: Memory examples per step. Defaults to `None` (`batch_size`).
        walk: A `keras_fip.Walk` with the budget (`epochs` over the new task, or `steps`),
            `batch_size`, `seed` and `verbose` (`ContinualBaseline`). Defaults to `None`
            (5 epochs of 32 new-task examples a step).
        **kwargs: Other `ContinualBaseline` arguments (`eval_tasks`, `eval_every`,
            `name`).
    """

    def __init__(self, new_task, memory=None, *, memory_batch_size=None, **kwargs):
        super().__init__(new_task, **kwargs)
        if memory is not None:
            self._memory = check_labelled(memory, "memory")
        self.memory = memory
        if memory_batch_size is not None:
            memory_batch_size = self.check_number(
                memory_batch_size, "memory_batch_size", low=1, low_inclusive=True, integer=True
            )
        self.memory_batch_size = memory_batch_size

    def read_datasets(self, model):
        super().read_datasets(model)
        if isinstance(self.memory, tf.data.Dataset):
            self._memory = check_labelled(self.memory, "memory", model=model)

    def check(self, model):
        if self.memory is None:
            raise ValueError(
                f"`memory` is required: {type(self).__name__} replays labelled old-task "
                "examples `(x, y)`. Received: memory=None"
            )
        x, _ = self.check_inputs(model, self._memory[0], "memory")
        y = np.asarray(self._memory[1]).astype("int64")
        if y.min() < 0 or y.max() >= model.output_shape[-1]:
            raise ValueError(
                "`memory` labels must be outputs of the model before the task, in "
                f"0..{model.output_shape[-1] - 1}. Received: labels in "
                f"{int(y.min())}..{int(y.max())}"
            )
        self._memory = (x, y.astype("int32"))

    def candidates(self, model, kind, x, labels):
        """The held-out search's candidates train on the memory minus a held-out
        `validation_fraction`, which the score averages in as the old tasks' accuracy."""
        full = self._memory
        rows, held = tuning.validation_rows(
            None,
            self.validation_fraction,
            None if self.seed is None else self.seed + 1,
            count=data_adapter.num_examples(full[0]),
        )
        self._memory_validation = [(data_adapter.take(full[0], held), full[1][held])]
        score, validation = super().candidates(model, kind, x, labels)

        def score_without_held_out_memory(settings):
            self._memory = (data_adapter.take(full[0], rows), full[1][rows])
            try:
                return score(settings)
            finally:
                self._memory = full

        return score_without_held_out_memory, validation

    def old_validation(self):
        return getattr(self, "_memory_validation", [])

    def extra_data(self, model, x, labels):
        seed = None if self.seed is None else self.seed + 1
        return {
            "memory": repeated_batches(
                self._memory, self.memory_batch_size or self.batch_size, seed
            )
        }

    def get_config(self):
        config = super().get_config()
        config.update(memory=None, memory_batch_size=self.memory_batch_size)
        return config


@keras.saving.register_keras_serializable(package="keras_fip")
class ExperienceReplay(MemoryBaseline):
    """Experience replay (Chaudhry et al. 2019, "tiny episodic memories"): each step
    trains on a new-task batch concatenated with a batch of the labelled memory.

    The strongest simple baseline; it uses the same memory inputs as `ContinualLearn`, but
    with their labels (FIP keeps only the inputs' outputs).

    Args:
        new_task: The new task, `(x, y)` (labels 0..k-1 for `"append"`).
        memory: Labelled old-task examples `(x, y)` (labels in output indices). Required.
        memory_batch_size: Memory examples per step. Defaults to `None` (`batch_size`).
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
        >>> replay = ExperienceReplay((x[new], y[new] - 5), memory=(x[old][:50], y[old][:50]),
        ...                           walk=keras_fip.Walk(epochs=1, verbose=0))
        >>> replay(model).output_shape
        (None, 10)
    """

    def loss(self, model, batch):
        x, y = batch["task"]
        memory_x, memory_y = batch["memory"]
        # Several inputs (a dict or tuple of arrays) are joined input by input.
        joined = tf.nest.map_structure(lambda a, b: tf.concat([a, b], axis=0), x, memory_x)
        logits = model(joined, training=True)
        return cross_entropy(tf.concat([y, memory_y], axis=0), logits)
