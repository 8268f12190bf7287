"""Validated, stateless batch normalization over the compiled kernels.

Every function here checks its arguments, raises ``TypeError``/``ValueError``
with a message that names the argument, the shape or dtype it got and what was
expected, builds the ``(outer, C, inner)`` view that the kernels work on
(copying once if the input's values do not fill one block, in C order or
another order of its axes), allocates outputs laid out as the input is unless
``out=`` is given, and calls ``cbn._kernels`` without the GIL.

Formulas (Ioffe & Szegedy 2015), per channel over the ``m`` values that share
it, ``g`` the incoming gradient (masked by the ReLU when ``activation="relu"``)::

    mean = sum(x) / m
    var  = sum((x - mean)**2) / m                  # biased
    y    = gamma * (x - mean) / sqrt(var + eps) + beta
    dbeta  = sum(g)
    dgamma = sum(g * x_hat)
    dx     = gamma / sqrt(var + eps) * (g - dbeta/m - x_hat * dgamma/m)   # training
    dx     = gamma / sqrt(var + eps) * g                                  # fixed statistics

The statistics are float64 whatever the input dtype; outputs have the input's
dtype. Threads: ``n_threads=1`` (the default) runs one thread, ``None`` picks
by input size (:func:`default_threads`) and ``-1`` uses
every thread OpenMP allows (``OMP_NUM_THREADS``, threadpoolctl). Results are
bit-identical for any thread count.
"""

import math
import numbers
import operator
import os

import numpy as np

from . import _cpu, _kernels

__all__ = [
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_backward",
    "batch_stats",
    "update_running_stats",
    "default_threads",
    "resolve_threads",
    "streams",
    "channel_view",
    "memory_order",
    "set_cache_limit",
    "empty_cache",
    "cache_info",
    "FLOAT_DTYPES",
    "ACTIVATIONS",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ACTIVATIONS = (None, "relu")

# Inputs smaller than this many values run on one thread: below it, waking a
# second thread costs more than it saves (see benchmarks/).
PARALLEL_MIN_SIZE = 1 << 16


def _cache_sizes(base="/sys/devices/system/cpu/cpu0/cache"):
    """``{level: bytes}`` of the data and unified CPU caches Linux reports (sysfs)."""
    sizes = {}
    try:
        entries = os.listdir(base)
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read().strip())
            with open(os.path.join(base, entry, "type")) as f:
                kind = f.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit() and kind != "Instruction":
            sizes[level] = max(sizes.get(level, 0), int(digits) * scale)
    return sizes


def _last_level_cache_bytes(default=32 << 20):
    """Size of the largest CPU cache Linux reports (sysfs), else ``default``."""
    return max(_cache_sizes().values(), default=default)


