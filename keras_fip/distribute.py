"""`tf.distribute` for keras_fip: strategies by name, worker launching, resumable walks.

One place resolves a strategy by name (`get_strategy`: `"default"`, `"mirrored"`,
`"multi_worker"`, `"tpu"`); the apps' `--strategy` flag calls it. `launch_workers` starts
N worker processes of one command on 127.0.0.1 with their `TF_CONFIG`, bounded in time
and always cleaned up, so that a multi-worker job can be run and tested on one machine.
`resumable_walk` runs `FIPTrainer.walk` streamed to a `Path` directory on every worker and
continues a killed walk from its last recorded point.

Keras 3 `fit` under `tf.distribute.MultiWorkerMirroredStrategy`: Keras 3.15's TensorFlow
trainer calls `strategy.reduce` on a nested data batch (`_maybe_symbolic_build`) and on
scalar step outputs with `axis=0` (`reduce_per_replica`). `MirroredStrategy.reduce` maps
over nests; the collective strategy's does not, and a scalar has no axis 0, so `fit`
fails on the first batch in a real multi-worker cluster (keras-team/keras#20585). The
`"multi_worker"` strategy here is `MultiWorkerMirroredStrategy` with a `reduce` that maps
over nests and reduces scalars across replicas (what `axis=0` means for a per-replica
batch mean); nothing else changes.

Global batches: `fip_dataset` yields global batches (`batch_size` is global) of a static
size. `experimental_distribute_dataset` (which `fit` uses) first splits each global batch
into `num_replicas` per-replica slices, then shards the slices across the workers with the
`AUTO` policy, which falls back to `DATA` for in-memory data: worker i keeps slice i of
every global batch (checked on two loopback workers), so the global batch is the one a
single process sees, provided every worker's pipeline yields the same global batches:
**pass the same `seed` on every worker** (an unseeded shuffle differs per process). The
seeded pipelines order each pass by a stateless permutation of `(seed, pass)`: Keras
iterates a dataset once more under any strategy scope (to build from a first batch), and
a seed generator that advances with every iterator would give a walk under a strategy,
or a resumed walk, other batches than one process.

On a real cluster, run the same command on every host with its own `TF_CONFIG` (worker 0
first in the list is the chief), and the same `--seed`, e.g. on the two hosts of two:

    # host0
    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' \
        python -m benchmarks.multi_worker --role=worker --output_dir=/shared/run
    # host1
    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 1}}' \
        python -m benchmarks.multi_worker --role=worker --output_dir=/shared/run

(an app: `python -m apps.compress --strategy=multi_worker --workers=1 --methods=fip,oneshot
--seeds=0 --output_dir=/shared/runs/compress` in place of the benchmark's worker role; the
apps write outputs, plots and TensorBoard logs on the chief only, see `apps.common`).
Only the chief writes shared files (`is_chief`;
`worker_directory` gives the others private `<dir>.workertemp_<index>` directories, the
TensorFlow convention); `resumable_walk` does this for paths and reads the chief's
directory on resume, so the directory must be on a file system all hosts share (as
TensorFlow's multi-worker checkpoints assume). On one machine, `launch_workers` starts
the workers with free loopback ports:

    python -m benchmarks.multi_worker        # two local workers vs one process
    python -m keras_fip.distribute --workers=2 -- \
        python -m apps.compress --strategy=multi_worker --workers=1 --methods=fip --seeds=0
    python -m keras_fip.distribute --workers=2 -- \
        python -m apps.continual --strategy=multi_worker --methods=fip --seeds=0
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_fip.engine import data_adapter

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
COMMUNICATIONS = ("auto", "ring", "nccl")
_OPTIMIZER_DIR = "optimizer"


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

    Example:

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

    Example:

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
    TensorFlow convention for checkpoints), which `resumable_walk` removes at the end.

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


# Launching workers on one machine.


def free_ports(count):
    """`count` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.bind(("127.0.0.1", 0))
            sockets.append(held)
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


