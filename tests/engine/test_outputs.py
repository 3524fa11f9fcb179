"""Models ending in a softmax and models returning logits give the same FIP machinery.

The reference in each test is the same network written both ways: a softmax model and a
logits model with the same weights. Everything that only depends on the distribution
(the KL distance, the Fisher metric, cross-entropies, accuracy) must agree exactly; the
metric g of a probability model is the metric of its log-probabilities.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.core import outputs
from keras_fip.geometry import MetricOperator
from keras_fip.geometry.diagonal import metric_diagonal


def _pair(seed=0, softmax_as="activation"):
    """`(logits_model, softmax_model)`: one network, with the same weights."""
    keras.utils.set_random_seed(seed)
    logits = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(4),
        ]
    )
    if softmax_as == "activation":
        head = [keras.layers.Dense(4, activation="softmax")]
    elif softmax_as == "layer":
        head = [keras.layers.Dense(4), keras.layers.Softmax()]
    else:
        head = [keras.layers.Dense(4), keras.layers.Activation("softmax")]
    softmax = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh")] + head)
    softmax.set_weights(logits.get_weights())
    return logits, softmax


def _data(count=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 6)).astype("float32"), rng.integers(0, 4, count)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, inputs):
        return keras.ops.softmax(self.out(self.hidden(inputs)))


@pytest.mark.parametrize("softmax_as", ["activation", "layer", "activation_layer"])
def test_output_kind_reads_the_final_softmax(softmax_as):
    logits, softmax = _pair(softmax_as=softmax_as)
    assert outputs.output_kind(logits) == "logits"
    assert outputs.output_kind(softmax) == "probabilities"
    # Nested in a functional model.
    inputs = keras.Input((6,))
    assert outputs.output_kind(keras.Model(inputs, softmax(inputs))) == "probabilities"
    assert outputs.output_kind(keras.Model(inputs, logits(inputs))) == "logits"


def test_output_kind_of_a_subclassed_model_comes_from_its_outputs():
    model = _Subclassed()
    x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
    model(x)
    assert outputs.structural_output_kind(model) is None
    assert outputs.output_kind(model) == "logits"  # Nothing to read without inputs.
    assert outputs.output_kind(model, x) == "probabilities"


def test_looks_like_probabilities_rejects_logits_and_single_outputs():
    assert outputs.looks_like_probabilities([[0.2, 0.8], [1.0, 0.0]])
    assert not outputs.looks_like_probabilities([[0.2, 0.7]])
    assert not outputs.looks_like_probabilities([[-0.1, 1.1]])
    assert not outputs.looks_like_probabilities([[1.0], [1.0]])


@pytest.mark.parametrize("subclassed", [False, True])
def test_logits_model_shares_weights_and_returns_log_probabilities(subclassed):
    if subclassed:
        model = _Subclassed()
        x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
        model(x)
    else:
        _, model = _pair()
        x, _ = _data()
    view = outputs.logits_model(model, "probabilities")
    assert [id(v) for v in view.trainable_variables] == [id(v) for v in model.trainable_variables]
    np.testing.assert_allclose(
        np.exp(keras.ops.convert_to_numpy(view(x))), model(x), rtol=1e-5, atol=1e-7
    )
    assert outputs.logits_model(model, "logits") is model


def test_logits_model_of_a_dict_input_model():
    first, second = keras.Input((2,), name="first"), keras.Input((3,), name="second")
    merged = keras.layers.Concatenate()([first, second])
    model = keras.Model(
        {"first": first, "second": second}, keras.layers.Dense(4, activation="softmax")(merged)
    )
    view = outputs.logits_model(model, outputs.output_kind(model))
    inputs = {"first": np.ones((3, 2), "float32"), "second": np.ones((3, 3), "float32")}
    np.testing.assert_allclose(np.exp(view(inputs)), model(inputs), rtol=1e-5)


def test_log_probabilities_stay_finite_where_a_probability_underflows():
    values = keras.ops.convert_to_numpy(
        outputs.log_probabilities(np.array([[1.0, 0.0]], "float32"))
    )
    assert np.isfinite(values).all()
    assert values[0, 1] == pytest.approx(np.log(np.finfo("float32").tiny))


def test_bad_kind_names_the_argument():
    with pytest.raises(ValueError, match="`kind` must be one of"):
        outputs.as_logits(np.zeros((1, 2)), "logit")


def test_metric_of_a_softmax_model_is_the_metric_of_its_log_probabilities():
    logits, softmax = _pair()
    x, _ = _data(12)
    dense = MetricOperator(softmax, x).to_dense()
    # Reference: the Jacobian of log_softmax of the logits model, taken directly.
    with tf.GradientTape() as tape:
        log_p = tf.nn.log_softmax(logits(x), axis=-1)
    jacobians = tape.jacobian(log_p, logits.trainable_variables)
    rows = tf.concat([tf.reshape(j, [12 * 4, -1]) for j in jacobians], axis=1).numpy()
    np.testing.assert_allclose(dense, rows.T @ rows / 12, rtol=1e-4, atol=1e-6)
    # Probabilities: the softmax model's outputs equal the logits model's softmax.
    np.testing.assert_allclose(
        MetricOperator(softmax, x, outputs="probabilities").to_dense(),
        MetricOperator(logits, x, outputs="probabilities").to_dense(),
        rtol=1e-4,
        atol=1e-7,
    )


def test_fisher_diagonal_is_the_same_for_softmax_and_logits():
    logits, softmax = _pair()
    x, _ = _data()
    for a, b in zip(
        metric_diagonal(logits, x, kind="fisher", seed=3),
        metric_diagonal(softmax, x, kind="fisher", seed=3),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_evaluate_classifier_reads_probabilities():
    logits, softmax = _pair()
    x, y = _data()
    a = keras_fip.models.evaluate_classifier(logits, x, y)
    b = keras_fip.models.evaluate_classifier(softmax, x, y)
    assert a["accuracy"] == b["accuracy"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_trainer_walks_a_softmax_model_as_its_logits_twin():
    logits, softmax = _pair()
    x, y = _data(64)
    walked = []
    for model in (logits, softmax):
        copy = keras_fip.engine.copy_model(model)
        trainer = keras_fip.FIPTrainer(
            copy,
            distance="kl",
            beta=0.5,
            secondary_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        assert trainer.outputs_kind == outputs.output_kind(model)
        trainer.compile(optimizer=keras.optimizers.SGD(0.1))
        data = keras_fip.engine.fip_dataset(
            trainer.network, x, secondary=(x, y), batch_size=16, seed=0
        )
        trainer.fit(data, epochs=1, steps_per_epoch=5, verbose=0)
        walked.append(copy.get_weights())
    for a, b in zip(*walked):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The walk moved the weights.
    assert not np.allclose(walked[0][0], logits.get_weights()[0])


def test_compress_gives_a_softmax_model_the_result_of_its_logits_twin():
    logits, softmax = _pair()
    x, y = _data(64)
    results = [
        keras_fip.Compress(
            0.5, data=(x, y), walk=keras_fip.Walk(steps=30, batch_size=16, seed=0, verbose=0)
        )(m)
        for m in (logits, softmax)
    ]
    assert outputs.output_kind(results[1]) == "probabilities"
    for a, b in zip(results[0].get_weights(), results[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
        assert np.array_equal(a == 0, b == 0)


def test_fine_tune_baseline_trains_a_softmax_model_as_its_logits_twin():
    logits, softmax = _pair()
    x, y = _data(64)
    tuned = [
        keras_fip.baselines.FineTune(
            (x, y), head="shared", walk=keras_fip.Walk(epochs=1, batch_size=16, seed=0)
        )(m)
        for m in (logits, softmax)
    ]
    for a, b in zip(tuned[0].get_weights(), tuned[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
