"""Tests for keras_fip.robustness.evaluate and sanity_checks (ART, digits, tiny networks)."""

import json

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import robustness
from keras_fip.operations.ensemble import build_ensemble

pytest.importorskip("art", reason="needs the `robustness` extra")

SETTING_KEYS = {
    "attack",
    "norm",
    "epsilon",
    "eps_step",
    "steps",
    "restarts",
    "loss",
    "target",
    "art_version",
    "robust_accuracy",
    "max_perturbation",
}


@pytest.fixture(scope="module")
def networks(digit_networks):
    models, x, y = digit_networks
    return models, x[:100], y[:100]


def _softmax_twin(model):
    return keras.Sequential([keras.Input((8, 8, 1)), model, keras.layers.Softmax()])


def test_evaluate_records_every_parameter_and_takes_the_worst_case(networks):
    (first, second, surrogate), x, y = networks
    # One member returns logits, the other probabilities: averaged as probabilities.
    ensemble = build_ensemble(
        [keras_fip.engine.copy_model(first), _softmax_twin(keras_fip.engine.copy_model(second))],
        outputs="logits",
    )
    weights = [w.copy() for w in ensemble.get_weights()]
    record = robustness.evaluate(
        ensemble,
        x,
        y,
        epsilons=[0.05, 0.15],
        attacks=list(robustness.evaluation.ATTACKS),
        surrogate=surrogate,
        steps=10,
        square_queries=50,
    )
    json.dumps(record)
    assert record["num_members"] == 2 and record["num_examples"] == len(x)
    assert record["clean_accuracy"] == robustness.accuracy(ensemble, x, y)
    results = record["results"]
    assert [r["attack"] for r in results] == 2 * list(robustness.evaluation.ATTACKS)
    for result in results:
        assert SETTING_KEYS <= set(result)
        assert result["max_perturbation"] <= result["epsilon"] + 1e-6
        assert result["robust_accuracy"] <= record["clean_accuracy"]
    pgd = [r for r in results if r["attack"] == "pgd"]
    assert pgd[0]["eps_step"] == pytest.approx(2.5 * 0.05 / 10)
    assert pgd[1]["robust_accuracy"] < pgd[0]["robust_accuracy"]
    for worst in record["worst_case"]:
        at = [r for r in results if r["epsilon"] == worst["epsilon"]]
        assert "transfer" not in worst["attacks"]
        assert worst["robust_accuracy"] <= min(
            r["robust_accuracy"] for r in at if r["attack"] != "transfer"
        )
    for result in results:
        if result["attack"] == "adaptive":
            # Robust only if every component left the example correct.
            assert [c["target"] for c in result["components"]] == [
                "decision",
                "members_mean_log_probabilities",
            ]
            assert result["robust_accuracy"] <= min(
                c["robust_accuracy"] for c in result["components"]
            )
        if result["attack"] == "autoattack":
            assert [c["attack"] for c in result["components"]] == ["apgd-ce", "apgd-dlr", "square"]
        if result["attack"] == "transfer":
            assert result["surrogate_accuracy"] < result["robust_accuracy"] + 0.2
    for before, after in zip(weights, ensemble.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_the_whole_ensemble_is_attacked_through_its_mean_probabilities(networks):
    models, x, _ = networks
    members = [keras_fip.engine.copy_model(m) for m in models]
    expected = np.mean([keras.ops.softmax(m(x)) for m in members], axis=0)
    for combine in ("mean_probabilities", "mean_logits"):
        ensemble = build_ensemble(
            [keras_fip.engine.copy_model(m) for m in members], combine=combine
        )
        logits = robustness.mean_probability_logits(ensemble)(x)
        np.testing.assert_allclose(keras.ops.softmax(logits), expected, atol=1e-5)
    twins = build_ensemble([_softmax_twin(keras_fip.engine.copy_model(m)) for m in members])
    logits = robustness.mean_probability_logits(twins)(x)
    np.testing.assert_allclose(keras.ops.softmax(logits), expected, atol=1e-5)


def test_margin_loss_is_positive_exactly_where_the_decision_is_wrong():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 4)).astype("float32")
    labels = rng.integers(0, 4, 50)
    one_hot = np.eye(4, dtype="float32")[labels]
    per_example = [
        float(robustness.margin_loss(one_hot[i : i + 1], scores[i : i + 1])) for i in range(50)
    ]
    np.testing.assert_array_equal(np.array(per_example) > 0, np.argmax(scores, -1) != labels)
    assert float(robustness.margin_loss(one_hot, scores)) == pytest.approx(
        sum(per_example), rel=1e-5
    )


def test_sanity_checks_pass_for_a_trained_ensemble(networks):
    models, x, y = networks
    ensemble = build_ensemble([keras_fip.engine.copy_model(m) for m in models[:2]])
    checks = robustness.sanity_checks(
        ensemble, x, y, epsilons=[0.05, 0.1, 0.2], steps=(5, 20), square_queries=200
    )
    json.dumps(checks)
    assert checks["passed"], checks
    by_epsilon = checks["accuracy_does_not_rise_with_epsilon"]["accuracies"]
    assert by_epsilon[-1] < by_epsilon[0]
    assert checks["near_zero_at_large_epsilon"]["accuracy"] <= 0.05


class _MaskedInput(keras.layers.Layer):
    """Quantises the inputs with a zero gradient: PGD sees no direction, queries still work."""

    def call(self, inputs):
        return keras.ops.stop_gradient(keras.ops.round(inputs * 4) / 4) + 0.0 * inputs


def test_the_gradient_free_check_catches_masked_gradients(networks):
    (model, _, _), x, y = networks
    masked = keras.Sequential(
        [keras.Input((8, 8, 1)), _MaskedInput(), keras_fip.engine.copy_model(model)]
    )
    assert robustness.accuracy(masked, x, y) > 0.8
    checks = robustness.sanity_checks(
        masked, x, y, epsilons=[0.1, 0.3], steps=(5, 10), square_queries=200
    )
    check = checks["gradient_free_not_stronger"]
    assert not check["passed"] and not checks["passed"]
    assert check["square_accuracy"] < check["gradient_accuracy"] - 0.2


def test_bad_arguments_raise(networks):
    (model, _, _), x, y = networks
    with pytest.raises(ValueError, match="surrogate"):
        robustness.evaluate(model, x, y, attacks=["transfer"])
    with pytest.raises(ValueError, match="attacks"):
        robustness.evaluate(model, x, y, attacks=["fgsm"])
    with pytest.raises(ValueError, match="epsilons"):
        robustness.evaluate(model, x, y, epsilons=[0.1, -0.1])
    with pytest.raises(ValueError, match="steps"):
        robustness.evaluate(model, x, y, steps=0)
    with pytest.raises(ValueError, match="`x` and `y`"):
        robustness.evaluate(model, x, y[:-1])
    with pytest.raises(ValueError, match="epsilons"):
        robustness.sanity_checks(model, x, y, epsilons=[0.3, 0.1])
