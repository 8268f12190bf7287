"""Minimal neural-network layers that share one protocol with :class:`cbn.BatchNorm`.

Every layer here, like ``BatchNorm``, offers

* ``forward(x)`` (also ``layer(x)``) and ``backward(dy) -> dx``; ``backward``
  uses what the last ``forward`` cached and *overwrites* the gradient arrays
  (there is no accumulation, so there is nothing to zero between steps);
* ``params`` and ``grads``: dicts mapping a name to the very arrays that are
  updated in place (an optimizer holds on to them);
* ``train(mode=True)`` and ``eval()``, returning the layer, and a ``training``
  flag.

Arrays are ``(N, features)`` batches.  A model has one floating dtype
(``float32`` by default, ``float64`` for gradient checks); layers with
parameters raise ``TypeError`` on an input of another dtype, as ``BatchNorm``
does, and :func:`cbn.trainer.fit` converts the data once, up front.

The stack follows the lecture (Ioffe & Szegedy, 2015): ``Linear`` without a bias
before batch norm, since BN's ``beta`` replaces it; see :func:`mlp`.
"""

import numbers
import threading

import numpy as np

from . import _kernels, io
from . import layer as bn_layer
from .functional import _abbrev, refuse_masked
from .layer import BatchNorm

__all__ = [
    "Module",
    "Linear",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Sequential",
    "SoftmaxCrossEntropy",
    "mlp",
    "as_generator",
    "LAYER_TYPES",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_ACTIVATIONS = ("relu", "sigmoid", "tanh")


def as_generator(rng):
    """Return a ``numpy.random.Generator`` for ``rng``.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
        ``None`` for fresh OS entropy, an ``int`` seed, or a generator that is
        returned as is (so several layers can draw from one stream).

    Returns
    -------
    numpy.random.Generator
    """
    if rng is None or isinstance(rng, np.random.Generator):
        return np.random.default_rng(rng)
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}"
    )


def _float_dtype(dtype, name="dtype"):
    """Validate a model dtype: float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from exc
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def _positive_int(value, name):
    """Validate a strictly positive integer argument."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_float_array(x, name="x"):
    """Raise unless ``x`` is a float32/float64 ndarray."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")


class Module:
    """Base class of the layers: a ``training`` flag and no parameters.

    Subclasses implement ``forward`` and ``backward``; layers with parameters
    override ``params`` and ``grads``.
    """

    training = True
    # The attributes that hold what the last forward left for backward:
    # dropped by copies (copy.deepcopy, pickle), as BatchNorm drops its own.
    _forward_cache = ()

    def __call__(self, x):
        """Same as :meth:`forward`."""
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        """Compute the output for a batch ``x``."""
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        """Return ``dL/dx`` given ``dy = dL/dy`` of the last forward."""
        raise NotImplementedError

    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode; return ``self``."""
        self.training = bn_layer._check_mode(mode)
        return self

    def eval(self):
        """Set evaluation mode; return ``self``."""
        return self.train(False)

    @property
    def params(self):
        """dict of str to ndarray: trainable parameters (empty here)."""
        return {}

    @property
    def grads(self):
        """dict of str to ndarray: gradients, same keys as :attr:`params`."""
        return {}

    def config(self):
        """dict: the constructor arguments (JSON-serialisable); none here."""
        return {}

    def _keep(self, **cache):
        """Store what backward needs (the attributes of ``_forward_cache``) and
        the thread whose forward it is; nothing inside ``cbn.no_grad()``."""
        if not bn_layer.is_grad_enabled():
            return
        for name, value in cache.items():
            setattr(self, name, value)
        self._thread = threading.get_ident()

    def _cached(self, attr):
        """Return the forward cache ``attr``; raise if forward never ran, or ran
        last in another thread (a layer keeps one forward: backward in this
        thread would differentiate the other thread's batch)."""
        value = getattr(self, attr, None)
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called before forward (a copy, a pickle or "
                "a loaded model keeps no forward, nor do forwards inside cbn.no_grad())")
        if self.__dict__.get("_thread", threading.get_ident()) != threading.get_ident():
            raise RuntimeError(
                f"the last forward of this {type(self).__name__} ran in another thread: a "
                "layer keeps one forward, and backward differentiates it, so give each "
                "thread its own model (copy.deepcopy)")
        return value

    def __getstate__(self):
        """What ``copy.deepcopy`` and ``pickle`` keep: everything but the last
        forward's cache (the copy's backward needs its own forward)."""
        state = self.__dict__.copy()
        for name in self._forward_cache + ("_thread",):
            if name in state:
                state[name] = None
        return state

    def _check_dy(self, dy, like):
        """Validate an upstream gradient against the cached forward output shape."""
        if not isinstance(dy, np.ndarray) or dy.shape != like.shape:
            got = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(f"dy must be an ndarray of shape {like.shape}, got {got}")
        _check_float_array(dy, "dy")


