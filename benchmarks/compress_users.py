"""Compress with its defaults on models written as the Keras docs write them, against one-shot
magnitude pruning with fine-tuning.

The models are those of `benchmarks.user_models`: the keras.io text transformer (custom
`TokenAndPositionEmbedding` / `TransformerBlock` layers, a softmax head) on SST-2 token ids,
and the keras.io MNIST convnet (a softmax head), trained as the docs train them. Each is
sparsified by `keras_fip.Compress(sparsity, data=(x, y), epochs=E, seed=S)`: the labels in
`data`, every other argument its default (so the labels' weight is chosen on a split held
out of `data`, and the prunable set is tfmot's: kernels, Embedding tables, attention
kernels). The baseline prunes the same set by magnitude once
(`keras_fip.baselines.one_shot_magnitude_pruning`) and fine-tunes on the same data for the
epochs Compress's walk takes (`ceil(op.history["steps"] / steps per epoch)`: the walk that
returns the model; the steps Compress spends choosing the labels' weight are reported as
`fip/<p>/selection_steps`, as the baseline's learning-rate search is reported as its
grid). The baseline's initial Adam rate is chosen as its authors tune it, on a validation
split that no method trains on: from `--learning_rates` (1e-4, 1e-3), extended by factors
of 3 either way while an edge rate wins alone (`apps.common.tune_learning_rate`), on the
first seed (`--tune_every_seed`: on each), then used for every seed. The validation split
is SST-2's own validation sentences for the transformer (which it was not trained on); for
the convnet, trained on all 60,000 MNIST training images as the example trains it, a
stratified, seeded tenth of them, held out of everyone's `data` (the other 54,000) but seen
by the dense network.

Prints one JSON line per model and seed (test and validation accuracy of the dense model,
Compress and the baseline; the weight Compress chose and its held-out accuracies; the
zero fraction of the prunable weights and of all parameters), then one summary line per
model: means and standard deviations over seeds and Compress's margin over the baseline.

Example:

    python -m benchmarks.compress_users               # transformer at 50%, seed 0, 300 steps
    python -m benchmarks.compress_users --models=text_transformer --sparsities=50,80 \
        --seeds=0,1,2 --steps=0                        # Compress's own budget (1,000 steps)
    python -m benchmarks.compress_users --steps=0 --task_weights=0,1,10  # given weights too
    python -m benchmarks.compress_users --models=mnist_convnet --sparsities=90 \
        --seeds=0,1,2 --steps=0                        # 2 epochs of 54,000 images
"""

import argparse
import json
import math
import time

import keras
import numpy as np

import keras_fip
from apps import common
from benchmarks import user_models
from keras_fip import baselines
from keras_fip.engine import projection
from keras_fip.operations.compress import holdout_rows

MODELS = ("text_transformer", "mnist_convnet")
DEFAULT_SPARSITIES = {"text_transformer": (50.0, 80.0), "mnist_convnet": (90.0,)}
# Compress's `epochs` per model: its default for the transformer (10 passes over 6,920
# sentences are 550 steps, raised to its 1,000-step floor), 2 for 54,000 MNIST images (the
# same floor: 844 steps).
EPOCHS = {"text_transformer": 10, "mnist_convnet": 2}
MNIST_VALIDATION_FRACTION = 0.1
BASELINE_LEARNING_RATES = (1e-4, 1e-3)
BATCH_SIZE = 128


def load(name, seed, base_epochs=None, train_size=None):
    """`(model, (x, y), (x_val, y_val), (x_test, y_test))` for one of `MODELS`, trained
    for `base_epochs` (`None`: as the Keras example trains it) on `train_size` MNIST
    images (`None`: all)."""
    if name == "text_transformer":
        model, data = user_models.trained(name, seed, epochs=base_epochs)
        return model, (data["x"], data["y"]), (data["x_val"], data["y_val"]), _test(data)
    model, data = user_models.trained(name, seed, epochs=base_epochs, train_size=train_size)
    fit, held = holdout_rows(data["y"], MNIST_VALIDATION_FRACTION, seed)
    validation = (data["x"][held], data["y"][held])
    return model, (data["x"][fit], data["y"][fit]), validation, _test(data)


