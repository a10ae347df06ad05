"""Link 1 of the test chain  oracle -> reference -> fast: ``starlabel.reference`` against
independent oracles (hand-written formulas, finite differences, ``np.linalg.lstsq``,
``scipy.optimize``), on small seeded problems.

The oracles never call the code under test to build their own answers: the design matrix
of the oracles is ``_oracle_design`` (a one-line product of powers, itself checked against
hand-written formulas below), and objectives are evaluated from their definitions.
"""

import math

import numpy as np
import pytest
from scipy.optimize import least_squares, minimize, minimize_scalar

from starlabel import CannonModel
from starlabel import reference as ref
from starlabel.reference.lm import FTOL
from starlabel.datasets import synthetic_survey
from starlabel.status import FitStatus, PixelStatus
from starlabel.vectorizer import PolynomialVectorizer, design_derivative, design_matrix

EPS = np.finfo(np.float64).eps
NAMES = ("TEFF", "LOGG", "FE_H")
CD_TOL = 1e-12  # the documented stopping rule of the L1 coordinate descent (TrainOptions::l1_tol)


# --------------------------------------------------------------------------------------
# independent building blocks of the oracles
# --------------------------------------------------------------------------------------

def _oracle_design(exponents, x):
    """v[n, k] = prod_a x[n, a] ** exponents[k, a], written independently of the package."""
    return np.prod(x[:, None, :] ** exponents[None, :, :], axis=2)


def _weights(ivar, s2):
    return ivar / (1.0 + ivar * s2)


def _theta_lstsq(design, flux, ivar, s2):
    """Weighted least squares by SVD on the sqrt(w)-weighted design (stars with ivar 0 dropped)."""
    used = ivar > 0
    sw = np.sqrt(_weights(ivar[used], s2))
    return np.linalg.lstsq(design[used] * sw[:, None], flux[used] * sw, rcond=None)[0]


def _profile(design, flux, ivar, s2):
    """Profile objective F(s2) = sum [w r^2 - ln w] with theta(s2) from lstsq.

    Returns F and sum |terms| (the scale of F's rounding error).
    """
    used = ivar > 0
    w = _weights(ivar[used], s2)
    r = flux[used] - design[used] @ _theta_lstsq(design, flux, ivar, s2)
    terms = w * r**2 - np.log(w)
    return terms.sum(), np.abs(terms).sum()


def _oracle_s2(design, flux, ivar):
    """Global minimiser of F on [0, hi]: a log grid with 0, then bounded Brent around the best."""
    used = ivar > 0
    r0 = flux[used] - design[used] @ _theta_lstsq(design, flux, ivar, 0.0)
    hi = 10.0 * np.mean(r0**2) + 10.0 / np.median(ivar[used])
    grid = np.concatenate([[0.0], np.geomspace(1e-12 * hi, hi, 400)])
    values = np.array([_profile(design, flux, ivar, s)[0] for s in grid])
    i = int(np.argmin(values))
    lo, up = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    # xatol far below F's resolution in s2, so the oracle is limited by rounding only
    res = minimize_scalar(lambda s: _profile(design, flux, ivar, s)[0], bounds=(lo, up),
                          method="bounded", options={"xatol": 1e-14 * up, "maxiter": 500})
    return (res.x, res.fun) if res.fun < values[i] else (grid[i], values[i])


def _heteroscedastic_pixels(seed, *, n_stars, s2_true, noise_scale, order=2, bad=0.05):
    """Per-pixel polynomial data with star-to-star varying ivar, some ivar = 0 (flux NaN).

    flux = v . theta_true + noise_scale * N(0, 1/ivar + s2_true); noise_scale < 1 makes a pixel
    under-dispersed (its maximum-likelihood s2 is then 0).
    """
    rng = np.random.default_rng(seed)
    exponents = PolynomialVectorizer(NAMES, order).exponents
    x = rng.uniform(-1.0, 1.0, (n_stars, len(NAMES)))
    n_pixels = len(s2_true)
    ivar = rng.uniform(0.3e4, 3e4, (n_stars, n_pixels))
    theta = np.column_stack([np.ones(n_pixels), rng.normal(0, 0.02, (n_pixels, len(exponents) - 1))])
    sigma = np.sqrt(1.0 / ivar + np.asarray(s2_true)) * np.asarray(noise_scale)
    flux = _oracle_design(exponents, x) @ theta.T + sigma * rng.standard_normal(ivar.shape)
    ignored = rng.random(ivar.shape) < bad
    ivar[ignored], flux[ignored] = 0.0, np.nan
    assert ignored.any()  # the data really exercise ivar = 0
    return exponents, x, flux, ivar


