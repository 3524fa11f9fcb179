"""Ensemble with default arguments on users' models, beside a deep ensemble of equal cost.

For each model of `benchmarks.user_models` named in `--models` and each seed s, the model
the Keras example trains (`user_models.trained(name, s)`) is the start; then:

- `fip`: `keras_fip.Ensemble(K, data=(x, y), walk=keras_fip.Walk(steps=K·S, seed=s))` —
  every other argument at its default (with `--data=inputs`: `data=x`, the walk on the
  inputs alone). S, the steps between members, is the largest whose example passes
  (`op.history["train_examples"]`, every pass counted: the choice of the labels' weight,
  the reference outputs, the steps, the attacks of the diversity term, BatchNorm
  re-estimation) stay within the deep ensemble's, found from the walk's accounting
  (`fip_passes`, with the labels' weights of `LABEL_WEIGHTS` tried) and checked against
  the op's own count in the output;
- `deep`: K networks trained by the same Keras example recipe from K initialisations:
  the models of seeds s, s+1, ..., s+K−1 (`user_models.trained`, cached; the windows of
  different seeds overlap), `K × epochs × N` example passes; for BatchNorm nets also
  `deep_recalibrated`, the same members with their moving statistics re-estimated on the
  training inputs, as the FIP members get them.

The keras.io MNIST convnet (softmax, 2 epochs on 60,000 images) runs with K = 3, the
BatchNorm residual conv net (logits, 30 epochs on the 1,437 digits) with K = 4. Each JSON
line holds, on the test set: the start's accuracy, negative log-likelihood (NLL) and mean
max probability (and, for BatchNorm nets, the same after re-estimating its moving
statistics on the training inputs, which `Ensemble` does to the start and to every
member: `base_recalibrated`), each member's accuracy and NLL, both ensembles' accuracy,
NLL and mean max probability, their example passes, the labels' weight the walk chose and
the checks: FIP NLL ≤ the start's, FIP accuracy ≥ the start's, every member within 5 pp
of the start. The summary line per model and data gives the mean ± std over seeds.
`--paper_walk` adds to the `--data=inputs` lines `paper`: the paper's walk
(`labels=False, diversity=Diversity(weight=0), push="random"`, the `Metric` rule at
ε = 0.05 a step, 100 steps between members) on the inputs, each member's accuracy and
Euclidean distance from the start beside the start's weight norm.

Example:

    python -m benchmarks.ensemble_users                       # 2 models x 3 seeds (labels)
    python -m benchmarks.ensemble_users --data=labelled,inputs --seeds=0,1,2
    python -m benchmarks.ensemble_users --models=residual_convnet --seeds=0 --paper_walk
    python -m benchmarks.ensemble_users --output_dir=results/ensemble_users

With `--output_dir`, writes `results.json`, `provenance.json` and `summary.json` (the results
page's table) there.
"""

import argparse
import json
import time

import numpy as np

import keras_fip
from apps import provenance
from benchmarks import user_models
from keras_fip.core import tuning
from keras_fip.engine.rules import Metric
from keras_fip.operations import ensemble as ensemble_lib
from keras_fip.operations.ensemble import Diversity
from keras_fip.operations.ensemble_model import build_ensemble

# Members of both ensembles, per model.
NUM_MEMBERS = {"mnist_convnet": 3, "residual_convnet": 4, "mobilenet": 3}
BATCH_SIZE = 128  # Ensemble's default.
DIVERSITY_EXAMPLES = 2048  # Ensemble's default.


def probabilities(model, x, batch_size=1000):
    """A classifier's (or an ensemble's) probabilities on `x`, as float64."""
    outputs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), "float64")
    if not keras_fip.core.outputs.looks_like_probabilities(outputs):
        outputs = np.exp(outputs - outputs.max(-1, keepdims=True))
        outputs /= outputs.sum(-1, keepdims=True)
    return outputs


