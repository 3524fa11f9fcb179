"""Shared networks of the robustness tests: three MLPs trained on the digits."""

import keras
import pytest

import keras_fip


def train_mlp(seed, x, y, width=32, epochs=12):
    """An MLP of `width` hidden units trained on `(x, y)` from seed `seed`."""
    keras.utils.set_random_seed(seed)
    model = keras_fip.models.mlp(width, input_shape=(8, 8, 1))
    keras_fip.models.train_classifier(model, x, y, epochs=epochs, batch_size=64, learning_rate=3e-3)
    return model


@pytest.fixture(scope="package")
def digit_networks():
    """`(models, x_test, y_test)`: three MLPs (seeds 0, 1, 2) and 120 test digits."""
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    return [train_mlp(seed, x, y) for seed in range(3)], x_test[:120], y_test[:120]
