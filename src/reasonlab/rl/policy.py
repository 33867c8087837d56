"""Pure tensor functions for policy-gradient recipes: token log-probs, KL estimators, advantages, PG and PPO losses.

Shapes: B sequences, T positions, V vocabulary. A `mask` is 1.0 on the tokens that belong to the loss (the completion)
and 0.0 elsewhere (prompt, padding). Nothing here samples, logs or touches a model's parameters; recipes compose these.

    lp, logits = token_logprobs(model, ids, attn, return_logits=True)   # (B, T-1): log pi(ids[:, t+1] | ids[:, :t+1])
    lp, mask = shared_prompt_logprobs(model, prompt, completions)       # (N, S): one prompt run once for N rows
    mean, denom = group_stats(rewards, group_size=G)                     # (B,) x2, detached
    adv = group_standardize(rewards, group_size=G)                       # (B,)   mean/std detached, reward grad kept
    loss = pg_loss(lp, adv, mask)                                        # REINFORCE on the masked tokens
    loss, stats = ppo_loss(lp, old_lp, adv, mask, clip_eps=0.2, dual_clip=3.0)

Aggregation (`agg`): "seq_mean" averages tokens within each sequence, then sequences (GRPO); "token_mean" averages over
all masked tokens of the batch (DAPO / BNPO); "seq_sum" sums a sequence's tokens, then averages sequences (the
REINFORCE estimator of d/dθ E[R] for fixed-length CoTs, as in the Markovian paper).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("seq_mean", "token_mean", "seq_sum")


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   return_logits: bool = False, position_ids: torch.Tensor | None = None, last: int | None = None,
                   temperature: float = 1.0):
    """Log-prob of each next token under `model` at `temperature` (log_softmax(logits / T): the distribution tokens
    sampled at T were drawn from). Returns (B, T-1) [and the (B, T-1, V) float32 logits, divided by T].

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
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1) or (B, last)
    return (lp, logits) if return_logits else lp


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 for log-softmax; float64 stays float64 (finite-difference tests)."""
    return x if x.dtype == torch.float64 else x.float()


CHUNK_ROWS = 4  # positions per chunk of the fused vocabulary passes: 4 x 49k floats stay in a core's L2 cache


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy in nats. (..., V) -> (...). Without grad it runs CHUNK_ROWS positions at a time (one
    pass over the logits in cache instead of four full-size temporaries)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)
    z = logits.reshape(-1, logits.shape[-1])  # (P, V)
    out = torch.empty(z.shape[0], dtype=torch.float32 if z.dtype != torch.float64 else z.dtype, device=z.device)
    for s in range(0, z.shape[0], CHUNK_ROWS):
        lp = torch.log_softmax(z[s:s + CHUNK_ROWS].to(out.dtype), dim=-1)
        out[s:s + CHUNK_ROWS] = -(lp.exp() * lp).sum(-1)
    return out.view(logits.shape[:-1])


def kl_exact(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the vocabulary. (..., V), (..., V) -> (...)."""
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


