r"""Ensembles under adversarial attack: FIP ensembles beside the ensembles users know (Fig. 4).

For each experiment (`dataset/model`) and seed s, every method starts from the same data:

- `single`: the base network of seed s (`keras_fip.models.base_network`, cached);
- `fip`: `keras_fip.Ensemble(K, data=(x, y), walk=keras_fip.Walk(steps=K·S,
  batch_size=B, seed=s))` from that network on the labelled training set, every other
  argument at the library's default: a member every S = `--fip_member_fraction` × the
  single network's training steps (or `--fip_steps_between`) along one `Penalty` walk
  (Adam on D + L, D the squared distance of the logits to the start's on the anchors),
  L = τ·CE on labelled batches (τ chosen on a split held out of the training set) + CE of
  the true label on inputs attacked (FGSM, radius 0.3 of the inputs' range) against the
  ensemble so far: each new member learns to be right where the ensemble so far is wrong
  (beyond the paper; see `keras_fip.Ensemble`);
- `deep`: K independently trained networks of the same recipe (the base networks of seeds
  s, s+1, ..., s+K−1, i.e. `keras_fip.baselines.deep_ensemble`'s recipe through the shared
  cache; the windows of different seeds overlap, so the deep ensemble's spread over seeds
  understates its independent-seed spread);
- `fge`: `keras_fip.baselines.fast_geometric_ensemble` from the base network (cyclic
  learning rate, Garipov et al. 2018);
- `snapshot`: `keras_fip.baselines.snapshot_ensemble` from scratch (Huang et al. 2017).

What runs by default (sized for 2 CPU cores): the first experiment, LeNet-300-100 on
MNIST, runs every method on `--seeds` (0, 1, 2) with `--num_members` K = 10 and attacks
on `--attack_examples` 500 images (the headline comparison, FIP against a same-K deep
ensemble at a recorded fraction of its compute). Every experiment after it (cnn5 on MNIST,
VGG-11 on CIFAR-10) runs lighter: the methods in both `--methods` and `--other_methods`
(FIP and the single network it starts from), `--other_seeds` (0), `--other_num_members`
K = 5 and `--other_attack_examples` 200 images; every example pass is still counted, so
`train_examples` stays comparable across methods. The deep ensemble, FGE and snapshot
ensembles of cnn5 and VGG (9 more networks per seed for a 10-member deep ensemble, then
20 epochs each of FGE and snapshot) are behind the flags; on a GPU host, the full
comparison is
`--other_seeds=0,1,2 --other_num_members=10 --other_methods=fip,deep,fge,snapshot,single
--other_attack_examples=500`. `results.json` records each experiment's seeds, K, methods,
attack subset, per-method build and evaluation seconds and wall time.

The attacks (`keras_fip.robustness`, ART `ProjectedGradientDescent`, L∞) run on a fixed
test subset of `--attack_examples` images drawn with `--attack_seed` (the same images for
every method and seed; clean accuracy uses the whole test set):

- transfer (the paper's threat model): PGD on a surrogate of the same architecture trained
  separately (base network of seed 1000 + s), its adversarial images given to every model;
- white-box: PGD on each model itself, through the whole ensemble (loss −log p̄_y).

Compute is recorded in example passes (`train_examples`: one forward and backward pass of
one example, i.e. epochs × examples for the trained networks; FIP and FGE include the base
network's training; FIP counts every pass of its walk: the choice of the labels' weight
(its one-member walks and held-out evaluations), anchors, task and diversity batches, the
attacks that make its diversity inputs, the start's reference outputs and any BatchNorm
re-estimation).

Writes `config.json`, `results.json` (flat keys `"{experiment}/{method}/{measure}"`, e.g.
`"mnist/fip/transfer_pgd/accuracy/mean"`, `"mnist/deep/whitebox_pgd/accuracy/mean"`,
`"mnist/fip/train_examples"`; the experiment is the dataset for its default model, LeNet-300-100
on MNIST and VGG-11 on CIFAR-10, else `dataset_model`, e.g. `mnist_cnn5`; the attack settings
under `"{experiment}/attack/..."`), `member_vs_ensemble.png`, `layer_diversity.png`,
`weight_pca.png`, and the first FIP ensemble as a SavedModel in `serving/`. CIFAR-10 runs
on the local 4,000-image subset when the full set is missing and say so
(`"{experiment}/dataset/subset"`).

The measured figures, with their commands, are on the results page
(`docs/results.md`, from `results/robustness_lenet`).

The default command also runs FGE and snapshot ensembles on LeNet-300-100 and the
lighter plan on cnn5 (MNIST) and VGG-11 (CIFAR-10); their figures are in its
`results.json`. From an empty cache, the default command first trains 19 base networks
(15 LeNet-300-100, 2 cnn5, 2 VGG-11). `--fip_options` overrides `Ensemble`'s defaults
(a JSON object of its arguments, e.g. `'{"labels": 1.0}'`, with `"walk"` for `keras_fip.Walk`
fields other than the budget, batch size and seed, e.g. `'{"walk": {"distance": "kl"}}'`;
unset by default).

Example:

    python -m apps.robustness   # LeNet-300-100 (3 seeds) and cnn5 on MNIST, VGG-11 on CIFAR-10
    python -m apps.robustness --experiments=mnist/lenet_300_100 --methods=fip,deep,single

`--strategy=mirrored|multi_worker|tpu` trains the base networks, deep-ensemble members,
FGE and snapshot ensembles with `fit` and runs the FIP walk in that strategy; the ART
attacks and diagnostics run in the strategy's scope on one device (ART's gradient loop).
TensorBoard scalars (every figure per seed; the FIP walk's distance moved, output change
and losses per step) go to `<output_dir>/logs`.
"""

