"""One test per row of the table in docs/robustness.md: what cbn does with each
unusual or bad input. If a behaviour changes, the test fails and the table must
be updated with it.

Every failing call is also checked to leave the layer as it was (running
statistics, num_batches_tracked, gradients), since a poisoned running statistic
is the costly failure in a long training run.
"""

import numpy as np
import pytest

import cbn
from cbn import functional as F
from cbn import reference as R
from cbn.nn import mlp


def snapshot(layer):
    """Everything a failed call must not change."""
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    if layer.affine:
        state["dgamma"] = layer.dgamma.copy()
        state["dbeta"] = layer.dbeta.copy()
    return state


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].tobytes() == before[k].tobytes(), f"{k} changed"


def data(rng, shape, dtype=np.float32, offset=0.0, scale=1.0):
    C = shape[1]
    ch = rng.uniform(-1, 1, (1, C) + (1,) * (len(shape) - 2))
    return (offset + ch + scale * rng.standard_normal(shape)).astype(dtype)


def trained_layer(rng, C=3, **kw):
    """A layer with non-trivial parameters and statistics (a few steps in)."""
    layer = cbn.BatchNorm(C, **kw)
    dt = layer.dtype
    if layer.affine:
        layer.gamma = rng.uniform(0.5, 1.5, C)
        layer.beta = rng.uniform(-0.5, 0.5, C)
    for _ in range(3):
        x = data(rng, (8, C), dt)
        layer.forward(x)
        layer.backward(rng.standard_normal(x.shape).astype(dt))
    return layer


# -- rows --------------------------------------------------------------------


def test_batch_of_one_in_training():
    rng = np.random.default_rng(1)
    layer = trained_layer(rng)
    before = snapshot(layer)
    for shape in [(1, 3), (1, 3, 1), (1, 3, 1, 1)]:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer.forward(data(rng, shape))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm_train(data(rng, shape))
    assert_unchanged(layer, before)
    # One sample with several values per channel is a valid batch (as in PyTorch).
    x = data(rng, (1, 3, 4, 4))
    y = layer.forward(x)
    y_ref, _, _ = R.forward_train(x.astype(np.float64), layer.gamma, layer.beta, 1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_batch_of_one_in_eval():
    rng = np.random.default_rng(2)
    layer = trained_layer(rng).eval()
    x = data(rng, (1, 3))
    y = layer.forward(x)
    y_ref = R.forward_eval(
        x.astype(np.float64), layer.running_mean, layer.running_var, layer.gamma, layer.beta
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    dx = layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_in_a_batch(bad):
    rng = np.random.default_rng(3)
    layer = trained_layer(rng)
    before = snapshot(layer)
    x = data(rng, (8, 3, 5))
    x[4, 1, 2] = bad
    with pytest.raises(FloatingPointError, match="channel 1"):
        layer.forward(x)
    assert_unchanged(layer, before)  # running statistics not poisoned
    # The failed forward did not replace the cache of the last good forward,
    # (8, 3): backward refers to that one, not to the rejected batch.
    with pytest.raises(ValueError, match="dy must have the shape of the forward input"):
        layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    with pytest.raises(FloatingPointError):
        layer.eval().forward(x)
    with pytest.raises(FloatingPointError):
        F.batch_norm_train(x)
    # A clean batch afterwards works normally.
    layer.train().forward(data(rng, (8, 3, 5)))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5)], ids=["rows", "runs"])
def test_nan_or_inf_in_a_batch_statistics_only(bad, shape):
    """F.batch_stats on a channel with NaN/Inf must not report a finite variance.

    Regression test: the per-block clamp ``m2 = d if d > 0.0 else 0.0`` in the
    kernels used to turn a NaN second moment into 0, so the channel was
    reported as var = 0 (a constant channel) next to mean = NaN, and
    batch_stats raised nothing (fixed in caa309e).
    """
    rng = np.random.default_rng(31)
    x = data(rng, shape)
    x[4, 1] = bad
    try:
        mean, var = F.batch_stats(x)
    except FloatingPointError:
        return
    assert not np.isfinite(mean[1])
    assert not np.isfinite(var[1]), f"channel with {bad} reported var={var[1]}"


