"""`Compress`: sparsify a model along a functionally invariant path."""

import math
import warnings

import keras
import numpy as np

from keras_fip.engine import data_adapter
from keras_fip.engine import distances as distances_lib
from keras_fip.engine import masks as masks_lib
from keras_fip.engine import normalization
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine import projection
from keras_fip.engine import step_rules
from keras_fip.engine.copy import copy_model
from keras_fip.engine.data_adapter import fip_dataset
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.operations.base import Operation
from keras_fip.operations.base import model_output_kind

SALIENCIES = ("magnitude", "metric")
# β = AUTO_BETA_SCALE × the mean diagonal of the output metric over the prunable weights.
# A target weight w_i that the outputs hold with curvature g_ii settles where
# g_ii·(w_i⁰ − w_i) = β·w_i: the pull must dominate g_ii for the targets to reach zero. The
# mean diagonal spans orders of magnitude across models (6e-5 for LeNet-300-100 on MNIST,
# 0.1 for ResNet-20 on CIFAR-10, 1.0 for a 5k-weight conv net on 8×8 digits), so a fixed β
# is too weak for some (β = 1 left that conv net at 45% where β ≈ 10⁴ keeps 94%) and
# needlessly strong for others. With 1e4, β ≈ 0.6 on LeNet-300-100, in the range tuned
# there (0.1-1), and β/g_ii = 1e4 for an average weight of any model.
AUTO_BETA_SCALE = 1e4
# Inputs of that estimate: the Fisher diagonal is carried by the few uncertain inputs, and
# 1,024 of them scatter β by ±40% on LeNet-300-100; 8,192 hold it to about ±5%.
AUTO_BETA_EXAMPLES = 8192
# The path's budget does not shrink with the data: at least MIN_STEPS steps (1,400 digits
# at 10 epochs of batch 128 would be 110 steps, two target updates), and the targets are
# recomputed every MAX_UPDATE_EVERY steps or often enough for MIN_TARGET_UPDATES updates,
# but never more often than every MIN_UPDATE_EVERY steps: targets recomputed at every step
# chase the weights they move (a 48-step pull on the digits MLP at 90% kept 82% updating
# every step, 91% every 50).
MIN_STEPS = 1000
MAX_UPDATE_EVERY = 50
MIN_UPDATE_EVERY = 10
MIN_TARGET_UPDATES = 40
# `learning_rate="auto"` = AUTO_LEARNING_RATE_SCALE × the RMS of the prunable weights that are
# not already zero. Adam moves every weight by about the learning rate per step whatever its
# scale (the argument of LARS and LAMB), so a fixed rate is a step relative to the weights
# that shrinks as they grow: under BatchNormalization, kernels grow freely in training (their
# scale carries no function), and the digits conv nets of `benchmarks.compress_unseen` end at
# an RMS of 0.10-0.25 where LeNet-300-100 on MNIST has 0.068. 0.044 × 0.068 = 3e-3, the rate
# tuned on LeNet-300-100 at 99.1% (1e-2 is worse there: FIP 96.34% against 97.07%).
AUTO_LEARNING_RATE_SCALE = 0.044
# The rate when every prunable weight is zero (nothing to scale by): the LeNet rate.
FALLBACK_LEARNING_RATE = 3e-3


# `task_weight="auto"`: the candidates, each walked on `data` less a stratified, seeded
# split of SELECTION_FRACTION of it, the most accurate on that split chosen; with fewer
# than SELECTION_MIN_EXAMPLES held out (too few to tell the candidates apart),
# FALLBACK_TASK_WEIGHT: the inputs alone. The labels' weight 1 equals the distillation
# term's. On the keras.io text transformer (SST-2, 6,920 sentences walked over 1,000 steps)
# the labels overfit at any weight (`python -m benchmarks.compress_users --steps=0
# --task_weights=0,1,10`, 50%: 80.9% test accuracy with 0, 77.2% with 1, 77.4% with 10); on
# an underfit digits MLP weight 1 is chosen and beats the inputs alone
# (`tests/operations/test_compress.py`).
TASK_WEIGHTS = (0.0, 1.0)
SELECTION_FRACTION = 0.2
SELECTION_MIN_EXAMPLES = 100
FALLBACK_TASK_WEIGHT = 0.0


