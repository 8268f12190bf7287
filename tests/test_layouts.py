"""Batches whose values fill one block in another order of the axes (a Fortran-
ordered matrix, an NCHW view of channels-last memory: PyTorch's channels_last)
are normalized where they lie, without a copy, and the results come back laid
out as the input (NumPy's order "K"). Checked against the float64 reference, by
finite differences, and bit for bit against the same memory seen channels-last.
"""

import numpy as np
import pytest
from test_functional import (  # pythonpath: tests
    assert_close,
    kink_free_beta,
    laid_out_as_input,
    make_batch,
    seed_of,
)

import cbn
from cbn import functional as F
from cbn import reference as ref
from cbn.testing import numerical_grad

DTYPES = (np.float32, np.float64)
EPS = 1e-5


def in_order(a, order):
    """A copy of ``a``'s values whose memory runs over the axes in ``order``
    (slowest first), seen with ``a``'s shape."""
    inverse = np.argsort(order)
    return np.ascontiguousarray(a.transpose(order)).transpose(inverse)


def random_order(rng, ndim):
    """A random order of the axes that is not C order (so the batch is not C-contiguous)."""
    while True:
        order = tuple(int(i) for i in rng.permutation(ndim))
        if order != tuple(range(ndim)):
            return order


def random_case(rng, dtype):
    rank = int(rng.integers(2, 6))
    axis = int(rng.integers(-rank, rank))
    shape = tuple(int(d) for d in rng.integers(2, 6, size=rank))
    return shape, axis, random_order(rng, rank)


def test_memory_order_names_the_axes_slowest_first():
    a = np.zeros((2, 3, 4, 5))
    assert F.memory_order(a) == (0, 1, 2, 3)
    assert F.memory_order(np.asfortranarray(a)) == (3, 2, 1, 0)
    nhwc = np.zeros((2, 4, 5, 3))
    assert F.memory_order(nhwc.transpose(0, 3, 1, 2)) == (0, 2, 3, 1)
    assert F.memory_order(a[:, ::2]) is None  # gaps
    assert F.memory_order(a[:, ::-1]) is None  # a reversed axis
    assert F.memory_order(np.broadcast_to(np.zeros(3), (4, 3))) is None  # a repeated block
    # Axes of length one have no place in memory; any order that fills the block will do.
    one = np.zeros((4, 1, 3)).transpose(2, 1, 0)
    order = F.memory_order(one)
    assert order is not None and one.transpose(order).flags.c_contiguous


