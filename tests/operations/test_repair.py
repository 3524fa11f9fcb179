import hashlib
import math
import os

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import models
from keras_fip.operations.damage import Damage
from keras_fip.operations.damage_reference import damage_reference
from keras_fip.operations.faults import Nodes
from keras_fip.operations.repair import FIP
from keras_fip.operations.repair import Embryonic
from keras_fip.operations.repair import OutputLayerSolver
from keras_fip.operations.repair import Repair
from keras_fip.operations.repair import Retrain
from keras_fip.operations.repair import recovery_path
from tests.operations.contract import run_operation_contract

# ⌈1437 / 128⌉ steps of 128 examples: the digits' training epoch.
EPOCH_EXAMPLES = 12 * 128


@pytest.fixture(scope="module")
def trained(digits):
    x, y, _, _ = digits
    keras.utils.set_random_seed(0)
    model = models.mlp(64, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=30, batch_size=64, learning_rate=3e-3)
    return model


@pytest.fixture(scope="module")
def damaged(trained):
    return Damage(Nodes(0.6), seed=0)(trained)


def _fingerprint(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    for key, mask in sorted(keras_fip.masks(model).items()):
        digest.update(key.encode() + np.ascontiguousarray(mask).tobytes())
    return digest.hexdigest()


def _damaged_entries(model, damaged):
    """Per trainable variable of `model`: its values at `damaged`'s damage-masked entries."""
    reference = damage_reference(damaged)
    return [
        np.asarray(v.numpy())[~mask]
        for v, mask in zip(model.trainable_variables, reference.damage_masks)
        if mask is not None
    ]


def _accuracy(model, x, y):
    return models.evaluate_classifier(model, x, y)["accuracy"]


def _walk(epochs=1, learning_rate=None, seed=0, **kwargs):
    """A quiet seeded walk of `epochs`, at a Penalty rate if given."""
    rule = None if learning_rate is None else keras_fip.rules.Penalty(learning_rate)
    return keras_fip.Walk(epochs=epochs, rule=rule, seed=seed, verbose=0, **kwargs)


def _solver(examples, **kwargs):
    """A FIP whose walk starts with the given solves."""
    return FIP(solver=OutputLayerSolver(examples, **kwargs))


# The shared contract.


def test_repair_meets_the_operation_contract():
    # Repair towards the model itself (undamaged=): a walk that keeps the function.
    run_operation_contract(
        lambda model, x, y: Repair(x, undamaged=model, validation_split=0.25, walk=_walk())
    )


def test_chain_of_damage_and_repair_equals_repair_of_damage(digits, trained):
    x, y, _, _ = digits

    def operations():
        return (
            Damage(Nodes(0.25), seed=1),
            Repair((x, y), method="retrain", walk=_walk()),
        )

    keras.utils.set_random_seed(0)
    damage, repair = operations()
    sequential = repair(damage(trained))
    keras.utils.set_random_seed(0)
    chained = keras_fip.chain(*operations())(trained)
    np.testing.assert_allclose(chained(x[:64]), sequential(x[:64]), atol=1e-5)
    assert damage_reference(chained).records[-1]["kind"] == "repair"


def test_one_repair_object_gives_independent_results_on_models_and_calls(digits, trained):
    x, y, _, _ = digits
    keras.utils.set_random_seed(1)
    other = models.mlp(48, input_shape=(8, 8, 1))
    models.train_classifier(other, x, y, epochs=3, batch_size=64, learning_rate=3e-3)
    damage = Damage(Nodes(0.5), seed=2)
    damaged = [damage(trained), damage(other)]
    for method in ("fip", "retrain"):
        op = Repair((x, y), method=method, walk=_walk(1, 3e-3))
        results = [op(damaged[0])]
        first_history = op.history
        results += [op(damaged[1]), op(damaged[0])]
        # The second call (another model) is what a fresh object gives on that model, and
        # the third (the first model again) is the first call's, its history too.
        assert _fingerprint(results[1]) == _fingerprint(
            Repair((x, y), method=method, walk=_walk(1, 3e-3))(damaged[1])
        )
        assert _fingerprint(results[2]) == _fingerprint(results[0])
        assert op.history is not first_history
        assert op.history["val_accuracy"] == first_history["val_accuracy"]
        assert op.history["undamaged_accuracy"] == first_history["undamaged_accuracy"]
        # Each result repairs towards its own undamaged network.
        restored = damage_reference(results[1]).restore(results[1])
        assert _fingerprint(restored) == _fingerprint(other)


# Each method.


def test_fip_repair_recovers_inputs_only_with_damaged_weights_exactly_zero(
    digits, trained, damaged
):
    x, _, x_test, y_test = digits
    before = _fingerprint(damaged)
    op = Repair(x, validation_data=(x_test, y_test), walk=_walk(6))
    repaired = op(damaged)
    assert _fingerprint(damaged) == before  # No mutation.
    assert all(np.all(v == 0.0) for v in _damaged_entries(repaired, damaged))
    # The masks travel: exactly those of the damaged network.
    assert {k: m.tolist() for k, m in keras_fip.masks(repaired).items()} == {
        k: m.tolist() for k, m in keras_fip.masks(damaged).items()
    }
    # Recovery: most of the lost accuracy comes back on held-out data.
    undamaged, hurt = _accuracy(trained, x_test, y_test), _accuracy(damaged, x_test, y_test)
    assert hurt < undamaged - 0.1
    assert _accuracy(repaired, x_test, y_test) > hurt + 0.5 * (undamaged - hurt)
    history = op.history
    assert history["undamaged_accuracy"] == pytest.approx(undamaged)
    assert history["val_accuracy"][0] == pytest.approx(hurt)
    assert history["beta"] == 0.0  # Inputs only: the pure function recovery.
    # The defaults on an MLP: the solves (an output-only batch, 4 sweeps, a last output
    # solve: six batches, half an epoch of the 1437 inputs), then the walk for the rest
    # of the 6 epochs of ⌈1437/128⌉ = 12 steps, evaluated 20 times an epoch (every step).
    solves = len(history["epoch"]) - 1 - len(history["distance"])
    assert solves == 6
    assert 0.4 < history["solve_epochs"] <= 0.5
    walk = 6 * 12 - math.ceil(history["solve_epochs"] * 12)
    assert len(history["distance"]) == walk
    assert history["steps"] == pytest.approx(walk + history["solve_epochs"] * 12)
    assert history["epoch"][-1] == pytest.approx(history["epochs"])
    assert 71 / 12 < history["epochs"] <= 6.0
    # The pure walk (no solve), measured once an epoch.
    walk_only = Repair(
        x,
        method=FIP(solver=None),
        validation_data=(x_test, y_test),
        evaluations_per_epoch=1,
        walk=_walk(6),
    )
    walked = walk_only(damaged)
    history = walk_only.history
    assert len(history["epoch"]) == len(history["val_accuracy"]) == 7
    assert history["epoch"][-1] == pytest.approx(6.0)
    assert len(history["distance"]) == history["steps"] == 6 * 12
    assert history["epochs"] == pytest.approx(6.0)
    assert _accuracy(walked, x_test, y_test) > hurt + 0.3 * (undamaged - hurt)


def _softmax_twin(model):
    """The same network (the same weights) ending in a softmax instead of logits."""
    last = model.layers[-1]

    def clone(layer):
        config = layer.get_config()
        if layer is last:
            config["activation"] = "softmax"
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(walk=_walk(2)),  # The defaults: solves, then the walk with the labels' term.
        dict(method="retrain", walk=_walk(1, 3e-3)),
        dict(method="embryonic", walk=_walk(1, 3e-3)),
    ],
    ids=["fip", "retrain", "embryonic"],
)
def test_repair_of_a_softmax_model_equals_the_repair_of_its_logits_twin(digits, trained, kwargs):
    x, y, x_test, y_test = digits
    twin = _softmax_twin(trained)
    assert keras_fip.core.outputs.output_kind(twin) == "probabilities"
    repaired = []
    for model in (trained, twin):
        damaged = Damage(Nodes(0.6), seed=0)(model)
        op = Repair((x, y), validation_data=(x_test, y_test), **kwargs)
        repaired.append(op(damaged))
        if kwargs.get("method") != "embryonic":  # Embryonic releases the damaged weights.
            assert all(np.all(v == 0.0) for v in _damaged_entries(repaired[-1], damaged))
    # The softmax model's logits are its log-probabilities: the same solves (on the output
    # layer's pre-activation), the same cross-entropy and KL, the same weights.
    for a, b in zip(repaired[0].get_weights(), repaired[1].get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-4)
    np.testing.assert_allclose(
        keras.ops.softmax(repaired[0](x_test)), repaired[1](x_test), atol=1e-4
    )
    hurt = _accuracy(Damage(Nodes(0.6), seed=0)(twin), x_test, y_test)
    undamaged = _accuracy(twin, x_test, y_test)
    assert _accuracy(repaired[1], x_test, y_test) > hurt + 0.5 * (undamaged - hurt)