def _env_bytes(name, default):
    """The integer environment variable ``name`` (bytes, >= 0), else ``default``."""
    env = os.environ.get(name)
    if env is None:
        return default
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {env!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _stream_share(vendor, family, model):
    """``(numerator, denominator)``: the share of the last-level cache from which
    outputs stream on this CPU (see STREAM_MIN_BYTES).

    Three eighths on the AMD EPYC of Zen 4 (family 25, models 0x10-0x1F), where
    streaming 12 MiB outputs measured faster in every setting, with a next layer
    reading an allocated y too; half elsewhere (on the Zen 5 EPYC and a Xeon,
    12 MiB outputs streamed measured 0.86-1.05x with a next layer)."""
    if vendor == "AuthenticAMD" and family == 25 and model is not None and 0x10 <= model <= 0x1F:
        return 3, 8
    return 1, 2


def _stream_min_bytes():
    num, den = _stream_share(*_cpu_model())
    return _env_bytes("CBN_STREAM_MIN_BYTES", _last_level_cache_bytes() * num // den)


def _rows_stream_wins(vendor):
    """Whether outputs over rows were measured faster streamed from a multiple of
    the L2 cache on this CPU, even with a next layer reading them: Intel (see
    ROWS_STREAM_MIN_BYTES)."""
    return vendor == "GenuineIntel"


def _rows_stream_min(name, l2_multiple, default_l2=1 << 20):
    """The threshold in the environment variable ``name``, else the smaller of
    STREAM_MIN_BYTES and ``l2_multiple`` L2 caches where _rows_stream_wins, else
    STREAM_MIN_BYTES."""
    default = _stream_min_bytes()
    if _rows_stream_wins(_cpu_model()[0]):
        default = min(default, l2_multiple * _cache_sizes().get(2, default_l2))
    return _env_bytes(name, default)


def _rows_stream_min_bytes():
    return _rows_stream_min("CBN_ROWS_STREAM_MIN_BYTES", 16)


def _rows_dx_stream_min_bytes():
    return _rows_stream_min("CBN_ROWS_DX_STREAM_MIN_BYTES", 8)


def _group_bytes(default_l2=1 << 20):
    return _env_bytes("CBN_GROUP_BYTES", _cache_sizes().get(2, default_l2) // 8)


def _channel_group_wins(vendor):
    """Whether a backward channel of up to half the L2 cache was measured faster as a
    group by itself on this CPU: Intel, not AMD (see _kernels._group_channels)."""
    return vendor == "GenuineIntel"


def _channel_group_bytes(default_l2=1 << 20):
    l2 = _cache_sizes().get(2, default_l2)
    default = l2 // 2 if _channel_group_wins(_cpu_model()[0]) else 0
    return _env_bytes("CBN_CHANNEL_GROUP_BYTES", default)


def _one_row_bytes(default_l2=1 << 20):
    return _env_bytes("CBN_ONE_ROW_BYTES", 4 * _cache_sizes().get(2, default_l2))


def _cpu_model(path="/proc/cpuinfo"):
    """``(vendor_id, cpu family, model)`` of the first CPU Linux lists (each None
    where it does not say)."""
    fields = _cpu.first_cpu(path)
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    return (fields.get("vendor_id"), int(family) if family.isdigit() else None,
            int(model) if model.isdigit() else None)


def _forward_one_row_wins(vendor, family, model=None):
    """Whether forward's normalize was measured faster one row at a time on this CPU:
    AMD family 26 (Zen 5) and later, not Zen 4 (family 25; see _kernels._one_row)."""
    return vendor == "AuthenticAMD" and family is not None and family >= 26


def _forward_one_row_bytes():
    default = _one_row_bytes() if _forward_one_row_wins(*_cpu_model()) else 0
    return _env_bytes("CBN_FORWARD_ONE_ROW_BYTES", default)


# Outputs of at least this many bytes are written with non-temporal
# ("streaming") stores, which skip reading each output line into the cache
# before overwriting it: a third less memory traffic for a normalize pass, and
# 1.2-1.4x faster on arrays that do not fit in cache (benchmarks/RESULTS.md).
# Below it the output is likely read again soon (by the next layer) while still
# cached, which streaming would forfeit: with an allocated y and a next layer
# that reads it, streaming ran 0.88-1.01x on 1-12 MiB outputs, though 1.07-1.33x
# into cold out= buffers (benchmarks/stream_threshold.py). Default: half the
# last-level cache, as input and output together then exceed it, or three
# eighths on the CPUs where 12 MiB outputs streamed faster even with a next
# layer (_stream_share); the environment variable CBN_STREAM_MIN_BYTES
# overrides it (0: always, a huge value: never).
STREAM_MIN_BYTES = _stream_min_bytes()


# A training backward over feature maps (inner > 1) whose x and dy exceed
# twice this many bytes takes its channels in groups of about this many bytes
# of x and dy: sums, then dx, group by group, so that dx is computed while the
# group is still in the per-core cache instead of reading x and dy from memory
# twice. The same bits either way. Default: an eighth of the L2 cache (256 KiB
# of 2 MiB on the Xeon it was measured on; larger groups lost on some shapes);
# the environment variable CBN_GROUP_BYTES overrides it (0: never).
GROUP_BYTES = _group_bytes()
_kernels.set_group_bytes(GROUP_BYTES)


# A channel beyond that budget whose runs (an image's values of it) are at least
# 3 KiB long and whose x and dy hold at most this many bytes is such a group by
# itself, so that dx reads it from L2. Default: half the L2 cache on Intel CPUs
# (1.0-1.23x cold and 1.08-1.45x in cache on a Xeon with 2 MiB of L2), 0
# elsewhere (a 512 KiB channel lost on an AMD EPYC with 1 MiB of L2); the
# environment variable CBN_CHANNEL_GROUP_BYTES overrides it (0: never).
CHANNEL_GROUP_BYTES = _channel_group_bytes()
_kernels.set_channel_group_bytes(CHANNEL_GROUP_BYTES)


# Backward's dx pass over rows (inner == 1) shorter than 4 KiB whose dy and x
# together exceed this many bytes goes one row at a time in memory order
# (without the fused ReLU) instead of four rows a quarter of the batch apart:
# well past the per-core cache the rows' extra streams ran slower (one row at a
# time 1.04-1.25x on one thread on AMD EPYC Zen 5, alike on Zen 4; see
# _kernels._one_row). The same bits either way. Default: four times the L2
# cache; the environment variable CBN_ONE_ROW_BYTES overrides it (0: never).
ONE_ROW_BYTES = _one_row_bytes()
_kernels.set_one_row_bytes(ONE_ROW_BYTES)

# The same for forward's normalize (x and y), instead of two rows half the
# batch apart. Which wins depends on the CPU: one row at a time ran 1.0-1.42x
# on AMD EPYC Zen 5 but 0.66-0.83x on Zen 4 (one thread, cold data). Default:
# ONE_ROW_BYTES on the CPUs where it was measured to win (AMD family 26 and
# later), else 0 (never); the environment variable CBN_FORWARD_ONE_ROW_BYTES
# overrides it.
FORWARD_ONE_ROW_BYTES = _forward_one_row_bytes()
_kernels.set_one_row_bytes(FORWARD_ONE_ROW_BYTES, forward=True)


# Outputs over rows (inner == 1: (N, C) batches, channels-last maps) stream
# from their own thresholds. On a Xeon, whose large last-level cache gives one
# core little more than memory's bandwidth, streaming beat cached stores, with
# the output allocated per call and read by a next layer or not, on one and two
# threads:
# - forward's y from 32 MiB (16 times its 2 MiB L2): 1.03-1.34x (training and
#   evaluation; 12-24 MiB lost up to 0.84x when a next layer read y);
# - backward's dx from 16 MiB (8 times the L2): 1.03-1.26x (12 MiB: 1.0x).
# Maps in NCHW order measured 0.88-1.09x, so they keep STREAM_MIN_BYTES.
# Defaults: the smaller of STREAM_MIN_BYTES and those multiples of the L2 cache
# on Intel CPUs, STREAM_MIN_BYTES elsewhere; the environment variables
# CBN_ROWS_STREAM_MIN_BYTES and CBN_ROWS_DX_STREAM_MIN_BYTES override them.
ROWS_STREAM_MIN_BYTES = _rows_stream_min_bytes()
ROWS_DX_STREAM_MIN_BYTES = _rows_dx_stream_min_bytes()


def streams(nbytes, inner=0, *, backward=False):
    """Whether an output of ``nbytes`` bytes (forward's y, or with ``backward``
    the dx) is written with streaming stores, for a batch of ``inner`` values
    per (sample, channel) run (1: rows, 0: not said)."""
    if inner != 1:
        return nbytes >= STREAM_MIN_BYTES
    return nbytes >= (ROWS_DX_STREAM_MIN_BYTES if backward else ROWS_STREAM_MIN_BYTES)


# ---------------------------------------------------------------------------
# Reuse of large outputs
# ---------------------------------------------------------------------------
# Outputs of 32 MiB and more (y, dx) live in blocks that, once released, are
# kept for the next output of about their size: glibc's malloc maps such blocks
# afresh every time, and their page faults cost as much as the pass (see
# _kernels, "Reuse of large outputs"). The cache keeps at most 8 blocks and
# CACHE_LIMIT bytes by default (set_cache_limit changes it; cache_info tells the
# limit in force): 1 GiB, or a sixteenth of physical memory if that is less;
# the environment variable CBN_CACHE_BYTES overrides it (0: no cache).


def _physical_memory_bytes(default=16 << 30):
    """The machine's physical memory, else ``default``."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux
        return default


def _cache_limit():
    """The output cache's default limit in bytes (see above)."""
    return _env_bytes("CBN_CACHE_BYTES", min(1 << 30, _physical_memory_bytes() // 16))


CACHE_LIMIT = _cache_limit()


def set_cache_limit(nbytes):
    """Keep at most ``nbytes`` of released large outputs for reuse (0: none).

    Outputs of 32 MiB and more that cbn allocates (``y``, ``dx``) are, once
    freed, kept for the next output of about their size, which then writes
    into memory already mapped instead of page-faulting on every page (as a
    fresh block from ``malloc`` does). Blocks beyond the new limit are freed
    at once, the oldest first. Returns the previous limit.
    """
    if isinstance(nbytes, (bool, np.bool_)):
        raise TypeError(f"nbytes must be an int, got {nbytes!r}")
    try:
        n = operator.index(nbytes)
    except TypeError:
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}") from None
    if n < 0:
        raise ValueError(f"nbytes must be >= 0, got {n}")
    return _kernels.set_cache_limit(min(n, np.iinfo(np.uint64).max))


def empty_cache():
    """Free every cached output block now (as ``torch.cuda.empty_cache``);
    return the bytes freed. Arrays still in use keep their memory."""
    return _kernels.empty_cache()


def cache_info():
    """The output cache: ``blocks`` and ``bytes`` held now, ``limit`` (bytes),
    ``min_bytes`` (the smallest block it keeps) and ``slots`` (most blocks)."""
    return _kernels.cache_info()


_kernels.set_cache_limit(CACHE_LIMIT)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def default_threads(size):
    """Thread count used when ``n_threads=None``, for an input of ``size`` values.

    One thread for small inputs (thread start-up dominates them); otherwise
    every thread OpenMP allows, which honours ``OMP_NUM_THREADS`` and
    threadpoolctl limits.
    """
    if size < PARALLEL_MIN_SIZE:
        return 1
    return _kernels.max_threads()


def resolve_threads(n_threads, size):
    """Turn the ``n_threads`` argument into a positive thread count."""
    if n_threads is None:
        return default_threads(size)
    try:
        if isinstance(n_threads, (bool, np.bool_)):
            raise TypeError
        n = operator.index(n_threads)
    except TypeError:
        raise TypeError(
            f"n_threads must be an int, -1 or None, got {type(n_threads).__name__}"
        ) from None
    if n == -1:
        return _kernels.max_threads()
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, -1 (all) or None (auto), got {n}")
    if n > _kernels.MAX_THREADS:
        raise ValueError(f"n_threads must be at most {_kernels.MAX_THREADS}, got {n}")
    return n


def check_activation(activation):
    """Validate the ``activation`` argument; returns True for a fused ReLU."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _abbrev(value, limit=80):
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts (10**5000)
        text = f"an {type(value).__name__} too long to print"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_eps(eps):
    """Validate ``eps`` (a positive finite float) and return it as a float.

    Bools and strings are refused: ``float(True)`` and ``float("0.1")`` would
    pass a typo silently.
    """
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {eps!r}")
    try:
        value = float(eps)
    except OverflowError:  # an int beyond float's range, 10**400
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a positive finite float, got {_abbrev(eps, 40)}")
    return value


def refuse_masked(value, name):
    """Raise TypeError if ``value`` is a masked array: np.asarray would keep the
    values under the mask, and batch norm (or a parameter, a state, training data)
    would use them as they are. The one check for every public entry point."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array; batch norm has no notion of masked values: "
            f"pass {name}.filled(...) or the unmasked rows"
        )


def _as_float_array(x, name, dtype=None, integers=False):
    """``x`` as an ndarray of float32/float64 (or exactly ``dtype`` if given).

    Python numbers (lists, tuples, scalars) carry no precision of their own
    and take ``dtype`` (NumPy's rule for Python scalars, NEP 50); with
    ``integers``, integer arrays are converted to ``dtype`` too (per-channel
    parameters, as the layer's assignments take them)."""
    refuse_masked(x, name)
    if type(x) is not np.ndarray:
        given = type(x).__name__
        python = isinstance(x, (list, tuple, int, float))
        try:
            # Subclasses (numpy.matrix, memmap) as plain arrays: matrix keeps
            # two dimensions under reshape, which the (outer, C, inner) view needs.
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and other non-arrays
            raise TypeError(f"{name} must be an array, got {type(x).__name__}: {exc}") from None
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be an array of numbers, got {given} (as an "
                            f"array: dtype {x.dtype})")
        if python and dtype is not None and x.dtype.kind in "iuf":
            x = x.astype(dtype)
    if integers and x.dtype.kind in "iu":
        x = x.astype(dtype or np.float64)
    if dtype is not None:
        if x.dtype != dtype:
            whose = "the layer's dtype" if name == "x" else "the dtype of x"
            # NEP 50: a float32 array times a np.float64 scalar is float64
            hint = ("; NumPy 2 makes float64 of a float32 array combined with float64 "
                    "arrays or np.float64 scalars" if x.dtype == np.float64 else "")
            raise TypeError(
                f"{name} has dtype {x.dtype}, expected {dtype} ({whose}); convert it "
                f"with {name}.astype(numpy.{dtype}){hint}"
            )
    elif x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def normalize_axis(axis, ndim, name="axis"):
    """``axis`` as a non-negative index into an ``ndim``-dimensional array."""
    try:
        if isinstance(axis, (bool, np.bool_)):
            raise TypeError
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def memory_order(a):
    """The axes of ``a`` from the slowest-varying in memory to the fastest, if its
    values fill one block in that order without gaps or reversals, else None.

    ``(0, 1, ..., ndim - 1)`` for a C-contiguous array; ``(0, 2, 3, 1)`` for an
    NCHW view of channels-last memory (PyTorch's ``channels_last``), ``(1, 0)``
    for a Fortran-ordered matrix. cbn normalizes such arrays where they lie and
    returns its results in the same layout (NumPy's ``order="K"``).
    """
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))
    strides = a.strides
    order = tuple(sorted(range(a.ndim), key=lambda i: -strides[i]))
    return order if a.transpose(order).flags.c_contiguous else None


def _inverse(order):
    """The permutation that undoes ``order``: ``a.transpose(order).transpose(_inverse(order))``
    is ``a``'s layout again."""
    inverse = [0] * len(order)
    for i, axis in enumerate(order):
        inverse[axis] = i
    return tuple(inverse)


def channel_view(x, axis, name="x", dtype=None, n_features=None, like=None):
    """Validate a batch and return ``(x_c, x3)``.

    ``x_c`` has x's shape and values: ``x`` itself if its values fill one block
    (in any order of the axes: :func:`memory_order`) and it is aligned, else an
    aligned copy in C order. With ``like`` (an ``out=`` array of x's shape that
    fills one block), x must lie as ``like`` does, or is copied into like's
    order. ``x3`` is the ``(outer, C, inner)`` view of x_c's memory that the
    kernels use, split by ``memory_order(x_c)``: outer spans the axes before the
    channels in that order, inner the axes after them (as the kernels' own
    argument checks split it, so both give the same bits).

    Raises
    ------
    TypeError
        ``x`` is not a float32/float64 array (or not ``dtype``).
    ValueError
        ``x`` has fewer than 2 dimensions, no values, or not ``n_features``
        channels along ``axis``.
    """
    x = _as_float_array(x, name, dtype)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch, channels, ...), got shape {x.shape}"
        )
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    if n_features is not None and channels != n_features:
        # torch: "expected 4D input (got 3D input)" for an image without its batch axis
        hint = ("; one example without its batch axis? add it: x[None]"
                if axis != 0 and x.shape[0] == n_features else "")
        raise ValueError(
            f"{name} has {channels} channels along axis {axis} (shape {x.shape}), "
            f"expected {n_features} (num_features){hint}"
        )
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); a batch needs at least one value")
    flags = x.flags
    target = None
    if type(like) is np.ndarray and like.shape == x.shape:
        target = memory_order(like)
    if target is None and flags.c_contiguous and flags.aligned:
        shape = x.shape
        if axis == 1 and len(shape) == 2:  # (N, C): the common case, kept cheap
            return x, x.reshape(shape[0], channels, 1)
        return x, x.reshape(math.prod(shape[:axis]), channels, math.prod(shape[axis + 1 :]))
    if target is None:
        fits = memory_order(x) is not None
        target = tuple(range(x.ndim))
    else:
        fits = x.transpose(target).flags.c_contiguous
    if not (fits and flags.aligned):
        x = _aligned_copy(x.transpose(target)).transpose(_inverse(target))
    return x, _split(x, x, axis)


