"""A small transformer token classifier built from standard Keras layers."""

import keras

from keras_fip.models import validation


def transformer_classifier(
    vocab_size=1000,
    sequence_length=64,
    num_classes=2,
    embed_dim=32,
    num_heads=2,
    feed_forward_dim=64,
    num_layers=2,
    dropout=0.0,
):
    """A small transformer encoder that classifies token sequences, returning logits.

    Token and learned position embeddings (`Embedding` layers) are added, followed by
    `num_layers` post-norm encoder blocks (`MultiHeadAttention`, residual add,
    `LayerNormalization`, a two-layer ReLU feed-forward network, residual add,
    `LayerNormalization`), global average pooling over the sequence and a linear `logits`
    layer.

    Args:
        vocab_size: Number of token ids. Defaults to `1000`.
        sequence_length: Length of the (fixed-length) integer input sequences. Defaults to
            `64`.
        num_classes: Number of output logits. Defaults to `2`.
        embed_dim: Width of the embeddings and the residual stream. Defaults to `32`.
        num_heads: Attention heads per block. Defaults to `2`.
        feed_forward_dim: Hidden width of each feed-forward network. Defaults to `64`.
        num_layers: Number of encoder blocks. Defaults to `2`.
        dropout: Dropout rate after attention and feed-forward (0 disables). Defaults to
            `0.0`.

    Returns:
        A functional `keras.Model` taking int32 token ids of shape `(batch, sequence_length)`.

    Examples:

        >>> model = keras_fip.models.transformer_classifier(vocab_size=100, sequence_length=16)
        >>> model.output_shape
        (None, 2)
    """
    for value, name in (
        (vocab_size, "vocab_size"),
        (sequence_length, "sequence_length"),
        (num_classes, "num_classes"),
        (embed_dim, "embed_dim"),
        (num_heads, "num_heads"),
        (feed_forward_dim, "feed_forward_dim"),
        (num_layers, "num_layers"),
    ):
        validation.check_positive_int(value, name)
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
    tokens = keras.Input((sequence_length,), dtype="int32", name="tokens")
    positions = keras.ops.cumsum(keras.ops.ones_like(tokens), axis=1) - 1
    x = keras.layers.Embedding(vocab_size, embed_dim, name="token_embedding")(tokens)
    position_embedding = keras.layers.Embedding(
        sequence_length, embed_dim, name="position_embedding"
    )(positions)
    x = keras.layers.Add(name="embedding_add")([x, position_embedding])
    for i in range(1, num_layers + 1):
        attention = keras.layers.MultiHeadAttention(
            num_heads, embed_dim // num_heads or 1, name=f"block{i}_attention"
        )(x, x)
        if dropout:
            attention = keras.layers.Dropout(dropout, name=f"block{i}_attention_dropout")(attention)
        x = keras.layers.Add(name=f"block{i}_attention_add")([x, attention])
        x = keras.layers.LayerNormalization(name=f"block{i}_attention_norm")(x)
        hidden = keras.layers.Dense(feed_forward_dim, activation="relu", name=f"block{i}_ff1")(x)
        hidden = keras.layers.Dense(embed_dim, name=f"block{i}_ff2")(hidden)
        if dropout:
            hidden = keras.layers.Dropout(dropout, name=f"block{i}_ff_dropout")(hidden)
        x = keras.layers.Add(name=f"block{i}_ff_add")([x, hidden])
        x = keras.layers.LayerNormalization(name=f"block{i}_ff_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="global_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(tokens, outputs, name="transformer_classifier")
