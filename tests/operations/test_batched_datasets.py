"""Datasets batched with a static batch size (`drop_remainder=True`, as TPUs need) as data.

Such a dataset's elements look like single examples with one axis too many; only the
model's inputs tell them apart, so every operation and baseline reads its dataset
arguments for the model it is called on. Each one must give the result it gives on the
same examples as arrays.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.core import data_adapter

BATCH = 16


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(10, activation="tanh"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ],
        name="net",
    )
    return model


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = ((x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5)).astype("int64")
    return x, y


@pytest.fixture(scope="module")
def new_task():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, (x[:, 2] > 0).astype("int64")


@pytest.fixture(scope="module")
def trained(task):
    model = _model()
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(*task, epochs=5, batch_size=32, verbose=0)
    return model


def _static(data):
    """`data` as a dataset of batches of a static size (its length is a multiple)."""
    return tf.data.Dataset.from_tensor_slices(data).batch(BATCH, drop_remainder=True)


def _arrays(data):
    return data


# `make(task, new_task, wrap)`: the operation with every data argument passed through
# `wrap` (the arrays themselves, or a statically batched dataset of them).
OPERATIONS = {
    "compress": lambda t, n, wrap: keras_fip.Compress(
        0.5,
        data=wrap(t),
        labels=1.0,
        walk=keras_fip.Walk(steps=6, batch_size=32, verbose=0, seed=0),
    ),
    "continual_learn": lambda t, n, wrap: keras_fip.ContinualLearn(
        wrap(n),
        memory=wrap(t[0]),
        eval_tasks=[wrap(t)],
        eval_every=2,
        walk=keras_fip.Walk(epochs=1, batch_size=32, verbose=0, seed=0),
    ),
    "damage_eigen": lambda t, n, wrap: keras_fip.Damage(
        keras_fip.faults.Eigen(0.5, num_eigenpairs=2), data=wrap(t), seed=0
    ),
    "damage_repair": lambda t, n, wrap: keras_fip.chain(
        keras_fip.Damage(keras_fip.faults.Nodes(0.25), seed=0),
        keras_fip.Repair(
            wrap(t),
            validation_data=wrap(t),
            walk=keras_fip.Walk(epochs=1, batch_size=32, verbose=0, seed=0),
        ),
    ),
    "ensemble": lambda t, n, wrap: keras_fip.Ensemble(
        2,
        data=wrap(t),
        diversity=keras_fip.operations.ensemble.Diversity(weight=0),
        walk=keras_fip.Walk(steps=8, batch_size=32, verbose=0, seed=0),
    ),
    "isofunctional": lambda t, n, wrap: keras_fip.Isofunctional(
        data=wrap(t[0]), walk=keras_fip.Walk(steps=4, batch_size=32, verbose=0, seed=0)
    ),
    "finetune": lambda t, n, wrap: keras_fip.baselines.FineTune(
        wrap(n), eval_tasks=[wrap(t)], walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0)
    ),
    "ewc": lambda t, n, wrap: keras_fip.baselines.EWC(
        wrap(n),
        fisher_data=wrap(t[0]),
        validation_tasks=[wrap(t)],
        lambda_grid=(1.0, 10.0),
        max_lambda_extensions=0,
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
    "replay": lambda t, n, wrap: keras_fip.baselines.ExperienceReplay(
        wrap(n), memory=wrap(t), walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0)
    ),
    "joint": lambda t, n, wrap: keras_fip.baselines.JointTraining(
        wrap(n), old_tasks=[wrap(t)], walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0)
    ),
}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_statically_batched_dataset_gives_the_arrays_result(task, new_task, trained, name):
    before = [w.copy() for w in trained.get_weights()]
    results = {}
    for label, wrap in (("arrays", _arrays), ("static", _static)):
        keras.utils.set_random_seed(0)
        operation = OPERATIONS[name](task, new_task, wrap)
        results[label] = (operation(trained), operation)
    expected, reference = results["arrays"]
    result, operation = results["static"]
    # The same examples, so the same walk: equal weights (and the same history).
    for a, b in zip(result.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for key in ("steps", "task_0/accuracy"):
        if key in (reference.history or {}):
            np.testing.assert_allclose(operation.history[key], reference.history[key])
    for a, b in zip(trained.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_several_inputs_in_a_statically_batched_dataset_of_dicts(task):
    x, y = task
    inputs = {"a": keras.Input((4,), name="a"), "b": keras.Input((2,), name="b")}
    keras.utils.set_random_seed(0)
    joined = keras.layers.Concatenate()(
        [keras.layers.Dense(8, activation="tanh")(inputs["a"]), inputs["b"]]
    )
    model = keras.Model(inputs, keras.layers.Dense(3)(joined))
    features = {"a": x[:, :4], "b": x[:, 4:]}
    read, labels = data_adapter.normalize_data(_static((features, y)), model=model)
    np.testing.assert_array_equal(read["a"], features["a"])
    np.testing.assert_array_equal(labels, y)
    results = [
        keras_fip.Compress(0.5, data=data, walk=keras_fip.Walk(steps=4, verbose=0, seed=0))(model)
        for data in ((features, y), _static((features, y)))
    ]
    for a, b in zip(results[1].get_weights(), results[0].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_without_the_model_a_statically_batched_dataset_reads_as_it_looks(task, trained):
    x, y = task
    read, labels = data_adapter.normalize_data(_static((x, y)))
    assert read.shape == (len(x) // BATCH, BATCH, 6) and labels.shape == (len(x) // BATCH, BATCH)
    read, labels = data_adapter.normalize_data(_static((x, y)), model=trained)
    np.testing.assert_array_equal(read, x)
    np.testing.assert_array_equal(labels, y)
    # Arrays are never reshaped: a stack of batches given as arrays is a shape error.
    with pytest.raises(ValueError, match=r"inputs of shape \(batch, 6\)"):
        keras_fip.Compress(
            0.5, data=x.reshape(-1, BATCH, 6), walk=keras_fip.Walk(steps=2, verbose=0)
        )(trained)
    # Single examples whose shape happens to be a batch of the inputs are not merged
    # unless every input array (and only a dataset's) has one axis too many.
    single = tf.data.Dataset.from_tensor_slices(x)
    read, _ = data_adapter.normalize_data(single, model=trained)
    np.testing.assert_array_equal(read, x)
