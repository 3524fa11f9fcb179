"""BERT from KerasHub, wrapped for keras_fip: one integer array in, logits out.

keras_fip operations take a model with one numeric input. `masked_lm` and `classifier` wrap
KerasHub's `BertMaskedLM` and `BertTextClassifier` (built on a `BertBackbone`) in a functional
model whose input is packed token ids (`[CLS] pieces [SEP] [PAD]...`, `[PAD]` = 0); segment
ids (zeros) and the padding mask are derived inside. The masked-LM wrapper takes the token ids
followed by `num_predictions` masked positions in the same row, and returns the vocabulary
logits at those positions.

On a host with network, the same wrappers take the real BERT:

    backbone = keras_hub.models.BertBackbone.from_preset("bert_base_en_uncased")
    tokenizer = keras_hub.models.BertTokenizer.from_preset("bert_base_en_uncased")
    model = keras_fip.models.bert.masked_lm(backbone, num_predictions=20)

with `keras_fip.data.text.TextEncoder(tokenizer.vocabulary, 128)` to pack sentences (BERT's
vocabulary holds the same special tokens).
"""

import hashlib
import json
import os
import time
import weakref

import keras
import numpy as np
import scipy.special

from keras_fip.models import validation

MODEL_FILE = "model.keras"


def bert_backbone(
    vocabulary_size,
    num_layers=2,
    num_heads=2,
    hidden_dim=128,
    intermediate_dim=512,
    max_sequence_length=64,
    dropout=0.1,
):
    """A small KerasHub `BertBackbone` (BERT-base is 12 layers, 12 heads, 768, 3072).

    Args:
        vocabulary_size: Number of WordPiece tokens.
        num_layers: Transformer encoder layers. Defaults to `2`.
        num_heads: Attention heads per layer. Defaults to `2`.
        hidden_dim: Width of the residual stream. Defaults to `128`.
        intermediate_dim: Hidden width of the feed-forward networks. Defaults to `512`.
        max_sequence_length: Longest sequence (position embeddings). Defaults to `64`.
        dropout: Dropout rate. Defaults to `0.1`.

    Returns:
        A `keras_hub.models.BertBackbone`.

    Examples:

        >>> backbone = keras_fip.models.bert.bert_backbone(100, num_layers=1, hidden_dim=16,
        ...                                               intermediate_dim=32)
        >>> backbone.num_layers
        1
    """
    import keras_hub

    for value, name in (
        (vocabulary_size, "vocabulary_size"),
        (num_layers, "num_layers"),
        (num_heads, "num_heads"),
        (hidden_dim, "hidden_dim"),
        (intermediate_dim, "intermediate_dim"),
        (max_sequence_length, "max_sequence_length"),
    ):
        validation.check_positive_int(value, name)
    if hidden_dim % num_heads:
        raise ValueError(
            f"`hidden_dim` must be divisible by `num_heads` ({num_heads}). "
            f"Received: hidden_dim={hidden_dim}"
        )
    return keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=dropout,
        max_sequence_length=max_sequence_length,
    )


def _backbone_inputs(token_ids):
    return {
        "token_ids": token_ids,
        "segment_ids": keras.ops.zeros_like(token_ids),
        "padding_mask": keras.ops.cast(keras.ops.not_equal(token_ids, 0), "int32"),
    }


