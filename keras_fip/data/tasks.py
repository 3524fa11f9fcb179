"""Task builders for continual learning: class splits, permuted pixels, memories."""

import numpy as np


def _check_pair(x, y):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            "`x` and `y` must have the same number of examples. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    return x, y


def split_by_classes(x, y, num_tasks=None, classes_per_task=None, relabel=True):
    """Splits a labelled dataset into tasks of disjoint classes.

    Split-MNIST is `split_by_classes(x, y, num_tasks=5)` (classes {0,1}, {2,3}, ...); split
    CIFAR-100 is `split_by_classes(x, y, num_tasks=20)` (5 classes each). Classes are taken
    in increasing order.

    Args:
        x: Inputs, first axis the examples.
        y: Integer class labels.
        num_tasks: How many tasks. Defaults to `None` (derived from `classes_per_task`).
        classes_per_task: How many classes each task holds. Defaults to `None` (derived from
            `num_tasks`). At least one of the two must be given; the classes must divide
            evenly.
        relabel: Whether each task's labels become 0..classes_per_task-1. Defaults to `True`.

    Returns:
        A list of dicts with keys `x`, `y`, `classes` (the original class ids).

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> tasks = keras_fip.data.split_by_classes(x, y, num_tasks=5)
        >>> tasks[1]["classes"]
        [2, 3]
    """
    x, y = _check_pair(x, y)
    classes = sorted(int(c) for c in np.unique(y))
    if num_tasks is None and classes_per_task is None:
        raise ValueError(
            "Pass `num_tasks` or `classes_per_task`. Received: num_tasks=None, "
            "classes_per_task=None"
        )
    if classes_per_task is None:
        if not isinstance(num_tasks, int) or num_tasks < 1 or len(classes) % num_tasks:
            raise ValueError(
                f"`num_tasks` must be a positive integer dividing the {len(classes)} classes. "
                f"Received: num_tasks={num_tasks}"
            )
        classes_per_task = len(classes) // num_tasks
    if num_tasks is None:
        if (
            not isinstance(classes_per_task, int)
            or classes_per_task < 1
            or len(classes) % classes_per_task
        ):
            raise ValueError(
                f"`classes_per_task` must be a positive integer dividing the {len(classes)} "
                f"classes. Received: classes_per_task={classes_per_task}"
            )
        num_tasks = len(classes) // classes_per_task
    if num_tasks * classes_per_task != len(classes):
        raise ValueError(
            f"`num_tasks` * `classes_per_task` must equal the {len(classes)} classes. "
            f"Received: num_tasks={num_tasks}, classes_per_task={classes_per_task}"
        )
    tasks = []
    for t in range(num_tasks):
        task_classes = classes[t * classes_per_task : (t + 1) * classes_per_task]
        selected = np.isin(y, task_classes)
        task_y = y[selected]
        if relabel:
            lookup = {c: i for i, c in enumerate(task_classes)}
            task_y = np.array([lookup[int(c)] for c in task_y], dtype=np.int32)
        tasks.append({"x": x[selected], "y": task_y.astype(np.int32), "classes": task_classes})
    return tasks


def permuted_tasks(x, y, num_tasks, seed=0, include_identity=True):
    """Builds permuted-pixel tasks: each task applies one fixed permutation to all features.

    Args:
        x: Inputs, first axis the examples; the other axes are flattened, permuted and
            reshaped back.
        y: Labels, shared by every task.
        num_tasks: How many tasks (a positive integer).
        seed: Seed of the permutations. Defaults to `0`.
        include_identity: Whether the first task is the unpermuted data. Defaults to `True`.

    Returns:
        A list of dicts with keys `x`, `y`, `permutation`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> tasks = keras_fip.data.permuted_tasks(x, y, num_tasks=3)
        >>> len(tasks)
        3
    """
    x, y = _check_pair(x, y)
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive integer. Received: num_tasks={num_tasks}")
    rng = np.random.default_rng(seed)
    flat = x.reshape(x.shape[0], -1)
    tasks = []
    for t in range(num_tasks):
        if t == 0 and include_identity:
            permutation = np.arange(flat.shape[1])
        else:
            permutation = rng.permutation(flat.shape[1])
        tasks.append(
            {"x": flat[:, permutation].reshape(x.shape), "y": y, "permutation": permutation}
        )
    return tasks


def memory_sample(x, y, size, seed=0):
    """Draws a class-balanced sample: the memory of an old task kept for replay or anchoring.

    Each class gets `size // num_classes` examples, and the remainder goes one each to the
    first classes; a class with too few examples gives all it has.

    Args:
        x: Inputs, first axis the examples.
        y: Integer class labels.
        size: How many examples to keep (a positive integer).
        seed: Seed of the draw. Defaults to `0`.

    Returns:
        A tuple `(x_memory, y_memory)`.

    Examples:

        >>> x, y = keras_fip.data.load("digits")
        >>> x_memory, y_memory = keras_fip.data.memory_sample(x, y, size=100)
        >>> np.bincount(y_memory).tolist()
        [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    """
    x, y = _check_pair(x, y)
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"`size` must be a positive integer. Received: size={size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    base, remainder = divmod(int(size), len(classes))
    chosen = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        count = min(len(members), base + (1 if i < remainder else 0))
        chosen.append(rng.choice(members, size=count, replace=False))
    indices = np.sort(np.concatenate(chosen))
    return x[indices], y[indices]


BENCHMARKS = ("mnist_fmnist", "split_mnist", "permuted_mnist", "split_cifar10", "split_cifar100")


def _subsample(x, y, max_examples, rng):
    if max_examples is None or len(x) <= max_examples:
        return x, y
    rows = np.sort(rng.choice(len(x), max_examples, replace=False))
    return x[rows], y[rows]


