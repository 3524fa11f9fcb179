"""ContinualLearn with default arguments on users' models, against the continual baselines.

Each seed takes a model written and trained as the Keras docs write and train it
(`benchmarks.user_models.trained`), then learns a second task with the output layer grown
by its classes (`head="append"`), every method with its library defaults, given only the
model, the data and the budget (`--epochs`, the same for every method):

- `text_transformer`: the keras.io text transformer (custom `TokenAndPositionEmbedding` and
  `TransformerBlock` layers, softmax output) trained on SST-2, then CR (its labels become
  outputs 2 and 3). CR has no official split: the user models' seeded 90/10 split.
- `mnist_convnet`: the keras.io MNIST convnet (softmax output) trained on MNIST, then
  Fashion-MNIST (outputs 10..19). Fashion-MNIST is the partial set on disk
  (`user_models.fashion_mnist_data()`: the first 8,517 training and 6,978 test images).

The memory is `--memory` class-balanced old-task training inputs (seeded): ContinualLearn
keeps its outputs on them, replay and A-GEM replay them with their labels, EWC computes its
Fisher on the old task's training inputs and chooses λ on the old task's validation data
(SST-2's validation split; for the convnet, which trained on all 60,000 MNIST training
images, the last 1,000 of them) with the new task's held-out split. Methods: `fip`
(`keras_fip.ContinualLearn`), `finetune`, `ewc`, `replay`, `agem`, `lwf`, `joint`
(`keras_fip.baselines`; joint training on both tasks' full data is the ceiling of
class-incremental accuracy).

Every run prints one JSON line: the old task's test accuracy before (`old_start`) and after,
read on the old outputs only (`old_own`, task-incremental) and by argmax over all outputs
(`old_all`, class-incremental), the new task's on its own outputs (`new_own`) and over all
outputs (`new_all`), the new task read by the untouched old head (`new_untouched`: CR's
labels mean what SST-2's do) and its majority class (`new_majority`). A summary table
follows: mean, min and max over seeds, and each method's new-task accuracy against
fine-tuning's. `--options='{"name": {"method": "fip", ...}}'` adds runs of a method with
other arguments (fields of `keras_fip.Walk` such as `beta` or `batch_size` go to its walk,
`learning_rate` to ContinualLearn's `Penalty` rule; reported as `name`, never chosen by the
benchmark). With `--output_dir`, writes `results.json`, `provenance.json` and
`summary.json` (the results page's table) there.

Example:

    python -m benchmarks.continual_users --seeds=0,1,2           # text transformer, ~10 min
    python -m benchmarks.continual_users --methods=fip,finetune --output_dir=results/continual_users
    python -m benchmarks.continual_users --models=mnist_convnet --seeds=0,1,2
    python -m benchmarks.continual_users --methods=fip \
        --options='{"fip_lr3e-4": {"method": "fip", "learning_rate": 3e-4}}'
"""

import argparse
import inspect
import json
import time

import numpy as np

import keras_fip
from apps import provenance
from benchmarks import user_models
from keras_fip import baselines
from keras_fip import data as data_lib

MODELS = ("text_transformer", "mnist_convnet")
METHODS = ("fip", "finetune", "ewc", "replay", "agem", "lwf", "joint")
DEFAULT_METHODS = ("fip", "finetune", "ewc", "replay")
TASKS = {"text_transformer": ("SST-2", "CR"), "mnist_convnet": ("MNIST", "Fashion-MNIST")}
# `--options` keys that are the walk's (budget, batch size, β, ...).
WALK_FIELDS = tuple(inspect.signature(keras_fip.Walk).parameters)


def _predictions(model, x, batch_size=500):
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def tasks(name, seed, base_epochs=None, train_size=None, new_train_size=None):
    """`(model, old, new)`: the trained model (`base_epochs` on `train_size` MNIST images;
    `None`: as the Keras example trains it) and the two tasks' train and test splits (the
    new task's training split a seeded subset of `new_train_size`; `None`: all of it)."""
    model, data = user_models.trained(name, seed, epochs=base_epochs, train_size=train_size)
    old = {"x": data["x"], "y": data["y"], "x_test": data["x_test"], "y_test": data["y_test"]}
    if name == "text_transformer":
        old.update(x_val=data["x_val"], y_val=data["y_val"])
    else:  # The convnet trained on all 60,000: its validation images are training images.
        old.update(x_val=data["x"][-1000:], y_val=data["y"][-1000:])
    if name == "text_transformer":
        new = {
            "x": data["cr_x"],
            "y": data["cr_y"],
            "x_test": data["cr_x_test"],
            "y_test": data["cr_y_test"],
        }
    else:
        new = user_models.fashion_mnist_data()
    if new_train_size and new_train_size < len(new["y"]):
        rows = np.sort(np.random.default_rng(seed).permutation(len(new["y"]))[:new_train_size])
        new = dict(new, x=new["x"][rows], y=new["y"][rows])
    return model, old, new


