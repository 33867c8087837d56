"""Latent bridge: a frozen source model's hidden states -> a trainable translator -> soft tokens that a frozen target
model reads in place of the question.

    source = load_source(SourceConfig(name="minilm-l6", layers=[0, -1]))
    states, mask = source.encode(["What is 2 + 3?"])                        # (B, S, Ds), (B, S)
    bridge = Bridge(source.dim, target_embedding, TranslatorConfig(kind="resampler", num_queries=8))
    soft, soft_mask = bridge(states, mask)                                 # (B, K, Dt), (B, K)
    rows = [Row(before_ids, soft[i][soft_mask[i]], [], after_ids, answer_ids) for i in ...]
    embeds, attn, labels = assemble(target_embedding, rows)                # left-padded (B, T, Dt), (B, T), (B, T)

Translators (both end in the same scaling):
- resampler: K learned queries cross-attend to the source states (Perceiver resampler / Q-Former style), then self-attend;
  K soft tokens whatever the source length.
- mlp: a per-token MLP; each source token becomes `expand` soft tokens (so a one-token "23" in the source vocabulary can
  become two digit-like tokens in a digit-splitting target vocabulary).
Soft tokens are RMS-normalized per token and multiplied by the target's embedding scale (the mean per-token RMS of its
input-embedding matrix), so they enter the target at the norm its real tokens have (LatentWire did the same).

Optional flow auxiliary (`FlowDiT`): a small DiT (adaLN-Zero on the flow time, cross-attention to the soft tokens)
trained with rectified flow to carry Gaussian noise to the target's embeddings of the question. Its loss only helps if
the soft tokens contain the question, so its gradient pushes question content into them. (Seed 001: DiT bridges lost
to cross-attention resamplers everywhere they were compared; here it is an auxiliary loss, never the translator.)

Loss functions (all scalars, each one weighted term of the recipe's total and audited on its own):
answer_nll, kl_first_k (the teacher is the target reading the REAL question), prompt_alignment, info_nce (one symmetric
term), separation (gold answer must be likelier under the true source than under a shuffled one), FlowDiT.loss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_

from reasonlab.config import F
from reasonlab.errors import UserError


class BridgeError(UserError, ValueError):
    """A bridge setting the user can fix; one line naming the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# configs


@dataclass
class SourceConfig:
    name: str = F("minilm-l6", "source model: embedded alias, local HF folder or hub id (decoder or encoder)")
    layers: list[int] = F([-1], "hidden_states indices read from the source (0 = embedding output, -1 = last layer)")
    combine: str = F("concat", "how several layers are combined: concat (feature axis) | mean")
    text: str = F("question", "what the source reads: question (the question text) | prompt (the task's full prompt) "
                              "| source_text (the part of the question only the source gets, a task's "
                              "meta['source_text'], e.g. number-words split_question)")
    max_len: int = F(512, "truncate the source input to this many tokens (from the left: the question is at the end)")
    dtype: str = F("float32", "float32 | bfloat16 | float16")

    def __post_init__(self):
        if not self.layers:
            raise ValueError("source.layers must name at least one hidden-state index, e.g. [-1]")
        if self.combine not in ("concat", "mean"):
            raise ValueError(f"source.combine must be concat | mean, got {self.combine!r}")
        if self.text not in ("question", "prompt", "source_text"):
            raise ValueError(f"source.text must be question | prompt | source_text, got {self.text!r}")


KINDS = ("resampler", "mlp", "dit", "kv_fusion")


