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
#   backward_apply  dx = a*(g + k0 + kx*(x - m)*s)                 (reads dy, x, writes dx)
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
# The leaf loops over contiguous memory are small C functions (below) whose
# `omp simd` pragmas let the compiler vectorize their sums.
#
# Trust runs one way: these functions check nothing. cbn.functional validates
# shapes, dtypes, contiguity and values before calling them.

import os

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, isfinite
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    # Accumulators that nothing else in the function reads or writes (C99
    # restrict), so that float64 sums need not be assumed to alias the data.
    ctypedef double* restrict_doubles "double* __restrict"

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int cbn_max_threads(void) { return omp_get_max_threads(); }
    static int cbn_num_procs(void) { return omp_get_num_procs(); }
    static int cbn_has_openmp(void) { return 1; }

    /* GNU OpenMP ends the process (exit status 1, "Thread creation failed")
       when it cannot create a team's threads: an address-space limit without
       room for their stacks, a limit on processes or threads. So a team
       larger than any this thread has started is tried first with plain
       threads of the stack size libgomp would give them; if fewer can be
       made, the team is that much smaller (the same bits: results do not
       depend on the thread count). libgomp keeps a pool of idle threads per
       master thread, so only growth needs the trial. */
    #include <pthread.h>
    #include <stdlib.h>
    #include <ctype.h>
    static __thread int cbn_team_ok = 1;  /* the largest team this thread started */

    /* OMP_STACKSIZE (or GOMP_STACKSIZE) in bytes, as libgomp reads it: a
       size with an optional B, K, M or G (K without one); 0 if unset. */
    static size_t cbn_omp_stacksize(void) {
        const char* s = getenv("OMP_STACKSIZE");
        char* end;
        unsigned long long v;
        if (s == NULL) s = getenv("GOMP_STACKSIZE");
        if (s == NULL) return 0;
        while (isspace((unsigned char)*s)) s++;
        v = strtoull(s, &end, 10);
        if (end == s) return 0;
        while (isspace((unsigned char)*end)) end++;
        switch (tolower((unsigned char)*end)) {
            case 'b': break;
            case 'm': v <<= 20; break;
            case 'g': v <<= 30; break;
            default: v <<= 10; break;
        }
        return (size_t)v;
    }

    typedef struct { pthread_mutex_t mu; pthread_cond_t cv; int go; } cbn_gate;

    static void* cbn_wait_gate(void* arg) {
        cbn_gate* g = (cbn_gate*)arg;
        pthread_mutex_lock(&g->mu);
        while (!g->go) pthread_cond_wait(&g->cv, &g->mu);
        pthread_mutex_unlock(&g->mu);
        return NULL;
    }

    /* The size of team, up to n, whose threads can exist now (see above). */
    static int cbn_team_size(int n) {
        int want, made = 0, i;
        pthread_t* ids;
        pthread_attr_t attr;
        size_t stack = cbn_omp_stacksize();
        cbn_gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
        if (n <= cbn_team_ok) return n;
        want = n - cbn_team_ok;  /* threads libgomp would add to its pool */
        ids = (pthread_t*)malloc((size_t)want * sizeof(pthread_t));
        if (ids == NULL || pthread_attr_init(&attr) != 0) {
            free(ids);
            return cbn_team_ok;
        }
        if (stack) pthread_attr_setstacksize(&attr, stack);
        /* All at once (each waits at the gate), as a team's threads live. */
        for (; made < want; made++)
            if (pthread_create(&ids[made], &attr, cbn_wait_gate, &gate) != 0) break;
        pthread_mutex_lock(&gate.mu);
        gate.go = 1;
        pthread_cond_broadcast(&gate.cv);
        pthread_mutex_unlock(&gate.mu);
        for (i = 0; i < made; i++) pthread_join(ids[i], NULL);
        pthread_attr_destroy(&attr);
        free(ids);
        cbn_team_ok += made;
        return cbn_team_ok;
    }
    #else
    static int cbn_max_threads(void) { return 1; }
    static int cbn_num_procs(void) { return 1; }
    static int cbn_has_openmp(void) { return 0; }
    static int cbn_team_size(int n) { return n; }
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
    int cbn_num_procs() noexcept nogil
    int cbn_has_openmp() noexcept nogil
    int cbn_team_size(int n) noexcept nogil
    int cbn_debug_build() noexcept nogil
    int cbn_sanitized() noexcept nogil


