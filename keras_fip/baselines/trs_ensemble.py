"""A diversity-promoting ensemble: TRS, gradient misalignment and smoothness (Yang et al., 2021).

Transferability Reduced Smooth (TRS) ensembles train K networks together so that an
adversarial input found on one transfers poorly to the others: the members' input gradients
are pushed apart (low cosine similarity) while each member's loss surface is kept smooth
(small input-gradient norms) around the data and around inputs where it is steep.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_fip.baselines.adversarial_training import training_settings
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.adversarial import signed_gradient_ascent
from keras_fip.operations.ensemble_model import SAVED_COMBINES
from keras_fip.operations.ensemble_model import build_ensemble

# PGD's step size on the smoothness inputs: 2.5·ε/steps (as the other baselines' PGD).
STEP_FACTOR = 2.5
# Example passes per member, example and step besides the attack's: the input gradients
# at x and at x̂ (one pass each) and the update's backward through each of them (a gradient
# through an input gradient counts two passes).
PASSES_PER_MEMBER = 6
# PGD steps of the smoothness inputs.
ATTACK_STEPS = 3


def _input_gradients(network, kind, inputs, labels, training):
    """Per-example ∇ₓ CE(y, f(x)) (flattened; the graph kept for a second derivative)."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        logits = outputs_lib.as_logits(network(inputs, training=training), kind)
        loss = tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        )
    gradient = tape.gradient(loss, inputs)
    return tf.reshape(gradient, (tf.shape(inputs)[0], -1)), loss


def mean_pairwise_cosine(gradients):
    """The mean over member pairs and examples of cos(∇ₓℓ_i, ∇ₓℓ_j), gradients `(n, d)`.

    Args:
        gradients: A list of K ≥ 2 tensors of per-example input gradients, each `(n, d)`.

    Returns:
        A scalar tensor in [−1, 1].

    Examples:

        >>> a = tf.constant([[1.0, 0.0], [0.0, 1.0]])
        >>> b = tf.constant([[1.0, 0.0], [0.0, -1.0]])
        >>> float(mean_pairwise_cosine([a, b]))
        0.0
    """
    normalized = [tf.math.l2_normalize(g, axis=-1, epsilon=1e-12) for g in gradients]
    values = [
        tf.reduce_mean(tf.reduce_sum(normalized[i] * normalized[j], -1))
        for i in range(len(gradients))
        for j in range(i + 1, len(gradients))
    ]
    return tf.add_n(values) / len(values)


def _smooth_inputs(members, kinds, inputs, labels, epsilon, steps, clip_values):
    """PGD (random start) that raises Σ_k ‖∇ₓℓ_k‖₂: inputs where the members are steep."""
    low, high = clip_values
    step_size = STEP_FACTOR * epsilon / steps
    noise = tf.random.uniform(tf.shape(inputs), -1.0, 1.0) * epsilon
    start = tf.clip_by_value(inputs + noise, low, high)

    def steepness(adversarial):
        total = 0.0
        for member, kind in zip(members, kinds):
            gradient, _ = _input_gradients(member, kind, adversarial, labels, False)
            total += tf.reduce_sum(tf.norm(gradient, axis=-1))
        return total

    return signed_gradient_ascent(steepness, inputs, start, epsilon, step_size, steps, clip_values)


