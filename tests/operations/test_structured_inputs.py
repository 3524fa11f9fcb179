"""Models with several inputs (a dict or a list of arrays, as Keras takes them), and
KerasHub tasks with their preprocessor, through the engine, the metric and the operations.

The reference for every numerical check is the same network written with one input: the
two inputs concatenated and split again inside the model, with the same weights, so the
walks, products and estimates must agree with the single-array path to rounding.
"""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fip
from keras_fip.core import data_adapter
from keras_fip.core.copy import copy_model
from keras_fip.geometry.diagonal import metric_diagonal
from keras_fip.geometry.metric import MetricOperator
from keras_fip.operations.base import carried_data

WIDTHS = {"a": 5, "b": 3}


def _layers():
    keras.utils.set_random_seed(0)
    return (
        keras.layers.Dense(12, activation="tanh", name="hidden_a"),
        keras.layers.Dense(8, activation="relu", name="hidden"),
        keras.layers.Dense(4, name="logits"),
    )


def _two_input_model(structure="dict"):
    """`a` through a hidden layer, concatenated with `b`, then two Dense layers."""
    hidden_a, hidden, logits = _layers()
    a = keras.Input((WIDTHS["a"],), name="a")
    b = keras.Input((WIDTHS["b"],), name="b")
    joined = keras.layers.Concatenate()([hidden_a(a), b])
    outputs = logits(hidden(joined))
    inputs = {"a": a, "b": b} if structure == "dict" else [a, b]
    return keras.Model(inputs, outputs, name=f"two_inputs_{structure}")


def _one_input_model():
    """The same network on the concatenation of `a` and `b`, split inside the model by
    standard layers (the operations refuse `Lambda`)."""
    hidden_a, hidden, logits = _layers()
    x = keras.Input((WIDTHS["a"] + WIDTHS["b"],), name="x")
    column = keras.layers.Reshape((WIDTHS["a"] + WIDTHS["b"], 1))(x)
    a = keras.layers.Flatten()(keras.layers.Cropping1D((0, WIDTHS["b"]))(column))
    b = keras.layers.Flatten()(keras.layers.Cropping1D((WIDTHS["a"], 0))(column))
    outputs = logits(hidden(keras.layers.Concatenate()([hidden_a(a), b])))
    return keras.Model(x, outputs, name="one_input")


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    x = {key: rng.normal(size=(160, width)).astype("float32") for key, width in WIDTHS.items()}
    y = (x["a"][:, 0] + x["b"][:, 1] > 0).astype("int64") + 2 * (x["a"][:, 1] > 0)
    return x, y


@pytest.fixture(scope="module")
def trained(task):
    x, y = task
    model = _two_input_model("dict")
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    return model


def _twins(trained):
    """The trained dict model, its list-input and its one-input twins (equal weights)."""
    as_list = _two_input_model("list")
    single = _one_input_model()
    for twin in (as_list, single):
        twin.set_weights(trained.get_weights())
    return as_list, single


def _joined(x):
    return np.concatenate([x["a"], x["b"]], axis=1)


def test_normalize_data_reads_dicts_lists_and_datasets_of_several_inputs(task):
    x, y = task
    for data in (
        x,
        (x,),
        (x, y),
        [x["a"], x["b"]],
        ([x["a"], x["b"]], y),
        tf.data.Dataset.from_tensor_slices((x, y)).batch(50),
        tf.data.Dataset.from_tensor_slices(x),
    ):
        inputs, labels = data_adapter.normalize_data(data)
        arrays = list(inputs.values()) if isinstance(inputs, dict) else inputs
        np.testing.assert_array_equal(arrays[0], x["a"])
        np.testing.assert_array_equal(arrays[1], x["b"])
        assert data_adapter.num_examples(inputs) == 160
        if labels is not None:
            np.testing.assert_array_equal(labels, y)
    # A list of Python lists is still one array; a tuple is still (x, y).
    inputs, labels = data_adapter.normalize_data([[1.0, 2.0], [3.0, 4.0]])
    assert inputs.shape == (2, 2) and labels is None
    inputs, labels = data_adapter.normalize_data((x["a"], y))
    assert inputs.shape == (160, 5) and labels.shape == (160,)


