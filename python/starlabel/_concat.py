"""Join fit results computed on pieces of a survey (e.g. one per Dask chunk) into one result."""

import numpy as np

from .fitting import SpectrumFitResult
from .result import FitResult

# Fields with one row per spectrum, joined along axis 0 (and error_floor, when present).
# Everything else a result holds is either recomputed by its constructor from these
# (reduced_chi2, rv_error, the covariance with the floor) or shared by all spectra of a fit
# (names, the RV grid) and must agree between the pieces.
_PER_SPECTRUM = ("labels", "formal_covariance", "chi2", "n_pixels_used", "n_iter", "status")
_PER_SPECTRUM_RV = ("rv", "continuum", "rv_initial")


def concatenate_results(results):
    """Join results of fits of consecutive pieces of a survey along the spectrum axis.

    Parameters
    ----------
    results : non-empty sequence of FitResult (from ``CannonModel.fit_labels``), or of
        SpectrumFitResult (from ``fit_spectra``), all of the same type; piece i holds
        n_i spectra (n_i may be 0)

    Returns
    -------
    The same type as the pieces, with n = sum(n_i) spectra in the order given: labels
    (n, n_labels), covariance (n, n_params, n_params), chi2, reduced_chi2, n_pixels_used,
    n_iter, status (n,), error_floor (n, n_labels) or None; for SpectrumFitResult also rv,
    rv_error, rv_initial (n,), continuum (n, n_segments, n_coef), rv_chi2 (n, n_v) or None,
    model_flux (n, n_pixels) or None, and the pieces' common rv_grid (n_v,) or None.

    Raises
    ------
    ValueError if ``results`` is empty or the pieces come from incompatible fits
    (different result types, label names, fitted parameters, RV grids, continuum layout,
    or model spectra or error floors in some pieces only); TypeError if an item is not a
    result.
    """
    if isinstance(results, (FitResult, str, bytes)):
        raise TypeError("results must be a sequence of fit results, not a single "
                        f"{type(results).__name__}")
    results = list(results)
    if not results:
        raise ValueError("results is empty: there is nothing to concatenate")
    for i, result in enumerate(results):
        if not isinstance(result, FitResult):
            raise TypeError(f"results[{i}] is a {type(result).__name__}, not a FitResult or "
                            "SpectrumFitResult")
    first = results[0]
    cls = type(first)
    for i, result in enumerate(results[1:], start=1):
        if type(result) is not cls:
            raise ValueError(f"results mixes result types: results[0] is a {cls.__name__}, "
                             f"results[{i}] a {type(result).__name__}")
        if result.label_names != first.label_names:
            raise ValueError(f"results[{i}] has labels {list(result.label_names)}, results[0] "
                             f"has {list(first.label_names)}")
        if (result.error_floor is None) != (first.error_floor is None):
            raise ValueError(f"results[{i}] and results[0] disagree on error floors: one "
                             "model was calibrated (calibrate_errors), the other not")
    if isinstance(first, SpectrumFitResult):
        for i, result in enumerate(results[1:], start=1):
            _check_spectrum_fits_agree(first, result, i)
    joined = {name: _join(results, name) for name in _PER_SPECTRUM}
    floor = None if first.error_floor is None else _join(results, "error_floor")
    if not isinstance(first, SpectrumFitResult):
        return cls(first.label_names, *(joined[name] for name in _PER_SPECTRUM),
                   error_floor=floor)

    joined.update({name: _join(results, name) for name in _PER_SPECTRUM_RV})
    fit_rv = first.rv_grid is not None  # fit_spectra keeps the grid exactly when RV is fitted
    rv_grid = None if first.rv_grid is None else np.array(first.rv_grid, copy=True)
    rv_chi2 = None if first.rv_chi2 is None else _join(results, "rv_chi2")
    model_flux = None if first.model_flux is None else _join(results, "model_flux")
    widths = {name: _join(results, name) for name in ("sigma", "vsini")
              if getattr(first, name) is not None}
    return cls(first.label_names, first.param_names, joined["labels"], joined["rv"],
               joined["continuum"], joined["formal_covariance"], joined["chi2"],
               joined["n_pixels_used"], joined["n_iter"], joined["status"], rv_grid, rv_chi2,
               joined["rv_initial"], model_flux, fit_rv, **widths, error_floor=floor)


def _join(results, name):
    """One field of every piece joined along the spectrum axis (shapes after axis 0 must match)."""
    arrays = [np.asarray(getattr(result, name)) for result in results]
    tail = arrays[0].shape[1:]
    for i, array in enumerate(arrays[1:], start=1):
        if array.shape[1:] != tail:
            raise ValueError(f"results[{i}].{name} has shape {array.shape}, incompatible with "
                             f"results[0].{name} {arrays[0].shape} (all but the first axis must "
                             "match)")
    return np.concatenate(arrays, axis=0)


def _check_spectrum_fits_agree(first, other, i):
    """Raise ValueError unless two SpectrumFitResults come from fits with the same set-up."""
    if other.param_names != first.param_names:
        raise ValueError(f"results[{i}] fitted parameters {list(other.param_names)}, results[0] "
                         f"fitted {list(first.param_names)}")
    if (other.rv_grid is None) != (first.rv_grid is None):
        raise ValueError(f"results[{i}] and results[0] disagree on whether the RV was fitted")
    if first.rv_grid is not None and not np.array_equal(other.rv_grid, first.rv_grid):
        raise ValueError(f"results[{i}] searched a different RV grid from results[0] "
                         "(rv_range or rv_step differ)")
    if (other.rv_chi2 is None) != (first.rv_chi2 is None):
        raise ValueError(f"results[{i}] and results[0] disagree on whether rv_chi2 is present")
    if (other.model_flux is None) != (first.model_flux is None):
        raise ValueError(f"results[{i}] and results[0] disagree on return_model: model_flux is "
                         "present in one and None in the other")
