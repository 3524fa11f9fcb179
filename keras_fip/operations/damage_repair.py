"""`DamageRepair`: the iterative damage-repair loop (r∘D)^m of the damage-rescue paper."""

import keras
import numpy as np

from keras_fip.geometry.units import hidden_units
from keras_fip.operations.base import Operation
from keras_fip.operations.damage import Damage
from keras_fip.operations.faults.nodes import Nodes
from keras_fip.operations.repair import Repair


@keras.saving.register_keras_serializable(package="keras_fip")
class DamageRepair(Operation):
    """Damages and repairs a network in rounds: (r∘D)^m, a few units at a time.

    Each round deletes `count` hidden units (or `fraction` of all hidden units), drawn by a
    seeded sampler among the units not deleted yet (`keras_fip.operations.hidden_units`),
    with `keras_fip.Damage(keras_fip.faults.Nodes(units=...))`, then runs `repair` (a
    `keras_fip.Repair`) on the damaged network. Every repair aims at the network before
    the first round (the damage reference accumulates the deletions), so after `rounds`
    rounds the network has `rounds·count` units deleted and was repaired towards the
    original function all along. This is the iterative strategy the damage-rescue paper
    compares with repairing all the damage at once (`Nodes(count=rounds·count)` then
    `Repair`); it equals `keras_fip.chain` of the rounds' Damage/Repair pairs, with the
    sampler restricted to undamaged units.

    After a call, `op.history` holds the last call's `"rounds"` (per round: the units
    deleted, accuracy after the damage and after the repair, the repair's epochs and
    `epochs_to_recover`), `"cycles"` (the training epochs of all repairs together: each
    round counts its `epochs_to_recover`, or all its epochs when it did not recover),
    `"recovered"` (whether the last round recovered) and, with `keep_networks=True`,
    `"networks"`: the weights (`model.get_weights()` order) of the network after every
    repair, the set of resilient networks the loop visits. `op.path` is the last repair's
    path. Progress is printed per round unless the repair's walk has `verbose=0`.

    Args:
        rounds: m, the number of damage-repair rounds.
        count: Units deleted per round. Defaults to `None`.
        fraction: Fraction of all hidden units deleted per round (instead of `count`).
            Defaults to `None`.
        repair: The `keras_fip.Repair` run after each damage (`stop_at_target=True` makes
            each round stop once recovered). Defaults to `None` (`Repair()`, which needs
            data carried by the model or recorded by the damage).
        layers: Names of the layers whose units may be deleted, or `None` for all hidden
            Dense/Conv layers. Defaults to `None`.
        seed: Sampler seed. Defaults to `None`.
        keep_networks: Whether to keep every repaired network's weights in
            `op.history["networks"]`. Defaults to `False`.
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
        >>> _ = keras_fip.models.train_classifier(model, x, y, epochs=5)
        >>> repair = keras_fip.Repair((x, y), method="retrain",
        ...                           walk=keras_fip.Walk(epochs=1, verbose=0))
        >>> loop = keras_fip.DamageRepair(2, count=4, repair=repair, seed=0)
        >>> result = loop(model)
        >>> len(keras_fip.operations.hidden_units(result)["dense_1"][1])
        8
    """

    def __init__(
        self,
        rounds,
        *,
        count=None,
        fraction=None,
        repair=None,
        layers=None,
        seed=None,
        keep_networks=False,
        name=None,
    ):
        super().__init__(name=name)
        self.rounds = self.check_number(rounds, "rounds", low=1, low_inclusive=True, integer=True)
        if (count is None) == (fraction is None):
            raise ValueError(
                "Pass exactly one of `count` and `fraction` (the per-round budget). "
                f"Received: count={count!r}, fraction={fraction!r}"
            )
        if count is not None:
            count = self.check_number(count, "count", low=1, low_inclusive=True, integer=True)
        if fraction is not None:
            fraction = self.check_number(fraction, "fraction", low=0.0, high=1.0)
        if isinstance(repair, dict):
            repair = keras.saving.deserialize_keras_object(repair)
        if repair is not None and not isinstance(repair, Repair):
            raise ValueError(f"`repair` must be a `keras_fip.Repair`. Received: repair={repair!r}")
        layers = self.check_layer_names(layers)
        if seed is not None:
            seed = self.check_number(seed, "seed", low=0, low_inclusive=True, integer=True)
        if not isinstance(keep_networks, (bool, np.bool_)):
            raise ValueError(
                f"`keep_networks` must be a boolean. Received: keep_networks={keep_networks!r}"
            )
        self.count = count
        self.fraction = fraction
        self.repair = repair if repair is not None else Repair()
        self.layers = layers
        self.seed = seed
        self.keep_networks = bool(keep_networks)

    def _sample(self, model, rng):
        """`{layer: units}`: the round's units, drawn among the undamaged ones."""
        listing = hidden_units(model, self.layers)
        free = [
            (name, unit)
            for name, (size, deleted) in listing.items()
            for unit in sorted(set(range(size)) - set(deleted))
        ]
        total = sum(size for size, _ in listing.values())
        number = self.count if self.count is not None else int(round(self.fraction * total))
        if number > len(free):
            raise ValueError(
                f"A round would delete {number} units but only {len(free)} of {total} "
                "are left undamaged. Lower `rounds`, `count` or `fraction`. Received: "
                f"rounds={self.rounds}, count={self.count!r}, fraction={self.fraction!r}"
            )
        units = {}
        for index in np.sort(rng.permutation(len(free))[:number]):
            name, unit = free[index]
            units.setdefault(name, []).append(unit)
        return units

    def validate(self, model):
        self._sample(model, np.random.default_rng(0))  # The layers and the first round.
        self.repair.validate_data(model)

    def call(self, model):
        rng = np.random.default_rng(self.seed)
        rounds, cycles, networks = [], 0.0, []
        verbose = self.repair.walk.verbose not in (0, "0")
        for index in range(self.rounds):
            # Damage: a few undamaged units
            units = self._sample(model, rng)
            damaged = Damage(Nodes(units=units, allow_dead_layers=True))(model)
            # Repair towards the network before the first round
            model = self.repair(damaged)
            history = self.repair.history
            used = (
                history["epochs_to_recover"]
                if history["epochs_to_recover"] is not None
                else history["epochs"]
            )
            cycles += used
            if self.keep_networks:
                networks.append(model.get_weights())
            rounds.append(
                {
                    "round": index + 1,
                    "units": units,
                    "damaged_accuracy": history["val_accuracy"][0],
                    "repaired_accuracy": history["val_accuracy"][-1],
                    "epochs": history["epochs"],
                    "epochs_to_recover": history["epochs_to_recover"],
                    "undamaged_accuracy": history["undamaged_accuracy"],
                }
            )
            if verbose:
                print(
                    f"round {index + 1}/{self.rounds}: damaged "
                    f"{rounds[-1]['damaged_accuracy']:.4f} -> repaired "
                    f"{rounds[-1]['repaired_accuracy']:.4f} in {used:g} epochs"
                )
        self.path = self.repair.path
        self.history = {
            "rounds": rounds,
            "cycles": cycles,
            "recovered": rounds[-1]["epochs_to_recover"] is not None,
        }
        if self.keep_networks:
            self.history["networks"] = networks
        return model

    def get_config(self):
        return {
            **super().get_config(),
            "rounds": self.rounds,
            "count": self.count,
            "fraction": self.fraction,
            "repair": keras.saving.serialize_keras_object(self.repair),
            "layers": self.layers,
            "seed": self.seed,
            "keep_networks": self.keep_networks,
        }