@pytest.mark.parametrize(
    "data, message",
    [
        (lambda x: {"a": x["a"], "b": x["b"][:10]}, r"one batch length.*'b': 10"),
        (
            lambda x: {"a": x["a"], "b": np.full_like(x["b"], np.nan)},
            r"`data\['b'\]` must not contain NaN",
        ),
        (
            lambda x: {"a": x["a"], "b": np.array(["w"] * 160)},
            r"`data\['b'\]` must hold a non-empty numeric",
        ),
        (lambda x: {"a": x["a"], "b": {"c": x["b"]}}, r"`data\['b'\]` must be an array"),
        (lambda x: {}, "at least one input array"),
    ],
)
def test_bad_structured_data_raise_naming_the_input(task, data, message):
    x, _ = task
    with pytest.raises(ValueError, match=message):
        data_adapter.normalize_data(data(x))


def test_inputs_are_checked_against_the_model_before_any_work(task, trained):
    x, _ = task
    as_list, single = _twins(trained)
    before = [w.copy() for w in trained.get_weights()]
    cases = [
        (trained, x["a"], r"one array per input of model .*\['a', 'b'\]"),
        (trained, {"a": x["a"]}, r"keyed \['a', 'b'\]. Received: data with keys \['a'\]"),
        (
            trained,
            {"a": x["a"], "b": x["a"]},
            r"`data\['b'\]` must hold inputs of shape \(batch, 3\)",
        ),
        (as_list, [x["a"]], "must hold 2 arrays"),
        (single, x, "model `one_input` has one input"),
    ]
    for model, data, message in cases:
        operation = keras_fip.Compress(0.5, data=data, walk=keras_fip.Walk(steps=4, verbose=0))
        with pytest.raises(ValueError, match=message):
            operation(model)
        assert operation.path is None  # No walk started.
    for weight, original in zip(trained.get_weights(), before):
        np.testing.assert_array_equal(weight, original)


def test_metric_of_several_inputs_equals_the_one_input_network(task, trained):
    x, _ = task
    as_list, single = _twins(trained)
    rng = np.random.default_rng(1)
    metric = MetricOperator(single, _joined(x), batch_size=64)
    block = rng.normal(size=(metric.num_params, 3)).astype("float32")
    expected = metric.matmat(block)
    for model, data in ((trained, x), (as_list, [x["a"], x["b"]]), (trained, (x, None))):
        operator = MetricOperator(model, data, batch_size=64)  # 3 batches: 64, 64, 32.
        np.testing.assert_allclose(operator.matmat(block), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            operator.matvec(block[:, 0]), expected[:, 0], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            operator.quadratic_form(block), np.sum(block * expected, axis=0), rtol=1e-5
        )
    # The dense metric from each example's Jacobian, as a reference for all of them.
    small = {key: value[:6] for key, value in x.items()}
    dense = MetricOperator(trained, small).to_dense()
    jacobians = []
    for i in range(6):
        with tf.GradientTape() as tape:
            outputs = trained({key: value[i : i + 1] for key, value in small.items()})
        pieces = tape.jacobian(outputs, trained.trainable_variables)
        jacobians.append(np.concatenate([np.reshape(p, (4, -1)) for p in pieces], axis=1))
    reference = sum(j.T @ j for j in jacobians) / 6
    np.testing.assert_allclose(dense, reference, rtol=1e-4, atol=1e-6)


