"""Tests for `keras_fip.core.config`: the base of the operations' knob objects."""

import keras
import pytest

from keras_fip.core import config


@keras.saving.register_keras_serializable(package="keras_fip_tests")
class Decay(config.Config):
    def __init__(self, rate=0.5, floor=0.0):
        self.rate = rate
        self.floor = floor

    def get_config(self):
        return {"rate": self.rate, "floor": self.floor}


def test_config_round_trips_compares_and_reads():
    decay = Decay(0.1, floor=0.01)
    assert Decay.from_config(decay.get_config()) == decay
    assert decay != Decay(0.1)
    assert hash(decay) == hash(Decay(0.1, floor=0.01))
    assert repr(decay) == "Decay(rate=0.1, floor=0.01)"


@pytest.mark.parametrize(
    "value",
    [Decay(0.2), {"rate": 0.2}, keras.saving.serialize_keras_object(Decay(0.2))],
    ids=["object", "config", "serialized"],
)
def test_resolve_accepts_the_object_its_config_and_its_serialized_form(value):
    assert config.resolve(value, Decay, "decay") == Decay(0.2)


def test_resolve_none_gives_the_default():
    assert config.resolve(None, Decay, "decay") == Decay()
    assert config.resolve(None, Decay, "decay", default=Decay(0.9)) == Decay(0.9)


@pytest.mark.parametrize("value", ["fast", {"speed": 1}, 0.5])
def test_resolve_refuses_anything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match="`decay` must be a `Decay`.*Received: decay="):
        config.resolve(value, Decay, "decay")
