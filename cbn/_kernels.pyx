# Design of this module
# =====================
# Every batch-norm input reaches these kernels as a C-contiguous view of shape
# (outer, C, inner): the channel axis in the middle, everything before it folded
# into `outer`, everything after it into `inner` (cbn.functional builds the view).
# Two loop shapes follow from that:
#
# * inner == 1 (dense (N, C) and channels-last): each row holds all C channels,
#   so loops run along the row and vectorize across channels;
# * inner > 1 (NCHW and friends): each (n, c) pair owns a contiguous run of
#   `inner` values, so loops run along the run and vectorize within it.
#
# The primitives (each one pass over the memory it must touch):
#   batch_stats     x -> per-channel mean and biased variance     (reads x)
#   normalize       y = (x - m) * a + b, optional fused ReLU       (reads x, writes y)
#   backward_reduce sum(g), sum(g * (x - mean)), g = masked dy     (reads dy, x)
#   backward_apply  dx = a*g + kx*(x - m) + k0                     (reads dy, x, writes dx)
#   ema_update      running statistics from batch statistics      (C-sized)
# and the composites forward_train / forward_eval / backward chain them inside
# one nogil region, to keep the per-call overhead of small batches low.
#
# Numerics. Sums are kept in double. Reductions run over fixed blocks of the
# outer axis whose geometry depends only on the shape, never on the thread
# count; each block's statistics are shifted by the block's first value (so the
# sum of squares does not cancel catastrophically) and the blocks are merged in
# a fixed order with the pairwise update of Chan, Golub & LeVeque (1979). Hence
# results are bit-identical for a given input whatever the number of threads.
# Inner loops accumulate into LANES independent partial sums, which lets the
# compiler vectorize them without reassociating floating-point additions.
#
# Trust runs one way: these functions check nothing. cbn.functional validates
# shapes, dtypes, contiguity and values before calling them.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, isfinite
from libc.stdlib cimport malloc, free

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int cbn_max_threads(void) { return omp_get_max_threads(); }
    static int cbn_has_openmp(void) { return 1; }
    #else
    static int cbn_max_threads(void) { return 1; }
    static int cbn_has_openmp(void) { return 0; }
    #endif
    #ifdef CBN_DEBUG_BUILD
    static int cbn_debug_build(void) { return 1; }
    #else
    static int cbn_debug_build(void) { return 0; }
    #endif
    #ifdef CBN_SANITIZED
    static int cbn_sanitized(void) { return 1; }
    #else
    static int cbn_sanitized(void) { return 0; }
    #endif
    """
    int cbn_max_threads() noexcept nogil
    int cbn_has_openmp() noexcept nogil
    int cbn_debug_build() noexcept nogil
    int cbn_sanitized() noexcept nogil


cdef enum:
    LANES = 16                  # independent partial sums in a vectorized run
    ROWS_PER_BLOCK = 256        # inner == 1: rows reduced into one partial
    CHANNELS_PER_BLOCK = 256    # inner == 1: channels handled by one task
    ELEMENTS_PER_BLOCK = 16384  # inner > 1: target values per reduction block
    ELEMENTS_PER_TASK = 8192    # inner == 1: target values per elementwise task

# Status codes of the composites; cbn.functional turns them into exceptions.
cdef enum:
    STATUS_OK = 0
    STATUS_NONFINITE_STATS = 1
    STATUS_NONFINITE_OUTPUT = 2
    STATUS_NO_MEMORY = 3

OK = STATUS_OK
NONFINITE_STATS = STATUS_NONFINITE_STATS
NONFINITE_OUTPUT = STATUS_NONFINITE_OUTPUT
NO_MEMORY = STATUS_NO_MEMORY


def build_info():
    """Describe the compiled module.

    Returns
    -------
    dict
        ``openmp`` (compiled with OpenMP), ``max_threads`` (what OpenMP would
        use now, honouring ``OMP_NUM_THREADS`` and threadpoolctl), ``debug``
        (bounds-checked ``CBN_DEBUG=1`` build) and ``sanitized`` (built with
        AddressSanitizer/UBSan).
    """
    return {
        "openmp": bool(cbn_has_openmp()),
        "max_threads": int(cbn_max_threads()),
        "debug": bool(cbn_debug_build()),
        "sanitized": bool(cbn_sanitized()),
    }


def max_threads():
    """Number of threads OpenMP would use now (1 without OpenMP)."""
    return int(cbn_max_threads())


# ---------------------------------------------------------------------------
# Block geometry: a function of the shape only, so reductions are reproducible.
# ---------------------------------------------------------------------------

cdef struct Geometry:
    Py_ssize_t outer
    Py_ssize_t channels
    Py_ssize_t inner
    Py_ssize_t outer_per_block      # reduction block length along `outer`
    Py_ssize_t n_outer_blocks
    Py_ssize_t channels_per_block   # 1 when inner > 1
    Py_ssize_t n_channel_blocks


cdef inline Geometry _geometry(Py_ssize_t outer, Py_ssize_t channels,
                               Py_ssize_t inner) noexcept nogil:
    cdef Geometry g
    g.outer = outer
    g.channels = channels
    g.inner = inner
    if inner == 1:
        g.outer_per_block = ROWS_PER_BLOCK
        g.channels_per_block = CHANNELS_PER_BLOCK
    else:
        g.outer_per_block = ELEMENTS_PER_BLOCK // inner
        if g.outer_per_block < 1:
            g.outer_per_block = 1
        g.channels_per_block = 1
    g.n_outer_blocks = (outer + g.outer_per_block - 1) // g.outer_per_block
    g.n_channel_blocks = (channels + g.channels_per_block - 1) // g.channels_per_block
    return g


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# ---------------------------------------------------------------------------
# batch_stats
# ---------------------------------------------------------------------------

cdef void _stats_rows(const floating* x, Py_ssize_t rows, Py_ssize_t channels,
                      Py_ssize_t c0, Py_ssize_t c1,
                      double* mean_out, double* m2_out) noexcept nogil:
    """Shifted sums of rows [0, rows) for channels [c0, c1) (inner == 1)."""
    cdef double shift[CHANNELS_PER_BLOCK]
    cdef double s1[CHANNELS_PER_BLOCK]
    cdef double s2[CHANNELS_PER_BLOCK]
    cdef Py_ssize_t width = c1 - c0, r, j
    cdef const floating* row = x + c0
    cdef double d
    for j in range(width):
        shift[j] = row[j]
        s1[j] = 0.0
        s2[j] = 0.0
    for r in range(rows):
        row = x + r * channels + c0
        for j in range(width):
            d = <double>row[j] - shift[j]
            s1[j] += d
            s2[j] += d * d
    for j in range(width):
        mean_out[c0 + j] = shift[j] + s1[j] / rows
        d = s2[j] - s1[j] * s1[j] / rows
        m2_out[c0 + j] = d if d > 0.0 else 0.0


cdef void _stats_runs(const floating* x, const Geometry* g, Py_ssize_t n0,
                      Py_ssize_t n1, Py_ssize_t c,
                      double* mean_out, double* m2_out) noexcept nogil:
    """Shifted sums of the runs (n, c, :) for n in [n0, n1) (inner > 1)."""
    cdef double a1[LANES]
    cdef double a2[LANES]
    cdef Py_ssize_t inner = g.inner, n, i, j
    cdef Py_ssize_t body = inner - inner % LANES
    cdef Py_ssize_t ib
    cdef const floating* run
    cdef double shift = x[(n0 * g.channels + c) * inner]
    cdef double d, s1 = 0.0, s2 = 0.0, count
    for j in range(LANES):
        a1[j] = 0.0
        a2[j] = 0.0
    for n in range(n0, n1):
        run = x + (n * g.channels + c) * inner
        for ib in range(body // LANES):
            i = ib * LANES
            for j in range(LANES):
                d = <double>run[i + j] - shift
                a1[j] += d
                a2[j] += d * d
        for i in range(body, inner):
            d = <double>run[i] - shift
            a1[i - body] += d
            a2[i - body] += d * d
    for j in range(LANES):
        s1 += a1[j]
        s2 += a2[j]
    count = <double>((n1 - n0) * inner)
    mean_out[c] = shift + s1 / count
    d = s2 - s1 * s1 / count
    m2_out[c] = d if d > 0.0 else 0.0


cdef inline void _stats_task(const floating* x, const Geometry* g, Py_ssize_t task,
                             double* part_mean, double* part_m2) noexcept nogil:
    cdef Py_ssize_t ob = task // g.n_channel_blocks
    cdef Py_ssize_t cb = task % g.n_channel_blocks
    cdef Py_ssize_t n0 = ob * g.outer_per_block
    cdef Py_ssize_t n1 = _min(n0 + g.outer_per_block, g.outer)
    cdef Py_ssize_t c0 = cb * g.channels_per_block
    cdef Py_ssize_t c1 = _min(c0 + g.channels_per_block, g.channels)
    part_mean += ob * g.channels
    part_m2 += ob * g.channels
    if g.inner == 1:
        _stats_rows(x + n0 * g.channels, n1 - n0, g.channels, c0, c1, part_mean, part_m2)
    else:
        _stats_runs(x, g, n0, n1, c0, part_mean, part_m2)


cdef void _merge_stats(const Geometry* g, const double* part_mean, const double* part_m2,
                       double* mean_out, double* var_out) noexcept nogil:
    """Merge block statistics in block order (Chan, Golub & LeVeque 1979)."""
    cdef Py_ssize_t c, b, block_rows
    cdef double n_a, n_b, n, mean, m2, delta
    for c in range(g.channels):
        mean = part_mean[c]
        m2 = part_m2[c]
        n_a = <double>(_min(g.outer_per_block, g.outer) * g.inner)
        for b in range(1, g.n_outer_blocks):
            block_rows = _min(g.outer_per_block, g.outer - b * g.outer_per_block)
            n_b = <double>(block_rows * g.inner)
            n = n_a + n_b
            delta = part_mean[b * g.channels + c] - mean
            mean = mean + delta * (n_b / n)
            m2 = m2 + part_m2[b * g.channels + c] + delta * delta * (n_a * n_b / n)
            n_a = n
        mean_out[c] = mean
        var_out[c] = m2 / n_a


cdef int _batch_stats(const floating* x, const Geometry* g, double* mean_out,
                      double* var_out, int n_threads) noexcept nogil:
    """Per-channel mean and biased variance; returns a status code."""
    cdef Py_ssize_t n_tasks = g.n_outer_blocks * g.n_channel_blocks, t
    cdef double* part = <double*>malloc(2 * g.n_outer_blocks * g.channels * sizeof(double))
    if part == NULL:
        return STATUS_NO_MEMORY
    for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                    use_threads_if=n_threads > 1 and n_tasks > 1):
        _stats_task(x, g, t, part, part + g.n_outer_blocks * g.channels)
    _merge_stats(g, part, part + g.n_outer_blocks * g.channels, mean_out, var_out)
    free(part)
    return STATUS_OK


# ---------------------------------------------------------------------------
# normalize: y = (x - m) * a + b, per channel, optionally followed by ReLU.
# The centred form keeps float32 accurate when |mean| >> std. Every task also
# accumulates z - z, which stays 0 unless some z is NaN or infinite: a free
# check (the loop is memory-bound) that no garbage leaves the kernel.
# ---------------------------------------------------------------------------

cdef inline floating _affine(floating x, floating m, floating a, floating b) noexcept nogil:
    # One definition shared by forward and backward, so the ReLU mask that
    # backward recomputes is bit-for-bit the one forward applied.
    return (x - m) * a + b


cdef int _normalize_rows(const floating* x, floating* y, Py_ssize_t rows,
                         Py_ssize_t channels, const floating* m, const floating* a,
                         const floating* b, bint relu) noexcept nogil:
    """inner == 1: coefficients vary along the row; returns 1 if any z is non-finite."""
    cdef floating chk[LANES]
    cdef Py_ssize_t r, c, j, body = channels - channels % LANES
    cdef Py_ssize_t ib
    cdef floating z
    for j in range(LANES):
        chk[j] = 0
    for r in range(rows):
        for ib in range(body // LANES):
            c = ib * LANES
            for j in range(LANES):
                z = _affine(x[c + j], m[c + j], a[c + j], b[c + j])
                chk[j] += z - z
                y[c + j] = (z if z > 0 else 0) if relu else z
        for c in range(body, channels):
            z = _affine(x[c], m[c], a[c], b[c])
            chk[c - body] += z - z
            y[c] = (z if z > 0 else 0) if relu else z
        x += channels
        y += channels
    return _any_nonzero(chk)


cdef int _normalize_run(const floating* x, floating* y, Py_ssize_t n, floating m,
                        floating a, floating b, bint relu) noexcept nogil:
    """inner > 1: one channel's contiguous run; returns 1 if any z is non-finite."""
    cdef floating chk[LANES]
    cdef Py_ssize_t i, j, body = n - n % LANES
    cdef Py_ssize_t ib
    cdef floating z
    for j in range(LANES):
        chk[j] = 0
    if relu:
        for ib in range(body // LANES):
            i = ib * LANES
            for j in range(LANES):
                z = _affine(x[i + j], m, a, b)
                chk[j] += z - z
                y[i + j] = z if z > 0 else 0
    else:
        for ib in range(body // LANES):
            i = ib * LANES
            for j in range(LANES):
                z = _affine(x[i + j], m, a, b)
                chk[j] += z - z
                y[i + j] = z
    for i in range(body, n):
        z = _affine(x[i], m, a, b)
        chk[i - body] += z - z
        y[i] = (z if z > 0 else 0) if relu else z
    return _any_nonzero(chk)


cdef inline int _any_nonzero(const floating* chk) noexcept nogil:
    cdef Py_ssize_t j
    cdef int bad = 0
    for j in range(LANES):
        bad |= chk[j] != 0
    return bad


cdef inline Py_ssize_t _rows_per_task(Py_ssize_t channels) noexcept nogil:
    cdef Py_ssize_t rows = ELEMENTS_PER_TASK // channels
    return rows if rows > 0 else 1


cdef int _normalize(const floating* x, floating* y, const Geometry* g,
                    const floating* coef, bint relu, int n_threads) noexcept nogil:
    """Apply the per-channel affine map; coef holds rows m, a, b. Returns a status."""
    cdef Py_ssize_t C = g.channels, t, n_tasks, rows, r0
    cdef const floating* m = coef
    cdef const floating* a = coef + C
    cdef const floating* b = coef + 2 * C
    cdef int bad = 0
    if g.inner == 1:
        rows = _rows_per_task(C)
        n_tasks = (g.outer + rows - 1) // rows
        for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and n_tasks > 1):
            r0 = t * rows
            bad += _normalize_rows(x + r0 * C, y + r0 * C, _min(rows, g.outer - r0),
                                   C, m, a, b, relu)
    else:
        n_tasks = g.outer * C
        for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and n_tasks > 1):
            bad += _normalize_run(x + t * g.inner, y + t * g.inner, g.inner,
                                  m[t % C], a[t % C], b[t % C], relu)
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef int _forward_coefficients(const Geometry* g, const double* mean, const double* invstd,
                               const floating* gamma, const floating* beta,
                               floating* coef) noexcept nogil:
    """coef rows m, a, b with a = gamma*invstd; returns 1 if any is non-finite."""
    cdef Py_ssize_t C = g.channels, c
    cdef double a
    cdef int bad = 0
    for c in range(C):
        a = gamma[c] * invstd[c]
        coef[c] = <floating>mean[c]
        coef[C + c] = <floating>a
        coef[2 * C + c] = beta[c]
        bad |= not (isfinite(coef[c]) and isfinite(coef[C + c]) and isfinite(coef[2 * C + c]))
    return bad


