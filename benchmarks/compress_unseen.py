"""Compress with default arguments on small nets it was never tuned on, against magnitude pruning.

Builds BatchNorm conv nets on scikit-learn's bundled digits (8×8): a 3×3 stem convolution
with `width` filters, BatchNorm, ReLU, then a 3×3 BatchNorm conv block, added back to the stem
(`residual24`, `residual48`: a narrow and a wider one) or not (`plain24`), global
average pooling, Dense 64, logits; `stem24` has no block (one convolution: an underfit net,
~78%, kept as the known weak case, not in the default list). 20% of the digits training split
(stratified, seeded) is held out as a validation split that no method trains on. Trains each
net on the rest, then sparsifies it with `keras_fip.Compress(sparsity, data=(x, y))` —
default arguments, so the walk's `Penalty(learning_rate="auto")` (`--compress_learning_rates`
adds runs at other rates, reported as `fip_lr<r>`, never chosen by the benchmark) and
`labels="auto"`: the labels' weight chosen on a fifth held out of `(x, y)` (`--task_weights`
adds runs at given weights, as `fip_task<w>`; 0 is the walk on the inputs alone) — and
with one-shot and gradual magnitude pruning (global scope, the same layer-collapse
protection) fine-tuned with labels for the same number of steps Compress took
(`op.history["steps"]`), each at the learning rate that does best on the validation split
(as their authors tune them): the grid `--learning_rates` (1e-4 to 1e-2), extended by the
grid's own spacing while a rate at its edge is the best alone, up to 0.1
(`keras_fip.core.tuning.grid_search`; a single rate is used as given), so the chosen rate
is never
cut off by the grid's edge. Prints one JSON line per net and seed with the test
accuracies (360 images: one image is 0.28 pp, hence several seeds), then one summary line per
net with the mean ± std over seeds and the margins of the means. `--folds=5 --seeds=0,1,2,3,4`
tests on all 1,797 digits instead (five stratified folds, each seed trains on the other
four), which resolves differences of a few images that the 360-image split cannot.
The default run is one net (`residual24`) and one seed, a check of a few minutes; the
comparison runs every net on several seeds (`--nets=residual24,residual48,plain24
--seeds=0,1,2`).
`--compress_options='{"name": {...}}'` adds Compress runs with other keyword arguments
(`"walk"`, `"schedule"`, `"saliency"`: objects of those classes' arguments; `fip_<name>`,
reported beside `fip`, never chosen by the benchmark), and
`--finetuned_reference` the dense network trained on the labels for the same budget without
pruning (`finetuned`, its rate chosen on validation like the baselines'): what gradual
pruning's labelled training gives on its own — on the digits it lifts the dense network
above its own test accuracy, which a walk that keeps the dense function cannot reach
without the labels (`--task_weights=auto,0`).
`--dataset=mnist8` runs the same nets on MNIST brought to the digits' format (the central
24×24 of each image, where the digit is, averaged over 3×3 blocks, as the digits were
made by counting 4×4 blocks of 32×32 bitmaps): `--train_size` training images (stratified,
seeded; 12,000 by default) and all
10,000 test images, so one image is 0.01 pp.

Example:

    python -m benchmarks.compress_unseen                  # residual24, seed 0: a quick check
    python -m benchmarks.compress_unseen --nets=residual24,residual48,plain24 \
        --seeds=0,1,2                                     # 3 nets x 3 seeds, ~30 min on 2 cores
    python -m benchmarks.compress_unseen --nets=residual24 --sparsities=0.5,0.8,0.9 --seeds=0
    python -m benchmarks.compress_unseen --nets=residual24 --folds=5 --seeds=0,1,2,3,4 \
        --task_weights=auto,0                             # every digit tested once
    python -m benchmarks.compress_unseen --nets=residual24 --dataset=mnist8  # 10,000 tests
"""

import argparse
import json
import math
import time

import keras
import numpy as np

import keras_fip
from keras_fip import baselines

NETS = {
    "residual24": {"width": 24, "residual": True},
    "residual48": {"width": 48, "residual": True},
    "plain24": {"width": 24, "residual": False},
    "stem24": {"width": 24, "residual": False, "block": False},
}
BASELINE_LEARNING_RATES = (1e-4, 1e-3, 3e-3, 1e-2)
MAX_LEARNING_RATE = 0.1