class Linear(Module):
    """Fully connected layer ``y = x @ W + b``.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths; ``W`` has shape ``(in_features, out_features)``.
    bias : bool, default True
        Whether to add ``b`` of shape ``(out_features,)``.  Use ``False`` in
        front of :class:`cbn.BatchNorm`, whose ``beta`` takes its role.
    init : {"he", "xavier"}, default "he"
        ``W ~ N(0, 2 / in_features)`` (He et al. 2015, for ReLU) or
        ``W ~ N(0, 2 / (in_features + out_features))`` (Glorot & Bengio 2010,
        for sigmoid/tanh and the output layer).  ``b`` starts at zero.
    rng : None, int or numpy.random.Generator
        Source of the initial weights (see :func:`as_generator`).
    dtype : float32 or float64, default float32
        dtype of the parameters and of the accepted input.

    Notes
    -----
    Backward, for ``dy`` of shape ``(N, out_features)``::

        dW = x.T @ dy,   db = sum_n dy[n],   dx = dy @ W.T
    """

    def __init__(self, in_features, out_features, bias=True, *, init="he", rng=None,
                 dtype=np.float32):
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        if init not in ("he", "xavier"):
            raise ValueError(f"init must be 'he' or 'xavier', got {init!r}")
        self.dtype = _float_dtype(dtype)
        self.init = init
        fan = self.in_features if init == "he" else self.in_features + self.out_features
        std = np.sqrt(2.0 / fan)
        gen = as_generator(rng)
        self.W = (gen.standard_normal((self.in_features, self.out_features)) * std).astype(
            self.dtype)
        self.dW = np.zeros_like(self.W)
        self.b = np.zeros(self.out_features, self.dtype) if bias else None
        self.db = np.zeros_like(self.b) if bias else None
        self._x = None
        self._fingerprint = None  # of x and W at the forward (see backward)

    _forward_cache = ("_x", "_fingerprint")

    @property
    def bias(self):
        """bool: whether the layer has a bias ``b``."""
        return self.b is not None

    def forward(self, x):
        """Return ``x @ W (+ b)`` for ``x`` of shape ``(N, in_features)`` and the layer's dtype."""
        _check_float_array(x)
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype {self.dtype}, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (N, {self.in_features}), got {x.shape}")
        self._keep(_x=x, _fingerprint=_kernels.sample_bits(x, self.W))
        y = x @ self.W
        if self.b is not None:
            y += self.b
        return y

    def backward(self, dy):
        """Write ``dW`` (and ``db``) in place and return ``dx = dy @ W.T``."""
        x = self._cached("_x")
        if not isinstance(dy, np.ndarray) or dy.shape != (x.shape[0], self.out_features):
            got = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(
                f"dy must be an ndarray of shape {(x.shape[0], self.out_features)}, got {got}")
        if dy.dtype != self.dtype:  # dW would be cast silently, dx come out in dy's dtype
            raise TypeError(f"dy must have the layer's dtype {self.dtype}, got {dy.dtype}")
        # As BatchNorm's backward: x or W rewritten in place since the forward
        # (a refilled input buffer, an optimizer step) would give dW or dx of
        # other data than the forward's, silently.
        changed = bn_layer.rewritten(self._fingerprint, x, self.W)
        if changed == "input":
            raise RuntimeError(
                "Linear's input was modified in place after its forward pass (a sample "
                "of its values changed): dW would be computed from other data. Run "
                "forward again, or pass a copy if the buffer is reused")
        if changed:
            raise RuntimeError(
                "Linear's W was modified in place after its forward pass (a sample of its "
                "values changed): dx would be computed with other weights. Run forward "
                "again (an optimizer step belongs after backward)")
        np.matmul(x.T, dy, out=self.dW)
        if self.db is not None:
            np.sum(dy, axis=0, out=self.db)
        return dy @ self.W.T

    @property
    def params(self):
        """dict: ``{"W": W}`` plus ``"b"`` when the layer has a bias."""
        return {"W": self.W} if self.b is None else {"W": self.W, "b": self.b}

    @property
    def grads(self):
        """dict: ``{"W": dW}`` plus ``"b": db`` when the layer has a bias."""
        return {"W": self.dW} if self.b is None else {"W": self.dW, "b": self.db}

    def config(self):
        """dict: the constructor arguments, as ``Linear(**config)`` accepts them."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "init": self.init, "dtype": self.dtype.name}

    def state_dict(self):
        """Return copies of the parameters, keyed as :attr:`params`."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state):
        """Copy arrays from ``state`` (as made by :meth:`state_dict`) into the parameters."""
        _load_into(self.params, state, type(self).__name__)

    def __repr__(self):
        return (f"Linear({self.in_features}, {self.out_features}, bias={self.bias}, "
                f"init={self.init!r}, dtype={self.dtype.name})")


