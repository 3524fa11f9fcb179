"""`Damage`: fault models for Keras networks, from deleted units to the weight-space adversary."""

import json
import os

import keras
import numpy as np
import scipy.sparse.linalg
import tensorflow as tf

from keras_fip import distribute
from keras_fip.engine import data_adapter
from keras_fip.engine import masks as masks_lib
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine import projection
from keras_fip.engine.data_adapter import check_inputs_match_model
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.geometry.metric import MetricOperator
from keras_fip.geometry.spectrum import top_eigenpairs
from keras_fip.operations import faults
from keras_fip.operations.base import Operation
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import model_output_kind

KINDS = ("nodes", "weights", "gaussian", "eigen", "bitflip")
SCOPES = ("global", "per_layer")
MIXINGS = ("ascent", "equal", "sqrt")
OUTPUTS = ("log_probabilities", "logits", "probabilities")
# `mixing="ascent"`: Riemannian gradient steps on the sphere of coefficients, the largest
# step (in radians), the smallest tried before stopping, and the most steps.
_ASCENT_STEP = 0.5
_ASCENT_MIN_STEP = 1e-3
_ASCENT_ITERATIONS = 30

# Layers whose units (the last axis of the kernel) `kind="nodes"` deletes.
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

# The attribute of a damaged model that holds its `DamageReference` (saved in `.keras`).
_STATE_ATTRIBUTE = "_keras_fip_damage_reference"


class DamageReference:
    """The undamaged network behind a damaged model: what `Repair` walks back to.

    `Damage` records one on every model it returns (`keras_fip.damage_reference(model)`),
    and `Repair` on every model it repairs. It lives on that model object (not on its
    copies) and is written into the model's `.keras` file by `model.save(...)` (beside the
    weights, in `model.weights.h5`); `keras.saving.load_model` ignores it, and
    `keras_fip.load_damaged_model` loads the model with it, so a repair can happen in
    another process. Everything is saved, the recorded `inputs` and `outputs` included
    (pass `Damage` only the `data` a repair needs: a whole training set makes a large
    file). Damage applied to an already damaged model keeps
    the *first* undamaged network as the reference and accumulates the damage masks and the
    records, so a repair always aims at the network before any damage.

    Attributes:
        weights: List of numpy arrays aligned with the damaged model's `model.weights`
            (trainable and non-trainable): the undamaged values.
        masks: List aligned with `model.trainable_variables`: the boolean mask each
            variable carried before the damage, or `None`.
        damage_masks: List aligned with `model.trainable_variables`: `False` where damage
            zeroed a weight and holds it at zero (kinds `"nodes"` and `"weights"`), or
            `None` for a variable no zeroing damage touched.
        inputs: The inputs the undamaged network served (the operation's `data` or the
            inputs its model carried), or `None`.
        outputs: The undamaged network's outputs on `inputs` (inference mode), or `None`.
        records: List of the `Damage.record` dicts of every damage applied since.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> damaged = keras_fip.Damage("nodes", fraction=0.5, seed=0)(model)
    >>> reference = keras_fip.damage_reference(damaged)
    >>> restored = reference.restore(damaged)
    >>> bool(all(np.array_equal(a, b) for a, b in
    ...          zip(restored.get_weights(), model.get_weights())))
    True
    """

    def __init__(self, weights, masks, damage_masks, inputs=None, outputs=None, records=None):
        self.weights = list(weights)
        self.masks = list(masks)
        self.damage_masks = list(damage_masks)
        self.inputs = inputs
        self.outputs = outputs
        self.records = list(records or [])

    def restore(self, damaged):
        """Returns a new model: `damaged`'s architecture with the undamaged weights and masks.

        Args:
            damaged: The damaged model this reference belongs to (or any model with the
                same weight layout). Not changed.

        Returns:
            A new `keras.Model` equal to the undamaged network.
        """
        restored = masks_lib.strip_masks(damaged)
        if len(restored.weights) != len(self.weights):
            raise ValueError(
                f"`damaged` must have the reference's weight layout ({len(self.weights)} "
                f"weights). Received: damaged={damaged.name} with "
                f"{len(restored.weights)} weights"
            )
        for variable, value in zip(restored.weights, self.weights):
            variable.assign(value)
        if any(mask is not None for mask in self.masks):
            masks_lib.apply_masks(restored, self.masks)
        return restored


def damage_reference(model):
    """The undamaged network recorded on a model returned by `keras_fip.Damage`, or `None`.

    Args:
        model: A `keras.Model`.

    Returns:
        A `DamageReference` (undamaged weights, masks before and after the damage, the
        inputs the network served and its outputs on them, the damage records), or `None`
        when `model` was not returned by `Damage`.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> damaged = keras_fip.Damage("gaussian", norm=0.1, seed=0)(model)
    >>> keras_fip.damage_reference(damaged).records[0]["kind"]
    'gaussian'
    >>> keras_fip.damage_reference(model) is None
    True
    """
    state = getattr(model, _STATE_ATTRIBUTE, None) if isinstance(model, keras.Model) else None
    return state.reference if isinstance(state, _ReferenceState) else None


def attach_reference(model, reference):
    """Records `reference` (a `DamageReference`) on `model`, replacing any earlier one."""
    state = _ReferenceState(reference)
    # Not a layer, variable or metric: Keras does not track it, but `.keras` saving
    # visits it (`save_own_variables`).
    setattr(model, _STATE_ATTRIBUTE, state)


