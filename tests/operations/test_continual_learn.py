import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import metrics
from keras_fip.core import masks as masks_lib
from keras_fip.operations import carried_data
from keras_fip.operations import grow_output_layer
from keras_fip.operations.continual_learn import ContinualLearn
from keras_fip.operations.continual_learn import pad_reference
from tests.operations.contract import KillAt


def _walk(**fields):
    return keras_fip.Walk(verbose=0, **fields)


def _split(x, y):
    old, new = y < 5, y >= 5
    return (x[old], y[old]), (x[new], (y[new] - 5).astype("int32"))


@pytest.fixture(scope="module")
def digits():
    x, y = keras_fip.data.load("digits")
    x_test, y_test = keras_fip.data.load("digits", "test")
    return _split(x, y), _split(x_test, y_test)


@pytest.fixture(scope="module")
def old_model(digits):
    (old, _), _ = digits
    keras.utils.set_random_seed(0)
    model = keras_fip.models.mlp(64, input_shape=(8, 8, 1), num_classes=5)
    keras_fip.models.train_classifier(model, *old, epochs=20, batch_size=32)
    return model


def _residual_batchnorm_model(num_classes=5):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(16, 3, padding="same")(x)
    y = keras.layers.BatchNormalization(momentum=0.9)(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


def _test_tasks(digits):
    _, ((xo, yo), (xn, yn)) = digits
    return [(xo, yo), (xn, yn + 5)]


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_grow_output_layer_keeps_old_outputs_exactly(kind):
    keras.utils.set_random_seed(1)
    if kind == "sequential":
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
        )
    else:
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="relu")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    grown = grow_output_layer(model, 4, seed=0)
    assert grown.output_shape == (None, 7)
    assert isinstance(grown, keras.Sequential) == (kind == "sequential")
    np.testing.assert_array_equal(np.asarray(grown(x))[:, :3], np.asarray(model(x)))
    new_kernel = grown.layers[-1].kernel.numpy()[:, 3:]
    assert np.all(new_kernel != 0.0)


def test_grow_output_layer_extends_a_mask_of_the_output_kernel():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    mask = np.ones((4, 3), bool)
    mask[0] = False
    masks_lib.apply_masks(model, {model.layers[-1].kernel.path: mask})
    grown = grow_output_layer(model, 2)
    (grown_mask,) = keras_fip.masks(grown).values()
    assert grown_mask.shape == (4, 5)
    np.testing.assert_array_equal(grown_mask[:, :3], mask)
    assert grown_mask[:, 3:].all()


def test_continual_learn_learns_the_new_task_and_keeps_the_old(digits, old_model):
    (old, new), _ = digits
    tasks = _test_tasks(digits)
    op = ContinualLearn(new, memory=old[0][:200], eval_tasks=tasks, walk=_walk(epochs=10, seed=0))
    model = op(old_model)
    finetuned = keras_fip.baselines.FineTune(new, walk=_walk(epochs=10, seed=0))(old_model)
    assert model.output_shape == (None, 10)
    old_accuracy = metrics.task_accuracy(model, *tasks[0])
    assert old_accuracy > 0.85
    assert metrics.task_accuracy(model, *tasks[1]) > 0.75
    assert metrics.task_accuracy(finetuned, *tasks[0]) < 0.05
    # Accuracy along the path is recorded; its last point is the returned model.
    history = op.history
    assert history["eval_step"][0] == 0 and history["eval_step"][-1] == history["steps"]
    assert len(history["task_0/accuracy"]) == len(history["eval_step"])
    assert history["task_0/accuracy"][-1] == pytest.approx(old_accuracy)
    assert history["task_1/accuracy"][0] < 0.3 < history["task_1/accuracy"][-1]
    assert history["beta"] == 1.0
    # The walk's defaults: 32 new-task examples a step, Adam's rate.
    assert history["steps"] == 10 * int(np.ceil(len(new[1]) / 32))
    assert history["learning_rate"] == 1e-3
    assert 0.0 < history["eval_seconds"] < 60.0


