"""The direct calls: argument handling in C for arguments the kernels take as they are.

``cbn.functional`` and the layer first offer their arguments to
``_kernels.eval_call`` / ``train_call`` / ``backward_call``, which accept only
plain ones (exact C-contiguous, aligned ndarrays of the right dtype and shape,
int/float/None options) and return None for anything else; the checked path
then converts or rejects. These tests pin down that plain arguments take the
direct call, that everything else takes the checked path, and that both give
the same bits.
"""

import numpy as np
import pytest
from test_functional import assert_close, make_batch, middle_axis, seed_of

import cbn
from cbn import _kernels
from cbn import functional as F
from cbn import reference as ref

DTYPES = [np.float32, np.float64]


def _refuse(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran: the direct call declined plain arguments")

    return fail


@pytest.fixture
def direct_only(monkeypatch):
    """Make the checked paths fail, so a passing call must have gone direct."""
    for name in ("_checked_eval", "_checked_train", "_checked_backward"):
        monkeypatch.setattr(F, name, _refuse(name))
    for name in ("_checked_forward", "_checked_backward"):
        monkeypatch.setattr(cbn.BatchNorm, name, _refuse(name))


@pytest.fixture
def checked_calls(monkeypatch):
    """Count the calls of the checked paths."""
    calls = []
    for name in ("_checked_eval", "_checked_train", "_checked_backward"):
        original = getattr(F, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(F, name, spy)
    return calls


def random_case(seed, dtype):
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(2, 5))
    axis = [1, -1, middle_axis(rank)][int(rng.integers(3))]
    shape = [int(d) for d in rng.integers(2, 6, size=rank)]
    shape[axis] = int(rng.integers(1, 40))
    x, gamma, beta = make_batch(rng, tuple(shape), axis, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    C = shape[axis]
    mean = rng.normal(size=C)
    var = rng.uniform(0.2, 3.0, size=C)
    activation = [None, "relu"][int(rng.integers(2))]
    return rng, x, dy, gamma, beta, mean, var, axis, activation


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_arguments_go_direct_and_give_the_checked_bits(dtype, seed, monkeypatch):
    rng, x, dy, gamma, beta, mean, var, axis, activation = random_case(
        seed_of("direct", dtype.__name__, seed), dtype)
    n_threads = [1, 2, None, -1][seed % 4]
    opts = dict(axis=axis, eps=float(rng.uniform(1e-6, 1e-2)), activation=activation,
                n_threads=n_threads)
    want_train = F._checked_train(x, gamma, beta, opts["axis"], opts["eps"], activation, None,
                                  n_threads)
    want_eval = F._checked_eval(x, mean, var, gamma, beta, opts["axis"], opts["eps"],
                                activation, None, n_threads)
    want_bwd = {t: F._checked_backward(dy, x, mean, var, gamma, beta, opts["axis"],
                                       opts["eps"], t, activation, None, n_threads)
                for t in (True, False)}

    for name in ("_checked_eval", "_checked_train", "_checked_backward"):
        monkeypatch.setattr(F, name, _refuse(name))
    for got, want in zip(F.batch_norm_train(x, gamma, beta, **opts), want_train):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(F.batch_norm_eval(x, mean, var, gamma, beta, **opts), want_eval)
    for training in (True, False):
        got = F.batch_norm_backward(dy, x, mean, var, gamma, beta, training=training, **opts)
        for g, w in zip(got, want_bwd[training]):
            assert g.dtype == w.dtype and np.array_equal(g, w)

    # And against the float64 reference, so that agreement is not shared error.
    x64 = x.astype(np.float64)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    y = F.batch_norm_eval(x, mean, var, gamma, beta, **opts)
    want = ref.forward_eval(x64, mean, var, g64, b64, opts["eps"], axis=axis)
    if activation == "relu":
        want = np.maximum(want, 0)
    assert_close(y, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffers_go_direct(dtype, direct_only):
    _, x, dy, gamma, beta, mean, var, axis, _ = random_case(seed_of("out", dtype.__name__), dtype)
    y_new = F.batch_norm_eval(x, mean, var, gamma, beta, axis=axis)
    out = np.empty_like(x)
    y = F.batch_norm_eval(x, mean, var, gamma, beta, axis=axis, out=out)
    assert y is out and np.array_equal(out, y_new)
    xi = x.copy()
    assert F.batch_norm_eval(xi, mean, var, gamma, beta, axis=axis, out=xi) is xi
    assert np.array_equal(xi, y_new)
    yt, m, v = F.batch_norm_train(x, gamma, beta, axis=axis)
    out = np.empty_like(x)
    assert F.batch_norm_train(x, gamma, beta, axis=axis, out=out)[0] is out
    assert np.array_equal(out, yt)
    dx = F.batch_norm_backward(dy, x, m, v, gamma, beta, axis=axis)[0]
    dyi = dy.copy()
    assert F.batch_norm_backward(dyi, x, m, v, gamma, beta, axis=axis, out=dyi)[0] is dyi
    assert np.array_equal(dyi, dx)


def _direct_variants(x, gamma, mean):
    """Common forms of valid arguments that the direct calls convert themselves."""
    return {
        "gamma None": dict(gamma=None),
        "mean float32": dict(mean=mean.astype(np.float32)),
        "eps a numpy float64": dict(eps=np.float64(1e-5)),
    }


def _variants(x, gamma, mean):
    """Valid arguments that the direct calls leave to the checked path, then
    those they convert themselves."""
    return {
        "x Fortran-ordered": dict(x=np.asfortranarray(x)),
        "x a strided view": dict(x=np.repeat(x, 2, axis=-1)[..., ::2]),
        "gamma a list": dict(gamma=gamma.tolist()),
        "gamma of the other dtype": dict(
            gamma=gamma.astype(np.float64 if gamma.dtype == np.float32 else np.float32)),
        "mean a list": dict(mean=mean.tolist()),
        "eps a numpy float32": dict(eps=np.float32(1e-5)),
        "eps an int": dict(eps=1),
        "axis a numpy int": dict(axis=np.int64(1)),
        "n_threads a numpy int": dict(n_threads=np.int64(2)),
        **_direct_variants(x, gamma, mean),
    }


@pytest.mark.parametrize("variant", list(_variants(np.ones((2, 3)), np.ones(3), np.ones(3))))
@pytest.mark.parametrize("dtype", DTYPES)
def test_arguments_that_need_converting_give_the_same_results(dtype, variant, checked_calls):
    rng = np.random.default_rng(seed_of("variant", dtype.__name__, variant))
    x, gamma, beta = make_batch(rng, (6, 5, 3), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    mean, var = rng.normal(size=5), rng.uniform(0.5, 2.0, size=5)
    base = dict(x=x, gamma=gamma, mean=mean, eps=1e-5, axis=1, n_threads=1)
    args = dict(base, **_variants(x, gamma, mean)[variant])
    # What the checked path must produce: the same values, converted by hand.
    plain = dict(base)
    plain["x"] = np.ascontiguousarray(args["x"])
    plain["gamma"] = (np.ones(5, dtype) if args["gamma"] is None
                      else np.asarray(args["gamma"]).astype(dtype))
    plain["mean"] = np.asarray(args["mean"], np.float64)
    plain["eps"] = float(args["eps"])

    def run(a):
        common = dict(axis=a["axis"], eps=a["eps"], n_threads=a["n_threads"])
        y = F.batch_norm_eval(a["x"], a["mean"], var, a["gamma"], beta, **common)
        t = F.batch_norm_train(a["x"], a["gamma"], beta, **common)
        b = F.batch_norm_backward(dy, a["x"], a["mean"], var, a["gamma"], beta, **common)
        return (y, *t, *b)

    want = run(plain)
    assert checked_calls == []
    got = run(args)
    expected = ["_checked_backward", "_checked_eval", "_checked_train"]
    if variant in _direct_variants(x, gamma, mean):
        expected = []
    elif variant == "x Fortran-ordered":  # taken as it lies; dy (C order) is copied to x's
        expected = ["_checked_backward"]
    elif variant.startswith("mean"):  # training takes no statistics
        expected.remove("_checked_train")
    assert sorted(checked_calls) == expected
    if variant == "x Fortran-ordered":
        # Normalized where it lies, in its own summation order: the same values
        # to rounding, y and dx laid out as x is.
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert_close(g, w, g.dtype, k=256)
        assert all(a.flags.f_contiguous for a in (got[0], got[1], got[4]))
        return
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_training_as_a_numpy_bool_takes_the_checked_path(checked_calls):
    rng = np.random.default_rng(seed_of("npbool"))
    x, gamma, beta = make_batch(rng, (7, 4), 1, np.float64)
    dy = rng.normal(size=x.shape)
    _, m, v = F.batch_norm_train(x, gamma, beta)
    want = F.batch_norm_backward(dy, x, m, v, gamma, beta, training=False)
    got = F.batch_norm_backward(dy, x, m, v, gamma, beta, training=np.bool_(False))
    assert checked_calls == ["_checked_backward"]
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


JUNK = [None, 0, -1, 2**70, 1.5, float("nan"), "relu", "x", b"x", (), [1.0], object(),
        np.float32(1.0), np.zeros(0), np.zeros((0, 3)), np.zeros(3), np.zeros((2, 3), np.int64),
        np.zeros((2, 3), np.float16), np.zeros((3, 2)), np.zeros((2, 3)).T,
        np.zeros((2, 3), np.float32), np.ones(2)]


def _plain_args(dtype=np.float64):
    rng = np.random.default_rng(seed_of("junk", np.dtype(dtype).name))
    x = rng.normal(size=(2, 3)).astype(dtype)
    p = np.ones(3, dtype)
    s = np.ones(3)
    return {
        "eval_call": [x, s, s, p, p, 1, 1e-5, None, None, 1, 1 << 16, 1 << 30],
        "train_call": [x, p, p, 1, 1e-5, None, None, 1, 1 << 16, 1 << 30],
        "backward_call": [x.copy(), x, s, s, p, p, 1, 1e-5, True, None, None, 1, 1 << 16,
                          1 << 30],
    }


@pytest.mark.parametrize("fn", ["eval_call", "train_call", "backward_call"])
def test_direct_calls_decline_junk_without_raising(fn):
    call = getattr(_kernels, fn)
    plain = _plain_args()[fn]
    assert call(*plain) is not None  # the plain arguments are taken
    n_sized = len(plain) - 2  # the last two are sizes from cbn.functional
    for position in range(n_sized):
        for junk in JUNK:
            args = list(plain)
            args[position] = junk
            result = call(*args)
            # Junk that happens to be a valid value (None for out, 1 for axis...)
            # may run; anything else is declined, never raised.
            assert result is None or isinstance(result, (np.ndarray, tuple, int))


def test_direct_call_refuses_an_out_that_overlaps_its_input_shifted():
    buf = np.random.default_rng(4).normal(size=24)
    x = buf[:20].reshape(5, 4)
    out = buf[4:].reshape(5, 4)
    s, p = np.ones(4), np.ones(4)
    assert _kernels.eval_call(x, s, s, p, p, 1, 1e-5, None, out, 1, 1 << 16, 1 << 30) is None
    with pytest.raises(ValueError, match="overlaps"):
        F.batch_norm_eval(x, s, s, p, p, out=out)


def test_direct_call_refuses_read_only_and_mistyped_outputs():
    x = np.random.default_rng(5).normal(size=(5, 4))
    s, p = np.ones(4), np.ones(4)
    out = np.empty_like(x)
    out.setflags(write=False)
    for bad in (out, np.empty((5, 4), np.float32), np.empty((4, 5)), np.empty((5, 4)).T):
        assert _kernels.eval_call(x, s, s, p, p, 1, 1e-5, None, bad, 1, 1 << 16, 1 << 30) is None
        assert _kernels.train_call(x, p, p, 1, 1e-5, None, bad, 1, 1 << 16, 1 << 30) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_failures_on_the_direct_path_raise_named_errors(dtype, monkeypatch):
    rng = np.random.default_rng(seed_of("fail", dtype.__name__))
    x, gamma, beta = make_batch(rng, (6, 3, 2), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    xn = x.copy()
    xn[3, 1, 0] = np.nan
    with pytest.raises(FloatingPointError, match="channel 1"):
        F.batch_norm_train(xn, gamma, beta)
    with pytest.raises(FloatingPointError, match="not finite"):
        F.batch_norm_eval(xn, mean, var, gamma, beta)
    dyn = dy.copy()
    dyn[0, 2, 1] = np.inf
    with pytest.raises(FloatingPointError, match="not finite"):
        F.batch_norm_backward(dyn, x, mean, var, gamma, beta)
    bad_gamma = gamma.copy()
    bad_gamma[2] = np.nan
    with pytest.raises(FloatingPointError, match="gamma contains NaN"):
        F.batch_norm_train(x, bad_gamma, beta)
    neg = var.copy()
    neg[0] = -0.5
    out = np.full_like(x, 7)
    with pytest.raises(ValueError, match="var must be non-negative"):
        F.batch_norm_eval(x, mean, neg, gamma, beta, out=out)
    assert np.all(out == 7)  # nothing written
    with pytest.raises(ValueError, match="var must be non-negative"):
        F.batch_norm_backward(dy, x, mean, neg, gamma, beta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_failures_without_gamma_or_with_float32_stats_raise_named_errors(
        dtype, direct_only):
    rng = np.random.default_rng(seed_of("fail-converted", dtype.__name__))
    x, _, _ = make_batch(rng, (6, 4, 3), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    mean = rng.normal(size=4).astype(np.float32)
    var = rng.uniform(0.5, 2, size=4).astype(np.float32)
    xn = x.copy()
    xn[2, 3, 1] = np.inf
    with pytest.raises(FloatingPointError, match="x contains NaN or Inf"):
        F.batch_norm_eval(xn, mean, var)
    with pytest.raises(FloatingPointError, match="dy or x contains NaN or Inf"):
        F.batch_norm_backward(dy, xn, mean, var, training=False)
    bad_mean = mean.copy()
    bad_mean[1] = np.nan
    with pytest.raises(FloatingPointError, match=r"mean contains NaN or Inf \(channel 1\)"):
        F.batch_norm_eval(x, bad_mean, var)
    with pytest.raises(FloatingPointError, match=r"mean contains NaN or Inf \(channel 1\)"):
        F.batch_norm_backward(dy, x, bad_mean, var, training=False)
    neg = var.copy()
    neg[2] = -0.25
    out = np.full_like(x, 7)
    with pytest.raises(ValueError, match=r"var must be non-negative, got -0.25 \(channel 2\)"):
        F.batch_norm_eval(x, mean, neg, out=out)
    assert np.all(out == 7)  # nothing written


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_plain_batches_go_direct_and_match_the_checked_path(dtype, activation,
                                                                  monkeypatch):
    rng = np.random.default_rng(seed_of("layer", dtype.__name__, activation))
    x, gamma, beta = make_batch(rng, (9, 6, 5), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    # Two identical layers: one forced through the checked path (a view that
    # is not contiguous), one direct; their results and state must agree.
    layers = [cbn.BatchNorm(6, dtype=dtype, activation=activation) for _ in range(2)]
    for layer in layers:
        layer.gamma, layer.beta = gamma, beta
    strided = np.repeat(x, 2, axis=-1)[..., ::2]
    dys = np.repeat(dy, 2, axis=-1)[..., ::2]
    want = []
    for _ in range(2):
        want.append((layers[0](strided).copy(), layers[0].backward(dys).copy(),
                     layers[0].dgamma.copy(), layers[0].dbeta.copy()))
    layers[0].eval()
    want_eval = layers[0](strided)

    monkeypatch.setattr(cbn.BatchNorm, "_checked_forward", _refuse("_checked_forward"))
    monkeypatch.setattr(cbn.BatchNorm, "_checked_backward", _refuse("_checked_backward"))
    for w in want:
        got = (layers[1](x), layers[1].backward(dy), layers[1].dgamma, layers[1].dbeta)
        for g, ww in zip(got, w):
            assert np.array_equal(g, ww)
    assert np.array_equal(layers[1].running_mean, layers[0].running_mean)
    assert np.array_equal(layers[1].running_var, layers[0].running_var)
    assert layers[1].num_batches_tracked == layers[0].num_batches_tracked == 2
    layers[1].eval()
    assert np.array_equal(layers[1](x), want_eval)


def test_layer_bad_input_still_gets_the_layer_messages():
    layer = cbn.BatchNorm(4)
    with pytest.raises(TypeError, match="float64, expected float32"):
        layer(np.ones((3, 4)))
    with pytest.raises(ValueError, match="expected 4"):
        layer(np.ones((3, 5), np.float32))
    layer(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="shape of the forward input"):
        layer.backward(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):
        layer.backward(np.ones((3, 4)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_calls_decline_byte_swapped_arrays(dtype):
    """``>f4`` has NumPy's float32 type number; read as native it is garbage."""
    rng = np.random.default_rng(seed_of("swapped", dtype.__name__))
    x, gamma, beta = make_batch(rng, (6, 4), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    s, v = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    sizes = (1 << 16, 1 << 30)

    def swapped(a):
        return a.astype(a.dtype.newbyteorder())

    calls = {
        "eval_call": (_kernels.eval_call,
                      [x, s, v, gamma, beta, 1, 1e-5, None, None, 1, *sizes], (0, 1, 2, 3, 4)),
        "train_call": (_kernels.train_call,
                       [x, gamma, beta, 1, 1e-5, None, None, 1, *sizes], (0, 1, 2)),
        "backward_call": (_kernels.backward_call,
                          [dy, x, s, v, gamma, beta, 1, 1e-5, True, None, None, 1, *sizes],
                          (0, 1, 2, 3, 4, 5)),
    }
    for name, (call, args, positions) in calls.items():
        assert call(*args) is not None, name
        for p in positions:
            bad = list(args)
            bad[p] = swapped(args[p])
            assert call(*bad) is None, (name, p)
    out = swapped(np.empty_like(x))
    assert _kernels.eval_call(x, s, v, gamma, beta, 1, 1e-5, None, out, 1, *sizes) is None
    # Through the public function: refused by name, never computed from raw bytes.
    with pytest.raises(TypeError, match="gamma"):
        F.batch_norm_train(x, swapped(gamma), beta)
    with pytest.raises(TypeError, match="x must be"):
        F.batch_norm_eval(swapped(x), s, v, gamma, beta)
