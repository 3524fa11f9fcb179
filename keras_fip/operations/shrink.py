"""`keras_fip.shrink`: physically removes zeroed Dense units and Conv filters."""

import keras
import numpy as np

_PRODUCERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)
# Layers that act on each channel separately (and keep channels in the last axis).
_CHANNELWISE = (
    keras.layers.Activation,
    keras.layers.BatchNormalization,
    keras.layers.Dropout,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.ReLU,
)
_POOLING = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
)


def _chain(model):
    """The model's layers as a chain, or a ValueError naming the first branching layer."""
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs") or not model.inputs:
        raise ValueError(
            "`model` must be a built Sequential or functional `keras.Model`. "
            f"Received: model={model!r}"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "`shrink` supports single-input, single-output chains. "
            f"Received: a model with {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        supported = isinstance(
            layer, _PRODUCERS + _CHANNELWISE + _POOLING + (keras.layers.Flatten,)
        )
        if not supported:
            raise ValueError(
                "`shrink` removes units from sequential chains of Dense/Conv1D/Conv2D and "
                "channel-wise layers (activations, BatchNormalization, pooling, Dropout, "
                f"Flatten). Received: layer `{layer.name}` of type {type(layer).__name__}"
            )
        if layer.input is not previous:
            raise ValueError(
                "`shrink` supports sequential chains only (no branches or residual adds). "
                f"Received: layer `{layer.name}` does not read the previous layer's output"
            )
        previous = layer.output
    if previous is not model.outputs[0]:
        raise ValueError(
            "`shrink` supports sequential chains only. Received: a model whose output is not "
            "its last layer's output"
        )
    return layers


def _activation(layer):
    return keras.activations.get(layer.get_config().get("activation", "linear"))


def _constant_through(layer, values, channels):
    """Pushes per-channel constants through a channel-wise layer (inference mode)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        gamma, beta, mean, variance = [keras.ops.convert_to_numpy(w) for w in _bn_weights(layer)]
        scale = gamma[channels] / np.sqrt(variance[channels] + layer.epsilon)
        return (values - mean[channels]) * scale + beta[channels]
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
        return keras.ops.convert_to_numpy(layer(values[None].astype("float32")))[0]
    return values  # Pooling, dropout (inference) and global pooling keep constants.


def _bn_weights(layer):
    ones = np.ones(layer.moving_mean.shape, "float32")
    gamma = layer.gamma if layer.scale else ones
    beta = layer.beta if layer.center else np.zeros_like(ones)
    return gamma, beta, layer.moving_mean, layer.moving_variance


def shrink(model, atol=0.0):
    """Returns a smaller model without the zeroed Dense units and Conv filters; equal outputs.

    A unit (Dense column or Conv filter) whose incoming kernel weights are all zero outputs
    the constant `activation(bias)`. It is removed when that constant is zero, or when it can
    be folded exactly into the bias of the next Dense layer or `valid`-padded convolution
    (through channel-wise layers such as BatchNormalization, pooling and Flatten). The
    corresponding inputs of the next layer are removed too. The output layer keeps all its
    units. The input model is not changed; masks are not carried (the zeros are gone).

    Args:
        model: A Sequential or functional `keras.Model` that is a chain of Dense, Conv1D,
            Conv2D and channel-wise layers (residual adds and branches are not supported).
        atol: Incoming weights with absolute value at most `atol` count as zero. Defaults to
            `0.0` (exact zeros only).

    Returns:
        A new `keras.Model` with fewer parameters and the same outputs (up to float
        rounding).

    Examples:

        >>> model = keras_fip.models.lenet_300_100()
        >>> kernel = model.get_layer("dense_1").kernel
        >>> _ = kernel.assign(keras.ops.concatenate([kernel[:, :150] * 0, kernel[:, 150:]], axis=1))
        >>> keras_fip.shrink(model).get_layer("dense_1").units
        150
    """
    layers = _chain(model)
    producers = [i for i, layer in enumerate(layers) if isinstance(layer, _PRODUCERS)]
    if not producers:
        raise ValueError(
            f"`model` has no Dense or Conv layers to shrink. Received: model `{model.name}`"
        )
    weights = {
        layer.name: [keras.ops.convert_to_numpy(w) for w in layer.get_weights()] for layer in layers
    }
    sizes = {}  # layer name -> new units/filters

    # Decide, producer by producer, which output channels survive
    for position, index in enumerate(producers[:-1]):
        layer = layers[index]
        kernel = weights[layer.name][0]
        bias = weights[layer.name][1] if layer.use_bias else np.zeros(kernel.shape[-1], "float32")
        dead = np.all(np.abs(kernel.reshape(-1, kernel.shape[-1])) <= atol, axis=0)
        constants = keras.ops.convert_to_numpy(_activation(layer)(bias[None]))[0]
        dead_channels = np.flatnonzero(dead)
        values = constants[dead_channels].astype("float64")
        next_index = producers[position + 1]
        flatten_shape = None
        for between in layers[index + 1 : next_index]:
            if isinstance(between, keras.layers.Flatten):
                flatten_shape = tuple(between.input.shape[1:])
            else:
                values = _constant_through(between, values, dead_channels)
        next_layer = layers[next_index]
        next_kernel = weights[next_layer.name][0]
        foldable = next_layer.use_bias and (
            isinstance(next_layer, keras.layers.Dense)
            or next_layer.get_config().get("padding") == "valid"
        )
        removable = (np.abs(values) <= 0) | foldable
        removed = dead_channels[removable]
        if removed.size == 0:
            continue
        if removed.size == kernel.shape[-1]:
            removed = removed[1:]  # keep one unit so that shapes stay valid
        keep = np.setdiff1d(np.arange(kernel.shape[-1]), removed)
        folded = dict(zip(dead_channels.tolist(), values.tolist()))

        # Rows of the next kernel that read each channel
        if flatten_shape is not None:
            channel_of_row = np.tile(np.arange(flatten_shape[-1]), int(np.prod(flatten_shape[:-1])))
        else:
            channel_of_row = np.arange(next_kernel.shape[-2])
        next_weights = weights[next_layer.name]
        for channel in removed:
            rows = np.flatnonzero(channel_of_row == channel)
            if folded[channel] != 0:
                contribution = next_kernel.reshape(-1, next_kernel.shape[-2], next_kernel.shape[-1])
                if flatten_shape is not None:
                    contribution = next_kernel[rows].sum(axis=0)
                else:
                    contribution = contribution[:, channel, :].sum(axis=0)
                next_weights[1] = next_weights[1] + folded[channel] * contribution
        keep_rows = np.flatnonzero(np.isin(channel_of_row, keep))
        next_weights[0] = np.take(next_kernel, keep_rows, axis=-2)

        # Slice this producer and the channel-wise layers up to the next producer
        weights[layer.name] = [np.take(w, keep, axis=-1) for w in weights[layer.name]]
        sizes[layer.name] = len(keep)
        for between in layers[index + 1 : next_index]:
            if isinstance(between, keras.layers.BatchNormalization):
                weights[between.name] = [w[keep] for w in weights[between.name]]

    # Rebuild with fewer units and load the sliced weights
    def clone(layer):
        config = layer.get_config()
        if layer.name in sizes:
            config["units" if isinstance(layer, keras.layers.Dense) else "filters"] = sizes[
                layer.name
            ]
        return layer.__class__.from_config(config)

    smaller = keras.models.clone_model(model, clone_function=clone)
    for layer in layers:
        smaller.get_layer(layer.name).set_weights(weights[layer.name])
    return smaller
