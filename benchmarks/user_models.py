"""Models written the way the Keras documentation writes them, trained the way it trains them.

None of these models is part of keras_fip: they stand for what a user brings. The benchmarks
and tests that check keras_fip's defaults on users' models build them from here.

- `mnist_convnet`: the "Simple MNIST convnet" of keras.io — Sequential, two convolutions,
  Dropout, `Dense(10, activation="softmax")`, compiled with `categorical_crossentropy` on
  one-hot labels.
- `text_transformer`: the "Text classification with Transformer" of keras.io — custom
  `TokenAndPositionEmbedding` and `TransformerBlock` layer subclasses (MultiHeadAttention,
  a feed-forward Sequential inside, LayerNormalization, Dropout), a softmax head, token ids
  from `keras.layers.TextVectorization`.
- `residual_convnet`: a small BatchNorm residual conv net with a logits output, for the 8×8
  digits.
- `mobilenet`: `keras.applications.MobileNetV3Small(weights=None)`, a softmax classifier.

`trained(name, seed)` trains one of them on its data (cached under
`~/.cache/keras_fip/user_models`, or `$KERAS_FIP_CACHE/user_models`) and returns
`(model, data)`, `data` a dict of numpy splits.

Example:

    python -m benchmarks.user_models --models=mnist_convnet,text_transformer --seeds=0
"""

import argparse
import json
import os

import keras
import numpy as np
from keras import layers
from keras import ops

from keras_fip import data as data_lib
from keras_fip.data import text as text_lib

PACKAGE = "user_models"


# The Keras MNIST convnet


def mnist_convnet(input_shape=(28, 28, 1), num_classes=10):
    """The keras.io "Simple MNIST convnet", as written there (softmax output)."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )


# The Keras text transformer: custom layer subclasses


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(layers.Layer):
    """The keras.io transformer block: self-attention and a feed-forward network."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim, self.rate = embed_dim, num_heads, ff_dim, rate
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=None):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output, training=training)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output, training=training)
        return self.layernorm2(out1 + ffn_output)

    def get_config(self):
        config = super().get_config()
        config.update(
            embed_dim=self.embed_dim, num_heads=self.num_heads, ff_dim=self.ff_dim, rate=self.rate
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenAndPositionEmbedding(layers.Layer):
    """The keras.io token and position embedding."""

    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.maxlen, self.vocab_size, self.embed_dim = maxlen, vocab_size, embed_dim
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions

    def get_config(self):
        config = super().get_config()
        config.update(maxlen=self.maxlen, vocab_size=self.vocab_size, embed_dim=self.embed_dim)
        return config


def text_transformer(maxlen=64, vocab_size=20000, num_classes=2, embed_dim=32, num_heads=2):
    """The keras.io "Text classification with Transformer" model (softmax output)."""
    inputs = layers.Input(shape=(maxlen,))
    x = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)(inputs)
    x = TransformerBlock(embed_dim, num_heads, ff_dim=32)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


# A BatchNorm residual conv net with logits, and a keras.applications model


def residual_convnet(input_shape=(8, 8, 1), num_classes=10, width=24):
    """A small BatchNorm residual conv net returning logits."""
    inputs = keras.Input(input_shape)
    stem = layers.Conv2D(width, 3, padding="same")(inputs)
    stem = layers.ReLU()(layers.BatchNormalization()(stem))
    branch = layers.Conv2D(width, 3, padding="same")(stem)
    branch = layers.BatchNormalization()(branch)
    hidden = layers.ReLU()(layers.Add()([stem, branch]))
    hidden = layers.GlobalAveragePooling2D()(hidden)
    hidden = layers.Dense(64, activation="relu")(hidden)
    outputs = layers.Dense(num_classes)(hidden)
    return keras.Model(inputs, outputs, name="residual_convnet")


def mobilenet(input_shape=(32, 32, 3), num_classes=10):
    """`keras.applications.MobileNetV3Small`, untrained, with its softmax classifier."""
    return keras.applications.MobileNetV3Small(
        input_shape=input_shape, weights=None, classes=num_classes, include_preprocessing=True
    )


# Data, as the Keras examples prepare it


