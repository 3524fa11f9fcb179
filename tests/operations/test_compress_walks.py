"""Compress: checkpoints and resume, the recorded path, the labels' choice and the prunable
set (the walk's behaviour; `test_compress.py` holds its sparsity and function)."""

import keras
import numpy as np
import pytest

import keras_fip
import keras_fip.operations
from keras_fip import data
from keras_fip import models
from keras_fip.core import projection
from keras_fip.operations import compress as compress_lib
from keras_fip.operations.compress import Compress
from keras_fip.operations.compress import Prunable
from keras_fip.operations.compress import Saliency
from keras_fip.operations.compress import Schedule
from tests.operations.compress_common import digest as _digest
from tests.operations.compress_common import walk as _walk
from tests.operations.contract import KillAt
from tests.operations.contract import run_operation_contract


def _checkpointed(x, directory=None, callbacks=None, sparsity=0.8, **kwargs):
    return Compress(
        sparsity,
        data=x,
        saliency=Saliency("metric", examples=64),
        schedule=Schedule(update_every=10),
        walk=_walk(
            steps=40,
            beta=0.5,
            record_every=5,
            seed=0,
            checkpoint_directory=directory,
            callbacks=callbacks,
        ),
        **kwargs,
    )


def test_killed_walk_resumes_from_checkpoint_to_the_same_weights(trained, tmp_path):
    model, x, _ = trained
    x = x[:512]
    reference_op = _checkpointed(x)
    reference = reference_op(model)
    for killed_at in (17, 36):  # In the pull phase (28 steps); in the settle phase.
        directory = str(tmp_path / f"checkpoint_{killed_at}")
        with pytest.raises(KeyboardInterrupt):
            _checkpointed(x, directory, [KillAt(killed_at)])(model)
        op = _checkpointed(x, directory)
        resumed = op(model)
        for expected, actual in zip(reference.trainable_variables, resumed.trainable_variables):
            np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-5)
        assert keras_fip.masks(resumed).keys() == keras_fip.masks(reference).keys()
        for key, mask in keras_fip.masks(reference).items():
            np.testing.assert_array_equal(keras_fip.masks(resumed)[key], mask)
        assert op.path.steps.tolist() == reference_op.path.steps.tolist()
        np.testing.assert_allclose(
            op.path.weights(-1)[0], reference_op.path.weights(-1)[0], atol=1e-5
        )
        assert len(op.history["distance"]) == 40
        np.testing.assert_allclose(
            op.history["distance"], reference_op.history["distance"], rtol=1e-5, atol=1e-7
        )
    # A finished walk called again returns the same model without walking.
    again = _checkpointed(x, directory)(model)
    for expected, actual in zip(resumed.trainable_variables, again.trainable_variables):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy())


def test_killed_choice_on_validation_data_resumes_every_candidate(trained, tmp_path):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    labelled = (x[:512], y[:512])

    def compress(directory=None, callbacks=None):
        return Compress(
            0.8,
            data=labelled,
            validation_data=(x_test, y_test),
            schedule=Schedule(update_every=10),
            walk=_walk(
                steps=30,
                record_every=5,
                seed=0,
                checkpoint_directory=directory,
                callbacks=callbacks,
            ),
        )

    reference_op = compress()
    reference = reference_op(model)
    directory = str(tmp_path / "checkpoint")
    with pytest.raises(KeyboardInterrupt):
        compress(directory, [KillAt(45)])(model)  # In the second candidate's walk.
    op = compress(directory)
    resumed = op(model)
    assert op.history["labels_selection"] == reference_op.history["labels_selection"]
    for expected, actual in zip(reference.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-5)


def test_checkpoint_of_another_config_or_model_is_refused(trained, tmp_path):
    model, x, _ = trained
    x = x[:256]
    directory = str(tmp_path / "checkpoint")
    _checkpointed(x, directory, sparsity=0.5)(model)
    with pytest.raises(ValueError, match="another config"):
        _checkpointed(x, directory, sparsity=0.6)(model)
    other = keras_fip.engine.copy_model(model)
    other.trainable_variables[0].assign(other.trainable_variables[0] + 1.0)
    with pytest.raises(ValueError, match="another model"):
        _checkpointed(x, directory, sparsity=0.5)(other)


