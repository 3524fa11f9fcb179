"""`Path`: the recorded points of a model's walk through weight space."""

import json
import math
import os

import keras
import numpy as np

from keras_fip.core import masks as masks_lib
from keras_fip.core.copy import copy_model
from keras_fip.core.masks import MaskConstraint

_CONFIG_FILE = "path.json"
_MODEL_FILE = "model.keras"
_LOG_FILE = "points.jsonl"
_POINTS_DIR = "points"
_MASKS_FILE = "masks.npz"


class Path:
    """The recorded points of a model's walk through weight space.

    Point 0 is the starting model (step 0). Each later point holds the trainable weights
    at a training step, the step, the Euclidean distance from the start (computed here)
    and the scalars the trainer measured (for example `"metric_length"`, the path length
    in the metric g so far, `"anchor_distance"`, `"secondary_loss"`, `"accuracy"`).

    Without a `directory`, every recorded point's weights are kept in memory
    (`len(path)` copies of the trainable weights). With a `directory`, only the start and
    the latest point are kept in memory: the architecture is written once
    (`model.keras`, masks included), then each point is streamed to its own
    `points/<index>.npz` file followed by one line of the append-only `points.jsonl` log,
    so a killed run loses at most the interval being recorded. Creating a `Path` on a
    directory that already holds one resumes it: new points continue after its last one.

    Args:
        model: The built `keras.Model` the path starts from. It is copied, not changed.
        record_every: Record the weights every this many steps (see `should_record`).
            Defaults to `1`.
        directory: Optional directory to stream points to (created if needed, resumed if
            it holds a path). Defaults to `None`.

    Examples:

        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> path = Path(model, record_every=1)
        >>> weights = [v.numpy() + 1.0 for v in model.trainable_variables]
        >>> path.append(1, weights, {"secondary_loss": 0.5})
        True
        >>> len(path), round(float(path.metrics["euclidean_distance"][1]), 4)
        (2, 2.8284)
    """

    def __init__(self, model, record_every=1, directory=None):
        if not isinstance(model, keras.Model):
            raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
        if not model.built or not model.trainable_variables:
            raise ValueError(
                "`model` must be built and have trainable variables. "
                f"Received: model={model.name} (built={model.built})"
            )
        if (
            isinstance(record_every, bool)
            or not isinstance(record_every, (int, np.integer))
            or record_every < 1
        ):
            raise ValueError(
                f"`record_every` must be an integer >= 1. Received: record_every={record_every!r}"
            )
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise ValueError(
                f"`directory` must be `None` or a path. Received: directory={directory!r}"
            )
        self.record_every = int(record_every)
        self.directory = None
        self._template = copy_model(model)
        start = [v.numpy() for v in model.trainable_variables]
        self._reset(start)
        self._record(0, start, {})
        if directory is not None:
            directory = os.fspath(directory)
            if os.path.exists(os.path.join(directory, _CONFIG_FILE)):
                self._resume(directory)
            else:
                self.save(directory)

    def _reset(self, start):
        self._start = start
        self._previous = start
        self._steps = []
        self._records = []  # One metrics dict per point.
        self._weights = []  # In-memory weights; unused when streaming.
        self._euclidean_length = 0.0

    # Recording

    def should_record(self, step):
        """Whether `step` is a recording step (`step % record_every == 0`)."""
        return int(step) % self.record_every == 0

    def append(self, step, weights, metrics=None):
        """Adds a point to the path.

        Args:
            step: Integer training step, larger than the last recorded step.
            weights: List of numpy arrays aligned with the model's
                `trainable_variables`, or `None` on steps that aren't recorded (the call
                then records nothing).
            metrics: Dict of scalar metrics measured at this step (for example
                `"metric_length"`, `"anchor_distance"`, `"secondary_loss"`,
                `"accuracy"`). Defaults to `None`.

        Returns:
            `True` if a point was recorded.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"`step` must be an integer. Received: step={step!r}")
        if step <= self._steps[-1]:
            raise ValueError(
                f"`step` must be larger than the last recorded step ({self._steps[-1]}). "
                f"Received: step={step}"
            )
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, dict):
            raise ValueError(f"`metrics` must be a dict of scalars. Received: metrics={metrics!r}")
        clean = {}
        for name, value in metrics.items():
            try:
                clean[str(name)] = float(np.asarray(value))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"`metrics` values must be scalars. Received: metrics[{name!r}]={value!r}"
                ) from error
        if weights is None:
            return False
        weights = self._check_weights(weights)
        self._record(int(step), weights, clean)
        return True

    def _check_weights(self, weights):
        if not isinstance(weights, (list, tuple)) or len(weights) != len(self._start):
            raise ValueError(
                f"`weights` must be a list of {len(self._start)} arrays aligned with "
                f"`model.trainable_variables`. Received: weights={type(weights).__name__}"
                f" of length {len(weights) if hasattr(weights, '__len__') else '?'}"
            )
        checked = []
        for i, (array, reference) in enumerate(zip(weights, self._start)):
            array = np.array(
                array.numpy() if hasattr(array, "numpy") else array,
                dtype=reference.dtype,
            )
            if array.shape != reference.shape:
                raise ValueError(
                    f"`weights[{i}]` must have shape {reference.shape}. "
                    f"Received: weights[{i}] of shape {array.shape}"
                )
            checked.append(array)
        return checked

    def _record(self, step, weights, metrics):
        distance = math.sqrt(
            sum(
                float(np.sum(np.square(w.astype(np.float64) - s.astype(np.float64))))
                for w, s in zip(weights, self._start)
            )
        )
        increment = math.sqrt(
            sum(
                float(np.sum(np.square(w.astype(np.float64) - p.astype(np.float64))))
                for w, p in zip(weights, self._previous)
            )
        )
        self._euclidean_length += increment
        record = dict(metrics)
        record["euclidean_distance"] = distance
        record["euclidean_length"] = self._euclidean_length
        index = len(self._steps)
        if self.directory is not None:
            self._write_point(self.directory, index, step, weights, record)
        else:
            self._weights.append(weights)
        self._steps.append(step)
        self._records.append(record)
        self._previous = weights

    # Disk layout

    @staticmethod
    def _point_file(index):
        return os.path.join(_POINTS_DIR, f"{index:07d}.npz")

    def _write_point(self, directory, index, step, weights, record):
        # Weights first (atomically), then the log line that makes the point count.
        relative = self._point_file(index)
        final = os.path.join(directory, relative)
        temporary = final + ".tmp.npz"
        np.savez(temporary, *weights)
        os.replace(temporary, final)
        line = json.dumps({"index": index, "step": step, "file": relative, **record})
        with open(os.path.join(directory, _LOG_FILE), "a") as log:
            log.write(line + "\n")
            log.flush()
            os.fsync(log.fileno())

    def save(self, directory):
        """Writes the path to `directory` and streams later points there.

        Args:
            directory: Directory to write to; created if needed. It must not already
                hold a different path.

        Returns:
            `None`.
        """
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"`directory` must be a path. Received: directory={directory!r}")
        directory = os.fspath(directory)
        if self.directory is not None and os.path.abspath(directory) == os.path.abspath(
            self.directory
        ):
            return
        if os.path.exists(os.path.join(directory, _CONFIG_FILE)):
            raise ValueError(
                f"`directory` already holds a path; use `Path.load` to read it or choose "
                f"an empty directory. Received: directory={directory!r}"
            )
        os.makedirs(os.path.join(directory, _POINTS_DIR), exist_ok=True)
        open(os.path.join(directory, _LOG_FILE), "w").close()
        self._template.save(os.path.join(directory, _MODEL_FILE))
        # Masks again, by position: subclassed models' `.keras` configs cannot hold them.
        carried = {
            f"mask_{i}": variable.constraint.mask
            for i, variable in enumerate(self._template.trainable_variables)
            if isinstance(variable.constraint, MaskConstraint)
        }
        np.savez(os.path.join(directory, _MASKS_FILE), **carried)
        for index, (step, record) in enumerate(zip(self._steps, self._records)):
            self._write_point(directory, index, step, self.weights(index), record)
        with open(os.path.join(directory, _CONFIG_FILE), "w") as config:
            json.dump(
                {
                    "record_every": self.record_every,
                    "variables": [
                        {"path": v.path, "shape": list(v.shape)}
                        for v in self._template.trainable_variables
                    ],
                },
                config,
            )
        self.directory = directory
        self._weights = []

    @classmethod
    def load(cls, directory):
        """Reads a path written by `save` (or streamed by a run, even a killed one).

        New points appended to the returned path continue in the same directory.

        Args:
            directory: The directory written by `Path.save` or `Path(..., directory=)`.

        Returns:
            A `Path`.
        """
        if not isinstance(directory, (str, os.PathLike)) or not os.path.exists(
            os.path.join(os.fspath(directory), _CONFIG_FILE)
        ):
            raise ValueError(
                "`directory` must hold a path written by `Path.save` (with "
                f"`{_CONFIG_FILE}`). Received: directory={directory!r}"
            )
        directory = os.fspath(directory)
        return cls(_load_template(directory), directory=directory)

    def _resume(self, directory):
        with open(os.path.join(directory, _CONFIG_FILE)) as config_file:
            config = json.load(config_file)
        shapes = [tuple(v["shape"]) for v in config["variables"]]
        if shapes != [w.shape for w in self._start]:
            raise ValueError(
                f"`directory` holds a path of a model with trainable weight shapes "
                f"{shapes[:6]}, which does not match `model` "
                f"({[w.shape for w in self._start][:6]}). Received: "
                f"directory={directory!r}"
            )
        entries = []
        with open(os.path.join(directory, _LOG_FILE)) as log:
            for line in log:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # A line cut short by a killed run: the point is lost.
                if not os.path.exists(os.path.join(directory, entry["file"])):
                    break
                entries.append(entry)
        if not entries:
            raise ValueError(
                f"`directory` holds no recorded point. Received: directory={directory!r}"
            )
        # Rewrite the log without a cut-short tail, so appends stay parseable.
        with open(os.path.join(directory, _LOG_FILE), "w") as log:
            for entry in entries:
                log.write(json.dumps(entry) + "\n")
        self.record_every = int(config["record_every"])
        self.directory = directory
        self._reset(self._read_point(0))
        for entry in entries:
            entry = dict(entry)
            for key in ("index", "file"):
                entry.pop(key)
            self._steps.append(int(entry.pop("step")))
            self._records.append(entry)
        self._euclidean_length = float(self._records[-1]["euclidean_length"])
        self._previous = self._read_point(len(self._steps) - 1)
        self._template = _load_template(directory)

    def _read_point(self, index):
        with np.load(os.path.join(self.directory, self._point_file(index))) as data:
            return [data[f"arr_{i}"] for i in range(len(data.files))]

    # Reading

    def __len__(self):
        return len(self._steps)

    def _index(self, index):
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"`index` must be an integer. Received: index={index!r}")
        if not -len(self) <= index < len(self):
            raise ValueError(
                f"`index` must be in [{-len(self)}, {len(self)}). Received: index={index}"
            )
        return int(index) % len(self)

    def weights(self, index):
        """The trainable weights of point `index`, a list of numpy arrays."""
        index = self._index(index)
        if self.directory is not None:
            return self._read_point(index)
        return [w.copy() for w in self._weights[index]]

    def point(self, index):
        """Point `index` as a new `keras.Model` (masks kept; negative indices allowed)."""
        weights = self.weights(index)
        model = copy_model(self._template)
        for variable, value in zip(model.trainable_variables, weights):
            if isinstance(variable.constraint, MaskConstraint):
                value = value * variable.constraint.mask
            variable.assign(value)
        return model

    @property
    def steps(self):
        """The recorded steps, an int64 numpy array."""
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def metrics(self):
        """Dict of metric name to a float numpy array over points (NaN where missing)."""
        names = sorted({name for record in self._records for name in record})
        return {
            name: np.asarray(
                [record.get(name, np.nan) for record in self._records], dtype=np.float64
            )
            for name in names
        }

    def select(self, metric, mode="min", return_model=False):
        """The point with the smallest (or largest) value of a metric.

        Args:
            metric: Name of a recorded metric (see `metrics`).
            mode: `"min"` or `"max"`. Defaults to `"min"`.
            return_model: Return the point as a `keras.Model` rather than its index.
                Defaults to `False`.

        Returns:
            The index of the point (NaN values are skipped), or its model.
        """
        metrics = self.metrics
        if metric not in metrics:
            raise ValueError(
                f"`metric` must be one of {sorted(metrics)}. Received: metric={metric!r}"
            )
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'. Received: mode={mode!r}")
        values = metrics[metric]
        if np.all(np.isnan(values)):
            raise ValueError(
                f"Metric {metric!r} was never recorded with a value. Received: metric={metric!r}"
            )
        index = int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))
        return self.point(index) if return_model else index

    def length(self, kind="euclidean"):
        """Length of the path so far.

        Args:
            kind: `"euclidean"` (sum of the Euclidean distances between consecutive
                points) or `"metric"` (the last recorded `"metric_length"`, the length
                in the metric g measured by the trainer). Defaults to `"euclidean"`.

        Returns:
            A float.
        """
        if kind == "euclidean":
            return float(self._euclidean_length)
        if kind == "metric":
            values = self.metrics.get("metric_length")
            if values is None or np.all(np.isnan(values)):
                raise ValueError(
                    "This path has no recorded `metric_length`; the trainer records it. "
                    f"Received: kind={kind!r}"
                )
            return float(values[~np.isnan(values)][-1])
        raise ValueError(f"`kind` must be 'euclidean' or 'metric'. Received: kind={kind!r}")

    def get_config(self):
        """The constructor arguments other than the model."""
        return {"record_every": self.record_every, "directory": self.directory}

    def __repr__(self):
        return (
            f"<Path points={len(self)} last_step={self._steps[-1]} "
            f"record_every={self.record_every} directory={self.directory!r}>"
        )


def _load_template(directory):
    """The path's model as saved, with its masks re-attached by position."""
    model = keras.saving.load_model(os.path.join(directory, _MODEL_FILE), compile=False)
    masks_path = os.path.join(directory, _MASKS_FILE)
    if os.path.exists(masks_path):
        variables = model.trainable_variables
        with np.load(masks_path) as saved:
            variable_masks = [
                (variables[int(name.split("_")[1])], saved[name].astype(bool))
                for name in saved.files
            ]
        if variable_masks:
            masks_lib.attach_masks(model, variable_masks, warn=False)
    return model