@dataclass
class TranslatorConfig:
    kind: str = F("resampler", "resampler (K learned queries cross-attend to the source) | mlp (per source token) | "
                               "dit (LatentWire's DiT: K soft tokens by a rectified flow from noise, conditioned on "
                               "the source) | kv_fusion (C2C-style: no soft tokens; the source is fused into the "
                               "target's own prompt keys/values per layer through gates; needs bridge.mode kv_fusion)")
    num_queries: int = F(16, "resampler / dit: number of soft tokens K")
    flow_steps: int = F(4, "dit: Euler steps from noise to soft tokens (unrolled in training: the NLL trains them)")
    fusion_layers: list[int] = F([], "kv_fusion: target layers that receive the source ([] = every layer)")
    gate_init: float = F(1.0, "kv_fusion: initial per-layer gate g (scale tanh(g)); the projector's output starts at "
                              "0, so the fused target starts as the plain target whatever the gate")
    expand: int = F(1, "mlp: soft tokens per source token")
    hidden: int = F(256, "translator width")
    layers: int = F(2, "resampler blocks (cross-attention, self-attention, MLP) | mlp hidden layers")
    heads: int = F(4, "attention heads (resampler)")
    mlp_ratio: int = F(4, "MLP width multiplier inside a resampler block")
    dropout: float = F(0.0, "dropout inside the translator")
    scale: str = F("target_rms", "target_rms: every soft token gets the target's embedding RMS | none")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"translator.kind must be {' | '.join(KINDS)}, got {self.kind!r}")
        if self.flow_steps < 1:
            raise ValueError("translator.flow_steps must be >= 1")
        if self.scale not in ("target_rms", "none"):
            raise ValueError(f"translator.scale must be target_rms | none, got {self.scale!r}")
        if self.num_queries < 1 or self.expand < 1 or self.layers < 1:
            raise ValueError("translator.num_queries, expand and layers must be >= 1")
        if self.kind != "mlp" and self.hidden % self.heads:
            raise ValueError(f"translator.hidden {self.hidden} must be divisible by translator.heads {self.heads}")


@dataclass
class DiTConfig:
    enabled: bool = F(False, "build the flow-matching DiT auxiliary (its loss weight is loss.dit)")
    hidden: int = F(128, "DiT width")
    layers: int = F(2, "DiT blocks")
    heads: int = F(4, "DiT attention heads")
    max_len: int = F(128, "question tokens the DiT reconstructs (longer questions are truncated)")

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"dit.hidden {self.hidden} must be divisible by dit.heads {self.heads}")


# ----------------------------------------------------------------------------------------------------------------------
# source


