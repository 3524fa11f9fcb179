"""One trace per walk, and calls that leave nothing behind: the trainer builds its
optimizer before `fit` traces the step, and one walking operation called on several models,
or twice, gives what fresh operation objects give."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.masks import apply_masks
from keras_fip.engine import rules
from keras_fip.engine.trainer import FIPTrainer


class _CountingTrainer(FIPTrainer):
    """Counts the Python runs of its step: one per trace and replica."""

    traces = 0

    def train_step(self, data):
        type(self).traces += 1
        return super().train_step(data)


def _model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n)


def _traces(model, rule, optimizer=None, strategy=None):
    x, y = _data()
    _CountingTrainer.traces = 0
    with (strategy or tf.distribute.get_strategy()).scope():
        trainer = _CountingTrainer(
            model,
            rule=rule,
            secondary_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        trainer.compile(optimizer=optimizer)
        assert trainer.optimizer.built
        data = fip_dataset(model, x, secondary=(x, y), batch_size=16, seed=0)
        trainer.walk(data, 6, steps_per_epoch=2, verbose=0)
    return _CountingTrainer.traces


@pytest.mark.parametrize(
    "rule,optimizer",
    [
        (rules.Penalty(learning_rate=1e-2), keras.optimizers.Adam),
        (rules.Normalized(epsilon=0.01), None),
    ],
)
def test_a_walk_traces_its_step_once(rule, optimizer):
    # Slot variables created in the first trace would make `tf.function` trace again.
    model = _model(0)
    assert _traces(model, rule, optimizer and optimizer(1e-2)) == 1


def test_a_masked_walk_traces_its_step_once():
    model = _model(0)
    kernel = model.get_layer("hidden").kernel
    mask = np.arange(24).reshape(4, 6) % 3 > 0
    apply_masks(model, {kernel.path: mask})
    assert _traces(model, rules.Penalty(learning_rate=1e-2), keras.optimizers.Adam(1e-2)) == 1
    assert np.all(kernel.numpy()[~mask] == 0)


def test_a_mirrored_walk_traces_its_step_once(mirrored_strategy):
    # One trace runs the step once on each replica.
    with mirrored_strategy.scope():
        model = _model(0)
    traces = _traces(model, rules.Penalty(learning_rate=1e-2), strategy=mirrored_strategy)
    assert traces == mirrored_strategy.num_replicas_in_sync


@pytest.mark.parametrize("rule", [rules.Metric(epsilon=0.01), rules.Penalty(learning_rate=1e-2)])
def test_a_compiled_walk_matches_the_graph_walk(rule):
    # XLA runs the optimizer built ahead and the conjugate-gradient loop as the graph does.
    x, y = _data()
    results = []
    for jit_compile in (False, True):
        model = _model(0)
        kernel = model.get_layer("hidden").kernel
        apply_masks(model, {kernel.path: np.arange(24).reshape(4, 6) % 3 > 0})
        start = _weights(model)
        trainer = FIPTrainer(
            model,
            rule=rule,
            secondary_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        trainer.compile(jit_compile=jit_compile)
        data = fip_dataset(model, x, secondary=(x, y), batch_size=16, seed=0)
        trainer.walk(data, 4, verbose=0)
        results.append(_weights(model))
    _assert_same(results[0], results[1], "jit_compile=True differs")
    assert max(np.max(np.abs(a - b)) for a, b in zip(results[0], start)) > 1e-3


def _weights(model):
    return [np.array(w) for w in model.weights]


def _assert_same(left, right, message):
    assert len(left) == len(right), message
    for a, b in zip(left, right):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=message)


def _walk():
    return keras_fip.Walk(steps=12, batch_size=32, record_every=4, seed=0, verbose=0)


OPERATIONS = {
    "isofunctional": lambda x, y: keras_fip.Isofunctional(data=x, walk=_walk()),
    "continual_learn": lambda x, y: keras_fip.ContinualLearn(
        (x, y % 2), memory=x[:64], walk=_walk()
    ),
    "repair": lambda x, y: keras_fip.Repair(data=(x, y), walk=_walk()),
    "compress": lambda x, y: keras_fip.Compress(0.5, data=(x, y), walk=_walk()),
}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_one_operation_called_on_two_models_gives_what_fresh_operations_give(
    name, digits, trained_small_mlp
):
    x, y, _, _ = digits
    x, y = x[:256], y[:256]
    first = trained_small_mlp
    # A second model of the same architecture, away from the first.
    second = keras_fip.engine.copy_model(first)
    for variable in second.trainable_variables:
        variable.assign(variable * 0.9)
    if name == "repair":
        damage = keras_fip.Damage(keras_fip.faults.Nodes(fraction=0.25), seed=0)
        first, second = damage(first), damage(second)
    make = OPERATIONS[name]

    keras.utils.set_random_seed(0)
    fresh_first = _weights(make(x, y)(first))
    keras.utils.set_random_seed(0)
    fresh_second = _weights(make(x, y)(second))

    keras.utils.set_random_seed(0)
    operation = make(x, y)
    again_first = _weights(operation(first))
    again_second = _weights(operation(second))
    again_first_twice = _weights(operation(first))
    _assert_same(again_first, fresh_first, f"{name}: first call differs from a fresh object")
    _assert_same(
        again_second, fresh_second, f"{name}: a call after another model differs from a fresh one"
    )
    _assert_same(again_first_twice, fresh_first, f"{name}: a repeated call differs")
    # The two models' walks differ: the comparison can tell the calls apart.
    assert any(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(fresh_first, fresh_second))
