"""Crafted and corrupt model files: every one is a ValueError naming the file and the problem.

Sizes in a file's configuration are checked against the shapes of the arrays
it stores before any layer is built, so loading never allocates more than the
file's data; the configuration's value types are checked too.
"""

import json
import re
import tracemalloc

import numpy as np
import pytest

import cbn
from cbn import io
from cbn.nn import Sequential, mlp
from test_io import _rewrite as rewrite  # one helper for both files (pythonpath: tests)


def saved_model(tmp_path, **kwargs):
    """A freshly initialised, briefly trained mlp saved to ``tmp_path``; returns (path, model)."""
    rng = np.random.default_rng()
    model = mlp([4, 5, 3], rng=rng, **kwargs)
    model(rng.standard_normal((8, 4)).astype(np.float32))
    path = tmp_path / "model.npz"
    model.save(path)
    return path, model


def with_spec(path, edit):
    """Apply ``edit`` to the decoded Sequential configuration of the file at ``path``."""
    with np.load(path, allow_pickle=False) as f:
        spec = json.loads(str(f["config"]))
    edit(spec)
    rewrite(path, config=np.array(json.dumps(spec)))


def load_error(load, path, *words):
    """Load ``path``, expecting a ValueError whose message names the file and each of ``words``."""
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert re.search(word, message), (word, message)
    return message


@pytest.mark.parametrize("load, kind", [(cbn.BatchNorm.load, "cbn.BatchNorm"),
                                        (Sequential.load, "cbn.Sequential")])
def test_deeply_nested_configuration(tmp_path, load, kind):
    path = tmp_path / "nested.npz"
    depth = int(np.random.default_rng().integers(50_000, 150_000))
    np.savez(path, __format__=np.array(kind), __version__=np.array(1),
             config=np.array("[" * depth + "]" * depth))
    load_error(load, path, "nested")
    # Below the parser's recursion limit but deeper than any cbn configuration.
    np.savez(path, __format__=np.array(kind), __version__=np.array(1),
             config=np.array("[" * 50 + "]" * 50))
    load_error(load, path, "nested")


@pytest.mark.parametrize("layer_type", [[], {}, 3, None, ["Linear"]])
def test_layer_type_that_is_not_a_string(tmp_path, layer_type):
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[0].__setitem__("type", layer_type))
    load_error(Sequential.load, path, "layer 0", "type")


@pytest.mark.parametrize("index, key, value", [
    (0, "in_features", "4"),
    (0, "in_features", 4.0),
    (0, "out_features", True),
    (0, "bias", "false"),
    (0, "init", ["he"]),
    (0, "dtype", ["float32"]),
    (1, "num_features", "5"),
    (1, "num_features", 5.0),
    (1, "eps", "1e-5"),
    (1, "momentum", [0.1]),
    (1, "affine", 1),
    (1, "axis", 1.0),
    (1, "dtype", {"name": "float32"}),
    (1, "activation", ["relu"]),
])
def test_configuration_value_types(tmp_path, index, key, value):
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[index]["config"].__setitem__(key, value))
    load_error(Sequential.load, path, f"layer {index}", repr(key))


def test_config_of_an_activation_takes_no_keys(tmp_path):
    path, _ = saved_model(tmp_path, activation="tanh", batch_norm=False)
    with_spec(path, lambda spec: spec[1]["config"].__setitem__("inplace", True))
    load_error(Sequential.load, path, "layer 1", "inplace")


def test_missing_size_keys(tmp_path):
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[0]["config"].pop("out_features"))
    load_error(Sequential.load, path, "layer 0", "out_features")


@pytest.mark.parametrize("index, key", [(0, "in_features"), (1, "num_features")])
def test_sizes_must_be_positive(tmp_path, index, key):
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[index]["config"].__setitem__(key, -3))
    load_error(Sequential.load, path, f"layer {index}", f"'{key}' must be a positive integer")


@pytest.mark.parametrize("index, sizes", [
    (0, dict(in_features=10**8)),
    (0, dict(out_features=10**15)),
    (1, dict(num_features=10**15)),
    (2, dict(in_features=3000, out_features=3000)),  # moderate: 72 MB of initial weights
    (1, dict(num_features=10**6)),  # moderate: 28 MB of vectors
])
def test_sizes_are_checked_against_the_stored_arrays_before_allocating(tmp_path, index, sizes):
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[index]["config"].update(sizes))
    tracemalloc.start()
    try:
        load_error(Sequential.load, path, f"layer {index}", "shape", str(max(sizes.values())))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"loading allocated {peak} bytes before refusing the file"


