import numpy as np
import pytest

from keras_fip import data


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_split_mnist_style_five_tasks_of_two_classes(digits):
    x, y = digits
    tasks = data.split_by_classes(x, y, num_tasks=5)
    assert [t["classes"] for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sum(len(t["y"]) for t in tasks) == len(y)
    for t in tasks:
        assert set(np.unique(t["y"])) == {0, 1}
        assert len(t["x"]) == len(t["y"])


def test_split_without_relabel_keeps_original_ids(digits):
    x, y = digits
    tasks = data.split_by_classes(x, y, classes_per_task=5, relabel=False)
    assert len(tasks) == 2
    assert set(np.unique(tasks[1]["y"])) == {5, 6, 7, 8, 9}


def test_split_cifar100_style_twenty_tasks_of_five():
    y = np.repeat(np.arange(100), 3)
    x = np.arange(300, dtype=np.float32)[:, None]
    tasks = data.split_by_classes(x, y, num_tasks=20)
    assert len(tasks) == 20 and tasks[-1]["classes"] == [95, 96, 97, 98, 99]
    np.testing.assert_array_equal(tasks[3]["x"][:, 0], np.arange(45, 60))


def test_split_rejects_uneven_tasks(digits):
    x, y = digits
    with pytest.raises(ValueError, match="num_tasks=3"):
        data.split_by_classes(x, y, num_tasks=3)
    with pytest.raises(ValueError, match="`num_tasks` or `classes_per_task`"):
        data.split_by_classes(x, y)


def test_permuted_tasks_apply_one_fixed_permutation(digits):
    x, y = digits
    tasks = data.permuted_tasks(x, y, num_tasks=3, seed=1)
    np.testing.assert_array_equal(tasks[0]["x"], x)
    flat = x.reshape(len(x), -1)
    for t in tasks[1:]:
        assert t["x"].shape == x.shape
        np.testing.assert_array_equal(t["x"].reshape(len(x), -1), flat[:, t["permutation"]])
        assert not np.array_equal(t["permutation"], np.arange(flat.shape[1]))
    assert not np.array_equal(tasks[1]["permutation"], tasks[2]["permutation"])


def test_memory_sample_is_class_balanced_and_reproducible(digits):
    x, y = digits
    x_memory, y_memory = data.memory_sample(x, y, size=105, seed=3)
    counts = np.bincount(y_memory)
    assert counts.sum() == 105 and counts.max() - counts.min() == 1
    again, _ = data.memory_sample(x, y, size=105, seed=3)
    np.testing.assert_array_equal(x_memory, again)
    # Every memory example is a real example with its own label.
    index = {row.tobytes(): label for row, label in zip(x.reshape(len(x), -1), y)}
    assert all(index[r.tobytes()] == label for r, label in zip(x_memory.reshape(105, -1), y_memory))


def test_memory_sample_rejects_bad_size(digits):
    x, y = digits
    with pytest.raises(ValueError, match="size=0"):
        data.memory_sample(x, y, size=0)
