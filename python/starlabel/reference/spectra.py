"""Spectrum kernels in NumPy: flux-conserving resampling with ivar propagation.

Written for clarity as an explicit (sparse) overlap matrix between input and output pixels.
"""

import numpy as np

from .. import _grid


def _overlaps(in_lo, in_hi, out_lo, out_hi):
    """Overlap lengths between every output pixel and the input pixels it may touch.

    Returns index (n_out, K) into the input pixels and overlap (n_out, K) >= 0, where K is
    the largest number of input pixels one output pixel touches (padding has overlap 0).
    """
    first = np.searchsorted(in_hi, out_lo, side="right")   # first input bin ending after L
    stop = np.searchsorted(in_lo, out_hi, side="left")     # first input bin starting at/after R
    span = max(int(np.max(stop - first, initial=0)), 1)
    index = first[:, None] + np.arange(span)[None, :]
    valid = index < stop[:, None]
    index = np.minimum(index, in_lo.size - 1)
    overlap = np.minimum(in_hi[index], out_hi[:, None]) - np.maximum(in_lo[index], out_lo[:, None])
    overlap = np.where(valid & (overlap > 0), overlap, 0.0)
    return index, overlap


def resample(wavelength, flux, ivar, new_wavelength, *, min_coverage=1.0, n_threads=None):
    """Resample spectra onto ``new_wavelength``, conserving flux and propagating ivar.

    Same contract as starlabel.fast.resample: f_j = sum_i o_ij f_i / sum_i o_ij and
    var_j = sum_i o_ij^2 var_i / (sum_i o_ij)^2 over good input pixels i (o_ij the overlap
    of the two pixels' wavelength bins); an output pixel whose good input covers less than
    ``min_coverage`` of its width gets ivar = 0 and NaN flux. ``n_threads`` is ignored.
    """
    wavelength, flux, ivar, new_wavelength, min_coverage, single = _grid.resample_arguments(
        wavelength, flux, ivar, new_wavelength, min_coverage, n_threads)
    in_lo, in_hi = _grid.pixel_edges(wavelength)
    out_lo, out_hi = _grid.pixel_edges(new_wavelength)
    width = out_hi - out_lo
    new_flux = np.empty((flux.shape[0], new_wavelength.size))
    new_ivar = np.empty_like(new_flux)
    for s in range(flux.shape[0]):
        row = s if in_lo.shape[0] > 1 else 0
        index, overlap = _overlaps(in_lo[row], in_hi[row], out_lo, out_hi)
        good = ivar[s][index] > 0
        o = np.where(good, overlap, 0.0)
        f = np.where(good, flux[s][index], 0.0)
        with np.errstate(divide="ignore"):
            var = np.where(good, 1.0 / np.where(good, ivar[s][index], 1.0), 0.0)
        covered = o.sum(axis=1)
        sum_v = (o * o * var).sum(axis=1)
        ok = (covered > 0) & (covered >= min_coverage * width * (1.0 - 1e-9)) & (sum_v > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_flux[s] = np.where(ok, (o * f).sum(axis=1) / covered, np.nan)
            new_ivar[s] = np.where(ok, covered * covered / sum_v, 0.0)
    return (new_flux[0], new_ivar[0]) if single else (new_flux, new_ivar)


def convolve(flux, ivar, kernels, *, segments=None, min_weight=0.5, n_threads=None):
    """Convolve spectra with a kernel on the pixel grid, skipping bad pixels.

    Same contract as starlabel.fast.convolve, computed tap by tap over every spectrum at once
    (shifted copies of the masked flux). ``n_threads`` is ignored.
    """
    flux, ivar, kernels, segments, min_weight, single = _grid.convolve_arguments(
        flux, ivar, kernels, segments, min_weight, n_threads)
    n_spectra, n_pixels = flux.shape
    kernels = np.broadcast_to(kernels, (n_spectra, kernels.shape[1]))
    centre = kernels.shape[1] // 2
    new_flux = np.full(flux.shape, np.nan)
    new_ivar = np.zeros(flux.shape)
    good = ivar > 0
    f = np.where(good, flux, 0.0)
    with np.errstate(divide="ignore"):
        v = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)
    m = good.astype(np.float64)
    for start, stop in segments:
        n = stop - start
        if n == 0:
            continue
        weight = np.zeros((n_spectra, n))
        sum_f = np.zeros((n_spectra, n))
        sum_v = np.zeros((n_spectra, n))
        for t in range(kernels.shape[1]):
            shift = t - centre                       # out_j takes pixel j + shift
            lo, hi = max(0, -shift), min(n, n - shift)  # j range whose source is in the segment
            if lo >= hi:
                continue
            src = slice(start + lo + shift, start + hi + shift)
            k = kernels[:, t:t + 1]
            weight[:, lo:hi] += k * m[:, src]
            sum_f[:, lo:hi] += k * f[:, src]
            sum_v[:, lo:hi] += k * k * v[:, src]
        ok = good[:, start:stop] & (weight >= min_weight) & (weight > 0) & (sum_v > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_flux[:, start:stop] = np.where(ok, sum_f / weight, np.nan)
            new_ivar[:, start:stop] = np.where(ok, weight * weight / sum_v, 0.0)
    return (new_flux[0], new_ivar[0]) if single else (new_flux, new_ivar)


def running_quantile(flux, ivar, *, window=101, quantile=0.9, segments=None, n_threads=None):
    """Running ``quantile`` of the good pixels in a ``window``-pixel window centred on each
    pixel, within its segment (numpy.nanquantile over a sliding-window view, in chunks of
    spectra to bound memory). Same contract as starlabel.fast.running_quantile."""
    flux, ivar, window, quantile, segments, single = _grid.running_quantile_arguments(
        flux, ivar, window, quantile, segments, n_threads)
    half = window // 2
    values = np.where(ivar > 0, flux, np.nan)
    out = np.full(flux.shape, np.nan)
    for a, b in segments:
        if b == a:
            continue
        chunk = max(1, int(2e6 // ((b - a) * window)))
        for s0 in range(0, flux.shape[0], chunk):
            padded = np.pad(values[s0:s0 + chunk, a:b], ((0, 0), (half, half)),
                            constant_values=np.nan)
            view = np.lib.stride_tricks.sliding_window_view(padded, window, axis=1)
            empty = np.all(np.isnan(view), axis=2)
            q = np.nanquantile(np.where(empty[..., None], 0.0, view), quantile, axis=2)
            out[s0:s0 + chunk, a:b] = np.where(empty, np.nan, q)
    return out[0] if single else out
