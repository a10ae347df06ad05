"""Seeded synthetic spectroscopic surveys for demos, tests and benchmarks.

The spectra come from a toy but physically motivated line-formation model
(not a real model atmosphere): a fixed line list whose line opacities scale
with abundance, excitation/ionisation temperature and pressure, saturate along
a curve of growth and are broadened thermally, by microturbulence, by pressure
and by an R = 22500 spectrograph.  Fluxes therefore depend smoothly but
nonlinearly on the labels, which is what data-driven label models have to
learn.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import numpy as np

__all__ = ["SUPPORTED_LABELS", "SyntheticSurvey", "apogee_wavelength",
           "synthetic_spectra", "synthetic_survey"]

_ELEMENTS = ("C", "N", "O", "MG", "AL", "SI", "S", "K", "CA", "TI", "V", "MN",
             "NI", "NA")
SUPPORTED_LABELS = ("TEFF", "LOGG", "FE_H") + tuple(f"{e}_FE" for e in _ELEMENTS)
_REQUIRED = ("TEFF", "LOGG", "FE_H")

# [X/Fe] = offset + alpha * alpha_trend([Fe/H]) + slope * [Fe/H]
#          + mixing * giant_mixing(logg) + scatter * N(0, 1)
# The "mixing" column mimics first dredge-up (C down, N up on the giant branch).
#                   offset alpha  slope mixing scatter
_XFE_MODEL = np.array([
    [0.00, 0.0, 0.00, -0.20, 0.10],   # C
    [0.00, 0.0, -0.10, 0.35, 0.15],   # N
    [0.00, 1.0, 0.00, 0.00, 0.06],    # O
    [0.00, 1.0, 0.00, 0.00, 0.05],    # MG
    [0.02, 0.6, 0.00, 0.00, 0.10],    # AL
    [0.00, 0.7, 0.00, 0.00, 0.05],    # SI
    [0.00, 0.8, 0.00, 0.00, 0.12],    # S
    [0.00, 0.3, 0.00, 0.00, 0.12],    # K
    [0.00, 0.6, 0.00, 0.00, 0.06],    # CA
    [0.00, 0.6, 0.00, 0.00, 0.10],    # TI
    [0.00, 0.2, 0.00, 0.00, 0.15],    # V
    [0.00, 0.0, 0.25, 0.00, 0.06],    # MN
    [0.00, 0.1, 0.05, 0.00, 0.05],    # NI
    [0.00, 0.1, 0.10, 0.00, 0.15],    # NA
])

# Line species: (elemental composition weights over ("FE",) + _ELEMENTS,
# mass [amu], molecular?, relative frequency in the line list).
_SPECIES = (
    ({"FE": 1.0}, 56.0, False, 0.30), ({"C": 1.0, "N": 1.0}, 26.0, True, 0.10),
    ({"C": 1.0, "O": 0.2}, 28.0, True, 0.07), ({"O": 1.0}, 17.0, True, 0.08),
    ({"C": 1.0}, 12.0, False, 0.02), ({"MG": 1.0}, 24.3, False, 0.05),
    ({"AL": 1.0}, 27.0, False, 0.03), ({"SI": 1.0}, 28.1, False, 0.06),
    ({"S": 1.0}, 32.1, False, 0.02), ({"K": 1.0}, 39.1, False, 0.02),
    ({"CA": 1.0}, 40.1, False, 0.04), ({"TI": 1.0}, 47.9, False, 0.04),
    ({"V": 1.0}, 50.9, False, 0.02), ({"MN": 1.0}, 54.9, False, 0.03),
    ({"NI": 1.0}, 58.7, False, 0.04), ({"NA": 1.0}, 23.0, False, 0.02),
)
_APOGEE_CHIPS = ((15150.0, 15800.0), (15860.0, 16430.0), (16480.0, 16950.0))
_LINE_SEED = 20250101           # fixed: every survey shares the same "physics"
_BLOCK = 1e-3                   # line-list block width in ln(wavelength)
_LINES_PER_BLOCK = 4.5          # ~500 lines over the APOGEE range
_C_KMS = 299792.458
_THETA_REF, _LOGG_REF = 5040.0 / 4800.0, 2.5
_MAX_DEPTH = 0.9                # a single line never removes all the light


class SyntheticSurvey(NamedTuple):
    """A synthetic survey; unpacks as ``labels, label_names, wavelength, flux, ivar``.

    labels : (n_stars, n_labels) float64, in the order of ``label_names``.
    label_names : tuple of str.
    wavelength : (n_pixels,) float64, vacuum Angstrom.
    flux : (n_stars, n_pixels) float64, continuum normalised; NaN where ivar == 0.
    ivar : (n_stars, n_pixels) float64, inverse variance of flux; 0 = ignore.
    """

    labels: np.ndarray
    label_names: tuple
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray


def apogee_wavelength(n_pixels=7514):
    """APOGEE-like log-linear vacuum wavelength grid over the three detector chips.

    Pixels are shared among the chips (15150-15800, 15860-16430, 16480-16950 A)
    in proportion to their ln-wavelength ranges; 7514 pixels gives the APOGEE
    step of ~6e-6 dex.  Returns a (n_pixels,) float64 array in Angstrom.
    """
    n_pixels = _check_count(n_pixels, "n_pixels")
    spans = np.log([hi / lo for lo, hi in _APOGEE_CHIPS])
    share = n_pixels * spans / spans.sum()
    counts = np.floor(share).astype(int)
    # Largest-remainder rounding so the counts add up exactly.
    counts[np.argsort(counts - share)[: n_pixels - counts.sum()]] += 1
    return np.concatenate([np.geomspace(lo, hi, n) for (lo, hi), n
                           in zip(_APOGEE_CHIPS, counts) if n > 0])


def synthetic_spectra(labels, label_names=_REQUIRED, wavelength=None):
    """Noiseless continuum-normalised spectra for given labels.

    labels : (n_stars, n_labels) or (n_labels,) array in the order of
        ``label_names`` (TEFF [K], LOGG [dex], FE_H [dex], X_FE [dex]).
        Elements without an X_FE label follow the default Galactic trend.
    wavelength : (n_pixels,) increasing array in Angstrom; None for
        ``apogee_wavelength()``.
    Returns flux of shape (n_stars, n_pixels) (or (n_pixels,) for 1-D
    labels), float64, all values in (0, 1].  Each star's spectrum is
    bit-identical whichever batch of stars it is computed with.
    """
    names = _check_label_names(label_names)
    wavelength = apogee_wavelength() if wavelength is None else _check_wavelength(wavelength)
    labels = np.asarray(labels, dtype=np.float64)
    single = labels.ndim == 1
    labels = np.atleast_2d(labels)
    if labels.ndim != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels must have shape (n_stars, {len(names)}) to match "
                         f"label_names, got {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError("labels must be finite")
    col = {name: labels[:, i] for i, name in enumerate(names)}
    if np.any(col["TEFF"] <= 0):
        raise ValueError("labels: TEFF must be positive")

    teff, logg, feh = col["TEFF"], col["LOGG"], col["FE_H"]
    default_xfe = _default_xfe(feh, logg)
    xh = np.column_stack([feh] + [feh + col.get(f"{e}_FE", default_xfe[:, k])
                                  for k, e in enumerate(_ELEMENTS)])
    lines = _line_list(float(wavelength[0]), float(wavelength[-1]))
    theta = 5040.0 / teff

    # Opacity: abundance x Boltzmann-Saha temperature term x pressure term.
    # Elementwise sum rather than a BLAS matmul keeps each star's spectrum
    # bit-identical whatever batch it is computed in.
    species_xh = (xh[:, None, :] * _composition()).sum(axis=2)
    log_tau = (lines["log_tau0"] + species_xh[:, lines["species"]]
               + np.outer(theta - _THETA_REF, lines["chi"])
               + np.outer(logg - _LOGG_REF, lines["p"]))
    # Beyond ~1e30 a line is black over its core anyway; capping avoids inf * 0.
    tau = 10.0 ** np.minimum(log_tau, 30.0)
    # Gaussian velocity width [km/s]: instrument (R=22500), thermal,
    # microturbulence (falls with logg) and pressure broadening (rises with logg).
    sigma_inst = _C_KMS / (22500.0 * np.sqrt(8.0 * np.log(2.0)))
    xi = np.clip(2.2 - 0.25 * logg, 0.5, None)
    sigma_v = np.sqrt(sigma_inst ** 2 + 0.008314 * np.outer(teff, 1.0 / lines["mass"])
                      + 0.5 * xi[:, None] ** 2
                      + np.outer(10.0 ** (0.3 * (logg - _LOGG_REF)), lines["gamma"]) ** 2)
    sigma = sigma_v * (lines["wavelength"] / _C_KMS)

    # Each line is cut per star where it changes the flux by < 1e-8 (so a star's
    # spectrum does not depend on its batch) and evaluated in a window covering
    # all stars' cuts, which keeps the cost at n_stars x n_lines x window.
    cut2 = 2.0 * np.log(np.maximum(_MAX_DEPTH * tau / 1e-8, 1.0))
    half = (sigma * np.sqrt(cut2)).max(axis=0)
    lo = np.searchsorted(wavelength, lines["wavelength"] - half, side="left")
    hi = np.searchsorted(wavelength, lines["wavelength"] + half, side="right")
    flux = np.ones((labels.shape[0], wavelength.size))
    for j in np.flatnonzero(hi > lo):
        x2 = ((wavelength[lo[j]:hi[j]] - lines["wavelength"][j]) / sigma[:, j, None]) ** 2
        profile = np.where(x2 <= cut2[:, j, None], np.exp(-0.5 * x2), 0.0)
        # Saturating (curve-of-growth) profile, applied multiplicatively so blends
        # combine like optical depths.
        flux[:, lo[j]:hi[j]] *= 1.0 + _MAX_DEPTH * np.expm1(-tau[:, j, None] * profile)
    return flux[0] if single else flux


def synthetic_survey(n_stars, *, label_names=_REQUIRED, n_pixels=7514,
                     wavelength=None, snr=100.0, bad_pixel_fraction=0.0, seed=0):
    """Draw a seeded synthetic survey of red giants (~85%) and dwarfs (~15%).

    n_stars : int >= 1.
    label_names : names from ``SUPPORTED_LABELS``; must include TEFF, LOGG, FE_H.
    n_pixels : pixels of the default APOGEE-like grid (``apogee_wavelength``);
        with an explicit ``wavelength`` it must be left at 7514 or equal its length.
    wavelength : optional (n_pixels,) strictly increasing array in Angstrom.
    snr : scalar or (n_stars,) per-star S/N > 0; noise sigma = 1/snr per pixel.
        None gives noiseless flux with a nominal ivar of 1e4 (S/N 100).
    bad_pixel_fraction : fraction in [0, 1) of pixels per star, chosen at random,
        that get ivar = 0 and flux = NaN.
    seed : seed for ``numpy.random.default_rng``.  The labels depend only on
        ``seed`` and ``n_stars``; the line list never depends on ``seed``.
    Returns a ``SyntheticSurvey`` (labels (n_stars, n_labels), label_names,
    wavelength (n_pixels,), flux and ivar (n_stars, n_pixels)), all float64.
    """
    n_stars = _check_count(n_stars, "n_stars")
    names = _check_label_names(label_names)
    n_pixels = _check_count(n_pixels, "n_pixels")
    if wavelength is None:
        wavelength = apogee_wavelength(n_pixels)
    else:
        wavelength = _check_wavelength(wavelength)
        if n_pixels not in (7514, wavelength.size):
            raise ValueError(f"n_pixels={n_pixels} does not match len(wavelength)="
                             f"{wavelength.size}")
    if snr is not None:
        try:
            snr = np.asarray(snr, dtype=np.float64)
        except (TypeError, ValueError):
            snr = np.full(0, np.nan)  # rejected just below
        if snr.ndim == 0:
            snr = np.full(n_stars, snr)
        if snr.shape != (n_stars,) or not np.all(np.isfinite(snr) & (snr > 0)):
            raise ValueError("snr must be None, a finite scalar > 0 or an array of "
                             f"shape ({n_stars},) with finite values > 0")
    try:
        fraction = float(bad_pixel_fraction)
    except (TypeError, ValueError):
        fraction = np.nan  # rejected just below
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"bad_pixel_fraction must be in [0, 1), got {bad_pixel_fraction!r}")

    rng = np.random.default_rng(seed)
    all_labels = _draw_labels(rng, n_stars)
    labels = all_labels[:, [SUPPORTED_LABELS.index(n) for n in names]]
    flux = synthetic_spectra(labels, names, wavelength)
    if snr is None:
        ivar = np.full(flux.shape, 1e4)
    else:
        flux += rng.standard_normal(flux.shape) / snr[:, None]
        ivar = np.repeat((snr ** 2)[:, None], wavelength.size, axis=1)
    n_bad = int(round(fraction * wavelength.size))
    if n_bad > 0:
        keys = rng.random(flux.shape)
        bad = keys <= np.partition(keys, n_bad - 1, axis=1)[:, n_bad - 1, None]
        flux[bad] = np.nan
        ivar[bad] = 0.0
    return SyntheticSurvey(labels, names, wavelength, flux, ivar)


def _alpha_trend(feh):
    # Plateau of +0.3 below the knee at [Fe/H] = -0.7, declining to ~0 at solar.
    return 0.3 * np.clip(-feh / 0.7, -0.15, 1.0)


def _giant_mixing(logg):
    return np.clip((3.5 - logg) / 2.5, 0.0, 1.0)


def _default_xfe(feh, logg):
    """Mean [X/Fe] trend, (n_stars, n_elements), used for unlabelled elements."""
    offset, alpha, slope, mixing, _ = _XFE_MODEL.T
    return (offset + np.outer(_alpha_trend(feh), alpha) + np.outer(feh, slope)
            + np.outer(_giant_mixing(logg), mixing))


def _draw_labels(rng, n):
    """All SUPPORTED_LABELS for n stars, (n, 17): giant branch plus dwarfs."""
    feh = np.clip(rng.normal(-0.2, 0.3, n), -1.5, 0.5)
    dwarf = rng.random(n) < 0.15
    # Giants: metal-poor branches are hotter at fixed gravity.
    logg_giant = rng.uniform(0.8, 3.5, n)
    teff_giant = 4700.0 + 450.0 * (logg_giant - 2.4) - 200.0 * feh + rng.normal(0, 80, n)
    teff_dwarf = rng.uniform(4200.0, 6000.0, n)
    logg_dwarf = 4.65 - 0.25 * (teff_dwarf - 4200.0) / 1800.0 + rng.normal(0, 0.08, n)
    teff = np.clip(np.where(dwarf, teff_dwarf, teff_giant), 3800.0, 6000.0)
    logg = np.where(dwarf, logg_dwarf, logg_giant)
    # A shared alpha offset makes the alpha elements scatter together.
    alpha_offset = rng.normal(0.0, 0.04, n)
    xfe = (_default_xfe(feh, logg) + np.outer(alpha_offset, _XFE_MODEL[:, 1])
           + rng.standard_normal((n, len(_ELEMENTS))) * _XFE_MODEL[:, 4])
    return np.column_stack([teff, logg, feh, xfe])


@functools.lru_cache(maxsize=8)
def _line_list(wl_min, wl_max):
    """Lines affecting [wl_min, wl_max] Angstrom, as read-only arrays.

    Lines are generated per fixed block of ln(wavelength) from a constant seed,
    so overlapping wavelength ranges share exactly the same lines.
    """
    pad = 3e-4  # in ln(wavelength), ~5 A at 1.6 um: nearby lines reach the edges
    species = np.array([s[3] for s in _SPECIES])
    columns = {k: [] for k in ("ln_wavelength", "species", "log_tau0", "chi", "p", "gamma")}
    ln_min, ln_max = np.log(wl_min) - pad, np.log(wl_max) + pad
    for block in range(int(np.floor(ln_min / _BLOCK)), int(np.floor(ln_max / _BLOCK)) + 1):
        rng = np.random.default_rng([_LINE_SEED, block])
        m = rng.poisson(_LINES_PER_BLOCK)
        kind = rng.choice(len(_SPECIES), size=m, p=species / species.sum())
        molecular = np.array([_SPECIES[k][2] for k in kind], dtype=bool)
        columns["ln_wavelength"].append(_BLOCK * (block + rng.random(m)))
        columns["species"].append(kind)
        # Depths ~0.05-0.5 at the reference star; molecules vanish in hot stars.
        columns["log_tau0"].append(rng.uniform(np.log10(0.06), np.log10(1.0), m))
        columns["chi"].append(np.where(molecular, rng.uniform(2.0, 3.5, m),
                                       rng.uniform(-1.0, 2.0, m)))
        columns["p"].append(np.where(molecular, rng.uniform(-0.4, -0.1, m),
                                     rng.uniform(-0.2, 0.3, m)))
        columns["gamma"].append(np.where(molecular, rng.uniform(0.1, 0.3, m),
                                         rng.uniform(0.2, 1.2, m)))
    lines = {k: np.concatenate(v) for k, v in columns.items()}
    keep = (lines["ln_wavelength"] > ln_min) & (lines["ln_wavelength"] < ln_max)
    lines = {k: v[keep] for k, v in lines.items()}
    lines["wavelength"] = np.exp(lines.pop("ln_wavelength"))
    lines["mass"] = np.array([s[1] for s in _SPECIES])[lines["species"]]
    for v in lines.values():
        v.flags.writeable = False
    return lines


@functools.cache
def _composition():
    """(n_species, 1 + n_elements) weights of [Fe/H], [C/H], ... in each species."""
    elements = ("FE",) + _ELEMENTS
    composition = np.zeros((len(_SPECIES), len(elements)))
    for k, (weights, _, _, _) in enumerate(_SPECIES):
        for element, w in weights.items():
            composition[k, elements.index(element)] = w
    composition.flags.writeable = False
    return composition


def _check_count(value, name):
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if isinstance(value, bool) or count < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return count


def _check_label_names(label_names):
    if isinstance(label_names, str):
        raise ValueError("label_names must be a sequence of names, not a single string")
    names = tuple(label_names)
    unknown = [n for n in names if n not in SUPPORTED_LABELS]
    if unknown:
        raise ValueError(f"label_names: unknown label(s) {unknown}; supported "
                         f"(upper case): {SUPPORTED_LABELS}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label_names: duplicate label(s) {duplicates}")
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise ValueError(f"label_names: missing required label(s) {missing}")
    return names


def _check_wavelength(wavelength):
    try:
        wavelength = np.asarray(wavelength, dtype=np.float64)
    except (TypeError, ValueError):
        wavelength = np.full(0, np.nan)  # rejected just below
    if (wavelength.ndim != 1 or wavelength.size < 1 or not np.all(np.isfinite(wavelength))
            or np.any(wavelength <= 0) or np.any(np.diff(wavelength) <= 0)):
        raise ValueError("wavelength must be a 1-D, finite, positive, strictly "
                         "increasing array in Angstrom")
    return wavelength
