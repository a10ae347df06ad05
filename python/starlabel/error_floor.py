"""The label error a data-driven model's own misfit adds to its formal errors.

A fit's formal covariance, the inverse of J^T W J, holds the spectra's noise (and a Cannon
model's per-pixel scatter s2). Where the model cannot follow the spectra, its misfit is
correlated across pixels and the fitted labels scatter more than that. On stars of known
labels that the model was not trained on, the excess ``(fit - true)^2 - error^2`` measures the
misfit's share. It depends strongly on where a star lies in label space (a quadratic model
fits the middle of its training set better than its edges), so the floor of a new fit is
the mean excess of the calibration stars nearest to it, not one number per label.
"""

import numpy as np
from scipy.spatial import cKDTree

from . import _validation as check

DEFAULT_NEIGHBORS = 50


def calibration_stars(labels, flux, ivar, n_labels, n_neighbors):
    """Checked (labels, flux, ivar) of calibration stars, before they are fitted."""
    labels = check.labels(labels, n_labels)
    flux, ivar = check.spectra(flux, ivar)
    if labels.shape[0] != flux.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} stars but flux has {flux.shape[0]}")
    check.positive_int("n_neighbors", n_neighbors)
    return labels, flux, ivar


class ErrorFloor:
    """Per-label error floors, a function of the fitted labels.

    Parameters
    ----------
    labels : (n_calibration, n_labels) fitted labels of the calibration stars, physical units
    excess : (n_calibration, n_labels) ``(fit - true)^2 - formal error^2`` of those fits
    scales : (n_labels,) label units in which neighbours are measured (the model's scaling)
    n_neighbors : int, calibration stars averaged per floor (<= n_calibration)
    """

    def __init__(self, labels, excess, scales, n_neighbors=DEFAULT_NEIGHBORS):
        self.labels = check.finite_array("calibration labels", labels, 2)
        n_stars, n_labels = self.labels.shape
        self.excess = check.finite_array("calibration excess", excess, 2)
        if self.excess.shape != (n_stars, n_labels):
            raise ValueError(f"calibration excess must have shape {(n_stars, n_labels)}, got "
                             f"{self.excess.shape}")
        self.scales = check.finite_array("scales", scales, 1)
        if self.scales.shape != (n_labels,) or np.any(self.scales <= 0):
            raise ValueError(f"scales must be {n_labels} values > 0")
        self.n_neighbors = check.positive_int("n_neighbors", n_neighbors)
        if self.n_neighbors > n_stars:
            raise ValueError(f"n_neighbors={self.n_neighbors} exceeds the {n_stars} "
                             "calibration stars")
        self._tree = cKDTree(self.labels / self.scales)

    @classmethod
    def from_fits(cls, fit, true_labels, scales, n_neighbors=DEFAULT_NEIGHBORS):
        """From the fits (a FitResult) of calibration stars of known ``true_labels``
        (n_calibration, n_labels): the converged ones, at least ``n_neighbors``."""
        n_neighbors = check.positive_int("n_neighbors", n_neighbors)
        ok = fit.converged
        if ok.sum() < n_neighbors:
            raise ValueError(f"{ok.sum()} of {len(fit)} calibration fits converged, fewer than "
                             f"n_neighbors={n_neighbors}")
        n_labels = len(fit.label_names)
        formal = np.diagonal(fit.formal_covariance, axis1=1, axis2=2)[ok, :n_labels]
        excess = (fit.labels[ok] - true_labels[ok]) ** 2 - formal
        return cls(fit.labels[ok], excess, scales, n_neighbors)

    def __call__(self, labels):
        """(n, n_labels) floors at fitted labels (n, n_labels): the square root of the mean
        excess of the ``n_neighbors`` nearest calibration stars, or 0 where that is < 0. NaN
        where the labels are not finite."""
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        floor = np.full(labels.shape, np.nan)
        finite = np.all(np.isfinite(labels), axis=1)
        if finite.any():
            _, nearest = self._tree.query(labels[finite] / self.scales, k=self.n_neighbors)
            nearest = nearest.reshape(finite.sum(), self.n_neighbors)
            floor[finite] = np.sqrt(np.maximum(self.excess[nearest].mean(axis=1), 0.0))
        return floor

    def arrays(self):
        """The arrays that define it, for a model file."""
        return {"calibration_labels": self.labels, "calibration_excess": self.excess,
                "calibration_neighbors": np.int64(self.n_neighbors)}

    @classmethod
    def from_arrays(cls, arrays, scales):
        """Inverse of ``arrays``; None when a file holds no calibration."""
        keys = ("calibration_labels", "calibration_excess", "calibration_neighbors")
        present = [key in arrays for key in keys]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"an error calibration needs all of {list(keys)}")
        return cls(arrays["calibration_labels"], arrays["calibration_excess"], scales,
                   int(arrays["calibration_neighbors"]))
