"""`Ensemble`: networks sampled along one functionally invariant path, served as one model."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_fip.engine import data_adapter
from keras_fip.engine import distances as distances_lib
from keras_fip.engine import normalization
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine import step_rules
from keras_fip.engine.copy import copy_model
from keras_fip.engine.data_adapter import check_inputs_match_model
from keras_fip.engine.data_adapter import fip_dataset
from keras_fip.engine.data_adapter import model_example_shape
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.engine.data_adapter import repeated_batches
from keras_fip.engine.path import Path
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.operations.base import Operation
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.compress import holdout_rows
from keras_fip.operations.isofunctional import random_direction

COMBINES = ("mean_probabilities", "mean_logits", "log_mean_probabilities")
# The combinations an ensemble model is built with (standard layers only).
SAVED_COMBINES = ("mean_probabilities", "mean_logits")
PUSHES = ("random", "random_per_member", "none")
DIVERSITY_LOSSES = ("error", "agreement")
ADVERSARIES = ("ensemble", "members")
# `perturbation_epsilon="auto"`: ρ is this fraction of the range of the inputs of `data`.
PERTURBATION_FRACTION = 0.3
# `task_weight="auto"`: each candidate walks one member's segment on `data` less a
# stratified, seeded held-out split (SELECTION_FRACTION of it, at most
# SELECTION_MAX_EXAMPLES examples); the lowest cross-entropy on that split chooses. With
# fewer than SELECTION_MIN_EXAMPLES held out, FALLBACK_TASK_WEIGHT.
TASK_WEIGHTS = (1.0, 10.0, 100.0)
SELECTION_FRACTION = 0.2
SELECTION_MAX_EXAMPLES = 2000
SELECTION_MIN_EXAMPLES = 100
FALLBACK_TASK_WEIGHT = 1.0


@keras.saving.register_keras_serializable(package="keras_fip")
class EnsembleCombination(keras.layers.Layer):
    """Combines the outputs of ensemble members in one layer (for attacks and analyses).

    The ensembles keras_fip builds use standard layers (`build_ensemble`); this layer
    gives the numerically stable log p̄ that attacks and losses need. The members return
    logits z_k (p_k = softmax(z_k), log p_k = log_softmax(z_k)) or probabilities p_k
    (log p_k = log p_k, floored at the smallest normal number), as `outputs` says.

    `"mean_probabilities"`: p̄ = (1/K) Σ_k p_k, the probabilities the paper sums.
    `"log_mean_probabilities"`: log p̄, computed stably as `logsumexp_k(log p_k) − log K`;
    its softmax is p̄ again, so it can stand wherever logits are expected
    (`from_logits=True` losses, attacks).
    `"mean_logits"`: (1/K) Σ_k log p_k (the mean of the logits z_k up to a per-example
    shift), logits of the geometric-mean ensemble.

    Args:
        combine: One of `COMBINES`. Defaults to `"mean_probabilities"`.
        outputs: What the members return: `"logits"` or `"probabilities"`. Defaults to
            `"logits"`.
        **kwargs: `keras.layers.Layer` arguments (e.g. `name`).

    Example:

    >>> layer = EnsembleCombination()
    >>> z = np.array([[0.0, 0.0]], "float32")
    >>> keras.ops.convert_to_numpy(layer([z, z])).tolist()
    [[0.5, 0.5]]
    >>> p = np.array([[0.2, 0.8]], "float32")
    >>> layer = EnsembleCombination(outputs="probabilities")
    >>> np.round(keras.ops.convert_to_numpy(layer([p, 1 - p])), 4).tolist()
    [[0.5, 0.5]]
    """

    def __init__(self, combine="mean_probabilities", outputs="logits", **kwargs):
        super().__init__(**kwargs)
        if combine not in COMBINES:
            raise ValueError(
                f"`combine` must be one of {list(COMBINES)}. Received: combine={combine!r}"
            )
        self.combine = combine
        self.outputs = outputs_lib.check_output_kind(outputs, "outputs", allow_auto=False)

    def call(self, inputs):
        members = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        stacked = keras.ops.stack(members, axis=0)
        if self.combine == "mean_probabilities":
            return keras.ops.mean(outputs_lib.as_probabilities(stacked, self.outputs), axis=0)
        if self.outputs == "logits":
            log_probabilities = keras.ops.log_softmax(stacked, axis=-1)
        else:
            log_probabilities = outputs_lib.log_probabilities(stacked)
        if self.combine == "mean_logits":
            if self.outputs == "logits":
                return keras.ops.mean(stacked, axis=0)
            return keras.ops.mean(log_probabilities, axis=0)
        return keras.ops.logsumexp(log_probabilities, axis=0) - math.log(len(members))

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, list):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "combine": self.combine, "outputs": self.outputs}


COMBINATION_NAME = "combination"
# Suffixes of the per-member layers `build_ensemble` puts before the combination: the
# members' probabilities (a `Softmax` of logits, an `Identity` of probabilities) or the
# members' logits (log-probabilities of probability members).
_PROBABILITIES_SUFFIX = "_probabilities"
_LOGITS_SUFFIX = "_logits"


def is_ensemble(model):
    """Whether `model` is a keras_fip ensemble (nested members, a `"combination"` layer)."""
    if not isinstance(model, keras.Model):
        return False
    names = [layer.name for layer in model.layers]
    return COMBINATION_NAME in names and any(
        isinstance(layer, keras.Model) for layer in model.layers
    )


def ensemble_members(model):
    """The member networks of a keras_fip ensemble, each returning what its start returned.

    The members are found structurally: the nested `keras.Model` layers of an ensemble
    model (one with a `"combination"` layer, as `build_ensemble` makes them), in the
    order they were added. This also works on an ensemble re-loaded from a `.keras` file
    or copied. The members are the ensemble's own layers (shared weights, not copies):
    copy them with `keras_fip.engine.copy_model` before changing them. Each member
    returns what the network it was made from returns: logits for a logits model,
    probabilities for one ending in a softmax (`member_output_kind` says which;
    `keras_fip.robustness.logit_model(member)` gives logits either way).

    Args:
        model: A model returned by `keras_fip.Ensemble`, the ensemble baselines or
            `build_ensemble` (or re-loaded from one).

    Returns:
        A list of `keras.Model`.

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
    >>> ensemble = keras_fip.Ensemble(3, data=x, steps_between=2, verbose=0)(model)
    >>> len(keras_fip.ensemble_members(ensemble))
    3
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if not is_ensemble(model):
        raise ValueError(
            "`model` is not a keras_fip ensemble: it has no nested member models and "
            f"`{COMBINATION_NAME}` layer (make ensembles with `keras_fip.Ensemble` or "
            f"`build_ensemble`). Received: model={model.name}"
        )
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def _member_layers(model, suffix):
    return [
        layer
        for layer in model.layers
        if layer.name.startswith("member_")
        and layer.name.endswith(suffix)
        and not isinstance(layer, keras.Model)
    ]


