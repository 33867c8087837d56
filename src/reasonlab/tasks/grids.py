"""Grid puzzles as TRM sequences: encoding, invertible augmentation, voting, pass@k, ARC scoring, submission.json.

    seq = encode_grid(grid)                        # (900,) int64: 30x30, PAD 0, EOS 1, colour c -> c + 2
    grid = decode_grid(seq)                        # top-left rectangle of colours (None if empty)
    aug = Augmentation.random(rng)                 # dihedral (8) x colour permutation (0 kept fixed by default)
    aug.apply(g); aug.invert(aug.apply(g)) == g;   Augmentation.from_id(aug.id) == aug
    ranked = vote([Candidate(grid, q_halt), ...])  # group equal grids; rank by votes, then mean sigmoid(Q-halt)
    pass_at_k(ranked_by_task, gold_by_task, ks)    # per-task credit = mean over its test outputs; / tasks EVALUATED
    write_submission(path, ranked_by_task)         # {"task": [{"attempt_1": grid, "attempt_2": grid}, ...]}

Layout (as the paper's data builder): the grid sits at the top-left (or at a random offset, `translate`, on train
only), an EOS row below it and an EOS column right of it mark its size, PAD fills the rest. Labels mark PAD as
IGNORE (-100) so the loss sees colours and EOS only.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD, EOS, COLOR0 = 0, 1, 2
VOCAB_SIZE = 12
MAX_SIZE = 30
IGNORE_LABEL_ID = -100

# dihedral group D4: id -> transform; DIHEDRAL_INVERSE[i] undoes i
_DIHEDRAL = (
    lambda g: g,                       # 0 identity
    lambda g: np.rot90(g, 1),          # 1 rotate 90 (counter-clockwise)
    lambda g: np.rot90(g, 2),          # 2 rotate 180
    lambda g: np.rot90(g, 3),          # 3 rotate 270
    lambda g: np.fliplr(g),            # 4 horizontal flip
    lambda g: np.flipud(g),            # 5 vertical flip
    lambda g: g.T,                     # 6 transpose (main diagonal)
    lambda g: np.rot90(g, 2).T,        # 7 anti-diagonal transpose
)
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    return np.ascontiguousarray(_DIHEDRAL[k](grid))


# ------------------------------------------------------------------------------------------------------ augmentation

@dataclass(frozen=True)
class Augmentation:
    """A dihedral transform `k` followed by a colour map `perm` (colour c -> perm[c]); invertible, with a string id."""
    k: int = 0
    perm: tuple[int, ...] = tuple(range(10))

    @property
    def id(self) -> str:
        return f"t{self.k}_" + "".join(str(c) for c in self.perm)

    @classmethod
    def from_id(cls, aug_id: str) -> "Augmentation":
        t, p = aug_id.split("_")
        return cls(int(t[1:]), tuple(int(c) for c in p))

    @classmethod
    def random(cls, rng: random.Random, keep_background: bool = True) -> "Augmentation":
        """Uniform dihedral x colour permutation; colour 0 (ARC's black background) stays fixed by default."""
        colours = list(range(1, 10)) if keep_background else list(range(10))
        rng.shuffle(colours)
        perm = tuple([0] + colours) if keep_background else tuple(colours)
        return cls(rng.randrange(8), perm)

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and self.perm == tuple(range(10))

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return np.asarray(self.perm, dtype=grid.dtype)[dihedral(grid, self.k)]

    def invert(self, grid: np.ndarray) -> np.ndarray:
        inv = np.argsort(np.asarray(self.perm)).astype(grid.dtype)  # inv[perm[c]] = c
        return dihedral(inv[grid], DIHEDRAL_INVERSE[self.k])


def augmentations(n: int, seed: int | str, keep_background: bool = True, dihedral: bool = True) -> list[Augmentation]:
    """Identity first, then n-1 distinct random augmentations (deterministic in seed). dihedral=False: colour
    permutations only (for rule families that a dihedral transform would map onto another rule)."""
    rng = random.Random(f"aug/{seed}")
    out, seen = [Augmentation()], {Augmentation().id}
    for _ in range(100 * n):
        if len(out) >= n:
            break
        a = Augmentation.random(rng, keep_background)
        if not dihedral:
            a = Augmentation(0, a.perm)
        if a.id not in seen:
            seen.add(a.id)
            out.append(a)
    return out


# ---------------------------------------------------------------------------------------------------------- encoding

def encode_grid(grid: np.ndarray, offset: tuple[int, int] = (0, 0), size: int = MAX_SIZE) -> np.ndarray:
    """(size*size,) tokens: colours at `offset`, EOS row below and EOS column right of the grid, PAD elsewhere."""
    h, w = grid.shape
    r0, c0 = offset
    if h + r0 > size or w + c0 > size or h == 0 or w == 0:
        raise ValueError(f"grid {h}x{w} at offset {offset} does not fit a {size}x{size} canvas")
    canvas = np.full((size, size), PAD, dtype=np.int64)
    canvas[r0:r0 + h, c0:c0 + w] = np.asarray(grid, dtype=np.int64) + COLOR0
    if r0 + h < size:
        canvas[r0 + h, c0:c0 + w] = EOS
    if c0 + w < size:
        canvas[r0:r0 + h, c0 + w] = EOS
    return canvas.reshape(-1)


def encode_label(grid: np.ndarray, offset: tuple[int, int] = (0, 0), size: int = MAX_SIZE) -> np.ndarray:
    """Like encode_grid, with PAD positions set to IGNORE_LABEL_ID (the loss skips them)."""
    seq = encode_grid(grid, offset, size)
    return np.where(seq == PAD, IGNORE_LABEL_ID, seq)


def random_offset(shapes: list[tuple[int, int]], rng: random.Random, size: int = MAX_SIZE) -> tuple[int, int]:
    """A translation that keeps every grid of a pair (and its EOS border) on the canvas."""
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    return rng.randint(0, max(0, size - h - 1)), rng.randint(0, max(0, size - w - 1))


def decode_grid(seq: np.ndarray, size: int = MAX_SIZE) -> np.ndarray | None:
    """The largest top-left rectangle of colour tokens (the paper's crop), as colours 0..9; None if (0,0) is not one."""
    canvas = np.asarray(seq).reshape(size, size)
    is_colour = (canvas >= COLOR0) & (canvas < COLOR0 + 10)
    best, best_hw, width = 0, (0, 0), size
    for r in range(size):
        row = is_colour[r, :width]
        run = int(np.argmin(row)) if not row.all() else width  # leading colour cells in this row
        width = min(width, run)
        if width == 0:
            break
        if (r + 1) * width > best:
            best, best_hw = (r + 1) * width, (r + 1, width)
    if best == 0:
        return None
    h, w = best_hw
    return (canvas[:h, :w] - COLOR0).astype(np.int64)


def grid_key(grid: np.ndarray | None) -> str:
    """Hash of a grid's shape and cells (for voting, de-duplication and leakage checks)."""
    if grid is None:
        return "none"
    g = np.asarray(grid, dtype=np.int8)
    return hashlib.sha1(f"{g.shape}".encode() + g.tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------------ voting

@dataclass
class Candidate:
    grid: np.ndarray | None  # predicted grid, already inverted to the original frame
    q_halt: float            # Q-halt LOGIT of the prediction (vote() turns it into a probability)


@dataclass
class Ranked:
    grid: np.ndarray
    votes: int
    confidence: float  # mean over the votes of sigmoid(Q-halt logit), in [0, 1]


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) in float64 without overflow (the official evaluator casts q_halt to float64 first)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def vote(candidates: list[Candidate]) -> list[Ranked]:
    """Group equal grids; rank by number of votes, ties broken by the mean of sigmoid(Q-halt logit) over a grid's
    votes, as the official evaluator (SamsungSAILMontreal/TinyRecursiveModels evaluators/arc.py: `q_values =
    q_halt_logits.to(float64).sigmoid()`, then sorted by [count, mean q] descending, a stable sort). The mean of the
    sigmoid is not the sigmoid of the mean logit: one very confident vote counts at most 1, so [10, -1] (mean
    probability 0.63) ranks below [2, 2] (0.88) although its mean logit is higher. Undecodable predictions drop."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        if c.grid is not None:
            groups.setdefault(grid_key(c.grid), []).append(c)
    ranked = [Ranked(g[0].grid, len(g), sum(sigmoid(float(c.q_halt)) for c in g) / len(g))
              for g in groups.values()]
    ranked.sort(key=lambda r: (r.votes, r.confidence), reverse=True)  # stable: equal keys keep arrival order
    return ranked


# ----------------------------------------------------------------------------------------------------------- scoring

def task_credit(ranked: list[list[Ranked]], gold: list[np.ndarray], k: int) -> float:
    """Mean over a task's test outputs of [gold among the top-k ranked]; a missing prediction scores 0."""
    hits = 0
    for i, g in enumerate(gold):
        top = ranked[i][:k] if i < len(ranked) else []
        hits += any(r.grid.shape == g.shape and np.array_equal(r.grid, g) for r in top)
    return hits / len(gold)


def pass_at_k(ranked_by_task: dict[str, list[list[Ranked]]], gold_by_task: dict[str, list[np.ndarray]],
              ks: tuple[int, ...] = (1, 2, 5, 10)) -> dict[str, float]:
    """pass@k over the tasks EVALUATED (keys of ranked_by_task): sum of task credits / number of those tasks.
    (The official evaluator divides by every task in the split, so a subset score reads low.)"""
    tasks = list(ranked_by_task)
    if not tasks:
        raise ValueError("pass_at_k: no evaluated tasks")
    missing = [t for t in tasks if t not in gold_by_task]
    if missing:
        raise KeyError(f"no gold outputs for evaluated task {missing[0]!r}")
    out = {f"pass@{k}": sum(task_credit(ranked_by_task[t], gold_by_task[t], k) for t in tasks) / len(tasks)
           for k in ks}
    out["n_tasks"] = len(tasks)
    return out


def arc_score(ranked_by_task, gold_by_task) -> float:
    """The ARC Prize metric: two attempts per test output, a task's score averaged over its test outputs."""
    return pass_at_k(ranked_by_task, gold_by_task, ks=(2,))["pass@2"]


def write_submission(path: str | Path, ranked_by_task: dict[str, list[list[Ranked]]],
                     n_outputs: dict[str, int] | None = None) -> Path:
    """Kaggle/ARC Prize submission.json: {task_id: [{"attempt_1": grid, "attempt_2": grid} per test output]}.
    Missing attempts repeat the first (or [[0]] when the model produced nothing decodable)."""
    sub = {}
    for task, outputs in ranked_by_task.items():
        n = (n_outputs or {}).get(task, len(outputs))
        entries = []
        for i in range(n):
            grids = [r.grid.tolist() for r in (outputs[i] if i < len(outputs) else [])[:2]]
            grids = grids or [[[0]]]
            entries.append({"attempt_1": grids[0], "attempt_2": grids[1] if len(grids) > 1 else grids[0]})
        sub[task] = entries
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sub))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------- dataset

