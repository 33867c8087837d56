"""Set-level (polychromic) advantages: score SETS of samples for being correct and diverse, then give each sample the
credit of the sets it belongs to. Pure functions; nothing here samples or touches a model.

Paper: Hamid et al., "Polychromic Objectives for Reinforcement Learning", arXiv 2509.25424. The objective is the
expected score of a set of n rollouts, f(Y) = (mean reward of Y) x d(Y), d in [0, 1] (e.g. the fraction of distinct
outcomes). Poly-PPO estimates a per-rollout advantage from N >= n rollouts of one state:

    member = all_subsets(N, n)  or  random_subsets(N, n, M, gen)        # (M, N) bool: which samples each subset holds
    f = torch.tensor([score(idx) for idx in subsets_as_indices(member)])  # (M,) set score of each subset
    adv = subset_advantage(member, f)                                   # (N,): mean over subsets containing i of
                                                                        #        (f - mean f); 0 if i is in none
    adv = leave_one_out_advantage(f_all, f_without)                     # (N,): f(Y) - f(Y without y_i)

Because the advantage multiplies log pi(y_i) in the policy gradient (REINFORCE / score function), the set objective has
a real gradient: d/dtheta E[f(Y)] = E[sum_i A_i d log pi(y_i)/dtheta]. The public code of seed 002 subtracted
`lambda * diversity` where diversity was a Python float computed from text: no graph, zero gradient, every lambda
trained plain SFT. Here diversity enters only through A_i, which weights a term that has a graph.

Diversity measures over a subset (indices into one prompt's N samples), each in [0, 1]:
  "answers"   fraction of distinct extracted answers (distinct / n); every unreadable answer (None) is ONE class, so
              garbage cannot buy diversity; answers are compared after removing whitespace ("3*7" == "3 * 7").
  "distinct"  Distinct-n over the subset's texts (unique / total whitespace n-grams), reasonlab.eval.diversity.
  "semantic"  mean pairwise (1 - cosine) of the samples' sentence embeddings (all-MiniLM-L6-v2), clipped to [0, 1].
Set score: "product" f = mean(r) x d (the paper) or "sum" f = mean(r) + w x d (recorded as `combine`).

Poly-EPO (Orney, Hamid et al., arXiv 2604.17654; its definition as restated by secondary sources, not read from the
paper itself): the same product f with d = distinct classes / n, and f = 0 for a set whose members are all one class
(the indicator 1[|classes| > 1]); the per-sample "marginal set advantage" is the mean (or, equivalently up to the
constant C(N-1, n-1), the sum) over the sets containing y of f(G) - mean f over all C(N, n) sets, with no std
normalization: `objective="poly_epo"` here, with the subset estimator over all subsets and normalize none. The paper's
classes are an LM judge's reasoning-strategy clusters; here they are the (canonical) answers.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

DIVERSITIES = ("answers", "distinct", "semantic")
COMBINES = ("product", "sum")
OBJECTIVES = ("polychromic", "poly_epo")


# ----------------------------------------------------------------------------------------------------------------------
# subsets


def all_subsets(N: int, n: int) -> torch.Tensor:
    """Every size-n subset of N samples as a membership matrix (C(N, n), N) bool, in lexicographic order."""
    if not 1 <= n <= N:
        raise ValueError(f"subset size n={n} must be in [1, N={N}]")
    combos = list(itertools.combinations(range(N), n))
    member = torch.zeros(len(combos), N, dtype=torch.bool)
    for m, idx in enumerate(combos):
        member[m, list(idx)] = True
    return member  # (M, N)


def random_subsets(N: int, n: int, M: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """M independent uniformly random size-n subsets of N samples (drawn with replacement across m). (M, N) bool."""
    if not 1 <= n <= N:
        raise ValueError(f"subset size n={n} must be in [1, N={N}]")
    if M < 1:
        raise ValueError(f"need M >= 1 subsets, got {M}")
    keys = torch.rand(M, N, generator=generator)  # (M, N)
    idx = keys.argsort(dim=1)[:, :n]  # (M, n): the first n of a random permutation
    member = torch.zeros(M, N, dtype=torch.bool)
    member.scatter_(1, idx, True)
    return member


def choose_subsets(N: int, n: int, M: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """All subsets when M <= 0 or M >= C(N, n) (exact), else M random ones."""
    if M <= 0 or M >= math.comb(N, n):
        return all_subsets(N, n)
    return random_subsets(N, n, M, generator)


def subsets_as_indices(member: torch.Tensor) -> list[tuple[int, ...]]:
    """(M, N) bool -> M tuples of sample indices."""
    return [tuple(int(i) for i in row.nonzero().flatten()) for row in member]


# ----------------------------------------------------------------------------------------------------------------------
# advantages


def subset_advantage(member: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Poly-PPO advantage. member (M, N) bool, scores (M,) -> (adv (N,), baseline ()).

    baseline = mean over the M subsets of f; adv_i = mean over subsets m that contain i of (f_m - baseline);
    a sample in no subset gets 0. Detached: these are constants that weight log pi in the policy gradient.
    """
    if member.ndim != 2 or scores.shape != member.shape[:1]:
        raise ValueError(f"member must be (M, N) and scores (M,), got {tuple(member.shape)} and {tuple(scores.shape)}")
    f = scores.detach().to(torch.float64)
    base = f.mean()
    w = member.to(torch.float64)  # (M, N)
    cnt = w.sum(0)  # (N,) subsets containing each sample
    tot = (w * (f - base)[:, None]).sum(0)  # (N,)
    adv = torch.where(cnt > 0, tot / cnt.clamp(min=1.0), torch.zeros_like(tot))
    return adv.to(torch.float32), base.to(torch.float32)