def _scaled(labels):
    """The package's documented default scaling (mean, 2.5-97.5 percentile range), by hand."""
    return (labels - labels.mean(axis=0)) / np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0)


# --------------------------------------------------------------------------------------
# 1. design matrix and its derivative
# --------------------------------------------------------------------------------------

# name -> (degree, hand-written column) for labels t = TEFF, g = LOGG, m = FE_H
HAND = {
    "1": (0, lambda c: np.ones_like(c["TEFF"])),
    "TEFF": (1, lambda c: c["TEFF"]),
    "LOGG": (1, lambda c: c["LOGG"]),
    "FE_H": (1, lambda c: c["FE_H"]),
    "TEFF^2": (2, lambda c: c["TEFF"] * c["TEFF"]),
    "TEFF*LOGG": (2, lambda c: c["TEFF"] * c["LOGG"]),
    "TEFF*FE_H": (2, lambda c: c["TEFF"] * c["FE_H"]),
    "LOGG^2": (2, lambda c: c["LOGG"] * c["LOGG"]),
    "LOGG*FE_H": (2, lambda c: c["LOGG"] * c["FE_H"]),
    "FE_H^2": (2, lambda c: c["FE_H"] * c["FE_H"]),
    "TEFF^3": (3, lambda c: c["TEFF"] * c["TEFF"] * c["TEFF"]),
    "TEFF^2*LOGG": (3, lambda c: c["TEFF"] * c["TEFF"] * c["LOGG"]),
    "TEFF^2*FE_H": (3, lambda c: c["TEFF"] * c["TEFF"] * c["FE_H"]),
    "TEFF*LOGG^2": (3, lambda c: c["TEFF"] * c["LOGG"] * c["LOGG"]),
    "TEFF*LOGG*FE_H": (3, lambda c: c["TEFF"] * c["LOGG"] * c["FE_H"]),
    "TEFF*FE_H^2": (3, lambda c: c["TEFF"] * c["FE_H"] * c["FE_H"]),
    "LOGG^3": (3, lambda c: c["LOGG"] * c["LOGG"] * c["LOGG"]),
    "LOGG^2*FE_H": (3, lambda c: c["LOGG"] * c["LOGG"] * c["FE_H"]),
    "LOGG*FE_H^2": (3, lambda c: c["LOGG"] * c["FE_H"] * c["FE_H"]),
    "FE_H^3": (3, lambda c: c["FE_H"] * c["FE_H"] * c["FE_H"]),
}


def _test_points(n_labels, seed):
    x = np.random.default_rng(seed).uniform(-1.5, 1.5, (12, n_labels))
    x[0] = 0.0          # 0 ** 0 must give 1 and d(x)/dx at 0 must give 1
    x[1, 0] = 0.0
    x[2] = -1.0
    return x


@pytest.mark.parametrize("n_labels", [2, 3])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_design_matrix_matches_hand_written_columns(order, n_labels):
    names = NAMES[:n_labels]
    vec = PolynomialVectorizer(names, order)
    x = _test_points(n_labels, seed=10 * order + n_labels)
    columns = dict(zip(names, x.T))
    expected_names = {k for k, (deg, _) in HAND.items()
                      if deg <= order and all(f.split("^")[0] in names for f in k.split("*") if k != "1")}
    assert len(vec.term_names) == math.comb(n_labels + order, order)
    assert set(vec.term_names) == expected_names and vec.term_names[0] == "1"
    v = design_matrix(vec.exponents, x)
    assert v.shape == (len(x), len(expected_names))
    for k, name in enumerate(vec.term_names):
        # each column is a product of <= 3 factors: a few roundings of eps/2 each
        np.testing.assert_allclose(v[:, k], HAND[name][1](columns), rtol=8 * EPS, atol=0,
                                   err_msg=name)
    # the oracles' own design function agrees with the hand-written columns too
    np.testing.assert_allclose(_oracle_design(vec.exponents, x), v, rtol=8 * EPS, atol=0)  # as above


def test_explicit_terms_give_their_hand_written_columns():
    vec = PolynomialVectorizer(NAMES, terms=["LOGG*TEFF^2", "FE_H", "TEFF^3", "LOGG^2*FE_H"])
    x = _test_points(3, seed=7)
    c = dict(zip(NAMES, x.T))
    expected = np.column_stack([np.ones(len(x)), c["TEFF"] ** 2 * c["LOGG"], c["FE_H"],
                                c["TEFF"] ** 3, c["LOGG"] ** 2 * c["FE_H"]])
    # products of <= 3 factors, as above
    np.testing.assert_allclose(vec.design_matrix(x), expected, rtol=8 * EPS, atol=0)


