"""Outputs of 32 MiB and more live in blocks that, once released, are kept for
the next output of about their size (``_kernels``, "Reuse of large outputs"):
fresh blocks from malloc page-fault on every page."""

import os
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import cbn
from cbn import functional as F

MIN = cbn.cache_info()["min_bytes"]


@pytest.fixture(autouse=True)
def fresh_cache(empty_output_cache):
    """Each test starts with an empty cache of 1 GiB and leaves one (conftest)."""


def big_batch(rng, dtype=np.float32, channels=None, extra=0):
    """A random (N, C, H, W) batch just over the cache's smallest block."""
    itemsize = np.dtype(dtype).itemsize
    C = channels or int(rng.integers(2, 9))
    HW = 1024
    N = (MIN // (itemsize * C * HW)) + 1 + extra
    x = rng.standard_normal((N, C, 32, 32)).astype(dtype)
    x *= rng.uniform(0.5, 3.0, size=(1, C, 1, 1)).astype(dtype)
    x += rng.uniform(-2, 2, size=(1, C, 1, 1)).astype(dtype)
    return x


def address(a):
    return a.__array_interface__["data"][0]


def near(a, addresses):
    """Whether ``a`` starts in the block of one of ``addresses``: an output
    starts within a page of its block's start, at an offset chosen against
    its input's (see _fresh), so the same block may give another address."""
    return any(abs(address(a) - at) < 2 * 4096 for at in addresses)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_released_output_is_reused_and_rewritten_whole(dtype):
    """The next output of the same size lands in the released block, and every
    value of it is written: the block is filled with NaN before release."""
    rng = np.random.default_rng()
    x = big_batch(rng, dtype)
    y = F.batch_norm_train(x)[0]
    at = address(y)
    assert cbn.cache_info()["blocks"] == 0
    y[...] = np.nan
    del y
    info = cbn.cache_info()
    assert info["blocks"] == 1 and info["bytes"] >= x.nbytes
    x2 = big_batch(rng, dtype, channels=x.shape[1])
    y2 = F.batch_norm_train(x2)[0]
    assert near(y2, [at]) and cbn.cache_info()["blocks"] == 0
    x64 = x2.astype(np.float64)
    m = x64.mean(axis=(0, 2, 3), keepdims=True)
    v = x64.var(axis=(0, 2, 3), keepdims=True)
    expected = (x64 - m) / np.sqrt(v + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y2, expected, rtol=tol, atol=tol)


def test_a_training_loop_reuses_blocks_for_y_and_dx():
    """y = bn(x); dx = bn.backward(dy), step after step: from the third step on,
    every output is written into a block released by the step before."""
    rng = np.random.default_rng()
    x = big_batch(rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = cbn.BatchNorm(x.shape[1], activation="relu")
    seen = set()
    y = dx = None
    for step in range(5):
        y = bn(x)
        dx = bn.backward(dy)
        if step >= 2:
            assert near(y, seen) and near(dx, seen)
        seen |= {address(y), address(dx)}
    ref = cbn.BatchNorm(x.shape[1], activation="relu")
    cbn.set_cache_limit(0)
    for _ in range(5):
        ref_y = ref(x)
        ref_dx = ref.backward(dy)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(dx, ref_dx)


def test_a_view_keeps_its_block_out_of_the_cache():
    rng = np.random.default_rng()
    x = big_batch(rng)
    y = F.batch_norm_train(x)[0]
    half = y[::2]
    expected = half.copy()
    del y
    assert cbn.cache_info()["blocks"] == 0
    z = F.batch_norm_train(x)[0]  # must not take half's memory
    np.testing.assert_array_equal(half, expected)
    assert not np.shares_memory(z, half)
    del half
    assert cbn.cache_info()["blocks"] == 1


def test_blocks_of_other_sizes_are_not_taken():
    """A block is taken only for an output of 4/5 to all of its size."""
    rng = np.random.default_rng()
    big = big_batch(rng, channels=4, extra=MIN // (4 * 4 * 1024))  # twice the smallest block
    y = F.batch_norm_train(big)[0]
    at = address(y)
    del y
    small = big_batch(rng, channels=4)
    z = F.batch_norm_train(small)[0]
    assert not near(z, [at]) and cbn.cache_info()["blocks"] == 1


def test_the_limit_and_the_slots_bound_what_is_kept():
    rng = np.random.default_rng()
    x = big_batch(rng)
    ys = [F.batch_norm_train(x)[0] for _ in range(10)]
    addresses = [address(y) for y in ys]
    for i in range(len(ys)):  # released first to last
        ys[i] = None
    info = cbn.cache_info()
    assert info["blocks"] == info["slots"] == 8
    one = info["bytes"] // 8
    # the two oldest went; of equal blocks the oldest kept is taken first
    y = F.batch_norm_train(x)[0]
    assert near(y, addresses[2:3])
    del y
    assert cbn.set_cache_limit(3 * one) == 1 << 30
    info = cbn.cache_info()
    assert info["blocks"] == 3 and info["bytes"] == 3 * one and info["limit"] == 3 * one
    assert cbn.empty_cache() == 3 * one
    assert cbn.cache_info()["blocks"] == 0
    cbn.set_cache_limit(one - 1)  # no block fits: none is kept
    y = F.batch_norm_train(x)[0]
    del y
    assert cbn.cache_info()["blocks"] == 0
    assert cbn.empty_cache() == 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                        ("1", TypeError), (None, TypeError)])
def test_set_cache_limit_refuses_bad_values_and_keeps_the_limit(bad, error):
    before = cbn.cache_info()["limit"]
    with pytest.raises(error, match="nbytes"):
        cbn.set_cache_limit(bad)
    assert cbn.cache_info()["limit"] == before


def test_a_huge_limit_is_taken():
    cbn.set_cache_limit(1 << 70)
    assert cbn.cache_info()["limit"] == (1 << 64) - 1


def test_tracemalloc_counts_the_blocks():
    rng = np.random.default_rng()
    x = big_batch(rng)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        y = F.batch_norm_train(x)[0]
        assert tracemalloc.get_traced_memory()[0] - before >= y.nbytes
        cbn.set_cache_limit(0)
        del y
        assert tracemalloc.get_traced_memory()[0] - before < MIN
    finally:
        tracemalloc.stop()


def test_outputs_from_several_threads():
    """Evaluation forwards in threads allocate and release blocks side by side;
    each result is the single-threaded one."""
    rng = np.random.default_rng()
    x = big_batch(rng, channels=4)
    bn = cbn.BatchNorm(4)
    bn(x)
    bn.eval()
    expected = bn(x)
    failures = []

    def work():
        for _ in range(3):
            if not np.array_equal(bn(x), expected):
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert cbn.cache_info()["blocks"] <= 8


# CBN_CACHE_BYTES's parsing is tested with the other byte settings
# (test_streaming.py::test_byte_settings_from_environment).
def test_the_environment_sets_the_limit_at_import():
    code = "import cbn; print(cbn.cache_info()['limit'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CBN_CACHE_BYTES": "12345"}, cwd="/",
                         check=True)
    assert out.stdout.strip() == "12345"


def test_an_output_without_memory_raises_memoryerror_and_changes_nothing():
    """x fits, y does not (an address-space limit set after x exists)."""
    if cbn.build_info()["sanitized"]:
        pytest.skip("AddressSanitizer reserves its shadow memory: RLIMIT_AS would stop it")
    code = """
import resource, numpy as np, cbn
from cbn import functional as F
rng = np.random.default_rng()
x = rng.standard_normal((64, 4, 512, 256)).astype(np.float32)  # 128 MiB
bn = cbn.BatchNorm(4)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
for call in (lambda: bn(x), lambda: F.batch_norm_train(x)):
    try:
        call()
    except MemoryError as exc:
        assert "Unable to allocate" in str(exc) and "cbn" in str(exc), exc
    else:
        raise SystemExit("no MemoryError")
assert bn.num_batches_tracked == 0 and not bn.running_mean.any()
assert (bn.running_var == 1).all()
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
y = bn(x)  # memory again: the layer works
assert bn.num_batches_tracked == 1 and abs(float(y.mean())) < 1e-3
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
