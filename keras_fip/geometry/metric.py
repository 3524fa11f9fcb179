"""The metric tensor g = (1/N) Σ_x J_xᵀ J_x, used only through matrix-free products."""

import numpy as np
import scipy.sparse.linalg
import tensorflow as tf

import keras

_OUTPUTS = ("logits", "probabilities")


def _check_outputs(outputs):
    if outputs not in _OUTPUTS:
        raise ValueError(
            f"`outputs` must be one of {_OUTPUTS}. Received: outputs={outputs!r}"
        )


def _primals(model):
    """The `tf.Variable`s behind the model's trainable Keras variables."""
    return [variable.value for variable in model.trainable_variables]


def _flat_outputs(model, inputs, outputs):
    """Model outputs on `inputs` in inference mode, as a (batch, num_outputs) tensor."""
    predictions = model(inputs, training=False)
    flat = [
        tf.reshape(tensor, [tf.shape(tensor)[0], -1])
        for tensor in tf.nest.flatten(predictions)
    ]
    if outputs == "probabilities":
        flat = [tf.nn.softmax(tensor, axis=-1) for tensor in flat]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=-1)


def _cast_like(vector, primals):
    return [
        tf.cast(tangent, primal.dtype) for tangent, primal in zip(vector, primals)
    ]


