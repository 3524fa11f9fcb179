r"""Repairing damaged networks: geodesic recovery, retraining, pruning, damage-repair loops.

Experiment families of the resilience and damage-rescue papers, every network damaged with
`keras_fip.Damage(keras_fip.faults.Nodes(...))` and repaired with `keras_fip.Repair`, on base
networks from
`keras_fip.models.base_network` (one per seed, trained once, cached):

- `recovery` (resilience paper, Fig. 4): MLP-1 (784-`--repair_mlp_width`-10) on `--dataset`
  with `--repair_fractions` of its hidden units deleted, repaired by
  - `fip`: `keras_fip.Repair((x, y))` with its defaults (its own learning rate,
    untuned, unless `--repair_fip_learning_rates` names a grid): on MLP-1 the FIP back to
    the undamaged network's outputs starts with the solves Repair plans for an MLP
    (output layer, Gauss-Newton sweeps of the hidden units, every input counted in its
    epochs), the damaged weights at zero, then walks with the labels' term;
  - `retrain`: supervised retraining of the surviving units (damage-rescue strategy 1);
  - `prune`: deleting the same units one at a time (`--repair_prune_units_per_round`)
    from the undamaged network with SGD steps in between, then retraining
    (`keras_fip.baselines.prune_retrain`).
  Every method sees `--batch_size` examples per step and ⌈N/batch⌉ steps per epoch, so an
  epoch is the same number of examples for all. Each baseline's learning rate is tuned
  over its grid (`--repair_<method>_learning_rates`, extended by the grid's own spacing
  past an edge that wins, within 1e-5 to 1: `keras_fip.core.tuning.grid_search`) on the
  mean over the first `--repair_tuning_seeds` seeds (the first one by default; 0: all):
  the rate recovering in the fewest epochs on the mean (then the best final accuracy on
  the mean) is used for every seed (a rate is the walk's `keras_fip.rules.Penalty`
  learning rate). Accuracy is measured `Repair(evaluations_per_epoch=...)` times per epoch
  (20, or `--repair_evaluations_per_epoch`) on a validation split (the first
  `--repair_validation_examples` test images) and `epochs_to_recover` is the first
  measurement within `--repair_target` of the undamaged accuracy; the final accuracy is
  also reported on the rest of the test set.
- `iterative` (damage-rescue paper, Fig. 2-3): for each total damage m in
  `--repair_iterative_counts` hidden units, batch repair (all m deleted at once, then
  strategy 1 `retrain` or strategy 2 `embryonic`) against the iterative loop (r∘D)
  (`keras_fip.DamageRepair`, `--repair_round_budget` units per round, each round repaired
  by `--repair_iterative_method` until recovered; FIP repairs with Repair's defaults,
  the supervised ones at `--repair_iterative_learning_rate`): cycles (training epochs, solves
  included) to recover — for the loop, the epochs of all its rounds together (`cycles`,
  compared with the batch repairs) and of its last round (`last_round_cycles`). With the
  FIP rounds (the default), batch FIP with the same repair is reported too (`fip`).
- `invariant` (damage-rescue paper, Fig. 4), on the first seed's MLP-1:
  `--repair_invariant_loops` loops of `--repair_invariant_rounds` (r∘D) rounds of
  `--repair_invariant_budget` units each (`keras_fip.DamageRepair(keep_networks=True)`,
  repaired by `--repair_iterative_method`), every repaired network kept with the
  undamaged one. Their validation loss; every pair joined by a straight line in weight
  space at `--repair_invariant_points` points: the fraction of pairs whose line stays
  under the loss threshold (`--repair_invariant_loss_threshold`, by default the largest
  loss of the kept networks) and the barrier (the line's highest loss above its worse
  end); a 2-D t-SNE embedding of the networks (scikit-learn) coloured by loss.
- `transitions` (resilience paper), on the first seed's MLP-1, every step a FIP repair
  with Repair's defaults on inputs only (`Repair(x)`, the pure function recovery)
  back to the undamaged function: C1 (undamaged) → C2 (the first
  `--repair_transition_fractions` of the hidden units deleted) → C3 (the second, a
  superset: the same seeded order) → C4 (the deleted units restored: re-initialised,
  released and grown back, `Repair(method=keras_fip.repair.FIP(release=True))`). Epochs to
  recover and accuracy of
  each transition.
- `vgg` (Fig. 4): VGG-11 (`--repair_vgg_width`) on
  `--repair_cifar_dataset` with `--repair_vgg_fraction` of its first-layer filters
  deleted: accuracy along the recovery path (`keras_fip.operations.repair.recovery_path`,
  `--repair_path_steps` Adam steps per point at `--repair_path_learning_rate` × t, BatchNorm
  on batch statistics and recalibrated at each point by default) and along the straight
  damage path (`keras_fip.geometry.damage_path`: the paper's naive path, the weights on
  the line and the BatchNorm statistics as trained) at the same damage times, with the
  break-down speed and acceleration along each; with BatchNorm, the straight path with its
  statistics re-estimated at every point is reported beside it (`straight_recalibrated`).

Every FIP repair runs with `Repair`'s defaults: the apps pass the model, the data, the
budget (`--repair_max_epochs`), the validation split and target, and the seeds. The flags
`--repair_fip_*` (recovery), `--repair_iterative_fip_*`, `--repair_iterative_solve_examples`
(iterative and invariant) and `--repair_transition_learning_rate` override single settings
of the walk (`keras_fip.Walk`), the FIP method (`keras_fip.repair.FIP`) or its solver
(`keras_fip.repair.OutputLayerSolver`); they are unset by default, and no figure of the
results uses them.

Writes `config.json`, `results.json` (flat keys such as `"mlp/fip/epochs_to_recover/mean"`,
`"mlp/0.8/retrain/epochs_to_recover/mean"`, `"iterative/200/damage_repair/cycles/mean"`,
`"vgg11/recovery/test/accuracy"`, `"invariant/connected_fraction"`,
`"transitions/C2_to_C3/epochs_to_recover"`), `provenance.json`, `summary.json` (the results
page's table of the `recovery` part) and `recovery.png`, `iterative.png`, `invariant.png`,
`vgg.png` to `--output_dir`.

Example:

    python -m apps.repair --output_dir=runs/repair
    python -m apps.repair --repair_parts=recovery --repair_fractions=0.8 --seeds=0

`--strategy=mirrored|multi_worker|tpu` runs every part in that strategy. The VGG recovery
path walks in training mode by default (`--repair_path_training=auto`, BatchNorm on batch
statistics): under a strategy each replica normalises its own share of the batch, as
Keras's `fit` does, so its figures differ from one device's by the statistics of smaller
batches (on the test's tiny VGG, a percent of the accuracy); in inference mode
(`--repair_path_training=false`) and on the straight paths they are one device's. On two
loopback workers (every worker the same command and `--seeds`; the chief writes):

    python -m keras_fip.distribute --workers=2 -- python -m apps.repair \
        --strategy=multi_worker --repair_parts=recovery,iterative --seeds=0
"""

