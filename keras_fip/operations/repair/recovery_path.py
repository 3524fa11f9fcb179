"""`recovery_path`: a FIP from an undamaged network to its damaged weights, the damage
growing as the surviving network compensates."""

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.copy import strip_masks
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.distribute import distribute_dataset
from keras_fip.distribute import replica_step
from keras_fip.engine import distances as distances_lib
from keras_fip.engine import step_rules
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.repair.training import predict


def recovery_path(
    model,
    damage_masks,
    data,
    num_points=11,
    steps_per_point=20,
    learning_rate=1e-3,
    batch_size=128,
    distance="kl",
    training="auto",
    seed=None,
    rate_with_time=False,
):
    """A FIP from an undamaged network to one with the damaged weights at zero.

    The recovery path of the resilience paper's Fig. 4, to set against the straight damage
    path `keras_fip.geometry.damage_path` (which scales the damaged weights by 1 − t and
    leaves every other weight where it is). Here, at each time t_k = k/(num_points − 1)
    the damaged weights are set to (1 − t_k) times their undamaged values, exactly as on
    the straight path, and the other weights take `steps_per_point` Adam steps minimising
    the output distance D to the undamaged network on `data` (inputs only): the
    surviving network compensates while the damage grows. At t = 1 the damaged weights
    are exactly zero. With `training` (`"auto"`: when the model has BatchNormalization),
    the path runs BatchNorm on batch statistics and each point's moving statistics are
    recalibrated on `data`.

    Args:
        model: The undamaged `keras.Model` (logits or probabilities: D is taken on the
            logits, a probability model's log-probabilities). Not changed.
        damage_masks: List aligned with `model.trainable_variables`: `False` where the
            damage zeroes a weight, or `None` (e.g.
            `keras_fip.damage_reference(damaged).damage_masks`).
        data: Inputs whose outputs are kept (array or `(x, y)`).
        num_points: Points of the path, t = 0 included. Defaults to `11`.
        steps_per_point: Adam steps between points. Defaults to `20`.
        learning_rate: Adam learning rate. Defaults to `1e-3`.
        batch_size: Inputs per step. Defaults to `128`.
        distance: Output distance D. Defaults to `"kl"`.
        training: `True`, `False` or `"auto"`. Defaults to `"auto"`.
        seed: Shuffle seed. Defaults to `None`.
        rate_with_time: Whether the Adam rate at time t is `learning_rate * t`. An Adam
            step moves every weight by about the rate whatever the size of its gradient,
            so a fixed rate moves the network as far at t = 0.1, where the damage is
            small, as at t = 1, and its noise can cost more than the damage there; a
            rate proportional to t (to the damage's size) keeps the walk in proportion.
            Defaults to `False`.

    Returns:
        A tuple `(points, times)`: weight lists in `model.get_weights()` order (ready for
        `keras_fip.geometry.breakdown_profile`) and the numpy array of times.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
        >>> masks = keras_fip.damage_reference(damaged).damage_masks
        >>> points, times = recovery_path(model, masks, x, num_points=3, steps_per_point=2)
        >>> len(points)
        3
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    variables = model.trainable_variables
    if not isinstance(damage_masks, (list, tuple)) or len(damage_masks) != len(variables):
        raise ValueError(
            "`damage_masks` must be a list aligned with `model.trainable_variables` "
            f"({len(variables)} entries). Received: {damage_masks!r}"[:300]
        )
    for name, value in (
        ("num_points", num_points),
        ("steps_per_point", steps_per_point),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if num_points < 2:
        raise ValueError(f"`num_points` must be at least 2. Received: num_points={num_points}")
    distance_fn = distances_lib.get(distance)
    x, _ = normalize_data(data, name="data", model=model)
    check_inputs_match_model(model, x)
    x = data_adapter.float32_inputs(x)

    # The moving copy: damaged coordinates driven, the others free
    walker = strip_masks(model)
    normalized = bool(normalization.batch_normalization_layers(walker))
    walk_training = normalized if training == "auto" else bool(training)
    moving = walker.trainable_variables
    free = [
        tf.constant(np.ones(v.shape) if m is None else m.astype("float64"), v.dtype)
        for v, m in zip(moving, damage_masks)
    ]
    start = [
        tf.constant(np.asarray(v.numpy()) * (1.0 - f.numpy()), v.dtype)
        for v, f in zip(moving, free)
    ]
    time = keras.Variable(0.0, trainable=False, name="recovery_time")
    optimizer = keras.optimizers.Adam(learning_rate)
    # D on logits: a probability model's log-probabilities (views sharing the weights).
    kind = model_output_kind(model, x)
    walker_logits = outputs_lib.logits_model(walker, kind)
    reference = predict(outputs_lib.logits_model(model, kind), x).astype("float32")

    optimizer.build(moving)  # Its slots are created here, not inside a replica step.

    def one_step(batch):
        # Each replica's batch mean over the replicas: the optimizer sums the gradients.
        inputs, targets = batch
        with tf.GradientTape() as tape:
            loss = distance_fn(walker_logits(inputs, training=walk_training), targets)
            loss = loss / step_rules.num_replicas()
        gradients = tape.gradient(loss, [v.value for v in moving])
        gradients = [
            tf.zeros_like(v.value) if g is None else g * f
            for g, v, f in zip(gradients, moving, free)
        ]
        optimizer.apply(gradients, moving)
        return loss

    step = replica_step(one_step)

    @tf.function
    def hold_damage():
        # Outside the replica context: a distributed variable is assigned on every replica.
        for variable, keep, value in zip(moving, free, start):
            variable.assign(variable.value * keep + (1.0 - time.value) * value)

    # Stateless per-pass permutations: the same global batches under any strategy.
    dataset = iter(
        distribute_dataset(data_adapter.repeated_batches((x, reference), batch_size, seed=seed))
    )
    points, times = [model.get_weights()], np.linspace(0.0, 1.0, num_points)
    for t in times[1:]:
        time.assign(float(t))
        if rate_with_time:
            optimizer.learning_rate.assign(learning_rate * float(t))
        for variable, keep, value in zip(moving, free, start):
            variable.assign(variable.value * keep + (1.0 - float(t)) * value)
        for _ in range(steps_per_point):
            loss = step(next(dataset))
            hold_damage()
        if not np.isfinite(float(loss)):
            raise FloatingPointError(
                f"The recovery path hit a non-finite loss at t={t:g}. Lower the learning rate."
            )
        if walk_training and normalized:
            normalization.recalibrate_batch_normalization(
                walker, x, 2 * batch_size, max_examples=4096
            )
        points.append(walker.get_weights())
    return points, times
