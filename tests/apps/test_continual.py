import json
import os

import numpy as np
import pytest
from absl.testing import flagsaver

from apps import continual
from tests.apps.conftest import scalar_tags


def test_continual_app_compares_every_method_on_digits(tmp_path):
    output_dir = str(tmp_path / "continual")
    with flagsaver.flagsaver(
        benchmarks=["split_mnist"],
        dataset="digits",
        methods=list(continual.METHODS),
        seeds=["0"],
        epochs=1,
        continual_base_epochs=2,
        batch_size=32,
        memory_per_task=20,
        max_train_examples=96,
        ewc_lambda="100",
        output_dir=output_dir,
    ):
        continual.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    for method in continual.METHODS:
        key = f"split_mnist/{method}"
        assert 0.0 <= results[f"{key}/acc/mean"] <= 1.0
        assert results[f"{key}/epochs"] == 1
        assert np.asarray(results[f"{key}/R"]).shape == (1, 5, 5)
        assert results[f"{key}/task_incremental/acc/mean"] >= results[f"{key}/acc/mean"] - 1e-9
        for j in range(5):
            assert f"{key}/task_{j}/accuracy/mean" in results
        # The path recording's time is told apart from training's (fip and finetune).
        assert results[f"{key}/train_time_seconds"] == pytest.approx(
            results[f"{key}/wall_time_seconds"] - results[f"{key}/eval_time_seconds"]
        )
        assert (results[f"{key}/eval_time_seconds"] > 0) == (method in ("fip", "finetune"))
    assert results["split_mnist/max_train_examples"] == 96
    assert results["split_mnist/data"] == "digits"
    for name in ("split_mnist_path.png", "split_mnist_final.png", "config.json"):
        assert os.path.isfile(os.path.join(output_dir, name))
    # TensorBoard: every task's accuracy after each task (step: the task learned), along
    # the walks, and the FIP walks' per-step scalars.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    for method in continual.METHODS:
        prefix = f"continual/split_mnist/{method}/seed_0/after_task"
        assert sorted(tags[f"{prefix}/task_0/accuracy"]) == [0, 1, 2, 3, 4]
        assert tags[f"{prefix}/task_4/accuracy"][4] == pytest.approx(
            results[f"split_mnist/{method}/R"][0][4][4]
        )
    assert "continual/split_mnist/fip/seed_0/path/task_0/accuracy" in tags
    for name in ("distance", "distance_from_start", "secondary_loss"):
        assert tags[f"split_mnist/fip/seed_0/task_4/fip/{name}"]


def test_continual_app_two_task_run_and_memory_sweep(tmp_path):
    output_dir = str(tmp_path / "two")
    with flagsaver.flagsaver(
        benchmarks=["mnist_fmnist"],
        dataset="digits",
        methods=["fip", "replay"],
        seeds=["0"],
        epochs=1,
        continual_base_epochs=2,
        batch_size=64,
        memory_sizes=["10", "40"],
        max_train_examples=128,
        fip_learning_rate="2e-3",
        output_dir=output_dir,
    ):
        results = continual.main([])
    assert results["fip_options"] == {"learning_rate": 2e-3}
    assert results["mnist_fmnist/memory_per_task"] == 500
    for size in ("10", "40"):
        assert 0.0 <= results[f"mnist_fmnist/memory_{size}/fip/acc/mean"] <= 1.0
    assert os.path.isfile(os.path.join(output_dir, "mnist_fmnist_memory.png"))


def test_continual_app_rejects_unknown_methods(tmp_path):
    with flagsaver.flagsaver(methods=["magic"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="methods"):
            continual.main([])
    with flagsaver.flagsaver(
        fip_learning_rate="1e-3", fip_step_rule="metric", output_dir=str(tmp_path)
    ):
        with pytest.raises(ValueError, match="fip_learning_rate"):
            continual.main([])
