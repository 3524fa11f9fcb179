"""Fixtures of the operation tests."""

import keras
import pytest

from keras_fip import data
from keras_fip import models


@pytest.fixture(scope="module")
def trained():
    """A digits MLP trained for 10 epochs, with the digits `(model, x, y)` (a module's
    own `trained` fixture takes precedence)."""
    keras.utils.set_random_seed(0)
    x, y = data.load("digits")
    model = models.mlp(64, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=10, batch_size=64, learning_rate=3e-3)
    return model, x, y
