r"""Quick start: keras_fip on scikit-learn's bundled digits, in a few minutes on a CPU.

Trains a small MLP, then shows the central idea side by side with what you would otherwise
do:

- a functionally invariant walk (`keras_fip.Isofunctional`, metric rule, steps of length
  ε = 0.05 on batches of 256 digits) moves the weights far while the test accuracy stays
  put, where a random step of the same length costs accuracy;
- the metric tensor g of the trained network: its trace and the fraction ρ of vulnerable
  directions (most directions are resilient, which is why FIPs exist);
- damage: random Gaussian weight noise against `keras_fip.Damage("eigen")`, the
  weight-space adversary of the same norm, and deleting half the hidden units;
- repair of that deletion: `keras_fip.Repair` (a FIP back to the undamaged outputs, inputs
  only) beside retraining the surviving weights with labels, 5 epochs each at the base
  network's Adam rate, 3e-3;
- an ensemble of 5 networks along one FIP (`keras_fip.Ensemble` with its defaults: the
  data, the budget and the seed) beside a 5-member deep ensemble trained with the base
  network's recipe, clean and under L∞ PGD transferred from a separately trained surrogate
  at ε 0.1, 0.2 and 0.3 (`ENSEMBLE_EPSILONS`; the table shows 0.2, the printout all three:
  at 0.3 the attack erases these 8×8 digits for every model). The walk takes
  `ENSEMBLE_STEPS_BETWEEN` steps a member, which spends no more example passes than the
  deep ensemble's training (every pass of the walk counted: the choice of the labels'
  weight, anchors, labelled batches, the attacks its diversity term trains on; both counts
  are in `results.json`);
- sparsifying to 90%: `keras_fip.Compress` against gradual magnitude pruning (tfmot's
  schedule, global ranking, native Keras 3) and one-shot pruning with fine-tuning, the same
  epoch budget for every method, Compress with its default arguments. The baselines are
  tuned as their authors tune them: each one's Adam learning rate is chosen from
  `--quickstart_prune_learning_rates` (1e-3, 2e-3, 5e-3, 1e-2, as `apps.compress`; extended
  by factors of 3 while an edge rate is the best) on a validation split,
  `--quickstart_validation_fraction` (20%, 287 images) of the training digits held out: a
  copy of the base network's training without those images is pruned at each rate, and the
  best validation accuracy chooses the rate that then prunes the base network on all the
  training digits (`tune_baselines`; the test set is never read for it). One rate is used
  as given.

Prints the table and writes `results.json`, `config.json` and `summary.png` to
`--output_dir` (default `runs/quickstart`).

Example:

    python -m apps.quickstart --output_dir=runs/quickstart
    tensorboard --logdir runs      # the walks' distance, output change and losses per step

`--strategy=mirrored|multi_worker|tpu` runs everything in that strategy's scope (the
training, every operation and baseline, the metric, ρ from the Gram matrix gathered from the
replicas' Jacobians). It is meant for accelerators; its figures match one device's to a
test image or two (the base network's `fit` sums its gradients over the replicas in
another order).
"""

import math
import os
import time

import keras
import numpy as np
from absl import flags

import keras_fip
from apps import common
from keras_fip import baselines
from keras_fip import data
from keras_fip import geometry
from keras_fip import models
from keras_fip import operations
from keras_fip.core import projection
from keras_fip.core import tuning

# Quick-start settings
flags.DEFINE_integer(
    "quickstart_walk_steps", 200, "Steps of the functionally invariant walk.", lower_bound=1
)
flags.DEFINE_float(
    "quickstart_sparsity",
    0.9,
    "Target sparsity of the pruning comparison.",
    lower_bound=0.0,
    upper_bound=0.99,
)
flags.DEFINE_list(
    "quickstart_prune_learning_rates",
    ["1e-3", "2e-3", "5e-3", "1e-2"],
    "Adam "
    "learning rates the magnitude-pruning baselines choose from on a validation "
    "split of the training digits (extended by factors of 3 while an edge rate "
    "is the best); one rate: no tuning, used as given.",
)
flags.DEFINE_float(
    "quickstart_validation_fraction",
    0.2,
    "Share of the training digits "
    "held out (stratified, seeded) as the baselines' validation split.",
    lower_bound=0.05,
    upper_bound=0.5,
)

