"""The NumPy reference of the MLP and per-pixel kernels against independent oracles (link 1):
central finite differences in float64, explicit loops, and hand-computed optimizer steps."""

import math

import numpy as np
import pytest

from starlabel import reference
from starlabel.reference import payne as reference_payne
from starlabel.payne_io import ACTIVATIONS

STEP = 1e-6
# Central differences have truncation error ~ f''' h^2 ~ 1e-12 and rounding ~ 1e-16 / h
# ~ 1e-10 of the function's scale (O(1) here): 1e-7 absolute leaves 1000x margin.
FD_ATOL = 1e-7


def network(sizes, seed):
    rng = np.random.default_rng(seed)
    return ([rng.normal(size=(o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])],
            [rng.normal(0, 0.3, o) for o in sizes[1:]])


def forward_loop(weights, biases, x, act, slope):
    """A scalar-by-scalar forward pass: the textbook definition, no matrices."""
    funcs = {"leaky_relu": lambda z: z if z > 0 else slope * z, "relu": lambda z: max(z, 0.0),
             "sigmoid": lambda z: 1 / (1 + math.exp(-z)), "tanh": math.tanh,
             "softplus": lambda z: math.log(1 + math.exp(z)), "silu": lambda z: z / (1 + math.exp(-z))}
    a = list(x)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        z = [sum(w[o, i] * a[i] for i in range(len(a))) + b[o] for o in range(w.shape[0])]
        a = z if layer == len(weights) - 1 else [funcs[act](v) for v in z]
    return np.array(a)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_against_scalar_loops(activation):
    weights, biases = network((3, 6, 5, 4), seed=0)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 3))
    out = reference.mlp_forward(weights, biases, x, activation=activation, slope=0.02)
    for s in range(3):
        np.testing.assert_allclose(out[s], forward_loop(weights, biases, x[s], activation, 0.02),
                                   rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_jacobian_against_finite_differences(activation):
    weights, biases = network((4, 9, 7, 11), seed=2)
    x = np.random.default_rng(3).uniform(-0.5, 0.5, (5, 4))
    _, jac = reference.mlp_forward(weights, biases, x, activation=activation, jacobian=True)
    for k in range(4):
        dx = np.zeros(4)
        dx[k] = STEP
        fd = (reference.mlp_forward(weights, biases, x + dx, activation=activation)
              - reference.mlp_forward(weights, biases, x - dx, activation=activation)) / (2 * STEP)
        np.testing.assert_allclose(jac[:, :, k], fd, rtol=0, atol=FD_ATOL)


@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("activation", ["leaky_relu", "tanh", "silu"])
def test_gradients_against_finite_differences(activation, loss):
    weights, biases = network((3, 6, 5, 8), seed=4)
    rng = np.random.default_rng(5)
    x = rng.uniform(-0.5, 0.5, (7, 3))
    target = rng.normal(size=(7, 8))
    pw = rng.uniform(0.5, 2, 8)
    kw = dict(activation=activation, loss=loss, pixel_weights=pw)
    _, gw, gb = reference.mlp_gradients(weights, biases, x, target, **kw)
    for params, grads in ((weights, gw), (biases, gb)):
        for layer, (p, g) in enumerate(zip(params, grads)):
            for index in np.ndindex(p.shape):
                saved = p[index]
                p[index] = saved + STEP
                up = reference.mlp_gradients(weights, biases, x, target, **kw)[0]
                p[index] = saved - STEP
                down = reference.mlp_gradients(weights, biases, x, target, **kw)[0]
                p[index] = saved
                assert g[index] == pytest.approx((up - down) / (2 * STEP), abs=FD_ATOL), (layer, index)


def test_perpixel_against_loops_and_finite_differences():
    rng = np.random.default_rng(6)
    w0, b0, w1, b1 = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=4)
    x = rng.uniform(-0.5, 0.5, (3, 2))
    flux, jac = reference.perpixel_forward(w0, b0, w1, b1, x, jacobian=True)
    for s in range(3):
        for p in range(4):
            h = [1 / (1 + math.exp(-(w0[p, j] @ x[s] + b0[p, j]))) for j in range(3)]
            assert flux[s, p] == pytest.approx(sum(w1[p, j] * h[j] for j in range(3)) + b1[p], abs=1e-14)
    for k in range(2):
        dx = np.zeros(2)
        dx[k] = STEP
        fd = (reference.perpixel_forward(w0, b0, w1, b1, x + dx)
              - reference.perpixel_forward(w0, b0, w1, b1, x - dx)) / (2 * STEP)
        np.testing.assert_allclose(jac[:, :, k], fd, rtol=0, atol=FD_ATOL)