def test_recovery_path_of_a_softmax_model_equals_its_logits_twin(digits, trained, damaged):
    x, _, _, _ = digits
    masks = damage_reference(damaged).damage_masks
    paths = [
        recovery_path(model, masks, x[:256], num_points=3, steps_per_point=3, seed=0)[0]
        for model in (trained, _softmax_twin(trained))
    ]
    for first, second in zip(paths[0], paths[1]):
        for a, b in zip(first, second):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_fip_repair_uses_the_labels_by_default(digits, damaged):
    x, y, x_test, y_test = digits
    common = dict(validation_data=(x_test, y_test), method=FIP(solver=None))
    labelled = Repair((x, y), walk=_walk(2), **common)
    chosen = labelled(damaged)
    # β "auto" with labels walks the task term at weights 1 and 10 and keeps the network
    # most accurate on the validation split at the end.
    candidates = labelled.history["candidates"]
    assert [c["beta"] for c in candidates] == [1.0, 10.0]
    best = max(candidates, key=lambda c: c["final_accuracy"])
    assert labelled.history["beta"] == best["beta"]
    assert labelled.history["val_accuracy"][-1] == best["final_accuracy"]
    assert labelled.history["epochs"] == pytest.approx(2.0)  # One walk's epochs.
    assert np.all(np.isfinite(labelled.history["secondary_loss"]))
    # The kept network is the walk at that weight.
    explicit = Repair((x, y), walk=_walk(2, beta=best["beta"]), **common)
    for a, b in zip(chosen.get_weights(), explicit(damaged).get_weights()):
        np.testing.assert_array_equal(a, b)
    assert explicit.history["val_accuracy"] == labelled.history["val_accuracy"]
    # Inputs only is the walk without the labels (weight 0).
    inputs_only = Repair(x, walk=_walk(2), **common)
    without = Repair((x, y), walk=_walk(2, beta=0.0), **common)
    weights = [op(damaged).get_weights() for op in (inputs_only, without)]
    assert inputs_only.history["beta"] == without.history["beta"] == 0.0
    assert "candidates" not in inputs_only.history
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(chosen.get_weights(), weights[0]))


