"""`keras_fip.export(model, path, format="tflite")`: integer weights the interpreter runs."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from tests.operations.contract import contract_data
from tests.operations.contract import trained_model


def _run(path, x):
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("serve")
    return runner(**{next(iter(runner.get_input_details())): x})["output_0"]


def _int8_tensors(path):
    interpreter = tf.lite.Interpreter(model_path=path)
    return [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8]


@pytest.mark.parametrize(
    "kind,keras_layers", [("sequential", False), ("sequential", True), ("functional", False)]
)
def test_a_quantized_model_runs_in_the_tflite_interpreter(kind, keras_layers, tmp_path):
    x, y = contract_data()
    walk = keras_fip.Walk(steps=8, seed=0, verbose=0)
    model = keras_fip.Quantize(4, data=(x, y), keras_layers=keras_layers, walk=walk)(
        trained_model(kind)
    )
    path = os.fspath(tmp_path / "model.tflite")
    keras_fip.export(model, path, format="tflite")
    outputs = _run(path, x)
    expected = np.asarray(model(x, training=False))
    # Activations are quantised on the fly: outputs within a few per cent of their range.
    assert np.max(np.abs(outputs - expected)) < 0.05 * np.max(np.abs(expected))
    assert np.mean(np.argmax(outputs, -1) == np.argmax(expected, -1)) >= 0.98
    assert _int8_tensors(path), "no int8 weights in the TFLite model"


def test_tflite_export_is_smaller_than_the_float_model_and_keeps_masked_zeros(tmp_path):
    x, _ = contract_data()
    model = trained_model("sequential")
    keras.utils.set_random_seed(0)
    quantized = keras_fip.Quantize(8, data=x, walk=keras_fip.Walk(steps=4, seed=0, verbose=0))(
        model
    )
    quantized_path = os.fspath(tmp_path / "q.tflite")
    keras_fip.export(quantized, quantized_path, format="tflite")
    float_bytes = sum(w.size * 4 for w in model.get_weights())
    assert os.path.getsize(quantized_path) < 0.6 * float_bytes + 4096
    assert model.get_weights()[0].dtype == np.float32  # The input is unchanged.


def test_tflite_export_rejects_an_unknown_format(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Received: format='onnx'"):
        keras_fip.export(model, os.fspath(tmp_path / "m"), format="onnx")