def _test(data):
    return data["x_test"], data["y_test"]


def _accuracy(model, split):
    return round(user_models.accuracy(model, *split), 4)


def _zero_fractions(model):
    summary = projection.sparsity_summary(model)
    return {
        "prunable_sparsity": round(summary.prunable_sparsity, 4),
        "parameter_sparsity": round(summary.sparsity, 4),
        "prunable_share": round(summary.prunable_share, 4),
    }


def compress(model, sparsity, data, epochs, steps, seed, **kwargs):
    """Compress with its defaults: model, data (with labels), budget and seed only (and
    `kwargs`, for the runs `--task_weights` adds)."""
    budget = {"steps": steps} if steps else {"epochs": epochs}
    operation = keras_fip.Compress(sparsity, data=data, seed=seed, verbose=0, **budget, **kwargs)
    return operation(model), operation


def one_shot(model, sparsity, data, epochs, learning_rate, seed):
    keras.utils.set_random_seed(seed)
    return baselines.one_shot_magnitude_pruning(
        model, sparsity, *data, epochs=epochs, batch_size=BATCH_SIZE, learning_rate=learning_rate
    )


def run(
    name,
    sparsities,
    seed,
    steps,
    tuned,
    learning_rates,
    base_epochs=None,
    task_weights=(),
    train_size=None,
):
    """One model and seed: Compress and the baseline at each sparsity. `tuned` maps a
    sparsity to the baseline's learning rate chosen on an earlier seed (filled here when
    this seed tunes it)."""
    model, data, validation, test = load(name, seed, base_epochs, train_size)
    result = {
        "benchmark": "compress_users",
        "model": name,
        "seed": seed,
        "parameters": int(model.count_params()),
        "dense/test/accuracy": _accuracy(model, test),
        "dense/validation/accuracy": _accuracy(model, validation),
    }
    steps_per_epoch = math.ceil(len(data[1]) / BATCH_SIZE)
    for percent in sparsities:
        key, sparsity = f"{percent:g}", percent / 100.0
        start = time.perf_counter()
        sparse, operation = compress(model, sparsity, data, EPOCHS[name], steps, seed)
        history = operation.history
        result.update(
            {
                f"fip/{key}/test/accuracy": _accuracy(sparse, test),
                f"fip/{key}/validation/accuracy": _accuracy(sparse, validation),
                f"fip/{key}/task_weight": history["task_weight"],
                f"fip/{key}/task_weight_selection": history.get("task_weight_selection"),
                f"fip/{key}/steps": history["steps"],
                f"fip/{key}/selection_steps": history["selection_steps"],
                f"fip/{key}/seconds": round(time.perf_counter() - start, 1),
                **{f"fip/{key}/{k}": v for k, v in _zero_fractions(sparse).items()},
            }
        )
        for task_weight in task_weights:  # Runs at given weights, beside the defaults.
            given, _ = compress(
                model, sparsity, data, EPOCHS[name], steps, seed, task_weight=task_weight
            )
            result[f"fip_task{task_weight:g}/{key}/test/accuracy"] = _accuracy(given, test)
            result[f"fip_task{task_weight:g}/{key}/validation/accuracy"] = _accuracy(
                given, validation
            )
        epochs = math.ceil(history["steps"] / steps_per_epoch)
        start = time.perf_counter()
        runs = {}  # The tuning's pruned models, by rate: the chosen one is not run again.
        if key not in tuned:
            scores = {}

            def score(rate):
                runs[rate] = one_shot(model, sparsity, data, epochs, rate, seed)  # noqa: B023
                scores[rate] = user_models.accuracy(runs[rate], *validation)  # noqa: B023
                return scores[rate]  # noqa: B023

            tuned[key], _ = common.tune_learning_rate(score, list(learning_rates))
            result[f"oneshot/{key}/tuning/validation_accuracy"] = {
                f"{r:g}": round(a, 4) for r, a in sorted(scores.items())
            }
        if tuned[key] in runs:
            pruned = runs[tuned[key]]
        else:
            pruned = one_shot(model, sparsity, data, epochs, tuned[key], seed)
        result.update(
            {
                f"oneshot/{key}/test/accuracy": _accuracy(pruned, test),
                f"oneshot/{key}/validation/accuracy": _accuracy(pruned, validation),
                f"oneshot/{key}/learning_rate": tuned[key],
                f"oneshot/{key}/epochs": epochs,
                f"oneshot/{key}/seconds": round(time.perf_counter() - start, 1),
                **{f"oneshot/{key}/{k}": v for k, v in _zero_fractions(pruned).items()},
            }
        )
        result[f"fip/{key}/margin_over_oneshot"] = round(
            result[f"fip/{key}/test/accuracy"] - result[f"oneshot/{key}/test/accuracy"], 4
        )
    return result


