"""Choosing the L1 strength by validation on held-out stars: CannonModel.choose_regularization."""

import numpy as np
import pytest
from scipy.stats import norm

from starlabel import CannonModel
from starlabel.datasets import SUPPORTED_LABELS, synthetic_survey

LABELS = SUPPORTED_LABELS[:6]  # 28 quadratic terms: 60 training stars over-fit them


@pytest.fixture(scope="module")
def stars():
    return synthetic_survey(80, label_names=LABELS, n_pixels=60, snr=100.0, seed=21,
                            bad_pixel_fraction=0.05)


def split(stars, rows):
    return stars.labels[rows], stars.flux[rows], stars.ivar[rows]


def test_held_out_cost_is_the_gaussian_log_likelihood(stars):
    labels, flux, ivar = split(stars, slice(0, 60))
    ivar[:, 0] = 0.0  # pixel 0 cannot be trained: it is left out of every total
    held_out = split(stars, slice(60, 80))
    scan = CannonModel(LABELS).choose_regularization(labels, flux, ivar, [30.0, 0.0],
                                                     validation=held_out)
    np.testing.assert_array_equal(scan.strengths, [0.0, 30.0])
    assert scan.n_pixels_compared == 59 and np.all(np.isnan(scan.pixel_cost[:, 0]))
    np.testing.assert_allclose(scan.cost, scan.pixel_cost[:, 1:].sum(axis=1), rtol=1e-12)
    assert scan.best == scan.strengths[np.argmin(scan.cost)]

    # Oracle: -2 ln L of the held-out spectra under models trained on their own, where
    # ln L sums scipy's normal log-density over the pixels with ivar > 0.
    val_labels, val_flux, val_ivar = held_out
    used = val_ivar > 0
    for strength, pixel_cost in zip(scan.strengths, scan.pixel_cost):
        model = CannonModel(LABELS, regularization=strength).train(labels, flux, ivar)
        sigma = np.sqrt(1.0 / np.where(used, val_ivar, 1.0) + model.s2)
        density = norm.logpdf(val_flux, loc=model.predict(val_labels), scale=sigma)
        log_like = np.where(used, density, 0.0).sum(axis=0)
        expected = -2.0 * log_like - used.sum(axis=0) * np.log(2.0 * np.pi)
        np.testing.assert_allclose(pixel_cost[1:], expected[1:], rtol=1e-10)


def test_chosen_strength_predicts_new_stars_better_than_none(stars):
    scan = CannonModel(LABELS).choose_regularization(
        stars.labels, stars.flux, stars.ivar, [0.0, 3.0, 30.0, 300.0, 3000.0])
    assert 0.0 < scan.best < 3000.0  # an interior minimum: over-fit at 0, too stiff at 3000
    assert scan.cost[0] - scan.cost.min() > 100.0
    # The choice is not an accident of the validation stars: new stars agree.
    fresh = synthetic_survey(40, label_names=LABELS, n_pixels=60, snr=100.0, seed=22)
    check = CannonModel(LABELS).choose_regularization(
        stars.labels, stars.flux, stars.ivar, [0.0, scan.best],
        validation=(fresh.labels, fresh.flux, fresh.ivar))
    assert check.cost[1] < check.cost[0]


def test_default_split_is_the_documented_permutation(stars):
    model = CannonModel(LABELS, order=1)
    scan = model.choose_regularization(stars.labels, stars.flux, stars.ivar, [0.0, 10.0],
                                       validation_fraction=0.3, seed=5)
    permutation = np.random.default_rng(5).permutation(80)
    explicit = model.choose_regularization(*split(stars, permutation[24:]), [0.0, 10.0],
                                           validation=split(stars, permutation[:24]))
    np.testing.assert_array_equal(scan.pixel_cost, explicit.pixel_cost)
    assert not model.is_trained and model.regularization == 0.0  # the model is not changed


def test_backends_score_the_same():
    stars = synthetic_survey(50, label_names=LABELS[:4], n_pixels=12, snr=100.0, seed=23)
    scans = [CannonModel(LABELS[:4], backend=backend).choose_regularization(
        stars.labels, stars.flux, stars.ivar, [0.0, 10.0, 100.0]) for backend in
        ("fast", "reference")]
    np.testing.assert_allclose(scans[0].pixel_cost, scans[1].pixel_cost, rtol=1e-8)
    assert scans[0].best == scans[1].best


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(strengths=[]), ValueError, "strengths is empty"),
    (dict(strengths=[0.0, -1.0]), ValueError, "strengths must be finite and >= 0"),
    (dict(strengths=[1.0, np.nan]), ValueError, "strengths must be finite and >= 0"),
    (dict(strengths=[1.0, 1.0]), ValueError, "strengths must be distinct"),
    (dict(strengths=[[1.0]]), ValueError, "strengths must have 1 dimension"),
    (dict(validation_fraction=1.0), ValueError, r"validation_fraction must lie in \[0, 1\)"),
    (dict(validation_fraction=0.0), ValueError, "holds out no stars"),
    (dict(validation_fraction=0.7), ValueError, "24 training stars .* fewer than the 28 terms"),
    (dict(validation=(1, 2)), TypeError, r"validation must be a \(labels, flux, ivar\)"),
    (dict(validation="stars"), TypeError, r"validation must be a \(labels, flux, ivar\)"),
])
def test_bad_arguments_are_named(stars, kwargs, error, match):
    with pytest.raises(error, match=match):
        CannonModel(LABELS).choose_regularization(stars.labels, stars.flux, stars.ivar, **kwargs)


def test_bad_validation_stars_are_named(stars):
    labels, flux, ivar = split(stars, slice(0, 20))
    model = CannonModel(LABELS, order=1)
    nan_flux = flux.copy()
    nan_flux[3, 7] = np.nan
    ivar[3, 7] = 1.0
    cases = [
        ((labels[:, :5], flux, ivar), "validation labels must have 6 columns"),
        ((labels, flux[:, :50], ivar[:, :50]), "validation: flux has 50 pixels"),
        ((labels[:10], flux, ivar), "validation labels has 10 stars but validation flux has 20"),
        ((labels, nan_flux, ivar), "validation: flux is NaN or inf where ivar > 0"),
        ((labels, flux, -ivar), "validation: ivar contains negative values"),
    ]
    for validation, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            model.choose_regularization(stars.labels, stars.flux, stars.ivar, [0.0],
                                        validation=validation)
