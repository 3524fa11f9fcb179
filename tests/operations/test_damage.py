import hashlib
import os

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import data
from keras_fip import models
from keras_fip.geometry import metric as metric_lib
from keras_fip.operations.damage import Damage
from keras_fip.operations.damage_reference import damage_reference
from keras_fip.operations.faults import BitFlips
from keras_fip.operations.faults import Eigen
from keras_fip.operations.faults import Gaussian
from keras_fip.operations.faults import Nodes
from keras_fip.operations.faults import Weights
from tests.operations.contract import run_operation_contract

layers = keras.layers


@pytest.fixture(scope="module")
def digits():
    x, y = data.load("digits")
    return x.astype("float32"), y


@pytest.fixture(scope="module")
def trained(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = models.mlp((48, 32), input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=10, batch_size=64, learning_rate=3e-3)
    return model


def _bn_conv_net():
    """conv -> BN -> ReLU -> pool -> conv(no bias) -> BN -> ReLU -> flatten -> dense."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(6, 3, padding="same", name="conv_a")(inputs)
    x = layers.BatchNormalization(name="bn_a")(x)
    x = layers.ReLU(name="relu_a")(x)
    x = layers.MaxPooling2D(2, name="pool_a")(x)
    x = layers.Conv2D(5, 3, padding="same", use_bias=False, name="conv_b")(x)
    x = layers.BatchNormalization(name="bn_b")(x)
    x = layers.Activation("relu", name="relu_b")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(12, activation="relu", name="dense")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs)


def _residual_net():
    """stem conv -> BN -> ReLU -> [conv -> BN] + stem -> ReLU -> global pool -> logits."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1))
    stem = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    stem = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(stem))
    block = layers.Conv2D(8, 3, padding="same", name="block")(stem)
    block = layers.BatchNormalization(name="block_bn")(block)
    merged = layers.ReLU(name="merged_relu")(layers.Add(name="add")([stem, block]))
    pooled = layers.GlobalAveragePooling2D(name="pool")(merged)
    outputs = layers.Dense(10, name="logits")(pooled)
    return keras.Model(inputs, outputs)


def _fit_briefly(model, x, y, epochs=2):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def _probe(model, layer_name, x, training=False):
    probe = keras.Model(model.inputs[0], model.get_layer(layer_name).output)
    return np.asarray(probe(x, training=training))


def _digest(model):
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def _perturbation(damaged):
    """The damage of `damaged` as one flat vector (damaged minus undamaged weights)."""
    delta = damage_reference(damaged).perturbation(damaged)
    return np.concatenate([d.astype(np.float64).ravel() for d in delta])


# The shared contract.


@pytest.mark.parametrize(
    "fault, contract_models",
    [
        (Nodes(0.25), ("sequential", "functional", "batchnorm_residual")),
        (Weights(0.3), ("sequential", "batchnorm_residual")),
        (Gaussian(norm=0.5), ("functional",)),
        (Eigen(norm=0.5, num_eigenpairs=3, examples=100), ("batchnorm_residual",)),
        (BitFlips(count=20, bits="mantissa"), ("functional",)),
    ],
    ids=["nodes", "weights", "gaussian", "eigen", "bit_flips"],
)
def test_damage_meets_the_operation_contract(fault, contract_models):
    # The zeroing faults (masks) run on every contract model with the save/export round
    # trips; the additive faults change values only, so one model each keeps this fast.
    def make(model, x, y):
        return Damage(fault, data=(x, y) if fault.needs_data else None, seed=3)

    results = run_operation_contract(make, models=contract_models, check_export=fault.zeroes)
    if isinstance(fault, Nodes):
        # The BatchNorm residual net: the hidden conv's deleted channels are masked.
        assert keras_fip.masks(results["batchnorm_residual"])


# Exact counts.


