r"""Sparsify a network with keras_fip.Compress and the baselines, side by side (Fig. 3B/C, F/G).

Every method starts from the same trained base network (one per seed, cached) and gets the
same epoch budget on the same training data:

- `fip`: `keras_fip.Compress` (pull along a FIP towards the sparse projection, then settle);
- `gradual`: gradual magnitude pruning with tfmot's PolynomialDecay schedule, native Keras 3,
  one ranking over all layers (global: the stronger baseline at high sparsity);
- `gradual_per_layer`: the same with each layer pruned to the target (tfmot's behaviour);
- `oneshot`: one-shot magnitude pruning, then fine-tuning with the mask fixed;
- `lth`: iterative magnitude pruning with rewinding (lottery ticket), `--lth_rounds` rounds
  sharing the budget;
- `tfmot`: the real tfmot (`prune_low_magnitude`, per layer, the same schedule) in a separate
  tf_keras process, to cross-check `gradual_per_layer` (needs the `baselines` extra; skipped
  with a warning when it is missing).

The budget is `--epochs` (20 unless given) for every method, exactly: the `min_steps` floor
of Compress's schedule (which lengthens short walks on small data) is switched off here so
that no method gets more steps than another; on small data raise `--epochs` for all. Jobs
run in `--workers` processes side by side.

The baselines are tuned as their authors tune them: each one's initial Adam learning rate is
chosen per method and per sparsity from `--prune_learning_rates` (1e-3, 2e-3, 5e-3, 1e-2:
steps of 2-2.5×, since on LeNet-300-100 at 99.1% gradual pruning's validation accuracy moves
by ~0.6 pp between 3e-3 and 5e-3; extended by factors of 3, up to 0.1 or down to 1e-5, while
the largest or the smallest rate is the best) on a validation split:
`--prune_validation_fraction` (10%) of the training data, stratified and seeded, held out.
A tuning base network is trained as the base network is
(same recipe, seed and epochs) without the validation split, each rate prunes it with the
same budget on the rest of the training data, and the best validation accuracy (mean over
the first `--prune_tuning_seeds` seeds: the first one by default; 0: all; ties go to the
smaller rate) chooses the rate; every seed then prunes its base network with all the
training data at that rate, as Compress does. The test split is never read for the
choice. `tfmot` trains at `gradual_per_layer`'s rate when both run (the cross-check
compares one recipe). Compress is not tuned: it is given the model, the training data with
their labels, the budget and the seed, and keeps every other default (the weight of the
labels is chosen on a fifth held out of its data: `fip/<sparsity>/task_weights`, and the
steps that choice takes, beside the budget, `fip/<sparsity>/selection_steps`). One rate
(`--prune_learning_rates=3e-3`) is used as given, without tuning. The tuning runs are jobs
too (`--workers`, `--resume`; recorded in `<output_dir>/jobs/tuning/`, the tuning base
networks in `<output_dir>/tuning/`); the FIP jobs run beside the tuning, and each
baseline's jobs start as soon as its rate is chosen.

Writes `results.json` (per method and sparsity: mean and std of test accuracy over seeds,
measured sparsity of the prunable weights and, `"<method>/<sparsity>/parameter_sparsity"`,
the zero fraction of all parameters; epochs, wall time; keys like
`"fip/99.1/test/accuracy"`; FIP's margin over
`gradual` and the `gradual_per_layer` − `tfmot` gap per sparsity; each baseline's chosen
`"<method>/<sparsity>/learning_rate"` and its grid's mean validation accuracies,
`"<method>/<sparsity>/tuning/validation_accuracy"`; the tuning's seeds, validation fraction
and time, `"tuning/..."`), `config.json`, `accuracy_vs_sparsity.png`, `layer_sparsity.png`,
and the sparsest FIP model as a SavedModel in `serving/`.

Example (LeNet-300-100 on MNIST, the paper's setting):

    python -m apps.compress        # all methods, 90-99.4%, seeds 0,1,2, 20 epochs

ResNet-20 on CIFAR-10 (on machines without the full set this uses the local subset and says
so in `results.json`): `--model=resnet20 --dataset=cifar10`. Compress walks BatchNorm
networks on batch statistics and recalibrates them after; with `--seeds=0 --sparsities=90
--methods=fip,gradual,oneshot --epochs=5` on the 4,000-image subset FIP keeps 50.7% (base
47.3%, one-shot 50.4%, gradual 41.4%). On a GPU/TPU host add
`--workers=1 --strategy=mirrored` (or `--strategy=tpu --tpu=<address>`) and a larger
`--batch_size`; on a many-core CPU host raise `--workers`.

Across processes or hosts, `--strategy=multi_worker --workers=1` runs every job with
`tf.distribute.MultiWorkerMirroredStrategy` (each global batch split across the workers;
`tfmot` is refused: it trains tf_keras in a separate process). Every worker runs the same
command with the same `--seeds`; only the chief writes `--output_dir` (the others write to a
private temporary directory, removed at the end) and the base-network cache. On one machine:

    python -m keras_fip.distribute --workers=2 -- python -m apps.compress \
        --strategy=multi_worker --workers=1 --methods=fip,gradual,oneshot,lth

On a cluster, run on every host `TF_CONFIG='{"cluster": {"worker": ["host0:12345",
"host1:12345"]}, "task": {"type": "worker", "index": <i>}}' python -m apps.compress
--strategy=multi_worker --workers=1 --output_dir=<dir on a shared file system>` (worker 0 is
the chief). The chief's results equal one process's on the same flags (tested on two
loopback workers for `fip`: `tests/apps/test_multi_worker.py`; `oneshot` agreed too). A
baseline that ranks weights by magnitude can differ where float32 all-reduce rounding
(~1e-8 here) reorders a near-tie at the threshold: `gradual` at 80% on the digits gave
77.78% on two workers against 77.50% in one process (one test example; the cause is
likely, not traced).

A killed run continues with the same command and `--resume`: the jobs recorded in
`<output_dir>/jobs/` are kept, and a FIP walk the kill interrupted resumes from its last
checkpoint in `<output_dir>/checkpoints/` (every `--checkpoint_every` steps: the weights,
the optimizer, the target masks and the ramp; `keras_fip.Walk(checkpoint_directory=...)`) and ends
at the weights of an uninterrupted run (tested in `tests/apps/test_compress.py`, and on two
loopback workers killed by SIGKILL in `tests/apps/test_multi_worker.py`, a large test). Without
`--resume` earlier checkpoints are discarded.

TensorBoard: `tensorboard --logdir runs` shows, per method and seed, the test accuracy,
sparsity, distance moved ‖w − w₀‖ and output change against the target sparsity (the step
is the sparsity in 0.01%), and every FIP walk's per-step distance, distance from the start
and secondary loss (`runs/compress/logs`).
"""

