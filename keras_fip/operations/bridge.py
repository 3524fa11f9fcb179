"""`Bridge`: walk from one trained network towards another along the first task's FIP."""

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import normalization
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.rules import Penalty
from keras_fip.operations.base import WalkingOperation
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.task_evaluation import TaskEvaluation

# β = "auto": the documented strength of the pull towards the target's weights
# (`keras_fip.engine.beta.auto_beta` with `objective="weights"`): ½‖w − w_B‖² is in weight
# units, like Compress's projection distance, and β = STRENGTH × the curvature of D per
# unit of squared weight (the mean Fisher diagonal on the anchor data for D = KL).
STRENGTH = 1e3


class _TargetDistance:
    """β·½·‖w − w_B‖² over the trainable weights."""

    def __init__(self, targets, beta):
        self.targets = targets
        self.beta = beta

    def __call__(self, model, batch):
        total = 0.0
        for variable, target in zip(model.trainable_variables, self.targets):
            total = total + keras.ops.sum(keras.ops.square(variable.value - target))
        return 0.5 * self.beta * total


def _accuracy(model, x, y, batch_size=1024):
    correct, count = 0, data_adapter.num_examples(x)
    for start in range(0, count, batch_size):
        batch = data_adapter.take(x, slice(start, start + batch_size))
        logits = keras.ops.convert_to_numpy(model(batch, training=False))
        correct += int(np.sum(np.argmax(logits, -1) == y[start : start + batch_size]))
    return correct / count


def linear_path_accuracy(model_a, model_b, tasks, num_points=11):
    """Every task's accuracy along the straight line from `model_a` to `model_b`.

    The comparison for `Bridge`: the Euclidean interpolation w(t) = (1 − t)·w_A + t·w_B,
    t in [0, 1], ignoring the metric. BatchNormalization moving statistics are
    interpolated too.

    Args:
        model_a: The start network.
        model_b: The end network (same architecture).
        tasks: A list of `(x, y)`.
        num_points: Points on the line, ends included. Defaults to `11`.

    Returns:
        A dict with `t` (the points) and `task_{i}/accuracy` lists.
    """
    probe = copy_model(model_a)
    start = [w.numpy() for w in model_a.weights]
    end = [w.numpy() for w in model_b.weights]
    history = {"t": list(np.linspace(0.0, 1.0, num_points))}
    for t in history["t"]:
        for variable, a, b in zip(probe.weights, start, end):
            variable.assign(((1.0 - t) * a + t * b).astype(a.dtype))
        for i, (x, y) in enumerate(tasks):
            history.setdefault(f"task_{i}/accuracy", []).append(_accuracy(probe, x, y))
    return history


