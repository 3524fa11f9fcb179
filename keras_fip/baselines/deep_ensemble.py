"""Ensemble baselines: deep ensembles, fast geometric ensembling (FGE), snapshot ensembles.

Each returns a keras_fip ensemble model (`keras_fip.operations.ensemble_model.build_ensemble`:
one input, the members, their combination; by default the mean of the members'
probabilities: a model ending in a softmax is averaged as it is, a logits model through
a softmax, and the ensemble returns probabilities either way) and a dict
recording the compute it used as epochs × examples (`"train_examples"`: examples through a
forward and backward pass), so methods can be compared at their cost. The model they start
from (FGE) is not counted: add its own training.
"""

import math

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.copy import copy_model
from keras_fip.operations.ensemble_model import SAVED_COMBINES
from keras_fip.operations.ensemble_model import build_ensemble


def _check_common(num_members, epochs, name_epochs, combine):
    if (
        not isinstance(num_members, (int, np.integer))
        or isinstance(num_members, bool)
        or (num_members < 1)
    ):
        raise ValueError(
            f"`num_members` must be a positive integer. Received: num_members={num_members!r}"
        )
    if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(
            f"`{name_epochs}` must be a positive integer. Received: {name_epochs}={epochs!r}"
        )
    if combine not in SAVED_COMBINES:
        raise ValueError(
            f"`combine` must be one of {list(SAVED_COMBINES)}. Received: combine={combine!r}"
        )


def _fresh_copy(model, seed):
    """The architecture of `model` with new weights drawn from its initialisers."""
    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    return clone


def _output_kind(model, x):
    """What `model` returns (its final layer, else its outputs on some of `x`)."""
    return outputs_lib.output_kind(model, x)


def _input_shape(model):
    """One example's input shape; `None` for several inputs (the ensemble takes the same
    dict or list of inputs as the model)."""
    return None if len(model.inputs) > 1 else tuple(model.inputs[0].shape[1:])


def deep_ensemble(
    model,
    x,
    y,
    num_members=10,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    seed=0,
    combine="mean_probabilities",
    verbose=0,
):
    """K networks of `model`'s architecture trained from K random initialisations.

    The deep ensemble of Lakshminarayanan et al. (2017) without adversarial training:
    each member is initialised from seed `seed + k` and trained on all of `(x, y)` with
    shuffling, Adam and a cosine-decayed learning rate (`keras_fip.models.train_classifier`,
    the recipe the base networks use), so every member is as good as a single network.

    Args:
        model: A `keras.Model` returning logits or probabilities: the architecture (its
            weights are not used or changed).
        x: Training inputs.
        y: Integer training labels.
        num_members: K. Defaults to `10`.
        epochs: Training epochs of each member. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate (cosine-decayed). Defaults to `1e-3`.
        seed: Seed of the first member. Defaults to `0`.
        combine: How the ensemble combines its members, `"mean_probabilities"` or
            `"mean_logits"` (`build_ensemble`). Defaults to `"mean_probabilities"`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A tuple `(ensemble, info)`; `info` holds `"train_examples"` (K·epochs·N),
        `"epochs"` (K·epochs) and `"num_members"`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> ensemble, info = deep_ensemble(model, x, y, num_members=2, epochs=1)
        >>> info["train_examples"] == 2 * len(x)
        True
    """
    _check_common(num_members, epochs, "epochs", combine)
    from keras_fip.models.training import train_classifier

    members = []
    for k in range(num_members):
        member = _fresh_copy(model, seed + k)
        train_classifier(
            member,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            verbose=verbose,
        )
        members.append(member)
    info = {
        "train_examples": int(num_members * epochs * data_adapter.num_examples(x)),
        "epochs": int(num_members * epochs),
        "num_members": int(num_members),
    }
    return build_ensemble(
        members,
        combine,
        _input_shape(model),
        name=f"{model.name}_deep_ensemble",
        outputs=_output_kind(model, x),
    ), info


def fge_learning_rate(iteration, cycle_steps, high, low):
    """The FGE cyclic learning rate (Garipov et al., 2018, Eq. 2): α(i) for step i ≥ 1.

    With t(i) = ((i − 1) mod c + 1)/c, α falls linearly from α₁ (`high`) to α₂ (`low`) over
    the first half of each cycle of c steps and climbs back over the second half; members
    are collected where α = α₂, in the middle of each cycle.

    Args:
        iteration: The step i (1-based).
        cycle_steps: c, the steps per cycle (even).
        high: α₁.
        low: α₂.

    Returns:
        A float.

    Examples:

        >>> fge_learning_rate(2, 4, 0.05, 0.0005)
        0.0005
    """
    t = ((iteration - 1) % cycle_steps + 1) / cycle_steps
    if t <= 0.5:
        return (1 - 2 * t) * high + 2 * t * low
    return (2 - 2 * t) * low + (2 * t - 1) * high


