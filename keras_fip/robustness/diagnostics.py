"""Diagnostics of ensemble diversity: weight distances, gradient coherence, linear CKA.

The FIP paper attributes its ensembles' robustness to weight diversity and low coherence
with the attacker's surrogate; its supplement, which defines them, is not available, so
the definitions used here are spelled out in each function.
"""

import itertools

import keras
import numpy as np
import tensorflow as tf


def _flat_weights(model):
    return np.concatenate(
        [
            np.ravel(keras.ops.convert_to_numpy(v.value)).astype(np.float64)
            for v in model.trainable_variables
        ]
    )


def weight_distances(models):
    """Pairwise Euclidean distances between networks of one architecture.

    d(i, j) = ‖w_i − w_j‖₂ over all trainable weights taken as one vector. Summaries:
    the mean pairwise distance, and the same relative to the mean weight norm ‖w_i‖₂
    (0 = identical weights; about √2 for independent networks of equal norm).

    Args:
        models: A list of at least two `keras.Model` with equal weight shapes.

    Returns:
        A dict: `"matrix"` (K×K numpy array), `"mean"` and `"relative_mean"` (floats).

    Examples:

        >>> a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> weight_distances([a, a])["mean"]
        0.0
    """
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError(
            f"`models` must be a list of at least two models. Received: models={models!r}"
        )
    flat = [_flat_weights(m) for m in models]
    if len({len(f) for f in flat}) != 1:
        raise ValueError(
            "`models` must share one architecture (equal numbers of weights). Received: "
            f"{[len(f) for f in flat]} weights"
        )
    count = len(flat)
    matrix = np.zeros((count, count))
    for i, j in itertools.combinations(range(count), 2):
        matrix[i, j] = matrix[j, i] = np.linalg.norm(flat[i] - flat[j])
    pairs = matrix[np.triu_indices(count, 1)]
    norm = float(np.mean([np.linalg.norm(f) for f in flat]))
    return {
        "matrix": matrix,
        "mean": float(pairs.mean()),
        "relative_mean": float(pairs.mean() / norm) if norm > 0 else 0.0,
    }


def input_gradients(model, x, y, batch_size=256):
    """∇ₓ of the cross-entropy of the true label, per example, for any classifier.

    The loss is −log p_y on the model's logits, or on the log-probabilities of a model
    returning probabilities; ensembles are differentiated through −log p̄_y
    (`keras_fip.robustness.logit_model`).

    Args:
        model: A classifier (logits or probabilities) or a keras_fip ensemble.
        x: Inputs.
        y: Integer labels.
        batch_size: Examples per batch. Defaults to `256`.

    Returns:
        A numpy array shaped like `x`.
    """
    from keras_fip.robustness.attacks import logit_model

    network = logit_model(model)
    gradients = []
    for start in range(0, len(x), batch_size):
        inputs = tf.constant(np.asarray(x[start : start + batch_size], "float32"))
        labels = tf.constant(np.asarray(y[start : start + batch_size]).astype("int64"))
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = keras.losses.sparse_categorical_crossentropy(
                labels, network(inputs, training=False), from_logits=True
            )
        gradients.append(tape.gradient(loss, inputs).numpy())
    return np.concatenate(gradients)


def gradient_coherence(model, surrogate, x, y, batch_size=256):
    """Coherence with a surrogate: the mean cosine between their input gradients.

    coherence = mean over examples of cos(∇ₓℓ_model(x, y), ∇ₓℓ_surrogate(x, y)), ℓ the
    cross-entropy of the true label (−log p̄_y for an ensemble). Transfer attacks follow
    the surrogate's gradient, so a model whose loss gradient points elsewhere (low
    coherence) is harder to attack through the surrogate. Examples where either gradient
    is zero are left out.

    Args:
        model: A classifier (logits or probabilities) or a keras_fip ensemble.
        surrogate: The attacker's classifier (logits or probabilities).
        x: Inputs.
        y: Integer labels.
        batch_size: Examples per batch. Defaults to `256`.

    Returns:
        A float in [−1, 1].
    """
    left = input_gradients(model, x, y, batch_size).reshape(len(x), -1)
    right = input_gradients(surrogate, x, y, batch_size).reshape(len(x), -1)
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    valid = norms > 0
    if not np.any(valid):
        return 0.0
    return float(np.mean(np.sum(left * right, axis=1)[valid] / norms[valid]))


