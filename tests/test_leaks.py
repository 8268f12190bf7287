"""Reference and memory leaks on the error paths and the rarer paths of every entry point.

tests/test_resources.py shows that resident memory stays flat over 10,000
successful layer steps. A leak on a path that raises, or on one taken rarely
(``out=``, in place, the fused ReLU, two threads, channels-last, ``no_grad``,
state dicts, pickling, the output cache, the trainer), goes unseen there, and
costs more: a loop that catches ``FloatingPointError`` and skips the batch
runs the failing path once per bad batch, and a batch kept alive is megabytes.
What can leak, and how the tests here see it:

* A typed memoryview that a Cython function acquired and did not release when
  it raised keeps a buffer export of its array: the array's reference count
  grows by one per failed call, and ``resize(refcheck=True)`` refuses it.
  Checked: after the calls, each array passed in has exactly its starting
  ``sys.getrefcount``, and each one that owns its data can be resized.
* A wrapper that keeps its last input, a copy, a result or an error (a
  module-level record, a growing list) allocates per call: tracemalloc's
  traced memory (which counts NumPy's data and cbn's large-output blocks too)
  grows by less than GROWTH_BOUND in a round of CALLS calls, which one leaked
  (C,) vector per call already exceeds, and the gc-tracked objects (after
  ``gc.collect()``) by fewer than one per five calls.
* An exception keeps the frames it passed through, with their arrays, while
  it is handled; after its ``except`` block nothing may: with the cyclic
  collector off, every array of the call is freed when its last name goes
  (no saved exception, no cycle through a frame).
* Scratch that the kernels ``malloc`` and do not free on a failing status is
  invisible to tracemalloc: the C heap's bytes in use (glibc ``mallinfo2``)
  stay flat over failing passes of the shapes that allocate it.
* Outputs of 32 MiB and more live in cbn's block cache: after failing and
  succeeding passes through it, ``cbn.empty_cache()`` brings traced memory
  back to where it started.
* Destroyed layers and models leave no array in cyclic garbage.

* A layer, and a history turned into a dict, leave no cyclic garbage at all:
  an application that disables gc must not leak by building layers. (A
  layer's thread guard and its shared side used to refer to each other, and
  ``History.to_dict``'s nested recursive function to itself: two and three
  objects per call that only the cyclic collector freed.)
"""

import copy
import ctypes
import functools
import gc
import os
import pickle
import sys
import tracemalloc
import types
import weakref

import numpy as np
import pytest

import cbn
from cbn import _kernels, nn, optim, trainer
from cbn import functional as F

# Imported by NumPy on first use (cbn's masked-array check touches it): about
# 1 MB of module objects that would otherwise land in the first measurement.
np.ma.MaskedArray  # noqa: B018

C = 8                    # channels of the test batches
CALLS = 200              # calls per measured round (two rounds)
WARMUP = 20              # calls before them: caches, freelists and lazy imports fill up
GROWTH_BOUND = 16 << 10  # traced bytes a round may add; one (C,) float64 vector per call: 35 KB
# Calls that build whole objects (copies, pickles, files, models, optimizers)
# are slower, and leak a kilobyte or more each if they leak: fewer, wider bound.
OBJECT_CALLS = 100
OBJECT_BOUND = 48 << 10


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def batch(dtype=np.float32, seed=0):
    """Fresh arrays for a (16, C, 4) batch, good and bad ones, each owning its
    data except the views ``x_nc`` and ``dy_nc``."""
    rng = np.random.default_rng(seed)
    d = types.SimpleNamespace()
    d.x = rng.standard_normal((16, C, 4)).astype(dtype)
    d.dy = rng.standard_normal((16, C, 4)).astype(dtype)
    d.x_cl = np.ascontiguousarray(d.x.transpose(0, 2, 1))  # channels-last
    d.x_nc = d.x[:, :, ::-1]  # non-contiguous
    d.dy_nc = d.dy[:, :, ::-1]
    d.x_nan = d.x.copy()
    d.x_nan[3, 2, 1] = np.nan
    d.x_one = d.x[:1, :, :1].copy()  # one value per channel
    d.x_other = d.x.astype(np.float64 if dtype == np.float32 else np.float32)
    d.x_int = d.x.astype(np.int32)
    d.x_1d = d.x[0, :, 0].copy()
    d.gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    d.beta = rng.uniform(-1, 1, C).astype(dtype)
    d.gamma_short = d.gamma[:-1].copy()
    d.gamma_nan = d.gamma.copy()
    d.gamma_nan[2] = np.nan
    d.mean = rng.uniform(-1, 1, C)
    d.var = rng.uniform(0.5, 2, C)
    d.var_neg = d.var.copy()
    d.var_neg[1] = -1.0
    d.out = np.empty_like(d.x)
    d.out_ro = np.empty_like(d.x)
    d.out_ro.flags.writeable = False
    d.out_short = np.empty((8, C, 4), dtype)
    d.buf = d.x.copy()  # normalized in place, again and again
    d.dy_huge = np.full_like(d.dy, np.finfo(dtype).max / 4)  # dgamma, dbeta overflow
    d.run_mean = np.zeros(C, dtype)
    d.run_var = np.ones(C, dtype)
    d.run_ro = np.zeros(C, dtype)
    d.run_ro.flags.writeable = False
    return d


def arrays_of(ns):
    """The arrays among ``ns``'s attributes."""
    return [v for v in vars(ns).values() if isinstance(v, np.ndarray)]


