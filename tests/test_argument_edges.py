"""Arguments at the edges, found by a fuzzing audit: each is refused by name, never
read as something else, and a refused call changes nothing."""

import copy
import os
import pickle
import warnings

import numpy as np
import pytest

import cbn
from cbn import functional as F
from cbn import nn, optim, trainer
from cbn.__main__ import main as cli
from cbn.testing import numerical_grad


@pytest.fixture
def rng():
    return np.random.default_rng()


def batch(rng, dtype=np.float64):
    N, C = int(rng.integers(4, 20)), int(rng.integers(2, 9))
    return (rng.standard_normal((N, C)) * 3 + rng.normal(size=C)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((13, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)])
@pytest.mark.parametrize("missing", ["mean", "var", "both"])
def test_statistics_have_no_default(rng, missing, shape, axis, dtype):
    """Mean 0 and var 1 are no neutral statistics: None for either is refused by
    evaluation and by backward (which took it as 0 and 1 and gave a wrong gradient),
    with nothing written into out=."""
    x = (rng.standard_normal(shape) * 3 + rng.normal()).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean, var = F.batch_stats(x, axis=axis)
    m = None if missing in ("mean", "both") else mean
    v = None if missing in ("var", "both") else var
    names = ["mean", "var"] if missing == "both" else [missing]
    out = np.full_like(x, 7.0)
    for call in (lambda: F.batch_norm_eval(x, m, v, axis=axis, out=out),
                 lambda: F.batch_norm_backward(dy, x, m, v, axis=axis, out=out),
                 lambda: F.batch_norm_backward(dy, x, m, v, axis=axis, training=False, out=out)):
        with pytest.raises(TypeError, match=" and ".join(names) + " must be given"):
            call()
    assert (out == 7.0).all()
    # Given, they work, and match the float64 reference.
    y = F.batch_norm_eval(x, mean, var, axis=axis)
    others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(others, keepdims=True)) / np.sqrt(
        x64.var(others, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, atol=2e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("huge", [2**2000, 10**5000], ids=["2**2000", "10**5000"])
def test_huge_integers_are_refused_by_name(rng, huge):
    """float() overflows on them: the error names the argument (no bare OverflowError)."""
    x = batch(rng)
    mean, var = F.batch_stats(x)
    running = (rng.standard_normal(x.shape[1]), rng.uniform(0.5, 2, x.shape[1]))
    before = [a.copy() for a in running]
    for name, args in (("count", (huge, 0.1)), ("factor", (x.shape[0], huge))):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            F.update_running_stats(*running, mean, var, *args)
    for a, b in zip(running, before):
        np.testing.assert_array_equal(a, b)
    params, grads = {"w": rng.standard_normal(3)}, {"w": rng.standard_normal(3)}
    for cls, name in ((optim.SGD, "lr"), (optim.Adam, "lr"), (optim.Momentum, "beta")):
        kwargs = {"lr": 0.1, name: huge}
        with pytest.raises(ValueError, match=name):
            cls(params, grads, **kwargs)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, [True]])
def test_decay_bn_is_a_flag(rng, value):
    """bool("no") is True: decay_bn takes True or False only, as the layer's flags."""
    params = {"0.W": rng.standard_normal((2, 3)), "1.gamma": rng.uniform(0.5, 1.5, 3)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    with pytest.raises(TypeError, match="decay_bn must be True or False"):
        optim.SGD(params, grads, lr=0.1, weight_decay=0.1, decay_bn=value)
    opt = optim.SGD(params, grads, lr=0.1, weight_decay=0.1, decay_bn=np.True_)
    assert opt.decay_bn is True
    with pytest.raises(TypeError, match="decay_bn"):
        opt.decay_bn = "no"
    assert opt.decay_bn is True


def _masked(rng, n):
    values = rng.uniform(0.5, 1.5, n)
    return np.ma.masked_array(values, mask=rng.random(n) < 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var",
                                  "num_batches_tracked"])
