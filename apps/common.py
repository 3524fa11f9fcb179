"""Flags and helpers shared by the keras_fip apps.

absl flags live in one process-wide registry, so flags that several apps take are defined
here, once; each app sets its own defaults with `flags.FLAGS.set_default` where they differ.
"""

import json
import os

import keras
from absl import flags

from keras_fip import distribute

# Model and data
flags.DEFINE_string("model", "lenet_300_100", "Zoo model name (keras_fip.models.BUILDERS).")
flags.DEFINE_string("dataset", "mnist", "Dataset name (keras_fip.data.load).")
flags.DEFINE_string("data_dir", None, "Directory with the official dataset files.")

# Training
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Examples per step.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Initial learning rate.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)

# Experiments (sweeps over methods and seeds)
flags.DEFINE_list("methods", None, "Methods to run (each app lists its own; default: all of "
                  "that app's methods).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each trains its own base network.")
flags.DEFINE_integer("base_epochs", 10, "Epochs of the base network.", lower_bound=1)
flags.DEFINE_enum("fip_step_rule", "penalty", ["penalty", "normalized", "metric"],
                  "Step rule of the app's FIP walk (penalty: Adam on D + L; normalized: that "
                  "gradient at length ε; metric: CG on (g + δI)θ = −β∇L).")

# Runtime
flags.DEFINE_string("output_dir", None, "Where config.json, results.json and plots go "
                    "(default: runs/<app name>).")
flags.DEFINE_string("cache_dir", None, "Base-network cache (default: env KERAS_FIP_CACHE or "
                    "~/.cache/keras_fip).")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "tpu", "multi_worker"],
                  "tf.distribute strategy: `mirrored` uses every local GPU (or CPU), `tpu` "
                  "the attached TPU, `multi_worker` reads TF_CONFIG.")

FLAGS = flags.FLAGS


def get_strategy(name, tpu=None):
    """The `tf.distribute.Strategy` named by `--strategy` (`keras_fip.distribute.get_strategy`)."""
    return distribute.get_strategy(name, tpu=tpu)


def output_dir(app_name):
    """The `--output_dir` flag, or `runs/<app_name>` when it is not set."""
    return FLAGS.output_dir or os.path.join("runs", app_name)


def flag_values(names):
    """The current values of the named flags, as a JSON-ready dict."""
    return {name: FLAGS[name].value for name in names}


def write_json(output_dir, filename, content):
    """Writes `content` as indented JSON to `output_dir/filename`; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    with open(path, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True, default=float)
    return path


def check_choice(value, name, choices):
    """Returns `value` if it is one of `choices`, else a `ValueError` naming the flag."""
    if value not in choices:
        raise ValueError(f"`--{name}` must be among {list(choices)}. Received: {value!r}")
    return value


def set_seed(seed):
    keras.utils.set_random_seed(seed)