def test_constant_channel():
    rng = np.random.default_rng(4)
    layer = trained_layer(rng)
    x = data(rng, (16, 3))
    x[:, 1] = np.float32(4.2)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y = layer.forward(x)
    # var = 0: y is exactly beta for that channel (x - mean is exactly 0).
    assert np.all(y[:, 1] == layer.beta[1])
    np.testing.assert_allclose(layer.running_mean[1], 0.9 * rm[1] + 0.1 * 4.2, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var[1], 0.9 * rv[1], rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    # x_hat = 0, so dx = gamma/sqrt(eps) * (dy - mean(dy)), finite.
    want = layer.gamma[1] / np.sqrt(1e-5) * (dy[:, 1].astype(np.float64) - dy[:, 1].mean())
    np.testing.assert_allclose(dx[:, 1], want, rtol=1e-4, atol=1e-3)
    assert layer.dgamma[1] == 0.0


def test_huge_values():
    rng = np.random.default_rng(5)
    # 1e18 offset and spread: fine in float32 and float64.
    for dt in (np.float32, np.float64):
        layer = cbn.BatchNorm(3, dtype=dt)
        x = data(rng, (64, 3), dt, offset=1e18, scale=1e18)
        y = layer.forward(x)
        y_ref, _, var = R.forward_train(x.astype(np.float64), np.ones(3), np.zeros(3))
        np.testing.assert_allclose(y, y_ref, atol=1e-5)
        np.testing.assert_allclose(
            layer.running_var, 0.9 + 0.1 * var * 64 / 63, rtol=1e-5
        )
        assert np.all(np.isfinite(layer.running_var))
    # 1e20 in float32: the variance (1e40) does not fit the float32 running
    # statistics: a clear error, nothing changed. In float64 it is fine.
    layer = cbn.BatchNorm(3, dtype=np.float32)
    before = snapshot(layer)
    x = data(rng, (64, 3), np.float32, offset=1e20, scale=1e20)
    with pytest.raises(FloatingPointError, match="overflow float32"):
        layer.forward(x)
    assert_unchanged(layer, before)
    # The functional forward has no running statistics: it normalizes correctly.
    y, _, _ = F.batch_norm_train(x)
    y_ref, _, _ = R.forward_train(x.astype(np.float64), np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    layer64 = cbn.BatchNorm(3, dtype=np.float64)
    y = layer64.forward(x.astype(np.float64))
    np.testing.assert_allclose(y, y_ref, atol=1e-12)


def test_huge_values_whose_square_overflows_float64():
    """float64 values ~1e300: the squared deviations overflow double.

    Regression test: inf - inf = NaN in a block's second moment used to be
    clamped to 0, so the channel was treated as constant: var = 0,
    y = x / sqrt(eps) ~ 3e302 (not normalized), running_var updated as if var
    were 0, and no error (fixed in caa309e).
    """
    x = np.array([[1e300], [-1e300], [1e300], [-1e300]])
    with pytest.raises(FloatingPointError):
        F.batch_norm_train(x)
    layer = cbn.BatchNorm(1, dtype=np.float64)
    before = snapshot(layer)
    with pytest.raises(FloatingPointError):
        layer.forward(x)
    assert_unchanged(layer, before)


def test_tiny_values():
    rng = np.random.default_rng(6)
    for dt in (np.float32, np.float64):
        # Mean and spread both ~1e-20 (representable in float32 too).
        x = (1e-20 * data(rng, (64, 3), np.float64)).astype(dt)
        layer = cbn.BatchNorm(3, dtype=dt)
        y = layer.forward(x)
        # var ~ 1e-40 << eps: y = (x - mean)/sqrt(eps) ~ 1e-17, not blown up.
        y_ref, mean, var = R.forward_train(x.astype(np.float64), np.ones(3), np.zeros(3))
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-30)
        assert np.abs(y).max() < 1e-15
        # With eps below the variance the channel is normalized to unit variance.
        layer_small_eps = cbn.BatchNorm(3, dtype=dt, eps=1e-60)
        y = layer_small_eps.forward(x)
        np.testing.assert_allclose(y.astype(np.float64).std(axis=0), 1.0, rtol=1e-4)


def test_mismatched_dtypes():
    rng = np.random.default_rng(7)
    layer = trained_layer(rng)  # float32
    before = snapshot(layer)
    x64 = data(rng, (8, 3), np.float64)
    with pytest.raises(TypeError, match="float64, expected float32"):
        layer.forward(x64)
    layer.forward(x64.astype(np.float32))
    with pytest.raises(TypeError, match="dy has dtype float64"):
        layer.backward(rng.standard_normal((8, 3)))
    x32 = x64.astype(np.float32)
    with pytest.raises(TypeError, match="dy has dtype float64"):
        F.batch_norm_backward(rng.standard_normal((8, 3)), x32, np.zeros(3), np.ones(3))
    # The functional API follows x's dtype; gamma/beta of another float dtype are converted.
    y, _, _ = F.batch_norm_train(x64, np.ones(3, np.float32), np.zeros(3, np.float32))
    assert y.dtype == np.float64
    assert layer.running_mean.dtype == np.float32
    del before
    # affine=False as well (it used to normalize the float64 batch, count it in the
    # running statistics, and then refuse every dy).
    plain = cbn.BatchNorm(3, affine=False)
    with pytest.raises(TypeError, match="float64, expected float32"):
        plain.forward(x64)
    assert plain.num_batches_tracked == 0


def test_float16_input():
    rng = np.random.default_rng(8)
    x16 = data(rng, (8, 3), np.float16)
    with pytest.raises(TypeError, match="float16"):
        cbn.BatchNorm(3)(x16)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.batch_norm_train(x16)
    with pytest.raises(TypeError, match="float16"):
        cbn.BatchNorm(3, dtype=np.float16)


def test_int_input():
    rng = np.random.default_rng(9)
    xi = rng.integers(-5, 5, (8, 3))
    with pytest.raises(TypeError, match="int64"):
        cbn.BatchNorm(3)(xi)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.batch_norm_train(xi)
    with pytest.raises(TypeError):
        F.batch_norm_eval(xi.astype(np.int8), np.zeros(3), np.ones(3))


@pytest.mark.parametrize(
    "layout", ["fortran", "transposed", "strided", "negative", "readonly", "unaligned"]
)
def test_noncontiguous_fortran_readonly_input(layout):
    rng = np.random.default_rng(10)
    x = data(rng, (8, 3, 5))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    if layout == "fortran":
        xv = np.asfortranarray(x)
    elif layout == "transposed":
        xv = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)
    elif layout == "strided":
        big = np.zeros((16, 3, 10), np.float32)
        big[::2, :, ::2] = x
        xv = big[::2, :, ::2]
    elif layout == "negative":
        xv = np.ascontiguousarray(x[::-1, :, ::-1])[::-1, :, ::-1]
    elif layout == "unaligned":
        # A view at an odd byte offset, as np.frombuffer(buf, offset=1) gives.
        raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
        xv = raw[1:].view(np.float32).reshape(x.shape)
        xv[...] = x
        assert not xv.flags.aligned
    else:
        xv = x.copy()
        xv.flags.writeable = False
    assert np.array_equal(xv, x)
    a, b = cbn.BatchNorm(3), cbn.BatchNorm(3)
    y_c, y_v = a.forward(x), b.forward(xv)
    dx_c, dx_v = a.backward(dy), b.backward(dy)
    if layout in ("fortran", "transposed"):
        # One block in another order of the axes: normalized where it lies, and
        # the results laid out as x is (NumPy's order "K").
        assert y_v.strides == xv.strides and dx_v.strides == xv.strides
        for got, want in ((y_v, y_c), (dx_v, dx_c), (b.running_var, a.running_var),
                          (b.dgamma, a.dgamma)):
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
        return
    assert y_v.flags.c_contiguous and dx_v.flags.c_contiguous
    assert y_c.tobytes() == y_v.tobytes()
    assert dx_c.tobytes() == dx_v.tobytes()
    assert a.running_var.tobytes() == b.running_var.tobytes()
    if layout == "readonly":
        assert not xv.flags.writeable  # never written to


