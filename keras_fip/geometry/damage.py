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
"""

import keras
import numpy as np

from keras_fip.geometry.paths import breakdown_speed


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

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> damaged = keras_fip.Damage("nodes", fraction=0.5, seed=0)(model)
    >>> points, times = damage_path(model, damaged, num_points=5)
    >>> len(points), float(times[-1])
    (5, 1.0)
    """
    _check_model(model, "model")
    _check_model(damaged, "damaged")
    if not isinstance(num_points, (int, np.integer)) or isinstance(num_points, bool) or (
            num_points < 2):
        raise ValueError(
            f"`num_points` must be an integer >= 2. Received: num_points={num_points!r}")
    start, end = model.get_weights(), damaged.get_weights()
    if len(start) != len(end) or any(a.shape != b.shape for a, b in zip(start, end)):
        raise ValueError(
            "`damaged` must have the same weight layout as `model`. Received: "
            f"damaged={damaged.name} with {len(end)} weights, model={model.name} with "
            f"{len(start)}"
        )
    times = np.linspace(0.0, 1.0, int(num_points))
    points = [
        [(a.astype(np.float64) + t * (b.astype(np.float64) - a)).astype(a.dtype)
         for a, b in zip(start, end)]
        for t in times
    ]
    # The end point is exactly the damaged network (zeros stay exact).
    points[-1] = [np.array(b) for b in end]
    return points, times


def deletion_sequence(model, fractions, seed=0, kind="nodes", scope="global", layers=None,
                      **damage_kwargs):
    """Progressively damaged copies of `model`: nested deletions at increasing fractions.

    Runs `keras_fip.Damage(kind, fraction=f, seed=seed, ...)` for each fraction; the same
    seed's permutation makes the deleted sets nested (those at 20% contain those at 10%),
    so the sequence is one path of deletion. For `"nodes"` a layer may be emptied
    (`allow_dead_layers=True` unless given), so the sequence can run to 100%.

    Args:
        model: The undamaged `keras.Model`. Not changed.
        fractions: Increasing deleted fractions in [0, 1] (e.g. `np.arange(0, 1.01, 0.05)`).
        seed: Seed of the deletion order. Defaults to `0`.
        kind: `"nodes"` or `"weights"`. Defaults to `"nodes"`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.
        layers: Names of the layers to delete from, or `None`. Defaults to `None`.
        **damage_kwargs: Further `Damage` arguments.

    Returns:
        A list of damaged `keras.Model`s, one per fraction (fraction 0 gives an undamaged
        copy).

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> sequence = deletion_sequence(model, [0.0, 0.5, 1.0])
    >>> len(sequence)
    3
    """
    from keras_fip.operations.damage import Damage

    _check_model(model, "model")
    if kind not in ("nodes", "weights"):
        raise ValueError(
            f"`kind` must be 'nodes' or 'weights'. Received: kind={kind!r}")
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size < 1 or np.any(np.diff(fractions) <= 0) or (
            np.any(fractions < 0) or np.any(fractions > 1)):
        raise ValueError(
            "`fractions` must be strictly increasing numbers in [0, 1]. "
            f"Received: fractions={fractions.tolist()!r}"
        )
    if kind == "nodes":
        damage_kwargs.setdefault("allow_dead_layers", True)
    return [
        Damage(kind, fraction=float(fraction), seed=seed, scope=scope, layers=layers,
               **damage_kwargs)(model)
        for fraction in fractions
    ]


def breakdown_profile(points, data, model=None, times=None, outputs="logits",
                      batch_size=None):
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
        outputs: `"logits"` or `"probabilities"`. Defaults to `"logits"`.
        batch_size: `MetricOperator` batch size. Defaults to `None`.

    Returns:
        A dict of numpy arrays and floats: `speed`, `speed_times` (segment starts),
        `acceleration`, `acceleration_times`, `energy`, `length`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> path = [[w * (1 + 0.1 * i) for w in model.get_weights()] for i in range(4)]
    >>> profile = breakdown_profile(path, np.ones((4, 3)), model=model)
    >>> profile["acceleration"].shape
    (2,)
    """
    if not isinstance(points, (list, tuple)) or len(points) < 3:
        raise ValueError(
            "`points` must be a list of at least 3 models or weight lists. "
            f"Received: {len(points) if isinstance(points, (list, tuple)) else points!r}")
    times = np.arange(len(points), dtype=np.float64) if times is None else np.asarray(
        times, np.float64)
    speed = breakdown_speed(points, data, model=model, times=times, outputs=outputs,
                            batch_size=batch_size)
    steps = np.diff(times)
    return {
        "speed": speed,
        "speed_times": times[:-1],
        "acceleration": np.diff(speed) / steps[1:],
        "acceleration_times": times[1:-1],
        "energy": float(np.sum(speed * steps)),
        "length": float(np.sum(np.sqrt(np.clip(speed, 0, None)) * steps)),
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

    Example:

    >>> knee([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [1.0, 0.99, 0.98, 0.96, 0.6, 0.1])
    0.6
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 3 or np.any(np.diff(x) <= 0):
        raise ValueError(
            "`x` must be at least 3 strictly increasing numbers and `y` the same number of "
            f"values. Received: x={x.tolist()!r}, y={y.tolist()!r}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"`y` must be finite. Received: y={y.tolist()!r}")
    span = y.max() - y.min()
    if span == 0:
        return float(x[0])
    scaled_x = (x - x[0]) / (x[-1] - x[0])
    scaled_y = (y - y.min()) / span
    chord = scaled_y[0] + (scaled_y[-1] - scaled_y[0]) * scaled_x
    return float(x[int(np.argmax(scaled_y - chord))])
