"""`Quantize`: low-bit weights reached along a functionally invariant path."""

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import layers as layers_lib
from keras_fip.core import normalization
from keras_fip.core.data_adapter import normalize_data
from keras_fip.engine import step_rules
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.rules import Penalty
from keras_fip.operations import quantize_schedule
from keras_fip.operations.base import WalkingOperation
from keras_fip.operations.base import check_labels
from keras_fip.operations.quantize_schedule import QuantizeSchedule

__all__ = [
    "BITS",
    "Quantize",
    "QuantizeSchedule",
    "channel_axes",
    "grid_scales",
    "project",
    "project_ops",
    "quantizable_variables",
    "resolved_scales",
]

# The bit widths the grid supports: symmetric integers in [-(2^(b-1) - 1), 2^(b-1) - 1].
BITS = (2, 3, 4, 8)
# Bit widths Keras has quantised layers for (Dense, EinsumDense, Embedding).
KERAS_MODES = {8: "int8", 4: "int4"}
KERAS_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)
# `beta="auto"`: β = STRENGTH × κ (`keras_fip.engine.beta.auto_beta` over the quantised
# weights), as Compress weighs its projection.
STRENGTH = 1e4
SCALES = ("auto", "abs_max", "fitted")
# `scales="fitted"`: the clipping ratios tried per channel (scale = ratio × max|w| / q_max).
FIT_RATIOS = np.linspace(0.2, 1.0, 41)
# The settle's learning rate starts at SETTLE_RATE × the pull's (cosine-decayed again).
SETTLE_RATE = 1.0


def resolved_scales(scales, bits):
    """The scale rule `scales` names at `bits` bits: `"auto"` is `"abs_max"` (Keras's
    int8 rule) at 8 bits and `"fitted"` below.

    Args:
        scales: `"auto"`, `"abs_max"` or `"fitted"`.
        bits: The bit width.

    Returns:
        `"abs_max"` or `"fitted"`.

    Examples:

        >>> resolved_scales("auto", 8), resolved_scales("auto", 4)
        ('abs_max', 'fitted')
    """
    if scales != "auto":
        return scales
    return "abs_max" if bits == 8 else "fitted"


def _einsum_axes(equation, kernel_rank):
    """Kernel axes an EinsumDense layer contracts (its letters absent from the output)."""
    inputs, output = equation.split("->")
    kernel = inputs.split(",")[1]
    if "..." in kernel or len(kernel) != kernel_rank:
        return None
    return tuple(axis for axis, letter in enumerate(kernel) if letter not in output)


def channel_axes(layer):
    """The quantisable kernels of `layer` and the axes each one's scale is reduced over.

    One scale per output channel: per output unit of Dense and EinsumDense kernels (as
    Keras's `quantize` computes them), per filter of convolution kernels (per input
    channel and multiplier of depthwise kernels), per row of Embedding tables.

    Args:
        layer: A Keras layer.

    Returns:
        A list of `(variable, axes)` pairs, empty when the layer has no quantisable kernel.

    Examples:

        >>> dense = keras.layers.Dense(3)
        >>> dense.build((None, 4))
        >>> [(v.name, axes) for v, axes in channel_axes(dense)]
        [('kernel', (0,))]
    """
    if getattr(layer, "quantization_mode", None) is not None or not layer.built:
        return []
    layers = keras.layers
    depthwise = tuple(
        getattr(layers, name)
        for name in ("DepthwiseConv1D", "DepthwiseConv2D")
        if hasattr(layers, name)
    )
    separable = (layers.SeparableConv1D, layers.SeparableConv2D)
    transposed = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
    convolutions = (layers.Conv1D, layers.Conv2D, layers.Conv3D)
    if isinstance(layer, layers.Dense):
        return [(layer.kernel, (0,))]
    if isinstance(layer, layers.EinsumDense):
        axes = _einsum_axes(layer.equation, len(layer.kernel.shape))
        return [] if axes is None else [(layer.kernel, axes)]
    if isinstance(layer, layers.Embedding):
        return [(layer.embeddings, (1,))]
    if isinstance(layer, separable):
        rank = len(layer.depthwise_kernel.shape)
        return [
            (layer.depthwise_kernel, tuple(range(rank - 2))),
            (layer.pointwise_kernel, tuple(range(rank - 1))),
        ]
    if isinstance(layer, depthwise):
        return [(layer.kernel, tuple(range(len(layer.kernel.shape) - 2)))]
    if isinstance(layer, transposed):
        rank = len(layer.kernel.shape)
        return [(layer.kernel, tuple(axis for axis in range(rank) if axis != rank - 2))]
    if isinstance(layer, convolutions):
        return [(layer.kernel, tuple(range(len(layer.kernel.shape) - 1)))]
    return []


