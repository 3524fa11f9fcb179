import numpy as np
import pytest
import scipy.sparse.linalg

from keras_fip.geometry import MetricOperator
from keras_fip.geometry import expected_perturbation_change
from keras_fip.geometry import spectral_density
from keras_fip.geometry import top_eigenpairs
from keras_fip.geometry import trace
from keras_fip.geometry import vulnerable_fraction
from tests.geometry.conftest import dense_metric
from tests.geometry.conftest import tiny_conv_bn
from tests.geometry.conftest import tiny_mlp


@pytest.fixture(scope="module", params=["mlp", "conv"])
def problem(request):
    """A metric operator whose g has full rank 51 (MLP) or rank ≤ 90 of 120 (conv)."""
    rng = np.random.default_rng(0)
    if request.param == "mlp":
        model, inputs = tiny_mlp(), rng.normal(size=(40, 4))
    else:
        model, inputs = tiny_conv_bn(), rng.uniform(size=(30, 5, 5, 1))
    metric = MetricOperator(model, inputs, batch_size=16)
    return metric, dense_metric(model, inputs)


def test_top_eigenpairs_match_dense_eigh(problem):
    metric, dense = problem
    expected_values, expected_vectors = np.linalg.eigh(dense)
    expected_values = expected_values[::-1][:5]
    expected_vectors = expected_vectors[:, ::-1][:, :5]
    pairs = top_eigenpairs(metric, k=5)
    values, vectors = pairs
    np.testing.assert_allclose(values, expected_values, rtol=1e-8)
    assert np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, rtol=1e-12)
    for column, expected in zip(vectors.T, expected_vectors.T):
        alignment = abs(column @ expected)
        assert alignment >= 1 - 1e-8
    # Per-variable layout flattens back to the flat eigenvector.
    first = pairs.variable_vectors[0]
    assert [a.shape for a in first] == metric._shapes
    np.testing.assert_array_equal(metric.flatten(first), vectors[:, 0])
    assert pairs.num_matvecs > 0


def test_trace_hutch_plus_plus_within_five_percent(problem):
    metric, dense = problem
    estimate = trace(metric, num_samples=100, seed=0)
    assert abs(estimate - np.trace(dense)) <= 0.05 * np.trace(dense)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_takes_quadratic_forms_where_it_needs_no_product(problem, method):
    metric, dense = problem
    products, forms = metric.num_matvecs, metric.num_quadratic_forms
    estimate = trace(metric, num_samples=30, method=method, seed=1)
    # Hutch++: a third of the probes sketch the range (products), the rest are zᵀ g z.
    sketch = 10 if method == "hutch++" else 0
    assert metric.num_matvecs - products == sketch
    assert metric.num_quadratic_forms - forms == 30 - sketch
    # The same estimate as from products: the same probes, vᵀ(g v) for each.
    operator = scipy.sparse.linalg.aslinearoperator(dense)
    assert estimate == pytest.approx(
        trace(operator, num_samples=30, method=method, seed=1), rel=1e-9
    )


def test_trace_hutchinson_is_unbiased_on_diagonal_operator():
    diagonal = np.linspace(0.0, 2.0, 50)
    operator = scipy.sparse.linalg.aslinearoperator(np.diag(diagonal))
    # On a diagonal matrix Rademacher probes are exact: zᵀ D z = trace(D).
    assert trace(operator, num_samples=1, method="hutchinson") == pytest.approx(
        diagonal.sum(), rel=1e-12
    )
    dense = np.random.default_rng(1).normal(size=(50, 50))
    dense = dense @ dense.T
    operator = scipy.sparse.linalg.aslinearoperator(dense)
    estimate = trace(operator, num_samples=2000, method="hutchinson", seed=3)
    assert estimate == pytest.approx(np.trace(dense), rel=0.05)


def test_spectral_density_integrates_to_num_params(problem):
    metric, dense = problem
    grid, density = spectral_density(metric, num_probes=5, num_steps=30, seed=1)
    assert grid.shape == density.shape == (1000,)
    assert np.all(density >= 0)
    integral = np.trapezoid(density, grid)
    assert integral == pytest.approx(metric.num_params, rel=1e-3)
    # The density's mean eigenvalue estimates trace(g) / n.
    mean = np.trapezoid(grid * density, grid) / integral
    assert mean == pytest.approx(np.trace(dense) / metric.num_params, rel=0.3)