class Source:
    """A frozen HF model (decoder or encoder) read at chosen layers. `can_generate` when it is a causal LM."""

    def __init__(self, model, tok, cfg: SourceConfig, can_generate: bool):
        self.model, self.tok, self.cfg, self.can_generate = model, tok, cfg, can_generate
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        n_states = model.config.num_hidden_layers + 1
        for i in cfg.layers:
            if not -n_states <= i < n_states:
                raise BridgeError(f"source.layers has {i} but the source has hidden states 0..{n_states - 1} "
                                  f"(or -1..-{n_states})")
        h = model.config.hidden_size
        self.dim = h * len(cfg.layers) if cfg.combine == "concat" else h

    @property
    def device(self):
        return next(self.model.parameters()).device

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        ids = [self.tok(t, add_special_tokens=True)["input_ids"] for t in texts]
        return [r[-self.cfg.max_len:] for r in ids]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at cfg.layers: (B, S, dim) and the token mask (B, S) (right-padded, True = real token)."""
        rows = self.token_ids(texts)
        S = max(len(r) for r in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (S - len(r)) for r in rows], device=self.device)  # (B, S)
        mask = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows], device=self.device)  # (B, S)
        body = self.model.get_decoder() if self.can_generate else self.model
        out = body(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hs = [out.hidden_states[i].float() for i in self.cfg.layers]  # each (B, S, H)
        x = torch.cat(hs, dim=-1) if self.cfg.combine == "concat" else torch.stack(hs).mean(0)  # (B, S, dim)
        return x, mask.bool()


def load_source(cfg: SourceConfig, *, device="cpu", stand_in: bool = False) -> Source:
    """Load the source model frozen. A causal LM (config.architectures ends in ForCausalLM) is loaded with its head so
    it can also answer on its own ("source alone"); anything else (BERT, MiniLM, T5 encoders ...) via AutoModel.
    `stand_in` (dry runs of configs whose model is not available offline): a tiny random decoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from reasonlab.models.lm import (DTYPES, ModelUnavailable, _hub_hint, _offline, load_tokenizer,
                                     resolve_model_path, tiny_causal_lm)

    if stand_in or cfg.name == "tiny-random":
        model, tok = tiny_causal_lm(hidden=48, heads=4, seed=1)
        if stand_in:  # the configured layer indices belong to the real model: clamp them into the stand-in's range
            n = model.config.num_hidden_layers + 1
            cfg = dataclasses.replace(cfg, layers=[max(-n, min(i, n - 1)) for i in cfg.layers])
        return Source(model.to(device), tok, cfg, can_generate=True)
    path, _ = resolve_model_path(cfg.name)
    local = path != cfg.name or _offline()
    try:
        mc = AutoConfig.from_pretrained(path, local_files_only=local)
        causal = any(a.endswith("ForCausalLM") for a in (getattr(mc, "architectures", None) or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(path, dtype=DTYPES[cfg.dtype], local_files_only=local)
        tok = load_tokenizer(cfg.name) if causal else AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as e:
        raise ModelUnavailable(_hub_hint(cfg.name, e)) from None
    return Source(model.to(device), tok, cfg, can_generate=causal)


# ----------------------------------------------------------------------------------------------------------------------
# translators


def embedding_rms(embedding: torch.Tensor) -> float:
    """Mean per-token RMS of an embedding matrix (V, D): the scale soft tokens are given."""
    return float(embedding.detach().float().pow(2).mean(-1).sqrt().mean())


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class ResamplerBlock(nn.Module):
    def __init__(self, h: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_s, self.ln_m = nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h)
        self.cross = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(h, mlp_ratio * h), nn.GELU(), nn.Linear(mlp_ratio * h, h))

    def forward(self, q, kv, kv_pad):  # q (B, K, H), kv (B, S, H), kv_pad (B, S) True = padding
        kv = self.ln_kv(kv)
        q = q + self.cross(self.ln_q(q), kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        s = self.ln_s(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.mlp(self.ln_m(q))


class Resampler(nn.Module):
    """K learned queries over the source states -> (B, K, d_out)."""

    def __init__(self, d_src: int, d_out: int, tc: TranslatorConfig):
        super().__init__()
        h = tc.hidden
        self.inp = nn.Sequential(nn.LayerNorm(d_src), nn.Linear(d_src, h))
        self.queries = nn.Parameter(torch.randn(tc.num_queries, h) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(h, tc.heads, tc.mlp_ratio, tc.dropout) for _ in range(tc.layers))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d_out))

    def forward(self, states, mask):  # (B, S, Ds), (B, S) True = real
        kv = self.inp(states)  # (B, S, H)
        q = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)  # (B, K, H)
        for blk in self.blocks:
            q = blk(q, kv, ~mask)
        out = self.out(q)  # (B, K, Dt)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)


