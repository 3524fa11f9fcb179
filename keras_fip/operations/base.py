"""`Operation`: the one idea everything hangs on, a validated, serialisable `model -> model`."""

import math
import re
import weakref

import keras
import numpy as np

from keras_fip.core import layers as layers_lib
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.data_adapter import normalize_data
from keras_fip.engine import walk as walk_lib
from keras_fip.engine.path import Path
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.engine.walk_checkpoint import WalkCheckpoint

# Layers whose weights and computation the FIP machinery handles (JVPs, masks, copies).
SUPPORTED_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "InputLayer",
        "Dense",
        "EinsumDense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "Embedding",
        "MultiHeadAttention",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
        "Flatten",
        "Reshape",
        "Permute",
        "RepeatVector",
        "Identity",
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "GaussianNoise",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "ELU",
        "Softmax",
        "PReLU",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "Cropping1D",
        "Cropping2D",
        "UpSampling1D",
        "UpSampling2D",
        "Rescaling",
    )
    if hasattr(keras.layers, name)
)

# Layers of other Keras libraries, by package and class name, that hold plain weights
# (no state beyond their variables): KerasHub's BERT embeddings and masked-LM head.
THIRD_PARTY_LAYERS = {
    "keras_hub": ("PositionEmbedding", "ReversibleEmbedding", "MaskedLMHead"),
}

_CARRIED_DATA = weakref.WeakKeyDictionary()


def carried_data(model):
    """The anchor inputs a model carries from an earlier keras_fip operation, or `None`.

    Args:
        model: A `keras.Model`.

    Returns:
        A numpy array of inputs, or `None`.
    """
    return _CARRIED_DATA.get(model)


def carry_data(model, inputs):
    """Attaches anchor inputs to a model so that later operations can default to them.

    Operations that keep a memory of the data they served (e.g. `ContinualLearn`) call
    this on the model they return; an `Operation` given no `data` then uses these inputs.
    The model is not otherwise changed and the inputs are not saved with it.

    Args:
        model: A `keras.Model`.
        inputs: Inputs (array, `(x, y)` tuple or finite `tf.data.Dataset`).
    """
    x, _ = normalize_data(inputs, name="inputs", model=model)
    _CARRIED_DATA[model] = x


def model_output_kind(model, data):
    """What `model` returns, `"logits"` or `"probabilities"`, read from its graph or,
    where the graph does not show it, from its outputs on `data`
    (`keras_fip.core.outputs.output_kind`)."""
    kind = outputs_lib.structural_output_kind(model)
    if kind is None:
        x, _ = normalize_data(data, name="data", model=model)
        kind = outputs_lib.output_kind(model, x)
    return kind


def check_labels(labels):
    """The `labels` argument of an operation that can use the labels of its data.

    Args:
        labels: `"auto"` (the operation chooses the labels' weight), `False` (the inputs
            alone) or the non-negative weight of the labels' cross-entropy.

    Returns:
        `"auto"` or the weight as a float (`False` is 0.0).

    Raises:
        ValueError: for anything else, naming `labels`.

    Examples:

        >>> check_labels(False), check_labels(1), check_labels("auto")
        (0.0, 1.0, 'auto')
    """
    if isinstance(labels, str) and labels == "auto":
        return labels
    if labels is False:
        return 0.0
    valid = (
        isinstance(labels, (int, float, np.integer, np.floating))
        and not isinstance(labels, bool)
        and math.isfinite(labels)
        and labels >= 0
    )
    if not valid:
        raise ValueError(
            "`labels` must be 'auto', False (the inputs alone) or the non-negative weight of "
            f"the labels' cross-entropy. Received: labels={labels!r}"
        )
    return float(labels)