def conv_net(width=24, residual=True, block=True, seed=0):
    """The digits conv net of the benchmark: a BatchNorm stem, then (with `block`) a 3×3
    BatchNorm conv block, added back to the stem when `residual`."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    stem = layers.Conv2D(width, 3, padding="same", name="stem")(inputs)
    stem = layers.ReLU()(layers.BatchNormalization()(stem))
    hidden = stem
    if block:
        branch = layers.Conv2D(width, 3, padding="same", name="block")(stem)
        branch = layers.BatchNormalization()(branch)
        hidden = layers.ReLU()(layers.Add()([stem, branch]) if residual else branch)
    hidden = layers.GlobalAveragePooling2D()(hidden)
    hidden = layers.Dense(64, activation="relu")(hidden)
    outputs = layers.Dense(10, name="logits")(hidden)
    suffix = ("_res" if residual else "_plain") if block else "_stem"
    return keras.Model(inputs, outputs, name=f"digits_conv{width}{suffix}")


def _accuracy(model, x, y):
    return keras_fip.models.evaluate_classifier(model, x, y)["accuracy"]


def _layer_sparsity(model):
    variables = keras_fip.core.projection.prunable_variables(model)
    return {v.path: round(float(np.mean(v.numpy() == 0)), 3) for v in variables}


def _mnist8(train_size, seed):
    """MNIST in the digits' format: 8×8 images in [0, 1], each pixel the mean of a 3×3
    block of the central 24×24 (MNIST centres each digit in a 20×20 box); `train_size`
    stratified, seeded training images and the whole test set."""
    from sklearn.model_selection import train_test_split

    def shrink(images):
        centre = images[:, 2:26, 2:26, 0]
        blocks = centre.reshape(len(images), 8, 3, 8, 3).mean(axis=(2, 4))
        return blocks[..., None].astype("float32")

    x, y = keras_fip.data.load("mnist", "train")
    x_test, y_test = keras_fip.data.load("mnist", "test")
    if train_size < len(x):
        x, _, y, _ = train_test_split(x, y, train_size=train_size, stratify=y, random_state=seed)
    return shrink(x), y, shrink(x_test), y_test


def _split(seed, validation_fraction=0.2, folds=0, dataset="digits", train_size=12000):
    """`(x, y), (x_val, y_val), (x_test, y_test)`: the training data less a stratified,
    seeded validation split, and the test data: with `folds` = 0 the official digits
    split (360 test images, so one image is 0.28 pp); with `folds` = K the whole 1,797
    digits in K stratified folds (fixed shuffle), fold `seed mod K` the test set — K seeds
    then test on every image once. `dataset="mnist8"`: MNIST in the digits' format
    (`_mnist8`), its 10,000 test images."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.model_selection import train_test_split

    if dataset == "mnist8":
        x, y, x_test, y_test = _mnist8(train_size, seed)
    else:
        x, y = keras_fip.data.load("digits", "train")
        x_test, y_test = keras_fip.data.load("digits", "test")
    if folds:
        x, y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y))
        train_rows, test_rows = splits[seed % folds]
        x, y, x_test, y_test = x[train_rows], y[train_rows], x[test_rows], y[test_rows]
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=validation_fraction, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def _parse_learning_rate(text):
    """A Compress learning rate (or task weight) from the command line: `auto` or a
    number."""
    return "auto" if text.strip() == "auto" else float(text)


def _variants(compress_learning_rates, task_weights):
    """`(name, learning_rate, task_weight)` of every Compress run: the first of each list
    is `fip`; a further rate adds `_lr<r>` to the name, a further task weight `_task<w>`
    (`fip_task1`, `fip_lr0.01`, `fip_lr0.01_task1`)."""
    variants = []
    for learning_rate in compress_learning_rates:
        for task_weight in task_weights:
            name = "fip"
            if learning_rate != compress_learning_rates[0]:
                name += (
                    f"_lr{learning_rate}"
                    if isinstance(learning_rate, str)
                    else f"_lr{learning_rate:g}"
                )
            if task_weight != task_weights[0]:
                name += (
                    f"_task{task_weight}"
                    if isinstance(task_weight, str)
                    else f"_task{task_weight:g}"
                )
            variants.append((name, learning_rate, task_weight))
    return variants


