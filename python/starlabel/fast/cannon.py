"""The Cannon's kernels, compiled: training, prediction and label fitting."""

import numpy as np

from .. import _validation as check
from .._core import core
from ..config import resolve_threads
from ..result import LMSolution
from .._chi2_polynomial import chi2_polynomial, use_polynomial_form
from ..vectorizer import design_matrix


_MONOMIAL_BLOCK = 256  # columns of the monomial table computed at once


def _monomial_table(exponents, design):
    """Distinct entries of v v^T: their values per star and where each Gram entry finds its own.

    Returns monomials (n_stars, n_monomials) and gram_index (n_terms, n_terms).
    """
    n_terms = exponents.shape[0]
    rows, cols = np.triu_indices(n_terms)
    unique, first, inverse = np.unique(exponents[rows] + exponents[cols], axis=0,
                                       return_index=True, return_inverse=True)
    gram_index = np.empty((n_terms, n_terms), dtype=np.int64)
    gram_index[rows, cols] = inverse.ravel()
    gram_index[cols, rows] = inverse.ravel()
    # in blocks of columns: gathering all of them at once made two (n_stars, n_monomials)
    # temporaries (77 MB each at 17 labels and 1600 stars), fresh pages the operating system
    # zeroes on first touch
    left, right = rows[first], cols[first]
    monomials = np.empty((design.shape[0], len(first)))
    for start in range(0, len(first), _MONOMIAL_BLOCK):
        block = slice(start, start + _MONOMIAL_BLOCK)
        np.multiply(design[:, left[block]], design[:, right[block]], out=monomials[:, block])
    return monomials, gram_index


def cannon_train(exponents, x, flux, ivar, *, regularization=0.0, term_mask=None, s2=None,
                 n_threads=None):
    """Train every pixel of a Cannon model.

    Parameters
    ----------
    exponents : int array (n_terms, n_labels), term 0 the constant
    x : (n_stars, n_labels) scaled training labels
    flux, ivar : (n_stars, n_pixels); ivar == 0 ignores a pixel
    regularization : float >= 0, L1 strength on every non-constant theta
    term_mask : bool (n_pixels, n_terms) or None; False forces a term to zero (censoring)
    s2 : None (maximum likelihood) or fixed intrinsic variance, scalar or (n_pixels,)

    Returns
    -------
    theta (n_pixels, n_terms), s2 (n_pixels,), status (n_pixels,) PixelStatus codes
    """
    exponents, x, flux, ivar, regularization, term_mask, s2 = check.training_arguments(
        exponents, x, flux, ivar, regularization, term_mask, s2, n_threads)
    design = design_matrix(exponents, x)
    monomials, gram_index = _monomial_table(exponents, design)
    penalized = np.ascontiguousarray(exponents.any(axis=1), dtype=np.uint8)
    mask = None if term_mask is None else term_mask.view(np.uint8)
    return core.cannon_train(design, monomials, gram_index, penalized, mask, flux, ivar,
                             s2, regularization, resolve_threads(n_threads))


def cannon_predict(exponents, theta, x, *, jacobian=False, n_threads=None):
    """Model flux for scaled labels x (n_stars, n_labels) -> (n_stars, n_pixels).

    With ``jacobian=True`` also returns d flux / d x as (n_stars, n_pixels, n_labels).
    Untrained pixels (NaN theta) give NaN.
    """
    exponents = check.exponents(exponents)
    theta = check.theta(theta, exponents.shape[0])
    x = check.labels(x, exponents.shape[1], name="x")
    theta_t = np.ascontiguousarray(theta.T)
    return core.cannon_predict(exponents, theta_t, x, bool(jacobian), resolve_threads(n_threads))


def cannon_fit(exponents, theta, s2, flux, ivar, initial, *, lower=None, upper=None,
               max_iter=100, n_threads=None):
    """Fit scaled labels to spectra by Levenberg-Marquardt.

    Parameters
    ----------
    exponents : int array (n_terms, n_labels)
    theta : (n_pixels, n_terms); NaN rows (untrained pixels) are ignored
    s2 : (n_pixels,) intrinsic variance; pixel weights are 1 / (1/ivar + s2)
    flux, ivar : (n_spectra, n_pixels)
    initial : starting points (n_labels,), (n_starts, n_labels) or (n_spectra, n_starts,
        n_labels); chi2 is evaluated at each and LM starts from the best
    lower, upper : (n_labels,) or None, box bounds in scaled units
    max_iter : int, trial steps per spectrum

    Returns
    -------
    LMSolution in scaled units
    """
    exponents, theta, s2, flux, ivar, initial, lower, upper, max_iter = check.fit_arguments(
        exponents, theta, s2, flux, ivar, initial, lower, upper, max_iter, n_threads)
    untrained = ~np.all(np.isfinite(theta), axis=1)
    theta = np.where(untrained[:, None], 0.0, theta)
    s2 = np.where(untrained, np.inf, s2)
    polynomial = None
    if use_polynomial_form(exponents, initial.shape[1]):
        polynomial = chi2_polynomial(exponents)[1:]  # the core needs no exponents
    return LMSolution(*core.cannon_fit(exponents, np.ascontiguousarray(theta.T), s2, flux, ivar,
                                       initial, lower, upper, max_iter, polynomial,
                                       resolve_threads(n_threads)))
