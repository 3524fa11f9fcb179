"""Tests for masks: MaskConstraint, apply/strip, MaskedOptimizer, save/load, distribution."""

import hashlib
import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fip.core.copy import copy_model
from keras_fip.core.masks import masks
from keras_fip.engine import MaskConstraint
from keras_fip.engine import MaskedOptimizer
from keras_fip.engine import apply_masks
from keras_fip.engine import sparsity
from keras_fip.engine import strip_masks


@keras.saving.register_keras_serializable(package="keras_fip_test_masks")
class TwoLayerNet(keras.Model):
    """A registered subclassed model."""

    def __init__(self, units=5, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu", name="hidden")
        self.logits = keras.layers.Dense(3, name="logits")

    def call(self, inputs):
        return self.logits(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _functional(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="inputs")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    logits = keras.layers.Dense(3, name="logits")(hidden)
    return keras.Model(inputs, logits, name="functional")


def _sequential(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="sequential",
    )


def _subclassed(seed=0):
    keras.utils.set_random_seed(seed)
    model = TwoLayerNet(units=8, name="subclassed")
    model(np.zeros((1, 6), "float32"))
    return model


BUILDERS = {"functional": _functional, "sequential": _sequential, "subclassed": _subclassed}


def _data(seed=0, n=32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _random_masks(model, seed=0, keep=0.5):
    rng = np.random.default_rng(seed)
    return {v.path: rng.random(tuple(v.shape)) < keep for v in model.trainable_variables}


def _weights_hash(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _assert_masked_zero(model, model_masks):
    by_path = {v.path: v for v in model.weights}
    assert model_masks
    for path, mask in model_masks.items():
        values = by_path[path].numpy()
        assert np.all(values[~mask] == 0.0), path
    return by_path


def _in_order(model, model_masks):
    """Masks keyed by `model`'s paths, as a list aligned with its trainable variables."""
    return [model_masks.get(v.path) for v in model.trainable_variables]


def _assert_same_masks_in_order(model, expected_list):
    """`model` carries exactly `expected_list` (aligned with its trainable variables)."""
    read = masks(model)
    variables = model.trainable_variables
    assert len(read) == sum(m is not None for m in expected_list)
    for variable, expected in zip(variables, expected_list):
        if expected is None:
            assert variable.path not in read
        else:
            np.testing.assert_array_equal(read[variable.path], expected)
            assert np.all(variable.numpy()[~expected] == 0.0), variable.path


# MaskConstraint


def test_mask_constraint_zeroes_masked_entries_after_user_constraint():
    mask = np.array([[True, False], [True, True]])
    constraint = MaskConstraint(mask, constraint=keras.constraints.NonNeg())
    out = np.asarray(constraint(tf.constant([[-1.0, 2.0], [3.0, -4.0]])))
    np.testing.assert_array_equal(out, [[0.0, 0.0], [3.0, 0.0]])


def test_mask_constraint_config_round_trip_is_compact():
    mask = np.random.default_rng(0).random((1000, 1000)) < 0.1
    constraint = MaskConstraint(mask, constraint=keras.constraints.MaxNorm(2.0))
    config = keras.saving.serialize_keras_object(constraint)
    # Packed bits: one byte per 8 weights, base64 ~4/3; far below one char per weight.
    assert len(json.dumps(config)) < 1000 * 1000 / 8 * 4 / 3 + 500
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, MaskConstraint)
    np.testing.assert_array_equal(restored.mask, mask)
    assert isinstance(restored.constraint, keras.constraints.MaxNorm)
    assert restored.constraint.max_value == 2.0


@pytest.mark.parametrize("mask", [np.array([0.0, 0.5, 1.0]), np.array(["a", "b"]), object()])
def test_mask_constraint_rejects_non_binary_masks(mask):
    with pytest.raises(ValueError, match="`mask`"):
        MaskConstraint(mask)


def test_mask_constraint_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        MaskConstraint(np.ones((2, 2), bool))(tf.ones((3, 2)))


# apply_masks / masks / strip_masks


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_apply_masks_zeroes_weights_sets_layer_attribute_and_masks_reads_them(kind):
    model = BUILDERS[kind]()
    wanted = _random_masks(model)
    apply_masks(model, wanted)
    read = masks(model)
    assert sorted(read) == sorted(wanted)
    for path in wanted:
        np.testing.assert_array_equal(read[path], wanted[path])
    _assert_masked_zero(model, wanted)
    hidden = model.get_layer("hidden") if kind != "subclassed" else model.hidden
    assert isinstance(hidden.kernel_constraint, MaskConstraint)
    assert hidden.kernel.constraint is hidden.kernel_constraint


def test_apply_masks_ands_with_existing_mask_and_keeps_user_constraint():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="dense", kernel_constraint=keras.constraints.NonNeg())(
        inputs
    )
    model = keras.Model(inputs, outputs)
    path = model.get_layer("dense").kernel.path
    first = np.random.default_rng(0).random((4, 3)) < 0.6
    second = np.random.default_rng(1).random((4, 3)) < 0.6
    apply_masks(model, {path: first})
    apply_masks(model, {path: second})
    np.testing.assert_array_equal(masks(model)[path], first & second)
    constraint = model.get_layer("dense").kernel.constraint
    assert isinstance(constraint.constraint, keras.constraints.NonNeg)


def test_apply_masks_rejects_bad_input_before_changing_anything():
    model = _functional()
    before = _weights_hash(model)
    good = model.get_layer("hidden").kernel.path
    with pytest.raises(ValueError, match="not variables"):
        apply_masks(model, {good: np.zeros((6, 8), bool), "nope/kernel": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {good: np.zeros((8, 6), bool)})
    with pytest.raises(ValueError, match="one entry"):
        apply_masks(model, [np.zeros((6, 8), bool)])
    with pytest.raises(ValueError, match="`masks`"):
        apply_masks(model, np.zeros((6, 8), bool))
    assert _weights_hash(model) == before
    assert masks(model) == {}


def test_apply_masks_names_layer_without_constraint_attribute():
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), name="scale")

        def call(self, inputs):
            return inputs * self.scale

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Scale(name="my_scale")(inputs))
    path = model.get_layer("my_scale").scale.path
    with pytest.raises(ValueError, match="my_scale.*scale_constraint"):
        apply_masks(model, {path: np.array([True, False, True])})


