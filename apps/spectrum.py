r"""Spectra of the metric tensor g of trained MNIST networks (Fig. 2A of the resilience paper).

For each network (MLP-1, LeNet-300-100 and cnn5 by default; trained base networks from
`keras_fip.models.base_network`, cached), the metric g = (1/N) Σ_x J_xᵀ J_x of its logits
on the first `--spectrum_num_inputs` training inputs is measured matrix-free:

- the eigenvalues: all N·C non-zero ones, exactly, from the Gram matrix (1/N) J Jᵀ when the
  Jacobian fits in `--spectrum_max_gram_entries` entries; the top `--spectrum_top_k` ones by
  Lanczos otherwise (and always, as a check);
- ρ, the fraction of the n weight-space directions with eigenvalue ≥ `--spectrum_threshold`
  (exact count from the Gram spectrum when available, else stochastic Lanczos quadrature;
  the SLQ estimate is always reported too, as `rho_slq`). rank(g) ≤ N·C, so ρ ≤ N·C/n:
  `vulnerable_over_rank_bound` near 1 says ρ is capped by N, not by the network;
- trace(g) by Hutch++ (and exactly from the Gram matrix when available), and the expected
  squared output change under a random weight perturbation with E‖δw‖² = 1, (1/n)·trace(g).

Writes `config.json`, `results.json` (keys like `"lenet_300_100/rho"`,
`"lenet_300_100/trace"`) and `eigenvalues.png` to `--output_dir`.

Example:

    python -m apps.spectrum --output_dir=runs/spectrum
    python -m apps.spectrum --spectrum_models=lenet_300_100 --spectrum_num_inputs=200

`--strategy=mirrored|multi_worker|tpu` builds the networks and runs the products g·v in
that strategy (the inputs are split across the replicas; the exact Gram spectrum's dense
Jacobian runs on a one-device copy); TensorBoard scalars (ρ, trace,
the top eigenvalues against their rank) go to `<output_dir>/logs`.
"""

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from apps import common  # noqa: E402
from keras_fip import data  # noqa: E402
from keras_fip import geometry  # noqa: E402
from keras_fip import models  # noqa: E402
from keras_fip.engine import copy_model  # noqa: E402

# Networks
flags.DEFINE_list(
    "spectrum_models",
    ["mlp", "lenet_300_100", "cnn5"],
    "Zoo networks whose metric spectrum is measured.",
)

# Metric
flags.DEFINE_integer(
    "spectrum_num_inputs", 100, "N: training inputs over which g is averaged.", lower_bound=1
)
flags.DEFINE_float(
    "spectrum_threshold",
    1e-3,
    "Eigenvalue at or above which a direction counts as vulnerable.",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "spectrum_max_gram_entries",
    2**28,
    "Largest Jacobian (N·C x n entries) held in memory for the exact Gram spectrum.",
    lower_bound=1,
)

# Estimators
flags.DEFINE_integer("spectrum_top_k", 20, "Top eigenvalues computed by Lanczos.", lower_bound=1)
flags.DEFINE_integer(
    "spectrum_trace_samples", 100, "Products g·v for the Hutch++ trace.", lower_bound=3
)
flags.DEFINE_integer(
    "spectrum_slq_probes", 5, "Stochastic Lanczos quadrature probes.", lower_bound=1
)
flags.DEFINE_integer("spectrum_slq_steps", 60, "Lanczos steps per SLQ probe.", lower_bound=2)

FLAGS = flags.FLAGS

CONFIG_FLAGS = (
    "spectrum_models",
    "spectrum_num_inputs",
    "spectrum_threshold",
    "spectrum_max_gram_entries",
    "spectrum_top_k",
    "spectrum_trace_samples",
    "spectrum_slq_probes",
    "spectrum_slq_steps",
    "dataset",
    "data_dir",
    "epochs",
    "batch_size",
    "learning_rate",
    "seed",
    "cache_dir",
    "strategy",
    "tpu",
)


@flags.validator("spectrum_models", message="--spectrum_models must name zoo models.")
def _check_models(names):
    return bool(names) and all(name in models.BUILDERS for name in names)


