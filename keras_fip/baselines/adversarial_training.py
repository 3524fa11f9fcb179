"""Adversarial-training baselines: PGD-AT (single network, deep ensemble) and fast FGSM-AT.

- `pgd_adversarial_training`: Madry et al. (2018). Each step trains on L∞ PGD examples
  (a random start in the ε-ball, `attack_steps` signed-gradient steps projected back) in
  place of the clean batch.
- `pgd_adversarial_ensemble`: K PGD-AT networks from K initialisations, combined as
  `keras_fip.baselines.deep_ensemble` combines its members.
- `fgsm_adversarial_training`: Wong et al. (2020), "Fast is better than free": one signed
  gradient step of α = 1.25·ε from a uniform random start in the ε-ball.

Each returns the trained model and an `info` dict whose `"train_examples"` counts example
passes the way `keras_fip.Ensemble` counts them: every forward and backward pass, the
attacks' included (an example costs `attack_steps + 1` passes per epoch under PGD-AT and
2 under FGSM-AT), plus the learning-rate search and its validation attacks when a grid of
learning rates is given. The networks start from new weights drawn from `model`'s
initialisers; `model` itself is not used or changed.

The adversarial examples are made here with `tf.GradientTape` inside one `tf.function`
training step: ART's attacks run a numpy loop with a host round-trip per iteration,
far slower inside a training loop. The attacks are run in inference mode
(`training=False`), the network's update in training mode.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib
from keras_fip.core import tuning
from keras_fip.core.adversarial import signed_gradient_ascent
from keras_fip.operations.ensemble_model import SAVED_COMBINES
from keras_fip.operations.ensemble_model import build_ensemble

# The learning rates tried with `learning_rate="auto"` (Adam, cosine-decayed; the grid
# extends past an edge that wins, `keras_fip.core.tuning.grid_search`).
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
# The share of the training data held out to choose the learning rate on.
VALIDATION_FRACTION = 0.1
# PGD's step size when none is given: 2.5·ε/steps (Madry et al.); FGSM's: 1.25·ε (Wong et al.).
PGD_STEP_FACTOR = 2.5
FGSM_STEP_FACTOR = 1.25


def perturb(network, kind, x, y, epsilon, step_size, steps, seed_generator, clip_values):
    """L∞ PGD from a uniform random start: `steps` signed-gradient steps projected on the ball.

    x' = clip(x + δ₀), δ₀ ~ U[−ε, ε]; then `steps` times x' ← Π(x' + α·sign(∇ₓ' ℓ)),
    Π the projection on {‖x' − x‖∞ ≤ ε} ∩ [min, max], ℓ the cross-entropy of the true
    label. One step with α = 1.25·ε is the FGSM of fast adversarial training.

    Args:
        network: A `keras.Model`.
        kind: What `network` returns: `"logits"` or `"probabilities"`.
        x: A batch of inputs (tensor).
        y: Integer labels (tensor).
        epsilon: ε.
        step_size: α.
        steps: The number of steps (a Python integer).
        seed_generator: A `keras.random.SeedGenerator` for the random start.
        clip_values: `(min, max)` of valid inputs.

    Returns:
        The adversarial batch (no gradient flows through it).

    Examples:

        >>> network = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.full((2, 4), 0.5, "float32")
        >>> adversarial = perturb(network, "logits", x, np.array([0, 1]), 0.1, 0.05, 3,
        ...                       keras.random.SeedGenerator(0), (0.0, 1.0))
        >>> bool(np.max(np.abs(adversarial - x)) <= 0.1 + 1e-6)
        True
    """
    low, high = clip_values
    x = tf.convert_to_tensor(x)
    noise = epsilon * keras.random.uniform(tf.shape(x), -1.0, 1.0, seed=seed_generator)
    start = tf.clip_by_value(x + noise, low, high)

    def loss(adversarial):
        logits = outputs_lib.as_logits(network(adversarial, training=False), kind)
        return tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )

    return signed_gradient_ascent(loss, x, start, epsilon, step_size, steps, clip_values)


def _fresh_copy(model, seed):
    """`model`'s architecture with new weights drawn from its initialisers."""
    keras.utils.set_random_seed(seed)
    return keras.models.clone_model(model)


def _adversarial_fit(network, kind, x, y, attack, epochs, batch_size, learning_rate, seed):
    """Trains `network` in place on `attack`'s examples; returns the example passes."""
    epsilon, step_size, steps, clip_values, warmup = attack
    count = data_adapter.num_examples(x)
    steps_per_epoch = math.ceil(count / batch_size)
    warmup_steps = warmup * epochs * steps_per_epoch
    optimizer = keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps_per_epoch)
    )
    generator = keras.random.SeedGenerator(seed)

    @tf.function(reduce_retracing=True)
    def train_step(inputs, labels, scale):
        # Attack (ε and α scaled during the warm-up), then train on the adversarial batch.
        adversarial = perturb(
            network,
            kind,
            inputs,
            labels,
            scale * epsilon,
            scale * step_size,
            steps,
            generator,
            clip_values,
        )
        with tf.GradientTape() as tape:
            logits = outputs_lib.as_logits(network(adversarial, training=True), kind)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
        variables = network.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng(seed)
    iteration = 0
    for _ in range(epochs):
        order = rng.permutation(count)
        for start in range(0, count, batch_size):
            rows = order[start : start + batch_size]
            iteration += 1
            scale = min(1.0, iteration / warmup_steps) if warmup_steps > 0 else 1.0
            train_step(tf.constant(x[rows]), tf.constant(y[rows]), tf.constant(scale, "float32"))
    return int(epochs * count * (steps + 1))