def mnist_data(train_size=None, seed=0):
    """MNIST as the keras.io convnet example prepares it: floats in [0, 1], (28, 28, 1),
    one-hot labels (`keras.utils.to_categorical`), and integer labels beside them."""
    x, y = data_lib.load("mnist", "train")
    x_test, y_test = data_lib.load("mnist", "test")
    if train_size and train_size < len(x):
        rows = np.random.default_rng(seed).permutation(len(x))[:train_size]
        x, y = x[rows], y[rows]
    x, x_test = _unit_images(x), _unit_images(x_test)
    return {
        "x": x,
        "y": y.astype("int64"),
        "y_onehot": keras.utils.to_categorical(y, 10),
        "x_test": x_test,
        "y_test": y_test.astype("int64"),
    }


def fashion_mnist_data():
    """The Fashion-MNIST subset on disk, prepared as `mnist_data` prepares MNIST."""
    x, y = data_lib.load("fashion_mnist", "train")
    x_test, y_test = data_lib.load("fashion_mnist", "test")
    return {
        "x": _unit_images(x),
        "y": y.astype("int64"),
        "x_test": _unit_images(x_test),
        "y_test": y_test.astype("int64"),
    }


def _unit_images(images):
    images = np.asarray(images, dtype="float32")
    if images.max() > 1.5:
        images = images / 255.0
    return images.reshape(len(images), 28, 28, 1)


def text_data(maxlen=64, vocab_size=20000):
    """SST-2 (train / validation / test) and CR (a seeded 90/10 split), as token ids of a
    `keras.layers.TextVectorization` adapted to the SST-2 training sentences, as a user of
    the keras.io example would tokenize them (CR with the SST-2 vocabulary)."""
    sst_train, sst_y = text_lib.load_text("sst2", "train")
    sst_val, sst_val_y = text_lib.load_text("sst2", "validation")
    sst_test, sst_test_y = text_lib.load_text("sst2", "test")
    cr_train, cr_y = text_lib.load_text("cr", "train")
    cr_test, cr_test_y = text_lib.load_text("cr", "test")
    vectorize = layers.TextVectorization(max_tokens=vocab_size, output_sequence_length=maxlen)
    vectorize.adapt(list(sst_train))

    def ids(sentences):
        return np.asarray(vectorize(np.asarray(list(sentences), dtype=object)), dtype="int32")

    return {
        "x": ids(sst_train),
        "y": sst_y.astype("int64"),
        "x_val": ids(sst_val),
        "y_val": sst_val_y.astype("int64"),
        "x_test": ids(sst_test),
        "y_test": sst_test_y.astype("int64"),
        "cr_x": ids(cr_train),
        "cr_y": cr_y.astype("int64"),
        "cr_x_test": ids(cr_test),
        "cr_y_test": cr_test_y.astype("int64"),
        "vocabulary_size": int(vectorize.vocabulary_size()),
    }


def digits_data():
    """scikit-learn's bundled 8×8 digits, float32 (N, 8, 8, 1) in [0, 1], integer labels."""
    x, y = data_lib.load("digits", "train")
    x_test, y_test = data_lib.load("digits", "test")
    return {
        "x": x.astype("float32"),
        "y": y.astype("int64"),
        "x_test": x_test.astype("float32"),
        "y_test": y_test.astype("int64"),
    }


def cifar10_data():
    """The CIFAR-10 subset on disk as floats in [0, 255] (MobileNetV3 rescales its inputs)."""
    x, y = data_lib.load("cifar10", "train")
    x_test, y_test = data_lib.load("cifar10", "test")
    return {
        "x": np.asarray(x, "float32"),
        "y": np.asarray(y, "int64").reshape(-1),
        "x_test": np.asarray(x_test, "float32"),
        "y_test": np.asarray(y_test, "int64").reshape(-1),
    }


# Training as the Keras examples train, cached

