"""Evaluation metrics, each returned with its sample size and a 95% confidence interval.

- accuracy: Wilson score interval over units (well behaved at 0 and 1 and for small n, unlike the normal approximation).
- a mean of per-unit scores in [0, 1] (per-question accuracy over several samples, per-problem pass@k, per-prompt
  diversity): "bootstrap" = a Bayesian bootstrap (Rubin 1981: Dirichlet(1, ..., 1) weights over the units) with HALF
  A PSEUDO-UNIT AT EACH END OF THE RANGE (Dirichlet weight 1/2 on a unit scoring 0 and one scoring 1). A percentile
  bootstrap of 20 questions that all score 0 resamples zeros and reports [0, 0]: a certainty 20 questions do not
  give. The pseudo-units cannot be resampled away, so the interval never has zero width; on 0/1 units it is the
  Jeffreys interval (Beta(c + 1/2, n - c + 1/2)), 0/20 -> [0, 0.11]; its coverage stays >= 0.93 from p = 0.005 to
  0.99 (tests/test_metrics.py simulates it), where the percentile bootstrap's falls to 0.2 near 0. The interval is
  widened, when needed, to contain the point estimate (0/n -> lower end 0).
- a mean of unbounded values (lengths): "percentile-bootstrap"; when every value is equal there is no spread to
  resample and no bound to lean on, so the interval is None (said, not invented).
- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"),
  1 - C(n-c, k) / C(n, k), in the numerically stable product form; refuses k > n.
- majority vote (maj@n), invalid rate, unique-answer ratio and answer entropy: the last two catch the "every output is
  '#### 1'" collapse that plain accuracy hides.
- paired bootstrap: the difference between two eval files over their shared example ids, with a two-sided p-value;
  for scores in [0, 1] the differences lie in [-1, 1] and get the same half pseudo-unit at -1 and +1, so two
  identical evals of 20 questions give an interval around 0 of about +-0.1, not [0, 0].

Every metric is a `Metric` (value, n, lo, hi, method) that serializes to a plain dict for evals/<tag>.json.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
PSEUDO = 0.5  # Dirichlet weight of the pseudo-unit at each end of a bounded range (1/2: Jeffreys on 0/1 units)

CI_METHODS = {  # what each Metric.method means; the report prints these next to the intervals
    "wilson": "Wilson score interval over units",
    "bootstrap": "Bayesian bootstrap over units with half a pseudo-unit at each end of [0, 1] (never zero width; "
                 "Jeffreys on 0/1 units)",
    "percentile-bootstrap": "percentile bootstrap over units (unbounded values)",
    "none": "no interval",
}


@dataclass
class Metric:
    value: float  # the point estimate
    n: int  # how many units it was computed over (examples, samples, pairs)
    lo: float | None = None  # lower end of the 95% interval (None when it is not defined, e.g. n = 0)
    hi: float | None = None  # upper end
    method: str = ""  # how the interval was computed: a key of CI_METHODS

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.lo is None or self.hi is None:
            return f"{self.value:.4f} (n={self.n})"
        return f"{self.value:.4f} [{self.lo:.4f}, {self.hi:.4f}] (n={self.n})"


# ----------------------------------------------------------------------------- proportions

def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion. n = 0 gives the uninformative (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def accuracy(correct: Iterable[bool]) -> Metric:
    """Fraction correct with a Wilson 95% interval."""
    xs = [bool(c) for c in correct]
    n, c = len(xs), sum(xs)
    if n == 0:
        return Metric(float("nan"), 0, None, None, "wilson")
    lo, hi = wilson_interval(c, n)
    return Metric(c / n, n, lo, hi, "wilson")


def invalid_rate(valid: Iterable[bool]) -> Metric:
    """Fraction of outputs from which the primary extractor got nothing (Wilson interval)."""
    return accuracy(not v for v in valid)


# ----------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct.

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i): no huge binomials, no overflow (Chen et al. 2021).
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}: sample more (--samples {k}) "
                         f"or lower k")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c={c} correct out of n={n} samples is impossible")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def distinct_correct_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Expected number of DISTINCT correct answers among k samples drawn without replacement from one problem's n
    samples (unbiased, the pass@k estimator applied per answer): sum over the distinct correct answers a, with c_a
    samples each, of 1 - C(n - c_a, k) / C(n, k). At k = n it is the count of distinct correct answers; dividing by
    the problem's number of solutions gives coverage@k. `answers` are compared as given (pass canonical forms)."""
    counts = Counter(a for a, ok in zip(answers, correct) if ok)
    return float(sum(pass_at_k(len(answers), c, k) for c in counts.values()))