def tf_config(workers, index):
    """The `TF_CONFIG` JSON of worker `index` in a cluster of `workers` addresses."""
    return json.dumps(
        {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}
    )


def _kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_workers(command, num_workers=2, timeout=120.0, env=None, cwd=None, attempts=2):
    """Runs `command` in `num_workers` local worker processes, each with its `TF_CONFIG`.

    Each worker gets a free loopback port and the `TF_CONFIG` of a cluster of
    `num_workers` workers on 127.0.0.1, and runs in its own process group. The call
    returns when every worker has exited, when one fails (the others, which would wait
    forever in a collective, are then killed), or at `timeout` seconds (all are killed).
    The process groups are always killed on the way out, so no worker outlives the
    call. A port taken between choosing and binding shows up as a failed start and is
    retried with new ports up to `attempts` times.

    Args:
        command: The argv list every worker runs, e.g.
            `[sys.executable, "-m", "benchmarks.multi_worker", "--role=worker"]`.
        num_workers: Number of workers (>= 1). Defaults to `2`.
        timeout: Seconds before every worker is killed. Defaults to `120.0`.
        env: Extra environment variables for the workers. Defaults to `None`.
        cwd: Working directory of the workers. Defaults to `None` (this one).
        attempts: Launches tried when a worker fails to bind its port. Defaults to `2`.

    Returns:
        A list, per worker, of dicts `{"returncode", "stdout", "stderr", "timed_out"}`
        (`returncode` -9 for a killed worker).

    Example:

    >>> import sys
    >>> results = launch_workers([sys.executable, "-c", "print('hi')"], num_workers=2)
    >>> [r["stdout"].strip() for r in results]
    ['hi', 'hi']
    """
    if (
        not isinstance(command, (list, tuple))
        or not command
        or not all(isinstance(part, str) for part in command)
    ):
        raise ValueError(
            f"`command` must be a non-empty list of strings. Received: command={command!r}"
        )
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(
            f"`num_workers` must be a positive integer. Received: num_workers={num_workers!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"`timeout` must be a positive number. Received: timeout={timeout!r}")
    for attempt in range(attempts):
        results = _launch_once(command, num_workers, timeout, env, cwd)
        bind_failed = any(
            "address already in use" in r["stderr"].lower()
            or "failed to add port" in r["stderr"].lower()
            for r in results
        )
        if not bind_failed or attempt == attempts - 1:
            return results
    return results


def _launch_once(command, num_workers, timeout, env, cwd):
    addresses = [f"127.0.0.1:{port}" for port in free_ports(num_workers)]
    processes, logs = [], []
    timed_out = False
    try:
        for index in range(num_workers):
            worker_env = dict(os.environ)
            worker_env.update(env or {})
            worker_env["TF_CONFIG"] = tf_config(addresses, index)
            stdout = tempfile.TemporaryFile(mode="w+")
            stderr = tempfile.TemporaryFile(mode="w+")
            logs.append((stdout, stderr))
            processes.append(
                subprocess.Popen(
                    list(command),
                    env=worker_env,
                    cwd=cwd,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,  # Its own process group, killed as one.
                )
            )
        deadline = time.monotonic() + timeout
        while True:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes):
                break
            if any(code not in (None, 0) for code in codes):
                time.sleep(2.0)  # Let the others report the failure, then stop them.
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                _kill_group(process)
            else:
                _kill_group(process)  # Children it may have left behind.
        for process in processes:
            process.wait()
    results = []
    for process, (stdout, stderr) in zip(processes, logs):
        stdout.seek(0)
        stderr.seek(0)
        results.append(
            {
                "returncode": process.returncode,
                "stdout": stdout.read(),
                "stderr": stderr.read(),
                "timed_out": timed_out,
            }
        )
        stdout.close()
        stderr.close()
    return results


# Resumable walks.


