"""Threads, interrupts and copies: a layer is never left stuck, torn or silently
differentiating another call's batch.

Interrupts are injected deterministically: a trace hook raises
KeyboardInterrupt at the k-th event of a call, for every k: the start and
end of each Python function and the return of each C function, the points
where CPython delivers a Ctrl-C (it checks for signals when a function
starts and after a call returns, not between other instructions).
"""

import copy
import functools
import gc
import os
import pickle
import sys
import threading
import zipfile

import numpy as np
import pytest

import cbn
from cbn import _kernels, io, nn
from cbn.layer import BatchNorm


def _batch(rng, shape=(16, 5), dtype=np.float32):
    return (rng.standard_normal(shape) * 1.5 + rng.standard_normal(shape[1])[None]).astype(dtype)


def _interrupted_at(k, call):
    """Run ``call()`` with a KeyboardInterrupt raised at its k-th traced event
    (a Python function's start or return, a C function's return). Returns
    True if it was interrupted, False if it finished before the k-th event."""
    count = [0]
    here = sys._getframe()

    def hit(frame):
        if frame is here:  # installing or removing the hooks
            return
        count[0] += 1
        if count[0] == k:
            sys.settrace(None)
            sys.setprofile(None)
            raise KeyboardInterrupt

    def tracer(frame, event, arg):
        if event in ("call", "return"):
            hit(frame)
        return tracer

    def profiler(frame, event, arg):
        if event == "c_return":
            hit(frame)

    previous = sys.gettrace()  # pytest's or a coverage tool's, put back after
    try:
        sys.settrace(tracer)
        sys.setprofile(profiler)
        call()
    except BaseException as exc:
        # Library code may turn it into another error while cleaning up
        # (zipfile, closing an archive with an entry half-written).
        if not _caused_by_interrupt(exc):
            raise
        return True
    finally:
        sys.setprofile(None)
        sys.settrace(previous)
    return False


def _caused_by_interrupt(exc):
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def _state(bn):
    return (bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked)


