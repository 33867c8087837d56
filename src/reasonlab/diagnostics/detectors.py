"""Detectors: run folder -> findings. Each one names a failure from the seed reports, reads only the run folder, and
says what it saw (steps, values), why it matters, and what to do.

    findings = run_detectors("runs/markovian-arc-...")        # list[Finding], most severe first

Metric names the detectors read (recipes MUST log these names; see DESIGN.md "Metric names"):

  grad/term/<t>, loss/term/<t>, weight/term/<t>   gradient audit (reasonlab.rl.audit.audit_terms(...).metrics())
  ppo/ratio_first_mean   mean pi_theta/pi_old over the FIRST minibatch of a fresh rollout, before any update on it.
                         It is exactly 1 when pi_old is the policy that sampled; anything else means the ratio is taken
                         against another policy (the public Markovian PPO used the frozen base: seed 003).
  ppo/ratio_mean, ppo/ratio_max, ppo/clip_frac, ppo/approx_kl
  rollout/unique_ratio, rollout/unique_answer_ratio, rollout/repeat_ngram_rate, rollout/max_char_run,
  rollout/frac_le1_correct (polychromic: fraction of groups with <= 1 correct sample)
  rollout/reward_std, rollout/frac_zero_std (fraction of prompt groups whose rewards all tie), rollout/entropy
                         (mean per-token policy entropy, nats)   -> reasonlab.watch.rollout_stats / group_reward_stats
  encoder/cross_sample_var, encoder/cross_sample_ratio, encoder/pairwise_cos, encoder/token_std
                         -> reasonlab.watch.encoder_stats (ETRM encoder outputs; bridge soft tokens)
  train/exact_accuracy | train/acc | train/accuracy   training-batch accuracy, the same kind of score as the held-out
                         primary metric (exact match, not token accuracy), for the generalization-gap detector
Anything under evals/ and checkpoints/ follows the conventions in runfolder.py.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Callable

from reasonlab.diagnostics.eval_checks import (  # noqa: F401 (re-exported: report.py and tests import them here)
    control_diffs, detect_ceiling, detect_checkpoint_selection, detect_compute, detect_controls, detect_copy_task,
    detect_eval_power, detect_eval_schedule, detect_generalization_gap, detect_leakage, detect_no_improvement,
    detect_run_end)
from reasonlab.diagnostics.findings import SEVERITY_ORDER, Finding, Severity, _f, _recent  # noqa: F401
from reasonlab.diagnostics.runfolder import EvalFile, RunFolder, finite
from reasonlab.watch import Thresholds, char_run, had_update, repeated_ngram_rate, term_states


# ---------------------------------------------------------------------------------------------------------- training


def detect_nonfinite(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """NaN/inf in any logged metric (tracking.py writes them as NaN/Infinity so they are visible here)."""
    first: dict[str, tuple[int, float]] = {}
    for row in rf.metrics:
        for k, v in row.items():
            if isinstance(v, float) and not finite(v) and k not in first:
                first[k] = (int(row.get("step", -1)), v)
    if not first:
        return []
    step = min(s for s, _ in first.values())
    keys = sorted(first, key=lambda k: first[k][0])
    return [_f("failed", "nonfinite", f"NaN/inf in {len(keys)} metric(s), first at step {step} ({keys[0]})",
               [first[k][0] for k in keys], [str(first[k][1]) for k in keys], keys=keys,
               explanation="A non-finite loss or gradient poisons every parameter it touches; everything logged "
                           "after it is meaningless.",
               recommendation="Resume from the last checkpoint before that step with a lower lr or gradient "
                              "clipping; put `nan` in watch.stop_on so the run stops itself next time.")]


def term_audits(rf: RunFolder, th: Thresholds) -> dict[str, list[tuple[int, str, str, float, float | None]]]:
    """{term: [(step, state, why, grad norm, weighted value)]} for every audited step, in logged order: the same
    judgement (reasonlab.watch.term_states) the online watcher makes. An audit counts as after a move when an
    earlier logged step showed a non-zero gradient (its optimizer step changed the parameters)."""
    out: dict[str, list] = {}
    moved = False
    for row in rf.metrics:
        states = term_states(row, th, moved)
        for t, (state, why) in states.items():
            v = row.get(f"loss/term/{t}")
            out.setdefault(t, []).append((int(row.get("step", -1)), state, why, float(row[f"grad/term/{t}"]),
                                          float(v) if isinstance(v, (int, float)) else None))
        moved = moved or had_update(row)
    return out


def detect_zero_grad_terms(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """A loss term with non-zero weight that sends no gradient (seeds 002, 003), judged by what it should be
    (reasonlab.watch.term_states): a visible value with ~no gradient is dead at the first audit (seed 002's float);
    a value and gradient of ~0 are "not yet active" while the policy is at the term's zero point (a LoRA KL at
    initialisation: 0 by construction) and dead only if they stay ~0 after the policy moved (seed 003's advantage
    standardized with non-detached mean/std). Also a term whose share of the loss VALUE is visible while its share of
    the GRADIENT is nil."""
    out = []
    for t, audits in term_audits(rf, th).items():
        judged = [a for a in audits if a[1] in ("live", "dead")]
        dead = [a for a in judged if a[1] == "dead"]
        inactive = [a for a in audits if a[1] == "inactive"]
        if judged and len(dead) / len(judged) >= th.zero_grad_frac:
            vshare = rf.series(f"share/loss/{t}")[1]
            share_txt = f"; it is {100 * max(vshare):.1f}% of the loss value" if vshare else ""
            out.append(_f(
                "failed", "zero_grad_term",
                f"loss term '{t}' has non-zero weight but zero gradient at {len(dead)}/{len(judged)} judged audits"
                f"{share_txt}", [a[0] for a in dead][:20], [a[3] for a in dead][:20], term=t,
                loss_values=[a[4] for a in dead][:5], why=dead[0][2], not_yet_active_audits=len(inactive),
                explanation=f"'{t}' sends no gradient to any trainable parameter where it should: it is computed "
                            "from a detached tensor or a Python float (e.g. a score from text sampled under "
                            "no_grad/inference_mode, or log-probs taken under no_grad), or it is identically zero "
                            "(advantages standardized with mean/std that are not detached sum to zero). Raising its "
                            "weight changes nothing.",
                recommendation=f"Compute '{t}' from tensors that carry the graph (no .item(), no no_grad, no "
                               "inference_mode on that path); if it is a reward, feed it through a policy-gradient "
                               "term (-logp * advantage.detach()). Verify with rl.audit.audit_terms."))
            continue
        if inactive and not judged:
            out.append(_f("info", "term_not_yet_active",
                          f"loss term '{t}' was not yet active at its {len(inactive)} audit(s): value and gradient ~0 "
                          "at its reference point", [a[0] for a in inactive][:20], [a[3] for a in inactive][:20],
                          term=t, why=inactive[0][2],
                          explanation="At the reference point (a LoRA policy at initialisation equals its reference) "
                                      "a KL-type term and its gradient are exactly 0 by construction; that says "
                                      "nothing about the term. It is judged at the audits after the policy has moved.",
                          recommendation="Nothing to do; audit later steps (watch.audit_every) to see it act."))
        vs, gs = dict(zip(*rf.series(f"share/loss/{t}"))), dict(zip(*rf.series(f"share/grad/{t}")))
        both = [(s, vs[s], gs[s]) for s in vs if s in gs]
        if both:
            n_bad = sum(1 for _, v, g in both if v >= th.share_value_min and g < th.share_grad_max)
            if n_bad / len(both) >= th.zero_grad_frac:
                s, v, g = both[-1]
                out.append(_f("warning", "term_share_mismatch",
                              f"loss term '{t}' is {100 * v:.1f}% of the loss value but {100 * g:.2f}% of the gradient",
                              [b[0] for b in both][-10:], [b[2] for b in both][-10:], term=t, value_share=v,
                              explanation="A term's share of the loss value says nothing about how much it moves "
                                          "the parameters; this one barely does.",
                              recommendation="Judge a term's weight by its gradient share (grad/term/*), not its "
                                             "value share; check it is not mostly a constant."))
    return out


def detect_ppo_ratio(rf: RunFolder, th: Thresholds) -> list[Finding]:
    out = []
    s1, r1 = rf.series("ppo/ratio_first_mean")
    bad = [(s, r) for s, r in zip(s1, r1) if not finite(r) or abs(r - 1.0) > th.ratio_first_tol]
    if bad:
        out.append(_f(
            "failed", "ppo_ratio_not_one",
            f"PPO ratio at the first minibatch of a fresh rollout is not 1 ({len(bad)}/{len(r1)} rollouts, "
            f"e.g. {bad[0][1]:.3g} at step {bad[0][0]})",
            [b[0] for b in bad][:20], [b[1] for b in bad][:20],
            explanation="Before any update on a new rollout, pi_theta equals the policy that sampled it, so the "
                        "importance ratio must be exactly 1. A ratio away from 1 means it is computed against a "
                        "different policy (e.g. the frozen base model, as in the public Markovian PPO): once the "
                        "policy drifts, clipping zeroes the gradient of every positive-advantage sample.",
            recommendation="Store the sampling policy's log-probs (pi_old) at rollout time and take the ratio "
                           "against them; keep the reference model only for the KL term."))
    s2, rmax = rf.series("ppo/ratio_max")
    exp = [(s, r) for s, r in zip(s2, rmax) if not finite(r) or r > th.ratio_explode]
    if exp:
        peak = max(exp, key=lambda x: x[1] if finite(x[1]) else float("inf"))
        out.append(_f(
            "failed", "ppo_ratio_explosion",
            f"PPO ratio exploded: max {peak[1]:.3g} at step {peak[0]} (> {th.ratio_explode}); "
            f"~{math.log(max(peak[1], 1e-12)):.2f} nats of drift", [e[0] for e in exp][:20], [e[1] for e in exp][:20],
            explanation="A ratio far outside [1-eps, 1+eps] means the policy moved far from the one that sampled the "
                        "data; clipped objectives then give no gradient (or, unclipped, huge steps).",
            recommendation="Check the ratio is against pi_old (see ppo/ratio_first_mean); add dual-clip "
                           "(clip_ratio_c=3) and clamp the log-ratio; lower lr or the number of PPO epochs."))
    s3, cf = rf.series("ppo/clip_frac")
    if cf:
        rs, rv = _recent(s3, cf, th.recent_frac)
        hi = [v for v in rv if v > th.clip_frac_max]
        if len(hi) > len(rv) / 2:
            out.append(_f("warning", "ppo_clip_high", f"PPO clip fraction above {th.clip_frac_max} in "
                          f"{len(hi)}/{len(rv)} recent steps", rs[-10:], rv[-10:],
                          explanation="Most samples are clipped: the update size is too large for the trust region.",
                          recommendation="Lower lr or PPO epochs; check the ratio is against pi_old."))
    return out


def detect_reward_signal(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """Entropy collapse / reward std ~0 for most groups: group-normalized advantages are then all zero. Polychromic
    with the set term: most groups hold <= 1 correct sample, where the set advantage is GRPO's."""
    out = []
    s, v = rf.series("rollout/frac_zero_std")
    if v:
        rs, rv = _recent(s, v, th.recent_frac)
        hi = [x for x in rv if x >= th.frac_zero_std_max]
        if len(hi) > len(rv) / 2:
            out.append(_f("warning", "reward_zero_std",
                          f"reward std is ~0 in >= {100 * th.frac_zero_std_max:.0f}% of groups in {len(hi)}/{len(rv)} "
                          "recent steps", rs[-10:], rv[-10:],
                          explanation="When every sample of a prompt gets the same reward the group-normalized "
                                      "advantage is 0: those prompts contribute no policy gradient. Either the task "
                                      "is too hard/easy for the model or the samples are identical.",
                          recommendation="Use prompts of the right difficulty, more samples per group, a denser "
                                         "reward, or a higher sampling temperature."))
    s, v = rf.series("rollout/frac_le1_correct")
    mode = ((rf.config or {}).get("set") or {}).get("mode", "polychromic")
    if v and rf.config.get("method") == "polychromic" and mode != "grpo":
        rs, rv = _recent(s, v, th.recent_frac)
        hi = [x for x in rv if finite(x) and x >= th.set_le1_correct_max]
        if len(hi) > len(rv) / 2:
            out.append(_f("warning", "set_term_is_grpo",
                          f"the set term cannot differ from GRPO here: >= {100 * th.set_le1_correct_max:.0f}% of "
                          f"groups held <= 1 correct sample in {len(hi)}/{len(rv)} recent steps", rs[-10:], rv[-10:],
                          explanation="With 0 correct samples every set scores 0 (no signal); with 1 correct sample "
                                      "among distinct answers every subset holding it has the same diversity, so the "
                                      "set advantage is GRPO's up to a scale. The set objective only acts when a "
                                      "group holds several correct samples, some of them the same answer.",
                          recommendation="Use a task or a starting checkpoint the model solves more often (pass@1 "
                                         "well above 1/rollout.n), more samples per prompt, or branch from a GRPO "
                                         "checkpoint (model.init_from) once it has started to repeat answers."))
    s, v = rf.series("rollout/entropy")
    if len(v) >= 2:
        rs, rv = _recent(s, v, th.recent_frac)
        low = [x for x in rv if finite(x) and x < th.entropy_min]
        if len(low) > len(rv) / 2:
            out.append(_f("warning", "entropy_collapse",
                          f"policy entropy fell to {rv[-1]:.3g} nats/token (from {v[0]:.3g})", rs[-10:], rv[-10:],
                          explanation="The policy is (nearly) deterministic: samples of one prompt no longer differ, "
                                      "so exploration and the group baseline both stop working.",
                          recommendation="Raise the KL/entropy coefficient or the sampling temperature; lower lr."))
    return out


