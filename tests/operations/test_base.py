"""Tests for the Operation contract: validation, no mutation, config, chain, data."""

import hashlib

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.operations import Chain
from keras_fip.operations import Operation
from keras_fip.operations import carry_data
from keras_fip.operations import chain
from keras_fip.operations import check_model


@keras.saving.register_keras_serializable(package="keras_fip_tests")
class Scale(Operation):
    """A trivial operation: multiplies every trainable weight by `factor`."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = self.check_number(factor, "factor", low=0.0)

    def call(self, model):
        for variable in model.trainable_variables:
            variable.assign(variable * self.factor)
        return model

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="keras_fip_tests")
class Shift(Operation):
    """A trivial operation: adds `offset` to every trainable weight."""

    def __init__(self, offset=1.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = self.check_number(offset, "offset")

    def call(self, model):
        for variable in model.trainable_variables:
            variable.assign(variable + self.offset)
        return model

    def get_config(self):
        return {**super().get_config(), "offset": self.offset}


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="relu", name="hidden"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _hash(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def test_call_returns_new_model_and_never_mutates_input():
    model = _model()
    before = _hash(model)
    result = Scale(3.0)(model)
    assert result is not model
    assert _hash(model) == before
    for original, scaled in zip(model.get_weights(), result.get_weights()):
        np.testing.assert_allclose(scaled, 3.0 * original)


def test_chain_equals_sequential_application():
    model = _model()
    chained = chain(Scale(2.0), Shift(0.5), Scale(0.25))(model)
    sequential = Scale(0.25)(Shift(0.5)(Scale(2.0)(model)))
    for a, b in zip(chained.get_weights(), sequential.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert isinstance(chain(Scale(), Shift()), Operation)


def test_config_round_trips_through_keras_serialization():
    operation = chain(Scale(2.5, name="double"), Shift(-1.0), name="scale_and_shift")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(operation))
    assert isinstance(restored, Chain)
    assert restored.get_config() == operation.get_config()
    assert restored.operations[0].name == "double"
    model = _model()
    for a, b in zip(operation(model).get_weights(), restored(model).get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: Scale(-1.0), "`factor` must be a number > 0.0. Received: factor=-1.0"),
        (lambda: Scale("2"), "Received: factor='2'"),
        (lambda: Scale(True), "Received: factor=True"),
        (lambda: keras_fip.Walk(verbose=3), "Received: verbose=3"),
        (lambda: keras_fip.Walk(callbacks=["progress"]), "Received: callbacks=\\['progress'\\]"),
        (lambda: chain(), "Received: operations=\\[\\]"),
        (lambda: chain(Scale(), "compress"), "Received: operations\\[1\\]='compress'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_unsupported_layer_is_named():
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.LSTM(4, name="recurrent"), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="layer `recurrent` of unsupported type LSTM"):
        Scale()(model)
    with pytest.raises(ValueError, match="must be a `keras.Model`"):
        Scale()("model")


def test_nested_models_and_zoo_models_are_supported():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])
    check_model(outer)
    check_model(keras_fip.models.cnn5(input_shape=(12, 12, 1), num_classes=3))
    check_model(keras_fip.models.resnet(depth=20, width_multiplier=0.25))
    check_model(
        keras_fip.models.transformer_classifier(
            vocab_size=20, sequence_length=8, num_classes=2, num_layers=1
        )
    )


def test_carried_data_is_used_when_no_data_is_given():
    model = _model()
    walk = keras_fip.Isofunctional(
        walk=keras_fip.Walk(
            steps=2, batch_size=4, rule=keras_fip.rules.Metric(0.01), record_every=1, verbose=0
        )
    )
    with pytest.raises(ValueError, match="carries no data.*Received: data=None"):
        walk(model)
    carry_data(model, np.random.default_rng(0).random((8, 4)).astype("float32"))
    moved = walk(model)
    assert walk.history["step_norm"] == pytest.approx([0.01, 0.01], rel=1e-5)
    assert keras_fip.operations.carried_data(moved) is not None


def test_chain_function_does_not_shadow_a_module():
    import importlib

    import keras_fip.operations.composition as composition

    assert keras_fip.operations.chain is composition.chain
    assert keras_fip.operations.Chain is composition.Chain
    assert callable(keras_fip.operations.chain)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("keras_fip.operations.chain")
