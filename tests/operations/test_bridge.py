import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.operations.bridge import Bridge
from keras_fip.operations.bridge import linear_path_accuracy


def _distance(model, target):
    return float(
        np.sqrt(
            sum(
                np.sum((a.numpy() - b.numpy()) ** 2)
                for a, b in zip(model.trainable_variables, target.trainable_variables)
            )
        )
    )


@pytest.fixture(scope="module")
def networks():
    x, y = keras_fip.data.load("digits")
    x_test, y_test = keras_fip.data.load("digits", "test")
    keras.utils.set_random_seed(0)
    a = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
    keras_fip.models.train_classifier(a, x, y, epochs=10, batch_size=32)
    b = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
    keras_fip.models.train_classifier(b, 1.0 - x, y, epochs=10, batch_size=32)
    return a, b, x, [(x_test, y_test), (1.0 - x_test, y_test)]


def test_bridge_moves_towards_the_target_keeping_the_first_task(networks):
    a, b, x, tasks = networks
    op = Bridge(b, data=x, epochs=3, beta=1e-3, eval_tasks=tasks, seed=0, verbose=0)
    walked = op(a)
    assert _distance(walked, b) < 0.95 * _distance(a, b)
    history = op.history
    assert (
        len(history["task_0/accuracy"])
        == len(history["eval_step"])
        == len(history["task_1/accuracy"])
    )
    assert history["task_0/accuracy"][-1] > history["task_0/accuracy"][0] - 0.1
    line = linear_path_accuracy(a, b, tasks, num_points=3)
    assert line["task_0/accuracy"][0] > 0.8 and line["task_1/accuracy"][-1] > 0.8
    assert line["t"] == [0.0, 0.5, 1.0]


def test_bridge_checks_its_target(networks):
    a, _, x, _ = networks
    other = keras_fip.models.mlp(8, input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="architecture"):
        Bridge(other, data=x, epochs=1, verbose=0)(a)
    with pytest.raises(ValueError, match="target"):
        Bridge("model")
    config = Bridge(None, epochs=2).get_config()
    assert Bridge.from_config(config).get_config() == config
