"""Bandwidth ceilings: the fastest passes this machine's memory allows, and what they bound.

Batch norm is memory-bound, so the least time any implementation can take is
the least memory traffic it must cause over the fastest rate the machine moves
it at. This script compiles minimal C loops of each pass's traffic (OpenMP,
256-bit vectors, 64-byte aligned buffers rotated past the last-level cache, as
``bench.py`` rotates its inputs) and times them on one and two threads, for
every array size of 4 MiB and more in the benchmark's shapes:

* ``read``: sum x (reading alone, for reference);
* ``affine``: y = x*a + b with streaming stores: read x once, write y once,
  no read-for-ownership of y. The least traffic of an evaluation, and of a
  training forward (which must read x for its statistics before it can
  write y: at best the second read comes from cache);
* ``affine-cached``: the same with ordinary stores, which read each line of y
  before writing it (a third array of traffic), each line asked for 1 KiB ahead
  for writing (without that, cbn's normalize ran 1.12-1.28x faster than this
  loop on the Xeon of session 28). The least time of a pass that
  writes its output through the cache, as PyTorch always does and cbn does for
  outputs under its streaming threshold (``cbn.functional.STREAM_MIN_BYTES``,
  chosen so that a next layer finds y in cache);
* ``grad``: dx = dy*a + x*b with streaming stores: read dy and x once, write
  dx once. The least traffic of a backward (whose second reads of dy and x
  come from cache at best);
* ``grad-cached``: the same with ordinary stores.

It then bounds three targets of issue 4 on every case of 4 MiB and more of
``bench.py``'s shapes, timing the case's floor loop (``affine`` for the
forwards, ``grad`` for the backward, on buffers of the case's size) in the
same alternating rounds as cbn and PyTorch, so that the ratios do not mix
minutes of different bandwidth. The floor is the least any implementation
could take. A training forward or a backward over arrays too large to stay
cached must also read its inputs once before it can write (the statistics,
the sums); for those the two-pass floor adds the ``read`` loop over the
inputs, timed in the same rounds. Per case and thread count:

* ``cbn/floor``, ``cbn/2-pass``: the floors' times over cbn's, on the case's
  thread count: how close cbn runs to each limit (1 is the limit);
* ``2T/1T max``: cbn's one-thread time over the two-thread floor (and
  two-pass floor), the most a second thread could add to cbn as it runs on
  one (the target: 1.6);
* ``xPyTorch max`` (training forward of NCHW maps): PyTorch's time over the
  floors, the most any implementation (any two-pass one) could gain on it
  (the target: 3).

Cases whose output cbn writes through the cache (under its streaming
threshold) also time the cached floor loop (``affine-cached``, ``grad-cached``)
in the same rounds, on the case's own rotated arrays (where buffers land in
physical memory moves a case's time from one process to the next by up to
1.5x, and this way the floor shares cbn's and PyTorch's luck), which adds:

* ``cbn/cached``, ``torch/cached``: that floor's time over cbn's and over
  PyTorch's. Where PyTorch runs at the cached floor (about 1), being at least
  as fast as PyTorch in every run is not a matter of the loop: both move the
  same bytes at the rate memory allows, and only fewer bytes (streaming the
  output, which the next layer then reads from memory) would put one ahead;
* ``xPyTorch cached`` (NCHW training forward): PyTorch's time over the cached
  floor, the most any implementation writing y through the cache could gain,
  even reading x from memory only once;
* ``2-pass cached`` (NCHW training forward): PyTorch's time over the cached
  floor plus the ``read`` loop, the most any implementation could gain that
  writes y through the cache after a pass reading x for its statistics. That
  includes channel groups whose statistics and normalization take turns: on
  the Xeon of session 26 such groups ran 0.98x and groups prefetching the
  next group while writing 0.84-0.93x of two whole passes (a C prototype,
  float32 32x64x56x56), so only a route that overlaps the two could beat it.

A bound under a target shows that target out of reach on this machine, for
any implementation (with the cached bounds: any that writes its output
through the cache); a bound over it says only that memory does not forbid it.

Needs an x86-64 C compiler with AVX2, FMA and OpenMP (``$CC`` or ``cc``).

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ceiling.py [--json FILE]
"""

import ctypes
import platform
import statistics
import sys
import tempfile

import numpy as np

from cbn import benchmark as B
from cbn import functional as F

