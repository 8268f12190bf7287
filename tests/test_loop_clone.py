"""benchmarks/loop_clone.py: PyTorch's evaluation loop compiled here, as a control."""

import json
import platform

import numpy as np
import pytest

from cbn import benchmark as B


@pytest.fixture
def clones(benchmark_script, tmp_path):
    script = benchmark_script("loop_clone")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the clones are x86-64 code")
    try:
        lib = script.compile_clones(str(tmp_path))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return script, lib


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_clones_compute_x_times_a_plus_c(clones, dtype):
    """Every clone, on random rows whose length is and is not a multiple of the
    vector width, matches a float64 reference; a wrong result is caught."""
    script, lib = clones
    rng = np.random.default_rng()
    for _ in range(4):
        N, C = int(rng.integers(1, 40)), int(rng.integers(1, 70))
        x = (rng.standard_normal((N, C)) * 3 + rng.normal()).astype(dtype)
        a = rng.uniform(0.2, 2.0, C).astype(dtype)
        c = rng.standard_normal(C).astype(dtype)
        for name, fn in script.clone_functions(lib, dtype).items():
            y = np.full_like(x, np.nan)
            script.run_clone(fn, x, y, a, c)
            assert script.agrees(y, x, a, c), (name, N, C)
            y[rng.integers(N), rng.integers(C)] += 1.0
            assert not script.agrees(y, x, a, c)


def test_json_option_stays_with_the_parent():
    assert B.without_json(["--json", "f.json", "--processes", "2"]) == ["--processes", "2"]
    assert B.without_json(["--json=f.json", "--shapes", "8x8"]) == ["--shapes", "8x8"]


def test_measure_times_every_contender(clones):
    torch = pytest.importorskip("torch")
    script, lib = clones
    config = B.BenchConfig(shapes=[B.parse_shape("64x20")], dtypes=["float32"],
                           target_time=0.002, min_repeats=3, max_repeats=6, rounds=2,
                           cache_bytes=1 << 20)
    t = script.measure(torch, lib, config.shapes[0], "float64", config)
    assert set(t) == {"torch", "plain", "paced", "cbn", "copy"}
    assert all(v > 0 for v in t.values())
    with pytest.raises(ValueError, match="rows"):
        script.measure(torch, lib, B.parse_shape("4x3x5x5"), "float32", config)


def test_command_line(clones, capsys, tmp_path):
    pytest.importorskip("torch")
    script, _ = clones
    path = tmp_path / "c.json"
    assert script.main(["--shapes", "64x20", "--dtypes", "float32", "--processes", "2",
                        "--target-time", "0.002", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("64x20 float32") == 3 and "median [range]" in out
    record = json.loads(path.read_text())
    assert record["processes"] == 2 and [r["process"] for r in record["rows"]] == [0, 1]
    assert set(record["rows"][0]["over_torch"]) == {"plain", "paced", "cbn", "copy"}
    assert script.main(["--processes", "0"]) == 2
    assert script.main(["--shapes", "4x3x5x5"]) == 2
    assert "rows (N, C) only" in capsys.readouterr().err
