"""Speed of one FIP step relative to a plain `model.fit` step, per step rule.

For LeNet-300-100 and cnn5 on MNIST, times plain `model.fit` (Adam 1e-3, batches of 256
examples) and `FIPTrainer.fit` on 128 anchor + 128 secondary examples (cross-entropy
secondary loss, the data from `fip_dataset`) for each step rule (and the penalty rule
measuring `step_norm` / `distance_from_start` every 100 steps, `penalty_measure100`:
`FIPTrainer(measure_every=100)`, whose non-finite guard then copies the weights only
around those steps; the step of every operation at its default `record_every=100`), in the same
run, after a
warm-up (the clock runs from the end of the last warm-up step to the end of the last step,
so tracing and input start-up are excluded). Plain fit is timed on the Keras default input
path, `fit(x, y, batch_size=256)` (`fit_arrays`), and on the usual hand-built pipeline
`from_tensor_slices(...).shuffle(60000).batch(256).prefetch` (`fit_dataset`); the faster of
the two (by median) is the baseline. The runs are interleaved (fit, fit, rule, rule, ...,
`--repeats` rounds, after `--warmup_rounds` discarded rounds: the first round of a fresh
process is slower for every method) so that load on the machine affects all alike, and
medians are kept.

Prints one JSON line per model with `<rule>_over_fit` = (FIP samples/s) / (fit samples/s),
medians of the wall time (higher is better, 1.0 is as fast as plain training),
`<rule>_over_fit_best` (the same ratio of the fastest rounds), `<rule>_over_fit_paired`
(the median over rounds of the ratio within each round: it cancels drift in the machine's
speed, which on a shared virtual machine moves single rounds by ±20%),
`<rule>_over_fit_cpu` (the ratio of process CPU time per sample: the work done, less
sensitive to other processes on a shared machine) and `load_average` (1-minute load at
the start and the end).

Example:

    python -m benchmarks.fip_step                     # 222 s on 2 idle CPU cores
    # The default run is a quick check: 3 rounds of 40 steps (~0.2 s a round for
    # LeNet) swing its LeNet ratios by ±15%. For the ratios, many longer rounds:
    python -m benchmarks.fip_step --models=lenet_300_100 \
        --rules=penalty,penalty_measure100 --steps=200 --repeats=10
    python -m benchmarks.fip_step --steps=500 --repeats=5 --models=lenet_300_100
    python -m benchmarks.fip_step --rules=penalty,normalized   # skip the costly metric rule
    python -m benchmarks.fip_step --rules=penalty,penalty_measure100 --repeats=20

On a GPU/TPU host, raise `--batch_size` and `--steps` (the ratios are per sample).
"""

import argparse
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

import keras_fip
from keras_fip.core.data_adapter import fip_dataset

RULES = (
    ("penalty", "penalty"),
    ("penalty_measure100", "penalty"),
    ("normalized", "normalized"),
    ("metric_cg10", "metric"),
)
# Trainer arguments per label: `penalty_measure100` measures the step's length and the
# distance from the start every 100 steps (`FIPTrainer(measure_every=100)`, what a walk
# recording its path every 100 steps needs) instead of at every step, and its guard
# copies the weights only around those steps. It is the step every operation runs with
# its default `record_every=100` (operations walk with `measure_every=record_every`).
TRAINER_ARGUMENTS = {"penalty_measure100": {"measure_every": 100}}


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _StepTimer(keras.callbacks.Callback):
    """Wall and CPU time of the steps after the warm-up (no tracing, no iterator start);
    stops the run after `total` steps."""

    def __init__(self, warmup, total):
        super().__init__()
        self.warmup = warmup
        self.total = total
        self.times = []
        self.cpu_times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if len(self.times) >= self.total:
            self.model.stop_training = True

    def seconds(self):
        return self.times[self.total - 1] - self.times[self.warmup - 1]

    def cpu_seconds(self):
        return self.cpu_times[self.total - 1] - self.cpu_times[self.warmup - 1]


