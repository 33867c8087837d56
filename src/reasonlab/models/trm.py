"""Tiny Recursive Model (TRM; Jolicoeur-Martineau, arXiv 2510.04871) with ACT halting and deep supervision.

Public API (the ETRM encoder builds on exactly this):

    cfg = TRMConfig(vocab_size=12, seq_len=900, num_puzzle_ids=N)      # defaults = the paper's ARC net
    model = TRM(cfg)
    carry = model.initial_carry(batch)                # batch: {"inputs": (B, L) long, "labels": (B, L) long,
                                                      #         "puzzle_ids": (B,) long, ...any extra per-sample keys}
    carry, out = model(carry, batch)                  # ONE ACT supervision step; out: logits (B, L, V),
                                                      # q_halt_logits (B,), + carry.steps / carry.halted
    loss, metrics = act_loss(out, carry, cfg)         # stablemax|softmax CE + q_loss_weight * BCE(q_halt, exact)
    terms = act_loss_terms(out, carry, cfg)           # {"lm": (1, ce), "q_halt": (0.5, bce)} for the gradient audit
    carry, out = model(carry, batch, conditioning=fn)  # fn(current_data) -> (B, puzzle_emb_len, hidden) replaces
                                                      # the puzzle-id embedding (ETRM encoder seam); it is called
                                                      # on every ACT step, after halted samples are swapped in
    model.count_parameters()                          # {"net": ..., "puzzle_emb": ..., "total_ex_puzzle_emb": ...}

Recursion (one ACT step): x = embed(inputs) with the conditioning prefix; T = H_cycles cycles of
`n = L_cycles` updates z <- net(z, y + x) followed by y <- net(y, z); the first T-1 cycles run under no_grad and only
the last cycle carries gradient. (y, z) are detached and carried to the next ACT step (deep supervision).
The Q head reads position 0 of y; training halts a sample when q_halt > 0 (or at halt_max_steps), with exploration
(prob `halt_exploration_prob` a sample gets a random minimum of 2..halt_max_steps steps). Evaluation always runs
halt_max_steps steps so a batch halts together.

Speed (benchmarks/trm_step.py times this against the official code): one fused qkv projection with q and k rotated
together and written contiguous for the attention kernel; without a graph (the first T-1 cycles) residuals, SiLU and
the gate product run in place; with one, SwiGLU and RoPE have backwards that fill one gradient buffer instead of
autograd's zero-fill/concatenate per slice; fused F.rms_norm in fp32; y + x once per cycle; the stablemax CE gathers
the label's term. In fp32 each gives the same numbers bit for bit as the plain ops (logits, losses, gradients).

Parameter count of the paper's ARC net (hidden 512, 8 heads, 2 layers, expansion 4, vocab 12), all trainable:
  per block: qkv 512*1536 + o 512*512 + SwiGLU gate_up 512*3072 + down 1536*512 = 3,407,872   (x2 = 6,815,744)
  token embedding 12*512 = 6,144; lm head 512*12 = 6,144 (no bias); q head 512*2 + 2 = 1,026
  = 6,829,058. The initial y/z states are fixed buffers (not trained), RMSNorm has no weights, RoPE has none.
The puzzle embedding (num_puzzle_ids x hidden, zero-init, trained by sign-SGD) is counted separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from reasonlab.eval.packed import packed

IGNORE_LABEL_ID = -100


@dataclass
class TRMConfig:
    vocab_size: int = field(default=12, metadata={"help": "token vocabulary (ARC: PAD, EOS, 10 colours = 12)"})
    seq_len: int = field(default=900, metadata={"help": "tokens per puzzle (ARC: 30x30 = 900)"})
    hidden_size: int = field(default=512, metadata={"help": "model width"})
    num_heads: int = field(default=8, metadata={"help": "attention heads (head_dim = hidden / heads)"})
    expansion: float = field(default=4.0, metadata={"help": "SwiGLU expansion; inner = round(e*h*2/3) up to ffn_multiple"})
    ffn_multiple: int = field(default=256, metadata={"help": "SwiGLU inner size rounds up to this (paper: 256)"})
    num_layers: int = field(default=2, metadata={"help": "blocks in the one shared net (paper: 2)"})
    H_cycles: int = field(default=3, metadata={"help": "T: cycles per ACT step; only the last carries gradient"})
    L_cycles: int = field(default=4, metadata={"help": "n: latent z updates per cycle (paper ARC: 4, Sudoku: 6)"})
    mixer: str = field(default="attention", metadata={"help": "token mixing: attention | mlp (MLP-mixer over positions)"})
    pos_encodings: str = field(default="rope", metadata={"help": "rope | learned | none"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    rms_norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon (post-norm, no weights)"})
    num_puzzle_ids: int = field(default=1, metadata={"help": "rows of the puzzle-id embedding (task x augmentation); "
                                                             "0 = no table (the prefix comes from an encoder)"})
    puzzle_emb_len: int = field(default=16, metadata={"help": "conditioning prefix tokens; only token 0 holds the id"})
    halt_max_steps: int = field(default=16, metadata={"help": "ACT supervision steps at most (evaluation uses all)"})
    halt_exploration_prob: float = field(default=0.1, metadata={"help": "prob. a sample gets a random min step count"})
    q_head_bias_init: float = field(default=-5.0, metadata={"help": "q head bias init: start 'do not halt'"})
    loss_type: str = field(default="stablemax", metadata={"help": "stablemax | softmax cross-entropy"})
    q_loss_weight: float = field(default=0.5, metadata={"help": "weight of BCE(q_halt, sequence exactly correct)"})

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.mixer not in ("attention", "mlp"):
            raise ValueError(f"model.mixer must be 'attention' or 'mlp', got {self.mixer!r}")
        if self.pos_encodings not in ("rope", "learned", "none"):
            raise ValueError(f"model.pos_encodings must be rope | learned | none, got {self.pos_encodings!r}")
        if self.loss_type not in ("stablemax", "softmax"):
            raise ValueError(f"model.loss_type must be stablemax | softmax, got {self.loss_type!r}")
        if self.num_puzzle_ids < 0 or self.puzzle_emb_len < 0:
            raise ValueError("model.num_puzzle_ids and model.puzzle_emb_len must be >= 0")
        if self.H_cycles < 1 or self.L_cycles < 1 or self.halt_max_steps < 1:
            raise ValueError("model.H_cycles, L_cycles and halt_max_steps must all be >= 1")

    @property
    def total_len(self) -> int:
        return self.seq_len + self.puzzle_emb_len


# ----------------------------------------------------------------------------------------------------------- layers

def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """Normal truncated at +-2 sigma, rescaled so the result really has standard deviation `std`."""
    if std == 0:
        return t.zero_()
    nn.init.trunc_normal_(t, std=1.0, a=-2.0, b=2.0)
    return t.mul_(std / 0.8796256610342398)  # std of a unit normal truncated at +-2


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, no weight. In float32 torch's fused F.rms_norm (the same
    numbers bit for bit, forward ~2x faster on the CPU); other dtypes (autocast) keep the plain ops in x's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class Linear(nn.Linear):
    """Linear with truncated LeCun-normal weights and zero bias (the paper's init)."""

    def reset_parameters(self):
        trunc_normal_(self.weight.data, 1.0 / math.sqrt(self.in_features))
        if self.bias is not None:
            self.bias.data.zero_()


class _SwiGLUAct(torch.autograd.Function):
    """silu(gate) * up of g = [gate | up] with a backward that writes d(gate) and d(up) straight into one buffer
    shaped like g (autograd's chunk backward concatenates two fresh halves); the same kernels as autograd's
    (MulBackward, aten.silu_backward), so the same numbers bit for bit."""

    @staticmethod
    def forward(ctx, g):
        gate, up = g.chunk(2, dim=-1)
        a = F.silu(gate)
        ctx.save_for_backward(g, a)
        return a * up

    @staticmethod
    def backward(ctx, dout):
        g, a = ctx.saved_tensors
        gate, up = g.chunk(2, dim=-1)
        dg = torch.empty_like(g)
        dgate, dup = dg.chunk(2, dim=-1)
        torch.mul(dout, a, out=dup)
        torch.ops.aten.silu_backward.grad_input(dout * up, gate, grad_input=dgate)
        return dg


class SwiGLU(nn.Module):
    def __init__(self, dim: int, expansion: float, multiple: int):
        super().__init__()
        inner = -(round(expansion * dim * 2 / 3) // -multiple) * multiple
        self.gate_up = Linear(dim, 2 * inner, bias=False)
        self.down = Linear(inner, dim, bias=False)

    def forward(self, x):
        g = self.gate_up(x)
        if torch.is_grad_enabled():
            return self.down(_SwiGLUAct.apply(g))
        gate, up = g.chunk(2, dim=-1)
        return self.down(F.silu(gate, inplace=True).mul_(up))  # no graph: in place, two fewer (B, L, inner) buffers


def rope_cache(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd): rotate-half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (..., hd) with cos/sin broadcastable to it: (B, H, L, hd) with (L, hd), or (B, L, 2, H, hd) with (L, 1, 1, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_qk_nograd(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope on q and k (qk: (B, L, 2, H, hd)) without a graph, the same numbers bit for bit, written straight
    into contiguous (B, H, L, hd) q and k (the layout the CPU attention kernel reads fastest) with two half-width
    temporaries instead of the neg/cat/mul/mul/add chain: x*cos + cat(-x2, x1)*sin is x*cos - x2*sin on the first
    half and x*cos + x1*sin on the second (negation is exact)."""
    B, L, _, H, hd = qk.shape
    h = hd // 2
    buf = torch.empty((2, B, H, L, hd), dtype=torch.result_type(qk, cos), device=qk.device)
    r = buf.permute(1, 3, 0, 2, 4)  # (B, L, 2, H, hd) view of buf
    c, s = cos[:, None, None], sin[:, None, None]  # (L, 1, 1, hd)
    torch.mul(qk, c, out=r)
    r[..., :h].sub_(qk[..., h:] * s[..., :h])
    r[..., h:].add_(qk[..., :h] * s[..., h:])
    return buf[0], buf[1]


class _RopeQKV(torch.autograd.Function):
    """(B, L, 3, H, hd) fused projection -> contiguous (B, H, L, hd) q, k (RoPE applied, as rope_qk_nograd) and v.
    Backward writes dq, dk (RoPE transposed: d x1 = g*cos + (g*sin)[2nd half], d x2 = g*cos - (g*sin)[1st half],
    the ops autograd runs through apply_rope, so the same numbers) and dv into ONE (B, L, 3, H, hd) gradient, where
    autograd would zero-fill and add a full-size buffer per slice. Used when qkv and cos/sin share a dtype."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        q, k = rope_qk_nograd(qkv[:, :, :2], cos, sin)
        ctx.save_for_backward(cos, sin)
        return q, k, qkv[:, :, 2].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        B, H, L, hd = (dq if dq is not None else dk if dk is not None else dv).shape
        h = hd // 2
        dqkv = torch.empty((B, L, 3, H, hd), dtype=cos.dtype, device=cos.device)
        for i, g in ((0, dq), (1, dk), (2, dv)):
            out = dqkv[:, :, i].transpose(1, 2)  # (B, H, L, hd) view
            if g is None:
                out.zero_()
            elif i == 2:
                out.copy_(g)
            else:
                torch.mul(g, cos, out=out)
                t = g * sin
                out[..., :h].add_(t[..., h:])
                out[..., h:].sub_(t[..., :h])
        return dqkv, None, None


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.o = Linear(dim, dim, bias=False)

    def forward(self, x, rope):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)  # (B, L, 3, H, hd): one fused projection
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, L, hd) view
        if rope is None:
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        elif torch.is_grad_enabled() and qkv.dtype == rope[0].dtype:
            q, k, v = _RopeQKV.apply(qkv, *rope)
        elif torch.is_grad_enabled():  # q and k rotated together: one pass of each elementwise op instead of two
            cos, sin = rope
            qk = apply_rope(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])  # (B, L, 2, H, hd)
            q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # (B, H, L, hd) views
        else:
            q, k = rope_qk_nograd(qkv[:, :, :2], *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, H, L, hd)
        return self.o(y.transpose(1, 2).reshape(B, L, D))


def residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out + x, added in place into `out` (a fresh linear output that no backward needs) when the dtypes agree, so
    the sum costs no new buffer; out + x == x + out exactly. Under autocast (bf16 out, fp32 stream) it promotes."""
    return out.add_(x) if out.dtype == x.dtype else x + out


class Block(nn.Module):
    """Post-norm block: x = norm(x + mix(x)); x = norm(x + SwiGLU(x)). RMSNorm has no weights (as the paper)."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        if cfg.mixer == "mlp":  # MLP-mixer: a SwiGLU across positions (the paper's Sudoku variant)
            self.token_mlp = SwiGLU(cfg.total_len, cfg.expansion, cfg.ffn_multiple)
        else:
            self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.expansion, cfg.ffn_multiple)

    def forward(self, x, rope):
        if hasattr(self, "token_mlp"):
            xt = x.transpose(1, 2)  # (B, D, L)
            h = xt + self.token_mlp(xt)  # laid out as x (B, L, D): the norm below reduces over a strided dim
            x = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)).transpose(1, 2)  # over positions
        else:
            x = rms_norm(residual(self.attn(x, rope), x), self.eps)
        return rms_norm(residual(self.mlp(x), x), self.eps)