def _split(a, x_c, axis):
    """The ``(outer, C, inner)`` view of ``a``, laid out as ``x_c`` (equal strides
    on every axis longer than one), split by ``memory_order(x_c)``."""
    order = memory_order(x_c)
    t = a.transpose(order)
    at = order.index(axis)  # where the channels lie in memory order
    shape = t.shape
    return t.reshape(math.prod(shape[:at]), shape[at], math.prod(shape[at + 1 :]))


def view_like(a, x_c, axis):
    """``(a_c, a3)``: ``a`` (of x_c's shape and dtype) laid out as the batch ``x_c``
    from :func:`channel_view` (``a`` itself if it lies so and is aligned, else
    an aligned copy), and its ``(outer, C, inner)`` view, split as x_c's."""
    order = memory_order(x_c)
    if not (a.transpose(order).flags.c_contiguous and a.flags.aligned):
        a = _aligned_copy(a.transpose(order)).transpose(_inverse(order))
    return a, _split(a, x_c, axis)


def empty_like_batch(x_c, x3, other=None):
    """A new array shaped, typed and laid out like ``x_c`` (the batch whose
    ``(outer, C, inner)`` view is ``x3``, from :func:`channel_view`), and its own
    ``(outer, C, inner)`` view; its data placed apart from x3's and ``other``'s
    within the page (see _kernels._fresh)."""
    if x_c.flags.c_contiguous:
        y = _kernels.empty_near(x_c, x3, other)
        return y, y.reshape(x3.shape)
    order = memory_order(x_c)
    base = _kernels.empty_near(x_c.transpose(order), x3, other)
    return base.transpose(_inverse(order)), base.reshape(x3.shape)


