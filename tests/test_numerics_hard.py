"""Accuracy of the training forward and backward on legitimate but hard inputs.

test_statistics_precision.py checks the batch statistics alone (huge spreads,
outliers, far means); test_kernels.py and test_torch_parity.py use ordinary
data. Here the outputs users see are checked against a long double oracle
(each channel shifted by its first value, which is exact, so offsets cost the
oracle nothing): ``y``, the returned ``mean`` and ``var``, ``dx``, ``dgamma``,
``dbeta`` and the running statistics, for float32 and float64, (N, C), NCHW
and channels-last batches, one and two threads, on inputs where a careless
kernel loses everything:

* a common offset far above the spread (mean/std 1e3 to 1e7 in float32, to
  1e12 in float64), where ``E[x^2] - E[x]^2`` cancels away the variance;
* 2**24 values per channel, where a float32 running sum stops growing;
* variances far below and far above eps, eps of 1e-12 and 1, subnormal
  values, channels of very different scales in one tensor, float32 values
  whose squares overflow float32, exactly constant channels;
* an incoming gradient almost in the span of 1 and x_hat, so that dx is a
  small residual of cancelling terms.

The bounds are what the design guarantees: a few units of the output dtype at
the output's own scale, plus, for ``y``, the one error the forward keeps (the
float64 mean it is given, at most half an ulp of |mean|, times |gamma|/std:
the forward's coefficient row b takes back the rounding of the mean to the
dtype in row m, as backward's k0 does), and for float64 ``dx`` the same
rounding of the float64 mean. Running
sums in float32 (sequential or pairwise), ``E[x^2] - E[x]^2`` in float32 or in
float64, and a backward without the k0 correction each fail dozens of these
tests; the mean and variance bounds are in units of float64 whatever the input
dtype, as cbn returns them. Also here: dx against central differences, cbn
against PyTorch on an offset batch, and float32 values of both signs near the
maximum, where x - mean overflows float32 though y and dx do not: cbn raises
FloatingPointError saying so (PyTorch returns inf), and float64 computes them.
"""

import zlib

import numpy as np
import pytest

import cbn
from cbn import functional as F

LD = np.longdouble
EPS64 = np.finfo(np.float64).eps
LAYOUTS = {  # name: (shape, channel axis)
    "NC": ((1536, 3), 1),
    "NCHW": ((6, 3, 16, 16), 1),
    "NHWC": ((6, 16, 16, 3), -1),
}
SEEDS = [0, 1]


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def rows(a, axis):
    """(C, m): one row of values per channel."""
    a = np.moveaxis(np.asarray(a), axis % np.ndim(a), 0)
    return a.reshape(a.shape[0], -1)


def oracle(x, dy, gamma, beta, eps, axis):
    """Long double y, mean, var, invstd, dx, dgamma, dbeta, as (C, m) rows and (C,) vectors."""
    r = rows(x, axis).astype(LD)
    first = r[:, :1]
    d = r - first  # exact: float32/float64 values of one channel, in long double
    md = d.mean(axis=1, keepdims=True)
    dev = d - md
    var = (dev * dev).mean(axis=1)
    invstd = 1 / np.sqrt(var + LD(eps))
    xhat = dev * invstd[:, None]
    g = np.asarray(gamma, LD)
    y = g[:, None] * xhat + np.asarray(beta, LD)[:, None]
    gr = rows(dy, axis).astype(LD)
    m = r.shape[1]
    dbeta = gr.sum(axis=1)
    dgamma = (gr * xhat).sum(axis=1)
    dx = (g * invstd)[:, None] * (gr - dbeta[:, None] / m - xhat * dgamma[:, None] / m)
    return {"y": y, "mean": (md + first)[:, 0], "var": var, "invstd": invstd, "xhat": xhat,
            "dx": dx, "dgamma": dgamma, "dbeta": dbeta, "g": gr}


def assert_within(got, want, bound, what):
    got = np.asarray(got, LD)
    over = np.where(np.isfinite(got), np.abs(got - want) - bound, LD(np.inf))
    if not np.all(over <= 0):
        i = np.unravel_index(int(np.argmax(over)), over.shape)
        pytest.fail(f"{what}: at {i} got {float(got[i])!r}, want {float(want[i])!r}, "
                    f"allowed error {float(np.broadcast_to(bound, over.shape)[i]):.3g}")


