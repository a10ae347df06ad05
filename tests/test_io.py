"""starlabel.io: real APOGEE files, generic FITS spectra, label catalogues, result tables."""

import os

import numpy as np
import pytest

fits = pytest.importorskip("astropy.io.fits", reason="starlabel.io needs astropy (the io extra)")
from astropy.table import Table  # noqa: E402
import astropy.units as u  # noqa: E402

from starlabel import io, preprocess  # noqa: E402
from starlabel.result import FitResult  # noqa: E402

KDWARF = "apogee_dr17/apStar-dr17-2M19485057+5005279.fits"
MGIANT = "apogee_dr17/apStar-dr17-2M17335483-2753043.fits"
VISITS = ("apogee_dr17/apVisit-r13-5095-55844-128.fits", "apogee_dr17/apVisit-r13-9518-57729-104.fits")


# --- apStar ----------------------------------------------------------------------------

def test_apstar_wavelength_is_the_header_solution(shared_data):
    spectra = io.read_apstar(shared_data / KDWARF)
    with fits.open(shared_data / KDWARF) as hdul:
        h = hdul[1].header
        expected = 10.0 ** (h["CRVAL1"] + h["CDELT1"] * (np.arange(h["NAXIS1"]) + 1 - h["CRPIX1"]))
    assert spectra.flux.shape == spectra.wavelength.shape == (1, 8575)
    np.testing.assert_array_equal(spectra.wavelength[0], expected)
    assert 15100 < expected[0] < 15110 and 16990 < expected[-1] < 17000


