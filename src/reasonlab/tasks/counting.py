"""Counting: continue an arithmetic sequence. Question "457, 458, 459", prompt "Count: 457, 458, 459,", answer "460".

Why it exists: the latent-bridge CPU config needs a task that SmolLM2-135M solves from text at a high rate (greedy,
measured by the bridge recipe's target_text control: ~0.9 with steps {1, 10}; it cannot add two-digit numbers or
solve one-digit word problems reliably) whose question content (the start and the step) must travel through the
bridge, and whose answers are spread widely enough (hundreds of distinct values) that a constant-output collapse shows
in the unique-output ratio.

Space: every (start, step) with start in [lo, hi] and step in `steps`; `shown` terms are shown and the next one is the
answer. Splits are fixed by the sha256 of the question text (80% train / 10% validation / 10% test, seed-independent,
so no question is ever in two splits); each split's order is a seeded shuffle; n_<split> = 0 keeps the whole split.
"""

from __future__ import annotations

import hashlib
import random

from reasonlab.eval.extract import answers_equal
from reasonlab.tasks.base import Example, Score, Task, TaskError, qa_prompt, score_with

BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}


def split_of(question: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"counting|{question}".encode()).digest()[:8], "big") % 100
    return next(s for s, (lo, hi) in BUCKETS.items() if lo <= h < hi)


class CountingTask(Task):
    name = "counting"
    version = "1"
    splits = ("train", "validation", "test")

    def __init__(self, lo: int = 1, hi: int = 999, steps: list[int] | tuple[int, ...] = (1, 10, -1), shown: int = 3,
                 seed: int = 0, n_train: int = 0, n_validation: int = 0, n_test: int = 0, extractor: str = "anchor",
                 fewshot: int = 0, **kw):
        super().__init__(fewshot=fewshot, **kw)
        if not 0 <= lo <= hi or not steps or shown < 1 or any(int(s) == 0 for s in steps):
            raise TaskError(f"counting needs 0 <= lo <= hi, non-zero steps and shown >= 1 (got lo={lo} hi={hi} "
                            f"steps={steps} shown={shown})")
        self.lo, self.hi, self.steps, self.shown, self.seed = lo, hi, tuple(int(s) for s in steps), shown, seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.extractors = ("anchor", "flexible-extract", "simple")
        if extractor not in self.extractors:
            raise TaskError(f"counting extractor must be one of {self.extractors}, got {extractor!r}")
        self.primary = extractor
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split not in self._cache:
            items = []
            for step in self.steps:
                for start in range(self.lo, self.hi + 1):
                    seq = [start + i * step for i in range(self.shown + 1)]
                    if seq[-1] < 0:
                        continue
                    q = ", ".join(str(x) for x in seq[:-1])
                    if split_of(q) == split:
                        items.append((q, str(seq[-1]), start, step))
            random.Random(f"{self.seed}/{split}").shuffle(items)
            n = self.sizes[split]
            if n and n > len(items):
                raise TaskError(f"counting: the {split} split has only {len(items)} questions for lo={self.lo} "
                                f"hi={self.hi} steps={list(self.steps)}; ask for fewer (n_{split}) or widen the range")
            items = items[:n] if n else items
            self._cache[split] = [Example(f"counting/{split}/{i}", q, gold, None, {"start": s, "step": st})
                                  for i, (q, gold, s, st) in enumerate(items)]
        return self._cache[split]

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        if style == "default":  # completion style: the 135M target continues it far better than a Q/A layout
            shots = "".join(f"Count: {e.question}, {e.gold}\n" for e in self.shots(example))
            return f"{shots}Count: {example.question},"
        return qa_prompt(f"What number comes next: {example.question}?", style,
                         [(f"What number comes next: {e.question}?", e.gold) for e in self.shots(example)])

    def score(self, output: str, example: Example) -> Score:
        return score_with(output, example.gold, self.extractors, self.primary, answers_equal)
