r"""Flags and helpers shared by the keras_fip apps: one strategy flag, chief-only outputs,
TensorBoard.

absl flags live in one process-wide registry, so flags that several apps take are defined
here, once; each app sets its own defaults with `flags.FLAGS.set_default` where they differ.

Every app starts with `run = common.start("<app>", unsupported={...})`: it resolves
`--strategy`/`--tpu` once per process (`keras_fip.distribute.get_strategy`), refuses, before
any work, the app's parts that cannot run under a distributed strategy (naming them), and
gives the app where to write: `run.output_dir` is `--output_dir` (default `runs/<app>`) on
the chief and a private temporary directory on the other workers of a multi-worker job
(removed by `run.close()`), so only the chief writes results, plots and logs. The app then
runs its operations and baselines in `with run.scope():`, passes `log_dir=run.log_dir(name)`
to the operations it runs (their walks write every step's scalars: distance moved,
anchor-output change, secondary loss, ...) and writes its own measurements with
`run.scalars(values, step)`; all of it lands under `<output_dir>/logs` (`runs/<app>/logs`):

    tensorboard --logdir runs

On several hosts, run the same app command on every host with its own `TF_CONFIG` and the
same `--seed` (see `keras_fip.distribute`); on one machine
`python -m keras_fip.distribute --workers=2 -- python -m apps.compress
--strategy=multi_worker --workers=1 --methods=fip`.
"""

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from apps import provenance as provenance_lib
from keras_fip import distribute
from keras_fip import models
from keras_fip.models import training

# Model and data
flags.DEFINE_string("model", "lenet_300_100", "Zoo model name (keras_fip.models.BUILDERS).")
flags.DEFINE_string("dataset", "mnist", "Dataset name (keras_fip.data.load).")
flags.DEFINE_string("data_dir", None, "Directory with the official dataset files.")

# Training
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Examples per step.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Initial learning rate.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)

# Experiments (sweeps over methods and seeds)
flags.DEFINE_list(
    "methods", None, "Methods to run (each app lists its own; default: all of that app's methods)."
)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each trains its own base network.")
flags.DEFINE_integer("base_epochs", 10, "Epochs of the base network.", lower_bound=1)
flags.DEFINE_enum(
    "fip_step_rule",
    "penalty",
    ["penalty", "normalized", "metric"],
    "Step rule of the app's FIP walk (penalty: Adam on D + L; normalized: that "
    "gradient at length ε; metric: CG on (g + δI)θ = −β∇L).",
)

# Runtime
flags.DEFINE_string(
    "output_dir", None, "Where config.json, results.json and plots go (default: runs/<app name>)."
)
flags.DEFINE_string(
    "cache_dir", None, "Base-network cache (default: env KERAS_FIP_CACHE or ~/.cache/keras_fip)."
)
flags.DEFINE_enum(
    "strategy",
    "default",
    list(distribute.STRATEGIES),
    "tf.distribute strategy: `mirrored` uses every local GPU (or every logical "
    "CPU), `tpu` the TPU at `--tpu`, `multi_worker` the cluster in TF_CONFIG "
    "(every worker runs the same command with the same `--seed`; only the "
    "chief writes outputs).",
)
flags.DEFINE_string(
    "tpu",
    None,
    "TPU address for `--strategy=tpu` (`grpc://...`, a TPU "
    "name or `local`; default: let the resolver find it).",
)
flags.DEFINE_bool(
    "resume",
    False,
    "Continue a killed run: FIP walks resume from their "
    "last checkpoint in `<output_dir>/checkpoints/` and end at the weights of an "
    "uninterrupted run (apps.compress also keeps the jobs already recorded). "
    "Without it the checkpoints of an earlier run are discarded.",
)
flags.DEFINE_integer(
    "checkpoint_every",
    100,
    "Steps between the checkpoints of a FIP walk "
    "(its path's recorded points): at most this many steps are walked again "
    "after a kill.",
    lower_bound=1,
)
flags.DEFINE_bool(
    "tensorboard", True, "Write TensorBoard scalars under `<output_dir>/logs` (chief only)."
)

FLAGS = flags.FLAGS

