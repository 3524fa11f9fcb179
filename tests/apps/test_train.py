import json
import os

import keras
import numpy as np
import pytest
from absl.testing import flagsaver

from apps import train
from keras_fip import data
from tests.apps.conftest import scalar_tags


def test_train_app_writes_model_config_and_results(tmp_path):
    output_dir = str(tmp_path / "run")
    with flagsaver.flagsaver(
        model="mlp",
        dataset="digits",
        epochs=3,
        batch_size=64,
        learning_rate=1e-2,
        output_dir=output_dir,
        cache_dir=str(tmp_path / "cache"),
    ):
        train.main([])
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model"] == "mlp" and config["epochs"] == 3
    assert results["test/accuracy"] > 0.8  # 3 epochs on digits with lr 1e-2
    model = keras.saving.load_model(os.path.join(output_dir, "model.keras"))
    x, y = data.load("digits", "test")
    accuracy = np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)
    assert accuracy == results["test/accuracy"]
    tags = scalar_tags(os.path.join(output_dir, "logs"))
    assert tags["train/mlp/test/accuracy"] == {3: pytest.approx(results["test/accuracy"])}
    assert 3 in tags["train/mlp/train/loss"]


def test_train_app_reuses_the_cache(tmp_path):
    settings = dict(
        model="mlp", dataset="digits", epochs=1, batch_size=64, cache_dir=str(tmp_path / "cache")
    )
    with flagsaver.flagsaver(output_dir=str(tmp_path / "a"), **settings):
        train.main([])
    with flagsaver.flagsaver(output_dir=str(tmp_path / "b"), **settings):
        train.main([])
    results = [json.load(open(tmp_path / d / "results.json")) for d in ("a", "b")]
    assert results[0] == results[1]  # the second run read the cached network
    cached = os.listdir(tmp_path / "cache" / "base_networks")
    assert len(cached) == 1
