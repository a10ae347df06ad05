"""The command line (`starlabel ...` / `python -m starlabel ...`) and the shard helpers.

Commands run in-process through ``main([...])`` (fast) and a few through a subprocess to see
the real exit codes. The survey is tiny (200 training stars x 300 pixels) to keep the file
well under a minute.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from astropy.table import Table

import starlabel
from starlabel import fitting, shards
from starlabel.__main__ import main
from starlabel.datasets import synthetic_survey
from starlabel.io import read_results, results_table

N_TRAIN, N_TEST, N_PIXELS = 200, 40, 300
LABELS = "TEFF,LOGG,FE_H"


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A training survey (.npz with labels + an ECSV catalogue), test spectra (.npz) and a
    Cannon trained on them through the command line."""
    folder = tmp_path_factory.mktemp("cli")
    train = synthetic_survey(N_TRAIN, n_pixels=N_PIXELS, seed=3)
    test = synthetic_survey(N_TEST, n_pixels=N_PIXELS, seed=4)
    np.savez(folder / "train.npz", flux=train.flux, ivar=train.ivar, wavelength=train.wavelength,
             labels=train.labels, label_names=np.array(train.label_names))
    np.savez(folder / "test.npz", flux=test.flux, ivar=test.ivar, wavelength=test.wavelength)
    catalogue = Table({name: train.labels[:, k] for k, name in enumerate(train.label_names)})
    catalogue.write(folder / "labels.ecsv")
    model = folder / "cannon.npz"
    assert main(["train-cannon", str(folder / "train.npz"), "--labels", str(folder / "labels.ecsv"),
                 "--label-names", LABELS, "-o", str(model), "-q"]) == 0
    return {"folder": folder, "train": train, "test": test, "model": model,
            "test_npz": folder / "test.npz", "train_npz": folder / "train.npz",
            "labels": folder / "labels.ecsv"}


def assert_tables_equal(a, b):
    assert a.colnames == b.colnames
    assert len(a) == len(b)
    for name in a.colnames:
        x, y = (np.char.decode(c) if c.dtype.kind == "S" else c  # FITS gives text as bytes
                for c in (np.asarray(a[name]), np.asarray(b[name])))
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


# --- train and fit round trip --------------------------------------------------------------

def test_train_cannon_writes_the_model_python_would_train(files):
    model = starlabel.CannonModel.read(files["model"])
    train = files["train"]
    direct = starlabel.CannonModel(train.label_names).train(train.labels, train.flux, train.ivar)
    assert model.label_names == direct.label_names
    np.testing.assert_array_equal(model.theta, direct.theta)
    np.testing.assert_array_equal(model.s2, direct.s2)
    np.testing.assert_array_equal(model.wavelength, train.wavelength)


def test_train_cannon_chooses_the_regularization(files, tmp_path, capsys):
    out = tmp_path / "chosen.npz"
    code, stdout, _ = run(capsys, "train-cannon", files["train_npz"], "-o", out,
                          "--choose-regularization", "0,100,1e4", "--regularization", "5")
    assert code == 0
    train = files["train"]
    scan = starlabel.CannonModel(train.label_names).choose_regularization(
        train.labels, train.flux, train.ivar, [0.0, 100.0, 1e4])
    model = starlabel.CannonModel.read(out)
    assert model.regularization == scan.best
    direct = starlabel.CannonModel(train.label_names, regularization=scan.best).train(
        train.labels, train.flux, train.ivar)
    np.testing.assert_array_equal(model.theta, direct.theta)
    for strength, cost in zip(scan.strengths, scan.cost):
        assert f"regularization {strength:<10g} held-out cost {cost:.8g}" in stdout
    with np.load(out) as data:
        record = json.loads(str(data["training_record"]))
    assert record["regularization_scan"]["strengths"] == [0.0, 100.0, 1e4]
    code, _, err = run(capsys, "train-cannon", files["train_npz"], "-o", out, "--overwrite",
                       "--choose-regularization", "0,-1")
    assert code == 2 and "--choose-regularization" in err


