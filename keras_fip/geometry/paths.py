"""Measurements along a path of weights: metric length, break-down speed, acceleration.

A path is a sequence of points w_0, ..., w_K at times t_0 < ... < t_K
(default t_i = i). On each segment the velocity is γ'_i = (w_{i+1} - w_i) /
(t_{i+1} - t_i) and the metric is taken at the segment's start, g_i = g(w_i),
so the break-down speed is s_i = γ'_iᵀ g_i γ'_i, the path length (Eq. 6) is
L = Σ_i s_i (t_{i+1} - t_i), and the break-down acceleration (Eq. 11) is the
finite difference ds/dt.
"""

import keras
import numpy as np

from keras_fip.geometry.metric import MetricOperator


def _point_weights(point, template, index):
    """(trainable arrays or None, all weight arrays or None) of one point."""
    if isinstance(point, keras.Model):
        return None, [np.asarray(w) for w in point.get_weights()]
    if isinstance(point, (list, tuple)):
        arrays = [np.asarray(w) for w in point]
        if template is None:
            raise ValueError(
                "`model` is required when `points` holds weight lists rather than "
                f"models. Received: model=None, points[{index}] a list"
            )
        if len(arrays) == len(template.weights):
            return None, arrays
        if len(arrays) == len(template.trainable_variables):
            return arrays, None
        raise ValueError(
            f"Each weight list in `points` must match `model.weights` "
            f"({len(template.weights)} arrays) or `model.trainable_variables` "
            f"({len(template.trainable_variables)} arrays). "
            f"Received: points[{index}] with {len(arrays)} arrays"
        )
    raise ValueError(
        "`points` must hold `keras.Model`s or lists of weight arrays. "
        f"Received: points[{index}]={point!r}"
    )


def _segment_speeds(points, data, model, times, outputs, batch_size, minimum):
    if not isinstance(points, (list, tuple)) or len(points) < minimum:
        raise ValueError(
            f"`points` must be a list of at least {minimum} models or weight "
            f"lists. Received: points={points!r}"
        )
    if model is not None and not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model` or None. Received: model={model!r}")
    if times is None:
        times = np.arange(len(points), dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (len(points),) or np.any(np.diff(times) <= 0):
        raise ValueError(
            f"`times` must be {len(points)} strictly increasing numbers, one per "
            f"point. Received: times={times!r}"
        )
    reference = model if model is not None else points[0]
    if not isinstance(reference, keras.Model):
        raise ValueError(
            "`model` is required when `points` holds weight lists rather than "
            f"models. Received: model=None, points[0]={type(reference).__name__}"
        )

    # One working copy; the given models are never touched.
    working = keras.models.clone_model(reference)
    working.set_weights(reference.get_weights())
    metric = MetricOperator(working, data, outputs=outputs, batch_size=batch_size)

    def load(point, index):
        trainable, everything = _point_weights(point, model, index)
        if everything is not None:
            working.set_weights(everything)
        else:
            for variable, value in zip(working.trainable_variables, trainable):
                variable.assign(value)
        return metric.flatten([np.asarray(v) for v in working.trainable_variables])

    # Speed on each segment, metric at its start
    flats = [load(point, index) for index, point in enumerate(points)]
    speeds = []
    for index in range(len(points) - 1):
        velocity = (flats[index + 1] - flats[index]) / (times[index + 1] - times[index])
        load(points[index], index)
        # ‖J γ'‖² from the tangent pass: no reverse pass, and never negative.
        speeds.append(metric.quadratic_form(velocity))
    return np.array(speeds), times


def breakdown_speed(points, data, model=None, times=None, outputs="logits", batch_size=None):
    """Break-down speed s_i = γ'_iᵀ g(w_i) γ'_i on each segment of a path.

    The squared rate at which the outputs on `data` change as the weights
    move along the path, to second order. A rising speed along a damage path
    warns of collapse.

    Args:
        points: list of `keras.Model`s or weight lists (`model.weights` or
            `model.trainable_variables` order), at least 2.
        data: inputs on which g is measured (array, `(x, y)` or dataset).
        model: architecture for weight-list points; ignored otherwise
            except as the source of non-trainable weights for
            trainable-only lists. Never modified. Defaults to `None`.
        times: strictly increasing times of the points; `None` means
            0, 1, 2, .... Defaults to `None`.
        outputs: `"logits"` (a probability model's log-probabilities) or
            `"probabilities"` (a logits model's softmax; the same for a model and its
            softmax twin). Defaults to `"logits"`.
        batch_size: `MetricOperator` batch size. Defaults to `None`.

    Returns:
        A numpy array of `len(points) - 1` speeds.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> path = [[w * (1 + 0.1 * i) for w in model.get_weights()] for i in range(3)]
        >>> breakdown_speed(path, np.ones((4, 3)), model=model).shape
        (2,)
    """
    speeds, _ = _segment_speeds(points, data, model, times, outputs, batch_size, 2)
    return speeds


def path_length(points, data, model=None, times=None, outputs="logits", batch_size=None):
    """Metric length L = ∫ γ'ᵀ g γ' dt of a path (Eq. 6), by the left-point rule.

    `L = Σ_i s_i (t_{i+1} - t_i)` with `s_i` the break-down speed of segment
    i. With unit time steps this is `Σ_i Δw_iᵀ g(w_i) Δw_i`, the summed
    second-order output change of each step.

    Args:
        points: list of `keras.Model`s or weight lists, at least 2.
        data: inputs on which g is measured.
        model: architecture for weight-list points. Defaults to `None`.
        times: strictly increasing times of the points. Defaults to `None`.
        outputs: `"logits"` (a probability model's log-probabilities) or
            `"probabilities"` (a logits model's softmax; the same for a model and its
            softmax twin). Defaults to `"logits"`.
        batch_size: `MetricOperator` batch size. Defaults to `None`.

    Returns:
        The length, a Python float.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> path = [[w * (1 + 0.1 * i) for w in model.get_weights()] for i in range(3)]
        >>> path_length(path, np.ones((4, 3)), model=model) >= 0
        True
    """
    speeds, times = _segment_speeds(points, data, model, times, outputs, batch_size, 2)
    return float(np.sum(speeds * np.diff(times)))


def breakdown_acceleration(points, data, model=None, times=None, outputs="logits", batch_size=None):
    """Break-down acceleration ds/dt along a path (Eq. 11), by finite differences.

    `a_i = (s_{i+1} - s_i) / (t_{i+1} - t_i)` from consecutive break-down
    speeds.

    Args:
        points: list of `keras.Model`s or weight lists, at least 3.
        data: inputs on which g is measured.
        model: architecture for weight-list points. Defaults to `None`.
        times: strictly increasing times of the points. Defaults to `None`.
        outputs: `"logits"` (a probability model's log-probabilities) or
            `"probabilities"` (a logits model's softmax; the same for a model and its
            softmax twin). Defaults to `"logits"`.
        batch_size: `MetricOperator` batch size. Defaults to `None`.

    Returns:
        A numpy array of `len(points) - 2` accelerations.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> path = [[w * (1 + 0.1 * i) for w in model.get_weights()] for i in range(4)]
        >>> breakdown_acceleration(path, np.ones((4, 3)), model=model).shape
        (2,)
    """
    speeds, times = _segment_speeds(points, data, model, times, outputs, batch_size, 3)
    return np.diff(speeds) / np.diff(times)[:-1]
