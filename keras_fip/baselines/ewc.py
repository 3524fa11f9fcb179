"""Elastic weight consolidation: a diagonal-Fisher penalty holding the weights old tasks need."""

import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_fip.baselines.continual_base import DEFAULT_LEARNING_RATE
from keras_fip.baselines.continual_base import LEARNING_RATE_GRID
from keras_fip.baselines.continual_base import MAX_GRID_EXTENSIONS
from keras_fip.baselines.continual_base import ContinualBaseline
from keras_fip.baselines.continual_base import check_labelled
from keras_fip.baselines.continual_base import cross_entropy
from keras_fip.baselines.continual_base import train
from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib
from keras_fip.core import tuning
from keras_fip.core.data_adapter import normalize_data
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.operations import heads
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import carry_data
from keras_fip.operations.base import model_output_kind

# EWC's consolidated Fisher diagonals and anchors, carried by the models it returns.
_EWC_STATE = weakref.WeakKeyDictionary()
LAMBDA_GRID = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7)
# `"auto"` never lets the grid's edge cut the choice off: while the largest λ tried is the
# best alone, one more step of the grid's spacing at that edge is tried (10× on
# `LAMBDA_GRID`), and likewise below the smallest positive one, at most
# `max_lambda_extensions` times each way (`keras_fip.core.tuning.grid_search`).


def ewc_state(model):
    """The `[(fisher, anchor)]` penalties a model carries from an earlier `EWC`, or `[]`."""
    return list(_EWC_STATE.get(model, []))


def _fit_shapes(arrays, variables):
    """Pads (with zeros) or checks arrays to the variables' shapes (a grown head)."""
    fitted = []
    for array, variable in zip(arrays, variables):
        shape = tuple(variable.shape)
        if array.shape != shape:
            padded = np.zeros(shape, array.dtype)
            padded[tuple(slice(0, s) for s in array.shape)] = array
            array = padded
        fitted.append(array)
    return fitted


