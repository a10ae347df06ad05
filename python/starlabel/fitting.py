"""``fit_spectra``: labels, radial velocity and continuum of observed spectra, with any emulator
(``PayneModel``, ``PerPixelPayneModel``, ``CannonModel``).

The model of an observed spectrum at observed pixel p (wavelength lambda_p) is

    m_p = C_s(t_p) * F(lambda_p / D(rv)),    D(rv) = sqrt((1 + rv/c) / (1 - rv/c)),

with F the emulator's spectrum on its own rest-frame grid (optionally broadened there by a
Gaussian and a rotational kernel per spectrum, the Gaussian's width fixed or fitted),
linearly interpolated at the rest wavelength of the pixel (so observed spectra may sit on a
different grid: the model is resampled inside the fit), and C_s a Chebyshev series per
wavelength segment s (t_p in [-1, 1] across the segment's pixels). Labels, rv, the
broadening width and continuum coefficients are fitted jointly
by Levenberg-Marquardt with analytic derivatives, many spectra in parallel in the compiled
core, in float64 (with a float32 network the largest product of its Jacobian, with the last
layer, runs in float32: the Jacobian only steers the steps and sets the covariance). Before LM a chi2 grid over ``rv_range`` (with the continuum solved linearly at every
trial velocity) finds the global RV minimum; LM alone would stop at the nearest local one.

Pixels whose rest wavelength could fall outside the model grid, or into one of its gaps
(e.g. between APOGEE's chips) or onto an untrained Cannon pixel, are given zero weight:
for the RV search over the whole ``rv_range``, for the fit within a margin around the RV
the search found.
"""

import itertools

import numpy as np

from . import _grid
from . import _validation as check
from . import fast, reference
from .augment import rotation_kernel
from .preprocess import gaussian_kernel
from .result import FitResult, lowest_chi2

C_KMS = 299792.458
BACKENDS = {"fast": fast, "reference": reference}
GAP_FACTOR = 4.0       # a model-grid step > 4x its neighbours' is a gap, not a pixel
RV_MARGIN_KMS = 10.0   # LM's coverage mask: search RV +- (2 grid steps + this)


class SpectrumFitResult(FitResult):
    """Result of ``fit_spectra``; every field has one row per spectrum.

    Attributes
    ----------
    labels : (n, n_labels) physical labels; ``errors`` their 1-sigma uncertainties
    rv, rv_error : (n,) km/s (0 and NaN when the RV is not fitted)
    continuum : (n, n_segments, n_coef) Chebyshev coefficients per segment (empty if not fitted)
    sigma, sigma_error : (n,) fitted Gaussian broadening, km/s (None unless fitted)
    vsini, vsini_error : (n,) fitted rotational broadening v sin i, km/s (None unless fitted)
    param_names : label names, then "rv", "sigma", "vsini" (each if fitted), then
        "c<segment>_<k>"
    covariance : (n, n_params, n_params) inverse of J^T W J at the solution, physical units,
        plus a calibrated model's ``error_floor``^2 on the labels' diagonal
        (``formal_covariance`` without it)
    chi2, reduced_chi2 : (n,) reduced by (pixels used - n_params)
    n_pixels_used, n_iter, status : (n,) (FitStatus codes)
    rv_grid, rv_chi2 : (n_v,) trial velocities and (n, n_v) chi2 of the search (best start)
    rv_initial : (n,) the search's best velocity, where LM started
    model_flux : (n, n_pixels) best-fit model, or None unless ``return_model=True``
    """

    def __init__(self, label_names, param_names, labels, rv, continuum, covariance, chi2,
                 n_pixels_used, n_iter, status, rv_grid, rv_chi2, rv_initial, model_flux, fit_rv,
                 sigma=None, vsini=None, error_floor=None):
        super().__init__(label_names, labels, covariance, chi2, n_pixels_used, n_iter, status,
                         error_floor)
        self.param_names = tuple(param_names)
        self.rv = rv
        self.continuum = continuum
        self.rv_grid, self.rv_chi2, self.rv_initial = rv_grid, rv_chi2, rv_initial
        self.model_flux = model_flux
        n_labels = len(self.label_names)
        self.rv_error = (np.sqrt(covariance[:, n_labels, n_labels]) if fit_rv
                         else np.full(len(labels), np.nan))
        for name, value in (("sigma", sigma), ("vsini", vsini)):
            error = None
            if value is not None:
                k = self.param_names.index(name)
                error = np.sqrt(covariance[:, k, k])
            setattr(self, name, value)
            setattr(self, f"{name}_error", error)
        dof = n_pixels_used - len(self.param_names)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.reduced_chi2 = np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan)

    @property
    def errors(self):
        """(n, n_labels) 1-sigma label uncertainties."""
        n = len(self.label_names)
        return np.sqrt(np.diagonal(self.covariance, axis1=1, axis2=2)[:, :n])

    def to_table(self):
        table = super().to_table()
        table["rv"], table["E_rv"] = self.rv, self.rv_error
        for name in ("sigma", "vsini"):
            if getattr(self, name) is not None:
                table[name] = getattr(self, name)
                table[f"E_{name}"] = getattr(self, f"{name}_error")
        return table

    def __repr__(self):
        return "Spectrum" + super().__repr__()


