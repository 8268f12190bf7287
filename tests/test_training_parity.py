"""The training stack's arithmetic against its documented formulas and PyTorch.

* each optimizer (``cbn.optim``) against an independent NumPy transcription of
  the table in docs/trainer.md (Ng's forms: ``v = beta*v + (1-beta)*g``, eps
  outside the square root, Adam's bias correction with ``t`` from 1, coupled
  L2 decay that skips BN's ``gamma``/``beta`` unless ``decay_bn``), step by
  step from the first step, running averages included, and across a
  ``state_dict()``/``load_state_dict()`` resume (bit for bit, as documented);
* the same against ``torch.optim`` (``Momentum(lr)`` is ``SGD(lr*(1-beta),
  momentum=beta)``, ``RMSprop(beta)`` is ``RMSprop(alpha=beta)``);
* a whole MLP (Linear without bias, BatchNorm, ReLU/Sigmoid/Tanh, softmax
  cross-entropy, mean over the batch) against the same network in PyTorch,
  float64: losses, logits, every gradient, parameters after every step,
  running statistics, eval-mode outputs, over mini-batches that end in a
  partial one;
* ``fit`` against a hand-written loop over the same public pieces: the
  seeded permutations, the dropped one-sample batch (with batch norm only),
  History, validation in eval mode, modes restored;
* resuming from ``Sequential.save`` plus ``opt.state_dict()`` bit for bit.

The PyTorch parts are skipped when torch is not installed.
"""

import copy
import io
import zlib

import numpy as np
import pytest

from cbn import BatchNorm
from cbn.nn import Linear, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, Tanh, mlp
from cbn.optim import SGD, Adam, Momentum, RMSprop
from cbn.trainer import evaluate, fit, predict

NAMES = ("sgd", "momentum", "rmsprop", "adam")
CLASSES = {"sgd": SGD, "momentum": Momentum, "rmsprop": RMSprop, "adam": Adam}
BN_NAMES = ("gamma", "beta")


def seed_of(*parts):
    """A seed that depends on the test's parameters (fresh data per case, reproducible)."""
    return zlib.crc32(repr(parts).encode())


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; also keeps the run quiet on 2 cores
    yield torch
    torch.set_num_threads(old)


