"""Levenberg-Marquardt for one spectrum at a time, the twin of cpp/include/starlabel/lm.hpp.

Same algorithm, step for step: the best of the starting points by chi2, Marquardt damping
(H + lambda diag H) delta = J^T W r with parameters held on a bound they push against,
projection onto the box, Nielsen's damping update (after an accepted step lambda is scaled
by max(1/3, 1 - (2 rho - 1)^3), rho the actual over the predicted chi2 decrease; after
successive rejections by 2, 4, 8, ...), and the same stopping rules (Newton decrement, chi2
decrease, step size, damping limit, iteration limit).
"""

import numpy as np

from ..status import FitStatus

FTOL = 1e-8
XTOL = 1e-10
LAMBDA_INIT = 1e-3
LAMBDA_MAX = 1e10


def pixel_objective(model, flux, weight):
    """chi2 and normal equations of a per-pixel model for one spectrum.

    model(x) -> (flux (n_pixels,), jacobian (n_pixels, n_params)); flux, weight (n_pixels,).
    Returns objective(x, with_jacobian) -> (chi2, n_used, J^T W J, J^T W r).
    """
    used = weight > 0

    def objective(x, with_jacobian):
        model_flux, jac = model(x)
        # absurd flux or labels overflow: chi2 is then inf or NaN, and fit_one says so
        with np.errstate(over="ignore", invalid="ignore"):
            resid = np.where(used, flux - model_flux, 0.0)
            chi2 = float(np.sum(weight * resid**2))
            if not with_jacobian:
                return chi2, int(used.sum()), None, None
            jac = np.where(used[:, None], jac, 0.0)
            return chi2, int(used.sum()), jac.T @ (weight[:, None] * jac), jac.T @ (weight * resid)

    return objective


def inverse_spd(hess):
    """Inverse of a symmetric positive-definite matrix with Jacobi scaling; NaN if singular."""
    diag = np.diag(hess)
    d = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)
    try:
        if np.any(d == 0):
            raise np.linalg.LinAlgError
        np.linalg.cholesky(d[:, None] * hess * d[None, :])
    except np.linalg.LinAlgError:
        return np.full_like(hess, np.nan)
    return d[:, None] * np.linalg.inv(d[:, None] * hess * d[None, :]) * d[None, :]


def fit_one(objective, starts, lower, upper, max_iter, finish=None):
    """Fit one spectrum.

    objective(x, with_jacobian) -> (chi2, n_used, J^T W J, J^T W r); starts (n_starts,
    n_params); lower, upper (n_params,) (may be infinite); finish(x) or None: the same four at
    the solution, for the reported chi2 and covariance, when objective's are approximations.
    Returns x, covariance, chi2, n_used, n_iter, status.
    """
    n_params = starts.shape[1]
    starts = np.clip(starts, lower, upper)
    best = 0
    if len(starts) > 1:
        chi2s = np.array([objective(s, False)[0] for s in starts])
        best = int(np.argmin(np.where(np.isfinite(chi2s), chi2s, np.inf)))
    x = starts[best].copy()
    chi2, n_used, hess, grad = objective(x, True)
    n_iter = 0
    status = FitStatus.CONVERGED
    if n_used < n_params:
        status = FitStatus.NO_PIXELS
    elif not np.isfinite(chi2) or not np.all(np.isfinite(hess)):
        status = FitStatus.NON_FINITE
    active = status == FitStatus.CONVERGED and chi2 > 0
    lam, nu = LAMBDA_INIT, 2.0
    while active:
        # parameters on a bound with the gradient pointing outward are held there
        held = ((x <= lower) & (grad < 0)) | ((x >= upper) & (grad > 0))
        free_hess = np.where(held[:, None] | held[None, :], 0.0, hess) + np.diag(held * 1.0)
        free_grad = np.where(held, 0.0, grad)
        if free_grad @ inverse_spd(free_hess) @ free_grad <= FTOL * chi2:  # Newton decrement
            break
        floor = 1e-12 * np.diag(hess).max()
        damped = free_hess + lam * np.diag(np.maximum(np.diag(free_hess), floor))
        try:
            np.linalg.cholesky(damped)
            step = np.linalg.solve(damped, free_grad)
        except np.linalg.LinAlgError:
            step = np.zeros(n_params)
        x_trial = np.clip(x + step, lower, upper)
        step = x_trial - x
        predicted = 2.0 * free_grad @ step - step @ free_hess @ step
        n_iter += 1
        trial = objective(x_trial, True)
        if np.isfinite(trial[0]) and trial[0] < chi2 and np.all(np.isfinite(trial[2])):
            moved = np.max(np.abs(x_trial - x))
            decrease = chi2 - trial[0]
            x = x_trial
            chi2, n_used, hess, grad = trial
            rho = decrease / predicted if predicted > 0 else 0.0
            lam = max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 1e-12)
            nu = 2.0
            if decrease <= FTOL * chi2 or moved <= XTOL:
                active = False
        else:
            lam *= nu
            nu *= 2.0
            if lam > LAMBDA_MAX:
                active = False
        if active and n_iter >= max_iter:
            active = False
            status = FitStatus.MAX_ITER
    if status in (FitStatus.CONVERGED, FitStatus.MAX_ITER):
        if finish is not None:
            chi2, n_used, hess, grad = finish(x)
        covariance = inverse_spd(hess)
    else:
        covariance = np.full((n_params, n_params), np.nan)
    return x, covariance, chi2, n_used, n_iter, status
