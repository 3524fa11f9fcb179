"""Masks through `.keras` files for layers users write: composite layer subclasses,
`MultiHeadAttention` at any depth, KerasHub encoders.

Each model is masked (by `apply_masks` and by `Compress`), saved with `model.save`, loaded
with `keras.saving.load_model` as users load, and trained one epoch, with and without
compiling again with a plain `"adam"`: every mask must come back on its variable and every
masked weight must stay exactly zero.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.core import projection
from keras_fip.core.copy import copy_model
from keras_fip.core.masks import masks
from keras_fip.engine import MaskedOptimizer
from keras_fip.engine import apply_masks
from keras_fip.engine import strip_masks

PACKAGE = "keras_fip_test_masks_saving"
SEQUENCE_LENGTH = 6
WIDTH = 8


# Layers as users write them


@keras.saving.register_keras_serializable(package=PACKAGE)
class Block(keras.layers.Layer):
    """The keras.io transformer block: attention and a feed-forward Sequential, built in
    `__init__` and rebuilt from the layer's own `get_config`."""

    def __init__(self, embed_dim, num_heads, ff_dim, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim = embed_dim, num_heads, ff_dim
        self.att = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [keras.layers.Dense(ff_dim, activation="relu"), keras.layers.Dense(embed_dim)]
        )
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, inputs):
        out1 = self.layernorm1(inputs + self.att(inputs, inputs))
        return self.layernorm2(out1 + self.ffn(out1))

    def get_config(self):
        config = super().get_config()
        config.update(embed_dim=self.embed_dim, num_heads=self.num_heads, ff_dim=self.ff_dim)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class Encoder(keras.layers.Layer):
    """A layer subclass holding a layer subclass holding `MultiHeadAttention`."""

    def __init__(self, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.block = Block(embed_dim, 2, 2 * embed_dim)

    def call(self, inputs):
        return self.block(inputs)

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim}


# Models


def _block_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SEQUENCE_LENGTH, WIDTH))
    x = keras.layers.Dense(WIDTH, name="embed")(inputs)
    x = Block(WIDTH, 2, 12, name="block")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="block_model")


def _nested_attention_model():
    """`MultiHeadAttention` in a nested functional model (its config saved) and inside two
    nested layer subclasses (built in code)."""
    keras.utils.set_random_seed(0)
    inner_inputs = keras.Input((SEQUENCE_LENGTH, WIDTH))
    attention = keras.layers.MultiHeadAttention(2, 4, name="inner_attention")
    inner = keras.Model(inner_inputs, attention(inner_inputs, inner_inputs), name="inner")
    inputs = keras.Input((SEQUENCE_LENGTH, WIDTH))
    x = Encoder(WIDTH, name="encoder")(inner(inputs))
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="nested_attention")


def _bert_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    return keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=WIDTH,
        intermediate_dim=16,
        max_sequence_length=SEQUENCE_LENGTH,
    )


def _bert_functional():
    """A user's functional classifier on a KerasHub `BertBackbone`."""
    keras.utils.set_random_seed(0)
    backbone = _bert_backbone()
    pooled = backbone(backbone.input)["pooled_output"]
    outputs = keras.layers.Dense(3, name="logits")(pooled)
    return keras.Model(backbone.input, outputs, name="bert_functional")


def _bert_classifier():
    """KerasHub's `BertTextClassifier` (no preprocessor), compiled by its constructor."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertTextClassifier(
        _bert_backbone(), num_classes=3, preprocessor=None, dropout=0.0
    )


def _features(count=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, SEQUENCE_LENGTH, WIDTH)).astype("float32")
    return x, rng.integers(0, 3, count)


def _bert_features(count=48, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(5, 30, (count, SEQUENCE_LENGTH)).astype("int32")
    x = {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": np.ones_like(token_ids),
    }
    return x, rng.integers(0, 3, count)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# name: (build, data)
MODELS = {
    "block": (_block_model, _features),
    "nested_attention": (_nested_attention_model, _features),
    "bert_functional": (_bert_functional, _bert_features),
    "bert_classifier": (_bert_classifier, _bert_features),
}


def _compiled(name):
    build, data = MODELS[name]
    model = build()
    if name != "bert_classifier":  # A KerasHub task compiles itself.
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS, metrics=["accuracy"])
    return model, data()


def _kernel_masks(model, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.random(tuple(v.shape)) < 0.5 if v.path.endswith("kernel") else None
        for v in model.trainable_variables
    ]


def _in_order(model):
    """`masks(model)` as a list aligned with `model.trainable_variables`."""
    read = masks(model)
    return [read.get(v.path) for v in model.trainable_variables]


def _reattach_head(loaded, expected):
    """The documented fix for the KerasHub task's head: `apply_masks` by position."""
    head = [v.path for v in loaded.trainable_variables].index("logits/kernel")
    with pytest.warns(UserWarning, match="not by `.keras` files"):
        apply_masks(loaded, [mask if i == head else None for i, mask in enumerate(expected)])
    return head


