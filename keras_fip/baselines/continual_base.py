"""The shared machinery of the continual-learning baselines: heads, data, one training loop.

Every baseline is an `Operation` (validated, serialisable, never mutating its input) that
learns `new_task` with the same head handling as `keras_fip.ContinualLearn`
(`head="append"` grows the last Dense layer, `"shared"` uses pre-allocated outputs) and the
same budget: `epochs` passes over the new task, `batch_size` new-task examples per step,
Adam at `learning_rate` cosine-decayed to zero, BatchNormalization and Dropout in
training mode as `fit` runs them. Masks the model carries are kept (the optimizer is a
`MaskedOptimizer`).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_fip import distribute
from keras_fip.engine import data_adapter
from keras_fip.engine import masks as masks_lib
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine import step_rules
from keras_fip.engine.data_adapter import check_inputs_match_model
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.operations import heads
from keras_fip.operations.base import Operation
from keras_fip.operations.base import model_output_kind

# The batch-mean cross-entropy of every baseline's loss (the function, scaled per replica
# by `train`).
cross_entropy = step_rules.mean_cross_entropy


def repeated_batches(tensors, batch_size, seed):
    """An infinite, reshuffled, fixed-size batch pipeline (at most one pass a batch):
    `keras_fip.engine.data_adapter.repeated_batches`, the same batches under any
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
        epochs: Passes over the new task. Defaults to `5`.
        learning_rate: Initial Adam learning rate, cosine-decayed. Defaults to `1e-3`.
        batch_size: New-task examples per step. Defaults to `128`.
        seed: Seed of the shuffles and the new units. Defaults to `None`.
        eval_tasks: A list of `(x, y)` (labels in the returned model's output indices)
            whose accuracy is recorded along training in `op.history["task_{i}/accuracy"]`
            at `op.history["eval_step"]`, as `ContinualLearn` records it. Defaults to
            `None`.
        eval_every: Steps between evaluations. Defaults to `None` (10 per run).
        **kwargs: `Operation` arguments.
    """

    def __init__(
        self,
        new_task,
        head="append",
        epochs=5,
        learning_rate=1e-3,
        batch_size=128,
        seed=None,
        eval_tasks=None,
        eval_every=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
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
        self.epochs = self.check_number(epochs, "epochs", low=1, low_inclusive=True, integer=True)
        self.learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.batch_size = self.check_number(
            batch_size, "batch_size", low=1, low_inclusive=True, integer=True
        )
        if seed is not None:
            seed = self.check_number(seed, "seed", low=0, low_inclusive=True, integer=True)
        self.seed = seed

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
        count = data_adapter.num_examples(x)
        return self.epochs * math.ceil(count / min(self.batch_size, count))

    def training_data(self, x, labels):
        """The `(x, y)` the main pipeline cycles over (the joint baseline widens it)."""
        return x, labels

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
        view = outputs_lib.logits_model(model, model_output_kind(model, x))
        self.prepare(old_view, view, x, labels)
        train_x, train_y = self.training_data(x, labels)
        steps = self.num_steps(train_x)
        self.history = train(view, self, train_x, train_y, steps)
        self.history["steps"] = steps
        return model

    def get_config(self):
        config = super().get_config()
        config.update(
            new_task=None,
            head=self.head,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            seed=self.seed,
            eval_tasks=None,
            eval_every=self.eval_every,
        )
        return config


def train(model, baseline, x, labels, steps, learning_rate=None):
    """Runs `steps` Adam steps of `baseline.loss` on `model` in place; returns a history."""
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
    if baseline._eval_tasks:
        from keras_fip.operations.continual_learn import _EvaluateTasks

        tasks = [(x_, np.asarray(y_).astype("int64")) for x_, y_ in baseline._eval_tasks]
        evaluator = _EvaluateTasks(model, tasks, baseline.eval_every or max(1, steps // 10))
        evaluator.evaluate()
    losses = []
    for batch in distribute.distribute_dataset(dataset.take(steps)):
        losses.append(float(step(batch)))
        if evaluator is not None:
            evaluator.on_train_batch_end(len(losses) - 1)
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
