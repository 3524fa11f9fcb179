"""`Isofunctional`: a pure functionally invariant walk (L = 0 up to a push)."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.core.data_adapter import num_examples
from keras_fip.engine import step_rules
from keras_fip.operations.base import WalkingOperation

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
class Isofunctional(WalkingOperation):
    """Moves a model through weight space while keeping its outputs: a pure FIP walk.

    The secondary objective is only a push that makes the weights move: `"random"` pulls
    along a fixed random unit direction u (L = −⟨u, w⟩), `"shrink"` towards smaller
    weights (L = ½‖w‖²), `"none"` is L = 0 (the walk then only follows D, with the
    `Penalty` or `Normalized` rule). With this operation's default rule,
    `keras_fip.rules.Metric`, each step is `θ ∝ −(g + δI)⁻¹ ∇L` of length ε: the push
    projected away from the directions the anchor outputs are sensitive to (β only scales
    L, so it does not change a `Metric` step). The result computes (nearly) the same
    function as the input with different weights; `op.path` records the walk.

    The walk's defaults here: 100 steps, the `Metric` rule, a point recorded every 10
    steps, β = 1; the rest as every walk's (`keras_fip.engine.walk.DEFAULTS`).

    Args:
        data: Anchor inputs whose outputs are kept: an array, an `(x, y)` tuple or a
            finite `tf.data.Dataset`. Defaults to `None` (the inputs the model carries
            from an earlier operation).
        push: `"random"`, `"shrink"` or `"none"`. Defaults to `"random"`.
        walk: A `keras_fip.Walk` (budget, rule, batch, seed, ...). Defaults to `None`.
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.rand(32, 4).astype("float32")
        >>> walk = keras_fip.Walk(steps=5, batch_size=8, record_every=1, seed=0, verbose=0)
        >>> isofunctional = Isofunctional(data=x, walk=walk)
        >>> moved = isofunctional(model)
        >>> [round(length, 6) for length in isofunctional.history["step_norm"]]
        [0.01, 0.01, 0.01, 0.01, 0.01]
    """

    DEFAULT_BUDGET = {"steps": 100}

    def __init__(self, data=None, *, push="random", walk=None, name=None):
        super().__init__(walk=walk, name=name)
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        self.push = self.check_choice(push, "push", PUSHES)
        if self.push == "none" and self.resolved_walk().rule.needs_metric_product:
            raise ValueError(
                "`push='none'` gives the `Metric` rule a zero right-hand side (no step). "
                "Use push='random' or 'shrink', or a `Normalized` or `Penalty` rule. "
                f"Received: push={push!r}, rule={self.resolved_walk().rule!r}"
            )

    def resolved_walk(self, **defaults):
        return super().resolved_walk(rule="metric", record_every=10, **defaults)

    def validate(self, model):
        if self.data is not None:
            x, _ = normalize_data(self.data, name="data", model=model)
            check_inputs_match_model(model, x, name="data")

    def call(self, model):
        walk = self.resolved_walk()
        anchor = self.resolve_data(self.data, model)
        if self.push == "random":
            objective = _LinearPush(random_direction(model, walk.seed))
        elif self.push == "shrink":
            objective = _shrink
        else:
            objective = None
        beta = 1.0 if walk.beta == "auto" else walk.beta
        steps = walk.num_steps(num_examples(normalize_data(anchor, name="data")[0]))
        return self.fip_walk(model, walk, anchor, steps, beta=beta, secondary_objective=objective)

    def get_config(self):
        return {**super().get_config(), "data": self.data, "push": self.push}
