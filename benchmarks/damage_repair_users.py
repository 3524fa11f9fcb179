"""Damage and Repair with their default arguments, on LeNet-300-100 and on users' models.

Two parts, each run per seed:

- `eigen`: LeNet-300-100 on MNIST, the base network as the apps train it
  (`keras_fip.models.base_network("lenet_300_100", "mnist", seed=seed)`, 10 epochs).
  `keras_fip.Damage("eigen", data=x_train[:1000])`, the `keras_fip.faults.Eigen` fault with
  every setting at its default (norm 1, inputs only, no labels) against `--directions`
  random directions of the same norm (`Damage("gaussian", seed=...)`): the test accuracy of
  each (all 10,000 test images), the eigen drop and the largest random drop.
- `repair`: users' models from `benchmarks.user_models` (the keras.io MNIST convnet, which
  ends in a softmax and was trained on one-hot labels, and the BatchNorm residual conv net
  with logits on the 8×8 digits). `Damage(keras_fip.faults.Nodes(--fraction), seed=seed)`
  deletes hidden units and filters; then `keras_fip.Repair((x, y),
  walk=keras_fip.Walk(epochs=E, seed=seed))` with every other setting at its default (labels
  as the user has them: one-hot for the convnet) repairs it on N training examples (a seeded
  subset; E = 1 epoch of 6,000 MNIST images for the convnet, E = 5 of all 1,437 digits for
  the residual net; `--epochs` and `--train_examples` change both), against retraining the
  surviving network (`Repair(method="retrain")`) for the same number of epochs over the same
  examples, its Adam rate (the walk's `keras_fip.rules.Penalty` rate) chosen among
  `--retrain_learning_rates` (extended by the grid's own spacing past an edge that wins,
  within 1e-5 to 0.1: `keras_fip.core.tuning.grid_search`) by the accuracy on the same
  held-out 10% of those examples that Repair holds out (its `validation_split`), as the
  authors of the retraining strategy tune it.
  `--repair_inputs_only` adds `Repair(x)` (the pure function recovery, no labels) as
  `fip_inputs`. Test accuracies (10,000 MNIST test images; 360 digits, one is 0.28 pp) of
  the undamaged, damaged, repaired and retrained networks.

Prints one JSON line per run and a summary line per part (mean ± std over seeds). With
`--output_dir`, writes `results.json` (every run and the summaries), `provenance.json` and
`summary.json` (the table of the results page, `docs/results.md`, which
`scripts/render_results.py` reads from `results/damage_repair_users/`) there.

Example:

    python -m benchmarks.damage_repair_users                      # seed 0, a few minutes
    python -m benchmarks.damage_repair_users --seeds=0,1,2 --repair_inputs_only \
        --output_dir=results/damage_repair_users                   # the measured table
    python -m benchmarks.damage_repair_users --parts=repair --models=residual_convnet
"""

import argparse
import json
import time

import numpy as np

import keras_fip
from apps import provenance
from benchmarks import user_models
from keras_fip import data as data_lib
from keras_fip import models as models_lib
from keras_fip.core import tuning

PARTS = ("eigen", "repair")
MODELS = ("mnist_convnet", "residual_convnet")
MIN_LEARNING_RATE, MAX_LEARNING_RATE = 1e-5, 0.1
# Per model: (epochs of every repair, training examples): one epoch of 6,000 MNIST images
# (47 steps) for the convnet; five of the 1,437 digits (60 steps) for the residual net.
BUDGETS = {"mnist_convnet": (1, 6000), "residual_convnet": (5, None)}


def _accuracy(model, x, y):
    return user_models.accuracy(model, x, y)


def eigen_part(seed, args):
    """The eigen adversary against random directions on LeNet-300-100 (one seed)."""
    epochs = {} if args.base_epochs is None else {"epochs": args.base_epochs}
    model, _ = models_lib.base_network("lenet_300_100", args.eigen_dataset, seed=seed, **epochs)
    x, _ = data_lib.load(args.eigen_dataset, "train")
    x_test, y_test = data_lib.load(args.eigen_dataset, "test")
    clean = _accuracy(model, x_test, y_test)
    began = time.perf_counter()
    op = keras_fip.Damage("eigen", data=x[: args.examples])
    eigen = _accuracy(op(model), x_test, y_test)
    seconds = time.perf_counter() - began
    random = [
        _accuracy(keras_fip.Damage("gaussian", seed=1000 * seed + index)(model), x_test, y_test)
        for index in range(args.directions)
    ]
    return {
        "part": "eigen",
        "model": "lenet_300_100",
        "seed": seed,
        "clean": clean,
        "eigen": eigen,
        "eigen_drop": clean - eigen,
        "random_min": float(np.min(random)),
        "random_max_drop": clean - float(np.min(random)),
        "random_mean": float(np.mean(random)),
        "directions": args.directions,
        "num_matvecs": op.history["num_matvecs"],
        "ascent_steps": op.history["ascent_steps"],
        "eigen_seconds": seconds,
    }


