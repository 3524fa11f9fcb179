"""`Isofunctional`: a pure functionally invariant walk (L = 0 up to a push)."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.engine import distances as distances_lib
from keras_fip.engine import step_rules
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.operations.base import Operation

PUSHES = ("random", "shrink", "none")


class _LinearPush:
    """L(w) = −⟨u, w⟩ for a fixed unit direction u: ∇L = −u, a constant pull along u."""

    def __init__(self, direction):
        self.direction = [tf.constant(piece) for piece in direction]

    def __call__(self, model, batch):
        return -step_rules.inner_product(
            [tf.cast(u, v.dtype) for u, v in zip(self.direction, model.trainable_variables)],
            [v.value for v in model.trainable_variables],
        )


def _shrink(model, batch):
    """L(w) = ½‖w‖²: a pull towards smaller weights."""
    return 0.5 * tf.add_n([tf.reduce_sum(tf.square(v.value)) for v in model.trainable_variables])


def random_direction(model, seed=None):
    """A random unit direction over the model's trainable weights, zero on masked weights.

    Args:
        model: A built `keras.Model`.
        seed: Seed of the Gaussian draw. Defaults to `None`.

    Returns:
        A list of numpy arrays aligned with `model.trainable_variables`, of total
        Euclidean norm 1.
    """
    rng = np.random.default_rng(seed)
    direction = []
    for variable in model.trainable_variables:
        piece = rng.standard_normal(tuple(variable.shape))
        mask = getattr(variable.constraint, "mask", None)
        if mask is not None:
            piece = piece * mask
        direction.append(piece)
    norm = np.sqrt(sum(float(np.sum(piece**2)) for piece in direction))
    dtypes = [keras.backend.standardize_dtype(v.dtype) for v in model.trainable_variables]
    return [(piece / norm).astype(dtype) for piece, dtype in zip(direction, dtypes)]


@keras.saving.register_keras_serializable(package="keras_fip")
class Isofunctional(Operation):
    """Moves a model through weight space while keeping its outputs: a pure FIP walk.

    The secondary objective is only a push that makes the weights move: `"random"` pulls
    along a fixed random unit direction u (L = −⟨u, w⟩), `"shrink"` towards smaller
    weights (L = ½‖w‖²), `"none"` is L = 0 (with `"penalty"` or `"normalized"` the walk
    then only follows D). With the default `"metric"` rule each step is
    `θ ∝ −(g + δI)⁻¹ β ∇L` of length ε: the push projected away from the directions the
    anchor outputs are sensitive to. The result computes (nearly) the same function as the
    input with different weights; `op.path` records the walk.

    Args:
        data: Anchor inputs whose outputs are kept: an array, an `(x, y)` tuple or a
            finite `tf.data.Dataset`. Defaults to `None` (the inputs the model carries
            from an earlier operation).
        steps: Number of FIP steps. Defaults to `100`.
        epsilon: ε, the step length (`"normalized"` and `"metric"` rules). Defaults to
            `0.01`.
        push: `"random"`, `"shrink"` or `"none"`. Defaults to `"random"`.
        step_rule: `"metric"`, `"normalized"` or `"penalty"`. Defaults to `"metric"`.
        beta: β, the weight of the push. Defaults to `1.0`.
        distance: Output distance D (`"l2"`, `"kl"`, `"bhattacharyya"`). Defaults to
            `"l2"`.
        reference: `"start"` or `"local"`. Defaults to `"start"`.
        damping: δ of the `"metric"` rule. Defaults to `1e-3`.
        cg_iterations: CG iterations of the `"metric"` rule. Defaults to `10`.
        learning_rate: Adam learning rate of the `"penalty"` rule. Defaults to `1e-3`.
        batch_size: Anchor examples per step. Defaults to `128`.
        record_every: Record the weights in `op.path` every this many steps. Defaults to
            `10`.
        path_directory: Directory to stream the path to, or `None`. Defaults to `None`.
        jit_compile: Whether to compile the step with XLA. Defaults to `False`.
        seed: Seed of the push direction and of the shuffling. Defaults to `None`.
        **kwargs: `Operation` arguments (`name`, `verbose`, `callbacks`, `log_dir`).

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> walk = Isofunctional(data=x, steps=5, epsilon=0.01, batch_size=8, seed=0,
    ...                      verbose=0)
    >>> moved = walk(model)
    >>> [round(length, 6) for length in walk.history["step_norm"]]
    [0.01, 0.01, 0.01, 0.01, 0.01]
    """

    def __init__(
        self,
        data=None,
        steps=100,
        epsilon=0.01,
        push="random",
        step_rule="metric",
        beta=1.0,
        distance="l2",
        reference="start",
        damping=1e-3,
        cg_iterations=10,
        learning_rate=1e-3,
        batch_size=128,
        record_every=10,
        path_directory=None,
        jit_compile=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        self.steps = self.check_number(steps, "steps", low=1, low_inclusive=True, integer=True)
        self.epsilon = self.check_number(epsilon, "epsilon", low=0.0)
        self.push = self.check_choice(push, "push", PUSHES)
        self.step_rule = self.check_choice(step_rule, "step_rule", step_rules.STEP_RULES)
        if self.step_rule == "metric" and self.push == "none":
            raise ValueError(
                "`push='none'` gives the `metric` rule a zero right-hand side (no step). "
                "Use push='random' or 'shrink', or step_rule='normalized'. "
                f"Received: push={push!r}, step_rule={step_rule!r}"
            )
        self.beta = self.check_number(beta, "beta")
        distances_lib.get(distance)
        self.distance = distance
        self.reference = self.check_choice(reference, "reference", ("start", "local"))
        self.damping = self.check_number(damping, "damping", low=0.0, low_inclusive=True)
        self.cg_iterations = self.check_number(
            cg_iterations, "cg_iterations", low=1, low_inclusive=True, integer=True
        )
        self.learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.batch_size = self.check_number(
            batch_size, "batch_size", low=1, low_inclusive=True, integer=True
        )
        self.record_every, self.path_directory, self.seed = self.check_path_options(
            record_every, path_directory, seed
        )
        self.jit_compile = bool(jit_compile)

    def call(self, model):
        anchor = self.resolve_data(self.data, model)
        if self.push == "random":
            objective = _LinearPush(random_direction(model, self.seed))
        elif self.push == "shrink":
            objective = _shrink
        else:
            objective = None
        optimizer = None
        if self.step_rule == "penalty":
            optimizer = keras.optimizers.Adam(self.learning_rate)
        return self.fip_walk(
            model,
            anchor,
            self.steps,
            batch_size=self.batch_size,
            optimizer=optimizer,
            record_every=self.record_every,
            path_directory=self.path_directory,
            jit_compile=self.jit_compile,
            seed=self.seed,
            step_rule=self.step_rule,
            distance=self.distance,
            beta=self.beta,
            epsilon=self.epsilon,
            damping=self.damping,
            cg_iterations=self.cg_iterations,
            secondary_objective=objective,
            reference=self.reference,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "data": self.data,
            "steps": self.steps,
            "epsilon": self.epsilon,
            "push": self.push,
            "step_rule": self.step_rule,
            "beta": self.beta,
            "distance": self.distance,
            "reference": self.reference,
            "damping": self.damping,
            "cg_iterations": self.cg_iterations,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "record_every": self.record_every,
            "path_directory": self.path_directory,
            "jit_compile": self.jit_compile,
            "seed": self.seed,
        }
