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
    one, _ = ceiling.bounds((rows, "float32", "fwd-train"), times)
    assert "torch_at_most" not in one
    no_torch = {k: v for k, v in times.items() if k != "torch"}
    one, _ = ceiling.bounds((nchw, "float32", "fwd-train"), no_torch)
    assert "torch_at_most" not in one and "torch_s" not in one


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
    expected = {"cbn"} | loops | ({"torch"} if torch is not None else set())
    assert set(times) == expected | {"with_one"}
    for impl in expected:
        assert set(times[impl]) == set(ceiling.THREADS)
        assert all(np.isfinite(v) and v > 0 for v in times[impl].values())
    assert set(times["with_one"]) == loops
    assert all(np.isfinite(v) and v > 0 for v in times["with_one"].values())
    assert len(ceiling.bounds((spec, "float32", op), times)) == 2