def test_wrong_channel_count():
    rng = np.random.default_rng(11)
    layer = trained_layer(rng)
    before = snapshot(layer)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        with pytest.raises(ValueError, match="4 channels.*expected 3"):
            layer.forward(data(rng, (8, 4)))
    assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="gamma must have shape"):
        F.batch_norm_train(data(rng, (8, 4)), np.ones(3, np.float32))
    # dy of the wrong shape in backward.
    layer.train().forward(data(rng, (8, 3)))
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(rng.standard_normal((8, 4)).astype(np.float32))


def test_backward_before_forward():
    rng = np.random.default_rng(12)
    layer = cbn.BatchNorm(3)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(rng.standard_normal((8, 3)).astype(np.float32))
    assert_unchanged(layer, before)


def test_input_modified_between_forward_and_backward():
    # More layouts, dtypes, rewrites and nn.Linear in tests/test_input_rewritten.py.
    rng = np.random.default_rng()
    layer = trained_layer(rng)
    x = data(rng, (8, 3))
    layer.forward(x)
    before = snapshot(layer)
    x *= 2  # e.g. a loader refilling its buffer before backward
    with pytest.raises(RuntimeError, match="input of the forward pass was modified in place"):
        layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert_unchanged(layer, before)


def test_dy_with_nan():
    rng = np.random.default_rng(13)
    layer = trained_layer(rng)
    x = data(rng, (8, 3))
    layer.forward(x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer.backward(dy)
    before = snapshot(layer)
    for bad in (np.nan, np.inf):
        dy_bad = dy.copy()
        dy_bad[0, 0] = bad
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            layer.backward(dy_bad)
        assert_unchanged(layer, before)  # dgamma/dbeta not overwritten with NaN
        with pytest.raises(FloatingPointError):
            F.batch_norm_backward(dy_bad, x, *F.batch_stats(x))
    # The cache survives: a clean backward still works.
    assert np.all(np.isfinite(layer.backward(dy)))


CORRUPTIONS = {
    "nan": (lambda s: s.__setitem__("running_var", np.array([1, np.nan, 1], np.float32)), ValueError),
    "inf": (lambda s: s.__setitem__("gamma", np.array([1, np.inf, 1], np.float32)), ValueError),
    "negative-var": (lambda s: s.__setitem__("running_var", np.array([1, -1, 1], np.float32)), ValueError),
    "overflow-f32": (lambda s: s.__setitem__("running_var", np.array([1, 1e300, 1])), ValueError),
    "wrong-shape": (lambda s: s.__setitem__("running_mean", np.zeros(4, np.float32)), ValueError),
    "missing-key": (lambda s: s.pop("running_var"), KeyError),
    "unexpected-key": (lambda s: s.__setitem__("bogus", np.ones(3)), KeyError),
    "strings": (lambda s: s.__setitem__("beta", np.array(["a", "b", "c"])), TypeError),
    "negative-count": (lambda s: s.__setitem__("num_batches_tracked", np.array(-3)), ValueError),
    "float-count": (lambda s: s.__setitem__("num_batches_tracked", np.array(2.5)), ValueError),
    "weight-and-gamma": (lambda s: s.__setitem__("weight", s["gamma"]), KeyError),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_state_dict(corruption):
    rng = np.random.default_rng(14)
    layer = trained_layer(rng)
    donor = trained_layer(rng)
    state = donor.state_dict()
    mutate, error = CORRUPTIONS[corruption]
    mutate(state)
    before = snapshot(layer)
    with pytest.raises(error):
        layer.load_state_dict(state)
    assert_unchanged(layer, before)  # a failed load changes nothing
    with pytest.raises(TypeError):
        layer.load_state_dict([("gamma", 1)])


def test_momentum_none():
    rng = np.random.default_rng(15)
    layer = cbn.BatchNorm(3, momentum=None, dtype=np.float64)
    xs = [data(rng, (8 + 4 * i, 3), np.float64, offset=i, scale=i + 1) for i in range(5)]
    for x in xs:
        layer.forward(x)
    # A cumulative average: the plain mean of the batch means and unbiased variances.
    np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(0) for x in xs], 0), rtol=1e-12)
    np.testing.assert_allclose(
        layer.running_var, np.mean([x.var(0, ddof=1) for x in xs], 0), rtol=1e-12
    )
    assert layer.num_batches_tracked == 5
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    for x in xs:
        ref(torch.from_numpy(x))
    np.testing.assert_allclose(layer.running_mean, ref.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, ref.running_var.numpy(), rtol=1e-12)


