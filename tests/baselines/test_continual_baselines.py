import math
import warnings

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import baselines
from keras_fip import metrics
from keras_fip.baselines.ewc import ewc_state


@pytest.fixture(scope="module")
def setting():
    x, y = keras_fip.data.load("digits")
    x_test, y_test = keras_fip.data.load("digits", "test")
    old, new = y < 5, y >= 5
    keras.utils.set_random_seed(0)
    model = keras_fip.models.mlp(64, input_shape=(8, 8, 1), num_classes=5)
    keras_fip.models.train_classifier(model, x[old], y[old], epochs=20, batch_size=32)
    return {
        "model": model,
        "old": (x[old], y[old]),
        "new": (x[new], (y[new] - 5).astype("int32")),
        "memory": (x[old][:200], y[old][:200]),
        "tests": [
            (x_test[y_test < 5], y_test[y_test < 5]),
            (x_test[y_test >= 5], y_test[y_test >= 5]),
        ],
    }


def _accuracies(model, setting):
    return [metrics.task_accuracy(model, *task) for task in setting["tests"]]


BUDGET = dict(walk=keras_fip.Walk(epochs=8, seed=0))


@pytest.fixture(scope="module")
def finetuned(setting):
    return _accuracies(baselines.FineTune(setting["new"], **BUDGET)(setting["model"]), setting)


def test_finetune_learns_the_new_task_and_forgets_the_old(finetuned):
    old, new = finetuned
    assert old < 0.05 and new > 0.85


def test_finetune_defaults_choose_the_rate_on_held_out_data_and_learn(setting):
    from keras_fip.baselines.continual_base import LEARNING_RATE_GRID

    op = baselines.FineTune(setting["new"], walk=keras_fip.Walk(seed=0))
    model = op(setting["model"])
    scores = op.history["learning_rate_scores"]
    assert set(LEARNING_RATE_GRID) <= set(scores)
    assert op.history["learning_rate"] == min(scores, key=lambda r: (-scores[r], r))
    # Five classes: the majority class is ~20%.
    assert _accuracies(model, setting)[1] > 0.85
    assert op.history["steps"] == 5 * math.ceil(len(setting["new"][1]) / 32)


def _fake_training(monkeypatch, peak):
    """Candidates are not trained; a candidate's held-out score peaks at `peak` (log10 of
    its learning rate). Returns the list of `(rate, memory size, validation sets)` of
    every run."""
    from keras_fip.baselines import continual_base

    runs = []

    def fake_train(candidate, op, x, y, steps, learning_rate=None, evaluate=True):
        memory = getattr(op, "_memory", None)
        runs.append([learning_rate, None if memory is None else len(memory[1]), None])
        candidate.rate_used = learning_rate
        return {"loss": [0.0]}

    def fake_accuracy(candidate, x, y):
        runs[-1][2] = (runs[-1][2] or 0) + 1
        return -abs(np.log10(candidate.rate_used) - np.log10(peak))

    monkeypatch.setattr(continual_base, "train", fake_train)
    monkeypatch.setattr(continual_base, "task_accuracy", fake_accuracy)
    return runs


@pytest.mark.parametrize(
    "peak, tried, chosen",
    [
        # The top wins alone: one grid step (3x) past it, twice at most.
        (1e-2, [3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2], 9e-3),
        (1.0, [3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2], 2.7e-2),
        # The bottom wins alone: the bottom spacing (÷10/3) below it.
        (1e-4, [2.7e-5, 9e-5, 3e-4, 1e-3, 3e-3], 9e-5),
        # An interior best: the grid as given.
        (1e-3, [3e-4, 1e-3, 3e-3], 1e-3),
    ],
)
def test_learning_rate_search_extends_the_grid_past_an_edge_that_wins(
    setting, monkeypatch, peak, tried, chosen
):
    runs = _fake_training(monkeypatch, peak)
    op = baselines.FineTune(setting["new"], walk=keras_fip.Walk(epochs=1, seed=0))
    op(setting["model"])
    np.testing.assert_allclose(sorted(op.history["learning_rate_scores"]), tried, rtol=1e-3)
    assert op.history["learning_rate"] == pytest.approx(chosen, rel=1e-3)
    # Every candidate, then the whole task at the chosen rate.
    assert [run[0] for run in runs[:-1]] == list(op.history["learning_rate_scores"])
    assert runs[-1][0] == op.history["learning_rate"]


