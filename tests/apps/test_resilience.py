import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import flagsaver

from apps import resilience
from tests.apps.conftest import assert_results_close
from tests.apps.conftest import scalar_tags


def test_resilience_app_writes_vulnerability_deletion_and_fault_results(tmp_path):
    output_dir = str(tmp_path / "resilience")
    with flagsaver.flagsaver(
        dataset="digits",
        epochs=4,
        batch_size=64,
        learning_rate=3e-3,
        resilience_mnist_models=["mlp"],
        resilience_cifar_models=["cnn5"],
        resilience_cifar_dataset="digits",
        resilience_cifar_epochs=3,
        resilience_directions=12,
        resilience_cifar_directions=4,
        resilience_norm=1.0,
        resilience_num_eigenpairs=5,
        resilience_metric_examples=100,
        resilience_scatter_directions=6,
        resilience_rho_examples=40,
        resilience_rho_probes=2,
        resilience_rho_steps=10,
        resilience_mlp_width=40,
        resilience_deletion_step=0.25,
        resilience_deletion_seeds=2,
        resilience_path_examples=100,
        resilience_layer_models=["lenet_300_100"],
        resilience_layer_step=0.5,
        resilience_layer_seeds=1,
        resilience_fault_model="mlp",
        resilience_bit_counts=["1", "4"],
        resilience_gaussian_norms=["1"],
        resilience_zero_fractions=["0.5"],
        resilience_fault_seeds=2,
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        resilience.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(output_dir, "config.json")) as f:
        assert json.load(f)["resilience_directions"] == 12
    for name in ("vulnerability.png", "prediction.png", "deletion.png", "layers.png", "faults.png"):
        assert os.path.getsize(os.path.join(output_dir, name)) > 0

    # The results page's table: one row per network, the figures of results.json.
    with open(os.path.join(output_dir, "summary.json")) as f:
        rows = json.load(f)["tables"][0]["rows"]
    assert [row[0] for row in rows] == ["mlp", "cnn5"]
    assert rows[0][2] == round(100 * results["mlp/eigen/test/accuracy"], 2)

    # Vulnerability: the eigen adversary hurts more than every random direction.
    for name, directions in (("mlp", 12), ("cnn5", 4)):
        clean = results[f"{name}/test/accuracy"]
        assert results[f"{name}/random/num_directions"] == directions
        assert results[f"{name}/random/test/accuracy/min"] <= clean + 0.05
        assert results[f"{name}/eigen/test/accuracy"] < results[f"{name}/random/test/accuracy/min"]
        # The network Damage returns (inputs only, its defaults), against its opposite.
        assert results[f"{name}/eigen/test/accuracy"] == results[f"{name}/eigen/plus/test/accuracy"]
        assert (
            results[f"{name}/eigen/test/accuracy"] <= results[f"{name}/eigen/minus/test/accuracy"]
        )
        assert results[f"{name}/eigen/num_matvecs"] <= 100
        assert 0 < results[f"{name}/rho"] <= 1
        # δᵀgδ of random unit directions averages trace(g)/n; eigen is far above it.
        assert (
            results[f"{name}/eigen/predicted_change"]
            > 10 * results[f"{name}/random/predicted_change/mean"]
        )
    assert results["mlp/random/predicted_change/mean"] == pytest.approx(
        results["mlp/expected_change"], rel=0.5
    )

    # Deletion: every fraction has mean and std over the 2 orders; all deleted is chance.
    for fraction in ("0", "0.25", "0.5", "0.75", "1"):
        assert 0 <= results[f"mlp1/nodes/{fraction}/test/accuracy/mean"] <= 1
        assert results[f"mlp1/nodes/{fraction}/test/accuracy/std"] >= 0
    assert results["mlp1/nodes/0/test/accuracy/mean"] == results["mlp1/test/accuracy"]
    assert results["mlp1/nodes/1/test/accuracy/mean"] < 0.3
    assert results["mlp1/nodes/0/test/accuracy/std"] == 0
    assert 0 < results["mlp1/knee"] < 1 and len(results["mlp1/knee/per_seed"]) == 2
    assert len(results["mlp1/breakdown_speed/mean"]) == 4
    assert len(results["mlp1/breakdown_acceleration/mean"]) == 3
    # The deletion process's speed at the networks with units left, its acceleration
    # between them; the segments' own (second-order) peak beside it.
    assert results["mlp1/breakdown_speed/times"] == [0.0, 0.25, 0.5, 0.75]
    assert results["mlp1/breakdown_acceleration/times"] == [0.125, 0.375, 0.625]
    assert results["mlp1/max_acceleration_at"] in (0.125, 0.375, 0.625)
    assert results["mlp1/max_acceleration_minus_knee"] == pytest.approx(
        results["mlp1/max_acceleration_at"] - results["mlp1/knee_of_mean_curve"]
    )
    assert 0 <= results["mlp1/max_acceleration_within_10_points/per_seed_count"] <= 2
    assert results["mlp1/segment/max_acceleration_at"] in (0.25, 0.5, 0.75)
    for layer in ("dense_1", "dense_2"):
        assert f"lenet_300_100/nodes/{layer}/knee" in results
        assert results[f"lenet_300_100/nodes/{layer}/1/test/accuracy/mean"] < 0.3

    # Faults: every class and count has mean ± std; zeroing half the kernels hurts.
    for label in ("any", "sign", "exponent", "mantissa", "int8_any", "int8_sign"):
        for count in (1, 4):
            assert 0 <= results[f"mlp/bitflip/{label}/{count}/test/accuracy/mean"] <= 1
    assert (
        results["mlp/bitflip/mantissa/1/test/accuracy/mean"] >= results["mlp/test/accuracy"] - 0.02
    )
    assert np.isfinite(results["mlp/gaussian/1/test/accuracy/std"])
    assert results["mlp/weights/0.5/test/accuracy/mean"] < results["mlp/test/accuracy"]

    # TensorBoard: the vulnerability figures, the deletion curve (step: percent deleted),
    # the fault table.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    assert tags["resilience/mlp/vulnerability/eigen/test/accuracy"][0] == pytest.approx(
        results["mlp/eigen/test/accuracy"]
    )
    assert sorted(tags["resilience/mlp1/deletion/test/accuracy/mean"]) == [0, 25, 50, 75, 100]
    assert "resilience/faults/mlp/gaussian/1/test/accuracy/mean" in tags


