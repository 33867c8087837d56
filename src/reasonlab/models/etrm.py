"""ETRM: a demonstration encoder that writes TRM's conditioning prefix, so unseen puzzles need no trained puzzle id.

    enc = build_encoder(trm_cfg, variant="pair", hidden_size=128)     # or variant="cross"
    carry, out = trm(carry, batch, conditioning=enc.conditioning)
    # batch: inputs/labels (B, L) + demo_inputs/demo_outputs (B, K, L) tokens + demo_mask (B, K) bool

The encoder reads the K demonstration (input, output) grids of the puzzle each sample belongs to and returns
(B, puzzle_emb_len, hidden) conditioning tokens that replace the puzzle-id prefix through TRM's `conditioning` seam.
TRM calls it inside EVERY ACT step on the samples currently in the carry (halted samples are swapped for new ones, so
the prefix must be recomputed; gradients reach the encoder from every step's loss). The decoder (the TRM) is either
trained jointly at its own learning rate, or loaded from a TRM checkpoint (`load_decoder_weights`) and frozen; the
recipe then verifies its per-parameter sha256 at every checkpoint.

Why the seed's ETRM (0% on held-out ARC-1 with 41-79% train accuracy) failed, and what this file does about it:
- The seed blamed "encoder collapse", but its own numbers (token std 0.37, cross-sample variance 0.15) say the encoder
  was NOT constant: the failure was a generalization gap (fits training puzzles, nothing on unseen ones). Measure it
  as such: train exact accuracy next to held-out accuracy, and encoder/* statistics from reasonlab.watch.
- Scale: the decoder multiplies its whole input, prefix included, by sqrt(hidden). Every conditioning token here is
  RMS-normalized to norm `output_norm` BEFORE that scale (1 = a token embedding's norm; the recipe can set it to the
  mean norm of a trained puzzle embedding when the decoder comes from a TRM checkpoint).
- Layout: a frozen puzzle-id decoder has only ever seen prefix token 0 non-zero. `n_tokens` = 1 writes only that token
  (the rest stay zero, as the paper's padding); 0 = all puzzle_emb_len tokens (for a decoder trained with the encoder).
- Alignment: with pair_layout "stack" one encoder token holds a cell's input colour, output colour and 2-D position,
  so "what changed where" is visible to the first attention layer.

Variants:
- "pair":  a transformer over each pair's cells (pairs encoded independently, shared weights), `n_tokens` learned
           queries attention-pool each pair, then the pairs are averaged (masked) and mixed by a small transformer
           over the pooled tokens. Invariant to the order of the demos.
- "cross": every pair's cells are embedded and encoded (+ a pair-index embedding); `n_tokens` learned queries
           cross-attend to ALL demo cells at once (Perceiver-style latent blocks: cross-attention, then
           self-attention among the queries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reasonlab.models.trm import TRM, Linear, SwiGLU, TRMConfig, rms_norm, trunc_normal_

VARIANTS = ("pair", "cross")


@dataclass
class EncoderConfig:
    variant: str = field(default="pair", metadata={"help": "pair (per-pair transformer + attention pooling) | cross "
                                                           "(learned queries cross-attend to all demo cells)"})
    hidden_size: int = field(default=128, metadata={"help": "encoder width (projected to the decoder's hidden)"})
    num_heads: int = field(default=4, metadata={"help": "encoder attention heads"})
    num_layers: int = field(default=2, metadata={"help": "transformer layers over each pair's cells"})
    pool_layers: int = field(default=1, metadata={"help": "pair: layers over pooled tokens; cross: latent blocks"})
    expansion: float = field(default=2.0, metadata={"help": "SwiGLU expansion in encoder blocks"})
    pair_layout: str = field(default="stack", metadata={"help": "stack: one token per cell holds input+output colour; "
                                                                "concat: input cells then output cells (2x tokens)"})
    n_tokens: int = field(default=0, metadata={"help": "prefix tokens the encoder writes (0 = all puzzle_emb_len; "
                                                       "1 = only token 0, the rest zero, as a puzzle-id prefix)"})
    grid_size: int = field(default=0, metadata={"help": "canvas side (0 = sqrt(model.seq_len)); cells row-major"})
    max_demos: int = field(default=10, metadata={"help": "most demonstration pairs per puzzle (cross: pair index)"})
    output_norm: float = field(default=1.0, metadata={"help": "norm of each conditioning token BEFORE the decoder's "
                                                            "sqrt(hidden) scale (1 = a token embedding's norm; 0 = the "
                                                            "mean norm of the init_from checkpoint's puzzle embedding)"})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"model.encoder.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.pair_layout not in ("stack", "concat"):
            raise ValueError(f"model.encoder.pair_layout must be stack | concat, got {self.pair_layout!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.encoder.hidden_size {self.hidden_size} must be divisible by num_heads "
                             f"{self.num_heads}")
        if self.output_norm < 0:
            raise ValueError("model.encoder.output_norm must be >= 0 (0 = match the decoder checkpoint)")


class MHA(nn.Module):
    """Multi-head attention with an optional key mask (True = attend). Self-attention when kv is None."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q = Linear(dim, dim, bias=False)
        self.kv = Linear(dim, 2 * dim, bias=False)
        self.o = Linear(dim, dim, bias=False)

    def forward(self, x, kv=None, key_mask=None):
        kv = x if kv is None else kv
        B, Lq, D = x.shape
        Lk = kv.shape[1]
        q = self.q(x).view(B, Lq, self.heads, self.hd).transpose(1, 2)  # (B, H, Lq, hd)
        k, v = self.kv(kv).view(B, Lk, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Lk, hd)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, hd)
        return self.o(y.transpose(1, 2).reshape(B, Lq, D))