class _BertWrapper(keras.Model):
    """A functional model around a KerasHub BERT task, taking one int32 array.

    Its config holds the backbone's config and the masks the model carries
    (`keras_fip.masks`), which its constructor re-attaches: KerasHub's `TransformerEncoder`
    rebuilds its attention and feed-forward layers in its own code and forwards no
    constraints to them, so this is how masks inside BERT survive `.keras` save/load.
    """

    carries_masks = True

    def __init__(self, backbone, sequence_length, masks=None, **kwargs):
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        inputs, outputs = self._build_graph(backbone, sequence_length)
        super().__init__(inputs, outputs, **kwargs)
        self.backbone = backbone
        self.sequence_length = sequence_length
        if masks:
            from keras_fip.core import masks as masks_lib

            masks_lib.apply_masks(self, masks)

    def get_config(self):
        from keras_fip.core import masks as masks_lib

        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "sequence_length": self.sequence_length,
            "masks": {
                key: masks_lib.encode_mask(mask) for key, mask in masks_lib.masks(self).items()
            },
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_fip")
class BertMaskedLanguageModel(_BertWrapper):
    """KerasHub's `BertMaskedLM` taking token ids and masked positions in one array.

    Built by `masked_lm`; see there.
    """

    def __init__(self, backbone, sequence_length=64, num_predictions=10, masks=None, **kwargs):
        self.num_predictions = num_predictions
        super().__init__(backbone, sequence_length, masks, **kwargs)

    def _build_graph(self, backbone, sequence_length):
        import keras_hub

        task = keras_hub.models.BertMaskedLM(backbone, preprocessor=None)
        packed = keras.Input(
            (sequence_length + self.num_predictions,), dtype="int32", name="packed"
        )
        inputs = _backbone_inputs(packed[:, :sequence_length])
        inputs["mask_positions"] = packed[:, sequence_length:]
        return packed, task(inputs)

    def get_config(self):
        return {**super().get_config(), "num_predictions": self.num_predictions}


@keras.saving.register_keras_serializable(package="keras_fip")
class BertTokenClassifier(_BertWrapper):
    """A BERT classifier taking packed token ids. Built by `classifier`; see there."""

    def __init__(
        self,
        backbone,
        num_classes,
        sequence_length=64,
        dropout=0.1,
        masks=None,
        pooling="cls",
        **kwargs,
    ):
        self.num_classes = num_classes
        self.dropout = dropout
        self.pooling = pooling
        super().__init__(backbone, sequence_length, masks, **kwargs)

    def _build_graph(self, backbone, sequence_length):
        import keras_hub

        token_ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
        inputs = _backbone_inputs(token_ids)
        if self.pooling == "cls":
            task = keras_hub.models.BertTextClassifier(
                backbone, self.num_classes, preprocessor=None, dropout=self.dropout
            )
            return token_ids, task(inputs)
        sequence = backbone(inputs)["sequence_output"]
        weights = keras.ops.cast(inputs["padding_mask"], sequence.dtype)[..., None]
        pooled = keras.ops.sum(sequence * weights, axis=1) / keras.ops.maximum(
            keras.ops.sum(weights, axis=1), 1.0
        )
        pooled = keras.layers.Dropout(self.dropout, name="pooled_dropout")(pooled)
        return token_ids, keras.layers.Dense(self.num_classes, name="logits")(pooled)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "dropout": self.dropout,
            "pooling": self.pooling,
        }


def masked_lm(backbone, sequence_length=64, num_predictions=10):
    """Wraps a `BertBackbone` as a KerasHub `BertMaskedLM` taking one integer array.

    Args:
        backbone: A `keras_hub.models.BertBackbone` (used as is, weights shared).
        sequence_length: Length of the packed token ids. Defaults to `64`.
        num_predictions: Masked positions per row. Defaults to `10`.

    Returns:
        A `BertMaskedLanguageModel` (a functional `keras.Model`): input int32 of shape
        `(batch, sequence_length + num_predictions)` (token ids, then the masked
        positions), output logits `(batch, num_predictions, vocabulary_size)`. Masks it
        carries survive `.keras` save/load.

    Examples:

        >>> backbone = keras_fip.models.bert.bert_backbone(100, num_layers=1, hidden_dim=16,
        ...                                               intermediate_dim=32)
        >>> keras_fip.models.bert.masked_lm(backbone, 16, 3).output_shape
        (None, 3, 100)
    """
    validation.check_positive_int(sequence_length, "sequence_length")
    validation.check_positive_int(num_predictions, "num_predictions")
    return BertMaskedLanguageModel(
        backbone, sequence_length, num_predictions, name="bert_masked_lm"
    )


