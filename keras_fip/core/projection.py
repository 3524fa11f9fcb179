"""P_p(w): projection of a model's prunable weights onto the p-sparse set.

Magnitude projection is what every pruning method here shares: `Compress` pulls weights
towards it along an FIP, the baselines apply it directly. The projection keeps the
largest-magnitude weights (or units, filters, 2-of-4 groups) and zeroes the rest.
"""

import keras
import numpy as np

from keras_fip.core.layers import all_layers

STRUCTURES = ("unstructured", "nodes", "filters", "2:4")
SCOPES = ("global", "per_layer")
# Layer-collapse protection of `scope="global"`: every variable keeps at least a fraction
# of the density the Erdős–Rényi-kernel rule gives it at the target sparsity; "auto" is
# BATCH_NORM_LAYER_FLOOR for models with BatchNormalization, LAYER_FLOOR otherwise.
DEFAULT_LAYER_FLOOR = "auto"
LAYER_FLOOR = 0.5
BATCH_NORM_LAYER_FLOOR = 1.0

# The default prunable set follows tfmot's default registry (`prune_registry.py` of
# tensorflow-model-optimization, what `prune_low_magnitude` prunes): the kernels of Dense and
# convolution layers, the `embeddings` table of Embedding layers, and the kernels of the
# projections inside MultiHeadAttention (in Keras 3 they are EinsumDense layers, whose
# kernels are prunable wherever they appear). Biases and normalisation parameters are left
# out, as there. Where keras_fip differs: the depthwise kernels of DepthwiseConv and
# SeparableConv layers are prunable too (tfmot leaves them dense; the layer-collapse floor
# of `magnitude_masks` keeps these small kernels alive).
_KERNEL_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
)
_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")
_NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)
# A warning says so when the prunable weights are less than this share of the model's.
SMALL_PRUNABLE_SHARE = 0.5


def prunable_variables(
    model, include_biases=False, include_normalization=False, include_embeddings=True
):
    """The trainable variables a pruning method may zero, in `model.trainable_variables` order.

    The default set is the one tfmot's `prune_low_magnitude` prunes: Dense, EinsumDense and
    convolution kernels (depthwise and pointwise kernels included), Embedding tables, and
    the query, key, value and output kernels of MultiHeadAttention, inside custom layers and
    nested models too. Biases and normalisation parameters are opt-in.

    Args:
        model: A built `keras.Model`.
        include_biases: Whether biases are prunable. Defaults to `False`.
        include_normalization: Whether normalisation scales and offsets (`gamma`, `beta`) are
            prunable. Defaults to `False`.
        include_embeddings: Whether embedding tables are prunable. Defaults to `True`.

    Returns:
        A list of `keras.Variable`s.

    Examples:

        >>> model = keras.Sequential(
        ...     [keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3),
        ...      keras.layers.Flatten(), keras.layers.Dense(2)])
        >>> [v.name for v in prunable_variables(model)]
        ['embeddings', 'kernel']
    """
    chosen = set()
    for layer in all_layers(model):
        for variable in layer.trainable_weights:
            name = variable.name
            if isinstance(layer, _KERNEL_LAYERS) and name in _KERNEL_NAMES:
                chosen.add(id(variable))
            elif include_biases and name == "bias":
                chosen.add(id(variable))
            elif include_normalization and isinstance(layer, _NORMALIZATION_LAYERS):
                chosen.add(id(variable))
            elif include_embeddings and isinstance(layer, keras.layers.Embedding):
                chosen.add(id(variable))
    return [v for v in model.trainable_variables if id(v) in chosen]


def prunable_sparsity(model, **kwargs):
    """Fraction of a model's prunable weights (see `prunable_variables`) that are exactly zero.

    Args:
        model: A built `keras.Model`.
        **kwargs: Passed to `prunable_variables` (`include_biases`, ...).

    Returns:
        A float in [0, 1].
    """
    variables = prunable_variables(model, **kwargs)
    total = sum(int(np.prod(v.shape)) for v in variables)
    zeros = sum(int(np.sum(keras.ops.convert_to_numpy(v) == 0)) for v in variables)
    return zeros / max(total, 1)


