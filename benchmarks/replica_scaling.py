"""Samples per second of a FIP walk and of plain `fit` against the number of replicas.

For each model and each replica count in `--replicas`, a fresh process splits the host's
CPU into that many logical devices (`tf.config.set_logical_device_configuration`), builds
the model under `tf.distribute.MirroredStrategy` over them and times, interleaved within
the process (fit, walk, fit, walk, ...), plain `model.fit` (Adam 1e-3, the Keras default
input path `fit(x, y, batch_size)`) and a penalty-rule FIP walk (`FIPTrainer.walk`, 128
anchor + 128 secondary examples, cross-entropy secondary loss, Adam 1e-3, data from
`fip_dataset`), at the same global batch (`--batch_size`, split over the replicas: strong
scaling). The replica counts alternate process by process over `--rounds` rounds, so that
load on the machine affects all alike; medians over rounds and repeats are kept. The clock
runs from the end of the last warm-up step to the end of the last step.

Prints one JSON line per (model, replicas): `fit_samples_per_second`,
`fip_samples_per_second`, `fip_over_fit`, and `fit_speedup` / `fip_speedup` (samples/s over
those of the smallest replica count), plus `load_average` (1-minute load at the start and
the end of the run).

What to expect. Logical CPU devices share the same physical cores and one thread pool, so
on a CPU host more replicas cannot add arithmetic: the CPU rows measure the cost of
distribution itself (per-replica op dispatch, the split of each global batch, the
all-reduce of the gradient), and a speedup below 1 is the expected outcome there. On a host
with one GPU per replica (or TPU cores) each replica brings its own arithmetic: both rows
should then scale close to linearly in the replica count while the per-replica batch keeps
the device busy (hundreds of examples for LeNet-300-100 / cnn5, more on large GPUs), and
flatten once the per-step all-reduce (4 bytes per weight, over NVLink / PCIe / ICI) and
the launch latency dominate. The penalty FIP step all-reduces exactly what `fit` does (the
gradient, inside the Keras optimizer) plus one small collective of four scalars, so
`fip_over_fit` should stay near its one-replica value as replicas grow. The `normalized`
rule adds one gradient-sized collective per step and the `metric` rule one per
conjugate-gradient iteration (`cg_iterations`), so those rules scale worse on many devices;
they can be timed here with `--rule`.

Example:

    python -m benchmarks.replica_scaling                       # about 4 minutes, 2 idle CPU cores
    python -m benchmarks.replica_scaling --models=lenet_300_100 --replicas=1,2,4
    python -m benchmarks.replica_scaling --rule=metric --steps=10
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # Not available on this platform.
        return None


def _measure(args):
    """In a fresh process: `args.replicas` logical CPUs, fit and walk timed interleaved."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * args.replicas
        )
    except RuntimeError:  # TensorFlow already started (--in_process): use what exists.
        available = len(tf.config.list_logical_devices("CPU"))
        if available < args.replicas:
            raise RuntimeError(
                f"{args.replicas} replicas need {args.replicas} logical CPUs, but "
                f"TensorFlow already started with {available}; run without --in_process."
            ) from None
    import keras

    import keras_fip
    from benchmarks.fip_step import _time_fit
    from keras_fip.core.data_adapter import fip_dataset

    devices = [f"/cpu:{i}" for i in range(args.replicas)]
    strategy = tf.distribute.MirroredStrategy(devices)
    x, y = keras_fip.data.load(args.dataset, "train")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    half = args.batch_size // 2
    with strategy.scope():
        keras.utils.set_random_seed(0)
        fit_model = keras_fip.models.get(args.model, x.shape[1:], 10)
        network = keras_fip.engine.copy_model(fit_model)
        fit_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        trainer = keras_fip.FIPTrainer(
            network, rule=keras_fip.rules.get(args.rule), secondary_loss=loss
        )
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3) if args.rule == "penalty" else None)
    data = fip_dataset(network, anchor=x, secondary=(x, y), batch_size=half, seed=0)

    class _Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    fit_seconds, walk_seconds = [], []
    for _ in range(args.repeats):
        fit_seconds.append(
            _time_fit(fit_model, (x, y), args.steps, args.warmup, args.batch_size)[0]
        )
        timer = _Timer()
        trainer.walk(data, args.warmup + args.steps, callbacks=[timer], verbose=0)
        walk_seconds.append(timer.times[-1] - timer.times[args.warmup - 1])
    samples = args.steps * args.batch_size
    return {
        "fit_seconds": fit_seconds,
        "fip_seconds": walk_seconds,
        "samples": samples,
        "replicas_in_sync": strategy.num_replicas_in_sync,
    }


