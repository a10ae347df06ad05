"""Payne benchmarks: MLP forward (GFLOP/s against NumPy's float32 matmul on the same shapes),
one training step, and forward + Jacobian per star; fast against the NumPy reference.

Every benchmark also checks its result against the reference backend (tolerances below).
``--size small`` (default): a 25 -> 64 -> 64 -> 500 network; ``--size survey``: The Payne's
25 -> 300 -> 300 -> 7214 at the issue's batch sizes.

    python -m pytest benchmarks/test_payne.py --size survey --benchmark-columns=median
"""

import numpy as np
import pytest
from starlabel import fast, reference

PAYNE_SIZES = {
    "small": dict(n_labels=25, hidden=(64, 64), n_pixels=500, batches=(1, 64, 256),
                  train_batch=128, jac_stars=64),
    "survey": dict(n_labels=25, hidden=(300, 300), n_pixels=7214,
                   batches=(1, 16, 256, 1024, 4096), train_batch=512, jac_stars=256),
}
# float32 fast vs reference: same operations, different summation order; relative to the
# output's scale: ~sqrt(300) ulp through three layers -> 1e-5 leaves margin (see test_mlp_parity)
RTOL32 = 1e-5
REF_ROWS = 64  # rows of a batch the reference is checked on (the reference is timed separately)


@pytest.fixture(scope="module")
def net(request):
    settings = PAYNE_SIZES[request.config.getoption("--size")]
    rng = np.random.default_rng(0)
    sizes = (settings["n_labels"],) + settings["hidden"] + (settings["n_pixels"],)
    weights = [(rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)
               for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.normal(0, 0.1, o).astype(np.float32) for o in sizes[1:]]
    flop_per_star = 2 * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return dict(settings, weights=weights, biases=biases, sizes=sizes, flop_per_star=flop_per_star)


def labels(n, n_labels, seed=1):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, n_labels)).astype(np.float32)


def assert_matches(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL32 * np.abs(b).max())


def gflops(flop, t):
    return None if t is None else flop / t / 1e9


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("batch", [0, 1, 2, 3, 4], ids=lambda i: f"b{i}")
def test_forward_fast(timed, benchmark, net, batch, n_threads):
    if batch >= len(net["batches"]):
        pytest.skip("batch size not in this --size")
    n = net["batches"][batch]
    x = labels(n, net["n_labels"])
    out, t = timed(lambda: fast.mlp_forward(net["weights"], net["biases"], x, n_threads=n_threads))
    rows = slice(0, min(n, REF_ROWS))
    assert_matches(out[rows], reference.mlp_forward(net["weights"], net["biases"], x[rows]))
    benchmark.extra_info.update(area="payne_forward", backend="fast", n_threads=n_threads,
                                batch=n, gflops=gflops(net["flop_per_star"] * n, t))


@pytest.mark.parametrize("batch", [0, 1, 2, 3, 4], ids=lambda i: f"b{i}")
def test_forward_numpy_matmul(timed, benchmark, net, batch, numpy_matmuls):
    """NumPy's own float32 matmuls on the same shapes (no bias, no activation): the yardstick."""
    if batch >= len(net["batches"]):
        pytest.skip("batch size not in this --size")
    n = net["batches"][batch]
    x = labels(n, net["n_labels"])
    _, t = timed(numpy_matmuls(net["weights"], x))
    benchmark.extra_info.update(area="payne_forward", backend="numpy_matmul", batch=n,
                                gflops=gflops(net["flop_per_star"] * n, t))


@pytest.mark.parametrize("batch", [0, 1, 2, 3, 4], ids=lambda i: f"b{i}")
def test_forward_reference(timed, benchmark, net, batch):
    if batch >= len(net["batches"]):
        pytest.skip("batch size not in this --size")
    n = net["batches"][batch]
    x = labels(n, net["n_labels"])
    out, t = timed(lambda: reference.mlp_forward(net["weights"], net["biases"], x), rounds=3)
    assert out.shape == (n, net["n_pixels"])
    benchmark.extra_info.update(area="payne_forward", backend="reference", batch=n,
                                gflops=gflops(net["flop_per_star"] * n, t))


def one_step(backend, net, x, y, n_threads=None):
    weights = [w.copy() for w in net["weights"]]
    biases = [b.copy() for b in net["biases"]]
    state = backend.new_optimizer_state(weights, biases)
    order = np.arange(len(x))

    def run():
        return backend.mlp_train_epoch(weights, biases, state, x, y, order, batch_size=len(x),
                                       learning_rate=1e-4, optimizer="radam", loss="l1",
                                       n_threads=n_threads)
    return run, weights


@pytest.mark.parametrize("backend_name,n_threads", [("fast", 1), ("fast", 2), ("reference", None)])
def test_train_step(timed, benchmark, net, backend_name, n_threads):
    """One RAdam step (forward, L1 loss, backward, update) at the issue's batch size."""
    n = net["train_batch"]
    x = labels(n, net["n_labels"], seed=2)
    y = np.random.default_rng(3).normal(size=(n, net["n_pixels"])).astype(np.float32)
    backend = fast if backend_name == "fast" else reference
    run, _ = one_step(backend, net, x, y, n_threads)
    _, t = timed(run, rounds=5)
    # correctness: a fresh single step against the reference's
    run_f, w_f = one_step(fast, net, x, y, n_threads)
    run_r, w_r = one_step(reference, net, x, y)
    loss_f, loss_r = run_f(), run_r()
    np.testing.assert_allclose(loss_f, loss_r, rtol=RTOL32)
    for a, b in zip(w_f, w_r):
        # an RAdam first step moves each weight by lr * sign-like m_hat: compare at lr scale
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    benchmark.extra_info.update(area="payne_train_step", backend=backend_name,
                                n_threads=n_threads, batch=n,
                                gflops=gflops(3 * net["flop_per_star"] * n, t))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_forward_jacobian_fast(timed, benchmark, net, n_threads):
    """Forward + Jacobian for many stars at once; time per star in extra_info."""
    n = net["jac_stars"]
    x = labels(n, net["n_labels"], seed=4)
    (flux, jac), t = timed(lambda: fast.mlp_forward(net["weights"], net["biases"], x,
                                                    jacobian=True, n_threads=n_threads))
    f_r, j_r = reference.mlp_forward(net["weights"], net["biases"], x[:4], jacobian=True)
    assert_matches(flux[:4], f_r)
    assert_matches(jac[:4], j_r)
    benchmark.extra_info.update(area="payne_jacobian", backend="fast", n_threads=n_threads,
                                stars=n, ms_per_star=None if t is None else 1e3 * t / n)


def test_forward_jacobian_reference(timed, benchmark, net):
    n = min(net["jac_stars"], 16)
    x = labels(n, net["n_labels"], seed=4)
    _, t = timed(lambda: reference.mlp_forward(net["weights"], net["biases"], x, jacobian=True),
                 rounds=3)
    benchmark.extra_info.update(area="payne_jacobian", backend="reference", stars=n,
                                ms_per_star=None if t is None else 1e3 * t / n)
