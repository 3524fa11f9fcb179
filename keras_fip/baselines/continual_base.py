"""The shared machinery of the continual-learning baselines: heads, data, one training loop.

Every baseline is an `Operation` (validated, serialisable, never mutating its input) that
learns `new_task` with the same head handling as `keras_fip.ContinualLearn`
(`head="append"` grows the last Dense layer, `"shared"` uses pre-allocated outputs) and the
same budget, given the same way: a `keras_fip.Walk` whose `epochs` (passes over the new
task, 5 by default) or `steps`, `batch_size` (new-task examples per step, 32 by default, as
`keras.Model.fit`), `seed` and `verbose` the baseline reads (the walk's other fields are a
FIP walk's and are refused). Training is Adam at `learning_rate` cosine-decayed to zero,
BatchNormalization and Dropout in training mode as `fit` runs them. The learning rate is
chosen as the methods' authors choose it, on a split held out of the new task
(`learning_rate="auto"`, `keras_fip.core.tuning.grid_search`). Masks the model carries
are kept (the optimizer is a `MaskedOptimizer`).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_fip import distribute
from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import outputs as outputs_lib
from keras_fip.core import tuning
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.engine import step_rules
from keras_fip.engine import walk as walk_lib
from keras_fip.metrics.continual import task_accuracy
from keras_fip.operations import heads
from keras_fip.operations.base import Operation
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.task_evaluation import TaskEvaluation

# The batch-mean cross-entropy of every baseline's loss (the function, scaled per replica
# by `train`).
cross_entropy = step_rules.mean_cross_entropy
# The budget of a walk that names none, and the new-task examples per step.
DEFAULT_BUDGET = {"epochs": 5}
BATCH_SIZE = 32
# The walk's fields a baseline reads; the others are a FIP walk's.
WALK_FIELDS = ("steps", "epochs", "batch_size", "seed", "verbose")
# `learning_rate="auto"`: every rate of the grid is trained (the full budget each) on the
# new task minus a held-out `VALIDATION_FRACTION` (and a baseline's labelled memory minus
# the same fraction), and the rate with the best mean held-out accuracy over the new task
# and the old tasks' validation data the baseline has (ties: the smaller) is used to train
# on the whole task; `keras_fip.core.tuning.grid_search` extends the grid past an edge
# that is the best alone, at most `MAX_GRID_EXTENSIONS` times each way.
LEARNING_RATE_GRID = (3e-4, 1e-3, 3e-3)
DEFAULT_LEARNING_RATE = 1e-3  # Adam's: the grid's middle.
MAX_GRID_EXTENSIONS = 2
VALIDATION_FRACTION = 0.1


def baseline_walk(walk):
    """`walk` (a `keras_fip.Walk`, its config or `None`) checked to set only the fields a
    baseline reads (`WALK_FIELDS`)."""
    walk = walk_lib.get(walk)
    config = walk.get_config()
    extra = {
        key: value for key, value in config.items() if key not in WALK_FIELDS and value is not None
    }
    if extra or walk.callbacks is not None:
        extra = extra or {"callbacks": walk.callbacks}
        raise ValueError(
            "A continual baseline reads only the walk's budget (`steps` or `epochs`), "
            "`batch_size`, `seed` and `verbose`; the other fields are a FIP walk's. "
            f"Received: {', '.join(f'{key}={value!r}' for key, value in extra.items())}"
        )
    return walk


def repeated_batches(tensors, batch_size, seed):
    """An infinite, reshuffled, fixed-size batch pipeline (at most one pass a batch):
    `keras_fip.core.data_adapter.repeated_batches`, the same batches under any
    `tf.distribute` strategy."""
    size = len(tf.nest.flatten(tensors)[0])
    return data_adapter.repeated_batches(tensors, min(batch_size, size), seed=seed)


def check_labelled(data, name, finite=True, model=None):
    """`(x float32, y int)` from an `(x, y)` tuple or labelled dataset, else ValueError
    (`model`: the model the inputs feed, which a statically batched dataset is un-batched
    for; see `normalize_data`)."""
    x, y = normalize_data(data, name=name, require_labels=True, model=model)
    if finite and not data_adapter.all_finite(x):
        raise ValueError(f"`{name}` must be finite. Received: NaN or Inf inputs")
    return data_adapter.float32_inputs(x), np.asarray(y)


class ContinualBaseline(Operation):
    """Base of the continual-learning baselines: head, budget and the training loop.

    Subclasses implement `loss(model, batch)` (batch: `{"task": (x, y), ...}`) and may add
    pipelines in `extra_data(model, labels)` and a gradient transform in
    `transform_gradients(model, batch, gradients)`.

    Args:
        new_task: The new task, an `(x, y)` tuple or a labelled dataset (labels 0..k-1 for
            `"append"`, output indices for `"shared"`).
        head: `"append"` or `"shared"`. Defaults to `"append"`.
        learning_rate: Initial Adam learning rate, cosine-decayed, or `"auto"`: the
            rate of `LEARNING_RATE_GRID` (3e-4, 1e-3, 3e-3, extended past an edge that
            wins) whose run on the new task minus a held-out 10% has the best held-out
            accuracy (averaged with the old tasks' held-out accuracy where the baseline
            has old-task data: its labelled memory, minus the same 10% while choosing,
            or EWC's `validation_tasks`), then trained on the whole task. The rate used
            is `op.history["learning_rate"]`, every rate tried
            `op.history["learning_rate_scores"]`. Defaults to `"auto"`.
        eval_tasks: A list of `(x, y)` (labels in the returned model's output indices)
            whose accuracy is recorded along training in `op.history["task_{i}/accuracy"]`
            at `op.history["eval_step"]`, as `ContinualLearn` records it. Defaults to
            `None`.
        eval_every: Steps between evaluations. Defaults to `None` (10 per run).
        walk: A `keras_fip.Walk` giving the budget (`epochs`, passes over the new task,
            or `steps`), `batch_size` (new-task examples per step), `seed` (shuffles,
            new units, held-out split) and `verbose` (a progress bar of the final
            training); its other fields must be left unset. Defaults to `None`
            (5 epochs of 32-example steps).
        name: The operation's name. Defaults to `None`.
    """

    def __init__(
        self,
        new_task,
        *,
        head="append",
        learning_rate="auto",
        eval_tasks=None,
        eval_every=None,
        walk=None,
        name=None,
    ):
        super().__init__(name=name)
        self.walk = baseline_walk(walk)
        self._eval_tasks = [
            check_labelled(task, f"eval_tasks[{i}]") for i, task in enumerate(eval_tasks or [])
        ]
        self.eval_tasks = eval_tasks
        if eval_every is not None:
            eval_every = self.check_number(
                eval_every, "eval_every", low=1, low_inclusive=True, integer=True
            )
        self.eval_every = eval_every
        self.head = self.check_choice(head, "head", heads.HEADS)
        if new_task is not None:
            self._task = check_labelled(new_task, "new_task")
            if self.head == "append" and not isinstance(new_task, tf.data.Dataset):
                # A dataset's labels are checked in `call` (`read_datasets`).
                heads.task_labels(0, self._task[1], "append")
        self.new_task = new_task
        if not (isinstance(learning_rate, str) and learning_rate == "auto"):
            learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.learning_rate = learning_rate
        # The new task's fraction held out by the `"auto"` searches (EWC takes it as an
        # argument).
        self.validation_fraction = VALIDATION_FRACTION

    def resolved_walk(self):
        """The walk with the baselines' budget and batch size filled."""
        return self.walk.resolve(**DEFAULT_BUDGET, batch_size=BATCH_SIZE)

    @property
    def batch_size(self):
        """New-task examples per step (the walk's)."""
        return self.resolved_walk().batch_size

    @property
    def seed(self):
        """The walk's seed."""
        return self.walk.seed

    # Hooks.

    def read_datasets(self, model):
        """Reads the `tf.data.Dataset` arguments again for `model`, first thing in `call`.

        A dataset batched with a static batch size (`drop_remainder=True`) is only told
        from one of single examples by the model's inputs, so construction reads it as it
        looks and `call` reads it again, un-batched. Subclasses with more data arguments
        extend this (`read_dataset_arguments`)."""
        if isinstance(self.new_task, tf.data.Dataset):
            self._task = check_labelled(self.new_task, "new_task", model=model)
        self._eval_tasks = self.read_dataset_arguments(
            model, self.eval_tasks, self._eval_tasks, "eval_tasks"
        )

    @staticmethod
    def read_dataset_arguments(model, tasks, read, name):
        """`read` (the labelled `tasks` as construction read them), with each dataset among
        `tasks` read again for `model`."""
        return [
            check_labelled(task, f"{name}[{i}]", model=model)
            if isinstance(task, tf.data.Dataset)
            else done
            for i, (task, done) in enumerate(zip(tasks or [], read))
        ]

    def check(self, model):
        """Further checks against the model before any work (subclasses)."""

    def prepare(self, old_model, model, x, labels):
        """Work needing the model before (`old_model`) and after the head (subclasses)."""

    def extra_data(self, model, x, labels):
        """Extra pipelines zipped with the task's: a dict name -> dataset (subclasses)."""
        return {}

    def loss(self, model, batch):
        raise NotImplementedError

    def transform_gradients(self, model, batch, gradients):
        """The gradients handed to the optimizer. Runs in a replica context: `gradients`
        are this replica's share (of the loss over `num_replicas`), which the optimizer
        sums over the replicas; a non-linear transform all-reduces them first."""
        return gradients

    def num_steps(self, x):
        """The steps of a run over the inputs `x` (the walk's budget)."""
        return self.resolved_walk().num_steps(data_adapter.num_examples(x))

    def training_data(self, x, labels):
        """The `(x, y)` the main pipeline cycles over (the joint baseline widens it). Its
        first examples are the new task's, in order (`y` may carry more arrays, e.g. the
        old network's outputs)."""
        return x, labels

    def old_validation(self):
        """Old-task validation data `[(x, y)]` (labels in output indices) that the held-out
        score averages in beside the new task's split (subclasses that have some)."""
        return []

    def validation_score(self, model, validation):
        """The held-out score of a candidate: its mean accuracy over the new task's
        held-out split and each set of `old_validation()`."""
        tasks = list(validation) + list(self.old_validation())
        return float(np.mean([task_accuracy(model, vx, vy) for vx, vy in tasks]))

    def candidates(self, model, kind, x, labels):
        """A function `(settings) -> held-out score` that trains a copy of `model` on the
        training data minus the held-out split with `settings` applied
        (`apply_settings`), and the held-out split itself.

        Args:
            model: The model with its head ready (not trained by the candidates).
            kind: Its output kind.
            x: The new task's inputs.
            labels: Their labels in output indices.

        Returns:
            A tuple `(score function, validation list)`.
        """
        train_x, train_y = self.training_data(x, labels)
        count = data_adapter.num_examples(x)
        rows, held = tuning.validation_rows(None, self.validation_fraction, self.seed, count=count)
        # Rows past the new task's (the joint baseline's old tasks) always train.
        rows = np.concatenate([rows, np.arange(count, data_adapter.num_examples(train_x))])
        candidate_x = data_adapter.take(train_x, rows)
        candidate_y = tf.nest.map_structure(lambda array: array[rows], train_y)
        validation = [(data_adapter.take(x, held), np.asarray(labels)[held])]

        def score(settings):
            candidate = outputs_lib.logits_model(copy_model(model), kind)
            self.apply_settings(settings)
            train(
                candidate,
                self,
                candidate_x,
                candidate_y,
                self.num_steps(candidate_x),
                learning_rate=settings["learning_rate"],
                evaluate=False,
            )
            return self.validation_score(candidate, validation)

        return score, validation

    def apply_settings(self, settings):
        """Sets the knobs a candidate run trains with (subclasses: their own)."""

    def choose_learning_rate(self, score):
        """The grid search of `learning_rate="auto"`: `(rate, scores)`."""
        return tuning.grid_search(
            lambda rate: score({"learning_rate": rate}),
            LEARNING_RATE_GRID,
            max_extensions=MAX_GRID_EXTENSIONS,
        )

    # The loop.

    def check_task(self, model):
        if self.new_task is None:
            raise ValueError(
                "`new_task` is required (data are not serialised: pass it again after "
                "`from_config`). Received: new_task=None"
            )
        self.read_datasets(model)
        x, y = self._task
        check_inputs_match_model(model, x, name="new_task")
        if self.head == "append":
            heads.output_layer(model)
        heads.task_labels(model.output_shape[-1], y, self.head)
        return x, y

    def check_inputs(self, model, data, name):
        x, y = normalize_data(data, name=name, model=model)
        check_inputs_match_model(model, x, name=name)
        if not data_adapter.all_finite(x):
            raise ValueError(f"`{name}` must be finite. Received: NaN or Inf inputs")
        return data_adapter.float32_inputs(x), y

    def call(self, model):
        # Validate everything before any work
        x, y = self.check_task(model)
        self.check(model)
        old_model = model
        model, labels = heads.prepare_head(model, x, y, self.head, seed=self.seed)
        # Every loss reads logits: a model ending in a softmax through its log-probabilities
        # (views sharing the weights, so training the view trains the model).
        old_view = outputs_lib.logits_model(old_model, model_output_kind(old_model, x))
        kind = model_output_kind(model, x)
        view = outputs_lib.logits_model(model, kind)
        self.prepare(old_view, view, x, labels)

        # The learning rate: given, or chosen on a held-out split of the new task
        rate, scores = self.learning_rate, None
        if rate == "auto":
            score, _ = self.candidates(model, kind, x, labels)
            rate, scores = self.choose_learning_rate(score)

        # Training on the whole task
        train_x, train_y = self.training_data(x, labels)
        steps = self.num_steps(train_x)
        self.history = train(view, self, train_x, train_y, steps, learning_rate=rate)
        self.history["steps"] = steps
        self.history["learning_rate"] = rate
        if scores is not None:
            self.history["learning_rate_scores"] = scores
        return model

    def get_config(self):
        return {
            **super().get_config(),
            "new_task": None,  # Data are not serialised; pass them again after from_config.
            "head": self.head,
            "learning_rate": self.learning_rate,
            "eval_tasks": None,
            "eval_every": self.eval_every,
            "walk": self.walk.get_config(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("walk") is not None:
            config["walk"] = walk_lib.get(config["walk"])
        return cls(**config)


def train(model, baseline, x, labels, steps, learning_rate=None, evaluate=True):
    """Runs `steps` Adam steps of `baseline.loss` on `model` in place; returns a history.

    Args:
        model: The model to train (its logits view), changed in place.
        baseline: The `ContinualBaseline` whose loss, data and settings are used.
        x: The training inputs.
        labels: Their labels (a structure of arrays for baselines that carry more).
        steps: The number of steps.
        learning_rate: The initial rate, a number. Defaults to `None`
            (`baseline.learning_rate`).
        evaluate: Whether `baseline`'s `eval_tasks` are recorded along training (and
            its walk's `verbose` shows progress). Defaults to `True`.

    Returns:
        A dict of per-step losses (and the evaluations).
    """
    seed = baseline.seed
    pipelines = {"task": repeated_batches((x, labels), baseline.batch_size, seed)}
    pipelines.update(baseline.extra_data(model, x, labels))
    dataset = tf.data.Dataset.zip(pipelines).prefetch(tf.data.AUTOTUNE)
    rate = baseline.learning_rate if learning_rate is None else learning_rate
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(rate, steps))
    if masks_lib.masks(model):
        optimizer = masks_lib.MaskedOptimizer(optimizer)
    variables = model.trainable_variables
    optimizer.build(variables)

    def replica_step(batch):
        # Under a strategy each replica takes its slice of the global batch; its loss is
        # scaled by 1/replicas, as Keras scales it, and the optimizer sums the gradients.
        with tf.GradientTape() as tape:
            loss = baseline.loss(model, batch) / step_rules.num_replicas()
        gradients = tape.gradient(loss, [v.value for v in variables])
        gradients = [
            tf.zeros_like(v.value) if g is None else g for g, v in zip(gradients, variables)
        ]
        gradients = baseline.transform_gradients(model, batch, gradients)
        optimizer.apply(gradients, variables)
        return loss

    step = distribute.replica_step(replica_step)

    evaluator = None
    if evaluate and baseline._eval_tasks:
        tasks = [(x_, np.asarray(y_).astype("int64")) for x_, y_ in baseline._eval_tasks]
        evaluator = TaskEvaluation(model, tasks, baseline.eval_every or max(1, steps // 10))
        evaluator.evaluate()
    verbose = baseline.resolved_walk().verbose if evaluate else 0
    progress = None
    if verbose != 0:
        progress = keras.utils.Progbar(steps, verbose=1 if verbose == "auto" else verbose)
    losses = []
    for batch in distribute.distribute_dataset(dataset.take(steps)):
        losses.append(float(step(batch)))
        if evaluator is not None:
            evaluator.on_train_batch_end(len(losses) - 1)
        if progress is not None:
            progress.update(len(losses), [("loss", losses[-1])])
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"{type(baseline).__name__} hit a non-finite loss at step {len(losses)}. "
                "Lower the learning rate or check the data."
            )
    history = {"loss": losses}
    if evaluator is not None:
        evaluator.finish(steps)
        history.update(evaluator.history)
        history["eval_seconds"] = evaluator.seconds
    return history
