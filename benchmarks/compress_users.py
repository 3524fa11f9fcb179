"""Compress with its defaults on models written as the Keras docs write them, against one-shot
magnitude pruning with fine-tuning.

The models are those of `benchmarks.user_models`, trained as their Keras examples train
them: the keras.io text transformer (custom `TokenAndPositionEmbedding` / `TransformerBlock`
layers, a softmax head) on SST-2 token ids, early-stopped on SST-2's validation sentences,
and the keras.io MNIST convnet (a softmax head, one-hot labels), trained on the first 54,000
training images with the last 6,000 as its validation split (`validation_split=0.1`). Each
model's validation data are those its training did not fit: SST-2's validation sentences,
the last 6,000 MNIST training images. Everyone's training data are the rest.

Every sparsity runs:

- `fip`: `keras_fip.Compress(p, data=(x, y), validation_data=(x_val, y_val),
  walk=keras_fip.Walk(epochs=E, seed=S))`, what the apps pass: every other argument its
  default (the labels' use chosen on the validation data, tfmot's prunable set);
- `fip_data_only`: the same without `validation_data`, what a user passing only the
  training data gets (`--nodata_only` leaves it out);
- `oneshot`: `keras_fip.baselines.one_shot_magnitude_pruning` (the same prunable set,
  pruned once by magnitude), fine-tuned on `(x, y)` for the epochs Compress's walk takes
  (`ceil(op.history["steps"] / steps per epoch)`), its Adam rate chosen as its authors tune
  it: on the validation data, from `--learning_rates` (1e-4, 1e-3) extended by the grid's
  spacing while an edge rate wins (`keras_fip.core.tuning.grid_search`), on the first
  seed (`--tune_every_seed`: each), then used for every seed.

The steps Compress spends on the candidates it did not return are reported as
`fip/<p>/selection_steps`, as the baseline's grid is reported as its tuning.
`--variants='{"name": {"labels": w, "rate_factor": f}}'` adds Compress runs at a given
weight of the labels and a factor of its `"auto"` learning rate (`fip_<name>`, never chosen
by the benchmark).

Prints one JSON line per model and seed (test and validation accuracy of the dense model
and of every method, what Compress chose, the zero fraction of the prunable weights and of
all parameters), then one summary line per model (means and standard deviations over
seeds, margins over the baseline). With `--output_dir`, writes `results.json`,
`provenance.json` and `summary.json` (the results page's table) there.

Example:

    python -m benchmarks.compress_users                       # both models, seed 0
    python -m benchmarks.compress_users --seeds=0,1,2 --output_dir=results/compress_users
    python -m benchmarks.compress_users --models=text_transformer --sparsities=50 \
        --variants='{"w1_slow": {"labels": 1, "rate_factor": 0.1}}'
    python -m benchmarks.compress_users --models=mnist_convnet --base_epochs=1 \
        --train_size=1000 --steps=4                          # a smoke run
"""

import argparse
import json
import math
import time

import keras
import numpy as np

import keras_fip
from apps import provenance
from benchmarks import user_models
from keras_fip import baselines
from keras_fip.core import projection
from keras_fip.core import tuning
from keras_fip.engine import rules

MODELS = ("text_transformer", "mnist_convnet")
SPARSITIES = {"text_transformer": (50.0, 80.0), "mnist_convnet": (90.0,)}
# Compress's budget per model: its default 10 epochs for the transformer (550 steps over
# 6,920 sentences, raised to the schedule's 1,000-step floor); 2 epochs of the 54,000 MNIST
# images for the convnet (844 steps, raised to the same floor).
EPOCHS = {"text_transformer": 10, "mnist_convnet": 2}
BASELINE_LEARNING_RATES = (1e-4, 1e-3)
BATCH_SIZE = 128
NAMES = {
    "text_transformer": "keras.io text transformer, SST-2",
    "mnist_convnet": "keras.io MNIST convnet",
}


