"""Spectrum of the metric g: top eigenpairs, trace, spectral density, vulnerability.

Every function takes a `MetricOperator` (or any symmetric positive
semi-definite `scipy.sparse.linalg.LinearOperator`) and touches g only through
products g·v.
"""

import numpy as np
import scipy.sparse.linalg

from keras_fip.geometry.eigenpairs import Eigenpairs
from keras_fip.geometry.metric import MetricOperator


class _CountingOperator:
    """Float64 products with g, counted."""

    def __init__(self, op, name="op"):
        if isinstance(op, MetricOperator):
            self.num_params = op.num_params
            self._linear_operator = op.as_linear_operator()
            self.metric = op
        elif isinstance(op, scipy.sparse.linalg.LinearOperator):
            if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
                raise ValueError(
                    f"`{name}` must be a square operator. Received: {name} with shape {op.shape}"
                )
            self.num_params = int(op.shape[0])
            self._linear_operator = op
            self.metric = None
        else:
            raise ValueError(
                f"`{name}` must be a `keras_fip.geometry.MetricOperator` or a "
                f"`scipy.sparse.linalg.LinearOperator`. Received: {name}={op!r}"
            )
        self.num_matvecs = 0
        self.num_quadratic_forms = 0

    def __call__(self, vector):
        self.num_matvecs += 1
        return np.asarray(self._linear_operator.matvec(vector), dtype=np.float64)

    def matmat(self, matrix):
        """Products with the columns of `matrix`; a `MetricOperator` shares forward passes."""
        self.num_matvecs += matrix.shape[1]
        return np.asarray(self._linear_operator.matmat(matrix), dtype=np.float64)

    def quadratic_forms(self, matrix):
        """vᵀ g v for the columns v of `matrix`: a `MetricOperator` runs no reverse pass
        (`MetricOperator.quadratic_form`), another operator takes the products."""
        if self.metric is None:
            return np.sum(matrix * self.matmat(matrix), axis=0)
        self.num_quadratic_forms += matrix.shape[1]
        return np.asarray(self.metric.quadratic_form(matrix), dtype=np.float64)

    def linear_operator(self):
        return scipy.sparse.linalg.LinearOperator(
            (self.num_params, self.num_params),
            matvec=self,
            rmatvec=self,
            dtype=np.float64,
        )


