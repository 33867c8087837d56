"""Sudoku (4x4, 6x6, 9x9) generated from a seed, every puzzle with a UNIQUE solution, and a Task per the contract.

    puzzles = generate(n=1000, size=6, seed=0, holes=20)          # list[Puzzle(puzzle, solution)], both (size*size,)
    inputs, labels = to_arrays(puzzles)                           # int64 (n, size*size): tokens below
    task = SudokuTask(size=6, n_train=20000, n_test=1000)         # splits train/val/test, disjoint by hash
    leaks = task.leakage()                                        # {"test_in_train": 0, ...} — must all be 0

Generation: a random solved grid (randomised backtracking), then cells are blanked in a random order and a blank is
kept only if the puzzle still has exactly one solution (a solver counts solutions up to 2). `holes` caps how many
cells are blanked (None = until no further cell can be removed: a minimal puzzle). Boxes: 4 -> 2x2, 6 -> 2x3, 9 -> 3x3.

Tokens: 0 PAD (unused, kept so grids and sudoku share conventions), 1 blank, 2..size+1 the digits 1..size.
Held-out guarantee: the three splits come from different seeds and are de-duplicated by puzzle hash, where the hash is
taken over the digit-relabelled canonical form (so a test puzzle that is a train puzzle with digits renamed also counts
as seen). `leakage()` recomputes the check from scratch.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from reasonlab.tasks.base import Example, Score, Task, TaskError

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # size -> (box rows, box cols)
BLANK = 1
EXTRACTOR = "sudoku-digits@1"


@dataclass
class Puzzle:
    puzzle: np.ndarray    # (size*size,) int8, 0 = blank, 1..size digits
    solution: np.ndarray  # (size*size,) int8


@lru_cache(maxsize=None)
def _units(size: int):
    """For every cell, its (row, col, box) index."""
    br, bc = BOXES[size]
    cells = [(r, c, (r // br) * (size // bc) + c // bc) for r in range(size) for c in range(size)]
    return cells


def count_solutions(grid: list[int], size: int, limit: int = 2, rng: random.Random | None = None,
                    out: list | None = None) -> int:
    """Number of solutions of `grid` (0 = blank), stopping at `limit`. With `rng` the search order is random and the
    first solution is written into `out` (used to draw random solved grids)."""
    grid = [int(v) for v in grid]  # numpy int8 would overflow the bit masks
    units = _units(size)
    full = (1 << (size + 1)) - 2  # bits 1..size
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    blanks = []
    for i, v in enumerate(grid):
        r, c, b = units[i]
        if v:
            bit = 1 << v
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0  # contradictory givens
            rows[r] |= bit; cols[c] |= bit; boxes[b] |= bit
        else:
            blanks.append(i)
    g = list(grid)
    found = 0

    def search() -> bool:  # True = stop
        nonlocal found
        best, best_cands, best_n = -1, 0, 99
        for i in blanks:
            if g[i]:
                continue
            r, c, b = units[i]
            cands = full & ~(rows[r] | cols[c] | boxes[b])
            n = bin(cands).count("1")
            if n < best_n:
                best, best_cands, best_n = i, cands, n
                if n <= 1:
                    break
        if best < 0:
            found += 1
            if out is not None and found == 1:
                out[:] = g
            return found >= limit
        if best_n == 0:
            return False
        digits = [d for d in range(1, size + 1) if best_cands >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        r, c, b = units[best]
        for d in digits:
            bit = 1 << d
            g[best] = d
            rows[r] |= bit; cols[c] |= bit; boxes[b] |= bit
            stop = search()
            rows[r] ^= bit; cols[c] ^= bit; boxes[b] ^= bit
            g[best] = 0
            if stop:
                return True
        return False

    search()
    return found


def make_puzzle(size: int, rng: random.Random, holes: int | None = None) -> Puzzle:
    """One puzzle with a unique solution: random solved grid, then blank cells while uniqueness holds."""
    if size not in BOXES:
        raise TaskError(f"sudoku size must be one of {sorted(BOXES)}, got {size}")
    solution: list[int] = []
    count_solutions([0] * size * size, size, limit=1, rng=rng, out=solution)
    grid = list(solution)
    target = size * size if holes is None else holes
    removed = 0
    for i in rng.sample(range(size * size), size * size):
        if removed >= target:
            break
        keep, grid[i] = grid[i], 0
        if count_solutions(grid, size, limit=2) == 1:
            removed += 1
        else:
            grid[i] = keep
    return Puzzle(np.array(grid, dtype=np.int8), np.array(solution, dtype=np.int8))


def canonical_hash(puzzle: np.ndarray) -> str:
    """sha1 of the puzzle with digits renamed in order of first appearance (digit-relabelling invariant)."""
    mapping: dict[int, int] = {0: 0}
    canon = bytes(mapping.setdefault(int(v), len(mapping)) for v in puzzle)
    return hashlib.sha1(canon).hexdigest()


def puzzle_id(puzzle: np.ndarray, size: int) -> str:
    """Content id "sudoku<size>/<canonical hash>": a puzzle seen in training and in test has the same id there, so
    the run folder's leakage detector (ids of evals vs data/train_ids.txt) sees a leak by content, not by name."""
    return f"sudoku{size}/{canonical_hash(puzzle)[:16]}"


