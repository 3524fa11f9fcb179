"""`Bridge`: walk from one trained network towards another along the first task's FIP."""

import math

import keras
import numpy as np

from keras_fip.engine import data_adapter
from keras_fip.engine import normalization
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine.data_adapter import fip_dataset
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.engine.path import Path
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.operations.base import Operation
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.continual_learn import _EvaluateTasks

# β = AUTO_BETA_SCALE × the mean Fisher diagonal on the anchor data, as `Compress` scales its
# weight-space pull (½‖w − w_B‖² is in weight units, like Compress's projection distance).
AUTO_BETA_SCALE = 1e3


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
    from keras_fip.engine.copy import copy_model

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
class Bridge(Operation):
    """Walks a network towards another network along the first network's FIP.

    The FIP papers' "004" experiment: two networks of the same architecture trained
    independently (e.g. on MNIST and on Fashion-MNIST, sharing their 10 outputs) and a path
    from the first, w_A, towards the second, w_B, that keeps the first network's outputs on
    `data` (D, the output distance on task A's inputs: task A's metric) while the secondary
    objective L(w) = ½‖w − w_B‖² pulls the weights towards w_B. `eval_tasks` records both
    tasks' accuracy along the path (`op.history["task_{i}/accuracy"]`); points where both
    are high exist although w_B itself, and sequential training towards task B, lose task
    A. Compare with `linear_path_accuracy` (the straight line).

    Args:
        target: The network to walk towards (same architecture as the model called on).
        data: Task A's inputs, whose outputs are kept. Defaults to `None` (the inputs the
            model carries).
        epochs: Passes over `data`. Defaults to `10`.
        beta: β, the weight of L, or `"auto"`: `AUTO_BETA_SCALE` (1e3) × the mean Fisher
            diagonal on `data`, as `Compress` scales its weight-space pull. Defaults to
            `"auto"`.
        distance: Output distance D. Defaults to `"kl"`.
        step_rule: `"penalty"`, `"normalized"` or `"metric"`. Defaults to `"penalty"`.
        learning_rate: Adam learning rate of the `penalty` rule (constant: the walk is a
            path, not a schedule). Defaults to `1e-3`.
        epsilon: ε of the `normalized` and `metric` rules. Defaults to `0.01`.
        batch_size: Anchor examples per step. Defaults to `128`.
        training: BatchNorm mode of the walk, as in `ContinualLearn`. Defaults to `"auto"`.
        eval_tasks: List of `(x, y)` evaluated along the path. Defaults to `None`.
        eval_every: Steps between evaluations. Defaults to `None` (20 per walk).
        record_every: Record weights every this many steps (and at the end of each
            walk). Defaults to `100`.
        seed: Shuffle seed. Defaults to `None`.
        **kwargs: `Operation` arguments.

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> a = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
    >>> b = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
    >>> op = Bridge(b, data=x, epochs=1, eval_tasks=[(x, y), (1 - x, y)], verbose=0)
    >>> walked = op(a)
    >>> len(op.history["task_1/accuracy"]) == len(op.history["eval_step"])
    True
    """

    def __init__(
        self,
        target,
        data=None,
        epochs=10,
        beta="auto",
        distance="kl",
        step_rule="penalty",
        learning_rate=1e-3,
        epsilon=0.01,
        batch_size=128,
        training="auto",
        eval_tasks=None,
        eval_every=None,
        record_every=100,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if target is not None and not isinstance(target, keras.Model):
            raise ValueError(f"`target` must be a `keras.Model`. Received: target={target!r}")
        self.target = target
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        self.epochs = self.check_number(epochs, "epochs", low=1, low_inclusive=True, integer=True)
        if not (isinstance(beta, str) and beta == "auto"):
            beta = self.check_number(beta, "beta", low=0.0)
        self.beta = beta
        self.distance = self.check_choice(distance, "distance", ("kl", "bhattacharyya", "l2"))
        self.step_rule = self.check_choice(
            step_rule, "step_rule", ("penalty", "normalized", "metric")
        )
        self.learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.epsilon = self.check_number(epsilon, "epsilon", low=0.0)
        self.batch_size = self.check_number(
            batch_size, "batch_size", low=1, low_inclusive=True, integer=True
        )
        self.training = self.check_training(training)
        self._eval_tasks = [
            (data_adapter.as_arrays(tx), np.asarray(ty))
            for i, task in enumerate(eval_tasks or [])
            for tx, ty in [normalize_data(task, name=f"eval_tasks[{i}]", require_labels=True)]
        ]
        self.eval_tasks = eval_tasks
        self.eval_every = eval_every
        self.record_every, _, self.seed = self.check_path_options(record_every, None, seed)

    def call(self, model):
        if self.target is None:
            raise ValueError("`target` is required. Received: target=None")
        targets = self.target.trainable_variables
        if [tuple(v.shape) for v in targets] != [tuple(v.shape) for v in model.trainable_variables]:
            raise ValueError(
                "`target` must have the architecture of the model it is called on (the "
                "same trainable weight shapes). Received: target="
                f"{self.target.name} with {[tuple(v.shape) for v in targets][:4]}..."
            )
        x, _ = normalize_data(self.resolve_data(self.data, model), name="data", model=model)
        output_kind = model_output_kind(model, x)
        dataset = fip_dataset(
            outputs_lib.logits_model(model, output_kind),
            x,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        beta = self.beta
        if isinstance(beta, str):
            sample = data_adapter.take(x, slice(0, 2048))
            diagonal = metric_diagonal(model, sample, kind="fisher", seed=self.seed)
            mean = float(np.mean(np.concatenate([np.ravel(d) for d in diagonal])))
            beta = AUTO_BETA_SCALE * mean if np.isfinite(mean) and mean > 0 else 1.0
        normalized = bool(normalization.batch_normalization_layers(model))
        walk_training = normalized if self.training == "auto" else self.training
        trainer = FIPTrainer(
            model,
            step_rule=self.step_rule,
            distance=self.distance,
            beta=1.0,
            epsilon=self.epsilon,
            secondary_objective=_TargetDistance([t.numpy() for t in targets], beta),
            training=walk_training,
            outputs=output_kind,
        )
        trainer.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate)
            if self.step_rule == "penalty"
            else None
        )
        steps = self.epochs * math.ceil(data_adapter.num_examples(x) / self.batch_size)
        self.path = Path(model, record_every=self.record_every)
        callbacks = list(self.callbacks or [])
        evaluator = None
        if self._eval_tasks:
            evaluator = _EvaluateTasks(
                model, self._eval_tasks, self.eval_every or max(1, steps // 20)
            )
            callbacks = [evaluator] + callbacks
        history = trainer.walk(
            dataset,
            steps,
            path=self.path,
            callbacks=callbacks,
            verbose=self.verbose,
            log_dir=self.log_dir,
        )
        if walk_training and normalized:
            normalization.recalibrate_batch_normalization(model, x, self.batch_size * 2)
        if evaluator is not None:
            evaluator.finish(steps)
            history.update(evaluator.history)
        self.history = dict(history, beta=beta, steps=steps)
        return model

    def get_config(self):
        config = super().get_config()
        config.update(
            target=None,
            data=None,
            epochs=self.epochs,
            beta=self.beta,
            distance=self.distance,
            step_rule=self.step_rule,
            learning_rate=self.learning_rate,
            epsilon=self.epsilon,
            batch_size=self.batch_size,
            training=self.training,
            eval_tasks=None,
            eval_every=self.eval_every,
            record_every=self.record_every,
            seed=self.seed,
        )
        return config
