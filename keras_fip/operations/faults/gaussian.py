"""`Gaussian`: a random Gaussian weight perturbation of an exact norm."""

import keras
import numpy as np

from keras_fip.operations.faults.fault import Fault


@keras.saving.register_keras_serializable(package="keras_fip")
class Gaussian(Fault):
    """Adds a random Gaussian direction of Euclidean norm exactly `norm` to the weights.

    The direction is drawn over every free trainable weight (or those of `layers`;
    weights held at zero by a mask stay at zero) and scaled to norm `norm`: a random
    direction of weight space, the control against which `keras_fip.faults.Eigen`'s
    adversarial direction of the same norm is compared.

    Args:
        norm: Euclidean norm ≥ 0 of the perturbation. Defaults to `1.0`.
        layers: Names of the layers to perturb, or `None` for all. Defaults to `None`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> damage = keras_fip.Damage(Gaussian(norm=0.5), seed=0)
        >>> damaged = damage(model)
        >>> round(damage.history["perturbation_norm"], 6)
        0.5
    """

    name = "gaussian"

    def __init__(self, norm=1.0, *, layers=None):
        super().__init__(layers=layers)
        self.norm = self.check_number(norm, "norm", low=0.0, low_inclusive=True)

    def check(self, model):
        self.variables_of(model)

    def apply(self, model, inputs, labels, rng, seed):
        variables = self.variables_of(model)
        free = self.free_indices(model, variables)
        noise = []
        for variable, indices in zip(variables, free):
            values = np.zeros(int(np.prod(variable.shape, dtype=np.int64)))
            values[indices] = rng.standard_normal(indices.size)
            noise.append(values.reshape(variable.shape))
        length = np.sqrt(sum(np.sum(np.square(n)) for n in noise))
        self.add(variables, [n * (self.norm / length) if length > 0 else n for n in noise])
        return {"num_hit": int(sum(f.size for f in free)), "norm": self.norm}, {}

    def get_config(self):
        return {"norm": self.norm, **super().get_config()}