def _softmax_model(digits):
    (old, _), _ = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(5, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(*old, epochs=20, batch_size=32, verbose=0)
    return model


def test_new_units_stay_quiet_on_old_inputs_of_a_softmax_model(digits):
    (old, new), (old_test, new_test) = digits
    model = _softmax_model(digits)
    start = metrics.task_accuracy(model, *old_test)
    assert start > 0.95
    grown = ContinualLearn(new, memory=old[0][:100], walk=_walk(epochs=10, seed=0))(model)
    old_outputs = np.asarray(grown.predict(old_test[0], verbose=0))
    new_outputs = np.asarray(grown.predict(new_test[0], verbose=0))
    # By argmax over all ten outputs, old inputs stay on old classes (a new unit wins on
    # at most a few of the old task's ambiguous digits).
    assert np.mean(np.argmax(old_outputs, -1) < 5) >= start - 0.05
    assert np.mean(np.argmax(old_outputs[:, :5], -1) == old_test[1]) >= start - 0.02
    # The new task is learned, over all outputs, far beyond its majority class.
    majority = np.max(np.bincount(new_test[1])) / len(new_test[1])
    assert np.mean(np.argmax(new_outputs, -1) == new_test[1] + 5) > majority + 0.4


def test_pull_is_the_cross_entropy_plus_the_old_classes_conditional_kl():
    from keras_fip.operations.continual_learn import _Pull
    from keras_fip.operations.continual_learn import old_classes

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32")
    labels = np.array([3, 4, 3, 4, 4, 3], "int32")
    kept = old_classes(3, labels + 0)
    np.testing.assert_array_equal(kept, [0, 1, 2])
    old_logits = rng.normal(size=(6, 3)).astype("float32")
    network = keras.Sequential([keras.Input((5,)), keras.layers.Identity()])
    value = float(_Pull(kept, False)(network, (logits, labels, old_logits)))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    cross_entropy = -np.mean(log_softmax(logits)[np.arange(6), labels])
    q = np.exp(log_softmax(old_logits))
    kl = np.mean(np.sum(q * (np.log(q) - log_softmax(logits[:, :3])), -1))
    assert value == pytest.approx(cross_entropy + kl, rel=1e-5)
    # A shared head keeps the outputs that are not the task's classes; one kept class has
    # a constant conditional (no term).
    np.testing.assert_array_equal(old_classes(5, np.array([1, 3])), [0, 2, 4])
    only = _Pull(old_classes(2, np.array([1])), False)
    assert float(only(network, (logits[:, :2], np.ones(6, "int32"), old_logits[:, :1]))) == (
        pytest.approx(-np.mean(log_softmax(logits[:, :2])[:, 1]), rel=1e-5)
    )


def test_continual_learn_never_changes_its_input(digits, old_model):
    (old, new), _ = digits
    before = [v.numpy().copy() for v in old_model.weights]
    ContinualLearn(new, memory=old[0][:50], walk=_walk(epochs=1, batch_size=64))(old_model)
    for value, variable in zip(before, old_model.weights):
        np.testing.assert_array_equal(value, variable.numpy())
    assert old_model.output_shape == (None, 5)


def test_memory_is_carried_across_chained_calls(digits, old_model):
    (old, new), _ = digits
    x, y = new
    first = (x[y < 3], y[y < 3])
    second = (x[y >= 3], y[y >= 3] - 3)
    model = ContinualLearn(
        first, memory=old[0][:100], memory_per_task=30, walk=_walk(epochs=1, seed=0)
    )(old_model)
    assert carried_data(model).shape == (130, 8, 8, 1)
    chained = keras_fip.chain(ContinualLearn(second, memory_per_task=20, walk=_walk(epochs=1)))
    result = chained(model)
    assert result.output_shape == (None, 10)
    memory = carried_data(result)
    assert memory.shape == (150, 8, 8, 1)
    np.testing.assert_array_equal(memory[:130], carried_data(model))


def test_masks_are_kept_exactly(digits, old_model):
    (old, new), _ = digits
    sparse = keras_fip.Compress(0.5, data=old[0], walk=_walk(epochs=1, seed=0))(old_model)
    before = keras_fip.masks(sparse)
    model = ContinualLearn(new, memory=old[0][:100], walk=_walk(epochs=2, seed=0))(sparse)
    after = keras_fip.masks(model)
    hidden_kernel = model.layers[-2].kernel if len(model.layers) > 2 else None
    for variable in model.trainable_variables:
        mask = after.get(variable.path)
        if mask is not None:
            assert np.all(variable.numpy()[~mask] == 0.0)
    zeros_before = sum(int((~m).sum()) for m in before.values())
    zeros_after = sum(int((~m).sum()) for m in after.values())
    assert zeros_after == zeros_before > 0
    del hidden_kernel


def test_shared_head_uses_preallocated_outputs(digits):
    (old, new), _ = digits
    keras.utils.set_random_seed(0)
    model = keras_fip.models.mlp(32, input_shape=(8, 8, 1), num_classes=10)
    keras_fip.models.train_classifier(model, *old, epochs=10, batch_size=32)
    shared = (new[0], new[1] + 5)
    result = ContinualLearn(
        shared, memory=old[0][:100], head="shared", walk=_walk(epochs=10, seed=0)
    )(model)
    assert result.output_shape == (None, 10)
    assert metrics.task_accuracy(result, *_test_tasks(digits)[1]) > 0.5


def test_batchnorm_residual_model_walks_on_batch_statistics(digits):
    (old, new), _ = digits
    keras.utils.set_random_seed(0)
    model = _residual_batchnorm_model()
    keras_fip.models.train_classifier(model, *old, epochs=15, batch_size=32)
    keras_fip.engine.recalibrate_batch_normalization(model, old[0])
    tasks = _test_tasks(digits)
    base = metrics.task_accuracy(model, *tasks[0])
    assert base > 0.8
    result = ContinualLearn(new, memory=old[0][:300], walk=_walk(epochs=8, seed=0))(model)
    finetuned = keras_fip.baselines.FineTune(new, walk=_walk(epochs=8, seed=0))(model)
    assert metrics.task_accuracy(result, *tasks[0]) > base - 0.15
    assert (
        metrics.task_accuracy(result, *tasks[0]) > metrics.task_accuracy(finetuned, *tasks[0]) + 0.3
    )
    assert metrics.task_accuracy(result, *tasks[1]) > 0.3


@pytest.mark.parametrize("rule", [keras_fip.rules.Normalized, keras_fip.rules.Metric])
def test_other_step_rules_learn_the_new_task(digits, old_model, rule):
    (old, new), _ = digits
    # `record_every=1`: every step measured (operations measure at the recorded points).
    walk = _walk(epochs=3, seed=0, rule=rule(epsilon=0.05), record_every=1)
    op = ContinualLearn(new, memory=old[0][:100], walk=walk)
    model = op(old_model)
    assert metrics.task_accuracy(model, *_test_tasks(digits)[1]) > 0.3
    assert np.allclose(op.history["step_norm"], 0.05, rtol=1e-3)


def test_auto_beta_converts_distances_to_kl_units(digits, old_model):
    (old, new), _ = digits
    bhattacharyya = ContinualLearn(
        new, memory=old[0][:64], walk=_walk(distance="bhattacharyya", epochs=1)
    )
    bhattacharyya(old_model)
    assert bhattacharyya.history["beta"] == 0.25
    l2 = ContinualLearn(new, memory=old[0][:64], walk=_walk(distance="l2", epochs=1, seed=0))
    l2(old_model)
    assert l2.history["beta"] > 1.0  # Logit changes cost more than softmax changes.
    expected = keras_fip.engine.beta.auto_beta(
        1.0, old_model, old[0][:64].astype("float32"), "l2", objective="outputs", seed=0
    )
    assert l2.history["beta"] == pytest.approx(expected, rel=1e-5)
    given = ContinualLearn(new, memory=old[0][:64], walk=_walk(beta=0.3, epochs=1))
    given(old_model)
    assert given.history["beta"] == 0.3


def test_the_penalty_rule_auto_rate_is_the_rules_own(digits, old_model):
    (old, new), _ = digits
    auto = keras_fip.rules.Penalty("auto")
    op = ContinualLearn(new, memory=old[0][:64], walk=_walk(rule=auto, steps=2, seed=0))
    op(old_model)
    # Taken on the grown model: the old weights and the new units as Keras initialises them.
    grown = keras_fip.operations.grow_output_layer(old_model, 5, seed=0)
    expected = keras_fip.rules.auto_learning_rate(grown.trainable_variables)
    assert op.history["learning_rate"] == pytest.approx(expected, rel=1e-6)
    assert op.history["learning_rate"] != 1e-3


def test_pad_reference_marks_new_classes_absent():
    reference = np.array([[2.0, -1.0, 0.5]], "float32")
    padded = pad_reference(reference, 5, "kl")
    np.testing.assert_array_equal(padded[:, :3], reference)
    np.testing.assert_allclose(padded[:, 3:], -11.0)
    np.testing.assert_allclose(pad_reference(reference, 5, "l2")[:, 3:], -1.0)


def test_config_round_trip():
    op = ContinualLearn(
        (np.zeros((4, 8, 8, 1)), np.array([0, 1, 0, 1])),
        head="shared",
        memory_batch_size=16,
        walk=keras_fip.Walk(beta=0.5, epochs=3, seed=2),
    )
    config = op.get_config()
    restored = ContinualLearn.from_config(config)
    assert restored.get_config() == config
    assert config["new_task"] is None and config["walk"]["beta"] == 0.5
    assert restored.walk == op.walk and restored.memory_batch_size == 16
    restored_config = keras.saving.serialize_keras_object(op)
    assert restored_config["class_name"] == "ContinualLearn"


def _model_ending_in_softmax():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
            keras.layers.Softmax(),
        ]
    )


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda x, y: dict(new_task=(np.full_like(x, np.nan), y)), "NaN"),
        (lambda x, y: dict(new_task=(x, y), memory=np.full_like(x, np.inf)), "Inf|finite"),
        (lambda x, y: dict(new_task=(x, y + 1)), "0..k-1"),
        (lambda x, y: dict(new_task=(x, y), head="grow"), "head"),
        (lambda x, y: dict(new_task=(x, y), memory=np.zeros((0, 8, 8, 1))), "memory"),
        (lambda x, y: dict(new_task=(x,)), "labels"),
        (lambda x, y: dict(new_task=(x, y), walk=_walk(distance=lambda a, b: 0.0)), "distance"),
        (lambda x, y: dict(new_task=(x, y), walk=_walk(reference="local")), "reference"),
        (lambda x, y: dict(new_task=(x, y), memory_batch_size=0), "memory_batch_size"),
        (lambda x, y: dict(new_task=(x, y), eval_every=0), "eval_every"),
    ],
)
def test_bad_arguments_raise_before_any_work(digits, build, message):
    (_, (x, y)), _ = digits
    with pytest.raises(ValueError, match=message):
        ContinualLearn(**build(x, y))