import collections
import inspect
import json
import multiprocessing
import os
import shutil
import time
from concurrent import futures

import keras
import numpy as np
from absl import flags
from absl import logging

import keras_fip
from apps import common
from keras_fip import baselines
from keras_fip import data
from keras_fip import models
from keras_fip.core import projection
from keras_fip.core import tuning as tuning_lib
from keras_fip.operations.compress import Compress
from keras_fip.operations.compress import Schedule

METHODS = ("fip", "gradual", "gradual_per_layer", "oneshot", "lth", "tfmot")
# Methods that cannot run under a distributed `--strategy` (`common.start` refuses them).
SINGLE_DEVICE = {"tfmot": "tf_keras training in a separate process, outside the strategy"}
DEFAULT_EPOCHS = 20

# Sweep
flags.DEFINE_list(
    "sparsities",
    ["90", "95", "98", "99.1", "99.4"],
    "Target sparsities, in percent of the prunable weights.",
)
flags.DEFINE_integer(
    "workers",
    2,
    "Processes running (method, sparsity, seed) jobs side by "
    "side (a LeNet job keeps about one core busy). Use 1 with "
    "`--strategy` other than default.",
    lower_bound=1,
)

# Method settings
flags.DEFINE_list(
    "prune_learning_rates",
    ["1e-3", "2e-3", "5e-3", "1e-2"],
    "Initial Adam "
    "learning rates (cosine-decayed over the budget) the baselines choose from, "
    "per method and sparsity, on a validation split (extended by factors of 3 "
    "while an edge rate is the best); one rate: no tuning, used as given.",
)
flags.DEFINE_float(
    "prune_validation_fraction",
    0.1,
    "Share of the training split held out "
    "(stratified, seeded) as the baselines' validation split when they are "
    "tuned.",
    lower_bound=0.01,
    upper_bound=0.5,
)
flags.DEFINE_integer(
    "prune_tuning_seeds",
    1,
    "Seeds (the first of --seeds) on whose mean "
    "validation accuracy the baselines' learning rates are chosen; 0: all.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "lth_rounds", 3, "Pruning rounds of the lottery-ticket baseline.", lower_bound=1
)
FLAGS = flags.FLAGS

_DATA = {}
_SPLITS = {}


def _percent_list(values):
    try:
        percents = [float(v) for v in values]
    except ValueError as error:
        raise ValueError(f"`--sparsities` must be numbers. Received: {values}") from error
    for p in percents:
        projection.check_sparsity(p / 100.0, "sparsities")
    return percents


def _load(dataset, data_dir):
    """Train and test splits, loaded once per process."""
    if (dataset, data_dir) not in _DATA:
        _DATA[dataset, data_dir] = (
            data.load(dataset, "train", data_dir),
            data.load(dataset, "test", data_dir),
        )
    return _DATA[dataset, data_dir]


