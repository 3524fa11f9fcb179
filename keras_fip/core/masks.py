"""Masks: weights held at exactly zero, carried by the model and kept by any optimizer.

A mask lives on the masked variable as a `MaskConstraint`, set both on the variable
(`variable.constraint`, applied by every Keras optimizer after each update) and on the
owning layer's constructor-level attribute (`kernel_constraint`, `bias_constraint`, ...), so
it is part of the layer config: it travels with copies and survives `.keras` save/load.

Some sub-layers are built by a layer's (or a model's) own constructor, not from a config
that `.keras` files save: the attention and feed-forward layers of a user's transformer
block subclass, the inner layers of KerasHub's `TransformerEncoder` and `BertBackbone`.
The masks of their variables ride in the compile config of the model holding them: that
model is compiled with a `MaskedOptimizer` recording them (`attached_masks`), which Keras
rebuilds when `keras.saving.load_model` restores the compile state, and whose `build`
re-attaches them to the variables as `MaskConstraint`s, so later compiles with any optimizer
keep them too.

`MaskedOptimizer` additionally masks gradients and re-projects after each update, so
optimizer state (momentum, Adam moments) cannot leak non-zeros into masked weights.
"""

import base64
import json
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_fip.core import layers as layers_lib

# Variables whose constraint attribute is not `f"{variable.name}_constraint"`.
_IRREGULAR_VARIABLE_NAMES = {
    "depthwise_kernel": "depthwise_constraint",
    "pointwise_kernel": "pointwise_constraint",
}
# Layers whose `kernel` variable is constrained by `depthwise_constraint`.
_DEPTHWISE_LAYERS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def graph_mask(mask):
    """A mask as it enters a traced function: a boolean numpy mask as bytes (a graph
    constant copied in one block, where a boolean array is converted element by element);
    anything else as it is.

    Args:
        mask: A mask (a numpy array, tensor or variable).

    Returns:
        The same values, ready for `ops.cast`.

    Examples:

        >>> graph_mask(np.array([True, False])).dtype
        dtype('uint8')
    """
    if isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        return mask.view(np.uint8)
    return mask


def encode_mask(mask):
    """Packs a boolean mask into a JSON-friendly dict (shape + base64 of packed bits)."""
    mask = np.asarray(mask, dtype=bool)
    bits = np.packbits(mask.ravel())
    return {
        "shape": [int(d) for d in mask.shape],
        "bits": base64.b64encode(bits.tobytes()).decode("ascii"),
    }


def decode_mask(config):
    """Inverse of `encode_mask`."""
    shape = tuple(int(d) for d in config["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    bits = np.frombuffer(base64.b64decode(config["bits"]), dtype=np.uint8)
    return np.unpackbits(bits, count=size).astype(bool).reshape(shape)


def _as_bool_mask(mask, argument_name):
    """Validates an array-like of booleans or 0/1 values and returns a bool array."""
    if isinstance(mask, dict) and set(mask) == {"shape", "bits"}:
        return decode_mask(mask)
    try:
        array = np.asarray(mask.numpy() if hasattr(mask, "numpy") else mask)
    except Exception as error:
        raise ValueError(
            f"`{argument_name}` must be an array of booleans or 0/1 values. "
            f"Received: {argument_name}={mask!r}"
        ) from error
    if array.dtype == bool:
        return array.copy()
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"`{argument_name}` must be an array of booleans or 0/1 values. "
            f"Received: {argument_name} with dtype {array.dtype}"
        )
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(
            f"`{argument_name}` must contain only 0/1 values (1 keeps a weight, 0 "
            f"holds it at zero). Received: {argument_name} with values "
            f"{np.unique(array)[:5]}"
        )
    return array.astype(bool)


def _get_constraint(constraint):
    """`keras.constraints.get(constraint)`, with an error naming the argument."""
    try:
        return keras.constraints.get(constraint)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`constraint` must be `None`, a `keras.constraints.Constraint`, its name "
            f"or its config. Received: constraint={constraint!r}"
        ) from error