def test_masked_vectors_are_refused_and_change_nothing(rng, name, dtype):
    """np.asarray would take the values under the mask: setters refuse a masked array."""
    C = int(rng.integers(2, 9))
    bn = cbn.BatchNorm(C, dtype=dtype)
    bn(rng.standard_normal((int(rng.integers(3, 9)), C, 4)).astype(dtype) * 2 + 1)
    state = {k: np.array(v) for k, v in bn.state_dict().items()}
    bad = np.ma.masked_array(5, mask=True) if name == "num_batches_tracked" else _masked(rng, C)
    with pytest.raises(TypeError, match=name):  # the count's setter: not an int
        setattr(bn, name, bad)
    with pytest.raises(TypeError, match="masked array"):
        bn.load_state_dict({**state, name: bad})
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_masked_state_and_data_are_refused_by_models_and_the_trainer(rng):
    model = nn.mlp([4, 5, 3], rng=rng, dtype=np.float64)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("W"))
    before = {k: np.array(v) for k, v in state.items()}
    bad = dict(state)
    bad[key] = np.ma.masked_array(state[key], mask=np.zeros(state[key].shape, bool))
    with pytest.raises(TypeError, match="masked array"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    X = rng.standard_normal((12, 4))
    y = rng.integers(0, 3, 12)
    opt = optim.SGD(model.params, model.grads, lr=0.1)
    for Xb, yb, what in ((np.ma.masked_array(X, mask=X > 1), y, "X"),
                         (X, np.ma.masked_array(y, mask=y == 0), "labels for X")):
        with pytest.raises(TypeError, match=f"{what} is a masked array"):
            trainer.fit(model, Xb, yb, epochs=1, batch_size=4, optimizer=opt)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_too_many_features_is_named():
    with pytest.raises(ValueError, match=r"num_features=4611686018427387904"):
        cbn.BatchNorm(2**62)


def test_dtype_none_is_the_default_float32(rng):
    """As PyTorch's dtype=None (np.dtype(None) would be float64)."""
    bn = cbn.BatchNorm(3, dtype=None)
    assert bn.dtype == np.float32 and bn.gamma.dtype == np.float32
    assert bn(rng.standard_normal((int(rng.integers(2, 9)), 3)).astype(np.float32)).dtype \
        == np.float32


def test_save_takes_bytes_paths_and_names_the_path_it_cannot_write(rng, tmp_path):
    bn = cbn.BatchNorm(4, dtype=np.float64)
    bn(rng.standard_normal((8, 4)))
    path = os.fsencode(tmp_path / "layer.npz")
    bn.save(path)
    loaded = cbn.BatchNorm.load(path)
    np.testing.assert_array_equal(loaded.running_mean, bn.running_mean)
    missing = tmp_path / "no-such-folder" / "layer.npz"
    with pytest.raises(FileNotFoundError) as err:
        bn.save(missing)
    assert err.value.filename == str(missing) and ".tmp" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["layer.npz"]


def test_bench_refuses_a_shape_larger_than_memory(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "--shapes", "99999999999x99999999999"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "99999999999x99999999999 needs" in err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_into_the_model_layers_keep_their_dtype(rng, dtype):
    """Linear takes dy of its own dtype only (a float64 dy into a float32 layer came
    out as a float64 dx); the activations take float dy only (complex, object, int)."""
    other = np.float64 if dtype == np.float32 else np.float32
    layer = nn.Linear(4, 3, rng=rng, dtype=dtype)
    x = rng.standard_normal((5, 4)).astype(dtype)
    layer(x)
    dW = layer.dW.copy()
    dy = rng.standard_normal((5, 3))
    with pytest.raises(TypeError, match="dy must have the layer's dtype"):
        layer.backward(dy.astype(other))
    np.testing.assert_array_equal(layer.dW, dW)
    dx = layer.backward(dy.astype(dtype))
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, dy @ layer.W.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    for act in (nn.ReLU(), nn.Sigmoid(), nn.Tanh()):
        act(x)
        for bad in (dy[:, :1].repeat(4, 1) + 0j, np.ones((5, 4), dtype=np.int64)):
            with pytest.raises(TypeError, match="dy must have dtype float32 or float64"):
                act.backward(bad)


def test_logits_need_a_class(rng):
    crit = nn.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"N, K >= 1, got \(4, 0\)"):
        crit(np.empty((4, 0)), np.zeros(4, dtype=np.int64))
    logits = rng.standard_normal((4, 3))
    y = rng.integers(0, 3, 4)
    loss, _ = crit(logits, y)
    z = logits - logits.max(axis=1, keepdims=True)
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(4), y])
    assert loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_python_numbers_take_the_layers_dtype_and_non_numbers_are_named(rng, dtype):
    """Lists carry no precision of their own (NumPy's rule for Python
    scalars, NEP 50): a list batch or dy is taken in the layer's dtype, where
    an array of another dtype is refused. None, strings and scalars get a
    message about what they are, not about a dtype they never had."""
    x = (rng.standard_normal((6, 4)) * 3 + 1).astype(dtype)
    dy = rng.standard_normal((6, 4)).astype(dtype)
    a, b = cbn.BatchNorm(4, dtype=dtype), cbn.BatchNorm(4, dtype=dtype)
    y = a(x.tolist())
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, b(x))
    np.testing.assert_array_equal(a.backward(dy.tolist()), b.backward(dy))
    np.testing.assert_array_equal(a.running_var, b.running_var)
    for bad, error, message in ((None, TypeError, "array of numbers, got NoneType"),
                                ("abc", TypeError, "array of numbers, got str"),
                                ([[1.0, "a"]], TypeError, "array of numbers, got list"),
                                (3.0, ValueError, "at least 2 dimensions")):
        with pytest.raises(error, match=message):
            a(bad)
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match="convert it with x.astype"):
        a(x.astype(other))


