"""Label errors calibrated on held-out stars: ErrorFloor and the models' calibrate_errors."""

import copy

import numpy as np
import pytest

from starlabel import CannonModel, PayneModel, fit_spectra
from starlabel._concat import concatenate_results
from starlabel.datasets import synthetic_survey
from starlabel.error_floor import ErrorFloor

SNR = 300.0  # the model's misfit, not the noise, dominates the label errors here


def formal_errors(result):
    return np.sqrt(np.diagonal(result.formal_covariance, axis1=1, axis2=2))


@pytest.fixture(scope="module")
def model(survey):
    return CannonModel(survey.label_names, wavelength=survey.wavelength).train(
        survey.labels, survey.flux, survey.ivar)


@pytest.fixture(scope="module")
def calibrated(model):
    stars = synthetic_survey(1000, n_pixels=120, snr=SNR, seed=31)
    return copy.copy(model).calibrate_errors(stars.labels, stars.flux, stars.ivar)


def test_floor_is_the_mean_excess_of_the_nearest_calibration_stars():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(200, 3)) * [300.0, 0.5, 0.2]
    excess = rng.normal(0.2, 1.0, size=(200, 3)) * [30.0, 0.05, 0.02]
    scales = np.array([600.0, 1.0, 0.4])
    floor = ErrorFloor(labels, excess, scales, n_neighbors=7)
    queries = rng.normal(size=(50, 3)) * [300.0, 0.5, 0.2]
    queries[4] = np.nan
    # Oracle: brute-force distances in scaled labels
    distance = np.linalg.norm((queries[:, None, :] - labels[None]) / scales, axis=2)
    nearest = np.argsort(distance, axis=1)[:, :7]
    expected = np.sqrt(np.maximum(excess[nearest].mean(axis=1), 0.0))
    expected[4] = np.nan
    got = floor(queries)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert 0 < np.mean(got == 0) < 1  # both branches of the max


def test_calibration_keeps_the_excess_of_the_given_stars(model, calibrated):
    stars = synthetic_survey(1000, n_pixels=120, snr=SNR, seed=31)
    fit = model.fit_labels(stars.flux, stars.ivar)
    ok = fit.converged
    np.testing.assert_array_equal(calibrated.error_floor.labels, fit.labels[ok])
    np.testing.assert_allclose(calibrated.error_floor.excess,
                               (fit.labels[ok] - stars.labels[ok]) ** 2 - fit.errors[ok] ** 2,
                               rtol=1e-12)
    assert model.error_floor is None  # the uncalibrated model is untouched


def test_calibrated_errors_match_the_scatter_of_new_stars(calibrated):
    stars = synthetic_survey(1000, n_pixels=120, snr=SNR, seed=32)
    result = calibrated.fit_labels(stars.flux, stars.ivar)
    error = result.labels - stars.labels
    assert np.all(np.std(error / formal_errors(result), axis=0) > 2.0)
    # 1000 heavy-tailed pulls: the std of their std is ~0.03
    pull_std = np.std(error / result.errors, axis=0)
    assert np.all((pull_std > 0.9) & (pull_std < 1.1)), pull_std


def test_no_floor_for_spectra_the_model_itself_made(model):
    rng = np.random.default_rng(33)
    stars = synthetic_survey(300, n_pixels=120, snr=SNR, seed=33)
    flux = model.predict(stars.labels) + rng.normal(size=stars.flux.shape) / SNR
    calibrated = copy.copy(model).calibrate_errors(stars.labels, flux, stars.ivar)
    result = calibrated.fit_labels(flux[:100], stars.ivar[:100])
    assert np.all(result.error_floor <= 0.25 * formal_errors(result))


def test_covariance_adds_the_floor_to_the_formal_one(model, calibrated):
    stars = synthetic_survey(20, n_pixels=120, snr=SNR, seed=34)
    plain = model.fit_labels(stars.flux, stars.ivar)
    result = calibrated.fit_labels(stars.flux, stars.ivar)
    np.testing.assert_array_equal(result.formal_covariance, plain.covariance)
    np.testing.assert_array_equal(result.error_floor, calibrated.error_floor(result.labels))
    expected = plain.covariance.copy()
    for a in range(3):
        expected[:, a, a] += result.error_floor[:, a] ** 2
    np.testing.assert_allclose(result.covariance, expected, rtol=1e-15)
    np.testing.assert_allclose(result.errors**2, plain.errors**2 + result.error_floor**2,
                               rtol=1e-12)
    assert plain.error_floor is None and plain.formal_covariance is plain.covariance


