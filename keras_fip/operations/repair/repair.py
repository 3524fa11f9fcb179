"""`Repair`: recovers a damaged network, by default along a functionally invariant path."""

import math

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core import projection
from keras_fip.core.copy import copy_model
from keras_fip.core.copy import strip_masks
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.engine.rules import Penalty
from keras_fip.engine.rules import auto_learning_rate
from keras_fip.operations.base import WalkingOperation
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import carry_data
from keras_fip.operations.base import check_model
from keras_fip.operations.damage_reference import DamageReference
from keras_fip.operations.damage_reference import attach_reference
from keras_fip.operations.damage_reference import damage_reference
from keras_fip.operations.repair.context import RepairContext
from keras_fip.operations.repair.embryonic import Embryonic
from keras_fip.operations.repair.fip import FIP
from keras_fip.operations.repair.method import RepairMethod
from keras_fip.operations.repair.method import serialize
from keras_fip.operations.repair.retrain import Retrain
from keras_fip.operations.repair.training import predict
from keras_fip.operations.repair.training import reinitialise

METHODS = {method.name: method for method in (FIP, Retrain, Embryonic)}


def get_method(identifier):
    """A repair method from a `RepairMethod`, its name (its defaults) or its config.

    Args:
        identifier: A `keras_fip.repair.FIP`, `Retrain` or `Embryonic`, one of `"fip"`,
            `"retrain"`, `"embryonic"`, or a serialised method.

    Returns:
        A `RepairMethod`.

    Examples:

        >>> get_method("retrain")
        Retrain(release=False, optimizer='adam')
    """
    if isinstance(identifier, RepairMethod):
        return identifier
    if isinstance(identifier, str) and identifier in METHODS:
        return METHODS[identifier]()
    if isinstance(identifier, dict):
        method = keras.saving.deserialize_keras_object(identifier)
        if isinstance(method, RepairMethod):
            return method
    raise ValueError(
        "`method` must be a `keras_fip.repair.FIP`, `Retrain` or `Embryonic`, or one of "
        f"{list(METHODS)}. Received: method={identifier!r}"
    )