class _KLEntropy(torch.autograd.Function):
    """KL(softmax(zp) || softmax(zq)) and the entropy of softmax(zp) per position, CHUNK_ROWS positions at a time.

    Forward and backward each read the logits once into cache and write one (P,) / (P, V) result, where the
    composed ops make ~15 full (P, V) passes (1.3-1.7 s against 0.23-0.27 s for 512 x 49k float32 logits, one
    thread). Values equal kl_exact / entropy_from_logits bit for bit (the same ops per row); gradients to rounding.
    d KL / d zp = p * (lp - lq - KL), d KL / d zq = q - p; the entropy carries no gradient (a statistic)."""

    @staticmethod
    def forward(ctx, zp, zq):
        V = zp.shape[-1]
        p2, q2 = zp.reshape(-1, V), zq.reshape(-1, V)  # (P, V)
        kl = torch.empty(p2.shape[0], dtype=zp.dtype, device=zp.device)  # (P,)
        ent = torch.empty_like(kl)
        for s in range(0, p2.shape[0], CHUNK_ROWS):
            lp, lq = torch.log_softmax(p2[s:s + CHUNK_ROWS], -1), torch.log_softmax(q2[s:s + CHUNK_ROWS], -1)
            p = lp.exp()
            kl[s:s + CHUNK_ROWS] = (p * (lp - lq)).sum(-1)
            ent[s:s + CHUNK_ROWS] = -(p * lp).sum(-1)
        ctx.save_for_backward(zp, zq, kl)
        ctx.mark_non_differentiable(ent)
        return kl.view(zp.shape[:-1]), ent.view(zp.shape[:-1])

    @staticmethod
    def backward(ctx, g, _g_ent):
        zp, zq, kl = ctx.saved_tensors
        V = zp.shape[-1]
        p2, q2, g2 = zp.reshape(-1, V), zq.reshape(-1, V), g.reshape(-1)  # (P, V), (P, V), (P,)
        want_p, want_q = ctx.needs_input_grad
        gp = torch.empty_like(p2) if want_p else None
        gq = torch.empty_like(q2) if want_q else None
        for s in range(0, p2.shape[0], CHUNK_ROWS):
            e = slice(s, s + CHUNK_ROWS)
            lp, lq = torch.log_softmax(p2[e], -1), torch.log_softmax(q2[e], -1)
            p, gs = lp.exp(), g2[e, None]
            if want_q:
                gq[e] = (lq.exp() - p).mul_(gs)
            if want_p:
                gp[e] = lp.sub_(lq).sub_(kl[e, None]).mul_(p).mul_(gs)
        return (None if gp is None else gp.view(zp.shape)), (None if gq is None else gq.view(zq.shape))