import json
import os
import time

import numpy as np
from absl import flags

import keras_fip
from apps import common
from keras_fip import baselines
from keras_fip import data
from keras_fip import models
from keras_fip import robustness
from keras_fip.core.copy import copy_model
from keras_fip.operations.ensemble import build_ensemble

METHODS = ("fip", "deep", "fge", "snapshot", "single")
ENSEMBLES = ("fip", "deep", "fge", "snapshot")
DEFAULT_EXPERIMENTS = ("mnist/lenet_300_100", "mnist/cnn5", "cifar10/vgg11")
DEFAULT_MODELS = {"mnist": "lenet_300_100", "cifar10": "vgg11", "digits": "mlp"}
# Per experiment: base epochs, model arguments, attack ε and step, FGE's α₁ (sized for a
# 2-core CPU; every one can be overridden by its flag).
SETTINGS = {
    "mnist": dict(base_epochs=5, epsilon=0.3, step=0.01, fge_learning_rate=0.05),
    "cifar10": dict(base_epochs=15, epsilon=8 / 255, step=2 / 255, fge_learning_rate=0.05),
    "digits": dict(base_epochs=10, epsilon=0.3, step=0.01, fge_learning_rate=0.02),
}
MODEL_ARGUMENTS = {"vgg11": {"width_multiplier": 0.25}, "vgg16": {"width_multiplier": 0.25}}
# Every experiment after the first (cnn5 and VGG-11 by default) runs lighter by default, so
# that the default command fits in an hour on 2 CPU cores: `--other_seeds`,
# `--other_num_members`, `--other_methods` and `--other_attack_examples` (the first
# experiment, LeNet-300-100 on MNIST, runs on `--seeds`, `--num_members`, `--methods` and
# `--attack_examples`). On a GPU host: `--other_seeds=0,1,2 --other_num_members=10
# --other_methods=fip,deep,fge,snapshot,single --other_attack_examples=500`.
OTHER_NUM_MEMBERS = 5
OTHER_METHODS = ("fip", "single")
OTHER_ATTACK_EXAMPLES = 200

# Experiments and methods (`methods`, `seeds` and `base_epochs` are shared with other apps:
# defined here only when no other app defined them).
flags.DEFINE_list("experiments", list(DEFAULT_EXPERIMENTS), "`dataset/model` pairs.")
# `--methods` (default: all of METHODS), `--seeds` and `--base_epochs` are apps.common's.
flags.DEFINE_list(
    "other_seeds",
    ["0"],
    "Seeds of every experiment after the first (cnn5 "
    "and VGG by default: sized for 2 cores); the first runs on --seeds.",
)
flags.DEFINE_integer(
    "num_members", 10, "K, members of every ensemble of the first experiment.", lower_bound=1
)
flags.DEFINE_integer(
    "other_num_members",
    OTHER_NUM_MEMBERS,
    "K of every experiment after the first (sized for 2 cores; 10 on a GPU host).",
    lower_bound=1,
)
flags.DEFINE_list(
    "other_methods",
    list(OTHER_METHODS),
    "Methods of every experiment after the first (a subset of --methods; all five on a GPU host).",
)

