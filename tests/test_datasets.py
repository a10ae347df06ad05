"""Tests for starlabel.datasets: shapes, determinism, physics and validation."""

import numpy as np
import pytest

from starlabel.datasets import (SUPPORTED_LABELS, SyntheticSurvey, apogee_wavelength,
                                synthetic_spectra, synthetic_survey)

BASE = ("TEFF", "LOGG", "FE_H")


def test_shapes_dtypes_and_unpacking_order():
    survey = synthetic_survey(50, n_pixels=600, seed=3)
    assert isinstance(survey, SyntheticSurvey)
    labels, label_names, wavelength, flux, ivar = survey
    assert SyntheticSurvey._fields == ("labels", "label_names", "wavelength", "flux", "ivar")
    assert label_names == BASE
    assert labels.shape == (50, 3) and wavelength.shape == (600,)
    assert flux.shape == ivar.shape == (50, 600)
    for a in (labels, wavelength, flux, ivar):
        assert a.dtype == np.float64
    assert np.all(np.diff(wavelength) > 0)


def test_default_grid_is_apogee_like():
    wl = apogee_wavelength()
    assert wl.size == 7514 and wl[0] == 15150.0 and wl[-1] == 16950.0
    step = np.diff(np.log10(wl))
    gaps = step > 1e-4
    assert gaps.sum() == 2  # two chip gaps
    assert np.allclose(step[~gaps], 6.1e-6, rtol=0.02)  # ~APOGEE log-linear step