def _runs(compress_learning_rates, task_weights, options=None):
    """`(name, Compress keyword arguments)` of every Compress run: the `_variants` grid
    (the rate as the walk's `Penalty` rule, the task weight as `labels`), then one
    `fip_<name>` run per entry of `options` (a name -> keyword-arguments dict; Compress's
    defaults for everything else)."""
    runs = []
    for name, learning_rate, task_weight in _variants(compress_learning_rates, task_weights):
        kwargs = {"labels": task_weight}
        if learning_rate != "auto":
            kwargs["walk"] = {"rule": keras_fip.rules.Penalty(learning_rate)}
        runs.append((name, kwargs))
    return runs + [(f"fip_{name}", dict(kwargs)) for name, kwargs in (options or {}).items()]


def _compress(sparsity, data, steps, seed, kwargs):
    """A `keras_fip.Compress` with `kwargs` (its own arguments, and `"walk"`: a dict of
    `keras_fip.Walk` arguments) on `data`, walked `steps` steps (or its own budget) with
    `seed`."""
    kwargs = dict(kwargs)
    walk = {"steps": steps, "seed": seed, "verbose": 0, **(kwargs.pop("walk", None) or {})}
    return keras_fip.Compress(sparsity, data=data, walk=keras_fip.Walk(**walk), **kwargs)


def _parse_options(text):
    """`--compress_options`: a JSON object, name -> Compress keyword arguments (`"walk"`:
    an object of `keras_fip.Walk` arguments; `"schedule"`, `"saliency"`, `"prunable"`:
    objects of their arguments)."""
    options = json.loads(text) if text else {}
    if not isinstance(options, dict) or not all(
        isinstance(kwargs, dict) for kwargs in options.values()
    ):
        raise ValueError(f"expected a JSON object of objects. Received: {text}")
    for kwargs in options.values():
        _compress(0.5, None, None, None, kwargs)  # Bad arguments fail before any training.
    return options


def _finetuned(model, sparsity, x, y, epochs, batch_size, learning_rate):
    """The reference `--finetuned_reference` adds: the dense network itself (a copy, not
    pruned) trained on the labels for the baselines' budget, as they are. What it gains over
    the dense network is what the labels and the extra training give, whatever the pruning."""
    del sparsity
    tuned = keras_fip.engine.copy_model(model)
    keras_fip.models.train_classifier(tuned, x, y, epochs, batch_size, learning_rate)
    return tuned


