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

A gradient must be a plain ndarray with its parameter's dtype and shape.
``step()`` checks that (and the keys, and that each parameter keeps the dtype
and shape it had when the optimizer was built) before it changes anything, so a step that
raises leaves the parameters, the state and ``t`` as they were.  The checks
are O(1) per parameter; the values themselves are not scanned (a NaN
gradient propagates, as in ``torch.optim``).
"""

import numbers

import numpy as np

from .functional import refuse_masked
from .nn import _checked_params

__all__ = ["Optimizer", "SGD", "Momentum", "RMSprop", "Adam", "make_optimizer", "OPTIMIZERS"]

_BN_NAMES = ("gamma", "beta")


def _nonneg_float(value, name, *, positive=False, below_one=False):
    """Validate a real hyper-parameter."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range: 10**400
        value = float("inf")
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {kind}, got {value}")
    if below_one and value >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


# Array types whose arithmetic is the ndarray's elementwise one.  A memmap is
# an ndarray backed by a file; other subclasses can redefine the operators
# the updates use (np.matrix makes ``g * g`` a matrix product, a masked array
# skips masked entries), so they are refused rather than trusted.
_ARRAY_TYPES = (np.ndarray, np.memmap)


def _check_array_type(x, what):
    """Raise TypeError unless ``x`` is an ndarray whose arithmetic is elementwise."""
    if type(x) in _ARRAY_TYPES:
        return
    if isinstance(x, np.ndarray):
        raise TypeError(
            f"{what} is a {type(x).__module__}.{type(x).__name__}, an ndarray subclass whose "
            f"arithmetic need not be elementwise (np.matrix multiplies as matrices); pass "
            f"np.asarray(...) of it, a plain view of the same memory")
    raise TypeError(f"{what} must be an ndarray, got {type(x).__name__}")


def _check_dicts(params, grads):
    """Raise unless ``params`` and ``grads`` are dicts with the same str keys."""
    if not isinstance(params, dict) or not isinstance(grads, dict):
        raise TypeError("params and grads must be dicts of arrays (model.params, model.grads)")
    if set(params) != set(grads):
        raise ValueError(f"params and grads must have the same keys, got {sorted(map(str, params))} "
                         f"and {sorted(map(str, grads))}")
    # Weight decay reads the last component of the key ("1.gamma" -> "gamma").
    for key in params:
        if not isinstance(key, str):
            raise TypeError(f"params keys must be str (e.g. '0.W'), got {type(key).__name__} {key!r}")


def _check_param(key, p):
    """Raise unless ``p`` is a writeable real floating ndarray, updatable in place."""
    _check_array_type(p, f"params[{key!r}]")
    if p.dtype.kind != "f":
        raise TypeError(f"params[{key!r}] must have a real floating dtype, got {p.dtype}")
    if not p.flags.writeable:
        raise ValueError(f"params[{key!r}] is read-only; it must be updated in place")


def _check_grad(key, p, g):
    """Raise unless ``g`` is a plain ndarray with the dtype and shape of ``p``."""
    _check_array_type(g, f"grads[{key!r}]")
    # The same dtype, not merely a castable one: the update would otherwise
    # fail part way (complex, object, str) or mix precisions in the state.
    if g.dtype != p.dtype:
        raise TypeError(f"grads[{key!r}] must have the dtype of params[{key!r}], {p.dtype}, "
                        f"got {g.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"grads[{key!r}] must have the shape of params[{key!r}], {p.shape}, "
                         f"got {g.shape}")


def _byte_bounds(a):
    """``(low, high)``: the addresses of a's first and one past its last byte."""
    low = high = a.__array_interface__["data"][0]
    for n, stride in zip(a.shape, a.strides):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + a.itemsize


def _refuse_shared(params):
    """Raise ValueError if two parameters share memory: each key's update would
    be applied to it, so a step would move it twice (tied weights, or the same
    array under two keys). Arrays are compared by their address ranges first
    (sorted, so O(n log n)); only ranges that meet are checked exactly."""
    spans = sorted((_byte_bounds(p), key) for key, p in params.items() if p.size)
    for i, ((lo, hi), key) in enumerate(spans):
        for (lo2, _), key2 in spans[i + 1:]:
            if lo2 >= hi:
                break
            if np.shares_memory(params[key], params[key2], max_work=10**6):
                raise ValueError(
                    f"params[{key!r}] and params[{key2!r}] share memory: a step would update "
                    "it once for each key. Give each parameter its own array (tied weights "
                    "are not supported)")


