"""Every `benchmarks/` script runs on tiny settings and prints its JSON lines.

A broken benchmark fails CI here; the figures themselves are measured by running the
scripts with their defaults, never asserted.
"""

import importlib
import json
import pkgutil

import pytest

import benchmarks

# Tiny settings per script (digits, small models, few steps).
TINY_ARGUMENTS = {
    "metric_matvec": [
        "--models=mlp",
        "--dataset=digits",
        "--num_inputs=64",
        "--repeats=2",
        "--block_vectors=3",
        "--trace_samples=6",
    ],
    "fip_step": [
        "--models=mlp",
        "--dataset=digits",
        "--steps=3",
        "--warmup=2",
        "--repeats=1",
        "--warmup_rounds=1",
        "--batch_size=32",
    ],
    "isofunctional_walk": [
        "--model=mlp",
        "--dataset=digits",
        "--steps=5",
        "--anchor_examples=256",
        "--batch_size=64",
    ],
    "continual_step": [
        "--model=mlp",
        "--batch_size=16",
        "--short_steps=2",
        "--long_steps=4",
        "--repeats=1",
    ],
    "compress_unseen": [
        "--nets=plain24",
        "--base_epochs=1",
        "--steps=6",
        "--seeds=0",
        "--learning_rates=1e-3",
        "--sparsities=0.5",
    ],
    "multi_worker": ["--computations=metric", "--steps=2"],
    # One replica in this process (a second MirroredStrategy over the test session's two
    # logical CPUs could collide with the shared one).
    "replica_scaling": [
        "--models=mlp",
        "--dataset=digits",
        "--replicas=1",
        "--steps=3",
        "--warmup=2",
        "--repeats=1",
        "--rounds=1",
        "--batch_size=32",
        "--in_process",
    ],
}
# The keys each script's JSON lines must have.
EXPECTED_KEYS = {
    "metric_matvec": (
        "matvec_over_gradient",
        "matmat_over_gradient",
        "matvecs_for_top20",
        "trace_seconds_one_per_pass",
        "trace_seconds_products",
        "quadratic_form_over_gradient",
        "quadratic_form_block_over_gradient",
        "peak_memory_matvec_mb",
    ),
    "fip_step": (
        "penalty_over_fit",
        "penalty_over_fit_paired",
        "penalty_measure100_over_fit",
        "normalized_over_fit",
        "metric_cg10_over_fit",
    ),
    "isofunctional_walk": ("euclidean_distance", "test_accuracy_after"),
    "continual_step": ("fip_step_seconds", "replay_step_seconds", "fip_over_replay"),
    "compress_unseen": (
        "fip/50/test/accuracy",
        "oneshot/50/test/accuracy",
        "gradual/50/test/accuracy",
        "fip/50/steps",
    ),
    "multi_worker": ("computation", "max_abs_difference"),
    "replica_scaling": ("fit_samples_per_second", "fip_samples_per_second", "fip_speedup"),
}


def _scripts():
    return sorted(module.name for module in pkgutil.iter_modules(benchmarks.__path__))


def test_every_benchmark_script_has_tiny_settings():
    assert set(_scripts()) == set(TINY_ARGUMENTS)


@pytest.mark.parametrize("name", sorted(TINY_ARGUMENTS))
def test_benchmark_prints_json_lines(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_FIP_CACHE", str(tmp_path / "cache"))
    module = importlib.import_module(f"benchmarks.{name}")
    module.main(TINY_ARGUMENTS[name])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines, f"benchmarks.{name} printed no JSON line"
    for line in lines:
        record = json.loads(line)
        assert record["benchmark"] == name
        if record.get("summary"):  # Mean ± std over seeds, checked below.
            assert f"{EXPECTED_KEYS[name][0]}/mean" in record
            continue
        for key in EXPECTED_KEYS[name]:
            assert key in record, f"benchmarks.{name}: no {key!r} in {sorted(record)}"
        if name == "metric_matvec":
            # TensorFlow already runs here, so the CPU allocator may keep no statistics:
            # the figure is then null with a note, never a crash.
            memory = record["peak_memory_matvec_mb"]
            assert (memory is not None and memory >= 0) or "peak_memory_note" in record
            assert record["trace_estimates_agree"]


def test_fip_step_times_every_step_asked_for_beyond_one_pass_over_arrays():
    import keras
    import numpy as np

    from benchmarks import fip_step

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((64, 3), "float32"), np.zeros((64, 2), "float32")
    # 4 batches a pass; `fit(steps_per_epoch=7)` would stop after 4 and time 3 of 6.
    seconds, cpu_seconds = fip_step._time_fit(model, (x, y), steps=6, warmup=1, batch_size=16)
    assert int(model.optimizer.iterations) == 7
    assert seconds > 0 and cpu_seconds >= 0
