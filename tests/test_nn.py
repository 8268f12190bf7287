"""Tests of cbn.nn: layers, Sequential, the loss and the mlp builder."""

import numpy as np
import pytest

from cbn.functional import batch_norm_train
from cbn.layer import BatchNorm
from cbn.nn import (
    Linear,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
    as_generator,
    mlp,
)
from cbn.testing import numerical_grad


def relu_margin(model, x):
    """The smallest |pre-activation| of any ReLU (fused into BatchNorm or not) on x."""
    margin, h = np.inf, x
    for layer in model:
        if isinstance(layer, ReLU):
            margin = min(margin, float(np.abs(h).min()))
        elif isinstance(layer, BatchNorm) and layer.activation == "relu":
            z = batch_norm_train(h, layer.gamma, layer.beta, eps=layer.eps)[0]
            margin = min(margin, float(np.abs(z).min()))
        h = layer.forward(h)
    return margin


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_sequential_gradient_matches_finite_differences(activation, batch_norm):
    rng = np.random.default_rng()
    # Fresh draws until no ReLU pre-activation is within reach of the kink for a
    # step of 1e-6 (a difference straddling it is off by up to 20%: about 1e-4 of
    # runs drew one within 1e-6).
    for _ in range(1000):
        model = mlp([5, 7, 6, 4], batch_norm=batch_norm, activation=activation,
                    rng=rng, dtype=np.float64)
        for key, p in model.params.items():
            # move gamma/beta/b off their initial 1 and 0: with b = 0, a sample whose
            # hidden units are all dead would sit exactly on the next ReLU's kink
            name = key.rsplit(".", 1)[-1]
            if name == "gamma":
                p[...] = rng.uniform(0.5, 1.5, p.shape)
            elif name in ("beta", "b"):
                p[...] = rng.normal(0, 0.3, p.shape)
        x = rng.standard_normal((9, 5))
        y = rng.integers(0, 4, 9)
        if activation != "relu" or relu_margin(model, x) > 1e-4:
            break
    assert activation != "relu" or relu_margin(model, x) > 1e-4, "no draw kept clear of the kink"
    crit = SoftmaxCrossEntropy()
    model.train()

    def loss():
        return crit.forward(model.forward(x), y)

    _, dlogits = crit(model.forward(x), y)
    dx = model.backward(dlogits)
    analytic = {k: g.copy() for k, g in model.grads.items()}
    for key, p in model.params.items():
        np.testing.assert_allclose(analytic[key], numerical_grad(loss, p), rtol=1e-5, atol=1e-7,
                                   err_msg=key)
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-7)


def test_loss_gradient_and_stability():
    rng = np.random.default_rng()
    logits = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    crit = SoftmaxCrossEntropy()
    loss, grad = crit(logits, y)
    naive = -np.mean(np.log(np.exp(logits)[np.arange(6), y] / np.exp(logits).sum(1)))
    assert loss == pytest.approx(naive, rel=1e-12)
    np.testing.assert_allclose(grad, numerical_grad(lambda: crit.forward(logits, y), logits),
                               rtol=1e-6, atol=1e-9)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        big = np.array([[1e4, -1e4, 0.0], [-5e3, 5e3, 1.0]], np.float32)
        loss, grad = crit(big, np.array([1, 1]))
    assert np.isfinite(loss) and loss > 1e3 and np.isfinite(grad).all()
    assert grad.dtype == np.float32


def test_loss_rejects_bad_labels():
    crit = SoftmaxCrossEntropy()
    logits = np.random.default_rng().standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        crit.forward(logits, np.array([0, 4, 1]))
    with pytest.raises(TypeError, match="integer"):
        crit.forward(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        crit.forward(logits, np.array([0, 1]))
    with pytest.raises(RuntimeError, match="before forward"):
        SoftmaxCrossEntropy().backward()


@pytest.mark.parametrize("layer", [ReLU(), Sigmoid(), Tanh()])
def test_activation_backward(layer):
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 3))
    # off ReLU's kink: a step of 1e-6 straddling it is off by |w| / 2 (about 1e-5 of runs)
    x = np.copysign(np.maximum(np.abs(x), 1e-3), x)
    w = rng.standard_normal((4, 3))
    layer.forward(x)
    dx = layer.backward(w)
    num = numerical_grad(lambda: float(np.sum(w * layer.forward(x))), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-9)


def test_sigmoid_does_not_overflow():
    x = np.array([[-1000.0, -30.0, 0.0, 30.0, 1000.0]], np.float32)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        y = Sigmoid().forward(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0, 1 / (1 + np.exp(30)), 0.5, 1 / (1 + np.exp(-30)), 1]],
                               rtol=1e-6, atol=1e-30)


def test_linear_forward_backward_and_init():
    rng = np.random.default_rng()
    layer = Linear(400, 300, rng=rng, init="he")
    assert layer.W.shape == (400, 300) and layer.W.dtype == np.float32
    assert layer.W.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    assert not layer.b.any()
    xav = Linear(400, 300, rng=rng, init="xavier", dtype=np.float64)
    assert xav.W.std() == pytest.approx(np.sqrt(2 / 700), rel=0.02)
    x = rng.standard_normal((5, 400)).astype(np.float32)
    layer.b[...] = rng.standard_normal(300)
    y = layer(x)
    np.testing.assert_allclose(y, x @ layer.W + layer.b, rtol=1e-5)
    dy = rng.standard_normal((5, 300)).astype(np.float32)
    dW_before = layer.dW
    dx = layer.backward(dy)
    assert layer.dW is dW_before  # written in place
    np.testing.assert_allclose(layer.dW, x.T @ dy, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.db, dy.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy @ layer.W.T, rtol=1e-4, atol=1e-4)
    assert set(Linear(3, 2, bias=False).params) == {"W"}


