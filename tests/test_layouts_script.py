"""benchmarks/layouts.py (NCHW views of channels-last memory, as they lie against
a copy to C order first), on tiny cases."""

import numpy as np
import pytest

from cbn import functional as F


@pytest.mark.parametrize("with_torch", [False, True])
def test_measure_reports_times_and_ratios(benchmark_script, with_torch):
    script = benchmark_script("layouts")
    torch = pytest.importorskip("torch") if with_torch else None
    rows = script.measure((6, 3, 5, 4), "float32", torch, rounds=2, target_time=0.002)
    assert [r["op"] for r in rows] == list(script.OPS)
    names = {"view", "copied"} | ({"torch"} if with_torch else set())
    for row in rows:
        assert row["case"] == "6x3x5x4 float32" and set(row["ms"]) == names
        assert all(np.isfinite(t) and t > 0 for t in row["ms"].values())
        assert row["speedup_copied"] == pytest.approx(row["ms"]["copied"] / row["ms"]["view"])
        assert ("speedup_torch" in row) == with_torch


def test_the_views_are_channels_last_memory_and_the_calls_agree(benchmark_script):
    """The timed batches are NCHW views of NHWC arrays; cbn on the view and on its
    C-ordered copy computes the same values (the view's laid out as the view)."""
    script = benchmark_script("layouts")
    rng = np.random.default_rng()
    xs = script.views((4, 3, 5, 6), "float64", rng, n=2)
    dys = script.views((4, 3, 5, 6), "float64", rng, n=2)
    assert all(x.shape == (4, 3, 5, 6) and F.memory_order(x) == (0, 2, 3, 1) for x in xs)
    view, copied = script.cbn_calls(xs, dys, False), script.cbn_calls(xs, dys, True)
    for op in script.OPS:
        a, b = view[op](1), copied[op](1)
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        assert a[0].strides == xs[1].strides and b[0].flags.c_contiguous
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


def test_case_parsing_takes_nchw_shapes_only(benchmark_script):
    script = benchmark_script("layouts")
    assert script._case("8x4x3x3:float64") == ((8, 4, 3, 3), "float64")
    for bad in ("8x4x3x3", "8x4x3x3:int8", "8x4:float32", "8x3x3x4:nhwc:float32"):
        with pytest.raises(Exception, match="case|shape|layout"):
            script._case(bad)


def test_main_measures_the_cases_and_writes_json(benchmark_script, tmp_path, capsys):
    import json

    script = benchmark_script("layouts")
    out = tmp_path / "layouts.json"
    assert script.main(["--cases", "4x3x2x2:float64", "--no-torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(script.OPS) and all("4x3x2x2 float64" in line for line in printed)
    record = json.loads(out.read_text())
    assert {"machine", "allocator", "cases"} <= set(record)
    assert [r["op"] for r in record["cases"]] == list(script.OPS)
