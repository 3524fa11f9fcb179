"""The keras_fip apps: absl binaries that run the experiments (`python -m apps.<name>`).

Importing this package imports TensorFlow with its C++ start-up log lines (oneDNN, CUDA
driver probes) kept off the terminal, so an app prints only its own report. Set
`KERAS_FIP_STARTUP_LOGS=1` to see them.
"""

import logging
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _import_tensorflow_quietly():
    """Imports TensorFlow and finds its devices with the process's stderr sent to /dev/null.

    TensorFlow's C++ start-up messages bypass Python's logging (and `TF_CPP_MIN_LOG_LEVEL`
    for some of them), so the file descriptor itself is redirected; Python errors raised by
    the import are printed after it is restored.
    """
    if os.environ.get("KERAS_FIP_STARTUP_LOGS") == "1":
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()

# The Adversarial Robustness Toolbox logs every attack at INFO and warns that PyTorch is
# absent; the apps report the attacks themselves.
logging.getLogger("art").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*PyTorch not found.*")
# TensorFlow's retracing notices name functions the library builds per model on purpose
# (one traced pass per model and data set); the apps print their own timings.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
