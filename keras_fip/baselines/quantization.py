"""Quantisation baselines: Keras's post-training quantisation, straight-through QAT, TFLite.

`keras_fip.Quantize` is measured against what a practitioner would otherwise use: Keras's
`model.quantize("int8" | "int4")` (post-training, Dense/EinsumDense/Embedding only),
Keras's GPTQ (`model.quantize("gptq")`, Dense/EinsumDense kernels inside sequential blocks),
round-to-nearest on `Quantize`'s grid with Keras's scale rule at any bit width,
quantisation-aware training with a straight-through estimator on the labels (tfmot's QAT
is Keras 2 only, so it is written here, on the same per-channel grid as `Quantize`), and
TFLite's post-training dynamic-range quantisation (`keras_fip.export(format="tflite")` of
the float model).
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import masks as masks_lib
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.export import export
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.quantize import BITS
from keras_fip.operations.quantize import project
from keras_fip.operations.quantize import project_ops
from keras_fip.operations.quantize import quantizable_variables
from keras_fip.operations.quantize import resolved_scales

KERAS_PTQ_MODES = ("int8", "int4")
# Bit widths Keras's GPTQ takes.
GPTQ_BITS = (2, 3, 4, 8)


def keras_ptq(model, mode):
    """Keras's post-training quantisation of a copy of `model` (`model.quantize(mode)`).

    Keras's defaults, as a user would call it: `"int8"` quantises the kernels per output
    channel and the inputs of each layer per token (dynamically); `"int4"` quantises the
    kernels weight-only in groups of 128 input rows. Only Dense, EinsumDense and
    Embedding layers are quantised; convolutions stay float.

    Args:
        model: A built `keras.Model`. Not changed.
        mode: `"int8"` or `"int4"`.

    Returns:
        A new `keras.Model` with Keras's quantised layers.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> keras_ptq(model, "int8").layers[0].quantization_mode
        'int8'
    """
    if mode not in KERAS_PTQ_MODES:
        raise ValueError(f"`mode` must be one of {list(KERAS_PTQ_MODES)}. Received: mode={mode!r}")
    result = masks_lib.remove_masks(copy_model(model))
    result.quantize(mode)
    return result


def _gptq_structure(model, inputs, num_samples):
    """GPTQ's calibration stream, window length, window count and layer structure."""
    from keras_fip.models import bert

    backbone = bert.find_backbone(model)
    if backbone is not None:
        # A BERT wrapper: the blocks are the encoder layers, the embeddings come before.
        sequence_length = int(getattr(model, "sequence_length", inputs.shape[1]))
        tokens = np.asarray(inputs)[:, :sequence_length]
        stream = np.concatenate([row[row != 0] for row in tokens]).astype("int32")

        def embed(token_ids):
            embedded = backbone.token_embedding(token_ids)
            segments = backbone.segment_embedding(keras.ops.zeros_like(token_ids))
            summed = backbone.embeddings_add(
                (embedded, backbone.position_embedding(embedded), segments)
            )
            return backbone.embeddings_layer_norm(summed)

        structure = {
            "pre_block_layers": [embed],
            "sequential_blocks": list(backbone.transformer_layers),
        }
        return [stream], sequence_length, num_samples, structure
    # A plain stack of layers ending in Dense ones: a block from each Dense layer to the next.
    stack = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    first = next(
        (i for i, layer in enumerate(stack) if isinstance(layer, keras.layers.Dense)), None
    )
    linear = len(model.inputs) == 1 and len(model.outputs) == 1
    if (
        first is None
        or not linear
        or not all(
            isinstance(layer, (keras.layers.Dense, keras.layers.Activation, keras.layers.Dropout))
            for layer in stack[first:]
        )
    ):
        raise ValueError(
            "`model` must be a BERT `masked_lm`/`classifier` wrapper or a single-input stack "
            "of layers whose Dense layers (with activations and dropout between) come last, "
            "so Keras's GPTQ can be given its blocks. "
            f"Received: model={model.name} with layers {[layer.name for layer in stack]}"
        )
    blocks = []
    for layer in stack[first:]:
        if isinstance(layer, keras.layers.Dense):
            blocks.append([])
        blocks[-1].append(layer)
    before = stack[:first]
    examples = np.asarray(inputs, dtype="float32")
    shape = examples.shape[1:]

    # GPTQ casts its calibration stream to int32 and cuts it into windows: the float inputs
    # travel bit for bit as int32 (`keras.ops.view`), all of them in one window.
    def unpack(window):
        values = keras.ops.view(window, "float32")
        x = keras.ops.reshape(values, (-1, *shape))
        for layer in before:
            x = layer(x)
        return keras.ops.expand_dims(x, 0)

    structure = {
        "pre_block_layers": [unpack],
        "sequential_blocks": [keras.Sequential(block) for block in blocks],
    }
    stream = examples.reshape(-1).view("int32")
    return [stream], stream.size, 1, structure


