"""Tests for `Path`: recording, distances, selection, streaming save/load and resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_fip.core.masks import masks
from keras_fip.engine import MaskConstraint
from keras_fip.engine import Path
from keras_fip.engine import apply_masks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))


def _walk(model, num_steps, seed=0):
    """Deterministic weights for steps 1..num_steps."""
    rng = np.random.default_rng(seed)
    weights = [v.numpy() for v in model.trainable_variables]
    out = []
    for _ in range(num_steps):
        weights = [w + 0.1 * rng.normal(size=w.shape).astype(w.dtype) for w in weights]
        out.append(weights)
    return out


def _distance(a, b):
    return np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b)))


def _fill(path, walk, first_step=1):
    for offset, weights in enumerate(walk):
        step = first_step + offset
        recorded = weights if path.should_record(step) else None
        path.append(step, recorded, {"secondary_loss": 1.0 / step, "metric_length": step})


def test_records_start_distances_and_metrics_in_memory():
    model = _model()
    start = [v.numpy() for v in model.trainable_variables]
    walk = _walk(model, 6)
    path = Path(model, record_every=2)
    _fill(path, walk)

    assert len(path) == 4
    np.testing.assert_array_equal(path.steps, [0, 2, 4, 6])
    distances = path.metrics["euclidean_distance"]
    expected = [0.0] + [_distance(walk[i], start) for i in (1, 3, 5)]
    np.testing.assert_allclose(distances, expected, rtol=1e-12)
    recorded = [start, walk[1], walk[3], walk[5]]
    euclidean = sum(_distance(a, b) for a, b in zip(recorded[1:], recorded[:-1]))
    assert path.length() == pytest.approx(euclidean, rel=1e-12)
    assert path.length("metric") == 6.0
    # Point 0 has no trainer metrics: NaN.
    losses = path.metrics["secondary_loss"]
    assert np.isnan(losses[0])
    np.testing.assert_allclose(losses[1:], [1 / 2, 1 / 4, 1 / 6])
    for index, weights in enumerate(recorded):
        for got, want in zip(path.weights(index), weights):
            np.testing.assert_array_equal(got, want)


def test_select_and_point():
    model = _model()
    walk = _walk(model, 5)
    path = Path(model)
    for step, weights in enumerate(walk, start=1):
        path.append(step, weights, {"accuracy": [0.5, 0.9, 0.7, 0.9, 0.1][step - 1]})
    assert path.select("accuracy", mode="max") == 2  # First maximum, NaN skipped.
    assert path.select("accuracy", mode="min") == 5
    assert path.select("euclidean_distance") == 0
    best = path.select("accuracy", mode="max", return_model=True)
    for variable, weights in zip(best.trainable_variables, walk[1]):
        np.testing.assert_array_equal(variable.numpy(), weights)
    x = np.ones((2, 4), "float32")
    np.testing.assert_array_equal(path.point(-1)(x), path.point(5)(x))
    assert path.point(0) is not model


def test_model_is_copied_not_mutated():
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    path = Path(model)
    path.append(1, _walk(model, 1)[0])
    path.point(1)
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_points_keep_masks():
    model = _model()
    kernel = model.get_layer("hidden").kernel
    mask = np.random.default_rng(0).random((4, 5)) < 0.5
    apply_masks(model, {kernel.path: mask})
    path = Path(model)
    # The trainer records masked weights; even unmasked input is projected.
    path.append(1, [w + 1.0 for w in _walk(model, 1)[0]])
    point = path.point(1)
    hidden = point.get_layer("hidden").kernel
    assert isinstance(hidden.constraint, MaskConstraint)
    np.testing.assert_array_equal(hidden.constraint.mask, mask)
    assert np.all(hidden.numpy()[~mask] == 0.0)
    assert np.all(hidden.numpy()[mask] != 0.0)


def test_streamed_save_load_round_trip(tmp_path):
    model = _model()
    walk = _walk(model, 7)
    directory = tmp_path / "path"
    path = Path(model, record_every=3, directory=directory)
    _fill(path, walk)
    files = sorted(os.listdir(directory / "points"))
    assert files == ["0000000.npz", "0000001.npz", "0000002.npz"]  # Steps 0, 3, 6.
    loaded = Path.load(directory)
    assert len(loaded) == 3 and loaded.record_every == 3
    np.testing.assert_array_equal(loaded.steps, [0, 3, 6])
    for name, values in path.metrics.items():
        np.testing.assert_allclose(loaded.metrics[name], values)
    assert loaded.length() == pytest.approx(path.length())
    for got, want in zip(loaded.weights(2), walk[5]):
        np.testing.assert_array_equal(got, want)
    x = np.ones((2, 4), "float32")
    np.testing.assert_array_equal(loaded.point(2)(x), path.point(2)(x))


def test_in_memory_path_saved_later_then_streams(tmp_path):
    model = _model()
    walk = _walk(model, 4)
    path = Path(model)
    _fill(path, walk[:2])
    path.save(tmp_path / "path")
    _fill(path, walk[2:], first_step=3)
    loaded = Path.load(tmp_path / "path")
    np.testing.assert_array_equal(loaded.steps, [0, 1, 2, 3, 4])
    for got, want in zip(loaded.weights(4), walk[3]):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="already holds a path"):
        Path(model).save(tmp_path / "path")


def test_resume_after_cut_short_log_continues_from_last_point(tmp_path):
    model = _model()
    walk = _walk(model, 6)
    directory = tmp_path / "path"
    path = Path(model, directory=directory)
    _fill(path, walk[:3])
    # A run killed mid-point: weights file written, log line cut short.
    np.savez(directory / "points" / "0000004.npz", *walk[3])
    with open(directory / "points.jsonl", "a") as log:
        log.write('{"index": 4, "step": 4, "fi')

    resumed = Path(_model(seed=1), directory=directory)  # The model is not the start.
    np.testing.assert_array_equal(resumed.steps, [0, 1, 2, 3])
    assert resumed.length() == pytest.approx(path.length())
    _fill(resumed, walk[3:], first_step=4)
    np.testing.assert_array_equal(resumed.steps, [0, 1, 2, 3, 4, 5, 6])
    # Distances are still measured from the original start.
    start = path.weights(0)
    assert resumed.metrics["euclidean_distance"][-1] == pytest.approx(_distance(walk[5], start))
    reloaded = Path.load(directory)
    np.testing.assert_array_equal(reloaded.steps, [0, 1, 2, 3, 4, 5, 6])
    with open(directory / "points.jsonl") as log:
        assert all(json.loads(line) for line in log)


def test_killed_run_loses_at_most_one_interval(tmp_path):
    directory = tmp_path / "path"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        os.environ["KERAS_BACKEND"] = "tensorflow"
        sys.path.insert(0, {REPO!r})
        import keras, numpy as np
        from keras_fip.engine import Path
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        path = Path(model, record_every=2, directory={str(directory)!r})
        weights = [v.numpy() for v in model.trainable_variables]
        step = 0
        while True:
            step += 1
            weights = [w + 0.01 for w in weights]
            if path.append(step, weights if path.should_record(step) else None):
                print(step, flush=True)
            time.sleep(0.002)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        while int(process.stdout.readline()) < 20:
            pass
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        acknowledged = [int(line) for line in process.stdout.read().split()]
    finally:
        if process.poll() is None:
            process.kill()
    last_acknowledged = max([20] + acknowledged)
    loaded = Path.load(directory)
    steps = loaded.steps
    # Everything reported recorded is on disk; at most the interval in flight is lost.
    assert last_acknowledged <= steps[-1] <= last_acknowledged + 2
    np.testing.assert_array_equal(steps, np.arange(0, steps[-1] + 1, 2))
    # Every recorded point is readable and consistent with its step.
    start = loaded.weights(0)
    last = loaded.weights(-1)
    np.testing.assert_allclose(last[0] - start[0], 0.01 * steps[-1], atol=1e-4)
    # And the run resumes after its last point.
    loaded.append(int(steps[-1]) + 2, [w + 1.0 for w in last])
    assert Path.load(directory).steps[-1] == steps[-1] + 2


def test_bad_arguments_raise_value_errors(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="`record_every`"):
        Path(model, record_every=0)
    with pytest.raises(ValueError, match="`model`"):
        Path("model")
    with pytest.raises(ValueError, match="`directory`"):
        Path(model, directory=3)
    path = Path(model)
    walk = _walk(model, 2)
    path.append(1, walk[0])
    with pytest.raises(ValueError, match="`step` must be larger"):
        path.append(1, walk[1])
    with pytest.raises(ValueError, match="`weights`"):
        path.append(2, walk[1][:1])
    with pytest.raises(ValueError, match=r"`weights\[0\]`"):
        path.append(2, [np.zeros((2, 2))] + walk[1][1:])
    with pytest.raises(ValueError, match="`metrics`"):
        path.append(2, walk[1], {"loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match="`metric`"):
        path.select("nope")
    with pytest.raises(ValueError, match="`mode`"):
        path.select("euclidean_distance", mode="best")
    with pytest.raises(ValueError, match="metric_length"):
        path.length("metric")
    with pytest.raises(ValueError, match="`kind`"):
        path.length("manhattan")
    with pytest.raises(ValueError, match="`index`"):
        path.point(5)
    with pytest.raises(ValueError, match="`directory`"):
        Path.load(tmp_path / "missing")
    assert len(path) == 2
    assert path.append(3, None) is False
    assert len(path) == 2


def test_resume_rejects_a_different_architecture(tmp_path):
    Path(_model(), directory=tmp_path / "path")
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="does not match"):
        Path(other, directory=tmp_path / "path")


def test_get_config_and_masks_of_loaded_points(tmp_path):
    model = _model()
    kernel = model.get_layer("logits").kernel
    mask = np.eye(5, 3, dtype=bool)
    apply_masks(model, {kernel.path: mask})
    path = Path(model, record_every=4, directory=tmp_path / "path")
    assert path.get_config() == {
        "record_every": 4,
        "directory": str(tmp_path / "path"),
    }
    point = Path.load(tmp_path / "path").point(0)
    (read,) = masks(point).values()
    np.testing.assert_array_equal(read, mask)


@keras.saving.register_keras_serializable(package="keras_fip_test_path")
class TinyNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, name="dense")

    def call(self, inputs):
        return self.dense(inputs)


def test_loaded_points_of_subclassed_model_keep_masks(tmp_path):
    model = TinyNet()
    model(np.zeros((1, 4), "float32"))
    mask = np.random.default_rng(0).random((4, 3)) < 0.5
    apply_masks(model, [mask, None])
    path = Path(model, directory=tmp_path / "path")
    path.append(1, [w + 1.0 for w in model.get_weights()])
    point = Path.load(tmp_path / "path").point(1)
    kernel = point.trainable_variables[0]
    np.testing.assert_array_equal(kernel.constraint.mask, mask)
    assert np.all(kernel.numpy()[~mask] == 0.0)
    assert np.all(kernel.numpy()[mask] != 0.0)
