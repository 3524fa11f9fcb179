"""`Schedule`: when `keras_fip.Compress` pulls, how its target sparsity ramps, how long it walks."""

import keras

from keras_fip.core import config
from keras_fip.core.config import Config
from keras_fip.operations.base import Operation

# The fewest steps an `epochs` budget gives: the pull needs enough steps for its targets to
# reach zero and the settle for the function to recover, however few the inputs.
MIN_STEPS = 1000
# `update_every="auto"`: every MAX_UPDATE_EVERY steps, or often enough for
# MIN_TARGET_UPDATES updates over the pull, but at most every MIN_UPDATE_EVERY steps
# (targets recomputed at every step chase the weights they move).
MAX_UPDATE_EVERY = 50
MIN_UPDATE_EVERY = 10
MIN_TARGET_UPDATES = 40


@keras.saving.register_keras_serializable(package="keras_fip")
class Schedule(Config):
    """When `keras_fip.Compress` pulls, how its target sparsity ramps, and how long it walks.

    The walk has two phases: the pull (`pull_fraction` of the steps), in which the prunable
    weights are pulled towards their projection onto a sparse set whose sparsity ramps from
    0 to p over the first `ramp_fraction` of the pull as tfmot's `PolynomialDecay` does
    (`p·(1 − (1 − t)^ramp_power)`, t the progress of the ramp), the target masks recomputed
    from the current weights every `update_every` steps; then the settle, with the final
    mask applied exactly and held fixed. An `epochs` budget of the walk (passes over
    `data`) is raised to `min_steps` steps, so that small data still get a walk long
    enough to pull and settle; a `steps` budget is taken as it is.

    Args:
        min_steps: The fewest steps an `epochs` budget gives. Defaults to `1000`.
        pull_fraction: Fraction of the steps spent pulling; the rest settle with the mask
            fixed. Defaults to `0.7`.
        ramp_fraction: Fraction of the pull over which the target sparsity ramps from 0 to
            p. Defaults to `0.7`.
        ramp_power: Exponent of the polynomial ramp. Defaults to `3`.
        update_every: Steps between recomputations of the target masks, or `"auto"`: every
            50 steps, or more often on short pulls so that the targets are recomputed 40
            times, but at most every 10 steps. Defaults to `"auto"`.

    Examples:

        >>> schedule = Schedule(min_steps=0, pull_fraction=0.5)
        >>> schedule.pull_steps(100), schedule.update_interval(50)
        (50, 10)
        >>> Schedule.from_config(schedule.get_config()) == schedule
        True
    """

    def __init__(
        self,
        min_steps=MIN_STEPS,
        pull_fraction=0.7,
        ramp_fraction=0.7,
        ramp_power=3,
        update_every="auto",
    ):
        check = Operation.check_number
        self.min_steps = check(min_steps, "min_steps", low=0, low_inclusive=True, integer=True)
        self.pull_fraction = check(pull_fraction, "pull_fraction", low=0.0, high=1.0)
        self.ramp_fraction = check(ramp_fraction, "ramp_fraction", low=0.0, high=1.0)
        self.ramp_power = check(ramp_power, "ramp_power", low=0.0)
        if not (isinstance(update_every, str) and update_every == "auto"):
            update_every = check(
                update_every, "update_every", low=1, low_inclusive=True, integer=True
            )
        self.update_every = update_every

    def total_steps(self, walk, num_examples):
        """The steps of the whole walk: the walk's `steps`, or its `epochs` over
        `num_examples` inputs raised to `min_steps`.

        Args:
            walk: A resolved `keras_fip.Walk`.
            num_examples: N, the inputs walked on.

        Returns:
            A positive int.
        """
        if walk.steps is not None:
            return walk.steps
        return max(walk.num_steps(num_examples), self.min_steps)

    def pull_steps(self, total_steps):
        """The steps of the pull in a walk of `total_steps` (at least one)."""
        return max(1, int(round(self.pull_fraction * total_steps)))

    def update_interval(self, pull_steps):
        """Steps between target-mask updates in a pull of `pull_steps` steps."""
        if not isinstance(self.update_every, str):
            return self.update_every
        return max(MIN_UPDATE_EVERY, min(MAX_UPDATE_EVERY, pull_steps // MIN_TARGET_UPDATES))

    def target_sparsity(self, step, pull_steps, sparsity):
        """The ramp's target sparsity at `step` of a pull of `pull_steps` steps towards
        `sparsity`."""
        ramp = max(1.0, pull_steps * self.ramp_fraction)
        progress = min(1.0, step / ramp)
        return sparsity * (1.0 - (1.0 - progress) ** self.ramp_power)

    def get_config(self):
        return {
            "min_steps": self.min_steps,
            "pull_fraction": self.pull_fraction,
            "ramp_fraction": self.ramp_fraction,
            "ramp_power": self.ramp_power,
            "update_every": self.update_every,
        }


def get(schedule):
    """A `Schedule` from a `Schedule`, its config or `None` (the defaults)."""
    return config.resolve(schedule, Schedule, "schedule")
