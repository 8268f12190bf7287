"""benchmarks/onednn.py: oneDNN's batch norm as a peer, called through a compiled shim.

The tests that run oneDNN skip where it is not installed (the test extra does not
install it; ``pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0``
does) or no C compiler is found.
"""

import numpy as np
import pytest

from cbn import benchmark as B


@pytest.fixture
def script(benchmark_script):
    return benchmark_script("onednn")


@pytest.fixture
def shim(script, tmp_path):
    try:
        root = script.find_onednn()
        return script.compile_shim(str(tmp_path), root)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def test_layouts_follow_the_case(script):
    """The case's own layout first; the blocked one only for NCHW with C a multiple of 16."""
    P = B.parse_shape
    assert script.layouts(P("64x100")) == [("onednn", script.PLAIN)]
    assert script.layouts(P("8x32x5x7")) == [("onednn", script.PLAIN),
                                             ("onednn:blocked", script.BLOCKED)]
    assert script.layouts(P("8x10x5x7")) == [("onednn", script.PLAIN)]
    assert script.layouts(P("8x5x7x32:nhwc")) == [("onednn", script.NHWC)]
    assert script.logical_dims(P("8x5x7x32:nhwc")) == (8, 32, 5, 7)
    for unsupported in ("4x5x6", "2x3x4x5x6", "4x5x6:nhwc"):
        assert script.layouts(P(unsupported)) == []
        with pytest.raises(ValueError, match="2-D, NCHW and NHWC"):
            script._supported(P(unsupported))