def close(got, want, what="", rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------
# Optimizers: an independent reference of docs/trainer.md's table


DEFAULTS = {"sgd": {"lr": 0.1}, "momentum": {"lr": 0.1, "beta": 0.9},
            "rmsprop": {"lr": 0.001, "beta": 0.999, "eps": 1e-8},
            "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}}
BUFFERS = {"sgd": (), "momentum": ("v",), "rmsprop": ("s",), "adam": ("v", "s")}


class Reference:
    """docs/trainer.md's update table, written out functionally (new arrays, no in-place).

    ``hp`` holds the constructor's keyword arguments.  ``state`` maps
    ``"v.<key>"``/``"s.<key>"`` to the running averages, named as
    ``state_dict()`` names them.
    """

    def __init__(self, name, params, **hp):
        self.name = name
        self.hp = {**DEFAULTS[name], "weight_decay": 0.0, "decay_bn": False, **hp}
        self.params = {k: np.array(p, np.float64) for k, p in params.items()}
        self.state = {f"{b}.{k}": np.zeros_like(p) for b in BUFFERS[name]
                      for k, p in self.params.items()}
        self.t = 0

    def step(self, grads):
        hp = self.hp
        self.t += 1
        t = self.t
        for k, p in self.params.items():
            g = np.asarray(grads[k], np.float64)
            if hp["weight_decay"] > 0 and (hp["decay_bn"] or k.split(".")[-1] not in BN_NAMES):
                g = g + hp["weight_decay"] * p
            if self.name == "sgd":
                p = p - hp["lr"] * g
            elif self.name == "momentum":
                v = hp["beta"] * self.state[f"v.{k}"] + (1 - hp["beta"]) * g
                self.state[f"v.{k}"] = v
                p = p - hp["lr"] * v
            elif self.name == "rmsprop":
                s = hp["beta"] * self.state[f"s.{k}"] + (1 - hp["beta"]) * g ** 2
                self.state[f"s.{k}"] = s
                p = p - hp["lr"] * g / (np.sqrt(s) + hp["eps"])
            else:
                v = hp["beta1"] * self.state[f"v.{k}"] + (1 - hp["beta1"]) * g
                s = hp["beta2"] * self.state[f"s.{k}"] + (1 - hp["beta2"]) * g ** 2
                self.state[f"v.{k}"], self.state[f"s.{k}"] = v, s
                v_hat = v / (1 - hp["beta1"] ** t)
                s_hat = s / (1 - hp["beta2"] ** t)
                p = p - hp["lr"] * v_hat / (np.sqrt(s_hat) + hp["eps"])
            self.params[k] = p


# Several shapes, a 0-d one among them, and BN-named keys (weight decay skips them).
SHAPES = {"0.W": (3, 5), "1.gamma": (5,), "1.beta": (5,), "2.W": (5, 2), "2.b": (2,),
          "3.k": (2, 3, 2), "4.scale": ()}


def random_hyper(name, rng):
    """Hyper-parameters far from the defaults, so that each one shows.

    eps is large next to sqrt(s) (the gradients are small), so that eps inside
    or outside the root, or added to s before the bias correction, differ.
    """
    hp = {"lr": float(10 ** rng.uniform(-2, -0.5)),
          "weight_decay": float(rng.choice([0.0, 0.0, 0.3])),
          "decay_bn": bool(rng.integers(0, 2))}
    if name == "momentum":
        hp["beta"] = float(rng.uniform(0.3, 0.95))
    elif name == "rmsprop":
        hp.update(beta=float(rng.uniform(0.3, 0.95)), eps=float(10 ** rng.uniform(-3, -1.5)))
    elif name == "adam":
        hp.update(beta1=float(rng.uniform(0.3, 0.9)), beta2=float(rng.uniform(0.5, 0.99)),
                  eps=float(10 ** rng.uniform(-3, -1.5)))
    return hp


def random_problem(rng):
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = {k: np.zeros(s) for k, s in SHAPES.items()}
    return params, grads


def fill_gradients(grads, rng):
    """New random gradients in place, at a random scale per step (as training gives)."""
    scale = 10 ** rng.uniform(-2.5, 0)
    for g in grads.values():
        g[...] = rng.standard_normal(g.shape) * scale


def assert_optimizer_matches(opt, ref, what):
    for k in ref.params:
        close(opt.params[k], ref.params[k], f"{what}: params[{k!r}]")
    state = opt.state_dict()
    assert int(state["t"]) == ref.t, what
    for key, want in ref.state.items():
        close(state[key], want, f"{what}: state {key!r}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", range(3))
def test_optimizer_follows_the_documented_update_and_resumes_bit_for_bit(name, case):
    rng = np.random.default_rng(seed_of("optim", name, case))
    hp = random_hyper(name, rng) if case else {}  # case 0: the defaults
    params, grads = random_problem(rng)
    ref = Reference(name, params, **hp)
    opt = CLASSES[name](params, grads, **hp)
    for step in range(1, 6):  # the first step included: t starts at 1
        fill_gradients(grads, rng)
        ref.step(grads)
        opt.step()
        assert_optimizer_matches(opt, ref, f"{name} {hp} step {step}")

    # Resume from a checkpoint written as the docs show (np.savez, np.load) into an
    # optimizer built with other (default) hyper-parameters over copies.
    buf = io.BytesIO()
    np.savez(buf, **opt.state_dict())
    buf.seek(0)
    params2 = {k: p.copy() for k, p in params.items()}
    grads2 = {k: g.copy() for k, g in grads.items()}
    opt2 = CLASSES[name](params2, grads2)
    with np.load(buf) as saved:
        opt2.load_state_dict(saved)
    for step in range(6, 10):
        fill_gradients(grads, rng)
        for k in grads:
            grads2[k][...] = grads[k]
        ref.step(grads)
        opt.step()
        opt2.step()
        assert_optimizer_matches(opt, ref, f"{name} {hp} step {step}")
        for k in params:  # documented: "continues bit for bit"
            np.testing.assert_array_equal(params2[k], params[k], err_msg=f"resumed {k} {step}")
    assert opt2.t == opt.t == 9


def torch_optimizer(torch, name, tensors, hp):
    """The torch.optim equivalent of ``CLASSES[name](**hp)``, as docs/trainer.md states it.

    Weight decay that skips BN's gamma and beta is a second parameter group.
    """
    hp = {**DEFAULTS[name], "weight_decay": 0.0, "decay_bn": False, **hp}
    wd = hp["weight_decay"]
    skip = [k for k in tensors if k.split(".")[-1] in BN_NAMES and not hp["decay_bn"]]
    groups = [{"params": [t for k, t in tensors.items() if k not in skip], "weight_decay": wd},
              {"params": [tensors[k] for k in skip], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=hp["lr"])
    if name == "momentum":  # v_torch = beta*v_torch + g = v / (1 - beta)
        return torch.optim.SGD(groups, lr=hp["lr"] * (1 - hp["beta"]), momentum=hp["beta"])
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=hp["lr"], alpha=hp["beta"], eps=hp["eps"])
    return torch.optim.Adam(groups, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                            eps=hp["eps"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", range(3))
def test_optimizer_matches_torch_optim(torch, name, case):
    rng = np.random.default_rng(seed_of("torch optim", name, case))
    hp = random_hyper(name, rng) if case else {}
    if case == 2:
        hp.update(weight_decay=0.3)  # one case at least with decay, BN keys split off
    params, grads = random_problem(rng)
    tensors = {k: torch.tensor(p.copy(), requires_grad=True) for k, p in params.items()}
    opt = CLASSES[name](params, grads, **hp)
    topt = torch_optimizer(torch, name, tensors, hp)
    for step in range(1, 7):
        fill_gradients(grads, rng)
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k].copy())
        opt.step()
        topt.step()
        for k, t in tensors.items():
            close(params[k], t.detach().numpy(), f"{name} {hp} step {step}: {k}")


# ---------------------------------------------------------------------------
# A whole network against the same network in PyTorch


def torch_twin(torch, model):
    """The PyTorch network computing what ``model`` (a cbn Sequential) computes, with
    its weights; and ``{cbn key: (tensor, transposed)}`` for every parameter."""
    nn = torch.nn
    mods, tensors, bns = [], {}, []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Linear):
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias).double()
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.W.T.copy()))
                tensors[f"{i}.W"] = (m.weight, True)
                if layer.bias:
                    m.bias.copy_(torch.from_numpy(layer.b.copy()))
                    tensors[f"{i}.b"] = (m.bias, False)
            mods.append(m)
        elif isinstance(layer, BatchNorm):
            m = nn.BatchNorm1d(layer.num_features, eps=layer.eps,
                               momentum=layer.momentum).double()
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.gamma.copy()))
                m.bias.copy_(torch.from_numpy(layer.beta.copy()))
                m.running_mean.copy_(torch.from_numpy(layer.running_mean.copy()))
                m.running_var.copy_(torch.from_numpy(layer.running_var.copy()))
            tensors[f"{i}.gamma"], tensors[f"{i}.beta"] = (m.weight, False), (m.bias, False)
            mods.append(m)
            bns.append((layer, m))
            if layer.activation == "relu":
                mods.append(nn.ReLU())
        else:
            mods.append({ReLU: nn.ReLU, Sigmoid: nn.Sigmoid, Tanh: nn.Tanh}[type(layer)]())
    return nn.Sequential(*mods), tensors, bns