# Attack
flags.DEFINE_float(
    "pgd_epsilon", None, "L∞ radius ε (default 0.3 on MNIST, 8/255 on CIFAR-10).", lower_bound=0.0
)
flags.DEFINE_float(
    "pgd_step", None, "PGD step (default 0.01 on MNIST, 2/255 on CIFAR-10).", lower_bound=0.0
)
flags.DEFINE_integer("pgd_iterations", 40, "PGD iterations.", lower_bound=1)
flags.DEFINE_integer("pgd_restarts", 1, "Random starts (ART num_random_init).", lower_bound=0)
flags.DEFINE_integer(
    "attack_examples",
    500,
    "Size of the fixed, seeded test subset the attacks run on (first experiment).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "other_attack_examples",
    OTHER_ATTACK_EXAMPLES,
    "The attack subset of every experiment after the first (500 on a GPU host).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "attack_seed", 0, "Seed of the attack subset and random starts.", lower_bound=0
)

# Methods' settings
flags.DEFINE_float(
    "fip_member_fraction",
    0.04,
    "FIP steps between members, as a fraction "
    "of the single network's training steps (base epochs × N / batch): the "
    "walk's budget scales with the dataset and the recipe.",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "fip_steps_between",
    None,
    "FIP steps between members (overrides --fip_member_fraction).",
    lower_bound=1,
)
flags.DEFINE_string(
    "fip_options",
    None,
    "keras_fip.Ensemble keyword arguments that override the library's defaults, as JSON "
    '(e.g. \'{"labels": 1.0}\' or \'{"walk": {"distance": "kl"}}\'); unset: the '
    "defaults.",
)
flags.DEFINE_integer(
    "fge_cycle_epochs", 2, "FGE cycle length in epochs (authors: 2-4).", lower_bound=1
)
flags.DEFINE_float(
    "fge_learning_rate", None, "FGE α₁ (α₂ = α₁/100; default 0.05).", lower_bound=0.0
)
flags.DEFINE_integer("snapshot_cycle_epochs", 2, "Epochs per snapshot cycle.", lower_bound=1)
flags.DEFINE_float(
    "snapshot_learning_rate", 0.1, "Snapshot α₀ (authors: 0.1-0.2).", lower_bound=0.0
)
flags.DEFINE_integer(
    "diagnostic_examples", 256, "Test images for coherence and CKA.", lower_bound=2
)

FLAGS = flags.FLAGS
_RUN = {}  # {"run": common.Run} while main runs (strategy, cache, TensorBoard).


def _experiment(spec):
    if spec.count("/") != 1:
        raise ValueError(f"`--experiments` entries must be `dataset/model`. Received: {spec!r}")
    dataset, model = spec.split("/")
    common.check_choice(dataset, "experiments", sorted(SETTINGS))
    common.check_choice(model, "experiments", sorted(models.BUILDERS))
    name = dataset if DEFAULT_MODELS.get(dataset) == model else f"{dataset}_{model}"
    return name, dataset, model


def _flag_or(name, default):
    return default if FLAGS[name].value is None else FLAGS[name].value


def _base(model, dataset, seed, epochs):
    network, _ = (_RUN["run"].base_network if _RUN else models.base_network)(
        model,
        dataset,
        epochs=epochs,
        seed=seed,
        learning_rate=FLAGS.learning_rate,
        batch_size=128,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
        **MODEL_ARGUMENTS.get(model, {}),
    )
    return network


def fip_options():
    """The `Ensemble` arguments of `--fip_options` (a JSON object), validated.

    `"walk"` may hold `keras_fip.Walk` fields other than the budget, batch size and seed
    (the app sets those); `"diversity"` a `Diversity` config.
    """
    if not FLAGS.fip_options:
        return {}
    try:
        options = json.loads(FLAGS.fip_options)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"`--fip_options` must be a JSON object. Received: {FLAGS.fip_options!r} ({error})"
        ) from error
    reserved = {"num_members", "data", "name"}
    walk_reserved = {"steps", "epochs", "batch_size", "seed"}
    walk = options.get("walk", {}) if isinstance(options, dict) else None
    if (
        not isinstance(options, dict)
        or reserved & set(options)
        or not isinstance(walk, dict)
        or walk_reserved & set(walk)
    ):
        raise ValueError(
            "`--fip_options` must be a JSON object of keras_fip.Ensemble arguments other "
            f"than {sorted(reserved)}, with `walk` a JSON object of keras_fip.Walk fields "
            f"other than {sorted(walk_reserved)} (the app sets those). "
            f"Received: {FLAGS.fip_options!r}"
        )
    # Validates the arguments before any work.
    keras_fip.Ensemble(2, **{**options, "walk": keras_fip.Walk(**walk)})
    return options