def test_empty_batch():
    rng = np.random.default_rng(16)
    layer = trained_layer(rng)
    before = snapshot(layer)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(ValueError, match="empty"):
            layer.forward(np.empty((0, 3), np.float32))
    assert_unchanged(layer, before)


BAD_SETTINGS = [
    # attribute, value, exception, message
    ("eps", -1.0, ValueError, "eps must be a positive finite float"),
    ("eps", True, TypeError, "eps must be a positive float"),
    ("momentum", 5, ValueError, r"momentum must be in \[0, 1\] or None"),
    ("activation", "tanh", ValueError, "activation must be None or 'relu'"),
    ("n_threads", 0, ValueError, "n_threads must be"),
    ("axis", 1.5, TypeError, "axis must be an int"),
    ("num_batches_tracked", -3, ValueError, "num_batches_tracked must be a non-negative"),
    ("training", "no", TypeError, "training mode is expected to be boolean"),
    ("num_features", 4, AttributeError, "num_features is fixed"),
    ("dtype", np.float64, AttributeError, "dtype is fixed"),
    ("affine", False, AttributeError, "affine is fixed"),
    ("track_running_stats", False, AttributeError, "track_running_stats is fixed"),
]


@pytest.mark.parametrize(
    "attribute, value, error, message", BAD_SETTINGS, ids=[f"{a}={getattr(v, '__name__', v)}" for a, v, *_ in BAD_SETTINGS]
)
def test_bad_setting_after_construction(attribute, value, error, message):
    rng = np.random.default_rng(17)
    layer = trained_layer(rng)
    before = snapshot(layer)
    config = layer.config()
    with pytest.raises(error, match=message):
        setattr(layer, attribute, value)
    assert layer.config() == config  # the old value is kept
    assert_unchanged(layer, before)
    # The layer goes on working with its old settings.
    x = data(rng, (8, 3))
    y = layer.forward(x)
    y_ref, _, _ = R.forward_train(x.astype(np.float64), layer.gamma, layer.beta, 1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_short_gradient_assigned():
    rng = np.random.default_rng(18)
    layer = trained_layer(rng)
    grads = layer.grads
    before = snapshot(layer)
    for name in ("dgamma", "dbeta"):
        # A short view used to be kept and then written past by backward.
        short = np.zeros(8, np.float32)[:2]
        with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\), got \(2,\)"):
            setattr(layer, name, short)
    assert_unchanged(layer, before)
    # A valid value is copied into the layer's own arrays, as for gamma and beta,
    # so the dict an optimizer holds (layer.grads) stays live.
    new = rng.standard_normal(3).astype(np.float32)
    layer.dgamma = new
    assert layer.dgamma is grads["gamma"] and layer.dgamma is not new
    assert np.array_equal(layer.dgamma, new)
    x = data(rng, (8, 3))
    layer.forward(x)
    layer.backward(rng.standard_normal(x.shape).astype(np.float32))
    assert layer.dgamma is grads["gamma"] and layer.dbeta is grads["beta"]


