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


def test_functional_example_runs_after_the_layer_example():
    """It uses the layer example's rng and bn, as a reader running both would."""
    namespace = {}
    exec(compile(_block("bn = cbn.BatchNorm(100)"), str(README), "exec"), namespace)  # noqa: S102
    exec(compile(_block("from cbn import functional as F"), str(README), "exec"),  # noqa: S102
         namespace)
    x, y = namespace["x"], namespace["y"]
    mean, var = namespace["mean"], namespace["var"]
    # The last lines: batch_stats' statistics, and the running ones they were folded into.
    np = namespace["np"]
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=0), rtol=1e-5)
    assert y.shape == x.shape and namespace["dx"].shape == x.shape
    assert not np.array_equal(namespace["running_mean"], namespace["bn"].running_mean)


def test_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves digits.npz in the working directory
    namespace = {}
    exec(compile(_block("load_digits"), str(README), "exec"), namespace)
    from cbn.trainer import evaluate

    loss, acc = evaluate(namespace["model"], namespace["X_test"], namespace["y_test"])
    assert acc > 0.9, f"the README's trainer example reached only {acc:.3f}"
    assert (tmp_path / "digits.npz").exists()


def test_one_forward_one_backward_example_runs_after_the_layer_example():
    """no_grad leaves the training forward for backward; the accumulated
    dgamma and the shared layer's dgamma are those of the whole batch."""
    namespace = {}
    exec(compile(_block("bn = cbn.BatchNorm(100)"), str(README), "exec"), namespace)  # noqa: S102
    exec(compile(_block("cbn.no_grad()"), str(README), "exec"), namespace)  # noqa: S102
    np, cbn = namespace["np"], namespace["cbn"]
    x, dy = namespace["x"], namespace["dy"]
    ref = cbn.BatchNorm(8, axis=-1, dtype=np.float64)
    ref(x)
    np.testing.assert_array_equal(namespace["dx"], ref.backward(dy))
    halves = np.zeros(8)
    for xb, dyb in ((x[:8], dy[:8]), (x[8:], dy[8:])):
        ref(xb)
        ref.backward(dyb)
        halves += ref.dgamma
    np.testing.assert_allclose(namespace["dgamma"], halves, rtol=1e-14)
    np.testing.assert_allclose(namespace["dgamma_shared"], halves, rtol=1e-12)
    assert namespace["y_val"].shape == x.shape


def test_the_trainer_guide_examples_run_in_order(tmp_path, monkeypatch):
    """docs/trainer.md's quick start, then its checkpoint example: the resumed
    optimizer takes the saved state (a docs audit found it built another kind)."""
    guide = README.parent / "docs" / "trainer.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, str(guide), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "model.npz").exists() and namespace["opt"].t > 0