@keras.saving.register_keras_serializable(package="keras_fip")
class Bridge(WalkingOperation):
    """Walks a network towards another network along the first network's FIP.

    The FIP papers' "004" experiment: two networks of the same architecture trained
    independently (e.g. on MNIST and on Fashion-MNIST, sharing their 10 outputs) and a path
    from the first, w_A, towards the second, w_B, that keeps the first network's outputs on
    `data` (D, the output distance on task A's inputs: task A's metric) while the secondary
    objective L(w) = ½‖w − w_B‖² pulls the weights towards w_B. `eval_tasks` records both
    tasks' accuracy along the path (`op.history["task_{i}/accuracy"]`); points where both
    are high exist although w_B itself, and sequential training towards task B, lose task
    A. Compare with `linear_path_accuracy` (the straight line).

    The walk (`keras_fip.Walk`): its budget is in passes over `data` (10 by default);
    `beta="auto"` is `keras_fip.engine.beta.auto_beta` with strength `STRENGTH` (1e3) on
    the weights, as `Compress` scales its weight-space pull (the value used is
    `op.history["beta"]`); the `Penalty` rule's learning rate (`"auto"` by default) is
    held constant along the walk (a path, not a schedule). The rest is every walk's
    default.

    Args:
        target: The network to walk towards (same architecture as the model called on).
        data: Task A's inputs, whose outputs are kept. Defaults to `None` (the inputs the
            model carries).
        eval_tasks: List of `(x, y)` evaluated along the path. Defaults to `None`.
        eval_every: Steps between evaluations. Defaults to `None` (20 per walk).
        walk: A `keras_fip.Walk` (budget, rule, batch size, distance, β, recording,
            seed). Defaults to `None` (every default).
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> a = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> b = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> walk = keras_fip.Walk(epochs=1, seed=0, verbose=0)
        >>> op = Bridge(b, data=x, eval_tasks=[(x, y), (1 - x, y)], walk=walk)
        >>> walked = op(a)
        >>> len(op.history["task_1/accuracy"]) == len(op.history["eval_step"])
        True
    """

    DEFAULT_BUDGET = {"epochs": 10}

    def __init__(
        self, target, data=None, *, eval_tasks=None, eval_every=None, walk=None, name=None
    ):
        super().__init__(walk=walk, name=name)
        if target is not None and not isinstance(target, keras.Model):
            raise ValueError(f"`target` must be a `keras.Model`. Received: target={target!r}")
        self.target = target
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        if eval_tasks is not None and not isinstance(eval_tasks, (list, tuple)):
            raise ValueError(
                "`eval_tasks` must be a list of `(x, y)` tuples. "
                f"Received: eval_tasks={eval_tasks!r}"
            )
        for i, task in enumerate(eval_tasks or []):
            normalize_data(task, name=f"eval_tasks[{i}]", require_labels=True)
        self.eval_tasks = eval_tasks
        if eval_every is not None:
            eval_every = self.check_number(
                eval_every, "eval_every", low=1, low_inclusive=True, integer=True
            )
        self.eval_every = eval_every

    def _read(self, model):
        """`(anchor inputs, eval tasks)` checked against `model`."""
        if self.target is None:
            raise ValueError(
                "`target` is required (models are not serialised: pass it again after "
                "`from_config`). Received: target=None"
            )
        targets = self.target.trainable_variables
        if [tuple(v.shape) for v in targets] != [tuple(v.shape) for v in model.trainable_variables]:
            raise ValueError(
                "`target` must have the architecture of the model it is called on (the "
                "same trainable weight shapes). Received: target="
                f"{self.target.name} with {[tuple(v.shape) for v in targets][:4]}..."
            )
        x, _ = normalize_data(self.resolve_data(self.data, model), name="data", model=model)
        check_inputs_match_model(model, x, name="data")
        eval_tasks = []
        for i, task in enumerate(self.eval_tasks or []):
            tx, ty = normalize_data(task, name=f"eval_tasks[{i}]", require_labels=True, model=model)
            check_inputs_match_model(model, tx, name=f"eval_tasks[{i}]")
            eval_tasks.append((data_adapter.as_arrays(tx), np.asarray(ty)))
        return x, eval_tasks

    def validate(self, model):
        self._read(model)

    def call(self, model):
        walk = self.resolved_walk()
        x, eval_tasks = self._read(model)
        output_kind = model_output_kind(model, x)
        beta = walk.beta
        if beta == "auto":
            beta = auto_beta(STRENGTH, model, x, walk.distance, objective="weights", seed=walk.seed)
        normalized = bool(normalization.batch_normalization_layers(model))
        walk_training = normalized if walk.training == "auto" else walk.training
        steps = walk.num_steps(data_adapter.num_examples(x))
        optimizer, learning_rate = None, None
        if isinstance(walk.rule, Penalty):
            learning_rate = walk.rule.resolve_learning_rate(model.trainable_variables)
            optimizer = keras.optimizers.Adam(learning_rate)
        evaluator = None
        if eval_tasks:
            evaluator = TaskEvaluation(model, eval_tasks, self.eval_every or max(1, steps // 20))
            walk = walk.replace(callbacks=[evaluator] + list(walk.callbacks or []))
        self.fip_walk(
            model,
            walk,
            x,
            steps,
            optimizer=optimizer,
            output_kind=output_kind,
            beta=1.0,
            secondary_objective=_TargetDistance(
                [keras.ops.convert_to_numpy(t) for t in self.target.trainable_variables], beta
            ),
            training=walk_training,
        )
        if walk_training and normalized:
            normalization.recalibrate_batch_normalization(model, x, walk.batch_size * 2)
        history = dict(self.history)
        if evaluator is not None:
            evaluator.finish(steps)
            history.update(evaluator.history)
        history.update(beta=beta, steps=steps)
        if learning_rate is not None:
            history["learning_rate"] = learning_rate
        self.history = history
        return model

    def get_config(self):
        return {
            **super().get_config(),
            "target": None,  # Models and data are not serialised.
            "data": None,
            "eval_tasks": None,
            "eval_every": self.eval_every,
        }
