"""`apps.compress` and `apps.continual` with `--strategy=multi_worker` on two loopback workers.

Each worker runs both apps in one process (this module's `__main__`: one TensorFlow start
and one `MultiWorkerMirroredStrategy`, which `apps.common` creates once per process) with
the same flags and `--seed`, as `python -m keras_fip.distribute --workers=2 -- python -m
apps.compress --strategy=multi_worker ...` would. The chief's `results.json` must equal a
single-process run on the same flags; only the chief writes outputs (the other worker's
private directory is gone afterwards) and TensorBoard logs.
"""

import json
import os
import sys
import time

import pytest

COMPRESS = dict(model="mlp", dataset="digits", sparsities=["80"], methods=["fip"],
                seeds=["0"], workers=1, epochs=1, base_epochs=1, batch_size=64)
# split_mnist's MLP: `fit` under the strategy matches one process to ~1e-8 in the weights.
# (mnist_fmnist's cnn5 drifts to ~3e-3 after 16 Adam steps: float32 reduction order in the
# convolutions, amplified by Adam on near-zero gradients; its accuracies then agree only
# up to a flipped example.)
CONTINUAL = dict(benchmarks=["split_mnist"], dataset="digits", methods=["fip"],
                 seeds=["0"], epochs=1, continual_base_epochs=1, batch_size=32,
                 memory_per_task=10, max_train_examples=64, max_test_examples=100)
# Timings, not results: they differ between runs.
_TIMES = ("seconds",)


def _run_apps(output_dir, cache_dir):
    """Runs compress then continual in this process under the parsed `--strategy`."""
    from absl.testing import flagsaver

    from apps import compress
    from apps import continual

    with flagsaver.flagsaver(output_dir=os.path.join(output_dir, "compress"),
                             cache_dir=cache_dir, **COMPRESS):
        compress.main([])
    with flagsaver.flagsaver(output_dir=os.path.join(output_dir, "continual"),
                             cache_dir=cache_dir, **CONTINUAL):
        continual.main([])


def _comparable(results):
    return {key: value for key, value in results.items() if not key.endswith(_TIMES)}


def _results(directory):
    with open(os.path.join(directory, "results.json")) as f:
        return _comparable(json.load(f))


def test_two_worker_apps_match_one_process_and_only_the_chief_writes(tmp_path):
    from keras_fip import distribute
    from tests.apps.conftest import scalar_tags

    cache_dir = str(tmp_path / "cache")
    # One process (it also trains and caches the base network both runs start from).
    start = time.perf_counter()
    _run_apps(str(tmp_path / "single"), cache_dir)
    print(f"one process: {time.perf_counter() - start:.1f} s")

    # Two workers on 127.0.0.1; each worker's private directories go under its TMPDIR.
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-m", "tests.apps.test_multi_worker",
               f"--output_dir={tmp_path / 'multi'}", f"--cache_dir={cache_dir}"]
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
           "KERAS_BACKEND": "tensorflow", "TMPDIR": str(worker_tmp),
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    launched = distribute.launch_workers(command, num_workers=2, timeout=400, env=env,
                                         cwd=root)
    print(f"two workers: {time.perf_counter() - start:.1f} s")
    logs = "\n".join(r["stderr"][-3000:] for r in launched)
    assert [r["returncode"] for r in launched] == [0, 0], logs

    for app in ("compress", "continual"):
        single = _results(str(tmp_path / "single" / app))
        multi = _results(str(tmp_path / "multi" / app))
        assert sorted(single) == sorted(multi)
        for key, value in single.items():
            if isinstance(value, float):
                assert multi[key] == pytest.approx(value, abs=1e-5), key
            else:
                assert multi[key] == value, key
    # Only the chief wrote: the other worker's private directories were removed.
    assert os.listdir(worker_tmp) == []
    compress_tags = scalar_tags(str(tmp_path / "multi" / "compress" / "logs"))
    assert 8000 in compress_tags["compress/fip/seed_0/test_accuracy"]  # Step: 80.00%.
    assert "fip/80/seed_0/fip/distance_from_start" in compress_tags
    continual_tags = scalar_tags(str(tmp_path / "multi" / "continual" / "logs"))
    assert "split_mnist/fip/seed_0/task_4/fip/distance" in continual_tags
    assert 4 in continual_tags[
        "continual/split_mnist/fip/seed_0/after_task/task_0/accuracy"]

def main(argv):
    """A worker: `python -m tests.apps.test_multi_worker --output_dir=... --cache_dir=...`
    with `TF_CONFIG` set (`keras_fip.distribute.launch_workers`)."""
    from absl import flags

    flags.FLAGS(argv + ["--strategy=multi_worker"])
    _run_apps(flags.FLAGS.output_dir, flags.FLAGS.cache_dir)


if __name__ == "__main__":
    import apps.compress  # noqa: F401  (defines the flags before they are parsed)
    import apps.continual  # noqa: F401  (ditto)

    main(sys.argv)
