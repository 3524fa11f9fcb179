import hashlib

import numpy as np
import pytest

import keras_fip
from keras_fip.baselines import prune_retrain
from keras_fip.operations import hidden_units


@pytest.fixture(scope="module")
def trained(trained_small_mlp):
    return trained_small_mlp


def _fingerprint(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def test_prune_retrain_deletes_exactly_the_units_with_exact_zeros(digits, trained):
    x, y, x_test, y_test = digits
    units = {"dense_1": [0, 3, 5, 7, 11], "dense_2": [1, 2]}
    before = _fingerprint(trained)
    pruned, history = prune_retrain(
        trained,
        units,
        (x, y),
        (x_test, y_test),
        units_per_round=2,
        steps_per_round=3,
        epochs=2,
        learning_rate=0.05,
        evaluations_per_epoch=4,
        seed=0,
    )
    assert _fingerprint(trained) == before  # No mutation.
    listing = hidden_units(pruned)
    assert listing["dense_1"][1] == units["dense_1"]
    assert listing["dense_2"][1] == units["dense_2"]
    # Incoming kernel columns, biases and outgoing rows are exactly zero, and masked.
    weights = {v.path: np.asarray(v.numpy()) for v in pruned.trainable_variables}
    layer = {layer.name: layer for layer in pruned.layers}
    assert np.all(layer["dense_1"].kernel.numpy()[:, units["dense_1"]] == 0)
    assert np.all(layer["dense_1"].bias.numpy()[units["dense_1"]] == 0)
    assert np.all(layer["dense_2"].kernel.numpy()[units["dense_1"], :] == 0)
    assert np.all(layer["logits"].kernel.numpy()[units["dense_2"], :] == 0)
    assert len(keras_fip.masks(pruned)) == 5
    # The surviving weights were retrained.
    kept = np.setdiff1d(np.arange(weights["dense_1/kernel"].shape[1]), units["dense_1"])
    before = trained.get_layer("dense_1").kernel.numpy()[:, kept]
    assert not np.allclose(weights["dense_1/kernel"][:, kept], before)
    # 7 units, 2 per round: deleted at steps 0, 3, 6, 9 → all gone at step 9.
    steps_per_epoch = -(-len(x) // 128)
    assert history["pruned_at"] == pytest.approx(9 / steps_per_epoch)
    assert history["steps"] == 2 * steps_per_epoch
    assert len(history["epoch"]) == len(history["val_accuracy"]) == 9
    assert history["undamaged_accuracy"] == history["val_accuracy"][0]
    recover = history["epochs_to_recover"]
    assert recover is None or recover >= history["pruned_at"]


def test_prune_retrain_stops_at_target_once_everything_is_deleted(digits, trained):
    x, y, x_test, y_test = digits
    _, history = prune_retrain(
        trained,
        {"dense_1": [0, 1]},
        (x, y),
        (x_test, y_test),
        epochs=3,
        learning_rate=0.02,
        target=0.2,
        evaluations_per_epoch=4,
        stop_at_target=True,
        seed=0,
    )
    assert history["epochs_to_recover"] is not None
    assert history["epoch"][-1] == pytest.approx(history["epochs_to_recover"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"units": {"dense_9": [0]}}, "dense_9"),
        ({"units": {"dense_1": [99]}}, "units"),
        ({"units": [0, 1]}, "units"),
        ({"units_per_round": 0}, "units_per_round"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_arguments_raise_value_error(digits, trained, kwargs, match):
    x, y, x_test, y_test = digits
    arguments = {"units": {"dense_1": [0]}, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_retrain(trained, data=(x, y), validation_data=(x_test, y_test), **arguments)


def test_unlabelled_data_raises(digits, trained):
    x, _, x_test, y_test = digits
    with pytest.raises(ValueError):
        prune_retrain(trained, {"dense_1": [0]}, x, (x_test, y_test))
