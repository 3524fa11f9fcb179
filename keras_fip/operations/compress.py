"""`Compress`: sparsify a model along a functionally invariant path."""

import math
import os
import warnings

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core import projection
from keras_fip.core import tuning
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.data_adapter import normalize_data
from keras_fip.engine import step_rules
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.path import Path
from keras_fip.engine.rules import Penalty
from keras_fip.engine.rules import auto_learning_rate
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.engine.walk_checkpoint import WalkCheckpoint
from keras_fip.operations import compress_prunable
from keras_fip.operations import compress_saliency
from keras_fip.operations import compress_schedule
from keras_fip.operations.base import WalkingOperation
from keras_fip.operations.base import check_labels
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.compress_prunable import Prunable
from keras_fip.operations.compress_saliency import Saliency
from keras_fip.operations.compress_schedule import Schedule

__all__ = ["Compress", "Prunable", "Saliency", "Schedule"]

# `beta="auto"`: β = STRENGTH × κ, κ the mean diagonal of the distance's Hessian over the
# prunable weights (`keras_fip.engine.beta.auto_beta`). A target weight w_i the outputs hold
# with curvature g_ii settles where g_ii·(w_i⁰ − w_i) = β·w_i, so the pull dominates the
# outputs' resistance by STRENGTH for a weight of average curvature, on any model.
STRENGTH = 1e4

# `labels="auto"` with labelled `data`: the walks tried, as (weight of the labels'
# cross-entropy, factor of the walk's learning rate). The first keeps the dense network's
# function on the inputs alone; the second weighs the labels in; the third keeps the
# function at a tenth of the rate, for models whose function the auto rate moves too far
# per step (a transformer's attention and embeddings, fine-tuned at rates well below
# their training rate). The one most accurate on the validation data is kept, if it beats
# the first by more than a sign test's standard deviation (`choose_candidate`).
CANDIDATES = ((0.0, 1.0), (1.0, 1.0), (0.0, 0.1))
# Without `validation_data`, the candidates walk on `data` less a stratified, seeded
# SELECTION_FRACTION of it and are compared there; with fewer than SELECTION_MIN_EXAMPLES
# held out, the first candidate is taken without a choice.
SELECTION_FRACTION = 0.2
SELECTION_MIN_EXAMPLES = 100
STRUCTURES = projection.STRUCTURES


def holdout_rows(labels, fraction, seed=None):
    """`(fit_rows, held_rows)`: a stratified, seeded split holding out `fraction` of the
    examples (`keras_fip.core.tuning.validation_rows`; one-hot rows count as their class).

    Args:
        labels: The labels, one row per example (class indices or one-hot rows).
        fraction: The share held out, in (0, 1).
        seed: Seed of the split. Defaults to `None`.

    Returns:
        Two sorted integer arrays of row indices.

    Examples:

        >>> fit, held = holdout_rows(np.array([0, 1] * 10), 0.2, seed=0)
        >>> len(fit), len(held)
        (16, 4)
    """
    return tuning.validation_rows(_class_indices(labels), fraction, seed)


def _class_indices(labels):
    """Class indices from labels given as indices or as one-hot (or soft) rows."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[-1] > 1:
        return np.argmax(labels, axis=-1)
    return labels.reshape(-1)


def choose_candidate(correct):
    """The choice of `labels="auto"` from the validation examples each walk got right.

    The most accurate walk (ties: the earlier one) is chosen if, against the first (the
    inputs alone), it is right on more of the examples where the two differ by more than
    one standard deviation of that count under no difference (a sign test):
    `wins - losses > sqrt(wins + losses)`. Otherwise the first.

    Args:
        correct: A list of boolean arrays, the first walk's first: whether each walk was
            right on each validation example.

    Returns:
        A tuple `(index, wins, losses)`.

    Examples:

        >>> right = np.array([True] * 90 + [False] * 10)
        >>> choose_candidate([right, np.roll(right, 3)])
        (0, 0, 0)
        >>> better = right.copy()
        >>> better[90:] = True
        >>> choose_candidate([right, better])
        (1, 10, 0)
    """
    counts = [int(np.sum(c)) for c in correct]
    best = max(range(len(correct)), key=lambda i: (counts[i], -i))
    wins = int(np.sum(correct[best] & ~correct[0]))
    losses = int(np.sum(~correct[best] & correct[0]))
    if wins - losses > math.sqrt(wins + losses):
        return best, wins, losses
    return 0, wins, losses


def _correct(model, x, y):
    """Whether a classifier (logits or probabilities) is right on each example."""
    outputs = model.predict(x, batch_size=256, verbose=0)
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    elif isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    return np.argmax(outputs, axis=-1) == _class_indices(y)


class _CosineFrom(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay over the whole walk, read from step `offset` on: the settle continues
    the pull's schedule instead of restarting it."""

    def __init__(self, initial_learning_rate, decay_steps, offset=0):
        self.cosine = keras.optimizers.schedules.CosineDecay(initial_learning_rate, decay_steps)
        self.offset = offset

    def __call__(self, step):
        return self.cosine(step + self.offset)

    def get_config(self):
        return {**self.cosine.get_config(), "offset": self.offset}