class TokenMLP(nn.Module):
    """Each source token -> `expand` soft tokens: (B, S, Ds) -> (B, S*expand, d_out)."""

    def __init__(self, d_src: int, d_out: int, tc: TranslatorConfig):
        super().__init__()
        self.expand = tc.expand
        layers: list[nn.Module] = [nn.LayerNorm(d_src), nn.Linear(d_src, tc.hidden), nn.GELU()]
        for _ in range(tc.layers - 1):
            layers += [nn.Dropout(tc.dropout), nn.Linear(tc.hidden, tc.hidden), nn.GELU()]
        layers.append(nn.Linear(tc.hidden, tc.expand * d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, states, mask):
        B, S, _ = states.shape
        out = self.net(states).reshape(B, S * self.expand, -1)  # (B, S, e*Dt) -> (B, S*e, Dt)
        return out, mask.repeat_interleave(self.expand, dim=1)  # (B, S*e)


class Bridge(nn.Module):
    """Translator (+ optional flow DiT). forward(states, mask) -> soft tokens (B, K, Dt) and their mask (B, K)."""

    def __init__(self, d_src: int, target_embedding: torch.Tensor, tc: TranslatorConfig,
                 dc: DiTConfig | None = None, ctc_blank: bool = False, target_config=None, source_layers: int = 1):
        super().__init__()
        d_tgt = target_embedding.shape[1]
        self.tc = tc
        if tc.kind == "kv_fusion":
            if target_config is None:
                raise ValueError("translator.kind kv_fusion needs the target's config (layers, key/value heads)")
            from reasonlab.models.bridge_fusion import KVFusion

            self.translator = KVFusion(d_src, source_layers, target_config, tc)
        else:
            cls = {"resampler": Resampler, "mlp": TokenMLP, "dit": DiTTranslator}[tc.kind]
            self.translator = cls(d_src, d_tgt, tc)
        # the target's embedding scale, a buffer so checkpoints carry it and it never trains
        self.register_buffer("target_rms", torch.tensor(embedding_rms(target_embedding)))
        self.dit = FlowDiT(d_tgt, dc) if dc is not None and dc.enabled else None
        # the CTC blank direction (only when the CTC alignment loss is used: an unused parameter would never train)
        self.blank = nn.Parameter(torch.randn(d_tgt) * self.target_rms) if ctc_blank else None

    def forward(self, states: torch.Tensor, mask: torch.Tensor, dit_target: tuple | None = None,
                generator: torch.Generator | None = None, with_aux: bool = False, kv: list | None = None,
                flow_target: tuple | None = None):
        """-> (soft (B, K, Dt), mask (B, K)); with_aux: (soft, mask, aux) where aux holds the DiT loss on dit_target
        = (question embeddings (B, L, Dt), mask (B, L)), the dit translator's flow loss on flow_target (the same
        pair) and the CTC blank. Training asks for them here because under DDP a parameter used outside the
        wrapped module's forward (the DiT, the blank) breaks the gradient sync ("mark a variable ready only once").
        kv_fusion: forward(states, mask, kv=[(K, V) per target layer, each (B, Hkv, T, d)]) -> the fused list."""
        if self.tc.kind == "kv_fusion":
            if kv is None:
                raise ValueError("the kv_fusion translator fuses a prompt's keys/values: pass kv=")
            return self.translator(kv, states, mask)
        if self.tc.kind == "dit":
            x, m = self.translator(states, mask, generator)  # (B, K, Dt), (B, K)
        else:
            x, m = self.translator(states, mask)  # (B, K, Dt), (B, K)
        if self.tc.scale == "target_rms":
            x = rms_normalize(x) * self.target_rms
        if not with_aux:
            return x, m
        aux: dict[str, torch.Tensor] = {}
        if flow_target is not None:
            aux["flow"] = self.translator.flow_loss(flow_target[0], flow_target[1], states, mask, self.target_rms,
                                                   generator)
        if dit_target is not None:
            aux["dit"] = self.dit.loss(dit_target[0], dit_target[1], x, m, self.target_rms, generator)
        if self.blank is not None:
            aux["blank"] = self.blank.clone()  # an output with a grad_fn, so DDP sees the blank as used
        return x, m, aux


# ----------------------------------------------------------------------------------------------------------------------
# flow-matching DiT auxiliary


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow times t in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F_.pad(emb, (0, dim - emb.shape[1]))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP (modulated by the flow time), plus an ungated cross-attention to the soft
    tokens (ungated so the conditioning gets gradient from the first step)."""

    def __init__(self, h: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(h, elementwise_affine=False)
        self.ln2 = nn.LayerNorm(h, elementwise_affine=False)
        self.ln_c = nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, heads, batch_first=True)
        self.cross = nn.MultiheadAttention(h, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
        self.ada = nn.Linear(h, 6 * h)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, pad, c, c_pad, temb):  # x (B, L, H), c (B, K, H), temb (B, H)
        s1, g1, b1, s2, g2, b2 = self.ada(F_.silu(temb)).unsqueeze(1).chunk(6, dim=-1)  # each (B, 1, H)
        h = self.ln1(x) * (1 + s1) + b1
        x = x + g1 * self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        x = x + self.cross(self.ln_c(x), c, c, key_padding_mask=c_pad, need_weights=False)[0]
        h = self.ln2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class FlowDiT(nn.Module):
    """Rectified flow on the target's question embeddings (in units of the target embedding RMS), conditioned on the
    soft tokens: x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), loss = || v(x_t, t, soft) - (x1 - x0) ||^2 over question tokens."""

    def __init__(self, d_tgt: int, dc: DiTConfig):
        super().__init__()
        h = dc.hidden
        self.max_len = dc.max_len
        self.inp = nn.Linear(d_tgt, h)
        self.cond = nn.Linear(d_tgt, h)
        self.pos = nn.Parameter(torch.randn(dc.max_len, h) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(DiTBlock(h, dc.heads) for _ in range(dc.layers))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d_tgt))

    def velocity(self, xt, pad, t, soft, soft_pad):
        L = xt.shape[1]
        x = self.inp(xt) + self.pos[:L]  # (B, L, H)
        c = self.cond(soft)  # (B, K, H)
        temb = self.t_mlp(timestep_embedding(t, x.shape[-1]))  # (B, H)
        for blk in self.blocks:
            x = blk(x, pad, c, soft_pad, temb)
        return self.out(x)  # (B, L, Dt)

    def loss(self, x1: torch.Tensor, x1_mask: torch.Tensor, soft: torch.Tensor, soft_mask: torch.Tensor,
             scale: float | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x1 (B, L, Dt) the target's question embeddings with mask (B, L); soft (B, K, Dt) with mask (B, K)."""
        x1, x1_mask = x1[:, : self.max_len] / scale, x1_mask[:, : self.max_len]
        B = x1.shape[0]
        t = torch.rand(B, generator=generator).to(x1.device)  # (B,) drawn on the CPU generator, then moved
        x0 = torch.randn(x1.shape, generator=generator).to(x1.device)  # (B, L, Dt)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        v = self.velocity(xt, ~x1_mask, t, soft / scale, ~soft_mask)
        err = (v - (x1 - x0)).pow(2).mean(-1)  # (B, L)
        m = x1_mask.float()
        return (err * m).sum() / m.sum().clamp(min=1)


