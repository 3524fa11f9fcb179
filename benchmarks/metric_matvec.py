"""Cost of one metric product g·v relative to one loss gradient, and of the top-20 spectrum.

For LeNet-300-100 (the default run) and cnn5 (`--models=lenet_300_100,cnn5`, the long
run: cnn5's training and products cost more than LeNet's) trained on MNIST
(`keras_fip.models.base_network`, cached), on the same 1,000 MNIST training inputs and in
the same run:

- `matvec_over_gradient`: median time of one `MetricOperator.matvec` (one JVP + one VJP
  over the 1,000 inputs, one `tf.function`) over the median time of one `tf.function`
  gradient of the mean cross-entropy on the same inputs; the two are timed interleaved
  after a warm-up, `--repeats` times each (`matvec_over_gradient_best`: the same ratio of
  the fastest runs, less sensitive to other load on the machine).
- `matmat_over_gradient`: the same for one product of a block: the median time of one
  `MetricOperator.matmat` of `--block_vectors` (16) vectors, which share each batch's
  forward pass, divided by the number of vectors, over the gradient's median, timed
  interleaved with the two above (`matmat_over_gradient_best`: fastest runs). This is the
  cost per product in `trace`, `spectral_density` and `vulnerable_fraction`, which take
  their products in blocks; `trace_seconds` and `trace_seconds_one_per_pass` time
  `trace(metric, --trace_samples)` (median of 3) with blocks and with one probe per
  forward pass (`vectors_per_pass=1`, the earlier way), and `trace_seconds_products` the
  same Hutch++ through `as_linear_operator()`, which takes products for the probes that
  `trace` takes as quadratic forms (two thirds of them).
- `quadratic_form_over_gradient`: the same for one quadratic form vᵀ g v
  (`MetricOperator.quadratic_form`: the forward and tangent passes, no reverse pass; 1.0×
  in arithmetic on LeNet-300-100), and `quadratic_form_block_over_gradient` per form of a
  block of `--block_vectors` sharing the forward pass ((0.53 + 0.47 / k)× in arithmetic),
  timed interleaved with the products.
- `variants` (`--variants`, each timed interleaved with the two above, medians):
  `forward_accumulator_over_gradient`, the same product computed the earlier way (J v by
  `tf.autodiff.ForwardAccumulator`, which carries a zero tangent for the input batch through
  the first layer, then Jᵀ (J v) by `GradientTape`), one `tf.function`; and `xla_over_gradient`,
  the library's product and the gradient both compiled with `jit_compile=True` (XLA), plus
  `xla_gradient_over_gradient` (the XLA gradient over the default one).
- `matvecs_for_top20`: products g·v used by `top_eigenpairs(k=20, tol=1e-4)`, and the
  largest relative error of those eigenvalues against a `tol=0` (machine precision) run.
- `peak_memory_*_mb`: peak of TensorFlow's allocator on the device the model runs on
  (`get_memory_info`, reset just before) while one traced matvec (one gradient) runs,
  above what was allocated before. TensorFlow's default CPU allocator keeps no statistics,
  so this script sets `TF_CPU_ALLOCATOR_USE_BFC=true` before TensorFlow starts (the BFC
  allocator, which GPUs use, keeps them); where they are still unavailable (TensorFlow
  imported earlier by the caller) the fields are `null` and `peak_memory_note` says why.

The floor of the ratio: a standalone product runs the forward pass, J v and Jᵀ (J v); the
gradient runs the forward pass and one reverse pass. On LeNet-300-100 with 1,000 inputs
that is 860M multiply-adds against 563M (the first layer's x·V₁ and xᵀδ₁ each cost as much
as its forward pass): 1.53 in arithmetic, so ~1.5 is what one product can reach. Products
that share one forward pass (`matmat`, or a conjugate-gradient solve inside one
`tf.function` with `linearize`) each add 594M, 1.05× a gradient, plus their share of the
266M forward pass: (1.05 + 0.47 / k)× for a block of k (1.08 for 16).

Prints one JSON line per model, with `load_average` (1-minute load at the start and the end:
the machine may be shared).

Example:

    python -m benchmarks.metric_matvec                    # LeNet-300-100
    python -m benchmarks.metric_matvec --models=lenet_300_100,cnn5
    python -m benchmarks.metric_matvec --repeats=10
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
from keras_fip.geometry import metric as metric_lib

VARIANTS = ("forward_accumulator", "xla")


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # Not available on this platform.
        return None


def _variant_functions(model, x, y, vector, variants):
    """The timed alternatives to the library's product (see the module docstring)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    primals = metric_lib._primals(model)
    scale = 1.0 / int(x.shape[0])
    functions = {}
    if "forward_accumulator" in variants:

        @tf.function
        def forward_accumulator():
            with tf.autodiff.ForwardAccumulator(primals, vector) as accumulator:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(primals)
                    values = metric_lib._flat_outputs(model, x, "logits")
            jvp = accumulator.jvp(values, unconnected_gradients="zero") * scale
            return tape.gradient(
                values,
                primals,
                output_gradients=tf.stop_gradient(jvp),
                unconnected_gradients="zero",
            )

        functions["forward_accumulator"] = forward_accumulator
    if "xla" in variants:

        @tf.function(jit_compile=True)
        def xla():
            return metric_lib._summed_metric_vector_product(model, x, vector, "logits", scale=scale)

        @tf.function(jit_compile=True)
        def xla_gradient():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=False))
            return tape.gradient(loss, model.trainable_variables)

        functions["xla"] = xla
        functions["xla_gradient"] = xla_gradient
    return functions


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

    vector = [tf.random.normal(v.shape, dtype=v.dtype, seed=0) for v in model.trainable_variables]
    return metric, gradient, vector, model, x, y


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
        return None, (
            f"{device}: {error} (set TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow starts)"
        )
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


