"""Sequential.load_state_dict: strict by default, all or nothing, and clear errors."""

import re

import numpy as np
import pytest

import cbn
from cbn.nn import Linear, ReLU, Sequential, mlp


def trained_pair():
    """Two identical models (same fresh seed) after the same forward pass, and the batch."""
    seed = int(np.random.default_rng().integers(2**32))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    models = []
    for _ in range(2):
        # Linear, BatchNorm, Tanh, Linear, BatchNorm, Tanh, Linear
        model = mlp([6, 5, 4, 3], activation="tanh", rng=seed)
        model.forward(x)
        models.append(model)
    return models, x, rng


def snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key


def assert_backward_unaffected(model, twin, rng):
    """The forward cache survived: backward gives what the untouched twin's gives."""
    dy = rng.standard_normal((9, 3)).astype(np.float32)
    dx = model.backward(dy)
    assert np.array_equal(dx, twin.backward(dy))
    for key, grad in twin.grads.items():
        assert np.array_equal(model.grads[key], grad), key


def test_empty_state_names_every_missing_key():
    (model, _), _, _ = trained_pair()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lacks the keys") as info:
        model.load_state_dict({})
    for key in before:
        assert repr(key) in str(info.value)
    assert_same_state(model, before)


def layer_0_state():
    """A trained model, its snapshot, and a donor's state of layer 0 only (new weights)."""
    (model, donor), _, rng = trained_pair()
    donor[0].W[...] = rng.standard_normal(donor[0].W.shape)
    part = {k: v for k, v in donor.state_dict().items() if k.startswith("0.")}
    return model, donor, snapshot(model), part


def test_state_of_layer_0_only_is_refused():
    model, _, before, part = layer_0_state()
    with pytest.raises(ValueError, match=r"lacks the keys \['1.gamma'.*'6.b'\]"):
        model.load_state_dict(part)
    assert_same_state(model, before)


def test_strict_false_loads_only_what_is_given():
    model, donor, before, part = layer_0_state()
    model.load_state_dict({**part, "9.W": np.zeros(2), "2.x": 1}, strict=False)
    assert np.array_equal(model[0].W, donor[0].W)
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith("0."):
            assert np.array_equal(after[key], value), key


@pytest.mark.parametrize("corrupt", ["nan-last-W", "negative-var", "wrong-shape", "missing-b"])
def test_failed_load_changes_nothing_not_even_the_forward_cache(corrupt):
    (model, twin), _, rng = trained_pair()
    before = snapshot(model)
    state = {k: rng.standard_normal(v.shape).astype(v.dtype) if v.ndim else v
             for k, v in before.items()}
    if corrupt == "nan-last-W":  # every earlier layer's part is valid
        state["6.W"][1, 2] = np.nan
    elif corrupt == "negative-var":  # the first BatchNorm's part is valid, the second's not
        state["4.running_var"] = -np.abs(state["4.running_var"])
    elif corrupt == "wrong-shape":
        state["6.b"] = np.zeros(4, np.float32)
    else:
        del state["6.b"]
    with pytest.raises(ValueError):
        model.load_state_dict(state)
    assert_same_state(model, before)
    assert_backward_unaffected(model, twin, rng)


def test_successful_load_still_loads_everything():
    (model, donor), x, rng = trained_pair()
    for p in donor.params.values():
        p[...] = rng.standard_normal(p.shape)
    donor.forward(x)
    model.load_state_dict(donor.state_dict())
    assert_same_state(model, snapshot(donor))


@pytest.mark.parametrize("state, error, message", [
    (None, TypeError, "NoneType"),
    ([("0.W", 1)], TypeError, "list"),
    ({1: np.zeros((6, 5))}, TypeError, "strings.*got 1"),
    ({("0", "W"): np.zeros((6, 5))}, TypeError, "strings"),
    ({"01.W": np.zeros((6, 5))}, ValueError, "'01.W' names no layer"),
    ({"W": np.zeros((6, 5))}, ValueError, "'W' names no layer"),
    ({"2.W": np.zeros((6, 5))}, ValueError, r"layer 2 \(Tanh\) has no state"),
])
def test_malformed_states_name_the_problem(state, error, message):
    (model, _), _, _ = trained_pair()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.load_state_dict(state)
    assert_same_state(model, before)


