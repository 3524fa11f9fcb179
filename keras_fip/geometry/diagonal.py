"""The diagonal of the metric tensor, estimated with one backward pass per probe."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib
from keras_fip.geometry.metric import data_inputs

_KINDS = ("jacobian", "fisher")


def _example_output_shape(model, example):
    """The shape of one example's outputs (from the model's output shape, or one call)."""
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, tuple) and len(shape) > 1 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    return tuple(int(d) for d in model(example, training=False).shape[1:])


def metric_diagonal(
    model, data, variables=None, kind="jacobian", probes=1, batch_size=256, seed=None
):
    """Unbiased Monte-Carlo estimate of the diagonal of the metric tensor.

    With `kind="jacobian"` the metric is g = (1/N) Σ_x J_xᵀ J_x of the logits (the metric
    of the squared-L2 output distance; a model ending in a softmax is read through its
    log-probabilities, `keras_fip.core.outputs`); with `kind="fisher"` it is the Fisher
    information (1/N) Σ_x J_xᵀ (diag(p_x) − p_x p_xᵀ) J_x of the softmax (the Hessian of the KL
    distance at the reference). Each probe draws one output-space vector u per example,
    Rademacher for `"jacobian"`, `onehot(c) − p` with `c ~ p` for `"fisher"`, so that
    E[u uᵀ] is the output metric, and takes one backward pass of Σ_x u_x·f(x): the squared
    gradient is then an unbiased estimate of the diagonal (cross-example terms vanish in
    expectation). The model runs in inference mode. Each example's probe is drawn from
    its batch's seed at its position in the global batch, so one device and any
    `tf.distribute` strategy (each batch split over the replicas) give the same estimate.

    Args:
        model: A built `keras.Model` returning logits or probabilities.
        data: Inputs: an array, an `(x, y)` tuple or a `tf.data.Dataset`.
        variables: The variables whose diagonal is wanted. Defaults to `None`
            (`model.trainable_variables`).
        kind: `"jacobian"` or `"fisher"`. Defaults to `"jacobian"`.
        probes: Random vectors per example. Defaults to `1`.
        batch_size: Examples per backward pass. Defaults to `256`.
        seed: Seed of the probes. Defaults to `None`.

    Returns:
        A list of numpy arrays, one per variable and of its shape.

    Examples:

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
    inputs = data_inputs(data)
    if not data_adapter.is_structured(inputs):
        inputs = np.asarray(inputs)
    # A probability model is read through its log-probabilities (a view sharing its
    # weights): logits of the same distribution.
    model = outputs_lib.logits_model(model, outputs_lib.output_kind(model, inputs))
    if variables is None:
        variables = model.trainable_variables
    variables = list(variables)
    if not variables:
        raise ValueError("`variables` must not be empty. Received: variables=[]")
    rng = np.random.default_rng(seed)
    # Float inputs in their model input's dtype (each its own, for several inputs).
    inputs = data_adapter.cast_inputs(model, inputs)
    count = data_adapter.num_examples(inputs)
    strategy = tf.distribute.get_strategy()
    # Under any strategy scope, even of one replica, distributed variables are read in a
    # replica context (`strategy.run`).
    distributed = tf.distribute.has_strategy()
    # Uniforms for every output of every example of the global batch, drawn from the
    # batch's seed; each example takes the row of its position in the global batch, so
    # the probes do not depend on how a batch is split over replicas.
    noise_shape = (batch_size,) + _example_output_shape(
        model, data_adapter.take(inputs, slice(0, 1))
    )

    def gradient(batch, positions, seed):
        logits = model(batch, training=False)
        logits = tf.reshape(logits, [-1, tf.shape(logits)[-1]])
        noise = tf.gather(tf.random.stateless_uniform(noise_shape, seed), positions)
        noise = tf.reshape(noise, tf.shape(logits))
        if kind == "fisher":
            # c ~ p by inversion of the cumulative distribution at one uniform per row.
            probabilities = tf.nn.softmax(tf.cast(logits, "float32"), axis=-1)
            below = tf.cumsum(probabilities, axis=-1) <= noise[:, :1]
            classes = tf.minimum(
                tf.reduce_sum(tf.cast(below, tf.int32), axis=-1), tf.shape(logits)[-1] - 1
            )
            u = tf.one_hot(classes, tf.shape(logits)[-1]) - probabilities
        else:
            u = tf.where(noise < 0.5, -1.0, 1.0)  # Rademacher.
        u = tf.stop_gradient(tf.cast(u, logits.dtype))
        gradients = tf.gradients(tf.reduce_sum(u * logits), [v.value for v in variables])
        return [
            tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(gradients, variables)
        ]

    positions = np.arange(count, dtype=np.int32) % batch_size
    if not distributed:
        step = tf.function(gradient, reduce_retracing=True)
        batches = (
            (
                tf.nest.map_structure(
                    tf.convert_to_tensor,
                    data_adapter.take(inputs, slice(start, start + batch_size)),
                ),
                tf.convert_to_tensor(positions[start : start + batch_size]),
            )
            for start in range(0, count, batch_size)
        )
    else:
        # Each batch split over the replicas (with its positions), the per-replica
        # gradients summed before they are squared: the same estimate as one device.
        @tf.function(reduce_retracing=True)
        def step(batch, batch_positions, seed):
            per_replica = strategy.run(gradient, args=(batch, batch_positions, seed))
            return [
                strategy.reduce(tf.distribute.ReduceOp.SUM, piece, axis=None)
                for piece in per_replica
            ]

        dataset = tf.data.Dataset.from_tensor_slices(
            (tuple(inputs) if isinstance(inputs, list) else inputs, positions)
        ).batch(batch_size)
        batches = strategy.experimental_distribute_dataset(dataset)

    totals = [np.zeros(v.shape, "float64") for v in variables]
    for batch, batch_positions in batches:
        for _ in range(probes):
            seed = tf.constant(rng.integers(0, 2**31 - 1, size=2), "int64")
            for total, piece in zip(totals, step(batch, batch_positions, seed)):
                total += np.square(piece.numpy().astype("float64"))
    return [
        (total / (count * probes)).astype(keras.backend.standardize_dtype(v.dtype))
        for total, v in zip(totals, variables)
    ]