# Leaf loops over one contiguous stretch of memory, written in C because Cython
# cannot emit `omp simd` pragmas. Without `omp simd reduction`, gcc does not
# vectorize a floating-point sum (it may not reassociate it); with it, the
# vector partial sums are combined in an order fixed at compile time, so the
# results stay deterministic. Without OpenMP the pragmas are ignored and the
# loops run scalar. Each elementwise leaf also sums z - z, which stays 0
# unless some z is NaN or infinite: a free check (the loops are memory-bound)
# that no garbage leaves the kernels. CBN_Z is the one definition of the
# pre-activation, shared by forward and backward, so the ReLU mask backward
# recomputes is bit-for-bit the one forward applied.
cdef extern from *:
    """
    #define CBN_Z(x, m, a, b) (((x) - (m)) * (a) + (b))
    /* CBN_ROWS_GRAD prefetches its eight streams this far ahead into L2
       (prefetcht1). Against 512 bytes into L1, all builds in one process on
       cold data: (256, 1024), (128, 2048) and (32, 4096) backward 1.05-1.12x,
       float32 and float64. */
    #define PREFETCH_BYTES 2048
    /* cbn_quad_sums prefetches its four streams this far ahead into L2
       (prefetcht1): 2 KiB, or 1 KiB for float64 rows shorter than 8 KiB.
       Against 512 bytes into L1, all builds in one process on cold data:
       float32 (256, 1024) and (128, 2048) statistics 1.2x, (4096, 256) 1.0x;
       float64 (256, 1024) 1.15x, (4096, 256), (1024, 512) and (16384, 128)
       1.15-1.2x (where 2 KiB gave 1.05-1.1x). */
    #define STATS_PREFETCH_BYTES(T, n) \\
        (sizeof(T) == 4 || (n) * sizeof(T) >= 8192 ? 2048 : 1024)
    #define UNCENTRED_MAX 4.0
    #define CBN_SAME(v) (v)
    /* A backward channel group's dx pass, image by image, first prefetches  */
    /* into L2 this many bytes (at most) of the same image's x and dy of the  */
    /* thread's next group, whose sums pass then starts its strided runs     */
    /* with their heads fetched; 0: no such prefetch. On the Xeon (session   */
    /* 31), one process, one and two threads, against none: cold data (1 GB  */
    /* rotated) 64x16x32x32 1.02-1.16x, 8x256x28x28 1.02-1.03x, 32x64x56x56  */
    /* 0.98-1.01x; 300 MB rotated 1.03-1.12x, 16x64x56x56 0.98-1.05x. There  */
    /* 2 KiB ran 0.95-1.10x, 4 KiB 0.85-1.06x, the next group whole 0.75-0.98x.*/
    #ifndef CBN_GROUP_PREFETCH_BYTES
    #define CBN_GROUP_PREFETCH_BYTES 1024
    #endif
    static inline void cbn_prefetch_l2(const void* p, size_t nbytes) {
        const char* c = (const char*)p;
        size_t k;
        for (k = 0; k < nbytes; k += 64)
            __builtin_prefetch(c + k, 0, 2);
    }
    #define CBN_RELU_f(v) ((v) > 0 ? (v) : 0.0f)
    #define CBN_RELU_d(v) ((v) > 0 ? (v) : 0.0)

    /* Non-temporal ("streaming") stores write whole 64-byte lines to memory
       without first reading them into the cache. For an output too large to
       stay cached this removes the read-for-ownership of every line, a third
       of a normalize pass's memory traffic. x86 only; elsewhere they are plain
       stores. */
    #if defined(__SSE2__)
    #include <immintrin.h>
    #define CBN_HAS_STREAM 1
    static inline void cbn_stream_line(void* dst, const void* src) {
    #if defined(__AVX512F__)
        _mm512_stream_si512((__m512i*)dst, _mm512_loadu_si512(src));
    #elif defined(__AVX__)
        _mm256_stream_si256((__m256i*)dst, _mm256_loadu_si256((const __m256i*)src));
        _mm256_stream_si256((__m256i*)((char*)dst + 32),
                            _mm256_loadu_si256((const __m256i*)((const char*)src + 32)));
    #else
        for (int k = 0; k < 64; k += 16)
            _mm_stream_si128((__m128i*)((char*)dst + k),
                             _mm_loadu_si128((const __m128i*)((const char*)src + k)));
    #endif
    }
    /* Streaming stores are weakly ordered: fence them before the data is used. */
    static inline void cbn_store_fence(void) { _mm_sfence(); }
    #else
    #define CBN_HAS_STREAM 0
    static inline void cbn_stream_line(void* dst, const void* src) { (void)dst; (void)src; }
    static inline void cbn_store_fence(void) {}
    #endif
    /* cbn_stream_line of a line that two 32-byte stores have just written  */
    /* (an `omp simd` loop's, where gcc prefers 256-bit vectors): read back  */
    /* in halves, as CBN_CHECK_HALVES does, each load is forwarded from its  */
    /* store; one 64-byte load would wait for both to reach the cache.       */
    #ifndef CBN_STREAM_HALVES
    #define CBN_STREAM_HALVES 1
    #endif
    static inline void cbn_stream_built(void* dst, const void* src) {
    #if defined(__AVX512F__) && CBN_STREAM_HALVES
        __m256i lo = _mm256_loadu_si256((const __m256i*)src);
        __m256i hi = _mm256_loadu_si256((const __m256i*)((const char*)src + 32));
        _mm512_stream_si512((__m512i*)dst,
                            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    #else
        cbn_stream_line(dst, src);
    #endif
    }
    /* `bytes` (a multiple of 64) from src streamed to dst, a line at a time. */
    static inline void cbn_stream_lines(void* dst, const void* src, size_t bytes) {
        for (size_t k = 0; k < bytes; k += 64)
            cbn_stream_line((char*)dst + k, (const char*)src + k);
    }

    /* 1 if any of the `bytes` (32 or 64) at p is non-zero: a vector of      */
    /* checks v - v, all +0.0 unless some v was NaN or infinite.             */
    static inline int cbn_any_bits(const void* p, size_t bytes) {
        uint64_t u[8] = {0};
        memcpy(u, p, bytes);
        return ((u[0] | u[1]) | (u[2] | u[3]) | (u[4] | u[5]) | (u[6] | u[7])) != 0;
    }
    /* lo += z[0:32 bytes] - itself, hi += z[32:64] - itself: the checks of a  */
    /* line written by an `omp simd` loop, read back in halves. Read back whole */
    /* (one 64-byte load of what two 32-byte stores wrote, where the compiler  */
    /* prefers 256-bit vectors but has AVX-512), the load waits for the stores */
    /* to reach the cache: a Xeon spent 60% of backward's dx pass on it, and   */
    /* in cache NCHW passes ran 1.5-2.8x faster without. CBN_EACHK (rows two  */
    /* or four at a time) kept the whole-line read until session 27, when its */
    /* halves lost only where they raced ahead of a cold output's lines:      */
    /* (4096, 256) float32 training forward into cold out= 0.83x. Halves with */
    /* each output line prefetched for writing 1 KiB ahead (CBN_EACHK's ahead)*/
    /* beat the whole-line read on every forward (RESULTS.md, session 27).    */
    #define CBN_CHECK_HALVES(half_t, z, lo, hi)                                       \\
    {                                                                                 \\
        half_t z0_, z1_;                                                              \\
        memcpy(&z0_, (z), 32);                                                        \\
        memcpy(&z1_, (const char*)(z) + 32, 32);                                      \\
        lo += z0_ - z0_;                                                              \\
        hi += z1_ - z1_;                                                              \\
    }
    /* Rows and runs of at least this many bytes gather their NaN/Inf checks  */
    /* as the bits of v - v OR-ed together over the whole row, in one `omp     */
    /* simd` loop (an integer OR is associative: the compiler may combine the  */
    /* lanes in any order, and does so once per call in a few steps), instead */
    /* of line by line through memory. On an AMD EPYC (Zen 5), both builds in  */
    /* one process, NCHW runs of 3-8 KiB: in cache 1.01-1.19x, cold 0.95-1.17x */
    /* (median 1.05x); runs of 784 bytes lost in cache (0.86-0.94x), so       */
    /* shorter ones keep the line-by-line checks. On Zen 4 (session 17), line */
    /* checks for evaluation ran 1.01-1.18x cold on float32 but 0.78-0.98x in */
    /* cache: kept.                                                           */
    #define CBN_OR_CHECK_BYTES 2048
    /* The unsigned integer as wide as T. */
    #define CBN_BITS(T) __typeof__(__builtin_choose_expr(sizeof(T) == 4,              \\
                                   (unsigned int)0, (unsigned long long)0))
    /* dst[i] = STORE(v), v = EXPR, for i in [0, n), OR-ing the bits of v - v  */
    /* into acc (CBN_BITS(T)): CBN_EACH's loop for rows and runs of at least  */
    /* CBN_OR_CHECK_BYTES (unstreamed).                                       */
    #define CBN_OR_LOOP(T, n, dst, acc, EXPR, STORE)                                  \\
        CBN_OR_SPAN(T, 0, n, dst, acc, EXPR, STORE)
    /* CBN_OR_LOOP over i in [i0, i1).                                        */
    #define CBN_OR_SPAN(T, i0, i1, dst, acc, EXPR, STORE)                             \\
        _Pragma("omp simd reduction(|:acc)")                                          \\
        for (Py_ssize_t i = (i0); i < (i1); i++) {                                    \\
            T v = EXPR; T z = v - v; CBN_BITS(T) u;                                   \\
            memcpy(&u, &z, sizeof(T)); acc |= u; (dst)[i] = STORE(v);                \\
        }
    /* CBN_OR_LOOP in spans of CBN_AHEAD_SPAN bytes, each span first asking for */
    /* the lines `ahead` bytes past its start for writing (prefetchw), so that */
    /* the reads for ownership of a cold output's lines start before the      */
    /* stores reach them (see cbn_affine_runs).                               */
    #define CBN_AHEAD_SPAN 1024
    #define CBN_OR_LOOP_AHEAD(T, n, dst, acc, ahead, EXPR, STORE)                     \\
        for (Py_ssize_t s0_ = 0; s0_ < (n); s0_ += CBN_AHEAD_SPAN / (Py_ssize_t)sizeof(T)) { \\
            const Py_ssize_t s1_ = s0_ + CBN_AHEAD_SPAN / (Py_ssize_t)sizeof(T) < (n) \\
                ? s0_ + CBN_AHEAD_SPAN / (Py_ssize_t)sizeof(T) : (n);                  \\
            for (Py_ssize_t p_ = 0; p_ < CBN_AHEAD_SPAN; p_ += 64)                    \\
                __builtin_prefetch((const char*)((dst) + s0_) + (ahead) + p_, 1, 3);  \\
            CBN_OR_SPAN(T, s0_, s1_, dst, acc, EXPR, STORE)                           \\
        }
    /* The streamed loop of CBN_EACH goes over its lines in blocks of this    */
    /* many bytes: an outer loop around the same inner loop, the same         */
    /* instructions per line. On an AMD EPYC (Zen 5), both builds in one      */
    /* process, three processes, cold data, one thread: streamed rows         */
    /* (65536x64, 16384x256) evaluation 1.41-1.47x, training forward          */
    /* 1.09-1.25x, backward 1.06-1.11x; streamed runs (32x64x56x56,           */
    /* 64x32x64x64) 0.99-1.09x; two threads 0.94-1.10x (memory-bound there    */
    /* either way); alike at six page offsets of y against x. Rows split     */
    /* between calls into pieces measured alike at 512 bytes and 1 KiB, and   */
    /* at 2 KiB 0.73-0.81x of no split. Why the long loop is slower there was */
    /* not found. On the Zen 4 EPYC of session 17: alike (0.97-1.04x).        */
    #define CBN_STREAM_BLOCK_BYTES 1024
    /* A streamed store followed closely by a load 4 KiB-aliased with it (its  */
    /* address equal in the low 12 bits, partly overlapping) waits for the    */
    /* store to leave: with y a little ahead of what the loop reads (x, dy or  */
    /* a coefficient row) modulo 4 KiB, each line's loads meet the stores of  */
    /* the lines before. On the AMD EPYC Zen 4 of session 17, y 80 bytes      */
    /* ahead of x modulo 4 KiB ran 1.4-2.1x slower than other distances (all */
    /* passes, both dtypes, rows and runs), 112 and 144 bytes 1.1-1.4x; a     */
    /* heap-allocated out= hits it for every call of a training loop (each   */
    /* array of a size lands at the same offset). The leaves then ask for     */
    /* CBN_NT_LAGGED: each block of CBN_STREAM_BLOCK_BYTES is built in a      */
    /* stack buffer and streamed out after the next block's loads, which are */
    /* then a block away from every store in flight. Same bits. Against the  */
    /* plain streamed loop, both builds in one process, three processes, y   */
    /* 80 bytes ahead: 1.0-2.4x faster (32x64x56x56, 65536x64, 16384x256,    */
    /* all passes, one and two threads); at 48-144 bytes 0.91-1.3x. Only     */
    /* then: at distances outside the window, taking every call lagged ran   */
    /* rows 1.1-1.25x slower (the runs 0.92-1.05x).                           */
    #define CBN_NT_LAGGED 2
    #define CBN_LAG_MIN_BYTES 32   /* exclusive: at 16, 32 the lag was mixed */
    #define CBN_LAG_MAX_BYTES 160  /* exclusive */
    /* How far dst lies ahead of src modulo 4 KiB, in bytes. */
    static inline uintptr_t cbn_ahead(const void* dst, const void* src) {
        return ((uintptr_t)dst - (uintptr_t)src) & 4095;
    }
    static inline int cbn_near_ahead(const void* dst, const void* src) {
        uintptr_t d = cbn_ahead(dst, src);
        return src != NULL && d > CBN_LAG_MIN_BYTES && d < CBN_LAG_MAX_BYTES;
    }
    /* nt, or CBN_NT_LAGGED if streamed dst is near ahead of one of the      */
    /* loop's inputs (up to eight; NULL for none).                            */
    static inline int cbn_lag(int nt, const void* dst, const void* p1, const void* p2,
                              const void* p3, const void* p4, const void* p5,
                              const void* p6, const void* p7, const void* p8) {
        const void* p[8] = {p1, p2, p3, p4, p5, p6, p7, p8};
        if (nt)
            for (int k = 0; k < 8; k++)
                if (cbn_near_ahead(dst, p[k]))
                    return CBN_NT_LAGGED;
        return nt;
    }
    /* The same for CBN_EACH_PERIODIC, whose lines load only their inputs     */
    /* (x, and dy), in its own window: dst 48 or 80 bytes ahead (more than   */
    /* CBN_LAG_PERIODIC_MIN_BYTES, less than ..._MAX, not a whole line). Both */
    /* ways in one process, cold 100352x64 rows, dst 0-512 bytes ahead of x  */
    /* (and dy) modulo 4 KiB: lagging won at 48 bytes (float32 1.02-1.09x,   */
    /* float64 evaluation 1.24x) and 80 (1.06-1.60x), lost at 32, 64 and 96- */
    /* 160 (0.53-0.97x; 144 mixed, 0.84-1.11x).                              */
    #define CBN_LAG_PERIODIC_MIN_BYTES 32  /* exclusive */
    #define CBN_LAG_PERIODIC_MAX_BYTES 96  /* exclusive */
    static inline int cbn_lag_periodic(int nt, const void* dst, const void* p1,
                                       const void* p2) {
        const void* p[2] = {p1, p2};
        if (nt)
            for (int k = 0; k < 2; k++) {
                uintptr_t d = cbn_ahead(dst, p[k]);
                if (p[k] != NULL && d > CBN_LAG_PERIODIC_MIN_BYTES
                        && d < CBN_LAG_PERIODIC_MAX_BYTES && d % 64 != 0)
                    return CBN_NT_LAGGED;
            }
        return nt;
    }
    /* The lagged streamed loop of CBN_EACH and CBN_EACH_PERIODIC: from start, */
    /* blocks of CBN_STREAM_BLOCK_BYTES, each built by BUILD (lines from i0 up */
    /* to stop, into blk_[cur_] from at_) and streamed out after the next     */
    /* block is built (see CBN_NT_LAGGED).                                    */
    #define CBN_LAGGED_BLOCKS(T, n, dst, start, BUILD)                            \\
    {                                                                             \\
        T blk_[2][CBN_STREAM_BLOCK_BYTES / sizeof(T)] __attribute__((aligned(64))); \\
        Py_ssize_t pend_at = 0, pend_n = 0;                                       \\
        int cur_ = 0;                                                             \\
        for (i0 = (start); i0 + w <= (n); ) {                                     \\
            Py_ssize_t stop = i0 + CBN_STREAM_BLOCK_BYTES / (Py_ssize_t)sizeof(T); \\
            const Py_ssize_t at_ = i0;                                            \\
            if (stop > (n)) stop = (n);                                           \\
            BUILD                                                                 \\
            cbn_stream_lines((dst) + pend_at, blk_[cur_ ^ 1], pend_n * sizeof(T)); \\
            pend_at = at_; pend_n = i0 - at_; cur_ ^= 1;                          \\
        }                                                                         \\
        cbn_stream_lines((dst) + pend_at, blk_[cur_ ^ 1], pend_n * sizeof(T));    \\
    }
    /* The one elementwise loop: v = EXPR (a function of i) for i in [0, n),  \\
       chk += v - v (0 unless some v is NaN/Inf), dst[i] = STORE(v). Whole     \\
       vectors of v - v add up in a register of per-lane checks, tested once   \\
       at the end: an `omp simd` reduction would add its lanes one by one per  \\
       call, about 60 cycles, as much as a 1 KiB row itself. With nt, the     \\
       64-byte lines wholly inside dst are built in registers and streamed,    \\
       in blocks of CBN_STREAM_BLOCK_BYTES, four lines per loop trip (as       \\
       oneDNN's streamed loops go): against one,                               \\
       both builds in one process, five processes, float32 evaluation and      \\
       backward of 65536x64, 32x56x56x64 (NHWC), 32x64x56x56 and 1024x4096:    \\
       0.94-1.10x, median 1.03. Same bits: each element's arithmetic is kept.  */\\
    #define CBN_EACH(T, n, dst, nt, chk, EXPR, STORE)                                 \\
        CBN_EACH_AHEAD(T, n, dst, nt, chk, 0, EXPR, STORE)
    /* CBN_EACH whose unstreamed loops ask for dst `ahead` bytes on for writing  \\
       (see CBN_OR_LOOP_AHEAD; 0: not).                                          */\\
    #define CBN_EACH_AHEAD(T, n, dst, nt, chk, ahead, EXPR, STORE)                    \\
    {                                                                                 \\
        Py_ssize_t i0 = 0;                                                            \\
        const Py_ssize_t w = (Py_ssize_t)(64 / sizeof(T));                            \\
        /* line_t only holds values; the arithmetic is T's. */                        \\
        typedef T line_t __attribute__((vector_size(64)));                            \\
        typedef T half_t __attribute__((vector_size(32)));                            \\
        half_t chk_lo = {0}, chk_hi = {0};                                            \\
        if (CBN_HAS_STREAM && (nt) && ((uintptr_t)(dst) % sizeof(T)) == 0) {          \\
            Py_ssize_t head = (Py_ssize_t)(((64 - ((uintptr_t)(dst) & 63)) & 63) / sizeof(T)); \\
            if (head > (n)) head = (n);                                               \\
            for (Py_ssize_t i = 0; i < head; i++) {                                   \\
                T v = EXPR; chk += v - v; (dst)[i] = STORE(v);                        \\
            }                                                                         \\
            if ((nt) == CBN_NT_LAGGED) {                                              \\
                /* Each block built into blk_[cur_] while the one before it */        \\
                /* is streamed out (see CBN_NT_LAGGED).                     */        \\
                CBN_LAGGED_BLOCKS(T, n, dst, head,                                    \\
                    _Pragma("GCC unroll 4")                                           \\
                    for (; i0 + w <= stop; i0 += w) {                                 \\
                        T z[64 / sizeof(T)];                                          \\
                        T* line = &blk_[cur_][i0 - at_];                              \\
                        _Pragma("omp simd")                                           \\
                        for (Py_ssize_t k = 0; k < w; k++) {                          \\
                            Py_ssize_t i = i0 + k;                                    \\
                            T v = EXPR; z[k] = v; line[k] = STORE(v);                 \\
                        }                                                             \\
                        CBN_CHECK_HALVES(half_t, z, chk_lo, chk_hi)                   \\
                    })                                                                \\
            } else                                                                    \\
            for (i0 = head; i0 + w <= (n); ) {                                        \\
                Py_ssize_t stop = i0 + CBN_STREAM_BLOCK_BYTES / (Py_ssize_t)sizeof(T); \\
                if (stop > (n)) stop = (n);                                           \\
                _Pragma("GCC unroll 4")                                               \\
                for (; i0 + w <= stop; i0 += w) {                                     \\
                    T z[64 / sizeof(T)], line[64 / sizeof(T)];                        \\
                    _Pragma("omp simd")                                               \\
                    for (Py_ssize_t k = 0; k < w; k++) {                              \\
                        Py_ssize_t i = i0 + k;                                        \\
                        T v = EXPR; z[k] = v; line[k] = STORE(v);                     \\
                    }                                                                 \\
                    CBN_CHECK_HALVES(half_t, z, chk_lo, chk_hi)                       \\
                    cbn_stream_built((dst) + i0, line);                               \\
                }                                                                     \\
            }                                                                         \\
        } else if ((n) * (Py_ssize_t)sizeof(T) >= CBN_OR_CHECK_BYTES) {              \\
            CBN_BITS(T) acc = 0;                                                      \\
            if (ahead)                                                                \\
                CBN_OR_LOOP_AHEAD(T, n, dst, acc, ahead, EXPR, STORE)                 \\
            else                                                                      \\
                CBN_OR_LOOP(T, n, dst, acc, EXPR, STORE)                              \\
            if (acc)                                                                  \\
                chk += 1;                                                             \\
            i0 = (n);                                                                 \\
        } else {                                                                      \\
            for (; i0 + w <= (n); i0 += w) {                                          \\
                T z[64 / sizeof(T)];                                                  \\
                if (ahead)                                                            \\
                    __builtin_prefetch((const char*)((dst) + i0) + (ahead), 1, 3);    \\
                _Pragma("omp simd")                                                   \\
                for (Py_ssize_t k = 0; k < w; k++) {                                  \\
                    Py_ssize_t i = i0 + k;                                            \\
                    T v = EXPR; z[k] = v; (dst)[i] = STORE(v);                        \\
                }                                                                     \\
                CBN_CHECK_HALVES(half_t, z, chk_lo, chk_hi)                           \\
            }                                                                         \\
        }                                                                             \\
        for (Py_ssize_t i = i0; i < (n); i++) {                                       \\
            T v = EXPR; chk += v - v; (dst)[i] = STORE(v);                            \\
        }                                                                             \\
        chk_lo += chk_hi;                                                             \\
        if (cbn_any_bits(&chk_lo, 32))                                                \\
            chk += 1;                                                                 \\
    }
    /* CBN_EACH's streamed loop (nt, lagged or not) for rows whose coefficient */\\
    /* rows repeat every `period` values, a divisor of L lines (L a literal). */\\
    /* HOLD declares copies of the coefficients of the first L whole lines    */\\
    /* (from head_, as vectors c_v[l], CBN_HOLD), which serve every later     */\\
    /* group of L lines from registers: each line loads only its input lines. */\\
    /* VEXPR is EXPR on whole lines: inputs CBN_LINE(p) (p's line at i),      */\\
    /* coefficients c_v[l]; VSTORE is STORE on a line. The same arithmetic    */\\
    /* per element: the same bits as CBN_EACH. See cbn_periodic.              */\\
    #define CBN_EACH_PERIODIC(T, n, dst, L, nt, chk, HOLD, EXPR, VEXPR, STORE, VSTORE) \\
    {                                                                             \\
        const Py_ssize_t w = (Py_ssize_t)(64 / sizeof(T));                        \\
        typedef T line_t __attribute__((vector_size(64)));                        \\
        line_t chk_v = {0};                                                       \\
        T* const dst_ = (dst);                                                    \\
        const Py_ssize_t head_ = (Py_ssize_t)(((64 - ((uintptr_t)dst_ & 63)) & 63) / sizeof(T)); \\
        Py_ssize_t i0;                                                            \\
        for (Py_ssize_t i = 0; i < head_; i++) {                                  \\
            T v = EXPR; chk += v - v; dst_[i] = STORE(v);                         \\
        }                                                                         \\
        HOLD                                                                      \\
        if ((nt) == CBN_NT_LAGGED) {                                              \\
            /* As CBN_EACH's lagged loop (CBN_LAGGED_BLOCKS).              */     \\
            CBN_LAGGED_BLOCKS(T, n, dst_, head_,                                  \\
                CBN_PERIODIC_BLOCK(L, stop, VEXPR, VSTORE, CBN_PUT_BLOCK))        \\
        } else                                                                    \\
            for (i0 = head_; i0 + w <= (n); ) {                                   \\
                Py_ssize_t stop = i0 + CBN_STREAM_BLOCK_BYTES / (Py_ssize_t)sizeof(T); \\
                if (stop > (n)) stop = (n);                                       \\
                CBN_PERIODIC_BLOCK(L, stop, VEXPR, VSTORE, CBN_PUT_STREAM)        \\
            }                                                                     \\
        for (Py_ssize_t i = i0; i < (n); i++) {                                   \\
            T v = EXPR; chk += v - v; dst_[i] = STORE(v);                         \\
        }                                                                         \\
        if (cbn_any_bits(&chk_v, 64))                                             \\
            chk += 1;                                                             \\
    }
    /* The lines of one block of CBN_EACH_PERIODIC, from i0 to stop, L at a   */
    /* time, then the last ones (fewer than L, at the end of the row); PUT    */
    /* writes each line.                                                      */
    #define CBN_PERIODIC_BLOCK(L, stop, VEXPR, VSTORE, PUT)                       \\
        for (; i0 + (L) * w <= (stop); i0 += (L) * w) {                           \\
            _Pragma("GCC unroll 8")                                               \\
            for (int l = 0; l < (L); l++) {                                       \\
                const Py_ssize_t i = i0 + l * w;                                  \\
                line_t v = VEXPR;                                                 \\
                chk_v += v - v;                                                   \\
                PUT(i, VSTORE(v));                                                \\
            }                                                                     \\
        }                                                                         \\
        for (int l = 0; i0 + w <= (stop); i0 += w, l++) {                        \\
            const Py_ssize_t i = i0;                                              \\
            line_t v = VEXPR;                                                     \\
            chk_v += v - v;                                                       \\
            PUT(i, VSTORE(v));                                                    \\
        }
    #define CBN_PUT_STREAM(i, v) cbn_stream_vec(dst_ + (i), (v))
    #define CBN_PUT_BLOCK(i, v)                                                   \\
        do { line_t b_ = (v); memcpy(&blk_[cur_][(i) - at_], &b_, 64); } while (0)
    /* Coefficient row c's first L lines from head_, as vectors c_v (in       */
    /* CBN_EACH_PERIODIC).                                                    */
    #define CBN_HOLD(L, c)                                                        \\
        line_t c##_v[L];                                                          \\
        for (int l = 0; l < (L); l++)                                             \\
            memcpy(&c##_v[l], (c) + head_ + l * w, 64);
    /* p's line at i, as a vector (in CBN_EACH_PERIODIC).                     */
    #define CBN_LINE(p) ({ line_t t_; memcpy(&t_, (p) + i, 64); t_; })
    /* v where mask, else +0: the line form of `mask ? v : 0` (and, with the  */
    /* mask v > 0, of CBN_RELU_f/d).                                          */
    #define CBN_VSEL(mask, v) ((line_t)((mask) & (__typeof__(mask))(v)))
    #define CBN_VRELU(v) CBN_VSEL((v) > 0, v)
    /* With AVX-512 only: the coefficients of four lines of six rows take 24  */
    /* of its 32 vector registers; AVX2's 16 would spill them (the loads this */
    /* loop saves would come back as reloads). Not measured without AVX-512. */
    #if CBN_HAS_STREAM && defined(__AVX512F__)
    #define CBN_HAS_PERIODIC 1
    #define cbn_stream_vec(p, v) _mm512_stream_si512((__m512i*)(p), (__m512i)(v))
    #else
    #define CBN_HAS_PERIODIC 0
    #define cbn_stream_vec(p, v) do { line_t s_ = (v); cbn_stream_line((p), &s_); } while (0)
    #endif
    /* Whether a leaf over n values at dst, streamed as nt says (after        */
    /* cbn_lag), with coefficient rows that repeat every `period` values (0:  */
    /* unknown) takes CBN_EACH_PERIODIC with groups of L lines: the period    */
    /* divides L lines and the row holds the L lines after its head. L is 4   */
    /* (rows of up to 256 bytes), or 8 (512 bytes) for the leaves of up to   */
    /* three coefficient rows. Why: on the Zen 4 EPYC of session 18 a        */
    /* streamed loop ran at the speed of its loads, not its bytes: a plain   */
    /* loop reloading one 64-byte coefficient vector per line from L1 ran    */
    /* 1.1x slower than the same loop with it in a register, and CBN_EACH    */
    /* (two coefficient loads per line) 1.17-1.24x slower than a streamed    */
    /* copy (32x56x56x64 evaluation). Against CBN_EACH, both builds in one   */
    /* process, three processes, cold data, one thread (two threads, where  */
    /* memory paces both, 0.87-1.0x of the time): 65536x64 and 100352x64     */
    /* float32, 131072x32 and 32768x128: evaluation 0.68-0.80x of the time,  */
    /* training forward 0.85-0.91x, backward 0.89-0.94x, frozen backward     */
    /* 0.87-0.89x; float64 65536x64 (L = 8) evaluation 0.72-0.74x, training  */
    /* 0.84-0.88x; with ReLU, evaluation 0.64-0.70x, training 0.82-0.88x,    */
    /* backward 0.83x. Backward with L = 8 (four or more rows: 32 registers  */
    /* and spills) measured 0.93-1.09x: it keeps L = 4. With y 0, 48 or 80   */
    /* bytes ahead of x modulo 4 KiB (as the heap and mmap place arrays; the */
    /* latter two lagged, see cbn_lag_periodic), against the session's first */
    /* build: evaluation 0.69-0.90x, training 0.81-0.94x, backward of float32 */
    /* 0.87-1.02x.                                                           */
    static inline int cbn_periodic_fits(int nt, const void* dst, Py_ssize_t n,
                                        Py_ssize_t period, size_t size, int L) {
        Py_ssize_t held = (Py_ssize_t)(L * 64 / size);
        Py_ssize_t head = (Py_ssize_t)(((64 - ((uintptr_t)dst & 63)) & 63) / size);
        return CBN_HAS_PERIODIC && (nt == 1 || nt == CBN_NT_LAGGED) && period > 0
               && held % period == 0 && ((uintptr_t)dst % size) == 0 && n >= head + held;
    }
    /* The group of lines a leaf takes (4, or 8 where max_lines allows), or 0 */
    /* for CBN_EACH.                                                          */
    static inline int cbn_periodic(int nt, const void* dst, Py_ssize_t n, Py_ssize_t period,
                                   size_t size, int max_lines) {
        if (cbn_periodic_fits(nt, dst, n, period, size, 4))
            return 4;
        if (max_lines >= 8 && cbn_periodic_fits(nt, dst, n, period, size, 8))
            return 8;
        return 0;
    }
    /* CBN_EACH over K rows at once (K a literal 2 or 4), qs values apart: rows \\
       o = 0, qs (, 2qs, 3qs) of dst, where EXPR is a function of i and o. Each \\
       coefficient load serves K rows, and rows a K-th of the block apart make  \\
       K sequential streams (see cbn_quad_sums). No streamed stores. AHEAD: the \\
       bytes ahead at which each row's output lines are prefetched for writing  \\
       (0: none). The forward's K rows run ahead of their outputs' reads for   \\
       ownership without it: against the whole-line check of sessions 12-26,   \\
       on the Xeon of session 27, cold rows, one and two threads, training      \\
       forward 1.06-1.21x and evaluation 1.00-1.20x, the (64, 100) layer step   \\
       13.8-15.2 against 16.1-17.4 us; the backward's dx, prefetched so, ran    \\
       0.93x on (4096, 256) float32 and takes 0.                                */\\
    #define CBN_EACHK_WRITE_AHEAD 1024
    /* The same for the NCHW runs of training forward and evaluation           */
    /* (cbn_affine_runs, cbn_affine_run; unstreamed): runs of 2 KiB and more   */
    /* take each 1 KiB span of y after asking for the 1 KiB after it for      */
    /* writing, shorter runs ask for the line 1 KiB on before each line (the  */
    /* next runs of y follow in memory). On the Xeon of session 28, cold     */
    /* data, one process per build, two processes, against none: runs of 2   */
    /* KiB and more (32x64x56x56, 8x256x28x28, 64x16x32x32, both dtypes, one  */
    /* and two threads) evaluation 1.12-1.20x (PyTorch's time over cbn's      */
    /* 0.96-1.05x -> 1.09-1.19x), training forward 1.08-1.11x, 2 and 4 KiB   */
    /* ahead alike, in cache 0.99-1.13x; shorter runs (14x14 and 10x10 maps,  */
    /* 20x20 float32; one thread) evaluation 1.21-1.28x, training forward     */
    /* 1.15-1.21x. Those passes had been taken to run at the floor of a pass  */
    /* through the cache (ceiling.py's loop, which then asked for nothing     */
    /* ahead). Backward's dx over runs, prefetched so, ran 0.95-1.06x and    */
    /* takes none.                                                            */
    #ifndef CBN_RUNS_WRITE_AHEAD
    #define CBN_RUNS_WRITE_AHEAD 1024
    #endif
    #define CBN_EACHK(T, n, dst, qs, K, chk, AHEAD, EXPR, STORE)                      \\
    {                                                                                 \\
        Py_ssize_t i0 = 0;                                                            \\
        const Py_ssize_t w = (Py_ssize_t)(64 / sizeof(T));                            \\
        typedef T line_t __attribute__((vector_size(64)));                            \\
        typedef T half_t __attribute__((vector_size(32)));                            \\
        half_t chk_lo = {0}, chk_hi = {0};                                            \\
        for (; i0 + w <= (n); i0 += w) {                                              \\
            T z[64 / sizeof(T)];                                                      \\
            if ((AHEAD) > 0)                                                          \\
                for (int r_ = 0; r_ < (K); r_++)                                      \\
                    __builtin_prefetch((dst) + r_ * (qs) + i0                         \\
                                       + (AHEAD) / (Py_ssize_t)sizeof(T), 1, 3);      \\
            _Pragma("omp simd")                                                       \\
            for (Py_ssize_t k = 0; k < w; k++) {                                      \\
                const Py_ssize_t i = i0 + k;                                          \\
                Py_ssize_t o = 0;                                                     \\
                T v0 = EXPR; (dst)[i] = STORE(v0);                                    \\
                o = (qs);                                                             \\
                T v1 = EXPR; (dst)[o + i] = STORE(v1);                                \\
                T zk = (v0 - v0) + (v1 - v1);                                         \\
                if ((K) == 4) {                                                       \\
                    o = 2 * (qs);                                                     \\
                    T v2 = EXPR; (dst)[o + i] = STORE(v2);                            \\
                    o = 3 * (qs);                                                     \\
                    T v3 = EXPR; (dst)[o + i] = STORE(v3);                            \\
                    zk = zk + ((v2 - v2) + (v3 - v3));                                \\
                }                                                                     \\
                z[k] = zk;                                                            \\
            }                                                                         \\
            CBN_CHECK_HALVES(half_t, z, chk_lo, chk_hi)                               \\
        }                                                                             \\
        chk_lo += chk_hi;                                                             \\
        if (cbn_any_bits(&chk_lo, 32))                                                \\
            chk += 1;                                                                 \\
        for (Py_ssize_t rk = 0; rk < (K); rk++) {                                     \\
            const Py_ssize_t o = rk * (qs);                                           \\
            for (Py_ssize_t i = i0; i < (n); i++) {                                   \\
                T v = EXPR; chk += v - v; (dst)[o + i] = STORE(v);                    \\
            }                                                                         \\
        }                                                                             \\
    }

    /* The incoming gradient at (row q/p, channel j), masked by the fused ReLU. */
    #define CBN_G_PLAIN(q, p, j) ((double)(q)[j])
    #define CBN_G_RELU(q, p, j) \\
        (CBN_Z((p)[j], m[j], a[j], b[j]) > 0 ? (double)(q)[j] : 0.0)
    /* One column J of four rows: the body of CBN_ROWS_GRAD's loops, which     */
    /* supply p, q0 (x and dy of row r), qs (q rows in values), mu, s1, s2.    */
    #define CBN_GRAD_QUAD(G, J)                                                      \\
    {                                                                                \\
        const Py_ssize_t jj = (J);                                                   \\
        double g0 = G(q0, p, jj), g1 = G(q0 + qs, p + qs, jj);                       \\
        double g2 = G(q0 + 2 * qs, p + 2 * qs, jj);                                  \\
        double g3 = G(q0 + 3 * qs, p + 3 * qs, jj);                                  \\
        double mj = mu[jj];                                                          \\
        s1[jj] += (g0 + g1) + (g2 + g3);                                             \\
        s2[jj] += (g0 * ((double)p[jj] - mj) + g1 * ((double)p[qs + jj] - mj))       \\
               + (g2 * ((double)p[2 * qs + jj] - mj) + g3 * ((double)p[3 * qs + jj] - mj)); \\
    }
    /* Row backward sums over rows [0, rows) into s1[j], s2[j]: rows r, r + q,
       r + 2q, r + 3q (q = rows / 4) per update, as in cbn_quad_sums, with dy
       and x prefetched PREFETCH_BYTES ahead in each of the eight streams.     */
    #define CBN_ROWS_GRAD(T, G)                                                      \\
    {                                                                                \\
        const Py_ssize_t q = rows / 4, qs = q * stride;                              \\
        const Py_ssize_t step = (Py_ssize_t)(64 / sizeof(T));                        \\
        const Py_ssize_t ahead = (Py_ssize_t)(PREFETCH_BYTES / sizeof(T));           \\
        for (Py_ssize_t r = 0; r < q; r++) {                                         \\
            const T* p = x + r * stride;                                             \\
            const T* q0 = dy + r * stride;                                           \\
            Py_ssize_t j0 = 0;                                                       \\
            for (; j0 + step <= n; j0 += step) {                                     \\
                for (int k = 0; k < 4; k++) {                                        \\
                    __builtin_prefetch(p + k * qs + j0 + ahead, 0, 2);                 \\
                    __builtin_prefetch(q0 + k * qs + j0 + ahead, 0, 2);                \\
                }                                                                    \\
                _Pragma("omp simd")                                                  \\
                for (Py_ssize_t k = 0; k < step; k++)                                \\
                    CBN_GRAD_QUAD(G, j0 + k)                                         \\
            }                                                                        \\
            _Pragma("omp simd")                                                      \\
            for (Py_ssize_t j = j0; j < n; j++)                                      \\
                CBN_GRAD_QUAD(G, j)                                                  \\
        }                                                                            \\
        for (Py_ssize_t r = 4 * q; r < rows; r++) {                                  \\
            const T* p = x + r * stride;                                             \\
            const T* q0 = dy + r * stride;                                           \\
            _Pragma("omp simd")                                                      \\
            for (Py_ssize_t j = 0; j < n; j++) {                                     \\
                double g = G(q0, p, j);                                              \\
                s1[j] += g;                                                          \\
                s2[j] += g * ((double)p[j] - mu[j]);                                 \\
            }                                                                        \\
        }                                                                            \\
    }

    /* One column J of four rows: the body of cbn_quad_sums' loops, which      */
    /* supply p, q, shift, s1, s2.                                             */
    #define CBN_STATS_QUAD(J)                                                        \\
    {                                                                                \\
        const Py_ssize_t jj = (J);                                                   \\
        double d0 = (double)p[jj] - shift[jj], d1 = (double)p[q + jj] - shift[jj];   \\
        double d2 = (double)p[2 * q + jj] - shift[jj], d3 = (double)p[3 * q + jj] - shift[jj]; \\
        s1[jj] += (d0 + d1) + (d2 + d3);                                             \\
        s2[jj] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);                         \\
    }

    /* cbn_affine_row's periodic loop over groups of L lines (its x, y, n, m, */
    /* a, b, pnt and chk), with STORE and VSTORE (plain or ReLU).             */
    #define CBN_AFFINE_PERIODIC(T, L, STORE, VSTORE)                              \\
        CBN_EACH_PERIODIC(T, n, y, L, pnt, chk,                                   \\
                          CBN_HOLD(L, m) CBN_HOLD(L, a) CBN_HOLD(L, b),           \\
                          CBN_Z(x[i], m[i], a[i], b[i]),                          \\
                          CBN_Z(CBN_LINE(x), m_v[l], a_v[l], b_v[l]), STORE, VSTORE)
    #define CBN_LEAVES(S, T)                                                         \\
    /* Shifted sums of four short rows p, p + q, p + 2q, p + 3q of n values    \\
       (n * sizeof(T) <= QUAD_ROW_BYTES) into s1[j], s2[j]. Four rows per update \\
       of the memory-resident sums cut their load/store traffic fourfold. Four  \\
       adjacent short rows share a page, which the hardware prefetcher does not \\
       follow; rows q apart make four sequential streams, and each is also      \\
       prefetched STATS_PREFETCH_BYTES ahead in software, since the loop does too\\
       much work per byte for the hardware to run far enough ahead alone.       \\
       Measured against adjacent rows without prefetch, both builds in one      \\
       process on cold data: (4096, 256) statistics 2.5x (float32) and 2.0x     \\
       (float64) faster, (1024, 512) float32 2.0x; rows of 4-8 KiB (against  \\
       the adjacent rows of _stats_rows) float32 1.1-1.25x, float64 1.0-1.04x.  \\
       Rows of 16 KiB stay with _stats_rows, which this leaf ran 0.9-0.97x of. */\\
    static inline void cbn_quad_sums_##S(const T* p, Py_ssize_t q, Py_ssize_t n,     \\
            const double* __restrict shift, double* __restrict s1,                 \\
            double* __restrict s2) {                                                 \\
        const Py_ssize_t step = (Py_ssize_t)(64 / sizeof(T));                        \\
        const Py_ssize_t ahead = (Py_ssize_t)(STATS_PREFETCH_BYTES(T, n) / sizeof(T));\\
        Py_ssize_t j0 = 0;                                                           \\
        for (; j0 + step <= n; j0 += step) {                                         \\
            for (int k = 0; k < 4; k++)                                              \\
                __builtin_prefetch(p + k * q + j0 + ahead, 0, 2);                    \\
            _Pragma("omp simd")                                                      \\
            for (Py_ssize_t k = 0; k < step; k++)                                    \\
                CBN_STATS_QUAD(j0 + k)                                               \\
        }                                                                            \\
        _Pragma("omp simd")                                                          \\
        for (Py_ssize_t j = j0; j < n; j++)                                          \\
            CBN_STATS_QUAD(j)                                                        \\
    }                                                                                \\
    /* Row form (inner == 1): backward sums over rows [0, rows) of n channels,   \\
       `stride` apart, into per-channel accumulators s1[j], s2[j], four rows     \\
       per update (CBN_ROWS_GRAD). Measured against one row per update, all     \\
       builds in one process on cold data: (256, 1024) backward 1.19x; with the \\
       L2 prefetch, rows of 72-512 channels 1.03-1.18x (float32 and float64).  */\\
    static inline void cbn_rows_grad_sums_##S(const T* dy, const T* x,           \\
            Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t n, const double* mu,  \\
            const T* m, const T* a, const T* b, int relu,                        \\
            double* __restrict s1, double* __restrict s2) {                      \\
        if (relu)                                                                \\
            CBN_ROWS_GRAD(T, CBN_G_RELU)                                         \\
        else                                                                     \\
            CBN_ROWS_GRAD(T, CBN_G_PLAIN)                                        \\
    }                                                                            \\
    /* y = relu?(CBN_Z(x, m, a, b)), coefficients per element (row form).      */\\
    /* Each elementwise leaf returns 1 if some value is NaN or infinite.        */\\
    static inline int cbn_affine_row_##S(const T* x, T* y, Py_ssize_t n,             \\
            const T* m, const T* a, const T* b, int relu, int nt, Py_ssize_t period) {\\
        T chk = 0;                                                                   \\
        const int pnt = cbn_lag_periodic(nt, y, x, NULL);                            \\
        nt = cbn_lag(nt, y, x, m, a, b, NULL, NULL, NULL, NULL);                     \\
        const int group = cbn_periodic(pnt, y, n, period, sizeof(T), 8);             \\
        if (group == 4 && relu)                                                      \\
            CBN_AFFINE_PERIODIC(T, 4, CBN_RELU_##S, CBN_VRELU)                       \\
        else if (group == 4)                                                         \\
            CBN_AFFINE_PERIODIC(T, 4, CBN_SAME, CBN_SAME)                            \\
        else if (group == 8 && relu)                                                 \\
            CBN_AFFINE_PERIODIC(T, 8, CBN_RELU_##S, CBN_VRELU)                       \\
        else if (group == 8)                                                         \\
            CBN_AFFINE_PERIODIC(T, 8, CBN_SAME, CBN_SAME)                            \\
        else if (relu)                                                               \\
            CBN_EACH(T, n, y, nt, chk, CBN_Z(x[i], m[i], a[i], b[i]), CBN_RELU_##S)  \\
        else                                                                         \\
            CBN_EACH(T, n, y, nt, chk, CBN_Z(x[i], m[i], a[i], b[i]), CBN_SAME)      \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* The same for k (2 or 4) rows qs values apart (CBN_EACHK), without nt.    */\\
    static inline int cbn_affine_rowk_##S(const T* x, T* y, Py_ssize_t n,            \\
            Py_ssize_t qs, int k, const T* m, const T* a, const T* b, int relu) {    \\
        T chk = 0;                                                                   \\
        if (relu && k == 2)                                                          \\
            CBN_EACHK(T, n, y, qs, 2, chk, CBN_EACHK_WRITE_AHEAD, CBN_Z(x[o + i], m[i], a[i], b[i]), CBN_RELU_##S) \\
        else if (relu)                                                               \\
            CBN_EACHK(T, n, y, qs, 4, chk, CBN_EACHK_WRITE_AHEAD, CBN_Z(x[o + i], m[i], a[i], b[i]), CBN_RELU_##S) \\
        else if (k == 2)                                                             \\
            CBN_EACHK(T, n, y, qs, 2, chk, CBN_EACHK_WRITE_AHEAD, CBN_Z(x[o + i], m[i], a[i], b[i]), CBN_SAME) \\
        else                                                                         \\
            CBN_EACHK(T, n, y, qs, 4, chk, CBN_EACHK_WRITE_AHEAD, CBN_Z(x[o + i], m[i], a[i], b[i]), CBN_SAME) \\
        return chk != 0;                                                             \\
    }                                                                                \\
    static inline int cbn_affine2_rowk_##S(const T* x, T* y, Py_ssize_t n,           \\
            Py_ssize_t qs, int k, const T* a, const T* c) {                          \\
        T chk = 0;                                                                   \\
        if (k == 2)                                                                  \\
            CBN_EACHK(T, n, y, qs, 2, chk, CBN_EACHK_WRITE_AHEAD, x[o + i] * a[i] + c[i], CBN_SAME)         \\
        else                                                                         \\
            CBN_EACHK(T, n, y, qs, 4, chk, CBN_EACHK_WRITE_AHEAD, x[o + i] * a[i] + c[i], CBN_SAME)         \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* y = x*a + c, coefficients per element (row form, no ReLU): one           */\\
    /* coefficient row fewer to stream than CBN_Z (see cbn_uncentre).           */\\
    static inline int cbn_affine2_row_##S(const T* x, T* y, Py_ssize_t n,            \\
            const T* a, const T* c, int nt, Py_ssize_t period) {                     \\
        T chk = 0;                                                                   \\
        const int pnt = cbn_lag_periodic(nt, y, x, NULL);                            \\
        nt = cbn_lag(nt, y, x, a, c, NULL, NULL, NULL, NULL, NULL);                  \\
        const int group = cbn_periodic(pnt, y, n, period, sizeof(T), 8);             \\
        if (group == 4)                                                              \\
            CBN_EACH_PERIODIC(T, n, y, 4, pnt, chk, CBN_HOLD(4, a) CBN_HOLD(4, c),   \\
                              x[i] * a[i] + c[i], CBN_LINE(x) * a_v[l] + c_v[l],     \\
                              CBN_SAME, CBN_SAME)                                    \\
        else if (group == 8)                                                         \\
            CBN_EACH_PERIODIC(T, n, y, 8, pnt, chk, CBN_HOLD(8, a) CBN_HOLD(8, c),   \\
                              x[i] * a[i] + c[i], CBN_LINE(x) * a_v[l] + c_v[l],     \\
                              CBN_SAME, CBN_SAME)                                    \\
        else                                                                         \\
            CBN_EACH(T, n, y, nt, chk, x[i] * a[i] + c[i], CBN_SAME)                 \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* The same with one channel's scalar coefficients (run form). */               \\
    static inline int cbn_affine_run_##S(const T* x, T* y, Py_ssize_t n,             \\
                                         T m, T a, T b, int relu, int nt) {          \\
        T chk = 0;                                                                   \\
        nt = cbn_lag(nt, y, x, NULL, NULL, NULL, NULL, NULL, NULL, NULL);            \\
        if (relu)                                                                    \\
            CBN_EACH_AHEAD(T, n, y, nt, chk, CBN_RUNS_WRITE_AHEAD,                   \\
                           CBN_Z(x[i], m, a, b), CBN_RELU_##S)                       \\
        else                                                                         \\
            CBN_EACH_AHEAD(T, n, y, nt, chk, CBN_RUNS_WRITE_AHEAD,                   \\
                           CBN_Z(x[i], m, a, b), CBN_SAME)                           \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* cbn_affine_run over runs u0 .. u1-1 of n values each (run u: channel      \\
       u % C; coefficients m[c], a[c], b[c], m NULL for 0). Unstreamed runs of   \\
       at least CBN_OR_CHECK_BYTES go through one lean loop: per run, the three  \\
       coefficients and CBN_OR_LOOP, without a call, a division or the lag and  \\
       stream branches between runs. Why it pays (a reading; perf is not       \\
       available to confirm it): with y cold and not streamed (outputs under    \\
       the streaming threshold), each run's stores wait for their lines from    \\
       memory, and the instructions between one run's last store and the next   \\
       run's first load take room in the reorder window that would hold loads;  \\
       the loop itself is instruction for instruction CBN_EACH's. Against a call of cbn_affine_run per run, both builds in one      \\
       process, cold data, one thread, NCHW evaluation on the AMD EPYC Zen 4 of \\
       session 19: with y 336 bytes ahead of x modulo 4 KiB (where bench.py's   \\
       buffers land), five processes, float32 8x256x28x28 0.83x of the time and \\
       64x16x32x32 0.91x, where PyTorch had run 0.83x and 0.90x; at y's page    \\
       offset equal to x's, three processes, 0.86-0.98x (two threads 0.92-1.0x,\\
       in cache 0.86-0.99x). Training forward, the fused ReLU and streamed runs \\
       measured alike (0.97-1.03x). Same bits: each element's arithmetic and    \\
       check are CBN_EACH's.                                                    */\\
    static inline int cbn_affine_runs_##S(const T* x, T* y, Py_ssize_t n,           \\
            Py_ssize_t C, Py_ssize_t u0, Py_ssize_t u1, const T* m, const T* a,      \\
            const T* b, int relu, int nt) {                                          \\
        int bad = 0;                                                                 \\
        Py_ssize_t c = u0 % C;                                                       \\
        if (nt || n * (Py_ssize_t)sizeof(T) < CBN_OR_CHECK_BYTES) {                  \\
            for (Py_ssize_t u = u0; u < u1; u++) {                                   \\
                bad |= cbn_affine_run_##S(x + u * n, y + u * n, n, m ? m[c] : 0,     \\
                                          a[c], b[c], relu, nt);                     \\
                if (++c == C) c = 0;                                                 \\
            }                                                                        \\
            return bad;                                                              \\
        }                                                                            \\
        CBN_BITS(T) acc = 0;                                                         \\
        for (Py_ssize_t u = u0; u < u1; u++) {                                       \\
            const T* const xr = x + u * n;                                           \\
            T* const yr = y + u * n;                                                 \\
            const T mc = m ? m[c] : 0, ac = a[c], bc = b[c];                         \\
            if (relu)                                                                \\
                CBN_OR_LOOP_AHEAD(T, n, yr, acc, CBN_RUNS_WRITE_AHEAD,               \\
                                  CBN_Z(xr[i], mc, ac, bc), CBN_RELU_##S)            \\
            else                                                                     \\
                CBN_OR_LOOP_AHEAD(T, n, yr, acc, CBN_RUNS_WRITE_AHEAD,               \\
                                  CBN_Z(xr[i], mc, ac, bc), CBN_SAME)                \\
            if (++c == C) c = 0;                                                     \\
        }                                                                            \\
        return acc != 0;                                                             \\
    }                                                                                \\
    /* dx = a*(g + k0 + kx*((x - m)*s)), coefficients per element (row form). The  */\\
    /* normalized (x - m)*s is formed first: kx*s alone underflows float32 when     */\\
    /* the input is large (kx*s ~ 1/std^2). g is dy masked where the forward        */\\
    /* pre-activation CBN_Z was not positive (fused ReLU). With s NULL, kx holds    */\\
    /* the slope kx*s of cbn_backward_coefs instead, one row fewer to read.                 */\\
    static inline int cbn_grad_row_##S(const T* dy, const T* x, T* dx, Py_ssize_t n, \\
            const T* m, const T* a, const T* b, const T* s, const T* kx, const T* k0,\\
            int relu, int nt, Py_ssize_t period) {                                   \\
        T chk = 0;                                                                   \\
        const int pnt = cbn_lag_periodic(nt, dx, dy, x);                             \\
        nt = cbn_lag(nt, dx, dy, x, m, a, b, s, kx, k0);                             \\
        if (cbn_periodic(pnt, dx, n, period, sizeof(T), 4) == 4) {                   \\
            if (s == NULL && relu)                                                   \\
                CBN_EACH_PERIODIC(T, n, dx, 4, pnt, chk,                             \\
                    CBN_HOLD(4, m) CBN_HOLD(4, a) CBN_HOLD(4, b) CBN_HOLD(4, kx)     \\
                    CBN_HOLD(4, k0),                                                 \\
                    a[i] * ((CBN_Z(x[i], m[i], a[i], b[i]) > 0 ? dy[i] : (T)0)       \\
                            + k0[i] + kx[i] * (x[i] - m[i])),                        \\
                    a_v[l] * (CBN_VSEL(CBN_Z(CBN_LINE(x), m_v[l], a_v[l], b_v[l]) > 0, \\
                                       CBN_LINE(dy))                                 \\
                              + k0_v[l] + kx_v[l] * (CBN_LINE(x) - m_v[l])),         \\
                    CBN_SAME, CBN_SAME)                                              \\
            else if (s == NULL)                                                      \\
                CBN_EACH_PERIODIC(T, n, dx, 4, pnt, chk,                             \\
                    CBN_HOLD(4, m) CBN_HOLD(4, a) CBN_HOLD(4, kx) CBN_HOLD(4, k0),   \\
                    a[i] * (dy[i] + k0[i] + kx[i] * (x[i] - m[i])),                  \\
                    a_v[l] * (CBN_LINE(dy) + k0_v[l] + kx_v[l] * (CBN_LINE(x) - m_v[l])), \\
                    CBN_SAME, CBN_SAME)                                              \\
            else if (relu)                                                           \\
                CBN_EACH_PERIODIC(T, n, dx, 4, pnt, chk,                             \\
                    CBN_HOLD(4, m) CBN_HOLD(4, a) CBN_HOLD(4, b) CBN_HOLD(4, s)      \\
                    CBN_HOLD(4, kx) CBN_HOLD(4, k0),                                 \\
                    a[i] * ((CBN_Z(x[i], m[i], a[i], b[i]) > 0 ? dy[i] : (T)0)       \\
                            + k0[i] + kx[i] * ((x[i] - m[i]) * s[i])),               \\
                    a_v[l] * (CBN_VSEL(CBN_Z(CBN_LINE(x), m_v[l], a_v[l], b_v[l]) > 0, \\
                                       CBN_LINE(dy))                                 \\
                              + k0_v[l] + kx_v[l] * ((CBN_LINE(x) - m_v[l]) * s_v[l])), \\
                    CBN_SAME, CBN_SAME)                                              \\
            else                                                                     \\
                CBN_EACH_PERIODIC(T, n, dx, 4, pnt, chk,                             \\
                    CBN_HOLD(4, m) CBN_HOLD(4, a) CBN_HOLD(4, s) CBN_HOLD(4, kx)     \\
                    CBN_HOLD(4, k0),                                                 \\
                    a[i] * (dy[i] + k0[i] + kx[i] * ((x[i] - m[i]) * s[i])),         \\
                    a_v[l] * (CBN_LINE(dy) + k0_v[l]                                 \\
                              + kx_v[l] * ((CBN_LINE(x) - m_v[l]) * s_v[l])),        \\
                    CBN_SAME, CBN_SAME)                                              \\
        } else if (s == NULL && relu)                                                \\
            CBN_EACH(T, n, dx, nt, chk,                                              \\
                     a[i] * ((CBN_Z(x[i], m[i], a[i], b[i]) > 0 ? dy[i] : (T)0)      \\
                             + k0[i] + kx[i] * (x[i] - m[i])), CBN_SAME)             \\
        else if (s == NULL)                                                          \\
            CBN_EACH(T, n, dx, nt, chk, a[i] * (dy[i] + k0[i] + kx[i] * (x[i] - m[i])), \\
                     CBN_SAME)                                                       \\
        else if (relu)                                                               \\
            CBN_EACH(T, n, dx, nt, chk,                                              \\
                     a[i] * ((CBN_Z(x[i], m[i], a[i], b[i]) > 0 ? dy[i] : (T)0)      \\
                             + k0[i] + kx[i] * ((x[i] - m[i]) * s[i])), CBN_SAME)    \\
        else                                                                         \\
            CBN_EACH(T, n, dx, nt, chk,                                              \\
                     a[i] * (dy[i] + k0[i] + kx[i] * ((x[i] - m[i]) * s[i])),        \\
                     CBN_SAME)                                                       \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* The same for four rows qs values apart (CBN_EACHK), without nt.          */\\
    static inline int cbn_grad_row4_##S(const T* dy, const T* x, T* dx, Py_ssize_t n,\\
            Py_ssize_t qs, const T* m, const T* a, const T* b, const T* s,           \\
            const T* kx, const T* k0, int relu) {                                    \\
        T chk = 0;                                                                   \\
        if (s == NULL && relu)                                                       \\
            CBN_EACHK(T, n, dx, qs, 4, chk, 0,                                          \\
                      a[i] * ((CBN_Z(x[o + i], m[i], a[i], b[i]) > 0 ? dy[o + i] : (T)0) \\
                              + k0[i] + kx[i] * (x[o + i] - m[i])), CBN_SAME)        \\
        else if (s == NULL)                                                          \\
            CBN_EACHK(T, n, dx, qs, 4, chk, 0,                                          \\
                      a[i] * (dy[o + i] + k0[i] + kx[i] * (x[o + i] - m[i])), CBN_SAME) \\
        else if (relu)                                                               \\
            CBN_EACHK(T, n, dx, qs, 4, chk, 0,                                          \\
                      a[i] * ((CBN_Z(x[o + i], m[i], a[i], b[i]) > 0 ? dy[o + i] : (T)0) \\
                              + k0[i] + kx[i] * ((x[o + i] - m[i]) * s[i])), CBN_SAME) \\
        else                                                                         \\
            CBN_EACHK(T, n, dx, qs, 4, chk, 0,                                          \\
                      a[i] * (dy[o + i] + k0[i] + kx[i] * ((x[o + i] - m[i]) * s[i])), \\
                      CBN_SAME)                                                      \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* The same with one channel's scalar coefficients (run form). */               \\
    static inline int cbn_grad_run_##S(const T* dy, const T* x, T* dx, Py_ssize_t n, \\
            T m, T a, T b, T s, T kx, T k0, int relu, int nt) {                      \\
        T chk = 0;                                                                   \\
        nt = cbn_lag(nt, dx, dy, x, NULL, NULL, NULL, NULL, NULL, NULL);             \\
        if (relu)                                                                    \\
            CBN_EACH(T, n, dx, nt, chk,                                              \\
                     a * ((CBN_Z(x[i], m, a, b) > 0 ? dy[i] : (T)0)                  \\
                          + k0 + kx * ((x[i] - m) * s)), CBN_SAME)                   \\
        else                                                                         \\
            CBN_EACH(T, n, dx, nt, chk, a * (dy[i] + k0 + kx * ((x[i] - m) * s)),    \\
                     CBN_SAME)                                                       \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* dx = a*dy (statistics fixed, no ReLU): x is not read at all. */               \\
    static inline int cbn_scale_row_##S(const T* dy, T* dx, Py_ssize_t n,            \\
                                        const T* a, int nt, Py_ssize_t period) {     \\
        T chk = 0;                                                                   \\
        const int pnt = cbn_lag_periodic(nt, dx, dy, NULL);                          \\
        nt = cbn_lag(nt, dx, dy, a, NULL, NULL, NULL, NULL, NULL, NULL);             \\
        const int group = cbn_periodic(pnt, dx, n, period, sizeof(T), 8);            \\
        if (group == 4)                                                              \\
            CBN_EACH_PERIODIC(T, n, dx, 4, pnt, chk, CBN_HOLD(4, a), a[i] * dy[i],   \\
                              a_v[l] * CBN_LINE(dy), CBN_SAME, CBN_SAME)             \\
        else if (group == 8)                                                         \\
            CBN_EACH_PERIODIC(T, n, dx, 8, pnt, chk, CBN_HOLD(8, a), a[i] * dy[i],   \\
                              a_v[l] * CBN_LINE(dy), CBN_SAME, CBN_SAME)             \\
        else                                                                         \\
            CBN_EACH(T, n, dx, nt, chk, a[i] * dy[i], CBN_SAME)                      \\
        return chk != 0;                                                             \\
    }                                                                                \\
    static inline int cbn_scale_row4_##S(const T* dy, T* dx, Py_ssize_t n,           \\
                                         Py_ssize_t qs, const T* a) {                \\
        T chk = 0;                                                                   \\
        CBN_EACHK(T, n, dx, qs, 4, chk, 0, a[i] * dy[o + i], CBN_SAME)                  \\
        return chk != 0;                                                             \\
    }                                                                                \\
    static inline int cbn_scale_run_##S(const T* dy, T* dx, Py_ssize_t n, T a,       \\
                                        int nt) {                                    \\
        T chk = 0;                                                                   \\
        nt = cbn_lag(nt, dx, dy, NULL, NULL, NULL, NULL, NULL, NULL, NULL);          \\
        CBN_EACH(T, n, dx, nt, chk, a * dy[i], CBN_SAME)                             \\
        return chk != 0;                                                             \\
    }
    CBN_LEAVES(f, float)
    CBN_LEAVES(d, double)

    /* Per-channel preparation, vectorized: branch-free checks (v - v is 0
       unless v is NaN or infinite) instead of isfinite() tests that would
       keep these loops scalar, which cost 3-7 ns per channel. cbn_invstd
       returns 2 if some var < 0 (checked in the pass that reads var anyway,
       not by a NumPy comparison per call), 1 if var or invstd is not finite,
       else 0. */
    static int cbn_invstd(Py_ssize_t C, const double* var, double eps, double* invstd) {
        double chk = 0.0;
        int neg = 0;
        _Pragma("omp simd reduction(+:chk) reduction(|:neg)")
        for (Py_ssize_t c = 0; c < C; c++) {
            double v = var[c];
            double s = 1.0 / sqrt(v + eps);
            invstd[c] = s;
            /* An infinite variance gives invstd 0 and a meaningless output. */
            chk += (v - v) + (s - s);
            neg |= v < 0.0;
        }
        return neg ? 2 : chk != 0.0;
    }
    #include <float.h>
    #define CBN_COEFS(S, T, TMIN, TMAX)                                               \\
    /* coef rows m, a, b, `stride` apart: m = mean rounded to T, a =            */ \\
    /* gamma*invstd, b = beta + (m - mean)*a, in T, for C channels. b takes back */ \\
    /* what rounding the mean cost (0 in float64): x - m is exact for x near m, */ \\
    /* so y is within an ulp or two of its scale whatever the offset; b = beta  */ \\
    /* was off by up to ulp(mean)/2 * a (1e4 ulps of y at an offset of 1e5     */ \\
    /* std in float32). A constant channel still gives b = beta exactly.       */ \\
    static int cbn_forward_coefs_##S(Py_ssize_t C, Py_ssize_t stride,               \\
            const double* mean, const double* invstd, const T* gamma, const T* beta,  \\
            T* coef) {                                                               \\
        T chk = 0;                                                                   \\
        _Pragma("omp simd reduction(+:chk)")                                         \\
        for (Py_ssize_t c = 0; c < C; c++) {                                         \\
            double ad = gamma[c] * invstd[c];                                        \\
            T m = (T)mean[c], a = (T)ad;                                             \\
            T b = (T)(beta[c] + ((double)m - mean[c]) * ad);                         \\
            coef[c] = m; coef[stride + c] = a; coef[2 * stride + c] = b;             \\
            chk += (m - m) + (a - a) + (b - b);                                      \\
        }                                                                            \\
        return chk != 0;                                                             \\
    }                                                                                \\
    /* Rows m, a, b become a, c = b - mean*a (y = x*a + c), if that form is as  */ \\
    /* accurate as CBN_Z for every channel: |mean*a| <= UNCENTRED_MAX*(|gamma|  */ \\
    /* + |beta|), so that rounding x*a and c costs a few units of the output's  */ \\
    /* scale. For |mean| >> std it would not be, and rows stay m, a, b. Returns */ \\
    /* 1 if rewritten. Streaming two rows instead of three: (256, 1024) float64 */ \\
    /* normalize 1.45x faster (the three rows, 24 KiB, crowd L1 out).           */ \\
    static int cbn_uncentre_##S(Py_ssize_t C, const double* mean, const T* gamma,    \\
                                const T* beta, T* coef) {                            \\
        int bad = 0;                                                                 \\
        _Pragma("omp simd reduction(|:bad)")                                         \\
        for (Py_ssize_t c = 0; c < C; c++) {                                         \\
            double ma = mean[c] * (double)coef[C + c];                               \\
            double bound = UNCENTRED_MAX * ((gamma[c] < 0 ? -(double)gamma[c] : (double)gamma[c]) \\
                                            + (beta[c] < 0 ? -(double)beta[c] : (double)beta[c])); \\
            bad |= !((ma < 0 ? -ma : ma) <= bound);                                  \\
        }                                                                            \\
        if (bad)                                                                     \\
            return 0;                                                                \\
        for (Py_ssize_t c = 0; c < C; c++) {                                         \\
            double a = (double)coef[C + c];                                          \\
            coef[c] = (T)a;                                                          \\
            coef[C + c] = (T)((double)beta[c] - mean[c] * a);                        \\
        }                                                                            \\
        return 1;                                                                    \\
    }                                                                                \\
    /* coef rows s = invstd, kx, k0 of C channels, rows R apart (rows m, a, b   */ \\
    /* already set); training has                                                */ \\
    /* kx = -invstd*sum_gd/count, k0 = -sum_g/count + kx*(m - mean)*invstd       */ \\
    /* (x_hat is formed from m, the mean rounded to T); evaluation has 0, 0.     */ \\
    /* Row 6: the slopes kx*invstd, in double then T, for the fused row form    */ \\
    /* of cbn_grad_row. Returns bit 1 if some coefficient is non-finite, bit 2  */ \\
    /* if some slope is neither 0 nor a normal T: it would lose precision       */ \\
    /* (inputs of std ~1e19 in float32) or overflow, so rows keep s and kx.     */ \\
    static int cbn_backward_coefs_##S(Py_ssize_t C, Py_ssize_t R, double count,     \\
            const double* mean, const double* invstd, const double* sum_g,           \\
            const double* sum_gd, int training, T* coef) {                           \\
        double chk = 0.0;                                                            \\
        int unsafe = 0;                                                              \\
        _Pragma("omp simd reduction(+:chk) reduction(|:unsafe)")                     \\
        for (Py_ssize_t c = 0; c < C; c++) {                                         \\
            double kx = 0.0, k0 = 0.0;                                               \\
            if (training) {                                                          \\
                kx = -invstd[c] * sum_gd[c] / count;                                 \\
                k0 = -sum_g[c] / count + kx * (((double)coef[c] - mean[c]) * invstd[c]); \\
            }                                                                        \\
            double q = kx * invstd[c], aq = q < 0 ? -q : q;                          \\
            T s = (T)invstd[c], tkx = (T)kx, tk0 = (T)k0;                            \\
            coef[3 * R + c] = s; coef[4 * R + c] = tkx; coef[5 * R + c] = tk0;       \\
            coef[6 * R + c] = (T)q;                                                  \\
            unsafe |= !(aq == 0.0 || (aq >= TMIN && aq <= TMAX));                    \\
            chk += (sum_g[c] - sum_g[c]) + (sum_gd[c] - sum_gd[c])                   \\
                   + (double)((s - s) + (tkx - tkx) + (tk0 - tk0));                  \\
        }                                                                            \\
        return (chk != 0.0) | (unsafe ? 2 : 0);                                      \\
    }
    CBN_COEFS(f, float, FLT_MIN, FLT_MAX)
    CBN_COEFS(d, double, DBL_MIN, DBL_MAX)

    /* Narrow rows (inner == 1, C = 8, 16, ..., 64): row reductions whose
       per-channel sums live in vector registers for a whole block of rows,
       read in address order. The general row loops keep the sums in memory
       and, on rows this short, spend more time loading and storing them than
       reading the data. GCC vector extensions: lowered to whatever vector
       width the target has. */
    typedef float cbn_f8 __attribute__((vector_size(32)));
    typedef double cbn_d8 __attribute__((vector_size(64)));
    typedef int cbn_i8 __attribute__((vector_size(32)));
    typedef long long cbn_l8 __attribute__((vector_size(64)));
    /* Eight floats to eight doubles. GCC lowers __builtin_convertvector on
       AVX-512 to two 128-to-256-bit conversions, an extract and an insert (5
       instructions for what one vcvtps2pd does): on the Xeon of session 28
       the float32 sums loops spent most of their time there, and the
       backward of 8x256x28x28 in cache ran 1.06x faster with the one
       instruction. */
    static inline cbn_d8 cbn_widen(cbn_f8 v) {
    #ifdef __AVX512F__
        return (cbn_d8)_mm512_cvtps_pd((__m256)v);
    #else
        return __builtin_convertvector(v, cbn_d8);
    #endif
    }
    static inline cbn_d8 cbn_wide_f(const float* p) {
        cbn_f8 v; memcpy(&v, p, sizeof v); return cbn_widen(v);
    }
    static inline cbn_d8 cbn_wide_d(const double* p) {
        cbn_d8 v; memcpy(&v, p, sizeof v); return v;
    }
    static inline cbn_f8 cbn_vec_f(const float* p) { cbn_f8 v; memcpy(&v, p, sizeof v); return v; }
    static inline cbn_d8 cbn_vec_d(const double* p) { cbn_d8 v; memcpy(&v, p, sizeof v); return v; }
    /* dy where CBN_Z(x, m, a, b) > 0, else 0, widened to double; z is formed
       in the data's own precision, exactly as the forward pass formed it. */
    static inline cbn_d8 cbn_masked_f(const float* dy, const float* x, cbn_f8 m, cbn_f8 a,
                                      cbn_f8 b) {
        cbn_i8 keep = CBN_Z(cbn_vec_f(x), m, a, b) > 0;
        cbn_f8 g = (cbn_f8)(keep & (cbn_i8)cbn_vec_f(dy));
        return cbn_widen(g);
    }
    static inline cbn_d8 cbn_masked_d(const double* dy, const double* x, cbn_d8 m, cbn_d8 a,
                                      cbn_d8 b) {
        cbn_l8 keep = CBN_Z(cbn_vec_d(x), m, a, b) > 0;
        return (cbn_d8)(keep & (cbn_l8)cbn_vec_d(dy));
    }
    /* The row loop of the narrow gradient sums: GQ is the (masked) gradient
       of channels 8q..8q+7 of row g (x row p), WIDE widens x to double. */
    #define CBN_NARROW_GRAD_ROWS(T, NQ, GQ, WIDE)                                    \\
        for (Py_ssize_t r = 0; r < rows; r++) {                                     \\
            const T* p = x + r * (8 * NQ);                                          \\
            const T* g = dy + r * (8 * NQ);                                         \\
            _Pragma("GCC unroll 8")                                                 \\
            for (int q = 0; q < NQ; q++) {                                          \\
                cbn_d8 gq = GQ;                                                     \\
                a1[q] += gq; a2[q] += gq * (WIDE(p + 8 * q) - vmu[q]);              \\
            }                                                                       \\
        }
    /* Write the register sums a1, a2 of NQ strips of 8 channels to s1, s2. */
    #define CBN_NARROW_STORE(NQ)                                                    \\
        _Pragma("GCC unroll 8")                                                     \\
        for (int q = 0; q < NQ; q++) {                                              \\
            memcpy(s1 + 8 * q, &a1[q], sizeof a1[q]);                               \\
            memcpy(s2 + 8 * q, &a2[q], sizeof a2[q]);                               \\
        }
    #define CBN_NARROW(S, T, NQ)                                                  \\
    /* s1 = sum(x - shift), s2 = sum((x - shift)^2) per channel, rows of 8*NQ.  */ \\
    static void cbn_narrow_sums_##S##NQ(const T* x, Py_ssize_t rows,                \\
            const double* shift, double* s1, double* s2) {                          \\
        cbn_d8 sh[NQ], a1[NQ], a2[NQ];                                              \\
        _Pragma("GCC unroll 8")                                                     \\
        for (int q = 0; q < NQ; q++) {                                              \\
            sh[q] = cbn_wide_d(shift + 8 * q);                                      \\
            a1[q] = (cbn_d8){0}; a2[q] = (cbn_d8){0};                               \\
        }                                                                           \\
        for (Py_ssize_t r = 0; r < rows; r++) {                                     \\
            const T* p = x + r * (8 * NQ);                                          \\
            _Pragma("GCC unroll 8")                                                 \\
            for (int q = 0; q < NQ; q++) {                                          \\
                cbn_d8 d = cbn_wide_##S(p + 8 * q) - sh[q];                         \\
                a1[q] += d; a2[q] += d * d;                                         \\
            }                                                                       \\
        }                                                                           \\
        CBN_NARROW_STORE(NQ)                                                        \\
    }                                                                               \\
    /* s1 = sum(g), s2 = sum(g * (x - mu)) per channel, g = dy masked by the    */ \\
    /* fused ReLU (coefficients m, a, b of the forward pass).                   */ \\
    static void cbn_narrow_grad_sums_##S##NQ(const T* dy, const T* x,               \\
            Py_ssize_t rows, const double* mu, const T* m, const T* a, const T* b,  \\
            int relu, double* s1, double* s2) {                                     \\
        cbn_d8 vmu[NQ], a1[NQ], a2[NQ];                                             \\
        _Pragma("GCC unroll 8")                                                     \\
        for (int q = 0; q < NQ; q++) {                                              \\
            vmu[q] = cbn_wide_d(mu + 8 * q);                                        \\
            a1[q] = (cbn_d8){0}; a2[q] = (cbn_d8){0};                               \\
        }                                                                           \\
        if (relu)                                                                   \\
            CBN_NARROW_GRAD_ROWS(T, NQ, cbn_masked_##S(g + 8 * q, p + 8 * q,           \\
                cbn_vec_##S(m + 8 * q), cbn_vec_##S(a + 8 * q), cbn_vec_##S(b + 8 * q)), \\
                cbn_wide_##S)                                                       \\
        else                                                                        \\
            CBN_NARROW_GRAD_ROWS(T, NQ, cbn_wide_##S(g + 8 * q), cbn_wide_##S)      \\
        CBN_NARROW_STORE(NQ)                                                        \\
    }
    #define CBN_NARROW_ALL(S, T)                                                      \\
    CBN_NARROW(S, T, 1) CBN_NARROW(S, T, 2) CBN_NARROW(S, T, 3) CBN_NARROW(S, T, 4)  \\
    CBN_NARROW(S, T, 5) CBN_NARROW(S, T, 6) CBN_NARROW(S, T, 7) CBN_NARROW(S, T, 8)  \\
    /* Returns 0 (and does nothing) unless C is one of 8, 16, ..., 64. */            \\
    static int cbn_narrow_sums_##S(const T* x, Py_ssize_t rows, Py_ssize_t C,        \\
            const double* shift, double* s1, double* s2) {                           \\
        switch (C) {                                                                 \\
        case 8: cbn_narrow_sums_##S##1(x, rows, shift, s1, s2); return 1;            \\
        case 16: cbn_narrow_sums_##S##2(x, rows, shift, s1, s2); return 1;           \\
        case 24: cbn_narrow_sums_##S##3(x, rows, shift, s1, s2); return 1;           \\
        case 32: cbn_narrow_sums_##S##4(x, rows, shift, s1, s2); return 1;           \\
        case 40: cbn_narrow_sums_##S##5(x, rows, shift, s1, s2); return 1;           \\
        case 48: cbn_narrow_sums_##S##6(x, rows, shift, s1, s2); return 1;           \\
        case 56: cbn_narrow_sums_##S##7(x, rows, shift, s1, s2); return 1;           \\
        case 64: cbn_narrow_sums_##S##8(x, rows, shift, s1, s2); return 1;           \\
        default: return 0;                                                           \\
        }                                                                            \\
    }                                                                                \\
    static int cbn_narrow_grad_sums_##S(const T* dy, const T* x, Py_ssize_t rows,    \\
            Py_ssize_t C, const double* mu, const T* m, const T* a, const T* b,      \\
            int relu, double* s1, double* s2) {                                      \\
        switch (C) {                                                                 \\
        case 8: cbn_narrow_grad_sums_##S##1(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 16: cbn_narrow_grad_sums_##S##2(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 24: cbn_narrow_grad_sums_##S##3(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 32: cbn_narrow_grad_sums_##S##4(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 40: cbn_narrow_grad_sums_##S##5(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 48: cbn_narrow_grad_sums_##S##6(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 56: cbn_narrow_grad_sums_##S##7(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        case 64: cbn_narrow_grad_sums_##S##8(dy, x, rows, mu, m, a, b, relu, s1, s2); return 1; \\
        default: return 0;                                                           \\
        }                                                                            \\
    }
    CBN_NARROW_ALL(f, float)
    CBN_NARROW_ALL(d, double)

    /* Sum of an eight-lane accumulator, in a fixed order. */
    static inline double cbn_lanes(cbn_d8 v) {
        return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
    }
    /* Run reductions (inner > 1) keep two eight-lane accumulators per sum,  */
    /* two or four independent chains of vector adds: one chain (an `omp simd` */
    /* reduction) waits out the add latency on every vector, four doubles per  */
    /* four cycles, below memory speed on float32. Each 16-value step also     */
    /* prefetches its streams `ahead` bytes on into L2: runs are short (3 KiB  */
    /* for 28x28 float32) and the hardware prefetcher, which stops at page     */
    /* ends, ramps up again on every one. Against one chain without prefetch,  */
    /* one process, cold NCHW batches of 2-50 MB on a Xeon: see RESULTS.md.   */
    #define CBN_RUN_PREFETCH(p, ahead)                                                \\
        { for (size_t o_ = 0; o_ < 16 * sizeof(*(p)); o_ += 64)                       \\
              __builtin_prefetch((const char*)(p) + o_ + (ahead), 0, 2); }
    /* One stream (statistics) 4 KiB ahead, two (backward sums) 2 KiB each:    */
    /* against 512 B-1 KiB, 1.05-1.15x; 4 KiB for two streams, 0.96-1.03x.     */
    #define RUN_STATS_AHEAD 4096
    #define RUN_GRAD_AHEAD 2048
    #define CBN_RUN_SUMS(S, T)                                                        \\
    /* s1 += sum(x - shift), s2 += sum((x - shift)^2) over a run. */                 \\
    static inline void cbn_run_sums_##S(const T* x, Py_ssize_t n, double shift,      \\
                                        double* s1_out, double* s2_out) {            \\
        cbn_d8 a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0};                               \\
        Py_ssize_t i = 0;                                                            \\
        for (; i + 16 <= n; i += 16) {                                               \\
            CBN_RUN_PREFETCH(x + i, RUN_STATS_AHEAD)                                 \\
            cbn_d8 d0 = cbn_wide_##S(x + i) - shift, d1 = cbn_wide_##S(x + i + 8) - shift; \\
            a1 += d0; b1 += d1;                                                      \\
            a2 += d0 * d0; b2 += d1 * d1;                                            \\
        }                                                                            \\
        double s1 = cbn_lanes(a1 + b1), s2 = cbn_lanes(a2 + b2);                     \\
        for (; i < n; i++) {                                                         \\
            double d = (double)x[i] - shift;                                         \\
            s1 += d;                                                                 \\
            s2 += d * d;                                                             \\
        }                                                                            \\
        *s1_out += s1;                                                               \\
        *s2_out += s2;                                                               \\
    }                                                                                \\
    /* s1 += sum(g), s2 += sum(g * (x - mu)) over a run, g = dy masked by ReLU. */   \\
    static inline void cbn_run_grad_sums_##S(const T* dy, const T* x, Py_ssize_t n,  \\
                                             double mu, T m, T a, T b, int relu,     \\
                                             Py_ssize_t ahead,                       \\
                                             double* s1_out, double* s2_out) {       \\
        cbn_d8 a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0};                               \\
        Py_ssize_t i = 0;                                                            \\
        if (relu)                                                                    \\
            for (; i + 16 <= n; i += 16) {                                           \\
                CBN_RUN_PREFETCH(x + i, ahead)                                       \\
                CBN_RUN_PREFETCH(dy + i, ahead)                                      \\
                cbn_d8 g0 = cbn_masked_##S(dy + i, x + i, m - (cbn_v_##S){0},         \\
                                           a - (cbn_v_##S){0}, b - (cbn_v_##S){0});  \\
                cbn_d8 g1 = cbn_masked_##S(dy + i + 8, x + i + 8, m - (cbn_v_##S){0}, \\
                                           a - (cbn_v_##S){0}, b - (cbn_v_##S){0});  \\
                a1 += g0; b1 += g1;                                                  \\
                a2 += g0 * (cbn_wide_##S(x + i) - mu);                               \\
                b2 += g1 * (cbn_wide_##S(x + i + 8) - mu);                           \\
            }                                                                        \\
        else                                                                         \\
            for (; i + 16 <= n; i += 16) {                                           \\
                CBN_RUN_PREFETCH(x + i, ahead)                                       \\
                CBN_RUN_PREFETCH(dy + i, ahead)                                      \\
                cbn_d8 g0 = cbn_wide_##S(dy + i), g1 = cbn_wide_##S(dy + i + 8);     \\
                a1 += g0; b1 += g1;                                                  \\
                a2 += g0 * (cbn_wide_##S(x + i) - mu);                               \\
                b2 += g1 * (cbn_wide_##S(x + i + 8) - mu);                           \\
            }                                                                        \\
        double s1 = cbn_lanes(a1 + b1), s2 = cbn_lanes(a2 + b2);                     \\
        for (; i < n; i++) {                                                         \\
            double gi = (double)dy[i];                                               \\
            double g = !relu || CBN_Z(x[i], m, a, b) > 0 ? gi : 0.0;                 \\
            s1 += g;                                                                 \\
            s2 += g * ((double)x[i] - mu);                                           \\
        }                                                                            \\
        *s1_out += s1;                                                               \\
        *s2_out += s2;                                                               \\
    }
    typedef cbn_f8 cbn_v_f;
    typedef cbn_d8 cbn_v_d;
    CBN_RUN_SUMS(f, float)
    CBN_RUN_SUMS(d, double)
    """
    int cbn_narrow_sums_f(const float* x, Py_ssize_t rows, Py_ssize_t C, const double* shift,
                          double* s1, double* s2) noexcept nogil
    int cbn_narrow_sums_d(const double* x, Py_ssize_t rows, Py_ssize_t C, const double* shift,
                          double* s1, double* s2) noexcept nogil
    int cbn_narrow_grad_sums_f(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t C,
                               const double* mu, const float* m, const float* a, const float* b,
                               int relu, double* s1, double* s2) noexcept nogil
    int cbn_narrow_grad_sums_d(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t C,
                               const double* mu, const double* m, const double* a,
                               const double* b, int relu, double* s1, double* s2) noexcept nogil
    void cbn_store_fence() noexcept nogil
    void cbn_prefetch_l2(const void* p, size_t nbytes) noexcept nogil
    enum: CBN_GROUP_PREFETCH_BYTES
    enum: RUN_GRAD_AHEAD
    int cbn_invstd(Py_ssize_t C, const double* var, double eps, double* invstd) noexcept nogil
    int cbn_forward_coefs_f(Py_ssize_t C, Py_ssize_t stride, const double* mean,
                            const double* invstd, const float* gamma, const float* beta,
                            float* coef) noexcept nogil
    int cbn_forward_coefs_d(Py_ssize_t C, Py_ssize_t stride, const double* mean,
                            const double* invstd, const double* gamma, const double* beta,
                            double* coef) noexcept nogil
    int cbn_backward_coefs_f(Py_ssize_t C, Py_ssize_t R, double count, const double* mean,
                             const double* invstd, const double* sum_g, const double* sum_gd,
                             int training, float* coef) noexcept nogil
    int cbn_backward_coefs_d(Py_ssize_t C, Py_ssize_t R, double count, const double* mean,
                             const double* invstd, const double* sum_g, const double* sum_gd,
                             int training, double* coef) noexcept nogil
    void cbn_run_sums_f(const float* x, Py_ssize_t n, double shift,
                        double* s1_out, double* s2_out) noexcept nogil
    void cbn_run_grad_sums_f(const float* dy, const float* x, Py_ssize_t n, double mu,
                             float m, float a, float b, int relu, Py_ssize_t ahead,
                             double* s1_out, double* s2_out) noexcept nogil
    void cbn_rows_grad_sums_f(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t stride,
                              Py_ssize_t n, const double* mu, const float* m, const float* a,
                              const float* b, int relu, double* s1, double* s2) noexcept nogil
    int cbn_affine_rowk_f(const float* x, float* y, Py_ssize_t n, Py_ssize_t qs, int k,
                          const float* m, const float* a, const float* b, int relu) noexcept nogil
    int cbn_affine_rowk_d(const double* x, double* y, Py_ssize_t n, Py_ssize_t qs, int k,
                          const double* m, const double* a, const double* b,
                          int relu) noexcept nogil
    int cbn_affine2_rowk_f(const float* x, float* y, Py_ssize_t n, Py_ssize_t qs, int k,
                           const float* a, const float* c) noexcept nogil
    int cbn_affine2_rowk_d(const double* x, double* y, Py_ssize_t n, Py_ssize_t qs, int k,
                           const double* a, const double* c) noexcept nogil
    int cbn_grad_row4_f(const float* dy, const float* x, float* dx, Py_ssize_t n, Py_ssize_t qs,
                        const float* m, const float* a, const float* b, const float* s,
                        const float* kx, const float* k0, int relu) noexcept nogil
    int cbn_grad_row4_d(const double* dy, const double* x, double* dx, Py_ssize_t n,
                        Py_ssize_t qs, const double* m, const double* a, const double* b,
                        const double* s, const double* kx, const double* k0,
                        int relu) noexcept nogil
    int cbn_scale_row4_f(const float* dy, float* dx, Py_ssize_t n, Py_ssize_t qs,
                         const float* a) noexcept nogil
    int cbn_scale_row4_d(const double* dy, double* dx, Py_ssize_t n, Py_ssize_t qs,
                         const double* a) noexcept nogil
    int cbn_affine2_row_f(const float* x, float* y, Py_ssize_t n, const float* a,
                          const float* c, int nt, Py_ssize_t period) noexcept nogil
    int cbn_affine2_row_d(const double* x, double* y, Py_ssize_t n, const double* a,
                          const double* c, int nt, Py_ssize_t period) noexcept nogil
    int cbn_uncentre_f(Py_ssize_t C, const double* mean, const float* gamma, const float* beta,
                       float* coef) noexcept nogil
    int cbn_uncentre_d(Py_ssize_t C, const double* mean, const double* gamma,
                       const double* beta, double* coef) noexcept nogil
    int cbn_affine_row_f(const float* x, float* y, Py_ssize_t n, const float* m, const float* a,
                          const float* b, int relu, int nt, Py_ssize_t period) noexcept nogil
    int cbn_affine_runs_f(const float* x, float* y, Py_ssize_t n, Py_ssize_t C, Py_ssize_t u0,
                          Py_ssize_t u1, const float* m, const float* a, const float* b,
                          int relu, int nt) noexcept nogil
    int cbn_grad_row_f(const float* dy, const float* x, float* dx, Py_ssize_t n, const float* m,
                        const float* a, const float* b, const float* s, const float* kx,
                        const float* k0,
                        int relu, int nt, Py_ssize_t period) noexcept nogil
    int cbn_grad_run_f(const float* dy, const float* x, float* dx, Py_ssize_t n, float m, float a,
                        float b, float s, float kx, float k0, int relu, int nt) noexcept nogil
    int cbn_scale_row_f(const float* dy, float* dx, Py_ssize_t n, const float* a,
                          int nt, Py_ssize_t period) noexcept nogil
    int cbn_scale_run_f(const float* dy, float* dx, Py_ssize_t n, float a, int nt) noexcept nogil
    void cbn_quad_sums_f(const float* p, Py_ssize_t q, Py_ssize_t n, const double* shift,
                         double* s1, double* s2) noexcept nogil
    void cbn_quad_sums_d(const double* p, Py_ssize_t q, Py_ssize_t n, const double* shift,
                         double* s1, double* s2) noexcept nogil
    void cbn_run_sums_d(const double* x, Py_ssize_t n, double shift,
                        double* s1_out, double* s2_out) noexcept nogil
    void cbn_run_grad_sums_d(const double* dy, const double* x, Py_ssize_t n, double mu,
                             double m, double a, double b, int relu, Py_ssize_t ahead,
                             double* s1_out, double* s2_out) noexcept nogil
    void cbn_rows_grad_sums_d(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t stride,
                              Py_ssize_t n, const double* mu, const double* m, const double* a,
                              const double* b, int relu, double* s1, double* s2) noexcept nogil
    int cbn_affine_row_d(const double* x, double* y, Py_ssize_t n, const double* m, const double* a,
                          const double* b, int relu, int nt, Py_ssize_t period) noexcept nogil
    int cbn_affine_runs_d(const double* x, double* y, Py_ssize_t n, Py_ssize_t C, Py_ssize_t u0,
                          Py_ssize_t u1, const double* m, const double* a, const double* b,
                          int relu, int nt) noexcept nogil
    int cbn_grad_row_d(const double* dy, const double* x, double* dx, Py_ssize_t n, const double* m,
                        const double* a, const double* b, const double* s, const double* kx,
                        const double* k0,
                        int relu, int nt, Py_ssize_t period) noexcept nogil
    int cbn_grad_run_d(const double* dy, const double* x, double* dx, Py_ssize_t n, double m, double a,
                        double b, double s, double kx, double k0, int relu, int nt) noexcept nogil
    int cbn_scale_row_d(const double* dy, double* dx, Py_ssize_t n, const double* a,
                          int nt, Py_ssize_t period) noexcept nogil
    int cbn_scale_run_d(const double* dy, double* dx, Py_ssize_t n, double a, int nt) noexcept nogil