@keras.saving.register_keras_serializable(package="keras_fip")
class MaskConstraint(keras.constraints.Constraint):
    """Holds the masked entries of a weight at exactly zero.

    Multiplies the weight by a fixed boolean mask after an optional user constraint. Keras
    optimizers apply `variable.constraint` after every update, and layers pass their
    `*_constraint` arguments to the variables they build, so a model carrying this
    constraint keeps its zeros under any optimizer, through `keras.models.clone_model` and
    through `.keras` save/load. The mask is serialised compactly (bits packed, base64), so
    the config stays small even for millions of weights.

    Args:
        mask: Boolean array (or 0/1 values) of the weight's shape; `True` keeps a weight,
            `False` holds it at zero. The packed dict produced by `get_config` is also
            accepted.
        constraint: Optional user constraint applied before the mask (a
            `keras.constraints.Constraint`, its name or its config). Defaults to `None`.

    Returns:
        A callable `w -> constraint(w) * mask`.

    Examples:

        >>> import numpy as np
        >>> constraint = MaskConstraint(np.array([[True, False], [False, True]]))
        >>> np.asarray(constraint(np.ones((2, 2), "float32"))).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, mask, constraint=None):
        self.mask = _as_bool_mask(mask, "mask")
        if isinstance(constraint, MaskConstraint):
            raise ValueError(
                "`constraint` must be a user constraint, not another MaskConstraint; "
                "combine masks with `&` instead. "
                f"Received: constraint={constraint!r}"
            )
        self.constraint = _get_constraint(constraint)
        # A `_CompileRecord` when only a model's compile config carries this mask.
        self._compile_record = None

    def __call__(self, w):
        if self._compile_record is not None:
            self._compile_record.check()
        if self.constraint is not None:
            w = self.constraint(w)
        if tuple(w.shape) != self.mask.shape:
            raise ValueError(
                f"MaskConstraint has a mask of shape {self.mask.shape} but was applied to "
                f"a weight of shape {tuple(w.shape)}."
            )
        return ops.multiply(w, ops.cast(graph_mask(self.mask), w.dtype))

    def get_config(self):
        return {
            "mask": encode_mask(self.mask),
            "constraint": (
                None if self.constraint is None else keras.constraints.serialize(self.constraint)
            ),
        }


@keras.saving.register_keras_serializable(package="keras_fip")
class CompositeMaskConstraint(keras.constraints.Constraint):
    """The masks of the weights a composite layer builds for its sub-layers.

    A composite layer such as `MultiHeadAttention` builds its sub-layers (`query`, `key`,
    `value`, `attention_output`) in its own code and hands them one constraint per kind
    (`kernel_constraint`, `bias_constraint`), which is what its config saves. Set on the
    composite layer, this constraint carries one mask per sub-layer variable, keyed by the
    variable's path inside the composite (`"query/kernel"`), so the masks travel with the
    composite's config through `.keras` save/load. After loading, every sub-layer variable
    holds this constraint, and Keras optimizers call it with the variable itself
    (`variable.constraint(variable)`), from whose path it picks the variable's mask.

    Args:
        masks: Dict mapping paths inside the composite layer to boolean masks (or their
            packed configs).
        constraint: Optional user constraint applied before the mask (the one the
            composite layer had). Defaults to `None`.

    Examples:

        >>> import numpy as np
        >>> constraint = CompositeMaskConstraint({"query/kernel": np.eye(2, dtype=bool)})
        >>> constraint.mask_for("model/attention/query/kernel").tolist()
        [[True, False], [False, True]]
    """

    def __init__(self, masks, constraint=None):
        if not isinstance(masks, dict) or not masks:
            raise ValueError(
                "`masks` must be a non-empty dict mapping paths inside the composite "
                f"layer to boolean masks. Received: masks={masks!r}"
            )
        self.masks = {
            str(key): _as_bool_mask(value, f"masks[{key!r}]") for key, value in masks.items()
        }
        if isinstance(constraint, (MaskConstraint, CompositeMaskConstraint)):
            raise ValueError(
                "`constraint` must be a user constraint, not a mask constraint. "
                f"Received: constraint={constraint!r}"
            )
        self.constraint = _get_constraint(constraint)

    def mask_for(self, path):
        """The mask of the variable at `path` (a full variable path), or `None`."""
        if not path:
            return None
        for key, mask in self.masks.items():
            if path == key or path.endswith("/" + key):
                return mask
        return None

    def __call__(self, w):
        if self.constraint is not None:
            w_constrained = self.constraint(w)
        else:
            w_constrained = w
        mask = self.mask_for(getattr(w, "path", None))
        if mask is None:
            # A plain tensor (no path): use the mask of its shape if only one fits.
            fitting = [m for m in self.masks.values() if m.shape == tuple(w.shape)]
            if len(fitting) != 1:
                return w_constrained
            mask = fitting[0]
        return ops.multiply(w_constrained, ops.cast(graph_mask(mask), w_constrained.dtype))

    def get_config(self):
        return {
            "masks": {key: encode_mask(mask) for key, mask in self.masks.items()},
            "constraint": (
                None if self.constraint is None else keras.constraints.serialize(self.constraint)
            ),
        }


# Finding the layer attribute behind a variable.


def _variable_owners(model):
    """Maps `id(variable)` to `(owning_layer, ancestors)`, ancestors innermost first."""
    owners = {}

    def visit(layer, ancestors, seen):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for child in layers_lib.sublayers(layer):
            visit(child, (layer,) + ancestors, seen)
        for variable in layer.weights:
            # Deepest owner wins: children were visited first.
            owners.setdefault(id(variable), (layer, ancestors))

    visit(model, (), set())
    return owners


def _config_text(layer):
    """`layer.get_config()` as JSON text, or `""` when it has none."""
    try:
        return json.dumps(layer.get_config(), default=str)
    except Exception:
        return ""


def _constraint_attribute(layer, variable):
    """Name of the layer attribute that holds `variable`'s constraint, or raises."""
    name = variable.name
    if name == "kernel" and isinstance(layer, _DEPTHWISE_LAYERS):
        attribute = "depthwise_constraint"
    else:
        attribute = _IRREGULAR_VARIABLE_NAMES.get(name, f"{name}_constraint")
    if not hasattr(layer, attribute):
        raise ValueError(
            f"Cannot mask variable `{variable.path}`: its layer `{layer.name}` "
            f"({type(layer).__name__}) has no `{attribute}` attribute to carry the mask. "
            "Masks are supported on the weights of standard layers (Dense, Conv, "
            "DepthwiseConv, BatchNormalization, LayerNormalization, Embedding, "
            "EinsumDense, MultiHeadAttention)."
        )
    return attribute


