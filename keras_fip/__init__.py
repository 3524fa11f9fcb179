"""keras_fip: functionally invariant paths in weight space for Keras 3 models.

Transforms trained Keras models along paths that keep their outputs on data they must keep
serving while a second objective pulls them somewhere useful: a new task, a sparse weight set,
away from damage, towards diverse ensemble members.
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_fip import baselines  # noqa: E402
from keras_fip import data  # noqa: E402
from keras_fip import geometry  # noqa: E402
from keras_fip import metrics  # noqa: E402
from keras_fip import models  # noqa: E402
from keras_fip import robustness  # noqa: E402
from keras_fip.core.copy import strip_masks  # noqa: E402
from keras_fip.core.masks import MaskedOptimizer  # noqa: E402
from keras_fip.core.masks import masks  # noqa: E402
from keras_fip.engine import rules  # noqa: E402
from keras_fip.engine.path import Path  # noqa: E402
from keras_fip.engine.trainer import FIPTrainer  # noqa: E402
from keras_fip.engine.walk import Walk  # noqa: E402
from keras_fip.export import export  # noqa: E402
from keras_fip.operations import Chain  # noqa: E402
from keras_fip.operations import Compress  # noqa: E402
from keras_fip.operations import ContinualLearn  # noqa: E402
from keras_fip.operations import Damage  # noqa: E402
from keras_fip.operations import DamageRepair  # noqa: E402
from keras_fip.operations import Ensemble  # noqa: E402
from keras_fip.operations import Isofunctional  # noqa: E402
from keras_fip.operations import Operation  # noqa: E402
from keras_fip.operations import Quantize  # noqa: E402
from keras_fip.operations import Repair  # noqa: E402
from keras_fip.operations import chain  # noqa: E402
from keras_fip.operations import compress  # noqa: E402
from keras_fip.operations import damage_reference  # noqa: E402
from keras_fip.operations import ensemble  # noqa: E402
from keras_fip.operations import ensemble_members  # noqa: E402
from keras_fip.operations import faults  # noqa: E402
from keras_fip.operations import repair  # noqa: E402
from keras_fip.operations import shrink  # noqa: E402
from keras_fip.version import __version__  # noqa: E402

__all__ = [
    "baselines",
    "data",
    "geometry",
    "models",
    "Chain",
    "Compress",
    "compress",
    "FIPTrainer",
    "Walk",
    "rules",
    "Isofunctional",
    "MaskedOptimizer",
    "Operation",
    "Path",
    "chain",
    "export",
    "masks",
    "shrink",
    "strip_masks",
    "Ensemble",
    "ensemble",
    "ensemble_members",
    "robustness",
    "Damage",
    "damage_reference",
    "ContinualLearn",
    "metrics",
    "Repair",
    "repair",
    "faults",
    "DamageRepair",
    "load_damaged_model",
    "distribute",
    "Submanifold",
]
from keras_fip import distribute  # noqa: E402
from keras_fip.operations import load_damaged_model  # noqa: E402
from keras_fip.submanifold import Submanifold  # noqa: E402
