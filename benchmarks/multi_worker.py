"""Two local workers under MultiWorkerMirroredStrategy give the single-process results.

Runs, once in this process (no distribution) and once in `--workers` worker processes on
127.0.0.1 (`keras_fip.distribute.launch_workers`: a `TF_CONFIG` each, CPU, RING/AUTO
collectives, bounded by `--timeout`, killed on exit), on a 24-16 MLP and the digits:

- `compress`: a `keras_fip.Compress(0.5, walk=keras_fip.Walk(steps=--steps))` walk (penalty rule,
  Adam, KL);
- `continual`: a `keras_fip.ContinualLearn` walk (digits 5-9 learned, 0-4 kept);
- `metric`: a product g·v with `keras_fip.geometry.MetricOperator`, its top 3
  eigenpairs (`top_eigenpairs`) and the Gram matrix of 7 inputs (`gram`: each worker's
  Jacobian rows gathered);
- `resume`: a `keras_fip.Isofunctional` walk (penalty rule, Adam) with a checkpoint
  directory (`keras_fip.Walk(checkpoint_directory=...)`); worker 1 is killed (SIGKILL) at
  step `--kill_at`, all workers stop, and a second launch resumes the walk from its
  checkpoint.

and prints one JSON line per computation with the largest absolute difference between the
multi-worker and the single-process results (final weights, g·v, eigenvalues and
eigenvectors up to sign, the Gram matrix, and for `resume` the resumed walk's final weights
against the uninterrupted single-process walk). Each global batch is the same in both: the pipelines
are seeded, and the distributed dataset splits every global batch into per-replica slices
before sharding them across the workers (see `keras_fip.distribute`). float32 throughout;
the target is a difference ≤ 1e-5.

Example:

    python -m benchmarks.multi_worker                 # about a minute on 2 CPU cores
    python -m benchmarks.multi_worker --steps=100 --kill_at=37 --workers=3

On a real cluster, run the worker role on every host with its own `TF_CONFIG` (see
`keras_fip.distribute`): `python -m benchmarks.multi_worker --role=worker
--output_dir=<shared dir>` after writing the base weights there with `--role=prepare`.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

COMPUTATIONS = ("compress", "continual", "metric", "resume")


def _settings(args):
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "kill_at": args.kill_at,
        "record_every": args.record_every,
    }


def _data():
    import keras_fip

    x, y = keras_fip.data.load("digits")
    return x[:256].astype("float32"), y[:256]


def _base_model(num_classes=10):
    import keras_fip

    return keras_fip.models.mlp((24, 16), input_shape=(8, 8, 1), num_classes=num_classes)


def prepare(output_dir):
    """Writes the starting weights every process loads (`base_<classes>.npz`)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    for classes in (10, 5):
        model = _base_model(classes)
        np.savez(os.path.join(output_dir, f"base_{classes}.npz"), *model.get_weights())


def _load_base(output_dir, classes):
    import numpy as np

    model = _base_model(classes)
    with np.load(os.path.join(output_dir, f"base_{classes}.npz")) as saved:
        model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
    return model


