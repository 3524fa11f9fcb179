"""The five-layer continual-learning CNN of the FIP papers."""

import keras

from keras_fip.models import validation


def cnn5(input_shape=(28, 28, 1), num_classes=10, dense_units=(600, 120), dropout=0.0):
    """The continual-learning CNN: two convolutions (32, 64) and dense 600/120 before logits.

    Five weight layers: `conv_1` (32 filters, 3x3, ReLU) and `conv_2` (64 filters, 3x3,
    ReLU), each followed by 2x2 max-pooling, then `dense_1` (600), `dense_2` (120) and the
    linear `logits` layer. The papers' split-CIFAR-100 network uses 20 outputs
    (`num_classes=20`).

    Args:
        input_shape: Shape of one input image (H, W, C). Defaults to `(28, 28, 1)`.
        num_classes: Number of output logits. Defaults to `10`.
        dense_units: Widths of the two hidden dense layers. Defaults to `(600, 120)`.
        dropout: Dropout rate before each hidden dense layer (0 disables). Defaults to `0.0`.

    Returns:
        A functional `keras.Model`.

    Examples:

        >>> keras_fip.models.cnn5(num_classes=20).output_shape
        (None, 20)
    """
    input_shape = validation.check_input_shape(input_shape, rank=3)
    validation.check_positive_int(num_classes, "num_classes")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
    inputs = keras.Input(input_shape, name="inputs")
    x = inputs
    for i, filters in enumerate((32, 64), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv_{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, width in enumerate(dense_units, start=1):
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="cnn5")