def _fit_split(dataset, data_dir, fraction, seed):
    """`(x, y), (x_val, y_val)`: the training split less a stratified validation split of
    `fraction` (seeded by `seed`), and that validation split; made once per process."""
    key = (dataset, data_dir, fraction, seed)
    if key not in _SPLITS:
        (x, y), _ = _load(dataset, data_dir)
        _SPLITS[key] = common.validation_split(x, y, fraction, seed)
    return _SPLITS[key]


def _tuned_as(method, methods):
    """The method whose chosen learning rate `method` trains at (`None` for `fip`, which
    keeps Compress's own rate): its own, except `tfmot`, which takes `gradual_per_layer`'s
    when both run, so that the cross-check compares one recipe."""
    if method == "fip":
        return None
    if method == "tfmot" and "gradual_per_layer" in methods:
        return "gradual_per_layer"
    return method


def prune(
    method,
    base,
    sparsity,
    x,
    y,
    x_test,
    y_test,
    epochs,
    batch_size,
    learning_rate,
    seed,
    lth_rounds=3,
    log_dir=None,
    checkpoint_dir=None,
    checkpoint_every=100,
):
    """Runs one method; returns `(pruned, record)`: the pruned model (a new one: `base` is
    not changed) and, for `fip`, what Compress chose (the labels' weight, the steps of
    the walk and of the choice). The baselines train at `learning_rate`; Compress gets
    the model, the labelled data, the budget and the seed, and keeps its other defaults.
    The FIP walk checkpoints to `checkpoint_dir` (and resumes from it) when one is
    given."""
    if method == "fip":
        # The budget: exactly `epochs` passes (no step floor), the baselines' budget.
        walk = keras_fip.Walk(
            epochs=epochs,
            seed=seed,
            verbose=0,
            record_every=checkpoint_every,
            log_dir=log_dir,
            checkpoint_directory=checkpoint_dir,
        )
        operation = Compress(sparsity, data=(x, y), schedule=Schedule(min_steps=0), walk=walk)
        pruned = operation(base)
        history = operation.history
        return pruned, {key: history[key] for key in ("task_weight", "steps", "selection_steps")}
    common_args = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
    if method in ("gradual", "gradual_per_layer"):
        scope = "global" if method == "gradual" else "per_layer"
        return (
            baselines.gradual_magnitude_pruning(base, sparsity, x, y, scope=scope, **common_args),
            {},
        )
    if method == "oneshot":
        return baselines.one_shot_magnitude_pruning(base, sparsity, x, y, **common_args), {}
    if method == "lth":
        return (
            baselines.lottery_ticket(base, sparsity, x, y, rounds=lth_rounds, **common_args),
            {},
        )
    if method == "tfmot":
        pruned, _ = baselines.tfmot_gradual_pruning(
            base, sparsity, x, y, x_test, y_test, seed=seed, **common_args
        )
        return pruned, {}
    raise ValueError(f"`--methods` must be among {list(METHODS)}. Received: {method!r}")


def _tuning_base_path(output_dir, seed):
    return os.path.join(output_dir, "tuning", f"base_seed_{seed}.keras")


def tuning_base(run, seed, resume=False):
    """The base network of the tuning runs of `seed`, and the seconds it took to train.

    It is trained as the base network is (`models.base_network`'s recipe: `--base_epochs`,
    its batch size and learning rate, the same seed and initialisation), but on the
    training split less the validation split, so that every network the tuning compares
    sees the validation images for the first time (the base network itself trained on
    them). The chief saves it to `<output_dir>/tuning/` with its settings, for the worker
    processes and `--resume` (which reuses it only with the same settings).
    """
    path = _tuning_base_path(run.shared_output_dir, seed)
    settings = {
        "model": FLAGS.model,
        "dataset": FLAGS.dataset,
        "data_dir": FLAGS.data_dir,
        "base_epochs": FLAGS.base_epochs,
        "seed": seed,
        "validation_fraction": FLAGS.prune_validation_fraction,
    }
    if resume and os.path.isfile(path) and os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            if json.load(f) == settings:
                return keras.saving.load_model(path), 0.0
    (x, y), _ = _fit_split(FLAGS.dataset, FLAGS.data_dir, FLAGS.prune_validation_fraction, seed)
    info = data.info(FLAGS.dataset, FLAGS.data_dir)
    recipe = inspect.signature(models.base_network).parameters
    start = time.perf_counter()
    common.set_seed(seed)
    with run.scope():
        network = models.get(FLAGS.model, info["input_shape"], info["num_classes"])
        models.train_classifier(
            network,
            x,
            y,
            FLAGS.base_epochs,
            recipe["batch_size"].default,
            recipe["learning_rate"].default,
        )
    seconds = time.perf_counter() - start
    if run.is_chief:  # A temporary name first: a kill leaves no half-written model.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        network.save(path + ".tmp.keras")
        os.replace(path + ".tmp.keras", path)
        common.write_json(os.path.dirname(path), os.path.basename(path) + ".json", settings)
    return network, seconds


