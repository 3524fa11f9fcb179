"""Custom training loops under a strategy: distributed datasets, replica steps, sums."""

import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter


def distribute_dataset(dataset, strategy=None):
    """`dataset`'s global batches split over the replicas of the current strategy.

    The identity outside a strategy scope. Under one, each global batch is split into
    per-replica slices (and sharded over workers) as `fit` does, for `replica_step`.

    Args:
        dataset: A batched `tf.data.Dataset` (global batches).
        strategy: A `tf.distribute.Strategy`. Defaults to `None` (the current one).

    Returns:
        A dataset, or a `tf.distribute.DistributedDataset`.
    """
    if strategy is None and not tf.distribute.has_strategy():
        return dataset
    strategy = strategy or tf.distribute.get_strategy()
    return strategy.experimental_distribute_dataset(dataset)


def replica_step(step_fn, strategy=None):
    """A `tf.function` running `step_fn(batch)` on every replica, its results summed.

    The step of a custom training loop over `distribute_dataset(...)` batches, as Keras's
    `fit` runs its `train_step`: `step_fn` runs in a replica context on that replica's
    slice of the global batch. A Keras optimizer's `apply` there sums the gradients over
    the replicas, so a loss whose gradients it is handed is scaled by
    `1 / num_replicas_in_sync` (as Keras scales the per-replica loss): a mean over the
    replica's slice, divided by the replicas, sums to the global batch mean. Outside a
    strategy scope, `step_fn` itself in a `tf.function` (one replica: no scaling).

    Args:
        step_fn: `step_fn(batch) -> structure of tensors`, e.g. the scaled loss.
        strategy: A `tf.distribute.Strategy`. Defaults to `None` (the current one).

    Returns:
        `step(batch)`: the structure of `step_fn`'s results, summed over the replicas.
    """
    if strategy is None and not tf.distribute.has_strategy():
        return tf.function(step_fn)
    strategy = strategy or tf.distribute.get_strategy()

    @tf.function
    def step(batch):
        per_replica = strategy.run(step_fn, args=(batch,))
        return tf.nest.map_structure(
            lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None), per_replica
        )

    return step


def summed_over_batches(fn, data, batch_size, strategy=None):
    """Σ over the batches of `data` of `fn(batch)`, every replica summing its share.

    For sums over a data set that read the model's variables (gradients of a summed loss,
    summed outputs): distributed variables may only be read in a replica context, so under
    a strategy each batch is split over the replicas and the per-replica sums are added
    (one all-reduce per batch); outside one, a plain loop. `fn` must be a sum over the
    examples of its batch (not a mean), so that any split gives the same total.

    Args:
        fn: `fn(batch) -> structure of tensors`, additive over examples. `batch` has the
            structure of `data`.
        data: An array, or a tuple of arrays of equal length (inputs may be a dict or
            list of arrays, for a model with several).
        batch_size: Examples per (global) batch.
        strategy: A `tf.distribute.Strategy`. Defaults to `None` (the current one).

    Returns:
        The structure of `fn`'s results, as numpy arrays (float64 sums of the batches).
    """
    dataset = tf.data.Dataset.from_tensor_slices(data_adapter.for_tf_data(data)).batch(batch_size)

    def dense_fn(batch):  # Sparse gradients (embeddings) summed as dense tensors.
        return tf.nest.map_structure(tf.convert_to_tensor, fn(batch))

    step = replica_step(dense_fn, strategy)
    total = None
    for batch in distribute_dataset(dataset, strategy):
        values = tf.nest.map_structure(lambda value: np.asarray(value, np.float64), step(batch))
        total = values if total is None else tf.nest.map_structure(np.add, total, values)
    return total