def check_train_and_backward(x, dy, gamma, beta, eps, axis, threads=(1, 2), k_var=64):
    """Run cbn's training forward and backward and compare everything with the oracle.

    k_var: ulps of double allowed on the variance (at most 7 measured on these
    shapes; rows of 2**24 values reach about 500, see that test).
    """
    dtype = x.dtype
    e = np.finfo(dtype).eps
    ref = oracle(x, dy, gamma, beta, eps, axis)
    a = np.abs(np.asarray(gamma, LD)) * ref["invstd"]            # |gamma| / sqrt(var + eps)
    mean_abs = np.abs(ref["mean"])
    y_scale = np.abs(ref["y"]).max(axis=1)
    xhat_max = np.abs(ref["xhat"]).max(axis=1)
    dy_max = np.abs(ref["g"]).max(axis=1)
    # y: a few ulps at the output's scale, plus the float64 mean's own rounding
    # (half an ulp of |mean|), times |a|. (Before b took back the mean's rounding
    # to the dtype, float32's y was off by up to e * |mean| * |a|: 1e4 ulps at an
    # offset of 1e5 std.)
    y_bound = 4 * e * y_scale + 2 * EPS64 * mean_abs * a
    # dx: a few ulps of its terms (|a| max|dy| (1 + |x_hat|)), plus, in float64, the
    # returned mean's own rounding (half an ulp of |mean|), which moves x_hat.
    dx_bound = a * dy_max * (1 + xhat_max) * (2 * e + 2 * EPS64 * mean_abs * ref["invstd"])
    l1_g = np.abs(ref["g"]).sum(axis=1)
    l1_gx = (np.abs(ref["g"]) * np.abs(ref["xhat"])).sum(axis=1)
    results = []
    for n_threads in threads:
        y, mean, var = F.batch_norm_train(x, gamma, beta, axis=axis, eps=eps, n_threads=n_threads)
        dx, dgamma, dbeta = F.batch_norm_backward(dy, x, mean, var, gamma, beta, axis=axis,
                                                  eps=eps, n_threads=n_threads)
        assert y.dtype == dx.dtype == dtype
        where = f"{dtype.name} threads={n_threads}"
        # The mean is float64 whatever the input: within an ulp or two of its
        # magnitude or of the spread, whichever is larger.
        assert_within(mean, ref["mean"], 4 * EPS64 * (mean_abs + np.sqrt(ref["var"])) + 1e-300,
                      f"mean ({where})")
        # (+ the least subnormal double: a variance of 1e-620 is 0 in float64)
        assert_within(var, ref["var"], k_var * EPS64 * ref["var"] + LD(5e-324), f"var ({where})")
        assert_within(rows(y, axis), ref["y"], y_bound[:, None], f"y ({where})")
        assert_within(rows(dx, axis), ref["dx"], dx_bound[:, None], f"dx ({where})")
        assert_within(dbeta, ref["dbeta"], 2 * e * np.abs(ref["dbeta"]) + 64 * EPS64 * l1_g,
                      f"dbeta ({where})")
        # dgamma = sum(dy * x_hat) also carries the returned mean's rounding (float64).
        assert_within(dgamma, ref["dgamma"],
                      2 * e * np.abs(ref["dgamma"]) + 64 * EPS64 * l1_gx
                      + 2 * EPS64 * mean_abs * ref["invstd"] * np.abs(ref["dbeta"]),
                      f"dgamma ({where})")
        results.append((y, mean, var, dx, dgamma, dbeta))
    for other in results[1:]:  # the thread count changes no bit
        for u, v in zip(results[0], other):
            assert u.tobytes() == v.tobytes()
    return results[0]


