"""starlabel.distributed on a real two-process Dask cluster, and concatenate_results.

Every distributed answer is compared, bit for bit, with the local call on all the data:
the tasks run the local functions on pieces, and both the fit (per spectrum) and the
training (per pixel, in blocks aligned to the core's own) do the same arithmetic on a
piece as on the whole.
"""

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("distributed", reason="starlabel.distributed needs the 'dask' extra "
                                          "(dask[distributed])")
import dask  # noqa: E402
import dask.array as da  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

import starlabel  # noqa: E402
from starlabel import distributed as sd  # noqa: E402
from starlabel._concat import concatenate_results  # noqa: E402
from starlabel.datasets import synthetic_survey  # noqa: E402

N_PIXELS = 600        # not a multiple of the core's 256-pixel training block, on purpose
N_TRAIN, N_TEST = 120, 144  # 4.5 LM batches (sd.FIT_BATCH = 32)
FIT_FIELDS = ("labels", "covariance", "chi2", "reduced_chi2", "n_pixels_used", "n_iter",
              "status", "errors")
SPECTRUM_FIELDS = FIT_FIELDS + ("rv", "rv_error", "continuum", "rv_grid", "rv_chi2",
                                "rv_initial", "model_flux")
RV_RANGE = (-60.0, 60.0)  # a short RV grid keeps the fits quick


