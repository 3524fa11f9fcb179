"""Adversarial evaluation of classifiers and whole ensembles, with its sanity checks.

`evaluate` runs, at each ε of an L∞ threat model, the attacks a robustness reviewer asks
for and returns a JSON-serialisable record in which every result carries every parameter
of its attack:

- `"pgd"`: white-box PGD (Madry et al., 2018; ART `ProjectedGradientDescent`) on the
  cross-entropy of the whole model. An ensemble is attacked as ONE differentiable model
  whose output is the mean of its members' probabilities p̄ = (1/K) Σ_k p_k (members
  returning logits or probabilities alike), through log p̄ computed stably
  (`mean_probability_logits`).
- `"apgd-ce"`, `"apgd-dlr"`: ART's `AutoProjectedGradientDescent` on the same model, with
  the cross-entropy and the difference-of-logits-ratio losses (Croce & Hein, 2020).
- `"square"`: ART's `SquareAttack`, gradient-free (queries only the outputs).
- `"autoattack"`: AutoAttack's loop (ART's) running APGD-CE, APGD-DLR and Square in
  turn, each on the examples the previous ones left correctly classified (the standard
  AutoAttack's untargeted components; its targeted APGD and FAB are not run).
- `"adaptive"`: PGD on the margin (Carlini & Wagner's) loss of the model's own decision
  scores, and for an ensemble also on the margin of its members' mean log-probabilities
  (every member pushed at once); an example counts as robust only if it survives both.
- `"transfer"`: PGD on an independently trained `surrogate`, the adversarial inputs then
  given to the model (a black-box attack).

The record's `"worst_case"` gives, per ε, the accuracy on the examples that survive every
white-box attack run, the figure to report as robust accuracy.

The defaults are sized for a CPU (a few hundred examples, 50 PGD steps, one restart,
1000 Square queries). For a reported evaluation raise them toward the published
settings: `steps=100, restarts=5, square_queries=5000` on 1000 or more test examples.
"""

import keras
import numpy as np

from keras_fip.operations.ensemble_model import EnsembleCombination
from keras_fip.operations.ensemble_model import ensemble_members
from keras_fip.operations.ensemble_model import is_ensemble
from keras_fip.operations.ensemble_model import member_output_kind
from keras_fip.robustness.attacks import accuracy
from keras_fip.robustness.attacks import logit_model
from keras_fip.robustness.attacks import pgd_inputs
from keras_fip.robustness.attacks import require_art

ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "square", "autoattack", "adaptive", "transfer")
# The attacks run when `attacks=None`: "transfer" joins them when a surrogate is given.
DEFAULT_ATTACKS = ("pgd", "autoattack", "adaptive")
# PGD's step size when none is given: 2.5·ε/steps (Madry et al.), so the steps can cross
# the ball and back. APGD starts from 2ε and adapts it (Croce & Hein).
PGD_STEP_FACTOR = 2.5
APGD_STEP_FACTOR = 2.0
# Square's initial fraction of pixels changed (ART's and the authors' choice on MNIST).
SQUARE_P_INIT = 0.8


def art_version():
    """The installed version of the Adversarial Robustness Toolbox."""
    require_art()
    import art

    return str(art.__version__)


def mean_probability_logits(model):
    """log p̄ of a model: the whole ensemble as one model returning log-mean-probabilities.

    For a keras_fip ensemble, a functional model over the same members (shared weights)
    returning log p̄, p̄ = (1/K) Σ_k p_k the mean of the members' probabilities, whatever
    the ensemble's own `combine` and whether the members return logits or probabilities;
    computed as `logsumexp_k(log p_k) − log K` (`EnsembleCombination`), so the gradient
    is exact and never clipped. A single network gives its logits (`logit_model`).

    Args:
        model: A `keras.Model` returning logits or probabilities, or a keras_fip
            ensemble.

    Returns:
        A `keras.Model` returning logits whose softmax is p̄.

    Examples:

        >>> members = [keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        ...            for _ in range(2)]
        >>> ensemble = keras_fip.operations.build_ensemble(members, combine="mean_logits")
        >>> x = np.ones((1, 3), "float32")
        >>> mean = np.mean([keras.ops.softmax(m(x)) for m in members], axis=0)
        >>> bool(np.allclose(keras.ops.softmax(mean_probability_logits(ensemble)(x)), mean))
        True
    """
    if not is_ensemble(model):
        return logit_model(model)
    return _combined(model, "log_mean_probabilities", "mean_probabilities")


