"""Streaming (non-temporal) stores: the same numbers, the same error reports.

Large outputs are written with streaming stores (cbn.functional.STREAM_MIN_BYTES,
and ROWS_STREAM_MIN_BYTES and ROWS_DX_STREAM_MIN_BYTES over rows); the test
arrays are small, so these tests lower the thresholds to 0 and compare
every result with the cached-store path, bit for bit, on layouts that put the
output at every alignment a 64-byte line can have.
"""

import math

import numpy as np
import pytest

from cbn import BatchNorm
from cbn import _kernels as K
from cbn import functional as F
from cbn import reference as R


def _stream_from(monkeypatch, nbytes):
    """Every output of at least nbytes bytes streams, over rows too."""
    monkeypatch.setattr(F, "STREAM_MIN_BYTES", nbytes)
    monkeypatch.setattr(F, "ROWS_STREAM_MIN_BYTES", nbytes)
    monkeypatch.setattr(F, "ROWS_DX_STREAM_MIN_BYTES", nbytes)


@pytest.fixture
def stream_always(monkeypatch):
    _stream_from(monkeypatch, 0)


def _both(fn, monkeypatch):
    """fn() with streaming off, then on."""
    _stream_from(monkeypatch, 1 << 62)
    plain = fn()
    _stream_from(monkeypatch, 0)
    streamed = fn()
    return plain, streamed


# (shape, axis): inner > 1 runs of lengths that are and are not multiples of a
# 64-byte line (and runs of several 1 KiB blocks of streamed lines), and
# inner == 1 rows: short ones, which a streamed pass folds into virtual rows
# (normalize 4 KiB, backward 2 KiB; with a remainder of rows), and rows of
# 4 KiB or more.
SHAPES = [
    ((4, 3, 37, 5), 1),
    ((2, 3, 700), 1),
    ((2, 5, 64), 1),
    ((3, 2, 33), 1),
    ((6, 7, 8, 16), 1),
    ((50, 19), 1),
    ((300, 16), 1),
    ((5, 1100), 1),
    ((4, 600), 1),
    ((8, 9, 11, 6), -1),
]


def _random_batch(rng, shape, axis, dtype):
    """Fresh x (mean 1, spread 3), dy, gamma and beta for a batch with channels on `axis`."""
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    return x, dy, rng.uniform(0.5, 2, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_streamed_results_are_bit_identical(monkeypatch, shape, axis, dtype, relu, n_threads):
    x, dy, gamma, beta = _random_batch(np.random.default_rng(), shape, axis, dtype)
    act = "relu" if relu else None
    kw = dict(axis=axis, activation=act, n_threads=n_threads)

    def run():
        y, mean, var = F.batch_norm_train(x, gamma, beta, **kw)
        ye = F.batch_norm_eval(x, mean * 0.9, var * 1.1, gamma, beta, **kw)
        dx, dg, db = F.batch_norm_backward(dy, x, mean, var, gamma, beta, **kw)
        dxe, _, _ = F.batch_norm_backward(dy, x, mean, var, gamma, beta, training=False, **kw)
        return y, ye, dx, dg, db, dxe

    plain, streamed = _both(run, monkeypatch)
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a, b)
    # And both are right: the streamed training output against the float64 oracle.
    y_ref = R.forward_train(x.astype(np.float64), gamma, beta, 1e-5, axis, relu)[0]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(streamed[0], y_ref, rtol=tol, atol=tol)


# Runs of at least CBN_OR_CHECK_BYTES (2 KiB) that do not stream take one lean
# loop over a thread's share of runs (cbn_affine_runs). With two threads the
# first three split in two shares, the second starting at a channel other than
# 0 (run 10 of 21, 19 of 39, 17 of 35); the last stays one share.
LEAN_SHAPES = [(7, 3, 32, 32), (13, 3, 24, 24), (5, 7, 700), (2, 11, 17, 31)]


