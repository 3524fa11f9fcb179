import keras
import numpy as np
import pytest
import scipy.sparse.linalg
import tensorflow as tf

from keras_fip.geometry import MetricOperator
from keras_fip.geometry import metric as metric_module
from keras_fip.geometry import metric_diagonal
from keras_fip.geometry import metric_vector_product
from keras_fip.geometry import output_jvp
from keras_fip.geometry.metric import linearize
from tests.geometry.conftest import dense_metric
from tests.geometry.conftest import tiny_conv_bn


def _relative_error(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _weights(model):
    return [np.array(v) for v in model.weights]


@pytest.mark.parametrize("problem", ["mlp_problem", "conv_problem"])
@pytest.mark.parametrize("outputs", ["logits", "probabilities"])
def test_matvec_matches_dense_reference(problem, outputs, request):
    model, inputs = request.getfixturevalue(problem)
    before = _weights(model)
    # batch_size=4 forces several batches including a ragged last one.
    metric = MetricOperator(model, inputs, outputs=outputs, batch_size=4)
    dense = dense_metric(model, inputs, outputs)
    rng = np.random.default_rng(1)
    for _ in range(3):
        vector = rng.normal(size=metric.num_params)
        assert _relative_error(metric.matvec(vector), dense @ vector) <= 1e-10
    # The model is untouched (BatchNorm statistics included).
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)


def test_matvec_list_layout_round_trips(mlp_problem):
    model, inputs = mlp_problem
    metric = MetricOperator(model, (inputs, np.zeros(len(inputs))))
    vector = np.random.default_rng(2).normal(size=metric.num_params)
    as_list = metric.unflatten(vector)
    product_list = metric.matvec(as_list)
    assert [p.shape for p in product_list] == [tuple(v.shape) for v in model.trainable_variables]
    np.testing.assert_allclose(metric.flatten(product_list), metric.matvec(vector), rtol=1e-12)
    tensor_product = metric.matvec(tf.constant(vector))
    assert tf.is_tensor(tensor_product)
    np.testing.assert_allclose(tensor_product.numpy(), metric.matvec(vector))


def test_to_dense_and_linear_operator_match_reference(conv_problem):
    model, inputs = conv_problem
    metric = MetricOperator(model, inputs, batch_size=5)
    dense = dense_metric(model, inputs)
    assert _relative_error(metric.to_dense(), dense) <= 1e-12
    operator = metric.as_linear_operator()
    assert isinstance(operator, scipy.sparse.linalg.LinearOperator)
    vector = np.random.default_rng(3).normal(size=metric.num_params)
    assert _relative_error(operator @ vector, dense @ vector) <= 1e-10