def test_same_seed_identical_different_seed_differs():
    a = synthetic_survey(40, n_pixels=500, seed=7, bad_pixel_fraction=0.1)
    b = synthetic_survey(40, n_pixels=500, seed=7, bad_pixel_fraction=0.1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = synthetic_survey(40, n_pixels=500, seed=8)
    assert not np.allclose(a.labels, c.labels)


def test_noiseless_flux_is_synthetic_spectra_for_every_seed():
    for seed in (0, 1):
        s = synthetic_survey(30, label_names=SUPPORTED_LABELS, n_pixels=800, snr=None,
                             seed=seed)
        np.testing.assert_array_equal(s.flux, synthetic_spectra(s.labels, s.label_names,
                                                                s.wavelength))
        assert np.all(s.ivar == 1e4)
        assert np.all(s.flux > 0) and np.all(s.flux <= 1)
        assert np.mean(s.flux < 0.95) > 0.05  # there really are lines


def test_line_list_is_shared_across_wavelength_ranges():
    wl = apogee_wavelength(2000)
    labels = synthetic_survey(5, snr=None, n_pixels=10).labels
    full = synthetic_spectra(labels, BASE, wl)
    part = synthetic_spectra(labels, BASE, wl[300:900])
    np.testing.assert_allclose(part, full[:, 300:900], atol=1e-7)
    single = synthetic_spectra(labels[0], BASE, wl)
    assert single.shape == (2000,)
    np.testing.assert_array_equal(single, full[0])


def test_label_distribution_is_realistic():
    s = synthetic_survey(3000, label_names=SUPPORTED_LABELS, n_pixels=10, seed=0)
    col = dict(zip(s.label_names, s.labels.T))
    assert np.all(s.labels.std(axis=0) > 0.03)  # no constant label
    assert 3800 <= col["TEFF"].min() and col["TEFF"].max() <= 6000
    assert -1.5 <= col["FE_H"].min() and col["FE_H"].max() <= 0.5
    assert abs(np.median(col["FE_H"]) + 0.2) < 0.05
    assert 0.10 < np.mean(col["LOGG"] > 3.8) < 0.20  # dwarf fraction
    giants = col["LOGG"] < 3.5
    assert np.corrcoef(col["TEFF"][giants], col["LOGG"][giants])[0, 1] > 0.8
    metal_poor, solar = col["FE_H"] < -0.8, col["FE_H"] > 0
    for x in ("O_FE", "MG_FE", "SI_FE", "CA_FE"):
        assert col[x][metal_poor].mean() - col[x][solar].mean() > 0.15
    # Subsets of labels are the same stars: labels depend only on seed and n_stars.
    sub = synthetic_survey(3000, label_names=("MG_FE", "FE_H", "LOGG", "TEFF"),
                           n_pixels=10, seed=0)
    np.testing.assert_array_equal(sub.labels[:, 0], col["MG_FE"])
    np.testing.assert_array_equal(sub.labels[:, 3], col["TEFF"])


def _rms_residual(labels, flux, quadratic):
    x = (labels - labels.mean(0)) / labels.std(0)
    cols = [np.ones(len(x))] + list(x.T)
    if quadratic:
        cols += [x[:, i] * x[:, j] for i in range(3) for j in range(i, 3)]
    design = np.column_stack(cols)
    coef, *_ = np.linalg.lstsq(design, flux, rcond=None)
    return np.sqrt(np.mean((flux - design @ coef) ** 2))


def test_flux_depends_nonlinearly_on_labels():
    rng = np.random.default_rng(3)
    labels = np.column_stack([rng.uniform(4500, 5000, 300), rng.uniform(2, 3, 300),
                              rng.uniform(-0.4, 0.2, 300)])
    flux = synthetic_spectra(labels, BASE, apogee_wavelength(1000))
    linear = _rms_residual(labels, flux, quadratic=False)
    quadratic = _rms_residual(labels, flux, quadratic=True)
    assert quadratic < 0.4 * linear
    assert 1e-5 < quadratic < 5e-3


def test_lines_deepen_with_their_element_abundance():
    names = BASE + ("MG_FE",)
    wl = apogee_wavelength(3000)
    low, high = synthetic_spectra([[4800, 2.5, -0.2, -0.2], [4800, 2.5, -0.2, 0.2]],
                                  names, wl)
    assert np.all(high <= low + 1e-12)  # more Mg only adds absorption
    assert (low - high).max() > 0.05   # some Mg line is clearly deeper
    assert np.mean(low - high > 1e-4) < 0.2  # ...and only Mg lines change


def test_noise_matches_snr_and_bad_pixels():
    snr = np.array([20.0, 50.0, 100.0, 200.0])
    s = synthetic_survey(4, n_pixels=7514, snr=snr, bad_pixel_fraction=0.05, seed=2)
    noiseless = synthetic_spectra(s.labels, s.label_names, s.wavelength)
    bad = s.ivar == 0
    np.testing.assert_array_equal(bad, np.isnan(s.flux))
    np.testing.assert_array_equal(bad.sum(axis=1), round(0.05 * 7514))
    std = np.nanstd(s.flux - noiseless, axis=1)
    np.testing.assert_allclose(std, 1 / snr, rtol=0.05)
    np.testing.assert_allclose(s.ivar[~bad], np.broadcast_to(snr[:, None] ** 2,
                                                             bad.shape)[~bad])


def test_all_seventeen_labels_and_custom_wavelength():
    wl = np.linspace(15500.0, 15600.0, 300)
    s = synthetic_survey(10, label_names=SUPPORTED_LABELS, wavelength=wl, snr=None)
    assert len(SUPPORTED_LABELS) == 17
    assert s.labels.shape == (10, 17) and s.flux.shape == (10, 300)
    np.testing.assert_array_equal(s.wavelength, wl)
    assert synthetic_survey(2, wavelength=wl, n_pixels=300).flux.shape == (2, 300)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_stars=0), "n_stars"),
    (dict(n_stars=2.5), "n_stars"),
    (dict(n_stars=True), "n_stars"),
    (dict(label_names=("TEFF", "LOGG", "FE_H", "XX_FE")), "label_names"),
    (dict(label_names=("TEFF", "LOGG", "FE_H", "FE_H")), "label_names"),
    (dict(label_names=("TEFF", "LOGG", "MG_FE")), "label_names"),
    (dict(label_names="TEFF"), "label_names"),
    (dict(n_pixels=0), "n_pixels"),
    (dict(wavelength=np.linspace(15200, 15300, 50), n_pixels=60), "n_pixels"),
    (dict(wavelength=np.linspace(15300, 15200, 50)), "wavelength"),
    (dict(wavelength=np.ones((5, 5))), "wavelength"),
    (dict(wavelength=[15200.0, np.nan]), "wavelength"),
    (dict(snr=0.0), "snr"),
    (dict(snr=-5.0), "snr"),
    (dict(snr=np.nan), "snr"),
    (dict(snr=np.ones(3)), "snr"),
    (dict(bad_pixel_fraction=-0.1), "bad_pixel_fraction"),
    (dict(bad_pixel_fraction=1.0), "bad_pixel_fraction"),
])
def test_invalid_arguments_raise(kwargs, name):
    kwargs = {"n_stars": 4, "n_pixels": 50, **kwargs}
    if "wavelength" in kwargs and name != "n_pixels":
        kwargs.pop("n_pixels")
    with pytest.raises(ValueError, match=name):
        synthetic_survey(**kwargs)


def test_synthetic_spectra_validates_labels():
    with pytest.raises(ValueError, match="labels"):
        synthetic_spectra(np.zeros((3, 4)), BASE)
    with pytest.raises(ValueError, match="labels"):
        synthetic_spectra([[4800.0, np.nan, 0.0]], BASE)
