"""Input validation shared by both backends, so the same bad input raises the same error.

Every check names the argument and the problem. Arrays come back as C-contiguous float64.
"""

import operator

import numpy as np


def as_float_array(name, value, ndim, dtype=np.float64):
    """``value`` as a C-contiguous ``dtype`` (float64) array of ``ndim`` dimensions, at least
    one element."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # e.g. ragged nested lists
        raise TypeError(f"{name} must be array-like of numbers: {exc}") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return np.ascontiguousarray(array, dtype=dtype)


def finite_array(name, value, ndim, dtype=np.float64):
    """As as_float_array, and every value finite (after the conversion to ``dtype``)."""
    array = as_float_array(name, value, ndim, dtype)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def spectra(flux, ivar, n_pixels=None):
    """Check a (n_spectra, n_pixels) flux and ivar pair.

    ivar must be finite and >= 0; flux must be finite wherever ivar > 0 (where ivar == 0
    the pixel is ignored and its flux may be NaN). A 1-D pair is one spectrum.
    Returns (flux, ivar) as 2-D float64 arrays.
    """
    flux = as_float_array("flux", flux, np.ndim(flux) if np.ndim(flux) in (1, 2) else 2)
    ivar = as_float_array("ivar", ivar, flux.ndim)
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar must have the same shape, got {flux.shape} and {ivar.shape}")
    if n_pixels is not None and flux.shape[1] != n_pixels:
        raise ValueError(f"flux has {flux.shape[1]} pixels, the model has {n_pixels}")
    # One pass in blocks of rows of ~1 MB, so that the masks stay in cache (a third faster than
    # whole-array masks on a survey of 1000 x 8575); errors in the order of the checks below.
    rows = max(1, (1 << 17) // flux.shape[1])
    nonfinite_ivar = negative_ivar = bad_flux = False
    for start in range(0, flux.shape[0], rows):
        iv, f = ivar[start:start + rows], flux[start:start + rows]
        nonfinite_ivar = nonfinite_ivar or not np.all(np.isfinite(iv))
        negative_ivar = negative_ivar or bool(np.any(iv < 0))
        bad_flux = bad_flux or bool(np.any((iv > 0) & ~np.isfinite(f)))
    if nonfinite_ivar:
        raise ValueError("ivar contains NaN or inf")
    if negative_ivar:
        raise ValueError("ivar contains negative values")
    if bad_flux:
        bad = (ivar > 0) & ~np.isfinite(flux)
        star, pixel = np.argwhere(bad)[0]
        raise ValueError(f"flux is NaN or inf where ivar > 0 ({int(bad.sum())} pixels, "
                         f"first at spectrum {star}, pixel {pixel})")
    return flux, ivar


def labels(value, n_labels, name="labels"):
    """Finite (n_stars, n_labels) labels; a 1-D vector is one star."""
    array = as_float_array(name, value, np.ndim(value) if np.ndim(value) in (1, 2) else 2)
    array = np.atleast_2d(array)
    if array.shape[1] != n_labels:
        raise ValueError(f"{name} must have {n_labels} columns (one per label), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def thread_count(n_threads):
    """A positive int thread count."""
    if isinstance(n_threads, bool):
        raise TypeError("n_threads must be an int or None, got bool")
    try:
        n_threads = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}") from None
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return n_threads


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


def flag(name, value):
    """A bool (or NumPy bool) option as a bool; anything else is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def nonnegative_float(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def validation_split(rng, n_stars, validation_fraction):
    """Seeded (validation rows, training rows) holding out ``validation_fraction``."""
    fraction = float(validation_fraction)
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    n_val = int(round(fraction * n_stars))
    split = rng.permutation(n_stars)
    if n_stars - n_val == 0:
        raise ValueError("validation_fraction leaves no training stars")
    return split[:n_val], split[n_val:]


# --- The Cannon's function-level arguments (both backends) -----------------------------

#: Largest power of a label in a term (as MAX_EXPONENT in cpp/src/bind_cannon.cpp).
MAX_EXPONENT = 64


def exponents(value):
    """(n_terms, n_labels) non-negative integer exponent table with the constant term first."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"exponents must be integers, got dtype {array.dtype}")
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"exponents must be a non-empty 2-D table, got shape {array.shape}")
    if np.any(array < 0):
        raise ValueError("exponents must be >= 0")
    if np.any(array > MAX_EXPONENT):   # the compiled core tabulates every power up to the largest
        raise ValueError(f"exponents must be <= {MAX_EXPONENT}")
    if np.any(array[0] != 0):
        raise ValueError("exponents: the first term must be the constant (all zeros)")
    return np.ascontiguousarray(array, dtype=np.int32)


def theta(value, n_terms):
    """(n_pixels, n_terms) coefficients; NaN allowed (untrained pixels)."""
    array = as_float_array("theta", value, 2)
    if array.shape[1] != n_terms:
        raise ValueError(f"theta must have {n_terms} columns (one per term), got shape {array.shape}")
    return array


def scatter(value, n_pixels):
    """(n_pixels,) intrinsic variance s2 >= 0; inf marks an untrained pixel."""
    array = as_float_array("s2", value, 1)
    if array.shape != (n_pixels,):
        raise ValueError(f"s2 must have shape ({n_pixels},), got {array.shape}")
    if np.any(np.isnan(array)) or np.any(array < 0):
        raise ValueError("s2 must be >= 0 (inf marks an untrained pixel)")
    return array


def starting_points(value, n_spectra, n_labels):
    """Starting points as (n_spectra, n_starts, n_labels).

    Accepts (n_labels,) (one start for all), (n_starts, n_labels) (the same starts for all)
    or (n_spectra, n_starts, n_labels).
    """
    array = as_float_array("initial", value, np.ndim(value) if np.ndim(value) in (1, 2, 3) else 3)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim == 2:
        array = np.broadcast_to(array, (n_spectra,) + array.shape)
    if array.shape[0] != n_spectra or array.shape[2] != n_labels:
        raise ValueError(f"initial must have shape (n_labels,), (n_starts, n_labels) or "
                         f"({n_spectra}, n_starts, {n_labels}), got {np.shape(value)}")
    if not np.all(np.isfinite(array)):
        raise ValueError("initial contains NaN or inf")
    return np.ascontiguousarray(array)


def box(lower, upper, n_labels):
    """Optional (n_labels,) lower and upper bounds (each may be None; -inf/inf allowed)."""
    out = []
    for name, value in (("lower", lower), ("upper", upper)):
        if value is None:
            out.append(None)
            continue
        array = as_float_array(name, value, 1)
        if array.shape != (n_labels,) or np.any(np.isnan(array)):
            raise ValueError(f"{name} must be ({n_labels},) numbers, got shape {array.shape}")
        out.append(array)
    if out[0] is not None and out[1] is not None and np.any(out[0] > out[1]):
        raise ValueError("lower must be <= upper")
    return out[0], out[1]


def term_mask(value, n_pixels, n_terms):
    """Optional (n_pixels, n_terms) bool censoring mask (True: the term may be non-zero)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype != bool:
        raise TypeError(f"term_mask must be boolean, got dtype {array.dtype}")
    if array.shape != (n_pixels, n_terms):
        raise ValueError(f"term_mask must have shape ({n_pixels}, {n_terms}), got {array.shape}")
    if not np.all(array[:, 0]):
        raise ValueError("term_mask: the constant term cannot be censored")
    return np.ascontiguousarray(array)


def training_arguments(exponents_value, x, flux, ivar, regularization, mask, s2, n_threads):
    """Check the arguments of cannon_train; returns them converted (n_threads only checked)."""
    if n_threads is not None:
        thread_count(n_threads)
    exps = exponents(exponents_value)
    x = labels(x, exps.shape[1], name="x")
    flux, ivar = spectra(flux, ivar)
    if flux.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} stars but flux has {flux.shape[0]}")
    regularization = nonnegative_float("regularization", regularization)
    mask = term_mask(mask, flux.shape[1], exps.shape[0])
    if s2 is not None:
        s2 = scatter(np.broadcast_to(np.asarray(s2, dtype=float), (flux.shape[1],)), flux.shape[1])
        if not np.all(np.isfinite(s2)):
            raise ValueError("s2 must be finite when given for training")
    return exps, x, flux, ivar, regularization, mask, s2


def fit_arguments(exponents_value, theta_value, s2, flux, ivar, initial, lower, upper, max_iter,
                  n_threads):
    """Check the arguments of cannon_fit; returns them converted (n_threads only checked)."""
    if n_threads is not None:
        thread_count(n_threads)
    exps = exponents(exponents_value)
    theta_value = theta(theta_value, exps.shape[0])
    s2 = scatter(s2, theta_value.shape[0])
    flux, ivar = spectra(flux, ivar, n_pixels=theta_value.shape[0])
    initial = starting_points(initial, flux.shape[0], exps.shape[1])
    lower, upper = box(lower, upper, exps.shape[1])
    max_iter = positive_int("max_iter", max_iter)
    return exps, theta_value, s2, flux, ivar, initial, lower, upper, max_iter