def resample_tokens(x: torch.Tensor, mask: torch.Tensor, K: int) -> torch.Tensor:
    """Each row's real tokens (B, L, D) linearly interpolated to K positions: (B, K, D) (LatentWire's flow target)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i, mask[i]].T[None]  # (1, D, n)
        out.append(F_.interpolate(xi, size=K, mode="linear", align_corners=True)[0].T if xi.shape[-1] > 1
                   else xi[0].T.expand(K, -1))
    return torch.stack(out)


class DiTTranslator(nn.Module):
    """LatentWire's DiT bridge used as the translator: K soft tokens generated by a rectified flow from Gaussian noise,
    conditioned on the source (cross-attention to its states; the flow time plus the pooled source modulate every
    block, adaLN-Zero). forward Euler-integrates `flow_steps` velocity steps from seeded noise, unrolled with
    gradient, so the answer NLL (and every other term) trains it end to end; flow_loss is LatentWire's own objective,
    velocity regression toward the target's embeddings of the question resampled to K positions (loss.flow). The
    anchor's DiT bridges lost to cross-attention resamplers everywhere they were compared: it is here to compare."""

    def __init__(self, d_src: int, d_tgt: int, tc: TranslatorConfig):
        super().__init__()
        h = tc.hidden
        self.K, self.steps, self.d_tgt = tc.num_queries, tc.flow_steps, d_tgt
        self.src = nn.Sequential(nn.LayerNorm(d_src), nn.Linear(d_src, h))
        self.pool = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.inp = nn.Linear(d_tgt, h)
        self.pos = nn.Parameter(torch.randn(tc.num_queries, h) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(DiTBlock(h, tc.heads) for _ in range(tc.layers))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d_tgt))

    def velocity(self, x, t, states, mask):  # x (B, K, Dt) in target-RMS units, t (B,), states (B, S, Ds)
        c = self.src(states)  # (B, S, H)
        cond = self.t_mlp(timestep_embedding(t, c.shape[-1])) + self.pool(masked_mean(c, mask))  # (B, H)
        z = self.inp(x) + self.pos  # (B, K, H)
        for blk in self.blocks:
            z = blk(z, None, c, ~mask, cond)
        return self.out(z)  # (B, K, Dt)

    def forward(self, states, mask, generator: torch.Generator | None = None):
        B = states.shape[0]
        x = torch.randn(B, self.K, self.d_tgt, generator=generator).to(states.device)  # (B, K, Dt): t = 0
        for i in range(self.steps):
            t = torch.full((B,), i / self.steps, device=states.device)
            x = x + self.velocity(x, t, states, mask) / self.steps
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def flow_loss(self, q_emb, q_mask, states, mask, scale, generator: torch.Generator | None = None):
        """|| v(x_t, t | source) - (x1 - x0) ||^2 with x1 = the question's target embeddings (B, L, Dt) resampled to K
        positions, in units of the target embedding RMS; x_t = (1 - t) x0 + t x1, x0 ~ N(0, I)."""
        x1 = resample_tokens(q_emb / scale, q_mask, self.K)  # (B, K, Dt)
        B = x1.shape[0]
        t = torch.rand(B, generator=generator).to(x1.device)
        x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        return (self.velocity(xt, t, states, mask) - (x1 - x0)).pow(2).mean()


