"""`OutputLayerSolver`: the least-squares and Gauss-Newton solves that start a FIP repair."""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib
from keras_fip.core.config import Config
from keras_fip.core.masks import mask_of
from keras_fip.operations.base import Operation
from keras_fip.operations.repair.training import predict

try:  # scikit-learn's dependency; optional here.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

# The solves `"auto"` plans (when the model's architecture allows them): inputs of the
# output-only first batch, of each later batch, and sweeps; all solve batches together
# read at most this fraction of the training examples (each input once).
AUTO_FIRST = 2000
AUTO_EXAMPLES = 5000
AUTO_SWEEPS = 4
AUTO_FRACTION = 0.5
# Unknowns (output-layer weights × outputs) up to which the softmax-weighted solve is a
# direct dense solve; a larger output layer is fitted in plain least squares.
MAX_WEIGHTED_UNKNOWNS = 5000


def _count_or_auto(value, name, low):
    """`"auto"`, or `value` checked as an integer ≥ `low`."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, str):
        raise ValueError(
            f"`{name}` must be 'auto' or an integer >= {low}. Received: {name}={value!r}"
        )
    return Operation.check_number(value, name, low=low, low_inclusive=True, integer=True)


def _inputs(model):
    """A model's input tensor (its list when it has several), as it is called."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _activation_slope(activation, pre):
    """(activation'(pre), activation(pre)) of an elementwise activation, as float64."""
    if activation in (None, keras.activations.linear):
        return np.ones_like(pre), pre
    values = tf.constant(pre)
    with tf.GradientTape() as tape:
        tape.watch(values)
        outputs = activation(values)
    slope = tape.gradient(outputs, values)
    return np.asarray(slope, np.float64), np.asarray(outputs, np.float64)


