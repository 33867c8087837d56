"""The online watcher, and the ONE thresholds dataclass that it and `reasonlab report` share. Training code imports
this module (never reasonlab.diagnostics, which only reads run folders). Light on purpose: stdlib + reasonlab.config;
torch only inside the helpers that take tensors.

    from reasonlab.watch import WatchConfig, Watcher, rollout_stats, group_reward_stats, record_train_ids

    @dataclass
    class Config(BaseConfig):
        watch: WatchConfig = F(WatchConfig, "online alerts, auto-stop and the detectors' thresholds")

    watcher = Watcher(run, cfg.watch)                     # or Watcher(run, stop_on=["nan", "zero_grad_term"])
    record_train_ids(run, [ex.id for ex in train_examples])   # enables the leakage detector
    for step in range(start, cfg.train.steps):
        if run.should_stop(step): break
        ...
        metrics = {"train/loss": loss.item(), **rollout_stats(texts, answers), **group_reward_stats(rewards)}
        if step % cfg.watch.audit_every == 0:
            metrics.update(audit_terms(terms, trainable).metrics())    # reasonlab.rl.audit
        run.log(step, metrics)
        if watcher.step(step, metrics):                   # True: a stop_on condition fired
            run.save_checkpoint(step, ...); break         # then the final eval, as for a time-limit stop

`WatchConfig` IS a `Thresholds` (plus the online switches), so a config's `watch:` section sets every threshold, and
`reasonlab report` reads that same section from the run's config.yaml: the watcher and the report cannot disagree.

A crossed threshold writes one events.jsonl row (kind = the condition) when it starts and an "info" row when it
clears. Conditions: nan, zero_grad_term, ratio_explosion, ratio_not_one, reward_zero_std, entropy_collapse,
repetition, encoder_collapse. Metric names: see reasonlab.diagnostics.detectors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from reasonlab.config import F

Condition = Literal["nan", "zero_grad_term", "ratio_explosion", "ratio_not_one", "reward_zero_std",
                    "entropy_collapse", "repetition", "encoder_collapse"]
CONDITIONS: tuple[str, ...] = Condition.__args__  # type: ignore[attr-defined]
# live: sends gradient | dead: non-zero weight, ~no gradient | inactive: value and gradient ~0 while the policy is
# still at the term's zero point (a KL at its reference) | idle: value and gradient ~0 at a step where every group's
# rewards tied (zero advantages: no signal to send; reward_zero_std says so) | off: weight 0 at this step
TermState = Literal["live", "dead", "inactive", "idle", "off"]


@dataclass
class Thresholds:
    """Every threshold of the online watcher and of the report's detectors (reasonlab.diagnostics.detectors)."""
    # --- loss terms (gradient audit, rl.audit): each term is judged by what it should be, not against the largest
    zero_value_rel: float = F(1e-5, "a term's weighted value counts as ~0 below this fraction of the summed |weighted "
                                    "values| of all terms (measured: a mean of standardized advantages, identically 0, "
                                    "sits at <= 6e-6; a LoRA KL one step away from its reference at 1.2e-4)")
    zero_value_abs: float = F(1e-5, "... or below this absolute weighted value (measured: float32 round-off of an "
                                    "identically zero mean of O(1) numbers up to 8e-7; seed 002's float term 0.15)")
    kl_moved_min: float = F(1e-6, "a KL-to-reference term (named kl*) counts as ~0 at or below this unweighted value "
                                  "(nats): the policy is still at its reference (exactly 0 there with LoRA; 1e-4..1e-3 "
                                  "after one step of lr 1e-3..5e-2 in the tiny runs)")
    zero_grad_rel: float = F(1e-6, "a term with a visible value sends no gradient when its gradient norm is below "
                                   "this fraction of |its weighted value| (a float or detached term: exactly 0; a live "
                                   "KL: 5-100x its value)")
    dormant_grad_rel: float = F(1e-2, "a term whose value is ~0 sends no gradient when its gradient norm is below "
                                      "this fraction of the largest term's (measured: float32 round-off of an "
                                      "identically zero term up to 1.3e-3 when a group's rewards tie; markovian's "
                                      "actor-reward term, ~0 by construction, is the largest)")
    zero_grad_abs: float = F(1e-12, "... or below this absolute norm")
    zero_grad_frac: float = F(0.8, "flag a term that is dead in at least this fraction of its judged audits (audits "
                                   "where it was merely not yet active are not judged)")
    share_value_min: float = F(0.05, "flag value share >= this while the gradient share is below share_grad_max")
    share_grad_max: float = F(0.005, "gradient share below which a visible loss term is called dead weight")
    # --- PPO, rewards, rollouts, encoders
    ratio_first_tol: float = F(0.05, "|ppo/ratio_first_mean - 1| above this: the ratio is not against pi_old")
    ratio_explode: float = F(5.0, "ppo/ratio_max above this is an explosion")
    clip_frac_max: float = F(0.5, "ppo/clip_frac above this most of the time: updates too large")
    frac_zero_std_max: float = F(0.8, "rollout/frac_zero_std at or above this leaves almost no policy-gradient signal")
    set_le1_correct_max: float = F(0.8, "polychromic: rollout/frac_le1_correct at or above this (groups with <= 1 "
                                        "correct sample) leaves the set term (nearly) GRPO's")
    entropy_min: float = F(0.05, "rollout/entropy (nats/token) below this is entropy collapse")
    char_run_max: int = F(20, "a single character repeated this many times in a row is degenerate")
    char_run_frac: float = F(0.2, "... in at least this fraction of outputs")
    repeat_ngram_max: float = F(0.5, "mean repeated-n-gram rate above this is repetition collapse")
    ngram: int = F(3, "n for the repeated n-gram rate (whitespace tokens)")
    encoder_cos_max: float = F(0.99, "encoder/pairwise_cos at or above this: every input gets the same encoding")
    encoder_ratio_min: float = F(1e-3, "encoder/cross_sample_ratio below this: no variation across inputs")
    # --- outputs and evaluation
    unique_answer_min: float = F(0.1, "unique-answer ratio below this (with distinct golds) is output collapse")
    top_answer_max: float = F(0.5, "one answer in at least this fraction of distinct questions is collapse")
    answer_entropy_min: float = F(0.5, "answer entropy (bits) below this with many distinct golds is suspect")
    min_outputs: int = F(10, "collapse detectors need at least this many outputs")
    collapse_min_steps: int = F(100, "an output collapse with no earlier eval of its split to compare is a failure "
                                     "only after this many training steps (an untrained model often answers "
                                     "everything alike)")
    gap_train_min: float = F(0.3, "train accuracy at least this ...")
    gap_heldout_max: float = F(0.05, "... while held-out accuracy at most this (or at most the most-common-gold rate): "
                                     "memorizing, not generalizing")
    ci_halfwidth_max: float = F(0.05, "95% CI half-width above this: the eval cannot resolve a 5-point change")
    min_eval_n: int = F(100, "evals with fewer examples are underpowered")
    subset_tol: float = F(1e-3, "summary score vs the score recomputed from its records: allowed difference")
    ceiling: float = F(0.98, "a pass@k (k >= 2), or any headline score before training, at or above this is at its "
                             "ceiling: the eval cannot show a gain (seed 002's pass@10 0.998)")
    periodic_eval_min_steps: int = F(500, "a run of at least this many steps with no held-out eval between its start "
                                          "and its end cannot show when it peaked or broke (seed 003)")
    recent_frac: float = F(0.2, "time-series detectors judge the last this fraction of logged values (most of "
                                "them must cross the threshold): the state the run ended in")