def test_linear_validation():
    layer = Linear(3, 2, rng=0)
    with pytest.raises(TypeError, match="dtype float32"):
        layer.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        layer.forward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="init"):
        Linear(3, 2, init="lecun")
    with pytest.raises(TypeError, match="in_features"):
        Linear(3.0, 2)
    with pytest.raises(ValueError, match="out_features"):
        Linear(3, 0)
    with pytest.raises(TypeError, match="dtype"):
        Linear(3, 2, dtype=np.int32)
    with pytest.raises(RuntimeError, match="before forward"):
        Linear(3, 2).backward(np.ones((1, 2), np.float32))
    with pytest.raises(TypeError, match="rng"):
        as_generator(1.5)


def test_same_seed_same_weights_generator_shared():
    a, b = Linear(4, 3, rng=7), Linear(4, 3, rng=7)
    np.testing.assert_array_equal(a.W, b.W)
    gen = np.random.default_rng(7)
    c, d = Linear(4, 3, rng=gen), Linear(4, 3, rng=gen)
    assert not np.array_equal(c.W, d.W)


def test_mlp_structure_relu_bn_fused():
    model = mlp([8, 6, 5, 3], rng=0)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Linear", "BatchNorm", "Linear", "BatchNorm", "Linear"]
    assert not model[0].bias and not model[2].bias and model[4].bias
    assert model[1].activation == "relu"
    assert model[0].init == "he" and model[4].init == "xavier"
    assert list(model.params) == ["0.W", "1.gamma", "1.beta", "2.W", "3.gamma", "3.beta",
                                  "4.W", "4.b"]
    assert list(model.grads) == list(model.params)


@pytest.mark.parametrize("activation, cls", [("sigmoid", Sigmoid), ("tanh", Tanh)])
def test_mlp_structure_other_activations(activation, cls):
    model = mlp([8, 6, 3], activation=activation, rng=0)
    assert [type(x) for x in model][1:] == [BatchNorm, cls, Linear]
    assert model[1].activation is None and model[0].init == "xavier"
    plain = mlp([8, 6, 3], activation=activation, batch_norm=False, rng=0)
    assert [type(x) for x in plain] == [Linear, cls, Linear]
    assert plain[0].bias


def test_mlp_bn_and_plain_start_from_the_same_weights():
    bn = mlp([10, 7, 7, 4], batch_norm=True, rng=3)
    plain = mlp([10, 7, 7, 4], batch_norm=False, rng=3)
    w_bn = [layer.W for layer in bn if isinstance(layer, Linear)]
    w_plain = [layer.W for layer in plain if isinstance(layer, Linear)]
    for a, b in zip(w_bn, w_plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_mlp_validation():
    with pytest.raises(ValueError, match="sizes"):
        mlp([5])
    with pytest.raises(ValueError, match="activation"):
        mlp([5, 3], activation="gelu")
    with pytest.raises(TypeError, match=r"sizes\[1\]"):
        mlp([5, "3", 2])


def test_sequential_params_are_the_layer_arrays_and_modes_propagate():
    model = mlp([6, 5, 3], rng=1, dtype=np.float64)
    params = model.params
    assert params["0.W"] is model[0].W and params["1.gamma"] is model[1].gamma
    assert model.grads["1.beta"] is model[1].dbeta
    assert model.eval() is model and not model.training
    assert all(not layer.training for layer in model)
    model.train()
    assert all(layer.training for layer in model)


def test_sequential_state_dict_round_trip():
    rng = np.random.default_rng()
    a = mlp([6, 5, 3], rng=rng, dtype=np.float64)
    b = mlp([6, 5, 3], rng=rng, dtype=np.float64)
    a.forward(rng.standard_normal((8, 6)))  # non-trivial running statistics
    b.load_state_dict(a.state_dict())
    x = rng.standard_normal((4, 6))
    np.testing.assert_array_equal(a.eval().forward(x), b.eval().forward(x))
    with pytest.raises(ValueError, match="names no layer"):
        b.load_state_dict({"9.W": np.zeros(1)})


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        Sequential(ReLU(), object())


def test_relu_at_infinities_and_nan_follows_pytorch():
    # x * mask made -inf a NaN, and an infinite dy where x <= 0 a NaN gradient.
    rng = np.random.default_rng()
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((4, 6)).astype(dtype)
        x[0, :3] = [-np.inf, np.inf, np.nan]
        relu = ReLU()
        y = relu(x)
        assert y.dtype == dtype
        assert y[0, 0] == 0 and y[0, 1] == np.inf and np.isnan(y[0, 2])
        np.testing.assert_array_equal(y[1:], np.maximum(x[1:], 0))
        dy = rng.standard_normal(x.shape).astype(dtype)
        dy[x <= 0] = np.inf  # masked: no gradient passes, however large
        dx = relu.backward(dy)
        assert dx.dtype == dtype
        np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))
        assert np.isfinite(dx[x <= 0]).all()
