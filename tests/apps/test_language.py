import json
import os

import numpy as np
import pytest
from absl.testing import flagsaver

import keras_fip
from apps import language
from tests.apps.conftest import assert_results_close
from tests.apps.conftest import scalar_tags

pytest.importorskip("keras_hub")  # the `text` extra


def _tiny_flags(tmp_path, **overrides):
    settings = dict(
        seeds=["0"],
        output_dir=str(tmp_path / "language"),
        cache_dir=str(tmp_path / "cache"),
        language_vocabulary_size=200,
        language_sequence_length=12,
        language_num_layers=1,
        language_hidden_dim=8,
        language_intermediate_dim=16,
        language_pretrain_epochs=1,
        language_max_sentences=200,
        language_eval_sentences=32,
        language_pppl_sentences=4,
        language_sparsities=["50"],
        language_compress_steps=4,
        language_anchor_sentences=32,
        language_task_epochs=1,
        language_cl_epochs=1,
        language_memory=16,
        language_max_task_examples=32,
        language_chain_sparsities=["30"],
        language_record_every=2,
        language_query_examples=16,
    )
    settings.update(overrides)
    return flagsaver.flagsaver(**settings)


@pytest.mark.large
def test_language_app_runs_every_stage_on_a_tiny_bert(tmp_path):
    with _tiny_flags(tmp_path):
        language.main([])
    with open(tmp_path / "language" / "results.json") as f:
        results = json.load(f)
    assert 0.0 <= results["seed0/pretrain/held_out/masked_token_accuracy"] <= 1.0
    assert results["seed0/compress/50/measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    for method in language.CL_METHODS:
        assert 0.0 <= results[f"seed0/continual/{method}/cr/accuracy"] <= 1.0
    for name in ("cl_then_co", "co_then_cl"):
        assert results[f"seed0/chain/30/{name}/measured_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert results["seed0/chain/30/weight_distance"] > 0
    assert os.path.isfile(tmp_path / "language" / "compositions.png")
    assert results["seed0/submanifold/networks"] >= 5
    families = results["seed0/submanifold/families"]
    # base, the shared ContinualLearn path, and each order's walk at 30%.
    assert set(families) == {"base", "cl", "cl_then_co_30", "co_then_cl_30"}
    assert results["seed0/submanifold/networks"] == sum(families.values())
    assert results["seed0/submanifold/nll/mr/best_family"] in families
    for order in ("cl_then_co", "co_then_cl"):
        assert f"seed0/submanifold/nll/mr/order_means/{order}" in results
    for stage in ("pretrain", "compress", "sst5_classifier", "continual", "chain", "submanifold"):
        assert results[f"seed0/{stage}/stage_wall_time_seconds"] > 0
    for name in ("mr", "trec"):
        assert results[f"seed0/submanifold/pseudo_perplexity/{name}/best_family"] in families
    # The grid (1e2, 1e4, 1e6), or up to 3 steps of it past an edge that wins alone.
    assert results["seed0/continual/ewc/lambda"] in [10.0**k for k in range(-4, 13, 2)]
    assert os.path.isfile(tmp_path / "language" / "submanifold.png")


def test_language_app_pretrains_and_reports_on_a_tiny_bert(tmp_path):
    with _tiny_flags(tmp_path, language_stages=["compress"], language_sparsities=[]):
        language.main([])
    with open(tmp_path / "language" / "results.json") as f:
        results = json.load(f)
    assert 0.0 <= results["seed0/pretrain/held_out/masked_token_accuracy"] <= 1.0
    assert results["seed0/pretrain/held_out/pseudo_perplexity"] > 1.0
    assert results["seed0/compress/dense/pseudo_perplexity"] > 1.0
    assert os.path.isfile(tmp_path / "language" / "config.json")
    # TensorBoard: the figures are scalars under <output_dir>/logs.
    tags = scalar_tags(str(tmp_path / "language" / "logs"))
    tag = next(t for t in tags if t.endswith("seed0/compress/dense/pseudo_perplexity"))
    assert list(tags[tag].values()) == [
        pytest.approx(results["seed0/compress/dense/pseudo_perplexity"])
    ]


@pytest.mark.large
def test_language_app_under_a_strategy_matches_one_device(tmp_path, app_mirrored_strategy):
    results = {}
    for strategy in ("default", "mirrored"):  # The second loads the first's pretraining.
        with _tiny_flags(
            tmp_path, output_dir=str(tmp_path / strategy), strategy=strategy, language_dropout=0.0
        ):
            language.main([])
        with open(tmp_path / strategy / "results.json") as f:
            results[strategy] = json.load(f)
    # Measured: the weight distances to 5e-5 relative, the sub-manifold's
    # NLLs to 2.4e-4, every other figure to 1e-5; the names and families equal.
    assert_results_close(results["mirrored"], results["default"], rtol=1e-3, atol=1e-7)


def test_sst5_classifier_takes_the_dropout_of_the_flag():
    import keras

    from keras_fip.models import bert

    keras.utils.set_random_seed(0)
    backbone = bert.bert_backbone(
        50, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=8, max_sequence_length=6
    )
    mlm = bert.masked_lm(backbone, sequence_length=6, num_predictions=2)
    rng = np.random.default_rng(0)
    tasks = {"sst5": (rng.integers(1, 50, (8, 6)).astype("int32"), rng.integers(0, 5, 8))}
    with flagsaver.flagsaver(
        language_dropout=0.0, language_sequence_length=6, language_task_epochs=1
    ):
        model = language.sst5_classifier(mlm, tasks, seed=0)
    rates = [
        layer.rate for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)
    ]
    assert rates and set(rates) == {0.0}
    assert bert.find_backbone(mlm).get_config()["dropout"] == 0.1  # Not changed.


@pytest.mark.parametrize("training", [False, True])
def test_language_continual_learn_walks_in_the_mode_of_the_flag(training):
    rng = np.random.default_rng(0)
    tasks = {
        name: (rng.integers(1, 50, (8, 6)), rng.integers(0, classes, 8))
        for name, classes in (("sst5", 5), ("cr", 2))
    }
    with flagsaver.flagsaver(language_cl_training=training, language_memory=4):
        operation = language._learn_operation(tasks, seed=0)
        assert len(language._memory(tasks, 0)) == 4
    assert operation.walk.training is training
    assert operation.walk.rule == keras_fip.rules.Penalty(1e-3)  # The app's flag's default.
    assert operation.walk.batch_size == 64 and operation.walk.seed == 0


def test_language_app_refuses_a_bad_compress_learning_rate(tmp_path):
    with _tiny_flags(tmp_path, language_compress_learning_rate="fast"):
        with pytest.raises(ValueError, match="language_compress_learning_rate"):
            language.main([])
    assert not os.path.exists(tmp_path / "language")  # Refused before any work.


@pytest.mark.parametrize("value, expected", [("3e-3", 3e-3), ("auto", "auto")])
def test_language_compress_walks_at_the_rate_of_the_flag(value, expected):
    with flagsaver.flagsaver(language_compress_learning_rate=value):
        operation = language._compress_operation(0.3, np.zeros((4, 6), "int32"), seed=0)
    assert operation.walk.rule == keras_fip.rules.Penalty(expected)
