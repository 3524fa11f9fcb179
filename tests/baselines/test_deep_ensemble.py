"""Tests for the ensemble baselines: deep ensemble, FGE and snapshot ensemble."""

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import baselines
from keras_fip.baselines.deep_ensemble import fge_learning_rate
from keras_fip.baselines.deep_ensemble import snapshot_learning_rate


@pytest.fixture(scope="module")
def digits():
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    keras.utils.set_random_seed(0)
    model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
    keras_fip.models.train_classifier(model, x, y, epochs=10, batch_size=64, learning_rate=3e-3)
    return model, x, y, x_test, y_test


def _flat(model):
    return np.concatenate([np.ravel(w) for w in model.get_weights()])


def _accuracy(model, x, y):
    return float(np.mean(np.asarray(model(x)).argmax(-1) == y))


def test_deep_ensemble_trains_independent_accurate_members(digits):
    model, x, y, x_test, y_test = digits
    before = _flat(model)
    ensemble, info = baselines.deep_ensemble(
        model, x, y, num_members=3, epochs=6, batch_size=64, learning_rate=3e-3, seed=5
    )
    np.testing.assert_array_equal(_flat(model), before)
    members = keras_fip.ensemble_members(ensemble)
    assert len(members) == 3
    assert info == {"train_examples": 3 * 6 * len(x), "epochs": 18, "num_members": 3}
    # Different initialisations: members far apart, each one accurate.
    assert np.linalg.norm(_flat(members[0]) - _flat(members[1])) > 5.0
    accuracies = [_accuracy(member, x_test, y_test) for member in members]
    assert min(accuracies) > 0.85
    assert _accuracy(ensemble, x_test, y_test) >= np.mean(accuracies)
    np.testing.assert_allclose(np.asarray(ensemble(x_test)).sum(-1), 1.0, atol=1e-5)


def test_fge_collects_members_at_the_low_learning_rate(digits):
    model, x, y, x_test, y_test = digits
    ensemble, info = baselines.fast_geometric_ensemble(
        model, x, y, num_members=3, cycle_epochs=2, learning_rates=(2e-2, 2e-4), batch_size=64
    )
    members = keras_fip.ensemble_members(ensemble)
    assert len(members) == 3
    steps_per_epoch = int(np.ceil(len(x) / 64))
    cycle = 2 * steps_per_epoch
    assert info["train_examples"] == (2 * cycle + cycle // 2) * 64
    # Members are near the trained network (same basin) but not equal to it or each other.
    start = _flat(model)
    for member in members:
        assert 0.0 < np.linalg.norm(_flat(member) - start) < np.linalg.norm(start)
        assert _accuracy(member, x_test, y_test) > 0.85
    assert np.linalg.norm(_flat(members[0]) - _flat(members[1])) > 0.0
    assert _accuracy(ensemble, x_test, y_test) > 0.9


def test_snapshot_ensemble_takes_one_snapshot_per_cycle(digits):
    model, x, y, x_test, y_test = digits
    ensemble, info = baselines.snapshot_ensemble(
        model, x, y, num_members=2, epochs=8, learning_rate=0.1, batch_size=64
    )
    assert info == {"train_examples": 8 * len(x), "epochs": 8, "num_members": 2}
    first, second = keras_fip.ensemble_members(ensemble)
    assert np.linalg.norm(_flat(first) - _flat(second)) > 0.0
    assert _accuracy(ensemble, x_test, y_test) > 0.85


def test_cyclic_learning_rates_follow_the_papers():
    # FGE: α₁ at the cycle's start and end, α₂ half-way, linear in between.
    rates = [fge_learning_rate(i, 4, 0.05, 0.0005) for i in range(1, 9)]
    np.testing.assert_allclose(rates, [0.02525, 0.0005, 0.02525, 0.05] * 2)
    # Snapshot: cosine from α₀ to near zero, restarted each cycle.
    assert snapshot_learning_rate(1, 100, 5, 0.1) == pytest.approx(0.1)
    assert snapshot_learning_rate(21, 100, 5, 0.1) == pytest.approx(0.1)
    assert snapshot_learning_rate(20, 100, 5, 0.1) < 0.001


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_members=0), "num_members"),
        (dict(epochs=0), "epochs"),
        (dict(combine="vote"), "combine"),
    ],
)
def test_bad_arguments_raise(digits, kwargs, match):
    model, x, y, _, _ = digits
    with pytest.raises(ValueError, match=match):
        baselines.deep_ensemble(model, x, y, **kwargs)


def test_ensembles_of_a_softmax_model_average_its_probabilities(digits):
    _, x, y, x_test, y_test = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    keras_fip.models.train_classifier(model, x, y, epochs=5, batch_size=64, learning_rate=3e-3)
    built = {
        "deep": baselines.deep_ensemble(
            model, x, y, num_members=2, epochs=6, batch_size=64, learning_rate=3e-3
        )[0],
        "fge": baselines.fast_geometric_ensemble(
            model, x, y, num_members=2, cycle_epochs=1, learning_rates=(1e-2, 1e-4)
        )[0],
        "snapshot": baselines.snapshot_ensemble(model, x, y, num_members=2, epochs=4)[0],
    }
    for name, ensemble in built.items():
        members = keras_fip.ensemble_members(ensemble)
        probabilities = [np.asarray(m(x_test), "float64") for m in members]
        np.testing.assert_allclose(probabilities[0].sum(-1), 1.0, atol=1e-5)
        outputs = np.asarray(ensemble(x_test), "float64")
        # The mean of the members' probabilities (not of a softmax of them).
        np.testing.assert_allclose(outputs, np.mean(probabilities, 0), atol=1e-6, err_msg=name)
        # As confident as the members (a softmax of probabilities is nearly uniform).
        confidence = np.mean([p.max(-1).mean() for p in probabilities])
        assert outputs.max(-1).mean() > 0.8 * confidence, name
        assert _accuracy(ensemble, x_test, y_test) > 0.85, name