def test_metric_diagonal_of_several_inputs_equals_the_one_input_network(task, trained):
    x, _ = task
    _, single = _twins(trained)
    for kind in ("jacobian", "fisher"):
        expected = metric_diagonal(single, _joined(x), kind=kind, batch_size=64, seed=3)
        received = metric_diagonal(trained, x, kind=kind, batch_size=64, seed=3)
        for a, b in zip(received, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_compress_of_several_inputs_equals_the_one_input_network(task, trained):
    x, y = task
    as_list, single = _twins(trained)
    before = [w.copy() for w in trained.get_weights()]

    def compress(model, data):
        keras.utils.set_random_seed(0)
        walk = keras_fip.Walk(steps=30, batch_size=32, verbose=0, seed=0)
        return keras_fip.Compress(0.7, data=data, walk=walk)(model)

    expected = compress(single, (_joined(x), y))
    for model, data in ((trained, (x, y)), (as_list, ([x["a"], x["b"]], y))):
        result = compress(model, data)
        for a, b in zip(result.get_weights(), expected.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        masks = keras_fip.masks(result)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.size for m in masks.values())
        assert total - kept == round(0.7 * total)  # Exact sparsity.
        for variable in result.trainable_variables:
            if variable.path in masks:
                assert np.all(variable.numpy()[~masks[variable.path]] == 0)
    for weight, original in zip(trained.get_weights(), before):
        np.testing.assert_array_equal(weight, original)  # The input was not changed.

    # A dict-input result saves, loads and serves with equal outputs.
    result = compress(trained, x)
    expected_outputs = result.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        result.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), expected_outputs, atol=1e-6)
        keras_fip.export(result, os.path.join(directory, "serving"))
        served = tf.saved_model.load(os.path.join(directory, "serving"))
        outputs = served.serve(tf.constant(x["a"]), tf.constant(x["b"]))
        np.testing.assert_allclose(np.asarray(outputs), expected_outputs, atol=1e-5)


def test_continual_learn_of_several_inputs_equals_the_one_input_network(task, trained):
    x, y = task
    _, single = _twins(trained)
    rng = np.random.default_rng(2)
    new = {key: rng.normal(size=(96, width)).astype("float32") for key, width in WIDTHS.items()}
    new_y = (new["a"][:, 2] > 0).astype("int64")

    def learn(model, new_task, memory, eval_tasks):
        keras.utils.set_random_seed(0)
        operation = keras_fip.ContinualLearn(
            new_task,
            memory=memory,
            head="append",
            memory_per_task=20,
            eval_tasks=eval_tasks,
            eval_every=3,
            walk=keras_fip.Walk(epochs=2, batch_size=32, verbose=0, seed=0),
        )
        return operation(model), operation

    expected, reference = learn(single, (_joined(new), new_y), _joined(x), [(_joined(x), y)])
    result, operation = learn(trained, (new, new_y), x, [(x, y)])
    for a, b in zip(result.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        operation.history["task_0/accuracy"], reference.history["task_0/accuracy"]
    )
    memory = carried_data(result)
    assert sorted(memory) == ["a", "b"] and memory["a"].shape == (180, 5)
    np.testing.assert_array_equal(_joined(memory), carried_data(expected))
    # The carried memory serves the next operation.
    compressed = keras_fip.Compress(0.5, walk=keras_fip.Walk(steps=4, verbose=0))(result)
    assert sum(int((~m).sum()) for m in keras_fip.masks(compressed).values()) > 0


def _tiny_bert_classifier():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor, dropout=0.0
    )


def test_kerashub_task_keeps_its_class_and_preprocessor():
    classifier = _tiny_bert_classifier()
    rng = np.random.default_rng(0)
    texts = np.array([" ".join(f"w{i}" for i in rng.integers(0, 40, 5)) for _ in range(48)])
    features = {key: np.asarray(value) for key, value in classifier.preprocessor(texts).items()}
    copied = copy_model(classifier)
    assert type(copied) is type(classifier)
    assert copied.preprocessor.tokenizer.vocabulary == classifier.preprocessor.tokenizer.vocabulary
    np.testing.assert_allclose(
        copied.predict(texts, verbose=0), classifier.predict(texts, verbose=0), atol=1e-6
    )

    before = [w.copy() for w in classifier.get_weights()]
    walk = keras_fip.Walk(steps=6, batch_size=16, verbose=0, seed=0)
    result = keras_fip.Compress(0.5, data=features, walk=walk)(classifier)
    assert type(result) is type(classifier)
    # The returned task reads raw text through its own preprocessor, and agrees with
    # its backbone and head on the preprocessed features.
    on_text = result.predict(texts, verbose=0)
    np.testing.assert_allclose(on_text, result(features, training=False), atol=1e-5)
    assert not np.allclose(on_text, classifier.predict(texts, verbose=0), atol=1e-4)
    masks = keras_fip.masks(result)
    assert masks
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.5 * sum(m.size for m in masks.values()))
    for weight, original in zip(classifier.get_weights(), before):
        np.testing.assert_array_equal(weight, original)


