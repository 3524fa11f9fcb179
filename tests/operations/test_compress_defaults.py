"""Compress with default arguments on models built here, never seen when tuning them.

A BatchNorm residual conv net and an MLP on the digits, at 50%, 80% and 90%: the sparsity
is exact, no layer is emptied (the layer-collapse floor), the walk is long enough however
few the inputs (the schedule's `min_steps` budget) and the accuracy stays close to the
dense network.
"""

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import data
from keras_fip import models
from keras_fip.core import projection
from keras_fip.operations.compress import Prunable
from keras_fip.operations.compress import Saliency
from keras_fip.operations.compress import Schedule

SPARSITIES = (0.5, 0.8, 0.9)
# The largest accuracy loss tolerated at each sparsity (fractions of the test set). The
# residual net's training depends on the process's random-op history (test order, xdist
# worker), and so does what it keeps at 90% (211 weights are left), where gradual magnitude
# pruning with labels at the same budget loses as much.
MAX_LOSS = {0.5: 0.02, 0.8: 0.05, 0.9: 0.22}
_CACHE = {}


def _residual_net():
    """A small BatchNorm residual conv net (stem conv, BN, ReLU, a residual conv block,
    global pooling, Dense 32, logits)."""
    keras.utils.set_random_seed(1)
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    stem = layers.ReLU()(
        layers.BatchNormalization()(layers.Conv2D(12, 3, padding="same", name="stem")(inputs))
    )
    block = layers.BatchNormalization()(layers.Conv2D(12, 3, padding="same")(stem))
    hidden = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.Add()([stem, block])))
    hidden = layers.Dense(32, activation="relu")(hidden)
    return keras.Model(inputs, layers.Dense(10)(hidden), name="residual")


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="mlp",
    )


def _trained(kind):
    if kind not in _CACHE:
        x, y = data.load("digits")
        model = _residual_net() if kind == "residual" else _mlp()
        # 40 epochs: Keras' BatchNorm momentum 0.99 needs them for its moving statistics.
        models.train_classifier(
            model, x, y, epochs=40 if kind == "residual" else 20, batch_size=64, learning_rate=3e-3
        )
        _CACHE[kind] = model
    return _CACHE[kind]


def _accuracy(model):
    x_test, y_test = data.load("digits", "test")
    return models.evaluate_classifier(model, x_test, y_test)["accuracy"]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", ["residual", "mlp"])
def test_default_compress_keeps_unseen_models_accurate(kind, sparsity):
    model = _trained(kind)
    x, _ = data.load("digits")
    operation = keras_fip.Compress(sparsity, data=x, walk=keras_fip.Walk(seed=0, verbose=0))
    sparse = operation(model)

    # Exact sparsity, no layer emptied
    variables = projection.prunable_variables(sparse)
    total = sum(int(np.prod(v.shape)) for v in variables)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables)
    assert zeros == round(sparsity * total)
    densities = projection.erk_densities([v.shape for v in variables], 1.0 - sparsity)
    floor = projection.resolve_layer_floor(model, "auto")
    for variable, density in zip(variables, densities):
        kept = int(np.count_nonzero(variable.numpy()))
        assert kept >= np.ceil(floor * density * np.prod(variable.shape)) - 1, variable.path

    # A walk that does not shrink with the data
    assert operation.history["steps"] == Schedule().min_steps == 1000
    assert operation.history["target_updates"] >= 40

    # The function is kept
    assert _accuracy(sparse) >= _accuracy(model) - MAX_LOSS[sparsity]


def _total_steps(num_examples, schedule=None, **walk):
    operation = keras_fip.Compress(0.5, schedule=schedule, walk=keras_fip.Walk(**walk))
    return operation.schedule.total_steps(operation.resolved_walk(), num_examples)


def test_walk_steps_follow_the_walks_budget_and_the_floor():
    assert _total_steps(1000) == 1000  # 10 epochs of 8 steps, raised to the floor
    assert _total_steps(1000, epochs=20) == 1000
    assert _total_steps(1000, epochs=20, batch_size=8) == 2500
    assert _total_steps(1000, Schedule(min_steps=0), epochs=10) == 80
    assert _total_steps(1000, steps=37) == 37  # A `steps` budget is taken exactly.
    schedule = Schedule()
    assert schedule.update_interval(700) == 17  # 40 updates
    assert schedule.update_interval(10_000) == 50
    assert schedule.update_interval(48) == 10
    assert Schedule(update_every=7).update_interval(700) == 7
    assert [round(schedule.target_sparsity(s, 100, 0.9), 4) for s in (0, 35, 70, 99)] == [
        0.0,
        0.7875,
        0.9,
        0.9,
    ]


