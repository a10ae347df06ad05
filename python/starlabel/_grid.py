"""Wavelength grids: pixel edges, the APOGEE grids, log-linear solutions.

Pure NumPy, O(n_pixels) per grid, shared by both backends so the compiled and reference
resamplers see exactly the same pixel boundaries.
"""

import numpy as np

from . import _validation as check

#: Speed of light in km/s (exact, SI definition).
C_KMS = 299792.458

# APOGEE apStar grid: log10(lambda / Angstrom) = 4.179 + 6e-6 * i, i = 0..8574 (vacuum).
APOGEE_LOG10_START = 4.179
APOGEE_LOG10_STEP = 6e-6
APOGEE_N_APSTAR = 8575
#: Chip ranges (start, stop) on the apStar grid for each chip-gap-removed grid.
APOGEE_CHIPS = {
    7214: ((322, 3242), (3648, 6048), (6412, 8306)),   # DR12-era ASPCAP grid (The Payne)
    7514: ((246, 3274), (3585, 6080), (6344, 8335)),   # DR13-DR17 ASPCAP grid
}

# A step between neighbouring pixels larger than this multiple of both adjacent steps is a
# gap (e.g. between detector chips), not a pixel: the pixels on either side keep their own
# half-steps as edges instead of sharing a midpoint in the middle of the gap. APOGEE's chip
# gaps are ~400 steps wide; 10 leaves irregular but gap-free grids alone.
GAP_FACTOR = 10.0


def apogee_wavelength(n_pixels=APOGEE_N_APSTAR):
    """The APOGEE vacuum wavelength grid in Angstrom.

    n_pixels = 8575 (the apStar grid), 7214 (chip gaps removed, DR12 ranges, as The Payne) or
    7514 (chip gaps removed, DR13-DR17 ranges).
    """
    full = 10.0 ** (APOGEE_LOG10_START + APOGEE_LOG10_STEP * np.arange(APOGEE_N_APSTAR))
    if n_pixels == APOGEE_N_APSTAR:
        return full
    return full[apogee_pixel_index(n_pixels)]


def apogee_pixel_index(n_pixels):
    """Indices into the 8575-pixel apStar grid of the 7214- or 7514-pixel grid."""
    if n_pixels not in APOGEE_CHIPS:
        raise ValueError(f"n_pixels must be 7214 or 7514 (or 8575 for the full grid), got {n_pixels!r}")
    return np.concatenate([np.arange(a, b) for a, b in APOGEE_CHIPS[n_pixels]])


def apogee_chips(n_pixels):
    """(start, stop) index ranges of the three chips on a 7214- or 7514-pixel grid."""
    if n_pixels not in APOGEE_CHIPS:
        raise ValueError(f"no APOGEE chip layout for {n_pixels} pixels (known: 7214, 7514)")
    out, start = [], 0
    for a, b in APOGEE_CHIPS[n_pixels]:
        out.append((start, start + b - a))
        start += b - a
    return tuple(out)


def increasing_wavelength(name, value, ndim=(1,)):
    """A finite, strictly increasing float64 wavelength array (1-D, or 2-D row by row).

    Accepts an astropy Quantity (converted to Angstrom through the spectral equivalency).
    """
    value = to_angstrom(name, value)
    array = check.as_float_array(name, value, np.ndim(value) if np.ndim(value) in ndim else ndim[0])
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    if array.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 pixels, got shape {array.shape}")
    if np.any(np.diff(array, axis=-1) <= 0):
        raise ValueError(f"{name} must be strictly increasing along the pixel axis")
    if np.any(array <= 0):
        raise ValueError(f"{name} must be > 0")
    return array


def to_angstrom(name, value):
    """Strip an astropy Quantity to Angstrom; plain arrays pass through (assumed Angstrom)."""
    unit = getattr(value, "unit", None)
    if unit is None:
        return value
    import astropy.units as u

    try:
        return value.to_value(u.AA, equivalencies=u.spectral())
    except u.UnitConversionError:
        raise ValueError(f"{name} must be a wavelength (or convertible), got unit {unit}") from None


