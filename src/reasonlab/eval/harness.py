"""The evaluation harness: task -> prompts -> samples (or choice log-likelihoods) -> scores -> records + summary.

    records, summary = evaluate(model, tok, "gsm8k", split="test", limit=200, samples=4, temperature=0.7)
    write_eval(run.dir, "gsm8k-test-step500", records, summary)     # evals/<tag>.jsonl + evals/<tag>.json

One record per (example, sample): id, prompt, output, every extractor's answer side by side, the primary extractor's
answer, gold, correct, valid, extractor name@version, sample index, finish reason. The summary holds every metric as
{value, n, lo, hi, method} (95% intervals) plus what is needed to reproduce the numbers: task + version, extractor
versions, prompt-template hash, model id, git SHA, generation settings, wall time.

Accuracy with several samples per question is the mean over questions of the fraction of correct samples (= pass@1);
its interval is Wilson over questions when there is one sample, else a bootstrap over questions (samples of one
question are not independent, so a Wilson interval over all samples would be too narrow).

Multiple-choice tasks (MMLU, ARC, AQuA, MathQA) are scored by log-likelihood of each choice in mode "auto" as in
lm-eval (acc and acc_norm); mode "generate" samples text and extracts a letter instead (the Markovian papers' way).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from reasonlab.eval import diversity as D
from reasonlab.eval import metrics as M
from reasonlab.eval.generate import GenConfig, choice_predictions, format_prompt, generate, loglikelihood
from reasonlab.tasks import Example, Task, get_task

HARNESS_VERSION = "1"
MODES = ("auto", "generate", "loglik")
# lm-eval's gsm8k `until`: a few-shot-style model starts the next "Question:" when done
DEFAULT_STOP = ("Question:",)


@dataclass
class EvalSettings:
    style: str = field(default="default", metadata={"help": "prompt style: default | markovian | cot"})
    fewshot: int = field(default=0, metadata={"help": "solved examples prepended to each prompt"})
    chat: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template"})
    samples: int = field(default=1, metadata={"help": "samples per question (pass@k, maj@n, diversity need > 1)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per sample"})
    stop: tuple[str, ...] | None = field(default=None, metadata={"help": "stop strings; None = ('Question:',)"})
    batch_size: int = field(default=16, metadata={"help": "rows decoded together"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    mode: str = field(default="auto", metadata={"help": "auto (MCQ -> loglik, else generate) | generate | loglik"})
    semantic: bool = field(default=False, metadata={"help": "also compute MiniLM semantic diversity (loads a model)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"eval mode must be one of {MODES}, got {self.mode!r}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"--samples {self.samples} with --temperature 0 gives {self.samples} identical greedy "
                             f"samples: set --temperature > 0 (e.g. 0.7) or use --samples 1")
        self.stop = DEFAULT_STOP if self.stop is None else tuple(self.stop)

    def gen_config(self) -> GenConfig:
        return GenConfig(n=self.samples, temperature=self.temperature, top_p=self.top_p,
                         max_new_tokens=self.max_new_tokens, stop=self.stop, batch_size=self.batch_size, seed=self.seed,
                         progress=self.progress)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def template_hash(task: Task, tok, s: EvalSettings, example: Example | None = None) -> str:
    """Hash of the prompt layout: the prompt rendered for a placeholder question (few-shot block and chat template
    included), so any change to instruction, style, shots or template changes the hash, and the data does not."""
    probe = Example(id="__template__", question="{question}", gold="{gold}",
                    choices=list(example.choices) if example is not None and example.choices else None)
    text = task.prompt(probe, s.style)
    return _sha256(format_prompt(tok, text, s.chat) if tok is not None else text)


def _mode_for(task: Task, examples: list[Example], s: EvalSettings) -> str:
    is_mcq = hasattr(task, "choice_continuations") and all(e.choices for e in examples[:1])
    if s.mode == "loglik" and not is_mcq:
        raise ValueError(f"task {task.name!r} has no choices to score: use --mode generate")
    if s.mode == "auto":
        return "loglik" if is_mcq else "generate"
    return s.mode


# ----------------------------------------------------------------------------- the run

def evaluate(model, tok, task: str | Task, split: str = "test", limit: int | None = None, samples: int = 1, *,
             settings: EvalSettings | None = None, examples: list[Example] | None = None, model_id: str | None = None,
             task_kwargs: dict | None = None, compute=None, sampler=None, stop=None,
             **overrides) -> tuple[list[dict], dict]:
    """Evaluate `model` on the first `limit` examples of `task`/`split`. Returns (records, summary).

    `settings` or keyword overrides (temperature=..., style=...) configure prompts and sampling. `examples` replaces
    the task's own examples (e.g. a fixed validation subset a recipe picked once). `compute` (reasonlab.training):
    the examples are split over its processes and the records gathered, in order, on every rank. `sampler`: a
    generation backend (reasonlab.eval.generate.make_sampler); default the own loop on `model`. `stop` (a recipe's
    Run.signalled): polled before every generation batch; once True the evaluation raises training.EvalInterrupted.
    """
    s = settings or EvalSettings(samples=samples, **overrides)
    if settings is not None and (overrides or samples != 1):
        s = EvalSettings(**{**asdict(settings), "samples": samples if samples != 1 else settings.samples, **overrides})
    if isinstance(task, str):
        task = get_task(task, **{"fewshot": s.fewshot, **(task_kwargs or {})})
    exs = list(examples) if examples is not None else task.examples(split)
    if limit is not None:
        exs = exs[:limit]
    if not exs:
        raise ValueError(f"no examples to evaluate for task {task.name!r} split {split!r}")
    mode = _mode_for(task, exs, s)
    t0 = time.perf_counter()
    from reasonlab.training import sharded

    if mode == "loglik":
        records = sharded(compute, exs, lambda part, off: _group_records(part, _run_loglik(model, tok, task, part, s)))
    else:
        records = sharded(compute, exs, lambda part, off: _group_records(
            part, _run_generate(model, tok, task, part, s, sampler, off, stop)[0]))
    records = [r for group in records for r in group]
    n_tokens = sum(r.get("new_tokens", 0) for r in records)
    wall = time.perf_counter() - t0
    for r in records:
        r["task"], r["split"] = task.name, split
    summary = summarize_records(records, task, mode, s)
    summary.update({
        "task": task.name, "task_version": getattr(task, "version", "?"), "split": split, "mode": mode,
        "n_examples": len(exs), "limit": limit, "model": model_id or _model_id(model),
        "prompt_template_sha256": template_hash(task, tok, s, exs[0]),
        "prompts_sha256": _sha256("\x00".join(r["prompt"] for r in records if r["sample"] == 0)),
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items() if k != "progress"}},
        "generation": s.gen_config().to_dict() if mode == "generate" else None,
        "harness_version": HARNESS_VERSION, "git": _git(), "wall_time_s": round(wall, 3),
        "new_tokens": n_tokens, "tokens_per_s": round(n_tokens / wall, 2) if n_tokens and wall > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return records, summary


def _group_records(exs: list[Example], records: list[dict]) -> list[list[dict]]:
    """Records regrouped one list per example (for sharded(): one result per item)."""
    by_id: dict[str, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    return [by_id.get(e.id, []) for e in exs]


def _model_id(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "name_or_path", "") or type(model).__name__)


def _git() -> dict:
    try:
        from reasonlab.runs import git_info

        return git_info()
    except Exception:  # no git, or runs.py missing: the summary still records that it could not tell
        return {"sha": None, "dirty": None}


def score_record(task: Task, e: Example, output: str, *, prompt: str, sample: int = 0, **extra) -> dict:
    """THE eval record of one output (every recipe and `reasonlab eval` write these): id, sample, prompt, output, the
    primary extractor's answer, every extractor's answer and verdict side by side, gold, correct, valid."""
    sc = task.score(output, e)
    rec = {"id": e.id, "sample": sample, "prompt": prompt, "output": output, "extracted": sc.extracted,
           "answer_key": task.canonical_answer(sc.extracted),  # the form in which two answers are one (diversity)
           "gold": e.gold, "correct": bool(sc.correct), "valid": bool(sc.valid), "extractor": sc.extractor,
           "extractions": sc.extractions, "correct_by": sc.correct_by, **extra}
    if "n_solutions" in e.meta:  # a task that enumerates its solutions: coverage = distinct correct / this
        rec["n_solutions"] = int(e.meta["n_solutions"])
    return rec


def sample_record(task: Task, e: Example, smp, *, prompt: str, sample: int = 0, **extra) -> dict:
    """score_record for a generated Sample (its finish reason and length recorded)."""
    return score_record(task, e, smp.text, prompt=prompt, sample=sample, finish=smp.finish,
                        new_tokens=len(smp.token_ids), **extra)


def eval_summary(records: list[dict], task: Task, *, tag: str, step: int | None = None, mode: str = "generate",
                 **fields) -> dict:
    """THE eval summary (evals/<tag>.json): every metric of summarize_records with n and a 95% CI (the headline one
    is named "accuracy"), plus tag, step, task + version and the recipe's protocol `fields`."""
    summary = summarize_records(records, task, mode)
    summary.update({"tag": tag, "step": step, "task": task.name, "task_version": getattr(task, "version", "?"),
                    "n": len({r["id"] for r in records}), **fields})
    return summary