def variable_keys(variables):
    """Unique keys for `variables`: `variable.path`, with `:k` appended to the k-th repeat.

    Repeats happen when identical sub-models (for example ensemble members) were built
    outside a common name scope.
    """
    counts = {}
    keys = []
    for variable in variables:
        count = counts.get(variable.path, 0)
        counts[variable.path] = count + 1
        keys.append(variable.path if count == 0 else f"{variable.path}:{count}")
    return keys


class _Untracked:
    """Holds a value out of sight of Keras's attribute tracking (no variable capture)."""

    def __init__(self, value):
        self.value = value


def mask_of(variable):
    constraint = variable.constraint
    if isinstance(constraint, MaskConstraint):
        return constraint.mask
    if isinstance(constraint, CompositeMaskConstraint):
        return constraint.mask_for(variable.path)
    return None


def _user_constraint(constraint):
    """The user constraint a mask constraint wraps (or `constraint` itself)."""
    if isinstance(constraint, (MaskConstraint, CompositeMaskConstraint)):
        return constraint.constraint
    return constraint


def _relative_path(variable, layer):
    """`variable.path` after the `layer.name` segment (`"query/kernel"`), or `None`."""
    segments = variable.path.split("/")
    if layer.name not in segments[:-1]:
        return None
    index = len(segments) - 2 - segments[-2::-1].index(layer.name)
    return "/".join(segments[index + 1 :])


def _carry_in_composite(composite, variable, mask, config_text):
    """Puts `mask` on the composite layer's forwarded constraint attribute, if it has one.

    Returns `True` when the composite's config will carry the mask.
    """
    key = f"{variable.name}_constraint"
    if f'"{key}"' not in config_text:
        return False
    attribute = next((a for a in (f"_{key}", key) if hasattr(composite, a)), None)
    relative = _relative_path(variable, composite)
    if attribute is None or relative is None:
        return False
    existing = getattr(composite, attribute)
    carried = dict(existing.masks) if isinstance(existing, CompositeMaskConstraint) else {}
    carried[relative] = mask
    setattr(
        composite,
        attribute,
        CompositeMaskConstraint(carried, constraint=_user_constraint(existing)),
    )
    return True


def attach_masks(model, variable_masks, warn=True):
    """Attaches `[(variable, bool mask)]` to `model` in place and zeroes the weights.

    Masks that no layer config carries are recorded in the compile config of a model
    holding them (`_carry_in_compile_configs`); a warning names those nothing can carry.
    """
    owners = _variable_owners(model)
    # Resolve every attribute before changing anything.
    plan = []
    for variable, mask in variable_masks:
        if id(variable) not in owners:
            raise ValueError(f"Variable `{variable.path}` does not belong to model `{model.name}`.")
        layer, ancestors = owners[id(variable)]
        attribute = _constraint_attribute(layer, variable)
        if tuple(variable.shape) != mask.shape:
            raise ValueError(
                f"The mask for `{variable.path}` must have the variable's shape "
                f"{tuple(variable.shape)}. Received: mask of shape {mask.shape}"
            )
        plan.append((variable, mask, layer, ancestors, attribute))
    uncarried = []
    config_texts = {}
    for variable, mask, layer, ancestors, attribute in plan:
        existing = variable.constraint
        carried = mask_of(variable)
        if carried is not None:
            mask = mask & carried
        user_constraint = _user_constraint(existing)
        constraint = MaskConstraint(mask, constraint=user_constraint)
        setattr(layer, attribute, constraint)
        variable.constraint = constraint
        variable.assign(ops.multiply(variable, ops.cast(mask, variable.dtype)))
        # Saved if every ancestor's config holds its child's config (by name), or if the
        # composite ancestor that rebuilds it forwards a constraint its config saves.
        carrier = None
        for child, parent in zip((layer,) + ancestors, ancestors):
            if _config_names(parent, child, config_texts):
                continue
            if carrier is None and _carry_in_composite(
                parent, variable, mask, _config_text_of(parent, config_texts)
            ):
                carrier = parent
                config_texts.pop(id(parent))
                continue
            uncarried.append((variable, layer, ancestors))
            break
    # A model whose config records `masks(model)` and whose constructor re-attaches them.
    if getattr(model, "carries_masks", False):
        uncarried = []
    not_saved = _carry_in_compile_configs(uncarried, config_texts)
    if warn and not_saved:
        paths = [path for path, _ in not_saved]
        reasons = list(dict.fromkeys(reason for _, reason in not_saved))
        warnings.warn(
            f"The masks on {paths[:5]} are kept by training, keras_fip copies, Path points "
            f"and export, but not by `.keras` files: {' '.join(reasons)} The saved weights "
            "keep their zeros; after `keras.saving.load_model`, re-attach these masks with "
            "`keras_fip.engine.apply_masks(loaded, masks)`, `masks` a list aligned with "
            "`loaded.trainable_variables` (`None` for the unmasked ones).",
            stacklevel=3,
        )