def hard_batch(kind, dtype, shape, axis, rng):
    """x, gamma, beta, eps of one kind of hard input (see the module docstring)."""
    C = shape[axis]
    ps = [1] * len(shape)
    ps[axis] = C

    def per_channel(lo, hi):
        return rng.uniform(lo, hi, C).reshape(ps)

    z = rng.standard_normal(shape)
    sign = rng.choice([-1.0, 1.0], C).reshape(ps)
    eps = 1e-5
    if kind.startswith("offset"):  # mean/std = 10**k
        std = per_channel(0.5, 2.0)
        x = sign * float(kind[6:]) * std * per_channel(0.7, 1.4) + std * z
    elif kind == "var_far_below_eps":  # var 1e-10 against eps 1e-5
        x = per_channel(-1, 1) + 1e-5 * z
    elif kind == "var_far_above_eps":  # var 1e8
        x = 1e4 * (per_channel(-1, 1) + z)
    elif kind == "subnormal":
        x = (1e-40 if dtype == np.float32 else 1e-310) * (per_channel(-1, 1) + z)
    elif kind == "squares_overflow":  # float32: x**2 ~ 1e76; float64: spread 1e150
        x = (1e37 if dtype == np.float32 else 1e149) * (sign * per_channel(10, 30) + z)
    elif kind == "mixed_scales":  # std 1e-4 .. 1e6 and offsets of 1e-4 .. 1e3 std
        scale = 10.0 ** rng.uniform(-4, 6, C).reshape(ps)
        x = scale * (sign * 10.0 ** rng.uniform(-4, 3, C).reshape(ps) + z)
    elif kind == "eps_tiny":
        x, eps = per_channel(-1, 1) + 1e-3 * z, 1e-12
    elif kind == "eps_one":
        x, eps = per_channel(-1, 1) + 3 * z, 1.0
    else:
        raise ValueError(kind)
    x = np.asarray(x, dtype)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 2.0, C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, gamma, beta, eps


KINDS = {
    np.float32: ["offset1e3", "offset1e5", "offset1e7", "var_far_below_eps", "var_far_above_eps",
                 "subnormal", "squares_overflow", "mixed_scales", "eps_tiny", "eps_one"],
    np.float64: ["offset1e3", "offset1e7", "offset1e12", "var_far_below_eps", "var_far_above_eps",
                 "subnormal", "squares_overflow", "mixed_scales", "eps_tiny", "eps_one"],
}
CASES = [(d, k) for d in KINDS for k in KINDS[d]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, kind", CASES,
                         ids=[f"{np.dtype(d).name}-{k}" for d, k in CASES])
def test_hard_inputs_forward_and_backward_match_the_oracle(dtype, kind, layout, seed):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed_of(dtype.__name__, kind, layout, seed))
    x, gamma, beta, eps = hard_batch(kind, dtype, shape, axis, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        check_train_and_backward(x, dy, gamma, beta, eps, axis)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, offset", [(np.float32, 1e3), (np.float32, 1e5),
                                           (np.float64, 1e3), (np.float64, 1e8)])