def _load_into(params, state, owner):
    """Copy ``state`` into the arrays of ``params`` after checking all of it.

    Keys, shapes, numeric dtypes and finiteness are validated before anything
    is written, so a failed load leaves the parameters unchanged.
    """
    checked = _checked_params(params, state, owner)
    for key, arr in params.items():
        arr[...] = checked[key]


def _checked_params(params, state, owner):
    """Validate ``state`` against ``params`` without writing; return it cast to their dtypes."""
    if not hasattr(state, "keys"):
        raise TypeError(f"{owner}: state must be a dict, got {type(state).__name__}")
    if set(state) != set(params):
        # key=str: a non-string key must not make the message itself fail to sort.
        raise ValueError(
            f"{owner}: state keys {sorted(state, key=str)} != expected {sorted(params)}")
    checked = {}
    for key, arr in params.items():
        refuse_masked(state[key], f"{owner}: state[{key!r}]")
        src = np.asarray(state[key])
        if src.shape != arr.shape:
            raise ValueError(f"{owner}: state[{key!r}] has shape {src.shape}, expected {arr.shape}")
        if src.dtype.kind not in "fiu":
            raise TypeError(f"{owner}: state[{key!r}] must be numeric, got dtype {src.dtype}")
        with np.errstate(over="ignore"):
            cast = src.astype(arr.dtype)
        if not np.all(np.isfinite(cast)):
            raise ValueError(f"{owner}: state[{key!r}] contains NaN or Inf")
        checked[key] = cast
    return checked


class ReLU(Module):
    """Rectified linear unit ``y = max(x, 0)``; backward passes ``dy`` where ``x > 0``."""

    _forward_cache = ("_mask",)

    def forward(self, x):
        """Return ``max(x, 0)``, keeping the dtype of ``x``."""
        _check_float_array(x)
        self._keep(_mask=x > 0)
        # Not x * mask: -inf * 0 is NaN. maximum keeps a NaN input NaN, as PyTorch.
        return np.maximum(x, 0)

    def backward(self, dy):
        """Return ``dy`` where ``x > 0``, else 0 (an infinite ``dy`` there too, as PyTorch)."""
        mask = self._cached("_mask")
        self._check_dy(dy, mask)
        return np.where(mask, dy, 0)

    def __repr__(self):
        return "ReLU()"