def run_net(
    name,
    sparsities,
    base_epochs,
    seed,
    steps=None,
    learning_rates=BASELINE_LEARNING_RATES,
    task_weights=("auto",),
    folds=0,
    dataset="digits",
    train_size=12000,
    compress_learning_rates=("auto",),
    compress_options=None,
    finetuned_reference=False,
):
    runs = _runs(compress_learning_rates, task_weights, compress_options)
    (x, y), (x_val, y_val), (x_test, y_test) = _split(
        seed, folds=folds, dataset=dataset, train_size=train_size
    )
    model = conv_net(**NETS[name], seed=seed)
    keras_fip.models.train_classifier(
        model, x, y, epochs=base_epochs, batch_size=64, learning_rate=3e-3
    )
    result = {
        "benchmark": "compress_unseen",
        "net": name,
        "seed": seed,
        "dataset": dataset,
        "dense/test/accuracy": round(_accuracy(model, x_test, y_test), 4),
    }
    for sparsity in sparsities:
        key = f"{sparsity * 100:g}"
        for fip, kwargs in runs:
            start = time.perf_counter()
            # The labels' weight: chosen by Compress ("auto"), unless given.
            operation = _compress(sparsity, (x, y), steps, seed, kwargs)
            compressed = operation(model)
            result[f"{fip}/{key}/seconds"] = round(time.perf_counter() - start, 1)
            result[f"{fip}/{key}/test/accuracy"] = round(_accuracy(compressed, x_test, y_test), 4)
            result[f"{fip}/{key}/validation/accuracy"] = round(
                _accuracy(compressed, x_val, y_val), 4
            )
            result[f"{fip}/{key}/learning_rate"] = round(operation.history["learning_rate"], 6)
            result[f"{fip}/{key}/steps"] = operation.history["steps"]
            result[f"{fip}/{key}/layer_sparsity"] = _layer_sparsity(compressed)
        epochs = math.ceil(operation.history["steps"] / math.ceil(len(x) / 128))
        references = [
            ("oneshot", baselines.one_shot_magnitude_pruning),
            ("gradual", baselines.gradual_magnitude_pruning),
        ]
        if finetuned_reference:
            references.append(("finetuned", _finetuned))
        for label, method in references:
            test = {}

            def score(
                learning_rate,
                label=label,
                method=method,
                sparsity=sparsity,
                epochs=epochs,
                test=test,
            ):
                keras.utils.set_random_seed(seed)
                kwargs = {"scope": "global"} if label == "gradual" else {}
                pruned = method(
                    model,
                    sparsity,
                    x,
                    y,
                    epochs=epochs,
                    batch_size=128,
                    learning_rate=learning_rate,
                    **kwargs,
                )
                test[learning_rate] = _accuracy(pruned, x_test, y_test)
                return _accuracy(pruned, x_val, y_val)

            # The rate chosen on the validation split, the grid extended past a winning edge.
            best, validation = keras_fip.core.tuning.grid_search(
                score, learning_rates, high=MAX_LEARNING_RATE
            )
            if not validation:  # One rate: used as given.
                validation = {best: score(best)}
            result[f"{label}/{key}/test/accuracy"] = round(test[best], 4)
            result[f"{label}/{key}/validation/accuracy"] = round(validation[best], 4)
            result[f"{label}/{key}/learning_rate"] = best
        best_baseline = max(
            result[f"oneshot/{key}/test/accuracy"], result[f"gradual/{key}/test/accuracy"]
        )
        for fip, _ in runs:
            accuracy = result[f"{fip}/{key}/test/accuracy"]
            result[f"{fip}/{key}/gap_to_dense"] = round(result["dense/test/accuracy"] - accuracy, 4)
            result[f"{fip}/{key}/margin_over_best_baseline"] = round(accuracy - best_baseline, 4)
    return result