class Net(nn.Module):
    """The one tiny network used for both updates: net(h, injection) = blocks(h + injection)."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))

    def forward(self, h, injection, rope):
        h = h + injection
        for layer in self.layers:
            h = layer(h, rope)
        return h


# ------------------------------------------------------------------------------------------------------------ model

@dataclass
class Carry:
    """Per-sample state kept across ACT steps (deep supervision): answer y, latent z, step count, halted flag, data."""
    y: torch.Tensor                 # (B, P+L, D)
    z: torch.Tensor                 # (B, P+L, D)
    steps: torch.Tensor             # (B,) long
    halted: torch.Tensor            # (B,) bool; a halted sample is replaced by the next batch's sample at that slot
    data: dict[str, torch.Tensor]   # the samples currently being worked on

    def detach(self) -> "Carry":
        return Carry(self.y.detach(), self.z.detach(), self.steps, self.halted, self.data)


class TRM(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed_scale = math.sqrt(D)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        trunc_normal_(self.embed_tokens.weight.data, 1.0 / self.embed_scale)
        self.lm_head = Linear(D, cfg.vocab_size, bias=False)
        self.q_head = Linear(D, 2, bias=True)  # [halt, continue]; the paper trains only halt (no_ACT_continue)
        with torch.no_grad():  # start at "never halt": q ~ -5 so early exact-correct targets do not stop steps at once
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(cfg.q_head_bias_init)
        # one vector per puzzle id, zero-init; sparse gradients so a sign-SGD step touches only the rows in the batch
        # (no table when num_puzzle_ids = 0: the prefix then comes from `conditioning`, e.g. the ETRM encoder)
        self.puzzle_emb = nn.Embedding(cfg.num_puzzle_ids, D, sparse=True) \
            if cfg.puzzle_emb_len > 0 and cfg.num_puzzle_ids > 0 else None
        if self.puzzle_emb is not None:
            self.puzzle_emb.weight.data.zero_()
        if cfg.pos_encodings == "learned":
            self.embed_pos = nn.Parameter(trunc_normal_(torch.empty(cfg.total_len, D), 1.0 / self.embed_scale))
        if cfg.pos_encodings == "rope" and cfg.mixer == "attention":
            cos, sin = rope_cache(D // cfg.num_heads, cfg.total_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.net = Net(cfg)
        # fixed initial answer/latent states (buffers: saved, never trained)
        self.register_buffer("y_init", trunc_normal_(torch.empty(D), 1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(D), 1.0))

    # ---- parameters
    def count_parameters(self) -> dict[str, int]:
        """Every parameter (trainable when the model trains; a frozen decoder counts the same)."""
        n_puzzle = self.puzzle_emb.weight.numel() if self.puzzle_emb is not None else 0
        total = sum(p.numel() for p in self.parameters())
        return {"net": sum(p.numel() for p in self.net.parameters()),
                "puzzle_emb": n_puzzle, "total_ex_puzzle_emb": total - n_puzzle, "total": total}

    # ---- conditioning and inputs
    def puzzle_conditioning(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, P, D) prefix from the puzzle id: token 0 = the id's vector, tokens 1..P-1 zero (as the paper)."""
        if self.puzzle_emb is None:
            raise ValueError("this TRM has no puzzle-id table (num_puzzle_ids = 0): pass conditioning=")
        P = self.cfg.puzzle_emb_len
        first = self.puzzle_emb(data["puzzle_ids"]).unsqueeze(1)  # (B, 1, D)
        return F.pad(first, (0, 0, 0, P - 1))  # (B, P, D)

    def input_embeddings(self, inputs: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_tokens(inputs)  # (B, L, D)
        if self.cfg.puzzle_emb_len > 0:
            x = torch.cat((cond.to(x.dtype), x), dim=1)  # (B, P+L, D)
        if self.cfg.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_pos)  # keep the variance of the sum
        return self.embed_scale * x  # prefix and tokens share the sqrt(hidden) scale

    def rope(self):
        return (self.rope_cos, self.rope_sin) if hasattr(self, "rope_cos") else None

    # ---- recursion
    def recurse(self, y, z, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One deep-supervision step from (y, z) given input embedding x (B, P+L, D).
        Returns (y, z, logits (B, L, V), q_logits (B, 2)); only the last H cycle is differentiable."""
        cfg, rope = self.cfg, self.rope()
        # CPU linears on oneDNN-packed weights (1.15-1.3x at the ARC net's 7k rows), forward and backward; packed
        # once per optimizer step and reused by all (n + 1) T net calls; a no-op elsewhere and below 256k weights
        with packed(self, trained=True):
            with torch.no_grad():
                for _ in range(cfg.H_cycles - 1):
                    yx = y + x  # y is fixed during the n latent updates: one sum per cycle, not one per update
                    for _ in range(cfg.L_cycles):
                        z = self.net(z, yx, rope)
                    y = self.net(y, z, rope)
            yx = y + x
            for _ in range(cfg.L_cycles):
                z = self.net(z, yx, rope)
            y = self.net(y, z, rope)
        logits = self.lm_head(y[:, cfg.puzzle_emb_len:])  # (B, L, V)
        q_logits = self.q_head(y[:, 0])  # (B, 2): position 0 = first conditioning token
        return y, z, logits, q_logits

    # ---- ACT wrapper
    def initial_carry(self, batch: dict[str, torch.Tensor]) -> Carry:
        B, dev = batch["inputs"].shape[0], batch["inputs"].device
        shape = (B, self.cfg.total_len, self.cfg.hidden_size)
        return Carry(y=torch.zeros(shape, device=dev), z=torch.zeros(shape, device=dev),
                     steps=torch.zeros(B, dtype=torch.long, device=dev),
                     halted=torch.ones(B, dtype=torch.bool, device=dev),  # all halted: first step loads the batch
                     data={k: torch.zeros_like(v) for k, v in batch.items()})

    def forward(self, carry: Carry, batch: dict[str, torch.Tensor],
                conditioning: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
                noise: torch.Tensor | None = None) -> tuple[Carry, dict]:
        """One ACT step: swap in new samples where the carry halted, reset their state, recurse, decide halting.
        `noise` (B, 2) uniform in [0, 1): the halting-exploration draws of each slot (default: drawn here), so a
        recipe can make them a function of the step and the slot's place in the global batch."""
        h = carry.halted
        y = torch.where(h.view(-1, 1, 1), self.y_init, carry.y)
        z = torch.where(h.view(-1, 1, 1), self.z_init, carry.z)
        steps = torch.where(h, 0, carry.steps)
        data = {k: torch.where(h.view((-1,) + (1,) * (v.ndim - 1)), batch[k], v) for k, v in carry.data.items()}

        cond = None
        if self.cfg.puzzle_emb_len > 0:
            cond = conditioning(data) if conditioning is not None else self.puzzle_conditioning(data)  # (B, P, D)
        x = self.input_embeddings(data["inputs"], cond)
        y, z, logits, q_logits = self.recurse(y, z, x)

        with torch.no_grad():
            steps = steps + 1
            halted = steps >= self.cfg.halt_max_steps
            if self.training and self.cfg.halt_max_steps > 1:
                halted = halted | (q_logits[:, 0] > 0)
                u = torch.rand(steps.shape[0], 2, device=steps.device) if noise is None else noise.to(steps.device)
                explore = u[:, 0] < self.cfg.halt_exploration_prob
                # a minimum step count uniform over 2..halt_max_steps for the exploring samples
                min_steps = explore * (2 + (u[:, 1] * (self.cfg.halt_max_steps - 1)).long())
                halted = halted & (steps >= min_steps)
        out = {"logits": logits, "q_halt_logits": q_logits[:, 0], "q_continue_logits": q_logits[:, 1]}
        return Carry(y.detach(), z.detach(), steps, halted, data), out


# ------------------------------------------------------------------------------------------------------------- loss

def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of s(x)/sum s(x), s(x) = x+1 for x >= 0 else 1/(1-x): a softmax without exp (Prieto et al. 2025).
    Each branch sees only its own side of 0: with a plain where(x < 0, 1/(1-x), x+1) a logit of exactly 1.0 makes
    the unused branch's gradient inf, and inf * 0 = NaN (it happened ~once per 500 steps in a 64 x 25 x 12 run)."""
    s = torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x.clamp(min=0) + 1)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(B, L) per-token CE; 0 where labels == IGNORE_LABEL_ID."""
    mask = labels != IGNORE_LABEL_ID
    safe = torch.where(mask, labels, 0)
    if loss_type == "stablemax":  # = -log_stablemax(logits)[label], without the full (B, L, V) log and division
        x = logits.double()  # float64 as the paper: s(x) spans many orders
        s = torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x.clamp(min=0) + 1)  # as log_stablemax (no NaN branch)
        nll = (s.sum(-1).log() - s.gather(-1, safe.unsqueeze(-1)).squeeze(-1).log()).to(logits.dtype)
    else:
        nll = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none")  # (B, L)
    return torch.where(mask, nll, 0.0)


def act_loss(out: dict, carry: Carry, cfg: TRMConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one ACT step, averaged over the batch: per-sequence mean token CE + q_loss_weight * BCE(q_halt, exact).

    Metrics (detached, summed over samples that HALTED this step, with "count" as the denominator, as the paper)
    count, accuracy (token), exact_accuracy, q_halt_accuracy, steps; plus lm_loss / q_halt_loss batch means."""
    labels = carry.data["labels"]
    logits = out["logits"]
    mask = labels != IGNORE_LABEL_ID
    n_tok = mask.sum(-1)  # (B,)
    with torch.no_grad():
        correct = mask & (logits.argmax(-1) == labels)
        exact = correct.sum(-1) == n_tok  # (B,)
        valid = carry.halted & (n_tok > 0)
        exact_f = exact.to(logits.dtype)
        metrics = {
            "count": valid.sum(),
            "accuracy": torch.where(valid, correct.sum(-1) / n_tok.clamp_min(1), 0.0).sum(),
            "exact_accuracy": (valid & exact).sum(),
            "q_halt_accuracy": (valid & ((out["q_halt_logits"] >= 0) == exact)).sum(),
            "steps": torch.where(valid, carry.steps, 0).sum(),
        }
    terms = _loss_terms(out, carry, cfg, n_tok, exact_f)
    metrics["lm_loss"] = terms["lm"][1].detach()
    metrics["q_halt_loss"] = terms["q_halt"][1].detach()
    return sum(w * term for w, term in terms.values()), metrics