def test_walk_measures_exactly_at_the_recorded_points(trained):
    # Operations walk with `FIPTrainer(measure_every=record_every)`: the step length and
    # the distance from the start are measured at multiples of `record_every` and at each
    # phase's last step, so every point of the path carries them; other steps hold NaN.
    model, x, _ = trained
    op = Compress(0.5, data=x[:256], walk=_walk(steps=22, record_every=4, batch_size=64, seed=0))
    op(model)
    norms = np.asarray(op.history["step_norm"])
    assert norms.shape == (22,)
    pull = op.history["pull_steps"]
    assert 0 < pull < 22 and pull % 4  # a phase end off the multiples
    measured = {step for step in range(4, 23, 4)} | {pull, 22}
    assert {int(i) + 1 for i in np.flatnonzero(np.isfinite(norms))} == measured
    assert np.all(
        np.isfinite(
            np.asarray(op.history["distance_from_start"])[sorted(step - 1 for step in measured)]
        )
    )
    assert set(op.path.steps[1:]) == measured
    recorded = op.path.metrics
    for name in ("step_norm", "distance_from_start"):
        assert np.all(np.isfinite(recorded[name][1:])) and np.all(recorded[name][1:] > 0)


def test_path_streams_to_the_walks_directory(trained, tmp_path):
    model, x, y = trained
    x_test, y_test = data.load("digits", "test")
    directory = str(tmp_path / "path")
    op = Compress(
        0.5,
        data=(x[:256], y[:256]),
        validation_data=(x_test, y_test),
        walk=_walk(steps=10, record_every=5, seed=0, path_directory=directory),
    )
    op(model)
    loaded = keras_fip.Path.load(directory)
    assert loaded.steps.tolist() == op.path.steps.tolist() == [0, 5, 7, 10]


# Labels used by default, inputs only one argument away


@pytest.fixture(scope="module")
def underfit():
    """A digits MLP trained for one epoch (~80%): where the labels know more than the
    dense network's outputs."""
    keras.utils.set_random_seed(0)
    x, y = data.load("digits")
    model = models.mlp(64, input_shape=(8, 8, 1))
    models.train_classifier(model, x, y, epochs=1, batch_size=64, learning_rate=1e-3)
    return model, x, y


def test_labels_are_used_by_default_and_beat_inputs_only_where_they_matter(underfit):
    model, x, y = underfit
    x_test, y_test = data.load("digits", "test")
    before = _digest(model)
    walk = _walk(steps=60, batch_size=64, seed=0)
    labelled = Compress(0.5, data=(x, y), walk=walk)
    with_labels = labelled(model)
    inputs_only = Compress(0.5, data=(x, y), labels=False, walk=walk)
    without = inputs_only(model)
    assert _digest(model) == before
    assert labelled.history["task_weight"] > 0.0
    assert inputs_only.history["task_weight"] == 0.0
    assert not all(
        np.array_equal(a, b) for a, b in zip(with_labels.get_weights(), without.get_weights())
    )
    dense = models.evaluate_classifier(model, x_test, y_test)["accuracy"]
    accuracy = models.evaluate_classifier(with_labels, x_test, y_test)["accuracy"]
    kept = models.evaluate_classifier(without, x_test, y_test)["accuracy"]
    assert kept < dense + 0.03  # The walk on the inputs keeps the underfit function.
    assert accuracy > kept + 0.05
    assert projection.prunable_sparsity(with_labels) == pytest.approx(0.5, abs=1e-3)


def test_the_held_out_choice_is_counted_in_the_history(underfit):
    model, x, y = underfit
    op = Compress(0.5, data=(x, y), walk=_walk(steps=12, batch_size=64, seed=0))
    op(model)
    _, held_rows = keras_fip.core.tuning.validation_rows(y, compress_lib.SELECTION_FRACTION, 0)
    selection = op.history["labels_selection"]
    assert selection["validation"] == "held_out"
    assert selection["validation_examples"] == len(held_rows)
    candidates = selection["candidates"]
    assert [(c["task_weight"], c["learning_rate_factor"]) for c in candidates] == list(
        compress_lib.CANDIDATES
    )
    wins, losses, chosen = selection["wins"], selection["losses"], selection["chosen"]
    if chosen:
        # Right on (wins - losses) more held-out examples than the walk on the inputs alone.
        gain = candidates[chosen]["validation_accuracy"] - candidates[0]["validation_accuracy"]
        assert gain * len(held_rows) == pytest.approx(wins - losses)
        assert wins - losses > np.sqrt(wins + losses)
    assert op.history["task_weight"] == candidates[chosen]["task_weight"]
    assert op.history["selection_steps"] == 12 * len(compress_lib.CANDIDATES)
    assert op.history["total_steps"] == 12 + op.history["selection_steps"]
    assert op.history["steps"] == 12 and len(op.history["distance"]) == 12


