"""Training and caching the base networks the FIP experiments start from."""

import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib

CACHE_ENV_VARIABLE = "KERAS_FIP_CACHE"


def compile_classifier(model, learning_rate=1e-3, decay_steps=None):
    """Compiles a classifier with Adam (cosine-decayed when `decay_steps` is given).

    Args:
        model: A `keras.Model` returning logits or probabilities (a final softmax, read
            from its graph: `keras_fip.core.outputs.output_kind`).
        learning_rate: Initial learning rate. Defaults to `1e-3`.
        decay_steps: Steps over which the learning rate decays to zero with a cosine.
            Defaults to `None` (constant learning rate).

    Returns:
        The model, compiled with sparse categorical cross-entropy (on its logits or its
        probabilities) and accuracy.
    """
    schedule = learning_rate
    if decay_steps:
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=outputs_lib.classification_loss(outputs_lib.output_kind(model)),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def train_classifier(
    model,
    x,
    y,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    validation_data=None,
    callbacks=None,
    verbose=0,
):
    """Trains a classifier in place with Adam and a cosine learning-rate decay.

    Args:
        model: A `keras.Model` returning logits or probabilities. It is compiled and
            trained in place.
        x: Training inputs.
        y: Integer training labels.
        epochs: Passes over the training data. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate, decayed to zero. Defaults to `1e-3`.
        validation_data: Optional `(x, y)` evaluated after each epoch. Defaults to `None`.
        callbacks: Keras callbacks. Defaults to `None`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        The `keras.callbacks.History` of the run.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
        >>> history = keras_fip.models.train_classifier(model, x, y, epochs=1)
    """
    steps_per_epoch = int(np.ceil(data_adapter.num_examples(x) / batch_size))
    compile_classifier(model, learning_rate, decay_steps=epochs * steps_per_epoch)
    return model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=validation_data,
        callbacks=callbacks,
        verbose=verbose,
    )


def evaluate_classifier(model, x, y, batch_size=1000):
    """Loss and accuracy of a classifier, without touching its compile state.

    Args:
        model: A `keras.Model` returning logits or probabilities.
        x: Inputs.
        y: Integer labels.
        batch_size: Examples per forward pass. Defaults to `1000`.

    Returns:
        A dict with float `loss` (mean cross-entropy) and `accuracy`.
    """
    # Batched eager calls: unlike `predict`, no new tf.function is traced for each model.
    logits = np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(data_adapter.take(x, slice(i, i + batch_size)), training=False)
            )
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )
    kind = outputs_lib.output_kind(model, data_adapter.take(x, slice(0, 64)))
    logits = keras.ops.convert_to_numpy(outputs_lib.as_logits(logits, kind))
    loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return {
        "loss": float(np.mean(keras.ops.convert_to_numpy(loss))),
        "accuracy": float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y))),
    }


def default_cache_dir():
    """Where base networks are cached: env `KERAS_FIP_CACHE`, else `~/.cache/keras_fip`."""
    return os.environ.get(
        CACHE_ENV_VARIABLE, os.path.join(os.path.expanduser("~"), ".cache", "keras_fip")
    )


def base_network(
    model="lenet_300_100",
    dataset="mnist",
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    seed=0,
    data_dir=None,
    cache_dir=None,
    verbose=0,
    strategy=None,
    **model_kwargs,
):
    """Returns a trained zoo network, training it once and caching it by configuration.

    The cache key is a hash of every argument that changes the trained weights, so the apps
    that start from a base network (spectrum, compress, damage, ...) share one training run.

    Args:
        model: A name in `keras_fip.models.BUILDERS`. Defaults to `"lenet_300_100"`.
        dataset: A name accepted by `keras_fip.data.load`. Defaults to `"mnist"`.
        epochs: Training epochs. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate, cosine-decayed. Defaults to `1e-3`.
        seed: Seed of initialisation and shuffling. Defaults to `0`.
        data_dir: Passed to `keras_fip.data.load`. Defaults to `None`.
        cache_dir: Cache directory. Defaults to `None` (`default_cache_dir()`); `False`
            disables caching.
        verbose: Keras verbosity while training. Defaults to `0`.
        strategy: A `tf.distribute.Strategy` to build and train under. Defaults to `None`
            (the current strategy). It does not enter the cache key.
        **model_kwargs: Further builder arguments (e.g. `width_multiplier=0.5`).

    Returns:
        A tuple `(model, results)`: the trained `keras.Model` and a dict with
        `"train/accuracy"`, `"test/accuracy"`, `"test/loss"`, `"train/wall_time_seconds"`,
        `"dataset/subset"` and `"cache/path"`.
    """
    from keras_fip import data as data_lib
    from keras_fip import models as models_lib

    config = {
        "model": model,
        "dataset": dataset,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "model_kwargs": model_kwargs,
    }
    directory = None
    if cache_dir is not False:
        # The architecture enters the key, so a changed zoo builder never reuses old weights.
        info = data_lib.info(dataset, data_dir)
        architecture = models_lib.get(
            model, info["input_shape"], info["num_classes"], **model_kwargs
        ).get_config()
        config["architecture"] = hashlib.sha256(
            json.dumps(architecture, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        directory = os.path.join(
            cache_dir or default_cache_dir(), "base_networks", f"{model}_{dataset}_{key}"
        )
        model_path = os.path.join(directory, "model.keras")
        results_path = os.path.join(directory, "results.json")
        if os.path.isfile(model_path) and os.path.isfile(results_path):
            with open(results_path) as f:
                return keras.saving.load_model(model_path), json.load(f)

    # Train
    keras.utils.set_random_seed(seed)
    info = data_lib.info(dataset, data_dir)
    x_train, y_train = data_lib.load(dataset, "train", data_dir)
    x_test, y_test = data_lib.load(dataset, "test", data_dir)
    start = time.perf_counter()
    with (strategy or tf.distribute.get_strategy()).scope():
        network = models_lib.get(model, info["input_shape"], info["num_classes"], **model_kwargs)
        history = train_classifier(
            network, x_train, y_train, epochs, batch_size, learning_rate, verbose=verbose
        )
    wall_time = time.perf_counter() - start
    test = evaluate_classifier(network, x_test, y_test)
    results = {
        "train/accuracy": float(history.history["accuracy"][-1]),
        "train/loss": float(history.history["loss"][-1]),
        "test/accuracy": test["accuracy"],
        "test/loss": test["loss"],
        "train/wall_time_seconds": wall_time,
        "dataset/subset": bool(info["subset"]),
        "cache/path": directory,
    }

    # Cache (write to a temporary name first so a killed run leaves no half-written model)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        network.save(model_path + ".tmp.keras")
        os.replace(model_path + ".tmp.keras", model_path)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
    return network, results