_STRATEGIES = {}


def get_strategy(name, tpu=None):
    """The `tf.distribute.Strategy` named by `--strategy`, created once per process.

    `keras_fip.distribute.get_strategy` resolves it; the same `(name, tpu)` returns the same
    strategy afterwards (several `MirroredStrategy` objects in one process collide on
    collective keys, and a multi-worker strategy may be created only once).

    Args:
        name: `"default"`, `"mirrored"`, `"multi_worker"` or `"tpu"`.
        tpu: The TPU address (`--tpu`), or `None`. Defaults to `None`.

    Returns:
        A `tf.distribute.Strategy`.
    """
    if name == "default":
        return distribute.get_strategy(name, tpu=tpu)
    if (name, tpu) not in _STRATEGIES:
        _STRATEGIES[name, tpu] = distribute.get_strategy(name, tpu=tpu)
    return _STRATEGIES[name, tpu]


class Run:
    """What an app needs to run under `--strategy`: the scope, where to write, TensorBoard.

    Made by `start`. On the chief (or alone) `output_dir` is `--output_dir` (default
    `runs/<app>`); on the other workers of a multi-worker job it is a private temporary
    directory, removed by `close`, so that only the chief writes results, plots and logs
    while every worker runs the same code. `log_dir(name)` is where an operation's walk
    writes its TensorBoard scalars (`None` off the chief or with `--notensorboard`);
    `scalars` writes the app's own measurements to `<output_dir>/logs/<app>`.

    Args:
        app_name: The app's name (`runs/<app_name>`).
        strategy: The `tf.distribute.Strategy`.
        output_dir: The shared output directory (the chief's).
        tensorboard: Whether to write TensorBoard logs. Defaults to `True`.

    Example:

    >>> import tempfile
    >>> run = Run("demo", tf.distribute.get_strategy(), tempfile.mkdtemp())
    >>> with run.scope():
    ...     run.scalars({"test/accuracy": 0.9}, step=1)
    >>> run.close()
    """

    def __init__(self, app_name, strategy, output_dir, tensorboard=True):
        self.app_name = app_name
        self.strategy = strategy
        self.is_chief = distribute.is_chief(strategy)
        self.shared_output_dir = output_dir
        self._temporary = None
        if self.is_chief:
            self.output_dir = output_dir
        else:
            self._temporary = tempfile.mkdtemp(
                prefix=f"keras_fip_{app_name}_worker{distribute.task_index(strategy)}_"
            )
            self.output_dir = self._temporary
        os.makedirs(self.output_dir, exist_ok=True)
        self.tensorboard = bool(tensorboard) and self.is_chief
        self._writer = None

    @property
    def num_replicas(self):
        return self.strategy.num_replicas_in_sync

    def scope(self):
        """The strategy's scope: build models and run operations and baselines in it."""
        return self.strategy.scope()

    def log_dir(self, name):
        """`<output_dir>/logs/<name>` for an operation's `log_dir` (chief only), or `None`."""
        if not self.tensorboard:
            return None
        return os.path.join(self.output_dir, "logs", name)

    def scalars(self, values, step=0, prefix=None):
        """Writes each finite number in `values` (a flat dict) as a TensorBoard scalar.

        Tags are `<prefix>/<key>` (or `<key>`); values that are not numbers (lists,
        strings, bools) are skipped. A no-op off the chief or with `--notensorboard`.

        Args:
            values: A dict of tag -> number.
            step: The integer step of the points. Defaults to `0`.
            prefix: Tag prefix, or `None`. Defaults to `None`.
        """
        if not self.tensorboard:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.output_dir, "logs", self.app_name)
            )
        with self._writer.as_default():
            for key, value in values.items():
                if isinstance(value, (bool, np.bool_)) or not isinstance(
                    value, (int, float, np.integer, np.floating)
                ):
                    continue
                if not np.isfinite(value):
                    continue
                tag = f"{prefix}/{key}" if prefix else key
                tf.summary.scalar(tag, float(value), step=int(step))
        self._writer.flush()

    def write_json(self, filename, content):
        """Writes `content` as JSON to `output_dir/filename` (the chief's, or private)."""
        return write_json(self.output_dir, filename, content)

    def base_network(self, *args, **kwargs):
        """`keras_fip.models.base_network` in this run's strategy, cached by the chief only.

        Every worker reads the shared cache; on a miss every worker trains (the training
        is collective), and only the chief writes the network to the cache (the others
        keep theirs in a private cache that links the shared one's entries).
        """
        kwargs.setdefault("strategy", self.strategy)
        if self.is_chief or kwargs.get("cache_dir") is False:
            return models.base_network(*args, **kwargs)
        shared = os.path.join(
            kwargs.get("cache_dir") or training.default_cache_dir(), "base_networks"
        )
        private = os.path.join(self._temporary, "cache", "base_networks")
        os.makedirs(private, exist_ok=True)
        if os.path.isdir(shared):
            for entry in os.listdir(shared):
                link = os.path.join(private, entry)
                if not os.path.lexists(link):
                    os.symlink(os.path.join(shared, entry), link)
        kwargs["cache_dir"] = os.path.dirname(private)
        return models.base_network(*args, **kwargs)

    def close(self):
        """Flushes the TensorBoard writer; removes a worker's private directory."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def start(app_name, unsupported=None, resumable=False):
    """Starts an app under `--strategy`: checks it can run there, then returns a `Run`.

    Call it at the top of `main`, before any work: it resolves `--strategy` and `--tpu`
    (once per process), and with any strategy but `default` raises a `ValueError` naming
    every part of the app listed in `unsupported` (methods, baselines, measurements whose
    loops are single-device), so nothing runs half-distributed.

    Args:
        app_name: The app's name (`runs/<app_name>`).
        unsupported: A dict `{part: reason}` of what this invocation would run that cannot
            run under a distributed strategy, or `None`. Defaults to `None`.
        resumable: Whether the app resumes a killed run under `--resume` (its walks take
            `checkpoint_dir(...)`); if not, `--resume` is refused rather than ignored.
            Defaults to `False`.

    Returns:
        A `Run`.

    Example (an app's `main`, after absl parsed the flags):

        run = common.start("repair", unsupported=common.single_device_parts(
            methods, SINGLE_DEVICE))
        base, _ = run.base_network("lenet_300_100", "mnist", seed=FLAGS.seed)
        with run.scope():
            walk = keras_fip.Walk(log_dir=run.log_dir("repair/seed_0"))
            repaired = keras_fip.Repair(x, walk=walk)(base)
        run.scalars({"test/accuracy": accuracy}, step=0, prefix="repair")
        common.write_json(run.output_dir, "results.json", results)
        run.close()
    """
    name = FLAGS.strategy
    if FLAGS.resume and not resumable:
        raise ValueError(
            f"`--resume` is not supported by apps.{app_name} (only apps.compress "
            f"and apps.continual checkpoint their walks): run it again without "
            f"`--resume`. Received: resume=True"
        )
    if FLAGS.tpu is not None and name != "tpu":
        raise ValueError(
            f"`--tpu` is only used with `--strategy=tpu`. Received: "
            f"tpu={FLAGS.tpu!r} with strategy={name!r}"
        )
    if name != "default" and unsupported:
        listed = "; ".join(f"{part} ({reason})" for part, reason in unsupported.items())
        raise ValueError(
            f"`--strategy={name}` cannot run {sorted(unsupported)}: {listed}. Run them with "
            f"`--strategy=default`, or leave them out. Received: strategy={name!r}"
        )
    strategy = get_strategy(name, tpu=FLAGS.tpu)
    return Run(app_name, strategy, output_dir(app_name), tensorboard=FLAGS.tensorboard)


def checkpoint_dir(shared_output_dir, name, resume=False):
    """`<shared_output_dir>/checkpoints/<name>`, a FIP walk's `checkpoint_directory`.

    Every worker gets the chief's directory (`keras_fip.engine.WalkCheckpoint` reads it on
    every worker and writes it on the chief only). Unless `resume`, the chief first removes
    what an earlier run left there, and every worker waits for it (`distribute.barrier`)
    so that none resumes from it.

    Args:
        shared_output_dir: The chief's output directory (`Run.shared_output_dir`).
        name: The walk's name, a relative path.
        resume: Whether to keep an earlier run's checkpoint. Defaults to `False`.

    Returns:
        The directory path.
    """
    directory = os.path.join(shared_output_dir, "checkpoints", name)
    if not resume:
        if distribute.is_chief():
            shutil.rmtree(directory, ignore_errors=True)
        distribute.barrier()
    return directory


def single_device_parts(requested, single_device):
    """The `{part: reason}` of `requested` parts found in `single_device` (for `start`)."""
    return {part: single_device[part] for part in requested if part in single_device}


def output_dir(app_name):
    """The `--output_dir` flag, or `runs/<app_name>` when it is not set."""
    return FLAGS.output_dir or os.path.join("runs", app_name)


def flag_values(names):
    """The current values of the named flags, as a JSON-ready dict."""
    return {name: FLAGS[name].value for name in names}


def write_json(output_dir, filename, content):
    """Writes `content` as indented JSON to `output_dir/filename`; returns the path.

    Beside a `results.json` it writes `provenance.json` (`apps.provenance`): the command, the
    commit, the machine and the date the results come from.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    with open(path, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True, default=float)
    if filename == "results.json":
        with open(os.path.join(output_dir, "provenance.json"), "w") as f:
            json.dump(provenance_lib.provenance(), f, indent=2, sort_keys=True)
    return path