@pytest.mark.parametrize("stride", [-8, 0, 8 * 10**6])
def test_an_axis_of_length_one_may_have_any_stride(stride):
    """NumPy lets an axis of length one have any stride; it takes no room, and
    the results are those of the same values without it, laid out alike."""
    rng = np.random.default_rng(seed_of("length-one", stride))
    x, gamma, beta = make_batch(rng, (6, 3, 1, 5), 1, np.float64)
    xf = np.asfortranarray(x)
    odd = np.lib.stride_tricks.as_strided(xf, strides=xf.strides[:2] + (stride,) + xf.strides[3:])
    assert np.array_equal(odd, x) and F.memory_order(odd) is not None
    want = F.batch_norm_train(x[:, :, 0], gamma, beta)
    got = F.batch_norm_train(odd, gamma, beta)
    assert_close(got[0][:, :, 0], want[0], np.float64)
    assert got[0].flags.f_contiguous and not np.shares_memory(got[0], odd)
    dy = rng.normal(size=x.shape)
    dx = F.batch_norm_backward(dy, odd, *got[1:], gamma, beta)[0]
    assert_close(dx[:, :, 0], F.batch_norm_backward(dy[:, :, 0], x[:, :, 0], *want[1:], gamma,
                                                    beta)[0], np.float64, k=256)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_any_order_of_the_axes_matches_the_reference_without_a_copy(dtype, seed):
    rng = np.random.default_rng(seed_of("order", dtype.__name__, seed))
    shape, axis, order = random_case(rng, dtype)
    x, gamma, beta = make_batch(rng, shape, axis, dtype)
    dy = rng.normal(size=shape).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    xo, dyo = in_order(x, order), in_order(dy, order)
    assert F.memory_order(xo) is not None and not xo.flags.c_contiguous

    y, mean, var = F.batch_norm_train(xo, gamma, beta, axis=axis)
    assert laid_out_as_input(y, xo) and y.strides == xo.strides
    assert_close(y, ref.forward_train(x64, g64, b64, EPS, axis=axis)[0], dtype)
    want_mean, want_var = ref.batch_stats(x64, axis=axis)
    assert_close(mean, want_mean, np.float64, k=256)
    assert_close(var, want_var, np.float64, k=256)
    stats = F.batch_stats(xo, axis=axis)
    assert np.array_equal(stats[0], mean) and np.array_equal(stats[1], var)

    rmean = want_mean + rng.normal(size=mean.size)
    rvar = want_var * rng.uniform(0.5, 2, size=mean.size)
    ye = F.batch_norm_eval(xo, rmean, rvar, gamma, beta, axis=axis, activation="relu")
    assert ye.strides == xo.strides
    assert_close(ye, ref.forward_eval(x64, rmean, rvar, g64, b64, EPS, axis=axis, relu=True),
                 dtype)

    # dy laid out as x, or in C order (copied into x's order): the same bits
    want = ref.backward_train(dy64, x64, g64, b64, EPS, axis=axis)
    got = F.batch_norm_backward(dyo, xo, mean, var, gamma, beta, axis=axis)
    got_c = F.batch_norm_backward(dy, xo, mean, var, gamma, beta, axis=axis)
    assert got[0].strides == xo.strides and got_c[0].strides == xo.strides
    for a, b, w in zip(got, got_c, want):
        assert a.tobytes() == b.tobytes()
        assert_close(a, w, dtype, k=256)

    # The layer keeps the batch itself (no copy) and differentiates it.
    layer = cbn.BatchNorm(shape[axis], axis=axis, dtype=dtype)
    layer.gamma, layer.beta = gamma, beta
    yl = layer(xo)
    assert layer._cache[0] is xo and yl.tobytes() == y.tobytes()
    dx = layer.backward(dy)
    assert dx.strides == xo.strides and dx.tobytes() == got[0].tobytes()
    assert layer.dgamma.tobytes() == got[1].tobytes()
    assert_close(layer.running_mean, 0.1 * want_mean, dtype, k=256)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_nchw_view_of_channels_last_memory_is_the_channels_last_pass(dtype):
    """The same memory, normalized as (N, C, H, W) along axis 1 or as (N, H, W, C)
    along -1, is the same pass over it: the same bits, with no copy either way."""
    rng = np.random.default_rng(seed_of("nhwc", dtype.__name__))
    nhwc, gamma, beta = make_batch(rng, (6, 5, 7, 16), -1, dtype)
    dy_nhwc = rng.normal(size=nhwc.shape).astype(dtype)
    nchw, dy_nchw = nhwc.transpose(0, 3, 1, 2), dy_nhwc.transpose(0, 3, 1, 2)
    for n_threads in (1, 2, 3):
        a = cbn.BatchNorm(16, axis=-1, dtype=dtype, n_threads=n_threads)
        b = cbn.BatchNorm(16, axis=1, dtype=dtype, n_threads=n_threads)
        for layer in (a, b):
            layer.gamma, layer.beta = gamma, beta
        ya, yb = a(nhwc), b(nchw)
        assert yb.strides == nchw.strides
        assert ya.tobytes() == yb.transpose(0, 2, 3, 1).tobytes()
        dxa, dxb = a.backward(dy_nhwc), b.backward(dy_nchw)
        assert dxa.tobytes() == dxb.transpose(0, 2, 3, 1).tobytes()
        for name in ("running_mean", "running_var", "dgamma", "dbeta"):
            assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_counts_give_the_same_bits_in_any_order(dtype):
    rng = np.random.default_rng(seed_of("threads-order", dtype.__name__))
    x, gamma, beta = make_batch(rng, (24, 40, 9, 11), 1, dtype)
    xo = in_order(x, (2, 1, 3, 0))
    dy = in_order(rng.normal(size=x.shape).astype(dtype), (2, 1, 3, 0))
    results = []
    for n_threads in (1, 2, 3):
        y, mean, var = F.batch_norm_train(xo, gamma, beta, n_threads=n_threads)
        dx, dgamma, dbeta = F.batch_norm_backward(dy, xo, mean, var, gamma, beta,
                                                  n_threads=n_threads)
        results.append(b"".join(a.tobytes() for a in (y, mean, var, dx, dgamma, dbeta)))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_decides_the_order_the_pass_runs_in(dtype):
    """out= laid out in another order than x: x is copied into out's order (and
    left as it was); any block order is fine for out, gaps are not."""
    rng = np.random.default_rng(seed_of("out-order", dtype.__name__))
    x, gamma, beta = make_batch(rng, (5, 6, 7), 1, dtype)
    x64 = x.astype(np.float64)
    want = ref.forward_train(x64, gamma.astype(np.float64), beta.astype(np.float64), EPS)[0]
    for x_order, out_order in (((0, 1, 2), (2, 1, 0)), ((2, 0, 1), (0, 1, 2)),
                               ((1, 2, 0), (2, 0, 1))):
        xo = in_order(x, x_order)
        before = xo.copy()
        out = in_order(np.zeros_like(x), out_order)
        y = F.batch_norm_train(xo, gamma, beta, out=out)[0]
        assert y is out and np.array_equal(xo, before)
        assert_close(out, want, dtype)
        mean, var = F.batch_stats(xo)
        dy = rng.normal(size=x.shape).astype(dtype)
        dx_out = in_order(np.zeros_like(x), out_order)
        dx = F.batch_norm_backward(dy, xo, mean, var, gamma, beta, out=dx_out)[0]
        assert dx is dx_out
        assert_close(dx, F.batch_norm_backward(dy, x, mean, var, gamma, beta)[0], dtype, k=256)
    with pytest.raises(ValueError, match="laid out in memory as x is"):
        F.batch_norm_train(x, out=np.zeros((5, 6, 14), dtype)[..., ::2])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("order", [(1, 0, 2), (2, 1, 0), (0, 2, 1)])
