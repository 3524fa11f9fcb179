"""Baselines a practitioner would otherwise use; keras_fip operations are measured against them.

`tfmot_bridge` is deliberately not imported: it runs only in its own process.
"""

from keras_fip.baselines import quantization
from keras_fip.baselines.adversarial_training import fgsm_adversarial_training
from keras_fip.baselines.adversarial_training import pgd_adversarial_ensemble
from keras_fip.baselines.adversarial_training import pgd_adversarial_training
from keras_fip.baselines.agem import AGEM
from keras_fip.baselines.deep_ensemble import deep_ensemble
from keras_fip.baselines.deep_ensemble import fast_geometric_ensemble
from keras_fip.baselines.deep_ensemble import snapshot_ensemble
from keras_fip.baselines.ewc import EWC
from keras_fip.baselines.finetune import FineTune
from keras_fip.baselines.joint import JointTraining
from keras_fip.baselines.lwf import LwF
from keras_fip.baselines.magnitude_pruning import gradual_magnitude_pruning
from keras_fip.baselines.magnitude_pruning import lottery_ticket
from keras_fip.baselines.magnitude_pruning import one_shot_magnitude_pruning
from keras_fip.baselines.magnitude_pruning import polynomial_decay_sparsity
from keras_fip.baselines.prune_retrain import prune_retrain
from keras_fip.baselines.replay import ExperienceReplay
from keras_fip.baselines.tfmot_baseline import tfmot_available
from keras_fip.baselines.tfmot_baseline import tfmot_gradual_pruning
from keras_fip.baselines.trs_ensemble import trs_ensemble

__all__ = [
    "gradual_magnitude_pruning",
    "lottery_ticket",
    "one_shot_magnitude_pruning",
    "polynomial_decay_sparsity",
    "tfmot_available",
    "tfmot_gradual_pruning",
    "deep_ensemble",
    "fast_geometric_ensemble",
    "snapshot_ensemble",
    "fgsm_adversarial_training",
    "pgd_adversarial_ensemble",
    "pgd_adversarial_training",
    "trs_ensemble",
    "AGEM",
    "EWC",
    "ExperienceReplay",
    "FineTune",
    "JointTraining",
    "LwF",
    "prune_retrain",
]