def eval_log(summary: dict, prefix: str) -> dict[str, float]:
    """What a recipe logs to metrics.jsonl for one eval: every metric's value (flat_metrics) plus the headline
    accuracy's interval and n: {prefix}/accuracy, {prefix}/accuracy_lo, _hi, _n."""
    out = flat_metrics(summary, prefix)
    a = summary["metrics"].get("accuracy")
    if isinstance(a, dict):
        out.update({f"{prefix}/accuracy_lo": a.get("lo"), f"{prefix}/accuracy_hi": a.get("hi"),
                    f"{prefix}/accuracy_n": a.get("n")})
    return {k: v for k, v in out.items() if v is not None}


def _run_generate(model, tok, task: Task, exs: list[Example], s: EvalSettings, sampler=None,
                  offset: int = 0, stop=None) -> tuple[list[dict], int]:
    from reasonlab.eval.generate import OwnSampler, encode, prompt_seeds

    prompts = [format_prompt(tok, task.prompt(e, s.style), s.chat) for e in exs]  # chat template applied ONCE here
    ids = encode(tok, prompts, s.chat)  # what every backend decodes: the recorded prompt's tokens
    gc = s.gen_config()
    seeds = prompt_seeds(gc.seed, len(exs), offset)  # per example: the same samples however the split is sharded
    if stop is not None:  # batch by batch, polling the stop flag (the same samples: training.generate_checked)
        from reasonlab.training import generate_checked

        out = generate_checked(sampler or OwnSampler(model, tok), ids, gc, seeds=seeds, stop=stop)
    elif sampler is None:
        out = generate(model, tok, ids, gc, seeds=seeds)
    else:
        out = sampler.generate(ids, gc, seeds=seeds)
    records, n_tokens = [], 0
    for e, prompt, group in zip(exs, prompts, out):
        for j, smp in enumerate(group):
            n_tokens += len(smp.token_ids)
            records.append(sample_record(task, e, smp, prompt=prompt, sample=j))
    return records, n_tokens


