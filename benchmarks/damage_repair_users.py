"""Damage and Repair with their default arguments, on LeNet-300-100 and on users' models.

Two parts, each run per seed:

- `eigen`: LeNet-300-100 on MNIST, the base network as the apps train it
  (`keras_fip.models.base_network("lenet_300_100", "mnist", seed=seed)`, 10 epochs).
  `keras_fip.Damage("eigen", norm=1.0, data=x_train[:1000])` with every other argument at
  its default (inputs only, no labels) against `--directions` random directions of the same
  norm (`Damage("gaussian", norm=1.0, seed=...)`): the test accuracy of each (all 10,000
  test images), the eigen drop and the largest random drop.
- `repair`: users' models from `benchmarks.user_models` (the keras.io MNIST convnet, which
  ends in a softmax and was trained on one-hot labels, and the BatchNorm residual conv net
  with logits on the 8×8 digits). `Damage("nodes", fraction=--fraction, seed=seed)` deletes
  hidden units and filters; then `keras_fip.Repair(data=(x, y), epochs=E, seed=seed)` with
  every other argument at its default (labels as the user has them: one-hot for the
  convnet) repairs it on N training examples (a seeded subset; E = 1 epoch of 6,000 MNIST
  images for the convnet, E = 5 of all 1,437 digits for the residual net; `--epochs` and
  `--train_examples` change both), against retraining the surviving network
  (`Repair(method="retrain")`) for the same number of epochs over the same examples, its
  Adam rate chosen among `--retrain_learning_rates` (extended by factors of 3 past an edge
  that wins, within 1e-5 to 0.1) by the accuracy on the same held-out 10% of those
  examples that Repair holds out (its `validation_split`), as the authors of the
  retraining strategy tune it. `--repair_inputs_only` adds `Repair(data=x)` (the
  pure function recovery, no labels) as `fip_inputs`. Test accuracies (10,000 MNIST test
  images; 360 digits, one is 0.28 pp) of the undamaged, damaged, repaired and retrained
  networks.

Prints one JSON line per run and a summary line per part (mean ± std over seeds).

Measured (`--seeds=0,1,2 --repair_inputs_only`, test accuracy, mean ± std):

| model | undamaged | damaged | Repair defaults | inputs only | tuned retraining |
| --- | --- | --- | --- | --- | --- |
| LeNet-300-100, eigen norm 1 | 98.21 | 15.26 ± 2.14 | | | random: ≥ 98.17 |
| MNIST convnet, 50% filters | 98.25 | 83.81 | 97.95 ± 0.09 | 97.88 ± 0.03 | 97.23 ± 0.34 |
| residual net, 50% units | 88.15 | 11.48 | 91.02 ± 2.14 | 71.76 ± 7.86 | 92.78 ± 0.82 |

(The eigen row: the largest drop of 20 random directions is 0.05 points. Repair chose the
labels' weight 10 on every run; the residual net's retraining, which is not held to the
undamaged function, ends above it.)

Example:

    python -m benchmarks.damage_repair_users                      # seed 0, a few minutes
    python -m benchmarks.damage_repair_users --seeds=0,1,2         # the acceptance figures
    python -m benchmarks.damage_repair_users --parts=repair --models=residual_convnet
"""

import argparse
import json
import time

import numpy as np

import keras_fip
from benchmarks import user_models
from keras_fip import data as data_lib
from keras_fip import models as models_lib

PARTS = ("eigen", "repair")
MODELS = ("mnist_convnet", "residual_convnet")
MIN_LEARNING_RATE, MAX_LEARNING_RATE = 1e-5, 0.1
# Per model: (epochs of every repair, training examples): one epoch of 6,000 MNIST images
# (47 steps) for the convnet; five of the 1,437 digits (60 steps) for the residual net.
BUDGETS = {"mnist_convnet": (1, 6000), "residual_convnet": (5, None)}


def _accuracy(model, x, y):
    return user_models.accuracy(model, x, y)


