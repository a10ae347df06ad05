"""Compiled core against the NumPy reference (link 2 of the test chain), on every instruction
set this CPU runs, and 1 thread against 2 threads."""

import numpy as np
import pytest

from starlabel import fast, reference
from starlabel.status import FitStatus, PixelStatus
from starlabel.vectorizer import PolynomialVectorizer, design_matrix


def random_problem(n_stars, n_labels, n_pixels, order, seed, intrinsic=0.01):
    """Spectra drawn from a known polynomial model with noise and intrinsic scatter."""
    rng = np.random.default_rng(seed)
    names = [f"L{i}" for i in range(n_labels)]
    exponents = PolynomialVectorizer(names, order).exponents
    x = rng.uniform(-1, 1, (n_stars, n_labels))
    theta = rng.normal(0, 0.05, (n_pixels, len(exponents)))
    theta[:, 0] = 1.0
    ivar = rng.uniform(0.5, 2.0, (n_stars, n_pixels)) * 1e4
    s2 = rng.choice([0.0, intrinsic**2], n_pixels)
    flux = design_matrix(exponents, x) @ theta.T
    flux += rng.normal(size=flux.shape) * np.sqrt(1 / ivar + s2)
    return exponents, x, flux, ivar


# Training tolerances: both backends solve the same normal equations (Cholesky vs LU on the
# Jacobi-scaled Gram) and find s2 to 1e-12 relative (Newton vs Brent): theta agrees to ~1e-9
# relative of its scale, s2 to ~1e-10 relative. Bounds below leave a factor ~100 of margin.
THETA_ATOL = 1e-7
S2_RTOL = 1e-8


def assert_training_matches(a, b):
    (theta_a, s2_a, status_a), (theta_b, s2_b, status_b) = a, b
    np.testing.assert_array_equal(status_a, status_b)
    np.testing.assert_allclose(theta_a, theta_b, rtol=0, atol=THETA_ATOL * np.nanmax(np.abs(theta_b)))
    np.testing.assert_allclose(s2_a, s2_b, rtol=S2_RTOL, atol=1e-14)


@pytest.mark.parametrize("n_stars,n_labels,n_pixels,order,seed", [
    (40, 1, 7, 1, 0),
    (30, 1, 5, 3, 1),
    (200, 3, 33, 2, 2),
    (150, 4, 20, 3, 3),
    (60, 2, 1, 2, 4),
    (400, 5, 70, 2, 5),   # more pixels than one block of the compiled kernel
    (1100, 4, 12, 2, 6),  # the packed monomials' depth (stars) in two panels of Eigen's ~550
])
def test_training_matches_reference(isa_core, n_stars, n_labels, n_pixels, order, seed):
    exponents, x, flux, ivar = random_problem(n_stars, n_labels, n_pixels, order, seed)
    out_fast = fast.cannon_train(exponents, x, flux, ivar)
    out_ref = reference.cannon_train(exponents, x, flux, ivar)
    assert_training_matches(out_fast, out_ref)
    assert np.all(out_fast[2] == PixelStatus.OK)
    if n_pixels >= 5:  # both s2 regimes exercised
        assert np.any(out_fast[1] > 0) and np.any(out_fast[1] == 0)


def test_training_edge_pixels_get_the_same_status(isa_core):
    exponents, x, flux, ivar = random_problem(50, 2, 4, 2, seed=6)
    ivar[:, 1] = 0.0                      # pixel 1: no data at all
    flux[:, 1] = np.nan                   # ... and NaN flux, allowed where ivar == 0
    ivar[len(exponents) - 1:, 2] = 0.0    # pixel 2: fewer stars than terms
    ivar[:, 3] = 0.0                      # pixel 3: exactly n_terms stars, two identical: singular
    ivar[:len(exponents), 3] = 1e4
    x[1] = x[0]
    out_fast = fast.cannon_train(exponents, x, flux, ivar)
    out_ref = reference.cannon_train(exponents, x, flux, ivar)
    assert_training_matches(out_fast, out_ref)
    assert list(out_fast[2]) == [PixelStatus.OK, PixelStatus.TOO_FEW_STARS,
                                 PixelStatus.TOO_FEW_STARS, PixelStatus.SINGULAR]
    assert np.all(np.isnan(out_fast[0][1:])) and np.all(np.isinf(out_fast[1][1:]))