cdef enum:
    ROWS_PER_BLOCK = 256        # inner == 1: rows reduced into one partial
    CHANNELS_PER_BLOCK = 2048   # inner == 1: channels handled by one task (whole
                                # rows of up to 2048 channels: contiguous reads)
    FOLD_BYTES = 512            # inner == 1, shorter rows: normalize treats k rows
                                # as one virtual row of about this many bytes,
    APPLY_FOLD_BYTES = 2048     # inner == 1, rows of up to half this: backward's
                                # apply pass treats k rows as one of about this many
                                # bytes (rows of 32-100 channels 1.1-1.75x, 64 and
                                # 128 channels 1.0x, against unfolded rows)
    ONE_FOLD_BYTES = 4096       # or this many when it takes rows one at a time
                                # (streamed output, or past the one-row budget)
    MIN_BLOCK_ROWS = 64         # inner == 1: batches of 2*this to 2*ROWS_PER_BLOCK - 1
                                # rows reduce as two halves, so that two threads
                                # share them: (256, 1024) and (128, 2048) training
                                # forward 1.1-1.3x, backward 1.2-1.7x on two threads,
                                # 0.96-1.0x on one (the extra merge)
    QUAD_ROW_BYTES = 8192       # inner == 1: rows up to this long fold q apart in
                                # statistics (cbn_quad_sums), longer ones adjacent
    ODD_QUARTER_BYTES = 4096    # inner == 1: elementwise passes over rows shorter than
                                # this take their k rows an odd number apart
    PAIR_ROW_BYTES = 4096       # inner == 1: the forward's elementwise passes take
                                # shorter rows two at a time, longer ones four
    ELEMENTS_PER_BLOCK = 16384  # inner > 1: target values per reduction block
    RUN_SHIFT_ITEMS = 8192      # inner > 1: values summed around one shift (_stats_runs)
    PART_SKEW = 136             # doubles between the regions of a partials buffer
                                # beyond their length (see _part_stride)
    RUNS_STACK_CHANNELS = 64    # inner > 1: channels whose sums _stats_runs keeps on
                                # the stack at once (4 KiB; see _stats_runs)
    BACK_CHUNK_BYTES = 1048576  # second passes over the data go backwards in
                                # chunks of this many bytes (see _chunk_items)
    ELEMENTS_PER_TASK = 8192    # elementwise passes: values per thread below which
                                # no further thread is started
    THREADS_MAX = 1048576       # the largest n_threads accepted (kernels take a C int)
    TEAM_MIN_CAP = 8            # a pass starts at most max(this, processors) threads
    SPREAD_SUMS_BYTES = 200     # inner > 1: the reductions take runs of up to this
    SPREAD_MAP_BYTES = 100      # and the elementwise passes up to this many bytes
    SPREAD_ROW_BYTES = 1048576  # as rows of the (outer, C*inner) view, if such a
                                # row is at most this long (see _spreads)
    SPREAD_RUNS_BYTES = 128     # but the reductions keep runs this long and more
                                # on few rows (see _spread_sums)
    NEAR_MIN_BYTES = 65536      # outputs of this size and more start at a chosen
                                # offset into their page (see _fresh)
    PAGE_BYTES = 4096
    GROUP_BYTES = 2097152       # float64 NCHW training forward: channel groups of
                                # about this much of x (see _group_channels; 1-4 MiB
                                # measured alike, 8 MiB lost on two threads)
    GROUP_MIN_STRETCH = 49152   # and only if each image's part of a group is this long
    STRIDE_PREFETCH_BYTES = 8192  # backward sums: stretches this short prefetch
                                # the next image's (see _run_grad_sums)
    GROUP_STRETCH = 2048        # backward: a group takes the fewest channels that make
                                # each image's part of it this long (see _group_channels)
    ONE_CHANNEL_MAX = 4194304   # backward: a channel of x and dy beyond the group
                                # budget, up to this many bytes, is a group alone
    ONE_CHANNEL_STRETCH = 16384 # if its output streams and each image's run is this long
    SHARED_CHANNEL_MAX = 2097152    # on two threads and more: up to this many bytes,
    SHARED_CHANNEL_STRETCH = 3072   # with runs this long
    CHANNEL_GROUP_STRETCH = 3072    # backward: a channel of at most _channel_budget bytes
                                    # of x and dy with runs this long is a group alone

