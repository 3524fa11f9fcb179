import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
import keras_fip.operations
from keras_fip import data
from keras_fip import models
from keras_fip.core import projection
from keras_fip.operations import compress as compress_lib
from keras_fip.operations.compress import Compress
from keras_fip.operations.compress import Prunable
from keras_fip.operations.compress import Saliency
from keras_fip.operations.compress import Schedule
from keras_fip.operations.shrink import shrink
from tests.operations.contract import KillAt
from tests.operations.contract import run_operation_contract

# The walk of the quick tests: the budget exactly as given (no step floor).
SHORT = Schedule(min_steps=0)


def _walk(**kwargs):
    return keras_fip.Walk(**{"verbose": 0, **kwargs})


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    x, y = data.load("digits")
    model = models.mlp(64, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=10, batch_size=64, learning_rate=3e-3)
    return model, x, y


def _digest(model):
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def _zeros(model):
    return {v.path: np.asarray(v.numpy() == 0) for v in projection.prunable_variables(model)}


def _weights(model):
    return [w.numpy() for w in model.weights]


def test_compress_reaches_exact_sparsity_without_mutating_input(trained):
    model, x, y = trained
    before = _digest(model)
    op = Compress(0.9, data=x, schedule=SHORT, walk=_walk(epochs=2, batch_size=64, seed=0))
    sparse = op(model)
    assert _digest(model) == before
    sizes = sum(int(np.prod(v.shape)) for v in projection.prunable_variables(sparse))
    zeros = sum(int(z.sum()) for z in _zeros(sparse).values())
    assert zeros == round(0.9 * sizes)
    assert set(keras_fip.masks(sparse)) == {v.path for v in projection.prunable_variables(sparse)}
    assert set(op.history["layer_sparsity"]) == set(keras_fip.masks(sparse))
    assert op.history["steps"] == 2 * int(np.ceil(len(x) / 64))
    assert len(op.path) > 0 and "distance" in op.history


def test_compress_keeps_function_better_than_bare_projection(trained):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    projected = keras_fip.engine.copy_model(model)
    keras_fip.engine.apply_masks(projected, projection.magnitude_masks(projected, 0.9))
    walk = _walk(epochs=3, batch_size=64, rule=keras_fip.rules.Penalty(1e-2), seed=0)
    sparse = Compress(0.9, data=x, schedule=SHORT, walk=walk)(model)
    fip = models.evaluate_classifier(sparse, x_test, y_test)["accuracy"]
    assert fip > models.evaluate_classifier(projected, x_test, y_test)["accuracy"] + 0.05
    assert fip > 0.85


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_masks_stay_exactly_zero_under_later_training(trained, scope):
    model, x, y = trained
    sparse = Compress(
        0.8,
        data=(x, y),
        labels=1.0,
        saliency=Saliency(scope=scope),
        schedule=SHORT,
        walk=_walk(epochs=1, batch_size=64),
    )(model)
    zeros = _zeros(sparse)
    if scope == "per_layer":
        for zero in zeros.values():
            assert zero.sum() == round(0.8 * zero.size)
    models.train_classifier(sparse, x, y, epochs=1, batch_size=64, learning_rate=1e-2)
    for path, zero in _zeros(sparse).items():
        np.testing.assert_array_equal(zero, zeros[path])


def test_sparsity_survives_keras_save_load_and_savedmodel_export(trained, tmp_path):
    model, x, _ = trained
    sparse = Compress(0.9, data=x, schedule=SHORT, walk=_walk(epochs=1, batch_size=64))(model)
    path = str(tmp_path / "sparse.keras")
    sparse.save(path)
    restored = keras.saving.load_model(path)
    for name, zero in _zeros(sparse).items():
        np.testing.assert_array_equal(_zeros(restored)[name], zero)
    assert set(keras_fip.masks(restored)) == set(keras_fip.masks(sparse))
    keras_fip.export(sparse, str(tmp_path / "serving"))
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    np.testing.assert_allclose(loaded.serve(x[:16]), sparse(x[:16]), atol=1e-5)
    exported = {v.name.split(":")[0]: v.numpy() for v in loaded.variables}
    kernels = [v for v in exported.values() if v.ndim == 2]
    zero_count = sum(int(np.sum(k == 0)) for k in kernels)
    assert zero_count == sum(int(z.sum()) for z in _zeros(sparse).values())