def as_cbn(tensor, transposed):
    a = tensor.detach().numpy()
    return a.T if transposed else a


E2E_HYPER = {"sgd": {"lr": 0.2},
             "momentum": {"lr": 0.2, "beta": 0.8, "weight_decay": 0.01},
             "rmsprop": {"lr": 0.01, "beta": 0.9, "eps": 1e-4},
             "adam": {"lr": 0.02, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.01}}


def custom_net(rng):
    """A hand-built stack: BN with momentum=None (cumulative average) and eps=1e-3,
    a biased Linear followed by ReLU, three BN-free layers at the end."""
    return Sequential(Linear(6, 8, bias=False, rng=rng, dtype=np.float64),
                      BatchNorm(8, momentum=None, eps=1e-3, dtype=np.float64),
                      Tanh(),
                      Linear(8, 5, rng=rng, init="xavier", dtype=np.float64),
                      ReLU(),
                      Linear(5, 4, rng=rng, init="xavier", dtype=np.float64))


def build_net(net, rng):
    if net == "custom":
        return custom_net(rng)
    if net == "plain-relu":
        return mlp([6, 9, 7, 4], batch_norm=False, activation="relu", rng=rng, dtype=np.float64)
    return mlp([6, 9, 7, 4], batch_norm=True, activation=net, rng=rng, dtype=np.float64)


