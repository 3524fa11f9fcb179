import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import data
from keras_fip import models
from keras_fip.geometry import MetricOperator
from keras_fip.geometry import breakdown_acceleration
from keras_fip.geometry import breakdown_profile
from keras_fip.geometry import breakdown_speed
from keras_fip.geometry import damage_path
from keras_fip.geometry import deletion_profile
from keras_fip.geometry import deletion_sequence
from keras_fip.geometry import expected_perturbation_change
from keras_fip.geometry import knee
from keras_fip.geometry import unit_deletion_speed


@pytest.fixture(scope="module")
def trained():
    x, y = data.load("digits")
    keras.utils.set_random_seed(0)
    model = models.mlp(32, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=8, batch_size=64, learning_rate=3e-3)
    return model, x.astype("float32"), y


def test_damage_path_scales_the_damaged_coordinates_by_one_minus_t(trained):
    model, _, _ = trained
    damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
    points, times = damage_path(model, damaged, num_points=5)
    np.testing.assert_allclose(times, [0, 0.25, 0.5, 0.75, 1.0])
    for start, end, original, final in zip(
        points[0], points[-1], model.get_weights(), damaged.get_weights()
    ):
        np.testing.assert_array_equal(start, original)
        np.testing.assert_array_equal(end, final)
    for middle, original, final in zip(points[2], model.get_weights(), damaged.get_weights()):
        hit = final != original
        np.testing.assert_allclose(middle[hit], 0.5 * original[hit], rtol=1e-6)
        np.testing.assert_array_equal(middle[~hit], original[~hit])
    with pytest.raises(ValueError, match="`num_points`"):
        damage_path(model, damaged, num_points=1)


def test_deletion_sequence_is_nested_and_runs_to_every_unit(trained):
    model, x, _ = trained
    fractions = [0.0, 0.25, 0.5, 1.0]
    sequence = deletion_sequence(model, fractions, seed=3)
    dead = [
        set(np.flatnonzero(np.all(m.get_layer("dense_1").kernel.numpy() == 0, axis=0)))
        for m in sequence
    ]
    assert [len(d) for d in dead] == [0, 8, 16, 32]
    assert dead[0] <= dead[1] <= dead[2] <= dead[3]
    # All hidden units gone: the logits are the output bias.
    np.testing.assert_allclose(
        np.asarray(sequence[-1](x[:4])), np.tile(model.get_layer("logits").bias.numpy(), (4, 1))
    )
    with pytest.raises(ValueError, match="`fractions`"):
        deletion_sequence(model, [0.5, 0.2])
    with pytest.raises(ValueError, match="`scope`"):
        deletion_sequence(model, [0.5], scope="local")
    with pytest.raises(ValueError, match="`layers`"):
        deletion_sequence(model, [0.5], layers=["logits"])
    # Per layer, of the named layer only; the input model keeps no mask.
    (half,) = deletion_sequence(model, [0.5], scope="per_layer", layers=["dense_1"])
    assert len(keras_fip.operations.hidden_units(half)["dense_1"][1]) == 16
    assert not keras_fip.masks(model)


def test_breakdown_profile_matches_speed_acceleration_energy_and_length(trained):
    model, x, _ = trained
    fractions = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    sequence = deletion_sequence(model, fractions, seed=1)
    profile = breakdown_profile(sequence, x[:200], times=fractions)
    speed = breakdown_speed(sequence, x[:200], times=fractions)
    np.testing.assert_allclose(profile["speed"], speed, rtol=1e-6)
    np.testing.assert_allclose(
        profile["acceleration"],
        breakdown_acceleration(sequence, x[:200], times=fractions),
        rtol=1e-6,
    )
    assert np.all(profile["speed"] > 0)
    np.testing.assert_allclose(profile["acceleration_times"], [0.2, 0.4, 0.6])
    assert profile["energy"] == pytest.approx(np.sum(speed * 0.2))
    assert profile["length"] == pytest.approx(np.sum(np.sqrt(speed) * 0.2))
    # Along a deletion step the speed is not the measured change: a unit's output is
    # bilinear in its incoming and outgoing weights, which both vanish, so the linearised
    # change is twice the true one (speed = 4 × measured / Δt²). Along the damage path
    # γ(t) (both scaled by 1 − t) the speed at t = 0 is the exact rate: check it there.
    change = np.asarray(sequence[1](x[:200])) - np.asarray(sequence[0](x[:200]))
    measured = np.mean(np.sum(change**2, axis=1)) / 0.2**2
    assert profile["speed"][0] == pytest.approx(4 * measured, rel=0.05)
    points, times = damage_path(model, sequence[1], num_points=201)
    first = breakdown_speed(points[:2], x[:200], model=model, times=times[:2])[0]
    working = keras_fip.engine.copy_model(model)
    working.set_weights(points[1])
    step = np.asarray(working(x[:200])) - np.asarray(model(x[:200]))
    rate = np.mean(np.sum(step**2, axis=1)) / times[1] ** 2
    assert first == pytest.approx(rate, rel=0.02)


