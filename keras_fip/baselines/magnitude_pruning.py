"""Magnitude-pruning baselines, native Keras 3: one-shot, gradual (tfmot's schedule), LTH.

These are what a practitioner would otherwise use to sparsify a network; `Compress` is
measured against them on the same data and epoch budget. They prune the set `Compress`
prunes by default, the one tfmot's `prune_low_magnitude` prunes
(`keras_fip.core.projection.prunable_variables`: Dense, EinsumDense and convolution
kernels, Embedding tables, MultiHeadAttention's kernels), and their sparsity counts those
weights (`keras_fip.core.projection.sparsity_summary` puts it beside the zero fraction of
all parameters). Each function returns a new model carrying its masks (`keras_fip.masks`)
and never changes the model it is given. The models may return logits or probabilities.
"""

import keras
import numpy as np

from keras_fip.core import copy as copy_lib
from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import projection
from keras_fip.models import training


def polynomial_decay_sparsity(
    step, final_sparsity, begin_step, end_step, initial_sparsity=0.0, power=3
):
    """tfmot's `PolynomialDecay` pruning schedule: the target sparsity at `step`.

    `s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** power`, clipped to
    [t_0, t_1]: fast pruning early, slow near the end (Zhu & Gupta 2017).

    Args:
        step: The training step.
        final_sparsity: Sparsity reached at `end_step`.
        begin_step: First pruning step.
        end_step: Step at which `final_sparsity` is reached.
        initial_sparsity: Sparsity at `begin_step`. Defaults to `0.0`.
        power: Exponent of the decay. Defaults to `3`.

    Returns:
        A float: the target sparsity.
    """
    progress = np.clip((step - begin_step) / max(end_step - begin_step, 1), 0.0, 1.0)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power)