def test_paper_era_perpixel_against_loops_and_finite_differences():
    """The Payne paper era's per-pixel form a sigmoid(v . sigmoid(U x + c) + d) + e, in loops."""
    rng = np.random.default_rng(7)
    w0, b0, w1 = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    b1, w2, b2 = rng.normal(size=4), rng.normal(size=4), rng.normal(size=4)
    x = rng.uniform(-0.5, 0.5, (3, 2))
    outer = dict(w2=w2, b2=b2)
    flux, jac = reference.perpixel_forward(w0, b0, w1, b1, x, jacobian=True, **outer)
    for s in range(3):
        for p in range(4):
            h = [1 / (1 + math.exp(-(w0[p, j] @ x[s] + b0[p, j]))) for j in range(3)]
            inner = sum(w1[p, j] * h[j] for j in range(3)) + b1[p]
            expected = w2[p] / (1 + math.exp(-inner)) + b2[p]
            assert flux[s, p] == pytest.approx(expected, abs=1e-14)
    for k in range(2):
        dx = np.zeros(2)
        dx[k] = STEP
        fd = (reference.perpixel_forward(w0, b0, w1, b1, x + dx, **outer)
              - reference.perpixel_forward(w0, b0, w1, b1, x - dx, **outer)) / (2 * STEP)
        np.testing.assert_allclose(jac[:, :, k], fd, rtol=0, atol=FD_ATOL)


# -- optimizers against hand computation ------------------------------------------------------

def hand_adam(p, grads, lr, b1, b2, eps):
    """Kingma & Ba (2015), Algorithm 1, on one scalar, written out."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    return p


def hand_radam(p, grads, lr, b1, b2, eps):
    """Liu et al. (2020), Algorithm 2 (PyTorch's eps placement: sqrt(v) + eps), on one scalar."""
    m = v = 0.0
    rho_inf = 2 / (1 - b2) - 1
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho > 5:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            p = p - lr * mhat * r * math.sqrt(1 - b2**t) / (math.sqrt(v) + eps)
        else:
            p = p - lr * mhat
    return p


@pytest.mark.parametrize("kind,hand", [("adam", hand_adam), ("radam", hand_radam)])
@pytest.mark.parametrize("n_steps", [1, 8])  # RAdam: 1 step unrectified, step 6 on rectified
def test_optimizer_steps_against_hand_computation(kind, hand, n_steps):
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=5)
    grads = rng.normal(size=(n_steps, 5))
    p, m, v = p0.copy(), np.zeros(5), np.zeros(5)
    for t in range(n_steps):
        reference_payne.optimizer_update(kind, t + 1, 1e-2, (0.9, 0.999), 1e-8, 0.0, p, grads[t], m, v)
    expected = [hand(p0[i], grads[:, i], 1e-2, 0.9, 0.999, 1e-8) for i in range(5)]
    np.testing.assert_allclose(p, expected, rtol=1e-13, atol=1e-15)


def test_adamw_decay_is_decoupled():
    p, m, v = np.array([2.0]), np.zeros(1), np.zeros(1)
    reference_payne.optimizer_update("adamw", 1, 0.1, (0.9, 0.999), 1e-8, 0.5, p, np.array([0.0]), m, v)
    assert p[0] == pytest.approx(2.0 * (1 - 0.1 * 0.5))   # zero gradient: only the decay acts
    p, m, v = np.array([2.0]), np.zeros(1), np.zeros(1)
    reference_payne.optimizer_update("adam", 1, 0.1, (0.9, 0.999), 1e-8, 0.5, p, np.array([0.0]), m, v)
    assert p[0] == pytest.approx(2.0 - 0.1, rel=1e-6)   # L2: g = 0.5 * 2, normalized step lr


def test_one_training_step_is_gradient_then_optimizer():
    """mlp_train_epoch with one batch == mlp_gradients followed by one hand-computed Adam step."""
    weights, biases = network((2, 4, 3), seed=8)
    rng = np.random.default_rng(9)
    x, target = rng.uniform(-0.5, 0.5, (6, 2)), rng.normal(size=(6, 3))
    loss, gw, gb = reference.mlp_gradients(weights, biases, x, target, loss="l2")
    before = [w.copy() for w in weights] + [b.copy() for b in biases]
    state = reference.new_optimizer_state(weights, biases)
    losses = reference.mlp_train_epoch(weights, biases, state, x, target, np.arange(6),
                                       batch_size=6, learning_rate=1e-3, optimizer="adam",
                                       loss="l2")
    assert losses[0] == pytest.approx(loss, rel=1e-15)
    for p0, g, p1 in zip(before, gw + gb, weights + biases):
        expected = np.vectorize(lambda a, b: hand_adam(a, [b], 1e-3, 0.9, 0.999, 1e-8))(p0, g)
        np.testing.assert_allclose(p1, expected, rtol=1e-13, atol=1e-16)