def detect_encoder_collapse(rf: RunFolder, th: Thresholds) -> list[Finding]:
    out = []
    s, cos = rf.series("encoder/pairwise_cos")
    s2, ratio = rf.series("encoder/cross_sample_ratio")
    s3, var = rf.series("encoder/cross_sample_var")
    hits = []
    if cos and finite(cos[-1]) and cos[-1] >= th.encoder_cos_max:
        hits.append(f"mean pairwise cosine {cos[-1]:.4f}")
    if ratio and finite(ratio[-1]) and ratio[-1] < th.encoder_ratio_min:
        hits.append(f"cross-sample variance is {ratio[-1]:.2e} of the total")
    elif not ratio and var and finite(var[-1]) and var[-1] < 1e-8:
        hits.append(f"cross-sample variance {var[-1]:.2e}")
    if hits:
        steps, vals = (s, cos) if cos else ((s2, ratio) if ratio else (s3, var))
        out.append(_f("failed", "encoder_collapse", "encoder/soft-token output is the same for every input: "
                      + ", ".join(hits), steps[-10:], vals[-10:],
                      explanation="The conditioning tokens carry no information about the input, so the decoder "
                                  "answers every question the same way (a question-independent prior).",
                      recommendation="Add a term that needs input-specific codes (contrastive/separation: true vs "
                                     "shuffled source must differ), start with text scaffolding (soft_plus_text), "
                                     "check the encoder gets gradient (grad/module/*) and is not over-normalized."))
    return out