def pixel_edges(wavelength):
    """Lower and upper edges of each pixel, shape of ``wavelength`` each.

    Neighbouring pixels meet at the midpoint of their centres; the outer edges lie half a
    step outside. Across a gap (a step more than GAP_FACTOR times both neighbouring steps)
    each side keeps its own half-step, so the gap itself belongs to no pixel.
    """
    w = np.asarray(wavelength, dtype=np.float64)
    d = np.diff(w, axis=-1)
    n = w.shape[-1]
    mid = 0.5 * (w[..., 1:] + w[..., :-1])
    lo = np.empty_like(w)
    hi = np.empty_like(w)
    lo[..., 1:] = mid
    hi[..., :-1] = mid
    lo[..., 0] = w[..., 0] - 0.5 * d[..., 0]
    hi[..., -1] = w[..., -1] + 0.5 * d[..., -1]
    if n >= 4:
        prev = np.concatenate([d[..., :1], d[..., :-1]], axis=-1)   # step before each step
        nxt = np.concatenate([d[..., 1:], d[..., -1:]], axis=-1)    # step after each step
        gap = (d > GAP_FACTOR * prev) & (d > GAP_FACTOR * nxt)
        if np.any(gap):
            # pixel i (left of the gap) ends half its previous step out; pixel i+1 starts
            # half its next step before.
            hi[..., :-1] = np.where(gap, w[..., :-1] + 0.5 * prev, hi[..., :-1])
            lo[..., 1:] = np.where(gap, w[..., 1:] - 0.5 * nxt, lo[..., 1:])
    return lo, hi


def log_linear(start, step, n_pixels, base=10.0):
    """Wavelengths of a log-linear solution: base ** (start + step * i)."""
    return base ** (start + step * np.arange(n_pixels))


def log_uniform_segments(wavelength, rtol=1e-3):
    """Split a grid into runs that are uniform in ln(wavelength).

    Returns (list of (start, stop), dln) where dln is the common step in ln(lambda).
    Raises ValueError if the runs do not share one step (within rtol).
    """
    w = np.asarray(wavelength, dtype=np.float64)
    dln = np.diff(np.log(w))
    step = float(np.median(dln))
    breaks = np.nonzero(dln > GAP_FACTOR * step)[0]
    bounds = np.concatenate([[0], breaks + 1, [w.size]])
    segments = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    for a, b in segments:
        inner = dln[a:b - 1]
        if inner.size and np.max(np.abs(inner - step)) > rtol * step:
            raise ValueError("wavelength must be uniform in log(lambda) (apart from gaps) for this "
                             "operation; resample onto a log-linear grid first")
    return segments, step


def resample_arguments(wavelength, flux, ivar, new_wavelength, min_coverage, n_threads):
    """Check resample's arguments (both backends); returns the converted ones and whether
    the input was a single 1-D spectrum."""
    if n_threads is not None:
        check.thread_count(n_threads)
    single = np.ndim(flux) == 1
    flux, ivar = check.spectra(flux, ivar)
    wavelength = increasing_wavelength("wavelength", wavelength, ndim=(1, 2))
    if wavelength.shape[-1] != flux.shape[1]:
        raise ValueError(f"wavelength has {wavelength.shape[-1]} pixels, flux has {flux.shape[1]}")
    if wavelength.ndim == 2 and wavelength.shape[0] not in (1, flux.shape[0]):
        raise ValueError(f"wavelength must be (n_pixels,) or (n_spectra, n_pixels); got "
                         f"{wavelength.shape} for {flux.shape[0]} spectra")
    new_wavelength = increasing_wavelength("new_wavelength", new_wavelength)
    if new_wavelength[-1] <= np.min(wavelength[..., 0]) or new_wavelength[0] >= np.max(wavelength[..., -1]):
        raise ValueError(f"new_wavelength ({new_wavelength[0]:.6g}-{new_wavelength[-1]:.6g}) does not "
                         f"overlap wavelength ({np.min(wavelength):.6g}-{np.max(wavelength):.6g})")
    try:
        min_coverage = float(min_coverage)
    except (TypeError, ValueError):
        raise TypeError(f"min_coverage must be a number, got {type(min_coverage).__name__}") from None
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    return np.atleast_2d(wavelength), flux, ivar, new_wavelength, min_coverage, single


