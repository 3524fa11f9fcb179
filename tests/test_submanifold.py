import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.engine.path import Path
from keras_fip.models import bert


def _noisy(model, scale, seed):
    rng = np.random.default_rng(seed)
    return [
        v.numpy() + scale * rng.normal(size=v.shape).astype("float32")
        for v in model.trainable_variables
    ]


def test_store_load_graph_and_label_query_rank_the_trained_network_first(
    trained_small_mlp, digits, tmp_path
):
    _, _, x_test, y_test = digits
    manifold = keras_fip.Submanifold(trained_small_mlp)
    assert manifold.add(trained_small_mlp, "base") == 0
    for i, scale in enumerate((0.3, 1.0)):
        manifold.add(_noisy(trained_small_mlp, scale, i), "noisy", {"scale": scale})
    path = Path(trained_small_mlp)
    path.append(5, _noisy(trained_small_mlp, 0.1, 7))
    assert manifold.add_path(path, "walk") == [3, 4]
    assert len(manifold) == 5 and manifold.families[3:] == ["walk", "walk"]
    # Distances: exact on a known pair, symmetric, zero diagonal.
    distances = manifold.distances()
    flat = [
        np.concatenate([w.ravel() for w in _noisy(trained_small_mlp, 0.3, 0)]),
        np.concatenate([v.numpy().ravel() for v in trained_small_mlp.trainable_variables]),
    ]
    assert distances[0, 1] == pytest.approx(np.linalg.norm(flat[0] - flat[1]), rel=1e-4)
    np.testing.assert_allclose(distances, distances.T, atol=1e-3)
    np.testing.assert_allclose(np.diag(distances), 0.0, atol=1e-2)
    assert manifold.distances()[0, 3] == 0.0 or distances[0, 3] < 1e-2  # point 0 = start
    edges = manifold.graph(num_neighbors=2)
    assert all(i < j for i, j, _ in edges) and len(edges) >= 5
    # Query with labels: the trained network (or its start copy) ranks first.
    nll = manifold.query((x_test, y_test), score="nll")
    accuracy = manifold.query((x_test, y_test), score="accuracy")
    assert nll["ranking"][0] in (0, 3) and nll["ranking"][-1] == 2
    assert accuracy["scores"][0] == pytest.approx(
        keras_fip.models.evaluate_classifier(trained_small_mlp, x_test, y_test)["accuracy"]
    )
    assert nll["family_means"]["noisy"] > nll["family_means"]["base"]
    # Save/load: the same weights, families and outputs; the weights memory-mapped.
    manifold.save(str(tmp_path / "manifold"))
    loaded = keras_fip.Submanifold.load(str(tmp_path / "manifold"))
    assert loaded.families == manifold.families and loaded.info[1] == {"scale": 0.3}
    np.testing.assert_array_equal(loaded.weights_matrix(), manifold.weights_matrix())
    np.testing.assert_allclose(loaded.network(2)(x_test[:4]), manifold.network(2)(x_test[:4]))
    assert loaded.query((x_test, y_test), score="nll")["ranking"] == nll["ranking"]
    loaded.add(trained_small_mlp, "base")
    assert len(loaded) == 6


def test_pseudo_perplexity_query_on_tiny_masked_lms():
    pytest.importorskip("keras_hub")  # the `text` extra
    keras.utils.set_random_seed(0)
    model = bert.masked_lm(bert.bert_backbone(30, 1, 2, 8, 16, 8, dropout=0.0), 8, 2)
    manifold = keras_fip.Submanifold(model, dtype="float16")
    uniform = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    manifold.add(uniform, "uniform")
    manifold.add(model, "random")
    ids = np.array([[2, 5, 6, 7, 3, 0, 0, 0], [2, 9, 8, 3, 0, 0, 0, 0]], np.int32)
    result = manifold.query(ids)
    assert result["scores"][0] == pytest.approx(30.0, rel=1e-3)
    assert result["ranking"] == list(np.argsort(result["scores"]))


def test_classifiers_are_scored_by_their_backbone_under_a_masked_lm_head():
    pytest.importorskip("keras_hub")  # the `text` extra
    keras.utils.set_random_seed(0)
    mlm = bert.masked_lm(bert.bert_backbone(30, 1, 2, 8, 16, 8, dropout=0.0), 8, 2)
    reference = [v.numpy() for v in mlm.weights]
    net = bert.classifier(bert.bert_backbone(30, 1, 2, 8, 16, 8, dropout=0.0), 3, 8)
    manifold = keras_fip.Submanifold(net)
    manifold.add(net, "other")  # a random backbone
    manifold.add([v.numpy() for v in net.trainable_variables], "copy")
    for variable, weight in zip(
        bert.find_backbone(manifold.template).weights, bert.find_backbone(mlm).weights
    ):
        variable.assign(weight)
    manifold.add(manifold.template, "mlm_backbone")
    ids = np.array([[2, 5, 6, 7, 3, 0, 0, 0], [2, 9, 8, 3, 0, 0, 0, 0]], np.int32)
    result = manifold.query(ids, as_scored=bert.under_masked_lm_head(mlm))
    assert result["scores"][2] == pytest.approx(bert.pseudo_perplexity(mlm, ids), rel=1e-5)
    assert result["scores"][0] == pytest.approx(result["scores"][1], rel=1e-5)
    assert result["scores"][0] != pytest.approx(result["scores"][2], rel=1e-3)
    assert all(np.array_equal(v.numpy(), w) for v, w in zip(mlm.weights, reference))
    with pytest.raises(ValueError, match="as_scored"):
        manifold.query(ids, as_scored="mlm")
    with pytest.raises(ValueError, match="network"):
        manifold.query(
            ids,
            as_scored=bert.under_masked_lm_head(
                bert.masked_lm(bert.bert_backbone(30, 1, 2, 4, 16, 8), 8, 2)
            ),
        )
    with pytest.raises(ValueError, match="model"):
        bert.under_masked_lm_head(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


def test_submanifold_validates_its_arguments(trained_small_mlp):
    with pytest.raises(ValueError, match="template"):
        keras_fip.Submanifold("model")
    with pytest.raises(ValueError, match="dtype"):
        keras_fip.Submanifold(trained_small_mlp, dtype="int8")
    manifold = keras_fip.Submanifold(trained_small_mlp)
    with pytest.raises(ValueError, match="empty"):
        manifold.query((np.zeros((1, 8, 8, 1)), np.zeros(1)), score="nll")
    with pytest.raises(ValueError, match="score"):
        manifold.query(np.zeros((1, 8)), score="bleu")
    with pytest.raises(ValueError, match="shapes"):
        manifold.add([np.zeros(3)], "bad")
