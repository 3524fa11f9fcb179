"""Hidden units of a network and the weights that silence each of them exactly.

A hidden unit is an output channel of a Dense or convolution layer that does not reach a
model output directly (the last axis of its kernel: a neuron, or a filter and its feature
map). Unit j is silenced by zeroing its incoming kernel slice and its bias, and, traced
through the functional graph (across activations that map 0 to 0, dropout, pooling,
padding and Flatten), the scale and offset of channel j of a BatchNormalization that
normalises it, so its activation is exactly 0 in inference and in training mode. Its
outgoing weights in the consuming Dense/Conv layers are zeroed too where the chain
allows (through Flatten: the rows `h·W·C + w·C + j` of the next Dense kernel).

`unit_plans` finds those weights for every deletable layer of a model (`UnitPlan`),
`choose_units` draws units as `keras_fip.faults.Nodes` and `deletion_sequence` draw them
(a seeded permutation's prefix, so a larger fraction deletes a superset), `unit_masks`
turns chosen units into masks and `hidden_units` lists the units a model has and those
its masks hold deleted.
"""

import keras
import numpy as np

from keras_fip.core import masks as masks_lib

SCOPES = ("global", "per_layer")
# Layers whose units (the last axis of the kernel) can be deleted.
_UNIT_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_TRANSPOSED = tuple(
    getattr(keras.layers, name)
    for name in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
    if hasattr(keras.layers, name)
)
# Layers with weights that mix channels: a unit's influence stops there (outputs reached
# only through them do not make a layer the output layer).
_WEIGHT_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Dense",
        "EinsumDense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
        "MultiHeadAttention",
        "Embedding",
    )
    if hasattr(keras.layers, name)
) + (keras.Model,)
# Element-wise activations: a zero channel stays zero iff f(0) = 0 (checked numerically).
_ACTIVATION_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in ("Activation", "ReLU", "LeakyReLU", "ELU", "PReLU")
    if hasattr(keras.layers, name)
)
# Layers that keep each channel on the last axis and map a zero channel to zero.
_STRUCTURAL_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianDropout",
        "Identity",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "ZeroPadding3D",
        "Cropping1D",
        "Cropping2D",
        "Cropping3D",
        "UpSampling1D",
        "UpSampling2D",
        "UpSampling3D",
        "ActivityRegularization",
    )
    if hasattr(keras.layers, name)
)


def _keeps_zero(function, shape):
    """Whether an element-wise function/layer maps a zero tensor of `shape` to zero."""
    concrete = (1,) + tuple(1 if d is None else int(d) for d in tuple(shape)[1:])
    try:
        values = function(np.zeros(concrete, "float32"))
    except TypeError:
        return False
    return bool(np.all(keras.ops.convert_to_numpy(values) == 0))


def _graph(model):
    """(consumers: id(tensor) -> layers, output ids) of a Sequential/functional model."""
    consumers = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            inputs = keras.tree.flatten(layer.input)
        except (AttributeError, ValueError):
            continue  # A shared layer (several call sites): not traced.
        for tensor in inputs:
            consumers.setdefault(id(tensor), []).append(layer)
    return consumers, {id(tensor) for tensor in keras.tree.flatten(model.outputs)}


def _feeds_output(layer, consumers, outputs):
    """Whether `layer`'s output reaches a model output without crossing a weight layer."""
    frontier, seen = [layer.output], set()
    while frontier:
        tensor = frontier.pop()
        if id(tensor) in outputs:
            return True
        for consumer in consumers.get(id(tensor), []):
            if isinstance(consumer, _WEIGHT_LAYERS) or id(consumer) in seen:
                continue
            seen.add(id(consumer))
            try:
                frontier.extend(keras.tree.flatten(consumer.output))
            except (AttributeError, ValueError):
                return True  # Cannot tell: treat as an output layer (never deleted).
    return False


