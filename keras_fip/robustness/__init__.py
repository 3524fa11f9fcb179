"""Robustness of models and ensembles: ART attacks (PGD, AutoAttack, adaptive, transfer),
an evaluation with its sanity checks, diagnostics.

Needs the `robustness` extra (`adversarial-robustness-toolbox`) for the attacks; the
diagnostics need only Keras and numpy.
"""

from keras_fip.robustness.attacks import accuracy
from keras_fip.robustness.attacks import art_classifier
from keras_fip.robustness.attacks import attack_settings
from keras_fip.robustness.attacks import logit_model
from keras_fip.robustness.attacks import pgd
from keras_fip.robustness.attacks import transfer_pgd_accuracy
from keras_fip.robustness.attacks import whitebox_pgd_accuracy
from keras_fip.robustness.diagnostics import gradient_coherence
from keras_fip.robustness.diagnostics import input_gradients
from keras_fip.robustness.diagnostics import layer_activations
from keras_fip.robustness.diagnostics import layer_cka
from keras_fip.robustness.diagnostics import linear_cka
from keras_fip.robustness.diagnostics import weight_distances
from keras_fip.robustness.diagnostics import weight_pca
from keras_fip.robustness.evaluation import evaluate
from keras_fip.robustness.evaluation import margin_loss
from keras_fip.robustness.evaluation import mean_probability_logits
from keras_fip.robustness.evaluation import sanity_checks
