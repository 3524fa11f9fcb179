import numpy as np
import pytest
import tensorflow as tf

from keras_fip.geometry import metric_diagonal
from tests.geometry.conftest import dense_metric


def _dense_fisher(model, inputs):
    """(1/N) Σ_x J_xᵀ (diag(p) − p pᵀ) J_x from explicit per-example Jacobians."""
    variables = model.trainable_variables
    total = 0.0
    for example in inputs:
        with tf.GradientTape() as tape:
            logits = tf.reshape(model(example[None], training=False), [-1])
        jacobian = np.concatenate(
            [
                np.reshape(j.numpy(), [logits.shape[0], -1])
                for j in tape.jacobian(logits, variables)
            ],
            axis=1,
        )
        p = tf.nn.softmax(logits).numpy()
        total = total + jacobian.T @ (np.diag(p) - np.outer(p, p)) @ jacobian
    return total / len(inputs)


def _flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


@pytest.mark.parametrize("problem", ["mlp_problem", "conv_problem"])
def test_jacobian_diagonal_matches_dense_metric(problem, request):
    model, inputs = request.getfixturevalue(problem)
    before = [np.array(v) for v in model.weights]
    estimate = _flat(metric_diagonal(model, inputs, probes=3000, batch_size=4, seed=0))
    exact = np.diag(dense_metric(model, inputs))
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.06
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, np.array(new))


def test_fisher_diagonal_matches_dense_fisher(mlp_problem):
    model, inputs = mlp_problem
    estimate = _flat(metric_diagonal(model, inputs, kind="fisher", probes=3000, seed=0))
    exact = np.diag(_dense_fisher(model, inputs))
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.06


def test_subset_of_variables_and_seeded_repeatability(mlp_problem):
    model, inputs = mlp_problem
    kernel = model.get_layer("logits").kernel
    first = metric_diagonal(model, inputs, variables=[kernel], seed=3)
    second = metric_diagonal(model, inputs, variables=[kernel], seed=3)
    assert len(first) == 1 and first[0].shape == tuple(kernel.shape)
    np.testing.assert_array_equal(first[0], second[0])
    assert np.all(first[0] >= 0)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"kind": "hessian"}, "`kind`"),
        ({"probes": 0}, "`probes`"),
        ({"batch_size": -1}, "`batch_size`"),
        ({"variables": []}, "`variables`"),
    ],
)
def test_bad_arguments(mlp_problem, kwargs, argument):
    model, inputs = mlp_problem
    with pytest.raises(ValueError, match=argument):
        metric_diagonal(model, inputs, **kwargs)


def test_mirrored_strategy_estimate_matches_dense_fisher(mlp_problem, mirrored_strategy):
    import keras

    model, inputs = mlp_problem
    exact = np.diag(_dense_fisher(model, inputs))
    with mirrored_strategy.scope():
        replica_model = keras.models.clone_model(model)
        replica_model.set_weights(model.get_weights())
        estimate = _flat(metric_diagonal(replica_model, inputs, kind="fisher", probes=2000, seed=0))
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.08


@pytest.mark.parametrize("kind", ["jacobian", "fisher"])
def test_two_replicas_give_the_one_device_estimate(mlp_problem, mirrored_strategy, kind):
    # The probes are drawn per position in the global batch, not per replica: splitting
    # each batch over two replicas (7 examples in batches of 4: a ragged last batch, an
    # odd split) gives the same estimate as one device.
    import keras

    model, inputs = mlp_problem
    inputs = inputs[:7]
    alone = metric_diagonal(model, inputs, kind=kind, probes=3, batch_size=4, seed=5)
    with mirrored_strategy.scope():
        replica_model = keras.models.clone_model(model)
        replica_model.set_weights(model.get_weights())
        split = metric_diagonal(replica_model, inputs, kind=kind, probes=3, batch_size=4, seed=5)
    for got, want in zip(split, alone):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    other_seed = metric_diagonal(model, inputs, kind=kind, probes=3, batch_size=4, seed=6)
    assert not np.allclose(_flat(other_seed), _flat(alone), rtol=1e-3)