def _masked(name, how, tmp_path):
    """The masked model, its masks in order, and the `.keras` file it was saved to."""
    model, (x, y) = _compiled(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "apply_masks":
            apply_masks(model, _kernel_masks(model))
            masked = model
        else:
            walk = keras_fip.Walk(steps=4, batch_size=16, verbose=0, seed=0)
            masked = keras_fip.Compress(0.5, data=(x, y), walk=walk)(model)
    messages = [str(w.message) for w in caught if "not by `.keras` files" in str(w.message)]
    if name == "bert_classifier":
        # The head is built by the task's constructor, and the task overrides `compile`.
        assert len(messages) == 1
        assert "['logits/kernel']" in messages[0]
        assert "`BertTextClassifier` overrides `compile`" in messages[0]
    else:
        assert messages == []
    expected = _in_order(masked)
    assert sum(mask is not None for mask in expected) >= 4
    masked.save(tmp_path / "model.keras")
    return masked, expected, (x, y)


def _masked_zero_counts(model, expected):
    counts = []
    for variable, mask in zip(model.trainable_variables, expected):
        if mask is not None:
            values = variable.numpy()
            assert np.all(values[~mask] == 0.0), variable.path
            counts.append(int(np.sum(values == 0.0)))
    return counts


def _fit_keeps_masks(model, expected, data, recompile):
    x, y = data
    if recompile:
        model.compile(optimizer="adam", loss=LOSS)
    start = [v.numpy().copy() for v in model.trainable_variables]
    zeros = _masked_zero_counts(model, expected)
    sparsity = projection.prunable_sparsity(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert _masked_zero_counts(model, expected) == zeros
    assert projection.prunable_sparsity(model) == sparsity
    moved = [
        np.any(v.numpy()[mask] != before[mask])
        for v, before, mask in zip(model.trainable_variables, start, expected)
        if mask is not None
    ]
    assert any(moved)  # The kept weights trained.


def _assert_same_masks(loaded, expected):
    read = _in_order(loaded)
    assert len(read) == len(expected)
    for variable, got, want in zip(loaded.trainable_variables, read, expected):
        if want is None:
            assert got is None, variable.path
        else:
            assert got is not None, variable.path
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("how", ["apply_masks", "compress"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_masks_come_back_from_keras_files_and_fit_keeps_them(name, how, tmp_path):
    masked, expected, data = _masked(name, how, tmp_path)

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(masked)
    if name == "bert_classifier":
        # The documented limit: the head's mask is not in the file, its zeros are.
        head = [v.path for v in loaded.trainable_variables].index("logits/kernel")
        _assert_same_masks(loaded, [None if i == head else m for i, m in enumerate(expected)])
        assert np.all(loaded.trainable_variables[head].numpy()[~expected[head]] == 0.0)
        _reattach_head(loaded, expected)
    else:
        # Compiled as the masked model was: its loss, a MaskedOptimizer around its Adam.
        assert isinstance(loaded.optimizer, MaskedOptimizer)
        assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Adam)
    _assert_same_masks(loaded, expected)
    _fit_keeps_masks(loaded, expected, data, recompile=False)

    # Compiled again with a plain optimizer: the constraints keep the zeros, and a
    # warning says the model's `.keras` files no longer record the masks.
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    if name == "bert_classifier":
        _reattach_head(loaded, expected)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit_keeps_masks(loaded, expected, data, recompile=True)
        # The backbone's compile config holds them: no warning.
        assert not [w for w in caught if "MaskedOptimizer" in str(w.message)]
    else:
        with pytest.warns(UserWarning, match="compiled again, without a `keras_fip.Masked"):
            _fit_keeps_masks(loaded, expected, data, recompile=True)
    _assert_same_masks(loaded, expected)


# The keras.io text transformer, as `benchmarks.user_models` writes it


def test_compressed_keras_io_text_transformer_keeps_all_masks_through_keras_files(tmp_path):
    user_models = pytest.importorskip("benchmarks.user_models")
    keras.utils.set_random_seed(0)
    model = user_models.text_transformer(maxlen=16, vocab_size=200)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x, y = rng.integers(1, 200, (128, 16)), rng.integers(0, 2, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Every mask is carried.
        walk = keras_fip.Walk(steps=4, batch_size=32, verbose=0, seed=0)
        result = keras_fip.Compress(0.5, data=(x, y), walk=walk)(model)
    expected = _in_order(result)
    # Every prunable weight (the 8 kernels, the 2 embedding tables) is masked.
    prunable = {id(v) for v in projection.prunable_variables(result)}
    assert len(prunable) == 10
    assert [id(v) for v, m in zip(result.trainable_variables, expected) if m is not None] == [
        id(v) for v in result.trainable_variables if id(v) in prunable
    ]
    assert projection.prunable_sparsity(result) == 0.5
    result.save(tmp_path / "model.keras")

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    _assert_same_masks(loaded, expected)  # 10 of 10.
    _fit_keeps_masks(loaded, expected, (x, y), recompile=False)
    assert projection.prunable_sparsity(loaded) == 0.5


# Compile states


def test_apply_masks_wraps_the_compiled_optimizer_and_keeps_loss_and_metrics():
    model, (x, y) = _compiled("block")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    adam = model.optimizer
    iterations = int(adam.iterations.numpy())
    apply_masks(model, _kernel_masks(model))
    assert isinstance(model.optimizer, MaskedOptimizer)
    assert model.optimizer.inner_optimizer is adam  # Its state is kept.
    assert int(model.optimizer.iterations.numpy()) == iterations == 3
    assert model.loss.get_config() == LOSS.get_config()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert sorted(history.history) == ["accuracy", "loss"]
    assert int(adam.iterations.numpy()) == 6


def test_uncompiled_model_is_compiled_with_a_masked_optimizer_and_no_loss(tmp_path):
    model = _block_model()
    wanted = _kernel_masks(model)
    apply_masks(model, wanted)
    assert isinstance(model.optimizer, MaskedOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.RMSprop)
    assert model.loss is None
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    _assert_same_masks(loaded, wanted)
    with pytest.warns(UserWarning, match="compiled again"):
        _fit_keeps_masks(loaded, wanted, _features(), recompile=True)


def test_recompiling_before_saving_warns_and_a_masked_optimizer_keeps_the_masks(tmp_path):
    model, (x, y) = _compiled("block")
    wanted = _kernel_masks(model)
    apply_masks(model, wanted)
    in_block = [i for i, v in enumerate(model.trainable_variables) if "block/" in v.path]
    assert [i for i, mask in enumerate(wanted) if mask is not None and i in in_block]

    # A plain optimizer: training keeps the zeros, the warning names what the file loses.
    model.compile(optimizer="adam", loss=LOSS)
    with pytest.warns(UserWarning, match="Model `block_model` is not compiled with a"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    _masked_zero_counts(model, wanted)
    model.save(tmp_path / "plain.keras")
    lost = _in_order(keras.saving.load_model(tmp_path / "plain.keras"))
    assert [lost[i] for i in in_block] == [None] * len(in_block)
    assert lost[-2] is not None  # The head's Dense carries its own in its config.

    # Compiled with a MaskedOptimizer (and trained, so built): the file records them.
    model.compile(optimizer=MaskedOptimizer("adam"), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "masked.keras")
    _assert_same_masks(keras.saving.load_model(tmp_path / "masked.keras"), wanted)


def test_copies_keep_compile_state_and_masks_and_strip_masks_unwraps(tmp_path):
    model, (x, y) = _compiled("nested_attention")
    wanted = _kernel_masks(model, seed=1)
    apply_masks(model, wanted)
    copy = copy_model(model)
    assert isinstance(copy.optimizer, MaskedOptimizer)
    assert copy.loss.get_config() == LOSS.get_config()
    copy.save(tmp_path / "copy.keras")
    _assert_same_masks(keras.saving.load_model(tmp_path / "copy.keras"), wanted)

    plain = strip_masks(model)
    assert masks(plain) == {}
    assert isinstance(plain.optimizer, keras.optimizers.Adam)
    plain.save(tmp_path / "plain.keras")
    assert masks(keras.saving.load_model(tmp_path / "plain.keras")) == {}
    _assert_same_masks(model, wanted)  # The input keeps its masks.


def test_export_of_a_masked_composite_model(tmp_path):
    model, (x, y) = _compiled("block")
    walk = keras_fip.Walk(steps=4, batch_size=16, verbose=0, seed=0)
    result = keras_fip.Compress(0.5, data=(x, y), walk=walk)(model)
    keras_fip.export(result, tmp_path / "serving")
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    served = loaded.serve(tf.constant(x[:5]))
    np.testing.assert_allclose(served.numpy(), result(x[:5], training=False), atol=1e-5)


# MaskedOptimizer's attached masks


def test_masked_optimizer_attaches_masks_when_built_and_records_them_in_its_config():
    model = _block_model()
    wanted = _kernel_masks(model, seed=2)
    optimizer = MaskedOptimizer(keras.optimizers.SGD(0.1), attached_masks=wanted)
    config = keras.saving.serialize_keras_object(optimizer)
    restored = keras.saving.deserialize_keras_object(config)
    restored.build(model.trainable_variables)
    _assert_same_masks(model, wanted)
    assert restored.get_config()["attached_masks"] == config["config"]["attached_masks"]

    with pytest.raises(ValueError, match="`attached_masks`"):
        MaskedOptimizer("sgd", attached_masks=np.ones(3))
    with pytest.raises(ValueError, match="one entry per variable"):
        MaskedOptimizer("sgd", attached_masks=wanted[:-1]).build(model.trainable_variables)
    # Restored from a file whose model differs: a warning, not a failed load.
    stale = MaskedOptimizer.from_config(
        {**config["config"], "attached_masks": config["config"]["attached_masks"][:-1]}
    )
    other = _block_model()
    with pytest.warns(UserWarning, match="not re-attached"):
        stale.build(other.trainable_variables)
    assert masks(other) == {}
