"""Compare polychromic runs with their grpo twins on the test eval each run wrote (checkpoint chosen on validation).

    python scripts/polychromic_compare.py --a runs/grpo-s0 runs/grpo-s1 runs/grpo-s2 \\
        --b runs/poly-s0 runs/poly-s1 runs/poly-s2 --k 8 --out docs/polychromic-compare.json

Runs are paired by their config seed (a twin = same config, same seed, one knob changed). Per test question (id) and
run: pass@1 (fraction of correct samples), unbiased pass@k (Chen et al. 2021), Distinct-1/2 and Self-BLEU (nltk
semantics, 3-gram, method1, whitespace tokens; reasonlab.eval.diversity) over that question's samples, distinct
correct answers among k (unbiased) and, for a task that enumerates its solutions (subset-sum), coverage@k = distinct
correct / solutions; optionally MiniLM semantic diversity. Reported, each with n and a 95% interval:
  - every run's mean (percentile bootstrap over questions);
  - per seed, b - a paired over the shared question ids (reasonlab.eval.metrics.paired_bootstrap, two-sided p);
  - pooled: each question's value averaged over the seeds of a mode, then b - a paired over questions. The unit of
    resampling is the question; seed-to-seed training variance enters only through the averages (3 seeds), so the
    per-seed rows are printed next to it.
Until `reasonlab compare` (diagnostics) lands, this is the comparison the polychromic README numbers come from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from reasonlab.eval import diversity as D
from reasonlab.eval import metrics as M
from reasonlab.eval.harness import group_by_example, read_records, set_coverage

METRICS = ("pass@1", "pass@k", "distinct_correct@k", "coverage@k", "distinct_1", "distinct_2", "self_bleu")


def test_file(run: Path) -> Path:
    files = sorted((run / "evals").glob("test_*.jsonl"))
    if len(files) != 1:
        sys.exit(f"error: {run} has {len(files)} test eval files (evals/test_*.jsonl); expected exactly one")
    return files[0]


def per_question(path: Path, k: int, semantic_encoder=None) -> dict[str, dict[str, float]]:
    """{question id: {metric: value}} from one evals/<tag>.jsonl."""
    groups = group_by_example(read_records(path))
    out: dict[str, dict[str, float]] = {}
    outs_all = []
    for qid, g in groups.items():
        n, c = len(g), sum(bool(r["correct"]) for r in g)
        if n < k:
            sys.exit(f"error: {path}: question {qid} has {n} samples; pass@{k} needs >= {k} (lower --k)")
        outs = [r["output"] for r in g]
        d1, d2 = D.distinct_n(outs, 1), D.distinct_n(outs, 2)
        out[qid] = {"pass@1": c / n, "pass@k": M.pass_at_k(n, c, k), "self_bleu": D.self_bleu(outs),
                    "distinct_1": d1, "distinct_2": d2,
                    **{f"{name}@k": v for name, (v,) in set_coverage([g], k).items()}}  # coverage: enumerable tasks
        outs_all.append((qid, outs))
    if semantic_encoder is not None:
        sem = D.semantic_diversity([o for _, o in outs_all], encoder=semantic_encoder)
        for (qid, _), v in zip(outs_all, sem["per_prompt"]):
            out[qid]["semantic"] = v
    return out


TRAIN_KEYS = ("rollout/correct", "set/answer_diversity", "rollout/unique_answer_ratio", "rollout/entropy",
              "adv/set_wrong_positive_frac", "rollout/frac_le1_correct", "rollout/distinct_correct")


def training_curves(run: Path, windows: int = 4) -> dict:
    """Training-time statistics from metrics.jsonl: window means of TRAIN_KEYS (over the logged steps), every gradient
    audit's per-term norm (how many audits saw grad/term/pg_set > 0), and the steps and training CPU seconds of the
    run (summary.json's train_cpu_s, else the sum of the logged time/step_cpu_s)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    steps = [r for r in rows if "time/step_cpu_s" in r]
    out: dict = {"steps": len(steps), "train_cpu_s": round(sum(r["time/step_cpu_s"] for r in steps), 1),
                 "train_wall_s": round(sum(r["time/step_s"] for r in steps), 1), "windows": {}}
    summary = run / "summary.json"  # the recipe's own total over every step (metrics.jsonl holds every log_every-th)
    if summary.exists():
        res = json.loads(summary.read_text()).get("results") or {}
        out["steps"] = res.get("final_step", out["steps"])
        out["train_cpu_s"] = res.get("train_cpu_s", out["train_cpu_s"])
    if steps:
        size = max(1, -(-len(steps) // windows))
        for i in range(0, len(steps), size):
            chunk = steps[i:i + size]
            out["windows"][f"{chunk[0]['step']}-{chunk[-1]['step']}"] = {
                k: round(float(np.mean([r[k] for r in chunk if k in r])), 4) for k in TRAIN_KEYS
                if any(k in r for r in chunk)}
    audits = [r for r in rows if "grad/total_norm_audit" in r]
    terms = sorted({k[len("grad/term/"):] for r in audits for k in r if k.startswith("grad/term/")})
    out["audits"] = {"n": len(audits), **{t: {"mean": float(np.mean([r[f"grad/term/{t}"] for r in audits])),
                                             "min": float(np.min([r[f"grad/term/{t}"] for r in audits])),
                                             "n_nonzero": int(sum(r[f"grad/term/{t}"] > 0 for r in audits))}
                                         for t in terms}}
    return out


def seed_of(run: Path) -> int:
    return int(yaml.safe_load((run / "config.yaml").read_text())["seed"])


def column(table: dict[str, dict[str, float]], metric: str) -> dict[str, float]:
    return {q: v[metric] for q, v in table.items() if v.get(metric) is not None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", nargs="+", type=Path, required=True, help="baseline run folders (grpo twins)")
    ap.add_argument("--b", nargs="+", type=Path, required=True, help="treatment run folders (polychromic)")
    ap.add_argument("--k", type=int, default=8, help="k of pass@k")
    ap.add_argument("--semantic", action="store_true", help="also MiniLM semantic diversity (loads a model)")
    ap.add_argument("--n-boot", type=int, default=10_000)
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = ap.parse_args(argv)

    enc = D.load_encoder() if args.semantic else None
    metrics = METRICS + (("semantic",) if args.semantic else ())
    runs = {"a": {seed_of(r): r for r in args.a}, "b": {seed_of(r): r for r in args.b}}
    seeds = sorted(set(runs["a"]) & set(runs["b"]))
    if not seeds:
        sys.exit("error: no seed appears in both --a and --b runs (runs are paired by config seed)")
    tables = {side: {s: per_question(test_file(runs[side][s]), args.k, enc) for s in seeds} for side in "ab"}
    metrics = tuple(m for m in metrics if all(column(t, m) for side in "ab" for t in tables[side].values()))
    report: dict = {"k": args.k, "seeds": seeds, "runs": {side: {s: str(runs[side][s]) for s in seeds} for side in "ab"},
                    "per_run": {}, "per_seed": {}, "pooled": {}}
    for side in "ab":
        for s in seeds:
            report["per_run"][f"{side}/seed{s}"] = {
                m: M.mean_metric(list(column(tables[side][s], m).values())).to_dict() for m in metrics}
    for s in seeds:
        report["per_seed"][f"seed{s}"] = {
            m: M.paired_bootstrap(column(tables["a"][s], m), column(tables["b"][s], m), n_boot=args.n_boot).to_dict()
            for m in metrics}
    for m in metrics:
        pooled = {}
        for side in "ab":
            cols = [column(tables[side][s], m) for s in seeds]
            ids = set.intersection(*(set(c) for c in cols))
            pooled[side] = {q: float(np.mean([c[q] for c in cols])) for q in ids}
        d = M.paired_bootstrap(pooled["a"], pooled["b"], n_boot=args.n_boot).to_dict()
        d["relative"] = d["diff"] / d["mean_a"] if d["mean_a"] else float("nan")
        report["pooled"][m] = d

    report["training"] = {f"{side}/seed{s}": training_curves(runs[side][s]) for side in "ab" for s in seeds}

    name = {m: m.replace("@k", f"@{args.k}") for m in metrics}
    print(f"per run (mean over test questions, 95% bootstrap CI)  a = {[str(r) for r in args.a]}")
    for key, row in report["per_run"].items():
        print(f"  {key:<9} " + "  ".join(f"{name.get(m, m)} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                                         for m, v in row.items()) + f"  (n={next(iter(row.values()))['n']})")
    print("per seed, b - a paired over questions: diff [95% CI] p")
    for key, row in report["per_seed"].items():
        print(f"  {key:<6} " + "  ".join(f"{name.get(m, m)} {v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] "
                                        f"p={v['p_value']:.3g}" for m, v in row.items()))
    print(f"pooled over seeds {seeds} (question = unit), b - a:")
    for m, v in report["pooled"].items():
        print(f"  {name.get(m, m):<11} a {v['mean_a']:.4f}  b {v['mean_b']:.4f}  diff {v['diff']:+.4f} "
              f"[{v['lo']:+.4f}, {v['hi']:+.4f}]  relative {100 * v['relative']:+.1f}%  p={v['p_value']:.3g}  "
              f"(n={v['n']})")
    print("training (window means; gradient audits: mean norm, audits with a non-zero norm / audits)")
    for key, t in report["training"].items():
        aud = ", ".join(f"{k} {v['mean']:.3g} ({v['n_nonzero']}/{t['audits']['n']})"
                        for k, v in t["audits"].items() if k != "n")
        print(f"  {key:<9} steps {t['steps']}, train CPU {t['train_cpu_s'] / 60:.1f} min; audits: {aud}")
        for w, v in t["windows"].items():
            print(f"    steps {w:<8} " + "  ".join(f"{k} {x:.3f}" for k, x in v.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
