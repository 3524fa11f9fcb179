"""Tests for the output distances."""

import numpy as np
import pytest
import scipy.special
import tensorflow as tf

from keras_fip.engine import distances


def _logits(seed, shape=(6, 5), scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32") * scale


def _value_and_gradient(distance, outputs, reference):
    outputs = tf.constant(outputs)
    with tf.GradientTape() as tape:
        tape.watch(outputs)
        value = distance(outputs, tf.constant(reference))
    return value.numpy(), tape.gradient(value, outputs).numpy()


@pytest.mark.parametrize("name", ["l2", "kl", "bhattacharyya"])
def test_distance_and_gradient_exactly_zero_at_reference(name):
    logits = _logits(0)
    value, gradient = _value_and_gradient(distances.get(name), logits, logits.copy())
    assert value == 0.0
    assert np.all(gradient == 0.0)


def test_squared_l2_matches_numpy_mean_over_batch():
    outputs, reference = _logits(1), _logits(2)
    expected = np.mean(np.sum((outputs - reference) ** 2, axis=-1))
    np.testing.assert_allclose(distances.squared_l2(outputs, reference), expected, rtol=1e-6)


def test_kl_matches_scipy_reference():
    outputs, reference = _logits(3), _logits(4)
    p = scipy.special.softmax(outputs.astype("float64"), axis=-1)
    q = scipy.special.softmax(reference.astype("float64"), axis=-1)
    expected = np.mean(np.sum(q * (np.log(q) - np.log(p)), axis=-1))
    np.testing.assert_allclose(distances.kl(outputs, reference), expected, rtol=1e-5)


def test_kl_gradient_matches_autodiff_of_plain_formula():
    outputs, reference = _logits(5), _logits(6)

    def plain_kl(o, r):
        log_p = tf.nn.log_softmax(o)
        log_q = tf.nn.log_softmax(r)
        return tf.reduce_mean(tf.reduce_sum(tf.exp(log_q) * (log_q - log_p), -1))

    _, custom = _value_and_gradient(distances.kl, outputs, reference)
    _, plain = _value_and_gradient(plain_kl, outputs, reference)
    np.testing.assert_allclose(custom, plain, atol=1e-6)


def test_bhattacharyya_matches_probability_formula():
    outputs, reference = _logits(7), _logits(8)
    p = scipy.special.softmax(outputs.astype("float64"), axis=-1)
    q = scipy.special.softmax(reference.astype("float64"), axis=-1)
    expected = np.mean(-np.log(np.sum(np.sqrt(p * q), axis=-1)))
    np.testing.assert_allclose(distances.bhattacharyya(outputs, reference), expected, rtol=1e-5)


def test_softmax_distances_stable_for_confident_logits():
    outputs = np.array([[200.0, -200.0, 0.0]], "float32")
    reference = np.array([[-200.0, 200.0, 0.0]], "float32")
    for distance in (distances.kl, distances.bhattacharyya):
        value, gradient = _value_and_gradient(distance, outputs, reference)
        assert np.isfinite(value) and value > 100.0
        assert np.all(np.isfinite(gradient))


def test_distances_are_batch_size_invariant():
    outputs, reference = _logits(9, (4, 5)), _logits(10, (4, 5))
    doubled = (np.concatenate([outputs] * 2), np.concatenate([reference] * 2))
    for name in ("l2", "kl", "bhattacharyya"):
        distance = distances.get(name)
        np.testing.assert_allclose(distance(*doubled), distance(outputs, reference), rtol=1e-6)


def test_get_rejects_unknown_name():
    with pytest.raises(ValueError, match="Received: distance='cosine'"):
        distances.get("cosine")


def test_get_accepts_callable_and_serialize_round_trips_names():
    def custom(outputs, reference_outputs):
        return tf.reduce_mean(tf.abs(outputs - reference_outputs))

    assert distances.get(custom) is custom
    for name in ("l2", "kl", "bhattacharyya"):
        assert distances.get(distances.serialize(distances.get(name))) is distances.get(name)