def _check_positive_int(value, name, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


def _check_non_negative(value, name):
    if not isinstance(value, (int, float, np.floating, np.integer)) or not (
        value >= 0 and np.isfinite(value)
    ):
        raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")


def top_eigenpairs(op, k=10, tol=0.0, seed=0, max_iterations=None):
    """The k largest eigenvalues of g and their unit eigenvectors.

    Implicitly restarted Lanczos (`scipy.sparse.linalg.eigsh`, ARPACK) over
    `op.as_linear_operator()`; only products g·v are used.

    Args:
        op: a `MetricOperator` (or a symmetric `LinearOperator`).
        k: number of eigenpairs, `1 <= k < num_params`. Defaults to `10`.
        tol: relative accuracy of the eigenvalues; `0` means machine
            precision. Defaults to `0.0`.
        seed: seed of the Lanczos starting vector. Defaults to `0`.
        max_iterations: cap on ARPACK restarts; `None` lets ARPACK choose.
            Defaults to `None`.

    Returns:
        An `Eigenpairs` tuple `(values, vectors)`: `values` descending,
        `vectors` a `(num_params, k)` array of unit columns; also
        `.variable_vectors` (per-variable lists) and `.num_matvecs`.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> metric = MetricOperator(model, np.random.rand(16, 3).astype("float32"))
        >>> values, vectors = top_eigenpairs(metric, k=2)
        >>> vectors.shape
        (8, 2)
    """
    counting = _CountingOperator(op)
    _check_positive_int(k, "k")
    if k >= counting.num_params:
        raise ValueError(
            f"`k` must be smaller than the number of parameters "
            f"({counting.num_params}). Received: k={k}"
        )
    _check_non_negative(tol, "tol")
    if max_iterations is not None:
        _check_positive_int(max_iterations, "max_iterations")

    # Lanczos from a seeded start
    start = np.random.default_rng(seed).standard_normal(counting.num_params)
    values, vectors = scipy.sparse.linalg.eigsh(
        counting.linear_operator(),
        k=k,
        which="LA",
        tol=tol,
        v0=start,
        maxiter=max_iterations,
    )

    # Descending order, unit columns
    order = np.argsort(values)[::-1]
    values = values[order]
    vectors = vectors[:, order]
    vectors = vectors / np.linalg.norm(vectors, axis=0, keepdims=True)
    variable_vectors = None
    if counting.metric is not None:
        variable_vectors = [counting.metric.unflatten(column) for column in vectors.T]
    return Eigenpairs(values, vectors, variable_vectors, counting.num_matvecs)


def trace(op, num_samples=100, method="hutch++", seed=0):
    """Stochastic estimate of trace(g) from `num_samples` probes of g.

    `"hutchinson"` averages zᵀ g z over Rademacher vectors z. `"hutch++"`
    (Meyer et al., 2021) spends a third of the probes on products g·S that sketch
    g's range Q, takes trace(Qᵀ g Q) exactly and runs Hutchinson on the rest; g is
    low-rank (rank ≤ N·C), so Hutch++ is usually far more accurate. Every probe but
    the sketch's needs only a quadratic form zᵀ g z, which a `MetricOperator` takes
    without a reverse pass (`MetricOperator.quadratic_form`: about half the price of
    a product in a block).

    Args:
        op: a `MetricOperator` (or a symmetric `LinearOperator`).
        num_samples: number of probes to spend: products g·v and quadratic
            forms zᵀ g z (at least 3 for Hutch++). Defaults to `100`.
        method: `"hutch++"` or `"hutchinson"`. Defaults to `"hutch++"`.
        seed: seed of the random probes. Defaults to `0`.

    Returns:
        The estimate, a Python float.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> metric = MetricOperator(model, np.random.rand(16, 3).astype("float32"))
        >>> trace(metric, num_samples=30) > 0
        True
    """
    counting = _CountingOperator(op)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"`method` must be 'hutch++' or 'hutchinson'. Received: method={method!r}")
    _check_positive_int(num_samples, "num_samples", 3 if method == "hutch++" else 1)
    rng = np.random.default_rng(seed)
    n = counting.num_params

    def rademacher(columns):
        return rng.choice([-1.0, 1.0], size=(n, columns))

    if method == "hutchinson":
        probes = rademacher(num_samples)
        return float(np.mean(counting.quadratic_forms(probes)))

    # Sketch of the range of g
    sketch_size = num_samples // 3
    basis, _ = np.linalg.qr(counting.matmat(rademacher(sketch_size)))
    exact_part = np.sum(counting.quadratic_forms(basis))

    # Hutchinson on the deflated remainder
    num_remaining = num_samples - 2 * sketch_size
    probes = rademacher(num_remaining)
    probes = probes - basis @ (basis.T @ probes)
    remainder = np.sum(counting.quadratic_forms(probes)) / num_remaining
    return float(exact_part + remainder)


# Lanczos bases held at once by `_quadrature` (float64 entries, 512 MiB): the probes run
# in lockstep in groups that fit, so each step's products share forward passes.
_MAX_BASIS_ENTRIES = 2**26


def _lanczos(counting, starts, num_steps):
    """Lanczos with full reorthogonalisation from each column of `starts`, in lockstep.

    Each probe's recurrence is its own (no block Lanczos); only the products g·v of one
    step are taken together (`counting.matmat`). Returns one tridiagonal
    `(alphas, betas)` per probe.
    """
    num_probes = starts.shape[1]
    basis = np.zeros((num_probes, num_steps, counting.num_params))
    basis[:, 0] = (starts / np.linalg.norm(starts, axis=0)).T
    alphas = [[] for _ in range(num_probes)]
    betas = [[] for _ in range(num_probes)]
    active = list(range(num_probes))
    for step in range(num_steps):
        products = counting.matmat(basis[active, step].T)
        still_active = []
        for column, probe in enumerate(active):
            product = products[:, column]
            vectors = basis[probe, : step + 1]
            alpha = float(vectors[step] @ product)
            alphas[probe].append(alpha)
            # Full reorthogonalisation, twice for numerical safety.
            for _ in range(2):
                product -= vectors.T @ (vectors @ product)
            beta = float(np.linalg.norm(product))
            scale = max(max(abs(a) for a in alphas[probe]), max(betas[probe], default=0.0), 1e-300)
            if step == num_steps - 1 or beta <= 1e-10 * scale:
                continue
            betas[probe].append(beta)
            basis[probe, step + 1] = product / beta
            still_active.append(probe)
        active = still_active
        if not active:
            break
    return [(np.array(a), np.array(b)) for a, b in zip(alphas, betas)]


