"""Re-estimating BatchNormalization moving statistics for the weights a model has now."""

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core.data_adapter import normalize_data
from keras_fip.core.layers import all_layers


def batch_normalization_layers(model):
    """The `keras.layers.BatchNormalization` layers of `model`, nested ones included."""
    return [
        layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]


def recalibrate_batch_normalization(model, data, batch_size=256, max_examples=None):
    """Sets every BatchNormalization layer's moving statistics to their value on `data`.

    After weights change outside `fit` (pruning, damage, a path walked in inference mode),
    the moving mean and variance no longer describe the activations the layers receive,
    and the network's inference-mode outputs suffer. This runs the model in training mode
    over `data` and makes the moving statistics the exact average of the batch statistics
    (each batch weighted equally, as PyTorch's `momentum=None` does), touching no trainable
    weight. The model is changed in place; layers are restored to their own momentum.

    Args:
        model: A `keras.Model`. Changed in place (moving statistics only).
        data: Inputs: an array, an `(x, y)` tuple (labels unused) or a finite
            `tf.data.Dataset`.
        batch_size: Examples per forward pass. Defaults to `256`.
        max_examples: Use at most this many examples (the first ones), or `None` for
            all. Defaults to `None`.

    Returns:
        The number of BatchNormalization layers recalibrated (0 leaves the model as it
        was).

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           keras.layers.BatchNormalization(), keras.layers.Dense(2)])
        >>> x = np.random.default_rng(0).normal(3.0, 2.0, (512, 4)).astype("float32")
        >>> recalibrate_batch_normalization(model, x)
        1
    """
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or (batch_size < 1)
    ):
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )
    if max_examples is not None and (
        not isinstance(max_examples, (int, np.integer))
        or isinstance(max_examples, bool)
        or max_examples < 1
    ):
        raise ValueError(
            "`max_examples` must be a positive integer or None. "
            f"Received: max_examples={max_examples!r}"
        )
    x, _ = normalize_data(data, name="data", model=model)
    if max_examples is not None:
        x = data_adapter.take(x, slice(0, max_examples))
    count = data_adapter.num_examples(x)
    if count == 0:
        raise ValueError("`data` must hold at least one example. Received: 0 examples")
    layers = batch_normalization_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    try:
        for batch, start in enumerate(range(0, count, batch_size)):
            # moving ← moving·k/(k+1) + batch/(k+1): the running mean of batch statistics.
            for layer in layers:
                layer.momentum = batch / (batch + 1.0)
            model(data_adapter.take(x, slice(start, start + batch_size)), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)
