"""`Walk`: how a FIP is walked, shared by every walking operation and baseline.

An operation says what the walk is for (its secondary objective, its anchor data); a `Walk`
says how it is walked: the budget, the step rule, the batch size, the output distance, the
weight of the secondary objective, what the path records, where it checkpoints, the seed and
the compilation. One `Walk` can configure any operation, as one optimizer configures any
model's `compile`.
"""

import math

import keras
import numpy as np

from keras_fip.engine import distances as distances_lib
from keras_fip.engine import rules as rules_lib

REFERENCES = ("start", "local")
VERBOSITIES = ("auto", 0, 1, 2)


def _check_positive_integer(value, name, allow_none=True):
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def _check_directory(value, name):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a path (str) or None. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="keras_fip")
class Walk:
    """How a functionally invariant path is walked: budget, step rule, batch, recording.

    Every walking operation takes one (`walk=`) and fills what is left `None` with its own
    defaults, so `Walk()` means "the operation's defaults" and a `Walk` names only what it
    changes. The budget is `steps` (exactly that many FIP steps) or `epochs` (passes over the
    operation's anchor data, each `ceil(N / batch_size)` steps); with neither, the operation's
    own default budget.

    Args:
        steps: FIP steps of the walk, or `None`. Defaults to `None`.
        epochs: Passes over the anchor data, or `None` (exclusive with `steps`). Defaults
            to `None`.
        rule: The step rule: a `keras_fip.rules.Penalty`, `Normalized` or `Metric`, or its
            name. Defaults to `"penalty"` (`Penalty(learning_rate="auto")`).
        batch_size: Anchor examples per step (global, over all replicas). Defaults to
            `128`.
        distance: The output distance D: `"kl"` (the KL divergence of the model's
            distribution from the reference's), `"l2"` (squared L2 on logits),
            `"bhattacharyya"`, or a callable `fn(outputs, reference_outputs)`. Defaults to
            `"kl"`.
        beta: β, the weight of the operation's secondary objective, or `"auto"` (each
            operation scales it to its objective, see its docstring). Defaults to `"auto"`.
        reference: `"start"` (D to the network the walk starts from) or `"local"` (to the
            previous point of the path). Defaults to `"start"`.
        training: The mode of the moving network's forward pass: `"auto"` (training mode
            for networks with BatchNormalization, whose statistics are then recalibrated;
            inference mode otherwise), `True` or `False`. Defaults to `"auto"`.
        record_every: Record the weights into the operation's `Path` every this many steps
            (and at the last). Defaults to `100`.
        path_directory: A directory the path streams its points to, or `None` (kept in
            memory). Defaults to `None`.
        checkpoint_directory: A directory to checkpoint the walk to at every recorded point,
            resumed mid-walk when it holds one (needs a `seed`). Defaults to `None`.
        seed: Seed of the batches and of any random choice of the operation. Defaults to
            `None`.
        jit_compile: Whether to compile the step with XLA. Defaults to `False`.
        verbose: `fit`'s verbosity: `"auto"`, 0, 1 or 2. Defaults to `"auto"`.
        callbacks: Keras callbacks run during the walk. Not serialised. Defaults to
            `None`.
        log_dir: A directory for TensorBoard scalars of every step, or `None`. Defaults
            to `None`.

    Example:

    >>> walk = Walk(steps=200, rule=keras_fip.rules.Normalized(epsilon=0.05), seed=0)
    >>> Walk.from_config(walk.get_config()).rule
    Normalized(epsilon=0.05)
    """

    def __init__(
        self,
        steps=None,
        epochs=None,
        rule="penalty",
        batch_size=128,
        distance="kl",
        beta="auto",
        reference="start",
        training="auto",
        record_every=100,
        path_directory=None,
        checkpoint_directory=None,
        seed=None,
        jit_compile=False,
        verbose="auto",
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
        self.rule = rules_lib.get(rule)
        self.batch_size = _check_positive_integer(batch_size, "batch_size", allow_none=False)
        distances_lib.get(distance)  # Validates.
        self.distance = distance
        if beta != "auto" and not (
            isinstance(beta, (int, float, np.integer, np.floating))
            and not isinstance(beta, bool)
            and math.isfinite(beta)
            and beta >= 0
        ):
            raise ValueError(
                f"`beta` must be 'auto' or a non-negative finite number. Received: beta={beta!r}"
            )
        self.beta = beta if beta == "auto" else float(beta)
        if reference not in REFERENCES:
            raise ValueError(
                f"`reference` must be one of {list(REFERENCES)}. Received: reference={reference!r}"
            )
        self.reference = reference
        if training != "auto" and not isinstance(training, (bool, np.bool_)):
            raise ValueError(
                f"`training` must be 'auto', True or False. Received: training={training!r}"
            )
        self.training = training if training == "auto" else bool(training)
        self.record_every = _check_positive_integer(record_every, "record_every", False)
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
                    "Pass at most one of `checkpoint_directory` and `path_directory` (the path "
                    "streams into the checkpoint). Received: both"
                )
        if not isinstance(jit_compile, (bool, np.bool_)):
            raise ValueError(
                f"`jit_compile` must be True or False. Received: jit_compile={jit_compile!r}"
            )
        self.jit_compile = bool(jit_compile)
        if verbose not in VERBOSITIES:
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

    def num_steps(self, num_examples, default_steps=None, default_epochs=None):
        """The walk's steps over `num_examples` anchor examples.

        `steps` when given; else `epochs` passes of `ceil(N / batch_size)` steps; else the
        operation's default (`default_steps`, or `default_epochs` passes).

        Args:
            num_examples: N, the anchor examples.
            default_steps: The operation's default budget in steps, or `None`.
            default_epochs: The operation's default budget in passes, or `None`.

        Returns:
            A positive int.
        """
        if self.steps is not None:
            return self.steps
        epochs = self.epochs
        if epochs is None and default_steps is not None:
            return int(default_steps)
        epochs = epochs if epochs is not None else default_epochs
        if epochs is None:
            raise ValueError("The walk has no budget: pass `steps` or `epochs`.")
        per_epoch = math.ceil(num_examples / min(self.batch_size, num_examples))
        return int(epochs) * per_epoch

    def replace(self, **changes):
        """A copy of this walk with `changes` applied (the rest as it is)."""
        config = self.get_config()
        config["callbacks"] = self.callbacks
        config.update(changes)
        return type(self)(**config)

    def get_config(self):
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "rule": rules_lib.serialize(self.rule),
            "batch_size": self.batch_size,
            "distance": distances_lib.serialize(distances_lib.get(self.distance)),
            "beta": self.beta,
            "reference": self.reference,
            "training": self.training,
            "record_every": self.record_every,
            "path_directory": self.path_directory,
            "checkpoint_directory": self.checkpoint_directory,
            "seed": self.seed,
            "jit_compile": self.jit_compile,
            "verbose": self.verbose,
            "log_dir": self.log_dir,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["rule"] = rules_lib.get(config["rule"])
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        defaults = Walk().get_config()
        changed = {
            key: value
            for key, value in self.get_config().items()
            if value != defaults[key] and key != "rule"
        }
        if self.rule != rules_lib.Penalty():
            changed["rule"] = self.rule
        arguments = ", ".join(f"{key}={value!r}" for key, value in changed.items())
        return f"Walk({arguments})"


def get(walk):
    """A `Walk` from a walk, its config, or `None` (the operation's defaults)."""
    if walk is None:
        return Walk()
    if isinstance(walk, Walk):
        return walk
    if isinstance(walk, dict):
        if "class_name" in walk:
            return keras.saving.deserialize_keras_object(walk)
        return Walk.from_config(walk)
    raise ValueError(f"`walk` must be a `keras_fip.Walk` or None. Received: walk={walk!r}")