def _config_text_of(layer, config_texts):
    """`_config_text(layer)`, cached in `config_texts` by layer id."""
    if id(layer) not in config_texts:
        config_texts[id(layer)] = _config_text(layer)
    return config_texts[id(layer)]


def _config_names(parent, child, config_texts):
    """Whether `parent`'s config holds a config named as `child` (so it rebuilds it)."""
    return f'"name": {json.dumps(child.name)}' in _config_text_of(parent, config_texts)


# Masks carried by compile configs.


def _carry_in_compile_configs(uncarried, config_texts):
    """Records the masks of `uncarried` `(variable, layer, ancestors)` in compile configs.

    Each variable's carrier is the outermost model among its owners whose config a `.keras`
    file saves and whose compile state `keras.saving.load_model` restores (its class keeps
    Keras's `compile`); that model is compiled with a `MaskedOptimizer` recording the masks.
    Returns `[(path, reason)]` for the masks no model can carry.
    """
    carriers = {}
    not_saved = []
    trainable = {}  # id(model) -> ids of its trainable variables
    for variable, layer, ancestors in uncarried:
        carrier, reason = _compile_carrier(variable, layer, ancestors, config_texts, trainable)
        if carrier is None:
            not_saved.append((variable.path, reason))
            continue
        carriers[id(carrier)] = carrier
        variable.constraint._compile_record = _CompileRecord(model=carrier)
    for carrier in carriers.values():
        try:
            _compile_with_masks(carrier)
        except Exception as error:
            reason = (
                f"compiling model `{carrier.name}` with a `MaskedOptimizer` that records "
                f"them failed ({type(error).__name__}: {error})."
            )
            not_saved.extend(
                (variable.path, reason)
                for variable in carrier.trainable_variables
                if _compile_carried_mask(variable) is not None
            )
    return not_saved


def _compile_carrier(variable, layer, ancestors, config_texts, trainable):
    """`(model, None)`: the model whose compile config can carry `variable`'s mask, or
    `(None, reason)`. `trainable` caches the ids of each model's trainable variables."""
    chain = (layer,) + ancestors
    # saved[i]: a `.keras` file saves the config of chain[i] (the model's own always).
    saved = [False] * len(chain)
    saved[-1] = True
    for index in range(len(chain) - 2, -1, -1):
        saved[index] = saved[index + 1] and _config_names(
            chain[index + 1], chain[index], config_texts
        )
    if not variable.trainable:
        return None, (
            f"`{variable.path}` is not trainable, and a model's compile config carries "
            "the masks of trainable variables only."
        )
    for index in range(len(chain) - 1, -1, -1):
        candidate = chain[index]
        if (
            not saved[index]
            or not isinstance(candidate, keras.Model)
            or type(candidate).compile is not keras.Model.compile
        ):
            continue
        if id(candidate) not in trainable:
            trainable[id(candidate)] = {id(v) for v in candidate.trainable_variables}
        if id(variable) in trainable[id(candidate)]:
            return candidate, None
    model = chain[-1]
    if type(model).compile is not keras.Model.compile:
        return None, (
            f"`{type(model).__name__}` overrides `compile`, so `keras.saving.load_model` "
            f"does not restore its compile state, and layer `{layer.name}` is built in "
            "code rather than from a config, outside any sub-model whose config and "
            "compile state it saves."
        )
    return None, (
        f"`{variable.path}` is not among the trainable variables of a model whose "
        "config and compile state `.keras` files save."
    )


def _compile_carried_mask(variable):
    """The mask of `variable` if only a compile config can carry it, else `None`."""
    constraint = variable.constraint
    if isinstance(constraint, MaskConstraint) and constraint._compile_record is not None:
        return constraint.mask
    return None


def _masked_optimizer(model):
    """The `MaskedOptimizer` `model` is compiled with (inside a loss-scale wrapper too),
    or `None`."""
    optimizer = getattr(model, "optimizer", None) if model.compiled else None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if isinstance(optimizer, MaskedOptimizer) else None