def measure(
    model,
    inputs,
    threshold,
    max_gram_entries,
    top_k,
    trace_samples,
    slq_probes,
    slq_steps,
    seed,
    gram_model=None,
):
    """The spectrum measurements of one network's metric; returns (results, eigenvalues).

    `gram_model` is the network whose dense Jacobian gives the exact Gram spectrum (a
    one-device copy of `model` when `model` lives in a distributed strategy: the dense
    Jacobian is a one-device computation); `None` uses `model`."""
    metric = geometry.MetricOperator(model, inputs)
    num_rows = metric.num_examples * metric.num_outputs()
    top = geometry.top_eigenpairs(metric, k=min(top_k, metric.num_params - 1), tol=1e-6, seed=seed)
    results = {
        "num_params": metric.num_params,
        "rank_bound": min(num_rows, metric.num_params),
        "top_eigenvalues": top.values.tolist(),
        "top_k_matvecs": top.num_matvecs,
        "trace": geometry.trace(metric, trace_samples, seed=seed),
        "expected_change_unit_perturbation": geometry.expected_perturbation_change(
            metric, 1.0, trace_samples, seed=seed
        ),
        "rho_slq": geometry.vulnerable_fraction(
            metric, threshold, method="slq", num_probes=slq_probes, num_steps=slq_steps, seed=seed
        ),
    }
    eigenvalues = top.values
    if num_rows * metric.num_params <= max_gram_entries:
        exact = metric if gram_model is None else geometry.MetricOperator(gram_model, inputs)
        eigenvalues = np.sort(np.linalg.eigvalsh(exact.gram(max_gram_entries)))[::-1]
        results["rho"] = float(np.sum(eigenvalues >= threshold) / metric.num_params)
        results["rho_method"] = "gram"
        results["trace_exact"] = float(np.sum(eigenvalues))
        results["num_vulnerable"] = int(np.sum(eigenvalues >= threshold))
        results["gram_top_eigenvalues"] = eigenvalues[: top.values.size].tolist()
    else:
        results["rho"] = results["rho_slq"]
        results["rho_method"] = "slq"
    # ρ·n / min(N·C, n): near 1 means ρ is capped by the rank of g, i.e. by N.
    results["vulnerable_over_rank_bound"] = (
        results["rho"] * metric.num_params / results["rank_bound"]
    )
    return results, eigenvalues


def plot(spectra, threshold, path):
    """Eigenvalues of g, largest first, one curve per network (log scale)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (eigenvalues, rho) in spectra.items():
        positive = eigenvalues[eigenvalues > 0]
        axis.loglog(np.arange(1, positive.size + 1), positive, label=f"{name} (ρ={rho:.2e})")
    axis.axhline(threshold, color="gray", linestyle="--", label=f"threshold {threshold:g}")
    axis.set_xlabel("eigenvalue rank")
    axis.set_ylabel("eigenvalue of g")
    axis.set_title("Metric tensor spectrum (MNIST)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv):
    del argv  # Unused.
    run = common.start("spectrum")
    output_dir = run.output_dir
    common.write_json(output_dir, "config.json", common.flag_values(CONFIG_FLAGS))
    x_train, _ = data.load(FLAGS.dataset, "train", FLAGS.data_dir)
    inputs = x_train[: FLAGS.spectrum_num_inputs]
    results = {"num_inputs": int(inputs.shape[0]), "threshold": FLAGS.spectrum_threshold}
    spectra = {}
    for name in FLAGS.spectrum_models:
        # Trained base network (cached)
        model, base = run.base_network(
            name,
            FLAGS.dataset,
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            learning_rate=FLAGS.learning_rate,
            seed=FLAGS.seed,
            data_dir=FLAGS.data_dir,
            cache_dir=FLAGS.cache_dir,
        )
        # Spectrum of its metric
        start = time.perf_counter()
        # The exact Gram spectrum's dense Jacobian runs on one device: a plain copy.
        gram_model = None if FLAGS.strategy == "default" else copy_model(model)
        with run.scope():
            measured, eigenvalues = measure(
                model,
                inputs,
                FLAGS.spectrum_threshold,
                FLAGS.spectrum_max_gram_entries,
                FLAGS.spectrum_top_k,
                FLAGS.spectrum_trace_samples,
                FLAGS.spectrum_slq_probes,
                FLAGS.spectrum_slq_steps,
                FLAGS.seed,
                gram_model=gram_model,
            )
        measured["seconds"] = time.perf_counter() - start
        measured["test_accuracy"] = base["test/accuracy"]
        results.update({f"{name}/{key}": value for key, value in measured.items()})
        spectra[name] = (eigenvalues, measured["rho"])
        # TensorBoard: the scalars, and the eigenvalues against their rank (step).
        run.scalars(measured, prefix=name)
        for rank, value in enumerate(measured["top_eigenvalues"], start=1):
            run.scalars({"top_eigenvalue": value}, step=rank, prefix=name)
        print(
            f"{name}: n={measured['num_params']} rho={measured['rho']:.3e} "
            f"({measured['rho_method']}; SLQ {measured['rho_slq']:.3e}) "
            f"trace={measured['trace']:.4g} in {measured['seconds']:.1f} s"
        )
        if measured["vulnerable_over_rank_bound"] > 0.95:
            print(
                f"  {name}: every direction g can see is vulnerable; rho is capped by "
                "rank(g) <= N·C: raise --spectrum_num_inputs for the network's own rho."
            )
    plot(spectra, FLAGS.spectrum_threshold, f"{output_dir}/eigenvalues.png")
    common.write_json(output_dir, "results.json", results)
    run.close()


if __name__ == "__main__":
    common.run(
        main,
        shared=common.TRAINING_FLAGS,
    )
