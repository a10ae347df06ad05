"""fit_spectra on real APOGEE spectra with the real BinSpec normalized per-pixel network
(../shared/data/the_payne; see its SOURCE.md): 5 labels + RV against scipy's trust-region
least squares on the same problem, from several starts; the RV search on real visit spectra."""

import numpy as np
import pytest

import starlabel
from starlabel import FitStatus, fitting, reference

STARTS = np.array([[5000.0, 4.5, 0.0, 0.1, 10.0],
                   [6200.0, 4.2, -0.5, 0.3, 25.0],
                   [4500.0, 4.8, 0.2, -0.1, 5.0]])


@pytest.fixture(scope="module")
def apogee(shared_data):
    d = shared_data / "the_payne"
    wave = np.load(d / "apogee_wavelength.npz")["wavelength"]
    model = starlabel.read_binspec_npz(d / "binspec_2018" / "NN_normalized_spectra.npz",
                                       wavelength=wave)
    mask = np.load(d / "apogee_mask.npz")["apogee_mask"]
    return model, wave, mask, d


def test_combined_spectrum_vs_scipy(apogee):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    model, wave, mask, d = apogee
    spec = np.load(d / "spectrum_ap_id_2M13012770+5754582_.npz")
    flux = spec["spectrum"].astype(np.float64)
    ivar = 1.0 / spec["spec_err"].astype(np.float64) ** 2
    fits = [starlabel.fit_spectra(model, flux, ivar, wave, mask=mask, initial=s) for s in STARTS]
    best = min(fits, key=lambda r: r.chi2[0])
    for r in fits:  # one solution from every start: within a tenth of an error bar
        assert r.status[0] == FitStatus.CONVERGED
        assert np.all(np.abs(r.labels - best.labels) < 0.1 * best.errors), (r.labels, best.labels)
        assert abs(r.rv[0] - best.rv[0]) < 0.1 * best.rv_error[0]
    assert abs(best.rv[0]) < 2.0  # a combined spectrum is in the rest frame

    # scipy on exactly the same problem: the same model (reference backend), the same pixels
    # (mask, and the coverage of the model grid around the searched RV), the same bounds
    desc = fitting._describe(model)
    step = fitting._rv_step(None, wave)
    margin = 2 * step + fitting.RV_MARGIN_KMS
    coverage = fitting._coverage(wave, np.zeros(wave.size, bool), wave,
                                 best.rv_initial[0] - margin, best.rv_initial[0] + margin)
    weight = np.where(mask, 0.0, ivar) * coverage
    layout = {"model_wavelength": wave, "wavelength": wave,
              "segment_index": np.full(wave.size, -1, np.int32), "segment_coord": np.zeros(wave.size),
              "n_segments": 0, "n_coef": 0, "fit_rv": True}
    root_w = np.sqrt(weight)

    def residuals(p):
        return root_w * (flux - reference.spectrum_model(desc["emulator"], layout, p)[0])

    def jacobian(p):
        return -root_w[:, None] * reference.spectrum_model(desc["emulator"], layout, p, jacobian=True)[1][0]

    x0 = np.concatenate([model.scale(STARTS[0]), [best.rv_initial[0]]])
    lower = np.r_[np.full(5, -0.5), -500.0]
    upper = np.r_[np.full(5, 0.5), 500.0]
    sol = scipy_optimize.least_squares(residuals, x0, jac=jacobian, bounds=(lower, upper),
                                       method="trf", x_scale="jac", ftol=1e-12, xtol=1e-12,
                                       gtol=1e-12)
    chi2_scipy = float(np.sum(sol.fun**2))
    labels_scipy = model.unscale(sol.x[:5])
    assert best.n_pixels_used[0] == np.count_nonzero(weight)
    # the criterion: our chi2 not worse than scipy's beyond 1e-6 relative
    print(f"\nchi2 ours {best.chi2[0]:.6f} scipy {chi2_scipy:.6f}; labels ours {best.labels[0]} "
          f"+- {best.errors[0]} scipy {labels_scipy}; rv {best.rv[0]:.4f} +- {best.rv_error[0]:.4f} "
          f"scipy {sol.x[5]:.4f}; reduced chi2 {best.reduced_chi2[0]:.3f}")
    assert best.chi2[0] <= chi2_scipy * (1 + 1e-6), (best.chi2[0], chi2_scipy)
    assert np.all(np.abs(best.labels[0] - labels_scipy) < best.errors[0]), (best.labels, labels_scipy)
    assert abs(best.rv[0] - sol.x[5]) < best.rv_error[0]


def test_visit_spectra_rv_search(apogee):
    """2M06133561+2433362: three heliocentric visits of a probable SB2. The search must find
    visit 1's RV near APOGEE's; every visit must report a poor single-star fit honestly."""
    model, wave, mask, d = apogee
    visits = np.load(d / "visit_spectra_ap_id_2M06133561+2433362_.npz")
    flux, err = visits["spectra"], visits["spec_errs"]
    res = starlabel.fit_spectra(model, flux, 1.0 / err**2, wave, mask=mask)
    vhelio = visits["vhelios"].astype(np.float64)
    print(f"\nrv {res.rv} +- {res.rv_error} (APOGEE {vhelio}); reduced chi2 {res.reduced_chi2}; "
          f"status {res.status}; labels {res.labels}")
    # within 3 km/s (< 1 APOGEE pixel, 4.1 km/s) of APOGEE's pipeline value for visit 1
    assert abs(res.rv[0] - vhelio[0]) < 3.0, (res.rv, vhelio)
    assert np.all(np.isfinite(res.rv_error))
    # not a good single-star fit: reduced chi2 well above 1 for every visit (SOURCE.md: 5-9)
    assert np.all(res.reduced_chi2 > 2.0), res.reduced_chi2
    assert set(res.status) <= {FitStatus.CONVERGED, FitStatus.MAX_ITER}