@pytest.mark.parametrize("spread,rcond,status", [(7e-7, 8.3e-14, PixelStatus.SINGULAR),
                                                  (1e-6, 1.7e-13, PixelStatus.OK)])
def test_singular_at_the_condition_threshold(isa_core, spread, rcond, status):
    """A pixel is SINGULAR where its scaled Gram's reciprocal condition number is below 1e-13,
    however the core decides it (a proof from the Cholesky factor, else Eigen's estimate):
    one label at 1 + spread * N(0, 1) for 40 stars, the measured rcond just below and above
    the threshold. A bound of the condition looser by 2x (||G||_1 here) gets the first wrong."""
    rng = np.random.default_rng(5)
    x = 1.0 + spread * rng.normal(size=(40, 1))
    flux = 0.5 + 0.1 * x + rng.normal(size=(40, 1)) * 1e-3
    ivar = np.full((40, 1), 1e6)
    exponents = np.array([[0], [1]], dtype=np.int32)
    design = design_matrix(exponents, x)
    gram = design.T @ (ivar * design)
    scale = 1 / np.sqrt(np.diag(gram))
    np.testing.assert_allclose(1 / np.linalg.cond(gram * np.outer(scale, scale), 1), rcond,
                               rtol=0.05)
    for backend in (fast, reference):
        assert backend.cannon_train(exponents, x, flux, ivar, s2=np.zeros(1))[2][0] == status


def test_fixed_s2_and_censoring_match_reference(isa_core):
    exponents, x, flux, ivar = random_problem(120, 3, 9, 2, seed=7)
    mask = np.ones((9, len(exponents)), bool)
    mask[::2, exponents[:, 1] > 0] = False   # label 1's terms censored at even pixels
    s2 = np.linspace(0, 1e-4, 9)
    out_fast = fast.cannon_train(exponents, x, flux, ivar, term_mask=mask, s2=s2)
    out_ref = reference.cannon_train(exponents, x, flux, ivar, term_mask=mask, s2=s2)
    assert_training_matches(out_fast, out_ref)
    np.testing.assert_array_equal(out_fast[1], s2)
    assert np.all(out_fast[0][~mask] == 0.0)


@pytest.mark.parametrize("regularization", [0.0, 0.1, 3.0])
def test_restarted_s2_search_matches_reference(isa_core, non_convex_pixels, regularization):
    # pixels 0 and 1 restart from a lower value of the objective above their local minimum at
    # s2 = 0 (from above and from below the lower minimum); 3.0 zeroes the slope term
    exponents, x, flux, ivar = non_convex_pixels
    out_fast = fast.cannon_train(exponents, x, flux, ivar, regularization=regularization)
    out_ref = reference.cannon_train(exponents, x, flux, ivar, regularization=regularization)
    assert_training_matches(out_fast, out_ref)
    assert np.all(out_fast[1][:2] > 1.0) and out_fast[1][2] == 0.0


@pytest.mark.parametrize("regularization", [1e3, 1e5])
def test_l1_training_matches_reference(isa_core, regularization):
    exponents, x, flux, ivar = random_problem(100, 3, 6, 2, seed=8)
    out_fast = fast.cannon_train(exponents, x, flux, ivar, regularization=regularization)
    out_ref = reference.cannon_train(exponents, x, flux, ivar, regularization=regularization)
    # Coordinate descent stops at 1e-12 relative moves in both, from different warm starts
    # (Newton and Brent visit different s2): agreement ~1e-9 of theta's scale.
    np.testing.assert_array_equal(out_fast[2], out_ref[2])
    np.testing.assert_allclose(out_fast[0], out_ref[0], atol=1e-7 * np.abs(out_ref[0]).max())
    np.testing.assert_allclose(out_fast[1], out_ref[1], rtol=1e-6, atol=1e-14)
    np.testing.assert_array_equal(out_fast[0] == 0, out_ref[0] == 0)
    assert np.any(out_fast[0] == 0)  # the penalty really zeroes coefficients