def test_gram_nonzero_spectrum_equals_metric_spectrum(mlp_problem):
    model, inputs = mlp_problem
    inputs = inputs[:4]  # N·C = 12 < n = 51
    metric = MetricOperator(model, inputs)
    gram = metric.gram()
    assert gram.shape == (12, 12)
    gram_values = np.sort(np.linalg.eigvalsh(gram))[::-1]
    metric_values = np.sort(np.linalg.eigvalsh(dense_metric(model, inputs)))[::-1]
    np.testing.assert_allclose(gram_values, metric_values[:12], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(metric_values[12:], 0.0, atol=1e-12)


def test_dense_forms_refuse_large_problems(mlp_problem):
    model, inputs = mlp_problem
    metric = MetricOperator(model, inputs)
    with pytest.raises(ValueError, match="max_params=10"):
        metric.to_dense(max_params=10)
    with pytest.raises(ValueError, match="max_entries=100"):
        metric.gram(max_entries=100)


def test_metric_vector_product_is_batch_mean(mlp_problem):
    model, inputs = mlp_problem
    metric = MetricOperator(model, inputs)
    vector = metric.unflatten(np.random.default_rng(4).normal(size=metric.num_params))
    product = tf.function(metric_vector_product)(model, tf.constant(inputs), vector)
    np.testing.assert_allclose(
        metric.flatten([p.numpy() for p in product]),
        dense_metric(model, inputs) @ metric.flatten(vector),
        rtol=1e-10,
    )


def test_output_jvp_matches_finite_difference(mlp_problem):
    model, inputs = mlp_problem
    vector = [np.random.default_rng(5).normal(size=v.shape) for v in model.weights]
    values, jvp = output_jvp(model, inputs, vector)
    np.testing.assert_allclose(values, model(inputs), rtol=1e-12)
    step = 1e-6
    shifted = keras.models.clone_model(model)
    shifted.set_weights([w + step * d for w, d in zip(model.get_weights(), vector)])
    difference = (shifted(inputs) - model(inputs)) / step
    np.testing.assert_allclose(jvp, difference, rtol=1e-4, atol=1e-6)


def test_linearize_reuses_one_forward_pass_for_several_products(mlp_problem):
    model, inputs = mlp_problem
    dense = dense_metric(model, inputs)
    metric = MetricOperator(model, inputs)
    rng = np.random.default_rng(10)
    vectors = [metric.unflatten(rng.normal(size=metric.num_params)) for _ in range(2)]

    @tf.function
    def products(x):
        _, jvp, vjp = linearize(model, x)
        return [vjp(jvp(vector)) for vector in vectors]  # One forward pass, two products.

    for vector, product in zip(vectors, products(tf.constant(inputs))):
        np.testing.assert_allclose(
            metric.flatten([p.numpy() for p in product]) / len(inputs),
            dense @ metric.flatten(vector),
            rtol=1e-10,
        )


def test_output_jvp_matches_forward_accumulator_with_embeddings():
    # Integer inputs (no tangent at all) and a sparse (IndexedSlices) pullback.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 3, dtype="float64"),
            keras.layers.GlobalAveragePooling1D(dtype="float64"),
            keras.layers.Dense(2, dtype="float64"),
        ]
    )
    tokens = np.random.default_rng(11).integers(0, 7, size=(4, 5)).astype("int32")
    vector = [np.random.default_rng(12).normal(size=v.shape) for v in model.weights]
    _, jvp = output_jvp(model, tokens, vector)
    primals = [v.value for v in model.trainable_variables]
    with tf.autodiff.ForwardAccumulator(primals, [tf.constant(v) for v in vector]) as acc:
        values = model(tokens, training=False)
    np.testing.assert_allclose(jvp, acc.jvp(values), rtol=1e-12)


def test_mirrored_strategy_gives_same_matvec(mirrored_strategy):
    inputs = np.random.default_rng(6).uniform(size=(11, 5, 5, 1))
    reference_model = tiny_conv_bn()
    reference = MetricOperator(reference_model, inputs, batch_size=4)
    vector = np.random.default_rng(7).normal(size=reference.num_params)
    expected = reference.matvec(vector)

    strategy = mirrored_strategy
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = tiny_conv_bn()
        model.set_weights(reference_model.get_weights())
        metric = MetricOperator(model, inputs, batch_size=4)
    assert _relative_error(metric.matvec(vector), expected) <= 1e-10

    # Per-replica batch means from `metric_vector_product`, all-reduced by the caller.
    tangents = metric.unflatten(vector)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(inputs[:10]).batch(10)
    )

    @tf.function
    def step(batch):
        per_replica = strategy.run(
            lambda x: [
                p * tf.cast(tf.shape(x)[0], p.dtype) / 10.0
                for p in metric_vector_product(model, x, tangents)
            ],
            args=(batch,),
        )
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, p, axis=None) for p in per_replica]

    product = step(next(iter(dataset)))
    expected = dense_metric(reference_model, inputs[:10]) @ vector
    assert _relative_error(metric.flatten([p.numpy() for p in product]), expected) <= 1e-10


