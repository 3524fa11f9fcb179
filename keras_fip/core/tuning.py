"""Choosing a hyper-parameter on a validation split: one grid search for every caller.

The baselines' learning rates, EWC's λ and the weight an operation gives the labels are all
chosen the same way: each value of a grid is scored on held-out data, and while a value at
the grid's edge is the best alone the grid is extended one step past that edge (the grid's
own spacing there), so the choice is never cut off by where the grid happened to end.
"""

import math

import numpy as np

# The step past an edge whose spacing is undefined (a grid of one value beside 0).
DEFAULT_FACTOR = 3.0


def _score(value):
    """A comparable score: `None` and NaN (a diverged run) are the worst."""
    if value is None:
        return -math.inf
    value = float(value)
    return -math.inf if not math.isfinite(value) else value


def best_value(scores, prefer="smaller"):
    """The value with the highest score; ties go to the `prefer`red end.

    Args:
        scores: A dict `{value: score}` (higher is better; `None` or NaN the worst).
        prefer: `"smaller"` or `"larger"`: which value wins a tie. Defaults to
            `"smaller"`.

    Returns:
        The chosen value.

    Examples:

        >>> best_value({1e-3: 0.90, 3e-3: 0.95, 1e-2: 0.95})
        0.003
    """
    if not scores:
        raise ValueError("`scores` must hold at least one value. Received: {}")
    sign = 1 if prefer == "smaller" else -1
    return min(scores, key=lambda value: (-_score(scores[value]), sign * value))


def extend_grid(scores, low=None, high=None, extended=None, max_extensions=3):
    """The value to try next past an edge of the values tried that is the best alone.

    One grid step beyond the largest (smallest) value tried when it is the best alone (the
    ratio of the two values at that edge), within `[low, high]`, at most `max_extensions`
    times each way (counted in `extended`). Searches that score values asynchronously call
    it once all scores so far are in; `grid_search` runs the whole loop.

    Args:
        scores: `{value: score}` of every value tried (higher is better; `None` or NaN for
            a diverged run).
        low: The smallest value an extension may reach, or `None`. Defaults to `None`.
        high: The largest value an extension may reach, or `None`. Defaults to `None`.
        extended: `{"up": n, "down": n}`, the extensions made so far (updated). Defaults
            to `None` (none made).
        max_extensions: Extensions past each edge at most. Defaults to `3`.

    Returns:
        A list of at most one new value (empty: the search is over).

    Examples:

        >>> extend_grid({1e-3: 0.8, 1e-2: 0.9})
        [0.1]
        >>> extend_grid({1e-3: 0.8, 1e-2: 0.9}, high=0.05)
        []
    """
    extended = {"up": 0, "down": 0} if extended is None else extended
    if len(scores) < 2:
        return []
    values = sorted(scores)
    best = max(_score(s) for s in scores.values())
    alone = [v for v in values if _score(scores[v]) == best]
    if alone == [values[-1]] and values[-1] > 0 and extended["up"] < max_extensions:
        factor = values[-1] / values[-2] if values[-2] > 0 else DEFAULT_FACTOR
        value = float(f"{values[-1] * factor:.3g}")
        if high is None or value <= high * (1 + 1e-9):
            extended["up"] += 1
            return [value]
    if alone == [values[0]] and values[0] > 0 and extended["down"] < max_extensions:
        value = float(f"{values[0] / (values[1] / values[0]):.3g}")
        if low is None or value >= low * (1 - 1e-9):
            extended["down"] += 1
            return [value]
    return []


def grid_search(score, grid, low=None, high=None, max_extensions=3, prefer="smaller"):
    """Scores every value of `grid`, extending it past an edge that wins, and picks the best.

    `score(value)` is run for each value (in ascending order); then, while the largest
    (smallest) value tried is the best alone, one more value one grid step beyond it is tried
    (the ratio of the two values at that edge), at most `max_extensions` times each way and
    within `[low, high]`. A grid of one value is returned as it is, without a call.

    Args:
        score: A function `value -> score` (higher is better; `None` or NaN for a diverged
            run), measured on data the final result is not judged on.
        grid: The values to try (positive, or 0 at the low end).
        low: The smallest value an extension may reach, or `None`. Defaults to `None`.
        high: The largest value an extension may reach, or `None`. Defaults to `None`.
        max_extensions: Extensions past each edge at most. Defaults to `3`.
        prefer: Which value wins a tie, `"smaller"` or `"larger"`. Defaults to
            `"smaller"`.

    Returns:
        A tuple `(value, scores)`: the chosen value and `{value: score}` of every value
        tried (empty for a grid of one value).

    Examples:

        >>> accuracy = {1e-3: 0.90, 3e-3: 0.93, 1e-2: 0.95, 3e-2: 0.94}
        >>> grid_search(accuracy.get, [1e-3, 3e-3, 1e-2])
        (0.01, {0.001: 0.9, 0.003: 0.93, 0.01: 0.95, 0.0333: None})
    """
    grid = sorted(float(value) for value in grid)
    if not grid or any(not math.isfinite(v) or v < 0 for v in grid) or len(set(grid)) != len(grid):
        raise ValueError(
            f"`grid` must hold distinct non-negative finite values. Received: grid={grid!r}"
        )
    if prefer not in ("smaller", "larger"):
        raise ValueError(f"`prefer` must be 'smaller' or 'larger'. Received: prefer={prefer!r}")
    if len(grid) == 1:
        return grid[0], {}
    scores = {}
    extended = {"up": 0, "down": 0}
    pending = grid
    while pending:
        for value in pending:
            scores[value] = score(value)
        pending = [
            v for v in extend_grid(scores, low, high, extended, max_extensions) if v not in scores
        ]
    return best_value(scores, prefer), scores


def validation_rows(labels, fraction, seed, count=None):
    """Rows of a stratified, seeded validation split: `(train_rows, validation_rows)`.

    Each class keeps `fraction` of its examples for validation (at least one where it has two
    or more); without labels (`labels=None`) a plain seeded split of `count` rows.

    Args:
        labels: Integer labels, or `None`.
        fraction: The validation share, in (0, 1).
        seed: The split's seed.
        count: The number of examples when `labels` is `None`. Defaults to `None`.

    Returns:
        Two sorted integer arrays.

    Examples:

        >>> train, validation = validation_rows(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, 0)
        >>> len(train), len(validation)
        (6, 2)
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1). Received: fraction={fraction!r}")
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(count)
        held = max(1, int(round(fraction * count)))
        return np.sort(order[held:]), np.sort(order[:held])
    labels = np.asarray(labels).reshape(-1)
    held_rows = []
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        rows = rows[rng.permutation(len(rows))]
        held = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            held = min(max(held, 1), len(rows) - 1)
        held_rows.append(rows[:held])
    validation = np.sort(np.concatenate(held_rows)) if held_rows else np.array([], int)
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train, validation
