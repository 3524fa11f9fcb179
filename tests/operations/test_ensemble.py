"""Tests for Ensemble: networks sampled along a FIP, served as one functional model."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.operations.ensemble import EnsembleCombination
from keras_fip.operations.ensemble import build_ensemble
from keras_fip.operations.ensemble import ensemble_combine
from tests.operations.contract import run_operation_contract
from tests.operations.contract import trained_model


@pytest.fixture(scope="module")
def digits():
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    keras.utils.set_random_seed(0)
    model = keras_fip.models.mlp(64, input_shape=(8, 8, 1))
    keras_fip.models.train_classifier(model, x, y, epochs=15, batch_size=64, learning_rate=3e-3)
    return model, x, y, x_test, y_test


def _flat(model):
    return np.concatenate([np.ravel(w) for w in model.get_weights()])


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _contract_operation(model, x, y):
    return keras_fip.Ensemble(
        2, data=x, steps_between=3, batch_size=64, cg_iterations=3, seed=0, verbose=0
    )


def test_ensemble_meets_the_operation_contract():
    # The result is an ensemble: the contract reads the masked hidden layer in each member.
    # The plain functional conv net runs in the large test (the BatchNorm residual net is
    # functional too).
    run_operation_contract(
        _contract_operation,
        models=("sequential", "batchnorm_residual"),
        members=keras_fip.ensemble_members,
    )


@pytest.mark.large
def test_ensemble_meets_the_operation_contract_on_every_model():
    run_operation_contract(_contract_operation, members=keras_fip.ensemble_members)


def test_members_are_distinct_accurate_and_combined_exactly(digits):
    model, x, y, x_test, y_test = digits
    # The metric walk with the task term (labelled data select the penalty walk by default).
    op = keras_fip.Ensemble(
        3,
        data=(x, y),
        steps_between=20,
        batch_size=128,
        seed=0,
        step_rule="metric",
        push="random",
        diversity=0.0,
        verbose=0,
    )
    ensemble = op(model)
    members = keras_fip.ensemble_members(ensemble)
    assert [m.name for m in members] == ["member_0", "member_1", "member_2"]
    assert op.history["member_steps"] == [20, 40, 60]
    base = keras_fip.models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    start = _flat(model)
    distances = [np.linalg.norm(_flat(m) - start) for m in members]
    # ε = 0.05 per step: the k-th member is about 20·k·ε from the start, farther each time.
    assert distances == sorted(distances)
    assert distances[0] > 0.8
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.linalg.norm(_flat(members[i]) - _flat(members[j])) > 0.5
    for member in members:
        accuracy = keras_fip.models.evaluate_classifier(member, x_test, y_test)["accuracy"]
        assert accuracy > base - 0.05
    # The output is the mean of the members' softmax (probabilities: rows sum to 1).
    outputs = np.asarray(ensemble(x_test, training=False))
    expected = np.mean([_softmax(np.asarray(m(x_test))) for m in members], axis=0)
    np.testing.assert_allclose(outputs, expected, atol=1e-6)
    np.testing.assert_allclose(outputs.sum(-1), 1.0, atol=1e-5)
    assert np.mean(outputs.argmax(-1) == y_test) > base - 0.03
    # Compute in example passes: the reference outputs, then per step the anchor batch
    # (D and one JᵀJv per CG iteration) and the labelled batch of the task term.
    assert op.history["walk_examples"] == 60 * 128 * 2
    assert op.history["train_examples"] == len(x) + 60 * 128 * (1 + op.cg_iterations + 1)


def test_include_start_mean_logits_and_single_member(digits):
    model, x, _, x_test, _ = digits
    ensemble = keras_fip.Ensemble(
        2, data=x, steps_between=5, include_start=True, combine="mean_logits", seed=0, verbose=0
    )(model)
    first, second = keras_fip.ensemble_members(ensemble)
    np.testing.assert_array_equal(_flat(first), _flat(model))
    assert not np.array_equal(_flat(second), _flat(model))
    assert ensemble_combine(ensemble) == "mean_logits"
    expected = (np.asarray(first(x_test)) + np.asarray(second(x_test))) / 2
    np.testing.assert_allclose(np.asarray(ensemble(x_test)), expected, atol=1e-5)
    single = keras_fip.Ensemble(1, data=x, steps_between=3, seed=0, verbose=0)(model)
    (member,) = keras_fip.ensemble_members(single)
    np.testing.assert_allclose(
        np.asarray(single(x_test)), _softmax(np.asarray(member(x_test))), atol=1e-6
    )


def test_defaults_are_the_measured_walk_with_labels_and_the_papers_without(digits):
    model, x, y, _, _ = digits
    x, y = x[:512], y[:512]
    settings = dict(steps_between=4, batch_size=64, diversity_examples=128, seed=0, verbose=0)
    auto = keras_fip.Ensemble(2, data=(x, y), **settings)
    assert (auto.diversity, auto.push, auto.step_rule) == ("auto", "auto", "auto")
    measured = keras_fip.Ensemble(
        2, data=(x, y), step_rule="penalty", push="none", diversity=1.0, **settings
    )
    first, second = auto(model), measured(model)
    assert (auto.history["step_rule"], auto.history["push"], auto.history["diversity"]) == (
        "penalty",
        "none",
        1.0,
    )
    for a, b in zip(keras_fip.ensemble_members(first), keras_fip.ensemble_members(second)):
        np.testing.assert_allclose(_flat(a), _flat(b), atol=1e-5)
    assert auto.history["train_examples"] == measured.history["train_examples"]
    # Inputs only: the paper's walk (the metric rule driven by a random push, L = 0).
    paper = keras_fip.Ensemble(2, data=x, **settings)
    paper(model)
    assert (paper.history["step_rule"], paper.history["push"], paper.history["diversity"]) == (
        "metric",
        "random",
        0.0,
    )
    assert paper.history["train_examples"] == len(x) + 8 * 64 * (1 + paper.cg_iterations)
    # Labels without diversity: the metric walk with the task term.
    assert keras_fip.Ensemble(2, diversity=0.0).resolve_defaults(labelled=True) == (
        0.0,
        "random",
        "metric",
    )


def test_members_taken_at_a_metric_distance(digits):
    model, x, _, _, _ = digits
    op = keras_fip.Ensemble(
        3, data=x, steps_between=100, metric_distance=0.3, epsilon=0.05, seed=0, verbose=0
    )
    op(model)
    steps = op.history["member_steps"]
    assert len(steps) == 3 and steps == sorted(steps) and steps[-1] < 300
    lengths = np.asarray(op.history["metric_length"])
    boundaries = [0.0] + [lengths[s - 1] for s in steps]
    # Each segment stopped on the first step that covered the distance.
    for start, end, step in zip(boundaries[:-1], boundaries[1:], steps):
        assert end - start >= 0.3
        assert lengths[step - 2] - start < 0.3


def _fgsm_accuracy(source, target, x, y, epsilon=0.3):
    """Accuracy of `target` (an ensemble) on FGSM inputs crafted against `source`."""
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = keras.losses.sparse_categorical_crossentropy(y, source(inputs), from_logits=True)
    attacked = np.clip(x + epsilon * np.sign(tape.gradient(loss, inputs).numpy()), 0, 1)
    return float(np.mean(np.asarray(target(attacked.astype("float32"))).argmax(-1) == y))


@pytest.mark.parametrize(
    "adversary", ["members", pytest.param("ensemble", marks=pytest.mark.large)]
)
def test_error_diversity_resists_transferred_attacks_and_keeps_clean_accuracy(digits, adversary):
    model, x, y, x_test, y_test = digits
    # A surrogate trained separately: its FGSM inputs transfer to networks like `model`.
    keras.utils.set_random_seed(7)
    surrogate = keras_fip.models.mlp(64, input_shape=(8, 8, 1))
    keras_fip.models.train_classifier(surrogate, x, y, epochs=15, batch_size=64, learning_rate=3e-3)
    settings = dict(
        data=(x, y),
        steps_between=60,
        step_rule="penalty",
        learning_rate=3e-3,
        push="none",
        perturbation_epsilon=0.2,
        diversity_examples=256,
        batch_size=64,
        seed=0,
        verbose=0,
    )
    plain = keras_fip.Ensemble(3, diversity=0.0, **settings)(model)
    op = keras_fip.Ensemble(3, diversity=3.0, adversary=adversary, **settings)
    diverse = op(model)
    # Measured: single 11.4%, plain walk 10.8%, error diversity 26.9% (members) and
    # 28.3% (ensemble) on FGSM ε = 0.2 transferred from the surrogate.
    assert (
        _fgsm_accuracy(surrogate, diverse, x_test, y_test, 0.2)
        > _fgsm_accuracy(surrogate, plain, x_test, y_test, 0.2) + 0.1
    )
    base = keras_fip.models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert np.mean(np.asarray(diverse(x_test)).argmax(-1) == y_test) > base - 0.02
    # Compute: reference outputs; per step anchor (D), task and diversity batches (and the
    # per-step attack); per member the attack on the members so far (the start, 1, 2).
    per_step = 3 + (adversary == "ensemble")
    assert op.history["train_examples"] == (len(x) + 180 * 64 * per_step + 256 * (1 + 1 + 2))


def test_agreement_diversity_pushes_members_apart_on_perturbed_inputs(digits):
    model, x, y, x_test, y_test = digits

    def disagreement(ensemble):
        members = keras_fip.ensemble_members(ensemble)
        rng = np.random.default_rng(1)
        noisy = np.clip(x_test + 0.3 * np.sign(rng.standard_normal(x_test.shape)), 0, 1)
        noisy = noisy.astype("float32")
        probabilities = [_softmax(np.asarray(m(noisy))) for m in members]
        mean = np.mean(probabilities, axis=0)
        return float(np.mean([np.abs(p - mean).sum(-1).mean() for p in probabilities]))

    settings = dict(
        data=x,
        steps_between=25,
        perturbation_epsilon=0.3,
        diversity_examples=512,
        seed=0,
        verbose=0,
    )
    plain = keras_fip.Ensemble(3, **settings)(model)
    diverse_op = keras_fip.Ensemble(3, diversity=3.0, diversity_loss="agreement", **settings)
    diverse = diverse_op(model)
    assert disagreement(diverse) > 1.5 * disagreement(plain)
    # The FIP still keeps the clean function.
    base = keras_fip.models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert np.mean(np.asarray(diverse(x_test)).argmax(-1) == y_test) > base - 0.05
    # Unlabelled: the attacks use the predictions (one forward pass per member so far),
    # the agreement targets another.
    assert diverse_op.history["train_examples"] == (
        len(x) + 75 * 128 * (1 + diverse_op.cg_iterations + 1) + 512 * 3 * (1 + 1 + 2)
    )


def test_batchnorm_members_get_recalibrated_statistics():
    model = trained_model("batchnorm_residual")
    x, _ = keras_fip.data.load("digits")
    x = x[:400]
    ensemble = keras_fip.Ensemble(
        2, data=x, steps_between=5, batch_size=64, cg_iterations=3, seed=0, verbose=0
    )(model)
    for member in keras_fip.ensemble_members(ensemble):
        twin = keras_fip.engine.copy_model(member)
        keras_fip.engine.recalibrate_batch_normalization(twin, x, 128)
        for layer, reference in zip(member.layers, twin.layers):
            if isinstance(layer, keras.layers.BatchNormalization):
                np.testing.assert_allclose(
                    layer.moving_mean.numpy(), reference.moving_mean.numpy(), atol=1e-6
                )
                np.testing.assert_allclose(
                    layer.moving_variance.numpy(), reference.moving_variance.numpy(), atol=1e-6
                )


def test_members_survive_keras_round_trip(digits, tmp_path):
    model, x, _, x_test, _ = digits
    ensemble = keras_fip.Ensemble(3, data=x, steps_between=3, seed=0, verbose=0)(model)
    path = os.path.join(tmp_path, "ensemble.keras")
    ensemble.save(path)
    loaded = keras.saving.load_model(path)
    for before, after in zip(
        keras_fip.ensemble_members(ensemble), keras_fip.ensemble_members(loaded)
    ):
        assert before.name == after.name
        np.testing.assert_allclose(np.asarray(after(x_test)), np.asarray(before(x_test)), atol=1e-6)
    assert len(keras_fip.ensemble_members(keras_fip.engine.copy_model(loaded))) == 3


def test_log_mean_probabilities_combination_is_stable():
    logits = [np.array([[0.0, -200.0]], "float32"), np.array([[-200.0, 0.0]], "float32")]
    log_mean = np.asarray(EnsembleCombination("log_mean_probabilities")(logits))
    np.testing.assert_allclose(log_mean, np.log([[0.5, 0.5]]), atol=1e-5)
    mean = np.asarray(EnsembleCombination()(logits))
    np.testing.assert_allclose(mean, [[0.5, 0.5]], atol=1e-6)


def test_ensemble_members_rejects_plain_models():
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not a keras_fip ensemble"):
        keras_fip.ensemble_members(plain)
    with pytest.raises(ValueError, match="members"):
        build_ensemble([])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_members=0), "num_members"),
        (dict(num_members=2.5), "num_members"),
        (dict(num_members=2, combine="vote"), "combine"),
        (dict(num_members=2, steps_between=0), "steps_between"),
        (dict(num_members=2, diversity=-1.0), "diversity"),
        (dict(num_members=2, training="yes"), "training"),
        (dict(num_members=2, metric_distance=-1.0), "metric_distance"),
        (dict(num_members=2, task_weight=-1.0), "task_weight"),
        (dict(num_members=2, diversity_loss="kl"), "diversity_loss"),
        (dict(num_members=2, adversary="surrogate"), "adversary"),
        (dict(num_members=2, adversary="ensemble", diversity_loss="agreement"), "adversary"),
        (dict(num_members=2, perturbation_steps=0), "perturbation_steps"),
        (dict(num_members=2, push="none", diversity=0.0, task_weight=0.0), "push"),
        (dict(num_members=2, push="sideways"), "push"),
        (dict(num_members=2, step_rule="adam"), "step_rule"),
        (dict(num_members=2, diversity="lots"), "diversity"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_fip.Ensemble(**kwargs)


def test_data_that_do_not_fit_raise(digits):
    model, _, _, _, _ = digits
    with pytest.raises(ValueError, match="data"):
        keras_fip.Ensemble(2, data=np.zeros((16, 5, 5, 1), "float32"), verbose=0)(model)
    with pytest.raises(ValueError, match="data"):
        keras_fip.Ensemble(2, verbose=0)(model)
    with pytest.raises(ValueError, match="labelled"):
        keras_fip.Ensemble(2, data=np.zeros((16, 8, 8, 1), "float32"), push="none", verbose=0)(
            model
        )


def test_config_round_trip():
    op = keras_fip.Ensemble(
        5,
        steps_between=7,
        diversity=0.5,
        combine="mean_logits",
        task_weight=0.5,
        diversity_loss="agreement",
        adversary="members",
        perturbation_steps=3,
        seed=3,
    )
    twin = keras_fip.Ensemble.from_config(op.get_config())
    assert twin.get_config() == op.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
    assert restored.get_config() == op.get_config()
    defaults = keras_fip.Ensemble(2)
    assert keras_fip.Ensemble.from_config(defaults.get_config()).get_config() == (
        defaults.get_config()
    )


def test_diversity_needs_floating_point_inputs():
    # Token ids cannot be attacked: "auto" walks without the diversity term, an explicit
    # diversity is refused before any work.
    tokens = np.random.default_rng(0).integers(1, 20, (64, 6)).astype("int32")
    labels = tokens[:, 0] % 2
    model = keras_fip.models.transformer_classifier(
        vocab_size=20, sequence_length=6, embed_dim=8, num_heads=1, feed_forward_dim=8, num_layers=1
    )
    op = keras_fip.Ensemble(
        2, data=(tokens, labels), steps_between=2, batch_size=16, seed=0, verbose=0
    )
    assert op.resolve_defaults(labelled=True, continuous=False) == (0.0, "random", "metric")
    assert len(keras_fip.ensemble_members(op(model))) == 2
    with pytest.raises(ValueError, match="`diversity`.*int32"):
        keras_fip.Ensemble(2, data=(tokens, labels), diversity=1.0, verbose=0)(model)