class UnitPlan:
    """The weights that silence each unit of one layer.

    Unit j of `layer` is silenced by zeroing, for each target `(variable, axis,
    spatial)`, the entries at indices `arange(spatial) * channels + j` along `axis`
    (`spatial > 1` for the rows a Flatten spreads a channel over).

    Args:
        layer: The Dense or convolution layer whose units the plan silences.
        channels: Its number of units (the last axis of its kernel).

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "relu"),
        ...                           keras.layers.Dense(2)])
        >>> plan = unit_plans(model)[0]
        >>> plan.channels, len(plan.targets)
        (3, 3)
    """

    def __init__(self, layer, channels):
        self.layer = layer
        self.channels = int(channels)
        self.targets = []

    def add(self, variable, axis, spatial=1):
        """Adds the entries of `variable` along `axis` that carry each unit."""
        self.targets.append((variable, axis, spatial))

    def zero(self, masks_by_id, unit):
        """Sets `False`, in `masks_by_id` (`id(variable) -> boolean mask`, created as
        needed), every entry that carries `unit`."""
        for variable, axis, spatial in self.targets:
            mask = masks_by_id.setdefault(id(variable), np.ones(variable.shape, bool))
            index = [slice(None)] * mask.ndim
            index[axis] = np.arange(spatial) * self.channels + unit
            mask[tuple(index)] = False


def _unit_plan(layer, consumers, outputs):
    """The silencing targets of `layer`'s units, or a reason they cannot be silenced."""
    channels = int(layer.kernel.shape[-1])
    plan = UnitPlan(layer, channels)
    plan.add(layer.kernel, -1)
    if layer.bias is not None:
        plan.add(layer.bias, 0)
    zero = _keeps_zero(layer.activation, layer.output.shape)
    # Follow the unit's channel downstream: (tensor, spatial, value is exactly zero).
    frontier, blocked = [(layer.output, 1, zero)], []
    while frontier:
        tensor, spatial, zero = frontier.pop()
        if id(tensor) in outputs and not zero:
            blocked.append("a model output")
        for consumer in consumers.get(id(tensor), []):
            single = len(keras.tree.flatten(consumer.input)) == 1
            if isinstance(consumer, keras.layers.Dense) and single:
                plan.add(consumer.kernel, 0, spatial)
            elif (
                isinstance(consumer, _UNIT_LAYERS)
                and single
                and spatial == 1
                and consumer.data_format == "channels_last"
                and consumer.groups == 1
            ):
                plan.add(consumer.kernel, -2)
            elif isinstance(consumer, keras.layers.BatchNormalization) and consumer.axis in (
                -1,
                len(tensor.shape) - 1,
            ):
                if consumer.scale:
                    plan.add(consumer.gamma, 0, spatial)
                if consumer.center:
                    plan.add(consumer.beta, 0, spatial)
                frontier.append((consumer.output, spatial, bool(consumer.scale)))
            elif isinstance(consumer, _ACTIVATION_LAYERS):
                keeps = zero and _keeps_zero(consumer, tensor.shape)
                frontier.append((consumer.output, spatial, keeps))
            elif isinstance(consumer, _STRUCTURAL_LAYERS) and spatial == 1:
                frontier.append((consumer.output, spatial, zero))
            elif isinstance(consumer, keras.layers.Flatten) and (
                spatial == 1 and all(d is not None for d in tensor.shape[1:])
            ):
                size = int(np.prod(tensor.shape[1:-1], dtype=np.int64))
                frontier.append((consumer.output, size, zero))
            elif not zero:
                blocked.append(f"`{consumer.name}` ({type(consumer).__name__})")
    return plan, blocked