@pytest.mark.parametrize("method", ["fip", "retrain"])
def test_one_hot_labels_repair_as_integer_labels(digits, damaged, method):
    x, y, x_test, y_test = digits
    one_hot = keras.utils.to_categorical(y, 10)
    # FIP at a given weight of the labels (its "auto" choice reads the same validation
    # accuracy, checked here).
    walk = _walk(1, 3e-3) if method == "retrain" else _walk(1, beta=1.0)
    kwargs = dict(method=method, walk=walk)
    ops = [
        Repair((x, labels), validation_data=(x_test, test_labels), **kwargs)
        for labels, test_labels in ((y, y_test), (one_hot, keras.utils.to_categorical(y_test)))
    ]
    repaired = [op(damaged) for op in ops]
    for a, b in zip(repaired[0].get_weights(), repaired[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert ops[0].history["val_accuracy"] == ops[1].history["val_accuracy"]
    # And with the validation split held out of `data` (its labels one-hot too).
    split = Repair((x, one_hot), **kwargs)
    split(damaged)
    assert split.history["undamaged_accuracy"] > 0.8


def test_epochs_to_recover_is_the_first_evaluation_within_target(digits, damaged):
    x, y, x_test, y_test = digits
    op = Repair(
        (x, y),
        method="retrain",
        validation_data=(x_test, y_test),
        evaluations_per_epoch=2,
        target=0.05,
        walk=_walk(4, 3e-3),
    )
    op(damaged)
    history = op.history
    within = [
        e
        for e, a in zip(history["epoch"], history["val_accuracy"])
        if a >= history["undamaged_accuracy"] - 0.05 - 1e-12
    ]
    assert history["epochs_to_recover"] == (within[0] if within else None)
    assert history["epoch"] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4], abs=0.1)
    # stop_at_target stops there.
    if within:
        early = Repair(
            (x, y),
            method="retrain",
            validation_data=(x_test, y_test),
            evaluations_per_epoch=2,
            target=0.05,
            stop_at_target=True,
            walk=_walk(4, 3e-3),
        )
        early(damaged)
        assert early.history["epoch"][-1] == pytest.approx(within[0])


