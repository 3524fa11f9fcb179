"""Supervised training of a damaged network: the loop of `Retrain`, `Embryonic` and
prune-and-retrain, and the accuracy every repair is measured by."""

import math
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import outputs as outputs_lib
from keras_fip.distribute import distribute_dataset
from keras_fip.distribute import replica_step
from keras_fip.engine import step_rules
from keras_fip.engine.path import Path

OPTIMIZERS = ("adam", "sgd")


# One traced inference function per model, so that a repair measuring its validation
# accuracy hundreds of times runs a graph rather than the layers eagerly each time.
_FORWARDS = weakref.WeakKeyDictionary()


def _forward(model):
    forward = _FORWARDS.get(model)
    if forward is None:
        reference = weakref.ref(model)  # The cache must not keep the model alive.

        def call(inputs):
            return reference()(inputs, training=False)

        forward = tf.function(call, reduce_retracing=True)
        _FORWARDS[model] = forward
    return forward


def predict(model, x, batch_size=1000):
    """`model`'s inference-mode outputs on `x`, in batches through one traced function
    per model.

    Args:
        model: A `keras.Model`.
        x: Inputs (an array, or a dict or list of them).
        batch_size: Examples per forward pass. Defaults to `1000`.

    Returns:
        A numpy array.
    """
    forward = _forward(model)
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(forward(data_adapter.take(x, slice(i, i + batch_size))))
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )


def accuracy(model, x, targets):
    """The fraction of `x` on which `model`'s top class is `targets`.

    Args:
        model: A classifier returning logits or probabilities.
        x: Inputs.
        targets: Class indices (labels, or another network's predictions).

    Returns:
        A float in [0, 1].

    Examples:

        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        >>> x = np.eye(2, dtype="float32")
        >>> accuracy(model, x, np.argmax(model(x), axis=-1))
        1.0
    """
    return float(np.mean(np.argmax(predict(model, x), axis=-1) == np.asarray(targets)))


def reinitialise(model, damage_masks, rng, scale=1.0):
    """Draws fresh values for the damaged entries of each variable (in place).

    Each damaged entry is drawn from a normal distribution with the mean and standard
    deviation of the variable's surviving entries (a BatchNorm scale comes back near its
    survivors' mean, a kernel entry near zero with the kernel's spread), times `scale`
    around that mean; a variable with no survivor uses Glorot's standard deviation.

    Args:
        model: A `keras.Model`, changed in place.
        damage_masks: List aligned with `model.trainable_variables`: `False` where a
            weight was damaged, or `None`.
        rng: A `numpy.random.Generator`.
        scale: Spread of the new values relative to the survivors'. Defaults to `1.0`.
    """
    for variable, mask in zip(model.trainable_variables, damage_masks):
        if mask is None or mask.all():
            continue
        values = np.array(variable.numpy(), dtype=np.float64)
        survivors = values[mask]
        if survivors.size:
            mean, spread = float(np.mean(survivors)), float(np.std(survivors))
        else:
            shape = variable.shape
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])
            mean, spread = 0.0, math.sqrt(2.0 / (fan_in + int(shape[-1])))
        values[~mask] = mean + scale * spread * rng.standard_normal(int((~mask).sum()))
        variable.assign(values.astype(variable.dtype))