def run_tuning_job(job, base=None):
    """One tuning run of a baseline: (method, sparsity, seed, learning rate).

    Prunes the tuning base network (`tuning_base`, given as `base` or read from
    `job["tuning_base_path"]`) with the training split less the validation split and
    returns the job with its `"validation_accuracy"` (`None` if the outputs are not
    finite). The test split is never read.
    """
    (x, y), (x_val, y_val) = _fit_split(
        job["dataset"], job["data_dir"], job["validation_fraction"], job["seed"]
    )
    if base is None:
        base = keras.saving.load_model(job["tuning_base_path"])
    common.set_seed(job["seed"])
    start = time.perf_counter()
    # The tfmot process evaluates on its "test" arrays: give it the validation split.
    pruned, _ = prune(
        job["method"],
        base,
        job["percent"] / 100.0,
        x,
        y,
        x_val,
        y_val,
        job["epochs"],
        job["batch_size"],
        job["learning_rate"],
        job["seed"],
        job["lth_rounds"],
    )
    seconds = time.perf_counter() - start
    accuracy = models.evaluate_classifier(pruned, x_val, y_val)["accuracy"]
    return {
        **job,
        "validation_accuracy": float(accuracy) if np.isfinite(accuracy) else None,
        "seconds": seconds,
    }


def run_job(job, base=None):
    """One (method, sparsity, seed): prunes the cached base network and measures it.

    Runs in the app's process (given the `base` network) or in a worker process
    (`--workers`, reading it from the cache); the job is a plain dict so that it crosses
    process boundaries. Saves the pruned model to `job["save_path"]` when one is given;
    the FIP walk writes TensorBoard scalars to `job["log_dir"]` when one is given, and
    checkpoints to `<job["shared_output_dir"]>/checkpoints/<job["checkpoint_name"]>`
    (resuming it with `job["resume"]`, else starting afresh). Tuning jobs
    (`job["role"] == "tuning"`) go to `run_tuning_job`.
    """
    if job.get("role") == "tuning":
        return run_tuning_job(job, base)
    (x, y), (x_test, y_test) = _load(job["dataset"], job["data_dir"])
    if base is None:
        base, _ = models.base_network(
            job["model"],
            job["dataset"],
            epochs=job["base_epochs"],
            seed=job["seed"],
            data_dir=job["data_dir"],
            cache_dir=job["cache_dir"],
        )
    checkpoint_dir = None
    if job.get("checkpoint_name"):
        checkpoint_dir = common.checkpoint_dir(
            job["shared_output_dir"], job["checkpoint_name"], job.get("resume")
        )
    common.set_seed(job["seed"])
    start = time.perf_counter()
    pruned, record = prune(
        job["method"],
        base,
        job["percent"] / 100.0,
        x,
        y,
        x_test,
        y_test,
        job["epochs"],
        job["batch_size"],
        job["learning_rate"],
        job["seed"],
        job["lth_rounds"],
        job.get("log_dir"),
        checkpoint_dir,
        job.get("checkpoint_every", 100),
    )
    seconds = time.perf_counter() - start
    if job.get("save_path"):
        pruned.save(job["save_path"])
    return {
        **job,
        "accuracy": models.evaluate_classifier(pruned, x_test, y_test)["accuracy"],
        "sparsity": projection.prunable_sparsity(pruned),
        "parameter_sparsity": projection.sparsity_summary(pruned).sparsity,
        "fip": record,
        "seconds": seconds,
        "layer_sparsity": {
            v.path: float(np.mean(v.numpy() == 0)) for v in projection.prunable_variables(pruned)
        },
        **common.movement(pruned, base, x_test[:1000]),
    }


# Job records (`--resume`).

_RUNTIME_KEYS = (
    "save_path",
    "log_dir",
    "checkpoint_name",
    "shared_output_dir",
    "checkpoint_every",
    "resume",
    "tuning_base_path",
)


def _job_file(directory, job):
    name = f"{job['method']}_{job['percent']:g}_seed_{job['seed']}"
    if job.get("role") == "tuning":
        return os.path.join(directory, "jobs", "tuning", f"{name}_lr_{job['learning_rate']:g}.json")
    return os.path.join(directory, "jobs", f"{name}.json")


def _finished(job, run):
    """The recorded result of `job` in the chief's `jobs/` directory, if its settings are
    the same (every worker reads the chief's record: the same decision everywhere)."""
    path = _job_file(run.shared_output_dir, job)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    same = all(result.get(key) == value for key, value in job.items() if key not in _RUNTIME_KEYS)
    if job.get("save_path") and not os.path.isfile(
        os.path.join(run.shared_output_dir, os.path.basename(job["save_path"]))
    ):
        return None  # The sparsest model was not saved before the kill: redo it.
    return result if same else None


