"""`apps.compress`, `apps.continual` and `apps.repair` with `--strategy=multi_worker` on two
loopback workers, and `apps.resilience`'s vulnerability and
`apps.repair`'s VGG part (~1 min).

Each worker runs the apps in one process (this module's `__main__`: one TensorFlow start
and one `MultiWorkerMirroredStrategy`, which `apps.common` creates once per process) with
the same flags and `--seed`, as `python -m keras_fip.distribute --workers=2 -- python -m
apps.compress --strategy=multi_worker ...` would. The chief's `results.json` must equal a
single-process run on the same flags; only the chief writes outputs (the other worker's
private directory is gone afterwards) and TensorBoard logs.

The two large tests (~1-2 min each under load) kill (SIGKILL) both workers in the middle of
a Compress walk (just after its checkpoint at step `KILL_AT`) or of the second task's
ContinualLearn walk, and run the same command with `--resume`: the chief's results must
still equal the uninterrupted single-process run.
"""

import json
import os
import sys
import time

import pytest

COMPRESS = dict(
    model="mlp",
    dataset="digits",
    sparsities=["80"],
    methods=["fip"],
    seeds=["0"],
    workers=1,
    epochs=1,
    base_epochs=1,
    batch_size=64,
    checkpoint_every=5,
)
# The killed workers die just after the Compress pull's checkpoint at this step (of 16).
KILL_AT = 10
# split_mnist's MLP: `fit` under the strategy matches one process to ~1e-8 in the weights.
# (mnist_fmnist's cnn5 drifts to ~3e-3 after 16 Adam steps: float32 reduction order in the
# convolutions, amplified by Adam on near-zero gradients; its accuracies then agree only
# up to a flipped example.)
CONTINUAL = dict(
    benchmarks=["split_mnist"],
    dataset="digits",
    methods=["fip", "ewc", "agem", "replay"],
    seeds=["0"],
    epochs=1,
    continual_base_epochs=1,
    batch_size=32,
    memory_per_task=10,
    max_train_examples=64,
    max_test_examples=100,
)
# For the killed continual run: all of split_mnist's digits (9 steps a task), checkpoints
# every 3 steps; the workers die after the checkpoint at step 6 of the second task.
CONTINUAL_KILLED = dict(CONTINUAL, methods=["fip"], max_train_examples=0, checkpoint_every=3)
# apps.repair's MLP parts on tiny settings (every method; the VGG part is refused under a
# strategy, not verified).
REPAIR = dict(
    dataset="digits",
    base_epochs=15,
    batch_size=64,
    learning_rate=3e-3,
    seeds=["0"],
    methods=None,
    repair_parts=["recovery", "iterative", "invariant", "transitions"],
    repair_validation_examples=150,
    repair_target=0.05,
    repair_evaluations_per_epoch=2,
    repair_mlp_width=32,
    repair_fractions=["0.5"],
    repair_max_epochs=1,
    repair_fip_learning_rates=["3e-3"],
    repair_retrain_learning_rates=["1e-3", "3e-3"],
    repair_prune_learning_rates=["0.05"],
    repair_iterative_counts=["16"],
    repair_round_budget=8,
    repair_iterative_learning_rate=3e-3,
    repair_fip_solve_examples=300,
    repair_fip_solve_sweeps=1,
    repair_fip_solve_rank=16,
    repair_fip_solve_first=100,
    repair_iterative_solve_examples=300,
    repair_iterative_fip_learning_rate=3e-3,
    repair_invariant_loops=2,
    repair_invariant_rounds=1,
    repair_invariant_budget=4,
    repair_invariant_points=3,
    repair_invariant_examples=100,
    repair_transition_fractions=["0.25"],
    repair_transition_learning_rate=3e-3,
)
CONTINUAL_KILL_AT = "walk:6:2"
# The parts run under a strategy in their own tests, on the settings of their
# in-process strategy tests (odd example counts: the workers' shares of a batch differ).
RESILIENCE = dict(
    dataset="digits",
    epochs=2,
    batch_size=64,
    learning_rate=3e-3,
    resilience_parts=["vulnerability"],
    resilience_mnist_models=["mlp"],
    resilience_cifar_models=["cnn5"],
    resilience_cifar_dataset="digits",
    resilience_cifar_epochs=1,
    resilience_directions=3,
    resilience_cifar_directions=2,
    resilience_norm=1.0,
    resilience_num_eigenpairs=3,
    resilience_metric_examples=63,
    resilience_scatter_directions=2,
    resilience_rho_examples=21,
    resilience_rho_probes=2,
    resilience_rho_steps=6,
    resilience_mlp_width=20,
)
# The VGG part's walk in inference mode: in training mode each worker normalises its share
# of a batch, as `fit` does, and the walk is close to one process's, not equal.
REPAIR_VGG = dict(
    repair_parts=["vgg"],
    seeds=["0"],
    repair_cifar_dataset="digits",
    repair_cifar_epochs=2,
    repair_vgg_width=0.125,
    repair_path_points=3,
    repair_path_steps=3,
    repair_path_training="false",
    repair_path_examples=50,
    batch_size=64,
)
# Timings, not results: they differ between runs. The t-SNE embedding of the repaired
# networks is not compared: t-SNE's optimisation turns last-bit differences of its input
# into visible ones (the networks it embeds are compared, through their losses).
_TIMES = ("seconds", "invariant/embedding")