def test_memory_baselines_choose_the_rate_on_a_held_out_part_of_their_memory(setting, monkeypatch):
    runs = _fake_training(monkeypatch, 1e-3)
    walk = keras_fip.Walk(epochs=1, seed=0)
    op = baselines.AGEM(setting["new"], memory=setting["memory"], walk=walk)
    op(setting["model"])
    # The candidates train on 180 of the 200 memories and are scored on the new task's
    # held-out split and the 20 others; the returned model trains on all 200.
    assert [run[1:] for run in runs[:-1]] == [[180, 2]] * 3
    assert runs[-1][1] == 200
    fixed = baselines.AGEM(setting["new"], memory=setting["memory"], learning_rate=1e-3, walk=walk)
    fixed(setting["model"])
    assert "learning_rate_scores" not in fixed.history and runs[-1][0] == 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda s: baselines.ExperienceReplay(s["new"], memory=s["memory"], **BUDGET),
        lambda s: baselines.AGEM(s["new"], memory=s["memory"], **BUDGET),
        lambda s: baselines.JointTraining(s["new"], old_tasks=[s["old"]], **BUDGET),
    ],
    ids=["replay", "agem", "joint"],
)
def test_memory_and_joint_baselines_keep_the_old_task(setting, finetuned, make):
    model = make(setting)(setting["model"])
    old, new = _accuracies(model, setting)
    assert old > finetuned[0] + 0.5
    assert new > 0.6
    assert model.output_shape == (None, 10)


def test_ewc_chooses_lambda_on_validation_and_beats_finetuning(setting, finetuned):
    x_old, y_old = setting["old"]
    op = baselines.EWC(
        setting["new"],
        fisher_data=x_old,
        lambda_grid=(1.0, 1e3),
        validation_tasks=[(x_old[-100:], y_old[-100:])],
        max_lambda_extensions=0,
        **BUDGET,
    )
    model = op(setting["model"])
    assert op.history["lambda"] in (1.0, 1e3)
    scores = op.history["lambda_scores"]
    assert op.history["lambda"] == max(scores, key=scores.get)
    assert _accuracies(model, setting)[0] > finetuned[0] + 0.3
    ((fisher, anchor),) = ewc_state(model)
    assert fisher[-2].shape == model.trainable_variables[-2].shape  # Grown head padded.
    assert np.all(fisher[-2][:, 5:] == 0.0) and np.all(fisher[-2] >= 0.0)


