import keras
import numpy as np
import pytest

from keras_fip import models
from keras_fip.operations.shrink import shrink


def _zero_outputs(layer, channels):
    kernel = layer.kernel.numpy()
    kernel[..., channels] = 0.0
    layer.kernel.assign(kernel)


def _inputs(shape, count=6):
    return np.random.default_rng(0).random((count,) + shape).astype("float32")


def test_dense_units_with_nonzero_bias_are_folded_exactly():
    keras.utils.set_random_seed(0)
    model = models.lenet_300_100()
    layer = model.get_layer("dense_1")
    _zero_outputs(layer, np.arange(0, 300, 2))
    layer.bias.assign(np.random.default_rng(1).normal(size=300).astype("float32"))
    before = [w.copy() for w in model.get_weights()]
    smaller = shrink(model)
    assert smaller.get_layer("dense_1").units == 150
    assert smaller.get_layer("dense_2").kernel.shape == (150, 100)
    assert smaller.count_params() < model.count_params()
    x = _inputs((28, 28, 1))
    np.testing.assert_allclose(smaller(x), model(x), atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_conv_filters_through_pooling_and_flatten():
    keras.utils.set_random_seed(0)
    model = models.cnn5()
    layer = model.get_layer("conv_2")
    _zero_outputs(layer, np.arange(20))
    layer.bias.assign(np.random.default_rng(2).random(64).astype("float32"))
    _zero_outputs(model.get_layer("conv_1"), [3, 7])
    smaller = shrink(model)
    assert smaller.get_layer("conv_2").filters == 44
    assert smaller.get_layer("conv_1").filters == 30
    x = _inputs((28, 28, 1))
    np.testing.assert_allclose(smaller(x), model(x), atol=1e-5)


def test_batchnorm_chain_keeps_unfoldable_constants_and_removes_zero_ones():
    keras.utils.set_random_seed(0)
    model = models.vgg(11, width_multiplier=0.125)
    x = _inputs((32, 32, 3))
    conv = model.get_layer("block1_conv1")
    bn = model.get_layer("block1_bn1")
    _zero_outputs(conv, [0, 1, 2, 3])
    # Channel 0 and 1: BN makes the constant negative, so ReLU makes it exactly zero.
    beta = bn.beta.numpy()
    beta[:2] = -1.0
    beta[2:4] = 0.5  # positive constants cannot be folded through a `same` convolution
    bn.beta.assign(beta)
    smaller = shrink(model)
    assert smaller.get_layer("block1_conv1").filters == conv.filters - 2
    np.testing.assert_allclose(smaller(x), model(x), atol=1e-5)


def test_output_layer_keeps_all_units():
    model = models.mlp(8, input_shape=(4,), num_classes=3)
    _zero_outputs(model.get_layer("logits"), [0])
    assert shrink(model).output_shape == (None, 3)


def test_residual_models_are_rejected_with_the_layer_name():
    with pytest.raises(ValueError, match="stage1_block1_add|chain"):
        shrink(models.resnet(20, width_multiplier=0.25))


def test_unsupported_layer_is_named():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="d")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="norm"):
        shrink(model)