class Sigmoid(Module):
    """Logistic function ``y = 1 / (1 + exp(-x))``, evaluated without overflow.

    Backward: ``dx = dy * y * (1 - y)``, from the ``y`` that forward returned
    (kept by reference: writing into it before backward raises there).
    """

    _forward_cache = ("_y", "_fingerprint")

    def forward(self, x):
        """Return ``sigmoid(x)``, keeping the dtype of ``x``."""
        _check_float_array(x)
        e = np.exp(-np.abs(x))  # in (0, 1]: never overflows
        y = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        self._keep(_y=y, _fingerprint=_kernels.sample_bits(y))
        return y

    def backward(self, dy):
        """Return ``dy * y * (1 - y)``."""
        y = _unchanged_output(self, self._cached("_y"))
        self._check_dy(dy, y)
        return dy * y * (1 - y)

    def __repr__(self):
        return "Sigmoid()"


class Tanh(Module):
    """Hyperbolic tangent ``y = tanh(x)``; backward ``dx = dy * (1 - y**2)``, from
    the ``y`` that forward returned (writing into it before backward raises there)."""

    _forward_cache = ("_y", "_fingerprint")

    def forward(self, x):
        """Return ``tanh(x)``, keeping the dtype of ``x``."""
        _check_float_array(x)
        y = np.tanh(x)
        self._keep(_y=y, _fingerprint=_kernels.sample_bits(y))
        return y

    def backward(self, dy):
        """Return ``dy * (1 - y**2)``."""
        y = _unchanged_output(self, self._cached("_y"))
        self._check_dy(dy, y)
        return dy * (1 - y * y)


def _unchanged_output(layer, y):
    """``y``, the output that ``layer``'s forward returned and its backward
    differentiates through; raise if it was written into since (a sample of
    its values changed), as PyTorch raises for a saved tensor modified in place."""
    if bn_layer.rewritten(layer._fingerprint, y):
        raise RuntimeError(
            f"the output of {type(layer).__name__}'s forward was modified in place before "
            "its backward, which computes the gradient from it; run forward again, or "
            "modify a copy")
    return y

    def __repr__(self):
        return "Tanh()"


