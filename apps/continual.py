r"""Continual learning with keras_fip.ContinualLearn against the baselines, side by side.

Each seed trains one network on the benchmark's first task (`--batch_size`,
`--learning_rate`, `--continual_base_epochs`); every method then learns the later tasks
from that same network, in order, with the same epoch budget and, where it keeps one, the
same memory (`--memory_per_task` class-balanced inputs of every finished task, drawn
identically). Every method gets only the model, the data, the budget and the seed: the
rest is the library's defaults (32 examples a step, Adam cosine-decayed; the baselines'
learning rate chosen on a held-out split of the new task, and of their labelled memory,
as their authors tune it; `--fip_beta`, `--fip_step_rule` and `--fip_learning_rate`, when
set, are passed to ContinualLearn's walk as its `beta` and `rule` and recorded in
results.json as `fip_options`):

- `fip`: `keras_fip.ContinualLearn` (keeps the old network's outputs on the memory inputs,
  no labels);
- `finetune`: plain training on the new task (shows forgetting);
- `ewc`: online EWC, λ chosen on held-out data of every task seen (`--ewc_lambda=auto`
  tunes on the first seed and reuses the choice for the others; the grid is extended ×10
  past an edge that wins alone, up to 3 times each way);
- `lwf`: Learning without Forgetting (T = 2, λ_o = 1);
- `replay`: experience replay on the labelled memory;
- `agem`: A-GEM on the labelled memory;
- `joint`: training on the union of all tasks' data (the upper bound).

Benchmarks: `mnist_fmnist` (cnn5, the paper's 2-task run; Fashion-MNIST is the local
8,517-image subset on these machines: results.json says so), `split_mnist` (5 × 2
classes, MLP 400-400), `permuted_mnist` (10 tasks on shared outputs, MLP 400-400),
`split_cifar10` (5 × 2, cnn5; the local 4,000-image subset here), `split_cifar100` (20 × 5,
cnn5; needs the full data through tensorflow-datasets or `--data_dir`). Every task holds out
10% of its training data (at most 1,000) as validation for EWC's λ; all methods train on
the rest. Split benchmarks grow the output layer by each task's classes (`head="append"`)
and report class-incremental accuracy (argmax over every output) as the main figure, and
task-incremental accuracy (argmax over the task's own outputs) beside it.

Writes `results.json` (per benchmark and method: the R matrix per seed, ACC/BWT/forgetting
mean ± std in both evaluations, final per-task accuracy, wall time, epochs; keys such as
`"mnist_fmnist/fip/acc/mean"`, `"mnist_fmnist/ewc/task_0/accuracy/mean"`), `config.json`
and the plots `<benchmark>_path.png` (every task's accuracy along the FIP against
fine-tuning, Fig. 2C), `<benchmark>_final.png` (final per-task accuracy per method) and,
with `--memory_sizes`, `<benchmark>_memory.png` (ACC against memory size).

The measured figures, with their commands, are on the results page (`docs/results.md`).

Example:

    python -m apps.continual        # mnist_fmnist and split_mnist, main methods, 3 seeds
    python -m apps.continual --benchmarks=permuted_mnist --methods=fip,ewc --seeds=0

`--strategy=mirrored|multi_worker|tpu` trains the first-task networks and runs every method
in that strategy: the FIP walks and the baselines' loop (`baselines.continual_base.train`)
split each global batch over the replicas. Across processes or hosts every worker runs the
same command with the same `--seeds`, and only the chief writes `--output_dir`:

    python -m keras_fip.distribute --workers=2 -- python -m apps.continual \
        --strategy=multi_worker --methods=fip,ewc,agem,replay

(on a cluster: the same command on every host with its `TF_CONFIG`, see `apps.compress`).
The chief's results equal one process's for split_mnist's MLP (tested on two loopback
workers: `tests/apps/test_multi_worker.py`). cnn5 (mnist_fmnist, split_cifar) trains its
first task with weights ~3e-3 from one process's after 16 Adam steps (float32 reduction
order in the convolutions, amplified by Adam on near-zero gradients), so its figures agree
up to an example here and there. TensorBoard (`tensorboard --logdir runs`): every task's
accuracy after each task and along the walks, and the walks' per-step distance, distance from
the start and secondary loss (`runs/continual/logs`).

A killed run continues with the same command and `--resume`: every FIP walk checkpoints to
`<output_dir>/checkpoints/` every `--checkpoint_every` steps
(`keras_fip.Walk(checkpoint_directory=...)`), the tasks a stream already learned are
restored without walking, and the interrupted walk resumes from its last checkpoint and
ends at the weights of an uninterrupted run (the baselines run again; tested on two loopback
workers killed by SIGKILL in `tests/apps/test_multi_worker.py`, a large test, and in
`tests/operations/test_continual_learn.py`). Without `--resume` earlier
checkpoints are discarded; a finished run removes them.
"""