def test_functional_gamma_and_beta_take_integers_and_lists(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    expected = F.batch_norm_train(x, np.array([1.0, 2.0, 3.0, 4.0], np.float32),
                                  np.array([0.0, -1.0, 1.0, 2.0], np.float32))[0]
    for gamma, beta in (([1, 2, 3, 4], [0, -1, 1, 2]),
                        (np.arange(1, 5), np.array([0, -1, 1, 2], np.int8)),
                        ([1.0, 2.0, 3.0, 4.0], (0.0, -1.0, 1.0, 2.0))):
        np.testing.assert_array_equal(F.batch_norm_train(x, gamma, beta)[0], expected)
    with pytest.raises(TypeError, match="array of numbers"):
        F.batch_norm_train(x, ["a", "b", "c", "d"])


# ---------------------------------------------------------------------------
# Messages a convolutional trainer's author met (an integration audit)
# ---------------------------------------------------------------------------


def test_a_parameter_of_the_wrong_length_names_the_channel_axis():
    """Channels-last data through the functional API without axis=-1."""
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
    gamma = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\) \(one value per "
                                         r"channel of x along axis 1\), got \(3,\)"):
        F.batch_norm_train(x, gamma)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\).*axis -1"):
        F.batch_norm_eval(x, np.zeros(4), np.ones(3), axis=-1)


def test_an_example_without_its_batch_axis_is_told_to_add_it():
    rng = np.random.default_rng()
    bn = cbn.BatchNorm(4).eval()
    image = rng.standard_normal((4, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"without its batch axis\? add it: x\[None\]"):
        bn(image)
    assert bn(image[None]).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"expected 4 \(num_features\)$"):
        bn(rng.standard_normal((2, 3, 3)).astype(np.float32))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "nn-deepcopy"])
def test_backward_of_a_copy_says_copies_keep_no_forward(how):
    rng = np.random.default_rng()
    x = rng.standard_normal((6, 3))
    if how == "nn-deepcopy":
        layer = nn.Linear(3, 2, dtype=np.float64, rng=0)
        layer(x)
        copy_ = copy.deepcopy(layer)
        dy = rng.standard_normal((6, 2))
    else:
        layer = cbn.BatchNorm(3, dtype=np.float64)
        layer(x)
        copy_ = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
        dy = rng.standard_normal((6, 3))
    with pytest.raises(RuntimeError, match="a copy, a pickle or a loaded"):
        copy_.backward(dy)


def test_numerical_grad_warns_on_float32_as_gradcheck_does():
    rng = np.random.default_rng()
    a32 = rng.standard_normal(3).astype(np.float32)
    with pytest.warns(UserWarning, match="float32 array: central differences need float64"):
        numerical_grad(lambda: float((a32 ** 2).sum()), a32)
    a64 = a32.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Rounding in f bounds the error absolutely: about eps * f / h = 1e-9 here,
        # which is more than 1e-8 of an entry near zero (CI drew -0.0127).
        np.testing.assert_allclose(numerical_grad(lambda: float((a64 ** 2).sum()), a64),
                                   2 * a64, rtol=1e-8, atol=1e-7)


def test_a_dtype_mismatch_says_whose_dtype_and_how_numpy_2_makes_float64():
    rng = np.random.default_rng()
    bn = cbn.BatchNorm(3)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    bn(x)
    # What NumPy 2 (NEP 50) makes of float32 * np.float64(0.5); NumPy 1 kept
    # float32 there, and the package supports it, so the float64 is explicit.
    dy = rng.standard_normal((4, 3)).astype(np.float32).astype(np.float64) * 0.5
    with pytest.raises(TypeError, match=r"dy has dtype float64, expected float32 \(the dtype "
                                        r"of x\).*NumPy 2 makes float64"):
        bn.backward(dy)
    with pytest.raises(TypeError, match=r"x has dtype float16, expected float32 \(the "
                                        r"layer's dtype\); convert it with x.astype"
                                        r"\(numpy.float32\)$"):
        bn(x.astype(np.float16))


def test_a_layer_too_large_to_allocate_raises_memory_error_naming_num_features():
    """NumPy's own allocation error type takes two arguments: the layer's message
    must still come out as a MemoryError, not a TypeError from re-raising it."""
    with pytest.raises(MemoryError, match=r"num_features=1152921504606846976: cannot allocate "
                                          r"the layer's per-channel arrays"):
        cbn.BatchNorm(1 << 60)