def _aligned_copy(x, dtype=None):
    """A C-contiguous copy of ``x`` in freshly allocated (so aligned) memory.

    An array that is not aligned to its dtype (a view at an odd byte offset of
    a buffer) would be undefined behaviour in C, and a crash wherever the
    compiler uses aligned vector loads.
    """
    return np.array(x, dtype=dtype, order="C", copy=True)


def _channel_vector(v, name, channels, dtype, default, axis=None):
    """A per-channel parameter as a C-contiguous, aligned (C,) array of ``dtype``
    (``axis``: x's channel axis, for the message)."""
    if (type(v) is np.ndarray and v.dtype == dtype and v.shape == (channels,)
            and v.flags.c_contiguous and v.flags.aligned):
        return v  # already what the kernels take: the common case, kept cheap
    if v is None:
        return np.full(channels, default, dtype=dtype)
    v = _as_float_array(v, name, integers=True)
    if v.shape != (channels,):
        along = "" if axis is None else f" (one value per channel of x along axis {axis})"
        raise ValueError(f"{name} must have shape ({channels},){along}, got {v.shape}")
    v = np.ascontiguousarray(v, dtype=dtype)
    return v if v.flags.aligned else _aligned_copy(v)


def _check_out(out, x, name="out"):
    """Validate an ``out=`` buffer for a result shaped and typed like ``x``."""
    if not isinstance(out, np.ndarray) or isinstance(out, (np.matrix, np.ma.MaskedArray)):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"{name} must have shape {x.shape} and dtype {x.dtype}, "
            f"got shape {out.shape} and dtype {out.dtype}"
        )
    flags = out.flags
    order = memory_order(x)
    if order is None or not out.transpose(order).flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous or laid out in memory as x is (one block "
            "without gaps or reversals, in any order of the axes)"
        )
    if not flags.aligned:
        raise ValueError(
            f"{name} is not aligned to its dtype {out.dtype} (a view at an odd byte "
            "offset); pass an array numpy allocated, or no out="
        )
    if not flags.writeable:
        raise ValueError(f"{name} is read-only")