def fit_spectra(model, flux, ivar, wavelength=None, *, fit_rv=True, rv_range=(-500.0, 500.0),
                rv_step=None, continuum_order=None, segments=None, broadening=None, mask=None,
                bounds="training", initial=None, every_start=False, max_iter=100,
                return_model=False, backend=None, n_threads=None):
    """Fit labels (and radial velocity, continuum and broadening) of observed spectra with an
    emulator.

    Parameters
    ----------
    model : PayneModel, PerPixelPayneModel or CannonModel (trained)
    flux, ivar : (n_spectra, n_pixels) or (n_pixels,); ivar == 0 ignores a pixel
    wavelength : (n_pixels,) observed wavelengths in Angstrom (astropy Quantity accepted);
        default the model's grid. The model's own grid is ``model.wavelength`` (if the model
        has none, ``wavelength`` is taken as the model grid and must match it in size).
    fit_rv : fit the radial velocity (km/s, positive receding, relativistic Doppler shift);
        if False the spectra must already be in the rest frame
    rv_range : (low, high) km/s, the RV search range and the RV bounds (default +-500)
    rv_step : km/s step of the RV chi2 grid; default half the model grid's pixel velocity
    continuum_order : None (no continuum) or the order of a multiplicative Chebyshev
        continuum fitted per segment
    segments : None (one segment) or a sequence of (low, high) wavelength ranges in Angstrom
        (e.g. APOGEE's three chips); with a continuum, pixels in no segment are ignored
    broadening : None, or broadening of the model (applied on its grid, before the Doppler
        shift) as a dict: ``"sigma"`` (km/s, Gaussian: macroturbulence and the instrumental
        profile) and ``"vsini"`` (km/s, rotation with linear limb darkening
        ``"limb_darkening"``, default 0.6): each a scalar or one value per spectrum (fixed),
        or ``"fit"`` to fit it up to ``"<name>_max"`` (sigma 50, vsini 100 km/s by default)
        and down to half a model pixel (sigma) or one (vsini) in velocity, below which the
        model cannot tell the width from zero. ``"<name>_start"``: a value or a sequence of
        starting values (sigma 5, vsini 10 and 30 km/s by default); every combination with
        every label start is a start. Needs a model grid uniform in log(wavelength) (gaps
        allowed).
    mask : bool (n_pixels,) or (n_spectra, n_pixels), True marks a pixel to leave out
    bounds : "training" (default: the model's training box), None (no label bounds) or a
        (lower, upper) pair of physical label arrays (+-inf allowed)
    initial : physical starting labels (n_labels,), (n_starts, n_labels) (e.g. ``start_grid``)
        or (n_spectra, n_starts, n_labels); default the centre of the training box (Payne) or
        the Cannon's 9 spread points. The RV search runs from every start of the labels (with
        the first start of each fitted width); LM from the start of lowest chi2.
    every_start : run LM from every start and keep the fit of lowest chi2, instead of from
        the start of lowest chi2 only: slower by the number of starts, for problems with
        several minima (both widths fitted, double-lined binaries)
    max_iter : LM trial steps per spectrum
    return_model : also return the best-fit model spectra (``model_flux``)
    backend : "fast" or "reference"; default the model's
    n_threads : threads of the compiled core (None: the default)

    Returns
    -------
    SpectrumFitResult
    """
    if n_threads is not None:
        check.thread_count(n_threads)
    desc = _describe(model)
    backend = BACKENDS[check.choice("backend", desc["backend"] if backend is None else backend,
                                    BACKENDS)]
    n_labels, n_model = len(desc["label_names"]), desc["n_model"]
    model_wave, obs_wave = _grids(desc["wavelength"], wavelength, n_model)
    flux, ivar = check.spectra(flux, ivar, n_pixels=obs_wave.size)
    n_spectra = flux.shape[0]
    ivar = np.where(_mask(mask, flux.shape), 0.0, ivar)
    fit_rv, every_start = check.flag("fit_rv", fit_rv), check.flag("every_start", every_start)
    rv_lo, rv_hi = _rv_range(rv_range)
    n_coef = 0 if continuum_order is None else check.positive_int("continuum_order",
                                                                  continuum_order, 0) + 1
    seg_index, seg_coord, n_segments = _segments(segments, obs_wave)
    if n_coef:
        ivar = np.where(seg_index[None, :] >= 0, ivar, 0.0)
    max_iter = check.positive_int("max_iter", max_iter)
    step = _rv_step(rv_step, model_wave)
    lower_x, upper_x = _label_bounds(bounds, desc)
    starts = desc["default_initial"] if initial is None else initial
    starts = desc["scale"](check.starting_points(starts, n_spectra, n_labels))
    n_starts = starts.shape[1]

    broad = _broadening(broadening, model_wave, n_spectra)
    widths = {} if broad is None else broad["fitted"]  # fitted broadening widths, in order

    layout = {"model_wavelength": model_wave, "wavelength": obs_wave,
              "segment_index": seg_index, "segment_coord": seg_coord,
              "n_segments": n_segments if n_coef else 0, "n_coef": n_coef, "fit_rv": fit_rv}
    if broad is not None:
        layout.update(kernels=broad["kernels"], kernel_segments=broad["segments"],
                      fit_sigma=broad["fit_sigma"], fit_vsini=broad["fit_vsini"])
    if not n_coef:
        layout["segment_index"] = np.full(obs_wave.size, -1, dtype=np.int32)
    extra = _extra_variance(desc, model_wave, obs_wave)
    bad_model = desc["untrained"]

    # RV search (and the continuum at the best velocity) from every start.
    velocities = np.array([0.0])
    if fit_rv:
        velocities = np.arange(rv_lo, rv_hi + 0.5 * step, step)
        velocities = np.unique(np.clip(velocities, rv_lo, rv_hi))
    rv_chi2 = None
    v0 = np.zeros((n_spectra, n_starts))
    coef0 = np.zeros((n_spectra, n_starts, layout["n_segments"] * n_coef))
    if fit_rv or n_coef:
        templates = _templates(backend, desc["emulator"], model_wave, starts,
                               None if broad is None else broad["template_kernels"],
                               None if broad is None else broad["segments"], n_threads)
        usable = _coverage(model_wave, bad_model, obs_wave, velocities.min(), velocities.max())
        weight = _weights(ivar * usable[None, :], extra)
        chi2_grid, best, coef0 = backend.rv_chi2_grid(
            dict(layout, fit_rv=False, fit_sigma=None, fit_vsini=None), templates, flux, weight,
            velocities, n_threads=n_threads)
        v0 = velocities[np.maximum(best, 0)]
        best_start = np.argmin(np.where(best >= 0, np.take_along_axis(
            chi2_grid, np.maximum(best, 0)[..., None], axis=2)[..., 0], np.inf), axis=1)
        rv_chi2 = chi2_grid[np.arange(n_spectra), best_start]
        centre = v0[np.arange(n_spectra), best_start]
    else:
        centre = np.zeros(n_spectra)

    # LM: ignore pixels that could leave the model's coverage near the RV found.
    margin = (2.0 * step + RV_MARGIN_KMS) if fit_rv else 0.0
    ivar_fit = ivar * _coverage(model_wave, bad_model, obs_wave, centre - margin, centre + margin)
    parts = [starts]
    if fit_rv:
        parts.append(v0[..., None])
    parts.append(coef0)
    initial_params = np.concatenate(parts, axis=2)
    if widths:  # every start of the labels with every combination of the widths' starts
        combos = np.array(list(itertools.product(*(start for start, _, _ in widths.values()))))
        n_fixed = n_labels + int(fit_rv)
        initial_params = np.concatenate([
            np.repeat(initial_params[:, :, :n_fixed], len(combos), axis=1),
            np.broadcast_to(np.tile(combos, (n_starts, 1)),
                            (n_spectra, n_starts * len(combos), combos.shape[1])),
            np.repeat(initial_params[:, :, n_fixed:], len(combos), axis=1)], axis=2)
    n_cc = layout["n_segments"] * n_coef
    lower = np.concatenate([lower_x, [rv_lo] if fit_rv else [],
                            [lo for _, lo, _ in widths.values()], np.full(n_cc, -np.inf)])
    upper = np.concatenate([upper_x, [rv_hi] if fit_rv else [],
                            [hi for _, _, hi in widths.values()], np.full(n_cc, np.inf)])
    runs = [initial_params[:, j:j + 1] for j in range(initial_params.shape[1])] \
        if every_start else [initial_params]
    sol = lowest_chi2([backend.spectrum_fit(desc["emulator"], layout, flux, ivar_fit, start,
                                             extra_variance=extra, lower=lower, upper=upper,
                                             max_iter=max_iter, n_threads=n_threads)
                        for start in runs])

    jac_scale = np.concatenate([desc["label_scale"], np.ones(int(fit_rv) + len(widths) + n_cc)])
    covariance = sol.covariance * jac_scale[None, :, None] * jac_scale[None, None, :]
    labels = desc["unscale"](sol.x[:, :n_labels])
    rv = sol.x[:, n_labels] if fit_rv else np.zeros(n_spectra)
    fitted_widths = {name: sol.x[:, n_labels + int(fit_rv) + i] for i, name in enumerate(widths)}
    continuum = sol.x[:, n_labels + int(fit_rv) + len(widths):].reshape(
        n_spectra, layout["n_segments"], n_coef)
    model_flux = None
    if return_model:
        model_flux = backend.spectrum_model(desc["emulator"], layout, sol.x, n_threads=n_threads)
    names = list(desc["label_names"]) + (["rv"] if fit_rv else []) + list(widths) + [
        f"c{s}_{k}" for s in range(layout["n_segments"]) for k in range(n_coef)]
    return SpectrumFitResult(desc["label_names"], names, labels, rv, continuum, covariance,
                             sol.chi2, sol.n_used, sol.n_iter, sol.status,
                             velocities if fit_rv else None, rv_chi2 if fit_rv else None,
                             centre, model_flux, fit_rv, **fitted_widths,
                             error_floor=None if desc["error_floor"] is None
                             else desc["error_floor"](labels))


