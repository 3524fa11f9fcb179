"""Repair: the operation, its methods (`FIP`, `Retrain`, `Embryonic`) and the FIP's solver.

`keras_fip.Repair(data, method=..., walk=...)` recovers a damaged network; the methods are
small serialisable objects holding their own settings, `OutputLayerSolver` the closed-form
solves that start a FIP repair. `recovery_path` walks the other way: from the undamaged
network to its damaged weights, the surviving network compensating as the damage grows.
"""

from keras_fip.operations.repair.context import RepairContext
from keras_fip.operations.repair.embryonic import Embryonic
from keras_fip.operations.repair.fip import FIP
from keras_fip.operations.repair.method import RepairMethod
from keras_fip.operations.repair.recovery_path import recovery_path
from keras_fip.operations.repair.repair import Repair
from keras_fip.operations.repair.repair import get_method
from keras_fip.operations.repair.retrain import Retrain
from keras_fip.operations.repair.solver import OutputLayerSolver
from keras_fip.operations.repair.training import accuracy
from keras_fip.operations.repair.training import supervised_training
