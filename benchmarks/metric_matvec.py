"""Cost of one metric product g·v relative to one loss gradient, and of the top-20 spectrum.

For LeNet-300-100 and cnn5 trained on MNIST (`keras_fip.models.base_network`, cached),
on the same 1,000 MNIST training inputs and in the same run:

- `matvec_over_gradient`: median time of one `MetricOperator.matvec` (one JVP + one VJP
  over the 1,000 inputs, one `tf.function`) over the median time of one `tf.function`
  gradient of the mean cross-entropy on the same inputs; the two are timed interleaved
  after a warm-up, `--repeats` times each (`matvec_over_gradient_best`: the same ratio of
  the fastest runs, less sensitive to other load on the machine).
- `matvecs_for_top20`: products g·v used by `top_eigenpairs(k=20, tol=1e-4)`, and the
  largest relative error of those eigenvalues against a `tol=0` (machine precision) run.
- `peak_memory_*_mb`: peak of TensorFlow's CPU allocator (`get_memory_info`, reset just
  before) while one traced matvec (one gradient) runs, above what was allocated before.

Prints one JSON line per model.

Example:

    python -m benchmarks.metric_matvec
    python -m benchmarks.metric_matvec --models=lenet_300_100 --repeats=10
"""

import argparse
import gc
import json
import time

import keras
import numpy as np
import tensorflow as tf

from keras_fip import data
from keras_fip import geometry
from keras_fip import models


def _setup(name, num_inputs):
    model, _ = models.base_network(name, "mnist")
    x, y = data.load("mnist", "train")
    x = tf.constant(x[:num_inputs])
    y = tf.constant(y[:num_inputs])
    metric = geometry.MetricOperator(model, x)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        return tape.gradient(loss, model.trainable_variables)

    vector = [
        tf.random.normal(v.shape, dtype=v.dtype, seed=0) for v in model.trainable_variables
    ]
    return metric, gradient, vector


def _peak_memory_mb(fn):
    """Peak TensorFlow CPU allocator memory while `fn` runs, above what was held before."""
    gc.collect()
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    _ = [piece.numpy() for piece in fn()]
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return (peak - before) / 2**20


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _ = [r.numpy() for r in result]  # Wait for the values.
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def benchmark(name, num_inputs, repeats):
    metric, gradient, vector = _setup(name, num_inputs)

    # Warm-up (tracing), then interleaved timing
    for _ in range(2):
        metric.matvec(vector)
        gradient()
    matvec_times, gradient_times = [], []
    for _ in range(repeats):
        matvec_times.append(_median_seconds(lambda: metric.matvec(vector), 1))
        gradient_times.append(_median_seconds(gradient, 1))
    matvec_seconds = float(np.median(matvec_times))
    gradient_seconds = float(np.median(gradient_times))

    # Top-20 eigenpairs at tol=1e-4, checked against a machine-precision run
    start = time.perf_counter()
    pairs = geometry.top_eigenpairs(metric, k=20, tol=1e-4)
    top20_seconds = time.perf_counter() - start
    reference = geometry.top_eigenpairs(metric, k=20, tol=0.0)
    top20_error = float(np.max(np.abs(pairs.values - reference.values) / reference.values))

    return {
        "benchmark": "metric_matvec",
        "model": name,
        "num_params": metric.num_params,
        "num_inputs": num_inputs,
        "matvec_seconds": matvec_seconds,
        "gradient_seconds": gradient_seconds,
        "matvec_over_gradient": matvec_seconds / gradient_seconds,
        "matvec_over_gradient_best": min(matvec_times) / min(gradient_times),
        "matvecs_for_top20": pairs.num_matvecs,
        "top20_seconds": top20_seconds,
        "top20_max_relative_error": top20_error,
        "matvecs_for_top20_tol0": reference.num_matvecs,
        "top_eigenvalue": float(reference.values[0]),
        "peak_memory_matvec_mb": _peak_memory_mb(lambda: metric.matvec(vector)),
        "peak_memory_gradient_mb": _peak_memory_mb(gradient),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100,cnn5")
    parser.add_argument("--num_inputs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.num_inputs < 1 or args.repeats < 1:
        parser.error("--num_inputs and --repeats must be >= 1")
    for name in args.models.split(","):
        print(json.dumps(benchmark(name, args.num_inputs, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