# ---------------------------------------------------------------------------
# backward_reduce: sum(g) and sum(g * (x - mean)) per channel, g = dy masked by
# the fused ReLU (recomputed from x, so no mask array is ever stored).
# ---------------------------------------------------------------------------

cdef inline floating _masked(floating dy, floating x, floating m, floating a, floating b,
                             bint relu) noexcept nogil:
    if relu and not (_affine(x, m, a, b) > 0):
        return 0
    return dy


cdef void _reduce_rows(const floating* dy, const floating* x, Py_ssize_t rows,
                       Py_ssize_t channels, Py_ssize_t c0, Py_ssize_t c1,
                       const double* mean, const floating* coef, bint relu,
                       double* sum_g_out, double* sum_gd_out) noexcept nogil:
    cdef double s1[CHANNELS_PER_BLOCK]
    cdef double s2[CHANNELS_PER_BLOCK]
    cdef double mu[CHANNELS_PER_BLOCK]
    cdef Py_ssize_t width = c1 - c0, r, j, off
    cdef const floating* m = coef + c0
    cdef const floating* a = coef + channels + c0
    cdef const floating* b = coef + 2 * channels + c0
    cdef double gv
    for j in range(width):
        s1[j] = 0.0
        s2[j] = 0.0
        mu[j] = mean[c0 + j]
    for r in range(rows):
        off = r * channels + c0
        for j in range(width):
            gv = _masked(dy[off + j], x[off + j], m[j], a[j], b[j], relu)
            s1[j] += gv
            s2[j] += gv * (<double>x[off + j] - mu[j])
    for j in range(width):
        sum_g_out[c0 + j] = s1[j]
        sum_gd_out[c0 + j] = s2[j]