class SparsitySummary:
    """How much of a model is zero: over its prunable weights and over all its parameters.

    A pruning method's sparsity counts the prunable weights (`prunable_variables`); this
    puts it beside the zero fraction of every parameter the model has (all of
    `model.weights`, trainable or not: what `model.count_params()` counts), so that a
    sparsity over a small prunable set is not read as the model's.

    Attributes:
        parameters: Number of parameters of the model.
        zeros: How many of them are exactly zero.
        prunable_parameters: Number of prunable weights.
        prunable_zeros: How many of them are exactly zero.
        sparsity: `zeros / parameters`.
        prunable_sparsity: `prunable_zeros / prunable_parameters`.
        prunable_share: `prunable_parameters / parameters`.
    """

    def __init__(self, parameters, zeros, prunable_parameters, prunable_zeros):
        self.parameters = int(parameters)
        self.zeros = int(zeros)
        self.prunable_parameters = int(prunable_parameters)
        self.prunable_zeros = int(prunable_zeros)
        self.sparsity = self.zeros / max(self.parameters, 1)
        self.prunable_sparsity = self.prunable_zeros / max(self.prunable_parameters, 1)
        self.prunable_share = self.prunable_parameters / max(self.parameters, 1)

    def as_dict(self):
        """The counts and fractions, as a dict of numbers."""
        return {
            "parameters": self.parameters,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "prunable_parameters": self.prunable_parameters,
            "prunable_zeros": self.prunable_zeros,
            "prunable_sparsity": self.prunable_sparsity,
            "prunable_share": self.prunable_share,
        }

    def __eq__(self, other):
        return isinstance(other, SparsitySummary) and self.as_dict() == other.as_dict()

    def __repr__(self):
        return (
            f"SparsitySummary(sparsity={self.sparsity:.4f} of all {self.parameters:,} "
            f"parameters, prunable_sparsity={self.prunable_sparsity:.4f} of "
            f"{self.prunable_parameters:,} prunable weights "
            f"({100 * self.prunable_share:.1f}% of the model))"
        )


def _count_zeros(variables):
    unique = list({id(v): v for v in variables}.values())
    size = sum(int(np.prod(v.shape, dtype=np.int64)) for v in unique)
    zeros = sum(int(np.sum(keras.ops.convert_to_numpy(v) == 0)) for v in unique)
    return size, zeros


def sparsity_summary(model, variables=None, **kwargs):
    """The zero fractions of a model's prunable weights and of all its parameters.

    Args:
        model: A built `keras.Model`.
        variables: The prunable variables. Defaults to `None` (`prunable_variables(model,
            **kwargs)`).
        **kwargs: Passed to `prunable_variables` (`include_biases`, ...).

    Returns:
        A `SparsitySummary`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> summary = sparsity_summary(model)  # the bias starts at zero
        >>> summary.zeros, summary.parameters, summary.prunable_sparsity
        (2, 8, 0.0)
    """
    if variables is None:
        variables = prunable_variables(model, **kwargs)
    parameters, zeros = _count_zeros(model.weights)
    prunable_parameters, prunable_zeros = _count_zeros(variables)
    return SparsitySummary(parameters, zeros, prunable_parameters, prunable_zeros)


def check_structure_and_scope(structure, scope):
    if structure not in STRUCTURES:
        raise ValueError(
            f"`structure` must be one of {list(STRUCTURES)}. Received: structure={structure!r}"
        )
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {list(SCOPES)}. Received: scope={scope!r}")


def check_sparsity(sparsity, name="sparsity"):
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float, np.floating))
        or not 0.0 <= float(sparsity) < 1.0
    ):
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={sparsity!r}")
    return float(sparsity)


