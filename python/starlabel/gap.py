"""The synthetic gap, made visible: a low-dimensional embedding of synthetic and observed
spectra together, a number for how far apart the two sets are, and an optional plot.

PCA always (NumPy SVD); t-SNE when scikit-learn is installed; the plot needs matplotlib.
"""

import dataclasses

import numpy as np

from . import _validation as check

__all__ = ["synthetic_gap", "SyntheticGap", "frechet_distance"]


def _sqrt_psd(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a, b):
    """Squared Frechet (2-Wasserstein) distance between Gaussians fitted to point sets
    ``a`` (n_a, d) and ``b`` (n_b, d):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of columns, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each set needs at least 2 points")
    mu = a.mean(axis=0) - b.mean(axis=0)
    sa = np.atleast_2d(np.cov(a, rowvar=False))
    sb = np.atleast_2d(np.cov(b, rowvar=False))
    root = _sqrt_psd(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0.0, None)).sum()
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * cross)


@dataclasses.dataclass
class SyntheticGap:
    """Result of synthetic_gap.

    synthetic, observed : (n, n_components) embeddings of each set
    distance : squared Frechet distance between the two sets in the first ``n_distance``
        principal components, divided by the combined set's variance there (0: the same
        distribution; ~1 and more: the sets are as far apart as they are wide)
    mean_offset : the part of it due to the difference of the means alone
    explained_variance_ratio : of each principal component kept
    components : (n_components, n_pixels_used) PCA axes; mean (n_pixels_used,)
    pixels : bool (n_pixels,) pixels used (good in at least half the spectra)
    method : "pca" or "tsne"
    """

    synthetic: np.ndarray
    observed: np.ndarray
    distance: float
    mean_offset: float
    explained_variance_ratio: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    pixels: np.ndarray
    method: str

    def plot(self, ax=None):
        """Scatter the two sets in the first two embedding dimensions on ``ax`` (a new pyplot
        figure when None) and return ``ax``; needs matplotlib. ``starlabel.plots.gap_embedding``
        draws the same on a figure of its own."""
        from . import plots

        plots._check_gap(self)
        if ax is None:
            _, ax = plots._pyplot().subplots()
        return plots._draw_gap(self, ax)


def _fill(name, flux, ivar):
    flux = check.as_float_array(name, flux, 2)
    if ivar is None:
        good = np.isfinite(flux)
    else:
        flux, ivar = check.spectra(flux, ivar)
        good = (ivar > 0) & np.isfinite(flux)
    return flux, good


def synthetic_gap(synthetic_flux, observed_flux, *, synthetic_ivar=None, observed_ivar=None,
                  n_components=2, n_distance=10, method="pca", seed=0, plot=False, ax=None):
    """Embed synthetic and observed spectra together and measure the gap between them.

    Parameters
    ----------
    synthetic_flux, observed_flux : (n_synthetic, n_pixels), (n_observed, n_pixels), on the
        same grid (resample first)
    synthetic_ivar, observed_ivar : optional; pixels with ivar == 0 (or non-finite flux) are
        filled with the pixel's mean over the good spectra; pixels good in fewer than half
        of all spectra are left out
    n_components : dimensions of the returned embedding
    n_distance : principal components used for the distance
    method : "pca", or "tsne" (scikit-learn, run on the first 50 principal components)
    plot : also draw the embedding (matplotlib) on ``ax``

    Returns
    -------
    SyntheticGap
    """
    check.choice("method", method, {"pca", "tsne"})
    syn, syn_good = _fill("synthetic_flux", synthetic_flux, synthetic_ivar)
    obs, obs_good = _fill("observed_flux", observed_flux, observed_ivar)
    if syn.shape[1] != obs.shape[1]:
        raise ValueError(f"synthetic_flux has {syn.shape[1]} pixels, observed_flux has {obs.shape[1]}; "
                         "resample both onto one grid first")
    if syn.shape[0] < 2 or obs.shape[0] < 2:
        raise ValueError("synthetic_flux and observed_flux need at least 2 spectra each")
    n_components = check.positive_int("n_components", n_components)
    n_distance = check.positive_int("n_distance", n_distance)
    flux = np.vstack([syn, obs])
    good = np.vstack([syn_good, obs_good])
    pixels = good.mean(axis=0) >= 0.5
    if not pixels.any():
        raise ValueError("no pixel is good in at least half of the spectra")
    flux, good = flux[:, pixels], good[:, pixels]
    fill = np.where(good, flux, 0.0).sum(axis=0) / np.maximum(good.sum(axis=0), 1)
    flux = np.where(good, flux, fill)
    mean = flux.mean(axis=0)
    centred = flux - mean
    if centred.shape[0] < centred.shape[1]:
        # fewer spectra than pixels: principal axes from the (n x n) Gram matrix, which is far
        # cheaper than the SVD of the (n x n_pixels) matrix and gives the same leading axes
        variance, u = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(variance)[::-1]
        variance, u = np.clip(variance[order], 0.0, None), u[:, order]
        keep = variance > variance[0] * 1e-12 if variance[0] > 0 else np.zeros_like(variance, bool)
        keep[0] = True
        variance, u = variance[keep], u[:, keep]
        vt = (u.T @ centred) / np.sqrt(np.where(variance > 0, variance, 1.0))[:, None]
    else:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        variance = singular**2
    total = variance.sum()
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    k = min(n_distance, vt.shape[0])
    scores = centred @ vt[:k].T
    n_syn = syn.shape[0]
    spread = scores.var(axis=0, ddof=1).sum()
    fid = frechet_distance(scores[:n_syn], scores[n_syn:])
    offset = scores[:n_syn].mean(axis=0) - scores[n_syn:].mean(axis=0)
    scale = spread if spread > 0 else 1.0
    n_keep = min(n_components, vt.shape[0])
    if method == "pca":
        embedding = centred @ vt[:n_keep].T
    else:
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ImportError("method='tsne' needs scikit-learn: pip install scikit-learn") from None
        reduced = centred @ vt[:min(50, vt.shape[0])].T
        perplexity = min(30.0, (flux.shape[0] - 1) / 3.0)
        embedding = TSNE(n_components=n_keep, random_state=seed, perplexity=perplexity,
                         init="pca").fit_transform(reduced)
    result = SyntheticGap(embedding[:n_syn], embedding[n_syn:], fid / scale,
                          float(offset @ offset) / scale, ratio[:n_keep], vt[:n_keep], mean,
                          pixels, method)
    if plot:
        result.plot(ax)
    return result
