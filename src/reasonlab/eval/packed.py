"""CPU linears on oneDNN-prepacked weights, for the forwards that need no gradient (decoding, scoring).

Decoding on a CPU multiplies a few rows by every weight matrix once per token. MKL's sgemm (what `F.linear` calls)
runs those small-row products at about a third of the memory bandwidth; the same product on a weight reordered once
into oneDNN's blocked layout is 1.6-1.8x faster at 4-16 rows and still 1.1-1.2x at 256-600 rows (SmolLM2-135M's
211 linears, 1 thread; benchmarks/README.md). Results equal `F.linear` to float rounding (about 1e-6 relative; not
bit for bit: a different kernel sums in a different order).

    with packed(model):             # every eligible nn.Linear in `model` runs on a packed copy of its weight
        ...                         # a forward under grad (or with an input that needs grad) runs the plain F.linear

Eligible: `torch.nn.Linear` on the CPU in float32 with at least MIN_NUMEL weights (PEFT's LoRA layers wrap one as
`base_layer`: the frozen base is packed, the adapter's small matrices run as they are). A packed copy is kept while
the weight is unchanged (same storage, same version counter: an optimizer step or `copy_` makes a new one), so a LoRA
run packs its base once. `packed(model)` keeps one Packer per model object (every `generate()` on it shares its copies).
Only sampling uses it: the log-probs that enter a loss stay on F.linear, so a policy and its reference give exactly
equal numbers where their weights are equal. Memory: the packed copies double the CPU weights of the linears while
the model lives. Writes through `.data` bypass the version counter: call `packer.clear()` after them.
`REASONLAB_PACKED_LINEARS=0` switches packing off.
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
    return (type(m) is torch.nn.Linear and w is not None and w.device.type == "cpu" and w.dtype == torch.float32
            and w.numel() >= MIN_NUMEL)


class Packer:
    """Packed copies of linear weights, reused while a weight is unchanged."""

    def __init__(self):
        self.cache: dict = {}  # id(weight) -> (key, packed); a tuple of ids -> (keys, stacked packed, bias)
        self.depth = 0  # open on() blocks

    def clear(self) -> None:
        self.cache.clear()

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

    def forward(self, m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != m.weight.dtype or x.device.type != "cpu" or (
                torch.is_grad_enabled() and (x.requires_grad or m.weight.requires_grad)):
            return F.linear(x, m.weight, m.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed(m.weight), m.bias, "none", [], "")

    @contextlib.contextmanager
    def on(self, model: torch.nn.Module):
        """Route the eligible linears of `model` through their packed weights until the block ends (a no-op where
        oneDNN's ops are missing; nested blocks keep the outer one's routing). Weights of linears that left the model
        are dropped from the cache."""
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
        for m in mods:
            m.forward = (lambda x, m=m: self.forward(m, x))  # an instance attribute: nn.Module.__call__ reads it
        self.depth = 1
        try:
            yield
        finally:
            self.depth = 0
            for m in mods:
                m.__dict__.pop("forward", None)

_PACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Packer (dropped with the model)


def packer_for(model: torch.nn.Module) -> Packer:
    if model not in _PACKERS:
        _PACKERS[model] = Packer()
    return _PACKERS[model]


def packed(model: torch.nn.Module):
    """`packer_for(model).on(model)`: the model's no-grad CPU linears on packed weights until the block ends."""
    return packer_for(model).on(model)