def holdout_rows(labels, fraction, seed=None):
    """`(fit_rows, held_rows)`: a seeded split of `fraction` of the examples, stratified by
    class (integer labels of one value per example; other labels are split at random).

    Args:
        labels: The labels, one row per example.
        fraction: The share held out, in (0, 1).
        seed: Seed of the split. Defaults to `None`.

    Returns:
        Two sorted integer arrays of row indices.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    else:
        groups = [np.arange(len(labels))]
    held = [
        rng.permutation(rows)[: int(round(fraction * len(rows)))] for rows in groups if len(rows)
    ]
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, "int64")
    return np.setdiff1d(np.arange(len(labels)), held), held


def choose_task_weight(correct):
    """The choice of `task_weight="auto"` from the held-out examples each candidate got right.

    The most accurate candidate (ties: the smaller weight) is chosen if, against the first
    (the inputs alone), it is right on more of the examples where the two differ by more
    than one standard deviation of that count under no difference (a sign test):
    `wins - losses > sqrt(wins + losses)`. Otherwise the first.

    Args:
        correct: Dict mapping each candidate weight, the first one first, to a boolean
            array: whether its walk was right on each held-out example.

    Returns:
        A tuple `(task_weight, wins, losses)`.

    Example:

    >>> right = np.array([True] * 90 + [False] * 10)
    >>> choose_task_weight({0.0: right, 1.0: np.roll(right, 3)})
    (0.0, 0, 0)
    """
    weights = list(correct)
    first = weights[0]
    best = max(weights, key=lambda w: (int(np.sum(correct[w])), -w))
    wins = int(np.sum(correct[best] & ~correct[first]))
    losses = int(np.sum(~correct[best] & correct[first]))
    if wins - losses > math.sqrt(wins + losses):
        return best, wins, losses
    return first, wins, losses


def _correct(model, x, y):
    """Whether a classifier (logits or probabilities) is right on each example."""
    outputs = model.predict(x, batch_size=256, verbose=0)
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    elif isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    return np.argmax(outputs, axis=-1) == np.asarray(y)


class _CosineFrom(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay over the whole path, read from step `offset` on: the settle phase
    continues the pull's schedule instead of restarting it."""

    def __init__(self, initial_learning_rate, decay_steps, offset=0):
        self.cosine = keras.optimizers.schedules.CosineDecay(initial_learning_rate, decay_steps)
        self.offset = offset

    def __call__(self, step):
        return self.cosine(step + self.offset)

    def get_config(self):
        return {**self.cosine.get_config(), "offset": self.offset}


def _structured_variables(model, variables, structure):
    """The variables a structured mode prunes: not the output layer (its units are the
    model's outputs), and only convolution kernels for `"filters"`."""
    if structure not in ("nodes", "filters"):
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
        if id(v) not in excluded and (structure == "nodes" or len(v.shape) >= 3)
    ]
    if not kept:
        raise ValueError(
            f"`structure={structure!r}` prunes whole hidden "
            f"{'units' if structure == 'nodes' else 'convolution filters'}, and `model` "
            f"has none outside its output layer. Received: model={model.name}"
        )
    return kept


class _ProjectionDistance:
    """β·½·‖w − P_p(w)‖² (+ the weighted task loss): the squared distance of the prunable
    weights to their projection, with the current target masks held in variables (updated
    on a schedule). β is applied here, so that the task loss keeps its own weight."""

    def __init__(self, indices, mask_variables, task_weight=0.0, beta=1.0):
        self.indices = indices
        self.mask_variables = mask_variables
        self.task_weight = task_weight
        self.beta = beta

    def __call__(self, model, batch):
        total = 0.0
        if self.task_weight and batch is not None:
            inputs, labels = batch
            # The batch mean (the trainer scales L per replica).
            total = self.task_weight * step_rules.mean_cross_entropy(
                labels, model(inputs, training=True)
            )
        variables = model.trainable_variables
        for index, mask in zip(self.indices, self.mask_variables):
            weights = variables[index].value
            pruned = weights * (1.0 - keras.ops.cast(mask.value, weights.dtype))
            total = total + 0.5 * self.beta * keras.ops.sum(keras.ops.square(pruned))
        return total


class _TaskLoss:
    """The settle phase's L: the task cross-entropy on labelled batches (weighted)."""

    def __init__(self, task_weight):
        self.projection = _ProjectionDistance([], [], task_weight)

    def __call__(self, model, batch):
        return self.projection(model, batch)


class _RampTargets(keras.callbacks.Callback):
    """Recomputes the target masks every `update_every` steps as the sparsity ramps up."""

    def __init__(self, operation, variables, mask_variables, pull_steps, existing_masks):
        super().__init__()
        self.operation = operation
        self.variables = variables
        self.mask_variables = mask_variables
        self.pull_steps = pull_steps
        self.existing_masks = existing_masks
        self.step = 0
        self.targets = {}

    def target_sparsity(self, step):
        progress = min(1.0, step / max(1, self.pull_steps * self.operation.ramp_fraction))
        return self.operation.sparsity * (1.0 - (1.0 - progress) ** self.operation.ramp_power)

    def update(self):
        op = self.operation
        sparsity = self.target_sparsity(self.step + op._update_every)
        if op.structure == "2:4":
            sparsity = 0.5
        self.targets = op._masks(self.model_to_prune, sparsity, self.variables, self.existing_masks)
        for variable, mask_variable in zip(self.variables, self.mask_variables):
            mask_variable.assign(self.targets[variable.path].astype("float32"))

    def on_train_begin(self, logs=None):
        if self.step == 0:  # A resumed walk has its targets restored.
            self.update()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.operation._update_every == 0:
            self.update()

    def get_walk_state(self):
        """The ramp's position and the operation's generator (`WalkCheckpoint`)."""
        return {"step": self.step, "rng": self.operation._rng.bit_generator.state}

    def set_walk_state(self, state):
        self.step = int(state["step"])
        self.operation._rng.bit_generator.state = state["rng"]


