"""Quantize against Keras's PTQ, straight-through QAT and TFLite PTQ on a zoo network.

For each seed, holds a stratified, seeded `--validation_fraction` of the training split out
(`keras_fip.core.tuning.validation_rows`), trains (or reads from the cache) the float
network `--model` on the rest as `keras_fip.models.base_network` trains it (`--base_epochs`
of Adam, cosine-decayed: `float_network`), so the validation split is data the float
network never saw, and quantises it at each of `--bits` with:

- `fip`: `keras_fip.Quantize(bits, data=(x, y))` on the rest of the training split (its
  first `--train_size` rows of a seeded stratified draw, when given), its
  defaults but what `--fip_options` (a JSON object of Quantize keyword arguments; a
  `"schedule"` object becomes a `QuantizeSchedule`) sets, the walk's `--fip_epochs` and
  its `Penalty` rule's `--fip_learning_rate` (`"auto"` by default);
- `qat`: `keras_fip.baselines.quantization.ste_qat` on the same grid and data, for as many
  epochs as the walk (its learning rate chosen on the validation split over
  `--qat_learning_rates`, extended past a winning edge: `keras_fip.core.tuning.grid_search`;
  the row also gives every rate's test accuracy, `test_accuracy_by_rate`;
  `--qat_schedule=cosine` decays it over the run);
- `keras_int8`, `keras_int4`: Keras's `model.quantize` (at 8 and 4 bits; `keras_int4` is
  also the reference at 3 and 2 bits, the lowest width Keras has);
- `rtn` (not run unless named): post-training round-to-nearest onto the same `bits`-bit
  per-channel grid with Keras's abs-max scale rule
  (`keras_fip.baselines.quantization.round_to_nearest`): Keras's int4 quantiser carried to
  3 and 2 bits;
- `gptq` (not run unless named): Keras's GPTQ at `bits`
  (`keras_fip.baselines.quantization.keras_gptq`, Keras's `GPTQConfig` defaults: asymmetric,
  groups of 128 input rows), calibrated on 1,024 rows of the quantisation data; it
  quantises Dense layers only;
- `tflite`: TFLite's dynamic-range PTQ of the float network (at 8 bits);
- `compress_fip` (not run unless named): `keras_fip.chain(Compress(--sparsity),
  Quantize(bits))`, each with its defaults, reported also with its packed size
  (`packed_bytes`: a bitmap of the non-zeros, `bits` bits each, a scale per channel);
  the results page gives it per seed (times smaller, test error above the dense network).

Reports, per seed, method and bit width, the test accuracy, the size of the exported TFLite
file gzipped (as tfmot's guides measure size) and how many times smaller it is than the
float32 model (4 bytes a parameter: `times_smaller`), and the relative error of each quantised
kernel (‖w_q − w‖ / ‖w‖, where the kernel is readable as floats), and for `fip` how far the
TFLite interpreter's outputs of its export lie from the Keras model's on the test set
(`tflite_match`: the largest absolute logit difference, its ratio to the largest logit and
the share of test predictions that agree); one JSON line each, then
a summary line per method and width (mean over seeds). `--output` also writes them as
`results.json` (with provenance) in that directory.

Example:

    python -m benchmarks.quantize_lenet --bits=4,3,2 --seeds=0
    python -m benchmarks.quantize_lenet --bits=2 --fip_options='{"scales": "fitted"}'
    python -m benchmarks.quantize_lenet --model=cnn5 --base_epochs=5 --bits=4 \
        --methods=fip,keras_int4 --train_size=10000
    python -m benchmarks.quantize_lenet --bits=4,3 --methods=fip,gptq,keras_int4 --seeds=0,1,2
    python -m benchmarks.quantize_lenet --bits=4,3 --methods=compress_fip --sparsity=0.965 \
        --seeds=0,1,2
"""

import argparse
import gzip
import hashlib
import json
import os
import tempfile

import keras
import numpy as np

import keras_fip
from keras_fip.baselines import quantization as baselines
from keras_fip.core import tuning
from keras_fip.models import training
from keras_fip.operations import quantize as quantize_lib

METHODS = ("fip", "qat", "keras_int8", "keras_int4", "gptq", "rtn", "tflite", "compress_fip")
# Rows of the quantisation data GPTQ calibrates on.
GPTQ_ROWS = 1024
DEFAULT_METHODS = ("fip", "qat", "keras_int8", "keras_int4", "tflite")