cdef void _reduce_runs(const floating* dy, const floating* x, const Geometry* g,
                       Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t c, double mu,
                       floating m, floating a, floating b, bint relu,
                       double* sum_g_out, double* sum_gd_out) noexcept nogil:
    cdef double a1[LANES]
    cdef double a2[LANES]
    cdef Py_ssize_t inner = g.inner, n, i, j, off
    cdef Py_ssize_t body = inner - inner % LANES
    cdef Py_ssize_t ib
    cdef double gv, s1 = 0.0, s2 = 0.0
    for j in range(LANES):
        a1[j] = 0.0
        a2[j] = 0.0
    for n in range(n0, n1):
        off = (n * g.channels + c) * inner
        for ib in range(body // LANES):
            i = ib * LANES
            for j in range(LANES):
                gv = _masked(dy[off + i + j], x[off + i + j], m, a, b, relu)
                a1[j] += gv
                a2[j] += gv * (<double>x[off + i + j] - mu)
        for i in range(body, inner):
            gv = _masked(dy[off + i], x[off + i], m, a, b, relu)
            a1[i - body] += gv
            a2[i - body] += gv * (<double>x[off + i] - mu)
    for j in range(LANES):
        s1 += a1[j]
        s2 += a2[j]
    sum_g_out[c] = s1
    sum_gd_out[c] = s2


cdef inline void _reduce_task(const floating* dy, const floating* x, const Geometry* g,
                              Py_ssize_t task, const double* mean, const floating* coef,
                              bint relu, double* part_g, double* part_gd) noexcept nogil:
    cdef Py_ssize_t C = g.channels
    cdef Py_ssize_t ob = task // g.n_channel_blocks
    cdef Py_ssize_t cb = task % g.n_channel_blocks
    cdef Py_ssize_t n0 = ob * g.outer_per_block
    cdef Py_ssize_t n1 = _min(n0 + g.outer_per_block, g.outer)
    cdef Py_ssize_t c0 = cb * g.channels_per_block
    cdef Py_ssize_t c1 = _min(c0 + g.channels_per_block, C)
    part_g += ob * C
    part_gd += ob * C
    if g.inner == 1:
        _reduce_rows(dy + n0 * C, x + n0 * C, n1 - n0, C, c0, c1, mean, coef, relu,
                     part_g, part_gd)
    else:
        _reduce_runs(dy, x, g, n0, n1, c0, mean[c0], coef[c0], coef[C + c0],
                     coef[2 * C + c0], relu, part_g, part_gd)


cdef int _backward_reduce(const floating* dy, const floating* x, const Geometry* g,
                          const double* mean, const floating* coef, bint relu,
                          double* sum_g_out, double* sum_gd_out,
                          int n_threads) noexcept nogil:
    """Per-channel sum(g) and sum(g*(x-mean)); coef rows m, a, b give the ReLU mask."""
    cdef Py_ssize_t n_tasks = g.n_outer_blocks * g.n_channel_blocks, t, c, blk
    cdef Py_ssize_t C = g.channels, size = g.n_outer_blocks * C
    cdef double* part = <double*>malloc(2 * size * sizeof(double))
    cdef double s1, s2
    if part == NULL:
        return STATUS_NO_MEMORY
    for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                    use_threads_if=n_threads > 1 and n_tasks > 1):
        _reduce_task(dy, x, g, t, mean, coef, relu, part, part + size)
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for blk in range(g.n_outer_blocks):
            s1 += part[blk * C + c]
            s2 += part[size + blk * C + c]
        sum_g_out[c] = s1
        sum_gd_out[c] = s2
    free(part)
    return STATUS_OK


