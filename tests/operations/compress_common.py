"""What the Compress test files share: the quick walk and weight digests (the trained
digits MLP is the `trained` fixture of this directory's conftest)."""

import hashlib

import numpy as np

import keras_fip
from keras_fip.core import projection
from keras_fip.operations.compress import Schedule

# The walk of the quick tests: the budget exactly as given (no step floor).
SHORT = Schedule(min_steps=0)


def walk(**kwargs):
    return keras_fip.Walk(**{"verbose": 0, **kwargs})


def digest(model):
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def zeros(model):
    return {v.path: np.asarray(v.numpy() == 0) for v in projection.prunable_variables(model)}


def weights(model):
    return [w.numpy() for w in model.weights]