def convolve_arguments(flux, ivar, kernels, segments, min_weight, n_threads):
    """Check convolve's arguments (both backends); kernels come back normalized to sum 1."""
    if n_threads is not None:
        check.thread_count(n_threads)
    single = np.ndim(flux) == 1
    flux, ivar = check.spectra(flux, ivar)
    n_spectra, n_pixels = flux.shape
    kernels = check.as_float_array("kernels", kernels, np.ndim(kernels) if np.ndim(kernels) in (1, 2) else 2)
    kernels = np.atleast_2d(kernels)
    if kernels.shape[0] not in (1, n_spectra):
        raise ValueError(f"kernels must be (n_taps,) or ({n_spectra}, n_taps), got {kernels.shape}")
    if kernels.shape[1] % 2 == 0:
        raise ValueError(f"kernels must have an odd number of taps (centre in the middle), got {kernels.shape[1]}")
    if not np.all(np.isfinite(kernels)) or np.any(kernels < 0):
        raise ValueError("kernels must be finite and >= 0")
    total = kernels.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("every kernel must have a positive sum")
    kernels = np.ascontiguousarray(kernels / total)
    segments = segment_array(segments, n_pixels)
    try:
        min_weight = float(min_weight)
    except (TypeError, ValueError):
        raise TypeError(f"min_weight must be a number, got {type(min_weight).__name__}") from None
    if not 0.0 < min_weight <= 1.0:
        raise ValueError(f"min_weight must be in (0, 1], got {min_weight}")
    return flux, ivar, kernels, segments, min_weight, single


def segment_array(segments, n_pixels):
    """(n, 2) int64 [start, stop) pixel ranges, increasing and disjoint; None: everything."""
    if segments is None:
        return np.array([[0, n_pixels]], dtype=np.int64)
    segments = np.asarray(segments)
    if not np.issubdtype(segments.dtype, np.integer) or segments.ndim != 2 or segments.shape[1] != 2:
        raise ValueError(f"segments must be integer (start, stop) pairs, shape (n, 2), got {segments.shape}")
    segments = np.ascontiguousarray(segments, dtype=np.int64)
    flat = segments.ravel()
    if np.any(flat < 0) or np.any(flat > n_pixels) or np.any(np.diff(flat) < 0):
        raise ValueError(f"segments must be increasing, disjoint ranges inside [0, {n_pixels}]")
    return segments


def running_quantile_arguments(flux, ivar, window, quantile, segments, n_threads):
    """Check running_quantile's arguments (both backends)."""
    if n_threads is not None:
        check.thread_count(n_threads)
    single = np.ndim(flux) == 1
    flux, ivar = check.spectra(flux, ivar)
    window = check.positive_int("window", window)
    if window % 2 == 0:
        raise ValueError(f"window must be odd, got {window}")
    # A window wider than the spectrum holds all of it: narrowing it changes no result and
    # keeps the reference's padded copy (and the core's scratch) the size of the spectrum.
    window = min(window, 2 * flux.shape[1] + 1)
    try:
        quantile = float(quantile)
    except (TypeError, ValueError):
        raise TypeError(f"quantile must be a number, got {type(quantile).__name__}") from None
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return flux, ivar, window, quantile, segment_array(segments, flux.shape[1]), single
