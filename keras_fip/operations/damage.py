"""`Damage`: applies a fault model to a network and records the undamaged network."""

import keras
import numpy as np

from keras_fip.core import data_adapter
from keras_fip.core import masks as masks_lib
from keras_fip.core.data_adapter import check_inputs_match_model
from keras_fip.core.data_adapter import normalize_data
from keras_fip.operations import faults as faults_lib
from keras_fip.operations.base import Operation
from keras_fip.operations.base import carried_data
from keras_fip.operations.damage_reference import DamageReference
from keras_fip.operations.damage_reference import attach_reference
from keras_fip.operations.damage_reference import damage_reference


def _predict(model, x, batch_size=1024):
    """Inference-mode outputs in eager batches (no tf.function traced per model)."""
    return np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(data_adapter.take(x, slice(i, i + batch_size)), training=False)
            )
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )


@keras.saving.register_keras_serializable(package="keras_fip")
class Damage(Operation):
    """Damages a network with a fault model and records the undamaged network.

    The fault models of the resilience and damage-rescue papers, and the bit flips of the
    fault-injection tools (PyTorchFI, TensorFI2; an extension beyond the papers), each a
    small object in `keras_fip.faults` holding its own settings:

    - `Nodes(fraction)`: deleted hidden units and filters, silenced exactly (incoming
      weights, bias, BatchNorm scale and offset, outgoing weights), the output layer never;
    - `Weights(fraction)`: zeroed kernel entries;
    - `Gaussian(norm)`: a random Gaussian direction of Euclidean norm exactly `norm`;
    - `Eigen(norm)`: the weight-space adversary, a perturbation of norm `norm` along the
      top eigenvectors of the metric g on `data`, mixed to raise the loss of the labels
      (or, on inputs only, of the undamaged predictions);
    - `BitFlips(count)`: one bit flipped in each of `count` weights (float32 or int8).

    `fault` may also be one of their names (`"nodes"`, `"weights"`, `"gaussian"`,
    `"eigen"`, `"bit_flips"`): that fault with its defaults. A model ending in a softmax
    is damaged as its twin returning logits is: the zeroing, Gaussian and bit-flip faults
    never read the outputs, and `Eigen` reads the log-probabilities, the same for both.

    Zeroing faults (`Nodes`, `Weights`) attach masks (`keras_fip.masks`), so later
    training and `keras_fip.Repair` keep the damaged weights at exactly zero. The
    undamaged network is recorded on the returned model
    (`keras_fip.damage_reference(model)`: its weights and masks, the damage masks, the
    inputs of `data` and the undamaged outputs on them, and the record of every damage),
    so `Repair` needs nothing else; damage applied to a damaged model keeps the first
    undamaged network and accumulates the records.
    `keras_fip.damage_reference(model).restore(model)` is the exact undo and
    `.perturbation(model)` the damage as an additive perturbation. Same seed, same damage;
    the input model is never changed.

    After a call, `op.history` is the record of that call (a dict, also the last entry of
    the returned model's `damage_reference(model).records`): `"kind"` (the fault's name),
    what was hit (`"units"` per layer, `"weights"` per variable, `"bits"` with their old
    and new values, `Eigen`'s eigenvalues, coefficients and predicted and measured
    output change), `"num_hit"` and `"perturbation_norm"` (the Euclidean norm of the
    change of the trainable weights). `op.path` is `None`: damage walks no path.

    Args:
        fault: A `keras_fip.faults.Fault` (`Nodes`, `Weights`, `Gaussian`, `Eigen`,
            `BitFlips`), one of their names, or a serialised fault.
        data: Inputs (array, `(x, y)` or `tf.data.Dataset`) the network serves: `Eigen`
            measures g and the loss on them (with their labels when given); for every
            fault they and the undamaged outputs on them are recorded for `Repair`.
            Defaults to `None` (the inputs the model carries from an earlier operation,
            if any).
        seed: Non-negative integer seed of the fault's random choices, or `None` for
            fresh randomness. Defaults to `None`.
        name: The operation's name. Defaults to `None`.

    Returns:
        Calling the operation returns a new, damaged `keras.Model`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(64, input_shape=(8, 8, 1))
        >>> damage = keras_fip.Damage(keras_fip.faults.Nodes(fraction=0.5), seed=0)
        >>> damaged = damage(model)
        >>> len(damage.history["units"]["dense_1"])
        32
        >>> adversary = keras_fip.Damage(keras_fip.faults.Eigen(num_eigenpairs=5),
        ...                              data=(x[:300], y[:300]), seed=0)
        >>> attacked = adversary(model)
        >>> round(adversary.history["perturbation_norm"], 4)
        1.0
    """

    def __init__(self, fault, *, data=None, seed=None, name=None):
        super().__init__(name=name)
        self.fault = faults_lib.get(fault)
        if data is not None:
            normalize_data(data, name="data")
        self.data = data
        if seed is not None:
            seed = self.check_number(seed, "seed", low=0, low_inclusive=True, integer=True)
        self.seed = seed

    # Calling.

    def validate(self, model):
        data = self.data if self.data is not None else carried_data(model)
        if data is not None:
            x, _ = normalize_data(data, name="data", model=model)
            check_inputs_match_model(model, x)
        elif self.fault.needs_data:
            raise ValueError(
                f"`{type(self.fault).__name__}` reads the network's outputs on data: pass "
                f"`data` (model `{model.name}` carries none from an earlier keras_fip "
                "operation). Received: data=None"
            )
        self.fault.check(model)

    def __call__(self, model):
        earlier = damage_reference(model) if isinstance(model, keras.Model) else None
        damaged = super().__call__(model)
        if earlier is not None and len(earlier.weights) == len(damaged.weights):
            # Damage on damage: the first undamaged network, the masks and records
            # accumulated.
            latest = damage_reference(damaged)
            attach_reference(
                damaged,
                DamageReference(
                    earlier.weights,
                    earlier.masks,
                    [
                        a if b is None else (b if a is None else a & b)
                        for a, b in zip(earlier.damage_masks, latest.damage_masks)
                    ],
                    earlier.inputs,
                    earlier.outputs,
                    earlier.records + latest.records,
                ),
            )
        return damaged

    def call(self, model):
        # The undamaged network and the data it serves
        data = self.data if self.data is not None else carried_data(model)
        inputs = labels = outputs = None
        if data is not None:
            inputs, labels = normalize_data(data, name="data", model=model)
            outputs = _predict(model, inputs)
        undamaged = [np.array(v.numpy()) for v in model.weights]
        variables = model.trainable_variables
        before = [v.numpy().astype(np.float64) for v in variables]
        masks_before = [masks_lib.mask_of(v) for v in variables]

        # The fault
        rng = np.random.default_rng(self.seed)
        record, zeroed = self.fault.apply(model, inputs, labels, rng, self.seed)
        damage_masks = [zeroed.get(id(v)) for v in variables]
        if zeroed:
            masks_lib.apply_masks(model, damage_masks)

        # What changed, and the undamaged network for Repair
        after = [v.numpy().astype(np.float64) for v in variables]
        record = {
            "kind": self.fault.name,
            **record,
            "perturbation_norm": float(
                np.sqrt(sum(np.sum(np.square(b - a)) for a, b in zip(before, after)))
            ),
        }
        attach_reference(
            model,
            DamageReference(undamaged, masks_before, damage_masks, inputs, outputs, [record]),
        )
        self.history = record
        return model

    # Serialisation.

    def get_config(self):
        return {
            **super().get_config(),
            "fault": faults_lib.serialize(self.fault),
            "data": None,  # Data are not serialised; pass them again after from_config.
            "seed": self.seed,
        }