class Sequential(Module):
    """A chain of layers: forward runs them in order, backward in reverse.

    Parameters
    ----------
    *layers
        Objects with ``forward``, ``backward``, ``params``, ``grads``,
        ``train`` and ``eval`` (the layers of this module or ``cbn.BatchNorm``).

    Notes
    -----
    ``params`` and ``grads`` prefix each child's keys with its position,
    e.g. ``"0.W"``, ``"1.gamma"``; the values are the children's own arrays,
    so an optimizer built over ``model.params`` updates the layers in place.

    A layer object may appear only once (in nested ``Sequential`` too):
    each layer keeps the cache of its last forward, so a layer used twice
    would differentiate only its second use, silently. For a second layer
    of the same kind use a new one, or ``copy.deepcopy(layer)``; shared
    weights are not supported.
    """

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            missing = [m for m in ("forward", "backward", "train", "eval") if
                       not callable(getattr(layer, m, None))]
            if missing:
                raise TypeError(
                    f"layers[{i}] ({type(layer).__name__}) lacks the layer methods {missing}")
        self.layers = list(layers)
        _refuse_repeats(self.layers)
        self.training = True
        self.train(True)

    def forward(self, x):
        """Run ``x`` through every layer and return the last output.

        Raises ``ValueError`` if a layer object appears twice (``layers`` was
        changed after construction): see the class notes."""
        _refuse_repeats(self.layers)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        """Backpropagate ``dy`` through the layers in reverse; return ``dL/dx``."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode=True):
        """Set the mode of this container and of every child; return ``self``."""
        self.training = bn_layer._check_mode(mode)
        for layer in self.layers:
            layer.train(self.training)
        return self

    def _collect(self, attr):
        out = {}
        for i, layer in enumerate(self.layers):
            for key, arr in (getattr(layer, attr, None) or {}).items():
                out[f"{i}.{key}"] = arr
        return out

    @property
    def params(self):
        """dict: every child's parameters, keyed ``"<index>.<name>"``."""
        return self._collect("params")

    @property
    def grads(self):
        """dict: every child's gradients, same keys as :attr:`params`."""
        return self._collect("grads")

    def state_dict(self):
        """Return the state of every child that has one, keyed ``"<index>.<name>"``."""
        out = {}
        for i, layer in enumerate(self.layers):
            if callable(getattr(layer, "state_dict", None)):
                for key, value in layer.state_dict().items():
                    out[f"{i}.{key}"] = value
        return out

    def load_state_dict(self, state, strict=True):
        """Load a dict made by :meth:`state_dict` into the children.

        All or nothing: every cbn layer's part is checked before any is
        written, so a failed load changes nothing (not even the forward caches
        a following ``backward`` needs). Other layers, which offer no check
        ahead, are loaded first and get their previous state back if one fails.

        Parameters
        ----------
        state : mapping
            ``"<index>.<name>"`` -> array, as :meth:`state_dict` writes it.
        strict : bool, default True
            As in PyTorch: every child that has a state must get one, and
            every key must name a child that has a state. With False, children
            the state does not mention keep theirs and such keys are ignored;
            a child that is mentioned still gets its whole state.

        Raises
        ------
        TypeError
            ``state`` is not a mapping, a key is not a string, or a child
            rejects a value's type.
        ValueError
            (strict) a key names no child with a state, or the state lacks
            any child's key (all named); or a child rejects its part.
        KeyError
            A ``BatchNorm`` child's part has a key it does not know, or (not
            strict) lacks one.

        A child's error names it: ``layer <index> (<type>): ...``.
        """
        if not hasattr(state, "keys") or not hasattr(state, "items"):
            raise TypeError("state must be a dict of '<index>.<name>' keys to arrays, "
                            f"got {type(state).__name__}")
        stateful = self._state_keys()
        per_child = self._split_state(state, stateful, strict)
        if strict:
            missing = [f"{i}.{key}" for i, keys in stateful.items() for key in keys
                       if not _has_key(per_child.get(i, {}), key)]
            if missing:
                raise ValueError(f"state lacks the keys {missing}; pass strict=False to load "
                                 "only part of the model")
        checked = {i: part for i, part in per_child.items()
                   if _check_child_state(self.layers[i], part, i)}
        unchecked = {i: part for i, part in per_child.items() if i not in checked}
        self._load_with_rollback(unchecked)
        for index, child_state in checked.items():
            self.layers[index].load_state_dict(child_state)

    def _state_keys(self):
        """``{index: state key names}`` of the children that have a state to load."""
        out = {}
        for i, layer in enumerate(self.layers):
            if (callable(getattr(layer, "load_state_dict", None))
                    and callable(getattr(layer, "state_dict", None))):
                keys = list(layer.state_dict())
                if keys:
                    out[i] = keys
        return out

    def _split_state(self, state, stateful, strict):
        """Group ``state`` by child, ``{index: {name: value}}``, checking every key.

        ``stateful`` is :meth:`_state_keys`; without ``strict``, keys for
        children outside it are dropped instead of refused.
        """
        per_child = {}
        for key, value in state.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"state keys must be strings '<index>.<name>', got {_abbrev(key)}")
            position = _split_key(key, len(self.layers))
            if position is None or position[0] not in stateful:
                if not strict:
                    continue
                if position is None:
                    raise ValueError(
                        f"state key {_abbrev(key)} names no layer of this Sequential")
                layer = self.layers[position[0]]
                raise ValueError(f"state key {_abbrev(key)}: layer {position[0]} "
                                 f"({type(layer).__name__}) has no state to load")
            index, name = position
            per_child.setdefault(index, {})[name] = value
        return per_child

    def _load_with_rollback(self, per_child):
        """Load layers that cannot be checked ahead; restore them all if one fails."""
        backup = {i: self.layers[i].state_dict() for i in per_child}
        try:
            for index, child_state in per_child.items():
                self.layers[index].load_state_dict(child_state)
        except BaseException:
            for index, old in backup.items():
                self.layers[index].load_state_dict(old)
            raise

    def config(self):
        """list: ``{"type": name, "config": {...}}`` for each layer, in order."""
        out = []
        for i, layer in enumerate(self.layers):
            name = type(layer).__name__
            if LAYER_TYPES.get(name) is not type(layer):
                raise TypeError(f"layer {i} ({name}) is not a cbn layer and cannot be saved")
            out.append({"type": name, "config": layer.config()})
        return out

    def save(self, path):
        """Save the architecture and state to ``path`` (``.npz``, no pickle), atomically.

        Written to a temporary file in the same folder, then renamed over
        ``path``: an interrupted save never destroys an existing file. Only
        layers of :data:`LAYER_TYPES` can be saved. Load with :meth:`Sequential.load`.
        """
        io.save_object(path, _SEQUENTIAL_FORMAT, self.config(), self.state_dict())

    @classmethod
    def load(cls, path):
        """Rebuild a model saved by :meth:`save`, in training mode.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            Truncated, corrupt or foreign file, a newer format version, an
            unknown layer type, or an invalid configuration or state. The
            configuration's value types, and its sizes against the shapes of
            the stored arrays, are checked before a layer is built, so a file
            cannot make loading allocate more than the data it holds.
        """
        spec, arrays = io.load_object(path, _SEQUENTIAL_FORMAT, list)
        per_child = {}
        for key, value in arrays.items():
            position = _split_key(key, len(spec))
            if position is None:
                raise ValueError(f"{path}: entry {_abbrev(key)} names no layer of the model")
            per_child.setdefault(position[0], {})[position[1]] = value
        layers = []
        for i, entry in enumerate(spec):
            where = f"{path}: layer {i}"
            if not isinstance(entry, dict) or set(entry) != {"type", "config"}:
                raise ValueError(f"{where}: malformed entry {_abbrev(entry)}")
            kind, config = entry["type"], entry["config"]
            if not isinstance(kind, str):
                raise ValueError(f"{where}: its type must be a string, got {_abbrev(kind)}")
            if kind not in LAYER_TYPES:
                raise ValueError(f"{where}: unknown layer type {_abbrev(kind)}")
            if not isinstance(config, dict):
                raise ValueError(
                    f"{where}: its config must be a JSON object, got {_abbrev(config)}")
            layers.append(_build_layer(LAYER_TYPES[kind], config, per_child.get(i, {}), where))
        return cls(*layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


_SEQUENTIAL_FORMAT = "cbn.Sequential"


def _build_layer(kind, config, state, where):
    """Instantiate ``kind(**config)`` and load ``state``; errors become ValueError.

    The configuration's value types, and the array shapes its sizes imply, are
    checked against the stored arrays first: a corrupt or crafted file cannot
    make the constructor allocate more than the file holds.
    """
    types, sizes, state_shapes = _FILE_SPECS[kind]
    io.check_config(config, types, where, sizes)
    io.check_state_shapes(state, state_shapes(config), where)
    try:
        return _construct(kind, config, state, where)
    except MemoryError:
        # The stored shapes bound every size the constructors allocate (a
        # BatchNorm with neither affine parameters nor running statistics
        # stores no array, and allocates nothing until its first forward);
        # this is for a file whose arrays themselves are too large.
        raise ValueError(
            f"{where}: a {kind.__name__} of this size does not fit in memory") from None


def _construct(kind, config, state, where):
    """``kind(**config)`` with ``state`` loaded; a constructor's error becomes ValueError."""
    if kind is BatchNorm:
        return BatchNorm.from_config(config, state, where)
    try:
        layer = kind(**config)
        if state or layer.params:
            layer.load_state_dict(state)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}: invalid {kind.__name__}: {exc}") from None
    return layer