def test_parameter_gradients_that_overflow():
    rng = np.random.default_rng(19)
    layer = trained_layer(rng)
    x = data(rng, (8, 3))
    layer.forward(x)
    before = snapshot(layer)
    # Each value is finite in float32; their sum over the batch (~8e38) is not.
    dy = np.float32(1e38) * rng.uniform(0.95, 1.0, x.shape).astype(np.float32)
    with pytest.raises(FloatingPointError, match="dgamma or dbeta is not finite"):
        layer.backward(dy)
    assert_unchanged(layer, before)  # dgamma/dbeta not overwritten with inf
    mean, var = F.batch_stats(x)
    with pytest.raises(FloatingPointError, match="dgamma or dbeta"):
        F.batch_norm_backward(dy, x, mean, var)
    # In float64 the same sums are finite.
    _, dgamma, dbeta = F.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                             mean, var)
    assert np.all(np.isfinite(dgamma)) and np.all(np.isfinite(dbeta))
    # The cache survives: a smaller gradient goes through.
    assert np.all(np.isfinite(layer.backward(dy / np.float32(1e38))))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix is the input
def test_masked_array_and_matrix_input():
    rng = np.random.default_rng(20)
    layer = trained_layer(rng)
    before = snapshot(layer)
    x = data(rng, (8, 3))
    mx = np.ma.masked_array(x, mask=rng.random(x.shape) < 0.3)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(TypeError, match="x is a masked array"):
            layer.forward(mx)
    assert_unchanged(layer, before)
    with pytest.raises(TypeError, match="masked array"):
        F.batch_norm_train(mx)
    layer.train().forward(x)
    before = snapshot(layer)
    with pytest.raises(TypeError, match="dy is a masked array"):
        layer.backward(np.ma.masked_array(x))
    assert_unchanged(layer, before)
    # np.matrix is taken as the plain 2-D array it holds.
    a, b = cbn.BatchNorm(3), cbn.BatchNorm(3)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_m = a.forward(np.matrix(x))
    assert type(y_m) is np.ndarray
    assert y_m.tobytes() == b.forward(x).tobytes()
    assert a.backward(np.matrix(dy)).tobytes() == b.backward(dy).tobytes()
    assert a.running_var.tobytes() == b.running_var.tobytes()