# Rows through the direct kernel call, NCHW maps, channels-last maps (axis=-1).
LAYOUTS = {"rows": ((16, 5), 1), "maps": ((6, 5, 3, 2), 1), "channels-last": ((6, 3, 2, 5), -1)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_an_interrupt_anywhere_in_a_training_step_leaves_the_layer_usable_and_whole(
        momentum, dtype, layout):
    """A Ctrl-C at any point of forward or backward: the next call works (the
    guard is never left taken), and the running statistics and their count
    changed together or not at all."""
    rng = np.random.default_rng()
    shape, axis = LAYOUTS[layout]

    def batch():
        return (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)

    def layer():
        return BatchNorm(5, momentum=momentum, dtype=dtype, axis=axis)

    x, dy = batch(), batch()
    for step in ("forward", "backward"):
        k, interrupted = 0, True
        while interrupted:
            k += 1
            bn = layer()
            bn(batch())  # running statistics away from their initial values
            if step == "backward":
                bn(x)
            before = _state(bn)
            interrupted = _interrupted_at(k, functools.partial(bn, x) if step == "forward"
                                          else functools.partial(bn.backward, dy))
            after = _state(bn)
            if step == "forward" and after[2] != before[2]:
                assert after[2] == before[2] + 1
                ref = layer()
                ref.load_state_dict(dict(zip(
                    ("running_mean", "running_var", "num_batches_tracked"), before),
                    gamma=bn.gamma, beta=bn.beta))
                ref(x)
                np.testing.assert_array_equal(after[0], ref.running_mean)
                np.testing.assert_array_equal(after[1], ref.running_var)
            else:
                for a, b in zip(before[:2], after[:2]):
                    np.testing.assert_array_equal(a, b)
            bn(x)  # usable: not "in use by another thread"
            bn.backward(dy)
        assert k > 5, "the hook never reached the call"


# An interrupted np.savez leaves a zipfile whose __del__ complains (stdlib).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_anywhere_in_save_leaves_no_temporary_file_or_descriptor(tmp_path):
    bn = BatchNorm(7)
    bn(_batch(np.random.default_rng(), (9, 7)))
    target = tmp_path / "bn.npz"
    bn.save(target)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    k, interrupted = 0, True
    while interrupted:
        k += 1
        interrupted = _interrupted_at(k, lambda: bn.save(target))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.npz"], k
        BatchNorm.load(target)  # the destination stays whole
    assert k > 20
    gc.collect()
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds  # no descriptor left open


def test_guard_shared_and_exclusive():
    guard = _kernels.Guard("in use")
    with guard.shared, guard.shared:
        assert guard.holding == 2
        with pytest.raises(RuntimeError, match="in use"), guard:
            pass
    assert guard.holding == 0
    with guard:
        assert guard.holding == -1
        for g in (guard, guard.shared):
            with pytest.raises(RuntimeError, match="in use"), g:
                pass
    assert guard.holding == 0


def test_evaluation_forwards_may_overlap_but_nothing_that_changes_the_layer():
    """A second thread's call is simulated by holding the guard's shared side,
    as an evaluation forward does, so the test does not depend on timing."""
    rng = np.random.default_rng()
    bn = BatchNorm(5)
    bn(_batch(rng))
    bn.eval()
    x = _batch(rng)
    expected = bn(x)
    before = _state(bn) + (bn.gamma.copy(), bn.eps)
    with bn._busy.shared:
        np.testing.assert_array_equal(bn(x), expected)  # eval forwards share
        bn.state_dict()
        for change in (lambda: bn.train(), lambda: setattr(bn, "eps", 1e-3),
                       lambda: setattr(bn, "gamma", np.ones(5, np.float32)),
                       lambda: bn.load_state_dict(bn.state_dict()),
                       bn.reset_running_stats, bn.freeze, lambda: bn.backward(x)):
            with pytest.raises(RuntimeError, match="another thread"):
                change()
    after = _state(bn) + (bn.gamma.copy(), bn.eps)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    bn.train()
    with bn._busy.shared, pytest.raises(RuntimeError, match="another thread"):
        bn(x)  # a training forward updates the running statistics: alone
    assert _state(bn)[2] == before[2]


def test_evaluation_from_a_thread_pool_gives_every_thread_its_result():
    rng = np.random.default_rng()
    model = nn.mlp([6, 32, 32, 3], batch_norm=True, rng=1)
    for _ in range(3):
        model.forward(_batch(rng, (64, 6)))
    model.eval()
    batches = [_batch(rng, (256, 6)) for _ in range(8)]
    expected = [model.forward(b) for b in batches]
    got, errors = [None] * 8, []

    def work(i):
        try:
            for _ in range(20):
                got[i] = model.forward(batches[i])
        except Exception as exc:  # noqa: BLE001 - any error fails the test, below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_backward_refuses_a_forward_that_ran_in_another_thread():
    rng = np.random.default_rng()
    x = _batch(rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = BatchNorm(5)
    bn(x)
    _in_thread(lambda: bn(_batch(rng)))
    dgamma = bn.dgamma.copy()
    with pytest.raises(RuntimeError, match="ran in another thread"):
        bn.backward(dy)
    np.testing.assert_array_equal(bn.dgamma, dgamma)
    bn(x)
    bn.backward(dy)  # its own forward again
    lin = nn.Linear(5, 3, rng=0)
    lin.forward(x)
    _in_thread(lambda: lin.forward(x))
    with pytest.raises(RuntimeError, match="ran in another thread"):
        lin.backward(np.ones((16, 3), np.float32))


def test_running_statistics_and_count_move_together_in_one_call():
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    tracked = np.array([4], np.int64)
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    assert _kernels.ema_update(rm, rv, mean, var, 5.0, 0.5, tracked, 5) == 0
    assert tracked[0] == 5 and rm[2] == np.float32(1.5)
    huge = np.full(3, 1e300)
    assert _kernels.ema_update(rm, rv, huge, huge, 5.0, 0.5, tracked, 6) == 1
    assert tracked[0] == 5 and rm[2] == np.float32(1.5)  # nothing written
    with pytest.raises(ValueError, match="one value"):
        _kernels.ema_update(rm, rv, mean, var, 5.0, 0.5, np.zeros(2, np.int64), 1)


def test_a_layer_pickled_before_the_count_was_an_array_loads():
    bn = BatchNorm(3)
    bn(_batch(np.random.default_rng(), (6, 3)))
    state = bn.__getstate__()
    state["_num_batches_tracked"] = state.pop("_tracked")[0].item() + 41
    old = BatchNorm.__new__(BatchNorm)
    old.__setstate__(state)
    assert old.num_batches_tracked == 42
    old(_batch(np.random.default_rng(), (6, 3)))
    assert old.num_batches_tracked == 43 and bn.num_batches_tracked == 1


def test_sequential_refuses_a_layer_used_twice():
    relu = nn.ReLU()
    with pytest.raises(ValueError, match=r"layers\[3\] is the same ReLU object as layers\[1\]"):
        nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    bn = BatchNorm(4)
    inner = nn.Sequential(nn.Linear(4, 4, bias=False), bn)
    with pytest.raises(ValueError, match=r"layers\[1\]\.layers\[1\] is the same BatchNorm"):
        nn.Sequential(bn, inner)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.layers.append(model.layers[0])
    with pytest.raises(ValueError, match="same Linear object"):
        model.forward(np.ones((2, 4), np.float32))
    shared_copy = nn.Sequential(relu, copy.deepcopy(relu))  # a copy is another layer
    assert len(shared_copy.layers) == 2


@pytest.mark.parametrize("kind", [nn.Sigmoid, nn.Tanh])
def test_an_activation_output_written_into_before_backward_raises(kind):
    rng = np.random.default_rng()
    layer = kind()
    x = _batch(rng, (6, 40), np.float64)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    y *= 0.5
    with pytest.raises(RuntimeError, match="modified in place"):
        layer.backward(dy)
    y = layer.forward(x)
    np.testing.assert_array_equal(layer.backward(dy), dx)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_model_keep_no_forward_cache(how):
    rng = np.random.default_rng()
    model = nn.mlp([5, 8, 3], batch_norm=True, activation="sigmoid", rng=2)
    model.forward(_batch(rng, (10, 5)))
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    for layer in clone.layers:
        for name in getattr(layer, "_forward_cache", ()):
            assert getattr(layer, name) is None, (layer, name)
    dW = clone.layers[-1].dW.copy()
    with pytest.raises(RuntimeError, match="before forward"):
        clone.backward(np.ones((10, 3), np.float32))
    np.testing.assert_array_equal(clone.layers[-1].dW, dW)  # nothing half-done
    model.backward(np.ones((10, 3), np.float32))  # the original keeps its own


def test_a_file_whose_entries_expand_beyond_its_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.npz"
    BatchNorm(5).save(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("junk.npy", b"\0" * (64 << 20))
    assert path.stat().st_size < (1 << 20)
    with pytest.raises(ValueError, match="would expand to"):
        BatchNorm.load(path)
    with pytest.raises(ValueError, match="would expand to"):
        io.load_arrays(path, "cbn.BatchNorm")
    with pytest.raises(ValueError, match="would expand to"):
        cbn.nn.Sequential.load(path)
