"""Structure of the benchmark engine's table and JSON (no timing assertions)."""

import json
import statistics

import numpy as np
import pytest

from cbn import benchmark as B

TINY = "8x4,4x3x2x2,2x2x2x3:nhwc"


def _tiny_args(tmp_path, *extra):
    return [
        "--shapes", TINY,
        "--threads", "1,2",
        "--target-time", "0.0001",
        "--min-repeats", "2",
        "--max-repeats", "3",
        "--quiet",
        "--json", str(tmp_path / "out.json"),
        *extra,
    ]


def test_parse_shape():
    s = B.parse_shape("32x56x56x64:nhwc")
    assert s.shape == (32, 56, 56, 64)
    assert s.axis == -1 and s.channels == 64 and s.layout == "NHWC"
    assert s.name == "32x56x56x64:nhwc"
    t = B.parse_shape("32x64x56x56")
    assert (t.axis, t.channels, t.layout) == (1, 64, "NCHW")
    assert B.parse_shape("256x1024").layout == "NC"
    assert t.nbytes(np.float64) == 32 * 64 * 56 * 56 * 8
    for bad in ("12", "0x4", "axb", "4x4:weird"):
        with pytest.raises(ValueError):
            B.parse_shape(bad)


def test_default_shapes_cover_the_issue():
    names = set(B.DEFAULT_SHAPES)
    for required in ("256x1024", "4096x256", "65536x64", "32x4096", "32x64x56x56",
                     "8x256x28x28", "64x16x32x32", "32x56x56x64:nhwc"):
        assert required in names


def test_time_calls_rotates_buffers():
    seen = []
    timing = B.time_calls(seen.append, 3, target_time=0, min_repeats=5, max_repeats=5,
                          warmup=1)
    assert timing.repeats == 5 and len(seen) == 6
    assert set(seen) == {0, 1, 2}
    assert timing.minimum <= timing.median


def test_time_interleaved_alternates_and_shares_one_rotation():
    calls = []
    fns = {"a": (lambda i: calls.append(("a", i)), None),
           "b": (lambda i: calls.append(("b", i)), lambda i: calls.append(("setup-b", i)))}
    t = B.time_interleaved(fns, 4, rounds=3, target_time=0, min_repeats=6, max_repeats=6,
                           warmup=1)
    assert t["a"].repeats == t["b"].repeats == 6
    timed = [c for c in calls[2 + 1:] if c[0] != "setup-b"]  # after the warm-ups
    # rounds alternate: two calls of a, then two of b, three times
    assert [name for name, _ in timed] == ["a", "a", "b", "b"] * 3
    # one rotation across implementations: consecutive calls use consecutive buffers
    indices = [i for name, i in calls if name != "setup-b"]
    assert indices == [k % 4 for k in range(len(indices))]
    # setup runs before each call of b, on that call's buffer
    for pos, (name, i) in enumerate(calls):
        if name == "setup-b":
            assert calls[pos + 1] == ("b", i)


def test_steady_allocator_sets_fixed_thresholds_or_says_why_not():
    info = B.steady_allocator()
    assert set(info) in ({"mmap_threshold", "trim_threshold", "mmap_max"}, {"unavailable"})
    if "mmap_threshold" in info:
        assert info["mmap_threshold"] == 32 * B.MIB and info["mmap_max"] == 0
        big = np.ones(8 * B.MIB)  # 64 MiB, from the heap: still allocates and frees normally
        assert big.sum() == 8 * B.MIB


def test_write_record_keeps_the_data_beside_the_machine(tmp_path):
    rows = [{"case": "a", "ratio": 1.5}, {"case": "b", "ratio": 0.5}]
    B.write_record(tmp_path / "r.json", {"mmap_threshold": 7}, rows=rows)
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["rows"] == rows and record["allocator"] == {"mmap_threshold": 7}
    assert record["machine"]["cpu"] == B.machine_info()["cpu"]


