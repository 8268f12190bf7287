"""Rows of 8, 16, ..., 64 channels: the register-resident row reductions.

(N, C) and channels-last inputs with C a multiple of 8 up to 64 take their own
kernels for the batch statistics and the backward sums; these tests hold them
to the float64 oracle, with offsets that make a naive variance fail, with the
fused ReLU mask, across reduction-block boundaries and thread counts, and next
to C values that take the general path.
"""

import numpy as np
import pytest

from cbn import functional as F
from cbn import reference as R
from cbn.testing import numerical_grad

NARROW = [8, 16, 24, 32, 40, 48, 56, 64]
# Just outside: the general row path.
GENERAL = [7, 9, 63, 65, 72]


def _clear_kink(dy, x, mean, var, gamma, beta, dtype):
    """dy with 0 where the pre-activation is within rounding of 0.

    There the ReLU mask is undecidable: the kernel decides it in the data's
    dtype, the oracle in float64, and either answer is right. The kernel's z
    rounds x, the mean and the slope a = gamma/sqrt(var + eps) to the dtype, so
    its error grows with (|x| + |mean|) * |a|: a channel of tiny variance has a
    large slope (float32, two rows: z off by 1e-4, the mask flipped, dx 123).
    """
    z = R.forward_eval(x.astype(np.float64), mean, var, gamma.astype(np.float64),
                       beta.astype(np.float64), 1e-5, 1)
    slope = np.abs(gamma.astype(np.float64)) / np.sqrt(var + 1e-5)
    tol = 64 * np.finfo(dtype).eps * (np.abs(z) + np.abs(beta) + 1
                                      + (np.abs(x) + np.abs(mean)) * slope)
    return np.where(np.abs(z) <= tol, 0, dy).astype(dtype)