def test_fit_spectra_and_joined_results_keep_the_floor(model, calibrated):
    stars = synthetic_survey(6, n_pixels=120, snr=SNR, seed=35)
    plain = fit_spectra(model, stars.flux, stars.ivar, rv_range=(-50.0, 50.0))
    result = fit_spectra(calibrated, stars.flux, stars.ivar, rv_range=(-50.0, 50.0))
    np.testing.assert_array_equal(result.error_floor, calibrated.error_floor(result.labels))
    np.testing.assert_allclose(result.errors**2, plain.errors**2 + result.error_floor**2,
                               rtol=1e-12)
    np.testing.assert_array_equal(result.rv_error, plain.rv_error)  # labels only

    pieces = [calibrated.fit_labels(stars.flux[:2], stars.ivar[:2]),
              calibrated.fit_labels(stars.flux[2:], stars.ivar[2:])]
    joined = concatenate_results(pieces)
    whole = calibrated.fit_labels(stars.flux, stars.ivar)
    np.testing.assert_allclose(joined.covariance, whole.covariance, rtol=1e-12)
    with pytest.raises(ValueError, match="disagree on error floors"):
        concatenate_results([pieces[0], model.fit_labels(stars.flux[:2], stars.ivar[:2])])


def test_write_keeps_and_train_clears_the_calibration(calibrated, survey, tmp_path):
    path = tmp_path / "calibrated.npz"
    calibrated.write(path)
    loaded = CannonModel.read(path)
    stars = synthetic_survey(5, n_pixels=120, snr=SNR, seed=36)
    np.testing.assert_array_equal(loaded.fit_labels(stars.flux, stars.ivar).errors,
                                  calibrated.fit_labels(stars.flux, stars.ivar).errors)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "calibration_excess"}
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match="error calibration needs all of"):
        CannonModel.read(tmp_path / "partial.npz")
    loaded.train(survey.labels, survey.flux, survey.ivar)
    assert loaded.error_floor is None


def test_bad_calibration_input_is_named(model, survey):
    stars = synthetic_survey(60, n_pixels=120, snr=SNR, seed=37)
    with pytest.raises(RuntimeError, match="not trained"):
        CannonModel(survey.label_names).calibrate_errors(stars.labels, stars.flux, stars.ivar)
    cases = [
        (dict(labels=stars.labels[:50]), ValueError, "labels has 50 stars but flux has 60"),
        (dict(flux=stars.flux[:, :100], ivar=stars.ivar[:, :100]), ValueError,
         "flux has 100 pixels, the model has 120"),
        (dict(n_neighbors=61), ValueError, "fewer than n_neighbors=61"),
        (dict(n_neighbors=0), ValueError, "n_neighbors must be >= 1"),
        (dict(n_neighbors=True), TypeError, "n_neighbors must be an int"),
    ]
    for change, error, match in cases:
        kwargs = {**dict(labels=stars.labels, flux=stars.flux, ivar=stars.ivar), **change}
        with pytest.raises(error, match=match):
            model.calibrate_errors(**kwargs)
    assert model.error_floor is None
    # a failed calibration keeps the one before
    calibrated = copy.copy(model).calibrate_errors(stars.labels, stars.flux, stars.ivar,
                                                   n_neighbors=20)
    floor = calibrated.error_floor
    with pytest.raises(ValueError, match="fewer than n_neighbors=61"):
        calibrated.calibrate_errors(stars.labels, stars.flux, stars.ivar, n_neighbors=61)
    assert calibrated.error_floor is floor


def test_payne_calibration_reaches_fit_spectra_and_files(tmp_path):
    """An emulator trained briefly on noiseless spectra misfits them (formal pulls 4-9 at
    S/N 100); calibrated on 600 other stars through fit_spectra, its errors match the scatter
    of new stars. The calibration survives write/read and is cleared by train."""
    train = synthetic_survey(500, n_pixels=120, snr=None, seed=1)
    payne = PayneModel(train.label_names, hidden=(32, 32), wavelength=train.wavelength)
    payne.train(train.labels, train.flux, epochs=100, batch_size=64, optimizer="adam",
                learning_rate=3e-3, lr_schedule="cosine", loss="l2", seed=0)

    def inside_box(seed):
        stars = synthetic_survey(600, n_pixels=120, snr=100.0, seed=seed)
        inside = np.all((stars.labels > payne.x_min) & (stars.labels < payne.x_max), axis=1)
        return stars.labels[inside], stars.flux[inside], stars.ivar[inside]

    payne.calibrate_errors(*inside_box(61), fit_rv=False)
    labels, flux, ivar = inside_box(62)
    result = fit_spectra(payne, flux, ivar, fit_rv=False)
    error = result.labels - labels
    assert np.all(np.std(error / formal_errors(result), axis=0) > 3.0)
    # ~590 heavy-tailed pulls: the std of their std is ~0.03-0.04
    pull_std = np.std(error / result.errors, axis=0)
    assert np.all((pull_std > 0.9) & (pull_std < 1.1)), pull_std

    payne.write(tmp_path / "payne.npz")
    loaded = PayneModel.read(tmp_path / "payne.npz")
    np.testing.assert_array_equal(fit_spectra(loaded, flux, ivar, fit_rv=False).errors,
                                  result.errors)
    loaded.train(train.labels, train.flux, epochs=1)
    assert loaded.error_floor is None