def _robust_accuracy(network, kind, x, y, attack, seed, batch_size=256):
    """Accuracy on `attack`'s examples (the validation score) and its example passes."""
    epsilon, step_size, steps, clip_values, _ = attack
    generator = keras.random.SeedGenerator(seed)
    correct = 0
    for start in range(0, len(x), batch_size):
        inputs, labels = x[start : start + batch_size], y[start : start + batch_size]
        adversarial = perturb(
            network, kind, inputs, labels, epsilon, step_size, steps, generator, clip_values
        )
        outputs = keras.ops.convert_to_numpy(network(adversarial, training=False))
        correct += int(np.sum(np.argmax(outputs, -1) == labels))
    return correct / len(x), int(len(x) * (steps + 1))


def training_settings(
    model,
    x,
    y,
    epsilon,
    steps,
    epochs,
    batch_size,
    learning_rate,
    step_size,
    warmup,
    clip_values,
    step_factor,
):
    """Checks an adversarial-training baseline's arguments; returns its rates and attack.

    Every check raises a `ValueError` naming the argument before any work. The attack's
    step is `step_factor`·ε/`steps` unless `step_size` is given.

    Args:
        model: The architecture (a `keras.Model`).
        x: Training inputs (one array).
        y: Integer labels, one per example of `x`.
        epsilon: ε (> 0).
        steps: Attack steps (a positive integer).
        epochs: Passes over the data (a positive integer).
        batch_size: Examples per step (a positive integer).
        learning_rate: A positive number, a list of them, or `"auto"` (`LEARNING_RATES`).
        step_size: The attack's step α, or `None`.
        warmup: The fraction in [0, 1] of the steps over which ε rises from 0.
        clip_values: `(min, max)` of valid inputs.
        step_factor: α = `step_factor`·ε/`steps` when `step_size` is `None`.

    Returns:
        A tuple `(rates, attack)`: the learning rates to try (floats) and
        `(epsilon, step, steps, clip_values, warmup)`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> x, y = np.zeros((3, 4), "float32"), np.array([0, 1, 0])
        >>> training_settings(model, x, y, 0.3, 10, 1, 8, 1e-3, None, 0.0, (0.0, 1.0), 2.5)
        ([0.001], (0.3, 0.075, 10, (0.0, 1.0), 0.0))
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if isinstance(x, (dict, list, tuple)) or not hasattr(x, "shape"):
        raise ValueError(
            "`x` must be one numpy array of inputs (the attack perturbs a single input "
            f"tensor). Received: x={type(x).__name__}"
        )
    labels = np.asarray(y)
    if labels.ndim != 1 or len(labels) != len(x) or not len(labels):
        raise ValueError(
            "`y` must be integer labels, one per example of `x`. Received: y of shape "
            f"{labels.shape} for {len(x)} inputs"
        )
    if not isinstance(epsilon, (int, float, np.integer, np.floating)) or not epsilon > 0:
        raise ValueError(f"`epsilon` must be a positive number. Received: epsilon={epsilon!r}")
    if step_size is not None and (
        not isinstance(step_size, (int, float, np.integer, np.floating)) or not step_size > 0
    ):
        raise ValueError(
            f"`step_size` must be a positive number or `None`. Received: step_size={step_size!r}"
        )
    if not isinstance(warmup, (int, float, np.integer, np.floating)) or not 0 <= warmup <= 1:
        raise ValueError(
            f"`epsilon_warmup` must be a fraction in [0, 1]. Received: epsilon_warmup={warmup!r}"
        )
    for name, value in (("attack_steps", steps), ("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    rates = LEARNING_RATES if isinstance(learning_rate, str) else np.atleast_1d(learning_rate)
    if (isinstance(learning_rate, str) and learning_rate != "auto") or not all(
        isinstance(r, (int, float, np.integer, np.floating)) and r > 0 for r in rates
    ):
        raise ValueError(
            "`learning_rate` must be a positive number, a list of them (chosen on a "
            f"validation split) or 'auto'. Received: learning_rate={learning_rate!r}"
        )
    step = step_factor * epsilon / steps if step_size is None else step_size
    attack = (float(epsilon), float(step), int(steps), tuple(clip_values), float(warmup))
    return [float(r) for r in rates], attack


def _train(model, x, y, attack, epochs, batch_size, learning_rate, seed, num_members, name):
    """Chooses the learning rate (if several), trains the members; `(members, info)`."""
    x = np.asarray(x, "float32")
    y = np.asarray(y).astype("int64")
    kind = outputs_lib.output_kind(model, x[:64])
    rates = learning_rate
    selection_examples, scores = 0, {}
    if len(rates) > 1:
        fit_rows, held_rows = tuning.validation_rows(y, VALIDATION_FRACTION, seed)

        def score(rate):
            nonlocal selection_examples
            network = _fresh_copy(model, seed)
            selection_examples += _adversarial_fit(
                network, kind, x[fit_rows], y[fit_rows], attack, epochs, batch_size, rate, seed
            )
            value, passes = _robust_accuracy(
                network, kind, x[held_rows], y[held_rows], attack, seed
            )
            selection_examples += passes
            return value

        chosen, scores = tuning.grid_search(score, rates, prefer="larger")
    else:
        chosen = rates[0]
    members, train_examples = [], selection_examples
    for k in range(num_members):
        network = _fresh_copy(model, seed + k)
        train_examples += _adversarial_fit(
            network, kind, x, y, attack, epochs, batch_size, chosen, seed + k
        )
        members.append(network)
    epsilon, step_size, steps, _, warmup = attack
    info = {
        "method": name,
        "train_examples": int(train_examples),
        "selection_examples": int(selection_examples),
        "epochs": int(num_members * epochs),
        "num_members": int(num_members),
        "learning_rate": float(chosen),
        "validation_robust_accuracy": {float(k): v for k, v in scores.items()},
        "epsilon": float(epsilon),
        "step_size": float(step_size),
        "attack_steps": int(steps),
        "epsilon_warmup": float(warmup),
    }
    return members, kind, info


def pgd_adversarial_training(
    model,
    x,
    y,
    *,
    epsilon=0.3,
    attack_steps=10,
    step_size=None,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    epsilon_warmup=0.0,
    clip_values=(0.0, 1.0),
    seed=0,
):
    """PGD adversarial training (Madry et al., 2018) of a network of `model`'s architecture.

    Every step replaces the batch by L∞ PGD examples against the current network (a
    random start in the ε-ball, `attack_steps` steps of size α, `perturb`) and takes an
    Adam step on their cross-entropy; the learning rate decays to zero with a cosine
    (the recipe `keras_fip.models.train_classifier` uses). Madry et al. train MNIST at
    ε = 0.3 with 40 steps of 0.01; fewer steps with α = 2.5·ε/steps cost less and keep
    most of the robustness. Given several learning rates, the one whose network is most
    robust (the same PGD) on a stratified `VALIDATION_FRACTION` of `(x, y)` is chosen
    (`keras_fip.core.tuning.grid_search`) and the network is then trained on all of it.

    Args:
        model: A `keras.Model` returning logits or probabilities: the architecture (its
            weights are not used or changed).
        x: Training inputs (one numpy array, values in `clip_values`).
        y: Integer training labels.
        epsilon: ε, the L∞ radius trained against. Defaults to `0.3`.
        attack_steps: PGD steps per batch. Defaults to `10`.
        step_size: α, or `None` for 2.5·ε/`attack_steps`. Defaults to `None`.
        epochs: Passes over `(x, y)`. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: The initial Adam learning rate, a list of them to choose from on
            a validation split, or `"auto"` (`LEARNING_RATES`). Defaults to `1e-3`.
        epsilon_warmup: The fraction of the training steps over which ε (and α with it)
            rises linearly from 0 to `epsilon`; 0 trains at ε from the first step (Madry
            et al.). Short budgets at a large ε (MNIST at 0.3 for a few epochs) need a
            warm-up, or the network can settle on a constant output. Defaults to `0.0`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        seed: Initialisation, shuffle and random-start seed. Defaults to `0`.

    Returns:
        A tuple `(network, info)`; `info["train_examples"]` counts every forward and
        backward pass (epochs·N·(attack_steps + 1), plus the learning-rate search,
        `"selection_examples"`), with the chosen `"learning_rate"` and the attack's
        settings.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> network, info = pgd_adversarial_training(model, x, y, epsilon=0.1,
        ...                                          attack_steps=2, epochs=1)
        >>> info["train_examples"] == 1 * len(x) * (2 + 1)
        True
    """
    rates, attack = training_settings(
        model,
        x,
        y,
        epsilon,
        attack_steps,
        epochs,
        batch_size,
        learning_rate,
        step_size,
        epsilon_warmup,
        clip_values,
        PGD_STEP_FACTOR,
    )
    members, _, info = _train(
        model, x, y, attack, int(epochs), int(batch_size), rates, int(seed), 1, "pgd_at"
    )
    return members[0], info


def fgsm_adversarial_training(
    model,
    x,
    y,
    *,
    epsilon=0.3,
    step_size=None,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    epsilon_warmup=0.0,
    clip_values=(0.0, 1.0),
    seed=0,
):
    """Fast adversarial training (Wong et al., 2020): FGSM from a random start.

    Every step perturbs the batch by δ ~ U[−ε, ε], then one signed-gradient step of
    α = 1.25·ε projected back on the ε-ball (`perturb` with one step), and trains on the
    result: two passes per example, against PGD-AT's `attack_steps + 1`. The authors'
    α = 1.25·ε avoids the catastrophic overfitting of larger steps. Learning rates are
    chosen as in `pgd_adversarial_training` (the validation attack is the same FGSM).

    Args:
        model: A `keras.Model` returning logits or probabilities: the architecture
            (weights unused, not changed).
        x: Training inputs (one numpy array, values in `clip_values`).
        y: Integer training labels.
        epsilon: ε. Defaults to `0.3`.
        step_size: α, or `None` for 1.25·ε. Defaults to `None`.
        epochs: Passes over `(x, y)`. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: The initial Adam learning rate, a list of them, or `"auto"`.
            Defaults to `1e-3`.
        epsilon_warmup: The fraction of the training steps over which ε (and α with it)
            rises linearly from 0 to `epsilon`; 0 trains at ε from the first step (Madry
            et al.). Short budgets at a large ε (MNIST at 0.3 for a few epochs) need a
            warm-up, or the network can settle on a constant output. Defaults to `0.0`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        seed: Initialisation, shuffle and random-start seed. Defaults to `0`.

    Returns:
        A tuple `(network, info)`; `info["train_examples"]` = 2·epochs·N plus the
        learning-rate search.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> network, info = fgsm_adversarial_training(model, x, y, epsilon=0.1, epochs=1)
        >>> info["train_examples"] == 2 * len(x), info["step_size"]
        (True, 0.125)
    """
    rates, attack = training_settings(
        model,
        x,
        y,
        epsilon,
        1,
        epochs,
        batch_size,
        learning_rate,
        step_size,
        epsilon_warmup,
        clip_values,
        FGSM_STEP_FACTOR,
    )
    members, _, info = _train(
        model, x, y, attack, int(epochs), int(batch_size), rates, int(seed), 1, "fgsm_at"
    )
    return members[0], info


def pgd_adversarial_ensemble(
    model,
    x,
    y,
    *,
    num_members=5,
    epsilon=0.3,
    attack_steps=10,
    step_size=None,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    epsilon_warmup=0.0,
    clip_values=(0.0, 1.0),
    seed=0,
    combine="mean_probabilities",
):
    """A deep ensemble of PGD-adversarially trained networks.

    K networks trained as `pgd_adversarial_training` from the initialisations of seeds
    `seed`, …, `seed + K − 1` (a learning-rate search runs once, for all members),
    combined into one keras_fip ensemble model (`build_ensemble`; by default the mean of
    the members' probabilities).

    Args:
        model: A `keras.Model` returning logits or probabilities: the architecture
            (weights unused, not changed).
        x: Training inputs (one numpy array, values in `clip_values`).
        y: Integer training labels.
        num_members: K. Defaults to `5`.
        epsilon: ε. Defaults to `0.3`.
        attack_steps: PGD steps per batch. Defaults to `10`.
        step_size: α, or `None` for 2.5·ε/`attack_steps`. Defaults to `None`.
        epochs: Passes over `(x, y)` of each member. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: The initial Adam learning rate, a list of them, or `"auto"`.
            Defaults to `1e-3`.
        epsilon_warmup: The fraction of the training steps over which ε (and α with it)
            rises linearly from 0 to `epsilon`; 0 trains at ε from the first step (Madry
            et al.). Short budgets at a large ε (MNIST at 0.3 for a few epochs) need a
            warm-up, or the network can settle on a constant output. Defaults to `0.0`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        seed: Seed of the first member. Defaults to `0`.
        combine: `"mean_probabilities"` or `"mean_logits"` (`build_ensemble`). Defaults
            to `"mean_probabilities"`.

    Returns:
        A tuple `(ensemble, info)`; `info["train_examples"]` =
        K·epochs·N·(attack_steps + 1) plus the learning-rate search.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> ensemble, info = pgd_adversarial_ensemble(model, x, y, num_members=2,
        ...                                           epsilon=0.1, attack_steps=1, epochs=1)
        >>> info["train_examples"] == 2 * len(x) * (1 + 1)
        True
    """
    if (
        not isinstance(num_members, (int, np.integer))
        or isinstance(num_members, bool)
        or num_members < 1
    ):
        raise ValueError(
            f"`num_members` must be a positive integer. Received: num_members={num_members!r}"
        )
    if combine not in SAVED_COMBINES:
        raise ValueError(
            f"`combine` must be one of {list(SAVED_COMBINES)}. Received: combine={combine!r}"
        )
    rates, attack = training_settings(
        model,
        x,
        y,
        epsilon,
        attack_steps,
        epochs,
        batch_size,
        learning_rate,
        step_size,
        epsilon_warmup,
        clip_values,
        PGD_STEP_FACTOR,
    )
    members, kind, info = _train(
        model,
        x,
        y,
        attack,
        int(epochs),
        int(batch_size),
        rates,
        int(seed),
        int(num_members),
        "pgd_at_ensemble",
    )
    ensemble = build_ensemble(
        members,
        combine,
        tuple(model.inputs[0].shape[1:]),
        name=f"{model.name}_pgd_at_ensemble",
        outputs=kind,
    )
    return ensemble, info