MAX_GRID_STARTS = 4096


def start_grid(model, labels=None, n_per_label=3):
    """Starting points on a grid over a model's training box, for ``initial=``.

    model : a trained PayneModel, PerPixelPayneModel or CannonModel
    labels : names of the labels to grid (default all of them); the others sit at the
        centre of the box. The grid has ``n_per_label ** len(labels)`` points, at most
        ``MAX_GRID_STARTS``: grid the labels that can trap a fit (Teff, log g), not all 25.
    n_per_label : points per gridded label, at the centres of that many equal slices of its
        training range

    Returns (n_starts, n_labels) physical labels. ``fit_spectra`` (and
    ``CannonModel.fit_labels``) evaluate chi2, after the RV search, at every start and run
    Levenberg-Marquardt from the best.
    """
    desc = _describe(model)
    names = desc["label_names"]
    labels = names if labels is None else [str(n) for n in np.atleast_1d(labels)]
    unknown = [n for n in labels if n not in names]
    if unknown or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct names from {names}, got {labels}")
    n_per_label = check.positive_int("n_per_label", n_per_label)
    if n_per_label ** len(labels) > MAX_GRID_STARTS:
        raise ValueError(f"a grid of {n_per_label} points per label over {len(labels)} labels "
                         f"has {n_per_label ** len(labels)} points, more than "
                         f"{MAX_GRID_STARTS}: grid fewer labels")
    low, high = (np.asarray(b, dtype=np.float64) for b in desc["box"])
    fractions = (np.arange(n_per_label) + 0.5) / n_per_label
    axes = [low[names.index(n)] + fractions * (high - low)[names.index(n)] for n in labels]
    starts = np.tile(0.5 * (low + high), (n_per_label ** len(labels), 1))
    for column, values in zip((names.index(n) for n in labels), np.meshgrid(*axes, indexing="ij")):
        starts[:, column] = values.ravel()
    return starts


