"""The L∞ signed-gradient ascent that every in-graph attack of the library runs."""

import tensorflow as tf


def signed_gradient_ascent(loss, x, start, epsilon, step_size, steps, clip_values):
    """`steps` signed-gradient steps on `loss`, each projected on the L∞ ball around `x`.

    From `start`, `steps` times x' ← Π(x' + α·sign(∇ₓ' loss(x'))), Π the projection on
    {‖x' − x‖∞ ≤ ε} ∩ [min, max]: PGD from a random `start`, FGSM with one step from `x`.
    Graph-safe; the caller chooses the start (and so its random numbers).

    Args:
        loss: `loss(x') -> scalar tensor`, the objective raised.
        x: The clean batch (tensor).
        start: The first point (tensor of `x`'s shape).
        epsilon: ε, the ball's radius.
        step_size: α.
        steps: The number of steps (a Python integer).
        clip_values: `(min, max)` of valid inputs.

    Returns:
        The last point (no gradient flows through it).

    Examples:

        >>> x = tf.zeros((1, 2))
        >>> moved = signed_gradient_ascent(
        ...     lambda z: tf.reduce_sum(z * [1.0, -1.0]), x, x, 0.1, 0.05, 3, (-1.0, 1.0))
        >>> [round(float(v), 2) for v in moved[0]]
        [0.1, -0.1]
    """
    low, high = clip_values
    x = tf.convert_to_tensor(x)
    adversarial = start
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(adversarial)
            value = loss(adversarial)
        adversarial = adversarial + step_size * tf.sign(tape.gradient(value, adversarial))
        adversarial = tf.clip_by_value(adversarial, x - epsilon, x + epsilon)
        adversarial = tf.clip_by_value(adversarial, low, high)
    return tf.stop_gradient(adversarial)
