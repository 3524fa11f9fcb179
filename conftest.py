"""Doctest set-up: every docstring example sees `keras`, `np`, `tf` and `keras_fip`.

TensorFlow is imported inside the fixture, not at import time, so `tests/conftest.py` can
still set up the logical CPU devices before TensorFlow initialises them.
"""

import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_fip

    doctest_namespace.update(keras=keras, np=np, tf=tf, keras_fip=keras_fip)
