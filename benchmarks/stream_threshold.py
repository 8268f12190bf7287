"""Where should outputs stream? Streamed against cached stores, with the next layer.

Streaming (non-temporal) stores skip reading each output line before writing
it, so a pass over arrays that come from memory gets faster, but the output
then sits in memory, not in the cache, and the next layer must fetch it from
there. ``cbn.functional.STREAM_MIN_BYTES`` (half the last-level cache) decides
which outputs stream, and on Intel CPUs ``ROWS_STREAM_MIN_BYTES`` (16 L2 caches)
for those over rows. This script measures the trade for the training forward
pass at one thread, on arrays below that threshold, in four settings:

* ``out=cold``: y written into a rotated ``out=`` buffer that is not in cache
  (how ``bench.py`` times the functional API), then nothing reads y;
* ``out=cold + next``: the same, then the next layer reads y (``y.sum()``);
* ``alloc``: y freshly allocated per call (how ``cbn.BatchNorm`` works); the
  allocator hands back memory the previous call freed, still in cache;
* ``alloc + next``: the same, then the next layer reads y.

Each number is the cached-store time over the streamed time (above 1:
streaming is faster), from alternating rounds on the same buffers.

Usage (unset the OpenBLAS variables for the run, as for bench.py):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/stream_threshold.py [--json FILE]
"""

import sys

import numpy as np

from cbn import benchmark as B
from cbn import functional as F

SHAPES = ("8x256x28x28", "64x16x32x32", "4096x256", "256x1024")
SETTINGS = ("out=cold", "out=cold + next", "alloc", "alloc + next")


def _forward(x, out, stream, consume):
    """One training forward (streamed or not), then the next layer's read of y."""
    with B.streaming_from(0 if stream else 1 << 62):
        y, _, _ = F.batch_norm_train(x, out=out)
    if consume:
        y.sum()


def measure(shape, dtype, *, cache_bytes, rounds=5, target_time=0.3):
    """Cached over streamed time for each of SETTINGS, one thread."""
    spec = B.parse_shape(shape)
    nbytes = spec.nbytes(dtype)
    n = max(2, min(64, (3 * cache_bytes) // nbytes))  # x and out= rotate past the cache
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(spec.shape).astype(dtype) for _ in range(n)]
    outs = [np.empty(spec.shape, dtype) for _ in range(n)]
    row = {"shape": shape, "dtype": np.dtype(dtype).name, "nbytes": nbytes}
    for setting in SETTINGS:
        cold = setting.startswith("out=cold")
        consume = setting.endswith("next")

        def fn(stream, cold=cold, consume=consume):
            return (lambda i: _forward(xs[i], outs[i] if cold else None, stream, consume)), None

        t = B.time_interleaved({"cached": fn(False), "streamed": fn(True)}, n, rounds=rounds,
                               target_time=target_time)
        row[setting] = t["cached"].median / t["streamed"].median
    return row


def main(argv=None):
    """Measure every shape and dtype, print a table; returns the exit status."""
    save = B.side_measurement(__doc__, "write the ratios as JSON", argv)
    cache = B._last_level_cache_bytes()
    print(f"streamed speed-up (cached time / streamed time), one thread; "
          f"STREAM_MIN_BYTES = {F.STREAM_MIN_BYTES >> 20} MiB")
    print(f"{'shape':12} {'dtype':8} {'MiB':>5}  " + "  ".join(f"{s:>15}" for s in SETTINGS))
    rows = []
    for shape in SHAPES:
        for dtype in ("float32", "float64"):
            row = measure(shape, dtype, cache_bytes=cache)
            rows.append(row)
            print(f"{shape:12} {dtype:8} {row['nbytes'] / 2**20:5.1f}  "
                  + "  ".join(f"{row[s]:15.2f}" for s in SETTINGS), flush=True)
    save(rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
