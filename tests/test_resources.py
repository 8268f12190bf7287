"""Resource behaviour: flat memory over long training loops; inputs past 2**31 values.

* A layer stepped 10,000 times (forward + backward, train and eval, with and
  without the fused ReLU) must not grow the process's resident memory: any
  per-step leak (a cached array, a malloc'd scratch never freed, a reference
  cycle holding the input) would add up to megabytes.
* Every index in the kernels is a Py_ssize_t: a float32 input with more than
  2**31 values (8.6 GB) gives the statistics a chunked NumPy computation gives,
  and an in-place normalization writes the right values past element 2**31.
  That test is slow and memory-hungry: it runs only with CBN_SLOW_TESTS=1 and
  enough available memory.
"""

import gc
import os

import numpy as np
import pytest

import cbn
from cbn import functional as F

STATM = "/proc/self/statm"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes():
    """Current resident set size, from /proc/self/statm (field 2, in pages)."""
    with open(STATM) as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_bytes():
    """Peak resident set size (VmHWM) from /proc/self/status, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes():
    """MemAvailable from /proc/meminfo, or None where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


needs_statm = pytest.mark.skipif(
    not os.path.exists(STATM) or cbn.build_info()["sanitized"],
    reason="no /proc/self/statm here, or an AddressSanitizer build, whose quarantine "
    "holds freed memory back on purpose (RSS grows by design)",
)

MB = 1 << 20
WARMUP = 500
STEPS = 10_000
GROWTH_BOUND = 2 * MB


def _loop(step, n):
    for i in range(n):
        step(i)


@needs_statm
@pytest.mark.parametrize(
    "activation,dtype",
    [(None, np.float32), ("relu", np.float64)],
    ids=["linear-f32", "relu-f64"],
)
def test_rss_flat_over_a_long_training_loop(activation, dtype):
    rng = np.random.default_rng(2024)
    layer = cbn.BatchNorm(100, dtype=dtype, activation=activation)
    batches = [
        (
            (rng.uniform(-3, 3, 100) + rng.uniform(0.5, 2, 100) * rng.standard_normal((64, 100))).astype(dtype),
            rng.standard_normal((64, 100)).astype(dtype),
        )
        for _ in range(8)
    ]

    def step(i):
        x, dy = batches[i % 8]
        if i % 10 == 9:
            # An evaluation step now and then, and back: both paths must be leak-free.
            layer.eval()
            layer.forward(x)
            layer.backward(dy)
            layer.train()
        else:
            layer.forward(x)
            layer.backward(dy)
        # The optimizer step a trainer would do, in place.
        layer.gamma -= 1e-4 * layer.dgamma
        layer.beta -= 1e-4 * layer.dbeta

    _loop(step, WARMUP)
    gc.collect()
    before = rss_bytes()
    peak_before = peak_rss_bytes()
    _loop(step, STEPS)
    gc.collect()
    after = rss_bytes()
    peak_after = peak_rss_bytes()
    assert after - before < GROWTH_BOUND, (
        f"RSS grew by {(after - before) / MB:.2f} MB over {STEPS} steps"
    )
    if peak_before is not None:
        assert peak_after - peak_before < GROWTH_BOUND, (
            f"peak RSS grew by {(peak_after - peak_before) / MB:.2f} MB over {STEPS} steps"
        )
    assert layer.num_batches_tracked == (WARMUP + STEPS) - (WARMUP + STEPS) // 10
    assert np.all(np.isfinite(layer.running_mean)) and np.all(np.isfinite(layer.running_var))