@dataclass
class WatchConfig(Thresholds):
    enabled: bool = F(True, "check metrics every step and write events.jsonl when a threshold is crossed")
    stop_on: list[Condition] = F(["nan"], f"conditions that stop the run after checkpointing; any of {', '.join(CONDITIONS)}")
    audit_every: int = F(50, "run the per-term gradient audit (rl.audit) every N steps; 0 disables")
    patience: int = F(2, "a condition must hold this many consecutive checks before it fires (nan: immediately)")

    def __post_init__(self):
        bad = [c for c in self.stop_on if c not in CONDITIONS]
        if bad:
            raise ValueError(f"watch.stop_on: unknown condition '{bad[0]}' (choices: {', '.join(CONDITIONS)})")


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fin(v: Any) -> bool:
    return _isnum(v) and math.isfinite(v)


GRAD_KEYS = ("grad/total_norm_audit", "train/grad_norm")


def had_update(metrics: Mapping[str, Any]) -> bool:
    """Did this step's metrics show a non-zero gradient (so the optimizer step after it moved the parameters)?"""
    return any(_fin(v) and v > 0 for k, v in metrics.items()
               if k in GRAD_KEYS or k.startswith(("grad/term/", "grad/module/")))


def is_reference_term(name: str) -> bool:
    """A KL-to-reference term by its name (kl, kl_ref, ...): its value measures how far the policy has moved."""
    return name.lower().startswith("kl")


