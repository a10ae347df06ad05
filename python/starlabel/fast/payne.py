"""The Payne's network kernels, compiled: dense MLP forward / Jacobian / gradients / training
epochs, and the per-pixel (BinSpec) networks. Same signatures as starlabel.reference.payne."""

from .. import payne_io as check
from .._core import core
from ..config import resolve_threads
from ..payne_io import new_optimizer_state  # noqa: F401  (re-exported: same API as reference)


def mlp_forward(weights, biases, x, *, activation="leaky_relu", slope=0.01, jacobian=False,
                n_threads=None):
    """Outputs of a dense MLP for inputs x (n_stars, n_in) -> (n_stars, n_out).

    weights[l] (n_out_l, n_in_l), biases[l] (n_out_l,), all float32 or all float64; hidden
    layers use ``activation`` (``slope``: leaky ReLU's negative slope), the last is linear.
    x is converted to the weights' dtype. With ``jacobian=True`` also returns
    d out / d x as (n_stars, n_out, n_in).
    """
    check.threads(n_threads)
    # Reading every parameter for NaN on each call cost 0.6-1.1 ms with The Payne's network
    # here, 7-18% of a batch of 256. A NaN or inf parameter always makes a pre-activation or
    # output non-finite (x is finite and not empty), which the core reports: check only then.
    weights, biases, dtype = check.network(weights, biases, finite=False)
    code, slope = check.activation(activation, slope)
    x = check.inputs(x, weights[0].shape[1], dtype)
    out, jac, finite = core.mlp_forward(weights, biases, x, code, slope, bool(jacobian),
                                        resolve_threads(n_threads))
    if not finite:
        check.network(weights, biases)  # raises, naming the array, if the network is at fault
    return (out, jac) if jacobian else out


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
    value, gw, gb = core.mlp_loss_gradients(weights, biases, x, target, pixel_weights, code, slope,
                                            check.LOSSES[loss], resolve_threads(n_threads))
    return value, list(gw), list(gb)


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
    losses, step = core.mlp_train_epoch(
        weights, biases, state["m_weights"], state["m_biases"], state["v_weights"],
        state["v_biases"], step, x, target, order, batch_size, pixel_weights, code, slope,
        check.LOSSES[loss], check.OPTIMIZERS[optimizer], lr, betas[0], betas[1], eps,
        weight_decay, resolve_threads(n_threads))
    state["step"] = int(step)
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
    x = check.inputs(x, net["w0"].shape[2], dtype)
    return core.perpixel_forward(**net, x=x, with_jacobian=bool(jacobian),
                                 n_threads=resolve_threads(n_threads))
