import keras
import numpy as np
import pytest

import keras_fip
from keras_fip.operations import hidden_units
from keras_fip.operations.damage import Damage
from keras_fip.operations.damage_reference import damage_reference
from keras_fip.operations.damage_repair import DamageRepair
from keras_fip.operations.faults import Nodes
from keras_fip.operations.repair import Embryonic
from keras_fip.operations.repair import Repair
from tests.operations.contract import run_operation_contract


@pytest.fixture(scope="module")
def trained(trained_small_mlp):
    return trained_small_mlp


def _repair(digits, **kwargs):
    x, y, x_test, y_test = digits
    return Repair(
        (x, y),
        method="retrain",
        validation_data=(x_test, y_test),
        evaluations_per_epoch=2,
        walk=keras_fip.Walk(epochs=1, rule=keras_fip.rules.Penalty(3e-3), seed=0, verbose=0),
        **kwargs,
    )


def test_damage_repair_meets_the_operation_contract():
    run_operation_contract(
        lambda model, x, y: DamageRepair(
            2,
            count=3,
            seed=0,
            layers=["contract_hidden"],
            repair=Repair(
                (x, y), method="retrain", walk=keras_fip.Walk(epochs=1, seed=0, verbose=0)
            ),
        ),
        models=("sequential",),
    )


def test_rounds_delete_distinct_undamaged_units_with_exact_zeros(digits, trained):
    op = DamageRepair(3, count=5, repair=_repair(digits), seed=0, keep_networks=True)
    result = op(trained)
    # The network after every repair, the last one the result.
    networks = op.history["networks"]
    assert len(networks) == 3
    for a, b in zip(networks[-1], result.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(networks[0][0], networks[1][0])
    deleted = {name: set(units) for name, (_, units) in hidden_units(result).items()}
    assert sum(len(units) for units in deleted.values()) == 15  # 3 rounds × 5, distinct.
    per_round = [op.history["rounds"][i]["units"] for i in range(3)]
    union = {}
    for units in per_round:
        assert sum(len(u) for u in units.values()) == 5
        for name, indices in units.items():
            assert not set(indices) & union.get(name, set())  # Only undamaged units drawn.
            union.setdefault(name, set()).update(indices)
    assert union == {name: units for name, units in deleted.items() if units}
    # The deleted units' weights are exactly zero, and the reference is the original.
    reference = damage_reference(result)
    for variable, mask in zip(result.trainable_variables, reference.damage_masks):
        if mask is not None:
            assert np.all(np.asarray(variable.numpy())[~mask] == 0.0)
    for a, b in zip(reference.weights, trained.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [r["kind"] for r in reference.records] == ["nodes", "repair"] * 3


@pytest.mark.large  # Two loops of two rounds: kept out of the default run's budget.
def test_cycles_sum_the_rounds_epochs_and_same_seed_same_units(digits, trained):
    first = DamageRepair(2, count=6, repair=_repair(digits, stop_at_target=True), seed=4)
    first(trained)
    rounds = first.history["rounds"]
    expected = sum(
        r["epochs_to_recover"] if r["epochs_to_recover"] is not None else r["epochs"]
        for r in rounds
    )
    assert first.history["cycles"] == pytest.approx(expected)
    second = DamageRepair(2, count=6, repair=_repair(digits), seed=4)
    second(trained)
    assert [r["units"] for r in second.history["rounds"]] == [r["units"] for r in rounds]


def test_one_loop_object_gives_independent_results_on_models_and_calls(digits, trained):
    x, y, _, _ = digits
    keras.utils.set_random_seed(3)
    other = keras_fip.models.mlp(20, input_shape=(8, 8, 1))
    op = DamageRepair(2, count=3, repair=_repair(digits), seed=1, keep_networks=True)
    results = [op(trained), op(other), op(trained)]
    fresh = [
        DamageRepair(2, count=3, repair=_repair(digits), seed=1)(model)
        for model in (trained, other)
    ]
    for result, expected in zip(results, (fresh[0], fresh[1], fresh[0])):
        for a, b in zip(result.get_weights(), expected.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert len(op.history["networks"]) == 2  # The last call's networks only.
    assert len(hidden_units(results[1])["dense_1"][1]) == 6


def test_config_round_trip(digits):
    import inspect

    op = DamageRepair(
        4,
        fraction=0.1,
        repair=Repair(method="embryonic", walk=keras_fip.Walk(epochs=2)),
        layers=["dense_1"],
        seed=3,
        keep_networks=True,
        name="rounds",
    )
    config = op.get_config()
    assert config["keep_networks"] is True
    assert set(inspect.signature(DamageRepair.__init__).parameters) - {"self"} == set(config)
    twin = DamageRepair.from_config(config)
    assert twin.get_config() == config
    assert isinstance(twin.repair, Repair) and twin.repair.method == Embryonic()
    assert twin.repair.walk == keras_fip.Walk(epochs=2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(op))
    assert restored.get_config() == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rounds": 0, "count": 1}, "rounds"),
        ({"rounds": 2, "count": 0}, "count"),
        ({"rounds": 2}, "count"),
        ({"rounds": 2, "count": 1, "fraction": 0.1}, "count"),
        ({"rounds": 2, "fraction": 1.5}, "fraction"),
        ({"rounds": 2, "count": 1, "repair": "retrain"}, "repair"),
        ({"rounds": 2, "count": 1, "layers": []}, "layers"),
        ({"rounds": 2, "count": 1, "keep_networks": "yes"}, "keep_networks"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DamageRepair(**kwargs)


def test_budget_larger_than_the_undamaged_units_raises_before_work(digits, trained):
    with pytest.raises(ValueError, match="undamaged"):
        DamageRepair(2, count=100, repair=_repair(digits))(trained)


# The sampler's building blocks: Nodes(units=...) and hidden_units.


def test_damage_deletes_exactly_the_named_units(trained):
    damaged = Damage(Nodes(units={"dense_1": [2, 0, 2], "dense_2": [5]}))(trained)
    listing = hidden_units(damaged)
    assert listing == {"dense_1": (24, [0, 2]), "dense_2": (16, [5])}
    assert hidden_units(trained) == {"dense_1": (24, []), "dense_2": (16, [])}
    assert damage_reference(damaged).records[0]["units"] == {"dense_1": [0, 2], "dense_2": [5]}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"units": {"dense_1": [0]}, "fraction": 0.5}, "units"),
        ({"units": {"dense_1": [0]}, "count": 2}, "units"),
        ({"units": {"dense_1": [-1]}}, "units"),
        ({"units": ["dense_1"]}, "units"),
    ],
)
def test_damage_units_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Nodes(**kwargs)


@pytest.mark.parametrize(
    "units, match",
    [
        ({"logits": [0]}, "logits"),
        ({"dense_1": [24]}, "24"),
    ],
)
def test_damage_units_unknown_layer_or_index_raises_before_work(trained, units, match):
    with pytest.raises(ValueError, match=match):
        Damage(Nodes(units=units))(trained)


def test_repair_data_that_do_not_fit_the_model_raise_before_the_first_damage(trained, monkeypatch):
    def no_copy(model):
        raise AssertionError("the model was copied before the data were checked")

    monkeypatch.setattr(keras_fip.operations.base, "copy_model", no_copy)
    bad = np.zeros((20, 7, 7, 1), "float32")
    loop = DamageRepair(1, count=2, repair=Repair(bad))
    with pytest.raises(ValueError, match="`data` must hold inputs of shape"):
        loop(trained)
    assert loop.history is None
