"""P_p(w): projection of a model's prunable weights onto the p-sparse set.

Magnitude projection is what every pruning method here shares: `Compress` pulls weights
towards it along an FIP, the baselines apply it directly. The projection keeps the
largest-magnitude weights (or units, filters, 2-of-4 groups) and zeroes the rest.
"""

import keras
import numpy as np

STRUCTURES = ("unstructured", "nodes", "filters", "2:4")
SCOPES = ("global", "per_layer")

# Layer types whose `kernel` is prunable by default; other variables are opt-in.
_KERNEL_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
)
_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def _layers(model):
    """Every layer of a model, nested models and sub-layers included, once each."""
    seen, ordered = set(), []

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        ordered.append(layer)
        for child in getattr(layer, "_layers", None) or []:
            visit(child)
        if isinstance(layer, keras.Model):
            for child in layer.layers:
                visit(child)

    for layer in model.layers:
        visit(layer)
    return ordered


def prunable_variables(model, include_biases=False, include_normalization=False,
                       include_embeddings=False):
    """The trainable variables a pruning method may zero, in `model.trainable_variables` order.

    Args:
        model: A built `keras.Model`.
        include_biases: Whether biases are prunable. Defaults to `False`.
        include_normalization: Whether normalisation scales and offsets (`gamma`, `beta`) are
            prunable. Defaults to `False`.
        include_embeddings: Whether embedding tables are prunable. Defaults to `False`.

    Returns:
        A list of `keras.Variable`s: Dense/EinsumDense/Conv kernels by default.
    """
    chosen = set()
    for layer in _layers(model):
        for variable in layer.trainable_weights:
            name = variable.name
            if isinstance(layer, _KERNEL_LAYERS) and name in _KERNEL_NAMES:
                chosen.add(id(variable))
            elif include_biases and name == "bias":
                chosen.add(id(variable))
            elif include_normalization and isinstance(
                layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
            ):
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


def magnitude_masks(model, sparsity, structure="unstructured", scope="global",
                    variables=None, existing_masks=None, importance=None):
    """Masks of the projection P_p(w): keep the largest weights, zero a fraction `sparsity`.

    With `scope="global"` one threshold ranks all prunable groups of all variables together
    (unstructured: weights; `"nodes"`/`"filters"`: output units by their L2 norm divided by
    the square root of their size, so that layers of different fan-in compete fairly); with
    `"per_layer"` each variable loses the same fraction. `"2:4"` keeps the two largest of
    every four consecutive input weights (exactly 50% per variable; `sparsity` must be 0.5).
    Weights already masked by `existing_masks` stay masked and count towards the sparsity.
    The number of zeroed elements is exact: `round(sparsity * size)` per scope.

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

    Returns:
        A dict mapping `variable.path` to a boolean array (`False` = pruned).

    Example:

    >>> model = keras_fip.models.lenet_300_100()
    >>> masks = magnitude_masks(model, 0.9)
    >>> kept = sum(int(m.sum()) for m in masks.values())
    """
    sparsity = check_sparsity(sparsity)
    check_structure_and_scope(structure, scope)
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
        arrays = [a * np.sqrt(np.maximum(np.asarray(d, a.dtype), 0.0))
                  for a, d in zip(arrays, importance)]

    if structure == "2:4":
        if abs(sparsity - 0.5) > 1e-9:
            raise ValueError(
                "`structure='2:4'` zeroes exactly half of each kernel, so `sparsity` must be "
                f"0.5. Received: sparsity={sparsity}"
            )
        for variable, array in zip(variables, arrays):
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

    # Global: rank every group of every variable together.
    normalized = [scores / np.sqrt(size) for (scores, _), size in zip(scored, group_sizes)]
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


def project(weights, masks):
    """Applies masks to a list of weight arrays: P_p(w) = w ⊙ m."""
    return [w * m for w, m in zip(weights, masks)]