def classifier(backbone, num_classes, sequence_length=64, dropout=0.1, pooling="cls"):
    """Wraps a `BertBackbone` as a classifier taking token ids.

    With `pooling="cls"` it is KerasHub's `BertTextClassifier` (logits from the pooled
    `[CLS]` output, as BERT is fine-tuned); with `"mean"` the logits come from the mean of
    the last layer's outputs over the sentence's pieces (padding excluded), as
    Sentence-BERT pools. A small BERT pretrained on a few ten thousand sentences never
    learns a `[CLS]` summary (its pretraining has no sentence-level task), and its
    classifiers learn a new task from the mean much sooner.

    Args:
        backbone: A `keras_hub.models.BertBackbone` (used as is, weights shared).
        num_classes: Number of output logits.
        sequence_length: Length of the packed token ids. Defaults to `64`.
        dropout: Dropout on the pooled output. Defaults to `0.1`.
        pooling: `"cls"` or `"mean"`. Defaults to `"cls"`.

    Returns:
        A `BertTokenClassifier` (a functional `keras.Model`): int32 token ids of shape
        `(batch, sequence_length)` in, logits `(batch, num_classes)` out.

    Examples:

        >>> backbone = keras_fip.models.bert.bert_backbone(100, num_layers=1, hidden_dim=16,
        ...                                               intermediate_dim=32)
        >>> keras_fip.models.bert.classifier(backbone, 7, 16).output_shape
        (None, 7)
    """
    validation.check_positive_int(num_classes, "num_classes")
    validation.check_positive_int(sequence_length, "sequence_length")
    if pooling not in ("cls", "mean"):
        raise ValueError(f"`pooling` must be 'cls' or 'mean'. Received: pooling={pooling!r}")
    return BertTokenClassifier(
        backbone, num_classes, sequence_length, dropout, pooling=pooling, name="bert_classifier"
    )


def _as_wrapper(model, sequence_length, num_predictions):
    """A `BertMaskedLanguageModel` equal to a plain functional masked-LM wrapper."""
    if isinstance(model, BertMaskedLanguageModel):
        return model
    return _copy_masked_lm(model, sequence_length, num_predictions)


def _copy_masked_lm(model, sequence_length, num_predictions):
    """A new `BertMaskedLanguageModel` with `model`'s weights (masks not carried)."""
    backbone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(find_backbone(model))
    )
    wrapped = masked_lm(backbone, sequence_length, num_predictions)
    wrapped.set_weights(model.get_weights())
    return wrapped


def under_masked_lm_head(model):
    """A function putting a network's BERT backbone under `model`'s masked-LM head.

    Classifier networks (`classifier` wrappers) have no masked-LM head, so they cannot be
    scored by pseudo-perplexity themselves; the returned function copies a network's
    backbone weights into a copy of `model` (a `masked_lm` wrapper, e.g. the pretrained
    one, whose head is kept) and returns that copy, ready for `pseudo_perplexity`. It is
    how `keras_fip.Submanifold.query(..., as_scored=...)` ranks classifiers by how well
    their backbones still model language. `model` is never changed.

    Args:
        model: A `masked_lm` wrapper with the same backbone configuration.

    Returns:
        A function `network -> masked_lm wrapper` (the same copy each call, re-assigned).

    Examples:

        >>> backbone = keras_fip.models.bert.bert_backbone(100, num_layers=1, hidden_dim=16,
        ...                                               intermediate_dim=32)
        >>> mlm = keras_fip.models.bert.masked_lm(backbone, 16, 3)
        >>> net = keras_fip.models.bert.classifier(backbone, 2, 16)
        >>> keras_fip.models.bert.under_masked_lm_head(mlm)(net).output_shape
        (None, 3, 100)
    """
    if not isinstance(model, keras.Model) or find_backbone(model) is None:
        raise ValueError(
            "`model` must be a `masked_lm` wrapper holding a `BertBackbone`. "
            f"Received: model={model!r}"
        )
    num_predictions = model.output_shape[1]
    scorer = _copy_masked_lm(model, model.input_shape[1] - num_predictions, num_predictions)
    target = find_backbone(scorer).weights

    def as_scored(network):
        source = find_backbone(network)
        shapes = None if source is None else [tuple(w.shape) for w in source.weights]
        if shapes != [tuple(w.shape) for w in target]:
            raise ValueError(
                "`network` must hold a `BertBackbone` of the masked-LM model's "
                f"configuration. Received: network={getattr(network, 'name', network)!r}"
            )
        for variable, weight in zip(target, source.weights):
            variable.assign(weight)
        return scorer

    return as_scored