import os
import shutil
import time

import keras
import numpy as np
from absl import app
from absl import flags
from absl import logging

import keras_fip
from apps import common
from keras_fip import baselines
from keras_fip import data
from keras_fip import metrics
from keras_fip import models

METHODS = ("fip", "finetune", "ewc", "lwf", "replay", "agem", "joint")
DEFAULT_METHODS = ("fip", "finetune", "ewc", "lwf", "replay", "agem")
DEFAULT_EPOCHS = 5
MODELS = {
    "mnist_fmnist": "cnn5",
    "split_mnist": "mlp",
    "permuted_mnist": "mlp",
    "split_cifar10": "cnn5",
    "split_cifar100": "cnn5",
}
MEMORY = {
    "mnist_fmnist": 500,
    "split_mnist": 200,
    "permuted_mnist": 200,
    "split_cifar10": 200,
    "split_cifar100": 100,
}
# Methods `common.start` would refuse under a distributed `--strategy`: none. The
# baselines' loop (`baselines.continual_base.train`) splits each global batch over the
# replicas (`keras_fip.distribute.replica_step`) and equals one device
# (tests/baselines/test_distributed.py; two loopback workers in tests/apps/test_multi_worker.py).
SINGLE_DEVICE = {}

# Benchmarks and methods
flags.DEFINE_list(
    "benchmarks", ["mnist_fmnist", "split_mnist"], f"Benchmarks among {list(data.BENCHMARKS)}."
)
# `--methods`, `--seeds` and `--base_epochs` are apps.common's (one flag registry).
flags.DEFINE_integer(
    "memory_per_task",
    None,
    "Memory inputs kept per finished task (default: 500 for mnist_fmnist, 200 for the splits).",
    lower_bound=1,
)
flags.DEFINE_list(
    "memory_sizes",
    [],
    "Memory sizes per task for the ACC-vs-memory plot "
    "(fip, replay, agem; first benchmark only). Empty: no sweep.",
)
flags.DEFINE_integer(
    "max_train_examples",
    20000,
    "At most this many training examples per task (a seeded sample; 0 for all).",
    lower_bound=0,
)
flags.DEFINE_integer(
    "max_test_examples", 0, "At most this many test examples per task (0 for all).", lower_bound=0
)
flags.DEFINE_integer("continual_base_epochs", 5, "Epochs of the first-task network.", lower_bound=1)
flags.DEFINE_string(
    "ewc_lambda",
    "auto",
    "EWC's λ: a number, or `auto` (the library's grid on held-out data, extended ×10 "
    "past an edge that wins, first seed, reused).",
)
flags.DEFINE_string(
    "fip_learning_rate",
    None,
    "ContinualLearn's `Penalty` learning rate: a number or `auto` (the rule's auto rate); "
    "unset, the library default (when set it is named in results.json).",
)
flags.DEFINE_string(
    "fip_beta",
    "auto",
    "ContinualLearn's β: a number or `auto` (the library default; a number is named in "
    "results.json).",
)

FLAGS = flags.FLAGS


def _value(name, default):
    """The flag's value, or this app's default when the flag was not set."""
    return default if FLAGS[name].using_default_value else FLAGS[name].value


def build_model(benchmark, num_outputs, input_shape):
    name = MODELS[benchmark]
    if name == "mlp":
        return models.get("mlp", input_shape, num_outputs, hidden_units=(400, 400))
    return models.get(name, input_shape, num_outputs)


