"""benchmarks/in_cache.py (cbn against PyTorch without input rotation), on tiny cases."""

import json

import numpy as np
import pytest

from cbn import benchmark as B

torch = pytest.importorskip("torch")


def test_measure_reports_rates_and_the_ratio(benchmark_script):
    script = benchmark_script("in_cache")
    spec = B.parse_shape("8x3x5x5")
    row = script.measure(torch, spec, "float64", "backward", 1, repeats=2, rounds=2,
                         target_time=0.002)
    assert row["case"] == "8x3x5x5 float64 backward" and row["nbytes"] == 8 * 3 * 25 * 8
    for key in ("cbn_gbps", "torch_gbps", "speedup_torch"):
        assert np.isfinite(row[key]) and row[key] > 0
    # the ratio is the rates' ratio: both count the same bytes
    assert row["speedup_torch"] == pytest.approx(row["cbn_gbps"] / row["torch_gbps"])


def test_command_line(benchmark_script, capsys, tmp_path):
    script = benchmark_script("in_cache")
    path = tmp_path / "c.json"
    assert script.main(["--shapes", "16x4", "--threads", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16x4 float32 fwd-train" in out and "16x4 float64 backward" in out
    assert "in cache, 2 thread(s)" in out
    record = json.loads(path.read_text())
    assert record["threads"] == 2 and len(record["cases"]) == 2 * 3
    assert script.main(["--threads", "0"]) == 2