def find_backbone(model):
    """The `BertBackbone` inside a `masked_lm` or `classifier` wrapper."""
    import keras_hub

    for layer in model.layers:
        if isinstance(layer, keras_hub.models.BertBackbone):
            return layer
        if isinstance(layer, keras.Model):
            found = find_backbone(layer)
            if found is not None:
                return found
    return None


def mask_tokens(
    token_ids,
    num_predictions,
    mask_id,
    vocabulary_size,
    rate=0.15,
    replace_fraction=(0.8, 0.1),
    seed=0,
    num_special=5,
):
    """BERT's masking of packed token ids, in numpy.

    In each row, `max(1, round(rate * n))` of the `n` word pieces (at most
    `num_predictions`) are chosen; of those, `replace_fraction[0]` become `[MASK]`,
    `replace_fraction[1]` a random piece, the rest stay.

    Args:
        token_ids: int array `(batch, sequence_length)`, packed by `TextEncoder`.
        num_predictions: Masked positions per row (padded with position 0, weight 0).
        mask_id: Id of `[MASK]`.
        vocabulary_size: Number of tokens (random replacements avoid the special ones).
        rate: Fraction of pieces chosen. Defaults to `0.15`.
        replace_fraction: Fractions replaced by `[MASK]` and by a random piece. Defaults
            to `(0.8, 0.1)`; `(1.0, 0.0)` masks every chosen piece (evaluation).
        seed: Seed. Defaults to `0`.
        num_special: Ids below this are special tokens. Defaults to `5`.

    Returns:
        A tuple `(packed, labels, weights)`: int32 `(batch, sequence_length +
        num_predictions)` model inputs, int32 `(batch, num_predictions)` original ids and
        float32 `(batch, num_predictions)` weights (1 for real predictions).
    """
    rng = np.random.default_rng(seed)
    token_ids = np.asarray(token_ids, dtype=np.int32)
    batch = len(token_ids)
    masked = token_ids.copy()
    positions = np.zeros((batch, num_predictions), np.int32)
    labels = np.zeros((batch, num_predictions), np.int32)
    weights = np.zeros((batch, num_predictions), np.float32)
    lengths = np.sum(token_ids != 0, axis=1) - 2  # without [CLS] and [SEP]
    for row in range(batch):
        count = int(min(num_predictions, max(1, round(rate * lengths[row]))))
        if lengths[row] < 1:
            continue
        chosen = np.sort(rng.choice(np.arange(1, lengths[row] + 1), count, replace=False))
        positions[row, :count] = chosen
        labels[row, :count] = token_ids[row, chosen]
        weights[row, :count] = 1.0
        draw = rng.random(count)
        to_mask = draw < replace_fraction[0]
        to_random = (draw >= replace_fraction[0]) & (
            draw < replace_fraction[0] + replace_fraction[1]
        )
        masked[row, chosen[to_mask]] = mask_id
        masked[row, chosen[to_random]] = rng.integers(
            num_special, vocabulary_size, int(to_random.sum())
        )
    return np.concatenate([masked, positions], axis=1), labels, weights


def _logits(model, x, batch_size=256):
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
            for i in range(0, len(x), batch_size)
        ]
    )


