"""Tests for the one auto-β rule: the objective put in the distance's units."""

import keras
import numpy as np
import pytest

from keras_fip.engine import beta
from keras_fip.geometry.diagonal import metric_diagonal


def _model_and_data():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    x = np.random.default_rng(1).normal(size=(200, 5)).astype("float32")
    return model, x


def _mean(diagonal):
    return float(np.mean(np.concatenate([np.ravel(d) for d in diagonal])))


def test_output_objectives_convert_kl_units_without_reading_the_model():
    model, x = _model_and_data()
    assert beta.auto_beta(2.0, model, x, "kl", "outputs") == 2.0
    assert beta.auto_beta(2.0, model, x, "bhattacharyya", "outputs") == 0.5


@pytest.mark.parametrize("distance,kind,factor", [("kl", "fisher", 1.0), ("l2", "jacobian", 2.0)])
def test_weight_objectives_scale_by_the_mean_hessian_diagonal_of_the_distance(
    distance, kind, factor
):
    model, x = _model_and_data()
    variables = model.trainable_variables[:1]
    value = beta.auto_beta(10.0, model, x, distance, "weights", variables=variables, seed=3)
    # The same examples and probes, by hand.
    rng = np.random.default_rng(3)
    rows = np.sort(rng.choice(len(x), len(x), replace=False))
    diagonal = metric_diagonal(model, x[rows], variables, kind=kind, seed=int(rng.integers(2**31)))
    assert value == pytest.approx(10.0 * factor * _mean(diagonal), rel=1e-6)
    assert value > 0


def test_l2_on_outputs_is_the_ratio_of_jacobian_and_fisher_curvatures():
    model, x = _model_and_data()
    value = beta.auto_beta(1.0, model, x, "l2", "outputs", seed=0)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(x), len(x), replace=False))
    probe = int(rng.integers(2**31))
    jacobian = _mean(metric_diagonal(model, x[rows], kind="jacobian", seed=probe))
    fisher = _mean(metric_diagonal(model, x[rows], kind="fisher", seed=probe))
    assert value == pytest.approx(2.0 * jacobian / fisher, rel=1e-6)


def test_bad_objective_raises():
    model, x = _model_and_data()
    with pytest.raises(ValueError, match="Received: objective='labels'"):
        beta.auto_beta(1.0, model, x, objective="labels")
