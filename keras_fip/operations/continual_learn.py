"""`ContinualLearn`: learn a new task along a functionally invariant path, keeping the old."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.core.data_adapter import reference_outputs
from keras_fip.data.tasks import memory_sample
from keras_fip.engine import distances
from keras_fip.engine import step_rules
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.rules import Penalty
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.operations import heads
from keras_fip.operations.base import WalkingOperation
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import carry_data
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.task_evaluation import TaskEvaluation

# β = "auto": the documented strength of the pull (`keras_fip.engine.beta.auto_beta` with
# `objective="outputs"`). The pull is a cross-entropy, in nats per example like D = KL, so
# β = 1 trades one nat of new-task loss against one nat of change on the old outputs;
# `auto_beta` converts other distances into KL units (¼ for Bhattacharyya, the ratio of the
# metric diagonals for squared L2).
STRENGTH = 1.0
# The walk's defaults here: 5 passes over the new task, 32 of its examples a step (as
# `keras.Model.fit` takes them), the `Penalty` rule at Adam's learning rate, cosine-decayed
# (the measured configuration: `Penalty("auto")` forgets more of split MNIST's old tasks).
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
DISTANCES = ("kl", "bhattacharyya", "l2", "squared_l2")
# The reference logit given to each new output on the memory, relative to the smallest
# old logit of that example (softmax distances): "this class is absent" (e^-10 ≈ 5e-5 of
# the least likely old class).
ABSENT_MARGIN = 10.0


def pad_reference(reference, num_outputs, distance):
    """Extends the old network's memory outputs to the grown head's `num_outputs`.

    The old network says nothing about classes it did not have; the reference for a new
    output on an old-task input is "this class is absent". For the softmax distances the
    new logits get the example's smallest old logit minus `ABSENT_MARGIN` (probability
    ≈ 0), so D also keeps the new units quiet on old inputs, which class-incremental
    evaluation (argmax over all outputs) needs; for squared L2 on logits they get the
    smallest old logit (as unlikely as the least likely old class).

    Args:
        reference: Old logits on the memory, shape `(N, C)`.
        num_outputs: C + k.
        distance: The distance name (or callable: treated as a softmax distance).

    Returns:
        An array of shape `(N, C + k)` whose first C columns are `reference`.
    """
    reference = np.asarray(reference, "float32")
    extra = num_outputs - reference.shape[-1]
    if extra <= 0:
        return reference
    low = reference.min(axis=-1, keepdims=True)
    if distance not in ("l2", "squared_l2"):
        low = low - ABSENT_MARGIN
    return np.concatenate([reference, np.repeat(low, extra, axis=-1)], axis=-1)


def old_classes(num_outputs, labels):
    """The outputs of the model before the task that are not the new task's classes.

    Args:
        num_outputs: C, the outputs of the model before the task.
        labels: The new task's labels in output indices.

    Returns:
        A sorted int32 array of output indices (all C with `head="append"`).
    """
    return np.setdiff1d(np.arange(num_outputs), np.unique(labels)).astype("int32")


class _Pull:
    """The walk's pull L: the new task's cross-entropy plus the KL divergence of the old
    classes' conditional distribution on the task's inputs from the old network's.

    `batch` is `(inputs, labels, old logits of the kept classes)`; `network` returns
    logits. With fewer than two kept classes the conditional is constant (no term)."""

    def __init__(self, kept, training):
        self.kept = tf.constant(kept, "int32") if len(kept) > 1 else None
        self.training = training

    def __call__(self, network, batch):
        inputs, labels, old_logits = batch
        logits = network(inputs, training=self.training)
        loss = step_rules.mean_cross_entropy(labels, logits)
        if self.kept is not None:
            loss = loss + distances.kl(tf.gather(logits, self.kept, axis=-1), old_logits)
        return loss


@keras.saving.register_keras_serializable(package="keras_fip")
class ContinualLearn(WalkingOperation):
    """Learns a new task along a functionally invariant path, keeping the old tasks.

    The walk minimises D(f(m; w), f(m; w_old)) + β·L(w), with m the memory of old-task
    inputs and w_old the network before this task (frozen, inference mode): the outputs
    on the memory are kept while L pulls (the FIP). Only inputs are remembered, never
    labels. The pull is the new task's cross-entropy plus the KL divergence, on the new
    task's inputs x, of the old classes' conditional distribution p(c | x, c old) from
    the old network's: the new task is learned by telling new classes from old ones,
    never by rewriting what the old classes say among themselves, on inputs the memory
    does not cover (Learning without Forgetting's distillation, Li & Hoiem 2017, at
    T = 1 and weight 1, in the same nats as D). The memory alone leaves the old function
    free wherever its inputs do not reach; the new task's inputs, which the old network
    reads too, pin more of it.

    Heads: with `head="append"` the last Dense layer grows by the new task's k classes
    (old units copied exactly; new ones initialised as Keras would), the returned model
    has C + k outputs and the task's labels 0..k-1 become outputs C..C+k-1; with
    `head="shared"` the output layer already holds the new classes (pre-allocated
    outputs) and labels are used as given. Both support class-incremental evaluation
    (argmax over all outputs) and task-incremental evaluation (argmax over a task's own
    outputs); `keras_fip.metrics.accuracy_matrix` offers both.

    The reference on the memory for the k new outputs, which the old network does not
    have, is "this class is absent" (`pad_reference`): D is the full-softmax KL to the
    old softmax with the new classes at ≈ 0, so the new units also stay quiet on old
    inputs, which class-incremental evaluation needs. The walk's distance is therefore
    one of `"kl"` (the default), `"bhattacharyya"` or `"l2"`, and its reference the
    start (the old network).

    The walk (`keras_fip.Walk`): its budget is in passes over the new task (5 by
    default), its batch size counts new-task examples a step (32 by default, as
    `keras.Model.fit` takes them), and `beta="auto"` is `keras_fip.engine.beta.auto_beta`
    with strength `STRENGTH` (1.0) on the outputs: one nat of new-task loss against one
    nat of output change for D = KL, converted for the other distances (the value used
    is `op.history["beta"]`). Its rule is `keras_fip.rules.Penalty(learning_rate=1e-3)`
    (`LEARNING_RATE`, Adam's rate, cosine-decayed over the walk) unless the walk names
    one (`Penalty("auto")` for `keras_fip.rules.auto_learning_rate`; the rate used is
    `op.history["learning_rate"]`). The rest is every walk's default (BatchNormalization
    walked on batch statistics, then re-estimated on the memory and an equal sample of the
    new task).

    Memory: the returned model carries the memory plus a class-balanced sample of the
    new task (`memory_per_task` inputs; `keras_fip.operations.carried_data`), so
    `ContinualLearn(task3)(ContinualLearn(task2)(model))` keeps every earlier task. Masks
    the model carries are kept (a compressed model stays exactly as sparse).

    Args:
        new_task: The new task: an `(x, y)` tuple or a labelled, finite
            `tf.data.Dataset` (labels 0..k-1 for `"append"`, output indices for
            `"shared"`).
        memory: Old-task inputs whose outputs are kept (array, `(x, y)` tuple whose
            labels are ignored, or dataset). Defaults to `None` (the memory the model
            carries from an earlier keras_fip operation).
        head: `"append"` or `"shared"`. Defaults to `"append"`.
        memory_per_task: New-task inputs added to the memory the returned model carries
            (class-balanced). Defaults to `500`.
        memory_batch_size: Memory examples per step. Defaults to `None` (the walk's
            batch size).
        eval_tasks: A list of `(x, y)` with labels in the returned model's output indices
            (for `"append"`, the new task's labels + C), whose accuracy is recorded along
            the path in `op.history["task_{i}/accuracy"]` at `op.history["eval_step"]`.
            Defaults to `None`.
        eval_every: Steps between evaluations. Defaults to `None` (10 per walk).
        walk: A `keras_fip.Walk` (budget, rule, batch size, distance, β, recording,
            checkpointing, seed: the seed also draws the new units and the memory
            sample). Defaults to `None` (every default).
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1), num_classes=5)
        >>> old, new = y < 5, y >= 5
        >>> walk = keras_fip.Walk(epochs=1, seed=0, verbose=0)
        >>> grown = keras_fip.ContinualLearn((x[new], y[new] - 5), memory=x[old][:200],
        ...                                  walk=walk)(model)
        >>> grown.output_shape
        (None, 10)
    """

    DEFAULT_BUDGET = {"epochs": 5}

    def __init__(
        self,
        new_task,
        memory=None,
        *,
        head="append",
        memory_per_task=500,
        memory_batch_size=None,
        eval_tasks=None,
        eval_every=None,
        walk=None,
        name=None,
    ):
        super().__init__(walk=walk, name=name)
        self.head = self.check_choice(head, "head", heads.HEADS)
        if new_task is not None:  # `None` only from `from_config` (data are not saved).
            # Shapes, numbers and finiteness checked here; against the model in `validate`.
            _, y = normalize_data(new_task, name="new_task", require_labels=True)
            if self.head == "append" and not isinstance(new_task, tf.data.Dataset):
                # A dataset's labels are checked in `validate`, read again for the model.
                heads.task_labels(0, y, "append")
        self.new_task = new_task
        if memory is not None:
            normalize_data(memory, name="memory")
        self.memory = memory
        self.memory_per_task = self.check_number(
            memory_per_task, "memory_per_task", low=0, low_inclusive=True, integer=True
        )
        if memory_batch_size is not None:
            memory_batch_size = self.check_number(
                memory_batch_size, "memory_batch_size", low=1, low_inclusive=True, integer=True
            )
        self.memory_batch_size = memory_batch_size
        if eval_tasks is not None:
            if not isinstance(eval_tasks, (list, tuple)):
                raise ValueError(
                    "`eval_tasks` must be a list of `(x, y)` tuples. "
                    f"Received: eval_tasks={eval_tasks!r}"
                )
            for i, task in enumerate(eval_tasks):
                normalize_data(task, name=f"eval_tasks[{i}]", require_labels=True)
        self.eval_tasks = eval_tasks
        if eval_every is not None:
            eval_every = self.check_number(
                eval_every, "eval_every", low=1, low_inclusive=True, integer=True
            )
        self.eval_every = eval_every
        walk = self.resolved_walk()
        if not isinstance(walk.distance, str) or walk.distance not in DISTANCES:
            raise ValueError(
                "ContinualLearn's walk `distance` must be one of ['kl', 'bhattacharyya', "
                f"'l2'] (the new outputs' reference is padded). Received: "
                f"distance={walk.distance!r}"
            )
        if walk.reference != "start":
            raise ValueError(
                "ContinualLearn's walk `reference` must be 'start' (the old network's "
                f"outputs on the memory). Received: reference={walk.reference!r}"
            )

    def resolved_walk(self, **defaults):
        return super().resolved_walk(
            rule=Penalty(learning_rate=LEARNING_RATE), batch_size=BATCH_SIZE, **defaults
        )

    # Validation against the model (before any work).

    def _read(self, model):
        """`(x, y, memory inputs, eval tasks)` checked against `model`."""
        if self.new_task is None:
            raise ValueError(
                "`new_task` is required (data are not serialised: pass it again after "
                "`from_config`). Received: new_task=None"
            )
        # A dataset batched with a static batch size is only told from one of single
        # examples by the model's inputs: data are read for the model.
        x, y = normalize_data(self.new_task, name="new_task", require_labels=True, model=model)
        check_inputs_match_model(model, x, name="new_task")
        memory = self.memory if self.memory is not None else carried_data(model)
        if memory is None:
            raise ValueError(
                "`memory` is required: the outputs on old-task inputs are what the walk "
                f"keeps, and model `{model.name}` carries no memory from an earlier "
                "keras_fip operation. Received: memory=None"
            )
        memory_x, _ = normalize_data(memory, name="memory", model=model)
        check_inputs_match_model(model, memory_x, name="memory")
        if self.head == "append":
            heads.output_layer(model)
        _, num_new = heads.task_labels(model.output_shape[-1], y, self.head)
        num_outputs = int(model.output_shape[-1]) + num_new
        eval_tasks = []
        for i, task in enumerate(self.eval_tasks or []):
            tx, ty = normalize_data(task, name=f"eval_tasks[{i}]", require_labels=True, model=model)
            check_inputs_match_model(model, tx, name=f"eval_tasks[{i}]")
            ty = np.asarray(ty).astype("int64")
            if ty.min() < 0 or ty.max() >= num_outputs:
                raise ValueError(
                    f"`eval_tasks[{i}]` labels must be outputs of the returned model, in "
                    f"0..{num_outputs - 1}. Received: labels in "
                    f"{int(ty.min())}..{int(ty.max())}"
                )
            eval_tasks.append((data_adapter.float32_inputs(tx), ty))
        return (
            data_adapter.float32_inputs(x),
            y,
            data_adapter.float32_inputs(memory_x),
            eval_tasks,
        )

    def validate(self, model):
        self._read(model)

    def _dataset(self, walk, memory_x, reference, x, labels, old_on_task):
        memory_batch = min(
            self.memory_batch_size or walk.batch_size, data_adapter.num_examples(memory_x)
        )
        batch = min(walk.batch_size, data_adapter.num_examples(x))
        seed = walk.seed

        def repeated(tensors, size, offset):
            return data_adapter.repeated_batches(
                tensors, size, True, None if seed is None else seed + offset
            )

        anchor = repeated({"anchor_inputs": memory_x, "anchor_outputs": reference}, memory_batch, 0)
        # The old network's outputs on the task's inputs travel with them (the pull).
        task = repeated((x, labels, old_on_task), batch, 1)
        return (
            tf.data.Dataset.zip((anchor, task))
            .map(lambda a, s: {**a, "secondary": s})
            .prefetch(tf.data.AUTOTUNE)
        )

    def call(self, model):
        walk = self.resolved_walk()
        x, y, memory_x, eval_tasks = self._read(model)

        # The frozen network before the task: its logits on the memory (a model ending
        # in a softmax is read through its log-probabilities)
        output_kind = model_output_kind(model, memory_x)
        old_view = outputs_lib.logits_model(model, output_kind)
        reference = reference_outputs(old_view, memory_x, 256)
        beta = walk.beta
        if beta == "auto":
            beta = auto_beta(
                STRENGTH, model, memory_x, walk.distance, objective="outputs", seed=walk.seed
            )

        # The head
        model, labels = heads.prepare_head(model, x, y, self.head, seed=walk.seed)
        reference = pad_reference(reference, int(model.output_shape[-1]), walk.distance)
        # What the old classes say among themselves on the task's inputs (the pull keeps it)
        kept = old_classes(int(old_view.output_shape[-1]), labels)
        old_on_task = np.asarray(reference_outputs(old_view, x, 256), "float32")[:, kept]

        # The walk
        normalized = bool(normalization.batch_normalization_layers(model))
        walk_training = normalized if walk.training == "auto" else walk.training
        count = data_adapter.num_examples(x)
        steps = walk.num_steps(count)
        trainer = FIPTrainer(
            model,
            rule=walk.rule,
            distance=walk.distance,
            beta=beta,
            secondary_objective=_Pull(kept, walk_training),
            training=walk_training,
            measure_every=walk.record_every,
            outputs=model_output_kind(model, memory_x),
        )
        learning_rate = None
        if isinstance(walk.rule, Penalty):
            learning_rate = walk.rule.resolve_learning_rate(model.trainable_variables)
        trainer.compile(
            optimizer=walk.rule.optimizer(steps, model.trainable_variables),
            jit_compile=walk.jit_compile,
        )
        dataset = self._dataset(walk, memory_x, reference, x, labels, old_on_task)
        checkpoint = self.open_checkpoint(walk)
        self.path = self.open_path(model, walk, checkpoint)
        callbacks = list(walk.callbacks or [])
        evaluator = None
        if eval_tasks:
            evaluator = TaskEvaluation(model, eval_tasks, self.eval_every or max(1, steps // 10))
            callbacks = [evaluator] + callbacks
        options = {"callbacks": callbacks, "verbose": walk.verbose, "log_dir": walk.log_dir}
        if checkpoint is None:
            history = trainer.walk(dataset, steps, path=self.path, **options)
        else:
            history = checkpoint.walk("walk", trainer, dataset, steps, self.path, **options)
            checkpoint.close()
        if walk_training and normalized:
            rng = np.random.default_rng(walk.seed)
            sample = data_adapter.take(
                x,
                np.sort(
                    rng.choice(
                        count, min(count, data_adapter.num_examples(memory_x)), replace=False
                    )
                ),
            )
            normalization.recalibrate_batch_normalization(
                model, data_adapter.concatenate([memory_x, sample]), walk.batch_size * 2
            )
        if evaluator is not None:
            evaluator.finish(steps)  # The returned model's accuracy is the last point.

        # Memory and history
        if self.memory_per_task:
            # The class-balanced draw, by example index (the inputs may be several).
            chosen, _ = memory_sample(
                np.arange(count),
                y,
                self.memory_per_task,
                seed=0 if walk.seed is None else walk.seed,
            )
            carry_data(model, data_adapter.concatenate([memory_x, data_adapter.take(x, chosen)]))
        else:
            carry_data(model, memory_x)
        self.history = dict(history)
        if evaluator is not None:
            self.history.update(evaluator.history)
            self.history["eval_seconds"] = evaluator.seconds
        self.history["beta"] = beta
        self.history["steps"] = steps
        if learning_rate is not None:
            self.history["learning_rate"] = learning_rate
        return model

    def get_config(self):
        return {
            **super().get_config(),
            "new_task": None,  # Data are not serialised; pass them again after from_config.
            "memory": None,
            "head": self.head,
            "memory_per_task": self.memory_per_task,
            "memory_batch_size": self.memory_batch_size,
            "eval_tasks": None,
            "eval_every": self.eval_every,
        }