def quantizable_variables(model, layers=None):
    """The kernels `Quantize` quantises on `model`, with their layers and scale axes.

    Args:
        model: A built `keras.Model`.
        layers: Names of the layers to quantise, or `None` (every quantisable layer).
            Defaults to `None`.

    Returns:
        A list of `(layer, variable, axes)` triples in the model's layer order. A named
        layer that is missing or cannot be quantised raises a `ValueError`.
    """
    found = {}
    for layer in layers_lib.all_layers(model):
        found.setdefault(layer.name, layer)
    if layers is not None:
        missing = [name for name in layers if name not in found]
        if missing:
            raise ValueError(
                f"`layers` names layers model `{model.name}` does not have: {missing}. "
                f"Received: layers={layers!r}"
            )
        for name in layers:
            if not channel_axes(found[name]):
                raise ValueError(
                    f"Layer `{name}` ({type(found[name]).__name__}) cannot be quantised: "
                    "Quantize quantises the kernels of Dense, EinsumDense, Embedding and "
                    "convolution layers that are not quantised already. "
                    f"Received: layers={layers!r}"
                )
    chosen = None if layers is None else set(layers)
    triples = []
    for layer in layers_lib.all_layers(model):
        if chosen is not None and layer.name not in chosen:
            continue
        for variable, axes in channel_axes(layer):
            if variable.trainable:
                triples.append((layer, variable, axes))
    return triples


def _levels(bits):
    return 2 ** (bits - 1) - 1


def grid_scales(weights, bits, axes, scales="abs_max"):
    """The per-channel scales of the grid `weights` are projected onto, as Keras holds them.

    Keras's convention (`keras.quantizers.abs_max_quantize`): `q = round(w × scale)`,
    `w ≈ q / scale`; `"abs_max"` gives `scale = q_max / max|w|` per channel
    (q_max = 2^(bits−1) − 1), `"fitted"` the scale, among clipping ratios of that one
    (`FIT_RATIOS`), with the least squared projection error of the channel.

    Args:
        weights: A numpy array.
        bits: The bit width, one of `BITS`.
        axes: The axes reduced per channel (a tuple), or `None` (one scale).
        scales: `"abs_max"` or `"fitted"`. Defaults to `"abs_max"`.

    Returns:
        A float32 array broadcastable against `weights` (keepdims); all-zero channels get
        a scale of 1.

    Examples:

        >>> w = np.array([[1.0, -0.5], [0.25, 2.0]], "float32")
        >>> grid_scales(w, 8, (0,))
        array([[127. ,  63.5]], dtype=float32)
    """
    weights = np.asarray(weights, dtype="float64")
    levels = _levels(bits)
    amax = np.max(np.abs(weights), axis=axes, keepdims=True)
    step = np.where(amax > 0, amax / levels, 1.0)
    if scales == "fitted":
        best_error, best_step = None, step
        for ratio in FIT_RATIOS:
            trial = step * ratio
            error = np.sum(
                np.square(weights - trial * np.clip(np.round(weights / trial), -levels, levels)),
                axis=axes,
                keepdims=True,
            )
            if best_error is None:
                best_error, best_step = error, trial
            else:
                better = error < best_error
                best_error = np.where(better, error, best_error)
                best_step = np.where(better, trial, best_step)
        step = best_step
    return (1.0 / step).astype("float32")


def _grid_step(scale):
    """The float32 grid step of a scale: `q × step` is read back as the integer `q`."""
    return (1.0 / scale.astype("float64")).astype("float32")


