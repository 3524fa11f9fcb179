"""Step rules: how one FIP step turns the objective's gradient into a move of the weights.

At weights `w` the FIP step is the direction θ with `‖θ‖ = ε` that minimises
`θᵀ g θ + β θᵀ ∇L`, with `g` the metric tensor on the anchor batch and `L` the secondary
objective. A step rule is a small serialisable object, as a Keras optimizer is; the trainer
hands it the gradient and applies what it returns with its optimizer:

- `Penalty`: minimise `D(f(X; w), f(X; w_ref)) + β·L(w)` with Adam (a cosine-decayed rate);
  the distance D is the second-order model of g, so small steps follow the FIP.
- `Normalized`: the gradient of `D + β·L`, rescaled to Euclidean length ε.
- `Metric`: `(g + δI) θ = −β ∇L` solved by conjugate gradient with the matrix-free product
  `g·v`, then rescaled to length ε: the paper's equation, solved directly.

The arithmetic lives in `keras_fip.engine.step_rules` (pure functions on lists of tensors,
graph-safe, all-reduced under a `tf.distribute` strategy); these classes choose among it.
"""

import math

import keras
import numpy as np

from keras_fip.core.config import Config
from keras_fip.engine import step_rules

# The `"auto"` learning rate of `Penalty`: this share of the root mean square of the weights
# being moved (their non-zero entries). Adam moves each weight by about its learning rate
# per step, so the rule sets the step relative to the weights' own scale, whatever the
# network's width or initialisation.
AUTO_LEARNING_RATE_SCALE = 0.044
# The rate `"auto"` falls back on when every weight being moved is zero.
FALLBACK_LEARNING_RATE = 3e-3


def _check_positive(value, name, allow_zero=False):
    valid = (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not valid:
        expected = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {expected} finite number. Received: {name}={value!r}")
    return float(value)


def auto_learning_rate(variables):
    """The `"auto"` learning rate for moving `variables`.

    `AUTO_LEARNING_RATE_SCALE` × the root mean square of their non-zero entries: Adam moves
    each weight by about its rate per step, so the walk takes steps of one scale relative to
    the weights, whatever their width or initialisation (zeros, such as pruned weights, do
    not count).

    Args:
        variables: The variables the walk moves.

    Returns:
        A float.

    Examples:

        >>> round(auto_learning_rate([keras.Variable(np.full((4, 4), 0.5))]), 4)
        0.022
    """
    squares, count = 0.0, 0
    for variable in variables:
        weights = np.asarray(keras.ops.convert_to_numpy(variable), dtype="float64")
        live = weights[weights != 0.0]
        squares += float(np.sum(np.square(live)))
        count += live.size
    if not count:
        return FALLBACK_LEARNING_RATE
    return AUTO_LEARNING_RATE_SCALE * math.sqrt(squares / count)


class StepRule(Config):
    """The base class of step rules.

    Subclasses set `name`, say whether the objective they differentiate holds the distance D
    (`objective_includes_distance`), give the optimizer that applies their update
    (`optimizer`) and turn the all-reduced gradient into that update (`update`).
    """

    name = None
    objective_includes_distance = True
    needs_metric_product = False

    def optimizer(self, steps, variables):
        """The optimizer that applies this rule's updates over a walk of `steps` steps."""
        del steps, variables
        return keras.optimizers.SGD(1.0)

    def update(self, gradients, beta, masks=None, metric_product=None):
        """The update handed to the optimizer, from the all-reduced gradient."""
        raise NotImplementedError

    def get_config(self):
        return {}

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))