def test_nodes_global_deletes_round_fraction_of_all_hidden_units(trained, digits):
    x, _ = digits
    op = Damage(Nodes(0.3), seed=0)
    damaged = op(trained)
    units = op.history["units"]
    assert set(units) == {"dense_1", "dense_2"}  # Never the output layer.
    assert sum(len(u) for u in units.values()) == round(0.3 * 80) == op.history["num_hit"]
    # Incoming kernel columns and biases are zero, outgoing rows too.
    for name, deleted in units.items():
        layer = damaged.get_layer(name)
        assert np.all(layer.kernel.numpy()[:, deleted] == 0)
        assert np.all(layer.bias.numpy()[deleted] == 0)
        np.testing.assert_array_equal(
            np.delete(layer.bias.numpy(), deleted),
            np.delete(trained.get_layer(name).bias.numpy(), deleted),
        )
        activations = _probe(damaged, name, x)
        assert np.all(activations[:, deleted] == 0)
        assert np.any(np.delete(activations, deleted, axis=1) != 0)
    assert np.all(damaged.get_layer("dense_2").kernel.numpy()[units["dense_1"]] == 0)
    assert np.all(damaged.get_layer("logits").kernel.numpy()[units["dense_2"]] == 0)
    # The output layer keeps every unit and its bias.
    np.testing.assert_array_equal(
        damaged.get_layer("logits").bias.numpy(), trained.get_layer("logits").bias.numpy()
    )
    # Masks hold every zeroed weight.
    masks = keras_fip.masks(damaged)
    assert int((~masks["dense_1/kernel"]).sum()) == 64 * len(units["dense_1"])


def test_nodes_per_layer_takes_the_fraction_of_each_layer(trained):
    op = Damage(Nodes(0.25, scope="per_layer"), seed=1)
    op(trained)
    assert {k: len(v) for k, v in op.history["units"].items()} == {"dense_1": 12, "dense_2": 8}
    op = Damage(Nodes(count=5, layers=["dense_2"]), seed=1)
    op(trained)
    assert {k: len(v) for k, v in op.history["units"].items()} == {"dense_2": 5}
    # The default: half of all hidden units.
    op = Damage("nodes", seed=1)
    op(trained)
    assert op.history["num_hit"] == 40


def test_nodes_silence_batchnorm_conv_filters_through_flatten(digits):
    x, y = digits
    model = _fit_briefly(_bn_conv_net(), x[:300], y[:300], epochs=1)
    op = Damage(Nodes(0.4, scope="per_layer"), seed=0)
    damaged = op(model)
    units = op.history["units"]
    assert {k: len(v) for k, v in units.items()} == {"conv_a": 2, "conv_b": 2, "dense": 5}
    # Activations after BatchNorm and ReLU are exactly zero, in both modes.
    for training in (False, True):
        for layer_name, unit_layer in (
            ("relu_a", "conv_a"),
            ("pool_a", "conv_a"),
            ("relu_b", "conv_b"),
        ):
            values = _probe(damaged, layer_name, x[:64], training=training)
            assert np.all(values[..., units[unit_layer]] == 0), (layer_name, training)
            kept = np.delete(values, units[unit_layer], axis=-1)
            assert np.any(kept != 0)
    for name in ("bn_a", "bn_b"):
        bn = damaged.get_layer(name)
        deleted = units["conv_a" if name == "bn_a" else "conv_b"]
        assert np.all(bn.gamma.numpy()[deleted] == 0) and np.all(bn.beta.numpy()[deleted] == 0)
    # Outgoing weights: conv_b's input channels, and the Flatten rows h·W·C + w·C + c.
    assert np.all(damaged.get_layer("conv_b").kernel.numpy()[:, :, units["conv_a"], :] == 0)
    dense_kernel = damaged.get_layer("dense").kernel.numpy()
    rows = np.arange(dense_kernel.shape[0])
    dead_rows = np.isin(rows % 5, units["conv_b"])
    assert np.all(dense_kernel[dead_rows] == 0)
    assert np.all(np.any(dense_kernel[~dead_rows] != 0, axis=1))
    # Damaged weights stay zero through training.
    _fit_briefly(damaged, x[:300], y[:300], epochs=1)
    assert np.all(damaged.get_layer("dense").kernel.numpy()[dead_rows] == 0)
    assert np.all(_probe(damaged, "relu_b", x[:64], training=True)[..., units["conv_b"]] == 0)