def test_the_choice_on_validation_data_returns_the_chosen_walk(underfit):
    model, x, y = underfit
    x_test, y_test = data.load("digits", "test")
    op = Compress(0.5, data=(x, y), validation_data=(x_test, y_test), walk=_walk(steps=12, seed=0))
    sparse = op(model)
    selection = op.history["labels_selection"]
    assert selection["validation"] == "validation_data"
    assert selection["validation_examples"] == len(y_test)
    chosen = selection["candidates"][selection["chosen"]]
    # The returned network is the chosen walk itself, on all of `data`.
    accuracy = models.evaluate_classifier(sparse, x_test, y_test)["accuracy"]
    assert accuracy == pytest.approx(chosen["validation_accuracy"], abs=1e-9)
    assert op.history["task_weight"] == chosen["task_weight"]
    assert op.history["selection_steps"] == 12 * (len(compress_lib.CANDIDATES) - 1)
    assert op.path.steps[-1] == 12


def test_labels_are_weighted_in_only_when_a_sign_test_says_they_help():
    choose = compress_lib.choose_candidate
    zero = np.array([True] * 80 + [False] * 20)
    better = zero.copy()
    better[80:90] = True  # Right on 10 more examples, wrong on none: 10 > sqrt(10).
    assert choose([zero, better]) == (1, 10, 0)
    barely = better.copy()
    barely[:4] = False  # 10 wins, 4 losses: 6 > sqrt(14).
    assert choose([zero, barely]) == (1, 10, 4)
    noise = zero.copy()
    noise[80:83], noise[:1] = True, False  # 3 wins, 1 loss: 2 < 2.
    assert choose([zero, noise]) == (0, 3, 1)
    assert choose([zero, zero.copy()]) == (0, 0, 0)  # Ties: the inputs alone.
    assert choose([zero, ~zero])[0] == 0
    assert choose([zero, barely, better]) == (2, 10, 0)  # The most accurate of several.


def test_inputs_only_is_one_argument_away_and_equals_the_walk_without_labels(trained):
    model, x, y = trained
    x, y = x[:256], y[:256]

    def walk(data, **kwargs):
        keras.utils.set_random_seed(0)
        op = Compress(0.5, data=data, walk=_walk(steps=6, seed=0), **kwargs)
        return op, [w.numpy() for w in op(model).weights]

    unlabelled, without_labels = walk(x)
    zero, labels_ignored = walk((x, y), labels=False)
    for a, b in zip(without_labels, labels_ignored):
        np.testing.assert_array_equal(a, b)
    for op in (unlabelled, zero):
        assert op.history["task_weight"] == 0.0 and op.history["selection_steps"] == 0
        assert "labels_selection" not in op.history


def test_a_given_weight_changes_the_walk_only_with_labels(trained):
    model, x, y = trained
    x, y = x[:128], y[:128]

    def weights(data, labels):
        keras.utils.set_random_seed(0)  # The walk's random ops depend on the global state.
        op = Compress(0.5, data=data, labels=labels, walk=_walk(steps=6, seed=0))
        return [w.numpy() for w in op(model).weights], op.history

    labelled, history = weights((x, y), 1.0)
    assert history["task_weight"] == 1.0 and "labels_selection" not in history
    assert max(history["secondary_loss"]) > 0.0
    unlabelled, _ = weights((x, y), False)
    assert not all(np.array_equal(u, v) for u, v in zip(labelled, unlabelled))
    inputs_one, _ = weights(x, 1.0)
    inputs_zero, _ = weights(x, False)
    assert all(np.array_equal(u, v) for u, v in zip(inputs_one, inputs_zero))


def test_few_labels_take_the_inputs_alone_without_a_choice(trained):
    model, x, y = trained
    count = int(compress_lib.SELECTION_MIN_EXAMPLES / compress_lib.SELECTION_FRACTION) - 10
    op = Compress(0.5, data=(x[:count], y[:count]), walk=_walk(steps=6, seed=0))
    op(model)
    assert op.history["task_weight"] == 0.0
    assert op.history["selection_steps"] == 0
    assert op.history["labels_selection"]["validation_examples"] < 100


def test_labels_round_trip_through_the_config():
    for labels, expected in (("auto", "auto"), (False, 0.0), (0.0, 0.0), (3.0, 3.0)):
        op = Compress(0.5, labels=labels)
        assert op.labels == expected
        assert Compress.from_config(op.get_config()).labels == expected
    assert Compress(0.5).labels == "auto"