def test_nodes_structure_zeroes_whole_units_and_shrinks(trained):
    model, x, _ = trained
    sparse = Compress(
        0.5,
        data=x,
        structure="nodes",
        saliency=Saliency(scope="per_layer"),
        schedule=SHORT,
        walk=_walk(epochs=1, batch_size=64, seed=0),
    )(model)
    hidden = sparse.get_layer("dense_1").kernel.numpy()
    dead = np.all(hidden == 0, axis=0)
    assert dead.sum() == 32
    # The output layer keeps every class.
    assert not np.any(np.all(sparse.get_layer("logits").kernel.numpy() == 0, axis=0))
    smaller = shrink(sparse)
    assert smaller.get_layer("dense_1").units == 32
    np.testing.assert_allclose(smaller(x[:16]), sparse(x[:16]), atol=1e-4)


def test_existing_masks_are_kept_and_count(trained):
    model, x, _ = trained
    walk = _walk(epochs=1, batch_size=64)
    first = Compress(0.5, data=x, schedule=SHORT, walk=walk)(model)
    second = Compress(0.8, data=x, schedule=SHORT, walk=walk)(first)
    for path, mask in keras_fip.masks(first).items():
        assert not (keras_fip.masks(second)[path] & ~mask).any()
    assert projection.prunable_sparsity(second) == pytest.approx(0.8, abs=1e-3)


def test_chain_equals_sequential_application(trained):
    model, x, _ = trained
    walk = _walk(epochs=1, batch_size=64, seed=0)
    ops = [
        Compress(0.5, data=x, schedule=SHORT, walk=walk),
        Compress(0.7, data=x, schedule=SHORT, walk=walk),
    ]
    keras.utils.set_random_seed(1)
    chained = keras_fip.operations.chain(*ops)(model)
    keras.utils.set_random_seed(1)
    sequential = ops[1](ops[0](model))
    for a, b in zip(chained.get_weights(), sequential.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_operation_called_on_two_models_and_twice_gives_independent_results(trained):
    model, x, y = trained
    other = models.mlp(16, input_shape=(8, 8, 1))
    models.train_classifier(other, x, y, epochs=2, batch_size=64)
    shared = Compress(0.6, data=(x, y), walk=_walk(steps=12, seed=0))

    def fresh(m):
        keras.utils.set_random_seed(3)
        op = Compress(0.6, data=(x, y), walk=_walk(steps=12, seed=0))
        return _weights(op(m)), op.history

    keras.utils.set_random_seed(3)
    first = _weights(shared(model))
    keras.utils.set_random_seed(3)
    second = _weights(shared(other))
    other_history = shared.history
    keras.utils.set_random_seed(3)
    again = _weights(shared(model))
    expected, expected_history = fresh(model)
    for a, b, c in zip(first, again, expected):
        np.testing.assert_allclose(a, c, atol=1e-6)
        np.testing.assert_allclose(b, c, atol=1e-6)
    expected_other, history = fresh(other)
    for a, b in zip(second, expected_other):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert other_history["beta"] == pytest.approx(history["beta"])
    assert shared.history["beta"] == pytest.approx(expected_history["beta"])
    assert shared.history["learning_rate"] == pytest.approx(expected_history["learning_rate"])
    # Nothing of a call but its path, history and sparsity summary is kept on the operation.
    assert set(vars(shared)) == set(vars(Compress(0.6)))


def test_get_config_round_trip():
    op = Compress(
        0.99,
        labels=3.0,
        structure="nodes",
        saliency=Saliency("metric", scope="per_layer", examples=64),
        prunable=Prunable(embeddings=False, biases=True),
        schedule=Schedule(min_steps=0, pull_fraction=0.5, update_every=7),
        walk=keras_fip.Walk(epochs=3, beta=0.5, seed=1),
    )
    clone = Compress.from_config(op.get_config())
    assert clone.get_config() == op.get_config()
    assert clone.saliency == op.saliency and clone.schedule == op.schedule
    assert clone.prunable == op.prunable and clone.walk == op.walk
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
    assert restored.get_config() == op.get_config()


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: Compress(1.0), "`sparsity`"),
        (lambda: Compress(-0.5), "`sparsity`"),
        (lambda: Compress(0.5, structure="blocks"), "`structure`"),
        (lambda: Compress(0.9, structure="2:4"), "`sparsity`"),
        (lambda: Compress(0.5, saliency="hessian"), "`saliency`"),
        (lambda: Compress(0.5, saliency=Saliency(scope="layer")), "`scope`"),
        (lambda: Compress(0.5, saliency=Saliency(layer_floor=2.0)), "`layer_floor`"),
        (lambda: Compress(0.5, saliency=Saliency("metric", examples=0)), "`examples`"),
        (lambda: Saliency("hessian"), "`criterion`"),
        (lambda: Compress(0.5, prunable={"weights": True}), "weights"),
        (lambda: Prunable(biases="yes"), "`biases`"),
        (lambda: Compress(0.5, schedule=3), "`schedule`"),
        (lambda: Schedule(min_steps=-1), "`min_steps`"),
        (lambda: Schedule(pull_fraction=1.5), "`pull_fraction`"),
        (lambda: Schedule(update_every="often"), "`update_every`"),
        (lambda: Schedule(update_every=0), "`update_every`"),
        (lambda: Compress(0.5, labels="often"), "`labels`"),
        (lambda: Compress(0.5, labels=-1.0), "`labels`"),
        (lambda: Compress(0.5, labels=True), "`labels`"),
        (lambda: Compress(0.5, labels=float("nan")), "`labels`"),
        (lambda: Compress(0.5, walk=keras_fip.Walk(epochs=0)), "`epochs`"),
        (lambda: Compress(0.5, data=np.full((4, 8, 8, 1), np.nan, "float32")), "`data`"),
        (lambda: Compress(0.5, validation_data=np.zeros((4, 8, 8, 1))), "`validation_data`"),
    ],
)
def test_bad_arguments_fail_in_init(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_old_keywords_are_gone():
    for keyword in ("epochs", "steps", "task_weight", "learning_rate", "scope", "seed", "beta"):
        with pytest.raises(TypeError, match=keyword):
            Compress(0.5, **{keyword: 1})


def test_data_that_does_not_fit_the_model_fails_before_any_work(trained):
    model, x, y = trained
    before = _digest(model)
    with pytest.raises(ValueError, match="`data`"):
        Compress(0.5, data=np.zeros((8, 28, 28, 1), "float32"))(model)
    with pytest.raises(ValueError, match="`validation_data`"):
        Compress(0.5, data=(x, y), validation_data=(np.zeros((8, 6, 6, 1)), y[:8]))(model)
    with pytest.raises(ValueError, match="`data`"):
        Compress(0.5, data=(x, np.full(len(x), 12)))(model)  # Labels beyond the outputs.
    assert _digest(model) == before


def test_2_4_structure_on_kernels_it_cannot_split_fails_before_any_work():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="multiple of 4"):
        Compress(0.5, data=np.zeros((8, 6), "float32"), structure="2:4")(model)