E2E_CASES = [(net, name) for net in ("relu", "sigmoid", "tanh") for name in NAMES] + [
    ("custom", "adam"), ("custom", "momentum"), ("plain-relu", "rmsprop")]


@pytest.mark.parametrize("net, name", E2E_CASES)
def test_network_training_matches_torch(torch, net, name):
    rng = np.random.default_rng(seed_of("e2e", net, name))
    model = build_net(net, rng)
    # Nonzero gamma/beta/biases, so that each one matters in the forward.
    for key, p in model.params.items():
        if not key.endswith(".W"):
            p[...] = rng.uniform(0.5, 1.5, p.shape) if key.endswith("gamma") \
                else rng.normal(0, 0.3, p.shape)
    twin, tensors, bns = torch_twin(torch, model)
    hp = E2E_HYPER[name]
    opt = CLASSES[name](model.params, model.grads, **hp)
    topt = torch_optimizer(torch, name, {k: t for k, (t, _) in tensors.items()}, hp)
    crit = SoftmaxCrossEntropy()

    n, batch = 21, 8  # batches of 8, 8, 5: the last one partial
    X = rng.standard_normal((n, 6)) * rng.uniform(0.5, 3, 6) + rng.normal(0, 2, 6)
    y = rng.integers(0, 4, n)
    step = 0
    for epoch in range(2):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            step += 1
            idx = order[start:start + batch]
            xb, yb = X[idx], y[idx]
            what = f"{net}/{name} step {step} (batch of {len(idx)})"
            model.train()
            twin.train()
            logits = model.forward(xb)
            loss, dlogits = crit(logits, yb)
            t_logits = twin(torch.from_numpy(xb))
            t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(yb))
            topt.zero_grad()
            t_loss.backward()
            close(logits, t_logits.detach().numpy(), f"{what}: logits")
            close(loss, t_loss.item(), f"{what}: loss (mean over the batch)")
            model.backward(dlogits)
            for key, (t, transposed) in tensors.items():
                close(model.grads[key], as_cbn(t.grad, transposed), f"{what}: d{key}")
            opt.step()
            topt.step()
            for key, (t, transposed) in tensors.items():
                close(model.params[key], as_cbn(t, transposed), f"{what}: {key} after step")
            for layer, m in bns:
                close(layer.running_mean, m.running_mean.numpy(), f"{what}: running_mean")
                close(layer.running_var, m.running_var.numpy(), f"{what}: running_var")
                assert layer.num_batches_tracked == int(m.num_batches_tracked), what

    # Eval mode: running statistics, so batching does not matter.
    X_test = rng.standard_normal((11, 6)) * 2
    y_test = rng.integers(0, 4, 11)
    twin.eval()
    want = twin(torch.from_numpy(X_test)).detach()
    got = predict(model, X_test, batch_size=4)
    close(got, want.numpy(), f"{net}/{name}: eval-mode predictions")
    loss, acc = evaluate(model, X_test, y_test, batch_size=3)
    close(loss, torch.nn.functional.cross_entropy(want, torch.from_numpy(y_test)).item(),
          f"{net}/{name}: evaluate loss")
    assert acc == float(np.mean(want.numpy().argmax(axis=1) == y_test))
    assert model.training  # predict/evaluate restored the mode


# ---------------------------------------------------------------------------
# fit against a hand-written loop


def hand_loop(model, X, y, *, epochs, batch_size, optimizer, seed, validation, shuffle=True):
    """docs/trainer.md's fit, written out with the public pieces: one generator
    ``default_rng(seed)``, a permutation per epoch, training-mode forward, loss,
    backward, step; a one-sample last batch skipped only with batch norm
    (normalizing with batch statistics); validation by ``evaluate`` (eval mode)."""
    rng = np.random.default_rng(seed)
    crit = SoftmaxCrossEntropy()
    has_bn = any(isinstance(layer, BatchNorm) for layer in model.layers)
    X = np.ascontiguousarray(X, dtype=next(iter(model.params.values())).dtype)
    n = len(X)
    out = {"step_loss": [], "step_acc": [], "batch_sizes": [], "train_loss": [],
           "train_acc": [], "unweighted_loss": [], "val_loss": [], "val_acc": [], "steps": [],
           "dropped": 0}
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        model.train()
        losses, accs, sizes = [], [], []
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) == 1 and start > 0 and has_bn:
                out["dropped"] += 1
                continue
            logits = model.forward(X[idx])
            loss, dlogits = crit(logits, y[idx])
            model.backward(dlogits)
            optimizer.step()
            step += 1
            losses.append(loss)
            accs.append(float(np.mean(logits.argmax(axis=1) == y[idx])))
            sizes.append(len(idx))
        out["step_loss"] += losses
        out["step_acc"] += accs
        out["batch_sizes"] += sizes
        w = np.array(sizes) / sum(sizes)
        out["train_loss"].append(float(np.dot(w, losses)))
        out["train_acc"].append(float(np.dot(w, accs)))
        out["unweighted_loss"].append(float(np.mean(losses)))
        v_loss, v_acc = evaluate(model, *validation)
        out["val_loss"].append(v_loss)
        out["val_acc"].append(v_acc)
        out["steps"].append(step)
    return out