def test_compress_with_labels_meets_the_operation_contract():
    from tests.operations.contract import contract_data

    labelled = contract_data(700)  # 140 held out: the weight of the labels is chosen.
    results = run_operation_contract(
        lambda model, x, y: keras_fip.Compress(0.5, data=labelled, walk=_walk(steps=8, seed=0)),
        models=("sequential",),
        check_chain=False,  # Chaining is checked without labels (test_compress.py).
    )
    for result in results.values():
        assert projection.prunable_sparsity(result) == pytest.approx(0.5, abs=1e-3)


# What is pruned: the set tfmot prunes, and the zero fraction of all parameters


@keras.saving.register_keras_serializable(package="keras_fip_tests")
class _TokenEmbedding(keras.layers.Layer):
    """A custom layer holding an Embedding, as the keras.io transformer example writes it."""

    def __init__(self, vocabulary, width, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.width = vocabulary, width
        self.table = keras.layers.Embedding(vocabulary, width, name="table")

    def call(self, ids):
        return self.table(ids)

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary, "width": self.width}


def _attention_classifier():
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    tokens = _TokenEmbedding(40, 8, name="tokens")(ids)
    attended = keras.layers.MultiHeadAttention(2, 4, name="attention")(tokens, tokens)
    hidden = keras.layers.LayerNormalization(name="norm")(tokens + attended)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(pooled)
    return keras.Model(ids, outputs)


def test_default_prunable_set_is_tfmots_embeddings_and_attention_included():
    model = _attention_classifier()
    paths = [v.path for v in projection.prunable_variables(model)]
    assert paths == [
        "tokens/table/embeddings",
        "attention/query/kernel",
        "attention/key/kernel",
        "attention/value/kernel",
        "attention/attention_output/kernel",
        "head/kernel",
    ]
    without = projection.prunable_variables(model, include_embeddings=False)
    assert [v.path for v in without] == paths[1:]


def test_compress_prunes_embeddings_and_attention_kernels_exactly():
    model = _attention_classifier()
    ids = np.random.default_rng(0).integers(0, 40, (128, 6)).astype("int32")
    before = _digest(model)
    op = Compress(0.6, data=ids, walk=_walk(steps=8, batch_size=32, seed=0))
    sparse = op(model)
    assert _digest(model) == before
    variables = projection.prunable_variables(sparse)
    total = sum(int(np.prod(v.shape)) for v in variables)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables)
    assert zeros == round(0.6 * total)
    assert set(keras_fip.masks(sparse)) == {v.path for v in variables}
    table = sparse.get_layer("tokens").table.embeddings.numpy()
    assert 0 < np.mean(table == 0) < 1
    assert op.history["prunable_sparsity"] == zeros / total
    without = Compress(0.6, data=ids, prunable=Prunable(embeddings=False), walk=_walk(steps=4))
    dense_table = without(model)
    assert not np.any(dense_table.get_layer("tokens").table.embeddings.numpy() == 0)
    assert "tokens/table/embeddings" not in keras_fip.masks(dense_table)


def test_history_reports_the_zero_fraction_of_all_parameters_exactly():
    model = _attention_classifier()
    ids = np.random.default_rng(0).integers(0, 40, (128, 6)).astype("int32")
    op = Compress(0.6, data=ids, walk=_walk(steps=8, batch_size=32, seed=0))
    sparse = op(model)
    weights = [np.asarray(w) for w in sparse.get_weights()]
    parameters = sum(w.size for w in weights)
    zeros = sum(int(np.sum(w == 0)) for w in weights)
    assert parameters == sparse.count_params() == op.history["parameters"]
    assert op.history["parameter_sparsity"] == zeros / parameters
    assert op.history["parameter_sparsity"] < op.history["prunable_sparsity"]
    summary = projection.sparsity_summary(sparse)
    assert summary == op.sparsity_summary
    assert (summary.zeros, summary.parameters) == (zeros, parameters)
    assert summary.prunable_share == op.history["prunable_parameters"] / parameters
    assert f"sparsity={zeros / parameters:.4f} of all {parameters:,} parameters" in repr(summary)


def test_a_small_prunable_share_is_warned_about():
    model = _attention_classifier()
    ids = np.random.default_rng(0).integers(0, 40, (64, 6)).astype("int32")
    with pytest.warns(UserWarning, match=r"prunable weights of model .* are \d+\.\d% of"):
        op = Compress(
            0.5, data=ids, prunable=Prunable(embeddings=False), walk=_walk(steps=4, seed=0)
        )
        op(model)
    share = op.history["prunable_parameters"] / op.history["parameters"]
    assert share < projection.SMALL_PRUNABLE_SHARE
    assert op.history["parameter_sparsity"] < 0.3  # Half of the prunable weights only.