def with_dtypes(cases, float64_cases):
    """Parameters ``(case, dtype)``: every case in float32, the listed ones in float64 too."""
    return ([pytest.param(c, np.float32, id=c) for c in cases]
            + [pytest.param(c, np.float64, id=f"{c}-f64") for c in float64_cases])


def call_repeatedly(call, n, expected):
    """Call ``call()`` n times; each call must raise ``expected`` (None: return).

    Plain try/except, not ``pytest.raises``: its ExceptionInfo would keep the
    last traceback, and with it the frames and arrays under test, alive.
    """
    for _ in range(n):
        if expected is None:
            call()
            continue
        try:
            call()
        except expected:
            continue
        raise AssertionError(f"{call} did not raise {expected.__name__}")


def assert_no_leak(call, watched, expected=None, calls=CALLS, bound=GROWTH_BOUND):
    """Run ``call`` in two rounds of ``calls`` calls after a warm-up; assert that
    the reference counts of ``watched`` return exactly to their starting values,
    that traced memory grew by less than ``bound`` in a round and gc-tracked
    objects by fewer than one per five calls.

    A leak grows in both rounds; a cache filling up, or a container made before
    that happens to be resized (tracemalloc then counts all of it as new), in
    one at most: the smaller growth is compared. The objects alive after the
    warm-up are frozen (``gc.freeze``), so that collections and
    ``gc.get_objects`` see only what the calls made.
    """
    call_repeatedly(call, min(WARMUP, calls), expected)
    gc.freeze()
    try:
        counts = [sys.getrefcount(a) for a in watched]
        objects = len(gc.get_objects())
        tracemalloc.start()
        grown = []
        for _ in range(2):
            start = tracemalloc.get_traced_memory()[0]
            call_repeatedly(call, calls, expected)
            gc.collect()
            grown.append(tracemalloc.get_traced_memory()[0] - start)
        gained = len(gc.get_objects()) - objects
        after = [sys.getrefcount(a) for a in watched]  # counted as the start was
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    changed = {i: n - c for i, (n, c) in enumerate(zip(after, counts)) if n != c}
    assert not changed, (
        f"reference counts changed over {2 * calls} calls (index in watched: change): {changed}")
    assert min(grown) < bound, f"traced memory grew by {grown} bytes in two rounds of {calls} calls"
    assert gained < max(calls // 5, 10), f"{gained} more gc-tracked objects after {2 * calls} calls"


def assert_resizable(ns):
    """Drop every attribute of ``ns`` but the arrays owning their data (views,
    layers go), then toggle each array's ``writeable`` flag and resize it with
    ``refcheck=True``: NumPy refuses if anything else, a leaked reference or a
    buffer export, still holds it."""
    owners = [k for k, v in vars(ns).items() if isinstance(v, np.ndarray) and v.flags.owndata]
    for k in [k for k in vars(ns) if k not in owners]:
        delattr(ns, k)
    for k in owners:
        a = vars(ns).pop(k)
        a.flags.writeable = False
        a.flags.writeable = True
        a.resize(a.size + 1, refcheck=True)  # ValueError if referenced elsewhere


def c_heap_in_use():
    """Bytes the C heap has handed out now (glibc mallinfo2: uordblks + hblkhd)."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _has_mallinfo2():
    """Whether the C library has mallinfo2 (glibc 2.33 and later)."""
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:  # pragma: no cover - no C library to load
        return False


needs_glibc_heap = pytest.mark.skipif(
    not _has_mallinfo2() or cbn.build_info()["sanitized"]
    or "asan" in os.environ.get("LD_PRELOAD", ""),
    reason="no glibc mallinfo2 here, or AddressSanitizer, whose allocator it does not see",
)


# ---------------------------------------------------------------------------
# How a case makes its call from a batch
# ---------------------------------------------------------------------------


def on_batch(action):
    """A case whose call needs only the batch: ``action(d)``."""
    return lambda d: functools.partial(action, d)


def on_layer(make, action):
    """A case whose call acts on ``d.layer = make(d)``, made once per test."""

    def setup(d):
        d.layer = make(d)
        return functools.partial(action, d)

    return setup


def trained(d, **kwargs):
    """A BatchNorm that has run a training forward on ``d.x`` (kept for backward)."""
    layer = cbn.BatchNorm(C, dtype=d.x.dtype, **kwargs)
    layer(d.x)
    return layer


def rewritten_input(d):
    """A BatchNorm whose last forward's input ``d.buf`` was written into since."""
    layer = cbn.BatchNorm(C, dtype=d.x.dtype)
    layer(d.buf)
    d.buf *= 2
    return layer


def model(d):
    """A small MLP (Linear, BatchNorm, ReLU, Linear) of the batch's dtype, 4 -> 3."""
    return nn.mlp([4, 6, 3], rng=0, dtype=d.x.dtype)


def load(d, **changes):
    """Load the layer's state dict with some entries replaced (corrupted)."""
    d.layer.load_state_dict({**d.layer.state_dict(), **changes})


def fit(d, X, y, batch_size=4):
    """One epoch of ``cbn.trainer.fit`` of ``d.layer`` with a fresh SGD."""
    trainer.fit(d.layer, X, y, epochs=1, batch_size=batch_size, verbose=0,
                optimizer=optim.SGD(d.layer.params, d.layer.grads))


def step(layer, x, dy):
    """A forward and its backward; returns dx."""
    layer(x)
    return layer.backward(dy)


def no_grad_forward(layer, x):
    """A forward inside ``cbn.no_grad()``."""
    with cbn.no_grad():
        return layer(x)


def save_and_load(layer, path):
    """``layer.save(path)``, then a new layer from the file."""
    layer.save(path)
    return cbn.BatchNorm.load(path)


def all_optimizers(layer):
    """A step of each optimizer, each built anew over ``layer``'s parameters."""
    for kind in (optim.SGD, optim.Momentum, optim.RMSprop, optim.Adam):
        kind(layer.params, layer.grads, lr=1e-6).step()


def fit_setup(d):
    """A small model and 256 rows of 16 features (a copy of X kept per fit: 16 KiB)."""
    rng = np.random.default_rng(3)
    d.X = rng.standard_normal((256, 16)).astype(d.x.dtype)
    d.y = rng.integers(0, 3, 256)
    d.layer = nn.mlp([16, 12, 3], rng=0, dtype=d.x.dtype)
    opt = optim.Adam(d.layer.params, d.layer.grads, lr=1e-3)
    return functools.partial(trainer.fit, d.layer, d.X, d.y, epochs=2, batch_size=32,
                             optimizer=opt, verbose=0, validation=(d.X[:64], d.y[:64]))


# ---------------------------------------------------------------------------
# Calls that raise: {id: (exception, setup)}
# ---------------------------------------------------------------------------

kernel = _kernels
FAILING = {
    # cbn.functional: arguments the direct path declines and the checked path refuses
    "train-int": (TypeError, on_batch(lambda d: F.batch_norm_train(d.x_int))),
    "train-1d": (ValueError, on_batch(lambda d: F.batch_norm_train(d.x_1d))),
    "train-batch-of-one": (ValueError, on_batch(lambda d: F.batch_norm_train(d.x_one))),
    "train-nan": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_train(d.x_nan, d.gamma, d.beta))),
    "train-nan-out": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_train(d.x_nan, d.gamma, d.beta, out=d.out))),
    "train-nan-noncontiguous": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_train(d.x_nan[:, :, ::-1]))),
    "train-gamma-short": (ValueError, on_batch(
        lambda d: F.batch_norm_train(d.x, d.gamma_short, d.beta))),
    "train-gamma-nan": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_train(d.x, d.gamma_nan, d.beta))),
    "train-noncontiguous-gamma-short": (ValueError, on_batch(
        lambda d: F.batch_norm_train(d.x_nc, d.gamma_short))),
    "train-out-read-only": (ValueError, on_batch(
        lambda d: F.batch_norm_train(d.x, d.gamma, d.beta, out=d.out_ro))),
    "train-noncontiguous-out-read-only": (ValueError, on_batch(
        lambda d: F.batch_norm_train(d.x_nc, out=d.out_ro))),
    "train-out-shape": (ValueError, on_batch(lambda d: F.batch_norm_train(d.x, out=d.out_short))),
    "train-out-not-contiguous": (ValueError, on_batch(
        lambda d: F.batch_norm_train(d.x, out=d.out[::-1]))),
    "train-n-threads-0": (ValueError, on_batch(lambda d: F.batch_norm_train(d.x, n_threads=0))),
    "train-n-threads-str": (TypeError, on_batch(lambda d: F.batch_norm_train(d.x, n_threads="2"))),
    "train-eps": (ValueError, on_batch(lambda d: F.batch_norm_train(d.x, eps=-1.0))),
    "train-activation": (ValueError, on_batch(
        lambda d: F.batch_norm_train(d.x, activation="tanh"))),
    "train-axis": (ValueError, on_batch(lambda d: F.batch_norm_train(d.x, axis=5))),
    "eval-nan": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_eval(d.x_nan, d.mean, d.var, d.gamma, d.beta))),
    "eval-var-negative": (ValueError, on_batch(
        lambda d: F.batch_norm_eval(d.x, d.mean, d.var_neg, d.gamma))),
    "eval-var-negative-out": (ValueError, on_batch(
        lambda d: F.batch_norm_eval(d.x, d.mean, d.var_neg, out=d.out))),
    "eval-var-none": (TypeError, on_batch(lambda d: F.batch_norm_eval(d.x, d.mean, None))),
    "eval-var-short": (ValueError, on_batch(lambda d: F.batch_norm_eval(d.x, d.mean, d.var[:-1]))),
    "eval-gamma-nan": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_eval(d.x, d.mean, d.var, d.gamma_nan))),
    "eval-out-read-only": (ValueError, on_batch(
        lambda d: F.batch_norm_eval(d.x, d.mean, d.var, out=d.out_ro))),
    "eval-noncontiguous-nan": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_eval(d.x_nan[:, :, ::-1], d.mean, d.var))),
    "backward-dy-nan": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_backward(d.x_nan, d.x, d.mean, d.var, d.gamma, d.beta))),
    "backward-dy-other-dtype": (TypeError, on_batch(
        lambda d: F.batch_norm_backward(d.x_other, d.x, d.mean, d.var))),
    "backward-dy-shape": (ValueError, on_batch(
        lambda d: F.batch_norm_backward(d.out_short, d.x, d.mean, d.var))),
    "backward-var-negative": (ValueError, on_batch(
        lambda d: F.batch_norm_backward(d.dy, d.x, d.mean, d.var_neg))),
    "backward-batch-of-one": (ValueError, on_batch(
        lambda d: F.batch_norm_backward(d.x_one, d.x_one, d.mean, d.var))),
    "backward-out-read-only": (ValueError, on_batch(
        lambda d: F.batch_norm_backward(d.dy, d.x, d.mean, d.var, out=d.out_ro))),
    "backward-training-str": (TypeError, on_batch(
        lambda d: F.batch_norm_backward(d.dy, d.x, d.mean, d.var, training="yes"))),
    "backward-noncontiguous-gamma-short": (ValueError, on_batch(
        lambda d: F.batch_norm_backward(d.dy_nc, d.x, d.mean, d.var, d.gamma_short))),
    "backward-param-grad-overflow": (FloatingPointError, on_batch(
        lambda d: F.batch_norm_backward(d.dy_huge, d.x, d.mean, d.var, d.gamma, d.beta))),
    "batch-stats-nan": (FloatingPointError, on_batch(lambda d: F.batch_stats(d.x_nan))),
    "batch-stats-n-threads": (ValueError, on_batch(lambda d: F.batch_stats(d.x, n_threads=-5))),
    "update-running-stats-nan": (FloatingPointError, on_batch(
        lambda d: F.update_running_stats(d.run_mean, d.run_var, d.mean, d.var * np.nan, 16, 0.1))),
    "update-running-stats-read-only": (ValueError, on_batch(
        lambda d: F.update_running_stats(d.run_ro, d.run_var, d.mean, d.var, 16, 0.1))),
    "set-cache-limit-negative": (ValueError, on_batch(lambda d: cbn.set_cache_limit(-1))),
    "set-cache-limit-float": (TypeError, on_batch(lambda d: cbn.set_cache_limit(2.5))),
    # The compiled primitives: memoryviews acquired, then a check raises
    "kernel-forward-train-shapes": (ValueError, on_batch(lambda d: kernel.forward_train(
        d.x, d.out_short, d.gamma, d.beta, 1e-5, d.mean, d.var))),
    "kernel-forward-train-read-only-y": (ValueError, on_batch(lambda d: kernel.forward_train(
        d.x, d.out_ro, d.gamma, d.beta, 1e-5, d.mean.copy(), d.var.copy()))),
    "kernel-forward-train-gamma-short": (ValueError, on_batch(lambda d: kernel.forward_train(
        d.x, d.out, d.gamma_short, d.beta, 1e-5, d.mean.copy(), d.var.copy()))),
    "kernel-forward-train-mixed-dtypes": (ValueError, on_batch(lambda d: kernel.forward_train(
        d.x, d.out, d.gamma.astype(d.x_other.dtype), d.beta, 1e-5, d.mean, d.var))),
    "kernel-forward-eval-var-short": (ValueError, on_batch(lambda d: kernel.forward_eval(
        d.x, d.out, d.mean, d.var[:-1], d.gamma, d.beta, 1e-5))),
    "kernel-forward-eval-n-threads": (TypeError, on_batch(lambda d: kernel.forward_eval(
        d.x, d.out, d.mean, d.var, d.gamma, d.beta, 1e-5, False, "2"))),
    "kernel-backward-dgamma-short": (ValueError, on_batch(lambda d: kernel.backward(
        d.dy, d.x, d.mean, d.var, d.gamma, d.beta, 1e-5, d.out, d.gamma_short.copy(),
        d.beta.copy(), True))),
    "kernel-backward-read-only-dx": (ValueError, on_batch(lambda d: kernel.backward(
        d.dy, d.x, d.mean, d.var, d.gamma, d.beta, 1e-5, d.out_ro, d.gamma.copy(),
        d.beta.copy(), True))),
    "kernel-batch-stats-empty": (ValueError, on_batch(
        lambda d: kernel.batch_stats(d.x[:0], d.mean.copy(), d.var.copy()))),
    "kernel-ema-update-short": (ValueError, on_batch(
        lambda d: kernel.ema_update(d.run_mean, d.run_var, d.mean[:-1], d.var, 16.0, 0.1))),
    "kernel-sample-bits-list": (TypeError, on_batch(lambda d: kernel.sample_bits(d.x, [1.0]))),
    "kernel-empty-near-2d": (ValueError, on_batch(lambda d: kernel.empty_near(d.x, d.x[0]))),
    # cbn.BatchNorm
    "layer-int": (TypeError, on_layer(trained, lambda d: d.layer(d.x_int))),
    "layer-other-dtype": (TypeError, on_layer(trained, lambda d: d.layer(d.x_other))),
    "layer-nan": (FloatingPointError, on_layer(trained, lambda d: d.layer(d.x_nan))),
    "layer-eval-nan": (FloatingPointError, on_layer(
        lambda d: trained(d).eval(), lambda d: d.layer(d.x_nan))),
    "layer-batch-of-one": (ValueError, on_layer(trained, lambda d: d.layer(d.x_one))),
    "layer-channels": (ValueError, on_layer(trained, lambda d: d.layer(d.x_cl))),
    "layer-1d": (ValueError, on_layer(trained, lambda d: d.layer(d.x_1d))),
    "layer-unaffine-channels": (ValueError, on_layer(
        lambda d: trained(d, affine=False), lambda d: d.layer(d.x_cl))),
    "layer-backward-before-forward": (RuntimeError, on_layer(
        lambda d: cbn.BatchNorm(C, dtype=d.x.dtype), lambda d: d.layer.backward(d.dy))),
    "layer-backward-dy-nan": (FloatingPointError, on_layer(
        trained, lambda d: d.layer.backward(d.x_nan))),
    "layer-backward-dy-noncontiguous-nan": (FloatingPointError, on_layer(
        trained, lambda d: d.layer.backward(d.x_nan[:, :, ::-1]))),
    "layer-backward-dy-other-dtype": (TypeError, on_layer(
        trained, lambda d: d.layer.backward(d.x_other))),
    "layer-backward-dy-shape": (ValueError, on_layer(
        trained, lambda d: d.layer.backward(d.out_short))),
    "layer-backward-two-threads-dy-nan": (FloatingPointError, on_layer(
        lambda d: trained(d, n_threads=2), lambda d: d.layer.backward(d.x_nan))),
    "layer-backward-after-gamma-assigned": (RuntimeError, on_layer(
        trained, lambda d: (setattr(d.layer, "gamma", d.gamma), d.layer.backward(d.dy)))),
    "layer-backward-after-input-rewritten": (RuntimeError, on_layer(
        rewritten_input, lambda d: d.layer.backward(d.dy))),
    "layer-set-gamma-short": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "gamma", d.gamma_short))),
    "layer-set-gamma-nan": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "gamma", d.gamma_nan))),
    "layer-set-running-var-negative": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "running_var", d.var_neg))),
    "layer-set-eps": (ValueError, on_layer(trained, lambda d: setattr(d.layer, "eps", 0.0))),
    "layer-set-momentum": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "momentum", 2.0))),
    "layer-set-n-threads": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "n_threads", 0))),
    "layer-set-activation": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "activation", "tanh"))),
    "layer-set-num-batches-tracked": (ValueError, on_layer(
        trained, lambda d: setattr(d.layer, "num_batches_tracked", -1))),
    "layer-set-dtype": (AttributeError, on_layer(
        trained, lambda d: setattr(d.layer, "dtype", np.float64))),
    "layer-train-mode": (TypeError, on_layer(trained, lambda d: d.layer.train("no"))),
    "layer-freeze-without-stats": (ValueError, on_layer(
        lambda d: cbn.BatchNorm(C, track_running_stats=False), lambda d: d.layer.freeze())),
    "layer-load-state-nan": (ValueError, on_layer(
        trained, lambda d: load(d, running_var=d.var * np.nan))),
    "layer-load-state-negative-var": (ValueError, on_layer(
        trained, lambda d: load(d, running_var=d.var_neg))),
    "layer-load-state-shape": (ValueError, on_layer(
        trained, lambda d: load(d, gamma=d.gamma_short))),
    "layer-load-state-extra-key": (KeyError, on_layer(
        trained, lambda d: load(d, extra=d.gamma))),
    "layer-load-state-count": (ValueError, on_layer(
        trained, lambda d: load(d, num_batches_tracked=np.array(-1)))),
    "layer-load-state-strings": (TypeError, on_layer(
        trained, lambda d: load(d, gamma=np.array(["a"] * C)))),
    "layer-load-state-not-a-dict": (TypeError, on_layer(
        trained, lambda d: d.layer.load_state_dict([d.gamma]))),
    "layer-constructor-n-threads": (ValueError, on_batch(
        lambda d: cbn.BatchNorm(C, n_threads=0))),
    "layer-constructor-dtype": (TypeError, on_batch(
        lambda d: cbn.BatchNorm(C, dtype=np.int32))),
    # cbn.nn, cbn.optim, cbn.trainer
    "linear-other-dtype": (TypeError, on_layer(
        lambda d: nn.Linear(4, 3, rng=0), lambda d: d.layer(d.x_other[:, 0]))),
    "linear-shape": (ValueError, on_layer(
        lambda d: nn.Linear(5, 3, rng=0), lambda d: d.layer(d.x[:, 0]))),
    "linear-backward-before-forward": (RuntimeError, on_layer(
        lambda d: nn.Linear(4, 3, rng=0), lambda d: d.layer.backward(d.dy[:, 0, :3]))),
    "relu-backward-shape": (ValueError, on_layer(
        lambda d: nn.ReLU(), lambda d: (d.layer(d.x), d.layer.backward(d.out_short)))),
    "sequential-nan": (FloatingPointError, on_layer(model, lambda d: d.layer(d.x_nan[:, 2]))),
    "sequential-load-state-nan": (ValueError, on_layer(model, lambda d: d.layer.load_state_dict(
        {k: v * np.nan for k, v in d.layer.state_dict().items()}))),
    "optimizer-lr": (ValueError, on_layer(
        model, lambda d: optim.Adam(d.layer.params, d.layer.grads, lr=-1.0))),
    "optimizer-load-state": (KeyError, on_layer(
        model, lambda d: optim.SGD(d.layer.params, d.layer.grads).load_state_dict({"t": -1}))),
    "fit-nan": (ValueError, on_layer(
        model, lambda d: fit(d, d.x_nan[:, 2], np.zeros(16, int)))),
    "fit-batch-size-one": (ValueError, on_layer(
        model, lambda d: fit(d, d.x[:, 2], np.zeros(16, int), batch_size=1))),
    "predict-width": (ValueError, on_layer(
        model, lambda d: trainer.predict(d.layer, d.x[:, :3, 0]))),
    "evaluate-labels": (ValueError, on_layer(
        model, lambda d: trainer.evaluate(d.layer, d.x[:, 2], np.full(16, 7)))),
}
FAILING_IDS = sorted(FAILING)
# The paths whose kernels differ by dtype run in float64 too.
FAILING_F64 = ["train-nan", "train-nan-out", "train-gamma-nan", "eval-nan", "eval-var-negative",
               "backward-dy-nan", "backward-param-grad-overflow", "kernel-forward-train-shapes",
               "kernel-forward-train-read-only-y", "layer-nan", "layer-backward-dy-nan",
               "layer-backward-dy-other-dtype"]


