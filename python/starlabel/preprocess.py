"""Spectrum preprocessing: resampling, chip-gap removal, continuum normalization, Doppler
shifts, broadening to a lower resolving power and masks.

Conventions as everywhere in starlabel: flux and ivar are (n_spectra, n_pixels) (a 1-D pair
is one spectrum and comes back 1-D), wavelength in Angstrom (vacuum for APOGEE), ivar == 0
marks a pixel to ignore. Nothing here modifies its inputs. The per-pixel loops (resampling,
convolution) run in the compiled core with ``backend="fast"`` or in NumPy with
``backend="reference"``.
"""

import numpy as np

from . import _grid
from . import _validation as check
from ._grid import C_KMS, apogee_chips, apogee_pixel_index, apogee_wavelength

__all__ = [
    "resample", "remove_chip_gaps", "to_apogee_grid", "apogee_wavelength", "apogee_chips",
    "continuum_chebyshev", "continuum_running_quantile", "continuum_normalize", "normalize",
    "doppler_factor", "doppler_shift", "gaussian_kernel", "broaden", "convolve_resolution",
    "mask_ranges", "apply_mask",
]


def _backend(backend):
    check.choice("backend", backend, {"fast", "reference"})
    if backend == "fast":
        from . import fast
        return fast
    from . import reference
    return reference


def resample(wavelength, flux, ivar, new_wavelength, *, min_coverage=1.0, backend="fast",
             n_threads=None):
    """Flux-conserving resampling onto ``new_wavelength`` with ivar propagation.

    ``wavelength`` is (n_pixels,) or one grid per spectrum (n_spectra, n_pixels). See
    starlabel.fast.resample for the exact definition. Returns (flux, ivar).
    """
    return _backend(backend).resample(wavelength, flux, ivar, new_wavelength,
                                      min_coverage=min_coverage, n_threads=n_threads)


def remove_chip_gaps(flux, ivar, n_pixels=7214):
    """Cut apStar-grid spectra (8575 pixels) down to the 7214- or 7514-pixel APOGEE grid.

    Returns (wavelength, flux, ivar); copies, the input is untouched.
    """
    flux, ivar = check.as_float_array("flux", flux, np.ndim(flux) if np.ndim(flux) in (1, 2) else 2), \
        check.as_float_array("ivar", ivar, np.ndim(ivar) if np.ndim(ivar) in (1, 2) else 2)
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar must have the same shape, got {flux.shape} and {ivar.shape}")
    if flux.shape[-1] != _grid.APOGEE_N_APSTAR:
        raise ValueError(f"flux must be on the 8575-pixel apStar grid, got {flux.shape[-1]} pixels")
    index = apogee_pixel_index(n_pixels)
    out_f, out_i = flux[..., index].copy(), ivar[..., index].copy()
    return apogee_wavelength(n_pixels), out_f, out_i


def to_apogee_grid(wavelength, flux, ivar, n_pixels=7214, *, rv=None, min_coverage=1.0,
                   backend="fast", n_threads=None):
    """Resample spectra with any wavelength solution (e.g. apVisit chips concatenated in
    increasing wavelength) onto the APOGEE 8575-, 7214- or 7514-pixel grid.

    ``rv`` (km/s, scalar or (n_spectra,)): move to the rest frame in the same single
    resampling (lambda_rest = lambda / doppler_factor(rv)); for an apVisit file that is the
    header's VRAD (observed frame), for barycentric wavelengths VHELIO.
    Returns (wavelength, flux, ivar).
    """
    grid = apogee_wavelength(n_pixels)
    if rv is not None:
        wavelength = _grid.increasing_wavelength("wavelength", wavelength, ndim=(1, 2))
        factor = np.atleast_1d(doppler_factor(rv))
        if factor.ndim != 1 or factor.size not in (1, np.atleast_2d(np.asarray(flux)).shape[0]):
            raise ValueError(f"rv must be a scalar or one value per spectrum, got shape {np.shape(rv)}")
        wavelength = np.atleast_2d(wavelength) / factor[:, None]
        if np.ndim(flux) == 1:
            wavelength = wavelength[0]
    new_flux, new_ivar = resample(wavelength, flux, ivar, grid, min_coverage=min_coverage,
                                  backend=backend, n_threads=n_threads)
    return grid, new_flux, new_ivar


# --- continuum -------------------------------------------------------------------------

