"""The Payne's network kernels in plain NumPy: the twin of mlp.hpp and perpixel_network.hpp.

Every computation runs in the network's dtype (float32 or float64), as the compiled core
does; only loss sums are accumulated in float64.
"""

import numpy as np

from .. import payne_io as check
from ..payne_io import new_optimizer_state  # noqa: F401  (re-exported: same API as fast)

_LEAKY, _RELU, _SIGMOID, _TANH, _SOFTPLUS, _SILU = range(6)


def _sigmoid(z):
    one = z.dtype.type(1)
    with np.errstate(over="ignore"):  # exp(-z) = inf for very negative z gives sigmoid 0
        return one / (one + np.exp(-z))


def activate(code, slope, z):
    """(g(z), g'(z)) of an activation code, in z's dtype (the formulas of mlp.hpp)."""
    t = z.dtype.type
    if code in (_LEAKY, _RELU):
        s = t(0) if code == _RELU else t(slope)
        pos = z > 0
        return np.where(pos, z, s * z), np.where(pos, t(1), s).astype(z.dtype)
    if code == _SIGMOID:
        a = _sigmoid(z)
        return a, a * (t(1) - a)
    if code == _TANH:
        a = np.tanh(z)
        return a, t(1) - a * a
    if code == _SOFTPLUS:
        return np.maximum(z, t(0)) + np.log1p(np.exp(-np.abs(z))), _sigmoid(z)
    s = _sigmoid(z)  # SiLU
    return z * s, s * (t(1) + z * (t(1) - s))


def _forward_layers(weights, biases, code, slope, x):
    """Inputs of every layer, derivatives of every hidden layer, and the output."""
    acts, derivs = [x], [None]
    a = x
    for w, b in zip(weights[:-1], biases[:-1]):
        a, d = activate(code, slope, a @ w.T + b)
        acts.append(a)
        derivs.append(d)
    return acts, derivs, a @ weights[-1].T + biases[-1]


def mlp_forward(weights, biases, x, *, activation="leaky_relu", slope=0.01, jacobian=False,
                n_threads=None):
    """Outputs of a dense MLP for inputs x (n_stars, n_in) -> (n_stars, n_out).

    weights[l] (n_out_l, n_in_l), biases[l] (n_out_l,), all float32 or all float64; hidden
    layers use ``activation`` (``slope``: leaky ReLU's negative slope), the last is linear.
    x is converted to the weights' dtype. With ``jacobian=True`` also returns
    d out / d x as (n_stars, n_out, n_in).
    """
    check.threads(n_threads)
    weights, biases, dtype = check.network(weights, biases)
    code, slope = check.activation(activation, slope)
    x = check.inputs(x, weights[0].shape[1], dtype)
    if not jacobian:
        return _forward_layers(weights, biases, code, slope, x)[2]
    out, m = forward_and_hidden_jacobian(weights, biases, code, slope, x)
    return out, np.ascontiguousarray(np.matmul(weights[-1], m))


def forward_and_hidden_jacobian(weights, biases, code, slope, x):
    """Outputs (n_stars, n_out) and M = D_l W_l ... D_1 W_0 (n_stars, width, n_in), the
    Jacobian of the last hidden layer, so that d out / d x = W_last M. Checked arguments."""
    _, derivs, out = _forward_layers(weights, biases, code, slope, x)
    m = np.broadcast_to(np.eye(x.shape[1], dtype=x.dtype), (x.shape[0],) + (x.shape[1],) * 2)
    for w, d in zip(weights[:-1], derivs[1:]):
        m = d[:, :, None] * np.matmul(w, m)
    return out, m


def _loss_and_output_gradient(out, target, pixel_weights, loss):
    """Loss (float) and d loss / d out in out's dtype: mean over rows and outputs of w |r| or w r^2."""
    t = out.dtype.type
    n, p = out.shape
    scale = t(1.0 / (float(n) * float(p)))
    r = out - target
    w = np.ones(p, out.dtype) if pixel_weights is None else pixel_weights
    r64 = r.astype(np.float64)
    if loss == "l1":
        value = float(np.sum(w.astype(np.float64) * np.abs(r64))) / (n * p)
        grad = np.sign(r) * w * scale
    else:
        value = float(np.sum(w.astype(np.float64) * r64 * r64)) / (n * p)
        grad = t(2) * w * r * scale
    return value, grad.astype(out.dtype)


def _backward(weights, acts, derivs, grad_out):
    gw, gb = [None] * len(weights), [None] * len(weights)
    delta = grad_out
    for layer in range(len(weights) - 1, -1, -1):
        gw[layer] = delta.T @ acts[layer]
        gb[layer] = delta.sum(axis=0)
        if layer > 0:
            delta = (delta @ weights[layer]) * derivs[layer]
    return gw, gb


