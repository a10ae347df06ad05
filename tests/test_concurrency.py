"""Threads and Ctrl-C.

- The same model used from several Python threads at once (the bindings release the GIL)
  gives exactly the serial results: kernels keep nothing between calls but per-thread scratch
  buffers, and their results do not depend on the thread count.
- A KeyboardInterrupt (SIGINT) during a long compiled call is honoured within a second: the
  kernels poll Python's signal handlers through starlabel::Interrupt (common.hpp) and stop.
"""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from starlabel import CannonModel, PayneModel, fast
from starlabel.datasets import synthetic_survey

N_WORKERS = 4


def run_concurrently(calls):
    """Run the zero-argument callables together (released by one barrier), return results."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@pytest.fixture(scope="module")
def cannon(survey):
    return CannonModel(survey.label_names, order=2).train(survey.labels, survey.flux, survey.ivar)


def test_cannon_from_many_threads_matches_serial(cannon, survey):
    test = synthetic_survey(40, n_pixels=survey.flux.shape[1], snr=60.0, seed=5)
    serial_fit = cannon.fit_labels(test.flux, test.ivar)
    serial_predict = cannon.predict(test.labels)
    threads = [1, 2, None, 1]
    fits = run_concurrently([lambda n=n: cannon.fit_labels(test.flux, test.ivar, n_threads=n)
                             for n in threads])
    predictions = run_concurrently([lambda n=n: cannon.predict(test.labels, n_threads=n)
                                    for n in threads])
    for fit, prediction in zip(fits, predictions):
        np.testing.assert_array_equal(fit.labels, serial_fit.labels)
        np.testing.assert_array_equal(fit.covariance, serial_fit.covariance)
        np.testing.assert_array_equal(fit.status, serial_fit.status)
        np.testing.assert_array_equal(prediction, serial_predict)


def test_cannon_training_from_many_threads_matches_serial(survey):
    exponents = CannonModel(survey.label_names, order=2).vectorizer.exponents
    x = (survey.labels - survey.labels.mean(0)) / survey.labels.std(0)
    for regularization in (0.0, 10.0):
        serial = fast.cannon_train(exponents, x, survey.flux, survey.ivar,
                                   regularization=regularization)
        results = run_concurrently([
            lambda n=n: fast.cannon_train(exponents, x, survey.flux, survey.ivar,
                                          regularization=regularization, n_threads=n)
            for n in [1, 2, 1, 2]])
        for result in results:
            for a, b in zip(result, serial):
                np.testing.assert_array_equal(a, b)


def test_payne_from_many_threads_matches_serial(survey):
    payne = PayneModel(survey.label_names, hidden=(16, 16), dtype="float64")
    payne.train(survey.labels, survey.flux, epochs=3, seed=0)
    labels = survey.labels[:50]
    serial = payne.predict(labels)
    serial_jac = fast.mlp_forward(payne.weights, payne.biases, np.zeros((7, 3)), jacobian=True)
    outs = run_concurrently([lambda: payne.predict(labels)] * N_WORKERS)
    jacs = run_concurrently([lambda: fast.mlp_forward(payne.weights, payne.biases,
                                                      np.zeros((7, 3)), jacobian=True)] * N_WORKERS)
    for out, jac in zip(outs, jacs):
        np.testing.assert_array_equal(out, serial)
        for a, b in zip(jac, serial_jac):
            np.testing.assert_array_equal(a, b)


def test_payne_training_from_many_threads_matches_serial(survey):
    """Separate networks trained at the same time in separate threads: no shared state."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.5, 0.5, (200, 3))
    target = np.sin(x @ rng.normal(size=(3, 30)))
    w0 = [rng.normal(0, 0.3, (20, 3)), rng.normal(0, 0.3, (30, 20))]
    b0 = [np.zeros(20), np.zeros(30)]
    order = rng.permutation(200)

    def train():
        w, b = [a.copy() for a in w0], [a.copy() for a in b0]
        state = fast.new_optimizer_state(w, b)
        losses = [fast.mlp_train_epoch(w, b, state, x, target, order, batch_size=32,
                                       learning_rate=1e-3) for _ in range(3)]
        return w, b, np.concatenate(losses)

    serial = train()
    for result in run_concurrently([train] * N_WORKERS):
        for a, b in zip(result[0] + result[1] + [result[2]], serial[0] + serial[1] + [serial[2]]):
            np.testing.assert_array_equal(a, b)