def _chips_for(n_pixels, chips):
    if chips is None:
        chips = apogee_chips(n_pixels) if n_pixels in _grid.APOGEE_CHIPS else ((0, n_pixels),)
    chips = [(int(a), int(b)) for a, b in chips]
    last = 0
    for a, b in chips:
        if not last <= a < b <= n_pixels:
            raise ValueError(f"chips must be increasing, disjoint (start, stop) ranges inside "
                             f"[0, {n_pixels}], got {chips}")
        last = b
    return chips


def continuum_chebyshev(flux, ivar, continuum_pixels, *, chips=None, degree=4):
    """Continuum by the Cannon/Payne recipe: per chip, a Chebyshev series in the pixel index
    (mapped linearly to [-1, 1] over the chip), fitted by inverse-variance-weighted least
    squares to the good continuum pixels.

    Parameters
    ----------
    flux, ivar : (n_spectra, n_pixels) or (n_pixels,)
    continuum_pixels : bool (n_pixels,) (e.g. the 529 APOGEE pixels of
        ``cannon_cont_pixels_apogee.npz``) or integer indices
    chips : (start, stop) ranges; default the three APOGEE chips for 7214/7514 pixels,
        else the whole spectrum
    degree : Chebyshev degree (4 as The Payne)

    Returns
    -------
    continuum, same shape as flux (NaN on a chip with fewer good continuum pixels than
    degree + 1, and outside every chip)
    """
    single = np.ndim(flux) == 1
    flux, ivar = check.spectra(flux, ivar)
    n_spectra, n_pixels = flux.shape
    degree = check.positive_int("degree", degree, minimum=0)
    cont = np.asarray(continuum_pixels)
    if cont.dtype == bool:
        if cont.shape != (n_pixels,):
            raise ValueError(f"continuum_pixels must be a bool mask of shape ({n_pixels},), got {cont.shape}")
    elif np.issubdtype(cont.dtype, np.integer) and cont.ndim == 1:
        if np.any(cont < 0) or np.any(cont >= n_pixels):
            raise ValueError(f"continuum_pixels indices must lie in [0, {n_pixels})")
        mask = np.zeros(n_pixels, dtype=bool)
        mask[cont] = True
        cont = mask
    else:
        raise TypeError("continuum_pixels must be a bool mask or integer indices")
    continuum = np.full(flux.shape, np.nan)
    for a, b in _chips_for(n_pixels, chips):
        x = np.linspace(-1.0, 1.0, b - a)
        basis = np.polynomial.chebyshev.chebvander(x, degree)       # (n_chip, degree + 1)
        sel = np.nonzero(cont[a:b])[0]
        V = basis[sel]                                               # (n_cont, degree + 1)
        w = ivar[:, a:b][:, sel]                                     # (n_spectra, n_cont)
        y = np.where(w > 0, flux[:, a:b][:, sel], 0.0)
        A = np.einsum("sk,ki,kj->sij", w, V, V)
        rhs = np.einsum("sk,ki,sk->si", w, V, y)
        enough = (w > 0).sum(axis=1) > degree
        coef = np.full((n_spectra, degree + 1), np.nan)
        # one batched solve of all (degree+1)^2 systems; a singular system (continuum pixels
        # too clustered) is found by its condition number and left NaN
        with np.errstate(all="ignore"):
            cond = np.linalg.cond(A[enough]) if enough.any() else np.zeros(0)
        solvable = np.nonzero(enough)[0][np.isfinite(cond) & (cond < 1e14)]
        if solvable.size:
            coef[solvable] = np.linalg.solve(A[solvable], rhs[solvable][..., None])[..., 0]
        continuum[:, a:b] = coef @ basis.T
    return continuum[0] if single else continuum


