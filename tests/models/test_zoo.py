import keras
import numpy as np
import pytest

from keras_fip import models

IMAGE_MODELS = [
    ("mlp", lambda: models.mlp(16, input_shape=(8, 8, 1), num_classes=10), (8, 8, 1), 10),
    ("lenet_300_100", lambda: models.lenet_300_100(), (28, 28, 1), 10),
    ("cnn5", lambda: models.cnn5(num_classes=20), (28, 28, 1), 20),
    ("vgg11", lambda: models.vgg(11, width_multiplier=0.125), (32, 32, 3), 10),
    ("vgg16", lambda: models.vgg(16, width_multiplier=0.125), (32, 32, 3), 10),
    ("resnet20", lambda: models.resnet(20, width_multiplier=0.25), (32, 32, 3), 10),
    ("resnet18", lambda: models.resnet(18, width_multiplier=0.0625), (32, 32, 3), 10),
]


def _one_training_step(model, x, y):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.copy() for w in model.get_weights()]
    loss_before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    changed = [not np.allclose(a, b) for a, b in zip(before, model.get_weights())]
    return loss_before, changed


@pytest.mark.parametrize(
    "name, build, input_shape, num_classes", IMAGE_MODELS, ids=[m[0] for m in IMAGE_MODELS]
)
def test_zoo_model_builds_names_layers_and_trains(name, build, input_shape, num_classes):
    model = build()
    assert isinstance(model, keras.Model) and model.inputs is not None  # functional
    assert model.output_shape == (None, num_classes)
    assert model.layers[-1].name == "logits"
    assert model.layers[-1].get_config()["activation"] == "linear"  # logits, not softmax
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    rng = np.random.default_rng(0)
    x = rng.random((8,) + input_shape).astype("float32")
    y = rng.integers(0, num_classes, 8)
    _, changed = _one_training_step(model, x, y)
    assert all(changed), f"{name}: some weights did not receive a gradient"


def test_paper_parameter_counts():
    assert models.lenet_300_100().count_params() == 266_610
    assert models.mlp(100).count_params() == 79_510
    assert models.resnet(20).count_params() == 274_042


def test_transformer_classifier_trains_and_survives_save_load(tmp_path):
    model = models.transformer_classifier(
        vocab_size=50,
        sequence_length=12,
        num_classes=3,
        embed_dim=8,
        num_heads=2,
        feed_forward_dim=16,
        num_layers=1,
    )
    layer_types = {type(layer).__name__ for layer in model.layers}
    assert {"Embedding", "MultiHeadAttention", "LayerNormalization", "Add"} <= layer_types
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (6, 12)).astype("int32")
    y = rng.integers(0, 3, 6)
    _, changed = _one_training_step(model, x, y)
    assert sum(changed) >= len(changed) - 1
    path = str(tmp_path / "transformer.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), restored.predict(x, verbose=0), atol=1e-6
    )


def test_position_embedding_makes_order_matter():
    model = models.transformer_classifier(
        vocab_size=20, sequence_length=6, num_classes=2, embed_dim=8, num_layers=1
    )
    x = np.array([[1, 2, 3, 4, 5, 6]], dtype="int32")
    assert not np.allclose(model.predict(x, verbose=0), model.predict(x[:, ::-1], verbose=0))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: models.vgg(13), "`depth`"),
        (lambda: models.resnet(34), "`depth`"),
        (lambda: models.resnet(20, width_multiplier=0), "`width_multiplier`"),
        (lambda: models.mlp(0), "`hidden_units`"),
        (lambda: models.cnn5(input_shape=(28, 28)), "`input_shape`"),
        (lambda: models.lenet_300_100(num_classes=0), "`num_classes`"),
        (lambda: models.get("alexnet", (32, 32, 3), 10), "`name`"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_evaluate_classifier_matches_manual_accuracy():
    model = models.mlp(4, input_shape=(3,), num_classes=2)
    x = np.random.default_rng(1).random((50, 3)).astype("float32")
    y = np.random.default_rng(2).integers(0, 2, 50)
    result = models.evaluate_classifier(model, x, y)
    manual = np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)
    assert result["accuracy"] == pytest.approx(manual)


@pytest.mark.parametrize("depth", [11, 16])
def test_vgg_builds_on_28x28_inputs(depth):
    # Five 2x2 poolings would reach zero size at 28x28 without `same` padding.
    model = models.vgg(depth, width_multiplier=0.125, input_shape=(28, 28, 1))
    outputs = model(np.zeros((2, 28, 28, 1), "float32"))
    assert tuple(outputs.shape) == (2, 10)
    assert model.get_layer("block5_pool").output.shape[1:3] == (1, 1)
