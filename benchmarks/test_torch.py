"""starlabel's Payne network against PyTorch on the CPU (optional: skipped without ``torch``).

The network of test_payne.py (survey: 25 -> 300 -> 300 -> 7214, leaky ReLU 0.01, float32;
small: 25 -> 64 -> 64 -> 500), the same weights in both:
- forward pass at batch 256 and 1024 (small: 64 and 256), 1 and 2 threads each side
  (``torch.set_num_threads`` / ``n_threads``), and NumPy's float32 matmuls of the same shapes
  on as many BLAS threads as the machine limit, all in the same test;
- one training step at batch 512 (small: 128): forward, L1 loss (mean), backward, RAdam
  (lr 1e-4), from the same start; torch.optim.RAdam and starlabel use PyTorch's formulas.
The two sides are timed one after the other in the same test (median of ``REPEATS`` calls each,
see ``blocks``), so the ratio sees the same machine load; the pytest-benchmark entry times
PyTorch.

Run with a Python that has torch and starlabel (a venv made with --system-site-packages,
``benchmarks/peers/setup.sh``):

    /tmp/venv-torch/bin/python -m pytest benchmarks/test_torch.py --size survey

On a loaded machine set ``OMP_WAIT_POLICY=PASSIVE`` (read by both OpenMP runtimes, torch's
bundled libgomp and starlabel's, when they load): with the default active wait, torch's 2-thread
forward at batch 256 took 72 ms instead of 0.3 ms at load 12 on 2 cores, its own threads
spinning against descheduled ones. The value is recorded in each entry's extra_info.
"""

import os
import time

import numpy as np
import pytest
from starlabel import fast

torch = pytest.importorskip("torch", reason="PyTorch not installed (optional: "
                            "benchmarks/peers/setup.sh makes a venv with torch==2.13.0)")

# The network of test_payne.py (PAYNE_SIZES there; pytest's importlib mode keeps test modules
# apart, so the recipe is repeated: the same seed gives the same weights).
TORCH_SIZES = {
    "small": dict(n_labels=25, hidden=(64, 64), n_pixels=500, batches=(64, 256), train_batch=128),
    "survey": dict(n_labels=25, hidden=(300, 300), n_pixels=7214, batches=(256, 1024),
                   train_batch=512),
}
SLOPE = 0.01
LEARNING_RATE = 1e-4
REPEATS = {"small": 5, "survey": 7}
RTOL32 = 1e-5        # forward: |torch - ours| <= RTOL32 x max |ours| (float32, ~sqrt(300) ulp
#                      through three layers, different summation orders)
STEP_ATOL = 1e-6     # weights after one RAdam step (lr 1e-4: the step is lr x gradient)


@pytest.fixture(scope="module")
def net(request):
    name = request.config.getoption("--size")
    settings = TORCH_SIZES[name]
    rng = np.random.default_rng(0)
    sizes = (settings["n_labels"],) + settings["hidden"] + (settings["n_pixels"],)
    weights = [(rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)
               for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.normal(0, 0.1, o).astype(np.float32) for o in sizes[1:]]
    flop_per_star = 2 * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return dict(settings, weights=weights, biases=biases, sizes=sizes,
                flop_per_star=flop_per_star, repeats=REPEATS[name])


def labels(n, n_labels, seed=1):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, n_labels)).astype(np.float32)


def torch_net(net):
    layers = []
    for k, (w, b) in enumerate(zip(net["weights"], net["biases"])):
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if k < len(net["weights"]) - 1:
            layers.append(torch.nn.LeakyReLU(SLOPE))
    return torch.nn.Sequential(*layers)


