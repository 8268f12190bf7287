"""Frozen statistics inside a model: fine-tuning keeps BN's running statistics fixed."""

import numpy as np
import pytest

import cbn
from cbn import reference as R
from cbn.nn import SoftmaxCrossEntropy, mlp
from cbn.optim import SGD
from cbn.testing import numerical_grad
from cbn.trainer import fit


def _bn_layers(model):
    return [layer for layer in model if isinstance(layer, cbn.BatchNorm)]


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_parent_train_does_not_unfreeze_and_fit_keeps_statistics(activation):
    rng = np.random.default_rng(11)
    X = rng.standard_normal((96, 12)).astype(np.float32)
    y = rng.integers(0, 4, 96)
    model = mlp([12, 16, 8, 4], batch_norm=True, activation=activation, rng=3)
    fit(model, X, y, epochs=2, batch_size=16, verbose=0,
        optimizer=SGD(model.params, model.grads, lr=0.05))
    for bn in _bn_layers(model):
        bn.freeze()
    frozen_stats = [(bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked)
                    for bn in _bn_layers(model)]
    gammas = [bn.gamma.copy() for bn in _bn_layers(model)]
    model.eval().train()  # a parent's mode switches must not undo freeze()
    assert all(bn.frozen and bn.training for bn in _bn_layers(model))
    fit(model, X, y, epochs=2, batch_size=16, verbose=0,
        optimizer=SGD(model.params, model.grads, lr=0.05))
    for bn, (mean, var, tracked), gamma in zip(_bn_layers(model), frozen_stats, gammas):
        assert np.array_equal(bn.running_mean, mean) and np.array_equal(bn.running_var, var)
        assert bn.num_batches_tracked == tracked
        assert not np.array_equal(bn.gamma, gamma), "gamma must still learn while frozen"


def test_frozen_training_equals_eval_mode_forward_and_backward():
    rng = np.random.default_rng(12)
    layer = cbn.BatchNorm(5, dtype=np.float64, activation="relu")
    for _ in range(3):
        layer(rng.standard_normal((8, 5)) * 2 + 1)
    layer.gamma[:] = rng.uniform(0.5, 2, 5)
    layer.beta[:] = rng.standard_normal(5)
    x = rng.standard_normal((7, 5)) * 2 + 1
    dy = rng.standard_normal((7, 5))
    y_frozen = layer.freeze()(x)
    dx_frozen = layer.backward(dy)
    grads_frozen = layer.dgamma.copy(), layer.dbeta.copy()
    y_eval = layer.unfreeze().eval()(x)
    dx_eval = layer.backward(dy)
    assert np.array_equal(y_frozen, y_eval) and np.array_equal(dx_frozen, dx_eval)
    assert np.array_equal(grads_frozen[0], layer.dgamma)
    ref_dx, ref_dgamma, ref_dbeta = R.backward_eval(
        dy, x, layer.running_mean, layer.running_var, layer.gamma, layer.beta, relu=True)
    np.testing.assert_allclose(dx_frozen, ref_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads_frozen[0], ref_dgamma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads_frozen[1], ref_dbeta, rtol=1e-12, atol=1e-12)


def test_frozen_model_gradient_check():
    """Central differences through a whole model whose BN is frozen (float64)."""
    rng = np.random.default_rng(13)
    model = mlp([6, 5, 3], batch_norm=True, activation="sigmoid", rng=4, dtype=np.float64)
    X = rng.standard_normal((10, 6))
    y = rng.integers(0, 3, 10)
    model(X)  # one training step's statistics, then freeze them
    bn = _bn_layers(model)[0].freeze()
    bn.gamma[:] = rng.uniform(0.5, 1.5, bn.num_features)
    loss_fn = SoftmaxCrossEntropy()

    def loss():
        return loss_fn.forward(model.forward(X), y)

    loss()
    model.backward(loss_fn.backward())
    grads = {k: v.copy() for k, v in model.grads.items()}
    for name, param in model.params.items():
        numeric = numerical_grad(loss, param)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)
    assert bn.num_batches_tracked == 1
