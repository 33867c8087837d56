"""report.md + plots/*.png for one run folder: what a researcher reads first.

    reasonlab report runs/<run_id>                       # CLI (re-render any time, e.g. while a run is going)
    reasonlab run CONFIG                                 # writes it when the run ends (--no-report to skip)
    from reasonlab.diagnostics.report import write_report
    write_report(run.dir)                                # outside the CLI: after run.finish(...)

`reasonlab run` writes the report itself, after run.finish() has written summary.json, so recipes need not call
write_report: called from inside a recipe (before finish) the report can only say "unfinished".

Sections: status (healthy / warning / failed with the one-line reason), run summary, results (peak -> final per
held-out split, every number with n and 95% CI; controls with paired-bootstrap differences), findings (evidence,
why, what to do), loss terms (share of the loss VALUE next to share of the GRADIENT), alerts raised while training,
sample outputs (correct / wrong / invalid), plots, config, and the command that reproduces the run. Also writes
findings.json (the same findings, machine-readable). Reads the run folder only.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from reasonlab.diagnostics.detectors import (SEVERITY_ORDER, Finding, control_diffs, overall_status, run_detectors,
                                             set_threshold, term_audits, thresholds_from_config)
from reasonlab.diagnostics.runfolder import HELD_OUT, EvalFile, RunFolder, finite, open_run_folder
from reasonlab.watch import Thresholds


@dataclass
class Report:
    path: Path  # report.md
    status: str  # healthy | warning | failed
    reason: str
    findings: list[Finding] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)


def write_report(run_dir: str | Path) -> Path:
    """Write <run>/report.md, <run>/plots/*.png and <run>/findings.json; return the report's path."""
    return make_report(run_dir).path


def make_report(run_dir: str | Path, overrides: dict[str, str] | None = None) -> Report:
    """Everything write_report does; `overrides` = {threshold name: value} on top of the run's config (CLI --set)."""
    from reasonlab.diagnostics.plots import run_plots

    rf = open_run_folder(run_dir)
    th = thresholds_from_config(rf.config)
    base = Thresholds()
    own = {f.name: getattr(th, f.name) for f in fields(Thresholds) if getattr(th, f.name) != getattr(base, f.name)}
    for k, v in (overrides or {}).items():
        set_threshold(th, k, v)
    found = run_detectors(rf, th)
    status, reason = overall_status(found)
    plots, plot_errors = run_plots(rf, rf.dir / "plots", th.ratio_explode)
    over = (f"Thresholds from the run's `watch:` section: {', '.join(f'{k}={v}' for k, v in own.items())}.\n"
            if own else "")
    over += (f"Thresholds overridden for this report: {', '.join(f'{k}={v}' for k, v in overrides.items())}.\n"
             if overrides else "")
    parts = [header(rf, status, reason, found), over, results_section(rf), findings_section(found), terms_section(rf, th),
             events_section(rf), samples_section(rf), plots_section(plots, rf.dir, plot_errors), config_section(rf),
             reproduce_section(rf)]
    path = rf.dir / "report.md"
    _atomic_write(path, "\n".join(p for p in parts if p))
    _atomic_write(rf.dir / "findings.json", json.dumps({"status": status, "reason": reason,
                                                        "findings": [f.to_dict() for f in found]}, indent=1,
                                                       default=str) + "\n")
    return Report(path, status, reason, found, plots)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------ formatting


def fmt_metric(m: dict | None, digits: int = 3) -> str:
    """'0.812 [0.775, 0.844] n=500'; a missing CI is said, not hidden."""
    if not m or m.get("value") is None:
        return "-"
    v = float(m["value"])
    if not finite(v):
        return f"{v} n={m.get('n')}"
    ci = f" [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]" if m.get("lo") is not None and m.get("hi") is not None \
        else " (no CI)"
    return f"{v:.{digits}f}{ci} n={m.get('n')}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _short(x):
    """Floats to 4 significant digits, inside lists too (evidence is for reading)."""
    if isinstance(x, float):
        return float(f"{x:.4g}") if finite(x) else x
    if isinstance(x, (list, tuple)):
        return [_short(v) for v in x]
    return x


def _clip(text, n: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------------- sections


def _compute(env: dict) -> str:
    """Device, precision and processes the run actually used (env.json "compute"; older runs: the device only)."""
    c = env.get("compute")
    if not c:
        return (env.get("device") or {}).get("device", "-")
    gpu = f" ({c['gpu']}, {c.get('gpu_memory_gb')} GB)" if c.get("gpu") else ""
    procs = f", {c['world_size']} processes ({c.get('distributed')}, {c.get('backend')})" if c.get("world_size", 1) > 1 \
        else ", 1 process"
    return f"{c.get('device')}{gpu}, {c.get('precision')}{procs}"


def run_state(rf: RunFolder) -> str:
    s = rf.summary
    if s is None:
        return f"unfinished: no summary.json (killed or still running), last logged step {rf.last_step}"
    extra = f" ({s.get('stop_reason')})" if s.get("stop_reason") else ""
    err = f": {s['error']}" if s.get("error") else ""
    ie = s.get("interrupted_eval")
    cut = (f"; {ie.get('what', 'an evaluation')} interrupted (no result; --resume redoes it)"
           if isinstance(ie, dict) else "")
    return f"{s.get('status')}{extra}{err}{cut}"


def resumes(rf: RunFolder) -> str:
    """How often and from where the run was resumed ("resumed" events), e.g. '2x: from step 2, from step 5 (redid
    the evaluations a signal interrupted)'; 'no' when never."""
    ev = [e for e in rf.events if e.get("kind") == "resumed"]
    if not ev:
        return "no"
    parts = []
    for e in ev:
        p = f"from step {e.get('from_step')}"
        if e.get("redo_evals") is not None:
            p += " (redid the evaluations a signal interrupted)"
        if e.get("skipped_checkpoints"):
            p += f" (skipped {', '.join(e['skipped_checkpoints'])}: did not verify)"
        parts.append(p)
    return f"{len(ev)}x: " + ", ".join(parts)


def header(rf: RunFolder, status: str, reason: str, found: list[Finding]) -> str:
    counts = {sev: sum(f.severity == sev for f in found) for sev in ("failed", "warning", "info")}
    env, cfg = rf.env, rf.config
    git = env.get("git") or {}
    elapsed = (rf.summary or {}).get("elapsed_s")
    rows = [["run folder", f"`{rf.dir}`"], ["method", cfg.get("method", env.get("method", "?"))],
            ["ended", run_state(rf)], ["resumed", resumes(rf)], ["last logged step", rf.last_step],
            ["elapsed", f"{elapsed:.0f} s" if isinstance(elapsed, (int, float)) else "-"],
            ["started", env.get("started", "-")], ["seed", cfg.get("seed", env.get("seed", "-"))],
            ["git", f"{git.get('sha') or '-'}{' (dirty working tree)' if git.get('dirty') else ''}"],
            ["compute", _compute(env)]]
    return (f"# Run report: {rf.dir.name}\n\n**Status: {status.upper()}** — {reason}\n\n"
            f"Findings: {counts['failed']} failed, {counts['warning']} warning, {counts['info']} info.\n\n"
            + _table(["", ""], rows))


def results_section(rf: RunFolder) -> str:
    """Peak -> final of the primary metric per (split, task), every value with n and 95% CI; then every metric of the
    final evals; then controls."""
    groups: dict[tuple, list[EvalFile]] = {}
    for e in rf.evals:
        if e.own and e.split in ("train", *HELD_OUT) and e.primary:
            groups.setdefault((e.split, str(e.summary.get("task", ""))), []).append(e)
    if not groups:
        return "## Results\n\nNo evaluations in evals/ (nothing to report).\n"
    order = {"val": 0, "test": 1, "train": 2}
    rows, finals, methods = [], [], set()
    for (split, task), evs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 3), kv[0][1])):
        named = [(e, *e.primary) for e in evs]  # primary repairs a missing/degenerate CI
        final = next((x for x in reversed(named) if x[0].final), named[-1])
        finals.append(final[0])
        peak = max(named, key=lambda x: float(x[2]["value"]) if finite(float(x[2]["value"])) else -math.inf)
        note = ""
        if split == "test" and len(named) > 1 and peak[0] is not final[0]:
            note = f"peak is a max over {len(named)} test evals: optimistic, do not report it; report the final"
        elif peak[0] is not final[0] and float(final[2]["value"]) != float(peak[2]["value"]):
            note = f"final is {float(final[2]['value']) - float(peak[2]['value']):+.3f} from the peak"
        rows.append([split, task or "-", final[1], f"{fmt_metric(peak[2])} @ step {peak[0].step} ({peak[0].tag})",
                     f"{fmt_metric(final[2])} @ step {final[0].step} ({final[0].tag})",
                     final[2].get("method") or "-", note])
        methods.add(str(final[2].get("method") or ""))
    out = ["## Results\n", "Primary metric per split, peak -> final (95% CI, n = units evaluated):\n",
           _table(["split", "task", "metric", "peak", "final", "CI method", "note"], rows)]
    for e in finals:
        mets = {**{k: v for k, v in e.summary.items() if isinstance(v, dict) and "value" in v},
                **(e.summary.get("metrics") or {})}
        mrows = [[k, fmt_metric(v, 4), str(v.get("method") or "") + _degenerate(v)] for k, v in mets.items()
                 if isinstance(v, dict)]
        methods.update(str(v.get("method") or "") for v in mets.values() if isinstance(v, dict))
        if len(mrows) > 1:
            out.append(f"\nAll metrics of `{e.tag}`:\n\n" + _table(["metric", "value [95% CI] n", "CI method"], mrows))
    out.append(ci_glossary(methods))
    diffs = control_diffs(rf, references=True)
    if diffs:
        crow = []
        for tag, ds in diffs.items():
            for name, d in ds:
                crow.append([tag, name, f"{d.mean_b:.3f}", f"{d.mean_a:.3f}",
                             f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]", f"{d.p_value:.4f}", d.n])
        out.append("\nControls (paired bootstrap over the same items; diff = method - control; target_text is a "
                   "reference, not a bar to clear):\n\n" +
                   _table(["eval", "control", "method", "control acc", "diff [95% CI]", "p", "n"], crow))
    return "\n".join(out)


def ci_glossary(methods: set[str]) -> str:
    """One line per interval method the tables above used (eval.metrics.CI_METHODS)."""
    from reasonlab.eval.metrics import CI_METHODS

    keys = sorted({m.split(" ")[0] for m in methods if m} & set(CI_METHODS))
    if not keys:
        return ""
    return "\nCI methods: " + "; ".join(f"`{k}` = {CI_METHODS[k]}" for k in keys) + ".\n"


def _degenerate(m: dict) -> str:
    lo, hi, n = m.get("lo"), m.get("hi"), m.get("n") or 0
    if lo is not None and lo == hi and n > 1:
        return " (degenerate interval: every outcome equal; a proportion's Wilson interval is wider)"
    return ""


def findings_section(found: list[Finding]) -> str:
    if not found:
        return "## Findings\n\nNo detector fired.\n"
    out = ["## Findings\n"]
    for f in sorted(found, key=lambda f: SEVERITY_ORDER.get(f.severity, 3)):
        ev = dict(f.evidence)
        steps, values = ev.pop("steps", []), ev.pop("values", [])
        lines = [f"### {f.severity.upper()} `{f.code}`: {f.title}\n"]
        if steps or values:
            lines.append(f"- evidence: steps {_clip(_short(steps), 200)}, values {_clip(_short(values), 300)}")
        for k, v in ev.items():
            lines.append(f"- {k}: {_clip(_short(v), 300)}")
        if f.explanation:
            lines.append(f"- why: {f.explanation}")
        if f.recommendation:
            lines.append(f"- do: {f.recommendation}")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def terms_section(rf: RunFolder, th: Thresholds) -> str:
    """Per loss term: its share of the loss value next to its share of the gradient (rl.audit metrics)."""
    terms = [k[len("grad/term/"):] for k in rf.keys_matching(r"^grad/term/")]
    if not terms:
        return ""
    rows = []
    audits = term_audits(rf, th)
    for t in terms:
        steps, norms = rf.series(f"grad/term/{t}")
        weights = rf.series(f"weight/term/{t}")[1]
        vs, gs = rf.series(f"share/loss/{t}")[1], rf.series(f"share/grad/{t}")[1]
        zero = sum(1 for g in norms if finite(g) and g == 0.0)
        states = Counter(a[1] for a in audits.get(t, []))
        verdict = ", ".join(f"{states[k]} {k.replace('inactive', 'not yet active')}"
                            for k in ("live", "dead", "inactive", "idle", "off") if states[k])
        rows.append([t, f"{weights[-1]:.3g}" if weights else "-", _pct(vs), _pct(gs),
                     f"{norms[-1]:.3g}" if norms else "-", f"{zero}/{len(norms)}", verdict or "-"])
    return ("## Loss terms: share of the loss value vs share of the gradient\n\n"
            "A term's share of the loss VALUE says nothing about how much it moves the parameters; the gradient "
            "share does (gradient audit, rl.audit). Means over audited steps:\n\n"
            + _table(["term", "weight", "value share", "gradient share", "last grad norm", "audits with grad = 0",
                      "audits judged (reasonlab.watch.term_states)"], rows))


def _pct(xs: list[float]) -> str:
    xs = [x for x in xs if finite(x)]
    return f"{100 * sum(xs) / len(xs):.1f}%" if xs else "-"


def events_section(rf: RunFolder) -> str:
    ev = rf.events
    if not ev:
        return ""
    rows = [[e.get("step"), e.get("kind"), e.get("severity"), _clip(e.get("message"), 160)] for e in ev[:40]]
    more = f"\n({len(ev) - 40} more in events.jsonl)\n" if len(ev) > 40 else ""
    return "## Alerts raised while training (events.jsonl)\n\n" + _table(["step", "kind", "severity", "message"],
                                                                          rows) + more


def samples_section(rf: RunFolder, per_kind: int = 2) -> str:
    """Correct, wrong and invalid outputs of the final held-out eval (test first)."""
    cands = [e for e in rf.evals if e.own and e.records and e.split in HELD_OUT]
    if not cands:
        return ""
    e = sorted(cands, key=lambda x: (x.final, x.split == "test", x.step if x.step is not None else -1))[-1]
    kinds = {"correct": [r for r in e.records if r.get("correct")],
             "wrong": [r for r in e.records if not r.get("correct") and r.get("valid", True)],
             "invalid (no answer extracted)": [r for r in e.records if r.get("valid") is False]}
    sudoku = e.summary.get("task") == "sudoku"
    out = [f"## Sample outputs (`evals/{e.tag}.jsonl`, {len(e.records)} records)\n"]
    if sudoku:
        out.append("Sudoku grids as digits, row by row (`.` = blank, `_` = padding), decoded from the TRM's tokens.\n")
    for kind, recs in kinds.items():
        out.append(f"**{kind}**: {len(recs)} of {len(e.records)}\n")
        for r in recs[:per_kind]:
            ext = ""
            if "extracted" in r:
                ext = " extracted `none`" if r["extracted"] is None else f" extracted `{_clip(r['extracted'], 60)}`"
            gold, output = r.get("gold"), r.get("output")
            if sudoku and _sudoku_rows(gold) is not None:
                gold = " / ".join(_sudoku_rows(gold))
                cands = output if isinstance(output, list) and output and isinstance(output[0], list) else [output]
                rows = _sudoku_rows(cands[0])
                if rows is not None:
                    more = f"\n(+{len(cands) - 1} lower-ranked candidates)" if len(cands) > 1 else ""
                    output = "\n".join(rows) + more
            out.append(f"- id `{r.get('id')}` gold `{_clip(gold, 120)}`{ext}\n\n"
                       f"```text\n{_clip(output, 400)}\n```\n")
    return "\n".join(out)


def _sudoku_rows(tokens) -> list[str] | None:
    """A sudoku answer in the TRM's tokens (reasonlab.tasks.sudoku: 0 PAD, 1 blank, d+1 = digit d, row-major) as
    rows of digits; None when `tokens` is not a square list of token ids."""
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        return None
    n = math.isqrt(len(tokens))
    if n * n != len(tokens):
        return None
    cell = {0: "_", 1: "."}
    return ["".join(cell.get(t, str(t - 1)) for t in tokens[i * n:(i + 1) * n]) for i in range(n)]


def plots_section(plots: dict[str, Path], root: Path, errors: dict[str, str] | None = None) -> str:
    failed = "".join(f"\nPlot `{k}` could not be drawn: {v}\n" for k, v in (errors or {}).items())
    if not plots:
        return "## Plots\n\nNothing logged that can be plotted.\n" + failed
    return "## Plots\n\n" + "\n".join(f"![{name}]({p.relative_to(root).as_posix()})\n"
                                       for name, p in plots.items()) + failed


def flatten(d, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_section(rf: RunFolder) -> str:
    flat = {k: v for k, v in flatten(rf.config).items() if not k.startswith("tracking.")}
    if not flat:
        return "## Config\n\nNo config.yaml.\n"
    key = [k for k in ("method", "seed", "model.name", "data.task", "train.steps", "train.lr", "train.batch_size")
           if k in flat]
    head = _table(["key", "value"], [[k, flat[k]] for k in key]) if key else ""
    full = "\n".join(f"{k}: {json.dumps(v, default=str)}" for k, v in flat.items())
    return (f"## Config\n\n{head}\n<details><summary>all {len(flat)} settings (config.yaml)</summary>\n\n"
            f"```yaml\n{full}\n```\n\n</details>\n")


def reproduce_section(rf: RunFolder) -> str:
    git = (rf.env.get("git") or {})
    lines = []
    if git.get("sha"):
        lines.append(f"git checkout {git['sha']}")
    lines.append(f"reasonlab run {shlex.quote(str(rf.dir / 'config.yaml'))} --out {shlex.quote(str(rf.dir.parent))}")
    note = ""
    if git.get("dirty"):
        note = ("\nThe working tree had uncommitted changes when this run started: the commit alone does not "
                "reproduce it.\n")
    cmd = rf.env.get("command")
    orig = f"\nOriginal command line: `{cmd}`\n" if cmd else ""
    return ("## Reproduce\n\nThe resolved config (every default filled in) re-runs this experiment:\n\n```bash\n"
            + "\n".join(lines) + "\n```\n" + note + orig)
