import os

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
                    number = (value.simple_value if value.HasField("simple_value")
                              else float(tf.make_ndarray(value.tensor)))
                    tag = value.tag if relative == "." else f"{relative}/{value.tag}"
                    scalars.setdefault(tag, {})[event.step] = number
    return scalars
