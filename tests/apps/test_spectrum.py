import json
import os

import numpy as np
from absl.testing import flagsaver

from apps import spectrum
from tests.apps.conftest import scalar_tags


def test_spectrum_app_writes_rho_trace_and_plot(tmp_path):
    output_dir = str(tmp_path / "spectrum")
    # mlp on digits: 20 inputs x 10 logits x 7,510 weights fits the Gram limit (exact);
    # lenet_300_100 (50,610 weights) does not, so its rho comes from SLQ.
    with flagsaver.flagsaver(
        spectrum_models=["mlp", "lenet_300_100"],
        dataset="digits",
        epochs=2,
        batch_size=64,
        learning_rate=1e-2,
        spectrum_num_inputs=20,
        spectrum_top_k=5,
        spectrum_trace_samples=30,
        spectrum_slq_probes=3,
        spectrum_slq_steps=20,
        spectrum_max_gram_entries=2_000_000,
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        spectrum.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    assert config["spectrum_num_inputs"] == 20
    assert os.path.getsize(os.path.join(output_dir, "eigenvalues.png")) > 0

    assert results["mlp/rho_method"] == "gram"
    assert results["lenet_300_100/rho_method"] == "slq"
    for name in ("mlp", "lenet_300_100"):
        # rank(g) <= N·C = 200 bounds the number of vulnerable directions.
        assert 0.0 < results[f"{name}/rho"] <= 200 / results[f"{name}/num_params"] + 0.02
        assert results[f"{name}/trace"] > 0
        top = results[f"{name}/top_eigenvalues"]
        assert len(top) == 5 and np.all(np.diff(top) <= 0)
    # The Gram matrix gives the exact trace and spectrum: the estimates must agree with it.
    assert results["mlp/num_vulnerable"] <= 200
    np.testing.assert_allclose(results["mlp/trace"], results["mlp/trace_exact"], rtol=0.05)
    np.testing.assert_allclose(
        results["mlp/top_eigenvalues"], results["mlp/gram_top_eigenvalues"], rtol=1e-4
    )
    np.testing.assert_allclose(
        results["mlp/expected_change_unit_perturbation"],
        results["mlp/trace"] / results["mlp/num_params"],
        rtol=1e-9,
    )
    # TensorBoard: ρ and trace, and the top eigenvalues against their rank.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    np.testing.assert_allclose(tags["spectrum/mlp/rho"][0], results["mlp/rho"], rtol=1e-6)
    assert sorted(tags["spectrum/lenet_300_100/top_eigenvalue"]) == [1, 2, 3, 4, 5]
