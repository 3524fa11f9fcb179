"""Adversarial evaluation with the Adversarial Robustness Toolbox (the `robustness` extra).

Two threat models, always reported together:

- **transfer** (the FIP paper's): L∞ PGD is run on a surrogate network trained separately
  (its own seed, the same data); the adversarial inputs it finds are then given to the
  model under test, which the attacker never sees.
- **white-box**: L∞ PGD on the model under test itself. For an ensemble the attack
  differentiates the whole ensemble: the loss is −log p̄_y with p̄ the mean of the members'
  probabilities, computed stably as `logsumexp_k(log_softmax(z_k)) − log K` from the
  members' logits (no clipped probabilities, hence no masked gradients).

Both use `art.attacks.evasion.ProjectedGradientDescent` on an
`art.estimators.classification.TensorFlowV2Classifier`.
"""

import keras
import numpy as np

from keras_fip.core import outputs as outputs_lib
from keras_fip.operations.ensemble_model import EnsembleCombination
from keras_fip.operations.ensemble_model import ensemble_combine
from keras_fip.operations.ensemble_model import ensemble_members
from keras_fip.operations.ensemble_model import is_ensemble
from keras_fip.operations.ensemble_model import member_output_kind


def require_art():
    """Raises an `ImportError` naming the extra to install when ART is missing."""
    try:
        import art  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "keras_fip.robustness needs the Adversarial Robustness Toolbox: "
            "`pip install 'keras_fip[robustness]'` (or "
            "`pip install adversarial-robustness-toolbox`)."
        ) from error


def logit_model(model):
    """A model returning logits (log-probabilities up to a constant) for any classifier.

    A plain model returning logits is returned as it is; one ending in a softmax gets a
    view returning its log-probabilities (`keras_fip.core.outputs.logits_model`). For a
    keras_fip ensemble, a new functional model over the same members (shared weights)
    returns log p̄ (`combine="mean_probabilities"`, computed stably as
    `logsumexp_k(log p_k) − log K` from the members' logits or probabilities,
    `EnsembleCombination`) or the ensemble's own logits (`"mean_logits"`): its softmax is
    the ensemble's distribution, so `from_logits=True` losses differentiate the whole
    ensemble exactly.

    Args:
        model: A `keras.Model` returning logits or probabilities, or a keras_fip
            ensemble.

    Returns:
        A `keras.Model` returning logits.

    Examples:

        >>> member = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, "softmax")])
        >>> ensemble = keras_fip.operations.build_ensemble([member])
        >>> x = np.ones((1, 3), "float32")
        >>> bool(np.allclose(np.exp(logit_model(ensemble)(x)), ensemble(x), atol=1e-6))
        True
    """
    if not is_ensemble(model):
        return outputs_lib.logits_model(model, outputs_lib.output_kind(model))
    members = ensemble_members(model)
    combine = ensemble_combine(model)
    mode = "mean_logits" if combine == "mean_logits" else "log_mean_probabilities"
    combination = EnsembleCombination(mode, outputs=member_output_kind(model))
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype)
    outputs = combination([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name=f"{model.name}_logits")


def art_classifier(model, num_classes, clip_values=(0.0, 1.0)):
    """An ART `TensorFlowV2Classifier` for a classifier or a keras_fip ensemble.

    The loss is sparse categorical cross-entropy on the logits of `logit_model(model)`:
    −log p_y for a model returning logits or probabilities, −log p̄_y for an ensemble.

    Args:
        model: A `keras.Model` returning logits or probabilities, or a keras_fip
            ensemble.
        num_classes: The number of classes.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.

    Returns:
        An `art.estimators.classification.TensorFlowV2Classifier`.
    """
    require_art()
    from art.estimators.classification import TensorFlowV2Classifier

    network = logit_model(model)
    return TensorFlowV2Classifier(
        model=network,
        nb_classes=int(num_classes),
        input_shape=tuple(network.inputs[0].shape[1:]),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=tuple(float(v) for v in clip_values),
    )


def _check_attack(epsilon, step, iterations, restarts):
    for name, value in (("epsilon", epsilon), ("step", step)):
        if not isinstance(value, (int, float, np.floating, np.integer)) or value <= 0:
            raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(
            f"`iterations` must be a positive integer. Received: iterations={iterations!r}"
        )
    if not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ValueError(
            f"`restarts` must be a non-negative integer. Received: restarts={restarts!r}"
        )


def pgd(
    model,
    x,
    y,
    epsilon=0.3,
    step=0.01,
    iterations=40,
    restarts=1,
    num_classes=None,
    clip_values=(0.0, 1.0),
    batch_size=256,
    seed=0,
):
    """Untargeted L∞ projected gradient descent (ART) against `model` on `(x, y)`.

    Args:
        model: A `keras.Model` returning logits or probabilities, or a keras_fip
            ensemble.
        x: Inputs (numpy, float32).
        y: Integer labels (the attack raises the loss of the true label).
        epsilon: ε, the L∞ radius. Defaults to `0.3`.
        step: The step size of each iteration. Defaults to `0.01`.
        iterations: PGD iterations. Defaults to `40`.
        restarts: Random starts in the ε-ball (ART's `num_random_init`; 0 starts at x,
            k > 0 keeps the most successful of k random starts). Defaults to `1`.
        num_classes: Number of classes, or `None` to read it from the output. Defaults to
            `None`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        batch_size: Examples per attack batch. Defaults to `256`.
        seed: Seed of the random starts. Defaults to `0`.

    Returns:
        The adversarial inputs, a numpy array like `x`.
    """
    _check_attack(epsilon, step, iterations, restarts)
    if isinstance(x, (dict, list, tuple)):
        raise ValueError(
            "`x` must be one array of floating-point inputs: PGD (ART) perturbs a single "
            f"input tensor. Received: x={type(x).__name__} of {len(x)} inputs"
        )
    require_art()
    if num_classes is None:
        num_classes = int(model.outputs[0].shape[-1])
    classifier = art_classifier(model, num_classes, clip_values)
    return pgd_inputs(classifier, x, y, epsilon, step, iterations, restarts, batch_size, seed)


def pgd_inputs(classifier, x, y, epsilon, step, iterations, restarts, batch_size, seed):
    """L∞ PGD examples of ART's `ProjectedGradientDescent` on an ART `classifier`, seeded
    (Keras's and NumPy's generators: ART draws its random starts from NumPy)."""
    require_art()
    from art.attacks.evasion import ProjectedGradientDescent

    attack = ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=float(epsilon),
        eps_step=float(step),
        max_iter=int(iterations),
        num_random_init=int(restarts),
        batch_size=int(batch_size),
        verbose=False,
    )
    keras.utils.set_random_seed(int(seed))
    np.random.seed(int(seed))
    return attack.generate(x=np.asarray(x, "float32"), y=np.asarray(y).astype("int64"))


