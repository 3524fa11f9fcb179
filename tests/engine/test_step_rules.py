"""Tests for the step rules: CG, normalized and metric steps against dense references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fip.engine import step_rules


def _split(vector, shapes):
    sizes = [int(np.prod(shape)) for shape in shapes]
    pieces = np.split(vector, np.cumsum(sizes)[:-1])
    return [tf.constant(piece.reshape(shape)) for piece, shape in zip(pieces, shapes)]


def _flat(tensors):
    return np.concatenate([np.reshape(np.asarray(t), -1) for t in tensors])


def test_conjugate_gradient_matches_dense_solve():
    rng = np.random.default_rng(0)
    factor = rng.normal(size=(12, 7))
    matrix = factor @ factor.T  # rank 7: singular without damping.
    rhs = rng.normal(size=12)
    shapes = [(3, 2), (6,)]
    damping = 0.1

    def matvec(vector):
        return _split(matrix @ _flat(vector), shapes)

    solution, residual = step_rules.conjugate_gradient(
        matvec, _split(rhs, shapes), iterations=40, damping=damping
    )
    expected = np.linalg.solve(matrix + damping * np.eye(12), rhs)
    np.testing.assert_allclose(_flat(solution), expected, rtol=1e-6)
    assert float(residual) < 1e-9 * np.linalg.norm(rhs)


def test_conjugate_gradient_frozen_after_convergence():
    # A 2x2 identity converges in one iteration; more iterations must not change it.
    rhs = [tf.constant([1.0, -2.0], tf.float64)]
    one, _ = step_rules.conjugate_gradient(lambda v: v, rhs, iterations=1)
    many, _ = step_rules.conjugate_gradient(lambda v: v, rhs, iterations=25)
    np.testing.assert_array_equal(one[0], many[0])


def test_normalized_step_has_length_epsilon_and_descends():
    rng = np.random.default_rng(1)
    gradients = [
        tf.constant(rng.normal(size=(5, 4)), tf.float32),
        tf.constant(rng.normal(size=(4,)), tf.float32),
    ]
    step, norm = step_rules.normalized_step(gradients, epsilon=0.0375)
    assert abs(float(step_rules.global_norm(step)) - 0.0375) < 1e-6 * 0.0375
    assert float(step_rules.inner_product(step, gradients)) < 0
    np.testing.assert_allclose(
        float(norm), np.sqrt(sum(np.sum(np.square(g)) for g in gradients)), rtol=1e-6
    )


def test_normalized_step_masks_before_normalising():
    gradients = [tf.constant([[3.0, 100.0], [4.0, 0.0]])]
    masks = [np.array([[True, False], [True, True]])]
    step, _ = step_rules.normalized_step(gradients, epsilon=1.0, masks=masks)
    np.testing.assert_allclose(step[0], [[-0.6, 0.0], [-0.8, 0.0]], atol=1e-7)
    assert float(step[0][0, 1]) == 0.0


def test_zero_gradient_gives_zero_step():
    zeros = [tf.zeros((3,))]
    step, _ = step_rules.normalized_step(zeros, epsilon=0.1)
    assert np.all(step[0].numpy() == 0.0)
    step, _ = step_rules.metric_step(lambda v: v, zeros, beta=1.0, epsilon=0.1)
    assert np.all(step[0].numpy() == 0.0)


def _tiny_float64_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )


def _dense_metric(model, x):
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        outputs = model(x, training=False)
    jacobians = tape.jacobian(outputs, variables)
    rows = outputs.shape[0] * outputs.shape[1]
    jacobian = np.concatenate([np.reshape(j.numpy(), (rows, -1)) for j in jacobians], axis=1)
    return jacobian.T @ jacobian / x.shape[0]


def test_metric_step_matches_dense_solve_on_tiny_model():
    from keras_fip.geometry import metric_vector_product

    model = _tiny_float64_model()
    x = np.random.default_rng(2).normal(size=(5, 3))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    gradient = np.random.default_rng(3).normal(size=sum(int(np.prod(s)) for s in shapes))
    beta, epsilon, damping = 0.7, 0.05, 1e-3

    step, _ = step_rules.metric_step(
        lambda vector: metric_vector_product(model, tf.constant(x), vector),
        _split(gradient, shapes),
        beta=beta,
        epsilon=epsilon,
        damping=damping,
        iterations=200,
    )
    metric = _dense_metric(model, tf.constant(x))
    expected = np.linalg.solve(metric + damping * np.eye(len(gradient)), -beta * gradient)
    expected *= epsilon / np.linalg.norm(expected)
    np.testing.assert_allclose(_flat(step), expected, atol=1e-6 * epsilon)


def test_metric_step_masks_solve_on_unmasked_coordinates():
    matrix = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    masks = [np.array([True, False, True])]
    gradient = [tf.constant([1.0, 1.0, 1.0], tf.float64)]
    step, _ = step_rules.metric_step(
        lambda v: [tf.linalg.matvec(tf.constant(matrix), v[0])],
        gradient,
        beta=1.0,
        epsilon=1.0,
        damping=0.0,
        iterations=10,
        masks=masks,
    )
    reduced = matrix[np.ix_([0, 2], [0, 2])]
    expected = np.linalg.solve(reduced, -np.ones(2))
    expected /= np.linalg.norm(expected)
    assert float(step[0][1]) == 0.0
    np.testing.assert_allclose(step[0].numpy()[[0, 2]], expected, atol=1e-10)


def test_check_step_rule_rejects_unknown_rule():
    with pytest.raises(ValueError, match="Received: step_rule='newton'"):
        step_rules.check_step_rule("newton")
