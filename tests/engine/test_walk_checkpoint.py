import json
import os

import keras
import numpy as np
import pytest

from keras_fip.engine.walk import Walk
from keras_fip.engine.walk_checkpoint import WalkCheckpoint
from keras_fip.operations.base import WalkingOperation
from tests.operations.contract import KillAt


class _Walk(WalkingOperation):
    """A plain penalty walk through `WalkingOperation.fip_walk`, checkpointed."""

    def __init__(self, x, checkpoint_directory=None, callbacks=None):
        super().__init__(
            walk=Walk(
                steps=12,
                batch_size=8,
                record_every=3,
                seed=0,
                checkpoint_directory=checkpoint_directory,
                callbacks=callbacks,
                verbose=0,
            )
        )
        self.x = x

    def call(self, model):
        objective = lambda network, batch: keras.ops.sum(  # noqa: E731
            keras.ops.square(network.trainable_variables[0])
        )
        return self.fip_walk(
            model,
            self.resolved_walk(),
            self.x,
            12,
            optimizer=keras.optimizers.Adam(1e-2),
            secondary_objective=objective,
        )


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


def test_fip_walk_killed_mid_walk_resumes_to_the_same_weights_and_history(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    model = _model()
    reference_op = _Walk(x)
    reference = reference_op(model)
    directory = str(tmp_path / "checkpoint")
    with pytest.raises(KeyboardInterrupt):
        _Walk(x, directory, callbacks=[KillAt(8)])(model)
    with open(os.path.join(directory, "phase_walk.json")) as f:
        saved = json.load(f)
    assert (saved["step"], saved["done"], saved["points"]) == (6, False, 3)
    op = _Walk(x, directory)
    resumed = op(model)
    for expected, actual in zip(reference.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-6)
    assert op.path.steps.tolist() == [0, 3, 6, 9, 12]
    np.testing.assert_allclose(
        op.path.metrics["euclidean_distance"],
        reference_op.path.metrics["euclidean_distance"],
        atol=1e-6,
    )
    for name in ("distance", "step_norm", "distance_from_start"):
        np.testing.assert_allclose(
            op.history[name], reference_op.history[name], rtol=1e-5, atol=1e-7
        )


def test_walk_checkpoint_refuses_another_config(tmp_path):
    directory = str(tmp_path / "checkpoint")
    WalkCheckpoint(directory, {"sparsity": 0.5})
    with pytest.raises(ValueError, match=r"differing in \['sparsity'\]"):
        WalkCheckpoint(directory, {"sparsity": 0.6})
    with pytest.raises(ValueError, match="directory=3"):
        WalkCheckpoint(3, {})
