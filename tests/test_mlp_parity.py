"""Compiled MLP / per-pixel kernels against the NumPy reference (link 2 of the test chain), on
every instruction set this CPU runs, both dtypes, and 1 thread against 2 threads."""

import numpy as np
import pytest

from starlabel import fast, reference
from starlabel.payne_io import ACTIVATIONS, OPTIMIZERS

DTYPES = [np.float64, np.float32]

# Tolerances, relative to the largest |value| of the compared array. Both backends do the same
# operations in the same dtype; they differ only in summation order (Eigen's GEMM blocking and
# FMA vs NumPy's BLAS) and in libm's exp/tanh/log1p (<= 1-2 ulp). With k-term dot products the
# difference is ~ sqrt(k) ulp of the summands, and it grows by the layer gains through 3 layers:
# float64 (ulp 2.2e-16) -> 1e-12; float32 (ulp 1.2e-7) -> 2e-5 (a few hundred ulp of margin for
# widths up to 300 and sigmoid/tanh derivatives).
RTOL = {np.float64: 1e-12, np.float32: 2e-5}


def random_network(sizes, dtype, seed):
    rng = np.random.default_rng(seed)
    weights = [(rng.normal(size=(o, i)) / np.sqrt(i)).astype(dtype)
               for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.normal(0, 0.3, o).astype(dtype) for o in sizes[1:]]
    return weights, biases


def assert_close(a, b, dtype):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.dtype(dtype)
    assert a.shape == b.shape
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL[dtype] * scale)