def project(weights, bits, axes, scales="abs_max"):
    """The projection of `weights` onto their symmetric `bits`-bit grid, per channel.

    Args:
        weights: A numpy array.
        bits: The bit width, one of `BITS`.
        axes: The axes reduced per channel, or `None` (one scale for the tensor).
        scales: `"abs_max"` or `"fitted"` (`grid_scales`). Defaults to `"abs_max"`.

    Returns:
        A tuple `(projected, integers, scale)`: float32 weights exactly `integers / scale`,
        the integers (in `[-q_max, q_max]`) and the scales (keepdims).

    Examples:

        >>> w = np.array([[0.9, -0.2], [0.3, 1.0]], "float32")
        >>> projected, integers, scale = project(w, 2, (0,))
        >>> integers.tolist()
        [[1.0, -0.0], [0.0, 1.0]]
    """
    weights = np.asarray(weights, dtype="float32")
    levels = _levels(bits)
    step = _grid_step(grid_scales(weights, bits, axes, scales))
    integers = np.clip(np.round(weights / step), -levels, levels)
    # A step the float32 scale reproduces: integers × step is read back as the integers.
    projected = (integers * step).astype("float32")
    return projected, integers.astype("float32"), (1.0 / step.astype("float64")).astype("float32")


def project_ops(weights, bits, axes, scales="abs_max"):
    """`project`'s projected weights as Keras ops, for use inside a compiled step.

    The same grid as `project` (float32 arithmetic instead of float64, so a weight halfway
    between two grid points may round the other way).

    Args:
        weights: A tensor.
        bits: The bit width, one of `BITS`.
        axes: The axes reduced per channel, or `None` (one scale for the tensor).
        scales: `"abs_max"` or `"fitted"`. Defaults to `"abs_max"`.

    Returns:
        A tensor of `weights`' shape and dtype, on the grid.

    Examples:

        >>> w = np.array([[0.9, -0.2], [0.3, 1.0]], "float32")
        >>> np.asarray(project_ops(w, 2, (0,))).tolist()
        [[0.8999999761581421, -0.0], [0.0, 1.0]]
    """
    ops = keras.ops
    weights = ops.convert_to_tensor(weights)
    levels = float(_levels(bits))
    if axes is None:
        axes = tuple(range(len(weights.shape)))
    amax = ops.max(ops.abs(weights), axis=axes, keepdims=True)
    step = ops.where(amax > 0, amax / levels, ops.ones_like(amax))

    def snapped(trial):
        return trial * ops.clip(ops.round(weights / trial), -levels, levels)

    if scales == "fitted":
        best_error, best_step = None, step
        for ratio in FIT_RATIOS:
            trial = step * float(ratio)
            error = ops.sum(ops.square(weights - snapped(trial)), axis=axes, keepdims=True)
            if best_error is None:
                best_error, best_step = error, trial
            else:
                better = error < best_error
                best_error = ops.where(better, error, best_error)
                best_step = ops.where(better, trial, best_step)
        step = best_step
    return snapped(step)


class _GridObjective:
    """L of the walk: β·½·‖w − T‖² over the quantised weights (the targets T, held in
    variables, recomputed on the schedule) plus the weighted labels' cross-entropy."""

    def __init__(self, indices, targets, beta, task_weight=0.0):
        self.indices = indices
        self.targets = targets
        self.beta = beta
        self.task_weight = task_weight

    def __call__(self, model, batch):
        total = step_rules.labels_term(model, batch, self.task_weight)
        variables = model.trainable_variables
        for index, target in zip(self.indices, self.targets):
            weights = variables[index].value
            difference = weights - keras.ops.cast(target.value, weights.dtype)
            total = total + 0.5 * self.beta * keras.ops.sum(keras.ops.square(difference))
        return total