@keras.saving.register_keras_serializable(package="keras_fip")
class EWC(ContinualBaseline):
    """Elastic weight consolidation (Kirkpatrick et al. 2017), online for many tasks.

    The new task's cross-entropy plus (λ/2)·Σ_i F_i (w_i − w*_i)², F the diagonal of the
    Fisher information of the model's predictive distribution on the previous task's
    inputs (`fisher_data`), computed at w* (the model as called) in inference mode with one
    sampled label per example (`keras_fip.geometry.metric_diagonal(kind="fisher")`, one
    example per backward pass: the exact per-example estimator). With `online=True`
    (Schwarz et al. 2018, "online EWC") the penalty the model carries from an earlier
    `EWC` call is merged as F ← γ·F_old + F_new around the newest w*, so many tasks cost
    one penalty; with `online=False` every task keeps its own (F, w*). The returned model
    carries the penalties (`ewc_state`). New output units have F = 0.

    λ: a number, or `"auto"`: every value of `lambda_grid` is trained (the full budget
    each) on the new task minus a held-out `validation_fraction`, the value with the
    best mean accuracy over the held-out new-task split and `validation_tasks` is chosen
    (ties go to the smaller λ), and the returned model is trained on the whole task with
    it; `op.history["lambda"]` is the choice, `op.history["lambda_scores"]` all. An edge
    of the grid that is the best alone is not taken as the answer: one more step of the
    grid's spacing past it is tried (10× the largest or ÷10 the smallest positive λ on
    `LAMBDA_GRID`), up to `max_lambda_extensions` times each way, as learning rates are
    tuned. With `learning_rate="auto"` the rate is chosen on the same held-out data, at
    the given λ, or, when λ is chosen too, after it: λ at Adam's default rate (1e-3),
    then the rate at that λ.

    Args:
        new_task: The new task, `(x, y)` (labels 0..k-1 for `"append"`).
        fisher_data: Inputs of the task the model has just learned (or `(x, y)`, labels
            unused). Defaults to `None` (no new penalty: only the carried ones).
        ewc_lambda: λ, or `"auto"`. Defaults to `"auto"`.
        lambda_grid: Candidates for `"auto"`. Defaults to `LAMBDA_GRID` (1 … 1e7).
        max_lambda_extensions: How many times `"auto"` may extend the grid past each
            edge (0: the grid as given). Defaults to `3`.
        validation_tasks: Held-out old-task data `(x, y)` (labels in output indices) for
            `"auto"`. Defaults to `None` (only the new task's held-out split).
        validation_fraction: New-task fraction held out for `"auto"`. Defaults to `0.1`.
        online: Merge penalties (online EWC). Defaults to `True`.
        gamma: γ, the decay of the old Fisher in online EWC. Defaults to `1.0`.
        fisher_examples: At most this many `fisher_data` inputs. Defaults to `1000`.
        head: `"append"` or `"shared"`. Defaults to `"append"`.
        learning_rate: Initial Adam learning rate, cosine-decayed, or `"auto"` (see
            above and `ContinualBaseline`). Defaults to `"auto"`.
        walk: A `keras_fip.Walk` with the budget (`epochs` over the new task, or `steps`),
            `batch_size`, `seed` and `verbose` (`ContinualBaseline`). Defaults to `None`
            (5 epochs of 32 new-task examples a step).
        **kwargs: Other `ContinualBaseline` arguments (`eval_tasks`, `eval_every`,
            `name`).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1), num_classes=5)
        >>> old, new = y < 5, y >= 5
        >>> EWC((x[new], y[new] - 5), fisher_data=x[old], ewc_lambda=100.0,
        ...     walk=keras_fip.Walk(epochs=1, verbose=0))(model).output_shape
        (None, 10)
    """

    def __init__(
        self,
        new_task,
        fisher_data=None,
        *,
        ewc_lambda="auto",
        lambda_grid=LAMBDA_GRID,
        validation_tasks=None,
        validation_fraction=0.1,
        online=True,
        gamma=1.0,
        fisher_examples=1000,
        max_lambda_extensions=3,
        **kwargs,
    ):
        super().__init__(new_task, **kwargs)
        if fisher_data is not None:
            fisher_x, _ = normalize_data(fisher_data, name="fisher_data")
            if not data_adapter.all_finite(fisher_x):
                raise ValueError("`fisher_data` must be finite. Received: NaN or Inf inputs")
            self._fisher_x = data_adapter.float32_inputs(fisher_x)
        self.fisher_data = fisher_data
        if not (isinstance(ewc_lambda, str) and ewc_lambda == "auto"):
            ewc_lambda = self.check_number(ewc_lambda, "ewc_lambda", low=0.0, low_inclusive=True)
        self.ewc_lambda = ewc_lambda
        if not isinstance(lambda_grid, (list, tuple)) or not lambda_grid:
            raise ValueError(
                f"`lambda_grid` must be a non-empty list of numbers. "
                f"Received: lambda_grid={lambda_grid!r}"
            )
        self.lambda_grid = tuple(
            self.check_number(v, "lambda_grid", low=0.0, low_inclusive=True) for v in lambda_grid
        )
        self._validation = [
            check_labelled(task, f"validation_tasks[{i}]")
            for i, task in enumerate(validation_tasks or [])
        ]
        self.validation_tasks = validation_tasks
        if self.ewc_lambda == "auto" and not self._validation:
            warnings.warn(
                "EWC(ewc_lambda='auto') without `validation_tasks` chooses λ on the new task "
                "alone, which favours the smallest λ and forgets the old tasks; pass held-out "
                "old-task data as `validation_tasks`, or a number as `ewc_lambda`.",
                stacklevel=2,
            )
        self.validation_fraction = self.check_number(
            validation_fraction, "validation_fraction", low=0.0, high=1.0, high_inclusive=False
        )
        self.online = bool(online)
        self.gamma = self.check_number(gamma, "gamma", low=0.0, low_inclusive=True)
        self.fisher_examples = self.check_number(
            fisher_examples, "fisher_examples", low=1, low_inclusive=True, integer=True
        )
        self.max_lambda_extensions = self.check_number(
            max_lambda_extensions, "max_lambda_extensions", low=0, low_inclusive=True, integer=True
        )

    def __call__(self, model):
        self._incoming = ewc_state(model)
        return super().__call__(model)

    def read_datasets(self, model):
        super().read_datasets(model)
        self._validation = self.read_dataset_arguments(
            model, self.validation_tasks, self._validation, "validation_tasks"
        )
        if isinstance(self.fisher_data, tf.data.Dataset):
            fisher_x, _ = normalize_data(self.fisher_data, name="fisher_data", model=model)
            self._fisher_x = data_adapter.float32_inputs(fisher_x)

    def check(self, model):
        if self.fisher_data is not None:
            self.check_inputs(model, self._fisher_x, "fisher_data")
        if not self._incoming and self.fisher_data is None:
            raise ValueError(
                "`fisher_data` is required: model carries no EWC penalty from an earlier "
                "`EWC` call, so there is nothing to consolidate. Received: fisher_data=None"
            )

    def prepare(self, old_model, model, x, labels):
        penalties = list(self._incoming)
        if self.fisher_data is not None:
            rng = np.random.default_rng(self.seed)
            available = data_adapter.num_examples(self._fisher_x)
            count = min(self.fisher_examples, available)
            rows = np.sort(rng.choice(available, count, replace=False))
            fisher = metric_diagonal(
                old_model,
                data_adapter.take(self._fisher_x, rows),
                kind="fisher",
                batch_size=1,
                seed=self.seed,
            )
            anchor = [v.numpy() for v in old_model.trainable_variables]
            if self.online and penalties:
                ((old_fisher, _),) = penalties
                old_fisher = _fit_shapes(old_fisher, old_model.trainable_variables)
                fisher = [self.gamma * f_old + f for f_old, f in zip(old_fisher, fisher)]
                penalties = []
            penalties.append((fisher, anchor))
        variables = model.trainable_variables
        self._penalties = [
            (_fit_shapes(f, variables), _fit_shapes(a, variables)) for f, a in penalties
        ]
        self._lambda = keras.Variable(0.0, trainable=False, name="ewc_lambda")

    def loss(self, model, batch):
        x, y = batch["task"]
        total = cross_entropy(y, model(x, training=True))
        penalty = 0.0
        for fisher, anchor in self._penalty_tensors:
            for variable, f, a in zip(model.trainable_variables, fisher, anchor):
                penalty += tf.reduce_sum(f * tf.square(variable.value - a))
        return total + 0.5 * self._lambda.value * penalty

    def apply_settings(self, settings):
        self._lambda.assign(settings["lambda"])

    def old_validation(self):
        return self._validation

    def call(self, model):
        # Validate everything before any work
        x, y = self.check_task(model)
        self.check(model)
        old_model = model
        model, labels = heads.prepare_head(model, x, y, self.head, seed=self.seed)
        # The Fisher and the loss read logits (a softmax model through its log-probabilities)
        old_view = outputs_lib.logits_model(old_model, model_output_kind(old_model, x))
        kind = model_output_kind(model, x)
        view = outputs_lib.logits_model(model, kind)
        self.prepare(old_view, view, x, labels)
        self._penalty_tensors = [
            ([tf.constant(f) for f in fisher], [tf.constant(a) for a in anchor])
            for fisher, anchor in self._penalties
        ]

        # λ (at Adam's default rate when the rate is chosen too), then the learning rate
        # at that λ, each the best of its grid on held-out data
        rate, chosen = self.learning_rate, self.ewc_lambda
        history = {}
        if rate == "auto" or chosen == "auto":
            score, _ = self.candidates(model, kind, x, labels)
            scored = {}

            def score_once(learning_rate, value):
                key = (learning_rate, value)
                if key not in scored:
                    scored[key] = score({"learning_rate": learning_rate, "lambda": value})
                return scored[key]

            if chosen == "auto":
                first_rate = DEFAULT_LEARNING_RATE if rate == "auto" else rate
                chosen, history["lambda_scores"] = tuning.grid_search(
                    lambda value: score_once(first_rate, value),
                    self.lambda_grid,
                    max_extensions=self.max_lambda_extensions,
                )
            if rate == "auto":
                rate, history["learning_rate_scores"] = tuning.grid_search(
                    lambda learning_rate: score_once(learning_rate, chosen),
                    LEARNING_RATE_GRID,
                    max_extensions=MAX_GRID_EXTENSIONS,
                )

        # Training on the whole task
        self.apply_settings({"lambda": chosen})
        steps = self.num_steps(x)
        self.history = train(view, self, x, labels, steps, learning_rate=rate)
        self.history.update(history, steps=steps, learning_rate=rate, **{"lambda": chosen})
        carried = carried_data(old_model)
        if carried is not None:
            carry_data(model, carried)
        _EWC_STATE[model] = self._penalties
        return model

    def get_config(self):
        config = super().get_config()
        config.update(
            fisher_data=None,
            ewc_lambda=self.ewc_lambda,
            lambda_grid=self.lambda_grid,
            validation_tasks=None,
            validation_fraction=self.validation_fraction,
            online=self.online,
            gamma=self.gamma,
            fisher_examples=self.fisher_examples,
            max_lambda_extensions=self.max_lambda_extensions,
        )
        return config