# ----------------------------------------------------------------------------------------------------------------------
# target inputs


@dataclass
class Row:
    """One target input: before ids + soft tokens + question text ids + after ids + answer ids (teacher-forced)."""

    before: list[int]
    soft: torch.Tensor | None  # (k, Dt) or None (a text-only row)
    text: list[int]  # the question's text tokens (soft_plus_text rows and the target-alone/teacher rows)
    after: list[int]
    answer: list[int]  # answer token ids (+ EOS) scored by the NLL/KL; [] for generation


def assemble(embedding: nn.Embedding, rows: list[Row], pad_id: int = 0):
    """Left-padded inputs_embeds (B, T, Dt), attention mask (B, T) and labels (B, T) (-100 except answer tokens).
    Left padding puts every row's answer at the end, so the logits to keep are the last max(len(answer)) + 1."""
    dev = embedding.weight.device
    embs, labels = [], []
    for r in rows:
        k = 0 if r.soft is None else r.soft.shape[0]
        ids = r.before + [pad_id] * k + r.text + r.after + r.answer
        e = embedding(torch.tensor(ids, device=dev))  # (n, Dt)
        if k:
            nb = len(r.before)
            e = torch.cat([e[:nb], r.soft.to(e.dtype), e[nb + k:]], dim=0)  # soft tokens in their slots
        embs.append(e)
        labels.append([-100] * (len(ids) - len(r.answer)) + r.answer)
    T = max(e.shape[0] for e in embs)
    D = embs[0].shape[1]
    out = torch.stack([torch.cat([e.new_zeros(T - e.shape[0], D), e]) for e in embs])  # (B, T, Dt)
    attn = torch.tensor([[0] * (T - e.shape[0]) + [1] * e.shape[0] for e in embs], device=dev)  # (B, T)
    lab = torch.tensor([[-100] * (T - len(lb)) + lb for lb in labels], device=dev)  # (B, T)
    return out, attn, lab


def split_prefix(rows: list[Row]) -> tuple[list[int], list[Row]]:
    """The longest run of leading `before` ids every row shares (the task's few-shot block before the question),
    keeping at least one token of each row's own, and the rows without it."""
    befores = [r.before for r in rows]
    n = min(len(b) for b in befores) - 1
    P = 0
    while P < n and all(b[P] == befores[0][P] for b in befores):
        P += 1
    return befores[0][:P], [dataclasses.replace(r, before=r.before[P:]) for r in rows]


class PrefixKV:
    """Keys/values of a prefix every row of a batch shares, computed once per distinct prefix by a FROZEN target and
    reused by every later forward (the rows then run only their own tokens: ~10x fewer positions for a 6-shot prompt).
    The same function as one forward over the whole rows up to float rounding (tests/test_bridge.py). Only valid
    while the target's weights do not change: the recipe uses it only without a target LoRA."""

    def __init__(self):
        self._kv: dict[tuple, list] = {}

    def cache(self, model, ids: list[int], B: int):
        """A fresh cache holding the prefix `ids` for B rows (the stored tensors are expanded, never copied)."""
        from reasonlab.eval.generate import lm_forward, new_cache

        key = tuple(ids)
        if key not in self._kv:
            dev = model.get_input_embeddings().weight.device
            c = new_cache(model)
            x = torch.tensor([ids], device=dev)  # (1, P)
            with torch.no_grad():
                lm_forward(model, cache=c, input_ids=x, attention_mask=torch.ones_like(x),
                           position_ids=torch.arange(len(ids), device=dev)[None], logits_to_keep=1)
            self._kv[key] = [(layer.keys, layer.values) for layer in c.layers]  # each (1, H, P, d)
        c = new_cache(model)
        for i, (k, v) in enumerate(self._kv[key]):
            c.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)  # (B, H, P, d)
        return c