def test_retrain_keeps_damaged_weights_exactly_zero(digits, damaged):
    x, y, x_test, y_test = digits
    op = Repair((x, y), method="retrain", validation_data=(x_test, y_test), walk=_walk(3, 3e-3))
    repaired = op(damaged)
    assert all(np.all(v == 0.0) for v in _damaged_entries(repaired, damaged))
    assert op.history["val_accuracy"][-1] > op.history["val_accuracy"][0]
    # Later training keeps them zero (the masks are real constraints).
    repaired.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    repaired.fit(x[:256], y[:256], epochs=1, verbose=0)
    assert all(np.all(v == 0.0) for v in _damaged_entries(repaired, damaged))


def test_embryonic_trains_only_the_released_weights(digits, damaged):
    x, y, x_test, y_test = digits
    op = Repair((x, y), method="embryonic", validation_data=(x_test, y_test), walk=_walk(3, 3e-3))
    repaired = op(damaged)
    assert keras_fip.masks(repaired) == {}  # Released.
    reference = damage_reference(damaged)
    for after, before, mask in zip(
        repaired.trainable_variables, damaged.trainable_variables, reference.damage_masks
    ):
        after, before = np.asarray(after.numpy()), np.asarray(before.numpy())
        if mask is None:
            np.testing.assert_array_equal(after, before)  # plasticity=0: frozen.
        else:
            np.testing.assert_array_equal(after[mask], before[mask])
            assert np.count_nonzero(after[~mask]) == (~mask).sum()  # Re-grown.
    assert op.history["val_accuracy"][-1] > op.history["val_accuracy"][0]