def leave_one_out_advantage(f_all: float, f_without: Sequence[float]) -> torch.Tensor:
    """A_i = f(Y) - f(Y without y_i): how much the whole set loses when sample i is removed. (N,)"""
    return torch.tensor([float(f_all) - float(x) for x in f_without], dtype=torch.float32)


def standardize(adv: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(A - mean) / (std + eps) over the last dim (one prompt's samples); all-equal rows become 0. (..., N)."""
    a = adv.detach()
    mean = a.mean(-1, keepdim=True)
    std = a.std(-1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (a - mean) / (std + eps), torch.zeros_like(a))


# ----------------------------------------------------------------------------------------------------------------------
# set scores


def normalize_answer(answer: str | None) -> str:
    """Answers compared for diversity: whitespace removed; every None is the same '<invalid>' class."""
    return "<invalid>" if answer is None else "".join(answer.split())


def answer_diversity(answers: Sequence[str | None]) -> float:
    """Distinct answers / number of samples (None counts as one shared class)."""
    if not answers:
        raise ValueError("answer_diversity of an empty set")
    return len({normalize_answer(a) for a in answers}) / len(answers)


def pairwise_cosine_distance(emb: torch.Tensor) -> torch.Tensor:
    """emb (N, D) -> (N, N) 1 - cosine similarity, clipped to [0, 1] (diagonal 0)."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    d = (1.0 - e @ e.T).clamp(0.0, 1.0)  # (N, N)
    d.fill_diagonal_(0.0)
    return d


def combine(mean_reward: float, diversity: float, how: str = "product", weight: float = 1.0) -> float:
    """Set score from the set's mean reward and diversity: product r x d (paper) or sum r + weight x d."""
    if how == "product":
        return mean_reward * diversity
    if how == "sum":
        return mean_reward + weight * diversity
    raise ValueError(f"set combine must be one of {COMBINES}, got {how!r}")


def make_set_scorer(rewards: Sequence[float], *, diversity: str = "answers", answers: Sequence[str | None] | None = None,
                    texts: Sequence[str] | None = None, distance: torch.Tensor | None = None, ngram: int = 2,
                    how: str = "product", weight: float = 1.0,
                    objective: str = "polychromic") -> tuple[Callable[[tuple[int, ...]], float],
                                                             Callable[[tuple[int, ...]], float]]:
    """Closures over one prompt's N samples: (score(idx) -> f, div(idx) -> d) for a tuple of sample indices.

    diversity "answers" needs `answers`, "distinct" needs `texts`, "semantic" needs `distance` (N, N) from
    pairwise_cosine_distance of the samples' embeddings. objective "poly_epo" (answers, product only): f = 0 when
    every member of the set has the same answer class.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"set objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "poly_epo" and (diversity != "answers" or how != "product"):
        raise ValueError("objective 'poly_epo' counts answer classes: it needs diversity 'answers', combine 'product'")
    r = [float(x) for x in rewards]
    if diversity == "answers":
        if answers is None:
            raise ValueError("diversity 'answers' needs the extracted answers")
        keys = [normalize_answer(a) for a in answers]

        def div(idx):
            return len({keys[i] for i in idx}) / len(idx)
    elif diversity == "distinct":
        if texts is None:
            raise ValueError("diversity 'distinct' needs the texts")
        from reasonlab.eval.diversity import ngrams

        grams = [ngrams(t.split(), ngram) for t in texts]

        def div(idx):
            g = [x for i in idx for x in grams[i]]
            return len(set(g)) / len(g) if g else 0.0  # no n-gram at all (empty outputs): no diversity credit
    elif diversity == "semantic":
        if distance is None:
            raise ValueError("diversity 'semantic' needs the (N, N) embedding distance matrix")
        dist = distance.detach().to(torch.float64)

        def div(idx):
            if len(idx) < 2:
                return 0.0
            sub = dist[list(idx)][:, list(idx)]  # (n, n)
            k = len(idx)
            return float(sub.sum() / (k * (k - 1)))
    else:
        raise ValueError(f"diversity must be one of {DIVERSITIES}, got {diversity!r}")

    def score(idx):
        d = div(idx)
        if objective == "poly_epo" and d * len(idx) <= 1:  # one class only: the set explores nothing
            return 0.0
        return combine(sum(r[i] for i in idx) / len(idx), d, how, weight)

    return score, div


def set_advantages(rewards: Sequence[float], score: Callable[[tuple[int, ...]], float], *, n: int, M: int = 0,
                   estimator: str = "subset", generator: torch.Generator | None = None) -> dict:
    """Per-sample set-level advantages for one prompt's N samples.

    estimator "subset": Poly-PPO (subsets of size n; M random ones, or all when M <= 0 or M >= C(N, n)).
    estimator "loo": leave-one-out over the whole set, f(Y) - f(Y without y_i) (n is ignored).
    Returns {"adv": (N,), "baseline": float (mean subset score, or f(Y) for loo), "full": f(Y), "n_subsets": int}.
    """
    N = len(rewards)
    everything = tuple(range(N))
    full = score(everything)
    if estimator == "subset":
        member = choose_subsets(N, n, M, generator)  # (M, N)
        f = torch.tensor([score(idx) for idx in subsets_as_indices(member)], dtype=torch.float64)  # (M,)
        adv, base = subset_advantage(member, f)
        return {"adv": adv, "baseline": float(base), "full": full, "n_subsets": member.shape[0]}
    if estimator == "loo":
        if N < 2:
            raise ValueError("leave-one-out needs at least 2 samples per prompt")
        without = [score(tuple(j for j in everything if j != i)) for i in range(N)]
        return {"adv": leave_one_out_advantage(full, without), "baseline": full, "full": full, "n_subsets": N}
    raise ValueError(f"set estimator must be 'subset' or 'loo', got {estimator!r}")