def test_truncated_or_foreign_npz(tmp_path):
    rng = np.random.default_rng(21)
    layer = trained_layer(rng)
    good = tmp_path / "bn.npz"
    layer.save(good)
    raw = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz is not a readable cbn file"):
        cbn.BatchNorm.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "plain.npz", a=np.arange(3.0))
    with pytest.raises(ValueError, match=r"plain\.npz is not a cbn file"):
        cbn.BatchNorm.load(tmp_path / "plain.npz")
    mlp([3, 4, 2], rng=0).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match=r"model\.npz holds a 'cbn\.Sequential'"):
        cbn.BatchNorm.load(tmp_path / "model.npz")
    # The intact file loads the layer's state bit for bit.
    loaded = cbn.BatchNorm.load(good).state_dict()
    for k, v in layer.state_dict().items():
        assert np.asarray(loaded[k]).tobytes() == np.asarray(v).tobytes(), k


def test_settings_changed_before_backward():
    # backward differentiates the forward that ran: its axis, eps and activation
    # are kept with the forward's cache (they used to be read at backward).
    rng = np.random.default_rng(22)
    x = data(rng, (8, 3))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for attribute, value in (("eps", 1.0), ("activation", "relu"), ("axis", -1)):
        layer = trained_layer(rng)
        twin = cbn.BatchNorm.from_config(layer.config(), layer.state_dict())
        layer.forward(x)
        twin.forward(x)
        setattr(layer, attribute, value)
        assert layer.backward(dy).tobytes() == twin.backward(dy).tobytes(), attribute
        assert layer.dgamma.tobytes() == twin.dgamma.tobytes(), attribute


def test_huge_thread_count():
    # Up to MAX_THREADS is accepted; a pass starts at most max(processors, 8)
    # threads (fewer on small arrays), so libgomp is never asked for 100000
    # threads (it failed to create them: exit or segfault, as PyTorch does).
    rng = np.random.default_rng(23)
    x = data(rng, (4096, 64))
    one = cbn.BatchNorm(64, n_threads=1)
    many = cbn.BatchNorm(64, n_threads=cbn._kernels.MAX_THREADS)
    assert one.forward(x).tobytes() == many.forward(x).tobytes()
    dy = rng.standard_normal(x.shape).astype(np.float32)
    assert one.backward(dy).tobytes() == many.backward(dy).tobytes()
    with pytest.raises(ValueError, match="n_threads must be at most"):
        cbn.BatchNorm(64, n_threads=cbn._kernels.MAX_THREADS + 1)


