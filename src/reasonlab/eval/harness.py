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
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
             task_kwargs: dict | None = None, compute=None, sampler=None, **overrides) -> tuple[list[dict], dict]:
    """Evaluate `model` on the first `limit` examples of `task`/`split`. Returns (records, summary).

    `settings` or keyword overrides (temperature=..., style=...) configure prompts and sampling. `examples` replaces
    the task's own examples (e.g. a fixed validation subset a recipe picked once). `compute` (reasonlab.training):
    the examples are split over its processes and the records gathered, in order, on every rank. `sampler`: a
    generation backend (reasonlab.eval.generate.make_sampler); default the own loop on `model`.
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
            part, _run_generate(model, tok, task, part, s, sampler, off)[0]))
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
    return {"id": e.id, "sample": sample, "prompt": prompt, "output": output, "extracted": sc.extracted,
            "gold": e.gold, "correct": bool(sc.correct), "valid": bool(sc.valid), "extractor": sc.extractor,
            "extractions": sc.extractions, "correct_by": sc.correct_by, **extra}


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
                  offset: int = 0) -> tuple[list[dict], int]:
    from reasonlab.eval.generate import encode, prompt_seeds

    prompts = [format_prompt(tok, task.prompt(e, s.style), s.chat) for e in exs]
    gc = s.gen_config()
    seeds = prompt_seeds(gc.seed, len(exs), offset)  # per example: the same samples however the split is sharded
    if sampler is None:
        out = generate(model, tok, prompts, gc, chat=s.chat, seeds=seeds)
    else:
        out = sampler.generate(encode(tok, prompts, s.chat), gc, seeds=seeds)
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
        for k in sorted({1, *[2 ** i for i in range(1, 10) if 2 ** i <= k_max], k_max}):
            m[f"pass@{k}"] = M.pass_at_k_metric(counts, k)
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
