"""`reasonlab report` and `reasonlab compare` (registered by reasonlab/cli.py). They read run folders only.

    reasonlab report runs/<run_id> [--fail-on failed]
        -> runs/<run_id>/report.md, plots/*.png, findings.json; prints the status and the findings
    reasonlab compare runs/A runs/B [...] [--out DIR]
        -> DIR/compare.md + DIR/plots/*.png; prints results, paired-bootstrap p-values and config differences
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

FAIL_LEVELS = {"never": -1, "failed": 0, "warning": 1}  # exit 1 when the status level <= this


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run folder (runs/<run_id>)"),
    fail_on: str = typer.Option("never", "--fail-on", help="exit 1 when the status is this bad or worse: "
                                "never | warning | failed (for scripts and CI)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a detector threshold, e.g. --set "
                                             "min_eval_n=30 (repeatable; on top of the run's `watch:` section; "
                                             "names: reasonlab.watch.Thresholds)"),
) -> None:
    """Write report.md + plots/ for a run folder; print its status and findings."""
    from reasonlab.diagnostics.report import make_report
    from reasonlab.errors import UserError

    if fail_on not in FAIL_LEVELS:
        _fail(f"--fail-on {fail_on!r}: use one of {', '.join(FAIL_LEVELS)}")
    overrides = {}
    for item in set_ or []:
        if "=" not in item:
            _fail(f"--set {item!r} is not NAME=VALUE (e.g. --set min_eval_n=30)")
        k, _, v = item.partition("=")
        overrides[k.strip()] = v.strip()
    try:
        rep = make_report(run_dir, overrides)
    except UserError as e:
        _fail(str(e))
    typer.echo(f"status: {rep.status.upper()}: {rep.reason}")
    for f in rep.findings:
        typer.echo(f"  {f.severity.upper():<8} {f.code:<24} {f.title}")
    plots = f" and {len(rep.plots)} plots in {rep.path.parent / 'plots'}" if rep.plots else ""
    typer.echo(f"wrote {rep.path}{plots}")
    level = {"failed": 0, "warning": 1}.get(rep.status, 2)
    if level <= FAIL_LEVELS[fail_on]:
        raise typer.Exit(1)


def compare_cmd(
    runs: List[Path] = typer.Argument(..., help="two or more run folders; the first is the baseline"),
    out: Optional[Path] = typer.Option(None, "--out", help="where compare.md and plots/ go (default: a "
                                       "compare-... folder next to the first run)"),
    n_boot: int = typer.Option(10_000, "--n-boot", help="bootstrap resamples for the paired p-values"),
    seed: int = typer.Option(0, "--seed", help="bootstrap seed"),
) -> None:
    """Compare runs: results, paired-bootstrap p-values on shared eval items, config differences, overlaid curves."""
    from reasonlab.diagnostics.compare import compare_runs, to_text
    from reasonlab.errors import UserError

    if n_boot < 100:
        _fail(f"--n-boot {n_boot} is too few for a p-value; use at least 1000")
    try:
        cmp = compare_runs(runs, out=out, n_boot=n_boot, seed=seed)
    except UserError as e:
        _fail(str(e))
    typer.echo(to_text(cmp))
    typer.echo(f"\nwrote {cmp.path}" + (f" and {len(cmp.plots)} plots" if cmp.plots else ""))
