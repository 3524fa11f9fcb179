"""Geometry of weight space: the metric tensor g, its spectrum, and path measurements."""

from keras_fip.geometry.metric import MetricOperator
from keras_fip.geometry.metric import metric_vector_product
from keras_fip.geometry.metric import output_jvp

__all__ = [
    "MetricOperator",
    "metric_vector_product",
    "output_jvp",
]