def test_chip_gap_removed_grid_equals_the_payne_grid(shared_data):
    stored = np.load(shared_data / "the_payne" / "apogee_wavelength.npz")["wavelength"]
    spectra = io.read_apstar(shared_data / KDWARF)
    wavelength, flux, ivar = preprocess.remove_chip_gaps(spectra.flux, spectra.ivar, 7214)
    # The stored grid was computed upstream from its own rounded start (log10 = 4.180932);
    # it differs from 10**(4.179 + 6e-6 i) by at most 3.4e-13 relative (5e-9 Angstrom).
    np.testing.assert_allclose(wavelength, stored, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(flux[0], spectra.flux[0, 322:3242 + 0].tolist() + spectra.flux[0, 3648:6048].tolist()
                                  + spectra.flux[0, 6412:8306].tolist())
    assert flux.shape == ivar.shape == (1, 7214)
    # the 7514-pixel grid covers every pixel with data in this file's combined row
    w7514, f7514, i7514 = preprocess.remove_chip_gaps(spectra.flux, spectra.ivar, 7514)
    assert w7514.size == 7514 and np.all(np.isin(w7514, spectra.wavelength[0]))


def test_apstar_ivar_and_bitmask(shared_data):
    spectra = io.read_apstar(shared_data / KDWARF)
    with fits.open(shared_data / KDWARF) as hdul:
        flux, error, bits = hdul[1].data[0], hdul[2].data[0], hdul[3].data[0]
    bad = (bits & io.bad_bit_mask(io.DEFAULT_BAD_BITS)) != 0
    assert bad.sum() > 0, "the file has flagged pixels; the test needs some"
    assert np.all(spectra.ivar[0][bad] == 0)
    valid = ~bad & np.isfinite(flux) & (error > 0)
    np.testing.assert_array_equal(spectra.ivar[0][valid], 1.0 / error[valid] ** 2)
    assert np.all(spectra.ivar[0][~valid] == 0)
    np.testing.assert_array_equal(spectra.bitmask[0], bits)
    # configurable: no bad bits keeps every pixel with a valid error; SIG_SKYLINE alone less
    loose = io.read_apstar(shared_data / KDWARF, bad_bits=None)
    assert np.count_nonzero(loose.ivar) == np.count_nonzero(np.isfinite(flux) & (error > 0))
    sky = io.read_apstar(shared_data / KDWARF, bad_bits=["SIG_SKYLINE"])
    assert np.all(sky.ivar[0][(bits & (1 << 12)) != 0] == 0)
    assert np.count_nonzero(loose.ivar) >= np.count_nonzero(sky.ivar) >= np.count_nonzero(spectra.ivar)
    assert io.read_apstar(shared_data / KDWARF, bad_bits=1 << 12).ivar.tolist() == sky.ivar.tolist()


def test_apstar_metadata_and_rows(shared_data):
    dwarf = io.read_apstar(shared_data / KDWARF)
    assert dwarf.meta["objid"] == "2M19485057+5005279"
    assert dwarf.meta["nvisits"] == 1
    assert dwarf.meta["snr"] == pytest.approx(137.49, abs=0.01)
    assert dwarf.meta["vhelio"] == pytest.approx(13.96, abs=0.01)
    assert io.read_apstar(shared_data / KDWARF, rows="visits").meta["rows"] == (0,)

    giant = io.read_apstar(shared_data / MGIANT, rows="visits")
    assert giant.flux.shape == (3, 8575) and giant.meta["rows"] == (2, 3, 4)
    np.testing.assert_allclose(giant.meta["row_vhelio"], [15.9149, 15.6499, 15.5607], atol=1e-4)
    assert giant.meta["snr"] == pytest.approx(154, abs=1)
    assert giant.meta["rv_teff"] == pytest.approx(3677, abs=1)
    combined = io.read_apstar(shared_data / MGIANT)
    everything = io.read_apstar(shared_data / MGIANT, rows="all")
    assert everything.flux.shape == (5, 8575)
    np.testing.assert_array_equal(everything.flux[0], combined.flux[0])
    np.testing.assert_array_equal(everything.ivar[[2, 3, 4]], giant.ivar)
    with pytest.raises(ValueError, match="apStar-dr17-2M17335483.*row 7 out of range"):
        io.read_apstar(shared_data / MGIANT, rows=7)
    with pytest.raises(ValueError, match="rows must be"):
        io.read_apstar(shared_data / MGIANT, rows="best")
    with pytest.raises(ValueError, match="unknown APOGEE_PIXMASK bit"):
        io.read_apstar(shared_data / MGIANT, bad_bits=["NOT_A_BIT"])


def test_many_apstar_files_on_one_grid(shared_data, tmp_path):
    survey = io.read_apstars([shared_data / KDWARF, shared_data / MGIANT], n_pixels=7214)
    assert survey.flux.shape == (2, 7214)
    np.testing.assert_allclose(survey.wavelength[0],
                               np.load(shared_data / "the_payne" / "apogee_wavelength.npz")["wavelength"],
                               rtol=1e-12)
    giant = io.read_apstar(shared_data / MGIANT)
    np.testing.assert_array_equal(survey.ivar[1], giant.ivar[0, io._grid.apogee_pixel_index(7214)])
    assert survey.meta["objid"].tolist() == ["2M19485057+5005279", "2M17335483-2753043"]
    np.testing.assert_allclose(survey.meta["vhelio"], [13.96, 15.68], atol=0.01)
    other = tmp_path / "other.fits"
    hdu = fits.ImageHDU(np.ones((1, 100)))
    hdu.header.update(CRVAL1=4.2, CDELT1=6e-6, CRPIX1=1, CTYPE1="LOG-LINEAR")
    fits.HDUList([fits.PrimaryHDU(), hdu, fits.ImageHDU(np.ones((1, 100)))]).writeto(other)
    with pytest.raises(ValueError, match="other.fits: not on the APOGEE apStar wavelength grid"):
        io.read_apstars([shared_data / KDWARF, other])


@pytest.mark.parametrize("name", VISITS)
def test_apvisit_chips(shared_data, name):
    visit = io.read_apvisit(shared_data / name)
    with fits.open(shared_data / name) as hdul:
        wave, bits, error = hdul[4].data, hdul[3].data, hdul[2].data
    assert visit.flux.shape == (3, 4096) and visit.meta["chips"] == ("blue", "green", "red")
    assert np.all(np.diff(visit.wavelength, axis=1) > 0)
    assert np.all(visit.wavelength[:-1, -1] < visit.wavelength[1:, 0])    # chips in order
    np.testing.assert_array_equal(visit.wavelength, wave[::-1, ::-1])     # file: red first, decreasing
    np.testing.assert_array_equal(visit.bitmask, bits[::-1, ::-1])
    bad = (visit.bitmask & io.bad_bit_mask(io.DEFAULT_BAD_BITS)) != 0
    assert bad.any() and np.all(visit.ivar[bad] == 0)
    good = ~bad & (visit.ivar > 0)
    np.testing.assert_allclose(visit.ivar[good], 1.0 / error[::-1, ::-1][good].astype(float) ** 2, rtol=1e-15)
    raw = io.read_apvisit(shared_data / name, ascending=False)
    np.testing.assert_array_equal(raw.wavelength, wave)


def test_apvisit_onto_the_apogee_grid(shared_data):
    visit = io.read_apvisit(shared_data / VISITS[0])
    wavelength = visit.wavelength.ravel()        # the three chips, increasing, with two gaps
    grid, flux, ivar = preprocess.to_apogee_grid(wavelength, visit.flux.ravel(), visit.ivar.ravel(), 7214)
    assert flux.shape == (7214,)
    assert 0.8 < np.count_nonzero(ivar) / 7214 < 1.0
    # the flux level is kept: medians on the overlapping pixels agree to a percent
    blue = (grid > 15200) & (grid < 15750) & (ivar > 0)
    inside = (visit.wavelength[0] > 15200) & (visit.wavelength[0] < 15750) & (visit.ivar[0] > 0)
    assert np.median(flux[blue]) == pytest.approx(np.median(visit.flux[0][inside]), rel=0.01)
    # to the rest frame with the header's observed-frame velocity, in one resampling: the
    # same as resampling the wavelengths divided by the Doppler factor
    vrad = visit.meta["vrad"]
    _, rest, rest_ivar = preprocess.to_apogee_grid(wavelength, visit.flux.ravel(), visit.ivar.ravel(),
                                                   7214, rv=vrad)
    direct, _ = preprocess.resample(wavelength / preprocess.doppler_factor(vrad), visit.flux.ravel(),
                                    visit.ivar.ravel(), grid)
    np.testing.assert_array_equal(rest, direct)
    assert not np.array_equal(rest_ivar > 0, ivar > 0)      # a 44 km/s shift moves the edges


# --- bad files -------------------------------------------------------------------------

def test_unreadable_and_incomplete_files(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        io.read_apstar(tmp_path / "nope.fits")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not a FITS file" * 100)
    with pytest.raises(OSError, match="junk.fits"):
        io.read_apstar(junk)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes((shared_data / KDWARF).read_bytes()[:300000])
    with pytest.raises(OSError, match="truncated.fits: .*truncated"):
        io.read_apstar(truncated)
    short = tmp_path / "short.fits"
    hdu = fits.ImageHDU(np.ones((2, 50)))
    hdu.header.update(CRVAL1=4.179, CDELT1=6e-6, CRPIX1=1, CTYPE1="LOG-LINEAR")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(short)
    with pytest.raises(ValueError, match="short.fits: missing HDU 2"):
        io.read_apstar(short)
    with pytest.raises(ValueError, match="short.fits: missing HDU 2"):
        io.read_apvisit(short)
    mismatch = tmp_path / "mismatch.fits"
    fits.HDUList([fits.PrimaryHDU(), hdu, fits.ImageHDU(np.ones((2, 40)))]).writeto(mismatch)
    with pytest.raises(ValueError, match="mismatch.fits: HDU 2 .error. has shape"):
        io.read_apstar(mismatch)


# --- generic 1-D FITS ------------------------------------------------------------------

def _write_1d(path, flux, header, error=None):
    hdus = [fits.PrimaryHDU(flux)]
    hdus[0].header.update(header)
    if error is not None:
        hdus.append(fits.ImageHDU(error))
    fits.HDUList(hdus).writeto(path)


def test_generic_fits_linear_and_log(tmp_path):
    flux = np.linspace(1.0, 2.0, 100)
    _write_1d(tmp_path / "lin.fits", flux, {"CRVAL1": 5000.0, "CDELT1": 0.5, "CRPIX1": 1.0,
                                           "CTYPE1": "WAVE", "OBJECT": "star"}, error=np.full(100, 0.1))
    one = io.read_fits_spectrum(tmp_path / "lin.fits", error_hdu=1)
    np.testing.assert_allclose(one.wavelength[0], 5000.0 + 0.5 * np.arange(100), rtol=0, atol=1e-9)
    np.testing.assert_allclose(one.ivar[0], 100.0, rtol=1e-12)
    assert one.meta["object"] == "star"
    # log-linear through DC-FLAG, reference pixel 11, wavelength unit nm
    _write_1d(tmp_path / "log.fits", flux, {"CRVAL1": np.log10(500.0), "CDELT1": 1e-5, "CRPIX1": 11.0,
                                           "DC-FLAG": 1, "CUNIT1": "nm"})
    log = io.read_fits_spectrum(tmp_path / "log.fits")
    expected = 10.0 * 10.0 ** (np.log10(500.0) + 1e-5 * (np.arange(100) - 10))
    np.testing.assert_allclose(log.wavelength[0], expected, rtol=1e-13)
    assert np.all(log.ivar == 1.0)
    _write_1d(tmp_path / "bad_unit.fits", flux, {"CRVAL1": 5000.0, "CDELT1": 1.0, "CUNIT1": "kg"})
    with pytest.raises(ValueError, match="bad_unit.fits: CUNIT1 'kg' is not a wavelength unit"):
        io.read_fits_spectrum(tmp_path / "bad_unit.fits")
    with pytest.raises(ValueError, match="error_hdu or ivar_hdu, not both"):
        io.read_fits_spectrum(tmp_path / "lin.fits", error_hdu=1, ivar_hdu=1)
    with pytest.raises(ValueError, match="lin.fits: missing HDU 5"):
        io.read_fits_spectrum(tmp_path / "lin.fits", error_hdu=5)
    ivar_file = io.read_fits_spectrum(tmp_path / "lin.fits", ivar_hdu=1)
    np.testing.assert_allclose(ivar_file.ivar[0], 0.1)
    _write_1d(tmp_path / "nowcs.fits", flux, {})
    with pytest.raises(ValueError, match="nowcs.fits: header has no CRVAL1"):
        io.read_fits_spectrum(tmp_path / "nowcs.fits")


def test_many_fits_spectra_on_a_common_grid(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for k, start in enumerate((5000.0, 5003.0, 4998.5)):
        path = tmp_path / f"s{k}.fits"
        _write_1d(path, 1.0 + 0.01 * rng.standard_normal(400),
                  {"CRVAL1": start, "CDELT1": 0.25, "CRPIX1": 1.0}, error=np.full(400, 0.01))
        paths.append(path)
    grid = np.linspace(5010.0, 5090.0, 200)
    spectra = io.read_fits_spectra(paths, grid, error_hdu=1)
    assert spectra.flux.shape == (3, 200) and np.all(spectra.ivar > 0)
    np.testing.assert_allclose(np.mean(spectra.flux, axis=1), 1.0, atol=0.005)
    far = tmp_path / "far.fits"
    _write_1d(far, np.ones(50), {"CRVAL1": 8000.0, "CDELT1": 1.0, "CRPIX1": 1.0})
    with pytest.raises(ValueError, match="far.fits: wavelength range .* does not overlap"):
        io.read_fits_spectra(paths[:1] + [far], grid)


# --- label catalogues ------------------------------------------------------------------

def test_labels_from_the_real_catalogues(shared_data):
    cat = io.read_labels(shared_data / "the_cannon" / "thecannon_apogee_dr12_labels.csv",
                         ["teff", "logg", "fe_h"])
    assert cat.columns == ("TEFF", "LOGG", "FE_H") and cat.labels.shape == (9618, 3)
    ided = io.read_labels(shared_data / "the_cannon" / "thecannon_apogee_dr12_labels.csv", ["teff"],
                          id_column="APOGEE_ID")
    assert ided.ids[0] == "2M00003119+1516179" and ided.labels[0, 0] == pytest.approx(4907.467)
    assert 3687 <= cat.labels[:, 0].min() < 3688 and cat.labels[:, 0].max() < 6076
    assert not cat.missing.any()
    dr10 = io.read_labels(shared_data / "the_cannon" / "thecannon_example_DR10_reference_labels.csv",
                          ["Teff", "logg", "m_h"], column_map={"Teff": "Teff_{corr}"})
    assert dr10.columns == ("Teff_{corr}", "logg", "[M/H]") and dr10.labels.shape == (548, 3)
    # [Fe/H] never falls back to [M/H]: a different quantity
    with pytest.raises(ValueError, match="no column for label 'fe_h'.*column_map"):
        io.read_labels(shared_data / "the_cannon" / "thecannon_example_DR10_reference_labels.csv",
                       ["fe_h"])


@pytest.mark.parametrize("ext", ["fits", "ecsv", "csv"])
def test_missing_labels_are_explicit(tmp_path, ext):
    table = Table({"TEFF": np.ma.array([5000.0, 4800.0, 5100.0, 4500.0], mask=[0, 1, 0, 0]),
                   "LOGG": [4.5, 2.5, -9999.99, 2.0], "Fe_H": [0.0, -0.5, 0.1, np.nan]})
    path = tmp_path / f"cat.{ext}"
    table.write(path)
    with pytest.raises(ValueError, match=r"cat\.%s: missing values in 'TEFF' \(1 rows, first row 1\)" % ext):
        io.read_labels(path, ["teff", "logg", "fe_h"])
    kept = io.read_labels(path, ["teff", "logg", "fe_h"], missing="keep")
    np.testing.assert_array_equal(kept.missing, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert np.all(np.isnan(kept.labels[kept.missing]))
    dropped = io.read_labels(path, ["teff", "logg", "fe_h"], missing="drop")
    np.testing.assert_array_equal(dropped.labels, [[5000.0, 4.5, 0.0]])
    assert len(dropped.table) == 1


def test_label_catalogue_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        io.read_labels(tmp_path / "absent.csv", ["teff"])
    (tmp_path / "bad.fits").write_bytes(b"\x00" * 100)
    with pytest.raises(OSError, match="bad.fits: not a readable table"):
        io.read_labels(tmp_path / "bad.fits", ["teff"])
    Table({"name": ["a", "b"], "teff": [1.0, 2.0]}).write(tmp_path / "t.ecsv")
    with pytest.raises(TypeError, match="column 'name'"):
        io.read_labels(tmp_path / "t.ecsv", ["name"])
    with pytest.raises(ValueError, match="missing must be"):
        io.read_labels(tmp_path / "t.ecsv", ["teff"], missing="ignore")
    Table({"TEFF": [1.0, 2.0], "FELEM": np.ones((2, 3))}).write(tmp_path / "vec.fits")
    with pytest.raises(TypeError, match="column 'FELEM' .* not one value per row"):
        io.read_labels(tmp_path / "vec.fits", ["FELEM"])
    # a FITS catalogue with two tables: choose one explicitly
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(Table({"TEFF": [1.0]})),
                  fits.table_to_hdu(Table({"TEFF": [5.0, 6.0]}))]).writeto(tmp_path / "two.fits")
    assert io.read_labels(tmp_path / "two.fits", ["teff"], hdu=2).labels[:, 0].tolist() == [5.0, 6.0]


def test_result_units():
    assert [io._unit_for(n) for n in ("TEFF", "E_LOGG", "MG_FE", "M_H", "ALPHA_M", "[Fe/H]", "VMICRO",
                                      "vsini", "rv", "chi2", "status", "n_pixels_used")] == [
        "K", "dex", "dex", "dex", "dex", "dex", "km/s", "km/s", "km/s", None, None, None]


# --- results ---------------------------------------------------------------------------

def _result(n=4):
    rng = np.random.default_rng(0)
    cov = np.stack([np.diag([100.0, 0.01, 0.0025])] * n)
    return FitResult(("TEFF", "LOGG", "FE_H"), rng.normal(size=(n, 3)) + [5000, 3, 0], cov,
                     rng.uniform(100, 200, n), np.full(n, 7000), np.full(n, 5, dtype=np.int32),
                     np.zeros(n, dtype=np.int8))


@pytest.mark.parametrize("ext", ["fits", "ecsv"])
def test_results_round_trip_with_units(tmp_path, ext):
    result = _result()
    path = tmp_path / f"results.{ext}"
    io.write_results(result, path, ids=["a", "b", "c", "d"], rv=[1.0, 2.0, 3.0, 4.0])
    table = io.read_results(path)
    np.testing.assert_array_equal(table["TEFF"], result.labels[:, 0])
    np.testing.assert_array_equal(table["E_LOGG"], result.errors[:, 1])
    np.testing.assert_array_equal(table["status"], result.status)
    assert list(table["id"]) == ["a", "b", "c", "d"]
    assert table["TEFF"].unit == u.K and table["E_TEFF"].unit == u.K
    assert table["rv"].unit == u.km / u.s
    assert table["FE_H"].unit == u.dex and table["LOGG"].unit == u.dex
    assert table["chi2"].unit is None
    assert sorted(os.listdir(tmp_path)) == [f"results.{ext}"]     # no temporary left behind
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.write_results(result, path)
    io.write_results(result, path, overwrite=True)


def test_failed_write_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "results.fits"
    io.write_results(_result(), path)
    before = path.read_bytes()
    bad = _result().to_table()
    bad["junk"] = np.array([object(), object(), object(), object()], dtype=object)   # not FITS-able
    with pytest.raises(Exception):
        io.write_results(bad, path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["results.fits"]
    with pytest.raises(ValueError, match="results.txt: cannot tell the table format"):
        io.write_results(_result(), tmp_path / "results.txt")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        io.write_results(_result(), tmp_path / "no_such_dir" / "r.fits")
    with pytest.raises(FileNotFoundError, match="missing.ecsv"):
        io.read_results(tmp_path / "missing.ecsv")


def test_one_dimensional_aspcapstar_layout(tmp_path):
    """aspcapStar-style files: one row in HDU 1 (7514 pixels), error in HDU 2, no bitmask."""
    n = 7514
    flux = fits.ImageHDU(np.linspace(0.9, 1.1, n))
    flux.header.update(CRVAL1=4.179 + 246 * 6e-6, CDELT1=6e-6, CRPIX1=1, CTYPE1="LOG-LINEAR")
    error = np.full(n, 0.01)
    error[10] = 0.0
    path = tmp_path / "aspcapStar-test.fits"
    fits.HDUList([fits.PrimaryHDU(), flux, fits.ImageHDU(error), fits.ImageHDU(np.ones(n))]).writeto(path)
    spectra = io.read_apstar(path)
    assert spectra.flux.shape == (1, n) and np.all(spectra.bitmask == 0)
    # the header solution starting at apStar pixel 246 is the first 7514-grid wavelength
    assert spectra.wavelength[0, 0] == pytest.approx(preprocess.apogee_wavelength(7514)[0], rel=1e-13)
    assert spectra.ivar[0, 10] == 0 and spectra.ivar[0, 11] == pytest.approx(1e4)