def _split_key(key, n_layers):
    """``(index, name)`` of a ``"<index>.<name>"`` key, or None if it names no layer.

    The index must be written as :meth:`Sequential.state_dict` writes it
    (ASCII digits, no leading zero), so two keys can never name one array.
    """
    index, _, name = key.partition(".")
    # The length test comes first: int() of a huge digit string is slow or refused.
    if (not name or not index.isascii() or not index.isdigit()
            or len(index) > len(str(n_layers))):
        return None
    position = int(index)
    if str(position) != index or position >= n_layers:
        return None
    return position, name


def _has_key(part, key):
    """Whether a child's part of a state holds ``key`` (BatchNorm also takes
    PyTorch's ``weight``/``bias`` for ``gamma``/``beta``)."""
    return key in part or {"gamma": "weight", "beta": "bias"}.get(key) in part


def _check_child_state(layer, state, index):
    """Raise what ``layer.load_state_dict(state)`` would, without changing
    ``layer``, its message prefixed by ``layer <index> (<type>)``.

    Returns False, having checked nothing, for a layer that offers no way to
    check ahead (not a cbn ``Linear`` or ``BatchNorm``).
    """
    try:
        if type(layer) is Linear:
            _checked_params(layer.params, state, "Linear")
        elif type(layer) is BatchNorm:
            layer.check_state_dict(state)
        else:
            return False
    except (KeyError, ValueError, TypeError) as exc:
        if type(exc) not in (KeyError, ValueError, TypeError) or len(exc.args) != 1:
            raise
        raise type(exc)(f"layer {index} ({type(layer).__name__}): {exc.args[0]}") from exc
    return True


