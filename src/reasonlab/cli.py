"""`reasonlab` command line. Heavy imports (torch, transformers) happen inside commands so `--help` is instant.

    reasonlab run configs/markovian/arithmetic-smollm2.yaml train.lr=1e-5 --out runs --time-limit 30m
    reasonlab run --resume runs/arithmetic-smollm2-20261121-101500-ab12
    reasonlab eval --model smollm2-135m --task gsm8k --split test --limit 200
    reasonlab export runs/<run_id> --out exports/<run_id> [--merge]
    reasonlab doctor [CONFIG]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate reasoning models; diagnose runs from their run folders.")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command(context_settings={"allow_extra_args": False})
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config (its header names the command that runs it)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-5 model.lora.r=16"),
    out: Path = typer.Option(Path("runs"), "--out", help="where run folders go"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config with help lines, exit"),
    dry_run: bool = typer.Option(False, "--dry-run", help="build model, data, optimizer and one batch; train nothing"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue RUN_DIR from its newest valid checkpoint"),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="wall-clock budget, e.g. 2h30m; the run stops "
                                             "early enough to finish its final eval and checkpoint inside it"),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.md + plots/ when the run ends"),
):
    """Train with a recipe: config + overrides -> a run folder."""
    import time

    t_start = time.monotonic()  # the --time-limit clock starts here, before model loading
    from reasonlab import dist
    from reasonlab.config import load_config, to_yaml
    from reasonlab.errors import UserError
    from reasonlab.methods import get_method
    from reasonlab.runs import Run, new_run_id, out_dir_problem, parse_duration

    overrides = list(overrides or [])
    # typer hands "key=value" words to `config` when no path is given (e.g. --resume DIR train.steps=50)
    if config is not None and "=" in str(config) and not config.exists():
        overrides.insert(0, str(config))
        config = None
    try:
        limit = parse_duration(time_limit)
        if resume is not None:
            if not (resume / "config.yaml").exists():
                _fail(f"--resume {resume}: not a run folder (no config.yaml)")
            config = config or resume / "config.yaml"
        if config is None:
            _fail("give a config file, e.g. reasonlab run configs/trm/sudoku-cpu.yaml")
        cfg = load_config(config, overrides)
    except UserError as e:
        _fail(str(e))
    if print_config:
        typer.echo(to_yaml(cfg, comments=True), nl=False)
        raise typer.Exit(0)

    from reasonlab import training

    # what the config and command name must exist here: one line each, before a folder is made or a model loads
    try:
        if not dry_run and resume is None and out_dir_problem(out):
            _fail(out_dir_problem(out))
        module = get_method(cfg.method)
        training.check_inputs(cfg, dry_run=dry_run)
    except UserError as e:
        _fail(str(e).splitlines()[0])
    training.init_processes(cfg.train)  # before anything collective (rank 0 names the run folder for everyone)
    if getattr(cfg.train, "threads", 1) == 0:  # not set: the cores other jobs leave free (oversubscribing stalls)
        import torch

        torch.set_num_threads(training.auto_threads())
    created = out_created = False
    if dry_run:
        run_dir = Path(tempfile.mkdtemp(prefix="reasonlab-dry-run-"))
    elif resume is not None:
        run_dir = resume
    else:
        run_dir = out / dist.gather_object(new_run_id(cfg, str(config)))[0]  # rank 0 names it for everyone
        created, out_created = not run_dir.exists(), not out.exists()
    try:
        r = Run(cfg, run_dir, command=sys.argv, time_limit=limit, dry_run=dry_run, resume=resume is not None,
                t0=t_start, after_seconds=REPORT_SECONDS if report and not dry_run else 0.0)
    except UserError as e:
        _fail(str(e))
    if not dry_run:
        dist.print0(f"run folder: {run_dir}")
    try:
        result = module.main(cfg, r)
    except UserError as e:
        r.close()
        # nothing half-written: a run that failed on bad input before it logged anything leaves no folder
        if created and dist.is_main() and _nothing_recorded(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            if out_created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        _fail(str(e).splitlines()[0])
    except KeyboardInterrupt:
        r.finish("interrupted")
        raise typer.Exit(130)
    except BaseException as e:
        r.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    else:
        r.finish("stopped" if r.stop_reason else "completed", results=result)
    finally:
        if dry_run:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif report and dist.is_main() and run_dir.is_dir():
            _write_report(run_dir)  # after finish(): the report needs summary.json to say how the run ended
        dist.shutdown()  # every collective is done: the process group goes before interpreter teardown
    if not dry_run and r.stop_reason:
        dist.print0(f"stopped early ({r.stop_reason}); resume with: reasonlab run --resume {run_dir}")


REPORT_SECONDS = 5.0  # what --time-limit keeps for writing report.md + plots after the recipe returns


def _write_report(run_dir: Path) -> None:
    """report.md for the run that just ended; a reporting problem must not turn a finished run into an error."""
    try:
        from reasonlab.diagnostics.report import make_report

        rep = make_report(run_dir)
        typer.echo(f"report: {rep.path} (status {rep.status}: {rep.reason})")
    except Exception as e:  # noqa: BLE001
        typer.echo(f"warning: report not written ({type(e).__name__}: {e}); run `reasonlab report {run_dir}`",
                   err=True)


def _nothing_recorded(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return (not metrics.exists() or metrics.stat().st_size == 0) and not (run_dir / "checkpoints").exists()


def _not_built(name: str, what: str) -> None:
    _fail(f"`reasonlab {name}` is not built yet in this version: it will {what}", code=1)


try:  # the evaluation harness registers its own commands
    from reasonlab.eval.cli import eval_cmd, summarize_cmd

    app.command("eval", help="Evaluate a model on a task; writes evals/<tag>.jsonl + .json and prints a table.")(eval_cmd)
    app.command("summarize", help="Invalid count, common outputs, gold matches and examples of an eval .jsonl.")(
        summarize_cmd)
except ImportError:
    @app.command("eval")
    def eval_placeholder():
        """(not built yet) evaluate a model on a task."""
        _not_built("eval", "evaluate a model on a task and write evals/<tag>.jsonl + .json with CIs")

try:  # diagnostics: report and compare read run folders only
    from reasonlab.diagnostics.cli import compare_cmd, report_cmd

    app.command("report", help="Write report.md + plots/ for a run folder.")(report_cmd)
    app.command("compare", help="Compare runs: config differences, paired-bootstrap p-values, overlaid curves.")(
        compare_cmd)
except ImportError:
    @app.command("report")
    def report_placeholder(run_dir: Path = typer.Argument(..., help="run folder")):
        """(not built yet) write report.md + plots for a run folder."""
        _not_built("report", "write report.md and plots/*.png with status, findings and results with CIs")

    @app.command("compare")
    def compare_placeholder(runs: List[Path] = typer.Argument(..., help="run folders")):
        """(not built yet) compare run folders."""
        _not_built("compare", "tabulate runs with config differences and paired-bootstrap p-values")


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="run folder (runs/<run_id>)"),
    out: Path = typer.Option(..., "--out", help="folder to create (a new or empty one; nothing is overwritten)"),
    step: Optional[int] = typer.Option(None, "--step", help="export checkpoints/step_N instead of the best one"),
    best: bool = typer.Option(False, "--best", help="export checkpoints/best, chosen on validation (the default)"),
    merge: bool = typer.Option(False, "--merge", help="LoRA runs: merge the adapter into the base weights, giving a "
                               "full Hugging Face model folder"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="also upload the folder to this hub repo "
                                              "(owner/name; needs the hub)"),
):
    """A run's checkpoint as a PEFT adapter, a full HF model folder (--merge) or TRM safetensors, with a model card."""
    from reasonlab.errors import UserError
    from reasonlab.export import export, plan_export

    try:
        plan = plan_export(run_dir, out, step=step, best=best, merge=merge, push_to_hub=push_to_hub)
        path = export(plan)
    except UserError as e:
        _fail(str(e).splitlines()[0])
    typer.echo(f"exported {plan.kind} of {plan.run_dir} ({plan.which}, step {plan.checkpoint.step}) to {path}")
    if plan.push_to_hub:
        typer.echo(f"uploaded to https://huggingface.co/{plan.push_to_hub}")