import time

import matplotlib

matplotlib.use("Agg")
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import keras_fip  # noqa: E402
from apps import common  # noqa: E402
from keras_fip import data  # noqa: E402
from keras_fip import geometry  # noqa: E402
from keras_fip import models  # noqa: E402
from keras_fip.core import tuning  # noqa: E402
from keras_fip.operations.repair import recovery_path  # noqa: E402

PARTS = ("recovery", "iterative", "invariant", "transitions", "vgg")
METHODS = ("fip", "retrain", "prune")
# The learning rates a tuning grid may be extended to, past an edge that wins.
TUNING_BOUNDS = (1e-5, 1.0)
# The weight of the final accuracy in a rate's score: it only breaks ties of the epochs.
TIE_BREAK = 1e-6
# Parts that cannot run under a distributed `--strategy` (`common.start` refuses them before
# any work): none. The MLP parts give the one-process results on two loopback workers
# (tests/apps/test_multi_worker.py); the VGG part too with `--repair_path_training=false`,
# and in training mode its recovery path normalises each replica's share of the batch
# (tests/apps/test_repair.py).
SINGLE_DEVICE = {}

# Experiments
flags.DEFINE_list(
    "repair_parts",
    list(PARTS),
    f"Experiment families, among {PARTS} (`vgg` also runs with --repair_vgg).",
)
flags.DEFINE_integer(
    "repair_validation_examples",
    5000,
    "Test images used as the validation split (the rest is the held-out test).",
    lower_bound=1,
)
flags.DEFINE_float(
    "repair_target",
    0.01,
    "Recovered: within this of the undamaged validation accuracy.",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_integer(
    "repair_evaluations_per_epoch",
    None,
    "Override of `Repair(evaluations_per_epoch=...)`, validation measurements per epoch "
    "(default: Repair's, 20).",
    lower_bound=1,
)

# Recovery
flags.DEFINE_integer("repair_mlp_width", 400, "Hidden units of MLP-1.", lower_bound=1)
flags.DEFINE_list("repair_fractions", ["0.5", "0.8"], "Fractions of hidden units deleted.")
flags.DEFINE_integer("repair_max_epochs", 4, "Epoch budget of every repair.", lower_bound=1)
flags.DEFINE_list(
    "repair_fip_learning_rates",
    [],
    "Adam rates of the FIP repair, tuned like the baselines' (with --repair_tuning_seeds); "
    "empty (the default): `Repair`'s own default rate, untuned.",
)
# Documented overrides of Repair's defaults for the FIP of `recovery` (unset: Repair's own;
# a temperature of 0 means none, solve examples 0 no solve).
flags.DEFINE_enum(
    "repair_fip_distance", None, ["l2", "kl", "bhattacharyya"], "Override `Walk(distance=)`."
)
flags.DEFINE_float(
    "repair_fip_distance_temperature",
    None,
    "Override `FIP(temperature=)`, the walk distance's temperature.",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "repair_fip_solve_first", None, "Override `OutputLayerSolver(first=)`.", lower_bound=0
)
flags.DEFINE_integer(
    "repair_fip_solve_examples",
    None,
    "Override `OutputLayerSolver(examples=)` (0: `FIP(solver=None)`).",
    lower_bound=0,
)
flags.DEFINE_integer(
    "repair_fip_solve_sweeps", None, "Override `OutputLayerSolver(sweeps=)`.", lower_bound=0
)
flags.DEFINE_integer(
    "repair_fip_solve_rank", None, "Override `OutputLayerSolver(rank=)`.", lower_bound=1
)
flags.DEFINE_float(
    "repair_fip_solve_temperature",
    None,
    "Override `OutputLayerSolver(temperature=)`.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "repair_fip_solve_damping", None, "Override `OutputLayerSolver(damping=)`.", lower_bound=0.0
)
flags.DEFINE_integer(
    "repair_tuning_seeds",
    1,
    "Seeds (the first of --seeds) on whose mean "
    "each method's learning rate is tuned; 0: all of them (about 1.8x the "
    "recovery part's time).",
    lower_bound=0,
)
flags.DEFINE_list(
    "repair_retrain_learning_rates",
    ["1e-3", "3e-3", "1e-2"],
    "Adam rates of retraining (tuned with --repair_tuning_seeds).",
)
flags.DEFINE_list(
    "repair_prune_learning_rates",
    ["0.01", "0.03", "0.1"],
    "SGD (momentum 0.9) rates of prune-one-at-a-time (tuned with --repair_tuning_seeds).",
)
flags.DEFINE_integer(
    "repair_prune_units_per_round", 1, "Units deleted per pruning round.", lower_bound=1
)
flags.DEFINE_integer(
    "repair_prune_steps_per_round", 1, "SGD steps after each pruning round.", lower_bound=1
)

# Iterative damage-repair
flags.DEFINE_list(
    "repair_iterative_counts", ["100", "200", "300"], "Total hidden units deleted, m."
)
flags.DEFINE_integer("repair_round_budget", 50, "Units deleted per (r∘D) round.", lower_bound=1)
flags.DEFINE_enum(
    "repair_iterative_method", "fip", ["retrain", "embryonic", "fip"], "Repair of each (r∘D) round."
)
flags.DEFINE_float(
    "repair_iterative_learning_rate",
    3e-3,
    "Adam rate of the supervised repairs (retrain, embryonic) in the iterative experiment.",
    lower_bound=0.0,
)

# Documented overrides of Repair's defaults for the FIP rounds of `iterative` and
# `invariant`, and for the transitions (unset: Repair's own).
flags.DEFINE_float(
    "repair_iterative_fip_learning_rate",
    None,
    "Override the walk's `Penalty(learning_rate=)` of the iterative FIP repairs.",
    lower_bound=0.0,
)
flags.DEFINE_enum(
    "repair_iterative_fip_distance",
    None,
    ["l2", "kl", "bhattacharyya"],
    "Override `Walk(distance=)` of the iterative FIP repairs.",
)
flags.DEFINE_integer(
    "repair_iterative_solve_examples",
    None,
    "Override `OutputLayerSolver(examples=)` of the iterative FIP repairs (0: no solve).",
    lower_bound=0,
)
flags.DEFINE_float(
    "repair_transition_learning_rate",
    None,
    "Override the walk's `Penalty(learning_rate=)` of the transitions.",
    lower_bound=0.0,
)

# The invariant set
flags.DEFINE_integer(
    "repair_invariant_loops",
    2,
    "(r∘D) loops (sampler seeds) whose networks are kept.",
    lower_bound=1,
)
flags.DEFINE_integer("repair_invariant_rounds", 8, "Rounds per loop.", lower_bound=1)
flags.DEFINE_integer("repair_invariant_budget", 20, "Units deleted per round.", lower_bound=1)
flags.DEFINE_integer(
    "repair_invariant_points", 11, "Points on each pairwise line (ends included).", lower_bound=3
)
flags.DEFINE_integer(
    "repair_invariant_examples",
    2000,
    "Validation images on which the losses are measured.",
    lower_bound=1,
)
flags.DEFINE_float(
    "repair_invariant_loss_threshold",
    None,
    "Loss threshold of the set (default: the largest loss of the kept networks).",
)

# Transitions
flags.DEFINE_list("repair_transition_fractions", ["0.5", "0.8"], "Deleted fractions of C2 and C3.")

# VGG
flags.DEFINE_bool(
    "repair_vgg", False, "Also run the VGG-11 recovery path when --repair_parts leaves it out."
)
flags.DEFINE_float("repair_vgg_width", 0.5, "Width multiplier of VGG-11.", lower_bound=0.0)
flags.DEFINE_float(
    "repair_vgg_fraction",
    50 / 60,
    "Fraction of first-layer filters deleted (the paper's 50 of 60).",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_string("repair_cifar_dataset", "cifar10", "Dataset of VGG-11.")
flags.DEFINE_integer("repair_cifar_epochs", 20, "Training epochs of VGG-11.", lower_bound=1)
flags.DEFINE_integer("repair_path_points", 11, "Points of the VGG paths.", lower_bound=3)
flags.DEFINE_integer(
    "repair_path_steps", 30, "FIP steps between recovery-path points.", lower_bound=1
)
flags.DEFINE_float(
    "repair_path_learning_rate", 3e-4, "Adam rate of the recovery path.", lower_bound=0.0
)
flags.DEFINE_bool(
    "repair_path_rate_with_time",
    True,
    "Adam rate of the recovery path "
    "proportional to the damage time t (`recovery_path(rate_with_time=...)`: "
    "--repair_path_learning_rate at t = 1).",
)
flags.DEFINE_enum(
    "repair_path_training",
    "auto",
    ["auto", "true", "false"],
    "Mode of "
    "the moving network on the recovery path (`auto`: training mode for "
    "BatchNorm nets, moving statistics recalibrated at each point; `false` "
    "walks the inference function, BatchNorm on its trained statistics).",
)
flags.DEFINE_integer(
    "repair_path_examples", 200, "Inputs on which the break-down speed is measured.", lower_bound=1
)

FLAGS = flags.FLAGS


def _key(value):
    return f"{round(float(value), 4):g}"


def _summary(prefix, values):
    """`{prefix/mean, prefix/std, prefix/per_seed}`; runs that never recovered count as
    the budget in the mean (and `prefix/recovered` says how many did)."""
    present = [v for v in values if v is not None]
    budget = [FLAGS.repair_max_epochs if v is None else v for v in values]
    return {
        f"{prefix}/mean": float(np.mean(budget)),
        f"{prefix}/std": float(np.std(budget)),
        f"{prefix}/per_seed": values,
        f"{prefix}/recovered": len(present),
    }


def _splits(dataset):
    x, y = data.load(dataset, "train", FLAGS.data_dir)
    x_test, y_test = data.load(dataset, "test", FLAGS.data_dir)
    cut = min(FLAGS.repair_validation_examples, len(x_test) - 1)
    return (x, y), (x_test[:cut], y_test[:cut]), (x_test[cut:], y_test[cut:])


def _mlp(seed):
    model, _ = models.base_network(
        "mlp",
        FLAGS.dataset,
        epochs=FLAGS.base_epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=seed,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
        hidden_units=FLAGS.repair_mlp_width,
    )
    return model


# Override flags: the walk's, the FIP method's and its solver's settings they set.
_FIP_OVERRIDES = {
    "repair_fip_distance": ("walk", "distance"),
    "repair_fip_distance_temperature": ("method", "temperature"),
    "repair_fip_solve_first": ("solver", "first"),
    "repair_fip_solve_examples": ("solver", "examples"),
    "repair_fip_solve_sweeps": ("solver", "sweeps"),
    "repair_fip_solve_rank": ("solver", "rank"),
    "repair_fip_solve_temperature": ("solver", "temperature"),
    "repair_fip_solve_damping": ("solver", "damping"),
}
_ITERATIVE_OVERRIDES = {
    "repair_iterative_fip_learning_rate": ("walk", "learning_rate"),
    "repair_iterative_fip_distance": ("walk", "distance"),
    "repair_iterative_solve_examples": ("solver", "examples"),
}
_TRANSITION_OVERRIDES = {"repair_transition_learning_rate": ("walk", "learning_rate")}


def _overrides(table):
    """`{"walk": {...}, "method": {...}, "solver": {...}}`: the settings of the override
    flags in `table` that are set."""
    settings = {"walk": {}, "method": {}, "solver": {}}
    for flag, (owner, argument) in table.items():
        value = getattr(FLAGS, flag)
        if value is None:
            continue
        if argument == "temperature" and value == 0:
            value = None  # 0: no temperature.
        settings[owner][argument] = value
    solver = settings["solver"]
    if solver.get("examples") == 0:  # No solve at all.
        settings["method"]["solver"] = None
    elif solver:
        if solver.get("sweeps") == 0:
            solver.pop("first", None)  # No sweep: no output-only first batch.
        settings["method"]["solver"] = keras_fip.repair.OutputLayerSolver(**solver)
    return settings


def _walk(seed, learning_rate=None, distance=None, epochs=None):
    """The walk of a repair: the budget, the batch, the seed, a rate when one is given."""
    return keras_fip.Walk(
        epochs=epochs or FLAGS.repair_max_epochs,
        rule=None if learning_rate is None else keras_fip.rules.Penalty(learning_rate),
        batch_size=FLAGS.batch_size,
        distance=distance,
        seed=seed,
        verbose=0,
    )


def _method(name, settings=None):
    """The repair method `name`, the FIP with the `settings` of `_overrides`."""
    if name == "fip" and settings and settings["method"]:
        return keras_fip.repair.FIP(**settings["method"])
    return name


def _evaluations_per_epoch():
    """`--repair_evaluations_per_epoch`, or `Repair`'s default."""
    return FLAGS.repair_evaluations_per_epoch or keras_fip.Repair().evaluations_per_epoch


def _repair(method, model, damaged, learning_rate, splits, seed):
    """One repair: `(history, repaired model)`. The FIP gets `Repair`'s defaults (its rate
    too when `learning_rate` is `None`); the baselines their tuned rate."""
    (x, y), validation, _ = splits
    validation_kwargs = dict(
        target=FLAGS.repair_target,
        evaluations_per_epoch=_evaluations_per_epoch(),
        stop_at_target=True,
    )
    if method == "prune":
        units = keras_fip.damage_reference(damaged).records[0]["units"]
        repaired, history = keras_fip.baselines.prune_retrain(
            model,
            units,
            (x, y),
            validation,
            learning_rate=learning_rate,
            units_per_round=FLAGS.repair_prune_units_per_round,
            steps_per_round=FLAGS.repair_prune_steps_per_round,
            batch_size=FLAGS.batch_size,
            epochs=FLAGS.repair_max_epochs,
            seed=seed,
            **validation_kwargs,
        )
        return history, repaired
    settings = _overrides(_FIP_OVERRIDES) if method == "fip" else None
    op = keras_fip.Repair(
        (x, y),
        method=_method(method, settings),
        validation_data=validation,
        walk=_walk(seed, learning_rate, **(settings["walk"] if settings else {})),
        **validation_kwargs,
    )
    repaired = op(damaged)
    return op.history, repaired


def _recovered_by_solves(history):
    """Whether a FIP run recovered within its solves, before its walk (every rate ties)."""
    return (
        history.get("epochs_to_recover") is not None
        and history["epochs_to_recover"] <= history.get("solve_epochs", -1.0) + 1e-9
    )


def _tuned(method, cases, splits):
    """The learning rate of `method` recovering first on the mean over `cases` (`(seed,
    model, damaged)`; a run that never recovers counts as the budget), then most accurate at
    its end on the mean, chosen by `keras_fip.core.tuning.grid_search` over the method's
    grid (extended past an edge that wins, within `TUNING_BOUNDS`); the mean epochs to
    recover of every rate tried (`None`: a run diverged or did not recover); and the chosen
    rate's runs `{seed: (history, repaired)}`."""
    grid = [float(v) for v in getattr(FLAGS, f"repair_{method}_learning_rates")]
    runs, means = {}, {}

    def score(rate):
        runs[rate] = {}
        for seed, model, damaged in cases:
            solved = [
                r[seed] for r in runs.values() if seed in r and _recovered_by_solves(r[seed][0])
            ]
            if solved:  # Recovered by the FIP's solves, before its walk: every rate ties.
                runs[rate][seed] = solved[0]
                continue
            try:
                runs[rate][seed] = _repair(method, model, damaged, rate, splits, seed)
            except FloatingPointError:  # Diverged: the rate is too high.
                means[rate] = None
                return None
        histories = [history for history, _ in runs[rate].values()]
        recovered = [h["epochs_to_recover"] for h in histories]
        mean = float(np.mean([FLAGS.repair_max_epochs if e is None else e for e in recovered]))
        means[rate] = None if None in recovered else mean
        # Fewer epochs to recover first; the final accuracy only breaks ties.
        accuracy = float(np.mean([h["val_accuracy"][-1] for h in histories]))
        return -mean + TIE_BREAK * accuracy

    if len(grid) <= 1:  # One rate (or the method's own): nothing to choose.
        best = grid[0] if grid else None
        score(best)
    else:
        low, high = TUNING_BOUNDS
        best, _ = tuning.grid_search(score, grid, low=low, high=high)
    ordered = sorted(means, key=lambda r: -1.0 if r is None else r)
    table = {("default" if r is None else _key(r)): means[r] for r in ordered}
    return best, table, runs[best]


def recovery(methods, seeds, splits):
    """Epochs to recover of each method at each deleted fraction, over seeds."""
    results, curves = {}, {}
    _, _, (x_test, y_test) = splits
    tuning = FLAGS.repair_tuning_seeds or len(seeds)
    for fraction in [float(f) for f in FLAGS.repair_fractions]:
        prefix = f"mlp/{_key(fraction)}"
        cases = []
        for index, seed in enumerate(seeds):
            model = _mlp(seed)
            damaged = keras_fip.Damage(keras_fip.faults.Nodes(fraction), seed=seed)(model)
            cases.append((seed, model, damaged))
            if index == 0:
                results[f"{prefix}/undamaged/test/accuracy"] = models.evaluate_classifier(
                    model, x_test, y_test
                )["accuracy"]
                results[f"{prefix}/damaged/test/accuracy"] = models.evaluate_classifier(
                    damaged, x_test, y_test
                )["accuracy"]
        for method in methods:
            # Tune on the first `tuning` seeds; their chosen runs are theirs.
            rate, grid, tuned = _tuned(method, cases[:tuning], splits)
            results[f"{prefix}/{method}/learning_rate"] = rate
            results[f"{prefix}/{method}/tuning/epochs_to_recover"] = grid
            runs = []
            for index, (seed, model, damaged) in enumerate(cases):
                history, repaired = (
                    tuned[seed]
                    if seed in tuned
                    else _repair(method, model, damaged, rate, splits, seed)
                )
                runs.append(
                    {
                        "epochs_to_recover": history["epochs_to_recover"],
                        "test": models.evaluate_classifier(repaired, x_test, y_test)["accuracy"],
                    }
                )
                if index == 0:
                    curves[(fraction, method)] = (
                        history["epoch"],
                        history["val_accuracy"],
                        history["undamaged_accuracy"],
                    )
                print(
                    f"{prefix} seed {seed} {method}: recovered at "
                    f"{history['epochs_to_recover']} epochs (lr {rate or 'default'})",
                    flush=True,
                )
            results.update(
                _summary(
                    f"{prefix}/{method}/epochs_to_recover", [r["epochs_to_recover"] for r in runs]
                )
            )
            results[f"{prefix}/{method}/test/accuracy/mean"] = float(
                np.mean([r["test"] for r in runs])
            )
        if "fip" in methods:
            fip = results[f"{prefix}/fip/epochs_to_recover/mean"]
            for other in [m for m in methods if m != "fip"]:
                theirs = results[f"{prefix}/{other}/epochs_to_recover/mean"]
                results[f"{prefix}/fip_over_{other}"] = fip / theirs
    # The headline: the largest fraction
    largest = _key(max(float(f) for f in FLAGS.repair_fractions))
    for key in list(results):
        if key.startswith(f"mlp/{largest}/") and "/tuning/" not in key:
            results["mlp/" + key[len(f"mlp/{largest}/") :]] = results[key]
    return results, curves


def recovery_page(results, methods, seeds):
    """The results page's `summary.json` of the `recovery` part's `results`."""
    names = {"fip": "FIP (Repair defaults)", "retrain": "tuned retraining", "prune": "prune"}
    rows = []
    for fraction in sorted(float(f) for f in FLAGS.repair_fractions):
        prefix = f"mlp/{_key(fraction)}"
        row = [f"{100 * fraction:g}% deleted"]
        for method in methods:
            mean = results[f"{prefix}/{method}/epochs_to_recover/mean"]
            spread = results[f"{prefix}/{method}/epochs_to_recover/std"]
            row.append(f"{mean:.3f} ± {spread:.3f}")
        rows.append(row)
    return {
        "title": "Repair: epochs to recover after deleting hidden units (MLP-1, MNIST)",
        "description": (
            f"MLP-1 (784-{FLAGS.repair_mlp_width}-10) with hidden units deleted by "
            "`keras_fip.faults.Nodes`, repaired until within "
            f"{100 * FLAGS.repair_target:g} point(s) of the undamaged validation accuracy: "
            "`keras_fip.Repair((x, y))` with its defaults against retraining and "
            "prune-one-at-a-time, their rates tuned on the validation split; epochs of "
            f"{FLAGS.batch_size}-example steps, mean ± std over seeds {seeds} (a run that "
            f"never recovers counts as the budget, {FLAGS.repair_max_epochs} epochs)."
        ),
        "tables": [
            {
                "caption": "Epochs to recover",
                "columns": ["damage"] + [names[m] for m in methods],
                "rows": rows,
                "headline": [len(rows) - 1],
            }
        ],
    }


def _round_repair(method, seed, splits, epochs=None):
    """The `Repair` of the iterative and invariant experiments: the FIP with `Repair`'s
    defaults, the supervised strategies at `--repair_iterative_learning_rate`."""
    (x, y), _, _ = splits
    if method != "fip":
        settings = {"walk": {"learning_rate": FLAGS.repair_iterative_learning_rate}}
    else:
        settings = _overrides(_ITERATIVE_OVERRIDES)
    return keras_fip.Repair(
        (x, y),
        method=_method(method, settings),
        walk=_walk(seed, epochs=epochs, **settings["walk"]),
        **_repair_kwargs(splits),
    )


def iterative(seeds, splits):
    """Cycles to recover: batch strategies 1 and 2 against (r∘D) rounds, per m.

    Cycles are training epochs (passes over the training examples, solves included),
    counted the same way for every repair: a batch repair's epochs to recover from all m
    deletions at once; the loop's epochs to recover summed over all its rounds (`cycles`,
    the acceptance measure), and the epochs of its last round alone
    (`last_round_cycles`, the rescue after the last damage). Batch FIP with the same
    repair as the loop's rounds is reported beside them (`fip`), so the effect of
    iterating is separate from that of the repair.
    """
    results, table = {}, {}
    batch_methods = ["retrain", "embryonic"]
    if FLAGS.repair_iterative_method == "fip":
        batch_methods.append("fip")
    for count in [int(c) for c in FLAGS.repair_iterative_counts]:
        cycles = {method: [] for method in batch_methods + ["damage_repair"]}
        last_round = []
        for seed in seeds:
            model = _mlp(seed)
            damaged = keras_fip.Damage(keras_fip.faults.Nodes(count=count), seed=seed)(model)
            for method in batch_methods:
                op = _round_repair(method, seed, splits)
                op(damaged)
                cycles[method].append(op.history["epochs_to_recover"])
            rounds = -(-count // FLAGS.repair_round_budget)
            loop = keras_fip.DamageRepair(
                rounds,
                count=FLAGS.repair_round_budget,
                seed=seed,
                repair=_round_repair(FLAGS.repair_iterative_method, seed, splits),
            )
            loop(model)
            cycles["damage_repair"].append(
                loop.history["cycles"] if loop.history["recovered"] else None
            )
            last_round.append(loop.history["rounds"][-1]["epochs_to_recover"])
            print(
                f"iterative m={count} seed {seed}: "
                + ", ".join(f"{k} {v[-1]}" for k, v in cycles.items()),
                flush=True,
            )
        for method, values in cycles.items():
            results.update(_summary(f"iterative/{count}/{method}/cycles", values))
        # The epochs the last round needed (the network's recovery from its last damage).
        results.update(_summary(f"iterative/{count}/damage_repair/last_round_cycles", last_round))
        table[count] = {m: results[f"iterative/{count}/{m}/cycles/mean"] for m in cycles}
        results[f"iterative/{count}/fewer_cycles"] = bool(
            table[count]["damage_repair"] < min(table[count]["retrain"], table[count]["embryonic"])
        )
        if "fip" in table[count]:
            results[f"iterative/{count}/fewer_cycles_than_batch_fip"] = bool(
                table[count]["damage_repair"] < table[count]["fip"]
            )
    results["iterative/fewer_cycles_at_every_m"] = all(
        results[f"iterative/{c}/fewer_cycles"] for c in table
    )
    return results, table


class _Scorer:
    """Validation loss and accuracy of many weight settings of one architecture."""

    def __init__(self, model, x, y, batch_size=1000):
        self.model = keras_fip.strip_masks(model)
        inputs, labels = tf.constant(np.asarray(x, "float32")), tf.constant(np.asarray(y))
        count = int(inputs.shape[0])
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

        @tf.function
        def score():
            loss, correct = tf.constant(0.0, tf.float64), tf.constant(0, tf.int64)
            for start in tf.range(0, count, batch_size):
                logits = self.model(inputs[start : start + batch_size], training=False)
                batch = labels[start : start + batch_size]
                loss += tf.cast(loss_fn(batch, logits), tf.float64)
                correct += tf.reduce_sum(
                    tf.cast(tf.argmax(logits, axis=-1) == tf.cast(batch, tf.int64), tf.int64)
                )
            return loss / count, tf.cast(correct, tf.float64) / count

        self._score = score

    def __call__(self, weights):
        self.model.set_weights(weights)
        loss, accuracy = self._score()
        return float(loss), float(accuracy)


def _repair_kwargs(splits):
    """The validation data, target and measurements every repair shares."""
    _, validation, _ = splits
    return dict(
        validation_data=validation,
        target=FLAGS.repair_target,
        evaluations_per_epoch=_evaluations_per_epoch(),
        stop_at_target=True,
    )


def invariant(seed, splits):
    """Networks of (r∘D) loops: losses, pairwise linear interpolation, t-SNE."""
    from sklearn.manifold import TSNE

    (x, y), (x_val, y_val), _ = splits
    model = _mlp(seed)
    networks, labels = [model.get_weights()], [(-1, 0)]
    for loop in range(FLAGS.repair_invariant_loops):
        repair = _round_repair(FLAGS.repair_iterative_method, seed, splits)
        op = keras_fip.DamageRepair(
            FLAGS.repair_invariant_rounds,
            count=FLAGS.repair_invariant_budget,
            repair=repair,
            seed=1000 * seed + loop,
            keep_networks=True,
        )
        op(model)
        kept = op.history["networks"]
        networks += kept
        labels += [(loop, index + 1) for index in range(len(kept))]
        print(f"invariant loop {loop}: {len(kept)} networks, cycles {op.history['cycles']:.2f}")
    count = FLAGS.repair_invariant_examples
    scorer = _Scorer(model, x_val[:count], y_val[:count])
    scores = [scorer(weights) for weights in networks]
    losses = np.array([loss for loss, _ in scores])
    threshold = (
        FLAGS.repair_invariant_loss_threshold
        if FLAGS.repair_invariant_loss_threshold is not None
        else float(losses.max())
    )
    # Every pair, joined by a straight line
    times = np.linspace(0.0, 1.0, FLAGS.repair_invariant_points)[1:-1]
    pairs, highest, barriers = [], [], []
    for i in range(len(networks)):
        for j in range(i + 1, len(networks)):
            line = [
                scorer([(1 - t) * a + t * b for a, b in zip(networks[i], networks[j])])[0]
                for t in times
            ]
            pairs.append((i, j))
            highest.append(max(line))
            barriers.append(max(line) - max(losses[i], losses[j]))
    highest, barriers = np.array(highest), np.array(barriers)
    connected = highest <= threshold
    undamaged_pairs = np.array([i == 0 for i, _ in pairs])
    # A 2-D embedding of the networks
    flat = np.stack([np.concatenate([np.ravel(w) for w in weights]) for weights in networks])
    perplexity = float(min(30.0, max(2.0, (len(networks) - 1) / 3)))
    embedding = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed
    ).fit_transform(flat)
    results = {
        "invariant/num_networks": len(networks),
        "invariant/labels": [list(label) for label in labels],
        "invariant/loss": losses.tolist(),
        "invariant/accuracy": [accuracy for _, accuracy in scores],
        "invariant/loss_threshold": threshold,
        "invariant/num_pairs": len(pairs),
        "invariant/connected_fraction": float(np.mean(connected)),
        "invariant/connected_fraction/with_undamaged": float(np.mean(connected[undamaged_pairs])),
        "invariant/connected_fraction/within_loop": float(
            np.mean(
                [c for (i, j), c in zip(pairs, connected) if i > 0 and labels[i][0] == labels[j][0]]
                or [np.nan]
            )
        ),
        "invariant/connected_fraction/across_loops": float(
            np.mean(
                [c for (i, j), c in zip(pairs, connected) if i > 0 and labels[i][0] != labels[j][0]]
                or [np.nan]
            )
        ),
        "invariant/barrier/mean": float(np.mean(barriers)),
        "invariant/barrier/max": float(np.max(barriers)),
        "invariant/embedding": embedding.tolist(),
    }
    print(
        f"invariant: {len(networks)} networks, {np.mean(connected):.2%} of "
        f"{len(pairs)} lines under the loss {threshold:.4f}"
    )
    return results, (embedding, losses, pairs, connected)


def transitions(seed, splits):
    """C1 → C2 → C3 → C4: epochs of each FIP transition (inputs only)."""
    (x, _), _, (x_test, y_test) = splits
    model = _mlp(seed)
    kwargs = _repair_kwargs(splits)
    walk = _walk(seed, **_overrides(_TRANSITION_OVERRIDES)["walk"])
    results = {
        "transitions/C1/test/accuracy": models.evaluate_classifier(model, x_test, y_test)[
            "accuracy"
        ]
    }
    current = model
    steps = [
        (f"C{i + 1}_to_C{i + 2}", float(f)) for i, f in enumerate(FLAGS.repair_transition_fractions)
    ]
    steps.append((f"C{len(steps) + 1}_to_C{len(steps) + 2}", None))
    for name, fraction in steps:
        if fraction is not None:  # Delete more (the same seeded order: a superset)
            current = keras_fip.Damage(keras_fip.faults.Nodes(fraction), seed=seed)(current)
            op = keras_fip.Repair(x, walk=walk, **kwargs)
        else:  # Restore the deleted units
            method = keras_fip.repair.FIP(release=True)
            op = keras_fip.Repair(x, method=method, walk=walk, **kwargs)
        current = op(current)
        recovered = op.history["epochs_to_recover"]
        results[f"transitions/{name}/fraction_deleted"] = fraction if fraction else 0.0
        results[f"transitions/{name}/start/val_accuracy"] = op.history["val_accuracy"][0]
        results[f"transitions/{name}/epochs_to_recover"] = recovered
        results[f"transitions/{name}/epochs"] = op.history["epochs"]
        results[f"transitions/{name}/test/accuracy"] = models.evaluate_classifier(
            current, x_test, y_test
        )["accuracy"]
        print(
            f"transition {name}: from {op.history['val_accuracy'][0]:.4f}, recovered at "
            f"{recovered} epochs"
        )
    done = [results[f"transitions/{name}/epochs_to_recover"] for name, _ in steps]
    results["transitions/all_recovered"] = all(v is not None for v in done)
    results["transitions/max_epochs_to_recover"] = (
        float(max(done)) if all(v is not None for v in done) else None
    )
    return results, None


def vgg(seed):
    """Accuracy and break-down along the recovery path and the straight damage path."""
    model, base = models.base_network(
        "vgg11",
        FLAGS.repair_cifar_dataset,
        epochs=FLAGS.repair_cifar_epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=seed,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
        width_multiplier=FLAGS.repair_vgg_width,
    )
    x, _ = data.load(FLAGS.repair_cifar_dataset, "train", FLAGS.data_dir)
    x_test, y_test = data.load(FLAGS.repair_cifar_dataset, "test", FLAGS.data_dir)
    first = next(
        layer.name
        for layer in model.layers
        if "conv" in layer.name.lower() and hasattr(layer, "kernel")
    )
    fault = keras_fip.faults.Nodes(FLAGS.repair_vgg_fraction, layers=[first], scope="per_layer")
    damaged = keras_fip.Damage(fault, seed=seed)(model)
    masks = keras_fip.damage_reference(damaged).damage_masks
    began = time.perf_counter()
    recovery_points, times = recovery_path(
        model,
        masks,
        x,
        num_points=FLAGS.repair_path_points,
        steps_per_point=FLAGS.repair_path_steps,
        learning_rate=FLAGS.repair_path_learning_rate,
        batch_size=FLAGS.batch_size,
        training={"auto": "auto", "true": True, "false": False}[FLAGS.repair_path_training],
        seed=seed,
        rate_with_time=FLAGS.repair_path_rate_with_time,
    )
    print(f"vgg: recovery path walked in {time.perf_counter() - began:.0f} s", flush=True)
    straight_points, _ = geometry.damage_path(model, damaged, FLAGS.repair_path_points)
    working = keras_fip.strip_masks(model)
    normalized = bool(keras_fip.core.normalization.batch_normalization_layers(working))
    # The straight path is the paper's naive path: the weights on the line, every other
    # state (BatchNorm statistics) as trained. Re-estimating the statistics at each point
    # is a repair step of its own; that variant is reported beside it when there is
    # BatchNorm (`straight_recalibrated`).
    paths = [("recovery", recovery_points, False), ("straight", straight_points, False)]
    if normalized:
        paths.append(("straight_recalibrated", straight_points, True))
    curves = {}
    for name, points, recalibrate in paths:
        accuracies, visited = [], []
        for point in points:
            working.set_weights(point)
            if recalibrate:  # The recovery path recalibrated its own.
                keras_fip.core.normalization.recalibrate_batch_normalization(
                    working, x, 2 * FLAGS.batch_size, max_examples=4096
                )
            visited.append(working.get_weights())
            accuracies.append(models.evaluate_classifier(working, x_test, y_test)["accuracy"])
        points = visited
        profile = geometry.breakdown_profile(
            points,
            x[: FLAGS.repair_path_examples],
            model=working,
            times=times,
            outputs="probabilities",
        )
        curves[name] = (accuracies, profile)
        print(
            f"vgg: {name} path measured ({time.perf_counter() - began:.0f} s): accuracy "
            + " ".join(f"{a:.3f}" for a in accuracies),
            flush=True,
        )
    recovered, straight = curves["recovery"][0], curves["straight"][0]
    results = {
        "vgg11/test/accuracy": base["test/accuracy"],
        "vgg11/dataset/subset": base["dataset/subset"],
        "vgg11/layer": first,
        "vgg11/filters_deleted": len(
            keras_fip.damage_reference(damaged).records[0]["units"][first]
        ),
        "vgg11/times": times.tolist(),
        "vgg11/recovery/test/accuracy": recovered,
        "vgg11/straight/test/accuracy": straight,
        "vgg11/recovery/min_accuracy": float(np.min(recovered)),
        "vgg11/straight/min_accuracy": float(np.min(straight)),
        "vgg11/recovery_above_straight_at_every_point": bool(
            all(r > s for r, s in zip(recovered[1:], straight[1:]))
        ),
    }
    if "straight_recalibrated" in curves:
        calibrated = curves["straight_recalibrated"][0]
        results["vgg11/straight_recalibrated/test/accuracy"] = calibrated
        results["vgg11/recovery_above_straight_recalibrated_at_every_point"] = bool(
            all(r > s for r, s in zip(recovered[1:], calibrated[1:]))
        )
    for name, (_, profile) in curves.items():
        results[f"vgg11/{name}/breakdown_speed"] = profile["speed"].tolist()
        results[f"vgg11/{name}/breakdown_acceleration"] = profile["acceleration"].tolist()
        results[f"vgg11/{name}/length"] = profile["length"]
    return results, (times, curves)


def plot_recovery(curves, output_dir):
    fractions = sorted({f for f, _ in curves})
    figure, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 3.8), squeeze=False)
    for axis, fraction in zip(axes[0], fractions):
        for (f, method), (epochs, accuracy, reference) in curves.items():
            if f == fraction:
                axis.plot(epochs, accuracy, marker=".", label=method)
                undamaged = reference
        axis.axhline(
            undamaged - FLAGS.repair_target,
            color="black",
            linestyle="--",
            label="undamaged − target",
        )
        axis.set_xlabel("epochs (same examples per epoch for every method)")
        axis.set_ylabel("validation accuracy")
        axis.set_title(f"MLP-1, {100 * fraction:g}% hidden units deleted")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/recovery.png", dpi=120)
    plt.close(figure)


