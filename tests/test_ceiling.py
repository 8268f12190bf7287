"""benchmarks/ceiling.py: the machine's bandwidth ceilings and the bounds they give."""

import platform

import numpy as np
import pytest

from cbn import benchmark as B

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
        dx = ceiling.aligned(n)
        dx[:] = np.nan
        ceiling.kernel_call(loops, "grad", [dy, x, dx], threads)()
        np.testing.assert_allclose(dx, dy64 * ceiling.A + x64 * ceiling.B_, rtol=1e-5,
                                   atol=1e-6)


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


def _case(shape, layout, dtype, op, threads, nbytes, cbn_s, torch_s=None):
    times = {"cbn": {"median_s": cbn_s}}
    if torch_s is not None:
        times["torch"] = {"median_s": torch_s}
    return {"shape_name": shape, "layout": layout, "dtype": dtype, "op": op,
            "threads": threads, "nbytes": nbytes, "times": times}


def test_bounds_from_the_least_traffic(ceiling):
    """Floors are the least traffic (2 arrays forward, 3 backward) at the matching
    ceiling; the two-thread bound is cbn's one-thread time over the two-thread
    floor; the PyTorch bound only on NCHW training forwards; small arrays skipped."""
    S = 8 * MIB
    rates = {("affine", 1): 20.0, ("affine", 2): 25.0, ("grad", 1): 18.0, ("grad", 2): 24.0,
             ("read", 1): 15.0, ("read", 2): 20.0, ("affine-cached", 1): 12.0,
             ("affine-cached", 2): 14.0}
    bench = {"cases": [
        _case("a", "NCHW", "float64", "fwd-train", 1, S, 2e-3, torch_s=4e-3),
        _case("a", "NCHW", "float64", "fwd-train", 2, S, 1.5e-3, torch_s=2e-3),
        _case("a", "NCHW", "float64", "backward", 1, S, 3e-3),
        _case("b", "NC", "float32", "fwd-eval", 1, S, 1e-3, torch_s=1e-3),
        _case("c", "NC", "float32", "fwd-eval", 1, MIB, 1e-4, torch_s=1e-4),
    ]}
    rows = {r["case"]: r for r in ceiling.bounds(bench, {S: rates, MIB: rates})}
    assert set(rows) == {"a float64 fwd-train 1T", "a float64 fwd-train 2T",
                         "a float64 backward 1T", "b float32 fwd-eval 1T"}
    floor1, floor2 = 2 * S / 20e9, 2 * S / 25e9
    r = rows["a float64 fwd-train 1T"]
    assert r["floor_s"] == pytest.approx(floor1)
    assert r["cbn_over_floor"] == pytest.approx(floor1 / 2e-3)
    assert r["two_threads_at_most"] == pytest.approx(2e-3 / floor2)
    assert r["torch_at_most"] == pytest.approx(4e-3 / floor1)
    r = rows["a float64 fwd-train 2T"]
    assert "two_threads_at_most" not in r
    assert r["torch_at_most"] == pytest.approx(2e-3 / floor2)
    r = rows["a float64 backward 1T"]
    assert r["floor_s"] == pytest.approx(3 * S / 18e9)
    assert "two_threads_at_most" not in r and "torch_at_most" not in r
    assert "torch_at_most" not in rows["b float32 fwd-eval 1T"]


def test_sizes_are_those_of_the_bench_or_the_default_shapes(ceiling):
    bench = {"cases": [_case("a", "NC", "float32", "fwd-eval", 1, n, 1.0)
                       for n in (MIB, 4 * MIB, 9 * MIB, 4 * MIB)]}
    assert ceiling._sizes(bench) == [4 * MIB, 9 * MIB]
    default = ceiling._sizes(None)
    assert default == sorted(set(default)) and min(default) >= 4 * MIB
    assert 49 * MIB in default  # 32x64x56x56 float64
