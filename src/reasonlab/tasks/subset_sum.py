"""Subset sum: pick some of the given numbers (each at most once, at least two) that add up to the target.

The polychromic testbed task. A puzzle has many valid answers and all of them can be enumerated exactly (2^n subsets
of n <= 16 numbers), so a set-level objective can be judged by what it is meant to buy: coverage, the fraction of a
puzzle's solutions that 16 samples find, next to pass@k.

    task = SubsetSumTask(n_numbers=8, max_number=16)
    ex = task.examples("test")[0]
    task.prompt(ex)            # "2 3 5 7 8 11 13 16 -> 21 :"
    task.score("5 + 16", ex)   # correct; "16 + 5" is the same answer (canonical_answer sorts the terms)
    ex.meta["solutions"]       # every solution, canonical ("5+16", "2+3+16", ...); len = meta["n_solutions"]

Every puzzle's numbers are distinct, its target is not one of them, and it has between `min_solutions` and
`max_solutions` solutions (a target drawn uniformly among the sums with that many). `gold` is ONE solution drawn
uniformly among them (seeded per puzzle), so SFT on the train split fits a policy to uniformly random valid solutions.
The vocabulary is closed (`vocabulary()`: the numbers 0..sum of the largest ones, "+", "->", ":"), so a model built
from scratch (`model.name: scratch`) reads it with a word-level tokenizer; prompts have one style (default). Splits are
hash-bucketed on the puzzle, independent of the seed, so no puzzle is in two splits.
"""

from __future__ import annotations

import itertools
import random

from reasonlab.eval.extract import extract, qualified
from reasonlab.tasks.arithmetic import split_of
from reasonlab.tasks.base import Example, Score, Task, TaskError

EXTRACTOR = "sum-terms"


def solutions(numbers: list[int], target: int, min_terms: int = 2) -> list[tuple[int, ...]]:
    """Every subset (sorted tuple) of `numbers` with >= min_terms elements summing to `target`, in sorted order."""
    nums = sorted(numbers)
    out = [c for k in range(min_terms, len(nums) + 1) for c in itertools.combinations(nums, k) if sum(c) == target]
    return sorted(out)


def sums_by_count(numbers: list[int], min_terms: int = 2) -> dict[int, int]:
    """target -> number of solutions, for every reachable target."""
    counts: dict[int, int] = {}
    for k in range(min_terms, len(numbers) + 1):
        for c in itertools.combinations(numbers, k):
            counts[sum(c)] = counts.get(sum(c), 0) + 1
    return counts


def spell(terms) -> str:
    return "+".join(str(t) for t in terms)


class SubsetSumTask(Task):
    name = "subset-sum"
    version = "1"
    splits = ("train", "validation", "test")

    def __init__(self, n_numbers: int = 8, max_number: int = 16, min_solutions: int = 4, max_solutions: int = 16,
                 min_terms: int = 2, seed: int = 0, n_train: int = 20000, n_validation: int = 200,
                 n_test: int = 300, **kw):
        super().__init__(**kw)
        if not 3 <= n_numbers <= 16 or max_number < n_numbers:
            raise TaskError(f"subset-sum needs 3 <= n_numbers <= 16 and max_number >= n_numbers, got {n_numbers}, "
                            f"{max_number}")
        if not 1 <= min_solutions <= max_solutions:
            raise TaskError(f"subset-sum needs 1 <= min_solutions <= max_solutions, got {min_solutions}, "
                            f"{max_solutions}")
        if self.fewshot:
            raise TaskError("subset-sum has no few-shot prompts (a scratch model is fitted by SFT); use fewshot=0")
        self.n_numbers, self.max_number, self.min_terms, self.seed = n_numbers, max_number, min_terms, seed
        self.min_solutions, self.max_solutions = min_solutions, max_solutions
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self._cache: dict[str, list[Example]] = {}

    def vocabulary(self) -> list[str]:
        """Every word a prompt or an answer can hold (for a word-level tokenizer)."""
        top = sum(range(self.max_number - self.n_numbers + 1, self.max_number + 1))
        return [str(i) for i in range(top + 1)] + ["+", "->", ":"]

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split in self._cache:
            return self._cache[split]
        n, rng = self.sizes[split], random.Random(f"subset-sum/{self.seed}/{split}")
        seen: set[str] = set()
        out: list[Example] = []
        budget = 60 * n + 1000
        while len(out) < n and budget > 0:
            budget -= 1
            numbers = sorted(rng.sample(range(1, self.max_number + 1), self.n_numbers))
            counts = sums_by_count(numbers, self.min_terms)
            targets = sorted(t for t, c in counts.items()
                             if self.min_solutions <= c <= self.max_solutions and t not in numbers)
            if not targets:
                continue
            target = rng.choice(targets)
            key = f"{numbers}->{target}"
            if key in seen or split_of(key, "subset-sum") != split:
                continue
            seen.add(key)
            sols = [spell(s) for s in solutions(numbers, target, self.min_terms)]
            gold = rng.choice(sols)  # uniform among the solutions: what SFT fits
            q = f"{' '.join(map(str, numbers))} -> {target}"
            meta = {"numbers": numbers, "target": target, "solutions": sols, "n_solutions": len(sols)}
            out.append(Example(f"subset-sum/{split}/{len(out)}", q, gold.replace("+", " + "), None, meta))
        if len(out) < n:
            raise TaskError(f"subset-sum: only {len(out)} distinct {split} puzzles; ask for fewer (n_{split}) or "
                            f"allow more (larger max_number, a wider min_solutions..max_solutions)")
        self._cache[split] = out
        return out

    def prompt(self, example: Example, style: str = "default") -> str:
        if style != "default":
            raise TaskError(f"subset-sum has one prompt style (default; its vocabulary is closed), got {style!r}")
        return f"{example.question} :"

    def canonical_answer(self, answer: str | None) -> str | None:
        """Terms sorted ascending: "16+5" and "5+16" are one answer. An unreadable answer stays as written."""
        if answer is None:
            return None
        try:
            return spell(sorted(int(t) for t in answer.split("+")))
        except ValueError:
            return answer.strip()

    def score(self, output: str, example: Example) -> Score:
        key = qualified(EXTRACTOR)
        ans = extract(EXTRACTOR, output)
        ok = ans is not None and self.canonical_answer(ans) in example.meta["solutions"]
        return Score(ans, ok, ans is not None, key, {key: ans}, {key: ok})
