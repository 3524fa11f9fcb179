"""What a classifier's outputs are, logits or probabilities, and its logits either way.

Most Keras classifiers end in a softmax (`Dense(10, activation="softmax")`); others return
logits. keras_fip works on either. Everything that needs logits (the output distances, the
metric g, the cross-entropy of a secondary objective) reads a probability model through its
log-probabilities, `log p`: they are logits of the same distribution (`softmax(log p) = p`),
and they differ from the model's pre-softmax logits only by a per-example shift, which the
KL divergence, the Bhattacharyya distance and the cross-entropy ignore. Everything that
needs probabilities (ensemble averaging, the Fisher metric) takes a probability model's
outputs as they are and a logits model's through a softmax.
"""

import keras
import numpy as np
from keras import ops

OUTPUT_KINDS = ("logits", "probabilities")
# Rows of a probability output sum to 1 within this (float32 softmax rounding is ~1e-6).
_PROBABILITY_SUM_TOLERANCE = 1e-3
# Inputs a numeric check of the outputs reads.
_PROBE_EXAMPLES = 64


def check_output_kind(kind, name="outputs", allow_auto=True):
    """Validates an output-kind argument (`"auto"`, `"logits"` or `"probabilities"`)."""
    allowed = (("auto",) if allow_auto else ()) + OUTPUT_KINDS
    if kind not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}. Received: {name}={kind!r}")
    return kind


def _is_softmax(function):
    return function is keras.activations.softmax or getattr(function, "__name__", "") == "softmax"


def _layer_output_kind(layer):
    """`"probabilities"`, `"logits"` or `None` (unknown) for the layer that makes an output."""
    if isinstance(layer, keras.Model):
        return _structural_kind(layer)
    if isinstance(layer, keras.layers.Softmax):
        return "probabilities"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    if _is_softmax(activation):
        return "probabilities"
    name = getattr(activation, "__name__", "")
    if name in ("linear", "log_softmax"):
        return "logits"
    return None


def _output_layers(model):
    """The layers whose outputs are the model's outputs, where the graph shows them."""
    if isinstance(model, keras.Sequential):
        return model.layers[-1:]
    try:
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):  # Subclassed models declare no outputs.
        return []
    found = []
    for output in outputs:
        for layer in reversed(model.layers):
            try:
                produced = keras.tree.flatten(layer.output)
            except (AttributeError, ValueError):  # Never called, or called several times.
                continue
            if any(tensor is output for tensor in produced):
                found.append(layer)
                break
        else:
            return []
    return found


def _structural_kind(model):
    kinds = {_layer_output_kind(layer) for layer in _output_layers(model)}
    return kinds.pop() if len(kinds) == 1 else None


def structural_output_kind(model):
    """What the layer that makes the output says: `"logits"`, `"probabilities"`, or
    `None` when the graph does not show it (see `output_kind`)."""
    return _structural_kind(model)


