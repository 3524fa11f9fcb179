"""The shared contract every keras_fip `Operation` is tested against (like Keras's
`run_layer_test`).

`run_operation_contract(make_operation)` runs an operation on three small trained models
(Sequential, functional, BatchNorm residual; inputs (8, 8, 1), 10 logits) and checks:

- config round-trip: `from_config(get_config())` and Keras (de)serialisation give an equal
  config;
- no mutation: the input model's weights, masks and carried data are unchanged;
- the result is a new, built `keras.Model` with finite outputs;
- chain equivalence: `chain(op, other)(m)` equals `other(op(m))` for a deterministic
  `other` (the operation must be deterministic under its seed), on the last of the models
  run (`chain` hands one model to the next operation whatever the model's kind, and the
  last is the BatchNorm residual net by default, whose walks are the least deterministic);
- masks carried in are kept: a kernel masked before the call is still masked after it,
  its weights exactly zero, and still zero after a later optimizer step;
- `.keras` save/load: equal outputs, the same masks;
- SavedModel (`keras_fip.export`): the `serve` endpoint gives equal outputs.

Example (in a test module):

    from tests.operations.contract import run_operation_contract

    def test_compress_meets_the_operation_contract():
        run_operation_contract(
            lambda model, x, y: keras_fip.Compress(
                0.5, data=x, walk=keras_fip.Walk(steps=8, seed=0, verbose=0)))
"""

import hashlib
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import keras_fip
from keras_fip.operations import Operation
from keras_fip.operations import carried_data
from keras_fip.operations import chain

MODELS = ("sequential", "functional", "batchnorm_residual")
# Name of the hidden layer every contract model has; its kernel carries the mask the
# contract checks is kept.
MASKED_LAYER = "contract_hidden"
_TRAINED = {}


@keras.saving.register_keras_serializable(package="keras_fip_tests")
class ContractScale(Operation):
    """A deterministic operation: multiplies every trainable weight by `factor` (masked
    zeros stay zero)."""

    def __init__(self, factor=0.999, **kwargs):
        super().__init__(**kwargs)
        self.factor = self.check_number(factor, "factor", low=0.0)

    def call(self, model):
        for variable in model.trainable_variables:
            variable.assign(variable * self.factor)
        return model

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class KillAt(keras.callbacks.Callback):
    """Stops a walk at its `at`-th step (counted across phases), as a killed run would:
    the checkpoint tests resume from what the walk saved before it."""

    def __init__(self, at):
        super().__init__()
        self.at = at
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at:
            raise KeyboardInterrupt(f"killed at step {self.at}")


def contract_data(num_examples=400):
    """`(x, y)`: the first digits training examples, as (N, 8, 8, 1) float32 in [0, 1]."""
    x, y = keras_fip.data.load("digits")
    return x[:num_examples].astype("float32"), y[:num_examples].astype("int64")


def build_model(kind, seed=0):
    """One of the contract's models, untrained: `"sequential"`, `"functional"` (a small
    conv net) or `"batchnorm_residual"` (conv, BatchNorm, a residual add, global pooling).

    Args:
        kind: One of `MODELS`.
        seed: Initialisation seed. Defaults to `0`.

    Returns:
        A `keras.Model` taking (8, 8, 1) inputs and returning 10 logits.
    """
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                layers.Flatten(),
                layers.Dense(24, activation="relu", name=MASKED_LAYER),
                layers.Dense(16, activation="relu"),
                layers.Dense(10, name="logits"),
            ],
            name="contract_sequential",
        )
    inputs = keras.Input((8, 8, 1))
    if kind == "functional":
        hidden = layers.Conv2D(6, 3, activation="relu", name=MASKED_LAYER)(inputs)
        hidden = layers.Flatten()(hidden)
        hidden = layers.Dense(16, activation="relu")(hidden)
    elif kind == "batchnorm_residual":
        stem = layers.Conv2D(8, 3, padding="same", use_bias=False, name=MASKED_LAYER)(inputs)
        stem = layers.ReLU()(layers.BatchNormalization()(stem))
        block = layers.Conv2D(8, 3, padding="same", use_bias=False)(stem)
        block = layers.BatchNormalization()(block)
        hidden = layers.ReLU()(layers.Add()([stem, block]))
        hidden = layers.GlobalAveragePooling2D()(hidden)
    else:
        raise ValueError(f"`kind` must be one of {MODELS}. Received: kind={kind!r}")
    outputs = layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, outputs, name=f"contract_{kind}")


def trained_model(kind):
    """A contract model trained briefly on `contract_data()` (cached for the session);
    returns a fresh copy each call."""
    if kind not in _TRAINED:
        model = build_model(kind)
        x, y = contract_data()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, epochs=8, batch_size=64, verbose=0)
        _TRAINED[kind] = model
    return keras_fip.engine.copy_model(_TRAINED[kind])


