"""Tests for `copy_model`: equal weights, outputs and masks; independent; input untouched."""

import hashlib
import warnings

import keras
import numpy as np
import pytest

from keras_fip.core.masks import masks
from keras_fip.engine import MaskConstraint
from keras_fip.engine import apply_masks
from keras_fip.engine import copy_model


@keras.saving.register_keras_serializable(package="keras_fip_test_copy")
class ConvNet(keras.Model):
    """A registered subclassed model with BatchNorm state."""

    def __init__(self, filters=3, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, name="conv")
        self.batch_norm = keras.layers.BatchNormalization(name="batch_norm")
        self.flatten = keras.layers.Flatten(name="flatten")
        self.logits = keras.layers.Dense(2, name="logits")

    def call(self, inputs, training=False):
        x = self.batch_norm(self.conv(inputs), training=training)
        return self.logits(self.flatten(x))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class UnregisteredNet(keras.Model):
    """A subclassed model whose constructor needs an argument its config lacks."""

    def __init__(self, units):
        super().__init__()
        self.dense = keras.layers.Dense(units)

    def call(self, inputs):
        return self.dense(inputs)


def _functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 5, 1))
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


def _sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5, 5, 1)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(name="batch_norm"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(2, name="logits"),
        ]
    )


def _subclassed():
    keras.utils.set_random_seed(0)
    model = ConvNet(filters=3)
    model(np.zeros((1, 5, 5, 1), "float32"))
    return model


def _ensemble():
    """Two functional members averaged: nested models, identical layer names."""
    inputs = keras.Input((5, 5, 1))
    members = []
    for seed in (0, 1):
        member = _functional()
        keras.utils.set_random_seed(seed)
        member.set_weights([w + seed for w in member.get_weights()])
        members.append(member)
    outputs = keras.layers.Average(name="average")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name="ensemble")


BUILDERS = {
    "functional": _functional,
    "sequential": _sequential,
    "subclassed": _subclassed,
    "ensemble": _ensemble,
}


def _x(n=4):
    return np.random.default_rng(0).normal(size=(n, 5, 5, 1)).astype("float32")


def _train_batch_norm(model):
    """Moves BatchNorm moving statistics away from their initial values."""
    model.compile(optimizer="sgd", loss="mse")
    model.fit(_x(16), np.ones((16, 2), "float32"), batch_size=8, epochs=2, verbose=0)


def _weights_hash(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_copy_has_equal_weights_outputs_and_masks_and_input_is_untouched(kind):
    model = BUILDERS[kind]()
    _train_batch_norm(model)
    rng = np.random.default_rng(1)
    masks_in_order = [rng.random(tuple(v.shape)) < 0.5 for v in model.trainable_variables]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Subclassed: `.keras` warning.
        apply_masks(model, masks_in_order)
    before = _weights_hash(model)
    constraints_before = [v.constraint for v in model.weights]

    copy = copy_model(model)

    assert copy is not model
    assert _weights_hash(model) == before
    assert [v.constraint for v in model.weights] == constraints_before
    # All weights equal, including non-trainable BatchNorm statistics.
    assert len(copy.weights) == len(model.weights)
    non_trainable = [v for v in model.non_trainable_variables if "moving" in v.path]
    assert non_trainable and not np.allclose(non_trainable[0].numpy(), 0.0)
    for original, copied in zip(model.weights, copy.weights):
        assert original is not copied
        np.testing.assert_array_equal(copied.numpy(), original.numpy())
    # Same masks, in the same order.
    for variable, mask in zip(copy.trainable_variables, masks_in_order):
        assert isinstance(variable.constraint, MaskConstraint)
        np.testing.assert_array_equal(variable.constraint.mask, mask)
    assert len(masks(copy)) == len(masks_in_order)
    # Same outputs, in inference and in training mode.
    x = _x()
    np.testing.assert_array_equal(copy(x), model(x))
    np.testing.assert_array_equal(copy(x, training=True), model(x, training=True))


def test_copy_is_independent_of_the_original():
    model = _functional()
    copy = copy_model(model)
    before = _weights_hash(model)
    for variable in copy.weights:
        variable.assign(variable + 1.0)
    assert _weights_hash(model) == before
    copy.compile(optimizer="sgd", loss="mse")
    copy.fit(_x(8), np.ones((8, 2), "float32"), verbose=0)
    assert _weights_hash(model) == before


def test_copy_keeps_user_constraints_under_masks():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, name="dense", kernel_constraint=keras.constraints.NonNeg())(
        inputs
    )
    model = keras.Model(inputs, outputs)
    apply_masks(model, [np.array([[True, False]] * 3), None])
    copy = copy_model(model)
    constraint = copy.get_layer("dense").kernel.constraint
    assert isinstance(constraint, MaskConstraint)
    assert isinstance(constraint.constraint, keras.constraints.NonNeg)
    assert copy.get_layer("dense").bias.constraint is None


def test_copy_of_model_without_rebuildable_config_raises_clear_error():
    model = UnregisteredNet(3)
    model(np.zeros((1, 2), "float32"))
    with pytest.raises(ValueError, match="Cannot copy model"):
        copy_model(model)


def test_copy_rejects_non_models():
    with pytest.raises(ValueError, match="`model` must be a `keras.Model`"):
        copy_model(keras.layers.Dense(2))