# Status codes of the composites; cbn.functional turns them into exceptions.
cdef enum:
    STATUS_OK = 0
    STATUS_NONFINITE_STATS = 1
    STATUS_NONFINITE_OUTPUT = 2
    STATUS_NO_MEMORY = 3
    STATUS_NEGATIVE_VAR = 4
    STATUS_NONFINITE_PARAM_GRAD = 5

OK = STATUS_OK
NONFINITE_STATS = STATUS_NONFINITE_STATS
NONFINITE_OUTPUT = STATUS_NONFINITE_OUTPUT
NO_MEMORY = STATUS_NO_MEMORY
NEGATIVE_VAR = STATUS_NEGATIVE_VAR
NONFINITE_PARAM_GRAD = STATUS_NONFINITE_PARAM_GRAD
MAX_THREADS = THREADS_MAX


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
        "max_threads": int(_max_threads()),
        "debug": bool(cbn_debug_build()),
        "sanitized": bool(cbn_sanitized()),
    }


# Whether this process has planned a parallel region (a team of 2 or more),
# and whether it is a child forked after one did (see _after_fork_in_child).
cdef bint _teams_started = False
cdef bint _forked_serial = False


cdef int _max_threads() noexcept nogil:
    """Threads OpenMP would use now; 1 without OpenMP or in a child forked
    after a parallel region (see _after_fork_in_child)."""
    return 1 if _forked_serial else cbn_max_threads()


def max_threads():
    """Number of threads OpenMP would use now (1 without OpenMP, and 1 in a
    process forked after its parent ran a pass on several threads)."""
    return int(_max_threads())


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
        if 2 * MIN_BLOCK_ROWS <= outer < 2 * ROWS_PER_BLOCK:
            g.outer_per_block = (outer + 1) // 2  # two halves: see MIN_BLOCK_ROWS
        g.channels_per_block = CHANNELS_PER_BLOCK
    else:
        # A block is a run of consecutive (n, c) pairs, read in memory order:
        # whole images when they are small, else a slice of one image's channels.
        g.outer_per_block = ELEMENTS_PER_BLOCK // (inner * channels)
        if g.outer_per_block < 1:
            g.outer_per_block = 1
        g.channels_per_block = ELEMENTS_PER_BLOCK // (inner * g.outer_per_block)
        if g.channels_per_block < 1:
            g.channels_per_block = 1
        if g.channels_per_block > CHANNELS_PER_BLOCK:
            g.channels_per_block = CHANNELS_PER_BLOCK
    g.n_outer_blocks = (outer + g.outer_per_block - 1) // g.outer_per_block
    g.n_channel_blocks = (channels + g.channels_per_block - 1) // g.channels_per_block
    return g


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef int _team_cap = TEAM_MIN_CAP if cbn_num_procs() < TEAM_MIN_CAP else cbn_num_procs()


cdef inline int _team(int n_threads, Py_ssize_t tasks) noexcept nogil:
    """Threads a parallel loop over `tasks` pieces of work starts for `n_threads`.

    No more than the tasks, and no more than the processors OpenMP sees (or
    TEAM_MIN_CAP where there are fewer, so that a count of 2-8 still runs as
    asked on small machines): these passes are bound by memory, which
    threads beyond the cores do not add. Uncapped, n_threads=100000 (an
    accepted value) made libgomp fail to create its threads, which exits the
    process or crashes it. Results do not depend on the count.
    """
    global _teams_started
    cdef Py_ssize_t n = n_threads
    if n > tasks:
        n = tasks
    if n > _team_cap:
        n = _team_cap
    if n > 1:
        n = cbn_team_size(<int>n)  # no larger than the threads that can be made
    if n > 1:
        _teams_started = True
        return <int>n
    return 1


def _after_fork_in_child():
    """In a child forked after this process ran a parallel region: one thread.

    GNU OpenMP (libgomp) keeps its worker threads in a pool that a fork does
    not copy: a child that starts a parallel region after its parent did
    waits forever for them (GCC bug 60035; multiprocessing's default start
    method on Linux before Python 3.14 forks). Such a child runs every pass on
    one thread instead, with the same bits (results do not depend on the
    thread count), as MXNet does; a child of a parent that never started a
    team keeps its threads.
    """
    global _team_cap, _forked_serial
    if _teams_started:
        _team_cap = 1
        _forked_serial = True


def teams_started():
    """Whether this process has run a pass on two or more threads (for the tests)."""
    return bool(_teams_started)


if hasattr(os, "register_at_fork"):  # POSIX only; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline bint _spreads(const Geometry* g, size_t item_bytes, size_t run_bytes) noexcept nogil:
    """Whether a pass takes the runs of g, if of at most ``run_bytes``
    (SPREAD_SUMS_BYTES or SPREAD_MAP_BYTES), as the rows of the (outer, C*inner) view.

    Short runs (feature maps of 2x2 to 7x7) make short loops, one per run,
    each with its own reduction or coefficient loads. As rows, with each
    channel's coefficients repeated inner times (_repeat), they go through the
    row kernels instead; the statistics and backward sums are then per column,
    merged per channel. Against the runs, in one process, one thread, both
    dtypes (runs of 4-49 values):
    from memory, training forward 1.1-11x, evaluation 1.0-4x, backward
    1.05-8x; in cache, 1.4-11x, 1.0-7x and 1.1-9x. The reductions gain on
    runs of up to 200 bytes (7x7 float32 training forward 1.6x, 8x8 float32
    0.8x), the elementwise passes up to about 100 (5x5 float32 evaluation
    1.06-1.4x; 4x4 float64 0.91x, 7x7 float32 0.74-0.83x). Two threads gain
    as much. Costs a copy of the coefficient rows, C*inner values each, which
    long rows still repay: rows of 128 KiB-1 MiB (16x8192x2x2 to 4x32768x2x2)
    1.2-10x, where the runs made training forward 0.43-0.5x PyTorch. Should
    the copy find no memory, the pass takes the runs. Those measurements
    were on batches of many images: the reductions ask _spread_sums, which
    keeps the runs of few images (session 26).
    """
    return g.inner > 1 and <size_t>g.inner * item_bytes <= run_bytes \
        and <size_t>(g.channels * g.inner) * item_bytes <= SPREAD_ROW_BYTES


cdef inline bint _spread_sums(const Geometry* g, size_t item_bytes, bint backward) noexcept nogil:
    """Whether the training statistics (``backward``: the backward sums) take
    the runs of g as rows (see _spreads).

    As rows, the sums go to a column's accumulators, C*inner of them (with
    the backward's repeated means), merged per channel at the end: a cost per
    column that a batch of few images, each a row, does not repay, while its
    runs of 128 bytes and more (7x7 float32, 4x4 float64) run at full vector
    width. So runs that long keep their own loops (and the backward its
    channel groups) on few rows: the statistics where the batch has at most
    a third as many images as a run has values, the backward sums always.
    The backward also keeps runs of 16 values and more on batches of at most
    as many images as a run has values. Against the rows, one process, both
    dtypes, cold and in cache, one and two threads, on the Xeon of session
    26 (runs over rows): statistics, 8x512x7x7 float32 1.29-1.67x,
    8x2048x7x7 1.41-1.47x, 16x512x7x7 0.99-1.29x, 8x1024x6x6 1.16-1.46x,
    8x1024x5x5 float64 1.10-1.31x; backward, 8x512x7x7 float32 1.33-1.41x,
    8x2048x7x7 1.55-1.7x, 32x512x7x7 1.11-1.33x, 8x2048x4x4 float32
    1.12-1.49x, float64 1.41-1.55x, 32x1024x4x4 float64 1.18x. Kept as rows:
    statistics of 32 and more images of 7x7 and less (runs 0.5-0.92x),
    backward of 32x1024x4x4 and 32x1024x5x5 float32 (runs 0.70-0.88x),
    and the sums of 3x3 maps and less (8x4096x3x3, 16x8192x2x2 float32:
    runs 0.26-0.76x).
    """
    if not _spreads(g, item_bytes, SPREAD_SUMS_BYTES):
        return False
    cdef bint long_runs = <size_t>g.inner * item_bytes >= SPREAD_RUNS_BYTES
    if backward:
        return not (long_runs or (g.inner >= 16 and g.outer <= g.inner))
    return not (long_runs and 3 * g.outer <= g.inner)


cdef inline Geometry _spread_geometry(const Geometry* g) noexcept nogil:
    """The geometry of the (outer, C*inner) view of g's batch."""
    return _geometry(g.outer, g.channels * g.inner, 1)