def test_linear_rejects_a_state_that_is_not_a_dict():
    layer = Linear(3, 2, rng=np.random.default_rng())
    with pytest.raises(TypeError, match="Linear: state must be a dict"):
        layer.load_state_dict(None)
    with pytest.raises(ValueError, match="state keys"):
        layer.load_state_dict({1: 2, "W": np.zeros((3, 2))})


class Counter(ReLU):
    """A foreign stateful layer that rejects negative counts (no check ahead)."""

    def __init__(self):
        self.count = np.array(0)

    def state_dict(self):
        return {"count": self.count.copy()}

    def load_state_dict(self, state):
        if int(state["count"]) < 0:
            raise ValueError("count must be non-negative")
        self.count = np.array(state["count"])


def test_foreign_layers_are_rolled_back_and_cbn_layers_never_touched():
    rng = np.random.default_rng()
    model = Sequential(Linear(4, 3, rng=rng), Counter(), Counter())
    good = {"0.W": rng.standard_normal((4, 3)), "0.b": np.zeros(3), "1.count": np.array(5),
            "2.count": np.array(-1)}
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-negative"):
        model.load_state_dict(good)
    assert_same_state(model, before)
    good["2.count"] = np.array(7)
    good["0.W"][0, 0] = np.inf  # refused before any layer, foreign or not, is touched
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.load_state_dict(good)
    assert_same_state(model, before)


# -- num_batches_tracked must fit int64, as PyTorch stores it (checked by cbn/layer.py) --

@pytest.mark.parametrize("count", [np.array(2**64 - 1, np.uint64), np.array(2**63, np.uint64)])
def test_count_beyond_int64_is_refused_and_the_layer_stays_saveable(tmp_path, count):
    layer = cbn.BatchNorm(3)
    state = layer.state_dict()
    state["num_batches_tracked"] = count
    try:
        with pytest.raises(ValueError, match="num_batches_tracked"):
            layer.load_state_dict(state)
    finally:
        layer.save(tmp_path / "bn.npz")  # must never raise OverflowError


def test_largest_int64_count_loads_and_saves(tmp_path):
    layer = cbn.BatchNorm(3)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.array(2**63 - 1, np.int64)
    layer.load_state_dict(state)
    layer.save(tmp_path / "bn.npz")
    assert cbn.BatchNorm.load(tmp_path / "bn.npz").num_batches_tracked == 2**63 - 1


def test_a_key_missing_from_a_mentioned_child_is_named_and_child_errors_name_the_child():
    """Strict: every missing key is a ValueError naming it, whether or not the
    child has other keys in the state (a docs audit found a bare KeyError);
    a child's own refusal is prefixed by its index and type."""
    rng = np.random.default_rng()
    model = mlp([4, 5, 5, 3], activation="sigmoid", rng=int(rng.integers(1 << 30)))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    for key in ("1.running_var", "6.b", "0.W"):
        state = model.state_dict()
        del state[key]
        with pytest.raises(ValueError, match=re.escape(f"state lacks the keys ['{key}']")):
            model.load_state_dict(state)
    state = model.state_dict()
    state["1.weight"] = state.pop("1.gamma")  # PyTorch's name is no missing key
    model.load_state_dict(state)
    state = model.state_dict()
    state["1.gamma"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match=r"^layer 1 \(BatchNorm\): gamma must have shape"):
        model.load_state_dict(state)
    state = model.state_dict()
    del state["1.running_var"]
    with pytest.raises(KeyError, match=r"layer 1 \(BatchNorm\): state does not match"):
        model.load_state_dict(state, strict=False)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
