"""Pure tensor functions for policy-gradient recipes: token log-probs, KL estimators, advantages, PG and PPO losses.

Shapes: B sequences, T positions, V vocabulary. A `mask` is 1.0 on the tokens that belong to the loss (the completion)
and 0.0 elsewhere (prompt, padding). Nothing here samples, logs or touches a model's parameters; recipes compose these.

    lp, logits = token_logprobs(model, ids, attn, return_logits=True)   # (B, T-1): log pi(ids[:, t+1] | ids[:, :t+1])
    adv = group_standardize(rewards, group_size=G)                       # (B,)   mean/std detached, reward grad kept
    loss = pg_loss(lp, adv, mask)                                        # REINFORCE on the masked tokens
    loss, stats = ppo_loss(lp, old_lp, adv, mask, clip_eps=0.2, dual_clip=3.0)

Aggregation (`agg`): "seq_mean" averages tokens within each sequence, then sequences (GRPO); "token_mean" averages over
all masked tokens of the batch (DAPO / BNPO); "seq_sum" sums a sequence's tokens, then averages sequences (the
REINFORCE estimator of d/dθ E[R] for fixed-length CoTs, as in the Markovian paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("seq_mean", "token_mean", "seq_sum")


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   return_logits: bool = False, position_ids: torch.Tensor | None = None, last: int | None = None):
    """Log-prob of each next token under `model`. Returns (B, T-1) [and the (B, T-1, V) float32 logits].

    Position t of the result scores input_ids[:, t+1] given input_ids[:, :t+1]. Left padding is fine when the
    attention mask marks it; positions are derived from the mask so padded rows match unpadded ones.
    `last=n` scores only the last n tokens: results are (B, n) [and (B, n, V)], column j scoring input_ids[:, T-n+j],
    and the model computes logits for those positions only (HF `logits_to_keep`), so memory is O(n V), not O(T V).
    """
    if position_ids is None and attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    if last is not None:
        if not 0 < last < input_ids.shape[1]:
            raise ValueError(f"last={last} must be in [1, {input_ids.shape[1] - 1}] for sequences of {input_ids.shape[1]}")
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=last + 1)
        logits = _upcast(out.logits[:, -(last + 1):-1])  # (B, last, V): predictions of the last `last` tokens
        targets = input_ids[:, -last:]  # (B, last)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits = _upcast(out.logits[:, :-1])  # (B, T-1, V)
        targets = input_ids[:, 1:]  # (B, T-1)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1) or (B, last)
    return (lp, logits) if return_logits else lp


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 for log-softmax; float64 stays float64 (finite-difference tests)."""
    return x if x.dtype == torch.float64 else x.float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy in nats. (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_exact(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the vocabulary. (..., V), (..., V) -> (...)."""
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) on tokens sampled from pi: exp(d) - d - 1 with d = ref - pi.
    Non-negative, unbiased; (...) -> (...)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "seq_mean") -> torch.Tensor:
    """Reduce per-token values (B, T) over the mask to a scalar, by `agg` (see module docstring)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    mask = mask.to(x.dtype)
    if agg == "token_mean":
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    per_seq = (x * mask).sum(-1)  # (B,)
    if agg == "seq_mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1.0)
    return per_seq.mean()


def group_standardize(rewards: torch.Tensor, group_size: int | None = None, eps: float = 1e-6,
                      scale: bool = True, min_std: float = 0.0) -> torch.Tensor:
    """(R - mean) / (std + eps) within consecutive groups of `group_size` (None: the whole batch). (B,) -> (B,).

    The mean and std are DETACHED: if `rewards` carries a gradient (the Markovian actor-reward term), it flows through
    R itself. Without the detach, sum(A) = 0 within a group and the gradient of mean(A) is identically zero — the bug in
    the public Markovian code. A group whose rewards are all equal gets advantage 0. `scale=False` only centres (Dr GRPO).
    `min_std` floors the std (denominator max(std, min_std) + eps): with a reward that carries gradient, a near-tied
    group would otherwise scale it by ~1/eps.
    """
    B = rewards.shape[0]
    g = B if group_size is None else group_size
    if B % g:
        raise ValueError(f"batch of {B} rewards does not split into groups of {g}")
    r = rewards.view(B // g, g)  # (n_groups, G)
    mean = r.detach().mean(-1, keepdim=True)
    out = r - mean
    if scale:
        std = r.detach().std(-1, keepdim=True, unbiased=False) if g > 1 else torch.zeros_like(mean)
        out = out / (std.clamp(min=min_std) + eps)
    return out.view(B)


def pg_loss(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, agg: str = "seq_mean") -> torch.Tensor:
    """REINFORCE: -A * log pi on the masked tokens. logp (B, T), adv (B,) (detached here), mask (B, T)."""
    return masked_mean(-adv.detach().unsqueeze(-1) * logp, mask, agg)


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
             clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = 3.0,
             log_ratio_clamp: float = 20.0, agg: str = "seq_mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with dual-clip (Ye et al. 2020; verl's clip_ratio_c). logp/old_logp/mask (B, T), adv (B,).

    ratio = pi / pi_old where pi_old is the policy THAT SAMPLED the rollout (its log-probs recorded at sampling time),
    so on the first minibatch of a rollout ratio == 1 exactly. Dual-clip: for A < 0 the per-token loss is capped at
    dual_clip * |A|, so a ratio that has run away cannot dominate. The log-ratio is clamped before exp for safety.
    Returns (loss, stats) with stats: ratio_mean, ratio_max, clip_frac, dual_clip_frac, approx_kl (all detached).
    """
    a = adv.detach().unsqueeze(-1)  # (B, 1)
    log_ratio = (logp - old_logp.detach()).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)  # (B, T)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    loss1 = -a * ratio
    loss2 = -a * ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    clipped = torch.maximum(loss1, loss2)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl uses 3.0), got {dual_clip}")
        capped = torch.minimum(clipped, -a * dual_clip)
        per_tok = torch.where(a < 0, capped, clipped)
        dual_frac = ((a < 0) & (clipped > -a * dual_clip)).to(logp.dtype)
    else:
        per_tok, dual_frac = clipped, torch.zeros_like(logp)
    loss = masked_mean(per_tok, mask, agg)
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    with torch.no_grad():
        stats = {
            "ratio_mean": (ratio * m).sum() / n,
            "ratio_max": torch.where(m > 0, ratio, torch.zeros_like(ratio)).max(),
            "clip_frac": ((loss2 > loss1).to(logp.dtype) * m).sum() / n,
            "dual_clip_frac": (dual_frac * m).sum() / n,
            "approx_kl": (kl_k3(old_logp.detach(), logp.detach()) * m).sum() / n,  # KL(pi_old || pi), k3
        }
    return loss, stats