def _pack(reference):
    """A flat dict of numpy arrays holding a `DamageReference` (for `.keras` files)."""
    arrays = {}
    layout = {
        "weights": len(reference.weights),
        "masks": [],
        "damage_masks": [],
        "inputs": reference.inputs is not None,
        "outputs": reference.outputs is not None,
    }
    for index, weight in enumerate(reference.weights):
        arrays[f"weight_{index}"] = np.asarray(weight)
    for field in ("masks", "damage_masks"):
        for index, mask in enumerate(getattr(reference, field)):
            layout[field].append(mask is not None)
            if mask is not None:
                arrays[f"{field}_{index}"] = np.asarray(mask, dtype=np.uint8)
    if reference.inputs is not None:
        arrays["inputs"] = np.asarray(reference.inputs)
    if reference.outputs is not None:
        arrays["outputs"] = np.asarray(reference.outputs)
    layout["records"] = reference.records
    text = json.dumps(layout, default=_json_default)
    arrays["layout"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return arrays


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _unpack(arrays):
    """Inverse of `_pack` (`arrays`: a mapping of names to arrays)."""
    layout = json.loads(bytes(np.asarray(arrays["layout"], dtype=np.uint8)).decode("utf-8"))
    weights = [np.asarray(arrays[f"weight_{i}"]) for i in range(layout["weights"])]
    masks = {}
    for field in ("masks", "damage_masks"):
        masks[field] = [
            np.asarray(arrays[f"{field}_{i}"]).astype(bool) if present else None
            for i, present in enumerate(layout[field])
        ]
    return DamageReference(
        weights,
        masks["masks"],
        masks["damage_masks"],
        np.asarray(arrays["inputs"]) if layout["inputs"] else None,
        np.asarray(arrays["outputs"]) if layout["outputs"] else None,
        layout["records"],
    )


class _ReferenceState(keras.Operation):
    """Holds a model's `DamageReference`; Keras's `.keras` saving writes it with the weights."""

    def __init__(self, reference=None):
        super().__init__(name="keras_fip_damage_reference")
        self.reference = reference

    def save_own_variables(self, store):
        if self.reference is not None:
            for key, value in _pack(self.reference).items():
                store[key] = value

    def load_own_variables(self, store):
        try:
            keys = list(store.keys())
        except (AttributeError, TypeError):
            keys = []
        if "layout" in keys:
            self.reference = _unpack({key: np.asarray(store[key]) for key in keys})


def load_damaged_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """Loads a `.keras` file with the damage reference `model.save` wrote into it.

    `keras.saving.load_model` restores the damaged network (and its masks) but not the
    undamaged network behind it; this loads the model the same way and re-attaches its
    `DamageReference`, so `keras_fip.Repair` needs nothing else.

    Args:
        filepath: Path of a `.keras` file written by `model.save` (or
            `keras.saving.save_model`).
        custom_objects: As for `keras.saving.load_model`. Defaults to `None`.
        compile: As for `keras.saving.load_model`. Defaults to `True`.
        safe_mode: As for `keras.saving.load_model`. Defaults to `True`.

    Returns:
        The loaded `keras.Model`; `keras_fip.damage_reference(model)` is its reference, or
        `None` if the saved model carried none.

    Example:

    >>> import keras, os, tempfile
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> damaged = keras_fip.Damage("nodes", fraction=0.5, seed=0)(model)
    >>> path = os.path.join(tempfile.mkdtemp(), "damaged.keras")
    >>> damaged.save(path)
    >>> loaded = load_damaged_model(path)
    >>> keras_fip.damage_reference(loaded).records[0]["num_hit"]
    4
    """
    if not isinstance(filepath, (str, os.PathLike)) or not str(filepath).endswith(".keras"):
        raise ValueError(
            f"`filepath` must be the path of a `.keras` file. Received: filepath={filepath!r}"
        )
    model = keras.saving.load_model(
        filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
    )
    state = _ReferenceState()
    setattr(model, _STATE_ATTRIBUTE, state)
    # The same file again, through Keras's own reader: it visits the empty state, which
    # reads the stored reference (and reloads the weights, unchanged).
    model.load_weights(filepath)
    if state.reference is None:
        delattr(model, _STATE_ATTRIBUTE)
    return model


def _predict(model, x, batch_size=1024):
    """Inference-mode outputs in eager batches (no tf.function traced per model)."""
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(data_adapter.take(x, slice(i, i + batch_size)), training=False)
            )
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )


class _LogSoftmaxOf(keras.Model):
    """`log_softmax(model(x))` for a logits model: a view sharing its weights."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapped = model

    def call(self, inputs, training=False):
        return keras.tree.map_structure(
            lambda logits: keras.ops.log_softmax(logits, axis=-1),
            self.wrapped(inputs, training=training),
        )


def _log_probability_model(model, kind):
    """A view of `model` sharing its weights that returns log-probabilities: `log p` of a
    probability model, `log_softmax` of a logits model's logits. A classifier and its twin
    with a softmax (the same weights) give the same view outputs."""
    if kind == "probabilities":
        return outputs_lib.logits_model(model, kind)
    view = _LogSoftmaxOf(model, name=f"{model.name}_log_probabilities")
    if not view.built:
        view.built = True
    return view


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
                return True  # Cannot tell: treat as an output layer (never damaged).
    return False


class _Unit:
    """The weights that silence one unit of a layer: `(variable, axis, spatial)` targets.

    Unit j of the layer is silenced by zeroing, for each target, the entries at indices
    `arange(spatial) * channels + j` along `axis` (spatial > 1 after a Flatten).
    """

    def __init__(self, layer, channels):
        self.layer = layer
        self.channels = channels
        self.targets = []

    def add(self, variable, axis, spatial=1):
        self.targets.append((variable, axis, spatial))

    def zero(self, masks_by_id, unit):
        for variable, axis, spatial in self.targets:
            mask = masks_by_id.setdefault(id(variable), np.ones(variable.shape, bool))
            index = [slice(None)] * mask.ndim
            index[axis] = np.arange(spatial) * self.channels + unit
            mask[tuple(index)] = False


def _unit_plan(layer, consumers, outputs):
    """The silencing targets of `layer`'s units, or a reason they cannot be silenced."""
    channels = int(layer.kernel.shape[-1])
    plan = _Unit(layer, channels)
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


