"""Metrics: Wilson known values, pass@k vs brute-force subset enumeration, majority vote, entropy, paired bootstrap."""

import itertools
import json
import math

import pytest

from reasonlab.eval import metrics as M


@pytest.mark.parametrize("c,n,lo,hi", [
    (5, 10, 0.236593, 0.763407),   # textbook value (symmetric at p = 0.5)
    (0, 10, 0.0, 0.277533),        # Wilson never collapses to [0, 0] at c = 0
    (10, 10, 0.722467, 1.0),
])
def test_wilson_known_values(c, n, lo, hi):
    a, b = M.wilson_interval(c, n)
    assert a == pytest.approx(lo, abs=1e-5) and b == pytest.approx(hi, abs=1e-5)


def test_wilson_matches_scipy():
    from scipy.stats import binomtest
    for c, n in [(3, 7), (1, 200), (150, 200), (57, 64)]:
        ci = binomtest(c, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert M.wilson_interval(c, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_accuracy_metric_is_jsonable():
    m = M.accuracy([True, False, True, True])
    assert (m.value, m.n, m.method) == (0.75, 4, "wilson")
    assert json.loads(json.dumps(m.to_dict()))["n"] == 4
    assert M.invalid_rate([True, True, False, True]).value == 0.25


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Fraction of all size-k subsets of the n samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert M.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12), (n, c, k)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 500) overflows floats; the product form does not. Compare with exact integer arithmetic.
    n, c, k = 1000, 3, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert M.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert M.pass_at_k(10, 0, 3) == 0.0 and M.pass_at_k(10, 8, 3) == 1.0


def test_pass_at_k_refuses_k_greater_than_n():
    with pytest.raises(ValueError, match="at least 8 samples"):
        M.pass_at_k(4, 1, 8)
    m = M.pass_at_k_metric([(4, 1), (4, 0), (4, 4)], k=2)
    assert m.n == 3 and m.value == pytest.approx((0.5 + 0 + 1) / 3)
    assert m.lo <= m.value <= m.hi


def test_majority_vote_and_answer_distribution():
    assert M.majority_vote(["3", None, "4", "3"]) == "3"
    assert M.majority_vote(["4", "3"]) == "4"  # tie -> first seen
    assert M.majority_vote([None, None]) is None
    groups = [(["3", "3", "5"], [True, True, False]), (["1", "2", "2"], [True, False, False]), ([None], [False])]
    m = M.majority_accuracy(groups)
    assert (m.value, m.n) == (pytest.approx(1 / 3), 3)
    # the constant-answer collapse: one answer everywhere -> entropy 0, unique ratio 1/n
    const = ["1"] * 50
    assert M.answer_entropy(const).value == 0.0
    assert M.unique_answer_ratio(const).value == pytest.approx(1 / 50)
    assert M.answer_entropy(["1", "2", "3", "4"]).value == pytest.approx(2.0)
    assert M.answer_entropy(["1", None]).value == pytest.approx(1.0)


def test_paired_bootstrap(tmp_path):
    ids = [f"t/{i}" for i in range(200)]
    a = {i: float(j % 2 == 0) for j, i in enumerate(ids)}  # 50%
    same = M.paired_bootstrap(a, dict(a), n_boot=2000, seed=1)
    assert same.diff == 0 and same.p_value == 1.0 and same.n == 200
    better = {i: 1.0 for i in ids[:150]}  # 100% on 150 shared ids; 50 ids only in a
    r = M.paired_bootstrap(a, better, n_boot=2000, seed=1)
    assert r.n == 150 and r.n_only_a == 50 and r.diff == pytest.approx(0.5)
    assert r.p_value < 0.01 and r.lo > 0.3
    assert M.paired_bootstrap(a, better, n_boot=2000, seed=1) == r  # seeded
    # from eval files: several samples per id are averaged per id
    fa, fb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    fa.write_text("".join(json.dumps({"id": i, "sample": s, "correct": s == 0}) + "\n" for i in ids[:20] for s in range(2)))
    fb.write_text("".join(json.dumps({"id": i, "sample": 0, "correct": True}) + "\n" for i in ids[:20]))
    d = M.compare_eval_files(fa, fb, n_boot=500)
    assert d.n == 20 and d.mean_a == 0.5 and d.diff == pytest.approx(0.5)
    with pytest.raises(ValueError, match="share no example ids"):
        M.paired_bootstrap({"x": 1.0}, {"y": 1.0})


