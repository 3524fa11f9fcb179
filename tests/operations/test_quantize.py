"""Tests of `keras_fip.Quantize`: exact grids, Keras's quantised layers, masks, contract."""

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.operations import quantize as quantize_lib
from keras_fip.operations.quantize import QuantizeSchedule
from tests.operations.contract import contract_data
from tests.operations.contract import run_operation_contract
from tests.operations.contract import trained_model


def _walk(steps=8):
    return keras_fip.Walk(steps=steps, seed=0, verbose=0)


def _kernels(model):
    """`(layer, kernel, axes)` of every float quantisable kernel."""
    return quantize_lib.quantizable_variables(model)


def _assert_on_grid(model, bits, history=None):
    levels = 2 ** (bits - 1) - 1
    kernels = _kernels(model)
    assert kernels
    for _, variable, axes in kernels:
        weights = variable.numpy().astype("float64")
        amax = np.max(np.abs(weights), axis=axes, keepdims=True)
        scale = levels / np.where(amax > 0, amax, 1.0)
        integers = weights * scale
        np.testing.assert_allclose(integers, np.round(integers), atol=1e-3, rtol=0)
        assert np.max(np.abs(np.round(integers))) == levels
        # Every channel uses at most 2·levels + 1 values.
        moved = np.moveaxis(
            np.round(integers), [a for a in range(weights.ndim) if a not in axes], 0
        )
        for channel in moved.reshape(moved.shape[0], -1) if moved.ndim > 1 else [moved]:
            assert len(np.unique(channel)) <= 2 * levels + 1
        if history is not None:
            recorded = np.asarray(history["scales"][variable.path]).reshape(-1)
            np.testing.assert_allclose(recorded, scale.reshape(-1), rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_every_kernel_lies_exactly_on_its_per_channel_grid(bits, kind):
    model = trained_model(kind)
    x, y = contract_data()
    op = keras_fip.Quantize(bits, data=(x, y), keras_layers=False, walk=_walk())
    quantized = op(model)
    _assert_on_grid(quantized, bits, op.history)
    assert op.history["keras_layers"] == []
    assert op.history["bits"] == bits


def test_fitted_scales_are_on_a_grid_and_project_closer_than_abs_max():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 8)).astype("float32")
    for bits in (2, 3):
        fitted, integers, scale = quantize_lib.project(weights, bits, (0,), "fitted")
        abs_max = quantize_lib.project(weights, bits, (0,), "abs_max")[0]
        np.testing.assert_allclose(fitted * scale, integers, atol=1e-4)
        assert np.sum((fitted - weights) ** 2) < np.sum((abs_max - weights) ** 2)
        # A snapped kernel gives its scale back as abs-max (the grid is recoverable).
        np.testing.assert_allclose(quantize_lib.grid_scales(fitted, bits, (0,)), scale, rtol=1e-5)


@pytest.mark.parametrize("bits,mode", [(8, "int8"), (4, "int4")])
def test_keras_quantized_layers_hold_the_grid_integers(bits, mode):
    model = trained_model("sequential")
    x, y = contract_data()
    on_grid = keras_fip.Quantize(bits, data=(x, y), keras_layers=False, walk=_walk())(model)
    op = keras_fip.Quantize(bits, data=(x, y), walk=_walk())
    quantized = op(model)
    dense = [layer for layer in quantized.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.quantization_mode for layer in dense] == [mode] * 3
    assert sorted(op.history["keras_layers"]) == sorted(layer.name for layer in dense)
    np.testing.assert_allclose(
        np.asarray(quantized(x[:64])), np.asarray(on_grid(x[:64])), atol=1e-4, rtol=0
    )


def test_embedding_and_einsum_dense_become_keras_int8_layers():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(20, 8, name="embed")(inputs)
    hidden = keras.layers.EinsumDense("abc,cd->abd", output_shape=(6, 5), name="einsum")(hidden)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flat")(hidden))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).integers(0, 20, size=(128, 6)).astype("int32")
    reference = keras_fip.Quantize(8, data=x, keras_layers=False, walk=_walk(4))(model)
    _assert_on_grid(reference, 8)
    quantized = keras_fip.Quantize(8, data=x, walk=_walk(4))(model)
    modes = {layer.name: layer.quantization_mode for layer in quantized.layers[1:]}
    assert modes == {"embed": "int8", "einsum": "int8", "flat": None, "head": "int8"}
    np.testing.assert_allclose(
        np.asarray(quantized(x)), np.asarray(reference(x)), atol=1e-4, rtol=0
    )


