"""`Repair`: recover a damaged network along a functionally invariant path."""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from keras_fip import distribute
from keras_fip.engine import data_adapter
from keras_fip.engine import distances as distances_lib
from keras_fip.engine import masks as masks_lib
from keras_fip.engine import normalization
from keras_fip.engine import outputs as outputs_lib
from keras_fip.engine import projection
from keras_fip.engine import step_rules
from keras_fip.engine.copy import copy_model
from keras_fip.engine.data_adapter import check_inputs_match_model
from keras_fip.engine.data_adapter import fip_dataset
from keras_fip.engine.data_adapter import normalize_data
from keras_fip.engine.path import Path
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.operations import compress as compress_lib
from keras_fip.operations import damage as damage_lib
from keras_fip.operations.base import Operation
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import model_output_kind

try:  # scikit-learn's dependency; optional here.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

METHODS = ("fip", "retrain", "embryonic")
OPTIMIZERS = ("adam", "sgd")
# The solves `"auto"` plans (when the model's architecture allows them): inputs of the
# output-only first batch, of each later batch, and sweeps; all solve batches together
# read at most this fraction of the training examples (each input once).
_AUTO_SOLVE_FIRST = 2000
_AUTO_SOLVE_EXAMPLES = 5000
_AUTO_SOLVE_SWEEPS = 4
_AUTO_SOLVE_FRACTION = 0.5
# Unknowns (output-layer weights × outputs) up to which the softmax-weighted solve is a
# direct dense solve; a larger output layer is fitted in plain least squares.
_MAX_WEIGHTED_UNKNOWNS = 5000
# `task_weight="auto"` with labelled data: the weights of the task cross-entropy walked,
# the one that does best on the validation split kept.
_AUTO_TASK_WEIGHTS = (1.0, 10.0)


def _predict(model, x, batch_size=1000):
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(data_adapter.take(x, slice(i, i + batch_size)), training=False)
            )
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )


def _score(model, x, targets):
    """Accuracy of `model` on `(x, targets)` (targets: labels, or reference predictions)."""
    return float(np.mean(np.argmax(_predict(model, x), axis=-1) == np.asarray(targets)))


def _activation_slope(activation, pre):
    """(activation'(pre), activation(pre)) of an elementwise activation, as float64."""
    if activation in (None, keras.activations.linear):
        return np.ones_like(pre), pre
    values = tf.constant(pre)
    with tf.GradientTape() as tape:
        tape.watch(values)
        outputs = activation(values)
    slope = tape.gradient(outputs, values)
    return np.asarray(slope, np.float64), np.asarray(outputs, np.float64)


def _reinitialise(model, damage_masks, rng, scale=1.0):
    """Draws fresh values for the damaged entries of each variable (in place).

    Each damaged entry is drawn from a normal distribution with the mean and standard
    deviation of the variable's surviving entries (a BatchNorm scale comes back near its
    survivors' mean, a kernel entry near zero with the kernel's spread), times `scale`
    around that mean; a variable with no survivor uses Glorot's standard deviation.
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

    The shared loop of `Repair`'s supervised methods and the prune-and-retrain baseline:
    every step sees `batch_size` labelled examples (shuffled every pass), so the epochs of
    every method count the same examples. Masks the model carries are kept exactly
    (`MaskedOptimizer`); `masks` (a list of `keras.Variable`s of 0/1 aligned with the
    trainable variables, or `None` entries) are multiplied in after every step, so a caller
    may change them between steps without retracing.

    Args:
        model: A `keras.Model` returning logits or probabilities (the cross-entropy is
            taken on its logits, or on the log-probabilities of a model ending in a
            softmax). Changed in place.
        x: Inputs.
        y: Integer labels.
        steps: Number of steps.
        learning_rate: Learning rate.
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
    """
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
    carried = any(masks_lib._mask_of(v) is not None for v in variables)
    optimizer = masks_lib.MaskedOptimizer(inner) if carried else inner
    optimizer.build(variables)  # Its slots are created here, not inside a replica step.
    scales = None
    if gradient_scales is not None:
        scales = [
            None if s is None else tf.constant(s, v.dtype)
            for s, v in zip(gradient_scales, variables)
        ]

    def replica_step(batch):
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

    step = distribute.replica_step(replica_step)

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
    for batch in distribute.distribute_dataset(dataset.take(steps)):
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


class _EpochEvaluator(keras.callbacks.Callback):
    """Evaluates the walked network every `every` steps of a FIP walk (and can stop it)."""

    def __init__(self, evaluate, every):
        super().__init__()
        self.evaluate = evaluate
        self.every = every
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0 and self.evaluate(self.step):
            self.model.stop_training = True