def _group_scores(weights, structure):
    """Scores of the prunable groups of one weight array, and how to expand them back.

    Returns `(scores, expand)`: `scores` a flat array, one per group; `expand(keep)` maps a
    flat boolean keep-vector over groups back to an element mask of `weights.shape`.
    """
    magnitude = np.abs(weights)
    if structure == "unstructured":
        return magnitude.ravel(), lambda keep: keep.reshape(weights.shape)
    if structure in ("nodes", "filters"):
        # Output units / filters are the last axis of Dense and Conv kernels.
        flat = magnitude.reshape(-1, weights.shape[-1])
        scores = np.sqrt(np.sum(flat**2, axis=0))
        return scores, lambda keep: np.broadcast_to(keep, weights.shape).copy()
    # 2:4: groups of 4 consecutive weights along the input (reduction) axis, keep the top 2.
    # The input axis is the second-to-last of Dense and Conv kernels (HWIO).
    moved = np.moveaxis(magnitude, -2, -1)
    inputs = moved.shape[-1]
    if inputs % 4:
        raise ValueError(
            "`structure='2:4'` needs the input dimension of every pruned kernel to be a "
            f"multiple of 4. Received: a kernel of shape {weights.shape}"
        )
    return moved, None


def _two_of_four_mask(weights):
    moved = np.moveaxis(np.abs(weights), -2, -1)
    groups = moved.reshape(-1, 4)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :2], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, -2)


def erk_densities(shapes, density):
    """Erdős–Rényi-kernel densities (Evci et al. 2020, RigL) for a total `density`.

    Each weight array of shape `(d_1, ..., d_k)` gets density `min(1, ε·Σd_i / Πd_i)`, with
    ε chosen so that the kept weights add up to `density` of all weights: small and
    thin layers (a stem convolution, an output layer) stay denser than large ones. Arrays
    that would exceed density 1 are kept dense and the rest share what remains.

    Args:
        shapes: Shapes of the weight arrays.
        density: Fraction of all weights to keep, in [0, 1].

    Returns:
        A float64 numpy array, one density per shape, each in [0, 1].
    """
    sizes = np.array([float(np.prod(shape)) for shape in shapes])
    raw = np.array([float(np.sum(shape)) for shape in shapes]) / np.maximum(sizes, 1.0)
    budget = density * sizes.sum()
    dense = np.zeros(len(sizes), dtype=bool)
    while True:
        free = ~dense
        denominator = float(np.sum(raw[free] * sizes[free]))
        remaining = budget - float(np.sum(sizes[dense]))
        epsilon = remaining / denominator if denominator > 0 else 0.0
        now_dense = free & (epsilon * raw >= 1.0)
        if not now_dense.any():
            break
        dense |= now_dense
    return np.where(dense, 1.0, np.clip(epsilon * raw, 0.0, 1.0))


def _keep_top(scores, num_keep):
    """Boolean keep-vector of the `num_keep` largest scores (ties broken by position)."""
    if num_keep <= 0:
        return np.zeros(scores.shape, dtype=bool)
    if num_keep >= scores.size:
        return np.ones(scores.shape, dtype=bool)
    # O(n) selection: everything above the num_keep-th largest score, then the first ties.
    threshold = np.partition(scores, scores.size - num_keep)[scores.size - num_keep]
    keep = scores > threshold
    ties = np.flatnonzero(scores == threshold)
    keep[ties[: num_keep - int(keep.sum())]] = True
    return keep