def _combined(model, mode, label):
    members = ensemble_members(model)
    combination = EnsembleCombination(mode, outputs=member_output_kind(model))
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype)
    outputs = combination([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name=f"{model.name}_{label}")


def margin_loss(labels, scores):
    """The margin (Carlini & Wagner) loss: max_{j≠y} s_j − s_y, summed over the batch.

    Positive exactly where the decision is wrong; unlike the cross-entropy it does not
    flatten when the scores are confident, so it attacks the decision itself.

    Args:
        labels: One-hot labels, shape `(n, classes)`.
        scores: Decision scores (logits), shape `(n, classes)`.

    Returns:
        A scalar tensor.

    Examples:

        >>> labels = np.array([[1.0, 0.0, 0.0]], "float32")
        >>> scores = np.array([[2.0, 3.0, -1.0]], "float32")
        >>> float(margin_loss(labels, scores))
        1.0
    """
    labels = keras.ops.cast(labels, scores.dtype)
    true = keras.ops.sum(labels * scores, axis=-1)
    other = keras.ops.max(scores - 1e9 * labels, axis=-1)
    return keras.ops.sum(other - true)


def _classifier(network, num_classes, clip_values, loss=None):
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model=network,
        nb_classes=int(num_classes),
        input_shape=tuple(network.inputs[0].shape[1:]),
        loss_object=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=tuple(float(v) for v in clip_values),
    )


def _seed(seed):
    keras.utils.set_random_seed(int(seed))
    np.random.seed(int(seed))


def _correct(model, x, y, batch_size):
    outputs = np.concatenate(
        [
            keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
            for i in range(0, len(x), batch_size)
        ]
    )
    return np.argmax(outputs, -1) == y


def _apgd(classifier, loss_type, epsilon, steps, restarts, batch_size):
    from art.attacks.evasion import AutoProjectedGradientDescent

    return AutoProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=float(epsilon),
        eps_step=float(APGD_STEP_FACTOR * epsilon),
        max_iter=int(steps),
        nb_random_init=max(1, int(restarts)),
        batch_size=int(batch_size),
        loss_type=loss_type,
        verbose=False,
    )


def _square(classifier, epsilon, queries, restarts, batch_size):
    from art.attacks.evasion import SquareAttack

    return SquareAttack(
        classifier,
        norm=np.inf,
        eps=float(epsilon),
        max_iter=int(queries),
        p_init=SQUARE_P_INIT,
        nb_restarts=max(1, int(restarts)),
        batch_size=int(batch_size),
        verbose=False,
    )


def _settings(name, epsilon, eps_step, steps, restarts, loss, target, version):
    return {
        "attack": name,
        "norm": "inf",
        "epsilon": float(epsilon),
        "eps_step": None if eps_step is None else float(eps_step),
        "steps": int(steps),
        "restarts": int(restarts),
        "loss": loss,
        "target": target,
        "art_version": version,
    }


def _check_number(value, name, integer=False, minimum=1):
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if not isinstance(value, kinds) or isinstance(value, bool) or not value >= minimum:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"`{name}` must be {kind} ≥ {minimum}. Received: {name}={value!r}")


def _check_inputs(model, x, y, epsilons, attacks, surrogate):
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
    if isinstance(x, (dict, list, tuple)) or not hasattr(x, "shape"):
        raise ValueError(
            "`x` must be one array of floating-point inputs (the attacks perturb a single "
            f"input tensor). Received: x={type(x).__name__}"
        )
    if len(x) != len(np.asarray(y)) or len(x) == 0:
        raise ValueError(
            "`x` and `y` must hold the same non-zero number of examples. Received: "
            f"{len(x)} inputs and {len(np.asarray(y))} labels"
        )
    values = np.atleast_1d(np.asarray(epsilons, dtype=object))
    if (
        not len(values)
        or not all(isinstance(e, (int, float, np.integer, np.floating)) for e in values)
        or not all(float(e) > 0 for e in values)
    ):
        raise ValueError(f"`epsilons` must be positive numbers. Received: epsilons={epsilons!r}")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(
            f"`attacks` must be a non-empty list of {list(ATTACKS)}. Received: attacks={attacks!r}"
        )
    if "transfer" in attacks and not isinstance(surrogate, keras.Model):
        raise ValueError(
            "`surrogate` must be a `keras.Model` trained apart from `model` for the "
            f"'transfer' attack. Received: surrogate={surrogate!r}"
        )


