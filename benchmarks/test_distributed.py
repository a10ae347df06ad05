"""Dask overhead: fit_spectra on a LocalCluster of 2 single-threaded worker processes against
one process with 2 threads, on the same spectra (the issue's goal: within 15%). Both give
the same result, bit for bit (chunks are whole LM batches of 32 spectra), which is asserted.

``--size small``: a 25 -> 32 -> 32 -> 600 network, 64 spectra (a smoke test of the machinery);
``--size survey``: 25 -> 300 -> 300 -> 7214 on the APOGEE-like grid, 256 spectra.

    python -m pytest benchmarks/test_distributed.py --size survey --benchmark-json dask.json
"""

import numpy as np
import pytest

import starlabel

distributed = pytest.importorskip("distributed", reason="needs the dask extra (dask.distributed)")
pytest.importorskip("starlabel.distributed", reason="needs the dask extra")

SIZES = {"small": dict(hidden=(32, 32), n_pixels=600, n_spectra=64),
         "survey": dict(hidden=(300, 300), n_pixels=7214, n_spectra=256)}
N_LABELS = 25
CHUNK = 32  # spectra per Dask task: a multiple of the LM batch (32), so results are identical


@pytest.fixture(scope="module")
def problem(request, random_payne):
    settings = SIZES[request.config.getoption("--size")]
    problem = dict(settings, **random_payne(settings["hidden"], settings["n_pixels"],
                                            settings["n_spectra"]))
    problem["options"] = dict(continuum_order=2, segments=problem["segments"],
                              rv_range=(-400, 400), initial=np.full(N_LABELS, 0.5))
    return problem


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def local_result(problem):
    return starlabel.fit_spectra(problem["model"], problem["flux"], problem["ivar"],
                                 problem["wave"], n_threads=2, **problem["options"])


@pytest.fixture(scope="module")
def spectra_on_workers(problem, client):
    """flux and ivar as Dask arrays already held by the workers, as when a survey is read with
    Dask: the timed run measures the fits and Dask's scheduling, not shipping the data."""
    import warnings

    import dask.array as da
    with warnings.catch_warnings():
        # the spectra travel inside the graph once, here (tens of MB at survey size)
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        flux = da.from_array(problem["flux"], chunks=(CHUNK, -1)).persist()
        ivar = da.from_array(problem["ivar"], chunks=(CHUNK, -1)).persist()
    return flux, ivar


@pytest.mark.parametrize("mode", ["local", "dask"])
def test_fit_local_vs_dask(timed, benchmark, problem, spectra_on_workers, local_result, mode):
    import starlabel.distributed as sd
    flux, ivar = spectra_on_workers

    def run():
        if mode == "local":
            return starlabel.fit_spectra(problem["model"], problem["flux"], problem["ivar"],
                                         problem["wave"], n_threads=2, **problem["options"])
        return sd.fit_spectra(problem["model"], flux, ivar, problem["wave"],
                              n_threads=1, **problem["options"]).compute()

    result, t = timed(run, rounds=1)
    n = problem["n_spectra"]
    benchmark.extra_info.update(area="dask", backend=mode, n_spectra=n,
                                n_pixels=problem["n_pixels"], hidden=list(problem["hidden"]),
                                workers="2 processes x 1 thread" if mode == "dask" else "1 process x 2 threads")
    if t is not None:
        print(f"\n{mode}: {n / t:.1f} spectra/s")
    for field in ("labels", "rv", "continuum", "covariance", "chi2", "n_iter", "status"):
        np.testing.assert_array_equal(getattr(result, field), getattr(local_result, field))
