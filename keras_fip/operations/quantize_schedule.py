"""`QuantizeSchedule`: how `keras_fip.Quantize` moves its targets onto the grid."""

import keras

from keras_fip.operations.base import Operation

# The fewest steps an `epochs` budget gives: the pull needs enough steps for the weights to
# reach their grid points, however few the inputs.
MIN_STEPS = 300
# The share of the walk spent on the final grid after the pull.
SETTLE_FRACTION = 0.5


@keras.saving.register_keras_serializable(package="keras_fip")
class QuantizeSchedule:
    """How `keras_fip.Quantize` moves its targets onto the grid, and how long it walks.

    The quantised weights are pulled towards their projection onto the grid, recomputed
    from the current weights every `update_every` steps (scales included). With
    `start_bits` above the operation's bit width, the grid of the targets starts at
    `start_bits` and loses one bit at a time, evenly over the first `ramp_fraction` of
    the walk, so the weights reach the coarse grid through the finer ones; with
    `start_bits=None` the targets are on the final grid from the first step.

    The last `settle_fraction` of the walk settles on the final grid: each step the
    quantised weights are set to their projection, the step's gradient (of the output
    distance and the labels' term) is taken there and added to the latent weights they
    were projected from (a straight-through estimator), so weights can still change grid
    points while the function is kept; the scales are refitted every `update_every`
    steps. An `epochs` budget of the walk is raised to `min_steps` steps; a `steps`
    budget is taken as it is.

    Args:
        update_every: Steps between recomputations of the targets. Defaults to `10`.
        start_bits: Bit width of the first targets (2 to 8), or `None` (the final bit
            width throughout). Defaults to `None`.
        ramp_fraction: Fraction of the walk over which the bit width ramps down to the
            final one. Defaults to `0.5`.
        min_steps: The fewest steps an `epochs` budget gives. Defaults to `300`.
        settle_fraction: Fraction of the walk spent on the final grid (straight-through
            steps), after the pull. Defaults to `SETTLE_FRACTION`.

    Examples:

        >>> schedule = QuantizeSchedule(start_bits=8, ramp_fraction=0.5)
        >>> [schedule.bits_at(step, 100, 4) for step in (0, 10, 30, 49, 50, 99)]
        [8, 8, 6, 5, 4, 4]
        >>> schedule.settle_start(300)
        150
        >>> QuantizeSchedule.from_config(schedule.get_config()) == schedule
        True
    """

    def __init__(
        self,
        update_every=10,
        start_bits=None,
        ramp_fraction=0.5,
        min_steps=MIN_STEPS,
        settle_fraction=SETTLE_FRACTION,
    ):
        check = Operation.check_number
        self.update_every = check(
            update_every, "update_every", low=1, low_inclusive=True, integer=True
        )
        if start_bits is not None:
            start_bits = check(
                start_bits, "start_bits", low=2, high=8, low_inclusive=True, integer=True
            )
        self.start_bits = start_bits
        self.ramp_fraction = check(ramp_fraction, "ramp_fraction", low=0.0, high=1.0)
        self.min_steps = check(min_steps, "min_steps", low=0, low_inclusive=True, integer=True)
        self.settle_fraction = check(
            settle_fraction,
            "settle_fraction",
            low=0.0,
            high=1.0,
            low_inclusive=True,
            high_inclusive=False,
        )

    def total_steps(self, walk, num_examples):
        """The steps of the walk: the walk's `steps`, or its `epochs` over `num_examples`
        inputs raised to `min_steps`.

        Args:
            walk: A resolved `keras_fip.Walk`.
            num_examples: N, the inputs walked on.

        Returns:
            A positive int.
        """
        if walk.steps is not None:
            return walk.steps
        return max(walk.num_steps(num_examples), self.min_steps)

    def settle_start(self, total_steps):
        """The first step of the settle on the final grid in a walk of `total_steps`
        (`total_steps` when there is none).

        Args:
            total_steps: The steps of the walk.

        Returns:
            An int in `[0, total_steps]`.
        """
        return total_steps - int(round(self.settle_fraction * total_steps))

    def bits_at(self, step, total_steps, bits):
        """The bit width of the targets at `step` of a walk of `total_steps` to `bits`.

        Args:
            step: The step (0 is the first).
            total_steps: The steps of the walk.
            bits: The final bit width.

        Returns:
            An int between `bits` and `start_bits`.
        """
        if self.start_bits is None or self.start_bits <= bits:
            return bits
        levels = self.start_bits - bits
        ramp = max(1.0, self.ramp_fraction * total_steps)
        return max(bits, self.start_bits - int(levels * step / ramp))

    def get_config(self):
        return {
            "update_every": self.update_every,
            "start_bits": self.start_bits,
            "ramp_fraction": self.ramp_fraction,
            "min_steps": self.min_steps,
            "settle_fraction": self.settle_fraction,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"QuantizeSchedule({arguments})"


def get(schedule):
    """A `QuantizeSchedule` from a schedule, its config or `None` (the defaults)."""
    if schedule is None:
        return QuantizeSchedule()
    if isinstance(schedule, QuantizeSchedule):
        return schedule
    if isinstance(schedule, dict):
        if "class_name" in schedule:
            schedule = keras.saving.deserialize_keras_object(schedule)
        elif set(schedule) <= set(QuantizeSchedule().get_config()):
            schedule = QuantizeSchedule.from_config(schedule)
        if isinstance(schedule, QuantizeSchedule):
            return schedule
    raise ValueError(
        "`schedule` must be a `keras_fip.operations.quantize.QuantizeSchedule`, its config "
        "or None. "
        f"Received: schedule={schedule!r}"
    )
