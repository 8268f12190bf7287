"""The control run of benchmarks/control.py (PyTorch against itself), on a tiny case."""

import pytest

from cbn import benchmark as B

torch = pytest.importorskip("torch")


def test_control_reports_torch_against_itself_and_against_cbn(benchmark_script):
    control = benchmark_script("control")
    config = B.BenchConfig(shapes=[B.parse_shape("64x16"), B.parse_shape("4x3x5x5")],
                           dtypes=["float32"], ops=["fwd-eval", "backward"],
                           target_time=0.002, min_repeats=3, max_repeats=6, rounds=2,
                           cache_bytes=1 << 20)
    rows = control.control(torch, config)
    assert [r["case"] for r in rows] == ["64x16 float32 fwd-eval", "64x16 float32 backward",
                                         "4x3x5x5 float32 fwd-eval", "4x3x5x5 float32 backward"]
    for r in rows:
        assert r["torch_vs_torch"] > 0 and r["torch_over_cbn"] > 0