def whole_batches():
    """The chunks of N_TEST spectra when a smaller chunk size is asked for: rounded up to whole
    LM batches, so that every spectrum shares its batch as in a local fit."""
    return (sd.FIT_BATCH,) * (N_TEST // sd.FIT_BATCH) + (N_TEST % sd.FIT_BATCH,)


def assert_same_result(expected, actual):
    """Every array of two fit results identical (NaN where NaN), and the same type."""
    assert type(actual) is type(expected)
    assert actual.label_names == expected.label_names
    fields = SPECTRUM_FIELDS if isinstance(expected, starlabel.SpectrumFitResult) else FIT_FIELDS
    for field in fields:
        want, got = getattr(expected, field), getattr(actual, field)
        if want is None:
            assert got is None, field
        else:
            np.testing.assert_array_equal(got, want, err_msg=field, strict=True)
    if isinstance(expected, starlabel.SpectrumFitResult):
        assert actual.param_names == expected.param_names


def rows_of(result, rows):
    """The spectra ``rows`` (a slice) of a SpectrumFitResult, as a result of their own."""
    def cut(value):
        return None if value is None else value[rows]
    return starlabel.SpectrumFitResult(
        result.label_names, result.param_names, result.labels[rows], result.rv[rows],
        result.continuum[rows], result.covariance[rows], result.chi2[rows],
        result.n_pixels_used[rows], result.n_iter[rows], result.status[rows], result.rv_grid,
        cut(result.rv_chi2), result.rv_initial[rows], cut(result.model_flux),
        result.rv_grid is not None)


# --- data and models (small: the whole file runs in well under a minute) ------------------------

@pytest.fixture(scope="module")
def survey():
    train = synthetic_survey(N_TRAIN, n_pixels=N_PIXELS, seed=0, bad_pixel_fraction=0.02)
    test = synthetic_survey(N_TEST, n_pixels=N_PIXELS, seed=1, bad_pixel_fraction=0.02)
    return train, test


@pytest.fixture(scope="module")
def cannon(survey):
    train, _ = survey
    model = starlabel.CannonModel(train.label_names, order=2, wavelength=train.wavelength)
    return model.train(train.labels, train.flux, train.ivar)


@pytest.fixture(scope="module")
def payne(survey):
    train, _ = survey
    model = starlabel.PayneModel(train.label_names, hidden=(16, 16), wavelength=train.wavelength)
    flux = np.where(train.ivar > 0, train.flux, 1.0)
    return model.train(train.labels, flux, epochs=3, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def client():
    # Two worker processes of one thread each, as a small real cluster; no dashboard, so
    # no port clash with other runs on the machine.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


# --- concatenate_results ---------------------------------------------------------------------

def test_concatenate_fit_labels_pieces(survey, cannon):
    _, test = survey
    whole = cannon.fit_labels(test.flux, test.ivar)
    pieces = [cannon.fit_labels(test.flux[s], test.ivar[s])
              for s in (slice(0, 5), slice(5, 6), slice(6, N_TEST))]
    assert_same_result(whole, concatenate_results(pieces))
    assert_same_result(whole, concatenate_results(iter([whole])))


def test_concatenate_spectrum_fit_pieces(survey, cannon):
    _, test = survey
    whole = starlabel.fit_spectra(cannon, test.flux[:12], test.ivar[:12], continuum_order=1,
                                  rv_range=RV_RANGE, return_model=True)
    pieces = [rows_of(whole, s) for s in (slice(0, 4), slice(4, 4), slice(4, 11), slice(11, 12))]
    assert_same_result(whole, concatenate_results(pieces))


def test_concatenate_rejects_incompatible_results(survey, cannon):
    _, test = survey
    flux, ivar = test.flux[:3], test.ivar[:3]
    plain = cannon.fit_labels(flux, ivar)
    spectrum = starlabel.fit_spectra(cannon, flux, ivar, rv_range=RV_RANGE)
    with pytest.raises(ValueError, match="empty"):
        concatenate_results([])
    with pytest.raises(TypeError, match="results\\[1\\]"):
        concatenate_results([plain, "labels"])
    with pytest.raises(ValueError, match="mixes result types"):
        concatenate_results([plain, spectrum])
    renamed = starlabel.FitResult(["A", "B", "C"], plain.labels, plain.covariance, plain.chi2,
                                  plain.n_pixels_used, plain.n_iter, plain.status)
    with pytest.raises(ValueError, match="labels"):
        concatenate_results([plain, renamed])
    continuum = starlabel.fit_spectra(cannon, flux, ivar, rv_range=RV_RANGE, continuum_order=1)
    with pytest.raises(ValueError, match="parameters"):
        concatenate_results([spectrum, continuum])
    wider = starlabel.fit_spectra(cannon, flux, ivar, rv_range=(-70.0, 70.0))
    with pytest.raises(ValueError, match="RV grid"):
        concatenate_results([spectrum, wider])
    modelled = starlabel.fit_spectra(cannon, flux, ivar, rv_range=RV_RANGE, return_model=True)
    with pytest.raises(ValueError, match="return_model"):
        concatenate_results([spectrum, modelled])


# --- distributed fit_spectra -----------------------------------------------------------------

def test_fit_spectra_cannon_numpy_and_dask_equal_local(client, survey, cannon):
    _, test = survey
    mask = np.zeros(test.flux.shape, dtype=bool)
    mask[::5, 100:140] = True  # a per-spectrum mask, cut into the chunks with the spectra
    options = dict(continuum_order=1, rv_range=RV_RANGE, mask=mask)
    local = starlabel.fit_spectra(cannon, test.flux, test.ivar, **options)

    lazy = sd.fit_spectra(cannon, test.flux, test.ivar, chunk_size=8, **options)
    assert lazy.chunks == whole_batches() and len(lazy) == N_TEST
    assert_same_result(local, lazy.compute())

    batch = sd.FIT_BATCH
    flux = da.from_array(test.flux, chunks=(2 * batch, -1))
    ivar = da.from_array(test.ivar, chunks=(2 * batch, -1))
    options["mask"] = da.from_array(mask, chunks=(10, -1))  # rechunked like flux
    from_dask = sd.fit_spectra(cannon, flux, ivar, **options)
    assert from_dask.chunks == (2 * batch, 2 * batch, N_TEST - 4 * batch)
    unaligned = sd.fit_spectra(cannon, flux.rechunk((10, -1)), ivar.rechunk((10, -1)), **options)
    assert unaligned.chunks == whole_batches()
    assert_same_result(local, from_dask.persist().compute())


def test_fit_spectra_payne_equals_local(client, survey, payne):
    _, test = survey
    rng = np.random.default_rng(3)
    centre = 0.5 * (payne.x_min + payne.x_max)
    # per-spectrum starts, cut into the chunks with the spectra
    initial = centre + 0.1 * (payne.x_max - payne.x_min) * rng.normal(size=(N_TEST, 2, 3))
    options = dict(rv_range=RV_RANGE, continuum_order=1, initial=initial, return_model=True,
                   max_iter=20)
    local = starlabel.fit_spectra(payne, test.flux, test.ivar, test.wavelength, **options)
    lazy = sd.fit_spectra(payne, test.flux, test.ivar, test.wavelength, chunk_size=16, **options)
    assert_same_result(local, lazy.compute())


def test_model_is_shipped_once(client, survey, cannon):
    """One key holds the model; every chunk's task depends on it; the cluster runs it once
    (the other worker fetches it from there)."""
    _, test = survey
    lazy = sd.fit_spectra(cannon, test.flux, test.ivar, chunk_size=4, rv_range=RV_RANGE)
    graph = dict(dask.delayed(lazy.to_delayed()).__dask_graph__())
    holding_model = [key for key, node in graph.items() if getattr(node, "value", None) is cannon]
    assert holding_model == [lazy.model_key]
    chunk_tasks = [key for key in graph if str(key).startswith("_fit_chunk")]
    assert len(chunk_tasks) == len(lazy.chunks) == len(whole_batches())
    assert all(lazy.model_key in graph[key].dependencies for key in chunk_tasks)

    start = time.time()  # the scheduler's story of the key also holds earlier tests' runs
    lazy.compute()
    story = client.run_on_scheduler(
        lambda dask_scheduler, key=lazy.model_key: dask_scheduler.story(key))
    runs = [s for s in story if s[0] == lazy.model_key and s[1:3] == ("processing", "memory")
            and s[-1] >= start]
    assert len(runs) == 1

    def transitions(dask_worker, key=lazy.model_key):
        return [s[1:3] for s in dask_worker.state.story(key)
                if len(s) > 3 and s[0] == key and s[-1] >= start]
    per_worker = list(client.run(transitions).values())
    assert sum(t.count(("executing", "memory")) for t in per_worker) == 1
    assert all(t.count(("flight", "memory")) <= 1 for t in per_worker)  # fetched once at most


def test_worker_killed_mid_run(client, survey, cannon):
    """SIGKILL one worker while chunks run: its lost work is redone elsewhere (the nanny
    restarts it) and every spectrum comes back exactly once, as the local fit gives it."""
    _, test = survey
    options = dict(continuum_order=1, rv_range=RV_RANGE)
    local = starlabel.fit_spectra(cannon, test.flux, test.ivar, **options)
    lazy = sd.fit_spectra(cannon, test.flux, test.ivar, chunk_size=16, **options)
    futures = client.compute(lazy.to_delayed())
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        busy = {w: keys for w, keys in client.processing().items()
                if any(str(k).startswith("_fit_chunk") for k in keys)}
        victim = next(iter(busy), None)
        time.sleep(0.01)
    assert victim is not None, "no chunk was seen running"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    assert not all(f.done() for f in futures), "the run ended before the kill"
    results = client.gather(futures)
    assert [len(r) for r in results] == list(lazy.chunks)
    assert_same_result(local, concatenate_results(results))
    client.wait_for_workers(2, timeout=60)  # the nanny's replacement, for the tests after
    assert victim not in client.scheduler_info()["workers"]  # the replacement is a new worker


def test_to_dask_dataframe(client, survey, cannon):
    pytest.importorskip("dask.dataframe", reason="to_dask_dataframe needs dask[dataframe]")
    _, test = survey
    lazy = sd.fit_spectra(cannon, test.flux, test.ivar, chunk_size=10, rv_range=RV_RANGE)
    frame = lazy.to_dask_dataframe()
    assert frame.npartitions == len(whole_batches()) and frame.known_divisions
    table = frame.compute()
    local = starlabel.fit_spectra(cannon, test.flux, test.ivar, rv_range=RV_RANGE)
    np.testing.assert_array_equal(table.index.to_numpy(), np.arange(N_TEST))
    for a, name in enumerate(local.label_names):
        np.testing.assert_array_equal(table[name].to_numpy(), local.labels[:, a])
        np.testing.assert_array_equal(table[f"E_{name}"].to_numpy(), local.errors[:, a])
    for field in ("chi2", "reduced_chi2", "n_pixels_used", "n_iter", "status", "rv"):
        np.testing.assert_array_equal(table[field].to_numpy(), getattr(local, field),
                                      strict=True)
    np.testing.assert_array_equal(table["E_rv"].to_numpy(), local.rv_error)


def test_bad_values_raise_the_local_error_on_compute(client, survey, cannon):
    _, test = survey
    flux = test.flux.copy()
    flux[30, 7] = np.nan
    ivar = test.ivar.copy()
    ivar[30, 7] = 1.0
    lazy = sd.fit_spectra(cannon, flux, ivar, chunk_size=10)
    with pytest.raises(ValueError, match="flux is NaN or inf where ivar > 0"):
        lazy.compute()


def test_fit_spectra_rejects_bad_arguments(survey, cannon):
    _, test = survey
    flux, ivar = test.flux, test.ivar
    for size, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="chunk_size"):
            sd.fit_spectra(cannon, flux, ivar, chunk_size=size)
    with pytest.raises(ValueError, match="flux and ivar must have the same shape"):
        sd.fit_spectra(cannon, flux, ivar[:-1])
    with pytest.raises(ValueError, match="flux has 599 pixels"):
        sd.fit_spectra(cannon, flux[:, 1:], ivar[:, 1:])
    with pytest.raises(ValueError, match="flux is chunked along pixels"):
        sd.fit_spectra(cannon, da.from_array(flux, chunks=(10, 300)), ivar)
    with pytest.raises(ValueError, match="flux and ivar must be chunked alike"):
        sd.fit_spectra(cannon, da.from_array(flux, chunks=(10, -1)),
                       da.from_array(ivar, chunks=(12, -1)))
    with pytest.raises(ValueError, match="mask must have shape"):
        sd.fit_spectra(cannon, flux, ivar, mask=np.zeros((N_TEST, 10), bool))
    with pytest.raises(ValueError, match="initial has starts for 5 spectra"):
        sd.fit_spectra(cannon, flux, ivar, initial=np.zeros((5, 1, 3)))
    with pytest.raises(ValueError, match="n_threads"):
        sd.fit_spectra(cannon, flux, ivar, n_threads=0)
    with pytest.raises(ValueError, match="backend"):
        sd.fit_spectra(cannon, flux, ivar, backend="gpu")
    with pytest.raises(TypeError, match="fit_rvs"):
        sd.fit_spectra(cannon, flux, ivar, fit_rvs=False)
    with pytest.raises(RuntimeError, match="not trained"):
        sd.fit_spectra(starlabel.CannonModel(["A", "B"]), flux, ivar, test.wavelength)
    with pytest.raises(TypeError, match="model must be"):
        sd.fit_spectra(object(), flux, ivar)


# --- distributed Cannon training -------------------------------------------------------------

def model_file(model, path):
    model.write(path)
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


@pytest.mark.parametrize("pixels_per_task, regularization", [(256, 0.0), (100, 10.0)])
def test_train_cannon_equals_local(client, survey, tmp_path, pixels_per_task, regularization):
    """Blocks of 256 (3 tasks) and 100 pixels (rounded up to 256), plain and L1 training,
    with censors and from Dask input chunked along stars: the written files are identical."""
    train, _ = survey
    censors = {"FE_H": np.arange(N_PIXELS) % 3 != 0}

    def new_model():
        return starlabel.CannonModel(train.label_names, order=2, regularization=regularization,
                                     censors=censors, wavelength=train.wavelength)

    local = new_model().train(train.labels, train.flux, train.ivar)
    spread = sd.train_cannon(new_model(), train.labels, train.flux, train.ivar,
                             pixels_per_task=pixels_per_task)
    flux = da.from_array(train.flux, chunks=(50, -1))
    ivar = da.from_array(train.ivar, chunks=(50, -1))
    from_dask = sd.train_cannon(new_model(), train.labels, flux, ivar,
                                pixels_per_task=pixels_per_task)
    expected = model_file(local, tmp_path / "local.npz")
    for name, model in (("numpy", spread), ("dask", from_dask)):
        arrays = model_file(model, tmp_path / f"{name}.npz")
        assert arrays.keys() == expected.keys()
        for key, want in expected.items():
            np.testing.assert_array_equal(arrays[key], want, err_msg=f"{name}: {key}",
                                          strict=True)
        assert model.training_range[0].tobytes() == local.training_range[0].tobytes()


def test_train_cannon_rejects_bad_arguments(survey):
    train, _ = survey
    model = starlabel.CannonModel(train.label_names, order=2)
    with pytest.raises(ValueError, match="pixels_per_task"):
        sd.train_cannon(model, train.labels, train.flux, train.ivar, pixels_per_task=0)
    with pytest.raises(ValueError, match="labels has 119 stars but flux has 120"):
        sd.train_cannon(model, train.labels[1:], train.flux, train.ivar)
    with pytest.raises(ValueError, match="flux and ivar must have the same shape"):
        sd.train_cannon(model, train.labels, train.flux, train.ivar[:, 1:])
    with pytest.raises(ValueError, match="fewer than the 10 terms"):
        sd.train_cannon(model, train.labels[:5], train.flux[:5], train.ivar[:5])
    with pytest.raises(TypeError, match="CannonModel"):
        sd.train_cannon(starlabel.PayneModel(train.label_names), train.labels, train.flux,
                        train.ivar)
    assert not model.is_trained
