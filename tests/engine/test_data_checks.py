"""Bad labels and bad token ids raise a `ValueError` naming the argument before any work.

Every operation reads its data through `keras_fip.core.data_adapter`; these tests feed
the mistakes users make with models written as the Keras documentation writes them
(one-hot labels from `keras.utils.to_categorical`, token ids beyond an `Embedding`'s
vocabulary, fractional float ids for a float `keras.Input`) to Compress, Repair, Ensemble,
ContinualLearn and Damage, and check that each is refused before the operation moves,
copies into a walk or changes its input, and that one-hot labels are read as the class
indices they encode.
"""

import re

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.core import data_adapter

VOCABULARY = 20
LENGTH = 6
CLASSES = 4


@keras.saving.register_keras_serializable(package="test_data_checks")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """The keras.io token and position embedding: two `Embedding`s in a custom layer."""

    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.maxlen, self.vocab_size, self.embed_dim = maxlen, vocab_size, embed_dim
        self.token_emb = keras.layers.Embedding(vocab_size, embed_dim)
        self.pos_emb = keras.layers.Embedding(maxlen, embed_dim)

    def call(self, x):
        positions = self.pos_emb(keras.ops.arange(0, keras.ops.shape(x)[-1], 1))
        return self.token_emb(x) + positions

    def get_config(self):
        config = super().get_config()
        config.update(maxlen=self.maxlen, vocab_size=self.vocab_size, embed_dim=self.embed_dim)
        return config


def _head(hidden):
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    hidden = keras.layers.Dense(8, activation="relu")(hidden)
    return keras.layers.Dense(CLASSES)(hidden)


def _custom_layer_model():
    """The keras.io transformer's front: a float32 `keras.Input` of token ids feeding a
    custom layer that holds the token and the position `Embedding`s."""
    inputs = keras.Input((LENGTH,))
    embedded = TokenAndPositionEmbedding(LENGTH, VOCABULARY, 8, name="token_and_position")(inputs)
    return keras.Model(inputs, _head(embedded), name="custom_layer")


def _direct_model():
    inputs = keras.Input((LENGTH,), dtype="int32")
    embedded = keras.layers.Embedding(VOCABULARY, 8, name="token_embedding")(inputs)
    return keras.Model(inputs, _head(embedded), name="direct")