@pytest.mark.parametrize("n_labels", [2, 3])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_design_derivative_matches_central_differences(order, n_labels):
    exponents = PolynomialVectorizer(NAMES[:n_labels], order).exponents
    x = _test_points(n_labels, seed=100 + 10 * order + n_labels)
    dv = design_derivative(exponents, x)
    assert dv.shape == (len(x), len(exponents), n_labels)
    h = 1e-5
    for a in range(n_labels):
        step = np.zeros(n_labels)
        step[a] = h
        fd = (design_matrix(exponents, x + step) - design_matrix(exponents, x - step)) / (2 * h)
        # truncation h^2 |v'''|/6 <= 1e-10 for cubics on |x| <= 1.5, rounding ~eps*|v|/h ~ 1e-10
        np.testing.assert_allclose(dv[:, :, a], fd, rtol=0, atol=1e-8)
    # the constant term has zero derivative, exactly; linear terms have derivative 1, exactly
    assert np.all(dv[:, 0, :] == 0)
    for a in range(n_labels):
        np.testing.assert_array_equal(dv[:, 1 + a, :], np.broadcast_to(np.eye(n_labels)[a], (len(x), n_labels)))


def test_cannon_predict_and_its_jacobian_against_oracle_design_and_differences():
    rng = np.random.default_rng(3)
    exponents = PolynomialVectorizer(NAMES, 3).exponents
    theta = rng.normal(0, 1, (7, len(exponents)))
    x = _test_points(3, seed=4)
    flux, jac = ref.cannon_predict(exponents, theta, x, jacobian=True)
    terms = _oracle_design(exponents, x)
    scale = np.abs(terms) @ np.abs(theta).T
    # a sum of 20 products: rounding <= ~20 eps * sum |terms|
    assert np.all(np.abs(flux - terms @ theta.T) <= 32 * EPS * scale)
    h = 1e-5
    for a in range(3):
        step = np.zeros(3)
        step[a] = h
        fd = (ref.cannon_predict(exponents, theta, x + step)
              - ref.cannon_predict(exponents, theta, x - step)) / (2 * h)
        # truncation h^2 sum|theta| |v'''|/6 ~ 1e-9, rounding ~eps*|flux|/h ~ 1e-9
        np.testing.assert_allclose(jac[:, :, a], fd, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------
# 2. theta at fixed s2 against lstsq
# --------------------------------------------------------------------------------------

def _assert_theta_matches_lstsq(theta_ref, design, flux, ivar, s2):
    used = ivar > 0
    sw = np.sqrt(_weights(ivar[used], s2))
    a = design[used] * sw[:, None]
    col = np.linalg.norm(a, axis=0)          # Jacobi scaling: compare u = theta * |column|
    theta_or = _theta_lstsq(design, flux, ivar, s2)
    cond = np.linalg.cond(a / col)
    assert cond < 1e3  # keeps the bound below meaningful (it is ~10 here)
    err = np.linalg.norm((theta_ref - theta_or) * col)
    # normal equations: forward error <= cond(scaled Gram) eps = cond(A_scaled)^2 eps; x10 margin
    assert err <= 10 * cond**2 * EPS * np.linalg.norm(theta_or * col)


@pytest.mark.parametrize("s2", [0.0, 1e-5, 1e-4, 1e-2, "per-pixel"])
def test_theta_at_fixed_s2_matches_weighted_lstsq(s2):
    exponents, x, flux, ivar = _heteroscedastic_pixels(
        1, n_stars=40, s2_true=[0, 1e-4, 1e-3, 1e-2, 0], noise_scale=[1, 1, 1, 1, 0.5])
    s2_pixels = (np.array([0.0, 3e-5, 1e-3, 2e-2, 0.0]) if s2 == "per-pixel"
                 else np.full(flux.shape[1], s2))
    theta, s2_out, status = ref.cannon_train(exponents, x, flux, ivar,
                                             s2=s2_pixels if s2 == "per-pixel" else s2)
    assert np.all(status == PixelStatus.OK)
    np.testing.assert_array_equal(s2_out, s2_pixels)  # a given s2 is kept, not re-estimated
    design = _oracle_design(exponents, x)
    for p in range(flux.shape[1]):
        _assert_theta_matches_lstsq(theta[p], design, flux[:, p], ivar[:, p], s2_pixels[p])


def test_censored_terms_are_zero_and_free_terms_match_lstsq_on_free_columns():
    exponents, x, flux, ivar = _heteroscedastic_pixels(
        2, n_stars=40, s2_true=[1e-4] * 3, noise_scale=[1] * 3)
    names = PolynomialVectorizer(NAMES, 2).term_names
    mask = np.ones((3, len(exponents)), bool)
    mask[0, [k for k, n in enumerate(names) if "FE_H" in n]] = False
    mask[1, [k for k, n in enumerate(names) if "LOGG" in n or "^2" in n]] = False
    theta, _, status = ref.cannon_train(exponents, x, flux, ivar, term_mask=mask, s2=1e-4)
    assert np.all(status == PixelStatus.OK)
    design = _oracle_design(exponents, x)
    for p in range(3):
        assert np.all(theta[p, ~mask[p]] == 0)
        _assert_theta_matches_lstsq(theta[p, mask[p]], design[:, mask[p]], flux[:, p], ivar[:, p], 1e-4)


# --------------------------------------------------------------------------------------
# 3. s2 against a 1-D optimiser of the profile objective
# --------------------------------------------------------------------------------------

def _controlled_s2_data():
    exponents, x, flux, ivar = _heteroscedastic_pixels(
        5, n_stars=40, s2_true=[0, 0, 3e-4, 1e-3, 1e-2, 3e-5],
        noise_scale=[0.5, 0.6, 1, 1, 1, 1])
    return exponents, x, flux, ivar


def _survey_s2_data():
    # toy-physics spectra: real model misfit, per-star S/N 30-300, 5% ignored pixels
    snr = np.random.default_rng(3).uniform(30, 300, 60)
    s = synthetic_survey(60, n_pixels=40, snr=snr, seed=4, bad_pixel_fraction=0.05)
    return PolynomialVectorizer(s.label_names, 2).exponents, _scaled(s.labels), s.flux, s.ivar


@pytest.mark.parametrize("data", [_controlled_s2_data, _survey_s2_data], ids=["controlled", "survey"])
def test_s2_minimises_the_profile_objective(data):
    exponents, x, flux, ivar = data()
    theta, s2, status = ref.cannon_train(exponents, x, flux, ivar)
    assert np.all(status == PixelStatus.OK)
    # the data exercise both an interior optimum and the boundary s2 = 0
    assert np.sum(s2 == 0) >= 2 and np.sum(s2 > 0) >= 2
    design = _oracle_design(exponents, x)
    for p in range(flux.shape[1]):
        f, iv = flux[:, p], ivar[:, p]
        s2_or, f_or = _oracle_s2(design, f, iv)
        f_ref, magnitude = _profile(design, f, iv, s2[p])
        # F is a sum of n_stars rounded terms (theta from lstsq, O(cond eps)): 100 eps * sum|terms|
        assert f_ref <= f_or + 100 * EPS * magnitude, p
        # the returned theta is theta(s2) (checked against lstsq as in oracle 2)
        _assert_theta_matches_lstsq(theta[p], design, f, iv, s2[p])
        if s2[p] > 0:
            # F is flat at its minimum: the oracle's minimiser is good to ~sqrt(eps * |F| / F'')
            # relative, observed <= 1e-7 here
            assert abs(s2[p] - s2_or) <= 1e-5 * s2_or, (p, s2[p], s2_or)
            assert _profile(design, f, iv, 0.0)[0] > f_ref  # and s2 > 0 really is better than 0
        else:
            hi = 1.0 / np.median(iv[iv > 0])
            # the oracle's minimiser is at the boundary too: within its first grid step
            # (1e-12 of its range, i.e. ~1e-11/ivar)
            assert s2_or <= 1e-10 * hi
            f0 = _profile(design, f, iv, 0.0)[0]
            for h in (1e-8 * hi, 1e-4 * hi, 1e-1 * hi):
                # F increasing at 0: F(h) - F(0) ~ F'(0) h with F'(0) ~ (0.05-0.8) n ivar here,
                # > 1e3 x the rounding of F (100 eps sum|terms|) even at the smallest h
                assert _profile(design, f, iv, h)[0] > f0, (p, h)


def test_s2_is_the_global_minimum_of_a_non_convex_profile(non_convex_pixels):
    # precise stars hold a local minimum at s2 = 0 (F'(0) >= 0); the scatter of the rest gives
    # a lower one further out (pixel 0: F(0) = 62.4, F(6.17) = 35.6), except in pixel 2
    exponents, x, flux, ivar = non_convex_pixels
    _, s2, status = ref.cannon_train(exponents, x, flux, ivar)
    assert np.all(status == PixelStatus.OK)
    design = _oracle_design(exponents, x)
    for p in range(flux.shape[1]):
        def profile(s):
            return _profile(design, flux[:, p], ivar[:, p], s)[0]

        s2_or, f_or = _oracle_s2(design, flux[:, p], ivar[:, p])
        f_ref, magnitude = _profile(design, flux[:, p], ivar[:, p], s2[p])
        assert f_ref <= f_or + 100 * EPS * magnitude, p  # as in the test above
        assert profile(1e-9) > profile(0.0), p  # the local minimum at 0, met first
        if p < 2:
            assert f_ref < profile(0.0) - 1.0, p
            assert abs(s2[p] - s2_or) <= 1e-5 * s2_or, (p, s2[p], s2_or)
        else:
            assert s2[p] == 0.0 and s2_or <= 1e-10


# --------------------------------------------------------------------------------------
# 4. L1 regularisation against L-BFGS-B on split variables, and the KKT conditions
# --------------------------------------------------------------------------------------

S2_L1 = 1e-4


def _l1_data():
    exponents, x, flux, ivar = _heteroscedastic_pixels(
        2, n_stars=50, s2_true=[S2_L1] * 4, noise_scale=[1] * 4)
    return exponents, x, flux, ivar, _oracle_design(exponents, x), exponents.any(axis=1)


def _lambda_max(design, f, w, penalized):
    """Smallest strength at which theta = (weighted mean, 0, ..., 0) satisfies the KKT conditions."""
    c0 = np.sum(w * f) / np.sum(w)
    return np.max(np.abs(2 * design[:, penalized].T @ (w * (f - c0)))), c0


def _l1_objective(theta, design, f, w, reg, penalized):
    r = f - design @ theta
    return np.sum(w * r**2) + reg * np.sum(np.abs(theta[penalized]))


def _l1_oracle(design, f, w, reg, penalized):
    """L-BFGS-B on theta = [t0, t_plus - t_minus], t_plus, t_minus >= 0 (a smooth problem)."""
    k = int(penalized.sum())
    assert penalized[0] == 0 and np.all(penalized[1:])

    def fun(z):
        theta = np.concatenate([z[:1], z[1:k + 1] - z[k + 1:]])
        r = f - design @ theta
        g = -2 * design.T @ (w * r)
        return np.sum(w * r**2) + reg * np.sum(z[1:]), np.concatenate([g[:1], g[1:] + reg, reg - g[1:]])

    z0 = np.zeros(2 * k + 1)
    z0[0] = np.sum(w * f) / np.sum(w)
    # the tightest settings L-BFGS-B accepts: stop on rounding-level changes only
    res = minimize(fun, z0, jac=True, method="L-BFGS-B", bounds=[(None, None)] + [(0, None)] * (2 * k),
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 100000, "maxfun": 100000,
                            "maxcor": 30})
    return np.concatenate([res.x[:1], res.x[1:k + 1] - res.x[k + 1:]])


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_l1_solution_matches_split_variable_lbfgsb_and_kkt(fraction):
    exponents, x, flux, ivar, design, penalized = _l1_data()
    for p in range(flux.shape[1]):
        used = ivar[:, p] > 0
        v, f, w = design[used], flux[used, p], _weights(ivar[used, p], S2_L1)
        reg = fraction * _lambda_max(v, f, w, penalized)[0]
        theta, s2, status = ref.cannon_train(exponents, x, flux[:, [p]], ivar[:, [p]],
                                             regularization=reg, s2=S2_L1)
        assert status[0] == PixelStatus.OK and s2[0] == S2_L1
        theta = theta[0]
        oracle = _l1_oracle(v, f, w, reg, penalized)
        obj_ref = _l1_objective(theta, v, f, w, reg, penalized)
        obj_or = _l1_objective(oracle, v, f, w, reg, penalized)
        # the reference must be at least as good as a generic solver, up to rounding of the sum
        assert obj_ref <= obj_or * (1 + 1e-9) + 1e-12, (p, obj_ref, obj_or)
        # sparsity really is exercised: some but not all penalized coefficients vanish
        zero = theta == 0
        assert 1 <= np.sum(zero & penalized) < penalized.sum(), (p, theta)
        # L-BFGS-B's bound-active variables: |theta| <= 1e-6 max|theta| is "zero" (it agrees with
        # the reference to ~1e-10 elsewhere)
        oracle_zero = np.abs(oracle) <= 1e-6 * np.abs(oracle).max()
        np.testing.assert_array_equal(zero, oracle_zero, err_msg=f"pixel {p}")
        # KKT conditions of the exact problem, solver-free
        grad = 2 * v.T @ (w * (f - v @ theta))           # minus the gradient of sum w r^2
        col = np.sqrt(np.sum(w[:, None] * v**2, axis=0))  # Jacobi scales 1/d_k
        u_max = max(1.0, np.max(np.abs(theta * col)))
        # CD stops when no scaled coefficient moves > CD_TOL*max(1,|u|); each of the other
        # n_terms-1 moves shifts the scaled gradient by <= 2*move; plus rounding of grad
        rounding = 16 * EPS * (np.abs(v).T @ (w * (np.abs(f) + np.abs(v) @ np.abs(theta))))
        tol = 2 * (len(theta) - 1) * CD_TOL * u_max * col + rounding
        assert abs(grad[0]) <= tol[0]
        nonzero = ~zero & penalized
        assert np.all(np.abs(grad[nonzero] - reg * np.sign(theta[nonzero])) <= tol[nonzero])
        assert np.all(np.abs(grad[zero & penalized]) <= reg + tol[zero & penalized])