@pytest.mark.parametrize("jacobian", [False, True])
def test_prediction_matches_reference(isa_core, jacobian):
    exponents, x, flux, ivar = random_problem(60, 4, 600, 3, seed=9)
    theta = fast.cannon_train(exponents, x, flux, ivar)[0]
    theta[5] = np.nan  # an untrained pixel stays NaN in predictions
    a = fast.cannon_predict(exponents, theta, x, jacobian=jacobian)
    b = reference.cannon_predict(exponents, theta, x, jacobian=jacobian)
    for out_a, out_b in zip(*(((a,), (b,)) if not jacobian else (a, b))):
        # same sums in a different order: rounding only
        np.testing.assert_allclose(out_a, out_b, rtol=1e-12, atol=1e-12)
        assert np.all(np.isnan(out_a[:, 5])) and np.all(np.isfinite(np.delete(out_a, 5, axis=1)))


def fit_problem(n_labels, order, n_spectra, seed, n_pixels=300):
    exponents, x, flux, ivar = random_problem(300, n_labels, n_pixels, order, seed)
    theta, s2, _ = fast.cannon_train(exponents, x, flux, ivar)
    _, x_new, flux_new, ivar_new = random_problem(n_spectra, n_labels, n_pixels, order, seed + 100)
    return exponents, theta, s2, flux_new, ivar_new, x_new


# LM tolerances: both backends take the same steps (same damping schedule and stopping rule);
# sums differ in order only, so the solutions agree to rounding amplified by the conditioning
# of J^T W J (~1e-12 here). Iteration counts can differ only if a chi2 comparison is decided
# by rounding; they are compared exactly and have been equal on every seed tried.
# Both objectives (the chi2 polynomial and the per-pixel sums; use_polynomial_form picks one
# by model size) are run on every case.
@pytest.mark.parametrize("objective", ["polynomial", "per_pixel"])
@pytest.mark.parametrize("n_labels,order,n_spectra,seed", [
    (1, 1, 3, 20), (1, 3, 5, 21), (3, 2, 17, 22), (4, 3, 9, 23), (3, 2, 1, 24), (10, 2, 20, 25)])
def test_fit_matches_reference(isa_core, monkeypatch, objective, n_labels, order, n_spectra, seed):
    for backend in (fast, reference):
        monkeypatch.setattr(backend.cannon, "use_polynomial_form", lambda *_: objective == "polynomial")
    exponents, theta, s2, flux, ivar, _ = fit_problem(n_labels, order, n_spectra, seed)
    starts = np.random.default_rng(seed).uniform(-1, 1, (n_spectra, 4, n_labels))
    a = fast.cannon_fit(exponents, theta, s2, flux, ivar, starts)
    b = reference.cannon_fit(exponents, theta, s2, flux, ivar, starts)
    np.testing.assert_allclose(a.x, b.x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.chi2, b.chi2, rtol=1e-10)
    np.testing.assert_allclose(a.covariance, b.covariance, rtol=1e-7, atol=1e-14)
    for field in ("n_used", "n_iter", "status"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert np.all(a.status == FitStatus.CONVERGED)


def test_fit_edge_cases_match_reference(isa_core):
    exponents, theta, s2, flux, ivar, _ = fit_problem(2, 2, 4, seed=30)
    theta[3] = np.nan            # untrained pixel: ignored
    s2[3] = np.inf
    ivar[1] = 0.0                # spectrum 1: no usable pixels
    flux[1] = np.nan
    ivar[2, 10:] = 0.0           # spectrum 2: few pixels
    lower, upper = np.array([-0.2, -1.0]), np.array([0.2, 1.0])  # spectrum fits hit the box
    a = fast.cannon_fit(exponents, theta, s2, flux, ivar, np.zeros(2), lower=lower, upper=upper)
    b = reference.cannon_fit(exponents, theta, s2, flux, ivar, np.zeros(2), lower=lower, upper=upper)
    np.testing.assert_allclose(a.x, b.x, atol=1e-9)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.n_used, b.n_used)
    assert a.status[1] == FitStatus.NO_PIXELS and np.all(np.isnan(a.covariance[1]))
    assert np.all((a.x >= lower) & (a.x <= upper))


def test_iteration_limit_is_reported(isa_core):
    exponents, theta, s2, flux, ivar, _ = fit_problem(3, 2, 3, seed=31)
    a = fast.cannon_fit(exponents, theta, s2, flux, ivar, np.full(3, 0.9), max_iter=1)
    b = reference.cannon_fit(exponents, theta, s2, flux, ivar, np.full(3, 0.9), max_iter=1)
    assert np.all(a.status == FitStatus.MAX_ITER) and np.all(a.n_iter == 1)
    np.testing.assert_allclose(a.x, b.x, atol=1e-9)