@pytest.fixture
def threads():
    """Set torch's intra-op threads for one test, then restore them."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def blocks(fns, repeats):
    """Median seconds of each fn: one warm-up call, then ``repeats`` timed calls, fn after fn.

    Not interleaved call by call: torch brings its own OpenMP runtime, and after a parallel
    region each runtime's idle threads spin-wait for a while; alternating single calls made
    every call of one side run against the other side's spinning threads (2 threads on this
    2-core machine: torch's forward 100-500x slower than alone).
    """
    times = []
    for fn in fns:
        fn()
        t = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
        times.append(float(np.median(t)))
    return times


def record(benchmark, area, n_threads, batch, flop, t_torch, t_ours, **metrics):
    benchmark.extra_info.update(
        area=area, backend="torch", n_threads=n_threads, batch=batch,
        torch_version=torch.__version__, load_1min=os.getloadavg()[0],
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        metrics=dict(metrics, torch_s=t_torch, starlabel_s=t_ours,
                     torch_gflops=None if t_torch is None else flop / t_torch / 1e9,
                     starlabel_gflops=None if t_ours is None else flop / t_ours / 1e9,
                     ratio_torch_to_starlabel=None if None in (t_torch, t_ours)
                     else t_torch / t_ours))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("batch", [0, 1], ids=lambda i: f"b{i}")
def test_torch_forward(benchmark, net, threads, batch, n_threads, numpy_matmuls):
    """Forward pass: torch.inference_mode vs fast.mlp_forward; results agree to float32."""
    threads(n_threads)
    n = net["batches"][batch]
    x = labels(n, net["n_labels"])
    model = torch_net(net).eval()
    xt = torch.from_numpy(x)

    def run_torch():
        with torch.inference_mode():
            return model(xt)

    def run_ours():
        return fast.mlp_forward(net["weights"], net["biases"], x, n_threads=n_threads)

    # the machine limit, measured here too, on n_threads BLAS threads
    run_matmul = numpy_matmuls(net["weights"], x)

    out_torch = benchmark(run_torch).numpy()
    out_ours = run_ours()
    np.testing.assert_allclose(out_torch, out_ours, rtol=0, atol=RTOL32 * np.abs(out_ours).max())
    flop = net["flop_per_star"] * n
    t_torch = t_ours = t_matmul = None
    if not benchmark.disabled:
        t_torch, t_ours = blocks([run_torch, run_ours], net["repeats"])
        try:
            from threadpoolctl import threadpool_limits
            with threadpool_limits(n_threads, user_api="blas"):
                t_matmul, = blocks([run_matmul], net["repeats"])
        except ImportError:
            pass
    record(benchmark, "torch_forward", n_threads, n, flop, t_torch, t_ours,
           max_abs_diff=float(np.abs(out_torch - out_ours).max()), numpy_matmul_s=t_matmul,
           numpy_matmul_gflops=None if t_matmul is None else flop / t_matmul / 1e9)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_torch_train_step(benchmark, net, threads, n_threads):
    """One RAdam step at the training batch: forward, L1 loss, backward, update."""
    threads(n_threads)
    n = net["train_batch"]
    x = labels(n, net["n_labels"], seed=2)
    y = np.random.default_rng(3).normal(size=(n, net["n_pixels"])).astype(np.float32)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_stepper():
        model = torch_net(net)
        optimizer = torch.optim.RAdam(model.parameters(), lr=LEARNING_RATE)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.l1_loss(model(xt), yt)
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        return step, model

    def our_stepper():
        weights = [w.copy() for w in net["weights"]]
        biases = [b.copy() for b in net["biases"]]
        state = fast.new_optimizer_state(weights, biases)
        order = np.arange(n)

        def step():
            return float(fast.mlp_train_epoch(weights, biases, state, x, y, order, batch_size=n,
                                               learning_rate=LEARNING_RATE, optimizer="radam",
                                               loss="l1", slope=SLOPE, n_threads=n_threads)[0])
        return step, (weights, biases)

    # correctness: one step from the same start, on fresh copies
    step_t, model = torch_stepper()
    step_o, (weights, biases) = our_stepper()
    loss_t, loss_o = step_t(), step_o()
    np.testing.assert_allclose(loss_t, loss_o, rtol=RTOL32)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for lin, w, b in zip(linears, weights, biases):
        np.testing.assert_allclose(lin.weight.detach().numpy(), w, rtol=0, atol=STEP_ATOL)
        np.testing.assert_allclose(lin.bias.detach().numpy(), b, rtol=0, atol=STEP_ATOL)

    # timing: steps keep updating the same networks (the cost of a step does not depend on
    # the values); the benchmark entry times torch
    step_t, _ = torch_stepper()
    step_o, _ = our_stepper()
    benchmark(step_t)
    timed = not benchmark.disabled
    t_torch, t_ours = blocks([step_t, step_o], net["repeats"]) if timed else (None, None)
    record(benchmark, "torch_train_step", n_threads, n, 3 * net["flop_per_star"] * n,
           t_torch, t_ours, loss_torch=loss_t, loss_starlabel=loss_o)