def normalize(flux, ivar, continuum):
    """Divide by a continuum: (flux / c, ivar * c^2); pixels with a non-positive or
    non-finite continuum get ivar = 0 and NaN flux."""
    single = np.ndim(flux) == 1
    flux, ivar = check.spectra(flux, ivar)
    continuum = np.atleast_2d(check.as_float_array("continuum", continuum, np.ndim(continuum)))
    if continuum.shape[-1] != flux.shape[1]:
        raise ValueError(f"continuum has {continuum.shape[-1]} pixels, flux has {flux.shape[1]}")
    continuum = np.broadcast_to(continuum, flux.shape)
    ok = np.isfinite(continuum) & (continuum > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        new_flux = np.where(ok, flux / np.where(ok, continuum, 1.0), np.nan)
        new_ivar = np.where(ok & (ivar > 0), ivar * continuum * continuum, 0.0)
    return (new_flux[0], new_ivar[0]) if single else (new_flux, new_ivar)


def continuum_running_quantile(flux, ivar, *, window=101, quantile=0.9, chips=None,
                               backend="fast", n_threads=None):
    """Pseudo-continuum: the running ``quantile`` of the good pixels in a ``window``-pixel
    (odd) window centred on each pixel, within each chip (default: APOGEE chips for 7214/7514
    pixels, else the whole spectrum). NaN where a window has no good pixel.
    """
    n_pixels = np.shape(flux)[-1] if np.ndim(flux) else 0
    segments = np.array(_chips_for(n_pixels, chips), dtype=np.int64) if n_pixels else None
    return _backend(backend).running_quantile(flux, ivar, window=window, quantile=quantile,
                                              segments=segments, n_threads=n_threads)


def continuum_normalize(flux, ivar, continuum_pixels=None, *, method="chebyshev", **options):
    """Normalize spectra: returns (flux, ivar, continuum).

    method="chebyshev" needs ``continuum_pixels`` (see continuum_chebyshev); method="quantile"
    uses continuum_running_quantile(**options).
    """
    check.choice("method", method, {"chebyshev", "quantile"})
    if method == "chebyshev":
        if continuum_pixels is None:
            raise ValueError("method='chebyshev' needs continuum_pixels")
        continuum = continuum_chebyshev(flux, ivar, continuum_pixels, **options)
    else:
        continuum = continuum_running_quantile(flux, ivar, **options)
    new_flux, new_ivar = normalize(flux, ivar, continuum)
    return new_flux, new_ivar, continuum


# --- velocities and broadening ---------------------------------------------------------

def doppler_factor(rv):
    """lambda_observed / lambda_emitted for a radial velocity (km/s, positive receding):
    sqrt((1 + v/c) / (1 - v/c)), relativistic."""
    rv = np.asarray(rv, dtype=np.float64)
    if not np.all(np.isfinite(rv)) or np.any(np.abs(rv) >= C_KMS):
        raise ValueError("rv must be finite and |rv| < c")
    beta = rv / C_KMS
    return np.sqrt((1.0 + beta) / (1.0 - beta))


def doppler_shift(wavelength, flux, ivar, rv, *, to_rest=True, min_coverage=1.0, backend="fast",
                  n_threads=None):
    """Shift spectra by radial velocities ``rv`` (km/s, scalar or (n_spectra,)) and resample
    back onto ``wavelength`` (flux-conserving).

    to_rest=True moves observed spectra to the rest frame (a receding star, rv > 0, is
    shifted blueward); to_rest=False applies the shift (e.g. to a model). Pixels the shifted
    spectrum no longer covers get ivar = 0.
    """
    wavelength = _grid.increasing_wavelength("wavelength", wavelength)
    single = np.ndim(flux) == 1
    flux2 = np.atleast_2d(np.asarray(flux))
    rv = np.asarray(rv, dtype=np.float64)
    if rv.ndim > 1 or (rv.ndim == 1 and rv.shape[0] != flux2.shape[0]):
        raise ValueError(f"rv must be a scalar or ({flux2.shape[0]},), got shape {rv.shape}")
    factor = np.broadcast_to(doppler_factor(rv), (flux2.shape[0],))
    if to_rest:
        factor = 1.0 / factor
    shifted = wavelength[None, :] * factor[:, None]
    new_flux, new_ivar = resample(shifted, flux2, np.atleast_2d(np.asarray(ivar)), wavelength,
                                  min_coverage=min_coverage, backend=backend, n_threads=n_threads)
    return (new_flux[0], new_ivar[0]) if single else (new_flux, new_ivar)


def gaussian_kernel(sigma_pixels, truncate=6.0):
    """A normalized Gaussian sampled at integer pixel offsets out to ``truncate`` sigma
    (tail mass beyond 6 sigma: 2e-9). ``sigma_pixels`` scalar or (n,) -> (n_taps,) or (n, n_taps)."""
    sigma = np.asarray(sigma_pixels, dtype=np.float64)
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("sigma must be finite and >= 0")
    half = int(np.ceil(truncate * np.max(sigma, initial=0.0)))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    s = np.atleast_1d(sigma)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(s > 0, np.exp(-0.5 * (offsets / np.where(s > 0, s, 1.0)) ** 2),
                     (offsets == 0).astype(float))
    k /= k.sum(axis=1, keepdims=True)
    return k[0] if sigma.ndim == 0 else k


def broaden(wavelength, flux, ivar, kernels, *, min_weight=0.5, backend="fast", n_threads=None):
    """Convolve spectra on a grid uniform in log(wavelength) (gaps such as chip gaps
    allowed: the kernel stops at them) with velocity kernels sampled per pixel.
    Returns (flux, ivar)."""
    wavelength = _grid.increasing_wavelength("wavelength", wavelength)
    segments, _ = _grid.log_uniform_segments(wavelength)
    if np.shape(flux)[-1] != wavelength.size:
        raise ValueError(f"flux has {np.shape(flux)[-1]} pixels, wavelength has {wavelength.size}")
    return _backend(backend).convolve(flux, ivar, kernels, segments=np.array(segments, dtype=np.int64),
                                      min_weight=min_weight, n_threads=n_threads)


def resolution_sigma_pixels(wavelength, resolution, input_resolution=None):
    """Gaussian sigma in pixels that takes a log-uniform grid from ``input_resolution``
    (None: infinite) to ``resolution`` = lambda / FWHM."""
    _, dln = _grid.log_uniform_segments(_grid.increasing_wavelength("wavelength", wavelength))
    resolution = np.asarray(resolution, dtype=np.float64)
    if not np.all(np.isfinite(resolution)) or np.any(resolution <= 0):
        raise ValueError("resolution must be finite and > 0")
    inv2 = 1.0 / resolution ** 2
    if input_resolution is not None:
        input_resolution = float(input_resolution)
        if not input_resolution > 0:
            raise ValueError(f"input_resolution must be > 0, got {input_resolution}")
        if np.any(resolution > input_resolution):
            raise ValueError(f"resolution ({resolution}) must not exceed input_resolution "
                             f"({input_resolution}): convolution cannot sharpen a spectrum")
        inv2 = inv2 - 1.0 / input_resolution ** 2
    fwhm_ln = np.sqrt(np.maximum(inv2, 0.0))          # FWHM in ln(lambda)
    return fwhm_ln / (2.0 * np.sqrt(2.0 * np.log(2.0))) / dln


def convolve_resolution(wavelength, flux, ivar, resolution, *, input_resolution=None,
                        backend="fast", n_threads=None):
    """Degrade spectra to resolving power ``resolution`` (scalar or per spectrum) with a
    Gaussian line-spread function; ``input_resolution`` (None: the input is treated as
    infinitely sharp) is removed in quadrature. The grid must be uniform in log(lambda)
    apart from gaps. Returns (flux, ivar)."""
    sigma = resolution_sigma_pixels(wavelength, resolution, input_resolution)
    return broaden(wavelength, flux, ivar, gaussian_kernel(sigma), backend=backend,
                   n_threads=n_threads)


# --- masks -----------------------------------------------------------------------------

def mask_ranges(wavelength, ivar, ranges):
    """ivar with zero inside each [lo, hi] wavelength range (telluric, sky, user masks).

    ``wavelength`` (n_pixels,) or (n_spectra, n_pixels); ranges (n, 2) in the same units.
    Returns a new ivar array."""
    wavelength = _grid.to_angstrom("wavelength", wavelength)
    wavelength = np.asarray(wavelength, dtype=np.float64)
    ranges = check.finite_array("ranges", ranges, 2) if np.size(ranges) else np.zeros((0, 2))
    if ranges.shape[1] != 2 or np.any(ranges[:, 1] < ranges[:, 0]):
        raise ValueError("ranges must be (n, 2) pairs with lo <= hi")
    ivar = np.array(ivar, dtype=np.float64)
    if wavelength.shape[-1] != ivar.shape[-1]:
        raise ValueError(f"wavelength has {wavelength.shape[-1]} pixels, ivar has {ivar.shape[-1]}")
    hit = np.zeros(np.broadcast_shapes(wavelength.shape, ivar.shape), dtype=bool)
    for lo, hi in ranges:
        hit |= (wavelength >= lo) & (wavelength <= hi)
    ivar[hit] = 0.0
    return ivar


def apply_mask(ivar, mask):
    """ivar with zero where the boolean ``mask`` (n_pixels,) or ivar-shaped is True."""
    ivar = np.array(ivar, dtype=np.float64)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
    try:
        mask = np.broadcast_to(mask, ivar.shape)
    except ValueError:
        raise ValueError(f"mask shape {mask.shape} does not match ivar {ivar.shape}") from None
    ivar[mask] = 0.0
    return ivar
