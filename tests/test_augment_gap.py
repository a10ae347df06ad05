"""The synthetic gap: PCA embedding and Frechet distance against independent computations,
and the gap closing when augmentation matches the observed set's resolution, noise and RVs."""

import importlib.util

import numpy as np
import pytest

from starlabel import augment, preprocess
from starlabel.datasets import synthetic_survey
from starlabel.gap import frechet_distance, synthetic_gap


def test_frechet_distance_exact_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 3))
    # b = c a + shift: S_b = c^2 S_a commutes with S_a, so the distance is exactly
    # |(1 - c) mean(a) - shift|^2 + (1 - c)^2 tr(S_a)
    c, shift = 1.7, np.array([0.3, -1.0, 2.0])
    b = c * a + shift
    d = (1 - c) * a.mean(axis=0) - shift
    expected = d @ d + (1 - c) ** 2 * np.trace(np.cov(a, rowvar=False))
    # eigen-decompositions of 3x3 matrices: ~1e-14 relative
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)
    one = rng.normal(2.0, 3.0, (400, 1))
    two = rng.normal(-1.0, 0.5, (300, 1))
    analytic = (one.mean() - two.mean()) ** 2 + (one.std(ddof=1) - two.std(ddof=1)) ** 2
    assert frechet_distance(one, two) == pytest.approx(analytic, rel=1e-12)
    with pytest.raises(ValueError, match="same number of columns"):
        frechet_distance(a, b[:, :2])


def test_pca_embedding_matches_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 200)) + np.outer(rng.normal(size=60), rng.normal(size=200))
    gap = synthetic_gap(x[:25], x[25:], n_components=4)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(np.sum(gap.components * vt[:4], axis=1))
    # Gram-matrix eigenvectors vs SVD: both ~1e-15 relative for well-separated components
    np.testing.assert_allclose(gap.components * signs[:, None], vt[:4], atol=1e-10)
    np.testing.assert_allclose(gap.explained_variance_ratio, (s**2 / np.sum(s**2))[:4], rtol=1e-10)
    embedding = np.vstack([gap.synthetic, gap.observed]) * signs
    np.testing.assert_allclose(embedding, centred @ vt[:4].T, atol=1e-9)
    assert gap.method == "pca" and gap.synthetic.shape == (25, 4)


def test_augmentation_closes_the_gap():
    w = preprocess.apogee_wavelength(7214)[:2920]           # the blue chip
    synthetic = synthetic_survey(80, wavelength=w, n_pixels=2920, snr=None, seed=1).flux
    other = synthetic_survey(80, wavelength=w, n_pixels=2920, snr=None, seed=2).flux
    observed = augment(other, w, resolution=8000, snr=50, rv=(-30, 30), bad_fraction=0.01, seed=3)
    same = synthetic_gap(synthetic, other)
    raw = synthetic_gap(synthetic, observed.flux, observed_ivar=observed.ivar)
    augmented = augment(synthetic, w, resolution=8000, snr=50, rv=(-30, 30), seed=4)
    closed = synthetic_gap(augmented.flux, observed.flux, synthetic_ivar=augmented.ivar,
                           observed_ivar=observed.ivar)
    # measured: same-distribution 0.09, raw gap 1.25, after augmentation 0.12 (two sets of
    # 80 stars: sampling alone gives ~0.1)
    assert same.distance < 0.25 and closed.distance < 0.25
    assert raw.distance > 0.8 and raw.distance > 5 * closed.distance
    assert raw.mean_offset > 0.3


def test_gap_options_and_bad_input():
    x = np.random.default_rng(2).normal(size=(10, 30))
    if importlib.util.find_spec("sklearn") is None:
        with pytest.raises(ImportError, match="scikit-learn"):
            synthetic_gap(x[:5], x[5:], method="tsne")
    else:
        assert synthetic_gap(x[:5], x[5:], method="tsne").synthetic.shape == (5, 2)
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ImportError, match="matplotlib"):
            synthetic_gap(x[:5], x[5:], plot=True)
    with pytest.raises(ValueError, match="resample both onto one grid"):
        synthetic_gap(x[:5], x[5:, :20])
    with pytest.raises(ValueError, match="at least 2 spectra"):
        synthetic_gap(x[:1], x[5:])
    with pytest.raises(ValueError, match="method"):
        synthetic_gap(x[:5], x[5:], method="umap")
    ivar = np.ones((5, 30))
    ivar[:, :] = 0
    with pytest.raises(ValueError, match="no pixel is good"):
        synthetic_gap(x[:5], x[5:], synthetic_ivar=ivar, observed_ivar=ivar)