def answer_logits(model, embeds: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, past=None,
                  past_mask: torch.Tensor | None = None):
    """Forward the target; logits at the positions that predict answer tokens: (B, A, V) with targets (B, A) and a
    mask (B, A) (A = the longest answer; shorter answers are left-aligned in the A slots). `past`: a cache whose
    positions (mask (B, P), True = real) come before `embeds` (PrefixKV's shared prefix, or KV fusion's prompt)."""
    from reasonlab.eval.generate import lm_forward

    keep = int((labels != -100).sum(1).max()) + 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding never shifts a row's positions
    if past_mask is not None:  # the new tokens continue after the cached real positions
        pos = pos + past_mask.sum(1, keepdim=True)
        attn = torch.cat([past_mask.to(attn.dtype), attn], dim=1)  # (B, P + T)
    logits = lm_forward(model, cache=past, inputs_embeds=embeds, attention_mask=attn, position_ids=pos,
                        logits_to_keep=keep).logits
    logits = logits[:, :-1].float()  # (B, A, V): position j predicts token j+1
    tgt = labels[:, -(keep - 1):]  # (B, A)
    # answers are right-aligned (left padding): move each row's answer to the front so slot i = i-th answer token
    n = (tgt != -100).sum(1)  # (B,)
    A = tgt.shape[1]
    idx = (torch.arange(A, device=tgt.device)[None] + (A - n)[:, None]) % A  # (B, A)
    logits = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
    tgt = tgt.gather(1, idx)
    mask = torch.arange(A, device=tgt.device)[None] < n[:, None]  # (B, A)
    return logits, tgt.clamp(min=0), mask


# ----------------------------------------------------------------------------------------------------------------------
# losses