cdef inline Py_ssize_t _line_shift(const void* out, Py_ssize_t wide, size_t item,
                                   Py_ssize_t rows, bint nt) noexcept nogil:
    """Values before the first 64-byte line of `out` when a streamed pass over
    `rows` > 1 rows of `wide` values (a multiple of a line) should take its rows
    shifted to start on a line (see _stream_rows_shifted); else 0."""
    if not nt or rows < 2 or (wide * item) % 64:
        return 0
    return <Py_ssize_t>(((64 - (<size_t>out & 63)) & 63) // item)


cdef floating* _rotated(const floating* coef, Py_ssize_t n_rows, Py_ssize_t wide,
                        Py_ssize_t h) noexcept nogil:
    """Coefficient rows of `wide` values (`wide` apart), each rotated left by h:
    out[r, j] = coef[r, (j + h) % wide]. NULL if no memory."""
    cdef floating* out = <floating*>malloc(n_rows * wide * sizeof(floating))
    cdef Py_ssize_t r, j
    if out != NULL:
        for r in range(n_rows):
            for j in range(wide):
                out[r * wide + j] = coef[r * wide + (j + h) % wide]
    return out


cdef floating* _repeat(const floating* coef, Py_ssize_t n_rows, Py_ssize_t C,
                       Py_ssize_t k, Py_ssize_t each) noexcept nogil:
    """Coefficient rows of k*C*each values: each of a row's C values repeated
    ``each`` times in place (short runs as rows, see _spreads), and the whole
    row k times over (rows folded k at a time, see _fold). NULL if no memory."""
    cdef Py_ssize_t wide = k * C * each, r, i, c, t, o = 0
    cdef floating* out = <floating*>malloc(n_rows * wide * sizeof(floating))
    if out != NULL:
        for r in range(n_rows):
            for i in range(k):
                for c in range(C):
                    for t in range(each):
                        out[o] = coef[r * C + c]
                        o += 1
    return out


# ---------------------------------------------------------------------------
# batch_stats
# ---------------------------------------------------------------------------

cdef inline double _median3(double a, double b, double c) noexcept nogil:
    """The middle one of three values (a shift for shifted sums, see _stats_runs).

    Written as min/max selections, which compile without branches: on random
    data a branch per comparison mispredicted often enough to cost 5% of the
    statistics pass over runs of 784 values.
    """
    cdef double lo = a if a < b else b
    cdef double hi = b if a < b else a
    hi = hi if hi < c else c
    return hi if lo < hi else lo


cdef inline double _shifted_m2(double s1, double s2, double n) noexcept nogil:
    """Sum of squared deviations from the mean, from sums shifted by a value of the set.

    s1 * (s1 / n) cannot overflow while s2 is finite (it is at most s2), where
    s1 * s1 / n did for spreads of 1e154 and more, and the clamp then hid the
    -inf as a variance of 0. Rounding below 0 is clamped; NaN and -inf pass,
    for the caller to raise.
    """
    cdef double d = s2 - s1 * (s1 / n)
    return 0.0 if (d < 0.0 and isfinite(d)) else d


cdef inline double _two_sum(double a, double b, double* err) noexcept nogil:
    """a + b rounded, and in err the rounding error: a + b = sum + err exactly
    (Knuth's TwoSum; the build has no -ffast-math to reassociate it)."""
    cdef double s = a + b
    cdef double bb = s - a
    err[0] = (a - (s - bb)) + (b - bb)
    return s


cdef inline void _add_to_mean(double* hi, double* lo, double t) noexcept nogil:
    """(hi, lo) += t, hi + lo holding a mean to about twice double's precision.

    Fast2Sum: its error term is exact when |hi| >= |t|, the case that needs it
    (a mean far from 0 against the spread); otherwise it is off by about an ulp
    of t, which is then of the spread's size. Half TwoSum's adds: the merges of
    small maps' columns (64x512x3x3) measured 0.92x with TwoSum.
    """
    cdef double s = hi[0] + t
    lo[0] += t - (s - hi[0])
    hi[0] = s


cdef inline void _chan_step(double* hi, double* lo, double* m2, double b_hi, double b_lo,
                            double b_m2, double w, double w2) noexcept nogil:
    """Merge a part of mean b_hi + b_lo and M2 b_m2 into (hi + lo, m2) (Chan,
    Golub & LeVeque 1979), with w = n_b / n and w2 = n_a * n_b / n. b_hi - hi
    is exact for means within a factor of two of each other (Sterbenz), so the
    difference of the means loses nothing to their size (see _merge_stats)."""
    cdef double delta = (b_hi - hi[0]) + (b_lo - lo[0])
    _add_to_mean(hi, lo, delta * w)
    m2[0] += b_m2 + delta * delta * w2


cdef inline double _rounded_mean(double hi, double* lo) noexcept nogil:
    """hi + lo as one double; lo keeps what that rounding dropped."""
    cdef double s = hi + lo[0]
    lo[0] = lo[0] - (s - hi)
    return s


cdef void _stats_rows(const floating* x, Py_ssize_t rows, Py_ssize_t channels,
                      Py_ssize_t c0, Py_ssize_t c1,
                      double* mean_out, double* m2_out, double* lo_out) noexcept nogil:
    """Mean and M2 of rows [0, rows) for channels [c0, c1) (inner == 1).

    The shifted sums (_shifted_row_sums) accumulate in the outputs' own
    entries (this task's alone): the shift in mean_out, the sums in lo_out
    and m2_out, which the loop below turns into the results. On the stack
    they took 48 KiB, which overflowed 32 KiB thread stacks (Python's
    threading.stack_size allows them, and NumPy runs there).
    """
    cdef Py_ssize_t j
    cdef double sh, t1
    _shifted_row_sums(x, rows, channels, c0, c1, mean_out + c0, lo_out + c0, m2_out + c0)
    for j in range(c1 - c0):
        sh = mean_out[c0 + j]
        t1 = lo_out[c0 + j]
        m2_out[c0 + j] = _shifted_m2(t1, m2_out[c0 + j], rows)
        mean_out[c0 + j] = _two_sum(sh, t1 / rows, &lo_out[c0 + j])


cdef void _shifted_row_sums(const floating* x, Py_ssize_t rows, Py_ssize_t channels,
                            Py_ssize_t c0, Py_ssize_t c1, restrict_doubles shift,
                            restrict_doubles s1, restrict_doubles s2) noexcept nogil:
    """Shifted sums of rows [0, rows) for channels [c0, c1) (inner == 1):
    shift[j] (the first row's value), s1[j] and s2[j] for channel c0 + j.

    Whole rows of 8, 16, ..., 64 channels use the register-resident narrow
    kernels; otherwise four rows are folded per update of the memory-resident
    accumulators, to cut their load/store traffic fourfold: rows r, r + q,
    r + 2q, r + 3q (q = rows // 4) for short rows (cbn_quad_sums), four
    adjacent rows for longer ones.

    The accumulators are restrict: without it, the compiler had to allow for
    float64 sums aliasing x, and the passes over (100, 5000) and (4096, 256)
    float64 ran 0.65-0.8x as fast as with the stack arrays they replace.
    """
    cdef Py_ssize_t width = c1 - c0, r, j, q = rows // 4, rows_done
    cdef const floating* row = x + c0
    cdef double d, d0, d1, d2, d3
    cdef int narrow = 0
    for j in range(width):
        # The first row's values: a block has at most ROWS_PER_BLOCK rows, so
        # a first row far from the mean costs at most that factor of rounding
        # (see _stats_runs); the middle of three rows cost 1-6% in cache.
        shift[j] = row[j]
        s1[j] = 0.0
        s2[j] = 0.0
    if width == channels:
        if floating is float:
            narrow = cbn_narrow_sums_f(x, rows, channels, shift, s1, s2)
        else:
            narrow = cbn_narrow_sums_d(x, rows, channels, shift, s1, s2)
    rows_done = rows if narrow else 4 * q
    if not narrow and width * sizeof(floating) <= QUAD_ROW_BYTES:
        for r in range(q):
            row = x + r * channels + c0
            if floating is float:
                cbn_quad_sums_f(row, q * channels, width, shift, s1, s2)
            else:
                cbn_quad_sums_d(row, q * channels, width, shift, s1, s2)
    elif not narrow:
        for r in range(q):
            row = x + 4 * r * channels + c0
            for j in range(width):
                d0 = <double>row[j] - shift[j]
                d1 = <double>row[channels + j] - shift[j]
                d2 = <double>row[2 * channels + j] - shift[j]
                d3 = <double>row[3 * channels + j] - shift[j]
                s1[j] += (d0 + d1) + (d2 + d3)
                s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(rows_done, rows):
        row = x + r * channels + c0
        for j in range(width):
            d = <double>row[j] - shift[j]
            s1[j] += d
            s2[j] += d * d


cdef struct Moments:
    double count                # values merged so far
    double mean                 # their mean, mean + mean_lo to about twice double's
    double mean_lo              # precision (see _merge_stats)
    double m2                   # sum of squared deviations from mean
    double shift                # the open piece's shift
    double s1, s2               # the open piece's shifted sums
    double n                    # and its count


cdef inline void _close_piece(Moments* a) noexcept nogil:
    """Merge the open piece into a's mean and M2 (Chan et al.); the next piece
    is shifted by the mean so far."""
    cdef double offset, delta, total
    if a.n == 0.0:
        return
    offset = a.s1 / a.n  # the piece's mean is a.shift + offset
    if a.count == 0.0:  # nothing to merge with (and delta^2 * 0 could be inf * 0)
        a.mean = _two_sum(a.shift, offset, &a.mean_lo)
        a.m2 = _shifted_m2(a.s1, a.s2, a.n)
    else:
        # _chan_step with b_hi = a.shift, which is the last a.mean, written out:
        # through _chan_step, inlined in _add_run's loop, the statistics of runs
        # longer than RUN_SHIFT_ITEMS measured 0.90x.
        total = a.count + a.n
        delta = offset - a.mean_lo
        _add_to_mean(&a.mean, &a.mean_lo, delta * (a.n / total))
        a.m2 += _shifted_m2(a.s1, a.s2, a.n) + delta * delta * (a.count * (a.n / total))
    a.count += a.n
    a.shift = a.mean
    a.s1 = 0.0
    a.s2 = 0.0
    a.n = 0.0


cdef inline void _add_run(const floating* run, Py_ssize_t inner, Moments* a) noexcept nogil:
    """Add a run of ``inner`` values to ``a``'s shifted sums (see _stats_runs)."""
    cdef Py_ssize_t i0 = 0, len_
    if inner <= RUN_SHIFT_ITEMS:
        # Short runs: the block (at most ELEMENTS_PER_BLOCK values per channel)
        # is one piece, counted at the end. A merge per run cost 3-5% of the
        # pass over runs of 784-1024 values.
        if floating is float:
            cbn_run_sums_f(run, inner, a.shift, &a.s1, &a.s2)
        else:
            cbn_run_sums_d(run, inner, a.shift, &a.s1, &a.s2)
        return
    while i0 < inner:
        len_ = _min(RUN_SHIFT_ITEMS, inner - i0)
        if floating is float:
            cbn_run_sums_f(run + i0, len_, a.shift, &a.s1, &a.s2)
        else:
            cbn_run_sums_d(run + i0, len_, a.shift, &a.s1, &a.s2)
        a.n += <double>len_
        if a.n >= RUN_SHIFT_ITEMS:
            _close_piece(a)
        i0 += len_


cdef void _stats_runs(const floating* x, const Geometry* g, Py_ssize_t n0,
                      Py_ssize_t n1, Py_ssize_t c0, Py_ssize_t c1,
                      double* mean_out, double* m2_out, double* lo_out) noexcept nogil:
    """Mean and M2 of the runs (n, c, :), n in [n0, n1), c in [c0, c1) (inner > 1),
    RUNS_STACK_CHANNELS channels at a time (see _stats_runs_part).

    The accumulators live on the stack of the thread that runs the block: for
    CHANNELS_PER_BLOCK channels at once they took 128 KiB, more than a whole
    thread stack where that is 128 KiB (musl's default, which libgomp's
    workers get on Alpine): a segfault, seen with OMP_STACKSIZE=64K. 256
    channels (16 KiB) still overflowed 32 KiB stacks (Python's smallest
    threading.stack_size), with the rest of the call chain. Each channel sums
    the same runs in the same order either way: the same bits.
    """
    cdef Py_ssize_t k = c0
    while k < c1:
        _stats_runs_part(x, g, n0, n1, k, _min(k + RUNS_STACK_CHANNELS, c1), mean_out,
                         m2_out, lo_out)
        k += RUNS_STACK_CHANNELS


cdef void _stats_runs_part(const floating* x, const Geometry* g, Py_ssize_t n0,
                           Py_ssize_t n1, Py_ssize_t c0, Py_ssize_t c1,
                           double* mean_out, double* m2_out, double* lo_out) noexcept nogil:
    """_stats_runs for at most RUNS_STACK_CHANNELS channels [c0, c1).

    The runs are visited in memory order, one stream through the block. Each
    channel's values are summed in pieces, each shifted by an estimate of the
    mean (for the first piece the middle of the first run's first three
    values, then the channel's mean so far) and merged into the channel's mean
    and M2 (Chan et al.): runs longer than RUN_SHIFT_ITEMS in slices of that
    many values, shorter runs all of the block's in one piece. Shifted sums lose about
    (shift - mean)^2 / variance, up to the piece's length, times the rounding
    error: with the block's first value as the one shift of a whole block (up
    to 16384 values, or a whole run when longer) that was up to 1e-10 relative
    on float64 data whose first value was an outlier (images of 1000 + N(0, 1)
    with a zero corner: 7e-11; now 4e-14).
    """
    cdef Moments acc[RUNS_STACK_CHANNELS]
    cdef Py_ssize_t inner = g.inner, n, c
    cdef const floating* run
    cdef Moments* a
    for c in range(c0, c1):
        a = &acc[c - c0]
        a.count = 0.0
        a.mean = 0.0
        a.mean_lo = 0.0
        a.m2 = 0.0
        a.s1 = 0.0
        a.s2 = 0.0
        a.n = 0.0
    for c in range(c0, c1):
        # The first image's runs: each shift is taken as the pass reaches its
        # run, from the run's first cache line (values further in are not
        # fetched yet: waiting for them cost 10-15%). Reading the first line of
        # every channel's run before the pass, a page or more apart, made it
        # 1.2-1.5x (float64) and 1.3-1.9x (float32) slower from memory on NCHW
        # batches of 4-50 MB.
        run = x + (n0 * g.channels + c) * inner
        a = &acc[c - c0]
        a.shift = _median3(run[0], run[1], run[2]) if inner >= 3 else run[0]
        _add_run(run, inner, a)
    for n in range(n0 + 1, n1):
        for c in range(c0, c1):
            _add_run(x + (n * g.channels + c) * inner, inner, &acc[c - c0])
    for c in range(c0, c1):
        a = &acc[c - c0]
        if inner <= RUN_SHIFT_ITEMS:
            a.n = <double>((n1 - n0) * inner)
        _close_piece(a)
        mean_out[c] = a.mean
        m2_out[c] = a.m2
        lo_out[c] = a.mean_lo


# Partials buffers: a region per quantity (means, M2s, sums), in each a row
# of a value per channel for every outer block. The passes accumulate in
# their entries (see _stats_rows), as they did in stack arrays, which the
# compiler aligned to 64 bytes: so each row starts on a 64-byte line. With
# rows of a 16-byte aligned malloc, float32 (256, 1024) and (100, 5000)
# statistics ran 0.86-0.94x as fast (their vectors of sums split lines).

cdef inline Py_ssize_t _part_row(const Geometry* g) noexcept nogil:
    """Doubles from one outer block's row of partials to the next: C rounded
    up to a whole 64-byte line."""
    return (g.channels + 7) & ~(<Py_ssize_t>7)


cdef inline Py_ssize_t _part_stride(const Geometry* g) noexcept nogil:
    """Doubles from one region of a partials buffer to the next: its rows,
    plus PART_SKEW (17 lines) so that the same channel's entries of the
    regions do not share an L1 set when the rows take a multiple of 4 KiB:
    regions 128 KiB apart (float64 (16, 1024, 4, 4) backward sums, taken as
    rows of 16384 columns) ran 0.72-0.89x as fast as with the skew."""
    return g.n_outer_blocks * _part_row(g) + PART_SKEW


cdef double* _part_alloc(Py_ssize_t n) noexcept nogil:
    """n doubles starting on a 64-byte line (NULL without memory); free them
    with _part_free. The malloc'ed block's address is kept just before."""
    cdef char* raw = <char*>malloc(n * sizeof(double) + 64 + sizeof(void*))
    cdef uintptr_t at
    if raw == NULL:
        return NULL
    at = (<uintptr_t>raw + sizeof(void*) + 63) & ~(<uintptr_t>63)
    (<void**>at - 1)[0] = raw  # not [-1]: wraparound=False leaves negative indices undefined
    return <double*>at


cdef inline void _part_free(double* part) noexcept nogil:
    """Free what _part_alloc returned (NULL is fine)."""
    if part != NULL:
        free((<void**>part - 1)[0])


cdef inline void _stats_task(const floating* x, const Geometry* g, Py_ssize_t task,
                             double* part_mean, double* part_m2,
                             double* part_lo) noexcept nogil:
    cdef Py_ssize_t ob = task // g.n_channel_blocks
    cdef Py_ssize_t cb = task % g.n_channel_blocks
    cdef Py_ssize_t n0 = ob * g.outer_per_block
    cdef Py_ssize_t n1 = _min(n0 + g.outer_per_block, g.outer)
    cdef Py_ssize_t c0 = cb * g.channels_per_block
    cdef Py_ssize_t c1 = _min(c0 + g.channels_per_block, g.channels)
    part_mean += ob * _part_row(g)
    part_m2 += ob * _part_row(g)
    part_lo += ob * _part_row(g)
    if g.inner == 1:
        _stats_rows(x + n0 * g.channels, n1 - n0, g.channels, c0, c1, part_mean, part_m2,
                    part_lo)
    else:
        _stats_runs(x, g, n0, n1, c0, c1, part_mean, part_m2, part_lo)


cdef void _merge_stats(const Geometry* g, Py_ssize_t c0, Py_ssize_t c1,
                       const double* part_mean, const double* part_m2,
                       const double* part_lo, double* mean_out, double* var_out,
                       double* lo) noexcept nogil:
    """Merge block statistics of channels [c0, c1) in block order (Chan, Golub &
    LeVeque 1979). lo (C values, channels [c0, c1) written) receives what each
    mean holds beyond double.

    Each block's mean comes as hi + lo (hi its shift plus offset, rounded, lo
    the rounding). With the means as rounded doubles, the differences between
    blocks carried an error of an ulp of the mean, which the between-block
    term of M2 magnifies: float64 data of mean 1e7 and std 1 had variances off
    by up to 7e-10 relative. hi - hi is exact for means within a factor of two
    of each other (Sterbenz), so the differences now lose nothing to the
    mean's size: 1e-15. Channels are the inner loop: each channel's merge is a
    chain of dependent adds, and side by side they overlap (channel by channel
    the chains made the pass 0.8x on rows of 256 channels).
    """
    cdef Py_ssize_t c, b, block_rows, at
    cdef double n_a, n_b, n, w, w2, delta
    for c in range(c0, c1):
        mean_out[c] = part_mean[c]
        lo[c] = part_lo[c]
        var_out[c] = part_m2[c]
    n_a = <double>(_min(g.outer_per_block, g.outer) * g.inner)
    for b in range(1, g.n_outer_blocks):
        block_rows = _min(g.outer_per_block, g.outer - b * g.outer_per_block)
        n_b = <double>(block_rows * g.inner)
        n = n_a + n_b
        w = n_b / n
        w2 = n_a * n_b / n
        at = b * _part_row(g)
        # _chan_step written out: through it, the statistics of (4096, 256) rows
        # (16 blocks to merge) measured 0.87-0.95x.
        for c in range(c0, c1):
            delta = (part_mean[at + c] - mean_out[c]) + (part_lo[at + c] - lo[c])
            _add_to_mean(&mean_out[c], &lo[c], delta * w)
            var_out[c] = var_out[c] + part_m2[at + c] + delta * delta * w2
        n_a = n
    for c in range(c0, c1):
        mean_out[c] = _rounded_mean(mean_out[c], &lo[c])
        var_out[c] = var_out[c] / n_a


cdef int _spread_stats(const floating* x, const Geometry* g, double* mean_out,
                       double* var_out, int n_threads, double* lo_out) noexcept nogil:
    """_batch_stats through the columns of the (outer, C*inner) view (see
    _spreads), merged per channel in column order (Chan et al.; the means as
    hi + lo, channels side by side, as in _merge_stats)."""
    cdef Geometry rows = _spread_geometry(g)
    cdef Py_ssize_t W = rows.channels, C = g.channels, c, i, j
    cdef double n = <double>g.outer, n_a, total, w, w2
    cdef double* col = <double*>malloc((3 * W + C) * sizeof(double))
    cdef double* col_lo = col + 2 * W
    cdef double* lo = lo_out if lo_out != NULL else col + 3 * W
    cdef int status
    if col == NULL:
        return STATUS_NO_MEMORY
    status = _batch_stats(x, &rows, col, col + W, n_threads, col_lo)
    if status == STATUS_OK:
        for c in range(C):
            j = c * g.inner
            mean_out[c] = col[j]
            lo[c] = col_lo[j]
            var_out[c] = col[W + j] * n
        n_a = n
        for i in range(1, g.inner):
            total = n_a + n
            w = n / total
            w2 = n_a * (n / total)
            for c in range(C):
                j = c * g.inner + i
                _chan_step(&mean_out[c], &lo[c], &var_out[c], col[j], col_lo[j], col[W + j] * n,
                           w, w2)
            n_a = total
        for c in range(C):
            mean_out[c] = _rounded_mean(mean_out[c], &lo[c])
            var_out[c] = var_out[c] / n_a
    free(col)
    return status


cdef int _batch_stats(const floating* x, const Geometry* g, double* mean_out,
                      double* var_out, int n_threads, double* lo_out=NULL) noexcept nogil:
    """Per-channel mean and biased variance; returns a status code. lo_out (or
    NULL): what each mean holds beyond double (see _merge_stats)."""
    cdef int status
    if _spread_sums(g, sizeof(floating), False):
        status = _spread_stats(x, g, mean_out, var_out, n_threads, lo_out)
        if status != STATUS_NO_MEMORY:
            return status
        # No memory for the column statistics: the runs below need less.
    cdef Py_ssize_t n_tasks = g.n_outer_blocks * g.n_channel_blocks, t
    cdef int team = _team(n_threads, n_tasks)
    cdef Py_ssize_t size = _part_stride(g)
    cdef double* part = _part_alloc(3 * size + g.channels)
    if part == NULL:
        return STATUS_NO_MEMORY
    for t in prange(n_tasks, schedule='static', num_threads=team, use_threads_if=team > 1):
        _stats_task(x, g, t, part, part + size, part + 2 * size)
    _merge_stats(g, 0, g.channels, part, part + size, part + 2 * size, mean_out, var_out,
                 lo_out if lo_out != NULL else part + 3 * size)
    _part_free(part)
    return STATUS_OK


# ---------------------------------------------------------------------------
# normalize: y = (x - m) * a + b, per channel, optionally followed by ReLU.
# The centred form keeps float32 accurate when |mean| >> std.
# ---------------------------------------------------------------------------

# The row leaves below take qs: 0 for one row (which may stream, nt), else
# rows 0, qs (, 2qs, 3qs) values on: k rows, two or four (the forward's *_rowk
# leaves), four (backward's *_row4 leaves); those never stream.

cdef inline int _affine_row(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t qs,
                            int k, const floating* m, const floating* a, const floating* b,
                            bint relu, bint nt, Py_ssize_t period) noexcept nogil:
    # period: the coefficient rows repeat every this many values (the channels
    # of the rows; see cbn_periodic).
    if floating is float:
        if qs:
            return cbn_affine_rowk_f(x, y, n, qs, k, m, a, b, relu)
        return cbn_affine_row_f(x, y, n, m, a, b, relu, nt, period)
    else:
        if qs:
            return cbn_affine_rowk_d(x, y, n, qs, k, m, a, b, relu)
        return cbn_affine_row_d(x, y, n, m, a, b, relu, nt, period)


cdef inline int _affine2_row(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t qs,
                             int k, const floating* a, const floating* c,
                             bint nt, Py_ssize_t period) noexcept nogil:
    if floating is float:
        if qs:
            return cbn_affine2_rowk_f(x, y, n, qs, k, a, c)
        return cbn_affine2_row_f(x, y, n, a, c, nt, period)
    else:
        if qs:
            return cbn_affine2_rowk_d(x, y, n, qs, k, a, c)
        return cbn_affine2_row_d(x, y, n, a, c, nt, period)


cdef inline int _affine_runs(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t C,
                             Py_ssize_t u0, Py_ssize_t u1, const floating* m,
                             const floating* a, const floating* b, bint relu,
                             bint nt) noexcept nogil:
    if floating is float:
        return cbn_affine_runs_f(x, y, n, C, u0, u1, m, a, b, relu, nt)
    else:
        return cbn_affine_runs_d(x, y, n, C, u0, u1, m, a, b, relu, nt)


cdef inline Py_ssize_t _workers(Py_ssize_t size, int n_threads) noexcept nogil:
    """Threads worth starting for an elementwise pass over `size` values (>= 1)."""
    return _team(n_threads, size // ELEMENTS_PER_TASK)


cdef inline Py_ssize_t _share(Py_ssize_t total, Py_ssize_t w, Py_ssize_t n_work) noexcept nogil:
    """Start of worker w's contiguous share of `total` items (w = n_work gives total)."""
    return total * w // n_work


cdef size_t _one_row_budget = 0           # backward's apply pass
cdef size_t _forward_one_row_budget = 0   # forward's normalize


def set_one_row_bytes(Py_ssize_t nbytes, bint forward=False):
    """Set the bytes (of dy and x; with ``forward``, of x and y) above which
    backward's apply pass (with ``forward``, forward's normalize) takes rows
    shorter than 4 KiB one at a time (0: never; see ``_one_row``).

    cbn.functional calls it at import with four times the per-core (L2) cache
    or the environment variable CBN_ONE_ROW_BYTES, and for the forward with
    that on the CPUs where it was measured to win, else 0, or the variable
    CBN_FORWARD_ONE_ROW_BYTES. Results do not depend on it (the passes are
    elementwise: the same bits either way); only speed does.
    """
    global _one_row_budget, _forward_one_row_budget
    if nbytes < 0:
        raise ValueError(f"one-row bytes must be >= 0, got {nbytes}")
    if forward:
        _forward_one_row_budget = <size_t>nbytes
    else:
        _one_row_budget = <size_t>nbytes


def one_row_bytes(bint forward=False):
    """Bytes of dy and x (with ``forward``, of x and y) above which backward's
    apply pass (forward's normalize) takes short rows one at a time (0: never;
    see ``set_one_row_bytes``)."""
    return _forward_one_row_budget if forward else _one_row_budget


cdef inline bint _one_row(const Geometry* g, size_t item_bytes, bint relu,
                          bint forward) noexcept nogil:
    """Whether an elementwise pass over rows (inner == 1) takes them one at a
    time in memory order: backward's apply pass instead of four rows a quarter
    of the batch apart, forward's normalize (training and evaluation, past its
    own budget) instead of two rows half the batch apart. Neither with the
    fused ReLU (below).

    Rows shorter than PAIR_ROW_BYTES whose two arrays (dy and x; x and y)
    together exceed the budget (four times the per-core cache), which then
    come from the last-level cache or memory, where rows in memory order make
    the fewest streams for the prefetcher; in the per-core cache, several rows
    per coefficient load win instead (one row at a time loads a coefficient
    row per row of x).

    Forward (folded to ONE_FOLD_BYTES, see _row_fold), both builds in one
    process, three processes each, AMD EPYC (Zen 5), 4096x256, 16384x128,
    8192x200 and float32 2048x512: cold, one thread 1.00-1.42x (median of
    the cases 1.05x; 4096x256 float32 evaluation 1.20x, 8192x200 1.42x), two
    threads 0.99-1.15x; in cache 0.93-1.25x (one case under 0.98: float64
    4096x256 training, 0.93x on one thread). With the fused ReLU (the m, a,
    b form: three coefficient rows), six of the twelve evaluations in cache
    (three shapes, two dtypes, one and two threads) ran 0.82-0.98x, so it
    keeps two rows. Rows of 4-8 KiB (256x1024) lost on two threads in cache
    (0.75-0.88x) and rows of 16-32 KiB on one (0.77-0.93x).
    On an AMD EPYC of the previous generation (Zen 4, 32 KiB L1d), the same
    harness and shapes, three processes: one row at a time lost to two rows
    on cold data, 0.66-0.83x on one thread and 0.78-0.98x on two, in cache
    0.71-1.14x (five of 24 cases above 1.0); so the forward's budget is 0
    there (cbn.functional). Backward's one row at a time measured alike there
    (cold 0.95-1.08x, in cache 0.88-1.14x), so it keeps its budget.

    Backward, the same machine and harness, cold data, 4096x256 and
    16384x128: one thread 1.04-1.20x (dx into rotated out= buffers) and
    1.12-1.25x (dx allocated, as the benchmark does), two threads 1.0-1.10x;
    the same arrays in cache 1.02-1.18x. Arrays of 2-4 MiB (dy and x) in
    cache lost (0.89-0.98x), and rows of 8 KiB cold (0.91x): both keep four
    rows. With the fused ReLU, whose mask needs three more coefficient rows
    per row, one row at a time ran 0.82-0.91x (the coefficient loads, not
    memory, then pace it).
    """
    cdef size_t row_bytes = <size_t>g.channels * item_bytes
    cdef size_t budget = _forward_one_row_budget if forward else _one_row_budget
    return (not relu and budget > 0 and row_bytes < PAIR_ROW_BYTES
            and 2 * row_bytes * <size_t>g.outer > budget)


cdef int _normalize_rows(const floating* x, floating* y, Py_ssize_t rows,
                         Py_ssize_t width, const floating* coef, Py_ssize_t cs,
                         bint relu, bint two, bint nt, bint one, Py_ssize_t period,
                         const floating* rot=NULL, Py_ssize_t h=0) noexcept nogil:
    """inner == 1: contiguous rows of `width` values, coefficient rows `cs` apart
    and repeating every `period` values (the channels; see cbn_periodic).

    two: the coefficient rows are a, c of cbn_uncentre (y = x*a + c), not m, a, b.
    Rows go whole, k at a time (_rows_at_once): r, r + q (, r + 2q, r + 3q), q
    about rows / k (_row_stride; CBN_EACHK), then the remainder one by one;
    streamed rows (nt), and rows past the one-row budget (`one`, see _one_row),
    one by one in memory order. Four rows at a time against
    one row at a time, in one process on cold data:
    evaluation (256, 1024) 1.23x (float32) and 1.3x (float64), (32, 4096)
    1.45-1.5x, (4096, 256) 1.1x; adjacent rows instead of rows q apart ran
    0.5x on rows of 1 KiB. Column tiles (all rows of a tile of columns, then the
    next, to keep the coefficients in L1) measured 0.65-0.8x on rows of 2048-4096
    values once the coefficients were two rows, not three.
    Returns 1 if any z is non-finite.
    """
    cdef int at_once = _rows_at_once(width * sizeof(floating))
    cdef Py_ssize_t j, off, qs
    cdef Py_ssize_t q = 0 if nt or one else _row_stride(rows, width * sizeof(floating), at_once)
    cdef int bad = 0
    if nt and rot != NULL and rows > 0:
        return _stream_rows_shifted(x, y, rows, width, coef, cs, rot, h, relu, two, period)
    for j in range(rows - (at_once - 1) * q):
        off = _block_row(j, q, at_once) * width
        qs = q * width if j < q else 0
        if two:
            bad |= _affine2_row(x + off, y + off, width, qs, at_once, coef, coef + cs, nt,
                                period)
        else:
            bad |= _affine_row(x + off, y + off, width, qs, at_once, coef, coef + cs,
                               coef + 2 * cs, relu, nt, period)
    if nt:
        cbn_store_fence()
    return bad


cdef inline Py_ssize_t _shifted_piece(Py_ssize_t p, Py_ssize_t rows, Py_ssize_t width,
                                      Py_ssize_t h, const floating* coef, Py_ssize_t cs,
                                      const floating* rot, Py_ssize_t* n,
                                      const floating** cf, Py_ssize_t* stride) noexcept nogil:
    """Piece p (0 .. rows) of `rows` streamed rows of `width` values taken
    shifted by h (see _stream_rows_shifted): its offset; its length, its
    coefficient rows and their stride into n, cf, stride. Piece 0 is the first
    h values (coef), pieces 1 .. rows - 1 whole rows from a line (rot), piece
    `rows` the last width - h values (coef + h)."""
    if p == 0:
        n[0], cf[0], stride[0] = h, coef, cs
        return 0
    if p == rows:
        n[0], cf[0], stride[0] = width - h, coef + h, cs
    else:
        n[0], cf[0], stride[0] = width, rot, width
    return h + (p - 1) * width


cdef inline int _affine_piece(const floating* x, floating* y, Py_ssize_t n,
                              const floating* coef, Py_ssize_t cs, bint relu,
                              bint two, Py_ssize_t period) noexcept nogil:
    """n values streamed, coefficient rows `cs` apart (see _normalize_rows)."""
    if two:
        return _affine2_row(x, y, n, 0, 1, coef, coef + cs, True, period)
    return _affine_row(x, y, n, 0, 1, coef, coef + cs, coef + 2 * cs, relu, True, period)


cdef int _stream_rows_shifted(const floating* x, floating* y, Py_ssize_t rows,
                              Py_ssize_t width, const floating* coef, Py_ssize_t cs,
                              const floating* rot, Py_ssize_t h, bint relu,
                              bint two, Py_ssize_t period) noexcept nogil:
    """Streamed rows of `width` values, a multiple of a 64-byte line, whose y
    starts h values before a line: taken as h values (with coef), rows - 1 rows
    of `width` from y + h (with rot, coef's rows rotated left by h; see
    _rotated), then the last width - h values (with coef + h). The same
    values in the same places, computed alike: the same bits.

    Taken as they lie, every row starts and ends inside a line, whose values
    the streamed loop stores one by one with ordinary stores (the line is
    read first). Against that, both builds in one
    process, AMD EPYC (Zen 5), cold, x and y 16 or 48 bytes into a line (as
    glibc places large arrays: 16 bytes into a page): evaluation 65536x64 and
    16384x256 1.36-1.55x on one thread (1.00-1.38x on two), training forward
    1.10-1.26x (1.00-1.15x); with y on a line no change (0.96-1.05x).
    """
    cdef Py_ssize_t p, off, n, stride
    cdef const floating* cf
    cdef int bad = 0
    for p in range(rows + 1):
        off = _shifted_piece(p, rows, width, h, coef, cs, rot, &n, &cf, &stride)
        bad |= _affine_piece(x + off, y + off, n, cf, stride, relu, two, period)
    cbn_store_fence()
    return bad


cdef int _normalize_runs(const floating* x, floating* y, const Geometry* g,
                         const floating* coef, Py_ssize_t u0, Py_ssize_t u1,
                         bint relu, bint two, bint nt) noexcept nogil:
    """inner > 1: the runs (n, c, :) numbered u0 .. u1-1 in memory order.

    two: coef holds rows a, c of cbn_uncentre (taken as m = 0, a, b = c; x - 0
    is x, so the same bits as the row kernels' x*a + c). Only short runs get
    them (see _uncentre), and come here only if their rows found no memory.
    Returns 1 if any z is non-finite.
    """
    cdef Py_ssize_t C = g.channels
    cdef int bad
    if two:
        bad = _affine_runs(x, y, g.inner, C, u0, u1, NULL, coef, coef + C, relu, nt)
    else:
        bad = _affine_runs(x, y, g.inner, C, u0, u1, coef, coef + C, coef + 2 * C, relu, nt)
    if nt:
        cbn_store_fence()
    return bad


cdef inline Py_ssize_t _fold(Py_ssize_t row_bytes, Py_ssize_t target,
                            Py_ssize_t rows) noexcept nogil:
    """Rows (k) that a pass treats as one virtual row of about `target` bytes,
    for rows of at most half that; 1 for longer ones. At most `rows`: widening
    the coefficient rows for rows that are not there only costs (a (4, 8)
    backward widened seven of them 64 times, 14 KiB; capped, the call takes
    2.2 µs instead of 3.1)."""
    cdef Py_ssize_t k = target // row_bytes if 2 * row_bytes <= target else 1
    if k > rows:
        k = rows
    return k if k > 1 else 1


cdef inline Py_ssize_t _row_fold(Py_ssize_t row_bytes, bint single, Py_ssize_t rows) noexcept nogil:
    """Rows that normalize treats as one virtual row (inner == 1; see _fold).

    Short rows run short vector loops; k rows at a time make one of about
    FOLD_BYTES. Longer virtual rows only cost: their coefficient rows crowd
    L1. Measured in one process against 512-value rows (the former rule):
    float64 (4096, 256) and channels-last (.., 64) training forward and
    evaluation 1.1-1.3x, float32 (65536, 64) evaluation 1.14x; 128-byte
    float32 rows (C = 32) lost 0.75x when not folded. The reductions gained
    nothing from folding, so they do not fold; backward's apply pass folds to
    APPLY_FOLD_BYTES (see _backward_apply).

    Rows taken one at a time (`single`: streamed, or past the one-row budget,
    see _one_row) fold to ONE_FOLD_BYTES: each row ends by combining its NaN
    checks, which unfolded rows of 256 B-1 KiB pay per row. (65536, 64) and
    (100352, 64) float32 streamed 0.75-0.95x unfolded, 1.1-1.4x folded to
    4 KiB, against ordinary stores; one at a time in cache, float32 (4096,
    256) and (1024, 256) evaluation ran 0.84x of two rows at a time unfolded,
    1.06-1.17x folded.
    """
    return _fold(row_bytes, ONE_FOLD_BYTES if single else FOLD_BYTES, rows)


cdef inline int _rows_at_once(Py_ssize_t row_bytes) noexcept nogil:
    """Rows (k) the forward's elementwise passes take at a time: two for rows
    shorter than PAIR_ROW_BYTES, four for longer ones (CBN_EACHK).

    Two rows make four streams (x and y of each) where four make eight. On
    cold data the eight-stream pass ran 0.8x PyTorch in some processes and
    1.1x in others (4096x256 evaluation), as the buffers landed in physical
    memory; two streams per row pair measured 1.0x or more in most. Against
    four rows, both builds in one process, two processes each, one thread,
    rows of 400 B-2 KiB (4096x256, 1024x256, 16384x128, 8192x200, 64x100 and
    float32 2048x512): evaluation 1.0-1.38x (median 1.12) cold and 0.81-1.3x
    (median 1.0) in cache; training forward 0.85-1.16x (median 1.06) cold and
    0.89-1.19x (median 1.02) in cache. Rows of 4 KiB and more lost with two
    (128x2048, 32x4096 and float64 256x1024: 0.82-0.96x), so they keep four.
    """
    return 2 if row_bytes < PAIR_ROW_BYTES else 4


cdef inline Py_ssize_t _row_stride(Py_ssize_t rows, Py_ssize_t row_bytes, int k) noexcept nogil:
    """Rows between the k rows an elementwise pass takes at a time (q of CBN_EACHK).

    About rows / k, and odd for rows shorter than ODD_QUARTER_BYTES.
    A quarter of a power-of-two count of rows (1024 rows of 1 KiB: 1 MiB) puts
    the four rows of x, and those of y, a multiple of the L1 and L2 set spans
    apart: all eight streams land in the same cache sets and evict each other's
    prefetched lines. An odd number of rows apart, rows of up to 1 KiB fall into
    four different L1 sets and rows of up to 32 KiB into different L2 sets.
    Against q = rows // 4, old and new builds in one process, one and two
    threads, on rows of 512 B-2 KiB: evaluation and training forward 0.97-1.2x
    on cold data and 1.0-1.7x on data in cache (as a network's previous layer
    leaves it); backward 0.95-1.05x cold and 0.97-1.55x in cache. On rows of
    4 KiB the odd distance measured 0.95-1.0x, so those keep rows // 4. That
    was four rows at a time; two rows half a power of two apart meet in the
    same sets just the same, so they keep the rule.
    Results do not change: the passes are elementwise.
    """
    cdef Py_ssize_t q = rows // k
    if row_bytes < ODD_QUARTER_BYTES and q > 1 and q % 2 == 0:
        q -= 1
    return q


cdef inline Py_ssize_t _block_row(Py_ssize_t j, Py_ssize_t q, int k) noexcept nogil:
    """Row of step j of a pass that takes k rows q apart (CBN_EACHK): steps 0 .. q-1
    start the q blocks (rows j, j + q, ..., the leaf does the rest); the steps after
    them take the rows past the last block, one each."""
    return j if j < q else j + (k - 1) * q


cdef inline Py_ssize_t _chunk_items(Py_ssize_t item_bytes) noexcept nogil:
    """Items (rows or runs) per chunk of a second pass, which goes backwards.

    Training forward normalizes, and backward applies dx, after a first pass
    (statistics, sums) has read the same x (and dy) front to back. Taking the
    second pass's chunks last to first starts it on the data the first pass
    read last, which the cache still holds; front to back, it would find the
    least recently read data first, evicted on any array larger than the
    cache, and then evict what it is about to need. Within a chunk the loops
    run forwards, for the hardware prefetcher. Against front to back, in one
    process on cold data: backward 1.0-1.13x and training forward 0.96-1.1x
    on arrays of 4-32 MiB (one thread; two threads 0.99-1.1x and 0.97-1.05x);
    1 MiB chunks measured as well as 4 MiB, 256 KiB a little worse. Results
    do not change: the pass is elementwise.
    """
    cdef Py_ssize_t n = BACK_CHUNK_BYTES // item_bytes
    return n if n > 1 else 1


cdef int _normalize_rows_back(const floating* x, floating* y, Py_ssize_t r0, Py_ssize_t r1,
                              Py_ssize_t wide, const floating* coef, bint relu, bint two,
                              bint nt, bint one, Py_ssize_t period, const floating* rot,
                              Py_ssize_t h) noexcept nogil:
    """_normalize_rows over rows [r0, r1) in chunks, the last chunk first."""
    cdef Py_ssize_t step = _chunk_items(wide * sizeof(floating)), hi = r1, lo
    cdef int bad = 0
    while hi > r0:
        lo = hi - step if hi - step > r0 else r0
        bad |= _normalize_rows(x + lo * wide, y + lo * wide, hi - lo, wide, coef, wide,
                               relu, two, nt, one, period, rot, h)
        hi = lo
    return bad


cdef int _normalize_runs_back(const floating* x, floating* y, const Geometry* g,
                              const floating* coef, Py_ssize_t u0, Py_ssize_t u1,
                              bint relu, bint two, bint nt) noexcept nogil:
    """_normalize_runs over runs [u0, u1) in chunks, the last chunk first."""
    cdef Py_ssize_t step = _chunk_items(g.inner * sizeof(floating)), hi = u1, lo
    cdef int bad = 0
    while hi > u0:
        lo = hi - step if hi - step > u0 else u0
        bad |= _normalize_runs(x, y, g, coef, lo, hi, relu, two, nt)
        hi = lo
    return bad


cdef int _normalize(const floating* x, floating* y, const Geometry* g,
                    const floating* coef, bint relu, bint two, bint nt,
                    int n_threads, bint back=False) noexcept nogil:
    """Apply the per-channel affine map; coef holds rows m, a, b. Returns a status.

    two (rows only, without ReLU): coef holds rows a, c of cbn_uncentre instead.
    back: take each thread's share in chunks, last to first (after the
    statistics pass; see _chunk_items).

    Each thread writes one contiguous share of y. nt: write y with streaming
    stores (for outputs too large to stay cached), fenced once per chunk.
    Measured against ordinary stores on outputs of 16-64 MiB: runs of
    inner > 1 1.1-1.3x; rows (folded, see _row_fold) 1.1-1.6x.
    """
    cdef Py_ssize_t C = g.channels, w, n_work, r0, r1, k, wide, folded, h = 0
    cdef floating* rot = NULL
    cdef bint one
    cdef const floating* ext = coef
    cdef floating* widened = NULL
    cdef int bad = 0
    cdef Geometry rows
    if _spreads(g, sizeof(floating), SPREAD_MAP_BYTES):
        widened = _repeat(coef, 2 if two else 3, C, 1, g.inner)
        if widened != NULL:
            rows = _spread_geometry(g)
            bad = _normalize(x, y, &rows, widened, relu, two, nt, n_threads, back)
            free(widened)
            return bad
        # No memory for the repeated coefficients: the runs below need none.
    if g.inner == 1:
        one = _one_row(g, sizeof(floating), relu, True)
        # Short rows are processed k at a time as one row of k*C values.
        k = _row_fold(C * sizeof(floating), nt or one, g.outer)
        if k > 1:
            widened = _repeat(coef, 2 if two else 3, C, k, 1)  # rows the pass reads
            if widened == NULL:
                k = 1
            else:
                ext = widened
        wide = k * C
        folded = g.outer // k
        # Streamed rows of whole lines whose y starts inside a line: shifted to
        # start on one (see _stream_rows_shifted; without memory, as they lie).
        h = _line_shift(y, wide, sizeof(floating), folded, nt)
        if h > 0:
            rot = _rotated(ext, 2 if two else 3, wide, h)
        n_work = _workers(g.outer * C, n_threads)
        for w in prange(n_work, schedule='static', num_threads=n_work,
                        use_threads_if=n_work > 1):
            r0 = _share(folded, w, n_work)
            r1 = _share(folded, w + 1, n_work)
            if back:
                bad += _normalize_rows_back(x, y, r0, r1, wide, ext, relu, two, nt, one,
                                            C, rot, h)
            else:
                bad += _normalize_rows(x + r0 * wide, y + r0 * wide, r1 - r0, wide, ext, wide,
                                       relu, two, nt, one, C, rot, h)
        bad += _normalize_rows(x + folded * wide, y + folded * wide, g.outer - folded * k, C,
                               ext, wide, relu, two, False, one, C)
        free(widened)
        free(rot)
    else:
        n_work = _workers(g.outer * C * g.inner, n_threads)
        for w in prange(n_work, schedule='static', num_threads=n_work,
                        use_threads_if=n_work > 1):
            r0 = _share(g.outer * C, w, n_work)
            r1 = _share(g.outer * C, w + 1, n_work)
            if back:
                bad += _normalize_runs_back(x, y, g, coef, r0, r1, relu, two, nt)
            else:
                bad += _normalize_runs(x, y, g, coef, r0, r1, relu, two, nt)
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef inline bint _any_zero(Py_ssize_t C, const double* v) noexcept nogil:
    """Whether some v[c] is exactly 0."""
    cdef Py_ssize_t c
    for c in range(C):
        if v[c] == 0.0:
            return True
    return False


cdef bint _uncentre(const Geometry* g, const double* mean, const double* batch_var,
                    const floating* gamma, const floating* beta, floating* coef,
                    bint relu) noexcept nogil:
    """Rewrite coef rows m, a, b as a, c (see cbn_uncentre) where that applies.

    batch_var: the batch's variance in training (NULL otherwise). A constant
    channel (variance 0) keeps the centred form, in which x - mean is exactly
    0 and y exactly beta; x*a + c rounds a and c separately (a float32 channel
    of 0.01 came out 4e-9 off beta).

    Rows only: the runs of inner > 1 read one coefficient per run, so they gain
    nothing. Never with ReLU: its mask must be the CBN_Z that backward recomputes.
    Rows of every length take it: x*a + c measured 1.03-1.16x on rows of
    512 B-1 KiB and 6-8 KiB, and since the passes take four rows per
    coefficient load, 0.94-1.09x (about 1.03 at the median; evaluation and
    training forward, one and two threads) on rows of 2-4 KiB, which used to
    keep the centred form.
    """
    if (g.inner != 1 and not _spreads(g, sizeof(floating), SPREAD_MAP_BYTES)) or relu \
            or (batch_var != NULL and _any_zero(g.channels, batch_var)):
        return False
    if floating is float:
        return cbn_uncentre_f(g.channels, mean, gamma, beta, coef)
    else:
        return cbn_uncentre_d(g.channels, mean, gamma, beta, coef)


cdef int _forward_coefficients(const Geometry* g, Py_ssize_t c0, Py_ssize_t c1,
                               const double* mean, const double* invstd,
                               const floating* gamma, const floating* beta,
                               floating* coef) noexcept nogil:
    """Channels [c0, c1) of coef rows m, a, b (C values each) with a = gamma*invstd;
    returns 1 if any is non-finite."""
    if floating is float:
        return cbn_forward_coefs_f(c1 - c0, g.channels, mean + c0, invstd + c0, gamma + c0,
                                   beta + c0, coef + c0)
    else:
        return cbn_forward_coefs_d(c1 - c0, g.channels, mean + c0, invstd + c0, gamma + c0,
                                   beta + c0, coef + c0)


# ---------------------------------------------------------------------------
# backward_reduce: sum(g) and sum(g * (x - mean)) per channel, g = dy masked by
# the fused ReLU (recomputed from x, so no mask array is ever stored).
# ---------------------------------------------------------------------------

cdef void _reduce_rows(const floating* dy, const floating* x, Py_ssize_t rows,
                       Py_ssize_t channels, Py_ssize_t c0, Py_ssize_t c1,
                       const double* mean, const floating* coef, bint relu,
                       double* sum_g_out, double* sum_gd_out) noexcept nogil:
    """Backward sums over rows [0, rows) for channels [c0, c1) (inner == 1),
    accumulated in the outputs' own entries (see _stats_rows)."""
    _row_grad_sums(dy, x, rows, channels, c0, c1, mean, coef, relu, sum_g_out + c0,
                   sum_gd_out + c0)


cdef void _row_grad_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                         Py_ssize_t channels, Py_ssize_t c0, Py_ssize_t c1,
                         const double* mean, const floating* coef, bint relu,
                         restrict_doubles s1, restrict_doubles s2) noexcept nogil:
    """_reduce_rows into s1[j], s2[j] for channel c0 + j, restrict (see
    _shifted_row_sums)."""
    cdef Py_ssize_t width = c1 - c0, j
    cdef const floating* m = coef + c0
    cdef const floating* a = coef + channels + c0
    cdef const floating* b = coef + 2 * channels + c0
    cdef int narrow = 0
    for j in range(width):
        s1[j] = 0.0
        s2[j] = 0.0
    if width == channels:   # whole rows of 8, 16, ..., 64: register-resident sums
        if floating is float:
            narrow = cbn_narrow_grad_sums_f(dy, x, rows, channels, mean, m, a, b, relu, s1, s2)
        else:
            narrow = cbn_narrow_grad_sums_d(dy, x, rows, channels, mean, m, a, b, relu, s1, s2)
    if narrow:
        pass
    elif floating is float:
        cbn_rows_grad_sums_f(dy + c0, x + c0, rows, channels, width, mean + c0, m, a, b, relu,
                             s1, s2)
    else:
        cbn_rows_grad_sums_d(dy + c0, x + c0, rows, channels, width, mean + c0, m, a, b, relu,
                             s1, s2)


cdef void _reduce_runs(const floating* dy, const floating* x, const Geometry* g,
                       Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t c0, Py_ssize_t c1,
                       const double* mean, const floating* coef, bint relu,
                       double* sum_g_out, double* sum_gd_out) noexcept nogil:
    """Backward sums of the runs, n in [n0, n1), c in [c0, c1), in memory order,
    accumulated in the outputs' own entries (see _stats_rows)."""
    _run_grad_sums(dy, x, g, n0, n1, c0, c1, mean, coef, relu, sum_g_out + c0,
                   sum_gd_out + c0)


cdef void _run_grad_sums(const floating* dy, const floating* x, const Geometry* g,
                         Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t c0, Py_ssize_t c1,
                         const double* mean, const floating* coef, bint relu,
                         restrict_doubles s1, restrict_doubles s2) noexcept nogil:
    """_reduce_runs into s1[c - c0], s2[c - c0], restrict (see _shifted_row_sums).

    Each image's part of [c0, c1) is read as one stretch, prefetched
    RUN_GRAD_AHEAD bytes ahead. A stretch of at most STRIDE_PREFETCH_BYTES (a
    backward channel group, see _group_channels) ends before that helps, and
    the next image's starts where nothing was fetched: its runs are
    prefetched one image ahead instead, the next image's same values. On the
    Xeon of session 26, cold data, one process, one and two threads, against
    prefetching 2 KiB ahead: 32x512x7x7 float32 1.10-1.12x, 8x512x7x7
    1.04-1.08x, 8x2048x7x7, 16x1024x7x7 and 8x512x14x14 1.03-1.05x,
    8x1024x7x7 float64 1.03x, 8x256x28x28 float32 1.01x. (4 and 16 KiB
    measured alike.)"""
    cdef Py_ssize_t C = g.channels, inner = g.inner, n, c, off
    cdef Py_ssize_t ahead = RUN_GRAD_AHEAD
    if (c1 - c0) * inner * <Py_ssize_t>sizeof(floating) <= STRIDE_PREFETCH_BYTES:
        ahead = C * inner * <Py_ssize_t>sizeof(floating)
    for c in range(c0, c1):
        s1[c - c0] = 0.0
        s2[c - c0] = 0.0
    for n in range(n0, n1):
        for c in range(c0, c1):
            off = (n * C + c) * inner
            if floating is float:
                cbn_run_grad_sums_f(dy + off, x + off, inner, mean[c], coef[c], coef[C + c],
                                    coef[2 * C + c], relu, ahead, &s1[c - c0], &s2[c - c0])
            else:
                cbn_run_grad_sums_d(dy + off, x + off, inner, mean[c], coef[c], coef[C + c],
                                    coef[2 * C + c], relu, ahead, &s1[c - c0], &s2[c - c0])


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
    part_g += ob * _part_row(g)
    part_gd += ob * _part_row(g)
    if g.inner == 1:
        _reduce_rows(dy + n0 * C, x + n0 * C, n1 - n0, C, c0, c1, mean, coef, relu,
                     part_g, part_gd)
    else:
        _reduce_runs(dy, x, g, n0, n1, c0, c1, mean, coef, relu, part_g, part_gd)


cdef int _spread_reduce(const floating* dy, const floating* x, const Geometry* g,
                        const double* mean, const floating* coef, bint relu,
                        double* sum_g_out, double* sum_gd_out, int n_threads) noexcept nogil:
    """_backward_reduce through the columns of the (outer, C*inner) view (see
    _spreads), summed per channel in column order."""
    cdef Geometry rows = _spread_geometry(g)
    cdef Py_ssize_t W = rows.channels, inner = g.inner, c, i
    cdef double* col = <double*>malloc(3 * W * sizeof(double))  # mean, then the sums
    cdef floating* wide = _repeat(coef, 3, g.channels, 1, inner)
    cdef double s1, s2
    cdef int status = STATUS_NO_MEMORY
    if col != NULL and wide != NULL:
        for c in range(g.channels):
            for i in range(inner):
                col[c * inner + i] = mean[c]
        status = _backward_reduce(dy, x, &rows, col, wide, relu, col + W, col + 2 * W,
                                  n_threads)
    if status == STATUS_OK:
        for c in range(g.channels):
            s1 = 0.0
            s2 = 0.0
            for i in range(inner):
                s1 += col[W + c * inner + i]
                s2 += col[2 * W + c * inner + i]
            sum_g_out[c] = s1
            sum_gd_out[c] = s2
    free(col)
    free(wide)
    return status


cdef int _backward_reduce(const floating* dy, const floating* x, const Geometry* g,
                          const double* mean, const floating* coef, bint relu,
                          double* sum_g_out, double* sum_gd_out,
                          int n_threads) noexcept nogil:
    """Per-channel sum(g) and sum(g*(x-mean)); coef rows m, a, b give the ReLU mask."""
    cdef int status
    if _spread_sums(g, sizeof(floating), True):
        status = _spread_reduce(dy, x, g, mean, coef, relu, sum_g_out, sum_gd_out, n_threads)
        if status != STATUS_NO_MEMORY:
            return status
        # No memory for the column sums: the runs below need less.
    cdef Py_ssize_t n_tasks = g.n_outer_blocks * g.n_channel_blocks, t
    cdef Py_ssize_t C = g.channels, size = _part_stride(g)
    cdef double* part = _part_alloc(2 * size)
    cdef int team = _team(n_threads, n_tasks)
    if part == NULL:
        return STATUS_NO_MEMORY
    for t in prange(n_tasks, schedule='static', num_threads=team, use_threads_if=team > 1):
        _reduce_task(dy, x, g, t, mean, coef, relu, part, part + size)
    _sum_blocks(g, 0, C, part, sum_g_out, sum_gd_out)
    _part_free(part)
    return STATUS_OK


cdef void _sum_blocks(const Geometry* g, Py_ssize_t c0, Py_ssize_t c1, const double* part,
                      double* sum_g_out, double* sum_gd_out) noexcept nogil:
    """Channels [c0, c1) of the backward sums: each channel's block partials
    (part: sum(g) rows, then sum(g*(x-mean)) rows, one per outer block) added
    in block order, the one order whatever the threads or channel groups."""
    cdef Py_ssize_t size = _part_stride(g), row = _part_row(g), c, blk
    cdef double s1, s2
    for c in range(c0, c1):
        s1 = 0.0
        s2 = 0.0
        for blk in range(g.n_outer_blocks):
            s1 += part[blk * row + c]
            s2 += part[size + blk * row + c]
        sum_g_out[c] = s1
        sum_gd_out[c] = s2


# ---------------------------------------------------------------------------
# backward_apply: dx = a*(g + k0 + kx*x_hat) per channel, x_hat = (x - m)*s.
# Training has kx = -invstd*sum(g*(x-mean))/M (= -dgamma/M) and
# k0 = -sum(g)/M (+ a correction for m being the mean rounded to the dtype);
# evaluation has kx = k0 = 0. coef rows: m, a, b (forward, for the mask), s
# (invstd), kx, k0. Keeping x_hat, O(1), as a factor keeps every coefficient
# within float32's range even for inputs of 1e22 (a*invstd^2 would underflow).
# The composite backward adds a seventh row, the slopes kx*s, which rows use
# instead of s and kx unless some slope is subnormal or overflows (cbn_backward_coefs).
# ---------------------------------------------------------------------------

cdef inline int _grad_row(const floating* dy, const floating* x, floating* dx,
                          Py_ssize_t n, Py_ssize_t qs, const floating* coef, Py_ssize_t C,
                          bint relu, bint fused, bint nt, Py_ssize_t period) noexcept nogil:
    # qs as in _affine_row. fused: row 6 holds the slopes kx*s (cbn_backward_coefs),
    # read instead of rows s, kx.
    cdef const floating* s = coef + 3 * C
    cdef const floating* kx = coef + 4 * C
    if fused:
        s = NULL
        kx = coef + 6 * C
    if floating is float:
        if qs:
            return cbn_grad_row4_f(dy, x, dx, n, qs, coef, coef + C, coef + 2 * C, s, kx,
                                   coef + 5 * C, relu)
        return cbn_grad_row_f(dy, x, dx, n, coef, coef + C, coef + 2 * C, s, kx, coef + 5 * C,
                              relu, nt, period)
    else:
        if qs:
            return cbn_grad_row4_d(dy, x, dx, n, qs, coef, coef + C, coef + 2 * C, s, kx,
                                   coef + 5 * C, relu)
        return cbn_grad_row_d(dy, x, dx, n, coef, coef + C, coef + 2 * C, s, kx, coef + 5 * C,
                              relu, nt, period)


cdef inline int _grad_run(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                          const floating* coef, Py_ssize_t C, Py_ssize_t c,
                          bint relu, bint nt) noexcept nogil:
    if floating is float:
        return cbn_grad_run_f(dy, x, dx, n, coef[c], coef[C + c], coef[2 * C + c],
                              coef[3 * C + c], coef[4 * C + c], coef[5 * C + c], relu, nt)
    else:
        return cbn_grad_run_d(dy, x, dx, n, coef[c], coef[C + c], coef[2 * C + c],
                              coef[3 * C + c], coef[4 * C + c], coef[5 * C + c], relu, nt)


cdef inline int _scale_row(const floating* dy, floating* dx, Py_ssize_t n, Py_ssize_t qs,
                           const floating* a, bint nt, Py_ssize_t period) noexcept nogil:
    if floating is float:
        if qs:
            return cbn_scale_row4_f(dy, dx, n, qs, a)
        return cbn_scale_row_f(dy, dx, n, a, nt, period)
    else:
        if qs:
            return cbn_scale_row4_d(dy, dx, n, qs, a)
        return cbn_scale_row_d(dy, dx, n, a, nt, period)


cdef inline int _scale_run(const floating* dy, floating* dx, Py_ssize_t n,
                           floating a, bint nt) noexcept nogil:
    if floating is float:
        return cbn_scale_run_f(dy, dx, n, a, nt)
    else:
        return cbn_scale_run_d(dy, dx, n, a, nt)


cdef inline int _apply_piece(const floating* dy, const floating* x, floating* dx,
                             Py_ssize_t n, const floating* coef, Py_ssize_t cs, bint relu,
                             bint use_x, bint fused, Py_ssize_t period) noexcept nogil:
    """n values of dx streamed, coefficient rows `cs` apart (see _apply_rows)."""
    if use_x:
        return _grad_row(dy, x, dx, n, 0, coef, cs, relu, fused, True, period)
    return _scale_row(dy, dx, n, 0, coef + cs, True, period)


cdef int _apply_rows_shifted(const floating* dy, const floating* x, floating* dx,
                             Py_ssize_t rows, Py_ssize_t width, const floating* coef,
                             Py_ssize_t cs, const floating* rot, Py_ssize_t h, bint relu,
                             bint use_x, bint fused, Py_ssize_t period) noexcept nogil:
    """_apply_rows' streamed rows shifted by h values to start on a line, as
    _stream_rows_shifted does for normalize (rot: coef's rows rotated left by h).
    Both builds in one process, AMD EPYC (Zen 5), cold, dy, x and dx 16 bytes
    into a line: backward 65536x64, 16384x256 and 100352x64 1.19-1.28x on one
    thread, 1.08-1.15x on two, 1.12-1.29x with dx allocated; with dx on a line
    no change (0.94-1.04x)."""
    cdef Py_ssize_t p, off, n, stride
    cdef const floating* cf
    cdef int bad = 0
    for p in range(rows + 1):
        off = _shifted_piece(p, rows, width, h, coef, cs, rot, &n, &cf, &stride)
        bad |= _apply_piece(dy + off, x + off, dx + off, n, cf, stride, relu, use_x, fused,
                            period)
    cbn_store_fence()
    return bad


cdef int _apply_rows(const floating* dy, const floating* x, floating* dx, Py_ssize_t rows,
                     Py_ssize_t C, const floating* coef, Py_ssize_t cs, bint relu,
                     bint use_x, bint fused, bint nt, bint one, Py_ssize_t period,
                     const floating* rot=NULL, Py_ssize_t h=0) noexcept nogil:
    """inner == 1 rows of dx; without use_x (fixed statistics, no ReLU) dx = a*dy.
    Coefficient rows repeat every `period` values (the channels; see cbn_periodic).

    Four rows at a time, about a quarter of the rows apart (_row_stride);
    with nt or `one`, one row at a time in memory order (see _one_row).
    Coefficient rows `cs` apart. Streamed rows with `rot` go shifted by h
    values to start on a line (_apply_rows_shifted).
    """
    cdef Py_ssize_t j, off, qs
    cdef Py_ssize_t q = 0 if nt or one else _row_stride(rows, C * sizeof(floating), 4)
    cdef int bad = 0
    if nt and rot != NULL and rows > 0:
        return _apply_rows_shifted(dy, x, dx, rows, C, coef, cs, rot, h, relu, use_x, fused,
                                   period)
    for j in range(rows - 3 * q):
        off = _block_row(j, q, 4) * C
        qs = q * C if j < q else 0
        if use_x:
            bad |= _grad_row(dy + off, x + off, dx + off, C, qs, coef, cs, relu, fused, nt,
                             period)
        else:
            bad |= _scale_row(dy + off, dx + off, C, qs, coef + cs, nt, period)
    if nt:
        cbn_store_fence()
    return bad


cdef int _apply_runs(const floating* dy, const floating* x, floating* dx,
                     const Geometry* g, const floating* coef, Py_ssize_t u0, Py_ssize_t u1,
                     bint relu, bint use_x, bint nt) noexcept nogil:
    """inner > 1: dx for the runs (n, c, :) numbered u0 .. u1-1 in memory order.

    With nt the caller fences the streamed stores, in the thread that made
    them, once it has written all it will (see _apply_runs_back, _backward_group)
    instead of once per call: a channel group calls it once per image (8x256x28x28
    float32: 15 KiB of dx), and a fence each time ran the streamed grouped
    backward 0.94-1.0x of one fence per group.
    """
    cdef Py_ssize_t C = g.channels, inner = g.inner, u, off
    cdef int bad = 0
    for u in range(u0, u1):
        off = u * inner
        if use_x:
            bad |= _grad_run(dy + off, x + off, dx + off, inner, coef, C, u % C, relu, nt)
        else:
            bad |= _scale_run(dy + off, dx + off, inner, coef[C + u % C], nt)
    return bad


cdef int _apply_rows_back(const floating* dy, const floating* x, floating* dx, Py_ssize_t r0,
                          Py_ssize_t r1, Py_ssize_t wide, const floating* coef, Py_ssize_t cs,
                          bint relu, bint use_x, bint fused, bint nt,
                          bint one, Py_ssize_t period, const floating* rot,
                          Py_ssize_t h) noexcept nogil:
    """_apply_rows over rows [r0, r1) in chunks, the last chunk first."""
    cdef Py_ssize_t step = _chunk_items(wide * sizeof(floating)), hi = r1, lo
    cdef int bad = 0
    while hi > r0:
        lo = hi - step if hi - step > r0 else r0
        bad |= _apply_rows(dy + lo * wide, x + lo * wide, dx + lo * wide, hi - lo, wide,
                           coef, cs, relu, use_x, fused, nt, one, period, rot, h)
        hi = lo
    return bad


cdef int _apply_runs_back(const floating* dy, const floating* x, floating* dx,
                          const Geometry* g, const floating* coef, Py_ssize_t u0,
                          Py_ssize_t u1, bint relu, bint use_x, bint nt) noexcept nogil:
    """_apply_runs over runs [u0, u1) in chunks, the last chunk first; with nt
    each chunk's streamed stores fenced."""
    cdef Py_ssize_t step = _chunk_items(g.inner * sizeof(floating)), hi = u1, lo
    cdef int bad = 0
    while hi > u0:
        lo = hi - step if hi - step > u0 else u0
        bad |= _apply_runs(dy, x, dx, g, coef, lo, hi, relu, use_x, nt)
        if nt:
            cbn_store_fence()
        hi = lo
    return bad


cdef int _backward_apply(const floating* dy, const floating* x, floating* dx,
                         const Geometry* g, const floating* coef, bint relu, bint use_x,
                         bint fused, bint nt, int n_threads) noexcept nogil:
    """dx = a*(g + k0 + kx*(x - m)*s) per channel (coef rows m, a, b, s, kx, k0); a status.

    fused (rows only): coef has a seventh row, the slopes kx*s, and rows use
    dx = a*(g + k0 + slope*(x - m)): one coefficient row fewer to stream,
    backward 1.0-1.1x on rows of 64-1024 channels.

    Each thread writes one contiguous share of dx, in chunks last to first
    (the sums pass has just read x and dy front to back; see _chunk_items).
    nt: write dx with streaming stores (for outputs too large to stay cached),
    fenced once per chunk.
    """
    cdef Py_ssize_t C = g.channels, w, n_work, r0, r1, n_runs = g.outer * C
    cdef Py_ssize_t k, wide, folded, cs = C, h = 0
    cdef bint one
    cdef floating* widened = NULL
    cdef floating* rot = NULL
    cdef const floating* ext = coef
    cdef int bad = 0
    cdef Geometry rows
    if _spreads(g, sizeof(floating), SPREAD_MAP_BYTES):
        widened = _repeat(coef, 7 if fused else 6, C, 1, g.inner)
        if widened != NULL:
            rows = _spread_geometry(g)
            bad = _backward_apply(dy, x, dx, &rows, widened, relu, use_x, fused, nt,
                                  n_threads)
            free(widened)
            return bad
        # No memory for the repeated coefficients: the runs below need none.
    n_work = _workers(n_runs * g.inner, n_threads)
    if g.inner == 1:
        # Rows of every length stream dx when asked. Rows under 4 KiB used not
        # to (0.86-1.09x); since this pass runs its chunks last to first, the
        # streamed dx no longer evicts the x and dy it is about to reread:
        # rows of 64-256 channels (arrays of 16-32 MiB) 1.1-1.3x, one and two
        # threads. Rows of 4 KiB and more: 1.02-1.12x.
        # Short rows are processed k at a time as one row of k*C values.
        one = _one_row(g, sizeof(floating), relu, False)
        k = _fold(C * sizeof(floating), APPLY_FOLD_BYTES, g.outer)
        if k > 1:
            widened = _repeat(coef, 7 if fused else 6, C, k, 1)
            if widened == NULL:
                k = 1
            else:
                ext = widened
                cs = k * C
        wide = k * C
        folded = g.outer // k
        h = _line_shift(dx, wide, sizeof(floating), folded, nt)
        if h > 0:
            rot = _rotated(ext, 7 if fused else 6, wide, h)
        for w in prange(n_work, schedule='static', num_threads=n_work,
                        use_threads_if=n_work > 1):
            r0 = _share(folded, w, n_work)
            r1 = _share(folded, w + 1, n_work)
            bad += _apply_rows_back(dy, x, dx, r0, r1, wide, ext, cs, relu, use_x, fused, nt,
                                    one, C, rot, h)
        bad += _apply_rows(dy + folded * wide, x + folded * wide, dx + folded * wide,
                           g.outer - folded * k, C, ext, cs, relu, use_x, fused, False, one,
                           C)
        free(widened)
        free(rot)
    else:
        for w in prange(n_work, schedule='static', num_threads=n_work,
                        use_threads_if=n_work > 1):
            bad += _apply_runs_back(dy, x, dx, g, coef, _share(n_runs, w, n_work),
                                    _share(n_runs, w + 1, n_work), relu, use_x, nt)
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef int _backward_coefficients(const Geometry* g, Py_ssize_t c0, Py_ssize_t c1,
                                const double* mean, const double* invstd,
                                const double* sum_g, const double* sum_gd, bint training,
                                floating* coef) noexcept nogil:
    """Fill channels [c0, c1) of rows s, kx, k0 and the slopes (row 6) of coef,
    which has seven rows of C values (rows m, a, b already set); bit 1 if
    non-finite, bit 2 if the slopes are unusable."""
    cdef double count = <double>(g.outer * g.inner)
    if floating is float:
        return cbn_backward_coefs_f(c1 - c0, g.channels, count, mean + c0, invstd + c0,
                                    sum_g + c0, sum_gd + c0, training, coef + c0)
    else:
        return cbn_backward_coefs_d(c1 - c0, g.channels, count, mean + c0, invstd + c0,
                                    sum_g + c0, sum_gd + c0, training, coef + c0)


# ---------------------------------------------------------------------------
# Python-callable primitives. Arguments are marked IN or OUT; 3-d arrays are
# the (outer, C, inner) view; per-channel double arrays have length C.
# ---------------------------------------------------------------------------

cdef Geometry _operands(str name, const Py_ssize_t* x, const Py_ssize_t* a=NULL,
                        const Py_ssize_t* b=NULL) except *:
    """The geometry of a primitive's (outer, C, inner) x, after checking that x
    holds values and that the other 3-d operands a, b (NULL: none) match it.

    The kernels take a batch as they find it: an empty one divides by zero (a
    crash, not an exception) and a short output is written past its end.
    cbn.functional and the layer check their arguments before they get here;
    these checks keep a direct call of a primitive just as safe.
    """
    cdef const Py_ssize_t* others[2]
    cdef const Py_ssize_t* other
    cdef int k
    if x[0] == 0 or x[1] == 0 or x[2] == 0:
        raise ValueError(f"{name}: x is empty (shape ({x[0]}, {x[1]}, {x[2]}))")
    others[0], others[1] = a, b
    for k in range(2):
        other = others[k]
        if other != NULL and (other[0] != x[0] or other[1] != x[1] or other[2] != x[2]):
            raise ValueError(f"{name}: arrays of shape ({other[0]}, {other[1]}, {other[2]}) "
                             f"and ({x[0]}, {x[1]}, {x[2]}) do not match")
    return _geometry(x[0], x[1], x[2])


cdef int _per_channel(str name, Py_ssize_t C, lengths, const Py_ssize_t* coef=NULL,
                      Py_ssize_t rows=0) except -1:
    """Check that the per-channel arrays of a primitive (their lengths) have C
    values each and that its coefficient array (shape coef) is (rows, C)."""
    for n in lengths:
        if n != C:
            raise ValueError(f"{name}: per-channel arrays must have {C} values, got {n}")
    if coef != NULL and (coef[0] != rows or coef[1] != C):
        raise ValueError(f"{name}: coef must have shape ({rows}, {C}), "
                         f"got ({coef[0]}, {coef[1]})")
    return 0


def batch_stats(const floating[:, :, ::1] x,    # IN  (outer, C, inner)
                double[::1] mean_out,           # OUT (C,)
                double[::1] var_out,            # OUT (C,) biased variance
                int n_threads=1):
    """Per-channel mean and biased variance of ``x`` over axes 0 and 2.

    Returns a status code (0: ok, 3: out of memory).
    """
    cdef Geometry g = _operands("batch_stats", x.shape)
    _per_channel("batch_stats", g.channels, (mean_out.shape[0], var_out.shape[0]))
    cdef int status
    with nogil:
        status = _batch_stats(&x[0, 0, 0], &g, &mean_out[0], &var_out[0], n_threads)
    return status


def normalize(const floating[:, :, ::1] x,      # IN  (outer, C, inner)
              floating[:, :, ::1] y_out,        # OUT (outer, C, inner), may be x
              const floating[:, ::1] coef,      # IN  (3, C): m, a, b
              bint relu=False, int n_threads=1, bint stream=False):
    """``y = (x - m) * a + b`` per channel (then ReLU if asked).

    ``stream`` writes y with non-temporal stores, which bypass the cache: for
    outputs too large to stay cached. Returns 0, or 2 if some pre-activation
    value is NaN or infinite.
    """
    cdef Geometry g = _operands("normalize", x.shape, y_out.shape)
    _per_channel("normalize", g.channels, (), coef.shape, 3)
    cdef int status
    with nogil:
        status = _normalize(&x[0, 0, 0], &y_out[0, 0, 0], &g, &coef[0, 0], relu, False,
                            stream, n_threads)
    return status


def backward_reduce(const floating[:, :, ::1] dy,   # IN  (outer, C, inner)
                    const floating[:, :, ::1] x,    # IN  (outer, C, inner)
                    const double[::1] mean,         # IN  (C,)
                    const floating[:, ::1] coef,    # IN  (3, C): m, a, b (ReLU mask)
                    double[::1] sum_g_out,          # OUT (C,)
                    double[::1] sum_gd_out,         # OUT (C,)
                    bint relu=False, int n_threads=1):
    """``sum(g)`` and ``sum(g * (x - mean))`` per channel, g = dy (masked by ReLU).

    Returns 0, or 3 if out of memory.
    """
    cdef Geometry g = _operands("backward_reduce", x.shape, dy.shape)
    _per_channel("backward_reduce", g.channels,
                 (mean.shape[0], sum_g_out.shape[0], sum_gd_out.shape[0]), coef.shape, 3)
    cdef int status
    with nogil:
        status = _backward_reduce(&dy[0, 0, 0], &x[0, 0, 0], &g, &mean[0], &coef[0, 0],
                                  relu, &sum_g_out[0], &sum_gd_out[0], n_threads)
    return status


def backward_apply(const floating[:, :, ::1] dy,    # IN  (outer, C, inner)
                   const floating[:, :, ::1] x,     # IN  (outer, C, inner)
                   const floating[:, ::1] coef,     # IN  (6, C): m, a, b, s, kx, k0
                   floating[:, :, ::1] dx_out,      # OUT (outer, C, inner), may be dy
                   bint relu=False, int n_threads=1, bint stream=False):
    """``dx = a*(g + k0 + kx*(x - m)*s)`` per channel; returns 0, or 2 if non-finite.

    ``stream``: write dx with non-temporal stores, as in ``normalize``.
    """
    cdef Geometry g = _operands("backward_apply", x.shape, dy.shape, dx_out.shape)
    _per_channel("backward_apply", g.channels, (), coef.shape, 6)
    cdef int status
    with nogil:
        status = _backward_apply(&dy[0, 0, 0], &x[0, 0, 0], &dx_out[0, 0, 0], &g,
                                 &coef[0, 0], relu, True, False, stream, n_threads)
    return status


def ema_update(floating[::1] running_mean,     # IN/OUT (C,)
               floating[::1] running_var,      # IN/OUT (C,)
               const double[::1] mean,         # IN (C,) batch mean
               const double[::1] var,          # IN (C,) batch biased variance
               double count, double factor,
               int64_t[::1] tracked=None,      # IN/OUT (1,) batches tracked, or None
               int64_t new_tracked=0):
    """``running = (1 - factor) * running + factor * batch`` for mean and variance.

    The variance folded in is the unbiased ``var * count / (count - 1)``, as in
    PyTorch; ``factor`` is ``momentum``, or ``1 / num_batches_tracked`` for a
    cumulative average. Writes nothing and returns 1 if a new value would not
    be finite in the running statistics' dtype (say float32 overflow); else 0.
    With ``tracked`` (a layer's count of batches, one int64), also sets
    ``tracked[0] = new_tracked`` when the statistics are written: in the same C
    call, so that no KeyboardInterrupt can land between the two.
    """
    cdef Py_ssize_t c, C = running_mean.shape[0]
    if running_var.shape[0] != C or mean.shape[0] != C or var.shape[0] != C:
        # Without this, a short array would be read or written past its end.
        raise ValueError(
            "ema_update: running_mean, running_var, mean and var must have the same length, "
            f"got {C}, {running_var.shape[0]}, {mean.shape[0]} and {var.shape[0]}")
    if tracked is not None and tracked.shape[0] != 1:
        raise ValueError(f"ema_update: tracked must hold one value, got {tracked.shape[0]}")
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
    if not bad and tracked is not None:
        tracked[0] = new_tracked
    return bad


cdef class _GuardState:
    """What a :class:`Guard` and its shared side both read and write. Held by
    both, pointing at neither: a Guard that referred to its shared side and
    back would be a reference cycle, freed only by the cyclic collector (two
    objects per layer, kept for good where an application disables gc)."""
    cdef int holders          # -1: exclusive; n >= 0: n shared
    cdef object message


cdef class Guard:
    """Who is inside a layer's calls: one exclusive holder (``with guard:``)
    or any number of shared ones (``with guard.shared:``).

    Entering never waits: it raises ``RuntimeError(message)`` when the other
    kind is inside (or, for exclusive, anyone). Compiled, not Python: between
    a Python ``acquire()`` returning and the ``try`` that would release it, a
    KeyboardInterrupt can land and leave the lock taken for good; ``with`` on
    this type enters in C and has its exit armed before any Python signal
    handler can run. Relies on the GIL (one thread at a time in C here).
    """
    cdef _GuardState state
    cdef readonly SharedGuard shared

    def __cinit__(self, message):
        self.state = _GuardState()
        self.state.holders = 0
        self.state.message = message
        self.shared = SharedGuard(self.state)

    def __enter__(self):
        if self.state.holders != 0:
            raise RuntimeError(self.state.message)
        self.state.holders = -1
        return self

    def __exit__(self, exc_type, exc, tb):
        self.state.holders = 0
        return False

    @property
    def holding(self):
        """-1 while held exclusively, else the number of shared holders."""
        return self.state.holders


cdef class SharedGuard:
    """The shared side of a :class:`Guard` (its ``shared`` attribute)."""
    cdef _GuardState state

    def __cinit__(self, _GuardState state):
        self.state = state

    def __enter__(self):
        if self.state.holders < 0:
            raise RuntimeError(self.state.message)
        self.state.holders += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        self.state.holders -= 1
        return False


cdef extern from *:
    """
    static __thread long cbn_no_grad_depth = 0;  /* open no_grad blocks, per thread */
    """
    long cbn_no_grad_depth


cdef class NoGrad:
    """The grad mode switch behind ``cbn.no_grad``: while a block is open in a
    thread, forwards there keep nothing for backward. Compiled for the same
    reason as :class:`Guard`: a KeyboardInterrupt between a Python
    ``__enter__``'s count and its return would leave the thread's forwards
    keeping nothing for good. The count is a C thread-local (threads as the
    OS sees them, as Python's are)."""

    def __enter__(self):
        global cbn_no_grad_depth
        cbn_no_grad_depth += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        global cbn_no_grad_depth
        cbn_no_grad_depth -= 1
        return False


def grad_enabled():
    """Whether forwards in this thread keep what backward needs (no
    ``no_grad`` block open)."""
    return cbn_no_grad_depth == 0


# ---------------------------------------------------------------------------
# Composites: one Python call and one nogil region per layer call. The
# per-channel scratch (coefficients, sums) lives on the C heap for the call.
# ---------------------------------------------------------------------------

cdef int _invstd(Py_ssize_t C, const double* var, double eps, double* invstd_out) noexcept nogil:
    """invstd = 1/sqrt(var + eps); returns 1 if var or invstd is not finite, 2 if a var < 0."""
    return cbn_invstd(C, var, eps, invstd_out)


cdef int _given_coefficients(const Geometry* g, const double* mean, const double* var,
                             double eps, const floating* gamma, const floating* beta,
                             double* invstd, floating* coef) noexcept nogil:
    """invstd and coef rows m, a, b from given statistics; returns a status code."""
    cdef int bad = _invstd(g.channels, var, eps, invstd)
    if bad == 2:
        return STATUS_NEGATIVE_VAR
    if bad or _forward_coefficients(g, 0, g.channels, mean, invstd, gamma, beta, coef):
        return STATUS_NONFINITE_OUTPUT
    return STATUS_OK


cdef int _all_finite(Py_ssize_t C, const double* v) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        if not isfinite(v[c]):
            return 0
    return 1


# Bytes of x and dy that one channel group of a backward reads twice (see
# _group_channels); 0: no backward groups. cbn.functional sets it at import.
cdef size_t _group_budget = 0


def set_group_bytes(Py_ssize_t nbytes):
    """Set the backward's channel-group budget: bytes of x and dy per group (0: off).

    cbn.functional calls it at import with an eighth of the per-core (L2)
    cache, or the environment variable CBN_GROUP_BYTES. Results do not
    depend on it (the same bits either way); only speed does.
    """
    global _group_budget
    if nbytes < 0:
        raise ValueError(f"group bytes must be >= 0, got {nbytes}")
    _group_budget = <size_t>nbytes


def group_bytes():
    """The backward's channel-group budget in bytes (0: off; see ``set_group_bytes``)."""
    return _group_budget


# Bytes of x and dy up to which a channel beyond the group budget, with runs of
# CHANNEL_GROUP_STRETCH bytes and more, is a backward group by itself (see
# _group_channels); 0: never. cbn.functional sets it at import.
cdef size_t _channel_budget = 0


def set_channel_group_bytes(Py_ssize_t nbytes):
    """Set how many bytes of x and dy a backward channel with long runs may hold
    and still be a group by itself (0: never; see ``_group_channels``).

    cbn.functional calls it at import with half the per-core (L2) cache on
    Intel CPUs and 0 elsewhere, or the environment variable
    CBN_CHANNEL_GROUP_BYTES. Results do not depend on it; only speed does.
    """
    global _channel_budget
    if nbytes < 0:
        raise ValueError(f"channel group bytes must be >= 0, got {nbytes}")
    _channel_budget = <size_t>nbytes


def channel_group_bytes():
    """Bytes of x and dy up to which a long-run channel is a backward group alone
    (0: never; see ``set_channel_group_bytes``)."""
    return _channel_budget


cdef inline Py_ssize_t _group_channels(const Geometry* g, size_t item_bytes, int arrays,
                                       bint stream, bint several=False) noexcept nogil:
    """Channels per group of a pass taken group by group (0: not so).

    A training forward reads x twice (statistics, then normalization), a
    backward x and dy twice (sums, then dx). Taken a group of channels at a
    time (every image's runs of those channels), the second read finds the
    group in cache instead of memory. Results are the same bits: each
    channel's block sums and their merge are those of the two whole passes.

    Backward (arrays == 2) takes groups of at most _group_budget bytes of x
    and dy (an eighth of the per-core cache) on batches larger than twice
    that: on a Xeon (2 MiB L2, 256 KiB groups), cold data, one process,
    8x256x28x28 1.11-1.30x, one and two threads. Budgets of 512 KiB-1 MiB
    lost on some shapes (0.84x). Within the budget a group takes the fewest
    channels that make each image's part of it GROUP_STRETCH bytes long
    (runs of 2 KiB and more: one channel): on the same Xeon (session 26),
    cold data, one process, one and two threads, against budget-sized groups:
    8x256x28x28 float32 1.15-1.17x, 8x512x7x7 float32 1.10-1.31x, 8x2048x7x7
    1.08-1.13x, 8x1024x7x7 float64 1.08-1.12x, 32x256x14x14 float32
    1.03-1.05x, and 0.99-1.02x on 32x512x7x7, 32x2048x7x7, 16x1024x7x7,
    16x128x28x28 and 32x128x14x14 float64. Parts of 1 KiB lost on 7x7 maps of
    32 images (0.93-0.94x), of 4 KiB on 8x256x28x28 (0.87x). A channel
    larger than the budget, up to ONE_CHANNEL_MAX, is a group by itself
    when dx streams (the batch is too large to stay cached) and each
    image's run of it is at least ONE_CHANNEL_STRETCH bytes: its second read
    then comes from the last-level cache. On the Zen
    4 EPYC, cold data, against whole passes (one thread / two): float64
    32x64x56x56 1.16x / 1.35x, 16x32x112x112 float64 1.24x / 1.30x and
    float32 1.10x / 1.26x, 8x64x112x112 float32 1.12x / 1.36x; shorter runs
    lost on one thread (float32 32x64x56x56, runs of 12 KiB: 0.92x; 6-8
    KiB: 0.83-0.96x), as did batches that stay cached (64x16x32x32: 0.73x).
    On more than one thread (``several``) the two passes are paced by memory
    rather than by the strided reads, and channels of up to
    SHARED_CHANNEL_MAX with runs of SHARED_CHANNEL_STRETCH bytes and more are
    groups alone too (two threads: float32 32x64x56x56 1.19x, 128x64x28x28
    float64 1.28x, float32 1.11x, 32x128x28x28 float32 1.16x, 64x32x28x28
    float64 1.14x; a 4 MiB channel, 256x16x32x32 float64, 0.96x). And
    whether dx streams or not, a channel of at most _channel_budget bytes of
    x and dy (half the L2 cache on Intel CPUs; 0 elsewhere) whose runs are at
    least CHANNEL_GROUP_STRETCH bytes is a group by itself: its second read
    then comes from L2. On the Xeon (2 MiB L2), session 28, against whole
    passes, one and two threads: cold, 64x32x28x28 1.09-1.21x, 16x64x56x56
    1.08-1.23x, 64x16x32x32 1.00-1.14x, 32x64x56x56 float32 1.07-1.11x,
    128x64x28x28 float32 1.02-1.05x; in cache, 1.08-1.45x (64x16x32x32 float32 0.75x ->
    0.94x PyTorch). Channels of 2 MiB lost (256x16x32x32 float32 0.86-0.88x),
    as did runs of 2 KiB (256x64x16x16 float64, 1 MiB: 0.78-0.81x); on the
    Zen 4 EPYC (1 MiB L2) a 512 KiB channel lost even in cache (64x16x32x32
    0.73x). Other shapes take whole passes. The thread count changes no bit.

    The training forward (arrays == 1) takes groups only for float64
    outputs that stream (batches too large for the last-level
    cache), of GROUP_BYTES: against the statistics pass first, on an AMD
    EPYC, 32x64x56x56 1.07-1.16x, 16x32x112x112 1.05-1.20x; where each
    image's part of a group is under GROUP_MIN_STRETCH bytes (64x16x32x32:
    32 KiB) the prefetcher restarted too often (0.68-0.89x), as it did on
    float32 (0.78-1.03x) and on 12 MiB batches already in cache (0.94x);
    with budgets of 256 KiB-1 MiB on the Xeon, 0.81-1.19x.
    """
    cdef size_t per_channel = <size_t>(g.outer * g.inner) * item_bytes * <size_t>arrays
    cdef size_t run
    cdef Py_ssize_t cg
    if g.inner == 1 or g.channels < 2 or _spread_sums(g, item_bytes, arrays == 2):
        return 0
    if _group_budget and arrays == 2 and per_channel * <size_t>g.channels > 2 * _group_budget:
        cg = <Py_ssize_t>(_group_budget // per_channel)
        run = <size_t>g.inner * item_bytes
        cg = _min(cg, <Py_ssize_t>((GROUP_STRETCH + run - 1) // run))
        if cg == 0 and per_channel <= _channel_budget and run >= CHANNEL_GROUP_STRETCH:
            cg = 1
        if cg == 0 and stream and (
                (per_channel <= ONE_CHANNEL_MAX and run >= ONE_CHANNEL_STRETCH)
                or (several and per_channel <= SHARED_CHANNEL_MAX
                    and run >= SHARED_CHANNEL_STRETCH)):
            cg = 1
    elif arrays == 1 and item_bytes == sizeof(double) and stream:
        cg = GROUP_BYTES // <Py_ssize_t>per_channel
        if cg * g.inner * <Py_ssize_t>item_bytes < GROUP_MIN_STRETCH:
            return 0
    else:
        return 0
    # The passes hold a group's sums on the stack, CHANNELS_PER_BLOCK of them:
    # (2, 32768, 7, 7) asked for groups of 2674 channels and wrote past them.
    if cg > CHANNELS_PER_BLOCK:
        cg = CHANNELS_PER_BLOCK
    if cg < 1 or cg >= g.channels:
        return 0
    return cg


def spread_sums(Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                Py_ssize_t item_bytes, bint backward=False):
    """Whether the training statistics (``backward``: the backward sums) take
    the runs of this geometry as rows (see _spread_sums); for the tests."""
    cdef Geometry g = _geometry(outer, channels, inner)
    return _spread_sums(&g, <size_t>item_bytes, backward)


def group_channels(Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
                   Py_ssize_t item_bytes, int arrays=1, bint stream=True, bint several=False):
    """Channels per group that a training forward (``arrays=1``) or a backward
    (``arrays=2``, on more than one thread if ``several``) takes on this
    geometry (0: whole passes); for the tests."""
    cdef Geometry g = _geometry(outer, channels, inner)
    return _group_channels(&g, <size_t>item_bytes, arrays, stream, several)


cdef int _train_group(const floating* x, floating* y, const Geometry* g, Py_ssize_t c0,
                      Py_ssize_t c1, double* part, double* mean, double* var,
                      double* invstd, floating* coef, const floating* gamma,
                      const floating* beta, double eps, bint relu, bint nt) noexcept nogil:
    """_forward in training for channels [c0, c1) alone: their statistics (as
    _batch_stats computes them), then their normalization, image by image.
    Writes only those channels' entries of part, mean, var, invstd and coef.
    Returns a status."""
    cdef Py_ssize_t C = g.channels, ob, n0, n1, n
    cdef double* part_m2 = part + _part_stride(g)
    cdef double* part_lo = part + 2 * _part_stride(g)
    cdef int bad = 0
    for ob in range(g.n_outer_blocks):
        n0 = ob * g.outer_per_block
        n1 = _min(n0 + g.outer_per_block, g.outer)
        _stats_runs(x, g, n0, n1, c0, c1, part + ob * _part_row(g), part_m2 + ob * _part_row(g),
                    part_lo + ob * _part_row(g))
    _merge_stats(g, c0, c1, part, part_m2, part_lo, mean, var, part_lo + _part_stride(g))
    if _invstd(c1 - c0, var + c0, eps, invstd + c0) or not _all_finite(c1 - c0, mean + c0):
        return STATUS_NONFINITE_STATS
    if _forward_coefficients(g, c0, c1, mean, invstd, gamma, beta, coef):
        return STATUS_NONFINITE_OUTPUT
    for n in range(g.outer):
        bad |= _normalize_runs(x, y, g, coef, n * C + c0, n * C + c1, relu, False, nt)
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef int _train_grouped(const floating* x, floating* y, const Geometry* g, Py_ssize_t cg,
                        double* mean, double* var, double* invstd, floating* coef,
                        const floating* gamma, const floating* beta, double eps, bint relu,
                        int n_threads, bint nt) noexcept nogil:
    """The training forward group by group of cg channels (see _group_channels),
    the groups shared among the threads. Returns a status: non-finite
    statistics in any group before a non-finite output in another."""
    cdef Py_ssize_t C = g.channels, n_groups = (C + cg - 1) // cg, k
    cdef int status = STATUS_OK, team = _team(n_threads, n_groups)
    cdef double* part = _part_alloc(3 * _part_stride(g) + C)
    cdef int* group_status = <int*>malloc(n_groups * sizeof(int))
    if part == NULL or group_status == NULL:
        status = STATUS_NO_MEMORY
    else:
        for k in prange(n_groups, schedule='static', num_threads=team,
                        use_threads_if=team > 1):
            group_status[k] = _train_group(x, y, g, k * cg, _min(k * cg + cg, C), part, mean,
                                           var, invstd, coef, gamma, beta, eps, relu, nt)
        for k in range(n_groups):  # non-finite statistics are the cause to report
            if group_status[k] == STATUS_NONFINITE_STATS or status == STATUS_OK:
                status = group_status[k]
    _part_free(part)
    free(group_status)
    return status


cdef inline bint _overlap(const void* a, size_t a_bytes, const void* b,
                          size_t b_bytes) noexcept nogil:
    """Whether the byte ranges [a, a + a_bytes) and [b, b + b_bytes) meet."""
    cdef uintptr_t pa = <uintptr_t>a, pb = <uintptr_t>b
    return pa < pb + b_bytes and pb < pa + a_bytes


cdef int _forward(const floating* x, floating* y, const Geometry* g, double* mean,
                  double* var, const floating* gamma, const floating* beta, double eps,
                  bint training, bint relu, int n_threads, bint stream) noexcept nogil:
    """The body of ``forward_train`` (training: the batch's mean and var are
    written) and of ``forward_eval`` (mean and var are read); returns a status."""
    cdef Py_ssize_t C = g.channels
    cdef int status = STATUS_OK
    cdef bint two
    # Groups only for outputs that stream (too large to stay cached; see
    # _group_channels). Not when y overlaps what a later group reads: in place
    # (y is x), a later group's non-finite statistics would find the earlier
    # groups' x already overwritten, and gamma or beta inside y (a caller's
    # out= buffer) would be read after earlier groups wrote over them. Those
    # take two passes, which read everything before writing.
    cdef size_t y_bytes = g.outer * C * g.inner * sizeof(floating)
    cdef size_t c_bytes = C * sizeof(floating)
    cdef Py_ssize_t cg = _group_channels(g, sizeof(floating), 1, stream) \
        if training and not _overlap(y, y_bytes, x, y_bytes) \
        and not _overlap(y, y_bytes, gamma, c_bytes) \
        and not _overlap(y, y_bytes, beta, c_bytes) else 0
    cdef double* invstd = <double*>malloc(C * sizeof(double))
    cdef floating* coef = <floating*>malloc(3 * C * sizeof(floating))
    if invstd == NULL or coef == NULL:
        status = STATUS_NO_MEMORY
    elif cg:  # statistics and normalization together
        status = _train_grouped(x, y, g, cg, mean, var, invstd, coef, gamma, beta, eps, relu,
                                n_threads, stream)
    elif training:
        status = _batch_stats(x, g, mean, var, n_threads)
        if status == STATUS_OK and (_invstd(C, var, eps, invstd) or not _all_finite(C, mean)):
            status = STATUS_NONFINITE_STATS
        if status == STATUS_OK and _forward_coefficients(g, 0, C, mean, invstd, gamma, beta,
                                                         coef):
            status = STATUS_NONFINITE_OUTPUT
    else:
        status = _given_coefficients(g, mean, var, eps, gamma, beta, invstd, coef)
    if status == STATUS_OK and not cg:
        two = _uncentre(g, mean, var if training else NULL, gamma, beta, coef, relu)
        # After the statistics pass, normalize goes backwards (see _chunk_items).
        status = _normalize(x, y, g, coef, relu, two, stream, n_threads, training)
    free(invstd)
    free(coef)
    return status


cdef int _backward_group(const floating* dy, const floating* x, floating* dx,
                         const Geometry* g, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t c2,
                         const double* mean, const double* invstd, floating* coef,
                         double* part, double* sum_g, double* sum_gd, bint training,
                         bint relu, bint use_x, bint nt) noexcept nogil:
    """_backward for channels [c0, c1) alone: their sums (as _backward_reduce
    computes them), their coefficients, then their dx, image by image, while
    the heads of the next group's runs, channels [c1, c2) (none if c2 == c1),
    are prefetched (see CBN_GROUP_PREFETCH_BYTES). Writes only those
    channels' entries of part, sum_g, sum_gd and coef. A status."""
    cdef Py_ssize_t C = g.channels, size = _part_stride(g), ob, n0, n1, n
    cdef Py_ssize_t ahead = _min((c2 - c1) * g.inner * <Py_ssize_t>sizeof(floating),
                                 CBN_GROUP_PREFETCH_BYTES)
    cdef int bad = 0
    for ob in range(g.n_outer_blocks):
        n0 = ob * g.outer_per_block
        n1 = _min(n0 + g.outer_per_block, g.outer)
        _reduce_runs(dy, x, g, n0, n1, c0, c1, mean, coef, relu, part + ob * _part_row(g),
                     part + size + ob * _part_row(g))
    _sum_blocks(g, c0, c1, part, sum_g, sum_gd)
    if _backward_coefficients(g, c0, c1, mean, invstd, sum_g, sum_gd, training, coef) & 1:
        return STATUS_NONFINITE_OUTPUT
    for n in range(g.outer):
        if ahead > 0:
            cbn_prefetch_l2(x + (n * C + c1) * g.inner, <size_t>ahead)
            cbn_prefetch_l2(dy + (n * C + c1) * g.inner, <size_t>ahead)
        bad |= _apply_runs(dy, x, dx, g, coef, n * C + c0, n * C + c1, relu, use_x, nt)
    if nt:
        cbn_store_fence()
    return STATUS_NONFINITE_OUTPUT if bad else STATUS_OK


cdef int _backward_grouped(const floating* dy, const floating* x, floating* dx,
                           const Geometry* g, Py_ssize_t cg, const double* mean,
                           const double* invstd, floating* coef, double* sum_g,
                           double* sum_gd, bint training, bint relu, bint use_x,
                           int n_threads, bint nt) noexcept nogil:
    """The backward group by group of cg channels (see _group_channels), the
    groups shared among the threads in contiguous ranges, so that each group
    knows the next one its thread takes. Returns a status."""
    cdef Py_ssize_t C = g.channels, n_groups = (C + cg - 1) // cg, k, t, per, last, c1
    cdef int status = STATUS_OK, team = _team(n_threads, n_groups)
    cdef double* part = _part_alloc(2 * _part_stride(g))
    cdef int* group_status = <int*>malloc(n_groups * sizeof(int))
    if part == NULL or group_status == NULL:
        status = STATUS_NO_MEMORY
    else:
        per = (n_groups + team - 1) // team
        for t in prange(team, schedule='static', num_threads=team,
                        use_threads_if=team > 1):
            last = _min(t * per + per, n_groups)
            for k in range(t * per, last):
                c1 = _min(k * cg + cg, C)
                group_status[k] = _backward_group(
                    dy, x, dx, g, k * cg, c1, _min(c1 + cg, C) if k + 1 < last else c1,
                    mean, invstd, coef, part, sum_g, sum_gd, training, relu, use_x, nt)
        for k in range(n_groups):
            if status == STATUS_OK:
                status = group_status[k]
    _part_free(part)
    free(group_status)
    return status


cdef int _backward(const floating* dy, const floating* x, const Geometry* g,
                   const double* mean, const double* var, const floating* gamma,
                   const floating* beta, double eps, floating* dx, floating* dgamma_out,
                   floating* dbeta_out, bint training, bint need_param_grads, bint relu,
                   int n_threads, bint stream) noexcept nogil:
    """The body of ``backward``; returns its status code."""
    cdef Py_ssize_t C = g.channels, c, cg = 0
    cdef bint reduce = training or need_param_grads, fused = False
    cdef int status = STATUS_OK, flags
    cdef double* scratch = <double*>malloc(3 * C * sizeof(double))
    cdef floating* coef = <floating*>malloc(7 * C * sizeof(floating))
    cdef double* invstd = scratch
    cdef double* sum_g = scratch + C
    cdef double* sum_gd = scratch + 2 * C
    # Groups (see _group_channels) only where the sums pass reads; not when dx
    # overlaps what a later group reads: a later group's non-finite sums would
    # find the earlier groups' dy or x already overwritten (two passes read
    # everything before writing).
    cdef size_t dx_bytes = g.outer * C * g.inner * sizeof(floating)
    cdef size_t c_bytes = C * sizeof(floating)
    if reduce and not (_overlap(dx, dx_bytes, dy, dx_bytes) or _overlap(dx, dx_bytes, x, dx_bytes)
                       or _overlap(dx, dx_bytes, gamma, c_bytes)
                       or _overlap(dx, dx_bytes, beta, c_bytes)
                       or _overlap(dx, dx_bytes, mean, C * sizeof(double))
                       or _overlap(dx, dx_bytes, var, C * sizeof(double))):
        cg = _group_channels(g, sizeof(floating), 2, stream, n_threads > 1)
    if scratch == NULL or coef == NULL:
        status = STATUS_NO_MEMORY
    else:
        status = _given_coefficients(g, mean, var, eps, gamma, beta, invstd, coef)
    if status == STATUS_OK and cg:  # sums and dx together
        status = _backward_grouped(dy, x, dx, g, cg, mean, invstd, coef, sum_g, sum_gd,
                                   training, relu, training or relu, n_threads, stream)
    elif status == STATUS_OK and reduce:
        status = _backward_reduce(dy, x, g, mean, coef, relu, sum_g, sum_gd, n_threads)
    elif status == STATUS_OK:
        for c in range(C):
            sum_g[c] = 0.0
            sum_gd[c] = 0.0
    if status == STATUS_OK and not cg:
        flags = _backward_coefficients(g, 0, C, mean, invstd, sum_g, sum_gd, training, coef)
        if flags & 1:
            status = STATUS_NONFINITE_OUTPUT
        # Rows read the slopes unless unusable; runs take scalars: nothing to save.
        fused = (g.inner == 1 or _spreads(g, sizeof(floating), SPREAD_MAP_BYTES)) \
            and not (flags & 2)
    if status == STATUS_OK and not cg:
        # With fixed statistics and no ReLU, dx = a*dy does not read x.
        status = _backward_apply(dy, x, dx, g, coef, relu, training or relu, fused, stream,
                                 n_threads)
    if status == STATUS_OK and reduce:
        # Checked before anything is written: a failed call leaves them as they were.
        for c in range(C):
            if not (isfinite(<floating>(sum_gd[c] * invstd[c])) and isfinite(<floating>sum_g[c])):
                status = STATUS_NONFINITE_PARAM_GRAD
    if status == STATUS_OK and reduce:
        for c in range(C):
            dgamma_out[c] = <floating>(sum_gd[c] * invstd[c])
            dbeta_out[c] = <floating>sum_g[c]
    free(scratch)
    free(coef)
    return status


def forward_train(const floating[:, :, ::1] x,     # IN  (outer, C, inner)
                  floating[:, :, ::1] y_out,       # OUT (outer, C, inner), may be x
                  const floating[::1] gamma,       # IN  (C,)
                  const floating[::1] beta,        # IN  (C,)
                  double eps,
                  double[::1] mean_out,            # OUT (C,) batch mean
                  double[::1] var_out,             # OUT (C,) batch biased variance
                  bint relu=False, int n_threads=1, bint stream=False):
    """Batch statistics, then normalize with them: the training forward pass.

    ``stream`` writes y with non-temporal stores (see ``normalize``).
    Returns 0; 1 if the batch statistics are non-finite (y is not written; by
    channel groups, see _group_channels, the groups with finite ones are);
    2 if the coefficients or the output are non-finite; 3 if out of memory.
    """
    cdef Geometry g = _operands("forward_train", x.shape, y_out.shape)
    _per_channel("forward_train", g.channels,
                 (gamma.shape[0], beta.shape[0], mean_out.shape[0], var_out.shape[0]))
    cdef int status
    with nogil:
        status = _forward(&x[0, 0, 0], &y_out[0, 0, 0], &g, &mean_out[0], &var_out[0],
                          &gamma[0], &beta[0], eps, True, relu, n_threads, stream)
    return status


def forward_eval(const floating[:, :, ::1] x,      # IN  (outer, C, inner)
                 floating[:, :, ::1] y_out,        # OUT (outer, C, inner), may be x
                 const double[::1] mean,           # IN  (C,) statistics to use
                 const double[::1] var,            # IN  (C,)
                 const floating[::1] gamma,        # IN  (C,)
                 const floating[::1] beta,         # IN  (C,)
                 double eps, bint relu=False, int n_threads=1, bint stream=False):
    """Normalize with given statistics: the evaluation forward pass.

    ``stream`` writes y with non-temporal stores (see ``normalize``).
    Returns 0; 2 if the coefficients or the output are non-finite; 3 if out of memory;
    4 if some ``var`` is negative (y is not written).
    """
    cdef Geometry g = _operands("forward_eval", x.shape, y_out.shape)
    _per_channel("forward_eval", g.channels,
                 (mean.shape[0], var.shape[0], gamma.shape[0], beta.shape[0]))
    cdef int status
    with nogil:
        status = _forward(&x[0, 0, 0], &y_out[0, 0, 0], &g, <double*>&mean[0],
                          <double*>&var[0], &gamma[0], &beta[0], eps, False, relu, n_threads,
                          stream)
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
             int n_threads=1, bint stream=False):
    """Gradients of the loss with respect to x, gamma and beta.

    ``training`` selects the gradient through the batch statistics; otherwise
    ``mean`` and ``var`` are constants (evaluation, frozen statistics). Without
    ``need_param_grads`` in evaluation, the reduction pass is skipped and
    dgamma/dbeta are not written. dgamma and dbeta are written only on success.
    ``stream`` writes dx with non-temporal stores (see ``normalize``).
    Returns 0; 2 if the sums or dx are non-finite; 3 if out of memory; 4 if some
    ``var`` is negative (nothing is written).
    """
    cdef Geometry g = _operands("backward", x.shape, dy.shape, dx_out.shape)
    _per_channel("backward", g.channels,
                 (mean.shape[0], var.shape[0], gamma.shape[0], beta.shape[0],
                  dgamma_out.shape[0], dbeta_out.shape[0]))
    cdef int status
    with nogil:
        status = _backward(&dy[0, 0, 0], &x[0, 0, 0], &g, &mean[0], &var[0], &gamma[0],
                           &beta[0], eps, &dx_out[0, 0, 0], &dgamma_out[0], &dbeta_out[0],
                           training, need_param_grads, relu, n_threads, stream)
    return status


# ---------------------------------------------------------------------------
# Direct calls: argument handling in C for the common case.
#
# cbn.functional's checks and the typed-memoryview arguments above cost about
# 6 us per call, longer than the whole kernel on a small batch. The *_call
# functions below take the Python arguments as they come, accept them only in
# the shape the kernels need (exact ndarrays, C-contiguous and aligned, the
# parameters already (C,) vectors of the right dtype, plain int/float/None
# options) and otherwise return None: the caller then runs its full
# validation, which converts what it can and raises an exception that names
# the problem. So they never raise for bad input and never report a problem
# themselves; after a kernel failure they return its status code.
# ---------------------------------------------------------------------------

cdef enum:
    _PLAIN = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    _PLAIN_OUT = _PLAIN | cnp.NPY_ARRAY_WRITEABLE
    _MAX_AXIS = 64              # more than any ndarray has dimensions (NPY_MAXDIMS)


cdef inline bint _plain(cnp.ndarray arr, int flags) noexcept:
    """Whether ``arr`` has all of ``flags`` and its values in this machine's byte
    order (the type number alone does not say: ``>f4`` is NPY_FLOAT too)."""
    return (cnp.PyArray_FLAGS(arr) & flags) == flags and cnp.PyArray_ISNOTSWAPPED(arr)


cdef struct Batch:
    int typenum                 # NPY_FLOAT or NPY_DOUBLE
    Geometry g
    Py_ssize_t nbytes
    char* data


cdef bint _batch(object a, object axis, Batch* b):
    """Whether ``a`` is a batch the kernels take as it is; fills ``b`` if so."""
    cdef cnp.ndarray arr
    cdef int nd, ax, i
    cdef cnp.npy_intp* dims
    cdef Py_ssize_t outer = 1, inner = 1
    if not cnp.PyArray_CheckExact(a) or type(axis) is not int:
        return False
    if not -_MAX_AXIS <= axis < _MAX_AXIS:
        return False
    arr = <cnp.ndarray>a
    b.typenum = cnp.PyArray_TYPE(arr)
    nd = cnp.PyArray_NDIM(arr)
    ax = axis
    if ax < 0:
        ax += nd
    if (b.typenum != cnp.NPY_FLOAT and b.typenum != cnp.NPY_DOUBLE) or nd < 2 \
            or not 0 <= ax < nd or cnp.PyArray_SIZE(arr) == 0 \
            or not _plain(arr, cnp.NPY_ARRAY_ALIGNED):
        return False
    dims = cnp.PyArray_DIMS(arr)
    if _plain(arr, _PLAIN):
        for i in range(ax):
            outer *= dims[i]
        for i in range(ax + 1, nd):
            inner *= dims[i]
        b.g = _geometry(outer, dims[ax], inner)
    elif not _block_geometry(arr, nd, ax, &b.g):
        return False
    b.nbytes = cnp.PyArray_NBYTES(arr)
    b.data = <char*>cnp.PyArray_DATA(arr)
    return True


cdef bint _block_geometry(cnp.ndarray arr, int nd, int ax, Geometry* g) noexcept:
    """Whether the values of ``arr`` (not C-contiguous) fill one block in some
    order of its axes; if so, sets ``g`` to the (outer, C, inner) of that order.

    The order is cbn.functional.memory_order's: the axes by decreasing stride,
    ties (axes of length one) in index order, so that this path and the
    checked one split the batch alike and give the same bits.
    """
    cdef int order[_MAX_AXIS]
    cdef int i, j, k
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    cdef cnp.npy_intp* st = cnp.PyArray_STRIDES(arr)
    cdef cnp.npy_intp expected = cnp.PyArray_ITEMSIZE(arr)
    cdef Py_ssize_t outer = 1, inner = 1
    for i in range(nd):  # a stable insertion sort: nd is at most 64
        j = i
        while j > 0 and st[order[j - 1]] < st[i]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
    for k in range(nd - 1, -1, -1):  # fastest first; axes of length one take no room
        i = order[k]
        if dims[i] != 1:
            if st[i] != expected:
                return False
            expected *= dims[i]
    k = 0
    while order[k] != ax:
        outer *= dims[order[k]]
        k += 1
    for k in range(k + 1, nd):
        inner *= dims[order[k]]
    g[0] = _geometry(outer, dims[ax], inner)
    return True


cdef bint _same_layout(cnp.ndarray a, cnp.ndarray x) noexcept:
    """Whether ``a`` has the shape of ``x`` and lies in memory as it does (equal
    strides on every axis longer than one; both of one dtype)."""
    cdef int i
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    if not cnp.PyArray_SAMESHAPE(a, x):
        return False
    for i in range(cnp.PyArray_NDIM(x)):
        if dims[i] != 1 and cnp.PyArray_STRIDES(a)[i] != cnp.PyArray_STRIDES(x)[i]:
            return False
    return True


cdef inline cnp.npy_intp* _strides_of(cnp.ndarray arr) noexcept:
    """The strides a result laid out as ``arr`` takes; NULL (C order) if ``arr`` is
    C-contiguous."""
    return NULL if _plain(arr, _PLAIN) else cnp.PyArray_STRIDES(arr)


cdef bint _like(object a, object x, const Batch* xb, object axis, Batch* b):
    """Whether ``a`` is a batch (see ``_batch``) of the shape, dtype and layout of ``x``."""
    if not _batch(a, axis, b) or b.typenum != xb.typenum:
        return False
    return _same_layout(<cnp.ndarray>a, <cnp.ndarray>x)


cdef void* _vector(object v, int typenum, Py_ssize_t C):
    """The data of ``v`` if it is a plain (C,) array of ``typenum``, else NULL."""
    cdef cnp.ndarray arr
    if not cnp.PyArray_CheckExact(v):
        return NULL
    arr = <cnp.ndarray>v
    if cnp.PyArray_TYPE(arr) != typenum or cnp.PyArray_NDIM(arr) != 1 \
            or cnp.PyArray_DIMS(arr)[0] != C or not _plain(arr, _PLAIN):
        return NULL
    return cnp.PyArray_DATA(arr)


cdef object _as_double(object v, Py_ssize_t C):
    """``v`` widened to a new float64 array if it is a plain (C,) float32 array,
    else ``v`` itself (for _params to take or decline). Widening is exact."""
    cdef const float* src = <const float*>_vector(v, cnp.NPY_FLOAT, C)
    if src == NULL:
        return v
    cdef cnp.npy_intp n = C
    cdef cnp.ndarray wide = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)
    cdef double* dst = <double*>cnp.PyArray_DATA(wide)
    cdef Py_ssize_t i
    for i in range(C):
        dst[i] = src[i]
    return wide


cdef object _filled(object v, int typenum, Py_ssize_t C, double value):
    """A new (C,) array of ``typenum`` holding ``value`` if ``v`` is None, else ``v``."""
    if v is not None:
        return v
    cdef cnp.npy_intp n = C
    cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, &n, typenum, 0)
    cdef Py_ssize_t i
    if typenum == cnp.NPY_FLOAT:
        for i in range(C):
            (<float*>cnp.PyArray_DATA(arr))[i] = <float>value
    else:
        for i in range(C):
            (<double*>cnp.PyArray_DATA(arr))[i] = value
    return arr


cdef inline bint _apart(const char* a, const char* b, Py_ssize_t nbytes) noexcept:
    """Whether two buffers of ``nbytes`` are the same memory or do not overlap.

    Kernels may write over their own input, but not over an input shifted
    against the output: that would read half-written data.
    """
    return a == b or a + nbytes <= b or b + nbytes <= a


cdef inline size_t _page_gap(size_t a, size_t b) noexcept:
    """Distance between two offsets into a page, going round the page."""
    cdef size_t d = (a - b) % PAGE_BYTES
    return d if d <= PAGE_BYTES // 2 else PAGE_BYTES - d


# Reuse of large outputs
# ======================
# glibc's malloc serves a block of 32 MiB or more (its highest dynamic mmap
# threshold) from pages mapped for it and unmapped at free, so each output that
# large page-faults on its first write: a (32, 64, 112, 112) float32 evaluation
# through the layer took 16.6 ms against 5.5 ms into warm memory (Zen 4,
# session 24), and PyTorch's module pays the same. Smaller blocks come back from
# glibc's heap warm. So the memory behind outputs of CACHE_MIN_BYTES or more is
# a _Block, which on release goes to a small cache that the next output of about
# its size takes (a training loop frees y and dx of the step before as it makes
# this step's). The cache holds at most CACHE_SLOTS blocks and _cache_limit bytes
# (cbn.set_cache_limit; cbn.empty_cache frees it all). Only the GIL guards it:
# blocks are taken in _fresh and given back by deallocation, both under the GIL.

cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, uintptr_t ptr, size_t size)
    int PyTraceMalloc_Untrack(unsigned int domain, uintptr_t ptr)