def test_quadrature_runs_probes_in_lockstep_on_shared_forward_passes(problem, monkeypatch):
    metric, _ = problem
    from keras_fip.geometry import spectrum

    def no_single_products(vector):
        raise AssertionError("a single product g·v where a block was expected")

    monkeypatch.setattr(metric, "matvec", no_single_products)
    before = metric.num_matvecs
    counting = spectrum._CountingOperator(metric)
    lockstep = spectrum._quadrature(counting, num_probes=4, num_steps=12, seed=2)
    assert metric.num_matvecs - before == counting.num_matvecs == 4 * 12
    # One probe at a time (groups of one) gives the same nodes and weights.
    monkeypatch.setattr(spectrum, "_MAX_BASIS_ENTRIES", 1)
    one_at_a_time = spectrum._quadrature(
        spectrum._CountingOperator(metric), num_probes=4, num_steps=12, seed=2
    )
    for got, want in zip(lockstep, one_at_a_time):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_lanczos_stops_each_probe_at_its_invariant_subspace():
    from keras_fip.geometry import spectrum

    # Three distinct eigenvalues: every Krylov space stops growing after three steps.
    diagonal = np.repeat([0.5, 2.0, 7.0], 10)
    counting = spectrum._CountingOperator(scipy.sparse.linalg.aslinearoperator(np.diag(diagonal)))
    nodes, weights = spectrum._quadrature(counting, num_probes=3, num_steps=10, seed=0)
    assert counting.num_matvecs == 9
    for probe_nodes, probe_weights in zip(nodes, weights):
        np.testing.assert_allclose(probe_nodes, [0.5, 2.0, 7.0], rtol=1e-9)
        assert np.sum(probe_weights) == pytest.approx(1.0, rel=1e-12)


def test_vulnerable_fraction_gram_is_exact(problem):
    metric, dense = problem
    threshold = 1e-3
    expected = np.sum(np.linalg.eigvalsh(dense) >= threshold) / metric.num_params
    assert vulnerable_fraction(metric, threshold, method="gram") == pytest.approx(
        expected, abs=1e-12
    )
    assert vulnerable_fraction(metric, threshold) == pytest.approx(expected)
    slq = vulnerable_fraction(metric, threshold, method="slq", num_probes=20)
    assert slq == pytest.approx(expected, abs=0.1)


def test_vulnerable_fraction_counts_zero_directions():
    # Two inputs, three logits: rank(g) <= 6 of 51 directions.
    model = tiny_mlp()
    metric = MetricOperator(model, np.random.default_rng(2).normal(size=(2, 4)))
    rho = vulnerable_fraction(metric, threshold=1e-12)
    assert 0 < rho <= 6 / 51


def test_expected_perturbation_change_matches_monte_carlo(problem):
    metric, dense = problem
    sigma = 0.01
    n = metric.num_params
    expected = expected_perturbation_change(metric, sigma, num_samples=100)
    rng = np.random.default_rng(4)
    perturbations = rng.normal(scale=np.sqrt(sigma / n), size=(20000, n))
    monte_carlo = np.mean(np.sum((perturbations @ dense) * perturbations, axis=1))
    assert expected == pytest.approx(monte_carlo, rel=0.05)


@pytest.mark.parametrize(
    "function, kwargs, message",
    [
        (top_eigenpairs, {"k": 0}, "k"),
        (top_eigenpairs, {"k": 51}, "k"),
        (top_eigenpairs, {"tol": -1.0}, "tol"),
        (trace, {"num_samples": 2}, "num_samples"),
        (trace, {"method": "exact"}, "method"),
        (spectral_density, {"num_steps": 0}, "num_steps"),
        (spectral_density, {"sigma": -1.0}, "sigma"),
        (vulnerable_fraction, {"threshold": -1.0}, "threshold"),
        (vulnerable_fraction, {"method": "dense"}, "method"),
        (expected_perturbation_change, {"sigma": -0.5}, "sigma"),
        (expected_perturbation_change, {"sigma": float("nan")}, "sigma"),
    ],
)
def test_bad_arguments_raise(function, kwargs, message):
    metric = MetricOperator(tiny_mlp(), np.zeros((3, 4)))
    if function is expected_perturbation_change:
        with pytest.raises(ValueError, match=f"`{message}`"):
            function(metric, **kwargs)
        return
    with pytest.raises(ValueError, match=f"`{message}`"):
        function(metric, **kwargs)


def test_non_operator_raises():
    with pytest.raises(ValueError, match="`op`"):
        trace(np.eye(3))