def mean_draws(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
               bounds: tuple[float, float] | None = None) -> np.ndarray:
    """(n_boot,) bootstrap draws of the mean of `values` over independent units.

    bounds=(lo, hi), the range every unit's score lies in: Bayesian bootstrap (Dirichlet(1, ..., 1) weights over the
    units) with a pseudo-unit of weight PSEUDO at lo and at hi, which no draw can drop (see the module docstring).
    bounds=None: the percentile bootstrap's resampled means (they collapse to a point when every value is equal)."""
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if bounds is None:
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))  # (B, N) resampled unit indices
        return x[idx].mean(axis=1)  # (B,)
    lo, hi = bounds
    w = rng.standard_gamma(1.0, size=(n_boot, len(x)))  # (B, N) Dirichlet(1, ..., 1) weights, unnormalized
    p = rng.standard_gamma(PSEUDO, size=(n_boot, 2))  # (B, 2) the pseudo-units at lo and at hi
    return (w @ x + p[:, 0] * lo + p[:, 1] * hi) / (w.sum(axis=1) + p.sum(axis=1))  # (B,)


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """95% interval of a mean over independent units (mean_draws' 2.5% and 97.5% quantiles); with bounds it is
    widened to contain the observed mean (0/n -> lower end exactly 0)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    means = mean_draws(values, n_boot, seed, bounds)
    lo, hi = float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
    if bounds is None:
        return lo, hi
    mu = float(np.mean(np.asarray(values, dtype=np.float64)))
    return min(lo, mu), max(hi, mu)


def unit_bounds(values: Sequence[float]) -> tuple[float, float] | None:
    """(0, 1) when every value lies in [0, 1] (rates, fractions, similarities: the scores this project averages),
    else None (unbounded)."""
    return (0.0, 1.0) if len(values) and all(0.0 <= v <= 1.0 for v in values) else None


def pass_at_k_metric(counts: Sequence[tuple[int, int]], k: int, n_boot: int = 2000, seed: int = 0) -> Metric:
    """Mean unbiased pass@k over problems given (n_samples, n_correct) per problem; bootstrap CI over problems."""
    per = [pass_at_k(n, c, k) for n, c in counts]
    if not per:
        return Metric(float("nan"), 0, None, None, "bootstrap")
    lo, hi = bootstrap_mean_ci(per, n_boot=n_boot, seed=seed, bounds=(0.0, 1.0))  # per-problem pass@k in [0, 1]
    return Metric(float(np.mean(per)), len(per), lo, hi, "bootstrap")


# ----------------------------------------------------------------------------- answer distribution

def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most common valid answer; ties go to the answer seen first (deterministic). None when nothing is valid."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


def majority_accuracy(groups: Sequence[tuple[Sequence[str | None], Sequence[bool]]]) -> Metric:
    """maj@n: per problem, take the most common extracted answer and count the problem correct when any sample with
    that answer was scored correct (the scorer owns equivalence, e.g. "18" vs "18.0"). Wilson CI over problems."""
    hits = []
    for answers, correct in groups:
        vote = majority_vote(answers)
        hits.append(vote is not None and any(a == vote and c for a, c in zip(answers, correct)))
    return accuracy(hits)


def answer_entropy(answers: Iterable[str | None]) -> Metric:
    """Shannon entropy (bits) of the extracted-answer distribution; invalid outputs count as one '<invalid>' class.
    A model that always answers '#### 1' scores 0 here even if that is sometimes right."""
    counts = Counter("<invalid>" if a is None else a for a in answers)
    n = sum(counts.values())
    if n == 0:
        return Metric(float("nan"), 0, None, None, "none")
    p = np.array(list(counts.values()), dtype=np.float64) / n
    return Metric(float(-(p * np.log2(p)).sum()), n, None, None, "none")


def unique_answer_ratio(answers: Iterable[str | None]) -> Metric:
    """Distinct valid answers / valid answers. Near 0 = the model repeats one answer whatever the question."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return Metric(float("nan"), 0, None, None, "none")
    return Metric(len(set(valid)) / len(valid), len(valid), None, None, "none")