# ---------------------------------------------------------------------------------------------------------- outputs


def _latest_outputs(rf: RunFolder) -> list[EvalFile]:
    """The latest non-control eval of each split (its outputs describe the trained model)."""
    latest: dict[str, EvalFile] = {}
    for e in rf.evals:
        if e.own and e.records and e.split:
            latest[e.split] = e
    return list(latest.values())


def _output_text(r: dict) -> str:
    """A record's output as one string: text as is, a structured output (a grid) as compact JSON."""
    o = r.get("output", "")
    return o.strip() if isinstance(o, str) else json.dumps(o, separators=(",", ":"))


def _collapse_stats(e: EvalFile, th: Thresholds) -> dict | None:
    """Answer-distribution statistics of one eval, judged against its gold distribution; None when the eval is too
    small or has one gold. "concentrated": one response for >= top_answer_max of the questions and >= 20 points
    above the most common gold; "few": far fewer distinct answers than distinct golds."""
    from reasonlab.eval.metrics import answer_entropy, unique_answer_ratio

    recs = [r for r in e.records if "id" in r and ("output" in r or "extracted" in r)]
    ids = {str(r["id"]) for r in recs}
    gold_by_id = {str(r["id"]): json.dumps(r["gold"]) for r in recs if r.get("gold") is not None}
    if len(ids) < th.min_outputs or len(set(gold_by_id.values())) <= 1:
        return None
    answers = [None if r.get("extracted") is None else str(r["extracted"]) for r in recs]
    outputs = [_output_text(r) for r in recs]
    # a response is the extracted answer, or the whole output when nothing was extracted ("::::" for every input
    # is as collapsed as "#### 1" for every input; two grids that share their first rows are different answers)
    responses = [a if a is not None else f"<no answer> {o}" for a, o in zip(answers, outputs)]
    top, _ = Counter(responses).most_common(1)[0]
    # share of distinct questions that got the top response (samples of one question would inflate a raw count)
    top_share = len({str(r["id"]) for r, x in zip(recs, responses) if x == top}) / len(ids)
    gold_top_share = Counter(gold_by_id.values()).most_common(1)[0][1] / max(1, len(gold_by_id))
    n_golds = len(set(gold_by_id.values()))
    valid = [a for a in answers if a is not None]
    concentrated = top_share >= th.top_answer_max and top_share - gold_top_share >= 0.2
    few = n_golds >= 10 and ((len(valid) >= len(answers) / 2 and len(set(valid)) / n_golds < th.unique_answer_min)
                             or len(set(outputs)) / n_golds < th.unique_answer_min)
    if not (concentrated or few):
        return None
    return {"top": top, "top_share": top_share, "gold_top_share": gold_top_share, "n_golds": n_golds,
            "n": len(ids), "uar": unique_answer_ratio(answers).value, "ent": answer_entropy(answers).value,
            "uout": len(set(outputs)) / len(outputs), "concentrated": concentrated,
            "common": [o[:120] for o, _ in Counter(outputs).most_common(3)]}


