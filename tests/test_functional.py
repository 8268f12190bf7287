"""Tests of ``cbn.functional``: the validated entry points over the kernels.

What this layer adds over the kernels is what is tested here: any channel
axis, any rank >= 2, any memory layout (Fortran order, strided slices,
negative strides, read-only arrays), ``out=`` buffers written in place, and
errors raised at the boundary with messages that name the argument. The
gradients are checked against central finite differences in float64.
"""

import zlib

import numpy as np
import pytest

from cbn import functional as F
from cbn import reference as ref
from cbn.testing import numerical_grad

DTYPES = [np.float64, np.float32]
LAYOUTS = ["C", "F", "slice", "negative", "readonly"]
EPS = 1e-5


def seed_of(*parts):
    """A deterministic per-test seed (hash() of strings changes between runs)."""
    return zlib.crc32(repr(parts).encode())


def laid_out_as_input(result, x):
    """Whether ``result`` is laid out as cbn lays out its results for an input
    ``x``: as x (order "K") if x's values fill one block, in C order, Fortran
    order or any other order of the axes, else in C order. Axes of length one
    have no place in memory, so their strides do not count."""
    x = np.asarray(x)
    if F.memory_order(x) is None:
        return result.flags.c_contiguous
    return all(rs // result.itemsize == xs // x.itemsize
               for rs, xs, n in zip(result.strides, x.strides, x.shape) if n > 1)


def in_layout(x, layout):
    """The values of ``x`` in the named memory layout (a fresh array; x is untouched)."""
    if layout == "C":
        return x.copy()
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "slice":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    if layout == "negative":
        return np.flip(np.flip(x).copy())
    if layout == "readonly":
        out = x.copy()
        out.setflags(write=False)
        return out
    raise AssertionError(layout)


def middle_axis(rank):
    """A channel axis that is neither 1 nor -1 (for rank 2 and 3, the leading axis)."""
    return {2: 0, 3: 0, 4: 2, 5: -3}[rank]


def random_shape(rng, rank, axis, channels):
    shape = [int(d) for d in rng.integers(2, 5, size=rank)]
    shape[axis] = channels
    return tuple(shape)


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(v, shape)


def make_batch(rng, shape, axis, dtype):
    """A batch with per-channel offsets and scales, gamma with mixed signs, and beta."""
    C = shape[axis]
    loc = per_channel(rng.uniform(-3, 3, C), len(shape), axis)
    scale = per_channel(rng.uniform(0.5, 2, C), len(shape), axis)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 2.0, C)).astype(dtype)
    beta = rng.normal(size=C).astype(dtype)
    return x, gamma, beta


