"""Fault models: what `keras_fip.Damage` does to a network, one small object each.

`Nodes` (deleted units), `Weights` (zeroed kernel entries), `Gaussian` (a random weight
perturbation of a given norm), `Eigen` (the weight-space adversary along the top
eigenvectors of the metric g) and `BitFlips` (single-bit faults in stored weights). Each
holds its own settings and applies itself; `get` turns a name or a config into one.
"""

import keras

from keras_fip.operations.faults.bit_flips import BitFlips
from keras_fip.operations.faults.eigen import Eigen
from keras_fip.operations.faults.fault import Fault
from keras_fip.operations.faults.gaussian import Gaussian
from keras_fip.operations.faults.nodes import Nodes
from keras_fip.operations.faults.weights import Weights

FAULTS = {fault.name: fault for fault in (Nodes, Weights, Gaussian, Eigen, BitFlips)}


def get(identifier):
    """A fault from a `Fault`, its name (the fault with its defaults) or its config.

    Args:
        identifier: A `Fault`, one of `"nodes"`, `"weights"`, `"gaussian"`, `"eigen"`,
            `"bit_flips"`, or a serialised fault (`keras.saving.serialize_keras_object`).

    Returns:
        A `Fault`.

    Examples:

        >>> get("gaussian")
        Gaussian(norm=1.0, layers=None)
        >>> get(serialize(Nodes(0.3))) == Nodes(0.3)
        True
    """
    if isinstance(identifier, Fault):
        return identifier
    if isinstance(identifier, str) and identifier in FAULTS:
        return FAULTS[identifier]()
    if isinstance(identifier, dict):
        fault = keras.saving.deserialize_keras_object(identifier)
        if isinstance(fault, Fault):
            return fault
    raise ValueError(
        "`fault` must be a `keras_fip.faults.Fault` (Nodes, Weights, Gaussian, Eigen, "
        f"BitFlips) or one of {list(FAULTS)}. Received: fault={identifier!r}"
    )


def serialize(fault):
    """The config of a fault, as `keras.saving.serialize_keras_object` writes it."""
    return keras.saving.serialize_keras_object(fault)