class _Objective:
    """L of the walk: β·½·‖w − P_p(w)‖² over the prunable weights (the targets held in
    mask variables, updated on the schedule) plus the weighted labels' cross-entropy."""

    def __init__(self, indices, mask_variables, task_weight=0.0, beta=1.0):
        self.indices = indices
        self.mask_variables = mask_variables
        self.task_weight = task_weight
        self.beta = beta

    def __call__(self, model, batch):
        # The batch mean (the trainer scales L per replica).
        total = step_rules.labels_term(model, batch, self.task_weight)
        variables = model.trainable_variables
        for index, mask in zip(self.indices, self.mask_variables):
            weights = variables[index].value
            pruned = weights * (1.0 - keras.ops.cast(mask.value, weights.dtype))
            total = total + 0.5 * self.beta * keras.ops.sum(keras.ops.square(pruned))
        return total


class _RampTargets(keras.callbacks.Callback):
    """Recomputes the target masks every `update_every` steps as the sparsity ramps up."""

    def __init__(self, targets, mask_variables, pull_steps, update_every, schedule, rng):
        super().__init__()
        self.targets = targets
        self.mask_variables = mask_variables
        self.pull_steps = pull_steps
        self.update_every = update_every
        self.schedule = schedule
        self.rng = rng
        self.step = 0

    def update(self):
        for mask_variable, mask in zip(self.mask_variables, self.targets(self.step)):
            mask_variable.assign(mask.astype("float32"))

    def on_train_begin(self, logs=None):
        if self.step == 0:  # A resumed walk has its targets restored.
            self.update()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.update_every == 0:
            self.update()

    def get_walk_state(self):
        """The ramp's position and generator (`keras_fip.engine.WalkCheckpoint`)."""
        return {"step": self.step, "rng": self.rng.bit_generator.state}

    def set_walk_state(self, state):
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]


