"""A pure isofunctional walk on a trained LeNet-300-100: far in weight space, same function.

Trains (or loads the cached) LeNet-300-100 on MNIST, walks it with `keras_fip.Isofunctional`
(the `metric` rule: each step solves `(g + δI) θ = β u` by conjugate gradient for a fixed
random unit direction u, on anchor batches of MNIST training images, and rescales θ to
length ε) and prints one JSON line: the Euclidean distance moved, the path length, and the
MNIST test accuracy before and after, next to the accuracy of the naive move: the same
Euclidean distance straight along u.

Example:

    python -m benchmarks.isofunctional_walk
    python -m benchmarks.isofunctional_walk --steps=200 --epsilon=0.05 --step_rule=normalized
"""

import argparse
import json
import time

import numpy as np

import keras_fip
from keras_fip.models.training import base_network
from keras_fip.operations.isofunctional import random_direction


def _accuracy(model, x, y):
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--step_rule", default="metric")
    parser.add_argument("--push", default="random")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--cg_iterations", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--anchor_examples", type=int, default=60000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--dataset", default="mnist")
    args = parser.parse_args(argv)

    # Base network (trained once, cached).
    model, base = base_network(args.model, args.dataset, seed=args.seed)
    x_train, _ = keras_fip.data.load(args.dataset, "train")
    x_test, y_test = keras_fip.data.load(args.dataset, "test")
    accuracy_before = _accuracy(model, x_test, y_test)

    # Walk.
    rules = {
        "metric": keras_fip.rules.Metric(args.epsilon, args.damping, args.cg_iterations),
        "normalized": keras_fip.rules.Normalized(args.epsilon),
        "penalty": keras_fip.rules.Penalty(),
    }
    walk = keras_fip.Isofunctional(
        data=x_train[: args.anchor_examples],
        push=args.push,
        walk=keras_fip.Walk(
            steps=args.steps,
            rule=rules[args.step_rule],
            beta=args.beta,
            batch_size=args.batch_size,
            record_every=args.steps,
            seed=args.seed,
            verbose=0,
        ),
    )
    start = time.perf_counter()
    moved = walk(model)
    seconds = time.perf_counter() - start

    # Measure.
    distance = float(
        np.sqrt(
            sum(
                np.sum((a.astype(np.float64) - b) ** 2)
                for a, b in zip(moved.get_weights(), model.get_weights())
            )
        )
    )
    accuracy_after = _accuracy(moved, x_test, y_test)

    # Baseline: the same Euclidean distance straight along the push direction u.
    straight = keras_fip.engine.copy_model(model)
    if args.push == "random":
        direction = random_direction(model, seed=args.seed)
        for variable, piece in zip(straight.trainable_variables, direction):
            variable.assign(variable.numpy() + distance * piece)
    accuracy_straight = _accuracy(straight, x_test, y_test)
    print(
        json.dumps(
            {
                "benchmark": "isofunctional_walk",
                "model": args.model,
                "dataset": args.dataset,
                "step_rule": args.step_rule,
                "push": args.push,
                "steps": args.steps,
                "epsilon": args.epsilon,
                "beta": args.beta,
                "batch_size": args.batch_size,
                "euclidean_distance": round(distance, 4),
                "euclidean_path_length": round(walk.path.length(), 4),
                "weight_norm": round(
                    float(
                        np.sqrt(sum(np.sum(w.astype(np.float64) ** 2) for w in model.get_weights()))
                    ),
                    4,
                ),
                "test_accuracy_before": accuracy_before,
                "test_accuracy_after": accuracy_after,
                "accuracy_change_pp": round(100 * (accuracy_after - accuracy_before), 3),
                "straight_line_same_distance_accuracy": accuracy_straight,
                "final_anchor_distance": round(walk.history["distance"][-1], 6),
                "walk_seconds": round(seconds, 2),
                "base_test_accuracy": base["test/accuracy"],
            }
        )
    )


if __name__ == "__main__":
    main()