@pytest.mark.parametrize("case,dtype", with_dtypes(FAILING_IDS, FAILING_F64))
def test_failing_calls_release_every_argument(case, dtype):
    """Calls that raise: the arrays' reference counts return exactly, traced
    memory and gc-tracked objects stay flat."""
    expected, setup = FAILING[case]
    d = batch(dtype)
    assert_no_leak(setup(d), arrays_of(d), expected)


@pytest.mark.parametrize("case", FAILING_IDS)
def test_arrays_stay_resizable_after_failing_calls(case):
    """No buffer export outlives a failing call: each array owning its data can
    be resized (refcheck=True) once the batch's views and layers are gone."""
    expected, setup = FAILING[case]
    d = batch()
    call = setup(d)
    call_repeatedly(call, 20, expected)
    del call
    assert_resizable(d)


@pytest.mark.parametrize("case", FAILING_IDS)
def test_an_exception_keeps_nothing_alive_after_its_except_block(case):
    """With the cyclic collector off, every array of a failing call is freed as
    soon as its last name goes: no saved exception, no cycle through a frame."""
    expected, setup = FAILING[case]
    d = batch()
    call = setup(d)
    refs = [weakref.ref(a) for a in arrays_of(d)]
    gc.disable()
    try:
        try:
            call()
        except expected:
            pass
        else:
            raise AssertionError(f"{case} did not raise {expected.__name__}")
        del call, d
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(refs)} arrays outlived the except block"


