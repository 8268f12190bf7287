"""Saving and loading: round trips, atomic writes, and every kind of bad file."""

import json
import os
import zipfile

import numpy as np
import pytest

import cbn
from cbn import io
from cbn.nn import Linear, ReLU, Sequential, mlp

CONFIGS = [
    dict(num_features=5),
    dict(num_features=3, momentum=None, activation="relu", axis=-1, dtype=np.float64),
    dict(num_features=4, affine=False, eps=1e-3),
    dict(num_features=6, track_running_stats=False, momentum=0.5),
]


def trained_layer(rng, **config):
    """A layer after a few training steps on fresh random data, so its state is not trivial."""
    layer = cbn.BatchNorm(**config)
    C, dtype, axis = layer.num_features, layer.dtype, layer.axis
    shape = (7, C, 3) if axis == 1 else (7, 3, C)
    for _ in range(3):
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)).astype(dtype)
        layer.forward(x)
        layer.backward(rng.standard_normal(shape).astype(dtype))
        for p, g in zip(layer.params.values(), layer.grads.values()):
            p -= 0.1 * g
    return layer, shape


def snapshot(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_batchnorm_round_trip(tmp_path, config):
    rng = np.random.default_rng(len(config))
    layer, shape = trained_layer(rng, **config)
    path = tmp_path / "bn.npz"
    layer.save(path)
    loaded = cbn.BatchNorm.load(path)
    assert loaded.config() == layer.config()
    for k, v in layer.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype and np.array_equal(got, v), k
    x = rng.standard_normal(shape).astype(layer.dtype)
    assert np.array_equal(loaded.eval()(x), layer.eval()(x))
    # Training goes on identically: same running statistics after one more step.
    loaded.train()(x)
    layer.train()(x)
    for k, v in layer.state_dict().items():
        assert np.array_equal(loaded.state_dict()[k], v), k
    assert sorted(os.listdir(tmp_path)) == ["bn.npz"], "temporary files left behind"


def test_save_writes_exactly_the_given_path(tmp_path):
    layer = cbn.BatchNorm(3)
    layer.save(tmp_path / "no_extension")
    assert sorted(os.listdir(tmp_path)) == ["no_extension"]
    assert cbn.BatchNorm.load(tmp_path / "no_extension").num_features == 3


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    old, _ = trained_layer(rng, num_features=4)
    path = tmp_path / "bn.npz"
    old.save(path)
    before = path.read_bytes()
    new, _ = trained_layer(rng, num_features=4)

    def crash(fh, **arrays):  # writes half a file, then dies
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bn.npz"], "temporary file left behind"
    monkeypatch.undo()
    assert np.array_equal(cbn.BatchNorm.load(path).running_mean, old.running_mean)


def test_saving_over_a_directory_is_refused_without_a_stray_file(tmp_path):
    # The temporary file went into the directory's parent before the rename failed.
    target = tmp_path / "models"
    target.mkdir()
    for obj in (cbn.BatchNorm(3), mlp([4, 3], rng=0)):
        with pytest.raises(IsADirectoryError):
            obj.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert list(target.iterdir()) == []


def test_truncated_files_are_rejected(tmp_path):
    rng = np.random.default_rng(2)
    layer, _ = trained_layer(rng, num_features=8)
    good = tmp_path / "good.npz"
    layer.save(good)
    data = good.read_bytes()
    cuts = sorted(set(rng.integers(1, len(data) - 1, 25).tolist()) | {1, 10, len(data) // 2, len(data) - 1})
    for n in cuts:
        bad = tmp_path / f"cut{n}.npz"
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut"):
            cbn.BatchNorm.load(bad)


def test_flipped_bytes_are_rejected_or_harmless(tmp_path):
    """A damaged archive raises ValueError; it never crashes or loads garbage silently."""
    rng = np.random.default_rng(3)
    layer, _ = trained_layer(rng, num_features=8)
    good = tmp_path / "good.npz"
    layer.save(good)
    data = bytearray(good.read_bytes())
    for trial in range(40):
        damaged = bytearray(data)
        pos = int(rng.integers(0, len(data)))
        damaged[pos] ^= 0xFF
        bad = tmp_path / "bad.npz"
        bad.write_bytes(bytes(damaged))
        try:
            loaded = cbn.BatchNorm.load(bad)
        except ValueError:
            continue
        # If the flip hit a byte the format ignores, what loads must be the layer itself.
        for k, v in layer.state_dict().items():
            assert np.array_equal(loaded.state_dict()[k], v), (trial, pos, k)


def test_foreign_and_wrong_files(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.arange(3.0))
    with pytest.raises(ValueError, match="not a cbn file"):
        cbn.BatchNorm.load(tmp_path / "plain.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable cbn file"):
        cbn.BatchNorm.load(tmp_path / "text.npz")
    np.savez(tmp_path / "pickled.npz", __format__=np.array("cbn.BatchNorm"),
             __version__=np.array(1), config=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable cbn file"):
        cbn.BatchNorm.load(tmp_path / "pickled.npz")
    mlp([4, 3, 2], rng=0).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="cbn.Sequential"):
        cbn.BatchNorm.load(tmp_path / "model.npz")
    cbn.BatchNorm(3).save(tmp_path / "bn.npz")
    with pytest.raises(ValueError, match="cbn.BatchNorm"):
        Sequential.load(tmp_path / "bn.npz")
    with pytest.raises(FileNotFoundError):
        cbn.BatchNorm.load(tmp_path / "missing.npz")


def _rewrite(path, **changes):
    """Rewrite a saved file with some entries replaced (None removes one)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k, None)
        else:
            arrays[k] = v
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(__version__=np.array(io.FORMAT_VERSION + 1)), "format version"),
        (dict(__version__=np.array(0)), "format version"),
        (dict(__format__=None), "not a cbn file"),
        (dict(config=None), "config"),
        (dict(config=np.array("{not json")), "JSON"),
        (dict(config=np.array("[1, 2]")), "not a dict"),
        (dict(config=np.array(json.dumps({"num_features": -3}))), "num_features"),
        (dict(config=np.array(json.dumps({"num_features": 4, "colour": "red"}))), "colour"),
        (dict(config=np.array(json.dumps({"num_features": 4, "dtype": "int8"}))), "dtype"),
        (dict(gamma=None), "missing keys"),
        (dict(extra=np.zeros(4)), "unexpected keys"),
        (dict(running_var=np.full(4, -1.0, np.float32)), "non-negative"),
        (dict(running_mean=np.array([0, np.nan, 0, 0], np.float32)), "NaN"),
        (dict(beta=np.zeros(5, np.float32)), "shape"),
        (dict(num_batches_tracked=np.array(-2)), "num_batches_tracked"),
        (dict(num_batches_tracked=np.array(1.5)), "num_batches_tracked"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_contents_are_rejected(tmp_path, change, message):
    rng = np.random.default_rng(4)
    layer, _ = trained_layer(rng, num_features=4)
    path = tmp_path / "bn.npz"
    layer.save(path)
    _rewrite(path, **change)
    with pytest.raises(ValueError, match=message):
        cbn.BatchNorm.load(path)


def test_torch_state_saved_and_loaded(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    tbn = torch.nn.BatchNorm2d(4, momentum=0.3).double()
    for _ in range(3):
        tbn(torch.from_numpy(rng.standard_normal((6, 4, 3, 3)) * 2 + 1))
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.standard_normal(4)))
        tbn.bias.copy_(torch.from_numpy(rng.standard_normal(4)))
    layer = cbn.BatchNorm(4, momentum=0.3, dtype=np.float64)
    layer.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    layer.save(tmp_path / "from_torch.npz")
    loaded = cbn.BatchNorm.load(tmp_path / "from_torch.npz").eval()
    x = rng.standard_normal((5, 4, 3, 3))
    expected = tbn.eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(loaded(x), expected, rtol=1e-12, atol=1e-12)
    assert loaded.num_batches_tracked == 3


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_sequential_round_trip(tmp_path, activation):
    rng = np.random.default_rng(6)
    model = mlp([8, 6, 5, 3], batch_norm=True, activation=activation, rng=7)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    for _ in range(3):
        model.train()(x)
        model.backward(rng.standard_normal((10, 3)).astype(np.float32))
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = Sequential.load(path)
    assert loaded.config() == model.config()
    assert np.array_equal(loaded.eval()(x), model.eval()(x))
    assert loaded[1].num_batches_tracked == 3


def test_sequential_save_rejects_foreign_layers(tmp_path):
    class Custom(ReLU):
        pass

    with pytest.raises(TypeError, match="not a cbn layer"):
        Sequential(Linear(3, 2, rng=0), Custom()).save(tmp_path / "m.npz")


def test_sequential_bad_files(tmp_path):
    model = mlp([4, 3, 2], rng=0)
    path = tmp_path / "m.npz"
    model.save(path)
    cases = [
        dict(config=np.array(json.dumps([{"type": "Conv2d", "config": {}}]))),
        dict(config=np.array(json.dumps([{"type": "Linear"}]))),
        dict(config=np.array(json.dumps({"type": "Linear"}))),
        {"0.W": np.full((4, 3), np.inf, np.float32)},
        {"0.W": np.zeros((3, 4), np.float32)},
        {"9.W": np.zeros((4, 3), np.float32)},
        {"1.gamma": None},
    ]
    for change in cases:
        model.save(path)
        _rewrite(path, **change)
        with pytest.raises(ValueError):
            Sequential.load(path)


def test_failed_sequential_load_state_dict_changes_nothing():
    rng = np.random.default_rng(8)
    model = mlp([6, 5, 4, 2], rng=1)
    model(rng.standard_normal((9, 6)).astype(np.float32))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    bad = {k: rng.standard_normal(v.shape).astype(v.dtype) if v.ndim else v
           for k, v in before.items()}
    bad["3.running_var"] = -np.abs(bad["3.running_var"])  # the last child to load fails
    with pytest.raises(ValueError):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        assert np.array_equal(v, before[k]), k


def test_load_arrays_helper_errors(tmp_path):
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(ValueError, match="no format tag"):
        io.load_arrays(tmp_path / "empty.npz", "cbn.BatchNorm")
    with pytest.raises(TypeError, match="pickle"):
        io.save_arrays(tmp_path / "obj.npz", "x", {"a": np.array([object()])})


def test_deepcopy_and_pickle_give_independent_equal_layers():
    # Both raised TypeError (the layer's lock cannot be pickled), so a trainer
    # could not keep copy.deepcopy(model) of its best epoch, as PyTorch users do.
    import copy
    import pickle

    rng = np.random.default_rng()
    C = int(rng.integers(2, 9))
    for dtype in (np.float32, np.float64):
        bn = cbn.BatchNorm(C, dtype=dtype, activation="relu")
        for _ in range(3):
            x = rng.standard_normal((int(rng.integers(4, 20)), C)).astype(dtype)
            bn(x)
            bn.backward(rng.standard_normal(x.shape).astype(dtype))
        for make in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
            twin = make(bn)
            assert twin.config() == bn.config()
            for k, v in bn.state_dict().items():
                assert np.asarray(twin.state_dict()[k]).tobytes() == np.asarray(v).tobytes()
            assert twin.running_mean is not bn.running_mean
            with pytest.raises(RuntimeError, match="before forward"):
                twin.backward(np.ones((4, C), dtype))  # a copy has no forward of its own
            x = rng.standard_normal((8, C)).astype(dtype)
            before = bn.state_dict()
            y_twin = twin(x)
            twin.gamma = twin.gamma * 2  # changes the copy only
            assert all(np.array_equal(bn.state_dict()[k], v) for k, v in before.items())
            assert y_twin.tobytes() == bn(x).tobytes()

    model = mlp([5, 7, 3], rng=rng)
    model(rng.standard_normal((6, 5)).astype(np.float32))
    x = rng.standard_normal((4, 5)).astype(np.float32)
    for make in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        twin = make(model)
        assert twin.eval()(x).tobytes() == model.eval()(x).tobytes()
        model.train()