def _quadrature(counting, num_probes, num_steps, seed):
    """Gauss quadrature nodes and weights of g's spectral measure, per probe."""
    rng = np.random.default_rng(seed)
    num_steps = min(num_steps, counting.num_params)
    starts = [rng.choice([-1.0, 1.0], size=counting.num_params) for _ in range(num_probes)]
    group = max(1, _MAX_BASIS_ENTRIES // (num_steps * counting.num_params))
    nodes, weights = [], []
    for first in range(0, num_probes, group):
        columns = np.stack(starts[first : first + group], axis=1)
        for alphas, betas in _lanczos(counting, columns, num_steps):
            tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
            ritz_values, ritz_vectors = np.linalg.eigh(tridiagonal)
            nodes.append(ritz_values)
            weights.append(ritz_vectors[0] ** 2)
    return nodes, weights


def spectral_density(op, num_probes=10, num_steps=50, num_points=1000, sigma=None, seed=0):
    """Stochastic Lanczos quadrature estimate of g's eigenvalue density.

    For each Rademacher probe, `num_steps` Lanczos steps (full
    reorthogonalisation) give Gauss quadrature nodes θ_j and weights τ_j²
    (squared first components of the tridiagonal matrix's eigenvectors).
    The density is `(n / num_probes) Σ_probes Σ_j τ_j² N(t; θ_j, sigma²)`,
    which integrates to n, the number of parameters (each probe's weights
    sum to one). Costs `num_probes * num_steps` products g·v.

    Args:
        op: a `MetricOperator` (or a symmetric `LinearOperator`).
        num_probes: number of random probes. Defaults to `10`.
        num_steps: Lanczos steps per probe. Defaults to `50`.
        num_points: size of the evaluation grid. Defaults to `1000`.
        sigma: width of the Gaussian broadening; `None` uses 1/200 of the
            span of the nodes. Defaults to `None`.
        seed: seed of the probes. Defaults to `0`.

    Returns:
        A tuple `(grid, density)` of numpy arrays of length `num_points`; the
        grid extends 5 sigma beyond the extreme nodes.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> metric = MetricOperator(model, np.random.rand(16, 3).astype("float32"))
        >>> grid, density = spectral_density(metric, num_probes=2, num_steps=8)
        >>> grid.shape
        (1000,)
    """
    counting = _CountingOperator(op)
    _check_positive_int(num_probes, "num_probes")
    _check_positive_int(num_steps, "num_steps")
    _check_positive_int(num_points, "num_points", 2)
    if sigma is not None and not (isinstance(sigma, (int, float, np.floating)) and sigma > 0):
        raise ValueError(f"`sigma` must be a positive number or None. Received: sigma={sigma!r}")

    # Quadrature nodes and weights
    nodes, weights = _quadrature(counting, num_probes, num_steps, seed)
    nodes = np.concatenate(nodes)
    weights = np.concatenate(weights) * counting.num_params / num_probes

    # Gaussian broadening on a grid
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = (high - low) / 200.0 or max(abs(high), 1.0) * 1e-3
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)
    density = kernel @ weights / (sigma * np.sqrt(2 * np.pi))
    return grid, density


