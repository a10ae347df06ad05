"""The Cannon in plain NumPy: the twin of cannon_train.hpp, cannon_model.hpp and lm.hpp.

Training works pixel by pixel: theta by weighted normal equations with Jacobi scaling (or
by coordinate descent with an L1 penalty), s2 by Brent's method on the derivative of the
profile objective (the compiled core uses a Newton iteration on the same function).
"""

import numpy as np
from scipy.optimize import brentq

from .. import _validation as check
from ..result import LMSolution
from ..status import PixelStatus
from ..vectorizer import design_derivative, design_matrix, use_quadratic_form
from .lm import fit_one, pixel_objective

RCOND_MIN = 1e-13     # as TrainOptions::rcond_min
S2_RTOL = 1e-12
L1_TOL = 1e-12        # as TrainOptions::l1_tol
L1_MAX_SWEEPS = 20000


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
            resid = f - v @ solution
            g = np.sum(weight**2 * resid**2 - weight)
            if fixed_s2 is None and not np.isfinite(g):   # absurd flux scales overflow w r^2
                raise np.linalg.LinAlgError
            return g, resid

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
                    while evaluate(hi)[0] > 0:
                        hi *= 4.0
                    s2_value = brentq(lambda s: evaluate(s)[0], 0.0, hi, xtol=1e-300, rtol=S2_RTOL)
                    evaluate(s2_value)  # theta at the root
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


def quadratic_objective(exponents, theta, flux, weight):
    """The normal equations through the Gram matrix A = theta^T W theta (see
    CannonQuadraticObjective in cannon_model.hpp): J^T W J = D^T A D, J^T W r = D^T theta^T W r
    with D = dv/dx. chi2 and theta^T W r come from an exact residual pass at an anchor v0 and
    from chi2_0 - 2 g0.dv + dv^T A dv, g0 - A dv elsewhere (a new anchor once chi2 < chi2_0 /
    1000); before the first anchor, chi2 for ranking starts from v^T A v - 2 b^T v + c."""
    a = theta.T @ (weight[:, None] * theta)
    b = theta.T @ (weight * flux)
    c = float(np.sum(weight * flux**2))
    n_used = int(np.count_nonzero(weight))
    anchor = {}

    def objective(x, with_jacobian):
        v = design_matrix(exponents, x)[0]
        if not anchor and not with_jacobian:
            return c - 2 * b @ v + v @ a @ v, n_used, None, None
        exact = not anchor
        if anchor:
            dv = v - anchor["v"]
            chi2 = anchor["chi2"] - 2 * anchor["theta_wr"] @ dv + dv @ a @ dv
            theta_wr = anchor["theta_wr"] - a @ dv
            exact = not chi2 >= 1e-3 * anchor["chi2"]
        if exact:
            resid = np.where(weight > 0, flux - theta @ v, 0.0)
            chi2 = float(np.sum(weight * resid**2))
            theta_wr = theta.T @ (weight * resid)
            anchor.update(v=v, chi2=chi2, theta_wr=theta_wr)
        if not with_jacobian:
            return chi2, n_used, None, None
        dv_dx = design_derivative(exponents, x)[0]
        return chi2, n_used, dv_dx.T @ a @ dv_dx, dv_dx.T @ theta_wr

    return objective


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

    quadratic = use_quadratic_form(exponents, initial.shape[1])

    def model(x_one):
        v = design_matrix(exponents, x_one)[0]
        dv = design_derivative(exponents, x_one)[0]
        return theta @ v, theta @ dv

    fits = []
    for f, iv, starts in zip(flux, ivar, initial):
        with np.errstate(invalid="ignore"):  # 0 * inf where an ignored pixel is untrained
            weight = np.where(iv > 0, iv / (1.0 + iv * s2), 0.0)
        f = np.where(weight > 0, f, 0.0)
        if quadratic:
            objective = quadratic_objective(exponents, theta, f, weight)
        else:
            objective = pixel_objective(model, f, weight)
        fits.append(fit_one(objective, starts, lower, upper, max_iter))
    x, covariance, chi2, n_used, n_iter, status = zip(*fits)
    return LMSolution(np.array(x), np.array(covariance), np.array(chi2),
                      np.array(n_used, dtype=np.int64), np.array(n_iter, dtype=np.int32),
                      np.array(status, dtype=np.int8))
