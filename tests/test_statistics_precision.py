"""Batch statistics where the shifted sums used to fail silently.

Each block's sums are taken around a shift; the shift used to be the block's
first value, which (1) let s1*s1 overflow for spreads of 1e152 and more, the
result being clamped to a variance of 0, and (2) cost precision in proportion to
(first value - mean)^2 / variance, up to the block's length, when the first
value was an outlier. The reference here is long double.
"""

import numpy as np
import pytest

import cbn
from cbn import functional as F


def reference_var(x, axes):
    xl = x.astype(np.longdouble)
    mean = xl.mean(axes)
    return mean, ((xl - xl.mean(axes, keepdims=True)) ** 2).mean(axes)


@pytest.mark.parametrize("shape", [(100, 1), (37, 5), (3, 2, 40), (2, 1, 20000)])
def test_huge_spread_in_float64_is_not_clamped_to_zero(shape):
    rng = np.random.default_rng()
    x = np.zeros(shape)
    # Values whose deviations' sum squared overflows (it did for about 1e152 x
    # 100 values), while the sum of squares, n * var, stays below 1e306.
    big = min(1e152, np.sqrt(1e306 / x.size * shape[1]))
    x[0] = rng.uniform(1.0, 2.0, shape[1:]) * big
    x[1:] += rng.standard_normal(x[1:].shape)
    axes = (0,) + tuple(range(2, x.ndim))
    y, mean, var = F.batch_norm_train(x)
    _, want = reference_var(x, axes)
    np.testing.assert_allclose(var, want.astype(np.float64), rtol=1e-12)
    assert np.isfinite(y).all()
    layer = cbn.BatchNorm(shape[1], dtype=np.float64)
    layer(x)
    assert np.all(layer.running_var > 1e300)


@pytest.mark.parametrize("layout", ["runs", "long_run", "rows"])
def test_an_outlier_first_value_costs_no_precision(layout):
    rng = np.random.default_rng()
    if layout == "runs":  # images of 1000 + N(0, 1) with a zero corner pixel
        x = 1000 + rng.standard_normal((2, 3, 64, 64))
        x[:, :, 0, 0] = 0.0
    elif layout == "long_run":  # one run of 200000 values: once a single block
        x = 1e-3 * rng.standard_normal((1, 2, 200000))
        x[0, :, 0] = 1000.0
    else:
        x = 1000 + rng.standard_normal((int(rng.integers(200, 3000)), int(rng.integers(1, 50))))
        x[0] = 0.0
    axes = (0,) + tuple(range(2, x.ndim))
    y, mean, var = F.batch_norm_train(x)
    want_mean, want_var = reference_var(x, axes)
    # Rows keep the first row as their blocks' shift: a block has at most 256
    # rows, which bounds the loss (a few roundings of 256 * eps = 5.7e-14; measured
    # up to 1.2e-12, past 1e-12 in 2e-5 of runs); runs are shifted by an estimate
    # of the mean and lose nothing measurable.
    rtol = 2e-12 if layout == "rows" else 2e-14
    np.testing.assert_allclose(var, want_var.astype(np.float64), rtol=rtol)
    np.testing.assert_allclose(mean, want_mean.astype(np.float64), rtol=1e-15, atol=1e-15)
    xl = x.astype(np.longdouble)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    ref = (xl - want_mean.reshape(shape)) / np.sqrt(want_var.reshape(shape) + 1e-5)
    assert float(np.abs(y - ref).max()) < 1e-12 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [0.01, -3e-3, 7.0, 1e4])
def test_constant_channel_gives_exactly_beta(dtype, value):
    rng = np.random.default_rng()
    C = 4
    x = (rng.standard_normal((64, C)) * 0.1).astype(dtype)
    x[:, 2] = dtype(value)
    beta = rng.standard_normal(C).astype(dtype)
    gamma = rng.uniform(0.5, 2, C).astype(dtype)
    y = F.batch_norm_train(x, gamma, beta)[0]
    assert np.all(y[:, 2] == beta[2])


# Every reduction layout, with several blocks (and runs longer than RUN_SHIFT_ITEMS,
# summed in pieces) to merge: rows (narrow and wide), NCHW runs, small maps taken
# as columns, and a channels-last batch.
FAR_LAYOUTS = [((4096, 16), 1), ((700, 300), 1), ((64, 8, 32, 32), 1), ((3, 5, 20000), 1),
               ((64, 40, 3, 3), 1), ((8, 6, 6, 24), -1)]


def far_reference(x, axes):
    """reference_var around each channel's first value: subtracting it is exact
    in long double, whose own sums of values near 1e12 lose more than cbn's."""
    xl = x.astype(np.longdouble)
    first = xl[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
    d = xl - first
    mean = d.mean(axes, keepdims=True)
    var = ((d - mean) ** 2).mean(axes)
    return (mean + first).reshape(var.shape), var


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", FAR_LAYOUTS)
@pytest.mark.parametrize("offset", [1e4, 1e7, 1e12])
def test_a_mean_far_from_zero_costs_no_precision(shape, axis, offset, dtype):
    # Block means were merged as rounded doubles: the differences between blocks
    # carried an ulp of the mean, and the variance of float64 data of mean 1e7
    # and std 1 was off by up to 7e-10 relative (1e12: 1e-5). PyTorch's two-pass
    # statistics give 1e-16. Means now merge as hi + lo. The tolerance allows for
    # the rounding of sums of up to 60000 values (6e-14 seen in float32 runs).
    rng = np.random.default_rng()
    scale = rng.uniform(0.5, 2.0) * (1 if dtype == np.float64 else offset * 1e-3)
    x = (offset * rng.uniform(0.5, 2.0) + scale * rng.standard_normal(shape)).astype(dtype)
    axis_ = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis_)
    want_mean, want_var = far_reference(x, axes)
    for threads in (1, 2):
        mean, var = F.batch_stats(x, axis=axis, n_threads=threads)
        np.testing.assert_allclose(var, want_var.astype(np.float64), rtol=2e-13)
        np.testing.assert_allclose(mean, want_mean.astype(np.float64), rtol=1e-15)
        _, m2, v2 = F.batch_norm_train(x, axis=axis, n_threads=threads)
        assert m2.tobytes() == mean.tobytes() and v2.tobytes() == var.tobytes()


def test_a_mean_far_from_zero_costs_no_precision_in_channel_groups():
    # The channel-group path (float64 NCHW whose output streams) merges the same way.
    from cbn import _kernels as K

    rng = np.random.default_rng()
    x = 1e9 + rng.standard_normal((3, 20, 10000))
    want_mean, want_var = far_reference(x, (0, 2))
    C = x.shape[1]
    for stream in (False, True):
        y, m, v = np.empty_like(x), np.empty(C), np.empty(C)
        assert K.forward_train(x, y, np.ones(C), np.zeros(C), 1e-5, m, v, False, 2,
                               stream) == K.OK
        np.testing.assert_allclose(v, want_var.astype(np.float64), rtol=2e-13)
        np.testing.assert_allclose(m, want_mean.astype(np.float64), rtol=1e-15)