def mean_metric(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                bounds: tuple[float, float] | None | Literal["auto"] = "auto") -> Metric:
    """Mean over units with a 95% interval: per-question accuracy over several samples, per-prompt diversity,
    lengths. bounds "auto": (0, 1) when every value lies in it (unit_bounds), else unbounded; see bootstrap_mean_ci.
    An unbounded mean whose values are all equal gets no interval (lo = hi = None), not a zero-width one."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    b = unit_bounds(vals) if bounds == "auto" else bounds
    method = "bootstrap" if b is not None else "percentile-bootstrap"
    if not vals:
        return Metric(float("nan"), 0, None, None, method)
    mu = float(np.mean(vals))
    if b is None and min(vals) == max(vals):
        return Metric(mu, len(vals), None, None, "none")
    lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, seed=seed, bounds=b)
    return Metric(mu, len(vals), lo, hi, method)


# ----------------------------------------------------------------------------- paired comparison

@dataclass
class PairedDiff:
    diff: float  # mean(b) - mean(a) over shared ids
    lo: float  # 95% percentile-bootstrap interval of the difference
    hi: float
    p_value: float  # two-sided: how often a resampled difference is as far from the observed one as the observed is from 0
    n: int  # shared example ids
    mean_a: float
    mean_b: float
    n_only_a: int  # ids in a but not in b (ignored)
    n_only_b: int
    n_boot: int
    seed: int
    method: str = "bootstrap"  # a key of CI_METHODS: "bootstrap" = differences bounded in [-1, 1]

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(a: dict[str, float], b: dict[str, float], n_boot: int = 10_000, seed: int = 0) -> PairedDiff:
    """Paired bootstrap of mean(b) - mean(a) over the example ids both contain.

    Resampling ids (not outputs) keeps the pairing, so the per-question difficulty cancels. Scores in [0, 1] give
    differences in [-1, 1]: the Bayesian bootstrap with a half pseudo-unit at -1 and +1 (mean_draws), so identical
    evals do not claim a difference of exactly [0, 0]; other scores: the percentile bootstrap. The p-value uses the
    bootstrap distribution shifted to the null (Efron & Tibshirani 16.4): p = P(|d* - d| >= |d|), with +1 smoothing.
    """
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two eval files share no example ids: were they run on the same task and split?")
    xa = np.array([a[i] for i in shared], dtype=np.float64)
    xb = np.array([b[i] for i in shared], dtype=np.float64)
    d = xb - xa  # (N,) per-example differences
    obs = float(d.mean())
    bounded = unit_bounds(list(xa) + list(xb)) is not None
    boot = mean_draws(d, n_boot, seed, (-1.0, 1.0) if bounded else None)  # (B,)
    extreme = np.sum(np.abs(boot - obs) >= abs(obs) - 1e-12)
    p = float((extreme + 1) / (n_boot + 1))
    lo, hi = float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))
    if bounded:  # the pseudo-units shrink draws toward 0: keep the observed difference inside
        lo, hi = min(lo, obs), max(hi, obs)
    return PairedDiff(
        diff=obs, lo=lo, hi=hi, p_value=min(1.0, p),
        n=len(shared), mean_a=float(xa.mean()), mean_b=float(xb.mean()), n_only_a=len(set(a) - set(b)),
        n_only_b=len(set(b) - set(a)), n_boot=n_boot, seed=seed,
        method="bootstrap" if bounded else "percentile-bootstrap",
    )


def per_example_scores(jsonl_path: str | Path, field: str = "correct") -> dict[str, float]:
    """Read an evals/<tag>.jsonl file into {example id: mean of `field` over its samples}."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with open(jsonl_path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "id" not in rec or field not in rec:
                raise ValueError(f"{jsonl_path}:{line_no}: record has no '{'id' if 'id' not in rec else field}' "
                                 f"field: is this an evals/<tag>.jsonl file?")
            sums[rec["id"]] = sums.get(rec["id"], 0.0) + float(rec[field])
            counts[rec["id"]] = counts.get(rec["id"], 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def compare_eval_files(path_a: str | Path, path_b: str | Path, n_boot: int = 10_000, seed: int = 0,
                       field: str = "correct") -> PairedDiff:
    """Paired bootstrap between two eval jsonl files (b - a) over shared example ids."""
    return paired_bootstrap(per_example_scores(path_a, field), per_example_scores(path_b, field), n_boot, seed)
