"""`Eigen`: the weight-space adversary along the top eigenvectors of the metric g."""

import keras
import numpy as np
import scipy.sparse.linalg
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib
from keras_fip.distribute import summed_over_batches
from keras_fip.geometry.metric import MetricOperator
from keras_fip.geometry.spectrum import top_eigenpairs
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.faults.fault import Fault

MIXINGS = ("ascent", "equal", "sqrt")
OUTPUTS = ("log_probabilities", "logits", "probabilities")
# `mixing="ascent"`: Riemannian gradient steps on the sphere of coefficients, the largest
# step (in radians), the smallest tried before stopping, and the most steps.
_ASCENT_STEP = 0.5
_ASCENT_MIN_STEP = 1e-3
_ASCENT_ITERATIONS = 30


def _predict(model, x, batch_size=1024):
    """Inference-mode outputs in eager batches (no tf.function traced per model)."""
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(data_adapter.take(x, slice(i, i + batch_size)), training=False)
            )
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )


class _LogSoftmaxOf(keras.Model):
    """`log_softmax(model(x))` for a logits model: a view sharing its weights."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapped = model

    def call(self, inputs, training=False):
        return keras.tree.map_structure(
            lambda logits: keras.ops.log_softmax(logits, axis=-1),
            self.wrapped(inputs, training=training),
        )


def _log_probability_model(model, kind):
    """A view of `model` sharing its weights that returns log-probabilities: `log p` of a
    probability model, `log_softmax` of a logits model's logits. A classifier and its twin
    with a softmax (the same weights) give the same view outputs."""
    if kind == "probabilities":
        return outputs_lib.logits_model(model, kind)
    view = _LogSoftmaxOf(model, name=f"{model.name}_log_probabilities")
    if not view.built:
        view.built = True
    return view


@keras.saving.register_keras_serializable(package="keras_fip")
class Eigen(Fault):
    """The weight-space adversary: a perturbation along the top eigenvectors of g.

    A perturbation δ of Euclidean norm `norm` in the span of the top `num_eigenpairs`
    eigenvectors v_i of the metric g on the damage's data
    (`keras_fip.geometry.top_eigenpairs`, restricted to the free weights of `layers`),
    `δ = norm · Σ c_i v_i` with Σ c_i² = 1. g is measured on the log-probabilities by
    default (`outputs`): a model ending in a softmax and its twin returning the logits
    (the same weights) get the same g, the same eigenvectors and the same δ.

    The coefficients maximise the damage to the predictions (`mixing="ascent"`): the mean
    cross-entropy on the data of its labels, or, on inputs only, of the undamaged
    network's own predictions, is raised over the unit sphere of coefficients, from the
    best of ±v_i, by Riemannian gradient steps each kept only if the loss rises (30 at
    most; one gradient on the data each). `mixing="equal"` (c_i = 1/√k) and `"sqrt"`
    (c_i ∝ √λ_i) fix the magnitudes instead, the signs then following the loss gradient
    (first-order ascent), and of ±δ the one that raises the loss more is applied. To
    second order the log-probabilities change by δᵀ g δ = norm² Σ c_i² λ_i: the record
    holds it (`"predicted_change"`) beside the measured mean squared change, the loss, the
    agreement with the undamaged predictions on the data, the eigenvalues, the
    coefficients and the metric products used (`"num_matvecs"`).

    Needs data: `keras_fip.Damage(Eigen(), data=x)`, or inputs the model carries.

    Args:
        norm: Euclidean norm ≥ 0 of the perturbation. Defaults to `1.0`.
        num_eigenpairs: k, the top eigenvectors of g mixed. Defaults to `20`.
        mixing: `"ascent"`, `"equal"` or `"sqrt"`. Defaults to `"ascent"`.
        examples: Inputs of the data over which g is averaged (the first ones). Defaults
            to `1000`.
        tol: Relative eigenvalue accuracy of the Lanczos solve. Defaults to `1e-3`.
        outputs: Outputs g is measured on: `"log_probabilities"` (log-softmax of a logits
            model's outputs, log p of a probability model's: the same for both),
            `"logits"` (a logits model's outputs, log p of a probability model's) or
            `"probabilities"`. Defaults to `"log_probabilities"`.
        layers: Names of the layers to perturb, or `None` for all. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> damage = keras_fip.Damage(Eigen(norm=1.0, num_eigenpairs=3), data=x[:200], seed=0)
        >>> attacked = damage(model)
        >>> len(damage.history["eigenvalues"]), round(damage.history["perturbation_norm"], 4)
        (3, 1.0)
    """

    name = "eigen"
    needs_data = True

    def __init__(
        self,
        norm=1.0,
        *,
        num_eigenpairs=20,
        mixing="ascent",
        examples=1000,
        tol=1e-3,
        outputs="log_probabilities",
        layers=None,
    ):
        super().__init__(layers=layers)
        self.norm = self.check_number(norm, "norm", low=0.0, low_inclusive=True)
        self.num_eigenpairs = self.check_number(
            num_eigenpairs, "num_eigenpairs", low=1, low_inclusive=True, integer=True
        )
        self.mixing = self.check_choice(mixing, "mixing", MIXINGS)
        self.examples = self.check_number(
            examples, "examples", low=1, low_inclusive=True, integer=True
        )
        self.tol = self.check_number(tol, "tol", low=0.0, low_inclusive=True)
        self.outputs = self.check_choice(outputs, "outputs", OUTPUTS)

    def check(self, model):
        self.variables_of(model)

    def apply(self, model, inputs, labels, rng, seed):
        variables = self.variables_of(model)
        free = self.free_indices(model, variables)
        examples = data_adapter.take(inputs, slice(0, self.examples))
        example_labels = None if labels is None else labels[: self.examples]
        kind = model_output_kind(model, examples)
        # What the metric, the loss and the harm read: the log-probabilities by default.
        view = _log_probability_model(model, kind)
        if self.outputs == "log_probabilities":
            metric = MetricOperator(view, examples, outputs="logits")
        else:
            metric = MetricOperator(model, examples, outputs=self.outputs)

        # Top eigenpairs of g on the data (restricted to the free selected coordinates)
        operator, unflatten = self._restricted(model, metric, variables, free)
        k = min(self.num_eigenpairs, max(1, operator.shape[0] - 1))
        pairs = top_eigenpairs(operator, k=k, tol=self.tol, seed=seed or 0)
        values = np.clip(pairs.values, 0.0, None)
        reference = _predict(view, examples)
        # The labels the loss reads: the data's, else the undamaged network's predictions.
        targets = (
            np.asarray(example_labels)
            if example_labels is not None
            else np.argmax(reference, axis=-1)
        )
        start = [v.numpy() for v in variables]

        def loss_at(coefficients):
            self.add(variables, unflatten(pairs.vectors @ (self.norm * coefficients)))
            loss = _harm(view, examples, targets)
            _restore(variables, start)
            return loss

        if self.mixing == "ascent":
            coefficients, steps = self._ascent(
                view, variables, free, examples, targets, unflatten, pairs.vectors, loss_at, start
            )
        else:
            if self.mixing == "equal":
                weights = np.full(k, 1.0 / np.sqrt(k))
            else:
                roots = np.sqrt(values)
                weights = (
                    roots / np.linalg.norm(roots) if np.any(roots) else np.full(k, 1.0 / np.sqrt(k))
                )
            # Signs: first-order ascent of the task loss (labels, else predictions)
            gradient = _loss_gradient(view, variables, examples, targets)
            gradient = np.concatenate([g.ravel()[f] for g, f in zip(gradient, free)])
            signs = np.where(pairs.vectors.T @ gradient >= 0, 1.0, -1.0)
            # Of ±δ, apply the one that raises the loss more
            scores = {s: loss_at(s * weights * signs) for s in (1.0, -1.0)}
            coefficients = max(scores, key=scores.get) * weights * signs
            steps = 0

        # Apply δ = norm · Σ c_i v_i (rescaled to the exact norm)
        direction = pairs.vectors @ coefficients
        scale = self.norm / max(np.linalg.norm(direction), 1e-300)
        self.add(variables, unflatten(direction * scale))
        after = _predict(view, examples)
        flat = np.reshape(after - reference, (data_adapter.num_examples(examples), -1))
        unit = coefficients / max(np.linalg.norm(coefficients), 1e-300)
        return {
            "num_hit": int(operator.shape[0]),
            "norm": self.norm,
            "eigenvalues": pairs.values.tolist(),
            "coefficients": np.abs(unit).tolist(),
            "signs": np.where(coefficients >= 0, 1, -1).astype(int).tolist(),
            "num_matvecs": int(pairs.num_matvecs),
            "ascent_steps": int(steps),
            "predicted_change": float(self.norm**2 * np.sum(unit**2 * values)),
            "measured_change": float(np.mean(np.sum(np.square(flat), axis=1))),
            "loss": float(_harm(view, examples, targets)),
            "agreement": float(np.mean(np.argmax(after, axis=-1) == np.argmax(reference, axis=-1))),
        }, {}

    def _ascent(self, view, variables, free, examples, targets, unflatten, vectors, loss_at, start):
        """Coefficients on the unit sphere of the top eigenvectors' span that raise the
        loss: the best of ±v_i, then Riemannian gradient steps (each kept only if the loss
        rises). Returns `(coefficients, steps taken)`."""
        k = vectors.shape[1]
        candidates = []
        for index in range(k):
            for sign in (1.0, -1.0):
                coefficients = np.zeros(k)
                coefficients[index] = sign
                candidates.append((loss_at(coefficients), index, sign, coefficients))
        loss, _, _, coefficients = max(candidates, key=lambda c: (c[0], -c[1], c[2]))
        step, taken = _ASCENT_STEP, 0
        for _ in range(_ASCENT_ITERATIONS if k > 1 else 0):
            self.add(variables, unflatten(vectors @ (self.norm * coefficients)))
            gradient = _loss_gradient(view, variables, examples, targets)
            _restore(variables, start)
            gradient = vectors.T @ np.concatenate([g.ravel()[f] for g, f in zip(gradient, free)])
            tangent = gradient - (gradient @ coefficients) * coefficients
            length = np.linalg.norm(tangent)
            if length <= 1e-12 * max(np.linalg.norm(gradient), 1e-300):
                break
            while step > _ASCENT_MIN_STEP:
                candidate = coefficients + step * tangent / length
                candidate /= np.linalg.norm(candidate)
                value = loss_at(candidate)
                if value > loss:
                    coefficients, loss, taken = candidate, value, taken + 1
                    step = min(2.0 * step, _ASCENT_STEP)
                    break
                step /= 2.0
            else:
                break
        return coefficients, taken

    @staticmethod
    def _restricted(model, metric, variables, free):
        """g on the free coordinates of `variables`: (LinearOperator, unflatten to them)."""
        everything = model.trainable_variables
        free = dict(zip((id(v) for v in variables), free))
        sizes = [int(np.prod(v.shape, dtype=np.int64)) for v in everything]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        index = np.concatenate(
            [free[id(v)] + offset for v, offset in zip(everything, offsets) if id(v) in free]
        )
        full = metric.as_linear_operator()
        if index.size == metric.num_params:
            operator = full
        else:

            def apply(vector):
                padded = np.zeros(metric.num_params)
                padded[index] = np.ravel(vector)
                return full.matvec(padded)[index]

            operator = scipy.sparse.linalg.LinearOperator(
                (index.size, index.size), matvec=apply, rmatvec=apply, dtype=np.float64
            )

        def unflatten(vector):
            padded = np.zeros(metric.num_params)
            padded[index] = vector
            pieces = np.split(padded, np.cumsum(sizes)[:-1])
            return [piece.reshape(v.shape) for v, piece in zip(everything, pieces) if id(v) in free]

        return operator, unflatten

    def get_config(self):
        return {
            "norm": self.norm,
            "num_eigenpairs": self.num_eigenpairs,
            "mixing": self.mixing,
            "examples": self.examples,
            "tol": self.tol,
            "outputs": self.outputs,
            **super().get_config(),
        }


def _loss_gradient(model, variables, x, y):
    """Gradient of the mean cross-entropy of `model`'s logits on `(x, y)`: one array per
    variable."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    def summed_gradient(batch):
        inputs, labels = batch
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(inputs, training=False))
        return tape.gradient(
            loss,
            [v.value for v in variables],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    # Summed per replica under a strategy (distributed variables are read there).
    total = summed_over_batches(summed_gradient, (x, y), 1024)
    return [piece / data_adapter.num_examples(x) for piece in total]


def _harm(model, x, y):
    """Mean cross-entropy of `model`'s logits on `(x, y)`."""
    loss = keras.losses.sparse_categorical_crossentropy(y, _predict(model, x), from_logits=True)
    return float(np.mean(keras.ops.convert_to_numpy(loss)))


def _restore(variables, values):
    for variable, value in zip(variables, values):
        variable.assign(value)