def check_choice(value, name, choices):
    """Returns `value` if it is one of `choices`, else a `ValueError` naming the flag."""
    if value not in choices:
        raise ValueError(f"`--{name}` must be among {list(choices)}. Received: {value!r}")
    return value


def compress_learning_rate(value, name):
    """A `--<name>` flag for Compress's `learning_rate`: `"auto"` or a positive number."""
    if value.strip() == "auto":
        return "auto"
    try:
        rate = float(value)
    except ValueError:
        rate = None
    if rate is None or not np.isfinite(rate) or rate <= 0.0:
        raise ValueError(
            f"`--{name}` must be `auto` or a positive number. Received: {name}={value!r}"
        )
    return rate


def set_seed(seed):
    keras.utils.set_random_seed(seed)


def movement(model, reference, inputs, batch_size=1000):
    """How far `model` is from `reference`: in weights and in outputs on `inputs`.

    Args:
        model: A `keras.Model`.
        reference: The `keras.Model` it started from (same architecture).
        inputs: Inputs on which the outputs are compared.
        batch_size: Examples per forward pass. Defaults to `1000`.

    Returns:
        A dict: `"distance_moved"`, the Euclidean distance ‖w − w₀‖ over every weight, and
        `"output_change"`, the mean over `inputs` of the squared L2 distance between the
        two models' outputs (logits).
    """
    distance = np.sqrt(
        sum(
            float(np.sum((np.asarray(a, "float64") - np.asarray(b, "float64")) ** 2))
            for a, b in zip(model.get_weights(), reference.get_weights())
        )
    )
    change = 0.0
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        difference = keras.ops.convert_to_numpy(
            model(batch, training=False)
        ) - keras.ops.convert_to_numpy(reference(batch, training=False))
        change += float(np.sum(np.asarray(difference, "float64") ** 2))
    return {"distance_moved": float(distance), "output_change": change / max(1, len(inputs))}


