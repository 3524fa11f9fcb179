"""Geometry of weight space: the metric tensor g, its spectrum, and path measurements."""

from keras_fip.geometry.damage import breakdown_profile
from keras_fip.geometry.damage import damage_path
from keras_fip.geometry.damage import deletion_profile
from keras_fip.geometry.damage import deletion_sequence
from keras_fip.geometry.damage import knee
from keras_fip.geometry.damage import unit_deletion_speed
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.geometry.eigenpairs import Eigenpairs
from keras_fip.geometry.metric import MetricOperator
from keras_fip.geometry.metric import metric_vector_product
from keras_fip.geometry.metric import output_jvp
from keras_fip.geometry.paths import breakdown_acceleration
from keras_fip.geometry.paths import breakdown_speed
from keras_fip.geometry.paths import path_length
from keras_fip.geometry.spectrum import expected_perturbation_change
from keras_fip.geometry.spectrum import spectral_density
from keras_fip.geometry.spectrum import top_eigenpairs
from keras_fip.geometry.spectrum import trace
from keras_fip.geometry.spectrum import vulnerable_fraction

__all__ = [
    "Eigenpairs",
    "MetricOperator",
    "breakdown_acceleration",
    "breakdown_speed",
    "expected_perturbation_change",
    "metric_diagonal",
    "metric_vector_product",
    "output_jvp",
    "path_length",
    "spectral_density",
    "top_eigenpairs",
    "trace",
    "vulnerable_fraction",
    "breakdown_profile",
    "damage_path",
    "deletion_sequence",
    "knee",
    "deletion_profile",
    "unit_deletion_speed",
]