def _compile_with_masks(model):
    """(Re)compiles `model` with a `MaskedOptimizer` recording its compile-carried masks.

    The optimizer it was compiled with is wrapped (its state kept) and its loss, metrics
    and other compile arguments stay; an uncompiled model gets `"rmsprop"` (the default
    of `compile`) and no loss. With no mask left to record, the wrapper is removed.
    """
    variables = model.trainable_variables
    attached = [_compile_carried_mask(variable) for variable in variables]
    record = _CompileRecord(model=model)
    for variable in variables:
        if _compile_carried_mask(variable) is not None:
            variable.constraint._compile_record = record
    optimizer = getattr(model, "optimizer", None) if model.compiled else None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and isinstance(
        optimizer.inner_optimizer, MaskedOptimizer
    ):
        optimizer = optimizer.inner_optimizer
    explicit = None
    if isinstance(optimizer, MaskedOptimizer):
        explicit = optimizer._explicit_masks.value
        optimizer = optimizer.inner_optimizer
    if all(mask is None for mask in attached):
        if _masked_optimizer(model) is None:
            return
        attached = None
    if optimizer is None:
        optimizer = keras.optimizers.get("rmsprop")
    if attached is not None or explicit is not None:
        optimizer = MaskedOptimizer(optimizer, masks=explicit, attached_masks=attached)
    config = {}
    if model.compiled:
        config = keras.saving.deserialize_keras_object(model.get_compile_config(), safe_mode=False)
    config["optimizer"] = optimizer
    model.compile(**config)


class _CompileRecord:
    """Where compile-carried masks are recorded, checked when a masked weight is updated.

    Either the model compiled with the `MaskedOptimizer` that records them (held weakly;
    set by keras_fip when it masks), or that optimizer itself (held weakly; set when it
    re-attaches them on loading, the model being unknown to it). The masks are lost from
    `.keras` files once the model is no longer compiled with a `MaskedOptimizer`: the
    first check that finds so warns, once per record.
    """

    def __init__(self, model=None, optimizer=None):
        self.model = None if model is None else weakref.ref(model)
        self.optimizer = None if optimizer is None else weakref.ref(optimizer)
        self.paths = ()
        self.warned = False

    def check(self):
        if self.warned:
            return
        if self.model is not None:
            model = self.model()
            if model is None or _masked_optimizer(model) is not None:
                return
            paths = [
                v.path for v in model.trainable_variables if _compile_carried_mask(v) is not None
            ]
            optimizer = getattr(model, "optimizer", None) if model.compiled else None
            compiled = f"with `{type(optimizer).__name__}`" if optimizer is not None else "at all"
            holder = (
                f"Model `{model.name}` is not compiled with a `keras_fip.MaskedOptimizer` "
                f"but {compiled}"
            )
        elif self.optimizer() is None:
            # Its optimizer is gone: the model was compiled again.
            paths = list(self.paths)
            holder = (
                "The model holding these variables was compiled again, without a "
                "`keras_fip.MaskedOptimizer`"
            )
        else:
            return
        self.warned = True
        warnings.warn(
            f"{holder}: its masks on {paths[:5]} still hold their zeros in training, but "
            "its `.keras` files will not record them. These variables belong to sub-layers "
            "built in code rather than from a config, so only a `MaskedOptimizer` in the "
            "model's compile config can carry their masks. To keep them, compile with "
            "`keras_fip.MaskedOptimizer(optimizer)` and train (or build the optimizer) before "
            "saving; or re-attach them after loading with `keras_fip.engine.apply_masks`.",
            stacklevel=3,
        )