def term_states(metrics: Mapping[str, Any], th: Thresholds, moved: bool) -> dict[str, tuple[TermState, str]]:
    """Judge every audited loss term at one audit: {term: (state, why)}.

    `moved`: at least one update with a non-zero gradient happened before this audit. A term is judged by what it
    should be: with a visible weighted value, against that value (seed 002's float: value 0.15, gradient exactly 0 ->
    dead at the first audit); with a value of ~0, its gradient against the largest term's, and then ~0 on both is
    `inactive` while the policy is still at the term's zero point (a LoRA KL at initialisation is exactly 0 with an
    exactly 0 gradient, by construction), and `dead` once the policy has moved: after an update, and, when the run
    has a KL-to-reference term, once that KL is above kl_moved_min (it measures the move); `idle` instead at a step
    whose every reward group tied (the policy gradient is 0 by construction there). A KL's own value is judged in nats
    (unweighted), so a small-weight KL is never measured against the other terms."""
    names = [k[len("grad/term/"):] for k, v in metrics.items() if k.startswith("grad/term/") and _isnum(v)]
    if not names:
        return {}
    g = {t: float(metrics[f"grad/term/{t}"]) for t in names}
    v = {t: float(metrics[f"loss/term/{t}"]) for t in names if _fin(metrics.get(f"loss/term/{t}"))}
    scale = sum(abs(x) for x in v.values())
    gmax = max((x for x in g.values() if math.isfinite(x)), default=0.0)

    def visible(t: str) -> bool:
        if t not in v:
            return False
        w = metrics.get(f"weight/term/{t}", 1.0)
        if is_reference_term(t) and _fin(w) and w != 0:  # a KL is in nats and exactly 0 at its reference
            return abs(v[t] / w) > th.kl_moved_min
        return abs(v[t]) > max(th.zero_value_abs, th.zero_value_rel * scale)

    kls = [t for t in names if is_reference_term(t) and metrics.get(f"weight/term/{t}", 1.0) != 0]
    at_reference = bool(kls) and not any(visible(t) for t in kls)
    out: dict[str, tuple[TermState, str]] = {}
    for t in names:
        if metrics.get(f"weight/term/{t}", 1.0) == 0:
            out[t] = ("off", "weight 0 at this step")
        elif not math.isfinite(g[t]):
            out[t] = ("live", "non-finite gradient (the nan condition covers it)")
        elif visible(t):
            dead = g[t] <= max(th.zero_grad_abs, th.zero_grad_rel * abs(v[t]))
            out[t] = ("dead" if dead else "live", f"gradient {g[t]:.3g} vs its weighted value {v[t]:.3g}")
        elif g[t] > max(th.zero_grad_abs, th.dormant_grad_rel * gmax):
            out[t] = ("live", f"value ~0, gradient {g[t]:.3g} (largest term {gmax:.3g})")
        elif not moved or at_reference:
            why = "before any update" if not moved else f"the KL ({', '.join(kls)}) is still ~0"
            out[t] = ("inactive", f"value and gradient ~0 at the reference point ({why})")
        elif _fin(metrics.get("rollout/frac_zero_std")) and metrics["rollout/frac_zero_std"] >= 1.0:
            out[t] = ("idle", "value and gradient ~0 while every group's rewards tied (zero advantages)")
        else:
            out[t] = ("dead", f"value and gradient ~0 after the policy moved (gradient {g[t]:.3g}, largest term "
                              f"{gmax:.3g})")
    return out