@pytest.mark.parametrize("shape", LEAN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_unstreamed_long_runs_in_one_loop(monkeypatch, shape, dtype, relu, n_threads):
    """Evaluation and training forward over runs of 2 KiB and more, unstreamed:
    the bits of the streamed pass (which goes run by run), the float64
    reference, and a NaN in a random run of the second share named as such."""
    rng = np.random.default_rng()
    x, _, gamma, beta = _random_batch(rng, shape, 1, dtype)
    C = shape[1]
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 4, C)
    kw = {"activation": "relu" if relu else None, "n_threads": n_threads}

    def run():
        return (F.batch_norm_eval(x, mean, var, gamma, beta, **kw),
                F.batch_norm_train(x, gamma, beta, **kw)[0])

    plain, streamed = _both(run, monkeypatch)
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a, b)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    want = R.forward_eval(x.astype(np.float64), mean, var, gamma, beta, 1e-5, 1, relu)
    np.testing.assert_allclose(plain[0], want, rtol=tol, atol=tol)
    want = R.forward_train(x.astype(np.float64), gamma, beta, 1e-5, 1, relu)[0]
    np.testing.assert_allclose(plain[1], want, rtol=tol, atol=tol)
    runs = x.reshape(-1, math.prod(shape[2:]))
    u = rng.integers(runs.shape[0] // 2, runs.shape[0])
    runs[u, rng.integers(runs.shape[1])] = rng.choice([np.nan, np.inf, -np.inf])
    _stream_from(monkeypatch, 1 << 62)
    with pytest.raises(FloatingPointError):
        F.batch_norm_eval(x, mean, var, gamma, beta, **kw)


@pytest.mark.parametrize("offset", range(0, 17))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 45), (70, 12), (3, 1030)])
def test_every_output_alignment(stream_always, offset, dtype, shape):
    """out= views starting at every element offset within a 64-byte line."""
    rng = np.random.default_rng()
    x = rng.standard_normal(shape).astype(dtype)
    size = int(np.prod(shape))
    buf = np.full(size + 32, 7.0, dtype=dtype)
    out = buf[offset:offset + size].reshape(shape)
    y, mean, var = F.batch_norm_train(x, out=out)
    assert y is out
    C = shape[1]
    y_ref = R.forward_train(x.astype(np.float64), np.ones(C), np.zeros(C))[0]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, y_ref, rtol=tol, atol=tol)
    # Nothing outside the view was written.
    assert np.all(buf[:offset] == 7.0) and np.all(buf[offset + size:] == 7.0)
    dx, _, _ = F.batch_norm_backward(x, x, mean, var, out=out)
    assert dx is out
    assert np.all(buf[:offset] == 7.0) and np.all(buf[offset + size:] == 7.0)


# Rows that a streamed normalize folds into virtual rows of whole 64-byte lines
# (plain, folded, with a remainder of rows, over several chunks of the training
# pass; (N, C) and channels-last): with y inside a line it takes them shifted to
# start on one.
SHIFT_SHAPES = [((300, 16), 1), ((130, 24), 1), ((40, 256), 1), ((9, 1024), 1),
                ((2100, 256), 1), ((3, 10, 10, 16), -1), ((2, 15, 10, 24), -1)]