def _refuse_repeats(layers, seen=None, where="layers"):
    """Raise ValueError if a layer object occurs twice in ``layers`` or in the
    Sequential models among them."""
    seen = {} if seen is None else seen
    for i, layer in enumerate(layers):
        name = f"{where}[{i}]"
        if id(layer) in seen:
            raise ValueError(
                f"{name} is the same {type(layer).__name__} object as {seen[id(layer)]}: a "
                "layer keeps the cache of its last forward, so backward would differentiate "
                "only its second use. Use a new layer (or copy.deepcopy) for each place")
        seen[id(layer)] = name
        if isinstance(layer, Sequential):
            _refuse_repeats(layer.layers, seen, f"{name}.layers")


class SoftmaxCrossEntropy:
    """Softmax followed by the cross-entropy with integer labels, mean over the batch.

    ``loss = -(1/N) * sum_n log softmax(z_n)[y_n]``, computed as
    ``logsumexp(z_n) - z_n[y_n]`` with the row maximum subtracted first, so it
    neither overflows nor takes ``log(0)``.  The gradient is
    ``dL/dz = (softmax(z) - onehot(y)) / N``.

    Use either ``loss = crit.forward(logits, y)`` then ``dz = crit.backward()``,
    or the combined ``loss, dz = crit(logits, y)``.
    """

    def forward(self, logits, y):
        """Return the mean loss (a Python float) and cache what :meth:`backward` needs.

        Parameters
        ----------
        logits : ndarray of shape (N, K), float32 or float64
        y : ndarray of shape (N,), integer labels in ``[0, K)``
        """
        _check_float_array(logits, "logits")
        if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ValueError(f"logits must have shape (N, K) with N, K >= 1, got {logits.shape}")
        y = _check_labels(y, logits.shape[0], logits.shape[1])
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
        self._probs = e / s
        self._y = y
        return loss

    def backward(self):
        """Return ``dL/dlogits = (softmax(logits) - onehot(y)) / N`` of the last forward."""
        probs = getattr(self, "_probs", None)
        if probs is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        grad = probs.copy()
        grad[np.arange(len(self._y)), self._y] -= 1
        grad /= len(self._y)
        return grad

    def __call__(self, logits, y):
        """Return ``(loss, dL/dlogits)`` in one call."""
        loss = self.forward(logits, y)
        return loss, self.backward()

    def __repr__(self):
        return "SoftmaxCrossEntropy()"