def magnitude_masks(
    model,
    sparsity,
    structure="unstructured",
    scope="global",
    variables=None,
    existing_masks=None,
    importance=None,
    layer_floor=DEFAULT_LAYER_FLOOR,
):
    """Masks of the projection P_p(w): keep the largest weights, zero a fraction `sparsity`.

    With `scope="global"` one threshold ranks all prunable groups of all variables together
    (unstructured: weights; `"nodes"`/`"filters"`: output units by their L2 norm divided by
    the square root of their size, so that layers of different fan-in compete fairly); with
    `"per_layer"` each variable loses the same fraction. `"2:4"` keeps the two largest of
    every four consecutive input weights (exactly 50% per variable; `sparsity` must be 0.5).
    Weights already masked by `existing_masks` stay masked and count towards the sparsity.
    The number of zeroed elements is exact: `round(sparsity * size)` per scope.

    **Layer-collapse protection** (`scope="global"`): one global threshold can empty a
    layer whose weights are small by scale rather than by use (a 216-weight stem convolution
    in front of BatchNormalization, whose output does not depend on the kernel's scale, is
    left 96% sparse at 80% overall), and no training afterwards restores a layer with almost
    nothing left. So each variable first keeps its top groups up to a floor, `layer_floor`
    times the density the Erdős–Rényi-kernel rule (`erk_densities`, as RigL allocates
    sparsity) gives it at this sparsity; the global ranking then fills the rest of the
    budget. Because the ERK densities add up to the budget, the floors always fit, the total
    stays exact, and the ranking stays global wherever it leaves layers above their floors
    (on LeNet-300-100 at 99.1%, the floors do not bind). `layer_floor=0` is the plain
    global ranking; `1` is the ERK allocation itself. `"auto"` is `0.5`, or `1` when the
    model has BatchNormalization: a kernel whose outputs are normalised can be rescaled
    without changing the function, so its magnitudes say nothing about its use next to
    another layer's, and the allocation across layers follows their shapes alone (on a
    12-filter residual BatchNorm net on the digits at 80%, Compress kept 90.0% with 0.5 and
    the dense 95.6% with 1).

    With `importance`, a diagonal metric `d` per variable (e.g. the diagonal of g = JᵀJ
    or of the Fisher information, as from `keras_fip.geometry.metric_diagonal`), the
    projection is taken in the norm `Σ d_i w_i²` instead of the Euclidean one: weights
    (groups) are ranked by `√d_i·|w_i|`, so the kept set is the one whose removal changes
    the outputs least to second order (Optimal Brain Damage's saliency).

    Args:
        model: A built `keras.Model`.
        sparsity: Fraction of prunable weights to zero, in [0, 1).
        structure: One of `"unstructured"`, `"nodes"`, `"filters"`, `"2:4"`. Defaults to
            `"unstructured"`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.
        variables: The variables to prune. Defaults to `None` (`prunable_variables(model)`).
        existing_masks: Dict of masks to keep (as from `keras_fip.masks`). Defaults to
            `None`.
        importance: List of non-negative arrays, one per variable and of its shape: the
            diagonal metric to rank in. Defaults to `None` (Euclidean: magnitude).
        layer_floor: With `scope="global"`, the fraction of its ERK density below which no
            variable is pruned, in [0, 1], or `"auto"` (1 for models with
            BatchNormalization, else 0.5). Defaults to `"auto"`.

    Returns:
        A dict mapping `variable.path` to a boolean array (`False` = pruned).

    Examples:

        >>> model = keras_fip.models.lenet_300_100()
        >>> masks = magnitude_masks(model, 0.9)
        >>> kept = sum(int(m.sum()) for m in masks.values())
    """
    sparsity = check_sparsity(sparsity)
    check_structure_and_scope(structure, scope)
    layer_floor = resolve_layer_floor(model, layer_floor)
    if variables is None:
        variables = prunable_variables(model)
    if not variables:
        raise ValueError(
            f"Model `{model.name}` has no prunable variables (Dense/Conv kernels by default). "
            "Received: a model with none"
        )
    existing_masks = existing_masks or {}
    arrays = [keras.ops.convert_to_numpy(v) for v in variables]
    for variable, array in zip(variables, arrays):
        if variable.path in existing_masks:
            array *= existing_masks[variable.path]
    if importance is not None:
        importance = list(importance)
        if len(importance) != len(variables) or any(
            np.shape(d) != a.shape for d, a in zip(importance, arrays)
        ):
            raise ValueError(
                "`importance` must hold one array per variable, of the variable's shape. "
                f"Received: shapes {[np.shape(d) for d in importance]} for variables of "
                f"shapes {[a.shape for a in arrays]}"
            )
        arrays = [
            a * np.sqrt(np.maximum(np.asarray(d, a.dtype), 0.0)) for a, d in zip(arrays, importance)
        ]

    if structure == "2:4":
        if abs(sparsity - 0.5) > 1e-9:
            raise ValueError(
                "`structure='2:4'` zeroes exactly half of each kernel, so `sparsity` must be "
                f"0.5. Received: sparsity={sparsity}"
            )
        for array in arrays:
            _group_scores(array, structure)  # validates the shape
        return {v.path: _two_of_four_mask(a) for v, a in zip(variables, arrays)}

    if structure == "filters":
        for variable, array in zip(variables, arrays):
            if array.ndim < 3:
                raise ValueError(
                    "`structure='filters'` prunes convolution filters, but variable "
                    f"`{variable.path}` has shape {array.shape}. Use `structure='nodes'` for "
                    "Dense units, or restrict `variables` to convolution kernels."
                )

    scored = [_group_scores(array, structure) for array in arrays]
    group_sizes = [array.size // scores.size for array, (scores, _) in zip(arrays, scored)]
    result = {}
    if scope == "per_layer":
        for variable, (scores, expand) in zip(variables, scored):
            num_keep = scores.size - int(round(sparsity * scores.size))
            result[variable.path] = expand(_keep_top(scores, num_keep))
        return result

    # Global: rank every group of every variable together, above each variable's floor.
    normalized = [scores / np.sqrt(size) for (scores, _), size in zip(scored, group_sizes)]
    if layer_floor > 0:
        floors = layer_floor * erk_densities([a.shape for a in arrays], 1.0 - sparsity)
        normalized = [_raise_floor(scores, floor) for scores, floor in zip(normalized, floors)]
    all_scores = np.concatenate(normalized)
    all_sizes = np.concatenate(
        [np.full(scores.size, size) for (scores, _), size in zip(scored, group_sizes)]
    )
    total = all_sizes.sum()
    target_zero = int(round(sparsity * total))
    if structure == "unstructured":
        keep = _keep_top(all_scores, all_scores.size - target_zero)
    else:
        # Prune whole groups, smallest first, until the zeroed elements reach the target.
        order = np.argsort(all_scores, kind="stable")
        zeroed = np.cumsum(all_sizes[order])
        num_pruned = int(np.searchsorted(zeroed, target_zero, side="left"))
        if num_pruned < len(order) and zeroed[num_pruned] == target_zero:
            num_pruned += 1
        keep = np.ones(all_scores.size, dtype=bool)
        keep[order[:num_pruned]] = False
    offset = 0
    for variable, (scores, expand) in zip(variables, scored):
        result[variable.path] = expand(keep[offset : offset + scores.size])
        offset += scores.size
    return result


def check_layer_floor(layer_floor, name="layer_floor"):
    """`layer_floor` checked: `"auto"` or a number in [0, 1]."""
    if isinstance(layer_floor, str) and layer_floor == "auto":
        return layer_floor
    if (
        isinstance(layer_floor, bool)
        or not isinstance(layer_floor, (int, float, np.integer, np.floating))
        or not 0.0 <= float(layer_floor) <= 1.0
    ):
        raise ValueError(
            f"`{name}` must be 'auto' or a number in [0, 1]. Received: {name}={layer_floor!r}"
        )
    return float(layer_floor)


def resolve_layer_floor(model, layer_floor):
    """The number `layer_floor` stands for on `model` (`"auto"`: 1 with BatchNormalization,
    else 0.5)."""
    layer_floor = check_layer_floor(layer_floor)
    if layer_floor != "auto":
        return layer_floor
    normalized = any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in all_layers(model)
    )
    return BATCH_NORM_LAYER_FLOOR if normalized else LAYER_FLOOR


def _raise_floor(scores, density):
    """Scores with the top `floor(density·size)` non-zero groups lifted above every other
    score (+inf), so that a global ranking keeps them first. Rounding down keeps the
    floors of all variables inside the budget (the ERK densities add up to it exactly).
    Zero scores (weights already masked) are never lifted."""
    num_floor = min(int(np.floor(density * scores.size + 1e-9)), int(np.count_nonzero(scores)))
    if num_floor <= 0:
        return scores
    lifted = scores.astype("float64").copy()
    lifted[_keep_top(scores, num_floor)] = np.inf
    return lifted


def project(weights, masks):
    """Applies masks to a list of weight arrays: P_p(w) = w ⊙ m."""
    return [w * m for w, m in zip(weights, masks)]