def build_methods(methods, model, dataset, seed, epochs, x, y, settings, K):
    """Every method's K-member model for one seed; returns `(models, compute)`."""
    base = _base(model, dataset, seed, epochs)
    base_examples = epochs * len(x)
    built, compute = {}, {}
    for method in methods:
        common.set_seed(seed)
        start = time.perf_counter()
        if method == "single":
            built[method] = base
            compute[method] = {"train_examples": base_examples}
        elif method == "deep":
            members = [copy_model(_base(model, dataset, seed + k, epochs)) for k in range(K)]
            built[method] = build_ensemble(members, name="deep_ensemble")
            compute[method] = {"train_examples": K * base_examples}
        elif method == "fip":
            steps_between = FLAGS.fip_steps_between or max(
                1, round(FLAGS.fip_member_fraction * epochs * len(x) / FLAGS.batch_size)
            )
            # The library's defaults: only the data, the budget and the seed are given.
            walk = keras_fip.Walk(
                steps=K * steps_between,
                batch_size=FLAGS.batch_size,
                seed=seed,
                verbose=0,
                log_dir=_RUN["run"].log_dir(f"{dataset}_{model}/fip/seed_{seed}") if _RUN else None,
            )
            options = fip_options()
            walk = walk.replace(**options.pop("walk", {}))
            operation = keras_fip.Ensemble(K, data=(x, y), walk=walk, **options)
            built[method] = operation(base)
            compute[method] = {
                "train_examples": base_examples + operation.history["train_examples"],
                "labels": operation.history["labels"],
                "radius": operation.history["radius"],
            }
        elif method == "fge":
            alpha = settings["fge_learning_rate"]
            built[method], info = baselines.fast_geometric_ensemble(
                base,
                x,
                y,
                num_members=K,
                cycle_epochs=FLAGS.fge_cycle_epochs,
                learning_rates=(alpha, alpha / 100),
                batch_size=FLAGS.batch_size,
                seed=seed,
            )
            total = base_examples + info["train_examples"]
            compute[method] = {"train_examples": total}
        elif method == "snapshot":
            built[method], info = baselines.snapshot_ensemble(
                base,
                x,
                y,
                num_members=K,
                epochs=K * FLAGS.snapshot_cycle_epochs,
                learning_rate=FLAGS.snapshot_learning_rate,
                batch_size=FLAGS.batch_size,
                seed=seed,
            )
            compute[method] = {"train_examples": info["train_examples"]}
        compute[method]["build_seconds"] = time.perf_counter() - start
    return built, compute


def evaluate(built, surrogate, x_test, y_test, x_attack, y_attack, settings):
    """Clean, transfer and white-box accuracies and the diagnostics, per method."""
    attack = dict(
        epsilon=settings["epsilon"],
        step=settings["step"],
        iterations=FLAGS.pgd_iterations,
        restarts=FLAGS.pgd_restarts,
        seed=FLAGS.attack_seed,
    )
    transfer, adversarial = robustness.transfer_pgd_accuracy(
        surrogate, built, x_attack, y_attack, **attack
    )
    x_diagnostic = x_attack[: FLAGS.diagnostic_examples]
    y_diagnostic = y_attack[: FLAGS.diagnostic_examples]
    figures = {"surrogate/transfer_pgd/accuracy": transfer["surrogate"]}
    members_transfer, layer_diversity = {}, {}
    for method, network in built.items():
        start = time.perf_counter()
        key = f"{method}"
        figures[f"{key}/clean/accuracy"] = robustness.accuracy(network, x_test, y_test)
        figures[f"{key}/transfer_pgd/accuracy"] = transfer[method]
        figures[f"{key}/whitebox_pgd/accuracy"], _ = robustness.whitebox_pgd_accuracy(
            network, x_attack, y_attack, **attack
        )
        figures[f"{key}/coherence"] = robustness.gradient_coherence(
            network, surrogate, x_diagnostic, y_diagnostic
        )
        if method in ENSEMBLES:
            members = keras_fip.ensemble_members(network)
            members_transfer[method] = [
                robustness.accuracy(m, adversarial, y_attack) for m in members
            ]
            figures[f"{key}/member_transfer_pgd/accuracy"] = float(
                np.mean(members_transfer[method])
            )
            figures[f"{key}/member_coherence"] = float(
                np.mean(
                    [
                        robustness.gradient_coherence(m, surrogate, x_diagnostic, y_diagnostic)
                        for m in members
                    ]
                )
            )
            if len(members) > 1:
                distances = robustness.weight_distances(members)
                figures[f"{key}/weight_distance"] = distances["mean"]
                figures[f"{key}/relative_weight_distance"] = distances["relative_mean"]
                layer_diversity[method] = {
                    name: 1.0 - value
                    for name, value in robustness.layer_cka(members, x_diagnostic).items()
                }
                figures[f"{key}/cka_diversity"] = float(
                    np.mean(list(layer_diversity[method].values()))
                )
        figures[f"{key}/evaluate_seconds"] = time.perf_counter() - start
    return figures, members_transfer, layer_diversity