def evaluate(
    model,
    x,
    y,
    *,
    epsilons=(0.1, 0.3),
    attacks=None,
    surrogate=None,
    steps=50,
    restarts=1,
    square_queries=1000,
    clip_values=(0.0, 1.0),
    batch_size=256,
    seed=0,
):
    """Robust accuracy of a classifier or a whole ensemble under white-box and transfer attacks.

    Every attack of `attacks` runs at every ε of `epsilons` (L∞, inputs in
    `clip_values`); ensembles are attacked as one model returning the mean of the
    members' probabilities (see the module docstring for each attack). Each result holds
    the attack's name, norm, ε, step size, steps, restarts, loss, what it differentiated
    and ART's version, with the robust accuracy. `"worst_case"` counts an example as
    robust at ε only if it survives every white-box attack run at ε.

    Args:
        model: A `keras.Model` returning logits or probabilities, or a keras_fip
            ensemble. Not changed.
        x: Test inputs (numpy, one array).
        y: Integer test labels.
        epsilons: The L∞ radii. Defaults to `(0.1, 0.3)`.
        attacks: A list of `ATTACKS`, or `None` for `DEFAULT_ATTACKS` plus `"transfer"`
            when a surrogate is given. Defaults to `None`.
        surrogate: The transfer attack's network (logits or probabilities), trained apart
            from `model` on the same data, or `None`. Defaults to `None`.
        steps: Iterations of PGD, APGD and the adaptive attack. Defaults to `50`.
        restarts: Random starts of each attack (the best per example is kept). Defaults
            to `1`.
        square_queries: Square's iterations (one query each). Defaults to `1000`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        batch_size: Examples per attack batch. Defaults to `256`.
        seed: Seed of the random starts. Defaults to `0`.

    Returns:
        A JSON-serialisable dict: `"art_version"`, `"num_examples"`, `"num_members"`,
        `"clean_accuracy"`, `"results"` (one dict per attack and ε),
        `"worst_case"` (a list of `{"epsilon", "robust_accuracy", "attacks"}`).

    Examples:

        >>> x, y = keras_fip.data.load("digits", "test")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> record = evaluate(model, x[:20], y[:20], epsilons=[0.1], attacks=["pgd"], steps=3)
        >>> record["results"][0]["attack"], record["results"][0]["steps"]
        ('pgd', 3)
    """
    if attacks is None:
        attacks = DEFAULT_ATTACKS + (("transfer",) if surrogate is not None else ())
    attacks = tuple(attacks) if isinstance(attacks, (list, tuple)) else (attacks,)
    _check_inputs(model, x, y, epsilons, attacks, surrogate)
    _check_number(steps, "steps", integer=True)
    _check_number(restarts, "restarts", integer=True, minimum=0)
    _check_number(square_queries, "square_queries", integer=True)
    _check_number(batch_size, "batch_size", integer=True)
    require_art()
    setup = _Setup(model, x, y, steps, restarts, square_queries, clip_values, batch_size, seed)
    setup.surrogate = surrogate
    epsilons = [float(e) for e in np.atleast_1d(epsilons)]
    clean = _correct(model, setup.x, setup.y, batch_size)
    results, worst_case = [], []
    for epsilon in epsilons:
        survivors = clean.copy()
        names = []
        for name in attacks:
            result, correct = _RUNNERS[name](setup, epsilon)
            result["robust_accuracy"] = float(np.mean(correct))
            results.append(result)
            if name != "transfer":
                survivors &= correct
                names.append(name)
        if names:
            worst_case.append(
                {
                    "epsilon": epsilon,
                    "robust_accuracy": float(np.mean(survivors)),
                    "attacks": names,
                }
            )
    return {
        "art_version": setup.version,
        "num_examples": int(len(setup.x)),
        "num_members": len(ensemble_members(model)) if is_ensemble(model) else 1,
        "clean_accuracy": float(np.mean(clean)),
        "results": results,
        "worst_case": worst_case,
    }