def test_dx_is_accurate_when_its_terms_cancel(dtype, offset, layout, seed):
    # dy = 3 + 5 x_hat + noise: dy - mean(dy) - x_hat mean(dy x_hat) keeps only the
    # noise, 1e-4 of the terms. dx is built from x_hat = (x - m)*invstd with m the
    # mean rounded to the dtype, so its k0 must correct for m: without it, float32
    # dx here is 40 times the bound at a mean of 1e3. PyTorch is off by 3e2 (NCHW)
    # to 4e6 ((N, C), channels-last) ulps of |a| max|dy| on these batches.
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed_of("cancel", dtype.__name__, offset, layout, seed))
    x, gamma, beta, eps = hard_batch("offset1e0", dtype, shape, axis, rng)
    x = (x + np.asarray(offset * rng.uniform(0.5, 2.0), dtype)).astype(dtype)
    xhat = oracle(x, x, gamma, beta, eps, axis)["xhat"].astype(np.float64)
    xhat = np.moveaxis(xhat.reshape(np.moveaxis(x, axis, 0).shape), 0, axis)
    dy = (3.0 + 5.0 * xhat + 1e-3 * rng.standard_normal(shape)).astype(dtype)
    check_train_and_backward(x, dy, gamma, beta, eps, axis)


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_two_to_the_24_values_per_channel_in_float32(layout):
    # A float32 running sum of values near 3 stops at 2**24 after 5.6 million of
    # them: its mean comes out 1.0 instead of 3. The oracle here is float64 around
    # each channel's first value (exact for float32 data; a pairwise float64 sum
    # is far below float32's resolution).
    n = 1 << 24
    shape, axis = {"NC": ((n // 2, 2), 1), "NCHW": ((8, 1, 1024, 2048), 1),
                   "NHWC": ((8, 1024, 2048, 1), -1)}[layout]
    rng = np.random.default_rng(seed_of("2**24", layout))
    C = shape[axis]
    ps = [1] * len(shape)
    ps[axis] = C
    x = (3.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    x += rng.uniform(0, 1000, C).astype(np.float32).reshape(ps)  # a mean of up to 1e3 std
    dy = rng.standard_normal(shape, dtype=np.float32)
    gamma = np.linspace(0.5, 2.0, C, dtype=np.float32)
    beta = np.linspace(-1.0, 1.0, C, dtype=np.float32)

    r = np.ascontiguousarray(rows(x, axis), dtype=np.float64)
    d = r - r[:, :1]
    md = d.mean(axis=1)
    d -= md[:, None]
    var = np.einsum("ij,ij->i", d, d) / r.shape[1]
    mean = md + r[:, 0]
    invstd = 1 / np.sqrt(var + 1e-5)
    xhat = np.multiply(d, invstd[:, None], out=d)
    del r
    g = np.ascontiguousarray(rows(dy, axis), dtype=np.float64)
    sum_g, sum_gx = g.sum(axis=1), np.einsum("ij,ij->i", g, xhat)
    e = np.finfo(np.float32).eps
    a = np.abs(gamma) * invstd

    y, got_mean, got_var = F.batch_norm_train(x, gamma, beta, axis=axis, n_threads=1)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-14)
    np.testing.assert_allclose(got_var, var, rtol=1e-11)
    want = gamma[:, None] * xhat + beta[:, None]
    err = np.abs(rows(y, axis) - want).max(axis=1)
    assert np.all(err <= 8 * e * np.abs(want).max(axis=1) + e * np.abs(mean) * a), err
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, got_mean, got_var, gamma, beta, axis=axis)
    n = g.shape[1]
    want = (gamma * invstd)[:, None] * (g - sum_g[:, None] / n - xhat * (sum_gx / n)[:, None])
    err = np.abs(rows(dx, axis) - want).max(axis=1)
    assert np.all(err <= 2 * e * a * np.abs(g).max(axis=1) * (1 + np.abs(xhat).max(axis=1))), err
    np.testing.assert_allclose(dbeta, sum_g, rtol=2 * e, atol=1e-9 * n)
    np.testing.assert_allclose(dgamma, sum_gx, rtol=2 * e, atol=1e-9 * n)
    # Two threads: the same bits.
    y2, mean2, var2 = F.batch_norm_train(x, gamma, beta, axis=axis, n_threads=2)
    dx2 = F.batch_norm_backward(dy, x, mean2, var2, gamma, beta, axis=axis, n_threads=2)[0]
    assert y2.tobytes() == y.tobytes() and dx2.tobytes() == dx.tobytes()
    assert mean2.tobytes() == got_mean.tobytes() and var2.tobytes() == got_var.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1),
                                         ((2, 3, 20000), 1), ((300, 3, 4), 1), ((70, 3), 1)])
def test_constant_channels_give_beta_exactly_in_every_layout(dtype, shape, axis):
    # test_statistics_precision.py checks (64, C) batches; here the runs, the short
    # runs taken as rows, channels-last, two threads, values whose square overflows
    # float32, and dx, which for var = 0 is gamma/sqrt(eps) * (dy - mean(dy)).
    # PyTorch returns beta + (x - its mean)/sqrt(eps): a float32 channel of 1e7
    # comes out about 100 away from beta.
    rng = np.random.default_rng(seed_of("constant", dtype.__name__, shape, axis))
    C = shape[axis]
    big = 3e38 if dtype == np.float32 else 1e300
    values = np.array([0.1, 1e7, big, -1e-30])[rng.permutation(4)[:C]].astype(dtype)
    ps = [1] * len(shape)
    ps[axis] = C
    x = np.broadcast_to(values.reshape(ps), shape).copy()
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for n_threads in (1, 2):
        y, mean, var = F.batch_norm_train(x, gamma, beta, axis=axis, n_threads=n_threads)
        assert np.array_equal(var, np.zeros(C))
        assert np.array_equal(mean, values.astype(np.float64))
        assert np.array_equal(y, np.broadcast_to(beta.reshape(ps), shape))
        dx, dgamma, _ = F.batch_norm_backward(dy, x, mean, var, gamma, beta, axis=axis,
                                              n_threads=n_threads)
        g = rows(dy, axis).astype(LD)
        want = (np.asarray(gamma, LD) / np.sqrt(LD(1e-5)))[:, None] * (g - g.mean(axis=1)[:, None])
        bound = 4 * np.finfo(dtype).eps * np.abs(want).max(axis=1)[:, None]
        assert_within(rows(dx, axis), want, bound, "dx of a constant channel")
        assert np.array_equal(dgamma, np.zeros(C, dtype))


