"""Tests for the TRS ensemble baseline: misaligned input gradients at a counted compute."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.baselines import trs_ensemble
from keras_fip.baselines.trs_ensemble import PASSES_PER_MEMBER
from keras_fip.baselines.trs_ensemble import mean_pairwise_cosine


@pytest.fixture(scope="module")
def digits():
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    return x, y, x_test, y_test


def _architecture():
    keras.utils.set_random_seed(0)
    return keras_fip.models.mlp(32, input_shape=(8, 8, 1))


def _gradient_cosine(members, x, y):
    """The members' mean pairwise cosine of per-example input gradients (own code)."""
    inputs = tf.constant(x)
    gradients = []
    for member in members:
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(
                keras.losses.sparse_categorical_crossentropy(y, member(inputs), from_logits=True)
            )
        gradients.append(tape.gradient(loss, inputs).numpy().reshape(len(x), -1))
    unit = [g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12) for g in gradients]
    pairs = [(i, j) for i in range(len(unit)) for j in range(i + 1, len(unit))]
    return float(np.mean([np.mean(np.sum(unit[i] * unit[j], -1)) for i, j in pairs]))


def test_members_gradients_are_less_aligned_than_a_deep_ensembles(digits):
    x, y, x_test, y_test = digits
    model = _architecture()
    ensemble, info = trs_ensemble(
        model, x, y, num_members=3, epochs=12, batch_size=64, learning_rate=3e-3
    )
    deep = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        member = keras.models.clone_model(model)
        keras_fip.models.train_classifier(
            member, x, y, epochs=12, batch_size=64, learning_rate=3e-3
        )
        deep.append(member)
    members = keras_fip.ensemble_members(ensemble)
    trs_cosine = _gradient_cosine(members, x_test[:200], y_test[:200])
    deep_cosine = _gradient_cosine(deep, x_test[:200], y_test[:200])
    assert trs_cosine < deep_cosine - 0.3, (trs_cosine, deep_cosine)
    # The diversity does not cost the ensemble its accuracy.
    accuracy = keras_fip.robustness.accuracy(ensemble, x_test, y_test)
    deep_accuracy = np.mean([keras_fip.robustness.accuracy(m, x_test, y_test) for m in deep])
    assert accuracy > deep_accuracy - 0.03, (accuracy, deep_accuracy)
    # Compute: K·epochs·N·(PASSES_PER_MEMBER + attack_steps) example passes.
    assert info["train_examples"] == 3 * 12 * len(x) * (PASSES_PER_MEMBER + 3)
    # The input model is the architecture only: not trained, not changed.
    assert all(m is not model for m in members)


def test_mean_pairwise_cosine_matches_numpy():
    rng = np.random.default_rng(0)
    gradients = [rng.normal(size=(5, 7)).astype("float32") for _ in range(3)]
    unit = [g / np.linalg.norm(g, axis=-1, keepdims=True) for g in gradients]
    expected = np.mean(
        [np.mean(np.sum(unit[i] * unit[j], -1)) for i, j in ((0, 1), (0, 2), (1, 2))]
    )
    value = float(mean_pairwise_cosine([tf.constant(g) for g in gradients]))
    assert value == pytest.approx(expected, abs=1e-6)


def test_trs_ensemble_rejects_bad_arguments(digits):
    x, y, _, _ = digits
    model = _architecture()
    for arguments, name in (
        ({"num_members": 1}, "num_members"),
        ({"alignment": -1.0}, "alignment"),
        ({"smoothness": "big"}, "smoothness"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"initial_epsilon": 0.0}, "initial_epsilon"),
        ({"attack_steps": 0}, "attack_steps"),
        ({"learning_rate": [1e-3, 3e-3]}, "learning_rate"),
        ({"combine": "vote"}, "combine"),
    ):
        with pytest.raises(ValueError, match=name):
            trs_ensemble(model, x[:50], y[:50], epochs=1, **arguments)
