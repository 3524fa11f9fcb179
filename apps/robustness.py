r"""Robust ensembles under an expert's evaluation: the FIP ensemble beside adversarial training.

For each experiment (`dataset/model`: MNIST with the small conv net `convnet` of
`benchmarks.robust_ensembles`, two 5×5 convolutions of 16 and 32 filters, pooling, dense
128; and LeNet-300-100) and seed s, every method trains on the same `--train_size`
examples (a stratified, seeded subset of the training set):

- `standard`: the network trained on clean data (`keras_fip.models.train_classifier`,
  `--epochs`, `--learning_rate`);
- `deep`: K = `--num_members` standard networks from seeds s, …, s+K−1 (a deep ensemble);
- `pgd_at`: PGD adversarial training (`keras_fip.baselines.pgd_adversarial_training`,
  Madry et al.) at ε = `--train_epsilon` with `--attack_steps` steps, ε rising from 0
  over the first `--epsilon_warmup` of the steps;
- `pgd_at_ensemble`: K PGD-AT networks (`keras_fip.baselines.pgd_adversarial_ensemble`);
- `fgsm_at`: fast FGSM adversarial training from a random start
  (`keras_fip.baselines.fgsm_adversarial_training`, Wong et al.);
- `trs`: a TRS ensemble of K members (`keras_fip.baselines.trs_ensemble`, Yang et al.:
  input gradients misaligned between members and kept small), trained for the epochs that
  bring its compute to the PGD-AT ensemble's;
- `fip`: the FIP ensemble walked as an adversarially trained ensemble, from the
  `standard` network: `keras_fip.Ensemble(K, data=(x, y), labels=False,
  diversity=Diversity(weight=300, adversary="ensemble", attack_steps=2, radius_ramp=0.5,
  examples=6000), walk=keras_fip.Walk(steps=240, seed=s))`
  (`FIP_ARGUMENTS`, `FIP_DIVERSITY`): in every step of the walk, PGD from a random start
  at ρ = 0.3 (rising from 0 over the first half of the walk) against the members so
  far and the moving network, each member trained on those inputs with weight λ while
  the walk's distance keeps its clean outputs; the rest at the library's defaults
  (`--fip_steps` > 0 sets the walk's steps).

Compute (`train_examples`) counts example passes (one forward and backward pass of one
example) as `keras_fip.Ensemble`'s `history["train_examples"]` counts them: every pass of
training and of the attacks made during training; the FIP ensemble's includes its start's
training. `{method}/train_examples/fraction_of_pgd_at_ensemble` compares each to the
PGD-AT ensemble's.

Every model is evaluated by `keras_fip.robustness.evaluate` on `--attack_examples` test
images (a seeded subset, the same for every method and seed) at each ε of `--epsilons`
under `--attacks`: white-box PGD and AutoAttack (APGD-CE, APGD-DLR, Square; ART) on the
whole ensemble as ONE model (the mean of its members' probabilities), the adaptive margin
attack on the ensemble's own decision and on all members at once, and transfer PGD from an
independent surrogate (a standard network of seed 1000 + s). `worst_case` is the accuracy
on the images that survive every white-box attack. With `--sanity`,
`keras_fip.robustness.sanity_checks` runs on `--sanity_examples` of them (accuracy not
rising with ε, near 0 at ε = 0.5, more steps never helping, Square not stronger than the
gradient attacks). Clean accuracy is on the whole test set.

The defaults are sized to finish in about 45 minutes on 2 CPU cores: one seed,
`--train_size` 6,000 examples, `--epochs` 5, K = 3, PGD-AT with 5 steps, attacks with 20
steps, one restart and 300 Square queries on 200 images, sanity checks on 100. On a GPU
host, the evaluation a reviewer expects is

    python -m apps.robustness --seeds=0,1,2 --train_size=60000 --epochs=20 \
        --attack_steps=10 --attack_examples=1000 --steps=100 --restarts=5 \
        --square_queries=5000 --sanity_examples=500

Writes `config.json`, `results.json` (flat keys `"{experiment}/{method}/{measure}"`, e.g.
`"mnist/fip/autoattack/0.3/mean"`, `"mnist/pgd_at/worst_case/0.1/std"`,
`"mnist/trs/train_examples"`, `"mnist/fip/sanity/passed"`; the experiment is `mnist` for
the conv net and `mnist_lenet_300_100` for LeNet), `evaluations.json` (every evaluation
record, with every attack's parameters, and every sanity check), `summary.json` (the
results page's tables and plots), `robust_vs_epsilon.png` (robust accuracy against ε per
method and attack) and `robust_vs_compute.png` (worst-case robust accuracy against
example passes), with `provenance.json` beside the results.

Example:

    python -m apps.robustness
    python -m apps.robustness --experiments=mnist/convnet --methods=fip,pgd_at_ensemble
"""

