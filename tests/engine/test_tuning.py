"""Tests for the one grid search: edges extended while they win, bounds, ties, splits."""

import numpy as np
import pytest

from keras_fip.core import tuning


def test_extends_past_the_top_edge_by_the_grid_spacing_until_it_stops_winning():
    tried = []

    def score(value):
        tried.append(value)
        return -abs(np.log10(value) - np.log10(0.3))  # Best at 0.3.

    value, scores = tuning.grid_search(score, [1e-3, 1e-2])
    assert tried == [1e-3, 1e-2, 0.1, 1.0]
    assert value == 0.1 and set(scores) == {1e-3, 1e-2, 0.1, 1.0}


def test_extends_below_the_bottom_edge_and_respects_bounds_and_counts():
    value, scores = tuning.grid_search(lambda v: -v, [1.0, 10.0], low=0.05)
    assert sorted(scores) == [0.1, 1.0, 10.0]  # 0.01 is below `low`.
    assert value == 0.1
    value, scores = tuning.grid_search(lambda v: v, [1.0, 2.0], max_extensions=2)
    assert sorted(scores) == [1.0, 2.0, 4.0, 8.0] and value == 8.0


def test_zero_in_the_grid_uses_the_default_factor_above_it():
    value, scores = tuning.grid_search(lambda v: min(v, 1.0), [0.0, 1.0], high=10.0)
    # 1.0 wins alone, spacing undefined next to 0: 3× it; 3.0 ties 1.0 so the search stops.
    assert sorted(scores) == [0.0, 1.0, 3.0]
    assert value == 1.0  # Ties go to the smaller value.


def test_a_single_value_is_not_scored_and_diverged_runs_lose():
    assert tuning.grid_search(lambda v: 1 / 0, [0.5]) == (0.5, {})
    value, _ = tuning.grid_search({1.0: float("nan"), 2.0: 0.1, 3.0: None}.get, [1.0, 2.0, 3.0])
    assert value == 2.0
    assert tuning.best_value({1.0: 0.5, 2.0: 0.5}, prefer="larger") == 2.0


@pytest.mark.parametrize("grid", [[], [1.0, 1.0], [-1.0, 2.0], [float("inf")]])
def test_bad_grids_raise(grid):
    with pytest.raises(ValueError, match="`grid` must hold"):
        tuning.grid_search(lambda v: v, grid)


def test_validation_rows_are_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, validation = tuning.validation_rows(labels, 0.2, seed=3)
    assert np.intersect1d(train, validation).size == 0
    assert np.union1d(train, validation).tolist() == list(range(100))
    assert np.bincount(labels[validation]).tolist() == [2, 4, 6, 8]
    again = tuning.validation_rows(labels, 0.2, seed=3)
    assert np.array_equal(again[1], validation)
    assert not np.array_equal(tuning.validation_rows(labels, 0.2, seed=4)[1], validation)
    train, validation = tuning.validation_rows(None, 0.25, seed=0, count=8)
    assert len(validation) == 2 and len(train) == 6
