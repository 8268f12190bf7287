"""oneDNN as a peer: cbn against oneDNN's batch normalization, float32.

PyTorch's CPU kernel (what ``bench.py`` compares with) is one peer; oneDNN,
the library behind Intel's and PyTorch's optimized CPU paths, is the other.
PyTorch 2.13 only reaches oneDNN's batch norm through its own ``mkldnn``
tensors, which are plain NCHW there and get oneDNN's generic kernel, so this
script calls oneDNN's C API directly: it compiles a small shim against an
installed oneDNN with the system C compiler and times, for every case, in
the same alternating rounds over the same rotated buffers as ``bench.py``:

* ``cbn``: :mod:`cbn.functional` as users call it;
* ``cbn:stream``: the same with every output streamed (non-temporal stores,
  all of cbn's thresholds 0: ``cbn.benchmark.streaming_from``), as oneDNN
  streams its float32 outputs; by default cbn streams only outputs of half the
  last-level cache and more, and on Intel CPUs those over rows of 16 (forward)
  or 8 (backward) L2 caches and more;
* ``onednn``: oneDNN on the case's own layout (``nc`` for (N, C), ``nchw``
  for NCHW, ``nhwc`` for channels-last), the memory cbn reads and writes;
* ``onednn:blocked``: for NCHW shapes whose C is a multiple of 16, oneDNN on
  ``nChw16c``, the blocked layout its fast kernels are written for (a network
  built on oneDNN keeps its activations in it; a NumPy trainer's arrays are
  NCHW, so it would pay a reorder, which is not counted here);
* ``torch``: PyTorch's kernel, when torch is installed.

Every array starts on a 64-byte boundary, as in frameworks built on oneDNN
(``--numpy-alignment`` keeps NumPy's own arrays, 16-byte aligned at best).
Forwards write y, the backward dx (and dgamma, dbeta) into preallocated
outputs on every side (cbn's ``out=``): by default rotated with the inputs
and read by nothing, as ``bench.py`` times; with ``--next-layer`` one output
array that the next layer reads (a sum) inside each timed call, as in a
network, where a streamed output must come back from memory. oneDNN's
training forward returns the batch mean and variance, as cbn's does. Each
oneDNN primitive is made for the thread count it is timed on (oneDNN fixes
the count when it creates a primitive). Before timing, every primitive's
results are checked against the float64 NumPy reference on fresh random
data. oneDNN has no float64 batch norm, so the cases are float32 only.

The timings move with where the buffers land in physical memory, so every
measurement runs in a fresh process (``--processes``, default 3) and the
summary gives each case's median and range over them.

oneDNN is found in ``$DNNL_ROOT`` (a directory with ``include/`` and
``lib/``) or in the running Python's prefix (a virtual environment), where

    pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0

puts oneDNN 3.2 built with GNU OpenMP (the runtime cbn uses). Needs a C
compiler (``$CC`` or ``cc``).

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/onednn.py [--next-layer] [--json FILE]
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile

import numpy as np

from cbn import benchmark as B
from cbn import functional as F
from cbn import reference

SHIM = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

/* One batch-normalization case: a forward primitive (training or inference) or
   a backward one (with its forward hint); memory objects get their data
   handles before each call, so one primitive serves every rotated buffer. */
typedef struct {
    dnnl_engine_t eng;
    dnnl_stream_t strm;
    dnnl_primitive_desc_t fpd, bpd;
    dnnl_primitive_t prim;
    dnnl_memory_t src, dst, scale, shift, mean, var, ddst, dsrc, dscale, dshift, scratch;
    void *scratch_buf;
    char impl[128];
} bn_t;

#define CHECK(call) do { dnnl_status_t st_ = (call); if (st_ != dnnl_success) return 100 + (int)st_; } while (0)

/* op: 0 training forward, 1 inference forward, 2 backward (data, scale and shift).
   tag: 0 plain (nc, nchw), 1 nhwc, 2 nChw16c. dims: N, C, H, W (logical order).
   threads: oneDNN fixes a primitive's thread count when it creates it (from
   omp_get_max_threads()) and keeps it whatever the count when it runs; and its
   primitive cache would hand back a primitive made for another count. So the
   cache is off and the count is set here, for creation and for the calls after.
   Returns 0, or an error code (100 + a dnnl_status_t). */
int bn_create(bn_t **out, int ndims, const int64_t *dims, int tag, int op, float eps,
              int threads) {
    bn_t *h = calloc(1, sizeof *h);
    *out = h;
    if (!h) return 1;
    if (ndims != 2 && ndims != 4) return 2;
    CHECK(dnnl_set_primitive_cache_capacity(0));
    omp_set_num_threads(threads);
    dnnl_format_tag_t t = ndims == 2 ? dnnl_nc
                        : tag == 1 ? dnnl_nhwc : tag == 2 ? dnnl_nChw16c : dnnl_nchw;
    dnnl_dims_t d = {0}, c = {dims[1]};
    memcpy(d, dims, (size_t)ndims * sizeof d[0]);
    CHECK(dnnl_engine_create(&h->eng, dnnl_cpu, 0));
    CHECK(dnnl_stream_create(&h->strm, h->eng, dnnl_stream_default_flags));
    dnnl_memory_desc_t data, vec;
    CHECK(dnnl_memory_desc_create_with_tag(&data, ndims, d, dnnl_f32, t));
    CHECK(dnnl_memory_desc_create_with_tag(&vec, 1, c, dnnl_f32, dnnl_a));
    unsigned flags = dnnl_use_scale | dnnl_use_shift | (op == 1 ? dnnl_use_global_stats : 0);
    dnnl_primitive_attr_t attr;
    CHECK(dnnl_primitive_attr_create(&attr));
    CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    CHECK(dnnl_batch_normalization_forward_primitive_desc_create(
        &h->fpd, h->eng, op == 1 ? dnnl_forward_inference : dnnl_forward_training,
        data, data, eps, flags, attr));
    dnnl_primitive_desc_t pd = h->fpd;
    if (op == 2) {
        CHECK(dnnl_batch_normalization_backward_primitive_desc_create(
            &h->bpd, h->eng, dnnl_backward, data, data, data, eps, flags, h->fpd, attr));
        pd = h->bpd;
    }
    const char *impl = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        strncpy(h->impl, impl, sizeof h->impl - 1);
    CHECK(dnnl_primitive_create(&h->prim, pd));
    const_dnnl_memory_desc_t smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    size_t ss = smd ? dnnl_memory_desc_get_size(smd) : 0;
    if (ss) {
        h->scratch_buf = aligned_alloc(64, (ss + 63) / 64 * 64);
        if (!h->scratch_buf) return 3;
        CHECK(dnnl_memory_create(&h->scratch, smd, h->eng, h->scratch_buf));
    }
    dnnl_memory_t *datas[] = {&h->src, &h->dst, &h->ddst, &h->dsrc};
    dnnl_memory_t *vecs[] = {&h->scale, &h->shift, &h->mean, &h->var, &h->dscale, &h->dshift};
    for (int i = 0; i < 4; i++) CHECK(dnnl_memory_create(datas[i], data, h->eng, DNNL_MEMORY_NONE));
    for (int i = 0; i < 6; i++) CHECK(dnnl_memory_create(vecs[i], vec, h->eng, DNNL_MEMORY_NONE));
    dnnl_memory_desc_destroy(data);
    dnnl_memory_desc_destroy(vec);
    dnnl_primitive_attr_destroy(attr);
    return 0;
}

const char *bn_impl(const bn_t *h) { return h->impl; }

static int run(bn_t *h, int n, dnnl_exec_arg_t *args) {
    if (h->scratch) { args[n].arg = DNNL_ARG_SCRATCHPAD; args[n].memory = h->scratch; n++; }
    CHECK(dnnl_primitive_execute(h->prim, h->strm, n, args));
    CHECK(dnnl_stream_wait(h->strm));
    return 0;
}

/* Forward: y from x; training writes mean and var (biased), inference reads them. */
int bn_forward(bn_t *h, const float *x, float *y, const float *scale, const float *shift,
               float *mean, float *var) {
    dnnl_memory_set_data_handle(h->src, (void *)x);
    dnnl_memory_set_data_handle(h->dst, y);
    dnnl_memory_set_data_handle(h->scale, (void *)scale);
    dnnl_memory_set_data_handle(h->shift, (void *)shift);
    dnnl_memory_set_data_handle(h->mean, mean);
    dnnl_memory_set_data_handle(h->var, var);
    dnnl_exec_arg_t a[7] = {{DNNL_ARG_SRC, h->src}, {DNNL_ARG_DST, h->dst},
                            {DNNL_ARG_SCALE, h->scale}, {DNNL_ARG_SHIFT, h->shift},
                            {DNNL_ARG_MEAN, h->mean}, {DNNL_ARG_VARIANCE, h->var}};
    return run(h, 6, a);
}

/* Backward through the batch statistics: dx, dscale and dshift. */
int bn_backward(bn_t *h, const float *x, const float *dy, const float *mean, const float *var,
                const float *scale, float *dx, float *dscale, float *dshift) {
    dnnl_memory_set_data_handle(h->src, (void *)x);
    dnnl_memory_set_data_handle(h->ddst, (void *)dy);
    dnnl_memory_set_data_handle(h->mean, (void *)mean);
    dnnl_memory_set_data_handle(h->var, (void *)var);
    dnnl_memory_set_data_handle(h->scale, (void *)scale);
    dnnl_memory_set_data_handle(h->dsrc, dx);
    dnnl_memory_set_data_handle(h->dscale, dscale);
    dnnl_memory_set_data_handle(h->dshift, dshift);
    dnnl_exec_arg_t a[9] = {{DNNL_ARG_SRC, h->src}, {DNNL_ARG_DIFF_DST, h->ddst},
                            {DNNL_ARG_MEAN, h->mean}, {DNNL_ARG_VARIANCE, h->var},
                            {DNNL_ARG_SCALE, h->scale}, {DNNL_ARG_DIFF_SRC, h->dsrc},
                            {DNNL_ARG_DIFF_SCALE, h->dscale}, {DNNL_ARG_DIFF_SHIFT, h->dshift}};
    return run(h, 8, a);
}

void bn_destroy(bn_t *h) {
    if (!h) return;
    dnnl_memory_t ms[] = {h->src, h->dst, h->scale, h->shift, h->mean, h->var, h->ddst,
                          h->dsrc, h->dscale, h->dshift, h->scratch};
    for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++)
        if (ms[i]) dnnl_memory_destroy(ms[i]);
    if (h->prim) dnnl_primitive_destroy(h->prim);
    if (h->bpd) dnnl_primitive_desc_destroy(h->bpd);
    if (h->fpd) dnnl_primitive_desc_destroy(h->fpd);
    if (h->strm) dnnl_stream_destroy(h->strm);
    if (h->eng) dnnl_engine_destroy(h->eng);
    free(h->scratch_buf);
    free(h);
}
"""