def _same_buffer(a, b):
    """Whether ``a`` and ``b`` (of one shape) are the same memory, element for
    element: the same start and strides (on axes longer than one, which alone
    take room)."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and all(sa == sb for sa, sb, n in zip(a.strides, b.strides, a.shape) if n > 1)
    )


def _stats_vectors(mean, var, channels, axis=None):
    """Running or given statistics as float64 (C,) arrays.

    A negative ``var`` is found by the kernel, in the pass that reads it
    anyway (status ``NEGATIVE_VAR``), which saves a NumPy comparison per call.
    None is refused: unlike gamma and beta, statistics have no neutral default
    (mean 0 and var 1 would silently normalize with made-up numbers).
    """
    if mean is None or var is None:
        missing = " and ".join(n for n, v in (("mean", mean), ("var", var)) if v is None)
        raise TypeError(f"{missing} must be given (the statistics to normalize with), got None")
    mean = _channel_vector(mean, "mean", channels, np.float64, 0.0, axis)
    var = _channel_vector(var, "var", channels, np.float64, 1.0, axis)
    return mean, var


# ---------------------------------------------------------------------------
# Error reporting of kernel status codes
# ---------------------------------------------------------------------------


def _channel_list(mask):
    """The channels where ``mask`` holds, as text (the first eight)."""
    idx = np.flatnonzero(mask)
    return ", ".join(str(i) for i in idx[:8]) + (", ..." if idx.size > 8 else "")


def _nonfinite_channels(*vectors):
    bad = np.zeros(vectors[0].shape, dtype=bool)
    for v in vectors:
        bad |= ~np.isfinite(v)
    return _channel_list(bad)


def _raise_for_status(status, what, params=(), eps=None, dtype=None):
    """Raise the exception that a kernel status code stands for.

    ``what`` names the result ("output" or "gradient"); ``params`` are the
    ``(name, array)`` pairs that could be to blame besides the batch itself;
    ``eps`` and ``dtype``, if given, let the message name an eps too small
    for the dtype.
    """
    if status == _kernels.OK:
        return
    if status == _kernels.NO_MEMORY:
        raise MemoryError(f"cbn: out of memory for the per-channel scratch of the {what}")
    if status == _kernels.NEGATIVE_VAR:
        for name, value in params:
            if name.endswith("var"):
                raise ValueError(
                    f"{name} must be non-negative, got {float(value[value < 0].min())!r} (channel "
                    f"{_channel_list(value < 0)})"
                )
        raise ValueError("var must be non-negative")
    for name, value in params:
        if value is not None and not np.all(np.isfinite(value)):  # None: gamma/beta absent
            raise FloatingPointError(
                f"{name} contains NaN or Inf (channel {_nonfinite_channels(value)}), "
                f"so the {what} would not be finite"
            )
    if status == _kernels.NONFINITE_PARAM_GRAD:
        raise FloatingPointError(
            "dgamma or dbeta is not finite in the dtype of x: the sums of dy (and of "
            "dy * x_hat) over the batch overflow it; dgamma and dbeta were left unchanged"
        )
    if eps is not None and dtype is not None and 1.0 / math.sqrt(eps) > float(np.finfo(dtype).max):
        raise FloatingPointError(
            f"the {what} is not finite: 1/sqrt(eps) = {1.0 / math.sqrt(eps):.3g} overflows "
            f"{np.dtype(dtype)}, so a channel of constant values has no finite normalization; "
            f"use a larger eps (eps={eps!r}) or float64"
        )
    inputs = "x" if what == "output" else "dy or x"
    raise FloatingPointError(
        f"the {what} is not finite: {inputs} contains NaN or Inf, or a value on the way "
        "overflows the dtype (the result, or x - mean for values of both signs near its "
        "largest); float64 holds larger values"
    )


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def batch_stats(x, *, axis=1, n_threads=1):
    """Per-channel mean and biased variance of a batch.

    Parameters
    ----------
    x : ndarray of float32 or float64, at least 2-d, any layout
        The batch; ``axis`` is its channel axis.
    axis : int
        Channel axis: ``1`` for ``(N, C, *)``, ``-1`` for channels-last.
    n_threads : int or None

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
        ``var`` is the biased variance (divides by m), computed in one pass
        with shifted block sums merged pairwise (never ``E[x^2] - E[x]^2``).

    Raises
    ------
    FloatingPointError
        x contains NaN or Inf (or values whose square overflows float64).
    """
    x_c, x3 = channel_view(x, axis)
    channels = x3.shape[1]
    mean = np.empty(channels)
    var = np.empty(channels)
    status = _kernels.batch_stats(x3, mean, var, resolve_threads(n_threads, x3.size))
    _raise_for_status(status, "batch statistics")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        raise FloatingPointError(
            "the batch statistics are not finite: x contains NaN or Inf (or values whose "
            f"square overflows) in channel {_nonfinite_channels(mean, var)}"
        )
    return mean, var


def batch_norm_train(
    x, gamma=None, beta=None, *, axis=1, eps=1e-5, activation=None, out=None, n_threads=1
):
    """Training forward pass: normalize with the statistics of the batch itself.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, then
    ``max(y, 0)`` when ``activation="relu"``.

    Parameters
    ----------
    x : ndarray of float32 or float64, at least 2-d, any layout, may be read-only
        The batch, with ``C`` channels along ``axis`` and more than one value
        per channel.
    gamma, beta : array_like of shape (C,), optional
        Scale and shift (default 1 and 0), converted to x's dtype.
    axis : int
        Channel axis (1 for ``(N, C, *)``, -1 for channels-last).
    eps : float
        Added to the variance for numerical stability.
    activation : None or "relu"
        Fused activation applied in the same pass.
    out : ndarray, optional
        Writable array of x's shape and dtype to write y into, C-contiguous or
        laid out in any other order of the axes without gaps (the pass runs in
        its order; x is copied into it if x lies otherwise); may be ``x`` itself.
    n_threads : int or None

    Returns
    -------
    y : ndarray, shape and dtype of x, laid out as x if x's values fill one block
        in some order of its axes (:func:`memory_order`), else C-contiguous
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased variance, which :func:`batch_norm_backward` needs.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments (messages name the argument).
    FloatingPointError
        The batch statistics or the output are not finite (NaN or Inf in x,
        gamma or beta). x is never changed by a failed call (in place
        neither), but a separate ``out=`` may hold part of an output: large
        float64 batches are taken a group of channels at a time, and the
        groups with finite statistics are written.
    """
    result = _kernels.train_call(x, gamma, beta, axis, eps, activation, out, n_threads,
                                 PARALLEL_MIN_SIZE, STREAM_MIN_BYTES,
                                 rows_stream_min=ROWS_STREAM_MIN_BYTES)
    if type(result) is tuple:
        return result
    if result is not None and result != _kernels.NONFINITE_STATS:
        _raise_for_status(result, "output", (("gamma", gamma), ("beta", beta)),
                          eps, x.dtype)
    # Arguments that need checking or converting; or non-finite statistics,
    # which left y unwritten and which the checked path names by channel.
    return _checked_train(x, gamma, beta, axis, eps, activation, out, n_threads)


def _checked_train(x, gamma, beta, axis, eps, activation, out, n_threads):
    """:func:`batch_norm_train` for arguments that need validation or conversion."""
    relu = check_activation(activation)
    eps = check_eps(eps)
    x_c, x3 = channel_view(x, axis, like=out)
    channels = x3.shape[1]
    if x3.shape[0] * x3.shape[2] < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape {x_c.shape}"
        )
    gamma = _channel_vector(gamma, "gamma", channels, x_c.dtype, 1.0, axis)
    beta = _channel_vector(beta, "beta", channels, x_c.dtype, 0.0, axis)
    y, y3 = _result(out, x_c, x3, sources=(x_c,))
    mean = np.empty(channels)
    var = np.empty(channels)
    status = _kernels.forward_train(
        x3, y3, gamma, beta, eps, mean, var, relu, resolve_threads(n_threads, x3.size),
        streams(y.nbytes, x3.shape[2]),
    )
    if status == _kernels.NONFINITE_STATS:
        raise FloatingPointError(
            "the batch statistics are not finite: x contains NaN or Inf (or values whose "
            f"square overflows) in channel {_nonfinite_channels(mean, var)}"
        )
    _raise_for_status(status, "output", (("gamma", gamma), ("beta", beta)), eps, x_c.dtype)
    return y, mean, var


def batch_norm_eval(
    x,
    mean,
    var,
    gamma=None,
    beta=None,
    *,
    axis=1,
    eps=1e-5,
    activation=None,
    out=None,
    n_threads=1,
):
    """Evaluation forward pass: normalize with given (running) statistics.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, then
    ``max(y, 0)`` when ``activation="relu"``. A batch of one is fine here.

    Parameters
    ----------
    x : ndarray of float32 or float64, at least 2-d, any layout
    mean, var : array_like of shape (C,)
        Statistics to normalize with (any float dtype; used in float64).
    gamma, beta, axis, eps, activation, out, n_threads
        As in :func:`batch_norm_train`.

    Returns
    -------
    y : ndarray, shape and dtype of x

    Raises
    ------
    ValueError
        Some ``var`` is negative (nothing is written), or another invalid argument.
    FloatingPointError
        x, the statistics, gamma or beta contain NaN or Inf.
    """
    y = _kernels.eval_call(x, mean, var, gamma, beta, axis, eps, activation, out, n_threads,
                           PARALLEL_MIN_SIZE, STREAM_MIN_BYTES,
                           rows_stream_min=ROWS_STREAM_MIN_BYTES)
    if y is None:  # arguments that need checking or converting
        return _checked_eval(x, mean, var, gamma, beta, axis, eps, activation, out, n_threads)
    if type(y) is int:
        _raise_for_status(y, "output", (("mean", mean), ("var", var), ("gamma", gamma),
                                        ("beta", beta)), eps, x.dtype)
    return y


def _checked_eval(x, mean, var, gamma, beta, axis, eps, activation, out, n_threads):
    """:func:`batch_norm_eval` for arguments that need validation or conversion."""
    relu = check_activation(activation)
    eps = check_eps(eps)
    x_c, x3 = channel_view(x, axis, like=out)
    channels = x3.shape[1]
    mean, var = _stats_vectors(mean, var, channels, axis)
    gamma = _channel_vector(gamma, "gamma", channels, x_c.dtype, 1.0, axis)
    beta = _channel_vector(beta, "beta", channels, x_c.dtype, 0.0, axis)
    y, y3 = _result(out, x_c, x3, sources=(x_c,))
    status = _kernels.forward_eval(
        x3, y3, mean, var, gamma, beta, eps, relu, resolve_threads(n_threads, x3.size),
        streams(y.nbytes, x3.shape[2]),
    )
    _raise_for_status(
        status,
        "output",
        (("mean", mean), ("var", var), ("gamma", gamma), ("beta", beta)),
        eps,
        x_c.dtype,
    )
    return y


def batch_norm_backward(
    dy,
    x,
    mean,
    var,
    gamma=None,
    beta=None,
    *,
    axis=1,
    eps=1e-5,
    training=True,
    activation=None,
    out=None,
    n_threads=1,
):
    """Backward pass: gradients with respect to x, gamma and beta.

    With ``training=True`` the gradient flows through the batch statistics
    (``mean``, ``var`` must be the ones :func:`batch_norm_train` returned for
    ``x``); with ``training=False`` they are constants (evaluation mode,
    frozen statistics for fine-tuning).

    Parameters
    ----------
    dy : ndarray, shape and dtype of x
        Gradient of the loss with respect to the output y.
    x : ndarray
        The input of the forward pass.
    mean, var : array_like of shape (C,)
        Statistics the forward pass normalized with (``var`` biased).
    gamma, beta : array_like of shape (C,), optional
        As in the forward pass (beta matters only for the ReLU mask).
    training : bool, default True
        Whether the forward pass normalized with the batch's own statistics
        (the gradient then flows through them) or with fixed ones.
    axis, eps, activation, n_threads
        As in the forward pass.
    out : ndarray, optional
        Buffer for dx (may be ``dy`` itself).

    Returns
    -------
    dx : ndarray, shape and dtype of x
    dgamma, dbeta : ndarray of shape (C,), dtype of x

    Raises
    ------
    ValueError
        Some ``var`` is negative (nothing is written), or another invalid argument.
    FloatingPointError
        dy, x, the statistics, gamma or beta contain NaN or Inf.
    """
    result = _kernels.backward_call(dy, x, mean, var, gamma, beta, axis, eps, training,
                                    activation, out, n_threads, PARALLEL_MIN_SIZE,
                                    STREAM_MIN_BYTES,
                                    rows_stream_min=ROWS_DX_STREAM_MIN_BYTES)
    if result is None:  # arguments that need checking or converting
        return _checked_backward(dy, x, mean, var, gamma, beta, axis, eps, training,
                                 activation, out, n_threads)
    if type(result) is int:
        _raise_for_status(result, "gradient", (("mean", mean), ("var", var),
                                               ("gamma", gamma), ("beta", beta)))
    return result


def _checked_backward(dy, x, mean, var, gamma, beta, axis, eps, training, activation, out,
                      n_threads):
    """:func:`batch_norm_backward` for arguments that need validation or conversion."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    relu = check_activation(activation)
    eps = check_eps(eps)
    x_c, x3 = channel_view(x, axis, like=out)
    dy_c, dy3 = _matching_gradient(dy, x_c, axis)
    channels = x3.shape[1]
    if training and x3.shape[0] * x3.shape[2] < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape {x_c.shape}"
        )
    mean, var = _stats_vectors(mean, var, channels, axis)
    gamma = _channel_vector(gamma, "gamma", channels, x_c.dtype, 1.0, axis)
    beta = _channel_vector(beta, "beta", channels, x_c.dtype, 0.0, axis)
    dx, dx3 = _result(out, x_c, x3, name="out", sources=(dy_c, x_c))
    dgamma = np.empty(channels, dtype=x_c.dtype)
    dbeta = np.empty(channels, dtype=x_c.dtype)
    status = _kernels.backward(
        dy3, x3, mean, var, gamma, beta, eps, dx3, dgamma, dbeta,
        bool(training), True, relu, resolve_threads(n_threads, x3.size),
        streams(dx.nbytes, x3.shape[2], backward=True),
    )
    _raise_for_status(
        status,
        "gradient",
        (("mean", mean), ("var", var), ("gamma", gamma), ("beta", beta)),
    )
    return dx, dgamma, dbeta