def test_l1_at_and_above_lambda_max_zeroes_every_penalized_term_exactly():
    exponents, x, flux, ivar, design, penalized = _l1_data()
    for p in range(flux.shape[1]):
        used = ivar[:, p] > 0
        w = _weights(ivar[used, p], S2_L1)
        lam, c0 = _lambda_max(design[used], flux[used, p], w, penalized)
        for reg in (1.01 * lam, 1e12 * lam):
            theta, _, status = ref.cannon_train(exponents, x, flux[:, [p]], ivar[:, [p]],
                                                regularization=reg, s2=S2_L1)
            assert status[0] == PixelStatus.OK
            assert np.all(theta[0, 1:] == 0), (p, reg, theta)
            # the constant is the weighted mean: a sum of ~50 terms, rounding ~50 eps
            np.testing.assert_allclose(theta[0, 0], c0, rtol=1e-13)
        # and just below lambda_max the penalty no longer zeroes everything
        theta, _, _ = ref.cannon_train(exponents, x, flux[:, [p]], ivar[:, [p]],
                                       regularization=0.99 * lam, s2=S2_L1)
        assert np.any(theta[0, 1:] != 0)


# --------------------------------------------------------------------------------------
# 5. the test step against scipy.optimize.least_squares
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_model():
    train = synthetic_survey(80, n_pixels=150, snr=100, seed=11)
    exponents = PolynomialVectorizer(train.label_names, 2).exponents
    theta, s2, status = ref.cannon_train(exponents, _scaled(train.labels), train.flux, train.ivar)
    assert np.all(status == PixelStatus.OK)
    return exponents, theta, s2