def masks(model):
    """Returns the masks a model carries.

    Reads the `MaskConstraint` on each of the model's variables. Only masked variables
    appear. The model is not changed.

    Args:
        model: A `keras.Model`.

    Returns:
        A dict mapping `variable.path` to a boolean numpy array of the variable's shape
        (`False` = held at zero). When identical sub-models make a path repeat, the k-th
        repeat is keyed `f"{path}:{k}"`. Paths belong to this model object: a reloaded
        or cloned twin may name its variables differently.

    Examples:

        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> masks(model)
        {}
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    variables = model.weights
    return {
        key: mask_of(variable).copy()
        for key, variable in zip(variable_keys(variables), variables)
        if mask_of(variable) is not None
    }


def apply_masks(model, masks):
    """Attaches masks to a model IN PLACE and zeroes the masked weights.

    This mutates `model`: it is meant for copies (keras_fip operations call it on the copy
    they return; use `keras_fip.engine.copy_model` first to keep the original). A mask is
    AND-ed with any mask the variable already carries; a user constraint on the variable
    is kept and applied before the mask. `strip_masks` is the undo.

    The masks travel in the layer configs, so copies and `.keras` files keep them. Where
    a sub-layer is built in code rather than from a config (the layers of a user's layer
    subclass, of a `MultiHeadAttention` inside it, of KerasHub's `TransformerEncoder`), the
    model holding it is (re)compiled with a `MaskedOptimizer` recording those masks: its
    optimizer is wrapped and its loss and metrics kept, or, if it was not compiled,
    `"rmsprop"` and no loss. `keras.saving.load_model` then re-attaches them. A warning
    names the masks that nothing can carry (the layers a KerasHub task builds in its
    constructor: the task overrides `compile`, so Keras does not restore its compile
    state).

    Args:
        model: A built `keras.Model`, changed in place.
        masks: Dict mapping variable keys of this model (as returned by
            `keras_fip.masks`, i.e. `variable.path`) to boolean arrays of the variable's
            shape (`True` keeps a weight, `False` holds it at zero); or a list aligned
            with `model.trainable_variables`, holding a boolean array or `None` (unmasked)
            per variable. Variable paths can differ between a model and its reloaded or
            cloned twin, so transfer masks between models with the list form.

    Returns:
        `None`.

    Examples:

        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> kernel = model.layers[0].kernel
        >>> apply_masks(model, {kernel.path: np.eye(3, 2, dtype=bool)})
        >>> int(np.count_nonzero(kernel.numpy()))
        2
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if isinstance(masks, (list, tuple)):
        variables = model.trainable_variables
        if len(masks) != len(variables):
            raise ValueError(
                "`masks` given as a list must have one entry (array or `None`) per "
                f"trainable variable of model `{model.name}` ({len(variables)}). "
                f"Received: masks with {len(masks)} entries"
            )
        variable_masks = [
            (variable, _as_bool_mask(mask, f"masks[{i}]"))
            for i, (variable, mask) in enumerate(zip(variables, masks))
            if mask is not None
        ]
    elif isinstance(masks, dict):
        variables = model.weights
        by_key = dict(zip(variable_keys(variables), variables))
        unknown = sorted(set(masks) - set(by_key))
        if unknown:
            raise ValueError(
                f"`masks` has keys that are not variables of model `{model.name}`: "
                f"{unknown[:5]}. Expected keys among {list(by_key)[:10]}. "
                f"Received: masks with keys {sorted(masks)[:10]}"
            )
        variable_masks = [
            (by_key[key], _as_bool_mask(mask, f"masks[{key!r}]")) for key, mask in masks.items()
        ]
    else:
        raise ValueError(
            "`masks` must be a dict mapping variable paths to boolean arrays, or a list "
            "aligned with `model.trainable_variables`. "
            f"Received: masks={masks!r}"
        )
    attach_masks(model, variable_masks)


def remove_masks(model):
    """Takes a model's masks off, in place: plain layers, zeros kept.

    Each `MaskConstraint` is replaced by the user constraint it wrapped (or none). Masked
    weights are still exactly zero, but nothing keeps them there any more. A model compiled
    with a `MaskedOptimizer` to carry masks is compiled with its inner optimizer instead.
    `keras_fip.strip_masks` does the same on a copy.

    Args:
        model: A built `keras.Model`. Changed in place.

    Returns:
        `model`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> apply_masks(model, {model.layers[0].kernel.path: np.eye(3, 2, dtype=bool)})
        >>> masks(remove_masks(model))
        {}
    """
    stripped = model
    owners = _variable_owners(stripped)
    for variable in stripped.weights:
        constraint = variable.constraint
        if not isinstance(constraint, (MaskConstraint, CompositeMaskConstraint)):
            continue
        layer, _ = owners[id(variable)]
        setattr(layer, _constraint_attribute(layer, variable), constraint.constraint)
        variable.constraint = constraint.constraint
    # Composite layers carrying their sub-layers' masks in their config.
    layers, seen = [stripped], set()
    while layers:
        layer = layers.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        layers.extend(layers_lib.sublayers(layer))
        for attribute, value in list(vars(layer).items()):
            if isinstance(value, CompositeMaskConstraint):
                setattr(layer, attribute, value.constraint)
        # Models compiled to carry masks: back to their inner optimizer.
        if isinstance(layer, keras.Model):
            _compile_with_masks(layer)
    return stripped


def sparsity(model, per_variable=False):
    """Fraction of a model's trainable weights that are exactly zero.

    Args:
        model: A `keras.Model`.
        per_variable: If `True`, return a dict mapping each trainable variable's key
            (as in `keras_fip.masks`) to its own fraction of zeros. Defaults to `False`.

    Returns:
        A float in [0, 1], or a dict of floats when `per_variable=True`.

    Examples:

        >>> import keras
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> sparsity(model)  # the bias starts at zero
        0.25
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    variables = model.trainable_variables
    zeros = [int(np.sum(v.numpy() == 0)) for v in variables]
    sizes = [int(np.prod(v.shape, dtype=np.int64)) for v in variables]
    if per_variable:
        return {
            key: (count / size if size else 0.0)
            for key, count, size in zip(variable_keys(variables), zeros, sizes)
        }
    total = sum(sizes)
    return sum(zeros) / total if total else 0.0


@keras.saving.register_keras_serializable(package="keras_fip")
class MaskedOptimizer(keras.optimizers.Optimizer):
    """An optimizer wrapper that holds masked weights at exactly zero.

    Wraps another Keras optimizer (the `LossScaleOptimizer` pattern): gradients of masked
    entries are zeroed before the inner optimizer's update, and the masked variables are
    re-projected onto their masks right after it, so momentum or Adam moments cannot move
    a masked weight. By default the masks are those the variables carry as
    `MaskConstraint`s when the optimizer is built; explicit masks override them. Works
    inside `tf.function` and `tf.distribute` strategies.

    The optimizer also carries masks through `.keras` files, in the model's compile
    config: `attached_masks` are set on the variables as `MaskConstraint`s when it is built
    (by `keras.saving.load_model`, which rebuilds and builds the optimizer of a compiled
    model), and `get_config` records the masks that only a compile config can carry (those
    of sub-layers built in code rather than from a config, such as the attention layer of a
    user's transformer block or the layers of KerasHub's `TransformerEncoder`).
    keras_fip compiles the models it masks this way. Two limits follow: a model
    recompiled with another optimizer before saving, or loaded with `compile=False`, keeps
    its masks in training but not in its `.keras` file (a warning says so when such a model
    is trained); and an optimizer that is neither built nor given `attached_masks` records
    nothing, so train (or build) it before saving.

    Args:
        optimizer: The `keras.optimizers.Optimizer` to wrap (an instance, name or config).
        masks: `None` to use the masks the variables carry; a dict mapping variable paths
            (as in `keras_fip.masks`) to boolean arrays; or a list of boolean arrays (or
            `None` for unmasked variables) aligned with the variables the optimizer is
            built on. Defaults to `None`.
        attached_masks: `None`, or a list aligned with the variables the optimizer is
            built on, of boolean arrays (or `None`) that `build` attaches to the
            variables as `MaskConstraint`s (AND-ed with any mask a variable carries),
            zeroing the masked weights, so that any optimizer compiled later keeps them.
            Defaults to `None`.
        name: Name of the optimizer. Defaults to `None`.

    Examples:

        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> kernel = model.layers[0].kernel
        >>> optimizer = MaskedOptimizer(
        ...     keras.optimizers.Adam(0.1), masks={kernel.path: np.eye(3, 2, dtype=bool)}
        ... )
        >>> model.compile(optimizer=optimizer, loss="mse")
        >>> _ = model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=2, verbose=0)
        >>> int(np.count_nonzero(kernel.numpy()))
        2
    """

    def __init__(self, optimizer, masks=None, attached_masks=None, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                "MaskedOptimizer takes no base-optimizer arguments; set them on the "
                f"inner optimizer instead. Received: {sorted(kwargs)}"
            )
        if isinstance(optimizer, (str, dict)):
            optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`optimizer` must be a `keras.optimizers.Optimizer` instance, name or "
                f"config. Received: optimizer={optimizer!r}"
            )
        if isinstance(masks, dict):
            masks = {
                str(key): _as_bool_mask(value, f"masks[{key!r}]") for key, value in masks.items()
            }
        elif isinstance(masks, (list, tuple)):
            masks = [
                None if value is None else _as_bool_mask(value, f"masks[{i}]")
                for i, value in enumerate(masks)
            ]
        elif masks is not None:
            raise ValueError(
                "`masks` must be `None`, a dict mapping variable paths to boolean "
                "arrays, or a list of boolean arrays aligned with the variables. "
                f"Received: masks={masks!r}"
            )
        if isinstance(attached_masks, (list, tuple)):
            attached_masks = [
                None if value is None else _as_bool_mask(value, f"attached_masks[{i}]")
                for i, value in enumerate(attached_masks)
            ]
        elif attached_masks is not None:
            raise ValueError(
                "`attached_masks` must be `None` or a list of boolean arrays (or `None`) "
                f"aligned with the variables. Received: attached_masks={attached_masks!r}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self._explicit_masks = _Untracked(masks)
        self._attached_masks = _Untracked(attached_masks)
        self._variable_masks = _Untracked(())
        self._built_variables = _Untracked(())
        # Restored from a config (a `.keras` file): mismatched `attached_masks` warn, and
        # the first `build` only attaches them (see `build`).
        self._restored = False
        self._deferred = _Untracked(None)

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        self._attach_masks(var_list)
        if self._restored and self._deferred.value is None:
            # `keras.saving.load_model` builds a restored optimizer before loading its
            # state. The state is built when the saved one is loaded
            # (`load_own_variables`), else at the next build (by `fit`), so an optimizer
            # saved unbuilt loads as it was saved.
            self._deferred = _Untracked(var_list)
            return
        masks = self._resolve_masks(var_list)
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._built_variables = _Untracked(tuple(var_list))
        # (variable, mask) pairs, kept out of the optimizer's tracked state.
        self._variable_masks = _Untracked(
            tuple((variable, mask) for variable, mask in zip(var_list, masks) if mask is not None)
        )

    def _attach_masks(self, var_list):
        """Sets `attached_masks` on the variables as compile-carried `MaskConstraint`s."""
        attached = self._attached_masks.value
        if attached is None:
            return
        problem = None
        if len(attached) != len(var_list):
            problem = f"{len(attached)} entries for {len(var_list)} variables"
        else:
            for variable, mask in zip(var_list, attached):
                if mask is not None and mask.shape != tuple(variable.shape):
                    problem = (
                        f"a mask of shape {mask.shape} for `{variable.path}` of shape "
                        f"{tuple(variable.shape)}"
                    )
                    break
        if problem is not None:
            message = (
                f"`attached_masks` of MaskedOptimizer `{self.name}` must have one entry "
                "per variable it is built on, of that variable's shape. Received: "
                f"{problem}."
            )
            if not self._restored:
                raise ValueError(message)
            warnings.warn(
                f"{message} The masks recorded in the compile config are not re-attached "
                "(the model's trainable variables differ from the saved model's); "
                "re-attach them with `keras_fip.engine.apply_masks`.",
                stacklevel=3,
            )
            return
        record = _CompileRecord(optimizer=self)
        for variable, mask in zip(var_list, attached):
            if mask is None:
                continue
            carried = mask_of(variable)
            if carried is not None and np.array_equal(carried, mask):
                continue
            combined = mask if carried is None else mask & carried
            constraint = MaskConstraint(combined, constraint=_user_constraint(variable.constraint))
            constraint._compile_record = record
            variable.constraint = constraint
            variable.assign(ops.multiply(variable, ops.cast(combined, variable.dtype)))
            record.paths += (variable.path,)

    def _resolve_masks(self, var_list):
        explicit = self._explicit_masks.value
        if explicit is None:
            return [mask_of(variable) for variable in var_list]
        if isinstance(explicit, list):
            if len(explicit) != len(var_list):
                raise ValueError(
                    f"`masks` must have one entry per variable ({len(var_list)}). "
                    f"Received: masks with {len(explicit)} entries"
                )
            resolved = explicit
        else:
            keys = variable_keys(var_list)
            unknown = sorted(set(explicit) - set(keys))
            if unknown:
                raise ValueError(
                    f"`masks` has keys that are not among the optimized variables: "
                    f"{unknown[:5]}. Expected keys among {keys[:10]}."
                )
            resolved = [explicit.get(key) for key in keys]
        for variable, mask in zip(var_list, resolved):
            if mask is not None and tuple(variable.shape) != mask.shape:
                raise ValueError(
                    f"The mask for `{variable.path}` must have the variable's shape "
                    f"{tuple(variable.shape)}. Received: mask of shape {mask.shape}"
                )
        return resolved

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the optimizer "
                    "must already be built. Call `optimizer.build(variables)` first."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        variables = (
            list(self._built_variables.value)
            if trainable_variables is None
            else list(trainable_variables)
        )
        masks = {id(variable): mask for variable, mask in self._variable_masks.value}

        # Mask the gradients.
        masked_grads = []
        for grad, variable in zip(grads, variables):
            mask = masks.get(id(variable))
            if grad is not None and mask is not None:
                if isinstance(grad, tf.IndexedSlices):
                    grad = tf.convert_to_tensor(grad)
                grad = ops.multiply(grad, ops.cast(graph_mask(mask), grad.dtype))
            masked_grads.append(grad)

        # Inner update.
        self.inner_optimizer.apply(masked_grads, trainable_variables)

        # Re-project onto the masks (unless the inner update's constraint just did).
        for variable in variables:
            mask = masks.get(id(variable))
            if mask is not None and mask_of(variable) is not mask:
                variable.assign(ops.multiply(variable, ops.cast(graph_mask(mask), variable.dtype)))

    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def load_own_variables(self, store):
        saved_built = len(store.keys()) != len(self.variables)
        if saved_built and not self.built and self._deferred.value is not None:
            self.build(self._deferred.value)
        super().load_own_variables(store)

    def _recorded_attached_masks(self):
        """The masks `get_config` records for `build` to re-attach (a list or `None`)."""
        if self.built:
            recorded = [_compile_carried_mask(v) for v in self._built_variables.value]
        else:
            recorded = self._attached_masks.value
        if not recorded or all(mask is None for mask in recorded):
            return None
        return [None if mask is None else encode_mask(mask) for mask in recorded]

    def get_config(self):
        # Do not use super().get_config(): the base arguments belong to the inner one.
        explicit = self._explicit_masks.value
        if isinstance(explicit, dict):
            masks = {key: encode_mask(value) for key, value in explicit.items()}
        elif isinstance(explicit, list):
            masks = [None if value is None else encode_mask(value) for value in explicit]
        else:
            masks = None
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "masks": masks,
            "attached_masks": self._recorded_attached_masks(),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        instance = cls(optimizer, **config)
        instance._restored = True
        return instance
