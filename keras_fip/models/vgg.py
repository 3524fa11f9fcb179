"""VGG networks for 32x32 (and 28x28) images."""

import keras

from keras_fip.models import validation

_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def vgg(depth=16, width_multiplier=1.0, input_shape=(32, 32, 3), num_classes=10, batch_norm=True):
    """A VGG network for 32x32 images (the CIFAR variant: one linear classifier layer).

    Each convolution is 3x3 with `same` padding, optionally BatchNormalization, then ReLU;
    `M` stages are 2x2 max-pooling. Layers are named `block{b}_conv{c}`, `block{b}_bn{c}`,
    `block{b}_pool`, and `logits`.

    Args:
        depth: 11 or 16. Defaults to `16`.
        width_multiplier: Scales every convolution's filters. Defaults to `1.0`.
        input_shape: Shape of one input image. Defaults to `(32, 32, 3)`.
        num_classes: Number of output logits. Defaults to `10`.
        batch_norm: Whether each convolution is followed by BatchNormalization. Defaults to
            `True`.

    Returns:
        A functional `keras.Model`.

    Examples:

        >>> keras_fip.models.vgg(11, width_multiplier=0.25).output_shape
        (None, 10)
    """
    validation.check_choice(depth, "depth", sorted(_CONFIGS))
    multiplier = validation.check_width_multiplier(width_multiplier)
    input_shape = validation.check_input_shape(input_shape, rank=3)
    validation.check_positive_int(num_classes, "num_classes")
    inputs = keras.Input(input_shape, name="inputs")
    x = inputs
    block, conv = 1, 1
    for entry in _CONFIGS[depth]:
        if entry == "M":
            # `same` padding: 32x32 pools exactly as before (32 -> 1); 28x28 MNIST pools
            # 28 -> 14 -> 7 -> 4 -> 2 -> 1 instead of reaching zero size.
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"block{block}_pool")(x)
            block, conv = block + 1, 1
            continue
        filters = validation.scaled(entry, multiplier)
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=not batch_norm, name=f"block{block}_conv{conv}"
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
        x = keras.layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
        conv += 1
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"vgg{depth}")
