"""`Embryonic`: the damaged weights re-grown from fresh values (damage-rescue strategy 2)."""

import keras
import numpy as np

from keras_fip.operations.base import Operation
from keras_fip.operations.repair.method import RepairMethod
from keras_fip.operations.repair.training import OPTIMIZERS
from keras_fip.operations.repair.training import supervised_repair


@keras.saving.register_keras_serializable(package="keras_fip")
class Embryonic(RepairMethod):
    """Re-grows the damaged weights from fresh values: strategy 2 of the damage-rescue paper.

    The damaged weights are re-initialised (drawn from a normal distribution with their
    variable's surviving mean and `init_scale` × its spread) and released from their
    masks, then trained on the repair's labelled data: only they (`plasticity=0`), or with
    the surviving weights' gradients scaled by `plasticity`. Budget, batch size, seed and
    learning rate as for `keras_fip.repair.Retrain`.

    Args:
        plasticity: Gradient multiplier ≥ 0 of the surviving weights. Defaults to `0.0`.
        init_scale: Spread ≥ 0 of the re-initialised weights relative to their
            survivors'. Defaults to `1.0`.
        optimizer: `"adam"` or `"sgd"` (momentum 0.9). Defaults to `"adam"`.

    Examples:

        >>> Embryonic(plasticity=0.1).get_config()
        {'plasticity': 0.1, 'init_scale': 1.0, 'optimizer': 'adam'}
    """

    name = "embryonic"
    needs_labels = True
    releases = True

    def __init__(self, plasticity=0.0, *, init_scale=1.0, optimizer="adam"):
        self.plasticity = Operation.check_number(
            plasticity, "plasticity", low=0.0, low_inclusive=True
        )
        self.init_scale = Operation.check_number(
            init_scale, "init_scale", low=0.0, low_inclusive=True
        )
        self.optimizer = Operation.check_choice(optimizer, "optimizer", OPTIMIZERS)

    def repair(self, model, context):
        scales = [
            np.full(v.shape, self.plasticity)
            if mask is None
            else np.where(mask, self.plasticity, 1.0)
            for v, mask in zip(model.trainable_variables, context.reference.damage_masks)
        ]
        return supervised_repair(model, context, self.optimizer, gradient_scales=scales)

    def get_config(self):
        return {
            "plasticity": self.plasticity,
            "init_scale": self.init_scale,
            "optimizer": self.optimizer,
        }