def _run_child(args, model, replicas):
    command = [
        sys.executable,
        "-m",
        "benchmarks.replica_scaling",
        "--child",
        f"--model={model}",
        f"--replicas={replicas}",
        f"--dataset={args.dataset}",
        f"--rule={args.rule}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--repeats={args.repeats}",
        f"--batch_size={args.batch_size}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    completed = subprocess.run(
        command,
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"replica_scaling child ({model}, {replicas} replicas) failed with code "
            f"{completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100,cnn5")
    parser.add_argument(
        "--replicas", default="1,2", help="Comma-separated replica counts (logical CPU devices)."
    )
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--rule", default="penalty", choices=("penalty", "normalized", "metric"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=2, help="Interleaved fit/walk timings per process."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="Processes per replica count, alternating between counts.",
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="Seconds allowed to each child process."
    )
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="Measure in this process (one replica count per process "
        "is cleaner; meant for quick checks).",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = [int(count) for count in str(args.replicas).split(",")]
    if min(counts) < 1:
        parser.error(f"--replicas must be positive integers; got {args.replicas!r}")
    if min(args.steps, args.warmup, args.repeats, args.rounds) < 1:
        parser.error("--steps, --warmup, --repeats and --rounds must be >= 1")
    if args.batch_size < 2 or any((args.batch_size // 2) % count for count in counts):
        parser.error(
            "--batch_size / 2 must be a multiple of every replica count; got "
            f"{args.batch_size} for {counts}"
        )
    args.replica_counts = counts
    return args


def main(argv=None):
    args = parse(argv)
    if args.child:
        args.replicas = args.replica_counts[0]
        print(json.dumps(_measure(args)), flush=True)
        return
    import numpy as np

    for model in args.models.split(","):
        load_start = _load_average()
        runs = {count: [] for count in args.replica_counts}
        for _ in range(args.rounds):
            for count in args.replica_counts:
                if args.in_process:
                    runs[count].append(
                        _measure(
                            argparse.Namespace(**{**vars(args), "model": model, "replicas": count})
                        )
                    )
                else:
                    runs[count].append(_run_child(args, model, count))
        rates = {}
        for count, results in runs.items():
            samples = results[0]["samples"]
            fit = [samples / s for result in results for s in result["fit_seconds"]]
            fip = [samples / s for result in results for s in result["fip_seconds"]]
            rates[count] = (float(np.median(fit)), float(np.median(fip)))
        load_end = _load_average()
        first = args.replica_counts[0]
        for count in args.replica_counts:
            fit_rate, fip_rate = rates[count]
            print(
                json.dumps(
                    {
                        "benchmark": "replica_scaling",
                        "model": model,
                        "dataset": args.dataset,
                        "rule": args.rule,
                        "replicas": count,
                        "global_batch_size": args.batch_size,
                        "steps": args.steps,
                        "timings": args.rounds * args.repeats,
                        "fit_samples_per_second": round(fit_rate, 1),
                        "fip_samples_per_second": round(fip_rate, 1),
                        "fip_over_fit": round(fip_rate / fit_rate, 3),
                        "fit_speedup": round(fit_rate / rates[first][0], 3),
                        "fip_speedup": round(fip_rate / rates[first][1], 3),
                        "load_average": [load_start, load_end],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
