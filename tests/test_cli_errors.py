"""The command line reports failures in one line with a non-zero status, never a traceback."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

import cbn.data
from cbn.__main__ import build_parser, main

TINY = ["demo", "--epochs", "1", "--hidden", "8", "--batch-size", "64", "--quiet"]
# ReLU and plain SGD at an absurd rate: batch norm meets Inf within the first epoch.
DIVERGING = ["--activation", "relu", "--optimizer", "sgd"]


def idx_bytes(arr):
    arr = np.asarray(arr, np.uint8)
    return (bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.tobytes())


def test_diverged_run_is_a_one_line_error(capsys):
    assert main([*TINY, *DIVERGING, "--lr", "1000"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cbn demo: training diverged (with batch norm, lr 1000) after ")
    assert "not finite" in err and err.rstrip().endswith("try a smaller --lr")


def test_sweep_marks_a_diverged_rate_and_goes_on(tmp_path, capsys):
    js = tmp_path / "sweep.json"
    assert main([*TINY, *DIVERGING, "--lr-sweep", "1000,0.1", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert rows["1000"].split("|")[1].split()[:2] == ["diverged", "after"]
    assert "diverged" not in rows["0.1"]  # the sweep went on after the diverged rate
    assert "(diverged after N: training stopped" in out
    first, second = json.loads(js.read_text())["sweep"]
    assert first["bn"]["diverged"] is True and first["bn"]["final_test_acc"] is None
    assert "not finite" in first["bn"]["error"]
    assert first["plain"]["diverged"] is True  # no BN: NaN loss, no error, still divergence
    assert second["bn"]["diverged"] is False and 0 <= second["bn"]["final_test_acc"] <= 1


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_path_is_checked_before_training(option, tmp_path, capsys):
    if option == "--plot":
        pytest.importorskip("matplotlib")
    assert main([*TINY, option, str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    assert f"{option} {str(tmp_path)!r} is a directory" in captured.err


def test_unwritable_json_directory_is_refused_before_training(tmp_path, capsys, monkeypatch):
    # Tests may run as root, who can write anywhere: simulate the permission.
    target = str(tmp_path / "out.json")

    def refusing_open(path, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", target)
        return open(path, *args, **kwargs)

    monkeypatch.setattr("cbn.__main__.open", refusing_open, raising=False)
    assert main([*TINY, "--json", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--json" in captured.err and "Permission denied" in captured.err
    assert not os.path.exists(target)


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "1e308"], "--lr 1e+308 overflows to inf in float32"),
    (["--lr", "1e-50"], "--lr 1e-50 rounds to 0 in float32"),
    (["--lr-sweep", "0.1,1e-50"], "--lr-sweep 1e-50 rounds to 0"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--threads", "2000000"], "--threads must be at most"),
    (["--dataset", "idx"], "--dataset idx needs --data-dir"),
    (["--json", ""], "--json needs a file name"),
])
def test_values_the_run_would_refuse_are_usage_errors_before_training(argv, needle, capsys):
    """Each trained (part of) a run before failing with status 1, or was ignored."""
    assert main([*TINY, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err and captured.err.count("\n") == 1


@pytest.mark.parametrize("argv, needle", [
    (["--plot", "curves.xyz"], "name a file ending in one of"),
    (["--plot", "noext"], "name a file ending in one of"),
    (["--lr-sweep", "0.1", "--plot", "s.png"], "--plot draws the curves of one run"),
    (["--plot", "same.png", "--json", "same.png"], "name the same file"),
])
def test_plot_paths_are_checked_before_training(argv, needle, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_interrupted_demo_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("cbn.__main__.run_demo", interrupted)
    assert main(TINY) == 130
    err = capsys.readouterr().err
    assert err == "cbn demo: interrupted\n"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "1.5", "90", "x"])
def test_target_must_be_an_accuracy(value, capsys):
    with pytest.raises(SystemExit) as info:
        main([*TINY, "--target", value])
    assert info.value.code == 2
    assert "--target" in capsys.readouterr().err


def test_target_accepts_the_closed_upper_bound():
    assert build_parser().parse_args(["demo", "--target", "1"]).target == 1.0


@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--lr", "inf"], ["--lr-sweep", "0.1,nan"],
                                  ["--lr-sweep", "inf"]])
def test_learning_rates_must_be_finite(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*TINY, *argv])
    assert info.value.code == 2 and "finite" in capsys.readouterr().err


def test_corrupt_gzip_idx_file_is_a_clean_error(tmp_path, capsys):
    rng = np.random.default_rng()
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = idx_bytes(rng.integers(0, 256, (n, 4, 4)))
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n)))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz = path.read_bytes()
    path.write_bytes(gz[:10] + b"\x07" + gz[11:])  # an invalid deflate block type: zlib.error
    assert main([*TINY, "--dataset", "idx", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path}: not a valid gzip file" in err


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/data/x-ubyte"),
                                   IsADirectoryError(21, "Is a directory", "/data/x-ubyte")])
def test_os_errors_are_one_line(error, monkeypatch, capsys):
    def unreadable(directory):
        raise error

    monkeypatch.setattr(cbn.data, "load_mnist_dir", unreadable)
    assert main([*TINY, "--dataset", "idx", "--data-dir", "/data"]) == 1
    assert capsys.readouterr().err == f"cbn demo: /data/x-ubyte: {error.strerror}\n"


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "--seed"),
    (["--blas-threads", "-5"], "--blas-threads"),
    (["--hidden", "3,,4"], "empty width"),
    (["--hidden", "8,"], "empty width"),
])
def test_bad_integers_are_refused_by_the_parser(argv, needle, capsys):
    # --seed -1 used to fail after the run's header, in a message that did not
    # name --seed; the others were accepted.
    with pytest.raises(SystemExit) as info:
        main([*TINY, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_model_too_large_for_memory_is_a_one_line_error(monkeypatch, capsys):
    import cbn.nn

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 GiB")

    monkeypatch.setattr(cbn.nn, "mlp", no_memory)
    assert main([*TINY, "--hidden", "100000"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "--hidden" in err