class Watcher:
    def __init__(self, run, cfg: WatchConfig | None = None, stop_on: Sequence[str] | None = None):
        self.run = run
        self.cfg = cfg or WatchConfig(stop_on=list(stop_on) if stop_on is not None else ["nan"])
        if stop_on is not None and cfg is not None:
            self.cfg = WatchConfig(**{**self.cfg.__dict__, "stop_on": list(stop_on)})
        self.streak: dict[str, int] = {}
        self.active: set[str] = set()
        self.stop_reason: str | None = None
        self.moved = False  # an update with a non-zero gradient has happened (parameters left their initial values)

    def check(self, metrics: dict[str, Any], moved: bool | None = None) -> dict[str, tuple[str, dict]]:
        """Conditions that hold for these metrics: {kind: (message, data)}. Pure; `moved` defaults to what this
        watcher has seen so far."""
        c, hits = self.cfg, {}
        moved = self.moved if moved is None else moved
        bad = [k for k, v in metrics.items() if isinstance(v, float) and (math.isnan(v) or math.isinf(v))]
        if bad:
            hits["nan"] = (f"non-finite {', '.join(bad[:5])}", {"keys": bad})
        states = term_states(metrics, c, moved)
        dead = [t for t, (s, _) in states.items() if s == "dead"]
        if dead:
            hits["zero_grad_term"] = (f"loss term(s) {', '.join(dead)} have non-zero weight and zero gradient "
                                      f"({'; '.join(states[t][1] for t in dead)})",
                                      {"terms": dead, "grad_norms": {t: metrics[f"grad/term/{t}"] for t in dead}})
        r = metrics.get("ppo/ratio_max")
        if _isnum(r) and (not math.isfinite(r) or r > c.ratio_explode):
            hits["ratio_explosion"] = (f"ppo/ratio_max {r:.3g} > {c.ratio_explode}", {"ratio_max": r})
        r1 = metrics.get("ppo/ratio_first_mean")
        if _isnum(r1) and (not math.isfinite(r1) or abs(r1 - 1) > c.ratio_first_tol):
            hits["ratio_not_one"] = (f"ppo/ratio_first_mean {r1:.4g} != 1 at a fresh rollout: ratio is not taken "
                                     "against the sampling policy", {"ratio_first_mean": r1})
        z = metrics.get("rollout/frac_zero_std")
        if _isnum(z) and z >= c.frac_zero_std_max:
            hits["reward_zero_std"] = (f"{100 * z:.0f}% of groups have identical rewards (no gradient signal)",
                                       {"frac_zero_std": z})
        e = metrics.get("rollout/entropy")
        if _isnum(e) and e < c.entropy_min:
            hits["entropy_collapse"] = (f"policy entropy {e:.3g} nats/token", {"entropy": e})
        cr = metrics.get("rollout/max_char_run")
        if _isnum(cr) and cr >= c.char_run_max:
            hits["repetition"] = (f"rollouts repeat one character {cr:.0f} times", {"max_char_run": cr})
        cos = metrics.get("encoder/pairwise_cos")
        if _isnum(cos) and cos >= c.encoder_cos_max:
            hits["encoder_collapse"] = (f"encoder outputs identical across inputs (pairwise cos {cos:.4f})",
                                        {"pairwise_cos": cos})
        return hits

    def step(self, step: int, metrics: dict[str, Any]) -> bool:
        """Check one step's metrics; write events on threshold crossings. True: stop (checkpoint, final eval, exit)."""
        if not self.cfg.enabled:
            return False
        metrics = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v) for k, v in metrics.items()}
        hits = self.check(metrics)
        self.moved = self.moved or had_update(metrics)  # this step's update happens after its audit
        # a condition is only judged on a step whose metrics could show it (audits/rollout metrics come on a
        # schedule); an observed step without it breaks the streak, so `patience` counts consecutive observations
        for kind in CONDITIONS:
            if kind not in hits and self._observable(kind, metrics):
                self.streak[kind] = 0
                if kind in self.active:
                    self.active.discard(kind)
                    self.run.event(step, kind, f"{kind} cleared", severity="info")
        stop = False
        for kind, (msg, data) in hits.items():
            self.streak[kind] = self.streak.get(kind, 0) + 1
            need = 1 if kind == "nan" else max(1, self.cfg.patience)
            if self.streak[kind] < need or kind in self.active:
                continue
            self.active.add(kind)
            will_stop = kind in self.cfg.stop_on
            sev = "error" if kind in ("nan", "zero_grad_term", "ratio_explosion", "ratio_not_one") else "warning"
            self.run.event(step, kind, msg + ("; stopping after checkpoint" if will_stop else ""), severity=sev,
                           **data)
            if will_stop and self.stop_reason is None:
                self.stop_reason = f"watch:{kind}"
                self._request_stop(self.stop_reason)
                stop = True
        return stop or self.stop_reason is not None

    @staticmethod
    def _observable(kind: str, metrics: dict) -> bool:
        keys = {"nan": None, "zero_grad_term": "grad/term/", "ratio_explosion": "ppo/ratio_max",
                "ratio_not_one": "ppo/ratio_first_mean", "reward_zero_std": "rollout/frac_zero_std",
                "entropy_collapse": "rollout/entropy", "repetition": "rollout/max_char_run",
                "encoder_collapse": "encoder/pairwise_cos"}[kind]
        return keys is None or any(k.startswith(keys) for k in metrics)

    def _request_stop(self, reason: str) -> None:
        req = getattr(self.run, "request_stop", None)
        if callable(req):
            req(reason)
        elif getattr(self.run, "_stop_reason", "x") is None:  # Run has no public setter yet; should_stop reads this
            self.run._stop_reason = reason


# ----------------------------------------------------------------------------------------------- per-step statistics


