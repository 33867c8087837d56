"""Read a run folder (the DESIGN.md contract) into one object the detectors, report and compare share.

What diagnostics read, and the conventions a recipe follows so they can (recipe authors: this is your checklist;
tests/tinyrun.py has small recipes that follow all of it):

  config.yaml, env.json, summary.json, metrics.jsonl, events.jsonl   written by reasonlab.runs.Run; summary.json
      exists only when the run ended through run.finish(...) (a killed run has none: `run_unfinished`).
  metrics.jsonl names: see reasonlab.diagnostics.detectors (grad/term/*, ppo/*, rollout/*, encoder/*, train/acc).
  events.jsonl: written by reasonlab.watch.Watcher (kind = the condition, severity error|warning|info).
  evals/<tag>.jsonl + <tag>.json                                     run.write_eval(tag, records, summary)
      records: {"id", "prompt", "output", "extracted", "gold", "correct", "valid", "extractor", ...}; several
               records per id = several samples. "extracted" is None when nothing was extracted (valid: false).
      summary: metrics as {"value", "n", "lo", "hi", "method"} dicts (eval.metrics.Metric.to_dict()), at the top
               level or under "metrics"; the primary one is named "accuracy" (or "acc", "pass@1", ...: see
               PRIMARY_METRICS), its "n" = evaluated examples (not the full split: `subset_denominator`). Also put
               "split" ("train" | "val" | "test"), "step" (the training step the evaluated weights come from, or the
               run's last step for the final eval of a selected checkpoint), "task", and for the evals of the weights
               the run ends with (final val, and the one test eval): "final": true.
               Bridge controls: "control": "shuffled_source" | "zero_source" | "target_text" and "base": the tag of
               the eval they control for, on the same ids (a bridge run without the first two: `controls_missing`).
               TRM-style records carry "task" (one record per test output) and "correct@k": the headline pass@k is
               recomputed per task from them, so its n is the number of tasks evaluated.
      tag (fallback when the summary lacks those keys): "<split>[.<task>]@step_<N>" | "<split>[.<task>]@final",
               controls "<base tag>+control=<name>"; e.g. "val.gsm8k@step_200", "test@final+control=zero_source".
               The sft/trm recipes' "val_step200" / "test_best_step120" parse too (split from the first word,
               step from "step<N>"), but without "final": true the final eval is recognized only by its step.
      Periodic evals are judged by the report as a curve; only the latest eval per split is judged for power
      (n >= 100 and a 95% CI half-width <= 5 points by default).
  data/train_ids.txt (one example id per line) or data/train_ids.json (a JSON list): every training example id,
      written once by the recipe (`reasonlab.watch.record_train_ids(run, ids)`); the leakage detector
      intersects it with the ids of every val/test eval, so eval ids must be the same strings as training ids;
      demonstrations trained on are "<task>/demo<j>" and are matched by task against eval records' "task" (or
      their id's "<task>/" prefix). A held-out eval that trains on its tasks' demonstrations by design says so with
      "split_mode": "transductive" in its summary; a task's own content check goes in its "leakage" field
      ({split: {"id_overlap", "pair_overlap"} or {"problems"}}).
  checkpoints/<name>/ with manifest.json, checksums.json (sha256 per parameter, all parameters), state.json;
      module.<m>.safetensors holds the trainable parameters (params="trainable"), so a parameter listed in
      checksums.json but absent from the safetensors file is frozen. With params="all" put
      state={"frozen": ["decoder", ...]} (parameter-name prefixes) in save_checkpoint, else nothing can be said
      about frozen modules. Keep at least two step_<N> checkpoints at different steps (e.g. one per periodic eval):
      frozen/trainable checks compare consecutive checkpoints. The validation-chosen checkpoint is `name="best"`
      with state={"selected_on": "val", "metric": "eval/val/acc"}.
  report.md, plots/*.png, findings.json: written by `reasonlab report RUN`, and by `reasonlab run` once the run has
      ended (recipes do not write it: before run.finish() the report could only say "unfinished").
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from reasonlab.tracking import read_jsonl

HELD_OUT = ("val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "eval": "val", "heldout": "test",
                  "train": "train", "val": "val", "test": "test"}
PRIMARY_METRICS = ("accuracy", "acc", "pass@1", "exact_accuracy", "pass@2")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    return None


@dataclass
class EvalFile:
    tag: str
    summary: dict
    jsonl: Path
    _records: list[dict] | None = None

    @property
    def records(self) -> list[dict]:
        if self._records is None:
            self._records = read_jsonl(self.jsonl) if self.jsonl.exists() else []
        return self._records

    @property
    def split(self) -> str | None:
        s = self.summary.get("split")
        if isinstance(s, str):
            return _SPLIT_ALIASES.get(s.lower(), s.lower())
        head = re.split(r"[@.+_\-=]", self.tag, maxsplit=1)[0].lower()
        return _SPLIT_ALIASES.get(head)

    @property
    def step(self) -> int | None:
        s = self.summary.get("step")
        if isinstance(s, int) and not isinstance(s, bool):
            return s
        m = re.search(r"step[_=]?(\d+)", self.tag)
        return int(m.group(1)) if m else None

    @property
    def final(self) -> bool:
        return bool(self.summary.get("final")) or "final" in self.tag.split("+")[0]

    @property
    def control(self) -> str | None:
        c = self.summary.get("control")
        if isinstance(c, str) and c:
            return c
        m = re.search(r"\+control=([A-Za-z0-9_.-]+)", self.tag)
        return m.group(1) if m else None

    @property
    def reference(self) -> str | None:
        """The summary's "role" when this eval is of another model kept for reference (bridge: "source_alone", the
        source model alone on the text): neither the run's model nor a control of it."""
        r = self.summary.get("role")
        return r if isinstance(r, str) and r else None

    @property
    def own(self) -> bool:
        """An eval of the run's own model: not a control, not a reference."""
        return self.control is None and self.reference is None

    @property
    def base_tag(self) -> str:
        b = self.summary.get("base")
        return b if isinstance(b, str) and b else self.tag.split("+control=")[0]

    def metric(self, name: str) -> dict | None:
        """A {"value", "n", "lo", "hi"} dict for metric `name` from the summary, or None."""
        for src in (self.summary, self.summary.get("metrics") or {}):
            v = src.get(name) if isinstance(src, dict) else None
            if isinstance(v, dict) and _num(v.get("value")) is not None:
                return v
        return None

    def unit_scores(self, name: str) -> dict[str, float] | None:
        """{unit: score} of metric `name` recomputed from the records, or None when the records cannot give it.
        Units are example ids; records that carry a "task" (TRM/ARC: one record per test output of a task) are
        scored per task, as the TRM evaluator does: a task's pass@k is the mean over its test outputs of
        "correct" (k = 1) or "correct@k"."""
        recs = [r for r in self.records if "id" in r and "correct" in r]
        if not recs:
            return None
        m = re.fullmatch(r"pass@(\d+)", name)
        k = int(m.group(1)) if m else None
        if name not in ("accuracy", "acc") and k is None:
            return None
        if k is not None and all("task" in r for r in recs):
            key = "correct" if k == 1 else f"correct@{k}"
            if not all(key in r for r in recs):
                return None
            by_task: dict[str, list[float]] = {}
            for r in recs:
                by_task.setdefault(str(r["task"]), []).append(float(bool(r[key])))
            return {t: sum(v) / len(v) for t, v in by_task.items()}
        if k is None or k == 1:
            return self.per_id_correct()
        from reasonlab.eval.metrics import pass_at_k

        counts: dict[str, list[int]] = {}
        for r in recs:
            c = counts.setdefault(str(r["id"]), [0, 0])
            c[0] += 1
            c[1] += bool(r["correct"])
        if any(n < k for n, _ in counts.values()):
            return None
        return {i: pass_at_k(n, c, k) for i, (n, c) in counts.items()}

    def recomputed(self, name: str) -> dict | None:
        """Metric `name` recomputed from the records as a Metric dict (value, n = units evaluated, 95% CI: Wilson
        when every unit scores 0 or 1, else the bounded bootstrap of eval.metrics.mean_metric), or None."""
        from reasonlab.eval.metrics import accuracy, mean_metric

        per = self.unit_scores(name)
        if not per:
            return None
        vals = list(per.values())
        if all(v in (0.0, 1.0) for v in vals):
            return accuracy(v == 1.0 for v in vals).to_dict()
        return mean_metric(vals, bounds=(0.0, 1.0)).to_dict()

    @cached_property
    def primary(self) -> tuple[str, dict] | None:
        """(name, metric dict) of the headline metric. Its interval is replaced by one recomputed from the records
        when the summary has none or a degenerate one (a percentile bootstrap of all-0 or all-1 outcomes gives
        [0, 0]: 0/100 correct is not known to be exactly 0), as long as the records give the same value and n;
        without a summary metric, accuracy from the records."""
        for name in PRIMARY_METRICS:
            m = self.metric(name)
            if m is None:
                continue
            lo, hi, n = m.get("lo"), m.get("hi"), m.get("n") or 0
            if lo is None or hi is None or (lo == hi and n > 1):
                r = self.recomputed(name)
                if r is not None and r["n"] == n and abs(r["value"] - m["value"]) < 1e-9:
                    why = "missing" if lo is None else "degenerate"
                    m = {**m, "lo": r["lo"], "hi": r["hi"],
                         "method": f"{r['method']} (from records; summary CI was {why})"}
            return name, m
        r = self.recomputed("accuracy")
        return ("accuracy", r) if r else None

    def per_id_correct(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        cnt: dict[str, int] = {}
        for r in self.records:
            if "id" in r and "correct" in r:
                k = str(r["id"])
                sums[k] = sums.get(k, 0.0) + float(bool(r["correct"]))
                cnt[k] = cnt.get(k, 0) + 1
        return {k: sums[k] / cnt[k] for k in sums}

    def record_accuracy(self) -> float | None:
        per = self.per_id_correct()
        return sum(per.values()) / len(per) if per else None

    def ids(self) -> set[str]:
        return {str(r["id"]) for r in self.records if "id" in r}


@dataclass
class CheckpointInfo:
    name: str
    path: Path
    step: int
    checksums: dict[str, str]
    trainable: set[str] | None  # names "<module>.<param>" saved as trainable; None when unknown
    state: dict = field(default_factory=dict)


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a .safetensors header (8-byte little-endian length + JSON) without loading tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


class RunFolder:
    """Lazy reader of one run folder. Every accessor tolerates a missing file (a killed run is still a run)."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not self.dir.is_dir():
            from reasonlab.errors import UserError

            raise UserError(f"{self.dir} is not a run folder (no such directory)")

    def _json(self, name: str) -> dict | None:
        p = self.dir / name
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except (json.JSONDecodeError, OSError):
            return None

    @cached_property
    def config(self) -> dict:
        import yaml

        p = self.dir / "config.yaml"
        try:
            return (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}
        except yaml.YAMLError:
            return {}

    @cached_property
    def env(self) -> dict:
        return self._json("env.json") or {}

    @cached_property
    def summary(self) -> dict | None:
        return self._json("summary.json")

    @cached_property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.dir / "metrics.jsonl")

    @cached_property
    def events(self) -> list[dict]:
        return read_jsonl(self.dir / "events.jsonl")

    @cached_property
    def _columns(self) -> dict[str, tuple[list[int], list[float]]]:
        """One pass over metrics.jsonl: {key: (steps, values)} for every numerically logged key (NaN/inf kept)."""
        cols: dict[str, tuple[list[int], list[float]]] = {}
        for i, row in enumerate(self.metrics):
            step = int(row.get("step", i)) if _num(row.get("step", i)) is not None else i
            for k, v in row.items():
                if k in ("step", "time"):
                    continue
                cols.setdefault(k, ([], []))
                x = _num(v)
                if x is not None:
                    cols[k][0].append(step)
                    cols[k][1].append(x)
        return cols

    def keys(self) -> list[str]:
        """Logged metric names in first-seen order."""
        return list(self._columns)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) where `key` was logged with a number (NaN/inf kept); copies, safe to modify."""
        steps, vals = self._columns.get(key, ([], []))
        return list(steps), list(vals)

    def keys_matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [k for k in self.keys() if rx.search(k)]

    @property
    def last_step(self) -> int | None:
        steps = [int(r["step"]) for r in self.metrics if isinstance(r.get("step"), int) and r["step"] >= 0]
        return max(steps) if steps else None

    @cached_property
    def evals(self) -> list[EvalFile]:
        d = self.dir / "evals"
        out = []
        for js in sorted(d.glob("*.json")) if d.exists() else []:
            try:
                summ = json.loads(js.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            out.append(EvalFile(js.stem, summ if isinstance(summ, dict) else {}, js.with_suffix(".jsonl")))
        return sorted(out, key=lambda e: (e.step if e.step is not None else (10**12 if e.final else -1), e.tag))

    def evals_for(self, split: str, controls: bool = False) -> list[EvalFile]:
        return [e for e in self.evals if e.split == split and (controls or e.own)]

    @cached_property
    def train_ids(self) -> set[str] | None:
        txt, js = self.dir / "data" / "train_ids.txt", self.dir / "data" / "train_ids.json"
        if txt.exists():
            return {line.strip() for line in txt.read_text().splitlines() if line.strip()}
        if js.exists():
            data = json.loads(js.read_text())
            return {str(x) for x in (data.get("ids", []) if isinstance(data, dict) else data)}
        return None

    @cached_property
    def checkpoints(self) -> list[CheckpointInfo]:
        d = self.dir / "checkpoints"
        out = []
        for p in sorted(d.iterdir()) if d.exists() else []:
            mf = p / "manifest.json"
            if not p.is_dir() or p.name.startswith(".") or not mf.exists():
                continue
            try:
                manifest = json.loads(mf.read_text())
                sums = json.loads((p / "checksums.json").read_text()) if (p / "checksums.json").exists() else {}
                state = json.loads((p / "state.json").read_text()) if (p / "state.json").exists() else {}
            except (json.JSONDecodeError, OSError):
                continue
            trainable: set[str] | None = set()
            for st in p.glob("module.*.safetensors"):
                mod = st.name[len("module."):-len(".safetensors")]
                trainable.update(f"{mod}.{k}" for k in safetensors_keys(st))
            frozen_prefixes = state.get("frozen")
            if isinstance(frozen_prefixes, list):  # params="all": the recipe names what it froze
                trainable = {n for n in sums if not any(n.startswith(f) or f".{f}." in f".{n}" for f in frozen_prefixes)}
            elif trainable and sums and trainable > set(sums):  # params="all" (buffers too): frozen set unknown
                trainable = None
            elif trainable:
                trainable &= set(sums)
            out.append(CheckpointInfo(p.name, p, int(manifest.get("step", state.get("step", -1))), sums, trainable,
                                      state))
        return sorted(out, key=lambda c: (c.step, c.name != "best"))

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "unfinished")


def open_run_folder(path: str | Path) -> RunFolder:
    """A RunFolder, or a one-line UserError when `path` is not one (for the CLI and report entry points)."""
    from reasonlab.errors import UserError

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} is not a run folder (no such directory): pass runs/<run_id>")
    if not any((p / n).exists() for n in ("config.yaml", "metrics.jsonl", "evals", "summary.json")):
        raise UserError(f"{p} is not a run folder (no config.yaml, metrics.jsonl, evals/ or summary.json): "
                        "pass runs/<run_id>")
    return RunFolder(p)


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