def test_the_gil_is_released_during_training(survey):
    """A Python thread keeps running while a compiled call works."""
    exponents = CannonModel(survey.label_names, order=2).vectorizer.exponents
    x = (survey.labels - survey.labels.mean(0)) / survey.labels.std(0)
    flux = np.tile(survey.flux, (1, 10))
    ivar = np.tile(survey.ivar, (1, 10))
    ticks, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    thread = threading.Thread(target=ticker)
    thread.start()
    start = time.perf_counter()
    fast.cannon_train(exponents, x, flux, ivar, regularization=10.0, n_threads=1)
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    during = [t for t in ticks if start < t < start + elapsed]
    # with the GIL held the ticker could not run at all during the call
    assert elapsed < 0.05 or len(during) >= 5, (elapsed, len(during))


# -- Ctrl-C ---------------------------------------------------------------------------------------

INTERRUPT_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from starlabel import fast
    from starlabel.vectorizer import PolynomialVectorizer

    kind = sys.argv[1]
    rng = np.random.default_rng(0)
    if kind == "cannon_train":
        # L1 training of a quadratic 6-label model: ~1 s per call here, so repeated (a single
        # call could end before the signal comes)
        exponents = PolynomialVectorizer([f"L{i}" for i in range(6)], 2).exponents
        x = rng.uniform(-1, 1, (400, 6))
        flux = 1 + 0.1 * np.sin(x @ rng.normal(size=(6, 20000))) + rng.normal(0, 0.01, (400, 20000))
        ivar = np.full(flux.shape, 1e4)
        run = lambda: [fast.cannon_train(exponents, x, flux, ivar, regularization=1e3)
                       for _ in range(200)]
    elif kind == "mlp_train_epoch":
        w = [rng.normal(0, 0.1, (300, 25)), rng.normal(0, 0.1, (300, 300)), rng.normal(0, 0.1, (2000, 300))]
        b = [np.zeros(300), np.zeros(300), np.zeros(2000)]
        x = rng.uniform(-0.5, 0.5, (5000, 25))
        target = rng.normal(size=(5000, 2000))
        state = fast.new_optimizer_state(w, b)
        run = lambda: [fast.mlp_train_epoch(w, b, state, x, target, np.arange(5000), batch_size=512)
                       for _ in range(100)]
    elif kind == "spectrum_fit":
        # LM fits of 25 labels with an MLP emulator, 20000 spectra: minutes of work
        w = [rng.normal(0, 0.2, (300, 25)), rng.normal(0, 0.06, (300, 300)), rng.normal(0, 0.003, (2000, 300))]
        b = [np.zeros(300), np.zeros(300), np.ones(2000)]
        emulator = {"kind": "mlp", "weights": w, "biases": b, "activation": "leaky_relu", "slope": 0.01}
        wave = 15000 * np.exp(1e-5 * np.arange(2000))
        layout = {"model_wavelength": wave, "wavelength": wave, "n_segments": 0, "n_coef": 0,
                  "segment_index": np.full(2000, -1, dtype=np.int32),
                  "segment_coord": np.zeros(2000), "fit_rv": False}
        flux = fast.spectrum_model(emulator, layout, rng.uniform(-0.4, 0.4, (20000, 25)))
        flux += rng.normal(0, 0.01, flux.shape)
        run = lambda: fast.spectrum_fit(emulator, layout, flux, np.full(flux.shape, 1e4),
                                        np.zeros(25))
    else:
        w = [rng.normal(0, 0.1, (300, 25)), rng.normal(0, 0.1, (300, 300)), rng.normal(0, 0.1, (2000, 300))]
        b = [np.zeros(300), np.zeros(300), np.zeros(2000)]
        x = rng.uniform(-0.5, 0.5, (10000, 25))
        run = lambda: [fast.mlp_forward(w, b, x) for _ in range(1000)]
    print("ready", flush=True)
    start = time.monotonic()
    try:
        run()
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic():.6f} {time.monotonic() - start:.3f}", flush=True)
        sys.exit(3)
    print("finished", flush=True)
""")


@pytest.mark.parametrize("kind", ["cannon_train", "mlp_train_epoch", "mlp_forward", "spectrum_fit"])
def test_ctrl_c_stops_a_long_compiled_call_within_a_second(kind, tmp_path):
    script = tmp_path / "long_call.py"
    script.write_text(INTERRUPT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), kind], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(1.0)          # well inside the compiled call
        sent = time.monotonic()  # CLOCK_MONOTONIC: the same clock in both processes
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, (proc.returncode, out, err)
    _, caught, ran = out.split()
    delay = float(caught) - sent
    print(f"\n{kind}: KeyboardInterrupt {delay * 1000:.0f} ms after SIGINT (call ran {ran} s)")
    assert delay < 1.0