def act_loss_terms(out: dict, carry: Carry, cfg: TRMConfig) -> dict[str, tuple[float, torch.Tensor]]:
    """The loss terms as {name: (weight, loss)} (the format of reasonlab.rl.audit.audit_terms), batch means:
    lm = per-sequence mean token CE (weight 1), q_halt = BCE(q_halt_logit, sequence exactly correct) (weight
    q_loss_weight). act_loss's loss is sum(weight * loss)."""
    labels, logits = carry.data["labels"], out["logits"]
    mask = labels != IGNORE_LABEL_ID
    n_tok = mask.sum(-1)
    with torch.no_grad():
        exact = (mask & (logits.argmax(-1) == labels)).sum(-1) == n_tok
    return _loss_terms(out, carry, cfg, n_tok, exact.to(logits.dtype))


def _loss_terms(out, carry, cfg, n_tok, exact_f) -> dict[str, tuple[float, torch.Tensor]]:
    """act_loss_terms given the (B,) token counts and exact-match targets (act_loss has them already)."""
    lm = (token_cross_entropy(out["logits"], carry.data["labels"], cfg.loss_type).sum(-1) / n_tok.clamp_min(1)).mean()
    q = F.binary_cross_entropy_with_logits(out["q_halt_logits"], exact_f)
    return {"lm": (1.0, lm), "q_halt": (cfg.q_loss_weight, q)}


# -------------------------------------------------------------------------------------------------------- optimizer

class SignSGD(torch.optim.Optimizer):
    """Sign-SGD with decoupled weight decay for the (sparse-gradient) puzzle embedding, as the paper.

    Only rows present in the gradient are decayed and moved: p_row <- p_row * (1 - lr*wd) - lr * sign(grad_row).
    (With very sparse gradients Adam reduces to ~sign(grad), which is why the paper uses this.)"""

    def __init__(self, params, lr: float = 1e-2, weight_decay: float = 0.1):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()  # sums duplicate ids (same puzzle twice in a batch)
                    rows, vals = g.indices()[0], g.values()
                else:
                    rows = (g != 0).any(-1).nonzero().squeeze(-1)
                    vals = g[rows]
                w = p.data[rows]
                p.data[rows] = w * (1 - lr * wd) - lr * torch.sign(vals)


def grad_norm(params) -> float:
    """L2 norm of the gradients of `params` (sparse gradients included); 0.0 when none has a gradient."""
    sq = 0.0
    for p in params:
        if p.grad is not None:
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            sq += float(g.float().square().sum())
    return math.sqrt(sq)