# ---------------------------------------------------------------------------
# backward_apply: dx = a*g + kx*(x - m) + k0 per channel. Training has
# kx = -a*invstd^2*sum(g*(x-mean))/M and k0 = -a*sum(g)/M (+ a correction for
# m being mean rounded to the dtype); evaluation has kx = k0 = 0.
# coef rows: m, a, b (forward, for the mask), kx, k0.
# ---------------------------------------------------------------------------

cdef int _apply_rows(const floating* dy, const floating* x, floating* dx,
                     Py_ssize_t rows, Py_ssize_t channels, const floating* coef,
                     bint relu) noexcept nogil:
    cdef floating chk[LANES]
    cdef const floating* m = coef
    cdef const floating* a = coef + channels
    cdef const floating* b = coef + 2 * channels
    cdef const floating* kx = coef + 3 * channels
    cdef const floating* k0 = coef + 4 * channels
    cdef Py_ssize_t r, c, j, body = channels - channels % LANES
    cdef Py_ssize_t ib
    cdef floating gv, v
    for j in range(LANES):
        chk[j] = 0
    for r in range(rows):
        for ib in range(body // LANES):
            c = ib * LANES
            for j in range(LANES):
                gv = _masked(dy[c + j], x[c + j], m[c + j], a[c + j], b[c + j], relu)
                v = a[c + j] * gv + kx[c + j] * (x[c + j] - m[c + j]) + k0[c + j]
                chk[j] += v - v
                dx[c + j] = v
        for c in range(body, channels):
            gv = _masked(dy[c], x[c], m[c], a[c], b[c], relu)
            v = a[c] * gv + kx[c] * (x[c] - m[c]) + k0[c]
            chk[c - body] += v - v
            dx[c] = v
        dy += channels
        x += channels
        dx += channels
    return _any_nonzero(chk)


cdef int _apply_run(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                    floating m, floating a, floating b, floating kx, floating k0,
                    bint relu) noexcept nogil:
    cdef floating chk[LANES]
    cdef Py_ssize_t i, j, body = n - n % LANES
    cdef Py_ssize_t ib
    cdef floating gv, v
    for j in range(LANES):
        chk[j] = 0
    for ib in range(body // LANES):
        i = ib * LANES
        for j in range(LANES):
            gv = _masked(dy[i + j], x[i + j], m, a, b, relu)
            v = a * gv + kx * (x[i + j] - m) + k0
            chk[j] += v - v
            dx[i + j] = v
    for i in range(body, n):
        gv = _masked(dy[i], x[i], m, a, b, relu)
        v = a * gv + kx * (x[i] - m) + k0
        chk[i - body] += v - v
        dx[i] = v
    return _any_nonzero(chk)


cdef int _scale_run(const floating* dy, floating* dx, Py_ssize_t n,
                    floating a) noexcept nogil:
    """Evaluation without ReLU: dx = a*dy, which needs no read of x."""
    cdef floating chk[LANES]
    cdef Py_ssize_t i, j, body = n - n % LANES
    cdef Py_ssize_t ib
    cdef floating v
    for j in range(LANES):
        chk[j] = 0
    for ib in range(body // LANES):
        i = ib * LANES
        for j in range(LANES):
            v = a * dy[i + j]
            chk[j] += v - v
            dx[i + j] = v
    for i in range(body, n):
        v = a * dy[i]
        chk[i - body] += v - v
        dx[i] = v
    return _any_nonzero(chk)


cdef int _backward_apply(const floating* dy, const floating* x, floating* dx,
                         const Geometry* g, const floating* coef, bint relu,
                         int n_threads) noexcept nogil:
    cdef Py_ssize_t C = g.channels, t, n_tasks, rows, r0, c
    cdef int bad = 0
    if g.inner == 1:
        rows = _rows_per_task(C)
        n_tasks = (g.outer + rows - 1) // rows
        for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and n_tasks > 1):
            r0 = t * rows
            bad += _apply_rows(dy + r0 * C, x + r0 * C, dx + r0 * C,
                               _min(rows, g.outer - r0), C, coef, relu)
    else:
        n_tasks = g.outer * C
        for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and n_tasks > 1):
            c = t % C
            bad += _apply_run(dy + t * g.inner, x + t * g.inner, dx + t * g.inner,
                              g.inner, coef[c], coef[C + c], coef[2 * C + c],
                              coef[3 * C + c], coef[4 * C + c], relu)
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef int _backward_scale(const floating* dy, floating* dx, const Geometry* g,
                         const floating* coef, int n_threads) noexcept nogil:
    """Evaluation-mode dx = a*dy without ReLU: dy read once, x not at all."""
    cdef Py_ssize_t C = g.channels, t, n_tasks, rows, r0
    cdef int bad = 0
    if g.inner == 1:
        # Row-wise coefficients: reuse the general loop with kx = k0 = 0 and
        # no mask; x is passed as dy so it is never a separate stream.
        rows = _rows_per_task(C)
        n_tasks = (g.outer + rows - 1) // rows
        for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and n_tasks > 1):
            r0 = t * rows
            bad += _apply_rows(dy + r0 * C, dy + r0 * C, dx + r0 * C,
                               _min(rows, g.outer - r0), C, coef, False)
    else:
        n_tasks = g.outer * C
        for t in prange(n_tasks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and n_tasks > 1):
            bad += _scale_run(dy + t * g.inner, dx + t * g.inner, g.inner,
                              coef[C + t % C])
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef int _backward_coefficients(const Geometry* g, const double* mean,
                                const double* invstd, const double* sum_g,
                                const double* sum_gd, bint training,
                                floating* coef) noexcept nogil:
    """Fill rows kx, k0 of coef (rows m, a, b already set); 1 if non-finite."""
    cdef Py_ssize_t C = g.channels, c
    cdef double count = <double>(g.outer * g.inner), a, kx, k0
    cdef int bad = 0
    for c in range(C):
        if training:
            a = coef[C + c]
            kx = -a * invstd[c] * invstd[c] * sum_gd[c] / count
            k0 = -a * sum_g[c] / count + kx * (<double>coef[c] - mean[c])
        else:
            kx = 0.0
            k0 = 0.0
        coef[3 * C + c] = <floating>kx
        coef[4 * C + c] = <floating>k0
        bad |= not (isfinite(sum_g[c]) and isfinite(sum_gd[c])
                    and isfinite(coef[3 * C + c]) and isfinite(coef[4 * C + c]))
    return bad