def _run_loglik(model, tok, task, exs: list[Example], s: EvalSettings) -> list[dict]:
    from reasonlab.tasks.base import LETTERS

    reqs, spans = [], []
    for e in exs:
        ctx, conts = task.context(e), task.choice_continuations(e)
        spans.append((len(reqs), len(conts)))
        reqs += [(ctx, c) for c in conts]
    lls = loglikelihood(model, tok, reqs, batch_size=s.batch_size, progress=s.progress)
    records = []
    for e, (start, k) in zip(exs, spans):
        ctx, conts = reqs[start][0], [c for _, c in reqs[start:start + k]]
        ll = [lls[start + i][0] for i in range(k)]
        # lm-eval normalizes by the choice string's length (the delimiter space is not part of the choice)
        pred, pred_norm = choice_predictions(ll, [c[1:] if c.startswith(" ") else c for c in conts])
        gold = task.gold_index(e)
        correct, correct_norm = pred == gold, pred_norm == gold
        records.append({
            "id": e.id, "sample": 0, "prompt": ctx, "output": LETTERS[pred], "extracted": LETTERS[pred],
            "gold": e.gold, "correct": correct, "valid": True, "extractor": "loglik-acc@1",
            "extractions": {"loglik-acc@1": LETTERS[pred], "loglik-acc_norm@1": LETTERS[pred_norm]},
            "correct_by": {"loglik-acc@1": correct, "loglik-acc_norm@1": correct_norm},
            "finish": "loglik", "new_tokens": 0, "choices": conts, "logliks": ll,
            "greedy": [lls[start + i][1] for i in range(k)],
        })
    return records