def blobs(rng, n, d=5, k=3):
    centres = rng.normal(0, 2, (k, d))
    y = rng.integers(0, k, n)
    return centres[y] + rng.standard_normal((n, d)), y


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_is_the_documented_loop(batch_norm, dtype):
    rng = np.random.default_rng(seed_of("fit", batch_norm, np.dtype(dtype).name))
    n, batch, epochs, seed = 3 * 8 + 1, 8, 3, int(rng.integers(0, 1000))  # last batch: 1
    X, y = blobs(rng, n)  # float64: fit converts it once to the model's dtype
    X_val, y_val = blobs(rng, 13)
    a = mlp([5, 7, 6, 3], batch_norm=batch_norm, activation="tanh", rng=rng, dtype=dtype)
    b = copy.deepcopy(a)
    hist = fit(a, X, y, epochs=epochs, batch_size=batch, seed=seed, verbose=0,
               optimizer=Adam(a.params, a.grads, lr=0.01), validation=(X_val, y_val),
               record_steps=True)
    want = hand_loop(b, X, y, epochs=epochs, batch_size=batch, seed=seed,
                     optimizer=Adam(b.params, b.grads, lr=0.01), validation=(X_val, y_val))

    per_epoch = 3 if batch_norm else 4
    assert hist.epoch == list(range(1, epochs + 1))
    assert hist.steps == want["steps"] == [per_epoch * e for e in range(1, epochs + 1)]
    assert hist.dropped == want["dropped"] == (epochs if batch_norm else 0)
    assert hist.n_steps == per_epoch * epochs
    # Same batches, same order, same arithmetic: identical to the last bit.
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(a.state_dict()[key], value, err_msg=key)
    assert hist.step_loss == want["step_loss"]
    assert hist.step_acc == want["step_acc"]
    # Epoch means: weighted by batch size (Keras' way: the mean over the epoch's samples).
    close(hist.train_loss, want["train_loss"], "train_loss", rtol=1e-12, atol=0)
    close(hist.train_acc, want["train_acc"], "train_acc", rtol=1e-12, atol=0)
    if not batch_norm:  # a partial batch of 1: the weighting shows
        assert not np.allclose(want["train_loss"], want["unweighted_loss"], rtol=1e-9, atol=0)
    # Validation in eval mode after each epoch: evaluate()'s numbers, and the running
    # statistics untouched by it (else the next epoch's steps would differ above).
    assert hist.val_loss == want["val_loss"]
    assert hist.val_acc == want["val_acc"]
    if batch_norm:  # and eval mode differs from normalizing the validation set itself
        crit = SoftmaxCrossEntropy()
        batch_stats = crit.forward(copy.deepcopy(a).train().forward(
            X_val.astype(dtype)), y_val)
        assert abs(batch_stats - hist.val_loss[-1]) > 1e-6
    assert len(hist.time) == len(hist.train_time) == epochs
    assert hist.to_dict()["steps"] == hist.steps


def test_fit_without_shuffle_takes_rows_in_order():
    rng = np.random.default_rng(seed_of("no shuffle"))
    X, y = blobs(rng, 17)
    a = mlp([5, 6, 3], batch_norm=True, rng=rng, dtype=np.float64)
    b = copy.deepcopy(a)
    fit(a, X, y, epochs=2, batch_size=4, shuffle=False, seed=None, verbose=0,
        optimizer=Momentum(a.params, a.grads))
    hand_loop(b, X, y, epochs=2, batch_size=4, shuffle=False, seed=None,
              optimizer=Momentum(b.params, b.grads), validation=(X, y))
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(a.state_dict()[key], value, err_msg=key)


