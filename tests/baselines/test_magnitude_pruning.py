import hashlib

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import baselines
from keras_fip import data
from keras_fip import models
from keras_fip.core import projection


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    x, y = data.load("digits")
    model = models.mlp(64, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=8, batch_size=64, learning_rate=1e-2)
    return model, x, y


def _digest(model):
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def _prunable_zero_fraction(model):
    variables = projection.prunable_variables(model)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables)
    return zeros / sum(int(np.prod(v.shape)) for v in variables)


def test_polynomial_decay_matches_tfmot_formula():
    schedule = [
        baselines.polynomial_decay_sparsity(t, 0.9, 100, 200) for t in (0, 100, 150, 200, 300)
    ]
    assert schedule[:2] == [0.0, 0.0]
    assert schedule[2] == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule[3:] == [pytest.approx(0.9), pytest.approx(0.9)]


@pytest.mark.parametrize(
    "method, kwargs",
    [
        (baselines.one_shot_magnitude_pruning, {"scope": "global"}),
        (baselines.gradual_magnitude_pruning, {"scope": "per_layer", "frequency": 5}),
        (baselines.lottery_ticket, {"rounds": 2}),
    ],
    ids=["one_shot", "gradual", "lottery_ticket"],
)
def test_baseline_reaches_exact_sparsity_keeps_masks_and_input(trained, method, kwargs):
    model, x, y = trained
    before = _digest(model)
    pruned = method(model, 0.8, x, y, epochs=2, batch_size=64, learning_rate=1e-3, **kwargs)
    assert _digest(model) == before  # the input is never mutated
    assert _prunable_zero_fraction(pruned) == pytest.approx(0.8, abs=1e-3)
    carried = keras_fip.core.masks.masks(pruned)
    assert set(carried) == {v.path for v in projection.prunable_variables(pruned)}
    # The masks travel: plain training afterwards keeps the zeros.
    models.train_classifier(pruned, x, y, epochs=1, batch_size=64, learning_rate=1e-2)
    assert _prunable_zero_fraction(pruned) == pytest.approx(0.8, abs=1e-3)
    accuracy = models.evaluate_classifier(pruned, x, y)["accuracy"]
    assert accuracy > 0.8  # an 80%-sparse digits MLP still works


def test_gradual_pruning_recovers_better_than_unretrained_projection(trained):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    projected = keras_fip.engine.copy_model(model)
    masks = projection.magnitude_masks(projected, 0.95, scope="per_layer")
    keras_fip.engine.apply_masks(projected, masks)
    gradual = baselines.gradual_magnitude_pruning(
        model, 0.95, x, y, epochs=4, batch_size=64, learning_rate=3e-3, frequency=5
    )
    assert (
        models.evaluate_classifier(gradual, x_test, y_test)["accuracy"]
        > models.evaluate_classifier(projected, x_test, y_test)["accuracy"]
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"sparsity": 1.0}, "`sparsity`"),
        ({"sparsity": 0.5, "epochs": 0}, "`epochs`"),
        ({"sparsity": 0.5, "structure": "x"}, "`structure`"),
    ],
)
def test_bad_arguments_fail_before_any_work(trained, kwargs, argument):
    model, x, y = trained
    with pytest.raises(ValueError, match=argument):
        baselines.gradual_magnitude_pruning(model, x=x, y=y, **kwargs)


def test_nan_in_data_is_rejected(trained):
    model, x, y = trained
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`x` must be finite"):
        baselines.one_shot_magnitude_pruning(model, 0.5, bad, y)


def test_baselines_prune_the_set_compress_prunes_embeddings_included():
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    tokens = keras.layers.Embedding(40, 8, name="tokens")(ids)
    attended = keras.layers.MultiHeadAttention(2, 4, name="attention")(tokens, tokens)
    pooled = keras.layers.GlobalAveragePooling1D()(tokens + attended)
    model = keras.Model(ids, keras.layers.Dense(3, activation="softmax", name="head")(pooled))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 40, (64, 6)).astype("int32"), rng.integers(0, 3, 64)
    before = _digest(model)
    pruned = baselines.one_shot_magnitude_pruning(model, 0.7, x, y, epochs=1, batch_size=16)
    assert _digest(model) == before
    variables = projection.prunable_variables(pruned)
    assert [v.path for v in variables][0] == "tokens/embeddings"
    assert "attention/query/kernel" in [v.path for v in variables]
    total = sum(int(np.prod(v.shape)) for v in variables)
    assert sum(int(np.sum(v.numpy() == 0)) for v in variables) == round(0.7 * total)
    assert set(keras_fip.masks(pruned)) == {v.path for v in variables}
    assert np.mean(pruned.get_layer("tokens").embeddings.numpy() == 0) > 0
