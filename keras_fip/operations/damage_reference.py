"""`DamageReference`: the undamaged network behind a damaged model, saved with it."""

import json
import os

import keras
import numpy as np

from keras_fip.core import masks as masks_lib
from keras_fip.core.copy import strip_masks

# The attribute of a damaged model that holds its `DamageReference` (saved in `.keras`).
_STATE_ATTRIBUTE = "_keras_fip_damage_reference"


class DamageReference:
    """The undamaged network behind a damaged model: what `keras_fip.Repair` walks back to.

    `keras_fip.Damage` records one on every model it returns
    (`keras_fip.damage_reference(model)`), and `Repair` on every model it repairs. It
    lives on that model object (not on its copies) and is written into the model's
    `.keras` file by `model.save(...)` (beside the weights); `keras.saving.load_model`
    ignores it and `keras_fip.load_damaged_model` loads the model with it, so a repair can
    happen in another process. Everything is saved, the recorded `inputs` and `outputs`
    included (pass `Damage` only the `data` a repair needs: a whole training set makes a
    large file). Damage applied to an already damaged model keeps the *first* undamaged
    network and accumulates the damage masks and the records, so a repair always aims at
    the network before any damage.

    Args:
        weights: List of numpy arrays aligned with the damaged model's `model.weights`
            (trainable and non-trainable): the undamaged values.
        masks: List aligned with `model.trainable_variables`: the boolean mask each
            variable carried before the damage, or `None`.
        damage_masks: List aligned with `model.trainable_variables`: `False` where damage
            zeroed a weight and holds it at zero (`keras_fip.faults.Nodes` and
            `Weights`), or `None` for a variable no zeroing damage touched.
        inputs: The inputs the undamaged network served (the damage's `data` or the
            inputs its model carried), or `None`. Defaults to `None`.
        outputs: The undamaged network's outputs on `inputs` (inference mode), or `None`.
            Defaults to `None`.
        records: List of the record dicts of every damage (and repair) applied since.
            Defaults to `None` (none).

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           keras.layers.Dense(2)])
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
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
        self._check_layout(damaged)
        restored = strip_masks(damaged)
        for variable, value in zip(restored.weights, self.weights):
            variable.assign(value)
        if any(mask is not None for mask in self.masks):
            masks_lib.apply_masks(restored, self.masks)
        return restored

    def perturbation(self, damaged):
        """The damage as an additive perturbation: `damaged`'s weights minus the undamaged.

        Args:
            damaged: The damaged model this reference belongs to. Not changed.

        Returns:
            A list aligned with `damaged.trainable_variables` of numpy arrays (in the
            variables' dtypes): the weights of `damaged` minus the undamaged weights.

        Examples:

            >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            >>> damaged = keras_fip.Damage(keras_fip.faults.Gaussian(norm=0.5), seed=0)(model)
            >>> delta = keras_fip.damage_reference(damaged).perturbation(damaged)
            >>> round(float(np.sqrt(sum(np.sum(d.astype("float64") ** 2) for d in delta))), 4)
            0.5
        """
        self._check_layout(damaged)
        index = {id(weight): i for i, weight in enumerate(damaged.weights)}
        return [
            (
                np.asarray(variable.numpy(), np.float64)
                - np.asarray(self.weights[index[id(variable)]], np.float64)
            ).astype(keras.backend.standardize_dtype(variable.dtype))
            for variable in damaged.trainable_variables
        ]

    def _check_layout(self, damaged):
        if not isinstance(damaged, keras.Model) or len(damaged.weights) != len(self.weights):
            raise ValueError(
                f"`damaged` must be a model with the reference's weight layout "
                f"({len(self.weights)} weights). Received: damaged={damaged!r}"
            )


def damage_reference(model):
    """The undamaged network recorded on a damaged (or repaired) model, or `None`.

    Args:
        model: A `keras.Model`.

    Returns:
        A `DamageReference` (undamaged weights, masks before and after the damage, the
        inputs the network served and its outputs on them, the damage records), or `None`
        when `model` was not returned by `Damage`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> damaged = keras_fip.Damage("gaussian", seed=0)(model)
        >>> keras_fip.damage_reference(damaged).records[0]["kind"]
        'gaussian'
        >>> keras_fip.damage_reference(model) is None
        True
    """
    state = getattr(model, _STATE_ATTRIBUTE, None) if isinstance(model, keras.Model) else None
    return state.reference if isinstance(state, _ReferenceState) else None


def attach_reference(model, reference):
    """Records `reference` on `model` (in place), replacing any earlier one.

    Args:
        model: A `keras.Model`, changed in place: `keras_fip.damage_reference(model)` is
            then `reference`, and `model.save` writes it.
        reference: A `DamageReference` with `model`'s weight layout.
    """
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

    Examples:

        >>> import os, tempfile
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           keras.layers.Dense(2)])
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
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
