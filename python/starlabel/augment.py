"""Augmentation of spectra to narrow the gap between synthetic and observed spectra.

Following StarNet (Fabbro et al. 2018; Bialek et al. 2020): radial-velocity shifts,
rotational broadening (v sin i, linear limb darkening), instrumental broadening to a lower
resolving power, flux scaling and continuum tilts, Gaussian noise to a target S/N or a noise
fraction, telluric masking and bad pixels. Seeded and batched: every random number comes
from one ``numpy.random.Generator`` in a fixed order, and each step runs on all spectra at
once (the per-pixel loops in the compiled core). The input is never modified.
"""

import dataclasses

import numpy as np

from . import _grid
from . import _validation as check
from . import preprocess
from ._grid import C_KMS

__all__ = ["augment", "Augmented", "rotation_kernel"]


@dataclasses.dataclass
class Augmented:
    """Augmented spectra: ``flux`` and ``ivar`` (n_spectra * n_copies, n_pixels), rows grouped
    by source spectrum (``params["source"]`` gives each row's input row), and ``params``: the
    value of every random parameter drawn, one per row (NaN where a step was not applied).
    ``ivar`` is None when the input had none and no noise was added (noiseless spectra);
    pixels lost at the ends by a shift, or masked, then have NaN flux."""

    flux: np.ndarray
    ivar: np.ndarray
    params: dict


def rotation_kernel(vsini, velocity_step, limb_darkening=0.6):
    """Rotational broadening kernel(s) (Gray, The Observation and Analysis of Stellar
    Photospheres) on a grid of constant velocity step (km/s per pixel), averaged over each
    pixel exactly (closed-form integral), normalized to sum 1.

    G(x) = [2 (1 - eps) sqrt(1 - x^2) + (pi eps / 2) (1 - x^2)] / [pi vsini (1 - eps/3)],
    x = dv / vsini. ``vsini`` scalar or (n,) -> (n_taps,) or (n, n_taps); vsini = 0 is a delta.
    """
    vsini = np.asarray(vsini, dtype=np.float64)
    if not np.all(np.isfinite(vsini)) or np.any(vsini < 0):
        raise ValueError("vsini must be finite and >= 0")
    eps = float(limb_darkening)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"limb_darkening must be in [0, 1], got {limb_darkening}")
    step = float(velocity_step)
    if not step > 0:
        raise ValueError(f"velocity_step must be > 0, got {velocity_step}")
    # pixel k spans offsets [k - 1/2, k + 1/2]: the profile reaches pixel ceil(vsini/step - 1/2)
    half = max(0, int(np.ceil(np.max(vsini, initial=0.0) / step - 0.5)))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    v = np.atleast_1d(vsini)[:, None]

    def cumulative(x):
        # integral of the unnormalized profile from -1 to x (x clipped to [-1, 1])
        x = np.clip(x, -1.0, 1.0)
        circle = 0.5 * (x * np.sqrt(1 - x * x) + np.arcsin(x)) + np.pi / 4
        parabola = x - x**3 / 3 + 2.0 / 3.0
        return 2 * (1 - eps) * circle + 0.5 * np.pi * eps * parabola

    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(v > 0, step / np.where(v > 0, v, 1.0), np.inf)
        kernel = cumulative((offsets + 0.5) * scale) - cumulative((offsets - 0.5) * scale)
    kernel = np.where(v > 0, kernel, (offsets == 0).astype(float))
    kernel /= kernel.sum(axis=1, keepdims=True)
    return kernel[0] if vsini.ndim == 0 else kernel


def _draw(rng, name, value, n, minimum=None, exclusive=False):
    """``value``: None (step off -> NaN), a number (fixed), or (low, high) (uniform draws)."""
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a (low, high) pair, got {value!r}") from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if array.ndim == 0:
        out = np.full(n, float(array))
    elif array.shape == (2,):
        if not array[0] <= array[1]:
            raise ValueError(f"{name} range must be (low, high) with low <= high, got {value}")
        out = rng.uniform(array[0], array[1], n)
    else:
        raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    if minimum is not None and (np.any(array < minimum) or (exclusive and np.any(array <= minimum))):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
    return out