def test_release_restores_the_deleted_units_on_the_fip_path(digits, trained, damaged):
    x, _, x_test, y_test = digits
    op = Repair(x, method=FIP(release=True), validation_data=(x_test, y_test), walk=_walk(4, 3e-3))
    repaired = op(damaged)
    assert keras_fip.masks(repaired) == {}
    assert all(np.count_nonzero(v) > 0 for v in _damaged_entries(repaired, damaged))
    assert _accuracy(repaired, x_test, y_test) > _accuracy(damaged, x_test, y_test)
    # The undo of the damage stays exact.
    restored = damage_reference(repaired).restore(repaired)
    for a, b in zip(restored.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_num_paths_keeps_the_shortest_recovering_path_in_the_metric(digits, damaged):
    x, _, x_test, y_test = digits
    op = Repair(
        x,
        method=FIP(num_paths=2),
        validation_data=(x_test, y_test),
        target=0.2,
        walk=_walk(2, 3e-3),
    )
    op(damaged)
    candidates = op.history["candidates"]
    assert len(candidates) == 2 and all(c["metric_length"] > 0 for c in candidates)
    recovering = [c for c in candidates if c["epochs_to_recover"] is not None] or candidates
    chosen = min(recovering, key=lambda c: c["metric_length"])
    assert op.history["metric_length"][-1] == pytest.approx(chosen["metric_length"])


def test_reference_model_replaces_a_lost_damage_record(digits, trained, damaged):
    x, _, x_test, y_test = digits
    copy = keras_fip.engine.copy_model(damaged)  # A copy carries the masks, not the record.
    assert damage_reference(copy) is None
    op = Repair(x, undamaged=trained, validation_data=(x_test, y_test), walk=_walk())
    repaired = op(copy)
    assert op.history["undamaged_accuracy"] == pytest.approx(_accuracy(trained, x_test, y_test))
    assert all(np.all(v == 0.0) for v in _damaged_entries(repaired, damaged))


@pytest.fixture(scope="module")
def inputs_only(digits, damaged):
    """`(op, repaired)`: the defaults on inputs only, one epoch."""
    x, _, _, _ = digits
    op = Repair(x, walk=_walk())
    return op, op(damaged)


def test_masks_survive_keras_save_and_load(tmp_path, digits, inputs_only):
    x, _, _, _ = digits
    _, repaired = inputs_only
    path = os.path.join(tmp_path, "repaired.keras")
    repaired.save(path)
    loaded = keras.saving.load_model(path)
    saved, kept = keras_fip.masks(repaired), keras_fip.masks(loaded)
    assert len(saved) == len(kept) == 3  # Kernel, bias, next kernel of the deleted units.
    assert sorted(int((~m).sum()) for m in saved.values()) == sorted(
        int((~m).sum()) for m in kept.values()
    )
    np.testing.assert_array_equal(loaded(x[:16]), repaired(x[:16]))


def test_repair_without_labels_measures_agreement_with_the_undamaged_network(inputs_only):
    op, _ = inputs_only
    assert op.history["undamaged_accuracy"] == 1.0
    assert op.history["val_accuracy"][-1] > op.history["val_accuracy"][0]


def test_solve_output_layer_starts_from_the_least_squares_readout(digits, trained, damaged):
    x, _, x_test, y_test = digits
    # A learning rate so small that the walk leaves the solved layer as it is.
    op = Repair(
        x,
        method=_solver(10 * len(x), sweeps=0, temperature=None),
        validation_data=(x_test, y_test),
        walk=_walk(1, 1e-12),
    )
    repaired = op(damaged)
    features = keras.Model(damaged.input, damaged.get_layer("logits").input)
    design = np.concatenate([np.asarray(features(x), np.float64), np.ones((len(x), 1))], 1)
    _, deleted = keras_fip.operations.hidden_units(damaged)["dense_1"]
    alive = np.setdiff1d(np.arange(64), deleted)
    rows = np.append(alive, 64)
    expected, *_ = np.linalg.lstsq(design[:, rows], np.asarray(trained(x), np.float64), rcond=None)
    kernel, bias = repaired.get_layer("logits").get_weights()
    np.testing.assert_allclose(kernel[alive], expected[:-1], atol=2e-3)
    np.testing.assert_allclose(bias, expected[-1], atol=2e-3)
    assert np.all(kernel[deleted] == 0)  # The deleted units' outgoing weights stay zero.
    # The solve's inputs count: the first evaluation after it is at N/N = 1 epoch.
    assert op.history["epoch"][:2] == [0.0, pytest.approx(len(x) / EPOCH_EXAMPLES)]
    assert op.history["val_accuracy"][1] > op.history["val_accuracy"][0] + 0.1


def _logit_distance(model, reference, x):
    return float(np.mean(np.sum((np.asarray(model(x)) - np.asarray(reference(x))) ** 2, -1)))


def test_solve_sweeps_fit_the_hidden_layer_with_damage_held_at_zero(digits, trained, damaged):
    x, _, x_test, y_test = digits
    kwargs = dict(validation_data=(x_test, y_test), walk=_walk(1, 1e-12))
    solver = dict(first=0, temperature=None, damping=1e-6)
    output_only = Repair(x, method=_solver(len(x), sweeps=0, **solver), **kwargs)(damaged)
    op = Repair(x, method=_solver(len(x), sweeps=2, rank=32, **solver), **kwargs)
    swept = op(damaged)
    # The sweeps move the hidden layer and bring the logits closer than the output solve.
    assert _logit_distance(swept, trained, x) < 0.8 * _logit_distance(output_only, trained, x)
    assert not np.allclose(
        swept.get_layer("dense_1").get_weights()[0], damaged.get_layer("dense_1").get_weights()[0]
    )
    for values in _damaged_entries(swept, damaged):
        assert np.all(values == 0)  # Deleted units stay exactly deleted.
    # Each of the three solve batches counts (and is evaluated): the walk starts at 3N.
    epoch = len(x) / EPOCH_EXAMPLES
    assert op.history["epoch"][1:4] == pytest.approx([epoch, 2 * epoch, 3 * epoch])
    assert op.history["val_accuracy"][1] > op.history["val_accuracy"][0] + 0.1
    assert keras_fip.masks(swept).keys() == keras_fip.masks(damaged).keys()


def _softmax_weights(logits, temperature):
    p = np.exp(logits / temperature - np.max(logits / temperature, -1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return [np.diag(q) - np.outer(q, q) + 1e-3 * np.eye(len(q)) for q in p]


def _weighted_distance(model, reference, x, temperature):
    target = np.asarray(reference(x), np.float64)
    error = np.asarray(model(x), np.float64) - target
    weights = _softmax_weights(target, temperature)
    return float(np.mean([e @ h @ e for e, h in zip(error, weights)]))


def test_solve_temperature_fits_the_softmax_weighted_least_squares(digits, trained, damaged):
    x, _, x_test, y_test = digits
    op = Repair(
        x,
        method=_solver(len(x), sweeps=0, temperature=2.0),
        validation_data=(x_test, y_test),
        walk=_walk(1, 1e-12),
    )
    repaired = op(damaged)
    # The dense reference: Σ_x kron(H_x, d_x d_xᵀ) vec(W) = Σ_x kron(H_x z*_x, d_x)
    features = keras.Model(damaged.input, damaged.get_layer("logits").input)
    _, deleted = keras_fip.operations.hidden_units(damaged)["dense_1"]
    alive = np.setdiff1d(np.arange(64), deleted)
    design = np.concatenate(
        [np.asarray(features(x), np.float64)[:, alive], np.ones((len(x), 1))], 1
    )
    target = np.asarray(trained(x), np.float64)
    system, rhs = 0.0, 0.0
    for d, z, h in zip(design, target, _softmax_weights(target, 2.0)):
        system = system + np.kron(h, np.outer(d, d))
        rhs = rhs + np.kron(h @ z, d)
    expected = np.linalg.lstsq(system, rhs, rcond=None)[0].reshape(10, -1).T
    kernel, bias = repaired.get_layer("logits").get_weights()
    np.testing.assert_allclose(kernel[alive], expected[:-1], atol=2e-3)
    np.testing.assert_allclose(bias, expected[-1], atol=2e-3)
    assert np.all(kernel[deleted] == 0)
    # Sweeps under the same weights lower the weighted distance further; damage stays zero.
    swept = Repair(
        x,
        method=_solver(len(x), temperature=2.0, sweeps=2, rank=32, first=0, damping=1e-6),
        validation_data=(x_test, y_test),
        walk=_walk(1, 1e-12),
    )(damaged)
    assert _weighted_distance(swept, trained, x, 2.0) < 0.8 * _weighted_distance(
        repaired, trained, x, 2.0
    )
    for values in _damaged_entries(swept, damaged):
        assert np.all(values == 0)


def test_solve_first_is_an_output_only_batch_before_the_sweeps(digits, damaged):
    x, _, x_test, y_test = digits
    kwargs = dict(validation_data=(x_test, y_test), walk=_walk(1, 1e-12))
    solver = dict(temperature=None, damping=1e-6)
    hidden_before = damaged.get_layer("dense_1").get_weights()[0]
    # `first` needs sweeps; with one sweep: 300 inputs, then two batches of N.
    with pytest.raises(ValueError, match="`first`"):
        OutputLayerSolver(len(x), first=300, sweeps=0, **solver)
    op = Repair(x, method=_solver(len(x), first=300, sweeps=1, rank=16, **solver), **kwargs)
    swept = op(damaged)
    steps = EPOCH_EXAMPLES
    assert op.history["epoch"][1:4] == pytest.approx(
        [300 / steps, (300 + len(x)) / steps, (300 + 2 * len(x)) / steps]
    )
    assert not np.allclose(swept.get_layer("dense_1").get_weights()[0], hidden_before)
    for values in _damaged_entries(swept, damaged):
        assert np.all(values == 0)


def test_solve_damping_shrinks_each_unit_step(digits, damaged):
    x, _, x_test, y_test = digits
    before = damaged.get_layer("dense_1").get_weights()[0]

    def moved(damping):
        method = _solver(len(x), sweeps=1, rank=16, first=0, temperature=None, damping=damping)
        repaired = Repair(x, method=method, validation_data=(x_test, y_test), walk=_walk(1, 1e-12))(
            damaged
        )
        for values in _damaged_entries(repaired, damaged):
            assert np.all(values == 0)
        return float(np.linalg.norm(repaired.get_layer("dense_1").get_weights()[0] - before))

    free, ridge, frozen = moved(1e-6), moved(1.0), moved(1e9)
    # The Levenberg-Marquardt ridge shortens the steps, and a huge one stops them.
    assert 0 < ridge < free
    assert frozen < 1e-6 * free


def test_solve_sweeps_need_an_mlp_readout(digits):
    x, y, _, _ = digits
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    damaged = Damage(Nodes(0.5), seed=0)(model)
    before = _fingerprint(damaged)
    with pytest.raises(ValueError, match="`sweeps`"):
        Repair(x, method=_solver(100, sweeps=1), walk=_walk())(damaged)
    assert _fingerprint(damaged) == before
    # A model ending in no Dense layer: explicit solves raise, "auto" plans none.
    pooled = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(hidden))
    with pytest.raises(ValueError, match="`examples`"):
        Repair(x, method=_solver(100), undamaged=pooled, walk=_walk())(pooled)
    op = Repair(x, undamaged=pooled, walk=_walk())
    op(pooled)
    assert op.history["solve_epochs"] == 0.0


def test_config_round_trip():
    import inspect

    op = Repair(
        method=Embryonic(plasticity=0.1, init_scale=0.5, optimizer="sgd"),
        target=0.02,
        validation_split=0.2,
        stop_at_target=True,
        evaluations_per_epoch=4,
        walk=keras_fip.Walk(epochs=3, seed=5, batch_size=64),
        name="regrow",
    )
    config = op.get_config()
    assert Repair.from_config(config).get_config() == config
    assert set(inspect.signature(Repair.__init__).parameters) - {"self"} == set(config)
    solver = OutputLayerSolver(100, sweeps=2, first=10, rank=8, temperature=3.0, damping=0.5)
    for method in (
        FIP(release=True, num_paths=2, temperature=2.0, solver=solver),
        FIP(solver=None),
        Retrain(release=True, optimizer="sgd"),
        Embryonic(0.3),
    ):
        op = Repair(method=method)
        config = op.get_config()
        assert Repair.from_config(config).get_config() == config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
        assert restored.get_config() == config and restored.method == method
        arguments = set(inspect.signature(type(method).__init__).parameters) - {"self"}
        assert arguments == set(method.get_config())
    assert OutputLayerSolver.from_config(solver.get_config()) == solver
    assert set(inspect.signature(OutputLayerSolver.__init__).parameters) - {"self"} == set(
        solver.get_config()
    )
    assert Repair(method="embryonic").method == Embryonic()
    assert FIP().solver == OutputLayerSolver()


# Bad inputs: ValueError before any work.


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Repair(method="surgery"), "`method`"),
        (lambda: Repair(target=1.5), "`target`"),
        (lambda: Repair(validation_split=0.0), "`validation_split`"),
        (lambda: Repair(evaluations_per_epoch=0), "`evaluations_per_epoch`"),
        (lambda: Repair(stop_at_target="yes"), "`stop_at_target`"),
        (lambda: Repair(undamaged="model"), "`undamaged`"),
        (lambda: Repair(walk=keras_fip.Walk(reference="local")), "`reference`"),
        (lambda: Repair(walk=keras_fip.Walk(checkpoint_directory="c", seed=0)), "checkpoint"),
        (lambda: Repair(method="retrain", walk=keras_fip.Walk(beta=1.0)), "`beta`"),
        (lambda: Repair(method="retrain", walk=keras_fip.Walk(rule="normalized")), "`rule`"),
        (lambda: Repair(np.ones((4, 8, 8, 1)), walk=keras_fip.Walk(beta=2.0)), "`beta`"),
        (lambda: FIP(num_paths=0), "`num_paths`"),
        (lambda: FIP(release="yes"), "`release`"),
        (lambda: FIP(temperature=-1.0), "`temperature`"),
        (lambda: FIP(solver="always"), "`solver`"),
        (lambda: Retrain(optimizer="rmsprop"), "`optimizer`"),
        (lambda: Embryonic(plasticity=-1.0), "`plasticity`"),
        (lambda: Embryonic(init_scale=-1.0), "`init_scale`"),
        (lambda: OutputLayerSolver(0), "`examples`"),
        (lambda: OutputLayerSolver("all"), "`examples`"),
        (lambda: OutputLayerSolver(sweeps="many"), "`sweeps`"),
        (lambda: OutputLayerSolver(sweeps=-1), "`sweeps`"),
        (lambda: OutputLayerSolver(rank=0), "`rank`"),
        (lambda: OutputLayerSolver(temperature=0.0), "`temperature`"),
        (lambda: OutputLayerSolver(first=-1), "`first`"),
        (lambda: OutputLayerSolver(first=10, sweeps=0), "`first`"),
        (lambda: OutputLayerSolver(damping=-0.1), "`damping`"),
    ],
)
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _no_copy(model):
    raise AssertionError("the model was copied before the data were checked")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda bad, y: Repair(bad), "`data` must hold inputs of shape"),
        (
            lambda bad, y: Repair(np.zeros((20, 8, 8, 1), "float32"), validation_data=(bad, y)),
            "`validation_data` must hold inputs of shape",
        ),
    ],
)
def test_data_that_does_not_fit_the_model_raise_before_the_copy(damaged, monkeypatch, make, match):
    monkeypatch.setattr(keras_fip.operations.repair.repair, "copy_model", _no_copy)
    bad, y = np.zeros((20, 7, 7, 1), "float32"), np.zeros(20, "int64")
    op = make(bad, y)
    with pytest.raises(ValueError, match=match):
        op(damaged)
    assert op.history is None and op.path is None


