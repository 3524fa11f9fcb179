r"""Resilience of trained networks: the weight-space adversary, node deletion, fault tables.

Three experiment families of the resilience and damage-rescue papers, on base networks from
`keras_fip.models.base_network` (trained once, cached), all damage from `keras_fip.Damage`
with the fault models of `keras_fip.faults`:

- `vulnerability` (Fig. 2B-E): for LeNet-300-100 on `--dataset` (MNIST), `--resilience_directions`
  random unit-norm weight perturbations (Gaussian directions, `--resilience_norm`) against
  the eigen perturbation of the same norm, `keras_fip.Damage(keras_fip.faults.Eigen(norm=...),
  data=x_train[:--resilience_metric_examples])` with the fault's defaults (inputs only: the
  top eigenvectors of g on the log-probabilities, mixed by the loss ascent of the undamaged
  predictions; `--resilience_num_eigenpairs` and `--resilience_mixing` override them): test
  accuracy of the network it returns (`eigen/test/accuracy`) and of the opposite
  perturbation (`eigen/minus/...`; histogram), ρ (SLQ), and the second-order prediction
  δᵀ g δ against the measured mean squared change (scatter: logits for the random
  directions, log-probabilities for the eigen one, as Damage measures g). The same for
  `--resilience_cifar_models` (cnn5; add VGG-11 with `--resilience_vgg`) on
  `--resilience_cifar_dataset` — on machines without the full CIFAR-10 that is the local
  4,000/1,000-image subset, and the results say so (`<model>/dataset/subset`).
- `deletion` (Fig. 3): MLP-1 (784-`--resilience_mlp_width`-10) with 0-100% of its hidden units
  deleted in `--resilience_deletion_step` steps, `--resilience_deletion_seeds` deletion
  orders (nested sets per order): test accuracy mean ± std, the knee of the accuracy curve
  (Kneedle) and the break-down speed and acceleration of the deletion process
  (`geometry.deletion_profile`: at each network, the expected squared change of the
  `--resilience_path_outputs` on `--resilience_path_examples` inputs when one more unit is
  deleted, per unit of deleted fraction, and its finite difference ds/dt, Eq. 11 with its
  sign restored), with where the mean acceleration peaks. The speeds of the sequence's own
  segments (second-order, `geometry.breakdown_profile`; energy = Eq. 6 without square root)
  are reported beside it under `mlp1/segment/...`. Then `--resilience_layer_models` layer by
  layer (each hidden layer's fraction deleted alone).
- `faults`: on `--resilience_fault_model`, bit flips by class (any/sign/exponent/mantissa
  float32 bits, int8 any/sign) and count, Gaussian perturbations by norm, weight zeroing by
  fraction: test accuracy mean ± std over `--resilience_fault_seeds` seeds. Bit flips are an
  extension beyond the papers (PyTorchFI/TensorFI2 fault names).

Accuracy of thousands of perturbed networks is measured by assigning weights into one working
copy and one `tf.function` over the evaluation set: no model is rebuilt per perturbation.

Writes `config.json`, `results.json` (flat keys such as
`"lenet_300_100/random/test/accuracy/min"`, `"lenet_300_100/eigen/test/accuracy"`,
`"mlp1/nodes/0.8/test/accuracy/mean"`, `"mlp1/knee"`), `provenance.json`, `summary.json` (the
results page's table of the `vulnerability` part) and `vulnerability.png`, `prediction.png`,
`deletion.png`, `layers.png`, `faults.png` to `--output_dir`.

Example:

    python -m apps.resilience --output_dir=runs/resilience
    python -m apps.resilience --resilience_parts=vulnerability --resilience_vgg

`--strategy=mirrored|multi_worker|tpu` builds (trains) the networks in that strategy and
runs every part in its scope: the eigen adversary's loss gradient and the metric products
of the scatter, the expected change and ρ split their batches over the replicas and equal
one device's to rounding (`tests/apps/test_resilience.py`); the accuracy evaluations of
the perturbed networks run on one device (a `tf.function` per evaluator). TensorBoard
scalars (accuracies, ρ, the deletion curve against the deleted percent) go to
`<output_dir>/logs`.
"""

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import keras_fip  # noqa: E402
from apps import common  # noqa: E402
from keras_fip import data  # noqa: E402
from keras_fip import geometry  # noqa: E402
from keras_fip import models  # noqa: E402

