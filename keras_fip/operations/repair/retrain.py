"""`Retrain`: supervised retraining of the surviving network (damage-rescue strategy 1)."""

import keras

from keras_fip.operations.base import Operation
from keras_fip.operations.repair.method import RepairMethod
from keras_fip.operations.repair.method import check_boolean
from keras_fip.operations.repair.training import OPTIMIZERS
from keras_fip.operations.repair.training import supervised_repair


@keras.saving.register_keras_serializable(package="keras_fip")
class Retrain(RepairMethod):
    """Retrains the surviving network on the labels: strategy 1 of the damage-rescue paper.

    Supervised training (the cross-entropy of the repair's labelled data) of every
    weight but the damaged ones, held at zero by their masks (or released first with
    `release=True`), with the `Repair`'s walk's budget, batch size and seed and its
    rule's learning rate (constant; `"auto"` as for the FIP walk). What a practitioner
    would otherwise do: the baseline `keras_fip.repair.FIP` is compared with.

    Args:
        release: Whether to re-initialise and release the damaged weights first. Defaults
            to `False`.
        optimizer: `"adam"` or `"sgd"` (momentum 0.9). Defaults to `"adam"`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
        >>> repair = keras_fip.Repair((x, y), method=Retrain(),
        ...                           walk=keras_fip.Walk(epochs=1, seed=0, verbose=0))
        >>> repaired = repair(damaged)
        >>> repair.history["epochs"]
        1.0
    """

    name = "retrain"
    needs_labels = True

    def __init__(self, release=False, *, optimizer="adam"):
        self.release = check_boolean(release, "release")
        self.optimizer = Operation.check_choice(optimizer, "optimizer", OPTIMIZERS)

    @property
    def releases(self):
        return self.release

    def repair(self, model, context):
        return supervised_repair(model, context, self.optimizer)

    def get_config(self):
        return {"release": self.release, "optimizer": self.optimizer}
