"""Each operation's whole call against `fit` on the same model, data, batch and steps.

For every operation, a fresh copy of the model is walked with the operation's defaults and
a `keras_fip.Walk(steps=--steps, rule="penalty", batch_size=--batch_size)`; every step
the call takes is counted (a callback on the walk, or the call's `history["total_steps"]`
where it walks candidates to choose among, e.g. the labels' weight, or its
`history["train_examples"]` over the batch size where it counts example passes). The reference is
`model.compile(Adam, cross-entropy)` and `model.fit` of a fresh copy for that many steps
of the same batch size on the same data, also timed whole (compilation and tracing
included). Both run on `--model` with random
inputs of its shape and random labels: the cost does not depend on the values. Each pair
runs `--repeats` times, interleaved; the best of each is kept.

Prints one JSON line per operation: `call_seconds`, `fit_seconds`, `steps` (counted),
and `call_over_fit` (the target is ≤ 1.15).

Example:

    python -m benchmarks.operation_overhead
    python -m benchmarks.operation_overhead --operations=compress --steps=2000 --repeats=5

On a GPU host add `--jit_compile` (both sides compiled with XLA, as Keras compiles `fit`
there) and a larger `--batch_size`.
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_fip

OPERATIONS = ("isofunctional", "compress", "continual_learn", "repair", "ensemble")


class _StepCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def _model(name, num_classes=10):
    if name == "lenet_300_100":
        return keras_fip.models.lenet_300_100(num_classes=num_classes)
    if name == "mlp":
        return keras_fip.models.mlp(32, input_shape=(8, 8, 1), num_classes=num_classes)
    return keras_fip.models.cnn5(num_classes=num_classes)


def _operation(name, x, y, walk):
    if name == "isofunctional":
        return keras_fip.Isofunctional(data=x, walk=walk)
    if name == "compress":
        return keras_fip.Compress(0.9, data=(x, y), walk=walk)
    if name == "continual_learn":
        return keras_fip.ContinualLearn((x, y % 2), memory=x[:500], walk=walk)
    if name == "repair":
        return keras_fip.Repair(data=x, walk=walk)
    return keras_fip.Ensemble(3, data=(x, y), walk=walk)


def _start(name, model, x):
    """The model an operation starts from (Repair starts from a damaged network)."""
    if name == "repair":
        return keras_fip.Damage(keras_fip.faults.Nodes(fraction=0.5), seed=0)(model)
    return keras_fip.engine.copy_model(model)


def _time_call(name, model, x, y, args):
    start_model = _start(name, model, x)
    counter = _StepCounter()
    walk = keras_fip.Walk(
        steps=args.steps,
        rule="penalty",
        batch_size=args.batch_size,
        seed=0,
        verbose=0,
        callbacks=[counter],
        jit_compile=args.jit_compile,
    )
    operation = _operation(name, x, y, walk)
    start = time.perf_counter()
    operation(start_model)
    seconds = time.perf_counter() - start
    # Walks a call takes to choose among candidates report themselves in the history, as
    # steps or as example passes (forward and backward, attacks included).
    history = operation.history
    passes = int(history.get("train_examples", 0)) // args.batch_size
    return seconds, max(counter.steps, int(history.get("total_steps", 0)), passes)


def _time_fit(model, x, y, steps, args):
    copy = keras_fip.engine.copy_model(model)
    start = time.perf_counter()
    copy.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.jit_compile,
    )
    batches = len(x) // args.batch_size
    epochs = -(-steps // batches)
    copy.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=epochs,
        steps_per_epoch=min(batches, steps),
        verbose=0,
    )
    return time.perf_counter() - start


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--model", default="lenet_300_100", help="lenet_300_100, cnn5 or mlp")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jit_compile", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    keras.utils.set_random_seed(0)
    model = _model(args.model)
    shape = tuple(model.input_shape[1:])
    rng = np.random.default_rng(0)
    x = rng.random((args.examples, *shape), dtype=np.float32)
    y = rng.integers(0, 10, args.examples)
    keras_fip.models.train_classifier(model, x[:1024], y[:1024], epochs=1, batch_size=128)
    for name in args.operations.split(","):
        calls, fits, counted = [], [], 0
        for _ in range(args.repeats):
            seconds, counted = _time_call(name, model, x, y, args)
            calls.append(seconds)
            fits.append(_time_fit(model, x, y, counted, args))
        row = {
            "benchmark": "operation_overhead",
            "operation": name,
            "model": args.model,
            "steps": counted,
            "walk_steps": args.steps,
            "batch_size": args.batch_size,
            "call_seconds": round(min(calls), 3),
            "fit_seconds": round(min(fits), 3),
            "call_over_fit": round(min(calls) / min(fits), 3),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