def test_stored_array_missing_for_a_huge_configuration(tmp_path):
    """Without ``0.W`` the file bounds no size: it must be refused before building."""
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[0]["config"].update(in_features=10**8, out_features=10**8))
    rewrite(path, **{"0.W": None})
    load_error(Sequential.load, path, "layer 0", "missing", "'W'")


def test_unexpected_stored_array(tmp_path):
    path, _ = saved_model(tmp_path)
    rewrite(path, **{"1.extra": np.zeros(5, np.float32)})
    load_error(Sequential.load, path, "layer 1", "unexpected", "extra")


@pytest.mark.parametrize("num_features", [10**8, 10**15])
def test_stateless_batchnorm_of_any_size_loads_without_allocating(tmp_path, num_features):
    """No stored array bounds a BatchNorm without parameters or statistics, so it
    must not allocate for its num_features before data arrives (10**8 float32
    channels used to take 1.6 GB at load); a batch of the wrong width then
    raises, naming the channels."""
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[1]["config"].update(
        num_features=num_features, affine=False, track_running_stats=False))
    rewrite(path, **{f"1.{k}": None for k in
                     ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked")})
    tracemalloc.start()
    try:
        model = Sequential.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert model[1].num_features == num_features
    x = np.random.default_rng().standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{num_features}"):
        model(x)

    alone = tmp_path / "bn.npz"
    cbn.BatchNorm(3, affine=False, track_running_stats=False).save(alone)
    with np.load(alone, allow_pickle=False) as f:
        config = json.loads(str(f["config"]))
    config["num_features"] = num_features
    rewrite(alone, config=np.array(json.dumps(config)))
    tracemalloc.start()
    try:
        bn = cbn.BatchNorm.load(alone)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    with pytest.raises(ValueError, match=f"{num_features}"):
        bn(np.random.default_rng().standard_normal((8, 3)).astype(np.float32))


def test_entry_keys_must_be_written_as_state_dict_writes_them(tmp_path):
    """``01.W`` would silently collide with ``1.W``; it names no layer."""
    path, model = saved_model(tmp_path)
    rewrite(path, **{"00.W": model[0].W.copy(), "0.W": None})
    load_error(Sequential.load, path, "'00.W'", "names no layer")


def test_long_values_are_abbreviated_in_messages(tmp_path):
    path, _ = saved_model(tmp_path)
    with_spec(path, lambda spec: spec[0].__setitem__("type", "X" * 100_000))
    message = load_error(Sequential.load, path, "unknown layer type")
    assert len(message) < 300


def test_round_trip_still_loads(tmp_path):
    path, model = saved_model(tmp_path)
    loaded = Sequential.load(path)
    for key, value in model.state_dict().items():
        assert np.array_equal(loaded.state_dict()[key], value), key


def test_helpers_name_the_problem():
    types = {"n": int, "name": str, "flag": bool, "rate": (int, float, type(None))}
    io.check_config({"n": 3, "name": "a", "flag": False, "rate": None}, types, "f", ("n",))
    cases = [({"n": True}, "'n' must be an integer, got a boolean"),
             ({"n": 2, "flag": 0}, "'flag' must be a boolean, got an integer"),
             ({"n": 2, "rate": "x"}, "'rate' must be an integer or a number or null"),
             ({"n": 2, "other": 1}, r"unknown configuration keys \['other'\]"),
             ({}, r"lacks the keys \['n'\]"),
             ({"n": 0}, "'n' must be a positive integer, got 0")]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            io.check_config(config, types, "f", ("n",))
    io.check_state_shapes({"a": np.zeros((2, 3))}, {"a": (2, 3)}, "f")
    with pytest.raises(ValueError, match=r"'a' has shape \(2, 3\).*\(3, 2\)"):
        io.check_state_shapes({"a": np.zeros((2, 3))}, {"a": (3, 2)}, "f")
    with pytest.raises(ValueError, match=r"missing keys \['b'\]"):
        io.check_state_shapes({"a": np.zeros(1)}, {"a": (1,), "b": ()}, "f")


def test_file_with_a_count_beyond_int64(tmp_path):
    path, _ = saved_model(tmp_path)
    rewrite(path, **{"1.num_batches_tracked": np.array(2**64 - 1, np.uint64)})
    load_error(Sequential.load, path, "num_batches_tracked")


# -- BatchNorm files: sizes checked against the stored arrays before allocating ----

def test_batchnorm_file_sizes_checked_before_allocating(tmp_path):
    rng = np.random.default_rng()
    layer = cbn.BatchNorm(4)
    layer(rng.standard_normal((6, 4)).astype(np.float32))
    path = tmp_path / "bn.npz"
    layer.save(path)
    config = layer.config()
    config["num_features"] = 10**15
    rewrite(path, config=np.array(json.dumps(config)))
    load_error(cbn.BatchNorm.load, path, "shape")
