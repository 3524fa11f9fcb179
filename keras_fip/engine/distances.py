"""Output distances between a model's outputs and reference outputs.

Every distance is a pure function `distance(outputs, reference_outputs) -> scalar`: the
**mean** over the batch of a per-example distance, so the trade-off weight β of the FIP step
keeps one meaning across batch sizes and replica counts. Outputs are logits. Every distance
is exactly zero, with an exactly zero gradient, when `outputs` equals `reference_outputs`.
"""

import keras
from keras import ops

_LOW_PRECISION = ("float16", "bfloat16")


def _prepare(outputs, reference_outputs):
    """Casts both sides to a common float dtype of at least single precision."""
    outputs = ops.convert_to_tensor(outputs)
    dtype = keras.backend.standardize_dtype(outputs.dtype)
    if dtype in _LOW_PRECISION or not dtype.startswith("float"):
        dtype = "float32"
    outputs = ops.cast(outputs, dtype)
    reference_outputs = ops.cast(ops.stop_gradient(reference_outputs), dtype)
    return outputs, reference_outputs


def _flatten_classes(tensor):
    """Reshapes `(batch, ..., classes)` to `(examples, classes)` for softmax distances."""
    return ops.reshape(tensor, (-1, ops.shape(tensor)[-1]))


def squared_l2(outputs, reference_outputs):
    """Squared Euclidean distance between logits, mean over the batch.

    `mean_b Σ_c (f_c(x_b; w) − f_c(x_b; w_ref))²`: its second-order expansion in
    `w − w_ref` is exactly `(w − w_ref)ᵀ g (w − w_ref)`, with `g` the metric tensor of
    `keras_fip.geometry` on logits.

    Args:
        outputs: Tensor of shape `(batch, ...)`, the model's logits.
        reference_outputs: Tensor of the same shape, the reference logits. Treated as a
            constant (no gradient flows into it).

    Returns:
        A scalar tensor.

    Examples:

        >>> float(squared_l2([[1.0, 2.0]], [[1.0, 0.0]]))
        4.0
    """
    outputs, reference_outputs = _prepare(outputs, reference_outputs)
    difference = outputs - reference_outputs
    per_example = ops.sum(
        ops.reshape(ops.square(difference), (ops.shape(difference)[0], -1)), axis=-1
    )
    return ops.mean(per_example)


@ops.custom_gradient
def _kl_from_logits(outputs, reference_outputs):
    """Per-example KL(softmax(reference) ‖ softmax(outputs)) with an exact gradient."""
    log_p = ops.log_softmax(outputs, axis=-1)
    log_q = ops.log_softmax(reference_outputs, axis=-1)
    q = ops.exp(log_q)
    log_ratio = log_q - log_p
    per_example = ops.sum(q * log_ratio, axis=-1)

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        upstream = ops.expand_dims(upstream, -1)
        # d/do: softmax(o) − softmax(r), computed the same way on both sides so that it
        # is exactly zero when o == r.
        p = ops.exp(log_p)
        grad_outputs = upstream * (p - q)
        # d/dr: q ⊙ (log q − log p − KL).
        grad_reference = upstream * q * (log_ratio - ops.expand_dims(per_example, -1))
        return grad_outputs, grad_reference

    return per_example, grad


def kl(outputs, reference_outputs):
    """KL divergence of the model's softmax from the reference softmax, mean over the batch.

    `mean_b KL(softmax(f(x_b; w_ref)) ‖ softmax(f(x_b; w)))`, computed from logits with
    `log_softmax` in log space, so it is stable for confident predictions. The last axis
    holds the classes; leading axes other than the batch (e.g. tokens) are averaged too.

    Args:
        outputs: Tensor of shape `(batch, ..., classes)`, the model's logits.
        reference_outputs: Tensor of the same shape, the reference logits. Treated as a
            constant.

    Returns:
        A scalar tensor.

    Examples:

        >>> round(float(kl([[0.0, 0.0]], [[0.0, 0.0]])), 6)
        0.0
    """
    outputs, reference_outputs = _prepare(outputs, reference_outputs)
    per_example = _kl_from_logits(_flatten_classes(outputs), _flatten_classes(reference_outputs))
    return ops.mean(per_example)


def bhattacharyya(outputs, reference_outputs):
    """Bhattacharyya distance between the two softmax distributions, mean over the batch.

    `−log Σ_c sqrt(p_c q_c)`, computed from logits `o` and `r` in log space as
    `½·logsumexp(o) + ½·logsumexp(r) − logsumexp((o + r)/2)`, which is exactly zero (with a
    zero gradient) at `o == r` and never takes the square root of a small number.

    Args:
        outputs: Tensor of shape `(batch, ..., classes)`, the model's logits.
        reference_outputs: Tensor of the same shape, the reference logits. Treated as a
            constant.

    Returns:
        A scalar tensor.

    Examples:

        >>> round(float(bhattacharyya([[0.0, 0.0]], [[0.0, 0.0]])), 6)
        0.0
    """
    outputs, reference_outputs = _prepare(outputs, reference_outputs)
    outputs = _flatten_classes(outputs)
    reference_outputs = _flatten_classes(reference_outputs)
    per_example = (
        0.5 * ops.logsumexp(outputs, axis=-1)
        + 0.5 * ops.logsumexp(reference_outputs, axis=-1)
        - ops.logsumexp(0.5 * (outputs + reference_outputs), axis=-1)
    )
    return ops.mean(per_example)


_DISTANCES = {
    "l2": squared_l2,
    "squared_l2": squared_l2,
    "kl": kl,
    "bhattacharyya": bhattacharyya,
}


def get(identifier):
    """Returns the distance function named by `identifier`, or `identifier` if callable.

    Args:
        identifier: One of `"l2"` (alias `"squared_l2"`), `"kl"`, `"bhattacharyya"`, a
            callable `fn(outputs, reference_outputs) -> scalar`, or a serialised
            registered callable.

    Returns:
        A callable distance.

    Examples:

        >>> get("kl") is kl
        True
    """
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if callable(identifier):
        return identifier
    if isinstance(identifier, str) and identifier in _DISTANCES:
        return _DISTANCES[identifier]
    raise ValueError(
        "`distance` must be one of "
        f"{sorted(_DISTANCES)} or a callable `fn(outputs, reference_outputs)`. "
        f"Received: distance={identifier!r}"
    )


def serialize(distance):
    """Returns the name of a built-in distance, or the callable itself."""
    for name, function in _DISTANCES.items():
        if function is distance:
            return name
    return keras.saving.serialize_keras_object(distance)