def test_standard_layers_carry_masks_through_keras_save_load(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = keras.layers.SeparableConv2D(3, 1, name="separable")(x)
    x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = keras.layers.LayerNormalization(name="layer_norm")(x)
    x = keras.layers.Conv1D(2, 1, name="conv1d")(keras.layers.Reshape((4, 3))(x))
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    tokens = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 3, name="embedding")(tokens)
    outputs = outputs + keras.layers.GlobalAveragePooling1D()(embedded)
    model = keras.Model([inputs, tokens], outputs)
    wanted = _random_masks(model, seed=3)
    apply_masks(model, wanted)
    assert model.get_layer("depthwise").depthwise_constraint is not None
    assert model.get_layer("separable").pointwise_constraint is not None
    assert model.get_layer("embedding").embeddings_constraint is not None
    assert model.get_layer("batch_norm").gamma_constraint is not None

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    _assert_same_masks_in_order(loaded, _in_order(model, wanted))


def test_strip_masks_returns_plain_copy_with_zeros_and_user_constraints():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="dense", kernel_constraint=keras.constraints.NonNeg())(
        inputs
    )
    model = keras.Model(inputs, outputs)
    wanted = _random_masks(model, seed=1)
    apply_masks(model, wanted)
    before = _weights_hash(model)
    plain = strip_masks(model)
    assert masks(plain) == {}
    assert isinstance(plain.get_layer("dense").kernel_constraint, keras.constraints.NonNeg)
    assert isinstance(plain.get_layer("dense").kernel.constraint, keras.constraints.NonNeg)
    assert plain.get_layer("dense").bias.constraint is None
    _assert_masked_zero(plain, wanted)
    # The input keeps its masks and weights.
    assert _weights_hash(model) == before
    assert sorted(masks(model)) == sorted(wanted)
    # The config of the stripped model mentions no MaskConstraint.
    assert "MaskConstraint" not in json.dumps(plain.get_config())


def test_sparsity_counts_exact_zeros():
    model = _functional()
    kernel = model.get_layer("hidden").kernel
    mask = np.zeros((6, 8), bool)
    mask[:3] = True
    apply_masks(model, {kernel.path: mask})
    per_variable = sparsity(model, per_variable=True)
    assert per_variable[kernel.path] == pytest.approx(0.5)
    assert per_variable[model.get_layer("logits").bias.path] == 1.0  # Zeros init.
    total = sum(v.numpy().size for v in model.trainable_variables)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in model.trainable_variables)
    assert sparsity(model) == pytest.approx(zeros / total)


