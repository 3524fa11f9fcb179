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
- `peak_memory_*_mb`: peak of TensorFlow's allocator on the device the model runs on
  (`get_memory_info`, reset just before) while one traced matvec (one gradient) runs,
  above what was allocated before. TensorFlow's default CPU allocator keeps no statistics,
  so this script sets `TF_CPU_ALLOCATOR_USE_BFC=true` before TensorFlow starts (the BFC
  allocator, which GPUs use, keeps them); where they are still unavailable (TensorFlow
  imported earlier by the caller) the fields are `null` and `peak_memory_note` says why.

Prints one JSON line per model.

Example:

    python -m benchmarks.metric_matvec
    python -m benchmarks.metric_matvec --models=lenet_300_100 --repeats=10
    python -m benchmarks.metric_matvec --models=mlp --dataset=digits --num_inputs=100
"""

import argparse
import gc
import json
import os
import time

# Statistics of TensorFlow's CPU allocator (must be set before TensorFlow starts).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_fip import data
from keras_fip import geometry
from keras_fip import models


def _setup(name, dataset, num_inputs):
    model, _ = models.base_network(name, dataset)
    x, y = data.load(dataset, "train")
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


def _memory_device():
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _peak_memory_mb(fn):
    """Peak allocator memory while `fn` runs, above what was held before; `(None, why)`
    where the allocator keeps no statistics."""
    device = _memory_device()
    gc.collect()
    try:
        tf.config.experimental.reset_memory_stats(device)
        before = tf.config.experimental.get_memory_info(device)["current"]
    except ValueError as error:
        return None, (f"{device}: {error} (set TF_CPU_ALLOCATOR_USE_BFC=true before "
                      "TensorFlow starts)")
    _ = [piece.numpy() for piece in fn()]
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    return (peak - before) / 2**20, None


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _ = [r.numpy() for r in result]  # Wait for the values.
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def benchmark(name, dataset, num_inputs, repeats):
    metric, gradient, vector = _setup(name, dataset, num_inputs)

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

    matvec_memory, note = _peak_memory_mb(lambda: metric.matvec(vector))
    gradient_memory, _ = _peak_memory_mb(gradient)
    result = {
        "benchmark": "metric_matvec",
        "model": name,
        "dataset": dataset,
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
        "peak_memory_device": _memory_device(),
        "peak_memory_matvec_mb": matvec_memory,
        "peak_memory_gradient_mb": gradient_memory,
    }
    if note:
        result["peak_memory_note"] = note
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100,cnn5")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--num_inputs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.num_inputs < 1 or args.repeats < 1:
        parser.error("--num_inputs and --repeats must be >= 1")
    for name in args.models.split(","):
        print(json.dumps(benchmark(name, args.dataset, args.num_inputs, args.repeats)),
              flush=True)


if __name__ == "__main__":
    main()