def kl_exact_entropy(logits_p: torch.Tensor, logits_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl_exact(logits_p, logits_q), entropy_from_logits(logits_p)) in one fused, chunked pass: (..., V) x2 ->
    (...) x2. The KL carries gradients to both inputs; the entropy none."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    return _KLEntropy.apply(_upcast(logits_p).contiguous(), _upcast(logits_q).contiguous())


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) on tokens sampled from pi: exp(d) - d - 1 with d = ref - pi.
    Non-negative, unbiased as an estimate of the VALUE of KL(pi || ref); (...) -> (...).

    Its gradient as a loss is not that of KL(pi || ref): on tokens sampled from pi, E_pi[d/dtheta k3] =
    E_pi[(1 - ref/pi) dlog pi] = -sum_x ref(x) dlog pi(x) = d/dtheta KL(ref || pi), the reverse direction
    (tests/test_rl_policy.py checks this against the exact gradients). Use kl_exact for KL(pi || ref) itself."""
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


def group_stats(rewards: torch.Tensor, group_size: int | None = None, *, min_std: float = 0.0, eps: float = 1e-6,
                scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (mean, denominator) of the row's group of `group_size` consecutive rows (None: the whole batch), both
    DETACHED. rewards (B,) -> (B,), (B,); the advantage is A = (R - mean) / denom.

    Detached on purpose: if `rewards` carries a gradient (the Markovian actor-reward term), it flows through R itself
    (dA = dR / denom). With a mean/std that carry gradient, sum(A) = 0 within a group and the gradient of mean(A) is
    identically zero — the bug in the public Markovian code. denom = max(std, min_std) + eps (population std);
    `min_std` > 0 keeps a near-tied group from turning a tiny reward difference into +-1 advantages (and, with a reward
    that carries gradient, a 1/eps gradient). scale=False: denom = 1 (centre only, Dr GRPO).
    """
    r = rewards.detach()
    B = r.shape[0]
    G = B if group_size is None else group_size
    if B % G:
        raise ValueError(f"batch of {B} rewards does not split into groups of {G}")
    g = r.view(B // G, G)  # (n_groups, G)
    mean = g.mean(-1, keepdim=True).expand_as(g)  # (n_groups, G)
    if scale:
        std = g.std(-1, keepdim=True, unbiased=False) if G > 1 else torch.zeros_like(mean[:, :1])
        denom = (std.clamp(min=min_std) + eps).expand_as(g)
    else:
        denom = torch.ones_like(g)
    return mean.reshape(B), denom.reshape(B)


def group_standardize(rewards: torch.Tensor, group_size: int | None = None, eps: float = 1e-6,
                      scale: bool = True, min_std: float = 0.0) -> torch.Tensor:
    """(R - mean) / denom within consecutive groups (group_stats); a group whose rewards all tie gets advantage 0.
    (B,) -> (B,); R's own gradient is kept, the statistics carry none."""
    mean, denom = group_stats(rewards, group_size, min_std=min_std, eps=eps, scale=scale)
    return (rewards - mean) / denom


def shared_prompt_logprobs(model, prompt: list[int], completions, *, pad_id: int = 0, score_from: int = 0,
                           return_logits: bool = False, temperature: float = 1.0):
    """log pi of each of N completions of ONE prompt, running the prompt once and sharing its keys/values.

    completions: N lists of token ids (any lengths; right-padded with pad_id) or an (N, S) tensor. Returns lp
    (N, S - score_from), mask (N, S - score_from) (1.0 on real tokens) [and float logits (N, S - score_from, V)], S =
    the longest completion; column j scores completion token score_from + j given the prompt and the tokens before it.
    `score_from` skips a common head whose log-probs are not needed (the Markovian answer after its CoT): those
    positions produce no (T, V) logits. `temperature`: log-probs (and the returned logits) of the distribution
    softmax(logits / T) that tokens sampled at T came from. The prompt's cache is repeated across the group with a
    differentiable repeat_interleave, so gradients reach the prompt's activations from all N rows exactly as in a
    padded batch of N full rows (tested against token_logprobs), for Tp + N*S positions instead of N*(Tp + S).
    """
    from reasonlab.eval.generate import lm_forward, new_cache

    Tp = len(prompt)
    if Tp < 1:
        raise ValueError("the prompt needs at least one token")
    if torch.is_tensor(completions):
        targets = completions.long()  # (N, S)
        lengths = [targets.shape[1]] * targets.shape[0]
        dev = targets.device
    else:
        N, S = len(completions), max(1, max(len(c) for c in completions))
        dev = next(model.parameters()).device
        targets = torch.full((N, S), pad_id, dtype=torch.long)
        for i, c in enumerate(completions):
            targets[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        targets = targets.to(dev)
        lengths = [len(c) for c in completions]
    N, S = targets.shape
    if not 0 <= score_from < S:
        raise ValueError(f"score_from={score_from} must be in [0, {S - 1}] for completions of {S} tokens")
    cache = new_cache(model)
    p = torch.tensor([prompt], dtype=torch.long, device=dev)  # (1, Tp)
    out = lm_forward(model, cache=cache, input_ids=p, attention_mask=torch.ones_like(p),
                     position_ids=torch.arange(Tp, device=dev)[None], logits_to_keep=1)
    parts = []
    if score_from == 0:
        parts.append(_upcast(out.logits[:, -1:]).expand(N, 1, -1))  # (N, 1, V): predicts completion token 0
    if S > 1:
        cache.batch_repeat_interleave(N)  # (1, H, Tp, d) -> (N, H, Tp, d), differentiable
        x = targets[:, :-1]  # (N, S-1): token j predicts token j+1; padding sits after every real token (causal)
        keep = S - max(score_from, 1)  # trailing positions of x whose predictions are scored
        rest = lm_forward(model, cache=cache, input_ids=x,
                          attention_mask=torch.ones(N, Tp + S - 1, dtype=torch.long, device=dev),
                          position_ids=(Tp + torch.arange(S - 1, device=dev))[None].expand(N, -1),
                          logits_to_keep=keep).logits  # (N, keep, V)
        parts.append(_upcast(rest[:, -keep:]))
    logits = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (N, S - score_from, V)
    if temperature != 1.0:
        logits = logits / temperature
    tgt = targets[:, score_from:]  # (N, S - score_from)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (N, S - score_from)
    cols = torch.arange(score_from, S, device=dev)[None]  # (1, S - score_from)
    mask = (cols < torch.tensor(lengths, device=dev)[:, None]).to(lp.dtype)  # (N, S - score_from)
    return (lp, mask, logits) if return_logits else (lp, mask)


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