@pytest.mark.parametrize("dtype, offset", [(np.float32, 1e3), (np.float32, 1e7),
                                           (np.float64, 1e7), (np.float64, 1e12)])
@pytest.mark.parametrize("shape, axis", [((256, 3), 1), ((4, 3, 8, 8), 1), ((4, 8, 8, 3), -1)])
def test_running_statistics_on_offset_data(dtype, offset, shape, axis):
    # running = (1 - momentum) running + momentum batch, with the unbiased m/(m-1)
    # variance, from the exact batch statistics: within an ulp or two of the
    # layer's dtype (measured at most 1.2). PyTorch's float32 running_var is off by
    # up to 1e10 ulps at an offset of 1e7 (1e9 in float64 at 1e12).
    rng = np.random.default_rng(seed_of("running", dtype.__name__, offset, shape, axis))
    C = shape[axis]
    ps = [1] * len(shape)
    ps[axis] = C
    bn = cbn.BatchNorm(C, momentum=0.3, axis=axis, dtype=dtype)
    run_mean, run_var = np.zeros(C, LD), np.ones(C, LD)
    loc = offset * rng.uniform(0.5, 2.0, C).reshape(ps) * rng.choice([-1, 1], C).reshape(ps)
    for _ in range(4):
        x = (loc + rng.uniform(0.5, 2.0) * rng.standard_normal(shape)).astype(dtype)
        bn(x)
        ref = oracle(x, x, np.ones(C), np.zeros(C), 1e-5, axis)
        m = ref["y"].shape[1]
        run_mean = LD(0.7) * run_mean + LD(0.3) * ref["mean"]
        run_var = LD(0.7) * run_var + LD(0.3) * ref["var"] * m / (m - 1)
    e = np.finfo(dtype).eps
    assert_within(bn.running_mean, run_mean, 2 * e * np.abs(run_mean), "running_mean")
    assert_within(bn.running_var, run_var, 2 * e * run_var, "running_var")
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
@pytest.mark.parametrize("shape, axis", [((5, 2), 1), ((3, 2, 2, 3), 1), ((3, 2, 3, 2), -1)])
def test_dx_matches_central_differences_in_float64(shape, axis, offset):
    # The oracle's forward in long double, L = sum(dy * y), differentiated by
    # central differences of step h: truncation O(h^2) and, at an offset of 1e6,
    # the rounding of x +- h (1e-16 * 1e6 / h) bound the agreement (measured 3e-9,
    # and 6e-7 at 1e6).
    rng = np.random.default_rng(seed_of("fd", shape, axis, offset))
    C = shape[axis]
    ps = [1] * len(shape)
    ps[axis] = C
    x = offset * rng.uniform(0.5, 2.0, C).reshape(ps) + rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, C)
    beta = rng.standard_normal(C)
    dy = rng.standard_normal(shape)
    _, mean, var = F.batch_norm_train(x, gamma, beta, axis=axis)
    dx = F.batch_norm_backward(dy, x, mean, var, gamma, beta, axis=axis)[0]
    g = rows(dy, axis).astype(LD)
    h = 1e-4

    def loss(xv):
        return (g * oracle(xv, xv, gamma, beta, 1e-5, axis)["y"]).sum()

    fd = np.empty(shape)
    for i in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd[i] = float((loss(xp) - loss(xm)) / LD(2 * h))
    tol = 2e-8 + 1e-15 * offset / h
    assert np.abs(dx - fd).max() <= tol * np.abs(fd).max()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cbn_is_at_least_as_accurate_as_torch_on_offset_float32(layout):
    # A float32 batch of mean 1e5 std. Measured with PyTorch 2.13: its (N, C) and
    # channels-last kernels lose the statistics (invstd, y and dx off by 3e6-5e6
    # ulps); its NCHW kernel keeps them, and its y and cbn's are off by about the
    # same 5e3-1e4 ulps, the mean's rounding to float32. cbn's invstd and dx are
    # within an ulp.
    torch = pytest.importorskip("torch")
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed_of("torch", layout))
    x, gamma, beta, eps = hard_batch("offset1e5", np.float32, shape, axis, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    ref = oracle(x, dy, gamma, beta, eps, axis)
    y, mean, var = F.batch_norm_train(x, gamma, beta, axis=axis)
    dx = F.batch_norm_backward(dy, x, mean, var, gamma, beta, axis=axis)[0]

    def to_torch(a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.permute(0, 3, 1, 2) if axis == -1 else t  # channels-last memory

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, b = torch.from_numpy(gamma), torch.from_numpy(beta)
        rm, rv = torch.zeros(x.shape[axis]), torch.ones(x.shape[axis])
        yt, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            to_torch(x), w, b, rm, rv, True, 1.0, eps)
        dxt = torch.ops.aten.native_batch_norm_backward(
            to_torch(dy), to_torch(x), w, rm, rv, save_mean, save_invstd, True, eps,
            [True, True, True])[0]
    finally:
        torch.set_num_threads(old)

    def back(t):
        a = t.detach().numpy()
        return np.moveaxis(a, 1, -1) if axis == -1 else a

    def err(got, want):  # normwise per channel, in ulps of float32
        got = rows(got, axis).astype(LD)
        return float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max()
                     / LD(np.finfo(np.float32).eps))

    invstd_err = float((np.abs(1 / np.sqrt(LD(1) * var + LD(eps)) - ref["invstd"])
                        / ref["invstd"]).max() / LD(np.finfo(np.float32).eps))
    torch_invstd_err = float((np.abs(save_invstd.numpy().astype(LD) - ref["invstd"])
                              / ref["invstd"]).max() / LD(np.finfo(np.float32).eps))
    assert invstd_err <= 1 and invstd_err <= torch_invstd_err + 1
    assert err(dx, ref["dx"]) <= 4 and err(dx, ref["dx"]) <= 2 * err(back(dxt), ref["dx"]) + 4
    assert err(y, ref["y"]) <= 2 * err(back(yt), ref["y"]) + 8