class _Run:
    """What one `Compress` call computes once and every walk of it shares."""

    def __init__(self, operation, model, walk, x):
        self.operation = operation
        self.walk = walk
        self.inputs = data_adapter.as_arrays(x)
        self.output_kind = model_output_kind(model, x)
        self.normalized = bool(normalization.batch_normalization_layers(model))
        self.training = self.normalized if walk.training == "auto" else bool(walk.training)
        self.distance = walk.distance if isinstance(walk.distance, str) else "kl"
        seed = walk.seed
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        self.seed = seed
        variables = operation.prunable_variables(model)
        if walk.beta == "auto":
            self.beta = auto_beta(
                STRENGTH,
                model,
                self.inputs,
                distance=self.distance,
                objective="weights",
                variables=variables,
                seed=seed,
            )
        else:
            self.beta = float(walk.beta)
        if isinstance(walk.rule, Penalty):
            self.learning_rate = walk.rule.resolve_learning_rate(variables)
        else:  # The settle's rate (the pull steps by ε).
            self.learning_rate = auto_learning_rate(variables)

    def optimizer(self, rate, total_steps, penalty, offset=0):
        if not penalty:
            return None  # The trainer's SGD(1.0) applies θ exactly.
        return keras.optimizers.Adam(_CosineFrom(rate, max(total_steps, 1), offset))

    def trainer(self, model, objective, rate, total_steps, settle=False, offset=0):
        rule = Penalty(rate) if settle else self.walk.rule
        trainer = FIPTrainer(
            model,
            rule=rule,
            distance=self.walk.distance,
            beta=1.0,  # β weighs the projection inside `objective`.
            secondary_objective=objective,
            reference=self.walk.reference,
            training=self.training,
            measure_every=self.walk.record_every,
            outputs=self.output_kind,
        )
        penalty = isinstance(rule, Penalty)
        trainer.compile(
            optimizer=self.optimizer(rate, total_steps, penalty, offset),
            jit_compile=self.walk.jit_compile,
        )
        return trainer

    def sparsify(self, model, x, y, task_weight, rate_factor, checkpoint=None, path=None):
        """Pulls `model` (in place) to the sparse set and settles it; returns the history.

        Without a `path` the walk is one of the choice of the labels' weight: no
        callbacks, progress display or logs."""
        operation, walk = self.operation, self.walk
        schedule, saliency = operation.schedule, operation.saliency
        rng = np.random.default_rng(self.seed)
        variables = operation.prunable_variables(model)
        existing = dict(masks_lib.masks(model))
        inputs = data_adapter.as_arrays(x)
        total_steps = schedule.total_steps(walk, data_adapter.num_examples(x))
        pull_steps = min(schedule.pull_steps(total_steps), total_steps)
        settle_steps = total_steps - pull_steps
        update_every = schedule.update_interval(pull_steps)
        rate = self.learning_rate * rate_factor
        labelled = task_weight > 0 and y is not None
        dataset = fip_dataset(
            outputs_lib.logits_model(model, self.output_kind),
            x,
            secondary=(x, y) if labelled else None,
            batch_size=walk.batch_size,
            reference=walk.reference,
            seed=self.seed,
        )
        final = path is not None
        options = {
            "verbose": walk.verbose if final else 0,
            "log_dir": walk.log_dir if final else None,
        }
        callbacks = list(walk.callbacks or []) if final else []

        def masks_at(sparsity):
            importance = saliency.importance(model, variables, inputs, self.distance, rng)
            return saliency.masks(
                model, sparsity, variables, operation.structure, existing, importance
            )

        def targets(step):
            sparsity = schedule.target_sparsity(step + update_every, pull_steps, operation.sparsity)
            if operation.structure == "2:4":
                sparsity = 0.5
            masks = masks_at(sparsity)
            return [masks[v.path] for v in variables]

        def run(phase, trainer, steps, phase_callbacks, state_variables=()):
            if checkpoint is None:
                return trainer.walk(dataset, steps, path=path, callbacks=phase_callbacks, **options)
            return checkpoint.walk(
                phase,
                trainer,
                dataset,
                steps,
                path,
                callbacks=phase_callbacks,
                state_variables=state_variables,
                **options,
            )

        # Pull towards the projection onto the ramping sparse set
        by_id = {id(v): i for i, v in enumerate(model.trainable_variables)}
        mask_variables = [
            keras.Variable(np.ones(v.shape, "float32"), trainable=False, name=f"target_{i}")
            for i, v in enumerate(variables)
        ]
        objective = _Objective(
            [by_id[id(v)] for v in variables],
            mask_variables,
            task_weight if labelled else 0.0,
            self.beta,
        )
        ramp = _RampTargets(targets, mask_variables, pull_steps, update_every, schedule, rng)
        trainer = self.trainer(model, objective, rate, total_steps)
        history = run("pull", trainer, pull_steps, [ramp] + callbacks, mask_variables)

        # Apply the final mask exactly, then settle with it fixed
        masks = masks_at(operation.sparsity)
        masks_lib.apply_masks(model, masks)
        if settle_steps:
            task = _Objective([], [], task_weight) if labelled else None
            settle = self.trainer(model, task, rate, total_steps, settle=True, offset=pull_steps)
            settled = run("settle", settle, settle_steps, callbacks)
            history = {
                key: list(history.get(key, [])) + list(settled.get(key, []))
                for key in set(history) | set(settled)
            }
        if self.training and self.normalized:
            normalization.recalibrate_batch_normalization(model, inputs, walk.batch_size * 2)
        history = dict(history)
        history.update(
            beta=self.beta,
            learning_rate=rate,
            task_weight=float(task_weight if labelled else 0.0),
            training=self.training,
            steps=total_steps,
            pull_steps=pull_steps,
            target_updates=1 + (pull_steps - 1) // update_every,
            update_every=update_every,
            layer_sparsity={v.path: float(1.0 - masks[v.path].mean()) for v in variables},
        )
        return history


