"""Multi-layer perceptrons: MLP-1 and LeNet-300-100 (MLP-2)."""

import keras

from keras_fip.models import validation


def mlp(
    hidden_units=100,
    input_shape=(28, 28, 1),
    num_classes=10,
    activation="relu",
    name="mlp",
):
    """A multi-layer perceptron returning logits: MLP-1 of the FIP papers by default.

    The input is flattened, passed through fully connected hidden layers and a linear output
    layer. Layers are named `flatten`, `dense_1`, `dense_2`, ... and `logits`.

    Args:
        hidden_units: Width of the hidden layer, or a sequence of widths for several hidden
            layers. Defaults to `100`.
        input_shape: Shape of one input example. Defaults to `(28, 28, 1)`.
        num_classes: Number of output logits. Defaults to `10`.
        activation: Activation of the hidden layers. Defaults to `"relu"`.
        name: Name of the model. Defaults to `"mlp"`.

    Returns:
        A functional `keras.Model`.

    Examples:

        >>> model = keras_fip.models.mlp(100)
        >>> model.output_shape
        (None, 10)
    """
    input_shape = validation.check_input_shape(input_shape)
    validation.check_positive_int(num_classes, "num_classes")
    widths = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(
            "`hidden_units` must be a positive integer or a non-empty sequence of them. "
            f"Received: hidden_units={hidden_units!r}"
        )
    inputs = keras.Input(input_shape, name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, width in enumerate(widths, start=1):
        x = keras.layers.Dense(width, activation=activation, name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def lenet_300_100(input_shape=(28, 28, 1), num_classes=10):
    """LeNet-300-100 (MLP-2 of the FIP papers): hidden layers of 300 and 100 ReLU units.

    Args:
        input_shape: Shape of one input example. Defaults to `(28, 28, 1)`.
        num_classes: Number of output logits. Defaults to `10`.

    Returns:
        A functional `keras.Model` with 266,610 parameters on MNIST.

    Examples:

        >>> keras_fip.models.lenet_300_100().count_params()
        266610
    """
    return mlp((300, 100), input_shape, num_classes, name="lenet_300_100")
