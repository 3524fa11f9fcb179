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
    walk = keras_fip.Walk(epochs=3, beta=1e-3, seed=0, verbose=0)
    op = Bridge(b, data=x, eval_tasks=tasks, walk=walk)
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
        Bridge(other, data=x)(a)
    with pytest.raises(ValueError, match="target"):
        Bridge("model")
    with pytest.raises(ValueError, match="eval_tasks"):
        Bridge(other, eval_tasks=(x, x))
    with pytest.raises(ValueError, match="shape"):
        Bridge(a, data=x[:, :4])(a)
    config = Bridge(None, eval_every=5, walk=keras_fip.Walk(epochs=2, seed=1)).get_config()
    restored = Bridge.from_config(config)
    assert restored.get_config() == config
    assert restored.walk.epochs == 2 and restored.eval_every == 5


def test_bridge_defaults_auto_beta_and_a_constant_auto_rate(networks):
    a, b, x, _ = networks
    op = Bridge(b, data=x, walk=keras_fip.Walk(steps=5, seed=0, verbose=0))
    op(a)
    expected = keras_fip.engine.beta.auto_beta(1e3, a, x, "kl", objective="weights", seed=0)
    assert op.history["beta"] == pytest.approx(expected, rel=1e-6)
    rate = keras_fip.rules.auto_learning_rate(a.trainable_variables)
    assert op.history["learning_rate"] == pytest.approx(rate, rel=1e-6)
    assert op.history["steps"] == 5
    # Stateless: the same operation on the same model gives the same walk.
    first = [v.numpy() for v in op(a).trainable_variables]
    again = [v.numpy() for v in op(a).trainable_variables]
    for left, right in zip(first, again):
        np.testing.assert_allclose(left, right, rtol=0, atol=1e-6)
    assert Bridge.DEFAULT_BUDGET == {"epochs": 10}