def _several_inputs_model():
    """Token ids, float features and an integer mask, by name (as KerasHub's inputs)."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    features = keras.Input((3,), name="features")
    mask = keras.Input((LENGTH,), dtype="int32", name="mask")
    embedded = keras.layers.Embedding(VOCABULARY, 8, name="ids_embedding")(ids)
    weights = keras.layers.Reshape((LENGTH, 1))(mask)
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Multiply()([embedded, weights]))
    hidden = keras.layers.Dense(8, activation="relu")(
        keras.layers.Concatenate()([pooled, features])
    )
    return keras.Model(
        {"ids": ids, "features": features, "mask": mask},
        keras.layers.Dense(CLASSES)(hidden),
        name="several_inputs",
    )


def _dense_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(hidden), name="dense")


MODELS = {
    "custom_layer": _custom_layer_model,
    "direct": _direct_model,
    "several_inputs": _several_inputs_model,
}


def _built(name):
    keras.utils.set_random_seed(0)
    return MODELS[name]()


def _token_inputs(name, count=48, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCABULARY, (count, LENGTH))
    if name == "custom_layer":
        return ids.astype("float32")  # As the keras.io example feeds its float Input.
    if name == "direct":
        return ids.astype("int32")
    return {
        "ids": ids.astype("int32"),
        "features": rng.normal(size=(count, 3)).astype("float32"),
        "mask": np.ones((count, LENGTH), "int32"),
    }


def _labels(count=48, seed=0):
    return np.random.default_rng(seed + 1).integers(0, CLASSES, count)


def _with_ids(x, change):
    """`x` with its token ids (the `ids` of several inputs) changed by `change`."""
    if isinstance(x, dict):
        return {**x, "ids": change(x["ids"])}
    return change(x)


def _out_of_range(ids):
    ids = ids.copy()
    ids[3, 2] = VOCABULARY + 5
    return ids


def _negative(ids):
    ids = ids.copy()
    ids[1, 0] = -1
    return ids


def _fractional(ids):
    ids = ids.astype("float32")
    ids[2, 4] = 3.5
    return ids


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_raises_before_any_work(make_operation, model, match):
    """`make_operation()(model)` raises a `ValueError` matching `match`, and neither the
    operation nor the model moved."""
    before = _weights(model)
    made = []
    with pytest.raises(ValueError, match=match):
        made.append(make_operation())
        made[0](model)
    if made:
        assert made[0].path is None and made[0].history is None
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)


def _operations(argument_data, model):
    """Each operation, given `argument_data` where it reads labelled or anchor data."""
    return {
        "compress": lambda: keras_fip.Compress(
            0.5, data=argument_data, labels=1.0, walk=keras_fip.Walk(steps=4, seed=0, verbose=0)
        ),
        "repair": lambda: keras_fip.Repair(
            argument_data, walk=keras_fip.Walk(epochs=1, seed=0, verbose=0)
        ),
        "ensemble": lambda: keras_fip.Ensemble(
            2, data=argument_data, walk=keras_fip.Walk(steps=4, seed=0, verbose=0)
        ),
        "damage_eigen": lambda: keras_fip.Damage(
            keras_fip.faults.Eigen(0.5, num_eigenpairs=2), data=argument_data, seed=0
        ),
    }


@pytest.fixture(scope="module")
def models():
    """Each token model, and its `Damage("nodes")` result (for Repair)."""
    built = {}
    for name in MODELS:
        model = _built(name)
        built[name] = (model, keras_fip.Damage(keras_fip.faults.Nodes(0.25), seed=0)(model))
    keras.utils.set_random_seed(0)
    dense = _dense_model()
    built["dense"] = (dense, keras_fip.Damage(keras_fip.faults.Nodes(0.25), seed=0)(dense))
    return built


# Token ids.


TOKEN_CASES = {
    "out_of_range": (_out_of_range, r"id 25 \(ids must be < 20"),
    "negative": (_negative, r"id -1 \(ids must be >= 0"),
    "fractional": (_fractional, r"fractional value 3\.5 at index \(2, 4\)"),
}
TOKEN_READERS = {
    "custom_layer": r"token ids.*layer `token_and_position`",
    "direct": r"token ids.*layer `token_embedding`",
    "several_inputs": r"token ids.*layer `ids_embedding`",
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("operation", ["compress", "repair", "ensemble", "damage_eigen"])
def test_bad_token_ids_raise_naming_data_before_any_work(models, model_name, case, operation):
    change, received = TOKEN_CASES[case]
    model, damaged = models[model_name]
    bad = _with_ids(_token_inputs(model_name), change)
    argument = "data\\['ids'\\]" if model_name == "several_inputs" else "data"
    match = rf"`{argument}` must hold (token ids|integers)(.|\n)*Received: {argument} with"
    data = (bad, _labels())
    target = damaged if operation == "repair" else model
    make = _operations(data, target)[operation]
    with pytest.raises(ValueError, match=match) as error:
        make()(target)
    message = str(error.value)
    assert re.search(received, message), message
    if case != "fractional":
        assert re.search(TOKEN_READERS[model_name], message), message
        assert "input_dim=20" in message
    _assert_raises_before_any_work(make, target, match)


@pytest.mark.parametrize("argument", ["new_task", "memory"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_continual_learn_refuses_bad_token_ids_naming_the_argument(models, model_name, argument):
    model, _ = models[model_name]
    good = _token_inputs(model_name)
    bad = _with_ids(good, _out_of_range)
    label = f"{argument}\\['ids'\\]" if model_name == "several_inputs" else argument
    new_task = (bad if argument == "new_task" else good, _labels() % 2)
    memory = bad if argument == "memory" else good

    def make():
        walk = keras_fip.Walk(epochs=1, seed=0, verbose=0)
        return keras_fip.ContinualLearn(new_task, memory=memory, walk=walk)

    _assert_raises_before_any_work(
        make, model, rf"`{label}` must hold token ids in \[0, 20\)(.|\n)*id 25"
    )


def test_the_largest_embedding_of_a_custom_layer_bounds_its_ids():
    model = _built("custom_layer")
    ids = _token_inputs("custom_layer")
    ids[0, 0] = LENGTH + 1  # Beyond the position Embedding, within the token one.
    data_adapter.check_inputs_match_model(model, ids)
    ids[0, 0] = VOCABULARY
    with pytest.raises(
        ValueError, match=r"`embedding\w*` input_dim=20, `embedding\w*` input_dim=6"
    ):
        data_adapter.check_inputs_match_model(model, ids)


def test_integer_inputs_without_an_embedding_must_hold_integers():
    model = _built("several_inputs")
    x = _token_inputs("several_inputs")
    mask = x["mask"].astype("float32")
    data_adapter.check_inputs_match_model(model, {**x, "mask": mask})  # Integers as floats.
    mask[5, 1] = 0.25
    with pytest.raises(
        ValueError, match=r"`data\['mask'\]` must hold integers(.|\n)*int32 input `mask`.*0\.25"
    ):
        data_adapter.check_inputs_match_model(model, {**x, "mask": mask})
    # Float inputs nothing reads as ids are not checked.
    data_adapter.check_inputs_match_model(model, {**x, "features": x["features"] + 0.5})


def test_sequential_and_nested_models_are_read_through():
    keras.utils.set_random_seed(0)
    sequential = keras.Sequential(
        [
            keras.Input((LENGTH,)),
            keras.layers.Embedding(VOCABULARY, 4, name="first"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    inner_inputs = keras.Input((LENGTH,))
    inner = keras.Model(inner_inputs, keras.layers.Embedding(9, 4, name="inner")(inner_inputs))
    nested = keras.Sequential(
        [keras.Input((LENGTH,)), inner, keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    ids = np.full((3, LENGTH), 8, "int32")
    data_adapter.check_inputs_match_model(sequential, ids)
    data_adapter.check_inputs_match_model(nested, ids)
    with pytest.raises(ValueError, match=r"`Embedding` layer `first` \(input_dim=20\).*id 20"):
        data_adapter.check_inputs_match_model(sequential, ids + 12)
    with pytest.raises(ValueError, match=r"`Embedding` layer `.*/inner` \(input_dim=9\).*id 9"):
        data_adapter.check_inputs_match_model(nested, ids + 1)


def test_subclassed_models_are_checked_where_they_can_be_and_never_crash():
    @keras.saving.register_keras_serializable(package="test_data_checks")
    class Classifier(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.embedding = keras.layers.Embedding(VOCABULARY, 4)
            self.pool = keras.layers.GlobalAveragePooling1D()
            self.logits = keras.layers.Dense(CLASSES)

        def call(self, inputs):
            return self.logits(self.pool(self.embedding(inputs)))

    model = Classifier()
    model(np.zeros((1, LENGTH), "int32"))
    ids = _token_inputs("direct")
    x, y = data_adapter.normalize_data(
        (ids, keras.utils.to_categorical(_labels(), CLASSES)), model=model
    )
    data_adapter.check_inputs_match_model(model, x)
    np.testing.assert_array_equal(y, _labels())
    with pytest.raises(ValueError, match=r"fractional label 0\.5 at index 0"):
        data_adapter.normalize_data((ids, np.r_[0.5, _labels()[1:]]), model=model)


def test_kerashub_inputs_are_checked_against_their_embeddings():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=1,
        hidden_dim=8,
        intermediate_dim=8,
        max_sequence_length=LENGTH,
    )
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    x = {
        "token_ids": np.full((4, LENGTH), 29, "int32"),
        "segment_ids": np.ones((4, LENGTH), "int32"),
        "padding_mask": np.ones((4, LENGTH), bool),
    }
    data_adapter.check_inputs_match_model(classifier, x)
    for key, value, match in (
        ("token_ids", 30, r"`data\['token_ids'\]`.*`.*token_embedding` \(input_dim=30\).*id 30"),
        ("segment_ids", 2, r"`data\['segment_ids'\]`.*`.*segment_embedding` \(input_dim=2\)"),
        ("padding_mask", 0.5, r"`data\['padding_mask'\]` must hold integers.*0\.5"),
    ):
        bad = np.array(x[key], dtype="float32" if isinstance(value, float) else "int32")
        bad[1, 1] = value
        with pytest.raises(ValueError, match=match):
            data_adapter.check_inputs_match_model(classifier, {**x, key: bad})


def test_integer_ids_stored_as_float32_are_accepted_and_read_as_integers(models):
    model, _ = models["custom_layer"]
    ids = _token_inputs("custom_layer")
    assert ids.dtype == np.float32
    y = _labels()
    results = [
        keras_fip.Compress(
            0.5, data=(x, y), labels=1.0, walk=keras_fip.Walk(steps=4, seed=0, verbose=0)
        )(model)
        for x in (ids, ids.astype("int32"))
    ]
    for a, b in zip(*(result.get_weights() for result in results)):
        np.testing.assert_array_equal(a, b)


# Labels.


def _one_hot(y, width=CLASSES):
    return keras.utils.to_categorical(y, width)


LABEL_CASES = {
    "nan": (
        lambda y: np.r_[y[:2], np.nan, y[3:]],
        r"`data` labels must not contain NaN.*1 non-finite labels, such as nan at index 2",
    ),
    "wrong_length": (lambda y: y[:9], r"48 inputs and y of shape \(9,\)"),
    "fractional": (lambda y: np.r_[1.5, y[1:]], r"fractional label 1\.5 at index 0"),
    "negative": (lambda y: np.r_[-1, y[1:]], r"`data` labels must be class indices ≥ 0.*-1"),
    "probabilities": (
        lambda y: np.full((len(y), CLASSES), 1.0 / CLASSES),
        r"`data` labels must be class indices or one-hot rows.*row 0 is \[0\.25",
    ),
    "beyond_outputs": (
        lambda y: np.r_[y[:7], CLASSES, y[8:]],
        r"`data` labels must be class indices of the 4 outputs.*label 4 at index 7",
    ),
    "one_hot_too_wide": (
        lambda y: _one_hot(y, CLASSES + 1),
        r"`data` one-hot labels must have one column per output.*width 5",
    ),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
@pytest.mark.parametrize("operation", ["compress", "repair", "ensemble", "damage_eigen"])
def test_bad_labels_raise_naming_data_before_any_work(models, case, operation):
    change, match = LABEL_CASES[case]
    model, damaged = models["dense"]
    x = np.random.default_rng(0).normal(size=(48, 6)).astype("float32")
    target = damaged if operation == "repair" else model
    make = _operations((x, change(_labels())), target)[operation]
    _assert_raises_before_any_work(make, target, match)


@pytest.mark.parametrize("case", ["nan", "wrong_length", "fractional", "negative", "probabilities"])
def test_continual_learn_refuses_bad_labels_naming_new_task(models, case):
    change, match = LABEL_CASES[case]
    model, _ = models["dense"]
    x = np.random.default_rng(0).normal(size=(48, 6)).astype("float32")

    def make():
        return keras_fip.ContinualLearn(
            (x, change(_labels())), memory=x, walk=keras_fip.Walk(epochs=1, seed=0, verbose=0)
        )

    _assert_raises_before_any_work(make, model, match.replace("`data`", "`new_task`"))


def test_one_hot_and_column_labels_read_as_class_indices():
    model = _dense_model()
    x = np.zeros((48, 6), "float32")
    y = _labels()
    for labels in (y, y.astype("float32"), y[:, None], _one_hot(y), _one_hot(y).astype(bool)):
        for with_model in (None, model):
            _, read = data_adapter.normalize_data((x, labels), model=with_model)
            assert read.dtype == np.int64
            np.testing.assert_array_equal(read, y)
    # Without the model, labels of several axes that are not one-hot are per-position
    # class indices (a statically batched dataset read as it looks); the model refuses them.
    _, read = data_adapter.normalize_data((x, y.reshape(48, 1, 1) * np.ones((1, 3, 1))))
    assert read.shape == (48, 3)
    with pytest.raises(ValueError, match=r"labels must be class indices or one-hot rows"):
        data_adapter.normalize_data((x, np.stack([y, y], axis=1)), model=model)


def test_labels_a_task_requires_may_index_outputs_the_operation_adds():
    model = _dense_model()
    x = np.zeros((48, 6), "float32")
    beyond = _labels() + CLASSES
    _, read = data_adapter.normalize_data((x, beyond), require_labels=True, model=model)
    np.testing.assert_array_equal(read, beyond)
    with pytest.raises(ValueError, match=r"class indices of the 4 outputs.*label 7"):
        data_adapter.normalize_data(
            (x, beyond), require_labels=True, model=model, check_classes=True
        )


def test_continual_learn_grows_the_head_for_labels_beyond_the_old_outputs(models):
    # A new task with more classes than the old model has outputs: its labels index the
    # grown head, and one-hot labels of the task's own width give the same model.
    model, _ = models["dense"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = np.arange(48) % 6
    results = [
        keras_fip.ContinualLearn(
            (x, labels),
            memory=x[:16],
            walk=keras_fip.Walk(epochs=1, batch_size=16, seed=0, verbose=0),
        )(model)
        for labels in (y, _one_hot(y, 6))
    ]
    assert results[0].output_shape == (None, CLASSES + 6)
    for a, b in zip(*(result.get_weights() for result in results)):
        np.testing.assert_array_equal(a, b)


def test_one_hot_labels_give_the_integer_labels_result(models):
    # Compress here; Repair's methods are checked alike, their validation labels one-hot
    # too, in tests/operations/test_repair.py.
    model, _ = models["dense"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = _labels()
    results = []
    for labels in (y, _one_hot(y)):
        keras.utils.set_random_seed(0)
        operation = keras_fip.Compress(
            0.5, data=(x, labels), labels=1.0, walk=keras_fip.Walk(steps=6, seed=0, verbose=0)
        )
        results.append(operation(model))
    for a, b in zip(*(result.get_weights() for result in results)):
        np.testing.assert_array_equal(a, b)