def _check_units(units, kind, fraction, count):
    """`units` as a `{layer name: sorted unit indices}` dict, validated, or `None`."""
    if units is None:
        return None
    if kind != "nodes" or fraction is not None or count is not None:
        raise ValueError(
            "`units` names the units to delete for `kind='nodes'`, instead of `fraction` "
            f"and `count`. Received: units={units!r} with kind={kind!r}, "
            f"fraction={fraction!r}, count={count!r}"
        )
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


def hidden_units(model, layers=None):
    """The units `Damage("nodes")` may delete, and which of them are deleted already.

    A unit counts as deleted when the masks the model carries hold its whole incoming
    kernel slice at zero (as `Damage("nodes")` leaves it).

    Args:
        model: A Sequential or functional `keras.Model`. Not changed.
        layers: Names of the layers to list, or `None` for every hidden Dense/Conv layer.
            Defaults to `None`.

    Returns:
        A dict mapping each layer name to a tuple `(num_units, deleted)`, `deleted` the
        sorted list of deleted unit indices.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> damaged = keras_fip.Damage("nodes", count=3, seed=0)(model)
    >>> num_units, deleted = hidden_units(damaged)["dense"]
    >>> num_units, len(deleted)
    (8, 3)
    """
    probe = Damage("nodes", count=0, layers=layers)
    plans = probe._unit_plans(model, probe._selected_layers(model))
    listing = {}
    for plan in plans:
        mask = masks_lib._mask_of(plan.layer.kernel)
        deleted = (
            []
            if mask is None
            else np.flatnonzero(~np.any(mask.reshape(-1, plan.channels), axis=0)).tolist()
        )
        listing[plan.layer.name] = (plan.channels, deleted)
    return listing