@keras.saving.register_keras_serializable(package="keras_fip")
class Repair(Operation):
    """Repairs a damaged network: walks it back to the undamaged network's function.

    The three repair strategies of the resilience and damage-rescue papers, on a model
    returned by `keras_fip.Damage` (whose undamaged network it finds on the model,
    `keras_fip.damage_reference`) or with the undamaged network passed as `reference`:

    - `"fip"` (default): a functionally invariant path from the damaged weights back to
      the undamaged network's outputs, with the damaged weights held exactly at zero by
      their masks. Where the model ends in a Dense layer (linear or softmax) and is not
      walked on BatchNorm batch statistics, the path starts with solves on fresh training
      inputs (`solve_output_layer="auto"`): the output layer set to the exact minimiser of
      the softmax-weighted distance to the undamaged logits (its pre-activation), and, when
      that layer reads a hidden Dense layer (an MLP), Gauss-Newton sweeps of the hidden
      units (`solve_sweeps`), half an epoch of inputs at most, every input counted in the
      epochs. Then the FIP trainer minimises the output distance D (the KL at temperature
      `distance_temperature`) between the network and the undamaged one on the inputs of
      `data`, plus, when `data` has labels, the task cross-entropy: `task_weight="auto"`
      walks with the weights 1 and 10 from the same start and keeps the network that does
      best on the validation split (held out of `data`, as a baseline's learning rate is
      chosen; the first to recover with `stop_at_target`): twice the walk's compute, the
      epochs of one walk (`op.history["candidates"]`). The weight matters where the
      undamaged network is weak: on the BatchNorm residual net of
      `benchmarks.damage_repair_users` (83% on the digits) 10 reaches 91.9% where 1
      reaches 78.6%. With inputs only (`data=x`, or `task_weight=0`) it is the pure function
      recovery: nothing but the undamaged network's outputs. With `num_paths > 1`, that
      many paths (different data orders) are walked and the one of least length in the
      metric g (Σ √(Δwᵀ g Δw) over its steps, measured by the trainer) among those that
      recover is kept, as the paper does.
    - `"retrain"`: strategy 1 of the damage-rescue paper: supervised retraining of the
      surviving sub-network on labelled `data`, the damaged weights held at zero.
    - `"embryonic"`: strategy 2: the damaged weights are re-initialised (drawn with their
      variable's surviving mean and spread) and released, and trained on labelled `data`:
      only they (`plasticity=0`), or with the surviving weights' gradients scaled by
      `plasticity`.

    Releasing damage, the C3 → C4 transition of the resilience paper (deleted filters
    restored): `release=True` re-initialises the damaged weights and removes their masks
    before `"fip"` or `"retrain"` (masks the network carried before the damage stay); the
    path then grows the restored units back into the undamaged function. Without it, the
    returned model keeps the damage masks, so later training keeps the damaged weights at
    zero. `keras_fip.damage_reference(model).restore(model)` is the exact undo of the
    damage. The returned model carries the same damage reference (and the repair record in
    its `records`), so `Damage` then `Repair` can repeat (`keras_fip.DamageRepair`).

    A model ending in a softmax is repaired as its twin returning logits is: the solves fit
    its output layer's pre-activation, and D and the cross-entropies read its
    log-probabilities (`keras_fip.engine.outputs`), so both give the same weights. Labels
    may be class indices or one-hot rows (`keras.utils.to_categorical`), in `data` and
    `validation_data` alike: both give the same repair.

    Measured with the defaults (`python -m apps.repair --repair_parts=recovery`): MNIST
    MLP-1 with 80% of its hidden units deleted recovers to within 1 point of the undamaged
    network in 0.394 epochs (3 seeds; the solves alone), against 1.80 epochs of tuned
    retraining and 2.08 of tuned prune-one-at-a-time. With half their units deleted and
    the epochs of retraining (`python -m benchmarks.damage_repair_users --seeds=0,1,2`):
    the keras.io MNIST convnet (softmax, one-hot labels) 97.95% against tuned
    retraining's 97.23% (undamaged 98.25%), the BatchNorm residual net on the digits
    91.0% against 92.8% (undamaged 88.2%: retraining, not held to the undamaged
    function, passes it).

    Epochs are passes over the training examples of `data`: every method takes
    ⌈N/`batch_size`⌉ steps of `batch_size` examples per epoch, the FIP's solves counting
    their inputs, within the same budget of `epochs`. After a call, `op.history` holds
    `"epoch"` (fractional epochs of each evaluation, 0 = the damaged network),
    `"val_accuracy"` (accuracy on the validation split at each), `"undamaged_accuracy"`,
    `"epochs_to_recover"` (the first evaluation within `target` of the undamaged
    accuracy, or `None`), `"steps"` and, for `"fip"`, `"solve_epochs"` (the epochs its
    solves used before the walk), `"task_weight"` (the labels' weight it walked with)
    and the walk's per-step scalars; `op.path` is the FIP path (`keras_fip.Path`). Without labels
    anywhere, "accuracy" is the agreement with the undamaged network's predictions (the
    undamaged network scores 1).

    Args:
        data: Training data: inputs (enough for `"fip"`), an `(x, y)` tuple or a finite
            `tf.data.Dataset`. Defaults to `None` (the inputs the model carries, or those
            the damage reference recorded).
        method: `"fip"`, `"retrain"` or `"embryonic"`. Defaults to `"fip"`.
        reference: The undamaged network: a `keras.Model` with the damaged model's weight
            layout, or a `keras_fip.operations.DamageReference`. Defaults to `None` (the
            reference `Damage` recorded on the model).
        epochs: Maximum passes over the training examples. Defaults to `10`.
        target: Recovered means within this much of the undamaged accuracy. Defaults to
            `0.01` (1 percentage point).
        num_paths: Candidate FIP paths; the shortest in the metric is kept. Defaults to
            `1`.
        validation_data: Labelled `(x, y)` on which accuracy is measured. Defaults to
            `None` (a seeded `validation_split` of `data`).
        validation_split: Fraction of `data` held out for validation when
            `validation_data` is not given. Defaults to `0.1`.
        evaluations_per_epoch: Validation measurements per epoch (`epochs_to_recover` is
            resolved to 1/this of an epoch). Defaults to `20`.
        stop_at_target: Whether to stop as soon as the network has recovered (a network
            already within `target` is returned as it is, without solves). Defaults to
            `False`.
        release: Whether to re-initialise and release the damaged weights first (`"fip"`,
            `"retrain"`; `"embryonic"` always does). Defaults to `False`.
        task_weight: For `"fip"` with labelled `data`, the weight of the task
            cross-entropy added to D: `"auto"` (with labels, the better of 1 and 10 on the
            validation split; 0 without) or a number ≥ 0 (0: the pure function recovery,
            labels only measure accuracy). Defaults to `"auto"`.
        plasticity: For `"embryonic"`, the gradient multiplier of the surviving weights
            (0: only the re-initialised weights train). Defaults to `0.0`.
        init_scale: Spread of re-initialised weights relative to their survivors'.
            Defaults to `1.0`.
        learning_rate: Learning rate of every method, or `"auto"`: 0.044 × the RMS of
            the damaged model's non-zero Dense/Conv kernels, Compress's rule (Adam moves
            every weight by about the rate per step, so the step is relative to the
            weights: 3.0e-3 on MNIST MLP-1, 3.2e-3 on the keras.io MNIST convnet, 6.3e-3
            on the BatchNorm residual net, whose kernels grew in training). Defaults to
            `"auto"`.
        optimizer: `"adam"` or `"sgd"` (momentum 0.9). Defaults to `"adam"`.
        batch_size: Examples per step. Defaults to `128`.
        distance: Output distance D of `"fip"` (`"l2"`, `"kl"`, `"bhattacharyya"`).
            Defaults to `"kl"`.
        distance_temperature: `None`, or a temperature T > 0: the walk's D is taken
            between the logits divided by T, times T² (with `"kl"`, the softened
            distillation loss of Hinton et al., whose gradient keeps its scale as T
            grows). Defaults to `4.0`.
        training: Mode of the moving network on the FIP path: `True` runs BatchNorm on
            batch statistics (moving statistics recalibrated on `data` before every
            evaluation), `"auto"` when the model has BatchNormalization. Defaults to
            `"auto"`.
        record_every: Record the weights in `op.path` every this many steps (and at
            the end of each walk). The walk measures `step_norm` and
            `distance_from_start` at the recorded points only
            (`FIPTrainer(measure_every=record_every)`: `op.history` holds NaN
            between them), and a non-finite step puts the model back on the last
            recorded point. Defaults to `100`.
        path_directory: Directory to stream the path to, or `None`. Defaults to `None`.
        jit_compile: Whether to compile the FIP step with XLA. Defaults to `False`.
        seed: Shuffle, split and initialisation seed. Defaults to `None`.
        solve_output_layer: For `"fip"`: the number of training inputs on which the
            output layer (a Dense layer, linear or softmax) is first set to the exact
            minimiser of the (weighted, `solve_temperature`) squared distance of its
            pre-activation to the undamaged network's logits, its kernel and bias the
            least-squares fit of the undamaged logits from the damaged network's features
            (D is quadratic in that layer's weights, so this is the walk's objective,
            to second order, solved in closed form over them); the walk then starts there.
            These inputs count towards the epochs (`history["epoch"]` starts at
            `solve_output_layer / N` after the solve). `"auto"`: 5,000 where the model
            ends in such a layer and is not walked on BatchNorm batch statistics (the
            solves fit the inference function), else none; the auto batches together read
            at most half the training examples (each input once), smaller ones when
            `data` is small. An output layer with more than 5,000 weights (times
            outputs) is fitted in plain least squares. 0: no solve. Defaults to
            `"auto"`.
        solve_sweeps: For `"fip"` with solves: Gauss-Newton sweeps over the
            last hidden layer (a Dense layer with an elementwise activation feeding the
            output layer) before the walk, a layer-wise reconstruction in the spirit of the
            pruning literature (OBS, layer-wise least squares), on inputs only. Each sweep
            draws `solve_output_layer` fresh training inputs and queries the undamaged
            network on them; it solves the output layer as above, then, with the output
            weights and the activation pattern fixed, the logits are linear in each
            surviving hidden unit's incoming weights, and each unit in turn (Gauss-Seidel,
            the residual updated after each) takes the least-squares step of its incoming
            weights and bias towards the undamaged logits, restricted to the leading
            `solve_rank` principal directions of the layer's inputs (measured on the first
            solve batch; the full input dimension over-fits a few thousand inputs). A last
            batch then solves the output layer again. Damaged weights stay exactly zero
            (a unit's step only uses its unmasked inputs; deleted units are not touched).
            Every batch counts towards the epochs: the walk starts at
            `(solve_sweeps + 1) * solve_output_layer / N`. The validation accuracy is
            measured after every output-layer solve (an entry of `history`); with
            `stop_at_target`, the solves stop once the network has recovered. `"auto"`:
            4 where the output layer reads such a hidden layer, else 0. Defaults to
            `"auto"`.
        solve_rank: Principal directions of the hidden layer's inputs in which the
            sweeps move each unit's weights. Defaults to `200`.
        solve_first: For `"fip"` with sweeps: the inputs of a first batch on which only
            the output layer is solved, before the sweeps' batches (a light damage is
            often repaired by this solve alone, so a small first batch saves inputs; the
            sweeps want larger batches). Counted like the others: the walk then starts at
            `(solve_first + (solve_sweeps + 1) * solve_output_layer) / N` epochs.
            `"auto"`: 2,000 when there are sweeps. 0: none. Defaults to `"auto"`.
        solve_temperature: `None` (the solves fit the undamaged logits in plain least
            squares), or a temperature T > 0: the solves (output layer and sweeps)
            minimise instead the logit-space Gauss-Newton model of the softmax KL at
            temperature T around the undamaged outputs,
            Σ_x (z(x) − z*(x))ᵀ H(x) (z(x) − z*(x)) with H = diag(p) − p pᵀ + εI and
            p = softmax(z*/T) (ε = 1e-3: the shift every softmax ignores stays
            determined). Logit errors between classes the undamaged network does not
            consider are weighted down, those between its likely classes up; the solve
            is still exact (a weighted least-squares system) and uses the same inputs.
            Defaults to `4.0`.
        solve_damping: Levenberg-Marquardt damping of each unit's step in the sweeps:
            λ times the mean diagonal of its Gauss-Newton matrix is added to that matrix
            (a ridge on the step). The sweeps fit a few hundred directions per unit on
            one batch; a larger λ keeps each step from fitting that batch's noise (on
            MNIST MLP-1 with 80% of its units deleted, λ = 0.1 recovered more accuracy per
            input than 1e-6). Defaults to `0.1`.
        **kwargs: `Operation` arguments (`name`, `verbose`, `callbacks`, `log_dir`).

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(64, input_shape=(8, 8, 1))
    >>> _ = keras_fip.models.train_classifier(model, x, y, epochs=5)
    >>> damaged = keras_fip.Damage("nodes", fraction=0.5, seed=0)(model)
    >>> op = keras_fip.Repair(data=(x, y), epochs=2, seed=0, verbose=0)
    >>> repaired = op(damaged)
    >>> op.history["epochs"] <= 2, op.history["task_weight"] in (1.0, 10.0)
    (True, True)
    >>> restored = keras_fip.damage_reference(repaired).restore(repaired)  # the undo
    """

    def __init__(
        self,
        data=None,
        method="fip",
        reference=None,
        epochs=10,
        target=0.01,
        num_paths=1,
        validation_data=None,
        validation_split=0.1,
        evaluations_per_epoch=20,
        stop_at_target=False,
        release=False,
        task_weight="auto",
        plasticity=0.0,
        init_scale=1.0,
        learning_rate="auto",
        optimizer="adam",
        batch_size=128,
        distance="kl",
        training="auto",
        record_every=100,
        path_directory=None,
        jit_compile=False,
        seed=None,
        solve_output_layer="auto",
        solve_sweeps="auto",
        solve_rank=200,
        solve_first="auto",
        solve_temperature=4.0,
        distance_temperature=4.0,
        solve_damping=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.method = self.check_choice(method, "method", METHODS)
        labels = None
        if data is not None:
            # Shapes, numbers and finiteness checked here; against the model in `call`.
            x, labels = normalize_data(data, name="data")
        if method in ("retrain", "embryonic") and data is not None and labels is None:
            raise ValueError(
                f"`method={method!r}` trains on labels: `data` must be an `(x, y)` tuple "
                "or a dataset of pairs. Received: data with inputs only"
            )
        if reference is not None and not isinstance(
            reference, (keras.Model, damage_lib.DamageReference)
        ):
            raise ValueError(
                "`reference` must be the undamaged `keras.Model` or a `DamageReference`. "
                f"Received: reference={reference!r}"
            )
        if validation_data is not None:
            _, validation_labels = normalize_data(validation_data, name="validation_data")
            if validation_labels is None:
                raise ValueError(
                    "`validation_data` must be labelled: an `(x, y)` tuple. "
                    "Received: validation_data with inputs only"
                )
        self.data = data
        self.reference = reference
        self.validation_data = validation_data
        self.epochs = self.check_number(epochs, "epochs", low=1, low_inclusive=True, integer=True)
        self.target = self.check_number(target, "target", low=0.0, high=1.0, low_inclusive=True)
        self.num_paths = self.check_number(
            num_paths, "num_paths", low=1, low_inclusive=True, integer=True
        )
        if self.num_paths > 1 and method != "fip":
            raise ValueError(
                "`num_paths` candidate paths are walked by `method='fip'` only. "
                f"Received: num_paths={num_paths!r} with method={method!r}"
            )
        self.validation_split = self.check_number(
            validation_split, "validation_split", low=0.0, high=1.0
        )
        self.evaluations_per_epoch = self.check_number(
            evaluations_per_epoch, "evaluations_per_epoch", low=1, low_inclusive=True, integer=True
        )
        self.stop_at_target = bool(stop_at_target)
        if not isinstance(release, (bool, np.bool_)):
            raise ValueError(f"`release` must be a boolean. Received: release={release!r}")
        self.release = bool(release)
        if task_weight == "auto":
            self.task_weight = "auto"
        else:
            self.task_weight = self.check_number(
                task_weight, "task_weight", low=0.0, low_inclusive=True
            )
        if self.task_weight not in ("auto", 0.0) and method != "fip":
            raise ValueError(
                "`task_weight` weighs the task loss on the FIP path (`method='fip'`). "
                f"Received: task_weight={task_weight!r} with method={method!r}"
            )
        if self.task_weight not in ("auto", 0.0) and data is not None and labels is None:
            raise ValueError(
                "`task_weight > 0` needs labelled `data` (an `(x, y)` tuple). "
                f"Received: task_weight={task_weight!r} with inputs only"
            )
        self.plasticity = self.check_number(plasticity, "plasticity", low=0.0, low_inclusive=True)
        self.init_scale = self.check_number(init_scale, "init_scale", low=0.0, low_inclusive=True)
        if isinstance(learning_rate, str) and learning_rate == "auto":
            self.learning_rate = "auto"
        else:
            self.learning_rate = self.check_number(learning_rate, "learning_rate", low=0.0)
        self.optimizer = self.check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.batch_size = self.check_number(
            batch_size, "batch_size", low=1, low_inclusive=True, integer=True
        )
        distances_lib.get(distance)
        self.distance = distance
        self.training = self.check_training(training)
        self.record_every, self.path_directory, self.seed = self.check_path_options(
            record_every, path_directory, seed
        )
        self.jit_compile = bool(jit_compile)
        self.solve_output_layer = self._count_or_auto(solve_output_layer, "solve_output_layer")
        if self.solve_output_layer not in ("auto", 0) and method != "fip":
            raise ValueError(
                "`solve_output_layer` starts the FIP (`method='fip'`). Received: "
                f"solve_output_layer={solve_output_layer!r} with method={method!r}"
            )
        self.solve_sweeps = self._count_or_auto(solve_sweeps, "solve_sweeps")
        if self.solve_sweeps not in ("auto", 0) and self.solve_output_layer == 0:
            raise ValueError(
                "`solve_sweeps` runs on `solve_output_layer` inputs per sweep: pass "
                "`solve_output_layer > 0` or 'auto' (and `method='fip'`). Received: "
                f"solve_sweeps={solve_sweeps!r} with solve_output_layer={solve_output_layer!r}"
            )
        self.solve_rank = self.check_number(
            solve_rank, "solve_rank", low=1, low_inclusive=True, integer=True
        )
        self.distance_temperature = (
            None
            if distance_temperature is None
            else self.check_number(distance_temperature, "distance_temperature", low=0.0)
        )
        self.solve_first = self._count_or_auto(solve_first, "solve_first")
        if self.solve_first not in ("auto", 0) and self.solve_sweeps == 0:
            raise ValueError(
                "`solve_first` is an output-only batch before the sweeps: pass "
                f"`solve_sweeps > 0` or 'auto'. Received: solve_first={solve_first!r} with "
                f"solve_sweeps={solve_sweeps!r}"
            )
        self.solve_temperature = (
            None
            if solve_temperature is None
            else self.check_number(solve_temperature, "solve_temperature", low=0.0)
        )
        self.solve_damping = self.check_number(
            solve_damping, "solve_damping", low=0.0, low_inclusive=True
        )

    def _count_or_auto(self, value, name):
        """`"auto"`, or `value` checked as an integer ≥ 0."""
        if isinstance(value, str) and value == "auto":
            return "auto"
        if isinstance(value, str):
            raise ValueError(
                f"`{name}` must be 'auto' or an integer >= 0. Received: {name}={value!r}"
            )
        return self.check_number(value, name, low=0, low_inclusive=True, integer=True)

    # Calling.

    def __call__(self, model):
        self._recorded = (
            damage_lib.damage_reference(model) if isinstance(model, keras.Model) else None
        )
        try:
            return super().__call__(model)
        finally:
            self._recorded = None

    def call(self, model):
        # The undamaged network, the damage masks, the data
        reference = self._resolve_reference(model)
        undamaged = reference.restore(model)
        x, y = self._training_data(model, reference)
        x, y, x_val, y_val = self._split(x, y, undamaged)
        if self.method in ("retrain", "embryonic") and y is None:
            raise ValueError(
                f"`method={self.method!r}` trains on labels, and neither `data` nor the "
                "model's carried data have them. Pass `data=(x, y)`. Received: data=None"
            )
        self._undamaged_score = _score(undamaged, x_val, y_val)
        self._normalized = bool(normalization.batch_normalization_layers(model))
        self._rng = np.random.default_rng(self.seed)
        self._steps_per_epoch = max(1, math.ceil(data_adapter.num_examples(x) / self.batch_size))
        self._every = max(1, self._steps_per_epoch // self.evaluations_per_epoch)
        self._rate = self._learning_rate(model)

        # Release the damage (re-initialise, unmask) for embryonic and release=True
        released = self.release or self.method == "embryonic"
        if released:
            model = self._released(model, reference)

        # Repair
        if self.method == "fip":
            model, history = self._repair_fip(model, undamaged, x, y, x_val, y_val)
        else:
            model, history = self._repair_supervised(model, reference, x, y, x_val, y_val, released)
        history["epochs"] = history["steps"] / self._steps_per_epoch
        self.history = history
        self._attach(model, reference, released)
        return model

    def _resolve_reference(self, model):
        """The `DamageReference` to repair towards (recorded, or built from `reference`)."""
        reference = self.reference if self.reference is not None else self._recorded
        if reference is None:
            raise ValueError(
                f"`model` ({model.name}) carries no damage record (it was not returned by "
                "`keras_fip.Damage`) and no `reference` was given: pass the undamaged "
                "network as `reference=`. Received: reference=None"
            )
        variables = model.trainable_variables
        if isinstance(reference, damage_lib.DamageReference):
            shapes = [tuple(np.shape(w)) for w in reference.weights]
            if shapes != [tuple(w.shape) for w in model.weights]:
                raise ValueError(
                    "`reference` must have the damaged model's weight shapes. Received: "
                    f"reference weight shapes {shapes[:4]}..., model "
                    f"{[tuple(w.shape) for w in model.weights][:4]}..."
                )
            return reference
        shapes = [tuple(w.shape) for w in reference.weights]
        if shapes != [tuple(w.shape) for w in model.weights]:
            raise ValueError(
                "`reference` must be the undamaged network with the damaged model's weight "
                f"shapes. Received: reference={reference.name} with shapes {shapes}, model "
                f"{model.name} with {[tuple(w.shape) for w in model.weights]}"
            )
        # Damage masks: what the damaged model holds at zero that the reference does not
        reference_masks = [masks_lib._mask_of(v) for v in reference.trainable_variables]
        damage_masks = []
        for variable, before in zip(variables, reference_masks):
            mask = masks_lib._mask_of(variable)
            if mask is None:
                damage_masks.append(None)
                continue
            held = mask if before is None else (mask | ~before)
            damage_masks.append(None if held.all() else held)
        return damage_lib.DamageReference(
            [np.array(w.numpy()) for w in reference.weights], reference_masks, damage_masks
        )

    def _training_data(self, model, reference):
        data = self.data
        if data is None:
            data = carried_data(model)
        if data is None:
            data = reference.inputs
        if data is None:
            raise ValueError(
                "`data` is required: the model carries no inputs and the damage recorded "
                "none. Received: data=None"
            )
        x, y = normalize_data(data, name="data", model=model)
        check_inputs_match_model(model, x)
        return data_adapter.as_arrays(x), None if y is None else np.asarray(y)

    def _split(self, x, y, undamaged):
        """(x, y, x_val, y_val): validation labels, or the undamaged predictions."""
        if self.validation_data is not None:
            x_val, y_val = normalize_data(
                self.validation_data, name="validation_data", model=undamaged
            )
            check_inputs_match_model(undamaged, x_val, name="validation_data")
            return x, y, data_adapter.as_arrays(x_val), np.asarray(y_val)
        count = data_adapter.num_examples(x)
        order = np.random.default_rng(self.seed).permutation(count)
        held = max(1, int(round(self.validation_split * count)))
        if held >= count:
            raise ValueError(
                f"`validation_split` leaves no training data ({count} examples). "
                f"Received: validation_split={self.validation_split!r}"
            )
        val, train = np.sort(order[:held]), np.sort(order[held:])
        x_val = data_adapter.take(x, val)
        y_val = y[val] if y is not None else np.argmax(_predict(undamaged, x_val), axis=-1)
        return (data_adapter.take(x, train), None if y is None else y[train], x_val, y_val)

    def _released(self, model, reference):
        """A copy with the damage masks removed and the damaged weights re-drawn."""
        released = masks_lib.strip_masks(model)
        _reinitialise(released, reference.damage_masks, self._rng, self.init_scale)
        if any(mask is not None for mask in reference.masks):
            masks_lib.apply_masks(released, reference.masks)
        return released

    # Evaluation.

    def _evaluator(self, model, x, x_val, y_val, history, offset=0):
        """`evaluate(step) -> stop`: records accuracy at epoch (step + offset)/N."""
        recalibrate = self._normalized

        def evaluate(step):
            if recalibrate:
                normalization.recalibrate_batch_normalization(
                    model, x, self.batch_size * 2, max_examples=4096
                )
            accuracy = _score(model, x_val, y_val)
            history["epoch"].append((step + offset) / self._steps_per_epoch)
            history["val_accuracy"].append(accuracy)
            recovered = accuracy >= self._undamaged_score - self.target - 1e-12
            if recovered and history["epochs_to_recover"] is None:
                history["epochs_to_recover"] = history["epoch"][-1]
            return recovered and self.stop_at_target

        return evaluate

    def _new_history(self, model, x_val, y_val):
        accuracy = _score(model, x_val, y_val)
        recovered = accuracy >= self._undamaged_score - self.target - 1e-12
        return {
            "epoch": [0.0],
            "val_accuracy": [accuracy],
            "undamaged_accuracy": self._undamaged_score,
            "epochs_to_recover": 0.0 if recovered else None,
        }

    # The methods.

    def _solve_plan(self, model, count):
        """`(output layer, hidden layer or None, batch sizes, output-only first batches)` of
        the solves on `count` training examples, or `None` when there are none."""
        if self.method != "fip" or self.solve_output_layer == 0:
            return None
        walk_training = self._normalized if self.training == "auto" else self.training
        if self.solve_output_layer == "auto" and walk_training:
            return None  # The solves fit the inference function, not the batch statistics.
        layer = model.layers[-1] if model.layers else None
        try:
            readable = (
                isinstance(layer, keras.layers.Dense)
                and len(model.outputs) == 1
                and model.outputs[0] is layer.output
                and (
                    layer.activation in (None, keras.activations.linear)
                    or outputs_lib.structural_output_kind(model) == "probabilities"
                )
            )
        except (AttributeError, ValueError):  # Subclassed models: no graph to read.
            readable = False
        if not readable:
            if self.solve_output_layer == "auto":
                return None
            raise ValueError(
                "`solve_output_layer` needs a model whose last layer is a Dense layer "
                "returning the logits (linear) or the probabilities (softmax). Received: a "
                f"model ending in `{getattr(layer, 'name', None)}` ({type(layer).__name__})"
            )
        size = (
            _AUTO_SOLVE_EXAMPLES if self.solve_output_layer == "auto" else self.solve_output_layer
        )
        sweeps = self.solve_sweeps
        if sweeps == "auto":
            hidden = self._hidden_layer(model, layer, required=False)
            sweeps = _AUTO_SOLVE_SWEEPS if hidden is not None else 0
        else:
            hidden = self._hidden_layer(model, layer) if sweeps else None
        first = self.solve_first
        if first == "auto":
            first = _AUTO_SOLVE_FIRST
        first = first if hidden is not None else 0
        sizes = ([first] if first else []) + [size] * (sweeps + 1)
        sizes = [min(s, count) for s in sizes]
        automatic = (
            self.solve_output_layer == "auto"
            or (self.solve_sweeps == "auto" and sweeps > 0)
            or (self.solve_first == "auto" and first > 0)
        )
        if automatic and sum(sizes) > _AUTO_SOLVE_FRACTION * count:
            # Every solve input a fresh training example, half an epoch at most.
            scale = _AUTO_SOLVE_FRACTION * count / sum(sizes)
            sizes = [max(1, int(s * scale)) for s in sizes]
        return layer, hidden, sizes, 1 if first else 0

    def _solve_output_layer(self, model, undamaged, x, after_batch=None):
        """Least-squares output layer, then Gauss-Newton sweeps of the last hidden layer
        (each on fresh inputs), as `_solve_plan` plans them. `after_batch(inputs_used) ->
        stop` is called after each output-layer solve. Returns the number of inputs used."""
        layer, hidden, sizes, first = self._solve_plan(model, data_adapter.num_examples(x))
        order = self._rng.permutation(data_adapter.num_examples(x))
        features = keras.Model(model.inputs, (hidden or layer).input)  # Sequential too
        # The undamaged network's logits: its output layer's pre-activation (a softmax
        # model's logits, not its log-probabilities: the least squares fit them exactly).
        undamaged_layer = undamaged.layers[-1]
        undamaged_features = keras.Model(undamaged.inputs, undamaged_layer.input)
        undamaged_kernel = np.asarray(undamaged_layer.kernel.numpy(), np.float64)
        undamaged_bias = (
            0.0
            if undamaged_layer.bias is None
            else np.asarray(undamaged_layer.bias.numpy(), np.float64)
        )
        basis, used = None, 0
        for index, size in enumerate(sizes):
            chosen = np.sort(np.take(order, np.arange(used, used + size), mode="wrap"))
            used += size
            inputs = data_adapter.take(x, chosen)
            reference_features = _predict(undamaged_features, inputs).reshape(size, -1)
            targets = reference_features.astype(np.float64) @ undamaged_kernel + undamaged_bias
            below = _predict(features, inputs).reshape(size, -1).astype(np.float64)
            curvature = self._curvature(targets)
            if hidden is None:
                self._least_squares_output(layer, below, targets, curvature)
                if after_batch is not None:
                    after_batch(used)
                return used
            kernel = np.asarray(hidden.kernel.numpy(), np.float64)
            bias = (
                np.zeros(kernel.shape[1])
                if hidden.bias is None
                else np.asarray(hidden.bias.numpy(), np.float64)
            )
            pre = below @ kernel + bias
            slope, activations = _activation_slope(hidden.activation, pre)
            residual = self._least_squares_output(layer, activations, targets, curvature)
            stop = after_batch is not None and after_batch(used)
            if stop or index == len(sizes) - 1:
                return used
            if index < first:
                continue  # The output-only first batch.
            if basis is None:  # Leading principal directions of the layer's inputs, + bias
                centred = below - below.mean(axis=0)
                rank = min(self.solve_rank, *centred.shape)
                directions = np.linalg.svd(centred, full_matrices=False)[2][:rank].T
                basis = np.zeros((kernel.shape[0] + 1, rank + 1))
                basis[:-1, :rank] = directions
                basis[-1, rank] = 1.0
            self._gauss_newton_sweep(
                hidden, layer, below, slope, residual, basis, curvature, self.solve_damping
            )

    @staticmethod
    def _hidden_layer(model, layer, required=True):
        """The Dense layer (elementwise activation) whose output the output layer reads
        (`None` if there is none and it is not `required`)."""
        index = model.layers.index(layer)
        hidden = model.layers[index - 1] if index > 0 else None
        if not (
            isinstance(hidden, keras.layers.Dense)
            and layer.input is hidden.output
            and hidden.activation not in (keras.activations.softmax, keras.activations.log_softmax)
        ):
            if not required:
                return None
            raise ValueError(
                "`solve_sweeps` needs the output layer to read a hidden Dense layer with an "
                "elementwise activation directly (an MLP). Received: the output layer "
                f"`{layer.name}` after `{getattr(hidden, 'name', None)}` "
                f"({type(hidden).__name__})"
            )
        return hidden

    def _curvature(self, targets):
        """The logit weights H(x) of the solves (`solve_temperature`), or `None`."""
        if self.solve_temperature is None:
            return None
        logits = targets / self.solve_temperature
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        eye = np.eye(targets.shape[1])
        return p[:, :, None] * eye[None] - p[:, :, None] * p[:, None, :] + 1e-3 * eye[None]

    @staticmethod
    def _least_squares_output(layer, features, targets, curvature=None):
        """Sets `layer` to the least-squares fit of `targets` (weighted by `curvature`,
        per-example logit matrices, if given); returns the residual."""
        count = len(features)
        design = np.concatenate([features, np.ones((count, 1))], axis=1)
        mask = masks_lib._mask_of(layer.kernel)
        solution = np.zeros((design.shape[1], targets.shape[1]))
        if curvature is not None and design.shape[1] * targets.shape[1] > _MAX_WEIGHTED_UNKNOWNS:
            curvature = None  # Too large a dense system: plain least squares.
        if curvature is not None:
            # Σ_x (D_x W − z*_x)ᵀ H_x (D_x W − z*_x) over the free entries of vec(W):
            # the normal equations couple the outputs through H, block (c, c') =
            # Dᵀ diag(H_{cc'}) D.
            free = np.ones((design.shape[1], targets.shape[1]), bool)
            if mask is not None:
                free = np.concatenate([mask, np.ones((1, mask.shape[1]), bool)], axis=0)
            rows = free.any(axis=1)
            local = design[:, rows]
            size, outputs = local.shape[1], targets.shape[1]
            system = np.zeros((outputs * size, outputs * size))
            rhs = np.zeros((outputs, size))
            weighted_targets = np.einsum("ncd,nd->nc", curvature, targets)
            for c in range(outputs):
                rhs[c] = local.T @ weighted_targets[:, c]
                for d in range(c, outputs):
                    block = (local * curvature[:, c, d][:, None]).T @ local
                    system[c * size : (c + 1) * size, d * size : (d + 1) * size] = block
                    system[d * size : (d + 1) * size, c * size : (c + 1) * size] = block.T
            keep = free[rows].T.reshape(-1)  # vec order: output-major, like the blocks
            system = system[np.ix_(keep, keep)]
            system += np.eye(len(system)) * (1e-10 * np.trace(system) / len(system))
            values = np.zeros(outputs * size)
            values[keep] = np.linalg.solve(system, rhs.reshape(-1)[keep])
            solution[rows] = values.reshape(outputs, size).T
        elif mask is None or np.all(mask == mask[:, :1]):  # Whole rows held at zero (or none)
            rows = np.ones(design.shape[1], bool)
            if mask is not None:
                rows[:-1] = mask[:, 0]
            solution[rows], *_ = np.linalg.lstsq(design[:, rows], targets, rcond=None)
        else:  # Each output's own free inputs
            for column in range(targets.shape[1]):
                rows = np.append(mask[:, column], True)
                solution[rows, column], *_ = np.linalg.lstsq(
                    design[:, rows], targets[:, column], rcond=None
                )
        layer.kernel.assign(solution[:-1].astype(layer.kernel.dtype))
        if layer.bias is not None:
            layer.bias.assign(solution[-1].astype(layer.bias.dtype))
        else:
            solution[-1] = 0.0
        return targets - design @ solution

    @staticmethod
    def _gauss_newton_sweep(
        hidden, layer, below, slope, residual, basis, curvature=None, damping=1e-6
    ):
        """One Gauss-Seidel pass of least-squares steps over the hidden units (in place).

        With the output weights c_j (row j of the output kernel) and the activation slopes
        s_j(x) fixed, changing unit j's incoming weights by δ changes the logits by
        c_j s_j(x) (x̃·δ) (x̃: the layer's input with a 1 for the bias); δ = P u in the
        principal basis P (rows of masked inputs zeroed) minimises
        Σ_x ‖r(x) − c_j s_j(x) x̃ᵀP u‖², a (rank+1)-square system (with `curvature`,
        the H(x)-weighted norm: the scalars cᵀHc and cᵀHr replace ‖c‖² and cᵀr). The
        residual is then updated through the activation itself, so the next unit's step
        starts from the network as it now is. Each unit's system is damped
        (Levenberg-Marquardt) by `damping` times its mean diagonal.
        """
        kernel = np.asarray(hidden.kernel.numpy(), np.float64)
        bias = None if hidden.bias is None else np.asarray(hidden.bias.numpy(), np.float64)
        kernel_mask = masks_lib._mask_of(hidden.kernel)
        bias_mask = None if hidden.bias is None else masks_lib._mask_of(hidden.bias)
        readout = np.asarray(layer.kernel.numpy(), np.float64)
        extended = np.concatenate([below, np.ones((len(below), 1))], axis=1)
        projected = extended @ basis
        activation = hidden.activation
        pre = below @ kernel + (0.0 if bias is None else bias)
        _, outputs = _activation_slope(activation, pre)
        pre, outputs = np.array(pre), np.array(outputs)
        for unit in range(kernel.shape[1]):
            allowed = np.ones(kernel.shape[0] + 1, bool)
            if kernel_mask is not None:
                allowed[:-1] = kernel_mask[:, unit]
            if bias is None or (bias_mask is not None and not bias_mask[unit]):
                allowed[-1] = False
            weights = slope[:, unit]
            active = weights != 0
            c = readout[unit]
            norm = float(c @ c)
            if not allowed.any() or norm == 0.0 or not active.any():
                continue  # A deleted unit, or one the output does not read.
            if allowed.all():
                local, directions = projected[active], basis
            else:
                directions = basis * allowed[:, None]
                local = extended[active] @ directions
            if curvature is None:
                gains, targets = np.full(int(active.sum()), norm), residual[active] @ c
            else:  # cᵀ H(x) c and cᵀ H(x) r(x)
                weighted = curvature[active] @ c
                gains = weighted @ c
                targets = np.sum(weighted * residual[active], axis=1)
            scaled = local * weights[active, None]
            gram = (scaled * gains[:, None]).T @ scaled
            gram += np.eye(len(gram)) * (damping * np.trace(gram) / len(gram) + 1e-12)
            rhs = scaled.T @ targets
            step = np.linalg.solve(gram, rhs)
            delta = directions @ step
            kernel[:, unit] += delta[:-1]
            if bias is not None:
                bias[unit] += delta[-1]
            # The residual after the step, through the activation itself (Gauss-Seidel:
            # the next unit sees this one's new output).
            moved = pre[:, unit] + extended @ delta
            _, after = _activation_slope(activation, moved)
            residual -= np.outer(after - outputs[:, unit], c)
            pre[:, unit], outputs[:, unit] = moved, after
        if kernel_mask is not None:
            kernel *= kernel_mask
        hidden.kernel.assign(kernel.astype(hidden.kernel.dtype))
        if bias is not None:
            if bias_mask is not None:
                bias *= bias_mask
            hidden.bias.assign(bias.astype(hidden.bias.dtype))

    def _repair_fip(self, model, undamaged, x, y, x_val, y_val):
        walk_training = self._normalized if self.training == "auto" else self.training
        start = None
        plan = self._solve_plan(model, data_adapter.num_examples(x))
        before = _score(model, x_val, y_val) if plan is not None else None
        # A network already within the target needs no solve when stopping there.
        if plan is not None and not (
            self.stop_at_target and before >= self._undamaged_score - self.target - 1e-12
        ):
            points = []  # (epoch, validation accuracy) after each solve batch

            def after_batch(used):
                accuracy = _score(model, x_val, y_val)
                points.append((used / self.batch_size / self._steps_per_epoch, accuracy))
                return (
                    self.stop_at_target and accuracy >= self._undamaged_score - self.target - 1e-12
                )

            # Many small dense solves: one BLAS thread avoids oversubscribing the cores
            # (with TensorFlow's own threads), which made them 10× slower on a busy host.
            limit = (
                threadpool_limits(limits=1, user_api="blas")
                if threadpool_limits
                else contextlib.nullcontext()
            )
            with limit:
                solved = self._solve_output_layer(model, undamaged, x, after_batch)
            start = (before, solved / self.batch_size, points)
        weights = self._task_weights(y)
        runs = [(index, weight) for index in range(self.num_paths) for weight in weights]
        steps = self.epochs * self._steps_per_epoch
        candidates, best = [], None
        output_kind = model_output_kind(undamaged, x)
        for index, task_weight in runs:
            labelled = task_weight > 0
            seed = None if self.seed is None else self.seed + index
            candidate = copy_model(model) if len(runs) > 1 else model
            history = self._new_history(candidate, x_val, y_val)
            offset = 0
            if start is not None:  # The damaged network, then after each solve batch.
                offset = start[1]
                history["epoch"] = [0.0] + [epoch for epoch, _ in start[2]]
                history["val_accuracy"] = [start[0]] + [accuracy for _, accuracy in start[2]]
                history["epochs_to_recover"] = next(
                    (
                        epoch
                        for epoch, accuracy in zip(history["epoch"], history["val_accuracy"])
                        if accuracy >= self._undamaged_score - self.target - 1e-12
                    ),
                    None,
                )
            trainer = FIPTrainer(
                candidate,
                step_rule="penalty",
                distance=self._walk_distance(),
                beta=task_weight,
                secondary_loss=(
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                    if labelled
                    else None
                ),
                metric_length=self.num_paths > 1,
                training=walk_training,
                measure_every=self.record_every,
                outputs=output_kind,
            )
            trainer.compile(
                optimizer=keras.optimizers.Adam(self._rate)
                if self.optimizer == "adam"
                else keras.optimizers.SGD(self._rate, momentum=0.9),
                jit_compile=self.jit_compile,
            )
            # Reference outputs: the undamaged network's logits, on the same inputs
            dataset = fip_dataset(
                outputs_lib.logits_model(undamaged, output_kind),
                x,
                secondary=(x, y) if labelled else None,
                batch_size=self.batch_size,
                seed=seed,
            )
            path = Path(
                candidate,
                record_every=self.record_every,
                directory=self.path_directory if len(runs) == 1 else None,
            )
            evaluator = _EpochEvaluator(
                self._evaluator(candidate, x, x_val, y_val, history, offset), self._every
            )
            # The solves' inputs count in the budget: the walk takes the rest of it.
            walk_steps = steps - math.ceil(offset)
            if walk_steps > 0 and (history["epochs_to_recover"] is None or not self.stop_at_target):
                walked = trainer.walk(
                    dataset,
                    walk_steps,
                    path=path,
                    steps_per_epoch=math.gcd(walk_steps, self._steps_per_epoch),
                    callbacks=[evaluator] + list(self.callbacks or []),
                    verbose=self.verbose,
                    log_dir=self.log_dir,
                )
                history.update(walked)
                if evaluator.step % self._every:
                    evaluator.evaluate(evaluator.step)  # The walk's last point.
            if walk_training and self._normalized:
                normalization.recalibrate_batch_normalization(candidate, x, self.batch_size * 2)
            history["steps"] = evaluator.step + offset
            history["solve_epochs"] = offset / self._steps_per_epoch
            history["task_weight"] = task_weight
            length = float(history.get("metric_length", [0.0])[-1]) if self.num_paths > 1 else None
            candidates.append(
                {
                    "metric_length": length,
                    "epochs_to_recover": history["epochs_to_recover"],
                    "final_accuracy": history["val_accuracy"][-1],
                    "seed": seed,
                    "task_weight": task_weight,
                }
            )
            key = self._candidate_key(history, length, len(weights))
            if best is None or key < best[0]:
                best = (key, candidate, history, path)
        _, model, history, self.path = best
        if len(runs) > 1:
            history["candidates"] = candidates
            if self.path_directory is not None:
                self.path.save(self.path_directory)  # The chosen candidate's path.
        return model, history

    def _learning_rate(self, model):
        """The rate of every method: as given, or (`"auto"`) `AUTO_LEARNING_RATE_SCALE` ×
        the RMS of the model's non-zero Dense/Conv kernels (Compress's rule)."""
        if not isinstance(self.learning_rate, str):
            return float(self.learning_rate)
        squares, count = 0.0, 0
        for variable in projection.prunable_variables(model):
            weights = np.asarray(variable.numpy(), dtype="float64")
            live = weights[weights != 0.0]
            squares += float(np.sum(np.square(live)))
            count += live.size
        if not count:
            return compress_lib.FALLBACK_LEARNING_RATE
        return compress_lib.AUTO_LEARNING_RATE_SCALE * math.sqrt(squares / count)

    def _task_weights(self, y):
        """The weights of the task cross-entropy the walk tries: 0 without labels, the
        `"auto"` candidates with them."""
        if y is None:
            return (0.0,)
        return _AUTO_TASK_WEIGHTS if self.task_weight == "auto" else (float(self.task_weight),)

    def _candidate_key(self, history, length, num_weights):
        """The order of the walked candidates, the least first: with one labels' weight,
        those that recover, then the shortest in the metric (`num_paths`); with several,
        the first to recover when stopping there, else the most accurate at the end on the
        validation split (then the shortest)."""
        recovered = history["epochs_to_recover"]
        if num_weights == 1:
            return (recovered is None, length or 0.0)
        final = -history["val_accuracy"][-1]
        if self.stop_at_target:
            return (recovered is None, 0.0 if recovered is None else recovered, final)
        return (final, length or 0.0)

    def _walk_distance(self):
        """D of the FIP walk: `distance`, on logits / `distance_temperature` (× T²)."""
        distance = distances_lib.get(self.distance)
        temperature = self.distance_temperature
        if temperature is None:
            return distance

        def tempered(outputs, reference_outputs):
            return temperature**2 * distance(outputs / temperature, reference_outputs / temperature)

        return tempered

    def _repair_supervised(self, model, reference, x, y, x_val, y_val, released):
        history = self._new_history(model, x_val, y_val)
        scales = None
        if self.method == "embryonic":
            scales = [
                None if mask is None else np.where(mask, self.plasticity, 1.0)
                for mask in reference.damage_masks
            ]
            # Variables no damage touched: their weights all survive.
            scales = [
                np.full(v.shape, self.plasticity) if s is None else s
                for s, v in zip(scales, model.trainable_variables)
            ]
        evaluate = self._evaluator(model, x, x_val, y_val, history)
        self.path = Path(model, record_every=self.record_every, directory=self.path_directory)
        steps = 0
        if history["epochs_to_recover"] is None or not self.stop_at_target:
            steps = supervised_training(
                model,
                x,
                y,
                self.epochs * self._steps_per_epoch,
                self._rate,
                self.optimizer,
                self.batch_size,
                gradient_scales=scales,
                seed=self.seed,
                callback=evaluate,
                evaluate_every=self._every,
            )
        if steps:
            self.path.append(
                steps,
                [v.numpy() for v in model.trainable_variables],
                {"val_accuracy": history["val_accuracy"][-1]},
            )
        history["steps"] = steps
        return model, history

    def _attach(self, model, reference, released):
        """Records the undamaged network on the repaired model (for later repairs)."""
        record = {
            "kind": "repair",
            "method": self.method,
            "released": released,
            "epochs_to_recover": self.history["epochs_to_recover"],
            "steps": self.history["steps"],
        }
        damage_masks = [None] * len(reference.damage_masks) if released else reference.damage_masks
        damage_lib.attach_reference(
            model,
            damage_lib.DamageReference(
                reference.weights,
                reference.masks,
                damage_masks,
                reference.inputs,
                reference.outputs,
                reference.records + [record],
            ),
        )

    # Serialisation.

    def get_config(self):
        config = super().get_config()
        config.update(
            data=None,  # Data and networks are not serialised; pass them again.
            method=self.method,
            reference=None,
            epochs=self.epochs,
            target=self.target,
            num_paths=self.num_paths,
            validation_data=None,
            validation_split=self.validation_split,
            evaluations_per_epoch=self.evaluations_per_epoch,
            stop_at_target=self.stop_at_target,
            release=self.release,
            task_weight=self.task_weight,
            plasticity=self.plasticity,
            init_scale=self.init_scale,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            batch_size=self.batch_size,
            distance=self.distance,
            training=self.training,
            record_every=self.record_every,
            path_directory=self.path_directory,
            jit_compile=self.jit_compile,
            seed=self.seed,
            solve_output_layer=self.solve_output_layer,
            solve_sweeps=self.solve_sweeps,
            solve_rank=self.solve_rank,
            solve_first=self.solve_first,
            solve_temperature=self.solve_temperature,
            solve_damping=self.solve_damping,
            distance_temperature=self.distance_temperature,
        )
        return config


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

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
    >>> damaged = keras_fip.Damage("nodes", fraction=0.5, seed=0)(model)
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
    walker = masks_lib.strip_masks(model)
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
    reference = _predict(outputs_lib.logits_model(model, kind), x).astype("float32")

    optimizer.build(moving)  # Its slots are created here, not inside a replica step.

    def replica_step(batch):
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

    step = distribute.replica_step(replica_step)

    @tf.function
    def hold_damage():
        # Outside the replica context: a distributed variable is assigned on every replica.
        for variable, keep, value in zip(moving, free, start):
            variable.assign(variable.value * keep + (1.0 - time.value) * value)

    # Stateless per-pass permutations: the same global batches under any strategy.
    dataset = iter(
        distribute.distribute_dataset(
            data_adapter.repeated_batches((x, reference), batch_size, seed=seed)
        )
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