SOURCE = r"""
#include <stddef.h>
#include <immintrin.h>
#include <omp.h>
/* Thread t's share [lo, hi) of n floats, split on 64-byte lines, so that each
   share of a 64-byte aligned array starts aligned. */
static void share(ptrdiff_t n, ptrdiff_t* lo, ptrdiff_t* hi) {
    ptrdiff_t lines = n / 16, t = omp_get_thread_num(), nt = omp_get_num_threads();
    *lo = lines * t / nt * 16;
    *hi = t == nt - 1 ? n : lines * (t + 1) / nt * 16;
}
double read_sum(const float* x, ptrdiff_t n, int threads) {
    double total = 0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        ptrdiff_t lo, hi, i;
        share(n, &lo, &hi);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (i = lo; i + 32 <= hi; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_load_ps(x + i));
            s1 = _mm256_add_ps(s1, _mm256_load_ps(x + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_load_ps(x + i + 16));
            s3 = _mm256_add_ps(s3, _mm256_load_ps(x + i + 24));
        }
        float v[8];
        _mm256_storeu_ps(v, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        double part = 0;
        for (int k = 0; k < 8; k++) part += v[k];
        for (; i < hi; i++) part += x[i];
        total += part;
    }
    return total;
}
/* Each thread's share of n floats (share()): 8 at a time (VSTEP), then one at a
   time (STEP), then FENCE. */
#define SHARED_LOOP(VSTEP, STEP, FENCE)                                         \
    _Pragma("omp parallel num_threads(threads)")                                \
    {                                                                           \
        ptrdiff_t lo, hi, i;                                                    \
        share(n, &lo, &hi);                                                     \
        const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);            \
        for (i = lo; i + 8 <= hi; i += 8)                                       \
            VSTEP;                                                              \
        for (; i < hi; i++)                                                     \
            STEP;                                                               \
        FENCE;                                                                  \
    }
void affine_stream(const float* x, float* y, ptrdiff_t n, float a, float b, int threads) {
    SHARED_LOOP(_mm256_stream_ps(y + i, _mm256_fmadd_ps(_mm256_load_ps(x + i), va, vb)),
                y[i] = x[i] * a + b, _mm_sfence())
}
void grad_stream(const float* dy, const float* x, float* dx, ptrdiff_t n, float a, float b,
                 int threads) {
    SHARED_LOOP(_mm256_stream_ps(dx + i, _mm256_fmadd_ps(_mm256_load_ps(dy + i), va,
                                                          _mm256_mul_ps(_mm256_load_ps(x + i), vb))),
                dx[i] = dy[i] * a + x[i] * b, _mm_sfence())
}
/* With ordinary stores: unaligned and for either dtype, so that they also run on
   a benchmark case's own arrays (NumPy aligns them to 16 bytes only), where the
   floor and the contenders share the same physical memory. */
/* Each thread's share of n values: W at a time (VSTEP), then one at a time (STEP). */
/* Each vector step first asks for the output 1 KiB ahead for writing (OUT: the
   output array, or NULL for none), so that the reads for ownership of a cold
   output's lines start early: 1.12-1.20x on the Xeon of session 28 in cbn's own
   NCHW normalize, which had run at the floor of this loop without it. */
#define CACHED_LOOP(V, W, SET1, OUT, VSTEP, STEP)                               \
    _Pragma("omp parallel num_threads(threads)")                                \
    {                                                                           \
        ptrdiff_t lo = n * omp_get_thread_num() / omp_get_num_threads();        \
        ptrdiff_t hi = n * (omp_get_thread_num() + 1) / omp_get_num_threads();  \
        ptrdiff_t i;                                                            \
        const V va = SET1(a), vb = SET1(b);                                     \
        for (i = lo; i + W <= hi; i += W) {                                     \
            if (OUT)                                                            \
                __builtin_prefetch((const char*)((OUT) + i) + 1024, 1, 3);      \
            VSTEP;                                                              \
        }                                                                       \
        for (; i < hi; i++)                                                     \
            STEP;                                                               \
    }
#define CACHED_ON(T, S, V, W, LOADU, STOREU, FMA, MUL, SET1)                    \
void affine_cached_##S(const T* x, T* y, ptrdiff_t n, T a, T b, int threads) {  \
    CACHED_LOOP(V, W, SET1, y, STOREU(y + i, FMA(LOADU(x + i), va, vb)),        \
                y[i] = x[i] * a + b)                                            \
}                                                                               \
void grad_cached_##S(const T* dy, const T* x, T* dx, ptrdiff_t n, T a, T b,     \
                     int threads) {                                             \
    CACHED_LOOP(V, W, SET1, (T*)NULL, STOREU(dx + i, FMA(LOADU(dy + i), va, MUL(LOADU(x + i), vb))), \
                dx[i] = dy[i] * a + x[i] * b)                                   \
}
CACHED_ON(float, f, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
          _mm256_mul_ps, _mm256_set1_ps)
CACHED_ON(double, d, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_fmadd_pd,
          _mm256_mul_pd, _mm256_set1_pd)
"""

