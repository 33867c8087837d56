"""`reasonlab eval` and `reasonlab summarize` (registered by reasonlab/cli.py). Heavy imports stay inside the bodies.

    reasonlab eval --model smollm2-135m --task gsm8k --split test --limit 200 --samples 4
        -> runs/evals/<tag>.jsonl (one record per example and sample) + runs/evals/<tag>.json (summary), and a table,
           + runs/evals/lm_eval/results_<tag>.json in lm-eval's results schema (lm-eval tooling reads it).
        --out RUN_DIR puts them in that run folder's evals/ (the run-folder contract).
    reasonlab eval --model runs/<run_id> ...          # a run folder: its checkpoints/best (chosen on validation)
    reasonlab eval --model exports/<run_id> ...       # a `reasonlab export` folder (adapter or merged)
    reasonlab eval --model meta-llama/Llama-3.1-8B --model_args revision=main,dtype=bfloat16,peft=ADAPTER
    reasonlab summarize runs/evals/<tag>.jsonl
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _default_tag(task: str, split: str, model: str, style: str, samples: int, limit: Optional[int]) -> str:
    short = Path(model).name if Path(model).exists() else model.split("/")[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    lim = f"-n{limit}" if limit else ""
    raw = f"{task}-{split}-{short}-{style}{lim}-k{samples}-{stamp}"
    return "".join(c if c.isalnum() or c in "_.@=+-" else "_" for c in raw)


def eval_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="embedded alias, hub id, local HF folder, a run "
                              "folder (its checkpoints/best, chosen on validation) or a `reasonlab export` folder"),
    model_args: Optional[str] = typer.Option(None, "--model_args", "--model-args",
                                             help="lm-eval style key=value,...: revision (hub), dtype, peft (adapter "
                                                  "folder or hub id on top of --model), trust_remote_code, step "
                                                  "(a run folder's step_N)"),
    task: str = typer.Option(..., "--task", "-t", help="task name (see `reasonlab data`)"),
    split: str = typer.Option("test", "--split", help="train | validation | test"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate the first N examples only"),
    samples: int = typer.Option(1, "--samples", "-k", help="samples per question (pass@k, maj@k, diversity)"),
    temperature: Optional[float] = typer.Option(None, "--temperature",
                                                help="sampling temperature; default 0 (greedy) for --samples 1, "
                                                     "0.7 otherwise"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation budget per sample"),
    fewshot: int = typer.Option(0, "--fewshot", help="solved examples prepended to each prompt"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="wrap prompts in the tokenizer's chat template"),
    style: str = typer.Option("default", "--style", help="prompt style: default | markovian | cot"),
    mode: str = typer.Option("auto", "--mode", help="auto (MCQ tasks -> log-likelihood) | generate | loglik"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable); default 'Question:'"),
    batch_size: int = typer.Option(64, "--batch-size", help="rows decoded together (questions x samples); finished "
                                   "rows are refilled from the next questions"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    semantic: bool = typer.Option(False, "--semantic", help="also compute MiniLM semantic diversity"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local dataset root (e.g. ../shared/data)"),
    out: Path = typer.Option(Path("runs"), "--out", help="writes OUT/evals/<tag>.jsonl + .json (a run folder works)"),
    tag: Optional[str] = typer.Option(None, "--tag", help="file name stem; default task-split-model-style-nN-kK-time"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16; default: a run's or "
                                        "export's own dtype, else float32"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:1; default cuda when available"),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="torch CPU threads (default: the cores other jobs leave free)"),
    backend: str = typer.Option("auto", "--backend", help="generation backend: auto (vllm on CUDA when installed, "
                                "else own) | own | hf | vllm"),
) -> None:
    """Evaluate a model on a task; writes evals/<tag>.jsonl + .json and prints a table."""
    import os
    import sys

    import torch

    from reasonlab.errors import UserError
    from reasonlab.eval import harness as H
    from reasonlab.eval.harness import EvalSettings, evaluate, format_table, write_eval
    from reasonlab.eval.generate import BackendUnavailable
    from reasonlab.models.lm import ModelUnavailable, resolve_model_path
    from reasonlab.tasks import TaskError, get_task

    tty = sys.stderr.isatty()
    if not tty:  # a log file: a progress bar state at most every 30 s instead of ten carriage returns a second
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    from reasonlab.runs import out_dir_problem

    if dtype is not None and dtype not in H.DTYPE_NAMES:
        _fail(f"--dtype must be one of {', '.join(H.DTYPE_NAMES)}, got {dtype!r}")
    if out_dir_problem(out):  # before the eval runs: its results must have somewhere to go
        _fail(out_dir_problem(out))
    if device is not None and device.startswith("cuda"):
        if not torch.cuda.is_available():
            _fail(f"--device {device} but torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU "
                  "here): use --device cpu, or leave --device out")
        if ":" in device and (not device.split(":", 1)[1].isdigit()
                              or int(device.split(":", 1)[1]) >= torch.cuda.device_count()):
            _fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                  f"cuda:{torch.cuda.device_count() - 1}")
    elif device is not None and device != "cpu":
        _fail(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    for flag, v in (("--samples", samples), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if v < 1:
            _fail(f"{flag} must be >= 1, got {v}")
    from reasonlab.training import auto_threads

    torch.set_num_threads(threads or auto_threads())  # default: the free cores (oversubscribed threads stall)
    if temperature is None:
        temperature = 0.0 if samples == 1 else 0.7
        if samples > 1:
            typer.echo(f"note: --samples {samples} without --temperature: sampling at temperature 0.7", err=True)
    try:
        settings = EvalSettings(style=style, fewshot=fewshot, chat=chat, samples=samples, temperature=temperature,
                                top_p=top_p, max_new_tokens=max_new_tokens, stop=tuple(stop) if stop else None,
                                batch_size=batch_size, seed=seed, mode=mode, semantic=semantic)
        settings.gen_config()  # --samples 0, --max-new-tokens 0, ...: one line now, not after the model loaded
        task_kwargs = {"fewshot": fewshot}
        if data_dir is not None:
            task_kwargs["data_dir"] = data_dir
        try:
            task_obj = get_task(task, **task_kwargs)
        except TypeError:
            _fail(f"task {task!r} does not read local files: drop --data-dir")
        n_split = len(task_obj.examples(split))  # data errors surface before the model loads
        from reasonlab.eval.generate import make_sampler, resolve_backend

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        resolve_backend(backend, dev)  # a missing vLLM or a typo fails here, before the model loads
        src = H.resolve_model_source(model, H.parse_model_args(model_args), dtype)  # so does a bad model spec
        tag = tag or _default_tag(task, split, src.spec, style, samples, limit)
        if not re.fullmatch(r"[A-Za-z0-9_.@=+-]+", tag):
            _fail(f"--tag '{tag}' may only use letters, digits and _ . @ = + -")
        t_start = time.time()
        lm, tok = H.load_model(src, device=dev)
        base_path = src.base if src.base == "tiny-random" else resolve_model_path(src.base)[0]
        vllm = {"model_path": base_path, "dtype": src.dtype, "seed": seed}
        sampler = make_sampler(backend, lm, tok, device=dev, vllm=vllm)
        sampler.sync(lm)  # a vLLM engine starts from the base weights: hand it the trained ones (LoRA merged)
        records, summary = evaluate(lm, tok, task_obj, split=split, limit=limit, settings=settings, model_id=src.spec,
                                    sampler=sampler)
        summary.update(backend=sampler.name, model_source={"kind": src.kind, **src.info}, model_args=src.model_args(),
                       dtype=src.dtype, tag=tag)
        jl, js = write_eval(out, tag, records, summary)
        lm_eval = H.write_lm_eval_results(out, tag, H.lm_eval_results(
            records, summary, model_name=src.spec, model_args=src.model_args(), n_original=n_split, device=dev,
            batch_size=batch_size, chat_template=getattr(tok, "chat_template", None), start_time=t_start))
    except (UserError, TaskError, ModelUnavailable, BackendUnavailable, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except ValueError as e:  # settings validation (temperature/top-p/mode): one line naming the fix
        if "Traceback" in str(e) or not str(e):
            raise
        _fail(str(e).splitlines()[0])
    if not tty:  # a progress bar ends with a carriage return, not a newline: the table starts on a line of its own
        sys.stderr.write("\n")
        sys.stderr.flush()
    typer.echo(format_table(summary))
    typer.echo(f"wrote {jl}\n      {js}\n      {lm_eval} (lm-eval's results schema)")


def summarize_cmd(
    path: Path = typer.Argument(..., help="an evals/<tag>.jsonl file"),
    top: int = typer.Option(10, "--top", help="how many of the most common outputs/answers to show"),
    examples: int = typer.Option(3, "--examples", help="wrong and right examples to print"),
    width: int = typer.Option(160, "--width", help="characters of each output to show"),
) -> None:
    """Invalid count, most common outputs and answers, gold-match counts and examples of an eval .jsonl."""
    import json

    from reasonlab.eval.harness import format_table, summarize_records

    if not path.is_file():
        _fail(f"{path} does not exist: pass an evals/<tag>.jsonl written by `reasonlab eval`")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        need = {"id", "sample", "output", "extracted", "gold", "correct", "valid"}
        missing = need - set(records[0]) if records else need
        if missing:
            raise ValueError(f"records lack {sorted(missing)}")
    except (json.JSONDecodeError, ValueError) as e:
        _fail(f"{path} is not an eval records file ({e}): pass the .jsonl, not the .json summary")

    def clip(s: str | None) -> str:
        s = "<none>" if s is None else s.replace("\n", "\\n")
        return s if len(s) <= width else s[: width - 3] + "..."

    n = len(records)
    ids = {r["id"] for r in records}
    invalid = sum(not r["valid"] for r in records)
    correct = sum(bool(r["correct"]) for r in records)
    echo = typer.echo
    echo(f"{path}: {n} records, {len(ids)} examples")
    echo(f"invalid (no answer extracted): {invalid}/{n} ({invalid / n:.1%})")
    echo(f"gold matches (primary extractor {records[0].get('extractor')}): {correct}/{n} ({correct / n:.1%})")
    by = Counter()
    for r in records:
        for k, v in r.get("correct_by", {}).items():
            by[k] += bool(v)
    for k in sorted(by):
        echo(f"  {k:<28} {by[k]}/{n} ({by[k] / n:.1%})")
    finishes = Counter(r.get("finish", "?") for r in records)
    echo("finish reasons: " + ", ".join(f"{k}={v}" for k, v in finishes.most_common()))
    echo(f"\nmost common extracted answers (top {top}):")
    for a, c in Counter(r["extracted"] for r in records).most_common(top):
        echo(f"  {c:>5}  {clip(a)}")
    echo(f"\nmost common outputs (top {top}):")
    for o, c in Counter(r["output"].strip() for r in records).most_common(top):
        echo(f"  {c:>5}  {clip(o)}")
    for label, pick in (("wrong", lambda r: not r["correct"]), ("right", lambda r: r["correct"])):
        chosen = [r for r in records if pick(r)][:examples]
        if chosen:
            echo(f"\n{label} examples:")
        for r in chosen:
            echo(f"  [{r['id']} #{r['sample']}] gold={r['gold']} extracted={r['extracted']} valid={r['valid']}")
            echo(f"    output: {clip(r['output'])}")
    if len(records) > 1:
        echo("\n" + format_table({"metrics": summarize_records(records)["metrics"], "task": records[0].get("task"),
                                  "split": records[0].get("split")}))
