"""Fitting observed spectra with an emulator, in NumPy: the twin of
cpp/include/starlabel/spectrum_fit.hpp (see its comment for the model and the parameters).

The emulator's flux and label Jacobian come from this backend's own kernels
(``perpixel_forward``, the MLP's forward pass, ``cannon_predict``); the Doppler shift, the linear
interpolation, the Chebyshev continuum and the chain rule are written out here, vectorized
over pixels; the fit is ``reference.lm.fit_one`` spectrum by spectrum.
"""

import numpy as np
from numpy.polynomial import chebyshev

from .. import _fit_checks as check
from .. import payne_io
from ..augment import rotation_kernel
from ..result import LMSolution
from .cannon import cannon_predict
from .lm import fit_one, pixel_objective
from .payne import forward_and_hidden_jacobian, perpixel_forward

C_KMS = 299792.458


def _emulator_forward(spec):
    """x (n_labels,) -> (flux (n_model,), jacobian (n_model, n_labels)) in float64."""
    kind = spec["kind"]
    if kind == "perpixel":
        def forward(x):
            flux, jac = perpixel_forward(spec["w0"], spec["b0"], spec["w1"], spec["b1"], x[None],
                                         w2=spec["w2"], b2=spec["b2"], jacobian=True)
            return flux[0], jac[0]
    elif kind == "mlp":
        code, slope = payne_io.activation(spec["activation"], spec["slope"])
        last_f32 = spec["last_weights_f32"]

        def forward(x):
            flux, m = forward_and_hidden_jacobian(spec["weights"], spec["biases"], code, slope, x[None])
            if last_f32 is None:
                return flux[0], spec["weights"][-1] @ m[0]
            # a float32 network: J = W M in float32, as mlp.hpp (MLP::last_weights_f32)
            return flux[0], (last_f32 @ m[0].astype(np.float32)).astype(np.float64)
    else:
        def forward(x):
            flux, jac = cannon_predict(spec["exponents"], spec["theta"], x[None], jacobian=True)
            return flux[0], jac[0]
    return forward


def _interpolation(model_wave, rest_wave):
    """Indices i0, i1 and weights t of linear interpolation; the end values are held outside."""
    n = model_wave.size
    hi = np.searchsorted(model_wave, rest_wave, side="right")
    i0, i1 = np.clip(hi - 1, 0, n - 1), np.clip(hi, 0, n - 1)
    same = i0 == i1
    dw = np.where(same, 1.0, model_wave[i1] - model_wave[i0])
    t = np.where(same, 0.0, (rest_wave - model_wave[i0]) / dw)
    return i0, i1, t, np.where(same, 0.0, 1.0 / dw)


def _inverse_doppler(v):
    """rest / observed wavelength and d ln(rest wavelength) / dv (NaN when |v| >= c)."""
    beta = v / C_KMS
    if not abs(beta) < 1:
        return np.nan, np.nan
    return np.sqrt((1 - beta) / (1 + beta)), -1.0 / (C_KMS * (1 - beta * beta))


def _basis(lay):
    """(n_obs, n_coef) Chebyshev basis at every pixel's coordinate (numpy's chebvander)."""
    if lay["n_coef"] == 0:
        return np.zeros((lay["wavelength"].size, 0))
    return chebyshev.chebvander(lay["segment_coord"], lay["n_coef"] - 1)


def _gaussian_profile(sigma, step, half):
    """The normalized Gaussian of sigma / step pixels at offsets -half..half and its derivative
    in sigma (km/s); a delta below 1e-3 pixel."""
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    s = sigma / step
    if not s >= 1e-3:
        return (offsets == 0).astype(np.float64), np.zeros_like(offsets)
    g = np.exp(-0.5 * (offsets / s) ** 2)
    g /= g.sum()
    return g, g * (offsets**2 - np.sum(g * offsets**2)) / s**3 / step