def run_experiment(spec, seeds, methods, num_members, attack_examples, output_dir):
    """All seeds of one experiment; returns `(name, results, plot data)`."""
    name, dataset, model = _experiment(spec)
    defaults = SETTINGS[dataset]
    epochs = (
        defaults["base_epochs"] if FLAGS["base_epochs"].using_default_value else FLAGS.base_epochs
    )
    settings = dict(
        epsilon=_flag_or("pgd_epsilon", defaults["epsilon"]),
        step=_flag_or("pgd_step", defaults["step"]),
        fge_learning_rate=_flag_or("fge_learning_rate", defaults["fge_learning_rate"]),
    )
    x, y = data.load(dataset, "train", FLAGS.data_dir)
    x_test, y_test = data.load(dataset, "test", FLAGS.data_dir)
    rows = np.sort(
        np.random.default_rng(FLAGS.attack_seed).choice(
            len(x_test), min(attack_examples, len(x_test)), replace=False
        )
    )
    x_attack, y_attack = x_test[rows], y_test[rows]
    per_seed, plots = [], {}
    for seed in seeds:
        start = time.perf_counter()
        built, compute = build_methods(
            methods, model, dataset, seed, epochs, x, y, settings, num_members
        )
        surrogate = _base(model, dataset, 1000 + seed, epochs)
        figures, members_transfer, layer_diversity = evaluate(
            built, surrogate, x_test, y_test, x_attack, y_attack, settings
        )
        for method, cost in compute.items():
            figures.update({f"{method}/{k}": v for k, v in cost.items()})
        per_seed.append(figures)
        if _RUN:  # TensorBoard: every figure of this seed (the step is the seed).
            _RUN["run"].scalars(figures, step=seed, prefix=name)
        print(
            f"{name} seed {seed}: "
            + ", ".join(
                f"{m} clean {figures[f'{m}/clean/accuracy']:.3f} transfer "
                f"{figures[f'{m}/transfer_pgd/accuracy']:.3f} white-box "
                f"{figures[f'{m}/whitebox_pgd/accuracy']:.3f}"
                for m in methods
            )
            + f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if seed == seeds[0]:
            plots = {
                "members_transfer": members_transfer,
                "layer_diversity": layer_diversity,
                "pca": {m: keras_fip.ensemble_members(built[m]) for m in built if m in ENSEMBLES},
                "transfer": {m: figures[f"{m}/transfer_pgd/accuracy"] for m in built},
            }
            if "fip" in built and not os.path.isdir(os.path.join(output_dir, "serving")):
                keras_fip.export(built["fip"], os.path.join(output_dir, "serving"))
    results = {
        f"{name}/dataset/subset": bool(data.info(dataset, FLAGS.data_dir)["subset"]),
        f"{name}/model": model,
        f"{name}/base_epochs": epochs,
        f"{name}/num_seeds": len(seeds),
        f"{name}/num_members": num_members,
        f"{name}/methods": list(methods),
    }
    results.update(
        {
            f"{name}/attack/{k}": v
            for k, v in robustness.attack_settings(
                settings["epsilon"], settings["step"], FLAGS.pgd_iterations, FLAGS.pgd_restarts
            ).items()
        }
    )
    results[f"{name}/attack/examples"] = len(rows)
    for key in per_seed[0]:
        values = np.array([figures[key] for figures in per_seed], dtype=float)
        if key.endswith("train_examples"):
            results[f"{name}/{key}"] = float(values.mean())
        else:
            results[f"{name}/{key}/mean"] = float(values.mean())
            results[f"{name}/{key}/std"] = float(values.std())
    _comparisons(results, name, methods)
    return name, results, plots


def _comparisons(results, name, methods):
    """The acceptance margins: FIP against the single network and the deep ensemble."""

    def get(method, measure):
        return results.get(f"{name}/{method}/{measure}")

    if "fip" not in methods:
        return
    for other in ("single", "deep"):
        if other in methods:
            for attack in ("transfer_pgd", "whitebox_pgd", "clean"):
                results[f"{name}/fip/{attack}/margin_over_{other}"] = get(
                    "fip", f"{attack}/accuracy/mean"
                ) - get(other, f"{attack}/accuracy/mean")
    if "deep" in methods:
        results[f"{name}/fip/train_examples/fraction_of_deep"] = get("fip", "train_examples") / get(
            "deep", "train_examples"
        )


def plot(all_plots, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(all_plots)
    # Member vs ensemble adversarial (transfer) accuracy.
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        members = all_plots[name]["members_transfer"]
        for index, (method, values) in enumerate(members.items()):
            axis.scatter(
                [index] * len(values),
                values,
                color="grey",
                s=12,
                label="members" if index == 0 else None,
            )
            axis.scatter(
                [index],
                [all_plots[name]["transfer"][method]],
                color="red",
                marker="*",
                s=120,
                label="ensemble" if index == 0 else None,
            )
        axis.set_xticks(range(len(members)), list(members))
        axis.set_ylabel("transfer PGD accuracy")
        axis.set_title(name)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "member_vs_ensemble.png"), dpi=120)
    plt.close(figure)

    # Diversity per layer: 1 − mean pairwise linear CKA.
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        for method, per_layer in all_plots[name]["layer_diversity"].items():
            axis.plot(range(len(per_layer)), list(per_layer.values()), marker="o", label=method)
            axis.set_xticks(
                range(len(per_layer)), list(per_layer), rotation=45, fontsize=7, ha="right"
            )
        axis.set_ylabel("1 − linear CKA")
        axis.set_title(name)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "layer_diversity.png"), dpi=120)
    plt.close(figure)

    # Weight-space PCA of the ensembles' members (Fig. 4).
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        groups = all_plots[name]["pca"]
        if sum(len(v) for v in groups.values()) >= 2:
            coordinates, explained = robustness.weight_pca(groups)
            for method, points in coordinates.items():
                axis.scatter(points[:, 0], points[:, 1], label=method, s=18)
            axis.set_xlabel(f"PC1 ({100 * explained[0]:.0f}%)")
            axis.set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)" if len(explained) > 1 else "PC2")
        axis.set_title(f"{name}: member weights")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "weight_pca.png"), dpi=120)
    plt.close(figure)


