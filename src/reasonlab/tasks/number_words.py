"""Number words: the question is a number written in English words, the answer is that number in digits.
Prompt "Words: four hundred twelve\nNumber:", answer "412", after 6 solved examples.

Why it exists: the latent bridge needs a CPU task where the answer is COMPUTED from the question and never appears in
it (word-recall's answer is its question, so its controls cannot fail: docs/bridge.md). Here the digits never occur in
the question's words, every answer is distinct (unique outputs can reach 1.0), and the target (SmolLM2-135M) reads the
words into digits from text at a high rate (measured by the recipe's target_text row). What must cross the bridge is
the number's meaning, a composition of ~30 word types; the test numbers never occur in training, so a translator
that memorized training answers scores nothing.

`split_question` (the KV-fusion task, 100..999 without a round hundred): half the question in each model. The target's
text shows the hundreds ("four hundred"), the source reads the rest (meta["source_text"] = "twelve"); the answer needs
both, so the target alone can only guess the last two digits (~1%) and an encoder source cannot answer at all.

Splits are fixed by the sha256 of the number (50% train / 15% validation / 35% test, seed-independent: with 1..999,
~500 / ~150 / ~350 numbers); each split's order is a seeded shuffle; n_<split> = 0 keeps the whole split.
"""

from __future__ import annotations

import hashlib
import random

from reasonlab.eval.extract import answers_equal
from reasonlab.tasks.base import Example, Score, Task, TaskError, qa_prompt, score_with

BUCKETS = {"train": (0, 50), "validation": (50, 65), "test": (65, 100)}
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int) -> str:
    """0 <= n <= 999 in American English: 47 -> 'forty-seven', 412 -> 'four hundred twelve'."""
    if not 0 <= n <= 999:
        raise ValueError(f"in_words covers 0..999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + ("" if rest == 0 else " " + in_words(rest))


def split_of(n: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"number-words|{n}".encode()).digest()[:8], "big") % 100
    return next(s for s, (lo, hi) in BUCKETS.items() if lo <= h < hi)


class NumberWordsTask(Task):
    name = "number-words"
    version = "1"
    splits = ("train", "validation", "test")

    def __init__(self, lo: int = 1, hi: int = 999, split_question: bool = False, seed: int = 0, n_train: int = 0,
                 n_validation: int = 0, n_test: int = 0, fewshot: int = 6, **kw):
        super().__init__(fewshot=fewshot, **kw)
        if not 0 <= lo <= hi <= 999:
            raise TaskError(f"number-words needs 0 <= lo <= hi <= 999 (got lo={lo} hi={hi})")
        self.lo, self.hi, self.split_question, self.seed = lo, hi, split_question, seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.extractors = ("anchor", "flexible-extract")
        self.primary = "anchor"
        self._cache: dict[str, list[Example]] = {}

    def numbers(self) -> list[int]:
        ns = range(self.lo, self.hi + 1)
        return [n for n in ns if n >= 100 and n % 100] if self.split_question else list(ns)

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split not in self._cache:
            ns = [n for n in self.numbers() if split_of(n) == split]
            random.Random(f"{self.seed}/{split}").shuffle(ns)
            k = self.sizes[split]
            if k and k > len(ns):
                raise TaskError(f"number-words: the {split} split has only {len(ns)} numbers in {self.lo}..{self.hi}; "
                                f"ask for fewer (n_{split}) or widen the range")
            ns = ns[:k] if k else ns
            self._cache[split] = [self._example(split, n) for n in ns]
        return self._cache[split]

    def _example(self, split: str, n: int) -> Example:
        words = in_words(n)
        if not self.split_question:
            return Example(f"number-words/{split}/{n}", words, str(n), None, {"words": words})
        head, tail = f"{ONES[n // 100]} hundred", in_words(n % 100)
        # the target's text holds the head; the source reads the tail (recipes read meta["source_text"])
        return Example(f"number-words/{split}/{n}", head + " ...", str(n), None,
                       {"words": words, "source_text": tail, "full_question": words})

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        if style == "default":  # completion style; the shots show the format (always the full words)
            shots = "".join(f"Words: {e.meta['words']}\nNumber: {e.gold}\n\n" for e in self.shots(example))
            return f"{shots}Words: {example.question}\nNumber:"
        return qa_prompt(f"Write this number in digits: {example.question}", style,
                         [(f"Write this number in digits: {e.meta['words']}", e.gold) for e in self.shots(example)])

    def score(self, output: str, example: Example) -> Score:
        return score_with(output, example.gold, self.extractors, self.primary, answers_equal)