def _check_backward(dy, x, mean, var, gamma, beta, relu, training):
    """cbn's backward against the float64 oracle, off the ReLU kink."""
    dtype = x.dtype
    n = x.shape[0]
    act = "relu" if relu else None
    if relu:
        dy = _clear_kink(dy, x, mean, var, gamma, beta, dtype)
    dx, dgamma, dbeta = F.batch_norm_backward(
        dy, x, mean, var, gamma, beta, activation=act, training=training
    )
    ref = R._backward(
        dy.astype(np.float64), x.astype(np.float64), mean, var, gamma.astype(np.float64),
        beta.astype(np.float64), 1e-5, 1, relu, training,
    )
    tol = 2e-4 if dtype == np.float32 else 1e-10
    scale = np.abs(ref[0]).max() + 1
    np.testing.assert_allclose(dx, ref[0], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(dbeta, ref[2], rtol=tol, atol=tol * np.sqrt(n))
    np.testing.assert_allclose(dgamma, ref[1], rtol=tol, atol=tol * np.sqrt(n))


def _data(rng, n, c, dtype, offset):
    scale = rng.uniform(0.5, 3.0, c)
    x = offset * rng.uniform(0.5, 2.0, c) + scale * rng.standard_normal((n, c))
    return x.astype(dtype)


@pytest.mark.parametrize("c", NARROW + GENERAL)
@pytest.mark.parametrize("n", [2, 3, 255, 257, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stats_match_oracle(c, n, dtype):
    rng = np.random.default_rng()
    offset = 100.0 if dtype == np.float32 else 1e6
    x = _data(rng, n, c, dtype, offset)
    mean, var = F.batch_stats(x)
    ref_mean, ref_var = R.exact_batch_stats(x.astype(np.float64))
    std = np.sqrt(ref_var)
    assert np.all(np.abs(mean - ref_mean) <= 1e-12 * np.abs(ref_mean) + 1e-9 * std)
    # Variance: relative to itself, plus the square of the mean's rounding (up to
    # (eps * mean / 2)**2): two values that differ by < 1e-5 at 1e6 (about 1e-6 of
    # channels of a batch of two) give a variance of < 1e-11 with a relative error > 1e-9.
    e = np.finfo(np.float64).eps
    assert np.all(np.abs(var - ref_var) <= 1e-9 * ref_var + 4 * (e * ref_mean) ** 2)


@pytest.mark.parametrize("c", NARROW + GENERAL)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_oracle(c, relu, dtype, training):
    rng = np.random.default_rng()
    n = int(rng.integers(2, 700))
    x = _data(rng, n, c, dtype, 3.0)
    dy = rng.standard_normal((n, c)).astype(dtype)
    gamma = rng.uniform(-2, 2, c).astype(dtype)
    beta = rng.uniform(-1, 1, c).astype(dtype)
    act = "relu" if relu else None
    _, mean, var = F.batch_norm_train(x, gamma, beta, activation=act)
    _check_backward(dy, x, mean, var, gamma, beta, relu, training)


@pytest.mark.parametrize("c", [8, 40, 64])
def test_gradient_check(c):
    """Central differences of a scalar loss through the training forward pass."""
    rng = np.random.default_rng()
    n = 5
    w = rng.standard_normal((n, c))
    gamma = rng.uniform(0.5, 2, c)
    beta = rng.uniform(-1, 1, c)
    # Fresh x until no pre-activation is within reach of the ReLU kink for a
    # step of 1e-6 (the finite difference would straddle it).
    for _ in range(1000):
        x = rng.standard_normal((n, c)) * 2 + 1
        y, mean, var = F.batch_norm_train(x, gamma, beta)
        if np.min(np.abs(y)) > 1e-4:
            break

    def loss():
        y, _, _ = F.batch_norm_train(x, gamma, beta, activation="relu")
        return float(np.sum(w * y))

    assert np.min(np.abs(y)) > 1e-4, "no draw kept clear of the ReLU kink"
    dx, _, _ = F.batch_norm_backward(w, x, mean, var, gamma, beta, activation="relu")
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c", [16, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_across_threads(c, dtype):
    rng = np.random.default_rng()
    x = _data(rng, 3000, c, dtype, 5.0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for threads in (1, 2, 3):
        y, mean, var = F.batch_norm_train(x, activation="relu", n_threads=threads)
        dx, dg, db = F.batch_norm_backward(dy, x, mean, var, activation="relu", n_threads=threads)
        results.append((y, mean, var, dx, dg, db))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("c", [8, 32, 64])
def test_channels_last_images(c):
    """NHWC input with a narrow channel count reduces through the same kernels."""
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 5, 7, c)) * 2 - 1
    mean, var = F.batch_stats(x, axis=-1)
    ref_mean, ref_var = R.exact_batch_stats(x, axis=-1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-12)


def test_nonfinite_value_reaches_the_caller():
    rng = np.random.default_rng()
    x = rng.standard_normal((300, 64))
    x[200, 37] = np.inf
    with pytest.raises(FloatingPointError, match="channel"):
        F.batch_norm_train(x)
    x[200, 37] = 1.0
    dy = rng.standard_normal(x.shape)
    dy[5, 63] = np.nan
    _, mean, var = F.batch_norm_train(x)
    with pytest.raises(FloatingPointError):
        F.batch_norm_backward(dy, x, mean, var)


# Wide rows: the backward sums fold four rows (q apart) per update from 1024
# channels on, in chunks of one cache line plus a tail; the statistics of rows
# up to a page long fold four rows q apart, longer ones four adjacent rows.
WIDE = [511, 700, 1023, 1024, 1030, 2047, 2048, 2049, 4100]


@pytest.mark.parametrize("c", WIDE)
@pytest.mark.parametrize("n", [2, 3, 5, 258])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_wide_rows_match_oracle(c, n, dtype, relu):
    rng = np.random.default_rng()
    x = _data(rng, n, c, dtype, 2.0)
    dy = rng.standard_normal((n, c)).astype(dtype)
    gamma = rng.uniform(-2, 2, c).astype(dtype)
    beta = rng.uniform(-1, 1, c).astype(dtype)
    act = "relu" if relu else None
    y, mean, var = F.batch_norm_train(x, gamma, beta, activation=act)
    x64 = x.astype(np.float64)
    ref_mean, ref_var = R.exact_batch_stats(x64)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=1e-10, atol=1e-12)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    y_ref = R.forward_eval(x64, mean, var, gamma.astype(np.float64), beta.astype(np.float64),
                           1e-5, 1, relu)
    # The kernel subtracts the mean rounded to x's dtype. With two values close
    # together the slope |gamma|/sqrt(var + eps) reaches ~600 (see the test below),
    # and that rounding alone moves y by up to ulp(mean) * slope: 2.7e-4 was seen
    # on a float32 batch of two, past a fixed atol of 2e-4.
    slope = np.abs(gamma.astype(np.float64)) / np.sqrt(var + 1e-5)
    rounding = 2 * np.finfo(dtype).eps * np.abs(mean) * slope
    err = np.abs(y.astype(np.float64) - y_ref)
    assert np.all(err <= tol * np.abs(y_ref) + tol * 10 + rounding), float(err.max())
    ye = F.batch_norm_eval(x, mean, var, gamma, beta, activation=act)
    np.testing.assert_array_equal(ye, y)
    for training in (True, False):
        _check_backward(dy, x, mean, var, gamma, beta, relu, training)


def test_backward_check_allows_for_a_large_slope_at_the_kink():
    """Two float32 values one ulp apart: variance ~1e-14, slope ~600, and the
    kernel's z off by ~1e-4 from the mean rounded to float32. _clear_kink must
    leave such pre-activations out (with 64 ulps of |z| + |beta| + 1 alone, 29 of
    these 61 betas flipped the mask and failed)."""
    x1 = np.float32(5.9582105)
    x = np.array([[x1, 1.0], [np.nextafter(x1, np.float32(10)), 2.0]], np.float32)
    gamma = np.array([2.0, 1.0], np.float32)
    mean, var = F.batch_stats(x)
    xhat0 = (float(x[0, 0]) - mean[0]) / np.sqrt(var[0] + 1e-5)
    for t in np.linspace(-3e-4, 3e-4, 61):
        beta = np.array([-gamma[0] * xhat0 + t, 0.1], np.float32)
        _check_backward(np.ones((2, 2), np.float32), x, mean, var, gamma, beta, True, True)