PARTS = ("vulnerability", "deletion", "faults")
# Parts that cannot run under a distributed `--strategy` (`common.start` refuses them): none.
SINGLE_DEVICE = {}
_RUN = {}  # {"run": common.Run} while main runs (the base networks' strategy and cache).

# Experiments
flags.DEFINE_list("resilience_parts", list(PARTS), f"Experiment families, among {PARTS}.")
flags.DEFINE_integer(
    "resilience_eval_examples",
    None,
    "Test examples evaluated (default: the whole test split).",
    lower_bound=1,
)

# Vulnerability
flags.DEFINE_list("resilience_mnist_models", ["lenet_300_100"], "Zoo networks on --dataset.")
flags.DEFINE_list(
    "resilience_cifar_models", ["cnn5"], "Zoo networks on --resilience_cifar_dataset."
)
flags.DEFINE_bool(
    "resilience_vgg",
    False,
    "Also run VGG-11 (vulnerability on the CIFAR set, and layer-by-layer deletion).",
)
flags.DEFINE_float("resilience_vgg_width", 0.5, "Width multiplier of VGG-11.", lower_bound=0.0)
flags.DEFINE_string("resilience_cifar_dataset", "cifar10", "Dataset of the CIFAR networks.")
flags.DEFINE_integer(
    "resilience_cifar_epochs", 20, "Training epochs of the CIFAR networks.", lower_bound=1
)
flags.DEFINE_integer(
    "resilience_directions",
    1000,
    "Random unit-norm directions per --dataset network.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "resilience_cifar_directions", 100, "Random directions per CIFAR network.", lower_bound=1
)
flags.DEFINE_float(
    "resilience_norm", 1.0, "Norm of the random and eigen perturbations.", lower_bound=0.0
)
flags.DEFINE_integer(
    "resilience_num_eigenpairs",
    None,
    "Override of `Eigen(num_eigenpairs=...)`, the top eigenvectors of g the eigen "
    "perturbation mixes (default: the fault's).",
    lower_bound=1,
)
flags.DEFINE_enum(
    "resilience_mixing",
    None,
    ["ascent", "equal", "sqrt"],
    "Override of `Eigen(mixing=...)`, the eigenvectors' mixing (default: the fault's).",
)
flags.DEFINE_integer(
    "resilience_metric_examples", 1000, "Training inputs over which g is averaged.", lower_bound=1
)
flags.DEFINE_integer(
    "resilience_scatter_directions",
    100,
    "Random directions whose δᵀgδ is computed for the prediction scatter.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "resilience_rho_examples", 200, "Inputs of the metric whose ρ is estimated.", lower_bound=1
)
flags.DEFINE_integer("resilience_rho_probes", 4, "SLQ probes for ρ.", lower_bound=1)
flags.DEFINE_integer("resilience_rho_steps", 40, "SLQ Lanczos steps for ρ.", lower_bound=2)

