"""Tests of the quantisation baselines."""

import numpy as np
import pytest

import keras_fip
from keras_fip.baselines import quantization
from keras_fip.operations import quantize as quantize_lib
from tests.operations.contract import contract_data
from tests.operations.contract import trained_model


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), -1) == y))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_keras_ptq_quantizes_a_copy_with_keras_layers(mode):
    model = trained_model("sequential")
    x, y = contract_data()
    quantized = quantization.keras_ptq(model, mode)
    assert [layer.quantization_mode for layer in quantized.layers[1:]] == [mode] * 3
    assert all(layer.quantization_mode is None for layer in model.layers)
    assert abs(_accuracy(quantized, x, y) - _accuracy(model, x, y)) < 0.05
    with pytest.raises(ValueError, match="Received: mode='int3'"):
        quantization.keras_ptq(model, "int3")


def test_ste_qat_ends_on_the_grid_and_keeps_masks():
    x, y = contract_data()
    sparse = keras_fip.Compress(0.7, data=x, walk=keras_fip.Walk(steps=10, seed=0, verbose=0))(
        trained_model("sequential")
    )
    before = _accuracy(sparse, x, y)
    trained = quantization.ste_qat(sparse, 3, (x, y), epochs=3, learning_rate=1e-3)
    for _, variable, axes in quantize_lib.quantizable_variables(trained):
        weights = variable.numpy()
        np.testing.assert_allclose(
            weights, quantize_lib.project(weights, 3, axes)[0], atol=1e-6, rtol=0
        )
        mask = keras_fip.masks(trained).get(variable.path)
        if mask is not None:
            assert np.all(weights[~mask] == 0.0)
    # Training on the labels at 3 bits keeps most of the float accuracy on its own data.
    assert _accuracy(trained, x, y) > before - 0.1
    with pytest.raises(ValueError, match="Received: bits=5"):
        quantization.ste_qat(sparse, 5, (x, y))


def test_tflite_ptq_writes_a_model_the_interpreter_runs(tmp_path):
    import tensorflow as tf

    model = trained_model("functional")
    x, _ = contract_data()
    path = quantization.tflite_ptq(model, str(tmp_path / "ptq.tflite"))
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("serve")
    outputs = runner(**{next(iter(runner.get_input_details())): x})["output_0"]
    expected = np.asarray(model(x, training=False))
    assert np.mean(np.argmax(outputs, -1) == np.argmax(expected, -1)) >= 0.98


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_to_nearest_projects_a_copy_with_keras_scales(bits):
    model = trained_model("sequential")
    quantized = quantization.round_to_nearest(model, bits)
    for (_, before, axes), (_, after, _) in zip(
        quantize_lib.quantizable_variables(model), quantize_lib.quantizable_variables(quantized)
    ):
        np.testing.assert_array_equal(
            after.numpy(), quantize_lib.project(before.numpy(), bits, axes, "abs_max")[0]
        )
        # Keras's rule: the largest weight of each channel is kept.
        np.testing.assert_allclose(
            np.abs(after.numpy()).max(axis=axes), np.abs(before.numpy()).max(axis=axes), rtol=1e-6
        )
        assert not np.array_equal(before.numpy(), after.numpy())
    with pytest.raises(ValueError, match="Received: bits=5"):
        quantization.round_to_nearest(model, 5)


def test_keras_gptq_quantizes_the_dense_layers_of_a_copy_calibrated_on_float_inputs():
    model = trained_model("sequential")
    x, y = contract_data()
    quantized = quantization.keras_gptq(model, 4, x)
    dense = [layer for layer in quantized.layers if layer.weights]
    assert [layer.quantization_mode for layer in dense] == ["gptq"] * len(dense)
    assert all(layer.is_gptq_calibrated for layer in dense)
    assert all(layer.quantization_mode is None for layer in model.layers)
    assert abs(_accuracy(quantized, x, y) - _accuracy(model, x, y)) < 0.05
    assert not np.allclose(quantized.predict(x, verbose=0), model.predict(x, verbose=0))


def test_keras_gptq_refuses_what_it_cannot_quantise():
    import keras

    model = trained_model("sequential")
    with pytest.raises(ValueError, match="Received: bits=5"):
        quantization.keras_gptq(model, 5, contract_data()[0])
    convolutional = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()]
    )
    with pytest.raises(ValueError, match="stack of layers"):
        quantization.keras_gptq(convolutional, 4, np.zeros((4, 8, 8, 1), "float32"))