# ---------------------------------------------------------------------------
# The rarer successful paths: {id: (calls per round, setup)}
# ---------------------------------------------------------------------------

SUCCEEDING = {
    "train": (CALLS, on_batch(lambda d: F.batch_norm_train(d.x, d.gamma, d.beta))),
    "train-out": (CALLS, on_batch(
        lambda d: F.batch_norm_train(d.x, d.gamma, d.beta, out=d.out))),
    "train-in-place": (CALLS, on_batch(
        lambda d: F.batch_norm_train(d.buf, d.gamma, out=d.buf))),
    "train-relu": (CALLS, on_batch(
        lambda d: F.batch_norm_train(d.x, d.gamma, activation="relu"))),
    "train-two-threads": (CALLS, on_batch(
        lambda d: F.batch_norm_train(d.x, d.gamma, n_threads=2))),
    "train-channels-last": (CALLS, on_batch(
        lambda d: F.batch_norm_train(d.x_cl, d.gamma, axis=-1))),
    "train-noncontiguous": (CALLS, on_batch(
        lambda d: F.batch_norm_train(d.x_nc, d.gamma, d.beta))),
    "train-list": (CALLS, on_batch(lambda d: F.batch_norm_train([[1.0, 2.0], [3.0, 5.0]]))),
    "eval": (CALLS, on_batch(lambda d: F.batch_norm_eval(d.x, d.mean, d.var, d.gamma, d.beta))),
    "eval-float32-stats": (CALLS, on_batch(
        lambda d: F.batch_norm_eval(d.x, d.run_mean, d.run_var, d.gamma, d.beta))),
    "eval-out-relu-two-threads": (CALLS, on_batch(lambda d: F.batch_norm_eval(
        d.x, d.mean, d.var, out=d.out, activation="relu", n_threads=2))),
    "eval-batch-of-one": (CALLS, on_batch(lambda d: F.batch_norm_eval(d.x_one, d.mean, d.var))),
    "backward": (CALLS, on_batch(
        lambda d: F.batch_norm_backward(d.dy, d.x, d.mean, d.var, d.gamma, d.beta))),
    "backward-fixed-stats": (CALLS, on_batch(
        lambda d: F.batch_norm_backward(d.dy, d.x, d.mean, d.var, training=False))),
    "backward-out-relu": (CALLS, on_batch(lambda d: F.batch_norm_backward(
        d.dy, d.x, d.mean, d.var, d.gamma, d.beta, activation="relu", out=d.out))),
    "backward-noncontiguous": (CALLS, on_batch(
        lambda d: F.batch_norm_backward(d.dy_nc, d.x_nc, d.mean, d.var))),
    "batch-stats": (CALLS, on_batch(lambda d: F.batch_stats(d.x_nc, n_threads=2))),
    "update-running-stats": (CALLS, on_batch(
        lambda d: F.update_running_stats(d.run_mean, d.run_var, d.mean, d.var, 16, 0.1))),
    "cache-limit-and-empty": (CALLS, on_batch(
        lambda d: (cbn.set_cache_limit(cbn.cache_info()["limit"]), cbn.empty_cache()))),
    "layer-step": (CALLS, on_layer(trained, lambda d: step(d.layer, d.x, d.dy))),
    "layer-step-relu-two-threads": (CALLS, on_layer(
        lambda d: trained(d, activation="relu", n_threads=2), lambda d: step(d.layer, d.x, d.dy))),
    "layer-step-unaffine": (CALLS, on_layer(
        lambda d: trained(d, affine=False, track_running_stats=False),
        lambda d: step(d.layer, d.x, d.dy))),
    "layer-step-channels-last": (CALLS, on_layer(
        lambda d: cbn.BatchNorm(C, axis=-1, dtype=d.x.dtype),
        lambda d: step(d.layer, d.x_cl, d.x_cl))),
    "layer-step-noncontiguous": (CALLS, on_layer(
        trained, lambda d: step(d.layer, d.x_nc, d.dy_nc))),
    "layer-step-frozen": (CALLS, on_layer(
        lambda d: trained(d).freeze(), lambda d: step(d.layer, d.x, d.dy))),
    "layer-eval-batch-of-one": (CALLS, on_layer(
        lambda d: trained(d).eval(), lambda d: step(d.layer, d.x_one, d.x_one))),
    "layer-no-grad": (CALLS, on_layer(trained, lambda d: no_grad_forward(d.layer, d.x))),
    "layer-state-dict-round-trip": (CALLS, on_layer(
        trained, lambda d: d.layer.load_state_dict(d.layer.state_dict()))),
    "layer-setters-and-resets": (CALLS, on_layer(trained, lambda d: (
        setattr(d.layer, "gamma", d.gamma), d.layer.reset_running_stats(),
        d.layer.reset_parameters()))),
    "layer-pickle": (OBJECT_CALLS, on_layer(
        trained, lambda d: pickle.loads(pickle.dumps(d.layer)))),
    "layer-deepcopy": (OBJECT_CALLS, on_layer(trained, lambda d: copy.deepcopy(d.layer))),
    "layer-save-load": (50, on_layer(trained, lambda d: save_and_load(d.layer, d.path))),
    "sequential-step": (CALLS, on_layer(
        model, lambda d: step(d.layer, d.x[:, 2], d.dy[:, :3, 0]))),
    "sequential-state-dict-round-trip": (OBJECT_CALLS, on_layer(
        model, lambda d: d.layer.load_state_dict(d.layer.state_dict()))),
    "optimizers": (OBJECT_CALLS, on_layer(model, lambda d: all_optimizers(d.layer))),
    "predict-evaluate": (OBJECT_CALLS, on_layer(model, lambda d: (
        trainer.predict(d.layer, d.x[:, 2]),
        trainer.evaluate(d.layer, d.x[:, 2], np.zeros(16, int))))),
    "fit": (10, fit_setup),
}
SUCCEEDING_F64 = ["train-out", "train-in-place", "train-relu", "train-channels-last", "eval",
                  "backward-out-relu", "layer-step", "layer-step-relu-two-threads",
                  "layer-step-channels-last", "fit"]


