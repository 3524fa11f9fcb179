"""The three FIP step rules, as small pure functions on lists of tensors.

At weights `w` the FIP step is the direction θ with `‖θ‖ = ε` that minimises
`θᵀ g θ + β θᵀ ∇L`, with `g` the metric tensor on anchor data and `L` the secondary
objective. Three rules compute it:

- `penalty`: the gradient of `D(f(X; w), f(X; w_ref)) + β·L(w)` is handed to any Keras
  optimizer (this module only names the rule; the trainer does the rest).
- `normalized`: that gradient, rescaled to Euclidean length ε (`normalized_step`).
- `metric`: `(g + δI) θ = −β ∇L` solved by conjugate gradient with the matrix-free product
  `g·v`, then rescaled to length ε (`metric_step`): the paper's equation, solved directly.

Vectors are lists of tensors aligned with `model.trainable_variables`. Every function is
graph-safe (no Python side effects, a static number of CG iterations). Inside a
`tf.distribute` replica context the caller passes gradients already all-reduced
(`all_reduce_mean`), and `metric_step` all-reduces every product `g·v`, so every replica
computes the step one device would compute on the global batch. Each all-reduce depends on
the previous one's result, so collectives run in the same order on every replica.
"""

import keras
import tensorflow as tf

from keras_fip.core import masks as masks_lib

STEP_RULES = ("penalty", "normalized", "metric")


def check_step_rule(step_rule):
    """Raises a `ValueError` unless `step_rule` is one of `STEP_RULES`."""
    if step_rule not in STEP_RULES:
        raise ValueError(
            f"`step_rule` must be one of {list(STEP_RULES)}. Received: step_rule={step_rule!r}"
        )
    return step_rule


def mean_cross_entropy(labels, logits):
    """The batch mean of the sparse categorical cross-entropy of `logits`.

    The loss function, not a `keras.losses.Loss` object: under a `tf.distribute` strategy
    the object's mean is already divided by the replicas, and the custom steps here scale
    each replica's loss themselves (`num_replicas`).
    """
    return keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def labels_term(model, batch, weight):
    """`weight` × the batch mean cross-entropy of `model` on a labelled `(inputs, labels)`
    batch (training mode), or 0.0 without a weight or a batch: the labels' term the walks
    towards a projection (Compress, Quantize) add to their pull."""
    if not weight or batch is None:
        return 0.0
    inputs, labels = batch
    return weight * mean_cross_entropy(labels, model(inputs, training=True))


def num_replicas():
    """The number of replicas in sync in the current replica context (1 outside one)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 1
    return context.num_replicas_in_sync


def all_reduce_mean(tensors):
    """Means a list of tensors across replicas; the identity on one replica.

    Args:
        tensors: List of tensors, the same structure on every replica.

    Returns:
        A list of tensors: the mean over replicas of each entry.

    Examples:

        >>> [float(t) for t in all_reduce_mean([tf.constant(2.0)])]
        [2.0]
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(tensors)
    return list(context.all_reduce(tf.distribute.ReduceOp.MEAN, list(tensors)))


def inner_product(left, right):
    """`Σ_i ⟨left_i, right_i⟩` over two aligned lists of tensors, as a scalar."""
    return tf.add_n([tf.reduce_sum(a * tf.cast(b, a.dtype)) for a, b in zip(left, right)])


def global_norm(tensors):
    """Euclidean norm of a list of tensors taken as one vector."""
    return tf.sqrt(inner_product(tensors, tensors))


def apply_masks(tensors, masks):
    """Multiplies each tensor by its mask; entries whose mask is `None` pass through.

    Args:
        tensors: List of tensors.
        masks: `None`, or a list aligned with `tensors` of `None` or 0/1 arrays.

    Returns:
        A list of tensors.
    """
    if masks is None:
        return list(tensors)
    return [
        tensor if mask is None else tensor * tf.cast(masks_lib.graph_mask(mask), tensor.dtype)
        for tensor, mask in zip(tensors, masks)
    ]


def rescale(tensors, length):
    """Rescales a list of tensors to Euclidean length `length`; zero stays zero.

    Args:
        tensors: List of tensors taken as one vector.
        length: The target Euclidean length ε.

    Returns:
        A tuple `(rescaled, norm)`, `norm` the length before rescaling.
    """
    norm = global_norm(tensors)
    scale = tf.math.divide_no_nan(tf.cast(length, norm.dtype), norm)
    return [tensor * tf.cast(scale, tensor.dtype) for tensor in tensors], norm


def normalized_step(gradients, epsilon, masks=None):
    """The `normalized` rule: the displacement −ε·∇/‖∇‖ for a gradient of D + β·L.

    In a replica context pass the gradients all-reduced (`all_reduce_mean`), so the step is
    the same on every replica and equal to the one-device step on the global batch.
    Masked entries are zeroed before normalising, so the step actually taken has length ε.

    Args:
        gradients: List of tensors, the (global) gradient of the objective, aligned with
            the trainable variables.
        epsilon: The step length ε.
        masks: `None`, or a list of `None` or 0/1 arrays aligned with `gradients`.
            Defaults to `None`.

    Returns:
        A tuple `(displacement, gradient_norm)`: the step θ to add to the weights, of
        Euclidean length ε (zero if the gradient is zero), and `‖∇‖`.

    Examples:

        >>> step, norm = normalized_step([tf.constant([3.0, 4.0])], epsilon=0.5)
        >>> [round(float(v), 6) for v in step[0]], float(norm)
        ([-0.3, -0.4], 5.0)
    """
    gradients = apply_masks(gradients, masks)
    direction, norm = rescale(gradients, epsilon)
    return [-tensor for tensor in direction], norm