def build(method, old, new, memory, seed, epochs, options):
    """The operation of `method` with its defaults (and `options`, for the extra runs:
    fields of `keras_fip.Walk` go to the walk, `learning_rate` to ContinualLearn's
    `Penalty` rule, the rest to the constructor)."""
    task = (new["x"], new["y"])
    options = dict(options)
    walk_options = {key: options.pop(key) for key in list(options) if key in WALK_FIELDS}
    if method == "fip" and "learning_rate" in options:
        learning_rate = options.pop("learning_rate")
        walk_options["rule"] = keras_fip.rules.Penalty(learning_rate=learning_rate)
    walk = keras_fip.Walk(epochs=epochs, seed=seed, verbose=0, **walk_options)
    common = dict(walk=walk, **options)
    if method == "fip":
        return keras_fip.ContinualLearn(task, memory=memory[0], **common)
    if method == "finetune":
        return baselines.FineTune(task, **common)
    if method == "ewc":
        validation = [(old["x_val"], old["y_val"])]
        return baselines.EWC(task, fisher_data=old["x"], validation_tasks=validation, **common)
    if method == "replay":
        return baselines.ExperienceReplay(task, memory=memory, **common)
    if method == "agem":
        return baselines.AGEM(task, memory=memory, **common)
    if method == "lwf":
        return baselines.LwF(task, **common)
    if method == "joint":
        return baselines.JointTraining(task, old_tasks=[(old["x"], old["y"])], **common)
    raise ValueError(f"`method` must be one of {list(METHODS)}. Received: method={method!r}")


def measure(model, learned, old, new):
    """Old and new task accuracies of `learned` (grown by the new task's classes)."""
    classes = int(model.output_shape[-1])
    old_outputs = _predictions(learned, old["x_test"])
    new_outputs = _predictions(learned, new["x_test"])
    return {
        "old_own": float(np.mean(old_outputs[:, :classes].argmax(-1) == old["y_test"])),
        "old_all": float(np.mean(old_outputs.argmax(-1) == old["y_test"])),
        "new_own": float(np.mean(new_outputs[:, classes:].argmax(-1) == new["y_test"])),
        "new_all": float(np.mean(new_outputs.argmax(-1) == new["y_test"] + classes)),
    }


def run(
    name,
    seed,
    methods,
    memory_size,
    epochs,
    extra,
    base_epochs=None,
    train_size=None,
    new_train_size=None,
):
    model, old, new = tasks(name, seed, base_epochs, train_size, new_train_size)
    memory = data_lib.memory_sample(old["x"], old["y"], memory_size, seed=seed)
    base = {
        "benchmark": "continual_users",
        "model": name,
        "seed": seed,
        "old_task": TASKS[name][0],
        "new_task": TASKS[name][1],
        "old_start": user_models.accuracy(model, old["x_test"], old["y_test"]),
        "new_untouched": (
            float(np.mean(_predictions(model, new["x_test"]).argmax(-1) == new["y_test"]))
            if name == "text_transformer"
            else None
        ),
        "new_majority": float(np.max(np.bincount(new["y_test"])) / len(new["y_test"])),
        "memory": memory_size,
        "epochs": epochs,
    }
    runs = [(method, method, {}) for method in methods]
    runs += [(label, spec["method"], spec) for label, spec in extra.items()]
    for label, method, spec in runs:
        options = {k: v for k, v in spec.items() if k != "method"}
        op = build(method, old, new, memory, seed, epochs, options)
        start = time.perf_counter()
        learned = op(model)
        seconds = time.perf_counter() - start
        history = op.history or {}
        chosen = {
            key: history[key]
            for key in ("beta", "lambda", "learning_rate", "steps")
            if key in history and np.isscalar(history[key])
        }
        result = dict(base, method=label, options=options, seconds=seconds, **chosen)
        result.update(measure(model, learned, old, new))
        print(json.dumps(result), flush=True)
        yield result


