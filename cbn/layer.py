"""The batch-norm layer: parameters, running statistics, forward and backward."""

import contextlib
import numbers
import operator
import threading

import numpy as np

from . import _kernels, io
from . import functional as F
from .functional import (
    FLOAT_DTYPES,
    _nonfinite_channels,
    _raise_for_status,
    channel_view,
    check_activation,
    check_eps,
    empty_like_batch,
    resolve_threads,
    streams,
    view_like,
)

__all__ = ["BatchNorm", "is_grad_enabled", "no_grad"]


class no_grad(_kernels.NoGrad, contextlib.ContextDecorator):
    """Forwards inside keep nothing for ``backward`` (as ``torch.no_grad``).

    A layer keeps what its last forward needs for backward (its input, by
    reference) until the next forward. In ``with cbn.no_grad():`` (or in a
    function decorated with ``@cbn.no_grad()``) the forwards of
    ``cbn.BatchNorm`` and of the ``cbn.nn`` layers keep nothing and leave the
    forward kept before in place: a validation pass between a training
    forward and its backward does not change what backward differentiates,
    and inference holds no input alive. Running statistics update as usual in
    training mode (as in PyTorch). Per thread, as PyTorch's grad mode; blocks
    nest. ``cbn.trainer.predict`` and ``evaluate`` run in one.
    """


is_grad_enabled = _kernels.grad_enabled


def _check_flag(value, name):
    """A switch (constructor flag, training mode): True or False; ``"no"`` would read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class ModeError(TypeError, ValueError):
    """A training mode that is not True or False. Both a ``TypeError`` (as
    cbn's other flags raise) and a ``ValueError`` (as PyTorch's ``train()``
    raises), so that either ``except`` catches it (as ``numpy.AxisError``
    is both a ``ValueError`` and an ``IndexError``)."""


def _check_mode(mode):
    """``train(mode)``'s mode: True or False."""
    if not isinstance(mode, (bool, np.bool_)):
        raise ModeError(f"training mode is expected to be boolean (True or False), got {mode!r}")
    return bool(mode)


def _check_axis(axis):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    return int(axis)


def _check_activation_name(activation):
    check_activation(activation)
    return activation


def _check_threads(n_threads):
    resolve_threads(n_threads, 0)
    # A NumPy integer is stored as an int: config() goes to JSON, and the
    # kernels' direct path takes plain ints.
    return None if n_threads is None else operator.index(n_threads)


def _check_momentum(momentum):
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    return float(momentum)


def _fixed(name, doc):
    """A read-only attribute: changing it would invalidate the layer's arrays."""
    attr = "_" + name

    def refuse(self, value):
        raise AttributeError(
            f"{name} is fixed when the layer is built; create a new BatchNorm to change it"
        )

    return property(lambda self: getattr(self, attr), refuse, doc=doc)


def _owned(name, doc):
    """An array attribute whose assignment copies into the layer's own array
    (``_assign``), so that optimizers holding ``params`` and ``grads`` keep
    seeing the live values."""
    attr = "_" + name
    return property(lambda self: getattr(self, attr),
                    lambda self, value: self._assign(attr, name, value), doc=doc)


def _checked(name, check, doc):
    """An attribute whose new values pass ``check`` (which returns the value to keep)."""
    attr = "_" + name

    def assign(self, value):
        value = check(value)
        with self._busy:  # not while a call of the layer runs in another thread
            setattr(self, attr, value)

    return property(lambda self: getattr(self, attr), assign, doc=doc)