class _UpdateTargets(keras.callbacks.Callback):
    """Recomputes the targets (the projection of the current weights onto the schedule's
    grid) every `update_every` steps of the pull; in the settle, sets the weights to their
    projection before each step and adds the step to the latent weights after it."""

    def __init__(self, quantized, targets, schedule, total_steps, bits, scales):
        super().__init__()
        self.quantized = quantized
        self.targets = targets
        self.schedule = schedule
        self.total_steps = total_steps
        self.settle_start = schedule.settle_start(total_steps)
        self.bits = bits
        self.scales = scales
        self.step = 0
        self.grid = None  # The settle's scales, refitted every `update_every` steps.
        self.latent = None

    def update(self):
        bits = self.schedule.bits_at(self.step, self.total_steps, self.bits)
        for (_, variable, axes), target in zip(self.quantized, self.targets):
            target.assign(project(variable.numpy(), bits, axes, self.scales)[0])

    def on_train_begin(self, logs=None):
        if self.step == 0 and self.settle_start > 0:
            self.update()

    def on_train_batch_begin(self, batch, logs=None):
        if self.step < self.settle_start:
            return
        levels = _levels(self.bits)
        if self.grid is None or (self.step - self.settle_start) % self.schedule.update_every == 0:
            # The grid steps `project` uses (q × step is read back as q).
            self.grid = [
                _grid_step(grid_scales(variable.numpy(), self.bits, axes, self.scales))
                for _, variable, axes in self.quantized
            ]
        self.latent = []
        for (_, variable, _), target, step in zip(self.quantized, self.targets, self.grid):
            weights = variable.numpy()
            projected = (np.clip(np.round(weights / step), -levels, levels) * step).astype(
                weights.dtype
            )
            self.latent.append((weights, projected))
            variable.assign(projected)
            target.assign(projected)

    def on_train_batch_end(self, batch, logs=None):
        if self.latent is not None:
            for (_, variable, _), (weights, projected) in zip(self.quantized, self.latent):
                variable.assign(weights + (variable.numpy() - projected))
            self.latent = None
        self.step += 1
        if self.step < self.settle_start and self.step % self.schedule.update_every == 0:
            self.update()

    def get_walk_state(self):
        """The schedule's position (`keras_fip.engine.WalkCheckpoint`)."""
        return {"step": self.step}

    def set_walk_state(self, state):
        self.step = int(state["step"])


class _PullThenSettle(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay over the pull, then again over the settle from `settle_rate` × the
    pull's initial rate."""

    def __init__(self, learning_rate, settle_start, total_steps, settle_rate=SETTLE_RATE):
        self.learning_rate = learning_rate
        self.settle_start = settle_start
        self.total_steps = total_steps
        self.settle_rate = settle_rate
        self.pull = keras.optimizers.schedules.CosineDecay(learning_rate, max(settle_start, 1))
        self.settle = keras.optimizers.schedules.CosineDecay(
            learning_rate * settle_rate, max(total_steps - settle_start, 1)
        )

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        settling = step >= self.settle_start
        return keras.ops.where(settling, self.settle(step - self.settle_start), self.pull(step))

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "settle_start": self.settle_start,
            "total_steps": self.total_steps,
            "settle_rate": self.settle_rate,
        }


def _keras_config(bits):
    if bits == 8:
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    return keras.quantizers.Int4QuantizationConfig(block_size=-1)


