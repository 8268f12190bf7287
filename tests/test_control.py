"""The control run of benchmarks/control.py (PyTorch against itself), on a tiny case."""

import json

import numpy as np
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
    assert all(r["threads"] == 1 and len(r["torch_over_cbn_runs"]) == 1 for r in rows)


def test_control_repeats_give_medians_ranges_and_the_verdict(benchmark_script):
    """--repeats: each case measured N times; the verdict compares cbn's deficit
    with PyTorch's widest distance from itself."""
    control = benchmark_script("control")
    config = B.BenchConfig(shapes=[B.parse_shape("32x8")], dtypes=["float64"],
                           ops=["fwd-eval"], target_time=0.002, min_repeats=3,
                           max_repeats=6, rounds=2, cache_bytes=1 << 20)
    (row,) = control.control(torch, config, threads=2, repeats=3)
    assert row["threads"] == 2
    assert len(row["torch_vs_torch_runs"]) == len(row["torch_over_cbn_runs"]) == 3
    assert row["torch_over_cbn"] == sorted(row["torch_over_cbn_runs"])[1]

    rng = np.random.default_rng()
    a, c = rng.uniform(1e-4, 2e-4, size=2)
    # PyTorch 2% apart from itself: cbn 10% behind trails beyond it, 1% behind does not
    assert control._row("x", 1, [(a, a * 1.02, a / 0.9)] * 3)["trails_beyond_control"]
    assert not control._row("x", 1, [(a, a * 1.02, a / 0.99)] * 3)["trails_beyond_control"]
    assert control._row("x", 1, [(a, a, c)])["trails_beyond_control"] == (a / c < 1)


def test_control_command_line(benchmark_script, capsys, tmp_path):
    control = benchmark_script("control")
    path = tmp_path / "c.json"
    assert control.main(["--shapes", "16x4", "--dtypes", "float32", "--ops", "backward",
                         "--repeats", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "16x4 float32 backward" in out and "cbn slower than PyTorch" in out
    record = json.loads(path.read_text())
    assert record["repeats"] == 2 and [r["case"] for r in record["cases"]] == [
        "16x4 float32 backward"]
    assert control.main(["--repeats", "0"]) == 2
    with pytest.raises(SystemExit):
        control.main(["--ops", "sideways"])