# Training keeps the zeros


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        lambda: keras.optimizers.Adam(0.01),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_fit_100_steps_through_masked_optimizer_keeps_exact_zeros(kind, make_optimizer):
    model = BUILDERS[kind]()
    wanted = _random_masks(model)
    apply_masks(model, wanted)
    start = {v.path: v.numpy().copy() for v in model.trainable_variables}
    model.compile(
        optimizer=MaskedOptimizer(make_optimizer()),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    history = model.fit(x, y, batch_size=8, epochs=25, verbose=0)  # 4 steps/epoch.
    assert int(model.optimizer.iterations.numpy()) == 100
    by_path = _assert_masked_zero(model, wanted)
    # The unmasked weights did train.
    for path, mask in wanted.items():
        moved = by_path[path].numpy()[mask] != start[path][mask]
        assert moved.any(), path
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_masked_optimizer_keeps_inner_state_at_zero_on_masked_entries():
    model = _functional()
    wanted = _random_masks(model)
    apply_masks(model, wanted)
    inner = keras.optimizers.Adam(0.01)
    model.compile(
        optimizer=MaskedOptimizer(inner),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    kernel = model.get_layer("hidden").kernel
    mask = wanted[kernel.path]
    slots = [
        v for v in inner.variables if tuple(v.shape) == tuple(kernel.shape) and "hidden" in v.path
    ]
    assert len(slots) == 2  # Adam's two moments for the kernel.
    for slot in slots:
        assert np.all(slot.numpy()[~mask] == 0.0)
        assert np.any(slot.numpy()[mask] != 0.0)


def test_plain_optimizer_keeps_zeros_through_the_constraint():
    model = _sequential()
    wanted = _random_masks(model)
    apply_masks(model, wanted)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, _ = _data()
    model.fit(x, np.ones((32, 3), "float32"), batch_size=8, epochs=3, verbose=0)
    _assert_masked_zero(model, wanted)


@pytest.mark.parametrize("form", ["dict", "list"])
def test_masked_optimizer_explicit_masks_override_carried_ones(form):
    model = _functional()
    wanted = _random_masks(model, seed=5)
    variables = model.trainable_variables
    explicit = wanted if form == "dict" else [wanted[v.path] for v in variables]
    optimizer = MaskedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), masks=explicit)
    x, y = _data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)

    for _ in range(10):
        train_step()
    _assert_masked_zero(model, wanted)
    assert masks(model) == {}  # Explicit masks don't attach to the model.


def test_masked_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`optimizer`"):
        MaskedOptimizer(object())
    with pytest.raises(ValueError, match="`masks`"):
        MaskedOptimizer(keras.optimizers.SGD(), masks=np.ones(3))
    with pytest.raises(ValueError, match="base-optimizer"):
        MaskedOptimizer(keras.optimizers.SGD(), clipnorm=1.0)
    model = _functional()
    optimizer = MaskedOptimizer(keras.optimizers.SGD(), masks={"missing": np.ones(2)})
    with pytest.raises(ValueError, match="missing"):
        optimizer.build(model.trainable_variables)
    optimizer = MaskedOptimizer(keras.optimizers.SGD(), masks=[np.ones(2, bool)])
    with pytest.raises(ValueError, match="one entry per variable"):
        optimizer.build(model.trainable_variables)


def test_masked_optimizer_forwards_learning_rate_and_iterations():
    inner = keras.optimizers.SGD(0.25)
    optimizer = MaskedOptimizer(inner)
    assert float(optimizer.learning_rate.numpy()) == 0.25
    optimizer.learning_rate = 0.5
    assert float(inner.learning_rate.numpy()) == 0.5
    assert optimizer.iterations is inner.iterations