def test_model_with_nothing_prunable_is_a_clear_error():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.LayerNormalization()(inputs))
    with pytest.raises(ValueError, match="prunable"):
        Compress(0.5, data=np.zeros((8, 4), "float32"))(model)


def test_no_data_and_none_carried_is_a_clear_error(trained):
    model, _, _ = trained
    with pytest.raises(ValueError, match="`data`"):
        Compress(0.5)(model)


@pytest.mark.parametrize("structure, sparsity", [("unstructured", 0.8), ("filters", 0.5)])
def test_compress_handles_a_residual_network_with_batch_norm(structure, sparsity):
    keras.utils.set_random_seed(0)
    model = models.resnet(20, width_multiplier=0.25, input_shape=(8, 8, 3), num_classes=4)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    before = _digest(model)
    op = Compress(
        sparsity,
        data=x,
        structure=structure,
        schedule=SHORT,
        walk=_walk(epochs=2, batch_size=32, seed=0),
    )
    sparse = op(model)
    assert _digest(model) == before
    variables = projection.prunable_variables(sparse)
    assert any(len(v.shape) == 4 for v in variables)
    pruned = [v for v in variables if v.path in keras_fip.masks(sparse)]
    if structure == "filters":
        assert all(len(v.shape) == 4 for v in pruned)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in pruned)
    assert zeros / sum(int(np.prod(v.shape)) for v in pruned) == pytest.approx(sparsity, abs=0.02)
    for variable in pruned:
        mask = keras_fip.masks(sparse)[variable.path]
        assert np.all(variable.numpy()[~mask] == 0)
        if structure == "filters" and len(variable.shape) == 4:
            # Whole output filters: a filter is all zero or untouched by the mask.
            per_filter = mask.reshape(-1, mask.shape[-1])
            assert np.all(per_filter.all(axis=0) | ~per_filter.any(axis=0))
    assert np.all(np.isfinite(sparse.predict(x, verbose=0)))