def test_one_replica_strategy_gives_same_matvec_and_diagonal():
    # Under a strategy scope the variables are distributed even with one replica, and may
    # only be read in a replica context.
    inputs = np.random.default_rng(8).uniform(size=(9, 5, 5, 1)).astype("float32")
    reference_model = tiny_conv_bn()
    reference = MetricOperator(reference_model, inputs, batch_size=4)
    vector = np.random.default_rng(9).normal(size=reference.num_params)
    expected = reference.matvec(vector)
    expected_diagonal = metric_diagonal(reference_model, inputs, seed=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = tiny_conv_bn()
        model.set_weights(reference_model.get_weights())
        metric = MetricOperator(model, inputs, batch_size=4)
        diagonal = metric_diagonal(model, inputs, seed=0)
    assert _relative_error(metric.matvec(vector), expected) <= 1e-6
    for got, want in zip(diagonal, expected_diagonal):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_matmat_shares_forward_passes_and_equals_column_products(conv_problem):
    model, inputs = conv_problem
    before = _weights(model)
    # Several batches with a ragged last one; 7 columns in passes of 3, 3 and 1.
    metric = MetricOperator(model, inputs, batch_size=4, vectors_per_pass=3)
    block = np.random.default_rng(3).normal(size=(metric.num_params, 7))
    product = metric.matmat(block)
    assert product.shape == (metric.num_params, 7) and metric.num_matvecs == 7
    columns = np.stack([metric.matvec(column) for column in block.T], axis=1)
    assert _relative_error(product, columns) <= 1e-12
    assert _relative_error(product, dense_metric(model, inputs) @ block) <= 1e-10
    operator = metric.as_linear_operator()
    np.testing.assert_allclose(operator.matmat(block), product, rtol=1e-12)
    tensor_product = metric.matmat(tf.constant(block))
    assert tf.is_tensor(tensor_product)
    np.testing.assert_allclose(tensor_product.numpy(), product, rtol=1e-12)
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)
    # One product per pass: a block of k costs k forward passes per batch instead.
    single = MetricOperator(model, inputs, batch_size=4, vectors_per_pass=1)
    np.testing.assert_allclose(single.matmat(block[:, :2]), product[:, :2], rtol=1e-12)


def test_mirrored_strategy_gives_same_matmat(mirrored_strategy):
    inputs = np.random.default_rng(6).uniform(size=(11, 5, 5, 1))
    reference_model = tiny_conv_bn()
    reference = MetricOperator(reference_model, inputs, batch_size=4)
    block = np.random.default_rng(7).normal(size=(reference.num_params, 3))
    expected = dense_metric(reference_model, inputs) @ block
    with mirrored_strategy.scope():
        model = tiny_conv_bn()
        model.set_weights(reference_model.get_weights())
        metric = MetricOperator(model, inputs, batch_size=4, vectors_per_pass=2)
    assert _relative_error(metric.matmat(block), expected) <= 1e-10


def test_mirrored_strategy_gives_same_gram_and_dense(mirrored_strategy):
    # 11 inputs in batches of 4: the last batch of 3 splits 2/1, and a batch of 1 would
    # leave one replica empty; both must come back in the batch's order.
    inputs = np.random.default_rng(6).uniform(size=(11, 5, 5, 1))
    reference_model = tiny_conv_bn()
    reference = MetricOperator(reference_model, inputs, batch_size=4)
    with mirrored_strategy.scope():
        model = tiny_conv_bn()
        model.set_weights(reference_model.get_weights())
        metric = MetricOperator(model, inputs, batch_size=4)
        single = MetricOperator(model, inputs[:1])
    expected = dense_metric(reference_model, inputs)
    assert _relative_error(metric.to_dense(), expected) <= 1e-12
    # Rows example-major: a permuted order would change the Gram matrix, not its spectrum.
    np.testing.assert_allclose(metric.gram(), reference.gram(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        single.gram(), MetricOperator(reference_model, inputs[:1]).gram(), rtol=1e-10, atol=1e-14
    )


def test_quadratic_form_equals_dense_reference_with_no_reverse_pass(conv_problem, monkeypatch):
    model, inputs = conv_problem
    before = _weights(model)
    dense = dense_metric(model, inputs)
    # Any reverse pass Jᵀ u would go through `vjp`: the quadratic form must not take one.
    real_linearize = metric_module.linearize

    def forward_only(*args, **kwargs):
        values, jvp, _ = real_linearize(*args, **kwargs)

        def no_vjp(cotangent):
            raise AssertionError("quadratic_form took a reverse pass")

        return values, jvp, no_vjp

    monkeypatch.setattr(metric_module, "linearize", forward_only)
    # Several batches with a ragged last one; 7 columns in passes of 3, 3 and 1.
    metric = MetricOperator(model, inputs, batch_size=4, vectors_per_pass=3)
    block = np.random.default_rng(3).normal(size=(metric.num_params, 7))
    values = metric.quadratic_form(block)
    assert values.shape == (7,) and values.dtype == np.float64
    expected = np.einsum("ik,ij,jk->k", block, dense, block)
    np.testing.assert_allclose(values, expected, rtol=1e-10)
    assert metric.num_quadratic_forms == 7 and metric.num_matvecs == 0
    single = metric.quadratic_form(block[:, 4])
    assert isinstance(single, float) and single == pytest.approx(expected[4], rel=1e-10)
    tensor_values = metric.quadratic_form(tf.constant(block))
    assert tf.is_tensor(tensor_values)
    np.testing.assert_allclose(tensor_values.numpy(), values, rtol=1e-12)
    # The list layout `matvec` takes: one vector.
    pieces = metric.unflatten(block[:, 4])
    assert metric.quadratic_form(pieces) == pytest.approx(expected[4], rel=1e-10)
    listed = metric.quadratic_form([tf.constant(piece) for piece in pieces])
    assert tf.is_tensor(listed) and float(listed) == pytest.approx(expected[4], rel=1e-10)
    assert metric.quadratic_form(np.zeros(metric.num_params)) == 0.0
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)
    monkeypatch.undo()
    np.testing.assert_allclose(values, np.sum(block * metric.matmat(block), axis=0), rtol=1e-12)