def detect_output_collapse(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """The final outputs are (nearly) one answer whatever the question, judged against the gold distribution. A
    failure when training caused it: an earlier eval of the split was not collapsed, or, without one, the run trained
    for collapse_min_steps or more (an untrained model often answers everything alike: that is its starting point)."""
    out = []
    for e in _latest_outputs(rf):
        st = _collapse_stats(e, th)
        if st is None:
            continue
        earlier = [x for x in rf.evals if x.own and x.split == e.split and x.records and x.step is not None
                   and e.step is not None and x.step < e.step]
        base = _collapse_stats(earlier[0], th) if earlier else None
        steps = rf.last_step or 0
        if not st["concentrated"]:
            sev, note = "warning", ""
        elif earlier and base is not None and base["concentrated"]:
            sev, note = "warning", f"; already so at step {earlier[0].step} ({earlier[0].tag}): the starting model's habit"
        elif earlier or steps >= th.collapse_min_steps:
            sev, note = "failed", ""
        else:
            sev, note = "warning", (f"; no eval before step {e.step} to compare and {steps} training steps: possibly "
                                    "the untrained model's habit")
        top = st["top"]
        what = f"'{_clip_txt(top)}'" if not top.startswith("<no answer>") else \
            f"output '{_clip_txt(top[12:])}' (no answer extracted)"
        num = lambda x: f"{x + 0.0:.3f}" if finite(x) else "-"  # noqa: E731  (+ 0.0: no "-0.000")
        out.append(_f(
            sev, "output_collapse",
            f"[{e.tag}] same answer regardless of input: {what} for {100 * st['top_share']:.0f}% of {st['n']} "
            f"questions (most common gold: {100 * st['gold_top_share']:.0f}%); unique answers {num(st['uar'])}, "
            f"unique outputs {st['uout']:.3f}, answer entropy {num(st['ent'])} bits{note}",
            [e.step] if e.step is not None else [],
            [st["uar"], st["uout"], st["ent"], st["top_share"], st["gold_top_share"]], tag=e.tag,
            metrics=["unique_answer_ratio", "unique_output_ratio", "answer_entropy_bits", "top_answer_share",
                     "gold_top_share"], top_answer=top[:200], distinct_golds=st["n_golds"], common_outputs=st["common"],
            explanation="The model emits (nearly) one answer whatever the question, so any accuracy it has is "
                        "the base rate of that answer. Typical causes: conditioning that carries no input "
                        "information (encoder/soft-token collapse), a question-independent teacher/prior, or a "
                        "reward the constant already maximizes.",
            recommendation="Check encoder/* stats and the controls (shuffled/zero source); make the teacher "
                           "see the question; add a term that penalizes identical outputs across inputs."))
    s, v = rf.series("rollout/unique_answer_ratio")
    if v and finite(v[-1]) and v[-1] < th.unique_answer_min and not out:
        out.append(_f("info", "output_collapse", f"rollout unique-answer ratio fell to {v[-1]:.3f}",
                      s[-10:], v[-10:], explanation="Training samples share one answer (expected when a batch is "
                                                    "many samples of one solved question; suspicious otherwise).",
                      recommendation="Inspect rollouts; see the eval outputs."))
    return out


def _clip_txt(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def detect_repetition(rf: RunFolder, th: Thresholds) -> list[Finding]:
    out = []
    for e in _latest_outputs(rf):
        # text outputs only: a grid printed as text repeats "8, 8, 8" because grids have uniform regions
        texts = [r["output"] for r in e.records if isinstance(r.get("output"), str)]
        if len(texts) < th.min_outputs:
            continue
        runs = [char_run(t) for t in texts]
        rates = [repeated_ngram_rate(t, th.ngram) for t in texts]
        long = [t for t, r in zip(texts, runs) if r >= th.char_run_max]
        mean_rate = sum(rates) / len(rates)
        n_multi = sum(len(t.split()) >= th.ngram for t in texts)  # the n-gram rate needs >= n words
        rate_txt = f"repeated {th.ngram}-word-gram rate {mean_rate:.2f}" if n_multi else "no multi-word outputs"
        if len(long) / len(texts) >= th.char_run_frac or mean_rate > th.repeat_ngram_max:
            out.append(_f(
                "failed", "repetition_collapse",
                f"[{e.tag}] degenerate repetition: {len(long)}/{len(texts)} outputs repeat one character >= "
                f"{th.char_run_max} times (longest {max(runs)}); {rate_txt}",
                [e.step] if e.step is not None else [], [max(runs), mean_rate, len(long) / len(texts)], tag=e.tag,
                metrics=["max_char_run", f"repeated_{th.ngram}gram_rate", "frac_long_runs"],
                examples=[t[:80] for t in long[:3]],
                explanation="The policy found a degenerate high-likelihood string ('4444...'): typical after a PPO "
                            "ratio explosion or a reward that can be maximized without reasoning.",
                recommendation="Check ppo/* and the reward; restore the last checkpoint before the collapse; log "
                               "rollout/max_char_run and rollout/repeat_ngram_rate every step (watch.rollout_stats)."))
    s, v = rf.series("rollout/max_char_run")
    if v and not out:
        rs, rv = _recent(s, v, th.recent_frac)
        if sum(x >= th.char_run_max for x in rv) > len(rv) / 2:
            out.append(_f("warning", "repetition_collapse", f"rollouts repeat one character {rv[-1]:.0f} times",
                          rs[-10:], rv[-10:], explanation="Training samples have degenerate runs.",
                          recommendation="Inspect rollouts; check ppo/* metrics."))
    return out


# ---------------------------------------------------------------------------------------------------------- weights


def detect_weights(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """Frozen parameters whose sha256 changed between checkpoints; trainable ones that never changed.

    One checkpoint per step (step_<N> preferred over a `best` of the same step: they hold the same weights). A
    parameter counts as frozen between two consecutive checkpoints only when both saved it as frozen, so a curriculum
    that freezes or unfreezes a module is judged only on the intervals where it was frozen."""
    by_step: dict[int, object] = {}
    for c in rf.checkpoints:
        if c.checksums and (c.step not in by_step or by_step[c.step].name == "best"):
            by_step[c.step] = c
    cks = [by_step[s] for s in sorted(by_step)]
    if len(cks) < 2:
        return []
    out = []
    frozen: set[str] = set()
    moved: dict[str, tuple] = {}  # name -> (checkpoint before, checkpoint after) of the first change
    for a, b in zip(cks, cks[1:]):
        if a.trainable is None or b.trainable is None:
            continue
        for n in set(a.checksums) & set(b.checksums):
            if n not in a.trainable and n not in b.trainable:
                frozen.add(n)
                if a.checksums[n] != b.checksums[n]:
                    moved.setdefault(n, (a, b))
    if moved:
        names = sorted(moved, key=lambda n: (moved[n][0].step, n))
        a, b = moved[names[0]]
        out.append(_f("failed", "frozen_weights_changed",
                      f"{len(moved)}/{len(frozen)} frozen parameters changed, first between {a.name} (step {a.step}) "
                      f"and {b.name} (step {b.step}): {names[0]}", sorted({moved[n][1].step for n in names}), [],
                      params=names[:20],
                      explanation="Parameters the run saved as frozen differ bit-for-bit between checkpoints: "
                                  "something updates them: an optimizer that still holds them (zero_grad(set_to_none="
                                  "False) leaves zero gradients that Adam momentum and weight decay keep applying), "
                                  "an optimizer built before freezing, or a tensor shared with a trainable module.",
                      recommendation="Build the optimizer from params with requires_grad only, after freezing (or "
                                     "rebuild it when the curriculum freezes a module); use zero_grad(set_to_none="
                                     "True); check tied weights; confirm with `reasonlab verify-frozen`."))
    first, last = cks[0], cks[-1]
    names = sorted(set(first.checksums) & set(last.checksums))
    changed = {n for n in names if first.checksums[n] != last.checksums[n]}
    if last.trainable is not None:
        train_names = [n for n in names if n in last.trainable]
    else:  # params="all" without state["frozen"]: which ones should move is unknown; only "none moved" is certain
        train_names = names if not changed else []
    still = [n for n in train_names if n not in changed]
    if still:
        sev = "failed" if len(still) == len(train_names) else "warning"
        gnorm = [g for g in rf.series("train/grad_norm")[1] if finite(g)]
        tied = [z for z in rf.series("rollout/frac_zero_std")[1] if finite(z)]
        if gnorm and max(gnorm) == 0.0 and tied and min(tied) >= 1.0:  # the loss had no signal: no plumbing bug
            why = ("Every logged gradient norm is 0 because every group's rewards tied at every step "
                   "(rollout/frac_zero_std = 1.0): group-normalized advantages are all 0 and a KL at its reference "
                   "is 0, so the optimizer never moved anything. The run trained nothing.")
            do = ("Use a model/task pair on which some samples succeed (easier prompts, a warmer start, more "
                  "samples per prompt) or a denser reward; this is not a gradient-plumbing bug.")
        else:
            why = ("These parameters receive no update: no gradient reaches them (computed under no_grad, detached, "
                   "an unused module) or they are missing from the optimizer.")
            do = ("Check grad/module/* norms and the optimizer's param groups; run the gradient audit "
                  "(rl.audit.audit_terms) for each loss term.")
        out.append(_f(sev, "trainable_unchanged",
                      f"{len(still)}/{len(train_names)} trainable parameters never changed between {first.name} "
                      f"(step {first.step}) and {last.name} (step {last.step}): {', '.join(still[:3])}",
                      [first.step, last.step], [], params=still[:20], explanation=why, recommendation=do))
    return out


DETECTORS: list[Callable[[RunFolder, Thresholds], list[Finding]]] = [
    detect_run_end, detect_compute, detect_nonfinite, detect_zero_grad_terms, detect_ppo_ratio, detect_reward_signal,
    detect_encoder_collapse, detect_output_collapse, detect_repetition, detect_weights, detect_generalization_gap,
    detect_no_improvement, detect_leakage, detect_eval_power, detect_ceiling, detect_eval_schedule, detect_controls,
    detect_copy_task, detect_checkpoint_selection,
]


def set_threshold(th: Thresholds, name: str, value) -> None:
    """th.<name> = value (parsed to the field's type); a bad name or value is a one-line UserError."""
    import difflib

    from reasonlab.errors import UserError

    names = [f.name for f in fields(Thresholds)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise UserError(f"unknown threshold '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                        + f"; thresholds: {', '.join(names)}")
    kind = type(getattr(th, name))
    try:
        setattr(th, name, kind(float(value)) if kind is int else kind(value))
    except (TypeError, ValueError):
        raise UserError(f"threshold {name}={value!r} is not a {kind.__name__}") from None


def thresholds_from_config(cfg: dict) -> Thresholds:
    """The thresholds the run itself used: defaults, overridden by the `watch:` section of its config.yaml (the same
    reasonlab.watch.Thresholds its online watcher read; other keys of that section ignored); `reasonlab report
    --set NAME=VALUE` overrides on top."""
    th = Thresholds()
    over = cfg.get("watch") if isinstance(cfg, dict) else None
    for k, v in over.items() if isinstance(over, dict) else []:
        if k in {f.name for f in fields(Thresholds)} and v is not None:
            set_threshold(th, k, v)
    return th


def run_detectors(run_dir: str | Path | RunFolder, th: Thresholds | None = None) -> list[Finding]:
    rf = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    th = th or thresholds_from_config(rf.config)
    found: list[Finding] = []
    for det in DETECTORS:
        try:
            found.extend(det(rf, th))
        except Exception as e:  # a detector bug must not hide the other findings
            found.append(Finding("info", "detector_error", f"{det.__name__} could not run: {type(e).__name__}: {e}"))
    return sorted(found, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))


def overall_status(findings: list[Finding]) -> tuple[str, str]:
    """('healthy' | 'warning' | 'failed', one-line reason)."""
    for sev, word in (("failed", "failed"), ("warning", "warning")):
        hits = [f for f in findings if f.severity == sev]
        if hits:
            more = f" (+{len(hits) - 1} more)" if len(hits) > 1 else ""
            return word, hits[0].title + more
    infos = sum(f.severity == "info" for f in findings)
    return "healthy", f"no failure or warning ({infos} info)" if infos else "no detector fired"
