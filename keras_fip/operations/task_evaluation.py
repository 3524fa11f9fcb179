"""`TaskEvaluation`: every task's accuracy recorded along a walk or a training run."""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter


class TaskEvaluation(keras.callbacks.Callback):
    """Records every task's accuracy (argmax over all outputs) every `every` steps.

    `ContinualLearn`, `Bridge` and the continual baselines record their `eval_tasks` with
    it. The first point is the network before the first step; `finish` makes the last one
    the network as returned. The seconds spent evaluating are kept in `seconds`, so that a
    method's training time can be told apart from the time spent watching it.

    Args:
        network: The network evaluated (it returns logits or probabilities).
        tasks: A list of `(x, y)`, labels in the network's output indices.
        every: Steps between evaluations.
        batch_size: Examples per forward pass. Defaults to `1024`.

    Examples:

        >>> network = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
        >>> x, y = np.ones((4, 2), "float32"), np.zeros(4, "int64")
        >>> evaluation = TaskEvaluation(network, [(x, y)], every=5)
        >>> evaluation.evaluate()
        >>> evaluation.history["eval_step"]
        [0]
    """

    def __init__(self, network, tasks, every, batch_size=1024):
        super().__init__()
        self.network = network
        self.tasks = tasks
        self.every = every
        self.batch_size = batch_size
        self.step = 0
        self.history = {"eval_step": []}
        self.seconds = 0.0
        self.forward = tf.function(lambda x: network(x, training=False), reduce_retracing=True)

    def evaluate(self):
        """Appends every task's accuracy at the current step."""
        began = time.perf_counter()
        self.history["eval_step"].append(self.step)
        for i, (x, y) in enumerate(self.tasks):
            correct = 0
            count = data_adapter.num_examples(x)
            for start in range(0, count, self.batch_size):
                batch = data_adapter.take(x, slice(start, start + self.batch_size))
                logits = self.forward(tf.nest.map_structure(tf.constant, batch))
                correct += int(
                    np.sum(np.argmax(logits.numpy(), -1) == y[start : start + self.batch_size])
                )
            self.history.setdefault(f"task_{i}/accuracy", []).append(correct / count)
        self.seconds += time.perf_counter() - began

    def finish(self, steps):
        """Makes the last point the network as returned (after any recalibration)."""
        if self.history["eval_step"] and self.history["eval_step"][-1] == steps:
            for values in self.history.values():
                values.pop()
        self.step = steps
        self.evaluate()

    def on_train_begin(self, logs=None):
        if self.step == 0:
            self.evaluate()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.evaluate()

    def get_walk_state(self):
        """The evaluations so far (`keras_fip.engine.WalkCheckpoint`)."""
        return {"step": self.step, "history": self.history, "seconds": self.seconds}

    def set_walk_state(self, state):
        """Restores `get_walk_state()` (a resumed walk)."""
        self.step = int(state["step"])
        self.history = {key: list(values) for key, values in state["history"].items()}
        self.seconds = float(state["seconds"])
