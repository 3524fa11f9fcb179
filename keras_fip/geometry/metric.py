"""The metric tensor g = (1/N) Σ_x J_xᵀ J_x, used only through matrix-free products."""

import keras
import numpy as np
import scipy.sparse.linalg
import tensorflow as tf

from keras_fip.core import data_adapter
from keras_fip.core import outputs as outputs_lib

_OUTPUTS = ("logits", "probabilities")


def _check_outputs(outputs):
    if outputs not in _OUTPUTS:
        raise ValueError(f"`outputs` must be one of {_OUTPUTS}. Received: outputs={outputs!r}")


def _primals(model):
    """The `tf.Variable`s behind the model's trainable Keras variables."""
    return [variable.value for variable in model.trainable_variables]


def _flat_outputs(model, inputs, outputs):
    """Model outputs on `inputs` in inference mode, as a (batch, num_outputs) tensor."""
    predictions = model(inputs, training=False)
    flat = [
        tf.reshape(tensor, [tf.shape(tensor)[0], -1]) for tensor in tf.nest.flatten(predictions)
    ]
    if outputs == "probabilities":
        flat = [tf.nn.softmax(tensor, axis=-1) for tensor in flat]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=-1)


def _cast_like(vector, primals):
    return [tf.cast(tangent, primal.dtype) for tangent, primal in zip(vector, primals)]


def _pairing(pullback, vector):
    """`Σ_i ⟨pullback_i, vector_i⟩`; sparse (`tf.IndexedSlices`) pullbacks stay sparse."""
    terms = []
    for piece, tangent in zip(pullback, vector):
        if isinstance(piece, tf.IndexedSlices):
            rows = tf.gather(tangent, piece.indices)
            terms.append(tf.reduce_sum(piece.values * rows))
        else:
            terms.append(tf.reduce_sum(piece * tangent))
    return tf.add_n(terms)


