"""`Weights`: zeroed kernel entries (edge damage)."""

import keras
import numpy as np

from keras_fip.geometry import units as units_lib
from keras_fip.operations.faults.fault import Fault

# The fraction of kernel entries `Weights()` zeroes when given no number.
DEFAULT_FRACTION = 0.5


@keras.saving.register_keras_serializable(package="keras_fip")
class Weights(Fault):
    """Zeroes kernel entries: edge damage, each zeroed weight held at zero by a mask.

    Exactly `round(fraction·n)` (or `count`) of the n free entries of the Dense and
    convolution kernels (and the other weights
    `keras_fip.core.projection.prunable_variables` lists: embedding tables, attention
    kernels), entries already held at zero by a mask not counted. `scope="global"` draws
    them from all kernels together, `"per_layer"` that fraction of each kernel. A seeded
    permutation's prefix: one seed zeroes nested sets as `fraction` grows. The record
    lists the zeroed flat indices per variable path (`"weights"`).

    Args:
        fraction: Fraction in [0, 1] of the entries to zero. Defaults to `None` (0.5 when
            `count` is not given).
        count: Number of entries to zero instead of `fraction`. Defaults to `None`.
        layers: Names of the layers whose kernels may be hit, or `None` for all.
            Defaults to `None`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5),
        ...                           keras.layers.Dense(2)])
        >>> damage = keras_fip.Damage(Weights(count=6), seed=0)
        >>> damaged = damage(model)
        >>> zeroed = sum((~mask).sum() for mask in keras_fip.masks(damaged).values())
        >>> damage.history["num_hit"], int(zeroed)
        (6, 6)
    """

    name = "weights"
    zeroes = True

    def __init__(self, fraction=None, *, count=None, layers=None, scope="global"):
        super().__init__(layers=layers)
        fraction, count = self.check_amount(fraction, count)
        self.fraction = fraction
        self.count = count
        self.scope = self.check_choice(scope, "scope", units_lib.SCOPES)

    def _how_many(self, total):
        fraction = DEFAULT_FRACTION if self.fraction is None and self.count is None else None
        return self.number(
            self.fraction if fraction is None else fraction, self.count, total, "free entries"
        )

    def check(self, model):
        variables = self.variables_of(model, kernels_only=True)
        sizes = [f.size for f in self.free_indices(model, variables)]
        self._how_many(sum(sizes) if self.scope == "global" else min(sizes))

    def apply(self, model, inputs, labels, rng, seed):
        variables = self.variables_of(model, kernels_only=True)
        free = self.free_indices(model, variables)
        chosen = self.draw(free, rng, self._how_many, self.scope)
        zeroed, hit = {}, {}
        for variable, indices in zip(variables, chosen):
            if indices.size == 0:
                continue
            mask = np.ones(variable.shape, bool)
            mask.reshape(-1)[indices] = False
            zeroed[id(variable)] = mask
            hit[variable.path] = indices.tolist()
        record = {
            "weights": hit,
            "num_hit": int(sum(indices.size for indices in chosen)),
            "num_weights": int(sum(f.size for f in free)),
        }
        return record, zeroed

    def get_config(self):
        return {
            "fraction": self.fraction,
            "count": self.count,
            **super().get_config(),
            "scope": self.scope,
        }