def accuracy(model, x, y):
    outputs = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(outputs, axis=-1) == np.asarray(y).reshape(-1)))


def gzipped_tflite_size(model):
    """Bytes of the model's TFLite export (`keras_fip.export`), gzipped; `None` when the
    TFLite converter cannot convert it (Keras's int8 layers that quantise their inputs
    multiply int8 by int8, which TFLite's fully connected op does not take)."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.tflite")
        try:
            keras_fip.export(model, path, format="tflite")
        except Exception:  # The converter's error class is not public API.
            return None
        with open(path, "rb") as file:
            return len(gzip.compress(file.read(), compresslevel=9))


def float_network(model, dataset, epochs, seed, excluded_rows, cache_dir=None):
    """`model` trained on `dataset`'s training split without `excluded_rows`, cached.

    The recipe of `keras_fip.models.base_network` (seeded initialisation, Adam at 1e-3
    cosine-decayed over `epochs`, batches of 128); cached under
    `<cache>/base_networks/` by a key of the arguments and the excluded rows.

    Returns:
        A tuple `(network, results)` with `"test/accuracy"` and `"cache/path"`.
    """
    excluded = np.asarray(excluded_rows, dtype="int64")
    config = {
        "model": model,
        "dataset": dataset,
        "epochs": epochs,
        "seed": seed,
        "excluded_rows": hashlib.sha256(excluded.tobytes()).hexdigest()[:16],
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    directory = os.path.join(
        cache_dir or training.default_cache_dir(),
        "base_networks",
        f"{model}_{dataset}_without_validation_{key}",
    )
    path = os.path.join(directory, "model.keras")
    if os.path.isfile(path):
        with open(os.path.join(directory, "results.json")) as file:
            return keras.saving.load_model(path), json.load(file)
    keras.utils.set_random_seed(seed)
    info = keras_fip.data.info(dataset)
    x, y = keras_fip.data.load(dataset, split="train")
    kept = np.setdiff1d(np.arange(len(y)), excluded)
    network = keras_fip.models.get(model, info["input_shape"], info["num_classes"])
    training.train_classifier(network, x[kept], y[kept], epochs)
    x_test, y_test = keras_fip.data.load(dataset, split="test")
    results = {
        "test/accuracy": accuracy(network, x_test, y_test),
        "train/examples": int(len(kept)),
        "config": config,
        "cache/path": directory,
    }
    os.makedirs(directory, exist_ok=True)
    network.save(path + ".tmp.keras")
    os.replace(path + ".tmp.keras", path)
    with open(os.path.join(directory, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    return network, results


def tflite_match(model, x):
    """How far the TFLite interpreter's outputs of `model`'s export lie from Keras's on `x`:
    the largest absolute difference, its ratio to the largest absolute Keras output and
    the share of rows whose argmax agrees; `None` when the converter cannot convert it."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.tflite")
        try:
            keras_fip.export(model, path, format="tflite")
        except Exception:  # The converter's error class is not public API.
            return None
        runner = tf_runner(path)
        name = next(iter(runner.get_input_details()))
        interpreted = np.concatenate(
            [
                next(iter(runner(**{name: x[i : i + 1000].astype("float32")}).values()))
                for i in range(0, len(x), 1000)
            ]
        )
    expected = model.predict(x, batch_size=512, verbose=0)
    difference = float(np.max(np.abs(interpreted - expected)))
    return {
        "max_abs_difference": difference,
        "relative_difference": difference / float(np.max(np.abs(expected))),
        "argmax_agreement": float(np.mean(np.argmax(interpreted, -1) == np.argmax(expected, -1))),
    }


def kernel_errors(float_model, quantized):
    """Relative error of each float kernel of `quantized` against `float_model`'s."""
    reference = {
        layer.name: variable.numpy()
        for layer, variable, _ in quantize_lib.quantizable_variables(float_model)
    }
    errors = {}
    for layer, variable, _ in quantize_lib.quantizable_variables(quantized):
        if layer.name in reference:
            before = reference[layer.name]
            errors[layer.name] = float(
                np.linalg.norm(variable.numpy() - before) / np.linalg.norm(before)
            )
    return errors


