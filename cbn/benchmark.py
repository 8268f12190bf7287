"""Benchmark engine: cbn against the memory-bandwidth limit, NumPy and PyTorch.

Run it as ``python -m cbn bench``, ``cbn bench`` or ``python benchmarks/bench.py``
(``--help`` lists the options). Everything runs in one process:

1. Copy bandwidth: ``np.copyto`` of a 256 MiB array (one thread, and two Python
   threads each copying half) and, for every case, of an array of the case's
   size, with the same input rotation as the case. Bytes read plus bytes
   written count, so a copy of ``n`` bytes moves ``2 n``.
2. For every shape x dtype x thread count x op, the median time of:

   - ``cbn``: :mod:`cbn.functional`; the forwards write into preallocated
     ``out=`` buffers, the backward allocates dx, as torch's does;
   - ``layer``: a :class:`cbn.BatchNorm` call (allocates its output as users
     see it; its backward is timed right after the forward that feeds it);
   - ``numpy``: :mod:`cbn.reference`, the textbook NumPy formulas (the
     backward takes the batch statistics as given, as a framework caching
     them from the forward would);
   - ``torch``: PyTorch's CPU kernel when torch is installed:
     ``aten::native_batch_norm.out`` (what ``F.batch_norm`` calls, into a
     preallocated output, like cbn's ``out=``) for both forwards and
     ``aten::native_batch_norm_backward`` for the backward (which allocates
     dx: torch's ``.out`` overload of it is a composite that computes into a
     temporary and copies, measured 1.1-1.3x slower), with
     ``torch.set_num_threads`` matching. Channels-last inputs are given to
     torch as ``torch.channels_last`` tensors over the same memory.

3. A small layer step: a (64, 100) float32 ``BatchNorm`` forward + backward,
   against ``torch.nn.BatchNorm1d`` forward + autograd backward.

Byte model (the minimum memory traffic of each op, ``n`` = bytes of x):
training forward reads x twice and writes y (3 n); evaluation reads x and
writes y (2 n); backward reads x and dy twice and writes dx (5 n). Effective
GB/s is that traffic over the median time, and "frac of copy" divides it by
the same-size copy bandwidth.

Honesty: each timed call is preceded by warm-up calls; the repeat count adapts
to about ``target_time`` seconds per case (at least ``min_repeats``); the
median of individually timed calls is reported. The implementations of a case
are timed in alternating rounds (``rounds``, default 5), so that drift in the
machine's speed falls on all of them alike rather than on their ratio. When an
array is smaller than twice the last-level cache, the inputs and outputs rotate
through enough buffers to span twice the cache, so that caches do not flatter.
Allocations are recycled from glibc's heap, at fixed thresholds and with mmap off
(:func:`steady_allocator`), so no implementation pays page faults that another's
frees caused. Threads:
cbn through ``n_threads``, NumPy through threadpoolctl, torch through
``torch.set_num_threads``. The process drops ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` from its environment, re-executing itself if they were
set (they take effect when NumPy loads OpenBLAS), and records what
threadpoolctl reports and the machine it ran on.
"""

import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np

import cbn
from cbn import functional as F
from cbn import reference

__all__ = [
    "OPS",
    "DTYPES",
    "DEFAULT_SHAPES",
    "QUICK_SHAPES",
    "BYTE_MODEL",
    "CLEANED_ENV_VARS",
    "ShapeSpec",
    "BenchConfig",
    "Timing",
    "parse_shape",
    "default_threads",
    "time_calls",
    "time_interleaved",
    "copy_bandwidth",
    "machine_info",
    "run_benchmark",
    "small_step",
    "check_targets",
    "format_table",
    "format_report",
    "plot_results",
    "build_parser",
    "config_from_args",
    "main",
]

OPS = ("fwd-train", "fwd-eval", "backward")
DTYPES = ("float32", "float64")
#: Bytes of memory traffic per byte of x, for each op (see the module docstring).
BYTE_MODEL = {"fwd-train": 3, "fwd-eval": 2, "backward": 5}
#: Environment variables the benchmark removes from its own environment.
CLEANED_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REEXEC_MARK = "_CBN_BENCH_REEXEC"

DEFAULT_SHAPES = (
    "256x1024",
    "4096x256",
    "65536x64",
    "32x4096",
    "32x64x56x56",
    "8x256x28x28",
    "64x16x32x32",
    "32x56x56x64:nhwc",
)
QUICK_SHAPES = ("256x1024", "64x16x32x32", "16x32x32x16:nhwc")

EPS = 1e-5
MIB = 1 << 20
LARGE_COPY_BYTES = 256 * MIB
SMALL_STEP_SHAPE = (64, 100)
#: A measurement whose median exceeds this multiple of its fastest call is flagged noisy.
NOISY_RATIO = 2.0

# Target thresholds of issue 4.
TARGET_COPY_FRACTION = 0.8
TARGET_COPY_MIN_BYTES = 16 * MIB
TARGET_NCHW_TRAIN_VS_TORCH = 3.0
TARGET_VS_NUMPY_MEDIAN = 5.0
TARGET_THREAD_SCALING = 1.6
TARGET_SCALING_MIN_BYTES = 4 * MIB
TARGET_SMALL_STEP_US = 30.0

_LAYOUT_NAMES = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
_CL_LAYOUT_NAMES = {3: "NLC", 4: "NHWC", 5: "NDHWC"}


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """A benchmark shape: the NumPy array shape and where its channels are.

    Attributes
    ----------
    shape : tuple of int
        Shape of the NumPy array (channels last for a channels-last spec).
    channels_last : bool
        True if the channel axis is the last one (``axis=-1``).
    """

    shape: tuple
    channels_last: bool = False

    @property
    def axis(self):
        """The channel axis passed to cbn (1, or -1 for channels-last)."""
        return -1 if self.channels_last else 1

    @property
    def channels(self):
        """Number of channels C."""
        return self.shape[self.axis]

    @property
    def inner(self):
        """Values per (sample, channel) run in memory: 1 for (N, C) and channels-last
        arrays (rows), H*W... for NCHW ones."""
        return 1 if self.channels_last else math.prod(self.shape[2:])

    @property
    def layout(self):
        """Layout label: NC, NCHW, NHWC, ..."""
        names = _CL_LAYOUT_NAMES if self.channels_last else _LAYOUT_NAMES
        return names.get(len(self.shape), "channels-last" if self.channels_last else "N,C,*")

    @property
    def name(self):
        """The spec as written on the command line, e.g. ``32x56x56x64:nhwc``."""
        base = "x".join(str(d) for d in self.shape)
        return base + (":nhwc" if self.channels_last else "")

    def nbytes(self, dtype):
        """Bytes of one array of this shape and ``dtype``."""
        return math.prod(self.shape) * np.dtype(dtype).itemsize