def scores(model, x, y):
    """Test accuracy, NLL and mean max probability."""
    p = probabilities(model, x)
    true = np.maximum(p[np.arange(len(y)), y], 1e-12)
    return {
        "accuracy": float(np.mean(p.argmax(-1) == y)),
        "nll": float(-np.mean(np.log(true))),
        "max_probability": float(p.max(-1).mean()),
    }


def fip_passes(steps, y, num_members, labels, normalized, seed=0):
    """The example passes of `Ensemble(num_members)` walking `steps` steps a member with
    its defaults on one floating-point input: `op.history["train_examples"]`'s accounting
    (each labels' weight of `LABEL_WEIGHTS` tried).

    Args:
        steps: Steps between members.
        y: The labels of `data` (their number is N; with `labels`, they decide the
            held-out split of the labels' weight).
        num_members: K.
        labels: Whether `data` has labels (the task term and the choice of its weight).
        normalized: Whether the model has BatchNormalization layers.
        seed: The walk's seed (of the held-out split). Defaults to `0`.

    Returns:
        An integer.
    """
    count = len(y)
    attacked = min(DIVERSITY_EXAMPLES, count)
    # The start's BatchNorm re-estimation, the reference outputs, the steps (anchor,
    # diversity and task batches), each member's re-estimation, the attacks against the
    # start, then the members so far (and the predictions they target, without labels).
    passes = normalized * count + count + num_members * steps * BATCH_SIZE * (2 + labels)
    passes += normalized * num_members * count
    passes += (2 - labels) * attacked * (1 + num_members * (num_members - 1) // 2)
    if labels:
        fraction = min(ensemble_lib.SELECTION_FRACTION, ensemble_lib.SELECTION_MAX_EXAMPLES / count)
        held = len(tuning.validation_rows(y, fraction, seed)[1])
        visited = min(count - held, max(steps * BATCH_SIZE, DIVERSITY_EXAMPLES))
        one = visited + steps * BATCH_SIZE * 3 + min(DIVERSITY_EXAMPLES, visited)
        passes += len(ensemble_lib.LABEL_WEIGHTS) * (one + normalized * visited + held)
    return int(passes)


def steps_for_budget(budget, y, num_members, labels, normalized, seed=0):
    """The most steps between members whose `fip_passes` stay within `budget`."""
    steps = 1
    while fip_passes(steps + 1, y, num_members, labels, normalized, seed) <= budget:
        steps += 1
    return steps


def run(name, seed, data_kind, num_members, paper_walk=False, base_epochs=None):
    """One model, data kind and seed; `base_epochs`: epochs of the start and of the deep
    ensemble's members (`None`: as the Keras example trains them)."""
    epochs = user_models.RECIPES[name]["epochs"] if base_epochs is None else base_epochs
    model, data = user_models.trained(name, seed, epochs=epochs)
    x, y, x_test, y_test = data["x"], data["y"], data["x_test"], data["y_test"]
    normalized = bool(keras_fip.core.normalization.batch_normalization_layers(model))
    labels = data_kind == "labelled"
    row = {
        "benchmark": "ensemble_users",
        "model": name,
        "seed": seed,
        "data": data_kind,
        "num_members": num_members,
    }
    row["base"] = scores(model, x_test, y_test)
    if normalized:
        recalibrated = keras_fip.engine.copy_model(model)
        keras_fip.engine.recalibrate_batch_normalization(recalibrated, x, 2 * BATCH_SIZE)
        row["base_recalibrated"] = scores(recalibrated, x_test, y_test)

    # The deep ensemble: the example's recipe from other initialisations (cached).
    members = [
        keras_fip.engine.copy_model(user_models.trained(name, seed + k, epochs=epochs)[0])
        for k in range(num_members)
    ]
    deep = build_ensemble(members, name="deep_ensemble")
    deep_passes = num_members * epochs * len(x)
    row["deep"] = {
        **scores(deep, x_test, y_test),
        "member_accuracy": [scores(m, x_test, y_test)["accuracy"] for m in members],
        "train_examples": int(deep_passes),
    }
    if normalized:
        # The same members with their moving statistics re-estimated on the training
        # inputs, as the FIP members get them (K more passes over N).
        for member in members:
            keras_fip.engine.recalibrate_batch_normalization(member, x, 2 * BATCH_SIZE)
        row["deep_recalibrated"] = {
            **scores(deep, x_test, y_test),
            "member_accuracy": [scores(m, x_test, y_test)["accuracy"] for m in members],
            "train_examples": int(deep_passes + num_members * len(x)),
        }

    # FIP: the defaults, at the deep ensemble's example passes.
    steps = steps_for_budget(deep_passes, y, num_members, labels, normalized, seed)
    start = time.perf_counter()
    walk = keras_fip.Walk(steps=num_members * steps, seed=seed, verbose=0)
    operation = keras_fip.Ensemble(num_members, data=(x, y) if labels else x, walk=walk)
    ensemble = operation(model)
    history = operation.history
    member_scores = [scores(m, x_test, y_test) for m in keras_fip.ensemble_members(ensemble)]
    row["fip"] = {
        **scores(ensemble, x_test, y_test),
        "member_accuracy": [s["accuracy"] for s in member_scores],
        "member_nll": [s["nll"] for s in member_scores],
        "steps_between": steps,
        "train_examples": int(history["train_examples"]),
        "predicted_train_examples": fip_passes(steps, y, num_members, labels, normalized, seed),
        "labels": history["labels"],
        "radius": history["radius"],
        "learning_rate": history["learning_rate"],
        "outputs": history["outputs"],
        "seconds": time.perf_counter() - start,
    }
    if paper_walk and not labels:
        # The paper's walk (the metric rule driven by a random push, L = 0) on the inputs,
        # at Ensemble's steps: ε = 0.05, 100 steps between members.
        start = time.perf_counter()
        paper = keras_fip.Ensemble(
            num_members,
            data=x,
            labels=False,
            diversity=Diversity(weight=0.0),
            push="random",
            walk=keras_fip.Walk(
                steps=100 * num_members, rule=Metric(epsilon=0.05), seed=seed, verbose=0
            ),
        )
        walked = paper(model)
        row["paper"] = {
            **scores(walked, x_test, y_test),
            "member_accuracy": [
                scores(m, x_test, y_test)["accuracy"] for m in keras_fip.ensemble_members(walked)
            ],
            "member_distance": [
                float(
                    np.sqrt(
                        sum(
                            np.sum((a.numpy() - b.numpy()) ** 2)
                            for a, b in zip(m.trainable_variables, model.trainable_variables)
                        )
                    )
                )
                for m in keras_fip.ensemble_members(walked)
            ],
            "weight_norm": float(
                np.sqrt(sum(np.sum(v.numpy() ** 2) for v in model.trainable_variables))
            ),
            "train_examples": int(paper.history["train_examples"]),
            "seconds": time.perf_counter() - start,
        }
    base = row["base"]
    row["checks"] = {
        "nll_le_base": row["fip"]["nll"] <= base["nll"],
        "accuracy_ge_base": row["fip"]["accuracy"] >= base["accuracy"],
        "members_within_5pp": all(
            a >= base["accuracy"] - 0.05 for a in row["fip"]["member_accuracy"]
        ),
    }
    return row


def _mean_std(values):
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def summary(rows):
    """One line per model and data: mean ± std over seeds."""
    lines = []
    for key in sorted({(r["model"], r["data"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["data"]) == key]
        line = {
            "benchmark": "ensemble_users",
            "summary": key[0],
            "data": key[1],
            "seeds": [r["seed"] for r in group],
        }
        for method in ("base", "base_recalibrated", "fip", "deep", "deep_recalibrated", "paper"):
            if method not in group[0]:
                continue
            for measure in ("accuracy", "nll", "max_probability"):
                line[f"{method}/{measure}"] = _mean_std([r[method][measure] for r in group])
        line["fip/min_member_accuracy"] = _mean_std(
            [min(r["fip"]["member_accuracy"]) for r in group]
        )
        line["fip/train_examples"] = float(np.mean([r["fip"]["train_examples"] for r in group]))
        line["deep/train_examples"] = float(np.mean([r["deep"]["train_examples"] for r in group]))
        line["fip/labels"] = [r["fip"]["labels"] for r in group]
        for check in group[0]["checks"]:
            line[f"checks/{check}"] = f"{sum(r['checks'][check] for r in group)}/{len(group)}"
        lines.append(line)
    return lines


def _cell(values, scale=100.0, digits=2):
    values = scale * np.asarray(values, "float64")
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def results_summary(rows):
    """The results page's `summary.json`: one table per model (labelled data), a row per
    ensemble and the start (mean ± std over seeds)."""
    tables = []
    for name in dict.fromkeys(r["model"] for r in rows if r["data"] == "labelled"):
        mine = [r for r in rows if r["model"] == name and r["data"] == "labelled"]
        methods = [("base", "the trained network")]
        if "base_recalibrated" in mine[0]:
            methods.append(("base_recalibrated", "the trained network, BatchNorm re-estimated"))
        methods += [("fip", f"{name}: Ensemble (defaults)"), ("deep", "deep ensemble")]
        if "deep_recalibrated" in mine[0]:
            methods.append(("deep_recalibrated", "deep ensemble, BatchNorm re-estimated"))
        table_rows = []
        for key, label in methods:
            members = [min(r[key]["member_accuracy"]) for r in mine if "member_accuracy" in r[key]]
            table_rows.append(
                [
                    label,
                    _cell([r[key]["accuracy"] for r in mine]),
                    _cell([r[key]["nll"] for r in mine], scale=1.0, digits=4),
                    _cell(members) if members else "",
                    int(np.mean([r[key].get("train_examples", 0) for r in mine])) or "",
                ]
            )
        checks = {
            check: f"{sum(r['checks'][check] for r in mine)}/{len(mine)}"
            for check in mine[0]["checks"]
        }
        tables.append(
            {
                "caption": (
                    f"{name}, {mine[0]['num_members']} members: test accuracy (%) and NLL; "
                    f"checks (seeds): {checks}"
                ),
                "columns": [
                    "model",
                    "accuracy",
                    "NLL",
                    "worst member accuracy",
                    "example passes",
                ],
                "rows": table_rows,
                "headline": [i for i, (key, _) in enumerate(methods) if key == "fip"],
            }
        )
    seeds = sorted({r["seed"] for r in rows})
    return {
        "title": "Ensemble defaults on the keras.io models",
        "description": (
            "`keras_fip.Ensemble(K, data=(x, y), walk=keras_fip.Walk(steps=K·S, seed=s))`, "
            "every other argument its default, S the most steps between members whose example "
            "passes stay within the deep ensemble's (K networks trained by the Keras "
            f"example's recipe). Mean ± std over seeds {seeds}."
        ),
        "tables": tables,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist_convnet,residual_convnet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--data", default="labelled", help="labelled (data=(x, y)), inputs (data=x), or both."
    )
    parser.add_argument(
        "--num_members", type=int, default=None, help="K (default: NUM_MEMBERS per model)."
    )
    parser.add_argument(
        "--paper_walk",
        action="store_true",
        help="Also run the paper's walk (metric rule, random push, ε = 0.05) on the inputs.",
    )
    parser.add_argument(
        "--base_epochs",
        type=int,
        default=None,
        help="Epochs of the start and of the deep ensemble's members (default: as the Keras "
        "examples train them).",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Where to write results.json, provenance.json and summary.json.",
    )
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for data_kind in args.data.split(","):
            if data_kind not in ("labelled", "inputs"):
                raise ValueError(f"`--data` takes labelled and inputs. Received: {data_kind!r}")
            for seed in [int(s) for s in args.seeds.split(",")]:
                row = run(
                    name,
                    seed,
                    data_kind,
                    args.num_members or NUM_MEMBERS[name],
                    args.paper_walk,
                    args.base_epochs,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = summary(rows)
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.output_dir:
        provenance.write_results(
            args.output_dir, {"runs": rows, "summary": lines}, page=results_summary(rows)
        )


if __name__ == "__main__":
    main()