OPS = {"fwd-train": 0, "fwd-eval": 1, "backward": 2}
ALIGN = 64  # bytes: a cache line, and the alignment oneDNN's own allocations get
PLAIN, NHWC, BLOCKED = 0, 1, 2
BLOCK = 16  # nChw16c


def find_onednn():
    """The directory holding oneDNN's ``include/`` and ``lib/``: ``$DNNL_ROOT``, else the
    running Python's prefix. Raises RuntimeError if neither has the header and library."""
    roots = [os.environ["DNNL_ROOT"]] if os.environ.get("DNNL_ROOT") else [sys.prefix]
    for root in roots:
        header = os.path.join(root, "include", "oneapi", "dnnl", "dnnl.h")
        lib = os.path.join(root, "lib")
        if os.path.isfile(header) and any(f.startswith("libdnnl.so") for f in _listdir(lib)):
            return root
    raise RuntimeError(
        f"oneDNN not found in {', '.join(roots)} (no include/oneapi/dnnl/dnnl.h and "
        "lib/libdnnl.so): pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0, "
        "or set DNNL_ROOT")


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def compile_shim(workdir, root):
    """Compile SHIM against oneDNN in ``root``; return the loaded library (argument types
    declared), or raise RuntimeError."""
    lib = os.path.join(root, "lib")
    shim = B.compile_c(workdir, "onednn_shim", SHIM,
                       ["-O2", "-fopenmp", "-I", os.path.join(root, "include"), "-L", lib,
                        "-ldnnl", f"-Wl,-rpath,{lib}"], "the oneDNN shim")
    p = ctypes.c_void_p
    shim.bn_create.argtypes = [ctypes.POINTER(p), ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                               ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    shim.bn_impl.argtypes, shim.bn_impl.restype = [p], ctypes.c_char_p
    shim.bn_forward.argtypes = [p] * 7
    shim.bn_backward.argtypes = [p] * 9
    shim.bn_destroy.argtypes, shim.bn_destroy.restype = [p], None
    for fn in (shim.bn_create, shim.bn_forward, shim.bn_backward):
        fn.restype = ctypes.c_int
    return shim


def layouts(spec):
    """oneDNN layouts for a case: ``[(label, tag)]``, the case's own first."""
    if spec.channels_last:
        return [("onednn", NHWC)] if len(spec.shape) == 4 else []
    if len(spec.shape) == 2:
        return [("onednn", PLAIN)]
    if len(spec.shape) == 4:
        own = [("onednn", PLAIN)]
        return own + ([("onednn:blocked", BLOCKED)] if spec.channels % BLOCK == 0 else [])
    return []


def logical_dims(spec):
    """oneDNN's dims (N, C, H, W) for a spec (channels-last arrays are (N, H, W, C))."""
    s = spec.shape
    return (s[0], s[3], s[1], s[2]) if spec.channels_last else tuple(s)


def to_blocked(x):
    """An NCHW array in oneDNN's nChw16c order: shape (N, C/16, H, W, 16), C-contiguous."""
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // BLOCK, BLOCK, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(xb):
    """The inverse of :func:`to_blocked`."""
    n, cb, h, w, b = xb.shape
    return np.ascontiguousarray(xb.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


class Primitive:
    """A oneDNN batch-norm primitive for one case (``op`` in OPS, ``tag`` PLAIN, NHWC or
    BLOCKED) on ``threads`` threads; release it with :meth:`close` (or use it as a
    context manager). Creating one sets OpenMP's thread count (``omp_set_num_threads``)
    of the calling thread to ``threads``: oneDNN runs a primitive on the count it was
    made for."""

    def __init__(self, shim, dims, tag, op, eps=B.EPS, threads=1):
        self.shim = shim
        self.handle = ctypes.c_void_p()
        arr = (ctypes.c_int64 * len(dims))(*dims)
        rc = shim.bn_create(ctypes.byref(self.handle), len(dims), arr, tag, OPS[op], eps,
                            threads)
        if rc != 0:
            self.close()
            raise RuntimeError(f"oneDNN refused {op} on dims {dims} (tag {tag}): code {rc}")
        self.impl = shim.bn_impl(self.handle).decode()

    def forward(self, x, y, scale, shift, mean, var):
        """y from x (pointers or arrays); training writes mean/var, inference reads them."""
        rc = self.shim.bn_forward(self.handle, *map(_ptr, (x, y, scale, shift, mean, var)))
        if rc != 0:
            raise RuntimeError(f"oneDNN forward failed: code {rc}")

    def backward(self, x, dy, mean, var, scale, dx, dscale, dshift):
        """dx, dscale and dshift through the batch statistics."""
        rc = self.shim.bn_backward(self.handle,
                                   *map(_ptr, (x, dy, mean, var, scale, dx, dscale, dshift)))
        if rc != 0:
            raise RuntimeError(f"oneDNN backward failed: code {rc}")

    def close(self):
        """Free the primitive and its memory objects."""
        if self.handle:
            self.shim.bn_destroy(self.handle)
            self.handle = ctypes.c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _ptr(a):
    return a if isinstance(a, ctypes.c_void_p) else ctypes.c_void_p(a.ctypes.data)


def _close(got, expected, rel, scale=None):
    """Whether ``got`` is ``expected`` to ``rel`` of ``scale`` (default: 1 or
    ``expected``'s largest magnitude, whichever is larger)."""
    if scale is None:
        scale = max(1.0, float(np.abs(expected).max()))
    return bool(np.all(np.abs(got.astype(np.float64) - expected) <= rel * scale))


def check(shim, spec, tag, op, rng):
    """Run oneDNN once on fresh random float32 data of ``spec`` and compare every output
    with the float64 reference; returns the kernel's name, raises RuntimeError if wrong."""
    axis, C = spec.axis, spec.channels
    x = (rng.standard_normal(spec.shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2))
    x = x.astype(np.float32)
    dy = rng.standard_normal(spec.shape).astype(np.float32)
    g = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, var = reference.exact_batch_stats(x64, axis)
    blocked = tag == BLOCKED
    xs, dys = (to_blocked(x), to_blocked(dy)) if blocked else (x, dy)
    out = np.full_like(xs, np.nan)  # so that an output left unwritten shows
    with Primitive(shim, logical_dims(spec), tag, op) as prim:
        if op == "backward":
            dg, db = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)
            prim.backward(xs, dys, mean.astype(np.float32), var.astype(np.float32), g, out,
                          dg, db)
            expected = reference.backward_train(dy.astype(np.float64), x64, g.astype(np.float64),
                                                None, B.EPS, axis)
            got = (from_blocked(out) if blocked else out, dg, db)
            ok = all(_close(a, e, 1e-3) for a, e in zip(got, expected))
        elif op == "fwd-eval":
            m = (mean + rng.uniform(-0.5, 0.5, C)).astype(np.float32)
            v = (var + rng.uniform(0.0, 0.5, C)).astype(np.float32)
            prim.forward(xs, out, g, b, m, v)
            expected = reference.forward_eval(x64, m.astype(np.float64), v.astype(np.float64),
                                              g.astype(np.float64), b.astype(np.float64),
                                              B.EPS, axis)
            ok = _close(from_blocked(out) if blocked else out, expected, 1e-4)
        else:
            m, v = np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32)
            prim.forward(xs, out, g, b, m, v)
            expected = reference.forward_train(x64, g.astype(np.float64), b.astype(np.float64),
                                               B.EPS, axis)[0]
            # float32 sums of up to 10^5 values: the mean to a part of the spread
            spread = max(1.0, float(np.abs(mean).max()), float(np.sqrt(var.max())))
            ok = (_close(m, mean, 1e-4, spread) and _close(v, var, 1e-4)
                  and _close(from_blocked(out) if blocked else out, expected, 1e-4))
        if not ok:
            raise RuntimeError(f"oneDNN {op} on {spec.name} (tag {tag}) disagrees with the "
                               "float64 reference: the shim calls it wrongly")
        return prim.impl


