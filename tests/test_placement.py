"""Outputs cbn allocates start apart from their inputs within a 4 KiB page
(``_kernels._fresh``): equal-sized arrays from malloc share their page offset,
which put x, dy and dx at the same cache-set index in every pass.
"""

import numpy as np
import pytest

import cbn
from cbn import _kernels
from cbn import functional as F

PAGE = 4096


def placed(rng, shape, dtype, offset):
    """A random array whose data starts ``offset`` bytes into a page."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 2 * PAGE, np.uint8)
    start = (offset - raw.ctypes.data) % PAGE
    a = raw[start:start + nbytes].view(dtype).reshape(shape)
    a[...] = rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)
    return a


def gap(a, b):
    return (a.ctypes.data - b.ctypes.data) % PAGE


def expected_shift(shape, dtype, axis=1):
    inner = int(np.prod(shape[axis + 1:]))
    row = shape[axis] * np.dtype(dtype).itemsize
    return 512 if inner != 1 or row % 2048 else 1024


CASES = [((256, 1024), np.float32), ((128, 512), np.float64), ((4096, 256), np.float32),
         ((300, 100), np.float64), ((8, 16, 24, 24), np.float32), ((6, 40, 17, 9), np.float64)]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_outputs_start_apart_from_the_inputs(shape, dtype):
    rng = np.random.default_rng()
    x = placed(rng, shape, dtype, int(rng.integers(0, PAGE // 64)) * 64)
    dy = placed(rng, shape, dtype, x.ctypes.data % PAGE)  # the usual case: same offset
    shift = expected_shift(shape, dtype)
    y, mean, var = F.batch_norm_train(x)
    assert gap(y, x) == shift
    assert gap(F.batch_norm_eval(x, mean, var), x) == shift
    dx = F.batch_norm_backward(dy, x, mean, var)[0]
    assert gap(dx, x) == shift
    for a in (y, dx):
        assert type(a) is np.ndarray and a.flags.c_contiguous and a.flags.writeable
        assert a.flags.aligned and a.shape == x.shape and a.dtype == x.dtype
        assert not np.shares_memory(a, x) and not np.shares_memory(a, dy)
    # the values are those of a float64 reference, wherever they were placed
    axes = (0,) + tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, atol=tol)


def test_dx_keeps_clear_of_dy_too():
    rng = np.random.default_rng()
    shape, dtype = (128, 1024), np.float32
    x = placed(rng, shape, dtype, 0)
    dy = placed(rng, shape, dtype, 1024)  # where dx would go
    _, mean, var = F.batch_norm_train(x)
    dx = F.batch_norm_backward(dy, x, mean, var)[0]
    assert gap(dx, x) == 2048
    assert min(gap(dx, dy), gap(dy, dx)) >= 256


@pytest.mark.parametrize("path", ["direct", "checked"])
def test_layer_outputs_are_placed(path):
    rng = np.random.default_rng()
    C, dtype = 1024, np.float32
    x = placed(rng, (64, C), dtype, 64)
    shift = 1024
    if path == "checked":  # a Fortran-ordered input takes the checked path
        x = np.asfortranarray(x)  # normalized where it lies, as runs of one channel
        shift = 512
    layer = cbn.BatchNorm(C)
    y = layer(x)
    dx = layer.backward(rng.standard_normal(x.shape).astype(dtype))
    x_c = layer._cache[0]
    assert x_c is x  # no copy on either path
    assert gap(y, x_c) == shift and gap(dx, x_c) in (shift, 2 * shift)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)


def test_small_outputs_are_plain_allocations():
    rng = np.random.default_rng()
    x = rng.standard_normal((64, 100)).astype(np.float32)  # below NEAR_MIN_BYTES
    y = F.batch_norm_train(x)[0]
    assert y.base is None and y.flags.owndata


def test_empty_near_refuses_non_arrays():
    x = np.zeros((4, 3))
    x3 = x.reshape(4, 3, 1)
    with pytest.raises(TypeError):
        _kernels.empty_near([1.0], x3)
    with pytest.raises(TypeError):
        _kernels.empty_near(x, "x")
    with pytest.raises(ValueError, match="outer, C, inner"):
        _kernels.empty_near(x, x)