def test_nodes_silence_residual_net_channels(digits):
    x, y = digits
    model = _fit_briefly(_residual_net(), x[:300], y[:300], epochs=1)
    op = Damage(Nodes(0.25, scope="per_layer"), seed=4)
    damaged = op(model)
    units = op.history["units"]
    assert {k: len(v) for k, v in units.items()} == {"stem": 2, "block": 2}
    for training in (False, True):
        stem = _probe(damaged, "stem_relu", x[:64], training)
        block = _probe(damaged, "block_bn", x[:64], training)
        assert np.all(stem[..., units["stem"]] == 0)
        assert np.all(block[..., units["block"]] == 0)
    # The stem's deleted channels are cut from the block conv's inputs too.
    assert np.all(damaged.get_layer("block").kernel.numpy()[:, :, units["stem"], :] == 0)
    np.testing.assert_array_equal(
        damaged.get_layer("logits").kernel.numpy(), model.get_layer("logits").kernel.numpy()
    )


def test_weights_zero_exactly_round_fraction_of_kernel_entries(trained):
    op = Damage(Weights(0.37), seed=0)
    damaged = op(trained)
    sizes = [int(np.prod(v.shape)) for v in keras_fip.core.projection.prunable_variables(trained)]
    expected = round(0.37 * sum(sizes))
    assert op.history["num_hit"] == expected
    masks = keras_fip.masks(damaged)
    assert sum(int((~m).sum()) for m in masks.values()) == expected
    assert set(masks) <= {"dense_1/kernel", "dense_2/kernel", "logits/kernel"}
    for key, mask in masks.items():
        variable = next(v for v in damaged.trainable_variables if v.path == key)
        assert np.all(variable.numpy()[~mask] == 0)
    per_layer = Damage(Weights(0.5, scope="per_layer"), seed=0)
    per_layer(trained)
    assert {k: len(v) for k, v in per_layer.history["weights"].items()} == {
        "dense_1/kernel": round(0.5 * 64 * 48),
        "dense_2/kernel": round(0.5 * 48 * 32),
        "logits/kernel": round(0.5 * 32 * 10),
    }


def _log_probabilities(model):
    """A view of a logits model returning its log-softmax (the weights shared)."""
    return keras.Model(model.inputs, layers.Activation("log_softmax")(model.outputs[0]))


def test_gaussian_and_eigen_have_exact_norm_and_eigen_hurts_more(trained, digits):
    x, y = digits
    clean = models.evaluate_classifier(trained, x, y)["accuracy"]
    gaussian = Damage(Gaussian(norm=1.5), seed=0)
    random_damaged = gaussian(trained)
    eigen = Damage(Eigen(norm=1.5, num_eigenpairs=5), data=(x, y), seed=0)
    eigen_damaged = eigen(trained)
    equal = Damage(Eigen(norm=1.5, num_eigenpairs=5, mixing="equal"), data=(x, y), seed=0)
    equal_damaged = equal(trained)
    for op, damaged in ((gaussian, random_damaged), (eigen, eigen_damaged), (equal, equal_damaged)):
        assert op.history["perturbation_norm"] == pytest.approx(1.5, rel=1e-5)
        assert np.linalg.norm(_perturbation(damaged)) == pytest.approx(1.5, rel=1e-5)
    random_accuracy = models.evaluate_classifier(random_damaged, x, y)["accuracy"]
    eigen_accuracy = models.evaluate_classifier(eigen_damaged, x, y)["accuracy"]
    equal_accuracy = models.evaluate_classifier(equal_damaged, x, y)["accuracy"]
    assert clean - random_accuracy < 0.05
    assert clean - equal_accuracy > 0.2
    # The coefficients chosen by the loss ascent hurt more than the equal mixing.
    assert eigen.history["loss"] > equal.history["loss"]
    assert eigen_accuracy <= equal_accuracy + 0.01
    assert eigen.history["ascent_steps"] >= 1
    # Both lie in the span of the top eigenvectors of g on the log-probabilities: δᵀgδ
    # matches the prediction, and is at least norm² times the smallest eigenvalue.
    metric = keras_fip.geometry.MetricOperator(_log_probabilities(trained), x[:1000])
    for op, damaged in ((eigen, eigen_damaged), (equal, equal_damaged)):
        flat = _perturbation(damaged)
        quadratic = float(flat @ metric.matvec(flat))
        assert quadratic == pytest.approx(op.history["predicted_change"], rel=1e-3)
        assert quadratic >= 1.5**2 * min(op.history["eigenvalues"]) * (1 - 1e-3)
        coefficients = np.array(op.history["coefficients"])
        assert np.sum(coefficients**2) == pytest.approx(1.0, rel=1e-9)
    # The second-order prediction of the output change holds at a smaller norm.
    small = Damage(Eigen(norm=0.3, num_eigenpairs=5, mixing="equal"), data=x, seed=0)
    small(trained)
    assert small.history["measured_change"] == pytest.approx(
        small.history["predicted_change"], rel=0.25
    )


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