def _time_fit(model, data, steps, warmup, batch_size=None):
    """`(wall seconds, CPU seconds)` of `steps` steps; `data` a dataset or `(x, y)`.

    Arrays run as many passes as the steps need (`fit` ends an epoch at the end of the
    arrays even when `steps_per_epoch` asks for more, which would time fewer steps than
    counted); the timer stops the run after `warmup + steps` steps.
    """
    total = warmup + steps
    timer = _StepTimer(warmup, total)
    if isinstance(data, tuple):
        x, y = data
        batches_per_pass = -(-len(x) // batch_size)
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=-(-total // batches_per_pass),
            verbose=0,
            callbacks=[timer],
        )
    else:
        model.fit(data, epochs=1, steps_per_epoch=total, verbose=0, callbacks=[timer])
    if len(timer.times) < total:
        raise RuntimeError(f"Timed {len(timer.times)} steps of {total}: the data ran out.")
    return timer.seconds(), timer.cpu_seconds()


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # Not available on this platform.
        return None


def benchmark(
    name,
    x,
    y,
    steps,
    warmup,
    repeats,
    batch_size,
    jit_compile=False,
    rules=RULES,
    dataset="mnist",
    metric_steps=None,
    warmup_rounds=1,
):
    keras.utils.set_random_seed(0)
    template = keras_fip.models.get(name, x.shape[1:], 10)
    half = batch_size // 2

    # Plain fit, the Keras default way (arrays) and through a hand-built tf.data pipeline.
    fits = {}
    for label in ("fit_arrays", "fit_dataset"):
        fit_model = keras_fip.engine.copy_model(template)
        fit_model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=_loss(), jit_compile=jit_compile
        )
        fits[label] = fit_model
    fit_inputs = {
        "fit_arrays": (x, y),
        "fit_dataset": (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=0)
            .repeat()
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        ),
    }

    # FIP trainers.
    trainers = {}
    for label, rule in rules:
        network = keras_fip.engine.copy_model(template)
        trainer = keras_fip.FIPTrainer(
            network,
            rule=keras_fip.rules.get(rule),
            secondary_loss=_loss(),
            **TRAINER_ARGUMENTS.get(label, {}),
        )
        trainer.compile(
            optimizer=keras.optimizers.Adam(1e-3) if rule == "penalty" else None,
            jit_compile=jit_compile,
        )
        data = fip_dataset(network, anchor=x, secondary=(x, y), batch_size=half, seed=0)
        trainers[label] = (trainer, data)

    # The metric rule costs ~10 fit steps a step: it is timed over fewer steps (the ratio
    # is per sample, so the step count only changes its noise).
    counts = {
        label: (metric_steps or steps) if rule == "metric" else steps for label, rule in rules
    }

    # Interleave the measurements so that machine load affects all equally.
    load_start = _load_average()
    labels = list(fits) + [label for label, _ in rules]
    wall = {label: [] for label in labels}
    cpu = {label: [] for label in labels}
    for round_index in range(warmup_rounds + repeats):
        if round_index == warmup_rounds:
            for times in (wall, cpu):
                for label in times:
                    times[label].clear()
        for label in fits:
            seconds, cpu_seconds = _time_fit(
                fits[label], fit_inputs[label], steps, warmup, batch_size
            )
            wall[label].append(seconds)
            cpu[label].append(cpu_seconds)
        for label, _ in rules:
            trainer, data = trainers[label]
            seconds, cpu_seconds = _time_fit(trainer, data, counts[label], warmup)
            wall[label].append(seconds)
            cpu[label].append(cpu_seconds)
    samples = {label: steps * batch_size for label in fits}
    samples.update({label: counts[label] * batch_size for label in counts})

    def rate(label, times, reduce):
        return samples[label] / reduce(times[label])

    baseline = max(fits, key=lambda label: rate(label, wall, np.median))
    result = {
        "benchmark": "fip_step",
        "model": name,
        "dataset": dataset,
        "num_params": int(sum(np.prod(v.shape) for v in template.trainable_variables)),
        "samples_per_step": batch_size,
        "steps": steps,
        "repeats": repeats,
        "jit_compile": jit_compile,
        "fit_baseline": baseline,
        "fit_samples_per_second": round(rate(baseline, wall, np.median), 1),
    }
    for label in fits:
        result[f"{label}_samples_per_second"] = round(rate(label, wall, np.median), 1)
    for label, _ in rules:
        result[f"{label}_steps"] = counts[label]
        result[f"{label}_samples_per_second"] = round(rate(label, wall, np.median), 1)
        result[f"{label}_over_fit"] = round(
            rate(label, wall, np.median) / rate(baseline, wall, np.median), 3
        )
        result[f"{label}_over_fit_best"] = round(
            rate(label, wall, min) / max(rate(f, wall, min) for f in fits), 3
        )
        result[f"{label}_over_fit_paired"] = round(
            float(
                np.median(
                    [
                        (fit_seconds / steps) / (seconds / counts[label])
                        for fit_seconds, seconds in zip(wall[baseline], wall[label])
                    ]
                )
            ),
            3,
        )
        result[f"{label}_over_fit_cpu"] = round(
            rate(label, cpu, np.median) / max(rate(f, cpu, np.median) for f in fits), 3
        )
    result["load_average"] = [load_start, _load_average()]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet_300_100,cnn5")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument(
        "--rules",
        default=",".join(label for label, _ in RULES),
        help="Step rules to time: penalty, penalty_measure100, normalized, metric_cg10.",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=40,
        help="Timed steps per method and round. On a shared virtual machine "
        "many short rounds (`--repeats=20`) give steadier ratios than "
        "a few long ones: the paired ratio cancels drift between rounds.",
    )
    parser.add_argument(
        "--metric_steps",
        type=int,
        default=5,
        help="Timed steps of the metric rule (10 CG products a step).",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup_rounds", type=int, default=1, help="Interleaved rounds run first and discarded."
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--jit_compile", action="store_true")
    args = parser.parse_args(argv)
    known = dict(RULES)
    rules = tuple((label, known[label]) for label in args.rules.split(",") if label in known)
    if len(rules) != len(args.rules.split(",")):
        parser.error(f"--rules must name rules among {sorted(known)}; got {args.rules!r}")
    if (
        min(args.steps, args.metric_steps, args.warmup, args.repeats) < 1
        or args.batch_size < 2
        or args.warmup_rounds < 0
    ):
        parser.error(
            "--steps, --metric_steps, --warmup and --repeats must be >= 1, "
            "--warmup_rounds >= 0, --batch_size >= 2"
        )
    x, y = keras_fip.data.load(args.dataset, "train")
    for name in args.models.split(","):
        print(
            json.dumps(
                benchmark(
                    name,
                    x,
                    y,
                    args.steps,
                    args.warmup,
                    args.repeats,
                    args.batch_size,
                    args.jit_compile,
                    rules,
                    args.dataset,
                    args.metric_steps,
                    args.warmup_rounds,
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