def _subset(data, count, seed):
    x, labels = data["x"], data["labels"]
    if count and count < len(x):
        rows = np.sort(np.random.default_rng(seed).permutation(len(x))[:count])
        return x[rows], labels[rows]
    return x, labels


def repair_part(name, seed, args):
    """Damage + Repair defaults against tuned retraining on one user model (one seed)."""
    model, data = user_models.trained(name, seed, epochs=args.base_epochs)
    recipe = user_models.RECIPES[name]
    data = dict(data, labels=data[recipe["labels"]])  # One-hot labels for the convnet.
    epochs, examples = BUDGETS[name]
    epochs = args.epochs or epochs
    x, y = _subset(data, args.train_examples or examples, seed)
    x_test, y_test = data["x_test"], data["y_test"]
    damaged = keras_fip.Damage(keras_fip.faults.Nodes(args.fraction), seed=seed)(model)
    result = {
        "part": "repair",
        "model": name,
        "seed": seed,
        "fraction": args.fraction,
        "epochs": epochs,
        "train_examples": len(x),
        "undamaged": _accuracy(model, x_test, y_test),
        "damaged": _accuracy(damaged, x_test, y_test),
    }
    runs = {"fip": (x, y)}
    if args.repair_inputs_only:
        runs["fip_inputs"] = x
    for label, data in runs.items():
        began = time.perf_counter()
        op = keras_fip.Repair(data, walk=keras_fip.Walk(epochs=epochs, seed=seed, verbose=0))
        repaired = op(damaged)
        result[label] = _accuracy(repaired, x_test, y_test)
        result[f"{label}_epochs"] = op.history["epochs"]
        result[f"{label}_solve_epochs"] = op.history.get("solve_epochs", 0.0)
        result[f"{label}_beta"] = op.history.get("beta")
        result[f"{label}_seconds"] = time.perf_counter() - began
    # Retraining: the same examples and epochs, the rate chosen on the held-out split
    # (the grid extended past an edge that wins, within [1e-5, 0.1])
    retrained = {}

    def retrain(rate):
        walk = keras_fip.Walk(
            epochs=epochs, rule=keras_fip.rules.Penalty(rate), seed=seed, verbose=0
        )
        op = keras_fip.Repair((x, y), method="retrain", walk=walk)
        try:
            retrained[rate] = op(damaged)
        except FloatingPointError:
            return None  # Diverged: the worst score.
        result[f"retrain_validation/{rate:g}"] = op.history["val_accuracy"][-1]
        return op.history["val_accuracy"][-1]

    chosen, _ = tuning.grid_search(
        retrain, args.retrain_learning_rates, low=MIN_LEARNING_RATE, high=MAX_LEARNING_RATE
    )
    if chosen not in retrained:  # A grid of one rate: nothing was scored.
        retrain(chosen)
    result["retrain_learning_rate"] = chosen
    result["retrain"] = _accuracy(retrained[chosen], x_test, y_test)
    result["fip_minus_retrain"] = result["fip"] - result["retrain"]
    return result


def _summary(rows, keys):
    """`{key: {"mean", "std", "per_seed"}}` of the numeric `keys` of `rows`."""
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if values:
            summary[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),
                "per_seed": values,
            }
    return summary


def _printable(summary):
    return {key: f"{value['mean']:.4f} ± {value['std']:.4f}" for key, value in summary.items()}


def _cell(summary, key, spread=True):
    """A table cell: mean ± std in percent (or `None` when the run did not measure it)."""
    if key not in summary:
        return None
    value = summary[key]
    if not spread or len(value["per_seed"]) < 2:
        return round(100 * value["mean"], 2)
    return f"{100 * value['mean']:.2f} ± {100 * value['std']:.2f}"


