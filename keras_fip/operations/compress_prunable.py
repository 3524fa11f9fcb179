"""`Prunable`: which weights `keras_fip.Compress` and the magnitude baselines may zero."""

import keras

from keras_fip.core import config
from keras_fip.core import projection
from keras_fip.core.config import Config


def _check_boolean(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="keras_fip")
class Prunable(Config):
    """Which weights a pruning method may zero: by default, the set tfmot prunes.

    The kernels of Dense, EinsumDense and convolution layers (Conv1D/2D/3D, transposed,
    depthwise and separable) and the query, key, value and output kernels of
    MultiHeadAttention are always prunable, wherever they sit (custom layers, nested
    models); Embedding tables are by default, as in tfmot's `prune_low_magnitude`
    (its `prune_registry`); biases and normalisation scales and offsets are not. tfmot
    leaves depthwise kernels dense; here they are prunable too (the layer-collapse floor
    of `keras_fip.compress.Saliency` keeps small kernels alive).

    Args:
        biases: Whether biases are prunable. Defaults to `False`.
        normalization: Whether normalisation scales and offsets (`gamma`, `beta`) are
            prunable. Defaults to `False`.
        embeddings: Whether Embedding tables are prunable. Defaults to `True`.

    Examples:

        >>> model = keras.Sequential(
        ...     [keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3),
        ...      keras.layers.Flatten(), keras.layers.Dense(2)])
        >>> [v.name for v in Prunable().variables(model)]
        ['embeddings', 'kernel']
        >>> [v.name for v in Prunable(embeddings=False, biases=True).variables(model)]
        ['kernel', 'bias']
    """

    def __init__(self, biases=False, normalization=False, embeddings=True):
        self.biases = _check_boolean(biases, "biases")
        self.normalization = _check_boolean(normalization, "normalization")
        self.embeddings = _check_boolean(embeddings, "embeddings")

    def variables(self, model):
        """The prunable variables of `model`, in `model.trainable_variables` order.

        Args:
            model: A built `keras.Model`.

        Returns:
            A list of `keras.Variable`s (empty when the model has none).
        """
        return projection.prunable_variables(
            model,
            include_biases=self.biases,
            include_normalization=self.normalization,
            include_embeddings=self.embeddings,
        )

    def summary(self, model):
        """The zero fractions of `model`'s prunable weights and of all its parameters
        (`keras_fip.core.projection.SparsitySummary`)."""
        return projection.sparsity_summary(model, self.variables(model))

    def get_config(self):
        return {
            "biases": self.biases,
            "normalization": self.normalization,
            "embeddings": self.embeddings,
        }


def get(prunable):
    """A `Prunable` from a `Prunable`, its config or `None` (the defaults)."""
    return config.resolve(prunable, Prunable, "prunable")
