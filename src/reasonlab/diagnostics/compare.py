"""Compare run folders: results side by side, the config settings that differ, paired-bootstrap p-values on the eval
items the runs share, and overlaid curves.

    reasonlab compare runs/A runs/B [runs/C ...] [--out DIR]

The first run is the baseline; every other run is compared with it, split by split (val, test), on the final eval of
that split (`final: true`, else the latest step), over the example ids both evals contain. The paired bootstrap
resamples those ids, so per-question difficulty cancels (eval.metrics.paired_bootstrap; diff = run - baseline).
When both evals hold several samples per question (polychromic, pass@k evals), the per-question set metrics are
paired too: pass@1 (fraction correct), unbiased pass@k (k = the smaller sample count), Distinct-2 and Self-BLEU of
the question's samples.
Writes DIR/compare.md and DIR/plots/*.png; DIR defaults to a `compare-...` folder next to the first run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from reasonlab.diagnostics.detectors import overall_status, run_detectors
from reasonlab.diagnostics.report import _clip, flatten, fmt_metric, resumes, run_state
from reasonlab.diagnostics.runfolder import HELD_OUT, EvalFile, RunFolder, open_run_folder
from reasonlab.errors import UserError


@dataclass
class PairRow:
    split: str
    run: str  # the compared run's label (the baseline is Comparison.labels[0])
    base_tag: str | None
    run_tag: str | None
    diff: object | None = None  # eval.metrics.PairedDiff (run - baseline) when there are shared ids
    note: str = ""
    metric: str = "accuracy"


@dataclass
class Comparison:
    labels: list[str]
    result_rows: list[list[str]] = field(default_factory=list)
    config_rows: list[list[str]] = field(default_factory=list)
    pairs: list[PairRow] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    path: Path | None = None  # compare.md


def final_eval(rf: RunFolder, split: str) -> EvalFile | None:
    evs = [e for e in rf.evals_for(split) if e.primary is not None]
    if not evs:
        return None
    finals = [e for e in evs if e.final]
    return (finals or evs)[-1]


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in dirs]  # same folder name under different parents


def _default_out(dirs: list[Path], labels: list[str]) -> Path:
    stem = "compare-" + "-vs-".join(d.name for d in dirs)
    if len(stem) > 100:
        stem = stem[:80] + "-" + hashlib.sha256(stem.encode()).hexdigest()[:8]
    return dirs[0].parent / stem


def per_question_set_metrics(e: EvalFile, k: int) -> dict[str, dict[str, float]]:
    """{metric: {question id: value}} over each question's samples (needs >= 2 samples per question)."""
    from reasonlab.eval import diversity as D
    from reasonlab.eval.metrics import pass_at_k

    groups: dict[str, list[dict]] = {}
    for r in e.records:
        if "id" in r and "correct" in r:
            groups.setdefault(str(r["id"]), []).append(r)
    from reasonlab.eval.harness import set_coverage

    out: dict[str, dict[str, float]] = {"pass@1": {}, f"pass@{k}": {}, "distinct_2": {}, "self_bleu": {}}
    for qid, g in groups.items():
        n, c = len(g), sum(bool(r["correct"]) for r in g)
        texts = [str(r.get("output", "")) for r in g]
        out["pass@1"][qid] = c / n
        out[f"pass@{k}"][qid] = pass_at_k(n, c, k)
        for name, (v,) in set_coverage([g], k).items():  # distinct_correct@k, and coverage@k where solutions count
            out.setdefault(f"{name}@{k}", {})[qid] = v
        for name, v in (("distinct_2", D.distinct_n(texts, 2)), ("self_bleu", D.self_bleu(texts))):
            if v is not None:  # None: no n-grams to count (e.g. every sample empty)
                out[name][qid] = v
    return out