def trs_ensemble(
    model,
    x,
    y,
    *,
    num_members=3,
    alignment=2.0,
    smoothness=0.5,
    epsilon=0.2,
    initial_epsilon=0.1,
    attack_steps=ATTACK_STEPS,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    clip_values=(0.0, 1.0),
    seed=0,
    combine="mean_probabilities",
):
    """A TRS ensemble (Yang et al., 2021): K networks trained together on misaligned gradients.

    K networks of `model`'s architecture (new weights from seeds `seed`, …, `seed + K − 1`)
    are trained jointly with Adam (cosine-decayed rate) on

        L = Σ_k CE_k(x) + α·mean_{i<j} cos(∇ₓCE_i(x), ∇ₓCE_j(x)) + λ·(1/K) Σ_k mean ‖∇ₓCE_k(x̂)‖₂,

    per-example input gradients of the cross-entropy of the true label: the first term
    fits the data, the second (α = `alignment`) misaligns the members' gradients so that an
    attack on one member transfers poorly to the others, the third (λ = `smoothness`)
    keeps each member's loss flat. x̂ is the batch with its second half replaced by L∞ PGD
    inputs (radius rising linearly from `initial_epsilon` to `epsilon` over the epochs,
    `attack_steps` steps from a random start) that raise the members' summed gradient
    norms: the smoothness is enforced where it is most violated (the authors' `plus_adv`
    variant). The gradients are per example (not of a batch mean), so α and λ keep one
    meaning across batch sizes.

    Compute counts example passes as the other baselines do: per example, step and member
    `PASSES_PER_MEMBER` (6: the input gradients at x and x̂, one pass each, and the
    update's backward through each, two passes each) plus `attack_steps` (the PGD on half
    the batch, each step a gradient through an input gradient).

    Args:
        model: A `keras.Model` returning logits or probabilities: the architecture (its
            weights are not used or changed).
        x: Training inputs (one numpy array, values in `clip_values`).
        y: Integer training labels.
        num_members: K (at least 2). Defaults to `3`.
        alignment: α, the weight of the members' mean gradient cosine. Defaults to `2.0`.
        smoothness: λ, the weight of the members' mean gradient norm (per-example gradients:
            the authors' 2 on batch-mean gradients costs clean accuracy here). Defaults to
            `0.5`.
        epsilon: The final L∞ radius of the smoothness inputs. Defaults to `0.2`.
        initial_epsilon: Their radius in the first epoch. Defaults to `0.1`.
        attack_steps: PGD steps of the smoothness inputs. Defaults to `3`.
        epochs: Passes over `(x, y)`. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Adam's initial learning rate. Defaults to `1e-3`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        seed: Seed of the first member, the shuffles and the random starts. Defaults to `0`.
        combine: `"mean_probabilities"` or `"mean_logits"` (`build_ensemble`). Defaults
            to `"mean_probabilities"`.

    Returns:
        A tuple `(ensemble, info)`: a keras_fip ensemble model and a dict with
        `"train_examples"` (K·epochs·N·(`PASSES_PER_MEMBER` + `attack_steps`)), the
        settings, and the members' last-epoch mean gradient cosine
        (`"gradient_cosine"`).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> ensemble, info = trs_ensemble(model, x, y, num_members=2, attack_steps=1, epochs=1)
        >>> info["train_examples"] == 2 * len(x) * (6 + 1), ensemble.output_shape
        (True, (None, 10))
    """
    if (
        not isinstance(num_members, (int, np.integer))
        or isinstance(num_members, bool)
        or num_members < 2
    ):
        raise ValueError(
            "`num_members` must be an integer ≥ 2 (the gradients of pairs of members are "
            f"compared). Received: num_members={num_members!r}"
        )
    for name, value in (("alignment", alignment), ("smoothness", smoothness)):
        if not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
            raise ValueError(f"`{name}` must be a number ≥ 0. Received: {name}={value!r}")
    if (
        not isinstance(initial_epsilon, (int, float, np.integer, np.floating))
        or not 0 < initial_epsilon
    ):
        raise ValueError(
            f"`initial_epsilon` must be a positive number. Received: "
            f"initial_epsilon={initial_epsilon!r}"
        )
    number = (int, float, np.integer, np.floating)
    if not isinstance(learning_rate, number) or not learning_rate > 0:
        raise ValueError(
            f"`learning_rate` must be a positive number. Received: learning_rate={learning_rate!r}"
        )
    if combine not in SAVED_COMBINES:
        raise ValueError(
            f"`combine` must be one of {list(SAVED_COMBINES)}. Received: combine={combine!r}"
        )
    _, attack = training_settings(
        model,
        x,
        y,
        epsilon,
        attack_steps,
        epochs,
        batch_size,
        learning_rate,
        None,
        0.0,
        clip_values,
        STEP_FACTOR,
    )
    x = np.asarray(x, "float32")
    y = np.asarray(y).astype("int64")
    kind = outputs_lib.output_kind(model, x[:64])
    members = []
    for k in range(num_members):
        keras.utils.set_random_seed(int(seed) + k)
        members.append(keras.models.clone_model(model))
    kinds = [kind] * num_members
    count, epochs, batch_size = len(x), int(epochs), int(batch_size)
    steps_per_epoch = math.ceil(count / batch_size)
    optimizer = keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(float(learning_rate), epochs * steps_per_epoch)
    )
    variables = [v for member in members for v in member.trainable_variables]
    weights = (float(alignment), float(smoothness))
    tf.random.set_seed(int(seed))

    @tf.function(reduce_retracing=True)
    def train_step(inputs, labels, radius):
        # The smoothness inputs: half the batch clean, half where the members are steep.
        half = tf.shape(inputs)[0] // 2
        steep = _smooth_inputs(
            members, kinds, inputs[half:], labels[half:], radius, int(attack_steps), clip_values
        )
        smooth_inputs = tf.concat([inputs[:half], steep], 0)
        count = tf.cast(tf.shape(inputs)[0], "float32")
        with tf.GradientTape() as tape:
            gradients, fit = [], 0.0
            for member in members:
                gradient, loss = _input_gradients(member, kind, inputs, labels, True)
                gradients.append(gradient)
                fit += loss / count
            cosine = mean_pairwise_cosine(gradients)
            norms = 0.0
            for member in members:
                gradient, _ = _input_gradients(member, kind, smooth_inputs, labels, True)
                norms += tf.reduce_mean(tf.norm(gradient, axis=-1))
            norms = norms / len(members)
            total = fit + weights[0] * cosine + weights[1] * norms
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return cosine, norms

    rng = np.random.default_rng(seed)
    final_epsilon = float(epsilon)
    cosines = []
    for epoch in range(epochs):
        # The smoothness radius rises linearly over the epochs (the authors' schedule).
        fraction = epoch / max(epochs - 1, 1)
        radius = float(initial_epsilon) + (final_epsilon - float(initial_epsilon)) * fraction
        order = rng.permutation(count)
        cosines = []
        for start in range(0, count, batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:
                continue
            cosine, _ = train_step(
                tf.constant(x[rows]), tf.constant(y[rows]), tf.constant(radius, "float32")
            )
            cosines.append(float(cosine))
    ensemble = build_ensemble(
        members,
        combine,
        tuple(model.inputs[0].shape[1:]),
        name=f"{model.name}_trs_ensemble",
        outputs=kind,
    )
    info = {
        "method": "trs_ensemble",
        "train_examples": int(
            num_members * epochs * count * (PASSES_PER_MEMBER + int(attack_steps))
        ),
        "epochs": int(num_members * epochs),
        "num_members": int(num_members),
        "learning_rate": float(learning_rate),
        "alignment": weights[0],
        "smoothness": weights[1],
        "epsilon": final_epsilon,
        "initial_epsilon": float(initial_epsilon),
        "attack_steps": int(attack_steps),
        "step_size": attack[1],
        "gradient_cosine": float(np.mean(cosines)) if cosines else None,
    }
    return ensemble, info