def _check_labels(y, n, n_classes):
    """Validate integer labels: shape ``(n,)``, values in ``[0, n_classes)``."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match the logits, got {y.shape}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y must lie in [0, {n_classes}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.intp, copy=False)


def mlp(sizes, *, batch_norm=True, activation="relu", rng=None, dtype=np.float32,
        n_threads=1):
    """Build a multilayer perceptron as a :class:`Sequential`.

    Parameters
    ----------
    sizes : sequence of int
        Widths ``[n_inputs, hidden_1, ..., n_classes]``; at least two entries.
    batch_norm : bool, default True
        Insert :class:`cbn.BatchNorm` after every hidden ``Linear``.
    activation : {"relu", "sigmoid", "tanh"}, default "relu"
        Hidden activation.  ``relu`` uses He initialization, the others Xavier.
    rng : None, int or numpy.random.Generator
        Source of the initial weights.  The weights are drawn in the same order
        whatever ``batch_norm`` is, so two models built with the same seed
        start from identical weights (biases start at zero).
    dtype : float32 or float64, default float32
    n_threads : int, default 1
        Passed to each ``BatchNorm``.

    Returns
    -------
    Sequential
        Per hidden layer, with batch norm: ``Linear(bias=False)`` then
        ``BatchNorm(activation="relu")`` (ReLU fused into the layer) for ReLU,
        or ``Linear(bias=False), BatchNorm, Sigmoid/Tanh``; without:
        ``Linear(bias=True)`` then the activation.  The last layer is a
        ``Linear(bias=True)`` producing logits.
    """
    sizes = list(sizes) if not isinstance(sizes, (str, bytes)) else None
    if sizes is None or len(sizes) < 2:
        raise ValueError("sizes must be a sequence of at least two ints, "
                         "[n_inputs, ..., n_classes]")
    sizes = [_positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    dtype = _float_dtype(dtype)
    gen = as_generator(rng)
    init = "he" if activation == "relu" else "xavier"
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers.append(Linear(fan_in, fan_out, bias=not batch_norm, init=init, rng=gen,
                             dtype=dtype))
        if batch_norm:
            from .layer import BatchNorm  # the compiled layer; imported when needed

            fused = "relu" if activation == "relu" else None
            layers.append(BatchNorm(fan_out, dtype=dtype, activation=fused,
                                    n_threads=n_threads))
            if fused:
                continue
        layers.append({"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}[activation]())
    layers.append(Linear(sizes[-2], sizes[-1], bias=True, init="xavier", rng=gen, dtype=dtype))
    return Sequential(*layers)


#: Layer classes that :meth:`Sequential.save` can write and :meth:`Sequential.load` rebuild.
LAYER_TYPES = {cls.__name__: cls for cls in (Linear, ReLU, Sigmoid, Tanh, BatchNorm)}


def _linear_state_shapes(config):
    """Shapes of the arrays a ``Linear`` of ``config`` stores: ``W`` and, with a bias, ``b``."""
    shapes = {"W": (config["in_features"], config["out_features"])}
    if config.get("bias", True):
        shapes["b"] = (config["out_features"],)
    return shapes


#: Per layer type, what :meth:`Sequential.load` checks before building one:
#: the value types of its configuration keys, its size keys (present, positive
#: integers), and the shapes of its stored arrays as a function of the
#: configuration.
_FILE_SPECS = {
    Linear: ({"in_features": int, "out_features": int, "bias": bool, "init": str, "dtype": str},
             ("in_features", "out_features"), _linear_state_shapes),
    BatchNorm: (bn_layer.CONFIG_TYPES, ("num_features",), bn_layer.state_shapes),
    ReLU: ({}, (), lambda config: {}),
    Sigmoid: ({}, (), lambda config: {}),
    Tanh: ({}, (), lambda config: {}),
}