def update_running_stats(running_mean, running_var, mean, var, count, factor):
    """Fold batch statistics into running statistics, in place.

    ``running = (1 - factor) * running + factor * batch``, where the variance
    folded in is the unbiased ``var * count / (count - 1)`` (PyTorch's rule).

    Parameters
    ----------
    running_mean, running_var : ndarray of float32 or float64, shape (C,), C-contiguous, writable
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased variance.
    count : int
        Values per channel in the batch (must be > 1).
    factor : float
        ``momentum``, or ``1 / num_batches_tracked`` for a cumulative average.
    """
    _check_running_pair(running_mean, running_var)
    if mean is None or var is None:
        raise TypeError("mean and var must be the batch statistics, got None")
    _check_apart(running_mean, running_var, mean, var)
    mean, var = _stats_vectors(mean, var, running_mean.shape[0])
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if bad.any():
        raise FloatingPointError(
            f"mean or var is not finite in channel {_channel_list(bad)}; "
            "the running statistics were left unchanged"
        )
    if np.any(var < 0):
        raise ValueError(
            f"var must not be negative, got {float(var.min())!r} in channel {_channel_list(var < 0)}"
        )
    count = _real_number(count, "count")
    if not count > 1:
        raise ValueError(f"count must be > 1 to unbias the variance, got {count}")
    factor = _real_number(factor, "factor")
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"factor must be in [0, 1], got {factor}")
    if _kernels.ema_update(running_mean, running_var, mean, var, count, factor):
        raise FloatingPointError(
            f"the running statistics would not be finite in {running_mean.dtype} "
            "(the batch variance overflows it); they were left unchanged"
        )


