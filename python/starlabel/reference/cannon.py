"""The Cannon in plain NumPy: the twin of cannon_train.hpp, cannon_model.hpp and lm.hpp.

Training works pixel by pixel: theta by weighted normal equations with Jacobi scaling (or
by coordinate descent with an L1 penalty), s2 by Brent's method on the derivative of the
profile objective (the compiled core uses a Newton iteration on the same function). Every
local minimum of s2 is checked for a lower value of the objective above it, as in the core's
ProfileCheck, and the search restarts from there.
"""

import numpy as np
from scipy.optimize import brentq

from .. import _validation as check
from ..result import LMSolution
from ..status import PixelStatus
from .._chi2_polynomial import chi2_polynomial, use_polynomial_form
from ..vectorizer import design_derivative, design_matrix
from .lm import fit_one, pixel_objective

RCOND_MIN = 1e-13     # as TrainOptions::rcond_min
S2_RTOL = 1e-12
L1_TOL = 1e-12        # as TrainOptions::l1_tol
L1_MAX_SWEEPS = 20000
S2_MAX_RESTARTS = 3   # as TrainOptions::s2_max_restarts
CHECK_GRID = 4.0 ** -np.arange(12)   # as ProfileCheck: multiples of the largest r^2
CHECK_TOLERANCE = 1e-8


def _solve_theta(design, weight, flux, regularization, penalized, warm):
    """theta minimising sum w r^2 + regularization * sum_penalized |theta|.

    Returns (theta, ok, converged); ok is False when the system is singular.
    """
    gram = design.T @ (weight[:, None] * design)
    rhs = design.T @ (weight * flux)
    diag = np.diag(gram)
    if np.any(diag <= 0) or not np.all(np.isfinite(gram)):
        return None, False, True
    d = 1.0 / np.sqrt(diag)
    scaled = d[:, None] * gram * d[None, :]
    if regularization == 0:
        if 1.0 / np.linalg.cond(scaled, 1) < RCOND_MIN:
            return None, False, True
        return d * np.linalg.solve(scaled, d * rhs), True, True
    # cyclic coordinate descent on u = theta / d, where the scaled Gram has a unit diagonal
    b = d * rhs
    half_penalty = np.where(penalized, 0.5 * regularization * d, 0.0)
    u = warm / d
    for _ in range(L1_MAX_SWEEPS):
        largest_move = largest_u = 0.0
        for k in range(len(u)):
            rho = b[k] - (scaled[k] @ u - u[k])
            new = np.sign(rho) * max(abs(rho) - half_penalty[k], 0.0)
            largest_move = max(largest_move, abs(new - u[k]))
            largest_u = max(largest_u, abs(new))
            u[k] = new
        if largest_move <= L1_TOL * max(1.0, largest_u):
            return d * u, True, True
    return d * u, True, False


def _root_above(g, lo, hi):
    """The root of g (= -dF/ds2, > 0 at lo) in [lo, hi], hi first grown by factors of 4
    until g(hi) <= 0."""
    while g(hi) > 0:
        hi *= 4.0
    return brentq(g, lo, hi, xtol=1e-300, rtol=S2_RTOL)


def _lower_point(iv, resid, s2_found):
    """An s2 above the local minimum s2_found where the profile objective F is provably lower.

    Holding theta at theta(s2_found) bounds F from above by G(s) = sum [w(s) r^2 - ln w(s)],
    which equals F at s2_found; G is evaluated on CHECK_GRID times the largest r^2 (above which
    G only grows). Returns the grid point with the lowest G when that is below
    F(s2_found) - CHECK_TOLERANCE * n_used, else None.
    """
    used = iv > 0
    iv, r2 = iv[used], resid[used] ** 2
    if not 0 < r2.max() < np.inf:
        return None
    grid = s2_found + r2.max() * CHECK_GRID
    ratio = (1.0 + iv[:, None] * grid) / (1.0 + iv[:, None] * s2_found)   # w(s2_found) / w(s)
    bounds = (np.sum((iv * r2)[:, None] / (1.0 + iv[:, None] * grid), axis=0)
              - np.sum(iv * r2 / (1.0 + iv * s2_found)) + np.sum(np.log(ratio), axis=0))
    k = int(np.argmin(bounds))
    return grid[k] if bounds[k] < -CHECK_TOLERANCE * used.sum() else None