def test_gradients_in_another_order_match_finite_differences(order, activation, training):
    rng = np.random.default_rng(seed_of("fd-order", order, activation, training))
    x, gamma, beta = make_batch(rng, (4, 3, 5), 1, np.float64)
    x = in_order(x, order)
    w = in_order(rng.normal(size=x.shape), order)
    mean, var = ref.batch_stats(x)
    if not training:
        mean, var = mean + rng.normal(size=3) * 0.3, rng.uniform(0.5, 3, size=3)
    if activation:  # a kink between values of each channel, clear of them all
        beta, margin = kink_free_beta(x, mean, var, gamma, 1, rng)
        assert margin > 1e-3, "test data too close to the ReLU kink"

    def loss():
        if training:
            y = F.batch_norm_train(x, gamma, beta, activation=activation)[0]
        else:
            y = F.batch_norm_eval(x, mean, var, gamma, beta, activation=activation)
        return float(np.sum(w * y))

    if training:
        mean, var = F.batch_norm_train(x, gamma, beta, activation=activation)[1:]
    dx, dgamma, dbeta = F.batch_norm_backward(w, x, mean, var, gamma, beta,
                                              training=training, activation=activation)
    assert dx.strides == x.strides
    for name, analytic, arr in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
        np.testing.assert_allclose(analytic, numerical_grad(loss, arr), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_bad_values_in_another_order_raise_and_keep_the_layer():
    rng = np.random.default_rng(seed_of("bad-order"))
    x, _, _ = make_batch(rng, (6, 4, 5, 5), 1, np.float32)
    layer = cbn.BatchNorm(4)
    layer(in_order(x, (0, 2, 3, 1)))
    state = [a.copy() for a in (layer.running_mean, layer.running_var, layer.gamma)]
    bad = in_order(x, (0, 2, 3, 1))
    bad[2, 1, 3, 0] = np.nan
    with pytest.raises(FloatingPointError, match="channel 1"):
        layer(bad)
    for before, after in zip(state, (layer.running_mean, layer.running_var, layer.gamma)):
        assert before.tobytes() == after.tobytes()
    dy = in_order(rng.normal(size=x.shape).astype(np.float32), (0, 2, 3, 1))
    dy[0, 0, 0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="dy"):
        layer.backward(dy)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(in_order(x[:1, :, :1, :1], (0, 2, 3, 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_the_direct_and_checked_paths_split_a_block_alike(dtype, seed):
    """Arguments the kernels take as they are run without Python's checks; a list
    for gamma sends the same batch through the checked path: the same bits."""
    rng = np.random.default_rng(seed_of("paths-order", dtype.__name__, seed))
    shape, axis, order = random_case(rng, dtype)
    shape = tuple(1 if rng.random() < 0.2 else d for d in shape)  # some axes of length one
    if np.prod(shape) // shape[axis] < 2:
        shape = tuple(d + 1 for d in shape)
    x, gamma, beta = make_batch(rng, shape, axis, dtype)
    xo = in_order(x, order)
    dyo = in_order(rng.normal(size=shape).astype(dtype), order)
    direct = F.batch_norm_train(xo, gamma, beta, axis=axis)
    checked = F.batch_norm_train(xo, gamma.tolist(), beta, axis=axis)
    assert direct[0].strides == checked[0].strides
    for a, b in zip(direct, checked):
        assert a.tobytes() == b.tobytes()
    mean, var = direct[1:]
    direct = F.batch_norm_backward(dyo, xo, mean, var, gamma, beta, axis=axis)
    checked = F.batch_norm_backward(dyo, xo, mean, var, gamma.tolist(), beta, axis=axis)
    for a, b in zip(direct, checked):
        assert a.strides == b.strides and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_channel_with_out_in_another_order_of_its_length_one_axis(dtype):
    """One channel: its axis takes no room, so x and out= may lie alike yet name
    different memory orders. dy, out and x are split alike (found by a session-27
    audit: backward raised 'arrays of shape (1, 1, 3200) and (3200, 1, 1) do not
    match'), and the checked path gives the fast path's bits."""
    rng = np.random.default_rng(seed_of("one-channel-out", dtype.__name__))
    x = np.asfortranarray(rng.standard_normal((64, 1, 50)).astype(dtype))
    dy = rng.standard_normal((64, 1, 50)).astype(dtype)  # C order: the checked path
    dy_f = np.asfortranarray(dy)                           # x's layout: the fast path
    out = np.empty((50, 64, 1), dtype).transpose(1, 2, 0)
    assert F.memory_order(out) != F.memory_order(x)
    fast = F.batch_norm_train(x, np.ones(1, dtype), axis=1)
    checked = F.batch_norm_train(x, [1.0], axis=1, out=out)
    assert checked[0] is out
    for a, b in zip(fast, checked):
        assert a.tobytes() == b.tobytes() if a.ndim == 1 else np.array_equal(a, b)
    mean, var = fast[1:]
    want = F.batch_norm_backward(dy_f, x, mean, var, axis=1)
    for dy_in in (dy, dy_f):
        out = np.empty((50, 64, 1), dtype).transpose(1, 2, 0)
        got = F.batch_norm_backward(dy_in, x, mean, var, [1.0], axis=1, out=out)
        assert got[0] is out
        assert np.array_equal(got[0], want[0])
        assert got[1].tobytes() == want[1].tobytes() and got[2].tobytes() == want[2].tobytes()


def test_a_list_takes_the_order_of_out():
    rng = np.random.default_rng(seed_of("list-out"))
    x = rng.standard_normal((6, 4, 3))
    out = np.empty(x.shape, order="F")
    y = F.batch_norm_train(x.tolist(), out=out)[0]
    assert y is out
    assert_close(y, F.batch_norm_train(x)[0], np.float64)


def test_in_place_out_may_differ_from_x_on_an_axis_of_length_one():
    """The same memory, element for element, is in place, whatever strides the
    axes of length one carry: both paths agree."""
    b = np.asfortranarray(np.random.default_rng(seed_of("in-place-one")).random((6, 5)))
    want = F.batch_norm_eval(b[:, None, :].copy(), np.zeros(1), np.ones(1), axis=1)
    for gamma in (None, [1.0]):  # the fast path, then the checked one
        c = b.copy(order="F")
        x, out = c[:, None, :], c.reshape(6, 1, 5, order="F")
        assert x.strides != out.strides and np.shares_memory(x, out)
        y = F.batch_norm_eval(x, np.zeros(1), np.ones(1), gamma, axis=1, out=out)
        assert y is out and np.array_equal(y, want)