def answer_nll(logits: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL per example of its answer tokens: (B,)."""
    lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)  # (B, A)
    m = mask.float()
    return -(lp * m).sum(1) / m.sum(1).clamp(min=1)


def kl_first_k(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, k: int,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at the first k answer positions (teacher-forced on the
    gold answer), averaged over each example's positions, then over the batch (so the mean of equal shards is the
    batch's mean: data-parallel runs match one process). student/teacher (B, A, V), mask (B, A)."""
    k = min(k, student.shape[1])
    s = torch.log_softmax(student[:, :k] / temperature, -1)
    t = torch.log_softmax(teacher[:, :k].detach() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, k)
    m = mask[:, :k].float()
    return ((kl * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (B, D)."""
    m = mask.float()[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def prompt_alignment(soft, soft_mask, q_emb, q_mask, mode: str = "mean") -> torch.Tensor:
    """Soft tokens (B, K, D) vs the target's embeddings of the question tokens (B, L, D), in [0, 2]:
    mean     1 - cos(mean soft token, mean question-token embedding)
    chamfer  1 - cos averaged over both directions of nearest neighbours: every question token must be close to some
             soft token and every soft token to some question token (order- and length-free, so it works whatever
             the two tokenizers and the number of soft tokens)."""
    if mode == "mean":
        return (1 - F_.cosine_similarity(masked_mean(soft, soft_mask), masked_mean(q_emb, q_mask), dim=-1)).mean()
    if mode != "chamfer":
        raise ValueError(f"alignment mode must be mean | chamfer, got {mode!r}")
    sim = F_.normalize(q_emb, dim=-1) @ F_.normalize(soft, dim=-1).transpose(1, 2)  # (B, L, K) cosines
    q_best = sim.masked_fill(~soft_mask[:, None, :], -2.0).max(-1).values  # (B, L): best soft token per question token
    s_best = sim.masked_fill(~q_mask[:, :, None], -2.0).max(1).values  # (B, K): best question token per soft token
    qm, sm = q_mask.float(), soft_mask.float()
    q_term = ((1 - q_best) * qm).sum(1) / qm.sum(1).clamp(min=1)
    s_term = ((1 - s_best) * sm).sum(1) / sm.sum(1).clamp(min=1)
    return (0.5 * (q_term + s_term)).mean()


def ctc_alignment(soft, soft_mask, q_ids, q_mask, embedding: torch.Tensor, blank: torch.Tensor,
                  tau: float) -> torch.Tensor:
    """CTC transcription of the question's target tokens by the soft tokens: soft token k "reads as" token v with logit
    cos(soft_k, E_v) / tau (E = the target's input embeddings; a learned `blank` direction is the CTC blank), and CTC
    sums over every monotone alignment of the question's L tokens to the K soft tokens. Low loss = the soft tokens
    spell the question in the target's own embedding space, in order. Rows with K < L (+ repeats) are infeasible and
    count 0 (zero_infinity). soft (B, K, D), q_ids (B, L); mean over the batch of the per-token CTC loss."""
    vocab = F_.normalize(torch.cat([embedding.detach(), blank[None].to(embedding.dtype)], dim=0).float(), dim=-1)
    logits = F_.normalize(soft.float(), dim=-1) @ vocab.T / tau  # (B, K, V+1); blank = index V
    order = torch.argsort((~soft_mask).to(torch.int8), dim=1, stable=True)  # real soft tokens first
    logits = logits.gather(1, order[..., None].expand(-1, -1, logits.shape[-1]))
    logp = torch.log_softmax(logits, -1).transpose(0, 1)  # (K, B, V+1) as ctc_loss wants
    return F_.ctc_loss(logp, q_ids, soft_mask.sum(1), q_mask.sum(1), blank=embedding.shape[0], reduction="mean",
                       zero_infinity=True)


def info_nce(soft, soft_mask, q_emb, q_mask, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between pooled soft tokens and pooled question embeddings over the batch (positives on the
    diagonal). ONE term: the recipe adds it once, whatever other weights are set (seed 001 counted it twice)."""
    a = F_.normalize(masked_mean(soft, soft_mask), dim=-1)  # (B, D)
    b = F_.normalize(masked_mean(q_emb, q_mask), dim=-1)  # (B, D)
    logits = a @ b.T / tau  # (B, B)
    y = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F_.cross_entropy(logits, y) + F_.cross_entropy(logits.T, y))


def separation(nll_true: torch.Tensor, nll_shuffled: torch.Tensor, margin: float) -> torch.Tensor:
    """softplus(margin - (nll_shuffled - nll_true)), mean over the batch: the gold answer must be at least `margin`
    nats/token likelier under its own source than under another example's (Interlat's matched-vs-mismatched
    separation, directional). Smooth, so a satisfied margin leaves a small gradient instead of exactly zero."""
    return F_.softplus(margin - (nll_shuffled - nll_true)).mean()


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2): row i receives source perm[i] != i."""
    if n < 2:
        raise ValueError("shuffling sources needs at least 2 rows per batch")
    order = torch.randperm(n, generator=generator)  # a random cycle through all rows
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def eval_chunks(n: int, bs: int) -> list[tuple[int, int]]:
    """[start, end) chunks of at most bs rows, none of size 1 (a lone row has no other row to take a source from)."""
    cuts = list(range(0, n, bs)) + [n]
    spans = [(a, b) for a, b in zip(cuts, cuts[1:])]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], spans[-2][1] - 1), (spans[-2][1] - 1, n)]
    return spans


def curriculum_text_prob(step: int, mode: str, curriculum_steps: int) -> float:
    """Probability that a training row also shows the question text (soft_plus_text). soft_plus_text: always 1.
    soft_only: falls linearly from 1 at step 0 to 0 at `curriculum_steps` (0: soft_only from the start)."""
    if mode == "soft_plus_text":
        return 1.0
    if curriculum_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / curriculum_steps)


# ----------------------------------------------------------------------------------------------------------------------
# generation from embeddings


@torch.no_grad()
def greedy_from_embeds(model, embeds: torch.Tensor, attn: torch.Tensor, max_new_tokens: int,
                       eos: set[int]) -> list[list[int]]:
    """Greedy decoding from left-padded inputs_embeds (B, T, D) with mask (B, T), over the KV cache. Returns the new
    token ids per row (EOS excluded). Equals greedy generation from the same tokens' ids (tests/test_bridge.py)."""
    from transformers import DynamicCache

    B = embeds.shape[0]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos,
                past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    nxt_pos = pos[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
    gen: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t in eos:
                    done[i] = True
                else:
                    gen[i].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)  # (B, T+step+1)
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=nxt_pos,
                    past_key_values=out.past_key_values, use_cache=True)
        nxt_pos = nxt_pos + 1
    return gen
