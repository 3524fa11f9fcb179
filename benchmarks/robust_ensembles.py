"""Robust accuracy of the FIP ensemble against adversarial training, with each one's compute.

For each seed s, on `--dataset` (MNIST by default; `--train_size` stratified training
examples, the first `--test_size` test examples) and the small conv net `convnet` (two
5x5 convolutions of 16 and 32 filters with 2x2 max-pooling, a dense layer of 128, logits):

- `standard`: the network trained on clean data (`keras_fip.models.train_classifier`,
  `--epochs`, the middle learning rate of `--learning_rates`);
- `pgd_at`: PGD adversarial training (`keras_fip.baselines.pgd_adversarial_training`,
  ε = `--train_epsilon`, `--attack_steps` steps of 2.5·ε/steps, `--epochs`, ε rising
  from 0 over the first `--epsilon_warmup` of the steps: without it a few epochs at
  ε = 0.3 can leave a constant classifier);
- `pgd_at_ensemble`: K = `--num_members` PGD-AT networks
  (`keras_fip.baselines.pgd_adversarial_ensemble`);
- `fgsm_at`: fast FGSM adversarial training with random start
  (`keras_fip.baselines.fgsm_adversarial_training`);
- `trs`: a TRS ensemble of K members (`keras_fip.baselines.trs_ensemble`: the members'
  input gradients misaligned and kept small), its epochs chosen so that its compute
  matches the PGD-AT ensemble's;
- `fip`: `keras_fip.Ensemble(K, data=(x, y), walk=keras_fip.Walk(seed=s))` from the
  `standard` network, every other argument at its default (`--fip_steps` > 0 sets the
  walk's steps instead, for tiny runs).

The baselines' learning rate is chosen on a held-out tenth of the training data among
`--learning_rates` (robust accuracy under their own training attack;
`keras_fip.core.tuning.grid_search`, extended past a winning edge). Each method's compute
`train_examples` counts every forward and backward pass in examples, the attacks and the
learning-rate search included (`selection_examples`); the FIP ensemble's adds its start's
training to `op.history["train_examples"]`.

Each model is evaluated by `keras_fip.robustness.evaluate` at each ε of `--epsilons`
under the white-box attacks of `--attacks` on the whole ensemble (the mean of its
members' probabilities), with `--steps` steps, `--restarts` restarts and
`--square_queries` Square queries, and (`--sanity`) by `keras_fip.robustness.sanity_checks`.
One JSON line per seed and method (`robust/<attack>/<ε>`, `worst_case/<ε>`, the compute,
`sanity/passed` and the whole evaluation record), then a summary line per method with the
mean ± std over seeds. `--output` also writes them as `results.json` (with provenance).

Example:

    python -m benchmarks.robust_ensembles --seeds=0 --train_size=10000 --test_size=500
    python -m benchmarks.robust_ensembles --seeds=0,1,2 --steps=100 --restarts=5 \
        --square_queries=5000 --test_size=1000
"""

import argparse
import json

import keras
import numpy as np

import keras_fip
from keras_fip import baselines
from keras_fip import robustness
from keras_fip.baselines import adversarial_training
from keras_fip.baselines.trs_ensemble import ATTACK_STEPS as TRS_ATTACK_STEPS
from keras_fip.baselines.trs_ensemble import PASSES_PER_MEMBER as TRS_PASSES_PER_MEMBER
from keras_fip.core import tuning

METHODS = ("standard", "pgd_at", "pgd_at_ensemble", "fgsm_at", "trs", "fip")
BENCHMARK = "robust_ensembles"


