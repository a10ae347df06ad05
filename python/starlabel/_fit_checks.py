"""Argument checks of the spectrum-fitting kernels, shared by both backends so that the same
bad input raises the same error. Arrays come back C-contiguous float64 (int32 for indices).

Two small dicts describe a fit to the kernels:

- ``emulator``: ``{"kind": "perpixel", "w0", "b0", "w1", "b1"}`` (and "w2", "b2" for the
  paper-era networks),
  ``{"kind": "mlp", "weights", "biases", "activation", "slope"}`` (the fit works in float64;
  for a float32 network, all weights float32, the product with its last layer that forms the
  Jacobian runs in float32, as ``last_weights_f32`` in the checked copy) or
  ``{"kind": "cannon", "exponents", "theta"}`` (theta finite: 0 at untrained pixels);
- ``layout``: ``{"model_wavelength", "wavelength", "segment_index", "segment_coord",
  "n_segments", "n_coef", "fit_rv"}`` (see ``starlabel.fitting``).
"""

import numpy as np

from . import _validation as check
from . import payne_io

KINDS = ("perpixel", "mlp", "cannon")


def emulator(spec):
    """Checked copy of an emulator dict with float64 arrays; returns (spec, n_labels, n_pixels)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise TypeError("emulator must be a dict with a 'kind' key")
    kind = check.choice("emulator kind", spec["kind"], KINDS)
    try:
        if kind == "perpixel":
            given = [spec[k] for k in payne_io.PERPIXEL_KEYS[:4]] + [
                spec.get(k) for k in payne_io.PERPIXEL_KEYS[4:]]
            net, _ = payne_io.perpixel_network(*(None if v is None else
                                                 np.asarray(v, dtype=np.float64) for v in given))
            return {"kind": kind, **net}, net["w0"].shape[2], net["w0"].shape[0]
        if kind == "mlp":
            given = [np.asarray(w) for w in spec["weights"]]
            weights, biases, _ = payne_io.network([np.asarray(w, dtype=np.float64) for w in given],
                                                  [np.asarray(b, dtype=np.float64) for b in spec["biases"]])
            payne_io.activation(spec["activation"], spec["slope"])
            float32 = all(w.dtype == np.float32 for w in given)
            return ({"kind": kind, "weights": weights, "biases": biases,
                     "activation": spec["activation"], "slope": float(spec["slope"]),
                     "last_weights_f32": np.ascontiguousarray(given[-1]) if float32 else None},
                    weights[0].shape[1], weights[-1].shape[0])
        exps = check.exponents(spec["exponents"])
        theta = check.finite_array("theta", spec["theta"], 2)
        if theta.shape[1] != exps.shape[0]:
            raise ValueError(f"theta must have {exps.shape[0]} columns, got shape {theta.shape}")
        return {"kind": kind, "exponents": exps, "theta": theta}, exps.shape[1], theta.shape[0]
    except KeyError as exc:
        raise ValueError(f"emulator of kind {kind!r} lacks {exc}") from None


def layout(value, n_labels, n_model):
    """Checked copy of a layout dict; adds ``n_params``."""
    if not isinstance(value, dict):
        raise TypeError("layout must be a dict")
    try:
        model_wave = check.finite_array("model_wavelength", value["model_wavelength"], 1)
        wave = check.finite_array("wavelength", value["wavelength"], 1)
        seg = np.asarray(value["segment_index"])
        coord = check.finite_array("segment_coord", value["segment_coord"], 1)
        n_segments = check.positive_int("n_segments", value["n_segments"], minimum=0)
        n_coef = check.positive_int("n_coef", value["n_coef"], minimum=0)
        fit_rv = value["fit_rv"]
    except KeyError as exc:
        raise ValueError(f"layout lacks {exc}") from None
    if model_wave.size != n_model:
        raise ValueError(f"model_wavelength has {model_wave.size} pixels, the emulator {n_model}")
    if np.any(np.diff(model_wave) <= 0):
        raise ValueError("model_wavelength must be strictly increasing")
    if not np.issubdtype(seg.dtype, np.integer) or seg.shape != wave.shape:
        raise ValueError(f"segment_index must be integers of shape {wave.shape}")
    if coord.shape != wave.shape:
        raise ValueError(f"segment_coord must have shape {wave.shape}")
    if np.any(seg < -1) or np.any(seg >= n_segments):
        raise ValueError("segment_index must lie in [-1, n_segments)")
    out = {"model_wavelength": model_wave, "wavelength": wave,
           "segment_index": np.ascontiguousarray(seg, dtype=np.int32), "segment_coord": coord,
           "n_segments": n_segments, "n_coef": n_coef, "fit_rv": check.flag("fit_rv", fit_rv),
           "kernels": None, "kernel_segments": None, "fit_sigma": None, "fit_vsini": None}
    if value.get("fit_sigma") is not None:
        out["fit_sigma"] = _fit_sigma(value["fit_sigma"])
    if value.get("fit_vsini") is not None:
        out["fit_vsini"] = _fit_vsini(value["fit_vsini"])
        if out["fit_sigma"] is not None and out["fit_sigma"][0] != out["fit_vsini"][0]:
            raise ValueError("fit_sigma and fit_vsini must have the same velocity step")
    fitted = int(out["fit_sigma"] is not None) + int(out["fit_vsini"] is not None)
    if value.get("kernels") is not None or fitted:
        out["kernels"], out["kernel_segments"] = _kernels(value, n_model)
    out["n_labels"] = n_labels
    out["n_params"] = n_labels + int(fit_rv) + fitted + n_segments * n_coef
    return out


def _fit_sigma(value):
    """(step km/s per model pixel, Gaussian taps each side) of a fitted broadening sigma."""
    try:
        step, half = value
    except (TypeError, ValueError):
        raise TypeError("fit_sigma must be None or a (step, half_width) pair") from None
    step = float(step)
    if not (np.isfinite(step) and step > 0) or int(half) != half or not 0 <= half <= 100000:
        raise ValueError("fit_sigma must be (step > 0 km/s, 0 <= half-width <= 1e5 pixels)")
    return step, int(half)


def _fit_vsini(value):
    """(step km/s per model pixel, rotational taps each side, limb darkening) of a fitted
    v sin i."""
    try:
        step, half, eps = value
    except (TypeError, ValueError):
        raise TypeError("fit_vsini must be None or a (step, half_width, limb_darkening) "
                        "triple") from None
    step, eps = float(step), float(eps)
    if (not (np.isfinite(step) and step > 0) or int(half) != half or not 0 <= half <= 100000
            or not 0 <= eps <= 1):
        raise ValueError("fit_vsini must be (step > 0 km/s, 0 <= half-width <= 1e5 pixels, "
                         "0 <= limb darkening <= 1)")
    return step, int(half), eps


def _kernels(value, n_model):
    """Fixed broadening kernels (n_rows, n_taps; or None) on the model grid and the runs
    they stay in."""
    kernels = None
    if value.get("kernels") is not None:
        kernels = check.finite_array("kernels", value["kernels"], 2)
        if (kernels.shape[1] % 2 != 1 or np.any(kernels < 0)
                or np.any(kernels[:, kernels.shape[1] // 2] <= 0)):
            raise ValueError("kernels must have an odd number of taps, be >= 0 and > 0 at the "
                             "centre")
    runs = np.asarray(value.get("kernel_segments"))
    if (runs.ndim != 2 or runs.shape[1:] != (2,) or not np.issubdtype(runs.dtype, np.integer)
            or runs.size == 0 or runs[0, 0] != 0 or runs[-1, 1] != n_model
            or np.any(runs[1:, 0] != runs[:-1, 1]) or np.any(runs[:, 1] <= runs[:, 0])):
        raise ValueError("kernel_segments must split [0, n_model) into consecutive runs")
    return kernels, np.ascontiguousarray(runs, dtype=np.int64)


def kernel_rows(lay, n_rows):
    """Check that the layout's kernels have 1 or n_rows rows."""
    if lay["kernels"] is not None and lay["kernels"].shape[0] not in (1, n_rows):
        raise ValueError(f"kernels must have 1 or {n_rows} rows, got {lay['kernels'].shape[0]}")


