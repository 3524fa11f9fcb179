"""Tests for the adversarial-training baselines: PGD-AT, its deep ensemble, fast FGSM-AT."""

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.baselines import adversarial_training
from keras_fip.baselines import fgsm_adversarial_training
from keras_fip.baselines import pgd_adversarial_ensemble
from keras_fip.baselines import pgd_adversarial_training
from keras_fip.operations.ensemble_model import ensemble_members

EPSILON = 0.1


@pytest.fixture(scope="module")
def digits():
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    return x, y, x_test, y_test


def _architecture(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_fip.models.mlp(32, input_shape=(8, 8, 1))


def _pgd_accuracy(model, x, y):
    """White-box accuracy under an attack stronger than the training one (own code)."""
    correct = 0
    generator = keras.random.SeedGenerator(1)
    adversarial = adversarial_training.perturb(
        model, "logits", x, y, EPSILON, EPSILON / 4, 20, generator, (0.0, 1.0)
    )
    outputs = keras.ops.convert_to_numpy(model(adversarial, training=False))
    correct = np.sum(np.argmax(outputs, -1) == y)
    return correct / len(y)


def test_pgd_training_is_more_robust_than_standard_training_at_equal_epochs(digits):
    x, y, x_test, y_test = digits
    model = _architecture()
    standard = keras.models.clone_model(model)
    keras_fip.models.train_classifier(standard, x, y, epochs=12, batch_size=64, learning_rate=3e-3)
    robust, info = pgd_adversarial_training(
        model, x, y, epsilon=EPSILON, attack_steps=3, epochs=12, batch_size=64, learning_rate=3e-3
    )
    assert info["train_examples"] == 12 * len(x) * 4
    standard_robust = _pgd_accuracy(standard, x_test, y_test)
    adversarial_robust = _pgd_accuracy(robust, x_test, y_test)
    assert adversarial_robust > standard_robust + 0.1, (adversarial_robust, standard_robust)
    clean = keras_fip.models.evaluate_classifier(robust, x_test, y_test)["accuracy"]
    assert clean > 0.85


def test_compute_counts_every_pass_of_training_attacks_and_the_search(digits):
    x, y, _, _ = digits
    x, y = x[:300], y[:300]
    model = _architecture()
    weights = [w.copy() for w in model.get_weights()]
    _, info = fgsm_adversarial_training(model, x, y, epsilon=EPSILON, epochs=3, batch_size=64)
    assert info["train_examples"] == 3 * 300 * 2 and info["selection_examples"] == 0
    assert info["step_size"] == pytest.approx(1.25 * EPSILON)
    _, info = pgd_adversarial_training(
        model, x, y, epsilon=EPSILON, attack_steps=3, epochs=2, learning_rate=[1e-3, 3e-3]
    )
    fit_rows, held_rows = keras_fip.core.tuning.validation_rows(
        y, adversarial_training.VALIDATION_FRACTION, 0
    )
    tried = len(info["validation_robust_accuracy"])
    assert tried >= 2 and info["learning_rate"] in info["validation_robust_accuracy"]
    per_rate = 2 * len(fit_rows) * 4 + len(held_rows) * 4
    assert info["selection_examples"] == tried * per_rate
    assert info["train_examples"] == info["selection_examples"] + 2 * 300 * 4
    assert info["step_size"] == pytest.approx(2.5 * EPSILON / 3)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_an_epsilon_warmup_keeps_training_at_a_large_epsilon_from_collapsing(digits):
    x, y, x_test, y_test = digits
    accuracies = {}
    for warmup in (0.0, 0.5):
        network, info = pgd_adversarial_training(
            _architecture(),
            x,
            y,
            epsilon=0.3,
            attack_steps=3,
            epochs=8,
            batch_size=64,
            learning_rate=3e-3,
            epsilon_warmup=warmup,
        )
        assert info["train_examples"] == 8 * len(x) * 4
        assert info["epsilon_warmup"] == warmup
        accuracies[warmup] = keras_fip.models.evaluate_classifier(network, x_test, y_test)[
            "accuracy"
        ]
    assert accuracies[0.5] > 0.7 and accuracies[0.5] > accuracies[0.0] + 0.3, accuracies


def test_pgd_ensemble_members_differ_and_are_counted(digits):
    x, y, x_test, _ = digits
    x, y = x[:300], y[:300]
    model = _architecture()
    ensemble, info = pgd_adversarial_ensemble(
        model, x, y, num_members=2, epsilon=EPSILON, attack_steps=2, epochs=2
    )
    assert info["train_examples"] == 2 * 2 * 300 * 3 and info["num_members"] == 2
    members = ensemble_members(ensemble)
    assert len(members) == 2
    assert not np.allclose(members[0].get_weights()[0], members[1].get_weights()[0])
    probabilities = np.mean([keras.ops.softmax(m(x_test[:10])) for m in members], axis=0)
    np.testing.assert_allclose(ensemble(x_test[:10]), probabilities, atol=1e-6)


def test_the_same_seed_gives_the_same_network(digits):
    x, y, _, _ = digits
    x, y = x[:200], y[:200]
    first, _ = pgd_adversarial_training(_architecture(), x, y, attack_steps=2, epochs=1)
    second, _ = pgd_adversarial_training(_architecture(), x, y, attack_steps=2, epochs=1)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_softmax_model_trains_as_its_logits_twin(digits):
    x, y, _, _ = digits
    x, y = x[:200], y[:200]

    def linear(activation):
        return keras.Sequential(
            [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10, activation)]
        )

    softmax, _ = fgsm_adversarial_training(linear("softmax"), x, y, epsilon=EPSILON, epochs=2)
    logits, _ = fgsm_adversarial_training(linear(None), x, y, epsilon=EPSILON, epochs=2)
    assert keras_fip.core.outputs.output_kind(softmax) == "probabilities"
    for a, b in zip(softmax.get_weights(), logits.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert not np.allclose(softmax.get_weights()[0], linear(None).get_weights()[0])


def test_bad_arguments_raise_naming_them(digits):
    x, y, _, _ = digits
    model = _architecture()
    cases = [
        ({"epsilon": 0.0}, "epsilon"),
        ({"attack_steps": 0}, "attack_steps"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"step_size": -0.1}, "step_size"),
        ({"epsilon_warmup": 1.5}, "epsilon_warmup"),
    ]
    for arguments, name in cases:
        with pytest.raises(ValueError, match=f"`{name}`"):
            pgd_adversarial_training(model, x, y, **arguments)
    with pytest.raises(ValueError, match="`y`"):
        pgd_adversarial_training(model, x, y[:-1])
    with pytest.raises(ValueError, match="`x`"):
        fgsm_adversarial_training(model, [x], y)
    with pytest.raises(ValueError, match="`num_members`"):
        pgd_adversarial_ensemble(model, x, y, num_members=0)
    with pytest.raises(ValueError, match="`combine`"):
        pgd_adversarial_ensemble(model, x, y, combine="vote")
