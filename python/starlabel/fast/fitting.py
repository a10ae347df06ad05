"""Fitting observed spectra with an emulator, compiled (cpp/include/starlabel/spectrum_fit.hpp).
Same signatures as starlabel.reference.fitting."""

import numpy as np

from .. import _fit_checks as check
from .. import payne_io
from .._core import core
from ..config import resolve_threads
from ..result import LMSolution


def _core_emulator(spec):
    """The dict bind_fit.cpp reads: activation as its code, the Cannon's theta transposed."""
    if spec["kind"] == "mlp":
        code, slope = payne_io.activation(spec["activation"], spec["slope"])
        return {"kind": "mlp", "weights": spec["weights"], "biases": spec["biases"],
                "activation": code, "slope": slope, "last_weights_f32": spec["last_weights_f32"]}
    if spec["kind"] == "cannon":
        return {"kind": "cannon", "exponents": spec["exponents"],
                "theta_t": np.ascontiguousarray(spec["theta"].T)}
    return spec


def _layout_args(lay):
    return (lay["model_wavelength"], lay["wavelength"], lay["segment_index"],
            lay["segment_coord"], lay["n_segments"], lay["n_coef"])


def spectrum_model(emulator, layout, params, *, jacobian=False, n_threads=None):
    """The observed model for parameter vectors; see starlabel.reference.fitting.spectrum_model."""
    spec, lay, params = check.spectrum_model_arguments(emulator, layout, params, n_threads)
    return core.fit_spectrum_model(_core_emulator(spec), *_layout_args(lay), lay["fit_rv"], params,
                                   bool(jacobian), lay["kernels"], lay["kernel_segments"],
                                   lay["fit_sigma"], lay["fit_vsini"], resolve_threads(n_threads))


def rv_chi2_grid(layout, templates, flux, weight, velocities, *, n_threads=None):
    """chi2 over trial velocities; see starlabel.reference.fitting.rv_chi2_grid."""
    lay, templates, flux, weight, velocities = check.rv_grid_arguments(
        layout, templates, flux, weight, velocities, n_threads)
    return core.fit_rv_grid(*_layout_args(lay), templates, flux, weight, velocities,
                            resolve_threads(n_threads))


def spectrum_fit(emulator, layout, flux, ivar, initial, *, extra_variance=None, lower=None,
                 upper=None, max_iter=100, n_threads=None):
    """Fit labels, RV and continuum; see starlabel.reference.fitting.spectrum_fit."""
    spec, lay, flux, ivar, initial, extra, lower, upper, max_iter = check.fit_arguments(
        emulator, layout, flux, ivar, initial, extra_variance, lower, upper, max_iter, n_threads)
    return LMSolution(*core.fit_spectra(_core_emulator(spec), *_layout_args(lay), lay["fit_rv"],
                                        flux, ivar, extra, initial, lower, upper, max_iter,
                                        lay["kernels"], lay["kernel_segments"],
                                        lay["fit_sigma"], lay["fit_vsini"], resolve_threads(n_threads)))