@pytest.fixture(scope="module")
def trained_conv():
    """A 5k-weight conv net with BatchNormalization on 8×8 digits (~96% test accuracy)."""
    keras.utils.set_random_seed(0)
    x, y = data.load("digits")
    inputs = keras.Input(x.shape[1:])
    hidden = inputs
    for filters in (16, 32):
        hidden = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(hidden)
        hidden = keras.layers.BatchNormalization(momentum=0.9)(hidden)
        hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    models.train_classifier(model, x, y, epochs=15, batch_size=64, learning_rate=3e-3)
    return model, x, y


def test_compress_keeps_the_accuracy_of_a_batch_norm_conv_net(trained_conv):
    # The walk runs BatchNormalization on batch statistics and β is scaled to the metric
    # ("auto"): with frozen statistics and β = 1 this net falls far below its dense
    # accuracy as the mask goes on.
    model, x, _ = trained_conv
    x_test, y_test = data.load("digits", "test")
    base = models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    assert base > 0.9
    op = Compress(0.8, data=x, schedule=SHORT, walk=_walk(epochs=20, batch_size=64, seed=0))
    sparse = op(model)
    assert projection.prunable_sparsity(sparse) == pytest.approx(0.8, abs=1e-3)
    assert op.history["beta"] > 100.0  # The metric of this small net is steep.
    assert op.history["training"] is True
    accuracy = models.evaluate_classifier(sparse, x_test, y_test)["accuracy"]
    assert accuracy >= 0.9 * base
    # The moving statistics were re-estimated for the final weights: recalibrating again
    # changes nothing but batch-composition noise.
    statistics = [v.numpy() for v in sparse.non_trainable_variables]
    keras_fip.engine.recalibrate_batch_normalization(sparse, x, batch_size=128)
    for before, variable in zip(statistics, sparse.non_trainable_variables):
        np.testing.assert_allclose(before, variable.numpy(), rtol=0.05, atol=1e-3)


def test_training_mode_and_beta_come_from_the_walk(trained_conv, trained):
    conv, x, _ = trained_conv
    mlp, x_mlp, _ = trained
    for model, inputs, training, expected in (
        (conv, x, None, True),
        (mlp, x_mlp, None, False),
        (conv, x, False, False),
    ):
        op = Compress(
            0.5,
            data=inputs[:128],
            schedule=SHORT,
            walk=_walk(epochs=1, batch_size=64, training=training, beta=1.0),
        )
        op(model)
        assert op.history["training"] is expected
        assert op.history["beta"] == 1.0


def test_auto_beta_is_the_engine_rule_with_compress_strength(trained):
    model, x, _ = trained
    op = Compress(0.5, data=x[:256], walk=_walk(steps=4, seed=0))
    op(model)
    variables = op.prunable_variables(model)
    expected = keras_fip.engine.beta.auto_beta(
        compress_lib.STRENGTH, model, x[:256], "kl", "weights", variables, seed=0
    )
    assert op.history["beta"] == pytest.approx(expected, rel=1e-5)


def test_metric_saliency_reaches_exact_sparsity_and_keeps_the_function(trained):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    # β = 1: the metric picks targets the outputs barely resist. A short walk with one
    # target update (update_every=50).
    op = Compress(
        0.9,
        data=x,
        saliency=Saliency("metric", examples=256),
        schedule=Schedule(min_steps=0, update_every=50),
        walk=_walk(epochs=3, batch_size=64, rule=keras_fip.rules.Penalty(1e-2), beta=1.0, seed=0),
    )
    sparse = op(model)
    sizes = sum(int(np.prod(v.shape)) for v in projection.prunable_variables(sparse))
    zeros = sum(int(z.sum()) for z in _zeros(sparse).values())
    assert zeros == round(0.9 * sizes)
    projected = keras_fip.engine.copy_model(model)
    keras_fip.engine.apply_masks(projected, projection.magnitude_masks(projected, 0.9))
    accuracy = models.evaluate_classifier(sparse, x_test, y_test)["accuracy"]
    assert accuracy > models.evaluate_classifier(projected, x_test, y_test)["accuracy"] + 0.05
    assert accuracy > 0.8