@pytest.mark.parametrize("shape,axis", SHIFT_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_rows_at_every_line_offset(monkeypatch, shape, axis, dtype):
    """out= at every element offset within a line, streamed: the bits of the
    plain pass (training forward, evaluation and their backward passes, ReLU on
    and off, 1 and 2 threads), nothing written outside out, and a NaN at the
    first, a random or the last value reported."""
    rng = np.random.default_rng()
    x, dy, gamma, beta = _random_batch(rng, shape, axis, dtype)
    mean, var = F.batch_stats(x, axis=axis)
    item = np.dtype(dtype).itemsize
    per_line = 64 // item

    def passes(out, relu, n):
        act = "relu" if relu else None
        kw = {"axis": axis, "activation": act, "n_threads": n, "out": out}
        if out is not None:
            out.fill(np.nan)  # a value left unwritten shows
        y = F.batch_norm_train(x, gamma, beta, **kw)[0].copy()
        if out is not None:
            out.fill(np.nan)
        ye = F.batch_norm_eval(x, mean, var, gamma, beta, **kw).copy()
        grads = []
        for training in (True, False):
            if out is not None:
                out.fill(np.nan)
            grads.append(F.batch_norm_backward(dy, x, mean, var, gamma, beta,
                                               training=training, **kw)[0].copy())
        return y, ye, *grads

    _stream_from(monkeypatch, 1 << 62)
    want = {(relu, n): passes(None, relu, n) for relu in (False, True) for n in (1, 2)}
    _stream_from(monkeypatch, 0)
    for offset in range(per_line):
        buf = np.full(x.size + 2 * per_line, 7.0, dtype=dtype)
        start = (-buf.ctypes.data % 64) // item + offset
        out = buf[start:start + x.size].reshape(shape)
        for (relu, n), w in want.items():
            got = passes(out, relu, n)
            for a, b in zip(got, w):
                np.testing.assert_array_equal(a, b, err_msg=f"offset {offset}, relu {relu}")
        assert np.all(buf[:start] == 7.0) and np.all(buf[start + x.size:] == 7.0)
        for pos in (0, int(rng.integers(x.size)), x.size - 1):
            bad = x.copy()
            bad.reshape(-1)[pos] = np.nan
            with pytest.raises(FloatingPointError):
                F.batch_norm_eval(bad, mean, var, gamma, beta, axis=axis, out=out)
            with pytest.raises(FloatingPointError):
                F.batch_norm_backward(bad, x, mean, var, gamma, beta, axis=axis, out=out)


def _four_passes(x, dy, mean, var, gamma, beta, out, relu, n, axis=1):
    """Training forward, evaluation, and training and frozen backward, each into
    `out` (filled with NaN first, so that a value left unwritten shows), copied."""
    kw = {"axis": axis, "activation": "relu" if relu else None, "n_threads": n, "out": out}
    results = []
    for run in (lambda: F.batch_norm_train(x, gamma, beta, **kw)[0],
                lambda: F.batch_norm_eval(x, mean, var, gamma, beta, **kw),
                lambda: F.batch_norm_backward(dy, x, mean, var, gamma, beta,
                                              training=True, **kw)[0],
                lambda: F.batch_norm_backward(dy, x, mean, var, gamma, beta,
                                              training=False, **kw)[0]):
        if out is not None:
            out.fill(np.nan)
        results.append(run().copy())
    return results


def _at_page_offset(shape, dtype, offset):
    """An uninitialised array of `shape` starting `offset` bytes into a page."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 8192, dtype=np.uint8)
    start = -raw.ctypes.data % 4096 + offset
    return raw[start:start + nbytes].view(dtype).reshape(shape)


# Runs of several 1 KiB blocks (with partial lines), rows folded to whole lines
# and rows of their own, shifted or not; rows of 16 and 64 channels take their
# coefficients from registers (cbn_periodic), lagged only at 80 bytes ahead.
NEAR_SHAPES = [((2, 3, 700), 1), ((3, 2, 1100), 1), ((4, 3, 37, 5), 1), ((300, 16), 1),
               ((200, 64), 1), ((130, 24), 1), ((9, 1024), 1), ((5, 1100), 1),
               ((3, 10, 10, 16), -1)]


@pytest.mark.parametrize("shape,axis", NEAR_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_output_a_little_ahead_of_its_inputs(monkeypatch, shape, axis, dtype):
    """out= 48, 80 or 144 bytes ahead of x (or of dy) modulo 4 KiB, which the
    streamed loops take in lagged blocks (CBN_NT_LAGGED), with x at several
    offsets in a line: the bits of the plain pass (training forward,
    evaluation and both backward passes, ReLU on and off, 1 and 2 threads),
    nothing written outside out, and a NaN at the first, a random or the last
    value reported."""
    rng = np.random.default_rng()
    x0, dy0, gamma, beta = _random_batch(rng, shape, axis, dtype)
    mean, var = F.batch_stats(x0, axis=axis)
    item = np.dtype(dtype).itemsize
    pad = 64 // item

    def passes(x, dy, out, relu, n):
        return _four_passes(x, dy, mean, var, gamma, beta, out, relu, n, axis)

    _stream_from(monkeypatch, 1 << 62)
    want = {(relu, n): passes(x0, dy0, None, relu, n) for relu in (False, True)
            for n in (1, 2)}
    _stream_from(monkeypatch, 0)
    for x_at in (0, item, 32 + item * int(rng.integers(0, 32 // item))):
        for ahead, dy_ahead in ((80, 1024), (48, 2048), (144, 64), (2048, 80)):
            x = _at_page_offset(shape, dtype, x_at)
            x[...] = x0
            dy = _at_page_offset(shape, dtype, (x_at + ahead - dy_ahead) % 4096)
            dy[...] = dy0
            full = _at_page_offset((x0.size + 2 * pad,), dtype,
                                   (x_at + ahead - pad * item) % 4096)
            full.fill(7.0)
            out = full[pad:pad + x0.size].reshape(shape)
            assert (out.ctypes.data - x.ctypes.data) % 4096 == ahead
            assert (out.ctypes.data - dy.ctypes.data) % 4096 == dy_ahead
            for (relu, n), w in want.items():
                for a, b in zip(passes(x, dy, out, relu, n), w):
                    np.testing.assert_array_equal(a, b, err_msg=f"{x_at} {ahead} {relu} {n}")
            assert np.all(full[:pad] == 7.0) and np.all(full[pad + x0.size:] == 7.0)
            for pos in (0, int(rng.integers(x0.size)), x0.size - 1):
                x.reshape(-1)[pos] = np.nan
                with pytest.raises(FloatingPointError):
                    F.batch_norm_eval(x, mean, var, gamma, beta, axis=axis, out=out)
                with pytest.raises(FloatingPointError):
                    F.batch_norm_backward(dy, x, mean, var, gamma, beta, axis=axis, out=out)
                x.reshape(-1)[pos] = x0.reshape(-1)[pos]



def _periodic_batch(rng, shape, dtype, data):
    """x, dy, gamma, beta (channels on axis 1 of `shape`) for the register-held
    coefficient test: "plain"; "offset",
    a mean far from 0 against the spread (the forward keeps the m, a, b form
    instead of x*a + c); "tiny", the slopes kx*invstd subnormal in the dtype
    (the backward keeps kx and invstd apart, see
    test_backward_keeps_precision_when_the_slope_would_underflow)."""
    C = shape[1]

    def per_channel(lo, hi):
        return rng.uniform(lo, hi, C).reshape((C,) + (1,) * (len(shape) - 2))

    if data == "tiny":
        big, tiny, g = (1e20, 1e-23, 1e15) if dtype == np.float32 else (1e150, 1e-165, 1e150)
        x = rng.standard_normal(shape) * big + per_channel(-big, big)
        dy = rng.standard_normal(shape) * tiny
        gamma, beta = rng.uniform(0.5, 2, C) * g, rng.uniform(-0.5, 0.5, C) * g
    else:
        x = rng.standard_normal(shape) * 2 + (per_channel(40, 80) if data == "offset" else 0.5)
        dy = rng.standard_normal(shape)
        gamma, beta = rng.uniform(0.5, 2, C), rng.uniform(-1, 1, C)
    return tuple(a.astype(dtype) for a in (x, dy, gamma, beta))


@pytest.mark.parametrize("C", [2, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("data", ["plain", "offset", "tiny"])
@pytest.mark.parametrize("layout", ["rows", "nchw"])
def test_streamed_rows_with_coefficients_in_registers(monkeypatch, C, dtype, data, layout):
    """Streamed rows whose coefficient rows repeat within four 64-byte lines
    (C * itemsize dividing 256 or 512 bytes; the kernels then hold the coefficients
    in registers, cbn_periodic where AVX-512 is built in): (N, C) rows, or NCHW
    maps of 2-4 values per channel, which go as the rows of C values of the
    (N, channels * H * W) view with each channel's coefficients repeated. out= at a random
    offset in a line and rows not a multiple of the fold: training forward,
    evaluation and both backward passes, ReLU on and off, 1 and 2 threads, give
    the bits of the plain pass and write nothing outside out; the training
    forward (and, without ReLU, backward) agree with the float64 reference."""
    rng = np.random.default_rng()
    rows = int(rng.integers(150, 400))
    channels = max(1, C // 4) if layout == "nchw" else C
    shape = (rows, C) if layout == "rows" else (rows, channels, 1, C // channels)
    x, dy, gamma, beta = _periodic_batch(rng, shape, dtype, data)
    mean, var = F.batch_stats(x)
    pad = 64 // np.dtype(dtype).itemsize

    def passes(out, relu, n):
        return _four_passes(x, dy, mean, var, gamma, beta, out, relu, n)

    _stream_from(monkeypatch, 1 << 62)
    want = {(relu, n): passes(None, relu, n) for relu in (False, True) for n in (1, 2)}
    _stream_from(monkeypatch, 0)
    full = np.full(x.size + 2 * pad, 7.0, dtype=dtype)
    start = (-full.ctypes.data % 64) // x.itemsize + int(rng.integers(pad))
    out = full[start:start + x.size].reshape(x.shape)
    for (relu, n), w in want.items():
        for a, b in zip(passes(out, relu, n), w):
            np.testing.assert_array_equal(a, b, err_msg=f"start {start}, relu {relu}, {n}")
        x64, dy64, g64, b64 = (a.astype(np.float64) for a in (x, dy, gamma, beta))
        checks = [(w[0], R.forward_train(x64, g64, b64, 1e-5, 1, relu)[0])]
        if not relu:
            # With ReLU, a z within the dtype's rounding of 0 takes the other
            # mask than the float64 reference's and moves dx by a*dy; the mask's
            # bits are checked against the plain pass above.
            checks.append((w[2], R.backward_train(dy64, x64, g64, b64)[0]))
        tol = 1e-4 if dtype == np.float32 else 1e-9
        for got, ref in checks:
            scale = np.maximum(np.abs(ref).max(axis=0), np.finfo(dtype).tiny)
            assert np.all(np.abs(got - ref) <= tol * scale), (relu, n)
    assert np.all(full[:start] == 7.0) and np.all(full[start + x.size:] == 7.0)


def test_unaligned_for_the_dtype_arrays(stream_always):
    """Arrays at an odd byte offset: inputs are copied to aligned memory, out= is refused."""
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    odd = raw[1:].view(np.float32).reshape(x.shape)
    odd[...] = x
    assert not odd.flags.aligned
    y, mean, var = F.batch_norm_train(odd)
    np.testing.assert_allclose(y, R.forward_train(x.astype(np.float64), np.ones(3),
                                                  np.zeros(3))[0], rtol=1e-5, atol=1e-5)
    dx, _, _ = F.batch_norm_backward(odd, odd, mean, var)
    np.testing.assert_array_equal(dx, F.batch_norm_backward(x, x, mean, var)[0])
    with pytest.raises(ValueError, match="out is not aligned"):
        F.batch_norm_train(x, out=odd)
    with pytest.raises(ValueError, match="out is not aligned"):
        F.batch_norm_eval(x, mean, var, out=odd)
    gamma_raw = np.zeros(3 * 4 + 1, dtype=np.uint8)
    gamma = gamma_raw[1:].view(np.float32)
    gamma[...] = 2.0
    assert not gamma.flags.aligned
    np.testing.assert_array_equal(F.batch_norm_train(x, gamma)[0], 2.0 * y)


@pytest.mark.parametrize("where", ["head", "body", "tail"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 100), (130, 24), (3, 1100)])
def test_nonfinite_output_is_reported_from_streamed_lines(stream_always, where, dtype, shape):
    """NaN in x, at the start, middle or end of a run or row, is reported from the streamed path."""
    rng = np.random.default_rng()
    x = rng.standard_normal(shape).astype(dtype)
    mean, var = F.batch_stats(x)
    rows = x.reshape(-1, shape[-1])
    row = rows[rows.shape[0] // 2]  # a middle run or row: in a streamed line
    row[{"head": 0, "body": row.size // 2, "tail": -1}[where]] = np.nan
    with pytest.raises(FloatingPointError):
        F.batch_norm_eval(x, mean, var)
    with pytest.raises(FloatingPointError):
        F.batch_norm_backward(np.ones_like(x), x, mean, var)


def test_layer_streams_the_same_numbers(monkeypatch):
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 6, 9, 9))
    dy = rng.standard_normal(x.shape)

    def run():
        layer = BatchNorm(6, dtype=np.float64, activation="relu")
        y = layer(x)
        dx = layer.backward(dy)
        ye = layer.eval()(x)
        return y, dx, ye, layer.dgamma.copy(), layer.running_var.copy()

    plain, streamed = _both(run, monkeypatch)
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, read, default", [
    ("CBN_STREAM_MIN_BYTES", lambda: F._stream_min_bytes(),
     lambda: (F._last_level_cache_bytes() * F._stream_share(*F._cpu_model())[0]
              // F._stream_share(*F._cpu_model())[1])),
    ("CBN_GROUP_BYTES", lambda: F._group_bytes(),
     lambda: F._cache_sizes().get(2, 1 << 20) // 8),
    ("CBN_ONE_ROW_BYTES", lambda: F._one_row_bytes(),
     lambda: 4 * F._cache_sizes().get(2, 1 << 20)),
    ("CBN_CACHE_BYTES", lambda: F._cache_limit(),
     lambda: min(1 << 30, F._physical_memory_bytes() // 16)),
])
def test_byte_settings_from_environment(monkeypatch, name, read, default):
    """The streaming threshold, the backward's group budget, its one-row
    threshold and the output cache's limit: an integer from the environment, a
    clear ValueError naming the variable, else from the caches (or memory)."""
    value = int(np.random.default_rng().integers(0, 1 << 30))
    monkeypatch.setenv(name, str(value))
    assert read() == value
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            read()
    monkeypatch.delenv(name)
    assert read() == default() > 0


def test_group_budget_is_set_at_import():
    assert K.group_bytes() == F.GROUP_BYTES
    assert K.channel_group_bytes() == F.CHANNEL_GROUP_BYTES
    assert K.one_row_bytes() == F.ONE_ROW_BYTES
    assert K.one_row_bytes(forward=True) == F.FORWARD_ONE_ROW_BYTES


def test_forward_one_row_budget_follows_the_cpu(monkeypatch, tmp_path):
    """Forward's one-row budget: ONE_ROW_BYTES on AMD family 26 and later (Zen 5,
    where it was measured to win), else 0; CBN_FORWARD_ONE_ROW_BYTES overrides
    it, refused by name when it is not a byte count."""
    info, read = tmp_path / "cpuinfo", F._cpu_model
    for text, model, wins in [
            (("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
              "model name\t: AMD EPYC\nprocessor\t: 1\nvendor_id\t: Other\ncpu family\t: 6\n"
              "model\t\t: 85\n"), ("AuthenticAMD", 26, 2), True),
            ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n",
             ("AuthenticAMD", 25, 17), False),
            ("vendor_id\t: GenuineIntel\ncpu family\t: 6\n", ("GenuineIntel", 6, None), False),
            ("vendor_id : AuthenticAMD\ncpu family : unknown\n", ("AuthenticAMD", None, None),
             False),
            ("", (None, None, None), False)]:
        info.write_text(text)
        assert read(str(info)) == model
        assert F._forward_one_row_wins(*model) is wins
        monkeypatch.setattr(F, "_cpu_model", lambda model=model: model)
        monkeypatch.delenv("CBN_FORWARD_ONE_ROW_BYTES", raising=False)
        assert F._forward_one_row_bytes() == (F._one_row_bytes() if wins else 0)
    assert read(str(tmp_path / "missing")) == (None, None, None)
    info.write_bytes(b"vendor_id\t: \xff\xfe\n")
    assert read(str(info)) == (None, None, None)
    _assert_overridden(monkeypatch, "CBN_FORWARD_ONE_ROW_BYTES", F._forward_one_row_bytes)


def _assert_overridden(monkeypatch, name, read):
    """read() returns a byte count set in the environment variable name, and
    refuses one that is not a byte count by name."""
    value = int(np.random.default_rng().integers(0, 1 << 30))
    monkeypatch.setenv(name, str(value))
    assert read() == value
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            read()


def test_channel_group_budget_follows_the_cpu(monkeypatch):
    """A long-run backward channel is a group alone up to half the L2 cache on
    Intel CPUs (where it was measured to win), never elsewhere;
    CBN_CHANNEL_GROUP_BYTES overrides either, refused by name when it is not a
    byte count."""
    l2 = F._cache_sizes().get(2, 1 << 20)
    monkeypatch.delenv("CBN_CHANNEL_GROUP_BYTES", raising=False)
    for model, want in [(("GenuineIntel", 6, 167), l2 // 2), (("GenuineIntel", None, None), l2 // 2),
                        (("AuthenticAMD", 25, 0x11), 0), (("AuthenticAMD", 26, 2), 0),
                        ((None, None, None), 0)]:
        assert F._channel_group_wins(model[0]) is (want > 0)
        monkeypatch.setattr(F, "_cpu_model", lambda model=model: model)
        assert F._channel_group_bytes() == want
    _assert_overridden(monkeypatch, "CBN_CHANNEL_GROUP_BYTES", F._channel_group_bytes)


def test_stream_threshold_follows_the_cpu(monkeypatch):
    """Outputs stream from three eighths of the last-level cache on the Zen 4 EPYC
    (AMD family 25, models 0x10-0x1F, where it was measured), from half elsewhere
    (Zen 3 and Zen 5, Intel, unknown); CBN_STREAM_MIN_BYTES overrides either."""
    llc = F._last_level_cache_bytes()
    monkeypatch.delenv("CBN_STREAM_MIN_BYTES", raising=False)
    for model, share in [(("AuthenticAMD", 25, 0x11), (3, 8)), (("AuthenticAMD", 25, 0x10), (3, 8)),
                         (("AuthenticAMD", 25, 0x1F), (3, 8)), (("AuthenticAMD", 25, 0x01), (1, 2)),
                         (("AuthenticAMD", 25, 0x21), (1, 2)), (("AuthenticAMD", 25, None), (1, 2)),
                         (("AuthenticAMD", 26, 0x11), (1, 2)), (("GenuineIntel", 6, 0x11), (1, 2)),
                         ((None, None, None), (1, 2))]:
        assert F._stream_share(*model) == share
        monkeypatch.setattr(F, "_cpu_model", lambda model=model: model)
        assert F._stream_min_bytes() == llc * share[0] // share[1]
        monkeypatch.setenv("CBN_STREAM_MIN_BYTES", "12345")
        assert F._stream_min_bytes() == 12345
        monkeypatch.delenv("CBN_STREAM_MIN_BYTES")


def test_cache_sizes_read_sysfs(tmp_path):
    for name, level, kind, size in [("index0", 1, "Data", "48K"),
                                    ("index1", 1, "Instruction", "64K"),
                                    ("index2", 2, "Unified", "2048K"),
                                    ("index3", 3, "Unified", "480M"),
                                    ("index4", "x", "Unified", "1K")]:
        d = tmp_path / name
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert F._cache_sizes(str(tmp_path)) == {1: 48 << 10, 2: 2 << 20, 3: 480 << 20}
    assert F._cache_sizes(str(tmp_path / "missing")) == {}


def test_streams_rules(monkeypatch):
    """Outputs over rows (inner == 1) stream from their own thresholds (forward's
    y from ROWS_STREAM_MIN_BYTES, backward's dx from ROWS_DX_STREAM_MIN_BYTES),
    over runs of several values (or runs not said) from STREAM_MIN_BYTES."""
    rng = np.random.default_rng()
    rows_min, dx_min, runs_min = (int(v) for v in rng.integers(1, 1 << 40, size=3))
    monkeypatch.setattr(F, "STREAM_MIN_BYTES", runs_min)
    monkeypatch.setattr(F, "ROWS_STREAM_MIN_BYTES", rows_min)
    monkeypatch.setattr(F, "ROWS_DX_STREAM_MIN_BYTES", dx_min)
    inner = int(rng.integers(2, 1000))
    for backward, rows in ((False, rows_min), (True, dx_min)):
        assert F.streams(rows, 1, backward=backward)
        assert not F.streams(rows - 1, 1, backward=backward)
        assert F.streams(runs_min, inner, backward=backward)
        assert not F.streams(runs_min - 1, inner, backward=backward)
    assert F.streams(runs_min) and not F.streams(runs_min - 1)


@pytest.mark.parametrize("name, read, multiple", [
    ("CBN_ROWS_STREAM_MIN_BYTES", lambda: F._rows_stream_min_bytes(), 16),
    ("CBN_ROWS_DX_STREAM_MIN_BYTES", lambda: F._rows_dx_stream_min_bytes(), 8)])
def test_rows_stream_thresholds_follow_the_cpu(monkeypatch, name, read, multiple):
    """Outputs over rows stream from the smaller of STREAM_MIN_BYTES and a
    multiple of the L2 cache (forward 16, backward 8) on Intel CPUs (where it
    was measured to win), from STREAM_MIN_BYTES elsewhere; the environment
    variable overrides either, refused by name when it is not a byte count."""
    rng = np.random.default_rng()
    l2_bytes = multiple * F._cache_sizes().get(2, 1 << 20)
    monkeypatch.delenv(name, raising=False)
    # A general threshold above the L2 multiple (a large last-level cache) and one below.
    for stream_min in (int(rng.integers(l2_bytes + 1, 1 << 40)), int(rng.integers(0, l2_bytes))):
        monkeypatch.setenv("CBN_STREAM_MIN_BYTES", str(stream_min))
        for model in [("GenuineIntel", 6, 167), ("GenuineIntel", None, None),
                      ("AuthenticAMD", 25, 0x11), ("AuthenticAMD", 26, 2), (None, None, None)]:
            intel = model[0] == "GenuineIntel"
            assert F._rows_stream_wins(model[0]) is intel
            monkeypatch.setattr(F, "_cpu_model", lambda model=model: model)
            want = min(stream_min, l2_bytes) if intel else stream_min
            assert read() == want, (model, stream_min)
    _assert_overridden(monkeypatch, name, read)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["rows", "channels-last"])
def test_rows_streamed_alone_give_the_bits_of_cached_stores(monkeypatch, dtype, layout):
    """Only the outputs over rows streaming (ROWS_STREAM_MIN_BYTES and
    ROWS_DX_STREAM_MIN_BYTES 0, the general threshold out of reach): the
    functional and layer passes, on the direct path and the checked one (a
    strided input), give the cached-store bits."""
    rng = np.random.default_rng()
    C = int(rng.integers(1, 300))
    if layout == "rows":
        shape = (int(rng.integers(2, 400)), C)
    else:
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(2, 9)), C)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    mean, var = x.reshape(-1, C).mean(axis=0), x.reshape(-1, C).var(axis=0)

    def strided(a):
        return np.repeat(a, 2, axis=-1)[..., ::2]

    def run():
        out = []
        for xi, g in ((x, dy), (strided(x), strided(dy))):
            kw = {"axis": -1, "n_threads": int(rng.integers(1, 3))}
            out += F.batch_norm_train(xi, gamma, beta, **kw)
            out.append(F.batch_norm_eval(xi, mean, var, gamma, beta, **kw))
            for training in (True, False):
                out += F.batch_norm_backward(g, xi, mean, var, gamma, beta,
                                             training=training, **kw)
            layer = BatchNorm(C, axis=-1, dtype=dtype, activation="relu")
            layer.gamma, layer.beta = gamma, beta
            out.append(layer(xi))
            out += [layer.backward(g), layer.dgamma.copy(), layer.dbeta.copy()]
            out.append(layer.eval()(xi))
        return out

    _stream_from(monkeypatch, 1 << 62)
    plain = run()
    monkeypatch.setattr(F, "ROWS_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(F, "ROWS_DX_STREAM_MIN_BYTES", 0)
    for a, b in zip(plain, run(), strict=True):
        np.testing.assert_array_equal(a, b)


# float64 NCHW batches whose streamed training forward goes by channel groups
# (_kernels.group_channels > 0; groups of 16 and 8 channels, uneven last ones).
GROUPED_SHAPES = [(2, 24, 64, 128), (3, 20, 100, 100)]


def _groups(shape):
    return K.group_channels(shape[0], shape[1], math.prod(shape[2:]), 8)


@pytest.mark.parametrize("shape", GROUPED_SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_grouped_layer_steps_give_the_same_numbers(monkeypatch, shape, relu):
    """Training steps of the layer by channel groups: the bits of the two passes."""
    assert _groups(shape) > 0
    rng = np.random.default_rng()
    xs = [rng.standard_normal(shape) * rng.uniform(0.5, 2) + rng.uniform(-3, 3)
          for _ in range(2)]
    dy = rng.standard_normal(shape)

    def run():
        layer = BatchNorm(shape[1], dtype=np.float64, activation="relu" if relu else None,
                          n_threads=2)
        out = []
        for x in xs:
            out.append(layer(x))
            out.append(layer.backward(dy))
        return out + [layer.running_mean.copy(), layer.running_var.copy()]

    plain, streamed = _both(run, monkeypatch)
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", GROUPED_SHAPES)
@pytest.mark.parametrize("which", ["first", "last"])
def test_grouped_nan_names_the_channel_and_keeps_the_state(stream_always, shape, which):
    """A NaN in one group: FloatingPointError naming its channel; the layer's
    running statistics, gamma and beta, and x itself, stay as they were."""
    assert _groups(shape) > 0
    rng = np.random.default_rng()
    C = shape[1]
    layer = BatchNorm(C, dtype=np.float64)
    layer(rng.standard_normal(shape) + 1)
    state = {k: np.copy(v) for k, v in layer.state_dict().items()}
    x = rng.standard_normal(shape)
    c = 0 if which == "first" else C - 1
    x[rng.integers(shape[0]), c, rng.integers(shape[2]), rng.integers(shape[3])] = np.nan
    x_before = x.copy()
    with pytest.raises(FloatingPointError, match=f"channel {c}"):
        layer(x)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    np.testing.assert_array_equal(x, x_before)
    with pytest.raises(FloatingPointError, match=f"channel {c}"):
        F.batch_norm_train(x, out=np.empty_like(x))
