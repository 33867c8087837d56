"""One decode step (one new token per row) of a Llama model written out, for the own sampler on the CPU.

A decode step through transformers + PEFT spends about a sixth of its time outside the matrix products (mask
building, output records, PEFT's per-layer dispatch and, for mixed adapters, a sub-batch gather and scatter per
linear). This is the same computation as LlamaForCausalLM's forward with a DynamicCache, op for op (RMSNorm, RoPE,
SDPA with the GQA layout transformers picks, residuals, SiLU MLP), so its logits equal transformers' bit for bit where
the linears are the same (tests/test_decode_step.py). Two differences, both only where the weights are packed
(reasonlab.eval.packed): q/k/v and gate/up run as one packed product each (bit-equal to the packed products apart),
which also packs k/v projections too small to pack alone (their results then move by float rounding).

    step = decode_step.for_model(model)   # None where it does not apply: the caller runs the model's forward
    logits = step(ids, cache, mask, pos, lora_rows)   # (b,), cache, (b, L) incl. the new token, (b, 1) -> (b, V)

`lora_rows` (b,) float: 1.0 where the row runs the active LoRA adapter, 0.0 where it runs the base model (PEFT's
"__base__" in a mixed batch); None: every row as the model is. Applies to: model_type "llama" (SmolLM2, Llama 2/3)
with SDPA attention, SiLU, RoPE types whose inverse frequencies are fixed (default, linear, llama3), on the CPU,
plain or with vanilla PEFT LoRA (one active adapter, unmerged or merged, or disabled); anything else gets None.
`REASONLAB_DECODE_STEP=0` switches it off (every step through the model's forward).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from reasonlab.eval.packed import MIN_NUMEL, available, packer_for

ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at load: transformers' forward is the plain formula


def _lora(m) -> tuple[torch.nn.Linear, tuple | None] | None:
    """(base linear, (A, B, scaling) of the active adapter or None) for an nn.Linear or a vanilla PEFT LoRA Linear
    whose adapter is unmerged, merged or disabled; None for anything else."""
    if type(m) is torch.nn.Linear:
        return m, None
    base = getattr(m, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(m, "lora_A"):
        return None
    if m.disable_adapters or m.merged:
        return (base, None) if not (m.disable_adapters and m.merged) else None  # merged + disabled: PEFT unmerges
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) > 1 or any(a in getattr(m, "lora_variant", {}) for a in active):
        return None
    if not active:
        return base, None
    a = active[0]
    if type(m.lora_dropout[a]) not in (torch.nn.Identity, torch.nn.Dropout):
        return None
    return base, (m.lora_A[a], m.lora_B[a], m.scaling[a])


class LlamaStep:
    """The plan of one model's decode step: its modules, read once per generate() call."""

    def __init__(self, model, lm, layers: list[dict], head, mixable: bool):
        self.model, self.lm, self.layers, self.head = model, lm, layers, head
        self.mixable = mixable  # every adapted linear runs its adapter unmerged: lora_rows can switch it per row
        cfg = lm.config
        self.H, self.KV = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.packer = packer_for(model) if available() else None

    def _proj(self, x: torch.Tensor, entries: list[tuple], rows: torch.Tensor | None) -> list[torch.Tensor]:
        """The outputs of linears that read the same x (b, 1, C): one packed product for all of them where their
        stacked weight is eligible (the products are computed per output column, so each part equals its own packed
        product), else each linear on its own; then each LoRA delta as PEFT adds it."""
        bases = [b for b, _ in entries]
        nb = sum(b.bias is not None for b in bases)
        if len(bases) > 1 and self.packer is not None and self.packer.depth and nb in (0, len(bases)) and \
                x.dtype == torch.float32 and all(b.weight.dtype == torch.float32 for b in bases) and \
                sum(b.weight.numel() for b in bases) >= MIN_NUMEL:
            bias = [b.bias for b in bases] if nb else None
            ys = self.packer.forward_stacked([b.weight for b in bases], bias, x).split(
                [b.out_features for b in bases], dim=-1)
        else:
            ys = [b(x) for b in bases]
        out = []
        for y, (_, lora) in zip(ys, entries):
            if lora is not None:
                A, B, s = lora
                d = B(A(x)) * s  # PEFT: result + lora_B(lora_A(dropout(x))) * scaling (dropout is off in eval)
                y = y + (d if rows is None else d * rows[:, None, None])
            out.append(y)
        return out

    @staticmethod
    def _rms(norm, x: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm, op for op
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache, mask: torch.Tensor, pos: torch.Tensor,
                 lora_rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids (b,) the new tokens, mask (b, L) over the cache's L - 1 positions plus the new one, pos (b, 1) their
        positions -> next-token logits (b, V). The cache gets each layer's new key/value appended."""
        b, H, KV, D = ids.shape[0], self.H, self.KV, self.D
        lm = self.lm
        x = lm.embed_tokens(ids[:, None])  # (b, 1, C)
        rope = lm.rotary_emb
        freqs = pos[..., None].float() * rope.inv_freq.to(device=x.device, dtype=torch.float)  # (b, 1, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * rope.attention_scaling).to(x.dtype)[:, None]  # (b, 1, 1, D): broadcast over heads
        sin = (emb.sin() * rope.attention_scaling).to(x.dtype)[:, None]
        # transformers drops an all-ones mask for one query (and lets SDPA do GQA); else a boolean (b, 1, 1, L) mask
        # with the query heads packed per key/value head
        am = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        for layer, cl in zip(self.layers, cache.layers):
            h = self._rms(layer["ln1"], x)
            q, k, v = self._proj(h, layer["qkv"], lora_rows)
            q = q.view(b, 1, H, D).transpose(1, 2)  # (b, H, 1, D)
            k = k.view(b, 1, KV, D).transpose(1, 2)  # (b, KV, 1, D)
            v = v.view(b, 1, KV, D).transpose(1, 2)
            q = (q * cos) + (self._rotate(q) * sin)
            k = (k * cos) + (self._rotate(k) * sin)
            cl.keys = torch.cat([cl.keys, k], dim=-2)  # (b, KV, L, D), as DynamicLayer.update
            cl.values = torch.cat([cl.values, v], dim=-2)
            if am is None:
                o = F.scaled_dot_product_attention(q, cl.keys, cl.values, scale=layer["scale"],
                                                   enable_gqa=KV != H)  # (b, H, 1, D)
            else:
                o = F.scaled_dot_product_attention(q.reshape(b, KV, H // KV, D), cl.keys, cl.values, attn_mask=am,
                                                   scale=layer["scale"])  # (b, KV, H/KV, D)
            o = o.reshape(b, H, 1, D).transpose(1, 2).contiguous().reshape(b, 1, H * D)
            x = x + self._proj(o, [layer["o"]], lora_rows)[0]
            h = self._rms(layer["ln2"], x)
            g, u = self._proj(h, layer["gate_up"], lora_rows)
            x = x + self._proj(F.silu(g) * u, [layer["down"]], lora_rows)[0]
        x = self._rms(lm.norm, x)
        return self._proj(x, [self.head], lora_rows)[0][:, -1, :]  # (b, V)


def for_model(model, cache=None, mixed: bool = False) -> LlamaStep | None:
    """The written-out decode step for `model` (and `cache`, a DynamicCache of plain layers), or None where it does
    not apply (the caller then runs the model's own forward). `mixed`: the caller will pass lora_rows (then every
    adapted linear must run its adapter unmerged)."""
    from transformers.cache_utils import DynamicLayer

    if os.environ.get("REASONLAB_DECODE_STEP", "1") == "0":
        return None
    m = getattr(model, "module", model)  # DistributedDataParallel
    top = m.get_base_model() if hasattr(m, "peft_config") else m
    lm = getattr(top, "model", None)
    cfg = getattr(top, "config", None)
    if cfg is None or lm is None or getattr(cfg, "model_type", None) != "llama" or top.training:
        return None
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(cfg, "hidden_act", None) != "silu":
        return None
    rope = getattr(lm, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", None) not in ROPE_TYPES or type(lm.embed_tokens) is not \
            torch.nn.Embedding:
        return None
    if cache is not None and not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    if next(top.parameters()).device.type != "cpu":  # on a GPU the own loop's cost is kernel launches, not this
        return None
    head = _lora(top.lm_head)
    layers = []
    for layer in lm.layers:
        at, mlp = layer.self_attn, layer.mlp
        qkv = [_lora(at.q_proj), _lora(at.k_proj), _lora(at.v_proj)]
        gate_up = [_lora(mlp.gate_proj), _lora(mlp.up_proj)]
        o, down = _lora(at.o_proj), _lora(mlp.down_proj)
        if any(e is None for e in [*qkv, *gate_up, o, down]):
            return None
        layers.append({"ln1": layer.input_layernorm, "ln2": layer.post_attention_layernorm, "qkv": qkv,
                       "gate_up": gate_up, "o": o, "down": down, "scale": at.scaling})
    if head is None:
        return None
    peft = [m for m in top.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    mixable = all(not m.merged and not m.disable_adapters for m in peft)
    if mixed and not mixable:
        return None
    return LlamaStep(model, lm, layers, head, mixable)
