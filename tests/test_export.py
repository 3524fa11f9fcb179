"""Tests for `keras_fip.export`: SavedModel round-trip, masks stripped, zeros kept."""

import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fip.core.masks import masks
from keras_fip.engine import apply_masks
from keras_fip.export import export


def _conv_net(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def _x(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 6, 6, 1)).astype("float32")


def _masked_conv_net():
    model = _conv_net()
    # Non-trivial BatchNorm statistics, so inference mode matters.
    model.compile(optimizer="sgd", loss="mse")
    model.fit(_x(16), np.ones((16, 3), "float32"), batch_size=8, verbose=0)
    rng = np.random.default_rng(0)
    kernel_masks = {
        model.get_layer(name).kernel.path: rng.random(tuple(model.get_layer(name).kernel.shape))
        < 0.3
        for name in ("conv", "logits")
    }
    apply_masks(model, kernel_masks)
    return model, kernel_masks


def _weights_hash(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def test_export_round_trip_equal_outputs_and_exact_zeros(tmp_path):
    model, kernel_masks = _masked_conv_net()
    before = _weights_hash(model)
    export(model, tmp_path / "serving")

    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    for batch_size in (1, 7):  # Dynamic batch.
        x = _x(batch_size, seed=batch_size)
        served = loaded.serve(tf.constant(x)).numpy()
        assert np.max(np.abs(served - model(x, training=False).numpy())) <= 1e-5
    # The `serve` signature is there for TF Serving.
    signature = loaded.signatures["serve"]
    (output,) = signature(tf.constant(_x(2))).values()
    np.testing.assert_allclose(output.numpy(), model(_x(2)).numpy(), atol=1e-5)
    # Masked zeros are still exactly zero in the exported variables.
    by_shape = {}
    for variable in loaded.variables:
        by_shape.setdefault(tuple(variable.shape), []).append(variable.numpy())
    for path, mask in kernel_masks.items():
        (exported,) = by_shape[mask.shape]
        assert np.all(exported[~mask] == 0.0), path
        assert np.any(exported[mask] != 0.0), path
    # The input keeps its weights and masks.
    assert _weights_hash(model) == before
    assert sorted(masks(model)) == sorted(kernel_masks)


def test_export_holds_exactly_the_model_weights(tmp_path):
    model, _ = _masked_conv_net()  # Compiled and trained: it has optimizer state too.
    export(model, tmp_path / "serving")
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    exported = sorted(
        (tuple(v.shape), v.numpy().tobytes())
        for v in loaded.variables
        if "seed_generator" not in v.name  # Dropout's RNG state, not a weight.
    )
    expected = sorted((w.shape, w.tobytes()) for w in model.get_weights())
    assert exported == expected


def test_export_two_member_ensemble(tmp_path):
    inputs = keras.Input((6, 6, 1))
    members = [_conv_net(seed) for seed in (0, 1)]
    kernel = members[1].get_layer("logits").kernel
    mask = np.random.default_rng(3).random(tuple(kernel.shape)) < 0.5
    apply_masks(members[1], {kernel.path: mask})
    outputs = keras.layers.Average(name="average")([m(inputs) for m in members])
    ensemble = keras.Model(inputs, outputs, name="ensemble")
    export(ensemble, tmp_path / "ensemble")

    loaded = tf.saved_model.load(str(tmp_path / "ensemble"))
    x = _x(5)
    served = loaded.serve(tf.constant(x)).numpy()
    assert np.max(np.abs(served - ensemble(x).numpy())) <= 1e-5
    member_means = (members[0](x).numpy() + members[1](x).numpy()) / 2
    np.testing.assert_allclose(served, member_means, atol=1e-5)
    exported = [v.numpy() for v in loaded.variables if tuple(v.shape) == mask.shape]
    assert len(exported) == 2
    assert sum(bool(np.all(w[~mask] == 0.0)) for w in exported) >= 1


def test_export_multi_input_model(tmp_path):
    keras.utils.set_random_seed(0)
    first, second = keras.Input((3,), name="first"), keras.Input((2,), name="second")
    merged = keras.layers.Concatenate()([first, second])
    model = keras.Model([first, second], keras.layers.Dense(2, name="dense")(merged))
    export(model, tmp_path / "serving")
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    a, b = np.ones((4, 3), "float32"), np.full((4, 2), 2.0, "float32")
    np.testing.assert_allclose(loaded.serve(a, b), model([a, b]), atol=1e-5)


def test_export_subclassed_model_needs_input_signature(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

        def get_config(self):
            return {}

    keras.saving.register_keras_serializable(package="keras_fip_test_export")(Net)
    model = Net()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="`input_signature`"):
        export(model, tmp_path / "serving")
    export(model, tmp_path / "serving", input_signature=[tf.TensorSpec((None, 3), "float32")])
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    x = np.ones((2, 3), "float32")
    np.testing.assert_allclose(loaded.serve(x), model(x), atol=1e-5)


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`model`"):
        export("model", tmp_path / "serving")
    with pytest.raises(ValueError, match="built"):
        export(keras.Sequential([keras.layers.Dense(2)]), tmp_path / "serving")
    model = _conv_net()
    with pytest.raises(ValueError, match="`directory`"):
        export(model, 42)
    with pytest.raises(ValueError, match="`input_signature`"):
        export(model, tmp_path / "serving", input_signature=[(None, 6, 6, 1)])
