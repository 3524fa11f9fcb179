"""`benchmarks.damage_repair_users` on tiny settings: its runs, its summary and its files."""

import json

from benchmarks import damage_repair_users

TINY = [
    "--eigen_dataset=digits",
    "--base_epochs=1",
    "--directions=2",
    "--examples=100",
    "--models=residual_convnet",
    "--epochs=1",
    "--train_examples=200",
    "--retrain_learning_rates=3e-3",
    "--repair_inputs_only",
]


def test_runs_write_results_provenance_and_the_results_page_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_FIP_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "results"
    results = damage_repair_users.main(TINY + [f"--output_dir={output}"])
    eigen, repair = results["runs"]
    # The eigen adversary and the random directions have the same norm; the adversary is
    # measured on the network Damage returns.
    assert eigen["part"] == "eigen" and eigen["directions"] == 2
    assert eigen["eigen_drop"] == eigen["clean"] - eigen["eigen"]
    assert 0 < eigen["num_matvecs"] <= 100
    # Damage, Repair (labels and inputs only) and tuned retraining on the same examples.
    assert repair["model"] == "residual_convnet" and repair["train_examples"] == 200
    assert repair["fip_epochs"] <= 1.0 and repair["fip_beta"] in (1.0, 10.0)
    assert repair["fip_inputs_beta"] == 0.0
    # Retraining's rate: the best on the held-out split among those tried.
    tried = {k: v for k, v in repair.items() if k.startswith("retrain_validation/")}
    assert tried[f"retrain_validation/{repair['retrain_learning_rate']:g}"] == max(tried.values())
    assert repair["fip_minus_retrain"] == repair["fip"] - repair["retrain"]
    summary = results["summary"]["repair/residual_convnet"]
    assert summary["fip"]["per_seed"] == [repair["fip"]] and summary["fip"]["std"] == 0.0
    # The files: results, provenance, and the results page's table.
    written = json.loads((output / "results.json").read_text())
    assert written["runs"][1]["fip"] == repair["fip"]
    assert "command" in json.loads((output / "provenance.json").read_text())
    page = json.loads((output / "summary.json").read_text())
    table = page["tables"][0]
    assert len(table["rows"]) == 2 and table["headline"] == [0, 1]
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert table["rows"][1][3] == round(100 * repair["fip"], 2)