def _default_tolerance(dtype):
    return 1e-12 if tf.as_dtype(dtype).size >= 8 else 1e-5


def conjugate_gradient(matvec, rhs, iterations, damping=0.0, tolerance=None):
    """Solves `(A + δI) x = rhs` by conjugate gradient, A symmetric positive semi-definite.

    At most `iterations` iterations, starting from `x = 0`. Once the residual is
    below `tolerance · ‖rhs‖` the iterate is frozen, so rounding noise of an already
    converged solve is not amplified (which also keeps one-device and multi-replica solves
    equal). Graph-safe.

    Args:
        matvec: Callable mapping a list of tensors `v` to `A·v` (same structure).
        rhs: List of tensors, the right-hand side.
        iterations: Static number of CG iterations (Python int ≥ 1).
        damping: δ ≥ 0, added to the diagonal. Defaults to `0.0`.
        tolerance: Relative residual at which to stop. Defaults to `None`: `1e-5` in
            single precision, `1e-12` in double precision.

    Returns:
        A tuple `(solution, residual_norm)`.

    Examples:

        >>> solution, _ = conjugate_gradient(
        ...     lambda v: [2.0 * v[0]], [tf.constant([2.0, 4.0])], iterations=2
        ... )
        >>> [float(v) for v in solution[0]]
        [1.0, 2.0]
    """
    if tolerance is None:
        tolerance = _default_tolerance(rhs[0].dtype)
    solution = [tf.zeros_like(tensor) for tensor in rhs]
    residual = list(rhs)
    direction = list(rhs)
    residual_squared = inner_product(residual, residual)
    threshold = tf.cast(tolerance, residual_squared.dtype) ** 2 * residual_squared

    def iteration(solution, residual, direction, residual_squared):
        active = residual_squared > threshold
        product = matvec(direction)
        if damping:
            product = [p + tf.cast(damping, p.dtype) * d for p, d in zip(product, direction)]
        curvature = inner_product(direction, product)
        alpha = tf.where(active, tf.math.divide_no_nan(residual_squared, curvature), 0.0)
        solution = [x + tf.cast(alpha, x.dtype) * d for x, d in zip(solution, direction)]
        residual = [r - tf.cast(alpha, r.dtype) * p for r, p in zip(residual, product)]
        new_residual_squared = inner_product(residual, residual)
        beta = tf.where(active, tf.math.divide_no_nan(new_residual_squared, residual_squared), 1.0)
        direction = [r + tf.cast(beta, r.dtype) * d for r, d in zip(residual, direction)]
        return solution, residual, direction, new_residual_squared

    state = (solution, residual, direction, residual_squared)
    if num_replicas() > 1:
        # Unrolled: every product all-reduces, and collectives stay out of loops.
        for _ in range(int(iterations)):
            state = iteration(*state)
    else:
        # One traced iteration (a graph the size of one product, not of `iterations`),
        # left once the residual is below the tolerance: a frozen iterate would not move.
        state = tf.while_loop(
            lambda *state: state[-1] > threshold,
            iteration,
            state,
            maximum_iterations=int(iterations),
        )
    solution, _, _, residual_squared = state
    return solution, tf.sqrt(residual_squared)


def metric_step(
    metric_product,
    secondary_gradients,
    beta,
    epsilon,
    damping=1e-3,
    iterations=10,
    masks=None,
):
    """The `metric` rule: solve `(g + δI) θ = −β ∇L` by CG, rescale θ to length ε.

    `metric_product(v)` is this replica's `g·v` on its anchor batch (e.g.
    `keras_fip.geometry.metric_vector_product`); in a replica context every product is
    all-reduced (mean) and the caller passes the all-reduced gradient, so the step is the
    one-device step on the global batch.
    With masks, the system is solved on the unmasked coordinates (`P (g + δI) P θ = −β P ∇L`).

    Args:
        metric_product: Callable mapping a list of tensors `v` to `g·v` on this replica.
        secondary_gradients: List of tensors, the (global) `∇L`, aligned with the
            trainable variables.
        beta: β, the weight of the secondary objective.
        epsilon: The step length ε.
        damping: δ > 0 added to g so the system is positive definite. Defaults to `1e-3`.
        iterations: Static number of CG iterations. Defaults to `10`.
        masks: `None`, or a list of `None` or 0/1 arrays aligned with the gradients.
            Defaults to `None`.

    Returns:
        A tuple `(displacement, residual_norm)`: θ rescaled to length ε (zero when ∇L is
        zero), and the CG residual norm of the unscaled solve.

    Examples:

        >>> step, _ = metric_step(
        ...     lambda v: [4.0 * v[0]], [tf.constant([1.0, 0.0])], beta=1.0, epsilon=0.1
        ... )
        >>> [round(float(v), 6) for v in step[0]]
        [-0.1, 0.0]
    """
    gradients = apply_masks(secondary_gradients, masks)
    rhs = [-tf.cast(beta, g.dtype) * g for g in gradients]

    def matvec(vector):
        return apply_masks(all_reduce_mean(metric_product(vector)), masks)

    solution, residual_norm = conjugate_gradient(
        matvec, rhs, iterations=iterations, damping=damping
    )
    displacement, _ = rescale(solution, epsilon)
    return displacement, residual_norm
