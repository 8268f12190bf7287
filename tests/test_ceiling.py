"""benchmarks/ceiling.py: the machine's bandwidth ceilings and the bounds they give."""

import platform

import numpy as np
import pytest

from cbn import benchmark as B
from cbn import functional as F

MIB = 1 << 20


@pytest.fixture
def ceiling(benchmark_script):
    return benchmark_script("ceiling")


@pytest.fixture
def loops(ceiling, tmp_path):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the loops are x86-64 code")
    try:
        return ceiling.compile_loops(str(tmp_path))
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_loops_compute_what_they_time(ceiling, loops, threads):
    """Every loop on random arrays whose length is and is not a multiple of a
    line (each thread's share has a tail) matches a float64 reference."""
    rng = np.random.default_rng()
    for n in (int(rng.integers(1, 16)), int(rng.integers(100, 5000)), 16 * 337):
        dy, x = ceiling.aligned(n, rng), ceiling.aligned(n, rng)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        total = ceiling.kernel_call(loops, "read", [x], threads)()
        assert total == pytest.approx(x64.sum(), abs=1e-5 * np.abs(x64).sum() + 1e-6)
        for kernel in ("affine", "affine-cached"):
            y = ceiling.aligned(n)
            y[:] = np.nan
            ceiling.kernel_call(loops, kernel, [x, y], threads)()
            np.testing.assert_allclose(y, x64 * ceiling.A + ceiling.B_, rtol=1e-6, atol=1e-7)
        for kernel in ("grad", "grad-cached"):
            dx = ceiling.aligned(n)
            dx[:] = np.nan
            ceiling.kernel_call(loops, kernel, [dy, x, dx], threads)()
            np.testing.assert_allclose(dx, dy64 * ceiling.A + x64 * ceiling.B_, rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_cached_floor_runs_on_any_array(ceiling, loops, threads, dtype):
    """The cached floor loops run in place on a case's own arrays: either dtype,
    16-byte (not line) alignment, any length, several dimensions."""
    rng = np.random.default_rng()
    for shape in ((int(rng.integers(1, 9)),), (int(rng.integers(2, 40)), 37),
                  (3, int(rng.integers(1, 9)), 5, 7)):
        def make(shape=shape):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = np.empty(nbytes + 128, np.uint8)
            skip = (16 - raw.ctypes.data) % 64  # 16 bytes past a line
            a = raw[skip:skip + nbytes].view(dtype).reshape(shape)
            a[...] = rng.standard_normal(shape)
            assert a.ctypes.data % 64 == 16
            return a
        dy, x, y, dx = make(), make(), make(), make()
        ceiling.cached_call(loops, [x, y], threads)()
        np.testing.assert_allclose(y, x.astype(np.float64) * ceiling.A + ceiling.B_,
                                   rtol=1e-6, atol=1e-6)
        ceiling.cached_call(loops, [dy, x, dx], threads)()
        np.testing.assert_allclose(dx, dy.astype(np.float64) * ceiling.A
                                   + x.astype(np.float64) * ceiling.B_, rtol=1e-5, atol=1e-6)


def test_arrays_start_on_a_line(ceiling):
    rng = np.random.default_rng()
    for n in (1, 7, 1000):
        a = ceiling.aligned(n, rng)
        assert a.ctypes.data % 64 == 0 and a.size == n and a.dtype == np.float32
        assert np.isfinite(a).all() and np.unique(a).size == n


def test_measures_every_loop_on_both_thread_counts(ceiling, loops):
    config = B.BenchConfig(shapes=[], target_time=0.002, rounds=2, cache_bytes=1 << 16)
    rates = ceiling.measure_size(loops, 64 * 1024 + 100, config)
    assert set(rates) == {(k, t) for k in ceiling.KERNELS for t in ceiling.THREADS}
    assert all(np.isfinite(v) and v > 0 for v in rates.values())


def test_bounds_from_the_floors(ceiling):
    """The floor is the floor loop's time (its traffic is the case's least); the
    two-pass floor adds the read loop's; the two-thread bounds are cbn's one-thread
    time over the two-thread floors of the one-thread rounds; the PyTorch bounds
    only on NCHW training forwards; evaluation has no two-pass floor."""
    nchw, rows = B.parse_shape("8x4x32x32"), B.parse_shape("4096x256")
    times = {"cbn": {1: 2e-3, 2: 1.5e-3}, "floor": {1: 1e-3, 2: 0.8e-3},
             "read": {1: 0.5e-3, 2: 0.4e-3}, "torch": {1: 6e-3, 2: 4e-3},
             "with_one": {"floor": 0.7e-3, "read": 0.3e-3}}
    one, two = ceiling.bounds((nchw, "float64", "fwd-train"), times)
    assert one["case"] == "8x4x32x32 float64 fwd-train 1T" and one["nbytes"] == 8 * 4 * 32 * 32 * 8
    assert one["floor_s"] == pytest.approx(1e-3)
    assert one["cbn_over_floor"] == pytest.approx(0.5)
    assert one["two_pass_s"] == pytest.approx(1.5e-3)
    assert one["cbn_over_two_pass"] == pytest.approx(0.75)
    assert one["two_threads_at_most"] == pytest.approx(2e-3 / 0.7e-3)
    assert one["two_threads_two_pass"] == pytest.approx(2e-3 / 1.0e-3)
    assert one["torch_at_most"] == pytest.approx(6.0)
    assert one["torch_two_pass"] == pytest.approx(4.0)
    assert "two_threads_at_most" not in two and "two_threads_two_pass" not in two
    assert two["cbn_over_floor"] == pytest.approx(0.8e-3 / 1.5e-3)
    assert two["cbn_over_two_pass"] == pytest.approx(1.2e-3 / 1.5e-3)
    assert two["torch_at_most"] == pytest.approx(4e-3 / 0.8e-3)
    back, _ = ceiling.bounds((nchw, "float32", "backward"), times)
    assert back["cbn_over_two_pass"] == pytest.approx(0.75) and "torch_at_most" not in back
    no_read = {k: v for k, v in times.items() if k != "read"}
    no_read["with_one"] = {"floor": 0.7e-3}
    for r in ceiling.bounds((nchw, "float32", "fwd-eval"), no_read):
        assert "two_pass_s" not in r and "torch_at_most" not in r
        assert "two_threads_two_pass" not in r
    for r in ceiling.bounds((nchw, "float64", "fwd-train"), times):
        assert r["cbn_streams"] and "cbn_over_cached" not in r
        assert "torch_over_cached" not in r and "torch_at_most_cached" not in r
    one, _ = ceiling.bounds((rows, "float32", "fwd-train"), times)
    assert "torch_at_most" not in one
    no_torch = {k: v for k, v in times.items() if k != "torch"}
    one, _ = ceiling.bounds((nchw, "float32", "fwd-train"), no_torch)
    assert "torch_at_most" not in one and "torch_s" not in one


def test_bounds_from_the_cached_floor(ceiling):
    """Outputs written through the cache: cbn's and PyTorch's times against the
    cached floor loop's; PyTorch's time over it bounds NCHW training forward only."""
    nchw, rows = B.parse_shape("8x4x32x32"), B.parse_shape("4096x256")
    times = {"cbn": {1: 2e-3, 2: 1.5e-3}, "floor": {1: 1e-3, 2: 0.8e-3},
             "read": {1: 0.5e-3, 2: 0.4e-3}, "cached": {1: 1.6e-3, 2: 1.2e-3},
             "torch": {1: 4.8e-3, 2: 1.25e-3},
             "with_one": {"floor": 0.7e-3, "read": 0.3e-3}}
    one, two = ceiling.bounds((nchw, "float64", "fwd-train"), times)
    assert not one["cbn_streams"] and not two["cbn_streams"]
    assert one["cached_floor_s"] == pytest.approx(1.6e-3)
    assert one["cbn_over_cached"] == pytest.approx(0.8)
    assert one["torch_over_cached"] == pytest.approx(1.6 / 4.8)
    assert one["torch_at_most_cached"] == pytest.approx(3.0)
    assert two["cbn_over_cached"] == pytest.approx(0.8)
    assert two["torch_over_cached"] == pytest.approx(0.96)
    assert two["torch_at_most_cached"] == pytest.approx(1.25 / 1.2)
    assert one["torch_two_pass_cached"] == pytest.approx(4.8 / 2.1)
    assert two["torch_two_pass_cached"] == pytest.approx(1.25 / 1.6)
    for r in ceiling.bounds((rows, "float32", "fwd-eval"), times):
        assert "torch_over_cached" in r and "torch_at_most_cached" not in r
        assert "torch_two_pass_cached" not in r
    no_torch = {k: v for k, v in times.items() if k != "torch"}
    for r in ceiling.bounds((nchw, "float32", "backward"), no_torch):
        assert "cbn_over_cached" in r and "torch_over_cached" not in r


def test_summary_names_the_cases_at_the_cached_floor(ceiling, capsys):
    rows = [{"case": "a 1T", "torch_over_cached": 0.97},
            {"case": "b 1T", "torch_over_cached": 0.80},
            {"case": "c 2T", "torch_at_most_cached": 2.8, "torch_over_cached": 0.99,
             "torch_two_pass_cached": 2.1},
            {"case": "d 1T", "torch_at_most_cached": 4.0, "torch_over_cached": 0.3,
             "torch_two_pass_cached": 3.2}]
    ceiling._summary(rows)
    out = capsys.readouterr().out
    assert "PyTorch at 0.95 of the cached floor or more" in out
    assert "in 2 of 4: a 1T, c 2T" in out
    assert "the cached floor (y written through the cache) (bound under 3.0) in 1 of 2: c 2T" \
        in out
    assert ("the two-pass cached floor (a pass reading x, then y written through the cache) "
            "(bound under 3.0) in 1 of 2: c 2T") in out


def test_the_floor_loop_moves_the_least_traffic_of_each_op(ceiling):
    for kernel, least in ceiling.FLOOR_OF.values():
        assert sum(ceiling.KERNELS[kernel]) == least
        assert ceiling.KERNELS[kernel][1] == 1  # writes its one output once
        sets = ceiling._rotated_sets(least - 1, 4096 + 100, 3, np.random.default_rng())
        assert len(sets) == 3 and all(len(ceiling._loop_arrays(kernel, a)) == least for a in sets)
        assert all(np.isfinite(a).all() for s in sets for a in s[:-1])
        assert all(a.size == 1040 and a.ctypes.data % 64 == 0 for s in sets for a in s)


def test_sizes_of_four_mib_and_more(ceiling):
    shapes = [B.parse_shape(s) for s in ("256x1024", "4096x256", "32x64x56x56")]
    assert ceiling._sizes(shapes, ["float32", "float64"]) == [
        4 * MIB, 8 * MIB, 32 * 64 * 56 * 56 * 4, 32 * 64 * 56 * 56 * 8]
    assert ceiling._sizes(shapes[:1], ["float32"]) == []


@pytest.mark.parametrize("op", ["fwd-train", "fwd-eval", "backward"])
def test_measures_a_case_against_its_floor(ceiling, loops, op):
    torch = B._import_torch()
    config = B.BenchConfig(shapes=[], target_time=0.002, rounds=2, cache_bytes=1 << 16)
    spec = B.parse_shape("4x8x16x16")
    times = ceiling.measure_case(loops, torch, spec, "float32", op, config)
    loops = {"floor", "read"} if op in ceiling.TWO_PASS else {"floor"}
    assert not F.streams(spec.nbytes("float32"))  # so the cached floor is timed too
    expected = {"cbn", "cached"} | loops | ({"torch"} if torch is not None else set())
    assert set(times) == expected | {"with_one"}
    for impl in expected:
        assert set(times[impl]) == set(ceiling.THREADS)
        assert all(np.isfinite(v) and v > 0 for v in times[impl].values())
    assert set(times["with_one"]) == loops
    assert all(np.isfinite(v) and v > 0 for v in times["with_one"].values())
    assert len(ceiling.bounds((spec, "float32", op), times)) == 2
