"""`ContinualLearn`: learn a new task along a functionally invariant path, keeping the old."""

import math
import time

import keras
import numpy as np
import tensorflow as tf

from keras_fip.data.tasks import memory_sample
from keras_fip.engine import data_adapter
from keras_fip.engine import distances
from keras_fip.engine import normalization
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine import step_rules
from keras_fip.engine.data_adapter import check_inputs_match_model
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.engine.data_adapter import reference_outputs
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.operations import heads
from keras_fip.operations.base import Operation
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import carry_data
from keras_fip.operations.base import model_output_kind

# β = AUTO_BETA × c_D, where c_D converts the output distance D into the units of the KL
# divergence. The pull is the new task's cross-entropy, in nats per example, and with
# D = KL the anchor term is in nats per example too: β then trades one nat of new-task
# loss against one nat of change on the old outputs, whatever the model. (Compress needs
# the metric diagonal because its pull, ½‖w − P(w)‖², is in weight units; a cross-entropy
# pull moves through the same Jacobian as D, so no such rescaling is needed.) For the
# other distances c_D is the ratio of their second-order expansion at w_ref to KL's
# ½·δᵀ F δ (F the Fisher metric): Bhattacharyya is ⅛·δᵀ F δ, so c = ¼ exactly; squared L2
# on logits is δᵀ G δ (G = JᵀJ), so c = tr G / (½ tr F), estimated on the memory.
AUTO_BETA = 1.0
AUTO_BETA_EXAMPLES = 1024
# The reference logit given to each new output on the memory, relative to the smallest
# old logit of that example (softmax distances): "this class is absent" (e^-10 ≈ 5e-5 of
# the least likely old class).
ABSENT_MARGIN = 10.0