def test_side_measurement_saves_only_with_json(tmp_path):
    """The side scripts' start: --json decides whether save() writes a record."""
    path = tmp_path / "side.json"
    save = B.side_measurement("A side script.\n\nMore.", "write it", ["--json", str(path)])
    rows = [{"case": "c", "ratio": float(np.random.default_rng().uniform(0.5, 2))}]
    save(rows=rows)
    record = json.loads(path.read_text())
    assert record["rows"] == rows and record["allocator"] == B.steady_allocator()
    B.side_measurement("A side script.", "write it", [])(rows=rows)
    assert [p.name for p in tmp_path.iterdir()] == ["side.json"]
    with pytest.raises(SystemExit):
        B.side_measurement("A side script.", "write it", ["--bogus"])


def test_main_writes_table_and_json(tmp_path, capsys):
    status = B.main(_tiny_args(tmp_path), reexec=False)
    assert status == 0
    out = capsys.readouterr().out
    for column in ("shape", "layout", "dtype", "thr", "op", "cbn ms", "GB/s", "frac copy",
                   "x numpy", "x torch"):
        assert column in out
    assert "targets (speed goals" in out and "machine:" in out

    result = json.loads((tmp_path / "out.json").read_text())
    assert result["schema"] == "cbn-bench/1"
    assert "allocator" in result
    m = result["machine"]
    for key in ("cpu", "cores", "numpy", "cbn", "cbn_build", "threadpoolctl", "torch"):
        assert key in m
    cases = result["cases"]
    # 3 shapes x 2 dtypes x 2 thread counts x 3 ops
    assert len(cases) == 3 * 2 * 2 * 3
    assert {c["op"] for c in cases} == set(B.OPS)
    assert {c["dtype"] for c in cases} == {"float32", "float64"}
    assert {c["threads"] for c in cases} == {1, 2}
    assert {c["layout"] for c in cases} == {"NC", "NCHW", "NHWC"}
    torch_there = "torch" in result["config"]["peers"]
    for c in cases:
        assert c["bytes_moved"] == B.BYTE_MODEL[c["op"]] * c["nbytes"]
        assert c["n_buffers"] >= 2  # tiny arrays fit in cache: inputs rotate
        for impl in ("cbn", "layer", "numpy"):
            t = c["times"][impl]
            assert t["median_s"] > 0 and 2 <= t["repeats"] <= 3
        assert c["gbps"] > 0 and c["copy_gbps"] > 0 and c["speedup_numpy"] > 0
        assert "copy" not in c["times"]  # timed in the rounds, reported as copy_gbps
        # np.copyto runs on one thread: a fraction of it only for one thread
        assert (c["frac_copy"] is not None) == (c["threads"] == 1)
        if c["threads"] == 1:
            assert c["frac_copy"] == pytest.approx(c["gbps"] / c["copy_gbps"])
        assert (c["speedup_torch"] is not None) == torch_there
    names = [t["target"] for t in result["targets"]]
    assert len(names) == 6
    assert {t["status"] for t in result["targets"]} <= {"pass", "fail", "n/a"}
    # NumPy runs on one thread whatever the budget: the median per thread count is shown
    vs_numpy = next(t for t in result["targets"] if "NumPy" in t["target"])
    for n, label in ((1, "1 thread"), (2, "2 threads")):
        med = statistics.median(c["speedup_numpy"] for c in cases if c["threads"] == n)
        assert f"{label} x{med:.1f}" in vs_numpy["detail"]
    assert result["small_step"]["cbn_us"] > 0
    # Markdown rendering of the same result
    md = B.format_report(result, markdown=True)
    assert md.count("\n|") >= len(cases) + 1