def _check_apart(running_mean, running_var, mean, var):
    """The arrays update_running_stats writes must not overlap each other or its
    inputs: one array for both statistics took both updates, silently."""
    named = (("running_mean", running_mean), ("running_var", running_var), ("mean", mean),
             ("var", var))
    for i, (a_name, a) in enumerate(named[:2]):
        for b_name, b in named[i + 1:]:
            if isinstance(b, np.ndarray) and np.may_share_memory(a, b):
                raise ValueError(
                    f"{a_name} and {b_name} overlap in memory; "
                    f"{a_name} is updated in place and needs an array of its own")


def _check_running_pair(running_mean, running_var):
    """Validate the running statistics that update_running_stats writes in place."""
    for name, arr in (("running_mean", running_mean), ("running_var", running_var)):
        if type(arr) is not np.ndarray:
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
        if arr.dtype not in FLOAT_DTYPES or not arr.dtype.isnative:
            raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional (C,), got shape {arr.shape}")
        flags = arr.flags
        if not flags.aligned:
            raise ValueError(f"{name} is not aligned to its dtype {arr.dtype}")
        if not (flags.c_contiguous and flags.writeable):
            raise ValueError(f"{name} must be C-contiguous and writable (it is updated in place)")
    if running_var.dtype != running_mean.dtype:
        raise TypeError(
            f"running_var has dtype {running_var.dtype}, expected {running_mean.dtype} "
            "(the dtype of running_mean)"
        )
    if running_var.shape != running_mean.shape:
        raise ValueError(
            f"running_var has shape {running_var.shape}, expected {running_mean.shape} "
            "(the shape of running_mean)"
        )


