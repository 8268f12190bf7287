"""Parity of ``cbn.BatchNorm`` with ``torch.nn.BatchNorm1d/2d/3d``.

PyTorch is the semantics cbn promises, so it is the ultimate oracle: random
configurations (momentum, affine, track_running_stats, dtype, rank) run
several training steps with an SGD update, then evaluation, comparing outputs,
running statistics, ``num_batches_tracked`` and the autograd gradients. Skipped
when torch is not installed (CI need not have it).
"""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cbn import BatchNorm  # noqa: E402

TORCH_BN = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensors: threads only add start-up time and run-to-run noise."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def assert_close(got, want, dtype, k=64, what=""):
    """Within k rounding errors of the dtype relative to the largest magnitude."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    atol = k * np.finfo(dtype).eps * (np.abs(want).max() + 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


def random_config(seed):
    rng = np.random.default_rng(seed)
    return dict(
        rank=int(rng.integers(2, 6)),
        C=int(rng.integers(1, 7)),
        momentum=[0.1, 0.5, None, 0.9, 0.0, 1.0][int(rng.integers(0, 6))],
        affine=bool(rng.integers(0, 2)),
        track=bool(rng.integers(0, 4) > 0),  # mostly True: running stats are the hard part
        dtype=[np.float32, np.float64][int(rng.integers(0, 2))],
    )


def make_torch(C, rank, momentum, affine, track, dtype):
    bn = getattr(torch.nn, TORCH_BN[rank])(C, eps=1e-5, momentum=momentum, affine=affine,
                                           track_running_stats=track)
    return bn.to(TORCH_DTYPE[dtype])


def compare_state(layer, bn, dtype):
    if bn.affine:
        assert_close(layer.gamma, bn.weight.detach().numpy(), dtype, what="gamma")
        assert_close(layer.beta, bn.bias.detach().numpy(), dtype, what="beta")
    if bn.track_running_stats:
        assert_close(layer.running_mean, bn.running_mean.numpy(), dtype, what="running_mean")
        assert_close(layer.running_var, bn.running_var.numpy(), dtype, what="running_var")
        assert layer.num_batches_tracked == int(bn.num_batches_tracked)
    else:
        assert layer.running_mean is None and layer.num_batches_tracked is None


def step(layer, bn, x, dy, dtype, channels_last=False, lr=0.05):
    """One forward/backward (and SGD step in training) on both; compare everything."""
    xt_np = np.moveaxis(x, -1, 1) if channels_last else x
    dyt_np = np.moveaxis(dy, -1, 1) if channels_last else dy
    xt = torch.tensor(np.ascontiguousarray(xt_np), requires_grad=True)
    if bn.affine:
        for p in bn.parameters():
            p.grad = None
    yt = bn(xt)
    yt.backward(torch.tensor(np.ascontiguousarray(dyt_np)))
    y = layer(x)
    dx = layer.backward(dy)
    want_y = yt.detach().numpy()
    want_dx = xt.grad.numpy()
    if channels_last:
        want_y, want_dx = np.moveaxis(want_y, 1, -1), np.moveaxis(want_dx, 1, -1)
    assert_close(y, want_y, dtype, what="y")
    assert_close(dx, want_dx, dtype, k=512, what="dx")
    if bn.affine:
        assert_close(layer.dgamma, bn.weight.grad.numpy(), dtype, k=512, what="dgamma")
        assert_close(layer.dbeta, bn.bias.grad.numpy(), dtype, k=512, what="dbeta")
        if bn.training:
            with torch.no_grad():
                for p in bn.parameters():
                    p -= lr * p.grad
            layer.gamma -= lr * layer.dgamma
            layer.beta -= lr * layer.dbeta
    compare_state(layer, bn, dtype)


def batch(rng, shape, dtype):
    """Fresh data; per-channel offsets and scales (axis 1), different every step."""
    C = shape[1]
    pshape = (1, C) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-4, 4, C).reshape(pshape)
    scale = rng.uniform(0.2, 3, C).reshape(pshape)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations_match_torch(seed):
    cfg = random_config(seed)
    rng = np.random.default_rng(seed_of("torch", seed))
    rank, C, dtype = cfg["rank"], cfg["C"], cfg["dtype"]
    bn = make_torch(C, rank, cfg["momentum"], cfg["affine"], cfg["track"], dtype)
    layer = BatchNorm(C, momentum=cfg["momentum"], affine=cfg["affine"],
                      track_running_stats=cfg["track"], dtype=dtype)

    def shape():
        s = [int(d) for d in rng.integers(2, 5, size=rank)]
        s[1] = C
        return tuple(s)

    for _ in range(4):
        x = batch(rng, shape(), dtype)
        step(layer, bn, x, rng.normal(size=x.shape).astype(dtype), dtype)
    bn.eval()
    layer.eval()
    for _ in range(2):
        x = batch(rng, shape(), dtype)
        step(layer, bn, x, rng.normal(size=x.shape).astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_channels_last_matches_torch_on_permuted_input(rank, dtype):
    """axis=-1 on (N, ..., C) is torch on the same data moved to (N, C, ...)."""
    rng = np.random.default_rng(seed_of("cl", rank, dtype.__name__))
    C = 3
    bn = make_torch(C, rank, 0.3, True, True, dtype)
    layer = BatchNorm(C, momentum=0.3, axis=-1, dtype=dtype)
    for training in (True, True, True, False):
        bn.train(training)
        layer.train(training)
        s = [int(d) for d in rng.integers(2, 5, size=rank)]
        s[-1] = C
        x = np.moveaxis(batch(rng, (s[0], C) + tuple(s[1:-1]), dtype), 1, -1)
        step(layer, bn, x, rng.normal(size=x.shape).astype(dtype), dtype, channels_last=True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_loading_a_torch_state_dict_gives_the_same_eval_outputs(dtype, affine):
    rng = np.random.default_rng(seed_of("sd", dtype.__name__, affine))
    C = 5
    bn = make_torch(C, 4, None, affine, True, dtype)
    opt = torch.optim.SGD(bn.parameters(), lr=0.1) if affine else None
    for _ in range(3):  # a trained torch layer: non-trivial weights and statistics
        xt = torch.tensor(batch(rng, (4, C, 3, 3), dtype))
        loss = (bn(xt) * torch.tensor(rng.normal(size=xt.shape).astype(dtype))).sum()
        if affine:
            opt.zero_grad()
            loss.backward()
            opt.step()
    state = {k: v.detach().numpy() for k, v in bn.state_dict().items()}
    assert ("weight" in state) == affine
    layer = BatchNorm(C, dtype=dtype, affine=affine, momentum=None)
    layer.load_state_dict(state)
    assert layer.num_batches_tracked == 3
    bn.eval()
    layer.eval()
    x = batch(rng, (3, C, 4, 2), dtype)
    with torch.no_grad():
        want = bn(torch.tensor(x)).numpy()
    assert_close(layer(x), want, dtype)
    # torch tensors themselves are accepted too
    direct = BatchNorm(C, dtype=dtype, affine=affine, momentum=None)
    direct.load_state_dict(bn.state_dict())
    assert np.array_equal(direct.eval()(x), layer(x))
    # and training continues the cumulative average exactly as torch would
    bn.train()
    layer.train()
    x = batch(rng, (3, C, 4, 2), dtype)
    with torch.no_grad():
        bn(torch.tensor(x))
    layer(x)
    compare_state(layer, bn, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_a_cbn_state_loads_into_torch_as_the_readme_shows(dtype):
    rng = np.random.default_rng(seed_of("to-torch", dtype.__name__))
    C = 4
    layer = BatchNorm(C, dtype=dtype)
    layer.gamma = rng.uniform(0.5, 1.5, C)
    layer.beta = rng.uniform(-0.5, 0.5, C)
    for _ in range(3):
        layer(batch(rng, (6, C, 2, 3), dtype))
    state = layer.state_dict()
    state["weight"], state["bias"] = state.pop("gamma"), state.pop("beta")
    bn = make_torch(C, 4, 0.1, True, True, dtype)
    bn.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    assert int(bn.num_batches_tracked) == 3
    bn.eval()
    x = batch(rng, (3, C, 2, 2), dtype)
    with torch.no_grad():
        want = bn(torch.tensor(x)).numpy()
    assert_close(layer.eval()(x), want, dtype)