def _record(result, run):
    """Records a finished job in `<output_dir>/jobs/` (and drops its walk's checkpoint)."""
    common.write_json(
        os.path.dirname(_job_file(run.output_dir, result)),
        os.path.basename(_job_file(run.output_dir, result)),
        result,
    )
    if result.get("checkpoint_name") and run.is_chief:  # Recorded: not needed.
        shutil.rmtree(
            os.path.join(run.shared_output_dir, "checkpoints", result["checkpoint_name"]),
            ignore_errors=True,
        )


def _run_all(jobs, workers, run, bases, resume=False, follow_up=None):
    """Yields the results of `jobs` as they finish, in this process (in the strategy's
    scope, on the base networks `bases[seed]`, the tuning ones `bases["tuning", seed]`)
    or in `workers` processes. Each result is recorded in `<output_dir>/jobs/`; with
    `resume`, jobs recorded with the same settings by an earlier (killed) run are not run
    again. `follow_up(result)`, called on every result before it is yielded, returns the
    jobs it makes runnable (the next rates of a tuning, the jobs waiting for its choice):
    they run next, as soon as a process is free."""
    queue = collections.deque(jobs)
    pool, running = None, {}
    if workers > 1:
        pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def finish(result):
        queue.extendleft(reversed(follow_up(result) if follow_up else []))
        return result

    try:
        while queue or running:
            while queue and len(running) < workers:
                job = queue.popleft()
                result = _finished(job, run) if resume else None
                if result is None and pool is not None:
                    running[pool.submit(run_job, job)] = job
                    continue
                if result is None:
                    key = ("tuning", job["seed"]) if job.get("role") == "tuning" else job["seed"]
                    with run.scope():
                        result = run_job(job, base=bases[key])
                    _record(result, run)
                yield finish(result)
            if running:
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    del running[future]
                    result = future.result()
                    _record(result, run)
                    yield finish(result)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


class _Tuning:
    """The baselines' learning-rate search, per (method, sparsity) group.

    Each group runs every rate of `grid` on each of `seeds`, then, once they are all
    measured, the rate `keras_fip.core.tuning.extend_grid` adds (while an edge rate is
    the best alone, one grid step beyond it, within the apps' bounds), until the choice:
    the best mean validation accuracy over `seeds` (`keras_fip.core.tuning.best_value`).
    A grid of one rate runs nothing.
    """

    def __init__(self, groups, seeds, grid, make_job):
        self.grid = grid
        self.seeds = seeds
        # group -> rate -> seed -> validation accuracy
        self.scores = {group: {} for group in groups} if len(grid) > 1 else {}
        self.extended = {group: {"up": 0, "down": 0} for group in groups}
        self.make_job = make_job
        self.seconds = 0.0

    def jobs(self, group, rates):
        """The jobs measuring `rates` for `group` on every tuning seed."""
        for rate in rates:
            self.scores[group][rate] = {}
        return [self.make_job(*group, seed, rate) for rate in rates for seed in self.seeds]

    def first_jobs(self):
        return [job for group in self.scores for job in self.jobs(group, self.grid)]

    def record(self, result):
        """Records a tuning result; returns its group."""
        group = result["method"], result["percent"]
        self.scores[group][result["learning_rate"]][result["seed"]] = result["validation_accuracy"]
        self.seconds += result["seconds"]
        return group

    def complete(self, group):
        return all(len(by_seed) == len(self.seeds) for by_seed in self.scores[group].values())

    def validation(self, group):
        """`{rate: mean validation accuracy over the tuning seeds}` (`None`: diverged)."""
        return {
            rate: (
                None
                if any(v is None for v in by_seed.values())
                else float(np.mean(list(by_seed.values())))
            )
            for rate, by_seed in sorted(self.scores[group].items())
        }

    def extension(self, group):
        """The rates `group` still has to measure (none: its choice is made)."""
        return [
            rate
            for rate in tuning_lib.extend_grid(
                self.validation(group),
                low=common.MIN_TUNED_LEARNING_RATE,
                high=common.MAX_TUNED_LEARNING_RATE,
                extended=self.extended[group],
            )
            if rate not in self.scores[group]
        ]

    def rate(self, group):
        if len(self.grid) == 1:
            return self.grid[0]
        return tuning_lib.best_value(self.validation(group))