def test_fit_writes_the_table_fit_spectra_gives(files, tmp_path, capsys):
    out = tmp_path / "labels.fits"
    # A small chunk size: the CLI fits in pieces (for its progress bar); the numbers must not
    # depend on it.
    code, stdout, _ = run(capsys, "fit", files["model"], files["test_npz"], "-o", out,
                          "--chunk-size", "7", "--continuum-order", "1",
                          "--rv-range", "-200", "200")
    assert code == 0 and f"{N_TEST} spectra" in stdout
    written = read_results(out)
    test = files["test"]
    result = starlabel.fit_spectra(starlabel.CannonModel.read(files["model"]), test.flux,
                                   test.ivar, test.wavelength, fit_rv=True, rv_range=(-200, 200),
                                   continuum_order=1)
    expected = results_table(result, ids=[f"test.npz[{i}]" for i in range(N_TEST)])
    assert_tables_equal(written, expected)
    assert written["TEFF"].unit == "K" and written["rv"].unit == "km / s"
    assert written.meta[shards.KEY_TOTAL] == N_TEST


def test_fit_broadening_options(tmp_path, capsys):
    """--sigma KMS, --vsini fit and --every-start reach fit_spectra: the table has the fitted
    v sin i."""
    wave = 10 ** (np.log10(15200.0) + 2e-5 * np.arange(N_PIXELS))  # broadening: log-uniform
    train = synthetic_survey(N_TRAIN, wavelength=wave, seed=3)
    test = synthetic_survey(10, wavelength=wave, seed=4)
    model = starlabel.CannonModel(train.label_names).train(train.labels, train.flux, train.ivar)
    model.write(tmp_path / "model.npz")
    np.savez(tmp_path / "test.npz", flux=test.flux, ivar=test.ivar, wavelength=wave)
    out = tmp_path / "broad.ecsv"
    assert run(capsys, "fit", tmp_path / "model.npz", tmp_path / "test.npz", "-o", out,
               "--sigma", "8", "--vsini", "fit", "--rv-range", "-200", "200", "-q")[0] == 0
    written = read_results(out)
    result = starlabel.fit_spectra(model, test.flux, test.ivar, wave, rv_range=(-200, 200),
                                   broadening={"sigma": 8.0, "vsini": "fit"})
    np.testing.assert_array_equal(np.asarray(written["vsini"]), result.vsini)
    assert "sigma" not in written.colnames and written["vsini"].unit == "km / s"
    assert run(capsys, "fit", tmp_path / "model.npz", tmp_path / "test.npz", "-o", out,
               "--sigma", "8", "--vsini", "fit", "--rv-range", "-200", "200", "--every-start",
               "--overwrite", "-q")[0] == 0
    every = starlabel.fit_spectra(model, test.flux, test.ivar, wave, rv_range=(-200, 200),
                                  broadening={"sigma": 8.0, "vsini": "fit"}, every_start=True)
    written = read_results(out)
    np.testing.assert_array_equal(np.asarray(written["vsini"]), every.vsini)
    for k, name in enumerate(test.label_names):
        np.testing.assert_array_equal(np.asarray(written[name]), every.labels[:, k])
    # unbroadened spectra fitted with sigma fixed at 8 km/s: minima the starts disagree on,
    # so every start's fit differs from the default's (the flag reached fit_spectra)
    assert np.all(every.chi2 <= result.chi2 * (1 + 1e-9))
    assert np.any(every.chi2 < result.chi2 - 1)
    code, _, err = run(capsys, "fit", tmp_path / "model.npz", tmp_path / "test.npz", "-o", out,
                       "--vsini", "-3")
    assert code == 2 and "--vsini" in err


def test_labels_may_come_from_the_npz_and_match_by_id(files, tmp_path, capsys):
    train = files["train"]
    ids = np.array([f"star{i:03d}" for i in range(N_TRAIN)])
    shuffled = np.random.default_rng(0).permutation(N_TRAIN)
    np.savez(tmp_path / "train_ids.npz", flux=train.flux, ivar=train.ivar,
             wavelength=train.wavelength, ids=ids)
    catalogue = Table({"APOGEE_ID": ids[shuffled], "Teff": train.labels[shuffled, 0],
                       "logg": train.labels[shuffled, 1], "fe_h": train.labels[shuffled, 2]})
    catalogue.write(tmp_path / "cat.fits")
    by_id = tmp_path / "by_id.npz"
    from_npz = tmp_path / "from_npz.npz"
    assert run(capsys, "train-cannon", tmp_path / "train_ids.npz", "--labels",
               tmp_path / "cat.fits", "--label-names", LABELS, "--id-column", "APOGEE_ID",
               "-o", by_id)[0] == 0
    assert run(capsys, "train-cannon", files["train_npz"], "-o", from_npz)[0] == 0
    reference = starlabel.CannonModel.read(files["model"])
    for path in (by_id, from_npz):
        np.testing.assert_array_equal(starlabel.CannonModel.read(path).theta, reference.theta)