def test_filters_and_no_peers(tmp_path):
    args = _tiny_args(tmp_path, "--ops", "fwd-eval", "--dtypes", "float64",
                      "--peers", "numpy", "--no-small-step")
    args[args.index("--threads") + 1] = "1"
    assert B.main(args, reexec=False) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert {(c["op"], c["dtype"], c["threads"]) for c in result["cases"]} == {
        ("fwd-eval", "float64", 1)}
    assert all(set(c["times"]) == {"cbn", "numpy"} for c in result["cases"])
    assert all(c["speedup_torch"] is None for c in result["cases"])
    assert result["small_step"] is None
    status = {t["target"]: t["status"] for t in result["targets"]}
    assert "n/a" in status.values()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    args = _tiny_args(tmp_path, "--plot", str(png), "--no-small-step", "--peers", "numpy")
    assert B.main(args, reexec=False) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments():
    with pytest.raises(SystemExit):
        B.main(["--ops", "sideways"], reexec=False)
    with pytest.raises(SystemExit):
        B.main(["--threads", "0"], reexec=False)


@pytest.mark.parametrize("args, message", [
    (["--target-time", "nan"], "expected a non-negative, finite float"),
    (["--target-time", "-1"], "expected a non-negative, finite float"),
    (["--cache-mib", "nan"], "--cache-mib: expected a positive, finite float"),
    (["--max-repeats", "0"], "--max-repeats: expected a positive, finite int"),
    (["--rounds", "-3"], "--rounds: expected a positive, finite int"),
    (["--min-repeats", "10", "--max-repeats", "2"], "must not exceed --max-repeats"),
    (["--shapes", "1x4"], "one value per channel"),
    (["--threads", "99999999"], "threads must be at most"),
])
def test_bad_values_are_usage_errors_before_anything_runs(args, message, capsys):
    """Each was a traceback (or an accepted value) after or during the run."""
    with pytest.raises(SystemExit) as info:
        B.main(args, reexec=False)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_output_path_that_is_a_directory_is_refused_first(tmp_path, capsys):
    assert B.main(["--shapes", "8x4", "--json", str(tmp_path)], reexec=False) == 2
    assert "is a directory" in capsys.readouterr().err