def convnet(input_shape, num_classes=10):
    """The small conv net: conv 16 (5x5), pool, conv 32 (5x5), pool, dense 128, logits."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 5, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="convnet")


def data(args, seed):
    x, y = keras_fip.data.load(args.dataset, "train")
    x_test, y_test = keras_fip.data.load(args.dataset, "test")
    if args.train_size and args.train_size < len(y):
        rows = tuning.validation_rows(y, args.train_size / len(y), seed)[1]
        x, y = x[rows], y[rows]
    if args.test_size:
        x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    return x, y, x_test, y_test


def train(method, architecture, x, y, args, seed):
    """`(model, compute)`: the method's model and its example passes."""
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rates,
        "seed": seed,
    }
    attack = {"epsilon": args.train_epsilon, "attack_steps": args.attack_steps}
    common["epsilon_warmup"] = args.epsilon_warmup
    if method == "pgd_at":
        model, info = adversarial_training.pgd_adversarial_training(
            architecture, x, y, **attack, **common
        )
    elif method == "pgd_at_ensemble":
        model, info = adversarial_training.pgd_adversarial_ensemble(
            architecture, x, y, num_members=args.num_members, **attack, **common
        )
    elif method == "fgsm_at":
        model, info = adversarial_training.fgsm_adversarial_training(
            architecture, x, y, epsilon=args.train_epsilon, **common
        )
    elif method == "trs":
        # The epochs that bring its compute to the PGD-AT ensemble's (one learning rate).
        reference = args.num_members * args.epochs * len(y) * (args.attack_steps + 1)
        per_epoch = args.num_members * len(y) * (TRS_PASSES_PER_MEMBER + TRS_ATTACK_STEPS)
        model, info = baselines.trs_ensemble(
            architecture,
            x,
            y,
            num_members=args.num_members,
            epochs=max(1, round(reference / per_epoch)),
            batch_size=args.batch_size,
            learning_rate=args.learning_rates[len(args.learning_rates) // 2],
            seed=seed,
        )
        info = {**info, "selection_examples": 0, "epsilon_warmup": None}
    else:
        raise ValueError(f"Unknown method {method!r}")
    return model, {
        "train_examples": info["train_examples"],
        "selection_examples": info["selection_examples"],
        "learning_rate": info["learning_rate"],
        "epsilon_warmup": info["epsilon_warmup"],
    }


def standard_network(architecture, x, y, args, seed):
    keras.utils.set_random_seed(seed)
    model = keras.models.clone_model(architecture)
    rate = args.learning_rates[len(args.learning_rates) // 2]
    keras_fip.models.train_classifier(
        model, x, y, epochs=args.epochs, batch_size=args.batch_size, learning_rate=rate
    )
    return model, {
        "train_examples": int(args.epochs * len(y)),
        "selection_examples": 0,
        "learning_rate": rate,
    }


def row(method, seed, model, compute, record, checks):
    line = {"seed": seed, "method": method, "clean_accuracy": record["clean_accuracy"]}
    line.update(compute)
    for result in record["results"]:
        line[f"robust/{result['attack']}/{result['epsilon']:g}"] = result["robust_accuracy"]
    for worst in record["worst_case"]:
        line[f"worst_case/{worst['epsilon']:g}"] = worst["robust_accuracy"]
    line["num_members"] = record["num_members"]
    if checks is not None:
        line["sanity/passed"] = checks["passed"]
        line["sanity"] = checks
    line["evaluation"] = record
    return line


def run_seed(args, seed):
    x, y, x_test, y_test = data(args, seed)
    architecture = convnet(x.shape[1:])
    rows = []
    standard, standard_compute = standard_network(architecture, x, y, args, seed)
    for method in args.methods:
        if method == "standard":
            model, compute = standard, standard_compute
        elif method == "fip":
            walk = keras_fip.Walk(steps=args.fip_steps or None, seed=seed, verbose=0)
            op = keras_fip.Ensemble(args.num_members, data=(x, y), walk=walk)
            model = op(standard)
            compute = {
                "train_examples": standard_compute["train_examples"] + op.history["train_examples"],
                "selection_examples": 0,
                "walk_examples": op.history["train_examples"],
                "labels": op.history.get("labels"),
            }
        else:
            model, compute = train(method, architecture, x, y, args, seed)
        record = robustness.evaluate(
            model,
            x_test,
            y_test,
            epsilons=args.epsilons,
            attacks=args.attacks,
            steps=args.steps,
            restarts=args.restarts,
            square_queries=args.square_queries,
            seed=seed,
        )
        checks = None
        if args.sanity:
            checks = robustness.sanity_checks(
                model,
                x_test,
                y_test,
                epsilons=sorted({*args.sanity_epsilons, *args.epsilons}),
                steps=(max(1, args.steps // 4), args.steps),
                square_queries=args.square_queries,
                seed=seed,
            )
        line = row(method, seed, model, compute, record, checks)
        print(json.dumps({"benchmark": BENCHMARK, **line}), flush=True)
        rows.append(line)
    return rows


def summarize(rows):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        keys = [
            k
            for k in chosen[0]
            if k.startswith(("robust/", "worst_case/")) or k in ("clean_accuracy", "train_examples")
        ]
        line = {"benchmark": BENCHMARK, "summary": True, "method": method, "seeds": len(chosen)}
        for key in keys:
            values = [r[key] for r in chosen]
            line[f"{key}/mean"] = float(np.mean(values))
            line[f"{key}/std"] = float(np.std(values))
        if all("sanity/passed" in r for r in chosen):
            line["sanity/passed"] = all(r["sanity/passed"] for r in chosen)
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--train_size", type=int, default=10000)
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rates", default="3e-4,1e-3,3e-3")
    parser.add_argument("--num_members", type=int, default=3)
    parser.add_argument("--fip_steps", type=int, default=0)
    parser.add_argument("--train_epsilon", type=float, default=0.3)
    parser.add_argument("--attack_steps", type=int, default=10)
    parser.add_argument("--epsilon_warmup", type=float, default=0.5)
    parser.add_argument("--epsilons", default="0.1,0.3")
    parser.add_argument("--attacks", default="pgd,autoattack")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--square_queries", type=int, default=1000)
    parser.add_argument("--sanity", type=int, default=1)
    parser.add_argument("--sanity_epsilons", default="0.05,0.2")
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"`--methods` must be among {list(METHODS)}. Received: {unknown}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.learning_rates = [float(r) for r in args.learning_rates.split(",")]
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.sanity_epsilons = [float(e) for e in args.sanity_epsilons.split(",") if e]
    args.attacks = args.attacks.split(",")
    return args


def main(argv=None):
    args = parse(argv)
    rows = []
    for seed in args.seeds:
        rows.extend(run_seed(args, seed))
    summary = summarize(rows)
    if args.output:
        from apps.provenance import write_results

        write_results(args.output, {"rows": rows, "summary": summary, "flags": vars(args)})
    return rows, summary


if __name__ == "__main__":
    main()