def load(name, seed, base_epochs=None, train_size=None):
    """`(model, (x, y), (x_val, y_val), (x_test, y_test))`: the model as its Keras example
    trains it, the data it was fit on, the validation data it was not fit on, the test
    data."""
    model, data = user_models.trained(name, seed, epochs=base_epochs, train_size=train_size)
    test = (data["x_test"], data["y_test"])
    if name == "text_transformer":
        return model, (data["x"], data["y"]), (data["x_val"], data["y_val"]), test
    # `fit(validation_split=0.1)` holds out the last tenth of the arrays.
    split = len(data["x"]) - int(len(data["x"]) * user_models.RECIPES[name]["validation_split"])
    return (
        model,
        (data["x"][:split], data["y"][:split]),
        (data["x"][split:], data["y"][split:]),
        test,
    )


def _accuracy(model, split):
    return round(user_models.accuracy(model, *split), 4)


def _zero_fractions(model):
    summary = projection.sparsity_summary(model)
    return {
        "prunable_sparsity": round(summary.prunable_sparsity, 4),
        "parameter_sparsity": round(summary.sparsity, 4),
    }


def compress(model, sparsity, data, budget, seed, validation=None, labels="auto", rate=None):
    """Compress with the model, the data, the budget and the seed (and, for the variants,
    a weight of the labels and a learning rate)."""
    rule = None if rate is None else rules.Penalty(rate)
    walk = keras_fip.Walk(**budget, seed=seed, verbose=0, rule=rule)
    operation = keras_fip.Compress(
        sparsity, data=data, validation_data=validation, labels=labels, walk=walk
    )
    return operation(model), operation


def one_shot(model, sparsity, data, epochs, learning_rate, seed):
    keras.utils.set_random_seed(seed)
    return baselines.one_shot_magnitude_pruning(
        model, sparsity, *data, epochs=epochs, batch_size=BATCH_SIZE, learning_rate=learning_rate
    )


def _record(result, method, key, model, splits, seconds, **extra):
    test, validation = splits
    result.update(
        {
            f"{method}/{key}/test/accuracy": _accuracy(model, test),
            f"{method}/{key}/validation/accuracy": _accuracy(model, validation),
            f"{method}/{key}/seconds": round(seconds, 1),
            **{f"{method}/{key}/{k}": v for k, v in extra.items()},
            **{f"{method}/{key}/{k}": v for k, v in _zero_fractions(model).items()},
        }
    )


def _choice(history):
    selection = history.get("labels_selection") or {}
    return {
        "task_weight": history["task_weight"],
        "learning_rate": history["learning_rate"],
        "steps": history["steps"],
        "selection_steps": history["selection_steps"],
        "candidates": [round(c["validation_accuracy"], 4) for c in selection.get("candidates", [])],
    }