def test_reexec_drops_openblas_variables(tmp_path):
    """``python -m cbn bench`` re-executes itself without the OpenBLAS variables."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="512")
    env.pop("_CBN_BENCH_REEXEC", None)
    out = tmp_path / "env.json"
    args = ["--shapes", "8x4", "--threads", "1", "--ops", "fwd-eval", "--dtypes", "float32",
            "--peers", "numpy", "--no-small-step", "--target-time", "0", "--min-repeats", "1",
            "--quiet", "--json", str(out)]
    # cwd: from a checkout's root, `python -m cbn` would import the uncompiled source tree.
    subprocess.run([sys.executable, "-m", "cbn", "bench", *args], env=env, check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    machine = json.loads(out.read_text())["machine"]
    assert machine["openblas_env"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    assert "OPENBLAS_CORETYPE=Haswell" in machine["env_cleaned"]


def test_side_torch_checks_options_then_imports_torch(monkeypatch, capsys):
    """The start of the side scripts that compare with PyTorch."""
    from types import SimpleNamespace

    args = SimpleNamespace(threads=2, repeats=0)
    assert B.side_torch(args, ("threads", "repeats")) == (None, 2)
    assert "--repeats must be at least 1" in capsys.readouterr().err
    args.threads = 0
    assert B.side_torch(args, ("threads", "repeats")) == (None, 2)
    assert "--threads and --repeats" in capsys.readouterr().err
    monkeypatch.setattr(B, "_import_torch", lambda: None)
    assert B.side_torch(SimpleNamespace(threads=1)) == (None, 1)
    assert "PyTorch is not installed" in capsys.readouterr().err
    sentinel = object()
    monkeypatch.setattr(B, "_import_torch", lambda: sentinel)
    assert B.side_torch(SimpleNamespace(threads=1)) == (sentinel, None)


def test_side_script_helpers(tmp_path, capsys):
    """refuse_shapes, compile_c and run_children, which loop_clone.py and onednn.py share
    (their own tests need torch or oneDNN; these do not)."""
    def rows_only(spec):
        if len(spec.shape) != 2:
            raise ValueError(f"rows only, got {spec.name}")
    assert not B.refuse_shapes([B.parse_shape("4x5")], rows_only)
    assert B.refuse_shapes([B.parse_shape("4x5"), B.parse_shape("2x3x4")], rows_only)
    assert "--shapes: rows only, got 2x3x4" in capsys.readouterr().err

    try:
        lib = B.compile_c(str(tmp_path), "twice", "int twice(int v) { return 2 * v; }",
                          ["-O2"], "the test library")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    rng = np.random.default_rng()
    v = int(rng.integers(-1000, 1000))
    assert lib.twice(v) == 2 * v
    with pytest.raises(RuntimeError, match="compiling the broken one failed"):
        B.compile_c(str(tmp_path), "broken", "int f( {", [], "the broken one")

    child = tmp_path / "child.py"
    child.write_text(
        "import json, sys\n"
        "assert sys.argv[-1] == '--child' and '--json' not in sys.argv, sys.argv\n"
        "n = int(sys.argv[sys.argv.index('--n') + 1])\n"
        "for k in range(n):\n"
        "    print(json.dumps({'k': k}))\n")
    seen = []
    rows, status = B.run_children(str(child), ["--n", "2", "--json", "f.json"], 3, seen.append)
    assert status == 0 and rows == seen
    assert [(r["process"], r["k"]) for r in rows] == [(p, k) for p in range(3) for k in range(2)]
    child.write_text("import sys\nsys.stderr.write('child broke')\nsys.exit(5)\n")
    rows, status = B.run_children(str(child), [], 2, seen.append)
    assert rows is None and status == 5
    assert "child broke" in capsys.readouterr().err


@pytest.mark.parametrize("option, path, message", [
    ("--json", "/proc/no-such.json", "--json: "),
    ("--markdown", "/nonexistent-dir/t.md", "does not exist"),
    ("--plot", "{tmp}/chart.foo", "name a file ending in one of"),
])
def test_outputs_are_checked_by_opening_them_before_the_run(option, path, message, tmp_path,
                                                            capsys):
    """As cbn demo checks its outputs: before, a bad --plot format or an
    unwritable --json ran the whole benchmark, then ended in a traceback."""
    if option == "--plot":
        pytest.importorskip("matplotlib")
    path = path.format(tmp=tmp_path)
    assert B.main(["--shapes", "8x4", option, path], reexec=False) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cbn bench: {option}") and message in err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_streaming_from_sets_every_threshold_and_restores_them():
    """streaming_from(n) sets every output threshold (rows too) for its block and
    restores each after it, also when the block raises."""
    from cbn import functional as F

    before = {name: getattr(F, name) for name in B.STREAM_SETTINGS}
    assert set(B.STREAM_SETTINGS) >= {"STREAM_MIN_BYTES", "ROWS_STREAM_MIN_BYTES",
                                      "ROWS_DX_STREAM_MIN_BYTES"}
    value = int(np.random.default_rng().integers(0, 1 << 40))
    with B.streaming_from(value):
        assert all(getattr(F, name) == value for name in B.STREAM_SETTINGS)
        assert F.streams(value, 1) and F.streams(value, 1, backward=True)
        assert F.streams(value, 7)
    assert {name: getattr(F, name) for name in B.STREAM_SETTINGS} == before
    with pytest.raises(KeyError), B.streaming_from(value):
        raise KeyError("inside")
    assert {name: getattr(F, name) for name in B.STREAM_SETTINGS} == before


def test_shape_spec_inner_is_the_run_length():
    """ShapeSpec.inner: one value per (sample, channel) run for (N, C) and
    channels-last arrays, the product of the spatial sizes for NCHW ones."""
    rng = np.random.default_rng()
    n, c, *spatial = (int(v) for v in rng.integers(1, 50, size=int(rng.integers(2, 6))))
    dims = "x".join(map(str, (n, c, *spatial)))
    assert B.parse_shape(dims).inner == int(np.prod(spatial, dtype=np.int64))
    assert B.parse_shape(dims + ":nhwc").inner == 1
    assert B.parse_shape("256x1024").inner == 1
    assert B.parse_shape("32x64x56x56").inner == 56 * 56