def test_compress_of_a_batch_norm_net_runs_under_mirrored_strategy(mirrored_strategy):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(2.0, 3.0, (128, 6)).astype("float32")
    with mirrored_strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(16),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.Dense(3),
            ]
        )
        op = Compress(0.75, data=x, schedule=SHORT, walk=_walk(epochs=2, batch_size=32, seed=0))
        sparse = op(model)
    assert op.history["training"] is True
    assert projection.prunable_sparsity(sparse) == pytest.approx(0.75, abs=1e-3)
    norm = [layer for layer in sparse.layers if isinstance(layer, keras.layers.BatchNormalization)][
        0
    ]
    # The statistics moved from their initial (0, 1) to those of the data.
    assert np.all(np.isfinite(norm.moving_mean.numpy()))
    assert not np.allclose(norm.moving_variance.numpy(), 1.0)
    assert np.all(np.isfinite(sparse.predict(x, verbose=0)))


def test_compress_meets_the_operation_contract():
    run_operation_contract(
        lambda model, x, y: keras_fip.Compress(0.5, data=x, walk=_walk(steps=8, seed=0))
    )


def _checkpointed(x, directory=None, callbacks=None, sparsity=0.8, **kwargs):
    return Compress(
        sparsity,
        data=x,
        saliency=Saliency("metric", examples=64),
        schedule=Schedule(update_every=10),
        walk=_walk(
            steps=40,
            beta=0.5,
            record_every=5,
            seed=0,
            checkpoint_directory=directory,
            callbacks=callbacks,
        ),
        **kwargs,
    )


def test_killed_walk_resumes_from_checkpoint_to_the_same_weights(trained, tmp_path):
    model, x, _ = trained
    x = x[:512]
    reference_op = _checkpointed(x)
    reference = reference_op(model)
    for killed_at in (17, 36):  # In the pull phase (28 steps); in the settle phase.
        directory = str(tmp_path / f"checkpoint_{killed_at}")
        with pytest.raises(KeyboardInterrupt):
            _checkpointed(x, directory, [KillAt(killed_at)])(model)
        op = _checkpointed(x, directory)
        resumed = op(model)
        for expected, actual in zip(reference.trainable_variables, resumed.trainable_variables):
            np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-5)
        assert keras_fip.masks(resumed).keys() == keras_fip.masks(reference).keys()
        for key, mask in keras_fip.masks(reference).items():
            np.testing.assert_array_equal(keras_fip.masks(resumed)[key], mask)
        assert op.path.steps.tolist() == reference_op.path.steps.tolist()
        np.testing.assert_allclose(
            op.path.weights(-1)[0], reference_op.path.weights(-1)[0], atol=1e-5
        )
        assert len(op.history["distance"]) == 40
        np.testing.assert_allclose(
            op.history["distance"], reference_op.history["distance"], rtol=1e-5, atol=1e-7
        )
    # A finished walk called again returns the same model without walking.
    again = _checkpointed(x, directory)(model)
    for expected, actual in zip(resumed.trainable_variables, again.trainable_variables):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy())


def test_killed_choice_on_validation_data_resumes_every_candidate(trained, tmp_path):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    labelled = (x[:512], y[:512])

    def compress(directory=None, callbacks=None):
        return Compress(
            0.8,
            data=labelled,
            validation_data=(x_test, y_test),
            schedule=Schedule(update_every=10),
            walk=_walk(
                steps=30,
                record_every=5,
                seed=0,
                checkpoint_directory=directory,
                callbacks=callbacks,
            ),
        )

    reference_op = compress()
    reference = reference_op(model)
    directory = str(tmp_path / "checkpoint")
    with pytest.raises(KeyboardInterrupt):
        compress(directory, [KillAt(45)])(model)  # In the second candidate's walk.
    op = compress(directory)
    resumed = op(model)
    assert op.history["labels_selection"] == reference_op.history["labels_selection"]
    for expected, actual in zip(reference.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-5)


def test_checkpoint_of_another_config_or_model_is_refused(trained, tmp_path):
    model, x, _ = trained
    x = x[:256]
    directory = str(tmp_path / "checkpoint")
    _checkpointed(x, directory, sparsity=0.5)(model)
    with pytest.raises(ValueError, match="another config"):
        _checkpointed(x, directory, sparsity=0.6)(model)
    other = keras_fip.engine.copy_model(model)
    other.trainable_variables[0].assign(other.trainable_variables[0] + 1.0)
    with pytest.raises(ValueError, match="another model"):
        _checkpointed(x, directory, sparsity=0.5)(other)


