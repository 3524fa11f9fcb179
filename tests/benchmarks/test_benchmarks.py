"""Every `benchmarks/` script runs on tiny settings and prints its JSON lines.

A broken benchmark fails CI here; the figures themselves are measured by running the
scripts with their defaults, never asserted.
"""

import importlib
import json
import pkgutil
import re

import pytest

import benchmarks

# Tiny settings per script (digits, small models, few steps; users' models trained for
# one epoch, on a few hundred MNIST images where the script takes the MNIST convnet).
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
    "quantize_lenet": [
        "--model=mlp",
        "--dataset=digits",
        "--base_epochs=1",
        "--bits=4",
        "--methods=fip,keras_int4",
        "--fip_epochs=1",
        '--fip_options={"schedule": {"min_steps": 5}}',
    ],
    "quantize_bert": [
        "--bits=4",
        "--methods=fip,keras_int4",
        "--vocabulary_size=200",
        "--sequence_length=16",
        "--num_layers=1",
        "--hidden_dim=16",
        "--intermediate_dim=32",
        "--pretrain_epochs=1",
        "--max_sentences=300",
        "--anchor_sentences=32",
        "--eval_sentences=32",
        "--fip_steps=2",
    ],
    "operation_overhead": [
        "--model=mlp",
        "--operations=isofunctional,compress",
        "--steps=4",
        "--repeats=1",
        "--examples=512",
    ],
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
    "user_models": ["--models=residual_convnet,mnist_convnet", "--epochs=1", "--train_size=512"],
    "compress_users": [
        "--models=mnist_convnet",
        "--base_epochs=1",
        "--train_size=1000",
        "--sparsities=90",
        "--steps=4",
        "--learning_rates=1e-3",
    ],
    "continual_users": [
        "--models=mnist_convnet",
        "--seeds=0",
        "--base_epochs=1",
        "--train_size=1000",
        "--new_train_size=512",
        "--memory=100",
        "--epochs=1",
    ],
    "damage_repair_users": [
        "--models=residual_convnet",
        "--base_epochs=1",
        "--directions=2",
        "--examples=128",
        "--epochs=1",
        "--train_examples=512",
        "--retrain_learning_rates=1e-2",
    ],
    "ensemble_users": [
        "--models=residual_convnet",
        "--seeds=0",
        "--num_members=2",
        "--base_epochs=1",
    ],
    "robust_ensembles": [
        "--dataset=digits",
        "--train_size=300",
        "--test_size=30",
        "--epochs=1",
        "--num_members=2",
        "--attack_steps=1",
        "--steps=2",
        "--square_queries=5",
        "--learning_rates=1e-3",
        "--fip_steps=4",
        "--sanity_epsilons=",
    ],
}
# The keys each script's JSON lines must have ("a/b" is a flat key or b inside the dict
# a); for a script whose lines come in parts, by part (every part must print).
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
    "quantize_lenet": ("accuracy", "method", "bits"),
    "quantize_bert": ("accuracy", "method", "bits"),
    "operation_overhead": ("operation", "steps", "call_seconds", "fit_seconds", "call_over_fit"),
    "replica_scaling": ("fit_samples_per_second", "fip_samples_per_second", "fip_speedup"),
    "user_models": ("test_accuracy", "model", "params"),
    "compress_users": (
        "dense/test/accuracy",
        "fip/90/test/accuracy",
        "oneshot/90/test/accuracy",
        "fip/90/steps",
        "fip/90/task_weight",
        "fip/90/margin_over_oneshot",
    ),
    "continual_users": ("old_own", "old_all", "new_own", "new_all", "old_start", "method"),
    "damage_repair_users": {
        "eigen": ("eigen_drop", "clean", "eigen", "random_max_drop", "num_matvecs"),
        "repair": ("fip", "undamaged", "damaged", "retrain", "fip_minus_retrain"),
    },
    "ensemble_users": (
        "fip/accuracy",
        "deep/accuracy",
        "base/accuracy",
        "fip/nll",
        "fip/train_examples",
        "deep/train_examples",
        "checks/nll_le_base",
    ),
    "robust_ensembles": (
        "clean_accuracy",
        "method",
        "train_examples",
        "robust/pgd/0.1",
        "robust/autoattack/0.3",
        "worst_case/0.3",
        "sanity/passed",
    ),
}
# Scripts whose summary lines give the first key itself as a "mean ± std" string (the
# others give `<key>/mean`).
SPREAD_STRINGS = {"damage_repair_users", "ensemble_users"}


def _has(record, key):
    """Whether `record` has `key`, as a flat key or as a path into nested dicts."""
    if key in record:
        return True
    head, _, rest = key.partition("/")
    return bool(rest) and isinstance(record.get(head), dict) and _has(record[head], rest)


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
    parts = set()
    for line in lines:
        record = json.loads(line)
        assert record["benchmark"] == name
        expected = EXPECTED_KEYS[name]
        if isinstance(expected, dict):  # A summary line names its part first.
            part = record.get("part") or record["summary"].split("/")[0]
            expected = expected[part]
            parts.add(part)
        if record.get("summary"):  # Mean ± std over seeds, checked below.
            if name in SPREAD_STRINGS:
                assert re.fullmatch(r"-?\d+\.\d+ ± \d+\.\d+", record[expected[0]])
            else:
                assert f"{expected[0]}/mean" in record
            continue
        for key in expected:
            assert _has(record, key), f"benchmarks.{name}: no {key!r} in {sorted(record)}"
        if name == "metric_matvec":
            # TensorFlow already runs here, so the CPU allocator may keep no statistics:
            # the figure is then null with a note, never a crash.
            memory = record["peak_memory_matvec_mb"]
            assert (memory is not None and memory >= 0) or "peak_memory_note" in record
            assert record["trace_estimates_agree"]
    if isinstance(EXPECTED_KEYS[name], dict):
        assert parts == set(EXPECTED_KEYS[name])


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


def test_continual_users_summary_gives_each_methods_spread_over_seeds():
    from benchmarks import continual_users

    runs = [
        {
            "model": "text_transformer",
            "method": method,
            "seed": seed,
            "old_start": 0.8,
            "old_own": own,
            "old_all": 0.4,
            "new_own": 0.75 + seed / 100,
        }
        for method, own in (("fip", 0.79), ("ewc", 0.7))
        for seed in (0, 1)
    ]
    table = continual_users.results_summary(runs)["tables"][0]
    assert [row[0] for row in table["rows"]] == ["fip", "ewc"]
    assert table["rows"][0][2:5] == ["79.0 [79.0, 79.0]", "-1.0 [-1.0, -1.0]", "75.5 [75.0, 76.0]"]
    assert table["headline"] == [0]
