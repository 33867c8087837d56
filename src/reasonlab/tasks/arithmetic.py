"""Generated arithmetic: "a + b + c ... =" with `n_terms` numbers of up to `digits` digits, or 1..`max_value` when set
(Markovian's task: 15 terms, 1..99, K=150 CoT tokens; small values give a task a 135M model gets partly right).

Determinism and leakage: every split is drawn from its own seeded stream (random.Random(f"{seed}/{split}")), and a
question is only kept by the split its text hashes to (sha256 -> 80% train / 10% validation / 10% test). The hash does not
depend on the seed, so no question can ever appear in two splits, whatever seeds or sizes were used. Duplicates within
a split are dropped; if the space is too small for the requested size, the task says so instead of looping.
"""

from __future__ import annotations

import hashlib
import random

from reasonlab.eval.extract import answers_equal
from reasonlab.tasks.base import Example, Score, Task, TaskError, qa_prompt, score_with

BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}  # sha256 % 100 ranges


def split_of(question: str, namespace: str = "arithmetic") -> str:
    """The only split this question may ever belong to (seed-independent)."""
    h = int.from_bytes(hashlib.sha256(f"{namespace}|{question}".encode()).digest()[:8], "big") % 100
    return next(s for s, (lo, hi) in BUCKETS.items() if lo <= h < hi)


def evaluate_terms(numbers: list[int], ops: list[str]) -> int:
    """Exact value of n0 op0 n1 op1 n2 ... with the usual precedence (* before + and -)."""
    total, term = 0, numbers[0]
    sign = 1
    for op, n in zip(ops, numbers[1:]):
        if op == "*":
            term *= n
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), n
    return total + sign * term


class ArithmeticTask(Task):
    name = "arithmetic"
    version = "1"
    splits = ("train", "validation", "test")

    def __init__(
        self,
        n_terms: int = 15,
        digits: int = 2,
        ops: str = "+",
        max_value: int = 0,
        seed: int = 0,
        n_train: int = 10000,
        n_validation: int = 500,
        n_test: int = 1000,
        extractor: str = "anchor",
        fewshot: int = 0,
        **kw,
    ):
        super().__init__(fewshot=fewshot, **kw)
        if n_terms < 2 or digits < 1:
            raise TaskError(f"arithmetic needs n_terms >= 2 and digits >= 1, got n_terms={n_terms} digits={digits}")
        if max_value < 0 or max_value == 1:
            raise TaskError(f"arithmetic max_value must be >= 2 (numbers are drawn from 1..max_value) or 0 for "
                            f"10**digits - 1, got {max_value}")
        if not ops or set(ops) - set("+-*"):
            raise TaskError(f"arithmetic ops must be a non-empty string of '+', '-', '*', got {ops!r}")
        self.n_terms, self.digits, self.ops, self.seed = n_terms, digits, ops, seed
        self.max_value = max_value or 10**digits - 1
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.extractors = ("anchor", "simple", "flexible-extract", "cot-strict-match")
        if extractor not in self.extractors:
            raise TaskError(f"arithmetic extractor must be one of {self.extractors}, got {extractor!r}")
        self.primary = extractor
        self._cache: dict[str, list[Example]] = {}

    def _draw(self, rng: random.Random) -> tuple[str, int, list[int]]:
        nums = [rng.randint(1, self.max_value) for _ in range(self.n_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.n_terms - 1)]
        q = " ".join([str(nums[0])] + [f"{o} {n}" for o, n in zip(ops, nums[1:])])
        return q, evaluate_terms(nums, ops), nums

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split in self._cache:
            return self._cache[split]
        n, rng = self.sizes[split], random.Random(f"{self.seed}/{split}")
        seen: set[str] = set()
        out: list[Example] = []
        budget = 40 * n + 1000  # ~10x the expected draws for a 10% bucket; exhausting it means the space is too small
        while len(out) < n and budget > 0:
            budget -= 1
            q, value, nums = self._draw(rng)
            if q in seen or split_of(q) != split:
                continue
            seen.add(q)
            out.append(Example(f"arithmetic/{split}/{len(out)}", q, str(value), None, {"numbers": nums}))
        if len(out) < n:
            raise TaskError(
                f"arithmetic: found only {len(out)} distinct {split} questions for n_terms={self.n_terms} "
                f"max_value={self.max_value}; ask for fewer examples (n_{split}) or a larger space"
            )
        self._cache[split] = out
        return out

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        if style == "markovian":  # Markovian's arithmetic question is the bare expression
            return qa_prompt(example.question, style)
        q = f"What is {example.question}?"
        if style == "cot":
            shots = [(f"What is {e.question}?", f"Adding step by step gives {e.gold}. The answer is {e.gold}.") for e in self.shots(example)]
            return qa_prompt(q, style, shots, "Compute the value. End with 'The answer is N.'")
        shots = [(f"What is {e.question}?", e.gold) for e in self.shots(example)]
        return qa_prompt(q, style, shots, "Compute the value. Give only the final number.")

    def score(self, output: str, example: Example) -> Score:
        return score_with(output, example.gold, self.extractors, self.primary, answers_equal)