def summary(results):
    """One row per model and method: mean, min and max over seeds."""
    keys = ("old_own", "old_all", "new_own", "new_all")
    rows = []
    for name in dict.fromkeys(r["model"] for r in results):
        mine = [r for r in results if r["model"] == name]
        finetune = [r["new_own"] for r in mine if r["method"] == "finetune"]
        start = [r["old_start"] for r in mine if r["method"] == mine[0]["method"]]
        print(
            f"\n{name}: {TASKS[name][0]} -> {TASKS[name][1]}, {len(start)} seeds; old task at "
            f"start {100 * np.mean(start):.1f} (min {100 * np.min(start):.1f}); new task "
            f"majority {100 * mine[0]['new_majority']:.1f}"
            + (
                f", untouched head {100 * np.mean([r['new_untouched'] for r in mine]):.1f}"
                if mine[0]["new_untouched"] is not None
                else ""
            )
        )
        print(
            f"{'method':<22}"
            + "".join(f"{k:>20}" for k in keys)
            + f"{'old_own-start':>20}{'new_own-finetune':>18}"
        )
        for method in dict.fromkeys(r["method"] for r in mine):
            rows_m = [r for r in mine if r["method"] == method]
            cells = []
            for key in keys:
                values = 100 * np.array([r[key] for r in rows_m])
                cells.append(f"{values.mean():6.1f} [{values.min():5.1f},{values.max():5.1f}]")
            drops = 100 * np.array([r["old_own"] - r["old_start"] for r in rows_m])
            drop = f"{drops.mean():+6.1f} [{drops.min():+5.1f}]"
            gap = ""
            if len(finetune) == len(rows_m):
                gap = f"{100 * (np.mean([r['new_own'] for r in rows_m]) - np.mean(finetune)):+6.1f}"
            print(f"{method:<22}" + "".join(f"{c:>20}" for c in cells) + f"{drop:>20}{gap:>18}")
            rows.append(
                {
                    "model": name,
                    "method": method,
                    **{
                        f"{k}/mean": float(np.mean([r[k] for r in rows_m]))
                        for k in keys + ("old_start",)
                    },
                    "old_own_drop/worst": float(np.min(drops) / 100),
                }
            )
    print()
    for row in rows:
        print(json.dumps({"benchmark": "continual_users", "summary": True, **row}), flush=True)
    return rows


def _cell(values):
    values = 100 * np.asarray(values)
    return f"{values.mean():.1f} [{values.min():.1f}, {values.max():.1f}]"


def results_summary(results):
    """The results page's `summary.json`: one table per model, a row per method (mean
    [min, max] over seeds)."""
    tables = []
    for name in dict.fromkeys(r["model"] for r in results):
        mine = [r for r in results if r["model"] == name]
        old, new = TASKS[name]
        rows = []
        for method in dict.fromkeys(r["method"] for r in mine):
            runs = [r for r in mine if r["method"] == method]
            rows.append(
                [
                    method,
                    _cell([r["old_start"] for r in runs]),
                    _cell([r["old_own"] for r in runs]),
                    _cell([r["old_own"] - r["old_start"] for r in runs]),
                    _cell([r["new_own"] for r in runs]),
                    _cell([r["old_all"] for r in runs]),
                ]
            )
        tables.append(
            {
                "caption": f"{name}: {old} then {new}, test accuracy (%)",
                "columns": [
                    "method",
                    f"{old} at the start",
                    f"{old}, its own outputs",
                    f"{old} change",
                    f"{new}, its own outputs",
                    f"{old}, all outputs",
                ],
                "rows": rows,
                "headline": [i for i, row in enumerate(rows) if row[0] in ("fip", "finetune")],
            }
        )
    seeds = sorted({r["seed"] for r in results})
    return {
        "title": "ContinualLearn defaults on the keras.io models",
        "description": (
            "Each method with its library defaults, given the model, the data and the "
            "budget (`--epochs` passes over the new task, the same for every method), the "
            "output layer grown by the new task's classes. Mean [min, max] over seeds "
            f"{seeds}."
        ),
        "tables": tables,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="text_transformer", help=f"Among {list(MODELS)}.")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"Among {list(METHODS)}."
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--memory", type=int, default=500, help="Old-task inputs remembered.")
    parser.add_argument("--epochs", type=int, default=5, help="Passes over the new task.")
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
        "--new_train_size",
        type=int,
        default=None,
        help="The new task's training examples, a seeded subset (default: all).",
    )
    parser.add_argument(
        "--options",
        default="{}",
        help='Extra runs: JSON {"name": {"method": "fip", "<argument>": value, ...}}.',
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Where to write results.json, provenance.json and summary.json.",
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for value, allowed, flag in ((models, MODELS, "models"), (methods, METHODS, "methods")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"`--{flag}` must be among {list(allowed)}. Received: {unknown}")
    extra = json.loads(args.options)
    results = []
    for name in models:
        for seed in [int(s) for s in args.seeds.split(",")]:
            results.extend(
                run(
                    name,
                    seed,
                    methods,
                    args.memory,
                    args.epochs,
                    extra,
                    args.base_epochs,
                    args.train_size,
                    args.new_train_size,
                )
            )
    rows = summary(results)
    if args.output_dir:
        provenance.write_results(
            args.output_dir, {"runs": results, "summary": rows}, page=results_summary(results)
        )
    return rows


if __name__ == "__main__":
    main()