def spectrum_model_arguments(spec, lay, params, n_threads):
    """Check the arguments of spectrum_model; returns (spec, layout, params (n, n_params))
    converted."""
    if n_threads is not None:
        check.thread_count(n_threads)
    spec, n_labels, n_model = emulator(spec)
    lay = layout(lay, n_labels, n_model)
    ndim = np.ndim(params)
    params = np.atleast_2d(check.as_float_array("params", params, ndim if ndim in (1, 2) else 2))
    if params.shape[1] != lay["n_params"]:
        raise ValueError(f"params must have {lay['n_params']} columns, got shape {params.shape}")
    if not np.all(np.isfinite(params)):   # else each backend fails its own way (or not at all)
        raise ValueError("params contains NaN or inf")
    kernel_rows(lay, params.shape[0])
    return spec, lay, params


def fit_arguments(spec, lay, flux, ivar, initial, extra_variance, lower, upper, max_iter, n_threads):
    """Check the arguments of spectrum_fit; returns them converted."""
    if n_threads is not None:
        check.thread_count(n_threads)
    spec, n_labels, n_model = emulator(spec)
    lay = layout(lay, n_labels, n_model)
    n_params = lay["n_params"]
    flux, ivar = check.spectra(flux, ivar, n_pixels=lay["wavelength"].size)
    kernel_rows(lay, flux.shape[0])
    initial = check.starting_points(initial, flux.shape[0], n_params)
    if extra_variance is not None:
        extra_variance = check.as_float_array("extra_variance", extra_variance, 1)
        if extra_variance.shape != (lay["wavelength"].size,) or np.any(np.isnan(extra_variance)) \
                or np.any(extra_variance < 0):
            raise ValueError("extra_variance must be (n_pixels,) values >= 0 (inf ignores a pixel)")
    lower, upper = check.box(lower, upper, n_params)
    max_iter = check.positive_int("max_iter", max_iter)
    return spec, lay, flux, ivar, initial, extra_variance, lower, upper, max_iter


def rv_grid_arguments(lay, templates, flux, weight, velocities, n_threads):
    """Check the arguments of rv_chi2_grid; returns them converted."""
    if n_threads is not None:
        check.thread_count(n_threads)
    templates = check.finite_array("templates", templates, 3)
    lay = layout(lay, 0, templates.shape[2])
    flux = check.as_float_array("flux", flux, 2)
    weight = check.as_float_array("weight", weight, 2)
    if flux.shape != weight.shape or flux.shape[1] != lay["wavelength"].size:
        raise ValueError(f"flux and weight must both have shape (n_spectra, {lay['wavelength'].size})")
    if templates.shape[0] != flux.shape[0]:
        raise ValueError(f"templates must have shape ({flux.shape[0]}, n_templates, n_model)")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("weight must be finite and >= 0")
    if np.any((weight > 0) & ~np.isfinite(flux)):
        raise ValueError("flux is NaN or inf where weight > 0")
    velocities = check.finite_array("velocities", velocities, 1)
    if np.any(np.abs(velocities) >= 299792.458):
        raise ValueError("velocities must satisfy |v| < c")
    return lay, templates, flux, weight, velocities