def test_knee_finds_where_the_curve_breaks():
    x = np.linspace(0, 1, 21)
    y = np.where(x <= 0.8, 0.98 - 0.05 * x, 0.94 - 4.2 * (x - 0.8))
    assert knee(x, y) == pytest.approx(0.8)
    assert knee(x, np.ones_like(x)) == 0.0
    with pytest.raises(ValueError, match="`x`"):
        knee([0.0, 1.0], [1.0, 0.0])


def test_expected_perturbation_change_predicts_measured_gaussian_damage(trained):
    model, x, _ = trained
    inputs = x[:300]
    metric = MetricOperator(model, inputs)
    radius = 0.2
    predicted = expected_perturbation_change(metric, norm=radius, num_samples=300)
    # Measured: the mean squared logit change under Damage(Gaussian(norm=radius)).
    reference = np.asarray(model(inputs))
    changes = []
    for seed in range(40):
        damaged = keras_fip.Damage(keras_fip.faults.Gaussian(norm=radius), seed=seed)(model)
        changes.append(np.mean(np.sum((np.asarray(damaged(inputs)) - reference) ** 2, 1)))
    measured = float(np.mean(changes))
    assert predicted == pytest.approx(measured, rel=0.15)
    # The two conventions agree when stated consistently, and the other reading of Eq. 9
    # (σ taken as the norm, E‖δw‖ = σ) would be off by a factor 1/σ = 5.
    assert expected_perturbation_change(metric, sigma=radius**2, num_samples=300) == (
        pytest.approx(predicted)
    )
    wrong = expected_perturbation_change(metric, sigma=radius, num_samples=300)
    assert wrong / measured > 3
    with pytest.raises(ValueError, match="exactly one"):
        expected_perturbation_change(metric, sigma=1.0, norm=1.0)
    with pytest.raises(ValueError, match="`norm`"):
        expected_perturbation_change(metric, norm=-1.0)


def _deleted_alone(model, layer, unit, x, probabilities=True):
    """Outputs with one more unit deleted, through `Nodes(units=...)` (the reference)."""
    damaged = keras_fip.Damage(keras_fip.faults.Nodes(units={layer: [unit]}))(model)
    outputs = np.asarray(damaged(x), np.float64)
    return keras.ops.convert_to_numpy(keras.ops.softmax(outputs)) if probabilities else outputs


def test_unit_deletion_speed_is_the_mean_exact_change_of_deleting_one_more_unit(trained):
    model, x, _ = trained
    inputs = x[:100]
    damaged = deletion_sequence(model, [0.25], seed=2)[0]
    before = [w.copy() for w in damaged.get_weights()]
    result = unit_deletion_speed(damaged, inputs)
    reference = np.asarray(keras.ops.softmax(np.asarray(damaged(inputs), np.float64)))
    _, deleted = keras_fip.operations.hidden_units(damaged)["dense_1"]
    alive = [u for u in range(32) if u not in deleted]
    changes = [
        np.mean(np.sum((_deleted_alone(damaged, "dense_1", u, inputs) - reference) ** 2, axis=1))
        for u in alive
    ]
    assert (result["num_units"], result["num_alive"]) == (32, 24)
    np.testing.assert_allclose(result["changes"], changes, rtol=1e-4, atol=1e-9)
    assert result["speed"] == pytest.approx(32 * np.mean(changes), rel=1e-4)
    for a, b in zip(before, damaged.get_weights()):
        np.testing.assert_array_equal(a, b)  # Not changed
    sample = unit_deletion_speed(damaged, inputs, outputs="logits", max_units=5, seed=0)
    assert sample["changes"].shape == (5,) and sample["num_alive"] == 24
    with pytest.raises(ValueError, match="`outputs`"):
        unit_deletion_speed(damaged, inputs, outputs="softmax")
    with pytest.raises(ValueError, match="`max_units`"):
        unit_deletion_speed(damaged, inputs, max_units=0)


