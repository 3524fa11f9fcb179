from benchmarks import ensemble_users


def _row(seed, base, fip, members, passes):
    return {
        "model": "mnist_convnet",
        "seed": seed,
        "data": "labelled",
        "num_members": len(members),
        "base": {"accuracy": base, "nll": 0.03},
        "fip": {"accuracy": fip, "nll": 0.02, "member_accuracy": members, "train_examples": passes},
        "deep": {"accuracy": 0.99, "nll": 0.01, "member_accuracy": members, "train_examples": 9},
        "checks": {"accuracy_ge_base": fip >= base},
    }


def test_results_summary_gives_the_mean_and_spread_over_seeds_and_the_checks():
    rows = [_row(0, 0.98, 0.99, [0.97, 0.985], 10), _row(1, 0.98, 0.97, [0.95, 0.96], 30)]
    summary = ensemble_users.results_summary(rows)
    (table,) = summary["tables"]
    assert [row[0] for row in table["rows"]] == [
        "the trained network",
        "mnist_convnet: Ensemble (defaults)",
        "deep ensemble",
    ]
    fip = table["rows"][1]
    # Mean ± std over the seeds, in %; the worst member of each seed; the mean passes.
    assert fip[1] == "98.00 ± 1.00"
    assert fip[3] == "96.00 ± 1.00"
    assert fip[4] == 20
    assert table["headline"] == [1]
    assert "'accuracy_ge_base': '1/2'" in table["caption"]
    assert summary["description"].endswith("seeds [0, 1].")
