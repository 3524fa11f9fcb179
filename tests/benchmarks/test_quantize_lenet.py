"""`benchmarks.quantize_lenet` at tiny settings."""

import json

import pytest

import keras_fip
from benchmarks import quantize_lenet
from keras_fip.core import tuning


def test_the_benchmark_measures_every_method(tmp_path, monkeypatch):
    calls = []
    original = quantize_lenet.keras_fip.models.base_network

    def small_network(model, dataset, epochs=10, seed=0):
        calls.append((model, dataset, epochs, seed))
        return original("mlp", "digits", epochs=2, seed=seed, cache_dir=False)

    monkeypatch.setattr(quantize_lenet.keras_fip.models, "base_network", small_network)
    rows, summary = quantize_lenet.main(
        [
            "--dataset=digits",
            "--bits=8,2",
            "--fip_epochs=1",
            "--fip_options=" + json.dumps({"schedule": {"min_steps": 5}}),
            "--qat_learning_rates=1e-3",
            "--output=" + str(tmp_path),
        ]
    )
    assert calls == [("lenet_300_100", "digits", 10, 0)]
    methods = {(row["method"], row["bits"]) for row in rows}
    assert methods == {
        ("float", 32),
        ("fip", 8),
        ("qat", 8),
        ("keras_int8", 8),
        ("tflite", 8),
        ("fip", 2),
        ("qat", 2),
        ("keras_int4", 2),
    }
    fip = [row for row in rows if row["method"] == "fip"]
    _, labels = quantize_lenet.keras_fip.data.load("digits")
    fit_rows, _ = tuning.validation_rows(labels, 0.1, 0)
    one_epoch = keras_fip.Walk(epochs=1).resolve().num_steps(len(fit_rows))
    assert [row["steps"] for row in fip] == [max(one_epoch, 5)] * 2
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    sizes = {row["method"]: row["gzipped_tflite_bytes"] for row in rows if row["bits"] == 8}
    assert sizes["keras_int8"] is None  # int8 × int8 matmuls: no TFLite conversion.
    assert all(sizes[method] > 0 for method in ("fip", "qat", "tflite"))
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == summary


def test_unknown_methods_are_rejected():
    with pytest.raises(ValueError, match="gptq"):
        quantize_lenet.main(["--methods=fip,gptq"])


def test_packed_bytes_counts_a_bitmap_the_nonzeros_and_the_scales():
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    kernel = np.zeros((16, 8), "float32")
    kernel[:4] = 1.0  # 32 non-zeros
    model.layers[0].kernel.assign(kernel)
    # bitmap 128 / 8 + 32 non-zeros × 4 bits / 8 + 8 scales × 4 + 8 biases × 4
    assert quantize_lenet.packed_bytes(model, 4) == 16 + 16 + 32 + 32
