"""`tf.distribute` for keras_fip: strategies by name, custom loops, local workers.

One place resolves a strategy by name (`get_strategy`: `"default"`, `"mirrored"`,
`"multi_worker"`, `"tpu"`); the apps' `--strategy` flag calls it. `launch_workers` starts
N worker processes of one command on 127.0.0.1 with their `TF_CONFIG`, bounded in time
and always cleaned up, so that a multi-worker job can be run and tested on one machine.
A killed walk resumes through its operation's checkpoint (`keras_fip.Walk(
checkpoint_directory=...)`, `keras_fip.engine.WalkCheckpoint`), on one device or many.

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
TensorFlow convention); `keras_fip.engine.WalkCheckpoint` does this for walks and reads the
chief's directory on resume, so the directory must be on a file system all hosts share (as
TensorFlow's multi-worker checkpoints assume). On one machine, `launch_workers` starts
the workers with free loopback ports:

    python -m benchmarks.multi_worker        # two local workers vs one process
    python -m keras_fip.distribute --workers=2 -- \
        python -m apps.compress --strategy=multi_worker --workers=1 --methods=fip --seeds=0
    python -m keras_fip.distribute --workers=2 -- \
        python -m apps.continual --strategy=multi_worker --methods=fip --seeds=0
"""

from keras_fip.distribute.launch import free_ports
from keras_fip.distribute.launch import launch_workers
from keras_fip.distribute.launch import tf_config
from keras_fip.distribute.replicas import distribute_dataset
from keras_fip.distribute.replicas import replica_step
from keras_fip.distribute.replicas import summed_over_batches
from keras_fip.distribute.strategies import COMMUNICATIONS
from keras_fip.distribute.strategies import STRATEGIES
from keras_fip.distribute.strategies import MultiWorkerMirroredStrategy
from keras_fip.distribute.strategies import barrier
from keras_fip.distribute.strategies import check_strategy_name
from keras_fip.distribute.strategies import get_strategy
from keras_fip.distribute.strategies import is_chief
from keras_fip.distribute.strategies import task_index
from keras_fip.distribute.strategies import worker_directory

__all__ = [
    "COMMUNICATIONS",
    "MultiWorkerMirroredStrategy",
    "STRATEGIES",
    "barrier",
    "check_strategy_name",
    "distribute_dataset",
    "free_ports",
    "get_strategy",
    "is_chief",
    "launch_workers",
    "replica_step",
    "summed_over_batches",
    "task_index",
    "tf_config",
    "worker_directory",
]
