import keras
import numpy as np
import pytest

from keras_fip.core import projection


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
    with_biases = projection.prunable_variables(
        model, include_biases=True, include_normalization=True
    )
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
    # The plain ranking (no layer-collapse floor).
    masks = projection.magnitude_masks(model, 0.8, layer_floor=0.0)
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
    [
        ({"sparsity": 1.0}, "`sparsity`"),
        ({"sparsity": -0.1}, "`sparsity`"),
        ({"sparsity": 0.5, "structure": "blocks"}, "`structure`"),
        ({"sparsity": 0.5, "scope": "layer"}, "`scope`"),
    ],
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
    importance = [
        np.zeros(v.shape) if v.path == "conv/kernel" else np.ones(v.shape) for v in variables
    ]
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


def test_erk_densities_spend_the_budget_and_favour_small_layers():
    shapes = [(3, 3, 1, 24), (3, 3, 24, 24), (24, 64), (64, 10)]
    sizes = np.array([np.prod(s) for s in shapes])
    for density in (0.05, 0.2, 0.5):
        densities = projection.erk_densities(shapes, density)
        assert np.all((densities >= 0) & (densities <= 1))
        np.testing.assert_allclose(np.sum(densities * sizes), density * sizes.sum(), rtol=1e-9)
        # The 216-weight stem is denser than the 5,184-weight block.
        assert densities[0] > densities[1]
    np.testing.assert_allclose(projection.erk_densities(shapes, 1.0), 1.0)


def _collapsing_model():
    """A model whose first kernel is small by scale: a plain global ranking empties it."""
    model = _model()
    conv = model.get_layer("conv").kernel
    conv.assign(conv.numpy() * 1e-3)
    return model


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_global_ranking_keeps_every_layer_above_its_floor(sparsity):
    model = _collapsing_model()
    variables = projection.prunable_variables(model)
    plain = projection.magnitude_masks(model, sparsity, layer_floor=0.0)
    assert plain["conv/kernel"].sum() == 0  # The collapse the floor prevents.
    masks = projection.magnitude_masks(model, sparsity)
    total = sum(int(np.prod(v.shape)) for v in variables)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    densities = projection.erk_densities([v.shape for v in variables], 1 - sparsity)
    for variable, density in zip(variables, densities):
        kept = int(masks[variable.path].sum())
        floor = np.ceil(
            projection.resolve_layer_floor(model, "auto") * density * np.prod(variable.shape)
        )
        assert kept >= floor - 1, (variable.path, kept, floor)
        assert kept > 0
    # Above their floors, the other layers still follow the global magnitude ranking: the
    # kept weights of the dense layers are the largest ones.
    hidden = model.get_layer("hidden").kernel.numpy()
    mask = masks["hidden/kernel"]
    assert np.abs(hidden[mask]).min() >= np.abs(hidden[~mask]).max()


def test_layer_floor_one_is_the_erk_allocation_and_floors_respect_existing_masks():
    model = _collapsing_model()
    variables = projection.prunable_variables(model)
    masks = projection.magnitude_masks(model, 0.8, layer_floor=1.0)
    densities = projection.erk_densities([v.shape for v in variables], 0.2)
    for variable, density in zip(variables, densities):
        size = np.prod(variable.shape)
        # Floors round down; the few weights left over are ranked globally.
        assert abs(int(masks[variable.path].sum()) - density * size) <= len(variables)
    # Weights masked before are never lifted back by a floor.
    existing = {"conv/kernel": np.zeros((3, 3, 1, 8), bool)}
    masks = projection.magnitude_masks(model, 0.5, existing_masks=existing)
    assert masks["conv/kernel"].sum() == 0


def test_auto_layer_floor_is_erk_for_batch_norm_models():
    assert projection.resolve_layer_floor(_model(), "auto") == 1.0  # has BatchNorm
    mlp = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    assert projection.resolve_layer_floor(mlp, "auto") == 0.5
    assert projection.resolve_layer_floor(mlp, 0.25) == 0.25


@pytest.mark.parametrize("layer_floor", [-0.1, 1.5, True, "erk"])
def test_bad_layer_floor_is_a_clear_error(layer_floor):
    with pytest.raises(ValueError, match="layer_floor"):
        projection.magnitude_masks(_model(), 0.5, layer_floor=layer_floor)
