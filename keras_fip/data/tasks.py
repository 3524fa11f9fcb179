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

    Example:

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

    Example:

    >>> x, y = keras_fip.data.load("digits")
    >>> tasks = keras_fip.data.permuted_tasks(x, y, num_tasks=3)
    >>> len(tasks)
    3
    """
    x, y = _check_pair(x, y)
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(
            f"`num_tasks` must be a positive integer. Received: num_tasks={num_tasks}"
        )
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

    Example:

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