# ----------------------------------------------------------------------------- metrics from records

def group_by_example(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["id"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r["sample"])
    return groups


def _mean_accuracy(groups: dict[str, list[dict]], key) -> M.Metric:
    """Mean over questions of the fraction of correct samples; Wilson with one sample each, else bootstrap."""
    per = [sum(bool(key(r)) for r in g) / len(g) for g in groups.values()]
    if all(len(g) == 1 for g in groups.values()):
        return M.accuracy(p == 1.0 for p in per)
    return M.mean_metric(per)


def set_coverage(groups, k: int) -> dict[str, list[float]]:
    """Per question (each a list of its sample records): distinct_correct = expected distinct correct answers among k
    samples (M.distinct_correct_at_k over the records' `answer_key`, else `extracted`), and, when every record
    carries the task's `n_solutions`, coverage = distinct_correct / n_solutions. {name: [value per question]}."""
    groups = list(groups)
    keyed = [([r.get("answer_key", r.get("extracted")) for r in g], [bool(r["correct"]) for r in g]) for g in groups]
    dc = [M.distinct_correct_at_k(a, c, k) for a, c in keyed]
    out = {"distinct_correct": dc}
    n_sol = [g[0].get("n_solutions") for g in groups]
    if n_sol and all(isinstance(x, int) and x > 0 for x in n_sol):
        out["coverage"] = [d / s for d, s in zip(dc, n_sol)]
    return out


def summarize_records(records: list[dict], task: Task | None = None, mode: str = "generate",
                      s: EvalSettings | None = None) -> dict:
    """Every metric with n and a 95% interval, from eval records (also used on files read back from disk)."""
    groups = group_by_example(records)
    k_max = min(len(g) for g in groups.values())
    m: dict[str, M.Metric | dict] = {}
    m["accuracy"] = _mean_accuracy(groups, lambda r: r["correct"])
    extractor_keys = sorted({k for r in records for k in r.get("correct_by", {})})
    for key in extractor_keys:
        m[f"accuracy/{key}"] = _mean_accuracy(groups, lambda r, key=key: r["correct_by"].get(key, False))
    m["invalid_rate"] = M.invalid_rate(r["valid"] for r in records)
    answers = [r["extracted"] for r in records]
    m["unique_answer_ratio"] = M.unique_answer_ratio(answers)
    m["answer_entropy_bits"] = M.answer_entropy(answers)
    top = Counter(a for a in answers if a is not None).most_common(1)
    m["top_answer_share"] = M.accuracy(a == top[0][0] for a in answers) if top else M.Metric(0.0, len(answers))
    if mode == "generate" and any(r.get("finish") in ("eos", "stop", "length") for r in records):
        m["truncation_rate"] = M.accuracy(r["finish"] == "length" for r in records)
        m["mean_new_tokens"] = M.mean_metric([r["new_tokens"] for r in records])
    if k_max > 1:
        counts = [(len(g), sum(bool(r["correct"]) for r in g)) for g in groups.values()]
        ks = sorted({1, *[2 ** i for i in range(1, 10) if 2 ** i <= k_max], k_max})
        for k in ks:
            m[f"pass@{k}"] = M.pass_at_k_metric(counts, k)
        for k, (name, per) in ((k, item) for k in ks[1:] for item in set_coverage(groups.values(), k).items()):
            m[f"{name}@{k}"] = M.mean_metric(per)
        m[f"maj@{k_max}"] = M.majority_accuracy([([r["extracted"] for r in g], [r["correct"] for r in g])
                                                 for g in groups.values()])
        outs = [[r["output"] for r in g] for g in groups.values()]
        m["unique_output_ratio"] = M.mean_metric([len(set(o)) / len(o) for o in outs])
        for n in (1, 2):
            d = D.distinct_n_corpus(outs, n)
            m[f"distinct_{n}"] = M.mean_metric(d["per_prompt"])
        sb = D.self_bleu_corpus(outs)
        m["self_bleu"] = M.mean_metric(sb["per_prompt"])
        if s is not None and s.semantic:
            sem = D.semantic_diversity(outs)
            m["semantic_diversity"] = M.mean_metric(sem["per_prompt"])
    metrics = {k: (v.to_dict() if isinstance(v, M.Metric) else v) for k, v in m.items()}
    out = {"metrics": metrics, "n_records": len(records), "samples_per_example": k_max}
    if k_max > 1:
        out["self_bleu_settings"] = D.BleuSettings().to_dict()
        out["distinct_tokenizer"] = "whitespace"
    prim = {r["extractor"] for r in records}
    out["extractor"] = sorted(prim)[0] if len(prim) == 1 else sorted(prim)
    out["extractors"] = extractor_keys
    return out


def flat_metrics(summary: dict, prefix: str | None = None) -> dict[str, float]:
    """{'eval/<task>/<metric>': value} for run.log(); NaNs dropped."""
    prefix = prefix or f"eval/{summary.get('task', 'task')}"
    out = {}
    for k, v in summary["metrics"].items():
        val = v.get("value") if isinstance(v, dict) else v
        if isinstance(val, (int, float)) and not math.isnan(val):
            out[f"{prefix}/{k}"] = float(val)
    return out


# ----------------------------------------------------------------------------- files and tables

def write_eval(root: str | Path, tag: str, records: list[dict], summary: dict) -> tuple[Path, Path]:
    """<root>/evals/<tag>.jsonl + .json, atomically (the lead's runs.write_eval)."""
    from reasonlab.runs import write_eval as _write

    return _write(root, tag, records, summary)


def format_table(summary: dict) -> str:
    """A plain-text table of every metric: value, 95% interval, n."""
    rows = [("metric", "value", "95% CI", "n")]
    for k, v in summary["metrics"].items():
        lo, hi = v.get("lo"), v.get("hi")
        ci = f"[{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "-"
        val = v.get("value")
        rows.append((k, f"{val:.4f}" if isinstance(val, float) else str(val), ci, str(v.get("n"))))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    head = (f"{summary.get('task')} [{summary.get('split')}] model={summary.get('model')} mode={summary.get('mode')} "
            f"examples={summary.get('n_examples')} samples={summary.get('samples_per_example')} "
            f"extractor={summary.get('extractor')} wall={summary.get('wall_time_s')}s")
    return head + "\n" + "\n".join(lines)


def read_records(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- models: hub ids, aliases, runs, exports

# lm-eval's --model_args keys we read (its HFLM's names); `step` is ours: which step_N of a run folder
MODEL_ARG_KEYS = ("pretrained", "revision", "dtype", "peft", "trust_remote_code", "step")
ModelKind = Literal["run", "export", "adapter", "hf"]


def parse_model_args(text: str | None) -> dict:
    """lm-eval's `key=value,key=value` (lm_eval.utils.simple_parse_args_string): 'true'/'false' -> bool, integers ->
    int, anything else a string. Unknown keys are a one-line error naming the known ones."""
    from reasonlab.errors import UserError

    out: dict = {}
    for item in (text or "").strip().split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UserError(f"--model_args item {item!r} is not key=value (e.g. revision=main,dtype=bfloat16)")
        if key not in MODEL_ARG_KEYS:
            import difflib

            close = difflib.get_close_matches(key, MODEL_ARG_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"--model_args key '{key}' is not supported: {hint}valid: {', '.join(MODEL_ARG_KEYS)}")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    if "trust_remote_code" in out and not isinstance(out["trust_remote_code"], bool):
        raise UserError("--model_args trust_remote_code must be True or False")
    if "dtype" in out and out["dtype"] not in (*DTYPE_NAMES, "auto"):
        raise UserError(f"--model_args dtype={out['dtype']} is not one of {', '.join((*DTYPE_NAMES, 'auto'))}")
    return out


DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSource:
    """Where `reasonlab eval --model X` takes its weights from (resolved and checked before anything loads).
    kind: run = a run folder (its checkpoints/best, the validation choice, or step_N), export = a `reasonlab export`
    language-model folder, adapter = a PEFT adapter folder or peft= on top of a base, hf = a hub id, embedded alias
    or Hugging Face model folder."""

    spec: str
    kind: ModelKind
    base: str  # what transformers loads first (the base model for run/adapter sources)
    dtype: str
    revision: str | None = None
    trust_remote_code: bool = False
    peft: str | None = None  # adapter folder / hub id applied on top of `base`
    run_cfg: object = None
    checkpoint: object = None  # reasonlab.runs.Checkpoint (kind run)
    info: dict = field(default_factory=dict)  # recorded in the summary

    def model_args(self) -> str:
        """The lm-eval style model_args string this source stands for (recorded in the lm-eval results file)."""
        parts = [f"pretrained={self.spec}", f"dtype={self.dtype}"]
        if self.revision:
            parts.append(f"revision={self.revision}")
        if self.peft:
            parts.append(f"peft={self.peft}")
        if self.trust_remote_code:
            parts.append("trust_remote_code=True")
        if self.checkpoint is not None:
            parts.append(f"step={self.checkpoint.step}")
        return ",".join(parts)


def resolve_model_source(spec: str, model_args: dict | None = None, dtype: str | None = None) -> ModelSource:
    """Decide what `spec` is and check it can load here: a run folder (config.yaml), an export folder
    (reasonlab_export.json), a PEFT adapter folder (adapter_config.json), else a model folder, hub id or embedded
    alias. Nothing is loaded; a problem is a one-line UserError."""
    from reasonlab.errors import UserError
    from reasonlab.export import lm_kind, open_run, read_export, run_checkpoint

    a = dict(model_args or {})
    spec = str(a.pop("pretrained", spec))
    if dtype and a.get("dtype") and dtype != a["dtype"]:
        raise UserError(f"--dtype {dtype} and --model_args dtype={a['dtype']} disagree: give one")
    want = a.get("dtype") or dtype or "auto"
    revision, peft, step = a.get("revision"), a.get("peft"), a.get("step")
    trust = bool(a.get("trust_remote_code", False))
    p = Path(spec).expanduser()
    if step is not None and not (p / "config.yaml").is_file():
        raise UserError(f"--model_args step={step} picks a checkpoint of a run folder, but {spec} is not one")
    if p.is_dir() and (p / "config.yaml").is_file():
        cfg, run_dir = open_run(p)
        kind = lm_kind(cfg)
        if kind is None:
            raise UserError(f"{spec} is a {cfg.method} run, not a language model: `reasonlab eval` evaluates language "
                            f"models; its own evals are in {spec}/evals/ (export it with `reasonlab export`)")
        if revision or peft:
            raise UserError(f"{spec} is a run folder: revision= and peft= are for hub models and adapters")
        ck = run_checkpoint(run_dir, step, step_flag="--model_args step=N")
        _check_base(cfg.model.name)
        return ModelSource(spec, "run", cfg.model.name, cfg.model.dtype if want == "auto" else want,
                           run_cfg=cfg, checkpoint=ck,
                           info={"run": str(run_dir), "checkpoint": ck.path.name, "step": ck.step,
                                 "base_model": cfg.model.name, "lora": kind == "lora"})
    meta = read_export(p) if p.is_dir() else None
    if meta is not None:
        if meta.get("kind") not in ("adapter", "merged", "full"):
            raise UserError(f"{spec} is a {meta.get('kind')} export, not a language model: load it with "
                            "reasonlab.export.load_trm_export")
        dt = (meta.get("dtype") or "float32") if want == "auto" else want
        info = {"export": str(p), "run_id": meta.get("run_id"), "checkpoint": meta.get("checkpoint"),
                "step": meta.get("step"), "export_kind": meta["kind"]}
        if meta["kind"] == "adapter":
            _check_base(meta["base_model"])
            return ModelSource(spec, "export", meta["base_model"], dt, peft=str(p), info=info)
        return ModelSource(spec, "export", str(p), dt, info=info)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{spec}/adapter_config.json names no base_model_name_or_path: pass "
                            f"--model BASE --model_args peft={spec}")
        _check_base(base)
        return ModelSource(spec, "adapter", base, "float32" if want == "auto" else want, peft=str(p),
                           revision=revision, trust_remote_code=trust)
    _check_base(spec)
    if peft is not None and not Path(peft).expanduser().is_dir() and _offline():
        from reasonlab.models.lm import is_available_offline

        if not is_available_offline(peft):
            raise UserError(f"peft={peft} is neither a local adapter folder nor cached, and HF_HUB_OFFLINE=1")
    return ModelSource(spec, "adapter" if peft else "hf", spec, "float32" if want == "auto" else want,
                       revision=revision, trust_remote_code=trust, peft=peft)


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _check_base(spec: str) -> None:
    """A model that cannot load offline fails here, in one line, before anything loads."""
    from reasonlab.models.lm import TINY, ModelUnavailable, is_available_offline, resolve_model_path

    if spec == TINY:
        return
    resolve_model_path(spec)  # a bad path or a missing embedded package: ModelUnavailable
    if _offline() and not is_available_offline(spec):
        raise ModelUnavailable(f"model '{spec}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: run "
                               f"`huggingface-cli download {spec}` where there is internet, or use a local folder")


def load_model(src: ModelSource, *, device="cpu"):
    """(model, tokenizer) in eval mode for a resolved ModelSource."""
    from reasonlab.models.lm import DTYPES, TINY, load_adapter, load_causal_lm, tiny_causal_lm

    if src.kind == "run":
        from reasonlab.export import build_lm

        return build_lm(src.run_cfg, src.checkpoint, device=device, dtype=src.dtype)
    if src.base == TINY:  # the seeded random test model (the base of tiny runs' adapters)
        model, tok = tiny_causal_lm()
        model = model.to(dtype=DTYPES[src.dtype], device=device)
    else:
        model, tok = load_causal_lm(src.base, dtype=src.dtype, device=device, revision=src.revision,
                                    trust_remote_code=src.trust_remote_code)
    if src.peft:
        model = load_adapter(model, src.peft, revision=src.revision if src.kind != "export" else None).to(device)
    return model.eval(), tok


# ----------------------------------------------------------------------------- lm-eval's results file

# lm-eval's gsm8k filters (lm_eval/tasks/gsm8k/gsm8k.yaml, gsm8k-cot.yaml): exact_match compares the filtered string
# with the target after regexes_to_ignore + ignore_case, as strings; our extractors of the same names return that
# normalized string, so the lm-eval value is string equality (ours compares numbers: "18.00" == "18")
LM_EVAL_STRING_FILTERS = ("strict-match", "flexible-extract", "cot-strict-match")
# our log-likelihood verdicts are lm-eval's multiple_choice metrics (filter "none")
LM_EVAL_LOGLIK = {"loglik-acc": "acc", "loglik-acc_norm": "acc_norm"}


def _lm_eval_scores(records: list[dict], key: str) -> tuple[str, str, list[float]]:
    """(metric, filter, per-document scores) of extractor `key` ('name@version') as lm-eval computes them: each
    document's score is the mean over its samples (one sample: 0 or 1)."""
    from reasonlab.eval.extract import lm_eval_gsm8k_normalize

    name = key.split("@")[0]
    if name in LM_EVAL_LOGLIK:
        metric, filt = LM_EVAL_LOGLIK[name], "none"
    else:
        metric, filt = "exact_match", name

    def score(r: dict) -> float:
        if name in LM_EVAL_STRING_FILTERS:
            pred = (r.get("extractions") or {}).get(key)
            return float(pred is not None and lm_eval_gsm8k_normalize(pred) == lm_eval_gsm8k_normalize(str(r["gold"])))
        return float(bool((r.get("correct_by") or {}).get(key, False)))

    per = [sum(score(r) for r in g) / len(g) for g in group_by_example(records).values()]
    return metric, filt, per


def _mean_stderr(xs: list[float]) -> float | str:
    """lm_eval.api.metrics.mean_stderr (sample std with n - 1, over sqrt n); 'N/A' for one item, as lm-eval."""
    n = len(xs)
    if n < 2:
        return "N/A"
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def lm_eval_results(records: list[dict], summary: dict, *, model_name: str, model_args: str, n_original: int,
                    device: str | None = None, batch_size: int | None = None, chat_template: str | None = None,
                    start_time: float | None = None) -> dict:
    """The aggregated results file lm-eval (0.4.x) writes, for one reasonlab eval: results[task] with
    "<metric>,<filter>" and "<metric>_stderr,<filter>" per extractor (exact_match for generated answers, acc /
    acc_norm for log-likelihood choices), group_subtasks, configs, versions, n-shot, higher_is_better, n-samples,
    config, git_hash, date and the run-time fields of its GeneralConfigTracker. Schema: lm_eval/evaluator.py
    (results_dict), evaluator_utils.py (consolidate_results; "samples" is popped before writing),
    loggers/evaluation_tracker.py (save_results_aggregated), api/metrics.py (mean, mean_stderr).

    Our 95% intervals (n, lo, hi) are not lm-eval fields: they go under the top-level "reasonlab" key, which lm-eval
    tooling ignores."""
    task = summary["task"]
    s = summary.get("settings") or {}
    gen = summary.get("generation") or {}
    mode = summary.get("mode", "generate")
    res: dict = {"alias": task}
    hib: dict = {}
    intervals: dict = {}
    metric_list = []
    filters = []
    groups = group_by_example(records)
    for key in sorted({k for r in records for k in r.get("correct_by", {})}):
        metric, filt, per = _lm_eval_scores(records, key)
        res[f"{metric},{filt}"] = sum(per) / len(per)
        res[f"{metric}_stderr,{filt}"] = _mean_stderr(per)
        m = (M.accuracy(p == 1.0 for p in per) if all(len(g) == 1 for g in groups.values())
             else M.mean_metric(per)).to_dict()
        intervals[f"{metric},{filt}"] = {k: m.get(k) for k in ("n", "lo", "hi", "method")}
        if metric not in hib:
            hib[metric] = True
            metric_list.append({"metric": metric, "aggregation": "mean", "higher_is_better": True})
        if filt != "none":
            filters.append({"name": filt, "filter": [{"function": "reasonlab-extractor", "extractor": key},
                                                     {"function": "take_first" if len(records) == len(groups)
                                                      else "mean-over-repeats"}]})
    output_type = "multiple_choice" if mode == "loglik" else "generate_until"
    task_cfg = {"task": task, "dataset_path": f"reasonlab:{task}", "test_split": summary.get("split"),
                "output_type": output_type, "num_fewshot": s.get("fewshot", 0), "metric_list": metric_list,
                "repeats": summary.get("samples_per_example", 1), "should_decontaminate": False,
                "metadata": {"version": summary.get("task_version"),
                             "reasonlab_harness": summary.get("harness_version"),
                             "prompt_template_sha256": summary.get("prompt_template_sha256"),
                             "prompt_style": s.get("style"), "chat": s.get("chat")}}
    if output_type == "generate_until":
        task_cfg["generation_kwargs"] = {"until": list(gen.get("stop") or []),
                                         "do_sample": gen.get("temperature", 0) > 0,
                                         "temperature": gen.get("temperature", 0.0), "top_p": gen.get("top_p", 1.0),
                                         "max_gen_toks": gen.get("max_new_tokens")}
        task_cfg["filter_list"] = filters
    created = summary.get("created")
    date = start_time if start_time is not None else time.time()
    git = summary.get("git") or {}
    wall = summary.get("wall_time_s") or 0.0
    sanitized = re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", model_name)  # lm_eval.utils.sanitize_model_name
    return {
        "results": {task: res},
        "group_subtasks": {task: []},
        "configs": {task: task_cfg},
        "versions": {task: summary.get("task_version")},
        "n-shot": {task: s.get("fewshot", 0)},
        "higher_is_better": {task: hib},
        "n-samples": {task: {"original": n_original, "effective": summary.get("n_examples", len(groups))}},
        "config": {"model": "reasonlab", "model_args": model_args, "batch_size": batch_size, "batch_sizes": [],
                   "device": device, "use_cache": None, "limit": summary.get("limit"), "bootstrap_iters": 0,
                   "gen_kwargs": None, "random_seed": s.get("seed"), "numpy_seed": None, "torch_seed": None,
                   "fewshot_seed": None},
        "git_hash": (git.get("sha") or "")[:7] or None,
        "date": date,
        "task_hashes": {},
        "model_source": "reasonlab",
        "model_name": model_name,
        "model_name_sanitized": sanitized,
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": False,
        "chat_template": chat_template if s.get("chat") else None,
        "chat_template_sha": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template and s.get("chat")
        else None,
        "start_time": date,
        "end_time": date + wall,
        "total_evaluation_time_seconds": str(wall),
        "reasonlab": {"summary": f"{summary.get('tag', '')}.json", "created": created, "intervals": {task: intervals},
                      "note": "exact_match of strict-match / flexible-extract / cot-strict-match compares strings "
                              "as lm-eval does; evals/<tag>.json compares numbers"},
    }


def write_lm_eval_results(root: str | Path, tag: str, results: dict) -> Path:
    """<root>/evals/lm_eval/results_<tag>.json (lm-eval's file name pattern, results_*.json; a folder of its own so
    readers of evals/*.json see only reasonlab summaries), written atomically."""
    from reasonlab.runs import _atomic_write_text

    d = Path(root) / "evals" / "lm_eval"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"results_{tag}.json"
    _atomic_write_text(path, json.dumps(results, indent=2, default=str, ensure_ascii=False) + "\n")
    return path
