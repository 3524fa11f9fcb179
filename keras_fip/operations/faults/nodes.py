"""`Nodes`: deleted hidden units (neurons of Dense layers, filters of convolutions)."""

import keras

from keras_fip.geometry import units as units_lib
from keras_fip.operations.faults.fault import Fault

# The fraction of hidden units `Nodes()` deletes when given no number.
DEFAULT_FRACTION = 0.5


@keras.saving.register_keras_serializable(package="keras_fip")
class Nodes(Fault):
    """Deletes hidden units: neurons of Dense layers and filters of convolutions.

    Unit j's incoming kernel slice and bias are zeroed, and so are the scale and offset of
    channel j of a BatchNormalization that normalises it (traced through the functional
    graph, across activations, dropout and pooling), so its activation is exactly 0 in
    inference and in training mode. Its outgoing weights in the consuming Dense/Conv
    layers are zeroed too where the chain of layers allows (through Flatten: the rows
    `h·W·C + w·C + j` of the next Dense kernel). The output layer (any Dense/Conv that
    reaches a model output without crossing another weight layer) is never damaged
    (`keras_fip.geometry.units`). Every zeroed weight is held at zero by a mask, so later
    training and `keras_fip.Repair` keep it there.

    `scope="global"` deletes `round(fraction·U)` of all U hidden units, `"per_layer"`
    `round(fraction·u)` of each layer's u. The units are a seeded permutation's prefix, so
    one seed deletes nested sets as `fraction` grows (a progressive deletion sequence,
    `keras_fip.geometry.deletion_sequence`). The record lists the deleted units per layer
    (`"units"`).

    Args:
        fraction: Fraction in [0, 1] of the units to delete. Defaults to `None` (0.5 when
            neither `count` nor `units` is given).
        count: Number of units to delete instead of `fraction`. Defaults to `None`.
        units: The units to delete instead of `fraction`/`count`: a dict mapping layer
            names to unit indices (e.g. sampled among the undamaged units that
            `keras_fip.operations.hidden_units` lists). Defaults to `None`.
        layers: Names of the layers whose units may be deleted, or `None` for every
            hidden Dense/Conv layer. Defaults to `None`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.
        allow_dead_layers: Whether every unit of a layer may be deleted (the network then
            computes a constant past it). Defaults to `False`.

    Examples:

        >>> hidden = keras.layers.Dense(8, "relu", name="hidden")
        >>> model = keras.Sequential([keras.Input((4,)), hidden, keras.layers.Dense(2)])
        >>> damage = keras_fip.Damage(Nodes(fraction=0.25), seed=0)
        >>> damaged = damage(model)
        >>> damage.history["units"]
        {'hidden': [2, 4]}
        >>> Nodes.from_config(Nodes(count=3).get_config()) == Nodes(count=3)
        True
    """

    name = "nodes"
    zeroes = True

    def __init__(
        self,
        fraction=None,
        *,
        count=None,
        units=None,
        layers=None,
        scope="global",
        allow_dead_layers=False,
    ):
        super().__init__(layers=layers)
        if units is not None:
            if fraction is not None or count is not None:
                raise ValueError(
                    "`units` names the units to delete, instead of `fraction` and `count`. "
                    f"Received: units={units!r}, fraction={fraction!r}, count={count!r}"
                )
            units = units_lib.check_units(units)
        else:
            fraction, count = self.check_amount(fraction, count)
        self.fraction = fraction
        self.count = count
        self.units = units
        self.scope = self.check_choice(scope, "scope", units_lib.SCOPES)
        if not isinstance(allow_dead_layers, bool):
            raise ValueError(
                "`allow_dead_layers` must be a boolean. "
                f"Received: allow_dead_layers={allow_dead_layers!r}"
            )
        self.allow_dead_layers = allow_dead_layers

    def _budget(self):
        """(fraction, count) of the draw: the default fraction when neither is set."""
        if self.fraction is None and self.count is None:
            return DEFAULT_FRACTION, None
        return self.fraction, self.count

    def check(self, model):
        plans = units_lib.unit_plans(model, self.layers)
        if self.units is not None:
            chosen = units_lib.explicit_units(plans, self.units)
            self._check_alive(plans, [len(units) for units in chosen])
            return
        fraction, count = self._budget()
        sizes = [plan.channels for plan in plans]
        if not sizes:
            return
        if self.scope == "global":
            number = self.number(fraction, count, sum(sizes), "hidden units")
            # Whatever the draw, at least this many units of each layer are deleted.
            deleted = [number - (sum(sizes) - size) for size in sizes]
        else:
            self.number(fraction, count, min(sizes), "units of the smallest layer")
            deleted = [self.number(fraction, count, size, "units") for size in sizes]
        self._check_alive(plans, deleted)

    def _check_alive(self, plans, deleted):
        """Refuses a deletion of every unit of a layer, unless `allow_dead_layers`."""
        if self.allow_dead_layers:
            return
        for plan, number in zip(plans, deleted):
            if plan.channels and number >= plan.channels:
                argument = (
                    "units"
                    if self.units is not None
                    else ("count" if self.count is not None else "fraction")
                )
                per_layer = "use `scope='per_layer'`, " if self.scope == "global" else ""
                raise ValueError(
                    f"`{argument}` would delete every unit of layer `{plan.layer.name}` "
                    f"({plan.channels} units): the network would be constant past it. "
                    f"Lower `{argument}`, {per_layer}or pass `allow_dead_layers=True`. "
                    f"Received: fraction={self.fraction!r}, count={self.count!r}, "
                    f"units={self.units!r}"
                )

    def apply(self, model, inputs, labels, rng, seed):
        plans = units_lib.unit_plans(model, self.layers)
        if self.units is not None:
            chosen = units_lib.explicit_units(plans, self.units)
        else:
            fraction, count = self._budget()
            chosen = units_lib.choose_units(
                plans, rng, fraction=fraction, count=count, scope=self.scope
            )
        # A random draw may still take a whole layer.
        self._check_alive(plans, [len(units) for units in chosen])
        record = {
            "units": {plan.layer.name: sorted(units) for plan, units in zip(plans, chosen)},
            "num_hit": int(sum(len(units) for units in chosen)),
            "num_units": int(sum(plan.channels for plan in plans)),
        }
        return record, units_lib.unit_masks(plans, chosen)

    def get_config(self):
        return {
            "fraction": self.fraction,
            "count": self.count,
            "units": self.units,
            **super().get_config(),
            "scope": self.scope,
            "allow_dead_layers": self.allow_dead_layers,
        }