def accuracy(model, x, y, batch_size=1000):
    """Accuracy of a classifier (logits, probabilities or an ensemble) on `(x, y)`."""
    outputs = np.concatenate(
        [
            keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
            for i in range(0, len(x), batch_size)
        ]
    )
    return float(np.mean(np.argmax(outputs, -1) == np.asarray(y)))


def attack_settings(epsilon, step, iterations, restarts):
    """The attack's settings as flat result keys."""
    return {
        "epsilon": float(epsilon),
        "step": float(step),
        "iterations": int(iterations),
        "restarts": int(restarts),
    }


def transfer_pgd_accuracy(
    surrogate,
    models,
    x,
    y,
    epsilon=0.3,
    step=0.01,
    iterations=40,
    restarts=1,
    clip_values=(0.0, 1.0),
    batch_size=256,
    seed=0,
):
    """Accuracy of each model on PGD inputs crafted against a separately trained surrogate.

    Args:
        surrogate: The attacker's `keras.Model` (logits or probabilities), trained apart
            from the models.
        models: A dict of name → model (classifiers or keras_fip ensembles).
        x: Clean inputs.
        y: Integer labels.
        epsilon: ε, the L∞ radius. Defaults to `0.3`.
        step: PGD step size. Defaults to `0.01`.
        iterations: PGD iterations. Defaults to `40`.
        restarts: Random starts (`num_random_init`). Defaults to `1`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        batch_size: Attack batch size. Defaults to `256`.
        seed: Seed of the random starts. Defaults to `0`.

    Returns:
        A tuple `(accuracies, adversarial)`: a dict name → accuracy on the adversarial
        inputs (plus `"surrogate"`, the attacked network's own), and the inputs.

    Examples:

        >>> # accuracies, x_adv = transfer_pgd_accuracy(surrogate, {"fip": ensemble}, x, y)
    """
    adversarial = pgd(
        surrogate,
        x,
        y,
        epsilon,
        step,
        iterations,
        restarts,
        clip_values=clip_values,
        batch_size=batch_size,
        seed=seed,
    )
    accuracies = {name: accuracy(model, adversarial, y) for name, model in models.items()}
    accuracies["surrogate"] = accuracy(surrogate, adversarial, y)
    return accuracies, adversarial


def whitebox_pgd_accuracy(
    model,
    x,
    y,
    epsilon=0.3,
    step=0.01,
    iterations=40,
    restarts=1,
    clip_values=(0.0, 1.0),
    batch_size=256,
    seed=0,
):
    """Accuracy of a model under white-box L∞ PGD on itself (the whole ensemble).

    Args:
        model: A classifier (logits or probabilities) or a keras_fip ensemble.
        x: Clean inputs.
        y: Integer labels.
        epsilon: ε, the L∞ radius. Defaults to `0.3`.
        step: PGD step size. Defaults to `0.01`.
        iterations: PGD iterations. Defaults to `40`.
        restarts: Random starts (`num_random_init`). Defaults to `1`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        batch_size: Attack batch size. Defaults to `256`.
        seed: Seed of the random starts. Defaults to `0`.

    Returns:
        A tuple `(accuracy, adversarial)`.
    """
    adversarial = pgd(
        model,
        x,
        y,
        epsilon,
        step,
        iterations,
        restarts,
        clip_values=clip_values,
        batch_size=batch_size,
        seed=seed,
    )
    return accuracy(model, adversarial, y), adversarial
