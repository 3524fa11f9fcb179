"""Tests for the FIP trainer: exact zeros at the start, step lengths, dense agreement,
masks, distribution, the non-finite guard and recorded walks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.masks import apply_masks
from keras_fip.engine import rules
from keras_fip.engine.path import Path
from keras_fip.engine.trainer import FIPTrainer


def _rule(name, epsilon=0.01, **kwargs):
    """The step rule named `name` (`epsilon` for the rules that take it)."""
    if name == "penalty":
        return rules.Penalty()
    if name == "normalized":
        return rules.Normalized(epsilon=epsilon)
    return rules.Metric(epsilon=epsilon, **kwargs)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(dtype="float32", seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(6, activation="tanh", name="hidden", dtype=dtype),
            keras.layers.Dense(3, name="logits", dtype=dtype),
        ]
    )


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _data(n=32, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(dtype), rng.integers(0, 3, n).astype("int32")


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def _flat(arrays):
    return np.concatenate([np.reshape(a, -1) for a in arrays])


@pytest.mark.parametrize("distance", ["l2", "kl", "bhattacharyya"])
@pytest.mark.parametrize("reference", ["start", "local"])
def test_distance_and_gradient_exactly_zero_at_start(distance, reference):
    model = _model()
    x, _ = _data()
    start = _weights(model)
    trainer = FIPTrainer(model, rule="penalty", distance=distance, reference=reference)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0))
    data = fip_dataset(model, x, batch_size=16, reference=reference, shuffle=False)
    history = trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    assert history.history["distance"] == [0.0]
    assert history.history["step_norm"] == [0.0]
    for before, after in zip(start, _weights(model)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("step_rule", ["normalized", "metric"])
def test_normalized_and_metric_steps_have_length_epsilon(step_rule):
    model = _model()
    x, y = _data()
    trainer = FIPTrainer(model, rule=_rule(step_rule, epsilon=0.0123), secondary_loss=_loss())
    trainer.compile()
    data = fip_dataset(model, x, secondary=(x, y), batch_size=8, seed=0)
    before = _weights(model)
    history = trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    moved = np.linalg.norm(_flat(_weights(model)).astype(np.float64) - _flat(before))
    # Float32 rounding of the update (a few ulp of ε on some batches).
    assert abs(moved - 0.0123) < 2e-6 * 0.0123
    assert abs(history.history["step_norm"][0] - 0.0123) < 2e-6 * 0.0123
    history = trainer.fit(data, epochs=1, steps_per_epoch=4, verbose=0)
    assert history.history["distance"][0] > 0.0


def _dense_metric(model, x):
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        outputs = model(x, training=False)
    jacobians = tape.jacobian(outputs, variables)
    rows = outputs.shape[0] * outputs.shape[1]
    jacobian = np.concatenate([np.reshape(j.numpy(), (rows, -1)) for j in jacobians], 1)
    return jacobian.T @ jacobian / x.shape[0]


def test_metric_step_direction_matches_dense_solve():
    model = _model("float64")
    x, y = _data(12, "float64")
    beta, epsilon, damping = 0.5, 0.02, 1e-2
    # Dense reference at the start: (G + δI) θ = −β ∇L, θ rescaled to ε.
    metric = _dense_metric(model, tf.constant(x))
    with tf.GradientTape() as tape:
        loss = _loss()(y, model(x, training=False))
    gradient = _flat([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    expected = np.linalg.solve(metric + damping * np.eye(len(gradient)), -beta * gradient)
    expected *= epsilon / np.linalg.norm(expected)

    before = _flat(_weights(model))
    trainer = FIPTrainer(
        model,
        rule=rules.Metric(epsilon=epsilon, damping=damping, cg_iterations=40),
        beta=beta,
        secondary_loss=_loss(),
    )
    trainer.compile()
    data = fip_dataset(model, x, secondary=(x, y), batch_size=12, shuffle=False)
    trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(_flat(_weights(model)) - before, expected, atol=1e-6 * epsilon)


@pytest.mark.parametrize("step_rule", ["penalty", "normalized", "metric"])
def test_masks_exactly_zero_after_100_steps(step_rule):
    model = _model()
    kernel_mask = np.random.default_rng(1).random((4, 6)) > 0.5
    apply_masks(model, {model.get_layer("hidden").kernel.path: kernel_mask})
    x, y = _data()
    trainer = FIPTrainer(model, rule=_rule(step_rule, epsilon=0.05), secondary_loss=_loss())
    trainer.compile(optimizer=keras.optimizers.Adam(0.05) if step_rule == "penalty" else None)
    data = fip_dataset(model, x, secondary=(x, y), batch_size=8, seed=0)
    history = trainer.fit(data, epochs=1, steps_per_epoch=100, verbose=0)
    kernel = model.get_layer("hidden").kernel.numpy()
    assert np.all(kernel[~kernel_mask] == 0.0)
    assert np.count_nonzero(kernel[kernel_mask]) == kernel_mask.sum()
    assert history.history["distance_from_start"][0] > 0.1
    if step_rule != "penalty":
        # The step length counts only the weights that can move.
        assert abs(history.history["step_norm"][0] - 0.05) < 1e-6


@pytest.fixture(scope="module")
def mirrored(mirrored_strategy):
    # One strategy per process: several MirroredStrategy objects collide on collective keys.
    return mirrored_strategy


def _walk(strategy, template, step_rule, reference, x, y, steps=5, measure_every=1):
    with strategy.scope():
        model = _copy(template)
        trainer = FIPTrainer(
            model,
            rule=_rule(step_rule, epsilon=0.01),
            reference=reference,
            secondary_loss=_loss(),
            metric_length=measure_every == 1,
            measure_every=measure_every,
        )
        optimizer = keras.optimizers.SGD(0.1) if step_rule == "penalty" else None
        trainer.compile(optimizer=optimizer)
    data = fip_dataset(
        model, x, secondary=(x, y), batch_size=16, reference=reference, shuffle=False
    )
    history = trainer.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return _weights(model), history.history


@pytest.mark.parametrize(
    "step_rule,reference,dtype,tolerance",
    [
        ("penalty", "start", "float32", 1e-6),
        ("normalized", "local", "float32", 1e-6),
        # The CG solve amplifies float32 summation-order noise by the condition number
        # of g + δI; in float64 the paths agree to rounding.
        ("metric", "start", "float64", 1e-9),
    ],
)
def test_mirrored_strategy_matches_one_device(mirrored, step_rule, reference, dtype, tolerance):
    template = _model(dtype)
    x, y = _data(64, dtype)
    single, single_history = _walk(
        tf.distribute.get_strategy(), template, step_rule, reference, x, y
    )
    multi, multi_history = _walk(mirrored, template, step_rule, reference, x, y)
    for a, b in zip(single, multi):
        np.testing.assert_allclose(a, b, atol=tolerance)
    for name in ("distance", "secondary_loss", "step_norm", "metric_length", "accuracy"):
        np.testing.assert_allclose(single_history[name], multi_history[name], rtol=1e-5, atol=1e-7)


def test_mirrored_strategy_matches_one_device_measuring_every_other_step(mirrored):
    # The guard's copies are made only around measured steps (per replica).
    template = _model()
    x, y = _data(64)
    single, single_history = _walk(
        tf.distribute.get_strategy(), template, "penalty", "start", x, y, measure_every=2
    )
    multi, multi_history = _walk(mirrored, template, "penalty", "start", x, y, measure_every=2)
    for a, b in zip(single, multi):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for name in ("distance", "step_norm", "distance_from_start", "finite"):
        np.testing.assert_allclose(single_history[name], multi_history[name], rtol=1e-5, atol=1e-7)
    assert np.all(np.isnan(single_history["step_norm"][0::2]))
    assert np.all(np.isfinite(single_history["step_norm"][1::2]))


class _NaNAfter:
    """An objective that turns NaN from its `count`-th evaluation on (graph-safe)."""

    def __init__(self, count):
        self.count = count
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, model, batch):
        self.calls.assign_add(1)
        value = tf.reduce_sum(model.trainable_variables[1].value)
        return tf.where(self.calls >= self.count, tf.constant(np.nan, value.dtype), value)


def _walk_into_nan(model, x, count, training=False):
    """Walks until the objective turns NaN at step `count`; returns the recorded path."""
    trainer = FIPTrainer(
        model,
        rule=rules.Normalized(epsilon=0.01),
        training=training,
        secondary_objective=_NaNAfter(count),
    )
    trainer.compile()
    path = Path(model)
    data = fip_dataset(model, x, batch_size=8, seed=0)
    with pytest.raises(FloatingPointError, match=f"at step {count}"):
        trainer.walk(data, 10, path=path, verbose=0)
    return path


def test_non_finite_step_stops_walk_and_keeps_last_good_point():
    model = _model()
    x, _ = _data()
    path = _walk_into_nan(model, x, 4)
    assert list(path.steps) == [0, 1, 2, 3]
    for recorded, current in zip(path.weights(-1), _weights(model)):
        np.testing.assert_array_equal(recorded, current)
    assert all(np.all(np.isfinite(w)) for w in _weights(model))


def _normalized_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="hidden"),
            keras.layers.BatchNormalization(momentum=0.5, name="norm"),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _moving_statistics(model):
    layer = model.get_layer("norm")
    return [layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()]


@pytest.mark.parametrize("training", [False, True])
def test_training_mode_normalizes_with_batch_statistics_and_updates_them(training):
    model = _normalized_model()
    x, _ = _data()
    x = 3.0 * x + 5.0  # Far from the initial moving statistics (mean 0, variance 1).
    reference = model.predict(x, verbose=0)
    before = _moving_statistics(model)
    trainer = FIPTrainer(model, rule="penalty", training=training)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    history = trainer.walk(fip_dataset(model, x, batch_size=32, shuffle=False), 3, verbose=0)
    after = _moving_statistics(model)
    if training:
        # The moving side runs on batch statistics: D sees the gap to inference mode.
        assert history["distance"][0] > 1e-3
        hidden = (
            x @ model.get_layer("hidden").get_weights()[0]
            + model.get_layer("hidden").get_weights()[1]
        )
        # Three updates with momentum 0.5 towards the (fixed) batch mean.
        expected = before[0] * 0.5**3 + hidden.mean(0) * (1 - 0.5**3)
        np.testing.assert_allclose(after[0], expected, rtol=1e-4, atol=1e-4)
    else:
        assert history["distance"] == [0.0, 0.0, 0.0]
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(model.predict(x, verbose=0), reference, atol=1e-6)


def test_non_finite_step_in_training_mode_restores_the_moving_statistics():
    model = _normalized_model()
    x, _ = _data()
    x = 3.0 * x + 5.0
    path = _walk_into_nan(model, x, 3, training=True)
    # The model is back on step 2: its weights and the statistics its forward pass saw.
    for recorded, current in zip(path.weights(-1), _weights(model)):
        np.testing.assert_array_equal(recorded, current)
    replay = _normalized_model()
    trainer_replay = FIPTrainer(
        replay,
        rule=rules.Normalized(epsilon=0.01),
        training=True,
        secondary_objective=_NaNAfter(100),
    )
    trainer_replay.compile()
    trainer_replay.walk(fip_dataset(replay, x, batch_size=8, seed=0), 2, verbose=0)
    for a, b in zip(_moving_statistics(model), _moving_statistics(replay)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_walk_records_path_history_and_continues_a_resumed_path(tmp_path):
    model = _model()
    x, y = _data()
    trainer = FIPTrainer(
        model, rule=rules.Normalized(epsilon=0.01), secondary_loss=_loss(), metric_length=True
    )
    trainer.compile()
    data = fip_dataset(model, x, secondary=(x, y), batch_size=8, seed=0)
    path = Path(model, record_every=2, directory=str(tmp_path / "walk"))
    history = trainer.walk(data, 6, path=path, steps_per_epoch=3, verbose=0)
    assert len(history["distance"]) == 6
    assert list(path.steps) == [0, 2, 4, 6]
    np.testing.assert_allclose(
        path.metrics["euclidean_distance"][-1], history["distance_from_start"][-1], rtol=1e-5
    )
    assert path.length("metric") == pytest.approx(history["metric_length"][-1])
    assert np.all(np.diff(history["metric_length"]) > 0)
    # Resume: a re-loaded path continues after its last step.
    resumed = Path.load(str(tmp_path / "walk"))
    trainer.walk(data, 2, path=resumed, verbose=0)
    assert list(resumed.steps) == [0, 2, 4, 6, 8]


def test_fused_forward_matches_separate_secondary_objective():
    template = _model()
    x, y = _data()
    results = []
    for fused in (True, False):
        model = _copy(template)
        if fused:
            trainer = FIPTrainer(model, rule="normalized", secondary_loss=_loss())
            secondary = (x, y)
        else:
            # The same cross-entropy as a callable objective on the same batches.
            def objective(network, batch):
                return tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(
                        batch[1], network(batch[0], training=False), from_logits=True
                    )
                )

            trainer = FIPTrainer(model, rule="normalized", secondary_objective=objective)
            secondary = (x, y)
        trainer.compile()
        data = fip_dataset(model, x, secondary=secondary, batch_size=8, seed=0)
        trainer.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
        results.append(_weights(model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_new_output_units_are_free_of_the_anchor_distance():
    model = _model()
    x, _ = _data()
    data = fip_dataset(model, x, batch_size=8, shuffle=False)
    wider = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(5)]
    )
    wider.layers[0].set_weights(model.layers[0].get_weights())
    kernel, bias = model.layers[1].get_weights()
    wider.layers[1].set_weights(
        [
            np.concatenate([kernel, np.ones((6, 2), "float32")], 1),
            np.concatenate([bias, np.ones(2, "float32")]),
        ]
    )
    trainer = FIPTrainer(wider, rule="penalty")
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    history = trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    assert history.history["distance"] == [0.0]


def test_get_config_round_trip():
    model = _model()
    trainer = FIPTrainer(
        model,
        rule=rules.Metric(epsilon=0.02, damping=0.1, cg_iterations=7),
        distance="kl",
        beta=0.5,
        secondary_loss=_loss(),
        reference="local",
        metric_length=True,
        training=True,
    )
    config = trainer.get_config()
    clone = FIPTrainer.from_config(config)
    for key in (
        "rule",
        "beta",
        "reference",
        "metric_length",
        "walk_training",
    ):
        assert getattr(clone, key) == getattr(trainer, key)
    assert config["distance"] == "kl"
    assert isinstance(clone.secondary_loss, keras.losses.SparseCategoricalCrossentropy)
    assert clone.network is not model


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rule": "adam"}, "Received: rule='adam'"),
        ({"distance": "cosine"}, "Received: distance='cosine'"),
        ({"beta": float("nan")}, "Received: beta=nan"),
        ({"reference": "previous"}, "Received: reference='previous'"),
        ({"secondary_loss": "sparse_categorical_crossentropy"}, "Received: secondary_loss="),
        ({"secondary_objective": 3}, "Received: secondary_objective=3"),
        ({"training": "yes"}, "Received: training='yes'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FIPTrainer(_model(), **kwargs)


def test_data_adapter_rejects_bad_data_before_work():
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="`anchor` must hold inputs of shape"):
        fip_dataset(model, np.zeros((8, 5), "float32"))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="`anchor` must not contain NaN"):
        fip_dataset(model, bad)
    with pytest.raises(ValueError, match="as many labels as inputs"):
        fip_dataset(model, x, secondary=(x, y[:3]))
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        fip_dataset(model, x, batch_size=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    element = next(iter(fip_dataset(model, dataset, secondary=dataset, batch_size=4)))
    assert element["anchor_inputs"].shape == (4, 4)
    assert element["secondary"][1].shape == (4,)
    # Batched with a static batch size, unbatched and repeated: the same examples.
    for source in (
        dataset,
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True),
        tf.data.Dataset.from_tensor_slices((x, y)),
    ):
        batch = next(
            iter(fip_dataset(model, source, secondary=source, batch_size=32, shuffle=False))
        )
        np.testing.assert_array_equal(batch["anchor_inputs"], x)
        np.testing.assert_array_equal(batch["secondary"][1], y)


def test_measure_every_measures_recorded_steps_alike_and_guards_every_step():
    x, y = _data()
    runs = {}
    for every in (1, 3):
        model = _model()
        trainer = FIPTrainer(model, secondary_loss=_loss(), measure_every=every)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
        path = Path(model, record_every=3)
        data = fip_dataset(model, x, secondary=(x, y), batch_size=8, seed=0)
        history = trainer.walk(data, 7, path=path, verbose=0)
        runs[every] = history, path, _weights(model)
    (every_step, every_path, every_weights), (sparse, sparse_path, sparse_weights) = (
        runs[1],
        runs[3],
    )
    for a, b in zip(sparse_weights, every_weights):
        np.testing.assert_array_equal(a, b)  # The walk itself is unchanged.
    # Measured at steps 3 and 6 and at the walk's last step, 7 (right after step 6).
    for name in ("step_norm", "distance_from_start"):
        values = np.asarray(sparse[name])
        np.testing.assert_array_equal(values[[2, 5, 6]], np.asarray(every_step[name])[[2, 5, 6]])
        assert np.all(np.isnan(np.delete(values, [2, 5, 6])))
    # Points at multiples of `record_every`, and the walk's last step, fully measured.
    assert list(sparse_path.steps) == [0, 3, 6, 7]
    for name, values in every_path.metrics.items():
        np.testing.assert_array_equal(sparse_path.metrics[name], values)
    # A walk whose last step is not next to a measured one (steps 1..5, 3 measured),
    # with the sparse guard (start reference) and with every-step copies (local).
    for reference in ("start", "local"):
        for every in (1, 3):
            model = _model()
            trainer = FIPTrainer(
                model, secondary_loss=_loss(), measure_every=every, reference=reference
            )
            trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
            data = fip_dataset(
                model, x, secondary=(x, y), batch_size=8, seed=0, reference=reference
            )
            runs[every] = trainer.walk(data, 5, verbose=0)
        for name in ("step_norm", "distance_from_start"):
            values = np.asarray(runs[3][name])
            np.testing.assert_array_equal(values[[2, 4]], np.asarray(runs[1][name])[[2, 4]])
            assert np.all(np.isnan(values[[0, 1, 3]]))
    # Weights that overflow at an unmeasured step: the next step's objective stops the
    # walk (local reference: the weights are checked at every step), back on the start.
    for reference, failed in (("start", 2), ("local", 1)):
        model = _model()
        start = _weights(model)
        trainer = FIPTrainer(
            model,
            measure_every=5,
            reference=reference,
            secondary_objective=lambda network, batch: (
                10.0 * tf.reduce_sum(tf.square(network.trainable_variables[0]))
            ),
        )
        trainer.compile(optimizer=keras.optimizers.SGD(1e38))
        with pytest.raises(FloatingPointError, match=f"at step {failed}.*step 0"):
            trainer.walk(
                fip_dataset(model, x, batch_size=8, seed=0, reference=reference), 3, verbose=0
            )
        for a, b in zip(_weights(model), start):
            np.testing.assert_array_equal(a, b)
    # A recorded point between measured steps is checked before the path keeps it.
    model = _model()
    start = _weights(model)
    trainer = FIPTrainer(
        model,
        measure_every=5,
        secondary_objective=lambda network, batch: (
            10.0 * tf.reduce_sum(tf.square(network.trainable_variables[0]))
        ),
    )
    trainer.compile(optimizer=keras.optimizers.SGD(1e38))
    path = Path(model, record_every=1)
    with pytest.raises(FloatingPointError, match="at step 1.*step 0"):
        trainer.walk(fip_dataset(model, x, batch_size=8, seed=0), 3, path=path, verbose=0)
    assert list(path.steps) == [0]
    for a, b in zip(_weights(model), start):
        np.testing.assert_array_equal(a, b)


def test_walks_on_one_path_number_steps_on_and_end_at_the_model():
    x, y = _data()
    model = _model()
    trainer = FIPTrainer(model, secondary_loss=_loss())
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    path = Path(model, record_every=3)
    data = fip_dataset(model, x, secondary=(x, y), batch_size=8, seed=0)
    first = trainer.walk(data, 4, path=path, verbose=0)
    assert list(path.steps) == [0, 3, 4]
    for a, b in zip(path.weights(-1), _weights(model)):
        np.testing.assert_array_equal(a, b)
    second = trainer.walk(data, 4, path=path, verbose=0)
    assert list(path.steps) == [0, 3, 4, 6, 8]  # Steps 5..8, none counted twice.
    for a, b in zip(path.weights(-1), _weights(model)):
        np.testing.assert_array_equal(a, b)
    assert len(first["distance"]) == len(second["distance"]) == 4
    np.testing.assert_array_equal(
        path.metrics["distance"][[2, 4]], [first["distance"][-1], second["distance"][-1]]
    )


def _bn_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="hidden"),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="logits"),
        ]
    )


@pytest.mark.parametrize("every, failing, kept", [(3, 5, 3), (3, 6, 3), (3, 2, 0), (1, 5, 4)])
def test_guard_returns_to_the_last_measured_point_with_its_statistics(every, failing, kept):
    x, y = _data()
    start = _bn_model()

    def walk(steps, fail_at=None):
        model = _copy(start)
        trainer = FIPTrainer(
            model,
            training=True,
            measure_every=every,
            secondary_objective=_NaNAfter(fail_at or steps + 1),
        )
        trainer.compile(optimizer=keras.optimizers.SGD(0.05))
        path = Path(model, record_every=every)
        data = fip_dataset(model, x, batch_size=8, seed=0)
        return trainer, path, model, lambda: trainer.walk(data, steps, path=path, verbose=0)

    if kept:
        _, _, reference, run = walk(kept)
        run()
    else:
        reference = start
    _, path, model, run = walk(6, fail_at=failing)
    with pytest.raises(FloatingPointError, match=f"at step {failing}.*step {kept}"):
        run()
    # Weights and moving statistics are those of step `kept`, exactly.
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    if every > 1:  # Recorded every `measure_every` steps, the path holds that point.
        assert kept in list(path.steps)
        for a, b in zip(path.weights(list(path.steps).index(kept)), _weights(model)):
            np.testing.assert_array_equal(a, b)


def test_start_reference_with_sparse_measuring_needs_the_start_outputs():
    x, y = _data()
    model = _model()
    trainer = FIPTrainer(model, secondary_loss=_loss(), measure_every=2)
    trainer.compile()
    data = fip_dataset(model, x, secondary=(x, y), batch_size=8, reference="local")
    with pytest.raises(ValueError, match="anchor_outputs"):
        trainer.walk(data, 2, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in _weights(model))


def test_measure_every_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="measure_every=0"):
        FIPTrainer(_model(), measure_every=0)