def experiment_plans():
    """What each experiment runs, from the flags (validated before any work).

    The first experiment runs on `--seeds`, `--methods`, `--num_members` and
    `--attack_examples`; every later one on `--other_seeds`, the methods in both
    `--methods` and `--other_methods`, `--other_num_members` and `--other_attack_examples`.

    Returns:
        A list of `(spec, seeds, methods, num_members, attack_examples)`.
    """
    methods = list(FLAGS.methods or METHODS)
    methods = [common.check_choice(m, "methods", METHODS) for m in methods]
    experiments = list(FLAGS.experiments)
    for spec in experiments:
        _experiment(spec)  # Validate every entry before any work.
    for m in FLAGS.other_methods:
        common.check_choice(m, "other_methods", METHODS)
    fip_options()
    other_methods = [m for m in methods if m in FLAGS.other_methods]
    if len(experiments) > 1 and not other_methods:
        raise ValueError(
            "`--other_methods` (the methods of every experiment after the first) shares no "
            f"method with `--methods`. Received: methods={methods}, "
            f"other_methods={list(FLAGS.other_methods)}"
        )
    seeds = [int(s) for s in FLAGS.seeds]
    other_seeds = [int(s) for s in FLAGS.other_seeds]
    return [
        (spec, seeds, methods, FLAGS.num_members, FLAGS.attack_examples)
        if index == 0
        else (
            spec,
            other_seeds,
            other_methods,
            FLAGS.other_num_members,
            FLAGS.other_attack_examples,
        )
        for index, spec in enumerate(experiments)
    ]