@keras.saving.register_keras_serializable(package="keras_fip")
class Penalty(StepRule):
    """Minimise `D + β·L` with Adam: the distance D keeps the outputs, L pulls the weights.

    D's second-order expansion at the reference is `dwᵀ g dw` (squared L2 on logits) or
    the Fisher metric (KL), so small steps of a descent on `D + β·L` follow the FIP. It is
    the cheapest rule (one forward and one backward pass a step) and the default of every
    operation.

    Args:
        learning_rate: The initial Adam learning rate, decayed to zero with a cosine over
            the walk, or `"auto"`: `AUTO_LEARNING_RATE_SCALE` × the root mean square of
            the non-zero weights being moved (`auto_learning_rate`). Defaults to `"auto"`.

    Examples:

        >>> rule = Penalty(learning_rate=1e-3)
        >>> Penalty.from_config(rule.get_config()) == rule
        True
    """

    name = "penalty"

    def __init__(self, learning_rate="auto"):
        if learning_rate != "auto":
            learning_rate = _check_positive(learning_rate, "learning_rate")
        self.learning_rate = learning_rate

    def resolve_learning_rate(self, variables):
        """The initial learning rate for moving `variables` (`"auto"` resolved)."""
        if self.learning_rate == "auto":
            return auto_learning_rate(variables)
        return self.learning_rate

    def optimizer(self, steps, variables):
        rate = self.resolve_learning_rate(variables)
        return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(rate, max(steps, 1)))

    def update(self, gradients, beta, masks=None, metric_product=None):
        return gradients

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="keras_fip")
class Normalized(StepRule):
    """The gradient of `D + β·L`, rescaled to Euclidean length ε.

    Every step moves the weights by exactly ε (masked weights excluded), as the paper's
    path-sampling steps do, at the cost of one forward and one backward pass.

    Args:
        epsilon: ε, the length of every step. Defaults to `0.01`.

    Examples:

        >>> Normalized(epsilon=0.05).get_config()
        {'epsilon': 0.05}
    """

    name = "normalized"

    def __init__(self, epsilon=0.01):
        self.epsilon = _check_positive(epsilon, "epsilon")

    def update(self, gradients, beta, masks=None, metric_product=None):
        step, _ = step_rules.normalized_step(gradients, self.epsilon, masks=masks)
        return [-piece for piece in step]

    def get_config(self):
        return {"epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_fip")
class Metric(StepRule):
    """Solve `(g + δI) θ = −β ∇L` by conjugate gradient and step by θ rescaled to length ε.

    The paper's step, solved directly: g·v products on the anchor batch share its forward
    pass (`keras_fip.geometry.linearize`), so a step costs one forward pass and
    `cg_iterations` tangent and reverse passes. The distance D is only measured.

    Args:
        epsilon: ε, the length of every step. Defaults to `0.01`.
        damping: δ, added to g so the system is positive definite. Defaults to `1e-3`.
        cg_iterations: Conjugate-gradient iterations a step. Defaults to `10`.

    Examples:

        >>> Metric(cg_iterations=5).get_config()["cg_iterations"]
        5
    """

    name = "metric"
    objective_includes_distance = False
    needs_metric_product = True

    def __init__(self, epsilon=0.01, damping=1e-3, cg_iterations=10):
        self.epsilon = _check_positive(epsilon, "epsilon")
        self.damping = _check_positive(damping, "damping", allow_zero=True)
        if (
            not isinstance(cg_iterations, (int, np.integer))
            or isinstance(cg_iterations, bool)
            or cg_iterations < 1
        ):
            raise ValueError(
                "`cg_iterations` must be a positive integer. "
                f"Received: cg_iterations={cg_iterations!r}"
            )
        self.cg_iterations = int(cg_iterations)

    def update(self, gradients, beta, masks=None, metric_product=None):
        step, _ = step_rules.metric_step(
            metric_product,
            gradients,
            beta=beta,
            epsilon=self.epsilon,
            damping=self.damping,
            iterations=self.cg_iterations,
            masks=masks,
        )
        return [-piece for piece in step]

    def get_config(self):
        return {
            "epsilon": self.epsilon,
            "damping": self.damping,
            "cg_iterations": self.cg_iterations,
        }


RULES = {"penalty": Penalty, "normalized": Normalized, "metric": Metric}


def get(identifier):
    """A step rule from a rule object, its name or its config.

    Args:
        identifier: A `StepRule`, one of `"penalty"`, `"normalized"`, `"metric"` (the rule
            with its defaults), or a serialised rule (`keras.saving.serialize_keras_object`).

    Returns:
        A `StepRule`.

    Examples:

        >>> get("metric")
        Metric(epsilon=0.01, damping=0.001, cg_iterations=10)
    """
    if isinstance(identifier, StepRule):
        return identifier
    if isinstance(identifier, str) and identifier in RULES:
        return RULES[identifier]()
    if isinstance(identifier, dict):
        rule = keras.saving.deserialize_keras_object(identifier)
        if isinstance(rule, StepRule):
            return rule
    raise ValueError(
        f"`rule` must be a `keras_fip.rules.StepRule` (Penalty, Normalized, Metric) or one of "
        f"{list(RULES)}. Received: rule={identifier!r}"
    )


def serialize(rule):
    """The config of a step rule, as `keras.saving.serialize_keras_object` writes it."""
    return keras.saving.serialize_keras_object(rule)
