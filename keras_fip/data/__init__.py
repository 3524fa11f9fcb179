"""Real datasets offline first, and continual-learning task builders."""

from keras_fip.data.load import info
from keras_fip.data.load import load
from keras_fip.data.tasks import BENCHMARKS
from keras_fip.data.tasks import build_benchmark
from keras_fip.data.tasks import memory_sample
from keras_fip.data.tasks import permuted_tasks
from keras_fip.data.tasks import split_by_classes

__all__ = [
    "info",
    "load",
    "memory_sample",
    "permuted_tasks",
    "split_by_classes",
    "BENCHMARKS",
    "build_benchmark",
]
