r"""Sparsify a network with keras_fip.Compress and the baselines, side by side (Fig. 3B/C, F/G).

Every method starts from the same trained base network (one per seed, cached) and gets the
same epoch budget on the same training data:

- `fip`: `keras_fip.Compress` (pull along a FIP towards the sparse projection, then settle);
- `gradual`: gradual magnitude pruning with tfmot's PolynomialDecay schedule, native Keras 3
  (`--gradual_scope=global` by default: one ranking over all layers, the stronger baseline at
  high sparsity; `per_layer` is tfmot's own behaviour);
- `oneshot`: one-shot magnitude pruning, then fine-tuning with the mask fixed;
- `lth`: iterative magnitude pruning with rewinding (lottery ticket), `--lth_rounds` rounds;
- `tfmot`: the real tfmot (`prune_low_magnitude`, per layer) in a separate tf_keras process,
  to cross-check the native gradual baseline (needs the `baselines` extra).

Writes `results.json` (per method and sparsity: mean and std of test accuracy over seeds,
measured sparsity, epochs, wall time; keys like `"fip/99.1/test/accuracy"`), `config.json`,
`accuracy_vs_sparsity.png`, `layer_sparsity.png`, and the sparsest FIP model as a SavedModel
in `serving/`.

Example (LeNet-300-100 on MNIST, the paper's setting):

    python -m apps.compress --sparsities=90,95,98,99.1,99.4 \
        --methods=fip,gradual,oneshot,lth --seeds=0,1,2 --epochs=10

ResNet-20 on CIFAR-10 (on machines without the full set this uses the local subset and says
so in `results.json`): `--model=resnet20 --dataset=cifar10`. On a GPU/TPU host add
`--strategy=mirrored` (or `tpu`) and a larger `--batch_size`.
"""

import os
import time

import numpy as np
from absl import app
from absl import flags

import keras_fip
from apps import common
from keras_fip import baselines
from keras_fip import data
from keras_fip import models
from keras_fip.engine import projection
from keras_fip.operations.compress import Compress

METHODS = ("fip", "gradual", "oneshot", "lth", "tfmot")

# Sweep
flags.DEFINE_list("sparsities", ["90", "95", "98", "99.1", "99.4"],
                  "Target sparsities, in percent of the prunable weights.")
flags.DEFINE_list("methods", ["fip", "gradual", "oneshot", "lth"],
                  f"Methods among {list(METHODS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each trains its own base network.")

# Method settings
flags.DEFINE_float("prune_learning_rate", 3e-3, "Initial Adam learning rate of every "
                   "method (cosine-decayed over its budget).", lower_bound=0.0)
flags.DEFINE_integer("base_epochs", 10, "Epochs of the base network.", lower_bound=1)
flags.DEFINE_enum("gradual_scope", "global", ["global", "per_layer"],
                  "Scope of the native gradual baseline.")
flags.DEFINE_integer("lth_rounds", 3, "Pruning rounds of the lottery-ticket baseline.",
                     lower_bound=1)
flags.DEFINE_enum("fip_structure", "unstructured", list(projection.STRUCTURES),
                  "Structure of the FIP masks.")

FLAGS = flags.FLAGS


def _percent_list(values):
    try:
        percents = [float(v) for v in values]
    except ValueError as error:
        raise ValueError(f"`--sparsities` must be numbers. Received: {values}") from error
    for p in percents:
        projection.check_sparsity(p / 100.0, "sparsities")
    return percents


def prune(method, base, sparsity, x, y, x_test, y_test, epochs, batch_size, learning_rate,
          seed):
    """Runs one method; returns `(model, extras)` where extras may hold per-layer figures."""
    if method == "fip":
        op = Compress(sparsity, data=(x, y), structure=FLAGS.fip_structure, epochs=epochs,
                      batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                      verbose=0)
        return op(base), {"layer_sparsity": op.history["layer_sparsity"]}
    common_args = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
    if method == "gradual":
        return baselines.gradual_magnitude_pruning(base, sparsity, x, y,
                                                   scope=FLAGS.gradual_scope,
                                                   **common_args), {}
    if method == "oneshot":
        return baselines.one_shot_magnitude_pruning(base, sparsity, x, y, **common_args), {}
    if method == "lth":
        return baselines.lottery_ticket(base, sparsity, x, y, rounds=FLAGS.lth_rounds,
                                        **common_args), {}
    if method == "tfmot":
        pruned, _ = baselines.tfmot_gradual_pruning(base, sparsity, x, y, x_test, y_test,
                                                    seed=seed, **common_args)
        return pruned, {}
    raise ValueError(f"`--methods` must be among {list(METHODS)}. Received: {method!r}")


def _layer_sparsity(model):
    return {v.path: float(np.mean(v.numpy() == 0)) for v in
            projection.prunable_variables(model)}