class _OptimizerState(keras.callbacks.Callback):
    """Saves the optimizer's variables beside each recorded point of the path."""

    def __init__(self, trainer, path, first_step, steps_per_epoch, state_variables=()):
        super().__init__()
        self._state_variables = list(state_variables)
        self._trainer = trainer
        self._path = path
        self._first_step = first_step
        self._steps_per_epoch = steps_per_epoch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self._first_step + self._epoch * self._steps_per_epoch + batch + 1
        if self._path.should_record(step) and int(self._path.steps[-1]) == step:
            _save_optimizer(
                self._trainer.optimizer, self._path.directory, step, self._state_variables
            )


def _optimizer_file(directory, step):
    return os.path.join(directory, _OPTIMIZER_DIR, f"{step:07d}.npz")


def _save_optimizer(optimizer, directory, step, state_variables=()):
    """Saves the optimizer's variables, then the `state_variables`, in one file."""
    final = _optimizer_file(directory, step)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    temporary = final + ".tmp.npz"
    variables = list(optimizer.variables) + list(state_variables)
    np.savez(temporary, *[np.asarray(v.numpy()) for v in variables])
    os.replace(temporary, final)


def _restore_optimizer(optimizer, directory, step, state_variables=()):
    with np.load(_optimizer_file(directory, step)) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    variables = list(optimizer.variables) + list(state_variables)
    if len(values) != len(variables):
        raise ValueError(
            f"The walk state saved at step {step} has {len(values)} variables; the "
            f"trainer's optimizer and `state_variables` have {len(variables)}. Resume "
            "with the optimizer and state variables the walk started with."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


def _log_entries(directory):
    """`(line, entry)` for each whole line of the path's log, up to a torn last line (a
    kill mid-write)."""
    log = os.path.join(directory, "points.jsonl")
    if not os.path.exists(log):
        return
    with open(log) as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                return
            yield line, entry


def _last_resumable_step(directory):
    """The last step with both a recorded point and an optimizer state, or 0."""
    last = 0
    for _, entry in _log_entries(directory):
        step = int(entry["step"])
        if step and os.path.exists(_optimizer_file(directory, step)):
            last = step
    return last


def resumable_walk(
    trainer,
    data,
    steps,
    directory,
    record_every=1,
    strategy=None,
    state_variables=None,
    **walk_kwargs,
):
    """Runs `trainer.walk` streamed to a `Path` in `directory`, resuming a killed walk.

    The path's points (weights every `record_every` steps) and the optimizer's state at
    each of them are written by the chief to `directory` (other workers write the same to
    `worker_directory(directory)`). If `directory` already holds a walk, the model goes
    back to its start (for ‖w − w₀‖), then to its last point that has an optimizer state;
    the optimizer state is restored, the first `step` batches of `data` are skipped (the
    pipeline must be deterministic: pass a `seed`), and the walk continues to `steps`.
    A run killed at any moment thus ends at the weights of an uninterrupted run. Every
    worker reads the chief's directory on resume (a shared file system, as
    TensorFlow's multi-worker checkpoints assume). Call it with the trainer created and
    compiled in `strategy`'s scope.

    Args:
        trainer: A compiled `keras_fip.FIPTrainer` whose model is at the walk's start.
        data: The `fip_dataset` pipeline of the walk (deterministic).
        steps: Total number of steps of the walk (a positive integer).
        directory: The walk's directory (created, or resumed).
        record_every: Record a point (and the optimizer state) every this many steps:
            at most this many steps are redone after a kill. Defaults to `1`.
        strategy: The `tf.distribute.Strategy`. Defaults to `None` (the current one).
        state_variables: Other variables the walk changes as it goes (e.g. the masks a
            sparsifying callback updates), saved with the optimizer state at each
            recorded point and restored on resume, or `None`. Defaults to `None`.
        **walk_kwargs: Other `FIPTrainer.walk` arguments (`callbacks`, `verbose`,
            `log_dir`).

    Returns:
        A tuple `(path, history, first_step)`: the `keras_fip.Path`, the walk's history
        of the steps run now, and the step it resumed from (0 for a fresh walk).

    Example:

    >>> import tempfile, keras_fip
    >>> from keras_fip.engine.data_adapter import fip_dataset
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> trainer = keras_fip.FIPTrainer(model, step_rule="normalized")
    >>> trainer.compile()
    >>> data = fip_dataset(model, x, batch_size=8, seed=0)
    >>> path, history, first = resumable_walk(trainer, data, 4, tempfile.mkdtemp() + "/w",
    ...                                       verbose=0)
    >>> path.steps.tolist(), first
    ([0, 1, 2, 3, 4], 0)
    """
    from keras_fip.engine.path import Path

    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer. Received: steps={steps!r}")
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"`directory` must be a path. Received: directory={directory!r}")
    if walk_kwargs.get("path") is not None or "steps_per_epoch" in walk_kwargs:
        raise ValueError(
            "`resumable_walk` makes the path and runs one epoch; do not pass `path` or "
            f"`steps_per_epoch`. Received: {sorted(walk_kwargs)}"
        )
    strategy = strategy or tf.distribute.get_strategy()
    directory = os.fspath(directory)
    own = worker_directory(directory, strategy)

    # Every worker decides from the chief's directory, before anyone writes to it.
    resume_step = _last_resumable_step(directory)
    if own != directory:
        shutil.rmtree(own, ignore_errors=True)
        if resume_step:
            shutil.copytree(directory, own)
    barrier(strategy)

    model = trainer.network
    if not resume_step:
        if os.path.exists(os.path.join(own, "path.json")):
            shutil.rmtree(own)  # A walk killed before its first resumable point.
        path = Path(model, record_every=record_every, directory=own)
    else:
        _truncate_log(own, resume_step)
        path = Path(model, record_every=record_every, directory=own)
        for variable, value in zip(model.trainable_variables, path.weights(0)):
            variable.assign(value)
        trainer.reset_start()
        for variable, value in zip(model.trainable_variables, path.weights(-1)):
            variable.assign(value)
        if not trainer.optimizer.built:
            with strategy.scope():
                trainer.optimizer.build(trainer.trainable_variables)
        _restore_optimizer(trainer.optimizer, own, resume_step, state_variables or ())
        data = data.skip(resume_step)
    history = {}
    remaining = steps - resume_step
    if remaining > 0:
        callbacks = list(walk_kwargs.pop("callbacks", None) or [])
        callbacks.append(
            _OptimizerState(trainer, path, resume_step, remaining, state_variables or ())
        )
        history = trainer.walk(data, remaining, path=path, callbacks=callbacks, **walk_kwargs)
    if own != directory:
        shutil.rmtree(own, ignore_errors=True)
    return path, history, resume_step