class BatchNorm:
    r"""Batch normalization (Ioffe & Szegedy 2015) for NumPy trainers.

    Normalizes each channel over every other axis of the batch, then scales
    and shifts it with the learned ``gamma`` and ``beta``.

    Training (per channel, over the ``m`` values of the mini-batch)::

        mu    = mean(x)                 var = mean((x - mu)**2)   # biased
        y     = gamma * (x - mu) / sqrt(var + eps) + beta
        running_mean = (1 - momentum) * running_mean + momentum * mu
        running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)

    Evaluation (``eval()``), and training while :meth:`freeze` is in effect::

        y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta

    These are the semantics of ``torch.nn.BatchNorm1d/2d/3d``; Keras'
    ``momentum`` is ``1 - momentum`` here.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics; ``None`` gives a
        cumulative moving average (weight ``1 / num_batches_tracked``).
    affine : bool, default True
        Learn ``gamma`` (init 1) and ``beta`` (init 0); if False, they are None.
    track_running_stats : bool, default True
        Keep running statistics; if False, batch statistics are used in
        evaluation too and the running attributes are None.
    axis : int, default 1
        Channel axis of the input: 1 for ``(N, C, *)``, -1 for channels-last
        ``(N, *, C)``; inputs of any rank >= 2.
    dtype : numpy.float32 or numpy.float64, default float32
        Dtype of the parameters, of the running statistics and of every input
        (None: float32, as PyTorch's ``dtype=None`` takes its default).
    activation : None or "relu"
        Fuse a ReLU into the layer: ``forward`` returns ``max(y, 0)`` and
        ``backward`` masks the gradient, recomputing the mask from x, so no
        second activation array is stored. On rows ((N, C) and channels-last)
        y is then computed as ``(x - mean) * a + b`` where the plain layer may
        use ``x * a + c``: the two can differ in the last bit.
    n_threads : int or None, default 1
        Threads for the kernels: -1 uses all OpenMP allows, None picks by
        input size (:func:`cbn.functional.default_threads`). Results are
        bit-identical whatever the count.

    Attributes
    ----------
    gamma, beta : ndarray (C,) or None
        Learned scale and shift, updated in place by optimizers.
    dgamma, dbeta : ndarray (C,) or None
        Gradients written (overwritten, not accumulated) by :meth:`backward`.
    running_mean, running_var : ndarray (C,) or None
        Running statistics (``running_var`` unbiased, as in PyTorch).
    num_batches_tracked : int or None
        Training batches folded into the running statistics.
    training : bool
        Training mode (True after construction).
    frozen : bool
        Normalize with the running statistics even in training mode.

    Notes
    -----
    ``forward`` keeps a reference to its input (or to the C-ordered copy it
    normalized, for an input whose values do not fill one block) and the batch
    mean and variance for ``backward``, which differentiates the last forward.
    Writing into the input, ``gamma`` or ``beta`` between the two makes
    ``backward`` raise ``RuntimeError`` (as PyTorch does for a saved tensor
    modified in place); the check compares a sample of eight values, so a
    change that spares them goes unseen. Evaluation (and frozen) forwards may
    run in several threads at once; a training forward, ``backward`` or a
    change to the layer while another thread's call runs raises
    ``RuntimeError``, and so does ``backward`` of a forward that another
    thread ran: give each thread its own layer (``copy.deepcopy``).
    """

    def __init__(
        self,
        num_features,
        *,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        axis=1,
        dtype=np.float32,
        activation=None,
        n_threads=1,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(
                f"num_features must be a positive int, got {type(num_features).__name__}"
            )
        if num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features}")
        # First: the setters below enter it.
        self._busy = _kernels.Guard(_BUSY)
        self._num_features = int(num_features)
        self._affine = _check_flag(affine, "affine")
        self._track_running_stats = _check_flag(track_running_stats, "track_running_stats")
        if dtype is None:  # the default, as PyTorch's dtype=None (np.dtype(None) is float64)
            dtype = np.float32
        try:
            self._dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}") from None
        if self._dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {self._dtype}")
        # The settable hyperparameters go through their properties' checks.
        self.eps = eps
        self.momentum = momentum
        self.axis = axis
        self.activation = activation
        self.n_threads = n_threads

        try:
            self._allocate_state()
        except (MemoryError, ValueError) as exc:  # numpy: "array is too big"
            # MemoryError, not type(exc): NumPy's _ArrayMemoryError takes two arguments.
            kind = MemoryError if isinstance(exc, MemoryError) else ValueError
            raise kind(
                f"num_features={self.num_features}: cannot allocate the layer's per-channel "
                f"arrays ({exc})") from None
        # One int64 that the kernel updating the running statistics sets in the
        # same C call (see _update_running_stats).
        self._tracked = np.zeros(1, np.int64) if self.track_running_stats else None
        self._training = True
        self._frozen = False
        self._cache = None
        self._stale = None  # gamma or beta, if assigned after the cached forward

    def _allocate_state(self):
        """The parameters, their gradients and the running statistics, as initialized."""
        C, dt = self.num_features, self.dtype
        self._unit = None  # affine=False: see _unit_params
        self._gamma = np.ones(C, dt) if self.affine else None
        self._beta = np.zeros(C, dt) if self.affine else None
        self._dgamma = np.zeros(C, dt) if self.affine else None
        self._dbeta = np.zeros(C, dt) if self.affine else None
        self._running_mean = np.zeros(C, dt) if self.track_running_stats else None
        self._running_var = np.ones(C, dt) if self.track_running_stats else None

    # -- configuration: fixed at construction, or checked when set (a value
    # set later goes to the kernels as it is, so it is checked here).

    num_features = _fixed("num_features", "Channels (C), fixed at construction.")
    dtype = _fixed("dtype", "Dtype of parameters, statistics and inputs, fixed at construction.")
    affine = _fixed("affine", "Whether the layer has gamma and beta, fixed at construction.")
    track_running_stats = _fixed(
        "track_running_stats", "Whether the layer keeps running statistics, fixed at construction."
    )
    eps = _checked("eps", check_eps, "Added to the variance before the square root (> 0).")
    momentum = _checked(
        "momentum", _check_momentum,
        "Weight of a new batch in the running statistics ([0, 1]), or None for a "
        "cumulative average.",
    )
    axis = _checked("axis", _check_axis, "The channel axis of the input.")
    activation = _checked("activation", _check_activation_name, "None, or 'relu' (fused).")
    n_threads = _checked(
        "n_threads", _check_threads, "Kernel threads: an int >= 1, -1 or None."
    )

    # -- parameters and statistics: assignment copies into the owned arrays,
    # so that optimizers holding `params` and `grads` keep seeing the live values.

    gamma = _owned("gamma", "Learned scale, shape (C,), or None when affine=False.")
    beta = _owned("beta", "Learned shift, shape (C,), or None when affine=False.")
    running_mean = _owned(
        "running_mean", "Running mean, shape (C,), or None when track_running_stats=False."
    )
    running_var = _owned(
        "running_var",
        "Running (unbiased) variance, shape (C,), or None when track_running_stats=False.",
    )
    dgamma = _owned("dgamma", "Gradient of gamma from the last backward, shape (C,), or None.")
    dbeta = _owned("dbeta", "Gradient of beta from the last backward, shape (C,), or None.")

    def _assign(self, attr, name, value):
        target = getattr(self, attr)
        if target is None:
            raise AttributeError(f"{name} is None for this layer and cannot be assigned")
        value = _checked_vector(value, name, self.num_features, self.dtype)
        with self._busy:
            target[...] = value
            if name in ("gamma", "beta") and self._cache is not None:
                self._stale = name  # backward must not mix this forward with the new value

    @property
    def params(self):
        """``{"gamma": gamma, "beta": beta}``: the arrays optimizers update in place."""
        if not self.affine:
            return {}
        return {"gamma": self._gamma, "beta": self._beta}

    @property
    def grads(self):
        """``{"gamma": dgamma, "beta": dbeta}``, matching :attr:`params`."""
        if not self.affine:
            return {}
        return {"gamma": self.dgamma, "beta": self.dbeta}

    # -- modes

    @property
    def training(self):
        """Training mode: normalize with batch statistics and update the running ones."""
        return self._training

    @training.setter
    def training(self, mode):
        mode = _check_mode(mode)
        with self._busy:
            self._training = mode

    @property
    def frozen(self):
        """Whether :meth:`freeze` fixed the running statistics (see there)."""
        return self._frozen

    @frozen.setter
    def frozen(self, value):
        value = _check_flag(value, "frozen")
        if value and not self.track_running_stats:
            raise ValueError("freezing needs running statistics (track_running_stats=True)")
        with self._busy:
            self._frozen = value

    @property
    def num_batches_tracked(self):
        """Training batches folded into the running statistics (None without them)."""
        return None if self._tracked is None else int(self._tracked[0])

    @num_batches_tracked.setter
    def num_batches_tracked(self, value):
        # momentum=None weighs the next batch by 1 / (this + 1): a negative or
        # fractional count would corrupt the running statistics.
        if not self.track_running_stats:
            if value is not None:
                raise ValueError(
                    "num_batches_tracked is None for a layer without running statistics")
            return
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"num_batches_tracked must be a non-negative int, got {value!r}")
        value = _checked_count(value)
        with self._busy:
            self._tracked[0] = value

    def train(self, mode=True):
        """Set training mode (``mode=False`` is :meth:`eval`); returns self.

        ``mode`` must be True or False (as in PyTorch: a string such as "no"
        would otherwise read as True)."""
        self.training = mode
        return self

    def eval(self):
        """Set evaluation mode: normalize with the running statistics; returns self."""
        return self.train(False)

    def freeze(self):
        """Fix the running statistics and normalize with them, even in training mode.

        Gradients still flow to gamma, beta and x (through fixed statistics), as
        fine-tuning needs. ``train()`` does not undo this; :meth:`unfreeze` does.
        Returns self.
        """
        if not self.track_running_stats:
            raise ValueError("freeze() needs running statistics (track_running_stats=True)")
        self.frozen = True
        return self

    def unfreeze(self):
        """Undo :meth:`freeze`; returns self."""
        self.frozen = False
        return self

    def reset_running_stats(self):
        """Restart the running statistics: mean 0, variance 1, no batches tracked.

        As PyTorch's method of that name; with ``momentum=None`` the next
        batches then make a plain cumulative average, the way to re-estimate
        the statistics after the weights changed (e.g. averaged weights, as
        ``torch.optim.swa_utils.update_bn`` does). No-op without running
        statistics.
        """
        if not self.track_running_stats:
            return
        with self._busy:
            self._running_mean[...] = 0
            self._running_var[...] = 1
            self._tracked[0] = 0

    def reset_parameters(self):
        """Restart the layer as built: :meth:`reset_running_stats`, gamma 1, beta 0.

        As PyTorch's method of that name. With ``affine=True``, like assigning
        gamma or beta, it makes a backward of an earlier forward raise (with
        ``affine=False`` nothing that backward uses changes).
        """
        self.reset_running_stats()
        if self.affine:
            self.gamma = np.ones(self.num_features, self.dtype)
            self.beta = np.zeros(self.num_features, self.dtype)

    @property
    def uses_batch_stats(self):
        """Whether the next forward normalizes with the batch's own statistics."""
        return (self._training and not self._frozen) or not self.track_running_stats

    # -- computation

    def __call__(self, x):
        """Same as :meth:`forward`."""
        return self.forward(x)

    def forward(self, x):
        """Normalize a batch.

        Parameters
        ----------
        x : ndarray of the layer's dtype, rank >= 2, ``num_features`` channels along ``axis``
            Any memory layout; read-only arrays are fine. In training mode each
            channel needs more than one value.

        Returns
        -------
        ndarray
            Same shape and dtype as x, laid out as x if x's values fill one block
            in some order of its axes (C, Fortran, an NCHW view of channels-last
            memory; see :func:`cbn.functional.memory_order`), else C-contiguous.

        Raises
        ------
        TypeError, ValueError
            Bad input (the message names it); nothing in the layer changes.
        FloatingPointError
            NaN or Inf in x or in the parameters; nothing in the layer changes.
        RuntimeError
            A call that changes the layer (a training forward, backward, an
            assignment) is running in another thread, or this forward would
            update the running statistics while any call runs there.
            Evaluation forwards (and frozen ones) may run in several threads
            at once.
        """
        # A forward that updates the running statistics must be alone; one that
        # only reads them (eval, frozen) may share the layer with others like it.
        updates = self._updates_stats()
        with (self._busy if updates else self._busy.shared):
            if updates != self._updates_stats():  # the mode changed just before
                raise RuntimeError(_BUSY)
            return self._forward(x)

    def _updates_stats(self):
        """Whether the next forward folds its batch into the running statistics."""
        return self._training and not self._frozen and self._track_running_stats

    def _fits(self, x):
        """Whether x is an ndarray of the layer's dtype with num_features channels
        (what gamma's dtype and length make the direct calls check)."""
        if type(x) is not np.ndarray or x.dtype != self._dtype:
            return False
        axis = self._axis
        return -x.ndim <= axis < x.ndim and x.shape[axis] == self.num_features

    def _unit_params(self):
        """affine=False: ones and zeros for gamma and beta, and scratch arrays for
        their gradients, which the kernels take; never exposed.

        Made when first needed, for a batch of num_features channels (see
        _fits), not in the constructor: a layer loaded from a file
        that stores no array of its size (affine=False,
        track_running_stats=False) must not allocate for a num_features that
        no data has backed yet.
        """
        if self._unit is None:
            C, dt = self.num_features, self.dtype
            self._unit = (np.ones(C, dt), np.zeros(C, dt), np.empty(C, dt), np.empty(C, dt))
        return self._unit

    def _forward(self, x):
        if self.affine:
            gamma, beta = self._gamma, self._beta
        elif self._fits(x):
            gamma, beta = self._unit_params()[:2]
        else:  # the checked path names what does not fit
            return self._checked_forward(x)
        batch_stats = self.uses_batch_stats
        # A batch the kernels take as it is runs without further Python;
        # anything else (or a kernel failure) goes through the checked path,
        # which converts it or raises an exception that names the problem.
        if batch_stats:
            result = _kernels.train_call(
                x, gamma, beta, self._axis, self._eps, self._activation, None, self._n_threads,
                F.PARALLEL_MIN_SIZE, F.STREAM_MIN_BYTES, F.ROWS_STREAM_MIN_BYTES,
            )
            if type(result) is not tuple:
                return self._checked_forward(x)
            y, mean, var = result
            if self._training and self.track_running_stats:
                count = y.size // self.num_features
                self._update_running_stats(mean, var, count)
        else:
            mean = self._running_mean.astype(np.float64)
            var = self._running_var.astype(np.float64)
            y = _kernels.eval_call(
                x, mean, var, gamma, beta, self._axis, self._eps, self._activation, None,
                self._n_threads, F.PARALLEL_MIN_SIZE, F.STREAM_MIN_BYTES,
                F.ROWS_STREAM_MIN_BYTES,
            )
            if type(y) is not np.ndarray:
                return self._checked_forward(x)
        self._keep(x, mean, var, batch_stats)
        return y

    def _checked_forward(self, x):
        x_c, x3 = channel_view(x, self.axis, "x", self.dtype, self.num_features)
        count = x3.shape[0] * x3.shape[2]
        gamma, beta = (self._gamma, self._beta) if self.affine else self._unit_params()[:2]
        relu = self.activation == "relu"
        threads = resolve_threads(self.n_threads, x3.size)
        y, y3 = empty_like_batch(x_c, x3)
        C = self.num_features
        if self.uses_batch_stats:
            if count < 2:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input of shape {x_c.shape}"
                )
            mean = np.empty(C)
            var = np.empty(C)
            status = _kernels.forward_train(
                x3, y3, gamma, beta, self.eps, mean, var, relu, threads,
                streams(y.nbytes, x3.shape[2]),
            )
            if status == _kernels.NONFINITE_STATS:
                raise FloatingPointError(
                    "the batch statistics are not finite: x contains NaN or Inf (or values "
                    f"whose square overflows) in channel {_nonfinite_channels(mean, var)}; "
                    "the running statistics were left unchanged"
                )
            _raise_for_status(status, "output", (("gamma", gamma), ("beta", beta)),
                              self.eps, self.dtype)
            if self._training and self.track_running_stats:
                self._update_running_stats(mean, var, count)
        else:
            mean = self._running_mean.astype(np.float64)
            var = self._running_var.astype(np.float64)
            status = _kernels.forward_eval(
                x3, y3, mean, var, gamma, beta, self.eps, relu, threads,
                streams(y.nbytes, x3.shape[2]),
            )
            _raise_for_status(
                status,
                "output",
                (
                    ("running_mean", mean),
                    ("running_var", var),
                    ("gamma", gamma),
                    ("beta", beta),
                ),
                self.eps,
                self.dtype,
            )
        self._keep(x_c, mean, var, self.uses_batch_stats)
        return y

    def _keep(self, x, mean, var, batch_stats):
        """Keep what backward differentiates: this forward's input and statistics
        and the settings it ran with, whatever is assigned to the layer before
        backward is called; nothing inside :class:`no_grad`."""
        if is_grad_enabled():
            self._cache = (x, mean, var, batch_stats, self._axis, self._eps, self._activation,
                           _kernels.sample_bits(x, *self._learned()), threading.get_ident())
            self._stale = None

    def _learned(self):
        """``(gamma, beta)``, or ``()`` when ``affine=False``: what backward's
        fingerprint covers besides x (optimizers update them in place, which
        assignment checks do not see)."""
        return (self._gamma, self._beta) if self._affine else ()

    def _update_running_stats(self, mean, var, count):
        # Saturates where state_dict()'s int64 (PyTorch's type) ends.
        n = min(int(self._tracked[0]) + 1, _INT64_MAX)
        factor = self.momentum if self.momentum is not None else 1.0 / n
        # The statistics and their count change together or not at all.
        if _kernels.ema_update(
            self._running_mean, self._running_var, mean, var, float(count), factor,
            self._tracked, n,
        ):
            for name, stat in (("running_mean", self._running_mean),
                               ("running_var", self._running_var)):
                bad = ~np.isfinite(stat)
                if bad.any():  # written into the array directly: assignment checks
                    raise FloatingPointError(
                        f"{name} holds NaN or Inf in channel {F._channel_list(bad)}; the "
                        "running statistics were left as they are")
            raise FloatingPointError(
                f"the running statistics would overflow {self.dtype} (batch variance up to "
                f"{var.max():.3g}); they were left unchanged. Use dtype=numpy.float64 "
                "or rescale the input"
            )

    def backward(self, dy):
        """Back-propagate through the last :meth:`forward`.

        Writes ``dgamma`` and ``dbeta`` (overwriting them) and returns ``dx``.
        After a training-mode forward the gradient flows through the batch
        statistics; after an evaluation-mode (or frozen) forward they are
        constants, the gradient fine-tuning needs.

        Parameters
        ----------
        dy : ndarray, the shape and dtype of the last forward's input
            Gradient of the loss with respect to this layer's output.

        Returns
        -------
        dx : ndarray, shape and dtype of dy

        Raises
        ------
        RuntimeError
            No forward pass yet; the forward's input, ``gamma`` or ``beta`` was
            written into or assigned since (see the class notes); the last
            forward ran in another thread (a layer keeps one forward, and
            backward cannot tell whose it is); or a call of the layer is
            running in another thread.
        TypeError, ValueError
            dy does not match the input of the forward pass.
        FloatingPointError
            dy contains NaN or Inf; dgamma and dbeta are left unchanged. With
            ``activation="relu"``, dy where the output was clamped to 0 is
            masked out, so a NaN there never reaches the gradient and does
            not raise (PyTorch's relu after batch norm gives the same result).
        """
        with self._busy:
            return self._backward(dy)

    def _backward(self, dy):
        if self._cache is None:
            raise RuntimeError(
                "backward() called before forward(): there is nothing to differentiate (a "
                "copy, a pickle or a loaded layer keeps no forward, nor do forwards inside "
                "cbn.no_grad())")
        if self._stale is not None:
            # PyTorch raises likewise when a saved tensor was modified in place.
            raise RuntimeError(
                f"{self._stale} was assigned after the forward pass that backward would "
                "differentiate; run forward again (an optimizer step belongs after backward)")
        x_c, mean, var, batch_stats, axis, eps, activation, fingerprint, thread = self._cache
        if thread != threading.get_ident():
            raise RuntimeError(_OTHER_THREAD)
        changed = rewritten(fingerprint, x_c, *self._learned())
        if changed == "input":
            raise RuntimeError(_REWRITTEN)
        if changed:
            raise RuntimeError(
                "gamma or beta was modified in place after the forward pass that backward "
                "would differentiate (a sample of its values changed); run forward again "
                "(an optimizer step belongs after backward)")
        if self.affine:
            gamma, beta = self._gamma, self._beta
            dgamma, dbeta = self._dgamma, self._dbeta
        else:
            gamma, beta, dgamma, dbeta = self._unit_params()
        result = _kernels.backward_call(
            dy, x_c, mean, var, gamma, beta, axis, eps, batch_stats, activation,
            None, self._n_threads, F.PARALLEL_MIN_SIZE, F.STREAM_MIN_BYTES, dgamma, dbeta,
            self._affine, F.ROWS_DX_STREAM_MIN_BYTES,
        )
        if type(result) is tuple:
            return result[0]
        return self._checked_backward(dy, self._cache, (gamma, beta, dgamma, dbeta))

    def _checked_backward(self, dy, cache, params):
        x_c, mean, var, batch_stats, axis, eps, activation = cache[:7]
        gamma, beta, dgamma, dbeta = params
        x3 = channel_view(x_c, axis)[1]
        dy = F._as_float_array(dy, "dy", self.dtype)
        if dy.shape != x_c.shape:
            raise ValueError(f"dy must have the shape of the forward input, {x_c.shape}, got {dy.shape}")
        dy_c, dy3 = view_like(dy, x_c, F.normalize_axis(axis, x_c.ndim))
        dx, dx3 = empty_like_batch(dy_c, x3, dy_c)
        status = _kernels.backward(
            dy3, x3, mean, var, gamma, beta, eps, dx3, dgamma, dbeta,
            batch_stats, self.affine, activation == "relu",
            resolve_threads(self.n_threads, x3.size),
            streams(dx.nbytes, x3.shape[2], backward=True),
        )
        _raise_for_status(
            status,
            "gradient",
            (("gamma", gamma), ("beta", beta)),
        )
        return dx

    # -- copies

    def __getstate__(self):
        """What ``copy.deepcopy`` and ``pickle`` keep: everything but the lock
        (which cannot be copied) and the last forward's cache (a copy is a new
        layer: its backward needs its own forward, as a copied PyTorch module
        has no graph)."""
        state = self.__dict__.copy()
        state["_busy"] = None
        state["_cache"] = None
        state["_stale"] = None
        return state

    def __setstate__(self, state):
        state = dict(state)
        if "_num_batches_tracked" in state:  # pickled by cbn 0.1.0 before the count was an array
            count = state.pop("_num_batches_tracked")
            state["_tracked"] = None if count is None else np.array([count], np.int64)
        self.__dict__.update(state)
        self._busy = _kernels.Guard(_BUSY)

    # -- state

    def state_dict(self):
        """Copies of the layer's state, under PyTorch's names for the statistics.

        Returns
        -------
        dict
            ``gamma``, ``beta`` (if affine), ``running_mean``, ``running_var``
            and ``num_batches_tracked`` (a 0-d int64 array; if tracking).
        """
        state = {}
        with self._busy.shared:  # not torn by a training forward in another thread
            if self.affine:
                state["gamma"] = self._gamma.copy()
                state["beta"] = self._beta.copy()
            if self.track_running_stats:
                state["running_mean"] = self._running_mean.copy()
                state["running_var"] = self._running_var.copy()
                state["num_batches_tracked"] = np.array(self._tracked[0], dtype=np.int64)
        return state

    def load_state_dict(self, state):
        """Load a state from :meth:`state_dict` or from ``torch.nn.BatchNorm*d``.

        PyTorch's ``weight``/``bias`` are accepted for ``gamma``/``beta``, and
        tensors or arrays of any float dtype are converted to the layer's dtype.
        Everything is validated before anything is assigned, so a failed load
        leaves the layer unchanged.

        Raises
        ------
        TypeError
            ``state`` is not a mapping, or a value is not numeric.
        KeyError
            A required key is missing, or an unexpected key is present.
        ValueError
            A value has the wrong shape, is not finite, or is out of range.
        """
        values, tracked = self.check_state_dict(state)
        with self._busy:
            for k, v in values.items():
                getattr(self, "_" + k)[...] = v
            if self.track_running_stats:
                self._tracked[0] = tracked
            self._cache = None

    def check_state_dict(self, state):
        """Validate ``state`` as :meth:`load_state_dict` would, changing nothing.

        Returns
        -------
        values : dict
            The per-channel arrays, cast to the layer's dtype.
        num_batches_tracked : int or None

        Raises
        ------
        TypeError, KeyError, ValueError
            As :meth:`load_state_dict`.
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        state = dict(state)
        for alias, name in (("weight", "gamma"), ("bias", "beta")):
            if alias in state:
                if name in state:
                    raise KeyError(f"state has both {alias!r} and {name!r}")
                state[name] = state.pop(alias)
        expected = []
        if self.affine:
            expected += ["gamma", "beta"]
        if self.track_running_stats:
            expected += ["running_mean", "running_var", "num_batches_tracked"]
        missing = [k for k in expected if k not in state]
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"state does not match this layer: missing keys {missing}, unexpected keys {unexpected}"
            )
        values = {
            k: _checked_vector(state[k], k, self.num_features, self.dtype)
            for k in expected
            if k != "num_batches_tracked"
        }
        tracked = None
        if self.track_running_stats:
            tracked = _checked_count(state["num_batches_tracked"])
        return values, tracked

    def config(self):
        """The constructor arguments, as a dict that ``BatchNorm(**config)`` accepts."""
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "axis": self.axis,
            "dtype": self.dtype.name,
            "activation": self.activation,
            "n_threads": self.n_threads,
        }

    def save(self, path):
        """Save configuration and state to ``path`` (``.npz``, no pickle), atomically.

        The file is written to a temporary name in the same folder and renamed
        over ``path``, so an interrupted save never destroys an existing file.
        Load it with :meth:`BatchNorm.load`.
        """
        with self._busy.shared:  # the configuration and state of one moment
            config, state = self.config(), self.state_dict()
        io.save_object(path, _FORMAT, config, state)

    @classmethod
    def load(cls, path):
        """Create a layer from a file written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            Truncated, corrupt or foreign file, newer format version, or an
            invalid configuration or state (each named in the message).
        """
        config, state = io.load_object(path, _FORMAT, dict)
        return cls.from_config(config, state, path)

    @classmethod
    def from_config(cls, config, state, where="state"):
        """Build a layer from :meth:`config` and load ``state`` into it.

        Any error in either is raised as ``ValueError`` naming ``where``.
        """
        unknown = sorted(set(config) - set(CONFIG_TYPES))
        if unknown:
            raise ValueError(f"{where}: unknown BatchNorm configuration keys {unknown}")
        # Sizes are checked against the stored arrays before anything is
        # allocated: a crafted num_features must not ask for terabytes.
        io.check_config(config, CONFIG_TYPES, where, sizes=("num_features",))
        io.check_state_shapes(state, state_shapes(config), where)
        try:
            layer = cls(**config)
            layer.load_state_dict(state)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: invalid BatchNorm: {exc}") from None
        except MemoryError:
            raise ValueError(f"{where}: a BatchNorm of this size does not fit in memory") from None
        return layer

    def __repr__(self):
        extra = ", activation='relu'" if self.activation else ""
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, dtype={self.dtype.name}{extra})"
        )


_FORMAT = "cbn.BatchNorm"
_INT64_MAX = 2**63 - 1
#: What a saved configuration may hold: key -> the JSON value types it may
#: have (``int`` does not admit ``bool``; see :func:`cbn.io.check_config`).
CONFIG_TYPES = {
    "num_features": int, "eps": (int, float), "momentum": (int, float, type(None)),
    "affine": bool, "track_running_stats": bool, "axis": int, "dtype": str,
    "activation": (str, type(None)), "n_threads": (int, type(None)),
}


def state_shapes(config):
    """Shapes of the arrays a ``BatchNorm`` of ``config`` stores (see :meth:`BatchNorm.state_dict`)."""
    channels = (config["num_features"],)
    shapes = {}
    if config.get("affine", True):
        shapes.update(gamma=channels, beta=channels)
    if config.get("track_running_stats", True):
        shapes.update(running_mean=channels, running_var=channels, num_batches_tracked=())
    return shapes


_BUSY = (
    "this BatchNorm is being used by another thread; a layer holds the state of one "
    "forward/backward at a time, so give each thread its own layer (copy.deepcopy); "
    "only evaluation forwards may run in several threads at once"
)
_OTHER_THREAD = (
    "the last forward of this BatchNorm ran in another thread: a layer keeps one "
    "forward, and backward differentiates it, so give each thread its own layer "
    "(copy.deepcopy)"
)
_REWRITTEN = (
    "the input of the forward pass was modified in place after it (a sample of its values "
    "changed): backward would differentiate other data than the forward normalized. Run "
    "forward again, or pass a copy if the buffer is reused"
)


def rewritten(fingerprint, x, *others):
    """What changed since ``fingerprint = _kernels.sample_bits(x, *others)`` was
    taken at a forward: ``None`` (nothing seen), ``"input"`` (x's sample) or
    ``"others"`` (only theirs: the parameters). Backward's check that it
    differentiates the data and weights the forward ran with (BatchNorm,
    nn.Linear); which array changed is worked out only on a mismatch."""
    if _kernels.sample_bits(x, *others) == fingerprint:
        return None
    x_bits = _kernels.sample_bits(x)
    return "input" if x_bits != fingerprint[:len(x_bits)] else "others"


def _to_numpy(value):
    """An ndarray from an array, a list or a CPU tensor (PyTorch state dicts)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _checked_vector(value, name, channels, dtype):
    """A finite (C,) float vector cast to ``dtype``, or a clear error."""
    F.refuse_masked(value, name)
    try:
        arr = _to_numpy(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array of shape ({channels},): {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {arr.shape}")
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise ValueError(
            f"{name} contains NaN or Inf (as {dtype}) in channel {_nonfinite_channels(cast)}"
        )
    if name == "running_var" and np.any(cast < 0):
        raise ValueError(
            f"running_var must be non-negative, got {float(cast.min())!r} "
            f"(channel {F._channel_list(cast < 0)})"
        )
    return cast


def _checked_count(value):
    F.refuse_masked(value, "num_batches_tracked")
    try:
        arr = _to_numpy(value)
    except Exception as exc:
        raise TypeError(f"num_batches_tracked must be an integer: {exc}") from None
    if arr.shape not in ((), (1,)) or arr.dtype.kind not in "iu":
        raise ValueError(
            f"num_batches_tracked must be a non-negative integer, got {arr.dtype} of shape {arr.shape}"
        )
    n = int(arr.reshape(()))
    if not 0 <= n <= _INT64_MAX:
        raise ValueError(
            f"num_batches_tracked must be a non-negative int64 (as PyTorch stores it), got {n}"
        )
    return n