def sweep(methods, percents, seeds, epochs, batch_size, learning_rates, run, workers):
    """Runs every (method, sparsity, seed); returns `(results, layer_figures)`.

    With more than one rate in `learning_rates` the baselines' rates are chosen per method
    and sparsity on a validation split (`_Tuning`, on the first `--prune_tuning_seeds`
    seeds) before they run; the FIP jobs run beside the tuning.
    """
    output_dir = run.output_dir
    info = data.info(FLAGS.dataset, FLAGS.data_dir)
    runs, layer_figures, bases, finished = {}, {}, {}, {}
    jobs = []
    for seed in seeds:
        # Train (or load) the base networks here, so that workers only read the cache.
        bases[seed], base_results = run.base_network(
            FLAGS.model,
            FLAGS.dataset,
            epochs=FLAGS.base_epochs,
            seed=seed,
            data_dir=FLAGS.data_dir,
            cache_dir=FLAGS.cache_dir,
        )
        runs.setdefault("base", {}).setdefault(0.0, []).append(
            (base_results["test/accuracy"], 0.0, base_results["train/wall_time_seconds"])
        )
        for method in methods:
            for percent in percents:
                sparsest = method == "fip" and percent == max(percents) and seed == seeds[0]
                jobs.append(
                    dict(
                        model=FLAGS.model,
                        dataset=FLAGS.dataset,
                        data_dir=FLAGS.data_dir,
                        cache_dir=FLAGS.cache_dir,
                        base_epochs=FLAGS.base_epochs,
                        seed=seed,
                        method=method,
                        percent=percent,
                        epochs=epochs,
                        batch_size=batch_size,
                        # The baselines' rate: set once chosen (Compress has its own).
                        learning_rate=(
                            learning_rates[0]
                            if len(learning_rates) == 1 and method != "fip"
                            else None
                        ),
                        lth_rounds=FLAGS.lth_rounds,
                        save_path=(
                            os.path.join(output_dir, "sparsest_fip.keras") if sparsest else None
                        ),
                        log_dir=(
                            run.log_dir(f"fip/{percent:g}/seed_{seed}") if method == "fip" else None
                        ),
                        # FIP walks checkpoint to `<output_dir>/checkpoints/<name>` (the
                        # chief's, read by every worker), resumed with `--resume`.
                        checkpoint_name=(
                            f"fip_{percent:g}_seed_{seed}" if method == "fip" else None
                        ),
                        shared_output_dir=run.shared_output_dir,
                        checkpoint_every=FLAGS.checkpoint_every,
                        resume=FLAGS.resume,
                    )
                )

    # The baselines' learning rates, chosen on a validation split of the training data.
    tuning_seeds = seeds[: FLAGS.prune_tuning_seeds or len(seeds)]

    def tuning_job(method, percent, seed, rate):
        return dict(
            role="tuning",
            model=FLAGS.model,
            dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir,
            base_epochs=FLAGS.base_epochs,
            seed=seed,
            method=method,
            percent=percent,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=rate,
            lth_rounds=FLAGS.lth_rounds,
            validation_fraction=FLAGS.prune_validation_fraction,
            tuning_base_path=_tuning_base_path(run.shared_output_dir, seed),
        )

    tuned = sorted({_tuned_as(m, methods) for m in methods} - {None}, key=list(METHODS).index)
    tuning = _Tuning(
        [(m, p) for m in tuned for p in percents], tuning_seeds, learning_rates, tuning_job
    )
    waiting = {}  # group -> the jobs waiting for its choice of learning rate
    for job in jobs:
        if job["learning_rate"] is None and job["method"] != "fip":
            waiting.setdefault((_tuned_as(job["method"], methods), job["percent"]), []).append(job)
    base_seconds = []

    def with_tuning_bases(new_jobs):
        # The tuning base networks of the tuning jobs an earlier run did not record.
        for job in new_jobs:
            key = ("tuning", job["seed"])
            if (
                job.get("role") == "tuning"
                and key not in bases
                and not (FLAGS.resume and _finished(job, run))
            ):
                bases[key], seconds = tuning_base(run, job["seed"], resume=FLAGS.resume)
                base_seconds.append(seconds)
                print(
                    f"seed {job['seed']} tuning base network (without the validation "
                    f"split): {seconds:.0f} s",
                    flush=True,
                )
        return new_jobs

    def follow_up(result):
        """A group's next rates once it has measured the last ones, else the jobs
        waiting for its choice."""
        if result.get("role") != "tuning":
            return []
        group = tuning.record(result)
        if not tuning.complete(group):
            return []
        rates = tuning.extension(group)
        if rates:
            return with_tuning_bases(tuning.jobs(group, rates))
        for job in waiting.get(group, []):
            job["learning_rate"] = tuning.rate(group)
        return waiting.pop(group, [])

    def record(result):
        method, percent = result["method"], result["percent"]
        runs.setdefault(method, {}).setdefault(percent, []).append(
            (result["accuracy"], result["sparsity"], result["seconds"])
        )
        layer_figures.setdefault(method, {})[percent] = result["layer_sparsity"]
        finished.setdefault((method, percent), []).append(result)
        # TensorBoard: one point per target sparsity (the step is the sparsity in 0.01%).
        run.scalars(
            {
                "test_accuracy": result["accuracy"],
                "sparsity": result["sparsity"],
                "distance_moved": result["distance_moved"],
                "output_change": result["output_change"],
            },
            step=round(100 * percent),
            prefix=f"{method}/seed_{result['seed']}",
        )
        print(
            f"seed {result['seed']} {method:>17} {percent:>5}%: test accuracy "
            f"{result['accuracy']:.4f} (sparsity {result['sparsity']:.4f}, "
            f"{result['seconds']:.0f} s)",
            flush=True,
        )

    # The tuning first, then the jobs that need no choice (FIP); each group's waiting
    # jobs start as soon as its choice is made.
    first = with_tuning_bases(tuning.first_jobs())
    first += [job for job in jobs if not any(job in group for group in waiting.values())]
    for result in _run_all(first, workers, run, bases, resume=FLAGS.resume, follow_up=follow_up):
        if result.get("role") == "tuning":
            print(
                f"seed {result['seed']} {result['method']:>17} {result['percent']:>5}%: "
                f"learning rate {result['learning_rate']:g}, validation accuracy "
                f"{result['validation_accuracy']} ({result['seconds']:.0f} s)",
                flush=True,
            )
        else:
            record(result)

    results = {"dataset/subset": bool(info["subset"]), "epochs": epochs}
    for (method, percent), records in finished.items():
        key = f"{method}/{percent:g}"
        # The zero fraction of all parameters, beside the sparsity of the prunable weights.
        results[f"{key}/parameter_sparsity"] = float(
            np.mean([r.get("parameter_sparsity", np.nan) for r in records])
        )
        if method == "fip":
            chosen = [r.get("fip") or {} for r in records]
            results[f"{key}/task_weights"] = [c.get("task_weight") for c in chosen]
            results[f"{key}/selection_steps"] = float(
                np.mean([c.get("selection_steps", np.nan) for c in chosen])
            )
    for method, by_percent in runs.items():
        for percent, values in by_percent.items():
            accuracies, measured, seconds = (np.array(v) for v in zip(*values))
            key = f"{method}/{percent:g}"
            results[f"{key}/test/accuracy"] = float(accuracies.mean())
            results[f"{key}/test/accuracy_std"] = float(accuracies.std())
            results[f"{key}/sparsity"] = float(measured.mean())
            results[f"{key}/wall_time_seconds"] = float(seconds.mean())
            results[f"{key}/epochs"] = epochs if method != "base" else FLAGS.base_epochs
            results[f"{key}/num_seeds"] = len(accuracies)
    for method in methods:
        for percent in percents:
            if _tuned_as(method, methods) is None:
                continue
            group = _tuned_as(method, methods), percent
            results[f"{method}/{percent:g}/learning_rate"] = tuning.rate(group)
            if len(learning_rates) > 1 and group[0] == method:
                validation = {
                    f"{rate:g}": accuracy for rate, accuracy in tuning.validation(group).items()
                }
                results[f"{method}/{percent:g}/tuning/validation_accuracy"] = validation
                print(
                    f"{method} {percent:g}%: learning rate {tuning.rate(group):g} chosen "
                    f"on validation {validation}",
                    flush=True,
                )
    if tuned and len(learning_rates) > 1:
        results["tuning/seeds"] = tuning_seeds
        results["tuning/validation_fraction"] = FLAGS.prune_validation_fraction
        # The time the tuning adds: its jobs' and its base networks' (0 if loaded).
        results["tuning/job_seconds"] = tuning.seconds
        results["tuning/base_network_seconds"] = float(sum(base_seconds))
    for percent in percents:

        def mean(method):
            return results.get(f"{method}/{percent:g}/test/accuracy")  # noqa: B023

        if mean("fip") is not None and mean("gradual") is not None:
            results[f"fip/{percent:g}/margin_over_gradual"] = mean("fip") - mean("gradual")
        if mean("tfmot") is not None and mean("gradual_per_layer") is not None:
            results[f"tfmot/{percent:g}/gap_to_gradual_per_layer"] = mean(
                "gradual_per_layer"
            ) - mean("tfmot")
    return results, layer_figures


