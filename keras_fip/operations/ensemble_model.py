"""The ensemble model: member networks and their combination in one functional `keras.Model`."""

import math

import keras
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.data_adapter import model_example_shape

COMBINES = ("mean_probabilities", "mean_logits", "log_mean_probabilities")
# The combinations an ensemble model is built with (standard layers only).
SAVED_COMBINES = ("mean_probabilities", "mean_logits")


@keras.saving.register_keras_serializable(package="keras_fip")
class EnsembleCombination(keras.layers.Layer):
    """Combines the outputs of ensemble members in one layer (for attacks and analyses).

    The ensembles keras_fip builds use standard layers (`build_ensemble`); this layer
    gives the numerically stable log p̄ that attacks and losses need. The members return
    logits z_k (p_k = softmax(z_k), log p_k = log_softmax(z_k)) or probabilities p_k
    (log p_k = log p_k, floored at the smallest normal number), as `outputs` says.

    `"mean_probabilities"`: p̄ = (1/K) Σ_k p_k, the probabilities the paper sums.
    `"log_mean_probabilities"`: log p̄, computed stably as `logsumexp_k(log p_k) − log K`;
    its softmax is p̄ again, so it can stand wherever logits are expected
    (`from_logits=True` losses, attacks).
    `"mean_logits"`: (1/K) Σ_k log p_k (the mean of the logits z_k up to a per-example
    shift), logits of the geometric-mean ensemble.

    Args:
        combine: One of `COMBINES`. Defaults to `"mean_probabilities"`.
        outputs: What the members return: `"logits"` or `"probabilities"`. Defaults to
            `"logits"`.
        **kwargs: `keras.layers.Layer` arguments (e.g. `name`).

    Examples:

        >>> layer = EnsembleCombination()
        >>> z = np.array([[0.0, 0.0]], "float32")
        >>> keras.ops.convert_to_numpy(layer([z, z])).tolist()
        [[0.5, 0.5]]
        >>> p = np.array([[0.2, 0.8]], "float32")
        >>> layer = EnsembleCombination(outputs="probabilities")
        >>> np.round(keras.ops.convert_to_numpy(layer([p, 1 - p])), 4).tolist()
        [[0.5, 0.5]]
    """

    def __init__(self, combine="mean_probabilities", outputs="logits", **kwargs):
        super().__init__(**kwargs)
        if combine not in COMBINES:
            raise ValueError(
                f"`combine` must be one of {list(COMBINES)}. Received: combine={combine!r}"
            )
        self.combine = combine
        self.outputs = outputs_lib.check_output_kind(outputs, "outputs", allow_auto=False)

    def call(self, inputs):
        members = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        stacked = keras.ops.stack(members, axis=0)
        if self.combine == "mean_probabilities":
            return keras.ops.mean(outputs_lib.as_probabilities(stacked, self.outputs), axis=0)
        if self.outputs == "logits":
            log_probabilities = keras.ops.log_softmax(stacked, axis=-1)
        else:
            log_probabilities = outputs_lib.log_probabilities(stacked)
        if self.combine == "mean_logits":
            if self.outputs == "logits":
                return keras.ops.mean(stacked, axis=0)
            return keras.ops.mean(log_probabilities, axis=0)
        return keras.ops.logsumexp(log_probabilities, axis=0) - math.log(len(members))

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, list):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "combine": self.combine, "outputs": self.outputs}


COMBINATION_NAME = "combination"
# Suffixes of the per-member layers `build_ensemble` puts before the combination: the
# members' probabilities (a `Softmax` of logits, an `Identity` of probabilities) or the
# members' logits (log-probabilities of probability members).
_PROBABILITIES_SUFFIX = "_probabilities"
_LOGITS_SUFFIX = "_logits"


def is_ensemble(model):
    """Whether `model` is a keras_fip ensemble (nested members, a `"combination"` layer)."""
    if not isinstance(model, keras.Model):
        return False
    names = [layer.name for layer in model.layers]
    return COMBINATION_NAME in names and any(
        isinstance(layer, keras.Model) for layer in model.layers
    )