def test_resilience_app_rejects_unknown_parts(tmp_path):
    with flagsaver.flagsaver(resilience_parts=["everything"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="resilience_parts"):
            resilience.main([])


def test_vulnerability_under_a_strategy_equals_one_device(
    tmp_path, monkeypatch, app_mirrored_strategy
):
    mirrored_strategy = app_mirrored_strategy
    seen = []  # The strategy each vulnerability measurement runs in.
    measure = resilience.vulnerability
    monkeypatch.setattr(
        resilience,
        "vulnerability",
        lambda *args: (seen.append(tf.distribute.get_strategy()), measure(*args))[1],
    )
    cache_dir = str(tmp_path / "cache")  # The second run loads the first run's networks.
    results = {}
    for strategy in ("default", "mirrored"):
        output_dir = str(tmp_path / strategy)
        with flagsaver.flagsaver(
            dataset="digits",
            epochs=2,
            batch_size=64,
            learning_rate=3e-3,
            resilience_parts=["vulnerability"],
            resilience_mnist_models=["mlp"],
            resilience_cifar_models=["cnn5"],
            resilience_cifar_dataset="digits",
            resilience_cifar_epochs=1,
            resilience_directions=3,
            resilience_cifar_directions=2,
            resilience_norm=1.0,
            resilience_num_eigenpairs=3,
            resilience_metric_examples=63,
            resilience_scatter_directions=2,
            resilience_rho_examples=21,
            resilience_rho_probes=2,
            resilience_rho_steps=6,
            resilience_mlp_width=20,
            strategy=strategy,
            output_dir=output_dir,
            cache_dir=cache_dir,
        ):
            resilience.main([])
        with open(os.path.join(output_dir, "results.json")) as f:
            results[strategy] = json.load(f)
    assert seen[2:] == [mirrored_strategy] * 2 and mirrored_strategy not in seen[:2]
    expected = results["default"]
    # Odd example counts: the replicas' shares of the batches differ.
    assert_results_close(results["mirrored"], expected, rtol=1e-5, atol=1e-7)
    # The eigen adversary, the scatter and ρ were computed, not skipped.
    for name in ("mlp", "cnn5"):
        assert expected[f"{name}/eigen/predicted_change"] > 0
        assert len(expected[f"{name}/eigen/top_eigenvalues"]) == 3
        assert expected[f"{name}/random/predicted_change/mean"] > 0
