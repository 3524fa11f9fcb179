"""Tests for `keras_fip.distribute`: strategies by name, loopback workers, resumable walks."""

import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip import distribute
from keras_fip.engine.data_adapter import fip_dataset

# Strategy resolution.


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"name": "gpu"}, "strategy"),
        ({"name": None}, "strategy"),
        ({"name": "mirrored", "tpu": "grpc://10.0.0.1:8470"}, "tpu"),
        ({"name": "tpu", "tpu": ""}, "tpu"),
        ({"name": "multi_worker", "communication": "mpi"}, "communication"),
    ],
)
def test_get_strategy_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*Received: {argument}="):
        distribute.get_strategy(**kwargs)


def test_get_strategy_default_is_the_current_strategy():
    assert distribute.get_strategy("default") is tf.distribute.get_strategy()
    assert distribute.is_chief() and distribute.task_index() == 0


# Launching.


def test_launch_workers_runs_each_worker_with_its_tf_config():
    code = "import json, os; print(json.loads(os.environ['TF_CONFIG'])['task']['index'])"
    results = distribute.launch_workers([sys.executable, "-c", code], num_workers=2, timeout=60)
    assert [r["returncode"] for r in results] == [0, 0]
    assert [r["stdout"].strip() for r in results] == ["0", "1"]


def test_launch_workers_kills_the_process_group_at_the_timeout():
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen(['sleep', '60']); print(child.pid, flush=True); "
        "time.sleep(60)"
    )
    start = time.monotonic()
    results = distribute.launch_workers([sys.executable, "-c", code], num_workers=1, timeout=3)
    assert time.monotonic() - start < 30
    assert results[0]["timed_out"] and results[0]["returncode"] == -9
    child = int(results[0]["stdout"].split()[0])
    time.sleep(0.5)
    assert not _alive(child)  # The worker's own child is gone too.


def _alive(pid):
    """Whether `pid` runs (a killed child left unreaped by PID 1 is a zombie: not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_launch_workers_stops_the_others_when_one_fails():
    code = (
        "import json, os, sys, time; "
        "index = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
        "sys.exit(3) if index == 1 else time.sleep(60)"
    )
    start = time.monotonic()
    results = distribute.launch_workers([sys.executable, "-c", code], num_workers=2, timeout=60)
    assert time.monotonic() - start < 30
    assert [r["returncode"] for r in results] == [-9, 3]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_workers": 0}, "num_workers"),
        ({"timeout": 0}, "timeout"),
        ({"command": "python"}, "command"),
    ],
)
def test_launch_workers_errors_name_the_argument(kwargs, argument):
    arguments = {"command": [sys.executable, "-c", "pass"], **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        distribute.launch_workers(**arguments)


# Datasets and resumable walks (one process).


class _Count(keras.callbacks.Callback):
    """Walk state outside the optimizer: a variable the callback advances every step."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_train_batch_end(self, batch, logs=None):
        self.variable.assign(self.variable * 2.0 + 1.0)


def _walk(directory, steps, digits, state=None):
    x, y, _, _ = digits
    keras.utils.set_random_seed(0)
    model = keras_fip.models.mlp(8, input_shape=(8, 8, 1))
    trainer = keras_fip.FIPTrainer(
        model,
        distance="kl",
        secondary_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))  # Stateful: restored too.
    data = fip_dataset(model, x[:128], secondary=(x[:128], y[:128]), batch_size=16, seed=0)
    extra = {} if state is None else {"state_variables": [state], "callbacks": [_Count(state)]}
    path, history, first = distribute.resumable_walk(
        trainer, data, steps, directory, record_every=2, verbose=0, **extra
    )
    return model.get_weights(), path, history, first


def test_resumable_walk_resumes_at_the_uninterrupted_weights(tmp_path, digits):
    full, _, full_history, _ = _walk(str(tmp_path / "full"), 8, digits)
    _walk(str(tmp_path / "cut"), 5, digits)  # Stops after step 5; step 4 is resumable.
    resumed, path, history, first = _walk(str(tmp_path / "cut"), 8, digits)
    assert first == 4
    assert list(path.steps) == [0, 2, 4, 6, 8]
    assert history["secondary_loss"] == full_history["secondary_loss"][4:]
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a, b)


def test_resumable_walk_restores_the_state_variables(tmp_path, digits):
    full = tf.Variable(0.0)
    _walk(str(tmp_path / "full"), 8, digits, state=full)
    cut = tf.Variable(0.0)
    _walk(str(tmp_path / "cut"), 5, digits, state=cut)  # Killed after step 5 (state 31).
    resumed = tf.Variable(-100.0)  # A new process: whatever it starts with.
    _, _, _, first = _walk(str(tmp_path / "cut"), 8, digits, state=resumed)
    assert first == 4 and float(full.numpy()) == 255.0  # 2^8 - 1 after 8 steps.
    assert float(resumed.numpy()) == float(full.numpy())  # Restored at step 4 (15).


# Two workers on loopback (subprocesses, bounded in time, killed on exit).


@pytest.fixture(scope="module")
def loopback_rows(tmp_path_factory):
    from benchmarks import multi_worker

    args = multi_worker.parse(
        [
            "--steps=6",
            "--kill_at=3",
            "--record_every=2",
            "--batch_size=32",
            "--timeout=240",
            f"--output_dir={tmp_path_factory.mktemp('multi_worker')}",
        ]
    )
    rows, (first_launch, launches) = multi_worker.run(args)
    logs = "\n".join(r["stderr"][-3000:] for r in first_launch)
    return {row["computation"]: row for row in rows}, launches, logs


@pytest.mark.parametrize("computation", ["compress", "continual", "metric"])
def test_two_workers_match_one_process(loopback_rows, computation):
    rows, launches, logs = loopback_rows
    difference = rows[computation]["max_abs_difference"]
    assert difference <= 1e-5, (launches, logs)


def test_killed_two_worker_walk_resumes_at_the_uninterrupted_weights(loopback_rows):
    rows, launches, logs = loopback_rows
    killed, resumed = launches
    assert -9 in killed["returncodes"] and not killed["timed_out"], (launches, logs)
    assert resumed["returncodes"] == [0, 0], launches
    assert rows["resume"]["resumed_from_step"] == 2  # The last point before the kill.
    assert rows["resume"]["max_abs_difference"] <= 1e-5, launches
