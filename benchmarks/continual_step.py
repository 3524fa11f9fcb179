"""Cost of one ContinualLearn (FIP) step relative to one experience-replay step.

Both methods see the same batches per step: `--batch_size` new-task examples and
`--batch_size` memory examples, on cnn5 with 28×28 inputs (random data: the cost does not
depend on the values). The per-step time is the slope between a short and a long run of
each method, (T(long) − T(short)) / (steps(long) − steps(short)), so set-up, tracing and
the memory sample are excluded; runs are interleaved and the best of `--repeats` slopes is
kept. Prints one JSON line with both step times and `fip_over_replay` (≤ 1.3 is the
target).

Example:

    python -m benchmarks.continual_step
    python -m benchmarks.continual_step --model=mlp --batch_size=256
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_fip
from keras_fip import baselines


def _run(method, model, x, y, steps, batch_size):
    epochs_examples = steps * batch_size
    task = (x[:epochs_examples], y[:epochs_examples])
    memory = (x[-500:], y[-500:] % 10)
    budget = dict(epochs=1, batch_size=batch_size, seed=0, verbose=0)
    if method == "fip":
        walk = keras_fip.Walk(**budget, record_every=10**9)
        op = keras_fip.ContinualLearn(task, memory=memory[0], memory_per_task=0, walk=walk)
    else:
        op = baselines.ExperienceReplay(
            task, memory=memory, learning_rate=1e-3, walk=keras_fip.Walk(**budget)
        )
    start = time.perf_counter()
    op(model)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn5")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--short_steps", type=int, default=10)
    parser.add_argument("--long_steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    model = keras_fip.models.get(args.model, (28, 28, 1), 10)
    rng = np.random.default_rng(0)
    count = args.long_steps * args.batch_size + 500
    x = rng.random((count, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 5, count).astype("int32")
    best = {"fip": float("inf"), "replay": float("inf")}
    for _ in range(args.repeats):
        for method in ("fip", "replay"):
            short = _run(method, model, x, y, args.short_steps, args.batch_size)
            long = _run(method, model, x, y, args.long_steps, args.batch_size)
            slope = (long - short) / (args.long_steps - args.short_steps)
            best[method] = min(best[method], slope)
    print(
        json.dumps(
            {
                "benchmark": "continual_step",
                "model": args.model,
                "batch_size": args.batch_size,
                "memory_batch_size": args.batch_size,
                "fip_step_seconds": best["fip"],
                "replay_step_seconds": best["replay"],
                "fip_over_replay": best["fip"] / best["replay"],
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
