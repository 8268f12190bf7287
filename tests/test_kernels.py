"""Tests of the compiled kernels, ``cbn._kernels``, against the NumPy oracle.

The primitives check only that their arrays are not empty and agree in shape
(the last test), so every call here builds exactly the arguments the
functional layer would: a C-contiguous ``(outer, C, inner)`` view, float64
per-channel vectors and the coefficient table. The shapes are chosen to visit
every branch of the block geometry: ``inner == 1`` (rows, channel blocks of
2048, row blocks of 256, or two halves for batches of 128-511 rows) and ``inner > 1`` (runs, LANES = 16 tails, reduction
blocks of 16384 values), plus random shapes of rank 2..5 folded around a
random channel axis.

Tolerances are derived from the dtype: ``K * finfo(dtype).eps * scale``,
where ``scale`` bounds the magnitude of the terms that were rounded.
"""

import math
import zlib

import numpy as np
import pytest

from cbn import _kernels as K
from cbn import reference as ref

DTYPES = [np.float64, np.float32]
EPS = 1e-5
THREADS = [1, 2, 3]

# (outer, C, inner): each entry exercises one part of the block geometry.
GEOMETRIES = [
    (2, 3, 1),  # smallest dense batch
    (3, 2, 1),
    (7, 13, 1),  # primes, C < LANES
    (5, 37, 1),  # C not a multiple of 16, tail loop
    (300, 17, 1),  # outer > 256: two row blocks of 150 (inner == 1)
    (131, 40, 1),  # 128 <= outer < 512: two row blocks, of 66 and 65
    (700, 9, 1),  # outer >= 512: row blocks of 256 and a remainder
    (3, 300, 1),  # wide rows, one channel block
    (3, 2100, 1),  # C > 2048: two channel blocks
    (520, 2063, 1),  # several row blocks x two channel blocks, prime C
    (70, 1024, 1),  # rows of 4 KiB / 8 KiB: the longest that fold q apart in statistics
    (133, 1030, 1),  # two halves, four-row folds plus tail rows; float64 rows just over 8 KiB
    (2, 3, 5),  # inner < LANES: tail only
    (3, 2, 16),  # inner == LANES exactly
    (4, 5, 17),  # LANES + 1
    (7, 11, 31),  # primes
    (40, 3, 1000),  # 40*1000 > 16384: several reduction blocks of 16 rows
    (3, 2, 9001),  # one row per reduction block, prime inner
    (1, 3, 20011),  # inner > 16384 with outer == 1
    (2, 1, 2),  # one channel, two values each... per row
    (9003, 64, 1),  # second passes in several 1 MiB chunks, short rows folded, tail rows
    (37, 5, 1601),  # runs in several 1 MiB chunks (float32 2, float64 3)
    (1032, 256, 1),  # rows of 1-2 KiB: two at a time, an odd number apart (_row_stride), tail rows
    # Short runs taken as the rows of the (outer, C*inner) view (_spreads):
    (64, 512, 2),  # 1024 columns, one block
    (300, 7, 3),  # two row blocks of columns, merged, then merged per channel
    (1030, 40, 4),  # row blocks, four rows an odd number apart, tail rows
    (9, 2100, 4),  # 8400 columns in five blocks
    (3, 70000, 2),  # float32 rows of 547 KiB; float64 rows over SPREAD_ROW_BYTES: runs
    (5, 3, 25),  # float32: statistics as rows, backward sums and elementwise passes as runs
    (40, 3, 25),  # float32: both reductions as rows, the elementwise passes as runs
    (8, 6, 49),  # float32 runs of 196 bytes on few rows: every pass as runs (_spread_sums)
    (24, 5, 16),  # float32: reductions as rows; float64: backward sums as runs
]


def seed_of(*parts):
    """A per-test seed that, unlike hash(), does not change between runs."""
    return zlib.crc32(repr(parts).encode())


def geometry_id(g):
    return "x".join(map(str, g))


def random_geometry(seed):
    """A random rank-2..5 shape and channel axis, folded into (outer, C, inner)."""
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(2, 6))
    shape = tuple(int(d) for d in rng.integers(1, 8, size=rank))
    axis = int(rng.integers(0, rank))
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    if outer * inner < 2:  # training needs more than one value per channel
        outer = 2
    return outer, shape[axis], inner


ALL_GEOMETRIES = GEOMETRIES + [random_geometry(s) for s in range(8)]


def tol(dtype, scale, k):
    """Absolute tolerance: k rounding errors of the dtype at magnitude ``scale``."""
    return k * np.finfo(dtype).eps * scale