def test_polynomial_fit_does_not_depend_on_threads_or_batches(monkeypatch):
    # Above 1000 monomials (10 labels, quadratic: 1001) the core sizes its batches by the
    # spectra per thread: 40 spectra are one batch (48 rows) on 1 thread, batches of 32 and 8
    # on 2; fitted in two pieces, 17 and 23, one batch each. Every result must be the same.
    monkeypatch.setattr(fast.cannon, "use_polynomial_form", lambda *_: True)
    exponents, theta, s2, flux, ivar, _ = fit_problem(10, 2, 40, seed=41, n_pixels=120)
    starts = np.random.default_rng(41).uniform(-1, 1, (40, 2, 10))
    one = fast.cannon_fit(exponents, theta, s2, flux, ivar, starts, n_threads=1)
    two = fast.cannon_fit(exponents, theta, s2, flux, ivar, starts, n_threads=2)
    first, rest = (fast.cannon_fit(exponents, theta, s2, flux[part], ivar[part], starts[part],
                                   n_threads=1) for part in (slice(0, 17), slice(17, 40)))
    assert np.all(one.status == FitStatus.CONVERGED)
    for a, b, c, d in zip(one, two, first, rest):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.concatenate([c, d]))


def test_per_pixel_fit_does_not_depend_on_threads_or_batches(isa_core, monkeypatch):
    # The per-pixel objective evaluates all spectra still active in a batch together; a
    # spectrum's result must not depend on which others are still active. 13 pixels: 8 in a
    # vector strip and 5 in the padded remainder. Fits of up to ~40 LM steps show rounding
    # differences in the labels (before the fix they differed at 1e-8).
    monkeypatch.setattr(fast.cannon, "use_polynomial_form", lambda *_: False)
    exponents = PolynomialVectorizer(["A", "B", "C"], 2).exponents
    rng = np.random.default_rng(6)
    x = rng.uniform(-1, 1, (60, 3))
    flux = 1 + 0.1 * x[:, :1] + 0.05 * x[:, 1:2] ** 2 + rng.normal(0, 0.01, (60, 13))
    ivar = np.full(flux.shape, 1e4)
    theta, s2, _ = fast.cannon_train(exponents, x, flux, ivar)
    starts = np.tile(rng.uniform(-1, 1, (3, 3)), (20, 1, 1))
    flux, ivar = flux[:20], ivar[:20]
    whole = fast.cannon_fit(exponents, theta, s2, flux, ivar, starts, n_threads=1)
    assert whole.n_iter.max() > 40
    for rows, n_threads in (([11], 1), ([0, 11], 1), ([3, 5, 7, 11, 12], 1), (slice(None), 2),
                            (slice(0, 17), 2)):
        part = fast.cannon_fit(exponents, theta, s2, flux[rows], ivar[rows], starts[rows],
                               n_threads=n_threads)
        for a, b in zip(part, whole):
            np.testing.assert_array_equal(a, b[rows])


def test_one_and_two_threads_give_identical_results():
    exponents, x, flux, ivar = random_problem(300, 3, 200, 2, seed=40)
    one = fast.cannon_train(exponents, x, flux, ivar, n_threads=1)
    two = fast.cannon_train(exponents, x, flux, ivar, n_threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    one_l1 = fast.cannon_train(exponents, x, flux, ivar, regularization=100.0, n_threads=1)
    two_l1 = fast.cannon_train(exponents, x, flux, ivar, regularization=100.0, n_threads=2)
    for a, b in zip(one_l1, two_l1):
        np.testing.assert_array_equal(a, b)
    theta, s2 = one[0], one[1]
    starts = np.random.default_rng(1).uniform(-1, 1, (100, 3, 3))
    fit_flux, fit_ivar = flux[:100], ivar[:100]
    fit_one = fast.cannon_fit(exponents, theta, s2, fit_flux, fit_ivar, starts, n_threads=1)
    fit_two = fast.cannon_fit(exponents, theta, s2, fit_flux, fit_ivar, starts, n_threads=2)
    for a, b in zip(fit_one, fit_two):
        np.testing.assert_array_equal(a, b)
    pred_one = fast.cannon_predict(exponents, theta, x, jacobian=True, n_threads=1)
    pred_two = fast.cannon_predict(exponents, theta, x, jacobian=True, n_threads=2)
    for a, b in zip(pred_one, pred_two):
        np.testing.assert_array_equal(a, b)