class _FGECollector(keras.callbacks.Callback):
    """Sets the cyclic learning rate each step and copies the model mid-cycle."""

    def __init__(self, cycle_steps, high, low, data, batch_size, num_members):
        super().__init__()
        self.num_members = num_members
        self.cycle_steps = cycle_steps
        self.high, self.low = high, low
        self.data = data
        self.batch_size = batch_size
        self.iteration = 0
        self.members = []

    def on_train_batch_begin(self, batch, logs=None):
        self.iteration += 1
        self.model.optimizer.learning_rate.assign(
            fge_learning_rate(self.iteration, self.cycle_steps, self.high, self.low)
        )

    def on_train_batch_end(self, batch, logs=None):
        if self.iteration % self.cycle_steps == self.cycle_steps // 2:
            member = copy_model(self.model)
            normalization.recalibrate_batch_normalization(member, self.data, 2 * self.batch_size)
            self.members.append(member)
            if len(self.members) == self.num_members:
                self.model.stop_training = True


def _sgd_classifier(model, learning_rate, momentum=0.9, nesterov=False, weight_decay=None):
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        ),
        loss=outputs_lib.classification_loss(outputs_lib.output_kind(model)),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def fast_geometric_ensemble(
    model,
    x,
    y,
    num_members=10,
    cycle_epochs=2,
    learning_rates=(5e-2, 5e-4),
    batch_size=128,
    momentum=0.9,
    weight_decay=None,
    seed=0,
    combine="mean_probabilities",
    verbose=0,
):
    """Fast geometric ensembling (Garipov et al., 2018) from a trained network.

    From a copy of the trained `model`, SGD with momentum runs K cycles of c =
    `cycle_epochs` epochs with the piecewise-linear cyclic learning rate between α₁ and α₂
    (`fge_learning_rate`); one member is copied in the middle of each cycle, where the
    rate is α₂. The authors use c of 2 to 4 epochs and α₁/α₂ = 100 (5e-2/5e-4 for VGG16 on
    CIFAR); tune α₁ on a validation split for other models. BatchNorm statistics of each
    member are re-estimated on `x` (as their `bn_update`).

    Args:
        model: A trained `keras.Model` returning logits or probabilities. Not changed.
        x: Training inputs.
        y: Integer training labels.
        num_members: K, the cycles and members. Defaults to `10`.
        cycle_epochs: c in epochs (the cycle has an even number of steps). Defaults to
            `2`.
        learning_rates: `(α₁, α₂)`. Defaults to `(5e-2, 5e-4)`.
        batch_size: Examples per step. Defaults to `128`.
        momentum: SGD momentum. Defaults to `0.9`.
        weight_decay: SGD weight decay, or `None`. Defaults to `None`.
        seed: Shuffle seed. Defaults to `0`.
        combine: How the ensemble combines its members. Defaults to
            `"mean_probabilities"`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A tuple `(ensemble, info)`; `info["train_examples"]` ≈ (K − ½)·c·N, the
        steps run times the batch size (the trained starting network not included), `"epochs"`
        and `"num_members"`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> ensemble, info = fast_geometric_ensemble(model, x, y, num_members=2,
        ...                                          cycle_epochs=1, learning_rates=(1e-2, 1e-4))
        >>> info["num_members"]
        2
    """
    _check_common(num_members, cycle_epochs, "cycle_epochs", combine)
    high, low = (float(v) for v in learning_rates)
    if not (high > 0 and low > 0):
        raise ValueError(
            f"`learning_rates` must be two positive numbers. Received: {learning_rates!r}"
        )
    keras.utils.set_random_seed(seed)
    network = copy_model(model)
    steps_per_epoch = math.ceil(data_adapter.num_examples(x) / batch_size)
    cycle_steps = 2 * max(1, (cycle_epochs * steps_per_epoch) // 2)
    _sgd_classifier(network, high, momentum, weight_decay=weight_decay)
    collector = _FGECollector(cycle_steps, high, low, x, batch_size, num_members)
    # The last member is taken half-way through the last cycle, where training stops.
    total_steps = (num_members - 1) * cycle_steps + cycle_steps // 2
    epochs = math.ceil(total_steps / steps_per_epoch)
    network.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=[collector], verbose=verbose)
    members = collector.members[:num_members]
    info = {
        "train_examples": int(total_steps * batch_size),
        "epochs": float(total_steps / steps_per_epoch),
        "num_members": len(members),
    }
    return build_ensemble(
        members,
        combine,
        _input_shape(model),
        name=f"{model.name}_fge",
        outputs=_output_kind(model, x),
    ), info


