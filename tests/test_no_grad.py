"""cbn.no_grad: forwards inside keep nothing for backward and leave the forward
kept before in place (as torch.no_grad keeps no graph)."""

import gc
import threading
import weakref

import numpy as np
import pytest
from test_concurrency import _interrupted_at

import cbn
from cbn import nn
from cbn.trainer import evaluate, predict


def batch(rng, shape, dtype=np.float64):
    return (rng.standard_normal(shape) * rng.uniform(0.5, 2) + rng.uniform(-1, 1)).astype(dtype)


@pytest.mark.parametrize("shape, axis", [((12, 5), 1), ((4, 5, 3, 3), 1), ((4, 3, 3, 5), -1)])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_differentiates_the_forward_before_a_no_grad_one(shape, axis, mode, relu,
                                                                  dtype):
    """A validation forward inside no_grad between a training forward and its
    backward: dx, dgamma, dbeta are those of the training forward alone; a
    training-mode forward inside still updates the running statistics."""
    rng = np.random.default_rng()
    x, other, dy = (batch(rng, shape, dtype) for _ in range(3))
    bn = cbn.BatchNorm(5, dtype=dtype, axis=axis, activation=relu)
    ref = cbn.BatchNorm(5, dtype=dtype, axis=axis, activation=relu)
    gamma, beta = rng.uniform(0.5, 2, 5), rng.uniform(-1, 1, 5)
    for layer in (bn, ref):
        layer.gamma, layer.beta = gamma, beta
        layer(x)
    with cbn.no_grad():
        assert not cbn.is_grad_enabled()
        if mode == "eval":
            bn.eval()
        elif mode == "frozen":
            bn.freeze()
        bn(other)
        bn.train().unfreeze()
    np.testing.assert_array_equal(bn.backward(dy), ref.backward(dy))
    np.testing.assert_array_equal(bn.dgamma, ref.dgamma)
    np.testing.assert_array_equal(bn.dbeta, ref.dbeta)
    assert bn.num_batches_tracked == ref.num_batches_tracked + (mode == "train")
    if mode == "train":
        ref(other)
        np.testing.assert_array_equal(bn.running_mean, ref.running_mean)
        np.testing.assert_array_equal(bn.running_var, ref.running_var)


def test_a_no_grad_forward_keeps_no_reference_to_its_input():
    rng = np.random.default_rng()
    bn = cbn.BatchNorm(4, dtype=np.float64).eval()
    x = batch(rng, (8, 4))
    alive = weakref.ref(x)
    with cbn.no_grad():
        bn(x)
    del x
    gc.collect()
    assert alive() is None
    with pytest.raises(RuntimeError, match="before"):
        bn.backward(batch(rng, (8, 4)))
    y = batch(rng, (8, 4))
    kept = weakref.ref(y)
    bn(y)  # outside: kept for backward, as before
    del y
    gc.collect()
    assert kept() is not None


def test_blocks_nest_restore_after_errors_and_decorate():
    assert cbn.is_grad_enabled()
    with cbn.no_grad():
        with cbn.no_grad():
            assert not cbn.is_grad_enabled()
        assert not cbn.is_grad_enabled()
    assert cbn.is_grad_enabled()
    with pytest.raises(KeyError), cbn.no_grad():
        raise KeyError("inside")
    assert cbn.is_grad_enabled()

    @cbn.no_grad()
    def inside():
        return cbn.is_grad_enabled()

    assert inside() is False and cbn.is_grad_enabled()


def test_the_mode_is_per_thread():
    """A thread's forwards keep their batch while another thread is in no_grad."""
    rng = np.random.default_rng()
    seen = {}

    def work():
        seen["enabled"] = cbn.is_grad_enabled()
        bn = cbn.BatchNorm(3, dtype=np.float64)
        bn(batch(rng, (6, 3)))
        bn.backward(batch(rng, (6, 3)))  # raises if the forward kept nothing
        seen["ok"] = True

    with cbn.no_grad():
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert seen == {"enabled": True, "ok": True}


def test_an_interrupt_anywhere_in_a_block_leaves_the_mode_as_it_was():
    rng = np.random.default_rng()
    bn = cbn.BatchNorm(3, dtype=np.float64).eval()
    x = batch(rng, (6, 3))

    @cbn.no_grad()
    def decorated():
        bn(x)

    def block():
        with cbn.no_grad():
            bn(x)

    for call in (block, decorated):
        k, interrupted = 0, True
        while interrupted:
            k += 1
            interrupted = _interrupted_at(k, call)
            assert cbn.is_grad_enabled(), (call.__name__, k)
        assert k > 3


def test_nn_layers_keep_their_training_forward():
    """An mlp: forward on a training batch, a no_grad forward in eval mode,
    backward: the gradients of the training batch alone; nothing of the
    no_grad batch stays referenced."""
    rng = np.random.default_rng()
    for activation in ("relu", "sigmoid", "tanh"):
        model = nn.mlp([6, 7, 5, 3], activation=activation, rng=int(rng.integers(1 << 30)),
                       dtype=np.float64)
        twin = nn.mlp([6, 7, 5, 3], activation=activation, dtype=np.float64,
                      rng=0)
        twin.load_state_dict(model.state_dict())
        X, dz = batch(rng, (10, 6)), batch(rng, (10, 3))
        model(X)
        twin(X)
        other = batch(rng, (4, 6))
        alive = weakref.ref(other)
        with cbn.no_grad():
            model.eval()(other)
            model.train()
        del other
        gc.collect()
        assert alive() is None
        np.testing.assert_array_equal(model.backward(dz), twin.backward(dz))
        for name, g in model.grads.items():
            np.testing.assert_array_equal(g, twin.grads[name])


def test_predict_and_evaluate_keep_no_batch_and_leave_the_training_forward():
    rng = np.random.default_rng()
    model = nn.mlp([6, 8, 3], rng=1, dtype=np.float64)
    twin = nn.mlp([6, 8, 3], rng=1, dtype=np.float64)
    X, dz = batch(rng, (10, 6)), batch(rng, (10, 3))
    model(X)
    twin(X)
    test = batch(rng, (9, 6))
    alive = weakref.ref(test)
    predict(model, test, batch_size=4)
    evaluate(model, test, rng.integers(0, 3, 9), batch_size=4)
    del test
    gc.collect()
    assert alive() is None
    np.testing.assert_array_equal(model.backward(dz), twin.backward(dz))