def test_retrain_without_labels_raises(digits, damaged):
    x, _, _, _ = digits
    with pytest.raises(ValueError, match="labels"):
        Repair(x, method="retrain")
    with pytest.raises(ValueError, match="labelled"):
        Repair(x, validation_data=x)
    carried = keras_fip.operations.damage_reference(damaged).inputs
    assert carried is None
    with pytest.raises(ValueError, match="data"):
        Repair(method="retrain")(damaged)  # No data anywhere.


def test_model_without_damage_record_or_reference_raises(trained, digits):
    x, _, _, _ = digits
    before = _fingerprint(trained)
    with pytest.raises(ValueError, match="damage record"):
        Repair(x)(trained)
    assert _fingerprint(trained) == before


def test_reference_with_other_shapes_raises(digits, damaged):
    x, _, _, _ = digits
    other = models.mlp(32, input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="shapes"):
        Repair(x, undamaged=other)(damaged)


def test_recovery_path_stays_above_the_straight_damage_path(digits, trained, damaged):
    x, _, x_test, y_test = digits
    masks = damage_reference(damaged).damage_masks
    points, times = recovery_path(
        trained, masks, x, num_points=4, steps_per_point=25, learning_rate=3e-3, seed=0
    )
    straight, _ = keras_fip.geometry.damage_path(trained, damaged, 4)
    np.testing.assert_array_equal(times, [0, 1 / 3, 2 / 3, 1])
    for a, b in zip(points[0], trained.get_weights()):
        np.testing.assert_array_equal(a, b)
    # At each time the damaged weights are exactly the straight path's (1 − t)·w.
    for point, line in zip(points, straight):
        for value, reference, mask in zip(point, line, masks):
            if mask is not None:
                np.testing.assert_allclose(value[~mask], reference[~mask], rtol=1e-6)
    working = keras_fip.engine.copy_model(trained)
    final = []
    for weights in (points[-1], straight[-1]):
        working.set_weights(weights)
        final.append(_accuracy(working, x_test, y_test))
    assert final[0] > final[1] + 0.1