import time

import keras
import numpy as np
from absl import flags

import keras_fip
from apps import common
from benchmarks.robust_ensembles import convnet
from keras_fip import baselines
from keras_fip import robustness
from keras_fip.baselines.trs_ensemble import ATTACK_STEPS as TRS_ATTACK_STEPS
from keras_fip.baselines.trs_ensemble import PASSES_PER_MEMBER as TRS_PASSES_PER_MEMBER
from keras_fip.core import tuning
from keras_fip.operations.ensemble import Diversity
from keras_fip.operations.ensemble import build_ensemble

METHODS = ("standard", "deep", "pgd_at", "pgd_at_ensemble", "fgsm_at", "trs", "fip")
DEFAULT_EXPERIMENTS = ("mnist/convnet", "mnist/lenet_300_100")
ARCHITECTURES = ("convnet", "lenet_300_100", "mlp")
ATTACKS = ("pgd", "autoattack", "adaptive", "transfer")
# Seed offset of the transfer attack's surrogate (a standard network trained apart).
SURROGATE_SEED = 1000
# The FIP ensemble's named configuration (the arguments it needs beyond model, data, budget
# and seed): each member adversarially trained against the whole ensemble in every step.
FIP_DIVERSITY = {
    "weight": 300.0,
    "adversary": "ensemble",
    "attack_steps": 2,
    "radius_ramp": 0.5,
    "examples": 6000,
}
FIP_ARGUMENTS = {"labels": False}
FIP_STEPS = 240
# The app's defaults of the shared flags, sized for 2 CPU cores (see the docstring).
DEFAULTS = {"seeds": ["0"], "epochs": 5, "learning_rate": 1e-3, "batch_size": 128}

# Experiments and data
flags.DEFINE_list("experiments", list(DEFAULT_EXPERIMENTS), "`dataset/model` pairs.")
flags.DEFINE_integer(
    "train_size", 6000, "Training examples (stratified, seeded; 0: all).", lower_bound=0
)
flags.DEFINE_integer("num_members", 3, "K, the members of every ensemble.", lower_bound=2)

# Adversarial training
flags.DEFINE_float("train_epsilon", 0.3, "ε of the adversarial training.", lower_bound=0.0)
flags.DEFINE_integer("attack_steps", 5, "PGD steps of PGD-AT.", lower_bound=1)
flags.DEFINE_float(
    "epsilon_warmup", 0.5, "Fraction of the steps over which ε rises from 0.", lower_bound=0.0
)
flags.DEFINE_integer("fip_steps", 0, "Steps of the FIP walk (0: FIP_STEPS).", lower_bound=0)

# Evaluation
flags.DEFINE_list("epsilons", ["0.1", "0.2", "0.3"], "L∞ radii of the evaluation.")
flags.DEFINE_list("attacks", list(ATTACKS), "Attacks (keras_fip.robustness.evaluate).")
flags.DEFINE_integer("attack_examples", 200, "Test images attacked.", lower_bound=1)
flags.DEFINE_integer("attack_seed", 0, "Seed of the attacked images.", lower_bound=0)
flags.DEFINE_integer("steps", 20, "Steps of PGD, APGD and the adaptive attack.", lower_bound=1)
flags.DEFINE_integer("restarts", 1, "Random restarts of every attack.", lower_bound=0)
flags.DEFINE_integer("square_queries", 300, "Square's queries.", lower_bound=1)
flags.DEFINE_bool("sanity", True, "Run keras_fip.robustness.sanity_checks on every method.")
flags.DEFINE_integer("sanity_examples", 100, "Images of the sanity checks.", lower_bound=1)

