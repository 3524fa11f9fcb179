"""`WalkCheckpoint`: an operation's walks, saved as they go and resumed mid-walk."""

import glob
import json
import math
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_fip.engine.path import Path

_INFO_FILE = "checkpoint.json"
_PATH_DIR = "path"


def _atomic_json(filename, content):
    temporary = filename + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, filename)


def _fingerprint(config):
    """A JSON-stable form of an operation's config (values it cannot encode by repr)."""
    return json.loads(json.dumps(config, sort_keys=True, default=repr))


class WalkCheckpoint:
    """Saves an operation's walks as they go, so that a killed operation resumes mid-walk.

    An operation that walks in phases (`Compress`: pull, then settle) runs each phase
    through `walk(phase, ...)`. At every point the path records (every `record_every`
    steps) and at the end of each phase, the checkpoint writes everything the rest of the
    walk depends on: the model's variables (weights, normalisation statistics, seed
    states), the trainer's start and previous points, the optimizer's variables (its step
    count, hence its learning-rate schedule), the `state_variables` the operation passes
    (e.g. `Compress`'s target masks), the Python state of every callback that has
    `get_walk_state()` / `set_walk_state(state)`, and the walk's history so far. The path
    itself streams to `<directory>/path`.

    Calling the same operation again (same config, same model, same data, same `seed`)
    with the same directory resumes: finished phases are restored without walking, the
    interrupted phase restarts from its last checkpoint with the first steps of its data
    skipped (the pipelines are seeded: `fip_dataset` orders each pass by a stateless
    permutation of `(seed, pass)`), and the walk ends at the weights of an uninterrupted
    run. A finished walk called again returns the same model without walking. At most
    `record_every` steps are redone after a kill. Callbacks without that protocol (user
    callbacks) restart their own state.

    Under a multi-worker strategy every worker reads the chief's directory when it opens
    it (a file system all workers share, as TensorFlow's multi-worker checkpoints assume)
    and only the chief writes there; the others write to a private
    `<directory>.workertemp_<i>`, removed by `close()`.

    Args:
        directory: The checkpoint directory (created, or resumed).
        config: The operation's config (`get_config()` without options that do not change
            the walk); a directory written by another config is refused.
        strategy: The `tf.distribute.Strategy`. Defaults to `None` (the current one).

    Examples:

        >>> import tempfile, numpy as np, keras, keras_fip
        >>> from keras_fip.core.data_adapter import fip_dataset
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.rand(32, 4).astype("float32")
        >>> checkpoint = WalkCheckpoint(tempfile.mkdtemp(), config={"op": "example"})
        >>> path = checkpoint.open_path(model, record_every=2)
        >>> trainer = keras_fip.FIPTrainer(model, rule=keras_fip.rules.Normalized())
        >>> trainer.compile()
        >>> history = checkpoint.walk("walk", trainer, fip_dataset(model, x, seed=0), 4, path,
        ...                           verbose=0)
        >>> checkpoint.close()
        >>> path.steps.tolist(), len(history["step_norm"])
        ([0, 2, 4], 4)
    """

    def __init__(self, directory, config, strategy=None):
        from keras_fip import distribute

        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"`directory` must be a path. Received: directory={directory!r}")
        self.directory = os.fspath(directory)
        self.strategy = strategy or tf.distribute.get_strategy()
        self._config = _fingerprint(config)
        info_file = os.path.join(self.directory, _INFO_FILE)
        if os.path.exists(info_file):
            with open(info_file) as handle:
                saved = json.load(handle)["config"]
            if saved != self._config:
                changed = sorted(
                    key
                    for key in set(saved) | set(self._config)
                    if saved.get(key) != self._config.get(key)
                )
                raise ValueError(
                    "`checkpoint_directory` holds the walk of an operation with another "
                    f"config (differing in {changed}); resume with the same arguments or "
                    f"choose another directory. Received: checkpoint_directory="
                    f"{self.directory!r}"
                )
        # Every worker decides from the chief's directory, before anyone writes to it.
        self._own = distribute.worker_directory(self.directory, self.strategy)
        if self._own != self.directory:
            shutil.rmtree(self._own, ignore_errors=True)
            if os.path.exists(self.directory):
                shutil.copytree(self.directory, self._own)
        distribute.barrier(self.strategy)
        os.makedirs(self._own, exist_ok=True)
        _atomic_json(os.path.join(self._own, _INFO_FILE), {"config": self._config})
        self._states = {}
        for filename in glob.glob(os.path.join(self._own, "phase_*.json")):
            with open(filename) as handle:
                state = json.load(handle)
            self._states[state["phase"]] = state
        self._sequence = max([s["sequence"] for s in self._states.values()], default=0)
        self.path = None

    @property
    def resumed(self):
        """Whether the directory held a checkpoint when it was opened."""
        return bool(self._states)

    def open_path(self, model, record_every):
        """The walk's `Path`, streamed to `<directory>/path`: new, or resumed at the last
        checkpoint (points recorded after it are dropped; they are walked again).

        Args:
            model: The model at the walk's start.
            record_every: Record (and checkpoint) every this many steps.

        Returns:
            A `keras_fip.Path`.
        """
        directory = os.path.join(self._own, _PATH_DIR)
        latest = max(self._states.values(), key=lambda s: s["sequence"], default=None)
        if latest is None:
            shutil.rmtree(directory, ignore_errors=True)  # Killed before a checkpoint.
        else:
            _truncate_points(directory, latest["points"])
        self.path = Path(model, record_every=record_every, directory=directory)
        if latest is not None:
            start = self.path.weights(0)
            current = [v.numpy() for v in model.trainable_variables]
            if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(start, current)):
                raise ValueError(
                    "`checkpoint_directory` holds a walk that started from another model "
                    "(its first point differs from the model's weights). Received: "
                    f"checkpoint_directory={self.directory!r}"
                )
        return self.path

    def walk(
        self, phase, trainer, data, steps, path, callbacks=None, state_variables=(), **walk_kwargs
    ):
        """Runs (or restores, or resumes) one phase: `trainer.walk(data, steps, path)`.

        Args:
            phase: The phase's name (unique within the operation).
            trainer: The compiled `FIPTrainer` of the phase, its model at the phase's
                start.
            data: The phase's seeded pipeline (its first batches are skipped on resume).
            steps: The phase's number of steps.
            path: The `Path` from `open_path`.
            callbacks: Callbacks of the walk; those with `get_walk_state` and
                `set_walk_state` are saved and restored. Defaults to `None`.
            state_variables: Other variables the walk changes (saved and restored).
                Defaults to `()`.
            **walk_kwargs: Other `FIPTrainer.walk` arguments (`verbose`, `log_dir`).

        Returns:
            The phase's history (every step's scalars, as `FIPTrainer.walk` returns).
        """
        callbacks = list(callbacks or [])
        stateful = [
            c for c in callbacks if hasattr(c, "get_walk_state") and hasattr(c, "set_walk_state")
        ]
        state = self._states.get(phase)
        variables = self._variables(trainer, state_variables)
        history = {}
        first = 0
        if state is not None:
            if not trainer.optimizer.built:
                with self.strategy.scope():
                    trainer.optimizer.build(trainer.trainable_variables)
            self._restore(state, variables)
            for callback, saved in zip(stateful, state["callbacks"]):
                callback.set_walk_state(saved)
            history = {key: list(values) for key, values in state["history"].items()}
            if state["done"]:
                return history
            first = state["step"]
            data = data.skip(first)
        saver = _Saver(self, phase, trainer, path, stateful, variables, first, history)
        trainer.walk(data, steps - first, path=path, callbacks=callbacks + [saver], **walk_kwargs)
        saver.save(done=True)
        return saver.history

    def close(self):
        """Removes a non-chief worker's private directory (the chief's stays)."""
        if self._own != self.directory:
            shutil.rmtree(self._own, ignore_errors=True)

    # Saving and restoring.

    @staticmethod
    def _variables(trainer, state_variables):
        # The optimizer's variables are read when saving: the first step builds them.
        return {
            "trainer": (
                list(trainer.network.variables)
                + list(trainer._start_weights)
                + list(trainer._previous_weights)
                + list(trainer._previous_state)
                + [trainer._metric_length]
                + list(state_variables)
            ),
            "trainer_object": trainer,
        }

    def _save(self, phase, step, done, points, history, callbacks, variables):
        optimizer = list(variables["trainer_object"].optimizer.variables)
        # `Variable.numpy()`: `convert_to_numpy(v.value)` fails on a multi-worker
        # strategy's int64 mirrored variables (the optimizer's iteration count).
        values = [np.asarray(v.numpy()) for v in variables["trainer"] + optimizer]
        self._sequence += 1
        arrays = f"phase_{phase}_{self._sequence:07d}.npz"
        temporary = os.path.join(self._own, arrays + ".tmp.npz")
        np.savez(temporary, *values)
        os.replace(temporary, os.path.join(self._own, arrays))
        state = {
            "phase": phase,
            "sequence": self._sequence,
            "step": int(step),
            "done": bool(done),
            "points": int(points),
            "arrays": arrays,
            "history": history,
            "callbacks": [c.get_walk_state() for c in callbacks],
        }
        _atomic_json(os.path.join(self._own, f"phase_{phase}.json"), state)
        for old in glob.glob(os.path.join(self._own, f"phase_{phase}_*.npz")):
            if os.path.basename(old) != arrays:
                os.remove(old)
        self._states[phase] = state

    def _restore(self, state, variables):
        with np.load(os.path.join(self._own, state["arrays"])) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        targets = variables["trainer"] + list(variables["trainer_object"].optimizer.variables)
        if len(values) != len(targets):
            raise ValueError(
                f"The checkpoint of phase {state['phase']!r} holds {len(values)} "
                f"variables; the walk has {len(targets)}. Received: checkpoint_directory="
                f"{self.directory!r}"
            )
        for variable, value in zip(targets, values):
            variable.assign(value)