@keras.saving.register_keras_serializable(package="keras_fip")
class Compress(WalkingOperation):
    """Sparsifies a model along a functionally invariant path.

    The prunable weights are pulled towards P_p(w), their projection onto the p-sparse set,
    by the secondary objective L(w) = ½·‖w − P_p(w)‖², while the output distance D to the
    starting network on the inputs of `data` keeps the function. The target sparsity ramps
    up as tfmot's polynomial schedule does and the target masks are recomputed from the
    current weights on the way (weights the path has shrunk drop out, weights it needs come
    back); then the final mask is applied exactly and the walk settles with it fixed,
    minimising D (plus the labels' cross-entropy when they are weighted in), so the sparse
    network recovers the dense network's outputs (`keras_fip.compress.Schedule`). The
    returned model has exactly `sparsity` of its prunable weights at zero and carries its
    masks (`keras_fip.masks`), so any later training keeps them; masks the input carries
    are kept and count towards the sparsity.

    **What is pruned.** The prunable set (`keras_fip.compress.Prunable`) is the one tfmot's
    `prune_low_magnitude` prunes: the kernels of Dense, EinsumDense and convolution
    layers, Embedding tables and MultiHeadAttention's kernels, wherever they sit (custom
    layers, nested models); not biases or normalisation parameters. `sparsity` counts the
    prunable weights; `op.sparsity_summary` (`keras_fip.core.projection.SparsitySummary`)
    gives the zero fraction of all the model's parameters beside it, and a warning says
    when the prunable weights are less than half of the model. Which weights P_p keeps is
    the `saliency` (`keras_fip.compress.Saliency`: by magnitude or by the output metric,
    over all layers above a layer-collapse floor, or per layer).

    **Labels.** When `data` is `(x, y)` the labels are used by default (`labels="auto"`):
    the walk on the inputs alone, a walk with the labels' cross-entropy in L and the walk
    on the inputs alone at a tenth of the learning rate (`CANDIDATES`) are compared on
    validation data, and another walk than the first is taken only when it is right on
    more validation examples than the walk on the inputs alone by more than a sign test's
    standard deviation (`choose_candidate`), as a baseline's learning rate is chosen on a
    validation split. The validation data are `validation_data` when given
    (then every candidate walks on all of `data` and the chosen one is returned); else a
    stratified, seeded fifth of `data` held out of the candidates' walks, after which the
    chosen walk runs on all of `data`. Examples the dense network was trained on favour
    keeping its function, so pass held-out `validation_data` where there are some.
    `labels=False` (or `data=x`) walks on the inputs alone; a number walks with that
    weight of the labels' cross-entropy, without a choice. A model ending in a softmax
    is walked through its log-probabilities.

    **The walk** (`keras_fip.Walk`) says how: the budget (Compress's is 10 epochs of
    `data`, raised to the schedule's `min_steps`; the walk's `steps` are taken exactly),
    the rule and its learning rate (`"auto"`: `keras_fip.rules.auto_learning_rate` of the
    prunable weights, cosine-decayed over the whole walk), the batch size, the distance D,
    β (`"auto"`: `keras_fip.engine.beta.auto_beta` with strength `STRENGTH` = 1e4 over the
    prunable weights), the training mode (`"auto"` walks BatchNormalization on batch
    statistics, re-estimated on `data` after the walk), the recording, the checkpointing
    (a killed walk resumes from its last checkpoint), the seed, compilation, verbosity,
    callbacks and logs.

    After a call, `op.history` holds the walk's per-step scalars and `"steps"`,
    `"pull_steps"`, `"beta"`, `"learning_rate"`, `"task_weight"` (the labels' weight
    used), `"labels_selection"` (the candidates' validation accuracies, when they were
    compared), `"selection_steps"` (the steps of the candidates' walks beside the one that
    returned the model) and `"total_steps"`, `"layer_sparsity"`, `"prunable_sparsity"`,
    `"parameter_sparsity"` and the counts behind them; `op.path` is its `keras_fip.Path`
    and `op.sparsity_summary` its `SparsitySummary` (read from `op.history`). Nothing
    else of a call is kept on the operation.

    Args:
        sparsity: p, the fraction of the prunable weights to zero, in [0, 1).
        data: Inputs whose outputs are kept: an array, an `(x, y)` tuple (labels as class
            indices or one-hot rows) or a finite `tf.data.Dataset`. Defaults to `None`
            (the inputs the model carries from an earlier operation).
        validation_data: Labelled `(x, y)` on which `labels="auto"` compares its walks,
            best held out of the dense network's training. Defaults to `None` (a fifth
            of `data`).
        labels: `"auto"` (the labels' weight chosen on validation data), `False` (the
            inputs alone; labels only report accuracy) or the weight of the labels'
            cross-entropy in L. Without labels in `data` it has no effect. Defaults to
            `"auto"`.
        structure: `"unstructured"`, `"nodes"` (whole Dense units), `"filters"` (whole
            convolution filters) or `"2:4"` (two of every four input weights; p = 0.5).
            The structured modes leave the output layer whole and `"filters"` prunes
            convolution kernels only; the sparsity counts the kernels they prune.
            Defaults to `"unstructured"`.
        saliency: A `keras_fip.compress.Saliency`, or `"magnitude"` / `"metric"` (that
            criterion with its defaults). Defaults to `"magnitude"`.
        prunable: A `keras_fip.compress.Prunable`. Defaults to `None` (tfmot's set).
        schedule: A `keras_fip.compress.Schedule`. Defaults to `None` (its defaults).
        walk: A `keras_fip.Walk`. Defaults to `None` (every default).
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
        >>> walk = keras_fip.Walk(steps=40, seed=0, verbose=0)
        >>> op = keras_fip.Compress(0.9, data=x, walk=walk)  # the inputs alone
        >>> sparse = op(model)
        >>> round(op.sparsity_summary.prunable_sparsity, 3)
        0.9
        >>> labelled = keras_fip.Compress(0.9, data=(x, y), walk=walk)
        >>> sparse = labelled(model)
        >>> labelled.history["task_weight"] in (0.0, 1.0)
        True
    """

    DEFAULT_BUDGET = {"epochs": 10}

    def __init__(
        self,
        sparsity,
        *,
        data=None,
        validation_data=None,
        labels="auto",
        structure="unstructured",
        saliency="magnitude",
        prunable=None,
        schedule=None,
        walk=None,
        name=None,
    ):
        super().__init__(walk=walk, name=name)
        self.sparsity = projection.check_sparsity(sparsity)
        if structure not in STRUCTURES:
            raise ValueError(
                f"`structure` must be one of {list(STRUCTURES)}. Received: structure={structure!r}"
            )
        if structure == "2:4" and abs(self.sparsity - 0.5) > 1e-9:
            raise ValueError(
                "`structure='2:4'` zeroes exactly half of each kernel, so `sparsity` must be "
                f"0.5. Received: sparsity={sparsity}"
            )
        self.structure = structure
        if data is not None:
            normalize_data(data, name="data")  # Shapes, numbers and finiteness.
        self.data = data
        if validation_data is not None:
            normalize_data(validation_data, name="validation_data", require_labels=True)
        self.validation_data = validation_data
        self.labels = check_labels(labels)
        self.saliency = compress_saliency.get(saliency)
        self.prunable = compress_prunable.get(prunable)
        self.schedule = compress_schedule.get(schedule)

    @property
    def sparsity_summary(self):
        """The last call's `keras_fip.core.projection.SparsitySummary` (read from
        `op.history`), or `None` before a call."""
        history = self.history or {}
        if "prunable_zeros" not in history:
            return None
        return projection.SparsitySummary(
            history["parameters"],
            history["zeros"],
            history["prunable_parameters"],
            history["prunable_zeros"],
        )

    # The prunable set.

    def prunable_variables(self, model):
        """The variables this operation prunes on `model`: the prunable set, less the
        output layer's and (for `"filters"`) all but convolution kernels in the structured
        modes.

        Args:
            model: A built `keras.Model`.

        Returns:
            A list of variables (a `ValueError` if there are none).
        """
        variables = self.prunable.variables(model)
        if not variables:
            raise ValueError(
                "`model` has no prunable weights (Dense/EinsumDense/Conv kernels, Embedding "
                "tables and attention kernels by default; see `keras_fip.compress.Prunable`). "
                f"Received: model={model.name}"
            )
        if self.structure not in ("nodes", "filters"):
            return variables
        output_layer = next(
            (
                layer
                for layer in reversed(model.layers)
                if any(v is w for v in variables for w in layer.trainable_weights)
            ),
            None,
        )
        excluded = {id(w) for w in output_layer.trainable_weights} if output_layer else set()
        kept = [
            v
            for v in variables
            if id(v) not in excluded and (self.structure == "nodes" or len(v.shape) >= 3)
        ]
        if not kept:
            raise ValueError(
                f"`structure={self.structure!r}` prunes whole hidden "
                f"{'units' if self.structure == 'nodes' else 'convolution filters'}, and "
                f"`model` has none outside its output layer. Received: model={model.name}"
            )
        return kept

    # Calling.

    def validate(self, model):
        data = self.resolve_data(self.data, model)
        x, _ = normalize_data(data, name="data", model=model)
        data_adapter.check_inputs_match_model(model, x, name="data")
        if self.validation_data is not None:
            x_val, _ = normalize_data(
                self.validation_data, name="validation_data", require_labels=True, model=model
            )
            data_adapter.check_inputs_match_model(model, x_val, name="validation_data")
        variables = self.prunable_variables(model)
        # The projection's shape checks (e.g. 2:4 input widths), on the weights as they are.
        projection.magnitude_masks(
            model, self.sparsity, self.structure, "per_layer", variables, layer_floor=0.0
        )

    def call(self, model):
        walk = self.resolved_walk()
        x, y = normalize_data(self.resolve_data(self.data, model), name="data", model=model)
        variables = self.prunable_variables(model)
        before = projection.sparsity_summary(model, variables)
        if before.prunable_share < projection.SMALL_PRUNABLE_SHARE:
            warnings.warn(
                f"The prunable weights of model `{model.name}` are "
                f"{100 * before.prunable_share:.1f}% of its {before.parameters:,} parameters: "
                f"sparsity={self.sparsity:g} zeroes about "
                f"{100 * self.sparsity * before.prunable_share:.1f}% of the model "
                "(`op.sparsity_summary` gives the exact fraction). The prunable set is "
                "Dense/EinsumDense/Conv kernels, Embedding tables and attention kernels; "
                "see `keras_fip.compress.Prunable`.",
                stacklevel=3,
            )
        # β and the learning rate from the starting model on all of `data`, for every walk
        run = _Run(self, model, walk, x)

        # The labels' weight: given, or chosen on validation data
        if y is None or self.labels == 0.0:
            candidates, y = [(0.0, 1.0)], None
        elif self.labels == "auto":
            candidates = list(CANDIDATES)
        else:
            candidates = [(self.labels, 1.0)]
        if len(candidates) > 1 and self.validation_data is not None:
            model, history = self._choose_on_validation(model, x, y, candidates, run, walk)
        else:
            selection, steps = None, 0
            if len(candidates) > 1:
                candidates, selection, steps = self._choose_on_held_out(
                    model, x, y, candidates, run
                )
            checkpoint = self.open_checkpoint(walk)
            self.path = self.open_path(model, walk, checkpoint)
            task_weight, rate_factor = candidates[0]
            history = run.sparsify(model, x, y, task_weight, rate_factor, checkpoint, self.path)
            if checkpoint is not None:
                checkpoint.close()
            if selection is not None:
                history["labels_selection"] = selection
            history["selection_steps"] = steps
        history["total_steps"] = history["steps"] + history["selection_steps"]
        summary = projection.sparsity_summary(model, self.prunable_variables(model))
        history["prunable_sparsity"] = summary.prunable_sparsity
        history["parameter_sparsity"] = summary.sparsity
        history["prunable_parameters"] = summary.prunable_parameters
        history["parameters"] = summary.parameters
        history["zeros"] = summary.zeros
        history["prunable_zeros"] = summary.prunable_zeros
        self.history = history
        return model

    def _choose_on_held_out(self, model, x, y, candidates, run):
        """`(chosen candidates, record, steps)`: the candidates walked on `data` less a
        stratified, seeded fifth of it and compared on that fifth."""
        fit_rows, held_rows = holdout_rows(y, SELECTION_FRACTION, run.seed)
        if len(held_rows) < SELECTION_MIN_EXAMPLES:
            record = {"validation": "held_out", "validation_examples": int(len(held_rows))}
            return candidates[:1], record, 0
        x_fit, y_fit = data_adapter.take(x, fit_rows), np.asarray(y)[fit_rows]
        x_held, y_held = data_adapter.take(x, held_rows), np.asarray(y)[held_rows]
        correct, steps = [], 0
        for task_weight, rate_factor in candidates:
            candidate = copy_model(model)
            walked = run.sparsify(candidate, x_fit, y_fit, task_weight, rate_factor)
            steps += walked["steps"]
            correct.append(_correct(candidate, x_held, y_held))
        index, record = self._record(candidates, correct, "held_out")
        return [candidates[index]], record, steps

    def _choose_on_validation(self, model, x, y, candidates, run, walk):
        """`(model, history)`: every candidate walked on all of `data`, the one chosen on
        `validation_data` returned (its path is `op.path`)."""
        x_val, y_val = normalize_data(
            self.validation_data, name="validation_data", require_labels=True, model=model
        )
        runs, correct = [], []
        for index, (task_weight, rate_factor) in enumerate(candidates):
            candidate = copy_model(model)
            checkpoint = None
            if walk.checkpoint_directory is not None:
                directory = os.path.join(walk.checkpoint_directory, f"candidate_{index}")
                checkpoint = WalkCheckpoint(directory, self.checkpoint_config())
                path = checkpoint.open_path(candidate, walk.record_every)
            else:
                path = Path(candidate, record_every=walk.record_every)
            history = run.sparsify(candidate, x, y, task_weight, rate_factor, checkpoint, path)
            if checkpoint is not None:
                checkpoint.close()
            runs.append((candidate, history, path))
            correct.append(_correct(candidate, x_val, y_val))
        index, record = self._record(candidates, correct, "validation_data")
        model, history, self.path = runs[index]
        if walk.path_directory is not None:
            self.path.save(walk.path_directory)
        history["labels_selection"] = record
        history["selection_steps"] = sum(
            h["steps"] for i, (_, h, _) in enumerate(runs) if i != index
        )
        return model, history

    @staticmethod
    def _record(candidates, correct, source):
        index, wins, losses = choose_candidate(correct)
        record = {
            "validation": source,
            "validation_examples": int(len(correct[0])),
            "candidates": [
                {
                    "task_weight": float(task_weight),
                    "learning_rate_factor": float(rate_factor),
                    "validation_accuracy": float(np.mean(right)),
                }
                for (task_weight, rate_factor), right in zip(candidates, correct)
            ],
            "chosen": int(index),
            "wins": wins,
            "losses": losses,
        }
        return index, record

    def get_config(self):
        return {
            **super().get_config(),
            "sparsity": self.sparsity,
            "data": None,  # Data are not serialised; pass them again after from_config.
            "validation_data": None,
            "labels": self.labels,
            "structure": self.structure,
            "saliency": keras.saving.serialize_keras_object(self.saliency),
            "prunable": keras.saving.serialize_keras_object(self.prunable),
            "schedule": keras.saving.serialize_keras_object(self.schedule),
        }