@keras.saving.register_keras_serializable(package="keras_fip")
class Repair(WalkingOperation):
    """Repairs a damaged network: walks it back to the undamaged network's function.

    The repair strategies of the resilience and damage-rescue papers, on a model returned
    by `keras_fip.Damage` (whose undamaged network it finds on the model,
    `keras_fip.damage_reference`) or with the undamaged network passed as `undamaged`:

    - `keras_fip.repair.FIP()` (`"fip"`, the default): a functionally invariant path from
      the damaged weights back to the undamaged network's outputs on the inputs of
      `data`, the damaged weights held exactly at zero by their masks, started by
      closed-form solves of the output layer (and, in an MLP, of its hidden layer) where
      the architecture allows, plus the task cross-entropy when `data` has labels (its
      weight the walk's β, `"auto"` choosing 1 or 10 on the validation split). With
      inputs only (`data=x`) it is the pure function recovery.
    - `keras_fip.repair.Retrain()` (`"retrain"`): supervised retraining of the surviving
      network on labelled `data` (damage-rescue strategy 1).
    - `keras_fip.repair.Embryonic()` (`"embryonic"`): the damaged weights re-initialised
      and re-grown on labelled `data` (strategy 2).

    The walk (`keras_fip.Walk`) says how: the budget (`epochs`, passes over the training
    examples of `data`, or `steps`; every method takes ⌈N/batch_size⌉ steps of
    `batch_size` examples per epoch, the FIP's solves counting their inputs), the rule and
    its learning rate (`"auto"`: 0.044 × the root mean square of the damaged model's
    non-zero Dense/Conv kernels, `keras_fip.rules.auto_learning_rate`; the supervised
    methods train at it without decay), the batch size, the distance, β, the training
    mode, the recording, the seed (of the split, the data order and the
    re-initialisation), compilation, verbosity, callbacks and logs. Repair's defaults:
    10 epochs; the rest as every walk's. The distance's reference is always the undamaged
    network (the walk's `reference` is left unset), and Repair does not checkpoint.

    Accuracy is measured `evaluations_per_epoch` times per epoch on the validation data
    (`validation_data`, else a seeded `validation_split` of `data`), against its labels,
    or, without labels anywhere, against the undamaged network's predictions (the
    undamaged network then scores 1). A network is recovered when within `target` of the
    undamaged accuracy.

    The returned model keeps the damage masks (unless the method released them), so later
    training keeps the damaged weights at zero, and carries the damage reference with the
    repair's record appended, so `Damage` then `Repair` can repeat
    (`keras_fip.DamageRepair`); `keras_fip.damage_reference(model).restore(model)` is the
    exact undo of the damage. A model ending in a softmax is repaired as its twin
    returning logits. Labels may be class indices or one-hot rows, in `data` and
    `validation_data` alike.

    After a call, `op.history` holds the last call's `"epoch"` (fractional epochs of each
    evaluation, 0 = the damaged network), `"val_accuracy"` (at each), `"undamaged_accuracy"`,
    `"epochs_to_recover"` (the first evaluation within `target`, or `None`), `"steps"`,
    `"epochs"` and, for the FIP, `"solve_epochs"` (the epochs its solves used), `"beta"`
    (the labels' weight it walked with), `"candidates"` (when it walked several) and the
    walk's per-step scalars; `op.path` is its `keras_fip.Path`. Nothing else of a call is
    kept on the operation.

    Args:
        data: Training data: inputs (enough for the FIP), an `(x, y)` tuple or a finite
            `tf.data.Dataset`. Defaults to `None` (the inputs the model carries, or those
            the damage reference recorded).
        method: A `keras_fip.repair.FIP`, `Retrain` or `Embryonic`, or one of `"fip"`,
            `"retrain"`, `"embryonic"` (the method with its defaults). Defaults to
            `"fip"`.
        undamaged: The undamaged network: a `keras.Model` with the damaged model's weight
            layout, or a `keras_fip.operations.DamageReference`. Defaults to `None` (the
            reference `Damage` recorded on the model).
        validation_data: Labelled `(x, y)` on which accuracy is measured. Defaults to
            `None` (a seeded `validation_split` of `data`).
        validation_split: Fraction in (0, 1] of `data` held out for validation when
            `validation_data` is not given. Defaults to `0.1`.
        target: Recovered means within this much of the undamaged accuracy. Defaults to
            `0.01` (1 percentage point).
        stop_at_target: Whether to stop as soon as the network has recovered (a network
            already within `target` is returned as it is, without solves). Defaults to
            `False`.
        evaluations_per_epoch: Validation measurements per epoch (`epochs_to_recover` is
            resolved to 1/this of an epoch). Defaults to `20`.
        walk: A `keras_fip.Walk`. Defaults to `None` (every default).
        name: The operation's name. Defaults to `None`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(64, input_shape=(8, 8, 1))
        >>> _ = keras_fip.models.train_classifier(model, x, y, epochs=5)
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
        >>> repair = keras_fip.Repair((x, y), walk=keras_fip.Walk(epochs=2, seed=0, verbose=0))
        >>> repaired = repair(damaged)
        >>> repair.history["epochs"] <= 2, repair.history["beta"] in (1.0, 10.0)
        (True, True)
        >>> restored = keras_fip.damage_reference(repaired).restore(repaired)  # the undo
    """

    DEFAULT_BUDGET = {"epochs": 10}

    def __init__(
        self,
        data=None,
        *,
        method="fip",
        undamaged=None,
        validation_data=None,
        validation_split=0.1,
        target=0.01,
        stop_at_target=False,
        evaluations_per_epoch=20,
        walk=None,
        name=None,
    ):
        super().__init__(walk=walk, name=name)
        self.method = get_method(method)
        labels = None
        if data is not None:
            # Shapes, numbers and finiteness checked here; against the model in `validate`.
            _, labels = normalize_data(data, name="data")
        if self.method.needs_labels and data is not None and labels is None:
            raise ValueError(
                f"`method={self.method.name!r}` trains on labels: `data` must be an `(x, y)` "
                "tuple or a dataset of pairs. Received: data with inputs only"
            )
        if undamaged is not None and not isinstance(undamaged, (keras.Model, DamageReference)):
            raise ValueError(
                "`undamaged` must be the undamaged `keras.Model` or a `DamageReference`. "
                f"Received: undamaged={undamaged!r}"
            )
        if validation_data is not None:
            _, validation_labels = normalize_data(validation_data, name="validation_data")
            if validation_labels is None:
                raise ValueError(
                    "`validation_data` must be labelled: an `(x, y)` tuple. "
                    "Received: validation_data with inputs only"
                )
        self.data = data
        self.undamaged = undamaged
        self.validation_data = validation_data
        self.validation_split = self.check_number(
            validation_split, "validation_split", low=0.0, high=1.0
        )
        self.target = self.check_number(target, "target", low=0.0, high=1.0, low_inclusive=True)
        if not isinstance(stop_at_target, (bool, np.bool_)):
            raise ValueError(
                f"`stop_at_target` must be a boolean. Received: stop_at_target={stop_at_target!r}"
            )
        self.stop_at_target = bool(stop_at_target)
        self.evaluations_per_epoch = self.check_number(
            evaluations_per_epoch, "evaluations_per_epoch", low=1, low_inclusive=True, integer=True
        )
        self._check_walk(labels, data is not None)

    def _check_walk(self, labels, has_data):
        walk = self.walk
        if walk.reference is not None:
            raise ValueError(
                "Repair walks towards the undamaged network's outputs: leave the walk's "
                f"`reference` unset. Received: reference={walk.reference!r}"
            )
        if walk.checkpoint_directory is not None:
            raise ValueError(
                "Repair does not checkpoint its walk: leave the walk's "
                "`checkpoint_directory` unset. Received: "
                f"checkpoint_directory={walk.checkpoint_directory!r}"
            )
        beta = walk.beta
        if beta not in (None, "auto", 0.0):
            if not isinstance(self.method, FIP):
                raise ValueError(
                    "The walk's `beta` weighs the labels on the FIP path "
                    f"(`method='fip'`). Received: beta={beta!r} with "
                    f"method={self.method.name!r}"
                )
            if has_data and labels is None:
                raise ValueError(
                    "The walk's `beta` > 0 weighs the labels of `data`: pass an `(x, y)` "
                    f"tuple. Received: beta={beta!r} with inputs only"
                )
        if (
            self.method.needs_labels
            and walk.rule is not None
            and not isinstance(walk.rule, Penalty)
        ):
            raise ValueError(
                f"`method={self.method.name!r}` trains at the walk's `Penalty` learning "
                f"rate: the walk's `rule` must be a `Penalty`. Received: rule={walk.rule!r}"
            )

    # Calling.

    def validate(self, model):
        self.validate_data(model)
        self._reference(model)

    def validate_data(self, model):
        """Checks `data`, `validation_data` and the method against `model`, before any work.

        A `ValueError` names the argument that does not fit. `validate` runs it with the
        damage reference's check; `keras_fip.DamageRepair` runs it on the network before
        its first damage.

        Args:
            model: The `keras.Model` to be repaired, or the network before its damage.
        """
        if self.data is not None:
            x, _ = normalize_data(self.data, name="data", model=model)
            check_inputs_match_model(model, x)
        if self.validation_data is not None:
            x_val, _ = normalize_data(self.validation_data, name="validation_data", model=model)
            check_inputs_match_model(model, x_val, name="validation_data")
        self.method.check(model)

    def __call__(self, model):
        """Returns a new model: a repaired copy of `model` (never changed).

        Args:
            model: A damaged `keras.Model` (or any model with an `undamaged` network).

        Returns:
            A new `keras.Model`.
        """
        check_model(model)
        self.path = None
        self.history = None
        self.validate(model)
        reference = self._reference(model)
        copy = copy_model(model)
        carried = carried_data(model)
        if carried is not None:
            carry_data(copy, carried)
        return self._repair(copy, reference)

    def call(self, model):
        return self._repair(model, self._reference(model))

    def _reference(self, model):
        """The `DamageReference` to repair towards (recorded, or built from `undamaged`)."""
        reference = self.undamaged if self.undamaged is not None else damage_reference(model)
        if reference is None:
            raise ValueError(
                f"`model` ({model.name}) carries no damage record (it was not returned by "
                "`keras_fip.Damage`) and no `undamaged` network was given: pass it as "
                "`undamaged=`. Received: undamaged=None"
            )
        shapes = [tuple(w.shape) for w in model.weights]
        if isinstance(reference, DamageReference):
            given = [tuple(np.shape(w)) for w in reference.weights]
            if given != shapes:
                raise ValueError(
                    "`undamaged` must have the damaged model's weight shapes. Received: "
                    f"undamaged weight shapes {given[:4]}..., model {shapes[:4]}..."
                )
            return reference
        given = [tuple(w.shape) for w in reference.weights]
        if given != shapes:
            raise ValueError(
                "`undamaged` must be the undamaged network with the damaged model's weight "
                f"shapes. Received: undamaged={reference.name} with shapes {given}, model "
                f"{model.name} with {shapes}"
            )
        # Damage masks: what the damaged model holds at zero that the undamaged does not
        undamaged_masks = [masks_lib.mask_of(v) for v in reference.trainable_variables]
        damage_masks = []
        for variable, before in zip(model.trainable_variables, undamaged_masks):
            mask = masks_lib.mask_of(variable)
            if mask is None:
                damage_masks.append(None)
                continue
            held = mask if before is None else (mask | ~before)
            damage_masks.append(None if held.all() else held)
        return DamageReference(
            [np.array(w.numpy()) for w in reference.weights], undamaged_masks, damage_masks
        )

    def _repair(self, model, reference):
        # The undamaged network, the data, the budget
        walk = self.resolved_walk()
        undamaged = reference.restore(model)
        x, y = self._training_data(model, reference)
        if self.method.needs_labels and y is None:
            raise ValueError(
                f"`method={self.method.name!r}` trains on labels, and neither `data` nor the "
                "model's carried data have them. Pass `data=(x, y)`. Received: data=None"
            )
        x, y, x_val, y_val = self._split(x, y, undamaged, walk.seed)
        count = data_adapter.num_examples(x)
        steps_per_epoch = max(1, math.ceil(count / walk.batch_size))
        rule = walk.rule
        learning_rate = None
        if isinstance(rule, Penalty):
            learning_rate = (
                auto_learning_rate(projection.prunable_variables(model))
                if rule.learning_rate == "auto"
                else rule.learning_rate
            )
        context = RepairContext(
            undamaged,
            reference,
            (x, y),
            (x_val, y_val),
            walk,
            walk.num_steps(count),
            steps_per_epoch,
            self.evaluations_per_epoch,
            self.target,
            self.stop_at_target,
            learning_rate,
            np.random.default_rng(walk.seed),
        )

        # Release the damage (re-initialise, unmask)
        released = self.method.releases
        if released:
            model = self._released(model, reference, context.rng)

        # Repair
        model, history, path = self.method.repair(model, context)
        history["epochs"] = history["steps"] / steps_per_epoch
        self.history = history
        self.path = path
        self._attach(model, reference, released, history)
        return model

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

    def _split(self, x, y, undamaged, seed):
        """(x, y, x_val, y_val): validation labels, or the undamaged predictions."""
        if self.validation_data is not None:
            x_val, y_val = normalize_data(
                self.validation_data, name="validation_data", model=undamaged
            )
            return x, y, data_adapter.as_arrays(x_val), np.asarray(y_val)
        count = data_adapter.num_examples(x)
        order = np.random.default_rng(seed).permutation(count)
        held = max(1, int(round(self.validation_split * count)))
        if held >= count:
            raise ValueError(
                f"`validation_split` leaves no training data ({count} examples). "
                f"Received: validation_split={self.validation_split!r}"
            )
        val, train = np.sort(order[:held]), np.sort(order[held:])
        x_val = data_adapter.take(x, val)
        y_val = y[val] if y is not None else np.argmax(predict(undamaged, x_val), axis=-1)
        return (data_adapter.take(x, train), None if y is None else y[train], x_val, y_val)

    def _released(self, model, reference, rng):
        """A copy with the damage masks removed and the damaged weights re-drawn."""
        released = strip_masks(model)
        reinitialise(released, reference.damage_masks, rng, self.method.init_scale)
        if any(mask is not None for mask in reference.masks):
            masks_lib.apply_masks(released, reference.masks)
        return released

    def _attach(self, model, reference, released, history):
        """Records the undamaged network on the repaired model (for later repairs)."""
        record = {
            "kind": "repair",
            "method": self.method.name,
            "released": released,
            "epochs_to_recover": history["epochs_to_recover"],
            "steps": history["steps"],
        }
        damage_masks = [None] * len(reference.damage_masks) if released else reference.damage_masks
        attach_reference(
            model,
            DamageReference(
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
        return {
            **super().get_config(),
            "data": None,  # Data and networks are not serialised; pass them again.
            "method": serialize(self.method),
            "undamaged": None,
            "validation_data": None,
            "validation_split": self.validation_split,
            "target": self.target,
            "stop_at_target": self.stop_at_target,
            "evaluations_per_epoch": self.evaluations_per_epoch,
        }
