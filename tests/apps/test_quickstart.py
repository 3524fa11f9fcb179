import contextlib
import io
import json
import os

import pytest
from absl.testing import flagsaver

from apps import common
from apps import quickstart
from keras_fip import baselines
from keras_fip import data
from tests.apps.conftest import scalar_tags


def test_quickstart_runs_and_shows_the_fip_walk_keeping_function(tmp_path):
    output_dir = str(tmp_path / "quickstart")
    # One rate for the baselines (no tuning: `test_tune_baselines_*` covers it), to keep
    # this test short; the default run tunes them (the large test below).
    printed = io.StringIO()
    # (Not pytest's `capsys`: with it this test fails here, on main too, with "I/O
    # operation on closed file" in pytest's capture teardown.)
    with (
        flagsaver.flagsaver(
            output_dir=output_dir, seed=0, quickstart_prune_learning_rates=["3e-3"]
        ),
        contextlib.redirect_stdout(printed),
    ):
        quickstart.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    assert os.path.isfile(os.path.join(output_dir, "summary.png"))
    assert results["base/test/accuracy"] > 0.9
    # The walk moved the weights but kept the function; the same-size random step did not.
    assert results["walk/euclidean_distance"] > 9.0
    assert abs(results["walk/test/accuracy"] - results["base/test/accuracy"]) < 0.01
    assert results["random_perturbation/test/accuracy"] < results["walk/test/accuracy"] - 0.05
    assert 0.0 < results["geometry/rho"] < 1.0
    assert abs(results["gradual/90/sparsity"] - 0.9) < 1e-3  # per-layer rounding
    assert abs(results["fip/90/sparsity"] - 0.9) < 1e-3
    assert results["gradual/90/learning_rate"] == results["one_shot/90/learning_rate"] == 3e-3
    assert not any("tuning" in key for key in results)
    # Compress with its defaults beats both magnitude baselines at 3e-3 at the same epoch
    # budget (measured: 0.969 against 0.942 gradual and 0.956 one-shot).
    assert results["fip/90/test/accuracy"] > results["gradual/90/test/accuracy"]
    assert results["fip/90/test/accuracy"] > results["one_shot/90/test/accuracy"]
    assert results["fip/90/test/accuracy"] > results["base/test/accuracy"] - 0.02
    assert results["repair/fip/test/accuracy"] > results["damage/nodes/test/accuracy"]
    assert results["repair/retrain/test/accuracy"] > results["damage/nodes/test/accuracy"]
    # With its defaults and no more example passes, the FIP ensemble resists the attack
    # transferred at ε 0.1 better than the deep ensemble and the single network; at 0.2 the
    # attack nearly erases every model, the FIP ensemble still the least.
    assert results["ensemble/fip/train_examples"] <= results["ensemble/deep/train_examples"]
    fip = results["ensemble/fip/transfer_pgd/0.1/accuracy"]
    assert fip > results["ensemble/deep/transfer_pgd/0.1/accuracy"] + 0.03
    assert fip > results["ensemble/single/transfer_pgd/0.1/accuracy"] + 0.03
    fip = results["ensemble/fip/transfer_pgd/0.2/accuracy"]
    assert fip > results["ensemble/deep/transfer_pgd/0.2/accuracy"]
    assert fip > results["ensemble/single/transfer_pgd/0.2/accuracy"]
    assert results["ensemble/deep/test/accuracy"] > results["base/test/accuracy"] - 0.01
    assert results["ensemble/fip/test/accuracy"] > results["base/test/accuracy"] - 0.01
    # The report groups each comparison under its heading, with what its columns mean.
    report = printed.getvalue()
    headings = ["1. A functionally invariant walk", "2. Sparsify", "3. Damage", "4. Repair"]
    headings.append("5. Ensembles under attack")
    positions = [report.index(heading) for heading in headings]
    assert positions == sorted(positions)
    assert "'moved': the Euclidean distance" in report
    assert "trained MLP (base)" in report
    with open(os.path.join(output_dir, "summary.json")) as f:
        page = json.load(f)
    compress_table = page["tables"][0]
    assert compress_table["rows"][0][1] == round(100 * results["fip/90/test/accuracy"], 2)
    assert os.path.isfile(os.path.join(output_dir, "provenance.json"))
    assert "transfer PGD accuracy at eps 0.1 / 0.2 / 0.3" in printed.getvalue()
    # TensorBoard: the table's figures, and every FIP walk's per-step scalars.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    assert tags["quickstart/quickstart/walk/euclidean_distance"][0] == pytest.approx(
        results["walk/euclidean_distance"]
    )
    for walk in ("walk", "compress", "repair", "ensemble"):
        assert tags[f"{walk}/fip/distance_from_start"], walk