def _run_apps(
    output_dir,
    cache_dir,
    resume=False,
    apps=("compress", "continual", "repair"),
    continual_settings=None,
):
    """Runs the named apps in this process under the parsed `--strategy`."""
    from absl.testing import flagsaver

    from apps import compress
    from apps import continual
    from apps import repair
    from apps import resilience

    if "compress" in apps:
        with flagsaver.flagsaver(
            output_dir=os.path.join(output_dir, "compress"),
            cache_dir=cache_dir,
            resume=resume,
            **COMPRESS,
        ):
            compress.main([])
    if "continual" in apps:
        with flagsaver.flagsaver(
            output_dir=os.path.join(output_dir, "continual"),
            cache_dir=cache_dir,
            resume=resume,
            **(continual_settings or CONTINUAL),
        ):
            continual.main([])
    if "repair" in apps:
        with flagsaver.flagsaver(
            output_dir=os.path.join(output_dir, "repair"),
            cache_dir=cache_dir,
            resume=resume,
            **REPAIR,
        ):
            repair.main([])
    if "resilience" in apps:
        with flagsaver.flagsaver(
            output_dir=os.path.join(output_dir, "resilience"), cache_dir=cache_dir, **RESILIENCE
        ):
            resilience.main([])
    if "repair_vgg" in apps:
        with flagsaver.flagsaver(
            output_dir=os.path.join(output_dir, "repair_vgg"), cache_dir=cache_dir, **REPAIR_VGG
        ):
            repair.main([])


def _kill_after_checkpoint(spec):
    """Makes this process SIGKILL itself right after the `n`-th checkpoint of phase `phase`
    at step `step` (`spec` is `"phase:step:n"`): a worker killed mid-walk, at a point that
    does not depend on timing."""
    import signal

    from keras_fip.engine.walk_checkpoint import WalkCheckpoint

    phase, step, count = spec.split(":")
    save = WalkCheckpoint._save
    seen = []

    def save_then_die(self, saved_phase, at, *args, **kwargs):
        save(self, saved_phase, at, *args, **kwargs)
        if saved_phase == phase and at == int(step):
            seen.append(at)
            if len(seen) == int(count):
                os.kill(os.getpid(), signal.SIGKILL)

    WalkCheckpoint._save = save_then_die