def test_fit_reads_fits_spectra_onto_the_model_grid(files, tmp_path, capsys):
    from astropy.io import fits

    test = files["test"]
    wave = files["train"].wavelength
    chip = (wave > 15150) & (wave < 15800)   # the first chip is on one log-linear grid
    step = np.log10(wave[chip][1] / wave[chip][0])
    paths = []
    for i in range(3):
        hdu = fits.PrimaryHDU(test.flux[i, chip])
        hdu.header.update(CRVAL1=np.log10(wave[chip][0]), CDELT1=step, CRPIX1=1.0,
                          CTYPE1="LOG-WAVE", OBJECT=f"star-{i}")
        paths.append(tmp_path / f"spec{i}.fits")
        hdu.writeto(paths[-1])
    code, _, err = run(capsys, "fit", files["model"], *paths, "-o", tmp_path / "out.ecsv",
                       "--no-rv", "-q")
    assert code == 0, err
    table = read_results(tmp_path / "out.ecsv")
    assert list(table["id"]) == ["star-0", "star-1", "star-2"]
    assert np.all(np.abs(table["TEFF"] - test.labels[:3, 0]) < 500)


# --- shards -------------------------------------------------------------------------------

def test_shards_then_merge_equal_the_unsharded_fit(files, tmp_path, capsys):
    whole = tmp_path / "whole.fits"
    out = tmp_path / "labels.fits"
    common = ["--no-rv", "-q"]
    assert run(capsys, "fit", files["model"], files["test_npz"], "-o", whole, *common)[0] == 0
    for index in (1, 0):   # any order
        assert run(capsys, "fit", files["model"], files["test_npz"], "-o", out, "--shard",
                   f"{index}/2", *common)[0] == 0
    pieces = [shards.shard_path(out, i, 2) for i in range(2)]
    assert [os.path.basename(p) for p in pieces] == ["labels.shard0-of-2.fits",
                                                     "labels.shard1-of-2.fits"]
    assert run(capsys, "merge", out, *reversed(pieces))[0] == 0
    assert_tables_equal(read_results(out), read_results(whole))

    # --merge: the last shard to finish writes OUT
    auto = tmp_path / "auto.fits"
    for index in range(3):
        assert not auto.exists()
        assert run(capsys, "fit", files["model"], files["test_npz"], "-o", auto, "--shard",
                   f"{index}/3", "--merge", *common)[0] == 0
    assert_tables_equal(read_results(auto), read_results(whole))

    # more shards than spectra: the empty shards still write (column-only) files
    test = files["test"]
    two = tmp_path / "two.npz"
    np.savez(two, flux=test.flux[:2], ivar=test.ivar[:2], wavelength=test.wavelength)
    assert run(capsys, "fit", files["model"], two, "-o", tmp_path / "two.fits", *common)[0] == 0
    for index in range(3):
        assert run(capsys, "fit", files["model"], two, "-o", tmp_path / "few.fits", "--shard",
                   f"{index}/3", "--merge", *common)[0] == 0
    assert len(read_results(shards.shard_path(tmp_path / "few.fits", 0, 3))) == 0
    assert_tables_equal(read_results(tmp_path / "few.fits"), read_results(tmp_path / "two.fits"))