# --- the emulators -----------------------------------------------------------------------

def _describe(model):
    """What the fit needs from a model: its kernel description, scaling, box and grid."""
    from .cannon import CannonModel
    from .payne import PayneModel, PerPixelPayneModel

    if isinstance(model, (PayneModel, PerPixelPayneModel)):
        model._require_trained()
        if isinstance(model, PayneModel):
            # as stored: a float32 network's Jacobian product then runs in float32
            emulator = {"kind": "mlp", "weights": list(model.weights), "biases": list(model.biases),
                        "activation": model.activation, "slope": model.slope}
        else:
            emulator = {"kind": "perpixel", **{k: None if v is None else np.asarray(v, np.float64)
                                               for k, v in model.network.items()}}
        n_model = model.n_pixels
        return {"emulator": emulator, "label_names": list(model.label_names),
                "wavelength": model.wavelength, "n_model": n_model, "backend": model.backend,
                "scale": model.scale, "unscale": model.unscale,
                "label_scale": model.x_max - model.x_min, "box": (model.x_min, model.x_max),
                "default_initial": 0.5 * (model.x_min + model.x_max),
                "untrained": np.zeros(n_model, dtype=bool), "s2": None,
                "error_floor": model.error_floor}
    if isinstance(model, CannonModel):
        model._require_trained()
        untrained = ~np.all(np.isfinite(model.theta), axis=1)
        vec = model.vectorizer
        return {"emulator": {"kind": "cannon", "exponents": vec.exponents,
                             "theta": np.where(untrained[:, None], 0.0, model.theta)},
                "label_names": list(model.label_names), "wavelength": model.wavelength,
                "n_model": model.theta.shape[0], "backend": model.backend,
                "scale": vec.scale, "unscale": vec.unscale, "label_scale": vec.scales,
                "box": model.training_range, "default_initial": model.initial_labels,
                "untrained": untrained, "s2": np.where(untrained, 0.0, model.s2),
                "error_floor": model.error_floor}
    raise TypeError(f"model must be a PayneModel, PerPixelPayneModel or CannonModel, "
                    f"got {type(model).__name__}")


