"""The model zoo of the FIP experiments: functional Keras 3 models returning logits."""

from keras_fip.models.cnn5 import cnn5
from keras_fip.models.mlp import lenet_300_100
from keras_fip.models.mlp import mlp
from keras_fip.models.resnet import resnet
from keras_fip.models.training import base_network
from keras_fip.models.training import compile_classifier
from keras_fip.models.training import evaluate_classifier
from keras_fip.models.training import train_classifier
from keras_fip.models.transformer import transformer_classifier
from keras_fip.models.vgg import vgg

BUILDERS = {
    "mlp": mlp,
    "lenet_300_100": lenet_300_100,
    "cnn5": cnn5,
    "vgg11": lambda **kwargs: vgg(depth=11, **kwargs),
    "vgg16": lambda **kwargs: vgg(depth=16, **kwargs),
    "resnet18": lambda **kwargs: resnet(depth=18, **kwargs),
    "resnet20": lambda **kwargs: resnet(depth=20, **kwargs),
}


def get(name, input_shape, num_classes, **kwargs):
    """Builds a zoo image classifier by name (the names the apps' `--model` flag takes).

    Args:
        name: One of `keras_fip.models.BUILDERS`: `"mlp"`, `"lenet_300_100"`, `"cnn5"`,
            `"vgg11"`, `"vgg16"`, `"resnet18"`, `"resnet20"`.
        input_shape: Shape of one input example.
        num_classes: Number of output logits.
        **kwargs: Further arguments of the builder (e.g. `width_multiplier`).

    Returns:
        A functional `keras.Model` returning logits.

    Examples:

        >>> keras_fip.models.get("lenet_300_100", (28, 28, 1), 10).name
        'lenet_300_100'
    """
    if name not in BUILDERS:
        raise ValueError(f"`name` must be one of {sorted(BUILDERS)}. Received: name={name!r}")
    return BUILDERS[name](input_shape=input_shape, num_classes=num_classes, **kwargs)


__all__ = [
    "BUILDERS",
    "base_network",
    "compile_classifier",
    "evaluate_classifier",
    "train_classifier",
    "cnn5",
    "get",
    "lenet_300_100",
    "mlp",
    "resnet",
    "transformer_classifier",
    "vgg",
]