def _real_number(value, name):
    """``value`` as a float, refusing bools and non-numbers by name."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range: 2**2000
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {_abbrev(value, 40)}")
    return number


def _result(out, x_c, x3, name="out", sources=()):
    """The output array and its (outer, C, inner) view: ``out`` or a fresh array."""
    if out is None:
        # Placed apart from the inputs within its page (see _kernels._fresh).
        other = next((src for src in sources if src is not x_c), None)
        return empty_like_batch(x_c, x3, other)
    else:
        _check_out(out, x_c, name)
        for src in sources:
            # Elementwise kernels may write over their own input, but not over
            # an input shifted against the output: that would read half-written data.
            if out is not src and np.may_share_memory(out, src) and not _same_buffer(out, src):
                raise ValueError(f"{name} overlaps an input without being the same array")
        y = out
    return y, y.transpose(memory_order(x_c)).reshape(x3.shape)  # laid out as x_c: a view


def _matching_gradient(dy, x_c, axis):
    """Validate dy against x: same shape and dtype; returns ``(dy_c, dy3)``, dy
    laid out and split as x_c (see :func:`view_like`)."""
    dy = _as_float_array(dy, "dy")
    if dy.shape != x_c.shape:
        raise ValueError(f"dy must have the shape of x, {x_c.shape}, got {dy.shape}")
    if dy.dtype != x_c.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}, expected {x_c.dtype} (the dtype of x)")
    return view_like(dy, x_c, normalize_axis(axis, x_c.ndim))
