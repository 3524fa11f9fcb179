"""Tiny float64 models and a dense metric reference built from per-example Jacobians."""

import keras
import numpy as np
import pytest
import tensorflow as tf


def tiny_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="inputs")
    hidden = keras.layers.Dense(6, activation="tanh", dtype="float64", name="hidden")(inputs)
    logits = keras.layers.Dense(3, dtype="float64", name="logits")(hidden)
    return keras.Model(inputs, logits, name="tiny_mlp")


def tiny_conv_bn(seed=0):
    """A conv net whose BatchNorm sits in a non-trivial moving-statistics state."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 5, 1), name="inputs")
    x = keras.layers.Conv2D(3, 3, dtype="float64", name="conv")(inputs)
    x = keras.layers.BatchNormalization(dtype="float64", name="batch_norm")(x)
    x = keras.layers.Activation("tanh", dtype="float64", name="tanh")(x)
    x = keras.layers.Dropout(0.5, dtype="float64", name="dropout")(x)
    x = keras.layers.Flatten(dtype="float64", name="flatten")(x)
    logits = keras.layers.Dense(3, dtype="float64", name="logits")(x)
    model = keras.Model(inputs, logits, name="tiny_conv_bn")
    rng = np.random.default_rng(seed + 1)
    batch_norm = model.get_layer("batch_norm")
    batch_norm.gamma.assign(rng.uniform(0.5, 1.5, 3))
    batch_norm.beta.assign(rng.normal(size=3))
    batch_norm.moving_mean.assign(rng.normal(size=3))
    batch_norm.moving_variance.assign(rng.uniform(0.3, 2.0, 3))
    return model


def dense_metric(model, inputs, outputs="logits"):
    """(1/N) Σ_x J_xᵀ J_x from explicit per-example Jacobians, float64.

    The rows of every example's J_x come from one `tape.jacobian` of all the outputs (in
    inference mode, so an example's outputs depend on its own input only): the stacked
    Jacobian J has the rows of every J_x, and Jᵀ J = Σ_x J_xᵀ J_x.
    """
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        values = model(np.asarray(inputs), training=False)
        if outputs == "probabilities":
            values = tf.nn.softmax(values, axis=-1)
        values = tf.reshape(values, [-1])
    jacobians = tape.jacobian(values, variables)
    jacobian = np.concatenate(
        [np.reshape(j.numpy(), [values.shape[0], -1]) for j in jacobians], axis=1
    ).astype(np.float64)
    return jacobian.T @ jacobian / len(inputs)


@pytest.fixture
def mlp_problem():
    model = tiny_mlp()
    inputs = np.random.default_rng(0).normal(size=(10, 4))
    return model, inputs


@pytest.fixture
def conv_problem():
    model = tiny_conv_bn()
    inputs = np.random.default_rng(0).uniform(size=(9, 5, 5, 1))
    return model, inputs
