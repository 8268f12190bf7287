"""The README's worked examples run as printed, so the README stays true."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="README.md is not beside the tests")


def _block(containing):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    matches = [b for b in blocks if containing in b]
    assert matches, f"README.md has no python example containing {containing!r}"
    return matches[0]


def test_layer_example_runs():
    namespace = {}
    exec(compile(_block("bn = cbn.BatchNorm(100)"), str(README), "exec"), namespace)
    bn = namespace["bn"]
    assert not bn.training and bn.num_batches_tracked == 1
    assert namespace["y_one"].shape == (1, 100)
    assert namespace["dW"].shape == namespace["W"].shape


def test_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves digits.npz in the working directory
    namespace = {}
    exec(compile(_block("load_digits"), str(README), "exec"), namespace)
    from cbn.trainer import evaluate

    loss, acc = evaluate(namespace["model"], namespace["X_test"], namespace["y_test"])
    assert acc > 0.9, f"the README's trainer example reached only {acc:.3f}"
    assert (tmp_path / "digits.npz").exists()