@pytest.mark.large
def test_quickstart_under_a_strategy_matches_one_device(tmp_path, app_mirrored_strategy):
    results = {}
    for strategy in ("default", "mirrored"):
        output_dir = str(tmp_path / strategy)
        with (
            flagsaver.flagsaver(
                output_dir=output_dir,
                seed=0,
                strategy=strategy,
                quickstart_prune_learning_rates=["3e-3"],
            ),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            quickstart.main([])
        with open(os.path.join(output_dir, "results.json")) as f:
            results[strategy] = json.load(f)
    expected, got = results["default"], results["mirrored"]
    assert sorted(got) == sorted(expected)
    # The base network's `fit` sums gradients over the replicas in another order: the
    # figures agree to a few of the 360 test digits (measured: at most 2), ρ and the
    # trace of g to rounding of the base weights.
    for key, value in expected.items():
        if key.endswith("accuracy"):
            assert abs(got[key] - value) <= 4 / 360 + 1e-9, key
    assert got["geometry/rho"] == pytest.approx(expected["geometry/rho"], abs=0.02)
    assert got["geometry/trace"] == pytest.approx(expected["geometry/trace"], rel=0.01)
    assert got["fip/90/test/accuracy"] > got["gradual/90/test/accuracy"]
    assert abs(got["fip/90/sparsity"] - 0.9) < 1e-3


def test_tune_baselines_chooses_the_best_rate_on_a_validation_split():
    # One entry far too small (1e-7: barely fine-tuned), one diverging (10), one good.
    x, y = data.load("digits", "train")
    grid = common.learning_rate_grid(["10", "1e-7", "3e-3"], "grid")
    chosen = quickstart.tune_baselines(
        {"one_shot": baselines.one_shot_magnitude_pruning},
        0.9,
        x,
        y,
        seed=0,
        grid=grid,
        validation_fraction=0.2,
        base_epochs=3,
        prune_epochs=2,
        prune_batch_size=128,
    )
    rate, validation = chosen["one_shot"]
    assert list(validation) == [1e-7, 3e-3, 10.0]  # The grid, not extended.
    assert rate == 3e-3 == max(validation, key=validation.get)
    assert validation[10.0] < validation[3e-3] - 0.2
    assert validation[1e-7] < validation[3e-3]
    # Accuracies on the 20% split of the training digits (287 images), not on the test set.
    _, (x_val, _) = common.validation_split(x, y, 0.2, seed=0)
    assert all(round(v * len(x_val), 6).is_integer() for v in validation.values())
    # One rate: used as given, nothing trained.
    assert quickstart.tune_baselines({"one_shot": None}, 0.9, x, y, 0, [3e-3], 0.2, 3, 2, 128) == {
        "one_shot": (3e-3, {})
    }


@pytest.mark.large
def test_quickstart_default_run_tunes_the_baselines_on_validation(tmp_path):
    """The quick start as a user runs it (its default grid for the baselines, ~5 min)."""
    output_dir = str(tmp_path / "quickstart")
    with flagsaver.flagsaver(output_dir=output_dir, seed=0):
        quickstart.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    for key in ("gradual", "one_shot"):
        validation = results[f"{key}/90/tuning/validation_accuracy"]
        assert {"0.001", "0.002", "0.005", "0.01"} <= set(validation)
        best = max(validation, key=lambda rate: (validation[rate], -float(rate)))
        assert results[f"{key}/90/learning_rate"] == float(best)
    assert results["pruning/tuning/wall_time_seconds"] > 0
    # Compress with its defaults ahead of both tuned baselines
    # (measured, seed 0: 0.9722 against gradual 0.9667 and one-shot 0.9556, both at 1e-2;
    # 360 test images, one image is 0.28 pp).
    assert results["fip/90/test/accuracy"] > results["gradual/90/test/accuracy"]
    assert results["fip/90/test/accuracy"] > results["one_shot/90/test/accuracy"]