def _lower_minimum(objective, s2_start, s2_floor):
    """A local minimum of F reached from s2_start, where F(s2_start) < F(s2_floor).

    objective(s2) -> (g, F), g = -dF/ds2. Where F falls at s2_start the minimum is above it;
    where it rises, F must fall somewhere in (s2_floor, s2_start), and bisection keeps such an
    interval until it finds a point where F falls. Returns None when that fails.
    """
    g, f = objective(s2_start)
    if g == 0:
        return s2_start
    if g > 0:
        return _root_above(lambda s: objective(s)[0], s2_start, 4.0 * s2_start)
    floor, hi, f_hi = s2_floor, s2_start, f
    while hi - floor > S2_RTOL * hi:
        mid = 0.5 * (floor + hi)
        g, f = objective(mid)
        if g == 0:
            return mid
        if g > 0:
            return brentq(lambda s: objective(s)[0], mid, hi, xtol=1e-300, rtol=S2_RTOL)
        if f > f_hi:
            floor = mid
        else:
            hi, f_hi = mid, f
    return None


class _Abandoned(Exception):
    """A restart's L1 solve did not converge."""


def _lowest_minimum(objective, value, state, iv, s2_found):
    """The lowest local minimum of F found by restarting, at most S2_MAX_RESTARTS times, from
    a provably lower value above the local minimum s2_found (whose theta and residuals are in
    state); theta(s2) of the result is left in state. A restart whose L1 solve does not
    converge, or whose Gram is singular, is abandoned."""
    def converged_objective(s2_value):
        result = objective(s2_value)
        if not state["converged"]:
            raise _Abandoned
        return result

    for _ in range(S2_MAX_RESTARTS):
        s2_lower = _lower_point(iv, state["resid"], s2_found)
        if s2_lower is None:
            break
        theta_found, f_found = state["theta"].copy(), value(s2_found)
        try:
            s2_new = _lower_minimum(converged_objective, s2_lower, s2_found)
            f_new = np.inf if s2_new is None else converged_objective(s2_new)[1]
        except (np.linalg.LinAlgError, _Abandoned):   # the minimum found stands
            f_new = np.inf
        if not f_new < f_found:
            state.update(theta=theta_found, converged=True)
            break
        s2_found = s2_new
    return s2_found