def ensemble_combine(model):
    """The `combine` mode of a keras_fip ensemble: `"mean_probabilities"` (it returns
    probabilities) or `"mean_logits"` (it returns logits)."""
    ensemble_members(model)
    return "mean_probabilities" if _member_layers(model, _PROBABILITIES_SUFFIX) else "mean_logits"


def member_output_kind(model):
    """What the members of a keras_fip ensemble return: `"logits"` or `"probabilities"`.

    Read from the layers `build_ensemble` puts after each member: a `Softmax` follows a
    member returning logits, an `Identity` (mean probabilities) or a log-probability
    layer (mean logits) one returning probabilities.

    Args:
        model: A keras_fip ensemble.

    Returns:
        `"logits"` or `"probabilities"`.

    Example:

    >>> member = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, "softmax")])
    >>> member_output_kind(build_ensemble([member]))
    'probabilities'
    """
    ensemble_members(model)
    probabilities = _member_layers(model, _PROBABILITIES_SUFFIX)
    if probabilities:
        softmax = isinstance(probabilities[0], keras.layers.Softmax)
        return "logits" if softmax else "probabilities"
    return "probabilities" if _member_layers(model, _LOGITS_SUFFIX) else "logits"


def build_ensemble(
    members, combine="mean_probabilities", input_shape=None, name="ensemble", outputs="auto"
):
    """Builds one functional model: one input, the member networks, their combination.

    The members are used as they are (nested, not copied) and renamed `member_0`,
    `member_1`, ... so that the ensemble saves as `.keras` and exports as a SavedModel
    with each member intact; `ensemble_members` gives them back. The combination is an
    `Average` named `"combination"` of what each member's layer `member_k_probabilities`
    (or `member_k_logits`) makes of its outputs, so the ensemble is a Keras model that
    other keras_fip operations accept and that re-loads combining the same way. Masks
    the members carry stay on them.

    With `combine="mean_probabilities"` the ensemble returns p̄ = (1/K) Σ_k p_k,
    probabilities, whatever the members return: members returning probabilities (a
    final softmax) are averaged as they are, members returning logits through a
    `Softmax` each. With `"mean_logits"` it returns logits: the mean of the members'
    logits, or of their log-probabilities for members returning probabilities (logits
    of the geometric-mean ensemble).

    Args:
        members: A non-empty list of `keras.Model` with outputs of one shape, all
            returning logits or all returning probabilities.
        combine: `"mean_probabilities"` or `"mean_logits"` (see above). Defaults to
            `"mean_probabilities"`.
        input_shape: The shape of one input example, or `None` to read it from the first
            member's input (for members with several inputs, the ensemble takes the
            same dict or list of inputs). Defaults to `None`.
        name: The ensemble model's name. Defaults to `"ensemble"`.
        outputs: What the members return: `"logits"`, `"probabilities"`, or `"auto"`
            (the first member's final layer decides,
            `keras_fip.engine.outputs.output_kind`; logits when it does not show).
            Defaults to `"auto"`.

    Returns:
        A functional `keras.Model`.

    Example:

    >>> members = [keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ...            for _ in range(2)]
    >>> build_ensemble(members).output_shape
    (None, 2)
    """
    if (
        not isinstance(members, (list, tuple))
        or not members
        or not all(isinstance(m, keras.Model) for m in members)
    ):
        raise ValueError(
            f"`members` must be a non-empty list of `keras.Model`. Received: members={members!r}"
        )
    if combine not in SAVED_COMBINES:
        raise ValueError(
            f"`combine` must be one of {list(SAVED_COMBINES)}. Received: combine={combine!r}"
        )
    outputs_lib.check_output_kind(outputs)
    if outputs == "auto":
        outputs = outputs_lib.output_kind(members[0])
    several = data_adapter.model_inputs(members[0]) if input_shape is None else None
    if input_shape is None and not data_adapter.is_structured(several):
        input_shape = model_example_shape(members[0])
        if input_shape is None:
            raise ValueError(
                "`input_shape` is required for members without a known single input "
                "(subclassed models). Received: input_shape=None"
            )
    dtype = "float32"
    try:
        dtype = keras.backend.standardize_dtype(members[0].inputs[0].dtype)
    except (AttributeError, ValueError, TypeError, IndexError):
        pass
    for index, member in enumerate(members):
        member.name = f"member_{index}"
    if data_adapter.is_structured(several):
        # Several inputs: the same dict or list of inputs as the first member's.
        inputs = tf.nest.map_structure(
            lambda tensor: keras.Input(
                batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor.name
            ),
            several,
        )
    else:
        inputs = keras.Input(tuple(input_shape), dtype=dtype, name="inputs")
    values = [member(inputs) for member in members]
    if combine == "mean_probabilities":
        # The members' probabilities: a softmax of logits, probabilities as they are.
        layer = keras.layers.Softmax if outputs == "logits" else keras.layers.Identity
        values = [
            layer(name=f"member_{index}{_PROBABILITIES_SUFFIX}")(value)
            for index, value in enumerate(values)
        ]
    elif outputs == "probabilities":
        # The members' logits: log-probabilities.
        values = [
            EnsembleCombination(
                "mean_logits", outputs="probabilities", name=f"member_{index}{_LOGITS_SUFFIX}"
            )([value])
            for index, value in enumerate(values)
        ]
    if len(values) == 1:
        combined = keras.layers.Identity(name=COMBINATION_NAME)(values[0])
    else:
        combined = keras.layers.Average(name=COMBINATION_NAME)(values)
    return keras.Model(inputs, combined, name=name)


