"""Augmentation: reproducible with a seed, input untouched, each step against its analytic
expectation, both backends alike, bad input."""

import numpy as np
import pytest

from starlabel import augment, preprocess
from starlabel._grid import C_KMS, apogee_wavelength
from starlabel.augment import rotation_kernel


def _line_spectra(n=3, n_pixels=3000):
    w = 15200 * 10 ** (6e-6 * np.arange(n_pixels))
    x = np.log(w)
    flux = 1 - 0.5 * np.exp(-0.5 * ((x - x[n_pixels // 2]) / 3e-5) ** 2)
    return w, np.tile(flux, (n, 1))


ALL = dict(rv=(-50, 50), vsini=(0, 30), resolution=(8000, 15000), flux_scale=(0.5, 2.0),
           tilt=(-0.2, 0.2), snr=(30, 200), telluric_ranges=[[15300, 15310], [15500, 15520]],
           telluric_probability=0.5, bad_fraction=(0, 0.05))


def test_reproducible_and_input_untouched():
    w, flux = _line_spectra()
    ivar = np.full_like(flux, 1e4)
    before = (flux.copy(), ivar.copy(), w.copy())
    a = augment(flux, w, ivar, n_copies=2, seed=42, **ALL)
    b = augment(flux, w, ivar, n_copies=2, seed=42, **ALL)
    c = augment(flux, w, ivar, n_copies=2, seed=43, **ALL)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.ivar, b.ivar)
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key])
    assert not np.array_equal(a.params["rv"], c.params["rv"])
    for original, now in zip(before, (flux, ivar, w)):
        np.testing.assert_array_equal(original, now)
    assert a.flux.shape == (6, 3000) and a.params["source"].tolist() == [0, 0, 1, 1, 2, 2]
    assert np.all(np.isfinite(a.flux[a.ivar > 0])) and np.all(a.ivar >= 0)


def test_backends_agree():
    w, flux = _line_spectra(2)
    a = augment(flux, w, n_copies=3, seed=1, backend="fast", **ALL)
    b = augment(flux, w, n_copies=3, seed=1, backend="reference", **ALL)
    np.testing.assert_array_equal(a.ivar == 0, b.ivar == 0)
    # the same draws; resampling/convolution differ by summation order only (~1e-15)
    np.testing.assert_allclose(a.flux, b.flux, rtol=1e-11, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=1e-11)


def test_noise_to_target_snr_and_fraction():
    w = apogee_wavelength(7214)
    flux = np.full((4, w.size), 2.0)
    out = augment(flux, w, snr=50.0, seed=0)
    sigma = 2.0 / 50
    # 7214 draws per row: the sample sd is within 3% of sigma at > 5 standard errors (0.8%)
    np.testing.assert_allclose((out.flux - 2.0).std(axis=1) / sigma, 1.0, atol=0.03)
    np.testing.assert_allclose(out.ivar, 1 / sigma**2)
    frac = augment(flux, w, np.full_like(flux, 100.0), noise_fraction=0.1, seed=0)
    # noise adds in quadrature to the existing 1/ivar = 0.01
    np.testing.assert_allclose(frac.ivar, 1 / (0.01 + 0.2**2))
    np.testing.assert_allclose((frac.flux - 2.0).std(axis=1) / 0.2, 1.0, atol=0.03)


def test_rv_shift_is_the_doppler_shift():
    w, flux = _line_spectra(2)
    out = augment(flux, w, rv=(-80, 80), seed=5)
    expected, _ = preprocess.doppler_shift(w, flux, np.ones_like(flux), out.params["rv"], to_rest=False)
    np.testing.assert_array_equal(np.isnan(out.flux), np.isnan(expected))
    np.testing.assert_allclose(out.flux, expected, equal_nan=True, rtol=0, atol=0)
    assert out.ivar is None     # noiseless in, no noise added


def test_rotation_kernel_moments():
    for eps in (0.0, 0.6, 1.0):
        kernel = rotation_kernel(100.0, 1.0, eps)      # vsini = 100 pixels
        offsets = np.arange(kernel.size) - kernel.size // 2
        assert kernel.sum() == pytest.approx(1.0, abs=1e-14)
        np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-15)
        analytic = ((1 - eps) / 4 + 2 * eps / 15) / (1 - eps / 3) * 100.0**2
        # pixel averaging adds 1/12 px^2 (Sheppard), a 1e-5 relative change here
        assert np.sum(offsets**2 * kernel) == pytest.approx(analytic + 1 / 12, rel=1e-4)
    np.testing.assert_array_equal(rotation_kernel(0.0, 1.0), [1.0])
    assert rotation_kernel([0.0, 10.0], 1.0).shape == (2, 21)
    with pytest.raises(ValueError, match="limb_darkening"):
        rotation_kernel(10.0, 1.0, 1.5)


