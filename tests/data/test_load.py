import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest

from keras_fip import data
from keras_fip.data import local_files

# The first place the library looks for the dataset files (env KERAS_FIP_DATA, else
# `../shared/data` beside the checkout).
SHARED = local_files.search_roots()[0][0]
needs_shared = pytest.mark.skipif(
    not os.path.isdir(os.path.join(SHARED, "mnist")), reason="../shared/data not present"
)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@needs_shared
def test_shared_mnist_files_match_their_checksums():
    sums = {}
    with open(os.path.join(SHARED, "SHA256SUMS")) as f:
        for line in f:
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    mnist_files = [name for name in sums if name.startswith("mnist/")]
    assert len(mnist_files) == 4
    for name in mnist_files:
        assert _sha256(os.path.join(SHARED, name)) == sums[name], name


@needs_shared
@pytest.mark.parametrize(
    "split, count, class_counts_head",
    [("train", 60000, [5923, 6742, 5958]), ("test", 10000, [980, 1135, 1032])],
)
def test_mnist_shapes_dtypes_ranges_and_class_counts(split, count, class_counts_head):
    x, y = data.load("mnist", split)
    assert x.shape == (count, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (count,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y).tolist()[:3] == class_counts_head
    assert not data.info("mnist")["subset"]


@needs_shared
def test_partial_fashion_mnist_is_labelled_as_subset():
    x, y = data.load("fashion_mnist", "train")
    assert x.shape == (8517, 28, 28, 1) and y.max() == 9
    details = data.info("fashion_mnist")
    assert details["subset"] is True and details["source"].endswith(".npz")


@needs_shared
def test_cifar10_subset_is_nhwc_and_labelled_as_subset():
    x, y = data.load("cifar10", "test")
    assert x.shape == (1000, 32, 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    assert data.info("cifar10")["subset"] is True


def test_digits_split_is_stratified_and_disjoint():
    x_train, y_train = data.load("digits", "train")
    x_test, y_test = data.load("digits", "test")
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert x_train.max() == 1.0 and x_train.min() == 0.0
    assert np.bincount(y_test).min() >= 35
    train_rows = {row.tobytes() for row in x_train.reshape(len(x_train), -1)}
    overlap = sum(row.tobytes() in train_rows for row in x_test.reshape(len(x_test), -1))
    assert overlap < 5  # the digits set has a few exact duplicate images


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_data_dir_takes_precedence_and_reads_idx_files(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5])
    directory = tmp_path / "fashion_mnist"
    directory.mkdir()
    for _split, (image_name, label_name) in {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }.items():
        _write_idx(str(directory / image_name), images)
        _write_idx(str(directory / label_name), labels)
    x, y = data.load("fashion_mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[..., 0] * 255.0, images, atol=1e-4)
    assert data.info("fashion_mnist", data_dir=tmp_path)["subset"] is False


def test_env_variable_is_searched(tmp_path, monkeypatch):
    if not os.path.isdir(os.path.join(SHARED, "mnist")):
        pytest.skip("../shared/data not present")
    shutil.copytree(os.path.join(SHARED, "mnist"), tmp_path / "mnist")
    monkeypatch.setenv("KERAS_FIP_DATA", str(tmp_path))
    assert data.info("mnist")["source"].startswith(str(tmp_path))


def test_missing_files_give_an_error_listing_every_place(tmp_path):
    with pytest.raises(ValueError) as error:
        data.load("cifar100", "train", data_dir=tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "shared/data" in message
    assert "tensorflow-datasets" in message
    assert "cifar-100-python" in message


def test_cifar_python_pickles_are_read(tmp_path):
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        batch = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"fine_labels": list(range(count)),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f)
    x, y = data.load("cifar100", "test", data_dir=tmp_path)
    assert x.shape == (4, 32, 32, 3)
    assert y.tolist() == [0, 1, 2, 3]
    with open(folder / "test", "rb") as f:
        raw = pickle.load(f)[b"data"]
    # Channel-first rows become NHWC: the first red value is the first byte.
    assert x[0, 0, 0, 0] == pytest.approx(raw[0, 0] / 255.0)
    assert x[0, 0, 0, 1] == pytest.approx(raw[0, 1024] / 255.0)


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"name": "imagenet"}, "`name`"), ({"name": "mnist", "split": "val"}, "`split`")],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        data.load(**kwargs)