def _rounding_problem(value, dtype, *, normal=False):
    """How rounding the positive ``value`` to ``dtype`` spoils it, or None if it does not.

    The updates apply hyper-parameters in the parameter's dtype (NumPy casts
    a Python float to the array's float32), so a value valid as a float64 can
    become inf or 0 there.  ``normal=True`` also refuses a subnormal result.
    """
    info = np.finfo(dtype)
    with np.errstate(over="ignore", under="ignore"):
        cast = dtype.type(value)
    if np.isinf(cast):
        return f"overflows to inf in {dtype} (largest {info.max!s})"
    if cast == 0:
        return f"rounds to 0 in {dtype} (smallest normal {info.tiny!s})"
    if normal and cast < info.tiny:
        return f"is subnormal in {dtype} (smallest normal {info.tiny!s})"
    return None


class _Hyper:
    """A hyper-parameter checked whenever it is set, as the constructor checks it.

    Schedules assign ``opt.lr`` between steps; unchecked, ``opt.lr = "0.1"``
    failed inside ``step()`` after part of the state had moved, and
    ``opt.lr = -5`` or ``Adam.beta1 = 1.0`` corrupted the parameters silently.
    ``check(optimizer, value, name)`` returns the value to keep.
    """

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name = name
        self.attr = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, value):
        setattr(obj, self.attr, self.check(obj, value, self.name))


def _check_lr(opt, value, name):
    value = _nonneg_float(value, name, positive=True)
    opt._check_in_dtypes(value, name)
    return value


def _check_weight_decay(opt, value, name):
    value = _nonneg_float(value, name)
    if value > 0:
        opt._check_in_dtypes(value, name, [key for key in opt.params
                                           if opt.decay_bn or not _is_bn_key(key)])
    return value


def _check_decay_bn(opt, value, name):
    # A flag, not a truth value: bool("no") is True.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    value = bool(value)
    weight_decay = getattr(opt, "_weight_decay", 0.0)  # unset while constructing
    if value and weight_decay > 0:
        opt._check_in_dtypes(weight_decay, "weight_decay")
    return value


def _check_beta(opt, value, name):
    return _nonneg_float(value, name, below_one=True)


def _check_eps(opt, value, name):
    value = _nonneg_float(value, name, positive=True)
    # eps keeps the denominator off 0 in the parameter's dtype.
    opt._check_in_dtypes(value, name, normal=True)
    return value


def _scalar(value, name):
    """A hyper-parameter from a state dict: a 0-d array (as saved) as its Python value."""
    refuse_masked(value, f"state[{name!r}]")
    if isinstance(value, np.ndarray):
        if value.shape != ():
            raise ValueError(f"state[{name!r}] must be a single value, got shape {value.shape}")
        return value.item()
    return value


_INT64_MAX = 2**63 - 1


