"""Tests for Ensemble: networks sampled along a FIP, served as one functional model."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.core import tuning
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.rules import Metric
from keras_fip.engine.rules import Penalty
from keras_fip.operations.ensemble import LABEL_WEIGHTS
from keras_fip.operations.ensemble import Diversity
from keras_fip.operations.ensemble_model import EnsembleCombination
from keras_fip.operations.ensemble_model import build_ensemble
from keras_fip.operations.ensemble_model import ensemble_combine
from keras_fip.operations.ensemble_model import member_output_kind
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


def _walk(steps, **kwargs):
    return keras_fip.Walk(steps=steps, **{"seed": 0, "verbose": 0, **kwargs})


def _contract_operation(model, x, y):
    return keras_fip.Ensemble(2, data=x, walk=_walk(6, batch_size=64))


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
    # The paper's metric walk, with the labels' term at a given weight (no selection).
    op = keras_fip.Ensemble(
        3,
        data=(x, y),
        labels=1.0,
        diversity=Diversity(weight=0.0),
        push="random",
        walk=_walk(60, batch_size=128, rule=Metric(epsilon=0.05), distance="l2"),
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
    # (D and one JᵀJv per CG iteration) and the labelled batch.
    assert op.history["walk_examples"] == 60 * 128 * 2
    assert op.history["train_examples"] == len(x) + 60 * 128 * (1 + 10 + 1)


def test_the_budget_is_shared_evenly_between_members(digits):
    model, x, _, _, _ = digits
    op = keras_fip.Ensemble(3, data=x, walk=_walk(10, batch_size=64))
    op(model)
    assert op.history["member_steps"] == [3, 7, 10]
    # Without a budget: MEMBER_STEPS steps per member the walk takes; epochs are passes
    # over `data`.
    default = keras_fip.Ensemble(3, include_start=True)
    assert default.resolved_walk().steps == 2 * keras_fip.operations.ensemble.MEMBER_STEPS
    walk = keras_fip.Walk(epochs=1, batch_size=64, seed=0, verbose=0)
    op = keras_fip.Ensemble(2, data=x[:256], walk=walk)
    op(model)
    assert op.history["member_steps"] == [2, 4]


def test_include_start_mean_logits_and_single_member(digits):
    model, x, _, x_test, _ = digits
    ensemble = keras_fip.Ensemble(
        2, data=x, include_start=True, combine="mean_logits", walk=_walk(5)
    )(model)
    first, second = keras_fip.ensemble_members(ensemble)
    np.testing.assert_array_equal(_flat(first), _flat(model))
    assert not np.array_equal(_flat(second), _flat(model))
    assert ensemble_combine(ensemble) == "mean_logits"
    expected = (np.asarray(first(x_test)) + np.asarray(second(x_test))) / 2
    np.testing.assert_allclose(np.asarray(ensemble(x_test)), expected, atol=1e-5)
    single = keras_fip.Ensemble(1, data=x, walk=_walk(3))(model)
    (member,) = keras_fip.ensemble_members(single)
    np.testing.assert_allclose(
        np.asarray(single(x_test)), _softmax(np.asarray(member(x_test))), atol=1e-6
    )
    # The start alone: no walk.
    start_only = keras_fip.Ensemble(1, data=x, include_start=True, walk=_walk(3))
    (member,) = keras_fip.ensemble_members(start_only(model))
    np.testing.assert_array_equal(_flat(member), _flat(model))
    assert start_only.history["member_steps"] == [0]


def test_defaults_choose_the_labels_weight_on_a_held_out_split(digits):
    model, x, y, _, _ = digits
    x, y = x[:700], y[:700]
    walk = _walk(8, batch_size=64)
    auto = keras_fip.Ensemble(2, data=(x, y), diversity=Diversity(examples=128), walk=walk)
    assert (auto.labels, auto.push, auto.diversity.weight) == ("auto", "auto", "auto")
    first = auto(model)
    history = auto.history
    assert (history["push"], history["diversity"]) == ("none", 1.0)
    # The measured walk: the squared distance of the logits, β = 1, the Penalty rule's
    # "auto" learning rate.
    assert auto.resolved_walk().distance == "l2"
    assert history["beta"] == 1.0
    assert history["learning_rate"] == pytest.approx(
        keras_fip.rules.auto_learning_rate(model.trainable_variables)
    )
    # ρ: 0.3 of the range of the inputs (digits in [0, 1]).
    assert history["radius"] == pytest.approx(0.3 * (x.max() - x.min()))
    # τ: the weight whose member has the lowest cross-entropy on the held-out fifth.
    selection = history["labels_selection"]
    held = len(tuning.validation_rows(y, 0.2, 0)[1])
    assert selection["validation_examples"] == held
    losses = selection["validation_cross_entropy"]
    assert list(losses) == list(LABEL_WEIGHTS)
    assert history["labels"] == min(losses, key=lambda weight: (losses[weight], weight))
    # The walk on all of `data` is the walk at the chosen weight. The choice's passes are
    # counted on top: one-member walks on 256 of the other examples (what 4 steps of 64
    # read), each with its reference outputs, 4 steps of anchor, labelled and diversity
    # batches and the attack on the start, and the held-out evaluations.
    chosen = keras_fip.Ensemble(
        2,
        data=(x, y),
        labels=history["labels"],
        diversity=Diversity(examples=128, radius=0.3),
        walk=walk,
    )
    second = chosen(model)
    for a, b in zip(keras_fip.ensemble_members(first), keras_fip.ensemble_members(second)):
        np.testing.assert_allclose(_flat(a), _flat(b), atol=1e-5)
    one_member = 256 + 4 * 64 * 3 + 128
    assert selection["train_examples"] == len(losses) * (one_member + held)
    assert history["train_examples"] == (
        chosen.history["train_examples"] + selection["train_examples"]
    )
    # Inputs only: the same walk without the labels' term, the diversity targets the
    # predictions of the members so far.
    inputs_only = keras_fip.Ensemble(2, data=x, diversity=Diversity(examples=128), walk=walk)
    inputs_only(model)
    assert (
        inputs_only.history["push"],
        inputs_only.history["diversity"],
        inputs_only.history["labels"],
    ) == ("none", 1.0, 0.0)
    assert "labels_selection" not in inputs_only.history
    # labels=False: the labelled data walked as inputs only.
    unlabelled = keras_fip.Ensemble(
        2, data=(x, y), labels=False, diversity=Diversity(examples=128), walk=walk
    )
    unlabelled(model)
    assert unlabelled.history["labels"] == 0.0


def test_auto_beta_is_the_library_s_rule(digits):
    model, x, y, _, _ = digits
    for distance in ("l2", "kl"):
        walk = _walk(2, batch_size=64, beta="auto", distance=distance)
        op = keras_fip.Ensemble(2, data=(x, y), labels=1.0, walk=walk)
        op(model)
        expected = auto_beta(
            keras_fip.operations.ensemble.STRENGTH,
            model,
            x,
            distance=distance,
            objective="outputs",
            seed=0,
        )
        assert op.history["beta"] == pytest.approx(expected, rel=1e-6)
    assert op.history["beta"] == 1.0  # The KL divergence: cross-entropies are in its units.


def test_one_operation_gives_independent_results(digits, batchnorm_residual):
    model, x, y, _, _ = digits
    op = keras_fip.Ensemble(2, data=(x[:400], y[:400]), labels=1.0, walk=_walk(4, batch_size=64))
    attributes = dict(vars(op))
    first = op(model)
    other = op(batchnorm_residual[0])
    again = op(model)
    # Only the last call's path and history are kept on the operation.
    assert {key for key in vars(op) if key not in ("path", "history")} == (
        {key for key in attributes if key not in ("path", "history")}
    )
    for key in attributes:
        if key not in ("path", "history", "walk", "diversity", "data"):
            assert vars(op)[key] == attributes[key]
    for a, b in zip(keras_fip.ensemble_members(first), keras_fip.ensemble_members(again)):
        np.testing.assert_array_equal(_flat(a), _flat(b))
    fresh = keras_fip.Ensemble(
        2, data=(x[:400], y[:400]), labels=1.0, walk=_walk(4, batch_size=64)
    )(batchnorm_residual[0])
    for a, b in zip(keras_fip.ensemble_members(other), keras_fip.ensemble_members(fresh)):
        np.testing.assert_array_equal(_flat(a), _flat(b))
    assert op.history["member_steps"] == [2, 4]


def test_members_taken_at_a_metric_distance(digits):
    model, x, _, _, _ = digits
    op = keras_fip.Ensemble(
        3,
        data=x,
        spacing=0.3,
        push="random",
        diversity=Diversity(weight=0.0),
        walk=_walk(300, rule=Metric(epsilon=0.05), distance="l2"),
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
        push="none",
        labels=1.0,
        walk=_walk(180, rule=Penalty(3e-3), batch_size=64, distance="l2", beta=1.0),
    )
    plain = keras_fip.Ensemble(3, diversity=Diversity(weight=0.0), **settings)(model)
    diversity = Diversity(weight=3.0, radius=0.2, adversary=adversary, examples=256)
    op = keras_fip.Ensemble(3, diversity=diversity, **settings)
    diverse = op(model)
    # FGSM at ε = 0.2 transferred from the surrogate: the diverse members are right where
    # the plain walk's are all wrong.
    assert (
        _fgsm_accuracy(surrogate, diverse, x_test, y_test, 0.2)
        > _fgsm_accuracy(surrogate, plain, x_test, y_test, 0.2) + 0.1
    )
    base = keras_fip.models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert np.mean(np.asarray(diverse(x_test)).argmax(-1) == y_test) > base - 0.02
    # Compute: reference outputs; per step anchor (D), labelled and diversity batches;
    # "members": per member the attack on the members so far (the start, 1, 2);
    # "ensemble": per step the attack on the moving network and the members so far.
    if adversary == "members":
        attacks = 256 * (1 + 1 + 2)
    else:
        attacks = 60 * 64 * ((1 + 1) + (1 + 1) + (1 + 2))
    assert op.history["train_examples"] == len(x) + 180 * 64 * 3 + attacks


def test_per_step_pgd_attacks_the_whole_ensemble_with_a_ramped_radius(digits, monkeypatch):
    model, x, y, x_test, y_test = digits
    radii = []
    original = keras_fip.operations.ensemble._RampRadius.on_train_batch_begin

    def record(self, batch, logs=None):
        original(self, batch, logs)
        radii.append(float(self.variable.numpy()))

    monkeypatch.setattr(keras_fip.operations.ensemble._RampRadius, "on_train_batch_begin", record)
    diversity = Diversity(
        weight=2.0, radius=0.2, adversary="ensemble", attack_steps=3, radius_ramp=0.5, examples=128
    )
    op = keras_fip.Ensemble(
        3, data=(x, y), labels=1.0, diversity=diversity, walk=_walk(12, batch_size=32)
    )
    ensemble = op(model)
    # ρ rises over the first half of the walk (6 of 12 steps), then holds.
    np.testing.assert_allclose(radii, [0.2 * min(1.0, (t + 1) / 6) for t in range(12)], rtol=1e-6)
    # Per step: anchor, labelled and diversity batches, and 3 attack steps on the moving
    # network and the members so far (the start; member 0; members 0 and 1).
    attacks = 4 * 32 * 3 * ((1 + 1) + (1 + 1) + (1 + 2))
    assert op.history["train_examples"] == len(x) + 12 * 32 * 3 + attacks
    base = keras_fip.models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert np.mean(np.asarray(ensemble(x_test)).argmax(-1) == y_test) > base - 0.1


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

    settings = dict(data=x, push="random", walk=_walk(75, rule=Metric(epsilon=0.05), distance="l2"))
    plain = keras_fip.Ensemble(3, diversity=Diversity(weight=0.0), **settings)(model)
    diversity = Diversity(weight=3.0, loss="agreement", radius=0.3, examples=512)
    diverse_op = keras_fip.Ensemble(3, diversity=diversity, **settings)
    diverse = diverse_op(model)
    assert disagreement(diverse) > 1.5 * disagreement(plain)
    # The FIP still keeps the clean function.
    base = keras_fip.models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert np.mean(np.asarray(diverse(x_test)).argmax(-1) == y_test) > base - 0.05
    # Unlabelled: the attacks use the predictions (one forward pass per member so far),
    # the agreement targets another.
    assert diverse_op.history["train_examples"] == (
        len(x) + 75 * 128 * (1 + 10 + 1) + 512 * 3 * (1 + 1 + 2)
    )


def test_batchnorm_members_get_recalibrated_statistics():
    model = trained_model("batchnorm_residual")
    x, _ = keras_fip.data.load("digits")
    x = x[:400]
    ensemble = keras_fip.Ensemble(2, data=x, walk=_walk(10, batch_size=64))(model)
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
    ensemble = keras_fip.Ensemble(3, data=x, walk=_walk(9))(model)
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
        (dict(num_members=2, labels=-1.0), "labels"),
        (dict(num_members=2, labels="lots"), "labels"),
        (dict(num_members=2, labels=True), "labels"),
        (dict(num_members=2, spacing=-1.0), "spacing"),
        (dict(num_members=2, include_start="yes"), "include_start"),
        (dict(num_members=2, push="sideways"), "push"),
        (dict(num_members=2, diversity="lots"), "diversity"),
        (dict(num_members=2, push="none", diversity=Diversity(weight=0.0), labels=False), "push"),
        (
            dict(num_members=2, walk=keras_fip.Walk(seed=0, checkpoint_directory="/tmp/x")),
            "checkpoint_directory",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_fip.Ensemble(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=-1.0), "weight"),
        (dict(weight="lots"), "weight"),
        (dict(loss="kl"), "loss"),
        (dict(radius=0.0), "radius"),
        (dict(radius="large"), "radius"),
        (dict(attack_steps=0), "attack_steps"),
        (dict(adversary="surrogate"), "adversary"),
        (dict(adversary="ensemble", loss="agreement"), "adversary"),
        (dict(examples=0), "examples"),
        (dict(adversary="ensemble", radius_ramp=1.5), "radius_ramp"),
        (dict(adversary="ensemble", radius_ramp="fast"), "radius_ramp"),
        (dict(radius_ramp=0.5), "radius_ramp"),
    ],
)
def test_bad_diversity_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Diversity(**kwargs)


@pytest.mark.parametrize("keyword", ["steps_between", "task_weight", "seed", "batch_size"])
def test_walk_keywords_are_the_walk_s(keyword):
    with pytest.raises(TypeError, match=keyword):
        keras_fip.Ensemble(2, **{keyword: 1})


def test_data_that_do_not_fit_raise_before_any_work(digits, monkeypatch):
    model, x, _, _, _ = digits
    calls = []
    monkeypatch.setattr(keras_fip.operations.base, "copy_model", lambda m: calls.append(m) or m)
    with pytest.raises(ValueError, match="data"):
        keras_fip.Ensemble(2, data=np.zeros((16, 5, 5, 1), "float32"), walk=_walk(2))(model)
    with pytest.raises(ValueError, match="data"):
        keras_fip.Ensemble(2, walk=_walk(2))(model)
    with pytest.raises(ValueError, match="labelled"):
        keras_fip.Ensemble(
            2,
            data=np.zeros((16, 8, 8, 1), "float32"),
            push="none",
            diversity=Diversity(weight=0.0),
            walk=_walk(2),
        )(model)
    with pytest.raises(ValueError, match="budget"):
        keras_fip.Ensemble(3, data=x, walk=_walk(2))(model)
    assert calls == []


def test_config_round_trip():
    op = keras_fip.Ensemble(
        5,
        labels=0.5,
        diversity=Diversity(weight=0.5, loss="agreement", attack_steps=3, radius=0.1),
        combine="mean_logits",
        spacing=0.2,
        push="random_per_member",
        walk=keras_fip.Walk(steps=70, rule=Metric(epsilon=0.02), seed=3),
    )
    twin = keras_fip.Ensemble.from_config(op.get_config())
    assert twin.get_config() == op.get_config()
    assert twin.diversity == op.diversity and twin.walk == op.walk
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
    assert restored.get_config() == op.get_config()
    defaults = keras_fip.Ensemble(2)
    assert keras_fip.Ensemble.from_config(defaults.get_config()).get_config() == (
        defaults.get_config()
    )
    diversity = Diversity(
        weight=2.0, adversary="ensemble", attack_steps=3, examples=64, radius_ramp=0.25
    )
    assert Diversity.from_config(diversity.get_config()) == diversity
    assert (
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(diversity))
        == diversity
    )


def test_diversity_needs_floating_point_inputs():
    # Token ids cannot be attacked: "auto" walks without the diversity term (the random
    # push drives it), an explicit diversity weight is refused before any work.
    tokens = np.random.default_rng(0).integers(1, 20, (64, 6)).astype("int32")
    labels = tokens[:, 0] % 2
    model = keras_fip.models.transformer_classifier(
        vocab_size=20, sequence_length=6, embed_dim=8, num_heads=1, feed_forward_dim=8, num_layers=1
    )
    op = keras_fip.Ensemble(2, data=(tokens, labels), walk=_walk(4, batch_size=16))
    assert len(keras_fip.ensemble_members(op(model))) == 2
    assert (op.history["diversity"], op.history["push"]) == (0.0, "random")
    with pytest.raises(ValueError, match="diversity.*int32"):
        keras_fip.Ensemble(
            2, data=(tokens, labels), diversity=Diversity(weight=1.0), walk=_walk(4)
        )(model)


# Models ending in a softmax: members averaged as probabilities.


@pytest.fixture(scope="module")
def softmax_convnet():
    """A small Sequential conv net ending in `Dense(10, activation="softmax")`, trained
    with `fit` on one-hot labels, as the keras.io MNIST example is."""
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="categorical_crossentropy")
    model.fit(x, keras.utils.to_categorical(y, 10), epochs=10, batch_size=64, verbose=0)
    return model, x, y, x_test, y_test


def _nll(probabilities, y):
    return float(-np.mean(np.log(probabilities[np.arange(len(y)), y])))


def test_softmax_model_ensemble_averages_probabilities(softmax_convnet):
    model, x, y, x_test, y_test = softmax_convnet
    op = keras_fip.Ensemble(
        3, data=x[:600], diversity=Diversity(examples=256), walk=_walk(30, batch_size=64)
    )
    ensemble = op(model)
    assert op.history["outputs"] == "probabilities"
    members = keras_fip.ensemble_members(ensemble)
    assert member_output_kind(ensemble) == "probabilities"
    assert ensemble_combine(ensemble) == "mean_probabilities"
    assert not any(isinstance(layer, keras.layers.Softmax) for layer in ensemble.layers)
    outputs = np.asarray(ensemble(x_test), "float64")
    member_outputs = [np.asarray(m(x_test), "float64") for m in members]
    # Probabilities: rows sum to 1, as confident as the members (a softmax of
    # probabilities would be nearly uniform: max probability ~0.2).
    np.testing.assert_allclose(outputs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(member_outputs[0].sum(-1), 1.0, atol=1e-5)
    confidence = outputs.max(-1).mean()
    member_confidence = np.mean([p.max(-1).mean() for p in member_outputs])
    assert confidence > 0.8
    assert abs(confidence - member_confidence) < 0.03 * member_confidence
    # The ensemble's output is the mean of the members' probabilities, so its NLL is the
    # NLL of that mean, computed by hand.
    mean = np.mean(member_outputs, axis=0)
    np.testing.assert_allclose(outputs, mean, atol=1e-6)
    assert _nll(outputs, y_test) == pytest.approx(_nll(mean, y_test), rel=1e-5)
    base = np.asarray(model(x_test), "float64")
    assert _nll(outputs, y_test) < _nll(base, y_test) + 0.05
    assert np.mean(outputs.argmax(-1) == y_test) > np.mean(base.argmax(-1) == y_test) - 0.02
    # Evaluated with the compiled loss (categorical cross-entropy on probabilities).
    ensemble.compile(loss="sparse_categorical_crossentropy")
    loss = ensemble.evaluate(x_test, y_test, verbose=0)
    assert loss == pytest.approx(_nll(mean, y_test), rel=1e-4)
    # The logits of the ensemble (for attacks) are log p̄.
    log_mean = np.asarray(keras_fip.robustness.logit_model(ensemble)(x_test))
    np.testing.assert_allclose(np.exp(log_mean), outputs, atol=1e-5)


def test_softmax_ensemble_survives_keras_round_trip(softmax_convnet, tmp_path):
    model, x, _, x_test, _ = softmax_convnet
    members = [keras_fip.engine.copy_model(model) for _ in range(2)]
    for index, member in enumerate(members):
        for variable in member.trainable_variables:
            variable.assign(variable * (1.0 + 0.05 * (index + 1)))
    for combine in ("mean_probabilities", "mean_logits"):
        ensemble = build_ensemble(
            [keras_fip.engine.copy_model(m) for m in members], combine=combine
        )
        path = os.path.join(tmp_path, f"{combine}.keras")
        ensemble.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            np.asarray(loaded(x_test)), np.asarray(ensemble(x_test)), atol=1e-6
        )
        assert ensemble_combine(loaded) == combine
        assert member_output_kind(loaded) == "probabilities"
        probabilities = [np.asarray(m(x_test), "float64") for m in members]
        if combine == "mean_probabilities":
            expected = np.mean(probabilities, axis=0)
        else:  # The mean of the members' log-probabilities: logits.
            expected = np.mean(np.log(probabilities), axis=0)
        np.testing.assert_allclose(np.asarray(loaded(x_test)), expected, atol=1e-4)
        # logit_model gives logits of the ensemble's distribution either way.
        log_mean = np.asarray(keras_fip.robustness.logit_model(loaded)(x_test), "float64")
        distribution = expected if combine == "mean_probabilities" else _softmax(expected)
        np.testing.assert_allclose(_softmax(log_mean), distribution, atol=1e-5)


def test_logits_model_ensemble_is_unchanged(digits):
    model, _, _, x_test, _ = digits
    members = [keras_fip.engine.copy_model(model) for _ in range(2)]
    members[1].trainable_variables[0].assign(members[1].trainable_variables[0] * 1.1)
    logits = [np.asarray(m(x_test)) for m in members]
    ensemble = build_ensemble(members)
    assert member_output_kind(ensemble) == "logits"
    assert sum(isinstance(layer, keras.layers.Softmax) for layer in ensemble.layers) == 2
    np.testing.assert_allclose(
        np.asarray(ensemble(x_test)), np.mean([_softmax(z) for z in logits], 0), atol=1e-6
    )
    geometric = build_ensemble([keras_fip.engine.copy_model(m) for m in members], "mean_logits")
    np.testing.assert_allclose(np.asarray(geometric(x_test)), np.mean(logits, 0), atol=1e-5)


def test_combination_layer_reads_probabilities():
    probabilities = [
        np.array([[1.0, 0.0]], "float32"),
        np.array([[0.0, 1.0]], "float32"),
    ]
    layer = EnsembleCombination("log_mean_probabilities", outputs="probabilities")
    np.testing.assert_allclose(np.asarray(layer(probabilities)), np.log([[0.5, 0.5]]), atol=1e-5)
    mean = EnsembleCombination(outputs="probabilities")(probabilities)
    np.testing.assert_allclose(np.asarray(mean), [[0.5, 0.5]], atol=1e-7)
    twin = EnsembleCombination.from_config(layer.get_config())
    assert (twin.combine, twin.outputs) == ("log_mean_probabilities", "probabilities")
    with pytest.raises(ValueError, match="outputs"):
        EnsembleCombination(outputs="scores")


# Defaults on a BatchNorm residual net trained with `fit`.


@pytest.fixture(scope="module")
def batchnorm_residual():
    """A small BatchNorm residual conv net with logits, trained with `fit`: its moving
    statistics lag its weights, as they often do after `fit`."""
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    keras.utils.set_random_seed(8)
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    stem = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(inputs)))
    branch = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(stem))
    hidden = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.Add()([stem, branch])))
    hidden = layers.Dense(32, activation="relu")(hidden)
    model = keras.Model(inputs, layers.Dense(10)(hidden))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=20, batch_size=64, verbose=0)
    return model, x, y, x_test, y_test


def test_defaults_keep_every_member_of_a_batchnorm_residual_net(batchnorm_residual):
    model, x, _, x_test, y_test = batchnorm_residual

    def accuracy(network):
        return float(np.mean(np.asarray(network(x_test)).argmax(-1) == y_test))

    recalibrated = keras_fip.engine.copy_model(model)
    keras_fip.engine.recalibrate_batch_normalization(recalibrated, x, 256)
    # The defaults (the penalty walk, 100 steps a member) keep this net's function.
    op = keras_fip.Ensemble(3, data=x[:600], walk=keras_fip.Walk(batch_size=64, seed=0, verbose=0))
    ensemble = op(model)
    floor = max(accuracy(model), accuracy(recalibrated)) - 0.05
    for member in keras_fip.ensemble_members(ensemble):
        assert accuracy(member) > floor
    assert accuracy(ensemble) >= accuracy(model)
    assert accuracy(ensemble) > accuracy(recalibrated) - 0.02
    # Compute: the start's statistics re-estimated and its reference outputs (600 each),
    # per member 100 steps of anchor and diversity batches and the statistics re-estimated,
    # and the attacks on 600 inputs against 1, 1, 2 members with their predictions (no
    # labels) as targets.
    steps = 3 * (100 * 64 * 2 + 600)
    assert op.history["train_examples"] == 600 + 600 + steps + 2 * 600 * (1 + 1 + 2)


def test_batchnorm_start_is_recalibrated_before_the_walk(batchnorm_residual):
    model, x, _, _, _ = batchnorm_residual
    x = x[:400]
    ensemble = keras_fip.Ensemble(2, data=x, include_start=True, walk=_walk(3, batch_size=64))(
        model
    )
    start = keras_fip.ensemble_members(ensemble)[0]
    expected = keras_fip.engine.copy_model(model)
    keras_fip.engine.recalibrate_batch_normalization(expected, x, 128)
    np.testing.assert_allclose(_flat(start), _flat(expected), atol=1e-6)
    # The caller's model keeps its own statistics.
    assert not np.allclose(_flat(model), _flat(expected))
