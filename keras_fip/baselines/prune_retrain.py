"""Prune one node at a time with SGD retraining: the baseline of geodesic repair."""

import math

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.geometry import units as units_lib
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.repair.training import accuracy
from keras_fip.operations.repair.training import supervised_training


def _check_positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def prune_retrain(
    model,
    units,
    data,
    validation_data,
    units_per_round=1,
    steps_per_round=1,
    epochs=10,
    learning_rate=0.01,
    optimizer="sgd",
    batch_size=128,
    target=0.01,
    evaluations_per_epoch=1,
    stop_at_target=False,
    seed=None,
):
    """Deletes units one (or a few) at a time, retraining with SGD between deletions.

    The baseline the resilience paper compares geodesic repair with: starting from the
    undamaged network, the units to delete are removed `units_per_round` at a time in a
    seeded order (incoming weights, bias, BatchNorm scale/offset and outgoing weights
    zeroed, as `keras_fip.faults.Nodes` does), with `steps_per_round` steps of
    supervised training on `data` after each deletion; once all are deleted, training
    continues. Every step sees `batch_size` labelled examples, so its epochs count the
    same examples as `keras_fip.Repair`'s. The deleted weights are held at exactly zero
    (and carried as masks by the returned model).

    Args:
        model: The undamaged `keras.Model` (logits or probabilities). Not changed.
        units: The units to delete: a dict mapping layer names to unit indices (e.g.
            `keras_fip.damage_reference(damaged).records[0]["units"]`).
        data: Labelled training data `(x, y)`.
        validation_data: Labelled `(x, y)` on which accuracy is measured.
        units_per_round: Units deleted per round. Defaults to `1`.
        steps_per_round: Training steps after each round. Defaults to `1`.
        epochs: Maximum passes over `data` in all (pruning and retraining). Defaults to
            `10`.
        learning_rate: Learning rate. Defaults to `0.01`.
        optimizer: `"sgd"` (momentum 0.9) or `"adam"`. Defaults to `"sgd"`.
        batch_size: Examples per step. Defaults to `128`.
        target: Recovered means within this much of the undamaged accuracy. Defaults to
            `0.01`.
        evaluations_per_epoch: Validation measurements per epoch. Defaults to `1`.
        stop_at_target: Whether to stop once every unit is deleted and the network has
            recovered. Defaults to `False`.
        seed: Deletion-order and shuffle seed. Defaults to `None`.

    Returns:
        A tuple `(pruned, history)`: the new `keras.Model` with the units deleted (and
        masked), and a dict with `"epoch"`, `"val_accuracy"`, `"undamaged_accuracy"`,
        `"pruned_at"` (the epoch the last unit went) and `"epochs_to_recover"` (the first
        evaluation, once all units are deleted, within `target` of the undamaged
        accuracy, counted from the start; `None` if never).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> pruned, history = keras_fip.baselines.prune_retrain(
        ...     model, {"dense_1": [0, 1, 2]}, (x, y), (x, y), epochs=1)
        >>> len(keras_fip.operations.hidden_units(pruned)["dense_1"][1])
        3
    """
    # Validate everything before any work
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    x, y = normalize_data(data, name="data", require_labels=True, model=model)
    x_val, y_val = normalize_data(
        validation_data, name="validation_data", require_labels=True, model=model
    )
    check_inputs_match_model(model, x)
    check_inputs_match_model(model, x_val, name="validation_data")
    units_per_round = _check_positive_int(units_per_round, "units_per_round")
    steps_per_round = _check_positive_int(steps_per_round, "steps_per_round")
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size")
    evaluations_per_epoch = _check_positive_int(evaluations_per_epoch, "evaluations_per_epoch")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"`optimizer` must be 'sgd' or 'adam'. Received: optimizer={optimizer!r}")
    units = units_lib.check_units(units)
    units_lib.explicit_units(units_lib.unit_plans(model), units)  # Names and indices.
    pruned = copy_model(model)
    plans = {plan.layer.name: plan for plan in units_lib.unit_plans(pruned)}

    # Deletion order: a seeded interleaving of every (layer, unit)
    order = [(name, unit) for name, indices in units.items() for unit in indices]
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    variables = pruned.trainable_variables
    index_of = {id(v): i for i, v in enumerate(variables)}
    current = {id(v): np.ones(v.shape, bool) for v in variables}
    carried = [masks_lib.mask_of(v) for v in variables]
    mask_variables = [keras.Variable(np.ones(v.shape, v.dtype), trainable=False) for v in variables]
    steps_per_epoch = max(1, math.ceil(data_adapter.num_examples(x) / batch_size))
    every = max(1, steps_per_epoch // evaluations_per_epoch)
    normalized = bool(normalization.batch_normalization_layers(pruned))
    undamaged = accuracy(pruned, x_val, y_val)
    history = {
        "epoch": [0.0],
        "val_accuracy": [undamaged],
        "undamaged_accuracy": undamaged,
        "pruned_at": None,
        "epochs_to_recover": None,
    }
    state = {"next": 0}

    def delete_next():
        touched = set()
        for name, unit in order[state["next"] : state["next"] + units_per_round]:
            plans[name].zero(current, unit)
            touched.update(id(target[0]) for target in plans[name].targets)
        state["next"] += units_per_round
        for variable in variables:
            if id(variable) in touched:
                mask = current[id(variable)]
                mask_variables[index_of[id(variable)]].assign(mask.astype(variable.dtype))
                variable.assign(variable.numpy() * mask)

    def callback(step):
        if step % steps_per_round == 0 and state["next"] < len(order):
            delete_next()
            if state["next"] >= len(order):
                history["pruned_at"] = step / steps_per_epoch
        if step % every:
            return False
        if normalized:
            normalization.recalibrate_batch_normalization(
                pruned, x, 2 * batch_size, max_examples=4096
            )
        value = accuracy(pruned, x_val, y_val)
        history["epoch"].append(step / steps_per_epoch)
        history["val_accuracy"].append(value)
        done = state["next"] >= len(order)
        if done and history["epochs_to_recover"] is None and (value >= undamaged - target - 1e-12):
            history["epochs_to_recover"] = step / steps_per_epoch
        return done and stop_at_target and history["epochs_to_recover"] is not None

    if order:
        delete_next()  # The first deletion happens before any training.
    if state["next"] >= len(order):
        history["pruned_at"] = 0.0
    # Trained through its logits (log-probabilities of a probability model)
    network = outputs_lib.logits_model(pruned, model_output_kind(pruned, x))
    steps = supervised_training(
        network,
        x,
        y,
        epochs * steps_per_epoch,
        learning_rate,
        optimizer,
        batch_size,
        masks=mask_variables,
        seed=seed,
        callback=callback,
        evaluate_every=1,
    )
    history["steps"] = steps
    history["epochs"] = steps / steps_per_epoch

    # Carry the deletions as masks
    masks_lib.apply_masks(
        pruned,
        [
            None if current[id(v)].all() and carried[i] is None else current[id(v)]
            for i, v in enumerate(variables)
        ],
    )
    return pruned, history
