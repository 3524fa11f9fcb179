"""Tests for Isofunctional, the pure FIP walk, and the Operation's walk machinery."""

import hashlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.operations import chain


def _hash(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def digits_model():
    """A small MLP trained on the real scikit-learn digits."""
    x, y = keras_fip.data.load("digits", "train")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    return model, x


def _squared_output_change(model, other, x):
    return float(
        np.mean(np.sum((model.predict(x, verbose=0) - other.predict(x, verbose=0)) ** 2, -1))
    )


def test_walk_keeps_function_far_better_than_straight_line(digits_model):
    model, x = digits_model
    before = _hash(model)
    walk = keras_fip.Isofunctional(
        data=x,
        walk=keras_fip.Walk(
            steps=40,
            rule=keras_fip.rules.Metric(epsilon=0.05),
            batch_size=128,
            seed=0,
            verbose=0,
            record_every=10,
        ),
    )
    moved = walk(model)
    assert _hash(model) == before
    distance = walk.history["distance_from_start"][-1]
    assert distance > 1.5
    # The same distance straight along the push direction changes the outputs far more.
    direction = keras_fip.operations.isofunctional.random_direction(model, seed=0)
    straight = keras.models.clone_model(model)
    straight.set_weights([w + distance * u for w, u in zip(model.get_weights(), direction)])
    fip_change = _squared_output_change(model, moved, x)
    straight_change = _squared_output_change(model, straight, x)
    assert fip_change < 0.2 * straight_change
    assert list(walk.path.steps) == [0, 10, 20, 30, 40]
    assert len(walk.history["distance"]) == 40


def test_callbacks_progress_and_tensorboard_logging(digits_model, tmp_path):
    model, x = digits_model

    class Count(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            Count.batches += 1

    log_dir = str(tmp_path / "logs")
    walk = keras_fip.Isofunctional(
        data=x,
        push="shrink",
        walk=keras_fip.Walk(
            steps=3,
            rule="normalized",
            batch_size=64,
            callbacks=[Count()],
            log_dir=log_dir,
            verbose=0,
        ),
    )
    walk(model)
    assert Count.batches == 3
    events = [os.path.join(root, name) for root, _, names in os.walk(log_dir) for name in names]
    assert len(events) == 1
    tags = {
        value.tag
        for record in tf.compat.v1.train.summary_iterator(events[0])
        for value in record.summary.value
    }
    assert {"fip/distance", "fip/step_norm", "fip/distance_from_start"} <= tags


def test_config_round_trip_and_chain_of_walks(digits_model):
    model, x = digits_model
    x = x[:64]
    walk = keras_fip.Isofunctional(
        data=x,
        walk=keras_fip.Walk(
            steps=3, rule=keras_fip.rules.Normalized(0.02), batch_size=32, seed=1, verbose=0
        ),
    )
    restored = keras_fip.Isofunctional.from_config(walk.get_config())
    assert restored.get_config() == walk.get_config()
    assert restored.resolved_walk().rule == keras_fip.rules.Normalized(0.02)
    assert restored.resolved_walk().seed == 1
    both = chain(walk, restored)
    result = both(model)
    assert both.path is restored.path
    assert len(both.paths) == 2
    assert result is not model


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"walk": {"steps": 0}}, "Received: steps=0"),
        (
            {"walk": {"rule": {"class_name": "keras_fip>Metric", "config": {"epsilon": -0.1}}}},
            "epsilon",
        ),
        ({"push": "north"}, "Received: push='north'"),
        ({"walk": {"rule": "newton"}}, "Received: rule='newton'"),
        ({"push": "none"}, "Received: push='none', rule=Metric"),
        ({"walk": {"batch_size": 2.5}}, "Received: batch_size=2.5"),
        ({"data": np.full((4, 2), np.nan)}, "`data` must not contain NaN"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_fip.Isofunctional(**kwargs)