# Learning-rate tuning of the baselines (apps.compress, apps.quickstart).

# The grid is extended past its edge (by factors of 3) while an edge rate is the best, but
# never beyond these bounds.
MAX_TUNED_LEARNING_RATE = 0.1
MIN_TUNED_LEARNING_RATE = 1e-5


def learning_rate_grid(values, name):
    """A `--<name>` list of learning rates, checked: positive finite numbers, no repeats.

    One rate means no tuning (it is used as given); two or more are a grid searched on a
    validation split (`keras_fip.core.tuning.grid_search`, within
    `MIN_TUNED_LEARNING_RATE` and `MAX_TUNED_LEARNING_RATE`).

    Args:
        values: The flag's list of strings (or numbers).
        name: The flag's name, for the error message.

    Returns:
        The rates as floats, ascending.

    Example:

    >>> learning_rate_grid(["3e-3", "1e-3"], "prune_learning_rates")
    [0.001, 0.003]
    """
    try:
        rates = [float(v) for v in values]
    except (TypeError, ValueError):
        rates = None
    if (
        not rates
        or any(not np.isfinite(r) or r <= 0.0 for r in rates)
        or len(set(rates)) != len(rates)
    ):
        raise ValueError(
            f"`--{name}` must be one or more distinct positive learning rates. "
            f"Received: {name}={list(values) if values else values!r}"
        )
    return sorted(rates)


