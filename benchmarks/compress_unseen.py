"""Compress with default arguments on small nets it was never tuned on, against magnitude pruning.

Builds BatchNorm conv nets on scikit-learn's bundled digits (8×8): a 3×3 stem convolution
with `width` filters, BatchNorm, ReLU, optionally a residual 3×3 conv block added back,
global average pooling, Dense 64, logits. Trains each, then sparsifies it with
`keras_fip.Compress(sparsity, data=x)` — default arguments, inputs only — and with one-shot
and gradual magnitude pruning (global scope, the same layer-collapse protection) fine-tuned
for the same number of steps Compress took (`op.history["steps"]`), each at the best of
three learning rates measured on the test split (this favours the baselines). Prints one
JSON line per net with the test accuracies and the margins.

Example:

    python -m benchmarks.compress_unseen
    python -m benchmarks.compress_unseen --nets=residual24 --sparsities=0.5,0.8,0.9
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
}
BASELINE_LEARNING_RATES = (1e-4, 1e-3, 3e-3)


def conv_net(width=24, residual=True, seed=0):
    """The digits conv net of the benchmark (BatchNorm, optional residual block)."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    stem = layers.Conv2D(width, 3, padding="same", name="stem")(inputs)
    stem = layers.ReLU()(layers.BatchNormalization()(stem))
    hidden = stem
    if residual:
        block = layers.Conv2D(width, 3, padding="same", name="block")(stem)
        block = layers.BatchNormalization()(block)
        hidden = layers.ReLU()(layers.Add()([stem, block]))
    hidden = layers.GlobalAveragePooling2D()(hidden)
    hidden = layers.Dense(64, activation="relu")(hidden)
    outputs = layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, outputs, name=f"digits_conv{width}{'_res' if residual else ''}")


def _accuracy(model, x, y):
    return keras_fip.models.evaluate_classifier(model, x, y)["accuracy"]


def _layer_sparsity(model):
    variables = keras_fip.engine.projection.prunable_variables(model)
    return {v.path: round(float(np.mean(v.numpy() == 0)), 3) for v in variables}


def run_net(name, sparsities, base_epochs, seed, steps=None,
            learning_rates=BASELINE_LEARNING_RATES):
    x, y = keras_fip.data.load("digits", "train")
    x_test, y_test = keras_fip.data.load("digits", "test")
    model = conv_net(**NETS[name], seed=seed)
    keras_fip.models.train_classifier(model, x, y, epochs=base_epochs, batch_size=64,
                                      learning_rate=3e-3)
    result = {"benchmark": "compress_unseen", "net": name, "seed": seed,
              "dense/test/accuracy": round(_accuracy(model, x_test, y_test), 4)}
    for sparsity in sparsities:
        key = f"{sparsity * 100:g}"
        start = time.perf_counter()
        operation = keras_fip.Compress(sparsity, data=x, steps=steps, seed=seed, verbose=0)
        compressed = operation(model)
        result[f"fip/{key}/seconds"] = round(time.perf_counter() - start, 1)
        result[f"fip/{key}/test/accuracy"] = round(_accuracy(compressed, x_test, y_test), 4)
        result[f"fip/{key}/steps"] = operation.history["steps"]
        result[f"fip/{key}/layer_sparsity"] = _layer_sparsity(compressed)
        epochs = math.ceil(operation.history["steps"] / math.ceil(len(x) / 128))
        result[f"baselines/{key}/epochs"] = epochs
        for label, method in (("oneshot", baselines.one_shot_magnitude_pruning),
                              ("gradual", baselines.gradual_magnitude_pruning)):
            scores = {}
            for learning_rate in learning_rates:
                keras.utils.set_random_seed(seed)
                kwargs = {"scope": "global"} if label == "gradual" else {}
                pruned = method(model, sparsity, x, y, epochs=epochs, batch_size=128,
                                learning_rate=learning_rate, **kwargs)
                scores[learning_rate] = _accuracy(pruned, x_test, y_test)
            best = max(scores, key=scores.get)
            result[f"{label}/{key}/test/accuracy"] = round(scores[best], 4)
            result[f"{label}/{key}/learning_rate"] = best
        fip = result[f"fip/{key}/test/accuracy"]
        result[f"fip/{key}/gap_to_dense"] = round(result["dense/test/accuracy"] - fip, 4)
        result[f"fip/{key}/margin_over_best_baseline"] = round(
            fip - max(result[f"oneshot/{key}/test/accuracy"],
                      result[f"gradual/{key}/test/accuracy"]), 4)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--sparsities", default="0.8")
    parser.add_argument("--base_epochs", type=int, default=40,
                        help="Base training epochs (BatchNorm moving statistics need ~40 "
                        "epochs of 23 steps to settle with Keras' momentum 0.99).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="Compress's `steps` (default: its own budget rule).")
    parser.add_argument("--learning_rates",
                        default=",".join(str(r) for r in BASELINE_LEARNING_RATES),
                        help="Baseline fine-tuning learning rates; the best is reported.")
    args = parser.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    learning_rates = [float(r) for r in args.learning_rates.split(",")]
    for name in args.nets.split(","):
        if name not in NETS:
            parser.error(f"--nets: unknown net {name!r}; choose from {sorted(NETS)}")
        print(json.dumps(run_net(name, sparsities, args.base_epochs, args.seed, args.steps,
                                 learning_rates)), flush=True)


if __name__ == "__main__":
    main()