def output_jvp(model, inputs, vector, outputs="logits"):
    """Outputs and their forward-mode directional derivative `J v` on one batch.

    One forward pass under `tf.autodiff.ForwardAccumulator` watching the
    `tf.Variable`s behind `model.trainable_variables`. The model runs in
    inference mode (dropout off, BatchNorm on its moving statistics). Pure
    TensorFlow: safe inside `tf.function` and in a `tf.distribute` replica
    context.

    Args:
        model: a built `keras.Model`.
        inputs: one batch of model inputs.
        vector: list of tensors aligned with `model.trainable_variables`.
        outputs: `"logits"` (the raw model outputs) or `"probabilities"`
            (softmax over the last axis). Defaults to `"logits"`.

    Returns:
        A tuple `(outputs, jvp)`, both of shape `(batch, num_outputs)`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> vector = [keras.ops.ones_like(v) for v in model.trainable_variables]
    >>> values, jvp = output_jvp(model, np.ones((4, 3)), vector)
    >>> tuple(jvp.shape)
    (4, 2)
    """
    _check_outputs(outputs)
    primals = _primals(model)
    tangents = _cast_like(vector, primals)
    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
        values = _flat_outputs(model, inputs, outputs)
    jvp = accumulator.jvp(values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return values, jvp


def _summed_metric_vector_product(model, inputs, vector, outputs):
    """Σ_x J_xᵀ (J_x v) over one batch: one JVP and one VJP, one forward pass."""
    primals = _primals(model)
    tangents = _cast_like(vector, primals)
    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(primals)
            values = _flat_outputs(model, inputs, outputs)
    jvp = accumulator.jvp(values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tape.gradient(
        values,
        primals,
        output_gradients=tf.stop_gradient(jvp),
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )


def metric_vector_product(model, inputs, vector, outputs="logits"):
    """The product g·v = (1/B) Jᵀ (J v) on one batch at the current weights.

    One forward-mode JVP (`tf.autodiff.ForwardAccumulator`) and one
    reverse-mode VJP (`tf.GradientTape` with `output_gradients`) sharing one
    forward pass, in inference mode. Pure TensorFlow, graph-safe, no Python
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

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> vector = [keras.ops.ones_like(v) for v in model.trainable_variables]
    >>> product = metric_vector_product(model, np.ones((4, 3)), vector)
    >>> [tuple(p.shape) for p in product]
    [(3, 2), (2,)]
    """
    _check_outputs(outputs)
    summed = _summed_metric_vector_product(model, inputs, vector, outputs)
    batch_size = tf.shape(tf.nest.flatten(inputs)[0])[0]
    return [
        tensor / tf.cast(batch_size, tensor.dtype) for tensor in summed
    ]


def _data_inputs(data):
    """The inputs held by `data`: an array, an `(x, y)` tuple or a `tf.data.Dataset`."""
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
        if spec.shape.rank is not None and spec.shape.rank >= 1:
            if spec.shape[0] is None or len(batches) > 1:
                return np.concatenate(batches, axis=0)
        return np.stack(batches, axis=0)
    if isinstance(data, (tuple, list)) and len(data) in (1, 2, 3):
        data = data[0]
    if not hasattr(data, "shape") or len(data.shape) < 1 or data.shape[0] == 0:
        raise ValueError(
            "`data` must be a non-empty array of inputs, an `(x, y)` tuple or a "
            f"`tf.data.Dataset`. Received: data={data!r}"
        )
    return data


class MetricOperator:
    """The metric tensor g of a model on a data set, as a matrix-free operator.

    `g = (1/N) Σ_x J_xᵀ J_x`, with `J_x` the Jacobian of the model's outputs
    (logits by default) on input `x` with respect to all trainable weights,
    averaged over the N inputs of `data`. g is never materialised:
    `matvec(v)` runs, per batch, one forward-mode JVP and one reverse-mode
    VJP inside one `tf.function`. The model runs in inference mode and is
    never changed. Products are computed in the dtypes of the model's
    variables (build float64 layers for float64 products). Under a
    `tf.distribute` strategy scope (the one the model was built in), each
    batch is split over the replicas and the results are summed.

    Args:
        model: a built `keras.Model` with trainable weights.
        data: the inputs x: an array, an `(x, y)` tuple or a
            `tf.data.Dataset` of inputs or `(x, y)` pairs.
        outputs: `"logits"` (raw model outputs) or `"probabilities"`
            (softmax over the last axis). Defaults to `"logits"`.
        batch_size: number of inputs per JVP/VJP pass; `None` uses
            `min(N, 1024)`. Defaults to `None`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> metric = MetricOperator(model, np.random.rand(8, 3).astype("float32"))
    >>> metric.num_params
    8
    >>> metric.matvec(np.ones(8)).shape
    (8,)
    """

    def __init__(self, model, data, outputs="logits", batch_size=None):
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"`model` must be a `keras.Model`. Received: model={model!r}"
            )
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
        self.model = model
        self.data = data
        self.outputs = outputs
        self.batch_size = batch_size
        self.num_matvecs = 0

        self._inputs = _data_inputs(data)
        self.num_examples = int(self._inputs.shape[0])
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

    def get_config(self):
        return {
            "model": self.model,
            "data": self.data,
            "outputs": self.outputs,
            "batch_size": self.batch_size,
        }

    # Vector layouts

    def flatten(self, vectors):
        """Concatenates a list aligned with the trainable variables into one vector."""
        return np.concatenate(
            [np.reshape(np.asarray(v, dtype=self.dtype), [-1]) for v in vectors]
        )

    def unflatten(self, vector):
        """Splits a flat vector into arrays shaped like the trainable variables."""
        vector = np.asarray(vector)
        pieces = np.split(vector, np.cumsum(self._sizes)[:-1])
        return [
            np.reshape(piece, shape).astype(dtype.as_numpy_dtype)
            for piece, shape, dtype in zip(pieces, self._shapes, self._dtypes)
        ]

    def _as_tensors(self, vector):
        """Validates `vector` and returns (list of tensors, is_flat, is_numpy)."""
        if isinstance(vector, (list, tuple)):
            shapes = [tuple(np.shape(piece)) for piece in vector]
            if shapes != self._shapes:
                raise ValueError(
                    "`v` must be a flat vector of length "
                    f"{self.num_params} or a list shaped like "
                    f"`model.trainable_variables` {self._shapes}. "
                    f"Received: v with shapes {shapes}"
                )
            is_numpy = not any(tf.is_tensor(piece) for piece in vector)
            tensors = [
                tf.cast(piece, dtype) for piece, dtype in zip(vector, self._dtypes)
            ]
            return tensors, False, is_numpy
        if tuple(np.shape(vector)) != (self.num_params,):
            raise ValueError(
                "`v` must be a flat vector of length "
                f"{self.num_params} or a list shaped like "
                f"`model.trainable_variables`. Received: v with shape "
                f"{tuple(np.shape(vector))}"
            )
        is_numpy = not tf.is_tensor(vector)
        pieces = tf.split(tf.convert_to_tensor(vector), self._sizes)
        tensors = [
            tf.cast(tf.reshape(piece, shape), dtype)
            for piece, shape, dtype in zip(pieces, self._shapes, self._dtypes)
        ]
        return tensors, True, is_numpy

    # Products

    def _build_matvec(self):
        strategy = self._strategy
        model, outputs = self.model, self.outputs
        num_examples, batch_size = self.num_examples, self._batch_size
        num_batches = -(-num_examples // batch_size)

        def replica_fn(inputs, vector):
            return _summed_metric_vector_product(model, inputs, vector, outputs)

        if not self._distributed:
            # Batches sliced from one tensor in a graph loop: no tf.data overhead.
            all_inputs = tf.convert_to_tensor(self._inputs)

            @tf.function(reduce_retracing=True)
            def matvec_fn(vector):
                if num_batches == 1:
                    summed = replica_fn(all_inputs, vector)
                    return [p / tf.cast(num_examples, p.dtype) for p in summed]
                total = tuple(tf.zeros_like(piece) for piece in vector)
                for index in tf.range(num_batches):
                    inputs = all_inputs[index * batch_size : (index + 1) * batch_size]
                    summed = replica_fn(inputs, vector)
                    total = tuple(a + b for a, b in zip(total, summed))
                return [piece / tf.cast(num_examples, piece.dtype) for piece in total]

            return matvec_fn

        # Each batch split over the replicas, per-replica sums all-reduced.
        dataset = tf.data.Dataset.from_tensor_slices(self._inputs).batch(batch_size)
        dataset = strategy.experimental_distribute_dataset(dataset)

        @tf.function(reduce_retracing=True)
        def matvec_fn(vector):
            total = tuple(tf.zeros_like(piece) for piece in vector)
            for inputs in dataset:
                per_replica = strategy.run(replica_fn, args=(inputs, vector))
                total = tuple(
                    running
                    + strategy.reduce(tf.distribute.ReduceOp.SUM, piece, axis=None)
                    for running, piece in zip(total, per_replica)
                )
            return [piece / tf.cast(num_examples, piece.dtype) for piece in total]

        return matvec_fn

    def matvec(self, v):
        """The product g·v.

        Args:
            v: a flat vector of length `num_params`, or a list of arrays
                shaped like `model.trainable_variables`.

        Returns:
            g·v in the same layout as `v`: numpy if `v` is numpy, tensors
            otherwise.
        """
        tensors, is_flat, is_numpy = self._as_tensors(v)
        if self._matvec_fn is None:
            self._matvec_fn = self._build_matvec()
        product = self._matvec_fn(tensors)
        self.num_matvecs += 1
        if is_flat:
            product = tf.concat(
                [tf.cast(tf.reshape(piece, [-1]), self.dtype) for piece in product],
                axis=0,
            )
            return product.numpy() if is_numpy else product
        return [piece.numpy() for piece in product] if is_numpy else product

    def as_linear_operator(self):
        """g as a `scipy.sparse.linalg.LinearOperator` (float64 flat vectors).

        Returns:
            A symmetric `LinearOperator` of shape `(num_params, num_params)`.
        """

        def apply(vector):
            vector = np.asarray(vector, dtype=self.dtype).reshape(-1)
            return np.asarray(self.matvec(vector), dtype=np.float64)

        return scipy.sparse.linalg.LinearOperator(
            (self.num_params, self.num_params),
            matvec=apply,
            rmatvec=apply,
            dtype=np.float64,
        )

    # Dense forms (small problems only)

    def _jacobian_batches(self):
        """Yields the flat Jacobian (batch·C, num_params) of each batch."""
        model, outputs = self.model, self.outputs
        primals = _primals(model)

        @tf.function(reduce_retracing=True)
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
                [
                    tf.cast(tf.reshape(jacobian, [rows, -1]), self.dtype)
                    for jacobian in jacobians
                ],
                axis=1,
            )

        # Chunks of at most ~2**25 Jacobian entries keep memory bounded.
        rows_per_example = self.num_outputs() * self.num_params
        chunk = max(1, min(self._batch_size, 2**25 // rows_per_example))
        for start in range(0, self.num_examples, chunk):
            inputs = self._inputs[start : start + chunk]
            yield jacobian_fn(tf.convert_to_tensor(inputs)).numpy()

    def num_outputs(self):
        """C, the number of outputs per input (flattened)."""
        if self._num_outputs is None:
            sample = self._inputs[:1]
            values = _flat_outputs(self.model, tf.convert_to_tensor(sample), "logits")
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