@pytest.mark.parametrize("terms", [2, 3, ["A", "B^4", "A*B*C", "C^2"]])
def test_chi2_polynomial_is_chi2(terms):
    """The chi2 polynomial (starlabel._chi2_polynomial) against chi2 summed over the pixels:
    its value, its gradient -2 J^T W r, and its Hessian 2 (J^T W J - sum_p w_p r_p d2 f_p),
    with d2 f from central differences of an independent design derivative."""
    from starlabel._chi2_polynomial import chi2_polynomial
    from starlabel.reference.cannon import polynomial_objective
    order, names = (terms, None) if isinstance(terms, int) else (2, terms)
    exps = PolynomialVectorizer(["A", "B", "C"], order, terms=names).exponents
    rng = np.random.default_rng(3)
    n_pixels, n_labels = 40, 3
    theta = rng.normal(size=(n_pixels, len(exps)))
    x0 = rng.uniform(-0.5, 0.5, n_labels)
    flux = _oracle_design(exps, x0[None])[0] @ theta.T + 0.01 * rng.normal(size=n_pixels)
    weight = rng.uniform(0.5, 2.0, n_pixels) * 1e4
    weight[:3] = 0.0
    objective = polynomial_objective(chi2_polynomial(exps), theta, flux, weight)
    x = x0 + 1e-3 * rng.normal(size=n_labels)   # near the minimum: the Hessian is positive definite
    chi2, n_used, hess, grad = objective(x, True)
    resid = flux - _oracle_design(exps, x[None])[0] @ theta.T

    def jac(xx):  # d f / dx (n_pixels, n_labels), by central differences of the design
        h = 1e-6
        return np.column_stack([(_oracle_design(exps, (xx + h * e)[None])[0]
                                 - _oracle_design(exps, (xx - h * e)[None])[0]) / (2 * h) @ theta.T
                                for e in np.eye(n_labels)])

    j = jac(x)
    h = 1e-4
    d2f = np.stack([(jac(x + h * e) - jac(x - h * e)) / (2 * h) for e in np.eye(n_labels)], axis=2)
    assert n_used == n_pixels - 3
    # observed: chi2 3e-12 relative (f^T W f / chi2 ~ 1e4 cancels in the polynomial), the
    # gradient 3e-11 and the Hessian 2e-10 of their largest entry (the central differences'
    # rounding, eps |f| / h); bounds 30-50x those
    np.testing.assert_allclose(chi2, np.sum(weight * resid**2), rtol=1e-10)
    np.testing.assert_allclose(grad, j.T @ (weight * resid), rtol=0, atol=1e-9 * np.abs(grad).max())
    expected = j.T @ (weight[:, None] * j) - np.einsum("p,pab->ab", weight * resid, d2f)
    np.testing.assert_allclose(hess, expected, rtol=0, atol=1e-8 * np.abs(hess).max())
    assert objective(x, False)[0] == chi2


