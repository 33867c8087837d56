"""CPU linears on oneDNN-prepacked weights, for sampling and for the frozen weights of a LoRA run's updates.

Decoding on a CPU multiplies a few rows by every weight matrix once per token. MKL's sgemm (what `F.linear` calls)
runs those small-row products at about a third of the memory bandwidth; the same product on a weight reordered once
into oneDNN's blocked layout is 1.6-1.8x faster at 4-16 rows and still 1.1-1.2x at 256-600 rows (SmolLM2-135M's
211 linears, 1 thread; benchmarks/README.md). Results equal `F.linear` to float rounding (about 1e-6 relative; not
bit for bit: a different kernel sums in a different order).

    with packed(model):             # every eligible nn.Linear in `model` runs on a packed copy of its weight
        ...                         # a weight that takes gradients runs the plain F.linear (unless trained=True)

Eligible: a `torch.nn.Linear` (or a subclass that keeps its forward) on the CPU in float32 with at least MIN_NUMEL weights (PEFT's LoRA layers wrap one as
`base_layer`: the frozen base is packed, the adapter's small matrices run as they are). Under grad, a frozen weight
whose input needs a gradient (a LoRA base inside the network) runs forward on the packed weight and backward
(grad_x = g @ w) on a packed copy of its transpose; a weight or bias that takes gradients runs F.linear, or
packed with autograd's gradients under `packed(model, trained=True)` (TRM's recursion: repacked after each step). Every
forward of a step packed alike keeps a zero adapter's policy exactly equal to its reference (the same op on the same
packed weight), so the RL recipes wrap whole steps. A packed copy is kept while the weight is unchanged (same
storage, same version counter: an optimizer step or `copy_` makes a new one), so a LoRA run packs its base once.
`packed(model)` keeps one Packer per model object. Memory: the packed copies (and, after a backward, the transposes)
double or triple the CPU weights of the linears while the model lives. Writes through `.data` bypass the version
counter: call `packer.clear()` after them. `REASONLAB_PACKED_LINEARS=0` switches packing off.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
import torch.nn.functional as F

ROWS_HINT = 8  # oneDNN picks its blocking for this many rows; measured fast from 1 to 600 rows
MIN_NUMEL = 1 << 18  # the packed op costs ~12 us more per call: below ~256k weights (LoRA's A/B, a 192x576 k/v
# projection) F.linear is as fast or faster


def available() -> bool:
    """oneDNN is built in and has the packed-linear ops (torch internals that inductor's CPU backend uses), and the
    user has not switched packing off."""
    if os.environ.get("REASONLAB_PACKED_LINEARS", "1") == "0":
        return False
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") and hasattr(
        ops, "_reorder_linear_weight")


def eligible(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward and w is not None
            and w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= MIN_NUMEL)


class Packer:
    """Packed copies of linear weights, reused while a weight is unchanged."""

    def __init__(self):
        self.cache: dict = {}  # id(weight) -> (key, packed); a tuple of ids -> (keys, stacked packed, bias)
        self.tcache: dict = {}  # id(weight) -> (key, packed transpose), for the backward's grad_x
        self.depth = 0  # open on() blocks
        self.trained = False  # the open block routes weights that take gradients too

    def clear(self) -> None:
        self.cache.clear()
        self.tcache.clear()

    def packed(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w._version, tuple(w.shape))
        hit = self.cache.get(id(w))
        if hit is None or hit[0] != key:
            hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), ROWS_HINT))
            self.cache[id(w)] = hit
        return hit[1]

    def forward_stacked(self, ws: list[torch.Tensor], biases: list[torch.Tensor] | None,
                        x: torch.Tensor) -> torch.Tensor:
        """x @ cat(ws).T (+ cat(biases)) on one packed copy of the stacked weights (q/k/v, gate/up: linears that
        read the same input), no grad: (..., in) -> (..., sum of outs). Kept while every weight is unchanged."""
        key = tuple((w.data_ptr(), w._version, tuple(w.shape)) for w in ws)
        ids = tuple(id(w) for w in ws)
        hit = self.cache.get(ids)
        if hit is None or hit[0] != key:
            hit = (key, torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in ws]), ROWS_HINT),
                   None if biases is None else torch.cat([b.detach() for b in biases]))
            self.cache[ids] = hit
        return torch.ops.mkldnn._linear_pointwise(x, hit[1], hit[2], "none", [], "")

    def packed_t(self, w: torch.Tensor) -> torch.Tensor:
        """The packed transpose of `w` (the backward's grad_x = g @ w), kept like packed(w)."""
        key = (w.data_ptr(), w._version, tuple(w.shape))
        hit = self.tcache.get(id(w))
        if hit is None or hit[0] != key:
            hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach().t().contiguous(), ROWS_HINT))
            self.tcache[id(w)] = hit
        return hit[1]

    def forward(self, m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w, b = m.weight, m.bias
        if x.dtype != w.dtype or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return F.linear(x, w, b)  # (autocast picks its own dtype per op: leave the op to it)
        grad = torch.is_grad_enabled()
        trains = grad and (w.requires_grad or (b is not None and b.requires_grad))
        if trains and not self.trained:
            return F.linear(x, w, b)  # a trained weight outside on(trained=True): autograd's own linear
        if trains or (grad and x.requires_grad):  # packed forward and backward, on (rows, in)
            return _PackedLinear.apply(x.reshape(-1, x.shape[-1]), w, b, self).view(*x.shape[:-1], w.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x, self.packed(w), b, "none", [], "")

    @contextlib.contextmanager
    def on(self, model: torch.nn.Module, trained: bool = False):
        """Route the eligible linears of `model` through their packed weights until the block ends (a no-op where
        oneDNN's ops are missing; nested blocks keep the outer one's routing). `trained`: weights that take
        gradients run packed too (repacked after every optimizer step; their gradient is g.T @ x as autograd's),
        else they run F.linear. Weights of linears that left the model are dropped from the cache."""
        if not available() or self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        mods = [m for m in model.modules() if eligible(m)]
        live = {id(p) for p in model.parameters()}
        for k in [k for k in self.cache if not all(i in live for i in (k if isinstance(k, tuple) else (k,)))]:
            del self.cache[k]
        for k in [k for k in self.tcache if k not in live]:
            del self.tcache[k]
        for m in mods:
            m.forward = (lambda x, m=m: self.forward(m, x))  # an instance attribute: nn.Module.__call__ reads it
        self.depth, self.trained = 1, trained
        try:
            yield
        finally:
            self.depth, self.trained = 0, False
            for m in mods:
                m.__dict__.pop("forward", None)

class _PackedLinear(torch.autograd.Function):
    """y = x @ w.T + b on packed copies both ways: forward on packed(w) (the same op as the no-grad path, so a policy
    whose adapter is still zero gives exactly its reference's numbers), backward's grad_x = g @ w on packed_t(w);
    grad_w = g.T @ x and grad_b = sum g where they take gradients (x is kept for the backward only then). Works on
    x (rows, in) -> (rows, out): the caller views the result back to x's leading shape outside the Function, and
    autograd lets an in-place add write into that view (TRM's residuals do; into a Function's own view it may not)."""

    @staticmethod
    def forward(ctx, x, w, b, packer):
        ctx.packer = packer
        ctx.save_for_backward(x if w.requires_grad else None, w)
        return torch.ops.mkldnn._linear_pointwise(x, packer.packed(w), b, "none", [], "")  # (rows, out)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        g = g.contiguous()  # (rows, out)
        gx = torch.ops.mkldnn._linear_pointwise(g, ctx.packer.packed_t(w), None, "none", [], "") if need_x else None
        gw = g.t() @ x if need_w else None  # (out, in)
        gb = g.sum(0) if need_b else None
        return gx, gw, gb, None


_PACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Packer (dropped with the model)


def packer_for(model: torch.nn.Module) -> Packer:
    if model not in _PACKERS:
        _PACKERS[model] = Packer()
    return _PACKERS[model]


def packed(model: torch.nn.Module, trained: bool = False):
    """`packer_for(model).on(model, trained)`: the model's eligible CPU linears on packed weights until the block
    ends (weights that take gradients too when `trained`)."""
    return packer_for(model).on(model, trained)
