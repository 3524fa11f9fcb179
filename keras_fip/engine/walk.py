"""`Walk`: how a FIP is walked, shared by every walking operation and baseline.

An operation says what the walk is for (its secondary objective, its anchor data); a `Walk`
says how it is walked: the budget, the step rule, the batch size, the output distance, the
weight of the secondary objective, what the path records, where it checkpoints, the seed and
the compilation. A `Walk` names only what it changes: every argument left `None` takes the
operation's default, and those defaults are `DEFAULTS` for every operation but the budget,
which each operation sets for itself.
"""

import math

import keras
import numpy as np

from keras_fip.engine import distances as distances_lib
from keras_fip.engine import rules as rules_lib

REFERENCES = ("start", "local")
VERBOSITIES = ("auto", 0, 1, 2)

# What every walk uses unless it says otherwise (the budget is each operation's own).
DEFAULTS = {
    "rule": "penalty",
    "batch_size": 128,
    "distance": "kl",
    "beta": "auto",
    "reference": "start",
    "training": "auto",
    "record_every": 100,
    "jit_compile": False,
    "verbose": "auto",
}
_FIELDS = (
    "steps",
    "epochs",
    "rule",
    "batch_size",
    "distance",
    "beta",
    "reference",
    "training",
    "record_every",
    "path_directory",
    "checkpoint_directory",
    "seed",
    "jit_compile",
    "verbose",
    "callbacks",
    "log_dir",
)


def _check_positive_integer(value, name):
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def _check_directory(value, name):
    if (
        value is not None
        and not isinstance(value, (str, bytes))
        and not hasattr(value, "__fspath__")
    ):
        raise ValueError(f"`{name}` must be a path or None. Received: {name}={value!r}")
    return None if value is None else str(value)