def test_fit_matches_scipy_least_squares(noisy_model):
    exponents, theta, s2 = noisy_model
    theta, s2 = theta.copy(), s2.copy()
    theta[7], s2[7] = np.nan, np.inf            # an untrained pixel is ignored
    trained = np.isfinite(s2)
    test = synthetic_survey(6, n_pixels=150, snr=50, seed=12, bad_pixel_fraction=0.05)
    start = np.zeros(3)
    sol = ref.cannon_fit(exponents, theta, s2, test.flux, test.ivar, start)
    assert np.all(sol.status == FitStatus.CONVERGED)
    for i in range(len(test.flux)):
        used = (test.ivar[i] > 0) & trained
        assert sol.n_used[i] == used.sum()
        f = test.flux[i, used]
        sw = np.sqrt(_weights(test.ivar[i, used], s2[used]))
        th = theta[used]

        def model(xx, th=th):
            return _oracle_design(exponents, xx[None, :])[0] @ th.T

        def resid(xx, f=f, sw=sw, th=th):
            return sw * (f - model(xx))

        def jac(xx, sw=sw, th=th):
            return -sw[:, None] * ref.cannon_predict(exponents, th, xx, jacobian=True)[1][0]

        # MINPACK at (near) machine-precision stopping tolerances
        lsq = least_squares(resid, start, jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        assert lsq.success
        chi2_or = 2 * lsq.cost
        # the reported chi2 is the chi2 at the reported x, from an exact residual pass at the
        # solution also where LM ran on the chi2 polynomial (starlabel._chi2_polynomial)
        np.testing.assert_allclose(sol.chi2[i], np.sum(resid(sol.x[i]) ** 2), rtol=1e-10)
        # at least as good as MINPACK, up to LM's relative-decrease stopping rule (1e-10)
        assert sol.chi2[i] <= chi2_or * (1 + 1e-8), (i, sol.chi2[i], chi2_or)
        sigma = np.sqrt(np.diag(sol.covariance[i]))
        # labels agree far inside their uncertainties: LM stops once the Newton decrement
        # (dx/sigma)^2 is <= FTOL * chi2, so each label is within sqrt(FTOL * chi2) sigma
        # (~1e-3 here) of the minimum
        bound = np.sqrt(FTOL * sol.chi2[i]) * sigma
        assert np.all(np.abs(sol.x[i] - lsq.x) <= bound), (i, (sol.x[i] - lsq.x) / bound)
        # covariance vs inv(J^T W J) of scipy's Jacobian at scipy's x, in correlation units:
        # it moves by O(|dx|/scale of curvature) between the two solutions, observed <= 5e-7
        cov_or = np.linalg.inv(lsq.jac.T @ lsq.jac)
        norm = np.sqrt(np.outer(np.diag(cov_or), np.diag(cov_or)))
        assert np.all(np.abs(sol.covariance[i] - cov_or) <= 1e-4 * norm)
        # and vs a central-difference Jacobian at the reference's own x: the model is quadratic,
        # so only rounding ~eps*|flux|/h ~ 1e-10 relative remains
        h = 1e-5
        j_fd = np.column_stack([(resid(sol.x[i] + h * e) - resid(sol.x[i] - h * e)) / (2 * h)
                                for e in np.eye(3)])
        cov_fd = np.linalg.inv(j_fd.T @ j_fd)
        norm = np.sqrt(np.outer(np.diag(cov_fd), np.diag(cov_fd)))
        assert np.all(np.abs(sol.covariance[i] - cov_fd) <= 1e-7 * norm)


def test_bounded_fit_reaches_the_constrained_minimum():
    # linear model f = 1 + a x0 + b x1 on 3 pixels; truth (0, 1) lies outside x1 <= 0
    exponents = np.array([[0, 0], [1, 0], [0, 1]], np.int32)
    theta = np.array([[1.0, 1.0, 0.9], [1.0, 0.9, 1.0], [1.0, 0.2, -0.3]])
    flux = _oracle_design(exponents, np.array([[0.0, 1.0]])) @ theta.T
    ivar, s2 = np.ones((1, 3)), np.zeros(3)
    upper = np.array([np.inf, 0.0])
    sol = ref.cannon_fit(exponents, theta, s2, flux, ivar, np.zeros(2), upper=upper)
    # bounded trust-region reflective at (near) machine-precision stopping tolerances
    lsq = least_squares(lambda xx: flux[0] - _oracle_design(exponents, xx[None])[0] @ theta.T,
                        np.zeros(2), method="trf", bounds=([-np.inf, -np.inf], upper),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert sol.status[0] == FitStatus.CONVERGED
    # as in the unbounded comparison (reference: x = (0.0067, 0), chi2 = 1.877; optimum
    # x = (0.9405, 0), chi2 = 0.263)
    assert sol.chi2[0] <= 2 * lsq.cost * (1 + 1e-8)


# --------------------------------------------------------------------------------------
# 6. noiseless recovery and 7. covariance calibration, on a model trained by CannonModel
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noiseless_model():
    train = synthetic_survey(100, n_pixels=200, snr=None, seed=21)
    model = CannonModel(train.label_names, 2, backend="reference").train(train.labels, train.flux,
                                                                       train.ivar)
    assert np.all(model.pixel_status == PixelStatus.OK)
    return model, model.vectorizer.scale(train.labels)


def _labels_inside_training_set(x_train, n, rng):
    """Random points on segments between training stars: inside the training range."""
    i, j = rng.integers(len(x_train), size=(2, n))
    a = rng.random((n, 1))
    return a * x_train[i] + (1 - a) * x_train[j]


def test_noiseless_model_spectra_give_back_their_labels(noiseless_model):
    model, x_train = noiseless_model
    exponents = model.vectorizer.exponents
    x_true = _labels_inside_training_set(x_train, 40, np.random.default_rng(5))
    flux = ref.cannon_predict(exponents, model.theta, x_true)
    ivar = np.full(flux.shape, 1e4)
    sol = ref.cannon_fit(exponents, model.theta, model.s2, flux, ivar,
                         model.vectorizer.scale(model.initial_labels))
    assert np.all(sol.status == FitStatus.CONVERGED)
    # chi2 = 0 is attainable; LM stops at steps <= 1e-10 after quadratic convergence
    np.testing.assert_allclose(sol.x, x_true, rtol=0, atol=1e-8)
    # the same through the public class, in physical units
    result = model.fit_labels(flux, ivar)
    assert np.all(result.status == FitStatus.CONVERGED)
    np.testing.assert_allclose((result.labels - model.vectorizer.unscale(x_true)) / model.vectorizer.scales,
                               0, atol=1e-8)  # as above, in scaled units


def test_pulls_of_noisy_model_spectra_have_unit_width(noiseless_model):
    model, x_train = noiseless_model
    exponents = model.vectorizer.exponents
    rng = np.random.default_rng(6)
    n = 200
    x_true = _labels_inside_training_set(x_train, n, rng)
    ivar = np.full((n, model.n_pixels), 2500.0)
    # intrinsic scatter comparable to the noise, so that the weights 1/(1/ivar + s2) matter
    s2 = model.s2 + rng.uniform(0.0, 2.0, model.n_pixels) / 2500.0
    flux = (ref.cannon_predict(exponents, model.theta, x_true)
            + rng.standard_normal(ivar.shape) * np.sqrt(1.0 / ivar + s2))
    sol = ref.cannon_fit(exponents, model.theta, s2, flux, ivar,
                         model.vectorizer.scale(model.initial_labels))
    assert np.all(sol.status == FitStatus.CONVERGED)
    pulls = (sol.x - x_true) / np.sqrt(np.diagonal(sol.covariance, axis1=1, axis2=2))
    # N = 200: the sample std scatters by 1/sqrt(2N) = 0.05, so [0.8, 1.2] is a 4-sigma band
    assert np.all((pulls.std(axis=0) > 0.8) & (pulls.std(axis=0) < 1.2)), pulls.std(axis=0)
    # the sample mean scatters by 1/sqrt(N) = 0.07: 0.3 is a 4-sigma band
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.3), pulls.mean(axis=0)