# ----------------------------------------------------------------------------- intervals that cannot collapse

@pytest.mark.parametrize("c,n", [(0, 20), (20, 20), (5, 20), (1, 200), (150, 200)])
def test_bounded_bootstrap_is_jeffreys_on_01_units(c, n):
    """On 0/1 units the bounded Bayesian bootstrap is the Jeffreys interval Beta(c + 1/2, n - c + 1/2), with the
    lower end 0 at c = 0 and the upper end 1 at c = n: never of zero width."""
    from scipy.stats import beta

    m = M.mean_metric([1.0] * c + [0.0] * (n - c), n_boot=40_000)
    lo, hi = beta.ppf([0.025, 0.975], c + 0.5, n - c + 0.5)
    assert m.method == "bootstrap" and m.n == n and m.value == c / n
    assert m.lo == pytest.approx(0.0 if c == 0 else lo, abs=0.006)
    assert m.hi == pytest.approx(1.0 if c == n else hi, abs=0.006)
    assert m.hi - m.lo > 0.01


def test_several_samples_all_wrong_or_all_right_are_not_certain():
    """Issue 17, point 4: `reasonlab eval --limit 20 --samples 2` with every sample wrong reported [0.0, 0.0]."""
    from reasonlab.eval import harness as H

    def recs(correct):
        return [{"id": f"q{i}", "sample": s, "output": "#### 3", "extracted": "3", "gold": "7", "correct": correct,
                 "valid": True, "extractor": "x@1", "finish": "eos", "new_tokens": 3,
                 "correct_by": {"strict-match@1": correct}} for i in range(20) for s in range(2)]

    for correct, (lo, hi) in ((False, (0.0, 0.11)), (True, (0.89, 1.0))):
        m = H.summarize_records(recs(correct))["metrics"]
        for key in ("accuracy", "accuracy/strict-match@1", "pass@1", "pass@2"):
            a = m[key]
            assert a["n"] == 20 and a["method"] == "bootstrap", (key, a)
            assert a["lo"] == pytest.approx(lo, abs=0.012) and a["hi"] == pytest.approx(hi, abs=0.012), (key, a)
        assert m["mean_new_tokens"]["lo"] is None and m["mean_new_tokens"]["method"] == "none"  # all 3: no spread


def test_bounded_bootstrap_covers_where_the_percentile_bootstrap_does_not():
    """Coverage of the 95% interval of a per-question mean (20 questions x 2 samples, heterogeneous questions): the
    percentile bootstrap collapses near 0 and misses the truth most of the time; the bounded one keeps ~95%."""
    import numpy as np

    rng = np.random.default_rng(3)
    trials = 300
    for p, floor_new, ceil_old in ((0.02, 0.92, 0.75), (0.5, 0.92, 1.0)):
        new = old = 0
        for t in range(trials):
            q = rng.beta(2 * p, 2 * (1 - p), size=20)  # each question's own solve rate, mean p
            x = rng.binomial(2, q) / 2  # (20,) per-question means of 2 samples
            lo, hi = M.bootstrap_mean_ci(x, n_boot=1000, seed=t, bounds=(0.0, 1.0))
            new += lo <= p <= hi
            lo, hi = M.bootstrap_mean_ci(x, n_boot=1000, seed=t)
            old += lo <= p <= hi
        assert new / trials >= floor_new, (p, new / trials)
        assert old / trials <= ceil_old, (p, old / trials)


def test_pass_at_k_and_paired_intervals_at_the_extremes():
    every = M.pass_at_k_metric([(4, 4)] * 30, k=2)
    assert every.value == 1.0 and every.hi == 1.0 and 0.9 < every.lo < 0.99
    none = M.pass_at_k_metric([(4, 0)] * 30, k=2)
    assert none.value == 0.0 and none.lo == 0.0 and 0.01 < none.hi < 0.1
    same = {f"q{i}": 0.0 for i in range(20)}
    d = M.paired_bootstrap(same, dict(same), n_boot=4000)
    assert d.diff == 0.0 and d.p_value == 1.0 and d.lo < -0.01 and d.hi > 0.01 and d.method == "bootstrap"
    lengths = M.mean_metric([3.0, 5.0, 9.0])
    assert lengths.method == "percentile-bootstrap" and lengths.lo < lengths.value < lengths.hi
