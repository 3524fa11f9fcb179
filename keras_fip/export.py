"""`keras_fip.export`: a SavedModel for serving, made of plain Keras layers."""

import os
import tempfile

import keras
import tensorflow as tf

from keras_fip.core.copy import strip_masks

FORMATS = ("saved_model", "tflite")


def export(model, directory, input_signature=None, verbose=False, format="saved_model"):
    """Writes a model as a TensorFlow SavedModel with a `serve` signature, or as TFLite.

    Masks are stripped first (`keras_fip.engine.strip_masks`): the exported model is made
    of plain layers, its masked weights still exactly zero. Nested models, such as the
    members of a keras_fip ensemble, are exported with their parent. The export goes
    through `keras.export.ExportArchive`; the `serve` endpoint runs the model in inference
    mode on a batch of any size. The input model is not changed.

    `format="tflite"` writes that SavedModel's `serve` signature as one TFLite file (at
    `directory`), converted with `tf.lite.Optimize.DEFAULT`: kernels are stored as int8
    with per-channel scales where the converter quantises them, so a model whose kernels
    lie on a grid of at most 8 bits (`keras_fip.Quantize`) keeps its integers up to the
    int8 rounding; Keras's int8/int4 layers keep their integer kernels, their unpacking
    running as TensorFlow ops where TFLite has no builtin. Run it with
    `tf.lite.Interpreter(model_path=directory).get_signature_runner("serve")`.

    Args:
        model: A built `keras.Model`.
        directory: Directory to write the SavedModel to.
        input_signature: Optional list of `tf.TensorSpec`, one per model input. Needed
            for subclassed models, which carry no symbolic inputs; for Sequential and
            functional models it is read from `model.inputs` with a dynamic batch size.
            Defaults to `None`.
        verbose: Whether `ExportArchive.write_out` prints a summary. Defaults to `False`.
        format: `"saved_model"` (a directory) or `"tflite"` (a file). Defaults to
            `"saved_model"`.

    Returns:
        `None`. Serve with `loaded = tf.saved_model.load(directory)` then
        `loaded.serve(x)` (keep `loaded` referenced while serving).

    Examples:

        >>> import keras, numpy as np, tempfile, tensorflow as tf
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> directory = tempfile.mkdtemp()
        >>> export(model, directory)
        >>> loaded = tf.saved_model.load(directory)
        >>> tuple(loaded.serve(np.ones((4, 3), "float32")).shape)
        (4, 2)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            "`model` must be built (called on data or `build()`) before export. "
            f"Received: model={model.name} (built=False)"
        )
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"`directory` must be a path. Received: directory={directory!r}")
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}. Received: format={format!r}")
    input_signature = _input_signature(model, input_signature)
    if format == "tflite":
        with tempfile.TemporaryDirectory() as saved_model:
            export(model, saved_model, input_signature, verbose)
            converter = tf.lite.TFLiteConverter.from_saved_model(
                saved_model, signature_keys=["serve"]
            )
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS,
                tf.lite.OpsSet.SELECT_TF_OPS,
            ]
            flatbuffer = converter.convert()
        with open(os.fspath(directory), "wb") as file:
            file.write(flatbuffer)
        return

    # Plain layers, zeros kept.
    plain = strip_masks(model)

    # One `serve` endpoint in inference mode.
    archive = keras.export.ExportArchive()
    archive.track(plain)
    if len(input_signature) == 1:

        def serve(inputs):
            return plain(inputs, training=False)

    else:

        def serve(*inputs):
            return plain(list(inputs), training=False)

    archive.add_endpoint("serve", serve, input_signature=input_signature)
    archive.write_out(os.fspath(directory), verbose=verbose)


def _input_signature(model, input_signature):
    """A list of `tf.TensorSpec` with a dynamic batch dimension."""
    if input_signature is not None:
        specs = (
            list(input_signature)
            if isinstance(input_signature, (list, tuple))
            else [input_signature]
        )
        if not specs or not all(isinstance(s, tf.TensorSpec) for s in specs):
            raise ValueError(
                "`input_signature` must be a `tf.TensorSpec` or a list of them, one per "
                f"model input. Received: input_signature={input_signature!r}"
            )
        return specs
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"Model `{model.name}` ({type(model).__name__}) has no symbolic inputs, so "
            "the serving signature cannot be inferred. Pass `input_signature`, e.g. "
            "`[tf.TensorSpec((None, 28, 28, 1), tf.float32)]`. "
            "Received: input_signature=None"
        )
    return [
        tf.TensorSpec(
            shape=(None,) + tuple(tensor.shape[1:]),
            dtype=tensor.dtype,
            name=getattr(tensor, "name", None),
        )
        for tensor in inputs
    ]
