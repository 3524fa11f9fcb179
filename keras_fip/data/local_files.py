"""Readers for the official dataset files, and where to look for them."""

import gzip
import os
import pickle

import numpy as np

from keras_fip.data import registry

ENV_VARIABLE = "KERAS_FIP_DATA"


def shared_data_dir():
    """The `shared/data` folder beside the checkout (`<repo>/../shared/data`)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo_dir = os.path.dirname(package_dir)
    return os.path.join(os.path.dirname(repo_dir), "shared", "data")


def search_roots(data_dir=None):
    """Directories to search, in lookup order, with where each came from."""
    roots = []
    if data_dir is not None:
        roots.append((os.fspath(data_dir), "`data_dir` argument"))
    if os.environ.get(ENV_VARIABLE):
        roots.append((os.environ[ENV_VARIABLE], f"env {ENV_VARIABLE}"))
    roots.append((shared_data_dir(), "../shared/data beside the checkout"))
    return roots


def candidate_dirs(root, name):
    """A root may hold the files directly or in a folder named after the dataset."""
    return [os.path.join(root, name), os.path.join(root, f"{name}_subset"), root]


def read_idx(path):
    """Reads an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        content = f.read()
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise ValueError(f"Not an IDX file: {path}")
    type_code, num_dims = content[2], content[3]
    if type_code != 0x08:
        raise ValueError(
            f"Expected unsigned byte data (type 0x08) in IDX file {path}. "
            f"Received: type code {type_code:#x}."
        )
    shape = np.frombuffer(content, dtype=">u4", count=num_dims, offset=4)
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * num_dims)
    return data.reshape(tuple(int(s) for s in shape))


def _find_idx(directory, split):
    images_name, labels_name = registry.IDX_FILES[split]
    for suffix in ("", ".gz"):
        images = os.path.join(directory, images_name.replace(".gz", suffix))
        labels = os.path.join(directory, labels_name.replace(".gz", suffix))
        if os.path.isfile(images) and os.path.isfile(labels):
            return images, labels
    return None


def _read_cifar_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(flat):
    return np.asarray(flat, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def find_local(name, split, data_dir=None):
    """Finds local files for `name`/`split`.

    Returns:
        A tuple `(reader, source, is_subset)` where `reader()` returns uint8 images and
        integer labels, or `None` when nothing is found. Also returns the list of places
        searched, for the error message.
    """
    searched = []
    for root, origin in search_roots(data_dir):
        for directory in candidate_dirs(root, name):
            found = _find_in_directory(name, split, directory)
            searched.append(f"{directory} ({origin})")
            if found is not None:
                return found, searched
    return None, searched


def _find_in_directory(name, split, directory):
    if not os.path.isdir(directory):
        return None
    if name in ("mnist", "fashion_mnist"):
        paths = _find_idx(directory, split)
        if paths is not None:
            return (lambda: (read_idx(paths[0]), read_idx(paths[1])), paths[0], False)
        if name == "fashion_mnist":
            path = os.path.join(directory, registry.FASHION_PARTIAL_FILE)
            if os.path.isfile(path):
                return (_npz_reader(path, split), path, True)
    if name == "cifar10":
        pickle_dir = os.path.join(directory, registry.CIFAR10_PICKLE_DIR)
        if os.path.isdir(pickle_dir):
            return (_cifar10_pickle_reader(pickle_dir, split), pickle_dir, False)
        path = os.path.join(directory, registry.CIFAR10_SUBSET_FILE)
        if os.path.isfile(path):
            return (_npz_reader(path, split), path, True)
    if name == "cifar100":
        pickle_dir = os.path.join(directory, registry.CIFAR100_PICKLE_DIR)
        if os.path.isdir(pickle_dir):
            return (_cifar100_pickle_reader(pickle_dir, split), pickle_dir, False)
    return None


def _npz_reader(path, split):
    def read():
        with np.load(path) as archive:
            return archive[f"x_{split}"], archive[f"y_{split}"]

    return read


def _cifar10_pickle_reader(pickle_dir, split):
    def read():
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        batches = [_read_cifar_pickle(os.path.join(pickle_dir, n)) for n in names]
        images = np.concatenate([_cifar_images(b[b"data"]) for b in batches])
        labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
        return images, labels

    return read


def _cifar100_pickle_reader(pickle_dir, split):
    def read():
        batch = _read_cifar_pickle(os.path.join(pickle_dir, split))
        return _cifar_images(batch[b"data"]), np.asarray(batch[b"fine_labels"])

    return read