def keras_gptq(model, bits, inputs, num_samples=128, group_size=128):
    """Keras's GPTQ (`model.quantize("gptq")`) of a copy of `model`, calibrated on `inputs`.

    Keras's `GPTQConfig` with its defaults (asymmetric, groups of `group_size` input rows)
    at `weight_bits=bits`. GPTQ quantises the Dense and EinsumDense kernels of the blocks
    its layer structure names, one block after the other on the previous blocks'
    quantised outputs; the structure given here:

    - a BERT `keras_fip.models.bert.masked_lm` or `classifier` wrapper: the blocks are the
      encoder's transformer layers, run after the token, position and segment embeddings
      and their normalisation; the calibration stream is `inputs`' word pieces without
      padding (GPTQ cuts it into `num_samples` windows of the packed sequence length).
      The embeddings, the masked-LM head and the pooler stay float.
    - a stack of layers ending in Dense layers (LeNet-300-100, MLPs): a block per Dense
      layer (with the activations and dropout after it); the layers before the first
      Dense run first. GPTQ casts its calibration data to int32 and windows it from one
      stream, so the float `inputs` are passed bit for bit as int32 (`keras.ops.view`) in
      one window; `num_samples` is unused.

    Any other model raises a `ValueError`.

    With Keras 3.15, GPTQ's calibration does not reach its Hessians:
    `model.quantize("gptq")` sets every layer's quantisation mode before calibrating, so
    the layers run their `quantized_call` and the hooks GPTQ puts on their `call` collect
    nothing; the result is GPTQ's grid without its error compensation.

    Args:
        model: A built `keras.Model` (see above). Not changed.
        bits: The bit width, one of 2, 3, 4, 8.
        inputs: Calibration inputs: packed token ids for BERT, float examples otherwise.
        num_samples: Calibration windows of a BERT model. Defaults to `128`.
        group_size: Input rows sharing a scale (`-1`: one per output channel). Defaults
            to `128`.

    Returns:
        A new `keras.Model` whose block kernels are Keras's GPTQ-quantised ones.

    Examples:

        >>> model = keras_fip.models.mlp(8, input_shape=(4,), num_classes=3)
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        >>> quantized = keras_gptq(model, 4, x)
        >>> [layer.quantization_mode for layer in quantized.layers[-2:]]
        ['gptq', 'gptq']
    """
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise ValueError(f"`bits` must be one of {list(GPTQ_BITS)}. Received: bits={bits!r}")
    result = masks_lib.remove_masks(copy_model(model))
    dataset, sequence_length, windows, structure = _gptq_structure(result, inputs, num_samples)
    config = keras.quantizers.GPTQConfig(
        dataset,
        tokenizer=lambda text: text,  # Used only for string datasets.
        weight_bits=int(bits),
        num_samples=windows,
        sequence_length=sequence_length,
        group_size=group_size,
        quantization_layer_structure=structure,
    )
    # GPTQ's progress bar goes to the log, not to the output.
    interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        with warnings.catch_warnings():
            # Keras names every layer GPTQ does not quantise (Flatten, LayerNormalization,
            # Embedding, ...).
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            warnings.filterwarnings("ignore", message="Invalid quantization mode")
            result.quantize("gptq", config=config)
    finally:
        if interactive:
            keras.config.enable_interactive_logging()
    return result


def round_to_nearest(model, bits, scales="abs_max", per_channel=True):
    """Post-training round-to-nearest of a copy of `model` onto the `bits`-bit grid.

    Each quantisable kernel (Dense, EinsumDense, Embedding, convolutions) is replaced by
    its projection onto the symmetric per-channel grid `keras_fip.Quantize` snaps to
    (`keras_fip.operations.quantize.project`), without data: with `scales="abs_max"`,
    Keras's int8/int4 quantisers' rule (`scale = q_max / max|w|` per output channel)
    carried to any bit width, the post-training reference below 4 bits, where Keras has
    no quantised layers. Masks the model carries are kept (zero is on the grid).

    Args:
        model: A built `keras.Model`. Not changed.
        bits: The bit width, one of 2, 3, 4, 8.
        scales: `"abs_max"`, `"fitted"` or `"auto"` (`keras_fip.Quantize`'s rules).
            Defaults to `"abs_max"`.
        per_channel: One scale per output channel (else per kernel). Defaults to `True`.

    Returns:
        A new `keras.Model` whose kernels lie on the grid.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> kernel = round_to_nearest(model, 2).layers[0].kernel.numpy()
        >>> bool(np.all(np.isin(np.round(kernel / np.abs(kernel).max(axis=0), 6), [-1, 0, 1])))
        True
    """
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"`bits` must be one of {list(BITS)}. Received: bits={bits!r}")
    rule = resolved_scales(scales, bits)
    result = copy_model(model)
    for _, variable, axes in quantizable_variables(result):
        axes = axes if per_channel else None
        variable.assign(project(variable.numpy(), bits, axes, rule)[0])
    return result


