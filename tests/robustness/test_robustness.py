"""Tests for keras_fip.robustness: ART PGD (transfer, white-box) and the diagnostics."""

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import robustness
from keras_fip.operations.ensemble import build_ensemble

pytest.importorskip("art", reason="needs the `robustness` extra")


@pytest.fixture(scope="module")
def networks(digit_networks):
    models, x, y = digit_networks
    return models, x[:120], y[:120]


def test_whitebox_pgd_stays_in_the_ball_and_breaks_a_single_network(networks):
    (model, _, _), x, y = networks
    clean = robustness.accuracy(model, x, y)
    accuracy, adversarial = robustness.whitebox_pgd_accuracy(
        model, x, y, epsilon=0.2, step=0.02, iterations=20, restarts=1
    )
    assert np.max(np.abs(adversarial - x)) <= 0.2 + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert clean > 0.9
    assert accuracy < clean - 0.4
    # A weaker attack hurts less: the attack really follows its settings.
    weak, _ = robustness.whitebox_pgd_accuracy(
        model, x, y, epsilon=0.02, step=0.01, iterations=5, restarts=0
    )
    assert weak > accuracy


def test_transfer_pgd_hurts_the_target_less_than_the_surrogate(networks):
    (surrogate, target, other), x, y = networks
    accuracies, adversarial = robustness.transfer_pgd_accuracy(
        surrogate,
        {
            "target": target,
            "ensemble": build_ensemble(
                [keras_fip.engine.copy_model(target), keras_fip.engine.copy_model(other)]
            ),
        },
        x,
        y,
        epsilon=0.2,
        step=0.02,
        iterations=20,
        restarts=0,
    )
    assert set(accuracies) == {"target", "ensemble", "surrogate"}
    assert accuracies["surrogate"] < accuracies["target"]
    assert accuracies["target"] < robustness.accuracy(target, x, y)
    assert adversarial.shape == x.shape


def test_ensemble_logit_model_is_the_log_of_the_mean_probability(networks):
    models, x, _ = networks
    ensemble = build_ensemble([keras_fip.engine.copy_model(m) for m in models])
    log_mean = np.asarray(robustness.logit_model(ensemble)(x))
    np.testing.assert_allclose(np.exp(log_mean), np.asarray(ensemble(x)), atol=1e-5)
    plain = models[0]
    assert robustness.logit_model(plain) is plain
    classifier = robustness.art_classifier(ensemble, 10)
    np.testing.assert_allclose(classifier.predict(x), log_mean, atol=1e-5)


def test_whitebox_pgd_differentiates_the_whole_ensemble(networks):
    models, x, y = networks
    ensemble = build_ensemble([keras_fip.engine.copy_model(m) for m in models])
    accuracy, _ = robustness.whitebox_pgd_accuracy(
        ensemble, x, y, epsilon=0.2, step=0.02, iterations=20, restarts=0
    )
    assert accuracy < robustness.accuracy(ensemble, x, y) - 0.4


def test_bad_attack_settings_raise(networks):
    (model, _, _), x, y = networks
    with pytest.raises(ValueError, match="epsilon"):
        robustness.pgd(model, x, y, epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        robustness.pgd(model, x, y, iterations=0)
    with pytest.raises(ValueError, match="restarts"):
        robustness.pgd(model, x, y, restarts=-1)


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert robustness.linear_cka(features, 3.0 * features @ rotation + 1.0) == pytest.approx(1.0)
    unrelated = rng.normal(size=(200, 6))
    assert robustness.linear_cka(features, unrelated) < 0.15
    # The n×n route (more features than examples) gives the same value.
    wide_x, wide_y = rng.normal(size=(20, 50)), rng.normal(size=(20, 50))
    wide_y[:, :5] += 2 * wide_x[:, :5]
    xc, yc = wide_x - wide_x.mean(0), wide_y - wide_y.mean(0)
    direct = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert robustness.linear_cka(wide_x, wide_y) == pytest.approx(direct)


def test_weight_distances_coherence_and_layer_cka(networks):
    models, x, y = networks
    twin = keras_fip.engine.copy_model(models[0])
    distances = robustness.weight_distances([models[0], twin, models[1]])
    matrix = distances["matrix"]
    assert matrix[0, 1] == 0.0 and matrix[0, 2] == matrix[2, 0] > 1.0
    flat = [np.concatenate([np.ravel(w) for w in m.get_weights()]) for m in (models[0], models[1])]
    assert matrix[0, 2] == pytest.approx(np.linalg.norm(flat[0] - flat[1]), rel=1e-6)
    assert robustness.gradient_coherence(models[0], twin, x, y) == pytest.approx(1.0, abs=1e-5)
    assert robustness.gradient_coherence(models[0], models[1], x, y) < 0.95
    same = robustness.layer_cka([models[0], twin], x)
    assert list(same) == [layer.name for layer in models[0].layers if layer.trainable_weights]
    assert all(value == pytest.approx(1.0) for value in same.values())
    different = robustness.layer_cka(models, x)
    assert all(value < 1.0 for value in different.values())
    coordinates, explained = robustness.weight_pca({"a": models[:2], "b": [models[2], twin]})
    assert coordinates["a"].shape == (2, 2) and coordinates["b"].shape == (2, 2)
    np.testing.assert_allclose(coordinates["a"][0], coordinates["b"][1], atol=1e-6)
    assert 0 < explained[1] <= explained[0] <= 1


def _softmax_twin(model):
    """The same network ending in a softmax (shared weights): it returns probabilities."""
    twin = keras.Sequential([keras.Input((8, 8, 1)), model, keras.layers.Softmax()])
    assert keras_fip.core.outputs.output_kind(twin) == "probabilities"
    return twin


def test_softmax_models_and_ensembles_are_attacked_through_their_log_probabilities(networks):
    models, x, y = networks
    twins = [_softmax_twin(keras_fip.engine.copy_model(m)) for m in models]
    # A single softmax model: its logits are log p, which any from_logits loss reads as
    # the logits model's.
    np.testing.assert_allclose(
        np.exp(np.asarray(robustness.logit_model(twins[0])(x))),
        np.asarray(twins[0](x)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        robustness.input_gradients(twins[0], x, y),
        robustness.input_gradients(models[0], x, y),
        atol=1e-5,
    )
    assert robustness.gradient_coherence(twins[0], models[0], x, y) == pytest.approx(1.0, abs=1e-5)
    # Ensembles: probabilities averaged as probabilities, the same distribution as the
    # ensemble of the logits models, and the same attack.
    softmax_ensemble = build_ensemble(twins)
    logits_ensemble = build_ensemble([keras_fip.engine.copy_model(m) for m in models])
    np.testing.assert_allclose(
        np.asarray(softmax_ensemble(x)), np.asarray(logits_ensemble(x)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(robustness.logit_model(softmax_ensemble)(x)),
        np.asarray(robustness.logit_model(logits_ensemble)(x)),
        atol=1e-4,
    )
    attack = dict(epsilon=0.2, step=0.02, iterations=5, restarts=0)
    accuracy, adversarial = robustness.whitebox_pgd_accuracy(softmax_ensemble, x, y, **attack)
    expected_accuracy, expected = robustness.whitebox_pgd_accuracy(logits_ensemble, x, y, **attack)
    # The same steps (a sign of a gradient that is zero up to rounding may differ).
    assert np.mean(np.abs(adversarial - expected) > 1e-5) < 0.01
    assert accuracy == pytest.approx(expected_accuracy, abs=1 / len(y))
