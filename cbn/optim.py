"""First-order optimizers over the ``params``/``grads`` dicts of a model.

An optimizer is built over ``model.params`` and ``model.grads`` (dicts with
the same keys whose values are the arrays the layers use) and ``step()``
updates every parameter *in place*.  Layers overwrite their gradients on
each ``backward``, so there is no ``zero_grad``.

The updates are the textbook ones (``g`` is the gradient, ``t`` the step
count from 1)::

    SGD       p -= lr * g
    Momentum  v = beta * v + (1 - beta) * g;             p -= lr * v
    RMSprop   s = beta * s + (1 - beta) * g**2;           p -= lr * g / (sqrt(s) + eps)
    Adam      v = beta1 * v + (1 - beta1) * g
              s = beta2 * s + (1 - beta2) * g**2
              p -= lr * (v / (1 - beta1**t)) / (sqrt(s / (1 - beta2**t)) + eps)

Momentum is the exponentially weighted average of the lecture; PyTorch's
``SGD(momentum=beta)`` keeps ``v = beta * v + g`` instead, which is the same
update with ``lr_torch = lr * (1 - beta)``.  L2 weight decay, when
``weight_decay > 0``, adds ``weight_decay * p`` to ``g`` before the update
(coupled L2, as in ``torch.optim``); it skips batch norm's ``gamma`` and
``beta`` unless ``decay_bn=True``.
"""

import numbers

import numpy as np

__all__ = ["Optimizer", "SGD", "Momentum", "RMSprop", "Adam", "make_optimizer", "OPTIMIZERS"]

_BN_NAMES = ("gamma", "beta")


