"""The README's worked example runs as printed, so the README stays true."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(not README.exists(), reason="README.md is not beside the tests")
def test_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    bn = namespace["bn"]
    assert not bn.training and bn.num_batches_tracked == 1
    assert namespace["y_one"].shape == (1, 100)
    assert namespace["dW"].shape == namespace["W"].shape