@keras.saving.register_keras_serializable(package="keras_fip")
class OutputLayerSolver(Config):
    """Closed-form solves that start a FIP repair: the output layer, then its hidden layer.

    Where a model ends in a Dense layer (linear, or softmax: its pre-activation is fitted)
    and is not walked on BatchNorm batch statistics, `keras_fip.repair.FIP` starts the
    repair with solves on fresh training inputs, every input counted in the repair's
    budget (`op.history["solve_epochs"]`):

    - the output layer is set to the exact minimiser of the distance of its
      pre-activation to the undamaged network's logits on `examples` inputs: the
      least-squares fit of the undamaged logits from the damaged network's features, or,
      with a `temperature` T, the logit-space Gauss-Newton model of the softmax KL at T
      around the undamaged outputs, Σ_x (z(x) − z*(x))ᵀ H(x) (z(x) − z*(x)) with
      H = diag(p) − p pᵀ + εI and p = softmax(z*/T) (ε = 1e-3), still an exact weighted
      least-squares solve (a layer with more than 5,000 weights × outputs is fitted in
      plain least squares);
    - when that layer reads a hidden Dense layer with an elementwise activation (an MLP),
      `sweeps` Gauss-Newton sweeps of the hidden units follow, each on `examples` fresh
      inputs: the output layer is solved as above, then, with the output weights and the
      activation pattern fixed, each surviving unit in turn (Gauss-Seidel) takes the
      least-squares step of its incoming weights and bias towards the undamaged logits,
      in the leading `rank` principal directions of the layer's inputs, damped
      (Levenberg-Marquardt) by `damping` × the mean diagonal of its system; a last batch
      solves the output layer again. `first` inputs of an output-only batch come first.

    Damaged weights stay exactly zero (a unit's step only uses its unmasked inputs;
    deleted units are not touched). The validation accuracy is measured after every
    output-layer solve; when the repair stops at its target, the solves stop once the
    network has recovered. `"auto"` plans 5,000 inputs per batch, 4 sweeps and a first
    batch of 2,000 where the architecture allows, all the batches together reading at
    most half the training examples (each input once; smaller batches on small data).

    Args:
        examples: Inputs of each solve batch, or `"auto"` (5,000 where the model ends in
            such a layer and is not walked on batch statistics; none otherwise). An
            explicit number on a model that does not end in such a layer raises an
            error. Defaults to `"auto"`.
        sweeps: Gauss-Newton sweeps of the hidden layer, or `"auto"` (4 where the output
            layer reads a hidden Dense layer, else 0). Defaults to `"auto"`.
        first: Inputs of an output-only first batch before the sweeps, or `"auto"`
            (2,000 when there are sweeps); 0: none. Defaults to `"auto"`.
        rank: Principal directions of the hidden layer's inputs in which each unit's
            weights move. Defaults to `200`.
        temperature: T of the softmax weighting of the solves, or `None` (plain least
            squares on the logits). Defaults to `4.0`.
        damping: λ, the Levenberg-Marquardt damping of each unit's sweep step. Defaults to
            `0.1`.

    Examples:

        >>> solver = OutputLayerSolver(examples=1000, sweeps=2)
        >>> OutputLayerSolver.from_config(solver.get_config()) == solver
        True
        >>> x, y = keras_fip.data.load("digits")
        >>> model = keras_fip.models.mlp(32, input_shape=(8, 8, 1))
        >>> damaged = keras_fip.Damage(keras_fip.faults.Nodes(0.5), seed=0)(model)
        >>> repair = keras_fip.Repair(x, method=keras_fip.repair.FIP(solver=solver),
        ...                           walk=keras_fip.Walk(epochs=1, seed=0, verbose=0))
        >>> repaired = repair(damaged)
        >>> repair.history["solve_epochs"] > 0
        True
    """

    def __init__(
        self,
        examples="auto",
        *,
        sweeps="auto",
        first="auto",
        rank=200,
        temperature=4.0,
        damping=0.1,
    ):
        self.examples = _count_or_auto(examples, "examples", 1)
        self.sweeps = _count_or_auto(sweeps, "sweeps", 0)
        self.first = _count_or_auto(first, "first", 0)
        if self.first not in ("auto", 0) and self.sweeps == 0:
            raise ValueError(
                "`first` is an output-only batch before the sweeps: pass `sweeps > 0` or "
                f"'auto'. Received: first={first!r}, sweeps={sweeps!r}"
            )
        self.rank = Operation.check_number(rank, "rank", low=1, low_inclusive=True, integer=True)
        self.temperature = (
            None
            if temperature is None
            else Operation.check_number(temperature, "temperature", low=0.0)
        )
        self.damping = Operation.check_number(damping, "damping", low=0.0, low_inclusive=True)

    # Planning.

    def _output_layer(self, model):
        """The model's output layer if the solves can fit it, else `None`."""
        layer = model.layers[-1] if model.layers else None
        try:
            readable = (
                isinstance(layer, keras.layers.Dense)
                and len(model.outputs) == 1
                and model.outputs[0] is layer.output
                and (
                    layer.activation in (None, keras.activations.linear)
                    or outputs_lib.structural_output_kind(model) == "probabilities"
                )
            )
        except (AttributeError, ValueError):  # Subclassed models: no graph to read.
            readable = False
        return layer if readable else None

    @staticmethod
    def _hidden_layer(model, layer):
        """The Dense layer (elementwise activation) whose output the output layer reads,
        or `None`."""
        index = model.layers.index(layer)
        hidden = model.layers[index - 1] if index > 0 else None
        if (
            isinstance(hidden, keras.layers.Dense)
            and layer.input is hidden.output
            and hidden.activation not in (keras.activations.softmax, keras.activations.log_softmax)
        ):
            return hidden
        return None

    def check(self, model):
        """Raises a `ValueError` if explicit settings do not fit `model`'s architecture."""
        if self.examples == "auto" and self.sweeps in ("auto", 0):
            return
        layer = self._output_layer(model)
        if layer is None:
            last = model.layers[-1] if model.layers else None
            raise ValueError(
                "`examples` needs a model whose last layer is a Dense layer returning the "
                "logits (linear) or the probabilities (softmax). Received: a model ending "
                f"in `{getattr(last, 'name', None)}` ({type(last).__name__})"
            )
        if self.sweeps not in ("auto", 0) and self._hidden_layer(model, layer) is None:
            index = model.layers.index(layer)
            hidden = model.layers[index - 1] if index > 0 else None
            raise ValueError(
                "`sweeps` needs the output layer to read a hidden Dense layer with an "
                "elementwise activation directly (an MLP). Received: the output layer "
                f"`{layer.name}` after `{getattr(hidden, 'name', None)}` "
                f"({type(hidden).__name__})"
            )

    def plan(self, model, count, walk_training):
        """The solves on `count` training examples: `(output layer, hidden layer or None,
        batch sizes, number of output-only first batches)`, or `None` for none."""
        if self.examples == "auto" and walk_training:
            return None  # The solves fit the inference function, not the batch statistics.
        layer = self._output_layer(model)
        if layer is None:
            if self.examples == "auto":
                return None
            self.check(model)
        size = AUTO_EXAMPLES if self.examples == "auto" else self.examples
        hidden = self._hidden_layer(model, layer)
        if self.sweeps == "auto":
            sweeps = AUTO_SWEEPS if hidden is not None else 0
        else:
            if self.sweeps:
                self.check(model)
            sweeps = self.sweeps
        hidden = hidden if sweeps else None
        first = AUTO_FIRST if self.first == "auto" else self.first
        first = first if hidden is not None else 0
        sizes = ([first] if first else []) + [size] * (sweeps + 1)
        sizes = [min(s, count) for s in sizes]
        automatic = (
            self.examples == "auto"
            or (self.sweeps == "auto" and sweeps > 0)
            or (self.first == "auto" and first > 0)
        )
        if automatic and sum(sizes) > AUTO_FRACTION * count:
            # Every solve input a fresh training example, half an epoch at most.
            scale = AUTO_FRACTION * count / sum(sizes)
            sizes = [max(1, int(s * scale)) for s in sizes]
        return layer, hidden, sizes, 1 if first else 0

    # Solving.

    def solve(self, model, undamaged, x, plan, rng, after_batch=None):
        """Runs the planned solves on `model` (in place).

        Args:
            model: The damaged model (its masks held).
            undamaged: The undamaged network (same architecture).
            x: Training inputs; each batch draws fresh ones.
            plan: The plan from `plan`.
            rng: A `numpy.random.Generator` (the order of the inputs).
            after_batch: `after_batch(inputs_used) -> stop`, called after every
                output-layer solve. Defaults to `None`.

        Returns:
            The number of training inputs the solves used.
        """
        # Many small dense solves: one BLAS thread avoids oversubscribing the cores (with
        # TensorFlow's own threads).
        limit = (
            threadpool_limits(limits=1, user_api="blas")
            if threadpool_limits
            else contextlib.nullcontext()
        )
        with limit:
            return self._solve(model, undamaged, x, plan, rng, after_batch)

    def _solve(self, model, undamaged, x, plan, rng, after_batch):
        layer, hidden, sizes, first = plan
        count = data_adapter.num_examples(x)
        order = rng.permutation(count)
        features = keras.Model(_inputs(model), (hidden or layer).input)  # Sequential too
        kernel_mask = mask_of(layer.kernel)
        hidden_kernel_mask = None if hidden is None else mask_of(hidden.kernel)
        hidden_bias_mask = None if hidden is None or hidden.bias is None else mask_of(hidden.bias)
        # The undamaged network's logits: its output layer's pre-activation (a softmax
        # model's logits, not its log-probabilities: the least squares fit them exactly).
        undamaged_layer = undamaged.layers[-1]
        undamaged_features = keras.Model(_inputs(undamaged), undamaged_layer.input)
        undamaged_kernel = np.asarray(undamaged_layer.kernel.numpy(), np.float64)
        undamaged_bias = (
            0.0
            if undamaged_layer.bias is None
            else np.asarray(undamaged_layer.bias.numpy(), np.float64)
        )
        basis, used = None, 0
        for index, size in enumerate(sizes):
            chosen = np.sort(np.take(order, np.arange(used, used + size), mode="wrap"))
            used += size
            inputs = data_adapter.take(x, chosen)
            reference_features = predict(undamaged_features, inputs).reshape(size, -1)
            targets = reference_features.astype(np.float64) @ undamaged_kernel + undamaged_bias
            below = predict(features, inputs).reshape(size, -1).astype(np.float64)
            curvature = self._curvature(targets)
            if hidden is None:
                _least_squares_output(layer, kernel_mask, below, targets, curvature)
                if after_batch is not None:
                    after_batch(used)
                return used
            kernel = np.asarray(hidden.kernel.numpy(), np.float64)
            bias = (
                np.zeros(kernel.shape[1])
                if hidden.bias is None
                else np.asarray(hidden.bias.numpy(), np.float64)
            )
            pre = below @ kernel + bias
            slope, activations = _activation_slope(hidden.activation, pre)
            residual = _least_squares_output(layer, kernel_mask, activations, targets, curvature)
            stop = after_batch is not None and after_batch(used)
            if stop or index == len(sizes) - 1:
                return used
            if index < first:
                continue  # The output-only first batch.
            if basis is None:  # Leading principal directions of the layer's inputs, + bias
                centred = below - below.mean(axis=0)
                rank = min(self.rank, *centred.shape)
                directions = np.linalg.svd(centred, full_matrices=False)[2][:rank].T
                basis = np.zeros((kernel.shape[0] + 1, rank + 1))
                basis[:-1, :rank] = directions
                basis[-1, rank] = 1.0
            _gauss_newton_sweep(
                hidden,
                layer,
                (hidden_kernel_mask, hidden_bias_mask),
                below,
                slope,
                residual,
                basis,
                curvature,
                self.damping,
            )
        return used

    def _curvature(self, targets):
        """The logit weights H(x) of the solves (`temperature`), or `None`."""
        if self.temperature is None:
            return None
        logits = targets / self.temperature
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        eye = np.eye(targets.shape[1])
        return p[:, :, None] * eye[None] - p[:, :, None] * p[:, None, :] + 1e-3 * eye[None]

    # Serialisation.

    def get_config(self):
        """The constructor arguments."""
        return {
            "examples": self.examples,
            "sweeps": self.sweeps,
            "first": self.first,
            "rank": self.rank,
            "temperature": self.temperature,
            "damping": self.damping,
        }

    def __hash__(self):
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"OutputLayerSolver({arguments})"


