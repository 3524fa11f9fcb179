"""`keras_fip.data.load` and `keras_fip.data.info`: real datasets, offline first."""

import functools

import numpy as np

from keras_fip.data import local_files
from keras_fip.data import registry

_TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}


def _check_name_and_split(name, split):
    if name not in registry.DATASETS and name not in registry.TEXT_DATASETS:
        raise ValueError(
            f"`name` must be one of {sorted(registry.DATASETS) + sorted(registry.TEXT_DATASETS)}"
            f". Received: name={name!r}"
        )
    if name in registry.TEXT_DATASETS:
        return
    if split not in registry.SPLITS:
        raise ValueError(
            f"`split` must be one of {list(registry.SPLITS)}. Received: split={split!r}"
        )


def load(name, split="train", data_dir=None, download=True):
    """Loads a dataset split as numpy arrays, from local files first.

    Lookup order: `data_dir`, the directory in env `KERAS_FIP_DATA`, `../shared/data` beside
    the checkout (each may hold the official files directly or in a folder named after the
    dataset: MNIST/Fashion-MNIST IDX `.gz` files, CIFAR python pickle folders, or the partial
    Fashion-MNIST and CIFAR-10 subset `.npz` files), then tensorflow-datasets (which downloads
    when a network exists and `download=True`). `"digits"` is scikit-learn's bundled copy and
    needs no files; its fixed split holds out a stratified 20% (360 images) as `"test"`.

    The text sets (`"sst5"`, `"sst2"`, `"mr"`, `"cr"`, `"mpqa"`, `"subj"`, `"trec"`) are
    read from their distributed `LABEL sentence` files by `keras_fip.data.text.load_text`:
    `x` is then an array of sentences; sets without an official split hold out a seeded
    10% as `"test"`, and SST-5/SST-2 also have `"validation"`.

    Args:
        name: One of `"digits"`, `"mnist"`, `"fashion_mnist"`, `"cifar10"`, `"cifar100"`,
            or a text set name.
        split: `"train"` or `"test"` (text sets: also `"validation"`). Defaults to
            `"train"`.
        data_dir: A directory holding the official files. Defaults to `None`.
        download: Whether tensorflow-datasets may download when no local copy is found.
            Defaults to `True`.

    Returns:
        A tuple `(x, y)`: `x` float32 scaled to [0, 1], images in NHWC layout (text sets:
        a numpy array of sentences); `y` int32 class indices.

    Examples:

        >>> x, y = keras_fip.data.load("digits", "test")
        >>> x.shape, y.shape
        ((360, 8, 8, 1), (360,))
    """
    _check_name_and_split(name, split)
    if name in registry.TEXT_DATASETS:
        from keras_fip.data import text

        return text.load_text(name, split, data_dir)
    images, labels = _load_uint8(name, split, None if data_dir is None else str(data_dir), download)
    scale = 16.0 if name == "digits" else 255.0
    x = images.astype(np.float32) / scale
    if x.ndim == 3:
        x = x[..., None]
    return x, labels.astype(np.int32)


def info(name, data_dir=None):
    """Describes a dataset and the copy `load` would read.

    Args:
        name: A dataset name accepted by `load`.
        data_dir: As in `load`. Defaults to `None`.

    Returns:
        A dict with `num_classes`, `input_shape`, `description`, `source` (the local path
        `load` reads, `"scikit-learn"`, or `"tensorflow_datasets"` when no local copy exists)
        and `subset` (`True` when the local copy is only part of the official dataset).

    Examples:

        >>> keras_fip.data.info("mnist")["num_classes"]
        10
    """
    _check_name_and_split(name, "train")
    if name in registry.TEXT_DATASETS:
        from keras_fip.data import text

        return text.text_info(name, data_dir)
    details = dict(registry.DATASETS[name])
    if name == "digits":
        details.update(source="scikit-learn", subset=False)
        return details
    found, _ = local_files.find_local(name, "train", data_dir)
    if found is None:
        details.update(source="tensorflow_datasets", subset=False)
    else:
        _, source, is_subset = found
        details.update(source=source, subset=is_subset)
    return details


@functools.lru_cache(maxsize=16)
def _load_uint8(name, split, data_dir, download):
    if name == "digits":
        return _load_digits(split)
    found, searched = local_files.find_local(name, split, data_dir)
    if found is not None:
        reader, _, _ = found
        images, labels = reader()
        return np.asarray(images), np.asarray(labels)
    return _load_tfds(name, split, data_dir, download, searched)


def _load_digits(split):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def _load_tfds(name, split, data_dir, download, searched):
    error = None
    try:
        import tensorflow_datasets as tfds

        images, labels = tfds.as_numpy(
            tfds.load(
                _TFDS_NAMES[name],
                split=split,
                batch_size=-1,
                as_supervised=True,
                data_dir=data_dir,
                download=download,
            )
        )
        return np.asarray(images), np.asarray(labels)
    except Exception as e:  # tfds raises many kinds of errors offline.
        error = e
    places = "\n".join(f"  - {place}" for place in searched)
    raise ValueError(
        f"Could not find the {name!r} {split!r} split. Looked in:\n{places}\n"
        f"  - tensorflow-datasets ({'download allowed' if download else 'download=False'}): "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
        "Supply the official files with `data_dir=...` or env KERAS_FIP_DATA: MNIST and "
        "Fashion-MNIST as the four IDX .gz files (train-images-idx3-ubyte.gz, ...), CIFAR-10 "
        "as the `cifar-10-batches-py` folder, CIFAR-100 as the `cifar-100-python` folder; "
        "or run where tensorflow-datasets can download."
    )