def run(
    name,
    sparsities,
    seed,
    tuned,
    learning_rates,
    variants=None,
    steps=0,
    base_epochs=None,
    train_size=None,
    data_only=True,
):
    """One model and seed: every method at each sparsity. `tuned` maps a sparsity to the
    baseline's learning rate chosen on an earlier seed (filled here when this seed tunes
    it)."""
    model, data, validation, test = load(name, seed, base_epochs, train_size)
    splits = (test, validation)
    result = {
        "benchmark": "compress_users",
        "model": name,
        "seed": seed,
        "parameters": int(model.count_params()),
        "dense/test/accuracy": _accuracy(model, test),
        "dense/validation/accuracy": _accuracy(model, validation),
    }
    steps_per_epoch = math.ceil(len(data[1]) / BATCH_SIZE)
    budget = {"steps": steps} if steps else {"epochs": EPOCHS[name]}
    for percent in sparsities:
        key, sparsity = f"{percent:g}", percent / 100.0
        start = time.perf_counter()
        sparse, operation = compress(model, sparsity, data, budget, seed, validation)
        _record(
            result,
            "fip",
            key,
            sparse,
            splits,
            time.perf_counter() - start,
            **_choice(operation.history),
        )
        steps = operation.history["steps"]
        if data_only:
            start = time.perf_counter()
            sparse, operation = compress(model, sparsity, data, budget, seed)
            _record(
                result,
                "fip_data_only",
                key,
                sparse,
                splits,
                time.perf_counter() - start,
                **_choice(operation.history),
            )
        for variant, options in (variants or {}).items():
            variables = keras_fip.Compress(sparsity).prunable_variables(model)
            rate = rules.auto_learning_rate(variables) * options.get("rate_factor", 1.0)
            start = time.perf_counter()
            sparse, operation = compress(
                model, sparsity, data, budget, seed, labels=options.get("labels", 0), rate=rate
            )
            _record(
                result,
                f"fip_{variant}",
                key,
                sparse,
                splits,
                time.perf_counter() - start,
                **_choice(operation.history),
            )

        # One-shot pruning fine-tuned for as many epochs, its rate tuned on validation
        baseline_epochs = math.ceil(steps / steps_per_epoch)
        start = time.perf_counter()
        runs = {}  # The tuning's pruned models, by rate: the chosen one is not run again.
        if key not in tuned:

            def score(rate):
                runs[rate] = one_shot(model, sparsity, data, baseline_epochs, rate, seed)  # noqa: B023
                return user_models.accuracy(runs[rate], *validation)  # noqa: B023

            tuned[key], scores = tuning.grid_search(score, learning_rates)
            result[f"oneshot/{key}/tuning/validation_accuracy"] = {
                f"{r:g}": round(a, 4) for r, a in sorted(scores.items())
            }
        pruned = runs.get(tuned[key])
        if pruned is None:
            pruned = one_shot(model, sparsity, data, baseline_epochs, tuned[key], seed)
        _record(
            result,
            "oneshot",
            key,
            pruned,
            splits,
            time.perf_counter() - start,
            learning_rate=tuned[key],
            epochs=baseline_epochs,
        )
        for method in ("fip", "fip_data_only")[: 1 + data_only]:
            result[f"{method}/{key}/margin_over_oneshot"] = round(
                result[f"{method}/{key}/test/accuracy"] - result[f"oneshot/{key}/test/accuracy"],
                4,
            )
    return result


def methods_of(result):
    """The methods a run measured, in the order they ran."""
    seen = []
    for key in result:
        method = key.split("/")[0]
        if key.endswith("/test/accuracy") and method not in seen:
            seen.append(method)
    return seen


def summarize(name, results, sparsities):
    """Means and standard deviations over seeds, and the margins of the means."""
    summary = {"benchmark": "compress_users", "model": name, "summary": True}
    summary["seeds"] = [r["seed"] for r in results]
    methods = methods_of(results[0])
    keys = ["dense/test/accuracy", "dense/validation/accuracy"] + [
        f"{method}/{p:g}/test/accuracy" for p in sparsities for method in methods[1:]
    ]
    for key in keys:
        values = [r[key] for r in results]
        summary[f"{key}/mean"] = round(float(np.mean(values)), 4)
        summary[f"{key}/std"] = round(float(np.std(values)), 4)
    for p in sparsities:
        for method in methods[1:]:
            if method == "oneshot":
                continue
            summary[f"{method}/{p:g}/margin_over_oneshot"] = round(
                summary[f"{method}/{p:g}/test/accuracy/mean"]
                - summary[f"oneshot/{p:g}/test/accuracy/mean"],
                4,
            )
            summary[f"{method}/{p:g}/task_weights"] = [
                r[f"{method}/{p:g}/task_weight"] for r in results
            ]
    return summary


