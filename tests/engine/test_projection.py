import keras
import numpy as np
import pytest

from keras_fip.engine import projection


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))


def test_prunable_variables_default_to_kernels():
    model = _model()
    names = [v.path for v in projection.prunable_variables(model)]
    assert names == ["conv/kernel", "hidden/kernel", "logits/kernel"]
    with_biases = projection.prunable_variables(model, include_biases=True,
                                                include_normalization=True)
    assert "hidden/bias" in [v.path for v in with_biases]
    assert "bn/gamma" in [v.path for v in with_biases]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.991])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_unstructured_sparsity_is_exact(sparsity, scope):
    model = _model()
    masks = projection.magnitude_masks(model, sparsity, scope=scope)
    sizes = {v.path: int(np.prod(v.shape)) for v in projection.prunable_variables(model)}
    zeros = {path: int((~mask).sum()) for path, mask in masks.items()}
    if scope == "global":
        assert sum(zeros.values()) == round(sparsity * sum(sizes.values()))
    else:
        for path, size in sizes.items():
            assert zeros[path] == round(sparsity * size)


def test_global_unstructured_keeps_the_largest_magnitudes():
    model = _model()
    masks = projection.magnitude_masks(model, 0.8)
    variables = projection.prunable_variables(model)
    kept = np.concatenate([np.abs(v.numpy())[masks[v.path]] for v in variables])
    pruned = np.concatenate([np.abs(v.numpy())[~masks[v.path]] for v in variables])
    assert kept.min() >= pruned.max()


def test_nodes_prune_whole_units_and_filters_whole_filters():
    model = _model()
    masks = projection.magnitude_masks(model, 0.5, structure="nodes", scope="per_layer")
    hidden = masks["hidden/kernel"]
    columns = hidden.all(axis=0) | (~hidden).all(axis=0)
    assert columns.all() and (~hidden).all(axis=0).sum() == 8
    conv_only = [v for v in projection.prunable_variables(model) if v.path == "conv/kernel"]
    filters = projection.magnitude_masks(model, 0.25, structure="filters", variables=conv_only)
    conv = filters["conv/kernel"].reshape(-1, 8)
    assert ((conv.all(axis=0)) | (~conv).all(axis=0)).all()
    assert (~conv).all(axis=0).sum() == 2


def test_filters_on_a_dense_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="structure='filters'"):
        projection.magnitude_masks(_model(), 0.5, structure="filters")


def test_two_of_four_keeps_two_largest_in_each_group():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="d")(inputs))
    masks = projection.magnitude_masks(model, 0.5, structure="2:4")
    mask = masks["d/kernel"]
    kernel = np.abs(model.layers[-1].kernel.numpy())
    groups_mask = mask.T.reshape(3, 2, 4)
    groups_values = kernel.T.reshape(3, 2, 4)
    assert (groups_mask.sum(-1) == 2).all()
    for m, v in zip(groups_mask.reshape(-1, 4), groups_values.reshape(-1, 4)):
        assert v[m].min() >= v[~m].max()
    with pytest.raises(ValueError, match="sparsity"):
        projection.magnitude_masks(model, 0.9, structure="2:4")


def test_existing_masks_stay_masked():
    model = _model()
    first = projection.magnitude_masks(model, 0.5)
    # Make some previously pruned weights large: they must stay pruned.
    kernel = model.get_layer("hidden").kernel
    kernel.assign(np.where(first["hidden/kernel"], kernel.numpy(), 100.0))
    second = projection.magnitude_masks(model, 0.6, existing_masks=first)
    for path in first:
        assert not (second[path] & ~first[path]).any()


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"sparsity": 1.0}, "`sparsity`"), ({"sparsity": -0.1}, "`sparsity`"),
     ({"sparsity": 0.5, "structure": "blocks"}, "`structure`"),
     ({"sparsity": 0.5, "scope": "layer"}, "`scope`")],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        projection.magnitude_masks(_model(), **kwargs)


def test_nothing_prunable_is_a_clear_error():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.LayerNormalization()(inputs))
    with pytest.raises(ValueError, match="no prunable variables"):
        projection.magnitude_masks(model, 0.5)


def test_importance_ranks_in_the_diagonal_metric():
    model = _model()
    variables = projection.prunable_variables(model)
    # A uniform metric is the Euclidean projection.
    uniform = [np.full(v.shape, 3.0, "float32") for v in variables]
    plain = projection.magnitude_masks(model, 0.7)
    scaled = projection.magnitude_masks(model, 0.7, importance=uniform)
    for path in plain:
        np.testing.assert_array_equal(plain[path], scaled[path])
    # A metric that ignores the conv kernel prunes it first; the count stays exact.
    importance = [np.zeros(v.shape) if v.path == "conv/kernel" else np.ones(v.shape)
                  for v in variables]
    conv_size = int(np.prod(variables[0].shape))
    total = sum(int(np.prod(v.shape)) for v in variables)
    masks = projection.magnitude_masks(model, conv_size / total, importance=importance)
    assert not masks["conv/kernel"].any()
    assert masks["hidden/kernel"].all() and masks["logits/kernel"].all()
    # Scores are √d·|w|: a large metric keeps a small weight.
    kernel = variables[-1].numpy()
    smallest = np.unravel_index(np.argmin(np.abs(kernel)), kernel.shape)
    boosted = [np.ones(v.shape) for v in variables]
    boosted[-1][smallest] = 1e12
    masks = projection.magnitude_masks(model, 0.99, importance=boosted)
    assert masks["logits/kernel"][smallest]


def test_importance_of_the_wrong_shape_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="`importance`"):
        projection.magnitude_masks(model, 0.5, importance=[np.ones((2, 2))])