def validation_split(x, y, fraction, seed):
    """Holds out a stratified, seeded `fraction` of `(x, y)` as a validation split.

    Every class keeps `round(fraction × its count)` examples (at least one) for validation;
    the rest, in its original order, is for training.

    Args:
        x: Inputs (an array).
        y: Integer labels, one per input.
        fraction: The validation share, in (0, 1).
        seed: Seed of the choice.

    Returns:
        A tuple `((x_fit, y_fit), (x_validation, y_validation))`.

    Example:

    >>> x, y = np.arange(20.0).reshape(10, 2), np.array([0, 1] * 5)
    >>> (x_fit, y_fit), (x_val, y_val) = validation_split(x, y, 0.2, seed=0)
    >>> len(x_fit), sorted(y_val.tolist())
    (8, [0, 1])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1). Received: fraction={fraction}")
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(
            f"`x` and `y` must have the same length. Received: len(x)={len(x)}, len(y)={len(y)}"
        )
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        held.append(rng.permutation(rows)[: max(1, int(round(fraction * len(rows))))])
    validation = np.zeros(len(y), bool)
    validation[np.concatenate(held)] = True
    if validation.all():
        raise ValueError(
            f"`fraction` leaves no training examples. Received: "
            f"fraction={fraction} of {len(y)} examples"
        )
    return (x[~validation], y[~validation]), (x[validation], y[validation])


# Flags of this module every app reads through `start` (outputs, strategy, logs); `run`
# shows them in every app's `--help`.
RUN_FLAGS = ("output_dir", "strategy", "tpu", "tensorboard")
# The flags of training a base network, which most apps read.
TRAINING_FLAGS = (
    "dataset",
    "data_dir",
    "epochs",
    "batch_size",
    "learning_rate",
    "seed",
    "cache_dir",
)


def run(main, shared=(), defaults=None):
    """Runs an app's `main` under absl, with a `--help` a person can read.

    `--help` shows the app's first paragraph, the commands of its `Example:` section and
    its flags: its own and the `shared` ones of this module it reads; `--helpfull` lists
    every flag of the process (absl's and TensorFlow's too). The whole description stays
    the module's docstring (`python -m pydoc apps.<name>`).

    Args:
        main: The app's `main(argv)`.
        shared: Names of this module's flags the app reads besides `RUN_FLAGS`. Defaults
            to `()`.
        defaults: `{flag: value}`: the app's own defaults of shared flags, shown by
            `--help` (the app reads them when the flag is not given). Defaults to `None`.
    """
    import sys

    from absl import app

    module = sys.modules["__main__"]
    doc = (module.__doc__ or "").strip()
    summary = doc.split("\n\n")[0]
    commands, lines = [], doc.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("    python -m") and not lines[index - 1].rstrip().endswith("\\"):
            command = line.strip()
            following = index + 1
            while command.endswith("\\") and following < len(lines):
                command = command[:-1].rstrip() + " " + lines[following].strip()
                following += 1
            commands.append(command)
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    usage = [summary, ""]
    if commands:
        usage += ["Examples:", *(f"  {command}" for command in commands[:4]), ""]
    usage.append(
        f"The full description: python -m pydoc apps.{name}. Every flag of the process: --helpfull."
    )
    module.__doc__ = "\n".join(usage)
    for flag_name in dict.fromkeys((*shared, *RUN_FLAGS)):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag_name])
    for flag_name, value in (defaults or {}).items():
        flags.FLAGS.set_default(flag_name, value)
    app.run(main)