def build_benchmark(
    name, data_dir=None, seed=0, max_train_examples=None, max_test_examples=None, arrays=None
):
    """Builds a continual-learning benchmark: its tasks, head layout and test sets.

    - `"mnist_fmnist"`: MNIST then Fashion-MNIST (10 classes each; the FIP paper's 2-task
      run). On machines with only the local Fashion-MNIST subset (8,517 train / 6,978 test
      images), `subset` is `True`.
    - `"split_mnist"`: MNIST in 5 tasks of 2 classes ({0,1}, {2,3}, ...).
    - `"permuted_mnist"`: 10 tasks, MNIST under 10 fixed pixel permutations (the first the
      identity), all on the same 10 outputs (`head="shared"`).
    - `"split_cifar10"`: CIFAR-10 in 5 tasks of 2 classes (the local 4,000/1,000-image
      subset when that is what `keras_fip.data.load` finds).
    - `"split_cifar100"`: CIFAR-100 in 20 tasks of 5 classes (needs the full data:
      tensorflow-datasets or a local copy of the official files).

    Split benchmarks use `head="append"`: each task's labels are its own 0..k-1, and task
    t's outputs are `offsets[t] .. offsets[t] + k - 1` of the grown network; `test` holds
    labels in those output indices (class-incremental evaluation: argmax over every
    output; task-incremental: over `task_outputs[t]`).

    Args:
        name: One of `BENCHMARKS`.
        data_dir: Passed to `keras_fip.data.load`. Defaults to `None`.
        seed: Seed of the permutations and of sub-sampling. Defaults to `0`.
        max_train_examples: Keep at most this many training examples per task (a seeded
            sample), or `None` for all. Defaults to `None`.
        max_test_examples: Likewise for each task's test set. Defaults to `None`.
        arrays: Optional `{"train": (x, y), "test": (x, y)}` (one dataset) or, for
            `"mnist_fmnist"`, `{"train": [(x1, y1), (x2, y2)], "test": [...]}`, used
            instead of loading (tests, custom data). Defaults to `None`.

    Returns:
        A dict with `name`, `train` (list of `(x, y)`, labels the task's own),
        `test` (list of `(x, y)`, labels in output indices), `head`, `offsets`,
        `task_outputs`, `num_outputs` (after every task), `input_shape` and `subset`.

    Examples:

        >>> bench = build_benchmark("split_mnist", arrays={"train": keras_fip.data.load(
        ...     "digits"), "test": keras_fip.data.load("digits", "test")})
        >>> len(bench["train"]), bench["task_outputs"][1]
        (5, [2, 3])
    """
    from keras_fip.data.load import info as load_info
    from keras_fip.data.load import load as load_data

    if name not in BENCHMARKS:
        raise ValueError(f"`name` must be one of {list(BENCHMARKS)}. Received: name={name!r}")
    rng = np.random.default_rng(seed)
    subset = False

    def dataset(dataset_name, split):
        nonlocal subset
        subset = subset or bool(load_info(dataset_name, data_dir)["subset"])
        return load_data(dataset_name, split, data_dir)

    if name == "mnist_fmnist":
        if arrays is not None:
            train, test = list(arrays["train"]), list(arrays["test"])
        else:
            train = [dataset("mnist", "train"), dataset("fashion_mnist", "train")]
            test = [dataset("mnist", "test"), dataset("fashion_mnist", "test")]
        head = "append"
    else:
        source = {
            "split_mnist": "mnist",
            "permuted_mnist": "mnist",
            "split_cifar10": "cifar10",
            "split_cifar100": "cifar100",
        }[name]
        if arrays is not None:
            full_train, full_test = arrays["train"], arrays["test"]
        else:
            full_train, full_test = dataset(source, "train"), dataset(source, "test")
        if name == "permuted_mnist":
            train_tasks = permuted_tasks(*full_train, num_tasks=10, seed=seed)
            permutations = [task["permutation"] for task in train_tasks]
            train = [(task["x"], task["y"]) for task in train_tasks]
            flat = full_test[0].reshape(len(full_test[0]), -1)
            test = [(flat[:, p].reshape(full_test[0].shape), full_test[1]) for p in permutations]
            head = "shared"
        else:
            num_tasks = 20 if name == "split_cifar100" else 5
            train = [(t["x"], t["y"]) for t in split_by_classes(*full_train, num_tasks)]
            test = [(t["x"], t["y"]) for t in split_by_classes(*full_test, num_tasks)]
            head = "append"
    train = [_subsample(np.asarray(x), np.asarray(y), max_train_examples, rng) for x, y in train]
    test = [_subsample(np.asarray(x), np.asarray(y), max_test_examples, rng) for x, y in test]
    sizes = [int(np.max(y)) + 1 for _, y in train]
    if head == "append":
        offsets = [int(sum(sizes[:t])) for t in range(len(sizes))]
        num_outputs = [int(sum(sizes[: t + 1])) for t in range(len(sizes))]
    else:
        offsets = [0] * len(sizes)
        num_outputs = [max(sizes)] * len(sizes)
    test = [(x, (np.asarray(y) + offset).astype(np.int32)) for (x, y), offset in zip(test, offsets)]
    return {
        "name": name,
        "train": [(x.astype(np.float32), y.astype(np.int32)) for x, y in train],
        "test": [(x.astype(np.float32), y) for x, y in test],
        "head": head,
        "offsets": offsets,
        "task_outputs": [list(range(o, o + k)) for o, k in zip(offsets, sizes)],
        "num_outputs": num_outputs,
        "input_shape": tuple(train[0][0].shape[1:]),
        "subset": subset,
    }
