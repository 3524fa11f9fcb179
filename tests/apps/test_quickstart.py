import json
import os

import pytest
from absl.testing import flagsaver

from apps import quickstart
from tests.apps.conftest import scalar_tags


def test_quickstart_runs_and_shows_the_fip_walk_keeping_function(tmp_path, capsys):
    output_dir = str(tmp_path / "quickstart")
    with flagsaver.flagsaver(output_dir=output_dir, seed=0):
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
    # Compress with its defaults beats both magnitude baselines at the same epoch budget
    # (measured: 0.969 against 0.942 gradual and 0.956 one-shot).
    assert results["fip/90/test/accuracy"] > results["gradual/90/test/accuracy"]
    assert results["fip/90/test/accuracy"] > results["one_shot/90/test/accuracy"]
    assert results["fip/90/test/accuracy"] > results["base/test/accuracy"] - 0.02
    assert results["repair/fip/test/accuracy"] > results["damage/nodes/test/accuracy"]
    assert results["repair/retrain/test/accuracy"] > results["damage/nodes/test/accuracy"]
    assert "trained MLP (base)" in capsys.readouterr().out
    # TensorBoard: the table's figures, and every FIP walk's per-step scalars.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    assert tags["quickstart/quickstart/walk/euclidean_distance"][0] == pytest.approx(
        results["walk/euclidean_distance"])
    for walk in ("walk", "compress", "repair", "ensemble"):
        assert tags[f"{walk}/fip/distance_from_start"], walk


def test_quickstart_refuses_a_distributed_strategy_naming_what_cannot_run(tmp_path):
    with flagsaver.flagsaver(output_dir=str(tmp_path / "out"), strategy="mirrored"):
        with pytest.raises(ValueError, match=r"Damage\('eigen'\).*vulnerable_fraction"):
            quickstart.main([])
    assert not os.path.exists(tmp_path / "out")
