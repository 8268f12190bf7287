"""Plain NumPy batch normalization, written for clarity rather than speed.

This module is the oracle of the tests and the baseline of the benchmarks. It
follows Ioffe & Szegedy (2015) line by line, for any array whose channel axis is
``axis``: statistics are taken over every other axis.

Forward (training), per channel over the ``m`` values of a mini-batch::

    mu      = mean(x)
    var     = mean((x - mu) ** 2)             # biased, divides by m
    x_hat   = (x - mu) / sqrt(var + eps)
    y       = gamma * x_hat + beta

Backward (training), with ``g = dL/dy``::

    dbeta   = sum(g)
    dgamma  = sum(g * x_hat)
    dx      = gamma / sqrt(var + eps) * (g - dbeta / m - x_hat * dgamma / m)

In evaluation the statistics are constants, so ``dx = gamma / sqrt(var + eps) * g``.
"""

import math

import numpy as np

__all__ = [
    "reduce_axes",
    "batch_stats",
    "exact_batch_stats",
    "forward_train",
    "forward_eval",
    "backward_train",
    "backward_eval",
    "ema_update",
]


def reduce_axes(ndim, axis):
    """The axes batch norm reduces over: every axis but the channel axis."""
    axis = axis % ndim
    return tuple(i for i in range(ndim) if i != axis)


def _per_channel(v, ndim, axis):
    """Reshape a (C,) vector so that it broadcasts along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(v, shape)


def batch_stats(x, axis=1):
    """Per-channel mean and biased variance (two passes, in the input's dtype)."""
    axes = reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    return mean, var


def exact_batch_stats(x, axis=1):
    """Per-channel mean and biased variance in float64, summed exactly (slow; for tests).

    ``batch_stats`` is the textbook two-pass NumPy code the benchmarks time, and
    NumPy sums a reduction over a non-contiguous axis (Fortran order, a channel
    axis that is not last) term by term, so its error grows with ``m`` times the
    magnitude of the values: on a channel whose mean is 1e12 times its spread it
    can miss the mean by a whole standard deviation. Here every sum is a
    correctly rounded ``math.fsum``, so the result is accurate to a few ulps
    whatever the layout, offset or batch size; it is the oracle for such inputs.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = np.moveaxis(x, axis % x.ndim, 0).reshape(x.shape[axis], -1)
    m = rows.shape[1]
    mean = np.array([math.fsum(r.tolist()) / m for r in rows])
    dev = rows - mean[:, None]
    var = np.array([math.fsum((d * d).tolist()) / m for d in dev])
    return mean, var


def forward_train(x, gamma, beta, eps=1e-5, axis=1, relu=False):
    """Training forward pass; returns ``(y, mean, var)`` with the biased variance."""
    mean, var = batch_stats(x, axis)
    y = forward_eval(x, mean, var, gamma, beta, eps, axis, relu)
    return y, mean, var


def forward_eval(x, mean, var, gamma, beta, eps=1e-5, axis=1, relu=False):
    """Normalize with given statistics (evaluation)."""
    shape = lambda v: _per_channel(v, x.ndim, axis)  # noqa: E731
    x_hat = (x - shape(mean)) / np.sqrt(shape(var) + eps)
    y = shape(gamma) * x_hat + shape(beta)
    return np.maximum(y, 0) if relu else y


def backward_train(dy, x, gamma, beta=None, eps=1e-5, axis=1, relu=False):
    """Training backward pass through the batch statistics; returns ``(dx, dgamma, dbeta)``."""
    mean, var = batch_stats(x, axis)
    return _backward(dy, x, mean, var, gamma, beta, eps, axis, relu, training=True)


def backward_eval(dy, x, mean, var, gamma, beta=None, eps=1e-5, axis=1, relu=False):
    """Backward pass with the statistics held constant; returns ``(dx, dgamma, dbeta)``."""
    return _backward(dy, x, mean, var, gamma, beta, eps, axis, relu, training=False)


def _backward(dy, x, mean, var, gamma, beta, eps, axis, relu, training):
    axes = reduce_axes(x.ndim, axis)
    shape = lambda v: _per_channel(v, x.ndim, axis)  # noqa: E731
    m = x.size // x.shape[axis]
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - shape(mean)) * shape(invstd)
    g = dy
    if relu:
        beta = np.zeros_like(gamma) if beta is None else beta
        g = np.where(shape(gamma) * x_hat + shape(beta) > 0, dy, 0)
    dbeta = g.sum(axis=axes)
    dgamma = (g * x_hat).sum(axis=axes)
    if training:
        dx = shape(gamma * invstd) * (g - shape(dbeta) / m - x_hat * shape(dgamma) / m)
    else:
        dx = shape(gamma * invstd) * g
    return dx, dgamma, dbeta


def ema_update(running_mean, running_var, mean, var, m, momentum):
    """PyTorch's running-statistics rule; returns the new ``(running_mean, running_var)``.

    ``running = (1 - momentum) * running + momentum * batch``, with the unbiased
    batch variance ``var * m / (m - 1)``.
    """
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    return new_mean, new_var