def test_blocked_layout_is_nChw16c(script):
    rng = np.random.default_rng()
    n, c, h, w = (int(v) for v in rng.integers(1, 5, 4))
    c *= script.BLOCK
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    xb = script.to_blocked(x)
    assert xb.shape == (n, c // 16, h, w, 16) and xb.flags.c_contiguous
    i, j, k, m = (int(rng.integers(0, d)) for d in (n, c, h, w))
    assert xb[i, j // 16, k, m, j % 16] == x[i, j, k, m]
    np.testing.assert_array_equal(script.from_blocked(xb), x)


def test_buffers_are_aligned_and_keep_their_data(script):
    """Every rotated x, dy and output starts on a 64-byte boundary with the data
    bench.py's buffers hold (NumPy's own start 16 bytes apart); None keeps NumPy's."""
    spec = B.parse_shape("37x100")
    buf = script.aligned_buffers(spec, 5, None, script.ALIGN)
    plain = B._Buffers(spec, np.float32, 5, None)
    for arrays, expected in ((buf.xs, plain.xs), (buf.dys, plain.dys)):
        for a, e in zip(arrays, expected):
            assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous
            np.testing.assert_array_equal(a, e)
    assert all(o.ctypes.data % 64 == 0 for o in buf.outs)
    rng = np.random.default_rng()
    a = rng.standard_normal((int(rng.integers(1, 9)), 3)).astype(np.float32)
    assert script.aligned_copy(a, None) is a
    for align in (64, 4096):
        c = script.aligned_copy(a, align)
        assert c.ctypes.data % align == 0
        np.testing.assert_array_equal(c, a)


def test_missing_onednn_is_named(script, tmp_path, monkeypatch):
    monkeypatch.setenv("DNNL_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="onednn-cpu-gomp"):
        script.find_onednn()
    assert script.main(["--shapes", "64x100", "--processes", "1"]) == 1


def test_bad_options_exit_2(script):
    assert script.main(["--shapes", "4x5x6"]) == 2
    assert script.main(["--processes", "0"]) == 2
    assert script.main(["--target-time", "0"]) == 2


def test_summary_counts_cases_by_their_median(script):
    """cbn's speed-up per case is the median over the processes; a contender's count
    is of the cases whose median is at least 1."""
    def row(case, cbn, other):
        return {"case": case, "median_s": {"cbn": cbn, "onednn": other}}
    rows = [row("a", 1.0, 2.0), row("a", 1.0, 0.5), row("a", 1.0, 1.2),
            row("b", 2.0, 1.0), row("b", 2.0, 1.0), row("b", 2.0, 3.0)]
    per_case, totals = script.summarize(rows)
    assert per_case["a"]["onednn"] == {"median": 1.2, "min": 0.5, "max": 2.0}
    assert per_case["b"]["onednn"]["median"] == 0.5
    assert totals["onednn"]["at_least_as_fast"] == 1 and totals["onednn"]["cases"] == 2


SHAPES = ("37x100", "64x48", "3x32x5x7", "4x48x3x3", "2x3x4x16:nhwc", "5x16x1x9")


@pytest.mark.parametrize("op", ["fwd-train", "fwd-eval", "backward"])
@pytest.mark.parametrize("shape", SHAPES)
def test_shim_computes_batch_norm(script, shim, shape, op):
    """oneDNN through the shim matches the float64 reference on fresh random data, in
    every layout the benchmark uses it in."""
    spec = B.parse_shape(shape)
    rng = np.random.default_rng()
    for label, tag in script.layouts(spec):
        kernel = script.check(shim, spec, tag, op, rng)
        assert isinstance(kernel, str) and kernel, label


@pytest.mark.parametrize("op", ["fwd-train", "fwd-eval", "backward"])
def test_a_wrong_result_is_caught(script, shim, monkeypatch, op):
    """check() must notice one output value off by one, in y or dx."""
    rng = np.random.default_rng()
    forward, backward = script.Primitive.forward, script.Primitive.backward

    def bad_forward(self, x, y, *rest):
        forward(self, x, y, *rest)
        y.flat[int(rng.integers(y.size))] += 1.0

    def bad_backward(self, x, dy, mean, var, scale, dx, *rest):
        backward(self, x, dy, mean, var, scale, dx, *rest)
        dx.flat[int(rng.integers(dx.size))] += 1.0

    monkeypatch.setattr(script.Primitive, "forward", bad_forward)
    monkeypatch.setattr(script.Primitive, "backward", bad_backward)
    for shape in ("64x48", "3x32x5x7"):
        spec = B.parse_shape(shape)
        for _, tag in script.layouts(spec):
            with pytest.raises(RuntimeError, match="disagrees"):
                script.check(shim, spec, tag, op, rng)


def test_two_thread_primitive_computes_the_same(script, shim):
    """A primitive made for two threads (oneDNN fixes the count at creation) gives the
    one-thread primitive's result to float32 rounding."""
    spec = B.parse_shape("64x3x3x48:nhwc")
    rng = np.random.default_rng()
    C = spec.channels
    x = (rng.standard_normal(spec.shape) * 2 + 1).astype(np.float32)
    g, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    results = []
    for threads in (1, 2):
        y, m, v = (np.full_like(x, np.nan), np.full(C, np.nan, np.float32),
                   np.full(C, np.nan, np.float32))
        with script.Primitive(shim, script.logical_dims(spec), script.NHWC, "fwd-train",
                              threads=threads) as prim:
            prim.forward(x, y, g, b, m, v)
        results.append((y, m, v))
    for one, two in zip(*results):
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)


def test_refused_primitive_raises(script, shim):
    with pytest.raises(RuntimeError, match="refused"):
        script.Primitive(shim, (4, 5, 6), script.PLAIN, "fwd-eval")


@pytest.mark.parametrize("align", [64, None])
@pytest.mark.parametrize("next_layer", [False, True])
def test_measure_times_every_contender(script, shim, next_layer, align):
    torch = B._import_torch()
    spec = B.parse_shape("4x32x6x6")
    config = B.BenchConfig(shapes=[spec], dtypes=["float32"], threads=[1], target_time=0.005,
                           min_repeats=2, rounds=2, cache_bytes=1 << 16)
    for op in ("fwd-train", "fwd-eval", "backward"):
        t = script.measure(shim, torch, spec, op, 1, config, next_layer, align)
        expected = {"cbn", "cbn:stream", "onednn", "onednn:blocked"} | (
            {"torch"} if torch is not None else set())
        assert set(t) == expected
        assert all(v > 0 for v in t.values())


def test_command_line_runs_and_writes_json(script, shim, tmp_path, capsys):
    import json
    path = tmp_path / "onednn.json"
    status = script.main(["--shapes", "64x48", "--threads", "1", "--ops", "fwd-eval",
                          "--processes", "2", "--target-time", "0.005", "--json", str(path)])
    assert status == 0
    record = json.loads(path.read_text())
    assert record["processes"] == 2 and len(record["rows"]) == 2
    assert record["per_case"]["64x48 fwd-eval t1"]["onednn"]["median"] > 0
    assert "cbn vs onednn" in capsys.readouterr().out