def results_summary(results):
    """The results page's `summary.json` of this benchmark's `results`."""
    rows = []
    eigen = results["summary"].get("eigen")
    if eigen:
        rows.append(
            [
                "LeNet-300-100, eigen norm 1, no labels",
                _cell(eigen, "clean", spread=False),
                _cell(eigen, "eigen"),
                None,
                None,
                f"random min {_cell(eigen, 'random_min')}",
            ]
        )
    names = {"mnist_convnet": "keras.io MNIST convnet", "residual_convnet": "residual net"}
    for name, label in names.items():
        summary = results["summary"].get(f"repair/{name}")
        if summary:
            fraction = round(100 * results["arguments"]["fraction"])
            rows.append(
                [
                    f"{label}, {fraction}% units deleted",
                    _cell(summary, "undamaged", spread=False),
                    _cell(summary, "damaged", spread=False),
                    _cell(summary, "fip"),
                    _cell(summary, "fip_inputs"),
                    _cell(summary, "retrain"),
                ]
            )
    seeds = results["arguments"]["seeds"]
    return {
        "title": "Damage and Repair defaults on LeNet-300-100 and users' models",
        "description": (
            '`keras_fip.Damage("eigen")` (inputs only, norm 1) on LeNet-300-100 against '
            f"{results['arguments']['directions']} random directions of the same norm; "
            "hidden units deleted with `keras_fip.faults.Nodes` and repaired by "
            "`keras_fip.Repair` with its defaults (the labels used; `inputs only`: "
            "`Repair(x)`) against retraining with its rate tuned on the same held-out "
            f"split, for the same epochs. Test accuracy (%), mean ± std over seeds {seeds}."
        ),
        "tables": [
            {
                "caption": "Test accuracy (%)",
                "columns": [
                    "model, damage",
                    "undamaged",
                    "damaged",
                    "Repair defaults",
                    "inputs only",
                    "tuned retraining",
                ],
                "rows": rows,
                "headline": list(range(len(rows))),
            }
        ],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--directions", type=int, default=20)
    parser.add_argument("--examples", type=int, default=1000, help="Inputs of the eigen damage.")
    parser.add_argument("--eigen_dataset", default="mnist", help="Dataset of LeNet-300-100.")
    parser.add_argument(
        "--base_epochs",
        type=int,
        default=None,
        help="Training epochs of the undamaged networks (default: their recipes').",
    )
    parser.add_argument("--fraction", type=float, default=0.5, help="Hidden units deleted.")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of every repair.")
    parser.add_argument("--train_examples", type=int, default=None)
    parser.add_argument("--retrain_learning_rates", default="1e-3,3e-3,1e-2")
    parser.add_argument("--repair_inputs_only", action="store_true")
    parser.add_argument("--output_dir", default=None, help="Where to write results.json.")
    args = parser.parse_args(argv)
    args.retrain_learning_rates = [float(r) for r in args.retrain_learning_rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"`--parts` must name parts among {PARTS}. Received: {part!r}")
    results = {
        "arguments": {**vars(args), "seeds": seeds, "parts": parts},
        "runs": [],
        "summary": {},
    }
    if "eigen" in parts:
        rows = []
        for seed in seeds:
            rows.append(eigen_part(seed, args))
            print(json.dumps({"benchmark": "damage_repair_users", **rows[-1]}), flush=True)
        keys = ("clean", "eigen", "eigen_drop", "random_min", "random_max_drop")
        results["runs"] += rows
        results["summary"]["eigen"] = _summary(rows, keys)
        line = {
            "benchmark": "damage_repair_users",
            "summary": "eigen",
            **_printable(results["summary"]["eigen"]),
        }
        print(json.dumps(line), flush=True)
    if "repair" in parts:
        for name in args.models.split(","):
            rows = []
            for seed in seeds:
                rows.append(repair_part(name, seed, args))
                print(json.dumps({"benchmark": "damage_repair_users", **rows[-1]}), flush=True)
            keys = (
                "undamaged",
                "damaged",
                "fip",
                "fip_inputs",
                "retrain",
                "fip_minus_retrain",
                "fip_epochs",
                "fip_beta",
            )
            results["runs"] += rows
            results["summary"][f"repair/{name}"] = _summary(rows, keys)
            line = {
                "benchmark": "damage_repair_users",
                "summary": f"repair/{name}",
                **_printable(results["summary"][f"repair/{name}"]),
            }
            print(json.dumps(line), flush=True)
    if args.output_dir:
        provenance.write_results(args.output_dir, results, page=results_summary(results))
    return results


if __name__ == "__main__":
    main()
