"""Stateful, model-based test of ``cbn.BatchNorm``.

Hypothesis drives random sequences of calls (forward in training and
evaluation, backward, hyper-parameter changes, freeze/unfreeze, resets, an
optimizer's in-place step, state_dict / save / deepcopy / pickle round trips,
bad inputs) on one or more layers kept in lockstep, and checks every result
and every piece of state against ``Model``: a plain float64 NumPy model of the
layer with PyTorch's semantics (batch mean and biased variance for
normalization, unbiased variance for ``running_var``, ``momentum=None`` as a
cumulative average over ``num_batches_tracked``), plus cbn's documented
extensions (``freeze``, the fused ReLU, channels-last ``axis=-1``, the
"a failed call changes nothing" contract).

The model keeps the stored state (parameters, running statistics) in the
layer's dtype, as the layer does, and computes everything else in float64
from the values the layer actually receives (float32 inputs are cast to
float64, not drawn in float64). Tolerances are per element, relative to the
magnitudes the rounding errors scale with (see ``_close``).

Only documented behaviour is asserted. A failed forward (NaN in a training
batch, a batch of one, a wrong channel count or dtype) keeps nothing: backward
then differentiates the last forward that succeeded (README, "One forward, one
backward"; docs/robustness.md for the NaN batch).
NaN or Inf in ``dy`` raises ``FloatingPointError``, except where the fused
ReLU masks it (documented; PyTorch's relu-then-BN gives the same finite
gradient): there backward must not raise, unless the mask itself is within
float32 rounding (``Model.backward``). Between an evaluation (or frozen) forward and its backward, a change
of the running statistics is taken to leave the forward's statistics in
backward ("the gradient through the last forward"; PyTorch raises instead).

``CBN_STATEFUL_EXAMPLES`` and ``CBN_STATEFUL_STEPS`` raise the budget for
longer bug hunts, e.g. ``CBN_STATEFUL_EXAMPLES=3000 CBN_STATEFUL_STEPS=80``.
"""

import copy
import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from test_functional import laid_out_as_input  # pythonpath: tests

import cbn

MAX_EXAMPLES = int(os.environ.get("CBN_STATEFUL_EXAMPLES", "100"))
STEP_COUNT = int(os.environ.get("CBN_STATEFUL_STEPS", "50"))
MAX_LAYERS = 3  # the original layer and at most two copies / reloads, in lockstep