def test_walk_measures_exactly_at_the_recorded_points(trained):
    # Operations walk with `FIPTrainer(measure_every=record_every)`: the step length and
    # the distance from the start are measured at multiples of `record_every` and at each
    # phase's last step, so every point of the path carries them; other steps hold NaN.
    model, x, _ = trained
    op = Compress(0.5, data=x[:256], walk=_walk(steps=22, record_every=4, batch_size=64, seed=0))
    op(model)
    norms = np.asarray(op.history["step_norm"])
    assert norms.shape == (22,)
    pull = op.history["pull_steps"]
    assert 0 < pull < 22 and pull % 4  # a phase end off the multiples
    measured = {step for step in range(4, 23, 4)} | {pull, 22}
    assert {int(i) + 1 for i in np.flatnonzero(np.isfinite(norms))} == measured
    assert np.all(
        np.isfinite(
            np.asarray(op.history["distance_from_start"])[sorted(step - 1 for step in measured)]
        )
    )
    assert set(op.path.steps[1:]) == measured
    recorded = op.path.metrics
    for name in ("step_norm", "distance_from_start"):
        assert np.all(np.isfinite(recorded[name][1:])) and np.all(recorded[name][1:] > 0)


def test_path_streams_to_the_walks_directory(trained, tmp_path):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    directory = str(tmp_path / "path")
    op = Compress(
        0.5,
        data=(x[:256], y[:256]),
        validation_data=(x_test, y_test),
        walk=_walk(steps=10, record_every=5, seed=0, path_directory=directory),
    )
    op(model)
    loaded = keras_fip.Path.load(directory)
    assert loaded.steps.tolist() == op.path.steps.tolist() == [0, 5, 7, 10]


# Labels used by default, inputs only one argument away


@pytest.fixture(scope="module")
def underfit():
    """A digits MLP trained for one epoch (~80%): where the labels know more than the
    dense network's outputs."""
    keras.utils.set_random_seed(0)
    x, y = data.load("digits")
    model = models.mlp(64, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=1, batch_size=64, learning_rate=1e-3)
    return model, x, y


def test_labels_are_used_by_default_and_beat_inputs_only_where_they_matter(underfit):
    model, x, y = underfit
    x_test, y_test = data.load("digits", "test")
    before = _digest(model)
    walk = _walk(steps=60, batch_size=64, seed=0)
    labelled = Compress(0.5, data=(x, y), walk=walk)
    with_labels = labelled(model)
    inputs_only = Compress(0.5, data=(x, y), labels=False, walk=walk)
    without = inputs_only(model)
    assert _digest(model) == before
    assert labelled.history["task_weight"] > 0.0
    assert inputs_only.history["task_weight"] == 0.0
    assert not all(
        np.array_equal(a, b) for a, b in zip(with_labels.get_weights(), without.get_weights())
    )
    dense = models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    accuracy = models.evaluate_classifier(with_labels, x_test, y_test)["accuracy"]
    kept = models.evaluate_classifier(without, x_test, y_test)["accuracy"]
    assert kept < dense + 0.03  # The walk on the inputs keeps the underfit function.
    assert accuracy > kept + 0.05
    assert projection.prunable_sparsity(with_labels) == pytest.approx(0.5, abs=1e-3)


def test_the_held_out_choice_is_counted_in_the_history(underfit):
    model, x, y = underfit
    op = Compress(0.5, data=(x, y), walk=_walk(steps=12, batch_size=64, seed=0))
    op(model)
    _, held_rows = keras_fip.core.tuning.validation_rows(y, compress_lib.SELECTION_FRACTION, 0)
    selection = op.history["labels_selection"]
    assert selection["validation"] == "held_out"
    assert selection["validation_examples"] == len(held_rows)
    candidates = selection["candidates"]
    assert [(c["task_weight"], c["learning_rate_factor"]) for c in candidates] == list(
        compress_lib.CANDIDATES
    )
    wins, losses, chosen = selection["wins"], selection["losses"], selection["chosen"]
    if chosen:
        # Right on (wins - losses) more held-out examples than the walk on the inputs alone.
        gain = candidates[chosen]["validation_accuracy"] - candidates[0]["validation_accuracy"]
        assert gain * len(held_rows) == pytest.approx(wins - losses)
        assert wins - losses > np.sqrt(wins + losses)
    assert op.history["task_weight"] == candidates[chosen]["task_weight"]
    assert op.history["selection_steps"] == 12 * len(compress_lib.CANDIDATES)
    assert op.history["total_steps"] == 12 + op.history["selection_steps"]
    assert op.history["steps"] == 12 and len(op.history["distance"]) == 12