class EncBlock(nn.Module):
    """Post-norm block like the decoder's: x = norm(x + attn(x[, kv])); x = norm(x + SwiGLU(x))."""

    def __init__(self, dim: int, heads: int, expansion: float):
        super().__init__()
        self.attn = MHA(dim, heads)
        self.mlp = SwiGLU(dim, expansion, 16)

    def forward(self, x, kv=None, key_mask=None):
        x = rms_norm(x + self.attn(x, kv, key_mask), 1e-5)
        return rms_norm(x + self.mlp(x), 1e-5)


class DemoEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, dec: TRMConfig):
        super().__init__()
        if dec.puzzle_emb_len < 1:
            raise ValueError("ETRM needs model.puzzle_emb_len >= 1: the encoder writes the conditioning prefix")
        S = cfg.grid_size or math.isqrt(dec.seq_len)
        if S * S != dec.seq_len:
            raise ValueError(f"encoder canvas {S}x{S} does not match model.seq_len = {dec.seq_len}: set "
                             "model.encoder.grid_size to the canvas side")
        if cfg.n_tokens > dec.puzzle_emb_len:
            raise ValueError(f"model.encoder.n_tokens {cfg.n_tokens} > model.puzzle_emb_len {dec.puzzle_emb_len}")
        self.cfg, self.P, self.D_dec = cfg, dec.puzzle_emb_len, dec.hidden_size
        self.T = cfg.n_tokens or dec.puzzle_emb_len  # tokens written; the rest of the prefix stays zero
        E, V = cfg.hidden_size, dec.vocab_size
        self.emb_in = nn.Embedding(V, E)
        self.emb_out = nn.Embedding(V, E)
        self.emb_row = nn.Embedding(S, E)
        self.emb_col = nn.Embedding(S, E)
        self.emb_side = nn.Embedding(2, E)  # concat layout: input side / output side
        for emb in (self.emb_in, self.emb_out, self.emb_row, self.emb_col, self.emb_side):
            trunc_normal_(emb.weight.data, 1.0)
        self.cell_blocks = nn.ModuleList(EncBlock(E, cfg.num_heads, cfg.expansion) for _ in range(cfg.num_layers))
        self.queries = nn.Parameter(trunc_normal_(torch.empty(self.T, E), 1.0))
        if cfg.variant == "pair":
            self.pool = MHA(E, cfg.num_heads)
            self.set_blocks = nn.ModuleList(EncBlock(E, cfg.num_heads, cfg.expansion) for _ in range(cfg.pool_layers))
        else:
            self.emb_pair = nn.Embedding(cfg.max_demos, E)
            trunc_normal_(self.emb_pair.weight.data, 1.0)
            self.cross_blocks = nn.ModuleList(EncBlock(E, cfg.num_heads, cfg.expansion) for _ in range(cfg.pool_layers))
            self.self_blocks = nn.ModuleList(EncBlock(E, cfg.num_heads, cfg.expansion) for _ in range(cfg.pool_layers))
        self.out = Linear(E, dec.hidden_size, bias=False)
        self.register_buffer("rows", torch.arange(S).repeat_interleave(S), persistent=False)  # (L,) row of cell
        self.register_buffer("cols", torch.arange(S).repeat(S), persistent=False)              # (L,) column of cell

    def cells(self, demo_in: torch.Tensor, demo_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and encode the pairs' cells: (N, L) x2 -> tokens (N, L or 2L, E), key mask (N, L or 2L), False = PAD."""
        pos = self.emb_row(self.rows) + self.emb_col(self.cols)  # (L, E)
        if self.cfg.pair_layout == "stack":
            h = self.emb_in(demo_in) + self.emb_out(demo_out) + pos  # (N, L, E)
            mask = (demo_in != 0) | (demo_out != 0)  # token 0 = PAD on both sides: nothing there
        else:
            h = torch.cat((self.emb_in(demo_in) + pos + self.emb_side.weight[0],
                           self.emb_out(demo_out) + pos + self.emb_side.weight[1]), dim=1)  # (N, 2L, E)
            mask = torch.cat((demo_in != 0, demo_out != 0), dim=1)
        mask = mask | ~mask.any(-1, keepdim=True)  # an all-PAD (absent) pair keeps its keys: no NaN rows
        h = rms_norm(h, 1e-5)
        for blk in self.cell_blocks:
            h = blk(h, key_mask=mask)
        return h, mask

    def forward(self, demo_in: torch.Tensor, demo_out: torch.Tensor, demo_mask: torch.Tensor) -> torch.Tensor:
        """demo_in/demo_out (B, K, L) tokens, demo_mask (B, K) bool (True = a real pair) -> (B, P, D_dec)."""
        B, K, L = demo_in.shape
        h, mask = self.cells(demo_in.reshape(B * K, L), demo_out.reshape(B * K, L))  # (B*K, T', E), (B*K, T')
        E = h.shape[-1]
        if self.cfg.variant == "pair":
            q = self.queries.expand(B * K, -1, -1)  # (B*K, T, E)
            pooled = rms_norm(q + self.pool(q, h, mask), 1e-5).view(B, K, self.T, E)  # (B, K, T, E)
            w = demo_mask.to(pooled.dtype).view(B, K, 1, 1)
            t = (pooled * w).sum(1) / w.sum(1).clamp_min(1)  # (B, T, E): masked mean over pairs
            t = rms_norm(t, 1e-5)
            for blk in self.set_blocks:
                t = blk(t)
        else:
            Tc = h.shape[1]
            h = h.view(B, K, Tc, E) + self.emb_pair.weight[:K].view(1, K, 1, E)  # (B, K, T', E)
            h = h.reshape(B, K * Tc, E)  # (B, K*T', E): all demo cells of the puzzle
            m = (mask.view(B, K, Tc) & demo_mask.view(B, K, 1)).reshape(B, K * Tc)  # (B, K*T')
            t = self.queries.expand(B, -1, -1)  # (B, T, E)
            for cross, selfb in zip(self.cross_blocks, self.self_blocks):
                t = cross(t, h, m)
                t = selfb(t)
        c = self.out(t)  # (B, T, D_dec)
        # unit RMS per token, then / sqrt(D): each token has norm output_norm (a token embedding has norm ~1)
        c = rms_norm(c, 1e-5) * ((self.cfg.output_norm or 1.0) / math.sqrt(self.D_dec))
        return F.pad(c, (0, 0, 0, self.P - self.T))  # (B, P, D_dec): unwritten prefix tokens are zero

    def conditioning(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """TRM's seam: data (the carry's current samples) -> (B, P, D) prefix."""
        return self(data["demo_inputs"], data["demo_outputs"], data["demo_mask"])


def encoder_config(**kwargs) -> EncoderConfig:
    """EncoderConfig from the recipe's `model.encoder` mapping; an unknown key is a one-line ValueError."""
    known = {f.name for f in fields(EncoderConfig)}
    bad = sorted(set(kwargs) - known)
    if bad:
        import difflib

        close = difflib.get_close_matches(bad[0], sorted(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(known))})"
        raise ValueError(f"unknown key 'model.encoder.{bad[0]}'{hint}")
    return EncoderConfig(**kwargs)


def build_encoder(dec: TRMConfig, **kwargs) -> DemoEncoder:
    """A DemoEncoder for decoder config `dec` from the recipe's `model.encoder` mapping."""
    return DemoEncoder(encoder_config(**kwargs), dec)


# ------------------------------------------------------------------------------------------ decoder from a checkpoint

def load_decoder_weights(decoder: TRM, path: str | Path) -> dict[str, int]:
    """Load a TRM's weights into `decoder` from a reasonlab checkpoint folder (module.model.safetensors or
    module.decoder.safetensors) or a .safetensors/.pt file. Keys may carry a 'model.' / 'decoder.' / '_orig_mod.'
    prefix. The puzzle-id table is skipped (the encoder replaces it). Returns {"loaded": n, "skipped": n,
    "puzzle_emb_norm": mean norm of the checkpoint's non-zero puzzle-embedding rows (0.0 if none)}.
    A missing or shape-mismatched weight is a one-line error."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.pt"))
        cand = [f for f in files if f.stem in ("module.model", "module.decoder", "model", "decoder")] or \
            [f for f in files if f.stem.startswith("module.")] or files
        if not cand:
            raise FileNotFoundError(f"no .safetensors or .pt weights in {p}: point model.init_from at a TRM "
                                    "checkpoint folder (runs/<id>/checkpoints/best) or file")
        p = cand[0]
    if not p.exists():
        raise FileNotFoundError(f"decoder checkpoint {p} does not exist: train a TRM first or fix model.init_from")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(p))
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    own = decoder.state_dict()
    clean = {}
    for k, v in sd.items():
        for prefix in ("model.", "decoder.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    wanted = [k for k in own if not k.startswith("puzzle_emb")]
    missing = [k for k in wanted if k not in clean]
    if missing:
        raise ValueError(f"decoder checkpoint {p} lacks {len(missing)} TRM weights (e.g. {missing[:3]}): "
                         "is it a TRM checkpoint with the same model config?")
    bad = [k for k in wanted if clean[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"decoder checkpoint {p} has other shapes for {bad[:3]}: its model config differs")
    decoder.load_state_dict({k: clean[k] for k in wanted}, strict=False)
    emb = clean.get("puzzle_emb.weight")
    norm = 0.0
    if emb is not None:
        n = emb.float().norm(dim=-1)
        norm = float(n[n > 0].mean()) if (n > 0).any() else 0.0
    return {"loaded": len(wanted), "skipped": len(clean) - len(wanted), "puzzle_emb_norm": norm}
