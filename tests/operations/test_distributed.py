"""Every operation under `tf.distribute.MirroredStrategy` (two logical CPUs) gives the
one-device result.

Each case runs once on one device and once with the model built and the operation called
inside the strategy's scope (each global batch split over the two replicas, per-replica
losses scaled as Keras scales them, gradients summed), from the same seed, and compares
every weight of the result. Networks without BatchNormalization are compared: a
BatchNorm network walked in training mode normalises each replica's half batch with its
own statistics, as Keras's `fit` does under a strategy (unless the layers are
`synchronized`), so it legitimately differs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.operations.repair import recovery_path
from tests.operations.contract import contract_data
from tests.operations.contract import trained_model

# Relative to the largest weight. The float32 sums split over two replicas differ from
# one device's in the last bits; Adam's normalised steps carry that into 1e-5..1e-4 after
# a few steps (on weights whose gradient is near zero). A loss scaled twice (or not at
# all) by the replicas moves the weights by 7e-3..2e-2 of the largest here.
RTOL = 3e-4


def _damaged():
    return keras_fip.Damage(keras_fip.faults.Nodes(0.25), seed=3)(trained_model("sequential"))


def _recovery_end(model):
    x, _ = contract_data()
    damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.25), seed=3)(model)
    masks = keras_fip.damage_reference(damaged).damage_masks
    points, _ = recovery_path(model, masks, x, num_points=3, steps_per_point=4, seed=0)
    end = keras_fip.engine.copy_model(model)
    end.set_weights(points[-1])
    return end


_TRANSFORMER = {}


def _tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (256, 12)).astype("int32")
    return tokens, (tokens[:, 0] % 3).astype("int64")


def _transformer():
    """A small attention classifier (token and position embeddings, MultiHeadAttention,
    residual adds, LayerNorm) trained briefly on random token sequences; a fresh copy."""
    if "model" not in _TRANSFORMER:
        tokens, labels = _tokens()
        keras.utils.set_random_seed(0)
        model = keras_fip.models.transformer_classifier(
            vocab_size=50,
            sequence_length=12,
            num_classes=3,
            embed_dim=16,
            num_heads=2,
            feed_forward_dim=32,
            num_layers=1,
        )
        model.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(tokens, labels, epochs=3, batch_size=64, verbose=0)
        _TRANSFORMER["model"] = model
    return keras_fip.engine.copy_model(_TRANSFORMER["model"])


_SEVERAL = {}


def _several_inputs():
    """The dict-input network of `test_structured_inputs`, trained briefly; a fresh copy
    with its data `(x, y)`."""
    from tests.operations.test_structured_inputs import _two_input_model

    if "model" not in _SEVERAL:
        rng = np.random.default_rng(0)
        x = {
            "a": rng.normal(size=(160, 5)).astype("float32"),
            "b": rng.normal(size=(160, 3)).astype("float32"),
        }
        y = (x["a"][:, 0] + x["b"][:, 1] > 0).astype("int64")
        model = _two_input_model("dict")
        model.compile(
            keras.optimizers.Adam(1e-2),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, epochs=5, batch_size=32, verbose=0)
        _SEVERAL.update(model=model, data=(x, y))
    return keras_fip.engine.copy_model(_SEVERAL["model"])


def _several_data():
    if "data" not in _SEVERAL:
        _several_inputs()
    return _SEVERAL["data"]


def _cases():
    x, y = contract_data()
    tokens, token_labels = _tokens()
    new_tokens = (tokens[128:], (tokens[128:, 1] % 2).astype("int64"))
    new_task = (x[200:], y[200:] % 3)
    repair = dict(validation_split=0.25, walk=keras_fip.Walk(epochs=1, seed=0, verbose=0))
    solver = keras_fip.repair.OutputLayerSolver(128, sweeps=2)
    return {
        "compress": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.Compress(
                0.5, data=x, walk=keras_fip.Walk(steps=8, seed=0, verbose=0)
            ),
        ),
        "compress_with_labels": (
            lambda: trained_model("functional"),
            lambda: keras_fip.Compress(
                0.5, data=(x, y), labels=1.0, walk=keras_fip.Walk(steps=8, seed=0, verbose=0)
            ),
        ),
        "continual_learn": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.ContinualLearn(
                new_task,
                memory=x[:200],
                walk=keras_fip.Walk(epochs=1, batch_size=64, seed=0, verbose=0),
            ),
        ),
        "damage_eigen": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.Damage(
                keras_fip.faults.Eigen(0.5, num_eigenpairs=3, examples=100), data=(x, y), seed=3
            ),
        ),
        "damage_bitflip": (
            lambda: trained_model("functional"),
            lambda: keras_fip.Damage(keras_fip.faults.BitFlips(20, bits="mantissa"), seed=3),
        ),
        "repair_fip_with_solves": (
            _damaged,
            lambda: keras_fip.Repair(x, method=keras_fip.repair.FIP(solver=solver), **repair),
        ),
        "repair_fip_two_paths": (
            _damaged,
            lambda: keras_fip.Repair(x, method=keras_fip.repair.FIP(num_paths=2), **repair),
        ),
        "repair_retrain": (
            _damaged,
            lambda: keras_fip.Repair(
                (x, y), method="retrain", walk=keras_fip.Walk(epochs=1, seed=0, verbose=0)
            ),
        ),
        "repair_embryonic": (
            _damaged,
            lambda: keras_fip.Repair(
                (x, y), method="embryonic", walk=keras_fip.Walk(epochs=1, seed=0, verbose=0)
            ),
        ),
        "damage_repair": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.DamageRepair(
                2,
                count=3,
                seed=0,
                layers=["contract_hidden"],
                repair=keras_fip.Repair(x, **repair),
            ),
        ),
        "ensemble": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.Ensemble(
                2, data=x, walk=keras_fip.Walk(steps=6, batch_size=64, seed=0, verbose=0)
            ),
        ),
        "ensemble_with_labels": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.Ensemble(
                2, data=(x, y), walk=keras_fip.Walk(steps=6, batch_size=64, seed=0, verbose=0)
            ),
        ),
        "isofunctional": (
            lambda: trained_model("sequential"),
            lambda: keras_fip.Isofunctional(
                data=x, walk=keras_fip.Walk(steps=8, seed=0, verbose=0)
            ),
        ),
        "recovery_path": (lambda: trained_model("sequential"), lambda: _recovery_end),
        # Attention: sparse (IndexedSlices) embedding gradients summed over replicas.
        "attention/compress": (
            _transformer,
            lambda: keras_fip.Compress(
                0.5, data=tokens, walk=keras_fip.Walk(steps=8, seed=0, verbose=0)
            ),
        ),
        "attention/compress_embeddings_with_labels": (
            _transformer,
            lambda: keras_fip.Compress(
                0.5,
                data=(tokens, token_labels),
                labels=1.0,
                prunable=keras_fip.compress.Prunable(embeddings=True),
                walk=keras_fip.Walk(steps=8, seed=0, verbose=0),
            ),
        ),
        "attention/continual_learn": (
            _transformer,
            lambda: keras_fip.ContinualLearn(
                new_tokens,
                memory=tokens[:128],
                walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0, verbose=0),
            ),
        ),
        "attention/damage_eigen": (
            _transformer,
            lambda: keras_fip.Damage(
                keras_fip.faults.Eigen(0.5, num_eigenpairs=2, examples=64),
                data=(tokens, token_labels),
                seed=3,
            ),
        ),
        # The penalty rule: the metric rule's CG turns last-bit differences of g·v into
        # ~1e-4 of the weights on attention nets after a few steps (its conditioning);
        # its exact agreement is checked on the MLP cases above.
        "attention/ensemble_with_labels": (
            _transformer,
            lambda: keras_fip.Ensemble(
                2,
                data=(tokens, token_labels),
                walk=keras_fip.Walk(steps=6, batch_size=32, rule="penalty", seed=0, verbose=0),
            ),
        ),
        # Several inputs (a dict of arrays), split over the replicas input by input.
        "several_inputs/compress_with_labels": (
            _several_inputs,
            lambda: keras_fip.Compress(
                0.5,
                data=_several_data(),
                labels=1.0,
                walk=keras_fip.Walk(steps=8, seed=0, verbose=0),
            ),
        ),
        "several_inputs/continual_learn": (
            _several_inputs,
            lambda: keras_fip.ContinualLearn(
                (
                    {key: value[::-1] for key, value in _several_data()[0].items()},
                    _several_data()[1],
                ),
                memory=_several_data()[0],
                walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0, verbose=0),
            ),
        ),
        "several_inputs/damage_eigen": (
            _several_inputs,
            lambda: keras_fip.Damage(
                keras_fip.faults.Eigen(0.5, num_eigenpairs=2), data=_several_data(), seed=3
            ),
        ),
    }


CASES = sorted(_cases())


def weights_of(result):
    """Every weight of an operation's or baseline's result (its first element if a
    tuple; every member of an ensemble), flattened into one vector."""
    if isinstance(result, (list, tuple)):
        result = result[0]
    try:
        members = keras_fip.ensemble_members(result)
    except ValueError:
        members = [result]
    return np.concatenate([np.ravel(w) for member in members for w in member.get_weights()])


@pytest.mark.parametrize("name", CASES)
def test_operation_under_mirrored_strategy_equals_one_device(name, mirrored_strategy):
    make_model, make_operation = _cases()[name]
    keras.utils.set_random_seed(0)
    alone = weights_of(make_operation()(make_model()))
    keras.utils.set_random_seed(0)
    with mirrored_strategy.scope():
        model = make_model()
        assert isinstance(model.trainable_variables[0].value, tf.distribute.DistributedValues)
        result = make_operation()(model)
    distributed = weights_of(result)
    assert distributed.shape == alone.shape
    scale = np.max(np.abs(alone))
    np.testing.assert_allclose(distributed, alone, rtol=0, atol=RTOL * scale)
    start = weights_of(make_model())
    if start.shape == alone.shape and name != "damage_bitflip":
        # The comparison can fail: the weights moved by much more than the tolerance.
        assert np.max(np.abs(alone - start)) > 10 * RTOL * scale