def _onednn_fn(shim, spec, tag, op, buf, f32, align=ALIGN, threads=1):
    """``(fn, close)``: ``fn(i)`` runs oneDNN on ``threads`` threads on rotated buffer i
    (blocked copies for BLOCKED); ``fn.outs[i]`` is its output; ``close()`` frees the
    primitive."""
    prim = Primitive(shim, logical_dims(spec), tag, op, threads=threads)
    if tag == BLOCKED:
        xs = [aligned_copy(to_blocked(x), align) for x in buf.xs]
        dys = [aligned_copy(to_blocked(d), align) for d in buf.dys]
        if _single(buf.outs):
            outs = [aligned_copy(xs[0], align)] * len(xs)
        else:
            outs = [aligned_copy(x, align) for x in xs]
    else:
        xs, dys, outs = buf.xs, buf.dys, buf.outs
    # pointers made once: the timing should not include their wrapping
    px, pd, po = ([_ptr(a) for a in arrs] for arrs in (xs, dys, outs))
    g, b, m, v, dg, db, sm, sv = map(_ptr, f32)
    sh = prim.shim
    if op == "backward":
        def fn(i):
            if sh.bn_backward(prim.handle, px[i], pd[i], m, v, g, po[i], dg, db):
                raise RuntimeError("oneDNN backward failed while timed")
    elif op == "fwd-eval":
        def fn(i):
            if sh.bn_forward(prim.handle, px[i], po[i], g, b, m, v):
                raise RuntimeError("oneDNN forward failed while timed")
    else:
        def fn(i):
            if sh.bn_forward(prim.handle, px[i], po[i], g, b, sm, sv):
                raise RuntimeError("oneDNN forward failed while timed")
    fn.keep = (xs, dys, f32)
    fn.outs = outs
    return fn, prim.close


