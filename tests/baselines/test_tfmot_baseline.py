import numpy as np
import pytest

from keras_fip import baselines
from keras_fip import data
from keras_fip import models
from keras_fip.core import projection


def test_keras_fip_never_imports_tfmot():
    import sys

    import keras_fip  # noqa: F401

    assert "tensorflow_model_optimization" not in sys.modules
    assert "tf_keras" not in sys.modules


def test_unsupported_layers_are_a_clear_error():
    model = models.resnet(20, width_multiplier=0.25)
    x = np.zeros((2, 32, 32, 3), "float32")
    y = np.zeros(2, "int32")
    with pytest.raises(ValueError, match="BatchNormalization"):
        baselines.tfmot_gradual_pruning(model, 0.5, x, y, x, y)


@pytest.mark.skipif(not baselines.tfmot_available(), reason="baselines extra not installed")
def test_real_tfmot_prunes_every_layer_to_the_target(tmp_path):
    x, y = data.load("digits")
    model = models.mlp(32, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=3, batch_size=64, learning_rate=1e-2)
    pruned, result = baselines.tfmot_gradual_pruning(
        model, 0.75, x, y, x, y, epochs=2, batch_size=64, learning_rate=1e-3, frequency=5
    )
    for variable in projection.prunable_variables(pruned):
        assert np.mean(variable.numpy() == 0) == pytest.approx(0.75, abs=0.01)
    accuracy = models.evaluate_classifier(pruned, x, y)["accuracy"]
    assert accuracy == pytest.approx(result["test/accuracy"], abs=1e-6)