def test_bad_inputs_against_the_model_raise_before_any_work(digits, old_model):
    (old, (x, y)), _ = digits
    before = [v.numpy().copy() for v in old_model.weights]
    with pytest.raises(ValueError, match="memory"):
        ContinualLearn((x, y))(old_model)  # Nothing carried, nothing given.
    with pytest.raises(ValueError, match="shape"):
        ContinualLearn((x[:, :4], y), memory=old[0])(old_model)
    with pytest.raises(ValueError, match="shape"):
        ContinualLearn((x, y), memory=old[0][:, :4, :4])(old_model)
    with pytest.raises(ValueError, match="outputs of the model"):
        ContinualLearn((x, y + 5), memory=old[0], head="shared")(old_model)
    with pytest.raises(ValueError, match="Dense"):
        ContinualLearn((x, y), memory=old[0])(_model_ending_in_softmax())
    with pytest.raises(ValueError, match="eval_tasks"):
        ContinualLearn((x, y), memory=old[0], eval_tasks=[(x, y + 20)])(old_model)
    for value, variable in zip(before, old_model.weights):
        np.testing.assert_array_equal(value, variable.numpy())


def test_continual_learn_meets_the_operation_contract():
    from tests.operations.contract import run_operation_contract

    results = run_operation_contract(
        lambda model, x, y: ContinualLearn(
            (x[200:], y[200:] % 3), memory=x[:200], walk=_walk(epochs=1, batch_size=64, seed=0)
        )
    )
    for result in results.values():
        assert result.output_shape == (None, 13)