def _new_task(task):
    x, _ = task
    shifted = {key: value[::-1] + 0.5 for key, value in x.items()}
    return shifted, (shifted["a"][:, 3] > 0.5).astype("int64")


# `make(data)`: the operation or baseline on `data(x)`, `data` mapping the dict of inputs
# to the model's own format (the dict, or the one array of the twin).
OPERATIONS = {
    "damage_eigen": lambda task, data: keras_fip.Damage(
        keras_fip.faults.Eigen(0.5, num_eigenpairs=3), data=(data(task[0]), task[1]), seed=0
    ),
    "damage_nodes": lambda task, data: keras_fip.Damage(
        keras_fip.faults.Nodes(0.25), data=data(task[0]), seed=0
    ),
    "damage_repair": lambda task, data: keras_fip.chain(
        keras_fip.Damage(keras_fip.faults.Nodes(0.25), seed=0),
        keras_fip.Repair(
            (data(task[0]), task[1]),
            walk=keras_fip.Walk(epochs=2, batch_size=32, verbose=0, seed=0),
        ),
    ),
    "ensemble": lambda task, data: keras_fip.Ensemble(
        2,
        data=(data(task[0]), task[1]),
        diversity=keras_fip.operations.ensemble.Diversity(weight=0),
        walk=keras_fip.Walk(steps=12, batch_size=32, verbose=0, seed=0),
    ),
    "isofunctional": lambda task, data: keras_fip.Isofunctional(
        data=data(task[0]), walk=keras_fip.Walk(steps=6, batch_size=32, verbose=0, seed=0)
    ),
    "finetune": lambda task, data: keras_fip.baselines.FineTune(
        (data(_new_task(task)[0]), _new_task(task)[1]),
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
    "ewc": lambda task, data: keras_fip.baselines.EWC(
        (data(_new_task(task)[0]), _new_task(task)[1]),
        fisher_data=data(task[0]),
        ewc_lambda=10.0,
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
    "lwf": lambda task, data: keras_fip.baselines.LwF(
        (data(_new_task(task)[0]), _new_task(task)[1]),
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
    "replay": lambda task, data: keras_fip.baselines.ExperienceReplay(
        (data(_new_task(task)[0]), _new_task(task)[1]),
        memory=(data(task[0]), task[1]),
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
    "agem": lambda task, data: keras_fip.baselines.AGEM(
        (data(_new_task(task)[0]), _new_task(task)[1]),
        memory=(data(task[0]), task[1]),
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
    "joint": lambda task, data: keras_fip.baselines.JointTraining(
        (data(_new_task(task)[0]), _new_task(task)[1]),
        old_tasks=[(data(task[0]), task[1])],
        walk=keras_fip.Walk(epochs=1, batch_size=32, seed=0),
    ),
}

PRUNINGS = {
    "one_shot": keras_fip.baselines.one_shot_magnitude_pruning,
    "gradual": keras_fip.baselines.gradual_magnitude_pruning,
}


@pytest.mark.parametrize("name", sorted(OPERATIONS) + sorted(PRUNINGS) + ["deep_ensemble"])
def test_operations_and_baselines_on_several_inputs_equal_the_one_input_network(
    task, trained, name
):
    x, y = task
    _, single = _twins(trained)
    before = [w.copy() for w in trained.get_weights()]

    def run(model, data):
        keras.utils.set_random_seed(0)
        if name in PRUNINGS:
            return PRUNINGS[name](model, 0.6, data(x), y, epochs=2, batch_size=32)
        if name == "deep_ensemble":
            ensemble, _ = keras_fip.baselines.deep_ensemble(
                model, data(x), y, num_members=2, epochs=1, batch_size=32, seed=0
            )
            return ensemble
        return OPERATIONS[name](task, data)(model)

    expected = run(single, _joined)
    result = run(trained, lambda inputs: inputs)
    np.testing.assert_allclose(
        result.predict(x, verbose=0), expected.predict(_joined(x), verbose=0), rtol=1e-4, atol=1e-5
    )
    for weight, original in zip(trained.get_weights(), before):
        np.testing.assert_array_equal(weight, original)