@app.command()
def doctor(config: Optional[Path] = typer.Argument(None, help="also check what this config needs"),
           out: Path = typer.Option(Path("runs"), "--out", help="run folder root to check for write access")):
    """What this machine has: torch + device, key packages, embedded assets, disk, write access."""
    from reasonlab.doctor import check

    rows, missing = check(config, out)
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        mark = {True: "ok", False: "MISSING", None: "-"}[ok]
        typer.echo(f"{name:<{width}}  {mark:<7}  {detail}")
    if missing:
        typer.echo(f"\n{len(missing)} needed item(s) missing: {', '.join(missing)}", err=True)
        raise typer.Exit(1)


@app.command()
def models(prepare: Optional[str] = typer.Option(None, "--prepare", help="convert an embedded model now (smollm2-135m)")):
    """Embedded model aliases and whether they are installed / converted."""
    from reasonlab.models import embedded

    if prepare:
        if prepare not in embedded.EMBEDDED:
            _fail(f"unknown embedded model '{prepare}' (choices: {', '.join(embedded.EMBEDDED)})")
        try:
            typer.echo(f"{prepare}: {embedded.resolve(prepare)}")
        except embedded.EmbeddedModelMissing as e:
            _fail(str(e))
        return
    for row in embedded.status():
        state = "installed" if row["installed"] else f"missing ({row['hint']})"
        conv = "ready" if row["converted"] else "converts on first use"
        typer.echo(f"{row['alias']:<14} {row['hub_id']:<40} {row['kind']:<17} {state}; {conv}")
    typer.echo("any Hugging Face hub id or local HF folder also works wherever a model is named")