def unit_plans(model, layers=None):
    """The `UnitPlan` of every layer of `model` whose units can be deleted.

    Every top-level Dense and convolution layer (channels last, called once) that does
    not reach a model output directly, and whose units' activation is zero at zero input
    wherever it reaches an output or a layer the silencing cannot pass.

    Args:
        model: A Sequential or functional `keras.Model`. Not changed.
        layers: Names of the layers to plan (each must be deletable), or `None` for all.
            Defaults to `None`.

    Returns:
        A non-empty list of `UnitPlan`s, in the model's layer order (or the order of
        `layers`).

    Examples:

        >>> hidden = keras.layers.Dense(8, "relu", name="hidden")
        >>> model = keras.Sequential([keras.Input((4,)), hidden, keras.layers.Dense(2)])
        >>> [plan.layer.name for plan in unit_plans(model)]
        ['hidden']
    """
    try:
        consumers, outputs = _graph(model)
        for layer in model.layers:
            if isinstance(layer, _UNIT_LAYERS):
                layer.output  # noqa: B018 (raises for models without a graph)
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "Deleting units traces the layer graph: `model` must be a Sequential or "
            f"functional model. Received: model={model.name} ({type(model).__name__}): "
            f"{error}"
        ) from error
    candidates = [
        layer
        for layer in model.layers
        if isinstance(layer, _UNIT_LAYERS) and not isinstance(layer, _TRANSPOSED)
    ]
    plans, problems = [], {}
    for layer in candidates:
        try:
            layer.output  # noqa: B018
        except (AttributeError, ValueError):
            problems[layer.name] = "it is shared (called more than once)"
            continue
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            problems[layer.name] = "it is channels_first"
            continue
        if _feeds_output(layer, consumers, outputs):
            problems[layer.name] = "it is an output layer"
            continue
        plan, blocked = _unit_plan(layer, consumers, outputs)
        if blocked:
            problems[layer.name] = (
                "its units' activation is not zero at zero input and reaches "
                f"{', '.join(blocked)} directly"
            )
            continue
        plans.append(plan)
    if layers is not None:
        by_name = {plan.layer.name: plan for plan in plans}
        for name in layers:
            if name not in by_name:
                reason = problems.get(name, "it is not a top-level Dense or Conv layer")
                raise ValueError(
                    f"`layers` names `{name}`, whose units cannot be deleted: {reason}. "
                    f"Received: layers={list(layers)!r}"
                )
        plans = [by_name[name] for name in layers]
    if not plans:
        raise ValueError(
            f"`model` has no hidden Dense/Conv units to delete (the output layer never "
            f"is). Received: model={model.name}, skipped layers: {problems}"
        )
    return plans


def check_units(units):
    """`units` as a `{layer name: sorted unit indices}` dict, validated.

    Args:
        units: A dict mapping layer names to lists of unit indices (integers ≥ 0).

    Returns:
        The dict with sorted, distinct indices.
    """
    if not isinstance(units, dict) or not all(
        isinstance(name, str)
        and isinstance(indices, (list, tuple, np.ndarray))
        and all(
            isinstance(u, (int, np.integer)) and not isinstance(u, bool) and u >= 0 for u in indices
        )
        for name, indices in units.items()
    ):
        raise ValueError(
            "`units` must be a dict mapping layer names to lists of non-negative unit "
            f"indices. Received: units={units!r}"
        )
    return {name: sorted({int(u) for u in indices}) for name, indices in units.items()}


def explicit_units(plans, units):
    """The units named by `units` (from `check_units`), per plan, checked against them.

    Args:
        plans: `UnitPlan`s of the model.
        units: A dict mapping layer names to unit indices.

    Returns:
        A list aligned with `plans` of sorted unit indices.
    """
    by_name = {plan.layer.name: index for index, plan in enumerate(plans)}
    chosen = [[] for _ in plans]
    for name, indices in units.items():
        if name not in by_name:
            raise ValueError(
                f"`units` names layer `{name}`, which has no deletable hidden units. "
                f"Expected names among {sorted(by_name)}. Received: units={units!r}"
            )
        plan = plans[by_name[name]]
        bad = [u for u in indices if u >= plan.channels]
        if bad:
            raise ValueError(
                f"`units` names units {bad} of layer `{name}`, which has {plan.channels} "
                f"units. Received: units={units!r}"
            )
        chosen[by_name[name]] = sorted(set(indices))
    return chosen


