"""`benchmarks.quantize_bert` on a tiny BERT (not pretrained: the methods, not the figures)."""

import json

import pytest

from benchmarks import quantize_bert
from keras_fip.data import text
from keras_fip.models import bert


def _tiny_masked_lm(**config):
    vocabulary = list(text.RESERVED_TOKENS) + ["the", "a", "good", "bad", "movie", "it", "is"]
    backbone = bert.bert_backbone(
        len(vocabulary), num_layers=1, hidden_dim=16, intermediate_dim=32, max_sequence_length=16
    )
    model = bert.masked_lm(backbone, config["sequence_length"], 3)
    return (
        model,
        text.TextEncoder(vocabulary, config["sequence_length"]),
        {"train/wall_time_seconds": 0.0},
    )


def test_the_benchmark_measures_every_method_on_the_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(bert, "pretrained_masked_lm", _tiny_masked_lm)
    rows, summary = quantize_bert.main(
        [
            "--bits=4",
            "--sequence_length=16",
            "--anchor_sentences=32",
            "--eval_sentences=32",
            "--fip_steps=2",
            "--gptq_samples=4",
            "--output=" + str(tmp_path),
        ]
    )
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"float", "fip", "keras_int4", "gptq"}
    assert by_method["fip"]["steps"] == 2
    # Keras's own int4 layers for the attention (EinsumDense) and embedding kernels.
    assert {"query", "token_embedding"} <= set(by_method["fip"]["keras_layers"])
    assert {"query", "token_embedding"} <= set(by_method["keras_int4"]["layers"]["int4"])
    # GPTQ quantises the encoder's blocks only: the masked-LM head stays float.
    assert "query" in by_method["gptq"]["layers"]["gptq"]
    assert "intermediate_dense" not in by_method["gptq"]["layers"]["gptq"]
    for row in rows[1:]:
        assert row["drop_pp"] == pytest.approx(100 * (rows[0]["accuracy"] - row["accuracy"]))
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == summary
    table = json.loads((tmp_path / "summary.json").read_text())["tables"][0]
    assert [row[0] for row in table["rows"]][0] == "float32"


def test_unknown_methods_are_rejected():
    with pytest.raises(ValueError, match="awq"):
        quantize_bert.main(["--methods=fip,awq"])
