"""The detectors that read a run's evaluation records and its end (evals/, the run record): generalization gap, no
improvement, leakage, power, ceiling, schedule, run end, compute, controls, copy tasks, checkpoint selection. Registered in reasonlab.diagnostics.detectors.DETECTORS
(which re-exports them); the metric and file conventions are in that module's docstring and runfolder.py."""

from __future__ import annotations

import json
import re
from collections import Counter

from reasonlab.diagnostics.findings import Finding, _f
from reasonlab.diagnostics.runfolder import HELD_OUT, EvalFile, RunFolder, finite
from reasonlab.watch import Thresholds

def _acc(e: EvalFile) -> float | None:
    p = e.primary
    return float(p[1]["value"]) if p else None


def _gold_base_rate(e: EvalFile) -> float:
    """Accuracy of always giving the most common gold answer of this eval (0 when the records hold no golds)."""
    gold = {str(r["id"]): str(r["gold"]) for r in e.records if "id" in r and r.get("gold") is not None}
    return Counter(gold.values()).most_common(1)[0][1] / len(gold) if gold else 0.0


# training-set accuracy, most comparable to an exact-match held-out score first (TRM logs token accuracy as
# train/accuracy and sequence accuracy as train/exact_accuracy)
TRAIN_ACC_KEYS = ("train/exact_accuracy", "train/acc", "train/accuracy")