def test_rotational_broadening_against_continuous_convolution():
    """A Gaussian line broadened by v sin i = 40 km/s against the continuous convolution
    integral evaluated with scipy quad."""
    integrate = pytest.importorskip("scipy.integrate")
    w, flux = _line_spectra(1, 2000)
    dv = 6e-6 * np.log(10) * C_KMS                 # km/s per pixel (4.14)
    vsini, eps, sigma_v = 40.0, 0.6, 3e-5 * C_KMS   # line sigma 9 km/s
    out = augment(flux, w, vsini=vsini, limb_darkening=eps, seed=0)
    v = (np.arange(2000) - 1000) * dv

    def profile(x):
        return ((2 * (1 - eps) * np.sqrt(1 - x * x) + 0.5 * np.pi * eps * (1 - x * x))
                / (np.pi * (1 - eps / 3)))

    for j in range(1000 - 30, 1031, 5):
        value, _ = integrate.quad(lambda x: profile(x) * 0.5 * np.exp(-0.5 * ((v[j] - x * vsini) / sigma_v) ** 2),
                                  -1, 1, epsabs=1e-12)
        # discrete convolution with a pixel-averaged kernel vs the integral: the line is
        # sampled at 2.2 px per sigma, so the discretization error is ~(1/24) px^2 f'' ~ 1e-3
        # of the depth at most (measured 2.2e-4)
        assert 1 - out.flux[0, j] == pytest.approx(value, abs=5e-4)


def test_instrumental_broadening_matches_convolve_resolution():
    w, flux = _line_spectra(2)
    out = augment(flux, w, resolution=5000.0, seed=0)
    expected, _ = preprocess.convolve_resolution(w, flux, np.ones_like(flux), 5000.0)
    np.testing.assert_allclose(out.flux, expected, rtol=0, atol=0, equal_nan=True)


def test_scale_tilt_bad_pixels_and_tellurics():
    w = apogee_wavelength(7214)
    flux = np.ones((3, w.size))
    ivar = np.full_like(flux, 4.0)
    out = augment(flux, w, ivar, flux_scale=2.0, tilt=0.1, seed=0)
    factor = 2.0 * (1 + 0.1 * (2 * (w - w[0]) / (w[-1] - w[0]) - 1))    # linear in wavelength
    np.testing.assert_allclose(out.flux, np.broadcast_to(factor, flux.shape), rtol=1e-15)
    np.testing.assert_allclose(out.ivar, np.broadcast_to(4.0 / factor**2, flux.shape), rtol=1e-15)
    bad = augment(flux, w, ivar, bad_fraction=0.1, seed=0)
    assert np.all((bad.ivar == 0).sum(axis=1) == round(0.1 * w.size))
    assert np.all(bad.flux[bad.ivar == 0] == 0)
    tell = augment(flux, w, ivar, telluric_ranges=[[15300, 15310]], seed=0)
    inside = (w >= 15300) & (w <= 15310)
    assert np.all(tell.ivar[:, inside] == 0) and np.all(tell.ivar[:, ~inside] == 4.0)


def test_bad_input():
    w, flux = _line_spectra(1)
    with pytest.raises(ValueError, match="tilt makes the flux scale non-positive"):
        augment(flux, w, tilt=1.5, seed=0)
    with pytest.raises(ValueError, match="rv range must be"):
        augment(flux, w, rv=(10, -10))
    with pytest.raises(ValueError, match="vsini must be >= 0"):
        augment(flux, w, vsini=-1)
    with pytest.raises(ValueError, match="snr must be > 0"):
        augment(flux, w, snr=0)
    with pytest.raises(ValueError, match="bad_fraction must be <= 1"):
        augment(flux, w, bad_fraction=2)
    with pytest.raises(ValueError, match="n_copies must be >= 1"):
        augment(flux, w, n_copies=0)
    with pytest.raises(ValueError, match="flux has 3000 pixels, wavelength has 10"):
        augment(flux, w[:10])
    with pytest.raises(ValueError, match="uniform in log"):
        augment(flux, np.linspace(15000, 17000, 3000), vsini=10)
    with pytest.raises(TypeError, match="rv must be a number"):
        augment(flux, w, rv="fast")