def mlp_gradients(weights, biases, x, target, *, activation="leaky_relu", slope=0.01, loss="l1",
                  pixel_weights=None, n_threads=None):
    """Loss and its gradients with respect to every weight and bias, for one batch.

    loss = mean over rows and outputs of ``pixel_weights[p] * |y - target|`` ("l1") or
    ``pixel_weights[p] * (y - target)**2`` ("l2").
    Returns (loss, grad_weights list, grad_biases list) in the weights' dtype.
    """
    check.threads(n_threads)
    weights, biases, dtype = check.network(weights, biases)
    code, slope = check.activation(activation, slope)
    x = check.inputs(x, weights[0].shape[1], dtype)
    target = check.targets(target, x.shape[0], weights[-1].shape[0], dtype)
    loss = check.loss_name(loss)
    pixel_weights = check.pixel_weights(pixel_weights, weights[-1].shape[0], dtype)
    acts, derivs, out = _forward_layers(weights, biases, code, slope, x)
    value, grad = _loss_and_output_gradient(out, target, pixel_weights, loss)
    gw, gb = _backward(weights, acts, derivs, grad)
    return value, gw, gb


def optimizer_update(kind, step, lr, betas, eps, weight_decay, p, g, m, v):
    """One Adam / AdamW / RAdam step on one array, in place (PyTorch's formulas).

    ``step`` counts from 1. Coefficients in float64, elementwise work in p's dtype.
    """
    t = p.dtype.type
    beta1, beta2 = betas
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    if kind == "adamw":
        if weight_decay != 0:
            p *= t(1.0 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + t(weight_decay) * p
    m *= t(beta1)
    m += t(1.0 - beta1) * g
    v *= t(beta2)
    v += t(1.0 - beta2) * g * g
    if kind in ("adam", "adamw"):
        p -= t(lr / bc1) * m / (np.sqrt(v) / t(np.sqrt(bc2)) + t(eps))
        return
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2**step / bc2
    mhat = m * t(1.0 / bc1)
    if rho_t > 5.0:
        rect = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        p -= mhat * t(lr * rect) * (t(np.sqrt(bc2)) / (np.sqrt(v) + t(eps)))
    else:
        p -= mhat * t(lr)


def mlp_train_epoch(weights, biases, state, x, target, order, *, batch_size=512,
                    learning_rate=1e-4, optimizer="radam", betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, activation="leaky_relu", slope=0.01, loss="l1",
                    pixel_weights=None, n_threads=None):
    """One epoch of mini-batch training, updating weights, biases and state in place.

    Batch b holds rows ``order[b*batch_size:(b+1)*batch_size]`` of x and target (the last
    batch may be smaller). learning_rate: a number or one per batch. state: from
    ``new_optimizer_state`` (moments and step count). Weight decay is L2 for Adam and RAdam
    and decoupled for AdamW, as in PyTorch.
    Returns the loss of every batch before its step (n_batches,).
    """
    (weights, biases, step, x, target, order, batch_size, lr, optimizer, betas, eps,
     weight_decay, code, slope, loss, pixel_weights) = check.train_epoch_arguments(
        weights, biases, state, x, target, order, batch_size, learning_rate, optimizer, betas,
        eps, weight_decay, activation, slope, loss, pixel_weights, n_threads)
    losses = np.empty(lr.size)
    for b in range(lr.size):
        rows = order[b * batch_size:(b + 1) * batch_size]
        acts, derivs, out = _forward_layers(weights, biases, code, slope, x[rows])
        losses[b], grad = _loss_and_output_gradient(out, target[rows], pixel_weights, loss)
        gw, gb = _backward(weights, acts, derivs, grad)
        step += 1
        for params, grads, ms, vs in ((weights, gw, state["m_weights"], state["v_weights"]),
                                      (biases, gb, state["m_biases"], state["v_biases"])):
            for p, g, m, v in zip(params, grads, ms, vs):
                optimizer_update(optimizer, step, lr[b], betas, eps, weight_decay, p, g, m, v)
    state["step"] = step
    return losses


def perpixel_forward(w0, b0, w1, b1, x, *, w2=None, b2=None, jacobian=False, n_threads=None):
    """Per-pixel sigmoid networks: BinSpec's
    ``inner[s, p] = w1[p] . sigmoid(w0[p] x_s + b0[p]) + b1[p]`` is the flux; with ``w2``
    and ``b2`` (the Payne paper era) the flux is ``w2[p] sigmoid(inner[s, p]) + b2[p]``.

    w0 (n_pixels, n_hidden, n_labels), b0 and w1 (n_pixels, n_hidden), b1, w2, b2
    (n_pixels,); x (n_stars, n_labels) converted to w0's dtype. With ``jacobian=True`` also
    returns d flux / d x (n_stars, n_pixels, n_labels).
    """
    check.threads(n_threads)
    net, dtype = check.perpixel_network(w0, b0, w1, b1, w2, b2)
    w0, b0, w1, b1, w2, b2 = (net[k] for k in check.PERPIXEL_KEYS)
    x = check.inputs(x, w0.shape[2], dtype)
    one = dtype.type(1)
    h = _sigmoid(np.einsum("phk,sk->sph", w0, x) + b0)
    flux = np.einsum("ph,sph->sp", w1, h) + b1
    if jacobian:
        jac = np.einsum("ph,sph,phk->spk", w1, h * (one - h), w0)
    if w2 is not None:
        g = _sigmoid(flux)
        flux = w2 * g + b2
        if jacobian:
            jac *= (w2 * g * (one - g))[:, :, None]
    if not jacobian:
        return flux
    return flux, np.ascontiguousarray(jac)