def _least_squares_output(layer, mask, features, targets, curvature=None):
    """Sets `layer` to the least-squares fit of `targets` (weighted by `curvature`,
    per-example logit matrices, if given), its kernel's zeros under `mask` kept; returns
    the residual."""
    count = len(features)
    design = np.concatenate([features, np.ones((count, 1))], axis=1)
    solution = np.zeros((design.shape[1], targets.shape[1]))
    if curvature is not None and design.shape[1] * targets.shape[1] > MAX_WEIGHTED_UNKNOWNS:
        curvature = None  # Too large a dense system: plain least squares.
    if curvature is not None:
        # Σ_x (D_x W − z*_x)ᵀ H_x (D_x W − z*_x) over the free entries of vec(W): the
        # normal equations couple the outputs through H, block (c, c') = Dᵀ diag(H_cc') D.
        free = np.ones((design.shape[1], targets.shape[1]), bool)
        if mask is not None:
            free = np.concatenate([mask, np.ones((1, mask.shape[1]), bool)], axis=0)
        rows = free.any(axis=1)
        local = design[:, rows]
        size, outputs = local.shape[1], targets.shape[1]
        system = np.zeros((outputs * size, outputs * size))
        rhs = np.zeros((outputs, size))
        weighted_targets = np.einsum("ncd,nd->nc", curvature, targets)
        for c in range(outputs):
            rhs[c] = local.T @ weighted_targets[:, c]
            for d in range(c, outputs):
                block = (local * curvature[:, c, d][:, None]).T @ local
                system[c * size : (c + 1) * size, d * size : (d + 1) * size] = block
                system[d * size : (d + 1) * size, c * size : (c + 1) * size] = block.T
        keep = free[rows].T.reshape(-1)  # vec order: output-major, like the blocks
        system = system[np.ix_(keep, keep)]
        system += np.eye(len(system)) * (1e-10 * np.trace(system) / len(system))
        values = np.zeros(outputs * size)
        values[keep] = np.linalg.solve(system, rhs.reshape(-1)[keep])
        solution[rows] = values.reshape(outputs, size).T
    elif mask is None or np.all(mask == mask[:, :1]):  # Whole rows held at zero (or none)
        rows = np.ones(design.shape[1], bool)
        if mask is not None:
            rows[:-1] = mask[:, 0]
        solution[rows], *_ = np.linalg.lstsq(design[:, rows], targets, rcond=None)
    else:  # Each output's own free inputs
        for column in range(targets.shape[1]):
            rows = np.append(mask[:, column], True)
            solution[rows, column], *_ = np.linalg.lstsq(
                design[:, rows], targets[:, column], rcond=None
            )
    layer.kernel.assign(solution[:-1].astype(layer.kernel.dtype))
    if layer.bias is not None:
        layer.bias.assign(solution[-1].astype(layer.bias.dtype))
    else:
        solution[-1] = 0.0
    return targets - design @ solution


