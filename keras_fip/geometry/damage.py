"""Where networks break: damage paths, progressive deletion sequences, the knee.

A damage path γ(t), t ∈ [0, 1], runs from the undamaged weights w to the damaged ones w_d:
`γ(t) = w + t·(w_d − w)`, i.e. the damaged coordinates are scaled by 1 − t (for deletions:
the deleted weights fade to zero) while the others stay put. A progressive deletion sequence
deletes nested sets of units (the same seed's permutation prefix) as the deleted fraction
grows, so that consecutive points differ by the units added at that step: its "time" is
the deleted fraction.

Along either, `breakdown_profile` measures what `keras_fip.geometry.breakdown_speed` and
`breakdown_acceleration` define: the break-down speed s_i = γ'ᵀ g(γ(t_i)) γ' on each
segment and its finite-difference derivative ds/dt (Eq. 11 of the resilience paper with
its dropped minus sign restored: we differentiate s directly rather than use the printed
closed form). Eq. 6's "length" ∫ γ'ᵀ g γ' dt has no square root: it is the path *energy*,
reported as `energy`; the metric length ∫ √(γ'ᵀ g γ') dt is reported as `length`.

A deletion sequence is not a smooth path but a jump process: each step deletes k = N·Δt of
the N units, and the squared output change of a step is, to first order, the sum of the k
units' own changes, so it grows like Δt, not Δt². Speeds of its segments divided by Δt²
(`breakdown_profile`) double when the step halves; the speeds of the segments also carry
the noise of which k units happened to go, and their second-order form at the segment's
start is not the change: a unit's output is bilinear in its incoming and outgoing weights,
both zeroed, so the linearised change is twice the true one. `deletion_profile` measures instead the
break-down speed of the deletion process itself, the limit Δt → 0 of E‖Δf‖²/Δt: at each
network of the sequence, `unit_deletion_speed` = N · mean over the surviving units u of
E_x ‖f(w without u; x) − f(w; x)‖², each unit deleted exactly (no expansion), which is the
expected break-down speed of deleting the next unit of a random order, step-independent.
Its acceleration is the finite difference between consecutive networks.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.geometry import units as units_lib
from keras_fip.geometry.paths import breakdown_speed

OUTPUTS = ("logits", "probabilities")


def _check_model(model, name):
    if not isinstance(model, keras.Model):
        raise ValueError(f"`{name}` must be a `keras.Model`. Received: {name}={model!r}")


def damage_path(model, damaged, num_points=11):
    """Points of the straight damage path γ(t) = w + t·(w_d − w) from `model` to `damaged`.

    For zeroing damage this scales the damaged coordinates by 1 − t and leaves the others
    as they are; for additive damage (Gaussian, eigen, bit flips) it is the straight line
    between the two weight vectors. Every weight is interpolated (non-trainable ones too;
    `Damage` leaves them equal, so they stay put).

    Args:
        model: The undamaged `keras.Model`. Not changed.
        damaged: A `keras.Model` with the same weight layout (e.g. `Damage(...)(model)`).
            Not changed.
        num_points: Number of points, at least 2, at `t = linspace(0, 1, num_points)`.
            Defaults to `11`.

    Returns:
        A tuple `(points, times)`: a list of `num_points` weight lists (in
        `model.get_weights()` order, ready for `breakdown_speed(points, data, model=model,
        times=times)`) and the numpy array of times.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           keras.layers.Dense(2)])
        >>> damaged = deletion_sequence(model, [0.5])[0]
        >>> points, times = damage_path(model, damaged, num_points=5)
        >>> len(points), float(times[-1])
        (5, 1.0)
    """
    _check_model(model, "model")
    _check_model(damaged, "damaged")
    if (
        not isinstance(num_points, (int, np.integer))
        or isinstance(num_points, bool)
        or (num_points < 2)
    ):
        raise ValueError(
            f"`num_points` must be an integer >= 2. Received: num_points={num_points!r}"
        )
    start, end = model.get_weights(), damaged.get_weights()
    if len(start) != len(end) or any(a.shape != b.shape for a, b in zip(start, end)):
        raise ValueError(
            "`damaged` must have the same weight layout as `model`. Received: "
            f"damaged={damaged.name} with {len(end)} weights, model={model.name} with "
            f"{len(start)}"
        )
    times = np.linspace(0.0, 1.0, int(num_points))
    points = [
        [
            (a.astype(np.float64) + t * (b.astype(np.float64) - a)).astype(a.dtype)
            for a, b in zip(start, end)
        ]
        for t in times
    ]
    # The end point is exactly the damaged network (zeros stay exact).
    points[-1] = [np.array(b) for b in end]
    return points, times


def deletion_sequence(model, fractions, seed=0, scope="global", layers=None):
    """Progressively damaged copies of `model`: nested unit deletions at growing fractions.

    For each fraction, a copy of `model` with that fraction of its hidden units deleted
    (`keras_fip.geometry.units`: incoming weights, bias, BatchNorm scale and offset and
    outgoing weights zeroed and held by masks), the units drawn by
    `keras_fip.geometry.units.choose_units` from a generator seeded with `seed`: the same
    units `keras_fip.Damage(keras_fip.faults.Nodes(fraction=f), seed=seed)` deletes, and
    nested (those at 20% contain those at 10%), so the sequence is one path of deletion.
    A layer may be emptied, so the sequence can run to 100%.

    Args:
        model: The undamaged Sequential or functional `keras.Model`. Not changed.
        fractions: Increasing deleted fractions in [0, 1] (e.g. `np.arange(0, 1.01, 0.05)`).
        seed: Seed of the deletion order. Defaults to `0`.
        scope: `"global"` (the fraction of all hidden units) or `"per_layer"` (of each
            layer's). Defaults to `"global"`.
        layers: Names of the layers to delete from, or `None` for every hidden Dense/Conv
            layer. Defaults to `None`.

    Returns:
        A list of new `keras.Model`s, one per fraction (fraction 0 gives an undamaged
        copy).

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
        ...                           keras.layers.Dense(2)])
        >>> sequence = deletion_sequence(model, [0.0, 0.5, 1.0])
        >>> [len(units_lib.hidden_units(m)["hidden"][1]) for m in sequence]
        [0, 4, 8]
    """
    _check_model(model, "model")
    fractions = np.asarray(fractions, dtype=np.float64)
    if (
        fractions.ndim != 1
        or fractions.size < 1
        or np.any(np.diff(fractions) <= 0)
        or (np.any(fractions < 0) or np.any(fractions > 1))
    ):
        raise ValueError(
            "`fractions` must be strictly increasing numbers in [0, 1]. "
            f"Received: fractions={fractions.tolist()!r}"
        )
    if scope not in units_lib.SCOPES:
        raise ValueError(
            f"`scope` must be one of {list(units_lib.SCOPES)}. Received: scope={scope!r}"
        )
    if layers is not None and (
        isinstance(layers, str) or not layers or not all(isinstance(n, str) for n in layers)
    ):
        raise ValueError(
            "`layers` must be `None` or a non-empty list of layer names. "
            f"Received: layers={layers!r}"
        )
    units_lib.unit_plans(model, layers)  # Checks the layers before any copy.
    sequence = []
    for fraction in fractions:
        copy = copy_model(model)
        plans = units_lib.unit_plans(copy, layers)
        chosen = units_lib.choose_units(
            plans, np.random.default_rng(seed), fraction=float(fraction), scope=scope
        )
        by_id = units_lib.unit_masks(plans, chosen)
        if by_id:
            masks_lib.apply_masks(copy, [by_id.get(id(v)) for v in copy.trainable_variables])
        sequence.append(copy)
    return sequence


def breakdown_profile(points, data, model=None, times=None, outputs="logits", batch_size=None):
    """Break-down speed, acceleration, path energy (Eq. 6) and metric length along a path.

    `speed[i] = γ'_iᵀ g(w_i) γ'_i` on segment i (`keras_fip.geometry.breakdown_speed`),
    `acceleration[i] = (speed[i+1] − speed[i]) / (t_{i+1} − t_i)` at the shared point
    t_{i+1} (Eq. 11, sign restored: ds/dt itself), `energy = Σ speed_i Δt_i` (Eq. 6 as
    printed, no square root) and `length = Σ √speed_i Δt_i` (the metric length).

    Args:
        points: List of at least 3 `keras.Model`s or weight lists.
        data: Inputs on which g is measured (array, `(x, y)` or dataset).
        model: Architecture for weight-list points. Defaults to `None`.
        times: Strictly increasing times of the points; `None` means 0, 1, 2, ....
            Defaults to `None`.
        outputs: `"logits"` (a probability model's log-probabilities) or
            `"probabilities"` (a logits model's softmax; the same for a model and its
            softmax twin). Defaults to `"logits"`.
        batch_size: `MetricOperator` batch size. Defaults to `None`.

    Returns:
        A dict of numpy arrays and floats: `speed`, `speed_times` (segment starts),
        `acceleration`, `acceleration_times`, `energy`, `length`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> path = [[w * (1 + 0.1 * i) for w in model.get_weights()] for i in range(4)]
        >>> profile = breakdown_profile(path, np.ones((4, 3)), model=model)
        >>> profile["acceleration"].shape
        (2,)
    """
    if not isinstance(points, (list, tuple)) or len(points) < 3:
        raise ValueError(
            "`points` must be a list of at least 3 models or weight lists. "
            f"Received: {len(points) if isinstance(points, (list, tuple)) else points!r}"
        )
    times = (
        np.arange(len(points), dtype=np.float64) if times is None else np.asarray(times, np.float64)
    )
    speed = breakdown_speed(
        points, data, model=model, times=times, outputs=outputs, batch_size=batch_size
    )
    steps = np.diff(times)
    return {
        "speed": speed,
        "speed_times": times[:-1],
        "acceleration": np.diff(speed) / steps[1:],
        "acceleration_times": times[1:-1],
        "energy": float(np.sum(speed * steps)),
        "length": float(np.sum(np.sqrt(speed) * steps)),
    }


def knee(x, y):
    """The knee of a curve that holds and then falls: the point farthest above its chord.

    Kneedle's criterion (Satopää et al., 2011) without smoothing: x and y are scaled to
    [0, 1] and the knee is the x that maximises the height of the scaled curve above the
    straight line joining its end points. For accuracy against the deleted fraction it is
    where the network stops coping and starts collapsing.

    Args:
        x: Increasing abscissae (e.g. deleted fractions), at least 3.
        y: Values at `x` (e.g. accuracies), falling overall.

    Returns:
        The knee's x, a Python float.

    Examples:

        >>> knee([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [1.0, 0.99, 0.98, 0.96, 0.6, 0.1])
        0.6
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 3 or np.any(np.diff(x) <= 0):
        raise ValueError(
            "`x` must be at least 3 strictly increasing numbers and `y` the same number of "
            f"values. Received: x={x.tolist()!r}, y={y.tolist()!r}"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError(f"`y` must be finite. Received: y={y.tolist()!r}")
    span = y.max() - y.min()
    if span == 0:
        return float(x[0])
    scaled_x = (x - x[0]) / (x[-1] - x[0])
    scaled_y = (y - y.min()) / span
    chord = scaled_y[0] + (scaled_y[-1] - scaled_y[0]) * scaled_x
    return float(x[int(np.argmax(scaled_y - chord))])


def _check_outputs(outputs):
    if outputs not in OUTPUTS:
        raise ValueError(f"`outputs` must be one of {OUTPUTS}. Received: outputs={outputs!r}")


class _UnitDeleter:
    """Squared output change of deleting each surviving hidden unit of one architecture.

    One working copy of the model and one traced function per deletable layer: a unit is
    deleted by multiplying the layer's silencing targets (`keras_fip.geometry.units`: its
    incoming kernel slice and bias, BatchNorm scale and offset, outgoing weights) by a mask
    built from the unit's index, the outputs on the inputs compared with the network's own,
    and the variables restored. Nothing is retraced per unit or per network.
    """

    def __init__(self, model, x, outputs, layers, batch_size):
        self.working = copy_model(model)
        self.outputs = outputs
        self.plans = units_lib.unit_plans(self.working, layers)
        self.layers = layers
        self.num_units = int(sum(plan.channels for plan in self.plans))
        inputs = tf.nest.map_structure(
            tf.constant, data_adapter.cast_inputs(self.working, data_adapter.as_arrays(x))
        )
        count, size = data_adapter.num_examples(x), int(batch_size)
        kind = outputs_lib.output_kind(self.working, data_adapter.take(x, slice(0, 64)))

        def forward():
            pieces = []
            for start in range(0, count, size):
                values = self.working(
                    tf.nest.map_structure(lambda t, start=start: t[start : start + size], inputs),
                    training=False,
                )
                if outputs == "probabilities":
                    values = outputs_lib.as_probabilities(values, kind)
                else:
                    values = outputs_lib.as_logits(values, kind)
                pieces.append(
                    tf.reshape(tf.cast(values, tf.float64), [-1, int(np.prod(values.shape[1:]))])
                )
            return tf.concat(pieces, axis=0)

        self._forward = tf.function(forward)
        self._changes = [self._change_function(plan, forward) for plan in self.plans]

    @staticmethod
    def _change_function(plan, forward):
        targets = plan.targets
        channels = plan.channels

        @tf.function
        def change(unit, base):
            saved = [tf.identity(variable.value) for variable, _, _ in targets]
            for variable, axis, spatial in targets:
                size = int(variable.shape[axis])
                indices = tf.range(spatial) * channels + unit
                keep = 1.0 - tf.reduce_sum(tf.one_hot(indices, size, dtype=variable.dtype), axis=0)
                shape = [1] * len(variable.shape)
                shape[axis] = size
                variable.assign(variable.value * tf.reshape(keep, shape))
            after = forward()
            for (variable, _, _), value in zip(targets, saved):
                variable.assign(value)
            return tf.reduce_mean(tf.reduce_sum(tf.square(after - base), axis=-1))

        return change

    def __call__(self, point, max_units=None, rng=None):
        """(N · mean squared change, per-unit changes, number of surviving units)."""
        self.working.set_weights(point.get_weights())
        deleted = units_lib.hidden_units(point, self.layers)
        base = self._forward()
        candidates = []
        for index, plan in enumerate(self.plans):
            gone = set(deleted.get(plan.layer.name, (plan.channels, []))[1])
            candidates += [(index, unit) for unit in range(plan.channels) if unit not in gone]
        alive = len(candidates)
        if max_units is not None and alive > max_units:
            chosen = rng.choice(alive, size=max_units, replace=False)
            candidates = [candidates[i] for i in np.sort(chosen)]
        changes = np.array(
            [
                float(self._changes[index](tf.constant(unit, tf.int32), base))
                for index, unit in candidates
            ]
        )
        speed = float(self.num_units * np.mean(changes)) if changes.size else 0.0
        return speed, changes, alive


def _check_positive(value, name, allow_none=False):
    if allow_none and value is None:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer{' or None' if allow_none else ''}. "
            f"Received: {name}={value!r}"
        )


def unit_deletion_speed(
    model, data, outputs="probabilities", layers=None, max_units=None, seed=None, batch_size=1024
):
    """The break-down speed of deleting one more hidden unit, at a (damaged) network.

    With N deletable hidden units (`keras_fip.geometry.units.unit_plans`, of `layers`) the
    deleted fraction grows by 1/N per unit, so the expected break-down speed of a random
    deletion order at this network is `N · mean_u E_x ‖f(w without u; x) − f(w; x)‖²`
    over the surviving units u, each deleted exactly (its incoming slice, bias, BatchNorm
    scale/offset and outgoing weights zeroed, as `keras_fip.faults.Nodes` does) with the
    others as they are. It is the limit of `E‖Δf‖² / Δt` as the deletion step Δt
    shrinks: the speed of the deletion process, independent of any step size (see the
    module docstring).

    Args:
        model: A Sequential or functional `keras.Model`, possibly damaged by
            `keras_fip.faults.Nodes` (its deleted units are read from the masks it
            carries). Not changed.
        data: Inputs on which outputs are compared (array or `(x, y)`).
        outputs: `"probabilities"` (a logits model's softmax, a probability model's own
            outputs: the same for a model and its softmax twin) or `"logits"` (a
            probability model's log-probabilities). Defaults to
            `"probabilities"`.
        layers: Names of the layers whose units count, or `None` for every hidden
            Dense/Conv layer. Defaults to `None`.
        max_units: Delete at most this many surviving units (a seeded sample) instead of
            all of them. Defaults to `None` (all).
        seed: Seed of the sample. Defaults to `None`.
        batch_size: Inputs per forward pass. Defaults to `1024`.

    Returns:
        A dict: `speed` (float), `changes` (numpy array, the mean squared output change of
        each unit deleted), `num_units` (N) and `num_alive` (surviving units).

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"),
        ...                           keras.layers.Dense(2)])
        >>> result = unit_deletion_speed(model, np.ones((3, 4)))
        >>> result["num_units"], result["num_alive"]
        (8, 8)
    """
    _check_model(model, "model")
    _check_outputs(outputs)
    _check_positive(max_units, "max_units", allow_none=True)
    _check_positive(batch_size, "batch_size")
    x, _ = normalize_data(data, name="data", model=model)
    check_inputs_match_model(model, x)
    deleter = _UnitDeleter(model, x, outputs, layers, batch_size)
    speed, changes, alive = deleter(model, max_units, np.random.default_rng(seed))
    return {"speed": speed, "changes": changes, "num_units": deleter.num_units, "num_alive": alive}


def deletion_profile(
    sequence,
    data,
    times,
    outputs="probabilities",
    layers=None,
    max_units=None,
    seed=None,
    batch_size=1024,
):
    """Break-down speed and acceleration of a progressive deletion sequence.

    At each network of `sequence` that still has units, the speed is
    `unit_deletion_speed` (the expected break-down speed of deleting the next unit, per
    unit of deleted fraction); the acceleration is its finite difference
    `(s_{i+1} − s_i) / (t_{i+1} − t_i)`, placed at the midpoint of the two times. Unlike
    `breakdown_profile` on the same sequence, neither depends on the step of the sequence
    (see the module docstring).

    Args:
        sequence: At least 3 `keras.Model`s, e.g. from `deletion_sequence`.
        data: Inputs on which outputs are compared.
        times: Strictly increasing deleted fractions of the networks.
        outputs: `"probabilities"` or `"logits"`, as for `unit_deletion_speed`. Defaults
            to `"probabilities"`.
        layers: Names of the layers whose units count (those the sequence deletes from),
            or `None`. Defaults to `None`.
        max_units: Units deleted per network, at most (a seeded sample). Defaults to
            `None` (all).
        seed: Seed of the samples. Defaults to `None`.
        batch_size: Inputs per forward pass. Defaults to `1024`.

    Returns:
        A dict of numpy arrays: `speed` and `speed_times` (the networks with surviving
        units), `acceleration` and `acceleration_times` (midpoints), `num_alive`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"),
        ...                           keras.layers.Dense(2)])
        >>> sequence = deletion_sequence(model, [0.0, 0.25, 0.5, 1.0])
        >>> profile = deletion_profile(sequence, np.ones((3, 4)), [0.0, 0.25, 0.5, 1.0])
        >>> profile["speed_times"].tolist(), profile["acceleration_times"].tolist()
        ([0.0, 0.25, 0.5], [0.125, 0.375])
    """
    if (
        not isinstance(sequence, (list, tuple))
        or len(sequence) < 3
        or not all(isinstance(point, keras.Model) for point in sequence)
    ):
        raise ValueError(
            f"`sequence` must be a list of at least 3 `keras.Model`s. Received: {sequence!r}"[:300]
        )
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (len(sequence),) or np.any(np.diff(times) <= 0):
        raise ValueError(
            f"`times` must be {len(sequence)} strictly increasing numbers, one per network. "
            f"Received: times={times.tolist()!r}"
        )
    _check_outputs(outputs)
    _check_positive(max_units, "max_units", allow_none=True)
    _check_positive(batch_size, "batch_size")
    x, _ = normalize_data(data, name="data", model=sequence[0])
    check_inputs_match_model(sequence[0], x)
    deleter = _UnitDeleter(sequence[0], x, outputs, layers, batch_size)
    rng = np.random.default_rng(seed)
    speeds, alive = [], []
    for point in sequence:
        speed, _, count = deleter(point, max_units, rng)
        if count == 0:
            break
        speeds.append(speed)
        alive.append(count)
    speeds = np.array(speeds)
    kept = times[: len(speeds)]
    return {
        "speed": speeds,
        "speed_times": kept,
        "acceleration": np.diff(speeds) / np.diff(kept),
        "acceleration_times": (kept[:-1] + kept[1:]) / 2,
        "num_alive": np.array(alive),
    }