def plot_iterative(table, output_dir):
    figure, axis = plt.subplots(figsize=(5, 3.8))
    counts = sorted(table)
    for method, label in (
        ("retrain", "batch, strategy 1 (retrain)"),
        ("embryonic", "batch, strategy 2 (embryonic)"),
        ("fip", "batch, FIP"),
        ("damage_repair", "iterative (r∘D)"),
    ):
        if method in table[counts[0]]:
            axis.plot(counts, [table[c][method] for c in counts], marker="o", label=label)
    axis.set_xlabel("hidden units deleted, m")
    axis.set_ylabel("cycles (epochs) to recover")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/iterative.png", dpi=120)
    plt.close(figure)


def plot_invariant(info, output_dir):
    embedding, losses, pairs, connected = info
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for (i, j), joined in zip(pairs, connected):
        if joined:
            axis.plot(
                embedding[[i, j], 0], embedding[[i, j], 1], color="0.85", linewidth=0.5, zorder=0
            )
    points = axis.scatter(embedding[:, 0], embedding[:, 1], c=losses, cmap="viridis", zorder=1)
    axis.scatter(
        embedding[:1, 0],
        embedding[:1, 1],
        marker="*",
        s=200,
        c="tab:red",
        label="undamaged",
        zorder=2,
    )
    figure.colorbar(points, label="validation loss")
    axis.set_title(f"(r∘D) networks: {np.mean(connected):.0%} of lines under the threshold")
    axis.set_xlabel("t-SNE 1")
    axis.set_ylabel("t-SNE 2")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/invariant.png", dpi=120)
    plt.close(figure)


