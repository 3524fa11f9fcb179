import warnings

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.core import projection
from keras_fip.models import bert

pytest.importorskip("keras_hub")  # the `text` extra

VOCABULARY_SIZE = 40
SEQUENCE_LENGTH = 10


def _tiny_masked_lm(num_predictions=3):
    keras.utils.set_random_seed(0)
    backbone = bert.bert_backbone(
        VOCABULARY_SIZE,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=SEQUENCE_LENGTH,
        dropout=0.0,
    )
    return bert.masked_lm(backbone, SEQUENCE_LENGTH, num_predictions)


def _token_ids(count=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((count, SEQUENCE_LENGTH), np.int32)
    for row in ids:
        length = rng.integers(3, SEQUENCE_LENGTH - 1)
        row[0], row[1 : length + 1], row[length + 1] = (
            2,
            rng.integers(5, VOCABULARY_SIZE, length),
            3,
        )
    return ids


def test_mask_tokens_masks_real_pieces_and_keeps_their_labels():
    ids = _token_ids()
    packed, labels, weights = bert.mask_tokens(
        ids, 3, 4, VOCABULARY_SIZE, rate=0.3, replace_fraction=(1.0, 0.0), seed=0
    )
    assert packed.shape == (16, SEQUENCE_LENGTH + 3)
    positions = packed[:, SEQUENCE_LENGTH:]
    for row in range(16):
        real = weights[row] == 1
        assert real.sum() >= 1
        chosen = positions[row, real]
        assert np.all(ids[row, chosen] >= 5)  # never [CLS], [SEP] or [PAD]
        assert np.all(packed[row, chosen] == 4)
        np.testing.assert_array_equal(labels[row, real], ids[row, chosen])
        untouched = np.setdiff1d(np.arange(SEQUENCE_LENGTH), chosen)
        np.testing.assert_array_equal(packed[row, untouched], ids[row, untouched])


def test_uniform_masked_lm_has_pseudo_perplexity_equal_to_the_vocabulary_size():
    model = _tiny_masked_lm()
    model.set_weights([np.zeros(w.shape, w.dtype) for w in model.get_weights()])
    ids = _token_ids(4)
    assert bert.pseudo_perplexity(model, ids) == pytest.approx(VOCABULARY_SIZE, rel=1e-4)
    evaluation = bert.masked_token_accuracy(model, ids)
    assert evaluation["loss"] == pytest.approx(np.log(VOCABULARY_SIZE), rel=1e-4)
    pll, counts = bert.pseudo_log_likelihoods(model, ids)
    np.testing.assert_array_equal(counts, np.sum(ids >= 5, axis=1))


def test_length_bucketed_pseudo_log_likelihoods_equal_the_packed_full_width_ones():
    model = _tiny_masked_lm()
    ids = _token_ids(12, seed=3)
    pll, counts = bert.pseudo_log_likelihoods(model, ids, batch_size=5)
    expected = np.zeros(len(ids))
    for index, row in enumerate(ids):  # dense reference: full width, slot 0, one at a time
        for position in range(1, counts[index] + 1):
            masked = row.copy()
            masked[position] = 4
            packed = np.concatenate([masked, [position, 0, 0]])[None].astype("int32")
            logits = keras.ops.convert_to_numpy(model(packed))[0, 0].astype("float64")
            expected[index] += (logits - np.log(np.sum(np.exp(logits))))[row[position]]
    np.testing.assert_allclose(pll, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(counts, np.sum(ids >= 5, axis=1))


def test_wrappers_shapes_and_keras_round_trip(tmp_path):
    model = _tiny_masked_lm()
    assert model.output_shape == (None, 3, VOCABULARY_SIZE)
    packed, _, _ = bert.mask_tokens(_token_ids(4), 3, 4, VOCABULARY_SIZE)
    model.save(tmp_path / "mlm.keras")
    loaded = keras.saving.load_model(tmp_path / "mlm.keras")
    np.testing.assert_allclose(loaded(packed), model(packed), atol=1e-6)
    classifier = bert.classifier(bert.find_backbone(model), 7, SEQUENCE_LENGTH)
    assert classifier.output_shape == (None, 7)
    assert type(keras_fip.engine.copy_model(classifier)) is bert.BertTokenClassifier


def test_mean_pooled_classifier_is_the_masked_mean_of_the_last_layer(tmp_path):
    backbone = bert.find_backbone(_tiny_masked_lm())
    model = bert.classifier(backbone, 3, SEQUENCE_LENGTH, pooling="mean")
    ids = _token_ids(4)
    sequence = keras.ops.convert_to_numpy(
        backbone(
            {
                "token_ids": ids,
                "segment_ids": np.zeros_like(ids),
                "padding_mask": (ids != 0).astype("int32"),
            }
        )["sequence_output"]
    )
    real = (ids != 0)[..., None]
    pooled = (sequence * real).sum(axis=1) / real.sum(axis=1)
    dense = model.get_layer("logits")
    expected = pooled @ dense.kernel.numpy() + dense.bias.numpy()
    np.testing.assert_allclose(model(ids), expected, atol=1e-5)
    model.save(tmp_path / "mean.keras")
    loaded = keras.saving.load_model(tmp_path / "mean.keras")
    assert loaded.pooling == "mean"
    np.testing.assert_allclose(loaded(ids), model(ids), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        bert.classifier(backbone, 3, SEQUENCE_LENGTH, pooling="max")


def test_masks_inside_kerashub_layers_survive_keras_files_and_a_later_fit(tmp_path):
    model = _tiny_masked_lm()
    rng = np.random.default_rng(0)
    wanted = {
        v.path: rng.random(tuple(v.shape)) < 0.5 for v in projection.prunable_variables(model)
    }
    assert any("self_attention_layer/query" in key for key in wanted)
    assert any("feedforward_intermediate_dense" in key for key in wanted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_fip.engine.apply_masks(model, wanted)
    model.save(tmp_path / "masked.keras")
    loaded = keras.saving.load_model(tmp_path / "masked.keras")
    reloaded = keras_fip.masks(loaded)
    assert sorted(reloaded) == sorted(wanted)
    packed, labels, weights = bert.mask_tokens(_token_ids(), 3, 4, VOCABULARY_SIZE)
    loaded.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    loaded.fit(packed, labels, sample_weight=weights, epochs=2, batch_size=8, verbose=0)
    for variable in loaded.trainable_variables:
        if variable.path in wanted:
            assert np.all(variable.numpy()[~wanted[variable.path]] == 0.0), variable.path
    assert keras_fip.masks(keras_fip.strip_masks(loaded)) == {}


def test_backbone_arguments_are_validated():
    with pytest.raises(ValueError, match="hidden_dim"):
        bert.bert_backbone(10, num_heads=3, hidden_dim=8)
    with pytest.raises(ValueError, match="num_predictions"):
        bert.masked_lm(bert.bert_backbone(10, 1, 2, 8, 16, 8), 8, 0)


@pytest.mark.large
def test_compress_keeps_masked_lm_outputs_of_a_tiny_bert_and_masks_survive(tmp_path):
    model = _tiny_masked_lm()
    packed, _, _ = bert.mask_tokens(_token_ids(64), 3, 4, VOCABULARY_SIZE)
    walk = keras_fip.Walk(steps=40, batch_size=32, seed=0, verbose=0)
    sparse = keras_fip.Compress(0.5, data=packed, walk=walk)(model)
    assert projection.prunable_sparsity(sparse) == pytest.approx(0.5, abs=1e-3)
    assert isinstance(sparse, bert.BertMaskedLanguageModel)
    sparse.save(tmp_path / "sparse.keras")
    loaded = keras.saving.load_model(tmp_path / "sparse.keras")
    assert sorted(keras_fip.masks(loaded)) == sorted(keras_fip.masks(sparse))
    np.testing.assert_allclose(loaded(packed), sparse(packed), atol=1e-5)