def detect_generalization_gap(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """Train accuracy high while held-out accuracy is ~0, or no better than always answering the most common gold."""
    train_val, train_src, train_step = None, None, None
    for key in TRAIN_ACC_KEYS:
        s, v = rf.series(key)
        if v and finite(v[-1]):
            train_val, train_src, train_step = v[-1], key, s[-1]
            break
    tr = [e for e in rf.evals_for("train") if _acc(e) is not None]
    if tr:  # an eval of training examples with the held-out protocol is the fairest comparison
        train_val, train_src, train_step = _acc(tr[-1]), f"evals/{tr[-1].tag}", tr[-1].step
    if train_val is None or train_val < th.gap_train_min:
        return []
    out = []
    for split in HELD_OUT:
        ev = [e for e in rf.evals_for(split) if _acc(e) is not None]
        if not ev:
            continue
        e = ev[-1]
        a, m = _acc(e), e.primary[1]
        if e.record_accuracy() is not None:  # judge the model, not a summary with a wrong denominator
            a, m = e.record_accuracy(), {**m, "n": len(e.per_id_correct())}
            m = {**m, "lo": None} if abs(a - _acc(e)) > th.subset_tol else m
        base = _gold_base_rate(e)
        if a <= max(th.gap_heldout_max, base) and train_val - a >= th.gap_train_min:
            ci = f" [{m['lo']:.3f}, {m['hi']:.3f}]" if m.get("lo") is not None else ""
            out.append(_f(
                "failed", "generalization_gap",
                f"train accuracy {train_val:.3f} ({train_src}) but {split} accuracy {a:.3f}{ci} (n={m.get('n')}, "
                f"{e.tag}); always answering the most common gold scores {base:.3f}",
                [train_step, e.step], [train_val, a], split=split, base_rate=base,
                explanation="The model fits its training data and does nothing on held-out data: it memorized "
                            "per-example features (e.g. puzzle ids, the training demonstrations) instead of the rule. "
                            "Healthy-looking gradients, loss and encoder variance do not rule this out.",
                recommendation="Evaluate held-out data during training (eval.every) to see when it diverges; test "
                               "whether the model uses its conditioning at all (shuffled/zero controls); reduce "
                               "capacity for memorization (augmentation, fewer steps, held-out demos)."))
    return out


def detect_no_improvement(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """The held-out score at the end is not measurably better than at the first eval of the same split: paired
    bootstrap over shared ids (else non-overlapping Wilson intervals) must show an increase."""
    from reasonlab.eval.metrics import paired_bootstrap

    out = []
    for split in HELD_OUT:
        evs = [e for e in rf.evals_for(split) if e.primary is not None and e.step is not None]
        if len(evs) < 2:
            continue  # one eval (a test split evaluated once): nothing to compare
        first = evs[0]
        last = ([e for e in evs if e.final] or evs)[-1]
        if last is first or last.step <= first.step:
            continue
        (name, ma), (_, mb) = first.primary, last.primary
        a, b = first.per_id_correct(), last.per_id_correct()
        if len(set(a) & set(b)) >= th.min_outputs:
            d = paired_bootstrap(a, b, n_boot=2000, seed=0)  # last - first over shared ids
            improved = d.lo > 0
            detail = (f"{d.mean_a:.3f} -> {d.mean_b:.3f}, diff {d.diff:+.3f} (95% CI [{d.lo:+.3f}, {d.hi:+.3f}], "
                      f"paired over n={d.n})")
        elif ma.get("hi") is not None and mb.get("lo") is not None:
            improved = mb["lo"] > ma["hi"]
            detail = (f"{ma['value']:.3f} [{ma['lo']:.3f}, {ma['hi']:.3f}] n={ma.get('n')} -> {mb['value']:.3f} "
                      f"[{mb['lo']:.3f}, {mb['hi']:.3f}] n={mb.get('n')}")
        else:
            continue
        if not improved:
            out.append(_f(
                "warning", "no_improvement",
                f"[{split}] {name} not measurably better at the end than at the start: {first.tag} (step "
                f"{first.step}) -> {last.tag} (step {last.step}): {detail}", [first.step, last.step],
                [float(ma["value"]), float(mb["value"])], split=split,
                explanation="Whatever training did, it did not move the held-out score beyond the noise of this "
                            "eval: the run has not (yet) learned anything measurable.",
                recommendation="Check that the loss falls (plots/loss.png) and that every loss term sends gradient "
                               "(plots/grad_terms.png); train longer or raise the learning rate; if the eval is "
                               "small, evaluate more items before concluding."))
    return out


DEMO_ID = re.compile(r"^(?P<task>.+)/demo\d+$")


def _record_tasks(e: EvalFile) -> dict[str, str]:
    """{record id: its task}: the record's "task" field, else the id's "<task>/" prefix."""
    return {str(r["id"]): str(r["task"]) if "task" in r else str(r["id"]).rsplit("/", 1)[0]
            for r in e.records if "id" in r}


def detect_leakage(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """Held-out data in training, judged by id, by task and by content: held-out ids among the training ids; held-out
    tasks whose demonstrations were trained on ("<task>/demo<j>" ids never equal the eval's "<task>/<j>"); and the
    task's own content check recorded in the eval summary ("leakage": shared ids or input/output pairs)."""
    out = []
    ids = rf.train_ids or set()
    demo_tasks = {m.group("task") for i in ids if (m := DEMO_ID.match(i))}
    for e in rf.evals:
        if e.split not in HELD_OUT or not e.own:
            continue
        step = [e.step] if e.step is not None else []
        leaked = sorted(e.ids() & ids)
        if leaked:
            out.append(_f("failed", "eval_leakage",
                          f"[{e.tag}] {len(leaked)}/{len(e.ids())} {e.split} examples are in the training data",
                          step, [len(leaked) / max(1, len(e.ids()))], ids=leaked[:20], by="id",
                          explanation="Held-out ids appear in data/train_ids: the score measures memorization.",
                          recommendation="Split by a stable hash of the example id/content and drop overlaps before "
                                         "training; for ARC, keep evaluation tasks' demonstrations out of training."))
        tasks = set(_record_tasks(e).values())
        shared = sorted(tasks & demo_tasks)
        if shared:
            declared = str(e.summary.get("split_mode", "")).lower() == "transductive"
            what = (f"[{e.tag}] the demonstrations of {len(shared)}/{len(tasks)} {e.split} tasks were trained on "
                    f"(train ids '<task>/demo<j>', e.g. '{shared[0]}/demo0')")
            if declared:
                out.append(_f("info", "transductive_eval", what + "; the eval says so (split_mode transductive)",
                              step, [len(shared) / len(tasks)], tasks=shared[:20], by="task",
                              explanation="TRM's protocol: the evaluation tasks' demonstrations are training data and "
                                          "only their test inputs are held out. The score measures fitting tasks "
                                          "whose examples were seen, not generalization to unseen tasks.",
                              recommendation="Report it as transductive; for a claim about new tasks, evaluate a "
                                             "split whose demonstrations never enter training (split_mode heldout)."))
            else:
                out.append(_f("failed", "eval_leakage", what, step, [len(shared) / len(tasks)], tasks=shared[:20],
                              by="task",
                              explanation="The model was trained on these held-out tasks' demonstrations, so it has "
                                          "seen the very rules it is tested on; no example id matches, which is why "
                                          "an id check misses it (seed 004: TRM's evaluation demos are in training).",
                              recommendation="Keep evaluation tasks' demonstrations out of training, or declare the "
                                             "eval transductive (summary split_mode) and do not call it held-out."))
        lk = e.summary.get("leakage")
        rep = lk.get(str(e.summary.get("split", e.split))) if isinstance(lk, dict) else None
        if isinstance(rep, dict):
            n_bad = sum(int(rep.get(k) or 0) for k in ("id_overlap", "pair_overlap", "problems")
                        if isinstance(rep.get(k), (int, float)))
            if n_bad:
                out.append(_f("failed", "eval_leakage",
                              f"[{e.tag}] the task's content check found {n_bad} held-out item(s) in training: "
                              + ", ".join(f"{k} {rep[k]}" for k in ("id_overlap", "pair_overlap", "problems")
                                          if rep.get(k)), step, [n_bad], report=rep, by="content",
                              explanation="Held-out inputs/outputs (or ids) also occur in the training data: the "
                                          "score measures recall of seen items.",
                              recommendation="Drop the overlapping items from training (tasks' leakage() names them)."))
    return out


def detect_eval_power(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """The reported (latest) held-out eval of each split has too few units or too wide a CI, judged on the units its
    records hold (not on a summary n that may count the whole split); and any eval whose headline score is not
    computed over the units it evaluated (a subset divided by the full split size: TRM's evaluator, seed 004)."""
    out = []
    latest: dict[str, EvalFile] = {}
    for e in rf.evals:
        if e.primary is not None and e.split in HELD_OUT and e.own:
            latest[e.split] = e
    for e in latest.values():
        name, m = e.primary
        rec = e.recomputed(name)
        if rec is not None and (rec["n"] != (m.get("n") or 0) or abs(rec["value"] - float(m["value"])) > th.subset_tol):
            m = rec  # the summary misstates its data (subset_denominator below says so): judge what was evaluated
        n, lo, hi, val = m.get("n") or 0, m.get("lo"), m.get("hi"), float(m["value"])
        half = (hi - lo) / 2 if lo is not None and hi is not None else None
        if n < th.min_eval_n or (half is not None and half > th.ci_halfwidth_max):
            half_txt = f"+-{100 * half:.1f} pts" if half is not None else "no CI"
            out.append(_f("warning", "underpowered_eval",
                          f"[{e.tag}] {name} {val:.3f} on n={n} ({half_txt}): too few examples to tell runs apart",
                          [e.step] if e.step is not None else [], [val], n=n, ci=[lo, hi],
                          explanation=f"A 95% interval of {half_txt} hides any effect smaller than that; peak-vs-final "
                                      "and run-vs-run differences inside it are noise.",
                          recommendation=f"Evaluate on more items (>= {th.min_eval_n}; ~400 for +-5 pts near 50%) "
                                         "and compare runs with paired bootstrap (`reasonlab compare`)."))
    for e in rf.evals:
        p = e.primary
        if p is None or not e.own:
            continue
        name, m = p
        rec = e.recomputed(name)
        if rec is None:
            continue
        n, val = m.get("n") or 0, float(m["value"])
        if abs(rec["value"] - val) > th.subset_tol or (n and n != rec["n"]):
            unit = "tasks" if any("task" in r for r in e.records) else "examples"
            out.append(_f("failed", "subset_denominator",
                          f"[{e.tag}] summary {name} {val:.4f} (n={n}) but its {rec['n']} evaluated {unit} score "
                          f"{rec['value']:.4f}", [e.step] if e.step is not None else [], [val, rec["value"]],
                          n_summary=n, n_records=rec["n"], metric=name,
                          explanation="The reported score is not computed over the evaluated items: a subset divided "
                                      "by the full split size (reads low; TRM's evaluator on a task subset), or "
                                      "records missing from the file.",
                          recommendation="Divide by the number of evaluated units and report that n with the "
                                         "score (eval.metrics and grids.pass_at_k do both)."))
    return out


def _evals_by_split(rf: RunFolder) -> dict[str, list[EvalFile]]:
    """Non-control held-out evals with a headline metric, per split, in step order."""
    out: dict[str, list[EvalFile]] = {}
    for e in rf.evals:
        if e.split in HELD_OUT and e.own and e.primary is not None:
            out.setdefault(e.split, []).append(e)
    return out


def detect_ceiling(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """A score at its ceiling cannot show a gain: pass@k (k >= 2) of the latest eval of a split while its pass@1 still
    has room (seed 002: pass@1 0.70 but pass@10 0.998 for both models, a lenient checker over 10 samples), and any
    headline or pass@k score of an eval taken before training (step 0) when the run evaluates again later. A pass@1
    at the ceiling at the end is the task solved, not a defect of the eval."""
    out = []
    for split, evs in _evals_by_split(rf).items():
        judged: list[tuple[EvalFile, str, dict]] = []
        last = evs[-1]
        if float(last.primary[1]["value"]) < th.ceiling:  # a solved task is a result; pass@k saturated by sampling
            for k, m in _all_metrics(last).items():           # while pass@1 has room is the eval's defect
                if re.fullmatch(r"pass@(\d+)", k) and int(k[5:]) >= 2:
                    judged.append((last, k, m))
        first = evs[0]
        if first is not last and first.step == 0:
            name, m = first.primary
            judged.append((first, name, m))
            judged += [(first, k, m) for k, m in _all_metrics(first).items()
                       if re.fullmatch(r"pass@(\d+)", k) and int(k[5:]) >= 2]
        hits = [(e, k, m) for e, k, m in judged if finite(float(m["value"])) and float(m["value"]) >= th.ceiling]
        if not hits:
            continue
        e, k, m = hits[0]
        when = "before training" if e.step == 0 and e is not last else "at the end"
        out.append(_f("warning", "eval_at_ceiling",
                      f"[{e.tag}] {k} is {float(m['value']):.3f} {when} (n={m.get('n')}): at its ceiling, this eval "
                      "cannot show a gain", [x[0].step for x in hits if x[0].step is not None][:10],
                      [float(x[2]["value"]) for x in hits][:10], split=split, metrics=[f"{x[0].tag}:{x[1]}" for x in hits],
                      explanation="With every question already solved (by at least one of k samples, or by the "
                                  "untrained model) there is no room above the score: a method that helps and one "
                                  "that does not read the same. A lenient checker or too many samples make it so.",
                      recommendation="Use a harder split or a stricter checker, a smaller k, or report a metric with "
                                     "headroom (pass@1, diversity) for this comparison."))
    return out


def _all_metrics(e: EvalFile) -> dict[str, dict]:
    mets = {k: v for k, v in e.summary.items() if isinstance(v, dict) and "value" in v}
    mets.update({k: v for k, v in (e.summary.get("metrics") or {}).items() if isinstance(v, dict) and "value" in v})
    return {k: v for k, v in mets.items() if isinstance(v.get("value"), (int, float))}


def detect_eval_schedule(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """A long run with no held-out eval between its start and its end (seed 003: eval_frequency null, 8,000 batches,
    one final eval): nobody can tell whether it was ever good, or when it broke."""
    last = rf.last_step
    if last is None or last < th.periodic_eval_min_steps:
        return []
    mid = sorted({e.step for evs in _evals_by_split(rf).values() for e in evs
                  if e.step is not None and 0 < e.step < last})
    if mid:
        return []
    cfg_every = (rf.config.get("eval") or {}).get("every") if isinstance(rf.config.get("eval"), dict) else None
    every = f" (eval.every={cfg_every})" if cfg_every is not None else ""
    return [_f("warning", "no_periodic_eval",
               f"no held-out eval during {last} training steps{every}: only before and/or after training",
               [last], [], explanation="Without evaluations along the way the run cannot show whether it peaked "
                                       "earlier, when it went wrong, or which checkpoint to keep (seed 003).",
               recommendation="Set eval.every (e.g. every 5-10% of train.steps) so validation picks the checkpoint "
                              "and the report can draw the curve.")]


def detect_run_end(rf: RunFolder, th: Thresholds) -> list[Finding]:
    out = []
    summ = rf.summary
    last = rf.last_step
    if summ is None:
        out.append(_f("warning", "run_unfinished",
                      f"no summary.json: the run was killed (scheduler timeout, OOM) or is still running; last logged "
                      f"step {last}", [last] if last is not None else [], [],
                      explanation="A run that finished (even stopped early) writes summary.json.",
                      recommendation="Use --time-limit below the scheduler's limit so the run stops itself after the "
                                     "final eval and checkpoint; resume with `reasonlab run --resume RUN`."))
    elif summ.get("status") in ("failed", "interrupted"):
        out.append(_f("failed", "run_failed", f"run {summ['status']}: {summ.get('error', summ.get('stop_reason'))}",
                      [last] if last is not None else [], [], explanation="The recipe raised or was interrupted.",
                      recommendation="Read the error; resume from the last checkpoint once fixed."))
    held = [e for e in rf.evals if e.split in HELD_OUT and e.own]
    if last is not None:
        final = [e for e in held if e.final or (e.step is not None and e.step >= last)]
        if not final:
            last_eval = max((e.step for e in held if e.step is not None), default=None)
            when = f"last eval at step {last_eval}" if last_eval is not None else "no held-out eval at all"
            out.append(_f("warning", "no_final_eval",
                          f"no held-out eval of the final weights: training reached step {last}, {when}",
                          [last_eval, last] if last_eval is not None else [last], [],
                          explanation="The results in this folder describe an earlier model, not the one the run "
                                      "ended with (seed 001's job timed out before its final eval).",
                          recommendation="Run the final eval on the last checkpoint (`reasonlab eval`), and give "
                                         "runs a --time-limit so they reserve time for it."))
    return out


def detect_compute(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """A config sized for GPUs that ran without them (env.json "compute", written by reasonlab.training.setup)."""
    c = rf.env.get("compute") or {}
    if not c.get("warning"):
        return []
    return [_f("warning", "compute_mismatch", c["warning"], [], [],
               explanation=f"The run used {c.get('device')} in {c.get('precision')} with {c.get('world_size', 1)} "
                           "process(es); its config (train.gpus, train.gpu_memory_gb) says what it was sized for, and "
                           "its timings and any result say nothing about that scale.",
               recommendation="Run it where the GPUs are (`reasonlab run CONFIG --dry-run` prints what it would use), "
                              "or shrink it to a CPU config.")]


REFERENCE_CONTROLS = ("target_text", "text")  # references to report, not bars the method must clear


def control_diffs(rf: RunFolder, n_boot: int = 2000, references: bool = False) -> dict[str, list[tuple[str, object]]]:
    """{base tag: [(control name, PairedDiff of method minus control over shared ids)]} for every control eval whose
    base eval exists; the target-alone-on-text control is a reference, not a bar to clear: left out unless
    `references`."""
    from reasonlab.eval.metrics import paired_bootstrap

    by_tag = {e.tag: e for e in rf.evals}
    out: dict[str, list] = {}
    for c in rf.evals:
        if c.control is None or (c.control in REFERENCE_CONTROLS and not references):
            continue
        base = by_tag.get(c.base_tag)
        if base is None or not base.records or not c.records:
            continue
        a, b = base.per_id_correct(), c.per_id_correct()
        if set(a) & set(b):
            out.setdefault(base.tag, []).append((c.control, paired_bootstrap(b, a, n_boot=n_boot, seed=0)))
    return out


REQUIRED_CONTROLS = {"bridge": ("shuffled_source", "zero_source")}  # method -> controls every held-out eval needs


def detect_controls(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """Bridge: every held-out eval has its shuffled-source and zero-source controls (seed 001's own notes discarded
    wins those controls reproduced), and the latest one beats them on the same items (paired bootstrap)."""
    out = []
    by_tag = {e.tag: e for e in rf.evals}
    need = REQUIRED_CONTROLS.get(str(rf.config.get("method") or rf.env.get("method") or ""), ())
    if need:
        have: dict[str, set[str]] = {}
        for c in rf.evals:
            if c.control is not None:
                have.setdefault(c.base_tag, set()).add(c.control)
        bases = [e for evs in _evals_by_split(rf).values() for e in evs]
        lacking = [(e, [c for c in need if c not in have.get(e.tag, set())]) for e in bases]
        lacking = [(e, miss) for e, miss in lacking if miss]
        if lacking:
            none = not have
            out.append(_f("failed", "controls_missing",
                          ("no control evals at all" if none else f"{len(lacking)}/{len(bases)} held-out evals lack "
                           "controls") + f": {', '.join(need)} missing for {', '.join(e.tag for e, _ in lacking[:4])}"
                          + (" ..." if len(lacking) > 4 else ""),
                          [e.step for e, _ in lacking if e.step is not None][:20], [], missing={e.tag: m for e, m in
                                                                                             lacking[:20]},
                          explanation="A bridge score means nothing until it beats the same model with the source "
                                      "information shuffled or removed: without those evals nothing says whether "
                                      "the score comes from what the bridge transmits.",
                          recommendation="Evaluate every held-out split with the shuffled_source and zero_source "
                                         "controls on the same items (tags '<base>+control=<name>')."))
    diffs_by_tag = control_diffs(rf)
    # judge the latest eval of each split (the final one when there is one): before training a bridge cannot beat
    # its controls, and the step-0 eval exists precisely to show that
    def rank(e) -> tuple[bool, int]:
        return e.final, e.step if e.step is not None else -1

    latest: dict[str | None, str] = {}  # split -> tag of its latest eval
    for tag in diffs_by_tag:
        split = by_tag[tag].split
        if split not in latest or rank(by_tag[tag]) > rank(by_tag[latest[split]]):
            latest[split] = tag
    for tag, diffs in diffs_by_tag.items():
        if tag not in latest.values():
            continue
        bad = [(name, d) for name, d in diffs if d.lo <= 0]  # d = method - control
        if not bad:
            continue
        base = by_tag[tag]
        parts = [f"{name} {d.mean_a:.3f} (diff {d.diff:+.3f}, 95% CI [{d.lo:+.3f}, {d.hi:+.3f}], p={d.p_value:.3f})"
                 for name, d in bad]
        # a score the controls reproduce is a win to discard (seed 001); a bridge that scores nothing yet has no
        # score to attribute: not established, and no_improvement says it learned nothing
        reproduced = bad[0][1].mean_b > 0 and any(d.diff <= 0 for _, d in bad)
        nothing = bad[0][1].mean_b == 0
        out.append(_f("failed" if reproduced else "warning", "controls_failed",
                      f"[{tag}] {base.primary[0] if base.primary else 'accuracy'} {bad[0][1].mean_b:.3f} "
                      f"(n={bad[0][1].n}) is not above its controls: "
                      + "; ".join(parts), [base.step] if base.step is not None else [],
                      [bad[0][1].mean_b] + [d.mean_a for _, d in bad], controls=[name for name, _ in bad],
                      p_values=[d.p_value for _, d in bad],
                      explanation=("The model scores 0 like its controls: nothing the conditioning carries shows in "
                                   "the answers yet." if nothing else "The same score is reached when the source information is "
                                   "shuffled or removed, so the score does not come from what the bridge transmits."),
                      recommendation="Treat the result as not established; fix the bridge until it beats its "
                                     "controls by more than the CI."))
    return out


def detect_copy_task(rf: RunFolder, th: Thresholds) -> list[Finding]:
    """A bridge eval whose answers can be read off the question (its summary's copy_baseline, recorded by the bridge
    recipe): there the zero- and shuffled-source controls sit at 0 by construction, so beating them is no evidence
    that the source's state crossed the bridge."""
    out = []
    for e in rf.evals:
        m = e.metric("copy_baseline") if e.own else None
        if m is None or m["value"] < 0.5 or (e.split not in HELD_OUT):
            continue
        out.append(_f("warning", "copy_task",
                      f"[{e.tag}] the controls cannot fail here: the answer is in the question for "
                      f"{m['value']:.0%} of {m.get('n')} items", [e.step] if e.step is not None else [], [m["value"]],
                      explanation="When the answer occurs in the question, any bridge that copies the question's "
                                  "words scores and zero- or shuffled-source controls cannot: the result shows "
                                  "vocabulary translation, not transfer of what the source computed.",
                      recommendation="Report it as a vocabulary-translation check; measure transfer on a task whose "
                                     "answer is computed from the question (e.g. number-words)."))
        break  # one finding per run: every split of a task shares the property
    return out


def detect_checkpoint_selection(rf: RunFolder, th: Thresholds) -> list[Finding]:
    best = [c for c in rf.checkpoints if c.name == "best"]
    if not best:
        return []
    b = best[0]
    sel = str(b.state.get("selected_on", b.state.get("metric", "")))
    if "test" in sel.lower():
        return [_f("failed", "checkpoint_on_test", f"checkpoints/best was chosen on test data ({sel})", [b.step], [],
                   explanation="Picking the checkpoint with the best test score makes the test score an "
                               "optimistically biased maximum over checkpoints (seed 003 kept the best test accuracy).",
                   recommendation="Select on a validation split; report test once, for the selected checkpoint.")]
    tests = [e for e in rf.evals_for("test") if e.step is not None and _acc(e) is not None]
    vals = [e for e in rf.evals_for("val") if e.step is not None and _acc(e) is not None]
    if not sel and len(tests) >= 2 and not vals:
        best_step = max(tests, key=_acc).step
        if best_step == b.step:
            return [_f("warning", "checkpoint_on_test",
                       f"checkpoints/best (step {b.step}) is the test-score peak and the run has no validation evals",
                       [b.step], [_acc(e) for e in tests],
                       explanation="Only test data could have chosen this checkpoint.",
                       recommendation="Record state={'selected_on': 'val'} and evaluate a validation split.")]
    return []