def _worker_command(tmp_path, cache_dir):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [
        sys.executable,
        "-m",
        "tests.apps.test_multi_worker",
        f"--output_dir={tmp_path / 'multi'}",
        f"--cache_dir={cache_dir}",
    ]
    env = {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return command, env, root


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
    command, env, root = _worker_command(tmp_path, cache_dir)
    env["TMPDIR"] = str(worker_tmp)
    start = time.perf_counter()
    launched = distribute.launch_workers(command, num_workers=2, timeout=400, env=env, cwd=root)
    print(f"two workers: {time.perf_counter() - start:.1f} s")
    logs = "\n".join(r["stderr"][-3000:] for r in launched)
    assert [r["returncode"] for r in launched] == [0, 0], logs

    for app in ("compress", "continual", "repair"):
        _assert_same_results(tmp_path, app)
    # Only the chief wrote: the other worker's private directories were removed.
    assert os.listdir(worker_tmp) == []
    compress_tags = scalar_tags(str(tmp_path / "multi" / "compress" / "logs"))
    assert 8000 in compress_tags["compress/fip/seed_0/test_accuracy"]  # Step: 80.00%.
    assert "fip/80/seed_0/fip/distance_from_start" in compress_tags
    continual_tags = scalar_tags(str(tmp_path / "multi" / "continual" / "logs"))
    assert "split_mnist/fip/seed_0/task_4/fip/distance" in continual_tags
    assert 4 in continual_tags["continual/split_mnist/fip/seed_0/after_task/task_0/accuracy"]


@pytest.mark.large
def test_two_workers_killed_mid_walk_resume_to_the_one_process_result(tmp_path):
    from keras_fip import distribute

    cache_dir = str(tmp_path / "cache")
    _run_apps(str(tmp_path / "single"), cache_dir, apps=("compress",))
    command, env, root = _worker_command(tmp_path, cache_dir)
    command.append("--apps=compress")
    # Both workers die (SIGKILL) just after the pull's checkpoint at KILL_AT.
    start = time.perf_counter()
    killed = distribute.launch_workers(
        command + [f"--kill_at=pull:{KILL_AT}:1"], num_workers=2, timeout=400, env=env, cwd=root
    )
    print(f"two workers, killed: {time.perf_counter() - start:.1f} s")
    assert [r["returncode"] for r in killed] == [-9, -9], "\n".join(
        r["stderr"][-3000:] for r in killed
    )
    checkpoint = tmp_path / "multi" / "compress" / "checkpoints" / "fip_80_seed_0"
    with open(checkpoint / "phase_pull.json") as f:
        assert json.load(f)["step"] == KILL_AT
    assert not (tmp_path / "multi" / "compress" / "results.json").exists()
    # The same command with --resume continues the walk from that checkpoint.
    start = time.perf_counter()
    resumed = distribute.launch_workers(
        command + ["--resume"], num_workers=2, timeout=400, env=env, cwd=root
    )
    print(f"two workers, resumed: {time.perf_counter() - start:.1f} s")
    assert [r["returncode"] for r in resumed] == [0, 0], "\n".join(
        r["stderr"][-3000:] for r in resumed
    )
    assert not checkpoint.exists()  # The job was recorded: its checkpoint removed.
    _assert_same_results(tmp_path, "compress")


@pytest.mark.large
def test_two_workers_killed_mid_continual_walk_resume_to_the_one_process_result(tmp_path):
    from keras_fip import distribute

    cache_dir = str(tmp_path / "cache")
    _run_apps(
        str(tmp_path / "single"),
        cache_dir,
        apps=("continual",),
        continual_settings=CONTINUAL_KILLED,
    )
    command, env, root = _worker_command(tmp_path, cache_dir)
    command.append("--apps=continual")
    killed = distribute.launch_workers(
        command + [f"--kill_at={CONTINUAL_KILL_AT}"], num_workers=2, timeout=400, env=env, cwd=root
    )
    assert [r["returncode"] for r in killed] == [-9, -9], "\n".join(
        r["stderr"][-3000:] for r in killed
    )
    checkpoints = tmp_path / "multi" / "continual" / "checkpoints" / "split_mnist" / "fip"
    task_2 = next(checkpoints.glob("memory_*/seed_0/task_2"))
    with open(task_2 / "phase_walk.json") as f:
        saved = json.load(f)
    assert (saved["step"], saved["done"]) == (6, False)
    resumed = distribute.launch_workers(
        command + ["--resume"], num_workers=2, timeout=400, env=env, cwd=root
    )
    assert [r["returncode"] for r in resumed] == [0, 0], "\n".join(
        r["stderr"][-3000:] for r in resumed
    )
    assert not (tmp_path / "multi" / "continual" / "checkpoints").exists()  # Finished.
    _assert_same_results(tmp_path, "continual")


def test_two_workers_run_the_lifted_parts_as_one_process(tmp_path):
    from keras_fip import distribute
    from tests.apps.conftest import assert_results_close

    cache_dir = str(tmp_path / "cache")
    lifted = ("resilience", "repair_vgg")
    _run_apps(str(tmp_path / "single"), cache_dir, apps=lifted)
    command, env, root = _worker_command(tmp_path, cache_dir)
    launched = distribute.launch_workers(
        command + ["--apps=" + ",".join(lifted)], num_workers=2, timeout=600, env=env, cwd=root
    )
    logs = "\n".join(r["stderr"][-3000:] for r in launched)
    assert [r["returncode"] for r in launched] == [0, 0], logs
    for app in lifted:
        single = _results(str(tmp_path / "single" / app))
        # The in-process strategy tests' tolerances (measured there: < 1e-6 and 5e-6).
        assert_results_close(_results(str(tmp_path / "multi" / app)), single, rtol=1e-4, atol=1e-6)
    # The eigen adversary, the scatter and the recovery path were computed, not skipped.
    single = _results(str(tmp_path / "single" / "resilience"))
    assert single["mlp/eigen/predicted_change"] > 0
    assert single["cnn5/random/predicted_change/mean"] > 0
    assert _results(str(tmp_path / "single" / "repair_vgg"))["vgg11/filters_deleted"] > 0


def _assert_same_results(tmp_path, app):
    """The two-worker run's `results.json` equals the one-process run's (floats to 1e-5)."""
    single = _results(str(tmp_path / "single" / app))
    multi = _results(str(tmp_path / "multi" / app))
    assert sorted(single) == sorted(multi)
    for key, value in single.items():
        _assert_same(multi[key], value, key)


def _assert_same(got, expected, key):
    """Floats (nested in lists too) to 1e-5, everything else exactly."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5, nan_ok=True), key
    elif isinstance(expected, list) and isinstance(got, list):
        assert len(got) == len(expected), key
        for got_item, expected_item in zip(got, expected):
            _assert_same(got_item, expected_item, key)
    else:
        assert got == expected, key


def main(argv):
    """A worker: `python -m tests.apps.test_multi_worker --output_dir=... --cache_dir=...`
    with `TF_CONFIG` set (`keras_fip.distribute.launch_workers`)."""
    from absl import flags

    options = {
        arg.split("=")[0]: arg.split("=")[1]
        for arg in argv
        if arg.startswith(("--kill_at=", "--apps="))
    }
    argv = [arg for arg in argv if arg.split("=")[0] not in options]
    flags.FLAGS(argv + ["--strategy=multi_worker"])
    if "--kill_at" in options:
        _kill_after_checkpoint(options["--kill_at"])
    apps = tuple(options.get("--apps", "compress,continual,repair").split(","))
    _run_apps(
        flags.FLAGS.output_dir,
        flags.FLAGS.cache_dir,
        resume=flags.FLAGS.resume,
        apps=apps,
        continual_settings=CONTINUAL_KILLED if apps == ("continual",) else None,
    )


if __name__ == "__main__":
    import apps.compress  # noqa: F401  (defines the flags before they are parsed)
    import apps.continual  # noqa: F401  (ditto)
    import apps.repair  # noqa: F401  (ditto)
    import apps.resilience  # noqa: F401  (ditto)

    main(sys.argv)