def masked_token_accuracy(model, token_ids, seed=1, rate=0.15):
    """Accuracy and loss of a `masked_lm` model at 15% `[MASK]`-ed held-out pieces.

    Args:
        model: A `masked_lm` wrapper.
        token_ids: Packed held-out token ids `(batch, sequence_length)`.
        seed: Seed of the masked positions. Defaults to `1`.
        rate: Fraction of pieces masked. Defaults to `0.15`.

    Returns:
        A dict with `accuracy` (top-1 over masked pieces), `loss` (mean cross-entropy)
        and `num_predictions` (masked pieces counted).
    """
    sequence_length = token_ids.shape[1]
    num_predictions = model.input_shape[1] - sequence_length
    mask_id = 4
    vocabulary_size = model.output_shape[-1]
    packed, labels, weights = mask_tokens(
        token_ids, num_predictions, mask_id, vocabulary_size, rate, (1.0, 0.0), seed
    )
    logits = _logits(model, packed)
    log_probs = scipy.special.log_softmax(logits, axis=-1)
    picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    hits = np.argmax(logits, axis=-1) == labels
    total = weights.sum()
    return {
        "accuracy": float((hits * weights).sum() / total),
        "loss": float(-(picked * weights).sum() / total),
        "num_predictions": int(total),
    }


def _inner_masked_lm(model):
    """The KerasHub `BertMaskedLM` inside a `masked_lm` wrapper, or `None`."""
    import keras_hub

    for layer in model.layers:
        if isinstance(layer, keras_hub.models.BertMaskedLM):
            return layer
    return None


_SINGLE_MASK_FUNCTIONS = weakref.WeakKeyDictionary()


def _single_mask_function(task):
    """`(token_ids, positions) -> logits` of a KerasHub `BertMaskedLM`: one `tf.function`
    per task (any batch and width, traced once; the eager call was 3× slower on a small
    BERT), reused while the task lives (a sub-manifold query re-assigns one model's
    weights for every network). Eager on other backends."""
    if task in _SINGLE_MASK_FUNCTIONS:
        return _SINGLE_MASK_FUNCTIONS[task]

    def call(token_ids, positions):
        inputs = _backbone_inputs(token_ids)
        inputs["mask_positions"] = positions
        return task(inputs, training=False)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        call = tf.function(
            call,
            input_signature=[
                tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([None, 1], tf.int32),
            ],
        )
    _SINGLE_MASK_FUNCTIONS[task] = call
    return call


def _single_mask_log_probs(model, rows, positions, targets, batch_size):
    """log p(target | row) at one masked position per row, rows bucketed by length.

    Rows are sorted by their number of pieces and each batch is cut to its longest row
    (padding stripped) and scored at one prediction slot, by calling the wrapper's KerasHub
    `BertMaskedLM` directly: the padding mask hides `[PAD]` from attention, so the logits
    at real positions equal those of the full-width packed input (up to float rounding;
    `tests/models/test_bert.py` checks it) at a fraction of the cost (short sentences
    padded to 48 pieces spent most of the work on padding, and the head on seven unused
    prediction slots). Models without that inner layer take the packed full-width path.
    """
    num_predictions = model.input_shape[1] - rows.shape[1]
    task = _inner_masked_lm(model)
    log_probs = np.zeros(len(rows), np.float64)
    if task is None:
        mask_positions = np.zeros((len(rows), num_predictions), np.int32)
        mask_positions[:, 0] = positions
        logits = _logits(model, np.concatenate([rows, mask_positions], axis=1), batch_size)[:, 0, :]
        picked = scipy.special.log_softmax(logits, axis=-1)
        return picked[np.arange(len(rows)), targets].astype(np.float64)
    call = _single_mask_function(task)
    lengths = np.sum(rows != 0, axis=1)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(rows), batch_size):
        chosen = order[start : start + batch_size]
        width = int(lengths[chosen].max())
        logits = keras.ops.convert_to_numpy(
            call(
                np.ascontiguousarray(rows[chosen, :width]),
                np.ascontiguousarray(positions[chosen][:, None]),
            )
        )[:, 0, :]
        picked = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
        log_probs[chosen] = picked[np.arange(len(chosen)), targets[chosen]]
    return log_probs