cdef enum:
    CACHE_MIN_BYTES = 33554432  # glibc's largest mmap threshold (64-bit)
    CACHE_SLOTS = 8
    TRACE_DOMAIN = 389047       # NumPy's tracemalloc domain, so its tools count these

cdef char* _cache_ptr[CACHE_SLOTS]   # oldest first
cdef size_t _cache_size[CACHE_SLOTS]
cdef int _cache_count = 0
cdef size_t _cache_bytes = 0
cdef size_t _cache_limit = 0          # set by cbn at import (set_cache_limit)


cdef void _release(char* ptr) noexcept:
    """Return a block's memory to the system."""
    PyTraceMalloc_Untrack(TRACE_DOMAIN, <uintptr_t>ptr)
    free(ptr)


cdef char* _cache_pop(int i, size_t* size) noexcept:
    """Remove cached block ``i`` (its size in ``size``), closing the gap so
    that the rest keep their age order; return its memory."""
    global _cache_count, _cache_bytes
    cdef int j
    cdef char* ptr = _cache_ptr[i]
    size[0] = _cache_size[i]
    _cache_bytes -= size[0]
    _cache_count -= 1
    for j in range(i, _cache_count):
        _cache_ptr[j] = _cache_ptr[j + 1]
        _cache_size[j] = _cache_size[j + 1]
    return ptr