FLAGS = flags.FLAGS

# What the quick start runs that cannot run under a distributed `--strategy`: nothing.
SINGLE_DEVICE = {}

# Radii of the transfer PGD attack on the ensembles, and the one the table shows.
ENSEMBLE_EPSILONS = (0.1, 0.2, 0.3)
TABLE_EPSILON = 0.2
# FIP steps between ensemble members: with the choice of the labels' weight, 5 members ×
# 60 steps spend no more example passes than the deep ensemble's 5 × 30 epochs.
ENSEMBLE_STEPS_BETWEEN = 60


def _accuracy(model, x, y):
    return models.evaluate_classifier(model, x, y)["accuracy"]


def _distance(model_a, model_b):
    return float(
        np.sqrt(
            sum(np.sum((a - b) ** 2) for a, b in zip(model_a.get_weights(), model_b.get_weights()))
        )
    )


def _random_perturbation(model, norm, seed):
    perturbed = keras_fip.engine.copy_model(model)
    direction = operations.isofunctional.random_direction(perturbed, seed=seed)
    for variable, piece in zip(perturbed.trainable_variables, direction):
        variable.assign(variable + norm * piece)
    return perturbed


def _mlp():
    return models.mlp(64, input_shape=(8, 8, 1))


def _train(model, x, y, epochs):
    return models.train_classifier(model, x, y, epochs=epochs, batch_size=64, learning_rate=3e-3)