def test_history_counts_the_steps_taken():
    model = _mlp()
    x, _ = data.load("digits")
    walk = keras_fip.Walk(steps=30, seed=0, verbose=0)
    operation = keras_fip.Compress(0.5, data=x[:256], walk=walk)
    operation(model)
    assert operation.history["steps"] == 30
    assert operation.history["pull_steps"] == 21
    assert len(operation.history["distance"]) == 30


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: keras_fip.Walk(steps=2.5), "`steps`"),
        (lambda: Schedule(min_steps=-1), "`min_steps`"),
        (lambda: Schedule(update_every="often"), "`update_every`"),
        (lambda: Schedule(update_every=0), "`update_every`"),
        (lambda: Saliency(layer_floor=2.0), "`layer_floor`"),
    ],
)
def test_bad_budget_arguments_fail_in_init(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def _rms_of_live_weights(model):
    weights = np.concatenate([v.numpy().ravel() for v in projection.prunable_variables(model)])
    live = weights[weights != 0].astype("float64")
    return float(np.sqrt(np.mean(live**2)))


def test_auto_learning_rate_scales_with_the_prunable_weights():
    model = _mlp()
    x, _ = data.load("digits")
    x = x[:256]
    # Three times the weights, some already zero: the rate scales with the live weights.
    scaled = keras.models.clone_model(model)
    scaled.set_weights([3.0 * w for w in model.get_weights()])
    kernel = projection.prunable_variables(scaled)[0]
    kernel.assign(np.where(np.arange(kernel.shape[-1]) % 2 == 0, kernel.numpy(), 0.0))
    walk = keras_fip.Walk(steps=4, beta=1.0, seed=0, verbose=0)
    rates = []
    for start in (model, scaled):
        operation = keras_fip.Compress(0.5, data=x, walk=walk)
        walked = operation(start)
        expected = keras_fip.rules.AUTO_LEARNING_RATE_SCALE * _rms_of_live_weights(start)
        assert operation.history["learning_rate"] == pytest.approx(expected, rel=1e-6)
        rates.append(operation.history["learning_rate"])
    assert rates[1] > 2.5 * rates[0]
    # The walk is the one an explicit rate of that value takes (recorded as given).
    explicit = keras_fip.Compress(
        0.5,
        data=x,
        walk=keras_fip.Walk(
            steps=4, beta=1.0, seed=0, verbose=0, rule=keras_fip.rules.Penalty(rates[1])
        ),
    )
    for a, b in zip(walked.get_weights(), explicit(scaled).get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert explicit.history["learning_rate"] == rates[1]


def test_learning_rate_round_trips_through_the_config():
    for learning_rate in ("auto", 2e-3):
        rule = keras_fip.rules.Penalty(learning_rate)
        operation = keras_fip.Compress(0.5, walk=keras_fip.Walk(rule=rule))
        clone = keras_fip.Compress.from_config(operation.get_config())
        assert clone.walk.rule.learning_rate == learning_rate
        assert clone.get_config() == operation.get_config()
    assert keras_fip.Compress(0.5).resolved_walk().rule.learning_rate == "auto"


def test_defaults_use_the_labels_and_tfmots_prunable_set():
    operation = keras_fip.Compress(0.5)
    assert operation.labels == "auto"
    assert operation.prunable == Prunable(biases=False, normalization=False, embeddings=True)
    assert operation.saliency == Saliency("magnitude", scope="global", layer_floor="auto")
    assert operation.schedule == Schedule(1000, 0.7, 0.7, 3, "auto")
    assert keras_fip.compress.CANDIDATES[0] == (0.0, 1.0)  # The inputs alone first.
    assert keras_fip.compress.CANDIDATES == ((0.0, 1.0), (1.0, 1.0), (0.0, 0.1))
    walk = operation.resolved_walk()
    assert (walk.epochs, walk.distance, walk.beta, walk.batch_size) == (10, "kl", "auto", 128)
    clone = keras_fip.Compress.from_config(operation.get_config())
    assert clone.get_config() == operation.get_config()