def linear_cka(features_x, features_y):
    """Linear centred kernel alignment of two representations of the same examples.

    CKA(X, Y) = ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F), with X (n×p) and Y (n×q) centred over
    the n examples (Kornblith et al., 2019). 1 for representations equal up to a rotation
    and isotropic scaling, near 0 for unrelated ones.

    Args:
        features_x: Array of shape (n, ...) (flattened to (n, p)).
        features_y: Array of shape (n, ...) with the same n.

    Returns:
        A float in [0, 1].

    Examples:

        >>> features = np.random.default_rng(0).normal(size=(50, 4))
        >>> round(linear_cka(features, 2 * features), 6)
        1.0
    """
    x = np.asarray(features_x, np.float64).reshape(len(features_x), -1)
    y = np.asarray(features_y, np.float64).reshape(len(features_y), -1)
    if len(x) != len(y):
        raise ValueError(
            "`features_x` and `features_y` must hold the same examples. Received: "
            f"{len(x)} and {len(y)} rows"
        )
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    # With n < p, the n×n Gram matrices are the cheaper route to the same value.
    if x.shape[1] > len(x) or y.shape[1] > len(y):
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = np.sum(gram_x * gram_y)
        denominator = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    else:
        cross = np.linalg.norm(y.T @ x) ** 2
        denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denominator) if denominator > 0 else 0.0


def _weighted_layers(model):
    return [
        layer
        for layer in model.layers
        if layer.trainable_weights and not isinstance(layer, keras.Model)
    ]


def layer_activations(model, x, batch_size=256):
    """The outputs of each weighted layer of a functional model on `x`.

    Args:
        model: A Sequential or functional `keras.Model`.
        x: Inputs.
        batch_size: Examples per batch. Defaults to `256`.

    Returns:
        A dict layer name → numpy array of activations.
    """
    layers = _weighted_layers(model)
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = [[] for _ in layers]
    for start in range(0, len(x), batch_size):
        values = probe(x[start : start + batch_size], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for store, value in zip(outputs, values):
            store.append(keras.ops.convert_to_numpy(value))
    return {layer.name: np.concatenate(store) for layer, store in zip(layers, outputs)}


def layer_cka(models, x, batch_size=256):
    """Representation similarity per layer: the mean pairwise linear CKA across networks.

    For each weighted layer (by name, shared by the networks of one architecture) the
    activations of every pair of networks on `x` are compared with `linear_cka`; the
    diversity of the layer is 1 − the mean.

    Args:
        models: A list of at least two functional models of one architecture.
        x: Inputs (a few hundred examples are enough).
        batch_size: Examples per batch. Defaults to `256`.

    Returns:
        A dict layer name → mean pairwise CKA, in layer order.
    """
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError(
            f"`models` must be a list of at least two models. Received: models={models!r}"
        )
    activations = [layer_activations(m, x, batch_size) for m in models]
    names = list(activations[0])
    return {
        name: float(
            np.mean(
                [linear_cka(a[name], b[name]) for a, b in itertools.combinations(activations, 2)]
            )
        )
        for name in names
    }


def weight_pca(groups, num_components=2):
    """Projects networks of one architecture onto the top principal components.

    All networks of all groups are centred together and projected on the top
    `num_components` right singular vectors of the (networks × weights) matrix: the
    weight-space picture of the paper's Fig. 4.

    Args:
        groups: A dict name → list of models.
        num_components: The number of components. Defaults to `2`.

    Returns:
        A tuple `(coordinates, explained)`: a dict name → (K, num_components) array and
        the fraction of the variance each component explains.
    """
    names = list(groups)
    flat = [_flat_weights(m) for name in names for m in groups[name]]
    matrix = np.stack(flat)
    matrix = matrix - matrix.mean(axis=0)
    gram = matrix @ matrix.T  # networks × networks: cheap for millions of weights.
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:num_components]
    coordinates = vectors[:, order] * np.sqrt(np.maximum(values[order], 0.0))
    explained = values[order] / max(float(np.sum(np.maximum(values, 0.0))), 1e-30)
    result, start = {}, 0
    for name in names:
        count = len(groups[name])
        result[name] = coordinates[start : start + count]
        start += count
    return result, explained
