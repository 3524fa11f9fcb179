"""`RepairMethod`: the base class of the strategies `keras_fip.Repair` runs."""

import keras
import numpy as np

from keras_fip.core.config import Config


class RepairMethod(Config):
    """The base class of repair strategies (`FIP`, `Retrain`, `Embryonic`).

    A method is a small serialisable object holding its own settings, validated in
    `__init__`. `keras_fip.Repair` calls `check(model)` before any work, releases the
    damage when `releases` (the damaged weights re-initialised with `init_scale` and
    their masks removed), then `repair(model, context)`.

    Class attributes: `name` (the string `Repair` accepts for the method with its
    defaults), `needs_labels` (whether it trains on labels).
    """

    name = None
    needs_labels = False
    releases = False
    init_scale = 1.0

    def check(self, model):
        """Checks the method's settings against `model` before any work. `model` is not
        changed."""

    def repair(self, model, context):
        """Repairs `model` (the operation's copy, free to change).

        Args:
            model: The damaged (or released) model.
            context: The call's `keras_fip.operations.repair.RepairContext`.

        Returns:
            A tuple `(model, history, path)`: the repaired `keras.Model`, its history dict
            (`"epoch"`, `"val_accuracy"`, `"undamaged_accuracy"`, `"epochs_to_recover"`,
            `"steps"`, ...) and a `keras_fip.Path`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `repair`.")

    def get_config(self):
        """The constructor arguments."""
        return {}


def check_boolean(value, name):
    """`value` as a bool, or a `ValueError` naming `name`."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be a boolean. Received: {name}={value!r}")
    return bool(value)


def serialize(method):
    """The config of a repair method, as `keras.saving.serialize_keras_object` writes it."""
    return keras.saving.serialize_keras_object(method)