FLAGS = flags.FLAGS
METHOD_NAMES = {
    "standard": "standard network",
    "deep": "deep ensemble",
    "pgd_at": "PGD-AT",
    "pgd_at_ensemble": "PGD-AT ensemble",
    "fgsm_at": "FGSM-AT",
    "trs": "TRS ensemble",
    "fip": "FIP ensemble (per-step PGD against the ensemble)",
}


def _experiment(spec):
    if spec.count("/") != 1:
        raise ValueError(f"`--experiments` entries must be `dataset/model`. Received: {spec!r}")
    dataset, model = spec.split("/")
    common.check_choice(dataset, "experiments", ["mnist", "digits"])
    common.check_choice(model, "experiments", ARCHITECTURES)
    return (dataset if model in ("convnet", "mlp") else f"{dataset}_{model}"), dataset, model


def _architecture(model, input_shape):
    if model == "convnet":
        return convnet(input_shape)
    if model == "mlp":
        return keras_fip.models.mlp(32, input_shape=input_shape)
    return keras_fip.models.lenet_300_100(input_shape=input_shape)


def _standard(architecture, x, y, seed):
    keras.utils.set_random_seed(seed)
    network = keras.models.clone_model(architecture)
    keras_fip.models.train_classifier(
        network,
        x,
        y,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
    )
    return network


def build(method, architecture, x, y, seed, standard, reference_passes):
    """`(model, info)`: one method's model and its compute (`info["train_examples"]`)."""
    K, epochs, N = FLAGS.num_members, FLAGS.epochs, len(y)
    common_arguments = dict(
        epochs=epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate, seed=seed
    )
    attack = dict(epsilon=FLAGS.train_epsilon, epsilon_warmup=FLAGS.epsilon_warmup)
    if method == "standard":
        return standard, {"train_examples": epochs * N}
    if method == "deep":
        members = [standard] + [_standard(architecture, x, y, seed + k) for k in range(1, K)]
        return build_ensemble(members, name="deep_ensemble"), {"train_examples": K * epochs * N}
    if method == "pgd_at":
        return baselines.pgd_adversarial_training(
            architecture, x, y, attack_steps=FLAGS.attack_steps, **attack, **common_arguments
        )
    if method == "pgd_at_ensemble":
        return baselines.pgd_adversarial_ensemble(
            architecture,
            x,
            y,
            num_members=K,
            attack_steps=FLAGS.attack_steps,
            **attack,
            **common_arguments,
        )
    if method == "fgsm_at":
        return baselines.fgsm_adversarial_training(architecture, x, y, **attack, **common_arguments)
    if method == "trs":
        # The epochs that bring its compute to the PGD-AT ensemble's.
        per_epoch = K * N * (TRS_PASSES_PER_MEMBER + TRS_ATTACK_STEPS)
        common_arguments["epochs"] = max(1, round(reference_passes / per_epoch))
        return baselines.trs_ensemble(architecture, x, y, num_members=K, **common_arguments)
    walk = keras_fip.Walk(steps=FLAGS.fip_steps or FIP_STEPS, seed=seed, verbose=0)
    operation = keras_fip.Ensemble(
        K, data=(x, y), diversity=Diversity(**FIP_DIVERSITY), walk=walk, **FIP_ARGUMENTS
    )
    ensemble = operation(standard)
    return ensemble, {
        "train_examples": epochs * N + operation.history["train_examples"],
        "walk_examples": operation.history["train_examples"],
        "labels": operation.history.get("labels"),
    }