def looks_like_probabilities(values):
    """Whether every row of `values` is a probability vector (≥ 0, summing to 1)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim < 2 or values.shape[-1] < 2 or not np.isfinite(values).all():
        return False
    sums = values.sum(axis=-1)
    return bool(
        values.min() >= 0.0
        and values.max() <= 1.0 + _PROBABILITY_SUM_TOLERANCE
        and np.abs(sums - 1.0).max() <= _PROBABILITY_SUM_TOLERANCE
    )


def output_kind(model, inputs=None):
    """Whether a classifier returns logits or probabilities.

    The layer that makes the output decides when the graph shows it: a softmax activation
    (`Dense(..., activation="softmax")`, `Activation("softmax")`, `Softmax()`) means
    probabilities, a linear or log-softmax one logits. Otherwise (a subclassed model, an
    output made by another layer) the outputs on up to 64 of `inputs` decide: rows that
    are non-negative and sum to one are probabilities. Without inputs, logits.

    Args:
        model: A `keras.Model` classifier (class scores on the last axis).
        inputs: Some of the model's inputs (array, or dict or list of arrays), or `None`.
            Defaults to `None`.

    Returns:
        `"logits"` or `"probabilities"`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "softmax")])
        >>> output_kind(model)
        'probabilities'
    """
    kind = _structural_kind(model)
    if kind is not None:
        return kind
    if inputs is None:
        return "logits"
    sample = keras.tree.map_structure(lambda array: np.asarray(array)[:_PROBE_EXAMPLES], inputs)
    predictions = model(sample, training=False)
    values = [ops.convert_to_numpy(tensor) for tensor in keras.tree.flatten(predictions)]
    if values and all(looks_like_probabilities(value) for value in values):
        return "probabilities"
    return "logits"


def _smallest_normal(dtype):
    return float(np.finfo(keras.backend.standardize_dtype(dtype)).tiny)


def log_probabilities(probabilities):
    """`log p`, with `p` floored at the smallest normal number of its dtype.

    Float16 and bfloat16 probabilities are read in float32. The gradient is `1/p` above
    the floor and zero below it (a class whose probability underflowed to zero).

    Args:
        probabilities: A tensor of probabilities.

    Returns:
        A tensor of the same shape.
    """
    probabilities = ops.convert_to_tensor(probabilities)
    dtype = keras.backend.standardize_dtype(probabilities.dtype)
    if dtype not in ("float32", "float64"):
        probabilities = ops.cast(probabilities, "float32")
        dtype = "float32"
    return ops.log(ops.maximum(probabilities, _smallest_normal(dtype)))


def as_logits(outputs, kind):
    """A classifier's outputs as logits: themselves, or the log of probabilities.

    Args:
        outputs: A tensor (or structure of tensors) of model outputs.
        kind: What they are: `"logits"` or `"probabilities"`.

    Returns:
        Logits of the same distribution, with the same structure.

    Examples:

        >>> [round(float(v), 4) for v in as_logits(np.array([0.5, 0.5]), "probabilities")]
        [-0.6931, -0.6931]
    """
    check_output_kind(kind, "kind", allow_auto=False)
    if kind == "logits":
        return outputs
    return keras.tree.map_structure(log_probabilities, outputs)


def as_probabilities(outputs, kind):
    """A classifier's outputs as probabilities: a softmax of logits, or themselves.

    Args:
        outputs: A tensor (or structure of tensors) of model outputs.
        kind: What they are: `"logits"` or `"probabilities"`.

    Returns:
        Probabilities over the last axis, with the same structure.

    Examples:

        >>> [round(float(v), 4) for v in as_probabilities(np.array([0.0, 0.0]), "logits")]
        [0.5, 0.5]
    """
    check_output_kind(kind, "kind", allow_auto=False)
    if kind == "probabilities":
        return outputs
    return keras.tree.map_structure(lambda tensor: ops.softmax(tensor, axis=-1), outputs)


class LogProbabilities(keras.layers.Layer):
    """Turns probabilities into logits: `log p`, floored at the smallest normal number."""

    def call(self, probabilities):
        return log_probabilities(probabilities)

    def compute_output_shape(self, input_shape):
        return input_shape


class _LogitsOfModel(keras.Model):
    """`log model(x)` for a model whose graph cannot be extended (subclassed models)."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapped = model

    def call(self, inputs, training=False):
        return as_logits(self.wrapped(inputs, training=training), "probabilities")


def _same_variables(left, right):
    return [id(v) for v in left.trainable_variables] == [
        id(v) for v in right.trainable_variables
    ] and [id(v) for v in left.non_trainable_variables] == [
        id(v) for v in right.non_trainable_variables
    ]


def _graph_ends(model):
    """`(inputs, outputs)` of a Functional or Sequential model, as structured as the
    model takes and returns them; `(None, None)` for a subclassed model."""
    if isinstance(model, keras.Sequential):
        try:
            return model.inputs[0], model.outputs[0]
        except (AttributeError, IndexError, TypeError, ValueError):
            return None, None
    try:
        return model.input, model.output
    except (AttributeError, ValueError):  # Subclassed models: no graph to extend.
        return None, None


def logits_model(model, kind):
    """A model returning logits that shares every weight with `model`.

    A logits model is returned as it is. A probability model gets a view: the same layers
    (so the same variables, in the same order, and training it trains `model`) followed by
    `log p` (`LogProbabilities`). Functional and Sequential models are extended in their
    own graph (inputs and outputs stay known); subclassed models are wrapped.

    Args:
        model: A built `keras.Model`.
        kind: What `model` returns: `"logits"` or `"probabilities"` (see `output_kind`).

    Returns:
        A `keras.Model` returning logits.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "softmax")])
        >>> view = logits_model(model, "probabilities")
        >>> view.trainable_variables[0] is model.trainable_variables[0]
        True
    """
    check_output_kind(kind, "kind", allow_auto=False)
    if kind == "logits":
        return model
    name = f"{model.name}_logits"
    inputs, outputs = _graph_ends(model)
    if inputs is not None and outputs is not None:
        logits = keras.tree.map_structure(LogProbabilities(name=f"{name}_log"), outputs)
        view = keras.Model(inputs, logits, name=name)
        if _same_variables(view, model):
            return view
    view = _LogitsOfModel(model, name=name)
    if not view.built:
        view.built = True
    return view


def classification_loss(kind, reduction="sum_over_batch_size"):
    """`SparseCategoricalCrossentropy` for a model returning `kind` outputs.

    Args:
        kind: `"logits"` or `"probabilities"`.
        reduction: The Keras loss reduction. Defaults to `"sum_over_batch_size"`.

    Returns:
        A `keras.losses.SparseCategoricalCrossentropy`.
    """
    check_output_kind(kind, "kind", allow_auto=False)
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=kind == "logits", reduction=reduction
    )