def test_float32_values_near_the_maximum_of_one_sign():
    # Squares of 3e38 overflow float32 (not double, where cbn sums); x - mean does
    # not. PyTorch returns inf for y and dx here.
    rng = np.random.default_rng(seed_of("near max"))
    for shape, axis in LAYOUTS.values():
        x = np.minimum(3e38 + 1e37 * rng.standard_normal(shape),
                       np.finfo(np.float32).max).astype(np.float32)
        C = shape[axis]
        gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
        beta = rng.standard_normal(C).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        check_train_and_backward(x, dy, gamma, beta, 1e-5, axis)


@pytest.mark.parametrize("shape, axis", [((4, 1), 1), ((2, 1, 4000), 1)])
def test_float32_values_near_the_maximum_of_both_signs(shape, axis):
    """x - mean overflows float32 (it is formed in the dtype, in the vector
    loops), although y and dx are finite: cbn raises a FloatingPointError that
    says so and points to float64, where the same batch is computed right."""
    x = np.full(shape, 3e38, np.float32)
    x.reshape(-1)[::4] = -3e38            # mean 1.5e38: x - mean = -4.5e38 overflows
    gamma = np.full(shape[axis], 1e30, np.float32)   # keeps dx (~1e-9) a normal float32
    beta = np.zeros(shape[axis], np.float32)
    dy = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with pytest.raises(FloatingPointError, match=r"x - mean for values of both signs near its "
                                                 r"largest\); float64 holds larger values"):
        y, mean, var = F.batch_norm_train(x, gamma, beta, axis=axis)
        F.batch_norm_backward(dy, x, mean, var, gamma, beta, axis=axis)
    x64, dy64, g64, b64 = (a.astype(np.float64) for a in (x, dy, gamma, beta))
    ref = oracle(x64, dy64, g64, b64, 1e-5, axis)
    y, mean, var = F.batch_norm_train(x64, g64, b64, axis=axis)
    dx, _, _ = F.batch_norm_backward(dy64, x64, mean, var, g64, b64, axis=axis)
    # (The variance of these 8,000 values carries tens of ulps, so y does.)
    np.testing.assert_allclose(rows(y, axis).astype(LD), ref["y"], rtol=1e-13, atol=0)
    np.testing.assert_allclose(rows(dx, axis).astype(LD), ref["dx"], rtol=0,
                               atol=1e-12 * float(np.abs(ref["dx"]).max()))