def parse_shape(text):
    """Parse a shape spec such as ``256x1024``, ``32x64x56x56`` or ``32x56x56x64:nhwc``.

    The channel axis is 1, or the last axis with a ``:nhwc`` (or ``:cl``,
    ``:channels-last``) suffix.

    Returns
    -------
    ShapeSpec

    Raises
    ------
    ValueError
        The text is not a shape of two or more positive integers.
    """
    spec = text.strip().lower()
    channels_last = False
    if ":" in spec:
        spec, suffix = spec.split(":", 1)
        if suffix not in ("nhwc", "cl", "channels-last", "channels_last", "nlc", "ndhwc"):
            raise ValueError(f"unknown layout suffix {suffix!r} in shape {text!r} (use :nhwc)")
        channels_last = True
    try:
        dims = tuple(int(d) for d in spec.replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not like 256x1024 or 32x56x56x64:nhwc") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"shape {text!r} needs at least 2 positive dimensions")
    return ShapeSpec(dims, channels_last)


def default_threads():
    """Thread counts benchmarked by default: 1, 2 and all usable cores if more."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        ncpu = os.cpu_count() or 1
    return [1, 2] + ([ncpu] if ncpu > 2 else [])


@dataclasses.dataclass
class BenchConfig:
    """What to measure and how hard.

    Attributes
    ----------
    shapes : list of ShapeSpec
    dtypes : list of str
        Subset of ``DTYPES``.
    threads : list of int
    ops : list of str
        Subset of ``OPS``.
    target_time : float
        Seconds of timed calls to aim for per measurement.
    min_repeats, max_repeats : int
        Bounds on the number of timed calls per measurement.
    warmup : int
        Untimed calls before timing.
    cache_bytes : int
        Last-level cache size; arrays smaller than twice this rotate
        through enough buffers to span twice it.
    max_buffers : int
        Upper bound on the rotation set.
    rounds : int
        Alternating rounds per case (see :func:`time_interleaved`).
    peers : tuple of str
        Which of ``"layer"``, ``"numpy"``, ``"torch"`` to measure beside cbn.
    small_step : bool
        Measure the (64, 100) layer step.
    large_copy_bytes : int
        Size of the large copy-bandwidth array (0 skips it).
    """

    shapes: list
    dtypes: list = dataclasses.field(default_factory=lambda: list(DTYPES))
    threads: list = dataclasses.field(default_factory=default_threads)
    ops: list = dataclasses.field(default_factory=lambda: list(OPS))
    target_time: float = 0.2
    min_repeats: int = 5
    max_repeats: int = 2000
    warmup: int = 2
    cache_bytes: int = 32 * MIB
    max_buffers: int = 256
    rounds: int = 5
    peers: tuple = ("layer", "numpy", "torch")
    small_step: bool = True
    large_copy_bytes: int = LARGE_COPY_BYTES


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Result of :func:`time_calls`.

    Attributes
    ----------
    median, minimum : float
        Median and fastest call, seconds.
    repeats : int
        Number of timed calls.
    """

    median: float
    minimum: float
    repeats: int

    def as_dict(self):
        """JSON-ready form: ``median_s``, ``min_s``, ``repeats``."""
        return {"median_s": self.median, "min_s": self.minimum, "repeats": self.repeats}


def time_calls(fn, n_buffers=1, *, target_time=0.2, min_repeats=5, max_repeats=2000,
               warmup=2, setup=None):
    """Time ``fn(i)`` call by call, rotating ``i`` over ``range(n_buffers)``.

    Parameters
    ----------
    fn : callable taking the buffer index
    n_buffers : int
        Size of the rotation set.
    target_time : float
        Aim for about this many seconds of timed calls.
    min_repeats, max_repeats : int
        Bounds on the number of timed calls.
    warmup : int
        Untimed calls first (at least one, which also estimates the cost).
    setup : callable taking the buffer index, optional
        Run, untimed, before each call.

    Returns
    -------
    Timing
    """
    return time_interleaved({"fn": (fn, setup)}, n_buffers, rounds=1, target_time=target_time,
                            min_repeats=min_repeats, max_repeats=max_repeats,
                            warmup=warmup)["fn"]


def time_interleaved(fns, n_buffers=1, *, rounds=5, target_time=0.2, min_repeats=5,
                     max_repeats=2000, warmup=2):
    """Time several implementations of one case in alternating rounds.

    The machine's speed drifts over seconds (other tenants, memory placement),
    so timing one implementation after another would charge that drift to
    their ratio. Each round times every implementation in turn for
    ``target_time / rounds`` seconds; the median is over all calls of all rounds.

    Parameters
    ----------
    fns : dict
        Name -> ``(fn, setup)``, as for :func:`time_calls` (``setup`` may be None).
    n_buffers : int
        Size of the rotation set.
    rounds : int
        Number of alternating rounds (at least 1).
    target_time, min_repeats, max_repeats, warmup
        As for :func:`time_calls`, per implementation, summed over the rounds.

    Returns
    -------
    dict
        Name -> :class:`Timing`.
    """
    clock = time.perf_counter
    rounds = max(1, int(rounds))
    state = {}
    k = 0  # one rotation for all: no call finds the buffers its predecessor warmed
    for name, (fn, setup) in fns.items():
        estimate = 0.0
        for _ in range(max(1, warmup)):
            i = k % n_buffers
            if setup is not None:
                setup(i)
            t0 = clock()
            fn(i)
            estimate = clock() - t0
            k += 1
        total = int(min(max_repeats,
                        max(min_repeats, math.ceil(target_time / max(estimate, 1e-7)))))
        state[name] = {"total": total, "times": []}
    for r in range(rounds):
        for name, (fn, setup) in fns.items():
            st = state[name]
            # the total split over the rounds: it sums to exactly `total`
            n_calls = st["total"] * (r + 1) // rounds - st["total"] * r // rounds
            for _ in range(n_calls):
                i = k % n_buffers
                if setup is not None:
                    setup(i)
                t0 = clock()
                fn(i)
                st["times"].append(clock() - t0)
                k += 1
    return {name: Timing(statistics.median(st["times"]), min(st["times"]), len(st["times"]))
            for name, st in state.items()}


def _n_buffers(nbytes, config):
    """How many buffers to rotate through for arrays of ``nbytes``."""
    span = 2 * config.cache_bytes
    if nbytes >= span:
        return 1
    return int(min(config.max_buffers, max(2, math.ceil(span / nbytes))))


def copy_bandwidth(nbytes, threads=1, *, n_buffers=1, target_time=0.2, min_repeats=5,
                   max_repeats=2000):
    """Copy bandwidth of ``np.copyto`` on float64 arrays of about ``nbytes``.

    With ``threads > 1`` the array is split in equal parts copied by that many
    Python threads (``np.copyto`` releases the GIL).

    Returns
    -------
    dict
        ``gbps`` (bytes read + written over the median time, 1e9 bytes/s),
        ``median_s``, ``repeats``, ``nbytes``, ``threads``.
    """
    n = max(1, nbytes // 8)
    src = [np.full(n, 1.5) for _ in range(n_buffers)]
    dst = [np.zeros(n) for _ in range(n_buffers)]
    if threads <= 1:
        def fn(i):
            np.copyto(dst[i], src[i])
        timing = time_calls(fn, n_buffers, target_time=target_time,
                            min_repeats=min_repeats, max_repeats=max_repeats)
    else:
        bounds = np.linspace(0, n, threads + 1).astype(int)
        parts = list(zip(bounds[:-1], bounds[1:]))
        with ThreadPoolExecutor(threads) as pool:
            def fn(i):
                s, d = src[i], dst[i]
                list(pool.map(lambda p: np.copyto(d[p[0]:p[1]], s[p[0]:p[1]]), parts))
            timing = time_calls(fn, n_buffers, target_time=target_time,
                                min_repeats=min_repeats, max_repeats=max_repeats)
    return {
        "gbps": 2 * n * 8 / timing.median / 1e9,
        "median_s": timing.median,
        "repeats": timing.repeats,
        "nbytes": n * 8,
        "threads": threads,
    }


# ---------------------------------------------------------------------------
# Environment and machine
# ---------------------------------------------------------------------------


def _clean_env_and_reexec(argv):
    """Re-execute this benchmark without the OpenBLAS tuning variables if set.

    They only take effect when NumPy loads OpenBLAS, which has already
    happened by the time this module runs, hence the ``exec``. Returns only
    if nothing needed to be done (or it was already done once).
    """
    present = [v for v in CLEANED_ENV_VARS if v in os.environ]
    if not present or os.environ.get(_REEXEC_MARK):
        return
    env = {k: v for k, v in os.environ.items() if k not in CLEANED_ENV_VARS}
    env[_REEXEC_MARK] = ",".join(f"{v}={os.environ[v]}" for v in present)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "cbn.benchmark", *argv], env)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx", "avx2", "fma", "avx512f") if f in flags]
    except OSError:
        pass
    return []