def eigen_part(seed, directions, examples, base_epochs=None):
    """The eigen adversary against random directions on LeNet-300-100 (one seed), trained
    for `base_epochs` (`None`: as the apps train it)."""
    epochs = {} if base_epochs is None else {"epochs": base_epochs}
    model, base = models_lib.base_network("lenet_300_100", "mnist", seed=seed, **epochs)
    x, _ = data_lib.load("mnist", "train")
    x_test, y_test = data_lib.load("mnist", "test")
    clean = _accuracy(model, x_test, y_test)
    began = time.perf_counter()
    op = keras_fip.Damage("eigen", norm=1.0, data=x[:examples])
    eigen = _accuracy(op(model), x_test, y_test)
    seconds = time.perf_counter() - began
    random = [
        _accuracy(
            keras_fip.Damage("gaussian", norm=1.0, seed=1000 * seed + index)(model), x_test, y_test
        )
        for index in range(directions)
    ]
    return {
        "benchmark": "damage_repair_users",
        "part": "eigen",
        "model": "lenet_300_100",
        "seed": seed,
        "clean": clean,
        "eigen": eigen,
        "eigen_drop": clean - eigen,
        "random_min": float(np.min(random)),
        "random_max_drop": clean - float(np.min(random)),
        "random_mean": float(np.mean(random)),
        "directions": directions,
        "num_matvecs": op.record["num_matvecs"],
        "ascent_steps": op.record["ascent_steps"],
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
    damaged = keras_fip.Damage("nodes", fraction=args.fraction, seed=seed)(model)
    result = {
        "benchmark": "damage_repair_users",
        "part": "repair",
        "model": name,
        "seed": seed,
        "fraction": args.fraction,
        "epochs": epochs,
        "train_examples": len(x),
        "undamaged": _accuracy(model, x_test, y_test),
        "damaged": _accuracy(damaged, x_test, y_test),
    }
    runs = {"fip": dict(data=(x, y))}
    if args.repair_inputs_only:
        runs["fip_inputs"] = dict(data=x)
    for label, kwargs in runs.items():
        began = time.perf_counter()
        op = keras_fip.Repair(epochs=epochs, seed=seed, verbose=0, **kwargs)
        repaired = op(damaged)
        result[label] = _accuracy(repaired, x_test, y_test)
        result[f"{label}_epochs"] = op.history["epochs"]
        result[f"{label}_solve_epochs"] = op.history.get("solve_epochs", 0.0)
        result[f"{label}_task_weight"] = op.history.get("task_weight")
        result[f"{label}_seconds"] = time.perf_counter() - began
    # Retraining: the same examples and epochs, the rate chosen on the held-out split
    # (the grid extended by factors of 3 past an edge that wins, within [1e-5, 0.1])
    scores = {}

    def retrain(rate):
        op = keras_fip.Repair(
            data=(x, y),
            method="retrain",
            epochs=epochs,
            learning_rate=rate,
            seed=seed,
            verbose=0,
        )
        try:
            retrained = op(damaged)
        except FloatingPointError:
            scores[rate] = (-1.0, None)
            return
        scores[rate] = (op.history["val_accuracy"][-1], retrained)
        result[f"retrain_validation/{rate:g}"] = scores[rate][0]

    for rate in args.retrain_learning_rates:
        retrain(rate)
    while True:
        rates = sorted(scores)
        chosen = max(rates, key=lambda r: scores[r][0])
        if chosen == rates[-1] and chosen * 3 <= MAX_LEARNING_RATE * (1 + 1e-9):
            retrain(chosen * 3)
        elif chosen == rates[0] and chosen / 3 >= MIN_LEARNING_RATE * (1 - 1e-9):
            retrain(chosen / 3)
        else:
            break
    best = (scores[chosen][0], chosen, scores[chosen][1])
    result["retrain_learning_rate"] = best[1]
    result["retrain"] = _accuracy(best[2], x_test, y_test)
    result["fip_minus_retrain"] = result["fip"] - result["retrain"]
    return result


def _summary(rows, keys):
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if values:
            summary[key] = f"{np.mean(values):.4f} ± {np.std(values):.4f}"
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--directions", type=int, default=20)
    parser.add_argument("--examples", type=int, default=1000, help="Inputs of the eigen damage.")
    parser.add_argument("--fraction", type=float, default=0.5, help="Hidden units deleted.")
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of every repair.")
    parser.add_argument("--train_examples", type=int, default=None)
    parser.add_argument(
        "--base_epochs",
        type=int,
        default=None,
        help="Epochs of the undamaged networks (default: as the apps and the Keras examples "
        "train them).",
    )
    parser.add_argument("--retrain_learning_rates", default="1e-3,3e-3,1e-2")
    parser.add_argument("--repair_inputs_only", action="store_true")
    args = parser.parse_args(argv)
    args.retrain_learning_rates = [float(r) for r in args.retrain_learning_rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"`--parts` must name parts among {PARTS}. Received: {part!r}")
    if "eigen" in parts:
        rows = []
        for seed in seeds:
            rows.append(eigen_part(seed, args.directions, args.examples, args.base_epochs))
            print(json.dumps(rows[-1]), flush=True)
        keys = ("clean", "eigen", "eigen_drop", "random_min", "random_max_drop")
        summary = {"benchmark": "damage_repair_users", "summary": "eigen"}
        print(json.dumps({**summary, **_summary(rows, keys)}), flush=True)
    if "repair" in parts:
        for name in args.models.split(","):
            rows = []
            for seed in seeds:
                rows.append(repair_part(name, seed, args))
                print(json.dumps(rows[-1]), flush=True)
            keys = (
                "undamaged",
                "damaged",
                "fip",
                "fip_inputs",
                "retrain",
                "fip_minus_retrain",
                "fip_epochs",
            )
            summary = {"benchmark": "damage_repair_users", "summary": f"repair/{name}"}
            print(json.dumps({**summary, **_summary(rows, keys)}), flush=True)


if __name__ == "__main__":
    main()