@dataclass
class EvalSplit:
    """Queries of one evaluation split. Query q is pool row idx[q]: test output `out_index[q]` of task `task[q]`
    under augmentation `aug[q]` (None: not augmented, compare tokens directly)."""
    idx: np.ndarray                      # (E,) pool rows
    task: list[str]
    out_index: list[int]
    aug: list[Augmentation | None]
    gold: dict[str, list[np.ndarray]]    # task -> gold outputs in the original frame (grids, or label tokens)


@dataclass
class PuzzleDataset:
    """Every sequence lives once in a pool; training samples, demos and eval queries index into it.

    inputs/labels are uint8 (tokens < 255; label 255 = IGNORE) to keep paper-scale augmentation in memory;
    `batch()` returns int64 tensors with IGNORE_LABEL_ID. `demo_idx[pid]` lists the pool rows of the demonstration
    pairs of puzzle id `pid` (-1 padded) for encoder conditioning (ETRM); a row that is one of those demos has it
    masked out of its own batch entry (leave-one-out), or the encoder could copy the answer. `train_ids` are the example ids of
    everything trained on ("<task>/demo<j>", "<task>/<test index>"), in the id space of the eval records
    ("<task>/<test index>"), for the run folder's leakage detector."""
    inputs: np.ndarray                   # (M, L) uint8
    labels: np.ndarray                   # (M, L) uint8, 255 = ignore
    pid: np.ndarray                      # (M,) int64 puzzle id (task x augmentation) of each row
    train_idx: np.ndarray                # (N,) pool rows used as training samples
    demo_idx: np.ndarray                 # (P, K) int64, -1 = no demo
    evals: dict[str, EvalSplit]
    num_puzzle_ids: int
    seq_len: int
    vocab_size: int
    kind: str = "grid"                   # grid: decode canvases and invert augmentations | flat: tokens as is
    canvas: int = MAX_SIZE               # grid: side of the square canvas (seq_len = canvas^2)
    info: dict = None
    train_ids: list[str] = None

    def batch(self, rows, with_demos: bool = False) -> dict:
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        lab = self.labels[rows].astype(np.int64)
        out = {"inputs": torch.from_numpy(self.inputs[rows].astype(np.int64)),                   # (B, L)
               "labels": torch.from_numpy(np.where(lab == 255, IGNORE_LABEL_ID, lab)),           # (B, L)
               "puzzle_ids": torch.from_numpy(self.pid[rows])}                                     # (B,)
        if with_demos:
            d = self.demo_idx[self.pid[rows]]                                                      # (B, K)
            safe = np.where(d < 0, 0, d)
            dl = self.labels[safe].astype(np.int64)                                                # (B, K, L)
            out["demo_inputs"] = torch.from_numpy(self.inputs[safe].astype(np.int64))             # (B, K, L)
            out["demo_outputs"] = torch.from_numpy(np.where(dl == 255, PAD, dl))                   # (B, K, L) tokens
            # leave-one-out: a training row that is itself a demo of its puzzle never sees its own answer
            out["demo_mask"] = torch.from_numpy((d >= 0) & (d != rows[:, None]))                  # (B, K)
        return out

    def decode(self, tokens: np.ndarray, aug: Augmentation | None) -> np.ndarray | None:
        """A predicted token sequence -> answer in the original frame (None when no grid can be read)."""
        if self.kind == "flat":
            return np.asarray(tokens, dtype=np.int64)
        g = decode_grid(tokens, self.canvas)
        return None if g is None else (aug.invert(g) if aug is not None else g)