def cannon_train(exponents, x, flux, ivar, *, regularization=0.0, term_mask=None, s2=None,
                 n_threads=None):
    """Train every pixel of a Cannon model; see starlabel.fast.cannon_train."""
    exponents, x, flux, ivar, regularization, term_mask, fixed_s2 = check.training_arguments(
        exponents, x, flux, ivar, regularization, term_mask, s2, n_threads)
    design = design_matrix(exponents, x)
    n_pixels, n_terms = flux.shape[1], exponents.shape[0]
    penalized = exponents.any(axis=1)
    theta = np.full((n_pixels, n_terms), np.nan)
    s2_out = np.full(n_pixels, np.inf)
    status = np.zeros(n_pixels, dtype=np.int8)

    for p in range(n_pixels):
        free = np.ones(n_terms, bool) if term_mask is None else term_mask[p]
        used = ivar[:, p] > 0
        if used.sum() < free.sum():
            status[p] = PixelStatus.TOO_FEW_STARS
            continue
        v, iv = design[:, free], ivar[:, p]
        f = np.where(used, flux[:, p], 0.0)
        state = {"theta": np.zeros(free.sum()), "ok": True, "converged": True}

        def evaluate(s2_value):
            weight = iv / (1.0 + iv * s2_value)
            solution, ok, converged = _solve_theta(v, weight, f, regularization, penalized[free],
                                                   state["theta"])
            state.update(ok=ok, converged=converged)
            if not ok or not np.all(np.isfinite(solution)):
                raise np.linalg.LinAlgError
            state["theta"] = solution
            resid = state["resid"] = f - v @ solution
            g = np.sum(weight**2 * resid**2 - weight)
            if fixed_s2 is None and not np.isfinite(g):   # absurd flux scales overflow w r^2
                raise np.linalg.LinAlgError
            return g, resid

        def value(s2_value):
            """F at s2_value from the theta and residuals in state (those of s2_value)."""
            weight = iv[used] / (1.0 + iv[used] * s2_value)
            penalty = regularization * np.sum(np.abs(state["theta"][penalized[free]]))
            return np.sum(weight * state["resid"][used] ** 2 - np.log(weight)) + penalty

        def objective(s2_value):
            """(g, F) at s2_value; theta(s2_value) and its residuals are left in state."""
            return evaluate(s2_value)[0], value(s2_value)

        try:
            if fixed_s2 is not None:
                s2_value = fixed_s2[p]
                evaluate(s2_value)
            else:
                g0, resid = evaluate(0.0)
                s2_value = 0.0
                if g0 > 0:
                    hi = np.sum(resid[used] ** 2) / used.sum()
                    if not np.isfinite(hi):
                        raise np.linalg.LinAlgError
                    s2_value = _root_above(lambda s: evaluate(s)[0], 0.0, hi)
                    evaluate(s2_value)  # theta at the root
                if state["converged"]:
                    s2_value = _lowest_minimum(objective, value, state, iv, s2_value)
        except np.linalg.LinAlgError:
            status[p] = PixelStatus.SINGULAR
            continue
        if not state["converged"]:
            status[p] = PixelStatus.NOT_CONVERGED
        theta[p] = 0.0
        theta[p, free] = state["theta"]
        s2_out[p] = s2_value
    return theta, s2_out, status


def cannon_predict(exponents, theta, x, *, jacobian=False, n_threads=None):
    """Model flux for scaled labels; see starlabel.fast.cannon_predict."""
    if n_threads is not None:
        check.thread_count(n_threads)
    exponents = check.exponents(exponents)
    theta = check.theta(theta, exponents.shape[0])
    x = check.labels(x, exponents.shape[1], name="x")
    flux = design_matrix(exponents, x) @ theta.T
    if not jacobian:
        return flux
    return flux, np.einsum("pk,nka->npa", theta, design_derivative(exponents, x))


def polynomial_objective(tables, theta, flux, weight):
    """chi2 of one spectrum as a polynomial in the labels (see starlabel._chi2_polynomial;
    CannonPolynomialObjective in cannon_model.hpp), from its Gram matrix theta^T W theta.

    LM steps use the polynomial's exact gradient and its Newton Hessian, made positive
    definite where it is not (eigenvalues replaced by their magnitudes); the Hessian is
    Gauss-Newton's J^T W J minus the residuals' curvature, equal to it where the fit is
    perfect. Returns objective(x, with_jacobian) -> (chi2, n_used, hess, grad) in the LM's
    convention (hess = 1/2 d2 chi2, grad = -1/2 d chi2).
    """
    n_labels = tables.monomials.shape[1]
    n_monomials = len(tables.monomials)
    k, l = np.triu_indices(theta.shape[1])
    n_pairs = n_labels * (n_labels + 1) // 2
    # absurd flux overflows the coefficients: chi2 is then inf or NaN, and fit_one says so
    with np.errstate(over="ignore", invalid="ignore"):
        gram = theta.T @ (weight[:, None] * theta)
        coef = np.bincount(tables.pair_monomial[k, l],
                           weights=np.where(k == l, 1.0, 2.0) * gram[k, l], minlength=n_monomials)
        coef[tables.pair_monomial[:, 0]] -= 2.0 * (theta.T @ (weight * flux))
        coef[0] += np.sum(weight * flux**2)
        g1 = _scatter(tables.grad_entries, coef, (n_labels, len(tables.grad_basis)))
        g2 = _scatter(tables.hess_entries, coef, (n_pairs, len(tables.hess_basis)))
    upper = np.triu_indices(n_labels)
    n_used = int(np.count_nonzero(weight))
    # x^m = x^parent * x_label, degree by degree (a parent has one degree less), as the core
    degree = tables.monomials.sum(axis=1)
    levels = [np.flatnonzero(degree == d) for d in range(1, degree.max() + 1)]

    def objective(x, with_jacobian):
        # absurd labels or coefficients overflow: chi2 is then inf or NaN, and fit_one says so
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.ones(n_monomials)
            for level in levels:
                parent, label = tables.parent[level].T
                values[level] = values[parent] * x[label]
            chi2 = float(coef @ values)
            if not with_jacobian:
                return chi2, n_used, None, None
            hess = np.zeros((n_labels, n_labels))
            hess[upper] = 0.5 * (g2 @ values[tables.hess_basis])
            hess = hess + np.triu(hess, 1).T
            grad = -0.5 * (g1 @ values[tables.grad_basis])
        return chi2, n_used, positive_definite(hess), grad

    return objective


