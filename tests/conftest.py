"""Shared test set-up: quiet TensorFlow, two logical CPUs for distribution tests."""

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so `tf.distribute.MirroredStrategy` tests run on one CPU.
# This must happen before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
except RuntimeError:  # Devices already initialised by an earlier import.
    pass


# The Adversarial Robustness Toolbox configures logging when first imported
# (`logging.config.dictConfig`, which closes every open handler, pytest's capture handlers
# included, so a later test fails with "I/O operation on closed file"), and on a machine
# without `~/.art/config.json` it writes that file at import time without a lock. Importing
# it here, before pytest installs its handlers and before the xdist workers start (the
# controller loads this file first), avoids both.
if importlib.util.find_spec("art") is not None:
    import art  # noqa: E402, F401


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one `MirroredStrategy` over the two logical CPUs that every test shares.

    Several MirroredStrategy objects in one process collide on collective-op keys (a
    "shape mismatch in the collective instance" error), so tests never create their own.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def digits():
    """`(x, y, x_test, y_test)`: scikit-learn's digits as float32 (N, 8, 8, 1) images."""
    from keras_fip import data

    x, y = data.load("digits")
    x_test, y_test = data.load("digits", "test")
    return x.astype("float32"), y, x_test.astype("float32"), y_test


@pytest.fixture(scope="session")
def trained_small_mlp(digits):
    """A 24-16 MLP trained on the digits (operations never mutate their input, so tests
    share it)."""
    import keras

    from keras_fip import models

    x, y, _, _ = digits
    keras.utils.set_random_seed(0)
    model = models.mlp((24, 16), input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=20, batch_size=64, learning_rate=3e-3)
    return model