def packed_bytes(model, bits):
    """Bytes of the model stored sparse and low-bit: per quantised kernel a bitmap of its
    non-zeros, `bits` bits per non-zero and a float32 scale per channel; every other
    weight as float32."""
    kernels = quantize_lib.quantizable_variables(model)
    kernel_ids = {id(variable) for _, variable, _ in kernels}
    total = 0
    for _, variable, axes in kernels:
        weights = variable.numpy()
        channels = weights.size // int(np.prod([weights.shape[a] for a in axes]))
        nonzero = int(np.count_nonzero(weights))
        total += -(-weights.size // 8) + -(-nonzero * bits // 8) + 4 * channels
    total += sum(4 * int(np.prod(v.shape)) for v in model.weights if id(v) not in kernel_ids)
    return total


def fip_options(text):
    options = json.loads(text) if text else {}
    if isinstance(options.get("schedule"), dict):
        options["schedule"] = quantize_lib.QuantizeSchedule(**options["schedule"])
    return options


def run_seed(args, seed):
    x, y = keras_fip.data.load(args.dataset, split="train")
    x_test, y_test = keras_fip.data.load(args.dataset, split="test")
    fit_rows, val_rows = tuning.validation_rows(y, args.validation_fraction, seed)
    model, _ = float_network(args.model, args.dataset, args.base_epochs, seed, val_rows)
    if args.train_size:
        drawn = tuning.validation_rows(y[fit_rows], args.train_size / len(fit_rows), seed)[1]
        fit_rows = fit_rows[drawn]
    if args.test_size:
        x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    x_fit, y_fit, x_val, y_val = x[fit_rows], y[fit_rows], x[val_rows], y[val_rows]
    rows = []

    float32_bytes = 4 * sum(int(np.prod(w.shape)) for w in model.weights)

    def record(method, bits, quantized, extra=None):
        size = gzipped_tflite_size(quantized)
        row = {
            "seed": seed,
            "method": method,
            "bits": bits,
            "accuracy": accuracy(quantized, x_test, y_test),
            "gzipped_tflite_bytes": size,
            "times_smaller": None if size is None else float32_bytes / size,
            "kernel_error": kernel_errors(model, quantized),
            **(extra or {}),
        }
        print(json.dumps({"benchmark": "quantize_lenet", **row}), flush=True)
        rows.append(row)

    float_row = {
        "seed": seed,
        "method": "float",
        "bits": 32,
        "accuracy": accuracy(model, x_test, y_test),
        "gzipped_tflite_bytes": None,
        "float32_bytes": float32_bytes,
    }
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "float.h5.gz")
        weights = b"".join(w.astype("float32").tobytes() for w in model.get_weights())
        with open(path, "wb") as file:
            file.write(gzip.compress(weights, compresslevel=9))
        float_row["gzipped_weights_bytes"] = os.path.getsize(path)
    print(json.dumps({"benchmark": "quantize_lenet", **float_row}), flush=True)
    rows.append(float_row)
    options = fip_options(args.fip_options)
    for bits in args.bits:
        steps = None
        if "fip" in args.methods:
            rule = keras_fip.rules.Penalty(args.fip_learning_rate)
            walk = keras_fip.Walk(epochs=args.fip_epochs, rule=rule, seed=seed, verbose=0)
            op = keras_fip.Quantize(bits, data=(x_fit, y_fit), walk=walk, **options)
            quantized = op(model)
            steps = op.history["steps"]
            # Kernel errors of Keras-quantised layers: the same walk on float grids.
            record(
                "fip",
                bits,
                quantized,
                {
                    "steps": steps,
                    "keras_layers": op.history["keras_layers"],
                    "layer_error": op.history["layer_error"],
                    "beta": op.history["beta"],
                    "learning_rate": op.history["learning_rate"],
                    "tflite_match": tflite_match(quantized, x_test),
                },
            )
        if "compress_fip" in args.methods:
            walk = keras_fip.Walk(seed=seed, verbose=0)
            chained = keras_fip.chain(
                keras_fip.Compress(args.sparsity, data=(x_fit, y_fit), walk=walk),
                keras_fip.Quantize(bits, data=(x_fit, y_fit), keras_layers=False, walk=walk),
            )
            quantized = chained(model)
            record(
                "compress_fip",
                bits,
                quantized,
                {"sparsity": args.sparsity, "packed_bytes": packed_bytes(quantized, bits)},
            )
        if "qat" in args.methods:
            epochs = args.fip_epochs

            trained_at = {}

            def qat(rate, bits=bits, epochs=epochs):
                if args.qat_schedule == "cosine":
                    steps = epochs * -(-len(y_fit) // 128)
                    rate = keras.optimizers.schedules.CosineDecay(rate, steps)
                return baselines.ste_qat(
                    model, bits, (x_fit, y_fit), epochs=epochs, learning_rate=rate, seed=seed
                )

            def score(rate, trained_at=trained_at):
                trained_at[rate] = qat(rate)
                return accuracy(trained_at[rate], x_val, y_val)

            rate, validation = tuning.grid_search(
                score, args.qat_learning_rates, low=1e-7, high=1e-1, prefer="larger"
            )
            trained = trained_at.get(rate) or qat(rate)
            # Every rate's test accuracy too: what the choice on validation left.
            record(
                "qat",
                bits,
                trained,
                {
                    "learning_rate": rate,
                    "schedule": args.qat_schedule,
                    "epochs": epochs,
                    "validation_accuracy": {str(k): v for k, v in validation.items()},
                    "test_accuracy_by_rate": {
                        str(k): accuracy(m, x_test, y_test) for k, m in trained_at.items()
                    },
                },
            )
        if "keras_int8" in args.methods and bits == 8:
            record("keras_int8", bits, baselines.keras_ptq(model, "int8"))
        if "keras_int4" in args.methods and bits <= 4:
            record("keras_int4", bits, baselines.keras_ptq(model, "int4"))
        if "gptq" in args.methods:
            calibration = x_fit[np.random.default_rng(seed).permutation(len(x_fit))[:GPTQ_ROWS]]
            record("gptq", bits, baselines.keras_gptq(model, bits, calibration))
        if "rtn" in args.methods:
            record("rtn", bits, baselines.round_to_nearest(model, bits))
        if "tflite" in args.methods and bits == 8:
            with tempfile.TemporaryDirectory() as directory:
                path = baselines.tflite_ptq(model, os.path.join(directory, "ptq.tflite"))
                runner = tf_runner(path)
                name = next(iter(runner.get_input_details()))
                outputs = runner(**{name: x_test.astype("float32")})["output_0"]
                with open(path, "rb") as file:
                    size = len(gzip.compress(file.read(), compresslevel=9))
            row = {
                "seed": seed,
                "method": "tflite",
                "bits": 8,
                "accuracy": float(np.mean(np.argmax(outputs, -1) == y_test)),
                "gzipped_tflite_bytes": size,
            }
            print(json.dumps({"benchmark": "quantize_lenet", **row}), flush=True)
            rows.append(row)
    return rows


def tf_runner(path):
    import tensorflow as tf

    return tf.lite.Interpreter(model_path=path).get_signature_runner("serve")


def summarize(rows):
    summary = {}
    for row in rows:
        summary.setdefault((row["method"], row["bits"]), []).append(row["accuracy"])
    lines = []
    for (method, bits), values in sorted(
        summary.items(), key=lambda item: (-item[0][1], item[0][0])
    ):
        line = {
            "method": method,
            "bits": bits,
            "accuracy_mean": float(np.mean(values)),
            "accuracy_std": float(np.std(values)),
            "seeds": len(values),
        }
        printed = {
            "benchmark": "quantize_lenet",
            "summary": True,
            "method": method,
            "bits": bits,
            "accuracy/mean": line["accuracy_mean"],
            "accuracy/std": line["accuracy_std"],
            "seeds": line["seeds"],
        }
        print(json.dumps(printed), flush=True)
        lines.append(line)
    return lines


NAMES = {
    "float": "float32",
    "fip": "Quantize (defaults)",
    "qat": "STE QAT (rate chosen on validation)",
    "keras_int8": "Keras int8 PTQ",
    "keras_int4": "Keras int4 PTQ (4 bits)",
    "gptq": "Keras GPTQ",
    "rtn": "round-to-nearest",
    "tflite": "TFLite dynamic-range PTQ",
    "compress_fip": "chain(Compress, Quantize)",
}


def summary_page(args, rows, lines):
    """The results page's summary: test accuracy per method and width, each seed's too."""
    seeds = ", ".join(str(seed) for seed in args.seeds)
    table = []
    for line in lines:
        values = [
            row["accuracy"]
            for row in rows
            if row["method"] == line["method"] and row["bits"] == line["bits"]
        ]
        table.append(
            [
                NAMES[line["method"]],
                line["bits"],
                f"{100 * line['accuracy_mean']:.2f} ± {100 * line['accuracy_std']:.2f}",
                " / ".join(f"{100 * value:.2f}" for value in values),
            ]
        )
    tables = [
        {
            "caption": "Test accuracy (%)",
            "columns": ["method", "bits", "accuracy", "per seed"],
            "rows": table,
        }
    ]
    dense = {row["seed"]: row["accuracy"] for row in rows if row["method"] == "float"}
    chained = [row for row in rows if row["method"] == "compress_fip"]
    for bits in sorted({row["bits"] for row in chained}, reverse=True):
        tables.append(
            {
                "caption": f"chain(Compress({args.sparsity:g}), Quantize({bits})) per seed",
                "columns": [
                    "seed",
                    "times smaller (gzipped TFLite vs float32)",
                    "gzipped TFLite bytes",
                    "test error above dense (pp)",
                ],
                "rows": [
                    [
                        row["seed"],
                        f"{row['times_smaller']:.1f}",
                        row["gzipped_tflite_bytes"],
                        f"{100 * (dense[row['seed']] - row['accuracy']):+.2f}",
                    ]
                    for row in chained
                    if row["bits"] == bits
                ],
            }
        )
    matches = [row for row in rows if row["method"] == "fip" and row.get("tflite_match")]
    if matches:
        tables.append(
            {
                "caption": "Quantize's TFLite export against the Keras model, test set",
                "columns": [
                    "seed",
                    "bits",
                    "largest absolute logit difference",
                    "relative to the largest absolute logit",
                    "same prediction",
                ],
                "rows": [
                    [
                        row["seed"],
                        row["bits"],
                        f"{row['tflite_match']['max_abs_difference']:.3g}",
                        f"{row['tflite_match']['relative_difference']:.2%}",
                        f"{row['tflite_match']['argmax_agreement']:.2%}",
                    ]
                    for row in matches
                ],
            }
        )
    return {
        "title": (
            f"Quantize: chain(Compress({args.sparsity:g}), Quantize) on {args.model}"
            if args.methods == ["compress_fip"]
            else f"Quantize: {args.model} on {args.dataset}"
        ),
        "description": (
            f"Test accuracy (%), mean ± std over seeds {seeds} (and per seed); the float "
            f"network trained {args.base_epochs} epochs without the validation split "
            f"({args.validation_fraction:.0%} of the training set); "
            + ("Quantize and QAT" if "qat" in args.methods else "Quantize")
            + f" {args.fip_epochs} epochs of the rest"
            + (f" ({args.train_size} examples)" if args.train_size else "")
            + "."
        ),
        "tables": tables,
    }


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--base_epochs", type=int, default=10)
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--fip_epochs", type=int, default=3)
    parser.add_argument("--fip_options", default="")
    parser.add_argument("--fip_learning_rate", default="auto")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--qat_learning_rates", default="1e-5,1e-4,1e-3")
    parser.add_argument("--qat_schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--validation_fraction", type=float, default=0.1)
    parser.add_argument("--train_size", type=int, default=0)
    parser.add_argument("--test_size", type=int, default=0)
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    if args.fip_learning_rate != "auto":
        args.fip_learning_rate = float(args.fip_learning_rate)
    args.qat_learning_rates = [float(r) for r in args.qat_learning_rates.split(",")]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"`--methods` must be among {list(METHODS)}. Received: {unknown}")
    return args


def main(argv=None):
    args = parse(argv)
    keras.utils.set_random_seed(args.seeds[0])
    rows = []
    for seed in args.seeds:
        rows.extend(run_seed(args, seed))
    summary = summarize(rows)
    if args.output:
        from apps.provenance import write_results

        write_results(
            args.output,
            {"rows": rows, "summary": summary, "flags": vars(args)},
            page=summary_page(args, rows, summary),
        )
    return rows, summary


if __name__ == "__main__":
    main()