def _last_level_cache_bytes(default=32 * MIB):
    """Size of the largest CPU cache from sysfs, or ``default``."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text[:-1] if text[-1:] in "KMG" else text
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or default


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _threadpool_info():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.threadpool_info()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_THRESHOLD_MAX = 32 * MIB  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 2**31 - 1


def steady_allocator():
    """Make glibc recycle freed blocks from its heap instead of unmapping them.

    Torch's backward, cbn's backward without ``out=`` and the layer allocate
    their outputs. By default glibc serves a large request from a fresh mmap
    (page faults, zeroing) or from its heap depending on a threshold that
    moves with the history of frees, so whether a call pays for fresh pages
    depended on which call freed last: the same torch backward measured 3.7x
    apart between two orders of the same calls. With fixed thresholds and no
    mmap at all, every request is served from recycled heap memory, as in a
    steady training loop. (With mmap still allowed from 32 MiB, a request
    that large was mmap-ed and faulted on every call unless earlier cases
    had grown the heap enough to hold it: PyTorch's float64 32x64x56x56
    backward took 33-48 ms in a run of that shape alone and about 10 ms in
    the full run. cbn's own outputs of 32 MiB and more come from its output
    cache either way. ``benchmarks/layer_step.py`` measures what fresh pages
    cost, with glibc as a user's process has it.)

    Returns
    -------
    dict
        What was set (``mmap_threshold``, ``trim_threshold``, ``mmap_max``),
        or ``{"unavailable": reason}`` when this is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return {"unavailable": str(exc)}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
          and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
          and mallopt(_M_MMAP_MAX, 0) == 1)
    if not ok:
        return {"unavailable": "mallopt refused the thresholds"}
    return {"mmap_threshold": _MMAP_THRESHOLD_MAX, "trim_threshold": _TRIM_THRESHOLD,
            "mmap_max": 0}


def machine_info():
    """What the numbers depend on: CPU, cores, caches, versions, build, load.

    Returns
    -------
    dict
        ``cpu``, ``cpu_flags``, ``cores`` (``os.cpu_count``), ``usable_cores``
        (affinity), ``last_level_cache_bytes``, ``platform``, ``python``,
        ``numpy``, ``torch`` (or None), ``cbn``, ``cbn_build`` (``cbn.build_info()``),
        ``threadpoolctl`` (its ``threadpool_info()``, or None if it is not
        installed), ``loadavg`` and ``env_cleaned`` (the OpenBLAS variables
        removed before this process started, if any).
    """
    torch = _import_torch()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "last_level_cache_bytes": _last_level_cache_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "cbn": cbn.__version__,
        "cbn_build": dict(cbn.build_info()),
        "threadpoolctl": _threadpool_info(),
        "loadavg": load,
        "openblas_env": {v: os.environ.get(v) for v in CLEANED_ENV_VARS},
        "env_cleaned": os.environ.get(_REEXEC_MARK) or None,
    }


