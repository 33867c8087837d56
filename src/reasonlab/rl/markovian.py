"""Pure pieces of Markovian chain-of-thought training (Viteri et al., "Markovian Transformers for Informative Language
Modeling"): token-row packing, the answer log-prob reward, group statistics with a detached mean/std, the actor-reward
term, within-group expert-iteration selection, and rollout checks. Nothing here samples, logs or owns an optimizer.

    rows = pack_rows([(ctx_ids, answer_ids)], pad)          # left-padded (B, T) + a mask per segment
    R = segment_logprob(model, rows, segment=1)             # (B,) ln pi(answer | redacted prompt + CoT)
    mean, denom = policy.group_stats(R.detach(), group_size=G, min_std=0.01)
    A = (R - mean) / denom                                  # value = standardized reward, gradient = dR / denom
    actor = actor_reward_loss(A)                            # -mean(A): its gradient flows through ln pi(answer | CoT)

The paper's loss is  -ln u(CoT | q) * A.detach() - A + kl_coef * KL(u || u_ref)  with A standardized using a mean/std
that carry no gradient. With a mean/std that DO carry gradient (the public code), sum_i A_i = 0 in every group and the
gradient of -mean(A) is identically zero; the public code also computed ln pi(answer | CoT) under no_grad. Both make the
actor-reward term dead; rl.policy.group_stats returns plain detached tensors so neither can happen here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from reasonlab.rl.policy import token_logprobs


@dataclass
class Rows:
    """A left-padded batch of token rows made of segments; `seg_mask[k]` marks segment k's tokens as TARGETS, i.e. on
    the (B, T-1) grid of token_logprobs (position t scores ids[:, t+1])."""

    ids: torch.Tensor  # (B, T) token ids, left-padded
    attn: torch.Tensor  # (B, T) 1 on real tokens
    seg_mask: list[torch.Tensor]  # per segment: (B, T-1) float, 1.0 where the predicted token belongs to the segment

    def to(self, device) -> "Rows":
        return Rows(self.ids.to(device), self.attn.to(device), [m.to(device) for m in self.seg_mask])

    def select(self, idx) -> "Rows":
        """Rows idx (a list or tensor of row indices), re-trimmed so no column is padding in every row."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        ids, attn = self.ids[idx], self.attn[idx]
        first = int(attn.argmax(-1).min()) if attn.numel() else 0  # leftmost real token over the selected rows
        return Rows(ids[:, first:], attn[:, first:], [m[idx][:, first:] for m in self.seg_mask])


def pack_rows(rows: list[tuple[list[int], ...]], pad_id: int) -> Rows:
    """Each row is a tuple of segments (lists of token ids) concatenated in order; rows are left-padded to one length.

    Left padding keeps every row's last token at the same column, and token_logprobs derives positions from the mask, so
    a padded row scores exactly like the unpadded row. Segment 0 is context; masks are returned for every segment.
    """
    if not rows:
        raise ValueError("pack_rows needs at least one row")
    n_seg = len(rows[0])
    full = [sum((list(s) for s in r), []) for r in rows]
    T = max(len(f) for f in full)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # which segment each column holds (-1 = padding)
    for i, (r, f) in enumerate(zip(rows, full)):
        if len(r) != n_seg:
            raise ValueError(f"row {i} has {len(r)} segments, row 0 has {n_seg}")
        off = T - len(f)
        ids[i, off:] = torch.tensor(f, dtype=torch.long)
        attn[i, off:] = 1
        pos = off
        for k, s in enumerate(r):
            seg[i, pos:pos + len(s)] = k
            pos += len(s)
    tgt = seg[:, 1:]  # (B, T-1): the segment of the token each position predicts
    return Rows(ids, attn, [(tgt == k).float() for k in range(n_seg)])


def segment_span(rows: Rows, segment: int) -> int:
    """How many trailing positions of the (B, T-1) target grid cover every token of `segment` in every row."""
    cols = rows.seg_mask[segment].sum(0).nonzero()
    if cols.numel() == 0:
        raise ValueError(f"segment {segment} is empty in every row")
    return rows.seg_mask[segment].shape[1] - int(cols.min())


def segment_logprob(model, rows: Rows, segment: int, agg: str = "mean", return_tokens: bool = False,
                    temperature: float = 1.0):
    """ln pi(segment tokens | everything before them) per row: (B,), by `agg` = "mean" (per-token average, as the public
    Markovian code scores answers) or "sum" (the sequence log-likelihood). Only the trailing positions that hold the
    segment are scored (logits_to_keep), so a long prompt costs no (T, V) logits. With return_tokens, also the per-token
    log-probs (B, n), float logits (B, n, V) and the segment mask (B, n) of those n trailing positions. `temperature`:
    log-probs of softmax(logits / T) (a CoT sampled at T); the answer reward is scored at T = 1. Gradient flows when
    the caller has grad enabled."""
    if agg not in ("mean", "sum"):
        raise ValueError(f"answer log-prob aggregation must be 'mean' or 'sum', got {agg!r}")
    n = segment_span(rows, segment)
    lp, logits = token_logprobs(model, rows.ids, rows.attn, return_logits=True, last=n,
                                temperature=temperature)  # (B, n), (B, n, V)
    m = rows.seg_mask[segment][:, -n:]  # (B, n)
    total = (lp * m).sum(-1)  # (B,)
    out = total / m.sum(-1).clamp(min=1.0) if agg == "mean" else total
    return (out, lp, logits, m) if return_tokens else out


def actor_reward_loss(adv: torch.Tensor) -> torch.Tensor:
    """The paper's '- A' term: -mean(A). Its gradient is -mean(dR/denom) when A carries R's graph, exactly 0 when not."""
    return -adv.mean()


def expert_iteration_mask(adv: torch.Tensor, min_adv: float) -> torch.Tensor:
    """Within-group expert iteration: keep the rollouts whose standardized advantage is >= min_adv. (B,) -> (B,) float."""
    return (adv.detach() >= min_adv).to(adv.dtype)


def answer_in_text(gold: str, text: str) -> bool:
    """Does the CoT already state the gold answer? Numbers match as whole numbers ('135' not inside '1350'; commas
    ignored); anything else (a letter, a word) must stand alone as a word. Long free-text golds (wiki) never count."""
    g = gold.strip()
    if not g or len(g.split()) > 3:
        return False
    if re.fullmatch(r"-?\d+(?:\.\d+)?", g):
        return re.search(rf"(?<![\d.]){re.escape(g)}(?![\d]|\.\d)", text.replace(",", "")) is not None
    return re.search(rf"(?<!\w){re.escape(g)}(?!\w)", text) is not None


def sample_seed(seed: int, step: int, question: int, salt: int = 0) -> int:
    """The sampling seed of one question's group at one step: independent of how questions are spread over processes."""
    return (seed * 1_000_003 + step * 10_007 + question * 101 + salt) % (2**63 - 1)


def minibatch_groups(n_groups: int, minibatches: int) -> list[list[int]]:
    """Split group indices 0..n_groups-1 into `minibatches` contiguous chunks of whole groups."""
    if minibatches < 1 or n_groups % minibatches:
        raise ValueError(f"{n_groups} question groups per process do not split into {minibatches} minibatches")
    k = n_groups // minibatches
    return [list(range(i * k, (i + 1) * k)) for i in range(minibatches)]
