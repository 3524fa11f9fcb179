"""Output heads for continual learning: growing the last Dense layer by new class units."""

import keras
import numpy as np

from keras_fip.core import masks as masks_lib

HEADS = ("append", "shared")


def output_layer(model, argument="model"):
    """The model's last layer, checked to be the `Dense` layer producing its one output.

    Args:
        model: A built `keras.Model`.
        argument: The argument name used in error messages. Defaults to `"model"`.

    Returns:
        The `keras.layers.Dense` output layer.
    """
    layer = model.layers[-1] if model.layers else None
    try:
        single_output = len(model.outputs) == 1
    except (AttributeError, TypeError, ValueError):
        single_output = False
    if (
        not isinstance(layer, keras.layers.Dense)
        or not single_output
        or (model.output_shape[-1] != layer.units)
    ):
        raise ValueError(
            "`head='append'` grows the model's output layer, so the last layer of "
            f"`{argument}` must be the `Dense` layer producing its single output. "
            f"Received: {argument}={model.name} whose last layer is "
            f"{type(layer).__name__ if layer is not None else None}"
        )
    return layer


def _mask(variable):
    constraint = variable.constraint
    return constraint.mask if isinstance(constraint, masks_lib.MaskConstraint) else None


def _plain_constraint(constraint):
    """The user constraint under a `MaskConstraint` (masks are re-attached separately)."""
    if isinstance(constraint, masks_lib.MaskConstraint):
        return constraint.constraint
    return constraint


def grow_output_layer(model, num_new, seed=None):
    """Returns a model whose last Dense layer has `num_new` more units; old ones kept exactly.

    Every other layer is shared with `model` (call this on a copy). The old units' kernel
    columns and biases are copied exactly, so the first C outputs equal `model`'s outputs
    on every input; the new units are initialised by the layer's own initialisers for the
    grown shape, as Keras would initialise a fresh `Dense(C + num_new)`. A mask the old
    kernel or bias carries is extended with the new units left free. Sequential models
    stay Sequential; others become functional models over the same layers.

    Args:
        model: A built `keras.Model` whose last layer is the Dense output layer.
        num_new: How many output units to add (a positive integer).
        seed: Seed of the new units' initialisation, or `None`. Defaults to `None`.

    Returns:
        A new `keras.Model` with `C + num_new` outputs.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> grow_output_layer(model, 2).output_shape
        (None, 5)
    """
    old = output_layer(model)
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"`num_new` must be a positive integer. Received: num_new={num_new!r}")
    config = old.get_config()
    config["units"] = old.units + int(num_new)
    for key, constraint in (
        ("kernel_constraint", old.kernel_constraint),
        ("bias_constraint", getattr(old, "bias_constraint", None)),
    ):
        config[key] = (
            keras.constraints.serialize(_plain_constraint(constraint))
            if (_plain_constraint(constraint) is not None)
            else None
        )
    for key in ("kernel_initializer", "bias_initializer"):
        if seed is not None and isinstance(config.get(key), dict):
            initializer = dict(config[key])
            initializer["config"] = {**initializer.get("config", {}), "seed": int(seed)}
            try:
                keras.initializers.deserialize(initializer)
                config[key] = initializer
            except (TypeError, ValueError):
                pass  # An initialiser without a seed (e.g. zeros).
    new = type(old).from_config(config)

    # Rebuild the graph with the grown layer on top
    if isinstance(model, keras.Sequential):
        grown = keras.Sequential(
            [keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype)]
            + list(model.layers[:-1])
            + [new],
            name=model.name,
        )
    else:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        grown = keras.Model(inputs, new(old.input), name=model.name)

    # Copy the old units exactly
    kernel = keras.ops.convert_to_numpy(new.kernel).copy()
    kernel[:, : old.units] = keras.ops.convert_to_numpy(old.kernel)
    new.kernel.assign(kernel)
    variable_masks = []
    old_kernel_mask = _mask(old.kernel)
    if old_kernel_mask is not None:
        mask = np.ones(kernel.shape, bool)
        mask[:, : old.units] = old_kernel_mask
        variable_masks.append((new.kernel, mask))
    if old.use_bias:
        bias = keras.ops.convert_to_numpy(new.bias).copy()
        bias[: old.units] = keras.ops.convert_to_numpy(old.bias)
        new.bias.assign(bias)
        old_bias_mask = _mask(old.bias)
        if old_bias_mask is not None:
            mask = np.ones(bias.shape, bool)
            mask[: old.units] = old_bias_mask
            variable_masks.append((new.bias, mask))
    if variable_masks:
        by_id = dict((id(variable), mask) for variable, mask in variable_masks)
        masks_lib.apply_masks(grown, [by_id.get(id(v)) for v in grown.trainable_variables])
    return grown


def task_labels(num_outputs, y, head, name="new_task"):
    """Checks a new task's labels against the head and returns them in output indices.

    With `head="append"` the labels must be `0..k-1` (k = their largest value + 1) and are
    shifted to `C..C+k-1`; with `"shared"` they must already be outputs of `model`.

    Args:
        num_outputs: C, the outputs of the model before the task.
        y: Integer labels.
        head: `"append"` or `"shared"`.
        name: The argument name used in error messages. Defaults to `"new_task"`.

    Returns:
        A tuple `(labels in output indices, k new units to add)` (k = 0 for `"shared"`).
    """
    y = np.asarray(y)
    if y.ndim != 1 or not (
        np.issubdtype(y.dtype, np.integer)
        or (
            np.issubdtype(y.dtype, np.floating)
            and np.all(np.isfinite(y))
            and np.all(y == np.round(y))
        )
    ):
        raise ValueError(
            f"`{name}` labels must be a 1-D array of integer class indices. Received: "
            f"labels of shape {y.shape} and dtype {y.dtype}"
        )
    y = y.astype("int64")
    num_outputs = int(num_outputs)
    if head == "append":
        num_new = int(y.max()) + 1
        if y.min() < 0 or len(np.unique(y)) != num_new:
            raise ValueError(
                f"With `head='append'` the `{name}` labels must be the new task's own "
                f"classes 0..k-1 (each present). Received: labels with values "
                f"{np.unique(y)[:10].tolist()}"
            )
        return (y + num_outputs).astype("int32"), num_new
    if y.min() < 0 or y.max() >= num_outputs:
        raise ValueError(
            f"With `head='shared'` the `{name}` labels must be outputs of the model, in "
            f"0..{num_outputs - 1}. Received: labels in {int(y.min())}..{int(y.max())}"
        )
    return y.astype("int32"), 0


def prepare_head(model, x, y, head, seed=None, name="new_task"):
    """Checks the labels, grows the head if `head="append"`; returns `(model, labels)`.

    Args:
        model: The model before the task (a copy, free to change).
        x: The task's inputs.
        y: The task's labels (the task's own `0..k-1` for `"append"`).
        head: `"append"` or `"shared"`.
        seed: Seed of the new units' initialisation. Defaults to `None`.
        name: The argument name used in error messages. Defaults to `"new_task"`.

    Returns:
        A tuple `(model with the head ready, labels in its output indices)`.
    """
    if head not in HEADS:
        raise ValueError(f"`head` must be one of {list(HEADS)}. Received: head={head!r}")
    if head == "append":
        output_layer(model)
    labels, num_new = task_labels(model.output_shape[-1], y, head, name=name)
    if num_new:
        model = grow_output_layer(model, num_new, seed=seed)
    return model, labels
