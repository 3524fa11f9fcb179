"""Tests for re-estimating BatchNormalization moving statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fip.core.normalization import batch_normalization_layers
from keras_fip.core.normalization import recalibrate_batch_normalization


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(7, name="hidden")(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.99, name="norm")(hidden)
    inner = keras.Sequential(
        [
            keras.Input((7,)),
            keras.layers.Dense(4, name="inner_dense"),
            keras.layers.BatchNormalization(name="inner_norm"),
        ],
        name="inner",
    )
    return keras.Model(inputs, keras.layers.Dense(3)(inner(hidden)))


def _data(n=300):
    return np.random.default_rng(1).normal(4.0, 3.0, (n, 5)).astype("float32")


def test_moving_statistics_become_the_average_of_the_batch_statistics():
    model = _model()
    x = _data()
    trainable = [v.numpy().copy() for v in model.trainable_variables]
    assert recalibrate_batch_normalization(model, x, batch_size=100) == 2
    kernel, bias = model.get_layer("hidden").get_weights()
    hidden = x @ kernel + bias
    batches = [hidden[i : i + 100] for i in range(0, len(x), 100)]
    norm = model.get_layer("norm")
    np.testing.assert_allclose(
        norm.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), rtol=1e-4
    )
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), np.mean([b.var(0) for b in batches], 0), rtol=1e-4
    )
    # Nested layers are found; their momentum is left as it was; weights are untouched.
    inner = model.get_layer("inner").get_layer("inner_norm")
    assert not np.allclose(inner.moving_mean.numpy(), 0.0)
    assert norm.momentum == 0.99 and inner.momentum == 0.99
    for before, variable in zip(trainable, model.trainable_variables):
        np.testing.assert_array_equal(before, variable.numpy())
    # Recalibrated on the whole set as one batch, inference mode equals training mode.
    recalibrate_batch_normalization(model, x, batch_size=len(x))
    np.testing.assert_allclose(
        model(x, training=False), model(x, training=True), rtol=1e-4, atol=1e-4
    )


def test_a_model_without_batch_normalization_is_left_alone():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    weights = [w.copy() for w in model.get_weights()]
    assert batch_normalization_layers(model) == []
    assert recalibrate_batch_normalization(model, _data()) == 0
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_datasets_tuples_and_max_examples():
    x = _data()
    results = []
    for data in (x[:200], (x, np.zeros(len(x))), tf.data.Dataset.from_tensor_slices(x[:200])):
        model = _model()
        max_examples = None if isinstance(data, np.ndarray) else 200
        recalibrate_batch_normalization(model, data, batch_size=50, max_examples=max_examples)
        results.append(model.get_layer("norm").moving_mean.numpy())
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"max_examples": 0}, "Received: max_examples=0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recalibrate_batch_normalization(_model(), _data(), **kwargs)