@keras.saving.register_keras_serializable(package="keras_fip")
class Compress(Operation):
    """Sparsifies a model along a functionally invariant path.

    The prunable weights are pulled towards P_p(w), their projection onto the p-sparse set,
    by the secondary objective L(w) = ½·‖w − P_p(w)‖², while the output distance D to the
    starting network on `data` keeps the function (the FIP). The target sparsity ramps up
    as tfmot's polynomial schedule does and the target masks are recomputed from the
    current weights every `update_every` steps (weights the path has shrunk drop out,
    weights it needs come back). Then the final mask is applied exactly, and the path
    settles for the remaining steps with the mask fixed, minimising D (plus the labels'
    cross-entropy when it is weighted in): the sparse network recovers the dense network's
    outputs. The returned model has exactly the requested fraction of its prunable weights
    at zero (per layer with `scope="per_layer"`, overall with `"global"`), and carries its
    masks (`keras_fip.masks`), so any later training keeps them. Masks the input already
    carries are kept and count towards the sparsity.

    **What is pruned.** The prunable set is the one tfmot's `prune_low_magnitude` prunes
    by default (its `prune_registry`): the kernels of Dense, EinsumDense and convolution
    layers (Conv1D/2D/3D, transposed, depthwise and separable), the tables of Embedding
    layers, and the query, key, value and output kernels of MultiHeadAttention, wherever
    they sit (custom layers, nested models); biases and normalisation parameters are not
    (`include_biases`, `include_normalization`; `include_embeddings=False` leaves the
    embedding tables dense). tfmot leaves depthwise kernels dense; here they are pruned
    too, under the layer-collapse floor. `sparsity` counts the prunable weights;
    `op.history["parameter_sparsity"]` is the zero fraction of all the model's parameters
    beside it (`op.sparsity_summary`, `keras_fip.engine.projection.sparsity_summary` for
    any model), and a warning says when the prunable weights are less than half of the
    model.

    **Labels.** When `data` is `(x, y)`, the labels are used by default
    (`task_weight="auto"`): their cross-entropy joins L with the weight, 0 or 1
    (`TASK_WEIGHTS`), whose walk, on `data` less a stratified, seeded fifth of it, is the
    more accurate on that held-out fifth, as a baseline's learning rate is chosen on a
    validation split. The labels are weighted in only when their walk is right on more
    held-out examples than the walk on the inputs alone by more than a sign test's
    standard deviation (`choose_task_weight`), and never with fewer than 100 held-out
    examples. The walk that returns the model then runs on all of `data` with that
    weight. The choice costs one walk per candidate on four fifths of the data:
    `op.history["selection_steps"]` counts their steps, `op.history["total_steps"]` all
    steps, `op.history["task_weight"]` is the weight used and
    `op.history["task_weight_selection"]` the held-out accuracies. The held-out fifth is
    kept out of the walks, not out of the dense network's training: on the data a model
    was trained on, it favours keeping what the network memorised, and the labels win
    only where they help beyond it. D still keeps the starting network's function on
    every input; the labels pull it where they disagree with it. The inputs alone, as
    without labels, are one argument away: `task_weight=0` (or `data=x`).

    Args:
        sparsity: p, the fraction of prunable weights to zero, in [0, 1).
        data: Inputs whose outputs are kept: an array, an `(x, y)` tuple (the labels are
            used as `task_weight` says, and report accuracy) or a finite
            `tf.data.Dataset`. Defaults to `None` (the inputs the model carries from an
            earlier operation).
        structure: `"unstructured"`, `"nodes"` (whole Dense units), `"filters"` (whole
            convolution filters) or `"2:4"` (two of every four input weights; p = 0.5).
            The structured modes leave the output layer whole (its units are the model's
            outputs) and `"filters"` prunes convolution kernels only; the sparsity counts
            the kernels they prune. Defaults to `"unstructured"`.
        scope: `"global"` (one magnitude ranking over all prunable weights, above each
            layer's collapse floor; see `layer_floor`) or `"per_layer"` (each layer loses
            the fraction p). Defaults to `"global"`.
        epochs: Passes over `data`: the budget of the whole path (pull and settle),
            raised to `min_steps` steps when the data are few. Defaults to `10`.
        steps: The exact number of steps of the whole path, instead of `epochs` (and
            `min_steps`). The number taken is `op.history["steps"]`. Defaults to `None`.
        min_steps: The fewest steps an `epochs` budget gives: the walk must be long
            enough for the targets to reach zero and the function to settle however few
            the inputs are (1,400 digits at 10 epochs would be 110 steps). Defaults to
            `1000`.
        pull_fraction: Fraction of the steps spent pulling towards P_p(w); the rest
            settle with the mask fixed. Defaults to `0.7`.
        ramp_fraction: Fraction of the pull over which the target sparsity ramps from 0
            to p. Defaults to `0.7`.
        ramp_power: Exponent of the polynomial ramp. Defaults to `3`.
        update_every: Steps between recomputations of the target masks, or `"auto"`:
            every 50 steps, or more often on short pulls so that the targets are
            recomputed 40 times, but at most every 10 steps (`op.history["target_updates"]`
            counts them). Defaults to `"auto"`.
        layer_floor: With `scope="global"`, no layer is pruned below this fraction of its
            Erdős–Rényi-kernel density (`keras_fip.engine.projection.erk_densities`): the
            layer-collapse protection, which keeps a small stem or output layer
            functional; 0 is the plain global ranking, 1 the ERK allocation, `"auto"` 1
            for models with BatchNormalization (whose kernels' scales carry no function)
            and 0.5 otherwise (see `keras_fip.engine.projection.magnitude_masks`).
            Defaults to `"auto"`.
        beta: β, the weight of the projection distance in L, or `"auto"`:
            `AUTO_BETA_SCALE` (1e4) × the mean diagonal of the output metric over the
            prunable weights (estimated on up to 8,192 inputs), so that the pull has
            the same strength relative to how hard the outputs resist it on any model
            (β ≈ 0.6 for LeNet-300-100 on MNIST, ≈ 10³ for ResNet-20 on CIFAR-10). The
            value used is `op.history["beta"]`. Defaults to `"auto"`.
        saliency: The norm of the projection P_p. `"magnitude"` (Euclidean: keep the
            largest weights) or `"metric"` (the diagonal of the output metric, the Fisher
            information for `"kl"`/`"bhattacharyya"` and JᵀJ otherwise, estimated on
            `metric_examples` inputs at every target update: keep the weights whose
            removal changes the outputs least). Defaults to `"magnitude"`.
        metric_examples: Inputs per estimate of the metric diagonal for
            `saliency="metric"`. Defaults to `1024`.
        task_weight: When `data` has labels, the weight of their cross-entropy in L, in
            both phases (the hard-label term of knowledge distillation, D being the
            distillation term, both in nats), or `"auto"`: chosen among `TASK_WEIGHTS` on a
            split held out of `data` (see above). `0` walks on the inputs alone (the labels
            only report accuracy). Without labels it has no effect. Defaults to `"auto"`.
        training: The mode of the moving network on the path (the starting network's
            outputs, which D keeps, always come from inference mode). `True` runs
            BatchNormalization on batch statistics and updates its moving statistics:
            pruning shrinks the activations each
            normalisation receives, and frozen moving statistics would turn that
            shrinkage into a large change of the outputs. The moving statistics are then
            re-estimated on `data` for the final weights
            (`keras_fip.engine.recalibrate_batch_normalization`). It also turns Dropout
            on. `"auto"` is `True` when the model has BatchNormalization layers. Defaults
            to `"auto"`.
        distance: Output distance D (`"l2"` on logits, `"kl"`, `"bhattacharyya"`).
            Defaults to `"kl"`.
        step_rule: `"penalty"`, `"normalized"` or `"metric"`. Defaults to `"penalty"`.
        learning_rate: Initial Adam learning rate of the `penalty` rule, cosine-decayed
            over the whole path (the settle phase continues the schedule, so the fixed
            mask is not met by a learning-rate restart), or `"auto"`:
            `AUTO_LEARNING_RATE_SCALE` (0.044) × the RMS of the non-zero prunable weights
            of the starting model. Adam moves each weight by about the learning rate per
            step whatever the weight's scale (the argument of LARS and LAMB), so a fixed
            rate is a step relative to the weights that shrinks as they grow, and it bounds
            how far the pull can shrink a weight over the path: too low a rate leaves the
            targets short of zero when the mask is applied, too high a rate loses the
            function. Weights differ in scale across models (RMS 0.068 for LeNet-300-100
            on MNIST; 0.10-0.25 for the BatchNorm conv nets of
            `benchmarks.compress_unseen`, whose kernels grow freely in training because
            BatchNormalization makes their scale irrelevant), so `"auto"` keeps the step
            relative to the weights: 3e-3 on LeNet-300-100 (where 1e-2 is worse: 96.34%
            against 97.07% at 99.1%), ≈ 1.07e-2 on the residual conv net of
            `benchmarks.compress_unseen --dataset=mnist8` (80%, 3 seeds, 10,000 test
            images: 96.22% where the fixed 3e-3 kept 95.74%; tuned gradual pruning
            96.32%). On the same net on the 8×8 digits themselves (1,150 inputs walked
            over 1,000 steps, 360 test images) "auto" (≈ 7e-3) kept 98.24% against
            98.52% at 3e-3 (3 seeds; one image is 0.28 pp). The value used is
            `op.history["learning_rate"]`. Defaults to `"auto"`.
        epsilon: ε, the step length of the `normalized` and `metric` rules. Defaults to
            `0.01`.
        batch_size: Anchor examples per step. Defaults to `128`.
        include_biases: Whether biases are prunable. Defaults to `False`.
        include_normalization: Whether normalisation scales/offsets are prunable. Defaults
            to `False`.
        include_embeddings: Whether embedding tables are prunable. Defaults to `True`.
        record_every: Record the weights in `op.path` every this many steps (and at
            the end of each walk). The walk measures `step_norm` and
            `distance_from_start` at the recorded points only
            (`FIPTrainer(measure_every=record_every)`: `op.history` holds NaN
            between them), and a non-finite step puts the model back on the last
            recorded point. Defaults to `100`.
        path_directory: Directory to stream the path to, or `None`. Defaults to `None`.
        jit_compile: Whether to compile the step with XLA. Defaults to `False`.
        seed: Shuffle seed. Defaults to `None`.
        checkpoint_directory: Directory where the walk is checkpointed at every recorded
            point (the weights, the optimizer, the target masks, the ramp's step and
            both phases' progress; `keras_fip.engine.WalkCheckpoint`), or `None`. Calling
            the operation again with the same arguments, model, data and directory
            resumes a killed walk from its last checkpoint and ends at the weights of an
            uninterrupted run. Needs a `seed`; the path streams into
            `<checkpoint_directory>/path` (no `path_directory`). Defaults to `None`.
        **kwargs: `Operation` arguments (`name`, `verbose`, `callbacks`, `log_dir`).

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
    >>> op = keras_fip.Compress(0.9, data=x, epochs=1, verbose=0)  # inputs only
    >>> sparse = op(model)
    >>> round(op.history["prunable_sparsity"], 3)
    0.9
    >>> labelled = keras_fip.Compress(0.9, data=(x, y), steps=20, verbose=0)
    >>> sparse = labelled(model)
    >>> labelled.history["task_weight"] in labelled.TASK_WEIGHTS
    True
    """

    TASK_WEIGHTS = TASK_WEIGHTS

    def __init__(
        self,
        sparsity,
        data=None,
        structure="unstructured",
        scope="global",
        epochs=10,
        steps=None,
        min_steps=MIN_STEPS,
        pull_fraction=0.7,
        ramp_fraction=0.7,
        ramp_power=3,
        update_every="auto",
        layer_floor=projection.DEFAULT_LAYER_FLOOR,
        beta="auto",
        saliency="magnitude",
        metric_examples=1024,
        task_weight="auto",
        training="auto",
        distance="kl",
        step_rule="penalty",
        learning_rate="auto",
        epsilon=0.01,
        batch_size=128,
        include_biases=False,
        include_normalization=False,
        include_embeddings=True,
        record_every=100,
        path_directory=None,
        jit_compile=False,
        seed=None,
        checkpoint_directory=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sparsity = projection.check_sparsity(sparsity)
        projection.check_structure_and_scope(structure, scope)
        if structure == "2:4" and abs(self.sparsity - 0.5) > 1e-9:
            raise ValueError(
                "`structure='2:4'` zeroes exactly half of each kernel, so `sparsity` must be "
                f"0.5. Received: sparsity={sparsity}"
            )
        self.structure = structure
        self.scope = scope
        if data is not None:
            normalize_data(data, name="data")  # Checks shapes, numbers and finiteness.
        self.data = data
        self.epochs = self.check_number(epochs, "epochs", low=1, low_inclusive=True, integer=True)
        if steps is not None:
            steps = self.check_number(steps, "steps", low=2, low_inclusive=True, integer=True)
        self.steps = steps
        self.min_steps = self.check_number(
            min_steps, "min_steps", low=0, low_inclusive=True, integer=True
        )
        self.pull_fraction = self.check_number(pull_fraction, "pull_fraction", low=0.0, high=1.0)
        self.ramp_fraction = self.check_number(ramp_fraction, "ramp_fraction", low=0.0, high=1.0)
        self.ramp_power = self.check_number(ramp_power, "ramp_power", low=0.0)
        if not (isinstance(update_every, str) and update_every == "auto"):
            update_every = self.check_number(
                update_every, "update_every", low=1, low_inclusive=True, integer=True
            )
        self.update_every = update_every
        self.layer_floor = projection.check_layer_floor(layer_floor)
        if not (isinstance(beta, str) and beta == "auto"):
            beta = self.check_number(beta, "beta", low=0.0)
        self.beta = beta
        self.saliency = self.check_choice(saliency, "saliency", SALIENCIES)
        self.metric_examples = self.check_number(
            metric_examples, "metric_examples", low=1, low_inclusive=True, integer=True
        )
        if not (isinstance(task_weight, str) and task_weight == "auto"):
            task_weight = self.check_number(task_weight, "task_weight", low=0.0, low_inclusive=True)
        self.task_weight = task_weight
        self.training = self.check_training(training)
        distances_lib.get(distance)
        self.distance = distance
        self.step_rule = self.check_choice(step_rule, "step_rule", step_rules.STEP_RULES)
        if not (isinstance(learning_rate, str) and learning_rate == "auto"):
            learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.learning_rate = learning_rate
        self.epsilon = self.check_number(epsilon, "epsilon", low=0.0)
        self.batch_size = self.check_number(
            batch_size, "batch_size", low=1, low_inclusive=True, integer=True
        )
        self.include_biases = bool(include_biases)
        self.include_normalization = bool(include_normalization)
        self.include_embeddings = bool(include_embeddings)
        self.record_every, self.path_directory, self.seed = self.check_path_options(
            record_every, path_directory, seed
        )
        self.checkpoint_directory = self.check_checkpoint_directory(
            checkpoint_directory, self.path_directory, self.seed
        )
        self.jit_compile = bool(jit_compile)
        self.sparsity_summary = None

    def walk_steps(self, num_examples):
        """The number of steps of the whole path for `num_examples` inputs: `steps` if
        given, else `epochs` passes over the data, but never fewer than `min_steps`."""
        if self.steps is not None:
            return self.steps
        return max(self.epochs * math.ceil(num_examples / self.batch_size), self.min_steps)

    def target_update_interval(self, pull_steps):
        """Steps between target-mask updates: `update_every`, or with `"auto"` every
        `MAX_UPDATE_EVERY` steps, more often on short pulls so that there are at least
        `MIN_TARGET_UPDATES` updates, but at most every `MIN_UPDATE_EVERY` steps."""
        if not isinstance(self.update_every, str):
            return self.update_every
        return max(MIN_UPDATE_EVERY, min(MAX_UPDATE_EVERY, pull_steps // MIN_TARGET_UPDATES))

    def _metric_diagonal(self, model, variables, examples):
        """The diagonal of the output metric (Fisher for KL/Bhattacharyya, JᵀJ for L2) on
        `examples` random inputs."""
        count = data_adapter.num_examples(self._inputs)
        rows = self._rng.choice(count, min(examples, count), replace=False)
        kind = "fisher" if self.distance in ("kl", "bhattacharyya") else "jacobian"
        return metric_diagonal(
            model,
            data_adapter.take(self._inputs, np.sort(rows)),
            variables,
            kind=kind,
            seed=int(self._rng.integers(2**31)),
        )

    def _resolve_beta(self, model, variables):
        """β: as given, or `AUTO_BETA_SCALE` × the mean metric diagonal (`"auto"`)."""
        if not isinstance(self.beta, str):
            return float(self.beta)
        diagonal = self._metric_diagonal(model, variables, AUTO_BETA_EXAMPLES)
        mean = float(np.mean(np.concatenate([np.ravel(np.asarray(d)) for d in diagonal])))
        if not np.isfinite(mean) or mean <= 0.0:
            return 1.0  # Outputs that do not depend on the weights: any β pulls freely.
        return AUTO_BETA_SCALE * mean

    def _resolve_learning_rate(self, variables):
        """The initial Adam rate: as given, or `AUTO_LEARNING_RATE_SCALE` × the RMS of the
        non-zero prunable weights (`"auto"`)."""
        if not isinstance(self.learning_rate, str):
            return float(self.learning_rate)
        squares, count = 0.0, 0
        for variable in variables:
            weights = np.asarray(variable.numpy(), dtype="float64")
            live = weights[weights != 0.0]
            squares += float(np.sum(np.square(live)))
            count += live.size
        if not count:
            return FALLBACK_LEARNING_RATE
        return AUTO_LEARNING_RATE_SCALE * math.sqrt(squares / count)

    def _masks(self, model, sparsity, variables, existing):
        """The projection P_p(w): in the Euclidean norm, or in the diagonal metric."""
        importance = None
        if self.saliency == "metric":
            importance = self._metric_diagonal(model, variables, self.metric_examples)
        return projection.magnitude_masks(
            model,
            sparsity,
            self.structure,
            self.scope,
            variables,
            existing,
            importance=importance,
            layer_floor=self.layer_floor,
        )

    def _optimizer(self, steps, penalty, offset=0):
        if not penalty:
            return None  # The trainer's SGD(1.0) applies θ exactly.
        return keras.optimizers.Adam(_CosineFrom(self._learning_rate, max(steps, 1), offset))

    def _trainer(self, model, steps, objective, settle=False, offset=0):
        trainer = FIPTrainer(
            model,
            step_rule="penalty" if settle else self.step_rule,
            distance=self.distance,
            beta=1.0,  # β weighs the projection distance inside `objective`.
            epsilon=self.epsilon,
            secondary_objective=objective,
            training=self._walk_training,
            measure_every=self.record_every,
            outputs=self._output_kind,
        )
        penalty = settle or self.step_rule == "penalty"
        trainer.compile(
            optimizer=self._optimizer(steps, penalty, offset), jit_compile=self.jit_compile
        )
        return trainer

    def _prunable(self, model):
        """The variables this operation prunes on `model` (a clear error if none)."""
        variables = projection.prunable_variables(
            model, self.include_biases, self.include_normalization, self.include_embeddings
        )
        if not variables:
            raise ValueError(
                "`model` has no prunable weights (Dense/EinsumDense/Conv kernels and Embedding "
                "tables by default; see `include_biases`, `include_normalization`, "
                f"`include_embeddings`). Received: model={model.name}"
            )
        return _structured_variables(model, variables, self.structure)

    def _walk(self, model, x, y, task_weight, checkpoint=None, path=None, final=True):
        """Pulls `model` (in place) to the sparse set and settles it; returns the history.

        `final=False` is a walk of the choice of `task_weight`: no path, callbacks,
        progress display or logs."""
        self._inputs = data_adapter.as_arrays(x)
        self._rng.bit_generator.state = dict(self._rng_state)
        variables = self._prunable(model)
        normalized = bool(normalization.batch_normalization_layers(model))
        self._walk_training = normalized if self.training == "auto" else self.training
        existing = {key: mask for key, mask in masks_lib.masks(model).items()}
        total_steps = self.walk_steps(data_adapter.num_examples(x))
        pull_steps = max(1, int(round(self.pull_fraction * total_steps)))
        settle_steps = total_steps - pull_steps
        self._update_every = self.target_update_interval(pull_steps)
        labelled = task_weight > 0 and y is not None
        dataset = fip_dataset(
            outputs_lib.logits_model(model, self._output_kind),
            x,
            secondary=(x, y) if labelled else None,
            batch_size=self.batch_size,
            seed=self.seed,
        )  # Checks that the data fit the model; the reference outputs are logits.
        callbacks = list(self.callbacks or []) if final else []
        verbose = self.verbose if final else 0
        log_dir = self.log_dir if final else None

        def walk(phase, trainer, steps, phase_callbacks, state_variables=()):
            if checkpoint is None:
                return trainer.walk(
                    dataset,
                    steps,
                    path=path,
                    callbacks=phase_callbacks,
                    verbose=verbose,
                    log_dir=log_dir,
                )
            return checkpoint.walk(
                phase,
                trainer,
                dataset,
                steps,
                path,
                callbacks=phase_callbacks,
                state_variables=state_variables,
                verbose=verbose,
                log_dir=log_dir,
            )

        # Pull towards the projection onto the ramping sparse set
        by_id = {id(v): i for i, v in enumerate(model.trainable_variables)}
        indices = [by_id[id(v)] for v in variables]
        mask_variables = [
            keras.Variable(np.ones(v.shape, "float32"), trainable=False, name=f"target_{i}")
            for i, v in enumerate(variables)
        ]
        objective = _ProjectionDistance(
            indices, mask_variables, task_weight if labelled else 0.0, self._beta
        )
        ramp = _RampTargets(self, variables, mask_variables, pull_steps, existing)
        ramp.model_to_prune = model
        trainer = self._trainer(model, total_steps, objective)
        history = walk("pull", trainer, pull_steps, [ramp] + callbacks, mask_variables)

        # Apply the final mask exactly, then settle with it fixed (D alone)
        masks = self._masks(model, self.sparsity, variables, existing)
        masks_lib.apply_masks(model, masks)
        if settle_steps:
            task = _TaskLoss(task_weight) if labelled else None
            settle = self._trainer(model, total_steps, task, settle=True, offset=pull_steps)
            settled = walk("settle", settle, settle_steps, callbacks)
            history = {
                key: list(history.get(key, [])) + list(settled.get(key, []))
                for key in set(history) | set(settled)
            }
        if self._walk_training and normalized:
            normalization.recalibrate_batch_normalization(model, self._inputs, self.batch_size * 2)
        history = dict(history)
        history["beta"] = self._beta
        history["learning_rate"] = self._learning_rate
        history["steps"] = total_steps
        history["pull_steps"] = pull_steps
        history["target_updates"] = 1 + (pull_steps - 1) // self._update_every
        history["update_every"] = self._update_every
        history["layer_sparsity"] = {v.path: float(1.0 - masks[v.path].mean()) for v in variables}
        return history

    def _choose_task_weight(self, model, x, y):
        """`(task_weight, record)`: the candidate of `TASK_WEIGHTS` whose walk, on `data`
        less a held-out split, is the most accurate on that split, if it is right on more
        held-out examples than the first candidate's walk (the inputs alone) by more than
        one standard deviation of a sign test; else the first candidate."""
        fit_rows, held_rows = holdout_rows(y, SELECTION_FRACTION, self.seed)
        if len(held_rows) < SELECTION_MIN_EXAMPLES:
            return FALLBACK_TASK_WEIGHT, {"validation_examples": int(len(held_rows))}
        x_fit, y_fit = data_adapter.take(x, fit_rows), np.asarray(y)[fit_rows]
        x_held, y_held = data_adapter.take(x, held_rows), np.asarray(y)[held_rows]
        correct, steps = {}, 0
        for task_weight in TASK_WEIGHTS:
            candidate = copy_model(model)
            walked = self._walk(candidate, x_fit, y_fit, task_weight, final=False)
            steps += walked["steps"]
            correct[task_weight] = _correct(candidate, x_held, y_held)
        chosen, wins, losses = choose_task_weight(correct)
        record = {
            "validation_examples": int(len(held_rows)),
            "validation_accuracy": {float(w): float(np.mean(c)) for w, c in correct.items()},
            "wins": wins,
            "losses": losses,
            "steps": int(steps),
        }
        return float(chosen), record

    def call(self, model):
        anchor = self.resolve_data(self.data, model)
        x, y = normalize_data(anchor, name="data", model=model)
        data_adapter.check_inputs_match_model(model, x, name="data")
        variables = self._prunable(model)
        before = projection.sparsity_summary(model, variables)
        if before.prunable_share < projection.SMALL_PRUNABLE_SHARE:
            warnings.warn(
                f"The prunable weights of model `{model.name}` are "
                f"{100 * before.prunable_share:.1f}% of its {before.parameters:,} parameters: "
                f"sparsity={self.sparsity:g} zeroes about "
                f"{100 * self.sparsity * before.prunable_share:.1f}% of the model "
                "(`op.history['parameter_sparsity']` gives the exact fraction). The prunable "
                "set is Dense/EinsumDense/Conv kernels and Embedding tables; see "
                "`include_embeddings`, `include_biases` and `include_normalization`.",
                stacklevel=2,
            )
        self._output_kind = model_output_kind(model, x)
        # β and the learning rate from the starting model on all of `data`, for every walk
        self._inputs = data_adapter.as_arrays(x)
        self._rng = np.random.default_rng(self.seed)
        self._beta = self._resolve_beta(model, variables)
        self._learning_rate = self._resolve_learning_rate(variables)
        self._rng_state = self._rng.bit_generator.state

        # Choose the weight of the labels on a split held out of `data`
        selection = None
        if y is None:
            task_weight = 0.0
        elif isinstance(self.task_weight, str):
            task_weight, selection = self._choose_task_weight(model, x, y)
        else:
            task_weight = self.task_weight

        # Walk on all of `data`
        checkpoint = self.open_checkpoint(self.checkpoint_directory)
        self.path = self.open_walk_path(model, checkpoint, self.record_every, self.path_directory)
        history = self._walk(model, x, y, task_weight, checkpoint, self.path)
        if checkpoint is not None:
            checkpoint.close()
        history["task_weight"] = task_weight
        selection_steps = selection.get("steps", 0) if selection else 0
        if selection is not None:
            history["task_weight_selection"] = selection
        history["selection_steps"] = selection_steps
        history["total_steps"] = history["steps"] + selection_steps
        summary = projection.sparsity_summary(model, variables)
        history["prunable_sparsity"] = summary.prunable_sparsity
        history["parameter_sparsity"] = summary.sparsity
        history["prunable_parameters"] = summary.prunable_parameters
        history["parameters"] = summary.parameters
        self.history = history
        self.sparsity_summary = summary
        return model

    def get_config(self):
        config = super().get_config()
        config.update(
            sparsity=self.sparsity,
            data=None,  # Data are not serialised; pass them again after from_config.
            structure=self.structure,
            scope=self.scope,
            epochs=self.epochs,
            steps=self.steps,
            min_steps=self.min_steps,
            pull_fraction=self.pull_fraction,
            ramp_fraction=self.ramp_fraction,
            ramp_power=self.ramp_power,
            update_every=self.update_every,
            layer_floor=self.layer_floor,
            beta=self.beta,
            saliency=self.saliency,
            metric_examples=self.metric_examples,
            task_weight=self.task_weight,
            training=self.training,
            distance=self.distance,
            step_rule=self.step_rule,
            learning_rate=self.learning_rate,
            epsilon=self.epsilon,
            batch_size=self.batch_size,
            include_biases=self.include_biases,
            include_normalization=self.include_normalization,
            include_embeddings=self.include_embeddings,
            record_every=self.record_every,
            path_directory=self.path_directory,
            jit_compile=self.jit_compile,
            seed=self.seed,
            checkpoint_directory=self.checkpoint_directory,
        )
        return config