# ---------------------------------------------------------------------------
# Python-callable primitives. Arguments are marked IN or OUT; 3-d arrays are
# the (outer, C, inner) view; per-channel double arrays have length C.
# ---------------------------------------------------------------------------

cdef inline Geometry _geometry_of(const Py_ssize_t* shape) noexcept nogil:
    return _geometry(shape[0], shape[1], shape[2])


def batch_stats(const floating[:, :, ::1] x,    # IN  (outer, C, inner)
                double[::1] mean_out,           # OUT (C,)
                double[::1] var_out,            # OUT (C,) biased variance
                int n_threads=1):
    """Per-channel mean and biased variance of ``x`` over axes 0 and 2.

    Returns a status code (0: ok, 3: out of memory).
    """
    cdef Geometry g = _geometry_of(x.shape)
    cdef int status
    with nogil:
        status = _batch_stats(&x[0, 0, 0], &g, &mean_out[0], &var_out[0], n_threads)
    return status


def normalize(const floating[:, :, ::1] x,      # IN  (outer, C, inner)
              floating[:, :, ::1] y_out,        # OUT (outer, C, inner), may be x
              const floating[:, ::1] coef,      # IN  (3, C): m, a, b
              bint relu=False, int n_threads=1):
    """``y = (x - m) * a + b`` per channel (then ReLU if asked).

    Returns 0, or 2 if some pre-activation value is NaN or infinite.
    """
    cdef Geometry g = _geometry_of(x.shape)
    cdef int status
    with nogil:
        status = _normalize(&x[0, 0, 0], &y_out[0, 0, 0], &g, &coef[0, 0], relu, n_threads)
    return status