# How each model is compiled and fit, as its Keras example does: the MNIST convnet as
# keras.io trains it (15 epochs, a tenth of the training images for validation); the text
# transformer as keras.io trains it on SST-2's official split, with the early stopping a
# careful user adds (its first epochs can sit at chance for some seeds).
RECIPES = {
    "mnist_convnet": {
        "loss": "categorical_crossentropy",
        "labels": "y_onehot",
        "batch_size": 128,
        "epochs": 15,
        "validation_split": 0.1,
    },
    "text_transformer": {
        "loss": "sparse_categorical_crossentropy",
        "labels": "y",
        "batch_size": 32,
        "epochs": 8,
        "validation": ("x_val", "y_val"),
        "patience": 3,
    },
    "residual_convnet": {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "labels": "y",
        "batch_size": 64,
        "epochs": 30,
    },
    "mobilenet": {
        "loss": "sparse_categorical_crossentropy",
        "labels": "y",
        "batch_size": 64,
        "epochs": 10,
    },
}


def load_data(name, train_size=None, seed=0):
    """The data a model of `RECIPES` trains on."""
    if name == "mnist_convnet":
        return mnist_data(train_size, seed)
    if name == "text_transformer":
        return text_data()
    if name == "residual_convnet":
        return digits_data()
    if name == "mobilenet":
        return cifar10_data()
    raise ValueError(f"`name` must be one of {sorted(RECIPES)}. Received: name={name!r}")


def build(name, data=None):
    """An untrained model of `RECIPES`."""
    if name == "mnist_convnet":
        return mnist_convnet()
    if name == "text_transformer":
        size = data["vocabulary_size"] if data else 20000
        return text_transformer(vocab_size=size)
    if name == "residual_convnet":
        return residual_convnet()
    if name == "mobilenet":
        return mobilenet()
    raise ValueError(f"`name` must be one of {sorted(RECIPES)}. Received: name={name!r}")


def _cache_dir():
    root = os.environ.get("KERAS_FIP_CACHE", os.path.expanduser("~/.cache/keras_fip"))
    return os.path.join(root, "user_models")


def trained(name, seed=0, epochs=None, train_size=None, cache=True):
    """`(model, data)`: a model of `RECIPES` compiled and fit as the Keras example does.

    Args:
        name: A key of `RECIPES`.
        seed: Seed of the initialisation and of the training.
        epochs: Epochs of `fit` (at most, with early stopping). Defaults to the recipe's.
        train_size: Training examples (a seeded subset; MNIST only). Defaults to all.
        cache: Keep the trained model under `_cache_dir()` and reuse it.

    Returns:
        The trained `keras.Model` (compiled as the example compiles it) and the data dict.
    """
    recipe = RECIPES[name]
    epochs = recipe["epochs"] if epochs is None else epochs
    data = load_data(name, train_size, seed)
    path = os.path.join(
        _cache_dir(), f"{name}_docs_seed{seed}_epochs{epochs}_train{train_size or 'all'}.keras"
    )
    if cache and os.path.exists(path):
        return keras.saving.load_model(path), data
    keras.utils.set_random_seed(seed)
    model = build(name, data)
    model.compile(optimizer="adam", loss=recipe["loss"], metrics=["accuracy"])
    fit_options = {}
    if "validation_split" in recipe:
        fit_options["validation_split"] = recipe["validation_split"]
    if "validation" in recipe:
        x_key, y_key = recipe["validation"]
        fit_options["validation_data"] = (data[x_key], data[y_key])
        fit_options["callbacks"] = [
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=recipe["patience"], restore_best_weights=True
            )
        ]
    model.fit(
        data["x"],
        data[recipe["labels"]],
        batch_size=recipe["batch_size"],
        epochs=epochs,
        verbose=0,
        **fit_options,
    )
    if cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        model.save(path)
    return model, data


def accuracy(model, x, y, batch_size=500):
    """Top-1 accuracy of `model` on `(x, y)` (integer labels), whatever its outputs."""
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(outputs, axis=-1) == np.asarray(y)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--epochs", type=int, default=None, help="Epochs of `fit` (default: the recipe's)."
    )
    parser.add_argument(
        "--train_size",
        type=int,
        default=None,
        help="Training examples, a seeded subset (MNIST only; default: all).",
    )
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            model, data = trained(name, seed, epochs=args.epochs, train_size=args.train_size)
            print(
                json.dumps(
                    {
                        "benchmark": "user_models",
                        "model": name,
                        "seed": seed,
                        "params": int(model.count_params()),
                        "test_accuracy": accuracy(model, data["x_test"], data["y_test"]),
                    }
                )
            )


if __name__ == "__main__":
    main()