def test_many_channels_float64():
    # Channel groups of more than 2048 channels overflowed a stack array of the
    # statistics (a segfault in the optimised build).
    rng = np.random.default_rng(24)
    x = data(rng, (2, 32768, 7, 7), np.float64)
    y, mean, var = F.batch_norm_train(x)
    want_y, want_mean, want_var = R.forward_train(x, np.ones(32768), np.zeros(32768), 1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(var, want_var, rtol=1e-12)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-10)


def test_gamma_or_beta_inside_out():
    # gamma and beta may live in the out= buffer: every path reads them before
    # writing y (the channel groups used to read later groups' after writing).
    rng = np.random.default_rng(25)
    x = data(rng, (32, 64, 56, 56), np.float64)
    gamma = rng.uniform(0.5, 1.5, 64)
    beta = rng.uniform(-0.5, 0.5, 64)
    want, _, _ = F.batch_norm_train(x, gamma, beta)
    out = np.empty_like(x)
    g = out.reshape(-1)[:64]
    b = out.reshape(-1)[64:128]
    g[...] = gamma
    b[...] = beta
    y, _, _ = F.batch_norm_train(x, g, b, out=out)
    assert y is out
    assert out.tobytes() == want.tobytes()


_FORK_SCRIPT = r"""
import os, sys, warnings
import numpy as np
import cbn
from cbn import _kernels
from cbn import functional as F

warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
rng = np.random.default_rng(int(sys.argv[1]))
x = rng.standard_normal((16, 8, 32, 32)) * rng.uniform(0.5, 2, (1, 8, 1, 1))
gamma, beta = rng.standard_normal(8), rng.standard_normal(8)
parent_threads = int(sys.argv[2])
y0 = F.batch_norm_train(x, gamma, beta, axis=1, n_threads=parent_threads)[0]
before = _kernels.max_threads()
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the child: a pass on two threads, and one on all of them
    y2 = F.batch_norm_train(x, gamma, beta, axis=1, n_threads=2)[0]
    y_all = F.batch_norm_train(x, gamma, beta, axis=1, n_threads=-1)[0]
    same = y2.tobytes() == y0.tobytes() and y_all.tobytes() == y0.tobytes()
    os.write(w, f"{int(same)} {_kernels.max_threads()} {cbn.build_info()['max_threads']}".encode())
    os._exit(0)
os.close(w)
report = os.read(r, 100).decode()
os.waitpid(pid, 0)
print(int(_kernels.teams_started()), before, report)
"""


@pytest.mark.parametrize("parent_threads", [2, 1])
def test_fork_after_a_parallel_pass(tmp_path, parent_threads):
    """GNU OpenMP's pool does not survive fork: a child that starts a parallel
    region after its parent did hung forever (multiprocessing forks by default
    on Linux before Python 3.14). Such a child now runs on one thread, with the
    parent's bits; a child whose parent never ran a team keeps its threads."""
    import os
    import signal
    import subprocess
    import sys

    if not cbn.build_info()["openmp"]:
        pytest.skip("built without OpenMP")
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    seed = int(np.random.default_rng().integers(2**31))
    # Its own process group, so that a hung grandchild is killed with it.
    proc = subprocess.Popen(
        [sys.executable, "-c", _FORK_SCRIPT, str(seed), str(parent_threads)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the forked child hung in its parallel pass")
    assert proc.returncode == 0, stderr
    started, before, same, child_max, child_info = map(int, stdout.split())
    assert same == 1, "the forked child's result differs from the parent's"
    if parent_threads > 1:
        assert started == 1
        assert child_max == child_info == 1
    else:
        assert started == 0
        assert child_max == child_info == before