def backward_reduce(const floating[:, :, ::1] dy,   # IN  (outer, C, inner)
                    const floating[:, :, ::1] x,    # IN  (outer, C, inner)
                    const double[::1] mean,         # IN  (C,)
                    const floating[:, ::1] coef,    # IN  (3, C): m, a, b (ReLU mask)
                    double[::1] sum_g_out,          # OUT (C,)
                    double[::1] sum_gd_out,         # OUT (C,)
                    bint relu=False, int n_threads=1):
    """``sum(g)`` and ``sum(g * (x - mean))`` per channel, g = dy (masked by ReLU)."""
    cdef Geometry g = _geometry_of(x.shape)
    cdef int status
    with nogil:
        status = _backward_reduce(&dy[0, 0, 0], &x[0, 0, 0], &g, &mean[0], &coef[0, 0],
                                  relu, &sum_g_out[0], &sum_gd_out[0], n_threads)
    return status


def backward_apply(const floating[:, :, ::1] dy,    # IN  (outer, C, inner)
                   const floating[:, :, ::1] x,     # IN  (outer, C, inner)
                   const floating[:, ::1] coef,     # IN  (5, C): m, a, b, kx, k0
                   floating[:, :, ::1] dx_out,      # OUT (outer, C, inner), may be dy
                   bint relu=False, int n_threads=1):
    """``dx = a*g + kx*(x - m) + k0`` per channel; returns 0, or 2 if non-finite."""
    cdef Geometry g = _geometry_of(x.shape)
    cdef int status
    with nogil:
        status = _backward_apply(&dy[0, 0, 0], &x[0, 0, 0], &dx_out[0, 0, 0], &g,
                                 &coef[0, 0], relu, n_threads)
    return status