def pseudo_log_likelihoods(model, token_ids, batch_size=256):
    """Per-sentence pseudo-log-likelihoods: each piece masked in turn (Salazar et al. 2020).

    One row per (sentence, piece) with that piece `[MASK]`-ed; rows are bucketed by
    length (see `_single_mask_log_probs`), so short query sets cost in proportion to their
    pieces, not to the packed length.

    Args:
        model: A `masked_lm` wrapper.
        token_ids: Packed token ids `(batch, sequence_length)`.
        batch_size: Rows per forward pass. Defaults to `256`.

    Returns:
        A tuple `(pll, counts)`: float64 sums of log p(piece | rest) per sentence and the
        number of pieces scored per sentence.
    """
    token_ids = np.asarray(token_ids, np.int32)
    mask_id = 4
    rows, positions, sentence_of = [], [], []
    for index, row in enumerate(token_ids):
        length = int(np.sum(row != 0)) - 2
        for position in range(1, length + 1):
            masked = row.copy()
            masked[position] = mask_id
            rows.append(masked)
            positions.append(position)
            sentence_of.append(index)
    rows = np.asarray(rows, np.int32).reshape(-1, token_ids.shape[1])
    positions = np.asarray(positions, np.int32)
    sentence_of = np.asarray(sentence_of, np.int64)
    targets = token_ids[sentence_of, positions] if len(rows) else np.zeros(0, np.int32)
    scores = (
        _single_mask_log_probs(model, rows, positions, targets, batch_size)
        if len(rows)
        else np.zeros(0)
    )
    pll = np.bincount(sentence_of, weights=scores, minlength=len(token_ids))
    counts = np.bincount(sentence_of, minlength=len(token_ids))
    return pll, counts


def pseudo_perplexity(model, token_ids, batch_size=256):
    """Corpus pseudo-perplexity exp(−Σ PLL / Σ pieces) of a `masked_lm` model.

    Args:
        model: A `masked_lm` wrapper.
        token_ids: Packed token ids `(batch, sequence_length)`.
        batch_size: Rows per forward pass. Defaults to `256`.

    Returns:
        A float (lower is better; the vocabulary size is what uniform guessing gives).
    """
    pll, counts = pseudo_log_likelihoods(model, token_ids, batch_size)
    return float(np.exp(-pll.sum() / max(1, counts.sum())))