class _Setup:
    """What every attack of one evaluation shares: the data, the settings, the networks."""

    def __init__(self, model, x, y, steps, restarts, square_queries, clip_values, batch_size, seed):
        self.model = model
        self.x = np.asarray(x, "float32")
        self.y = np.asarray(y).astype("int64").reshape(-1)
        self.steps, self.restarts = int(steps), int(restarts)
        self.square_queries = int(square_queries)
        self.clip_values = clip_values
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.version = art_version()
        self.num_classes = int(model.outputs[0].shape[-1])
        self.target = "mean_probabilities" if is_ensemble(model) else "model"
        self.classifier = self.art(mean_probability_logits(model))
        self.surrogate = None

    def art(self, network, loss=None):
        return _classifier(network, self.num_classes, self.clip_values, loss)

    def settings(self, name, epsilon, eps_step, steps, restarts, loss, target=None):
        return _settings(
            name, epsilon, eps_step, steps, restarts, loss, target or self.target, self.version
        )

    def pgd(self, classifier, epsilon):
        return pgd_inputs(
            classifier,
            self.x,
            self.y,
            epsilon,
            self.pgd_step(epsilon),
            self.steps,
            self.restarts,
            self.batch_size,
            self.seed,
        )

    def pgd_step(self, epsilon):
        return PGD_STEP_FACTOR * epsilon / self.steps

    def judge(self, settings, adversarial):
        settings["max_perturbation"] = float(np.max(np.abs(adversarial - self.x)))
        return settings, _correct(self.model, adversarial, self.y, self.batch_size)

    def apgd_settings(self, name, epsilon, loss):
        return self.settings(
            name, epsilon, APGD_STEP_FACTOR * epsilon, self.steps, max(1, self.restarts), loss
        )

    def square_settings(self, epsilon):
        settings = self.settings(
            "square", epsilon, None, self.square_queries, max(1, self.restarts), "margin"
        )
        settings["p_init"] = SQUARE_P_INIT
        return settings


def _run_pgd(setup, epsilon):
    settings = setup.settings(
        "pgd", epsilon, setup.pgd_step(epsilon), setup.steps, setup.restarts, "cross_entropy"
    )
    return setup.judge(settings, setup.pgd(setup.classifier, epsilon))


def _run_apgd(loss):
    name = "apgd-ce" if loss == "cross_entropy" else "apgd-dlr"

    def run(setup, epsilon):
        _seed(setup.seed)
        attack = _apgd(
            setup.classifier, loss, epsilon, setup.steps, setup.restarts, setup.batch_size
        )
        adversarial = attack.generate(x=setup.x, y=setup.y)
        return setup.judge(setup.apgd_settings(name, epsilon, loss), adversarial)

    return run


def _run_square(setup, epsilon):
    _seed(setup.seed)
    attack = _square(
        setup.classifier, epsilon, setup.square_queries, setup.restarts, setup.batch_size
    )
    return setup.judge(setup.square_settings(epsilon), attack.generate(x=setup.x, y=setup.y))


def _run_autoattack(setup, epsilon):
    """AutoAttack: each component attacks the examples the previous ones left correct.

    The loop is ART's own (`art.attacks.evasion.auto_attack.run_attack`, what
    `AutoAttack.generate` runs without a process pool): `AutoAttack.generate` imports the
    `multiprocess` package even then, which ART does not install.
    """
    from art.attacks.evasion.auto_attack import run_attack
    from art.utils import check_and_transform_label_format

    losses = ("cross_entropy", "difference_logits_ratio")
    components = [
        _apgd(setup.classifier, loss, epsilon, setup.steps, setup.restarts, setup.batch_size)
        for loss in losses
    ]
    components.append(
        _square(setup.classifier, epsilon, setup.square_queries, setup.restarts, setup.batch_size)
    )
    labels = check_and_transform_label_format(setup.y, nb_classes=setup.num_classes)
    adversarial = setup.x.copy()
    robust = np.argmax(setup.classifier.predict(setup.x), axis=1) == setup.y
    _seed(setup.seed)
    for attack in components:
        if not np.any(robust):
            break
        adversarial, robust = run_attack(
            adversarial, labels, robust, attack, setup.classifier, norm=np.inf, eps=float(epsilon)
        )
    settings = setup.apgd_settings("autoattack", epsilon, "+".join(losses) + "+margin")
    settings["components"] = [
        setup.apgd_settings("apgd-ce", epsilon, losses[0]),
        setup.apgd_settings("apgd-dlr", epsilon, losses[1]),
        setup.square_settings(epsilon),
    ]
    return setup.judge(settings, adversarial)