# Per-element error allowed, relative to the magnitude the rounding errors of
# each quantity scale with (``_close``): ~80 float32 ulps, and the brief's 1e-10
# for float64 (whose kernels are accurate to ~1e-15 on these inputs).
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _to2d(a, axis):
    """(M, C) view of ``a`` with its channel axis last, and the moved shape."""
    moved = np.moveaxis(a, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _from2d(a2, moved_shape, axis):
    return np.moveaxis(a2.reshape(moved_shape), -1, axis)


def _close(actual, expected, scale, tol, what):
    """|actual - expected| <= tol * scale element by element (scale >= |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: not finite: {actual}"
    bound = tol * (np.asarray(scale, dtype=np.float64) + np.abs(expected)) + 1e-300
    err = np.abs(actual - expected)
    if err.size:
        key = f"max error/bound {what.split(' (')[0]} {tol:g}"
        STATS[key] = max(STATS.get(key, 0.0), float(np.max(err / bound)))
    bad = err > bound
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values off; first at flat index {i}: "
            f"cbn {actual.ravel()[i]!r}, model {expected.ravel()[i]!r}, error "
            f"{err.ravel()[i]:.3g} > bound {bound.ravel()[i]:.3g}\ncbn   {actual.ravel()[:8]}"
            f"\nmodel {expected.ravel()[:8]}")


def _bits(a):
    return None if a is None else (a.dtype.str, a.shape, a.tobytes())


def _snapshot(layer):
    """Every piece of state a failed call must leave bit-for-bit as it was."""
    return (
        _bits(layer.running_mean), _bits(layer.running_var), layer.num_batches_tracked,
        _bits(layer.gamma), _bits(layer.beta), _bits(layer.dgamma), _bits(layer.dbeta),
        layer.training, layer.frozen,
    )


def _layout(arr, kind, rng):
    """The values of ``arr`` (C order) in the memory layout ``kind``."""
    if kind == "C":
        out = np.ascontiguousarray(arr)
    elif kind == "F":
        out = np.asfortranarray(arr)
    elif kind == "negative":
        ax = int(rng.integers(arr.ndim))
        out = np.flip(np.ascontiguousarray(np.flip(arr, ax)), ax)
    elif kind == "slice":
        ax = int(rng.integers(arr.ndim))
        shape = list(arr.shape)
        shape[ax] *= 2
        buf = np.full(shape, np.nan, arr.dtype)  # the skipped values are poison
        index = [slice(None)] * arr.ndim
        index[ax] = slice(1, None, 2)
        buf[tuple(index)] = arr
        out = buf[tuple(index)]
    elif kind == "transposed":  # channels-last memory seen as channels-first, or the reverse
        perm = rng.permutation(arr.ndim)
        buf = np.ascontiguousarray(np.transpose(arr, perm))
        out = np.transpose(buf, np.argsort(perm))
    elif kind == "unaligned":
        raw = np.empty(arr.nbytes + 1, np.uint8)
        out = raw[1:].view(arr.dtype).reshape(arr.shape)
        out[...] = arr
    elif kind == "list":  # Python numbers: they take the layer's dtype
        return arr.tolist()
    else:
        raise AssertionError(kind)
    assert np.array_equal(out, arr, equal_nan=True)
    if rng.random() < 0.25:
        out.setflags(write=False)
    return out


LAYOUTS = ["C", "C", "F", "negative", "slice", "transposed", "unaligned", "list"]


def _batch(rng, shape, axis, dtype, constant_channel=False):
    """Random data with a random offset and spread per channel, cast to dtype."""
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    scale = 10.0 ** rng.uniform(-1, 1, C)
    offset = rng.uniform(-3, 3, C) * scale
    x = rng.standard_normal(shape) * scale.reshape(bshape) + offset.reshape(bshape)
    if constant_channel:
        c = int(rng.integers(C))
        index = [slice(None)] * len(shape)
        index[axis] = c
        x[tuple(index)] = offset[c]
    return x.astype(dtype)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class Expect(Exception):
    """The model's prediction that a call raises ``kind``."""

    def __init__(self, kind):
        super().__init__(kind.__name__)
        self.kind = kind


class Model:
    """cbn.BatchNorm as documented, with PyTorch's semantics, in float64."""

    def __init__(self, C, dtype, eps, momentum, affine, track, axis, activation):
        self.C, self.dtype = C, np.dtype(dtype)
        self.eps, self.momentum, self.axis, self.activation = eps, momentum, axis, activation
        self.affine, self.track = affine, track
        dt = self.dtype
        # Stored state, in the layer's dtype, as the layer stores it.
        self.gamma = np.ones(C, dt) if affine else None
        self.beta = np.zeros(C, dt) if affine else None
        # Gradients in float64 (compared with a tolerance), with their error scales.
        self.dgamma = np.zeros(C) if affine else None
        self.dbeta = np.zeros(C) if affine else None
        self.dgamma_scale = np.zeros(C)
        self.dbeta_scale = np.zeros(C)
        self.rm = np.zeros(C, dt) if track else None
        self.rv = np.ones(C, dt) if track else None
        self.rm_scale = np.zeros(C)  # sum of |terms| folded into rm: its rounding scale
        self.rv_scale = np.zeros(C)  # likewise for rv (a variance is known to ~eps * mean**2)
        self.nbt = 0 if track else None
        self.training = True
        self.frozen = False
        self.cache = None
        self.stale = False  # gamma or beta assigned since the cached forward

    def fresh_copy(self):
        """A new layer built from config() with this state loaded (state_dict, save/load)."""
        m = Model(self.C, self.dtype, self.eps, self.momentum, self.affine, self.track,
                  self.axis, self.activation)
        if self.affine:
            m.gamma, m.beta = self.gamma.copy(), self.beta.copy()
        if self.track:
            m.rm, m.rv, m.nbt = self.rm.copy(), self.rv.copy(), self.nbt
            m.rm_scale, m.rv_scale = self.rm_scale.copy(), self.rv_scale.copy()
        return m

    def deep_copy(self):
        """copy.deepcopy / pickle: everything but the last forward's cache."""
        m = copy.deepcopy(self)
        m.cache, m.stale = None, False
        return m

    def _params64(self):
        if self.affine:
            return self.gamma.astype(np.float64), self.beta.astype(np.float64)
        return np.ones(self.C), np.zeros(self.C)

    @property
    def uses_batch_stats(self):
        return (self.training and not self.frozen) or not self.track

    def forward(self, x, grad=True):
        """Returns (y, scale, commit): commit() applies the state change.

        ``grad=False``: inside ``cbn.no_grad()``, the forward keeps nothing for
        backward and leaves the one kept before in place (running statistics
        update as usual)."""
        if isinstance(x, list):
            x = np.array(x, dtype=self.dtype)
        if x.dtype != self.dtype:
            raise Expect(TypeError)
        axis = self.axis
        if not -x.ndim <= axis < x.ndim or x.shape[axis] != self.C:
            raise Expect(ValueError)
        x64 = x.astype(np.float64)
        X, moved = _to2d(x64, axis)
        m = X.shape[0]
        batch = self.uses_batch_stats
        if batch and m < 2:
            raise Expect(ValueError)
        if not np.all(np.isfinite(X)):
            raise Expect(FloatingPointError)
        if batch:
            mean = X.mean(axis=0)
            var = ((X - mean) ** 2).mean(axis=0)
        else:
            mean = self.rm.astype(np.float64)
            var = self.rv.astype(np.float64)
        invstd = 1.0 / np.sqrt(var + self.eps)
        gamma, beta = self._params64()
        pre = gamma * (X - mean) * invstd + beta
        y2 = np.maximum(pre, 0.0) if self.activation == "relu" else pre
        scale = np.abs(gamma) * invstd * (np.abs(X) + np.abs(mean)) + np.abs(beta)
        y = _from2d(y2, moved, axis)
        scale = _from2d(scale, moved, axis)

        update = batch and self.training and self.track
        if update:
            n = self.nbt + 1
            f = self.momentum if self.momentum is not None else 1.0 / n
            new_rm = (1 - f) * self.rm.astype(np.float64) + f * mean
            new_rv = (1 - f) * self.rv.astype(np.float64) + f * var * m / (m - 1)
            new_rm_scale = (1 - f) * self.rm_scale + f * np.abs(mean) + np.abs(new_rm)
            new_rv_scale = (1 - f) * self.rv_scale + f * (var + mean**2) * m / (m - 1)
        cache = {"X": X, "moved": moved, "shape": x.shape, "mean": mean, "var": var,
                 "batch": batch, "eps": self.eps, "activation": self.activation,
                 "axis": axis, "gamma": gamma, "beta": beta}

        def commit():
            if update:
                self.rm = new_rm.astype(self.dtype)
                self.rv = new_rv.astype(self.dtype)
                self.rm_scale = new_rm_scale
                self.rv_scale = new_rv_scale
                self.nbt = n
            if grad:
                self.cache = cache
                self.stale = False

        return y, scale, commit

    def backward(self, dy, params_changed):
        """Returns (dx, dx_scale, grads, ambiguous, commit)."""
        c = self.cache
        if c is None:
            raise Expect(RuntimeError)
        if self.stale or params_changed:
            raise Expect(RuntimeError)
        if isinstance(dy, list):
            dy = np.array(dy, dtype=self.dtype)
        if dy.dtype != self.dtype:
            raise Expect(TypeError)
        if dy.shape != c["shape"]:
            raise Expect(ValueError)
        G, _ = _to2d(dy.astype(np.float64), c["axis"])
        masked_nonfinite = False
        if not np.all(np.isfinite(G)):
            if c["activation"] != "relu":
                raise Expect(FloatingPointError)
            pre = c["gamma"] * (c["X"] - c["mean"]) / np.sqrt(c["var"] + c["eps"]) + c["beta"]
            if not np.all(np.isfinite(G[pre > 0])):
                raise Expect(FloatingPointError)
            # Documented: with the fused ReLU, dy where the output was clamped to 0
            # is masked out and not checked, so a NaN there does not raise and
            # backward returns what PyTorch's relu-then-BN returns. The caller
            # accepts a raise only where the mask is ambiguous (float32 rounding).
            masked_nonfinite = True
            G = np.where(np.isfinite(G), G, 0.0)
        X, mean, var = c["X"], c["mean"], c["var"]
        m = X.shape[0]
        gamma, beta = c["gamma"], c["beta"]
        invstd = 1.0 / np.sqrt(var + c["eps"])
        xhat = (X - mean) * invstd
        xmag = (np.abs(X) + np.abs(mean)) * invstd  # rounding scale of xhat
        ambiguous = False
        if c["activation"] == "relu":
            pre = gamma * xhat + beta
            band = 64 * np.finfo(self.dtype).eps * (np.abs(gamma) * xmag + np.abs(beta))
            ambiguous = bool(np.any(np.abs(pre) <= band))
            G = np.where(pre > 0, G, 0.0)
        dbeta = G.sum(axis=0)
        dgamma = (G * xhat).sum(axis=0)
        absG = np.abs(G)
        dbeta_scale = absG.sum(axis=0)
        dgamma_scale = (absG * xmag).sum(axis=0)
        a = gamma * invstd
        if c["batch"]:
            dx = a * (G - dbeta / m - xhat * dgamma / m)
            dx_scale = np.abs(a) * (absG + dbeta_scale / m + xmag * dgamma_scale / m)
        else:
            dx = a * G
            dx_scale = np.abs(a) * absG
        dx = _from2d(dx, c["moved"], c["axis"])
        dx_scale = _from2d(dx_scale, c["moved"], c["axis"])

        def commit():
            if self.affine:
                self.dgamma, self.dbeta = dgamma, dbeta
                self.dgamma_scale, self.dbeta_scale = dgamma_scale, dbeta_scale

        return dx, dx_scale, ambiguous, masked_nonfinite, commit


# ---------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------


class Pair:
    """A layer, its model, and the bits of gamma/beta at its last good forward."""

    def __init__(self, layer, model, origin):
        self.layer, self.model, self.origin = layer, model, origin
        self.param_bits = None
        # The layer's own arrays: assignments copy into them, so they never change
        # identity (params and grads stay live for optimizers).
        self.arrays = self.own_arrays()

    def own_arrays(self):
        layer = self.layer
        return (layer.gamma, layer.beta, layer.dgamma, layer.dbeta,
                layer.running_mean, layer.running_var)

    def params_changed(self):
        if not self.model.affine or self.param_bits is None:
            return False
        return self.param_bits != (_bits(self.layer.gamma), _bits(self.layer.beta))


if "CBN_STATEFUL_EXAMPLES" in os.environ:  # a bug hunt: say what was exercised
    import atexit
    atexit.register(lambda: print("\nstate machine counts:", STATS))

STATS = {"ambiguous_relu": 0, "forwards": 0, "backwards": 0, "expected_errors": 0,
         "masked_nonfinite_dy_raised": 0, "masked_nonfinite_dy_accepted": 0}


class BatchNormMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pairs = []
        self.tmpdir = None

    def teardown(self):
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    @initialize(
        C=st.integers(1, 8),
        dtype=st.sampled_from([np.float32, np.float64]),
        eps=st.sampled_from([1e-5, 1e-3, 1e-8, 0.1]),
        momentum=st.sampled_from([0.1, None, 0.0, 1.0, 0.5, 0.01]),
        affine=st.booleans(),
        track=st.booleans(),
        axis=st.sampled_from([1, -1]),
        activation=st.sampled_from([None, "relu"]),
        frozen=st.integers(0, 3),
    )
    def build(self, C, dtype, eps, momentum, affine, track, axis, activation, frozen):
        layer = cbn.BatchNorm(C, eps=eps, momentum=momentum, affine=affine,
                              track_running_stats=track, axis=axis, dtype=dtype,
                              activation=activation)
        model = Model(C, dtype, eps, momentum, affine, track, axis, activation)
        if track and frozen == 0:  # fine-tuning from the start, a quarter of the time
            layer.freeze()
            model.frozen = True
        self.pairs = [Pair(layer, model, "built")]
        self.tol = TOL[np.dtype(dtype)]

    # -- the core of the lockstep: run one call on every layer, compare with the model

    def _expect_failure(self, pair, kind, call, *args):
        before = _snapshot(pair.layer)
        with pytest.raises(kind):
            call(*args)
        after = _snapshot(pair.layer)
        assert after == before, (
            f"a call that raised {kind.__name__} changed the layer's state "
            f"({pair.origin}): {[i for i, (a, b) in enumerate(zip(before, after)) if a != b]}")
        STATS["expected_errors"] += 1
        key = f"raised {kind.__name__}"
        STATS[key] = STATS.get(key, 0) + 1

    def _forward_all(self, x, grad=True):
        for pair in self.pairs:
            model, layer = pair.model, pair.layer
            try:
                y_exp, scale, commit = model.forward(x, grad)
            except Expect as e:
                self._expect_failure(pair, e.kind, layer.forward, x)
                # Documented (README, "One forward, one backward"): a forward that
                # raises keeps nothing, so backward differentiates the last forward
                # that succeeded; the model's cache stays as it was.
                continue
            x_before = copy.deepcopy(x)
            y = layer.forward(x)
            STATS["forwards"] += 1
            assert np.array_equal(x, x_before, equal_nan=True), "forward wrote into x"
            assert type(y) is np.ndarray and y.dtype == model.dtype and y.shape == y_exp.shape
            assert laid_out_as_input(y, x)
            _close(y, y_exp, scale, self.tol, f"forward output ({pair.origin})")
            commit()
            if grad:
                pair.param_bits = (_bits(layer.gamma), _bits(layer.beta))

    def _backward_all(self, dy):
        for pair in self.pairs:
            model, layer = pair.model, pair.layer
            try:
                dx_exp, scale, ambiguous, masked, commit = model.backward(
                    dy, pair.params_changed())
            except Expect as e:
                self._expect_failure(pair, e.kind, layer.backward, dy)
                continue
            if masked:  # NaN/Inf in dy only where the ReLU masks it: see Model.backward
                before = _snapshot(layer)
                try:
                    dx = layer.backward(dy)
                except FloatingPointError:
                    assert ambiguous, "NaN/Inf in dy under the ReLU mask raised"
                    assert _snapshot(layer) == before
                    STATS["masked_nonfinite_dy_raised"] += 1
                    continue
                STATS["masked_nonfinite_dy_accepted"] += 1
            else:
                dy_before = copy.deepcopy(dy)
                dx = layer.backward(dy)
                assert np.array_equal(dy, dy_before), "backward wrote into dy"
            STATS["backwards"] += 1
            assert type(dx) is np.ndarray and dx.dtype == model.dtype and dx.shape == dx_exp.shape
            assert laid_out_as_input(dx, layer._cache[0])  # the forward's batch
            commit()
            if ambiguous:
                # A pre-activation within rounding of 0: the ReLU mask may differ in
                # float32; take the layer's gradients as the model's from here.
                STATS["ambiguous_relu"] += 1
                if model.affine:
                    model.dgamma = layer.dgamma.astype(np.float64)
                    model.dbeta = layer.dbeta.astype(np.float64)
                continue
            _close(dx, dx_exp, scale, self.tol, f"dx ({pair.origin})")
            # dgamma/dbeta are compared by the invariant.

    # -- rules: data

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4),
          n=st.integers(2, 12), layout=st.sampled_from(LAYOUTS),
          constant=st.integers(0, 19))
    def forward_batch(self, seed, rank, n, layout, constant):
        """A batch with at least two values per channel (any mode)."""
        rng = np.random.default_rng(seed)
        self._forward_all(self._make_x(rng, rank, n, layout, constant == 0))

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4), n=st.integers(1, 6),
          layout=st.sampled_from(LAYOUTS), nan=st.booleans(), nested=st.booleans())
    def forward_no_grad(self, seed, rank, n, layout, nan, nested):
        """Inside cbn.no_grad(): y and running statistics as usual, the cache left alone."""
        rng = np.random.default_rng(seed)
        x = np.array(self._make_x(rng, rank, n, "C", False, spatial_max=2))
        if nan and rng.random() < 0.3:
            x.flat[int(rng.integers(x.size))] = np.nan
        x = _layout(x, layout, rng)
        assert cbn.is_grad_enabled()
        with cbn.no_grad():
            if nested:
                with cbn.no_grad():
                    pass
            assert not cbn.is_grad_enabled()
            self._forward_all(x, grad=False)
        assert cbn.is_grad_enabled()

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4),
          n=st.integers(1, 3), layout=st.sampled_from(LAYOUTS))
    def forward_small(self, seed, rank, n, layout):
        """Small batches, down to one value per channel (fine in eval and frozen)."""
        rng = np.random.default_rng(seed)
        self._forward_all(self._make_x(rng, rank, n, layout, False, spatial_max=2))

    def _shape(self, rng, rank, n, spatial_max=4, C=None):
        model = self.pairs[0].model
        C = model.C if C is None else C
        spatial = [int(s) for s in rng.integers(1, spatial_max + 1, rank - 2)]
        if model.axis == 1:
            return (n, C, *spatial)
        return (n, *spatial, C)

    def _make_x(self, rng, rank, n, layout, constant, spatial_max=4, C=None):
        model = self.pairs[0].model
        shape = self._shape(rng, rank, n, spatial_max, C)
        x = _batch(rng, shape, model.axis % rank, model.dtype, constant)
        return _layout(x, layout, rng)

    @rule(seed=st.integers(0, 2**32 - 1), layout=st.sampled_from(LAYOUTS),
          scale=st.sampled_from([1.0, 1e-3, 10.0]))
    def backward(self, seed, layout, scale):
        rng = np.random.default_rng(seed)
        dy = self._make_dy(rng, layout, scale)
        self._backward_all(dy)

    def _last_shape(self):
        for pair in self.pairs:
            c = pair.model.cache
            if isinstance(c, dict):
                return c["shape"]
        return (4, self.pairs[0].model.C)

    def _make_dy(self, rng, layout, scale=1.0):
        dtype = self.pairs[0].model.dtype
        dy = (rng.standard_normal(self._last_shape()) * scale).astype(dtype)
        return _layout(dy, layout, rng)

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4),
          n=st.integers(2, 12), layout=st.sampled_from(LAYOUTS),
          dy_layout=st.sampled_from(LAYOUTS), lr=st.sampled_from([None, 0.1, 0.01]))
    def training_step(self, seed, rank, n, layout, dy_layout, lr):
        """forward, backward with a dy of the batch's shape, then maybe an optimizer step."""
        rng = np.random.default_rng(seed)
        x = self._make_x(rng, rank, n, layout, False)
        self._forward_all(x)
        shape = np.shape(x)
        dtype = self.pairs[0].model.dtype
        dy = _layout(rng.standard_normal(shape).astype(dtype), dy_layout, rng)
        self._backward_all(dy)
        if lr is not None:
            self.optimizer_step(lr, "sgd")

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4), n=st.integers(2, 8),
          between=st.sampled_from(["eps", "activation", "axis", "momentum", "mode", "freeze",
                                   "reset_parameters", "reset_running_stats", "optimizer",
                                   "assign", "no_grad_forward", "nan_forward",
                                   "running_stats", "zero_grads", "copy", "save"]))
    def change_between_forward_and_backward(self, seed, rank, n, between):
        """forward, one change to the layer, backward (documented: backward differentiates
        the forward that ran, and raises if gamma or beta changed since)."""
        rng = np.random.default_rng(seed)
        x = self._make_x(rng, rank, n, "C", False)
        self._forward_all(x)
        model = self.pairs[0].model
        if between == "eps":
            self.set_eps(float(10.0 ** rng.uniform(-8, -1)))
        elif between == "activation":
            self.set_activation(None if model.activation else "relu")
        elif between == "axis":
            self.set_axis(-1 if model.axis == 1 else 1)
        elif between == "momentum":
            self.set_momentum(None if model.momentum is not None else 0.5)
        elif between == "mode":
            self.train_or_eval(not model.training)
        elif between == "freeze":
            self.freeze_or_unfreeze(not model.frozen)
        elif between == "reset_parameters":
            self.reset_parameters()
        elif between == "reset_running_stats":
            self.reset_running_stats()
        elif between == "optimizer":
            self.optimizer_step(0.1, "decay")
        elif between == "assign":
            self.assign_parameters(seed)
        elif between == "no_grad_forward":
            self.forward_no_grad(seed + 1, rank, n, "C", False, False)
        elif between == "nan_forward":
            self.forward_nonfinite(seed + 1, rank, n, np.nan, "C")
        elif between == "running_stats":
            self.assign_running_stats(seed)
        elif between == "zero_grads":
            self.zero_grads()
        elif between == "copy":
            self.copy_layer(0, "deepcopy" if seed % 2 else "pickle")
        elif between == "save":
            self.save_load_round_trip(0)
        dy = rng.standard_normal(np.shape(x)).astype(model.dtype)
        self._backward_all(dy)

    @rule(seed=st.integers(0, 2**32 - 1), big=st.integers(0, 6),
          layout=st.sampled_from(["C", "F", "transposed", "slice"]))
    def training_step_big(self, seed, big, layout):
        """Batches that cross the kernels' 256-row blocks and the 64 KiB output rule."""
        rng = np.random.default_rng(seed)
        model = self.pairs[0].model
        n, spatial = [(255, ()), (257, ()), (521, ()), (3000, ()), (16, (16, 16)),
                      (5, (33, 17)), (-(-70000 // (256 * model.C)), (16, 16))][big]
        shape = (n, model.C, *spatial) if model.axis == 1 else (n, *spatial, model.C)
        x = _layout(_batch(rng, shape, model.axis % len(shape), model.dtype), layout, rng)
        self._forward_all(x)
        dy = _layout(rng.standard_normal(shape).astype(model.dtype), layout, rng)
        self._backward_all(dy)

    @rule(n_threads=st.sampled_from([1, 2, None, -1]))
    def set_n_threads(self, n_threads):
        """Results are documented bit-identical for any count; the model has none."""
        for p in self.pairs:
            p.layer.n_threads = n_threads

    # -- rules: bad input

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4), n=st.integers(2, 6),
          value=st.sampled_from([np.nan, np.inf, -np.inf]), layout=st.sampled_from(LAYOUTS))
    def forward_nonfinite(self, seed, rank, n, value, layout):
        rng = np.random.default_rng(seed)
        x = np.array(self._make_x(rng, rank, n, "C", False))
        x.flat[int(rng.integers(x.size))] = value
        self._forward_all(_layout(x, layout, rng))

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4))
    def forward_batch_of_one(self, seed, rank):
        """One value per channel: ValueError where batch statistics are used."""
        rng = np.random.default_rng(seed)
        self._forward_all(self._make_x(rng, rank, 1, "C", False, spatial_max=1))

    @rule(seed=st.integers(0, 2**32 - 1), rank=st.integers(2, 4), n=st.integers(1, 5),
          delta=st.sampled_from([-1, 1, 2]))
    def forward_wrong_channels(self, seed, rank, n, delta):
        rng = np.random.default_rng(seed)
        C = self.pairs[0].model.C + delta
        if C < 1:
            C = 2
        self._forward_all(self._make_x(rng, rank, n, "C", False, C=C))

    @rule(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 5))
    def forward_wrong_dtype(self, seed, n):
        rng = np.random.default_rng(seed)
        x = np.array(self._make_x(rng, 2, n, "C", False))
        other = np.float64 if x.dtype == np.float32 else np.float32
        self._forward_all(x.astype(other))

    @rule(seed=st.integers(0, 2**32 - 1), value=st.sampled_from([np.nan, np.inf]))
    def backward_nonfinite(self, seed, value):
        rng = np.random.default_rng(seed)
        dy = np.array(self._make_dy(rng, "C"))
        dy.flat[int(rng.integers(dy.size))] = value
        self._backward_all(dy)

    @rule(seed=st.integers(0, 2**32 - 1))
    def backward_wrong_shape(self, seed):
        rng = np.random.default_rng(seed)
        shape = self._last_shape()
        shape = (shape[0] + 1,) + tuple(shape[1:])
        dy = rng.standard_normal(shape).astype(self.pairs[0].model.dtype)
        self._backward_all(dy)

    # -- rules: settings and modes (applied to every layer)

    @rule(eps=st.sampled_from([1e-5, 1e-3, 1e-8, 0.1, 2.5e-4]))
    def set_eps(self, eps):
        for p in self.pairs:
            p.layer.eps = eps
            p.model.eps = eps

    @rule(momentum=st.sampled_from([0.1, None, 0.0, 1.0, 0.3, 0.9]))
    def set_momentum(self, momentum):
        for p in self.pairs:
            p.layer.momentum = momentum
            p.model.momentum = momentum

    @rule(activation=st.sampled_from([None, "relu"]))
    def set_activation(self, activation):
        for p in self.pairs:
            p.layer.activation = activation
            p.model.activation = activation

    @rule(axis=st.sampled_from([1, -1]))
    def set_axis(self, axis):
        for p in self.pairs:
            p.layer.axis = axis
            p.model.axis = axis

    @rule(mode=st.booleans())
    def train_or_eval(self, mode):
        for p in self.pairs:
            assert (p.layer.train() if mode else p.layer.eval()) is p.layer
            p.model.training = mode

    @rule(on=st.booleans())
    def freeze_or_unfreeze(self, on):
        for p in self.pairs:
            if on and not p.model.track:
                self._expect_failure(p, ValueError, p.layer.freeze)
                continue
            assert (p.layer.freeze() if on else p.layer.unfreeze()) is p.layer
            p.model.frozen = on

    @staticmethod
    def _reset_model_stats(m):
        """The model's side of ``reset_running_stats``."""
        if m.track:
            m.rm, m.rv, m.nbt = np.zeros(m.C, m.dtype), np.ones(m.C, m.dtype), 0
            m.rm_scale, m.rv_scale = np.zeros(m.C), np.zeros(m.C)

    @rule()
    def reset_running_stats(self):
        for p in self.pairs:
            p.layer.reset_running_stats()
            self._reset_model_stats(p.model)

    @rule()
    def reset_parameters(self):
        for p in self.pairs:
            p.layer.reset_parameters()
            m = p.model
            self._reset_model_stats(m)
            if m.affine:
                m.gamma, m.beta = np.ones(m.C, m.dtype), np.zeros(m.C, m.dtype)
                if m.cache is not None:
                    m.stale = True  # documented: a backward of an earlier forward raises

    @rule(lr=st.sampled_from([0.1, 0.01, 0.5]), kind=st.sampled_from(["sgd", "decay"]))
    def optimizer_step(self, lr, kind="sgd"):
        """In place on the very arrays of params, as an optimizer does: p -= lr * g, or
        with weight decay and a constant push (which changes p even where g is 0)."""
        for p in self.pairs:
            if not p.model.affine:
                assert p.layer.params == {} and p.layer.grads == {}
                continue
            params, grads = p.layer.params, p.layer.grads
            assert params["gamma"] is p.layer.gamma and grads["beta"] is p.layer.dbeta
            for name in ("gamma", "beta"):
                delta = lr * grads[name]
                if kind == "decay":
                    delta = delta + lr * 0.1 * params[name] + lr * 0.01
                params[name] -= delta  # the model's copy gets the same bits
                setattr(p.model, name, getattr(p.model, name) - delta)

    @rule(seed=st.integers(0, 2**32 - 1))
    def assign_parameters(self, seed):
        """bn.gamma = ..., bn.beta = ...: copied into the layer's arrays."""
        rng = np.random.default_rng(seed)
        for p in self.pairs:
            m = p.model
            if not m.affine:
                continue
            g = rng.uniform(0.5, 2.0, m.C) * rng.choice([-1, 1], m.C)
            b = rng.standard_normal(m.C)
            array = p.layer.gamma
            p.layer.gamma = g  # float64 values, cast to the layer's dtype
            p.layer.beta = b
            assert p.layer.gamma is array
            m.gamma, m.beta = g.astype(m.dtype), b.astype(m.dtype)
            if m.cache is not None:
                m.stale = True

    @rule(count=st.sampled_from([0, 1, 5, 1000]))
    def set_num_batches_tracked(self, count):
        """Settable (momentum=None then weighs the next batch by 1 / (count + 1))."""
        for p in self.pairs:
            m = p.model
            if not m.track:
                with pytest.raises(ValueError):
                    p.layer.num_batches_tracked = count
                continue
            p.layer.num_batches_tracked = count
            m.nbt = count

    @rule(seed=st.integers(0, 2**32 - 1))
    def assign_running_stats(self, seed):
        """bn.running_mean = ..., bn.running_var = ...: copied into the layer's arrays."""
        rng = np.random.default_rng(seed)
        for p in self.pairs:
            m = p.model
            if not m.track:
                continue
            mean, var = rng.standard_normal(m.C) * 3, rng.uniform(0.1, 10, m.C)
            p.layer.running_mean, p.layer.running_var = mean, var
            m.rm, m.rv = mean.astype(m.dtype), var.astype(m.dtype)
            m.rm_scale, m.rv_scale = np.abs(mean), var

    @rule()
    def zero_grads(self):
        """An optimizer's zero_grad: the grads arrays written in place, or assigned."""
        for i, p in enumerate(self.pairs):
            m = p.model
            if not m.affine:
                continue
            if i % 2:
                for g in p.layer.grads.values():
                    g[...] = 0
            else:
                p.layer.dgamma = np.zeros(m.C)
                p.layer.dbeta = [0] * m.C
            m.dgamma, m.dbeta = np.zeros(m.C), np.zeros(m.C)

    # -- rules: copies (new layers that then run in lockstep)

    def _add(self, pair):
        if len(self.pairs) >= MAX_LAYERS:
            del self.pairs[1]  # keep the original, drop the oldest copy
        self.pairs.append(pair)

    @rule(index=st.integers(0, MAX_LAYERS - 1), names=st.sampled_from(["cbn", "torch"]))
    def state_dict_round_trip(self, index, names):
        src = self.pairs[index % len(self.pairs)]
        state = src.layer.state_dict()
        m = src.model
        keys = (["gamma", "beta"] if m.affine else []) + (
            ["running_mean", "running_var", "num_batches_tracked"] if m.track else [])
        assert sorted(state) == sorted(keys)
        if m.track:
            assert state["num_batches_tracked"].dtype == np.int64
            assert int(state["num_batches_tracked"]) == m.nbt
        if names == "torch" and m.affine:
            state["weight"], state["bias"] = state.pop("gamma"), state.pop("beta")
        fresh = cbn.BatchNorm(**src.layer.config())
        fresh.load_state_dict(state)
        for v in state.values():  # loading copies: the dict is not aliased
            if v.dtype.kind == "f":
                v[...] = 7.0
        self._add(Pair(fresh, m.fresh_copy(), "state_dict"))

    @rule(index=st.integers(0, MAX_LAYERS - 1))
    def save_load_round_trip(self, index):
        src = self.pairs[index % len(self.pairs)]
        if self.tmpdir is None:
            self.tmpdir = tempfile.mkdtemp(prefix="cbn-state-machine-")
        path = os.path.join(self.tmpdir, "bn.npz")
        src.layer.save(path)
        loaded = cbn.BatchNorm.load(path)
        assert loaded.config() == src.layer.config()
        self._add(Pair(loaded, src.model.fresh_copy(), "save/load"))

    @rule(index=st.integers(0, MAX_LAYERS - 1), how=st.sampled_from(["deepcopy", "pickle"]))
    def copy_layer(self, index, how):
        src = self.pairs[index % len(self.pairs)]
        if how == "deepcopy":
            layer = copy.deepcopy(src.layer)
        else:
            layer = pickle.loads(pickle.dumps(src.layer))
        self._add(Pair(layer, src.model.deep_copy(), how))

    # -- invariants: every layer's state is the model's

    @invariant()
    def state_matches_model(self):
        for p in self.pairs:
            layer, m, tol = p.layer, p.model, self.tol
            where = f" ({p.origin})"
            assert layer.training is m.training and layer.frozen is m.frozen
            assert layer.eps == m.eps and layer.momentum == m.momentum
            assert layer.activation == m.activation and layer.axis == m.axis
            assert all(a is b for a, b in zip(p.own_arrays(), p.arrays)), "arrays replaced"
            if m.affine:
                assert layer.params["gamma"] is layer.gamma and layer.grads["beta"] is layer.dbeta
            if m.affine:
                # Parameters change only by exact operations: equal bits.
                assert _bits(layer.gamma) == _bits(m.gamma), "gamma" + where
                assert _bits(layer.beta) == _bits(m.beta), "beta" + where
                assert layer.dgamma.dtype == m.dtype and layer.dbeta.dtype == m.dtype
                _close(layer.dgamma, m.dgamma, m.dgamma_scale, tol, "dgamma" + where)
                _close(layer.dbeta, m.dbeta, m.dbeta_scale, tol, "dbeta" + where)
            else:
                assert layer.gamma is None and layer.beta is None
                assert layer.dgamma is None and layer.dbeta is None
            if m.track:
                assert layer.num_batches_tracked == m.nbt, (
                    f"num_batches_tracked {layer.num_batches_tracked} != {m.nbt}" + where)
                assert layer.running_mean.dtype == m.dtype
                _close(layer.running_mean, m.rm, m.rm_scale, tol, "running_mean" + where)
                _close(layer.running_var, m.rv, m.rv_scale, tol, "running_var" + where)
            else:
                assert layer.running_mean is None and layer.running_var is None
                assert layer.num_batches_tracked is None


BatchNormMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEP_COUNT,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
TestBatchNormStateMachine = BatchNormMachine.TestCase


def test_backward_before_any_forward_raises():
    for dtype in (np.float32, np.float64):
        for affine in (True, False):
            layer = cbn.BatchNorm(3, dtype=dtype, affine=affine)
            before = _snapshot(layer)
            with pytest.raises(RuntimeError):
                layer.backward(np.ones((4, 3), dtype))
            assert _snapshot(layer) == before
