"""`Ensemble`: networks sampled along one functionally invariant path, served as one model."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core import tuning
from keras_fip.core.adversarial import signed_gradient_ascent
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.data_adapter import model_example_shape
from keras_fip.core.data_adapter import normalize_data
from keras_fip.core.data_adapter import repeated_batches
from keras_fip.engine import step_rules
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.rules import Metric
from keras_fip.engine.rules import Penalty
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.operations import ensemble_diversity
from keras_fip.operations.base import WalkingOperation
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.ensemble_diversity import Diversity
from keras_fip.operations.ensemble_model import COMBINATION_NAME
from keras_fip.operations.ensemble_model import COMBINES
from keras_fip.operations.ensemble_model import SAVED_COMBINES
from keras_fip.operations.ensemble_model import EnsembleCombination
from keras_fip.operations.ensemble_model import build_ensemble
from keras_fip.operations.ensemble_model import ensemble_combine
from keras_fip.operations.ensemble_model import ensemble_members
from keras_fip.operations.ensemble_model import is_ensemble
from keras_fip.operations.ensemble_model import member_output_kind
from keras_fip.operations.isofunctional import random_direction

__all__ = [
    "COMBINATION_NAME",
    "COMBINES",
    "SAVED_COMBINES",
    "Diversity",
    "Ensemble",
    "EnsembleCombination",
    "SegmentCosine",
    "build_ensemble",
    "ensemble_combine",
    "ensemble_members",
    "is_ensemble",
    "member_output_kind",
]

PUSHES = ("random", "random_per_member", "none")
# The walk's budget when it names none: this many steps per member the walk takes.
MEMBER_STEPS = 100
# The walk's distance and β when it names none: the squared distance of the logits and
# β = 1, the measured walk (the KL divergence keeps less of a BatchNorm network's function
# under the diversity term).
DISTANCE = "l2"
BETA = 1.0
# `beta="auto"`: β = STRENGTH × κ (`keras_fip.engine.beta.auto_beta`, objective "outputs"):
# the labels' and the diversity term's cross-entropies put in the distance's units.
STRENGTH = 1.0
# `labels="auto"`: each weight τ walks the first member's segment on `data` less a
# stratified, seeded held-out split (SELECTION_FRACTION of it, at most
# SELECTION_MAX_EXAMPLES examples) and the lowest cross-entropy on that split chooses
# (`keras_fip.core.tuning.grid_search` over LABEL_WEIGHTS, not extended past its ends: a
# larger weight lets the labels' term outweigh the distance that keeps the function). With
# fewer than SELECTION_MIN_EXAMPLES held out, FALLBACK_LABEL_WEIGHT.
LABEL_WEIGHTS = (1.0, 10.0, 100.0)
SELECTION_FRACTION = 0.2
SELECTION_MAX_EXAMPLES = 2000
SELECTION_MIN_EXAMPLES = 100
FALLBACK_LABEL_WEIGHT = 1.0
# Examples a batch of the members' predictions and attacks holds.
PREDICT_BATCH = 512


class _WalkObjective:
    """The secondary objective of an ensemble walk (see `Ensemble`):

    L(w) = −⟨u, w⟩ + τ·CE(y, f(x; w)) + λ·L_div(w),

    f the network's logits (the log-probabilities of a network returning probabilities:
    the objective is called with the trainer's logits view). −⟨u, w⟩ is the driver (u a
    fixed random unit direction, replaced per member with `push="random_per_member"`,
    absent with `push="none"`). τ·CE is the labels' term on a labelled batch. L_div is
    measured on inputs x̃ attacked against the ensemble so far (with
    `adversary="ensemble"`, in every step, against the members in the slots of
    `watch_members` and the moving network): `"error"`:
    CE(y, f(x̃; w)), the new member learns to be right where the ensemble is wrong
    (negatively correlated errors); `"agreement"`: ⟨softmax f(x̃; w), p̄_prev(x̃)⟩, with
    its gradient normalised to length λ. The batch is a dict with `"task"` and/or
    `"diversity"` pairs.
    """

    def __init__(self, model, direction, task_weight, diversity, loss, training):
        self.variables = model.trainable_variables
        self.direction = None
        if direction is not None:
            self.direction = [
                keras.Variable(piece, trainable=False, name=f"push_{i}")
                for i, piece in enumerate(direction)
            ]
        self.task_weight = float(task_weight)
        self.diversity = float(diversity)
        self.loss = loss
        self.training = bool(training)
        self.low, self.high = 0.0, 1.0  # Set by the walk (`adversary="ensemble"`).
        self.attack_steps = 1
        self.slots, self.active, self.radius = [], None, None

    def set_direction(self, direction):
        for variable, piece in zip(self.direction, direction):
            variable.assign(piece)

    def watch_members(self, slots):
        """Attacks, in every step, the networks in `slots` marked active (`set_members`)
        with the moving network (`adversary="ensemble"`)."""
        self.slots = list(slots)
        self.active = keras.Variable(
            np.zeros(len(self.slots), "float32"), trainable=False, name="active_members"
        )
        self.radius = keras.Variable(0.0, trainable=False, name="attack_radius")

    def set_members(self, members):
        """Puts `members` (at most as many as the slots) in the slots the attack reads."""
        for slot, member in zip(self.slots, members):
            for target, source in zip(slot.weights, member.weights):
                target.assign(source.value)
        active = np.arange(len(self.slots)) < len(members)
        self.active.assign(active.astype("float32"))

    def _mean_probability_loss(self, model, inputs, labels):
        """−log p̄_y summed over the batch: p̄ the mean probabilities of the moving network
        and the active members."""
        probabilities = keras.ops.softmax(
            tf.cast(model(inputs, training=self.training), "float32"), -1
        )
        total, count, active = probabilities, tf.constant(1.0), self.active.value
        for index, slot in enumerate(self.slots):
            total += tf.cond(
                active[index] > 0,
                lambda slot=slot: keras.ops.softmax(
                    tf.cast(slot(inputs, training=False), "float32"), -1
                ),
                lambda: tf.zeros_like(probabilities),
            )
            count += active[index]
        true = tf.gather(total / count, tf.cast(labels, "int32"), batch_dims=1)
        return -tf.reduce_sum(tf.math.log(tf.maximum(true, 1e-12)))

    def _attack_ensemble(self, model, inputs, labels):
        """FGSM (one step) or PGD from a uniform random start (step 2.5·ρ/steps) on
        −log p̄_y of the moving network and the active members, in the L∞ ball of radius
        ρ (`self.radius`) within [low, high]."""
        clean = tf.convert_to_tensor(inputs)
        radius = tf.cast(self.radius, clean.dtype)
        step = radius if self.attack_steps == 1 else 2.5 * radius / self.attack_steps
        start = clean
        if self.attack_steps > 1:
            start = clean + tf.random.uniform(tf.shape(clean), -1.0, 1.0, clean.dtype) * radius
            start = tf.clip_by_value(start, self.low, self.high)
        return signed_gradient_ascent(
            lambda current: self._mean_probability_loss(model, current, labels),
            clean,
            start,
            radius,
            step,
            self.attack_steps,
            (self.low, self.high),
        )

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
            inputs, targets = batch["diversity"]
            if self.slots:
                inputs = self._attack_ensemble(model, inputs, targets)
            if self.loss == "error":
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


class _RampRadius(keras.callbacks.Callback):
    """Sets the per-step attack's radius before each step: ρ·min(1, (t + 1)/`ramp_steps`)
    at the walk's step t (`offset` + the segment's step), ρ with `ramp_steps` = 0."""

    def __init__(self, variable, radius, ramp_steps, offset):
        super().__init__()
        self.variable = variable
        self.radius = float(radius)
        self.ramp_steps = int(ramp_steps)
        self.offset = int(offset)

    def on_train_batch_begin(self, batch, logs=None):
        fraction = 1.0
        if self.ramp_steps > 0:
            fraction = min(1.0, (self.offset + batch + 1) / self.ramp_steps)
        self.variable.assign(self.radius * fraction)


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
class SegmentCosine(keras.optimizers.schedules.LearningRateSchedule):
    """A cosine decay restarted at the start of each segment of a walk.

    In the segment of steps [s_k, s_k + n_k) the rate is
    `rate · (1 + cos(π (t − s_k) / n_k)) / 2`: it starts at `rate` and falls to near zero at
    the segment's end, where `Ensemble` takes a member. The cyclic schedule of snapshot
    ensembles (Huang et al. 2017) and fast geometric ensembling (Garipov et al. 2018),
    with one cycle per member: each member is a point where the walk has settled, the
    rate's rise between members moves the walk on.

    Args:
        rate: The rate at the start of each segment (a positive float).
        segments: The steps of each segment (positive integers).

    Examples:

        >>> schedule = SegmentCosine(1.0, [4, 2])
        >>> [round(float(schedule(step)), 3) for step in range(6)]
        [1.0, 0.854, 0.5, 0.146, 1.0, 0.5]
    """

    def __init__(self, rate, segments):
        self.rate = float(rate)
        self.segments = [int(n) for n in segments]
        if not self.segments or min(self.segments) < 1:
            raise ValueError(
                f"`segments` must be positive step counts. Received: segments={segments!r}"
            )
        ends = np.cumsum(self.segments)
        self._starts = np.concatenate([[0], ends[:-1]]).astype("float32")
        self._lengths = np.asarray(self.segments, "float32")

    def __call__(self, step):
        step = tf.cast(step, "float32")
        starts = tf.constant(self._starts)
        index = tf.reduce_sum(tf.cast(starts[1:] <= step, "int32"))
        fraction = (step - tf.gather(starts, index)) / tf.gather(self._lengths, index)
        fraction = tf.minimum(fraction, 1.0)
        return self.rate * 0.5 * (1.0 + tf.cos(np.pi * fraction))

    def get_config(self):
        return {"rate": self.rate, "segments": list(self.segments)}


def _segment_steps(total, segments):
    """The steps of each of `segments` walks sharing `total` steps as evenly as can be."""
    ends = [round(k * total / segments) for k in range(segments + 1)]
    return [ends[k + 1] - ends[k] for k in range(segments)]


class _Run:
    """What one `Ensemble` call computes once and every walk of it shares: the data, what
    the model returns, the resolved walk, β, the learning rate and the diversity settings."""

    def __init__(self, operation, model, walk, x, y, settings):
        self.walk = walk
        self.spacing = operation.spacing
        self.diversity = operation.diversity
        self.x, self.y = x, y
        self.low, self.high = settings["low"], settings["high"]
        self.kind = model_output_kind(model, x)
        self.normalized = bool(normalization.batch_normalization_layers(model))
        self.training = self.normalized if walk.training == "auto" else bool(walk.training)
        self.weight, self.push = settings["weight"], settings["push"]
        self.radius = self.diversity.resolve_radius(self.low, self.high)
        self.total_steps, self.segments = settings["total_steps"], settings["segments"]
        if walk.beta == "auto":
            distance = walk.distance if isinstance(walk.distance, str) else "kl"
            self.beta = auto_beta(
                STRENGTH,
                outputs_lib.logits_model(model, self.kind),
                x,
                distance=distance,
                objective="outputs",
                seed=walk.seed,
            )
        else:
            self.beta = float(walk.beta)
        self.learning_rate = None
        if isinstance(walk.rule, Penalty):
            self.learning_rate = walk.rule.resolve_learning_rate(model.trainable_variables)

    def anchor_passes(self):
        """Forward/backward passes per anchor example of one step (for the compute)."""
        passes = 1 + (self.spacing is not None)  # D (and the metric length).
        if isinstance(self.walk.rule, Metric):
            passes += self.walk.rule.cg_iterations  # One JᵀJv per CG iteration.
        return passes

    def diversity_batch(self, previous, x, y, rng):
        """The inputs of L_div for the next segment: `examples` inputs drawn from `x`,
        attacked against the ensemble so far (with `adversary="ensemble"`: as they are,
        the walk attacks them in every step), with their targets (labels for `"error"`,
        p̄_prev for `"agreement"`); and the passes they cost."""
        diversity = self.diversity
        count = min(diversity.examples, len(x))
        rows = np.sort(rng.choice(len(x), count, replace=False))
        inputs = x[rows]
        passes = 0
        if y is not None:
            labels = y[rows]
        else:
            labels = np.argmax(_predict(previous, inputs, PREDICT_BATCH, self.kind), -1)
            labels = labels.astype("int64")
            passes += len(inputs) * len(previous)
        if diversity.adversary == "ensemble":
            return (inputs, labels), passes
        perturbed = _attack(
            previous,
            inputs,
            labels,
            self.radius,
            diversity.attack_steps,
            self.low,
            self.high,
            PREDICT_BATCH,
            rng,
            self.kind,
        )
        passes += len(inputs) * len(previous) * diversity.attack_steps
        if diversity.loss == "error":
            return (perturbed, labels), passes
        passes += len(inputs) * len(previous)
        return (perturbed, _predict(previous, perturbed, PREDICT_BATCH, self.kind)), passes

    def walk_members(self, model, x, y, label_weight, segments, path=None, include_start=False):
        """Walks `model` (in place) on `(x, y)` and takes a member after each segment.

        `segments` lists the steps of each segment. Returns `(members, history)`,
        `history` holding the per-step scalars, `"member_steps"`, `"train_examples"` (the
        reference outputs, the steps, the attacks, the BatchNorm re-estimations) and
        `"walk_examples"`.
        """
        walk = self.walk
        batch_size = walk.batch_size
        rng = np.random.default_rng(walk.seed)
        anchor_data = fip_dataset(
            outputs_lib.logits_model(model, self.kind),
            x,
            batch_size=batch_size,
            reference=walk.reference,
            seed=walk.seed,
        )  # The reference outputs are logits.
        task_data = None
        if label_weight > 0:
            # Stateless per-pass permutations: the same batches under any strategy.
            task_data = repeated_batches((x, y), batch_size, seed=int(rng.integers(2**31)))

        # Driver and trainer (one walk through every member; the path continues).
        direction = None
        if self.push != "none":
            direction = random_direction(model, int(rng.integers(2**31)))
        objective = _WalkObjective(
            model, direction, label_weight, self.weight, self.diversity.loss, self.training
        )
        attacked = self.weight > 0 and self.diversity.adversary == "ensemble"
        if attacked:
            # Slots for the members the per-step attack reads (the start in the first
            # segment): copies of the network whose weights each segment sets.
            slots = max(1, include_start + len(segments) - 1)
            objective.watch_members([copy_model(model) for _ in range(slots)])
            objective.low, objective.high = self.low, self.high
            objective.attack_steps = self.diversity.attack_steps
            ramp_steps = round(self.diversity.radius_ramp * sum(segments))
        trainer = FIPTrainer(
            model,
            rule=walk.rule,
            distance=walk.distance,
            beta=self.beta,
            secondary_objective=objective,
            reference=walk.reference,
            metric_length=self.spacing is not None,
            training=self.training,
            measure_every=walk.record_every,
            outputs=self.kind,
        )
        if self.learning_rate is not None:
            # The same cosine in every segment: each member is taken where the rate has
            # decayed, as snapshot ensembles take theirs.
            rate = SegmentCosine(self.learning_rate, segments) if segments else self.learning_rate
            optimizer = keras.optimizers.Adam(rate)
        else:
            optimizer = walk.rule.optimizer(sum(segments), model.trainable_variables)
        trainer.compile(optimizer=optimizer, jit_compile=walk.jit_compile)

        members = [copy_model(model)] if include_start else []
        history = {}
        member_steps = [0] if include_start else []
        # Compute, in example passes: the reference outputs first.
        train_examples = data_adapter.num_examples(x) if walk.reference == "start" else 0
        walk_examples = 0
        total_steps = 0
        for segment_steps in segments:
            # This segment's data: the anchors, the labelled batches and the attacked inputs.
            secondary = {}
            if task_data is not None:
                secondary["task"] = task_data
            if self.weight > 0:
                previous = members or [copy_model(model)]
                tensors, passes = self.diversity_batch(previous, x, y, rng)
                train_examples += passes
                secondary["diversity"] = repeated_batches(
                    tuple(tensors), batch_size, seed=int(rng.integers(2**31))
                )
                if attacked:
                    objective.set_members(previous)
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
            if self.push == "random_per_member" and members:
                objective.set_direction(random_direction(model, int(rng.integers(2**31))))

            # Walk to the next member.
            callbacks = list(walk.callbacks or []) if path is not None else []
            if self.spacing is not None:
                offset = history["metric_length"][-1] if history.get("metric_length") else 0.0
                callbacks.append(_StopAtMetricDistance(self.spacing, offset))
            if attacked:
                callbacks.append(
                    _RampRadius(objective.radius, self.radius, ramp_steps, total_steps)
                )
            segment = trainer.walk(
                dataset,
                segment_steps,
                path=path,
                callbacks=callbacks,
                verbose=walk.verbose if path is not None else 0,
                log_dir=walk.log_dir if path is not None else None,
            )
            steps = len(next(iter(segment.values()))) if segment else 0
            for key, values in segment.items():
                history.setdefault(key, []).extend(values)
            walk_examples += steps * batch_size * (1 + len(secondary))
            # The per-step attack: each of its steps a pass of the moving network and of
            # every member attacked.
            attack_passes = self.diversity.attack_steps * (1 + len(previous)) if attacked else 0
            train_examples += (
                steps * batch_size * (self.anchor_passes() + len(secondary) + attack_passes)
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
            if self.training and self.normalized:
                normalization.recalibrate_batch_normalization(member, x, 2 * batch_size)
                train_examples += data_adapter.num_examples(x)
            members.append(member)
            member_steps.append(total_steps)
        history["member_steps"] = member_steps
        history["train_examples"] = int(train_examples)
        history["walk_examples"] = int(walk_examples)
        return members, history

    def choose_label_weight(self, model, x, y):
        """`(label_weight, record)`: the τ whose first member, walked on `(x, y)` less a
        held-out split (on as many of those examples as one segment reads), has the lowest
        cross-entropy on that split (`keras_fip.core.tuning.grid_search` from
        `LABEL_WEIGHTS`)."""
        fraction = min(SELECTION_FRACTION, SELECTION_MAX_EXAMPLES / len(y))
        fit_rows, held_rows = tuning.validation_rows(y, fraction, self.walk.seed)
        if len(held_rows) < SELECTION_MIN_EXAMPLES:
            record = {"validation_examples": int(len(held_rows)), "train_examples": 0}
            return FALLBACK_LABEL_WEIGHT, record
        # A segment reads at most its steps' batches of each stream: the candidates walk
        # on that many of the other examples (their reference outputs cost no more).
        segment = self.segments[:1] or [self.total_steps]
        visited = max(segment[0] * self.walk.batch_size, self.diversity.examples)
        if len(fit_rows) > visited:
            rng = np.random.default_rng(self.walk.seed)
            fit_rows = np.sort(rng.permutation(fit_rows)[:visited])
        x_fit, y_fit = data_adapter.take(x, fit_rows), y[fit_rows]
        x_held, y_held = data_adapter.take(x, held_rows), y[held_rows]
        losses, accuracies, passes = {}, {}, [0]

        def score(label_weight):
            (member,), history = self.walk_members(
                copy_model(model), x_fit, y_fit, label_weight, segment
            )
            probabilities = _predict([member], x_held, PREDICT_BATCH, self.kind)
            true = probabilities[np.arange(len(y_held)), y_held]
            losses[label_weight] = float(-np.mean(np.log(np.maximum(true, 1e-12))))
            accuracies[label_weight] = float(np.mean(np.argmax(probabilities, -1) == y_held))
            passes[0] += history["train_examples"] + len(held_rows)
            return -losses[label_weight]

        chosen, _ = tuning.grid_search(
            score, LABEL_WEIGHTS, low=LABEL_WEIGHTS[0], high=LABEL_WEIGHTS[-1], prefer="smaller"
        )
        record = {
            "validation_examples": int(len(held_rows)),
            "validation_cross_entropy": losses,
            "validation_accuracy": accuracies,
            "train_examples": int(passes[0]),
        }
        return float(chosen), record


@keras.saving.register_keras_serializable(package="keras_fip")
class Ensemble(WalkingOperation):
    """Samples networks along a functionally invariant path and serves them as one model.

    From the model, one FIP is walked on `data` and a copy of the network is taken as a
    member at the end of each of `num_members` segments of the walk (the walk's budget
    shared evenly between them), or as soon as the walk has covered `spacing` in the
    output metric since the previous member. They are returned as ONE functional
    `keras.Model`: one input → the members (nested models `member_0`, `member_1`, ...) →
    their combination (`keras_fip.operations.ensemble.build_ensemble`). With the default
    `combine="mean_probabilities"` the ensemble returns probabilities p̄ = (1/K) Σ_k p_k:
    a model ending in a softmax has its members' probabilities averaged as they are, a
    model returning logits has a softmax of each member's logits averaged (use
    `from_logits=False` losses with it, or `keras_fip.robustness.logit_model(ensemble)`
    for log p̄). `combine="mean_logits"` returns the mean of the members' logits (or
    log-probabilities). `keras_fip.ensemble_members(ensemble)` returns the members, each
    returning what the model returns. The ensemble saves as `.keras` (and re-loads
    combining the same way) and exports with `keras_fip.export`; masks the input carries
    stay on every member.

    The walk keeps the outputs on `data` (the distance D of the `keras_fip.Walk`, read
    through the network's logits: the log-probabilities of a model returning
    probabilities) while its objective pulls

        L(w) = −⟨u, w⟩ + τ·CE(y, f(x; w)) + λ·L_div(w):

    - the labels' term τ·CE on labelled batches of `data=(x, y)`, so the walk stays on
      the FIP of the task, not only of the start's outputs. With `labels="auto"`, τ is
      chosen on a split held out of `data`: each τ of `LABEL_WEIGHTS` (1, 10, 100;
      `keras_fip.core.tuning.grid_search` within those ends) walks the
      first member's segment from the start on `data` less a stratified, seeded fifth of
      it (at most `SELECTION_MAX_EXAMPLES` examples), and the lowest cross-entropy on
      that fifth wins (`FALLBACK_LABEL_WEIGHT` with fewer than `SELECTION_MIN_EXAMPLES`
      held out); `op.history["labels_selection"]` records the scores;
    - the diversity term λ·L_div (`keras_fip.operations.ensemble.Diversity`): by
      default, for one floating-point input, each member is trained to be right (about
      the labels, or about the members so far without labels) on inputs attacked (FGSM,
      radius 0.3 of the inputs' range) against the members so far;
    - the push −⟨u, w⟩ for a random unit direction u, which the walk follows along the
      directions the outputs on `data` do not see: by default only where there is no
      diversity term (inputs that cannot be attacked, e.g. token ids).

    BatchNorm networks are walked on batch statistics (the walk's `training="auto"`), and
    the start's moving statistics are first re-estimated on `data`, as every member's are
    after its segment, so the reference outputs are a function the members can keep.
    The paper's walk is `labels=False, diversity=Diversity(weight=0), push="random"` with
    `walk=keras_fip.Walk(rule=keras_fip.rules.Metric(epsilon=0.05))`.

    The walk's defaults here: `MEMBER_STEPS` (100) steps per member the walk takes; the
    `Penalty` rule with its rate (`"auto"`: `keras_fip.engine.rules.auto_learning_rate`)
    decayed by the same cosine in every segment (`SegmentCosine`), so each member is
    taken where the walk has settled; the distance `DISTANCE` (`"l2"`, the
    squared distance of the logits) and β = `BETA` (1), which keep the members' function
    under the diversity term; `beta="auto"` is `keras_fip.engine.beta.auto_beta` with
    strength `STRENGTH` (1) for a cross-entropy (β = 1 for the KL distance); the rest as
    every walk's (`keras_fip.engine.walk.DEFAULTS`). The walk does not checkpoint.

    Compute: `op.history["train_examples"]` counts example passes (one forward and
    backward pass of one example, the unit of epochs × examples; a forward pass alone
    counts as a whole one): the start's BatchNorm re-estimation and reference outputs,
    the choice of τ (its walks, counted the same way, and the held-out evaluations), per
    step the anchor batch (× (1 + `cg_iterations`) for the `Metric` rule, + 1 with
    `spacing`), the labelled and diversity batches and, with adversary `"ensemble"`, the
    per-step attack (attack steps × (1 + members attacked) per diversity example), and
    per member the attack of adversary `"members"` (examples × members attacked × attack
    steps) and BatchNorm re-estimation. `op.history["walk_examples"]` counts the
    examples entering the steps of the final walk; `op.history` also records τ
    (`"labels"`), λ (`"diversity"`), ρ (`"radius"`), `"push"`, `"beta"`,
    `"learning_rate"`, `"outputs"` and `"member_steps"` of the last call.

    Args:
        num_members: K, the number of members (a positive integer).
        data: Inputs whose outputs are kept: an array, an `(x, y)` tuple (labels for the
            labels' term and the diversity targets) or a finite `tf.data.Dataset`.
            Defaults to `None` (the inputs the model carries from an earlier operation).
        labels: τ, the weight of the labels' cross-entropy (ignored when `data` has no
            labels), `False` (inputs only), or `"auto"`: chosen on a held-out split.
            Defaults to `"auto"`.
        diversity: A `keras_fip.operations.ensemble.Diversity` (its config is accepted).
            Defaults to `None` (`Diversity()`: λ = 1 for one floating-point input, else no
            term).
        push: `"random"`, `"random_per_member"` (a new u for each member), `"none"`, or
            `"auto"`: `"none"` with a diversity term, else `"random"`. Defaults to
            `"auto"`.
        combine: `"mean_probabilities"` (the ensemble returns p̄) or `"mean_logits"`.
            Defaults to `"mean_probabilities"`.
        include_start: Whether the starting network is the first member (then K − 1
            members come from the walk). Defaults to `False`.
        spacing: `None` (a member at the end of each segment of the walk), or the length
            in the output metric, Σ sqrt(Δwᵀ g Δw) on the anchor batches, after which the
            walk takes a member (each segment's steps are then the most it walks).
            Defaults to `None`.
        walk: A `keras_fip.Walk` (budget, rule, batch size, distance, β, recording, seed,
            ...). Defaults to `None`.
        name: The operation's name. Defaults to `None`.

    Returns (when called):
        A functional `keras.Model` returning the combination of its K members
        (probabilities by default).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> walk = keras_fip.Walk(steps=6, seed=0, verbose=0)
        >>> op = keras_fip.Ensemble(3, data=x, walk=walk)
        >>> ensemble = op(model)
        >>> ensemble.output_shape
        (None, 10)
        >>> op.history["member_steps"]
        [2, 4, 6]
        >>> [m.name for m in keras_fip.ensemble_members(ensemble)]
        ['member_0', 'member_1', 'member_2']
    """

    DEFAULT_BUDGET = {"steps": MEMBER_STEPS}

    def __init__(
        self,
        num_members,
        *,
        data=None,
        labels="auto",
        diversity=None,
        push="auto",
        combine="mean_probabilities",
        include_start=False,
        spacing=None,
        walk=None,
        name=None,
    ):
        super().__init__(walk=walk, name=name)
        self.num_members = self.check_number(
            num_members, "num_members", low=1, low_inclusive=True, integer=True
        )
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        if labels is False:
            labels = 0.0
        elif isinstance(labels, str) and labels == "auto":
            pass
        elif isinstance(labels, (str, bool)) or labels is None:
            raise ValueError(
                f"`labels` must be 'auto', False or a non-negative number. Received: "
                f"labels={labels!r}"
            )
        else:
            labels = self.check_number(labels, "labels", low=0.0, low_inclusive=True)
        self.labels = labels
        self.diversity = ensemble_diversity.get(diversity)
        self.push = self.check_choice(push, "push", ("auto",) + PUSHES)
        self.combine = self.check_choice(combine, "combine", SAVED_COMBINES)
        if not isinstance(include_start, (bool, np.bool_)):
            raise ValueError(
                f"`include_start` must be True or False. Received: include_start={include_start!r}"
            )
        self.include_start = bool(include_start)
        if spacing is not None:
            spacing = self.check_number(spacing, "spacing", low=0.0)
        self.spacing = spacing
        if self.push == "none" and self.diversity.weight == 0 and self.labels == 0:
            raise ValueError(
                "`push='none'` with no diversity term and `labels=False` leaves the walk "
                "no driver (L = 0: every member is the start). Use push='random', a "
                "diversity weight > 0, or labels with labelled data. "
                f"Received: push={push!r}, diversity={self.diversity!r}, labels={labels!r}"
            )
        if self.walk.checkpoint_directory is not None:
            raise ValueError(
                "`Ensemble` does not checkpoint its walk: pass a walk without "
                "`checkpoint_directory`. Received: "
                f"checkpoint_directory={self.walk.checkpoint_directory!r}"
            )

    def resolved_walk(self, **defaults):
        segments = max(self.num_members - self.include_start, 1)
        defaults = {
            "steps": MEMBER_STEPS * segments,
            "distance": DISTANCE,
            "beta": BETA,
            **defaults,
        }
        return super().resolved_walk(**defaults)

    def _prepare(self, model):
        """`(x, y, settings)`: `data` as arrays (integer labels or `None`) and what they
        decide (the inputs' range, λ, the push, the walk's steps and segments); raises a
        `ValueError` for data the operation cannot walk on."""
        x, y = normalize_data(self.resolve_data(self.data, model), name="data", model=model)
        check_inputs_match_model(model, x, name="data")
        several = data_adapter.is_structured(x)
        if several or np.issubdtype(np.asarray(x).dtype, np.floating):
            x = data_adapter.float32_inputs(x)
        else:
            x = np.asarray(x)
        count = data_adapter.num_examples(x)
        if y is not None:
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[-1] > 1:
                y = np.argmax(y, -1)
            y = y.reshape(count).astype("int64")
        low = high = None  # The attacks' bounds (one input of floats only).
        if not several:
            low, high = float(np.min(x)), float(np.max(x))
        # The attacked inputs of the diversity term are one array of floats.
        continuous = not several and np.issubdtype(x.dtype, np.floating)
        weight = self.diversity.resolve_weight(continuous)
        if weight > 0 and not continuous:
            raise ValueError(
                "A diversity weight > 0 trains each member on inputs attacked against the "
                "ensemble (an L∞ perturbation), which needs one floating-point input. "
                f"Received: diversity={self.diversity!r} with "
                + ("several inputs" if several else f"{x.dtype} inputs (e.g. token ids)")
                + "; use Diversity(weight=0) or weight='auto'"
            )
        push = self.push
        if push == "auto":
            push = "none" if weight > 0 else "random"
        if push == "none" and weight == 0 and (y is None or self.labels == 0):
            raise ValueError(
                "`push='none'` with no diversity term needs labelled `data=(x, y)` for the "
                "labels' term: with inputs alone the walk has no driver (every member is "
                f"the start). Received: data without labels, push={push!r}, "
                f"diversity={self.diversity!r}"
            )
        walk = self.resolved_walk()
        segments = self.num_members - self.include_start
        total_steps = walk.num_steps(count) if segments else 0
        if total_steps < segments:
            raise ValueError(
                f"The walk's budget must give each of the {segments} members it takes at "
                f"least one step. Received: {total_steps} steps (walk={self.walk!r}) for "
                f"num_members={self.num_members}, include_start={self.include_start}"
            )
        settings = {
            "low": low,
            "high": high,
            "weight": weight,
            "push": push,
            "total_steps": total_steps,
            "segments": _segment_steps(total_steps, segments) if segments else [],
        }
        return x, y, settings

    def validate(self, model):
        x, _, _ = self._prepare(model)
        fip_dataset(model, x, batch_size=self.resolved_walk().batch_size, reference="local")

    def call(self, model):
        walk = self.resolved_walk()
        x, y, settings = self._prepare(model)
        several = data_adapter.is_structured(x)
        input_shape = None if several else (model_example_shape(model) or tuple(x.shape[1:]))
        train_examples = 0

        # The start: BatchNorm statistics re-estimated on `data`, as the members' are.
        normalized = bool(normalization.batch_normalization_layers(model))
        training = normalized if walk.training == "auto" else bool(walk.training)
        if training and normalized:
            normalization.recalibrate_batch_normalization(model, x, 2 * walk.batch_size)
            train_examples += data_adapter.num_examples(x)
        run = _Run(self, model, walk, x, y, settings)

        # The labels' weight, chosen on a split held out of `data`.
        selection = None
        if y is None or self.labels == 0 or not run.segments:
            label_weight = 0.0
        elif self.labels == "auto":
            label_weight, selection = run.choose_label_weight(model, x, y)
            train_examples += selection["train_examples"]
        else:
            label_weight = float(self.labels)

        # Walk on all of `data`.
        self.path = self.open_path(model, walk)
        members, history = run.walk_members(
            model,
            x,
            y,
            label_weight,
            run.segments,
            path=self.path,
            include_start=self.include_start,
        )
        ensemble = build_ensemble(
            members,
            self.combine,
            input_shape,
            name=f"{model.name}_ensemble",
            outputs=run.kind,
        )
        history["train_examples"] += train_examples
        history.update(
            labels=label_weight,
            diversity=run.weight,
            radius=run.radius,
            push=run.push,
            beta=run.beta,
            learning_rate=run.learning_rate,
            outputs=run.kind,
        )
        if selection is not None:
            history["labels_selection"] = selection
        self.history = history
        return ensemble

    def get_config(self):
        return {
            **super().get_config(),
            "num_members": self.num_members,
            "data": None,  # Data are not serialised; pass them again after from_config.
            "labels": self.labels,
            "diversity": keras.saving.serialize_keras_object(self.diversity),
            "push": self.push,
            "combine": self.combine,
            "include_start": self.include_start,
            "spacing": self.spacing,
        }