# Kernel -> (arrays it reads, arrays it writes): its traffic in array sizes.
KERNELS = {"read": (1, 0), "affine": (1, 1), "affine-cached": (1, 1), "grad": (2, 1),
           "grad-cached": (2, 1)}
# The ceiling that bounds each benchmark op, and the op's least traffic in array sizes.
FLOOR_OF = {"fwd-train": ("affine", 2), "fwd-eval": ("affine", 2), "backward": ("grad", 3)}
THREADS = (1, 2)
# The ops that read their inputs in a first pass before the pass that writes.
TWO_PASS = ("fwd-train", "backward")
MIN_BYTES = 4 << 20  # the sizes issue 4's two-thread target covers
A, B_ = 1.5, 0.25   # the loops' coefficients (any values; these are exact in float32)


def compile_loops(workdir):
    """Compile SOURCE into ``workdir``; return the loaded library, or raise RuntimeError."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the loops are x86-64 code; this is {platform.machine()}")
    lib = B.compile_c(workdir, "ceiling", SOURCE, ["-O2", "-mavx2", "-mfma", "-fopenmp"],
                      "the ceiling loops")
    p, n, f, i = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_float, ctypes.c_int
    lib.read_sum.argtypes, lib.read_sum.restype = [p, n, i], ctypes.c_double
    lib.affine_stream.argtypes, lib.affine_stream.restype = [p, p, n, f, f, i], None
    lib.grad_stream.argtypes, lib.grad_stream.restype = [p, p, p, n, f, f, i], None
    for suffix, real in (("f", ctypes.c_float), ("d", ctypes.c_double)):
        fn = getattr(lib, "affine_cached_" + suffix)
        fn.argtypes, fn.restype = [p, p, n, real, real, i], None
        fn = getattr(lib, "grad_cached_" + suffix)
        fn.argtypes, fn.restype = [p, p, p, n, real, real, i], None
    return lib


def aligned(n, rng=None):
    """A float32 array of n values starting on a 64-byte line (streaming stores need
    32-byte alignment), random if ``rng`` is given, else uninitialized."""
    raw = np.empty(n * 4 + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    a = raw[skip:skip + n * 4].view(np.float32)
    if rng is not None:
        a[:] = rng.standard_normal(n)
    return a


def kernel_call(lib, kernel, arrays, threads):
    """``fn()`` running ``kernel`` once over ``arrays`` (x; x, y; or dy, x, dx) on
    ``threads`` threads, its pointers made once (the timing should not include them)."""
    n = arrays[0].size
    p = [ctypes.c_void_p(a.ctypes.data) for a in arrays]
    if kernel == "read":
        return lambda: lib.read_sum(p[0], n, threads)
    if kernel == "grad":
        return lambda: lib.grad_stream(p[0], p[1], p[2], n, A, B_, threads)
    if kernel == "affine":
        return lambda: lib.affine_stream(p[0], p[1], n, A, B_, threads)
    return cached_call(lib, arrays, threads)  # affine-cached, grad-cached


def cached_call(lib, arrays, threads):
    """``fn()`` running the cached floor loop of ``arrays`` (x, y: affine; dy, x, dx:
    grad) in place on them, of any shape, float32 or float64 and 16-byte alignment,
    on ``threads`` threads."""
    suffix = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}[arrays[0].dtype]
    fn = getattr(lib, ("affine_cached_" if len(arrays) == 2 else "grad_cached_") + suffix)
    n = arrays[0].size
    p = [ctypes.c_void_p(a.ctypes.data) for a in arrays]
    return lambda: fn(*p, n, A, B_, threads)


def _rotated_sets(reads, nbytes, k, rng):
    """k sets of ``reads`` random input arrays and one output, each of ``nbytes``
    rounded down to a 64-byte line."""
    n = nbytes // 64 * 16
    return [[aligned(n, rng) for _ in range(reads)] + [aligned(n)] for _ in range(k)]


def _loop_arrays(kernel, arrays):
    """The arrays of a set (inputs, then the output) that ``kernel`` runs on."""
    reads, writes = KERNELS[kernel]
    return arrays[:reads] + (arrays[-1:] if writes else [])


def measure_size(lib, nbytes, config):
    """Median GB/s of every kernel on one and two threads, arrays of ``nbytes`` (rounded
    down to 64 bytes) rotated past the cache, all in alternating rounds.
    Returns ``{(kernel, threads): gbps}``."""
    k = B._n_buffers(nbytes, config)
    sets = _rotated_sets(2, nbytes, k, np.random.default_rng(0))
    fns = {}
    for kernel in KERNELS:
        for t in THREADS:
            calls = [kernel_call(lib, kernel, _loop_arrays(kernel, s), t) for s in sets]
            fns[(kernel, t)] = ((lambda i, calls=calls: calls[i]()), None)
    named = {f"{kern} {t}": f for (kern, t), f in fns.items()}
    timing = B.time_interleaved(named, k, rounds=config.rounds, target_time=config.target_time,
                                min_repeats=config.min_repeats, max_repeats=config.max_repeats)
    out = {}
    for (kernel, t) in fns:
        traffic = sum(KERNELS[kernel]) * sets[0][0].nbytes
        out[(kernel, t)] = traffic / timing[f"{kernel} {t}"].median / 1e9
    return out


def _read_call(lib, arrays, threads):
    """``fn()`` reading each of ``arrays`` once (the read loop), on ``threads`` threads."""
    calls = [kernel_call(lib, "read", [a], threads) for a in arrays]
    return lambda: [call() for call in calls]


def measure_case(lib, torch, spec, dtype, op, config):
    """Median seconds of cbn, PyTorch (if given), the case's floor loop, for the
    two-pass ops the read loop over its inputs (x; dy and x), and where cbn writes
    the output through the cache (under its streaming threshold) the cached floor
    loop, on one and two threads, in alternating rounds on rotated buffers of the
    case's size.

    Returns ``{"cbn": {1: s, 2: s}, "torch": ..., "floor": ..., "read": ...,
    "cached": ..., "with_one": {"floor": s, "read": s}}``: each thread count's times
    from its own rounds (PyTorch's thread count is set per round), and under
    ``with_one`` the two-thread floor loops timed in the one-thread rounds, for the
    two-thread bound."""
    nbytes = spec.nbytes(dtype)
    k = B._n_buffers(nbytes, config)
    buf = B._Buffers(spec, dtype, k, torch)
    kernel, _ = FLOOR_OF[op]
    inputs = KERNELS[kernel][0]  # x; or dy and x
    sets = _rotated_sets(inputs, nbytes, k, np.random.default_rng(0))

    def loop(name):
        def make(t):
            calls = [kernel_call(lib, name, arrays, t) for arrays in sets]
            return (lambda i: calls[i]()), None
        return make

    def read(t):
        calls = [_read_call(lib, arrays[:inputs], t) for arrays in sets]
        return (lambda i: calls[i]()), None

    def cached(t):
        # On the case's own arrays: the same physical memory as cbn's and PyTorch's.
        calls = [cached_call(lib, [buf.xs[i], buf.outs[i]] if inputs == 1
                             else [buf.dys[i], buf.xs[i], buf.outs[i]], t) for i in range(k)]
        return (lambda i: calls[i]()), None

    loops = {"floor": loop(kernel)} | ({"read": read} if op in TWO_PASS else {})
    if not F.streams(nbytes, spec.inner, backward=op == "backward"):
        loops["cached"] = cached
    out = {"cbn": {}, "torch": {}, **{name: {} for name in loops}, "with_one": {}}
    for t in THREADS:
        fns = {("cbn", t): B._case_functions("cbn", op, spec, buf, t, torch)}
        if torch is not None:
            fns[("torch", t)] = B._case_functions("torch", op, spec, buf, t, torch)
        for name, make in loops.items():
            fns[(name, t)] = make(t)
            if t == 1 and name != "cached":
                fns[(name, 2)] = make(2)
        named = {f"{impl} {threads}": fn for (impl, threads), fn in fns.items()}
        with B._Threads(t, torch):
            timing = B.time_interleaved(named, k, rounds=config.rounds,
                                        target_time=config.target_time,
                                        min_repeats=config.min_repeats,
                                        max_repeats=config.max_repeats)
        for (impl, threads) in fns:
            median = timing[f"{impl} {threads}"].median
            if threads == t:
                out[impl][t] = median
            else:
                out["with_one"][impl] = median
    if torch is None:
        del out["torch"]
    return out


def bounds(case, times):
    """What a case's floors bound, from :func:`measure_case`'s ``times``.

    The floor loop moves the case's least traffic (two arrays forward, three
    backward), so its time is the floor of any implementation. A training forward
    or backward over arrays too large to stay cached must also read its inputs once
    before the pass that writes (the statistics, the sums): for those the two-pass
    floor adds the read loop's time. Returns one dict per thread count: ``case``,
    ``floor_s``, ``cbn_over_floor`` (1 is the limit), ``two_pass_s`` and
    ``cbn_over_two_pass`` (two-pass ops), and where they apply
    ``two_threads_at_most`` (one thread: cbn's time over the two-thread floor, the
    most a second thread could give), ``two_threads_two_pass`` (the same over the
    two-pass floor), ``torch_at_most`` and ``torch_two_pass`` (NCHW training
    forward: PyTorch's time over the floors); where ``times`` has the cached floor
    (outputs cbn writes through the cache), ``cached_floor_s``, ``cbn_over_cached``,
    ``torch_over_cached`` (1 is that floor) and on NCHW training forwards
    ``torch_at_most_cached`` (PyTorch's time over it: the most any implementation
    writing y through the cache could gain) and ``torch_two_pass_cached`` (over
    it plus the read loop's: the most one that also reads x in a pass of its
    own could gain). ``cbn_streams``: whether cbn writes
    the output with streaming stores (no cached floor then)."""
    spec, dtype, op = case
    two_pass = op in TWO_PASS
    rows = []
    for t in THREADS:
        floor = times["floor"][t]
        row = {"case": f"{spec.name} {dtype} {op} {t}T", "nbytes": spec.nbytes(dtype),
               "threads": t,
               "floor_s": floor, "cbn_s": times["cbn"][t],
               "cbn_over_floor": floor / times["cbn"][t]}
        if two_pass:
            row["two_pass_s"] = floor + times["read"][t]
            row["cbn_over_two_pass"] = row["two_pass_s"] / times["cbn"][t]
        if t == 1:
            one = times["with_one"]
            row["two_threads_at_most"] = times["cbn"][1] / one["floor"]
            if two_pass:
                row["two_threads_two_pass"] = times["cbn"][1] / (one["floor"] + one["read"])
        row["cbn_streams"] = "cached" not in times
        if not row["cbn_streams"]:
            row["cached_floor_s"] = times["cached"][t]
            row["cbn_over_cached"] = times["cached"][t] / times["cbn"][t]
        nchw_train = op == "fwd-train" and spec.layout == "NCHW"
        if "torch" in times:
            row["torch_s"] = times["torch"][t]
            if nchw_train:
                row["torch_at_most"] = times["torch"][t] / floor
                row["torch_two_pass"] = times["torch"][t] / row["two_pass_s"]
            if not row["cbn_streams"]:
                row["torch_over_cached"] = times["cached"][t] / times["torch"][t]
                if nchw_train:
                    row["torch_at_most_cached"] = times["torch"][t] / times["cached"][t]
                    row["torch_two_pass_cached"] = times["torch"][t] / (
                        times["cached"][t] + times["read"][t])
        rows.append(row)
    return rows


def _options(p):
    p.add_argument("--shapes", type=B._shape_list, metavar="LIST",
                   default=[B.parse_shape(s) for s in B.DEFAULT_SHAPES],
                   help="comma-separated shapes (default: bench.py's); cases under 4 MiB "
                        "are skipped")
    p.add_argument("--dtypes", type=B._csv("dtype", B.DTYPES), metavar="LIST",
                   default=list(B.DTYPES), help="float32,float64")
    p.add_argument("--ops", type=B._csv("op", tuple(FLOOR_OF)), metavar="LIST",
                   default=list(FLOOR_OF), help="fwd-train,fwd-eval,backward")
    p.add_argument("--target-time", type=float, default=B.BenchConfig.target_time,
                   help="seconds of timed calls per contender and case")


def _sizes(shapes, dtypes):
    """Array sizes (bytes) of MIN_BYTES and more among ``shapes`` x ``dtypes``, sorted."""
    return sorted({s.nbytes(d) for s in shapes for d in dtypes if s.nbytes(d) >= MIN_BYTES})


COLUMNS = (("cbn_over_floor", "cbn/floor"), ("cbn_over_two_pass", "cbn/2-pass"),
           ("two_threads_at_most", "2T/1T max"), ("two_threads_two_pass", "2-pass"),
           ("torch_at_most", "xPyTorch max"), ("torch_two_pass", "2-pass"),
           ("cbn_over_cached", "cbn/cached"), ("torch_over_cached", "torch/cached"),
           ("torch_at_most_cached", "xPyT cached"), ("torch_two_pass_cached", "2-pass"))
# PyTorch within this fraction of the cached floor runs at the limit of its traffic.
AT_THE_FLOOR = 0.95


def _show_header():
    print("\n" + f"{'case':38}" + "".join(f"{title:>13}" for _, title in COLUMNS))


def _show_bounds_rows(rows):
    for r in rows:
        print(f"{r['case']:38}" + "".join(
            f"{r[key]:13.2f}" if key in r else " " * 13 for key, _ in COLUMNS), flush=True)


def _summary(rows):
    for keys, target, what in (
            (("two_threads_at_most", "two_threads_two_pass"), 1.6, "two threads >= 1.6x one"),
            (("torch_at_most", "torch_two_pass", "torch_at_most_cached",
              "torch_two_pass_cached"), 3.0, ">= 3x PyTorch, NCHW training forward")):
        for key, floor in zip(keys, ("the floor", "the two-pass floor",
                                     "the cached floor (y written through the cache)",
                                     ("the two-pass cached floor (a pass reading x, then y "
                                      "written through the cache)"))):
            vals = [r for r in rows if key in r]
            if vals:
                under = [r["case"] for r in vals if r[key] < target]
                print(f"{what}: out of reach at {floor} (bound under {target}) in "
                      f"{len(under)} of {len(vals)}" + (f": {', '.join(under)}" if under else ""))
    cached = [r for r in rows if "torch_over_cached" in r]
    if cached:
        at = [r["case"] for r in cached if r["torch_over_cached"] >= AT_THE_FLOOR]
        print(f">= PyTorch, outputs written through the cache: PyTorch at {AT_THE_FLOOR:g} "
              f"of the cached floor or more (only fewer bytes could be ahead every time) in "
              f"{len(at)} of {len(cached)}" + (f": {', '.join(at)}" if at else ""))


def main(argv=None):
    """Measure the ceilings, then bound every case; returns the exit status."""
    save = B.side_measurement(__doc__, "write the ceilings and bounds as JSON", argv, _options)
    args = save.args
    torch = B._import_torch()
    config = B.BenchConfig(shapes=args.shapes, dtypes=args.dtypes, target_time=args.target_time,
                           cache_bytes=B._last_level_cache_bytes())
    try:
        with tempfile.TemporaryDirectory() as d:
            lib = compile_loops(d)
            ceilings = {}
            print("GB/s (traffic over median time), arrays rotated past the cache")
            print(f"{'MiB':>6} " + " ".join(f"{k + ' ' + str(t) + 'T':>16}"
                                           for k in KERNELS for t in THREADS))
            for nbytes in _sizes(args.shapes, args.dtypes):
                ceilings[nbytes] = measure_size(lib, nbytes, config)
                print(f"{nbytes / 2**20:6.1f} " + " ".join(
                    f"{ceilings[nbytes][(k, t)]:16.1f}" for k in KERNELS for t in THREADS),
                    flush=True)
            if ceilings:
                gain = {k: statistics.median(c[(k, 2)] / c[(k, 1)] for c in ceilings.values())
                        for k in KERNELS}
                print("two threads over one, median over the sizes: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in gain.items()))
                if any(v < 1 for v in gain.values()):
                    # A team of two waits for its slower thread: a core taken by
                    # another process halves what both threads can do.
                    print("warning: two threads slower than one; was another process "
                          "using a core?", file=sys.stderr)
            rows = []
            _show_header()
            for spec in args.shapes:
                for dtype in args.dtypes:
                    if spec.nbytes(dtype) < MIN_BYTES:
                        continue
                    for op in args.ops:
                        times = measure_case(lib, torch, spec, dtype, op, config)
                        new = bounds((spec, dtype, op), times)
                        _show_bounds_rows(new)
                        rows.extend(new)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    _summary(rows)
    save(ceilings=[{"nbytes": s, "kernel": k, "threads": t, "gbps": v}
                   for s, c in ceilings.items() for (k, t), v in c.items()],
         torch=None if torch is None else torch.__version__, bounds=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
