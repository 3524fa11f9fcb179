import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import flagsaver

pytest.importorskip("art", reason="needs the `robustness` extra")

from apps import robustness  # noqa: E402
from keras_fip import data  # noqa: E402
from tests.apps.conftest import scalar_tags  # noqa: E402


def test_robustness_app_compares_every_method_under_both_attacks(tmp_path):
    output_dir = str(tmp_path / "robustness")
    with flagsaver.flagsaver(
        experiments=["digits/mlp"],
        seeds=["0"],
        num_members=2,
        base_epochs=5,
        learning_rate=1e-2,
        batch_size=64,
        attack_examples=40,
        pgd_iterations=3,
        pgd_step=0.1,
        pgd_restarts=0,
        fip_steps_between=3,
        fge_cycle_epochs=1,
        snapshot_cycle_epochs=1,
        diagnostic_examples=20,
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        robustness.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    x, _ = data.load("digits", "train")
    for method in ("fip", "deep", "fge", "snapshot", "single"):
        for measure in ("clean", "transfer_pgd", "whitebox_pgd"):
            value = results[f"digits/{method}/{measure}/accuracy/mean"]
            assert 0.0 <= value <= 1.0
            assert f"digits/{method}/{measure}/accuracy/std" in results
    # Clean networks are accurate; the white-box attack hurts the single network.
    assert results["digits/single/clean/accuracy/mean"] > 0.8
    assert (
        results["digits/single/whitebox_pgd/accuracy/mean"]
        < results["digits/single/clean/accuracy/mean"]
    )
    # Compute: epochs × examples.
    assert results["digits/single/train_examples"] == 5 * len(x)
    assert results["digits/deep/train_examples"] == 2 * 5 * len(x)
    assert results["digits/fip/train_examples"] > 5 * len(x)
    assert results["digits/fip/train_examples/fraction_of_deep"] == pytest.approx(
        results["digits/fip/train_examples"] / results["digits/deep/train_examples"]
    )
    assert results["digits/fip/transfer_pgd/margin_over_single"] == pytest.approx(
        results["digits/fip/transfer_pgd/accuracy/mean"]
        - results["digits/single/transfer_pgd/accuracy/mean"]
    )
    assert results["digits/attack/epsilon"] == 0.3
    assert results["digits/attack/iterations"] == 3
    assert results["digits/attack/restarts"] == 0
    assert results["digits/attack/examples"] == 40
    assert results["digits/num_seeds"] == 1
    assert 0.0 < results["digits/fip/relative_weight_distance/mean"]
    assert -1.0 <= results["digits/fip/coherence/mean"] <= 1.0
    # FIP runs with the library's defaults: the labels' weight chosen on held-out data, the
    # diversity radius 0.3 of the inputs' range; the app sets only the budget.
    assert results["digits/fip/labels/mean"] > 0.0
    assert results["digits/fip/radius/mean"] == pytest.approx(0.3)
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    assert sorted(k for k in config if k.startswith("fip_")) == [
        "fip_member_fraction",
        "fip_options",
        "fip_steps_between",
    ]
    assert config["fip_options"] is None
    for name in ("member_vs_ensemble.png", "layer_diversity.png", "weight_pca.png", "config.json"):
        assert os.path.isfile(os.path.join(output_dir, name))
    served = tf.saved_model.load(os.path.join(output_dir, "serving"))
    probabilities = np.asarray(served.serve(x[:4]))
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    # TensorBoard: every figure per seed (step: the seed) and the FIP walk's scalars.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    assert tags["robustness/digits/fip/transfer_pgd/accuracy"][0] == pytest.approx(
        results["digits/fip/transfer_pgd/accuracy/mean"]
    )
    assert tags["digits_mlp/fip/seed_0/fip/distance_from_start"]


def test_experiments_after_the_first_run_on_the_lighter_plan():
    plans = robustness.experiment_plans()  # The defaults.
    assert plans == [
        ("mnist/lenet_300_100", [0, 1, 2], list(robustness.METHODS), 10, 500),
        ("mnist/cnn5", [0], ["fip", "single"], 5, 200),
        ("cifar10/vgg11", [0], ["fip", "single"], 5, 200),
    ]
    with flagsaver.flagsaver(
        experiments=["digits/mlp", "mnist/cnn5"],
        methods=["fip", "deep"],
        other_methods=list(robustness.METHODS),
        other_seeds=["0", "1"],
        other_num_members=10,
        other_attack_examples=500,
    ):
        assert robustness.experiment_plans()[1] == ("mnist/cnn5", [0, 1], ["fip", "deep"], 10, 500)


def test_robustness_app_rejects_unknown_methods_and_experiments(tmp_path):
    with flagsaver.flagsaver(methods=["fip", "bagging"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="methods"):
            robustness.main([])
    with flagsaver.flagsaver(experiments=["mnist"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="experiments"):
            robustness.main([])
    with flagsaver.flagsaver(other_methods=["fip", "boosting"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="other_methods"):
            robustness.main([])
    with flagsaver.flagsaver(methods=["deep"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="other_methods"):
            robustness.main([])
    for options in (
        "{labels: 1}",
        '{"data": 3}',
        '{"walk": {"seed": 3}}',
        '{"walk": 3}',
        '{"labels": -1}',
        '{"task_weight": 1}',
    ):
        with flagsaver.flagsaver(fip_options=options, output_dir=str(tmp_path)):
            with pytest.raises((ValueError, TypeError), match="fip_options|labels|task_weight"):
                robustness.main([])
