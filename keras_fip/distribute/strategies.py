"""Strategies by name, the chief, and the per-worker directories of a multi-worker job."""

import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
COMMUNICATIONS = ("auto", "ring", "nccl")


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` Keras 3 `fit` can use.

    Identical to the TensorFlow strategy except `reduce`: it maps over nested values (as
    `MirroredStrategy.reduce` does) and reduces a per-replica scalar across replicas when
    an `axis` is given (a scalar has no batch axis; Keras 3.15 passes `axis=0` for every
    step output). Without it `fit` fails on the first batch in a multi-worker cluster
    (keras-team/keras#20585). Reads the cluster from `TF_CONFIG`.

    Args:
        cluster_resolver: A `tf.distribute.cluster_resolver.ClusterResolver`, or `None`
            (`TF_CONFIG`). Defaults to `None`.
        communication_options: A `tf.distribute.experimental.CommunicationOptions`, or
            `None` (`AUTO`). Defaults to `None`.

    Examples:

        >>> strategy = MultiWorkerMirroredStrategy()  # One worker without TF_CONFIG.
        >>> float(strategy.reduce("MEAN", {"a": tf.constant(2.0)}, axis=0)["a"])
        2.0
    """

    def reduce(self, reduce_op, value, axis):
        def reduce_one(leaf):
            component = leaf
            if isinstance(leaf, tf.distribute.DistributedValues):
                component = leaf.values[0]
            rank = getattr(getattr(component, "shape", None), "rank", None)
            leaf_axis = None if rank == 0 else axis
            return super(MultiWorkerMirroredStrategy, self).reduce(reduce_op, leaf, axis=leaf_axis)

        return tf.nest.map_structure(reduce_one, value)


def check_strategy_name(name, argument="strategy"):
    """Returns `name` if it is one of `STRATEGIES`, else raises a `ValueError`."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(
            f"`{argument}` must be one of {list(STRATEGIES)}. Received: {argument}={name!r}"
        )
    return name


def get_strategy(name="default", tpu=None, communication="auto"):
    """The `tf.distribute.Strategy` named `name`: the one place strategies are resolved.

    `"default"` is the current strategy (no distribution outside a scope), `"mirrored"`
    `tf.distribute.MirroredStrategy` over every local GPU (without GPUs, every logical
    CPU), `"multi_worker"`
    `MultiWorkerMirroredStrategy` (this module's, `fit`-ready) over the cluster in
    `TF_CONFIG` (one worker without it), `"tpu"` `tf.distribute.TPUStrategy` on the TPU at
    `tpu` (connected and initialised here). Call it once per process, at the start: a
    multi-worker strategy must be created before any other TensorFlow op runs.

    Args:
        name: `"default"`, `"mirrored"`, `"multi_worker"` or `"tpu"`. Defaults to
            `"default"`.
        tpu: The TPU address (`grpc://...`, a TPU name, or `"local"`), only with
            `name="tpu"`; `None` lets the resolver find it (Cloud TPU VMs). Defaults to
            `None`.
        communication: Collective implementation of `"multi_worker"`: `"auto"`, `"ring"`
            (gRPC, CPUs) or `"nccl"` (GPUs). Defaults to `"auto"`.

    Returns:
        A `tf.distribute.Strategy`.

    Examples:

        >>> get_strategy("default").num_replicas_in_sync
        1
    """
    check_strategy_name(name)
    if tpu is not None and (not isinstance(tpu, str) or not tpu):
        raise ValueError(f"`tpu` must be a non-empty address string or None. Received: tpu={tpu!r}")
    if tpu is not None and name != "tpu":
        raise ValueError(
            "`tpu` is only used with `strategy='tpu'`. "
            f"Received: tpu={tpu!r} with strategy={name!r}"
        )
    if communication not in COMMUNICATIONS:
        raise ValueError(
            f"`communication` must be one of {list(COMMUNICATIONS)}. "
            f"Received: communication={communication!r}"
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        # Every GPU; without GPUs every logical CPU (TensorFlow's default takes one CPU,
        # so CPU replicas configured with `set_logical_device_configuration` would idle).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multi_worker":
        implementation = getattr(
            tf.distribute.experimental.CommunicationImplementation, communication.upper()
        )
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        return MultiWorkerMirroredStrategy(communication_options=options)
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def task_index(strategy=None):
    """This worker's index in the cluster (0 outside a multi-worker cluster)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_id is None:
        return 0
    return int(resolver.task_id)


def is_chief(strategy=None):
    """Whether this worker writes shared files: worker 0 (or a chief task), or alone.

    Args:
        strategy: A `tf.distribute.Strategy`. Defaults to `None` (the current one).

    Returns:
        A bool.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def worker_directory(directory, strategy=None):
    """`directory` on the chief, a private `<directory>.workertemp_<i>` on other workers.

    Every worker of a multi-worker job runs the same code; only the chief may write the
    shared files. The others write the same content to their own directory (the
    TensorFlow convention for checkpoints), which the writer removes at the end
    (`keras_fip.engine.WalkCheckpoint.close`).

    Args:
        directory: The shared directory.
        strategy: A `tf.distribute.Strategy`. Defaults to `None` (the current one).

    Returns:
        A directory path.
    """
    if is_chief(strategy):
        return directory
    return f"{os.path.normpath(directory)}.workertemp_{task_index(strategy)}"


def barrier(strategy=None):
    """Blocks until every worker reaches it (one all-reduce); a no-op on one worker."""
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync == 1:
        return
    value = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


# Custom training loops and batch sums under the current strategy.