def tune_baselines(
    methods,
    sparsity,
    x,
    y,
    seed,
    grid,
    validation_fraction,
    base_epochs,
    prune_epochs,
    prune_batch_size,
):
    """Chooses each baseline's learning rate on a validation split of `(x, y)`.

    A network is trained as the base network is (same initialisation, recipe and epochs)
    on `(x, y)` less a stratified, seeded `validation_fraction`, so the validation images
    are new to it; each method prunes it to `sparsity` at every rate of `grid`
    (`keras_fip.core.tuning.grid_search`: extended past an edge rate that wins),
    fine-tuning on the same reduced data, and the best validation accuracy chooses the
    rate. No test data is read. A grid of one rate is returned as it is, without training.

    Args:
        methods: A dict `{key: function(model, sparsity, x, y, epochs, batch_size,
            learning_rate)}`.
        sparsity: The target sparsity.
        x: The training inputs.
        y: The training labels.
        seed: Seed of the split, the network and every run.
        grid: The learning rates (`common.learning_rate_grid`).
        validation_fraction: The validation share of `(x, y)`.
        base_epochs: Epochs of the network the baselines prune.
        prune_epochs: Epochs of every pruning run.
        prune_batch_size: Batch size of every pruning run.

    Returns:
        A dict `{key: (learning_rate, {rate: validation accuracy})}` (an empty dict of
        accuracies for a grid of one rate).
    """
    if len(grid) == 1:
        return {key: (grid[0], {}) for key in methods}
    (x_fit, y_fit), (x_val, y_val) = common.validation_split(x, y, validation_fraction, seed)
    keras.utils.set_random_seed(seed)
    network = _mlp()
    _train(network, x_fit, y_fit, base_epochs)
    chosen = {}
    for key, method in methods.items():

        def validation_accuracy(rate, method=method):
            keras.utils.set_random_seed(seed)
            pruned = method(
                network,
                sparsity,
                x_fit,
                y_fit,
                epochs=prune_epochs,
                batch_size=prune_batch_size,
                learning_rate=rate,
            )
            return _accuracy(pruned, x_val, y_val)

        chosen[key] = tuning.grid_search(
            validation_accuracy,
            grid,
            low=common.MIN_TUNED_LEARNING_RATE,
            high=common.MAX_TUNED_LEARNING_RATE,
        )
    return chosen


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(
    output_dir,
    seed,
    walk_steps,
    sparsity,
    epochs=30,
    log_dir=None,
    prune_learning_rates=(3e-3,),
    validation_fraction=0.2,
):
    """Runs the comparison and returns `(sections, results)`: the report's rows by section
    (`"walk"`, `"compress"`, `"damage"`, `"repair"`, `"ensemble"`) and the figures.

    `log_dir(name)` gives the TensorBoard directory of each FIP walk (or `None`); the
    pruning baselines choose their rate from `prune_learning_rates` on a
    `validation_fraction` of the training digits (`tune_baselines`)."""
    log_dir = log_dir or (lambda name: None)
    keras.utils.set_random_seed(seed)
    x, y = data.load("digits", "train")
    x_test, y_test = data.load("digits", "test")
    base = _mlp()
    _, base_time = _timed(lambda: _train(base, x, y, epochs))
    base_accuracy = _accuracy(base, x_test, y_test)
    rows = [("trained MLP (base)", base_accuracy, 0.0, 0.0, base_time)]

    # A functionally invariant walk against a random step of the same length
    walk = operations.Isofunctional(
        data=x,
        walk=keras_fip.Walk(
            steps=walk_steps,
            rule=keras_fip.rules.Metric(epsilon=0.05),
            batch_size=256,
            seed=seed,
            verbose=0,
            log_dir=log_dir("walk"),
        ),
    )
    walked, walk_time = _timed(lambda: walk(base))
    moved = _distance(walked, base)
    rows.append(
        (
            "FIP walk (Isofunctional, metric rule)",
            _accuracy(walked, x_test, y_test),
            0.0,
            moved,
            walk_time,
        )
    )
    rows.append(
        (
            "random perturbation, same distance",
            _accuracy(_random_perturbation(base, moved, seed), x_test, y_test),
            0.0,
            moved,
            0.0,
        )
    )

    # Geometry of the trained network
    metric = geometry.MetricOperator(base, x[:256])
    trace_g = geometry.trace(metric, num_samples=50, seed=seed)
    rho = geometry.vulnerable_fraction(metric)

    # Sparsify: baselines on the same data and epoch budget
    # Compress runs with its defaults (no tuning for this demo); its schedule gives a
    # path of at least `min_steps` steps, so every method gets that many epochs here.
    prune_batch_size = 128
    prune_epochs = math.ceil(
        keras_fip.compress.Schedule().min_steps / math.ceil(len(x) / prune_batch_size)
    )
    compress_walk = keras_fip.Walk(
        epochs=prune_epochs, seed=seed, verbose=0, log_dir=log_dir("compress")
    )
    compressed, seconds = _timed(
        lambda: keras_fip.Compress(sparsity, data=(x, y), walk=compress_walk)(base)
    )
    rows.append(
        (
            f"FIP Compress, {sparsity:.0%}",
            _accuracy(compressed, x_test, y_test),
            projection.prunable_sparsity(compressed),
            _distance(compressed, base),
            seconds,
        )
    )

    def gradual(model, sparsity, x, y, **kwargs):
        return baselines.gradual_magnitude_pruning(model, sparsity, x, y, scope="global", **kwargs)

    pruning_baselines = {"gradual": gradual, "one_shot": baselines.one_shot_magnitude_pruning}
    # Each baseline's learning rate, chosen on a validation split of the training digits
    # (as their authors tune them); the chosen rate then prunes the base network on all
    # of them, as Compress does.
    chosen, tuning_seconds = _timed(
        lambda: tune_baselines(
            pruning_baselines,
            sparsity,
            x,
            y,
            seed,
            list(prune_learning_rates),
            validation_fraction,
            epochs,
            prune_epochs,
            prune_batch_size,
        )
    )
    for label, key in (
        ("gradual magnitude pruning (tfmot schedule)", "gradual"),
        ("one-shot magnitude pruning + fine-tune", "one_shot"),
    ):
        keras.utils.set_random_seed(seed)
        pruned, seconds = _timed(
            lambda: pruning_baselines[key](  # noqa: B023
                base,
                sparsity,
                x,
                y,
                epochs=prune_epochs,
                batch_size=prune_batch_size,
                learning_rate=chosen[key][0],  # noqa: B023
            )
        )
        rows.append(
            (
                f"{label}, {sparsity:.0%}",
                _accuracy(pruned, x_test, y_test),
                projection.prunable_sparsity(pruned),
                _distance(pruned, base),
                seconds,
            )
        )
    # The sections below do not depend on how many tuning runs there were.
    keras.utils.set_random_seed(seed)

    # Damage: random weight noise against the eigen adversary of the same norm
    damage_rows = []
    for label, damage in (
        (
            "random Gaussian damage, norm 1",
            keras_fip.Damage(keras_fip.faults.Gaussian(1.0), seed=seed),
        ),
        (
            "eigen adversary (top-20 of g), norm 1",
            keras_fip.Damage(keras_fip.faults.Eigen(1.0), data=(x[:1000], y[:1000]), seed=seed),
        ),
        (
            "50% hidden units deleted",
            keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=seed),
        ),
    ):
        damaged, seconds = _timed(lambda: damage(base))  # noqa: B023
        damage_rows.append(
            (
                label,
                _accuracy(damaged, x_test, y_test),
                keras_fip.engine.sparsity(damaged),
                _distance(damaged, base),
                seconds,
            )
        )

    # Repair the 50%-deleted network: a FIP back to the undamaged outputs (inputs only)
    # against supervised retraining of the surviving weights, the same epochs
    nodes_damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=seed)(base)
    repair_rows = []
    for label, repair_data, method, repair_log_dir in (
        ("FIP repair (inputs only), 5 epochs", x, "fip", log_dir("repair")),
        ("retraining (labels), 5 epochs", (x, y), "retrain", None),
    ):
        repair = keras_fip.Repair(
            repair_data,
            method=method,
            validation_data=(x_test, y_test),
            walk=keras_fip.Walk(
                epochs=5,
                rule=keras_fip.rules.Penalty(3e-3),
                seed=seed,
                verbose=0,
                log_dir=repair_log_dir,
            ),
        )
        repaired, seconds = _timed(lambda: repair(nodes_damaged))  # noqa: B023
        repair_rows.append(
            (
                label,
                _accuracy(repaired, x_test, y_test),
                keras_fip.engine.sparsity(repaired),
                _distance(repaired, base),
                seconds,
                repair.history["epochs_to_recover"],
            )
        )

    # Ensemble: 5 networks along one FIP beside a 5-member deep ensemble, under PGD
    # transferred from a separately trained surrogate (L-inf, 40 steps of 0.01)
    surrogate = _mlp()
    _train(surrogate, x, y, epochs)
    # The library's defaults: only the data, the budget and the seed are given.
    ensemble = keras_fip.Ensemble(
        5,
        data=(x, y),
        walk=keras_fip.Walk(
            steps=5 * ENSEMBLE_STEPS_BETWEEN, seed=seed, verbose=0, log_dir=log_dir("ensemble")
        ),
    )
    fip_ensemble, fip_seconds = _timed(lambda: ensemble(base))
    # Each member trained as the base network is (not the baseline's own defaults).
    (deep, deep_info), deep_seconds = _timed(
        lambda: baselines.deep_ensemble(
            base,
            x,
            y,
            num_members=5,
            epochs=epochs,
            batch_size=64,
            learning_rate=3e-3,
            seed=seed + 1,
        )
    )
    attacked = {}
    for epsilon in ENSEMBLE_EPSILONS:
        attacked[epsilon], _ = keras_fip.robustness.transfer_pgd_accuracy(
            surrogate,
            {"fip": fip_ensemble, "deep": deep, "single": base},
            x_test,
            y_test,
            epsilon=epsilon,
        )
    shown = attacked[TABLE_EPSILON]
    ensemble_rows = [
        (
            "FIP ensemble (5 members), clean",
            _accuracy(fip_ensemble, x_test, y_test),
            0.0,
            0.0,
            fip_seconds,
        ),
        (f"FIP ensemble, transfer PGD eps {TABLE_EPSILON:g}", shown["fip"], 0.0, 0.0, 0.0),
        ("deep ensemble (5 seeds), clean", _accuracy(deep, x_test, y_test), 0.0, 0.0, deep_seconds),
        (f"deep ensemble, transfer PGD eps {TABLE_EPSILON:g}", shown["deep"], 0.0, 0.0, 0.0),
        (f"single network, transfer PGD eps {TABLE_EPSILON:g}", shown["single"], 0.0, 0.0, 0.0),
    ]

    results = {
        "base/test/accuracy": base_accuracy,
        "walk/test/accuracy": rows[1][1],
        "walk/euclidean_distance": moved,
        "random_perturbation/test/accuracy": rows[2][1],
        "geometry/trace": float(trace_g),
        "geometry/rho": float(rho),
        "geometry/num_params": int(metric.num_params),
    }
    for label, accuracy, zeros, _moved, seconds in rows[3:6]:
        key = "fip" if label.startswith("FIP") else label.split(" ")[0].replace("-", "_")
        results[f"{key}/{sparsity * 100:g}/test/accuracy"] = accuracy
        results[f"{key}/{sparsity * 100:g}/sparsity"] = zeros
        results[f"{key}/{sparsity * 100:g}/wall_time_seconds"] = seconds
    results["pruning/epochs"] = prune_epochs
    for key, (rate, validation) in chosen.items():
        results[f"{key}/{sparsity * 100:g}/learning_rate"] = rate
        if validation:
            results[f"{key}/{sparsity * 100:g}/tuning/validation_accuracy"] = {
                f"{r:g}": accuracy for r, accuracy in sorted(validation.items())
            }
    if any(validation for _, validation in chosen.values()):
        results["pruning/tuning/validation_fraction"] = validation_fraction
        results["pruning/tuning/wall_time_seconds"] = tuning_seconds
    for key, row in zip(("gaussian", "eigen", "nodes"), damage_rows):
        results[f"damage/{key}/test/accuracy"] = row[1]
    for key, row in zip(("fip", "retrain"), repair_rows):
        results[f"repair/{key}/test/accuracy"] = row[1]
        results[f"repair/{key}/epochs_to_recover"] = row[5]
    results["ensemble/fip/test/accuracy"] = ensemble_rows[0][1]
    results["ensemble/deep/test/accuracy"] = ensemble_rows[2][1]
    results["ensemble/fip/train_examples"] = int(ensemble.history["train_examples"])
    results["ensemble/deep/train_examples"] = int(deep_info["train_examples"])
    for epsilon, accuracies in attacked.items():
        for key in ("fip", "deep", "single", "surrogate"):
            results[f"ensemble/{key}/transfer_pgd/{epsilon:g}/accuracy"] = float(accuracies[key])
    sections = {
        "walk": rows[:3],
        "compress": rows[3:6],
        "damage": damage_rows,
        "repair": repair_rows,
        "ensemble": ensemble_rows,
    }
    return sections, results


