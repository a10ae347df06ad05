"""Peak memory: Cannon training (17 labels), Payne training (a few steps), and fitting many
spectra streamed in chunks, each job in a fresh process (``memory_probe.py``).

The probe builds the job's inputs, resets the kernel's peak-RSS counter, runs the job and
reports VmHWM: the job's own peak above what was resident before it (its inputs included in
``peak_mb``, not in the increase). Streaming fits n spectra generated and fitted chunk by
chunk at two n (survey: 2e4 and 1e5, chunks of 2000 x 8575 pixels): the peak must not grow
with n. The benchmark time is the whole subprocess (imports and data generation included);
the job's own seconds are in extra_info.

    python -m pytest benchmarks/test_memory.py --size survey --benchmark-json mem.json
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "memory_probe.py"
MEMORY_SIZES = {
    "small": dict(cannon_train=["--labels", "17", "--stars", "300", "--pixels", "96"],
                  payne_train=["--stars", "256", "--pixels", "500", "--hidden", "64", "64",
                               "--epochs", "2"],
                  stream=["--chunk", "500", "--pixels", "96", "--train-stars", "300"],
                  stream_n=(2000, 10000)),
    "survey": dict(cannon_train=["--labels", "17", "--stars", "1600", "--pixels", "8575"],
                   payne_train=["--stars", "2048", "--pixels", "7214", "--epochs", "2"],
                   stream=["--chunk", "2000", "--pixels", "8575", "--train-stars", "1600"],
                   stream_n=(20000, 100000)),
}
# Bounds (regression guards; measured on the survey size: Cannon 1.1x its input, Payne 3.3x):
CANNON_TRAIN_FACTOR = 2.0      # training's peak increase <= 2 x (flux + ivar) + 128 MB
PAYNE_TRAIN_FACTOR = 5.0       # Payne: <= 5 x flux (float64) + 128 MB (float32 copies, split)
SLACK_MB = 128.0
STREAM_GROWTH_MB = 32.0        # peak(large n) - peak(small n) <= 32 MB + 5% of peak(small n)
STREAM_GROWTH_FRACTION = 0.05
STREAM_CONVERGED = 0.98        # fraction CONVERGED over the whole stream
STREAM_RMS_DRIFT = 1.5         # last chunk's label RMS vs truth within 1.5x of the first's


@pytest.fixture(scope="module")
def memory_size(request):
    if not sys.platform.startswith("linux"):
        pytest.skip("the memory probe reads /proc/self/status (Linux only)")
    return MEMORY_SIZES[request.config.getoption("--size")]


def probe(benchmark, job, args):
    """Run memory_probe.py in a fresh interpreter (this one) once, as the benchmark."""
    cmd = [sys.executable, str(PROBE), job] + [str(a) for a in args]

    def run():
        return subprocess.run(cmd, capture_output=True, text=True)

    proc = benchmark.pedantic(run, rounds=1, iterations=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def record(benchmark, problem, result, **metrics):
    benchmark.extra_info.update(area="memory", problem=problem, backend="fast", n_threads=2,
                                load_1min=os.getloadavg()[0], metrics=dict(result, **metrics))


def test_memory_cannon_train(benchmark, memory_size):
    r = probe(benchmark, "cannon_train", memory_size["cannon_train"])
    a = r["args"]
    record(benchmark, f"Cannon training, {a['labels']} labels, {a['stars']} stars x "
           f"{a['pixels']} px", r)
    assert r["pixels_ok"] == r["n_pixels"]
    bound = CANNON_TRAIN_FACTOR * r["input_mb"] + SLACK_MB
    assert r["job_peak_over_before_mb"] <= bound, (r["job_peak_over_before_mb"], bound)


def test_memory_payne_train(benchmark, memory_size):
    r = probe(benchmark, "payne_train", memory_size["payne_train"])
    a = r["args"]
    record(benchmark, f"Payne training, {a['epochs']} epochs (batch 512), {a['stars']} stars x "
           f"{a['pixels']} px, hidden {tuple(a['hidden'])}", r)
    assert r["all_finite"], r["losses"]
    bound = PAYNE_TRAIN_FACTOR * r["input_mb"] + SLACK_MB
    assert r["job_peak_over_before_mb"] <= bound, (r["job_peak_over_before_mb"], bound)


@pytest.fixture(scope="module")
def stream_results():
    return {}


@pytest.mark.parametrize("which", [0, 1], ids=["n_small", "n_large"])
def test_memory_cannon_stream(benchmark, memory_size, stream_results, which):
    """fit_labels (3 labels) over n spectra in chunks; the large n must not raise the peak."""
    n = memory_size["stream_n"][which]
    r = probe(benchmark, "cannon_stream", ["--n", n] + memory_size["stream"])
    a = r["args"]
    stream_results[which] = r
    growth = None
    if which == 1 and 0 in stream_results:
        growth = r["peak_mb"] - stream_results[0]["peak_mb"]
    record(benchmark, f"Cannon fit_labels streamed, 3 labels, {n} spectra in chunks of "
           f"{a['chunk']} x {a['pixels']} px", r, peak_growth_from_small_n_mb=growth)
    assert r["all_finite"]
    assert r["converged_fraction"] >= STREAM_CONVERGED
    for first, last in zip(r["rms_first_chunk"], r["rms_last_chunk"]):
        assert last <= STREAM_RMS_DRIFT * first and first <= STREAM_RMS_DRIFT * last
    if growth is not None:
        small = stream_results[0]["peak_mb"]
        assert growth <= STREAM_GROWTH_MB + STREAM_GROWTH_FRACTION * small, (growth, small)