def _gauss_newton_sweep(
    hidden, layer, masks, below, slope, residual, basis, curvature=None, damping=1e-6
):
    """One Gauss-Seidel pass of least-squares steps over the hidden units (in place).

    With the output weights c_j (row j of the output kernel) and the activation slopes
    s_j(x) fixed, changing unit j's incoming weights by δ changes the logits by
    c_j s_j(x) (x̃·δ) (x̃: the layer's input with a 1 for the bias); δ = P u in the
    principal basis P (rows of masked inputs zeroed) minimises
    Σ_x ‖r(x) − c_j s_j(x) x̃ᵀP u‖², a (rank+1)-square system (with `curvature`, the
    H(x)-weighted norm: the scalars cᵀHc and cᵀHr replace ‖c‖² and cᵀr). The residual is
    then updated through the activation itself, so the next unit's step starts from the
    network as it now is. Each unit's system is damped (Levenberg-Marquardt) by `damping`
    times its mean diagonal. `masks` are the hidden kernel's and bias's (or `None`).
    """
    kernel_mask, bias_mask = masks
    kernel = np.asarray(hidden.kernel.numpy(), np.float64)
    bias = None if hidden.bias is None else np.asarray(hidden.bias.numpy(), np.float64)
    readout = np.asarray(layer.kernel.numpy(), np.float64)
    extended = np.concatenate([below, np.ones((len(below), 1))], axis=1)
    projected = extended @ basis
    activation = hidden.activation
    pre = below @ kernel + (0.0 if bias is None else bias)
    _, outputs = _activation_slope(activation, pre)
    pre, outputs = np.array(pre), np.array(outputs)
    for unit in range(kernel.shape[1]):
        allowed = np.ones(kernel.shape[0] + 1, bool)
        if kernel_mask is not None:
            allowed[:-1] = kernel_mask[:, unit]
        if bias is None or (bias_mask is not None and not bias_mask[unit]):
            allowed[-1] = False
        weights = slope[:, unit]
        active = weights != 0
        c = readout[unit]
        norm = float(c @ c)
        if not allowed.any() or norm == 0.0 or not active.any():
            continue  # A deleted unit, or one the output does not read.
        if allowed.all():
            local, directions = projected[active], basis
        else:
            directions = basis * allowed[:, None]
            local = extended[active] @ directions
        if curvature is None:
            gains, targets = np.full(int(active.sum()), norm), residual[active] @ c
        else:  # cᵀ H(x) c and cᵀ H(x) r(x)
            weighted = curvature[active] @ c
            gains = weighted @ c
            targets = np.sum(weighted * residual[active], axis=1)
        scaled = local * weights[active, None]
        gram = (scaled * gains[:, None]).T @ scaled
        gram += np.eye(len(gram)) * (damping * np.trace(gram) / len(gram) + 1e-12)
        rhs = scaled.T @ targets
        step = np.linalg.solve(gram, rhs)
        delta = directions @ step
        kernel[:, unit] += delta[:-1]
        if bias is not None:
            bias[unit] += delta[-1]
        # The residual after the step, through the activation itself (Gauss-Seidel: the
        # next unit sees this one's new output).
        moved = pre[:, unit] + extended @ delta
        _, after = _activation_slope(activation, moved)
        residual -= np.outer(after - outputs[:, unit], c)
        pre[:, unit], outputs[:, unit] = moved, after
    if kernel_mask is not None:
        kernel *= kernel_mask
    hidden.kernel.assign(kernel.astype(hidden.kernel.dtype))
    if bias is not None:
        if bias_mask is not None:
            bias *= bias_mask
        hidden.bias.assign(bias.astype(hidden.bias.dtype))
