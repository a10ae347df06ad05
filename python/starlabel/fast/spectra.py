"""Spectrum kernels, compiled: flux-conserving resampling with ivar propagation."""

import numpy as np

from .. import _grid
from .._core import core
from ..config import resolve_threads


def resample(wavelength, flux, ivar, new_wavelength, *, min_coverage=1.0, n_threads=None):
    """Resample spectra onto ``new_wavelength``, conserving flux and propagating ivar.

    Parameters
    ----------
    wavelength : (n_pixels,) or (n_spectra, n_pixels), strictly increasing (Angstrom)
    flux, ivar : (n_spectra, n_pixels) or (n_pixels,); ivar == 0 marks a bad pixel
    new_wavelength : (n_new,) strictly increasing
    min_coverage : fraction of an output pixel's width that good input must cover (default
        1: any bad or missing input inside it makes it bad)

    Returns
    -------
    flux, ivar on the new grid (same number of dimensions as the input flux); uncovered
    pixels get ivar = 0 and NaN flux. Pixel edges are midpoints between centres (chip gaps
    are recognised; see starlabel._grid.pixel_edges). The ivar is each output pixel's own
    (marginal) variance; output pixels that share an input pixel are correlated, so
    upsampling does not create information.
    """
    wavelength, flux, ivar, new_wavelength, min_coverage, single = _grid.resample_arguments(
        wavelength, flux, ivar, new_wavelength, min_coverage, n_threads)
    in_lo, in_hi = _grid.pixel_edges(wavelength)
    out_lo, out_hi = _grid.pixel_edges(new_wavelength)
    new_flux, new_ivar = core.resample(np.ascontiguousarray(in_lo), np.ascontiguousarray(in_hi),
                                       flux, ivar, out_lo, out_hi, min_coverage,
                                       resolve_threads(n_threads))
    return (new_flux[0], new_ivar[0]) if single else (new_flux, new_ivar)


def convolve(flux, ivar, kernels, *, segments=None, min_weight=0.5, n_threads=None):
    """Convolve spectra with a kernel on the pixel grid, skipping bad pixels.

    Parameters
    ----------
    flux, ivar : (n_spectra, n_pixels) or (n_pixels,)
    kernels : (n_taps,) one kernel for all, or (n_spectra, n_taps); n_taps odd, the centre
        tap in the middle, >= 0 (normalized to sum 1 here)
    segments : (n_segments, 2) int [start, stop) pixel ranges (e.g. chips) that the kernel
        never crosses; None is the whole spectrum. Pixels outside every segment become bad.
    min_weight : a good pixel whose good kernel weight is below this becomes bad

    Returns
    -------
    flux, ivar: out_j = sum_t K_t f_(j+t-c) / sum_t K_t over good pixels in j's segment;
    var_j = sum K_t^2 var / (sum K_t)^2. Bad pixels stay bad (ivar 0, NaN flux).
    """
    flux, ivar, kernels, segments, min_weight, single = _grid.convolve_arguments(
        flux, ivar, kernels, segments, min_weight, n_threads)
    out = core.convolve(flux, ivar, kernels, segments, min_weight, resolve_threads(n_threads))
    return (out[0][0], out[1][0]) if single else out


def running_quantile(flux, ivar, *, window=101, quantile=0.9, segments=None, n_threads=None):
    """Running ``quantile`` of the good pixels in a ``window``-pixel window (odd) centred on
    each pixel, within its segment; NaN where a window has no good pixel and outside every
    segment. Interpolates between order statistics as numpy.quantile's "linear" method."""
    flux, ivar, window, quantile, segments, single = _grid.running_quantile_arguments(
        flux, ivar, window, quantile, segments, n_threads)
    out = core.running_quantile(flux, ivar, segments, window // 2, quantile,
                                resolve_threads(n_threads))
    return out[0] if single else out