def test_the_choice_on_validation_data_returns_the_chosen_walk(underfit):
    model, x, y = underfit
    x_test, y_test = data.load("digits", "test")
    op = Compress(0.5, data=(x, y), validation_data=(x_test, y_test), walk=_walk(steps=12, seed=0))
    sparse = op(model)
    selection = op.history["labels_selection"]
    assert selection["validation"] == "validation_data"
    assert selection["validation_examples"] == len(y_test)
    chosen = selection["candidates"][selection["chosen"]]
    # The returned network is the chosen walk itself, on all of `data`.
    accuracy = models.evaluate_classifier(sparse, x_test, y_test)["accuracy"]
    assert accuracy == pytest.approx(chosen["validation_accuracy"], abs=1e-9)
    assert op.history["task_weight"] == chosen["task_weight"]
    assert op.history["selection_steps"] == 12 * (len(compress_lib.CANDIDATES) - 1)
    assert op.path.steps[-1] == 12


def test_labels_are_weighted_in_only_when_a_sign_test_says_they_help():
    choose = compress_lib.choose_candidate
    zero = np.array([True] * 80 + [False] * 20)
    better = zero.copy()
    better[80:90] = True  # Right on 10 more examples, wrong on none: 10 > sqrt(10).
    assert choose([zero, better]) == (1, 10, 0)
    barely = better.copy()
    barely[:4] = False  # 10 wins, 4 losses: 6 > sqrt(14).
    assert choose([zero, barely]) == (1, 10, 4)
    noise = zero.copy()
    noise[80:83], noise[:1] = True, False  # 3 wins, 1 loss: 2 < 2.
    assert choose([zero, noise]) == (0, 3, 1)
    assert choose([zero, zero.copy()]) == (0, 0, 0)  # Ties: the inputs alone.
    assert choose([zero, ~zero])[0] == 0
    assert choose([zero, barely, better]) == (2, 10, 0)  # The most accurate of several.


def test_inputs_only_is_one_argument_away_and_equals_the_walk_without_labels(trained):
    model, x, y = trained
    x, y = x[:256], y[:256]

    def walk(data, **kwargs):
        keras.utils.set_random_seed(0)
        op = Compress(0.5, data=data, walk=_walk(steps=6, seed=0), **kwargs)
        return op, [w.numpy() for w in op(model).weights]

    unlabelled, without_labels = walk(x)
    zero, labels_ignored = walk((x, y), labels=False)
    for a, b in zip(without_labels, labels_ignored):
        np.testing.assert_array_equal(a, b)
    for op in (unlabelled, zero):
        assert op.history["task_weight"] == 0.0 and op.history["selection_steps"] == 0
        assert "labels_selection" not in op.history


def test_a_given_weight_changes_the_walk_only_with_labels(trained):
    model, x, y = trained
    x, y = x[:128], y[:128]

    def weights(data, labels):
        keras.utils.set_random_seed(0)  # The walk's random ops depend on the global state.
        op = Compress(0.5, data=data, labels=labels, walk=_walk(steps=6, seed=0))
        return [w.numpy() for w in op(model).weights], op.history

    labelled, history = weights((x, y), 1.0)
    assert history["task_weight"] == 1.0 and "labels_selection" not in history
    assert max(history["secondary_loss"]) > 0.0
    unlabelled, _ = weights((x, y), False)
    assert not all(np.array_equal(u, v) for u, v in zip(labelled, unlabelled))
    inputs_one, _ = weights(x, 1.0)
    inputs_zero, _ = weights(x, False)
    assert all(np.array_equal(u, v) for u, v in zip(inputs_one, inputs_zero))


def test_few_labels_take_the_inputs_alone_without_a_choice(trained):
    model, x, y = trained
    count = int(compress_lib.SELECTION_MIN_EXAMPLES / compress_lib.SELECTION_FRACTION) - 10
    op = Compress(0.5, data=(x[:count], y[:count]), walk=_walk(steps=6, seed=0))
    op(model)
    assert op.history["task_weight"] == 0.0
    assert op.history["selection_steps"] == 0
    assert op.history["labels_selection"]["validation_examples"] < 100


def test_labels_round_trip_through_the_config():
    for labels, expected in (("auto", "auto"), (False, 0.0), (0.0, 0.0), (3.0, 3.0)):
        op = Compress(0.5, labels=labels)
        assert op.labels == expected
        assert Compress.from_config(op.get_config()).labels == expected
    assert Compress(0.5).labels == "auto"