def first_network(bench, seed, epochs, batch_size, learning_rate):
    """The network trained on the first task (shared by every method of this seed)."""
    keras.utils.set_random_seed(seed)
    x, y = bench["train"][0]
    model = build_model(bench["name"], int(np.max(y)) + 1, bench["input_shape"])
    models.train_classifier(
        model, x, y, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate
    )
    return model


def split_validation(bench, seed):
    """Holds out 10% (at most 1,000) of every task's training data as validation."""
    rng = np.random.default_rng(seed + 1000)
    train, validation = [], []
    for t, (x, y) in enumerate(bench["train"]):
        order = rng.permutation(len(x))
        held = min(1000, max(1, len(x) // 10))
        validation.append((x[order[:held]], y[order[:held]] + bench["offsets"][t]))
        rows = np.sort(order[held:])
        train.append((x[rows], y[rows]))
    return train, validation


def learn(method, model, t, train, validation, bench, memory, settings, state):
    """Applies `method` for task t; returns (model, operation). Every method gets the
    model, the data (the task, its head layout, the memory), the budget and the seed;
    everything else is the library's default (`settings["fip_options"]`: the FIP flags
    set on the command line, named in results.json)."""
    x, y = train[t]
    offsets = bench["offsets"]
    # The budget and the seed, as every method takes them (a `keras_fip.Walk`).
    budget = dict(epochs=settings["epochs"], seed=settings["seed"])
    common_args = dict(head=bench["head"], walk=keras_fip.Walk(**budget, verbose=0))
    eval_tasks = [(tx[:1000], ty[:1000]) for tx, ty in bench["test"][: t + 1]]
    labelled_memory = (
        np.concatenate([m[0] for m in memory]),
        np.concatenate([m[1] for m in memory]),
    )
    if method == "fip":
        run = state.get("run")
        checkpoint = None
        if run is not None:  # Every `--checkpoint_every` steps; resumed with `--resume`.
            checkpoint = common.checkpoint_dir(
                run.shared_output_dir,
                f"{bench['name']}/fip/memory_{settings['memory_per_task']}/"
                f"seed_{settings['seed']}/task_{t}",
                settings.get("resume", False),
            )
        options = dict(settings["fip_options"])
        if "learning_rate" in options:  # The `penalty` rule's (`--fip_learning_rate`).
            options["rule"] = keras_fip.rules.Penalty(options.pop("learning_rate"))
        walk = keras_fip.Walk(
            **budget,
            verbose=0,
            record_every=(10**9 if checkpoint is None else settings.get("checkpoint_every", 100)),
            checkpoint_directory=checkpoint,
            log_dir=run and run.log_dir(f"{bench['name']}/fip/seed_{settings['seed']}/task_{t}"),
            **options,
        )
        op = keras_fip.ContinualLearn(
            (x, y),
            memory=labelled_memory[0] if t == 1 else None,
            head=bench["head"],
            memory_per_task=settings["memory_per_task"],
            eval_tasks=eval_tasks,
            walk=walk,
        )
    elif method == "finetune":
        op = baselines.FineTune((x, y), eval_tasks=eval_tasks, **common_args)
    elif method == "lwf":
        op = baselines.LwF((x, y), **common_args)
    elif method == "replay":
        op = baselines.ExperienceReplay((x, y), memory=labelled_memory, **common_args)
    elif method == "agem":
        op = baselines.AGEM((x, y), memory=labelled_memory, **common_args)
    elif method == "joint":
        old = [(train[j][0], train[j][1] + offsets[j]) for j in range(t)]
        op = baselines.JointTraining((x, y), old_tasks=old, **common_args)
    elif method == "ewc":
        chosen = state.setdefault("ewc_lambda", {})
        value = settings["ewc_lambda"]
        if value == "auto" and t in chosen:
            value = chosen[t]  # Tuned on the first seed.
        op = baselines.EWC(
            (x, y),
            fisher_data=train[t - 1][0],
            ewc_lambda=value,
            validation_tasks=validation[:t],
            **common_args,
        )
    else:
        raise ValueError(f"`--methods` must be among {list(METHODS)}. Received: {method!r}")
    result = op(model)
    if method == "ewc":
        state["ewc_lambda"].setdefault(t, op.history["lambda"])
        if "lambda_scores" in op.history:  # Every λ tried, extensions included.
            scores = sorted(op.history["lambda_scores"].items())
            state.setdefault("ewc_lambda_scores", {}).setdefault(
                t, {f"{value:g}": score for value, score in scores}
            )
    return result, op


def run_stream(method, bench, seed, settings, state):
    """One method over every task for one seed: the R matrices and the FIP path."""
    train, validation = split_validation(bench, seed)
    bench_seed = dict(bench, train=train)
    model = state["first"][seed]
    memory_size = settings["memory_per_task"]
    x0, y0 = train[0]
    memory = [tuple(m) for m in [data.memory_sample(x0, y0, memory_size, seed=seed)]]
    after = [model]
    paths = []
    eval_seconds = 0.0
    start = time.perf_counter()
    run = state["run"]
    for t in range(1, len(train)):
        with run.scope():
            model, op = learn(
                method,
                model,
                t,
                train,
                validation,
                bench_seed,
                memory,
                dict(settings, seed=seed),
                state,
            )
        x, y = train[t]
        mx, my = data.memory_sample(x, y, memory_size, seed=seed)
        memory.append((mx, my + bench["offsets"][t]))
        after.append(model)
        eval_seconds += float((op.history or {}).get("eval_seconds", 0.0))
        if "eval_step" in (op.history or {}):
            paths.append(
                {k: v for k, v in op.history.items() if k == "eval_step" or k.endswith("/accuracy")}
            )
    wall_time = time.perf_counter() - start
    class_matrix = metrics.accuracy_matrix(after, bench["test"])
    task_matrix = metrics.accuracy_matrix(
        after, bench["test"], mode="task_incremental", task_outputs=bench["task_outputs"]
    )
    _log_stream(run, f"{bench['name']}/{method}/seed_{seed}", class_matrix, paths)
    return {
        "class": class_matrix,
        "task": task_matrix,
        "wall_time": wall_time,
        "eval_time": eval_seconds,
        "paths": paths,
    }


def _log_stream(run, prefix, class_matrix, paths):
    """TensorBoard: every task's accuracy after each task (the step is the task learned),
    and along the walk where it was recorded (the step counts the walks' steps)."""
    class_matrix = np.asarray(class_matrix)
    for t in range(class_matrix.shape[0]):
        values = {f"task_{j}/accuracy": class_matrix[t, j] for j in range(t + 1)}
        values["average_accuracy"] = float(np.mean(class_matrix[t, : t + 1]))
        run.scalars(values, step=t, prefix=f"{prefix}/after_task")
    offset = 0
    for path in paths:
        steps = np.asarray(path["eval_step"]) + offset
        for name in (k for k in path if k != "eval_step"):
            for step, value in zip(steps, path[name]):
                run.scalars({name: value}, step=int(step), prefix=f"{prefix}/path")
        offset = int(steps[-1]) if len(steps) else offset


def summarize(benchmark, method, runs, epochs, results, prefix=None):
    key = prefix or f"{benchmark}/{method}"
    for mode, suffix in (("class", ""), ("task", "task_incremental/")):
        summaries = [metrics.summarize(run[mode]) for run in runs]
        for name in summaries[0]:
            values = [s[name] for s in summaries]
            results[f"{key}/{suffix}{name}/mean"] = float(np.mean(values))
            results[f"{key}/{suffix}{name}/std"] = float(np.std(values))
        results[f"{key}/{suffix}R"] = [run[mode].tolist() for run in runs]
    results[f"{key}/wall_time_seconds"] = float(np.mean([run["wall_time"] for run in runs]))
    # The time spent recording the accuracy path (fip and finetune only), and the rest.
    eval_time = float(np.mean([run.get("eval_time", 0.0) for run in runs]))
    results[f"{key}/eval_time_seconds"] = eval_time
    results[f"{key}/train_time_seconds"] = results[f"{key}/wall_time_seconds"] - eval_time
    results[f"{key}/epochs"] = epochs
    results[f"{key}/num_seeds"] = len(runs)


def plot(benchmark, runs, methods, results, output_dir, memory_sizes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every task's accuracy along the FIP and along fine-tuning (Fig. 2C), first seed
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, style in (("fip", "-"), ("finetune", "--")):
        if method not in runs or not runs[method][0]["paths"]:
            continue
        offset, labelled = 0, set()
        for path in runs[method][0]["paths"]:
            steps = np.asarray(path["eval_step"]) + offset
            for name in sorted(k for k in path if k != "eval_step"):
                task = int(name.split("/")[0].split("_")[1])
                label = None if (method, task) in labelled else f"{method} task {task}"
                labelled.add((method, task))
                axis.plot(steps, path[name], style, color=f"C{task % 10}", label=label)
            offset = steps[-1]
    axis.set_xlabel("step (tasks in order)")
    axis.set_ylabel("test accuracy (class-incremental)")
    axis.set_title(f"{benchmark}: FIP (solid) vs fine-tuning (dashed)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, f"{benchmark}_path.png"), dpi=120)
    plt.close(figure)

    # Final per-task accuracy per method
    figure, axis = plt.subplots(figsize=(7, 4))
    num_tasks = len(runs[methods[0]][0]["class"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        means = [results[f"{benchmark}/{method}/task_{j}/accuracy/mean"] for j in range(num_tasks)]
        axis.bar(np.arange(num_tasks) + i * width, means, width, label=method)
    axis.set_xlabel("task")
    axis.set_ylabel("final test accuracy")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, f"{benchmark}_final.png"), dpi=120)
    plt.close(figure)

    # ACC against memory size
    if memory_sizes:
        figure, axis = plt.subplots(figsize=(5, 4))
        for method in ("fip", "replay", "agem"):
            values = [
                results.get(f"{benchmark}/memory_{size}/{method}/acc/mean") for size in memory_sizes
            ]
            if all(v is not None for v in values):
                axis.plot(memory_sizes, values, "o-", label=method)
        axis.set_xlabel("memory per task")
        axis.set_ylabel("ACC")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(output_dir, f"{benchmark}_memory.png"), dpi=120)
        plt.close(figure)


def digits_arrays(benchmark):
    """`--dataset=digits`: scikit-learn's digits stand in (quick runs and tests); for
    mnist_fmnist the second task is the digits with inverted intensities."""
    train, test = data.load("digits", "train"), data.load("digits", "test")
    if benchmark == "mnist_fmnist":
        return {
            "train": [train, (1.0 - train[0], train[1])],
            "test": [test, (1.0 - test[0], test[1])],
        }
    return {"train": train, "test": test}


def run_benchmark(benchmark, methods, seeds, settings, memory_sizes, results, run):
    max_train = FLAGS.max_train_examples or None
    arrays = None
    if not FLAGS["dataset"].using_default_value and FLAGS.dataset == "digits":
        arrays = digits_arrays(benchmark)
    results[f"{benchmark}/data"] = "digits" if arrays else "official"
    bench = data.build_benchmark(
        benchmark,
        FLAGS.data_dir,
        seed=0,
        max_train_examples=max_train,
        max_test_examples=FLAGS.max_test_examples or None,
        arrays=arrays,
    )
    results[f"{benchmark}/subset"] = bool(bench["subset"])
    results[f"{benchmark}/max_train_examples"] = max_train or 0
    memory = FLAGS.memory_per_task or MEMORY[benchmark]
    settings = dict(settings, memory_per_task=memory)
    results[f"{benchmark}/memory_per_task"] = memory
    state = {"first": {}, "run": run}
    for seed in seeds:
        start = time.perf_counter()
        train, _ = split_validation(bench, seed)
        with run.scope():
            state["first"][seed] = first_network(
                dict(bench, train=train),
                seed,
                settings["base_epochs"],
                settings["batch_size"],
                settings["learning_rate"],
            )
        results[f"{benchmark}/first_task/wall_time_seconds"] = time.perf_counter() - start
    results[f"{benchmark}/first_task/accuracy/mean"] = float(
        np.mean([metrics.task_accuracy(state["first"][s], *bench["test"][0]) for s in seeds])
    )
    runs = {}
    for method in methods:
        runs[method] = []
        for seed in seeds:
            runs[method].append(run_stream(method, bench, seed, settings, state))
            logging.info(
                "%s %s seed %d: ACC %.4f",
                benchmark,
                method,
                seed,
                metrics.average_accuracy(runs[method][-1]["class"]),
            )
        summarize(benchmark, method, runs[method], settings["epochs"], results)
    if "ewc_lambda" in state:
        results[f"{benchmark}/ewc/lambda"] = {str(k): v for k, v in state["ewc_lambda"].items()}
    if "ewc_lambda_scores" in state:
        results[f"{benchmark}/ewc/lambda_validation_accuracy"] = {
            str(k): v for k, v in state["ewc_lambda_scores"].items()
        }
    for size in memory_sizes:
        for method in ("fip", "replay", "agem"):
            sized = dict(settings, memory_per_task=size)
            sized_runs = [run_stream(method, bench, seed, sized, state) for seed in seeds]
            summarize(
                benchmark,
                method,
                sized_runs,
                settings["epochs"],
                results,
                prefix=f"{benchmark}/memory_{size}/{method}",
            )
    plot(benchmark, runs, methods, results, run.output_dir, memory_sizes)


def main(argv):
    del argv
    methods = [
        common.check_choice(m, "methods", METHODS) for m in _value("methods", list(DEFAULT_METHODS))
    ]
    benchmarks = [common.check_choice(b, "benchmarks", data.BENCHMARKS) for b in FLAGS.benchmarks]
    seeds = [int(s) for s in _value("seeds", ["0", "1", "2"])]
    memory_sizes = [int(s) for s in FLAGS.memory_sizes]
    if FLAGS.ewc_lambda != "auto":
        float(FLAGS.ewc_lambda)
    # ContinualLearn's own arguments only when set on the command line.
    fip_options = {}
    if FLAGS.fip_beta != "auto":
        fip_options["beta"] = float(FLAGS.fip_beta)
    if not FLAGS["fip_step_rule"].using_default_value:
        fip_options["rule"] = FLAGS.fip_step_rule
    if FLAGS.fip_learning_rate is not None:
        if fip_options.get("rule", "penalty") != "penalty":
            raise ValueError(
                "`--fip_learning_rate` is the `penalty` rule's. Received: "
                f"fip_learning_rate={FLAGS.fip_learning_rate}, fip_step_rule={fip_options['rule']}"
            )
        rate = FLAGS.fip_learning_rate
        fip_options["learning_rate"] = rate if rate == "auto" else float(rate)
    swept = ["fip", "replay", "agem"] if memory_sizes else []
    run = common.start(
        "continual",
        unsupported=common.single_device_parts(methods + swept, SINGLE_DEVICE),
        resumable=True,
    )
    output_dir = run.output_dir
    settings = {
        "epochs": _value("epochs", DEFAULT_EPOCHS),
        "base_epochs": FLAGS.continual_base_epochs,
        "batch_size": FLAGS.batch_size,
        "learning_rate": FLAGS.learning_rate,
        "fip_options": fip_options,
        "ewc_lambda": "auto" if FLAGS.ewc_lambda == "auto" else float(FLAGS.ewc_lambda),
        "resume": FLAGS.resume,
        "checkpoint_every": FLAGS.checkpoint_every,
    }
    common.write_json(
        output_dir,
        "config.json",
        {
            **settings,
            "methods": methods,
            "benchmarks": benchmarks,
            "seeds": seeds,
            "memory_per_task": FLAGS.memory_per_task,
            "memory_sizes": memory_sizes,
            "max_train_examples": FLAGS.max_train_examples,
            "data_dir": FLAGS.data_dir,
        },
    )
    results = {"fip_options": fip_options}
    start = time.perf_counter()
    for benchmark in benchmarks:
        run_benchmark(benchmark, methods, seeds, settings, memory_sizes, results, run)
        common.write_json(output_dir, "results.json", results)
    results["wall_time_seconds"] = time.perf_counter() - start
    common.write_json(output_dir, "results.json", results)
    if run.is_chief:  # Finished: the walks' checkpoints are not needed any more.
        shutil.rmtree(os.path.join(run.shared_output_dir, "checkpoints"), ignore_errors=True)
    run.close()
    return results


if __name__ == "__main__":
    app.run(lambda argv: main(argv) and None)  # The results are for callers, not the exit code.