def assert_close(got, want, dtype, scale, k=16, what="", extra=0.0):
    """|got - want| <= k * eps(dtype) * scale + extra, elementwise, with a useful message."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    bound = tol(dtype, scale, k) + extra
    excess = np.abs(got - want) - bound
    if not np.all(excess <= 0):  # NaN fails too
        i = np.unravel_index(np.argmax(np.where(np.isnan(excess), np.inf, excess)), got.shape)
        pytest.fail(f"{what}: at {i} got {got[i]!r}, want {want[i]!r}, "
                    f"allowed error {np.broadcast_to(bound, got.shape)[i]:.3g}")


def assert_sums_close(got, want, dtype, l1, what="", extra=0.0):
    """Double-accumulated sums rounded once to ``dtype``: 4 ulps of the dtype plus
    64 ulps of double times the L1 norm of the summands."""
    bound = 4 * np.finfo(dtype).eps * np.abs(want) + 64 * np.finfo(np.float64).eps * l1 + extra
    assert_close(got, want, np.float64, bound / np.finfo(np.float64).eps, k=1, what=what)


def make_batch(rng, geometry, dtype, offset=3.0):
    """A batch with per-channel offsets and scales, and gamma (mixed signs), beta."""
    outer, C, inner = geometry
    loc = rng.uniform(-offset, offset, size=(1, C, 1))
    scale = rng.uniform(0.5, 2.0, size=(1, C, 1))
    x = (loc + scale * rng.standard_normal(geometry)).astype(dtype)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 2.0, C)).astype(dtype)
    beta = rng.normal(size=C).astype(dtype)
    return x, gamma, beta


def kink_free_beta(x64, mean, var, gamma, rng):
    """Per-channel beta so that no ReLU pre-activation sits near 0.

    The ReLU threshold in x_hat units is -beta/gamma; it is put in the middle
    of the widest gap between sorted x_hat values (or beyond all of them), so
    a float32 kernel and the float64 oracle agree on every mask bit.
    Returns beta (float64) and the smallest |pre-activation|.
    """
    C = x64.shape[1]
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x64 - mean[None, :, None]) * invstd[None, :, None]
    beta = np.empty(C)
    for c in range(C):
        v = np.unique(xhat[:, c, :])
        choice = rng.integers(0, 4)
        if choice == 0 or v.size < 2:
            t = v[0] - 1.0  # threshold below every value
        elif choice == 1:
            t = v[-1] + 1.0  # above every value
        else:
            gaps = np.diff(v)
            i = int(np.argmax(gaps))
            t = 0.5 * (v[i] + v[i + 1])
        beta[c] = -gamma[c] * t
    z = gamma[None, :, None] * xhat + beta[None, :, None]
    return beta, float(np.min(np.abs(z)))


def forward_coef(mean, var, gamma, beta, dtype):
    """Rows m, a, b of the coefficient table, as the kernels build them: b takes
    back what rounding the mean to ``dtype`` cost, (m - mean) * a."""
    invstd = 1.0 / np.sqrt(var + EPS)
    a = gamma.astype(np.float64) * invstd
    m = np.asarray(mean).astype(dtype).astype(np.float64)
    b = beta.astype(np.float64) + (m - mean) * a
    return np.ascontiguousarray(np.stack([mean, a, b]), dtype=dtype)


def backward_coef(coef3, mean, var, sum_g, sum_gd, count, training, dtype):
    """Rows m, a, b, s, kx, k0 with the training (or evaluation) kx, k0.

    The kernel computes dx = a * (g + k0 + kx * (x - m) * s), with s = invstd.
    """
    invstd = 1.0 / np.sqrt(var + EPS)
    m = coef3[0].astype(np.float64)
    if training:
        kx = -invstd * sum_gd / count
        k0 = -sum_g / count + kx * ((m - mean) * invstd)
    else:
        kx = np.zeros_like(invstd)
        k0 = np.zeros_like(invstd)
    rows = [invstd, kx, k0]
    return np.ascontiguousarray(np.vstack([coef3] + [r[None].astype(dtype) for r in rows]))


def stats_scale(x64):
    """Magnitude bound for mean/var rounding: mean|x| and the second moment about 0."""
    a = np.abs(x64)
    return a.max(axis=(0, 2)), (a * a).max(axis=(0, 2))


# ---------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES, ids=geometry_id)
def test_batch_stats_matches_reference(geometry, dtype):
    rng = np.random.default_rng(seed_of(geometry))
    x, _, _ = make_batch(rng, geometry, dtype)
    x64 = x.astype(np.float64)
    mean = np.empty(geometry[1])
    var = np.empty(geometry[1])
    assert K.batch_stats(x, mean, var, 1) == K.OK
    want_mean, want_var = ref.batch_stats(x64, axis=1)
    # Sums are kept in double whatever the input dtype: float64 tolerance.
    s1, s2 = stats_scale(x64)
    assert_close(mean, want_mean, np.float64, s1, k=64, what="mean")
    assert_close(var, want_var, np.float64, s2, k=64, what="var")
    assert np.all(var >= 0)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES, ids=geometry_id)
def test_normalize_matches_reference(geometry, dtype, relu):
    rng = np.random.default_rng(seed_of(geometry, relu))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    x64 = x.astype(np.float64)
    mean, var = ref.batch_stats(x64, axis=1)
    if relu:
        beta = kink_free_beta(x64, mean, var, gamma.astype(np.float64), rng)[0].astype(dtype)
    coef = forward_coef(mean, var, gamma, beta, dtype)
    y = np.full_like(x, np.nan)
    assert K.normalize(x, y, coef, relu, 1) == K.OK
    want = ref.forward_eval(x64, mean, var, gamma.astype(np.float64), beta.astype(np.float64),
                            EPS, axis=1, relu=relu)
    scale = np.abs(x64).max() * np.abs(coef[1]).max() + np.abs(coef[2]).max()
    assert_close(y, want, dtype, scale, what="y")
    if relu:
        assert np.all(y >= 0)



# Rows of the composites normalize as y = x*a + c (c = b - mean*a, one
# coefficient row fewer) when every channel's |mean*a| <= 4 (|gamma| + |beta|),
# else as (x - m)*a + b. Both round a term of size |mean*a| (x*a and c, or m =
# mean rounded to the dtype), so y must be accurate to a few units of the
# output's own scale |gamma|*|x_hat| + |beta| plus |mean*a|: not to |x|*a, a
# scale loose enough to hide the form's choice.
@pytest.mark.parametrize(
    "geometry",
    # rows; then short runs, which normalize as the rows of the (outer, C*inner) view
    [(300, 1030, 1), (37, 5, 1), (64, 24, 1), (40, 300, 1), (300, 20, 4), (64, 24, 9)],
    ids=geometry_id,
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigmas", [0.0, 3.0, 1e3])
def test_row_forward_is_accurate_at_the_output_scale(geometry, dtype, sigmas):
    rng = np.random.default_rng(seed_of(geometry, sigmas, "uncentred"))
    outer, C, inner = geometry
    std = rng.uniform(0.5, 2.0, C)[:, None]
    loc = sigmas * std * rng.choice([-1.0, 1.0], (C, 1))
    x = (loc + std * rng.standard_normal(geometry)).astype(dtype)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 2.0, C)).astype(dtype)
    beta = (0.5 * rng.standard_normal(C)).astype(dtype)
    x64, g64, b64 = x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)
    mean, var = ref.batch_stats(x64, axis=1)

    y = np.full_like(x, np.nan)
    assert K.forward_eval(x, y, mean, var, gamma, beta, EPS, False, 1) == K.OK
    want = ref.forward_eval(x64, mean, var, g64, b64, EPS, axis=1)
    xhat = (x64 - mean[None, :, None]) / np.sqrt(var + EPS)[None, :, None]
    a = g64 / np.sqrt(var + EPS)
    out_scale = np.abs(g64) * np.abs(xhat).max(axis=(0, 2)) + np.abs(b64) + np.abs(mean * a)
    assert_close(y, want, dtype, out_scale[None, :, None], k=32, what="eval y")

    yt = np.full_like(x, np.nan)
    m, v = np.empty(C), np.empty(C)
    assert K.forward_train(x, yt, gamma, beta, EPS, m, v, False, 1) == K.OK
    cond = 64 * np.finfo(np.float64).eps * stats_scale(x64)[1] / (var + EPS)
    assert_close(yt, want, dtype, out_scale[None, :, None], k=32, what="train y",
                 extra=cond[None, :, None] * np.abs(want - b64[None, :, None]))

    # Which form ran: the centred one is what the normalize primitive computes.
    centred = np.full_like(x, np.nan)
    assert K.normalize(x, centred, forward_coef(mean, var, gamma, beta, dtype), False, 1) == K.OK
    if sigmas >= 1e3:  # the centred form, bit for bit
        assert np.array_equal(y, centred)
    elif x.size > 1000:  # the two-row form: some last bits differ
        assert not np.array_equal(y, centred)

@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES, ids=geometry_id)
def test_backward_reduce_and_apply_match_reference(geometry, dtype, relu):
    rng = np.random.default_rng(seed_of(geometry, relu, "bw"))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.normal(size=geometry).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean, var = ref.batch_stats(x64, axis=1)
    if relu:
        beta = kink_free_beta(x64, mean, var, gamma.astype(np.float64), rng)[0].astype(dtype)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    coef3 = forward_coef(mean, var, gamma, beta, dtype)
    invstd = 1.0 / np.sqrt(var + EPS)

    sum_g = np.empty(geometry[1])
    sum_gd = np.empty(geometry[1])
    assert K.backward_reduce(dy, x, mean, coef3, sum_g, sum_gd, relu, 1) == K.OK
    _, dgamma, dbeta = ref.backward_eval(dy64, x64, mean, var, g64, b64, EPS, axis=1, relu=relu)
    # Both sums are accumulated in double from the same inputs: an L1 bound.
    l1_g = np.abs(dy64).sum(axis=(0, 2))
    l1_gd = (np.abs(dy64) * np.abs(x64 - mean[None, :, None])).sum(axis=(0, 2))
    assert_close(sum_g, dbeta, np.float64, l1_g, k=64, what="sum_g")
    assert_close(sum_gd, dgamma / invstd, np.float64, l1_gd, k=64, what="sum_gd")

    count = geometry[0] * geometry[2]
    amax = np.abs(coef3[1].astype(np.float64))[None, :, None]
    xhat_max = np.abs((x64 - mean[None, :, None]) * invstd[None, :, None]).max()
    for training in (True, False):
        coef6 = backward_coef(coef3, mean, var, sum_g, sum_gd, count, training, dtype)
        dx = np.full_like(x, np.nan)
        assert K.backward_apply(dy, x, coef6, dx, relu, 1) == K.OK
        if training:
            want = ref.backward_train(dy64, x64, g64, b64, EPS, axis=1, relu=relu)[0]
        else:
            want = ref.backward_eval(dy64, x64, mean, var, g64, b64, EPS, axis=1, relu=relu)[0]
        scale = (amax * np.abs(dy64).max()).max() * (3 + xhat_max)
        assert_close(dx, want, dtype, scale, what=f"dx training={training}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0, None])
def test_ema_update_rule_over_steps(dtype, momentum):
    """running = (1-f)*running + f*batch with the unbiased variance; f = 1/n if cumulative."""
    rng = np.random.default_rng(7)
    C = 11
    rm = rng.normal(size=C).astype(dtype)
    rv = rng.uniform(0.5, 2, size=C).astype(dtype)
    want_m, want_v = rm.astype(np.float64), rv.astype(np.float64)
    for n in range(1, 6):
        count = int(rng.integers(2, 50))
        mean = rng.normal(size=C) * 3
        var = rng.uniform(0, 4, size=C)
        factor = momentum if momentum is not None else 1.0 / n
        assert K.ema_update(rm, rv, mean, var, float(count), factor) == 0
        want_m, want_v = ref.ema_update(want_m, want_v, mean, var, count, factor)
        # One rounding to the dtype per step, on values of magnitude ~ max(running, batch).
        assert_close(rm, want_m, dtype, np.abs(want_m) + 4, k=4 * n, what="running_mean")
        assert_close(rv, want_v, dtype, np.abs(want_v) + 8, k=4 * n, what="running_var")
    if momentum is None:
        # A cumulative average from a fresh start (running_mean 0, factor 1 first)
        # is the plain mean of the batch means.
        rm = np.zeros(C, dtype)
        rv = np.ones(C, dtype)
        means = rng.normal(size=(4, C))
        for n in range(1, 5):
            K.ema_update(rm, rv, means[n - 1], np.ones(C), 10.0, 1.0 / n)
        assert_close(rm, means.mean(axis=0), dtype, 4.0, k=16, what="cumulative mean")


def test_ema_update_refuses_overflow_and_writes_nothing():
    """A float32 running variance that would overflow is left untouched (status 1)."""
    rm = np.array([0.5, -1.0], np.float32)
    rv = np.array([1.5, 2.0], np.float32)
    before = (rm.copy(), rv.copy())
    status = K.ema_update(rm, rv, np.array([0.0, 1.0]), np.array([1.0, 1e40]), 10.0, 0.1)
    assert status == 1
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1])


# ---------------------------------------------------------------------------
# Composites
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES, ids=geometry_id)
def test_composites_match_reference(geometry, dtype, relu):
    rng = np.random.default_rng(seed_of(geometry, relu, "comp"))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.normal(size=geometry).astype(dtype)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want_mean, want_var = ref.batch_stats(x64, axis=1)
    if relu:
        beta = kink_free_beta(x64, want_mean, want_var, gamma.astype(np.float64), rng)[0]
        beta = beta.astype(dtype)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    C = geometry[1]
    invstd = 1.0 / np.sqrt(want_var + EPS)
    a_max = np.abs(g64 * invstd).max()
    y_scale = np.abs(x64).max() * a_max + np.abs(b64).max()

    # The composites normalize with their own statistics, whose variance is
    # accurate to ~eps64 * max(x^2) (shifted sums); relative to a small
    # variance that is a larger error, and it reaches y, dx and dgamma through
    # invstd. `cond` is that relative error, per channel.
    cond = 64 * np.finfo(np.float64).eps * stats_scale(x64)[1] / (want_var + EPS)
    cond3 = cond[None, :, None]

    # forward_train
    y = np.full_like(x, np.nan)
    mean, var = np.empty(C), np.empty(C)
    assert K.forward_train(x, y, gamma, beta, EPS, mean, var, relu, 1) == K.OK
    s1, s2 = stats_scale(x64)
    assert_close(mean, want_mean, np.float64, s1, k=64, what="mean")
    assert_close(var, want_var, np.float64, s2, k=64, what="var")
    want_y = ref.forward_train(x64, g64, b64, EPS, axis=1, relu=relu)[0]
    assert_close(y, want_y, dtype, y_scale, what="train y",
                 extra=cond3 * np.abs(want_y - b64[None, :, None]))

    # forward_eval with other statistics (as running statistics would be)
    rmean = want_mean + rng.normal(size=C) * 0.1
    rvar = want_var * rng.uniform(0.8, 1.2, size=C)
    ye = np.full_like(x, np.nan)
    assert K.forward_eval(x, ye, rmean, rvar, gamma, beta, EPS, relu, 1) == K.OK
    want_ye = ref.forward_eval(x64, rmean, rvar, g64, b64, EPS, axis=1, relu=relu)
    ye_scale = np.abs(x64).max() * np.abs(g64 / np.sqrt(rvar + EPS)).max() + np.abs(b64).max()
    if not relu:  # the kink-free beta was chosen for the batch statistics only
        assert_close(ye, want_ye, dtype, ye_scale, what="eval y")
    else:
        assert np.all(ye >= 0)

    # backward, training and evaluation, with and without parameter gradients
    xhat_max = np.abs((x64 - want_mean[None, :, None]) * invstd[None, :, None]).max()
    dx_scale = a_max * np.abs(dy64).max() * (3 + xhat_max)
    l1_g = np.abs(dy64).sum(axis=(0, 2))
    l1_gx = (np.abs(dy64) * np.abs(x64 - want_mean[None, :, None])).sum(axis=(0, 2)) * invstd
    for training in (True, False):
        dx = np.full_like(x, np.nan)
        dgamma = np.full(C, np.nan, dtype)
        dbeta = np.full(C, np.nan, dtype)
        status = K.backward(dy, x, mean, var, gamma, beta, EPS, dx, dgamma, dbeta,
                            training, True, relu, 1)
        assert status == K.OK
        if training:
            want = ref.backward_train(dy64, x64, g64, b64, EPS, axis=1, relu=relu)
        else:
            want = ref.backward_eval(dy64, x64, mean, var, g64, b64, EPS, axis=1, relu=relu)
        assert_close(dx, want[0], dtype, dx_scale, what=f"dx training={training}",
                     extra=(cond3 * dx_scale) if training else 0.0)
        # dgamma/dbeta: exact double sums, rounded once to the dtype.
        assert_sums_close(dgamma, want[1], dtype, l1_gx, what="dgamma",
                          extra=cond * (np.abs(want[1]) + l1_gx) if training else 0.0)
        assert_sums_close(dbeta, want[2], dtype, l1_g, what="dbeta")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_eval_without_param_grads_leaves_them_unwritten(dtype, relu):
    """need_param_grads=False in evaluation skips the reduction; dx is still right."""
    rng = np.random.default_rng(11)
    geometry = (6, 5, 7)
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.normal(size=geometry).astype(dtype)
    mean = rng.normal(size=5)
    var = rng.uniform(0.5, 2, size=5)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    g64 = gamma.astype(np.float64)
    if relu:  # a beta that puts the threshold far from the data
        beta = (np.abs(g64) * 50).astype(dtype)
    dgamma = np.full(5, 123.0, dtype)
    dbeta = np.full(5, -7.0, dtype)
    dx = np.empty_like(x)
    assert K.backward(dy, x, mean, var, gamma, beta, EPS, dx, dgamma, dbeta,
                      False, False, relu, 1) == K.OK
    assert np.all(dgamma == 123.0) and np.all(dbeta == -7.0)
    want = ref.backward_eval(dy64, x64, mean, var, g64, beta.astype(np.float64), EPS, axis=1,
                             relu=relu)[0]
    assert_close(dx, want, dtype, np.abs(want).max() + 1, what="dx")


# ---------------------------------------------------------------------------
# In place, threads
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [(7, 13, 1), (300, 17, 1), (4, 5, 17), (40, 3, 1000)],
                         ids=geometry_id)
def test_in_place_outputs_equal_out_of_place(geometry, dtype, relu):
    """y_out may be x and dx_out may be dy: the elementwise passes read before they write."""
    rng = np.random.default_rng(seed_of(geometry, relu, "inplace"))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.normal(size=geometry).astype(dtype)
    C = geometry[1]
    mean, var = np.empty(C), np.empty(C)

    y = np.empty_like(x)
    K.forward_train(x, y, gamma, beta, EPS, mean, var, relu, 2)
    xi = x.copy()
    m2, v2 = np.empty(C), np.empty(C)
    assert K.forward_train(xi, xi, gamma, beta, EPS, m2, v2, relu, 2) == K.OK
    assert np.array_equal(xi, y) and np.array_equal(mean, m2) and np.array_equal(var, v2)

    xi = x.copy()
    ye = np.empty_like(x)
    K.forward_eval(x, ye, mean, var, gamma, beta, EPS, relu, 2)
    assert K.forward_eval(xi, xi, mean, var, gamma, beta, EPS, relu, 2) == K.OK
    assert np.array_equal(xi, ye)

    coef = forward_coef(mean, var, gamma, beta, dtype)
    xi = x.copy()
    yn = np.empty_like(x)
    K.normalize(x, yn, coef, relu, 2)
    assert K.normalize(xi, xi, coef, relu, 2) == K.OK
    assert np.array_equal(xi, yn)

    for training in (True, False):
        dx = np.empty_like(x)
        dg, db = np.empty(C, dtype), np.empty(C, dtype)
        K.backward(dy, x, mean, var, gamma, beta, EPS, dx, dg, db, training, True, relu, 2)
        dyi = dy.copy()
        dg2, db2 = np.empty(C, dtype), np.empty(C, dtype)
        assert K.backward(dyi, x, mean, var, gamma, beta, EPS, dyi, dg2, db2,
                          training, True, relu, 2) == K.OK
        assert np.array_equal(dyi, dx) and np.array_equal(dg, dg2) and np.array_equal(db, db2)

    sum_g, sum_gd = np.empty(C), np.empty(C)
    K.backward_reduce(dy, x, mean, coef, sum_g, sum_gd, relu, 2)
    coef6 = backward_coef(coef, mean, var, sum_g, sum_gd, geometry[0] * geometry[2], True, dtype)
    dx = np.empty_like(x)
    K.backward_apply(dy, x, coef6, dx, relu, 2)
    dyi = dy.copy()
    assert K.backward_apply(dyi, x, coef6, dyi, relu, 2) == K.OK
    assert np.array_equal(dyi, dx)


def run_everything(x, dy, gamma, beta, relu, n_threads):
    """Every kernel on one input; returns all outputs, for bitwise comparison."""
    C = x.shape[1]
    dtype = x.dtype
    out = {}
    mean, var = np.empty(C), np.empty(C)
    K.batch_stats(x, mean, var, n_threads)
    out["stats"] = (mean, var)
    y = np.empty_like(x)
    m2, v2 = np.empty(C), np.empty(C)
    K.forward_train(x, y, gamma, beta, EPS, m2, v2, relu, n_threads)
    out["train"] = (y, m2, v2)
    ye = np.empty_like(x)
    K.forward_eval(x, ye, mean, var * 1.5, gamma, beta, EPS, relu, n_threads)
    out["eval"] = (ye,)
    coef = forward_coef(mean, var, gamma, beta, dtype)
    yn = np.empty_like(x)
    K.normalize(x, yn, coef, relu, n_threads)
    out["normalize"] = (yn,)
    sg, sgd = np.empty(C), np.empty(C)
    K.backward_reduce(dy, x, mean, coef, sg, sgd, relu, n_threads)
    out["reduce"] = (sg, sgd)
    coef6 = backward_coef(coef, mean, var, sg, sgd, x.shape[0] * x.shape[2], True, dtype)
    dxa = np.empty_like(x)
    K.backward_apply(dy, x, coef6, dxa, relu, n_threads)
    out["apply"] = (dxa,)
    for training in (True, False):
        dx = np.empty_like(x)
        dg, db = np.empty(C, dtype), np.empty(C, dtype)
        K.backward(dy, x, mean, var, gamma, beta, EPS, dx, dg, db, training, True, relu,
                   n_threads)
        out[f"backward{training}"] = (dx, dg, db)
    return out


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "geometry",
    [(520, 263, 1), (3, 300, 1), (40, 3, 1000), (3, 2, 9001), (7, 11, 31), (2, 3, 5),
     (9003, 64, 1), (37, 5, 1601), (64, 512, 2), (300, 7, 3), (9, 2100, 4)],
    ids=geometry_id,
)
def test_results_are_bit_identical_for_any_thread_count(geometry, dtype, relu):
    """Reductions run over shape-determined blocks merged in a fixed order."""
    rng = np.random.default_rng(seed_of(geometry, relu, "threads"))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.normal(size=geometry).astype(dtype)
    results = [run_everything(x, dy, gamma, beta, relu, n) for n in THREADS]
    for other, n in zip(results[1:], THREADS[1:]):
        for key, arrays in results[0].items():
            for a, b in zip(arrays, other[key]):
                assert np.array_equal(a, b), f"{key} differs between 1 and {n} threads"


# ---------------------------------------------------------------------------
# Numerics: large offsets, non-finite values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "dtype, offset", [(np.float32, 1e4), (np.float64, 1e8)], ids=["float32-1e4", "float64-1e8"]
)
@pytest.mark.parametrize("geometry", [(4000, 3, 1), (600, 3, 1), (20, 3, 900), (600, 3, 4)],
                         ids=geometry_id)
def test_statistics_stay_accurate_with_a_large_offset(geometry, dtype, offset, seed):
    """|mean| >> std: a naive E[x^2] - E[x]^2 would lose every digit of the variance."""
    rng = np.random.default_rng(seed)
    C = geometry[1]
    loc = offset * rng.uniform(0.5, 1.5, size=(1, C, 1)) * rng.choice([-1, 1], size=(1, C, 1))
    x = (loc + rng.standard_normal(geometry)).astype(dtype)
    x64 = x.astype(np.float64)
    # Exact-as-can-be oracle: the two-pass reference on the float64 values.
    want_mean, want_var = ref.batch_stats(x64, axis=1)
    assert np.all(np.abs(want_var - 1) < 0.3)  # unit variance survived rounding to dtype
    mean, var = np.empty(C), np.empty(C)
    K.batch_stats(x, mean, var, 2)
    assert np.allclose(mean, want_mean, rtol=1e-5, atol=0)
    assert np.allclose(var, want_var, rtol=1e-5, atol=0)
    # forward_train too, and its output is still a standardized batch.
    gamma = np.ones(C, dtype)
    beta = np.zeros(C, dtype)
    y = np.empty_like(x)
    m2, v2 = np.empty(C), np.empty(C)
    assert K.forward_train(x, y, gamma, beta, EPS, m2, v2, False, 2) == K.OK
    assert np.allclose(v2, want_var, rtol=1e-5, atol=0)
    y_mean, y_var = ref.batch_stats(y.astype(np.float64), axis=1)
    # y's error is bounded by rounding the mean to the dtype: eps * |mean| / std.
    bound = 4 * np.finfo(dtype).eps * offset * 1.5 + 1e-5
    assert np.all(np.abs(y_mean) < bound)
    assert np.allclose(y_var, want_var / (want_var + EPS), rtol=1e-4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [(6, 5, 1), (3, 5, 20)], ids=geometry_id)
def test_nonfinite_inputs_give_status_codes(geometry, dtype, bad):
    rng = np.random.default_rng(5)
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.normal(size=geometry).astype(dtype)
    C = geometry[1]
    mean, var = np.empty(C), np.empty(C)
    K.batch_stats(x, mean, var, 1)
    xb = x.copy()
    xb[1, 2, 0] = bad

    # Training forward: non-finite statistics (1), and y is not written.
    y = np.full_like(x, 42.0)
    m2, v2 = np.empty(C), np.empty(C)
    assert K.forward_train(xb, y, gamma, beta, EPS, m2, v2, False, 1) == K.NONFINITE_STATS
    assert np.all(y == 42.0)
    # Evaluation forward and normalize: non-finite output (2), with and without ReLU
    # (a ReLU must not hide a NaN or -Inf pre-activation).
    for relu in (False, True):
        assert K.forward_eval(xb, np.empty_like(x), mean, var, gamma, beta, EPS, relu, 1) \
            == K.NONFINITE_OUTPUT
        coef = forward_coef(mean, var, gamma, beta, dtype)
        assert K.normalize(xb, np.empty_like(x), coef, relu, 1) == K.NONFINITE_OUTPUT
    # Non-finite statistics or parameters in evaluation.
    for name in ("mean", "var", "gamma", "beta"):
        args = {"mean": mean.copy(), "var": var.copy(), "gamma": gamma.copy(), "beta": beta.copy()}
        args[name][3] = np.nan
        assert K.forward_eval(x, np.empty_like(x), args["mean"], args["var"], args["gamma"],
                              args["beta"], EPS, False, 1) == K.NONFINITE_OUTPUT, name
    gb = gamma.copy()
    gb[0] = bad
    assert K.forward_train(x, np.empty_like(x), gb, beta, EPS, m2, v2, False, 1) \
        == K.NONFINITE_OUTPUT

    # Backward: NaN/Inf in dy gives status 2 and leaves dgamma/dbeta unwritten.
    dyb = dy.copy()
    dyb[0, 1, 0] = bad
    for training in (True, False):
        for need in (True, False):
            dg = np.full(C, 5.0, dtype)
            db = np.full(C, 6.0, dtype)
            status = K.backward(dyb, x, mean, var, gamma, beta, EPS, np.empty_like(x), dg, db,
                                training, need, False, 1)
            assert status == K.NONFINITE_OUTPUT, (training, need)
            assert np.all(dg == 5.0) and np.all(db == 6.0)
    coef = forward_coef(mean, var, gamma, beta, dtype)
    coef6 = backward_coef(coef, mean, var, np.zeros(C), np.zeros(C), 10, False, dtype)
    assert K.backward_apply(dyb, x, coef6, np.empty_like(x), False, 1) == K.NONFINITE_OUTPUT


@pytest.mark.parametrize("geometry", [(6, 2, 1), (3, 2, 20)], ids=geometry_id)
def test_batch_stats_does_not_turn_nonfinite_into_zero_variance(geometry):
    """A NaN, or a float64 batch whose squared deviations overflow, has no finite variance.

    The kernel clamps a negative rounding residue of the variance to 0 with
    ``d if d > 0 else 0``; that clamp must not also map NaN (inf - inf) to 0,
    or forward_train accepts a batch whose variance it could not compute and
    normalizes it with var = 0 (see also test_functional's overflow test).
    """
    C = geometry[1]
    x = np.ones(geometry) * np.arange(1, geometry[0] + 1)[:, None, None]
    x[:, 1, :] = np.linspace(0, 3e200, geometry[0] * geometry[2]).reshape(geometry[0], -1)
    mean, var = np.empty(C), np.empty(C)
    K.batch_stats(x, mean, var, 1)
    assert np.isfinite(var[0])
    assert not np.isfinite(var[1]), f"var of a 1e200-spread channel came out as {var[1]}"
    y = np.empty_like(x)
    status = K.forward_train(x, y, np.ones(C), np.zeros(C), EPS, mean, var, False, 1)
    assert status == K.NONFINITE_STATS


@pytest.mark.parametrize("geometry", [(6, 2, 1), (3, 2, 20)], ids=geometry_id)
def test_batch_stats_of_a_nan_channel_is_nan(geometry):
    """batch_stats reports NaN statistics for a channel holding a NaN, not var = 0."""
    C = geometry[1]
    mean, var = np.empty(C), np.empty(C)
    xn = np.random.default_rng(0).normal(size=geometry)
    xn[1, 0, 0] = np.nan
    K.batch_stats(xn, mean, var, 1)
    assert np.isnan(mean[0]) and np.isnan(var[0]), (mean[0], var[0])


def test_build_info_reports_threads():
    info = K.build_info()
    assert set(info) >= {"openmp", "max_threads", "debug", "sanitized"}
    assert info["max_threads"] >= 1
    assert K.max_threads() == info["max_threads"]


# Row shapes whose elementwise passes take every loop: blocks of two rows (rows under
# 4 KiB, forward) and of four (longer rows, and backward), the rows a half or a quarter
# of the block apart, full vectors and column tails, folded short rows and the
# remainder rows after the last block.
NONFINITE_ROW_SHAPES = [(11, 37, 1), (9, 300, 1), (13, 64, 1), (6, 1030, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NONFINITE_ROW_SHAPES, ids=geometry_id)
def test_a_nonfinite_value_is_caught_wherever_it_lands(dtype, shape):
    """normalize and backward_apply report NaN or infinity in every position of the output.

    Each position holds one bad value in turn (NaN, +inf, -inf alternating) in x for
    normalize and in dy for backward_apply, with and without the fused ReLU (x finite
    there: the mask must not hide a bad dy where it passes it, so x is positive)."""
    rng = np.random.default_rng(seed_of("nonfinite-position", shape, np.dtype(dtype).name))
    outer, C, _ = shape
    x = (rng.uniform(0.5, 2.0, shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean = np.zeros(C)
    var = np.ones(C)
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.uniform(0.5, 1.0, C).astype(dtype)
    coef3 = forward_coef(mean, var, gamma, beta, dtype)
    coef6 = backward_coef(coef3, mean, var, rng.standard_normal(C), rng.standard_normal(C),
                          outer, True, dtype)
    y = np.empty_like(x)
    assert K.normalize(x, y, coef3, False, 1) == K.OK
    assert K.backward_apply(dy, x, coef6, y, True, 1) == K.OK
    bad_values = (np.nan, np.inf, -np.inf)
    for k, (r, c) in enumerate(np.ndindex(outer, C)):
        bad = bad_values[k % 3]
        xb = x.copy()
        xb[r, c, 0] = bad
        relu = bool(k % 2)
        assert K.normalize(xb, y, coef3, relu, 1) == K.NONFINITE_OUTPUT, ("normalize", r, c)
        dyb = dy.copy()
        dyb[r, c, 0] = bad
        assert K.backward_apply(dyb, x, coef6, y, relu, 1) == K.NONFINITE_OUTPUT, (r, c)


def random_coefficients(rng, C, count, dtype):
    """Forward (3, C) and training backward (6, C) coefficient rows for mean 0,
    variance 1 and random gamma, beta and sums."""
    mean, var = np.zeros(C), np.ones(C)
    coef3 = forward_coef(mean, var, rng.uniform(0.5, 2.0, C).astype(dtype),
                         rng.uniform(0.5, 1.0, C).astype(dtype), dtype)
    coef6 = backward_coef(coef3, mean, var, rng.standard_normal(C), rng.standard_normal(C),
                          count, True, dtype)
    return coef3, coef6


def _assert_caught_at_every_position(x, dy, coef3, coef6, statistics, stream=False):
    """normalize (x) and backward_apply (dy) report one NaN, +inf or -inf (in turn)
    at every position, ReLU on and off in turn, streamed or not; with `statistics`,
    forward_train reports the bad x as non-finite statistics too."""
    C = x.shape[1]
    y = np.empty_like(x)
    assert K.normalize(x, y, coef3, False, 1, stream) == K.OK
    assert K.backward_apply(dy, x, coef6, y, True, 1, stream) == K.OK
    gamma = np.ones(C, x.dtype)
    for k, pos in enumerate(np.ndindex(x.shape)):
        bad = (np.nan, np.inf, -np.inf)[k % 3]
        relu = bool(k % 2)
        xb = x.copy()
        xb[pos] = bad
        assert K.normalize(xb, y, coef3, relu, 1, stream) == K.NONFINITE_OUTPUT, \
            ("normalize", pos)
        if statistics:
            m, v = np.empty(C), np.empty(C)
            assert K.forward_train(xb, y, gamma, gamma, EPS, m, v, relu, 1) \
                == K.NONFINITE_STATS, ("statistics", pos)
        dyb = dy.copy()
        dyb[pos] = bad
        assert K.backward_apply(dyb, x, coef6, y, relu, 1, stream) == K.NONFINITE_OUTPUT, pos


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nonfinite_value_in_a_short_run_is_caught_wherever_it_lands(dtype):
    """The same for runs of four values, which the passes take as the rows of the
    (outer, C*inner) view: every (n, c, i) position, each in turn."""
    rng = np.random.default_rng(seed_of("nonfinite-short-runs", np.dtype(dtype).name))
    shape = outer, C, inner = (7, 9, 4)
    x = rng.uniform(0.5, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    coef3, coef6 = random_coefficients(rng, C, outer * inner, dtype)
    _assert_caught_at_every_position(x, dy, coef3, coef6, statistics=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["runs", "rows"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_nonfinite_value_in_a_long_row_is_caught_wherever_it_lands(one_row_budget, dtype,
                                                                      layout, stream):
    """The same for runs and rows of 2-4 KiB, whose passes OR the checks' bits over
    the whole row (CBN_OR_CHECK_BYTES), or stream them in blocks of 1 KiB
    (CBN_STREAM_BLOCK_BYTES): every position of a run (a vector tail included),
    and of rows that normalize and backward's dx pass take one at a time."""
    rng = np.random.default_rng()
    item = np.dtype(dtype).itemsize
    length = int(rng.integers(2048, 4096)) // item
    shape = (2, 3, length) if layout == "runs" else (3, length, 1)
    C = shape[1]
    x = rng.uniform(0.5, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    coef3, coef6 = random_coefficients(rng, C, x.size // C, dtype)
    one_row_budget(1)
    _assert_caught_at_every_position(x, dy, coef3, coef6, statistics=False, stream=stream)


# Arrays whose second passes (training forward's normalize, backward's apply) run in
# several chunks of BACK_CHUNK_BYTES, last chunk first: rows (unfolded and folded)
# and runs, each with a partial chunk.
CHUNKED_SHAPES = [(520, 2063, 1), (9003, 64, 1), (37, 5, 1601)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CHUNKED_SHAPES, ids=geometry_id)
def test_backward_apply_checks_every_chunk(dtype, shape):
    """A bad dy in the first, a middle or the last value of every chunk is reported,
    with ordinary and with streaming stores, and a clean dy after it is not
    (nothing sticks between calls)."""
    rng = np.random.default_rng(seed_of("chunks", shape, np.dtype(dtype).name))
    outer, C, inner = shape
    x = rng.uniform(0.5, 2.0, shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    coef3, coef6 = random_coefficients(rng, C, outer * inner, dtype)
    dx = np.empty_like(x)
    flat = dy.reshape(-1)
    chunk = (1 << 20) // dtype().itemsize  # values per chunk, about
    positions = sorted({0, flat.size - 1, flat.size // 2,
                        *range(chunk - 1, flat.size, chunk), *range(chunk, flat.size, chunk)})
    assert len(positions) >= 5
    for stream in (False, True):
        for k, p in enumerate(positions):
            dyb = dy.copy()
            dyb.reshape(-1)[p] = (np.nan, np.inf, -np.inf)[k % 3]
            status = K.backward_apply(dyb, x, coef6, dx, bool(k % 2), 1, stream)
            assert status == K.NONFINITE_OUTPUT, (p, stream)
        assert K.backward_apply(dy, x, coef6, dx, False, 1, stream) == K.OK


# ---------------------------------------------------------------------------
# Training forward by channel groups (float64, streamed output, not in place)
# ---------------------------------------------------------------------------

# (geometry, channels per group): uneven last groups; two reduction blocks per
# channel, merged; runs longer than RUN_SHIFT_ITEMS, summed in slices.
GROUPED = [((2, 24, 8192), 16), ((3, 20, 10000), 8), ((5, 7, 20000), 2)]


def test_channel_groups_are_taken_only_where_they_pay():
    for geometry, cg in GROUPED:
        assert K.group_channels(*geometry, 8) == cg, geometry
        assert K.group_channels(*geometry, 4) == 0, geometry  # float32: never
    assert K.group_channels(64, 16, 1024, 8) == 0  # an image's part of a group: 32 KiB
    assert K.group_channels(4, 300, 1, 8) == 0  # rows (inner == 1)
    assert K.group_channels(4096, 64, 12, 8) == 0  # short runs, taken as rows
    assert K.group_channels(2, 16, 8192, 8) == 0  # one group would hold every channel


def test_short_runs_are_summed_as_rows_only_where_that_pays():
    # (outer, C, inner) -> (statistics, backward sums) as rows, float32 / float64.
    routes = {
        (8, 2048, 49): ((False, False), (False, False)),  # 196-byte runs, few images
        (16, 512, 49): ((False, False), (False, False)),  # 3 * 16 <= 49
        (17, 512, 49): ((True, False), (False, False)),  # float32: statistics as rows
        (32, 512, 49): ((True, False), (False, False)),  # float64: 392-byte runs, no rows
        (8, 1024, 36): ((False, False), (False, False)),  # 6x6
        (8, 1024, 25): ((True, False), (False, False)),  # float32 5x5: 100-byte runs
        (32, 1024, 25): ((True, True), (True, False)),  # more images than values a run
        (8, 2048, 16): ((True, False), (True, False)),  # 4x4 float64 runs: 128 bytes
        (32, 1024, 16): ((True, True), (True, False)),
        (8, 4096, 9): ((True, True), (True, True)),  # 3x3: rows whatever the batch
        (16, 8192, 4): ((True, True), (True, True)),  # 2x2
        (4, 300, 1): ((False, False), (False, False)),  # rows already (inner == 1)
    }
    for geometry, want in routes.items():
        for item, (stats, sums) in zip((4, 8), want):
            assert K.spread_sums(*geometry, item) == stats, (geometry, item)
            assert K.spread_sums(*geometry, item, True) == sums, (geometry, item)
            if not sums and geometry[2] > 1:  # runs, so channel groups may be taken
                assert K.group_channels(*geometry, item, 2, False) > 0, (geometry, item)
            elif sums:
                assert K.group_channels(*geometry, item, 2, False) == 0, (geometry, item)


def test_channel_groups_fit_the_statistics_stack():
    # _stats_runs keeps a group's sums in CHANNELS_PER_BLOCK (2048) stack slots:
    # (2, 32768, 7, 7) asked for 2674 channels a group and wrote past them.
    assert K.group_channels(2, 32768, 49, 8) == 2048
    assert K.group_channels(4, 17000, 31, 8) == 2048
    rng = np.random.default_rng()
    geometry = (2, int(rng.integers(4200, 6000)), 49)  # two full groups and a short one
    x, gamma, beta = make_batch(rng, geometry, np.float64)
    C = geometry[1]
    y0, m0, v0 = np.empty_like(x), np.empty(C), np.empty(C)
    assert K.forward_train(x, y0, gamma, beta, EPS, m0, v0, False, 1, False) == K.OK
    for n in THREADS:
        y, m, v = np.full_like(x, np.nan), np.empty(C), np.empty(C)
        assert K.forward_train(x, y, gamma, beta, EPS, m, v, False, n, True) == K.OK
        assert np.array_equal(m, m0) and np.array_equal(v, v0), n
        assert np.array_equal(y, y0), n


@pytest.mark.parametrize("which", ["gamma", "beta", "both"])
def test_gamma_or_beta_inside_the_output_takes_two_passes(which):
    # Groups read each group's gamma and beta after earlier groups wrote y: a
    # caller's out= buffer holding them gave y off by up to 43.
    rng = np.random.default_rng()
    geometry = GROUPED[0][0]
    x, gamma, beta = make_batch(rng, geometry, np.float64)
    C = geometry[1]
    want, m0, v0 = np.empty_like(x), np.empty(C), np.empty(C)
    assert K.forward_train(x, want, gamma, beta, EPS, m0, v0, False, 1, True) == K.OK
    for n in THREADS:
        y = np.empty_like(x)
        flat = y.reshape(-1)
        g = flat[:C] if which in ("gamma", "both") else gamma.copy()
        b = flat[rng.integers(1, 4) * C:][:C] if which in ("beta", "both") else beta.copy()
        g[...] = gamma
        b[...] = beta
        m, v = np.empty(C), np.empty(C)
        assert K.forward_train(x, y, g, b, EPS, m, v, False, n, True) == K.OK
        assert np.array_equal(y, want), (which, n)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("geometry", [g for g, _ in GROUPED], ids=geometry_id)
def test_grouped_training_forward_equals_the_two_passes(geometry, relu):
    """Same bits as the statistics pass then normalization, for any thread count."""
    rng = np.random.default_rng(seed_of(geometry, relu, "groups"))
    x, gamma, beta = make_batch(rng, geometry, np.float64)
    x64 = x.copy()
    C = geometry[1]
    want_mean, want_var = ref.batch_stats(x64, axis=1)
    if relu:
        beta = kink_free_beta(x64, want_mean, want_var, gamma, rng)[0]
    y0, m0, v0 = np.full_like(x, np.nan), np.empty(C), np.empty(C)
    assert K.forward_train(x, y0, gamma, beta, EPS, m0, v0, relu, 1, False) == K.OK
    # The reference tolerance of test_composites_match_reference.
    want_y = ref.forward_train(x64, gamma, beta, EPS, axis=1, relu=relu)[0]
    y_scale = np.abs(x64).max() * np.abs(gamma / np.sqrt(want_var + EPS)).max() \
        + np.abs(beta).max()
    cond = 64 * np.finfo(np.float64).eps * stats_scale(x64)[1] / (want_var + EPS)
    assert_close(y0, want_y, np.float64, y_scale, what="y",
                 extra=cond[None, :, None] * np.abs(want_y - beta[None, :, None]))
    for n in THREADS:
        y, m, v = np.full_like(x, np.nan), np.empty(C), np.empty(C)
        assert K.forward_train(x, y, gamma, beta, EPS, m, v, relu, n, True) == K.OK
        assert np.array_equal(m, m0) and np.array_equal(v, v0), f"statistics, {n} threads"
        assert np.array_equal(y, y0), f"y, {n} threads"
    assert np.array_equal(x, x64)


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("geometry", [g for g, _ in GROUPED], ids=geometry_id)
def test_grouped_training_forward_reports_nonfinite_statistics(geometry, where):
    """A NaN in one group is status 1 whatever the other groups find, with that
    channel's statistics NaN and the others' as without it; in place, x is kept."""
    rng = np.random.default_rng(seed_of(geometry, where, "groups-nan"))
    x, gamma, beta = make_batch(rng, geometry, np.float64)
    outer, C, inner = geometry
    c = 0 if where == "first" else C - 1
    clean_m, clean_v = np.empty(C), np.empty(C)
    K.batch_stats(x, clean_m, clean_v, 1)
    x[int(rng.integers(outer)), c, int(rng.integers(inner))] = np.nan
    gamma[C - 1 - c] = 1e308  # another group's output overflows: status 2 there
    for n in THREADS:
        y, m, v = np.empty_like(x), np.empty(C), np.empty(C)
        assert K.forward_train(x, y, gamma, beta, EPS, m, v, False, n, True) \
            == K.NONFINITE_STATS
        assert np.isnan(m[c]) and np.isnan(v[c])
        others = np.arange(C) != c
        assert np.array_equal(m[others], clean_m[others])
        assert np.array_equal(v[others], clean_v[others])
        xi = x.copy()
        assert K.forward_train(xi, xi, gamma, beta, EPS, m, v, False, n, True) \
            == K.NONFINITE_STATS
        assert np.array_equal(xi, x, equal_nan=True), "in place, x was overwritten"


def test_grouped_training_forward_reports_a_nonfinite_output():
    geometry = GROUPED[0][0]
    rng = np.random.default_rng(seed_of(geometry, "groups-inf"))
    x, gamma, beta = make_batch(rng, geometry, np.float64)
    gamma[-1] = 1e308  # |x - mean| * invstd * gamma overflows in the last group
    m, v = np.empty(geometry[1]), np.empty(geometry[1])
    for stream in (False, True):
        y = np.empty_like(x)
        assert K.forward_train(x, y, gamma, beta, EPS, m, v, False, 2, stream) \
            == K.NONFINITE_OUTPUT


# ---------------------------------------------------------------------------
# Training backward by channel groups (feature maps; sums, then dx, group by group)
# ---------------------------------------------------------------------------

@pytest.fixture
def group_budget():
    """Set the backward's group budget for a test (K.set_group_bytes), then restore
    it; long-run channels are not groups alone meanwhile (channel_budget sets that)."""
    before = K.group_bytes(), K.channel_group_bytes()
    K.set_channel_group_bytes(0)
    yield K.set_group_bytes
    K.set_group_bytes(before[0])
    K.set_channel_group_bytes(before[1])


@pytest.fixture
def channel_budget(group_budget):
    """Set the group budget and the long-run channel budget for a test
    (K.set_channel_group_bytes), then restore both."""
    def set_both(group, channel):
        group_budget(group)
        K.set_channel_group_bytes(channel)
    return set_both


def test_backward_groups_are_taken_only_where_they_pay(group_budget):
    group_budget(1 << 18)
    assert K.group_bytes() == 1 << 18
    # The fewest channels that make each image's part of a group 2 KiB, within the budget.
    assert K.group_channels(8, 2048, 196, 4, 2) == 3  # float32 runs of 784 bytes
    assert K.group_channels(8, 2048, 196, 8, 2) == 2  # float64: half as many
    assert K.group_channels(8, 2048, 100, 4, 2) == 6  # 2400 bytes (5 make 2000)
    per_channel = 64 * 49 * 4 * 2  # x and dy of one channel, float32
    assert K.group_channels(64, 512, 49, 4, 2) == (1 << 18) // per_channel == 10  # not 11
    assert K.group_channels(8, 256, 784, 4, 2) == 1  # runs of 3 KiB: a channel a group
    assert K.group_channels(8, 256, 784, 8, 2) == 1
    assert K.group_channels(32, 64, 3136, 4, 2) == 0  # one channel exceeds the budget
    assert K.group_channels(4, 300, 1, 4, 2) == 0  # rows (inner == 1)
    assert K.group_channels(4096, 64, 12, 4, 2) == 0  # short runs, taken as rows
    assert K.group_channels(2, 4, 1024, 4, 2) == 0  # the batch fits twice the budget
    assert K.group_channels(8, 256, 784, 4, 1, False) == 0  # the forward: not by budget
    # A channel beyond the budget is a group by itself where dx streams, if it holds
    # at most 4 MiB of x and dy and each image's run of it is at least 16 KiB.
    assert K.group_channels(32, 64, 3136, 8, 2, True) == 1  # float64 runs of 24.5 KiB
    assert K.group_channels(32, 64, 3136, 8, 2, False) == 0  # dx not streamed
    assert K.group_channels(32, 64, 3136, 4, 2, True) == 0  # float32 runs of 12 KiB
    assert K.group_channels(64, 8, 4096, 8, 2, True) == 1  # 4 MiB of x and dy
    assert K.group_channels(65, 8, 4096, 8, 2, True) == 0  # more than 4 MiB
    # On more than one thread, also channels of up to 2 MiB with runs of 3 KiB and more.
    assert K.group_channels(32, 64, 3136, 4, 2, True, True) == 1  # float32 runs of 12 KiB
    assert K.group_channels(128, 64, 784, 4, 2, True, True) == 1  # runs of 3 KiB
    assert K.group_channels(128, 64, 784, 4, 2, False, True) == 0  # dx not streamed
    assert K.group_channels(128, 64, 700, 4, 2, True, True) == 0  # runs under 3 KiB
    assert K.group_channels(256, 16, 1024, 8, 2, True, True) == 0  # a 4 MiB channel
    group_budget(0)
    assert K.group_channels(8, 256, 784, 4, 2) == 0
    with pytest.raises(ValueError, match="group bytes"):
        K.set_group_bytes(-1)


def test_long_run_channels_are_groups_alone_up_to_their_budget(channel_budget):
    """A channel beyond the group budget whose runs are at least 3 KiB is a group
    by itself while its x and dy fit the channel budget, dx streamed or not."""
    channel_budget(1 << 18, 1 << 20)
    assert K.channel_group_bytes() == 1 << 20
    for stream in (False, True):
        assert K.group_channels(32, 64, 3136, 4, 2, stream) == 1  # 784 KiB, runs of 12 KiB
        assert K.group_channels(64, 16, 1024, 8, 2, stream) == 1  # 1 MiB, runs of 8 KiB
        assert K.group_channels(64, 32, 784, 4, 2, stream) == 1  # runs of 3136 bytes
        assert K.group_channels(64, 32, 760, 4, 2, stream) == 0  # runs of 3040 bytes
        assert K.group_channels(256, 64, 256, 8, 2, stream) == 0  # runs of 2 KiB
        assert K.group_channels(64, 16, 1025, 8, 2, stream) == 0  # over 1 MiB
    assert K.group_channels(64, 32, 784, 4, 1, False) == 0  # the forward: not by budget
    assert K.group_channels(8, 2048, 196, 4, 2) == 3  # within the group budget: as before
    channel_budget(0, 1 << 20)
    assert K.group_channels(32, 64, 3136, 4, 2) == 0  # groups off: none at all
    channel_budget(1 << 18, 0)
    assert K.group_channels(32, 64, 3136, 4, 2) == 0
    with pytest.raises(ValueError, match="channel group bytes"):
        K.set_channel_group_bytes(-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mode", ["training", "frozen"])
def test_a_long_run_channel_alone_equals_the_two_passes(channel_budget, dtype, relu, mode):
    """A channel beyond the group budget with runs of 3 KiB and more, a group by
    itself within the channel budget: the same bits as the two passes (checked
    against the float64 reference by test_composites_match_reference), on any
    thread count, dx streamed or not."""
    rng = np.random.default_rng()
    item = np.dtype(dtype).itemsize
    geometry = (int(rng.integers(2, 6)), int(rng.integers(2, 7)),
                int(rng.integers(3072 // item, 9000 // item)))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.standard_normal(geometry).astype(dtype)
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    args = (dy, x, mean, var, gamma, beta, mode == "training", True, relu)
    channel_budget(0, 0)
    want = _backward_run(*args, 1)
    assert want[0] == K.OK
    per_channel = geometry[0] * geometry[2] * item * 2
    channel_budget(1, per_channel)
    assert K.group_channels(*geometry, item, 2, False) == 1
    _assert_backward_same_bits(want, args, f"{geometry}, a long-run channel per group")


def _backward_run(dy, x, mean, var, gamma, beta, training, need, relu, n, dx=None,
                  stream=False):
    C = x.shape[1]
    dx = np.full_like(x, np.nan) if dx is None else dx
    dg = np.full(C, -7.0, x.dtype)
    db = np.full(C, -7.0, x.dtype)
    status = K.backward(dy, x, mean, var, gamma, beta, EPS, dx, dg, db, training, need, relu,
                        n, stream)
    return status, dx, dg, db


def _assert_backward_same_bits(want, args, context):
    """_backward_run(*args) on 1-3 threads, dx streamed or not: OK and the bits of
    `want` (a successful _backward_run result) in dx, dgamma and dbeta."""
    for n in THREADS:
        for stream in (False, True):
            got = _backward_run(*args, n, stream=stream)
            assert got[0] == K.OK
            for name, a, b in zip(("dx", "dgamma", "dbeta"), got[1:], want[1:]):
                assert np.array_equal(a, b), f"{name}, {context}, {n} threads, stream {stream}"


def _grouped_case(rng, dtype):
    """A random feature-map batch for which a small budget makes 2-6 groups, the
    last one short, with one or two reduction blocks per channel."""
    outer = int(rng.integers(2, 7))
    C = int(rng.integers(5, 23))
    # Runs of 240 B and more (not taken as rows) and under 2 KiB in float64, so that
    # a group may hold several channels (GROUP_STRETCH).
    inner = int(rng.integers(60, 256))
    per_channel = outer * inner * np.dtype(dtype).itemsize * 2
    cg = int(rng.integers(1, max(2, C // 2)))
    return (outer, C, inner), cg * per_channel + int(rng.integers(per_channel))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mode", ["training", "frozen"])
def test_grouped_backward_equals_the_two_passes(group_budget, dtype, relu, mode):
    """Same bits as the sums pass then the dx pass, for any thread count, with
    dx streamed or not; the two passes are checked against the float64
    reference by test_composites_match_reference."""
    rng = np.random.default_rng()
    geometry, budget = _grouped_case(rng, dtype)
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.standard_normal(geometry).astype(dtype)
    C = geometry[1]
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    training = mode == "training"
    group_budget(0)
    want = _backward_run(dy, x, mean, var, gamma, beta, training, True, relu, 1)
    assert want[0] == K.OK
    group_budget(budget)
    cg = K.group_channels(*geometry, np.dtype(dtype).itemsize, 2)
    assert 1 <= cg < C, (geometry, budget)
    _assert_backward_same_bits(want, (dy, x, mean, var, gamma, beta, training, True, relu),
                               f"{geometry}, groups of {cg}")


def _single_channel_case(group_budget, dtype, relu, run_bytes):
    """A batch whose runs are ``run_bytes`` (lo, hi) long, its two-pass backward (no
    groups), and the budget then set to half a channel of x and dy: what a
    single-channel group is checked against. Returns (args, want, geometry)."""
    rng = np.random.default_rng()
    item = np.dtype(dtype).itemsize
    geometry = (int(rng.integers(2, 5)), int(rng.integers(3, 7)),
                int(rng.integers(run_bytes[0] // item, run_bytes[1] // item)))
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.standard_normal(geometry).astype(dtype)
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    args = (dy, x, mean, var, gamma, beta, True, True, relu)
    group_budget(0)
    want = _backward_run(*args, 1)
    assert want[0] == K.OK
    group_budget(geometry[0] * geometry[2] * item)
    return args, want, geometry


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_a_channel_beyond_the_budget_alone_equals_the_two_passes(group_budget, dtype, relu):
    """A channel larger than the group budget is a group by itself when dx streams
    (runs of 16 KiB and more): the same bits as the two passes, on any thread count."""
    args, want, geometry = _single_channel_case(group_budget, dtype, relu, (16384, 24000))
    item = np.dtype(dtype).itemsize
    assert K.group_channels(*geometry, item, 2, True) == 1
    assert K.group_channels(*geometry, item, 2, False) == 0
    _assert_backward_same_bits(want, args, f"{geometry}, one channel per group when streamed")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shorter_channels_alone_on_several_threads_equal_the_two_passes(group_budget, dtype):
    """Runs of 3-16 KiB: whole passes on one thread, a channel per group on more
    (when dx streams); the same bits either way."""
    args, want, geometry = _single_channel_case(group_budget, dtype, False, (3072, 16384))
    item = np.dtype(dtype).itemsize
    assert K.group_channels(*geometry, item, 2, True, False) == 0
    assert K.group_channels(*geometry, item, 2, True, True) == 1
    _assert_backward_same_bits(want, args, f"{geometry}, one channel per group on several "
                                           "threads")


@pytest.mark.parametrize("where", ["first", "last"])
def test_grouped_backward_reports_nonfinite_sums_and_keeps_the_outputs(group_budget, where):
    """A NaN in one group's dy: the status of the two passes, dgamma and dbeta
    untouched; in place (dx is dy), the two passes run and dy is kept."""
    rng = np.random.default_rng()
    dtype = rng.choice([np.float32, np.float64])
    geometry, budget = _grouped_case(rng, dtype)
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.standard_normal(geometry).astype(dtype)
    outer, C, inner = geometry
    c = 0 if where == "first" else C - 1
    dy[int(rng.integers(outer)), c, int(rng.integers(inner))] = np.nan
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    group_budget(0)
    want = _backward_run(dy, x, mean, var, gamma, beta, True, True, False, 1)[0]
    assert want == K.NONFINITE_OUTPUT
    group_budget(budget)
    assert K.group_channels(*geometry, np.dtype(dtype).itemsize, 2) > 0
    for n in THREADS:
        status, _, dg, db = _backward_run(dy, x, mean, var, gamma, beta, True, True, False, n)
        assert status == want, n
        assert np.all(dg == -7) and np.all(db == -7), "parameter gradients written"
        inplace = dy.copy()
        status = _backward_run(inplace, x, mean, var, gamma, beta, True, True, False, n,
                               dx=inplace)[0]
        assert status == want, n
        assert np.array_equal(inplace, dy, equal_nan=True), "in place, dy was overwritten"


def test_grouped_backward_in_place_gives_the_same_numbers(group_budget):
    """dx written over dy takes the two passes: the bits of a separate dx."""
    rng = np.random.default_rng()
    dtype = rng.choice([np.float32, np.float64])
    geometry, budget = _grouped_case(rng, dtype)
    x, gamma, beta = make_batch(rng, geometry, dtype)
    dy = rng.standard_normal(geometry).astype(dtype)
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    group_budget(budget)
    want = _backward_run(dy, x, mean, var, gamma, beta, True, True, True, 2)
    inplace = dy.copy()
    got = _backward_run(inplace, x, mean, var, gamma, beta, True, True, True, 2, dx=inplace)
    assert got[0] == want[0] == K.OK
    for a, b in zip(got[1:], want[1:]):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# The elementwise passes over rows, one at a time (past K.one_row_bytes) or
# several (backward's dx pass four, forward's normalize two)
# ---------------------------------------------------------------------------

@pytest.fixture
def one_row_budget():
    """Set both one-row thresholds, backward's and forward's (K.set_one_row_bytes),
    for a test, then restore them."""
    before = K.one_row_bytes(), K.one_row_bytes(forward=True)

    def set_both(nbytes):
        K.set_one_row_bytes(nbytes)
        K.set_one_row_bytes(nbytes, forward=True)

    yield set_both
    K.set_one_row_bytes(before[0])
    K.set_one_row_bytes(before[1], forward=True)


def _short_row_shape(rng, dtype, layout):
    """A random (outer, C, inner) batch whose rows are under 4 KiB: (N, C) rows,
    short ones that fold into longer ones among them, or short runs (feature
    maps of 2-12 values) that the passes take as rows of the (N, C*H*W) view."""
    item = np.dtype(dtype).itemsize
    outer = int(rng.integers(40, 700))
    if layout == "rows":
        C = int(rng.choice([rng.integers(1, 40), rng.integers(40, 4096 // item)]))
        return (outer, C, 1)
    inner = int(rng.integers(2, 13))
    return (outer, int(rng.integers(1, 4096 // (item * inner))), inner)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["training", "frozen", "frozen-no-grads"])
@pytest.mark.parametrize("layout", ["rows", "short runs"])
def test_backward_rows_one_at_a_time_give_the_same_bits(one_row_budget, dtype, mode, layout):
    """dx one row at a time equals dx four rows at a time, bit for bit (ReLU,
    which keeps four, too), for any thread count, dx streamed or not, in place;
    and without ReLU both match the float64 reference. Rows are (N, C) or channels-last;
    short runs (feature maps of 2-12 values) go as rows of the (N, C*H*W) view."""
    rng = np.random.default_rng()
    shape = _short_row_shape(rng, dtype, layout)
    outer, C = shape[:2]
    x, gamma, beta = make_batch(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    training, need = mode == "training", mode != "frozen-no-grads"
    for relu in (False, True):
        one_row_budget(0)
        want = _backward_run(dy, x, mean, var, gamma, beta, training, need, relu, 1)
        assert want[0] == K.OK
        one_row_budget(1)  # every batch exceeds it
        _assert_backward_same_bits(want, (dy, x, mean, var, gamma, beta, training, need, relu),
                                   f"({outer}, {C}), relu {relu}")
        for n in THREADS:
            inplace = dy.copy()
            got = _backward_run(inplace, x, mean, var, gamma, beta, training, need, relu, n,
                                dx=inplace)
            assert got[0] == K.OK and np.array_equal(inplace, want[1]), (outer, C, relu, n)
        if relu:
            # A float64 reference masks values within rounding of the kink other
            # than the float32 pass does, which moves a whole channel's sums;
            # test_relu_backward_masks_where_the_forward_clipped covers the mask.
            continue
        d64 = [v.astype(np.float64) for v in (dy, x, gamma, beta)]
        if training:
            dx_ref, dg_ref, db_ref = ref.backward_train(*d64, eps=EPS, relu=relu)
        else:
            dx_ref, dg_ref, db_ref = ref.backward_eval(d64[0], d64[1], mean, var, *d64[2:],
                                                       eps=EPS, relu=relu)
        tol = 2e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(want[1], dx_ref, rtol=tol, atol=tol)
        if need:
            np.testing.assert_allclose(want[2], dg_ref, rtol=tol, atol=tol * outer)
            np.testing.assert_allclose(want[3], db_ref, rtol=tol, atol=tol * outer)


def test_backward_rows_one_at_a_time_report_nonfinite_dx(one_row_budget):
    """An infinite dy in one row: the status of the four-row pass, and dgamma and
    dbeta untouched."""
    rng = np.random.default_rng()
    dtype = rng.choice([np.float32, np.float64])
    outer, C = int(rng.integers(40, 400)), int(rng.integers(1, 300))
    x, gamma, beta = make_batch(rng, (outer, C, 1), dtype)
    dy = rng.standard_normal((outer, C, 1)).astype(dtype)
    dy[int(rng.integers(outer)), int(rng.integers(C)), 0] = np.inf
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    one_row_budget(0)
    want = _backward_run(dy, x, mean, var, gamma, beta, False, False, False, 1)[0]
    assert want == K.NONFINITE_OUTPUT
    one_row_budget(1)
    for n in THREADS:
        status, _, dg, db = _backward_run(dy, x, mean, var, gamma, beta, False, False, False, n)
        assert status == want and np.all(dg == -7) and np.all(db == -7), n


def _forward_runs(x, gamma, beta, rmean, rvar, coef, relu, n, stream, in_place=False):
    """Outputs of forward_train (y, mean, var), forward_eval and normalize."""
    outs = []
    for call in ("train", "eval", "normalize"):
        y = x.copy() if in_place else np.full_like(x, np.nan)
        src = y if in_place else x
        if call == "train":
            mean, var = np.empty(x.shape[1]), np.empty(x.shape[1])
            assert K.forward_train(src, y, gamma, beta, EPS, mean, var, relu, n, stream) == K.OK
            outs += [y, mean, var]
        elif call == "eval":
            assert K.forward_eval(src, y, rmean, rvar, gamma, beta, EPS, relu, n, stream) == K.OK
            outs.append(y)
        else:
            assert K.normalize(src, y, coef, relu, n, stream) == K.OK
            outs.append(y)
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["rows", "short runs"])
def test_forward_rows_one_at_a_time_give_the_same_bits(one_row_budget, dtype, layout):
    """Training forward, evaluation and normalize one row at a time (folded to
    4 KiB) equal two rows at a time, bit for bit (ReLU, which keeps two, too),
    for any thread count, streamed or not, in place; and without ReLU they match
    the float64 reference. Rows are (N, C) or channels-last; short runs (feature
    maps of 2-12 values) go as rows of the (N, C*H*W) view."""
    rng = np.random.default_rng()
    shape = _short_row_shape(rng, dtype, layout)
    C = shape[1]
    x, gamma, beta = make_batch(rng, shape, dtype)
    x64 = x.astype(np.float64)
    mean, var = ref.batch_stats(x64, axis=1)
    rmean = mean + rng.normal(size=C) * 0.1
    rvar = var * rng.uniform(0.8, 1.2, size=C)
    coef = forward_coef(rmean, rvar, gamma, beta, dtype)
    for relu in (False, True):
        one_row_budget(0)
        want = _forward_runs(x, gamma, beta, rmean, rvar, coef, relu, 1, False)
        one_row_budget(1)  # every batch exceeds it
        for n in THREADS:
            for stream in (False, True):
                for in_place in (False, True):
                    got = _forward_runs(x, gamma, beta, rmean, rvar, coef, relu, n, stream,
                                        in_place)
                    for name, a, b in zip(("train y", "mean", "var", "eval y", "normalize"),
                                          got, want):
                        assert np.array_equal(a, b), (shape, relu, n, stream, in_place, name)
        if relu:
            continue
        g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
        a64 = g64 / np.sqrt(rvar + EPS)
        scale = np.abs(x64).max() * np.abs(a64).max() + np.abs(b64).max()
        want_eval = ref.forward_eval(x64, rmean, rvar, g64, b64, EPS, axis=1)
        assert_close(want[3], want_eval, dtype, scale, what="eval y")
        assert_close(want[4], want_eval, dtype, scale, what="normalize y")
        # Training y against the float64 reference: test_composites_match_reference.


def test_one_row_budgets_are_apart_and_refuse_negative(one_row_budget):
    one_row_budget(12345)
    K.set_one_row_bytes(678, forward=True)
    assert (K.one_row_bytes(), K.one_row_bytes(forward=True)) == (12345, 678)
    for forward in (False, True):
        with pytest.raises(ValueError, match="one-row bytes"):
            K.set_one_row_bytes(-1, forward=forward)
    assert (K.one_row_bytes(), K.one_row_bytes(forward=True)) == (12345, 678)



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", [(4, 6, 1000), (3, 5, 37), (64, 16, 1), (50, 300, 1)],
                         ids=geometry_id)
def test_relu_backward_masks_where_the_forward_clipped(dtype, geometry):
    """The fused ReLU's backward recomputes the forward's pre-activation from x; its
    mask must be the forward's y > 0 bit for bit, also for pre-activations within
    rounding of 0 (vector loops, their scalar tails and channel groups alike)."""
    rng = np.random.default_rng()
    outer, C, inner = geometry
    # Values on a coarse grid, so that many share the value whose pre-activation
    # beta puts at (about) 0.
    x = (rng.integers(-8, 9, geometry) / 4 * rng.uniform(0.5, 2, (1, C, 1))
         + rng.uniform(-2, 2, (1, C, 1))).astype(dtype)
    gamma = (rng.choice([-1.0, 1.0], C) * rng.uniform(0.5, 2.0, C)).astype(dtype)
    mean, var = ref.batch_stats(x.astype(np.float64), axis=1)
    a = gamma.astype(np.float64) / np.sqrt(var + EPS)
    pick = x[0, np.arange(C), rng.integers(inner, size=C)].astype(np.float64)
    beta = (-(pick - mean) * a).astype(dtype)
    y, m, v = np.empty_like(x), np.empty(C), np.empty(C)
    assert K.forward_train(x, y, gamma, beta, EPS, m, v, True, 1, False) == K.OK
    dy = rng.standard_normal(geometry).astype(dtype)
    g = dy.astype(np.float64) * (y > 0)
    xhat = (x.astype(np.float64) - m[None, :, None]) / np.sqrt(v + EPS)[None, :, None]
    M = outer * inner
    dbeta = g.sum(axis=(0, 2))
    dgamma = (g * xhat).sum(axis=(0, 2))
    want = (gamma.astype(np.float64) / np.sqrt(v + EPS))[None, :, None] * (
        g - dbeta[None, :, None] / M - xhat * dgamma[None, :, None] / M)
    scale = np.abs(want).max() + np.abs(dy).max()
    tol = (1e-4 if dtype == np.float32 else 1e-11) * scale
    for n in THREADS:
        dx = np.full_like(x, np.nan)
        dg, db = np.empty(C, dtype), np.empty(C, dtype)
        assert K.backward(dy, x, m, v, gamma, beta, EPS, dx, dg, db, True, True, True, n,
                          False) == K.OK
        err = np.abs(dx - want)
        assert err.max() <= tol, (n, np.argwhere(err > tol)[:5], err.max(), tol)
        np.testing.assert_allclose(db, dbeta, rtol=0, atol=tol * M)


def _primitive_calls(shape, dtype=np.float32, y_shape=None, C_vec=None, coef_rows=None):
    """Each primitive called on x of `shape`, with its 3-d outputs of `y_shape` and
    its per-channel arrays of `C_vec` values (both default to x's), the
    coefficient tables of `coef_rows` rows (default: what each takes)."""
    rng = np.random.default_rng()
    x = rng.standard_normal(shape).astype(dtype)
    y = np.empty(y_shape or shape, dtype)
    n = shape[1] if C_vec is None else C_vec

    def vec():
        return rng.uniform(0.5, 2, n)

    def par():
        return vec().astype(dtype)

    def coef(rows):
        return rng.standard_normal((coef_rows or rows, shape[1])).astype(dtype)

    return {
        "batch_stats": lambda: K.batch_stats(x, vec(), vec()),
        "normalize": lambda: K.normalize(x, y, coef(3)),
        "backward_reduce": lambda: K.backward_reduce(x, x, vec(), coef(3), vec(), vec()),
        "backward_apply": lambda: K.backward_apply(x, x, coef(6), y),
        "forward_train": lambda: K.forward_train(x, y, par(), par(), EPS, vec(), vec()),
        "forward_eval": lambda: K.forward_eval(x, y, vec(), vec(), par(), par(), EPS),
        "backward": lambda: K.backward(x, x, vec(), vec(), par(), par(), EPS, y, par(), par(),
                                       True),
    }


PRIMITIVES = list(_primitive_calls((2, 3, 4)))
WITH_3D_OUTPUT = ["normalize", "backward_apply", "forward_train", "forward_eval", "backward"]
WITH_VECTORS = ["batch_stats", "backward_reduce", "forward_train", "forward_eval", "backward"]


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("shape", [(2, 0, 600), (0, 3, 600), (2, 3, 0), (2, 0, 1), (0, 3, 1)])
def test_primitives_refuse_an_empty_batch(name, shape):
    """An empty x is refused by name (the kernels would divide by zero: a crash)."""
    with pytest.raises(ValueError, match=rf"{name}: x is empty"):
        _primitive_calls(shape)[name]()


@pytest.mark.parametrize("name", WITH_3D_OUTPUT)
@pytest.mark.parametrize("y_shape", [(4, 3, 599), (3, 3, 600), (4, 2, 600), (2, 3, 1200)])
def test_primitives_refuse_an_output_of_another_shape(name, y_shape):
    """A 3-d output that does not match x, even of as many or more values, is refused
    before anything is written (the kernels would write past a short one)."""
    calls = _primitive_calls((4, 3, 600), y_shape=y_shape)
    with pytest.raises(ValueError, match=rf"{name}: arrays of shape .* do not match"):
        calls[name]()


@pytest.mark.parametrize("name", WITH_VECTORS)
@pytest.mark.parametrize("n", [2, 4])
def test_primitives_refuse_per_channel_arrays_of_another_length(name, n):
    with pytest.raises(ValueError, match=rf"{name}: per-channel arrays must have 3 values"):
        _primitive_calls((4, 3, 5), C_vec=n)[name]()


@pytest.mark.parametrize("name", ["normalize", "backward_reduce", "backward_apply"])
@pytest.mark.parametrize("rows", [2, 7])
def test_primitives_refuse_a_coefficient_table_of_another_shape(name, rows):
    with pytest.raises(ValueError, match=rf"{name}: coef must have shape"):
        _primitive_calls((4, 3, 5), coef_rows=rows)[name]()


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitives_take_matching_arrays(name):
    """The checks let through what they should: every primitive runs (status 0)."""
    assert _primitive_calls((4, 3, 5))[name]() == 0

