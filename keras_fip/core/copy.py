"""Deep copies of Keras models: same architecture, same weights, same masks."""

import os
import tempfile

import keras

from keras_fip.core import layers as layers_lib
from keras_fip.core import masks as masks_lib


def copy_model(model):
    """Returns a deep copy of a model with equal weights and masks.

    Sequential and functional models are cloned layer by layer
    (`keras.models.clone_model`, nested models included); subclassed models, and
    functional subclasses that cloning would turn into a plain `Functional` (a KerasHub
    task keeps its class and its preprocessor), go through
    `keras.saving.serialize_keras_object` / `deserialize_keras_object`, so they must be
    registered serialisable with a `get_config`. All weights are copied, trainable and
    non-trainable (for example BatchNormalization moving statistics), and every
    `MaskConstraint` is re-attached to the matching variable, so masked weights stay
    exactly zero under later training (and `.keras` files of the copy keep them; see
    `keras_fip.engine.apply_masks`). A compiled model's copy is compiled as `compile`
    left it (same optimizer settings with fresh state, same loss and metrics) when its
    compile config round-trips and its class keeps Keras's `compile`; otherwise it is
    not compiled. The input model is not changed.

    Args:
        model: A `keras.Model`.

    Returns:
        A new `keras.Model` whose outputs equal the input's.

    Examples:

        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> twin = copy_model(model)
        >>> x = np.ones((1, 3), "float32")
        >>> bool(np.array_equal(twin(x), model(x)))
        True
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")

    # Rebuild the architecture.
    try:
        clone = keras.models.clone_model(model, recursive=True)
    except Exception as error:
        raise ValueError(
            f"Cannot copy model `{model.name}` ({type(model).__name__}): a subclassed "
            "model must be registered with `@keras.saving.register_keras_serializable` "
            "and implement `get_config` so that `from_config(get_config())` rebuilds "
            f"it. Cloning failed with: {error}"
        ) from error
    if model.built and model.weights and not clone.weights:
        raise ValueError(
            f"Cannot copy model `{model.name}` ({type(model).__name__}): the copy was "
            "not built. Implement `build` (or `build_from_config`) so that "
            "deserialisation builds the model."
        )

    # Copy every weight, trainable and non-trainable.
    source, target = model.weights, clone.weights
    if (
        _weights_differ(source, target)
        or getattr(model, "carries_masks", False)
        or type(clone) is not type(model)
    ):
        # Layer-by-layer cloning drops the class of a functional subclass whose
        # constructor is not `(inputs, outputs)`, such as a KerasHub task with its
        # preprocessor, and of a model that records its masks in its own config
        # (`carries_masks`); and it unties weights shared between layers (KerasHub's
        # masked-LM head reuses the token embedding). The model's own config does
        # neither; where it cannot rebuild the model, the layer-by-layer clone stays.
        try:
            rebuilt = keras.saving.deserialize_keras_object(
                keras.saving.serialize_keras_object(model)
            )
            _copy_assets(model, rebuilt)
            clone, target = rebuilt, rebuilt.weights
        except Exception:
            pass
    if _weights_differ(source, target):
        raise ValueError(
            f"Cannot copy model `{model.name}`: its rebuilt copy has different weights "
            f"({[tuple(v.shape) for v in target][:6]}...) from the original "
            f"({[tuple(v.shape) for v in source][:6]}...)."
        )
    for original, copied in zip(source, target):
        copied.assign(original.value)
    _compile_like(clone, model)

    # Re-attach the masks (also those a parent layer's config cannot carry).
    variable_masks = [
        (copied, masks_lib.mask_of(original))
        for original, copied in zip(source, target)
        if masks_lib.mask_of(original) is not None
    ]
    if variable_masks:
        masks_lib.attach_masks(clone, variable_masks, warn=False)
    return clone


def _copy_assets(source, target):
    """Copies the assets of `source`'s layers into `target`'s (rebuilt from its config):
    a layer's assets, such as a KerasHub tokenizer's
    vocabulary, are kept out of its config and travel through `save_assets` /
    `load_assets`, as in a `.keras` file. The layers are every layer under the model and
    under its `preprocessor` (a KerasHub task's, which `model.layers` does not list)."""

    def with_assets(model):
        roots = [model] + [getattr(model, "preprocessor", None)]
        found = []
        for root in roots:
            if isinstance(root, keras.layers.Layer):
                found += layers_lib.all_layers(root, include_self=root is not model)
        return [layer for layer in found if hasattr(layer, "save_assets")]

    # Matched by class and name: a layer built on first call (a preprocessor's packer)
    # may not exist yet in the copy, so positions can differ.
    targets = {(type(layer), layer.name): layer for layer in with_assets(target)}
    pairs = [
        (layer, targets[(type(layer), layer.name)])
        for layer in with_assets(source)
        if (type(layer), layer.name) in targets
    ]
    if not pairs:
        return
    with tempfile.TemporaryDirectory() as directory:
        for index, (original, copied) in enumerate(pairs):
            path = os.path.join(directory, str(index))
            os.makedirs(path)
            original.save_assets(path)
            copied.load_assets(path)


def _compile_like(clone, model):
    """Compiles `clone` with `model`'s compile config (a fresh optimizer), when it can."""
    if not model.compiled or clone.compiled or type(clone).compile is not keras.Model.compile:
        return
    try:
        config = keras.saving.deserialize_keras_object(model.get_compile_config(), safe_mode=False)
        clone.compile(**config)
    except Exception:
        # A loss or metric that does not round-trip through its config: the copy stays
        # uncompiled, as `keras.models.clone_model` leaves it.
        return


def _weights_differ(source, target):
    return len(source) != len(target) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(source, target)
    )


def strip_masks(model):
    """Returns a copy of a model without masks: plain layers, zeros kept.

    The undo of `apply_masks` (the analogue of tfmot's `strip_pruning`): a copy
    (`copy_model`) whose `MaskConstraint`s are replaced by the user constraints they wrapped
    (`keras_fip.core.masks.remove_masks`). Masked weights are still exactly zero, but
    nothing keeps them there any more. The input model is not changed.

    Args:
        model: A built `keras.Model`.

    Returns:
        A new `keras.Model`.

    Examples:

        >>> from keras_fip.core.masks import apply_masks
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> apply_masks(model, {model.layers[0].kernel.path: np.eye(3, 2, dtype=bool)})
        >>> keras_fip.masks(strip_masks(model))
        {}
    """
    return masks_lib.remove_masks(copy_model(model))