def set_metric_pairs(a: EvalFile, b: EvalFile) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Per-question set metrics of two evals when both have >= 2 samples for every question; else {}."""
    def min_samples(e: EvalFile) -> int:
        counts: dict[str, int] = {}
        for r in e.records:
            if "id" in r:
                counts[str(r["id"])] = counts.get(str(r["id"]), 0) + 1
        return min(counts.values()) if counts else 0

    k = min(min_samples(a), min_samples(b))
    if k < 2:
        return {}
    ma, mb = per_question_set_metrics(a, k), per_question_set_metrics(b, k)
    return {m: (ma[m], mb[m]) for m in ma}


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, n_boot: int = 10_000,
                 seed: int = 0) -> Comparison:
    from reasonlab.diagnostics.plots import overlay_accuracy, overlay_metric
    from reasonlab.eval.metrics import paired_bootstrap

    if len(run_dirs) < 2:
        raise UserError("compare needs at least two run folders, e.g. reasonlab compare runs/A runs/B")
    rfs = [open_run_folder(d) for d in run_dirs]
    labels = _labels([rf.dir for rf in rfs])
    cmp = Comparison(labels)

    # results: status, how it ended, final val/test with n and CI
    for label, rf in zip(labels, rfs):
        status, reason = overall_status(run_detectors(rf))
        cells = [label, _clip(f"{status}: {reason}", 90) if status != "healthy" else status, run_state(rf),
                 _clip(resumes(rf), 90), str(rf.last_step)]
        for split in HELD_OUT:
            e = final_eval(rf, split)
            cells.append(f"{fmt_metric(e.primary[1])} ({e.tag})" if e else "-")
        cmp.result_rows.append(cells)

    # config settings that differ
    flat = [flatten(rf.config) for rf in rfs]
    keys = sorted(set().union(*flat))
    for k in keys:
        vals = [f.get(k, "(absent)") for f in flat]
        if any(v != vals[0] for v in vals[1:]):
            cmp.config_rows.append([k, *[str(v) for v in vals]])

    # paired bootstrap against the baseline on the final eval of each split
    for split in HELD_OUT:
        base = final_eval(rfs[0], split)
        for label, rf in zip(labels[1:], rfs[1:]):
            other = final_eval(rf, split)
            row = PairRow(split, label, base.tag if base else None, other.tag if other else None)
            if base is None or other is None:
                row.note = f"no {split} eval in {'the baseline' if base is None else label}"
            else:
                a, b = base.per_id_correct(), other.per_id_correct()
                if not a or not b:
                    row.note = "no per-example records (evals/<tag>.jsonl) to pair"
                elif not set(a) & set(b):
                    row.note = "no shared example ids: different tasks or splits"
                else:
                    row.diff = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
            cmp.pairs.append(row)
            if row.diff is not None:
                for metric, (ma, mb) in set_metric_pairs(base, other).items():
                    cmp.pairs.append(PairRow(split, label, base.tag, other.tag,
                                             paired_bootstrap(ma, mb, n_boot=n_boot, seed=seed), metric=metric))

    out_dir = Path(out) if out is not None else _default_out([rf.dir for rf in rfs], labels)
    pairs = list(zip(labels, rfs))
    plots = {"loss": overlay_metric(pairs, "train/loss", out_dir / "plots" / "loss.png", "training loss"),
             "accuracy": overlay_accuracy(pairs, out_dir / "plots" / "accuracy.png"),
             "reward": overlay_metric(pairs, "rollout/reward_mean", out_dir / "plots" / "reward.png", "reward")}
    cmp.plots = {k: v for k, v in plots.items() if v is not None}
    out_dir.mkdir(parents=True, exist_ok=True)
    cmp.path = out_dir / "compare.md"
    cmp.path.write_text(to_markdown(cmp, out_dir))
    return cmp


# ------------------------------------------------------------------------------------------------------ rendering


def _pair_cells(c: Comparison, r: PairRow) -> list[str]:
    d = r.diff
    if d is None:
        return [r.split, r.metric, c.labels[0], r.run, "-", "-", "-", "-", "-", r.note]
    only = f"{d.n_only_a}/{d.n_only_b}" if d.n_only_a or d.n_only_b else "0/0"
    return [r.split, r.metric, f"{c.labels[0]} ({r.base_tag})", f"{r.run} ({r.run_tag})", f"{d.mean_a:.3f}",
            f"{d.mean_b:.3f}",
            f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]", f"{d.p_value:.4f}", str(d.n), only]


PAIR_HEAD = ["split", "metric", "baseline", "run", "baseline value", "run value", "diff [95% CI]", "p", "n shared",
             "only in baseline/run"]


def to_markdown(c: Comparison, out_dir: Path) -> str:
    from reasonlab.diagnostics.report import _table

    parts = [f"# Comparison of {len(c.labels)} runs\n", f"Baseline: **{c.labels[0]}**.\n", "## Results\n",
             _table(["run", "status", "ended", "resumed", "last step", "val (final)", "test (final)"], c.result_rows),
             "\n## Paired bootstrap on shared eval items (diff = run - baseline)\n",
             _table(PAIR_HEAD, [_pair_cells(c, r) for r in c.pairs]),
             "\n## Config differences\n"]
    parts.append(_table(["setting", *c.labels], c.config_rows) if c.config_rows else "The configs are identical.\n")
    if c.plots:
        parts.append("\n## Curves\n")
        parts += [f"![{k}]({p.relative_to(out_dir).as_posix()})\n" for k, p in c.plots.items()]
    return "\n".join(parts)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    rows = [[str(x) for x in r] for r in rows]
    w = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(str(x).ljust(w[i]) for i, x in enumerate(cells)).rstrip()  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * x for x in w), *(line(r) for r in rows)])


def to_text(c: Comparison) -> str:
    parts = ["results:", text_table(["run", "status", "ended", "resumed", "last step", "val (final)", "test (final)"],
                                    c.result_rows),
             "\npaired bootstrap on shared eval items (diff = run - baseline, baseline = first run):",
             text_table(PAIR_HEAD, [_pair_cells(c, r) for r in c.pairs]), "\nconfig differences:"]
    parts.append(text_table(["setting", *c.labels], c.config_rows) if c.config_rows else "  (none)")
    return "\n".join(parts)