def plot(results, layer_figures, methods, percents, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method in methods:
        means = [results[f"{method}/{p:g}/test/accuracy"] for p in percents]
        stds = [results[f"{method}/{p:g}/test/accuracy_std"] for p in percents]
        axis.errorbar(percents, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.set_xlabel("sparsity (% of prunable weights)")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{FLAGS.model} on {FLAGS.dataset}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "accuracy_vs_sparsity.png"), dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.5), squeeze=False)
    for axis, method in zip(axes[0], methods):
        for percent in percents:
            per_layer = layer_figures[method][percent]
            axis.plot(
                range(len(per_layer)), list(per_layer.values()), marker="o", label=f"{percent:g}%"
            )
            axis.set_xticks(
                range(len(per_layer)), list(per_layer), rotation=45, fontsize=7, ha="right"
            )
        axis.set_title(method)
        axis.set_ylabel("layer sparsity")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "layer_sparsity.png"), dpi=120)
    plt.close(figure)


METHOD_NAMES = {
    "fip": "Compress (defaults)",
    "gradual": "gradual magnitude pruning, global (tuned rate)",
    "gradual_per_layer": "gradual magnitude pruning, per layer (tuned rate)",
    "oneshot": "one-shot pruning + fine-tuning (tuned rate)",
    "lth": "lottery ticket, rewinding (tuned rate)",
    "tfmot": "tfmot prune_low_magnitude (tf_keras)",
}