def test_unit_deletion_speed_through_batch_normalization_and_flatten():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="norm")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(5, activation="relu", name="hidden")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))
    model.get_layer("norm").set_weights(
        [np.full(4, 1.5), np.full(4, 0.1), np.full(4, 0.2), np.full(4, 2.0)]
    )
    x = np.random.default_rng(0).normal(size=(20, 6, 6, 1)).astype("float32")
    result = unit_deletion_speed(model, x, outputs="logits")
    reference = np.asarray(model(x), np.float64)
    changes = [
        np.mean(np.sum((_deleted_alone(model, layer, u, x, False) - reference) ** 2, 1))
        for layer, count in (("conv", 4), ("hidden", 5))
        for u in range(count)
    ]
    assert result["num_units"] == 9
    np.testing.assert_allclose(result["changes"], changes, rtol=1e-4, atol=1e-9)


def test_deletion_profile_speed_does_not_depend_on_the_step(trained):
    model, x, _ = trained
    coarse, fine = [0.0, 0.5, 0.75, 1.0], [0.0, 0.25, 0.5, 0.625, 0.75, 1.0]
    profiles = [
        deletion_profile(deletion_sequence(model, f, seed=0), x[:100], f) for f in (coarse, fine)
    ]
    np.testing.assert_allclose(profiles[0]["speed_times"], [0.0, 0.5, 0.75])
    np.testing.assert_allclose(profiles[0]["acceleration_times"], [0.25, 0.625])
    np.testing.assert_allclose(profiles[0]["num_alive"], [32, 16, 8])
    # The same networks (nested prefixes of one order) have the same speed on either grid.
    np.testing.assert_allclose(profiles[0]["speed"], profiles[1]["speed"][[0, 2, 4]], rtol=1e-6)
    speed = profiles[1]["speed"]
    np.testing.assert_allclose(
        profiles[1]["acceleration"], np.diff(speed) / np.diff(fine[:5]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="`times`"):
        deletion_profile(deletion_sequence(model, coarse, seed=0), x[:10], [0, 1, 2, 2])
    with pytest.raises(ValueError, match="`sequence`"):
        deletion_profile([model, model], x[:10], [0, 1])


def _softmax_twin(model):
    """The same network (the same weights) ending in a softmax instead of logits."""
    last = model.layers[-1]

    def clone(layer):
        config = layer.get_config()
        if layer is last:
            config["activation"] = "softmax"
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def test_softmax_model_and_its_logits_twin_break_down_alike(trained):
    model, x, _ = trained
    twin = _softmax_twin(model)
    assert keras_fip.core.outputs.output_kind(twin) == "probabilities"
    # Probabilities are the same function of the weights for both: the same deletion
    # speeds, and the same segment speeds along the same damage path.
    speeds = [
        unit_deletion_speed(network, x[:200], outputs="probabilities") for network in (model, twin)
    ]
    np.testing.assert_allclose(speeds[0]["changes"], speeds[1]["changes"], rtol=1e-4, atol=1e-9)
    assert speeds[0]["speed"] == pytest.approx(speeds[1]["speed"], rel=1e-4)
    profiles = []
    for network in (model, twin):
        damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(network)
        points, times = damage_path(network, damaged, num_points=4)
        profiles.append(
            breakdown_profile(points, x[:200], model=network, times=times, outputs="probabilities")
        )
    np.testing.assert_allclose(profiles[0]["speed"], profiles[1]["speed"], rtol=1e-4)