def tflite_ptq(model, path):
    """TFLite's post-training dynamic-range quantisation of `model`, written to `path`.

    The float model converted with `tf.lite.Optimize.DEFAULT`
    (`keras_fip.export(model, path, format="tflite")`): int8 kernels with per-channel
    scales, activations quantised on the fly.

    Args:
        model: A built `keras.Model`. Not changed.
        path: The `.tflite` file to write.

    Returns:
        `path`.
    """
    export(model, path, format="tflite")
    return path


def ste_qat(
    model,
    bits,
    data,
    epochs=1,
    learning_rate=1e-4,
    batch_size=128,
    seed=0,
    per_channel=True,
    scales="auto",
):
    """Quantisation-aware training with a straight-through estimator, on the labels.

    Latent float kernels are kept; each step the model's kernels are set to the latent
    kernels' projection onto the `bits`-bit per-channel grid (`keras_fip.operations.
    quantize.project`, the grid `keras_fip.Quantize` snaps to), the labels'
    cross-entropy is differentiated there, and the gradient is applied to the latent
    kernels (the straight-through estimator) and to the other trainable weights with
    Adam. Masks the model carries are kept. At the end the kernels are the projection of
    the latent ones: exactly on the grid.

    Args:
        model: A built classifier (logits or probabilities). Not changed.
        bits: The bit width, one of 2, 3, 4, 8.
        data: Labelled `(x, y)` training data.
        epochs: Passes over `data`. Defaults to `1`.
        learning_rate: Adam's learning rate: a float or a
            `keras.optimizers.schedules.LearningRateSchedule`. Defaults to `1e-4`.
        batch_size: Examples per step. Defaults to `128`.
        seed: Seed of the shuffling. Defaults to `0`.
        per_channel: One scale per output channel (else per kernel). Defaults to `True`.
        scales: The scale rule, as `keras_fip.Quantize`'s (`"auto"`, `"abs_max"` or
            `"fitted"`). Defaults to `"auto"`.

    Returns:
        A new `keras.Model` whose kernels lie on the grid.
    """
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"`bits` must be one of {list(BITS)}. Received: bits={bits!r}")
    x, y = normalize_data(data, name="data", require_labels=True, model=model)
    rule = resolved_scales(scales, bits)
    result = copy_model(model)
    triples = [
        (variable, axes if per_channel else None)
        for _, variable, axes in quantizable_variables(result)
    ]
    kernels = [variable for variable, _ in triples]
    kernel_ids = {id(v) for v in kernels}
    others = [v for v in result.trainable_variables if id(v) not in kernel_ids]
    latent = [keras.Variable(v.numpy(), name="latent") for v in kernels]
    masks = [masks_lib.mask_of(v) for v in kernels]
    from_logits = model_output_kind(result, x) == "logits"
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(latent + others)
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[-1] > 1:
        y = np.argmax(y, axis=-1)

    @tf.function
    def train_step(inputs, labels):
        # The model's kernels are the latent kernels' projection; the gradient taken there
        # is applied to the latent kernels (straight through).
        for (variable, axes), weights in zip(triples, latent):
            variable.assign(project_ops(weights, bits, axes, rule))
        with tf.GradientTape() as tape:
            value = loss(labels, result(inputs, training=True))
        grads = tape.gradient(value, kernels + others)
        kernel_grads = [
            g if mask is None else g * tf.cast(mask, g.dtype)
            for g, mask in zip(grads[: len(kernels)], masks)
        ]
        optimizer.apply(kernel_grads + list(grads[len(kernels) :]), latent + others)

    def snap():
        for (variable, axes), weights in zip(triples, latent):
            variable.assign(project(weights.numpy(), bits, axes, rule)[0])

    rng = np.random.default_rng(seed)
    count = len(y)
    for _ in range(epochs):
        order = rng.permutation(count)
        for start in range(0, count, batch_size):
            rows = order[start : start + batch_size]
            train_step(tf.constant(x[rows]), tf.constant(y[rows]))
    snap()
    return result
