import keras
import numpy as np
import pytest

from keras_fip import metrics

R = np.array([[0.9, 0.1, 0.0], [0.95, 0.8, 0.0], [0.5, 0.6, 0.9]])


def test_acc_bwt_and_forgetting_follow_their_definitions():
    assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert metrics.average_accuracy(R, after=1) == pytest.approx((0.95 + 0.8) / 2)
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    # Mammoth: best accuracy since learned (0.95 for task 0) minus final.
    assert metrics.forgetting(R) == pytest.approx(((0.95 - 0.5) + (0.8 - 0.6)) / 2)
    summary = metrics.summarize(R)
    assert summary["task_2/accuracy"] == 0.9
    assert metrics.backward_transfer([[0.7]]) == 0.0 == metrics.forgetting([[0.7]])


def test_forgetting_is_never_negative_and_bwt_is_positive_for_improvement():
    improving = np.array([[0.5, 0.0], [0.7, 0.9]])
    assert metrics.forgetting(improving) == 0.0
    assert metrics.backward_transfer(improving) == pytest.approx(0.2)


def test_matrix_checks():
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy(np.zeros((2, 3)))


def _fixed_model():
    # Logits = x @ W, 4 outputs: task 0 owns outputs {0, 1}, task 1 owns {2, 3}.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, use_bias=False)])
    model.layers[0].kernel.assign(np.eye(4, dtype="float32"))
    return model


def test_class_and_task_incremental_evaluation_differ_as_defined():
    model = _fixed_model()
    # Each example: the true class has the highest logit within its task, but a logit of
    # the other task is higher still.
    x = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.5]], "float32")
    y = np.array([0, 1])
    assert metrics.task_accuracy(model, x, y) == 0.5
    assert metrics.task_accuracy(model, x, y, mode="task_incremental", outputs=[0, 1]) == 1.0
    with pytest.raises(ValueError, match="outputs"):
        metrics.task_accuracy(model, x, y, mode="task_incremental")
    with pytest.raises(ValueError, match="among"):
        metrics.task_accuracy(model, x, y + 2, mode="task_incremental", outputs=[0, 1])


def test_accuracy_matrix_skips_outputs_a_model_does_not_have():
    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=False)])
    small.layers[0].kernel.assign(np.eye(4, 2, dtype="float32"))
    large = _fixed_model()
    x0 = np.array([[1.0, 0.0, 0.0, 0.0]], "float32")
    x1 = np.array([[0.0, 0.0, 0.0, 1.0]], "float32")
    tasks = [(x0, np.array([0])), (x1, np.array([3]))]
    matrix = metrics.accuracy_matrix([small, large], tasks)
    assert matrix[0, 0] == 1.0 and np.isnan(matrix[0, 1])
    np.testing.assert_array_equal(matrix[1], [1.0, 1.0])
    task = metrics.accuracy_matrix(
        [small, large], tasks, mode="task_incremental", task_outputs=[[0, 1], [2, 3]]
    )
    np.testing.assert_array_equal(task[1], [1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per task"):
        metrics.accuracy_matrix([small], tasks)