def vulnerable_fraction(
    op,
    threshold=1e-3,
    method="auto",
    num_probes=10,
    num_steps=80,
    seed=0,
    max_entries=2**28,
):
    """ρ: the fraction of the n eigen-directions of g with eigenvalue ≥ threshold.

    Directions with λ < threshold are resilient: moving along them barely
    changes the outputs. rank(g) ≤ N·C, so most of the n eigenvalues are
    exactly zero. `"gram"` counts exactly, from the eigenvalues of the
    N·C × N·C dual matrix `op.gram()` (same non-zero spectrum as g), and
    divides by n. `"slq"` estimates the fraction from stochastic Lanczos
    quadrature: the mean over probes of the quadrature weight on nodes
    ≥ threshold (unbiased up to quadrature error; its standard error is
    about sqrt(ρ(1-ρ)/(n·num_probes)) per probe weight, so it resolves small
    ρ only coarsely). `"auto"` uses `"gram"` when the Jacobian fits in
    `max_entries` entries, else `"slq"`.

    Args:
        op: a `MetricOperator` (or, for `"slq"`, a symmetric `LinearOperator`).
        threshold: eigenvalue at or above which a direction is vulnerable.
            Defaults to `1e-3`.
        method: `"auto"`, `"gram"` or `"slq"`. Defaults to `"auto"`.
        num_probes: SLQ probes. Defaults to `10`.
        num_steps: SLQ Lanczos steps per probe. Defaults to `80`.
        seed: SLQ seed. Defaults to `0`.
        max_entries: Jacobian size limit for `"gram"`. Defaults to `2**28`.

    Returns:
        ρ, a Python float in [0, 1].

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> metric = MetricOperator(model, np.random.rand(2, 3).astype("float32"))
        >>> vulnerable_fraction(metric) <= 4 / 8  # rank(g) <= N·C = 4
        True
    """
    counting = _CountingOperator(op)
    _check_non_negative(threshold, "threshold")
    if method not in ("auto", "gram", "slq"):
        raise ValueError(f"`method` must be 'auto', 'gram' or 'slq'. Received: method={method!r}")
    _check_positive_int(num_probes, "num_probes")
    _check_positive_int(num_steps, "num_steps")
    metric = counting.metric
    if method == "gram" and metric is None:
        raise ValueError(
            f"`method='gram'` needs `op` to be a `MetricOperator`. Received: op={op!r}"
        )
    if method == "auto":
        fits = metric is not None and (
            metric.num_examples * metric.num_outputs() * metric.num_params <= max_entries
        )
        method = "gram" if fits else "slq"

    if method == "gram":
        eigenvalues = np.linalg.eigvalsh(metric.gram(max_entries=max_entries))
        return float(np.sum(eigenvalues >= threshold) / metric.num_params)

    nodes, weights = _quadrature(counting, num_probes, num_steps, seed)
    fractions = [np.sum(w[v >= threshold]) for v, w in zip(nodes, weights)]
    return float(np.mean(fractions))


def expected_perturbation_change(op, sigma=None, num_samples=100, seed=0, norm=None):
    """Expected squared output change under a random weight perturbation (Eq. 9, settled).

    To second order a perturbation δw changes the outputs on the metric's data by
    δwᵀ g δw (mean squared change of the outputs). For any isotropic random δw,
    E[δwᵀ g δw] = (E‖δw‖² / n)·trace(g). Eq. 9 of the resilience paper writes σ for the
    perturbation's norm in one place and for its squared norm in the other; here the two
    are separate arguments, so the convention is explicit:

    - `sigma` is the expected **squared** norm E‖δw‖² (δw ~ N(0, (σ/n) I)): the change is
      (σ/n)·trace(g);
    - `norm` is the Euclidean norm ‖δw‖ itself (a random direction of exact norm r, as
      `keras_fip.Damage(kind="gaussian", norm=r)` draws): the change is (r²/n)·trace(g).

    Exactly one of them must be given. The trace is estimated with
    `trace(op, num_samples, seed=seed)`.

    Args:
        op: a `MetricOperator` (or a symmetric `LinearOperator`).
        sigma: expected squared norm E‖δw‖² ≥ 0 of the perturbation, or `None`.
            Defaults to `None`.
        num_samples: probes of g for the trace estimate (`trace`). Defaults to `100`.
        seed: seed of the trace probes. Defaults to `0`.
        norm: Euclidean norm ‖δw‖ ≥ 0 of the perturbation, or `None`. Defaults to
            `None`.

    Returns:
        The expected squared output change, a Python float.

    Examples:

        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> metric = MetricOperator(model, np.random.rand(16, 3).astype("float32"))
        >>> expected_perturbation_change(metric, sigma=0.0)
        0.0
        >>> a = expected_perturbation_change(metric, norm=2.0, num_samples=30)
        >>> b = expected_perturbation_change(metric, sigma=4.0, num_samples=30)
        >>> bool(np.isclose(a, b))
        True
    """
    counting = _CountingOperator(op)
    if (sigma is None) == (norm is None):
        raise ValueError(
            "Pass exactly one of `sigma` (the expected squared norm E‖δw‖²) and `norm` "
            f"(the norm ‖δw‖). Received: sigma={sigma!r}, norm={norm!r}"
        )
    if norm is not None:
        _check_non_negative(norm, "norm")
        sigma = float(norm) ** 2
    else:
        _check_non_negative(sigma, "sigma")
    if sigma == 0:
        return 0.0
    return float(sigma / counting.num_params * trace(op, num_samples, seed=seed))