@pytest.mark.parametrize("case,dtype", with_dtypes(sorted(SUCCEEDING), SUCCEEDING_F64))
def test_succeeding_calls_release_every_argument(case, dtype, tmp_path):
    """Successful calls of the rarer paths: the inputs' reference counts return
    exactly (a layer keeps its last forward's input: the same array each call),
    traced memory and gc-tracked objects stay flat."""
    calls, setup = SUCCEEDING[case]
    d = batch(dtype)
    d.path = str(tmp_path / "layer.npz")
    bound = GROWTH_BOUND if calls >= CALLS else OBJECT_BOUND
    assert_no_leak(setup(d), arrays_of(d), None, calls=calls, bound=bound)


# ---------------------------------------------------------------------------
# Kernel scratch on the C heap
# ---------------------------------------------------------------------------

# Shapes whose passes malloc scratch beyond their per-channel vectors: rows
# folded k at a time, short runs spread as rows, channel groups (a backward over
# more than twice the group budget, a streamed float64 training forward).
HEAP_SHAPES = {
    "rows": (np.float32, (64, 100, 1)),
    "spread-runs": (np.float32, (16, 32, 4)),
    "backward-groups": (np.float64, (2, 32, 784)),
    "forward-groups": (np.float64, (8, 16, 4096)),
}