SHAPES = [  # (sizes, n_stars)
    ((3, 8, 5), 1),             # one star, one hidden layer
    ((1, 4, 1), 3),             # one label, one pixel
    ((5, 7), 4),                # no hidden layer: linear
    ((4, 16, 12, 9, 33), 6),    # three hidden layers
    ((25, 40, 40, 600), 130),   # > one forward star tile (128), > one pixel block (512)
    ((3, 10, 10, 70), 700),     # > one Jacobian chunk (8 tiles of 85 stars)
    # >= 4 star tiles: the last layer is packed ahead, for the forward pass in blocks of 528
    # outputs (a full one and one of 2) and, with the Jacobian, in Eigen's blocks of 512 (a full
    # one and one of 18) and, at a depth of 1000, two depth panels
    ((4, 20, 1000, 530), 520),
    # >= 64 stars, fewer outputs than one panel of the output layer's kernel: only the partial
    # panel, with the weights packed per block and ahead
    ((3, 8, 1), 100),
    ((2, 5, 7), 600),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("sizes,n_stars", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_forward_and_jacobian_match_reference(isa_core, sizes, n_stars, dtype):
    weights, biases = random_network(sizes, dtype, seed=len(sizes) + n_stars)
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (n_stars, sizes[0]))
    out_f, jac_f = fast.mlp_forward(weights, biases, x, jacobian=True)
    out_r, jac_r = reference.mlp_forward(weights, biases, x, jacobian=True)
    assert_close(out_f, out_r, dtype)
    assert_close(jac_f, jac_r, dtype)
    assert_close(fast.mlp_forward(weights, biases, x), out_r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_matches_reference(isa_core, activation, dtype):
    weights, biases = random_network((4, 12, 10, 20), dtype, seed=3)
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, (9, 4))
    target = rng.normal(size=(9, 20))
    kw = dict(activation=activation, slope=0.05)
    out_f, jac_f = fast.mlp_forward(weights, biases, x, jacobian=True, **kw)
    out_r, jac_r = reference.mlp_forward(weights, biases, x, jacobian=True, **kw)
    assert_close(out_f, out_r, dtype)
    assert_close(jac_f, jac_r, dtype)
    for loss in ("l1", "l2"):
        lf, gwf, gbf = fast.mlp_gradients(weights, biases, x, target, loss=loss, **kw)
        lr, gwr, gbr = reference.mlp_gradients(weights, biases, x, target, loss=loss, **kw)
        assert lf == pytest.approx(lr, rel=RTOL[dtype])
        for a, b in zip(gwf + gbf, gwr + gbr):
            assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("sizes,batch", [
    ((3, 8, 5), 1), ((5, 7), 4), ((4, 70, 600, 30), 150),
    # >= 4 tiles of 64 rows: the last layer is packed ahead, as W (blocks of 528 outputs: two
    # full, one of 44) and as W^T (1100 deep: two depth panels)
    ((6, 40, 1100), 300),
])
def test_gradients_match_reference(isa_core, sizes, batch, dtype):
    weights, biases = random_network(sizes, dtype, seed=5)
    rng = np.random.default_rng(6)
    x = rng.uniform(-0.5, 0.5, (batch, sizes[0]))
    target = rng.normal(size=(batch, sizes[-1]))
    pw = rng.uniform(0, 2, sizes[-1])
    lf, gwf, gbf = fast.mlp_gradients(weights, biases, x, target, pixel_weights=pw)
    lr, gwr, gbr = reference.mlp_gradients(weights, biases, x, target, pixel_weights=pw)
    assert lf == pytest.approx(lr, rel=RTOL[dtype])
    for a, b in zip(gwf + gbf, gwr + gbr):
        assert_close(a, b, dtype)


def copy_net(weights, biases):
    return [w.copy() for w in weights], [b.copy() for b in biases]


def train_with_both_backends(weights, biases, train):
    """{"fast": ..., "reference": ...}: (weights, biases, optimizer state, losses) after
    train(backend, weights, biases, state) -> losses, each backend from copies of the network."""
    nets = {}
    for name, backend in (("fast", fast), ("reference", reference)):
        w, b = copy_net(weights, biases)
        state = backend.new_optimizer_state(w, b)
        nets[name] = (w, b, state, train(backend, w, b, state))
    return nets


def training_tolerance(dtype):
    # a few steps of an adaptive optimizer amplify the per-step rounding differences a little
    # (m / sqrt(v) of tiny gradients): float32 gets 10x the single-pass tolerance.
    return RTOL[dtype] * (10 if dtype == np.float32 else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_training_epochs_match_reference(isa_core, optimizer, loss, dtype):
    weights, biases = random_network((3, 16, 16, 40), dtype, seed=7)
    rng = np.random.default_rng(8)
    x = rng.uniform(-0.5, 0.5, (90, 3))
    target = np.sin(x @ rng.normal(size=(3, 40)))

    def train(backend, w, b, state):
        losses = []
        for epoch in range(2):  # 2 epochs x 4 batches (the last one of 18 rows)
            order = np.random.default_rng(epoch).permutation(90)
            losses.append(backend.mlp_train_epoch(
                w, b, state, x, target, order, batch_size=24, learning_rate=[1e-2, 5e-3, 2e-3, 1e-3],
                optimizer=optimizer, weight_decay=0.01, loss=loss,
                pixel_weights=np.linspace(0.5, 1.5, 40)))
        return np.concatenate(losses)

    nets = train_with_both_backends(weights, biases, train)
    (wf, bf, sf, lf), (wr, br, sr, lr) = nets["fast"], nets["reference"]
    assert sf["step"] == sr["step"] == 8
    tol = training_tolerance(dtype)
    np.testing.assert_allclose(lf, lr, rtol=tol)
    for a, b in zip(wf + bf + sf["m_weights"] + sf["v_biases"], wr + br + sr["m_weights"] + sr["v_biases"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.max(np.abs(b)))
    assert not np.array_equal(wf[0], weights[0])  # the weights did move


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_training_steps_with_packed_weights_match_reference(isa_core, dtype):
    """Batches of >= 4 star tiles, where each step packs the last layer ahead: every step must
    pack the weights the previous step left, not stale ones."""
    weights, biases = random_network((3, 16, 16, 40), dtype, seed=9)
    rng = np.random.default_rng(10)
    x = rng.uniform(-0.5, 0.5, (520, 3))
    target = np.sin(x @ rng.normal(size=(3, 40)))
    nets = train_with_both_backends(weights, biases, lambda backend, w, b, state:
                                    backend.mlp_train_epoch(w, b, state, x, target,
                                                            np.arange(520), batch_size=260,
                                                            learning_rate=1e-2, optimizer="adam"))
    (wf, bf, _, lf), (wr, br, _, lr) = nets["fast"], nets["reference"]
    tol = training_tolerance(dtype)
    np.testing.assert_allclose(lf, lr, rtol=tol)
    for a, b in zip(wf + bf, wr + br):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.max(np.abs(b)))


@pytest.mark.parametrize("outer", [False, True], ids=["binspec", "paper-era"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("n_stars,n_pixels,n_hidden,n_labels", [(1, 1, 1, 1), (7, 50, 5, 5), (30, 20, 10, 4)])
def test_perpixel_matches_reference(isa_core, n_stars, n_pixels, n_hidden, n_labels, dtype,
                                    outer):
    rng = np.random.default_rng(9)
    w0 = rng.normal(size=(n_pixels, n_hidden, n_labels)).astype(dtype)
    b0, w1 = (rng.normal(size=(n_pixels, n_hidden)).astype(dtype) for _ in range(2))
    b1 = rng.normal(size=n_pixels).astype(dtype)
    kw = {k: rng.normal(size=n_pixels).astype(dtype) for k in ("w2", "b2")} if outer else {}
    x = rng.uniform(-0.5, 0.5, (n_stars, n_labels))
    out_f, jac_f = fast.perpixel_forward(w0, b0, w1, b1, x, jacobian=True, **kw)
    out_r, jac_r = reference.perpixel_forward(w0, b0, w1, b1, x, jacobian=True, **kw)
    assert_close(out_f, out_r, dtype)
    assert_close(jac_f, jac_r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_one_and_two_threads_give_identical_results(dtype):
    """Tiles have fixed shapes, so the thread count never changes a single bit. (The network is
    big enough, ~1e8 flop per call, that the core really starts 2 threads: tiny ones run on 1.)"""
    weights, biases = random_network((5, 64, 64, 2000), dtype, seed=10)
    rng = np.random.default_rng(11)
    x = rng.uniform(-0.5, 0.5, (300, 5))
    target = rng.normal(size=(300, 2000))
    one = fast.mlp_forward(weights, biases, x, jacobian=True, n_threads=1)
    two = fast.mlp_forward(weights, biases, x, jacobian=True, n_threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    many = rng.uniform(-0.5, 0.5, (600, 5))  # enough star tiles to pack the last layer ahead
    np.testing.assert_array_equal(fast.mlp_forward(weights, biases, many, n_threads=1),
                                  fast.mlp_forward(weights, biases, many, n_threads=2))
    g1 = fast.mlp_gradients(weights, biases, x, target, n_threads=1)
    g2 = fast.mlp_gradients(weights, biases, x, target, n_threads=2)
    assert g1[0] == g2[0]
    for a, b in zip(g1[1] + g1[2], g2[1] + g2[2]):
        np.testing.assert_array_equal(a, b)
    results = []
    for n_threads in (1, 2):
        w, b = copy_net(weights, biases)
        state = fast.new_optimizer_state(w, b)
        losses = fast.mlp_train_epoch(w, b, state, x, target, np.arange(300)[::-1].copy(),
                                      batch_size=128, learning_rate=1e-3, n_threads=n_threads)
        results.append((losses, w, b))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1] + results[0][2], results[1][1] + results[1][2]):
        np.testing.assert_array_equal(a, b)
    w0 = rng.normal(size=(40, 5, 5)).astype(dtype)
    args = (w0, w0[:, :, 0].copy(), w0[:, :, 1].copy(), w0[:, 0, 0].copy(), x)
    outer = dict(w2=w0[:, 1, 1].copy(), b2=w0[:, 2, 2].copy())
    for kw in ({}, outer):
        for a, b in zip(fast.perpixel_forward(*args, jacobian=True, n_threads=1, **kw),
                        fast.perpixel_forward(*args, jacobian=True, n_threads=2, **kw)):
            np.testing.assert_array_equal(a, b)
