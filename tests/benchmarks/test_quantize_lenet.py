"""`benchmarks.quantize_lenet` at tiny settings."""

import json

import numpy as np
import pytest

import keras_fip
from benchmarks import quantize_lenet
from keras_fip.core import tuning


def test_the_benchmark_measures_every_method(tmp_path, monkeypatch):
    calls = []
    original = quantize_lenet.float_network

    def small_network(model, dataset, epochs, seed, excluded_rows):
        calls.append((model, dataset, epochs, seed, list(excluded_rows)))
        return original("mlp", dataset, 2, seed, excluded_rows, cache_dir=str(tmp_path))

    monkeypatch.setattr(quantize_lenet, "float_network", small_network)
    rows, summary = quantize_lenet.main(
        [
            "--dataset=digits",
            "--bits=8,2",
            "--methods=fip,qat,keras_int8,keras_int4,gptq,tflite",
            "--fip_epochs=1",
            "--fip_options=" + json.dumps({"schedule": {"min_steps": 5}}),
            "--qat_learning_rates=1e-3",
            "--output=" + str(tmp_path),
        ]
    )
    _, labels = quantize_lenet.keras_fip.data.load("digits")
    fit_rows, validation_rows = tuning.validation_rows(labels, 0.1, 0)
    # The float network never sees the validation rows.
    assert calls == [("lenet_300_100", "digits", 10, 0, validation_rows.tolist())]
    methods = {(row["method"], row["bits"]) for row in rows}
    assert methods == {
        ("float", 32),
        ("fip", 8),
        ("qat", 8),
        ("keras_int8", 8),
        ("gptq", 8),
        ("tflite", 8),
        ("fip", 2),
        ("qat", 2),
        ("keras_int4", 2),
        ("gptq", 2),
    }
    fip = [row for row in rows if row["method"] == "fip"]
    for row in fip:
        assert row["tflite_match"]["argmax_agreement"] > 0.98
        assert row["tflite_match"]["relative_difference"] < 0.05
    one_epoch = keras_fip.Walk(epochs=1).resolve().num_steps(len(fit_rows))
    assert [row["steps"] for row in fip] == [max(one_epoch, 5)] * 2
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    sizes = {row["method"]: row["gzipped_tflite_bytes"] for row in rows if row["bits"] == 8}
    assert sizes["keras_int8"] is None  # int8 × int8 matmuls: no TFLite conversion.
    assert all(sizes[method] > 0 for method in ("fip", "qat", "tflite"))
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == summary
    table = json.loads((tmp_path / "summary.json").read_text())["tables"][0]
    assert len(table["rows"]) == len(summary)


def test_unknown_methods_are_rejected():
    with pytest.raises(ValueError, match="awq"):
        quantize_lenet.main(["--methods=fip,awq"])


def test_the_float_network_is_cached_by_its_excluded_rows(tmp_path):
    first, results = quantize_lenet.float_network("mlp", "digits", 1, 0, [0, 1], str(tmp_path))
    again, _ = quantize_lenet.float_network("mlp", "digits", 1, 0, [0, 1], str(tmp_path))
    other, _ = quantize_lenet.float_network("mlp", "digits", 1, 0, [2, 3], str(tmp_path))
    assert results["train/examples"] == len(quantize_lenet.keras_fip.data.load("digits")[1]) - 2
    assert np.array_equal(first.get_weights()[0], again.get_weights()[0])
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])


def test_packed_bytes_counts_a_bitmap_the_nonzeros_and_the_scales():
    import keras

    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    kernel = np.zeros((16, 8), "float32")
    kernel[:4] = 1.0  # 32 non-zeros
    model.layers[0].kernel.assign(kernel)
    # bitmap 128 / 8 + 32 non-zeros × 4 bits / 8 + 8 scales × 4 + 8 biases × 4
    assert quantize_lenet.packed_bytes(model, 4) == 16 + 16 + 32 + 32


def test_the_summary_gives_the_chain_per_seed_against_the_dense_network():
    args = quantize_lenet.parse(["--methods=compress_fip", "--sparsity=0.965", "--bits=3"])
    rows = [
        {"seed": 0, "method": "float", "bits": 32, "accuracy": 0.9812},
        {
            "seed": 0,
            "method": "compress_fip",
            "bits": 3,
            "accuracy": 0.9807,
            "times_smaller": 55.51,
            "gzipped_tflite_bytes": 19213,
        },
    ]
    page = quantize_lenet.summary_page(args, rows, quantize_lenet.summarize(rows))
    assert page["title"] == "Quantize: chain(Compress(0.965), Quantize) on lenet_300_100"
    chain = page["tables"][1]
    assert chain["caption"] == "chain(Compress(0.965), Quantize(3)) per seed"
    assert chain["rows"] == [[0, "55.5", 19213, "+0.05"]]
