"""The diagonal of the metric tensor, estimated with one backward pass per probe."""

import numpy as np
import tensorflow as tf

import keras

from keras_fip.geometry.metric import _data_inputs

_KINDS = ("jacobian", "fisher")


def metric_diagonal(model, data, variables=None, kind="jacobian", probes=1,
                    batch_size=256, seed=None):
    """Unbiased Monte-Carlo estimate of the diagonal of the metric tensor.

    With `kind="jacobian"` the metric is g = (1/N) Σ_x J_xᵀ J_x of the logits (the metric
    of the squared-L2 output distance); with `kind="fisher"` it is the Fisher information
    (1/N) Σ_x J_xᵀ (diag(p_x) − p_x p_xᵀ) J_x of the softmax (the Hessian of the KL
    distance at the reference). Each probe draws one output-space vector u per example,
    Rademacher for `"jacobian"`, `onehot(c) − p` with `c ~ p` for `"fisher"`, so that
    E[u uᵀ] is the output metric, and takes one backward pass of Σ_x u_x·f(x): the squared
    gradient is then an unbiased estimate of the diagonal (cross-example terms vanish in
    expectation). The model runs in inference mode.

    Args:
        model: A built `keras.Model` returning logits.
        data: Inputs: an array, an `(x, y)` tuple or a `tf.data.Dataset`.
        variables: The variables whose diagonal is wanted. Defaults to `None`
            (`model.trainable_variables`).
        kind: `"jacobian"` or `"fisher"`. Defaults to `"jacobian"`.
        probes: Random vectors per example. Defaults to `1`.
        batch_size: Examples per backward pass. Defaults to `256`.
        seed: Seed of the probes. Defaults to `None`.

    Returns:
        A list of numpy arrays, one per variable and of its shape.

    Example:

    >>> model = keras_fip.models.mlp(16, input_shape=(8,), num_classes=3)
    >>> diagonal = metric_diagonal(model, np.ones((4, 8), "float32"))
    >>> [d.shape for d in diagonal] == [tuple(v.shape) for v in model.trainable_variables]
    True
    """
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {list(_KINDS)}. Received: kind={kind!r}")
    for value, name in ((probes, "probes"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    inputs = np.asarray(_data_inputs(data))
    if variables is None:
        variables = model.trainable_variables
    variables = list(variables)
    if not variables:
        raise ValueError("`variables` must not be empty. Received: variables=[]")
    rng = np.random.default_rng(seed)
    dtype = keras.backend.standardize_dtype(model.inputs[0].dtype) if getattr(
        model, "inputs", None) else keras.config.floatx()
    strategy = tf.distribute.get_strategy()
    # Under any strategy scope, even of one replica, distributed variables are read in a
    # replica context (`strategy.run`).
    distributed = tf.distribute.has_strategy()

    def squared_gradient(batch, seed):
        # Stateless draws, distinct per replica: no generator state to mirror.
        context = tf.distribute.get_replica_context()
        if context is not None:
            seed = seed + tf.cast(context.replica_id_in_sync_group, seed.dtype)
        logits = model(batch, training=False)
        logits = tf.reshape(logits, [-1, tf.shape(logits)[-1]])
        if kind == "fisher":
            probabilities = tf.nn.softmax(tf.cast(logits, "float32"), axis=-1)
            classes = tf.random.stateless_categorical(
                tf.math.log(probabilities + 1e-30), 1, seed
            )[:, 0]
            u = tf.one_hot(classes, tf.shape(logits)[-1]) - probabilities
        else:
            u = tf.sign(tf.random.stateless_uniform(tf.shape(logits), seed, -1.0, 1.0))
        u = tf.stop_gradient(tf.cast(u, logits.dtype))
        gradients = tf.gradients(tf.reduce_sum(u * logits), [v.value for v in variables])
        return [
            tf.zeros(v.shape, v.dtype) if g is None else tf.square(g)
            for g, v in zip(gradients, variables)
        ]

    if not distributed:
        step = tf.function(squared_gradient, reduce_retracing=True)
    else:
        # Each batch split over the replicas (the estimate is unbiased for any split),
        # the per-replica squares summed.
        @tf.function(reduce_retracing=True)
        def step(batch, seed):
            per_replica = strategy.run(squared_gradient, args=(batch, seed))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, piece, axis=None)
                    for piece in per_replica]

        dataset = tf.data.Dataset.from_tensor_slices(inputs.astype(dtype)).batch(batch_size)
        batches = iter(strategy.experimental_distribute_dataset(dataset))

    totals = [np.zeros(v.shape, "float64") for v in variables]
    for start in range(0, len(inputs), batch_size):
        if not distributed:
            batch = tf.convert_to_tensor(inputs[start:start + batch_size], dtype)
        else:
            batch = next(batches)
        for _ in range(probes):
            seed = tf.constant(rng.integers(0, 2**31 - 1, size=2), "int64")
            for total, square in zip(totals, step(batch, seed)):
                total += square.numpy()
    return [(total / (len(inputs) * probes)).astype(keras.backend.standardize_dtype(v.dtype))
            for total, v in zip(totals, variables)]
