"""Tests for `keras_fip.distribute`: strategies by name, loopback workers, a resumed walk."""

import sys
import time

import pytest
import tensorflow as tf

from keras_fip import distribute

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