def assert_close(got, want, dtype, k=64):
    """Within k rounding errors of the dtype, relative to the largest value."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = np.abs(want).max() + 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=k * np.finfo(dtype).eps * scale)


# ---------------------------------------------------------------------------
# Parity with the reference over axes, ranks, dtypes and layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_kind", ["1", "-1", "middle"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_functional_matches_reference(rank, axis_kind, dtype, layout):
    axis = {"1": 1, "-1": -1, "middle": middle_axis(rank)}[axis_kind]
    rng = np.random.default_rng(seed_of(rank, axis_kind, dtype.__name__, layout))
    shape = random_shape(rng, rank, axis, int(rng.integers(1, 6)))
    x, gamma, beta = make_batch(rng, shape, axis, dtype)
    dy = rng.normal(size=shape).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    xl, dyl = in_layout(x, layout), in_layout(dy, layout)
    x_before = xl.copy()

    mean, var = F.batch_stats(xl, axis=axis)
    want_mean, want_var = ref.batch_stats(x64, axis=axis)
    assert mean.dtype == var.dtype == np.float64
    assert_close(mean, want_mean, np.float64, k=256)
    assert_close(var, want_var, np.float64, k=256)

    y, mean, var = F.batch_norm_train(xl, gamma, beta, axis=axis)
    assert y.dtype == dtype and y.shape == shape and laid_out_as_input(y, xl)
    assert_close(y, ref.forward_train(x64, g64, b64, EPS, axis=axis)[0], dtype)
    assert_close(var, want_var, np.float64, k=256)

    rmean = want_mean + rng.normal(size=mean.size)
    rvar = want_var * rng.uniform(0.5, 2, size=mean.size)
    ye = F.batch_norm_eval(xl, rmean, rvar, gamma, beta, axis=axis)
    assert_close(ye, ref.forward_eval(x64, rmean, rvar, g64, b64, EPS, axis=axis), dtype)

    dx, dgamma, dbeta = F.batch_norm_backward(dyl, xl, mean, var, gamma, beta, axis=axis)
    want = ref.backward_train(dy64, x64, g64, b64, EPS, axis=axis)
    assert laid_out_as_input(dx, xl)
    for got, w in zip((dx, dgamma, dbeta), want):
        assert got.dtype == dtype
        assert_close(got, w, dtype, k=256)
    dx, dgamma, dbeta = F.batch_norm_backward(dyl, xl, rmean, rvar, gamma, beta, axis=axis,
                                              training=False)
    want = ref.backward_eval(dy64, x64, rmean, rvar, g64, b64, EPS, axis=axis)
    for got, w in zip((dx, dgamma, dbeta), want):
        assert_close(got, w, dtype, k=256)
    # The input is never written (it may be read-only, or the caller's data).
    assert np.array_equal(xl, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_default_gamma_beta_and_relu(dtype, seed):
    """gamma=None/beta=None mean 1/0; activation='relu' is max(y, 0) and masks dy."""
    rng = np.random.default_rng(seed)
    shape = (6, 4, 5)
    x, gamma, beta = make_batch(rng, shape, 1, dtype)
    x64 = x.astype(np.float64)
    y, mean, var = F.batch_norm_train(x)
    assert_close(y, ref.forward_train(x64, np.ones(4), np.zeros(4), EPS)[0], dtype)
    y2, _, _ = F.batch_norm_train(x, np.ones(4), np.zeros(4))
    assert np.array_equal(y, y2)
    beta, margin = kink_free_beta(x64, mean, var, gamma.astype(np.float64), 1, rng)
    assert margin > 1e-3
    beta = beta.astype(dtype)
    yr, _, _ = F.batch_norm_train(x, gamma, beta, activation="relu")
    want = ref.forward_train(x64, gamma.astype(np.float64), beta.astype(np.float64), EPS,
                             relu=True)[0]
    assert_close(yr, want, dtype)
    dy = rng.normal(size=shape).astype(dtype)
    got = F.batch_norm_backward(dy, x, mean, var, gamma, beta, activation="relu")
    want = ref.backward_train(dy.astype(np.float64), x64, gamma.astype(np.float64),
                              beta.astype(np.float64), EPS, relu=True)
    for g, w in zip(got, want):
        assert_close(g, w, dtype, k=256)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_counts_give_the_same_bits(dtype):
    """n_threads=None, 1, 2, 3 and -1 all give bit-identical results."""
    rng = np.random.default_rng(3)
    x, gamma, beta = make_batch(rng, (70, 5, 300), 1, dtype)  # > PARALLEL_MIN_SIZE values
    dy = rng.normal(size=x.shape).astype(dtype)
    results = []
    for n in (None, 1, 2, 3, -1):
        y, mean, var = F.batch_norm_train(x, gamma, beta, n_threads=n)
        grads = F.batch_norm_backward(dy, x, mean, var, gamma, beta, n_threads=n)
        results.append((y, mean, var) + grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# out= buffers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffers_are_written_in_place(dtype):
    rng = np.random.default_rng(21)
    x, gamma, beta = make_batch(rng, (5, 3, 4), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y_want, mean, var = F.batch_norm_train(x, gamma, beta)

    out = np.empty_like(x)
    y, _, _ = F.batch_norm_train(x, gamma, beta, out=out)
    assert y is out and np.shares_memory(y, out)
    assert np.array_equal(out, y_want)

    out = np.empty_like(x)
    ye = F.batch_norm_eval(x, mean, var, gamma, beta, out=out)
    assert ye is out and np.array_equal(out, F.batch_norm_eval(x, mean, var, gamma, beta))

    dx_want = F.batch_norm_backward(dy, x, mean, var, gamma, beta)[0]
    out = np.empty_like(x)
    dx, _, _ = F.batch_norm_backward(dy, x, mean, var, gamma, beta, out=out)
    assert dx is out and np.shares_memory(dx, out)
    assert np.array_equal(out, dx_want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_may_be_the_input_itself(dtype):
    """Same array in place: forward over x, backward over dy (and over x)."""
    rng = np.random.default_rng(22)
    x, gamma, beta = make_batch(rng, (5, 3, 4), 1, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y_want, mean, var = F.batch_norm_train(x, gamma, beta)
    dx_want = F.batch_norm_backward(dy, x, mean, var, gamma, beta)[0]
    ye_want = F.batch_norm_eval(x, mean, var, gamma, beta)

    xi = x.copy()
    y, mi, vi = F.batch_norm_train(xi, gamma, beta, out=xi)
    assert y is xi and np.array_equal(xi, y_want)
    assert np.array_equal(mi, mean) and np.array_equal(vi, var)

    xi = x.copy()
    assert F.batch_norm_eval(xi, mean, var, gamma, beta, out=xi) is xi
    assert np.array_equal(xi, ye_want)

    dyi = dy.copy()
    dx, _, _ = F.batch_norm_backward(dyi, x, mean, var, gamma, beta, out=dyi)
    assert dx is dyi and np.array_equal(dyi, dx_want)


def test_out_overlapping_an_input_shifted_is_rejected():
    rng = np.random.default_rng(23)
    buf = rng.normal(size=61)
    x = buf[:60].reshape(5, 3, 4)
    out = buf[1:].reshape(5, 3, 4)
    with pytest.raises(ValueError, match="overlaps"):
        F.batch_norm_train(x, out=out)
    with pytest.raises(ValueError, match="overlaps"):
        F.batch_norm_eval(x, np.zeros(3), np.ones(3), out=out)
    dbuf = rng.normal(size=61)
    dy = dbuf[1:].reshape(5, 3, 4)
    xx = rng.normal(size=(5, 3, 4))
    mean, var = F.batch_stats(xx)
    with pytest.raises(ValueError, match="overlaps"):
        F.batch_norm_backward(dy, xx, mean, var, out=dbuf[:60].reshape(5, 3, 4))


def test_bad_out_buffers_are_rejected():
    x = np.random.default_rng(24).normal(size=(4, 3))
    with pytest.raises(TypeError, match="out"):
        F.batch_norm_train(x, out=[[0.0] * 3] * 4)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\)"):
        F.batch_norm_train(x, out=np.empty((3, 4)))
    with pytest.raises(ValueError, match="float32"):
        F.batch_norm_train(x, out=np.empty((4, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous or laid out in memory as x is"):
        F.batch_norm_train(x, out=np.empty((4, 6))[:, ::2])
    ro = np.empty((4, 3))
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        F.batch_norm_train(x, out=ro)


# ---------------------------------------------------------------------------
# Gradients by central finite differences (float64)
# ---------------------------------------------------------------------------


def kink_free_beta(x64, mean, var, gamma, axis, rng):
    """Per-channel beta that keeps every ReLU pre-activation away from 0.

    The threshold in x_hat units (-beta/gamma) goes in the middle of the
    widest gap between the channel's x_hat values, or beyond all of them.
    Returns beta and the smallest |pre-activation|.
    """
    ndim = x64.ndim
    xhat = (x64 - per_channel(mean, ndim, axis)) / np.sqrt(per_channel(var, ndim, axis) + EPS)
    xhat_c = np.moveaxis(xhat, axis, 0).reshape(xhat.shape[axis], -1)
    beta = np.empty(len(gamma))
    for c, v in enumerate(xhat_c):
        v = np.unique(v)
        choice = rng.integers(0, 3)
        if choice == 0 or v.size < 2:
            t = v[0] - 0.5 if rng.integers(0, 2) else v[-1] + 0.5
        else:
            i = int(np.argmax(np.diff(v)))
            t = 0.5 * (v[i] + v[i + 1])
        beta[c] = -gamma[c] * t
    z = per_channel(gamma, ndim, axis) * xhat + per_channel(beta, ndim, axis)
    return beta, float(np.min(np.abs(z)))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape, axis", [((5, 3), 1), ((4, 3, 2), 1), ((2, 2, 3, 3), -1), ((3, 2, 2, 1, 2), 2)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_finite_differences(shape, axis, training, activation, seed):
    rng = np.random.default_rng(seed_of(shape, axis, training, activation, seed))
    x, gamma, beta = make_batch(rng, shape, axis, np.float64)
    C = shape[axis]
    w = rng.normal(size=shape)  # loss = sum(w * y), so dL/dy = w
    if training:
        mean, var = ref.batch_stats(x, axis=axis)
    else:
        mean = ref.batch_stats(x, axis=axis)[0] + rng.normal(size=C) * 0.3
        var = rng.uniform(0.5, 3, size=C)
    if activation:
        beta, margin = kink_free_beta(x, mean, var, gamma, axis, rng)
        assert margin > 1e-3, "test data too close to the ReLU kink"

    def loss():
        if training:
            y = F.batch_norm_train(x, gamma, beta, axis=axis, activation=activation)[0]
        else:
            y = F.batch_norm_eval(x, mean, var, gamma, beta, axis=axis, activation=activation)
        return float(np.sum(w * y))

    if training:
        _, mean, var = F.batch_norm_train(x, gamma, beta, axis=axis, activation=activation)
    dx, dgamma, dbeta = F.batch_norm_backward(w, x, mean, var, gamma, beta, axis=axis,
                                              training=training, activation=activation)
    for name, analytic, arr in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
        numeric = numerical_grad(loss, arr)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------
# update_running_stats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_running_stats_matches_reference(dtype):
    rng = np.random.default_rng(31)
    x = rng.normal(size=(8, 4, 3)) * 2 + 1
    mean, var = F.batch_stats(x)
    rm = rng.normal(size=4).astype(dtype)
    rv = rng.uniform(0.5, 2, 4).astype(dtype)
    want = ref.ema_update(rm.astype(np.float64), rv.astype(np.float64), mean, var, 24, 0.3)
    F.update_running_stats(rm, rv, mean, var, 24, 0.3)
    assert_close(rm, want[0], dtype, k=4)
    assert_close(rv, want[1], dtype, k=4)


def test_update_running_stats_rejects_bad_arguments():
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match="count"):
        F.update_running_stats(rm, rv, np.zeros(2), np.ones(2), 1, 0.1)
    with pytest.raises(ValueError, match="factor"):
        F.update_running_stats(rm, rv, np.zeros(2), np.ones(2), 5, 1.5)
    with pytest.raises(ValueError, match="factor"):
        F.update_running_stats(rm, rv, np.zeros(2), np.ones(2), 5, float("nan"))
    rm32, rv32 = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(FloatingPointError, match="float32"):
        F.update_running_stats(rm32, rv32, np.zeros(2), np.array([1.0, 1e40]), 5, 0.5)
    assert np.all(rm32 == 0) and np.all(rv32 == 1)


# ---------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------

X = np.random.default_rng(99).normal(size=(4, 3, 2))
DY = np.random.default_rng(98).normal(size=(4, 3, 2))
M3, V3 = np.zeros(3), np.ones(3)

BAD_CALLS = [
    # (call, exception, message fragment)
    (lambda: F.batch_norm_train(X.astype(np.int64)), TypeError, "dtype int64"),
    (lambda: F.batch_norm_train(X.astype(np.float16)), TypeError, "float16"),
    (lambda: F.batch_norm_train(np.ones(5)), ValueError, "at least 2 dimensions"),
    (lambda: F.batch_norm_train(X, axis=3), ValueError, "axis=3"),
    (lambda: F.batch_norm_train(X, axis="1"), TypeError, "axis"),
    (lambda: F.batch_norm_train(X, np.ones(4)), ValueError, r"gamma must have shape \(3,\)"),
    (lambda: F.batch_norm_train(X, None, np.ones((3, 1))), ValueError, "beta"),
    (lambda: F.batch_norm_train(X, ["a", "b", "c"]), TypeError, "gamma"),
    (lambda: F.batch_norm_train(X, eps=0), ValueError, "eps"),
    (lambda: F.batch_norm_train(X, eps=float("nan")), ValueError, "eps"),
    (lambda: F.batch_norm_train(X, eps="small"), TypeError, "eps"),
    (lambda: F.batch_norm_train(X, activation="tanh"), ValueError, "activation"),
    (lambda: F.batch_norm_train(X, n_threads=0), ValueError, "n_threads"),
    (lambda: F.batch_norm_train(X, n_threads=2**40), ValueError, "n_threads must be at most"),
    (lambda: F.batch_norm_eval(X, M3, V3, n_threads=2**21), ValueError, "n_threads"),
    (lambda: F.batch_norm_backward(DY, X, M3, V3, n_threads=2**63), ValueError, "n_threads"),
    (lambda: F.batch_norm_train(X, n_threads=1.5), TypeError, "n_threads"),
    (lambda: F.batch_norm_train(X[:1, :, :1]), ValueError, "more than 1 value per channel"),
    (lambda: F.batch_norm_train(np.ones((1, 3))), ValueError, "more than 1 value per channel"),
    (lambda: F.batch_norm_train(np.ones((0, 3))), ValueError, "empty"),
    (lambda: F.batch_stats(np.ones((2, 0, 3))), ValueError, "empty"),
    (lambda: F.batch_norm_eval(X, np.zeros(2), V3), ValueError, "mean"),
    (lambda: F.batch_norm_eval(X, M3, -V3), ValueError, "var"),
    (lambda: F.batch_norm_backward(DY[:3], X, M3, V3), ValueError, "dy must have the shape"),
    (lambda: F.batch_norm_backward(DY.astype(np.float32), X, M3, V3), TypeError, "dy"),
    (lambda: F.batch_norm_backward(DY, X[:1, :, :1], M3, V3), ValueError, "dy"),
    (lambda: F.batch_norm_backward(DY[:1, :, :1], X[:1, :, :1], M3, V3), ValueError,
     "more than 1 value per channel"),
    (lambda: F.batch_norm_backward(DY, X, M3, V3, activation="gelu"), ValueError, "activation"),
]


@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_arguments_raise_clear_errors(case):
    call, exc, fragment = BAD_CALLS[case]
    with pytest.raises(exc, match=fragment):
        call()


def test_eval_with_a_single_sample_is_fine():
    x = np.random.default_rng(5).normal(size=(1, 3))
    y = F.batch_norm_eval(x, np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 0.5]))
    assert_close(y, (x - [0.1, 0.2, 0.3]) / np.sqrt(np.array([1.0, 2.0, 0.5]) + EPS), np.float64)
    dx, _, _ = F.batch_norm_backward(np.ones((1, 3)), x, [0.1, 0.2, 0.3], [1.0, 2.0, 0.5],
                                     training=False)
    assert_close(dx, 1 / np.sqrt(np.array([[1.0, 2.0, 0.5]]) + EPS), np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_values_raise_floating_point_error(dtype, bad):
    rng = np.random.default_rng(6)
    x, gamma, beta = make_batch(rng, (5, 3, 2), 1, dtype)
    xb = x.copy()
    xb[2, 1, 0] = bad
    with pytest.raises(FloatingPointError, match="channel 1"):
        F.batch_norm_train(xb)
    mean, var = F.batch_stats(x)
    with pytest.raises(FloatingPointError):
        F.batch_norm_eval(xb, mean, var)
    for name in ("mean", "gamma", "beta"):
        args = {"mean": mean.copy(), "gamma": gamma.copy(), "beta": beta.copy()}
        args[name][0] = bad
        with pytest.raises(FloatingPointError, match=name):
            F.batch_norm_eval(x, args["mean"], var, args["gamma"], args["beta"])
    with pytest.raises(FloatingPointError, match="gamma"):
        gb = gamma.copy()
        gb[1] = bad
        F.batch_norm_train(x, gb, beta)
    dyb = rng.normal(size=x.shape).astype(dtype)
    dyb[0, 0, 1] = bad
    for training in (True, False):
        with pytest.raises(FloatingPointError, match="dy"):
            F.batch_norm_backward(dyb, x, mean, var, gamma, beta, training=training)


def test_eval_with_infinite_variance_raises():
    """batch_norm_eval documents FloatingPointError for non-finite statistics.

    var = inf makes invstd 0, so every output is beta: finite, but meaningless.
    """
    x = np.random.default_rng(8).normal(size=(4, 2))
    with pytest.raises(FloatingPointError, match="var"):
        F.batch_norm_eval(x, np.zeros(2), np.array([1.0, np.inf]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negative", [-1.0, -0.5 * EPS])
def test_negative_variance_is_refused_and_nothing_is_written(dtype, negative):
    """A var in (-eps, 0) would pass sqrt(var + eps): the kernel must refuse it too."""
    rng = np.random.default_rng()
    C = int(rng.integers(2, 40))
    x, gamma, beta = make_batch(rng, (int(rng.integers(2, 9)), C), 1, dtype)
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    bad = int(rng.integers(C))
    var[bad] = negative
    y = x.copy()
    with pytest.raises(ValueError, match=rf"var must be non-negative.*channel {bad}\)"):
        F.batch_norm_eval(y, mean, var, gamma, beta, out=y)
    assert np.array_equal(y, x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = dy.copy()
    for training in (True, False):
        with pytest.raises(ValueError, match="var must be non-negative"):
            F.batch_norm_backward(dx, x, mean, var, gamma, beta, training=training, out=dx)
        assert np.array_equal(dx, dy)


def test_float64_batch_whose_variance_overflows_raises():
    """Values ~1e200 have a variance beyond float64: an error, not var = 0.

    (Reproduction: F.batch_norm_train(np.array([[0.0], [1e200], [2e200]]))
    returned var == [0.] and y of magnitude 3e202.)
    """
    x = np.array([[0.0, 1.0], [1e200, 2.0], [2e200, 4.0]])
    with pytest.raises(FloatingPointError, match="channel 0"):
        F.batch_norm_train(x)


def test_update_running_stats_refuses_unaligned_arrays():
    raw = np.zeros(3 * 4 + 1, dtype=np.uint8)
    odd = raw[1:].view(np.float32)
    assert not odd.flags.aligned
    good = np.ones(3, np.float32)
    rng = np.random.default_rng()
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    with pytest.raises(ValueError, match="running_mean is not aligned"):
        F.update_running_stats(odd, good, mean, var, 10, 0.1)
    with pytest.raises(ValueError, match="running_var is not aligned"):
        F.update_running_stats(good.copy(), odd, mean, var, 10, 0.1)
    assert np.all(raw == 0)


@pytest.mark.parametrize("relu", [False, True])
def test_backward_keeps_precision_when_the_slope_would_underflow(relu):
    """Rows normally fold kx*invstd into one slope per channel (one coefficient
    row fewer to stream). With x spread ~1e20 and dy ~1e-23 that slope, about
    |dy|/std ~ 1e-43, is subnormal in float32 with only a few significant bits,
    though dx itself (scaled by gamma ~1e15) is an ordinary number: the kernel
    must then keep kx and invstd apart. A kernel that always folds misses this
    reference by about 1%."""
    rng = np.random.default_rng(seed_of("tiny-slope", relu))
    x64 = rng.standard_normal((96, 40)) * 1e20 + rng.uniform(-1e20, 1e20, 40)
    dy64 = rng.standard_normal((96, 40)) * 1e-23
    g64 = rng.uniform(0.5, 2.0, 40) * 1e15
    b64 = rng.uniform(-0.5, 0.5, 40) * 1e15
    x, dy, gamma, beta = (a.astype(np.float32) for a in (x64, dy64, g64, b64))
    activation = "relu" if relu else None
    _, mean, var = F.batch_norm_train(x, gamma, beta, activation=activation)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, mean, var, gamma, beta,
                                              activation=activation)
    want = ref.backward_train(dy.astype(np.float64), x.astype(np.float64),
                              gamma.astype(np.float64), beta.astype(np.float64), relu=relu)[0]
    scale = np.abs(want).max(axis=0)
    assert np.all(np.abs(dx - want) <= 1e-4 * scale), np.abs((dx - want) / scale).max()