def _rotation_profile(vsini, step, half, eps):
    """The rotational profile of vsini (km/s, linear limb darkening eps) averaged over pixels
    at offsets -half..half, normalized, and its derivative in vsini; a delta below 1e-3 pixel.
    The pixel integrals come from augment.rotation_kernel's closed form; the derivative
    differentiates each pixel's bounds x = (offset +- 1/2) step / vsini (dx/dvsini = -x/vsini)."""
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    if not vsini / step >= 1e-3:
        return (offsets == 0).astype(np.float64), np.zeros_like(offsets)
    # the pixel integrals of the unnormalized profile: its total over [-1, 1] is pi (1 - eps/3)
    k = rotation_kernel(vsini, step, eps) * np.pi * (1 - eps / 3)
    raw = np.zeros(offsets.size)
    reach = min(k.size // 2, half)  # a profile wider than `half` taps is cut (renormalized)
    raw[half - reach:half + reach + 1] = k[k.size // 2 - reach:k.size // 2 + reach + 1]

    def profile(x):
        inside = np.abs(x) < 1
        x = np.where(inside, x, 0.0)
        shape = 2 * (1 - eps) * np.sqrt(1 - x * x) + 0.5 * np.pi * eps * (1 - x * x)
        return np.where(inside, shape, 0.0)

    hi, lo = (offsets + 0.5) * step / vsini, (offsets - 0.5) * step / vsini
    draw = -(hi * profile(hi) - lo * profile(lo)) / vsini
    total = raw.sum()
    r = raw / total
    return r, (draw - r * draw.sum()) / total


def _fitted_kernel(lay, p, fixed):
    """g(sigma) (*) r(vsini) (*) fixed and its derivatives in sigma and vsini (None for a width
    not fitted); a part neither fitted nor in ``fixed`` is a delta."""
    one, zero = np.ones(1), np.zeros(1)
    fixed = one if fixed is None else fixed
    g, dg, r, dr = one, zero, one, zero
    if lay["fit_sigma"] is not None:
        step, half = lay["fit_sigma"]
        g, dg = _gaussian_profile(p[_sigma_index(lay)], step, half)
    if lay["fit_vsini"] is not None:
        step, half, eps = lay["fit_vsini"]
        r, dr = _rotation_profile(p[_vsini_index(lay)], step, half, eps)

    def chain(a, b):
        return np.convolve(np.convolve(a, b), fixed)

    return (chain(g, r), chain(dg, r) if lay["fit_sigma"] is not None else None,
            chain(g, dr) if lay["fit_vsini"] is not None else None)


def _sigma_index(lay):
    return lay["n_labels"] + int(lay["fit_rv"])


def _vsini_index(lay):
    return _sigma_index(lay) + int(lay["fit_sigma"] is not None)


def _coef_index(lay):
    return _vsini_index(lay) + int(lay["fit_vsini"] is not None)


def _broaden(lay, row, emu_flux, emu_jac, p):
    """The emulator's flux (n_model,) and Jacobian (n_model, n_labels) convolved with the
    spectrum's kernel inside each kernel segment, the kernel renormalized where a segment cuts
    it (np.convolve per column; the twin of broaden_columns), and d flux / d width (n_model,)
    for each fitted width, a dict {"sigma": ..., "vsini": ...}."""
    if lay["kernels"] is None and lay["fit_sigma"] is None and lay["fit_vsini"] is None:
        return emu_flux, emu_jac, {}
    kernels = lay["kernels"]
    kernel = None if kernels is None else kernels[row if kernels.shape[0] > 1 else 0]
    dkernels = {}
    if lay["fit_sigma"] is not None or lay["fit_vsini"] is not None:
        kernel, dsigma, dvsini = _fitted_kernel(lay, p, kernel)
        dkernels = {name: d for name, d in (("sigma", dsigma), ("vsini", dvsini)) if d is not None}
    values = np.column_stack([emu_flux] + ([] if emu_jac is None else [emu_jac]))
    out = np.empty_like(values)
    dflux = {name: np.empty_like(emu_flux) for name in dkernels}
    centre = kernel.size // 2

    def same(a, k):  # the centred part of the full convolution (kernels are symmetric)
        return np.convolve(a, k)[centre:centre + a.size]

    for start, stop in lay["kernel_segments"]:
        norm = same(np.ones(stop - start), kernel)
        for c in range(values.shape[1]):
            out[start:stop, c] = same(values[start:stop, c], kernel) / norm
        for name, dkernel in dkernels.items():
            dsum = same(emu_flux[start:stop], dkernel)
            dnorm = same(np.ones(stop - start), dkernel)
            dflux[name][start:stop] = (dsum - out[start:stop, 0] * dnorm) / norm
    return out[:, 0], (None if emu_jac is None else out[:, 1:]), dflux


def _observed(lay, basis, emu_flux, emu_jac, dflux_dwidth, p):
    """Observed model and Jacobian (n_obs, n_params) for one parameter vector p."""
    n_labels, n_coef, seg = lay["n_labels"], lay["n_coef"], lay["segment_index"]
    v = p[n_labels] if lay["fit_rv"] else 0.0
    inv_doppler, dlnw_dv = _inverse_doppler(v)
    rest = lay["wavelength"] * inv_doppler
    i0, i1, t, inv_dw = _interpolation(lay["model_wavelength"], rest)
    model = emu_flux[i0] + t * (emu_flux[i1] - emu_flux[i0])
    in_segment = (seg >= 0) & (n_coef > 0)
    c0 = _coef_index(lay)
    coef = p[c0:].reshape(lay["n_segments"], n_coef)
    cont = np.ones_like(model)
    if n_coef:
        cont = np.where(in_segment, np.sum(coef[np.maximum(seg, 0)] * basis, axis=1), 1.0)
    jac = np.zeros((model.size, lay["n_params"]))
    if emu_jac is not None:
        jac[:, :n_labels] = cont[:, None] * (emu_jac[i0] + t[:, None] * (emu_jac[i1] - emu_jac[i0]))
    if lay["fit_rv"]:
        jac[:, n_labels] = cont * (emu_flux[i1] - emu_flux[i0]) * inv_dw * rest * dlnw_dv
    for name, d in dflux_dwidth.items():
        column = _sigma_index(lay) if name == "sigma" else _vsini_index(lay)
        jac[:, column] = cont * (d[i0] + t * (d[i1] - d[i0]))
    for s in range(lay["n_segments"]):
        on = in_segment & (seg == s)
        jac[on, c0 + s * n_coef:c0 + (s + 1) * n_coef] = basis[on] * model[on, None]
    return cont * model, jac


def spectrum_model(emulator, layout, params, *, jacobian=False, n_threads=None):
    """The observed model for parameter vectors params (n, n_params) -> flux (n, n_obs);
    with ``jacobian=True`` also d flux / d params (n, n_obs, n_params). See
    starlabel.fitting for the model and the order of the parameters."""
    spec, lay, params = check.spectrum_model_arguments(emulator, layout, params, n_threads)
    forward, basis = _emulator_forward(spec), _basis(lay)
    fluxes, jacs = [], []
    for row, p in enumerate(params):
        flux, jac = _observed(lay, basis, *_broaden(lay, row, *forward(p[:lay["n_labels"]]), p), p)
        fluxes.append(flux)
        jacs.append(jac)
    if jacobian:
        return np.array(fluxes), np.array(jacs)
    return np.array(fluxes)


def _continuum_solve(lay, basis, model, flux, weight):
    """Per segment, weighted linear least squares of flux on T_k * model (the twin of
    continuum_solve in spectrum_fit.hpp: same fallbacks to a flat continuum). Returns
    (coef (n_segments * n_coef,), chi2)."""
    n_seg, n_coef, seg = lay["n_segments"], lay["n_coef"], lay["segment_index"]
    coef = np.zeros((n_seg, n_coef))
    coef[:, 0] = 1.0
    used = weight > 0
    for s in range(n_seg):
        on = used & (seg == s)
        if on.sum() < n_coef:
            continue
        design = basis[on] * model[on, None]
        a = design.T @ (weight[on, None] * design)
        b = design.T @ (weight[on] * flux[on])
        try:
            factor = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            continue
        solution = np.linalg.solve(factor.T, np.linalg.solve(factor, b))
        if np.all(np.isfinite(solution)):
            coef[s] = solution
    cont = np.where(seg >= 0, np.sum(coef[np.maximum(seg, 0)] * basis, axis=1), 1.0)
    resid = np.where(used, flux - cont * model, 0.0)
    return coef.ravel(), float(np.sum(weight * resid**2))


def rv_chi2_grid(layout, templates, flux, weight, velocities, *, n_threads=None):
    """chi2 of every template shifted to every trial velocity, with the continuum solved
    linearly (when n_coef > 0): the global RV search before LM.

    templates (n_spectra, n_templates, n_model) on the model grid; flux, weight (n_spectra,
    n_obs); velocities (n_v,) km/s. Returns chi2 (n_spectra, n_templates, n_v), the index of
    the first minimum over finite chi2 (n_spectra, n_templates; -1 if none) and the
    continuum coefficients there (n_spectra, n_templates, n_segments * n_coef).
    """
    lay, templates, flux, weight, velocities = check.rv_grid_arguments(
        layout, templates, flux, weight, velocities, n_threads)
    basis = _basis(lay)
    n_spectra, n_templates = templates.shape[:2]
    n_cc = lay["n_segments"] * lay["n_coef"]
    chi2 = np.zeros((n_spectra, n_templates, velocities.size))
    best = np.full((n_spectra, n_templates), -1, dtype=np.int64)
    coefs = np.zeros((n_spectra, n_templates, n_cc))
    for s in range(n_spectra):
        f = np.where(weight[s] > 0, flux[s], 0.0)
        for j in range(n_templates):
            found = []
            for k, v in enumerate(velocities):
                i0, i1, t, _ = _interpolation(lay["model_wavelength"],
                                              lay["wavelength"] * _inverse_doppler(v)[0])
                tmpl = templates[s, j]
                shifted = tmpl[i0] + t * (tmpl[i1] - tmpl[i0])
                if lay["n_coef"]:
                    coef, chi2[s, j, k] = _continuum_solve(lay, basis, shifted, f, weight[s])
                else:
                    coef = np.zeros(0)
                    chi2[s, j, k] = np.sum(weight[s] * np.where(weight[s] > 0, f - shifted, 0.0)**2)
                found.append(coef)
            finite = np.isfinite(chi2[s, j])
            if finite.any():
                best[s, j] = int(np.argmin(np.where(finite, chi2[s, j], np.inf)))
                coefs[s, j] = found[best[s, j]]
            else:
                coefs[s, j] = np.tile(np.eye(1, lay["n_coef"])[0], lay["n_segments"])
    return chi2, best, coefs


def spectrum_fit(emulator, layout, flux, ivar, initial, *, extra_variance=None, lower=None,
                 upper=None, max_iter=100, n_threads=None):
    """Fit labels, RV and continuum of every spectrum by Levenberg-Marquardt.

    flux, ivar (n_spectra, n_obs); initial (n_params,), (n_starts, n_params) or (n_spectra,
    n_starts, n_params); extra_variance (n_obs,) added to 1/ivar (inf ignores a pixel);
    lower, upper (n_params,) box bounds. The layout may carry broadening ``kernels`` (1 or
    n_spectra rows of odd length on the model grid) and the ``kernel_segments`` they stay in.
    Returns an LMSolution in the kernel's parameters.
    """
    spec, lay, flux, ivar, initial, extra, lower, upper, max_iter = check.fit_arguments(
        emulator, layout, flux, ivar, initial, extra_variance, lower, upper, max_iter, n_threads)
    n_params = lay["n_params"]
    lower = np.full(n_params, -np.inf) if lower is None else lower
    upper = np.full(n_params, np.inf) if upper is None else upper
    forward, basis = _emulator_forward(spec), _basis(lay)

    def model_of(row):
        def model(p):
            return _observed(lay, basis, *_broaden(lay, row, *forward(p[:lay["n_labels"]]), p), p)
        return model

    fits = []
    for row, (f, iv, starts) in enumerate(zip(flux, ivar, initial)):
        ev = 0.0 if extra is None else extra
        with np.errstate(invalid="ignore"):  # 0 * inf where an ignored pixel has inf variance
            weight = np.where(iv > 0, iv / (1.0 + iv * ev), 0.0)
        f = np.where(weight > 0, f, 0.0)
        fits.append(fit_one(pixel_objective(model_of(row), f, weight), starts, lower, upper,
                            max_iter))
    x, covariance, chi2, n_used, n_iter, status = zip(*fits)
    return LMSolution(np.array(x), np.array(covariance), np.array(chi2),
                      np.array(n_used, dtype=np.int64), np.array(n_iter, dtype=np.int32),
                      np.array(status, dtype=np.int8))