def _single(outs):
    """Whether every rotated output is the same array (the next-layer setting)."""
    return all(o is outs[0] for o in outs)


def aligned_empty(shape, dtype, align=ALIGN):
    """An uninitialized C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a, align):
    """``a`` copied to an ``align``-byte boundary (``a`` itself if ``align`` is None)."""
    if align is None:
        return a
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


def aligned_buffers(spec, n, torch, align):
    """``bench.py``'s rotation set for a float32 case, with every x, dy and output
    starting on an ``align``-byte boundary; None keeps NumPy's own arrays, which
    start wherever malloc puts them (16 bytes apart). oneDNN streams its outputs
    only from aligned addresses, and frameworks built on it allocate 64-byte
    aligned memory: it measured up to 1.5x faster on aligned buffers."""
    buf = B._Buffers(spec, np.float32, n, None)
    for arrays in (buf.xs, buf.dys, buf.outs):
        arrays[:] = [aligned_copy(a, align) for a in arrays]
    if torch is not None:
        buf.torch = B._TorchBuffers(torch, buf, spec)
    return buf


def measure(shim, torch, spec, op, threads, config, next_layer=False, align=ALIGN):
    """Median seconds of every contender on one float32 case, in alternating rounds.

    next_layer: every call writes the same output array (as an allocator hands back
    the memory the previous call freed) and is followed, in the timed call, by the
    next layer's read of it (a sum), so that streamed outputs pay where a network
    pays for them. Otherwise outputs rotate with the inputs and nothing reads them
    (``bench.py``'s setting). align: see :func:`aligned_buffers`."""
    n = B._n_buffers(spec.nbytes(np.float32), config)
    buf = aligned_buffers(spec, n, torch, align)
    if next_layer:
        buf.outs = [buf.outs[0]] * n
        if buf.torch is not None:
            buf.torch.outs = [buf.torch.outs[0]] * n
    C = spec.channels
    f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in
           (buf.gamma, buf.beta, buf.mean, buf.var)] + [np.empty(C, np.float32) for _ in range(4)]
    mean, var = buf.mean, buf.var
    axis, g, b = spec.axis, buf.gamma, buf.beta
    if op == "backward":
        fns = {"cbn": ((lambda i: F.batch_norm_backward(
            buf.dys[i], buf.xs[i], mean, var, g, b, axis=axis, eps=B.EPS, training=True,
            out=buf.outs[i], n_threads=threads)), None)}
    else:
        fns = {"cbn": B._case_functions("cbn", op, spec, buf, threads, torch)}
    fns["cbn:stream"] = (_streaming(fns["cbn"][0]), None)
    closers = []
    try:
        for label, tag in layouts(spec):
            fn, close = _onednn_fn(shim, spec, tag, op, buf, f32, align, threads)
            closers.append(close)
            fns[label] = (fn, None)
        if torch is not None:
            fns["torch"] = B._case_functions("torch", op, spec, buf, threads, torch)
        if next_layer:
            fns = {k: (_then_read(fn, _output(k, op, buf, fn)), None)
                   for k, (fn, _) in fns.items()}
        with B._Threads(threads, torch):  # torch sets OpenMP's count too: the same
            t = B.time_interleaved(fns, n, rounds=config.rounds, target_time=config.target_time,
                                   min_repeats=config.min_repeats, max_repeats=config.max_repeats)
    finally:
        for close in closers:
            close()
    return {k: v.median for k, v in t.items()}


