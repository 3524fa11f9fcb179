import keras
import numpy as np
import pytest

from keras_fip.geometry import breakdown_acceleration
from keras_fip.geometry import breakdown_speed
from keras_fip.geometry import path_length
from tests.geometry.conftest import dense_metric
from tests.geometry.conftest import tiny_conv_bn
from tests.geometry.conftest import tiny_mlp


def _flat(weights):
    return np.concatenate([np.reshape(w, [-1]) for w in weights])


def _random_path(model, num_points, scale, seed):
    rng = np.random.default_rng(seed)
    points = [model.get_weights()]
    for _ in range(num_points - 1):
        points.append([w + scale * rng.normal(size=w.shape) for w in points[-1]])
    return points


def _dense_speeds(model, points, inputs, times):
    speeds = []
    for index in range(len(points) - 1):
        at_point = keras.models.clone_model(model)
        at_point.set_weights(points[index])
        following = keras.models.clone_model(model)
        following.set_weights(points[index + 1])
        velocity = (
            _flat([np.asarray(v) for v in following.trainable_variables])
            - _flat([np.asarray(v) for v in at_point.trainable_variables])
        ) / (times[index + 1] - times[index])
        speeds.append(velocity @ dense_metric(at_point, inputs) @ velocity)
    return np.array(speeds)


def test_speed_length_and_acceleration_match_dense_metric():
    model = tiny_conv_bn()
    before = [np.array(w) for w in model.get_weights()]
    inputs = np.random.default_rng(0).uniform(size=(6, 5, 5, 1))
    points = _random_path(model, 4, 0.05, seed=1)
    times = np.array([0.0, 0.5, 2.0, 2.5])
    expected = _dense_speeds(model, points, inputs, times)

    speeds = breakdown_speed(points, inputs, model=model, times=times)
    np.testing.assert_allclose(speeds, expected, rtol=1e-10)
    length = path_length(points, inputs, model=model, times=times)
    assert length == pytest.approx(np.sum(expected * np.diff(times)), rel=1e-10)
    acceleration = breakdown_acceleration(points, inputs, model=model, times=times)
    np.testing.assert_allclose(acceleration, np.diff(expected) / np.diff(times)[:-1], rtol=1e-9)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_models_and_trainable_lists_are_accepted_points():
    model = tiny_mlp()
    inputs = np.random.default_rng(2).normal(size=(5, 4))
    points = _random_path(model, 3, 0.1, seed=3)
    models = []
    for weights in points:
        copy = keras.models.clone_model(model)
        copy.set_weights(weights)
        models.append(copy)
    from_lists = breakdown_speed(points, inputs, model=model)
    np.testing.assert_allclose(breakdown_speed(models, inputs), from_lists, rtol=1e-12)
    assert path_length(models, inputs) == pytest.approx(np.sum(from_lists), rel=1e-12)


def test_path_through_a_disconnected_unit_has_zero_speed():
    model = tiny_mlp()
    weights = model.get_weights()
    weights[2][0, :] = 0.0  # Hidden unit 0 feeds nothing into the logits.
    moved = [w.copy() for w in weights]
    moved[0][:, 0] += 1.0  # Move only its incoming weights and bias.
    moved[1][0] -= 2.0
    inputs = np.random.default_rng(4).normal(size=(5, 4))
    speeds = breakdown_speed([weights, moved, weights], inputs, model=model)
    np.testing.assert_array_equal(speeds, 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"points": "abc"}, "points"),
        ({"times": [0.0, 0.0, 1.0]}, "times"),
        ({"times": [0.0, 1.0]}, "times"),
        ({"model": None}, "model"),
        ({"model": "mlp"}, "model"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    model = tiny_mlp()
    arguments = {
        "points": _random_path(model, 3, 0.1, seed=5),
        "data": np.zeros((2, 4)),
        "model": model,
        **kwargs,
    }
    with pytest.raises(ValueError, match=f"`{message}`"):
        breakdown_speed(**arguments)


def test_too_few_points_for_acceleration_raises():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="at least 3"):
        breakdown_acceleration(_random_path(model, 2, 0.1, seed=6), np.zeros((2, 4)), model=model)
