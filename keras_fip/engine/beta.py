"""β = "auto": one rule for every operation, the secondary objective put in D's units.

The FIP step trades the output distance D against β·L. D and L are in different units: D
in output units (nats for the KL divergence), L in the units of its objective — squared
weights for a pull towards a weight target (Compress's projection, Bridge's target), nats for
a cross-entropy (ContinualLearn's new task, the labels' term of Compress, Repair and
Ensemble). `"auto"` sets

    β = strength × κ,

κ the curvature of D per unit of L, so that `strength` is a dimensionless weight that means
the same for every model:

- L on the weights (`objective="weights"`): κ is the mean diagonal of D's Hessian at the
  reference over the weights L pulls (a unit move of one weight costs κ in D). D's Hessian is
  the Fisher information for `"kl"`, a quarter of it for `"bhattacharyya"`, and `2·JᵀJ` for
  `"l2"`.
- L on the outputs (`objective="outputs"`, a cross-entropy, whose curvature is the Fisher
  information): κ converts KL units into D's, 1 for `"kl"`, ¼ for `"bhattacharyya"`, and the
  ratio of the mean diagonals of `2·JᵀJ` and of the Fisher information for `"l2"`.

Each operation documents its `strength`; the diagonals are estimated on `AUTO_BETA_EXAMPLES`
inputs of the operation's anchor data (`keras_fip.geometry.metric_diagonal`).
"""

import numpy as np

from keras_fip.core import data_adapter
from keras_fip.geometry.diagonal import metric_diagonal

AUTO_BETA_EXAMPLES = 2048
OBJECTIVES = ("weights", "outputs")
# D's Hessian at the reference, per unit of the metric diagonal `metric_diagonal` gives.
_HESSIAN = {"kl": ("fisher", 1.0), "bhattacharyya": ("fisher", 0.25), "l2": ("jacobian", 2.0)}


def _mean_diagonal(model, inputs, variables, kind, seed):
    diagonal = metric_diagonal(model, inputs, variables, kind=kind, seed=seed)
    return float(np.mean(np.concatenate([np.ravel(np.asarray(d)) for d in diagonal])))


def auto_beta(
    strength, model, anchor, distance="kl", objective="weights", variables=None, seed=None
):
    """β for `beta="auto"`: `strength` × the curvature of D per unit of the objective.

    Args:
        strength: The operation's dimensionless weight of its objective.
        model: The model the walk starts from.
        anchor: Anchor inputs (an array, or a dict or list of arrays).
        distance: The walk's distance: `"kl"`, `"bhattacharyya"` or `"l2"` (a callable
            distance is taken as `"kl"`). Defaults to `"kl"`.
        objective: `"weights"` (L pulls weights) or `"outputs"` (L is a cross-entropy).
            Defaults to `"weights"`.
        variables: For `"weights"`, the variables L pulls. Defaults to `None` (every
            trainable variable).
        seed: Seed of the examples drawn and of the diagonal's probes. Defaults to `None`.

    Returns:
        A positive float (`strength` itself when D does not depend on the weights).

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
        >>> auto_beta(1.0, model, x, distance="kl", objective="outputs")
        1.0
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"`objective` must be one of {list(OBJECTIVES)}. Received: objective={objective!r}"
        )
    name = distance if isinstance(distance, str) and distance in _HESSIAN else "kl"
    name = "l2" if name == "squared_l2" else name
    kind, factor = _HESSIAN[name]
    if objective == "outputs" and name != "l2":
        return float(strength) * factor
    rng = np.random.default_rng(seed)
    count = data_adapter.num_examples(anchor)
    rows = np.sort(rng.choice(count, min(AUTO_BETA_EXAMPLES, count), replace=False))
    inputs = data_adapter.take(anchor, rows)
    probe_seed = int(rng.integers(2**31))
    curvature = factor * _mean_diagonal(model, inputs, variables, kind, probe_seed)
    if objective == "outputs":
        fisher = _mean_diagonal(model, inputs, variables, "fisher", probe_seed)
        curvature = curvature / fisher if fisher > 0 else float("nan")
    if not np.isfinite(curvature) or curvature <= 0.0:
        return float(strength)  # Outputs that do not depend on the weights.
    return float(strength) * curvature