cdef void _cache_drop(int i) noexcept:
    """Free cached block ``i``."""
    cdef size_t size
    _release(_cache_pop(i, &size))


cdef void _cache_put(char* ptr, size_t size) noexcept:
    """Keep a released block (evicting the oldest to make room), or free it
    if it alone exceeds the limit."""
    global _cache_count, _cache_bytes
    if size > _cache_limit:
        _release(ptr)
        return
    while _cache_count == CACHE_SLOTS or _cache_bytes + size > _cache_limit:
        _cache_drop(0)
    _cache_ptr[_cache_count] = ptr
    _cache_size[_cache_count] = size
    _cache_count += 1
    _cache_bytes += size


cdef char* _cache_take(size_t need, size_t* got) noexcept:
    """The smallest cached block of ``need`` to 5/4 ``need`` bytes, removed
    from the cache (its size in ``got``), or NULL."""
    cdef int i, best = -1
    for i in range(_cache_count):
        if need <= _cache_size[i] <= need + need // 4 and (
                best < 0 or _cache_size[i] < _cache_size[best]):
            best = i
    return NULL if best < 0 else _cache_pop(best, got)


cdef class _Block:
    """The memory behind one large output array (its ``base``); it goes to the
    cache when the last array using it is freed."""
    cdef char* ptr
    cdef size_t size

    def __dealloc__(self):
        if self.ptr != NULL:
            _cache_put(self.ptr, self.size)
            self.ptr = NULL