def plot_vgg(times, curves, output_dir):
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (accuracies, profile) in curves.items():
        left.plot(times, accuracies, marker="o", label=f"{name} path")
        right.plot(
            profile["acceleration_times"], profile["acceleration"], marker=".", label=f"{name} path"
        )
    left.set_xlabel("damage time t (deleted filters scaled by 1 − t)")
    left.set_ylabel("test accuracy")
    left.legend()
    right.set_xlabel("t")
    right.set_ylabel("break-down acceleration ds/dt")
    right.legend()
    figure.tight_layout()
    figure.savefig(f"{output_dir}/vgg.png", dpi=120)
    plt.close(figure)


def main(argv):
    del argv  # Unused.
    parts = [common.check_choice(p, "repair_parts", PARTS) for p in FLAGS.repair_parts]
    methods = [common.check_choice(m, "methods", METHODS) for m in FLAGS.methods or METHODS]
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.repair_vgg and "vgg" not in parts:
        parts.append("vgg")
    run = common.start("repair", unsupported=common.single_device_parts(parts, SINGLE_DEVICE))
    try:
        with run.scope():
            _main(parts, methods, seeds, run)
    finally:
        run.close()


def _main(parts, methods, seeds, run):
    output_dir = run.output_dir
    common.write_json(
        output_dir,
        "config.json",
        common.flag_values(
            [name for name in FLAGS if name.startswith("repair_")]
            + [
                "dataset",
                "data_dir",
                "base_epochs",
                "batch_size",
                "learning_rate",
                "seeds",
                "methods",
                "strategy",
                "tpu",
            ]
        ),
    )
    common.set_seed(seeds[0])
    start = time.perf_counter()
    results = {}

    def finished(part, began, measured):
        """Adds a part's results and its time, and writes results.json (so a stopped run
        keeps the parts it finished)."""
        results.update(measured)
        results[f"time/{part}_seconds"] = time.perf_counter() - began
        results["wall_time_seconds"] = time.perf_counter() - start
        common.write_json(output_dir, "results.json", results)
        print(
            f"part {part} done in {results[f'time/{part}_seconds']:.0f} s "
            f"({results['wall_time_seconds']:.0f} s so far)",
            flush=True,
        )

    if any(part in parts for part in ("recovery", "iterative", "invariant", "transitions")):
        splits = _splits(FLAGS.dataset)
    if "recovery" in parts:
        began = time.perf_counter()
        measured, curves = recovery(methods, seeds, splits)
        plot_recovery(curves, output_dir)
        finished("recovery", began, measured)
        common.write_json(output_dir, "summary.json", recovery_page(results, methods, seeds))
    if "iterative" in parts:
        began = time.perf_counter()
        measured, table = iterative(seeds, splits)
        plot_iterative(table, output_dir)
        finished("iterative", began, measured)
    if "invariant" in parts:
        began = time.perf_counter()
        measured, info = invariant(seeds[0], splits)
        plot_invariant(info, output_dir)
        finished("invariant", began, measured)
    if "transitions" in parts:
        began = time.perf_counter()
        measured, _ = transitions(seeds[0], splits)
        finished("transitions", began, measured)
    if "vgg" in parts:
        began = time.perf_counter()
        measured, (times, curves) = vgg(seeds[0])
        plot_vgg(times, curves, output_dir)
        finished("vgg", began, measured)
    results["wall_time_seconds"] = time.perf_counter() - start
    run.scalars(results, prefix="repair")
    common.write_json(output_dir, "results.json", results)
    print(f"results in {output_dir}/results.json ({results['wall_time_seconds']:.0f} s)")


if __name__ == "__main__":
    common.run(
        main,
        shared=(
            "dataset",
            "data_dir",
            "epochs",
            "batch_size",
            "learning_rate",
            "seeds",
            "base_epochs",
            "methods",
            "cache_dir",
        ),
    )