def _templates(backend, emulator, model_wave, starts, kernels, kernel_segments, n_threads):
    """The (broadened) emulator at every start on its own grid, (n_spectra, n_starts, n_model)."""
    n_spectra, n_starts = starts.shape[:2]
    if kernels is not None and kernels.shape[0] > 1:  # one kernel per spectrum and start
        kernels = np.repeat(kernels, n_starts, axis=0)
    layout = {"model_wavelength": model_wave, "wavelength": model_wave,
              "segment_index": np.full(model_wave.size, -1, dtype=np.int32),
              "segment_coord": np.zeros(model_wave.size), "n_segments": 0, "n_coef": 0,
              "fit_rv": False, "kernels": kernels, "kernel_segments": kernel_segments}
    # the same starts (and kernel) for every spectrum: evaluate them once
    shared = bool(np.all(starts == starts[:1])) and (kernels is None or kernels.shape[0] == 1)
    rows = starts[0] if shared else starts.reshape(-1, starts.shape[2])
    flux = backend.spectrum_model(emulator, layout, rows, n_threads=n_threads)
    if shared:
        return np.ascontiguousarray(np.broadcast_to(flux, (starts.shape[0],) + flux.shape))
    return flux.reshape(starts.shape[0], starts.shape[1], -1)


# --- option parsing -------------------------------------------------------------------------

def _wavelength(name, value):
    if hasattr(value, "unit"):  # astropy Quantity
        value = value.to_value("Angstrom")
    wave = check.finite_array(name, value, 1)
    if np.any(wave <= 0):
        raise ValueError(f"{name} must be > 0 (Angstrom)")
    return wave


def _grids(model_wavelength, wavelength, n_model):
    """(model grid, observed grid)."""
    obs = None if wavelength is None else _wavelength("wavelength", wavelength)
    if model_wavelength is None:
        if obs is None:
            raise ValueError("wavelength is required: the model stores no wavelength grid")
        if obs.size != n_model:
            raise ValueError(f"the model stores no wavelength grid, so wavelength must be its "
                             f"grid ({n_model} pixels), got {obs.size}")
        model_wave = obs
    else:
        model_wave = _wavelength("model wavelength", model_wavelength)
    if np.any(np.diff(model_wave) <= 0):
        raise ValueError("the model's wavelength grid must be strictly increasing")
    return model_wave, model_wave if obs is None else obs


def _mask(mask, shape):
    if mask is None:
        return np.zeros(shape, dtype=bool)
    array = np.asarray(mask)
    if array.dtype != bool:
        raise TypeError(f"mask must be boolean (True leaves a pixel out), got dtype {array.dtype}")
    if array.shape not in (shape[1:], shape):
        raise ValueError(f"mask must have shape ({shape[1]},) or {shape}, got {array.shape}")
    return np.broadcast_to(array, shape)