def _run_adaptive(setup, epsilon):
    """Margin PGD on the model's decision scores (and its members' mean log-probabilities)."""
    scores = {"decision": logit_model(setup.model)}
    if is_ensemble(setup.model):
        scores["members_mean_log_probabilities"] = _combined(setup.model, "mean_logits", "members")
    correct = np.ones(len(setup.x), bool)
    components, largest = [], 0.0
    for label, network in scores.items():
        adversarial = setup.pgd(setup.art(network, loss=margin_loss), epsilon)
        component, survived = setup.judge(
            setup.settings(
                "pgd",
                epsilon,
                setup.pgd_step(epsilon),
                setup.steps,
                setup.restarts,
                "margin",
                label,
            ),
            adversarial,
        )
        component["robust_accuracy"] = float(np.mean(survived))
        correct &= survived
        largest = max(largest, component["max_perturbation"])
        components.append(component)
    settings = setup.settings(
        "adaptive",
        epsilon,
        setup.pgd_step(epsilon),
        setup.steps,
        setup.restarts,
        "margin",
        "+".join(scores),
    )
    settings["components"] = components
    settings["max_perturbation"] = largest
    return settings, correct


def _run_transfer(setup, epsilon):
    surrogate = setup.surrogate
    settings = setup.settings(
        "transfer",
        epsilon,
        setup.pgd_step(epsilon),
        setup.steps,
        setup.restarts,
        "cross_entropy",
        "surrogate",
    )
    settings["surrogate"] = surrogate.name
    adversarial = setup.pgd(setup.art(logit_model(surrogate)), epsilon)
    settings["surrogate_accuracy"] = accuracy(surrogate, adversarial, setup.y)
    return setup.judge(settings, adversarial)


_RUNNERS = {
    "pgd": _run_pgd,
    "apgd-ce": _run_apgd("cross_entropy"),
    "apgd-dlr": _run_apgd("difference_logits_ratio"),
    "square": _run_square,
    "autoattack": _run_autoattack,
    "adaptive": _run_adaptive,
    "transfer": _run_transfer,
}


def _non_increasing(values, tolerance):
    """Whether each value is at most the previous one plus `tolerance`."""
    return all(b <= a + tolerance for a, b in zip(values, values[1:]))