def snapshot_learning_rate(iteration, total_steps, num_cycles, initial):
    """The snapshot-ensemble rate (Huang et al., 2017, Eq. 2): cosine annealing, restarted.

    α(t) = α₀/2 · (cos(π · mod(t − 1, ⌈T/M⌉) / ⌈T/M⌉) + 1) for step t ≥ 1 of T, M cycles.

    Examples:

        >>> snapshot_learning_rate(1, 100, 5, 0.1)
        0.1
    """
    cycle = math.ceil(total_steps / num_cycles)
    return initial / 2 * (math.cos(math.pi * ((iteration - 1) % cycle) / cycle) + 1)


class _SnapshotCollector(keras.callbacks.Callback):
    def __init__(self, total_steps, num_cycles, initial, data, batch_size):
        super().__init__()
        self.total_steps, self.num_cycles, self.initial = total_steps, num_cycles, initial
        self.cycle = math.ceil(total_steps / num_cycles)
        self.data, self.batch_size = data, batch_size
        self.iteration = 0
        self.members = []

    def on_train_batch_begin(self, batch, logs=None):
        self.iteration += 1
        self.model.optimizer.learning_rate.assign(
            snapshot_learning_rate(self.iteration, self.total_steps, self.num_cycles, self.initial)
        )

    def on_train_batch_end(self, batch, logs=None):
        if self.iteration % self.cycle == 0 or self.iteration == self.total_steps:
            if len(self.members) < self.num_cycles:
                member = copy_model(self.model)
                normalization.recalibrate_batch_normalization(
                    member, self.data, 2 * self.batch_size
                )
                self.members.append(member)


def snapshot_ensemble(
    model,
    x,
    y,
    num_members=10,
    epochs=20,
    learning_rate=0.1,
    batch_size=128,
    momentum=0.9,
    weight_decay=None,
    seed=0,
    combine="mean_probabilities",
    verbose=0,
):
    """Snapshot ensemble (Huang et al., 2017): one training run, M cosine cycles.

    A fresh network of `model`'s architecture (seed `seed`) is trained for `epochs` with
    SGD (Nesterov momentum) and the cosine-annealed learning rate restarted M =
    `num_members` times (`snapshot_learning_rate`, α₀ = `learning_rate`; the authors use
    α₀ = 0.1–0.2); a snapshot is taken at the end of each cycle, where the rate reaches
    zero.

    Args:
        model: A `keras.Model` returning logits or probabilities: the architecture
            (weights unused).
        x: Training inputs.
        y: Integer training labels.
        num_members: M, the cycles and snapshots. Defaults to `10`.
        epochs: The whole budget T in epochs. Defaults to `20`.
        learning_rate: α₀. Defaults to `0.1`.
        batch_size: Examples per step. Defaults to `128`.
        momentum: Nesterov momentum. Defaults to `0.9`.
        weight_decay: SGD weight decay, or `None`. Defaults to `None`.
        seed: Initialisation and shuffle seed. Defaults to `0`.
        combine: How the ensemble combines its members. Defaults to
            `"mean_probabilities"`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A tuple `(ensemble, info)`; `info["train_examples"]` = epochs·N.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> ensemble, info = snapshot_ensemble(model, x, y, num_members=2, epochs=2)
        >>> info["num_members"]
        2
    """
    _check_common(num_members, epochs, "epochs", combine)
    if not learning_rate > 0:
        raise ValueError(
            f"`learning_rate` must be positive. Received: learning_rate={learning_rate!r}"
        )
    network = _fresh_copy(model, seed)
    _sgd_classifier(network, learning_rate, momentum, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(data_adapter.num_examples(x) / batch_size)
    total_steps = epochs * steps_per_epoch
    collector = _SnapshotCollector(total_steps, num_members, float(learning_rate), x, batch_size)
    network.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=[collector], verbose=verbose)
    info = {
        "train_examples": int(epochs * data_adapter.num_examples(x)),
        "epochs": int(epochs),
        "num_members": len(collector.members),
    }
    return build_ensemble(
        collector.members,
        combine,
        _input_shape(model),
        name=f"{model.name}_snapshot",
        outputs=_output_kind(model, x),
    ), info
