"""Results of label fits."""

from typing import NamedTuple

import numpy as np

from .status import FitStatus


class LMSolution(NamedTuple):
    """Raw output of a backend's fit, in the model's scaled parameters (one row per spectrum).

    x (n, n_params); covariance (n, n_params, n_params); chi2 (n,); n_used (n,) pixels with
    non-zero weight; n_iter (n,); status (n,) FitStatus codes.
    """

    x: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    n_used: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray


def lowest_chi2(solutions):
    """Per spectrum, the row of lowest chi2 among LMSolutions of the same spectra (fits from
    different starts); NaN counts as +inf, and the first solution wins ties."""
    if len(solutions) == 1:
        return solutions[0]
    chi2 = np.array([np.where(np.isnan(sol.chi2), np.inf, sol.chi2) for sol in solutions])
    best = np.argmin(chi2, axis=0)
    rows = np.arange(len(best))
    return LMSolution(*(np.array([getattr(sol, field) for sol in solutions])[best, rows]
                        for field in LMSolution._fields))


class FitResult:
    """Labels fitted to spectra, in physical units; every field has one row per spectrum.

    Attributes
    ----------
    label_names : tuple of str (n_labels)
    labels : (n_spectra, n_labels)
    covariance : (n_spectra, n_labels, n_labels)  ``formal_covariance`` plus ``error_floor``^2
        on the diagonal
    formal_covariance : (n_spectra, n_labels, n_labels)  inverse of J^T W J at the solution:
        the noise (and the model's per-pixel scatter) only
    error_floor : (n_spectra, n_labels) or None  the model's own label error, added in
        quadrature (the model's ``calibrate_errors``); None: the errors are the formal ones
    chi2, reduced_chi2 : (n_spectra,)  reduced by (n_pixels_used - n_labels)
    n_pixels_used : (n_spectra,)
    n_iter : (n_spectra,)
    status : (n_spectra,) FitStatus codes
    """

    def __init__(self, label_names, labels, covariance, chi2, n_pixels_used, n_iter, status,
                 error_floor=None):
        self.label_names = tuple(label_names)
        self.labels = labels
        self.formal_covariance = covariance
        self.error_floor = error_floor
        self.covariance = covariance
        if error_floor is not None:
            n = len(self.label_names)
            self.covariance = covariance.copy()
            self.covariance[:, np.arange(n), np.arange(n)] += np.square(error_floor)
        self.chi2 = chi2
        self.n_pixels_used = n_pixels_used
        self.n_iter = n_iter
        self.status = status
        dof = n_pixels_used - len(self.label_names)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.reduced_chi2 = np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan)

    @property
    def errors(self):
        """(n_spectra, n_labels) 1-sigma uncertainties: sqrt of the covariance diagonal."""
        return np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2))

    @property
    def converged(self):
        return self.status == FitStatus.CONVERGED

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        counts = {FitStatus(s).name: int(n) for s, n in zip(*np.unique(self.status, return_counts=True))}
        return f"FitResult({len(self)} spectra, labels {list(self.label_names)}, status {counts})"

    def to_table(self):
        """The result as an astropy Table: one column per label and per label error."""
        from astropy.table import Table

        table = Table()
        for a, name in enumerate(self.label_names):
            table[name] = self.labels[:, a]
            table[f"E_{name}"] = self.errors[:, a]
        for field in ("chi2", "reduced_chi2", "n_pixels_used", "n_iter", "status"):
            table[field] = getattr(self, field)
        return table