METHOD_NAMES = {
    "fip": "FIP ensemble (Ensemble defaults)",
    "deep": "deep ensemble",
    "fge": "fast geometric ensemble",
    "snapshot": "snapshot ensemble",
    "single": "single network",
}


def summary_page(results, methods, experiments):
    """The results page's `summary.json`: clean and attacked accuracy and compute per
    method, one table per experiment."""

    def cell(key):
        if f"{key}/mean" not in results:
            return None
        return f"{100 * results[f'{key}/mean']:.2f} ± {100 * results[f'{key}/std']:.2f}"

    tables = []
    for name in experiments:
        epsilon = results.get(f"{name}/attack/epsilon")
        rows = []
        for method in methods:
            passes = results.get(f"{name}/{method}/train_examples")
            rows.append(
                [
                    METHOD_NAMES.get(method, method),
                    cell(f"{name}/{method}/clean/accuracy"),
                    cell(f"{name}/{method}/transfer_pgd/accuracy"),
                    cell(f"{name}/{method}/whitebox_pgd/accuracy"),
                    None if passes is None else int(passes),
                ]
            )
        tables.append(
            {
                "caption": f"{name}: test accuracy (%), L∞ PGD at ε {epsilon:g}",
                "columns": ["method", "clean", "transfer PGD", "white-box PGD", "example passes"],
                "rows": rows,
                "headline": [0],
            }
        )
    return {
        "title": "Ensemble: robustness of ensembles along one FIP",
        "description": (
            "Every ensemble from the same trained network; transfer PGD is computed on a "
            "separately trained surrogate, white-box PGD on the ensemble's averaged "
            "probabilities. Mean ± std over seeds."
        ),
        "tables": tables,
    }


def main(argv):
    del argv  # Unused.
    plans = experiment_plans()
    methods = plans[0][2]
    run = common.start("robustness")
    _RUN["run"] = run
    try:
        with run.scope():
            _main(plans, methods, run.output_dir)
    finally:
        _RUN.clear()
        run.close()


def _main(plans, methods, output_dir):
    start = time.perf_counter()
    results, all_plots = {}, {}
    config = common.flag_values(
        (
            "experiments",
            "seeds",
            "other_seeds",
            "num_members",
            "other_num_members",
            "other_methods",
            "base_epochs",
            "batch_size",
            "pgd_epsilon",
            "pgd_step",
            "pgd_iterations",
            "pgd_restarts",
            "attack_examples",
            "other_attack_examples",
            "attack_seed",
            "fip_member_fraction",
            "fip_steps_between",
            "fip_options",
            "fge_cycle_epochs",
            "fge_learning_rate",
            "snapshot_cycle_epochs",
            "snapshot_learning_rate",
            "diagnostic_examples",
            "strategy",
            "tpu",
        )
    )
    config["methods"] = methods
    common.write_json(output_dir, "config.json", config)
    for plan in plans:
        experiment_start = time.perf_counter()
        name, figures, plots = run_experiment(*plan, output_dir)
        results.update(figures)
        results[f"{name}/wall_time_seconds"] = time.perf_counter() - experiment_start
        all_plots[name] = plots
        results["wall_time_seconds"] = time.perf_counter() - start
        # Written after each experiment, so a long run keeps what it has measured.
        common.write_json(output_dir, "results.json", results)
        common.write_json(output_dir, "summary.json", summary_page(results, methods, all_plots))
    plot(all_plots, output_dir)
    print(f"\n{'':>22}" + "".join(f"{m:>11}" for m in methods))
    for name in all_plots:
        for measure in ("clean", "transfer_pgd", "whitebox_pgd"):
            cells = "".join(
                f"{100 * results[f'{name}/{m}/{measure}/accuracy/mean']:>11.2f}"
                if f"{name}/{m}/{measure}/accuracy/mean" in results
                else f"{'-':>11}"
                for m in methods
            )
            print(f"{name + ' ' + measure:>22}{cells}")
    print(f"wall time {results['wall_time_seconds']:.0f} s -> {output_dir}")


if __name__ == "__main__":
    common.run(
        main,
        shared=(
            "data_dir",
            "epochs",
            "batch_size",
            "learning_rate",
            "seed",
            "seeds",
            "base_epochs",
            "methods",
            "cache_dir",
        ),
    )
