"""The FIP engine: masks, model copies, recorded paths, distances, step rules, trainer."""

from keras_fip.core.copy import copy_model
from keras_fip.core.copy import strip_masks
from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.masks import MaskConstraint
from keras_fip.core.masks import MaskedOptimizer
from keras_fip.core.masks import apply_masks
from keras_fip.core.masks import sparsity
from keras_fip.core.normalization import recalibrate_batch_normalization
from keras_fip.engine import distances
from keras_fip.engine import step_rules
from keras_fip.engine.path import Path
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.engine.walk_checkpoint import WalkCheckpoint