def test_masked_optimizer_config_round_trip():
    mask = np.random.default_rng(0).random((4, 3)) < 0.5
    optimizer = MaskedOptimizer(
        keras.optimizers.Adam(0.003, beta_1=0.8), masks={"dense/kernel": mask}, name="mo"
    )
    config = keras.saving.serialize_keras_object(optimizer)
    json.dumps(config)
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, MaskedOptimizer)
    assert restored.name == "mo"
    assert isinstance(restored.inner_optimizer, keras.optimizers.Adam)
    assert restored.inner_optimizer.beta_1 == 0.8
    assert float(restored.learning_rate.numpy()) == pytest.approx(0.003)
    np.testing.assert_array_equal(
        restored.get_config()["masks"]["dense/kernel"]["bits"],
        optimizer.get_config()["masks"]["dense/kernel"]["bits"],
    )


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_masks_and_masked_optimizer_survive_keras_save_load(tmp_path, kind):
    model = BUILDERS[kind]()
    wanted = _random_masks(model, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Carried by the layer configs: no warning.
        apply_masks(model, wanted)
    model.compile(
        optimizer=MaskedOptimizer(keras.optimizers.Adam(0.01)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer, MaskedOptimizer)
    expected = _in_order(model, wanted)
    _assert_same_masks_in_order(loaded, expected)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    # Optimizer state came back too, and training the loaded model keeps the zeros.
    assert int(loaded.optimizer.iterations.numpy()) == 4
    loaded.fit(x, y, batch_size=8, epochs=2, verbose=0)
    _assert_same_masks_in_order(loaded, expected)


def test_subclassed_model_masks_survive_keras_files_through_its_compile_config(tmp_path):
    model = _subclassed()
    wanted = _random_masks(model, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Carried by the model's compile config.
        apply_masks(model, wanted)
    # Not compiled before: compiled with a MaskedOptimizer recording them, and no loss.
    assert isinstance(model.optimizer, MaskedOptimizer)
    assert model.loss is None
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    expected = _in_order(model, wanted)
    _assert_same_masks_in_order(loaded, expected)
    loaded.compile(optimizer="adam", loss="mse")
    x, _ = _data()
    with pytest.warns(UserWarning, match="compiled again, without a `keras_fip.MaskedOptimizer`"):
        loaded.fit(x, np.ones((32, 3), "float32"), batch_size=8, epochs=2, verbose=0)
    _assert_same_masks_in_order(loaded, expected)


def test_masked_optimizer_under_mirrored_strategy_keeps_zeros(mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        model = _functional()
        # Explicit masks and no constraints: only the wrapper keeps the zeros.
        wanted = _random_masks(model, seed=4)
        for variable in model.trainable_variables:
            variable.assign(variable * wanted[variable.path])
        model.compile(
            optimizer=MaskedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), masks=wanted),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 12
    _assert_masked_zero(model, wanted)
    # Every replica holds the same, still-masked values.
    kernel = model.get_layer("hidden").kernel
    replicas = strategy.experimental_local_results(kernel.value)
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())


def test_multi_head_attention_masks_survive_keras_files_and_a_later_plain_fit(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention", kernel_constraint="non_neg")
    outputs = keras.layers.Flatten()(attention(inputs, inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(outputs))
    rng = np.random.default_rng(0)
    wanted = {
        v.path: rng.random(tuple(v.shape)) < 0.5
        for v in model.trainable_variables
        if v.path.startswith("attention/") and not v.path.endswith("value/bias")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Carried by the attention layer's config.
        apply_masks(model, wanted)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    reloaded = masks(loaded)
    assert sorted(reloaded) == sorted(wanted)
    for key, mask in wanted.items():
        np.testing.assert_array_equal(reloaded[key], mask)
    # A plain optimizer (no MaskedOptimizer) keeps the zeros: the constraint does.
    loaded.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x = rng.normal(size=(16, 4, 8)).astype("float32")
    loaded.fit(x, np.ones((16, 2), "float32"), batch_size=8, epochs=3, verbose=0)
    for variable in loaded.trainable_variables:
        if variable.path in wanted:
            assert np.all(variable.numpy()[~wanted[variable.path]] == 0.0), variable.path
            assert np.any(variable.numpy()[wanted[variable.path]] != 0.0), variable.path
    # The user constraint is kept under the mask.
    kernels = [v for v in loaded.trainable_variables if v.path.endswith("query/kernel")]
    assert np.all(kernels[0].numpy() >= 0.0)
    # A copy keeps them; stripping removes them from the variables and the config.
    np.testing.assert_array_equal(
        masks(copy_model(loaded))[kernels[0].path], wanted[kernels[0].path]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = strip_masks(loaded)
    assert masks(plain) == {}
    plain.save(tmp_path / "plain.keras")
    assert masks(keras.saving.load_model(tmp_path / "plain.keras")) == {}


def test_wrapper_layers_that_serialise_their_layer_carry_masks_silently(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    wrapped = keras.layers.TimeDistributed(keras.layers.Dense(2, name="inner"), name="td")
    model = keras.Model(inputs, wrapped(inputs))
    kernel = model.trainable_variables[0]
    mask = np.array([[True, False]] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_masks(model, [mask, None])
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    _assert_same_masks_in_order(loaded, [mask, None])
    assert kernel.constraint is not None