def summarize(
    name,
    results,
    sparsities,
    task_weights=("auto",),
    compress_learning_rates=("auto",),
    compress_options=None,
):
    """Mean ± std over seeds of every method's test accuracy, and the margins of the means."""
    summary = {
        "benchmark": "compress_unseen",
        "net": name,
        "summary": True,
        "seeds": [r["seed"] for r in results],
    }
    fips = [fip for fip, _ in _runs(compress_learning_rates, task_weights, compress_options)]
    methods = fips + [
        m
        for m in ("oneshot", "gradual", "finetuned")
        if f"{m}/{sparsities[0] * 100:g}/test/accuracy" in results[0]
    ]
    keys = ["dense/test/accuracy"] + [
        f"{method}/{sparsity * 100:g}/{split}/accuracy"
        for sparsity in sparsities
        for method in methods
        for split in ("test", "validation")
    ]
    for key in keys:
        values = [r[key] for r in results]
        summary[f"{key}/mean"] = round(float(np.mean(values)), 4)
        summary[f"{key}/std"] = round(float(np.std(values)), 4)
    for sparsity in sparsities:
        key = f"{sparsity * 100:g}"
        best_baseline = max(
            summary[f"oneshot/{key}/test/accuracy/mean"],
            summary[f"gradual/{key}/test/accuracy/mean"],
        )
        for fip in fips:
            accuracy = summary[f"{fip}/{key}/test/accuracy/mean"]
            summary[f"{fip}/{key}/gap_to_dense"] = round(
                summary["dense/test/accuracy/mean"] - accuracy, 4
            )
            summary[f"{fip}/{key}/margin_over_best_baseline"] = round(accuracy - best_baseline, 4)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nets",
        default="residual24",
        help=f"Comma-separated, from {sorted(NETS)}.",
    )
    parser.add_argument("--sparsities", default="0.8")
    parser.add_argument(
        "--base_epochs",
        type=int,
        default=40,
        help="Base training epochs (BatchNorm moving statistics need ~40 "
        "epochs of 23 steps to settle with Keras' momentum 0.99).",
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--steps", type=int, default=None, help="The walk's `steps` (default: Compress's budget)."
    )
    parser.add_argument(
        "--task_weights",
        default="auto",
        help="Comma-separated Compress `labels` values (`auto`, its "
        "default, or numbers), each its own run: the first reported as `fip`, "
        "the others as `fip_task<w>` (0: inputs only; > 0 adds the labels' "
        "cross-entropy).",
    )
    parser.add_argument(
        "--compress_learning_rates",
        default="auto",
        help="Comma-separated learning rates of Compress's walk (`auto`, its "
        "default, or numbers), each its own run with every task weight: "
        "the first reported as `fip`, the others as `fip_lr<r>`. Not tuned: "
        "the first is the one the comparison is about.",
    )
    parser.add_argument(
        "--compress_options",
        default="",
        help="JSON object, name -> Compress keyword arguments: one more run "
        "per entry, reported as `fip_<name>` (e.g. "
        '\'{"pull0.5": {"schedule": {"pull_fraction": 0.5}}}\'). Not chosen by the '
        "benchmark: `fip` (the defaults) is the one the comparison is about.",
    )
    parser.add_argument(
        "--finetuned_reference",
        action="store_true",
        help="Also report `finetuned`: the dense network trained on the labels "
        "for the same budget without pruning (its rate chosen on validation "
        "as the baselines' are): what the extra labelled training alone gives.",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=0,
        help="0: the official digits test split (360 images); K >= 2: K "
        "stratified folds of all 1,797 digits, seed k tests on fold k mod K "
        "(seeds 0..K-1 test on every image once).",
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=("digits", "mnist8"),
        help="digits: scikit-learn's 8x8 digits; mnist8: MNIST padded to "
        "32x32 and averaged over 4x4 blocks (10,000 test images).",
    )
    parser.add_argument(
        "--train_size",
        type=int,
        default=12000,
        help="mnist8: training images (stratified, seeded).",
    )
    parser.add_argument(
        "--learning_rates",
        default=",".join(str(r) for r in BASELINE_LEARNING_RATES),
        help="Baseline fine-tuning learning rates; with two or more, extended "
        "by factors of 3 (up to 0.1) while the largest is the best on "
        "validation; the best is reported.",
    )
    args = parser.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    learning_rates = [float(r) for r in args.learning_rates.split(",")]
    try:
        task_weights = [_parse_learning_rate(w) for w in args.task_weights.split(",")]
    except ValueError:
        parser.error(f"--task_weights: `auto` or numbers. Received: {args.task_weights}")
    try:
        compress_learning_rates = [
            _parse_learning_rate(r) for r in args.compress_learning_rates.split(",")
        ]
    except ValueError:
        parser.error(
            "--compress_learning_rates: `auto` or numbers. Received: "
            f"{args.compress_learning_rates}"
        )
    try:
        compress_options = _parse_options(args.compress_options)
    except (TypeError, ValueError) as error:
        parser.error(f"--compress_options: {error}")
    if args.dataset == "mnist8" and args.folds:
        parser.error("--folds applies to --dataset=digits only (mnist8 has 10,000 tests).")
    if args.folds == 1 or args.folds < 0:
        parser.error(f"--folds must be 0 or at least 2. Received: {args.folds}")
    for name in args.nets.split(","):
        if name not in NETS:
            parser.error(f"--nets: unknown net {name!r}; choose from {sorted(NETS)}")
        results = []
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(
                run_net(
                    name,
                    sparsities,
                    args.base_epochs,
                    seed,
                    args.steps,
                    learning_rates,
                    task_weights,
                    args.folds,
                    args.dataset,
                    args.train_size,
                    compress_learning_rates,
                    compress_options,
                    args.finetuned_reference,
                )
            )
            print(json.dumps(results[-1]), flush=True)
        print(
            json.dumps(
                summarize(
                    name,
                    results,
                    sparsities,
                    task_weights,
                    compress_learning_rates,
                    compress_options,
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