def linearize(model, inputs, outputs="logits"):
    """One forward pass, and the linear maps `v ↦ J v` and `u ↦ Jᵀ u` at its point.

    The forward pass runs once, in inference mode, under a persistent
    `tf.GradientTape` watching the `tf.Variable`s behind
    `model.trainable_variables`. `vjp(u) = Jᵀ u` is one reverse pass over that
    tape. `jvp(v) = J v` is its transpose, taken by differentiating the
    reverse pass with respect to its cotangent (the "double-backward" trick):
    inside a `tf.function` only the tangent computations survive, and they
    carry tangents of the weights alone. Forward-mode differentiation with
    `tf.autodiff.ForwardAccumulator` instead gives the input batch, which has
    no tangent, a zero tangent and multiplies it through the first layer
    (`0 · W₁` costs as much as the forward pass of that layer); here the first
    layer's tangent is just `x · V₁`. Both maps can be called many times on one
    forward pass (e.g. every iteration of a conjugate-gradient solve). Pure
    TensorFlow: graph-safe, no cross-replica reduction.

    Args:
        model: a built `keras.Model`.
        inputs: one batch of model inputs.
        outputs: `"logits"` or `"probabilities"`. Defaults to `"logits"`.

    Returns:
        A tuple `(values, jvp, vjp)`: the outputs, of shape
        `(batch, num_outputs)`; `jvp(v)` maps a list of tensors aligned with
        `model.trainable_variables` to a `(batch, num_outputs)` tensor;
        `vjp(u)` maps a `(batch, num_outputs)` tensor to a list of dense
        tensors aligned with `model.trainable_variables` (summed over the
        batch, not averaged).

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> values, jvp, vjp = linearize(model, np.ones((4, 3), "float32"))
        >>> vector = [keras.ops.ones_like(v) for v in model.trainable_variables]
        >>> [tuple(p.shape) for p in vjp(jvp(vector))]
        [(3, 2), (2,)]
    """
    _check_outputs(outputs)
    primals = _primals(model)
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(primals)
        values = _flat_outputs(model, inputs, outputs)

    def pullback(cotangent):
        return tape.gradient(
            values,
            primals,
            output_gradients=cotangent,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    def vjp(cotangent):
        return [
            tf.convert_to_tensor(piece)
            for piece in pullback(tf.stop_gradient(tf.cast(cotangent, values.dtype)))
        ]

    def jvp(vector):
        tangents = _cast_like(vector, primals)
        # J v = d/du ⟨Jᵀ u, v⟩: the pullback is linear in u, so u's value is irrelevant.
        cotangent = tf.zeros_like(values)
        with tf.GradientTape(watch_accessed_variables=False) as transpose_tape:
            transpose_tape.watch(cotangent)
            pairing = _pairing(pullback(cotangent), tangents)
        return transpose_tape.gradient(
            pairing, cotangent, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    return values, jvp, vjp


def _scale_as(scale, dtype):
    """`scale` as a tensor of `dtype`: a Python number becomes a constant of that dtype
    directly (`tf.cast` of a Python float would round it to float32 first)."""
    return tf.cast(scale, dtype) if tf.is_tensor(scale) else tf.constant(scale, dtype)


def _summed_metric_block_product(model, inputs, vectors, outputs, scale=None):
    """`[scale · Σ_x J_xᵀ (J_x v) for v in vectors]` on one forward pass over the batch.

    One `linearize`: the forward pass is shared by every vector, and each adds its
    tangent pass and its reverse pass. On LeNet-300-100 that is 1.05× a gradient per
    vector in arithmetic, against 1.53× for a standalone product (see
    `benchmarks/metric_matvec.py`).
    """
    _, jvp, vjp = linearize(model, inputs, outputs)
    products = []
    for vector in vectors:
        tangent = jvp(vector)
        if scale is not None:
            # It multiplies the (batch, outputs) tangent, not the larger result.
            tangent = tangent * _scale_as(scale, tangent.dtype)
        products.append(vjp(tangent))
    return products


def output_jvp(model, inputs, vector, outputs="logits"):
    """Outputs and their directional derivative `J v` on one batch.

    One forward pass and the transpose of one reverse pass (`linearize`), in
    inference mode (dropout off, BatchNorm on its moving statistics). Pure
    TensorFlow: safe inside `tf.function` and in a `tf.distribute` replica
    context; inside a `tf.function` it costs about a forward pass plus the
    tangent pass.

    Args:
        model: a built `keras.Model`.
        inputs: one batch of model inputs.
        vector: list of tensors aligned with `model.trainable_variables`.
        outputs: `"logits"` (the raw model outputs) or `"probabilities"`
            (softmax over the last axis). Defaults to `"logits"`.

    Returns:
        A tuple `(outputs, jvp)`, both of shape `(batch, num_outputs)`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> vector = [keras.ops.ones_like(v) for v in model.trainable_variables]
        >>> values, jvp = output_jvp(model, np.ones((4, 3)), vector)
        >>> tuple(jvp.shape)
        (4, 2)
    """
    values, jvp, _ = linearize(model, inputs, outputs)
    return values, jvp(vector)


def _summed_metric_block_quadratic(model, inputs, vectors, outputs, scale=None):
    """`[scale · Σ_x ‖J_x v‖² for v in vectors]` on one forward pass over the batch.

    vᵀ g v needs only the tangent pass: no reverse pass, and a sum of squares, so it is
    never negative (vᵀ(g·v) in floating point can be, where g·v cancels). On
    LeNet-300-100 a standalone one costs 1.0× a gradient in arithmetic (forward and
    tangent passes, 563M multiply-adds for 1,000 inputs), one of a block sharing the
    forward pass 0.53×. Each value is a float64 scalar.
    """
    _, jvp, _ = linearize(model, inputs, outputs)
    values = []
    for vector in vectors:
        tangent = jvp(vector)
        value = tf.cast(tf.reduce_sum(tf.square(tangent)), "float64")
        if scale is not None:
            value = value * _scale_as(scale, "float64")
        values.append(value)
    return values


def _summed_metric_vector_product(model, inputs, vector, outputs, scale=None):
    """`scale · Σ_x J_xᵀ (J_x v)` over one batch: one forward, one tangent, one reverse pass.

    `scale` multiplies the (batch, outputs) tangent, not the (much larger) result.
    """
    return _summed_metric_block_product(model, inputs, [vector], outputs, scale)[0]


def metric_vector_product(model, inputs, vector, outputs="logits"):
    """The product g·v = (1/B) Jᵀ (J v) on one batch at the current weights.

    One forward pass, the tangent pass `J v` and one reverse pass `Jᵀ (J v)`
    (`linearize`), in inference mode. Pure TensorFlow, graph-safe, no Python
    side effects and no cross-replica reduction: inside a `tf.distribute`
    replica context each replica gets its own batch mean and the caller
    all-reduces.

    Args:
        model: a built `keras.Model`.
        inputs: one batch of model inputs, batch size B.
        vector: list of tensors aligned with `model.trainable_variables`.
        outputs: `"logits"` or `"probabilities"`. Defaults to `"logits"`.

    Returns:
        A list of tensors aligned with `model.trainable_variables`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> vector = [keras.ops.ones_like(v) for v in model.trainable_variables]
        >>> product = metric_vector_product(model, np.ones((4, 3)), vector)
        >>> [tuple(p.shape) for p in product]
        [(3, 2), (2,)]
    """
    _check_outputs(outputs)
    batch_size = tf.shape(tf.nest.flatten(inputs)[0])[0]
    return _summed_metric_vector_product(
        model, inputs, vector, outputs, scale=1.0 / tf.cast(batch_size, "float64")
    )


def data_inputs(data):
    """The inputs held by `data`: an array, an `(x, y)` tuple or a `tf.data.Dataset`; for
    a model with several inputs, `x` is a dict (by input name) or a list of arrays."""
    if isinstance(data, tf.data.Dataset):
        batches = []
        for element in data.as_numpy_iterator():
            batches.append(element[0] if isinstance(element, tuple) else element)
        if not batches:
            raise ValueError(f"`data` must not be empty. Received: data={data}")
        if isinstance(data.element_spec, tuple):
            spec = data.element_spec[0]
        else:
            spec = data.element_spec
        spec = tf.nest.flatten(spec)[0]
        if spec.shape.rank is not None and spec.shape.rank >= 1:
            if spec.shape[0] is None or len(batches) > 1:
                return data_adapter.concatenate(batches)
        return tf.nest.map_structure(lambda *parts: np.stack(parts, axis=0), *batches)
    # A tuple is `(x,)`, `(x, y)` or `(x, y, sample_weight)`; a list of arrays is the
    # inputs of a model with several, as Keras takes them.
    if isinstance(data, tuple) and len(data) in (1, 2, 3):
        data = data[0]
    if data_adapter.is_structured(data):
        return data_adapter.normalize_inputs(data, "data")
    if not hasattr(data, "shape") or len(data.shape) < 1 or data.shape[0] == 0:
        raise ValueError(
            "`data` must be a non-empty array of inputs, an `(x, y)` tuple or a "
            f"`tf.data.Dataset`. Received: data={data!r}"
        )
    return data


def _as_tensors(inputs):
    """Inputs (an array, or a dict or list of arrays) as tensors of the same structure."""
    return tf.nest.map_structure(tf.convert_to_tensor, inputs)


def _dataset_of(inputs):
    """`Dataset.from_tensor_slices` of inputs; a list of inputs stays several (a list
    would be stacked into one tensor)."""
    return tf.data.Dataset.from_tensor_slices(tuple(inputs) if isinstance(inputs, list) else inputs)


class MetricOperator:
    """The metric tensor g of a model on a data set, as a matrix-free operator.

    `g = (1/N) Σ_x J_xᵀ J_x`, with `J_x` the Jacobian of the model's outputs
    (logits by default; a model ending in a softmax is read through its
    log-probabilities, which differ from its pre-softmax logits by a per-example
    shift, so the KL divergence's metric is the same) on input `x` with respect to all
    trainable weights, averaged over the N inputs of `data`. g is never materialised:
    `matvec(v)` runs, per batch, one forward pass, the tangent pass `J v`
    and one reverse pass `Jᵀ (J v)` (`linearize`) inside one `tf.function`;
    flat vectors are split and concatenated inside it too. `matmat(V)` takes
    several vectors at once and shares each batch's forward pass between up to
    `vectors_per_pass` of them (on LeNet-300-100 a standalone product costs
    1.53× a gradient in arithmetic, a shared one 1.05×); `trace` and the
    Lanczos quadratures of `keras_fip.geometry` use it, and so does
    `as_linear_operator()` (`scipy.sparse.linalg.LinearOperator.matmat`).
    `quadratic_form(V)` gives vᵀ g v from the tangent pass alone (no reverse
    pass: 1.0× a gradient standalone, 0.53× shared, and never negative); the
    traces, break-down speeds and path lengths use it. The
    model runs in inference mode and is never changed. Products are computed in the
    dtypes of the model's variables (build float64 layers for float64 products). Under a
    `tf.distribute` strategy scope (the one the model was built in), each batch is split
    over the replicas and the results are summed.

    Args:
        model: a built `keras.Model` with trainable weights.
        data: the inputs x: an array, an `(x, y)` tuple or a
            `tf.data.Dataset` of inputs or `(x, y)` pairs.
        outputs: `"logits"` (a logits model's outputs, a probability model's
            log-probabilities) or `"probabilities"` (a softmax of the logits, a
            probability model's outputs). Which the model returns is read from the
            layer that makes its output, or from its outputs on `data`
            (`keras_fip.core.outputs.output_kind`). Defaults to `"logits"`.
        batch_size: number of inputs per forward/tangent/reverse pass; `None` uses
            `min(N, 1024)`. Defaults to `None`.
        vectors_per_pass: most vectors of one `matmat` call that share a forward
            pass (each traced product adds a tangent and a reverse pass to the
            graph, and their intermediates to the peak memory). Defaults to `16`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> metric = MetricOperator(model, np.random.rand(8, 3).astype("float32"))
        >>> metric.num_params
        8
        >>> metric.matvec(np.ones(8)).shape
        (8,)
        >>> metric.matmat(np.ones((8, 3))).shape
        (8, 3)
    """

    def __init__(self, model, data, outputs="logits", batch_size=None, vectors_per_pass=16):
        if not isinstance(model, keras.Model):
            raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
        if not model.built or not model.trainable_variables:
            raise ValueError(
                "`model` must be built and have trainable weights. "
                f"Received: model={model.name} with "
                f"{len(model.trainable_variables)} trainable variables"
            )
        _check_outputs(outputs)
        if batch_size is not None and (
            not isinstance(batch_size, (int, np.integer)) or batch_size < 1
        ):
            raise ValueError(
                "`batch_size` must be a positive integer or None. "
                f"Received: batch_size={batch_size!r}"
            )
        if (
            not isinstance(vectors_per_pass, (int, np.integer))
            or isinstance(vectors_per_pass, bool)
            or vectors_per_pass < 1
        ):
            raise ValueError(
                "`vectors_per_pass` must be a positive integer. "
                f"Received: vectors_per_pass={vectors_per_pass!r}"
            )
        self.model = model
        self.data = data
        self.outputs = outputs
        self.batch_size = batch_size
        self.vectors_per_pass = int(vectors_per_pass)
        self.num_matvecs = 0
        self.num_quadratic_forms = 0

        self._inputs = data_inputs(data)
        self.num_examples = data_adapter.num_examples(self._inputs)
        # What the products differentiate: logits are the model's outputs, or the
        # log-probabilities of a model ending in a softmax (a view sharing its weights);
        # probabilities are a softmax of logits, or a probability model's outputs.
        self.output_kind = outputs_lib.output_kind(
            model, data_adapter.take(self._inputs, slice(0, 64))
        )
        self._network, self._network_outputs = model, outputs
        if self.output_kind == "probabilities":
            self._network_outputs = "logits"  # The network's own outputs, untransformed.
            if outputs == "logits":
                self._network = outputs_lib.logits_model(model, "probabilities")
        self._batch_size = int(batch_size or min(self.num_examples, 1024))
        self._variables = list(model.trainable_variables)
        self._shapes = [tuple(v.shape) for v in self._variables]
        self._sizes = [int(np.prod(shape)) for shape in self._shapes]
        self._dtypes = [tf.as_dtype(v.dtype) for v in self._variables]
        self.dtype = np.result_type(*[d.as_numpy_dtype for d in self._dtypes])
        self.num_params = int(sum(self._sizes))
        self._strategy = tf.distribute.get_strategy()
        # Under any strategy scope, even of one replica, the model's variables are
        # distributed and may only be read in a replica context (`strategy.run`).
        self._distributed = tf.distribute.has_strategy()
        self._num_outputs = None
        self._matvec_fn = None
        self._matmat_fn = None
        self._quadratic_fn = None

    def get_config(self):
        return {
            "model": self.model,
            "data": self.data,
            "outputs": self.outputs,
            "batch_size": self.batch_size,
            "vectors_per_pass": self.vectors_per_pass,
        }

    # Vector layouts

    def flatten(self, vectors):
        """Concatenates a list aligned with the trainable variables into one vector."""
        return np.concatenate([np.reshape(np.asarray(v, dtype=self.dtype), [-1]) for v in vectors])

    def unflatten(self, vector):
        """Splits a flat vector into arrays shaped like the trainable variables."""
        vector = np.asarray(vector)
        pieces = np.split(vector, np.cumsum(self._sizes)[:-1])
        return [
            np.reshape(piece, shape).astype(dtype.as_numpy_dtype)
            for piece, shape, dtype in zip(pieces, self._shapes, self._dtypes)
        ]

    def _as_tensors(self, vector, name="v"):
        """Validates a list layout `vector`; returns (list of tensors, is_numpy)."""
        shapes = [tuple(np.shape(piece)) for piece in vector]
        if shapes != self._shapes:
            raise ValueError(
                f"`{name}` must be a flat vector of length "
                f"{self.num_params} or a list shaped like "
                f"`model.trainable_variables` {self._shapes}. "
                f"Received: {name} with shapes {shapes}"
            )
        is_numpy = not any(tf.is_tensor(piece) for piece in vector)
        tensors = [tf.cast(piece, dtype) for piece, dtype in zip(vector, self._dtypes)]
        return tensors, is_numpy

    # Products

    def _summed_over_batches(self, quadratic=False):
        """`product(vectors)`: `[g·v for v in vectors]` (or, with `quadratic`, the
        quadratic forms `[vᵀ g v for v in vectors]`), summed over the batches of `data`
        (and the replicas), each batch's forward pass shared by all the vectors."""
        if quadratic:
            block_fn = _summed_metric_block_quadratic

            def zeros(vectors):
                return [tf.zeros([], "float64") for _ in vectors]
        else:
            block_fn = _summed_metric_block_product

            def zeros(vectors):
                return tf.nest.map_structure(tf.zeros_like, vectors)

        strategy = self._strategy
        model, outputs, num_examples = self._network, self._network_outputs, self.num_examples

        def replica_fn(inputs, vectors):
            # Σ over the batch of J_xᵀ J_x v / N (or ‖J_x v‖² / N): the batches (and
            # replicas) sum to g·v (vᵀ g v).
            return block_fn(model, inputs, vectors, outputs, scale=1.0 / num_examples)

        num_batches = -(-self.num_examples // self._batch_size)
        batch_size = self._batch_size

        def add(total, summed):
            return tf.nest.map_structure(lambda a, b: a + b, total, summed)

        if not self._distributed:
            # Batches sliced from one tensor in a graph loop: no tf.data overhead.
            all_inputs = _as_tensors(self._inputs)

            def product(vectors):
                if num_batches == 1:
                    return replica_fn(all_inputs, vectors)
                total = zeros(vectors)
                for index in tf.range(num_batches):
                    inputs = tf.nest.map_structure(
                        lambda t, index=index: t[index * batch_size : (index + 1) * batch_size],
                        all_inputs,
                    )
                    total = add(total, replica_fn(inputs, vectors))
                return total

            return product

        # Each batch split over the replicas, per-replica sums all-reduced.
        dataset = _dataset_of(self._inputs).batch(batch_size)
        dataset = strategy.experimental_distribute_dataset(dataset)

        def product(vectors):
            total = zeros(vectors)
            for inputs in dataset:
                per_replica = strategy.run(replica_fn, args=(inputs, vectors))
                total = add(
                    total,
                    tf.nest.map_structure(
                        lambda piece: strategy.reduce(tf.distribute.ReduceOp.SUM, piece, axis=None),
                        per_replica,
                    ),
                )
            return total

        return product

    def _build_matvec(self):
        """Returns `(list_fn, flat_fn)`: g·v on a list of tensors and on a flat vector."""
        shapes, sizes, dtypes = self._shapes, self._sizes, self._dtypes
        layout_dtype = tf.as_dtype(self.dtype)
        products = self._summed_over_batches()

        def product(vector):
            return products([vector])[0]

        @tf.function(reduce_retracing=True)
        def list_fn(vector):
            return product(vector)

        @tf.function(reduce_retracing=True)
        def flat_fn(flat):
            # Split, reshape and cast in the graph: no eager op per variable.
            pieces = tf.split(flat, sizes)
            vector = [
                tf.cast(tf.reshape(piece, shape), dtype)
                for piece, shape, dtype in zip(pieces, shapes, dtypes)
            ]
            return tf.concat(
                [tf.cast(tf.reshape(piece, [-1]), layout_dtype) for piece in product(vector)],
                axis=0,
            )

        return list_fn, flat_fn

    def _build_matmat(self, quadratic=False):
        """g·V (with `quadratic`, the k values vᵀ g v) on a flat `(num_params, k)`
        block, one forward pass per batch for all k."""
        shapes, sizes, dtypes = self._shapes, self._sizes, self._dtypes
        layout_dtype = tf.as_dtype(self.dtype)
        product = self._summed_over_batches(quadratic)

        # Traced once per number of columns (`matmat` passes at most two distinct ones
        # per call: `vectors_per_pass` and the remainder), which must be static here.
        @tf.function
        def block_fn(block):
            vectors = []
            for column in tf.unstack(block, axis=1):
                pieces = tf.split(column, sizes)
                vectors.append(
                    [
                        tf.cast(tf.reshape(piece, shape), dtype)
                        for piece, shape, dtype in zip(pieces, shapes, dtypes)
                    ]
                )
            if quadratic:
                return tf.stack(product(vectors))
            columns = [
                tf.concat(
                    [tf.cast(tf.reshape(p, [-1]), layout_dtype) for p in products],
                    axis=0,
                )
                for products in product(vectors)
            ]
            return tf.stack(columns, axis=1)

        return block_fn

    def _in_chunks(self, block_fn, block, axis):
        """`block_fn` on `vectors_per_pass` columns of `block` at a time, concatenated."""
        if int(block.shape[1]) <= self.vectors_per_pass:
            return block_fn(block)  # No eager slicing for one pass.
        chunks = [
            block_fn(block[:, start : start + self.vectors_per_pass])
            for start in range(0, int(block.shape[1]), self.vectors_per_pass)
        ]
        return chunks[0] if len(chunks) == 1 else tf.concat(chunks, axis=axis)

    def _as_block(self, vectors, name, allow_vector=False):
        """`vectors` as a floating `(num_params, k)` tensor, after checking its shape."""
        shape = tuple(np.shape(vectors))
        single = allow_vector and shape == (self.num_params,)
        if not single and (len(shape) != 2 or shape[0] != self.num_params or shape[1] < 1):
            expected = "a flat vector of length num_params or " if allow_vector else ""
            raise ValueError(
                f"`{name}` must be {expected}a (num_params, k) block with num_params="
                f"{self.num_params} and k >= 1. Received: {name} with shape {shape}"
            )
        # In the layout's dtype before the graph: the products are computed in it anyway,
        # and a float64 block of a float32 model would cross into the graph at twice
        # the size (~25% of a LeNet-300-100 block product's time).
        if tf.is_tensor(vectors):
            block = tf.cast(vectors, self.dtype)
            return tf.reshape(block, [-1, 1]) if single else block
        block = np.asarray(vectors, dtype=self.dtype)
        return tf.convert_to_tensor(block.reshape(-1, 1) if single else block)

    def matmat(self, vectors):
        """The products g·V of several vectors, sharing each batch's forward pass.

        Args:
            vectors: a `(num_params, k)` array (or tensor) whose columns are the
                vectors, k ≥ 1. Up to `vectors_per_pass` columns share one pass.

        Returns:
            g·V, of shape `(num_params, k)`: numpy if `vectors` is numpy, a tensor
            otherwise.
        """
        block = self._as_block(vectors, "vectors")
        if self._matmat_fn is None:
            self._matmat_fn = self._build_matmat()
        product = self._in_chunks(self._matmat_fn, block, axis=1)
        self.num_matvecs += int(block.shape[1])
        return product if tf.is_tensor(vectors) else product.numpy()

    def quadratic_form(self, vectors):
        """vᵀ g v = (1/N) Σ_x ‖J_x v‖², for one vector or each column of a block.

        Only the forward and tangent passes run, no reverse pass: a standalone form
        costs about one gradient (1.0× in arithmetic on LeNet-300-100, against 1.53× for
        g·v), one of a block that shares the forward pass about half of one. The value
        is a sum of squares (accumulated in float64 across batches), so it is never
        negative, unlike `v @ matvec(v)` in floating point where g·v cancels. What
        needs only vᵀ g v uses it: break-down speeds and path lengths, Hutchinson and
        Hutch++ traces, predicted output changes of perturbations.

        Args:
            vectors: a flat vector of length `num_params`, a list of arrays shaped
                like `model.trainable_variables` (one vector, as `matvec` takes), or a
                `(num_params, k)` block whose columns are the vectors (up to
                `vectors_per_pass` share one forward pass).

        Returns:
            A float64 `(k,)` array (a tensor if `vectors` is one) for a block; a
            Python float for one numpy vector (a scalar tensor for tensors).
        """
        if isinstance(vectors, (list, tuple)):
            tensors, is_numpy = self._as_tensors(vectors, "vectors")
            flat = tf.concat(
                [tf.reshape(tf.cast(piece, self.dtype), [-1]) for piece in tensors], axis=0
            )
            return self.quadratic_form(flat.numpy() if is_numpy else flat)
        single = tuple(np.shape(vectors)) == (self.num_params,)
        block = self._as_block(vectors, "vectors", allow_vector=True)
        if self._quadratic_fn is None:
            self._quadratic_fn = self._build_matmat(quadratic=True)
        values = self._in_chunks(self._quadratic_fn, block, axis=0)
        self.num_quadratic_forms += int(block.shape[1])
        if tf.is_tensor(vectors):
            return values[0] if single else values
        values = values.numpy()
        return float(values[0]) if single else values

    def matvec(self, v):
        """The product g·v.

        Args:
            v: a flat vector of length `num_params`, or a list of arrays
                shaped like `model.trainable_variables`.

        Returns:
            g·v in the same layout as `v`: numpy if `v` is numpy, tensors
            otherwise.
        """
        if self._matvec_fn is None:
            self._matvec_fn = self._build_matvec()
        list_fn, flat_fn = self._matvec_fn
        if not isinstance(v, (list, tuple)):
            if tuple(np.shape(v)) != (self.num_params,):
                raise ValueError(
                    "`v` must be a flat vector of length "
                    f"{self.num_params} or a list shaped like "
                    f"`model.trainable_variables`. Received: v with shape "
                    f"{tuple(np.shape(v))}"
                )
            is_numpy = not tf.is_tensor(v)
            flat = tf.convert_to_tensor(v)
            if not flat.dtype.is_floating:
                flat = tf.cast(flat, self.dtype)
            # In the layout's dtype: that of the variables (float64 if any is).
            product = flat_fn(flat)
            self.num_matvecs += 1
            return product.numpy() if is_numpy else product
        tensors, is_numpy = self._as_tensors(v)
        product = list_fn(tensors)
        self.num_matvecs += 1
        return [piece.numpy() for piece in product] if is_numpy else product

    def as_linear_operator(self):
        """g as a `scipy.sparse.linalg.LinearOperator` (float64 flat vectors; `matmat`
        shares forward passes).

        Returns:
            A symmetric `LinearOperator` of shape `(num_params, num_params)`.
        """

        def apply(vector):
            vector = np.asarray(vector, dtype=self.dtype).reshape(-1)
            return np.asarray(self.matvec(vector), dtype=np.float64)

        def apply_block(block):
            block = np.asarray(block, dtype=self.dtype).reshape(self.num_params, -1)
            return np.asarray(self.matmat(block), dtype=np.float64)

        return scipy.sparse.linalg.LinearOperator(
            (self.num_params, self.num_params),
            matvec=apply,
            rmatvec=apply,
            matmat=apply_block,
            rmatmat=apply_block,
            dtype=np.float64,
        )

    # Dense forms (small problems only)

    def _jacobian_batches(self):
        """Yields the flat Jacobian (batch·C, num_params) of each batch.

        Under a strategy each batch is split over the replicas (replica i takes slice i,
        as `experimental_distribute_dataset` splits a global batch), every replica takes
        the Jacobian of its slice, and `strategy.gather` puts the rows back in the order
        of the batch, on every worker.
        """
        model, outputs = self._network, self._network_outputs
        primals = _primals(model)

        def jacobian_fn(inputs):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(primals)
                values = _flat_outputs(model, inputs, outputs)
            jacobians = tape.jacobian(
                values,
                primals,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            rows = tf.shape(values)[0] * tf.shape(values)[1]
            return tf.concat(
                [tf.cast(tf.reshape(jacobian, [rows, -1]), self.dtype) for jacobian in jacobians],
                axis=1,
            )

        # Chunks of at most ~2**25 Jacobian entries keep memory bounded.
        rows_per_example = self.num_outputs() * self.num_params
        chunk = max(1, min(self._batch_size, 2**25 // rows_per_example))
        if not self._distributed:
            one_device_fn = tf.function(jacobian_fn, reduce_retracing=True)
            for start in range(0, self.num_examples, chunk):
                inputs = data_adapter.take(self._inputs, slice(start, start + chunk))
                yield one_device_fn(_as_tensors(inputs)).numpy()
            return

        strategy = self._strategy

        def replica_fn(inputs):
            # A replica's slice of a short last batch can be empty, where the vectorised
            # Jacobian of a convolution fails: no rows to compute.
            return tf.cond(
                tf.shape(tf.nest.flatten(inputs)[0])[0] > 0,
                lambda: jacobian_fn(inputs),
                lambda: tf.zeros([0, self.num_params], self.dtype),
            )

        @tf.function
        def gathered_fn(inputs):
            return strategy.gather(strategy.run(replica_fn, args=(inputs,)), axis=0)

        dataset = _dataset_of(self._inputs).batch(chunk)
        for inputs in strategy.experimental_distribute_dataset(dataset):
            yield gathered_fn(inputs).numpy()

    def num_outputs(self):
        """C, the number of outputs per input (flattened)."""
        if self._num_outputs is None:
            sample = data_adapter.take(self._inputs, slice(0, 1))
            values = _flat_outputs(self._network, _as_tensors(sample), "logits")
            self._num_outputs = int(values.shape[-1])
        return self._num_outputs

    def to_dense(self, max_params=4096):
        """g as a dense `(num_params, num_params)` numpy array, for tiny models.

        Built from per-batch Jacobians: `g = (1/N) Σ_batches J_bᵀ J_b`.

        Args:
            max_params: refuse models with more trainable parameters than
                this. Defaults to `4096`.

        Returns:
            A symmetric numpy array.
        """
        if self.num_params > max_params:
            raise ValueError(
                f"`to_dense()` materialises a {self.num_params} x "
                f"{self.num_params} matrix; it is meant for models with at most "
                f"`max_params={max_params}` trainable parameters. Use `matvec`, "
                "`as_linear_operator()` or `gram()` instead, or raise "
                f"`max_params`. Received: num_params={self.num_params}"
            )
        dense = np.zeros((self.num_params, self.num_params), dtype=self.dtype)
        for jacobian in self._jacobian_batches():
            dense += jacobian.T @ jacobian
        return dense / self.num_examples

    def gram(self, max_entries=2**28):
        """The dual matrix (1/N) J Jᵀ of shape (N·C, N·C).

        J is the (N·C, num_params) Jacobian of all outputs on all of `data`.
        (1/N) J Jᵀ has exactly the non-zero eigenvalues of g = (1/N) Jᵀ J, so
        when N·C ≪ num_params it gives g's whole non-zero spectrum exactly.
        Rows are ordered example-major (example i, output c at row i·C + c).

        Args:
            max_entries: refuse if the Jacobian J has more entries than this
                (it is held in memory). Defaults to `2**28`.

        Returns:
            A symmetric positive semi-definite numpy array.
        """
        num_rows = self.num_examples * self.num_outputs()
        if num_rows * self.num_params > max_entries:
            raise ValueError(
                f"`gram()` holds the {num_rows} x {self.num_params} Jacobian "
                f"({num_rows * self.num_params} entries) in memory, more than "
                f"`max_entries={max_entries}`. Use fewer inputs in `data` or "
                f"raise `max_entries`. Received: N={self.num_examples}, "
                f"C={self.num_outputs()}, num_params={self.num_params}"
            )
        jacobian = np.concatenate(list(self._jacobian_batches()), axis=0)
        return (jacobian @ jacobian.T) / self.num_examples
