"""The real tfmot, run in its own process on tf_keras: a cross-check of the native baseline.

NEVER import this module from keras_fip: tensorflow-model-optimization only works with
Keras 2 (tf_keras) and, once imported, switches the whole process to legacy Keras. It is run
as `python -m keras_fip.baselines.tfmot_bridge REQUEST.json` by
`keras_fip.baselines.tfmot_baseline.tfmot_gradual_pruning`, which exchanges weights and data
through `.npz` files. Requires the `baselines` extra
(`pip install -e '.[baselines]' "tf_keras~=<TF major.minor>.0"`).
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402


def _build(tf_keras, architecture):
    """Rebuilds a sequential chain of standard layers in tf_keras."""
    layers = [tf_keras.Input(tuple(architecture["input_shape"]))]
    for spec in architecture["layers"]:
        kind, config = spec["class_name"], spec["config"]
        if kind == "Flatten":
            layers.append(tf_keras.layers.Flatten(name=config["name"]))
        elif kind == "Dense":
            layers.append(
                tf_keras.layers.Dense(
                    config["units"],
                    activation=config["activation"],
                    use_bias=config["use_bias"],
                    name=config["name"],
                )
            )
        elif kind == "Conv2D":
            layers.append(
                tf_keras.layers.Conv2D(
                    config["filters"],
                    tuple(config["kernel_size"]),
                    strides=tuple(config["strides"]),
                    padding=config["padding"],
                    activation=config["activation"],
                    use_bias=config["use_bias"],
                    name=config["name"],
                )
            )
        elif kind == "MaxPooling2D":
            layers.append(
                tf_keras.layers.MaxPooling2D(
                    tuple(config["pool_size"]),
                    strides=tuple(config["strides"]),
                    padding=config["padding"],
                    name=config["name"],
                )
            )
        elif kind == "Dropout":
            layers.append(tf_keras.layers.Dropout(config["rate"], name=config["name"]))
        elif kind == "Activation":
            layers.append(tf_keras.layers.Activation(config["activation"], name=config["name"]))
        else:
            raise ValueError(f"The tfmot bridge cannot rebuild layer type {kind}.")
    return tf_keras.Sequential(layers)


def main(request_path):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    with open(request_path) as f:
        request = json.load(f)
    tf_keras.utils.set_random_seed(request["seed"])
    model = _build(tf_keras, request["architecture"])
    with np.load(request["weights_path"]) as archive:
        model.set_weights([archive[f"w{i}"] for i in range(len(archive.files))])
    with np.load(request["data_path"]) as archive:
        x, y = archive["x"], archive["y"]
        x_test, y_test = archive["x_test"], archive["y_test"]

    # Prune with tfmot's own wrapper and schedule
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=request["initial_sparsity"],
        final_sparsity=request["sparsity"],
        begin_step=request["begin_step"],
        end_step=request["end_step"],
        power=request["power"],
        frequency=request["frequency"],
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    steps = request["epochs"] * int(np.ceil(len(x) / request["batch_size"]))
    pruned.compile(
        optimizer=tf_keras.optimizers.Adam(
            tf_keras.optimizers.schedules.CosineDecay(request["learning_rate"], steps)
        ),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    pruned.fit(
        x,
        y,
        epochs=request["epochs"],
        batch_size=request["batch_size"],
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)

    # Report
    logits = stripped.predict(x_test, batch_size=1000, verbose=0)
    weights = stripped.get_weights()
    np.savez(request["output_weights_path"], **{f"w{i}": w for i, w in enumerate(weights)})
    result = {
        "test/accuracy": float(np.mean(np.argmax(logits, -1) == y_test)),
        "tensorflow_version": tf.__version__,
        "tfmot_version": getattr(tfmot, "__version__", "unknown"),
    }
    with open(request["output_path"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