class _Saver(keras.callbacks.Callback):
    """Checkpoints the phase after each step the path records a point at."""

    def __init__(self, checkpoint, phase, trainer, path, callbacks, variables, first, history):
        super().__init__()
        self._checkpoint = checkpoint
        self._phase = phase
        self._trainer = trainer
        self._path = path
        self._callbacks = callbacks
        self._variables = variables
        self.step = first
        self.history = history
        self._points = len(path)

    def on_train_batch_end(self, batch, logs=None):
        metrics = {name: float(np.asarray(value)) for name, value in (logs or {}).items()}
        if metrics.get("finite", 1.0) < 1.0:
            return  # The walk stops; the last checkpoint stays.
        self.step += 1
        # A scalar measured only every few steps is absent from the other steps' logs:
        # NaN there, as `FIPTrainer.walk`'s own history has it.
        length = max((len(values) for values in self.history.values()), default=0)
        for name, value in metrics.items():
            self.history.setdefault(name, [math.nan] * length).append(value)
        for name, values in self.history.items():
            if name not in metrics:
                values.append(math.nan)
        if len(self._path) > self._points:
            self._points = len(self._path)
            self.save(done=False)

    def save(self, done):
        self._checkpoint._save(
            self._phase,
            self.step,
            done,
            len(self._path),
            self.history,
            self._callbacks,
            self._variables,
        )


def _truncate_points(directory, points):
    """Keeps the first `points` lines of a streamed path's log."""
    log = os.path.join(directory, "points.jsonl")
    if not os.path.exists(log):
        return
    kept = []
    with open(log) as lines:
        for line in lines:
            if len(kept) == points:
                break
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(log, "w") as lines:
        lines.writelines(kept)
