import json

import numpy as np
import pytest

import keras_fip
from benchmarks import compress_unseen


def test_mnist8_is_mnist_in_the_digits_format():
    (x, y), (x_val, y_val), (x_test, y_test) = compress_unseen._split(
        0, dataset="mnist8", train_size=500
    )
    assert x.shape == (400, 8, 8, 1) and x_val.shape == (100, 8, 8, 1)
    assert x_test.shape == (10000, 8, 8, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Each pixel is the mean of a 3x3 block of the central 24x24 of the MNIST image.
    mnist_test, labels = keras_fip.data.load("mnist", "test")
    np.testing.assert_array_equal(y_test, labels)
    block = mnist_test[0, 2 + 3 * 4 : 2 + 3 * 5, 2 + 3 * 2 : 2 + 3 * 3, 0]
    np.testing.assert_allclose(x_test[0, 4, 2, 0], block.mean(), rtol=1e-6)
    # Stratified: every class in the training images.
    assert set(np.unique(y)) == set(range(10))


def test_mnist8_refuses_folds():
    with pytest.raises(SystemExit):
        compress_unseen.main(["--dataset=mnist8", "--folds=5"])


def test_compress_variants_cross_learning_rates_and_task_weights():
    assert compress_unseen._variants(["auto", 0.01], [0.0, 1.0]) == [
        ("fip", "auto", 0.0),
        ("fip_task1", "auto", 1.0),
        ("fip_lr0.01", 0.01, 0.0),
        ("fip_lr0.01_task1", 0.01, 1.0),
    ]
    assert compress_unseen._parse_learning_rate("auto") == "auto"
    assert compress_unseen._parse_learning_rate("3e-3") == 3e-3
    with pytest.raises(SystemExit):
        compress_unseen.main(["--compress_learning_rates=fast"])
    # The labels' weight: Compress's choice first, given weights beside it.
    assert [name for name, _, _ in compress_unseen._variants(["auto"], ["auto", 0.0])] == [
        "fip",
        "fip_task0",
    ]
    with pytest.raises(SystemExit):
        compress_unseen.main(["--task_weights=heavy"])


def test_compress_options_add_named_runs_with_defaults_elsewhere():
    pull = {"schedule": {"pull_fraction": 0.5}}
    runs = compress_unseen._runs(["auto", 0.01], ["auto"], {"pull0.5": pull})
    assert runs == [
        ("fip", {"labels": "auto"}),
        ("fip_lr0.01", {"labels": "auto", "walk": {"rule": keras_fip.rules.Penalty(0.01)}}),
        ("fip_pull0.5", pull),
    ]
    operation = compress_unseen._compress(0.5, None, 7, 1, runs[1][1])
    assert operation.walk == keras_fip.Walk(
        steps=7, seed=1, verbose=0, rule=keras_fip.rules.Penalty(0.01)
    )
    assert compress_unseen._compress(0.5, None, None, 0, pull).schedule.pull_fraction == 0.5
    assert compress_unseen._parse_options("") == {}
    assert compress_unseen._parse_options('{"a": {"labels": 1}}') == {"a": {"labels": 1}}
    for bad in (
        "[1]",
        '{"a": 1}',
        '{"a": {"schedule": {"pull_fraction": 2}}}',
        '{"a": {"nope": 1}}',
        '{"a": {"walk": {"steps": 0}}}',
        '{"a": {"task_weight": 1}}',
    ):
        with pytest.raises(SystemExit):
            compress_unseen.main([f"--compress_options={bad}"])


def test_finetuned_reference_and_validation_means_are_reported(capsys):
    compress_unseen.main(
        [
            "--nets=plain24",
            "--base_epochs=1",
            "--steps=4",
            "--seeds=0",
            "--learning_rates=1e-3",
            "--sparsities=0.5",
            "--finetuned_reference",
            '--compress_options={"p5": {"schedule": {"pull_fraction": 0.5}}}',
        ]
    )
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    record, summary = lines
    for method in ("fip", "fip_p5", "oneshot", "gradual", "finetuned"):
        assert 0.0 <= record[f"{method}/50/test/accuracy"] <= 1.0
        assert f"{method}/50/validation/accuracy/mean" in summary
    assert record["fip_p5/50/steps"] == 4