@keras.saving.register_keras_serializable(package="keras_fip")
class Damage(Operation):
    """Damages a network: deleted units, zeroed or bit-flipped weights, random or eigen noise.

    The fault models of the resilience and damage-rescue papers, plus the bit flips of the
    fault-injection tools (PyTorchFI, TensorFI2; an extension beyond the papers):

    - `"nodes"`: deletes hidden units of Dense layers and filters (feature maps) of Conv
      layers. Unit j's incoming kernel slice and bias are zeroed, and so are the scale and
      offset of channel j of a BatchNormalization that normalises it (traced through the
      functional graph, across activations, dropout and pooling), so its activation is
      exactly 0 (in inference and in training mode). Its outgoing weights in the consuming
      Dense/Conv layers are zeroed too where the chain of layers allows (through Flatten: the
      rows `h·W·C + w·C + j` of the next Dense kernel). The output layer (any Dense/Conv that
      reaches a model output without crossing another weight layer) is never damaged.
      `scope="global"` draws `round(fraction·U)` of all U hidden units, `"per_layer"`
      `round(fraction·u)` of each layer's u. Units are a seeded permutation's prefix, so the
      same seed deletes nested sets as `fraction` grows (a progressive deletion sequence).
    - `"weights"`: zeroes exactly `round(fraction·n)` (or `count`) of the n entries of the
      Dense/Conv kernels (edge damage), again a seeded nested prefix.
    - `"gaussian"`: adds a random Gaussian direction scaled to Euclidean norm exactly `norm`
      over all trainable weights (or those of `layers`).
    - `"eigen"`: the weight-space adversary: a perturbation δ of norm `norm` in the span
      of the top `num_eigenpairs` eigenvectors v_i of the metric g on `data`
      (`keras_fip.geometry.top_eigenpairs`), `δ = norm · Σ c_i v_i` with Σ c_i² = 1. g is
      measured on the log-probabilities by default (`outputs`): a model ending in a softmax
      and its twin returning the logits (the same weights) get the same g, the same
      eigenvectors and the same δ. The coefficients maximise the damage to the
      predictions (`mixing="ascent"`, the default): the mean cross-entropy on `data` of its
      labels, or, on inputs only, of the undamaged network's own predictions, is raised
      over the unit sphere of coefficients, from the best of ±v_i, by Riemannian gradient
      steps each kept only if the loss rises (30 at most; one gradient on `data` each).
      `mixing="equal"` (c_i = 1/√k) and `"sqrt"` (c_i ∝ √λ_i) fix the magnitudes instead,
      the signs then following the loss gradient (first-order ascent) and, of ±δ, the one
      that raises the loss more is applied. To second order the log-probabilities change
      by δᵀ g δ = norm² Σ c_i² λ_i (`record["predicted_change"]`, beside the measured mean
      squared change, the loss and the agreement with the undamaged predictions on
      `data`). On LeNet-300-100 (MNIST, norm 1, 1,000 training inputs, no labels) it
      takes the test accuracy from 98.2% to 15.3% (12.3–17.2%, 3 seeds), where 20 random
      directions of the same norm cost at most 0.05 points
      (`python -m benchmarks.damage_repair_users --seeds=0,1,2`).
    - `"bitflip"`: flips exactly one bit in each of `count` distinct weights (random
      positions among `bits`: any bit, `"sign"`, `"exponent"`, `"mantissa"` or a bit index)
      of their float32 representation, or of their int8 code (`bit_format="int8"`:
      symmetric per-tensor scale max|w|/127; the flipped weight becomes its dequantised code,
      other weights keep their float values).

    A model ending in a softmax is damaged as its twin returning logits is: the zeroing,
    Gaussian and bit-flip kinds never read the outputs, and `"eigen"` reads the
    log-probabilities, the same for both (the undamaged outputs recorded for `Repair` are
    the model's own).

    Zeroing kinds (`"nodes"`, `"weights"`) attach masks (`keras_fip.masks`), so later
    training and `Repair` keep the damaged weights at exactly zero. After a call, `op.record`
    says what was hit (units per layer, weight indices, bits with their old and new values)
    and the perturbation's Euclidean norm; `op.perturbation` holds the additive perturbation
    (per trainable variable) of `"gaussian"`/`"eigen"`. The undamaged network is recorded on
    the returned model (`keras_fip.damage_reference`), so `Repair` needs nothing else. Same
    seed, same damage; the input model is never changed.

    Args:
        kind: `"nodes"`, `"weights"`, `"gaussian"`, `"eigen"` or `"bitflip"`.
        fraction: Fraction in [0, 1] of units (`"nodes"`) or kernel entries (`"weights"`)
            to zero. Defaults to `None`.
        count: Number of units/entries to zero (instead of `fraction`), or of bits to flip
            (`"bitflip"`, required). Defaults to `None`.
        norm: Euclidean norm ≥ 0 of the `"gaussian"` or `"eigen"` perturbation. Defaults
            to `None`.
        layers: Names of the layers to damage, or `None` for all (the hidden Dense/Conv
            layers for `"nodes"`; Dense/Conv kernels for `"weights"`; all trainable weights
            for the others). Defaults to `None`.
        scope: `"global"` or `"per_layer"` selection for `"nodes"` and `"weights"`.
            Defaults to `"global"`.
        data: Inputs (array, `(x, y)` or `tf.data.Dataset`) the network serves: required
            for `"eigen"` (or carried by the model); otherwise only recorded, with the
            undamaged outputs, for `Repair`. Defaults to `None`.
        seed: Non-negative integer seed, or `None` for fresh randomness. Defaults to
            `None`.
        num_eigenpairs: k, eigenvectors of g mixed by `"eigen"`. Defaults to `20`.
        mixing: How `"eigen"` weighs the eigenvectors: `"ascent"` (the coefficients that
            raise the loss most), `"equal"` or `"sqrt"` (c_i ∝ √λ_i). Defaults to
            `"ascent"`.
        eigen_examples: Inputs of `data` over which g is averaged. Defaults to `1000`.
        eigen_tol: Relative eigenvalue accuracy of the Lanczos solve. Defaults to `1e-3`.
        outputs: Outputs g is measured on: `"log_probabilities"` (log-softmax of a logits
            model's outputs, log p of a probability model's: the same for both), `"logits"`
            (a logits model's outputs, log p of a probability model's) or
            `"probabilities"`. Defaults to `"log_probabilities"`.
        bits: Bits a flip may hit: `None` (any), `"sign"`, `"exponent"`, `"mantissa"`
            (float32 only) or a bit index. Defaults to `None`.
        bit_format: `"float32"` or `"int8"`. Defaults to `"float32"`.
        allow_dead_layers: Whether `"nodes"` may delete every unit of a layer (the network
            then computes a constant past it). Defaults to `False`.
        units: For `"nodes"`, the units to delete instead of `fraction`/`count`: a dict
            mapping layer names to unit indices (e.g. sampled among the undamaged units
            that `keras_fip.operations.hidden_units` lists). Defaults to `None`.
        **kwargs: `Operation` arguments (`name`, `verbose`, `callbacks`, `log_dir`).

    Returns:
        Calling the operation returns a new, damaged `keras.Model`.

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(64, input_shape=(8, 8, 1))
    >>> op = keras_fip.Damage("nodes", fraction=0.5, seed=0)
    >>> damaged = op(model)
    >>> len(op.record["units"]["dense_1"])
    32
    >>> adversary = keras_fip.Damage("eigen", norm=1.0, data=(x, y), num_eigenpairs=5,
    ...                              seed=0)
    >>> attacked = adversary(model)
    """

    def __init__(
        self,
        kind,
        fraction=None,
        count=None,
        norm=None,
        layers=None,
        scope="global",
        data=None,
        seed=None,
        num_eigenpairs=20,
        mixing="ascent",
        eigen_examples=1000,
        eigen_tol=1e-3,
        outputs="log_probabilities",
        bits=None,
        bit_format="float32",
        allow_dead_layers=False,
        units=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kind = self.check_choice(kind, "kind", KINDS)
        zeroing = kind in ("nodes", "weights")
        units = _check_units(units, kind, fraction, count)
        if units is None and zeroing and (fraction is None) == (count is None):
            raise ValueError(
                f"`kind={kind!r}` needs exactly one of `fraction` and `count`. "
                f"Received: fraction={fraction!r}, count={count!r}"
            )
        if fraction is not None:
            if not zeroing:
                raise ValueError(
                    "`fraction` applies to kind 'nodes' or 'weights' only. "
                    f"Received: fraction={fraction!r} with kind={kind!r}"
                )
            fraction = self.check_number(
                fraction, "fraction", low=0.0, high=1.0, low_inclusive=True
            )
        if kind == "bitflip" and count is None:
            raise ValueError(
                "`kind='bitflip'` needs `count`, the number of bits to flip. Received: count=None"
            )
        if count is not None:
            if kind in ("gaussian", "eigen"):
                raise ValueError(
                    "`count` applies to kind 'nodes', 'weights' or 'bitflip' only. "
                    f"Received: count={count!r} with kind={kind!r}"
                )
            count = self.check_number(count, "count", low=0, low_inclusive=True, integer=True)
        if kind in ("gaussian", "eigen"):
            if norm is None:
                raise ValueError(
                    f"`kind={kind!r}` needs `norm`, the perturbation's Euclidean norm. "
                    "Received: norm=None"
                )
            norm = self.check_number(norm, "norm", low=0.0, low_inclusive=True)
        elif norm is not None:
            raise ValueError(
                "`norm` applies to kind 'gaussian' or 'eigen' only. "
                f"Received: norm={norm!r} with kind={kind!r}"
            )
        layers = self.check_layer_names(layers)
        self.check_choice(scope, "scope", SCOPES)
        if seed is not None:
            seed = self.check_number(seed, "seed", low=0, low_inclusive=True, integer=True)
        num_eigenpairs = self.check_number(
            num_eigenpairs, "num_eigenpairs", low=1, low_inclusive=True, integer=True
        )
        self.check_choice(mixing, "mixing", MIXINGS)
        eigen_examples = self.check_number(
            eigen_examples, "eigen_examples", low=1, low_inclusive=True, integer=True
        )
        eigen_tol = self.check_number(eigen_tol, "eigen_tol", low=0.0, low_inclusive=True)
        self.check_choice(outputs, "outputs", OUTPUTS)
        self.check_choice(bit_format, "bit_format", faults.FORMATS)
        if bits is not None:
            width = faults.num_bits(bit_format)
            names = faults.BIT_CLASSES if bit_format == "float32" else ("sign",)
            valid = (
                bits in names
                if isinstance(bits, str)
                else (
                    isinstance(bits, (int, np.integer))
                    and not isinstance(bits, bool)
                    and 0 <= bits < width
                )
            )
            if not valid:
                raise ValueError(
                    f"`bits` must be None, one of {list(names)} or a bit index in "
                    f"[0, {width}) for bit_format={bit_format!r}. Received: bits={bits!r}"
                )
            bits = bits if isinstance(bits, str) else int(bits)
        if not isinstance(allow_dead_layers, bool):
            raise ValueError(
                "`allow_dead_layers` must be a boolean. "
                f"Received: allow_dead_layers={allow_dead_layers!r}"
            )
        self.fraction = fraction
        self.count = count
        self.norm = norm
        self.layers = layers
        self.scope = scope
        self.data = data
        self.seed = seed
        self.num_eigenpairs = num_eigenpairs
        self.mixing = mixing
        self.eigen_examples = eigen_examples
        self.eigen_tol = eigen_tol
        self.outputs = outputs
        self.bits = bits
        self.bit_format = bit_format
        self.allow_dead_layers = allow_dead_layers
        self.units = units
        self.record = None
        self.perturbation = None

    # Calling.

    def __call__(self, model):
        self.record = None
        self.perturbation = None
        self._earlier = damage_reference(model)
        try:
            return super().__call__(model)
        finally:
            self._earlier = None

    def call(self, model):
        # Undamaged state and the data it served
        selected = self._selected_layers(model)
        inputs, labels = self._inputs(model)
        undamaged = [np.array(v.numpy()) for v in model.weights]
        before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        old_masks = [masks_lib._mask_of(v) for v in model.trainable_variables]
        rng = np.random.default_rng(self.seed)
        self._reference_outputs = None

        # The damage itself
        damage = getattr(self, f"_damage_{self.kind}")
        record, zeroed = damage(model, selected, inputs, labels, rng)

        # What changed, and the undamaged network for Repair
        after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        record["kind"] = self.kind
        record["perturbation_norm"] = float(
            np.sqrt(sum(np.sum(np.square(b - a)) for a, b in zip(before, after)))
        )
        self.record = record
        self._attach_reference(model, undamaged, old_masks, zeroed, inputs)
        return model

    def _inputs(self, model):
        """`(x, y)` of `data` (or the inputs the model carries); `(None, None)` if none."""
        if self.kind == "eigen":
            data = self.resolve_data(self.data, model)
        else:
            data = self.data if self.data is not None else carried_data(model)
        if data is None:
            return None, None
        x, y = normalize_data(data, name="data", model=model)
        check_inputs_match_model(model, x)
        return x, y

    def _attach_reference(self, model, undamaged, old_masks, zeroed, inputs):
        variables = model.trainable_variables
        new_masks = [zeroed.get(id(v)) for v in variables]
        earlier = self._earlier
        if earlier is not None and len(earlier.weights) == len(undamaged):
            damage_masks = [
                a if b is None else (b if a is None else a & b)
                for a, b in zip(earlier.damage_masks, new_masks)
            ]
            reference = DamageReference(
                earlier.weights,
                earlier.masks,
                damage_masks,
                earlier.inputs,
                earlier.outputs,
                earlier.records + [self.record],
            )
        else:
            outputs = None
            if inputs is not None:
                outputs = self._reference_outputs
            reference = DamageReference(
                undamaged, old_masks, new_masks, inputs, outputs, [self.record]
            )
        attach_reference(model, reference)

    # Layer selection.

    def _selected_layers(self, model):
        """The layers named by `layers` (validated), or `None` for all."""
        everything = projection._layers(model)
        if self.layers is None:
            return None
        by_name = {layer.name: layer for layer in everything}
        unknown = [name for name in self.layers if name not in by_name]
        if unknown:
            raise ValueError(
                f"`layers` names layers that model `{model.name}` does not have: "
                f"{unknown}. Expected names among {sorted(by_name)}. "
                f"Received: layers={self.layers!r}"
            )
        return [by_name[name] for name in self.layers]

    def _variables_of(self, model, selected, kernels_only=False):
        """Trainable variables of the selected layers (kernels of Dense/Conv if asked)."""
        if kernels_only:
            pool = projection.prunable_variables(model)
        else:
            pool = list(model.trainable_variables)
        if selected is None:
            chosen = pool
        else:
            wanted = {id(w) for layer in selected for w in layer.trainable_weights}
            chosen = [v for v in pool if id(v) in wanted]
        if not chosen:
            what = "Dense/Conv kernels" if kernels_only else "trainable weights"
            raise ValueError(
                f"`layers` selects no {what} of model `{model.name}`. "
                f"Received: layers={self.layers!r}"
            )
        return chosen

    def _count(self, total, what):
        """`round(fraction·total)`, or `count` checked against `total`."""
        if self.count is None:
            return int(round(self.fraction * total))
        if self.count > total:
            raise ValueError(
                f"`count` must be at most the number of {what} ({total}). "
                f"Received: count={self.count}"
            )
        return self.count

    def _record_reference_outputs(self, model, inputs):
        if inputs is not None:
            self._reference_outputs = _predict(model, inputs)

    # The kinds.

    def _damage_nodes(self, model, selected, inputs, labels, rng):
        plans = self._unit_plans(model, selected)
        sizes = [plan.channels for plan in plans]

        # Which units: a seeded permutation's prefix (nested as the fraction grows)
        chosen = [[] for _ in plans]
        if self.units is not None:
            chosen = self._explicit_units(plans)
        elif self.scope == "global":
            total = int(sum(sizes))
            number = self._count(total, "hidden units")
            owners = np.repeat(np.arange(len(plans)), sizes)
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            for flat in rng.permutation(total)[:number]:
                chosen[owners[flat]].append(int(flat - offsets[owners[flat]]))
        else:
            for index, size in enumerate(sizes):
                number = self._count(size, f"units of layer `{plans[index].layer.name}`")
                chosen[index] = [int(u) for u in rng.permutation(size)[:number]]
        if not self.allow_dead_layers:
            for plan, units in zip(plans, chosen):
                if len(units) == plan.channels and plan.channels:
                    raise ValueError(
                        f"`fraction` would delete every unit of layer `{plan.layer.name}` "
                        f"({plan.channels} units): the network would be constant past it. "
                        "Lower `fraction`, use `scope='per_layer'`, or pass "
                        f"`allow_dead_layers=True`. Received: fraction={self.fraction!r}, "
                        f"count={self.count!r}"
                    )

        # Zero and mask
        self._record_reference_outputs(model, inputs)
        masks_by_id = {}
        for plan, units in zip(plans, chosen):
            for unit in units:
                plan.zero(masks_by_id, unit)
        zeroed = self._apply(model, masks_by_id)
        units = {plan.layer.name: sorted(u) for plan, u in zip(plans, chosen)}
        return {
            "units": units,
            "num_hit": int(sum(len(u) for u in chosen)),
            "num_units": int(sum(sizes)),
        }, zeroed

    def _explicit_units(self, plans):
        """The units named by `units`, checked against the layers' unit counts."""
        by_name = {plan.layer.name: index for index, plan in enumerate(plans)}
        chosen = [[] for _ in plans]
        for name, indices in self.units.items():
            if name not in by_name:
                raise ValueError(
                    f"`units` names layer `{name}`, which has no deletable hidden units. "
                    f"Expected names among {sorted(by_name)}. Received: units={self.units!r}"
                )
            plan = plans[by_name[name]]
            bad = [u for u in indices if u >= plan.channels]
            if bad:
                raise ValueError(
                    f"`units` names units {bad} of layer `{name}`, which has "
                    f"{plan.channels} units. Received: units={self.units!r}"
                )
            chosen[by_name[name]] = sorted(set(indices))
        return chosen

    def _unit_plans(self, model, selected):
        try:
            consumers, outputs = _graph(model)
            for layer in model.layers:
                if isinstance(layer, _UNIT_LAYERS):
                    layer.output  # noqa: B018 (raises for models without a graph)
        except (AttributeError, ValueError) as error:
            raise ValueError(
                "`kind='nodes'` traces the layer graph: `model` must be a Sequential or "
                f"functional model. Received: model={model.name} "
                f"({type(model).__name__}): {error}"
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
        if selected is not None:
            by_name = {plan.layer.name: plan for plan in plans}
            for layer in selected:
                if layer.name not in by_name:
                    reason = problems.get(layer.name, "it is not a top-level Dense or Conv layer")
                    raise ValueError(
                        f"`layers` names `{layer.name}`, whose units cannot be deleted: "
                        f"{reason}. Received: layers={self.layers!r}"
                    )
            plans = [by_name[layer.name] for layer in selected]
        if not plans:
            raise ValueError(
                f"`kind='nodes'` found no hidden Dense/Conv units in model `{model.name}` "
                f"(the output layer is never damaged). Skipped: {problems}"
            )
        return plans

    def _apply(self, model, masks_by_id):
        """Attaches the zeroing masks; returns them keyed by `id(variable)`."""
        keys = dict(zip((id(v) for v in model.weights), masks_lib._variable_keys(model.weights)))
        if masks_by_id:
            masks_lib.apply_masks(
                model, {keys[identity]: mask for identity, mask in masks_by_id.items()}
            )
        return masks_by_id

    def _free(self, variables):
        """Flat indices of each variable's entries not held at zero by a mask carried in
        (masked weights are absent from the network: damage never touches them)."""
        free = []
        for variable in variables:
            mask = masks_lib._mask_of(variable)
            size = int(np.prod(variable.shape, dtype=np.int64))
            free.append(np.arange(size) if mask is None else np.flatnonzero(mask))
        return free

    def _draw(self, free, rng, what, scope="global"):
        """A seeded prefix of a permutation of the free entries: flat indices per variable."""
        if scope == "global":
            pool = np.concatenate(free) if free else np.zeros(0, np.int64)
            owner = np.repeat(np.arange(len(free)), [f.size for f in free])
            chosen = rng.permutation(pool.size)[: self._count(pool.size, what)]
            return [np.sort(pool[chosen[owner[chosen] == i]]) for i in range(len(free))]
        return [np.sort(f[rng.permutation(f.size)[: self._count(f.size, what)]]) for f in free]

    def _damage_weights(self, model, selected, inputs, labels, rng):
        variables = self._variables_of(model, selected, kernels_only=True)
        free = self._free(variables)
        per_variable = self._draw(free, rng, "free kernel entries", self.scope)
        self._record_reference_outputs(model, inputs)
        masks_by_id, hit = {}, {}
        for variable, indices in zip(variables, per_variable):
            if indices.size == 0:
                continue
            mask = np.ones(variable.shape, bool)
            mask.reshape(-1)[indices] = False
            masks_by_id[id(variable)] = mask
            hit[variable.path] = indices.tolist()
        zeroed = self._apply(model, masks_by_id)
        return {
            "weights": hit,
            "num_hit": int(sum(len(i) for i in per_variable)),
            "num_weights": int(sum(f.size for f in free)),
        }, zeroed

    def _add(self, variables, perturbation):
        for variable, delta in zip(variables, perturbation):
            variable.assign((variable.numpy().astype(np.float64) + delta).astype(variable.dtype))

    def _damage_gaussian(self, model, selected, inputs, labels, rng):
        variables = self._variables_of(model, selected)
        free = self._free(variables)
        self._record_reference_outputs(model, inputs)
        noise = []
        for variable, indices in zip(variables, free):
            values = np.zeros(int(np.prod(variable.shape, dtype=np.int64)))
            values[indices] = rng.standard_normal(indices.size)
            noise.append(values.reshape(variable.shape))
        length = np.sqrt(sum(np.sum(np.square(n)) for n in noise))
        perturbation = [n * (self.norm / length) if length > 0 else n for n in noise]
        self._add(variables, perturbation)
        self._set_perturbation(model, variables, perturbation)
        return {"num_hit": int(sum(f.size for f in free)), "norm": self.norm}, {}

    def _set_perturbation(self, model, variables, perturbation):
        by_id = {id(v): p for v, p in zip(variables, perturbation)}
        self.perturbation = [
            by_id.get(id(v), np.zeros(v.shape)).astype(v.dtype) for v in model.trainable_variables
        ]

    def _damage_bitflip(self, model, selected, inputs, labels, rng):
        variables = self._variables_of(model, selected)
        per_variable = self._draw(self._free(variables), rng, "free weights")
        self._record_reference_outputs(model, inputs)
        positions = np.asarray(faults.bit_positions(self.bits, self.bit_format))
        flips = []
        for variable, indices in zip(variables, per_variable):
            if indices.size == 0:
                continue
            values = variable.numpy().astype(np.float32)
            chosen = rng.choice(positions, size=indices.size)
            old = values.reshape(-1)[indices].copy()
            if self.bit_format == "float32":
                new = faults.flip_float32(old, chosen)
            else:
                new = faults.flip_int8(old, chosen, faults.int8_scale(values))
            values.reshape(-1)[indices] = new
            variable.assign(values.astype(variable.dtype))
            flips.extend(
                {
                    "variable": variable.path,
                    "index": int(i),
                    "bit": int(b),
                    "before": float(o),
                    "after": float(n),
                }
                for i, b, o, n in zip(indices, chosen, old, new)
            )
        return {"bits": flips, "num_hit": len(flips), "bit_format": self.bit_format}, {}

    def _damage_eigen(self, model, selected, inputs, labels, rng):
        variables = self._variables_of(model, selected)
        examples = data_adapter.take(inputs, slice(0, self.eigen_examples))
        example_labels = None if labels is None else labels[: self.eigen_examples]
        kind = model_output_kind(model, examples)
        # What the metric, the loss and the harm read: the log-probabilities by default.
        view = _log_probability_model(model, kind)
        if self.outputs == "log_probabilities":
            metric = MetricOperator(view, examples, outputs="logits")
        else:
            metric = MetricOperator(model, examples, outputs=self.outputs)

        # Top eigenpairs of g on the data (restricted to the free selected coordinates)
        operator, unflatten = self._restricted(model, metric, variables)
        k = min(self.num_eigenpairs, max(1, operator.shape[0] - 1))
        pairs = top_eigenpairs(operator, k=k, tol=self.eigen_tol, seed=self.seed or 0)
        values = np.clip(pairs.values, 0.0, None)
        self._record_reference_outputs(model, inputs)
        reference = _predict(view, examples)
        # The labels the loss reads: the data's, else the undamaged network's predictions.
        targets = (
            np.asarray(example_labels)
            if example_labels is not None
            else np.argmax(reference, axis=-1)
        )
        start = [v.numpy() for v in variables]

        def perturbation_of(coefficients):
            return unflatten(pairs.vectors @ (self.norm * coefficients))

        def loss_at(coefficients):
            self._add(variables, perturbation_of(coefficients))
            loss = self._harm(view, examples, targets, reference)
            self._restore(variables, start)
            return loss

        if self.mixing == "ascent":
            weights, signs, sign, steps = self._ascent(
                view, variables, examples, targets, unflatten, pairs.vectors, loss_at, start
            )
        else:
            if self.mixing == "equal":
                weights = np.full(k, 1.0 / np.sqrt(k))
            else:
                roots = np.sqrt(values)
                weights = (
                    roots / np.linalg.norm(roots) if np.any(roots) else np.full(k, 1.0 / np.sqrt(k))
                )
            # Signs: first-order ascent of the task loss (labels, else predictions)
            gradient = self._loss_gradient(view, variables, examples, targets)
            gradient = np.concatenate(
                [g.ravel()[f] for g, f in zip(gradient, self._free(variables))]
            )
            signs = np.where(pairs.vectors.T @ gradient >= 0, 1.0, -1.0)
            # Of ±δ, apply the one that raises the loss more
            scores = {s: loss_at(s * weights * signs) for s in (1.0, -1.0)}
            sign = max(scores, key=scores.get)
            steps = 0
        coefficients = sign * weights * signs
        direction = pairs.vectors @ coefficients
        scale = self.norm / max(np.linalg.norm(direction), 1e-300)
        perturbation = unflatten(direction * scale)
        self._add(variables, perturbation)
        self._set_perturbation(model, variables, perturbation)
        after = _predict(view, examples)
        flat = np.reshape(after - reference, (data_adapter.num_examples(examples), -1))
        return {
            "num_hit": int(operator.shape[0]),
            "norm": self.norm,
            "eigenvalues": pairs.values.tolist(),
            "coefficients": (
                np.abs(coefficients) / max(np.linalg.norm(coefficients), 1e-300)
            ).tolist(),
            "signs": np.where(coefficients >= 0, 1, -1).astype(int).tolist(),
            "sign": int(sign),
            "num_matvecs": int(pairs.num_matvecs),
            "ascent_steps": int(steps),
            "predicted_change": float(
                self.norm**2
                * np.sum((coefficients / max(np.linalg.norm(coefficients), 1e-300)) ** 2 * values)
            ),
            "measured_change": float(np.mean(np.sum(np.square(flat), axis=1))),
            "loss": float(self._harm(view, examples, targets, reference)),
            "agreement": float(np.mean(np.argmax(after, axis=-1) == np.argmax(reference, axis=-1))),
        }, {}

    def _ascent(self, view, variables, examples, targets, unflatten, vectors, loss_at, start):
        """Coefficients on the unit sphere of the top eigenvectors' span that raise the
        loss: the best of ±v_i, then Riemannian gradient steps (each kept only if the loss
        rises). Returns `(weights, signs, 1.0, steps taken)`."""
        k = vectors.shape[1]
        free = self._free(variables)
        candidates = []
        for index in range(k):
            for sign in (1.0, -1.0):
                coefficients = np.zeros(k)
                coefficients[index] = sign
                candidates.append((loss_at(coefficients), index, sign, coefficients))
        loss, _, _, coefficients = max(candidates, key=lambda c: (c[0], -c[1], c[2]))
        step, taken = _ASCENT_STEP, 0
        for _ in range(_ASCENT_ITERATIONS if k > 1 else 0):
            self._add(variables, unflatten(vectors @ (self.norm * coefficients)))
            gradient = self._loss_gradient(view, variables, examples, targets)
            self._restore(variables, start)
            gradient = vectors.T @ np.concatenate([g.ravel()[f] for g, f in zip(gradient, free)])
            tangent = gradient - (gradient @ coefficients) * coefficients
            length = np.linalg.norm(tangent)
            if length <= 1e-12 * max(np.linalg.norm(gradient), 1e-300):
                break
            while step > _ASCENT_MIN_STEP:
                candidate = coefficients + step * tangent / length
                candidate /= np.linalg.norm(candidate)
                value = loss_at(candidate)
                if value > loss:
                    coefficients, loss, taken = candidate, value, taken + 1
                    step = min(2.0 * step, _ASCENT_STEP)
                    break
                step /= 2.0
            else:
                break
        return np.abs(coefficients), np.where(coefficients >= 0, 1.0, -1.0), 1.0, taken

    def _restricted(self, model, metric, variables):
        """g on the free coordinates of `variables`: (LinearOperator, unflatten to them)."""
        everything = model.trainable_variables
        free = dict(zip((id(v) for v in variables), self._free(variables)))
        sizes = [int(np.prod(v.shape, dtype=np.int64)) for v in everything]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        index = np.concatenate(
            [free[id(v)] + offset for v, offset in zip(everything, offsets) if id(v) in free]
        )
        full = metric.as_linear_operator()
        if index.size == metric.num_params:
            operator = full
        else:

            def apply(vector):
                padded = np.zeros(metric.num_params)
                padded[index] = np.ravel(vector)
                return full.matvec(padded)[index]

            operator = scipy.sparse.linalg.LinearOperator(
                (index.size, index.size), matvec=apply, rmatvec=apply, dtype=np.float64
            )

        def unflatten(vector):
            padded = np.zeros(metric.num_params)
            padded[index] = vector
            pieces = np.split(padded, np.cumsum(sizes)[:-1])
            return [piece.reshape(v.shape) for v, piece in zip(everything, pieces) if id(v) in free]

        return operator, unflatten

    def _loss_gradient(self, model, variables, x, y):
        """Gradient of the mean cross-entropy of `model`'s logits on `(x, y)`: one array
        per variable."""
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

        def summed_gradient(batch):
            inputs, labels = batch
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(inputs, training=False))
            return tape.gradient(
                loss,
                [v.value for v in variables],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        # Summed per replica under a strategy (distributed variables are read there).
        total = distribute.summed_over_batches(summed_gradient, (x, y), 1024)
        return [piece / data_adapter.num_examples(x) for piece in total]

    def _harm(self, model, x, y, reference):
        """Mean cross-entropy of `model`'s logits on `(x, y)`."""
        del reference  # The labels (or the undamaged predictions) carry it.
        loss = keras.losses.sparse_categorical_crossentropy(y, _predict(model, x), from_logits=True)
        return float(np.mean(keras.ops.convert_to_numpy(loss)))

    @staticmethod
    def _restore(variables, values):
        for variable, value in zip(variables, values):
            variable.assign(value)

    # Serialisation.

    def get_config(self):
        config = super().get_config()
        config.update(
            kind=self.kind,
            fraction=self.fraction,
            count=self.count,
            norm=self.norm,
            layers=self.layers,
            scope=self.scope,
            data=None,  # Data are not serialised; pass them again after from_config.
            seed=self.seed,
            num_eigenpairs=self.num_eigenpairs,
            mixing=self.mixing,
            eigen_examples=self.eigen_examples,
            eigen_tol=self.eigen_tol,
            outputs=self.outputs,
            bits=self.bits,
            bit_format=self.bit_format,
            allow_dead_layers=self.allow_dead_layers,
            units=self.units,
        )
        return config