def _rv_range(rv_range):
    try:
        lo, hi = (float(v) for v in rv_range)
    except (TypeError, ValueError):
        raise TypeError("rv_range must be a (low, high) pair of numbers in km/s") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and -C_KMS < lo <= hi < C_KMS):
        raise ValueError(f"rv_range must satisfy -c < low <= high < c (km/s), got {rv_range}")
    return lo, hi


def _rv_step(rv_step, model_wave):
    if rv_step is not None:
        step = check.nonnegative_float("rv_step", rv_step)
        if step == 0:
            raise ValueError("rv_step must be > 0")
        return step
    if model_wave.size < 2:
        return 1.0
    dv = C_KMS * np.diff(model_wave) / model_wave[:-1]
    return 0.5 * float(np.median(dv))  # half a pixel: the chi2 minimum is within a quarter pixel


# Where a fitted broadening width starts and the largest value it may take (km/s). A fitted
# width's kernel reaches 6 sigma_max (Gaussian) or vsini_max (rotation) each side. v sin i
# starts at 10 and 30 km/s: fitted with sigma, from 10 alone 22 of 480 fits of rotators at
# 14-29 km/s slid along the sigma-v sin i degeneracy to the lowest v sin i, at a chi2 up to
# 627 above that of the true widths (test_all_effects_recovery_and_pulls[both]).
WIDTH_DEFAULTS = {"sigma": ((5.0,), 50.0), "vsini": ((10.0, 30.0), 100.0)}


def _broadening(broadening, model_wave, n_spectra):
    """The broadening set-up, a dict: ``kernels`` (1 or n_spectra rows, odd length, in model
    pixels: the fixed part; None if there is none), ``segments`` (the model grid's
    log-uniform runs), ``fit_sigma`` (None, or (km/s per model pixel, Gaussian taps each
    side)), ``fit_vsini`` (None, or (km/s per model pixel, rotational taps each side, limb
    darkening)), ``fitted`` ({width name: (starts (n,), lower, upper)} in parameter order)
    and ``template_kernels`` (the whole kernel at the first starts, for the RV search). None
    without broadening."""
    if broadening is None:
        return None
    known = {"sigma", "sigma_start", "sigma_max", "vsini", "vsini_start", "vsini_max",
             "limb_darkening"}
    if not isinstance(broadening, dict):
        raise TypeError(f"broadening must be None or a dict with keys from {sorted(known)}")
    unknown = sorted(set(broadening) - known)
    if unknown:
        raise ValueError(f"broadening has unknown keys {unknown}; known: {sorted(known)}")
    try:
        runs, dln = _grid.log_uniform_segments(model_wave)
    except ValueError:
        raise ValueError("broadening needs the model's wavelength grid to be uniform in "
                         "log(wavelength) (gaps allowed)") from None
    step = C_KMS * dln  # km/s per model pixel
    eps = float(broadening.get("limb_darkening", 0.6))
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"broadening['limb_darkening'] must be in [0, 1], got {eps}")

    def per_spectrum(name, value):
        v = np.asarray(value, dtype=np.float64)
        if v.ndim > 1 or (v.ndim == 1 and v.size != n_spectra):
            raise ValueError(f"broadening['{name}'] must be a scalar or {n_spectra} values "
                             f"(one per spectrum), got shape {v.shape}")
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"broadening['{name}'] must be finite and >= 0 km/s")
        return np.atleast_1d(v)

    # A fitted width's lower bound: below it the sampled kernel is (nearly) a delta whose
    # derivative vanishes, a plateau LM cannot leave (sliding along the sigma-vsini
    # degeneracy into it was seen when both are fitted).
    lowest = {"sigma": 0.5 * step, "vsini": step}
    fitted, fixed = {}, {}
    for name, (start_default, max_default) in WIDTH_DEFAULTS.items():
        value = broadening.get(name, 0.0)
        if isinstance(value, str):
            if value != "fit":
                raise ValueError(f"broadening['{name}'] must be km/s or 'fit', got {value!r}")
            maximum = float(broadening.get(f"{name}_max", max_default))
            if f"{name}_start" in broadening:
                start = np.asarray(broadening[f"{name}_start"], dtype=np.float64)
            else:  # the defaults, within the bounds
                start = np.unique(np.clip(start_default, lowest[name], maximum))
            if start.ndim > 1 or start.size == 0:
                raise ValueError(f"broadening['{name}_start'] must be a value or a sequence of "
                                 f"values (km/s), got shape {start.shape}")
            start = np.atleast_1d(start)
            if not (np.all(0 <= start) and np.all(start <= maximum) and maximum < np.inf):
                raise ValueError(f"broadening needs 0 <= {name}_start <= {name}_max < inf (km/s)")
            if maximum < lowest[name]:
                raise ValueError(f"broadening['{name}_max'] must be >= {lowest[name]:.3g} km/s, "
                                 "the lowest value fitted")
            fitted[name] = (start, lowest[name], maximum)
        else:
            fixed[name] = per_spectrum(name, value)

    def kernel_rows(sigma, vsini):
        """g(sigma) (*) r(vsini) per spectrum (one row if both are single values), or None
        if both are zero."""
        if not (np.any(sigma > 0) or np.any(vsini > 0)):
            return None
        n_rows = max(sigma.size, vsini.size)
        gauss = np.atleast_2d(gaussian_kernel(np.broadcast_to(sigma, (n_rows,)) / step))
        rotation = np.atleast_2d(rotation_kernel(np.broadcast_to(vsini, (n_rows,)), step, eps))
        kernels = np.array([np.convolve(g, r) for g, r in zip(gauss, rotation)])
        return kernels / kernels.sum(axis=1, keepdims=True)

    zero = np.zeros(1)
    setup = {"segments": np.array(runs, dtype=np.int64), "fitted": fitted,
             "kernels": kernel_rows(fixed.get("sigma", zero), fixed.get("vsini", zero)),
             "template_kernels": kernel_rows(
                 *(fitted[n][0][:1] if n in fitted else fixed[n] for n in WIDTH_DEFAULTS)),
             "fit_sigma": None, "fit_vsini": None}
    if "sigma" in fitted:
        setup["fit_sigma"] = (step, int(np.ceil(6.0 * fitted["sigma"][2] / step)))
    if "vsini" in fitted:
        setup["fit_vsini"] = (step, int(np.ceil(fitted["vsini"][2] / step - 0.5)), eps)
    return setup