def generate(n: int, size: int, seed: int, holes: int | None = None, exclude: set[str] | None = None) -> list[Puzzle]:
    """n distinct puzzles (by canonical hash), none whose hash is in `exclude`."""
    rng = random.Random(f"sudoku/{size}/{seed}")
    seen = set(exclude or ())
    out: list[Puzzle] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise TaskError(f"could only generate {len(out)} distinct {size}x{size} puzzles with holes={holes}; "
                            f"lower n or raise holes")
        p = make_puzzle(size, rng, holes)
        h = canonical_hash(p.puzzle)
        if h not in seen:
            seen.add(h)
            out.append(p)
    return out


def to_arrays(puzzles: list[Puzzle]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), int64 (n, size*size): blank -> 1, digit d -> d+1."""
    inputs = np.stack([np.where(p.puzzle == 0, BLANK, p.puzzle.astype(np.int64) + 1) for p in puzzles])
    labels = np.stack([p.solution.astype(np.int64) + 1 for p in puzzles])
    return inputs.astype(np.int64), labels


def render(grid: np.ndarray, size: int) -> str:
    """Rows of digits, '.' for blanks."""
    g = grid.reshape(size, size)
    return "\n".join("".join(str(int(v)) if v else "." for v in row) for row in g)


def is_valid_solution(grid: np.ndarray, puzzle: np.ndarray, size: int) -> bool:
    """Every row/col/box a permutation of 1..size and every given kept."""
    g = grid.reshape(size, size)
    if ((puzzle != 0) & (grid != puzzle)).any():
        return False
    want = set(range(1, size + 1))
    br, bc = BOXES[size]
    groups = list(g) + list(g.T) + [g[r:r + br, c:c + bc].ravel() for r in range(0, size, br) for c in range(0, size, bc)]
    return all(set(int(v) for v in grp) == want for grp in groups)


class SudokuTask(Task):
    """Generated sudoku; splits train / val / test are disjoint (canonical hash), each puzzle uniquely solvable."""

    name = "sudoku"
    version = "1"
    splits = ("train", "val", "test")

    def __init__(self, size: int = 6, n_train: int = 10000, n_val: int = 500, n_test: int = 1000,
                 holes: int | None = None, seed: int = 0):
        if size not in BOXES:
            raise TaskError(f"sudoku size must be one of {sorted(BOXES)}, got {size}")
        self.size, self.holes, self.seed = size, holes, seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self._puzzles: dict[str, list[Puzzle]] = {}

    def puzzles(self, split: str) -> list[Puzzle]:
        """Array-level access. Test excludes train; val excludes train and test (generated in that order)."""
        if split not in self.splits:
            raise TaskError(f"unknown split {split!r}; sudoku splits: {', '.join(self.splits)}")
        if split not in self._puzzles:
            offsets = {"train": 0, "test": 1, "val": 2}
            exclude: set[str] = set()
            for prev in ("train", "test", "val")[: offsets[split]]:
                exclude |= {canonical_hash(p.puzzle) for p in self.puzzles(prev)}
            self._puzzles[split] = generate(self.sizes[split], self.size, seed=self.seed * 10 + offsets[split],
                                            holes=self.holes, exclude=exclude)
        return self._puzzles[split]

    def leakage(self) -> dict[str, int]:
        """Count puzzles of val/test whose canonical hash occurs in train (must be 0), recomputed from scratch."""
        train = {canonical_hash(p.puzzle) for p in self.puzzles("train")}
        return {f"{s}_in_train": sum(canonical_hash(p.puzzle) in train for p in self.puzzles(s)) for s in ("val", "test")}

    def examples(self, split: str) -> list[Example]:
        n = self.size
        return [Example(id=puzzle_id(p.puzzle, n), question=render(p.puzzle, n), gold=render(p.solution, n),
                        meta={"size": n, "givens": int((p.puzzle != 0).sum()), "split": split, "index": i})
                for i, p in enumerate(self.puzzles(split))]

    def prompt(self, example: Example, style: str = "default") -> str:
        n = self.size
        br, bc = BOXES[n]
        head = (f"Solve this {n}x{n} sudoku (boxes {br}x{bc}; '.' is empty). Every row, column and box must hold "
                f"the digits 1-{n} once.")
        if style == "markovian":
            return f"{head} Question: {example.question}\nReasoning:"
        if style == "cot":
            return f"{head}\n{example.question}\nThink step by step, then write the solved grid as {n} rows of digits."
        return f"{head}\n{example.question}\nAnswer with the solved grid as {n} rows of digits."

    def score(self, output: str, example: Example) -> Score:
        """Extractor: the last size*size digits 1..size of the output, read row-major."""
        n = self.size
        digits = re.findall(f"[1-{n}]", output or "")
        extracted = None
        if len(digits) >= n * n:
            digits = digits[-n * n:]
            extracted = "\n".join("".join(digits[r * n:(r + 1) * n]) for r in range(n))
        correct = extracted == example.gold
        return Score(extracted=extracted, correct=correct, valid=extracted is not None, extractor=EXTRACTOR,
                     extractions={EXTRACTOR: extracted}, correct_by={EXTRACTOR: correct})


def relabel_digits(inputs: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator):
    """Training augmentation: rename the digits of each row with its own random permutation (blank/PAD fixed).
    (n, L) token arrays -> new arrays. The splits are disjoint up to digit renaming (canonical hash), so a
    relabelled training puzzle is still never a test puzzle."""
    n = len(inputs)
    perm = np.argsort(rng.random((n, size)), axis=1) + 2  # (n, size): digit token d+2 -> perm[d]
    lut = np.tile(np.arange(size + 2), (n, 1))  # (n, V): tokens 0 PAD and 1 blank map to themselves
    lut[:, 2:] = perm
    rows = np.arange(n)[:, None]
    return lut[rows, inputs], lut[rows, labels]


def build_dataset(task: SudokuTask, splits: tuple[str, ...] = ("val", "test"), train_eval: int = 0):
    """A grids.PuzzleDataset over sudoku: one puzzle id (the task is the same for every puzzle), flat token answers;
    each evaluation puzzle is its own 'task' with one output, so pass@1 = exact accuracy. Eval records are named
    "<example id>/0", and so are `train_ids`."""
    from reasonlab.tasks.grids import EvalSplit, PuzzleDataset

    splits = tuple(s for s in splits if s != "train")
    pools = {s: to_arrays(task.puzzles(s)) for s in ("train",) + splits}
    inputs = np.concatenate([p[0] for p in pools.values()]).astype(np.uint8)
    labels = np.concatenate([p[1] for p in pools.values()]).astype(np.uint8)
    train_ids = [puzzle_id(p.puzzle, task.size) for p in task.puzzles("train")]
    evals, start = {}, len(pools["train"][0])
    if train_eval:  # the first N training puzzles, scored like a held-out split (train vs held-out accuracy)
        n = min(train_eval, start)
        ids = train_ids[:n]
        evals["train"] = EvalSplit(idx=np.arange(n), task=ids, out_index=[0] * n, aug=[None] * n,
                                   gold={ids[i]: [pools["train"][1][i]] for i in range(n)})
    for s in splits:
        n = len(pools[s][0])
        ids = [puzzle_id(p.puzzle, task.size) for p in task.puzzles(s)]
        evals[s] = EvalSplit(idx=np.arange(start, start + n), task=ids, out_index=[0] * n, aug=[None] * n,
                             gold={ids[i]: [pools[s][1][i]] for i in range(n)})
        start += n
    return PuzzleDataset(inputs=inputs, labels=labels, pid=np.zeros(len(inputs), dtype=np.int64),
                         train_idx=np.arange(len(pools["train"][0])), demo_idx=np.zeros((1, 0), dtype=np.int64),
                         evals=evals, num_puzzle_ids=1, seq_len=task.size * task.size, vocab_size=task.size + 2,
                         kind="flat", train_ids=[f"{i}/0" for i in train_ids],  # = eval record ids
                         info={"size": task.size, "holes": task.holes, "leakage": task.leakage()})