def pretrained_masked_lm(
    vocabulary_size=4000,
    sequence_length=48,
    num_predictions=8,
    num_layers=2,
    num_heads=2,
    hidden_dim=128,
    intermediate_dim=512,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    seed=0,
    max_sentences=None,
    data_dir=None,
    cache_dir=None,
    verbose=0,
):
    """A small BERT pretrained here by masked-LM on the pooled text sets, cached.

    The WordPiece vocabulary is computed on `keras_fip.data.text.pretraining_corpus()`
    (every training sentence of the seven sets, held-out sentences excluded) and saved
    beside the model (`vocabulary.txt`). Masking is redrawn each epoch (BERT's 80/10/10);
    AdamW with linear warm-up and decay. Cached under
    `<cache>/base_networks/bert_mlm_<key>` like `keras_fip.models.base_network`.

    Args:
        vocabulary_size: WordPiece vocabulary size. Defaults to `4000`.
        sequence_length: Packed sequence length (covers about 85% of the corpus
            sentences whole; longer ones are truncated). Defaults to `48`.
        num_predictions: Masked positions per row. Defaults to `8`.
        num_layers: Encoder layers. Defaults to `2`.
        num_heads: Attention heads. Defaults to `2`.
        hidden_dim: Hidden width. Defaults to `128`.
        intermediate_dim: Feed-forward width. Defaults to `512` (BERT's 4 × hidden).
        epochs: Passes over the corpus. Defaults to `10`.
        batch_size: Sentences per step. Defaults to `128`.
        learning_rate: Peak AdamW learning rate. Defaults to `1e-3`.
        seed: Seed of initialisation and masking. Defaults to `0`.
        max_sentences: Use only the first this many corpus sentences (tests). Defaults
            to `None` (all).
        data_dir: As in `keras_fip.data.load`. Defaults to `None`.
        cache_dir: Cache directory; `False` disables caching. Defaults to `None`
            (`keras_fip.models.training.default_cache_dir()`).
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A tuple `(model, encoder, results)`: the `masked_lm` wrapper, the
        `keras_fip.data.text.TextEncoder` of its vocabulary and a dict of results
        (`"held_out/masked_token_accuracy"`, `"held_out/pseudo_perplexity"`, ...,
        `"cache/path"`).
    """
    from keras_fip.data import text
    from keras_fip.models import training

    config = dict(
        vocabulary_size=vocabulary_size,
        sequence_length=sequence_length,
        num_predictions=num_predictions,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        max_sentences=max_sentences,
        version=1,
    )
    directory = None
    if cache_dir is not False:
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        directory = os.path.join(
            cache_dir or training.default_cache_dir(), "base_networks", f"bert_mlm_{key}"
        )
        model_path = os.path.join(directory, MODEL_FILE)
        results_path = os.path.join(directory, "results.json")
        if os.path.isfile(model_path) and os.path.isfile(results_path):
            with open(results_path) as f:
                results = json.load(f)
            encoder = text.TextEncoder(directory, sequence_length)
            return (
                _as_wrapper(keras.saving.load_model(model_path), sequence_length, num_predictions),
                encoder,
                results,
            )

    # Tokenizer
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    corpus = text.pretraining_corpus(data_dir=data_dir)
    if max_sentences:
        corpus = corpus[:max_sentences]
    vocabulary = text.word_piece_vocabulary(corpus, vocabulary_size)
    encoder = text.TextEncoder(vocabulary, sequence_length)
    token_ids = encoder(corpus)
    held_out = encoder(text.held_out_sentences(data_dir=data_dir))
    held_out = held_out[np.random.default_rng(seed).permutation(len(held_out))]
    tokenizer_time = time.perf_counter() - start

    # Pretrain
    model = masked_lm(
        bert_backbone(
            len(vocabulary), num_layers, num_heads, hidden_dim, intermediate_dim, sequence_length
        ),
        sequence_length,
        num_predictions,
    )
    steps = epochs * (len(token_ids) // batch_size)
    schedule = keras.optimizers.schedules.PolynomialDecay(
        learning_rate, max(1, steps - steps // 10), end_learning_rate=0.0
    )
    schedule = _Warmup(schedule, learning_rate, max(1, steps // 10))
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    start = time.perf_counter()
    history = []
    for epoch in range(epochs):
        packed, labels, weights = mask_tokens(
            token_ids, num_predictions, encoder.mask_id, len(vocabulary), seed=seed * 1000 + epoch
        )
        logs = model.fit(
            packed,
            labels,
            sample_weight=weights,
            batch_size=batch_size,
            epochs=1,
            shuffle=True,
            verbose=verbose,
        ).history
        history.append({k: float(v[-1]) for k, v in logs.items()})
    train_time = time.perf_counter() - start

    # Evaluate on held-out sentences
    evaluation = masked_token_accuracy(model, held_out[:2000])
    results = {
        "corpus/sentences": int(len(corpus)),
        "held_out/sentences": int(len(held_out)),
        "vocabulary_size": len(vocabulary),
        "train/history": history,
        "held_out/masked_token_accuracy": evaluation["accuracy"],
        "held_out/masked_token_loss": evaluation["loss"],
        "held_out/pseudo_perplexity": pseudo_perplexity(model, held_out[:300]),
        "held_out/pseudo_perplexity_sentences": 300,
        "tokenizer/wall_time_seconds": tokenizer_time,
        "train/wall_time_seconds": train_time,
        "config": config,
        "cache/path": directory,
    }
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        text.save_vocabulary(vocabulary, directory)
        model.save(model_path + ".tmp.keras")
        os.replace(model_path + ".tmp.keras", model_path)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
    return model, encoder, results


@keras.saving.register_keras_serializable(package="keras_fip")
class _Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak` over `warmup_steps`, then `schedule` from step 0."""

    def __init__(self, schedule, peak, warmup_steps):
        self.schedule = schedule
        self.peak = peak
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / self.warmup_steps
        return keras.ops.where(
            step < self.warmup_steps, warm, self.schedule(step - self.warmup_steps)
        )

    def get_config(self):
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)