def _segments(segments, wave):
    """Segment index (-1: none) and Chebyshev coordinate in [-1, 1] of every observed pixel."""
    if segments is None:
        ranges = [(wave.min(), wave.max())]
    else:
        try:
            ranges = [(float(lo), float(hi)) for lo, hi in segments]
        except (TypeError, ValueError):
            raise TypeError("segments must be a sequence of (low, high) wavelength pairs") from None
        if not ranges or any(not (np.isfinite(lo) and np.isfinite(hi) and lo < hi) for lo, hi in ranges):
            raise ValueError("segments must be non-empty (low, high) pairs with low < high")
    index = np.full(wave.size, -1, dtype=np.int32)
    coord = np.zeros(wave.size)
    for s, (lo, hi) in enumerate(ranges):
        on = (wave >= lo) & (wave <= hi) & (index < 0)
        index[on] = s
        if on.any():
            w_lo, w_hi = wave[on].min(), wave[on].max()
            coord[on] = 2 * (wave[on] - w_lo) / (w_hi - w_lo) - 1 if w_hi > w_lo else 0.0
    return index, coord, len(ranges)


def _label_bounds(bounds, desc):
    n = len(desc["label_names"])
    if bounds is None:
        return np.full(n, -np.inf), np.full(n, np.inf)
    if isinstance(bounds, str):
        check.choice("bounds", bounds, {"training"})
        lower, upper = desc["box"]
    else:
        try:
            lower, upper = bounds
        except (TypeError, ValueError):
            raise TypeError("bounds must be None, 'training' or a (lower, upper) pair") from None
    lower, upper = check.box(lower, upper, n)
    lower = np.full(n, -np.inf) if lower is None else lower
    upper = np.full(n, np.inf) if upper is None else upper
    with np.errstate(invalid="ignore"):
        return desc["scale"](lower[None])[0], desc["scale"](upper[None])[0]


def _extra_variance(desc, model_wave, obs_wave):
    """The Cannon's s2 at the observed pixels (the RV shift is ignored: s2 varies slowly)."""
    if desc["s2"] is None:
        return None
    return np.interp(obs_wave, model_wave, desc["s2"])


def _gaps(model_wave, bad):
    """Bad intervals of the model grid: gaps (a step > GAP_FACTOR x a neighbour's) and
    intervals touching an untrained pixel. (n_model - 1,)"""
    dw = np.diff(model_wave)
    if dw.size == 0:
        return np.zeros(0, dtype=bool)
    neighbour = np.minimum(np.r_[dw[:1], dw[:-1]], np.r_[dw[1:], dw[-1:]])
    return (dw > GAP_FACTOR * neighbour) | bad[:-1] | bad[1:]