def sweep(methods, percents, seeds, epochs, batch_size, learning_rate, strategy):
    """Runs every (method, sparsity, seed); returns `(results, layer_figures, sparsest)`."""
    info = data.info(FLAGS.dataset, FLAGS.data_dir)
    x, y = data.load(FLAGS.dataset, "train", FLAGS.data_dir)
    x_test, y_test = data.load(FLAGS.dataset, "test", FLAGS.data_dir)
    runs, layer_figures, sparsest = {}, {}, None
    for seed in seeds:
        base, base_results = models.base_network(
            FLAGS.model, FLAGS.dataset, epochs=FLAGS.base_epochs, seed=seed,
            data_dir=FLAGS.data_dir, cache_dir=FLAGS.cache_dir, strategy=strategy)
        runs.setdefault("base", {}).setdefault(0.0, []).append(
            (base_results["test/accuracy"], 0.0, base_results["train/wall_time_seconds"]))
        for method in methods:
            for percent in percents:
                common.set_seed(seed)
                start = time.perf_counter()
                with strategy.scope():
                    pruned, extras = prune(method, base, percent / 100.0, x, y, x_test,
                                           y_test, epochs, batch_size, learning_rate, seed)
                seconds = time.perf_counter() - start
                accuracy = models.evaluate_classifier(pruned, x_test, y_test)["accuracy"]
                measured = projection.prunable_sparsity(pruned)
                runs.setdefault(method, {}).setdefault(percent, []).append(
                    (accuracy, measured, seconds))
                layer_figures.setdefault(method, {})[percent] = _layer_sparsity(pruned)
                print(f"seed {seed} {method:>8} {percent:>5}%: test accuracy {accuracy:.4f} "
                      f"(sparsity {measured:.4f}, {seconds:.0f} s)", flush=True)
                if method == "fip" and (sparsest is None or percent >= sparsest[0]):
                    sparsest = (percent, pruned)
    results = {"dataset/subset": bool(info["subset"]), "epochs": epochs}
    for method, by_percent in runs.items():
        for percent, values in by_percent.items():
            accuracies, measured, seconds = (np.array(v) for v in zip(*values))
            key = f"{method}/{percent:g}"
            results[f"{key}/test/accuracy"] = float(accuracies.mean())
            results[f"{key}/test/accuracy_std"] = float(accuracies.std())
            results[f"{key}/sparsity"] = float(measured.mean())
            results[f"{key}/wall_time_seconds"] = float(seconds.mean())
            results[f"{key}/epochs"] = epochs if method != "base" else FLAGS.base_epochs
            results[f"{key}/num_seeds"] = len(accuracies)
    return results, layer_figures, sparsest


def plot(results, layer_figures, methods, percents, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method in methods:
        means = [results[f"{method}/{p:g}/test/accuracy"] for p in percents]
        stds = [results[f"{method}/{p:g}/test/accuracy_std"] for p in percents]
        axis.errorbar(percents, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.set_xlabel("sparsity (% of prunable weights)")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{FLAGS.model} on {FLAGS.dataset}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "accuracy_vs_sparsity.png"), dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.5),
                                squeeze=False)
    for axis, method in zip(axes[0], methods):
        for percent in percents:
            per_layer = layer_figures[method][percent]
            axis.plot(range(len(per_layer)), list(per_layer.values()), marker="o",
                      label=f"{percent:g}%")
            axis.set_xticks(range(len(per_layer)), list(per_layer), rotation=45,
                            fontsize=7, ha="right")
        axis.set_title(method)
        axis.set_ylabel("layer sparsity")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "layer_sparsity.png"), dpi=120)
    plt.close(figure)


def main(argv):
    del argv  # Unused.
    percents = _percent_list(FLAGS.sparsities)
    methods = [common.check_choice(m, "methods", METHODS) for m in FLAGS.methods]
    seeds = [int(s) for s in FLAGS.seeds]
    output_dir = common.output_dir("compress")
    strategy = common.get_strategy(FLAGS.strategy)
    start = time.perf_counter()
    results, layer_figures, sparsest = sweep(methods, percents, seeds, FLAGS.epochs,
                                             FLAGS.batch_size, FLAGS.prune_learning_rate,
                                             strategy)
    results["wall_time_seconds"] = time.perf_counter() - start
    config = common.flag_values(("model", "dataset", "epochs", "batch_size", "sparsities",
                                 "methods", "seeds", "prune_learning_rate", "base_epochs",
                                 "gradual_scope", "lth_rounds", "fip_structure", "strategy"))
    common.write_json(output_dir, "config.json", config)
    common.write_json(output_dir, "results.json", results)
    plot(results, layer_figures, methods, percents, output_dir)
    if sparsest is not None:
        keras_fip.export(sparsest[1], os.path.join(output_dir, "serving"))
    print(f"\n{'sparsity':>9}" + "".join(f"{m:>16}" for m in methods))
    for percent in percents:
        cells = "".join(
            f"{results[f'{m}/{percent:g}/test/accuracy']:>10.4f}±"
            f"{results[f'{m}/{percent:g}/test/accuracy_std']:<5.3f}" for m in methods)
        print(f"{percent:>8g}%{cells}")
    print(f"wall time {results['wall_time_seconds']:.0f} s -> {output_dir}")


if __name__ == "__main__":
    app.run(main)
