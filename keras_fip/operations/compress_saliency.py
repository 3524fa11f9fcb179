"""`Saliency`: how `keras_fip.Compress` ranks weights for its projection P_p."""

import keras
import numpy as np

from keras_fip.core import config
from keras_fip.core import data_adapter
from keras_fip.core import projection
from keras_fip.core.config import Config
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.operations.base import Operation

CRITERIA = ("magnitude", "metric")


@keras.saving.register_keras_serializable(package="keras_fip")
class Saliency(Config):
    """How the projection P_p ranks weights: which are kept, over which scope.

    P_p(w) keeps the most salient weights (or units, filters, 2-of-4 groups) and zeroes a
    fraction p of them. `"magnitude"` ranks by |w| (P_p is the Euclidean projection onto
    the p-sparse set). `"metric"` ranks by `√g_ii·|w_i|`, with `g_ii` the diagonal of the
    output metric (the Fisher information for the `"kl"` and `"bhattacharyya"` distances,
    JᵀJ for `"l2"`) estimated on `examples` inputs at every target update: the kept set is
    the one whose removal changes the outputs least to second order (Optimal Brain
    Damage's saliency).

    With `scope="global"` one ranking covers every prunable weight, above each layer's
    collapse floor: no variable is pruned below `layer_floor` times the density the
    Erdős–Rényi-kernel rule gives it (`keras_fip.core.projection.erk_densities`), which
    keeps a small stem or output layer alive; `"auto"` is 1 (the ERK allocation) for
    models with BatchNormalization, whose kernels' scales carry no function, and 0.5
    otherwise. With `scope="per_layer"` each variable loses the fraction p (tfmot's
    behaviour).

    Args:
        criterion: `"magnitude"` or `"metric"`. Defaults to `"magnitude"`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.
        layer_floor: With `scope="global"`, the fraction in [0, 1] of its ERK density below
            which no variable is pruned (0: the plain global ranking), or `"auto"`.
            Defaults to `"auto"`.
        examples: Inputs per estimate of the metric diagonal (`"metric"` only). Defaults
            to `1024`.

    Examples:

        >>> Saliency("metric", examples=256)
        Saliency(criterion='metric', scope='global', layer_floor='auto', examples=256)
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> masks = Saliency(scope="per_layer").masks(model, 0.5, model.trainable_variables[:1])
        >>> [int(mask.sum()) for mask in masks.values()]  # 6 of the kernel's 12 weights kept
        [6]
    """

    def __init__(self, criterion="magnitude", *, scope="global", layer_floor="auto", examples=1024):
        self.criterion = Operation.check_choice(criterion, "criterion", CRITERIA)
        self.scope = Operation.check_choice(scope, "scope", projection.SCOPES)
        self.layer_floor = projection.check_layer_floor(layer_floor)
        self.examples = Operation.check_number(
            examples, "examples", low=1, low_inclusive=True, integer=True
        )

    def importance(self, model, variables, inputs, distance="kl", rng=None):
        """The diagonal metric the ranking is taken in, or `None` for `"magnitude"`.

        Args:
            model: The model being pruned.
            variables: Its prunable variables.
            inputs: Inputs to estimate the metric on (up to `examples` of them, drawn with
                `rng`).
            distance: The walk's output distance (its name). Defaults to `"kl"`.
            rng: A `numpy.random.Generator`. Defaults to `None`.

        Returns:
            A list of arrays, one per variable, or `None`.
        """
        if self.criterion == "magnitude":
            return None
        rng = rng if rng is not None else np.random.default_rng()
        count = data_adapter.num_examples(inputs)
        rows = np.sort(rng.choice(count, min(self.examples, count), replace=False))
        kind = "jacobian" if distance in ("l2", "squared_l2") else "fisher"
        return metric_diagonal(
            model,
            data_adapter.take(inputs, rows),
            variables,
            kind=kind,
            seed=int(rng.integers(2**31)),
        )

    def masks(
        self, model, sparsity, variables, structure="unstructured", existing=None, importance=None
    ):
        """The masks of P_p: `sparsity` of `variables` zeroed (see
        `keras_fip.core.projection.magnitude_masks`).

        Args:
            model: The model being pruned.
            sparsity: p, in [0, 1).
            variables: The variables to prune.
            structure: `"unstructured"`, `"nodes"`, `"filters"` or `"2:4"`. Defaults to
                `"unstructured"`.
            existing: Masks to keep (as from `keras_fip.masks`). Defaults to `None`.
            importance: The diagonal metric from `importance`, or `None`. Defaults to
                `None`.

        Returns:
            A dict mapping `variable.path` to a boolean array (`False` = pruned).
        """
        return projection.magnitude_masks(
            model,
            sparsity,
            structure,
            self.scope,
            variables,
            existing,
            importance=importance,
            layer_floor=self.layer_floor,
        )

    def get_config(self):
        return {
            "criterion": self.criterion,
            "scope": self.scope,
            "layer_floor": self.layer_floor,
            "examples": self.examples,
        }


def get(saliency):
    """A `Saliency` from a `Saliency`, a criterion name (`"magnitude"`, `"metric"`), its
    config or `None` (magnitude)."""
    if isinstance(saliency, str) and saliency in CRITERIA:
        return Saliency(saliency)
    if isinstance(saliency, str):
        raise ValueError(
            f"`saliency` must be a `Saliency` or one of {list(CRITERIA)}. "
            f"Received: saliency={saliency!r}"
        )
    return config.resolve(saliency, Saliency, "saliency")
