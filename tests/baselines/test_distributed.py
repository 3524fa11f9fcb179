"""Every baseline under `tf.distribute.MirroredStrategy` (two logical CPUs) gives the
one-device result (as `tests/operations/test_distributed.py` checks the operations):
the custom loops of the continual baselines and of prune-and-retrain split each global
batch over the replicas and scale each replica's loss as Keras does, and the `fit`-based
ones run Keras's own distributed step."""

import keras
import numpy as np
import pytest

import keras_fip
from keras_fip import baselines
from tests.operations.contract import contract_data
from tests.operations.contract import trained_model
from tests.operations.test_distributed import RTOL
from tests.operations.test_distributed import weights_of


def _cases():
    x, y = contract_data()
    new_task = (x[200:], y[200:] % 3)
    memory = (x[:200], y[:200])
    common = dict(walk=keras_fip.Walk(epochs=1, batch_size=64, seed=0, verbose=0))
    return {
        "finetune": lambda m: baselines.FineTune(new_task, **common)(m),
        "ewc": lambda m: baselines.EWC(new_task, fisher_data=memory[0], **common)(m),
        "lwf": lambda m: baselines.LwF(new_task, **common)(m),
        "replay": lambda m: baselines.ExperienceReplay(new_task, memory=memory, **common)(m),
        "agem": lambda m: baselines.AGEM(new_task, memory=memory, **common)(m),
        "joint": lambda m: baselines.JointTraining(new_task, old_tasks=[memory], **common)(m),
        "one_shot": lambda m: baselines.one_shot_magnitude_pruning(
            m, 0.5, x, y, epochs=1, batch_size=64, learning_rate=1e-3
        ),
        "gradual": lambda m: baselines.gradual_magnitude_pruning(
            m, 0.5, x, y, epochs=1, batch_size=64, learning_rate=1e-3
        ),
        "lottery": lambda m: baselines.lottery_ticket(
            m, 0.5, x, y, epochs=2, batch_size=64, rounds=2
        ),
        "deep_ensemble": lambda m: baselines.deep_ensemble(
            m, x, y, num_members=2, epochs=1, batch_size=64
        ),
        "fast_geometric_ensemble": lambda m: baselines.fast_geometric_ensemble(
            m, x, y, num_members=2, cycle_epochs=1, batch_size=64
        ),
        "snapshot_ensemble": lambda m: baselines.snapshot_ensemble(
            m, x, y, num_members=2, epochs=2, batch_size=64
        ),
        "prune_retrain": lambda m: baselines.prune_retrain(
            m,
            {"contract_hidden": [0, 1, 2]},
            (x, y),
            (x[:100], y[:100]),
            epochs=1,
            batch_size=64,
            seed=0,
        ),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_baseline_under_mirrored_strategy_equals_one_device(name, mirrored_strategy):
    run = _cases()[name]
    keras.utils.set_random_seed(0)
    alone = weights_of(run(trained_model("sequential")))
    keras.utils.set_random_seed(0)
    with mirrored_strategy.scope():
        distributed = weights_of(run(trained_model("sequential")))
    assert distributed.shape == alone.shape
    scale = np.max(np.abs(alone))
    np.testing.assert_allclose(distributed, alone, rtol=0, atol=RTOL * scale)
    start = weights_of(trained_model("sequential"))
    if start.shape == alone.shape:  # The comparison can fail: the weights moved.
        assert np.max(np.abs(alone - start)) > 10 * RTOL * scale
