"""An input rewritten in place between forward and backward is refused.

BatchNorm and nn.Linear keep their forward's input by reference for backward
(as autograd saves tensors). Rewritten in place in between (a loader refilling
its buffer with the next batch, ``x *= 2``), it used to be differentiated
silently as if it were the forward's data. Both now compare a sample of eight
of its values (``cbn._kernels.sample_bits``) and raise ``RuntimeError``, as
PyTorch does from its version counters; nothing is written on refusal.
"""

import numpy as np
import pytest

import cbn
from cbn import _kernels
from cbn.nn import Linear

DTYPES = (np.float32, np.float64)


def _positions(n):
    return [k * (n - 1) // 7 for k in range(8)]


@pytest.mark.parametrize("dtype", DTYPES + (np.int16, np.complex128))
def test_sample_bits_reads_eight_values_spread_in_c_order(dtype):
    rng = np.random.default_rng()
    for _ in range(20):
        shape = tuple(rng.integers(1, 7, rng.integers(1, 5)))
        a = (rng.standard_normal(shape) * 100).astype(dtype)
        views = [a, np.asfortranarray(a), a[..., ::-1], a.T]
        if a.ndim >= 2 and a.shape[0] > 1:
            views.append(a[::2])
        for v in views:
            flat = np.ascontiguousarray(v).reshape(-1)
            want = flat[_positions(flat.size)].tobytes()
            assert _kernels.sample_bits(v) == want, (shape, v.strides)
    assert _kernels.sample_bits(np.empty((0, 3), np.float32)) == b""
    # Several arrays: their samples one after another (one call per backward).
    a, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(7).astype(dtype)
    empty = np.empty(0, dtype)
    assert _kernels.sample_bits(a, empty, b) == _kernels.sample_bits(a) + _kernels.sample_bits(b)
    assert _kernels.sample_bits() == b""
    with pytest.raises(TypeError):
        _kernels.sample_bits(a, [1.0, 2.0])


def _batch(rng, shape, axis, dtype):
    C = shape[axis]
    scale = rng.uniform(0.5, 2.0, C)
    x = rng.standard_normal(shape) * np.moveaxis(
        scale.reshape((C,) + (1,) * (len(shape) - 1)), 0, axis)
    return x.astype(dtype)


REWRITES = {
    "refilled": lambda x, rng: x.__setitem__(..., rng.standard_normal(x.shape)),
    "scaled": lambda x, rng: x.__imul__(x.dtype.type(2)),
    "shifted": lambda x, rng: x.__iadd__(x.dtype.type(1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 3, 6, 5), 1), ((4, 6, 5, 3), -1)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("how", sorted(REWRITES))
def test_batchnorm_refuses_a_rewritten_input(dtype, shape, axis, training, how):
    rng = np.random.default_rng()
    C = shape[axis]
    layer = cbn.BatchNorm(C, axis=axis, dtype=dtype)
    layer.gamma = rng.uniform(0.5, 1.5, C)
    layer.beta = rng.uniform(-0.5, 0.5, C)
    layer.forward(_batch(rng, shape, axis, dtype))  # running statistics off their start
    layer.train(training)
    x = _batch(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ref = cbn.BatchNorm(C, axis=axis, dtype=dtype)
    ref.load_state_dict(layer.state_dict())
    ref.train(training)
    ref.forward(x.copy())
    want = ref.backward(dy)

    layer.forward(x)
    dgamma, dbeta = layer.dgamma.copy(), layer.dbeta.copy()
    kept = x.copy()
    REWRITES[how](x, rng)
    with pytest.raises(RuntimeError, match="input of the forward pass was modified in place"):
        layer.backward(dy)
    assert layer.dgamma.tobytes() == dgamma.tobytes()
    assert layer.dbeta.tobytes() == dbeta.tobytes()
    # Put back, the forward's data is differentiated as before.
    x[...] = kept
    assert layer.backward(dy).tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_copies_a_scattered_input_so_rewriting_it_is_harmless(dtype):
    rng = np.random.default_rng()
    big = np.asfortranarray(_batch(rng, (12, 8), 1, dtype))
    x = big[:, ::2]  # values that do not fill one block: normalized from a copy
    dy = rng.standard_normal(x.shape).astype(dtype)
    a, b = cbn.BatchNorm(4, dtype=dtype), cbn.BatchNorm(4, dtype=dtype)
    b.forward(x.copy())
    a.forward(x)
    x[...] = 0  # the layer normalized (and keeps) its own C-ordered copy
    assert a.backward(dy).tobytes() == b.backward(dy).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_refuses_a_rewritten_input_of_another_memory_order(dtype):
    """A Fortran-ordered batch is normalized where it lies (no copy), so the
    layer keeps it as it keeps a C-ordered one, and refuses it rewritten."""
    rng = np.random.default_rng()
    x = np.asfortranarray(_batch(rng, (12, 4), 1, dtype))
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer = cbn.BatchNorm(4, dtype=dtype)
    layer.forward(x)
    want = cbn.BatchNorm(4, dtype=dtype)
    want.forward(x)
    want_dx = want.backward(dy)
    kept = x.copy()
    x *= 2
    with pytest.raises(RuntimeError, match="input of the forward pass was modified in place"):
        layer.backward(dy)
    x[...] = kept
    assert layer.backward(dy).tobytes() == want_dx.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", sorted(REWRITES))
def test_linear_refuses_a_rewritten_input(dtype, how):
    rng = np.random.default_rng()
    lin = Linear(6, 3, dtype=dtype)
    x = rng.standard_normal((10, 6)).astype(dtype)
    dy = rng.standard_normal((10, 3)).astype(dtype)
    lin.forward(x)
    dW = lin.dW.copy()
    kept = x.copy()
    REWRITES[how](x, rng)
    with pytest.raises(RuntimeError, match="input was modified in place"):
        lin.backward(dy)
    assert lin.dW.tobytes() == dW.tobytes()
    x[...] = kept
    dx = lin.backward(dy)
    np.testing.assert_allclose(lin.dW, kept.astype(np.float64).T @ dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ lin.W.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_an_optimizer_step_between_forward_and_backward_is_refused(dtype, optimizer,
                                                                  activation):
    """Optimizers update gamma and beta in place, which assignment checks do
    not see; backward would mix the forward's statistics with the new gamma
    (and, with the fused ReLU, a mask recomputed from the new gamma and beta)."""
    from cbn import optim

    rng = np.random.default_rng()
    C = int(rng.integers(2, 12))
    layer = cbn.BatchNorm(C, dtype=dtype, activation=activation)
    x = _batch(rng, (16, C), 1, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer.forward(x)
    layer.backward(dy)  # gradients for the step to use
    kind = optim.SGD if optimizer == "sgd" else optim.Adam
    opt = kind(layer.params, layer.grads, lr=0.1)
    layer.forward(x)
    dgamma, dbeta = layer.dgamma.copy(), layer.dbeta.copy()
    opt.step()  # in place, before the backward of this forward
    with pytest.raises(RuntimeError, match="gamma or beta was modified in place"):
        layer.backward(dy)
    assert layer.dgamma.tobytes() == dgamma.tobytes()
    assert layer.dbeta.tobytes() == dbeta.tobytes()
    layer.forward(x)  # a new forward differentiates again
    layer.backward(dy)


def test_beta_alone_modified_in_place_is_refused_too():
    rng = np.random.default_rng()
    layer = cbn.BatchNorm(5)
    x = _batch(rng, (8, 5), 1, np.float32)
    layer.forward(x)
    layer.params["beta"] += np.float32(0.5)
    with pytest.raises(RuntimeError, match="gamma or beta"):
        layer.backward(rng.standard_normal(x.shape).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_linear_refuses_an_optimizer_step_between_forward_and_backward(dtype, optimizer):
    from cbn import optim

    rng = np.random.default_rng()
    lin = Linear(int(rng.integers(2, 9)), int(rng.integers(2, 9)), dtype=dtype)
    x = rng.standard_normal((12, lin.in_features)).astype(dtype)
    dy = rng.standard_normal((12, lin.out_features)).astype(dtype)
    lin.forward(x)
    lin.backward(dy)  # gradients for the step to use
    kind = optim.SGD if optimizer == "sgd" else optim.Adam
    opt = kind(lin.params, lin.grads, lr=0.1)
    lin.forward(x)
    dW = lin.dW.copy()
    opt.step()
    with pytest.raises(RuntimeError, match="W was modified in place"):
        lin.backward(dy)
    assert lin.dW.tobytes() == dW.tobytes()
    lin.forward(x)
    lin.backward(dy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rewritten_names_what_changed(dtype):
    """layer.rewritten, backward's check in BatchNorm and nn.Linear: nothing, the
    input (also when the others changed too) or only the others."""
    from cbn.layer import rewritten

    rng = np.random.default_rng()
    x = rng.standard_normal((int(rng.integers(8, 40)), int(rng.integers(2, 9)))).astype(dtype)
    g, b = rng.standard_normal(x.shape[1]).astype(dtype), rng.standard_normal(3).astype(dtype)
    fp = _kernels.sample_bits(x, g, b)
    x0, g0 = x.copy(), g.copy()
    assert rewritten(fp, x, g, b) is None
    g *= 2
    assert rewritten(fp, x, g, b) == "others"
    x += 1
    assert rewritten(fp, x, g, b) == "input"
    g[...] = g0
    assert rewritten(fp, x, g, b) == "input"
    x[...] = x0
    assert rewritten(fp, x, g, b) is None  # the same bits back
    assert rewritten(_kernels.sample_bits(x), x) is None