def sanity_checks(
    model,
    x,
    y,
    *,
    epsilons=(0.05, 0.1, 0.2, 0.3),
    large_epsilon=0.5,
    steps=(10, 40),
    square_queries=1000,
    tolerance=0.02,
    near_zero=0.05,
    clip_values=(0.0, 1.0),
    batch_size=256,
    seed=0,
):
    """The four checks that an evaluation is sound (a masked gradient fails one of them).

    - `"accuracy_does_not_rise_with_epsilon"`: white-box PGD's accuracy at each ε of
      `epsilons` is at most the previous one plus `tolerance`.
    - `"near_zero_at_large_epsilon"`: PGD at `large_epsilon` leaves at most `near_zero`.
    - `"more_steps_do_not_help"`: PGD with each number of `steps` (same step size, the
      largest ε of `epsilons`, starting at x) leaves at most what fewer steps left, plus
      `tolerance`.
    - `"gradient_free_not_stronger"`: Square (gradient-free) at the largest ε of
      `epsilons` leaves at least the gradient attacks' accuracy (PGD with the most steps,
      APGD-CE) minus `tolerance`. A gradient-free attack markedly stronger than the
      gradient ones means the gradients are masked (Athalye et al., 2018).

    Each check is a dict with `"passed"` (a bool) and the numbers it compared, so an app
    can print it; `"passed"` at the top says whether all passed.

    Args:
        model: A classifier (logits or probabilities) or a keras_fip ensemble.
        x: Test inputs.
        y: Integer test labels.
        epsilons: Increasing L∞ radii. Defaults to `(0.05, 0.1, 0.2, 0.3)`.
        large_epsilon: The ε at which nothing should survive. Defaults to `0.5`.
        steps: Increasing PGD step counts. Defaults to `(10, 40)`.
        square_queries: Square's iterations. Defaults to `1000`.
        tolerance: The slack of each comparison, in accuracy. Defaults to `0.02`.
        near_zero: The accuracy at `large_epsilon` counted as zero. Defaults to `0.05`.
        clip_values: `(min, max)` of valid inputs. Defaults to `(0.0, 1.0)`.
        batch_size: Examples per attack batch. Defaults to `256`.
        seed: Seed of the random starts. Defaults to `0`.

    Returns:
        A JSON-serialisable dict of the checks and `"passed"`.

    Examples:

        >>> x, y = keras_fip.data.load("digits", "test")
        >>> model = keras_fip.models.mlp(16, input_shape=(8, 8, 1))
        >>> checks = sanity_checks(model, x[:20], y[:20], epsilons=[0.1, 0.3],
        ...                        steps=(2, 4), square_queries=5)
        >>> checks["more_steps_do_not_help"]["steps"]
        [2, 4]
    """
    epsilons = [float(e) for e in np.atleast_1d(epsilons)]
    steps = [int(s) for s in np.atleast_1d(steps)]
    if epsilons != sorted(epsilons):
        raise ValueError(f"`epsilons` must be increasing. Received: epsilons={epsilons!r}")
    if steps != sorted(steps) or min(steps) < 1:
        raise ValueError(f"`steps` must be increasing positive integers. Received: steps={steps!r}")
    _check_number(large_epsilon, "large_epsilon", minimum=1e-12)
    _check_inputs(model, x, y, epsilons, ("pgd",), None)
    require_art()
    x = np.asarray(x, "float32")
    y = np.asarray(y).astype("int64").reshape(-1)
    num_classes = int(model.outputs[0].shape[-1])
    classifier = _classifier(mean_probability_logits(model), num_classes, clip_values)

    def pgd_accuracy(epsilon, count, eps_step=None, restarts=1):
        eps_step = PGD_STEP_FACTOR * epsilon / count if eps_step is None else eps_step
        adversarial = pgd_inputs(
            classifier, x, y, epsilon, eps_step, count, restarts, batch_size, seed
        )
        return float(np.mean(_correct(model, adversarial, y, batch_size)))

    # Accuracy against ε, and at a large ε.
    by_epsilon = [pgd_accuracy(e, max(steps)) for e in epsilons]
    large = pgd_accuracy(float(large_epsilon), max(steps))
    # More steps of one size from x.
    epsilon = epsilons[-1]
    step_size = PGD_STEP_FACTOR * epsilon / max(steps)
    by_steps = [pgd_accuracy(epsilon, s, eps_step=step_size, restarts=0) for s in steps]
    # Gradient-free against gradient attacks at the largest ε.
    _seed(seed)
    apgd = _apgd(classifier, "cross_entropy", epsilon, max(steps), 1, batch_size)
    apgd_accuracy = float(np.mean(_correct(model, apgd.generate(x=x, y=y), y, batch_size)))
    _seed(seed)
    square = _square(classifier, epsilon, square_queries, 1, batch_size)
    square_accuracy = float(np.mean(_correct(model, square.generate(x=x, y=y), y, batch_size)))
    gradient = min(by_epsilon[-1], apgd_accuracy)
    checks = {
        "accuracy_does_not_rise_with_epsilon": {
            "passed": _non_increasing(by_epsilon, tolerance),
            "epsilons": epsilons,
            "accuracies": by_epsilon,
            "steps": max(steps),
            "tolerance": float(tolerance),
        },
        "near_zero_at_large_epsilon": {
            "passed": large <= near_zero,
            "epsilon": float(large_epsilon),
            "accuracy": large,
            "near_zero": float(near_zero),
        },
        "more_steps_do_not_help": {
            "passed": _non_increasing(by_steps, tolerance),
            "epsilon": epsilon,
            "eps_step": step_size,
            "steps": steps,
            "accuracies": by_steps,
            "tolerance": float(tolerance),
        },
        "gradient_free_not_stronger": {
            "passed": square_accuracy >= gradient - tolerance,
            "epsilon": epsilon,
            "square_accuracy": square_accuracy,
            "square_queries": int(square_queries),
            "gradient_accuracy": gradient,
            "pgd_accuracy": by_epsilon[-1],
            "apgd_ce_accuracy": apgd_accuracy,
            "tolerance": float(tolerance),
        },
    }
    checks["passed"] = all(check["passed"] for check in checks.values())
    checks["art_version"] = art_version()
    return checks