def _output(label, op, buf, fn):
    """``output(i, result)``: the array a contender's call on buffer i wrote."""
    if label.startswith("onednn"):
        return lambda i, result: fn.outs[i]
    if label == "torch" and op == "backward":  # torch allocates dx and returns it
        return lambda i, result: result[0].numpy()
    return lambda i, result: buf.outs[i]


def _then_read(fn, output):
    """``fn``, then the next layer's read of what it wrote."""
    def call(i):
        output(i, fn(i)).sum()
    return call


def _streaming(fn):
    """``fn`` with every output streamed (all of cbn's thresholds 0), as oneDNN
    streams its float32 outputs; cbn's defaults stream only outputs too large to
    stay useful in cache (the next layer would pay for it on smaller ones)."""
    def streamed(i):
        with B.streaming_from(0):
            fn(i)
    return streamed


def _supported(spec):
    """Raise ValueError unless oneDNN can take ``spec`` here: 2-D, NCHW or NHWC."""
    if not layouts(spec):
        raise ValueError(f"2-D, NCHW and NHWC shapes only, got {spec.name}")


def _options(p):
    p.add_argument("--shapes", type=B._shape_list, metavar="LIST",
                   default=[B.parse_shape(s) for s in B.DEFAULT_SHAPES],
                   help="comma-separated shapes (default: bench.py's)")
    p.add_argument("--threads", type=B._thread_list, metavar="LIST", default=[1, 2],
                   help="thread counts")
    p.add_argument("--ops", type=B._csv("op", B.OPS), metavar="LIST", default=list(B.OPS),
                   help="fwd-train,fwd-eval,backward")
    p.add_argument("--next-layer", action="store_true",
                   help="write one output array and read it after each call, as a network "
                        "does (default: cold rotated outputs that nothing reads, as bench.py)")
    p.add_argument("--numpy-alignment", action="store_true",
                   help="time on NumPy's own arrays, 16-byte aligned at best (default: every "
                        "array 64-byte aligned, as oneDNN's users allocate)")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes, one measurement of every case each")
    p.add_argument("--target-time", type=float, default=B.BenchConfig.target_time,
                   help="seconds of timed calls per contender and case")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def child(args, root):
    """One process: check and time every case, print one JSON line per case."""
    torch = B._import_torch()
    config = B.BenchConfig(shapes=args.shapes, dtypes=["float32"], threads=args.threads,
                           ops=args.ops, target_time=args.target_time,
                           cache_bytes=B._last_level_cache_bytes())
    rng = np.random.default_rng()
    with tempfile.TemporaryDirectory() as d:
        shim = compile_shim(d, root)
        for spec in config.shapes:
            for op in config.ops:
                kernels = {label: check(shim, spec, tag, op, rng)
                           for label, tag in layouts(spec)}
                for threads in config.threads:
                    t = measure(shim, torch, spec, op, threads, config, args.next_layer,
                                None if args.numpy_alignment else ALIGN)
                    print(json.dumps({"case": f"{spec.name} {op} t{threads}", "shape": spec.name,
                                      "op": op, "threads": threads, "kernels": kernels,
                                      "median_s": t}), flush=True)
    return 0