def supervised_training(
    model,
    x,
    y,
    steps,
    learning_rate,
    optimizer="adam",
    batch_size=128,
    gradient_scales=None,
    masks=None,
    seed=None,
    callback=None,
    evaluate_every=None,
):
    """Trains a classifier in place with cross-entropy, SGD or Adam, one graph.

    The shared loop of `keras_fip.repair.Retrain`, `Embryonic` and the prune-and-retrain
    baseline: every step sees `batch_size` labelled examples (shuffled every pass), so the
    epochs of every method count the same examples. Masks the model carries are kept
    exactly (`MaskedOptimizer`); `masks` (a list of `keras.Variable`s of 0/1 aligned with
    the trainable variables, or `None` entries) are multiplied in after every step, so a
    caller may change them between steps without retracing.

    Args:
        model: A `keras.Model` returning logits or probabilities (the cross-entropy is
            taken on its logits, or on the log-probabilities of a model ending in a
            softmax). Changed in place.
        x: Inputs.
        y: Integer labels.
        steps: Number of steps.
        learning_rate: Learning rate (constant).
        optimizer: `"adam"` or `"sgd"` (momentum 0.9). Defaults to `"adam"`.
        batch_size: Examples per step. Defaults to `128`.
        gradient_scales: List aligned with the trainable variables of arrays (or `None`
            for 1) multiplying each entry's gradient. Defaults to `None`.
        masks: Mask variables as above, or `None`. Defaults to `None`.
        seed: Shuffle seed. Defaults to `None`.
        callback: `callback(step) -> bool` called every `evaluate_every` steps (after the
            step); returning `True` stops the training. Defaults to `None`.
        evaluate_every: Steps between callback calls. Defaults to `None` (never).

    Returns:
        The number of steps taken.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> supervised_training(model, x, y, steps=5, learning_rate=1e-3, seed=0)
        5
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"`optimizer` must be one of {list(OPTIMIZERS)}. Received: optimizer={optimizer!r}"
        )
    variables = model.trainable_variables
    # The loss reads logits: a probability model through its log-probabilities.
    network = outputs_lib.logits_model(
        model, outputs_lib.output_kind(model, data_adapter.take(x, slice(0, 64)))
    )
    inner = (
        keras.optimizers.Adam(learning_rate)
        if optimizer == "adam"
        else keras.optimizers.SGD(learning_rate, momentum=0.9)
    )
    carried = any(masks_lib.mask_of(v) is not None for v in variables)
    optimizer = masks_lib.MaskedOptimizer(inner) if carried else inner
    optimizer.build(variables)  # Its slots are created here, not inside a replica step.
    scales = None
    if gradient_scales is not None:
        scales = [
            None if s is None else tf.constant(s, v.dtype)
            for s, v in zip(gradient_scales, variables)
        ]

    def one_step(batch):
        # Under a strategy each replica takes its slice of the global batch; its loss is
        # scaled by 1/replicas, as Keras scales it, and the optimizer sums the gradients.
        inputs, labels = batch
        with tf.GradientTape() as tape:
            loss = step_rules.mean_cross_entropy(labels, network(inputs, training=True))
            loss = loss / step_rules.num_replicas()
        gradients = tape.gradient(loss, [v.value for v in variables])
        gradients = [
            tf.zeros_like(v.value) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(gradients, variables)
        ]
        if scales is not None:
            gradients = [g if s is None else g * s for g, s in zip(gradients, scales)]
        optimizer.apply(gradients, variables)
        return loss

    step = replica_step(one_step)

    @tf.function
    def apply_masks():
        # Outside the replica context: a distributed variable is assigned on every replica.
        for variable, mask in zip(variables, masks):
            if mask is not None:
                variable.assign(variable.value * mask.value)

    # Stateless per-pass permutations: the same global batches under any strategy.
    dataset = data_adapter.repeated_batches(
        (data_adapter.float32_inputs(x), np.asarray(y)), batch_size, seed=seed
    )
    taken = 0
    for batch in distribute_dataset(dataset.take(steps)):
        loss = step(batch)
        if masks is not None:
            apply_masks()
        taken += 1
        if not np.isfinite(float(loss)):
            raise FloatingPointError(
                f"Supervised training hit a non-finite loss at step {taken}. Lower the "
                "learning rate."
            )
        if callback is not None and evaluate_every and taken % evaluate_every == 0:
            if callback(taken):
                break
    return taken


def supervised_repair(model, context, optimizer="adam", gradient_scales=None):
    """Repairs `model` by supervised training on the context's labelled training data.

    The loop of `keras_fip.repair.Retrain` and `Embryonic`: `supervised_training` at the
    context's learning rate for its budget, the validation accuracy measured
    `evaluations_per_epoch` times per epoch (and the training stopped once recovered when
    the repair stops at its target).

    Args:
        model: The damaged (or released) model, changed in place.
        context: The call's `keras_fip.operations.repair.RepairContext`.
        optimizer: `"adam"` or `"sgd"`. Defaults to `"adam"`.
        gradient_scales: Per-variable gradient multipliers, or `None`. Defaults to `None`.

    Returns:
        A tuple `(model, history, path)`.
    """
    walk = context.walk
    history = context.new_history(model)
    evaluate = context.evaluator(model, history)
    path = Path(model, record_every=walk.record_every, directory=walk.path_directory)
    steps = 0
    if history["epochs_to_recover"] is None or not context.stop_at_target:
        steps = supervised_training(
            model,
            context.x,
            context.y,
            context.steps,
            context.learning_rate,
            optimizer,
            walk.batch_size,
            gradient_scales=gradient_scales,
            seed=walk.seed,
            callback=evaluate,
            evaluate_every=context.evaluate_every,
        )
    if steps:
        path.append(
            steps,
            [v.numpy() for v in model.trainable_variables],
            {"val_accuracy": history["val_accuracy"][-1]},
        )
    history["steps"] = steps
    return model, history, path
