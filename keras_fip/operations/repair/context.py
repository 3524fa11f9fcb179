"""`RepairContext`: what one `keras_fip.Repair` call hands its repair method."""

import keras

from keras_fip.core import normalization
from keras_fip.operations.repair.training import accuracy


class RepairContext:
    """The data, budget and measurements of one repair, shared by its method.

    `keras_fip.Repair` builds one per call (nothing of a call lives on the operation) and
    hands it to its method's `repair(model, context)`. Accuracy is measured on the
    validation split: against its labels, or, without labels, against the undamaged
    network's predictions (the undamaged network then scores 1).

    Args:
        undamaged: The undamaged network (a `keras.Model`).
        reference: The `keras_fip.operations.DamageReference` repaired towards.
        train: `(x, y)` training data (`y` `None` without labels).
        validation: `(x, y)` validation data (`y` labels or undamaged predictions).
        walk: The resolved `keras_fip.Walk` of the call.
        steps: The budget in steps.
        steps_per_epoch: ⌈N / batch size⌉, N the training examples.
        evaluations_per_epoch: Validation measurements per epoch.
        target: Recovered means within this of the undamaged accuracy.
        stop_at_target: Whether to stop once recovered.
        learning_rate: The resolved learning rate of the supervised methods.
        rng: The call's `numpy.random.Generator`.
    """

    def __init__(
        self,
        undamaged,
        reference,
        train,
        validation,
        walk,
        steps,
        steps_per_epoch,
        evaluations_per_epoch,
        target,
        stop_at_target,
        learning_rate,
        rng,
    ):
        self.undamaged = undamaged
        self.reference = reference
        self.x, self.y = train
        self.x_val, self.y_val = validation
        self.walk = walk
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch
        self.evaluate_every = max(1, steps_per_epoch // evaluations_per_epoch)
        self.target = target
        self.stop_at_target = stop_at_target
        self.learning_rate = learning_rate
        self.rng = rng
        self.batch_normalized = bool(normalization.batch_normalization_layers(undamaged))
        self.walk_training = (
            self.batch_normalized if walk.training == "auto" else bool(walk.training)
        )
        self.undamaged_accuracy = accuracy(undamaged, self.x_val, self.y_val)

    def accuracy(self, model):
        """`model`'s accuracy on the validation split."""
        return accuracy(model, self.x_val, self.y_val)

    def recovered(self, value):
        """Whether a validation accuracy is within `target` of the undamaged one."""
        return value >= self.undamaged_accuracy - self.target - 1e-12

    def new_history(self, model):
        """A history starting at `model` (epoch 0)."""
        value = self.accuracy(model)
        return {
            "epoch": [0.0],
            "val_accuracy": [value],
            "undamaged_accuracy": self.undamaged_accuracy,
            "epochs_to_recover": 0.0 if self.recovered(value) else None,
        }

    def evaluator(self, model, history, offset=0):
        """`evaluate(step) -> stop`: appends the accuracy at epoch (step + offset) / N to
        `history` (BatchNorm statistics recalibrated on the training inputs first)."""

        def evaluate(step):
            if self.batch_normalized:
                normalization.recalibrate_batch_normalization(
                    model, self.x, self.walk.batch_size * 2, max_examples=4096
                )
            value = self.accuracy(model)
            history["epoch"].append((step + offset) / self.steps_per_epoch)
            history["val_accuracy"].append(value)
            recovered = self.recovered(value)
            if recovered and history["epochs_to_recover"] is None:
                history["epochs_to_recover"] = history["epoch"][-1]
            return recovered and self.stop_at_target

        return evaluate


class EvaluationCallback(keras.callbacks.Callback):
    """Runs `evaluate(step)` every `every` steps of a walk, and stops it when asked.

    Args:
        evaluate: `evaluate(step) -> stop`, e.g. from `RepairContext.evaluator`.
        every: Steps between evaluations.
    """

    def __init__(self, evaluate, every):
        super().__init__()
        self.evaluate = evaluate
        self.every = every
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0 and self.evaluate(self.step):
            self.model.stop_training = True