@pytest.mark.parametrize(
    "peak, grid, tried, chosen",
    [
        # The top wins alone: one grid step (10x) past it until a value loses (3 at most).
        (1e9, (1e6, 1e7), [1e6, 1e7, 1e8, 1e9, 1e10], 1e9),
        (1e12, (1e6, 1e7), [1e6, 1e7, 1e8, 1e9, 1e10], 1e10),
        # The bottom wins alone: ÷10 below it.
        (0.1, (10.0, 100.0), [0.01, 0.1, 1.0, 10.0, 100.0], 0.1),
        # An interior best: the grid as given.
        (10.0, (1.0, 10.0, 100.0), [1.0, 10.0, 100.0], 10.0),
        # The step is the grid's spacing at that edge; λ = 0 next to the bottom: 3x up.
        (1e8, (1e2, 1e4, 1e6), [1e2, 1e4, 1e6, 1e8, 1e10], 1e8),
        (1e2, (0.0, 1.0), [0.0, 1.0, 3.0, 9.0, 27.0], 27.0),
    ],
)
def test_ewc_extends_the_lambda_grid_past_an_edge_that_wins(
    setting, monkeypatch, peak, grid, tried, chosen
):
    # The validation score peaks at `peak` (in log10 λ); training is skipped.
    from keras_fip.baselines import continual_base
    from keras_fip.baselines import ewc

    def fake_train(candidate, op, x, y, steps, learning_rate=None, evaluate=True):
        candidate.ewc_lambda_used = float(op._lambda.numpy())
        return {"loss": [0.0]}

    for module in (continual_base, ewc):
        monkeypatch.setattr(module, "train", fake_train)
    monkeypatch.setattr(
        continual_base,
        "task_accuracy",
        lambda candidate, x, y: -abs(np.log10(candidate.ewc_lambda_used) - np.log10(peak)),
    )
    x_old, _ = setting["old"]
    op = baselines.EWC(
        setting["new"],
        fisher_data=x_old[:50],
        lambda_grid=grid,
        learning_rate=1e-3,
        walk=keras_fip.Walk(epochs=1, seed=0),
    )
    op(setting["model"])
    np.testing.assert_allclose(sorted(op.history["lambda_scores"]), tried, rtol=1e-9)
    assert op.history["lambda"] == pytest.approx(chosen, rel=1e-9)
    with pytest.raises(ValueError, match="max_lambda_extensions"):
        baselines.EWC(setting["new"], max_lambda_extensions=-1)