def _coverage(model_wave, bad, obs_wave, v_lo, v_hi):
    """1.0 where a pixel's rest wavelength stays on good model intervals (and good knots) for
    every RV in [v_lo, v_hi], else 0.0: (n_obs,) for scalar velocities, (n, n_obs) for (n,).
    A pixel's range [w_lo, w_hi] uses the intervals it meets in more than an end point and the
    knots inside it (a pixel exactly on a knot uses only that knot)."""
    inv_d = lambda v: np.sqrt((1 - v / C_KMS) / (1 + v / C_KMS))[..., None]  # noqa: E731
    a = inv_d(np.asarray(v_hi, dtype=np.float64))  # w_lo = obs_wave a, w_hi = obs_wave b
    b = inv_d(np.asarray(v_lo, dtype=np.float64))
    n = model_wave.size
    if n < 2 or obs_wave.size == 0:
        inside = (obs_wave * a >= model_wave[0]) & (obs_wave * b <= model_wave[-1])
        return np.where(inside & ~bad[0], 1.0, 0.0)
    # Each condition on [w_lo, w_hi] holds for a run of the pixels in wavelength order, whose
    # ends are counts of pixels below a threshold per velocity: a few per spectrum, instead of
    # searches for all n x n_obs ranges (a fit's 256 x 7214 pixels: ~10 instead of 100 ms).
    order = np.argsort(obs_wave, kind="stable")
    obs = obs_wave[order]
    k = np.flatnonzero(_gaps(model_wave, bad))
    knots = model_wave[bad]
    edges = model_wave[[0, -1]]
    # pixels out (in wavelength order): [0, w_lo >= grid start), [w_hi <= grid end, n_obs);
    # bad interval k: [w_hi <= w[k], w_lo < w[k + 1]); bad knot c: [w_hi < c, w_lo <= c)
    starts = np.concatenate([np.zeros(a.shape[:-1] + (1,), dtype=np.int64),
                             _count_below(obs, b, edges[1:], strict=False),
                             _count_below(obs, b, model_wave[k], strict=False),
                             _count_below(obs, b, knots, strict=True)], axis=-1)
    stops = np.concatenate([_count_below(obs, a, edges[:1], strict=True),
                            np.full(b.shape[:-1] + (1,), obs.size, dtype=np.int64),
                            _count_below(obs, a, model_wave[k + 1], strict=True),
                            _count_below(obs, a, knots, strict=False)], axis=-1)
    # +1 at each run's start, -1 at its end (an empty run's cancel), then the running sum in
    # place: a pixel is out where it is > 0. One (n, n_obs + 1) array: on a process's first
    # call, each new array of this size is a fresh mapping whose pages fault in.
    starts = starts.reshape(-1, starts.shape[-1])
    stops = np.maximum(starts, stops.reshape(starts.shape))
    n_rows, width = starts.shape[0], obs.size + 1
    offset = width * np.arange(n_rows)[:, None]
    marks = np.bincount(np.concatenate([(offset + starts).ravel(), (offset + stops).ravel()]),
                        weights=np.repeat([1.0, -1.0], starts.size),
                        minlength=n_rows * width).reshape(n_rows, width)
    np.cumsum(marks, axis=1, out=marks)
    np.less_equal(marks, 0.0, out=marks)
    usable = marks[:, :-1] if np.all(order[1:] > order[:-1]) else marks[:, np.argsort(order)]
    return usable.reshape(a.shape[:-1] + (obs.size,))


def _count_below(obs, scale, threshold, strict):
    """(..., m): per row of scale (..., 1), how many of the sorted obs (n,) have
    obs scale < threshold (strict) or <= threshold, for each of threshold (m,). Exact: the
    division's guess is moved to where the products themselves change."""
    below = (lambda x, t: x < t) if strict else (lambda x, t: x <= t)
    scale = np.where(np.isfinite(scale), scale, np.inf)  # (|v| >= c) no pixel is covered
    with np.errstate(divide="ignore"):
        guess = threshold / scale
    count = np.searchsorted(obs, guess, side="left" if strict else "right")
    last = obs.size
    while True:
        up = (count < last) & below(obs[np.minimum(count, last - 1)] * scale, threshold)
        down = (count > 0) & ~below(obs[np.maximum(count - 1, 0)] * scale, threshold)
        if not (up.any() or down.any()):
            return count
        count = count + up - down


def _weights(ivar, extra):
    if extra is None:
        return ivar
    return np.where(ivar > 0, ivar / (1.0 + ivar * extra), 0.0)
