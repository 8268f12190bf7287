"""End-to-end tests of the command line, ``python -m cbn``."""

import json
import os
import re
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

import cbn
from cbn.__main__ import main

TINY = ["demo", "--epochs", "2", "--hidden", "16,16", "--batch-size", "64", "--quiet"]


def test_demo_end_to_end_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "run.json", tmp_path / "curves.png"
    assert main([*TINY, "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "with batch norm" in out and "without batch norm" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+ \|", line)]
    assert len(rows) == 2
    cells = rows[-1].split("|")
    assert len(cells) == 3 and all(len(c.split()) == 3 for c in cells[1:])
    for name in ("Summary", "steps to 90% test accuracy", "time per step (ms)",
                 "test accuracy after", "450/450"):
        assert name in out
    result = json.loads(js.read_text())
    assert result["config"]["epochs"] == 2 and result["config"]["hidden"] == [16, 16]
    for key in ("bn", "plain"):
        run = result["runs"][key]
        assert run["epoch"] == [1, 2] and len(run["val_acc"]) == 2
        assert len(run["step_loss"]) == run["steps"][-1] == 2 * 22
        assert result["summary"][key]["single_example"]["same_class"] == 450
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_sweep(capsys, tmp_path):
    js = tmp_path / "sweep.json"
    assert main([*TINY, "--epochs", "1", "--lr-sweep", "0.1,3", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+0\.1\s", out, re.M) and re.search(r"^\s+3\s", out, re.M)
    sweep = json.loads(js.read_text())["sweep"]
    assert [row["lr"] for row in sweep] == [0.1, 3.0]
    assert 0 <= sweep[0]["bn"]["final_test_acc"] <= 1


def write_idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
                     + arr.tobytes())


def test_demo_on_idx_files(tmp_path, capsys):
    rng = np.random.default_rng()
    for prefix, n in (("train", 90), ("t10k", 30)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 4, 4)) + 20 * labels[:, None, None] % 200
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)
    assert main([*TINY, "--dataset", "idx", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "90 train / 30 test" in out and "30/30" in out
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert main([*TINY, "--dataset", "idx", "--data-dir", str(tmp_path)]) == 1
    assert "t10k-labels-idx1-ubyte" in capsys.readouterr().err
    assert main([*TINY, "--dataset", "idx"]) == 2  # a usage error, before any training


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*TINY, "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments(capsys):
    for argv in (["demo", "--epochs", "0"], ["demo", "--hidden", "a,b"], ["demo", "--lr", "-1"],
                 ["demo", "--optimizer", "lbfgs"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert main([*TINY, "--json", "/nonexistent-dir/x.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_forwards_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("cbn.benchmark")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cbn.benchmark", fake)
    monkeypatch.setattr(cbn, "benchmark", fake, raising=False)
    assert main(["bench", "--quick", "--json", "x.json"]) == 0
    assert seen == [["--quick", "--json", "x.json"]]


def test_python_dash_m_cbn(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "cbn", *TINY, "--epochs", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Summary" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cbn", "demo", "--help"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "--lr-sweep" in proc.stdout