def test_mirrored_strategy_gives_same_quadratic_form(mirrored_strategy):
    inputs = np.random.default_rng(6).uniform(size=(11, 5, 5, 1))
    reference_model = tiny_conv_bn()
    block = np.random.default_rng(7).normal(
        size=(MetricOperator(reference_model, inputs).num_params, 3)
    )
    expected = np.einsum("ik,ij,jk->k", block, dense_metric(reference_model, inputs), block)
    with mirrored_strategy.scope():
        model = tiny_conv_bn()
        model.set_weights(reference_model.get_weights())
        metric = MetricOperator(model, inputs, batch_size=4, vectors_per_pass=2)
    np.testing.assert_allclose(metric.quadratic_form(block), expected, rtol=1e-10)


def test_bad_quadratic_form_vectors_raise(mlp_problem):
    model, inputs = mlp_problem
    metric = MetricOperator(model, inputs)
    for vectors in (
        np.ones(metric.num_params + 1),
        np.ones((metric.num_params + 1, 2)),
        np.ones((metric.num_params, 0)),
        np.ones((2, 2, 2)),
    ):
        with pytest.raises(ValueError, match="`vectors` must be a flat vector"):
            metric.quadratic_form(vectors)
    with pytest.raises(ValueError, match="`vectors` must be a flat vector.*shaped like"):
        metric.quadratic_form([np.ones((2, 2))])
    assert metric.num_quadratic_forms == 0


def test_bad_block_raises(mlp_problem):
    model, inputs = mlp_problem
    metric = MetricOperator(model, inputs)
    for block in (
        np.ones(metric.num_params),
        np.ones((metric.num_params + 1, 2)),
        np.ones((metric.num_params, 0)),
    ):
        with pytest.raises(ValueError, match="`vectors`"):
            metric.matmat(block)
    assert metric.num_matvecs == 0
    for value in (0, 2.5, True):
        with pytest.raises(ValueError, match="`vectors_per_pass`"):
            MetricOperator(model, inputs, vectors_per_pass=value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"outputs": "softmax"}, "outputs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"data": np.zeros((0, 4))}, "data"),
        ({"model": "not a model"}, "model"),
    ],
)
def test_bad_arguments_raise(kwargs, message, mlp_problem):
    model, inputs = mlp_problem
    arguments = {"model": model, "data": inputs, **kwargs}
    with pytest.raises(ValueError, match=f"`{message}`"):
        MetricOperator(**arguments)


def test_bad_vector_raises(mlp_problem):
    model, inputs = mlp_problem
    metric = MetricOperator(model, inputs)
    with pytest.raises(ValueError, match="`v`"):
        metric.matvec(np.ones(metric.num_params + 1))
    with pytest.raises(ValueError, match="`v`"):
        metric.matvec([np.ones(3)])


def test_dataset_data_equals_array_data(mlp_problem):
    model, inputs = mlp_problem
    labels = np.zeros(len(inputs), dtype="int32")
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(3)
    vector = np.random.default_rng(8).normal(size=51)
    np.testing.assert_allclose(
        MetricOperator(model, dataset).matvec(vector),
        MetricOperator(model, inputs).matvec(vector),
        rtol=1e-12,
    )