@app.command()
def data(task: Optional[str] = typer.Argument(None, help="task name; omit to list tasks"),
         split: str = typer.Option("test", "--split"), n: int = typer.Option(3, "--n", help="examples to show"),
         data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local dataset files")):
    """List tasks, or show a task's first examples and prompt."""
    from reasonlab.errors import UserError
    from reasonlab.tasks import get_task, list_tasks

    if task is None:
        for name in list_tasks():
            typer.echo(name)
        return
    try:
        kwargs = {"data_dir": str(data_dir)} if data_dir else {}
        t = get_task(task, **kwargs)
        exs = t.examples(split)
    except (UserError, TypeError) as e:
        _fail(str(e))
    typer.echo(f"{t.name} v{t.version} [{split}]: {len(exs)} examples")
    for ex in exs[:n]:
        typer.echo(f"--- {ex.id}  gold={ex.gold!r}\n{t.prompt(ex)}")


@app.command("verify-frozen")
def verify_frozen(ckpt_a: Path = typer.Argument(..., help="checkpoint folder (has manifest.json)"),
                  ckpt_b: Path = typer.Argument(..., help="another checkpoint folder"),
                  module: str = typer.Option(..., "--module", help="parameter-name component, e.g. decoder")):
    """Prove a frozen module is bit-identical in two checkpoints (per-tensor sha256)."""
    from reasonlab.errors import UserError
    from reasonlab.runs import compare_frozen

    try:
        matched, total, diffs = compare_frozen(ckpt_a, ckpt_b, module)
    except UserError as e:
        _fail(str(e))
    typer.echo(f"{module}: {matched}/{total} tensors match")
    for name in diffs[:10]:
        typer.echo(f"  differs: {name}")
    if total == 0 or matched != total:
        raise typer.Exit(1)


def main() -> None:
    """The `reasonlab` command. A process that took part in a process group (`accelerate launch ... -m reasonlab.cli`)
    leaves through dist.exit_now with the code the command chose, skipping interpreter teardown (why: its docstring)."""
    def collective():  # reasonlab.dist, when it started a process group (not imported: it cannot have)
        d = sys.modules.get("reasonlab.dist")
        return d if d is not None and d.started() else None

    try:
        app()  # standalone mode: always ends in SystemExit with the command's code
    except SystemExit as e:
        if (d := collective()) is None:
            raise
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        d.exit_now(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    except BaseException:
        if (d := collective()) is None:
            raise
        import traceback

        traceback.print_exc()
        d.exit_now(1)


if __name__ == "__main__":
    main()