def failing_passes(dtype, shape):
    """A function running 18 kernel passes on a batch of ``shape`` that each
    fail (NaN, negative variance), on one and two threads, with and without
    the fused ReLU, streaming their output."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(dtype)
    x_nan = x.copy()
    x_nan.flat[x.size // 2] = np.nan
    y = np.empty_like(x)
    channels = shape[1]
    gamma, beta = np.ones(channels, dtype), np.zeros(channels, dtype)
    mean, var = np.zeros(channels), np.ones(channels)
    var_neg = -var
    dgamma, dbeta = np.empty(channels, dtype), np.empty(channels, dtype)
    m, v = np.empty(channels), np.empty(channels)

    def run():
        statuses = []
        for threads in (1, 2):
            for relu in (False, True):
                statuses += [
                    kernel.forward_train(x_nan, y, gamma, beta, 1e-5, m, v, relu, threads, True),
                    kernel.forward_eval(x_nan, y, mean, var, gamma, beta, 1e-5, relu, threads,
                                        True),
                    kernel.forward_eval(x, y, mean, var_neg, gamma, beta, 1e-5, relu, threads),
                    kernel.backward(x, x, mean, var_neg, gamma, beta, 1e-5, y, dgamma, dbeta,
                                    True, True, relu, threads, True),
                ]
            # Without the ReLU, which masks it, a NaN in dy fails the sums or dx.
            statuses.append(kernel.backward(x_nan, x, mean, var, gamma, beta, 1e-5, y, dgamma,
                                            dbeta, True, True, False, threads, True))
        assert all(statuses), f"every pass must fail, got statuses {statuses}"

    return run


@needs_glibc_heap
@pytest.mark.parametrize("case", sorted(HEAP_SHAPES))
def test_failing_kernel_passes_free_their_scratch(case):
    """The C heap, which tracemalloc does not see, is as large after 40 rounds
    of 18 failing passes as before: a scratch of C doubles lost per pass would
    add 40 * 18 * 128 bytes or more."""
    run = failing_passes(*HEAP_SHAPES[case])
    for _ in range(5):
        run()
    gc.collect()
    before = c_heap_in_use()
    for _ in range(40):
        run()
    gc.collect()
    grown = c_heap_in_use() - before
    assert grown < 16 << 10, f"the C heap grew by {grown} bytes"


# ---------------------------------------------------------------------------
# The output cache
# ---------------------------------------------------------------------------


def test_large_outputs_come_back_to_baseline_after_empty_cache(empty_output_cache):
    """Outputs of 32 MiB and more, on failing and succeeding paths of the
    functions and the layer: the inputs' reference counts return, the cache
    holds no more than the two blocks in flight at once, and empty_cache()
    returns traced memory to where it started."""
    channels = 8
    shape = (4, channels, 512, 512)  # 32 MiB of float32: just over the smallest block
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    out = np.empty_like(x)
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    mean, var = np.zeros(channels), np.ones(channels)
    var_neg = -var
    watched = [x, dy, out, gamma, beta, mean, var]
    counts = [sys.getrefcount(a) for a in watched]
    layer = cbn.BatchNorm(channels)

    def failing(call):
        try:
            call()
        except (FloatingPointError, ValueError):
            return
        raise AssertionError("the call did not raise")

    def with_nan(call):
        x[1, 2, 3, 4] = np.nan
        try:
            failing(call)
        finally:
            x[1, 2, 3, 4] = 0.0

    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(2):
            F.batch_norm_train(x, gamma, beta)
            F.batch_norm_train(x, gamma, beta, out=out, activation="relu")
            F.batch_norm_eval(x, mean, var, gamma, beta)
            F.batch_norm_backward(dy, x, mean, var, gamma, beta)
            with_nan(lambda: F.batch_norm_train(x, gamma, beta))
            with_nan(lambda: F.batch_norm_eval(x, mean, var))
            failing(lambda: F.batch_norm_eval(x, mean, var_neg))
            with_nan(lambda: F.batch_norm_backward(x, dy, mean, var))
            layer.train()
            layer(x)
            layer.backward(dy)
            with_nan(lambda: layer.backward(x))
            with_nan(lambda: layer(x))
            with cbn.no_grad():
                layer.eval()(x)
            with_nan(lambda: layer(x))
        layer = None  # its cached forward goes, and with it the last reference to its blocks
        gc.collect()
        held = cbn.cache_info()
        assert 1 <= held["blocks"] <= 2, held
        assert held["bytes"] <= 2 * (x.nbytes + (1 << 20)), held
        assert cbn.empty_cache() == held["bytes"]
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert cbn.cache_info()["blocks"] == 0 and cbn.cache_info()["bytes"] == 0
    assert grown < 1 << 20, f"traced memory is {grown} bytes above its start after empty_cache()"
    assert [sys.getrefcount(a) for a in watched] == counts


# ---------------------------------------------------------------------------
# Cyclic garbage
# ---------------------------------------------------------------------------


def make_and_drop(d):
    """Objects that are built and destroyed: a layer that kept ``d.x``, its
    copy and pickle, a layer failing to build, a model and its fit and copy."""
    layer = cbn.BatchNorm(C)
    layer(d.x)
    copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))
    try:
        cbn.BatchNorm(C, n_threads=0)
    except ValueError:
        pass
    d.layer = model(d)
    fit(d, d.x[:, 2], np.zeros(16, int), batch_size=8)
    copy.deepcopy(d.layer)
    del d.layer


def cyclic_garbage(make, times=10):
    """What ``make()`` called ``times`` times leaves to the cyclic collector."""
    make()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(times):
            make()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_destroyed_layers_leave_no_array_in_cyclic_garbage():
    """What the cyclic collector finds after layers and models are dropped holds
    no array: every batch and parameter is freed by reference counting. (Arrays
    are not gc-tracked themselves: the garbage's referents are searched.)"""
    d = batch()
    garbage = cyclic_garbage(lambda: make_and_drop(d), times=3)
    arrays = [r for o in garbage for r in gc.get_referents(o) if isinstance(r, np.ndarray)]
    kinds = sorted({type(o).__name__ for o in garbage})
    del garbage
    assert not arrays, f"{len(arrays)} arrays in cyclic garbage (among {kinds})"


def test_a_layer_leaves_no_cyclic_garbage():
    """Building (and dropping) a layer leaves nothing for the cyclic collector."""
    garbage = cyclic_garbage(lambda: cbn.BatchNorm(C))
    assert not garbage, sorted({type(o).__name__ for o in garbage})


def test_history_to_dict_leaves_no_cyclic_garbage():
    """``History.to_dict`` leaves nothing for the cyclic collector."""
    garbage = cyclic_garbage(lambda: trainer.History(epoch=[1], val_loss=[float("nan")]).to_dict())
    assert not garbage, sorted({type(o).__name__ for o in garbage})