def test_compress_with_labels_meets_the_operation_contract():
    from tests.operations.contract import contract_data

    labelled = contract_data(700)  # 140 held out: the weight of the labels is chosen.
    results = run_operation_contract(
        lambda model, x, y: keras_fip.Compress(0.5, data=labelled, walk=_walk(steps=8, seed=0)),
        models=("sequential",),
    )
    for result in results.values():
        assert projection.prunable_sparsity(result) == pytest.approx(0.5, abs=1e-3)


# What is pruned: the set tfmot prunes, and the zero fraction of all parameters


@keras.saving.register_keras_serializable(package="keras_fip_tests")
class _TokenEmbedding(keras.layers.Layer):
    """A custom layer holding an Embedding, as the keras.io transformer example writes it."""

    def __init__(self, vocabulary, width, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.width = vocabulary, width
        self.table = keras.layers.Embedding(vocabulary, width, name="table")

    def call(self, ids):
        return self.table(ids)

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary, "width": self.width}


def _attention_classifier():
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    tokens = _TokenEmbedding(40, 8, name="tokens")(ids)
    attended = keras.layers.MultiHeadAttention(2, 4, name="attention")(tokens, tokens)
    hidden = keras.layers.LayerNormalization(name="norm")(tokens + attended)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(pooled)
    return keras.Model(ids, outputs)


def test_default_prunable_set_is_tfmots_embeddings_and_attention_included():
    model = _attention_classifier()
    paths = [v.path for v in projection.prunable_variables(model)]
    assert paths == [
        "tokens/table/embeddings",
        "attention/query/kernel",
        "attention/key/kernel",
        "attention/value/kernel",
        "attention/attention_output/kernel",
        "head/kernel",
    ]
    without = projection.prunable_variables(model, include_embeddings=False)
    assert [v.path for v in without] == paths[1:]


def test_compress_prunes_embeddings_and_attention_kernels_exactly():
    model = _attention_classifier()
    ids = np.random.default_rng(0).integers(0, 40, (128, 6)).astype("int32")
    before = _digest(model)
    op = Compress(0.6, data=ids, walk=_walk(steps=8, batch_size=32, seed=0))
    sparse = op(model)
    assert _digest(model) == before
    variables = projection.prunable_variables(sparse)
    total = sum(int(np.prod(v.shape)) for v in variables)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables)
    assert zeros == round(0.6 * total)
    assert set(keras_fip.masks(sparse)) == {v.path for v in variables}
    table = sparse.get_layer("tokens").table.embeddings.numpy()
    assert 0 < np.mean(table == 0) < 1
    assert op.history["prunable_sparsity"] == zeros / total
    without = Compress(0.6, data=ids, prunable=Prunable(embeddings=False), walk=_walk(steps=4))
    dense_table = without(model)
    assert not np.any(dense_table.get_layer("tokens").table.embeddings.numpy() == 0)
    assert "tokens/table/embeddings" not in keras_fip.masks(dense_table)


def test_history_reports_the_zero_fraction_of_all_parameters_exactly():
    model = _attention_classifier()
    ids = np.random.default_rng(0).integers(0, 40, (128, 6)).astype("int32")
    op = Compress(0.6, data=ids, walk=_walk(steps=8, batch_size=32, seed=0))
    sparse = op(model)
    weights = [np.asarray(w) for w in sparse.get_weights()]
    parameters = sum(w.size for w in weights)
    zeros = sum(int(np.sum(w == 0)) for w in weights)
    assert parameters == sparse.count_params() == op.history["parameters"]
    assert op.history["parameter_sparsity"] == zeros / parameters
    assert op.history["parameter_sparsity"] < op.history["prunable_sparsity"]
    summary = projection.sparsity_summary(sparse)
    assert summary == op.sparsity_summary
    assert (summary.zeros, summary.parameters) == (zeros, parameters)
    assert summary.prunable_share == op.history["prunable_parameters"] / parameters
    assert f"sparsity={zeros / parameters:.4f} of all {parameters:,} parameters" in repr(summary)


def test_a_small_prunable_share_is_warned_about():
    model = _attention_classifier()
    ids = np.random.default_rng(0).integers(0, 40, (64, 6)).astype("int32")
    with pytest.warns(UserWarning, match=r"prunable weights of model .* are \d+\.\d% of"):
        op = Compress(
            0.5, data=ids, prunable=Prunable(embeddings=False), walk=_walk(steps=4, seed=0)
        )
        op(model)
    share = op.history["prunable_parameters"] / op.history["parameters"]
    assert share < projection.SMALL_PRUNABLE_SHARE
    assert op.history["parameter_sparsity"] < 0.3  # Half of the prunable weights only.