# Deletion
flags.DEFINE_integer("resilience_mlp_width", 400, "Hidden units of MLP-1.", lower_bound=1)
flags.DEFINE_float(
    "resilience_deletion_step",
    0.05,
    "Step of the deleted fraction.",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_integer("resilience_deletion_seeds", 10, "Deletion orders of MLP-1.", lower_bound=1)
flags.DEFINE_integer(
    "resilience_path_examples",
    500,
    "Training inputs on which the break-down speed is measured.",
    lower_bound=1,
)
flags.DEFINE_enum(
    "resilience_path_outputs",
    "probabilities",
    ["logits", "probabilities"],
    "Outputs whose metric measures the break-down speed: on logits a deleted "
    "unit's change is the same wherever it is deleted (MLP-1's logits are a "
    "sum over units), on probabilities it grows as the margins shrink.",
)
flags.DEFINE_list(
    "resilience_layer_models",
    ["lenet_300_100"],
    "Networks deleted layer by layer (VGG-11 is added by --resilience_vgg).",
)
flags.DEFINE_float(
    "resilience_layer_step",
    0.1,
    "Step of the per-layer deleted fraction.",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_integer("resilience_layer_seeds", 3, "Deletion orders per layer.", lower_bound=1)

# Faults
flags.DEFINE_string("resilience_fault_model", "lenet_300_100", "Network of the fault table.")
flags.DEFINE_list("resilience_bit_counts", ["1", "10", "100"], "Bits flipped.")
flags.DEFINE_list("resilience_gaussian_norms", ["0.5", "1", "2", "4", "8"], "Gaussian norms.")
flags.DEFINE_list(
    "resilience_zero_fractions",
    ["0.1", "0.3", "0.5", "0.7", "0.9"],
    "Fractions of kernel entries zeroed.",
)
flags.DEFINE_integer("resilience_fault_seeds", 5, "Seeds per fault.", lower_bound=1)

FLAGS = flags.FLAGS
BIT_CLASSES = (
    ("any", None, "float32"),
    ("sign", "sign", "float32"),
    ("exponent", "exponent", "float32"),
    ("mantissa", "mantissa", "float32"),
    ("int8_any", None, "int8"),
    ("int8_sign", "sign", "int8"),
)


class Evaluator:
    """Test accuracy (and logits on probe inputs) of many weight settings of one network.

    Weights are assigned into one working copy; one `tf.function` runs the evaluation set
    in batches, so nothing is retraced or rebuilt per perturbation.
    """

    def __init__(self, model, x, y, probe=None, batch_size=2000):
        self.model = keras_fip.engine.copy_model(model)
        self.variables = list(self.model.trainable_variables)
        self.base = [v.numpy() for v in self.variables]
        self.everything = model.get_weights()
        inputs, labels = tf.constant(x), tf.constant(np.asarray(y, np.int64))
        count, size = int(x.shape[0]), int(batch_size)

        @tf.function
        def accuracy():
            correct = tf.constant(0, tf.int64)
            for start in tf.range(0, count, size):
                logits = self.model(inputs[start : start + size], training=False)
                predicted = tf.argmax(logits, axis=-1)
                correct += tf.reduce_sum(
                    tf.cast(predicted == labels[start : start + size], tf.int64)
                )
            return tf.cast(correct, tf.float64) / count

        self._accuracy = accuracy
        if probe is not None:
            probe_inputs = tf.constant(probe)
            self._probe = tf.function(lambda: self.model(probe_inputs, training=False))

    def set_weights(self, weights):
        """All weights (`model.get_weights()` order)."""
        self.model.set_weights(weights)

    def perturb(self, perturbation):
        """Trainable weights = base + perturbation (a list aligned with them)."""
        for variable, base, delta in zip(self.variables, self.base, perturbation):
            variable.assign((base + delta).astype(base.dtype))

    def accuracy(self):
        return float(self._accuracy())

    def probe(self):
        return self._probe().numpy()

    def reset(self):
        self.model.set_weights(self.everything)


def _stats(prefix, values):
    values = np.asarray(values, dtype=np.float64)
    return {
        f"{prefix}/mean": float(np.mean(values)),
        f"{prefix}/std": float(np.std(values)),
        f"{prefix}/min": float(np.min(values)),
        f"{prefix}/max": float(np.max(values)),
    }


def _key(value):
    return f"{round(float(value), 4):g}"


def _network(name, dataset, epochs):
    kwargs = {}
    if name == "mlp1":
        name, kwargs = "mlp", {"hidden_units": FLAGS.resilience_mlp_width}
    if name == "vgg11":
        kwargs = {"width_multiplier": FLAGS.resilience_vgg_width}
    network = _RUN["run"].base_network if _RUN else models.base_network
    return network(
        name,
        dataset,
        epochs=epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
        **kwargs,
    )


def _splits(dataset):
    x_train, y_train = data.load(dataset, "train", FLAGS.data_dir)
    x_test, y_test = data.load(dataset, "test", FLAGS.data_dir)
    if FLAGS.resilience_eval_examples:
        x_test, y_test = (
            x_test[: FLAGS.resilience_eval_examples],
            y_test[: FLAGS.resilience_eval_examples],
        )
    return x_train, y_train, x_test, y_test


# Vulnerability (Fig. 2B-E)


def vulnerability(name, dataset, epochs, num_directions):
    """Random unit-norm directions vs the eigen adversary on one network."""
    model, base = _network(name, dataset, epochs)
    x_train, y_train, x_test, y_test = _splits(dataset)
    probe = x_train[: FLAGS.resilience_metric_examples]
    evaluator = Evaluator(model, x_test, y_test, probe=probe)
    clean, reference = evaluator.accuracy(), evaluator.probe()
    norm = FLAGS.resilience_norm
    metric = geometry.MetricOperator(model, probe)
    results = {
        "test/accuracy": clean,
        "dataset/subset": base["dataset/subset"],
        "num_params": metric.num_params,
    }

    # The eigen adversary: the fault's defaults on the training inputs (no labels), and
    # the opposite perturbation beside it
    start = time.perf_counter()
    overrides = {
        name: value
        for name, value in (
            ("num_eigenpairs", FLAGS.resilience_num_eigenpairs),
            ("mixing", FLAGS.resilience_mixing),
        )
        if value is not None
    }
    fault = keras_fip.faults.Eigen(norm=norm, **overrides)
    adversary = keras_fip.Damage(fault, data=probe, seed=FLAGS.seed)
    attacked = adversary(model)
    record = adversary.history
    perturbation = keras_fip.damage_reference(attacked).perturbation(attacked)
    results["eigen/seconds"] = time.perf_counter() - start
    results["eigen/num_matvecs"] = record["num_matvecs"]
    results["eigen/top_eigenvalues"] = record["eigenvalues"]
    eigen = {}
    for label, sign in (("plus", 1.0), ("minus", -1.0)):
        evaluator.perturb([sign * p for p in perturbation])
        eigen[label] = (evaluator.accuracy(),)
        results[f"eigen/{label}/test/accuracy"] = eigen[label][0]
    results["eigen/test/accuracy"] = eigen["plus"][0]  # The network Damage returns.
    results["eigen/test/accuracy_drop"] = clean - results["eigen/test/accuracy"]
    # Both on the log-probabilities, which Damage's g is measured on.
    results["eigen/predicted_change"] = record["predicted_change"]
    results["eigen/measured_change"] = record["measured_change"]

    # Random unit-norm directions
    rng = np.random.default_rng(FLAGS.seed)
    accuracies, scatter, measured = [], [], []
    start = time.perf_counter()
    for index in range(num_directions):
        direction = [rng.standard_normal(v.shape) for v in evaluator.variables]
        scale = norm / np.sqrt(sum(np.sum(d**2) for d in direction))
        direction = [d * scale for d in direction]
        evaluator.perturb(direction)
        accuracies.append(evaluator.accuracy())
        if index < FLAGS.resilience_scatter_directions:
            scatter.append(metric.flatten(direction))
            measured.append(float(np.mean(np.sum((evaluator.probe() - reference) ** 2, 1))))
    evaluator.reset()
    predicted = []
    if scatter:  # δwᵀ g δw at the unperturbed point, the quadratic forms in blocks.
        predicted = [float(value) for value in metric.quadratic_form(np.stack(scatter, axis=1))]
    results["random/seconds"] = time.perf_counter() - start
    results["random/num_directions"] = num_directions
    results.update(_stats("random/test/accuracy", accuracies))
    results["random/test/max_drop"] = clean - float(np.min(accuracies))
    if predicted:
        results.update(_stats("random/predicted_change", predicted))
        results.update(_stats("random/measured_change", measured))
    results["expected_change"] = geometry.expected_perturbation_change(
        metric, norm=norm, num_samples=30, seed=FLAGS.seed
    )

    # ρ, the fraction of vulnerable directions
    small = geometry.MetricOperator(model, x_train[: FLAGS.resilience_rho_examples])
    results["rho"] = geometry.vulnerable_fraction(
        small,
        method="slq",
        num_probes=FLAGS.resilience_rho_probes,
        num_steps=FLAGS.resilience_rho_steps,
        seed=FLAGS.seed,
    )
    figures = {
        "accuracies": accuracies,
        "clean": clean,
        "eigen": eigen,
        "predicted": predicted,
        "measured": measured,
        "eigen_predicted": record["predicted_change"],
        "eigen_measured": record["measured_change"],
    }
    return results, figures


def vulnerability_page(results, names):
    """The results page's `summary.json` of the `vulnerability` part's `results`."""
    rows = []
    for name in names:
        rows.append(
            [
                name,
                round(100 * results[f"{name}/test/accuracy"], 2),
                round(100 * results[f"{name}/eigen/test/accuracy"], 2),
                round(100 * results[f"{name}/random/test/accuracy/min"], 2),
                round(100 * results[f"{name}/random/test/accuracy/mean"], 2),
                results[f"{name}/random/num_directions"],
                results[f"{name}/eigen/num_matvecs"],
            ]
        )
    return {
        "title": "Resilience: the weight-space adversary against random directions",
        "description": (
            'Test accuracy (%) of the undamaged network, of `keras_fip.Damage("eigen")` '
            f"(norm {FLAGS.resilience_norm:g}, inputs only, g on "
            f"{FLAGS.resilience_metric_examples} training inputs) and of random directions "
            f"of the same norm (seed {FLAGS.seed})."
        ),
        "tables": [
            {
                "caption": "Test accuracy (%) under perturbations of one norm",
                "columns": [
                    "network",
                    "undamaged",
                    "eigen",
                    "random (min)",
                    "random (mean)",
                    "directions",
                    "metric products",
                ],
                "rows": rows,
                "headline": [0],
            }
        ],
    }


# Node deletion (Fig. 3)


def deletion(dataset, epochs):
    """MLP-1 deleted from 0 to 100%: accuracy, break-down speed/acceleration, knee."""
    model, _ = _network("mlp1", dataset, epochs)
    x_train, _, x_test, y_test = _splits(dataset)
    path_inputs = x_train[: FLAGS.resilience_path_examples]
    evaluator = Evaluator(model, x_test, y_test)
    fractions = np.round(np.arange(0.0, 1.0 + 1e-9, FLAGS.resilience_deletion_step), 6)
    outputs = FLAGS.resilience_path_outputs
    curves, speeds, accelerations, knees, peaks = [], [], [], [], []
    segment_accelerations, segment_peaks, energies = [], [], []
    for seed in range(FLAGS.resilience_deletion_seeds):
        sequence = geometry.deletion_sequence(model, fractions, seed=seed)
        accuracy = []
        for damaged in sequence:
            evaluator.set_weights(damaged.get_weights())
            accuracy.append(evaluator.accuracy())
        # The deletion process's speed (expected over the next unit) and its derivative
        profile = geometry.deletion_profile(sequence, path_inputs, fractions, outputs=outputs)
        # The speeds of the sequence's own segments (second order, per Δt²), for comparison
        segments = geometry.breakdown_profile(
            sequence, path_inputs, times=fractions, outputs=outputs
        )
        curves.append(accuracy)
        speeds.append(profile["speed"])
        accelerations.append(profile["acceleration"])
        knees.append(geometry.knee(fractions, accuracy))
        peaks.append(float(profile["acceleration_times"][np.argmax(profile["acceleration"])]))
        segment_accelerations.append(segments["acceleration"])
        segment_peaks.append(
            float(segments["acceleration_times"][np.argmax(segments["acceleration"])])
        )
        energies.append(segments["energy"])
    curves = np.array(curves)
    results = {"mlp1/test/accuracy": curves[0, 0], "mlp1/deletion_seeds": len(knees)}
    for index, fraction in enumerate(fractions):
        results.update(
            {
                key: value
                for key, value in _stats(
                    f"mlp1/nodes/{_key(fraction)}/test/accuracy", curves[:, index]
                ).items()
                if key.endswith(("/mean", "/std"))
            }
        )
    knee_of_mean = geometry.knee(fractions, curves.mean(0))
    results["mlp1/knee"] = float(np.mean(knees))
    results["mlp1/knee_of_mean_curve"] = knee_of_mean
    results["mlp1/knee/std"] = float(np.std(knees))
    results["mlp1/knee/per_seed"] = knees
    # Every order has survivors up to the last fraction below 1: equal lengths.
    length = min(len(a) for a in accelerations)
    mean_acceleration = np.mean([a[:length] for a in accelerations], axis=0)
    acceleration_times = profile["acceleration_times"][:length]
    peak = float(acceleration_times[np.argmax(mean_acceleration)])
    results["mlp1/max_acceleration_at"] = peak
    results["mlp1/max_acceleration_minus_knee"] = peak - knee_of_mean
    results["mlp1/max_acceleration_minus_mean_knee"] = peak - float(np.mean(knees))
    results["mlp1/max_acceleration_at/per_seed"] = peaks
    distances = np.abs(np.array(peaks) - np.array(knees))
    results["mlp1/max_acceleration_minus_knee/per_seed_max_abs"] = float(np.max(distances))
    results["mlp1/max_acceleration_within_10_points/per_seed_count"] = int(
        np.sum(distances <= 0.1 + 1e-9)
    )
    results["mlp1/breakdown_speed/mean"] = np.mean(
        [s[: length + 1] for s in speeds], axis=0
    ).tolist()
    results["mlp1/breakdown_speed/times"] = profile["speed_times"][: length + 1].tolist()
    results["mlp1/breakdown_acceleration/mean"] = mean_acceleration.tolist()
    results["mlp1/breakdown_acceleration/times"] = acceleration_times.tolist()
    segment_mean = np.mean(segment_accelerations, axis=0)
    results["mlp1/segment/max_acceleration_at"] = float(
        segments["acceleration_times"][np.argmax(segment_mean)]
    )
    results["mlp1/segment/max_acceleration_at/per_seed"] = segment_peaks
    results["mlp1/path_energy/mean"] = float(np.mean(energies))
    figure = {
        "fractions": fractions,
        "curves": curves,
        "speeds": np.array([s[: length + 1] for s in speeds]),
        "speed_times": profile["speed_times"][: length + 1],
        "accelerations": np.array([a[:length] for a in accelerations]),
        "acceleration_times": acceleration_times,
        "knees": knees,
        "peaks": peaks,
        "knee_of_mean": knee_of_mean,
        "peak": peak,
    }
    return results, figure


def layer_by_layer(name, dataset, epochs):
    """Each hidden layer's units deleted alone, fraction by fraction."""
    model, _ = _network(name, dataset, epochs)
    _, _, x_test, y_test = _splits(dataset)
    evaluator = Evaluator(model, x_test, y_test)
    fractions = np.round(np.arange(0.0, 1.0 + 1e-9, FLAGS.resilience_layer_step), 6)
    results, figure = {}, {"fractions": fractions}
    for layer in keras_fip.operations.hidden_units(model):
        curves = []
        for seed in range(FLAGS.resilience_layer_seeds):
            sequence = geometry.deletion_sequence(
                model, fractions, seed=seed, scope="per_layer", layers=[layer]
            )
            curve = []
            for damaged in sequence:
                evaluator.set_weights(damaged.get_weights())
                curve.append(evaluator.accuracy())
            curves.append(curve)
        mean = np.mean(curves, axis=0)
        for fraction, value, spread in zip(fractions, mean, np.std(curves, axis=0)):
            results[f"{name}/nodes/{layer}/{_key(fraction)}/test/accuracy/mean"] = value
            results[f"{name}/nodes/{layer}/{_key(fraction)}/test/accuracy/std"] = spread
        results[f"{name}/nodes/{layer}/knee"] = geometry.knee(fractions, mean)
        kept = fractions[mean >= mean[0] - 0.05]
        results[f"{name}/nodes/{layer}/max_fraction_within_5pp"] = float(kept.max())
        figure[layer] = mean
    return results, figure


# Fault table


def fault_table(name, dataset, epochs):
    """Bit flips by class and count, Gaussian norms, weight zeroing: accuracy mean ± std."""
    model, _ = _network(name, dataset, epochs)
    _, _, x_test, y_test = _splits(dataset)
    evaluator = Evaluator(model, x_test, y_test)
    seeds = range(FLAGS.resilience_fault_seeds)

    def measure(fault):
        values = []
        for seed in seeds:
            damaged = keras_fip.Damage(fault, seed=seed)(model)
            evaluator.set_weights(damaged.get_weights())
            values.append(evaluator.accuracy())
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    table = {}
    for label, bits, bit_format in BIT_CLASSES:
        for count in FLAGS.resilience_bit_counts:
            table[f"bitflip/{label}/{int(count)}"] = measure(
                keras_fip.faults.BitFlips(int(count), bits=bits, format=bit_format)
            )
    for norm in FLAGS.resilience_gaussian_norms:
        table[f"gaussian/{_key(norm)}"] = measure(keras_fip.faults.Gaussian(float(norm)))
    for fraction in FLAGS.resilience_zero_fractions:
        table[f"weights/{_key(fraction)}"] = measure(keras_fip.faults.Weights(float(fraction)))
    results = {}
    for key, value in table.items():
        results[f"{name}/{key}/test/accuracy/mean"] = value["mean"]
        results[f"{name}/{key}/test/accuracy/std"] = value["std"]
    return results, table


# Plots


def plot_vulnerability(figures, output_dir):
    names = list(figures)
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        info = figures[name]
        axis.hist(
            info["accuracies"],
            bins=30,
            color="tab:blue",
            alpha=0.8,
            label=f"random, {len(info['accuracies'])} directions",
        )
        axis.axvline(info["clean"], color="black", linestyle="--", label="undamaged")
        for label, color in (("plus", "tab:red"), ("minus", "tab:orange")):
            axis.axvline(info["eigen"][label][0], color=color, label=f"eigen ({label})")
        axis.set_xlabel("test accuracy")
        axis.set_title(f"{name}: norm-{FLAGS.resilience_norm:g} perturbations")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/vulnerability.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    for name in names:
        info = figures[name]
        if info["predicted"]:
            axis.loglog(info["predicted"], info["measured"], ".", alpha=0.6, label=f"{name} random")
        axis.loglog(
            [info["eigen_predicted"]],
            [info["eigen_measured"]],
            "*",
            markersize=12,
            label=f"{name} eigen (log-probabilities)",
        )
    lows = [min(f["predicted"] + [f["eigen_predicted"]]) for f in figures.values()]
    highs = [max(f["predicted"] + [f["eigen_predicted"]]) for f in figures.values()]
    line = [min(lows), max(highs)]
    axis.loglog(line, line, "k--", linewidth=0.8, label="measured = predicted")
    axis.set_xlabel("predicted change δᵀ g δ")
    axis.set_ylabel("measured mean squared logit change")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(f"{output_dir}/prediction.png", dpi=120)
    plt.close(figure)


def plot_deletion(info, layers, output_dir):
    fractions = info["fractions"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    mean, spread = info["curves"].mean(0), info["curves"].std(0)
    left.errorbar(100 * fractions, mean, yerr=spread, marker="o", markersize=3)
    left.axvline(
        100 * info["knee_of_mean"], color="tab:red", linestyle="--", label="knee of the mean curve"
    )
    left.set_xlabel("hidden units deleted (%)")
    left.set_ylabel("test accuracy")
    left.set_title("MLP-1 node deletion")
    left.legend()
    right.plot(100 * info["speed_times"], info["speeds"].mean(0), label="speed s")
    twin = right.twinx()
    twin.plot(
        100 * info["acceleration_times"],
        info["accelerations"].mean(0),
        color="tab:orange",
        label="acceleration ds/dt",
    )
    right.axvline(100 * info["peak"], color="tab:orange", linestyle=":", label="acceleration peak")
    right.axvline(100 * info["knee_of_mean"], color="tab:red", linestyle="--", label="knee")
    right.legend(fontsize=7)
    right.set_xlabel("hidden units deleted (%)")
    right.set_ylabel("break-down speed")
    twin.set_ylabel("break-down acceleration")
    right.set_title("along the deletion path")
    figure.tight_layout()
    figure.savefig(f"{output_dir}/deletion.png", dpi=120)
    plt.close(figure)
    if layers:
        figure, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), squeeze=False)
        for axis, (name, curves) in zip(axes[0], layers.items()):
            for layer, values in curves.items():
                if layer != "fractions":
                    axis.plot(100 * curves["fractions"], values, marker=".", label=layer)
            axis.set_xlabel("units of the layer deleted (%)")
            axis.set_ylabel("test accuracy")
            axis.set_title(f"{name}: layer by layer")
            axis.legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(f"{output_dir}/layers.png", dpi=120)
        plt.close(figure)


def plot_faults(table, name, output_dir):
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    counts = [int(c) for c in FLAGS.resilience_bit_counts]
    for label, _, _ in BIT_CLASSES:
        values = [table[f"bitflip/{label}/{c}"] for c in counts]
        axes[0].errorbar(
            counts,
            [v["mean"] for v in values],
            yerr=[v["std"] for v in values],
            marker="o",
            label=label,
        )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bits flipped")
    axes[0].legend(fontsize=7)
    for axis, kind, values, label in (
        (axes[1], "gaussian", FLAGS.resilience_gaussian_norms, "Gaussian norm"),
        (axes[2], "weights", FLAGS.resilience_zero_fractions, "weights zeroed"),
    ):
        rows = [table[f"{kind}/{_key(v)}"] for v in values]
        axis.errorbar(
            [float(v) for v in values],
            [r["mean"] for r in rows],
            yerr=[r["std"] for r in rows],
            marker="o",
        )
        axis.set_xlabel(label)
    for axis in axes:
        axis.set_ylabel("test accuracy")
    figure.suptitle(f"{name}: fault table")
    figure.tight_layout()
    figure.savefig(f"{output_dir}/faults.png", dpi=120)
    plt.close(figure)


def main(argv):
    del argv  # Unused.
    parts = [common.check_choice(p, "resilience_parts", PARTS) for p in FLAGS.resilience_parts]
    run = common.start("resilience", unsupported=common.single_device_parts(parts, SINGLE_DEVICE))
    _RUN["run"] = run
    try:
        with run.scope():
            _main(parts, run)
    finally:
        _RUN.clear()
        run.close()


def _main(parts, run):
    output_dir = run.output_dir
    common.write_json(
        output_dir,
        "config.json",
        common.flag_values(
            [name for name in FLAGS if name.startswith("resilience_")]
            + [
                "dataset",
                "data_dir",
                "epochs",
                "batch_size",
                "learning_rate",
                "seed",
                "strategy",
                "tpu",
            ]
        ),
    )
    common.set_seed(FLAGS.seed)
    start = time.perf_counter()
    results = {}
    vgg = ["vgg11"] if FLAGS.resilience_vgg else []
    cifar = (FLAGS.resilience_cifar_dataset, FLAGS.resilience_cifar_epochs)
    if "vulnerability" in parts:
        figures = {}
        jobs = [
            (n, FLAGS.dataset, FLAGS.epochs, FLAGS.resilience_directions)
            for n in FLAGS.resilience_mnist_models
        ]
        jobs += [
            (n, *cifar, FLAGS.resilience_cifar_directions)
            for n in list(FLAGS.resilience_cifar_models) + vgg
        ]
        for name, dataset, epochs, directions in jobs:
            measured, figures[name] = vulnerability(name, dataset, epochs, directions)
            results.update({f"{name}/{key}": value for key, value in measured.items()})
            run.scalars(measured, prefix=f"{name}/vulnerability")
            print(
                f"{name}: clean {measured['test/accuracy']:.4f}, random min "
                f"{measured['random/test/accuracy/min']:.4f}, eigen "
                f"{measured['eigen/test/accuracy']:.4f} "
                f"({measured['eigen/num_matvecs']} products), rho {measured['rho']:.3g}"
            )
        plot_vulnerability(figures, output_dir)
        common.write_json(output_dir, "summary.json", vulnerability_page(results, list(figures)))
    if "deletion" in parts:
        measured, curves = deletion(FLAGS.dataset, FLAGS.epochs)
        results.update(measured)
        # TensorBoard: accuracy against the deleted fraction (the step is the percent).
        for fraction, accuracy in zip(curves["fractions"], curves["curves"].mean(0)):
            run.scalars(
                {"test/accuracy/mean": accuracy}, step=round(100 * fraction), prefix="mlp1/deletion"
            )
        for time_, speed in zip(curves["speed_times"], curves["speeds"].mean(0)):
            run.scalars(
                {"breakdown_speed/mean": speed}, step=round(100 * time_), prefix="mlp1/deletion"
            )
        layers = {}
        jobs = [(n, FLAGS.dataset, FLAGS.epochs) for n in FLAGS.resilience_layer_models]
        for name, dataset, epochs in jobs + [(n, *cifar) for n in vgg]:
            measured, layers[name] = layer_by_layer(name, dataset, epochs)
            results.update(measured)
        plot_deletion(curves, layers, output_dir)
        print(
            f"mlp1: 80% deleted {results.get('mlp1/nodes/0.8/test/accuracy/mean', 0):.4f}, "
            f"knee {results['mlp1/knee']:.2f}, acceleration peak "
            f"{results['mlp1/max_acceleration_at']:.2f}"
        )
    if "faults" in parts:
        name = FLAGS.resilience_fault_model
        measured, table = fault_table(name, FLAGS.dataset, FLAGS.epochs)
        results.update(measured)
        run.scalars(measured, prefix="faults")
        plot_faults(table, name, output_dir)
    results["wall_time_seconds"] = time.perf_counter() - start
    common.write_json(output_dir, "results.json", results)


if __name__ == "__main__":
    common.run(
        main,
        shared=common.TRAINING_FLAGS,
    )