class _EvaluateTasks(keras.callbacks.Callback):
    """Records every task's accuracy (argmax over all outputs) every `every` steps.

    The seconds spent evaluating are kept in `history["eval_seconds"]`, so that a
    method's training time can be told apart from the time spent watching it.
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
        """Makes the last point the model as returned (after any recalibration)."""
        if self.history["eval_step"][-1] == steps:
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
        """The evaluations so far (`WalkCheckpoint`)."""
        return {"step": self.step, "history": self.history, "seconds": self.seconds}

    def set_walk_state(self, state):
        self.step = int(state["step"])
        self.history = {key: list(values) for key, values in state["history"].items()}
        self.seconds = float(state["seconds"])


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
class ContinualLearn(Operation):
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
    free wherever its inputs do not reach: a network that has memorised its training
    set reads unseen old-task inputs through features the memory's outputs do not pin
    down, and the new task's inputs, which the old network reads too, pin more of them.
    (`benchmarks/continual_users.py` measures this on users' models.)

    Heads: with `head="append"` the last Dense layer grows by the new task's k classes
    (old units copied exactly; new ones initialised as Keras would), the returned model
    has C + k outputs and the task's labels 0..k-1 become outputs C..C+k-1; with
    `head="shared"` the output layer already holds the new classes (pre-allocated
    outputs, as the authors' code does) and labels are used as given. Both support
    class-incremental evaluation (argmax over all outputs) and task-incremental
    evaluation (argmax over a task's own outputs); `keras_fip.metrics.accuracy_matrix`
    offers both.

    The reference on the memory for the k new outputs, which the old network does not
    have, is "this class is absent" (`pad_reference`): D is the full-softmax KL to the
    old softmax with the new classes at ≈ 0, so the new units also stay quiet on old
    inputs. Comparing only the old C outputs' softmax would leave the new logits free to
    win the argmax on old inputs, which class-incremental evaluation punishes; comparing
    logits (`distance="l2"`) over-constrains what the softmax ignores (a shift shared by
    all logits). Hence the default `distance="kl"`.

    Very short walks: the `penalty` rule's Adam normalises every weight's step, so the
    weights that only the memory touches (e.g. first-layer weights of pixels the new task
    never lights, on permuted MNIST) move by whole learning-rate steps on the anchor's
    small, noisy gradient, where fine-tuning leaves them exactly still. With about 8
    steps a task on permuted MNIST this forgets more than fine-tuning; with a few epochs
    the anchor's gradient is informative and the walk keeps the old tasks better than
    EWC and replay (see `apps/continual.py`).

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
        epochs: Passes over the new task. Defaults to `5`.
        beta: β, the weight of the new task's cross-entropy, or `"auto"`:
            `AUTO_BETA` (1.0) × c_D, c_D converting D to KL units (1 for `"kl"`, ¼ for
            `"bhattacharyya"`, tr G / (½ tr F) on the memory for `"l2"`), so that β
            trades nats of new-task loss against nats of output change on any model. The
            value used is `op.history["beta"]`. Defaults to `"auto"`.
        distance: Output distance D (`"kl"`, `"bhattacharyya"`, `"l2"`). Defaults to
            `"kl"`.
        step_rule: `"penalty"` (Adam on D + β·CE), `"normalized"` or `"metric"`.
            Defaults to `"penalty"`.
        learning_rate: Initial Adam learning rate of the `penalty` rule, cosine-decayed
            over the walk (Adam's default). Defaults to `1e-3`.
        epsilon: ε, the step length of the `normalized` and `metric` rules. Defaults to
            `0.01`.
        batch_size: New-task examples per step, as `keras.Model.fit` takes them
            (a budget of a few epochs on a few thousand examples is then hundreds of
            steps, not a hundred). Defaults to `32`.
        memory_batch_size: Memory examples per step. Defaults to `None` (`batch_size`).
        training: The mode of the moving network (the reference is always in inference
            mode). `True` runs BatchNormalization on batch statistics, then re-estimates
            the moving statistics on the memory and an equal sample of the new task;
            `"auto"` is `True` when the model has BatchNormalization layers. Defaults to
            `"auto"`.
        eval_tasks: A list of `(x, y)` with labels in the returned model's output indices
            (for `"append"`, the new task's labels + C), whose accuracy is recorded along
            the path in `op.history["task_{i}/accuracy"]` at `op.history["eval_step"]`.
            Defaults to `None`.
        eval_every: Steps between evaluations. Defaults to `None` (10 per walk).
        record_every: Record the weights in `op.path` every this many steps (and at
            the end of each walk). The walk measures `step_norm` and
            `distance_from_start` at the recorded points only
            (`FIPTrainer(measure_every=record_every)`: `op.history` holds NaN
            between them), and a non-finite step puts the model back on the last
            recorded point. Defaults to `100`.
        path_directory: Directory to stream the path to, or `None`. Defaults to `None`.
        jit_compile: Whether to compile the step with XLA. Defaults to `False`.
        seed: Seed of the shuffles, the new units and the memory sample. Defaults to
            `None`.
        checkpoint_directory: Directory where the walk is checkpointed at every recorded
            point (the weights, the optimizer, the task evaluations so far;
            `keras_fip.engine.WalkCheckpoint`), or `None`. Calling the operation again
            with the same arguments, model, data and directory resumes a killed walk
            from its last checkpoint and ends at the weights of an uninterrupted run.
            Needs a `seed`; the path streams into `<checkpoint_directory>/path` (no
            `path_directory`). Defaults to `None`.
        **kwargs: `Operation` arguments (`name`, `verbose`, `callbacks`, `log_dir`).

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1), num_classes=5)
    >>> old, new = y < 5, y >= 5
    >>> grown = keras_fip.ContinualLearn((x[new], y[new] - 5), memory=x[old][:200],
    ...                                  epochs=1, verbose=0)(model)
    >>> grown.output_shape
    (None, 10)
    """

    def __init__(
        self,
        new_task,
        memory=None,
        head="append",
        memory_per_task=500,
        epochs=5,
        beta="auto",
        distance="kl",
        step_rule="penalty",
        learning_rate=1e-3,
        epsilon=0.01,
        batch_size=32,
        memory_batch_size=None,
        training="auto",
        eval_tasks=None,
        eval_every=None,
        record_every=100,
        path_directory=None,
        jit_compile=False,
        seed=None,
        checkpoint_directory=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.head = self.check_choice(head, "head", heads.HEADS)
        if new_task is not None:  # `None` only from `from_config` (data are not saved).
            # Shapes, numbers and finiteness checked here; against the model in `call`.
            x, y = normalize_data(new_task, name="new_task", require_labels=True)
            if self.head == "append" and not isinstance(new_task, tf.data.Dataset):
                # A dataset's labels are checked in `call`, read again for the model.
                heads.task_labels(0, y, "append")
            self._task = (x, y)
        self.new_task = new_task
        if memory is not None:
            normalize_data(memory, name="memory")
        self.memory = memory
        self.memory_per_task = self.check_number(
            memory_per_task, "memory_per_task", low=0, low_inclusive=True, integer=True
        )
        self.epochs = self.check_number(epochs, "epochs", low=1, low_inclusive=True, integer=True)
        if not (isinstance(beta, str) and beta == "auto"):
            beta = self.check_number(beta, "beta", low=0.0)
        self.beta = beta
        if not isinstance(distance, str) or distance not in (
            "kl",
            "bhattacharyya",
            "l2",
            "squared_l2",
        ):
            raise ValueError(
                "`distance` must be one of ['kl', 'bhattacharyya', 'l2']. "
                f"Received: distance={distance!r}"
            )
        self.distance = distance
        self.step_rule = self.check_choice(step_rule, "step_rule", step_rules.STEP_RULES)
        self.learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.epsilon = self.check_number(epsilon, "epsilon", low=0.0)
        self.batch_size = self.check_number(
            batch_size, "batch_size", low=1, low_inclusive=True, integer=True
        )
        if memory_batch_size is not None:
            memory_batch_size = self.check_number(
                memory_batch_size, "memory_batch_size", low=1, low_inclusive=True, integer=True
            )
        self.memory_batch_size = memory_batch_size
        self.training = self.check_training(training)
        self._eval_tasks = []
        if eval_tasks is not None:
            if not isinstance(eval_tasks, (list, tuple)):
                raise ValueError(
                    "`eval_tasks` must be a list of `(x, y)` tuples. "
                    f"Received: eval_tasks={eval_tasks!r}"
                )
            for i, task in enumerate(eval_tasks):
                tx, ty = normalize_data(task, name=f"eval_tasks[{i}]", require_labels=True)
                self._eval_tasks.append(
                    (data_adapter.float32_inputs(tx), np.asarray(ty).astype("int64"))
                )
        self.eval_tasks = eval_tasks
        if eval_every is not None:
            eval_every = self.check_number(
                eval_every, "eval_every", low=1, low_inclusive=True, integer=True
            )
        self.eval_every = eval_every
        self.record_every, self.path_directory, self.seed = self.check_path_options(
            record_every, path_directory, seed
        )
        self.checkpoint_directory = self.check_checkpoint_directory(
            checkpoint_directory, self.path_directory, self.seed
        )
        self.jit_compile = bool(jit_compile)

    # Validation against the model (before any work).

    def _check_against(self, model):
        if self.new_task is None:
            raise ValueError(
                "`new_task` is required (data are not serialised: pass it again after "
                "`from_config`). Received: new_task=None"
            )
        # A dataset batched with a static batch size is only told from one of single
        # examples by the model's inputs: datasets are read again for the model.
        if isinstance(self.new_task, tf.data.Dataset):
            self._task = normalize_data(
                self.new_task, name="new_task", require_labels=True, model=model
            )
        for i, task in enumerate(self.eval_tasks or []):
            if isinstance(task, tf.data.Dataset):
                tx, ty = normalize_data(
                    task, name=f"eval_tasks[{i}]", require_labels=True, model=model
                )
                self._eval_tasks[i] = (
                    data_adapter.float32_inputs(tx),
                    np.asarray(ty).astype("int64"),
                )
        x, y = self._task
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
        heads.task_labels(model.output_shape[-1], y, self.head)
        for i, (tx, _) in enumerate(self._eval_tasks):
            check_inputs_match_model(model, tx, name=f"eval_tasks[{i}]")
        return data_adapter.float32_inputs(x), y, data_adapter.float32_inputs(memory_x)

    def _resolve_beta(self, model, memory_x):
        if not isinstance(self.beta, str):
            return float(self.beta)
        if self.distance == "kl":
            return AUTO_BETA
        if self.distance == "bhattacharyya":
            return AUTO_BETA / 4.0
        sample = data_adapter.take(memory_x, slice(0, AUTO_BETA_EXAMPLES))
        jacobian = metric_diagonal(model, sample, kind="jacobian", seed=self.seed)
        fisher = metric_diagonal(model, sample, kind="fisher", seed=self.seed)
        total_jacobian = sum(float(np.sum(d)) for d in jacobian)
        total_fisher = sum(float(np.sum(d)) for d in fisher)
        if not (np.isfinite(total_fisher) and total_fisher > 0 and total_jacobian > 0):
            return AUTO_BETA
        return AUTO_BETA * total_jacobian / (0.5 * total_fisher)

    def _dataset(self, memory_x, reference, x, labels, old_on_task):
        memory_batch = min(
            self.memory_batch_size or self.batch_size, data_adapter.num_examples(memory_x)
        )
        batch = min(self.batch_size, data_adapter.num_examples(x))
        seed = self.seed

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
        # Validate everything before any work
        x, y, memory_x = self._check_against(model)

        # The frozen network before the task: its logits on the memory (a model ending
        # in a softmax is read through its log-probabilities)
        output_kind = model_output_kind(model, memory_x)
        old_view = outputs_lib.logits_model(model, output_kind)
        reference = reference_outputs(old_view, memory_x, 256)
        self._beta = self._resolve_beta(model, memory_x)

        # The head
        model, labels = heads.prepare_head(model, x, y, self.head, seed=self.seed)
        reference = pad_reference(reference, int(model.output_shape[-1]), self.distance)
        # What the old classes say among themselves on the task's inputs (the pull keeps it)
        kept = old_classes(int(old_view.output_shape[-1]), labels)
        old_on_task = np.asarray(reference_outputs(old_view, x, 256), "float32")[:, kept]
        for i, (_tx, ty) in enumerate(self._eval_tasks):
            if ty.min() < 0 or ty.max() >= model.output_shape[-1]:
                raise ValueError(
                    f"`eval_tasks[{i}]` labels must be outputs of the returned model, in "
                    f"0..{model.output_shape[-1] - 1}. Received: labels in "
                    f"{int(ty.min())}..{int(ty.max())}"
                )

        # The walk
        normalized = bool(normalization.batch_normalization_layers(model))
        walk_training = normalized if self.training == "auto" else self.training
        count = data_adapter.num_examples(x)
        steps = self.epochs * math.ceil(count / min(self.batch_size, count))
        trainer = FIPTrainer(
            model,
            step_rule=self.step_rule,
            distance=self.distance,
            beta=self._beta,
            epsilon=self.epsilon,
            secondary_objective=_Pull(kept, walk_training),
            training=walk_training,
            measure_every=self.record_every,
            outputs=model_output_kind(model, memory_x),
        )
        optimizer = None
        if self.step_rule == "penalty":
            optimizer = keras.optimizers.Adam(
                keras.optimizers.schedules.CosineDecay(self.learning_rate, steps)
            )
        trainer.compile(optimizer=optimizer, jit_compile=self.jit_compile)
        dataset = self._dataset(memory_x, reference, x, labels, old_on_task)
        checkpoint = self.open_checkpoint(self.checkpoint_directory)
        self.path = self.open_walk_path(model, checkpoint, self.record_every, self.path_directory)
        callbacks = list(self.callbacks or [])
        evaluator = None
        if self._eval_tasks:
            every = self.eval_every or max(1, steps // 10)
            evaluator = _EvaluateTasks(model, self._eval_tasks, every)
            callbacks = [evaluator] + callbacks
        if checkpoint is None:
            history = trainer.walk(
                dataset,
                steps,
                path=self.path,
                callbacks=callbacks,
                verbose=self.verbose,
                log_dir=self.log_dir,
            )
        else:
            history = checkpoint.walk(
                "walk",
                trainer,
                dataset,
                steps,
                self.path,
                callbacks=callbacks,
                verbose=self.verbose,
                log_dir=self.log_dir,
            )
            checkpoint.close()
        if walk_training and normalized:
            rng = np.random.default_rng(self.seed)
            sample = data_adapter.take(
                x,
                np.sort(
                    rng.choice(
                        count, min(count, data_adapter.num_examples(memory_x)), replace=False
                    )
                ),
            )
            normalization.recalibrate_batch_normalization(
                model, data_adapter.concatenate([memory_x, sample]), self.batch_size * 2
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
                seed=0 if self.seed is None else self.seed,
            )
            carry_data(model, data_adapter.concatenate([memory_x, data_adapter.take(x, chosen)]))
        else:
            carry_data(model, memory_x)
        self.history = dict(history)
        if evaluator is not None:
            self.history.update(evaluator.history)
            self.history["eval_seconds"] = evaluator.seconds
        self.history["beta"] = self._beta
        self.history["steps"] = steps
        return model

    def get_config(self):
        config = super().get_config()
        config.update(
            new_task=None,  # Data are not serialised; pass them again after from_config.
            memory=None,
            head=self.head,
            memory_per_task=self.memory_per_task,
            epochs=self.epochs,
            beta=self.beta,
            distance=self.distance,
            step_rule=self.step_rule,
            learning_rate=self.learning_rate,
            epsilon=self.epsilon,
            batch_size=self.batch_size,
            memory_batch_size=self.memory_batch_size,
            training=self.training,
            eval_tasks=None,
            eval_every=self.eval_every,
            record_every=self.record_every,
            path_directory=self.path_directory,
            jit_compile=self.jit_compile,
            seed=self.seed,
            checkpoint_directory=self.checkpoint_directory,
        )
        return config