def gradual_schedule_steps(
    num_examples, batch_size, epochs, begin_fraction, end_fraction, frequency
):
    """`(begin_step, end_step, frequency)` of a gradual schedule over a training budget.

    The frequency is capped so that the mask is updated at least ten times while pruning.
    The real-tfmot cross-check uses the same steps.
    """
    total_steps = epochs * int(np.ceil(num_examples / batch_size))
    begin_step = int(begin_fraction * total_steps)
    end_step = max(begin_step + 1, int(end_fraction * total_steps))
    frequency = min(frequency, max(1, (end_step - begin_step) // 10))
    return begin_step, end_step, frequency


class _HoldMasks(keras.callbacks.Callback):
    """Keeps pruned weights at zero after every batch, recomputing masks on a schedule."""

    def __init__(
        self,
        variables,
        schedule=None,
        frequency=100,
        structure="unstructured",
        scope="per_layer",
        masks=None,
        layer_floor=projection.DEFAULT_LAYER_FLOOR,
    ):
        super().__init__()
        self.layer_floor = layer_floor
        self.variables = variables
        self.schedule = schedule
        self.frequency = frequency
        self.structure = structure
        self.scope = scope
        self.masks = masks or {}
        self.step = 0

    def _update_masks(self):
        target = self.schedule(self.step)
        if target <= 0:
            return
        self.masks = projection.magnitude_masks(
            self.model,
            target,
            self.structure,
            self.scope,
            self.variables,
            self.masks,
            layer_floor=self.layer_floor,
        )

    def _hold(self):
        for variable in self.variables:
            mask = self.masks.get(variable.path)
            if mask is not None:
                variable.assign(variable.numpy() * mask)

    def on_train_begin(self, logs=None):
        if self.schedule is not None:
            self._update_masks()
        self._hold()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.schedule is not None and self.step % self.frequency == 0:
            self._update_masks()
        self._hold()


def _check_common(model, sparsity, x, y, epochs, batch_size, structure, scope, layer_floor=0.0):
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    projection.check_sparsity(sparsity)
    projection.check_structure_and_scope(structure, scope)
    projection.check_layer_floor(layer_floor)
    if data_adapter.is_structured(x):
        x = data_adapter.normalize_inputs(x, "x")
    count = data_adapter.num_examples(x)
    if count != len(y):
        raise ValueError(
            f"`x` and `y` must have the same length. Received: len(x)={count}, len(y)={len(y)}"
        )
    for value, name in ((epochs, "epochs"), (batch_size, "batch_size")):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if not data_adapter.all_finite(x):
        raise ValueError("`x` must be finite. Received: x containing NaN or Inf")


def _finish(pruned, masks):
    masks_lib.apply_masks(pruned, masks)
    return pruned


def one_shot_magnitude_pruning(
    model,
    sparsity,
    x,
    y,
    epochs=10,
    batch_size=128,
    learning_rate=1e-4,
    structure="unstructured",
    scope="global",
    layer_floor=projection.DEFAULT_LAYER_FLOOR,
    verbose=0,
):
    """Prunes the smallest weights once, then fine-tunes with the mask fixed.

    Args:
        model: A trained `keras.Model` (logits or probabilities). Not changed.
        sparsity: Fraction of prunable weights to zero, in [0, 1).
        x: Fine-tuning inputs.
        y: Integer labels.
        epochs: Fine-tuning epochs. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate (cosine-decayed). Defaults to `1e-4`.
        structure: As in `keras_fip.core.projection.magnitude_masks`. Defaults to
            `"unstructured"`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.
        layer_floor: The layer-collapse floor of the global ranking, as in
            `magnitude_masks` (the protection `Compress` has). Defaults to `"auto"`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A new `keras.Model` with exactly `sparsity` of its prunable weights
        (`keras_fip.core.projection.prunable_variables`) at zero, carrying its masks.
    """
    _check_common(model, sparsity, x, y, epochs, batch_size, structure, scope, layer_floor)
    pruned = copy_lib.copy_model(model)
    variables = projection.prunable_variables(pruned)
    masks = projection.magnitude_masks(
        pruned, sparsity, structure, scope, variables, layer_floor=layer_floor
    )
    hold = _HoldMasks(variables, masks=masks)
    training.train_classifier(
        pruned, x, y, epochs, batch_size, learning_rate, callbacks=[hold], verbose=verbose
    )
    return _finish(pruned, masks)


def gradual_magnitude_pruning(
    model,
    sparsity,
    x,
    y,
    epochs=10,
    batch_size=128,
    learning_rate=1e-4,
    begin_fraction=0.0,
    end_fraction=0.7,
    frequency=100,
    initial_sparsity=0.0,
    power=3,
    structure="unstructured",
    scope="per_layer",
    layer_floor=projection.DEFAULT_LAYER_FLOOR,
    verbose=0,
):
    """Gradual magnitude pruning with tfmot's `PolynomialDecay` schedule, in Keras 3.

    The native equivalent of `tfmot.sparsity.keras.prune_low_magnitude` with
    `PolynomialDecay(initial_sparsity, final_sparsity, begin_step, end_step, power,
    frequency)`: every `frequency` steps between `begin_step` and `end_step` each prunable
    layer (`scope="per_layer"`, tfmot's behaviour) is re-masked to the scheduled sparsity
    by weight magnitude; pruned weights are held at zero after every step; training
    continues to the end of the budget with the final mask.

    Args:
        model: A trained `keras.Model` (logits or probabilities). Not changed.
        sparsity: Final fraction of prunable weights at zero, in [0, 1).
        x: Training inputs.
        y: Integer labels.
        epochs: Total epochs (pruning and recovery). Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate (cosine-decayed). Defaults to `1e-4`.
        begin_fraction: Where pruning begins, as a fraction of all steps. Defaults to `0.0`.
        end_fraction: Where the final sparsity is reached. Defaults to `0.7`.
        frequency: Steps between mask updates. Defaults to `100`.
        initial_sparsity: Sparsity at the first pruning step. Defaults to `0.0`.
        power: Exponent of the polynomial schedule. Defaults to `3`.
        structure: As in `magnitude_masks`. Defaults to `"unstructured"`.
        scope: `"per_layer"` (tfmot) or `"global"`. Defaults to `"per_layer"`.
        layer_floor: With `scope="global"`, the layer-collapse floor, as in
            `magnitude_masks`. Defaults to `"auto"`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A new `keras.Model` with exactly `sparsity` of its prunable weights
        (`keras_fip.core.projection.prunable_variables`) at zero, carrying its masks.
    """
    _check_common(model, sparsity, x, y, epochs, batch_size, structure, scope, layer_floor)
    if not 0.0 <= begin_fraction < end_fraction <= 1.0:
        raise ValueError(
            "`begin_fraction` and `end_fraction` must satisfy 0 <= begin < end <= 1. "
            f"Received: begin_fraction={begin_fraction}, end_fraction={end_fraction}"
        )
    if not isinstance(frequency, int) or frequency < 1:
        raise ValueError(
            f"`frequency` must be a positive integer. Received: frequency={frequency!r}"
        )
    pruned = copy_lib.copy_model(model)
    variables = projection.prunable_variables(pruned)
    begin_step, end_step, frequency = gradual_schedule_steps(
        data_adapter.num_examples(x), batch_size, epochs, begin_fraction, end_fraction, frequency
    )

    def schedule(step):
        if step < begin_step:
            return 0.0
        return polynomial_decay_sparsity(
            step, sparsity, begin_step, end_step, initial_sparsity, power
        )

    hold = _HoldMasks(variables, schedule, frequency, structure, scope, layer_floor=layer_floor)
    training.train_classifier(
        pruned, x, y, epochs, batch_size, learning_rate, callbacks=[hold], verbose=verbose
    )
    # Make sure the final sparsity is exact, whatever the step count.
    masks = projection.magnitude_masks(
        pruned, sparsity, structure, scope, variables, hold.masks, layer_floor=layer_floor
    )
    return _finish(pruned, masks)


def lottery_ticket(
    model,
    sparsity,
    x,
    y,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    rounds=3,
    rewind_weights=None,
    structure="unstructured",
    scope="global",
    layer_floor=projection.DEFAULT_LAYER_FLOOR,
    verbose=0,
):
    """Iterative magnitude pruning with rewinding (the lottery-ticket procedure).

    Each of `rounds` rounds prunes the smallest surviving weights so that sparsity follows
    `1 - (1 - sparsity) ** (r / rounds)`, rewinds the surviving weights to
    `rewind_weights` (by default the weights of `model` itself: rewinding to the trained
    network, i.e. "learning-rate rewinding" of Renda et al. 2020; pass early-training
    weights for Frankle et al.'s weight rewinding) and retrains for `epochs // rounds`
    epochs, so the whole procedure uses the same epoch budget as the other methods.

    Args:
        model: A trained `keras.Model` (logits or probabilities). Not changed.
        sparsity: Final fraction of prunable weights at zero, in [0, 1).
        x: Training inputs.
        y: Integer labels.
        epochs: Total epochs over all rounds. Defaults to `10`.
        batch_size: Examples per step. Defaults to `128`.
        learning_rate: Initial Adam learning rate of each round (cosine-decayed). Defaults
            to `1e-3`.
        rounds: Pruning rounds (at most `epochs`). Defaults to `3`.
        rewind_weights: Weights (as from `get_weights()`) to rewind to. Defaults to `None`
            (the given model's weights).
        structure: As in `magnitude_masks`. Defaults to `"unstructured"`.
        scope: `"global"` or `"per_layer"`. Defaults to `"global"`.
        layer_floor: The layer-collapse floor of the global ranking, as in
            `magnitude_masks`. Defaults to `"auto"`.
        verbose: Keras verbosity. Defaults to `0`.

    Returns:
        A new `keras.Model` with exactly `sparsity` of its prunable weights
        (`keras_fip.core.projection.prunable_variables`) at zero, carrying its masks.
    """
    _check_common(model, sparsity, x, y, epochs, batch_size, structure, scope, layer_floor)
    if not isinstance(rounds, int) or not 1 <= rounds <= epochs:
        raise ValueError(
            f"`rounds` must be an integer in [1, epochs={epochs}]. Received: rounds={rounds!r}"
        )
    pruned = copy_lib.copy_model(model)
    rewind = [np.array(w) for w in (rewind_weights or model.get_weights())]
    variables = projection.prunable_variables(pruned)
    masks = {}
    epochs_per_round = [epochs // rounds + (1 if r < epochs % rounds else 0) for r in range(rounds)]
    for r in range(1, rounds + 1):
        target = 1.0 - (1.0 - sparsity) ** (r / rounds)
        masks = projection.magnitude_masks(
            pruned, target, structure, scope, variables, masks, layer_floor=layer_floor
        )
        pruned.set_weights(rewind)
        hold = _HoldMasks(variables, masks=masks)
        training.train_classifier(
            pruned,
            x,
            y,
            epochs_per_round[r - 1],
            batch_size,
            learning_rate,
            callbacks=[hold],
            verbose=verbose,
        )
    return _finish(pruned, masks)
