"""Speed of one FIP step relative to a plain `model.fit` step, per step rule.

For LeNet-300-100 and cnn5 on MNIST, times `model.fit` on batches of 256 examples and
`FIPTrainer.fit` on 128 anchor + 128 secondary examples (cross-entropy secondary loss) for
each step rule, in the same run, after a warm-up (the clock runs from the end of the last
warm-up step to the end of the last step, so tracing and input start-up are excluded; the
runs are interleaved and the best of `--repeats` is kept). Prints one JSON line per model with
`<rule>_over_fit` = (FIP samples/s) / (fit samples/s): higher is better, 1.0 is as fast as
plain training.

Example:

    python -m benchmarks.fip_step                     # about 3 minutes on 2 CPU cores
    python -m benchmarks.fip_step --steps=500 --repeats=5 --models=lenet_300_100
    python -m benchmarks.fip_step --rules=penalty,normalized   # skip the costly metric rule

On a GPU/TPU host, raise `--batch_size` and `--steps` (the ratios are per sample).
"""

import argparse
import json
import time

import keras
import numpy as np
import tensorflow as tf

import keras_fip
from keras_fip.engine.data_adapter import fip_dataset

RULES = (("penalty", "penalty"), ("normalized", "normalized"), ("metric_cg10", "metric"))


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _StepTimer(keras.callbacks.Callback):
    """Wall time of the steps after the warm-up (excludes tracing and iterator start)."""

    def __init__(self, warmup):
        super().__init__()
        self.warmup = warmup
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())

    def seconds(self):
        return self.times[-1] - self.times[self.warmup - 1]


def _time_fit(model, dataset, steps, warmup):
    timer = _StepTimer(warmup)
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, verbose=0,
              callbacks=[timer])
    return timer.seconds()


def benchmark(name, x, y, steps, warmup, repeats, batch_size, jit_compile=False,
              rules=RULES, dataset="mnist", metric_steps=None):
    keras.utils.set_random_seed(0)
    template = keras_fip.models.get(name, x.shape[1:], 10)
    half = batch_size // 2

    # Plain fit.
    fit_model = keras_fip.engine.copy_model(template)
    fit_model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=_loss(), jit_compile=jit_compile
    )
    fit_data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=0)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )

    # FIP trainers.
    trainers = {}
    for label, rule in rules:
        network = keras_fip.engine.copy_model(template)
        trainer = keras_fip.FIPTrainer(
            network, step_rule=rule, secondary_loss=_loss(), cg_iterations=10
        )
        trainer.compile(
            optimizer=keras.optimizers.Adam(1e-3) if rule == "penalty" else None,
            jit_compile=jit_compile,
        )
        data = fip_dataset(
            network, anchor=x, secondary=(x, y), batch_size=half, seed=0
        )
        trainers[label] = (trainer, data)

    # The metric rule costs ~10 fit steps a step: it is timed over fewer steps (the ratio
    # is per sample, so the step count only changes its noise).
    counts = {label: (metric_steps or steps) if rule == "metric" else steps
              for label, rule in rules}

    # Interleave the measurements so that machine load affects all equally.
    seconds = {"fit": []}
    seconds.update({label: [] for label, _ in rules})
    for _ in range(repeats):
        seconds["fit"].append(_time_fit(fit_model, fit_data, steps, warmup))
        for label, _ in rules:
            trainer, data = trainers[label]
            seconds[label].append(_time_fit(trainer, data, counts[label], warmup))
    best = {label: min(values) for label, values in seconds.items()}
    samples = {"fit": steps * batch_size}
    samples.update({label: counts[label] * batch_size for label in counts})
    result = {
        "benchmark": "fip_step",
        "model": name,
        "dataset": dataset,
        "num_params": int(sum(np.prod(v.shape) for v in template.trainable_variables)),
        "samples_per_step": batch_size,
        "steps": steps,
        "repeats": repeats,
        "jit_compile": jit_compile,
        "fit_samples_per_second": round(samples["fit"] / best["fit"], 1),
    }
    for label, _ in rules:
        rate = samples[label] / best[label]
        result[f"{label}_steps"] = counts[label]
        result[f"{label}_samples_per_second"] = round(rate, 1)
        result[f"{label}_over_fit"] = round(rate / result["fit_samples_per_second"], 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100,cnn5")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--rules", default=",".join(label for label, _ in RULES),
                        help="Step rules to time: penalty, normalized, metric_cg10.")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--metric_steps", type=int, default=20,
                        help="Timed steps of the metric rule (10 CG products a step).")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--jit_compile", action="store_true")
    args = parser.parse_args(argv)
    known = dict(RULES)
    rules = tuple((label, known[label]) for label in args.rules.split(",") if label in known)
    if len(rules) != len(args.rules.split(",")):
        parser.error(f"--rules must name rules among {sorted(known)}; got {args.rules!r}")
    if (min(args.steps, args.metric_steps, args.warmup, args.repeats) < 1
            or args.batch_size < 2):
        parser.error("--steps, --metric_steps, --warmup and --repeats must be >= 1, "
                     "--batch_size >= 2")
    x, y = keras_fip.data.load(args.dataset, "train")
    for name in args.models.split(","):
        print(
            json.dumps(benchmark(
                name, x, y, args.steps, args.warmup, args.repeats, args.batch_size,
                args.jit_compile, rules, args.dataset, args.metric_steps,
            )),
            flush=True,
        )


if __name__ == "__main__":
    main()