def test_fit_restores_every_layers_mode_also_after_an_error():
    rng = np.random.default_rng(seed_of("modes"))
    X, y = blobs(rng, 20)
    model = mlp([5, 6, 6, 3], batch_norm=True, activation="sigmoid", rng=rng,
                dtype=np.float64)
    model.train()
    model.layers[1].eval()  # one BN set apart
    modes = [layer.training for layer in model.layers]
    seen = []

    class Watch:
        def on_step_end(self, model_, step, logs):
            seen.append([layer.training for layer in model_.layers])

    fit(model, X, y, epochs=1, batch_size=10, optimizer=SGD(model.params, model.grads),
        validation=(X[:5], y[:5]), callbacks=[Watch()], verbose=0)
    assert all(all(s) for s in seen)  # every layer trains during the steps
    assert [layer.training for layer in model.layers] == modes

    class Diverge(SoftmaxCrossEntropy):
        calls = 0

        def __call__(self, logits, y):
            self.calls += 1
            if self.calls == 2:
                raise FloatingPointError("diverged")
            return super().__call__(logits, y)

    model.eval()
    with pytest.raises(FloatingPointError):
        fit(model, X, y, epochs=1, batch_size=5, optimizer=SGD(model.params, model.grads),
            loss=Diverge(), verbose=0)
    assert not any(layer.training for layer in model.layers) and not model.training


# ---------------------------------------------------------------------------
# Checkpoints: Sequential.save + optimizer.state_dict resume bit for bit


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_resuming_from_a_checkpoint_continues_bit_for_bit(tmp_path, name):
    rng = np.random.default_rng(seed_of("resume", name))
    X, y = blobs(rng, 40)
    batches = [rng.choice(40, 8, replace=False) for _ in range(10)]
    crit = SoftmaxCrossEntropy()

    def train(model, opt, steps):
        for idx in steps:
            model.train()
            _, dz = crit(model.forward(X[idx]), y[idx])
            model.backward(dz)
            opt.step()

    a = mlp([5, 7, 7, 3], batch_norm=True, activation="relu", rng=rng, dtype=np.float64)
    opt_a = CLASSES[name](a.params, a.grads, lr=0.05)
    train(a, opt_a, batches[:4])
    a.save(tmp_path / "model.npz")
    np.savez(tmp_path / "opt.npz", **opt_a.state_dict())
    train(a, opt_a, batches[4:])

    b = Sequential.load(tmp_path / "model.npz")
    opt_b = CLASSES[name](b.params, b.grads)
    with np.load(tmp_path / "opt.npz") as saved:
        opt_b.load_state_dict(saved)
    train(b, opt_b, batches[4:])
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value, err_msg=key)
    for key, value in opt_a.state_dict().items():
        np.testing.assert_array_equal(opt_b.state_dict()[key], value, err_msg=key)


# ---------------------------------------------------------------------------
# Initialization, as documented


@pytest.mark.parametrize("init", ["he", "xavier"])
def test_linear_initialization_has_the_documented_spread(init):
    rng = np.random.default_rng(seed_of("init", init))
    n_in, n_out = 300, 200
    layer = Linear(n_in, n_out, init=init, rng=rng, dtype=np.float64)
    want = np.sqrt(2 / n_in) if init == "he" else np.sqrt(2 / (n_in + n_out))
    # 60,000 draws: the sample std is within 1% of sigma (about 3.5 standard errors).
    assert abs(layer.W.std() / want - 1) < 0.01
    assert abs(layer.W.mean()) < 4 * want / np.sqrt(layer.W.size)
    np.testing.assert_array_equal(layer.b, 0)


def test_mlp_with_and_without_batch_norm_start_from_the_same_weights():
    seed = seed_of("same weights")
    with_bn = mlp([6, 8, 7, 3], batch_norm=True, activation="tanh", rng=seed)
    plain = mlp([6, 8, 7, 3], batch_norm=False, activation="tanh", rng=seed)
    w_bn = [layer.W for layer in with_bn.layers if isinstance(layer, Linear)]
    w_plain = [layer.W for layer in plain.layers if isinstance(layer, Linear)]
    assert len(w_bn) == len(w_plain) == 3
    for a, b in zip(w_bn, w_plain):
        np.testing.assert_array_equal(a, b)
    assert [layer.bias for layer in with_bn.layers if isinstance(layer, Linear)] == \
        [False, False, True]
