"""Continual-learning metrics: the accuracy matrix R, ACC, BWT and forgetting."""

from keras_fip.metrics.continual import accuracy_matrix
from keras_fip.metrics.continual import average_accuracy
from keras_fip.metrics.continual import backward_transfer
from keras_fip.metrics.continual import forgetting
from keras_fip.metrics.continual import summarize
from keras_fip.metrics.continual import task_accuracy

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "summarize",
    "task_accuracy",
]