def char_run(text: str) -> int:
    """Longest run of one repeated non-space character ("44444" -> 5)."""
    best, cur, prev = 0, 0, None
    for ch in text:
        cur = cur + 1 if ch == prev and not ch.isspace() else 1
        prev = ch
        best = max(best, cur)
    return best


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """1 - distinct/total n-grams over whitespace tokens of one text (0 = nothing repeats; 0 if shorter than n)."""
    toks = text.split()
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rollout_stats(texts: Sequence[str], answers: Sequence[str | None] | None = None, n: int = 3) -> dict[str, float]:
    """rollout/unique_ratio, rollout/unique_answer_ratio, rollout/repeat_ngram_rate, rollout/max_char_run,
    rollout/len_words for one batch of sampled texts (and their extracted answers, None = invalid)."""
    if not texts:
        return {}
    out = {"rollout/unique_ratio": len(set(texts)) / len(texts),
           "rollout/repeat_ngram_rate": sum(repeated_ngram_rate(t, n) for t in texts) / len(texts),
           "rollout/max_char_run": float(max(char_run(t) for t in texts)),
           "rollout/len_words": sum(len(t.split()) for t in texts) / len(texts)}
    if answers is not None:
        valid = [a for a in answers if a is not None]
        out["rollout/unique_answer_ratio"] = len(set(valid)) / len(valid) if valid else 0.0
        out["rollout/invalid_rate"] = 1 - len(valid) / len(answers) if answers else 0.0
    return out


def group_reward_stats(rewards, group_size: int | None = None, eps: float = 1e-6) -> dict[str, float]:
    """rewards (G, n) — or flat with group_size — -> rollout/reward_mean, rollout/reward_std (mean within-group std),
    rollout/frac_zero_std (share of groups whose rewards all tie: zero advantage, zero gradient)."""
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float64)
    if group_size is not None:
        r = r.reshape(-1, group_size)  # (G, n)
    if r.ndim == 1:
        r = r[None]  # one group: (1, n)
    std = r.std(dim=1, unbiased=False)  # (G,)
    return {"rollout/reward_mean": float(r.mean()), "rollout/reward_std": float(std.mean()),
            "rollout/frac_zero_std": float((std <= eps).double().mean())}


def encoder_stats(x) -> dict[str, float]:
    """Collapse statistics of encoder outputs / soft tokens x: (B, T, D) or (B, D), B >= 2 different inputs.

    encoder/token_std            std over the T tokens of one sample, averaged (0 = all tokens equal)
    encoder/cross_sample_var     variance across the B samples of each element, averaged over (T, D)
    encoder/cross_sample_ratio   cross_sample_var / variance of all elements (scale-free; ~0 = same code for all)
    encoder/pairwise_cos         mean cosine between different samples' flattened outputs (~1 = same code for all)
    encoder/output_norm          mean L2 norm of one token
    """
    import torch

    with torch.no_grad():
        x = x.detach().float()
        if x.ndim == 2:
            x = x[:, None, :]  # (B, 1, D)
        b = x.shape[0]
        flat = x.reshape(b, -1)  # (B, T*D)
        total = float(flat.var(unbiased=False))
        cross = float(flat.var(dim=0, unbiased=False).mean())
        unit = torch.nn.functional.normalize(flat, dim=1)
        sim = unit @ unit.T  # (B, B)
        cos = float((sim.sum() - sim.diagonal().sum()) / max(1, b * (b - 1)))
        tok_std = float(x.std(dim=1, unbiased=False).mean()) if x.shape[1] > 1 else 0.0
        return {"encoder/token_std": tok_std, "encoder/cross_sample_var": cross,
                "encoder/cross_sample_ratio": cross / total if total > 0 else 0.0, "encoder/pairwise_cos": cos,
                "encoder/output_norm": float(x.norm(dim=-1).mean())}


def record_train_ids(run_or_dir, ids: Iterable[str]) -> Path | None:
    """Write <run>/data/train_ids.txt (one id per line): what the leakage detector checks held-out evals against.
    Demonstrations trained on are ids "<task>/demo<j>" (eval records are "<task>/<j>"): the detector judges those
    by task, so an evaluation task whose demonstrations were trained on is seen even though no id matches."""
    if getattr(run_or_dir, "is_main", True) is False or getattr(run_or_dir, "dry_run", False):
        return None
    d = Path(getattr(run_or_dir, "dir", run_or_dir)) / "data"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "train_ids.txt"
    tmp = d / f".train_ids.txt.tmp-{os.getpid()}"
    tmp.write_text("".join(f"{i}\n" for i in dict.fromkeys(str(i) for i in ids)))
    os.replace(tmp, path)
    return path