def _snake_case(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def check_model(model, argument="model"):
    """Raises a `ValueError` unless `model` is a built Keras model of supported layers.

    Standard layers (`SUPPORTED_LAYERS`) are accepted; a container (a nested model, or a
    custom layer without weights of its own) is accepted when all its sub-layers are. Any
    other layer is named in the error: it is never silently skipped.

    Args:
        model: The model to check.
        argument: The argument name used in error messages. Defaults to `"model"`.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`{argument}` must be a `keras.Model`. Received: {argument}={model!r}")
    if not model.built or not model.trainable_variables:
        raise ValueError(
            f"`{argument}` must be a built model with trainable weights. Received: "
            f"{argument}={model.name} with {len(model.trainable_variables)} trainable "
            "variables"
        )

    def visit(layer, seen):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, SUPPORTED_LAYERS) or type(layer).__name__ in (
            THIRD_PARTY_LAYERS.get(type(layer).__module__.split(".")[0], ())
        ):
            return
        children = layers_lib.sublayers(layer)
        child_weights = {id(w) for child in children for w in child.weights}
        own_weights = [w for w in layer.weights if id(w) not in child_weights]
        is_builtin = type(layer).__module__.startswith("keras.")
        if isinstance(layer, keras.Model) or (not is_builtin and children and not own_weights):
            for child in children:
                visit(child, seen)
            return
        raise ValueError(
            f"`{argument}` contains layer `{layer.name}` of unsupported type "
            f"{type(layer).__name__}. keras_fip supports standard layers (Dense, Conv, "
            "DepthwiseConv, BatchNormalization, LayerNormalization, Embedding, "
            "MultiHeadAttention, pooling, merging, reshaping, activation, dropout; see "
            "`keras_fip.operations.base.SUPPORTED_LAYERS`), nested models and custom "
            f"layers built only from them. Received: {argument}={model.name}"
        )

    for layer in layers_lib.sublayers(model):
        visit(layer, {id(model)})


@keras.saving.register_keras_serializable(package="keras_fip")
class Operation:
    """A validated, serialisable transformation `model -> new model`.

    Subclasses validate their hyper-parameters in `__init__` (a `ValueError` naming the
    argument, what was expected and `Received: arg=...`, before any work), may check the
    data against the model in `validate(model)` (run before the model is copied), implement
    `call(model)` on a private copy, and list their arguments in `get_config`. Calling an
    operation checks the model's layers, runs `validate`, copies the model
    (`keras_fip.engine.copy_model`: same weights, same masks), runs `call` on the copy and
    returns the result: **the input model is never changed**, and one operation object can
    be called on several models (each call is independent; `op.path` and `op.history`
    describe the last call). `keras_fip.chain(*ops)` composes operations into one.

    Args:
        name: Name of the operation. Defaults to `None` (the class name in snake case).

    Examples:

        >>> class Scale(Operation):
        ...     def __init__(self, factor=2.0, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.factor = self.check_number(factor, "factor", low=0.0)
        ...     def call(self, model):
        ...         for variable in model.trainable_variables:
        ...             variable.assign(variable * self.factor)
        ...         return model
        ...     def get_config(self):
        ...         return {**super().get_config(), "factor": self.factor}
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> scaled = Scale(3.0)(model)
        >>> scaled is model
        False
    """

    def __init__(self, name=None):
        if name is not None and not isinstance(name, str):
            raise ValueError(f"`name` must be a string or None. Received: name={name!r}")
        self.name = name or _snake_case(type(self).__name__)
        self.path = None
        self.history = None

    # Validation helpers (the `Received: arg=...` pattern).

    @staticmethod
    def check_number(
        value, name, low=None, high=None, low_inclusive=False, high_inclusive=True, integer=False
    ):
        """Returns `value` if it is a number in the range, else raises a `ValueError`.

        Args:
            value: The value to check.
            name: The argument name.
            low: Lower bound, or `None`. Defaults to `None`.
            high: Upper bound, or `None`. Defaults to `None`.
            low_inclusive: Whether `low` itself is allowed. Defaults to `False`.
            high_inclusive: Whether `high` itself is allowed. Defaults to `True`.
            integer: Whether `value` must be an integer. Defaults to `False`.

        Returns:
            `value` as an `int` or `float`.
        """
        types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        ok = isinstance(value, types) and not isinstance(value, bool)
        ok = ok and np.isfinite(value)
        if ok and low is not None:
            ok = value >= low if low_inclusive else value > low
        if ok and high is not None:
            ok = value <= high if high_inclusive else value < high
        if not ok:
            kind = "an integer" if integer else "a number"
            bounds = []
            if low is not None:
                bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
            if high is not None:
                bounds.append(f"{'<=' if high_inclusive else '<'} {high}")
            expected = kind + (f" {' and '.join(bounds)}" if bounds else "")
            raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")
        return int(value) if integer else float(value)

    @staticmethod
    def check_choice(value, name, choices):
        """Returns `value` if it is one of `choices`, else raises a `ValueError`."""
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}")
        return value

    @staticmethod
    def check_layer_names(layers, name="layers"):
        """`None`, or `layers` as a non-empty list of layer names (a lone name is a list of
        one); anything else raises a `ValueError`."""
        if layers is None:
            return None
        if isinstance(layers, str):
            layers = [layers]
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or not all(isinstance(layer, str) for layer in layers)
        ):
            raise ValueError(
                f"`{name}` must be `None` or a non-empty list of layer names. "
                f"Received: {name}={layers!r}"
            )
        return list(layers)

    # Calling.

    def __call__(self, model):
        """Returns a new model: the operation applied to a copy of `model`.

        Args:
            model: A built `keras.Model` of supported layers. Never changed.

        Returns:
            A new `keras.Model`.
        """
        check_model(model)
        self.path = None
        self.history = None
        self.validate(model)
        copy = copy_model(model)
        data = carried_data(model)
        if data is not None:
            _CARRIED_DATA[copy] = data
        result = self.call(copy)
        if not isinstance(result, keras.Model):
            raise TypeError(
                f"{type(self).__name__}.call must return a `keras.Model`. Received: {result!r}"
            )
        return result

    def validate(self, model):
        """Checks the operation's data against `model` before any work (no copy yet).

        Args:
            model: The model the operation was called on. Not to be changed.
        """

    def call(self, model):
        """Transforms `model` (a private copy, free to change) and returns the result.

        Args:
            model: A copy of the model the operation was called on.

        Returns:
            A `keras.Model`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `call(model)`.")

    def resolve_data(self, data, model, argument="data"):
        """`data` if given, else the inputs `model` carries, else a `ValueError`."""
        if data is not None:
            return data
        carried = carried_data(model)
        if carried is None:
            raise ValueError(
                f"`{argument}` is required: model `{model.name}` carries no data from an "
                f"earlier keras_fip operation. Received: {argument}=None"
            )
        return carried

    # Serialisation.

    def get_config(self):
        """The constructor arguments (subclasses add theirs).

        Returns:
            A dict.
        """
        return {"name": self.name}

    @classmethod
    def from_config(cls, config):
        """Re-creates the operation from `get_config()`.

        Args:
            config: A dict from `get_config`.

        Returns:
            An `Operation`.
        """
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class WalkingOperation(Operation):
    """An operation that walks a FIP: it takes a `keras_fip.Walk` (`walk=`).

    The walk says how the path is walked (budget, step rule, batch size, distance, β,
    recording, checkpointing, seed, compilation); what it leaves open takes `DEFAULT_BUDGET`
    (this operation's own) and `keras_fip.engine.walk.DEFAULTS` (every operation's).
    `fip_walk` runs one walk and sets `op.path` (a `keras_fip.Path`) and `op.history` (a
    dict of per-step lists, as `fit`'s `History` holds per epoch).

    Args:
        walk: A `keras_fip.Walk`, or `None` (every default). Defaults to `None`.
        name: Name of the operation. Defaults to `None`.
    """

    # The operation's budget when its walk names none: `{"epochs": n}` or `{"steps": n}`.
    DEFAULT_BUDGET = {"epochs": 10}

    def __init__(self, walk=None, name=None):
        super().__init__(name=name)
        self.walk = walk_lib.get(walk)

    def resolved_walk(self, **defaults):
        """The walk with the operation's budget and `defaults` (then `DEFAULTS`) filled."""
        return self.walk.resolve(**{**self.DEFAULT_BUDGET, **defaults})

    def checkpoint_config(self):
        """The config a checkpoint is tied to: `get_config()` without what does not change
        the walk (progress display, callbacks, logs, directories)."""
        config = dict(self.get_config())
        walk = dict(config.pop("walk", {}) or {})
        for key in ("verbose", "log_dir", "checkpoint_directory", "path_directory", "record_every"):
            walk.pop(key, None)
        return {"class": type(self).__name__, **config, "walk": walk}

    def open_checkpoint(self, walk):
        """A `keras_fip.engine.WalkCheckpoint` for this call's walks, or `None`."""
        if walk.checkpoint_directory is None:
            return None
        return WalkCheckpoint(walk.checkpoint_directory, self.checkpoint_config())

    def open_path(self, model, walk, checkpoint=None):
        """The `Path` a walk records into: a new one (streamed to `walk.path_directory`),
        or the checkpoint's path, reopened at its last recorded point."""
        if checkpoint is None:
            return Path(model, record_every=walk.record_every, directory=walk.path_directory)
        return checkpoint.open_path(model, walk.record_every)

    def fip_walk(
        self,
        model,
        walk,
        anchor,
        steps,
        secondary=None,
        optimizer=None,
        output_kind=None,
        **trainer_kwargs,
    ):
        """Walks `model` (in place) `steps` steps along a FIP; sets `op.path`, `op.history`.

        Builds a `FIPTrainer` (in the current `tf.distribute` strategy scope) and the
        anchor/secondary pipeline, then walks, recording into a new `keras_fip.Path` (or
        resuming from the walk's checkpoint). On a non-finite step the model and the path
        keep the last finite point and a `FloatingPointError` is raised.

        Args:
            model: The model to move (the operation's private copy).
            walk: The resolved `keras_fip.Walk` of this call.
            anchor: Anchor inputs whose outputs are kept.
            steps: Number of FIP steps.
            secondary: Secondary data, or `None`. Defaults to `None`.
            optimizer: The optimizer, or `None` (`walk.rule.optimizer`). Defaults to
                `None`.
            output_kind: What `model` returns, or `None` (read from the model and the
                anchor). Defaults to `None`.
            **trainer_kwargs: Other `FIPTrainer` arguments (`beta`, `secondary_loss`,
                `secondary_objective`, `metric_length`, `training`, `measure_every`).

        Returns:
            `model`, moved.
        """
        output_kind = output_kind or model_output_kind(model, anchor)
        trainer_kwargs.setdefault("measure_every", walk.record_every)
        trainer = FIPTrainer(
            model,
            rule=walk.rule,
            distance=walk.distance,
            reference=walk.reference,
            outputs=output_kind,
            **trainer_kwargs,
        )
        if optimizer is None:
            optimizer = walk.rule.optimizer(steps, model.trainable_variables)
        trainer.compile(optimizer=optimizer, jit_compile=walk.jit_compile)
        # The reference outputs are the logits the trainer compares (`trainer.network`).
        dataset = fip_dataset(
            trainer.network,
            anchor,
            secondary=secondary,
            batch_size=walk.batch_size,
            reference=walk.reference,
            seed=walk.seed,
        )
        checkpoint = self.open_checkpoint(walk)
        self.history = {}
        self.path = self.open_path(model, walk, checkpoint)
        options = {"callbacks": walk.callbacks, "verbose": walk.verbose, "log_dir": walk.log_dir}
        if checkpoint is None:
            self.history = trainer.walk(dataset, steps, path=self.path, **options)
            return model
        self.history = checkpoint.walk("walk", trainer, dataset, steps, self.path, **options)
        checkpoint.close()
        return model

    def get_config(self):
        return {**super().get_config(), "walk": self.walk.get_config()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("walk") is not None:
            config["walk"] = walk_lib.get(config["walk"])
        return cls(**config)