def ensemble_members(model):
    """The member networks of a keras_fip ensemble, each returning what its start returned.

    The members are found structurally: the nested `keras.Model` layers of an ensemble
    model (one with a `"combination"` layer, as `build_ensemble` makes them), in the
    order they were added. This also works on an ensemble re-loaded from a `.keras` file
    or copied. The members are the ensemble's own layers (shared weights, not copies):
    copy them with `keras_fip.engine.copy_model` before changing them. Each member
    returns what the network it was made from returns: logits for a logits model,
    probabilities for one ending in a softmax (`member_output_kind` says which;
    `keras_fip.robustness.logit_model(member)` gives logits either way).

    Args:
        model: A model returned by `keras_fip.Ensemble`, the ensemble baselines or
            `build_ensemble` (or re-loaded from one).

    Returns:
        A list of `keras.Model`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> walk = keras_fip.Walk(steps=6, seed=0, verbose=0)
        >>> ensemble = keras_fip.Ensemble(3, data=x, walk=walk)(model)
        >>> len(keras_fip.ensemble_members(ensemble))
        3
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if not is_ensemble(model):
        raise ValueError(
            "`model` is not a keras_fip ensemble: it has no nested member models and "
            f"`{COMBINATION_NAME}` layer (make ensembles with `keras_fip.Ensemble` or "
            f"`build_ensemble`). Received: model={model.name}"
        )
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def _member_layers(model, suffix):
    return [
        layer
        for layer in model.layers
        if layer.name.startswith("member_")
        and layer.name.endswith(suffix)
        and not isinstance(layer, keras.Model)
    ]


def ensemble_combine(model):
    """The `combine` mode of a keras_fip ensemble: `"mean_probabilities"` (it returns
    probabilities) or `"mean_logits"` (it returns logits)."""
    ensemble_members(model)
    return "mean_probabilities" if _member_layers(model, _PROBABILITIES_SUFFIX) else "mean_logits"


def member_output_kind(model):
    """What the members of a keras_fip ensemble return: `"logits"` or `"probabilities"`.

    Read from the layers `build_ensemble` puts after each member: a `Softmax` follows a
    member returning logits, an `Identity` (mean probabilities) or a log-probability
    layer (mean logits) one returning probabilities.

    Args:
        model: A keras_fip ensemble.

    Returns:
        `"logits"` or `"probabilities"`.

    Examples:

        >>> member = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, "softmax")])
        >>> member_output_kind(build_ensemble([member]))
        'probabilities'
    """
    ensemble_members(model)
    probabilities = _member_layers(model, _PROBABILITIES_SUFFIX)
    if probabilities:
        softmax = isinstance(probabilities[0], keras.layers.Softmax)
        return "logits" if softmax else "probabilities"
    return "probabilities" if _member_layers(model, _LOGITS_SUFFIX) else "logits"


def build_ensemble(
    members, combine="mean_probabilities", input_shape=None, name="ensemble", outputs="auto"
):
    """Builds one functional model: one input, the member networks, their combination.

    The members are used as they are (nested, not copied) and renamed `member_0`,
    `member_1`, ... so that the ensemble saves as `.keras` and exports as a SavedModel
    with each member intact; `ensemble_members` gives them back. The combination is an
    `Average` named `"combination"` of what each member's layer `member_k_probabilities`
    (or `member_k_logits`) makes of its outputs, so the ensemble is a Keras model that
    other keras_fip operations accept and that re-loads combining the same way. Masks
    the members carry stay on them.

    With `combine="mean_probabilities"` the ensemble returns p̄ = (1/K) Σ_k p_k,
    probabilities, whatever the members return: members returning probabilities (a
    final softmax) are averaged as they are, members returning logits through a
    `Softmax` each. With `"mean_logits"` it returns logits: the mean of the members'
    logits, or of their log-probabilities for members returning probabilities (logits
    of the geometric-mean ensemble).

    Args:
        members: A non-empty list of `keras.Model` with outputs of one shape, all
            returning logits or all returning probabilities.
        combine: `"mean_probabilities"` or `"mean_logits"` (see above). Defaults to
            `"mean_probabilities"`.
        input_shape: The shape of one input example, or `None` to read it from the first
            member's input (for members with several inputs, the ensemble takes the
            same dict or list of inputs). Defaults to `None`.
        name: The ensemble model's name. Defaults to `"ensemble"`.
        outputs: What the members return: `"logits"`, `"probabilities"`, or `"auto"`
            (the first member's final layer decides,
            `keras_fip.core.outputs.output_kind`; logits when it does not show).
            Defaults to `"auto"`.

    Returns:
        A functional `keras.Model`.

    Examples:

        >>> members = [keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        ...            for _ in range(2)]
        >>> build_ensemble(members).output_shape
        (None, 2)
    """
    if (
        not isinstance(members, (list, tuple))
        or not members
        or not all(isinstance(m, keras.Model) for m in members)
    ):
        raise ValueError(
            f"`members` must be a non-empty list of `keras.Model`. Received: members={members!r}"
        )
    if combine not in SAVED_COMBINES:
        raise ValueError(
            f"`combine` must be one of {list(SAVED_COMBINES)}. Received: combine={combine!r}"
        )
    outputs_lib.check_output_kind(outputs)
    if outputs == "auto":
        outputs = outputs_lib.output_kind(members[0])
    several = data_adapter.model_inputs(members[0]) if input_shape is None else None
    if input_shape is None and not data_adapter.is_structured(several):
        input_shape = model_example_shape(members[0])
        if input_shape is None:
            raise ValueError(
                "`input_shape` is required for members without a known single input "
                "(subclassed models). Received: input_shape=None"
            )
    dtype = "float32"
    try:
        dtype = keras.backend.standardize_dtype(members[0].inputs[0].dtype)
    except (AttributeError, ValueError, TypeError, IndexError):
        pass
    for index, member in enumerate(members):
        member.name = f"member_{index}"
    if data_adapter.is_structured(several):
        # Several inputs: the same dict or list of inputs as the first member's.
        inputs = tf.nest.map_structure(
            lambda tensor: keras.Input(
                batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor.name
            ),
            several,
        )
    else:
        inputs = keras.Input(tuple(input_shape), dtype=dtype, name="inputs")
    values = [member(inputs) for member in members]
    if combine == "mean_probabilities":
        # The members' probabilities: a softmax of logits, probabilities as they are.
        layer = keras.layers.Softmax if outputs == "logits" else keras.layers.Identity
        values = [
            layer(name=f"member_{index}{_PROBABILITIES_SUFFIX}")(value)
            for index, value in enumerate(values)
        ]
    elif outputs == "probabilities":
        # The members' logits: log-probabilities.
        values = [
            EnsembleCombination(
                "mean_logits", outputs="probabilities", name=f"member_{index}{_LOGITS_SUFFIX}"
            )([value])
            for index, value in enumerate(values)
        ]
    if len(values) == 1:
        combined = keras.layers.Identity(name=COMBINATION_NAME)(values[0])
    else:
        combined = keras.layers.Average(name=COMBINATION_NAME)(values)
    return keras.Model(inputs, combined, name=name)