@keras.saving.register_keras_serializable(package="keras_fip")
class Quantize(WalkingOperation):
    """Quantises a model's kernels to `bits` bits along a functionally invariant path.

    The kernels of Dense, EinsumDense, Embedding and convolution layers (depthwise,
    separable and transposed too, wherever they sit) are pulled towards their projection
    onto a symmetric integer grid, `w = q / scale` with `q` in `[-(2^(b-1) − 1),
    2^(b-1) − 1]` and one scale per output channel (`channel_axes`), by the secondary
    objective L(w) = ½·‖w − P(w)‖², while the output distance D to the starting network
    on the inputs of `data` keeps the function; the labels' cross-entropy joins L when
    `data` has labels. The targets P(w), scales included, are recomputed from the
    current weights on the schedule (`keras_fip.operations.quantize.QuantizeSchedule`, which may
    ramp the bit width down from a finer grid). The end of the walk (its second half: the
    schedule's `settle_fraction`) settles on the final grid: each step is taken at the weights'
    projection onto it and added to the latent weights (a straight-through estimator), so
    weights still move between grid points while D and the labels' term keep the
    function. At the end every quantised kernel is snapped exactly onto its grid;
    BatchNormalization statistics walked in training mode are re-estimated on `data`.

    **The result.** At 8 and 4 bits with per-channel scales, Dense, EinsumDense and
    Embedding layers become Keras's own quantised layers (`layer.quantize("int8" |
    "int4")`, weight-only: integer kernels and `kernel_scale`, saved and loaded as Keras
    does; their integers are exactly the grid's); with `keras_layers=False`, and for
    every other layer and bit width, the float kernels lie exactly on the grid, and the
    scales (Keras's convention: `q = w × scale`) are in `op.history["scales"]` (they are
    also `grid_scales(kernel, bits, axes)` of the snapped kernel).
    `keras_fip.export(model, path, format="tflite")` writes a TFLite model with integer
    weights. Masks the input carries (an earlier `Compress`) are kept: zero is on the
    grid, so `keras_fip.chain(keras_fip.Compress(0.9), keras_fip.Quantize(4))` gives a
    sparse, 4-bit model (its masked Keras-quantised kernels keep their zeros as integers).

    **The walk** (`keras_fip.Walk`) says how: the budget (Quantize's is 3 epochs of `data`,
    raised to the schedule's `min_steps`; the walk's `steps` are taken exactly), the rule
    and its learning rate (`"auto"`: `keras_fip.rules.auto_learning_rate` of the quantised
    weights, cosine-decayed over the pull and again, from the same rate, over the settle),
    the batch size, the distance, β (`"auto"`:
    `keras_fip.engine.beta.auto_beta` with strength `STRENGTH` = 1e4 over the quantised
    weights), the training mode, the recording, the checkpointing, the seed, compilation,
    verbosity, callbacks and logs.

    After a call, `op.history` holds the walk's per-step scalars and `"bits"`, `"steps"`,
    `"settle_steps"` (the steps on the final grid), `"beta"`, `"learning_rate"`,
    `"task_weight"`, `"scales"` (per quantised kernel path), `"layer_error"` (per kernel,
    ‖w_end − w_start‖ / ‖w_start‖) and `"keras_layers"` (the layers turned into Keras
    quantised layers); `op.path` is its `keras_fip.Path`.

    Args:
        bits: The bit width: 2, 3, 4 or 8.
        data: Inputs whose outputs are kept: an array, an `(x, y)` tuple (labels as class
            indices or one-hot rows) or a finite `tf.data.Dataset`. Defaults to `None`
            (the inputs the model carries from an earlier operation).
        labels: `"auto"` (the labels' cross-entropy, weight 1, when `data` has labels),
            `False` (the inputs alone) or the weight of the labels' cross-entropy in L.
            Defaults to `"auto"`.
        layers: Names of the layers to quantise, or `None` (every quantisable layer). A
            named layer that cannot be quantised raises a `ValueError`. Defaults to
            `None`.
        per_channel: Whether each output channel has its own scale (else one scale per
            kernel). Defaults to `True`.
        scales: `"abs_max"` (scale = q_max / max|w| per channel, as Keras's quantisers
            compute it), `"fitted"` (the clipping with the least projection error per
            channel; a snapped kernel's scale is still q_max / max|w|) or `"auto"`:
            `"abs_max"` at 8 bits, `"fitted"` at 4, 3 and 2 (`resolved_scales`).
            Defaults to `"auto"`.
        keras_layers: Whether Dense, EinsumDense and Embedding layers become Keras's
            quantised layers at 8 and 4 bits. Defaults to `True`.
        schedule: A `keras_fip.operations.quantize.QuantizeSchedule`. Defaults to `None` (its
            defaults).
        walk: A `keras_fip.Walk`. Defaults to `None` (every default).
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
        >>> walk = keras_fip.Walk(steps=20, seed=0, verbose=0)
        >>> op = keras_fip.Quantize(3, data=(x, y), walk=walk)
        >>> quantized = op(model)
        >>> kernel = quantized.layers[-1].kernel.numpy()
        >>> integers = kernel * op.history["scales"][quantized.layers[-1].kernel.path]
        >>> bool(np.allclose(integers, np.round(integers), atol=1e-3)), int(np.abs(integers).max())
        (True, 3)
    """

    DEFAULT_BUDGET = {"epochs": 3}

    def __init__(
        self,
        bits,
        *,
        data=None,
        labels="auto",
        layers=None,
        per_channel=True,
        scales="auto",
        keras_layers=True,
        schedule=None,
        walk=None,
        name=None,
    ):
        super().__init__(walk=walk, name=name)
        if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"`bits` must be one of {list(BITS)}. Received: bits={bits!r}")
        self.bits = int(bits)
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        self.labels = check_labels(labels)
        self.layers = self.check_layer_names(layers)
        for value, argument in ((per_channel, "per_channel"), (keras_layers, "keras_layers")):
            if not isinstance(value, bool):
                raise ValueError(
                    f"`{argument}` must be True or False. Received: {argument}={value!r}"
                )
        self.per_channel = per_channel
        self.scales = self.check_choice(scales, "scales", SCALES)
        self.keras_layers = keras_layers
        self.schedule = quantize_schedule.get(schedule)

    def quantized_variables(self, model):
        """`(layer, variable, axes)` for each kernel this operation quantises on `model`
        (`axes=None` with `per_channel=False`); a `ValueError` if there are none."""
        triples = quantizable_variables(model, self.layers)
        if not triples:
            raise ValueError(
                f"Model `{model.name}` has no quantisable kernels (Dense, EinsumDense, "
                "Embedding and convolution layers not quantised already). "
                f"Received: model={model.name}"
            )
        if not self.per_channel:
            triples = [(layer, variable, None) for layer, variable, _ in triples]
        return triples

    def validate(self, model):
        data = self.resolve_data(self.data, model)
        x, _ = normalize_data(data, name="data", model=model)
        data_adapter.check_inputs_match_model(model, x, name="data")
        self.quantized_variables(model)

    def call(self, model):
        walk = self.resolved_walk()
        x, y = normalize_data(self.resolve_data(self.data, model), name="data", model=model)
        quantized = self.quantized_variables(model)
        variables = [variable for _, variable, _ in quantized]
        start = [variable.numpy() for variable in variables]
        inputs = data_adapter.as_arrays(x)
        normalized = bool(normalization.batch_normalization_layers(model))
        training = normalized if walk.training == "auto" else bool(walk.training)
        distance = walk.distance if isinstance(walk.distance, str) else "kl"
        seed = walk.seed
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        if walk.beta == "auto":
            beta = auto_beta(
                STRENGTH, model, inputs, distance, "weights", variables=variables, seed=seed
            )
        else:
            beta = float(walk.beta)
        task_weight = 0.0
        if y is not None:
            task_weight = 1.0 if self.labels == "auto" else self.labels
        steps = self.schedule.total_steps(walk, data_adapter.num_examples(x))

        # Pull towards the grid, the targets recomputed on the schedule
        by_id = {id(v): i for i, v in enumerate(model.trainable_variables)}
        targets = [
            keras.Variable(value, trainable=False, name=f"grid_target_{i}")
            for i, value in enumerate(start)
        ]
        objective = _GridObjective([by_id[id(v)] for v in variables], targets, beta, task_weight)
        scales = resolved_scales(self.scales, self.bits)
        update = _UpdateTargets(quantized, targets, self.schedule, steps, self.bits, scales)
        optimizer, learning_rate = None, None
        if isinstance(walk.rule, Penalty):
            learning_rate = walk.rule.resolve_learning_rate(variables)
            schedule = _PullThenSettle(
                learning_rate, self.schedule.settle_start(steps), steps, SETTLE_RATE
            )
            optimizer = keras.optimizers.Adam(schedule)
        walked = walk.replace(callbacks=[update] + list(walk.callbacks or []), seed=seed)
        self.fip_walk(
            model,
            walked,
            x,
            steps,
            secondary=(x, y) if task_weight > 0 else None,
            optimizer=optimizer,
            beta=1.0,  # β weighs the projection inside the objective.
            secondary_objective=objective,
            training=training,
        )
        history = dict(self.history or {})

        # Snap exactly onto the grid
        snapped_scales = {}
        for _, variable, axes in quantized:
            projected, _, scale = project(variable.numpy(), self.bits, axes, scales)
            variable.assign(projected)
            snapped_scales[variable.path] = (
                np.squeeze(scale) if axes is not None else scale.reshape(())
            )
        layer_error = {
            variable.path: float(
                np.linalg.norm(variable.numpy() - before) / max(np.linalg.norm(before), 1e-30)
            )
            for variable, before in zip(variables, start)
        }
        if training and normalized:
            normalization.recalibrate_batch_normalization(model, inputs, walk.batch_size * 2)

        # Keras's own quantised layers where they exist
        converted = []
        if self.keras_layers and self.per_channel and self.bits in KERAS_MODES:
            for layer, _, _ in quantized:
                if isinstance(layer, KERAS_LAYERS) and layer.name not in converted:
                    layer.quantize(KERAS_MODES[self.bits], config=_keras_config(self.bits))
                    converted.append(layer.name)
        history.update(
            bits=self.bits,
            steps=steps,
            settle_steps=steps - self.schedule.settle_start(steps),
            beta=beta,
            learning_rate=learning_rate,
            task_weight=float(task_weight),
            training=training,
            scales=snapped_scales,
            layer_error=layer_error,
            keras_layers=converted,
        )
        self.history = history
        return model

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "data": None,  # Data are not serialised; pass them again after from_config.
            "labels": self.labels,
            "layers": self.layers,
            "per_channel": self.per_channel,
            "scales": self.scales,
            "keras_layers": self.keras_layers,
            "schedule": keras.saving.serialize_keras_object(self.schedule),
        }