def test_resume_skips_a_finished_shard(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "labels.fits"
    argv = ["fit", files["model"], files["test_npz"], "-o", out, "--shard", "0/2", "--no-rv"]
    assert run(capsys, *argv)[0] == 0
    shard = shards.shard_path(out, 0, 2)
    stamp = os.stat(shard).st_mtime_ns
    calls = []
    real_fit = fitting.fit_spectra
    monkeypatch.setattr(fitting, "fit_spectra",
                        lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and "already done, skipped" in stdout
    assert calls == [] and os.stat(shard).st_mtime_ns == stamp
    # the same file name from a different run (other options) is refused, not reused
    code, _, err = run(capsys, *argv[:-1], "--max-iter", "5")
    assert code == 1 and "different run" in err
    assert run(capsys, *argv[:-1], "--max-iter", "5", "--overwrite", "-q")[0] == 0
    assert calls and os.stat(shard).st_mtime_ns != stamp


def test_merge_refuses_missing_duplicated_or_mixed_shards(files, tmp_path, capsys):
    out = tmp_path / "labels.fits"
    for index in range(3):
        assert run(capsys, "fit", files["model"], files["test_npz"], "-o", out, "--shard",
                   f"{index}/3", "--no-rv", "-q")[0] == 0
    pieces = [shards.shard_path(out, i, 3) for i in range(3)]
    code, _, err = run(capsys, "merge", tmp_path / "m.fits", pieces[0], pieces[2])
    assert code == 1 and "missing shard(s) 1 of 3" in err
    code, _, err = run(capsys, "merge", tmp_path / "m.fits", *pieces, pieces[1])
    assert code == 1 and "shard 1 given twice" in err
    other = tmp_path / "other.fits"
    assert run(capsys, "fit", files["model"], files["test_npz"], "-o", other, "--shard", "1/3",
               "-q")[0] == 0   # with RV: another run
    code, _, err = run(capsys, "merge", tmp_path / "m.fits", pieces[0],
                       shards.shard_path(other, 1, 3), pieces[2])
    assert code == 1 and "different runs" in err
    assert not (tmp_path / "m.fits").exists()


def test_shard_ranges_tile_the_spectra():
    for n in (0, 1, 5, 40, 1001):
        for count in (1, 2, 3, 7, 64):
            for unit in (1, 16):
                ranges = [shards.shard_range(n, i, count, unit) for i in range(count)]
                assert ranges[0][0] == 0 and ranges[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
                assert all(start % unit == 0 or start == n for start, _ in ranges)
                sizes = [stop - start for start, stop in ranges[:-1]]
                assert not sizes or max(sizes) - min(sizes) <= unit
    assert shards.parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "-1/4", "1/0", "a/b", "1", "1/2/3"):
        with pytest.raises(ValueError):
            shards.parse_shard(bad)
    assert shards.shard_path("out/labels.fits.gz", 3, 12) == "out/labels.shard03-of-12.fits.gz"
    names = [shards.shard_path("x.ecsv", i, 120) for i in range(120)]
    assert names == sorted(names)
    with pytest.raises(ValueError, match="output must end in"):
        shards.shard_path("labels.txt", 0, 2)


def test_check_shards_orders_and_validates_tables():
    def piece(index, count, start, stop, run="r"):
        table = Table({"x": np.arange(start, stop, dtype=float)})
        table.meta.update(shards.shard_meta(index, count, start, stop, 10, run))
        return table

    tables = [piece(1, 2, 5, 10), piece(0, 2, 0, 5)]
    ordered = shards.check_shards(tables, ["b", "a"])
    assert [t.meta[shards.KEY_INDEX] for t in ordered] == [0, 1]
    with pytest.raises(shards.ShardError, match="starts at row 4"):
        shards.check_shards([piece(0, 2, 0, 5), piece(1, 2, 4, 10)], ["a", "b"])
    with pytest.raises(shards.ShardError, match="different shard counts"):
        shards.check_shards([piece(0, 2, 0, 5), piece(1, 3, 5, 10)], ["a", "b"])
    with pytest.raises(shards.ShardError, match="different runs"):
        shards.check_shards([piece(0, 2, 0, 5), piece(1, 2, 5, 10, run="s")], ["a", "b"])
    with pytest.raises(shards.ShardError, match="not a starlabel shard"):
        shards.check_shards([Table({"x": [1.0]})], ["plain.fits"])


# --- Payne models, published networks, info -------------------------------------------------

def test_payne_train_fit_and_published_network(files, tmp_path, capsys):
    model = tmp_path / "payne.npz"
    code, stdout, _ = run(capsys, "train-payne", files["train_npz"], "-o", model, "--hidden",
                          "16,16", "--epochs", "3", "--batch-size", "64")
    assert code == 0 and "3 epochs" in stdout
    code, stdout, _ = run(capsys, "info", model)
    assert code == 0
    assert "The Payne" in stdout and "3 -> 16 -> 16 -> 300" in stdout
    assert "epochs=3" in stdout and "loss history           : 3 epochs" in stdout
    out = tmp_path / "payne.fits"
    assert run(capsys, "fit", model, files["test_npz"], "-o", out, "--no-rv", "-q")[0] == 0
    test = files["test"]
    payne = starlabel.PayneModel.read(model)
    expected = results_table(starlabel.fit_spectra(payne, test.flux, test.ivar, fit_rv=False),
                             ids=[f"test.npz[{i}]" for i in range(N_TEST)])
    assert_tables_equal(read_results(out), expected)

    # The Payne's published layout records neither label names nor the wavelength grid.
    published = tmp_path / "NN_normalized_spectra.npz"
    starlabel.write_payne_npz(payne, published)
    code, _, err = run(capsys, "fit", published, files["test_npz"], "-o", tmp_path / "p.fits")
    assert code == 2 and "--model-wavelength" in err
    np.save(tmp_path / "grid.npy", test.wavelength)
    assert run(capsys, "fit", published, files["test_npz"], "-o", tmp_path / "p.fits", "--no-rv",
               "--label-names", LABELS, "--model-wavelength", tmp_path / "grid.npy", "-q")[0] == 0
    assert_tables_equal(read_results(tmp_path / "p.fits"), expected)


def test_per_pixel_network_in_starlabel_format(files, tmp_path, capsys):
    """A per-pixel network written by PerPixelPayneModel.write fits as the published file
    does, with the label names and grid it records."""
    test = files["test"]
    rng = np.random.default_rng(0)
    n_pixels = test.flux.shape[1]
    model = starlabel.PerPixelPayneModel(
        ["TEFF", "LOGG", "FE_H"], rng.normal(0, 1, (n_pixels, 4, 3)),
        rng.normal(0, 1, (n_pixels, 4)), rng.normal(0, 0.1, (n_pixels, 4)), np.ones(n_pixels),
        test.labels.min(axis=0), test.labels.max(axis=0), w2=np.full(n_pixels, -0.2),
        b2=np.ones(n_pixels), wavelength=test.wavelength)
    path = tmp_path / "perpixel.npz"
    model.write(path)
    code, stdout, _ = run(capsys, "info", path)
    assert code == 0 and "per-pixel networks" in stdout and "outer sigmoid" in stdout
    out = tmp_path / "perpixel.fits"
    assert run(capsys, "fit", path, files["test_npz"], "-o", out, "--no-rv", "-q")[0] == 0
    expected = results_table(starlabel.fit_spectra(model, test.flux, test.ivar, fit_rv=False),
                             ids=[f"test.npz[{i}]" for i in range(N_TEST)])
    assert_tables_equal(read_results(out), expected)


def test_info_summarises_a_cannon_model(files, capsys):
    code, stdout, _ = run(capsys, "info", files["model"])
    assert code == 0
    assert "instruction set loaded" in stdout and "The Cannon" in stdout
    assert "labels                 : TEFF, LOGG, FE_H" in stdout
    assert f"pixels                 : {N_PIXELS}" in stdout
    assert "10 (order 2): 1, TEFF, LOGG" in stdout and "command=train-cannon" in stdout


# --- errors ---------------------------------------------------------------------------------

def test_errors_are_one_line_with_exit_code_1(files, tmp_path, capsys):
    cases = [
        (["fit", tmp_path / "missing.npz", files["test_npz"], "-o", tmp_path / "o.fits"],
         "missing.npz: no such model file"),
        (["fit", files["model"], tmp_path / "missing.npz", "-o", tmp_path / "o.fits"],
         "missing.npz: no such file"),
        (["fit", files["model"], files["test_npz"], "-o", tmp_path / "o.txt"],
         "output must end in"),
        (["fit", files["model"], files["labels"], "-o", tmp_path / "o.fits"],
         "cannot tell the spectra format"),
        (["fit", files["labels"], files["test_npz"], "-o", tmp_path / "o.fits"],
         "not a model file"),
        (["train-cannon", files["test_npz"], "--labels", files["labels"], "--label-names",
          LABELS, "-o", tmp_path / "m.npz"], f"{N_TRAIN} rows for {N_TEST} spectra"),
        (["train-cannon", files["train_npz"], "--labels", files["labels"], "--label-names",
          "TEFF,VSINI", "-o", tmp_path / "m.npz"], "no column for label 'VSINI'"),
        (["train-cannon", files["train_npz"], "-o", files["model"]], "exists; pass --overwrite"),
        (["merge", tmp_path / "m.fits", tmp_path / "nope.fits"], "nope.fits: no such shard file"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 1, (argv, err)
        assert err.startswith("starlabel: error: ") and err.count("\n") == 1, err
        assert message in err, err
    code, _, err = run(capsys, *cases[0][0], "--debug")
    assert code == 1 and "Traceback" in err


def test_usage_errors_exit_2(files, tmp_path, capsys):
    for argv in (["no-such-command"], [], ["fit", files["model"]],
                 ["fit", files["model"], files["test_npz"], "-o", "x.fits", "--shard", "2/2"],
                 ["fit", files["model"], files["test_npz"], "-o", "x.fits", "--merge"],
                 ["train-cannon", files["test_npz"], "-o", tmp_path / "m.npz"],
                 ["train-payne", files["train_npz"], "-o", "m.npz", "--hidden", "0,3"],
                 ["demo", "--n-train", "-5"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert "usage: starlabel" in err
    assert run(capsys, "--help")[0] == 0


def test_exit_codes_through_a_subprocess(files, tmp_path):
    def starlabel_cli(*argv):
        return subprocess.run([sys.executable, "-m", "starlabel", *map(str, argv)],
                              capture_output=True, text=True)

    error = starlabel_cli("fit", tmp_path / "missing.npz", files["test_npz"], "-o",
                          tmp_path / "o.fits")
    assert error.returncode == 1
    assert error.stderr.startswith("starlabel: error:") and error.stderr.count("\n") == 1
    assert starlabel_cli("fit").returncode == 2
    # stderr is a pipe here, not a terminal: no progress bars, only the result line
    fit = starlabel_cli("fit", files["model"], files["test_npz"], "-o", tmp_path / "o.fits",
                        "--no-rv")
    assert fit.returncode == 0 and fit.stderr == "" and "wrote" in fit.stdout


# --- Dask ---------------------------------------------------------------------------------

def test_fit_on_a_dask_scheduler_equals_the_local_fit(files, tmp_path, capsys):
    pytest.importorskip("starlabel.distributed")
    distributed = pytest.importorskip("distributed")
    local, remote = tmp_path / "local.fits", tmp_path / "dask.fits"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        code, _, err = run(capsys, "fit", files["model"], files["test_npz"], "-o", remote,
                           "--no-rv", "--scheduler", cluster.scheduler_address,
                           "--chunk-size", "16", "-q")
    assert code == 0, err
    assert run(capsys, "fit", files["model"], files["test_npz"], "-o", local, "--no-rv",
               "-q")[0] == 0
    assert_tables_equal(read_results(remote), read_results(local))


# --- demo -----------------------------------------------------------------------------------

def test_demo_runs_small_and_writes_the_figures(tmp_path, capsys):
    figures = tmp_path / "figures"
    code, stdout, _ = run(capsys, "demo", "--n-train", 150, "--n-test", 12, "--n-pixels", 200,
                          "--payne-epochs", 5, "--plot", figures)
    assert code == 0
    assert "Label accuracy on 12 held-out spectra" in stdout
    for text in ("Cannon  TEFF", "Payne   FE_H", "converged: Cannon 12/12", "speed-up",
                 "Payne   train", "Cannon  fit"):
        assert text in stdout
    names = sorted(os.listdir(figures))
    assert names == ["cannon_coefficients.png", "one_to_one_cannon.png", "one_to_one_payne.png",
                     "payne_loss.png", "spectrum_fit.png"]
    for name in names:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_reads_real_apstar_files(files, shared_data, tmp_path, capsys):
    paths = sorted((shared_data / "apogee_dr17").glob("apStar-*.fits"))
    out = tmp_path / "apogee.ecsv"
    # Real apStar flux is not normalised: a continuum per chip takes care of it.
    code, _, err = run(capsys, "fit", files["model"], *paths, "-o", out, "--no-rv",
                       "--continuum-order", "2", "--apogee-chips", "-q")
    assert code == 0, err
    table = read_results(out)
    assert list(table["id"]) == [p.name.removeprefix("apStar-dr17-").removesuffix(".fits")
                                 for p in paths]
    assert np.all(table["n_pixels_used"] > 6000)


def test_progress_bars_only_on_a_terminal_and_not_with_quiet():
    import io

    from starlabel.cli import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, quiet, shown in ((Terminal(), False, True), (Terminal(), True, False),
                                 (io.StringIO(), False, False)):
        reporter = Reporter(quiet=quiet, stream=stream)
        with reporter.bar(3, "fitting", "spectrum") as bar:
            bar.update(3)
        with reporter.step("training"):
            pass
        assert reporter.bars == shown
        assert ("fitting" in stream.getvalue() and "training" in stream.getvalue()) == shown