@pytest.mark.parametrize("labelled", [False, True])
def test_eigen_gives_a_softmax_model_and_its_logits_twin_the_same_damage(trained, digits, labelled):
    x, y = digits
    twin = _softmax_twin(trained)
    assert keras_fip.core.outputs.output_kind(twin) == "probabilities"
    np.testing.assert_allclose(
        np.asarray(twin(x[:32])), keras.ops.softmax(trained(x[:32])), atol=1e-6
    )
    data = (x[:400], y[:400]) if labelled else x[:400]
    ops = [Damage(Eigen(num_eigenpairs=4), data=data, seed=0) for _ in range(2)]
    damaged = [op(model) for op, model in zip(ops, (trained, twin))]
    # The log-probabilities are the same function of the weights: the same g, the same
    # eigenvalues, the same coefficients and the same perturbation (to rounding).
    np.testing.assert_allclose(
        ops[0].history["eigenvalues"], ops[1].history["eigenvalues"], rtol=1e-3
    )
    first, second = (_perturbation(model) for model in damaged)
    assert abs(first @ second) / (np.linalg.norm(first) * np.linalg.norm(second)) > 0.999
    # And the same predictions after the damage.
    agreement = np.mean(np.argmax(damaged[0](x), axis=-1) == np.argmax(damaged[1](x), axis=-1))
    assert agreement > 0.99
    assert ops[1].history["loss"] == pytest.approx(ops[0].history["loss"], rel=1e-3)


def test_eigen_on_inputs_only_ascends_the_loss_of_the_undamaged_predictions(trained, digits):
    x, y = digits
    clean = models.evaluate_classifier(trained, x, y)["accuracy"]
    op = Damage(Eigen(num_eigenpairs=5), data=x[:500], seed=0)
    damaged = op(trained)
    # Without labels the loss is that of the undamaged network's own predictions.
    predictions = np.argmax(trained(x[:500]), axis=-1)
    logits = np.asarray(_log_probabilities(damaged)(x[:500]), np.float64)
    loss = float(np.mean(-logits[np.arange(500), predictions]))
    assert op.history["loss"] == pytest.approx(loss, rel=1e-4)
    assert op.history["agreement"] == pytest.approx(
        np.mean(np.argmax(logits, axis=-1) == predictions)
    )
    equal = Damage(Eigen(num_eigenpairs=5, mixing="equal"), data=x[:500], seed=0)
    equal(trained)
    assert op.history["loss"] > equal.history["loss"]
    assert clean - models.evaluate_classifier(damaged, x, y)["accuracy"] > 0.2


