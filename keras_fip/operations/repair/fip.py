"""`FIP`: repair along a functionally invariant path back to the undamaged function."""

import math

import keras

from keras_fip.core import normalization
from keras_fip.core import outputs as outputs_lib
from keras_fip.core import projection
from keras_fip.core.copy import copy_model
from keras_fip.core.data_adapter import fip_dataset
from keras_fip.core.data_adapter import num_examples
from keras_fip.engine import distances as distances_lib
from keras_fip.engine.beta import auto_beta
from keras_fip.engine.path import Path
from keras_fip.engine.rules import Penalty
from keras_fip.engine.trainer import FIPTrainer
from keras_fip.operations.base import Operation
from keras_fip.operations.base import model_output_kind
from keras_fip.operations.repair.context import EvaluationCallback
from keras_fip.operations.repair.method import RepairMethod
from keras_fip.operations.repair.method import check_boolean
from keras_fip.operations.repair.solver import OutputLayerSolver

# `walk.beta="auto"` with labelled data: the strengths of the task cross-entropy walked
# (β = strength × `keras_fip.engine.beta.auto_beta`'s curvature, 1 for the KL), the one that
# does best on the validation split kept.
AUTO_STRENGTHS = (1.0, 10.0)


def _get_solver(solver):
    if solver is None or isinstance(solver, OutputLayerSolver):
        return solver
    if isinstance(solver, str) and solver == "auto":
        return OutputLayerSolver()
    if isinstance(solver, dict):
        solver = keras.saving.deserialize_keras_object(solver)
        if isinstance(solver, OutputLayerSolver):
            return solver
    raise ValueError(
        "`solver` must be 'auto', None or a `keras_fip.repair.OutputLayerSolver`. "
        f"Received: solver={solver!r}"
    )