class _KillAt:
    """Callback factory: SIGKILLs this process after step `step` (worker 1 only)."""

    @staticmethod
    def make(step):
        import keras

        class KillAt(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch + 1 >= step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return KillAt()


def compute(names, strategy, output_dir, settings, kill=False):
    """Runs the named computations in `strategy`'s scope; returns `{key: array}`."""
    import keras
    import numpy as np

    import keras_fip
    from keras_fip import distribute

    x, y = _data()
    steps, batch_size = settings["steps"], settings["batch_size"]
    results = {}
    with strategy.scope():
        if "compress" in names:
            keras.utils.set_random_seed(0)
            op = keras_fip.Compress(
                0.5,
                data=x,
                schedule=keras_fip.compress.Schedule(update_every=5),
                walk=keras_fip.Walk(
                    steps=steps,
                    batch_size=batch_size,
                    beta=1.0,
                    seed=0,
                    record_every=steps,
                    verbose=0,
                ),
            )
            sparse = op(_load_base(output_dir, 10))
            results.update({f"compress/{i}": w for i, w in enumerate(sparse.get_weights())})
        if "continual" in names:
            keras.utils.set_random_seed(0)
            old, new = y < 5, y >= 5
            op = keras_fip.ContinualLearn(
                (x[new][:64], y[new][:64] - 5),
                memory=x[old][:64],
                walk=keras_fip.Walk(
                    epochs=steps // 2,
                    batch_size=batch_size,
                    seed=0,
                    record_every=steps,
                    verbose=0,
                ),
            )
            grown = op(_load_base(output_dir, 5))
            results.update({f"continual/{i}": w for i, w in enumerate(grown.get_weights())})
        if "metric" in names and strategy.num_replicas_in_sync > 1:
            results.update(_metric(output_dir, x))
        if "resume" in names:
            callbacks = []
            if kill and distribute.task_index(strategy) == 1:
                callbacks.append(_KillAt.make(settings["kill_at"]))
            directory = os.path.join(output_dir, "walk")
            if strategy.num_replicas_in_sync == 1:
                directory = os.path.join(output_dir, "walk_single")
            saved = os.path.join(directory, "phase_walk.json")
            first_step = 0
            if os.path.exists(saved):  # The step the killed walk resumes from.
                with open(saved) as handle:
                    first_step = json.load(handle)["step"]
            walk = keras_fip.Walk(
                steps=steps,
                rule="penalty",
                batch_size=batch_size,
                record_every=settings["record_every"],
                checkpoint_directory=directory,
                callbacks=callbacks,
                seed=0,
                verbose=0,
            )
            op = keras_fip.Isofunctional(data=x, walk=walk)
            moved = op(_load_base(output_dir, 10))
            results.update({f"resume/{i}": w for i, w in enumerate(moved.get_weights())})
            results["resume_first_step"] = np.asarray(first_step)
            results["resume_points"] = np.asarray(len(op.path))
    if "metric" in names and strategy.num_replicas_in_sync == 1:
        # Outside the scope: MetricOperator's one-replica path runs in cross-replica
        # context, where a one-device strategy's variables cannot be read.
        results.update(_metric(output_dir, x))
    return results


def _metric(output_dir, x):
    import numpy as np

    import keras_fip

    model = _load_base(output_dir, 10)
    metric = keras_fip.geometry.MetricOperator(model, x[:128], batch_size=32)
    vector = np.random.default_rng(0).standard_normal(metric.num_params)
    values, vectors = keras_fip.geometry.top_eigenpairs(metric, k=3, seed=0)
    # The Gram matrix of 7 inputs in batches of 4: each worker's rows gathered in order,
    # the last batch of 3 split unevenly.
    gram = keras_fip.geometry.MetricOperator(model, x[:7], batch_size=4).gram()
    return {
        "metric/product": metric.matvec(vector.astype("float32")),
        "metric/values": values,
        "metric/vectors": vectors * np.sign(vectors[:1]),
        "metric/gram": gram,
    }


def _worker(args):
    from keras_fip import distribute

    strategy = distribute.get_strategy("multi_worker", communication=args.communication)
    import numpy as np

    names = args.computations.split(",")
    # The walks and products first (saved before the resumable walk, which may be killed).
    for group, tag in (
        ([n for n in names if n != "resume"], "main"),
        ([n for n in names if n == "resume"], "resume"),
    ):
        if not group:
            continue
        results = compute(group, strategy, args.output_dir, _settings(args), kill=args.kill)
        if distribute.is_chief(strategy):
            np.savez(os.path.join(args.output_dir, f"worker_{tag}.npz"), **results)
    distribute.barrier(strategy)
    print(json.dumps({"worker": distribute.task_index(strategy), "done": names}), flush=True)


def _max_difference(reference, other, prefix):
    import numpy as np

    keys = sorted(k for k in reference if k.startswith(prefix + "/"))
    if not keys or any(k not in other for k in keys):
        return float("nan")
    return max(
        float(np.max(np.abs(np.asarray(reference[k], "float64") - np.asarray(other[k], "float64"))))
        for k in keys
    )


def _launch(args, output_dir, names, kill):
    from keras_fip import distribute

    command = [
        sys.executable,
        "-m",
        "benchmarks.multi_worker",
        "--role=worker",
        f"--output_dir={output_dir}",
        f"--computations={','.join(names)}",
        f"--steps={args.steps}",
        f"--batch_size={args.batch_size}",
        f"--kill_at={args.kill_at}",
        f"--record_every={args.record_every}",
        f"--communication={args.communication}",
    ] + (["--kill"] if kill else [])
    env = {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "KERAS_BACKEND": "tensorflow",
        "PYTHONUNBUFFERED": "1",
    }
    start = time.perf_counter()
    results = distribute.launch_workers(
        command,
        num_workers=args.workers,
        timeout=args.timeout,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return results, time.perf_counter() - start


def run(args):
    """The whole comparison; returns the list of JSON-ready result rows."""
    import numpy as np
    import tensorflow as tf

    names = [n for n in args.computations.split(",") if n]
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="keras_fip_multi_worker_")
    os.makedirs(output_dir, exist_ok=True)
    prepare(output_dir)

    # One process, no distribution.
    start = time.perf_counter()
    reference = compute(names, tf.distribute.get_strategy(), output_dir, _settings(args))
    single_seconds = time.perf_counter() - start

    # The workers: every computation, worker 1 killed in the resumable walk.
    rows = []
    kill = "resume" in names
    first, first_seconds = _launch(args, output_dir, names, kill=kill)
    launches = [
        {
            "launch": "all" + (" (worker 1 killed)" if kill else ""),
            "seconds": round(first_seconds, 1),
            "returncodes": [r["returncode"] for r in first],
            "timed_out": first[0]["timed_out"],
        }
    ]
    workers = {}
    main_file = os.path.join(output_dir, "worker_main.npz")
    if os.path.exists(main_file):
        with np.load(main_file) as saved:
            workers.update(dict(saved))
    if kill:
        second, second_seconds = _launch(args, output_dir, ["resume"], kill=False)
        launches.append(
            {
                "launch": "resume",
                "seconds": round(second_seconds, 1),
                "returncodes": [r["returncode"] for r in second],
                "timed_out": second[0]["timed_out"],
            }
        )
        resumed = os.path.join(output_dir, "worker_resume.npz")
        if os.path.exists(resumed):
            with np.load(resumed) as saved:
                workers.update(dict(saved))
    for name in names:
        row = {
            "benchmark": "multi_worker",
            "computation": name,
            "workers": args.workers,
            "steps": args.steps,
            "max_abs_difference": _max_difference(reference, workers, name),
        }
        if name == "resume":
            row["resumed_from_step"] = int(workers.get("resume_first_step", -1))
            row["killed_at_step"] = args.kill_at
        rows.append(row)
    rows.append(
        {
            "benchmark": "multi_worker",
            "computation": "all",
            "workers": args.workers,
            "steps": args.steps,
            "max_abs_difference": float(np.max([row["max_abs_difference"] for row in rows])),
            "single_process_seconds": round(single_seconds, 1),
            "launches": launches,
            "output_dir": args.output_dir,
        }
    )
    if args.output_dir is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    return rows, (first, launches)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="compare", choices=["compare", "worker", "prepare"])
    parser.add_argument("--computations", default=",".join(COMPUTATIONS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--kill_at", type=int, default=7)
    parser.add_argument("--kill", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--record_every", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--communication", default="ring", choices=["auto", "ring"])
    parser.add_argument("--output_dir", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.role == "worker":
        _worker(args)
        return
    if args.role == "prepare":
        prepare(args.output_dir)
        return
    rows, _ = run(args)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