def benchmark(name, dataset, num_inputs, repeats, variants=(), block_vectors=16, trace_samples=48):
    metric, gradient, vector, model, x, y = _setup(name, dataset, num_inputs)
    load_start = _load_average()
    others = _variant_functions(model, x, y, vector, variants)
    block = tf.random.normal((metric.num_params, block_vectors), seed=1, dtype=metric.dtype)
    blocked = geometry.MetricOperator(model, x, vectors_per_pass=block_vectors)

    flat_vector = tf.concat([tf.reshape(tf.cast(v, metric.dtype), [-1]) for v in vector], 0)

    # Warm-up (tracing), then interleaved timing
    for _ in range(2):
        metric.matvec(vector)
        blocked.matmat(block)
        metric.quadratic_form(flat_vector)
        blocked.quadratic_form(block)
        gradient()
        for function in others.values():
            function()
    matvec_times, matmat_times, gradient_times = [], [], []
    form_times, form_block_times = [], []
    other_times = {label: [] for label in others}
    for _ in range(repeats):
        matvec_times.append(_median_seconds(lambda: metric.matvec(vector), 1))
        gradient_times.append(_median_seconds(gradient, 1))
        matmat_times.append(_median_seconds(lambda: [blocked.matmat(block)], 1))
        form_times.append(_median_seconds(lambda: [metric.quadratic_form(flat_vector)], 1))
        form_block_times.append(_median_seconds(lambda: [blocked.quadratic_form(block)], 1))
        for label, function in others.items():
            other_times[label].append(_median_seconds(function, 1))
    matvec_seconds = float(np.median(matvec_times))
    matmat_seconds = float(np.median(matmat_times))
    gradient_seconds = float(np.median(gradient_times))
    other_seconds = {label: float(np.median(t)) for label, t in other_times.items()}

    # Top-20 eigenpairs at tol=1e-4, checked against a machine-precision run
    start = time.perf_counter()
    pairs = geometry.top_eigenpairs(metric, k=20, tol=1e-4)
    top20_seconds = time.perf_counter() - start
    reference = geometry.top_eigenpairs(metric, k=20, tol=0.0)
    top20_error = float(np.max(np.abs(pairs.values - reference.values) / reference.values))

    # Hutch++ trace: quadratic forms and products in blocks, one probe per forward pass,
    # and products only (through scipy, as before quadratic forms)
    one_per_pass = geometry.MetricOperator(model, x, vectors_per_pass=1)
    trace_times = {}
    for label, operator in (
        ("blocks", blocked),
        ("one_per_pass", one_per_pass),
        ("products", blocked.as_linear_operator()),
    ):
        geometry.trace(operator, num_samples=trace_samples, seed=1)  # Tracing.
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            estimate = geometry.trace(operator, num_samples=trace_samples, seed=0)
            seconds.append(time.perf_counter() - start)
        trace_times[label] = float(np.median(seconds))
        trace_times[label + "_estimate"] = estimate

    matvec_memory, note = _peak_memory_mb(lambda: metric.matvec(vector))
    gradient_memory, _ = _peak_memory_mb(gradient)
    matmat_memory, _ = _peak_memory_mb(lambda: [blocked.matmat(block)])
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
        "block_vectors": block_vectors,
        "matmat_over_gradient": matmat_seconds / block_vectors / gradient_seconds,
        "matmat_over_gradient_best": (min(matmat_times) / block_vectors / min(gradient_times)),
        "quadratic_form_over_gradient": float(np.median(form_times)) / gradient_seconds,
        "quadratic_form_over_gradient_best": min(form_times) / min(gradient_times),
        "quadratic_form_block_over_gradient": (
            float(np.median(form_block_times)) / block_vectors / gradient_seconds
        ),
    }
    if "forward_accumulator" in other_seconds:
        result["forward_accumulator_over_gradient"] = (
            other_seconds["forward_accumulator"] / gradient_seconds
        )
    if "xla" in other_seconds:
        result["xla_over_gradient"] = other_seconds["xla"] / other_seconds["xla_gradient"]
        result["xla_gradient_over_gradient"] = other_seconds["xla_gradient"] / gradient_seconds
    result.update(
        {
            "matvecs_for_top20": pairs.num_matvecs,
            "top20_seconds": top20_seconds,
            "top20_max_relative_error": top20_error,
            "matvecs_for_top20_tol0": reference.num_matvecs,
            "top_eigenvalue": float(reference.values[0]),
            "trace_samples": trace_samples,
            "trace_seconds": trace_times["blocks"],
            "trace_seconds_one_per_pass": trace_times["one_per_pass"],
            "trace_seconds_products": trace_times["products"],
            "trace_estimates_agree": bool(
                np.isclose(
                    trace_times["blocks_estimate"], trace_times["one_per_pass_estimate"], rtol=1e-4
                )
                and np.isclose(
                    trace_times["blocks_estimate"], trace_times["products_estimate"], rtol=1e-4
                )
            ),
            "peak_memory_device": _memory_device(),
            "peak_memory_matvec_mb": matvec_memory,
            "peak_memory_gradient_mb": gradient_memory,
            "peak_memory_matmat_mb": matmat_memory,
            "load_average": [load_start, _load_average()],
        }
    )
    if note:
        result["peak_memory_note"] = note
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--num_inputs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--block_vectors",
        type=int,
        default=16,
        help="Vectors of the timed `matmat` block (one forward pass).",
    )
    parser.add_argument(
        "--trace_samples",
        type=int,
        default=48,
        help="Probes (products g·v and quadratic forms) of the timed Hutch++ trace.",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="Alternatives timed alongside: forward_accumulator, xla (comma-separated, or empty).",
    )
    args = parser.parse_args(argv)
    if args.num_inputs < 1 or args.repeats < 1 or args.block_vectors < 1:
        parser.error("--num_inputs, --repeats and --block_vectors must be >= 1")
    if args.trace_samples < 3:
        parser.error("--trace_samples must be >= 3 (Hutch++)")
    variants = tuple(v for v in args.variants.split(",") if v)
    if any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must name variants among {VARIANTS}; got {args.variants!r}")
    for name in args.models.split(","):
        print(
            json.dumps(
                benchmark(
                    name,
                    args.dataset,
                    args.num_inputs,
                    args.repeats,
                    variants,
                    args.block_vectors,
                    args.trace_samples,
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