@needs_statm
def test_rss_flat_over_a_long_functional_loop():
    """The functional entry points, errors included, hold on to nothing either."""
    rng = np.random.default_rng(77)
    x = (rng.uniform(-2, 2, (1, 16, 1, 1)) + rng.standard_normal((32, 16, 5, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    beta = rng.uniform(-1, 1, 16).astype(np.float32)
    bad = x.copy()
    bad[3, 4, 2, 2] = np.nan
    y_buf = np.empty_like(x)

    def step(i):
        y, mean, var = F.batch_norm_train(x, gamma, beta, out=y_buf)
        F.batch_norm_eval(x, mean, var, gamma, beta, activation="relu")
        F.batch_norm_backward(dy, x, mean, var, gamma, beta)
        if i % 50 == 0:
            # Error paths allocate scratch in the kernels too; it must be freed.
            with pytest.raises(FloatingPointError):
                F.batch_norm_train(bad)

    _loop(step, WARMUP)
    gc.collect()
    before = rss_bytes()
    _loop(step, STEPS)
    gc.collect()
    after = rss_bytes()
    assert after - before < GROWTH_BOUND, (
        f"RSS grew by {(after - before) / MB:.2f} MB over {STEPS} functional steps"
    )


# ---------------------------------------------------------------------------
# Inputs past 2**31 values
# ---------------------------------------------------------------------------

# x itself: 2**31 + a few float32 values = 8.6 GB. The test never allocates a
# second array of that size: statistics need no output, and the training
# forward writes over x (out=x). Chunked checks use ~0.3 GB of scratch.
BIG_NEED = 10 * (1 << 30)
CHUNK = 1 << 24

slow = pytest.mark.skipif(
    os.environ.get("CBN_SLOW_TESTS") != "1", reason="slow: set CBN_SLOW_TESTS=1 to run"
)


def _skip_if_short_of_memory():
    avail = available_memory_bytes()
    if avail is None:
        pytest.skip("cannot tell the available memory (no /proc/meminfo)")
    if avail < BIG_NEED:
        pytest.skip(f"needs ~{BIG_NEED / (1 << 30):.0f} GB available, have {avail / (1 << 30):.1f} GB")


TAIL = 1000.0  # added to every value at flat index >= 2**31


def _fill(x, rng):
    """Random data with per-channel offsets, and a distinctive tail past element 2**31.

    Every value at flat index >= 2**31 gets +1000: an index that wrapped at
    2**31 would read (or write) the head of the array instead, and the
    statistics would miss the tail's contribution (at least 3 * 1000 / 2**30
    ~ 3e-6 of the mean, a million times the tolerance of the comparison).
    """
    outer, C = x.shape[0], x.shape[1]
    inner = x.size // (outer * C)
    flat = x.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        stop = min(start + CHUNK, flat.size)
        rng.standard_normal(stop - start, dtype=np.float32, out=flat[start:stop])
    offsets = np.arange(C, dtype=np.float32) * 2.0 - 1.0
    if inner == 1:
        x2 = x.reshape(outer, C)
        rows = max(1, CHUNK // C)
        for r in range(0, outer, rows):
            x2[r : r + rows] += offsets
    else:
        x3 = x.reshape(outer, C, inner)
        for n in range(outer):
            for c in range(C):
                x3[n, c] += offsets[c]
    flat[2**31 :] += np.float32(TAIL)


def _chunked_stats(x3):
    """Per-channel mean and biased variance in float64, chunk by chunk (two passes)."""
    outer, C, inner = x3.shape
    m = outer * inner
    rows = max(1, CHUNK // C)
    sums = np.zeros(C)
    for n, s, block in _blocks(x3, rows):
        sums += block
    mean = sums / m
    sq = np.zeros(C)
    for n, s, block in _blocks(x3, rows, mean):
        sq += block
    return mean, sq / m


def _blocks(x3, rows, mean=None):
    """Yield per-channel partial sums (of x, or of (x - mean)**2) over chunks of x3."""
    outer, C, inner = x3.shape
    if inner == 1:
        x2 = x3.reshape(outer, C)
        for r in range(0, outer, rows):
            b = x2[r : r + rows].astype(np.float64)
            if mean is not None:
                b -= mean
                b *= b
            yield r, 0, b.sum(axis=0)
    else:
        for n in range(outer):
            for s in range(0, inner, CHUNK):
                b = x3[n, :, s : s + CHUNK].astype(np.float64)
                if mean is not None:
                    b -= mean[:, None]
                    b *= b
                yield n, s, b.sum(axis=1)


@slow
@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 2**29 + 1),  # inner > 1 path: rows (n, c) start past 2**31 (3 * (2**29+1))
        (2**30 + 3, 2),  # inner == 1 path: 2**31 + 6 values, rows past 2**30
    ],
    ids=["NCL-inner", "NC-rows"],
)
def test_statistics_and_inplace_normalization_past_2_31_elements(shape):
    _skip_if_short_of_memory()
    axis = 1
    size = int(np.prod(shape))
    assert size > 2**31
    rng = np.random.default_rng(31)
    x = np.empty(shape, dtype=np.float32)
    outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    x3 = x.reshape(outer, C, inner)
    _fill(x, rng)

    # 1. Statistics (no output array) against a chunked float64 computation.
    mean, var = F.batch_stats(x, axis=axis, n_threads=-1)
    mean_ref, var_ref = _chunked_stats(x3)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(var, var_ref, rtol=1e-9)
    # The tolerance is far below the tail's share of the mean, so a kernel that
    # wrapped its index at 2**31 (and missed or misread the tail) would fail.
    tail_share = (size - 2**31) * TAIL / (size // C)
    assert tail_share > 1e3 * 1e-9 * np.abs(mean_ref).max()

    # 2. In-place training forward. Keep copies of the last row and the row that
    # straddles element 2**31, to check the values written there.
    flat = x.reshape(-1)
    probes = {
        "tail": slice(size - 4096, size),
        "at-2**31": slice(2**31 - 2048, min(2**31 + 2048, size)),
    }
    before = {k: flat[s].astype(np.float64) for k, s in probes.items()}
    probe_channels = {k: (np.arange(s.start, s.stop) // inner) % C for k, s in probes.items()}
    gamma = np.array([1.5, 0.5][:C] + [1.0] * max(0, C - 2), dtype=np.float32)
    beta = np.array([-0.25, 0.75][:C] + [0.0] * max(0, C - 2), dtype=np.float32)
    y, mean2, var2 = F.batch_norm_train(x, gamma, beta, axis=axis, out=x, n_threads=-1)
    assert np.shares_memory(y, x)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(var2, var)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    for k, s in probes.items():
        c = probe_channels[k]
        want = (before[k] - mean[c]) * invstd[c] * gamma[c] + beta[c]
        got = flat[s].astype(np.float64)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=k)
    # And the output as a whole has mean beta and variance gamma**2 (var >> eps).
    y_mean, y_var = _chunked_stats(x3)
    np.testing.assert_allclose(y_mean, beta, atol=1e-4)
    np.testing.assert_allclose(y_var, gamma.astype(np.float64) ** 2, rtol=1e-4)
    del x, x3, y, flat
    gc.collect()