def summarize(name, results, sparsities):
    """Means and standard deviations over seeds, and Compress's margin of the means."""
    summary = {"benchmark": "compress_users", "model": name, "summary": True}
    summary["seeds"] = [r["seed"] for r in results]
    keys = ["dense/test/accuracy"] + [
        f"{method}/{p:g}/test/accuracy" for p in sparsities for method in ("fip", "oneshot")
    ]
    for key in keys:
        values = [r[key] for r in results]
        summary[f"{key}/mean"] = round(float(np.mean(values)), 4)
        summary[f"{key}/std"] = round(float(np.std(values)), 4)
    for p in sparsities:
        summary[f"fip/{p:g}/margin_over_oneshot"] = round(
            summary[f"fip/{p:g}/test/accuracy/mean"] - summary[f"oneshot/{p:g}/test/accuracy/mean"],
            4,
        )
        summary[f"fip/{p:g}/task_weights"] = [r[f"fip/{p:g}/task_weight"] for r in results]
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="text_transformer", help=f"From {list(MODELS)}.")
    parser.add_argument(
        "--sparsities",
        default="50",
        help="Percentages of the prunable weights; `default`: 50,80 for the transformer, "
        "90 for the convnet.",
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help="Compress's `steps` (the baseline fine-tunes for as many epochs); 0: its own "
        "budget, `epochs` (10 for the transformer, 2 for the convnet) and its step floor.",
    )
    parser.add_argument(
        "--learning_rates",
        default=",".join(f"{r:g}" for r in BASELINE_LEARNING_RATES),
        help="The baseline's grid of initial Adam rates (extended x3 while an edge wins).",
    )
    parser.add_argument(
        "--task_weights",
        default="",
        help="Comma-separated Compress task_weight values, each one more run beside the "
        "defaults, reported as `fip_task<w>` (never chosen by the benchmark).",
    )
    parser.add_argument(
        "--base_epochs",
        type=int,
        default=None,
        help="Epochs of the users' models (default: as the Keras examples train them).",
    )
    parser.add_argument(
        "--train_size",
        type=int,
        default=None,
        help="MNIST training images of the convnet, a seeded subset (default: all 60,000).",
    )
    parser.add_argument(
        "--tune_every_seed",
        action="store_true",
        help="Choose the baseline's rate on every seed's validation split (by default on "
        "the first seed's, then used for all).",
    )
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {list(MODELS)}")
    if args.steps < 0 or args.steps == 1:
        parser.error(f"--steps must be 0 or at least 2. Received: {args.steps}")
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        task_weights = [float(w) for w in args.task_weights.split(",") if w]
    except ValueError:
        parser.error(f"--task_weights: numbers. Received: {args.task_weights}")
    learning_rates = common.learning_rate_grid(args.learning_rates.split(","), "learning_rates")
    for name in names:
        if args.sparsities == "default":
            sparsities = list(DEFAULT_SPARSITIES[name])
        else:
            sparsities = [float(p) for p in args.sparsities.split(",")]
        for p in sparsities:
            projection.check_sparsity(p / 100.0, "sparsities")
        results, tuned = [], {}
        for seed in seeds:
            if args.tune_every_seed:
                tuned = {}
            results.append(
                run(
                    name,
                    sparsities,
                    seed,
                    args.steps,
                    tuned,
                    learning_rates,
                    args.base_epochs,
                    task_weights,
                    args.train_size,
                )
            )
            print(json.dumps(results[-1]), flush=True)
        print(json.dumps(summarize(name, results, sparsities)), flush=True)


if __name__ == "__main__":
    main()
