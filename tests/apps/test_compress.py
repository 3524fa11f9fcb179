import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import flagsaver

import keras_fip
from apps import common
from apps import compress
from keras_fip import data
from keras_fip.core import tuning
from keras_fip.engine.walk_checkpoint import WalkCheckpoint
from tests.apps.conftest import scalar_tags


def test_compress_app_sweeps_methods_and_exports_the_sparsest(tmp_path, monkeypatch):
    output_dir = str(tmp_path / "compress")
    with flagsaver.flagsaver(
        model="mlp",
        dataset="digits",
        sparsities=["50", "80"],
        methods=["fip", "gradual", "gradual_per_layer", "oneshot", "lth"],
        seeds=["0"],
        workers=1,
        epochs=2,
        base_epochs=3,
        batch_size=64,
        lth_rounds=2,
        prune_learning_rates=["3e-3"],
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        compress.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    for method in ("fip", "gradual", "gradual_per_layer", "oneshot", "lth"):
        for percent in ("50", "80"):
            key = f"{method}/{percent}"
            assert 0.0 <= results[f"{key}/test/accuracy"] <= 1.0
            assert results[f"{key}/sparsity"] == pytest.approx(float(percent) / 100, abs=2e-3)
            assert results[f"{key}/epochs"] == 2
            assert results[f"{key}/num_seeds"] == 1
    assert results["dataset/subset"] is False
    # One rate: used as given, nothing tuned.
    assert results["gradual/80/learning_rate"] == 3e-3
    assert not any("tuning" in key for key in results)
    assert not os.path.exists(os.path.join(output_dir, "tuning"))
    assert results["fip/80/margin_over_gradual"] == pytest.approx(
        results["fip/80/test/accuracy"] - results["gradual/80/test/accuracy"]
    )
    for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png", "config.json"):
        assert os.path.isfile(os.path.join(output_dir, name))
    served = tf.saved_model.load(os.path.join(output_dir, "serving"))
    x, _ = data.load("digits", "test")
    kernels = [v.numpy() for v in served.variables if len(v.shape) == 2]
    zeros = sum(int(np.sum(k == 0)) for k in kernels)
    assert zeros / sum(k.size for k in kernels) == pytest.approx(0.8, abs=2e-3)
    assert served.serve(x[:4]).shape == (4, 10)
    # TensorBoard: every method's accuracy, sparsity and movement per target sparsity
    # (step: sparsity in 0.01%), and the FIP walks' per-step scalars.
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    assert tags["compress/fip/seed_0/test_accuracy"] == pytest.approx(
        {5000: results["fip/50/test/accuracy"], 8000: results["fip/80/test/accuracy"]}
    )
    assert tags["compress/lth/seed_0/sparsity"][8000] == pytest.approx(0.8, abs=2e-3)
    assert tags["compress/oneshot/seed_0/distance_moved"][5000] > 0
    assert "compress/gradual/seed_0/output_change" in tags
    for name in ("distance", "distance_from_start", "secondary_loss"):
        assert len(tags[f"fip/80/seed_0/fip/{name}"]) > 1

    # A killed sweep resumes: recorded jobs are kept, the missing one runs again, alike.
    os.remove(os.path.join(output_dir, "jobs", "oneshot_80_seed_0.json"))
    with flagsaver.flagsaver(
        model="mlp",
        dataset="digits",
        sparsities=["50", "80"],
        methods=["fip", "gradual", "gradual_per_layer", "oneshot", "lth"],
        seeds=["0"],
        workers=1,
        resume=True,
        epochs=2,
        base_epochs=3,
        batch_size=64,
        lth_rounds=2,
        prune_learning_rates=["3e-3"],
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        compress.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        resumed = json.load(f)
    assert resumed["oneshot/80/test/accuracy"] == results["oneshot/80/test/accuracy"]
    assert resumed["oneshot/80/wall_time_seconds"] != results["oneshot/80/wall_time_seconds"]
    for key, value in results.items():
        if key != "wall_time_seconds" and not key.startswith("oneshot/80/"):
            assert resumed[key] == value, key  # Not run again: even the timings agree.

    # A FIP walk killed mid-walk resumes from its checkpoint and ends at the same weights.
    killed_dir = str(tmp_path / "killed")
    save = WalkCheckpoint._save

    def save_then_die(self, phase, step, *args, **kwargs):
        save(self, phase, step, *args, **kwargs)
        if phase == "pull" and step == 10:
            raise KeyboardInterrupt("killed after the checkpoint at step 10")

    settings = dict(
        model="mlp",
        dataset="digits",
        sparsities=["80"],
        methods=["fip"],
        seeds=["0"],
        workers=1,
        epochs=2,
        base_epochs=3,
        batch_size=64,
        checkpoint_every=5,
        output_dir=killed_dir,
        cache_dir=str(tmp_path / "cache"),
    )
    monkeypatch.setattr(WalkCheckpoint, "_save", save_then_die)
    with flagsaver.flagsaver(**settings), pytest.raises(KeyboardInterrupt):
        compress.main([])
    monkeypatch.setattr(WalkCheckpoint, "_save", save)
    checkpoint = os.path.join(killed_dir, "checkpoints", "fip_80_seed_0")
    with open(os.path.join(checkpoint, "phase_pull.json")) as f:
        assert json.load(f)["step"] == 10
    with flagsaver.flagsaver(resume=True, **settings):
        compress.main([])
    assert not os.path.exists(checkpoint)  # Recorded: the checkpoint is removed.
    with open(os.path.join(killed_dir, "results.json")) as f:
        assert json.load(f)["fip/80/test/accuracy"] == results["fip/80/test/accuracy"]
    expected = keras.saving.load_model(os.path.join(output_dir, "sparsest_fip.keras"))
    actual = keras.saving.load_model(os.path.join(killed_dir, "sparsest_fip.keras"))
    for a, b in zip(actual.trainable_variables, expected.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


def test_compress_app_rejects_bad_sparsities(tmp_path):
    with flagsaver.flagsaver(sparsities=["100"], output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="sparsities"):
            compress.main([])


def test_compress_app_gives_compress_only_model_data_budget_and_seed(tmp_path, monkeypatch):
    calls = []

    class Recording(compress.Compress):
        def __init__(self, *args, **kwargs):
            calls.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(compress, "Compress", Recording)
    output_dir = str(tmp_path / "defaults")
    with flagsaver.flagsaver(
        model="mlp",
        dataset="digits",
        sparsities=["80"],
        methods=["fip"],
        seeds=["0"],
        workers=1,
        epochs=2,
        base_epochs=2,
        batch_size=64,
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        compress.main([])
    (kwargs,) = calls
    # The data with their labels, the budget, the seed; the rest is input and output.
    assert set(kwargs) == {"data", "schedule", "walk"}
    x, y = kwargs["data"]
    assert len(x) == len(y) == len(data.load("digits")[0])
    assert kwargs["schedule"] == compress.Schedule(min_steps=0)  # Exactly the budget.
    walk = kwargs["walk"]
    # The walk names the budget, the seed and the recording only: the rest is the default.
    named = {key for key, value in vars(walk).items() if value is not None}
    assert {"epochs", "seed"} <= named
    assert named <= {"epochs", "seed", "verbose", "record_every", "log_dir", "checkpoint_directory"}
    assert (walk.epochs, walk.seed, walk.verbose) == (2, 0, 0)
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    # The labels' weight was chosen on a fifth held out of the data, its steps reported.
    assert results["fip/80/task_weights"][0] in (0.0, 1.0)
    steps = 2 * int(np.ceil(0.8 * len(x) / 128))
    candidates = len(keras_fip.compress.CANDIDATES)
    assert results["fip/80/selection_steps"] == pytest.approx(candidates * steps, abs=candidates)
    assert 0.0 < results["fip/80/parameter_sparsity"] < results["fip/80/sparsity"]


def test_compress_app_runs_jobs_in_worker_processes(tmp_path):
    output_dir = str(tmp_path / "workers")
    with flagsaver.flagsaver(
        model="mlp",
        dataset="digits",
        sparsities=["90"],
        methods=["fip", "gradual"],
        seeds=["0", "1"],
        workers=2,
        epochs=1,
        base_epochs=2,
        batch_size=64,
        prune_learning_rates=["1e-7", "3e-3", "10"],
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        compress.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    for method in ("fip", "gradual"):
        assert results[f"{method}/90/num_seeds"] == 2
        assert results[f"{method}/90/sparsity"] == pytest.approx(0.9, abs=2e-3)
    # The tuning ran in the worker processes too (on the tuning base network they read
    # from `<output_dir>/tuning/`), and the choice is the best on validation.
    validation = results["gradual/90/tuning/validation_accuracy"]
    assert sorted(validation) == ["0.003", "10", "1e-07"]
    assert results["gradual/90/learning_rate"] == 3e-3 == float(max(validation, key=validation.get))
    assert os.path.isfile(os.path.join(output_dir, "tuning", "base_seed_0.keras"))
    assert not any(
        key.startswith("fip/") and ("learning_rate" in key or "tuning" in key) for key in results
    )  # Compress keeps its own rate.
    with open(os.path.join(output_dir, "config.json")) as f:
        assert json.load(f)["epochs"] == 1


# The baselines' learning rates, chosen on a validation split: one entry far too small
# (1e-7: the pruned network is barely fine-tuned), one diverging (10), one good (3e-3).
TUNING = dict(
    model="mlp",
    dataset="digits",
    sparsities=["80"],
    methods=["oneshot"],
    seeds=["0", "1"],
    workers=1,
    epochs=2,
    base_epochs=3,
    batch_size=64,
    prune_learning_rates=["10", "1e-7", "3e-3"],
)


def _scrambled_test_labels(load):
    def scrambled(name, split="train", *args, **kwargs):
        x, y = load(name, split, *args, **kwargs)
        if split == "test":
            y = (np.asarray(y) + 1 + np.arange(len(y)) % 9) % 10  # Every label changed.
        return x, y

    return scrambled


def test_compress_app_chooses_the_baselines_rate_on_validation_never_on_test(tmp_path, monkeypatch):
    cache_dir = str(tmp_path / "cache")
    output_dir = str(tmp_path / "tuned")
    with flagsaver.flagsaver(output_dir=output_dir, cache_dir=cache_dir, **TUNING):
        compress.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    validation = results["oneshot/80/tuning/validation_accuracy"]
    assert sorted(validation) == ["0.003", "10", "1e-07"]  # The grid, not extended.
    # The chosen rate is the best on validation: the diverging entry is far behind.
    assert results["oneshot/80/learning_rate"] == 3e-3
    assert max(validation, key=validation.get) == "0.003"
    assert validation["10"] < validation["0.003"] - 0.2
    assert validation["1e-07"] < validation["0.003"]
    assert results["tuning/seeds"] == [0]  # The first seed only, by default.
    assert results["tuning/validation_fraction"] == 0.1
    records = sorted(os.listdir(os.path.join(output_dir, "jobs", "tuning")))
    assert records == [f"oneshot_80_seed_0_lr_{rate}.json" for rate in ("0.003", "10", "1e-07")]
    with open(os.path.join(output_dir, "jobs", "oneshot_80_seed_1.json")) as f:
        assert json.load(f)["learning_rate"] == 3e-3  # Every seed trains at the choice.
    with open(os.path.join(output_dir, "config.json")) as f:
        assert json.load(f)["prune_learning_rates"] == ["10", "1e-7", "3e-3"]

    # The test labels are never read for the choice: with every one of them changed, the
    # validation accuracies and the choice are the same (the test accuracy is not).
    monkeypatch.setattr(data, "load", _scrambled_test_labels(data.load))
    monkeypatch.setattr(compress, "_DATA", {})
    scrambled_dir = str(tmp_path / "scrambled")
    with flagsaver.flagsaver(output_dir=scrambled_dir, cache_dir=cache_dir, **TUNING):
        compress.main([])
    monkeypatch.undo()
    with open(os.path.join(scrambled_dir, "results.json")) as f:
        scrambled = json.load(f)
    assert scrambled["oneshot/80/tuning/validation_accuracy"] == validation
    assert scrambled["oneshot/80/learning_rate"] == 3e-3
    assert scrambled["oneshot/80/test/accuracy"] < results["oneshot/80/test/accuracy"] - 0.3

    # A killed tuning resumes (reading the tuning base network from `<output_dir>/tuning/`):
    # the missing tuning run and final job run again, alike.
    os.remove(os.path.join(output_dir, "jobs", "tuning", "oneshot_80_seed_0_lr_0.003.json"))
    os.remove(os.path.join(output_dir, "jobs", "oneshot_80_seed_1.json"))
    with flagsaver.flagsaver(output_dir=output_dir, cache_dir=cache_dir, resume=True, **TUNING):
        compress.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        resumed = json.load(f)
    for key, value in results.items():
        if "seconds" in key:
            continue
        if isinstance(value, float):
            assert resumed[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert resumed[key] == value, key


def test_compress_app_rejects_bad_learning_rate_grids(tmp_path):
    for grid in (["fast"], ["0"], ["1e-3", "1e-3"], ["-1e-3", "1e-2"]):
        with flagsaver.flagsaver(prune_learning_rates=grid, output_dir=str(tmp_path / "out")):
            with pytest.raises(ValueError, match="prune_learning_rates"):
                compress.main([])
    assert not os.path.exists(tmp_path / "out")  # Refused before any work.


def test_learning_rate_search_extends_past_a_winning_edge_and_prefers_validation():
    # The search apps.compress and apps.quickstart run (keras_fip.core.tuning).
    assert common.learning_rate_grid(["1e-2", "1e-3"], "grid") == [1e-3, 1e-2]
    assert tuning.best_value({1e-3: 0.5, 3e-3: None, 1e-2: float("nan")}) == 1e-3
    assert tuning.best_value({1e-3: 0.9, 3e-3: 0.9}) == 1e-3  # Ties: smaller.
    bounds = {"low": common.MIN_TUNED_LEARNING_RATE, "high": common.MAX_TUNED_LEARNING_RATE}
    assert tuning.extend_grid({1e-3: 0.9}, **bounds) == []  # One rate: no tuning.
    assert tuning.extend_grid({1e-3: 0.8, 3e-3: 0.9}, **bounds) == [0.009]
    assert tuning.extend_grid({1e-3: 0.9, 3e-3: 0.8}, **bounds) == [0.000333]
    assert tuning.extend_grid({1e-3: 0.9, 1e-2: 0.9}, **bounds) == []  # Not alone.
    assert tuning.extend_grid({0.03: 0.8, 0.09: 0.9}, **bounds) == []  # 0.27 > 0.1.
    calls = []

    def score(rate):
        calls.append(rate)
        return -abs(np.log(rate / 0.027))  # Best at 0.027, beyond the grid's top.

    rate, scores = tuning.grid_search(score, [1e-3, 3e-3], **bounds)
    assert rate == 0.027
    assert calls == [1e-3, 3e-3, 9e-3, 0.027, 0.081] == list(scores)
    assert tuning.grid_search(score, [1e-3], **bounds) == (1e-3, {})  # Not searched.
    assert len(calls) == 5

    x, y = np.arange(300.0)[:, None], np.repeat(np.arange(3), 100)
    (x_fit, y_fit), (x_val, y_val) = common.validation_split(x, y, 0.1, seed=0)
    assert np.bincount(y_val).tolist() == [10, 10, 10]  # Stratified.
    assert sorted(np.concatenate([x_fit, x_val])[:, 0].tolist()) == x[:, 0].tolist()
    (_, _), (x_again, _) = common.validation_split(x, y, 0.1, seed=0)
    np.testing.assert_array_equal(x_val, x_again)  # Seeded.
    with pytest.raises(ValueError, match="fraction"):
        common.validation_split(x, y, 1.0, seed=0)


def test_compress_app_rejects_workers_with_a_strategy(tmp_path):
    with flagsaver.flagsaver(workers=2, strategy="mirrored", output_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="workers"):
            compress.main([])


def test_compress_app_refuses_single_device_methods_under_a_strategy(tmp_path):
    with flagsaver.flagsaver(
        workers=1, strategy="multi_worker", methods=["fip", "tfmot"], output_dir=str(tmp_path)
    ):
        with pytest.raises(ValueError, match=r"cannot run \['tfmot'\]"):
            compress.main([])
    assert not os.listdir(tmp_path)  # Refused before any work.


@pytest.mark.large
def test_lenet_reproduction_meets_the_paper_targets(tmp_path):
    """Fig. 3B: LeNet-300-100 on MNIST, 3 seeds, 20 epochs for every method (~10 min)."""
    output_dir = str(tmp_path / "lenet")
    with flagsaver.flagsaver(
        model="lenet_300_100",
        dataset="mnist",
        sparsities=["95", "99.1", "99.4"],
        methods=["fip", "gradual"],
        seeds=["0", "1", "2"],
        workers=2,
        output_dir=output_dir,
    ):
        compress.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    assert results["fip/99.1/test/accuracy"] >= 0.968
    assert results["fip/99.4/test/accuracy"] >= 0.960
    assert results["fip/95/margin_over_gradual"] >= 0.0
    assert results["fip/99.1/margin_over_gradual"] >= 0.005
    assert results["fip/99.4/margin_over_gradual"] >= 0.005