def build_grid_dataset(train_tasks: list, demo_only_tasks: list, eval_tasks: dict[str, list], n_aug: int = 8,
                       seed: int = 0, translate: bool = True, max_demos: int = 10, canvas: int = MAX_SIZE,
                       dihedral: bool = True) -> PuzzleDataset:
    """Pool every (task x augmentation) of GridTask-like objects (id, demos, tests).

    train_tasks      demos and tests are training samples
    demo_only_tasks  demos are training samples, tests are not (transductive evaluation tasks)
    eval_tasks       split -> tasks whose tests are queries (every augmentation; voted after inversion)
    Training rows get a random translation when `translate`; demos and queries sit at the top-left.
    `canvas` is the side of the square canvas (ARC: 30); every grid must fit with its EOS border (side <= canvas-1
    unless it fills the canvas exactly)."""
    rng = random.Random(f"grid-dataset/{seed}")
    inputs, labels, pids, train_rows = [], [], [], []
    demo_rows: list[list[int]] = []
    queries: dict[str, list] = {}
    all_tasks: dict[str, object] = {}
    for t in list(train_tasks) + list(demo_only_tasks) + [t for ts in eval_tasks.values() for t in ts]:
        all_tasks.setdefault(t.id, t)
    train_ids = {t.id for t in train_tasks}
    demo_ids = {t.id for t in demo_only_tasks}
    query_of = {t.id: s for s, ts in eval_tasks.items() for t in ts}
    trained_on: list[str] = []

    def add(inp, out, pid, offset=(0, 0)) -> int:
        inputs.append(encode_grid(inp, offset, canvas).astype(np.uint8))
        lab = encode_label(out, offset, canvas)
        labels.append(np.where(lab == IGNORE_LABEL_ID, 255, lab).astype(np.uint8))
        pids.append(pid)
        return len(pids) - 1

    for tid, t in all_tasks.items():
        trains = tid in train_ids or tid in demo_ids
        if trains:
            trained_on += [f"{tid}/demo{j}" for j in range(len(t.demos))]
        if tid in train_ids:
            trained_on += [f"{tid}/{j}" for j in range(len(t.tests))]
        for aug in augmentations(n_aug, f"{seed}/{tid}", dihedral=dihedral):
            pid = len(demo_rows)
            rows = []
            for i, o in t.demos:
                i, o = aug.apply(i), aug.apply(o)
                off = random_offset([i.shape, o.shape], rng, canvas) if (translate and trains) else (0, 0)
                r = add(i, o, pid, off)
                rows.append(r)
                if trains:
                    train_rows.append(r)
            demo_rows.append(rows[:max_demos])
            for j, (i, o) in enumerate(t.tests):
                i, o = aug.apply(i), aug.apply(o)
                if tid in train_ids:
                    off = random_offset([i.shape, o.shape], rng, canvas) if translate else (0, 0)
                    train_rows.append(add(i, o, pid, off))
                if tid in query_of:
                    queries.setdefault(query_of[tid], []).append((add(i, o, pid), tid, j, aug))
    K = max([len(r) for r in demo_rows] + [0])
    demo_idx = np.full((len(demo_rows), K), -1, dtype=np.int64)
    for p, rows in enumerate(demo_rows):
        demo_idx[p, :len(rows)] = rows
    evals = {}
    for split, ts in eval_tasks.items():
        q = queries.get(split, [])
        evals[split] = EvalSplit(idx=np.array([r for r, *_ in q], dtype=np.int64), task=[x[1] for x in q],
                                 out_index=[x[2] for x in q], aug=[x[3] for x in q],
                                 gold={t.id: [np.asarray(o) for _, o in t.tests] for t in ts})
    return PuzzleDataset(inputs=np.stack(inputs), labels=np.stack(labels), pid=np.array(pids, dtype=np.int64),
                         train_idx=np.array(train_rows, dtype=np.int64), demo_idx=demo_idx, evals=evals,
                         num_puzzle_ids=len(demo_rows), seq_len=canvas * canvas, vocab_size=VOCAB_SIZE,
                         kind="grid", canvas=canvas, train_ids=trained_on,
                         info={"n_aug": n_aug, "dihedral": dihedral, "translate": translate, "canvas": canvas,
                               "n_train_rows": len(train_rows), "n_tasks": len(all_tasks)})
