"""benchmarks/layer_step.py (the layer's output cache against fresh pages), on tiny cases."""

import json

import numpy as np
import pytest

import cbn
from cbn import benchmark as B


@pytest.mark.parametrize("with_torch", [False, True])
def test_measure_reports_times_faults_and_ratios(benchmark_script, with_torch):
    script = benchmark_script("layer_step")
    torch = pytest.importorskip("torch") if with_torch else None
    limit = cbn.cache_info()["limit"]
    row = script.measure(B.parse_shape("6x3x5x5"), "float64", torch, rounds=2,
                         target_time=0.002)
    assert cbn.cache_info()["limit"] == limit  # restored after the fresh variant
    assert row["case"] == "6x3x5x5 float64" and row["nbytes"] == 6 * 3 * 25 * 8
    names = {"cached", "fresh"} | ({"torch"} if with_torch else set())
    assert set(row["ms"]) == set(row["faults"]) == names
    assert all(np.isfinite(t) and t > 0 for t in row["ms"].values())
    assert all(isinstance(f, int) and f >= 0 for f in row["faults"].values())
    assert row["cache_speedup"] == pytest.approx(row["ms"]["fresh"] / row["ms"]["cached"])
    assert ("speedup_torch" in row) == with_torch


def test_the_cbn_step_is_the_layer_step(benchmark_script):
    """The timed step is the layer's forward and backward, y and dx as the layer's."""
    script = benchmark_script("layer_step")
    rng = np.random.default_rng()
    x = rng.standard_normal((8, 3, 4, 4)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    step, setup = script._cbn_step(x, dy, cbn.cache_info()["limit"])
    setup(0)
    outputs = step(0)
    bn = cbn.BatchNorm(3, dtype=np.float64)
    np.testing.assert_array_equal(outputs["y"], bn(x))
    np.testing.assert_array_equal(outputs["dx"], bn.backward(dy))


def test_command_line(benchmark_script, capsys, tmp_path):
    script = benchmark_script("layer_step")
    path = tmp_path / "s.json"
    assert script.main(["--cases", "8x4x3x3:float32,16x5:float64", "--no-torch",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "8x4x3x3 float32" in out and "16x5 float64" in out and "torch" not in out
    record = json.loads(path.read_text())
    assert [r["case"] for r in record["cases"]] == ["8x4x3x3 float32", "16x5 float64"]
    assert "machine" in record and "untouched" in record["allocator"]
    for bad in ("8x4:float16", "8x4", "8x4x3:nhwc:float32", "1x2x3x4x5x6:float32", "0x3:float32"):
        with pytest.raises(SystemExit) as exc:
            script.main(["--cases", bad, "--no-torch"])
        assert exc.value.code == 2
