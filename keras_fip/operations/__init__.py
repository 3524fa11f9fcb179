"""Operations: validated, serialisable `model -> model` transformations along FIPs."""

from keras_fip.operations.base import Operation
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import carry_data
from keras_fip.operations.base import check_model
from keras_fip.operations.bridge import Bridge
from keras_fip.operations.composition import Chain
from keras_fip.operations.composition import chain
from keras_fip.operations.compress import Compress
from keras_fip.operations.continual_learn import ContinualLearn
from keras_fip.operations.damage import Damage
from keras_fip.operations.damage import DamageReference
from keras_fip.operations.damage import damage_reference
from keras_fip.operations.damage import hidden_units
from keras_fip.operations.damage import load_damaged_model
from keras_fip.operations.damage_repair import DamageRepair
from keras_fip.operations.ensemble import Ensemble
from keras_fip.operations.ensemble import EnsembleCombination
from keras_fip.operations.ensemble import build_ensemble
from keras_fip.operations.ensemble import ensemble_members
from keras_fip.operations.ensemble import is_ensemble
from keras_fip.operations.heads import grow_output_layer
from keras_fip.operations.isofunctional import Isofunctional
from keras_fip.operations.repair import Repair
from keras_fip.operations.shrink import shrink