def augment(flux, wavelength, ivar=None, *, n_copies=1, rv=None, vsini=None, limb_darkening=0.6,
            resolution=None, input_resolution=None, flux_scale=None, tilt=None, snr=None,
            noise_fraction=None, telluric_ranges=None, telluric_probability=1.0,
            bad_fraction=None, seed=None, backend="fast", n_threads=None):
    """Augmented copies of spectra.

    Parameters
    ----------
    flux : (n_spectra, n_pixels) or (n_pixels,)
    wavelength : (n_pixels,) Angstrom, uniform in log(lambda) apart from gaps when rv, vsini
        or resolution is used (e.g. the APOGEE grids)
    ivar : optional (like flux); None means noiseless (synthetic) spectra
    n_copies : augmented copies of each spectrum
    rv : km/s, number or (low, high) uniform: Doppler shift (flux-conserving resampling)
    vsini : km/s, number or (low, high) (>= 0): rotational broadening with linear limb
        darkening coefficient ``limb_darkening``
    resolution : resolving power, number or (low, high): Gaussian instrumental broadening
        from ``input_resolution`` (None: the input is treated as unresolved-sharp)
    flux_scale : number or (low, high) (> 0): multiplies the flux
    tilt : number or (low, high): continuum tilt, flux *= 1 + tilt * x with x running from -1
        to 1 across the wavelength range
    snr : number or (low, high) (> 0): Gaussian noise with sigma = median(flux) / snr
    noise_fraction : number or (low, high) (>= 0): Gaussian noise with sigma = fraction * |flux|
    telluric_ranges : (n, 2) wavelength ranges masked (ivar = 0), each with probability
        ``telluric_probability`` per spectrum
    bad_fraction : number or (low, high) in [0, 1]: fraction of pixels zeroed (flux 0, ivar 0)
    seed : seed or numpy Generator; the same seed gives the same output

    Returns
    -------
    Augmented(flux, ivar, params); the steps run in the order listed above.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    check.choice("backend", backend, {"fast", "reference"})
    n_copies = check.positive_int("n_copies", n_copies)
    wavelength = _grid.increasing_wavelength("wavelength", wavelength)
    single = np.ndim(flux) == 1
    noiseless = ivar is None
    flux_in = check.as_float_array("flux", flux, np.ndim(flux) if np.ndim(flux) in (1, 2) else 2)
    ivar_in = np.ones_like(flux_in) if noiseless else ivar
    flux_in, ivar_in = check.spectra(flux_in, ivar_in)
    if flux_in.shape[1] != wavelength.size:
        raise ValueError(f"flux has {flux_in.shape[1]} pixels, wavelength has {wavelength.size}")
    n_in, n_pixels = flux_in.shape
    n = n_in * n_copies
    source = np.repeat(np.arange(n_in), n_copies)
    out_flux = flux_in[source]             # fancy indexing: a copy, the input stays untouched
    out_ivar = ivar_in[source]
    params = {"source": source}

    # draws first, all in one fixed order, so the seed alone fixes every parameter
    draws = {
        "rv": _draw(rng, "rv", rv, n),
        "vsini": _draw(rng, "vsini", vsini, n, minimum=0.0),
        "resolution": _draw(rng, "resolution", resolution, n, minimum=0.0, exclusive=True),
        "flux_scale": _draw(rng, "flux_scale", flux_scale, n, minimum=0.0, exclusive=True),
        "tilt": _draw(rng, "tilt", tilt, n),
        "snr": _draw(rng, "snr", snr, n, minimum=0.0, exclusive=True),
        "noise_fraction": _draw(rng, "noise_fraction", noise_fraction, n, minimum=0.0),
        "bad_fraction": _draw(rng, "bad_fraction", bad_fraction, n, minimum=0.0),
    }
    if draws["bad_fraction"] is not None and np.any(draws["bad_fraction"] > 1):
        raise ValueError(f"bad_fraction must be <= 1, got {bad_fraction!r}")
    for key, value in draws.items():
        params[key] = np.full(n, np.nan) if value is None else value

    if draws["rv"] is not None:
        out_flux, out_ivar = preprocess.doppler_shift(wavelength, out_flux, out_ivar, draws["rv"],
                                                      to_rest=False, backend=backend,
                                                      n_threads=n_threads)
    if draws["vsini"] is not None or draws["resolution"] is not None:
        _, dln = _grid.log_uniform_segments(wavelength)
    if draws["vsini"] is not None:
        kernels = rotation_kernel(draws["vsini"], dln * C_KMS, limb_darkening)
        out_flux, out_ivar = preprocess.broaden(wavelength, out_flux, out_ivar, kernels,
                                                backend=backend, n_threads=n_threads)
    if draws["resolution"] is not None:
        sigma = preprocess.resolution_sigma_pixels(wavelength, draws["resolution"], input_resolution)
        out_flux, out_ivar = preprocess.broaden(wavelength, out_flux, out_ivar,
                                                preprocess.gaussian_kernel(sigma),
                                                backend=backend, n_threads=n_threads)
    factor = np.ones((n, 1))
    if draws["flux_scale"] is not None:
        factor = factor * draws["flux_scale"][:, None]
    if draws["tilt"] is not None:
        x = 2.0 * (wavelength - wavelength[0]) / (wavelength[-1] - wavelength[0]) - 1.0
        factor = factor * (1.0 + draws["tilt"][:, None] * x[None, :])
        if np.any(factor <= 0):
            raise ValueError("tilt makes the flux scale non-positive somewhere; use |tilt| < 1")
    out_flux = out_flux * factor
    out_ivar = out_ivar / (factor * factor)

    sigma = np.zeros((n, 1))
    with np.errstate(invalid="ignore"):
        if draws["snr"] is not None:
            level = np.nanmedian(np.where(out_ivar > 0, out_flux, np.nan), axis=1)
            sigma = sigma + (np.abs(np.nan_to_num(level)) / draws["snr"])[:, None]
        if draws["noise_fraction"] is not None:
            sigma = np.sqrt(sigma**2 + (draws["noise_fraction"][:, None] * np.abs(out_flux)) ** 2)
    added_noise = draws["snr"] is not None or draws["noise_fraction"] is not None
    if added_noise:
        sigma = np.broadcast_to(sigma, out_flux.shape)
        noise = rng.standard_normal(out_flux.shape)
        good = out_ivar > 0
        out_flux = np.where(good, out_flux + sigma * noise, out_flux)
        var = np.where(good, sigma**2, 0.0)
        if not noiseless:
            with np.errstate(divide="ignore"):
                var = var + np.where(good, 1.0 / np.where(good, out_ivar, 1.0), 0.0)
        with np.errstate(divide="ignore"):
            out_ivar = np.where(good & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)

    if telluric_ranges is not None:
        ranges = check.finite_array("telluric_ranges", telluric_ranges, 2)
        if ranges.shape[1] != 2 or np.any(ranges[:, 1] < ranges[:, 0]):
            raise ValueError("telluric_ranges must be (n, 2) pairs with lo <= hi")
        p = float(telluric_probability)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"telluric_probability must be in [0, 1], got {telluric_probability}")
        chosen = rng.uniform(size=(n, ranges.shape[0])) < p
        hit = np.zeros(out_flux.shape, dtype=bool)
        for r, (lo, hi) in enumerate(ranges):
            hit |= chosen[:, r:r + 1] & ((wavelength >= lo) & (wavelength <= hi))[None, :]
        out_ivar = np.where(hit, 0.0, out_ivar)
        params["telluric_masked"] = chosen
    if draws["bad_fraction"] is not None:
        # exactly round(fraction * n_pixels) distinct pixels per spectrum
        order = np.argsort(rng.uniform(size=out_flux.shape), axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n_pixels)[None, :].repeat(n, 0), axis=1)
        bad = rank < np.round(draws["bad_fraction"] * n_pixels)[:, None]
        out_flux = np.where(bad, 0.0, out_flux)
        out_ivar = np.where(bad, 0.0, out_ivar)

    if noiseless and not added_noise:
        out_flux = np.where(out_ivar > 0, out_flux, np.nan)
        out_ivar = None
    if single and n_copies == 1:
        return Augmented(out_flux[0], None if out_ivar is None else out_ivar[0], params)
    return Augmented(out_flux, out_ivar, params)
