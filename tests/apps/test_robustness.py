import json
import os

import pytest
from absl.testing import flagsaver

pytest.importorskip("art", reason="needs the `robustness` extra")

from apps import robustness  # noqa: E402
from keras_fip import data  # noqa: E402

EPOCHS, MEMBERS, ATTACK_STEPS = 4, 2, 2
TINY = dict(
    experiments=["digits/mlp"],
    seeds=["0"],
    epochs=EPOCHS,
    batch_size=64,
    learning_rate=3e-3,
    train_size=0,
    num_members=MEMBERS,
    train_epsilon=0.1,
    attack_steps=ATTACK_STEPS,
    epsilon_warmup=0.0,
    fip_steps=6,
    epsilons=["0.3", "0.1"],
    attack_examples=30,
    steps=3,
    square_queries=10,
    sanity_examples=20,
)


def test_robustness_app_evaluates_every_method_under_every_attack(tmp_path):
    output_dir = str(tmp_path / "robustness")
    with flagsaver.flagsaver(output_dir=output_dir, **TINY):
        robustness.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(output_dir, "evaluations.json")) as f:
        evaluations = json.load(f)
    n = len(data.load("digits", "train")[1])
    for method in robustness.METHODS:
        key = f"digits/{method}"
        assert 0.0 <= results[f"{key}/clean/accuracy/mean"] <= 1.0
        for epsilon in ("0.1", "0.3"):
            attacked = [
                results[f"{key}/{attack}/{epsilon}/mean"]
                for attack in ("pgd", "autoattack", "adaptive")
            ]
            # The worst case survives every white-box attack: at most each one's accuracy.
            assert results[f"{key}/worst_case/{epsilon}/mean"] <= min(attacked) + 1e-9
            assert 0.0 <= results[f"{key}/transfer/{epsilon}/mean"] <= 1.0
        assert isinstance(results[f"{key}/sanity/passed"], bool)
        # Every record holds its attacks' parameters and the sanity checks.
        record = evaluations["digits/seed_0"][method]
        autoattack = [r for r in record["results"] if r["attack"] == "autoattack"]
        assert [r["epsilon"] for r in autoattack] == [0.1, 0.3]
        assert autoattack[0]["steps"] == 3 and len(autoattack[0]["components"]) == 3
        assert record["sanity_checks"]["more_steps_do_not_help"]["steps"] == [1, 3]
        assert record["compute"]["train_examples"] == results[f"{key}/train_examples"]
    # The standard network falls under attack; the ensembles are attacked as one model.
    assert (
        results["digits/standard/autoattack/0.3/mean"]
        < results["digits/standard/clean/accuracy/mean"] - 0.2
    )
    assert evaluations["digits/seed_0"]["fip"]["num_members"] == MEMBERS
    assert evaluations["digits/seed_0"]["fip"]["results"][0]["target"] == "mean_probabilities"
    # Compute: example passes, every attack of training included.
    passes = results["digits/pgd_at_ensemble/train_examples"]
    assert results["digits/standard/train_examples"] == EPOCHS * n
    assert results["digits/deep/train_examples"] == MEMBERS * EPOCHS * n
    assert results["digits/pgd_at/train_examples"] == EPOCHS * n * (ATTACK_STEPS + 1)
    assert passes == MEMBERS * EPOCHS * n * (ATTACK_STEPS + 1)
    assert results["digits/fgsm_at/train_examples"] == 2 * EPOCHS * n
    # The TRS ensemble is given the PGD-AT ensemble's compute (to within an epoch).
    trs = results["digits/trs/train_examples"]
    assert abs(trs - passes) <= MEMBERS * n * 9 / 2
    assert results["digits/fip/train_examples"] > EPOCHS * n
    assert results["digits/fip/train_examples/fraction_of_pgd_at_ensemble"] == pytest.approx(
        results["digits/fip/train_examples"] / passes
    )
    with open(os.path.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    (table,) = summary["tables"]
    assert [row[0] for row in table["rows"]] == [
        robustness.METHOD_NAMES[m] for m in robustness.METHODS
    ]
    assert table["columns"][2:4] == ["AA 0.1", "AA 0.3"]
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    assert config["fip_steps"] == 6 and config["methods"] == list(robustness.METHODS)
    for name in ("robust_vs_epsilon.png", "robust_vs_compute.png", "provenance.json"):
        assert os.path.isfile(os.path.join(output_dir, name))


def test_robustness_app_rejects_unknown_choices(tmp_path):
    for arguments, name in (
        ({"methods": ["fip", "bagging"]}, "methods"),
        ({"experiments": ["mnist"]}, "experiments"),
        ({"experiments": ["cifar10/vgg11"]}, "experiments"),
        ({"attacks": ["pgd", "fab"]}, "attacks"),
        ({"epsilons": ["0.1", "-0.3"]}, "epsilons"),
        ({"epsilons": ["large"]}, "epsilons"),
    ):
        with flagsaver.flagsaver(output_dir=str(tmp_path), **arguments):
            with pytest.raises(ValueError, match=name):
                robustness.main([])
    assert not os.listdir(tmp_path)