def test_masks_from_compress_are_kept():
    model = trained_model("sequential")
    x, y = contract_data()
    walk = _walk(20)
    chained = keras_fip.chain(
        keras_fip.Compress(0.8, data=x, walk=walk),
        keras_fip.Quantize(3, data=(x, y), walk=walk),
    )
    sparse = keras_fip.Compress(0.8, data=x, walk=walk)(model)
    result = chained(model)
    before, after = keras_fip.masks(sparse), keras_fip.masks(result)
    assert sorted(before) == sorted(after)
    for key, mask in before.items():
        np.testing.assert_array_equal(after[key], mask)
    for _, variable, _ in _kernels(result):
        mask = after.get(variable.path)
        if mask is not None:
            assert np.all(variable.numpy()[~mask] == 0.0)
    _assert_on_grid(result, 3)


def test_masked_kernels_keep_their_zeros_in_keras_int8_layers():
    model = trained_model("sequential")
    x, _ = contract_data()
    sparse = keras_fip.Compress(0.8, data=x, walk=_walk(20))(model)
    quantized = keras_fip.Quantize(8, data=x, walk=_walk())(sparse)
    for layer in quantized.layers[1:]:
        mask = keras_fip.masks(sparse).get(f"{sparse.name}/{layer.name}/kernel")
        if mask is not None:
            assert layer.quantization_mode == "int8"
            assert np.all(np.asarray(layer.kernel)[~mask] == 0)


def test_the_input_is_not_mutated_and_calls_are_independent():
    x, y = contract_data()
    op = keras_fip.Quantize(4, data=(x, y), keras_layers=False, walk=_walk())
    first_model, second_model = trained_model("sequential"), trained_model("functional")
    before = [w.copy() for w in first_model.get_weights()]
    first = op(first_model)
    op(second_model)
    again = op(first_model)
    for weight, kept in zip(first_model.get_weights(), before):
        np.testing.assert_array_equal(weight, kept)
    for left, right in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_allclose(left, right, atol=1e-6)
    assert op.history["steps"] == 8


def test_quantize_meets_the_operation_contract_on_float_grids():
    run_operation_contract(
        lambda model, x, y: keras_fip.Quantize(
            4, data=(x, y), keras_layers=False, walk=keras_fip.Walk(steps=6, seed=0, verbose=0)
        ),
        models=("sequential", "functional", "batchnorm_residual"),
    )


def test_quantize_meets_the_operation_contract_with_keras_layers():
    run_operation_contract(
        lambda model, x, y: keras_fip.Quantize(
            8, data=(x, y), walk=keras_fip.Walk(steps=6, seed=0, verbose=0)
        ),
        models=("sequential", "functional"),
        check_masks=False,  # Keras's integer kernels are not trainable: nothing to mask.
        check_chain=False,  # ContractScale needs trainable kernels.
    )


def test_config_round_trips():
    op = keras_fip.Quantize(
        3,
        labels=False,
        layers=["logits"],
        per_channel=False,
        scales="fitted",
        keras_layers=False,
        schedule=QuantizeSchedule(
            update_every=5, start_bits=8, ramp_fraction=0.3, settle_fraction=0.25
        ),
        walk=keras_fip.Walk(steps=12, seed=3),
        name="q",
    )
    config = op.get_config()
    twin = keras_fip.Quantize.from_config(config)
    assert twin.get_config() == config
    assert twin.schedule == op.schedule
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
    assert restored.get_config() == config
    schedule = QuantizeSchedule(start_bits=6)
    assert QuantizeSchedule.from_config(schedule.get_config()) == schedule


def test_schedule_ramps_the_bit_width_down():
    schedule = QuantizeSchedule(start_bits=8, ramp_fraction=0.5)
    bits = [schedule.bits_at(step, 80, 2) for step in range(80)]
    assert bits[0] == 8 and bits[39] == 3 and bits[40:] == [2] * 40
    assert all(a >= b for a, b in zip(bits, bits[1:]))
    assert QuantizeSchedule().bits_at(0, 80, 3) == 3


class _GridProbe(keras.callbacks.Callback):
    """Whether the kernels are on their grid before each step and after it."""

    def __init__(self, kernels, bits):
        super().__init__()
        self.kernels = kernels
        self.bits = bits
        self.before = []
        self.after = []

    def on_grid(self):
        return all(
            np.allclose(
                variable.numpy(),
                quantize_lib.project(variable.numpy(), self.bits, axes)[0],
                rtol=0,
                atol=1e-6,
            )
            for _, variable, axes in self.kernels
        )

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(self.on_grid())

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self.on_grid())