def test_ewc_auto_lambda_without_old_task_validation_warns(setting):
    with pytest.warns(UserWarning, match="without `validation_tasks`"):
        baselines.EWC(setting["new"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        baselines.EWC(setting["new"], ewc_lambda=10.0)


def test_online_ewc_merges_penalties_and_offline_keeps_them(setting):
    x_old, _ = setting["old"]
    x_new, y_new = setting["new"]
    first = (x_new[y_new < 3], y_new[y_new < 3])
    second = (x_new[y_new >= 3], y_new[y_new >= 3] - 3)
    budget = dict(walk=keras_fip.Walk(epochs=1, batch_size=64, seed=0), ewc_lambda=10.0)
    for online, count in ((True, 1), (False, 2)):
        model = baselines.EWC(first, fisher_data=x_old, online=online, **budget)(setting["model"])
        model = baselines.EWC(second, fisher_data=first[0], online=online, **budget)(model)
        assert len(ewc_state(model)) == count
        assert model.output_shape == (None, 10)


def test_lwf_distils_the_old_outputs(setting, finetuned):
    model = baselines.LwF(setting["new"], **BUDGET)(setting["model"])
    undistilled = baselines.LwF(setting["new"], distillation_weight=0.0, **BUDGET)(setting["model"])
    x_old = setting["tests"][0][0]
    old_logits = np.asarray(setting["model"](x_old))
    change = np.mean(np.abs(np.asarray(model(x_old))[:, :5] - old_logits))
    undistilled_change = np.mean(np.abs(np.asarray(undistilled(x_old))[:, :5] - old_logits))
    assert change < undistilled_change
    assert _accuracies(model, setting)[1] > 0.5


def test_baselines_keep_masks_and_never_change_their_input(setting):
    walk = keras_fip.Walk(epochs=1, verbose=0, seed=0)
    sparse = keras_fip.Compress(0.5, data=setting["old"][0], walk=walk)(setting["model"])
    before = [v.numpy().copy() for v in sparse.weights]
    model = baselines.ExperienceReplay(setting["new"], memory=setting["memory"], walk=walk)(sparse)
    zeros = sum(int((~m).sum()) for m in keras_fip.masks(model).values())
    assert zeros == sum(int((~m).sum()) for m in keras_fip.masks(sparse).values()) > 0
    for variable in model.trainable_variables:
        mask = keras_fip.masks(model).get(variable.path)
        if mask is not None:
            assert np.all(variable.numpy()[~mask] == 0.0)
    for value, variable in zip(before, sparse.weights):
        np.testing.assert_array_equal(value, variable.numpy())


def test_baselines_check_their_inputs(setting):
    x_new, y_new = setting["new"]
    with pytest.raises(ValueError, match="memory"):
        baselines.ExperienceReplay(setting["new"])(setting["model"])
    with pytest.raises(ValueError, match="memory"):
        baselines.AGEM(setting["new"], memory=(x_new[:5], np.full(5, 7)))(setting["model"])
    with pytest.raises(ValueError, match="fisher_data"):
        baselines.EWC(setting["new"])(setting["model"])
    with pytest.raises(ValueError, match="NaN"):
        baselines.FineTune((np.full_like(x_new, np.nan), y_new))
    with pytest.raises(ValueError, match="head"):
        baselines.LwF(setting["new"], head="grow")
    with pytest.raises(ValueError, match="0..k-1"):
        baselines.FineTune((x_new, y_new + 1))
    # A baseline reads the walk's budget, batch size, seed and verbosity only.
    with pytest.raises(ValueError, match="rule="):
        baselines.FineTune(setting["new"], walk=keras_fip.Walk(rule="metric"))
    with pytest.raises(ValueError, match="beta=0.5"):
        baselines.EWC(setting["new"], walk=keras_fip.Walk(beta=0.5))
    with pytest.raises(ValueError, match="walk"):
        baselines.LwF(setting["new"], walk="fast")


def test_config_round_trip():
    walk = keras_fip.Walk(epochs=2, batch_size=16, seed=3, verbose=0)
    task = (np.zeros((2, 8, 8, 1)), np.array([0, 1]))
    op = baselines.EWC(task, ewc_lambda=5.0, walk=walk)
    config = op.get_config()
    restored = baselines.EWC.from_config(config)
    assert restored.get_config() == config
    assert config["ewc_lambda"] == 5.0 and restored.walk == walk
    assert restored.batch_size == 16 and restored.seed == 3
    replay = baselines.ExperienceReplay(task, memory_batch_size=8, learning_rate=1e-3, walk=walk)
    assert baselines.ExperienceReplay.from_config(replay.get_config()).get_config() == (
        replay.get_config()
    )


def test_baselines_meet_the_operation_contract():
    from tests.operations.contract import run_operation_contract

    run_operation_contract(
        lambda model, x, y: baselines.ExperienceReplay(
            (x[200:], y[200:] % 3),
            memory=(x[:100], y[:100]),
            walk=keras_fip.Walk(epochs=1, seed=0),
        ),
        models=("batchnorm_residual",),
    )


def test_a_baseline_called_twice_gives_independent_results(setting):
    op = baselines.LwF(setting["new"], learning_rate=1e-3, walk=keras_fip.Walk(epochs=1, seed=0))
    first = op(setting["model"])
    first_history = op.history
    other = keras.models.clone_model(setting["model"])
    other.set_weights([w * 0.5 for w in setting["model"].get_weights()])
    op(other)
    again = op(setting["model"])
    assert op.history is not first_history and op.history["steps"] == first_history["steps"]
    for a, b in zip(first.trainable_variables, again.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)


def test_steps_budget_and_batch_size_come_from_the_walk(setting, monkeypatch):
    runs = _fake_training(monkeypatch, 1e-3)
    walk = keras_fip.Walk(steps=7, batch_size=16, seed=0)
    op = baselines.FineTune(setting["new"], learning_rate=1e-3, walk=walk)
    op(setting["model"])
    assert op.history["steps"] == 7 and op.batch_size == 16 and len(runs) == 1
    op = baselines.FineTune(setting["new"], learning_rate=1e-3, walk=keras_fip.Walk(epochs=2))
    op(setting["model"])
    assert op.history["steps"] == 2 * math.ceil(len(setting["new"][1]) / 32)