@keras.saving.register_keras_serializable(package="keras_fip")
class Walk:
    """How a functionally invariant path is walked: budget, step rule, batch, recording.

    Every walking operation takes one (`walk=`). An argument left `None` takes the
    operation's default: `DEFAULTS` (the same for every operation) for all but the budget,
    which each operation sets for itself (its docstring says how). The budget is `steps`
    (exactly that many FIP steps) or `epochs` (passes over the operation's anchor data, each
    `ceil(N / batch_size)` steps).

    Args:
        steps: FIP steps of the walk. Defaults to `None` (the operation's budget).
        epochs: Passes over the anchor data (exclusive with `steps`). Defaults to `None`.
        rule: The step rule: a `keras_fip.rules.Penalty`, `Normalized` or `Metric`, or its
            name. Defaults to `None` (`Penalty(learning_rate="auto")`).
        batch_size: Anchor examples per step (global, over all replicas). Defaults to
            `None` (`128`).
        distance: The output distance D: `"kl"` (the KL divergence of the model's
            distribution from the reference's), `"l2"` (squared L2 on logits, or on a
            probability model's log-probabilities), `"bhattacharyya"`, or a callable
            `fn(outputs, reference_outputs)`. Defaults to `None` (`"kl"`).
        beta: β, the weight of the operation's secondary objective, or `"auto"` (each
            operation scales it to its objective; its docstring says how). Defaults to
            `None` (`"auto"`).
        reference: `"start"` (D to the network the walk starts from) or `"local"` (to the
            previous point of the path). Defaults to `None` (`"start"`).
        training: The mode of the moving network's forward pass: `"auto"` (training mode
            for networks with BatchNormalization, whose statistics are then recalibrated;
            inference mode otherwise), `True` or `False`. Defaults to `None` (`"auto"`).
        record_every: Record the weights into the operation's `Path` every this many steps
            (and at the last). Defaults to `None` (`100`).
        path_directory: A directory the path streams its points to. Defaults to `None`
            (the path is kept in memory).
        checkpoint_directory: A directory to checkpoint the walk to at every recorded point,
            resumed mid-walk when it holds one (needs a `seed`). Defaults to `None`.
        seed: Seed of the batches and of the operation's random choices. Defaults to
            `None`.
        jit_compile: Whether to compile the step with XLA. Defaults to `None` (`False`).
        verbose: `fit`'s verbosity: `"auto"`, 0, 1 or 2. Defaults to `None` (`"auto"`).
        callbacks: Keras callbacks run during the walk (not serialised). Defaults to
            `None`.
        log_dir: A directory for TensorBoard scalars of every step. Defaults to `None`.

    Examples:

        >>> walk = Walk(steps=200, rule=keras_fip.rules.Normalized(epsilon=0.05), seed=0)
        >>> walk
        Walk(steps=200, rule=Normalized(epsilon=0.05), seed=0)
        >>> Walk.from_config(walk.get_config()) == walk
        True
    """

    def __init__(
        self,
        steps=None,
        epochs=None,
        rule=None,
        batch_size=None,
        distance=None,
        beta=None,
        reference=None,
        training=None,
        record_every=None,
        path_directory=None,
        checkpoint_directory=None,
        seed=None,
        jit_compile=None,
        verbose=None,
        callbacks=None,
        log_dir=None,
    ):
        self.steps = _check_positive_integer(steps, "steps")
        self.epochs = _check_positive_integer(epochs, "epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                "Pass at most one of `steps` and `epochs`. "
                f"Received: steps={steps!r}, epochs={epochs!r}"
            )
        self.rule = None if rule is None else rules_lib.get(rule)
        self.batch_size = _check_positive_integer(batch_size, "batch_size")
        if distance is not None:
            distances_lib.get(distance)  # Validates.
        self.distance = distance
        if beta not in (None, "auto") and not (
            isinstance(beta, (int, float, np.integer, np.floating))
            and not isinstance(beta, bool)
            and math.isfinite(beta)
            and beta >= 0
        ):
            raise ValueError(
                f"`beta` must be 'auto' or a non-negative finite number. Received: beta={beta!r}"
            )
        self.beta = beta if beta in (None, "auto") else float(beta)
        if reference is not None and reference not in REFERENCES:
            raise ValueError(
                f"`reference` must be one of {list(REFERENCES)}. Received: reference={reference!r}"
            )
        self.reference = reference
        if training not in (None, "auto") and not isinstance(training, (bool, np.bool_)):
            raise ValueError(
                f"`training` must be 'auto', True or False. Received: training={training!r}"
            )
        self.training = training if training in (None, "auto") else bool(training)
        self.record_every = _check_positive_integer(record_every, "record_every")
        self.path_directory = _check_directory(path_directory, "path_directory")
        self.checkpoint_directory = _check_directory(checkpoint_directory, "checkpoint_directory")
        if seed is not None and (
            not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0
        ):
            raise ValueError(
                f"`seed` must be a non-negative integer or None. Received: seed={seed!r}"
            )
        self.seed = None if seed is None else int(seed)
        if self.checkpoint_directory is not None:
            if self.seed is None:
                raise ValueError(
                    "`checkpoint_directory` needs a `seed` (a resumed walk must see the "
                    "batches it would have seen). Received: seed=None"
                )
            if self.path_directory is not None:
                raise ValueError(
                    "Pass at most one of `checkpoint_directory` and `path_directory` (the "
                    "path streams into the checkpoint). Received: both"
                )
        if jit_compile is not None and not isinstance(jit_compile, (bool, np.bool_)):
            raise ValueError(
                f"`jit_compile` must be True or False. Received: jit_compile={jit_compile!r}"
            )
        self.jit_compile = None if jit_compile is None else bool(jit_compile)
        if verbose is not None and verbose not in VERBOSITIES:
            raise ValueError(
                f"`verbose` must be one of {list(VERBOSITIES)}. Received: verbose={verbose!r}"
            )
        self.verbose = verbose
        if callbacks is not None and not (
            isinstance(callbacks, (list, tuple))
            and all(isinstance(c, keras.callbacks.Callback) for c in callbacks)
        ):
            raise ValueError(
                "`callbacks` must be a list of `keras.callbacks.Callback` or None. "
                f"Received: callbacks={callbacks!r}"
            )
        self.callbacks = None if callbacks is None else list(callbacks)
        self.log_dir = _check_directory(log_dir, "log_dir")

    def resolve(self, steps=None, epochs=None, **defaults):
        """This walk with every `None` filled: the operation's budget, then `DEFAULTS`.

        Args:
            steps: The operation's default budget in steps (used when the walk names no
                budget). Defaults to `None`.
            epochs: The operation's default budget in passes over its anchor data.
                Defaults to `None`.
            **defaults: Other defaults of the operation that differ from `DEFAULTS`.

        Returns:
            A new `Walk` whose fields (but the directories, seed, callbacks and log
            directory) are all set.
        """
        values = {field: getattr(self, field) for field in _FIELDS}
        if values["steps"] is None and values["epochs"] is None:
            values["steps"], values["epochs"] = steps, epochs
        for field, default in {**DEFAULTS, **defaults}.items():
            if values[field] is None:
                values[field] = default
        return type(self)(**values)

    def num_steps(self, num_examples):
        """The walk's steps over `num_examples` anchor examples (on a resolved walk).

        `steps` when set, else `epochs` passes of `ceil(N / batch_size)` steps.

        Args:
            num_examples: N, the anchor examples.

        Returns:
            A positive int.
        """
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise ValueError("The walk has no budget: pass `steps` or `epochs`.")
        batch_size = self.batch_size or DEFAULTS["batch_size"]
        return self.epochs * math.ceil(num_examples / min(batch_size, num_examples))

    def replace(self, **changes):
        """A copy of this walk with `changes` applied (the rest as it is)."""
        values = {field: getattr(self, field) for field in _FIELDS}
        values.update(changes)
        return type(self)(**values)

    def get_config(self):
        config = {field: getattr(self, field) for field in _FIELDS if field != "callbacks"}
        if self.rule is not None:
            config["rule"] = rules_lib.serialize(self.rule)
        if self.distance is not None:
            config["distance"] = distances_lib.serialize(distances_lib.get(self.distance))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("rule") is not None:
            config["rule"] = rules_lib.get(config["rule"])
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        arguments = ", ".join(
            f"{field}={getattr(self, field)!r}"
            for field in _FIELDS
            if getattr(self, field) is not None
        )
        return f"Walk({arguments})"


def get(walk):
    """A `Walk` from a walk, its config, or `None` (all of the operation's defaults)."""
    if walk is None:
        return Walk()
    if isinstance(walk, Walk):
        return walk
    if isinstance(walk, dict):
        if "class_name" in walk:
            return keras.saving.deserialize_keras_object(walk)
        return Walk.from_config(walk)
    raise ValueError(f"`walk` must be a `keras_fip.Walk` or None. Received: walk={walk!r}")