def _system_busy_seconds():
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _LoadMeter:
    """Average number of cores that *other* processes kept busy while it ran."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.busy = _system_busy_seconds()
        t = os.times()
        self.own = t.user + t.system

    def cores(self):
        """Background cores since construction (None where /proc/stat is missing)."""
        busy = _system_busy_seconds()
        if busy is None or self.busy is None:
            return None
        t = os.times()
        wall = time.perf_counter() - self.wall
        other = (busy - self.busy) - (t.user + t.system - self.own)
        return max(0.0, other / wall) if wall > 0 else None


class _Threads:
    """Context: limit NumPy/BLAS/OpenMP pools (threadpoolctl) and torch to ``n``."""

    def __init__(self, n, torch=None):
        self.n = n
        self.torch = torch
        self._limits = None
        self._torch_before = None

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            threadpool_limits = None
        if threadpool_limits is not None:
            self._limits = threadpool_limits(limits=self.n)
        if self.torch is not None:
            self._torch_before = self.torch.get_num_threads()
            self.torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.torch is not None:
            self.torch.set_num_threads(self._torch_before)
        if self._limits is not None:
            self._limits.restore_original_limits()
        return False


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------


class _Buffers:
    """Rotation set of x, dy and out arrays for one shape and dtype, plus parameters."""

    def __init__(self, spec, dtype, n, torch=None):
        rng = np.random.default_rng(0)
        dtype = np.dtype(dtype)
        base_x = (rng.standard_normal(spec.shape) * 2.0 + 0.5).astype(dtype)
        base_dy = rng.standard_normal(spec.shape).astype(dtype)
        self.xs = [base_x] + [base_x.copy() for _ in range(n - 1)]
        self.dys = [base_dy] + [base_dy.copy() for _ in range(n - 1)]
        self.outs = [np.zeros_like(base_x) for _ in range(n)]
        C = spec.channels
        self.gamma = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype)
        self.beta = (0.1 * rng.standard_normal(C)).astype(dtype)
        _, self.mean, self.var = F.batch_norm_train(base_x, self.gamma, self.beta,
                                                    axis=spec.axis, out=self.outs[0])
        self.n = n
        self.torch = None
        if torch is not None:
            self.torch = _TorchBuffers(torch, self, spec)


class _TorchBuffers:
    """Torch tensors over the same memory as a :class:`_Buffers`."""

    def __init__(self, torch, buf, spec):
        ndim = len(spec.shape)
        perm = (0, ndim - 1, *range(1, ndim - 1)) if spec.channels_last else None

        def view(a):
            t = torch.from_numpy(a)
            return t.permute(*perm) if perm else t

        self.xs = [view(a) for a in buf.xs]
        self.dys = [view(a) for a in buf.dys]
        self.outs = [view(a) for a in buf.outs]
        self.weight = torch.from_numpy(buf.gamma)
        self.bias = torch.from_numpy(buf.beta)
        dtype = buf.gamma.dtype
        self.running_mean = torch.from_numpy(buf.mean.astype(dtype))
        self.running_var = torch.from_numpy(buf.var.astype(dtype))
        C = spec.channels
        self.save_mean = torch.empty(C, dtype=self.weight.dtype)
        self.save_invstd = torch.empty(C, dtype=self.weight.dtype)
        self.empty = torch.empty(0, dtype=self.weight.dtype)
        torch.ops.aten.native_batch_norm.out(
            self.xs[0], self.weight, self.bias, None, None, True, 0.1, EPS,
            out=self.outs[0], save_mean=self.save_mean, save_invstd=self.save_invstd)


def _case_functions(impl, op, spec, buf, threads, torch):
    """``(fn, setup)`` timing ``impl`` on ``op``; ``fn(i)`` uses buffer ``i``."""
    axis = spec.axis
    g, b, mean, var = buf.gamma, buf.beta, buf.mean, buf.var
    xs, dys, outs = buf.xs, buf.dys, buf.outs
    if impl == "cbn":
        if op == "fwd-train":
            return (lambda i: F.batch_norm_train(xs[i], g, b, axis=axis, eps=EPS, out=outs[i],
                                                 n_threads=threads)), None
        if op == "fwd-eval":
            return (lambda i: F.batch_norm_eval(xs[i], mean, var, g, b, axis=axis, eps=EPS,
                                                out=outs[i], n_threads=threads)), None
        # dx allocated per call, like torch's backward (see the module docstring).
        return (lambda i: F.batch_norm_backward(dys[i], xs[i], mean, var, g, b, axis=axis,
                                                eps=EPS, training=True,
                                                n_threads=threads)), None
    if impl == "layer":
        layer = cbn.BatchNorm(spec.channels, axis=axis, dtype=g.dtype, eps=EPS,
                              n_threads=threads)
        layer.gamma, layer.beta = g, b
        layer.running_mean, layer.running_var = mean.astype(g.dtype), var.astype(g.dtype)
        if op == "fwd-train":
            layer.train()
            return (lambda i: layer(xs[i])), None
        if op == "fwd-eval":
            layer.eval()
            return (lambda i: layer(xs[i])), None
        layer.train()
        return (lambda i: layer.backward(dys[i])), (lambda i: layer(xs[i]))
    if impl == "numpy":
        mean_d, var_d = mean.astype(g.dtype), var.astype(g.dtype)
        if op == "fwd-train":
            return (lambda i: reference.forward_train(xs[i], g, b, EPS, axis)), None
        if op == "fwd-eval":
            return (lambda i: reference.forward_eval(xs[i], mean_d, var_d, g, b, EPS, axis)), None
        backward = getattr(reference, "_backward", None)
        if backward is not None:
            # Through given batch statistics, as a framework caching them would.
            return (lambda i: backward(dys[i], xs[i], mean_d, var_d, g, None, EPS, axis,
                                       False, True)), None
        return (lambda i: reference.backward_train(dys[i], xs[i], g, None, EPS, axis)), None
    if impl == "torch":
        t = buf.torch
        bn = torch.ops.aten.native_batch_norm.out
        if op == "fwd-train":
            def fn(i):
                bn(t.xs[i], t.weight, t.bias, None, None, True, 0.1, EPS, out=t.outs[i],
                   save_mean=t.save_mean, save_invstd=t.save_invstd)
            return fn, None
        if op == "fwd-eval":
            def fn(i):
                bn(t.xs[i], t.weight, t.bias, t.running_mean, t.running_var, False, 0.1, EPS,
                   out=t.outs[i], save_mean=t.empty, save_invstd=t.empty)
            return fn, None
        bwd = torch.ops.aten.native_batch_norm_backward.default
        return (lambda i: bwd(t.dys[i], t.xs[i], t.weight, None, None, t.save_mean,
                              t.save_invstd, True, EPS, [True, True, True])), None
    raise ValueError(f"unknown implementation {impl!r}")


# cbn.functional's thresholds from which outputs stream: any output, forward's
# y over rows, backward's dx over rows.
STREAM_SETTINGS = ("STREAM_MIN_BYTES", "ROWS_STREAM_MIN_BYTES", "ROWS_DX_STREAM_MIN_BYTES")


@contextmanager
def streaming_from(nbytes):
    """Within the block, every cbn output of at least ``nbytes`` bytes streams
    (0: all of them, ``1 << 62``: none), over rows too; the thresholds are
    restored after it."""
    saved = {name: getattr(F, name) for name in STREAM_SETTINGS}
    try:
        for name in STREAM_SETTINGS:
            setattr(F, name, nbytes)
        yield
    finally:
        for name, value in saved.items():
            setattr(F, name, value)


def _ratio(num, den):
    if num is None or den is None or den <= 0:
        return None
    return num / den


def run_benchmark(config, progress=None):
    """Run every case of ``config``; return the JSON-ready result dictionary.

    Calls :func:`steady_allocator`, which changes glibc's allocation thresholds
    for the rest of the process.

    Parameters
    ----------
    config : BenchConfig
    progress : callable taking a str, optional
        Called with one line per measured case (e.g. ``print`` to stderr).

    Returns
    -------
    dict
        ``machine`` (:func:`machine_info`), ``config``, ``copy`` (large-array
        copy bandwidth per thread count), ``cases`` (one dict per shape x
        dtype x threads x op, with ``times`` per implementation in seconds,
        ``gbps``, ``frac_copy`` (one thread only, else None: ``np.copyto`` is
        one thread), ``copy_gbps`` (the same-size copy, timed in the rounds of
        the op's one-thread case), ``speedup_numpy``, ``speedup_torch``),
        ``small_step`` and ``targets`` (:func:`check_targets`).
    """
    say = progress or (lambda line: None)
    torch = _import_torch() if "torch" in config.peers else None
    started = time.time()
    result = {
        "schema": "cbn-bench/1",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(),
        "allocator": steady_allocator(),
        "config": {
            "shapes": [s.name for s in config.shapes],
            "dtypes": list(config.dtypes),
            "threads": list(config.threads),
            "ops": list(config.ops),
            "target_time_s": config.target_time,
            "min_repeats": config.min_repeats,
            "max_repeats": config.max_repeats,
            "rounds": config.rounds,
            "warmup": config.warmup,
            "cache_bytes": config.cache_bytes,
            "peers": [p for p in config.peers if p != "torch" or torch is not None],
            "byte_model": dict(BYTE_MODEL),
            "torch_api": {
                "fwd-train": "aten::native_batch_norm.out(training=True)",
                "fwd-eval": "aten::native_batch_norm.out(training=False)",
                "backward": "aten::native_batch_norm_backward(train=True)",
            } if torch is not None else None,
        },
        "copy": {},
        "cases": [],
        "small_step": None,
    }
    meter = _LoadMeter()
    timing_kw = {"target_time": config.target_time, "min_repeats": config.min_repeats,
                 "max_repeats": config.max_repeats}

    if config.large_copy_bytes:
        for n in sorted({1, *[t for t in config.threads if t <= 2]}):
            c = copy_bandwidth(config.large_copy_bytes, n, **timing_kw)
            result["copy"][str(n)] = c
            say(f"copy {config.large_copy_bytes // MIB} MiB, {n} thread(s): {c['gbps']:.1f} GB/s")

    for spec in config.shapes:
        for dtype in config.dtypes:
            nbytes = spec.nbytes(dtype)
            n_buf = _n_buffers(nbytes, config)
            buf = _Buffers(spec, dtype, n_buf, torch)
            copy_gbps = {}  # op -> the same-size copy timed in that op's one-thread rounds
            for threads in config.threads:
                for op in config.ops:
                    impls = [i for i in ("cbn", *config.peers)
                             if not (i == "torch" and torch is None)]
                    with _Threads(threads, torch):
                        fns = {impl: _case_functions(impl, op, spec, buf, threads, torch)
                               for impl in impls}
                        if threads == 1 or op not in copy_gbps:
                            # np.copyto runs on one thread: timed with the one-thread
                            # case, in its rounds, so that drift falls on it alike.
                            fns["copy"] = (lambda i, buf=buf: np.copyto(buf.outs[i], buf.xs[i]),
                                           None)
                        with torch.no_grad() if torch is not None else nullcontext():
                            timings = time_interleaved(fns, n_buf, rounds=config.rounds,
                                                       warmup=config.warmup, **timing_kw)
                    if "copy" in timings and (threads == 1 or op not in copy_gbps):
                        copy_gbps[op] = 2 * nbytes / timings.pop("copy").median / 1e9
                    times = {impl: t.as_dict() for impl, t in timings.items()}
                    moved = BYTE_MODEL[op] * nbytes
                    t_cbn = times["cbn"]["median_s"]
                    med = {k: v["median_s"] for k, v in times.items()}
                    gbps = moved / t_cbn / 1e9
                    case = {
                        "shape": list(spec.shape),
                        "shape_name": spec.name,
                        "layout": spec.layout,
                        "axis": spec.axis,
                        "dtype": dtype,
                        "threads": threads,
                        "op": op,
                        "nbytes": nbytes,
                        "bytes_moved": moved,
                        "n_buffers": n_buf,
                        "copy_gbps": copy_gbps[op],
                        "times": times,
                        "gbps": gbps,
                        # np.copyto is one thread: a fraction of it only for one thread.
                        "frac_copy": gbps / copy_gbps[op] if threads == 1 else None,
                        "gbps_by_impl": {k: moved / v / 1e9 for k, v in med.items()},
                        "speedup_numpy": _ratio(med.get("numpy"), t_cbn),
                        "speedup_torch": _ratio(med.get("torch"), t_cbn),
                        "speedup_layer": _ratio(med.get("layer"), t_cbn),
                        "noisy": any(v["median_s"] > NOISY_RATIO * v["min_s"]
                                     for v in times.values()),
                    }
                    result["cases"].append(case)
                    say(_progress_line(case))
            del buf

    if config.small_step:
        result["small_step"] = small_step(torch=torch, target_time=max(config.target_time, 0.05))
        s = result["small_step"]
        say(f"small step (64,100) float32: cbn {s['cbn_us']:.1f} us"
            + (f", torch {s['torch_us']:.1f} us" if s.get("torch_us") else ""))
    result["elapsed_s"] = time.time() - started
    result["machine"]["background_cores"] = meter.cores()
    try:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    result["targets"] = check_targets(result)
    return result


def _progress_line(case):
    t = case["times"]
    parts = [f"{k} {v['median_s'] * 1e3:.3f}" for k, v in t.items()]
    return (f"{case['shape_name']:>18} {case['dtype']} t{case['threads']} {case['op']:<9} "
            + " | ".join(parts) + " ms")


def small_step(torch=None, *, target_time=0.2, min_repeats=200, max_repeats=20000):
    """Median forward + backward time of a (64, 100) float32 layer, in microseconds.

    ``cbn.BatchNorm(100)`` (training mode, default threads) against
    ``torch.nn.BatchNorm1d(100)`` with autograd, on one torch thread; the
    gradients torch accumulates are reset, untimed, before each step.

    Returns
    -------
    dict
        ``cbn_us``, ``torch_us`` (None without torch), ``speedup_torch``,
        ``repeats``.
    """
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SMALL_STEP_SHAPE).astype(np.float32)
    dy = rng.standard_normal(SMALL_STEP_SHAPE).astype(np.float32)
    layer = cbn.BatchNorm(SMALL_STEP_SHAPE[1], dtype=np.float32)

    def step(_):
        layer.forward(x)
        layer.backward(dy)

    kw = {"target_time": target_time, "min_repeats": min_repeats, "max_repeats": max_repeats,
          "warmup": 50}
    t_cbn = time_calls(step, **kw)
    out = {"shape": list(SMALL_STEP_SHAPE), "dtype": "float32", "cbn_us": t_cbn.median * 1e6,
           "cbn_repeats": t_cbn.repeats, "torch_us": None, "speedup_torch": None}
    if torch is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            bn = torch.nn.BatchNorm1d(SMALL_STEP_SHAPE[1])
            tx = torch.from_numpy(x.copy()).requires_grad_(True)
            tdy = torch.from_numpy(dy.copy())

            def tstep(_):
                bn(tx).backward(tdy)

            def reset(_):
                tx.grad = None
                bn.weight.grad = None
                bn.bias.grad = None

            t_torch = time_calls(tstep, setup=reset, **kw)
        finally:
            torch.set_num_threads(before)
        out["torch_us"] = t_torch.median * 1e6
        out["torch_repeats"] = t_torch.repeats
        out["speedup_torch"] = t_torch.median / t_cbn.median
    return out


# ---------------------------------------------------------------------------
# Targets of issue 4
# ---------------------------------------------------------------------------


def _case_label(c):
    return f"{c['shape_name']} {c['dtype']} t{c['threads']} {c['op']}"


def _target(name, status, detail):
    return {"target": name, "status": status, "detail": detail}


def check_targets(result):
    """Check the targets of issue 4 against a result; one dict per target.

    Each dict has ``target`` (its wording), ``status`` (``"pass"``,
    ``"fail"`` or ``"n/a"`` when the run did not measure what it needs) and
    ``detail`` (the numbers behind it, worst cases first).
    """
    cases = result["cases"]
    out = []

    big = [c for c in cases if c["threads"] == 1 and c["nbytes"] >= TARGET_COPY_MIN_BYTES]
    name = (f">= {TARGET_COPY_FRACTION} of same-size copy bandwidth, arrays >= "
            f"{TARGET_COPY_MIN_BYTES // MIB} MiB, 1 thread")
    if big:
        bad = sorted((c for c in big if c["frac_copy"] < TARGET_COPY_FRACTION),
                     key=lambda c: c["frac_copy"])
        detail = f"{len(big) - len(bad)}/{len(big)} cases pass"
        if bad:
            detail += "; worst: " + ", ".join(f"{_case_label(c)} {c['frac_copy']:.2f}"
                                              for c in bad[:6])
        out.append(_target(name, "fail" if bad else "pass", detail))
    else:
        out.append(_target(name, "n/a", "no 1-thread case of 16 MiB or more"))

    with_torch = [c for c in cases if c["speedup_torch"] is not None]
    name = ">= torch on every case (same threads)"
    if with_torch:
        bad = sorted((c for c in with_torch if c["speedup_torch"] < 1.0),
                     key=lambda c: c["speedup_torch"])
        detail = f"{len(with_torch) - len(bad)}/{len(with_torch)} cases pass"
        if bad:
            detail += "; slower: " + ", ".join(f"{_case_label(c)} x{c['speedup_torch']:.2f}"
                                               for c in bad[:8])
            if len(bad) > 8:
                detail += f" (+{len(bad) - 8} more)"
        out.append(_target(name, "fail" if bad else "pass", detail))
    else:
        out.append(_target(name, "n/a", "torch not measured"))

    nchw = [c for c in with_torch if c["layout"] == "NCHW" and c["op"] == "fwd-train"]
    name = f">= {TARGET_NCHW_TRAIN_VS_TORCH:g}x torch on NCHW training forward"
    if nchw:
        bad = sorted((c for c in nchw if c["speedup_torch"] < TARGET_NCHW_TRAIN_VS_TORCH),
                     key=lambda c: c["speedup_torch"])
        detail = f"{len(nchw) - len(bad)}/{len(nchw)} cases pass; " + ", ".join(
            f"{_case_label(c)} x{c['speedup_torch']:.2f}"
            for c in sorted(nchw, key=lambda c: c["speedup_torch"])[:6])
        out.append(_target(name, "fail" if bad else "pass", detail))
    else:
        out.append(_target(name, "n/a", "no NCHW training forward with torch measured"))

    vs_np = [c["speedup_numpy"] for c in cases if c["speedup_numpy"] is not None]
    name = f">= {TARGET_VS_NUMPY_MEDIAN:g}x cbn.reference (NumPy) at the median"
    if vs_np:
        med = statistics.median(vs_np)
        per_op = []
        for op in OPS:
            v = [c["speedup_numpy"] for c in cases
                 if c["op"] == op and c["speedup_numpy"] is not None]
            if v:
                per_op.append(f"{op} median x{statistics.median(v):.1f} (min x{min(v):.1f})")
        # NumPy's elementwise passes run on one thread whatever the budget, so the
        # two-thread cases weigh cbn's threads in: each count's median is shown too.
        per_thread = []
        for n in sorted({c["threads"] for c in cases}):
            v = [c["speedup_numpy"] for c in cases
                 if c["threads"] == n and c["speedup_numpy"] is not None]
            if v:
                per_thread.append(f"{n} thread{'s' if n > 1 else ''} x{statistics.median(v):.1f}")
        out.append(_target(name, "pass" if med >= TARGET_VS_NUMPY_MEDIAN else "fail",
                           f"median x{med:.1f} over {len(vs_np)} cases ("
                           + ", ".join(per_thread) + "); " + ", ".join(per_op)))
    else:
        out.append(_target(name, "n/a", "NumPy reference not measured"))

    name = (f"2 threads >= {TARGET_THREAD_SCALING}x 1 thread, arrays >= "
            f"{TARGET_SCALING_MIN_BYTES // MIB} MiB")
    one = {(c["shape_name"], c["dtype"], c["op"]): c for c in cases if c["threads"] == 1}
    pairs = []
    for c in cases:
        key = (c["shape_name"], c["dtype"], c["op"])
        if c["threads"] == 2 and key in one and c["nbytes"] >= TARGET_SCALING_MIN_BYTES:
            pairs.append((c, one[key]["times"]["cbn"]["median_s"] / c["times"]["cbn"]["median_s"]))
    if pairs:
        bad = sorted((p for p in pairs if p[1] < TARGET_THREAD_SCALING), key=lambda p: p[1])
        detail = f"{len(pairs) - len(bad)}/{len(pairs)} cases pass"
        if bad:
            detail += "; worst: " + ", ".join(f"{_case_label(c)} x{s:.2f}" for c, s in bad[:6])
        copies = result.get("copy", {})
        if "1" in copies and "2" in copies:
            detail += (f" (for scale: a 256 MiB copy on 2 threads runs "
                       f"x{copies['2']['gbps'] / copies['1']['gbps']:.2f} of 1 thread)")
        out.append(_target(name, "fail" if bad else "pass", detail))
    else:
        out.append(_target(name, "n/a", "needs threads 1 and 2 on arrays >= 4 MiB"))

    s = result.get("small_step")
    name = f"(64, 100) float32 layer step (fwd + bwd) < {TARGET_SMALL_STEP_US:g} us"
    if s:
        detail = f"cbn {s['cbn_us']:.1f} us"
        if s.get("torch_us"):
            detail += f", torch BatchNorm1d {s['torch_us']:.1f} us (x{s['speedup_torch']:.2f})"
        out.append(_target(name, "pass" if s["cbn_us"] < TARGET_SMALL_STEP_US else "fail",
                           detail))
    else:
        out.append(_target(name, "n/a", "not measured"))
    return out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

TABLE_COLUMNS = ("shape", "layout", "dtype", "thr", "op", "cbn ms", "GB/s", "frac copy",
                 "x numpy", "x torch", "layer ms", "torch ms")


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def _table_rows(result):
    rows = []
    for c in result["cases"]:
        t = c["times"]
        rows.append((
            c["shape_name"].split(":")[0],
            c["layout"],
            c["dtype"],
            str(c["threads"]),
            c["op"],
            f"{t['cbn']['median_s'] * 1e3:.3f}" + ("*" if c.get("noisy") else ""),
            f"{c['gbps']:.1f}",
            _fmt(c["frac_copy"], ".2f"),
            _fmt(c["speedup_numpy"], ".1f"),
            _fmt(c["speedup_torch"], ".2f"),
            _fmt(t.get("layer", {}).get("median_s") and t["layer"]["median_s"] * 1e3, ".3f"),
            _fmt(t.get("torch", {}).get("median_s") and t["torch"]["median_s"] * 1e3, ".3f"),
        ))
    return rows


def format_table(result, markdown=False):
    """The per-case table as text (aligned columns) or as a Markdown table."""
    rows = _table_rows(result)
    if markdown:
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
                 "|" + "|".join("---" if i < 5 else "---:" for i in range(len(TABLE_COLUMNS)))
                 + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(TABLE_COLUMNS)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 5 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(TABLE_COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_machine(result):
    """One line describing the machine, versions and build of a result."""
    m = result["machine"]
    torch = m.get("torch") or "not installed"
    build = m.get("cbn_build", {})
    load = m.get("loadavg")
    return (f"{m['cpu']} ({m['usable_cores']} usable of {m['cores']} cores, "
            f"{'/'.join(m.get('cpu_flags', []))}, LLC {m['last_level_cache_bytes'] // MIB} MiB), "
            f"Python {m['python']}, NumPy {m['numpy']}, torch {torch}, cbn {m['cbn']} "
            f"(openmp={build.get('openmp')}, max_threads={build.get('max_threads')}), "
            f"load average at start {', '.join(f'{v:.2f}' for v in load) if load else 'n/a'}"
            + (f"; other processes kept {bg:.2f} cores busy on average during the run"
               if (bg := m.get("background_cores")) is not None else ""))


def format_report(result, markdown=False):
    """Machine line, copy bandwidth, the table, the small step and the targets."""
    lines = []
    lines.append(("**Machine:** " if markdown else "machine: ") + format_machine(result))
    copies = result.get("copy", {})
    if copies:
        lines.append(("**Copy bandwidth** " if markdown else "copy bandwidth ")
                     + "(np.copyto, 256 MiB, read + write): "
                     + ", ".join(f"{n} thread{'s' if n != '1' else ''} {c['gbps']:.1f} GB/s"
                                 for n, c in sorted(copies.items())))
    if markdown and len(lines) > 1:
        lines.insert(1, "")
    lines.append("")
    lines.append(format_table(result, markdown))
    if any(c.get("noisy") for c in result["cases"]):
        lines.append("")
        lines.append(("\\" if markdown else "") + f"* noisy: some median in this case is over {NOISY_RATIO:g}x its fastest "
                     "call (the machine was busy; see min_s in the JSON)")
    s = result.get("small_step")
    if s:
        lines.append("")
        text = f"small layer step (64, 100) float32 forward + backward: cbn {s['cbn_us']:.1f} us"
        if s.get("torch_us"):
            text += f", torch BatchNorm1d {s['torch_us']:.1f} us (x{s['speedup_torch']:.2f})"
        lines.append(text)
    lines.append("")
    lines.append("targets (speed goals; see benchmarks/README.md in cbn's source):")
    for t in result.get("targets", []):
        mark = {"pass": "PASS", "fail": "FAIL"}.get(t["status"], "n/a ")
        lines.append(f"{'- ' if markdown else '  '}{'**' + mark + '**' if markdown else mark}  "
                     f"{t['target']}: {t['detail']}")
    return "\n".join(lines)


def parse_case(text, check=None):
    """A side measurement's case ``SHAPE:DTYPE`` (a bench.py shape, float32 or
    float64) as ``(ShapeSpec, dtype name)``. ``check(spec)`` may refuse the shape
    with a ValueError; every refusal is an ``argparse.ArgumentTypeError`` naming
    the case."""
    shape, _, dtype = text.rpartition(":")
    if dtype not in DTYPES or not shape:
        raise argparse.ArgumentTypeError(
            f"case {text!r} is not SHAPE:DTYPE with DTYPE float32 or float64 (32x64x56x56:float32)")
    try:
        spec = parse_shape(shape)
        if check is not None:
            check(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"case {text!r}: {exc}") from None
    return spec, dtype


def case_command(doc, default_cases, parse, argv=None):
    """Parse the command line of a side measurement over ``SHAPE:DTYPE`` cases
    (``--cases``, ``--no-torch``, ``--json``; ``parse`` turns one case into what
    the script measures, ``doc``'s first paragraph describes it). Returns
    ``(cases, torch, args)``: the cases (``default_cases`` without ``--cases``)
    and PyTorch, or None if left out or not installed."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--cases", type=lambda t: [parse(c) for c in t.split(",") if c.strip()],
                   metavar="LIST", help="comma-separated SHAPE:DTYPE (default: "
                   + ",".join(default_cases) + ")")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    torch = None if args.no_torch else _import_torch()
    return args.cases or [parse(c) for c in default_cases], torch, args


def side_measurement(doc, json_help, argv=None, add_arguments=None):
    """Start a side measurement of ``benchmarks/``: its command line, then the allocator.

    Parses ``argv`` (a ``--json FILE`` option, described by ``json_help``, and
    whatever ``add_arguments(parser)`` adds; the first paragraph of ``doc``
    describes the script) and calls :func:`steady_allocator`. Returns
    ``save(**data)``, which writes ``data`` with :func:`write_record` if
    ``--json`` was given, and does nothing otherwise; ``save.args`` is the
    parsed command line.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help=json_help)
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    allocator = steady_allocator()

    def save(**data):
        if args.json:
            write_record(args.json, allocator, **data)

    save.args = args
    return save


def without_json(argv):
    """``argv`` less its ``--json FILE`` (or ``--json=FILE``) option: what a side
    measurement passes to the child processes it starts (they print; only the
    parent writes the file)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def refuse_shapes(shapes, check):
    """Whether a side measurement must refuse its ``--shapes``: ``check(spec)`` raises
    ValueError for one it cannot take, and the first such message is printed."""
    try:
        for spec in shapes:
            check(spec)
    except ValueError as exc:
        print(f"--shapes: {exc}", file=sys.stderr)
        return True
    return False


def compile_c(workdir, name, source, flags, what):
    """Compile C ``source`` into ``workdir``/``name``.so with the system C compiler
    (``$CC``, else Python's, else ``cc``) and ``flags`` (a list, after the source file);
    return it loaded (:class:`ctypes.CDLL`). Raises RuntimeError, naming ``what``, if
    there is no compiler or it fails."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise RuntimeError(f"no C compiler found ({' '.join(cc) or 'cc'})")
    src, lib = os.path.join(workdir, f"{name}.c"), os.path.join(workdir, f"{name}.so")
    with open(src, "w") as f:
        f.write(source)
    run = subprocess.run([*cc, "-shared", "-fPIC", src, "-o", lib, *flags],
                         check=False, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"compiling {what} failed:\n{run.stderr.strip()}")
    return ctypes.CDLL(lib)


def run_children(script, argv, processes, show):
    """Run a side measurement's ``script`` in ``processes`` fresh interpreters, one after
    another, with ``argv`` (less ``--json``) and ``--child``; each child prints one JSON
    object per line. Returns ``(rows, 0)``, every row tagged with the index of its
    ``process`` and passed to ``show(row)`` as it comes, or ``(None, status)`` when a child
    fails, after printing its standard error."""
    passed = without_json(argv)
    rows = []
    for p in range(processes):
        run = subprocess.run([sys.executable, os.path.abspath(script), *passed, "--child"],
                             check=False, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr.strip(), file=sys.stderr)
            return None, run.returncode
        for line in run.stdout.splitlines():
            row = json.loads(line)
            row["process"] = p
            rows.append(row)
            show(row)
    return rows, 0


def side_torch(args, positive=("threads",)):
    """PyTorch for a side measurement that compares cbn with it.

    Checks first that the integer options of ``args`` named in ``positive`` are
    at least 1. Returns ``(torch, None)``, or ``(None, status)`` with the
    reason printed to standard error: 2 for a bad option, 1 without PyTorch.
    """
    bad = [name for name in positive if getattr(args, name) < 1]
    if bad:
        print(" and ".join(f"--{name}" for name in bad) + " must be at least 1",
              file=sys.stderr)
        return None, 2
    torch = _import_torch()
    if torch is None:
        print("PyTorch is not installed: nothing to compare", file=sys.stderr)
        return None, 1
    return torch, None


def write_record(path, allocator, **data):
    """Write ``data`` as JSON beside :func:`machine_info` and the ``allocator`` record.

    The format of the side measurements in ``benchmarks/`` (control, streaming threshold).
    """
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "allocator": allocator, **data}, f, indent=1)
        f.write("\n")


def _matplotlib_problem():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("cbn bench: --plot needs matplotlib, which is not installed; "
                "install it with pip install 'cbn[plot]' (or pip install matplotlib)")
    return None


def plot_results(result, path):
    """Draw effective GB/s per case (cbn, torch, NumPy, same-size copy) to ``path``.

    One panel per op; bars per case. Needs matplotlib (Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(c["op"] == op for c in result["cases"])]
    per_op = {op: [c for c in result["cases"] if c["op"] == op] for op in ops}
    n = max((len(v) for v in per_op.values()), default=1)
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 1.5 + 0.32 * n),
                             squeeze=False, sharey=True)
    impls = [("cbn", "tab:blue"), ("torch", "tab:orange"), ("numpy", "tab:gray")]
    for ax, op in zip(axes[0], ops):
        cases = per_op[op]
        ys = np.arange(len(cases))
        h = 0.27
        for k, (impl, color) in enumerate(impls):
            vals = [c["gbps_by_impl"].get(impl, 0.0) for c in cases]
            if any(vals):
                ax.barh(ys + (k - 1) * h, vals, height=h, color=color, label=impl)
        ax.scatter([c["copy_gbps"] for c in cases], ys, marker="|", s=120, color="black",
                   label="same-size copy", zorder=3)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{c['shape_name']} {c['dtype'][5:]}b t{c['threads']}"
                            for c in cases], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(op)
        ax.set_xlabel("effective GB/s (byte model)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("cbn batch norm: " + result["machine"]["cpu"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _csv(kind, choices=None):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def _physical_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _shape_list(text):
    try:
        specs = [parse_shape(t) for t in text.split(";" if ";" in text else ",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    memory = _physical_memory()
    for spec in specs:
        # A case holds x, dy and an output at least (float64 the largest dtype).
        need = 3 * spec.nbytes("float64")
        if memory and need > memory:
            raise argparse.ArgumentTypeError(
                f"shape {spec.name} needs {need / 2**30:.3g} GiB for its arrays; "
                f"this machine has {memory / 2**30:.3g} GiB")
    return specs


def _positive(kind, *, zero=False):
    """The command line's positive-number argparse type (see cbn.__main__)."""
    from .__main__ import _positive as positive  # here: __main__ imports this module

    return positive(kind, zero=zero)


def _thread_list(text):
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"threads must be integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"threads must be positive integers, got {text!r}")
    top = cbn._kernels.MAX_THREADS
    if any(v > top for v in values):
        raise argparse.ArgumentTypeError(f"threads must be at most {top}, got {text!r}")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only for options whose default is a value: the
    others say in their help what they default to."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, list):
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def build_parser(prog="cbn bench"):
    """The argument parser of ``cbn bench`` and ``benchmarks/bench.py``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark cbn's batch norm against copy bandwidth, the NumPy reference "
                    "and PyTorch's CPU kernel.",
        formatter_class=_HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: shapes {', '.join(QUICK_SHAPES)}, short timings, "
                        "no large copy")
    p.add_argument("--shapes", type=_shape_list, metavar="LIST",
                   help="comma-separated shapes, e.g. 256x1024,32x64x56x56,32x56x56x64:nhwc "
                        f"(default: {', '.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtypes", type=_csv("dtype", DTYPES), metavar="LIST",
                   default=list(DTYPES), help="float32,float64")
    p.add_argument("--threads", type=_thread_list, metavar="LIST",
                   help=f"thread counts (default: {','.join(map(str, default_threads()))})")
    p.add_argument("--ops", type=_csv("op", OPS), metavar="LIST", default=list(OPS),
                   help=",".join(OPS))
    p.add_argument("--peers", type=_csv("peer", ("layer", "numpy", "torch")), metavar="LIST",
                   default=["layer", "numpy", "torch"],
                   help="what to measure beside cbn.functional: layer,numpy,torch")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--target-time", type=_positive(float, zero=True),
                   default=None,
                   help="seconds of timed calls per measurement (default 0.2, --quick 0.02)")
    p.add_argument("--min-repeats", type=_positive(int), default=None,
                   help="fewest timed calls per measurement (default 5, --quick 3)")
    p.add_argument("--max-repeats", type=_positive(int), default=2000,
                   help="most timed calls per measurement")
    p.add_argument("--rounds", type=_positive(int), default=5,
                   help="alternating rounds per case: every implementation is timed in "
                        "each round, so drift in the machine's speed hits all alike")
    p.add_argument("--cache-mib", type=_positive(float), default=None,
                   help="last-level cache size for input rotation (default: from sysfs)")
    p.add_argument("--no-small-step", action="store_true",
                   help="skip the (64, 100) layer step measurement")
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="draw a bar chart (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on standard error")
    return p


def config_from_args(args):
    """A :class:`BenchConfig` from parsed command-line arguments."""
    quick = args.quick
    shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if quick else DEFAULT_SHAPES)]
    cache = (int(args.cache_mib * MIB) if args.cache_mib is not None
             else _last_level_cache_bytes())
    peers = tuple(p for p in args.peers if not (p == "torch" and args.no_torch))
    return BenchConfig(
        shapes=shapes,
        dtypes=list(args.dtypes),
        threads=list(args.threads or default_threads()),
        ops=list(args.ops),
        target_time=args.target_time if args.target_time is not None else
        (0.02 if quick else 0.2),
        min_repeats=args.min_repeats if args.min_repeats is not None else (3 if quick else 5),
        max_repeats=args.max_repeats,
        rounds=args.rounds,
        cache_bytes=cache,
        peers=peers,
        small_step=not args.no_small_step,
        large_copy_bytes=0 if quick else LARGE_COPY_BYTES,
    )


def main(argv=None, *, reexec=True):
    """Run the benchmark from the command line; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).
    reexec : bool
        Re-execute the process without ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE``
        if they are set (tests pass False to stay in-process; the variables
        are then recorded in the JSON as they were).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if reexec:
        _clean_env_and_reexec(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_repeats is not None and args.min_repeats > args.max_repeats:
        parser.error(f"--min-repeats ({args.min_repeats}) must not exceed --max-repeats "
                     f"({args.max_repeats})")
    for spec in args.shapes or ():
        if math.prod(spec.shape) // spec.channels < 2:
            parser.error(f"shape {spec.name} has one value per channel: batch norm's "
                         "training forward needs at least two")
    if args.plot:
        problem = _matplotlib_problem()
        if problem:
            sys.stderr.write(problem + "\n")
            return 2
    # The demo's checks: each output opened before the run, the plot's format known.
    from .__main__ import _output_path_problem, _plot_format_problem

    problems = [_output_path_problem(f"--{name}", getattr(args, name), "cbn bench")
                for name in ("json", "plot", "markdown")]
    if args.plot:
        problems.append(_plot_format_problem(args.plot, "cbn bench"))
    problems = [p for p in problems if p]
    if problems:
        sys.stderr.write(problems[0] + "\n")
        return 2
    config = config_from_args(args)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_benchmark(config, progress)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_report(result, markdown=True) + "\n")
    if args.plot:
        plot_results(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