def test_killed_walk_resumes_from_checkpoint_to_the_same_weights(digits, old_model, tmp_path):
    (old, new), (old_test, new_test) = digits
    tasks = [old_test, (new_test[0], new_test[1] + 5)]

    def learn(directory=None, callbacks=None):
        return ContinualLearn(
            new,
            memory=old[0][:200],
            eval_tasks=tasks,
            eval_every=3,
            walk=_walk(
                epochs=2,
                batch_size=64,
                record_every=4,
                seed=0,
                checkpoint_directory=directory,
                callbacks=callbacks,
            ),
        )

    reference_op = learn()
    reference = reference_op(old_model)
    directory = str(tmp_path / "checkpoint")
    with pytest.raises(KeyboardInterrupt):
        learn(directory, [KillAt(10)])(old_model)
    op = learn(directory)
    resumed = op(old_model)
    for expected, actual in zip(reference.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=1e-5)
    assert op.history["eval_step"] == reference_op.history["eval_step"]
    np.testing.assert_allclose(
        op.history["task_1/accuracy"], reference_op.history["task_1/accuracy"], atol=1e-6
    )
    assert len(op.history["distance"]) == reference_op.history["steps"]
    assert op.path.steps.tolist() == reference_op.path.steps.tolist()


def test_one_operation_called_twice_gives_independent_results(digits, old_model):
    (old, new), _ = digits
    op = ContinualLearn(new, memory=old[0][:100], walk=_walk(epochs=1, seed=0))
    first = op(old_model)
    first_history = op.history
    other = keras.models.clone_model(old_model)
    other.set_weights([w * 0.5 for w in old_model.get_weights()])
    op(other)
    again = op(old_model)
    assert op.history is not first_history
    for a, b in zip(first.trainable_variables, again.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(carried_data(first), carried_data(again))
    assert op.history["beta"] == first_history["beta"] == 1.0
