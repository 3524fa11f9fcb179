import os

import numpy as np
import pytest
from absl import flags


def pytest_configure(config):
    # absl apps read FLAGS; under pytest nothing parses argv, so mark defaults as parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def scalar_tags(log_dir):
    """`{tag: {step: value}}` of every TensorBoard scalar in the event files under
    `log_dir` (read back with `tf.compat.v1.train.summary_iterator`); the tags of one
    event file's directory are prefixed with that directory relative to `log_dir`."""
    import tensorflow as tf

    scalars = {}
    for directory, _, files in os.walk(log_dir):
        relative = os.path.relpath(directory, log_dir)
        for name in files:
            if ".tfevents." not in name:
                continue
            for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
                for value in event.summary.value:
                    number = (
                        value.simple_value
                        if value.HasField("simple_value")
                        else float(tf.make_ndarray(value.tensor))
                    )
                    tag = value.tag if relative == "." else f"{relative}/{value.tag}"
                    scalars.setdefault(tag, {})[event.step] = number
    return scalars


@pytest.fixture
def app_mirrored_strategy(monkeypatch, mirrored_strategy):
    """The shared two-replica `MirroredStrategy` as the apps' `--strategy=mirrored` (a
    second MirroredStrategy in one process collides with the first)."""
    from apps import common

    monkeypatch.setitem(common._STRATEGIES, ("mirrored", None), mirrored_strategy)
    return mirrored_strategy


def _flat(results, prefix=""):
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif not key.endswith("seconds"):
            flat[prefix + key] = value
    return flat


def assert_results_close(got, expected, rtol, atol):
    """Two runs' `results.json` (nested dicts flattened, wall times left out) have the same
    keys; strings and booleans are equal, numbers and lists of them within `rtol`/`atol`."""
    got, expected = _flat(got), _flat(expected)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, (str, bool)):
            assert got[key] == value, key
        else:
            np.testing.assert_allclose(
                np.asarray(got[key], float),
                np.asarray(value, float),
                rtol=rtol,
                atol=atol,
                err_msg=key,
            )