def test_recovery_path_rate_with_time_scales_the_first_steps(digits, trained, damaged):
    x, _, _, _ = digits
    masks = damage_reference(damaged).damage_masks
    straight, _ = keras_fip.geometry.damage_path(trained, damaged, 5)
    moved = []
    for scaled in (False, True):
        points, _ = recovery_path(
            trained,
            masks,
            x,
            num_points=5,
            steps_per_point=4,
            learning_rate=1e-3,
            seed=0,
            rate_with_time=scaled,
        )
        moved.append(max(float(np.max(np.abs(a - b))) for a, b in zip(points[1], straight[1])))
    # Adam moves a weight by about the rate per step: 4 steps at 1e-3, or at 1e-3 × 0.25.
    assert 1e-3 < moved[0] <= 4 * 1e-3 * 1.5
    assert 0 < moved[1] <= 4 * 2.5e-4 * 1.5


def test_recovery_path_rejects_misaligned_masks(trained, digits):
    x, _, _, _ = digits
    with pytest.raises(ValueError, match="damage_masks"):
        recovery_path(trained, [None], x)
    with pytest.raises(ValueError, match="num_points"):
        recovery_path(trained, [None] * len(trained.trainable_variables), x, num_points=1)


def test_distance_temperature_softens_the_walk_distance(digits, damaged):
    x, _, x_test, y_test = digits
    logits = np.random.default_rng(0).normal(size=(5, 10)).astype("float32") * 4
    reference = np.random.default_rng(1).normal(size=(5, 10)).astype("float32") * 4
    tempered = FIP(temperature=2.0).distance(keras_fip.Walk(distance="kl"))
    expected = 4.0 * keras_fip.engine.distances.kl(logits / 2.0, reference / 2.0)
    np.testing.assert_allclose(float(tempered(logits, reference)), float(expected), rtol=1e-6)
    # A walk under it repairs, the damage held at zero.
    op = Repair(x, method=FIP(temperature=4.0), validation_data=(x_test, y_test), walk=_walk())
    repaired = op(damaged)
    assert op.history["val_accuracy"][-1] > op.history["val_accuracy"][0]
    for values in _damaged_entries(repaired, damaged):
        assert np.all(values == 0)