class _WalkObjective:
    """The secondary objective of an ensemble walk (see `Ensemble`):

    L(w) = −⟨u, w⟩ + τ·CE(y, f(x; w)) + λ·L_div(w),

    f the network's logits (the log-probabilities of a network returning probabilities:
    the objective is called with the trainer's logits view). −⟨u, w⟩ is the driver (u a
    fixed random unit direction, replaced per member with `push="random_per_member"`,
    absent with `push="none"`). τ·CE is the task term on a labelled batch. L_div is
    measured on inputs x̃ attacked against the ensemble so far: `"error"`:
    CE(y, f(x̃; w)), the new member learns to be right where the ensemble is wrong
    (negatively correlated errors); `"agreement"`: ⟨softmax f(x̃; w), p̄_prev(x̃)⟩, with
    its gradient normalised to length λ. The batch is a dict with `"task"` and/or
    `"diversity"` pairs.
    """

    def __init__(self, model, direction, task_weight, diversity, diversity_loss, training):
        self.variables = model.trainable_variables
        self.direction = None
        if direction is not None:
            self.direction = [
                keras.Variable(piece, trainable=False, name=f"push_{i}")
                for i, piece in enumerate(direction)
            ]
        self.task_weight = float(task_weight)
        self.diversity = float(diversity)
        self.diversity_loss = diversity_loss
        self.training = bool(training)
        self.radius, self.low, self.high = 0.0, 0.0, 1.0  # Set by the walk (`adversary`).

    def set_direction(self, direction):
        for variable, piece in zip(self.direction, direction):
            variable.assign(piece)

    def _attack_ensemble(self, model, inputs, labels, previous_gradient):
        """FGSM against the ensemble of the members so far and the moving network:
        x̃ = clip(x − ρ·sign ∇ₓ Σ_k p_k,y(x)), the sign of ∇ₓ(−log p̄_y) (p̄_y > 0), with
        the members' part Σ_prev ∇ₓ p_k,y cached per member (`previous_gradient`)."""
        inputs = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            probabilities = keras.ops.softmax(
                tf.cast(model(inputs, training=self.training), "float32"), -1
            )
            true = tf.reduce_sum(tf.gather(probabilities, tf.cast(labels, "int32"), batch_dims=1))
        gradient = tape.gradient(true, inputs) + tf.cast(previous_gradient, inputs.dtype)
        perturbed = inputs - tf.cast(self.radius, inputs.dtype) * tf.sign(gradient)
        return tf.stop_gradient(tf.clip_by_value(perturbed, self.low, self.high))

    def _cross_entropy(self, model, inputs, labels):
        logits = tf.cast(model(inputs, training=self.training), "float32")
        return step_rules.mean_cross_entropy(labels, logits)

    def __call__(self, model, batch):
        total = tf.constant(0.0)
        if self.direction is not None:
            total = total - tf.cast(
                step_rules.inner_product(
                    [tf.cast(u.value, v.dtype) for u, v in zip(self.direction, self.variables)],
                    [v.value for v in self.variables],
                ),
                "float32",
            )
        if batch is None:
            return total
        if self.task_weight > 0 and "task" in batch:
            inputs, labels = batch["task"]
            total = total + self.task_weight * self._cross_entropy(model, inputs, labels)
        if self.diversity > 0 and "diversity" in batch:
            inputs, targets = batch["diversity"][:2]
            if len(batch["diversity"]) == 3:
                inputs = self._attack_ensemble(model, inputs, targets, batch["diversity"][2])
            if self.diversity_loss == "error":
                total = total + self.diversity * self._cross_entropy(model, inputs, targets)
            else:
                with tf.GradientTape() as tape:
                    probabilities = keras.ops.softmax(model(inputs, training=self.training), -1)
                    agreement = tf.reduce_mean(
                        tf.reduce_sum(
                            tf.cast(probabilities, "float32") * tf.cast(targets, "float32"), -1
                        )
                    )
                gradients = tape.gradient(
                    agreement,
                    [v.value for v in self.variables],
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                norm = tf.cast(step_rules.global_norm(gradients), "float32")
                total = total + self.diversity * agreement / tf.stop_gradient(norm + 1e-12)
        return total


class _StopAtMetricDistance(keras.callbacks.Callback):
    """Stops a segment once it has covered `target` in the metric: the trainer reports
    the running metric length of the whole walk, `offset` is its value at the segment's
    start."""

    def __init__(self, target, offset):
        super().__init__()
        self.target = target
        self.offset = offset

    def on_train_batch_end(self, batch, logs=None):
        length = float(np.asarray((logs or {}).get("metric_length", 0.0)))
        if length - self.offset >= self.target:
            self.model.stop_training = True


def _predict(models, x, batch_size, kind):
    """Mean probabilities of `models` (returning `kind` outputs) on `x` (numpy), in
    batches."""
    outputs = []
    for start in range(0, data_adapter.num_examples(x), batch_size):
        batch = data_adapter.take(x, slice(start, start + batch_size))
        probabilities = [
            keras.ops.convert_to_numpy(outputs_lib.as_probabilities(m(batch, training=False), kind))
            for m in models
        ]
        outputs.append(np.mean(probabilities, axis=0))
    return np.concatenate(outputs).astype("float32")


def _probability_gradient(models, x, labels, batch_size, kind):
    """Σ_k ∇ₓ p_k,y(x) over `models` (returning `kind` outputs; numpy), in batches."""
    gradients = []
    for start in range(0, len(x), batch_size):
        batch = tf.constant(x[start : start + batch_size])
        target = tf.constant(labels[start : start + batch_size].astype("int32"))
        with tf.GradientTape() as tape:
            tape.watch(batch)
            total = 0.0
            for m in models:
                probabilities = outputs_lib.as_probabilities(
                    tf.cast(m(batch, training=False), "float32"), kind
                )
                total += tf.reduce_sum(tf.gather(probabilities, target, batch_dims=1))
        gradients.append(tape.gradient(total, batch).numpy())
    return np.concatenate(gradients).astype(x.dtype)


def _attack(models, x, labels, epsilon, steps, low, high, batch_size, rng, kind):
    """L∞ attack on −log p̄_y, the cross-entropy of the mean probabilities of `models`
    (returning `kind` outputs).

    One step is FGSM from x (step ε); more steps are PGD from a uniform random start in
    the ε-ball with step 2.5·ε/steps (Madry et al. 2018). Returns the perturbed inputs.
    """
    perturbed = []
    step = epsilon if steps == 1 else 2.5 * epsilon / steps
    combination = EnsembleCombination("log_mean_probabilities", outputs=kind)
    for start in range(0, len(x), batch_size):
        clean = x[start : start + batch_size]
        target = tf.constant(labels[start : start + batch_size])
        current = clean
        if steps > 1:
            current = np.clip(clean + rng.uniform(-epsilon, epsilon, clean.shape), low, high)
        for _ in range(steps):
            batch = tf.constant(current.astype(x.dtype))
            with tf.GradientTape() as tape:
                tape.watch(batch)
                log_mean = combination([m(batch, training=False) for m in models])
                loss = keras.losses.sparse_categorical_crossentropy(
                    target, log_mean, from_logits=True
                )
            gradient = tape.gradient(loss, batch).numpy()
            current = current + step * np.sign(gradient)
            current = np.clip(np.clip(current, clean - epsilon, clean + epsilon), low, high)
        perturbed.append(current)
    return np.concatenate(perturbed).astype(x.dtype)


@keras.saving.register_keras_serializable(package="keras_fip")
class Ensemble(Operation):
    """Samples networks along a functionally invariant path and serves them as one model.

    From the model, a FIP is walked on `data` and a copy of the network is taken as a
    member every `steps_between` steps, or as soon as the walk has covered
    `metric_distance` in the output metric since the previous member. They are returned
    as ONE functional `keras.Model`: one input → the members (nested models `member_0`,
    `member_1`, ...) → their combination (`build_ensemble`). With the default
    `combine="mean_probabilities"` the ensemble returns probabilities p̄ = (1/K) Σ_k p_k:
    a model ending in a softmax gives an ensemble returning probabilities, as it does
    (its members' probabilities are averaged as they are), and a model returning logits
    gives one returning probabilities too (a softmax of each member's logits, averaged):
    use `from_logits=False` losses with it, or `keras_fip.robustness.logit_model(ensemble)`
    for log p̄. `combine="mean_logits"` returns logits (the mean of the members' logits, or
    log-probabilities). `keras_fip.ensemble_members(ensemble)` returns the members, each
    returning what the model returns. The ensemble saves as `.keras` (and re-loads
    combining the same way) and exports with `keras_fip.export`; masks the input carries
    stay on every member.

    The walk reads the network through its logits (the log-probabilities of a model
    returning probabilities, `keras_fip.engine.outputs`). The defaults, for any model and
    data (`"auto"` arguments are resolved when called; `op.history` records what was
    used):

    - the `penalty` rule: Adam on D + β·L, D the squared distance of the logits on the
      anchors to the start's. D is measured exactly at every step, so the walk is pulled
      back whenever it drifts off the function. The paper's `metric` rule keeps the
      outputs only to first order, by steps of Euclidean length ε: its loss of function
      grows with the Euclidean distance walked (as much in many short steps as in a few
      long ones), and how far is too far depends on the network's scale
      (`python -m benchmarks.ensemble_users --paper_walk`: on the BatchNorm residual net,
      whose weights have norm 15, members 5 units apart);
    - the task term τ·CE(y, f(x; w)) with labelled `data=(x, y)`, τ chosen on a split held
      out of `data` (`task_weight="auto"`, below);
    - the diversity term λ·L_div (λ = 1) for one floating-point input: each member is
      trained to be right, on `diversity_examples` inputs attacked (FGSM, radius ρ) against
      the members so far, about the labels (about the prediction of the members so far
      without labels); no push. Inputs that cannot be attacked (token ids, several
      inputs) get the random push instead (below);
    - ρ (`perturbation_epsilon="auto"`): 0.3 of the range of the inputs of `data` (0.3
      for images in [0, 1], the radius of the usual MNIST attacks; 76.5 in [0, 255]);
    - BatchNorm networks are walked on batch statistics (`training="auto"`), and the
      start's moving statistics are first re-estimated on `data`, as every member's are
      after its walk: the reference outputs are then the function the members can keep
      (a network trained with `fit` often carries moving statistics that lag its
      weights; the walk would otherwise spend its steps bending the weights to
      reproduce them).

    The task term: with labelled `data`, L gets τ·CE(y, f(x; w)) on labelled batches, so
    the walk stays on the FIP of the task, not only of the start's outputs, and keeps
    improving the fit where the start is under-trained. With `task_weight="auto"` each τ
    of `TASK_WEIGHTS` (1, 10, 100) walks one member's segment from the start on `data`
    less a stratified, seeded held-out split (a fifth, at most `SELECTION_MAX_EXAMPLES`
    examples), and the τ whose member has the lowest cross-entropy on that split is
    used (with fewer than `SELECTION_MIN_EXAMPLES` held out, `FALLBACK_TASK_WEIGHT`).
    `op.history["task_weight_selection"]` records the held-out cross-entropies and
    accuracies. `data=x` (inputs only), or `task_weight=0`, walks without the labels.

    Diversity (beyond the paper): with `diversity` λ > 0, L gets λ·L_div, measured on
    inputs x̃ attacked (L∞, radius ρ) against the ensemble as it stands:

    - `diversity_loss="error"` (default): L_div = CE(y, f(x̃; w)), the cross-entropy of
      the true label (the prediction of the ensemble so far when `data` has no labels).
      Each new member learns to be right where the ensemble so far is wrong, i.e. its
      errors are made negatively correlated with the ensemble's (negative-correlation
      learning, Liu & Yao 1999; ensemble adversarial training, Tramèr et al. 2018), while
      D keeps its clean outputs. Transfer attacks exploit the errors independently
      trained networks share; this is what makes them fail together.
    - `diversity_loss="agreement"`: L_div = ⟨softmax f(x̃; w), p̄_prev(x̃)⟩, the agreement
      with the mean probabilities of the members so far, its gradient normalised to
      length λ (pushes away from the ensemble's answer, right or wrong: weaker).

    λ = 1 next to the labels' weight chosen for the clean cross-entropy (often 100) keeps
    the clean accuracy and calibration first; a larger `diversity` (up to τ) trades clean
    accuracy for accuracy on attacked inputs.

    Where x̃ comes from (`adversary`): `"members"` (default) attacks the members taken
    so far (the start before the first), once per member: x̃ = FGSM, or PGD with
    `perturbation_steps` > 1, on −log p̄_y. `"ensemble"` attacks in every step the
    ensemble the new member will join (the members so far and the moving network):
    x̃ = clip(x − ρ·sign ∇ₓ Σ_k p_k,y(x)), the FGSM direction of −log p̄_y, with the
    members' part of the gradient cached per member (one extra pass per step).

    The push (the paper's driver, `push="random"`): L gets −⟨u, w⟩ for a random unit
    direction u, which the walk follows along the directions the outputs on `data` do
    not see; `push="random_per_member"` draws a new u for each member. The paper's walk
    is `step_rule="metric", push="random", diversity=0, task_weight=0`: the metric step
    `(g + δI)θ = −β∇L`, rescaled to length ε.

    Compute: `op.history["train_examples"]` counts example passes (one forward and
    backward pass of one example, the unit of "epochs × examples"; a forward pass
    alone counts as a whole one): the start's BatchNorm re-estimation and reference
    outputs, the choice of τ (its walks, counted the same way, and the held-out
    evaluations), per step the anchor batch (× (1 + `cg_iterations`) for the `metric`
    rule, + 1 with `metric_distance`), the task and diversity batches and the per-step
    attack (`"ensemble"`), and per member the attack generation (examples × members
    attacked × steps) and BatchNorm re-estimation. `op.history["walk_examples"]` counts
    the examples entering the steps of the final walk.

    Args:
        num_members: K, the number of members (a positive integer).
        data: Inputs whose outputs are kept: an array, an `(x, y)` tuple (labels for
            the task term and the diversity targets) or a finite `tf.data.Dataset`.
            Defaults to `None` (the inputs the model carries from an earlier operation).
        steps_between: Walk steps between members (the most, with `metric_distance`).
            Defaults to `100`.
        metric_distance: Take a member once the walk has covered this length in the
            output metric, Σ sqrt(Δwᵀ g Δw) on the anchor batches, since the previous
            member, or `None` to take one every `steps_between` steps. Defaults to
            `None`.
        diversity: λ, the weight of L_div on inputs attacked against the ensemble so far
            (0 disables it), or `"auto"`: 1.0 for one floating-point input, else 0.
            Defaults to `"auto"`.
        task_weight: τ, the weight of the cross-entropy on labelled `data` (ignored
            without labels), or `"auto"`: chosen on a held-out split (see above).
            Defaults to `"auto"`.
        diversity_loss: `"error"` or `"agreement"` (see above). Defaults to `"error"`.
        perturbation_epsilon: ρ, the L∞ radius of the diversity perturbations in input
            units, or `"auto"`: `PERTURBATION_FRACTION` (0.3) of the range of the inputs
            of `data`. Defaults to `"auto"`.
        perturbation_steps: Steps of the once-per-member attack (`adversary="members"`):
            1 is FGSM, more is PGD from a random start. Defaults to `1`.
        adversary: `"members"` or `"ensemble"` (see above; `"ensemble"` needs
            `diversity_loss="error"`). Defaults to `"members"`.
        diversity_examples: Inputs of L_div drawn from `data` per member. Defaults to
            `2048`.
        combine: `"mean_probabilities"` (the ensemble returns p̄, probabilities) or
            `"mean_logits"` (it returns the mean of the members' logits). Defaults to
            `"mean_probabilities"`.
        include_start: Whether the starting network is the first member (then K − 1
            members come from the walk). Defaults to `False`.
        push: The driver `−⟨u, w⟩`: `"random"`, `"random_per_member"` or `"none"`, or
            `"auto"`: `"none"` with `diversity` > 0, else `"random"`. Defaults to
            `"auto"`.
        step_rule: `"penalty"`, `"metric"` or `"normalized"`, or `"auto"`: `"penalty"`.
            Defaults to `"auto"`.
        epsilon: ε, the step length (`metric`, `normalized`). Defaults to `0.05`.
        beta: β, the weight of L against D. Defaults to `1.0`.
        distance: Output distance D (`"l2"`, `"kl"`, `"bhattacharyya"`). Defaults to
            `"l2"`.
        reference: `"start"` or `"local"`. Defaults to `"start"`.
        damping: δ of the `metric` rule. Defaults to `1e-3`.
        cg_iterations: CG iterations of the `metric` rule. Defaults to `10`.
        learning_rate: Adam learning rate of the `penalty` rule. Defaults to `1e-3`.
        batch_size: Anchor (and task and diversity) examples per step. Defaults to
            `128`.
        training: Mode of the moving network on the path: `True` (batch statistics; the
            start's and every member's moving statistics re-estimated on `data`),
            `False`, or `"auto"` (`True` when the model has BatchNormalization layers).
            Defaults to `"auto"`.
        record_every: Record the weights in `op.path` every this many steps (and at
            the end of each walk). The walk measures `step_norm` and
            `distance_from_start` at the recorded points only
            (`FIPTrainer(measure_every=record_every)`: `op.history` holds NaN
            between them), and a non-finite step puts the model back on the last
            recorded point. Defaults to `100`.
        path_directory: Directory to stream the path to, or `None`. Defaults to `None`.
        jit_compile: Whether to compile the step with XLA. Defaults to `False`.
        seed: Seed of the held-out split, the push directions, the perturbed inputs and
            the shuffling. Defaults to `None`.
        **kwargs: `Operation` arguments (`name`, `verbose`, `callbacks`, `log_dir`).

    Returns (when called):
        A functional `keras.Model` returning the combination of its K members
        (probabilities by default).

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
    >>> ensemble = keras_fip.Ensemble(3, data=x, steps_between=2, verbose=0)(model)
    >>> ensemble.output_shape
    (None, 10)
    >>> [m.name for m in keras_fip.ensemble_members(ensemble)]
    ['member_0', 'member_1', 'member_2']
    """

    def __init__(
        self,
        num_members,
        data=None,
        steps_between=100,
        metric_distance=None,
        diversity="auto",
        task_weight="auto",
        diversity_loss="error",
        perturbation_epsilon="auto",
        perturbation_steps=1,
        adversary="members",
        diversity_examples=2048,
        combine="mean_probabilities",
        include_start=False,
        push="auto",
        step_rule="auto",
        epsilon=0.05,
        beta=1.0,
        distance="l2",
        reference="start",
        damping=1e-3,
        cg_iterations=10,
        learning_rate=1e-3,
        batch_size=128,
        training="auto",
        record_every=100,
        path_directory=None,
        jit_compile=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_members = self.check_number(
            num_members, "num_members", low=1, low_inclusive=True, integer=True
        )
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        self.steps_between = self.check_number(
            steps_between, "steps_between", low=1, low_inclusive=True, integer=True
        )
        if metric_distance is not None:
            metric_distance = self.check_number(metric_distance, "metric_distance", low=0.0)
        self.metric_distance = metric_distance
        self.diversity = self._check_auto_number(diversity, "diversity", low_inclusive=True)
        self.task_weight = self._check_auto_number(task_weight, "task_weight", low_inclusive=True)
        self.diversity_loss = self.check_choice(diversity_loss, "diversity_loss", DIVERSITY_LOSSES)
        self.perturbation_epsilon = self._check_auto_number(
            perturbation_epsilon, "perturbation_epsilon"
        )
        self.adversary = self.check_choice(adversary, "adversary", ADVERSARIES)
        if self.adversary == "ensemble" and self.diversity_loss != "error":
            raise ValueError(
                "`adversary='ensemble'` (inputs attacked in every step) needs "
                "`diversity_loss='error'`: the agreement needs the members' outputs on "
                f"fixed inputs. Received: adversary={adversary!r}, "
                f"diversity_loss={diversity_loss!r}"
            )
        self.perturbation_steps = self.check_number(
            perturbation_steps, "perturbation_steps", low=1, low_inclusive=True, integer=True
        )
        self.diversity_examples = self.check_number(
            diversity_examples, "diversity_examples", low=1, low_inclusive=True, integer=True
        )
        self.combine = self.check_choice(combine, "combine", SAVED_COMBINES)
        if not isinstance(include_start, (bool, np.bool_)):
            raise ValueError(
                f"`include_start` must be True or False. Received: include_start={include_start!r}"
            )
        self.include_start = bool(include_start)
        self.push = self.check_choice(push, "push", ("auto",) + PUSHES)
        self.step_rule = self.check_choice(
            step_rule, "step_rule", ("auto",) + tuple(step_rules.STEP_RULES)
        )
        if self.push == "none" and self.diversity == 0 and self.task_weight == 0:
            raise ValueError(
                "`push='none'` with `diversity=0` and `task_weight=0` leaves the walk no "
                "driver (L = 0: every member is the start). Use push='random', "
                "diversity > 0, or task_weight > 0 with labelled data. "
                f"Received: push={push!r}, diversity={diversity!r}, "
                f"task_weight={task_weight!r}"
            )
        self.epsilon = self.check_number(epsilon, "epsilon", low=0.0)
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
        self.training = self.check_training(training)
        self.record_every, self.path_directory, self.seed = self.check_path_options(
            record_every, path_directory, seed
        )
        self.jit_compile = bool(jit_compile)

    def _check_auto_number(self, value, name, low_inclusive=False):
        """`"auto"`, or a number > 0 (≥ 0 with `low_inclusive`)."""
        if isinstance(value, str) and value == "auto":
            return value
        if isinstance(value, str):
            raise ValueError(f"`{name}` must be 'auto' or a number. Received: {name}={value!r}")
        return self.check_number(value, name, low=0.0, low_inclusive=low_inclusive)

    # The defaults.

    def resolve_defaults(self, continuous=True):
        """The `diversity`, `push` and `step_rule` a walk uses, `"auto"` resolved.

        `"auto"` gives the `penalty` rule; the diversity term (λ = 1) and no push when
        the inputs can be attacked (one floating-point input), else no diversity term
        and the random push. Arguments that are not `"auto"` are kept.

        Args:
            continuous: Whether the inputs are one floating-point array. Defaults to
                `True`.

        Returns:
            A tuple `(diversity, push, step_rule)`.
        """
        diversity = self.diversity
        if diversity == "auto":
            diversity = 1.0 if continuous else 0.0
        push = self.push
        if push == "auto":
            push = "none" if diversity > 0 else "random"
        step_rule = "penalty" if self.step_rule == "auto" else self.step_rule
        return diversity, push, step_rule

    def resolve_perturbation_epsilon(self, low, high):
        """ρ: `perturbation_epsilon`, or for `"auto"` `PERTURBATION_FRACTION` of the
        inputs' range `high − low` (of a range of 1 when it is unknown or zero)."""
        if self.perturbation_epsilon != "auto":
            return float(self.perturbation_epsilon)
        span = 1.0 if low is None or high is None or high <= low else float(high - low)
        return PERTURBATION_FRACTION * span

    # The walk.

    def _anchor_passes(self, step_rule):
        """Forward/backward passes per anchor example of one step (for the compute)."""
        passes = 1 + (self.metric_distance is not None)  # D (and the metric length).
        if step_rule == "metric":
            passes += self.cg_iterations  # One JᵀJv per CG iteration.
        return passes

    def _diversity_batch(self, previous, x, y, rng, walk):
        """The inputs of L_div for the next segment: `diversity_examples` inputs drawn
        from `x`, attacked against the ensemble so far, with their targets (labels for
        `"error"`, p̄_prev for `"agreement"`); and the passes they cost."""
        rows = np.sort(rng.choice(len(x), min(self.diversity_examples, len(x)), replace=False))
        inputs = x[rows]
        passes = 0
        if y is not None:
            labels = y[rows]
        else:
            labels = np.argmax(_predict(previous, inputs, 512, self._kind), -1).astype("int64")
            passes += len(inputs) * len(previous)
        if self.adversary == "ensemble":
            # Attacked in each step; the members' part of the gradient is cached here.
            gradient = _probability_gradient(previous, inputs, labels, 512, self._kind)
            passes += len(inputs) * len(previous)
            return (inputs, labels, gradient), passes
        perturbed = _attack(
            previous,
            inputs,
            labels,
            walk["radius"],
            self.perturbation_steps,
            self._low,
            self._high,
            512,
            rng,
            self._kind,
        )
        passes += len(inputs) * len(previous) * self.perturbation_steps
        if self.diversity_loss == "error":
            return (perturbed, labels), passes
        passes += len(inputs) * len(previous)
        return (perturbed, _predict(previous, perturbed, 512, self._kind)), passes

    def _walk(self, model, x, y, num_members, walk, path=None, include_start=False):
        """Walks `model` (in place) on `(x, y)` and takes `num_members` members.

        `walk` holds the resolved settings (`task_weight`, `diversity`, `push`,
        `step_rule`, `radius`, `training`). Returns `(members, history)`, `history`
        holding the per-step scalars, `"member_steps"`, `"train_examples"` (the reference
        outputs, the steps, the attacks, the BatchNorm re-estimations) and
        `"walk_examples"`.
        """
        rng = np.random.default_rng(self.seed)
        normalized = bool(normalization.batch_normalization_layers(model))
        anchor_data = fip_dataset(
            outputs_lib.logits_model(model, self._kind),
            x,
            batch_size=self.batch_size,
            reference=self.reference,
            seed=self.seed,
        )  # The reference outputs are logits.
        task_weight, diversity, push = walk["task_weight"], walk["diversity"], walk["push"]
        task_data = None
        if task_weight > 0:
            # Stateless per-pass permutations: the same batches under any strategy.
            task_data = repeated_batches((x, y), self.batch_size, seed=int(rng.integers(2**31)))

        # Driver and trainer (one walk through every member; the path continues).
        direction = None
        if push != "none":
            direction = random_direction(model, int(rng.integers(2**31)))
        objective = _WalkObjective(
            model, direction, task_weight, diversity, self.diversity_loss, walk["training"]
        )
        objective.radius, objective.low, objective.high = walk["radius"], self._low, self._high
        trainer = FIPTrainer(
            model,
            step_rule=walk["step_rule"],
            distance=self.distance,
            beta=self.beta,
            epsilon=self.epsilon,
            damping=self.damping,
            cg_iterations=self.cg_iterations,
            secondary_objective=objective,
            reference=self.reference,
            metric_length=self.metric_distance is not None,
            training=walk["training"],
            measure_every=self.record_every,
            outputs=self._kind,
        )
        penalty = walk["step_rule"] == "penalty"
        optimizer = keras.optimizers.Adam(self.learning_rate) if penalty else None
        trainer.compile(optimizer=optimizer, jit_compile=self.jit_compile)

        members = [copy_model(model)] if include_start else []
        history = {}
        member_steps = [0] if include_start else []
        # Compute, in example passes: the reference outputs first.
        train_examples = data_adapter.num_examples(x) if self.reference == "start" else 0
        walk_examples = 0
        total_steps = 0
        while len(members) < num_members:
            # This segment's data: the anchors, the task batches and the attacked inputs.
            secondary = {}
            if task_data is not None:
                secondary["task"] = task_data
            if diversity > 0:
                previous = members or [copy_model(model)]
                tensors, passes = self._diversity_batch(previous, x, y, rng, walk)
                train_examples += passes
                secondary["diversity"] = repeated_batches(
                    tuple(tensors), self.batch_size, seed=int(rng.integers(2**31))
                )
            dataset = anchor_data
            if secondary:
                keys = sorted(secondary)
                dataset = tf.data.Dataset.zip(
                    (anchor_data,) + tuple(secondary[key] for key in keys)
                ).map(
                    lambda anchor_batch, *batches: {
                        **anchor_batch,
                        "secondary": dict(zip(keys, batches)),  # noqa: B023
                    }
                )
            if push == "random_per_member" and members:
                objective.set_direction(random_direction(model, int(rng.integers(2**31))))

            # Walk to the next member.
            callbacks = list(self.callbacks or []) if path is not None else []
            if self.metric_distance is not None:
                offset = history["metric_length"][-1] if history.get("metric_length") else 0.0
                callbacks.append(_StopAtMetricDistance(self.metric_distance, offset))
            segment = trainer.walk(
                dataset,
                self.steps_between,
                path=path,
                callbacks=callbacks,
                verbose=self.verbose if path is not None else 0,
                log_dir=self.log_dir if path is not None else None,
            )
            steps = len(next(iter(segment.values()))) if segment else 0
            for key, values in segment.items():
                history.setdefault(key, []).extend(values)
            walk_examples += steps * self.batch_size * (1 + len(secondary))
            train_examples += (
                steps
                * self.batch_size
                * (
                    self._anchor_passes(walk["step_rule"])
                    + len(secondary)
                    + (diversity > 0 and self.adversary == "ensemble")
                )
            )

            # Take the member (a recorded point of the path, so the steps run on).
            total_steps += steps
            if path is not None and int(path.steps[-1]) != total_steps:
                path.append(
                    total_steps,
                    [v.numpy() for v in model.trainable_variables],
                    {key: values[-1] for key, values in segment.items()},
                )
            member = copy_model(model)
            if walk["training"] and normalized:
                normalization.recalibrate_batch_normalization(member, x, 2 * self.batch_size)
                train_examples += data_adapter.num_examples(x)
            members.append(member)
            member_steps.append(total_steps)
        history["member_steps"] = member_steps
        history["train_examples"] = int(train_examples)
        history["walk_examples"] = int(walk_examples)
        return members, history

    def _choose_task_weight(self, model, x, y, walk):
        """`(task_weight, record)`: the τ of `TASK_WEIGHTS` whose first member, walked on
        `(x, y)` less a held-out split (on as many of those examples as one segment
        reads), has the lowest cross-entropy on that split."""
        fraction = min(SELECTION_FRACTION, SELECTION_MAX_EXAMPLES / len(y))
        fit_rows, held_rows = holdout_rows(y, fraction, self.seed)
        if len(held_rows) < SELECTION_MIN_EXAMPLES:
            record = {"validation_examples": int(len(held_rows)), "train_examples": 0}
            return FALLBACK_TASK_WEIGHT, record
        # A segment reads at most `steps_between` batches of each stream: the candidates
        # walk on that many of the other examples (their reference outputs cost no more).
        visited = max(self.steps_between * self.batch_size, self.diversity_examples)
        if len(fit_rows) > visited:
            rng = np.random.default_rng(self.seed)
            fit_rows = np.sort(rng.permutation(fit_rows)[:visited])
        x_fit, y_fit = data_adapter.take(x, fit_rows), y[fit_rows]
        x_held, y_held = data_adapter.take(x, held_rows), y[held_rows]
        losses, accuracies, passes = {}, {}, 0
        for task_weight in TASK_WEIGHTS:
            (member,), history = self._walk(
                copy_model(model), x_fit, y_fit, 1, {**walk, "task_weight": task_weight}
            )
            probabilities = _predict([member], x_held, 512, self._kind)
            true = probabilities[np.arange(len(y_held)), y_held]
            losses[task_weight] = float(-np.mean(np.log(np.maximum(true, 1e-12))))
            accuracies[task_weight] = float(np.mean(np.argmax(probabilities, -1) == y_held))
            passes += history["train_examples"] + len(held_rows)
        chosen = min(TASK_WEIGHTS, key=lambda weight: (losses[weight], weight))
        record = {
            "validation_examples": int(len(held_rows)),
            "validation_cross_entropy": losses,
            "validation_accuracy": accuracies,
            "train_examples": int(passes),
        }
        return float(chosen), record

    def call(self, model):
        anchor = self.resolve_data(self.data, model)
        x, y = normalize_data(anchor, name="data", model=model)
        check_inputs_match_model(model, x, name="data")
        several = data_adapter.is_structured(x)
        x = (
            data_adapter.float32_inputs(x)
            if several or np.issubdtype(np.asarray(x).dtype, np.floating)
            else np.asarray(x)
        )
        if y is not None:
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[-1] > 1:
                y = np.argmax(y, -1)
            y = y.reshape(data_adapter.num_examples(x)).astype("int64")
        self._low = self._high = None  # The attacks' bounds (one input of floats only).
        if not several:
            self._low, self._high = float(np.min(x)), float(np.max(x))
        # What the model returns; the walk reads it through its logits (log-probabilities
        # of a probability model), and the members are combined as what they return.
        self._kind = model_output_kind(model, x)
        normalized = bool(normalization.batch_normalization_layers(model))
        walk_training = normalized if self.training == "auto" else self.training
        fip_dataset(model, x, batch_size=self.batch_size, reference="local")  # Checks the fit.
        input_shape = None if several else (model_example_shape(model) or tuple(x.shape[1:]))
        # The attacked inputs of `diversity` are one array of floats.
        continuous = not several and np.issubdtype(x.dtype, np.floating)
        diversity, push, step_rule = self.resolve_defaults(continuous=continuous)
        if diversity > 0 and not continuous:
            raise ValueError(
                "`diversity` > 0 trains each member on inputs attacked against the "
                "ensemble (an L∞ perturbation), which needs one floating-point input. "
                f"Received: diversity={diversity!r} with "
                + ("several inputs" if several else f"{x.dtype} inputs (e.g. token ids)")
                + "; use diversity=0 (or 'auto')"
            )
        if push == "none" and diversity == 0 and (y is None or self.task_weight == 0):
            raise ValueError(
                "`push='none'` with `diversity=0` needs labelled `data=(x, y)` for the task "
                "term: with inputs alone the walk has no driver (every member is the "
                f"start). Received: data without labels, push={push!r}, "
                f"diversity={diversity!r}"
            )
        walk = {
            "diversity": diversity,
            "push": push,
            "step_rule": step_rule,
            "radius": self.resolve_perturbation_epsilon(self._low, self._high),
            "training": bool(walk_training),
        }
        train_examples = 0

        # The start: BatchNorm statistics re-estimated on `data`, as the members' are.
        if walk_training and normalized:
            normalization.recalibrate_batch_normalization(model, x, 2 * self.batch_size)
            train_examples += data_adapter.num_examples(x)

        # The labels' weight, chosen on a split held out of `data`.
        selection = None
        if y is None:
            task_weight = 0.0
        elif self.task_weight == "auto":
            task_weight, selection = self._choose_task_weight(model, x, y, walk)
            train_examples += selection["train_examples"]
        else:
            task_weight = self.task_weight
        walk["task_weight"] = task_weight

        # Walk on all of `data`.
        self.path = Path(model, record_every=self.record_every, directory=self.path_directory)
        members, history = self._walk(
            model, x, y, self.num_members, walk, path=self.path, include_start=self.include_start
        )
        ensemble = build_ensemble(
            members,
            self.combine,
            input_shape,
            name=f"{model.name}_ensemble",
            outputs=self._kind,
        )
        history["train_examples"] += train_examples
        history.update(
            diversity=diversity,
            push=push,
            step_rule=step_rule,
            task_weight=task_weight,
            perturbation_epsilon=walk["radius"],
            outputs=self._kind,
        )
        if selection is not None:
            history["task_weight_selection"] = selection
        self.history = history
        return ensemble

    def get_config(self):
        return {
            **super().get_config(),
            "num_members": self.num_members,
            "data": None,  # Data are not serialised; pass them again after from_config.
            "steps_between": self.steps_between,
            "metric_distance": self.metric_distance,
            "diversity": self.diversity,
            "task_weight": self.task_weight,
            "diversity_loss": self.diversity_loss,
            "perturbation_epsilon": self.perturbation_epsilon,
            "perturbation_steps": self.perturbation_steps,
            "adversary": self.adversary,
            "diversity_examples": self.diversity_examples,
            "combine": self.combine,
            "include_start": self.include_start,
            "push": self.push,
            "step_rule": self.step_rule,
            "epsilon": self.epsilon,
            "beta": self.beta,
            "distance": self.distance,
            "reference": self.reference,
            "damping": self.damping,
            "cg_iterations": self.cg_iterations,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "training": self.training,
            "record_every": self.record_every,
            "path_directory": self.path_directory,
            "jit_compile": self.jit_compile,
            "seed": self.seed,
        }