def ema_update(floating[::1] running_mean,     # IN/OUT (C,)
               floating[::1] running_var,      # IN/OUT (C,)
               const double[::1] mean,         # IN (C,) batch mean
               const double[::1] var,          # IN (C,) batch biased variance
               double count, double factor):
    """``running = (1 - factor) * running + factor * batch`` for mean and variance.

    The variance folded in is the unbiased ``var * count / (count - 1)``, as in
    PyTorch; ``factor`` is ``momentum``, or ``1 / num_batches_tracked`` for a
    cumulative average. Writes nothing and returns 1 if a new value would not
    be finite in the running statistics' dtype (say float32 overflow); else 0.
    """
    cdef Py_ssize_t c, C = running_mean.shape[0]
    cdef double unbias = count / (count - 1.0)
    cdef floating new_mean, new_var
    cdef int bad = 0
    with nogil:
        for c in range(C):
            new_mean = <floating>((1.0 - factor) * running_mean[c] + factor * mean[c])
            new_var = <floating>((1.0 - factor) * running_var[c] + factor * var[c] * unbias)
            bad |= not (isfinite(new_mean) and isfinite(new_var))
        if not bad:
            for c in range(C):
                running_mean[c] = <floating>((1.0 - factor) * running_mean[c] + factor * mean[c])
                running_var[c] = <floating>((1.0 - factor) * running_var[c]
                                            + factor * var[c] * unbias)
    return bad


# ---------------------------------------------------------------------------
# Composites: one Python call and one nogil region per layer call. The
# per-channel scratch (coefficients, sums) lives on the C heap for the call.
# ---------------------------------------------------------------------------

cdef int _invstd(Py_ssize_t C, const double* var, double eps, double* invstd_out) noexcept nogil:
    """invstd = 1/sqrt(var + eps); returns 1 if any is non-finite or var is NaN."""
    cdef Py_ssize_t c
    cdef int bad = 0
    for c in range(C):
        invstd_out[c] = 1.0 / sqrt(var[c] + eps)
        bad |= not isfinite(invstd_out[c])
    return bad


cdef int _all_finite(Py_ssize_t C, const double* v) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        if not isfinite(v[c]):
            return 0
    return 1


def forward_train(const floating[:, :, ::1] x,     # IN  (outer, C, inner)
                  floating[:, :, ::1] y_out,       # OUT (outer, C, inner), may be x
                  const floating[::1] gamma,       # IN  (C,)
                  const floating[::1] beta,        # IN  (C,)
                  double eps,
                  double[::1] mean_out,            # OUT (C,) batch mean
                  double[::1] var_out,             # OUT (C,) batch biased variance
                  bint relu=False, int n_threads=1):
    """Batch statistics, then normalize with them: the training forward pass.

    Returns 0; 1 if the batch statistics are non-finite (y is not written);
    2 if the coefficients or the output are non-finite; 3 if out of memory.
    """
    cdef Geometry g = _geometry_of(x.shape)
    cdef Py_ssize_t C = g.channels
    cdef int status
    cdef double* invstd
    cdef floating* coef
    with nogil:
        invstd = <double*>malloc(C * sizeof(double))
        coef = <floating*>malloc(3 * C * sizeof(floating))
        if invstd == NULL or coef == NULL:
            status = STATUS_NO_MEMORY
        else:
            status = _batch_stats(&x[0, 0, 0], &g, &mean_out[0], &var_out[0], n_threads)
        if status == STATUS_OK:
            if _invstd(C, &var_out[0], eps, invstd) or not _all_finite(C, &mean_out[0]):
                status = STATUS_NONFINITE_STATS
        if status == STATUS_OK:
            if _forward_coefficients(&g, &mean_out[0], invstd, &gamma[0], &beta[0], coef):
                status = STATUS_NONFINITE_OUTPUT
            else:
                status = _normalize(&x[0, 0, 0], &y_out[0, 0, 0], &g, coef, relu, n_threads)
        free(invstd)
        free(coef)
    return status