def _fingerprint(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    for key, mask in sorted(keras_fip.masks(model).items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(mask).tobytes())
    carried = carried_data(model)
    if carried is not None:
        digest.update(np.ascontiguousarray(carried).tobytes())
    return digest.hexdigest()


def _outputs(model, x):
    return np.asarray(model(x, training=False))


def _all_layers(model):
    """Every layer of `model`, nested models included (public API only)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _masked_kernel(model):
    """The kernel of the contract's hidden layer (searched in nested models too)."""
    for layer in _all_layers(model):
        if layer.name == MASKED_LAYER:
            return layer.kernel
    return None


def _mask_hidden_kernel(model, fraction=0.3, seed=0):
    """Masks `fraction` of the hidden kernel (in place, on a copy) and returns the mask."""
    kernel = _masked_kernel(model)
    rng = np.random.default_rng(seed)
    mask = rng.random(tuple(kernel.shape)) >= fraction
    keras_fip.engine.apply_masks(model, {kernel.path: mask})
    return mask


def _check_config(operation):
    config = operation.get_config()
    twin = type(operation).from_config(config)
    assert twin.get_config() == config, "from_config(get_config()) changed the config"
    serialized = keras.saving.serialize_keras_object(operation)
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(operation)
    assert restored.get_config() == config, "Keras (de)serialisation changed the config"


def _check_masks_kept(result, mask, members):
    """Every member's hidden kernel keeps `mask` (AND-ed with any new one): masked, zero,
    and still zero after an optimizer step."""
    for member in members(result):
        kernel = _masked_kernel(member)
        assert kernel is not None, f"no layer {MASKED_LAYER!r} in {member.name}"
        carried = keras_fip.masks(member).get(kernel.path)
        assert carried is not None, "the mask carried in was dropped"
        assert not np.any(carried[~mask]), "the mask carried in was released"
        assert np.all(np.asarray(kernel.numpy())[~mask] == 0.0)
    # A later optimizer step keeps the zeros (the masks are real constraints).
    optimizer = keras.optimizers.Adam(1e-2)
    x, _ = contract_data(32)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.ops.square(result(x, training=False)))
    gradients = tape.gradient(loss, result.trainable_variables)
    optimizer.apply(gradients, result.trainable_variables)
    for member in members(result):
        kernel = _masked_kernel(member)
        assert np.all(np.asarray(kernel.numpy())[~mask] == 0.0), "training revived masks"


def _check_round_trips(result, x, atol):
    expected = _outputs(result, x)
    with tempfile.TemporaryDirectory() as directory:
        # `.keras` save/load
        path = os.path.join(directory, "model.keras")
        result.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            _outputs(loaded, x),
            expected,
            atol=atol,
            rtol=0,
            err_msg=".keras round trip changed the outputs",
        )
        before = [m for _, m in sorted(keras_fip.masks(result).items())]
        after = [m for _, m in sorted(keras_fip.masks(loaded).items())]
        assert len(before) == len(after), ".keras round trip lost masks"
        assert sum(int((~m).sum()) for m in before) == sum(int((~m).sum()) for m in after)
        # SavedModel for serving
        serving = os.path.join(directory, "serving")
        keras_fip.export(result, serving)
        restored = tf.saved_model.load(serving)
        served = np.asarray(restored.serve(tf.constant(x)))
        np.testing.assert_allclose(
            served, expected, atol=atol, rtol=0, err_msg="SavedModel serve differs from the model"
        )


def run_operation_contract(
    make_operation,
    models=MODELS,
    check_chain=True,
    check_masks=True,
    check_export=True,
    members=None,
    seed=0,
    atol=1e-5,
    chain_atol=1e-4,
):
    """Runs an operation through the shared contract on each of `models`.

    Args:
        make_operation: `make_operation(model, x, y) -> Operation`: a fresh, seeded
            operation for that model and its data (`x`: (N, 8, 8, 1) float32 in [0, 1],
            `y`: labels 0..9).
        models: The contract models to run on (names from `MODELS`). Defaults to all.
        check_chain: Whether to check `chain(op, other)(m) == other(op(m))` on the last
            of `models`; needs a deterministic operation. Defaults to `True`.
        check_masks: Whether to check that a mask carried in is kept. Defaults to `True`.
        check_export: Whether to check the `.keras` and SavedModel round trips. Defaults
            to `True`.
        members: `members(result) -> list of keras.Model` holding the hidden layer whose
            mask is checked (e.g. `keras_fip.ensemble_members`). Defaults to `None` (the
            result itself).
        seed: Global seed set before each run. Defaults to `0`.
        atol: Tolerance of the round-trip output comparisons. Defaults to `1e-5`.
        chain_atol: Tolerance of the chain-equivalence comparison. Defaults to `1e-4`.

    Returns:
        A dict mapping each model name to the operation's result on it.
    """
    members = members or (lambda model: [model])
    x, y = contract_data()
    results = {}
    for kind in models:
        model = trained_model(kind)
        fingerprint = _fingerprint(model)

        # Config round-trip
        operation = make_operation(model, x, y)
        assert isinstance(operation, Operation)
        _check_config(operation)

        # One run: a new model, the input untouched
        keras.utils.set_random_seed(seed)
        result = operation(model)
        assert isinstance(result, keras.Model) and result is not model
        assert _fingerprint(model) == fingerprint, f"{kind}: the input model was mutated"
        outputs = _outputs(result, x)
        assert np.all(np.isfinite(outputs)), f"{kind}: non-finite outputs"
        results[kind] = result

        # chain(op, other)(m) == other(op(m)), on the last model
        if check_chain and kind == models[-1]:
            other = ContractScale(0.999)
            sequential = _outputs(other(result), x)
            keras.utils.set_random_seed(seed)
            chained = chain(make_operation(model, x, y), ContractScale(0.999))(model)
            np.testing.assert_allclose(
                _outputs(chained, x),
                sequential,
                atol=chain_atol,
                rtol=0,
                err_msg=f"{kind}: chain(op, other)(m) differs from other(op(m))",
            )
            assert _fingerprint(model) == fingerprint

        # Masks carried in are kept
        if check_masks:
            masked = trained_model(kind)
            mask = _mask_hidden_kernel(masked)
            keras.utils.set_random_seed(seed)
            _check_masks_kept(make_operation(masked, x, y)(masked), mask, members)

        # .keras and SavedModel round trips
        if check_export:
            _check_round_trips(result, x, atol)
    return results
