"""The standard continual-learning metrics, as Avalanche and Mammoth define them.

R[i, j] is the accuracy on task j (its test set) after learning task i, for a stream of T
tasks learned in order 0..T-1. From the last row:

- ACC = (1/T) Σ_j R[T-1, j] (Avalanche's stream accuracy after the last experience,
  Mammoth's mean accuracy);
- BWT = (1/(T-1)) Σ_{j<T-1} (R[T-1, j] − R[j, j]) (Lopez-Paz & Ranzato, GEM; Mammoth's
  `backward_transfer`): negative when learning later tasks hurt earlier ones;
- forgetting = (1/(T-1)) Σ_{j<T-1} max_{j≤l≤T-1} (R[l, j] − R[T-1, j]) (Chaudhry et al.
  2018; Mammoth's `forgetting`; Avalanche's `StreamForgetting` uses R[j, j] in place of
  the maximum, which is −BWT per task).

Accuracies are fractions in [0, 1] (Mammoth reports percentages). Two evaluations:
`"class_incremental"` takes the argmax over all outputs of the model (the task identity is
unknown at test time); `"task_incremental"` takes it over the task's own outputs only
(`task_outputs`), as multi-head evaluation does.
"""

import numpy as np

MODES = ("class_incremental", "task_incremental")


def _logits(model, x, batch_size=1000):
    import keras

    from keras_fip.core import data_adapter

    return np.concatenate(
        [
            keras.ops.convert_to_numpy(
                model(data_adapter.take(x, slice(i, i + batch_size)), training=False)
            )
            for i in range(0, data_adapter.num_examples(x), batch_size)
        ]
    )


def task_accuracy(model, x, y, mode="class_incremental", outputs=None, batch_size=1000):
    """The accuracy of a model on one task, in class- or task-incremental evaluation.

    Args:
        model: A `keras.Model` returning logits (or any callable of a batch).
        x: The task's inputs (a dict or list of arrays for a model with several).
        y: Labels, in the model's output indices.
        mode: `"class_incremental"` (argmax over all outputs) or `"task_incremental"`
            (argmax over `outputs`). Defaults to `"class_incremental"`.
        outputs: The task's output indices (required for `"task_incremental"`). Defaults
            to `None`.
        batch_size: Examples per forward pass. Defaults to `1000`.

    Returns:
        A float in [0, 1].

    Examples:

        >>> import keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
        >>> 0.0 <= task_accuracy(model, np.zeros((3, 2)), np.array([0, 1, 2])) <= 1.0
        True
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {list(MODES)}. Received: mode={mode!r}")
    y = np.asarray(y).astype("int64")
    from keras_fip.core import data_adapter

    logits = _logits(model, data_adapter.float32_inputs(x), batch_size)
    if mode == "task_incremental":
        if outputs is None:
            raise ValueError(
                "`mode='task_incremental'` needs the task's output indices. Received: outputs=None"
            )
        outputs = np.asarray(outputs, "int64")
        if not np.all(np.isin(y, outputs)):
            raise ValueError(
                "Task-incremental labels must be among the task's `outputs`. Received: "
                f"labels {np.unique(y)[:10].tolist()}, outputs {outputs[:10].tolist()}"
            )
        predictions = outputs[np.argmax(logits[:, outputs], axis=-1)]
    else:
        predictions = np.argmax(logits, axis=-1)
    return float(np.mean(predictions == y))


def accuracy_matrix(models, tasks, mode="class_incremental", task_outputs=None, batch_size=1000):
    """The accuracy matrix R: R[i, j] = accuracy on task j after learning task i.

    Args:
        models: The models after each task, in order (T of them).
        tasks: The T tasks' test data, `(x, y)` with labels in output indices.
        mode: `"class_incremental"` or `"task_incremental"`. Defaults to
            `"class_incremental"`.
        task_outputs: For `"task_incremental"`, each task's output indices. Defaults to
            `None`.
        batch_size: Examples per forward pass. Defaults to `1000`.

    Returns:
        A `(T, T)` float array. Entries for tasks whose outputs a model does not have yet
        (a grown head) are evaluated on the outputs it has (they are never used by
        ACC/BWT/forgetting, which read the diagonal and the last row).
    """
    if len(models) != len(tasks):
        raise ValueError(
            "`models` and `tasks` must have one entry per task. Received: "
            f"{len(models)} models and {len(tasks)} tasks"
        )
    if mode == "task_incremental" and (task_outputs is None or len(task_outputs) != len(tasks)):
        raise ValueError(
            "`mode='task_incremental'` needs `task_outputs`, one list of output indices "
            f"per task. Received: task_outputs={task_outputs!r}"
        )
    matrix = np.full((len(models), len(tasks)), np.nan)
    for i, model in enumerate(models):
        num_outputs = int(model.output_shape[-1])
        for j, (x, y) in enumerate(tasks):
            outputs = None if task_outputs is None else np.asarray(task_outputs[j])
            if outputs is not None and outputs.max() >= num_outputs:
                continue  # The model has not got this task's outputs yet.
            if mode == "class_incremental" and np.max(y) >= num_outputs:
                continue
            matrix[i, j] = task_accuracy(model, x, y, mode, outputs, batch_size)
    return matrix


def _check_matrix(matrix):
    matrix = np.asarray(matrix, "float64")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(
            f"`matrix` must be a square (T, T) accuracy matrix. Received: shape {matrix.shape}"
        )
    return matrix


def average_accuracy(matrix, after=None):
    """ACC: the mean accuracy over the tasks seen, after task `after` (default: the last).

    Args:
        matrix: The accuracy matrix R.
        after: The task index i after which to average R[i, 0..i]. Defaults to `None`
            (T − 1).

    Returns:
        A float.

    Examples:

        >>> average_accuracy([[0.9, 0.0], [0.8, 0.7]])
        0.75
    """
    matrix = _check_matrix(matrix)
    after = matrix.shape[0] - 1 if after is None else int(after)
    return float(np.mean(matrix[after, : after + 1]))


def backward_transfer(matrix):
    """BWT = mean over j < T−1 of R[T−1, j] − R[j, j] (0 for a single task).

    Examples:

        >>> round(backward_transfer([[0.9, 0.0], [0.8, 0.7]]), 6)
        -0.1
    """
    matrix = _check_matrix(matrix)
    tasks = matrix.shape[0]
    if tasks == 1:
        return 0.0
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(tasks - 1)]))


def forgetting(matrix):
    """Forgetting = mean over j < T−1 of max_{j≤l≤T−1} R[l, j] − R[T−1, j] (≥ 0).

    Mammoth's `forgetting` (the best accuracy a task ever had, from when it was learned,
    minus its final one); 0 for a single task.

    Examples:

        >>> round(forgetting([[0.9, 0.0, 0.0], [0.95, 0.8, 0.0], [0.5, 0.6, 0.9]]), 6)
        0.325
    """
    matrix = _check_matrix(matrix)
    tasks = matrix.shape[0]
    if tasks == 1:
        return 0.0
    return float(np.mean([np.max(matrix[j:, j]) - matrix[-1, j] for j in range(tasks - 1)]))


def summarize(matrix):
    """ACC, BWT, forgetting and the final per-task accuracies of an accuracy matrix.

    Returns:
        A dict with `acc`, `bwt`, `forgetting` and `task_{j}/accuracy` (the last row).
    """
    matrix = _check_matrix(matrix)
    summary = {
        "acc": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
    }
    for j, value in enumerate(matrix[-1]):
        summary[f"task_{j}/accuracy"] = float(value)
    return summary
