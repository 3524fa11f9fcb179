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
from tests.operations.compress_common import SHORT
from tests.operations.compress_common import digest as _digest
from tests.operations.compress_common import walk as _walk
from tests.operations.compress_common import weights as _weights
from tests.operations.compress_common import zeros as _zeros
from tests.operations.contract import run_operation_contract


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