def _checked_step_count(value, name="t"):
    """The step count ``t`` (assigned, or ``state['t']``): an int from 0 to 2**63 - 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if not 0 <= value <= _INT64_MAX:
        raise ValueError(f"{name} must be a non-negative int64, got {value}")
    return int(value)


def _is_bn_key(key):
    """Whether ``key`` names a batch norm parameter ("1.gamma" -> "gamma")."""
    return key.rsplit(".", 1)[-1] in _BN_NAMES


class Optimizer:
    """Base class: holds the parameter/gradient pairs and applies weight decay.

    Parameters
    ----------
    params : dict of str to ndarray
        Writeable floating arrays, updated in place (e.g. ``model.params``).
    grads : dict of str to ndarray
        Gradients with the same keys, dtypes and shapes (e.g. ``model.grads``).
        Subclasses other than ``np.memmap`` (``np.matrix``, masked arrays)
        are refused for both, as their arithmetic need not be elementwise.
    lr : float
        Learning rate, > 0, and neither 0 nor inf in the parameters' dtypes.
    weight_decay : float, default 0.0
        L2 coefficient added as ``weight_decay * p`` to each gradient.
    decay_bn : bool, default False
        Also decay parameters named ``gamma`` or ``beta`` (the last component
        of the key, e.g. ``"1.gamma"``).

    Hyper-parameters may be reassigned between steps (``opt.lr = 0.01``);
    a new value is checked as the constructor checks it.

    :meth:`state_dict` and :meth:`load_state_dict` save and restore the step
    count, the hyper-parameters and the running averages, so that training
    resumed from a checkpoint continues exactly as it would have.
    """

    # The names of the per-parameter state dicts (running averages) of a subclass.
    _buffers = ()

    lr = _Hyper(_check_lr)
    weight_decay = _Hyper(_check_weight_decay)
    decay_bn = _Hyper(_check_decay_bn)

    def __init__(self, params, grads, lr, *, weight_decay=0.0, decay_bn=False):
        _check_dicts(params, grads)
        for key, p in params.items():
            _check_param(key, p)
            _check_grad(key, p, grads[key])
        _refuse_shared(params)
        self.params = params
        self.grads = grads
        # What step() holds the arrays to: the state and the dtype checks of
        # the hyper-parameters are only valid for these dtypes and shapes.
        self._layout = {key: (p.shape, p.dtype) for key, p in params.items()}
        self.decay_bn = decay_bn
        self.lr = lr
        self.weight_decay = weight_decay
        self.t = 0

    def _check_in_dtypes(self, value, name, keys=None, *, normal=False):
        """Raise ValueError if ``value`` turns inf or 0 in the dtype of ``params[key]``.

        ``keys`` defaults to every parameter; ``normal=True`` also refuses a
        subnormal value (see :func:`_rounding_problem`).
        """
        for key in self.params if keys is None else keys:
            problem = _rounding_problem(value, self.params[key].dtype, normal=normal)
            if problem:
                raise ValueError(f"{name}={value!r} {problem}, the dtype of params[{key!r}]")

    def _check_step(self):
        """Raise unless params and grads still match what the optimizer was built over.

        The dicts are plain and the model rewrites the gradients between
        steps, so any key, array, dtype or flag may have changed since the
        constructor checked them.  Only O(1) checks per parameter.
        """
        _check_dicts(self.params, self.grads)
        if set(self.params) != set(self._layout):
            raise ValueError(f"params keys changed since the optimizer was built: "
                             f"{sorted(self.params)}, was {sorted(self._layout)}")
        for key, p in self.params.items():
            _check_param(key, p)
            shape, dtype = self._layout[key]
            if p.shape != shape or p.dtype != dtype:
                raise ValueError(f"params[{key!r}] is now {p.dtype} of shape {p.shape}; the "
                                 f"optimizer was built for {dtype} of shape {shape}")
            _check_grad(key, p, self.grads[key])

    def _decays(self, key):
        """Whether the parameter ``key`` gets weight decay."""
        return self.weight_decay > 0 and (self.decay_bn or not _is_bn_key(key))

    def _grad(self, key):
        """The gradient of ``key``, with weight decay added where it applies."""
        g = self.grads[key]
        if self._decays(key):
            g = g + self.weight_decay * self.params[key]
        return g

    def step(self):
        """Apply one update to every parameter, in place.

        Raises before changing anything (parameters, state, ``t``) if a
        parameter or gradient no longer fits, see :meth:`_check_step`.
        """
        self._check_step()
        self.t += 1
        for key, p in self.params.items():
            self._update(key, p, self._grad(key))

    def _update(self, key, p, g):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def t(self):
        """Steps taken (Adam's bias correction counts them); an int from 0 to 2**63 - 1."""
        return self._t

    @t.setter
    def t(self, value):
        self._t = _checked_step_count(value)

    def _hypers(self):
        """The hyper-parameters' names, base class first (``lr``, ...)."""
        names = []
        for cls in reversed(type(self).__mro__):
            names += [n for n, v in vars(cls).items() if isinstance(v, _Hyper) and n not in names]
        return names

    def state_dict(self):
        """Copies of the optimizer's state, as a flat dict of arrays.

        ``"t"`` (the step count), each hyper-parameter by name (``"lr"``,
        ``"beta1"``, ...) and each running average as ``"<name>.<key>"``
        (``"v.0.W"``, ``"s.1.gamma"``): ready for ``numpy.savez(path,
        **opt.state_dict())``, as PyTorch's ``optimizer.state_dict()`` is for
        ``torch.save``.
        """
        state = {"t": np.array(self.t, np.int64)}
        for name in self._hypers():
            state[name] = np.array(getattr(self, name))
        for buffer in self._buffers:
            for key, arr in getattr(self, buffer).items():
                state[f"{buffer}.{key}"] = arr.copy()
        return state

    def load_state_dict(self, state):
        """Restore a state made by :meth:`state_dict` (a dict, or ``numpy.load``
        of a file saved from one) of an optimizer of the same kind over the
        same parameters.

        Everything is checked before anything changes: the keys (``KeyError``
        naming the missing and unexpected ones), the step count, each
        hyper-parameter (as assigning it checks), and each running average's
        shape, finiteness and sign (``ValueError``/``TypeError`` naming it).
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        expected = ["t", *self._hypers()] + [
            f"{buffer}.{key}" for buffer in self._buffers for key in getattr(self, buffer)]
        keys = set(state.keys())
        missing = [k for k in expected if k not in keys]
        unexpected = sorted(map(str, keys - set(expected)))
        if missing or unexpected:
            raise KeyError(f"state does not match this {type(self).__name__}: missing keys "
                           f"{missing}, unexpected keys {unexpected}")
        # Read only now: from numpy.load, each entry is decompressed as it is read.
        state = {k: state[k] for k in expected}
        t = _checked_step_count(_scalar(state["t"], "t"), "state['t']")
        # The averages are checked as a layer's parameters are (shape, numbers,
        # finite); those of squares must also not be negative.
        owner = f"{type(self).__name__}.load_state_dict"
        buffers = _checked_params(
            {f"{b}.{key}": arr for b in self._buffers for key, arr in getattr(self, b).items()},
            {f"{b}.{key}": state[f"{b}.{key}"] for b in self._buffers
             for key in getattr(self, b)}, owner)
        for name, value in buffers.items():
            if name.startswith("s.") and np.any(value < 0):
                raise ValueError(f"{owner}: state[{name!r}] is a running average of squares: "
                                 f"it must not be negative, got {float(value.min())!r}")
        old = {name: getattr(self, name) for name in self._hypers()}
        try:  # each as its assignment checks it; all or none
            for name in ("decay_bn", *[n for n in old if n != "decay_bn"]):
                setattr(self, name, _scalar(state[name], name))
        except BaseException:
            for name, value in old.items():
                setattr(self, "_" + name, value)
            raise
        for name, value in buffers.items():
            buffer, key = name.split(".", 1)
            getattr(self, buffer)[key][...] = value
        self.t = t

    def _state(self, key):
        """A plain zero array shaped like ``params[key]``, created on first use."""
        # subok=False: a memmap parameter must not give a file-less memmap state.
        return np.zeros_like(self.params[key], subok=False)

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

    beta = _Hyper(_check_beta)
    _buffers = ("v",)

    def __init__(self, params, grads, lr=0.1, *, beta=0.9, weight_decay=0.0, decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)
        self.beta = beta
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
        Added to ``sqrt(s)`` in the denominator; must be a normal number in
        every parameter's dtype (so not 1e-8 with float16 parameters).
    """

    beta = _Hyper(_check_beta)
    eps = _Hyper(_check_eps)
    _buffers = ("s",)

    def __init__(self, params, grads, lr=0.001, *, beta=0.999, eps=1e-8, weight_decay=0.0,
                 decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)
        self.beta = beta
        self.eps = eps
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
        Added to the square root in the denominator; must be a normal number
        in every parameter's dtype (so not 1e-8 with float16 parameters).

    Notes
    -----
    With ``t`` the step count starting at 1::

        v = beta1*v + (1-beta1)*g;  s = beta2*s + (1-beta2)*g**2
        p -= lr * (v / (1-beta1**t)) / (sqrt(s / (1-beta2**t)) + eps)
    """

    beta1 = _Hyper(_check_beta)
    beta2 = _Hyper(_check_beta)
    eps = _Hyper(_check_eps)
    _buffers = ("v", "s")

    def __init__(self, params, grads, lr=0.001, *, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, decay_bn=False):
        super().__init__(params, grads, lr, weight_decay=weight_decay, decay_bn=decay_bn)
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
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