def _plot(sections, results, sparsity, path):
    """Four panels, one comparison each: what each shows is in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    base = results["base/test/accuracy"]
    fip, other, plain = "tab:orange", "tab:blue", "tab:gray"

    def bars(axis, entries, title):
        labels = [label for label, _, _ in entries]
        values = [value for _, value, _ in entries]
        axis.barh(range(len(entries)), values, color=[color for _, _, color in entries])
        axis.set_yticks(range(len(entries)), labels, fontsize=9)
        axis.invert_yaxis()
        axis.set_xlim(0, 1)
        axis.axvline(base, color="black", linewidth=0.8, linestyle=":")
        for i, value in enumerate(values):
            axis.text(value - 0.02, i, f"{value:.3f}", va="center", ha="right", color="white")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("test accuracy (dotted line: the trained network)", fontsize=8)

    walk = sections["walk"]
    bars(
        axes[0, 0],
        [
            ("trained network", walk[0][1], plain),
            (f"FIP walk, moved {walk[1][3]:.1f}", walk[1][1], fip),
            (f"random step, moved {walk[2][3]:.1f}", walk[2][1], other),
        ],
        "A FIP moves the weights and keeps the function",
    )
    compress = sections["compress"]
    bars(
        axes[0, 1],
        [
            ("Compress", compress[0][1], fip),
            ("gradual pruning", compress[1][1], other),
            ("one-shot + fine-tune", compress[2][1], other),
        ],
        f"Sparsify to {sparsity:.0%} at the same epochs",
    )
    damage, repair = sections["damage"], sections["repair"]
    bars(
        axes[1, 0],
        [
            ("random noise", damage[0][1], other),
            ("eigen adversary", damage[1][1], fip),
            ("50% units deleted", damage[2][1], other),
            ("  Repair (inputs only)", repair[0][1], fip),
            ("  retraining (labels)", repair[1][1], other),
        ],
        "Damage of the same norm, and repair of the deletion",
    )
    axis = axes[1, 1]
    epsilons = [0.0, *ENSEMBLE_EPSILONS]
    for key, name, color in (
        ("fip", "FIP ensemble", fip),
        ("deep", "deep ensemble", other),
        ("single", "single network", plain),
    ):
        clean = base if key == "single" else results[f"ensemble/{key}/test/accuracy"]
        attacked = [
            results[f"ensemble/{key}/transfer_pgd/{e:g}/accuracy"] for e in ENSEMBLE_EPSILONS
        ]
        axis.plot(epsilons, [clean, *attacked], marker="o", color=color, label=name)
    axis.set_xlabel("L∞ radius ε of PGD computed on another network", fontsize=8)
    axis.set_ylabel("test accuracy", fontsize=8)
    axis.set_ylim(0, 1.02)
    axis.set_xticks(epsilons)
    axis.legend(fontsize=9)
    axis.set_title("Ensembles under a transferred attack", fontsize=10)
    figure.suptitle("keras_fip quick start: a small MLP on the 8×8 digits", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _table(title, meaning, columns, rows):
    """Prints one section: its title, what it shows, then its rows under `columns`."""
    print(f"\n{title}\n{meaning}")
    widths = [max(44, *(len(str(row[0])) for row in rows))] + [
        max(len(column), 9) for column in columns[1:]
    ]
    print(
        "  ".join(
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(columns, widths))
        )
    )
    for row in rows:
        print(
            "  ".join(
                f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(row, widths))
            )
        )


def summary_page(results, sparsity):
    """The results page's `summary.json`: the quick start's comparisons as tables."""
    percent = f"{sparsity * 100:g}"
    epsilons = [f"{e:g}" for e in ENSEMBLE_EPSILONS]

    def accuracy(key):
        return round(100 * results[key], 2)

    return {
        "title": "Quick start: a small MLP on the 8×8 digits",
        "description": (
            "`python -m apps.quickstart`: one seed, 360 test images (one image is 0.28 "
            "points). Test accuracy in %."
        ),
        "tables": [
            {
                "caption": f"Sparsify to {sparsity:.0%}, the same epochs for every method",
                "columns": ["method", "test accuracy", "sparsity"],
                "rows": [
                    [
                        name,
                        accuracy(f"{key}/{percent}/test/accuracy"),
                        round(results[f"{key}/{percent}/sparsity"], 4),
                    ]
                    for key, name in (
                        ("fip", "Compress (defaults)"),
                        ("gradual", "gradual magnitude pruning (tuned)"),
                        ("one_shot", "one-shot pruning + fine-tuning (tuned)"),
                    )
                ],
                "headline": [0],
            },
            {
                "caption": "Ensembles under L∞ PGD transferred from another network",
                "columns": ["model", "clean", *(f"ε {e}" for e in epsilons), "example passes"],
                "rows": [
                    [
                        name,
                        accuracy(
                            "base/test/accuracy"
                            if key == "single"
                            else f"ensemble/{key}/test/accuracy"
                        ),
                        *(accuracy(f"ensemble/{key}/transfer_pgd/{e}/accuracy") for e in epsilons),
                        results.get(f"ensemble/{key}/train_examples", ""),
                    ]
                    for key, name in (
                        ("fip", "FIP ensemble, 5 members"),
                        ("deep", "deep ensemble, 5 networks"),
                        ("single", "single network"),
                    )
                ],
            },
            {
                "caption": "Damage and repair of half the hidden units",
                "columns": ["network", "test accuracy", "epochs to recover"],
                "rows": [
                    ["trained", accuracy("base/test/accuracy"), ""],
                    ["50% of hidden units deleted", accuracy("damage/nodes/test/accuracy"), ""],
                    [
                        "Repair (FIP, inputs only)",
                        accuracy("repair/fip/test/accuracy"),
                        results["repair/fip/epochs_to_recover"],
                    ],
                    [
                        "retraining with labels",
                        accuracy("repair/retrain/test/accuracy"),
                        results["repair/retrain/epochs_to_recover"],
                    ],
                ],
            },
        ],
    }


def _report(sections, results, sparsity):
    """The grouped report: each comparison with what its columns mean."""
    percent = f"{sparsity * 100:g}"
    num_test = 360
    print(
        f"\nkeras_fip quick start: a small MLP on scikit-learn's 8×8 digits ({num_test} test "
        f"images: one image is {100 / num_test:.2f} points of accuracy)"
    )
    walk = sections["walk"]
    _table(
        "1. A functionally invariant walk",
        "'moved': the Euclidean distance from the trained network's weights.",
        ("network", "test acc", "moved", "seconds"),
        [
            (walk[0][0], f"{walk[0][1]:.4f}", "", f"{walk[0][4]:.1f}"),
            (walk[1][0], f"{walk[1][1]:.4f}", f"{walk[1][3]:.2f}", f"{walk[1][4]:.1f}"),
            (walk[2][0], f"{walk[2][1]:.4f}", f"{walk[2][3]:.2f}", ""),
        ],
    )
    print(
        f"The metric g of the trained network ({results['geometry/num_params']:,} weights): "
        f"trace {results['geometry/trace']:.3g}; only a fraction rho = "
        f"{results['geometry/rho']:.4f} of its directions change the outputs at all."
    )
    rates = {
        "gradual": results.get(f"gradual/{percent}/learning_rate"),
        "one_shot": results.get(f"one_shot/{percent}/learning_rate"),
    }
    compress_rows = []
    for row, rate in zip(sections["compress"], (None, rates["gradual"], rates["one_shot"])):
        compress_rows.append(
            (
                row[0],
                f"{row[1]:.4f}",
                f"{row[2]:.3f}",
                "defaults" if rate is None else f"{rate:g}",
                f"{row[4]:.1f}",
            )
        )
    _table(
        f"2. Sparsify to {sparsity:.0%}, {results['pruning/epochs']} epochs for every method",
        "'sparsity': the share of prunable weights at exactly zero; 'rate': the baselines' "
        "Adam rate, chosen on a validation split.",
        ("method", "test acc", "sparsity", "rate", "seconds"),
        compress_rows,
    )
    _table(
        "3. Damage",
        "Random noise and the eigen adversary have the same norm; the adversary moves along "
        "the most sensitive directions of g.",
        ("damage", "test acc", "seconds"),
        [(row[0], f"{row[1]:.4f}", f"{row[4]:.1f}") for row in sections["damage"]],
    )
    _table(
        "4. Repair of the 50% deletion",
        "'epochs to recover': epochs until within 1 point of the trained network "
        "(never: not within the budget).",
        ("method", "test acc", "epochs to recover", "seconds"),
        [
            (
                row[0],
                f"{row[1]:.4f}",
                "never" if row[5] is None else f"{row[5]:.2f}",
                f"{row[4]:.1f}",
            )
            for row in sections["repair"]
        ],
    )
    ensemble_rows = []
    for key, name in (
        ("fip", "FIP ensemble (5 members)"),
        ("deep", "deep ensemble (5 networks)"),
        ("single", "single network"),
    ):
        clean = results[
            "base/test/accuracy" if key == "single" else f"ensemble/{key}/test/accuracy"
        ]
        passes = results.get(f"ensemble/{key}/train_examples")
        ensemble_rows.append(
            (
                name,
                f"{clean:.4f}",
                *(
                    f"{results[f'ensemble/{key}/transfer_pgd/{e:g}/accuracy']:.4f}"
                    for e in ENSEMBLE_EPSILONS
                ),
                "" if passes is None else f"{passes:,}",
            )
        )
    _table(
        "5. Ensembles under attack",
        "transfer PGD accuracy at eps "
        + " / ".join(f"{e:g}" for e in ENSEMBLE_EPSILONS)
        + ": L∞ PGD computed on a separately trained network; 'passes': the examples "
        "each method's training read (forward and backward).",
        ("model", "clean", *(f"eps {e:g}" for e in ENSEMBLE_EPSILONS), "passes"),
        ensemble_rows,
    )


def main(argv):
    del argv  # Unused.
    grid = common.learning_rate_grid(
        FLAGS.quickstart_prune_learning_rates, "quickstart_prune_learning_rates"
    )
    session = common.start("quickstart", unsupported=SINGLE_DEVICE)
    output_dir = session.output_dir
    start = time.perf_counter()
    with session.scope():
        sections, results = run(
            output_dir,
            FLAGS.seed,
            FLAGS.quickstart_walk_steps,
            FLAGS.quickstart_sparsity,
            log_dir=session.log_dir,
            prune_learning_rates=grid,
            validation_fraction=FLAGS.quickstart_validation_fraction,
        )
    results["wall_time_seconds"] = time.perf_counter() - start
    common.write_json(
        output_dir,
        "config.json",
        {
            "seed": FLAGS.seed,
            "walk_steps": FLAGS.quickstart_walk_steps,
            "sparsity": FLAGS.quickstart_sparsity,
            "prune_learning_rates": grid,
            "validation_fraction": FLAGS.quickstart_validation_fraction,
            "strategy": FLAGS.strategy,
        },
    )
    common.write_json(output_dir, "results.json", results)
    common.write_json(output_dir, "summary.json", summary_page(results, FLAGS.quickstart_sparsity))
    session.scalars(results, prefix="quickstart")
    _plot(sections, results, FLAGS.quickstart_sparsity, os.path.join(output_dir, "summary.png"))
    _report(sections, results, FLAGS.quickstart_sparsity)
    print(f"\nwall time {results['wall_time_seconds']:.0f} s")
    print(f"wrote {output_dir}/results.json and the plots in summary.png")
    session.close()


if __name__ == "__main__":
    common.run(main, shared=("seed",))