def test_eigen_sqrt_mixing_and_layer_restriction(trained, digits):
    x, y = digits
    op = Damage(Eigen(num_eigenpairs=4, mixing="sqrt", layers=["dense_2"]), data=x, seed=0)
    damaged = op(trained)
    weights = np.array(op.history["coefficients"])
    roots = np.sqrt(op.history["eigenvalues"])
    np.testing.assert_allclose(weights, roots / np.linalg.norm(roots), rtol=1e-9)
    for before, after in zip(trained.layers, damaged.layers):
        changed = any(
            not np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights())
        )
        assert changed == (before.name == "dense_2")


def test_eigen_of_top_20_on_1000_inputs_within_100_metric_products(trained, digits, monkeypatch):
    x, y = digits
    calls = []
    original = metric_lib.MetricOperator.matvec

    def counting(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(metric_lib.MetricOperator, "matvec", counting)
    op = Damage("eigen", data=(x[:1000], y[:1000]), seed=0)  # Top 20 on 1,000 inputs.
    op(trained)
    assert len(calls) == op.history["num_matvecs"] <= 100
    assert len(op.history["eigenvalues"]) == 20


def test_bitflip_flips_exactly_count_bits(trained):
    before = np.concatenate([v.numpy().ravel() for v in trained.trainable_variables])
    for bits, allowed in (
        (None, range(32)),
        ("sign", [31]),
        ("exponent", range(23, 31)),
        ("mantissa", range(23)),
        (5, [5]),
    ):
        op = Damage(BitFlips(40, bits=bits), seed=0)
        damaged = op(trained)
        after = np.concatenate([v.numpy().ravel() for v in damaged.trainable_variables])
        xor = before.view(np.uint32) ^ after.view(np.uint32)
        assert int(np.count_nonzero(xor)) == 40
        assert sum(bin(int(w)).count("1") for w in xor[xor != 0]) == 40
        positions = {int(np.log2(int(w))) for w in xor[xor != 0]}
        assert positions <= set(allowed)
        assert op.history["num_hit"] == len(op.history["bits"]) == 40
    op = Damage(BitFlips(10, bits="sign", format="int8"), seed=0)
    damaged = op(trained)
    for flip in op.history["bits"]:
        variable = next(v for v in trained.trainable_variables if v.path == flip["variable"])
        scale = np.abs(variable.numpy()).max() / 127
        code = int(np.clip(np.round(flip["before"] / scale), -127, 127))
        flipped = np.array([code], np.int8).view(np.uint8) ^ np.uint8(128)
        assert flip["after"] == pytest.approx(float(flipped.view(np.int8)[0]) * scale, rel=1e-6)


# Determinism, nesting, no mutation, the reference.


def test_same_seed_same_damage_and_nested_deletions(trained):
    first = Damage(Nodes(0.4), seed=7)
    second = Damage(Nodes(0.4), seed=7)
    assert _digest(first(trained)) == _digest(second(trained))
    assert first.history["units"] == second.history["units"]
    smaller = Damage(Nodes(0.2), seed=7)
    smaller(trained)
    for name, units in smaller.history["units"].items():
        assert set(units) <= set(first.history["units"][name])
    other = Damage(Nodes(0.4), seed=8)
    other(trained)
    assert other.history["units"] != first.history["units"]
    sparse = Damage(Weights(0.1), seed=7)
    dense = Damage(Weights(0.3), seed=7)
    sparse(trained)
    dense(trained)
    for key, indices in sparse.history["weights"].items():
        assert set(indices) <= set(dense.history["weights"][key])
    for fault in (Gaussian(), BitFlips(9)):
        a, b = Damage(fault, seed=2), Damage(fault, seed=2)
        assert _digest(a(trained)) == _digest(b(trained))
    # The geometry's deletion sequence deletes the units Nodes deletes with that seed.
    sequence = keras_fip.geometry.deletion_sequence(trained, [0.2, 0.4], seed=7)
    for fraction_damage, network in zip((smaller, first), sequence):
        deleted = keras_fip.operations.hidden_units(network)
        assert {name: units for name, (_, units) in deleted.items()} == (
            fraction_damage.history["units"]
        )


def test_one_damage_object_gives_independent_results_on_models_and_calls(trained, digits):
    x, _ = digits
    other = models.mlp((24,), input_shape=(8, 8, 1))
    for fault in (Nodes(0.3), Eigen(num_eigenpairs=3, examples=200)):
        op = Damage(fault, data=x[:200], seed=5)
        results = [op(trained), op(other), op(trained)]
        records = [damage_reference(result).records for result in results]
        fresh = [Damage(fault, data=x[:200], seed=5)(model) for model in (trained, other)]
        assert _digest(results[0]) == _digest(results[2]) == _digest(fresh[0])
        assert _digest(results[1]) == _digest(fresh[1])
        assert records[0] == records[2] == damage_reference(fresh[0]).records
        assert records[1] == damage_reference(fresh[1]).records
        assert op.history == records[2][-1]
        # Each result carries its own undamaged network.
        assert _digest(damage_reference(results[1]).restore(results[1])) == _digest(other)


def test_damage_never_mutates_and_records_the_undamaged_network(trained, digits):
    x, _ = digits
    before = _digest(trained)
    damaged = Damage(Nodes(0.5), data=x[:100], seed=0)(trained)
    assert _digest(trained) == before and not keras_fip.masks(trained)
    reference = damage_reference(damaged)
    assert reference is not None and damage_reference(trained) is None
    restored = reference.restore(damaged)
    assert _digest(restored) == before and not keras_fip.masks(restored)
    np.testing.assert_allclose(reference.outputs, np.asarray(trained(x[:100])), atol=1e-5)
    assert reference.inputs.shape == (100, 8, 8, 1)
    # Damage on damage keeps the first undamaged network and accumulates the masks.
    again = Damage(Weights(0.2), seed=1)(damaged)
    second = damage_reference(again)
    assert _digest(second.restore(again)) == before
    assert [r["kind"] for r in second.records] == ["nodes", "weights"]
    kernel = [i for i, v in enumerate(again.trainable_variables) if v.path == "dense_1/kernel"][0]
    assert int((~second.damage_masks[kernel]).sum()) > int((~reference.damage_masks[kernel]).sum())


def test_masks_survive_keras_save_and_masked_training(trained, digits, tmp_path):
    x, y = digits
    damaged = Damage(Nodes(0.5), seed=0)(trained)
    zeros = {v.path: v.numpy() == 0 for v in damaged.trainable_variables}
    path = os.path.join(tmp_path, "damaged.keras")
    damaged.save(path)
    loaded = keras.saving.load_model(path)
    assert {k: int((~m).sum()) for k, m in keras_fip.masks(loaded).items()} == {
        k: int((~m).sum()) for k, m in keras_fip.masks(damaged).items()
    }
    models.train_classifier(loaded, x, y, epochs=1, batch_size=64, learning_rate=1e-2)
    for variable in loaded.trainable_variables:
        mask = keras_fip.masks(loaded).get(variable.path)
        if mask is not None:
            assert np.all(variable.numpy()[~mask] == 0)
            assert np.all(zeros[variable.path][~mask])


def test_damage_reference_is_saved_in_keras_files_and_repairs_after_reload(
    trained, digits, tmp_path
):
    x, y = digits
    damaged = Damage(Nodes(0.5), data=x[:100], seed=0)(trained)
    damaged = Damage(Weights(0.1), seed=1)(damaged)
    reference = damage_reference(damaged)
    path = os.path.join(tmp_path, "damaged.keras")
    damaged.save(path)
    # Plain Keras loading ignores it; keras_fip.load_damaged_model restores it exactly.
    assert damage_reference(keras.saving.load_model(path)) is None
    loaded = keras_fip.load_damaged_model(path)
    restored = damage_reference(loaded)
    for a, b in zip(loaded.get_weights(), damaged.get_weights()):
        np.testing.assert_array_equal(a, b)
    for field in ("weights", "masks", "damage_masks"):
        for a, b in zip(getattr(restored, field), getattr(reference, field)):
            assert (a is None and b is None) or np.array_equal(a, b)
    np.testing.assert_array_equal(restored.inputs, reference.inputs)
    np.testing.assert_array_equal(restored.outputs, reference.outputs)
    assert restored.records == reference.records
    assert _digest(restored.restore(loaded)) == _digest(trained)
    # Repair needs nothing else; its result saves its reference (and record) in turn.
    repair = keras_fip.Repair(x, walk=keras_fip.Walk(epochs=1, seed=0, verbose=0))
    repaired = repair(loaded)
    assert repair.history["val_accuracy"][-1] > repair.history["val_accuracy"][0]
    for variable, mask in zip(repaired.trainable_variables, restored.damage_masks):
        if mask is not None:
            assert np.all(variable.numpy()[~mask] == 0)
    repaired.save(path)
    again = damage_reference(keras_fip.load_damaged_model(path))
    assert [r["kind"] for r in again.records] == ["nodes", "weights", "repair"]
    plain = os.path.join(tmp_path, "plain.keras")
    trained.save(plain)
    assert damage_reference(keras_fip.load_damaged_model(plain)) is None
    with pytest.raises(ValueError, match="`filepath`"):
        keras_fip.load_damaged_model(os.path.join(tmp_path, "damaged.h5"))


# Bad inputs.


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: Damage("melt"), "fault"),
        (lambda: Damage({"class_name": "Dense"}), "fault"),
        (lambda: Nodes(1.5), "fraction"),
        (lambda: Nodes(-0.1), "fraction"),
        (lambda: Nodes(0.5, count=3), "fraction"),
        (lambda: Nodes(0.5, units={"dense_1": [0]}), "units"),
        (lambda: Nodes(units={"dense_1": [-1]}), "units"),
        (lambda: Weights(count=-1), "count"),
        (lambda: Weights(0.2, count=3), "fraction"),
        (lambda: Gaussian(norm=-1.0), "norm"),
        (lambda: Eigen(norm=float("nan")), "norm"),
        (lambda: BitFlips(0), "count"),
        (lambda: BitFlips(2, bits=32), "bits"),
        (lambda: BitFlips(2, bits="exponent", format="int8"), "bits"),
        (lambda: BitFlips(2, format="int4"), "format"),
        (lambda: Nodes(0.5, scope="local"), "scope"),
        (lambda: Nodes(0.5, layers=[]), "layers"),
        (lambda: Nodes(0.5, allow_dead_layers="yes"), "allow_dead_layers"),
        (lambda: Eigen(mixing="random"), "mixing"),
        (lambda: Eigen(num_eigenpairs=0), "num_eigenpairs"),
        (lambda: Eigen(examples=0), "examples"),
        (lambda: Eigen(outputs="softmax"), "outputs"),
        (lambda: Damage("nodes", seed=-1), "seed"),
        (lambda: Damage("nodes", data=np.full((4, 8, 8, 1), np.nan)), "data"),
    ],
)
def test_bad_arguments_raise_before_any_work(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


@pytest.mark.parametrize(
    "fault, argument",
    [
        (Eigen(), "data"),
        (Nodes(1.0), "fraction"),
        (Nodes(1.0, scope="per_layer"), "fraction"),
        (Nodes(0.5, layers=["missing"]), "layers"),
        (Nodes(0.5, layers=["logits"]), "layers"),
        (Nodes(units={"dense_1": [64]}), "units"),
        (Nodes(units={"logits": [0]}), "units"),
        (Gaussian(layers=["dense_1", "nope"]), "layers"),
        (Nodes(count=81), "count"),
        (Weights(count=10**7), "count"),
        (BitFlips(10**7), "count"),
    ],
)
def test_bad_arguments_for_the_model_raise_and_leave_it_alone(
    trained, fault, argument, monkeypatch
):
    monkeypatch.setattr(keras_fip.operations.base, "copy_model", _no_copy)
    before = _digest(trained)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Damage(fault, seed=0)(trained)
    assert _digest(trained) == before


def _no_copy(model):
    raise AssertionError("the model was copied before the arguments were checked")


@pytest.mark.parametrize("fault", [Eigen(num_eigenpairs=2), Nodes(0.5)])
def test_data_that_do_not_fit_the_model_raise_before_the_copy(trained, fault, monkeypatch):
    monkeypatch.setattr(keras_fip.operations.base, "copy_model", _no_copy)
    op = Damage(fault, data=np.zeros((20, 7, 7, 1), "float32"), seed=0)
    with pytest.raises(ValueError, match="`data` must hold inputs of shape"):
        op(trained)
    assert op.history is None


def test_allow_dead_layers_deletes_a_whole_layer(trained, digits):
    x, _ = digits
    op = Damage(Nodes(1.0, allow_dead_layers=True), seed=0)
    damaged = op(trained)
    assert op.history["num_hit"] == 80
    outputs = np.asarray(damaged(x[:10]))
    np.testing.assert_allclose(
        outputs, np.tile(trained.get_layer("logits").bias.numpy(), (10, 1)), atol=0
    )


@pytest.mark.parametrize(
    "fault",
    [
        Nodes(count=3, layers=["dense_1"], scope="per_layer", allow_dead_layers=True),
        Nodes(units={"dense_2": [3, 1]}),
        Weights(0.2, scope="per_layer"),
        Gaussian(norm=2.5, layers=["dense_2"]),
        Eigen(norm=0.5, num_eigenpairs=7, mixing="sqrt", examples=64, tol=0.0, outputs="logits"),
        BitFlips(3, bits="sign", format="int8", layers=["dense_1"]),
    ],
    ids=lambda fault: type(fault).__name__,
)
def test_config_round_trip_covers_every_argument(fault):
    import inspect

    config = fault.get_config()
    assert type(fault).from_config(config) == fault
    arguments = set(inspect.signature(type(fault).__init__).parameters) - {"self"}
    assert arguments == set(config)
    assert keras_fip.faults.get(keras_fip.faults.serialize(fault)) == fault
    op = Damage(fault, seed=5, name="flip")
    config = op.get_config()
    assert Damage.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
    assert restored.fault == fault and restored.seed == 5 and restored.name == "flip"
    arguments = set(inspect.signature(Damage.__init__).parameters) - {"self"}
    assert arguments == set(config)


def test_a_fault_name_means_that_fault_with_its_defaults():
    for name, fault in (
        ("nodes", Nodes()),
        ("weights", Weights()),
        ("gaussian", Gaussian()),
        ("eigen", Eigen()),
        ("bit_flips", BitFlips()),
    ):
        assert Damage(name).fault == fault
        assert fault.name == name
    assert Eigen().norm == 1.0 and Eigen().num_eigenpairs == 20 and Gaussian().norm == 1.0


@pytest.mark.large
def test_lenet_eigen_adversary_collapses_what_random_directions_leave_intact(monkeypatch):
    # The acceptance setting: LeNet-300-100 on MNIST, top-20 eigenpairs on 1,000 inputs.
    model, base = models.base_network("lenet_300_100", "mnist")
    x, y = data.load("mnist", "train")
    x_test, y_test = data.load("mnist", "test")
    clean = models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert clean >= 0.98
    calls = []
    original = metric_lib.MetricOperator.matvec

    def counting(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(metric_lib.MetricOperator, "matvec", counting)
    # The defaults on inputs only (the undamaged predictions stand for the labels).
    eigen = Damage("eigen", data=x[:1000], seed=0)
    attacked = eigen(model)
    assert len(calls) <= 100
    assert clean - models.evaluate_classifier(attacked, x_test, y_test)["accuracy"] >= 0.3
    for seed in range(20):
        damaged = Damage("gaussian", seed=seed)(model)
        assert abs(models.evaluate_classifier(damaged, x_test, y_test)["accuracy"] - clean) <= 0.01