def _cell(summary, key):
    mean, std = summary.get(f"{key}/mean"), summary.get(f"{key}/std")
    return None if mean is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def results_summary(summaries, sparsities):
    """The results page's `summary.json`: one row per model and sparsity."""
    columns = [
        "model, sparsity",
        "dense",
        "Compress (validation_data)",
        "Compress (data only)",
        "one-shot + fine-tuning (tuned)",
    ]
    rows = []
    for name, summary in summaries.items():
        for p in sparsities[name]:
            rows.append(
                [
                    f"{NAMES[name]}, {p:g}%",
                    _cell(summary, "dense/test/accuracy"),
                    _cell(summary, f"fip/{p:g}/test/accuracy"),
                    _cell(summary, f"fip_data_only/{p:g}/test/accuracy"),
                    _cell(summary, f"oneshot/{p:g}/test/accuracy"),
                ]
            )
    seeds = next(iter(summaries.values()))["seeds"] if summaries else []
    return {
        "title": "Compress defaults on the keras.io models",
        "description": (
            "`keras_fip.Compress(p, data=(x, y), validation_data=(x_val, y_val), "
            "walk=keras_fip.Walk(epochs=E, seed=S))` with every other argument its default, "
            "the same without `validation_data`, and one-shot magnitude pruning fine-tuned "
            "for as many epochs at the Adam rate that does best on the validation data. "
            "The validation data are those the model's training did not fit (SST-2's "
            "validation sentences; the last 6,000 MNIST training images). Sparsity of the "
            "prunable weights (tfmot's set). Test accuracy (%), mean ± std over seeds "
            f"{seeds}."
        ),
        "tables": [
            {
                "caption": "Test accuracy (%)",
                "columns": columns,
                "rows": rows,
                "headline": list(range(len(rows))),
            }
        ],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"From {list(MODELS)}.")
    parser.add_argument(
        "--sparsities",
        default="default",
        help="Percentages of the prunable weights; `default`: 50,80 for the transformer, "
        "90 for the convnet.",
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="Compress's walk in steps (0: its budget, `EPOCHS` passes raised to 1,000 steps).",
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
        "--learning_rates",
        default=",".join(f"{r:g}" for r in BASELINE_LEARNING_RATES),
        help="The baseline's grid of initial Adam rates (extended while an edge wins).",
    )
    parser.add_argument(
        "--variants",
        default="{}",
        help='JSON {"name": {"labels": w, "rate_factor": f}}: Compress runs at a given '
        "labels' weight and factor of its auto learning rate, beside the defaults.",
    )
    parser.add_argument(
        "--tune_every_seed",
        action="store_true",
        help="Choose the baseline's rate on every seed's validation data (by default on "
        "the first seed's, then used for all).",
    )
    parser.add_argument(
        "--nodata_only",
        dest="data_only",
        action="store_false",
        help="Leave out Compress without `validation_data` (`fip_data_only`).",
    )
    parser.add_argument("--output_dir", default=None, help="Where to write results.json.")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {list(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        variants = json.loads(args.variants)
    except json.JSONDecodeError:
        parser.error(f"--variants: a JSON object. Received: {args.variants}")
    learning_rates = [float(r) for r in args.learning_rates.split(",")]
    sparsities = {}
    for name in names:
        if args.sparsities == "default":
            sparsities[name] = list(SPARSITIES[name])
        else:
            sparsities[name] = [float(p) for p in args.sparsities.split(",")]
        for p in sparsities[name]:
            projection.check_sparsity(p / 100.0, "sparsities")
    results = {"runs": [], "summary": {}}
    for name in names:
        rows, tuned = [], {}
        for seed in seeds:
            if args.tune_every_seed:
                tuned = {}
            rows.append(
                run(
                    name,
                    sparsities[name],
                    seed,
                    tuned,
                    learning_rates,
                    variants,
                    args.steps,
                    args.base_epochs,
                    args.train_size,
                    args.data_only,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        results["runs"] += rows
        results["summary"][name] = summarize(name, rows, sparsities[name])
        print(json.dumps(results["summary"][name]), flush=True)
    if args.output_dir:
        provenance.write_results(args.output_dir, results)
        with open(f"{args.output_dir}/summary.json", "w") as handle:
            json.dump(results_summary(results["summary"], sparsities), handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