cdef _Block _new_block(size_t size):
    """A block of at least ``size`` bytes, from the cache if it has one that
    fits, else from malloc (MemoryError if there is no memory for it)."""
    cdef _Block block = _Block.__new__(_Block)
    cdef size_t got = 0
    block.ptr = _cache_take(size, &got)
    if block.ptr == NULL:
        block.ptr = <char*>malloc(size)
        if block.ptr == NULL:
            raise MemoryError(f"Unable to allocate {size / 2.0 ** 30:.3g} GiB for an output of cbn")
        PyTraceMalloc_Track(TRACE_DOMAIN, <uintptr_t>block.ptr, size)
        got = size
    block.size = got
    return block


def set_cache_limit(nbytes):
    """Keep at most ``nbytes`` of released large outputs for reuse (0: none);
    frees the oldest cached blocks beyond it. Returns the previous limit."""
    global _cache_limit
    cdef size_t previous = _cache_limit
    _cache_limit = nbytes
    while _cache_count and _cache_bytes > _cache_limit:
        _cache_drop(0)
    return previous


def empty_cache():
    """Free every cached block; return the bytes freed."""
    cdef size_t freed = _cache_bytes
    while _cache_count:
        _cache_drop(0)
    return freed


def cache_info():
    """``{"blocks", "bytes", "limit", "min_bytes", "slots"}`` of the cache."""
    return {"blocks": _cache_count, "bytes": _cache_bytes, "limit": _cache_limit,
            "min_bytes": CACHE_MIN_BYTES, "slots": CACHE_SLOTS}


cdef object _fresh(int nd, cnp.npy_intp* dims, int typenum, const Geometry* g,
                   const char* near, Py_ssize_t nbytes, const char* other,
                   cnp.npy_intp* strides=NULL):
    """A new array for the result of a pass over the batch at ``near``: C-contiguous,
    or with ``strides`` (the batch's, which fill one block of ``nbytes`` in some
    order of the axes: the result is laid out as the batch).

    From NEAR_MIN_BYTES on, its data starts 512 or 1024 bytes further into a
    4 KiB page than ``near``'s (and not within 256 bytes of ``other``'s, if
    given). Equal-sized arrays from malloc share their page offset, so x and
    y (or x, dy and dx) would; the passes then read and write all of them at
    the same L1 set index, and on rows that are a multiple of 4 KiB the four
    rows in flight (CBN_EACHK) all land in one set. Measured in cache (as a
    network leaves x), output at 1024 bytes against 0, one thread: rows of
    4-16 KiB evaluation 1.2-2.1x, training forward 1.1-1.55x, backward
    1.3-1.9x (two threads 1.1-1.6x); rows of 1 KiB lost 0.92-0.98x at 1024
    and gained 1.03-1.18x at 512, hence 512 for rows that are not a multiple
    of 2 KiB (and for runs, where it does not matter). Costs one page of
    memory per output.
    """
    if nbytes < NEAR_MIN_BYTES:
        if strides == NULL:
            return cnp.PyArray_EMPTY(nd, dims, typenum, 0)
        return cnp.PyArray_New(cnp.ndarray, nd, dims, typenum, strides, NULL, 0, 0, None)
    cdef Py_ssize_t row = g.channels * (4 if typenum == cnp.NPY_FLOAT else 8)
    cdef size_t shift = 512 if g.inner != 1 or row % 2048 else 1024
    cdef size_t want = (<size_t>near + shift) % PAGE_BYTES
    if other != NULL and _page_gap(<size_t>other % PAGE_BYTES, want) < 256:
        want = (want + shift) % PAGE_BYTES
    cdef cnp.npy_intp total = nbytes + PAGE_BYTES
    cdef object owner
    cdef char* base
    if total >= CACHE_MIN_BYTES:  # see "Reuse of large outputs"
        owner = _new_block(total)
        base = (<_Block>owner).ptr
    else:
        owner = cnp.PyArray_EMPTY(1, &total, cnp.NPY_UINT8, 0)
        base = <char*>cnp.PyArray_DATA(<cnp.ndarray>owner)
    cdef size_t start = (want + PAGE_BYTES - <size_t>base % PAGE_BYTES) % PAGE_BYTES
    cdef cnp.ndarray arr = cnp.PyArray_New(cnp.ndarray, nd, dims, typenum, strides, base + start,
                                           0, cnp.NPY_ARRAY_WRITEABLE, None)
    cnp.set_array_base(arr, owner)
    return arr


cdef enum:
    SAMPLE_POINTS = 8           # values sample_bits reads, spread over the array


def sample_bits(*arrays):
    """The bytes of SAMPLE_POINTS values spread over each array in C order
    (the first and the last among them), one array after another: a
    fingerprint that costs eight reads per array.

    A layer keeps one of its input and parameters with the forward it caches
    for backward, and compares it there: an input rewritten in place in
    between (a loader refilling its buffer with the next batch, ``x *= 2``),
    or gamma and beta stepped by an optimizer, would otherwise be
    differentiated silently as if they were the forward's. PyTorch raises
    likewise, from a version counter that NumPy arrays do not have; a change
    that spares all eight values of an array goes unnoticed.
    """
    cdef Py_ssize_t total = 0, at = 0
    cdef cnp.ndarray a
    for a in arrays:  # TypeError for anything but an ndarray
        if a.size:
            total += SAMPLE_POINTS * a.itemsize
    cdef bytearray out = bytearray(total)
    cdef char* dst = out
    for a in arrays:
        at += _sample_into(a, dst + at)
    return bytes(out)


cdef Py_ssize_t _sample_into(cnp.ndarray a, char* dst):
    """Copy sample_bits' values of ``a`` to ``dst``; return the bytes written."""
    cdef Py_ssize_t n = a.size, item = a.itemsize, nd = a.ndim, k, d, p, q, off
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(a)
    cdef const char* base = <const char*>cnp.PyArray_DATA(a)
    if n == 0:
        return 0
    for k in range(SAMPLE_POINTS):
        p = k * (n - 1) // (SAMPLE_POINTS - 1)
        off = 0
        for d in range(nd - 1, -1, -1):  # the C-order index p as a byte offset
            q = p % dims[d]
            p //= dims[d]
            off += q * strides[d]
        memcpy(dst + k * item, base + off, item)
    return SAMPLE_POINTS * item


def empty_near(like, x3, other=None):
    """A new C-contiguous array shaped and typed like the float32/float64 array
    ``like``, for the result of a pass over the batch whose (outer, C, inner)
    view is ``x3``, its data placed in the page apart from x3's and ``other``'s
    (see _fresh)."""
    cdef cnp.ndarray src = <cnp.ndarray?>like
    cdef cnp.ndarray x = <cnp.ndarray?>x3
    if cnp.PyArray_NDIM(x) != 3:
        raise ValueError(f"x3 must be the (outer, C, inner) view of a batch, got {x3.ndim} dimensions")
    cdef Geometry g
    g.channels = cnp.PyArray_DIMS(x)[1]
    g.inner = cnp.PyArray_DIMS(x)[2]
    cdef const char* far = NULL
    if other is not None:
        far = <const char*>cnp.PyArray_DATA(<cnp.ndarray?>other)
    return _fresh(cnp.PyArray_NDIM(src), cnp.PyArray_DIMS(src), cnp.PyArray_TYPE(src), &g,
                  <const char*>cnp.PyArray_DATA(x), cnp.PyArray_NBYTES(src), far)


cdef object _output(object out, object like, const Batch* x, char** data,
                    const char* other=NULL):
    """``out`` if it can take the result shaped like ``like``, a new array if
    ``out`` is None (see _fresh; ``other``: a second input to keep apart from),
    else None."""
    cdef cnp.ndarray arr, src = <cnp.ndarray>like
    if out is None:
        arr = _fresh(cnp.PyArray_NDIM(src), cnp.PyArray_DIMS(src), x.typenum, &x.g, x.data,
                     x.nbytes, other, _strides_of(src))
    elif not cnp.PyArray_CheckExact(out):
        return None
    else:
        arr = <cnp.ndarray>out
        if cnp.PyArray_TYPE(arr) != x.typenum or not _same_layout(arr, src) \
                or not _plain(arr, cnp.NPY_ARRAY_ALIGNED | cnp.NPY_ARRAY_WRITEABLE):
            return None
    data[0] = <char*>cnp.PyArray_DATA(arr)
    return arr


cdef object _param_grad(object out, int typenum, cnp.npy_intp C):
    """``out`` if it is a writable plain (C,) array of ``typenum``, a new one
    if it is None, else None."""
    if out is None:
        return cnp.PyArray_EMPTY(1, &C, typenum, 0)
    if _vector(out, typenum, C) == NULL \
            or not cnp.PyArray_FLAGS(<cnp.ndarray>out) & cnp.NPY_ARRAY_WRITEABLE:
        return None
    return out


cdef int _threads(object n_threads, Py_ssize_t size, Py_ssize_t parallel_min):
    """``cbn.functional.resolve_threads`` for plain arguments; 0 to decline."""
    if n_threads is None:
        return 1 if size < parallel_min else _max_threads()
    if type(n_threads) is not int:
        return 0
    if n_threads == 1:
        return 1
    if n_threads == -1:
        return _max_threads()
    if 1 < n_threads <= THREADS_MAX:
        return n_threads
    return 0


cdef int _options(object eps, object activation, double* eps_out) except -2:
    """``relu`` (0 or 1) for plain ``eps`` and ``activation``, else -1 to decline.

    eps may be a float subclass (numpy.float64, as a config or an np.finfo
    computation gives it): its value is read directly, not through __float__.
    """
    cdef double e
    if not isinstance(eps, float):
        return -1
    e = eps
    if not (isfinite(e) and e > 0):
        return -1
    eps_out[0] = e
    if activation is None:
        return 0
    if type(activation) is str and activation == "relu":
        return 1
    return -1


cdef struct Params:
    const double* mean          # NULL unless asked for (see _params)
    const double* var
    const void* gamma           # of the batch's dtype
    const void* beta
    int threads


cdef object _params(const Batch* xb, object mean, object var, object gamma, object beta,
                    object n_threads, Py_ssize_t parallel_min, bint stats, Params* p):
    """Fill ``p`` from the per-channel arguments (the statistics only if
    ``stats``) and ``n_threads`` if the kernels can take them; else None.

    Returns the arrays ``p`` points into, to be kept until the kernel has run.
    Two common forms are converted here, as the checked path would: absent
    gamma and beta become ones and zeros (``affine=False``), and float32
    statistics (kept in a float32 model's dtype, as PyTorch keeps them) are
    widened to float64. Through the checked path either cost 6-10 µs per
    call, two to eight times the whole call on a (64, 100) batch.
    """
    cdef Py_ssize_t C = xb.g.channels
    p.mean = NULL
    p.var = NULL
    if stats:
        mean = _as_double(mean, C)
        var = _as_double(var, C)
        p.mean = <const double*>_vector(mean, cnp.NPY_DOUBLE, C)
        p.var = <const double*>_vector(var, cnp.NPY_DOUBLE, C)
        if p.mean == NULL or p.var == NULL:
            return None
    gamma = _filled(gamma, xb.typenum, C, 1.0)
    beta = _filled(beta, xb.typenum, C, 0.0)
    p.gamma = _vector(gamma, xb.typenum, C)
    p.beta = _vector(beta, xb.typenum, C)
    p.threads = _threads(n_threads, xb.g.outer * C * xb.g.inner, parallel_min)
    if p.gamma == NULL or p.beta == NULL or p.threads == 0:
        return None
    return (mean, var, gamma, beta)


cdef inline bint _streams(const Batch* b, Py_ssize_t stream_min, Py_ssize_t rows_stream_min):
    """Whether a direct call writes its output with streaming stores: from
    ``stream_min`` bytes, or from ``rows_stream_min`` (-1: the same) over rows
    (inner == 1; see cbn.functional.ROWS_STREAM_MIN_BYTES)."""
    if b.g.inner == 1 and rows_stream_min >= 0:
        return b.nbytes >= rows_stream_min
    return b.nbytes >= stream_min


def eval_call(x, mean, var, gamma, beta, axis, eps, activation, out, n_threads,
              Py_ssize_t parallel_min, Py_ssize_t stream_min, Py_ssize_t rows_stream_min=-1):
    """``cbn.functional.batch_norm_eval`` for arguments the kernel takes as they are.

    Returns y; the kernel's status code if it failed; None if some argument
    needs the caller's validation (nothing was computed).
    """
    cdef Batch xb
    cdef Params p
    cdef double e
    cdef int relu = _options(eps, activation, &e), status
    cdef char* y_data
    if relu < 0 or not _batch(x, axis, &xb):
        return None
    keep = _params(&xb, mean, var, gamma, beta, n_threads, parallel_min, True, &p)
    if keep is None:
        return None
    y = _output(out, x, &xb, &y_data)
    if y is None or not _apart(y_data, xb.data, xb.nbytes):
        return None
    cdef bint stream = _streams(&xb, stream_min, rows_stream_min)
    with nogil:
        if xb.typenum == cnp.NPY_FLOAT:
            status = _forward(<const float*>xb.data, <float*>y_data, &xb.g, <double*>p.mean,
                              <double*>p.var, <const float*>p.gamma, <const float*>p.beta, e,
                              False, relu, p.threads, stream)
        else:
            status = _forward(<const double*>xb.data, <double*>y_data, &xb.g, <double*>p.mean,
                              <double*>p.var, <const double*>p.gamma, <const double*>p.beta, e,
                              False, relu, p.threads, stream)
    return y if status == STATUS_OK else status


def train_call(x, gamma, beta, axis, eps, activation, out, n_threads,
               Py_ssize_t parallel_min, Py_ssize_t stream_min, Py_ssize_t rows_stream_min=-1):
    """``cbn.functional.batch_norm_train`` for arguments the kernel takes as they are.

    Returns ``(y, mean, var)``; the kernel's status code if it failed; None if
    some argument needs the caller's validation (nothing was computed). A
    batch with one value per channel is left to the caller.
    """
    cdef Batch xb
    cdef Params p
    cdef double e
    cdef int relu = _options(eps, activation, &e), status
    cdef char* y_data
    cdef cnp.npy_intp C
    if relu < 0 or not _batch(x, axis, &xb) or xb.g.outer * xb.g.inner < 2:
        return None
    keep = _params(&xb, None, None, gamma, beta, n_threads, parallel_min, False, &p)
    if keep is None:
        return None
    y = _output(out, x, &xb, &y_data)
    if y is None or not _apart(y_data, xb.data, xb.nbytes):
        return None
    C = xb.g.channels
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1, &C, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray var = cnp.PyArray_EMPTY(1, &C, cnp.NPY_DOUBLE, 0)
    cdef double* m = <double*>cnp.PyArray_DATA(mean)
    cdef double* v = <double*>cnp.PyArray_DATA(var)
    cdef bint stream = _streams(&xb, stream_min, rows_stream_min)
    with nogil:
        if xb.typenum == cnp.NPY_FLOAT:
            status = _forward(<const float*>xb.data, <float*>y_data, &xb.g, m, v,
                              <const float*>p.gamma, <const float*>p.beta, e, True, relu,
                              p.threads, stream)
        else:
            status = _forward(<const double*>xb.data, <double*>y_data, &xb.g, m, v,
                              <const double*>p.gamma, <const double*>p.beta, e, True, relu,
                              p.threads, stream)
    return (y, mean, var) if status == STATUS_OK else status


def backward_call(dy, x, mean, var, gamma, beta, axis, eps, training, activation, out,
                  n_threads, Py_ssize_t parallel_min, Py_ssize_t stream_min,
                  dgamma_out=None, dbeta_out=None, bint need_param_grads=True,
                  Py_ssize_t rows_stream_min=-1):
    """``cbn.functional.batch_norm_backward`` for arguments the kernel takes as they are.

    ``dgamma_out``, ``dbeta_out``: (C,) arrays of x's dtype to write the
    parameter gradients into (only on success), or None for new ones;
    ``need_param_grads`` as in ``backward``; ``rows_stream_min`` as in
    ``_streams`` (cbn.functional.ROWS_DX_STREAM_MIN_BYTES). Returns ``(dx, dgamma, dbeta)``;
    the kernel's status code if it failed; None if some argument needs the
    caller's validation (nothing was computed).
    """
    cdef Batch xb, db
    cdef Params p
    cdef double e
    cdef int relu = _options(eps, activation, &e), status
    cdef char* dx_data
    if relu < 0 or type(training) is not bool or not _batch(x, axis, &xb) \
            or not _like(dy, x, &xb, axis, &db):
        return None
    cdef bint train = training
    if train and xb.g.outer * xb.g.inner < 2:
        return None
    keep = _params(&xb, mean, var, gamma, beta, n_threads, parallel_min, True, &p)
    if keep is None:
        return None
    dx = _output(out, x, &xb, &dx_data, db.data)
    if dx is None or not (_apart(dx_data, xb.data, xb.nbytes)
                          and _apart(dx_data, db.data, xb.nbytes)):
        return None
    dgamma = _param_grad(dgamma_out, xb.typenum, xb.g.channels)
    dbeta = _param_grad(dbeta_out, xb.typenum, xb.g.channels)
    if dgamma is None or dbeta is None:
        return None
    cdef void* dg = cnp.PyArray_DATA(<cnp.ndarray>dgamma)
    cdef void* dbe = cnp.PyArray_DATA(<cnp.ndarray>dbeta)
    cdef bint stream = _streams(&xb, stream_min, rows_stream_min)
    with nogil:
        if xb.typenum == cnp.NPY_FLOAT:
            status = _backward(<const float*>db.data, <const float*>xb.data, &xb.g, p.mean,
                               p.var, <const float*>p.gamma, <const float*>p.beta, e,
                               <float*>dx_data, <float*>dg, <float*>dbe, train,
                               need_param_grads, relu, p.threads, stream)
        else:
            status = _backward(<const double*>db.data, <const double*>xb.data, &xb.g, p.mean,
                               p.var, <const double*>p.gamma, <const double*>p.beta, e,
                               <double*>dx_data, <double*>dg, <double*>dbe, train,
                               need_param_grads, relu, p.threads, stream)
    return (dx, dgamma, dbeta) if status == STATUS_OK else status
