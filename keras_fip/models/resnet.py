"""Residual networks for 32x32 images: ResNet-20 and ResNet-18."""

import keras

from keras_fip.models import validation

# depth: (stage widths, blocks per stage)
_CONFIGS = {
    20: ((16, 32, 64), 3),
    18: ((64, 128, 256, 512), 2),
}


def _basic_block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(
        filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1"
    )(x)
    y = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=stride, use_bias=False, name=f"{name}_shortcut_conv"
        )(shortcut)
        shortcut = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_shortcut_bn")(
            shortcut
        )
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)


def resnet(depth=20, width_multiplier=1.0, input_shape=(32, 32, 3), num_classes=10):
    """A residual network for 32x32 images with basic blocks and residual adds.

    ResNet-20 (He et al. 2016, CIFAR): a 3x3 stem of 16 filters and three stages of three
    blocks (16, 32, 64 filters). ResNet-18 (CIFAR variant): a 3x3 stem of 64 filters and four
    stages of two blocks (64, 128, 256, 512). Stages after the first halve the resolution; a
    1x1 projection shortcut is used where shapes change. Global average pooling, then
    `logits`.

    Args:
        depth: 18 or 20. Defaults to `20`.
        width_multiplier: Scales every convolution's filters. Defaults to `1.0`.
        input_shape: Shape of one input image. Defaults to `(32, 32, 3)`.
        num_classes: Number of output logits. Defaults to `10`.

    Returns:
        A functional `keras.Model`.

    Examples:

        >>> keras_fip.models.resnet(20).count_params()
        274042
    """
    validation.check_choice(depth, "depth", sorted(_CONFIGS))
    multiplier = validation.check_width_multiplier(width_multiplier)
    input_shape = validation.check_input_shape(input_shape, rank=3)
    validation.check_positive_int(num_classes, "num_classes")
    widths, blocks = _CONFIGS[depth]
    widths = [validation.scaled(w, multiplier) for w in widths]
    inputs = keras.Input(input_shape, name="inputs")
    x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    for stage, filters in enumerate(widths, start=1):
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, stride, name=f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")
