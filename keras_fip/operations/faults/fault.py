"""`Fault`: the base class of the fault models `keras_fip.Damage` applies."""

import numpy as np

from keras_fip.core import projection
from keras_fip.core.config import Config
from keras_fip.core.layers import all_layers
from keras_fip.core.masks import mask_of
from keras_fip.operations.base import Operation


class Fault(Config):
    """The base class of fault models: what `keras_fip.Damage` does to a network.

    A fault is a small serialisable object holding its own settings, validated in
    `__init__`. `Damage` calls `check(model)` on the model it was given (before any
    copy, so bad settings for that model raise before any work), then `apply(...)` on its
    copy. Subclasses set `name` (the string `Damage` accepts for the fault with its
    defaults, and the `"kind"` of its record), `zeroes` (whether it zeroes weights and
    holds them there with masks) and `needs_data` (whether it reads the network's
    outputs on data), and implement `apply`.

    Args:
        layers: Names of the layers to damage, or `None` for the fault's default set.
            Defaults to `None`.

    Examples:

        >>> keras_fip.faults.get("gaussian")
        Gaussian(norm=1.0, layers=None)
    """

    name = None
    zeroes = False
    needs_data = False

    def __init__(self, layers=None):
        self.layers = Operation.check_layer_names(layers)

    # Validation helpers (the `Received: arg=...` pattern).

    check_number = staticmethod(Operation.check_number)
    check_choice = staticmethod(Operation.check_choice)

    # Damage calls these.

    def check(self, model):
        """Checks the fault's settings against `model` before any work (raises a
        `ValueError` naming the argument). `model` is not changed."""
        self.selected_layers(model)

    def apply(self, model, inputs, labels, rng, seed):
        """Damages `model` in place.

        Args:
            model: The model to damage (`Damage`'s private copy).
            inputs: The inputs the network serves (`Damage`'s `data`), or `None`.
            labels: Their labels, or `None`.
            rng: The `numpy.random.Generator` of this damage (seeded by `Damage`).
            seed: `Damage`'s seed, or `None`.

        Returns:
            A tuple `(record, zeroed)`: a JSON-ready dict of what was hit, and a dict
            mapping `id(variable)` to the boolean mask (`False` = zeroed and held at zero)
            of every variable this fault zeroes.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `apply`.")

    # Shared helpers.

    def selected_layers(self, model):
        """The layers named by `layers` (checked against `model`), or `None` for all."""
        if self.layers is None:
            return None
        by_name = {layer.name: layer for layer in all_layers(model)}
        unknown = [name for name in self.layers if name not in by_name]
        if unknown:
            raise ValueError(
                f"`layers` names layers that model `{model.name}` does not have: "
                f"{unknown}. Expected names among {sorted(by_name)}. "
                f"Received: layers={self.layers!r}"
            )
        return [by_name[name] for name in self.layers]

    def variables_of(self, model, kernels_only=False):
        """Trainable variables of the selected layers (only Dense/Conv kernels, and the
        other weights `keras_fip.core.projection.prunable_variables` lists, if asked)."""
        pool = (
            projection.prunable_variables(model)
            if kernels_only
            else list(model.trainable_variables)
        )
        selected = self.selected_layers(model)
        if selected is None:
            chosen = pool
        else:
            wanted = {id(w) for layer in selected for w in layer.trainable_weights}
            chosen = [v for v in pool if id(v) in wanted]
        if not chosen:
            what = "Dense/Conv kernels" if kernels_only else "trainable weights"
            raise ValueError(
                f"`layers` selects no {what} of model `{model.name}`. "
                f"Received: layers={self.layers!r}"
            )
        return chosen

    @staticmethod
    def free_indices(model, variables):
        """Flat indices of each variable's entries not held at zero by a mask the model
        carries (masked weights are absent from the network: damage never touches them)."""
        free = []
        for variable in variables:
            mask = mask_of(variable)
            size = int(np.prod(variable.shape, dtype=np.int64))
            free.append(np.arange(size) if mask is None else np.flatnonzero(mask))
        return free

    @classmethod
    def check_amount(cls, fraction, count):
        """`(fraction, count)` checked: at most one given, a fraction in [0, 1], a count ≥ 0."""
        if fraction is not None and count is not None:
            raise ValueError(
                "Pass at most one of `fraction` and `count`. "
                f"Received: fraction={fraction!r}, count={count!r}"
            )
        if fraction is not None:
            fraction = cls.check_number(fraction, "fraction", low=0.0, high=1.0, low_inclusive=True)
        if count is not None:
            count = cls.check_number(count, "count", low=0, low_inclusive=True, integer=True)
        return fraction, count

    @staticmethod
    def number(fraction, count, total, what):
        """`round(fraction·total)`, or `count` checked against `total`."""
        if count is None:
            return int(round(fraction * total))
        if count > total:
            raise ValueError(
                f"`count` must be at most the number of {what} ({total}). Received: count={count}"
            )
        return int(count)

    @staticmethod
    def draw(free, rng, how_many, scope="global"):
        """A seeded prefix of a permutation of the free entries: sorted flat indices per
        variable. `how_many(total)` gives the number drawn from `total` entries."""
        if scope == "global":
            pool = np.concatenate(free) if free else np.zeros(0, np.int64)
            owner = np.repeat(np.arange(len(free)), [f.size for f in free])
            chosen = rng.permutation(pool.size)[: how_many(pool.size)]
            return [np.sort(pool[chosen[owner[chosen] == i]]) for i in range(len(free))]
        return [np.sort(f[rng.permutation(f.size)[: how_many(f.size)]]) for f in free]

    @staticmethod
    def add(variables, perturbation):
        """Adds `perturbation` (arrays aligned with `variables`) to the variables."""
        for variable, delta in zip(variables, perturbation):
            variable.assign((variable.numpy().astype(np.float64) + delta).astype(variable.dtype))

    # Serialisation.

    def get_config(self):
        """The constructor arguments.

        Returns:
            A dict.
        """
        return {"layers": self.layers}