def forward_eval(const floating[:, :, ::1] x,      # IN  (outer, C, inner)
                 floating[:, :, ::1] y_out,        # OUT (outer, C, inner), may be x
                 const double[::1] mean,           # IN  (C,) statistics to use
                 const double[::1] var,            # IN  (C,)
                 const floating[::1] gamma,        # IN  (C,)
                 const floating[::1] beta,         # IN  (C,)
                 double eps, bint relu=False, int n_threads=1):
    """Normalize with given statistics: the evaluation forward pass.

    Returns 0; 2 if the coefficients or the output are non-finite; 3 if out of memory.
    """
    cdef Geometry g = _geometry_of(x.shape)
    cdef Py_ssize_t C = g.channels
    cdef int status = STATUS_OK
    cdef double* invstd
    cdef floating* coef
    with nogil:
        invstd = <double*>malloc(C * sizeof(double))
        coef = <floating*>malloc(3 * C * sizeof(floating))
        if invstd == NULL or coef == NULL:
            status = STATUS_NO_MEMORY
        elif (_invstd(C, &var[0], eps, invstd)
              or _forward_coefficients(&g, &mean[0], invstd, &gamma[0], &beta[0], coef)):
            status = STATUS_NONFINITE_OUTPUT
        else:
            status = _normalize(&x[0, 0, 0], &y_out[0, 0, 0], &g, coef, relu, n_threads)
        free(invstd)
        free(coef)
    return status


def backward(const floating[:, :, ::1] dy,         # IN  (outer, C, inner)
             const floating[:, :, ::1] x,          # IN  (outer, C, inner)
             const double[::1] mean,               # IN  (C,) statistics of forward
             const double[::1] var,                # IN  (C,) biased variance
             const floating[::1] gamma,            # IN  (C,)
             const floating[::1] beta,             # IN  (C,)
             double eps,
             floating[:, :, ::1] dx_out,           # OUT (outer, C, inner), may be dy
             floating[::1] dgamma_out,             # OUT (C,)
             floating[::1] dbeta_out,              # OUT (C,)
             bint training, bint need_param_grads=True, bint relu=False,
             int n_threads=1):
    """Gradients of the loss with respect to x, gamma and beta.

    ``training`` selects the gradient through the batch statistics; otherwise
    ``mean`` and ``var`` are constants (evaluation, frozen statistics). Without
    ``need_param_grads`` in evaluation, the reduction pass is skipped and
    dgamma/dbeta are not written. dgamma and dbeta are written only on success.
    Returns 0; 2 if the sums or dx are non-finite; 3 if out of memory.
    """
    cdef Geometry g = _geometry_of(x.shape)
    cdef Py_ssize_t C = g.channels, c
    cdef bint reduce = training or need_param_grads
    cdef int status = STATUS_OK
    cdef double* scratch
    cdef double* invstd
    cdef double* sum_g
    cdef double* sum_gd
    cdef floating* coef
    with nogil:
        scratch = <double*>malloc(3 * C * sizeof(double))
        coef = <floating*>malloc(5 * C * sizeof(floating))
        invstd = scratch
        sum_g = scratch + C
        sum_gd = scratch + 2 * C
        if scratch == NULL or coef == NULL:
            status = STATUS_NO_MEMORY
        elif (_invstd(C, &var[0], eps, invstd)
              or _forward_coefficients(&g, &mean[0], invstd, &gamma[0], &beta[0], coef)):
            status = STATUS_NONFINITE_OUTPUT
        elif reduce:
            status = _backward_reduce(&dy[0, 0, 0], &x[0, 0, 0], &g, &mean[0], coef, relu,
                                      sum_g, sum_gd, n_threads)
        else:
            for c in range(C):
                sum_g[c] = 0.0
                sum_gd[c] = 0.0
        if status == STATUS_OK:
            if _backward_coefficients(&g, &mean[0], invstd, sum_g, sum_gd, training, coef):
                status = STATUS_NONFINITE_OUTPUT
        if status == STATUS_OK:
            if training or relu:
                status = _backward_apply(&dy[0, 0, 0], &x[0, 0, 0], &dx_out[0, 0, 0], &g,
                                         coef, relu, n_threads)
            else:
                status = _backward_scale(&dy[0, 0, 0], &dx_out[0, 0, 0], &g, coef, n_threads)
        if status == STATUS_OK and reduce:
            for c in range(C):
                dgamma_out[c] = <floating>(sum_gd[c] * invstd[c])
                dbeta_out[c] = <floating>sum_g[c]
        free(scratch)
        free(coef)
    return status