def summary_page(results, config, methods, percents):
    """The results page's `summary.json`: test accuracy per method and sparsity."""
    seeds = ", ".join(str(seed) for seed in config["seeds"])
    rows = []
    for method in methods:
        row = [METHOD_NAMES.get(method, method)]
        for percent in percents:
            key = f"{method}/{percent:g}/test/accuracy"
            if key in results:
                mean, std = 100 * results[key], 100 * results.get(key + "_std", 0.0)
                row.append(f"{mean:.2f} ± {std:.2f}")
            else:
                row.append(None)
        rows.append(row)
    dense = 100 * results["base/0/test/accuracy"]
    return {
        "title": f"Compress: {config['model']} on {config['dataset']}",
        "description": (
            f"Test accuracy (%) at each sparsity of the prunable weights, mean ± std over seeds "
            f"{seeds}; every method {config['epochs']} epochs from the same trained network "
            f"(dense: {dense:.2f}%)."
        ),
        "tables": [
            {
                "caption": "Test accuracy (%)",
                "columns": ["method", *(f"{percent:g}%" for percent in percents)],
                "rows": rows,
                "headline": [0],
            }
        ],
    }


def main(argv):
    del argv  # Unused.
    percents = _percent_list(FLAGS.sparsities)
    methods = [common.check_choice(m, "methods", METHODS) for m in (FLAGS.methods or METHODS)]
    seeds = [int(s) for s in FLAGS.seeds]
    # Refused before any work.
    learning_rates = common.learning_rate_grid(FLAGS.prune_learning_rates, "prune_learning_rates")
    epochs = DEFAULT_EPOCHS if FLAGS["epochs"].using_default_value else FLAGS.epochs
    if FLAGS.workers > 1 and FLAGS.strategy != "default":
        raise ValueError(
            "`--workers` above 1 runs jobs in separate processes, which cannot share a "
            f"`--strategy`. Received: workers={FLAGS.workers}, strategy={FLAGS.strategy!r}"
        )
    run = common.start(
        "compress", unsupported=common.single_device_parts(methods, SINGLE_DEVICE), resumable=True
    )
    skipped = {}
    if "tfmot" in methods and not baselines.tfmot_available():
        logging.warning(
            "tensorflow-model-optimization or tf_keras is missing (install the "
            "`baselines` extra); skipping the `tfmot` cross-check."
        )
        methods.remove("tfmot")
        skipped["tfmot/skipped"] = "tensorflow-model-optimization or tf_keras not installed"
    output_dir = run.output_dir
    start = time.perf_counter()
    results, layer_figures = sweep(
        methods, percents, seeds, epochs, FLAGS.batch_size, learning_rates, run, FLAGS.workers
    )
    results.update(skipped)
    results["wall_time_seconds"] = time.perf_counter() - start
    config = common.flag_values(
        (
            "model",
            "dataset",
            "batch_size",
            "sparsities",
            "methods",
            "seeds",
            "workers",
            "prune_learning_rates",
            "prune_validation_fraction",
            "prune_tuning_seeds",
            "base_epochs",
            "lth_rounds",
            "strategy",
        )
    )
    config["epochs"] = epochs
    common.write_json(output_dir, "config.json", config)
    common.write_json(output_dir, "results.json", results)
    common.write_json(output_dir, "summary.json", summary_page(results, config, methods, percents))
    plot(results, layer_figures, methods, percents, output_dir)
    sparsest_path = os.path.join(output_dir, "sparsest_fip.keras")
    if "fip" in methods:
        if not os.path.isfile(sparsest_path):  # A worker resuming: the chief saved it.
            sparsest_path = os.path.join(run.shared_output_dir, "sparsest_fip.keras")
        sparsest = keras.saving.load_model(sparsest_path)
        keras_fip.export(sparsest, os.path.join(output_dir, "serving"))
    print(f"\n{'sparsity':>9}" + "".join(f"{m:>19}" for m in methods))
    for percent in percents:
        cells = "".join(
            f"{100 * results[f'{m}/{percent:g}/test/accuracy']:>12.2f}±"
            f"{100 * results[f'{m}/{percent:g}/test/accuracy_std']:<6.2f}"
            for m in methods
        )
        print(f"{percent:>8g}%{cells}")
    print(f"wall time {results['wall_time_seconds']:.0f} s -> {output_dir}")
    run.close()


if __name__ == "__main__":
    common.run(
        main,
        shared=(
            *common.TRAINING_FLAGS,
            "model",
            "seeds",
            "base_epochs",
            "methods",
            "resume",
            "checkpoint_every",
        ),
        defaults={"epochs": DEFAULT_EPOCHS},
    )