@keras.saving.register_keras_serializable(package="keras_fip")
class FIP(RepairMethod):
    """Repairs along a functionally invariant path back to the undamaged network's outputs.

    The damaged weights are held exactly at zero by their masks (or released and grown
    back with `release=True`). Where the model ends in a Dense layer and is not walked on
    BatchNorm batch statistics, the repair starts with closed-form solves on fresh
    training inputs (`solver`, a `keras_fip.repair.OutputLayerSolver`: the output layer,
    then, in an MLP, Gauss-Newton sweeps of the last hidden layer), every input counted in
    the budget. Then the walk (`keras_fip.FIPTrainer`, the `Repair`'s walk: its rule,
    learning rate, batch size, training mode, recording, seed) minimises the output
    distance D between the network and the undamaged one on the inputs of the repair's
    data, the walk's distance taken at temperature `temperature` (logits divided by T,
    times T²: with `"kl"`, the softened distillation loss), plus β times the task
    cross-entropy when the data have labels. The walk's β: `"auto"` walks at the
    strengths 1 and 10 (`keras_fip.engine.beta.auto_beta` with the cross-entropy as the
    objective: β = strength × D's curvature per nat, so β = 1 and β = 10 for `"kl"`) from
    the same start and keeps the network that does best on the validation split (the
    first to recover when stopping at the target): twice the walk's compute in the budget
    of one walk (`op.history["candidates"]`); a number walks with that β (0:
    the pure function recovery, labels only measure accuracy). With inputs only, β is 0.
    The distance's reference is always the undamaged network.

    With `num_paths > 1`, that many paths (different data orders) are walked and the one
    of least length in the metric g (Σ √(Δwᵀ g Δw) over its steps) among those that
    recover is kept. `release=True` re-initialises the damaged weights (drawn with their
    variable's surviving mean and spread) and removes their masks first: the resilience
    paper's C3 → C4 transition (deleted units restored and grown back).

    A model ending in a softmax is repaired as its twin returning logits: the solves fit
    its output layer's pre-activation, and D and the cross-entropy read its
    log-probabilities.

    Args:
        release: Whether to re-initialise and release the damaged weights first. Defaults
            to `False`.
        num_paths: Candidate paths; the shortest in the metric that recovers is kept.
            Defaults to `1`.
        temperature: T of the walk's distance, or `None` (the distance as it is).
            Defaults to `4.0`.
        solver: `"auto"` (an `OutputLayerSolver()`, whose solves run where the
            architecture allows), an `OutputLayerSolver`, or `None` (no solve). Defaults
            to `"auto"`.

    Examples:

        >>> FIP(num_paths=2).get_config()["num_paths"]
        2
        >>> FIP.from_config(FIP(solver=None).get_config()) == FIP(solver=None)
        True
    """

    name = "fip"

    def __init__(self, release=False, *, num_paths=1, temperature=4.0, solver="auto"):
        self.release = check_boolean(release, "release")
        self.num_paths = Operation.check_number(
            num_paths, "num_paths", low=1, low_inclusive=True, integer=True
        )
        self.temperature = (
            None
            if temperature is None
            else Operation.check_number(temperature, "temperature", low=0.0)
        )
        self.solver = _get_solver(solver)

    @property
    def releases(self):
        return self.release

    def check(self, model):
        if self.solver is not None:
            self.solver.check(model)

    def betas(self, walk, context):
        """The task cross-entropy weights the walk tries: 0 without labels, the walk's β
        with them (`"auto"`: `auto_beta` at the strengths 1 and 10)."""
        if context.y is None:
            return (0.0,)
        if walk.beta != "auto":
            return (float(walk.beta),)
        return tuple(
            auto_beta(
                strength,
                context.undamaged,
                context.x,
                distance=walk.distance,
                objective="outputs",
                seed=walk.seed,
            )
            for strength in AUTO_STRENGTHS
        )

    def distance(self, walk):
        """D of the walk: the walk's distance on logits / `temperature` (× T²)."""
        distance = distances_lib.get(walk.distance)
        temperature = self.temperature
        if temperature is None:
            return distance

        def tempered(outputs, reference_outputs):
            return temperature**2 * distance(outputs / temperature, reference_outputs / temperature)

        return tempered

    def repair(self, model, context):
        walk = context.walk
        start = self._solve(model, context)
        betas = self.betas(walk, context)
        runs = [(index, beta) for index in range(self.num_paths) for beta in betas]
        output_kind = model_output_kind(context.undamaged, context.x)
        candidates, best = [], None
        for index, beta in runs:
            seed = None if walk.seed is None else walk.seed + index
            candidate = copy_model(model) if len(runs) > 1 else model
            history, path = self._walk(
                candidate, context, start, beta, seed, output_kind, single=len(runs) == 1
            )
            length = float(history.get("metric_length", [0.0])[-1]) if self.num_paths > 1 else None
            candidates.append(
                {
                    "metric_length": length,
                    "epochs_to_recover": history["epochs_to_recover"],
                    "final_accuracy": history["val_accuracy"][-1],
                    "seed": seed,
                    "beta": beta,
                }
            )
            key = self._candidate_key(history, length, len(betas), context.stop_at_target)
            if best is None or key < best[0]:
                best = (key, candidate, history, path)
        _, model, history, path = best
        if len(runs) > 1:
            history["candidates"] = candidates
            if walk.path_directory is not None:
                path.save(walk.path_directory)  # The chosen candidate's path.
        return model, history, path

    def _solve(self, model, context):
        """Runs the solves (if any): `(damaged accuracy, solve steps, [(epoch, accuracy)])`
        or `None`."""
        if self.solver is None:
            return None
        plan = self.solver.plan(model, num_examples(context.x), context.walk_training)
        if plan is None:
            return None
        before = context.accuracy(model)
        # A network already within the target needs no solve when stopping there.
        if context.stop_at_target and context.recovered(before):
            return None
        batch_size = context.walk.batch_size
        points = []

        def after_batch(used):
            value = context.accuracy(model)
            points.append((used / batch_size / context.steps_per_epoch, value))
            return context.stop_at_target and context.recovered(value)

        used = self.solver.solve(
            model, context.undamaged, context.x, plan, context.rng, after_batch
        )
        return before, used / batch_size, points

    def _walk(self, model, context, start, beta, seed, output_kind, single):
        """One candidate: the history of the solves, then the walk. Returns
        `(history, path)`."""
        walk = context.walk
        history = context.new_history(model)
        offset = 0
        if start is not None:  # The damaged network, then after each solve batch.
            offset = start[1]
            history["epoch"] = [0.0] + [epoch for epoch, _ in start[2]]
            history["val_accuracy"] = [start[0]] + [value for _, value in start[2]]
            history["epochs_to_recover"] = next(
                (
                    epoch
                    for epoch, value in zip(history["epoch"], history["val_accuracy"])
                    if context.recovered(value)
                ),
                None,
            )
        labelled = beta > 0
        trainer = FIPTrainer(
            model,
            rule=walk.rule,
            distance=self.distance(walk),
            beta=beta,
            secondary_loss=(
                keras.losses.SparseCategoricalCrossentropy(from_logits=True) if labelled else None
            ),
            metric_length=self.num_paths > 1,
            training=context.walk_training,
            measure_every=walk.record_every,
            outputs=output_kind,
        )
        # The solves' inputs count in the budget: the walk takes the rest of it.
        walk_steps = context.steps - math.ceil(offset)
        rule = walk.rule
        if isinstance(rule, Penalty):
            rule = Penalty(learning_rate=context.learning_rate)
        trainer.compile(
            optimizer=rule.optimizer(max(walk_steps, 1), projection.prunable_variables(model)),
            jit_compile=walk.jit_compile,
        )
        # Reference outputs: the undamaged network's logits, on the same inputs
        dataset = fip_dataset(
            outputs_lib.logits_model(context.undamaged, output_kind),
            context.x,
            secondary=(context.x, context.y) if labelled else None,
            batch_size=walk.batch_size,
            seed=seed,
        )
        path = Path(
            model,
            record_every=walk.record_every,
            directory=walk.path_directory if single else None,
        )
        evaluator = EvaluationCallback(
            context.evaluator(model, history, offset), context.evaluate_every
        )
        if walk_steps > 0 and (history["epochs_to_recover"] is None or not context.stop_at_target):
            walked = trainer.walk(
                dataset,
                walk_steps,
                path=path,
                steps_per_epoch=math.gcd(walk_steps, context.steps_per_epoch),
                callbacks=[evaluator] + list(walk.callbacks or []),
                verbose=walk.verbose,
                log_dir=walk.log_dir,
            )
            history.update(walked)
            if evaluator.step % context.evaluate_every:
                evaluator.evaluate(evaluator.step)  # The walk's last point.
        if context.walk_training and context.batch_normalized:
            normalization.recalibrate_batch_normalization(model, context.x, walk.batch_size * 2)
        history["steps"] = evaluator.step + offset
        history["solve_epochs"] = offset / context.steps_per_epoch
        history["beta"] = beta
        return history, path

    @staticmethod
    def _candidate_key(history, length, num_betas, stop_at_target):
        """The order of the walked candidates, the least first: with one β, those that
        recover, then the shortest in the metric (`num_paths`); with several, the first to
        recover when stopping there, else the most accurate at the end on the validation
        split (then the shortest)."""
        recovered = history["epochs_to_recover"]
        if num_betas == 1:
            return (recovered is None, length or 0.0)
        final = -history["val_accuracy"][-1]
        if stop_at_target:
            return (recovered is None, 0.0 if recovered is None else recovered, final)
        return (final, length or 0.0)

    def __repr__(self):
        return (
            f"FIP(release={self.release!r}, num_paths={self.num_paths!r}, "
            f"temperature={self.temperature!r}, solver={self.solver!r})"
        )

    def get_config(self):
        return {
            "release": self.release,
            "num_paths": self.num_paths,
            "temperature": self.temperature,
            "solver": None
            if self.solver is None
            else keras.saving.serialize_keras_object(self.solver),
        }