def _truncate_log(directory, step):
    """Drops the points after `step` from the log (a kill can leave one without state)."""
    kept = []
    for line, entry in _log_entries(directory):
        if int(entry["step"]) > step:
            break
        kept.append(line if line.endswith("\n") else line + "\n")
    with open(os.path.join(directory, "points.jsonl"), "w") as lines:
        lines.writelines(kept)


def main(argv=None):
    """`python -m keras_fip.distribute [--workers=2] [--timeout=3600] -- COMMAND...`: runs
    COMMAND in local workers (`launch_workers`), prints each worker's output and exits
    with the first non-zero return code."""
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit(
            "Usage: python -m keras_fip.distribute [--workers=2] "
            "[--timeout=3600] -- python -m apps.compress "
            "--strategy=multi_worker --workers=1 --methods=fip"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m keras_fip.distribute")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv[:split])
    results = launch_workers(argv[split + 1 :], num_workers=args.workers, timeout=args.timeout)
    for index, result in enumerate(results):
        print(
            f"# worker {index}: return code {result['returncode']}"
            f"{' (timed out)' if result['timed_out'] else ''}"
        )
        print(result["stdout"], end="")
        if result["returncode"]:
            print(result["stderr"][-4000:], end="", file=sys.stderr)
    codes = [r["returncode"] for r in results if r["returncode"]]
    raise SystemExit(codes[0] if codes else 0)


if __name__ == "__main__":
    main()