def _data(dataset, seed):
    x, y = keras_fip.data.load(dataset, "train", FLAGS.data_dir)
    x_test, y_test = keras_fip.data.load(dataset, "test", FLAGS.data_dir)
    if FLAGS.train_size and FLAGS.train_size < len(y):
        rows = tuning.validation_rows(y, FLAGS.train_size / len(y), seed)[1]
        x, y = x[rows], y[rows]
    return np.asarray(x, "float32"), np.asarray(y), x_test, y_test


def run_seed(spec, seed, methods, epsilons):
    """Every method of one experiment and seed: `(figures, records)`."""
    _, dataset, model = _experiment(spec)
    x, y, x_test, y_test = _data(dataset, seed)
    rows = np.sort(
        np.random.default_rng(FLAGS.attack_seed).choice(
            len(y_test), min(FLAGS.attack_examples, len(y_test)), replace=False
        )
    )
    x_attack, y_attack = x_test[rows], y_test[rows]
    architecture = _architecture(model, x.shape[1:])
    standard = _standard(architecture, x, y, seed)
    surrogate = _standard(architecture, x, y, SURROGATE_SEED + seed)
    # The PGD-AT ensemble's compute, the budget the TRS ensemble is given.
    reference = FLAGS.num_members * FLAGS.epochs * len(y) * (FLAGS.attack_steps + 1)
    figures, records = {}, {}
    for method in methods:
        common.set_seed(seed)
        start = time.perf_counter()
        network, info = build(method, architecture, x, y, seed, standard, reference)
        figures[f"{method}/build_seconds"] = time.perf_counter() - start
        figures[f"{method}/train_examples"] = info["train_examples"]
        start = time.perf_counter()
        record = robustness.evaluate(
            network,
            x_attack,
            y_attack,
            epsilons=epsilons,
            attacks=FLAGS.attacks,
            surrogate=surrogate if "transfer" in FLAGS.attacks else None,
            steps=FLAGS.steps,
            restarts=FLAGS.restarts,
            square_queries=FLAGS.square_queries,
            seed=FLAGS.attack_seed,
        )
        figures[f"{method}/clean/accuracy"] = robustness.accuracy(network, x_test, y_test)
        for result in record["results"]:
            figures[f"{method}/{result['attack']}/{result['epsilon']:g}"] = result[
                "robust_accuracy"
            ]
        for worst in record["worst_case"]:
            figures[f"{method}/worst_case/{worst['epsilon']:g}"] = worst["robust_accuracy"]
        if FLAGS.sanity:
            checks = robustness.sanity_checks(
                network,
                x_attack[: FLAGS.sanity_examples],
                y_attack[: FLAGS.sanity_examples],
                epsilons=sorted(epsilons),
                steps=(max(1, FLAGS.steps // 4), FLAGS.steps),
                square_queries=FLAGS.square_queries,
                seed=FLAGS.attack_seed,
            )
            figures[f"{method}/sanity/passed"] = float(checks["passed"])
            record["sanity_checks"] = checks
        figures[f"{method}/evaluate_seconds"] = time.perf_counter() - start
        record["compute"] = info
        records[method] = record
        print(
            f"{spec} seed {seed} {method}: clean {figures[f'{method}/clean/accuracy']:.3f}, "
            + ", ".join(
                f"worst ε={e:g} {figures.get(f'{method}/worst_case/{e:g}', float('nan')):.3f}"
                for e in epsilons
            )
            + f", {info['train_examples']:,} passes",
            flush=True,
        )
    return figures, records


def aggregate(name, per_seed, methods):
    """Mean and std over seeds of every figure; the compute fractions; sanity over seeds."""
    results = {}
    for key in per_seed[0]:
        values = np.array([figures[key] for figures in per_seed], dtype=float)
        if key.endswith("train_examples"):
            results[f"{name}/{key}"] = float(values.mean())
        elif key.endswith("sanity/passed"):
            results[f"{name}/{key}"] = bool(values.min() == 1.0)
        else:
            results[f"{name}/{key}/mean"] = float(values.mean())
            results[f"{name}/{key}/std"] = float(values.std())
    reference = results.get(f"{name}/pgd_at_ensemble/train_examples")
    if reference:
        for method in methods:
            results[f"{name}/{method}/train_examples/fraction_of_pgd_at_ensemble"] = (
                results[f"{name}/{method}/train_examples"] / reference
            )
    return results


def _epsilons():
    try:
        epsilons = sorted(float(e) for e in FLAGS.epsilons)
    except ValueError as error:
        raise ValueError(f"`--epsilons` must be numbers. Received: {FLAGS.epsilons}") from error
    if not epsilons or min(epsilons) <= 0:
        raise ValueError(f"`--epsilons` must be positive. Received: {FLAGS.epsilons}")
    return epsilons


def plans():
    """`(experiments, methods, seeds, epsilons)` from the flags, validated before any work."""
    methods = [common.check_choice(m, "methods", METHODS) for m in (FLAGS.methods or METHODS)]
    for attack in FLAGS.attacks:
        common.check_choice(attack, "attacks", ATTACKS)
    for spec in FLAGS.experiments:
        _experiment(spec)
    return list(FLAGS.experiments), methods, [int(s) for s in FLAGS.seeds], _epsilons()


def _series(results, name, method, measure, epsilons):
    points = [[0.0, results.get(f"{name}/{method}/clean/accuracy/mean")]]
    points += [[e, results.get(f"{name}/{method}/{measure}/{e:g}/mean")] for e in epsilons]
    return [p for p in points if p[1] is not None]


def plot(results, names, methods, epsilons, output_dir):
    """Robust accuracy against ε (per attack) and against compute (per ε)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [a for a in FLAGS.attacks] + ["worst_case"]
    figure, axes = plt.subplots(
        len(names), len(measures), figsize=(3.2 * len(measures), 3.0 * len(names)), squeeze=False
    )
    for row, name in zip(axes, names):
        for axis, measure in zip(row, measures):
            for method in methods:
                points = _series(results, name, method, measure, epsilons)
                if points:
                    axis.plot(*zip(*points), marker="o", label=METHOD_NAMES[method])
            axis.set_title(f"{name}: {measure}", fontsize=9)
            axis.set_xlabel("ε (L∞)")
            axis.set_ylabel("robust accuracy")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/robust_vs_epsilon.png", dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        for epsilon, marker in zip(epsilons, "osd^v"):
            for index, method in enumerate(methods):
                passes = results.get(f"{name}/{method}/train_examples")
                value = results.get(f"{name}/{method}/worst_case/{epsilon:g}/mean")
                if passes is None or value is None:
                    continue
                axis.scatter(
                    passes,
                    value,
                    color=f"C{index}",
                    marker=marker,
                    label=METHOD_NAMES[method] if epsilon == epsilons[0] else None,
                )
                if method == methods[-1]:
                    axis.annotate(f"ε={epsilon:g}", (passes, value), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("example passes (train_examples)")
        axis.set_ylabel("worst-case robust accuracy")
        axis.set_title(f"{name}: markers o/s/d = ε {', '.join(f'{e:g}' for e in epsilons)}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/robust_vs_compute.png", dpi=110)
    plt.close(figure)


def summary_page(results, names, methods, epsilons):
    """The results page's `summary.json`: one table and two plots per experiment."""

    def cell(key):
        if f"{key}/mean" not in results:
            return None
        return f"{100 * results[f'{key}/mean']:.1f} ± {100 * results[f'{key}/std']:.1f}"

    tables, plots = [], []
    for name in names:
        columns = ["method", "clean"]
        columns += [f"AA {e:g}" for e in epsilons] + [f"worst {e:g}" for e in epsilons]
        columns += [f"transfer {epsilons[-1]:g}", "passes", "× PGD-AT ens.", "sanity"]
        rows = []
        for method in methods:
            key = f"{name}/{method}"
            fraction = results.get(f"{key}/train_examples/fraction_of_pgd_at_ensemble")
            rows.append(
                [METHOD_NAMES[method], cell(f"{key}/clean/accuracy")]
                + [cell(f"{key}/autoattack/{e:g}") for e in epsilons]
                + [cell(f"{key}/worst_case/{e:g}") for e in epsilons]
                + [
                    cell(f"{key}/transfer/{epsilons[-1]:g}"),
                    int(results[f"{key}/train_examples"]),
                    None if fraction is None else round(fraction, 2),
                    results.get(f"{key}/sanity/passed"),
                ]
            )
        seeds = results[f"{name}/num_seeds"]
        tables.append(
            {
                "caption": f"{name}: test accuracy (%) under L∞ attacks, mean ± std over "
                f"{seeds} seed(s); AA = AutoAttack, worst = every white-box attack",
                "columns": columns,
                "rows": rows,
                # The README shows the FIP row of the first experiment.
                "headline": [methods.index("fip")] if "fip" in methods and not tables else [],
            }
        )
        plots.append(
            {
                "title": f"{name}: worst-case robust accuracy against ε",
                "xlabel": "ε (L∞)",
                "ylabel": "robust accuracy",
                "series": {
                    METHOD_NAMES[m]: _series(results, name, m, "worst_case", epsilons)
                    for m in methods
                },
            }
        )
    return {
        "title": "Robust ensembles: the FIP ensemble beside adversarial training",
        "description": (
            "White-box PGD, AutoAttack and an adaptive attack on the whole ensemble (the "
            "mean of its members' probabilities) and transfer PGD from an independent "
            "surrogate, `keras_fip.robustness.evaluate`; compute in example passes."
        ),
        "tables": tables,
        "plots": plots,
    }


def main(argv):
    del argv  # Unused.
    names_methods = plans()
    run = common.start(
        "robustness",
        unsupported={"every method": "adversarial training and ART attacks run on one device"},
    )
    try:
        _main(*names_methods, run.output_dir)
    finally:
        run.close()


def _main(experiments, methods, seeds, epsilons, output_dir):
    start = time.perf_counter()
    config = common.flag_values(
        (
            "experiments",
            "seeds",
            "train_size",
            "epochs",
            "batch_size",
            "learning_rate",
            "num_members",
            "train_epsilon",
            "attack_steps",
            "epsilon_warmup",
            "fip_steps",
            "epsilons",
            "attacks",
            "attack_examples",
            "attack_seed",
            "steps",
            "restarts",
            "square_queries",
            "sanity",
            "sanity_examples",
        )
    )
    config["methods"] = methods
    common.write_json(output_dir, "config.json", config)
    results, evaluations, names = {}, {}, []
    for spec in experiments:
        name, _, model = _experiment(spec)
        names.append(name)
        experiment_start = time.perf_counter()
        per_seed = []
        for seed in seeds:
            figures, records = run_seed(spec, seed, methods, epsilons)
            per_seed.append(figures)
            evaluations[f"{name}/seed_{seed}"] = records
        results.update(aggregate(name, per_seed, methods))
        results.update(
            {
                f"{name}/model": model,
                f"{name}/num_seeds": len(seeds),
                f"{name}/methods": methods,
                f"{name}/wall_time_seconds": time.perf_counter() - experiment_start,
            }
        )
        results["wall_time_seconds"] = time.perf_counter() - start
        # Written after each experiment, so a long run keeps what it has measured.
        common.write_json(output_dir, "results.json", results)
        common.write_json(output_dir, "evaluations.json", evaluations)
        common.write_json(
            output_dir, "summary.json", summary_page(results, names, methods, epsilons)
        )
    plot(results, names, methods, epsilons, output_dir)
    print(f"wall time {results['wall_time_seconds']:.0f} s -> {output_dir}")


if __name__ == "__main__":
    common.run(
        main,
        shared=("data_dir", "epochs", "batch_size", "learning_rate", "seeds", "methods"),
        defaults=DEFAULTS,
    )