def _nonneg_float(value, name, *, positive=False, below_one=False):
    """Validate a real hyper-parameter."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {kind}, got {value}")
    if below_one and value >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


class Optimizer:
    """Base class: holds the parameter/gradient pairs and applies weight decay.

    Parameters
    ----------
    params : dict of str to ndarray
        Writeable floating arrays, updated in place (e.g. ``model.params``).
    grads : dict of str to ndarray
        Gradients with the same keys and shapes (e.g. ``model.grads``).
    lr : float
        Learning rate, > 0.
    weight_decay : float, default 0.0
        L2 coefficient added as ``weight_decay * p`` to each gradient.
    decay_bn : bool, default False
        Also decay parameters named ``gamma`` or ``beta`` (the last component
        of the key, e.g. ``"1.gamma"``).
    """

    def __init__(self, params, grads, lr, *, weight_decay=0.0, decay_bn=False):
        if not isinstance(params, dict) or not isinstance(grads, dict):
            raise TypeError("params and grads must be dicts of arrays (model.params, model.grads)")
        if set(params) != set(grads):
            raise ValueError(f"params and grads must have the same keys, got {sorted(params)} "
                             f"and {sorted(grads)}")
        for key, p in params.items():
            g = grads[key]
            if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
                raise TypeError(f"params[{key!r}] must be a floating ndarray")
            if not p.flags.writeable:
                raise ValueError(f"params[{key!r}] is read-only; it must be updated in place")
            if not isinstance(g, np.ndarray) or g.shape != p.shape:
                got = g.shape if isinstance(g, np.ndarray) else type(g).__name__
                raise ValueError(f"grads[{key!r}] must be an ndarray of shape {p.shape}, got {got}")
        self.params = params
        self.grads = grads
        self.lr = _nonneg_float(lr, "lr", positive=True)
        self.weight_decay = _nonneg_float(weight_decay, "weight_decay")
        self.decay_bn = bool(decay_bn)
        self.t = 0

    def _decays(self, key):
        """Whether the parameter ``key`` gets weight decay."""
        return self.weight_decay > 0 and (self.decay_bn or key.rsplit(".", 1)[-1] not in _BN_NAMES)

    def _grad(self, key):
        """The gradient of ``key``, with weight decay added where it applies."""
        g = self.grads[key]
        if self._decays(key):
            g = g + self.weight_decay * self.params[key]
        return g

    def step(self):
        """Apply one update to every parameter, in place."""
        self.t += 1
        for key, p in self.params.items():
            self._update(key, p, self._grad(key))

    def _update(self, key, p, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def _state(self, key):
        """A zero array shaped like ``params[key]``, created on first use."""
        return np.zeros_like(self.params[key])

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay})"


class SGD(Optimizer):
    """Plain stochastic gradient descent, ``p -= lr * g``.

    Parameters are those of :class:`Optimizer`; ``lr`` defaults to 0.1.
    """

    def __init__(self, params, grads, lr=0.1, *, weight_decay=0.0, decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)

    def _update(self, key, p, g):
        p -= self.lr * g


class Momentum(Optimizer):
    """Gradient descent with momentum, ``v = beta*v + (1-beta)*g; p -= lr*v``.

    Parameters
    ----------
    params, grads, lr, weight_decay, decay_bn
        As for :class:`Optimizer`; ``lr`` defaults to 0.1.
    beta : float, default 0.9
        Weight of the running average, in ``[0, 1)``.
    """

    def __init__(self, params, grads, lr=0.1, *, beta=0.9, weight_decay=0.0, decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)
        self.beta = _nonneg_float(beta, "beta", below_one=True)
        self.v = {key: self._state(key) for key in params}

    def _update(self, key, p, g):
        v = self.v[key]
        v *= self.beta
        v += (1 - self.beta) * g
        p -= self.lr * v


class RMSprop(Optimizer):
    """RMSprop, ``s = beta*s + (1-beta)*g**2; p -= lr * g / (sqrt(s) + eps)``.

    Parameters
    ----------
    params, grads, lr, weight_decay, decay_bn
        As for :class:`Optimizer`; ``lr`` defaults to 0.001.
    beta : float, default 0.999
        Weight of the running average of ``g**2``, in ``[0, 1)``.
    eps : float, default 1e-8
        Added to ``sqrt(s)`` in the denominator.
    """

    def __init__(self, params, grads, lr=0.001, *, beta=0.999, eps=1e-8, weight_decay=0.0,
                 decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)
        self.beta = _nonneg_float(beta, "beta", below_one=True)
        self.eps = _nonneg_float(eps, "eps", positive=True)
        self.s = {key: self._state(key) for key in params}

    def _update(self, key, p, g):
        s = self.s[key]
        s *= self.beta
        s += (1 - self.beta) * (g * g)
        p -= self.lr * g / (np.sqrt(s) + self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction.

    Parameters
    ----------
    params, grads, lr, weight_decay, decay_bn
        As for :class:`Optimizer`; ``lr`` defaults to 0.001.
    beta1 : float, default 0.9
        Weight of the running average of ``g``.
    beta2 : float, default 0.999
        Weight of the running average of ``g**2``.
    eps : float, default 1e-8
        Added to the square root in the denominator.

    Notes
    -----
    With ``t`` the step count starting at 1::

        v = beta1*v + (1-beta1)*g;  s = beta2*s + (1-beta2)*g**2
        p -= lr * (v / (1-beta1**t)) / (sqrt(s / (1-beta2**t)) + eps)
    """

    def __init__(self, params, grads, lr=0.001, *, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)
        self.beta1 = _nonneg_float(beta1, "beta1", below_one=True)
        self.beta2 = _nonneg_float(beta2, "beta2", below_one=True)
        self.eps = _nonneg_float(eps, "eps", positive=True)
        self.v = {key: self._state(key) for key in params}
        self.s = {key: self._state(key) for key in params}

    def _update(self, key, p, g):
        v, s = self.v[key], self.s[key]
        v *= self.beta1
        v += (1 - self.beta1) * g
        s *= self.beta2
        s += (1 - self.beta2) * (g * g)
        v_hat = v / (1 - self.beta1 ** self.t)
        s_hat = s / (1 - self.beta2 ** self.t)
        p -= self.lr * v_hat / (np.sqrt(s_hat) + self.eps)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "rmsprop": RMSprop, "adam": Adam}


def make_optimizer(name, params, grads, lr=None, **kwargs):
    """Build an optimizer by name, as the command line does.

    Parameters
    ----------
    name : {"sgd", "momentum", "rmsprop", "adam"}
    params, grads : dict of str to ndarray
        Usually ``model.params`` and ``model.grads``.
    lr : float, optional
        Learning rate; ``None`` keeps the class default (0.1 for SGD and
        Momentum, 0.001 for RMSprop and Adam).
    **kwargs
        Further keyword arguments of the class (``weight_decay``, ``beta``...).

    Returns
    -------
    Optimizer
    """
    try:
        cls = OPTIMIZERS[str(name).lower()]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(OPTIMIZERS)}, got {name!r}") from None
    if lr is not None:
        kwargs["lr"] = lr
    return cls(params, grads, **kwargs)
