"""KV fusion (C2C-style, arXiv 2510.03215): the target keeps its own text prompt; the source's states are projected into
the target's keys/values per layer and mixed in through learned gates. No soft tokens.

    cache, past_mask, last = prefill(target, prefix_kv, prompts, pad)        # frozen target over its text prompts
    kv = own_kv(cache, P)                                                    # [(K, V) (B, Hkv, T, d)] per layer
    fused = bridge(states, smask, kv=kv)                                     # the same shapes, source mixed in
    cache = rebuild(target, prefix_of(cache, P), fused)                      # then decode / score from it

C2C reads both models on the same prompt and pairs their tokens through the tokenizers; here the source may read other
text than the target (half the question each), so every target position finds what it needs by attention over the
source's states instead: for target layer l (reading source layer j(l) = l * n_src // n_tgt, early with early),

    x = LN([K_l ; V_l])                           (B, T, 2 Hkv d)    the target's own key/value at each position
    a = Attn(q = W_q x, kv = W_s h_j)             (B, T, H)          h_j: the source's states at layer j
    [dK ; dV] = W_o a                              (B, T, 2 Hkv d)    W_o starts at 0
    K_l' = K_l + tanh(g_k,l) dK,  V_l' = V_l + tanh(g_v,l) dV         one gate pair per fused layer

With W_o = 0 (initialization) or gates 0 the fused target IS the plain target (tests/test_bridge.py). Only the
example's own prompt positions are fused (the shared few-shot block is left as the target computed it), and the
prompt's last token is held back and run after the fusion, so the first answer token already reads the fused cache.
The keys are fused after the target applied RoPE, so each delta is position-free (C2C does the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a HF decoder config."""
    heads = config.num_attention_heads
    kvh = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kvh, hd


class KVFusion(nn.Module):
    def __init__(self, d_src: int, source_layers: int, target_config, tc):
        super().__init__()
        n_tgt, kvh, hd = kv_shape(target_config)
        if d_src % source_layers:
            raise ValueError(f"source dim {d_src} is not {source_layers} concatenated layers")
        self.n_src, self.d_layer, self.kv_dim = source_layers, d_src // source_layers, kvh * hd
        layers = list(tc.fusion_layers) or list(range(n_tgt))
        for i in layers:
            if not 0 <= i < n_tgt:
                raise ValueError(f"translator.fusion_layers has {i} but the target has layers 0..{n_tgt - 1}")
        self.layers = sorted(set(layers))
        self.slot = {layer: j for j, layer in enumerate(self.layers)}
        self.src_of = [layer * source_layers // n_tgt for layer in self.layers]  # source layer read per fused layer
        h, D2 = tc.hidden, 2 * self.kv_dim
        self.src = nn.ModuleList(nn.Sequential(nn.LayerNorm(self.d_layer), nn.Linear(self.d_layer, h))
                                 for _ in range(source_layers))
        self.q = nn.ModuleList(nn.Sequential(nn.LayerNorm(D2), nn.Linear(D2, h)) for _ in self.layers)
        self.attn = nn.ModuleList(nn.MultiheadAttention(h, tc.heads, batch_first=True) for _ in self.layers)
        self.out = nn.ModuleList(nn.Linear(h, D2) for _ in self.layers)
        for o in self.out:  # the fused target starts as the plain target
            nn.init.zeros_(o.weight)
            nn.init.zeros_(o.bias)
        self.gate = nn.Parameter(torch.full((len(self.layers), 2), float(tc.gate_init)))  # (n_fused, [k, v])

    def forward(self, kv: list, states: torch.Tensor, mask: torch.Tensor) -> list:
        """kv: per target layer (K, V) each (B, Hkv, T, d); states (B, S, n_src * d_layer), mask (B, S) True = real."""
        srcs = [proj(states[..., j * self.d_layer:(j + 1) * self.d_layer]) for j, proj in enumerate(self.src)]
        fused = []
        for layer, (k, v) in enumerate(kv):
            j = self.slot.get(layer)
            if j is None or k.shape[2] == 0:
                fused.append((k, v))
                continue
            B, H, T, d = k.shape
            x = torch.cat([k, v], dim=1).permute(0, 2, 1, 3).reshape(B, T, 2 * H * d)  # (B, 2H, T, d) -> (B, T, 2Hd)
            s = srcs[self.src_of[j]]  # (B, S, h)
            a = self.attn[j](self.q[j](x.to(s.dtype)), s, s, key_padding_mask=~mask, need_weights=False)[0]
            delta = self.out[j](a).reshape(B, T, 2 * H, d).permute(0, 2, 1, 3)  # (B, T, 2Hd) -> (B, 2H, T, d)
            dk, dv = delta[:, :H], delta[:, H:]  # each (B, H, T, d)
            g = torch.tanh(self.gate[j])
            fused.append((k + g[0] * dk.to(k.dtype), v + g[1] * dv.to(v.dtype)))
        return fused


@torch.no_grad()
def prefill(model, prefix_kv, prompts: list[list[int]], pad_id: int):
    """The frozen target over each prompt but its last token: the prefix all prompts share once (PrefixKV, None = no
    sharing), then each prompt's own tokens, left-padded. -> (cache, mask (B, P + L) of real cached positions, P,
    last token ids (B,))."""
    from reasonlab.eval.generate import lm_forward, new_cache
    from reasonlab.models.bridge import Row, split_prefix

    dev = model.get_input_embeddings().weight.device
    B = len(prompts)
    heads = [p[:-1] for p in prompts]
    pre: list[int] = []
    if prefix_kv is not None:
        pre, _ = split_prefix([Row(h + [-1], None, [], [], []) for h in heads])  # the -1 keeps one own slot
    P = len(pre)
    cache = prefix_kv.cache(model, pre, B) if P else new_cache(model)
    own = [h[P:] for h in heads]
    L = max(len(o) for o in own)
    ids = torch.tensor([[pad_id] * (L - len(o)) + o for o in own], device=dev)  # (B, L) left-padded
    m = torch.tensor([[0] * (L - len(o)) + [1] * len(o) for o in own], device=dev)  # (B, L)
    mask = torch.cat([torch.ones(B, P, dtype=m.dtype, device=dev), m], dim=1)  # (B, P + L)
    if L:
        lm_forward(model, cache=cache, input_ids=ids, attention_mask=mask, position_ids=P + (m.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=1)
    last = torch.tensor([p[-1] for p in prompts], device=dev)  # (B,)
    return cache, mask, P, last


def prefix_of(cache, P: int) -> list:
    """Each layer's (K, V) of the shared prefix positions: (B, Hkv, P, d)."""
    return [(layer.keys[:, :, :P], layer.values[:, :, :P]) for layer in cache.layers]


def own_kv(cache, P: int) -> list:
    """Each layer's (K, V) of the positions after the shared prefix: (B, Hkv, L, d)."""
    return [(layer.keys[:, :, P:], layer.values[:, :, P:]) for layer in cache.layers]


def rebuild(model, prefix: list, fused: list):
    """A new cache per layer: the prefix's (K, V) (B, Hkv, P, d) as the target computed them, then the fused own
    positions (gradients flow into `fused`)."""
    from reasonlab.eval.generate import new_cache

    out = new_cache(model)
    for i, ((pk, pv), (k, v)) in enumerate(zip(prefix, fused)):
        out.update(torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), i)
    return out