def _scatter(entries, coef, shape):
    """The matrix with factor * coef[m] added at (row, column) for each entry."""
    row, column, monomial, factor = entries.T
    flat = np.bincount(row * shape[1] + column, weights=factor * coef[monomial],
                       minlength=shape[0] * shape[1])
    return flat.reshape(shape)


def positive_definite(hess):
    """hess if its Cholesky factorization succeeds (or it is not finite: the fit reports
    that); else hess with its eigenvalues replaced by their magnitudes (at least 1e-12 of
    the largest), a metric in which the LM step goes downhill."""
    if not np.all(np.isfinite(hess)):
        return hess
    try:
        np.linalg.cholesky(hess)
        return hess
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(hess)
        values = np.abs(values)
        values = np.maximum(values, 1e-12 * values.max())
        return (vectors * values) @ vectors.T


def cannon_fit(exponents, theta, s2, flux, ivar, initial, *, lower=None, upper=None,
               max_iter=100, n_threads=None):
    """Fit scaled labels to spectra; see starlabel.fast.cannon_fit."""
    exponents, theta, s2, flux, ivar, initial, lower, upper, max_iter = check.fit_arguments(
        exponents, theta, s2, flux, ivar, initial, lower, upper, max_iter, n_threads)
    untrained = ~np.all(np.isfinite(theta), axis=1)
    theta = np.where(untrained[:, None], 0.0, theta)
    s2 = np.where(untrained, np.inf, s2)
    n_labels = exponents.shape[1]
    lower = np.full(n_labels, -np.inf) if lower is None else lower
    upper = np.full(n_labels, np.inf) if upper is None else upper

    tables = chi2_polynomial(exponents) if use_polynomial_form(exponents, initial.shape[1]) else None

    def model(x_one):
        v = design_matrix(exponents, x_one)[0]
        dv = design_derivative(exponents, x_one)[0]
        return theta @ v, theta @ dv

    fits = []
    for f, iv, starts in zip(flux, ivar, initial):
        with np.errstate(invalid="ignore"):  # 0 * inf where an ignored pixel is untrained
            weight = np.where(iv > 0, iv / (1.0 + iv * s2), 0.0)
        f = np.where(weight > 0, f, 0.0)
        exact = pixel_objective(model, f, weight)
        if tables is None:
            fits.append(fit_one(exact, starts, lower, upper, max_iter))
        else:
            # chi2 and the covariance at the solution from the pixels
            objective = polynomial_objective(tables, theta, f, weight)
            fits.append(fit_one(objective, starts, lower, upper, max_iter,
                                finish=lambda x, exact=exact: exact(x, True)))
    x, covariance, chi2, n_used, n_iter, status = zip(*fits)
    return LMSolution(np.array(x), np.array(covariance), np.array(chi2),
                      np.array(n_used, dtype=np.int64), np.array(n_iter, dtype=np.int32),
                      np.array(status, dtype=np.int8))
