"""Compare Markovian objectives (e.g. the full objective, no_reward_grad, expert iteration) over several seeds, on the
test eval each run wrote once on its validation-chosen checkpoint, paired over the same test questions.

    python scripts/markovian_compare.py --runs full=/tmp/mk14/full-s0/*,/tmp/mk14/full-s1/*,... \\
        --runs nrg=... --runs ei=... --reference full --out docs/markovian-compare.json

Reported, each with n and a 95% interval:
  - every run: untrained test accuracy (its test_base_step0 eval), trained test accuracy (Wilson), the checkpoint
    step chosen on validation, and trained - untrained paired over questions (paired bootstrap, two-sided p);
  - per seed: variant - reference, paired over the shared question ids;
  - pooled: each question's accuracy averaged over a variant's seeds, then variant - reference paired over
    questions (the unit of resampling is the question; seed-to-seed variance enters only through the averages, so
    the per-seed rows are printed next to it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonlab.eval import metrics as M  # noqa: E402


def run_files(run: Path) -> tuple[Path, Path, int]:
    evals = run / "evals"
    tests = sorted(evals.glob("test_best_step*.jsonl"))
    if len(tests) != 1 or not (evals / "test_base_step0.jsonl").exists():
        sys.exit(f"error: {run} needs exactly one evals/test_best_step*.jsonl and evals/test_base_step0.jsonl")
    return evals / "test_base_step0.jsonl", tests[0], int(tests[0].stem.rsplit("step", 1)[1])


def seed_of(run: Path) -> int:
    return int(yaml.safe_load((run / "config.yaml").read_text())["seed"])


def fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] (n={m['n']})"


def fmt_d(d: M.PairedDiff) -> str:
    return f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], p = {d.p_value:.4f} (n={d.n})"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", action="append", required=True, help="NAME=RUN_DIR,RUN_DIR,... (one per seed)")
    ap.add_argument("--reference", required=True, help="the NAME the others are compared with")
    ap.add_argument("--n-boot", type=int, default=10_000)
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    variants: dict[str, dict[int, Path]] = {}
    for spec in args.runs:
        name, _, dirs = spec.partition("=")
        variants[name] = {seed_of(Path(d)): Path(d) for d in dirs.split(",") if d}
    if args.reference not in variants:
        sys.exit(f"error: --reference {args.reference} is not one of {sorted(variants)}")
    report: dict = {"runs": {}, "per_seed": {}, "pooled": {}}
    print("| variant | seed | untrained test | trained test (checkpoint chosen on validation) | trained - untrained |")
    print("|---|---|---|---|---|")
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_seed in variants.items():
        for seed, run in sorted(by_seed.items()):
            base, test, step = run_files(run)
            b, t = M.per_example_scores(base), M.per_example_scores(test)
            scores.setdefault(name, {})[seed] = t
            acc_b = M.accuracy(v == 1.0 for v in b.values()).to_dict()
            acc_t = M.accuracy(v == 1.0 for v in t.values()).to_dict()
            d = M.paired_bootstrap(b, t, args.n_boot)
            report["runs"][f"{name}/seed{seed}"] = {"run": str(run), "best_step": step, "untrained": acc_b,
                                                    "trained": acc_t, "trained_minus_untrained": d.to_dict()}
            print(f"| {name} | {seed} | {fmt(acc_b)} | {fmt(acc_t)} @ step {step} | {fmt_d(d)} |")
    ref = scores[args.reference]
    print(f"\n| variant - {args.reference} | seed | paired difference [95% CI], p |")
    print("|---|---|---|")
    for name, by_seed in scores.items():
        if name == args.reference:
            continue
        for seed in sorted(set(by_seed) & set(ref)):
            d = M.paired_bootstrap(ref[seed], by_seed[seed], args.n_boot)
            report["per_seed"][f"{name}/seed{seed}"] = d.to_dict()
            print(f"| {name} | {seed} | {fmt_d(d)} |")

    def pooled(by_seed: dict[int, dict[str, float]]) -> dict[str, float]:
        ids = set.intersection(*(set(s) for s in by_seed.values()))
        return {q: sum(s[q] for s in by_seed.values()) / len(by_seed) for q in ids}

    print(f"\n| pooled over seeds | mean test accuracy [95% CI] | minus {args.reference} [95% CI], p |")
    print("|---|---|---|")
    ref_p = pooled(ref)
    for name, by_seed in scores.items():
        p = pooled(by_seed)
        mean = M.mean_metric(list(p.values())).to_dict()
        row = {"seeds": sorted(by_seed), "mean": mean}
        diff = ""
        if name != args.reference:
            d = M.paired_bootstrap(ref_p, p, args.n_boot)
            row["minus_reference"] = d.to_dict()
            diff = fmt_d(d)
        report["pooled"][name] = row
        print(f"| {name} ({len(by_seed)} seeds) | {fmt(mean)} | {diff or '-'} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
