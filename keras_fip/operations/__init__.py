"""Operations: validated, serialisable `model -> model` transformations along FIPs."""

from keras_fip.operations.base import Operation
from keras_fip.operations.base import carry_data
from keras_fip.operations.base import carried_data
from keras_fip.operations.base import check_model
from keras_fip.operations.chain import Chain
from keras_fip.operations.chain import chain
from keras_fip.operations.isofunctional import Isofunctional
from keras_fip.operations.compress import Compress
from keras_fip.operations.shrink import shrink
from keras_fip.operations.continual_learn import ContinualLearn
from keras_fip.operations.heads import grow_output_layer
from keras_fip.operations.bridge import Bridge