def _number(fraction, count, total, what):
    """`round(fraction·total)`, or `count` checked against `total`."""
    if count is None:
        return int(round(fraction * total))
    if count > total:
        raise ValueError(
            f"`count` must be at most the number of {what} ({total}). Received: count={count}"
        )
    return int(count)


def choose_units(plans, rng, fraction=None, count=None, scope="global"):
    """Draws units to delete: a prefix of a seeded permutation of the plans' units.

    `scope="global"` draws `round(fraction·U)` (or `count`) of all U units of the plans,
    `"per_layer"` that many of each layer's units. The same generator state draws
    nested sets as `fraction` grows.

    Args:
        plans: `UnitPlan`s (from `unit_plans`).
        rng: A `numpy.random.Generator`; the draw consumes one permutation (per layer
            for `"per_layer"`).
        fraction: Fraction in [0, 1] of the units. Defaults to `None`.
        count: Number of units instead of `fraction`. Defaults to `None`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.

    Returns:
        A list aligned with `plans` of lists of unit indices.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"),
        ...                           keras.layers.Dense(2)])
        >>> plans = unit_plans(model)
        >>> [len(units) for units in choose_units(plans, np.random.default_rng(0), 0.5)]
        [4]
    """
    if (fraction is None) == (count is None):
        raise ValueError(
            "Pass exactly one of `fraction` and `count`. "
            f"Received: fraction={fraction!r}, count={count!r}"
        )
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {list(SCOPES)}. Received: scope={scope!r}")
    sizes = [plan.channels for plan in plans]
    chosen = [[] for _ in plans]
    if scope == "global":
        total = int(sum(sizes))
        number = _number(fraction, count, total, "hidden units")
        owners = np.repeat(np.arange(len(plans)), sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        for flat in rng.permutation(total)[:number]:
            chosen[owners[flat]].append(int(flat - offsets[owners[flat]]))
        return chosen
    for index, size in enumerate(sizes):
        number = _number(fraction, count, size, f"units of layer `{plans[index].layer.name}`")
        chosen[index] = [int(u) for u in rng.permutation(size)[:number]]
    return chosen


def unit_masks(plans, chosen):
    """The masks that delete the chosen units: `{id(variable): boolean mask}`.

    Args:
        plans: `UnitPlan`s.
        chosen: A list aligned with `plans` of unit indices.

    Returns:
        A dict mapping `id(variable)` to a boolean array (`False` where a weight is
        zeroed) for every variable a chosen unit touches.
    """
    masks_by_id = {}
    for plan, units in zip(plans, chosen):
        for unit in units:
            plan.zero(masks_by_id, unit)
    return masks_by_id


def hidden_units(model, layers=None):
    """The units a model's hidden layers have, and which of them are deleted already.

    A unit counts as deleted when the masks the model carries hold its whole incoming
    kernel slice at zero (as deleting it with `keras_fip.faults.Nodes` leaves it).

    Args:
        model: A Sequential or functional `keras.Model`. Not changed.
        layers: Names of the layers to list, or `None` for every hidden Dense/Conv layer.
            Defaults to `None`.

    Returns:
        A dict mapping each layer name to a tuple `(num_units, deleted)`, `deleted` the
        sorted list of deleted unit indices.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
        ...                           keras.layers.Dense(2)])
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(count=3), seed=0)(model)
        >>> num_units, deleted = hidden_units(damaged)["hidden"]
        >>> num_units, len(deleted)
        (8, 3)
    """
    plans = unit_plans(model, layers)
    listing = {}
    for plan in plans:
        mask = masks_lib.mask_of(plan.layer.kernel)
        deleted = (
            []
            if mask is None
            else np.flatnonzero(~np.any(mask.reshape(-1, plan.channels), axis=0)).tolist()
        )
        listing[plan.layer.name] = (plan.channels, deleted)
    return listing