def summarize(rows):
    """Per case (in order): cbn's speed-up over every other contender, median and range
    over the processes; and per contender, the cases where cbn is at least as fast."""
    cases = {}
    for row in rows:
        t = row["median_s"]
        cases.setdefault(row["case"], []).append({k: v / t["cbn"] for k, v in t.items()
                                                  if k != "cbn"})
    per_case = {}
    for case, runs in cases.items():
        per_case[case] = {k: {"median": statistics.median(r[k] for r in runs),
                              "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
                          for k in runs[0]}
    totals = {}
    for stats in per_case.values():
        for k, v in stats.items():
            totals.setdefault(k, []).append(v["median"])
    return per_case, {k: {"at_least_as_fast": sum(x >= 1.0 for x in v), "cases": len(v),
                          "median": statistics.median(v), "min": min(v), "max": max(v)}
                      for k, v in totals.items()}


def main(argv=None):
    """Run ``--processes`` children and summarize; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    save = B.side_measurement(__doc__, "write every process's medians and the summary as JSON",
                              argv, _options)
    args = save.args
    if B.refuse_shapes(args.shapes, _supported):
        return 2
    if args.processes < 1 or args.target_time <= 0:
        print("--processes must be at least 1 and --target-time positive", file=sys.stderr)
        return 2
    try:
        root = find_onednn()
        if args.child:
            return child(args, root)
        with tempfile.TemporaryDirectory() as d:
            compile_shim(d, root)  # fail here, once, rather than in every child
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"oneDNN from {root}; float32; cbn's speed-up over each contender, per process")

    def show(row):
        t = row["median_s"]
        print(f"process {row['process'] + 1}  {row['case']:30} cbn {t['cbn'] * 1e3:7.3f} ms  "
              + "  ".join(f"{k} {v / t['cbn']:.2f}x" for k, v in t.items() if k != "cbn"),
              flush=True)

    rows, status = B.run_children(__file__, argv, args.processes, show)
    if rows is None:
        return status
    per_case, totals = summarize(rows)
    print(f"cbn's speed-up, median [range] over {args.processes} processes:")
    for case, stats in per_case.items():
        print(f"  {case:30} " + "  ".join(
            f"{k} {v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]" for k, v in stats.items()))
    for k, v in totals.items():
        print(f"cbn vs {k}: at least as fast on {v['at_least_as_fast']} of {v['cases']} cases "
              f"(medians over the processes), median {v['median']:.2f}x, "
              f"range {v['min']:.2f}-{v['max']:.2f}x")
    kernels = {row["case"]: row["kernels"] for row in rows}
    save(onednn_root=root, processes=args.processes, rows=rows, per_case=per_case,
         totals=totals, kernels=kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