def test_the_settle_steps_from_the_grid_and_keeps_latent_weights():
    model = trained_model("sequential")
    x, y = contract_data()
    schedule = QuantizeSchedule(settle_fraction=0.5)
    assert schedule.settle_start(12) == 6
    # The probe sees the operation's working copy, built on the first call.
    probe = _GridProbe([], 3)

    class _Bind(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            probe.kernels = quantize_lib.quantizable_variables(self.model.walked_model)

    walk = keras_fip.Walk(steps=12, seed=0, verbose=0, callbacks=[_Bind(), probe])
    op = keras_fip.Quantize(
        3, data=(x, y), scales="abs_max", keras_layers=False, schedule=schedule, walk=walk
    )
    quantized = op(model)
    # The pull's steps start off the grid; every settle step starts on it, from the
    # projection of the latent weights, which the step then moves off it again.
    assert not any(probe.before[:6])
    assert all(probe.before[6:])
    assert not any(probe.after[6:])
    assert op.history["settle_steps"] == 6
    _assert_on_grid(quantized, 3, op.history)


def test_project_ops_agrees_with_project():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((16, 5)).astype("float32")
    for bits in (2, 3, 4, 8):
        for scales in ("abs_max", "fitted"):
            expected = quantize_lib.project(weights, bits, (0,), scales)[0]
            np.testing.assert_allclose(
                np.asarray(quantize_lib.project_ops(weights, bits, (0,), scales)),
                expected,
                rtol=1e-6,
                atol=1e-7,
            )
    whole = quantize_lib.project(weights, 2, None)[0]
    np.testing.assert_allclose(np.asarray(quantize_lib.project_ops(weights, 2, None)), whole)


def test_layers_selects_what_is_quantized():
    model = trained_model("sequential")
    x, _ = contract_data()
    op = keras_fip.Quantize(2, data=x, layers=["logits"], walk=_walk(4))
    quantized = op(model)
    assert list(op.history["scales"]) == [quantized.get_layer("logits").kernel.path]
    hidden = quantized.get_layer("contract_hidden").kernel.numpy()
    assert len(np.unique(hidden)) > 100


@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, True, "4"])
def test_bits_outside_the_supported_set_are_rejected(bits):
    with pytest.raises(ValueError, match=r"`bits` must be one of \[2, 3, 4, 8\]"):
        keras_fip.Quantize(bits)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="Received: labels=-1"):
        keras_fip.Quantize(4, labels=-1)
    with pytest.raises(ValueError, match="Received: scales='mse'"):
        keras_fip.Quantize(4, scales="mse")
    with pytest.raises(ValueError, match="Received: per_channel=1"):
        keras_fip.Quantize(4, per_channel=1)
    with pytest.raises(ValueError, match="Received: start_bits=9"):
        QuantizeSchedule(start_bits=9)
    with pytest.raises(ValueError, match="Received: settle_fraction=1.0"):
        QuantizeSchedule(settle_fraction=1.0)
    with pytest.raises(ValueError, match="Received: schedule="):
        keras_fip.Quantize(4, schedule="ramp")


def test_layers_that_cannot_be_quantized_are_named():
    model = trained_model("batchnorm_residual")
    x, _ = contract_data()
    bn = next(x for x in model.layers if isinstance(x, keras.layers.BatchNormalization))
    op = keras_fip.Quantize(4, data=x, layers=[bn.name, "logits"], walk=_walk(2))
    with pytest.raises(ValueError, match=f"Layer `{bn.name}` \\(BatchNormalization\\) cannot"):
        op(model)
    with pytest.raises(ValueError, match=r"does not have: \['nowhere'\]"):
        keras_fip.Quantize(4, data=x, layers=["nowhere"], walk=_walk(2))(model)
    # A model already quantised by Keras has nothing left to quantise.
    quantized = keras_fip.Quantize(8, data=x, walk=_walk(2))(trained_model("sequential"))
    with pytest.raises(ValueError, match="no quantisable kernels"):
        keras_fip.Quantize(4, data=x, walk=_walk(2))(quantized)


def test_data_that_do_not_fit_the_model_fail_before_any_work():
    model = trained_model("sequential")
    with pytest.raises(ValueError, match="data"):
        keras_fip.Quantize(4, data=np.zeros((8, 5), "float32"))(model)
    with pytest.raises(ValueError, match="`data` is required"):
        keras_fip.Quantize(4)(model)
