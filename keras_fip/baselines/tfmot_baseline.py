"""Launches the real tfmot gradual pruning in a separate process (see `tfmot_bridge`)."""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np

from keras_fip.baselines import magnitude_pruning
from keras_fip.core import copy as copy_lib
from keras_fip.core import masks as masks_lib
from keras_fip.core import projection

_BRIDGE_LAYERS = (
    "InputLayer",
    "Flatten",
    "Dense",
    "Conv2D",
    "MaxPooling2D",
    "Dropout",
    "Activation",
)


def tfmot_available():
    """Whether tensorflow-model-optimization and tf_keras are installed (checked in a
    subprocess, so this process never imports them)."""
    code = "import tensorflow_model_optimization, tf_keras"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    return (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0
    )


def _architecture(model):
    layers = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in _BRIDGE_LAYERS:
            raise ValueError(
                f"The tfmot cross-check rebuilds sequential chains of {list(_BRIDGE_LAYERS)} "
                f"in tf_keras. Received: a model with layer `{layer.name}` of type {kind}"
            )
        if kind != "InputLayer":
            layers.append({"class_name": kind, "config": layer.get_config()})
    return {"input_shape": list(model.inputs[0].shape[1:]), "layers": layers}


def tfmot_gradual_pruning(
    model,
    sparsity,
    x,
    y,
    x_test,
    y_test,
    epochs=10,
    batch_size=128,
    learning_rate=1e-4,
    begin_fraction=0.0,
    end_fraction=0.7,
    frequency=100,
    initial_sparsity=0.0,
    power=3,
    seed=0,
    timeout=3600,
):
    """Runs tfmot's `prune_low_magnitude` + `PolynomialDecay` on a copy of `model`.

    The model's architecture (a sequential chain of Dense/Conv2D/pooling layers) and weights
    are rebuilt in tf_keras in a separate Python process; the schedule steps are those of
    `gradual_magnitude_pruning` with the same arguments, so the two are directly comparable.

    Args:
        model: A trained Keras 3 `keras.Model` returning logits. Not changed.
        sparsity: Final sparsity of every prunable layer, in [0, 1).
        x: Training inputs.
        y: Integer labels.
        x_test: Test inputs, evaluated in the tfmot process.
        y_test: Test labels.
        epochs: Total epochs. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate (cosine-decayed). Defaults to `1e-4`.
        begin_fraction: As in `gradual_magnitude_pruning`. Defaults to `0.0`.
        end_fraction: As in `gradual_magnitude_pruning`. Defaults to `0.7`.
        frequency: As in `gradual_magnitude_pruning`. Defaults to `100`.
        initial_sparsity: Sparsity at the first pruning step. Defaults to `0.0`.
        power: Exponent of the schedule. Defaults to `3`.
        seed: Seed of the tfmot process. Defaults to `0`.
        timeout: Seconds before the subprocess is stopped. Defaults to `3600`.

    Returns:
        A tuple `(pruned_model, result)`: a Keras 3 copy of `model` holding tfmot's pruned
        weights (masks attached where weights are zero in pruned layers) and a dict with
        `"test/accuracy"` as tfmot measured it and the versions used.
    """
    projection.check_sparsity(sparsity)
    architecture = _architecture(model)
    begin_step, end_step, frequency = magnitude_pruning.gradual_schedule_steps(
        len(x), batch_size, epochs, begin_fraction, end_fraction, frequency
    )
    with tempfile.TemporaryDirectory(prefix="keras_fip_tfmot_") as directory:
        paths = {
            name: os.path.join(directory, name)
            for name in ("request.json", "weights.npz", "data.npz", "out_weights.npz", "out.json")
        }
        np.savez(paths["weights.npz"], **{f"w{i}": w for i, w in enumerate(model.get_weights())})
        np.savez(paths["data.npz"], x=x, y=y, x_test=x_test, y_test=y_test)
        request = {
            "architecture": architecture,
            "weights_path": paths["weights.npz"],
            "data_path": paths["data.npz"],
            "output_weights_path": paths["out_weights.npz"],
            "output_path": paths["out.json"],
            "sparsity": float(sparsity),
            "initial_sparsity": float(initial_sparsity),
            "begin_step": begin_step,
            "end_step": end_step,
            "frequency": frequency,
            "power": power,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
        }
        with open(paths["request.json"], "w") as f:
            json.dump(request, f, default=_to_builtin)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
        completed = subprocess.run(
            [sys.executable, "-m", "keras_fip.baselines.tfmot_bridge", paths["request.json"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                "The tfmot subprocess failed (is the `baselines` extra installed, with tf_keras "
                f"matching TensorFlow's minor version?):\n{completed.stderr[-3000:]}"
            )
        with np.load(paths["out_weights.npz"]) as archive:
            weights = [archive[f"w{i}"] for i in range(len(archive.files))]
        with open(paths["out.json"]) as f:
            result = json.load(f)
    pruned = copy_lib.copy_model(model)
    pruned.set_weights(weights)
    masks = {
        v.path: keras.ops.convert_to_numpy(v) != 0 for v in projection.prunable_variables(pruned)
    }
    masks_lib.apply_masks(pruned, masks)
    return pruned, result


def _to_builtin(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Not JSON serialisable: {value!r}")
