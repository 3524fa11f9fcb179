import numpy as np
import pytest

from keras_fip import data


def _arrays(num_classes, shape=(4, 4, 3), per_class=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class).astype("int32")
    return rng.random((len(y),) + shape, dtype=np.float32), y


def test_split_cifar100_wiring_on_synthetic_arrays():
    bench = data.build_benchmark(
        "split_cifar100", arrays={"train": _arrays(100), "test": _arrays(100, seed=1)}
    )
    assert len(bench["train"]) == 20 and bench["head"] == "append"
    assert bench["task_outputs"][3] == [15, 16, 17, 18, 19]
    assert bench["num_outputs"][-1] == 100
    for t, ((_, y), (_, y_test)) in enumerate(zip(bench["train"], bench["test"])):
        assert sorted(np.unique(y)) == [0, 1, 2, 3, 4]
        assert sorted(np.unique(y_test)) == bench["task_outputs"][t]


def test_permuted_mnist_shares_outputs_and_permutes_train_and_test_alike():
    x, y = _arrays(10, shape=(3, 3, 1))
    bench = data.build_benchmark("permuted_mnist", arrays={"train": (x, y), "test": (x, y)})
    assert len(bench["train"]) == 10 and bench["head"] == "shared"
    assert bench["offsets"] == [0] * 10
    np.testing.assert_array_equal(bench["train"][0][0], x)
    np.testing.assert_array_equal(bench["train"][4][0], bench["test"][4][0])
    assert not np.array_equal(bench["train"][4][0], x)


def test_mnist_fmnist_offsets_the_second_task_and_subsamples():
    first, second = _arrays(10, (2, 2, 1)), _arrays(10, (2, 2, 1), seed=2)
    bench = data.build_benchmark(
        "mnist_fmnist",
        max_train_examples=30,
        arrays={"train": [first, second], "test": [first, second]},
    )
    assert [len(x) for x, _ in bench["train"]] == [30, 30]
    assert bench["offsets"] == [0, 10]
    assert bench["test"][1][1].min() == 10
    with pytest.raises(ValueError, match="name"):
        data.build_benchmark("split_imagenet")
