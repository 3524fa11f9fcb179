"""Tests for the walk object and the step rules: validation, serialisation, budgets, updates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.engine import rules
from keras_fip.engine import step_rules
from keras_fip.engine.walk import Walk


@pytest.mark.parametrize(
    "rule",
    [
        rules.Penalty(),
        rules.Penalty(learning_rate=3e-3),
        rules.Normalized(epsilon=0.05),
        rules.Metric(epsilon=0.02, damping=0.1, cg_iterations=7),
    ],
)
def test_rules_round_trip_through_keras_serialisation(rule):
    config = keras.saving.serialize_keras_object(rule)
    assert config["registered_name"] == f"keras_fip>{type(rule).__name__}"
    clone = keras.saving.deserialize_keras_object(config)
    assert clone == rule and clone is not rule
    assert rules.get(config) == rule


def test_rules_by_name_have_their_defaults():
    assert rules.get("penalty") == rules.Penalty(learning_rate="auto")
    assert rules.get("normalized") == rules.Normalized(epsilon=0.01)
    assert rules.get("metric") == rules.Metric(epsilon=0.01, damping=1e-3, cg_iterations=10)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: rules.Penalty(learning_rate=0.0), "Received: learning_rate=0.0"),
        (lambda: rules.Penalty(learning_rate="fast"), "Received: learning_rate='fast'"),
        (lambda: rules.Normalized(epsilon=-1), "Received: epsilon=-1"),
        (lambda: rules.Metric(damping=-0.1), "Received: damping=-0.1"),
        (lambda: rules.Metric(cg_iterations=0), "Received: cg_iterations=0"),
        (lambda: rules.get("adam"), "Received: rule='adam'"),
    ],
)
def test_bad_rule_arguments_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_auto_learning_rate_scales_with_the_live_weights():
    small = keras.Variable(np.full((10, 10), 0.1, "float32"))
    large = keras.Variable(np.full((10, 10), 1.0, "float32"))
    masked = keras.Variable(np.concatenate([np.zeros(50), np.full(50, 1.0)]).astype("float32"))
    scale = rules.AUTO_LEARNING_RATE_SCALE
    assert rules.auto_learning_rate([small]) == pytest.approx(0.1 * scale)
    assert rules.auto_learning_rate([large]) == pytest.approx(scale)
    # Zeros (pruned weights) do not count.
    assert rules.auto_learning_rate([masked]) == pytest.approx(scale)
    assert rules.auto_learning_rate([keras.Variable(np.zeros(4))]) == rules.FALLBACK_LEARNING_RATE


def test_normalized_update_is_the_negated_step_of_length_epsilon():
    gradients = [tf.constant([[3.0, 4.0]]), tf.constant([0.0])]
    update = rules.Normalized(epsilon=0.5).update(gradients, beta=1.0)
    np.testing.assert_allclose(update[0].numpy(), [[0.3, 0.4]], rtol=1e-6)
    assert float(step_rules.global_norm(update)) == pytest.approx(0.5)


def test_metric_update_solves_the_damped_system():
    # g = diag(4, 1): θ ∝ −(g + δI)⁻¹ ∇L, rescaled to ε; the update is −θ.
    diagonal = tf.constant([4.0, 1.0])
    gradients = [tf.constant([1.0, 1.0])]
    update = rules.Metric(epsilon=1.0, damping=0.0, cg_iterations=5).update(
        gradients, beta=2.0, metric_product=lambda v: [diagonal * v[0]]
    )
    expected = np.array([0.25, 1.0]) / np.linalg.norm([0.25, 1.0])
    np.testing.assert_allclose(update[0].numpy(), expected, rtol=1e-5)


def test_penalty_optimizer_decays_from_its_rate_to_zero():
    variables = [keras.Variable(np.full((3,), 0.5, "float32"))]
    optimizer = rules.Penalty().optimizer(steps=10, variables=variables)
    optimizer.build(variables)
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert float(optimizer.learning_rate) == pytest.approx(0.5 * rules.AUTO_LEARNING_RATE_SCALE)
    optimizer.iterations.assign(10)
    assert float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)


def test_walk_round_trips_and_repr_names_only_changes():
    walk = Walk(
        steps=40,
        rule=rules.Metric(cg_iterations=3),
        batch_size=16,
        distance="l2",
        beta=0.5,
        reference="local",
        training=False,
        record_every=5,
        seed=3,
    )
    assert Walk.from_config(walk.get_config()) == walk
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(walk)) == walk
    assert repr(Walk()) == "Walk()"
    assert repr(Walk(steps=5)) == "Walk(steps=5)"
    assert "rule=Metric(epsilon=0.01, damping=0.001, cg_iterations=3)" in repr(walk)


def test_resolve_fills_only_what_the_walk_leaves_open():
    resolved = Walk(batch_size=32).resolve(epochs=3, record_every=10)
    assert resolved.batch_size == 32
    assert resolved.epochs == 3 and resolved.steps is None
    assert resolved.record_every == 10
    assert resolved.rule == rules.Penalty() and resolved.distance == "kl"
    assert resolved.beta == "auto" and resolved.training == "auto"
    # A walk's own budget wins over the operation's, whichever unit it is in.
    assert Walk(steps=7).resolve(epochs=3).steps == 7
    assert Walk(steps=7).resolve(epochs=3).epochs is None


def test_walk_budget():
    assert Walk(steps=7).num_steps(1000) == 7
    assert Walk(epochs=2, batch_size=100).num_steps(1001) == 2 * 11
    assert Walk(batch_size=100).resolve(epochs=4).num_steps(250) == 4 * 3
    assert Walk().resolve(steps=1000).num_steps(250) == 1000
    # A batch larger than the data is one step a pass.
    assert Walk(epochs=3, batch_size=512).num_steps(100) == 3
    with pytest.raises(ValueError, match="no budget"):
        Walk().num_steps(100)


def test_walk_replace_keeps_the_rest():
    walk = Walk(steps=10, seed=1, rule="metric")
    changed = walk.replace(steps=20)
    assert changed.steps == 20 and changed.seed == 1 and changed.rule == rules.Metric()
    assert walk.steps == 10


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps": 0}, "Received: steps=0"),
        ({"epochs": 1.5}, "Received: epochs=1.5"),
        ({"steps": 5, "epochs": 2}, "at most one of `steps` and `epochs`"),
        ({"rule": "sgd"}, "Received: rule='sgd'"),
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"distance": "cosine"}, "Received: distance='cosine'"),
        ({"beta": -1.0}, "Received: beta=-1.0"),
        ({"reference": "previous"}, "Received: reference='previous'"),
        ({"training": "yes"}, "Received: training='yes'"),
        ({"record_every": 0}, "Received: record_every=0"),
        ({"seed": -2}, "Received: seed=-2"),
        ({"checkpoint_directory": "/tmp/x"}, "needs a `seed`"),
        ({"verbose": 3}, "Received: verbose=3"),
        ({"callbacks": ["x"]}, "Received: callbacks="),
    ],
)
def test_bad_walk_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Walk(**kwargs)


def test_trainer_takes_a_rule_object_and_serialises_it():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    trainer = keras_fip.FIPTrainer(model, rule=rules.Normalized(epsilon=0.2))
    clone = keras_fip.FIPTrainer.from_config(trainer.get_config())
    assert clone.rule == rules.Normalized(epsilon=0.2)
