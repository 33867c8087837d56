"""Word recall: the question is one English word and the answer is that word. Prompt "Word: castle\nAgain:", answer
"castle", after 6 solved examples (with 2, SmolLM2-135M mostly repeats the last example's word; with 6 it answers
0.97 of 60 validation words from text).

Why it exists: the latent bridge's CPU config needs a task whose whole content must travel through the bridge, that
the target (SmolLM2-135M) solves from text almost always, and whose answers are so many and so spread that neither
control (zero or shuffled soft tokens) can score by luck and a constant-output collapse shows at once. The words are
the 11,659 lowercase words of 4-10 letters that are a single token in BOTH all-MiniLM-L6-v2's WordPiece vocabulary and
SmolLM2's BPE vocabulary (`tasks/data/bridge_words.txt`, written by scripts/make_bridge_words.py), so a per-token
translator has one source token to read and one target token to produce. Held-out words are never seen in training:
the test measures a translation that generalizes across the vocabulary, not a memorized table.

Splits are fixed by the sha256 of the word (80% train / 10% validation / 10% test, seed-independent); each split's
order is a seeded shuffle; n_<split> = 0 keeps the whole split.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from reasonlab.tasks.base import Example, Score, Task, TaskError, qa_prompt

WORDS_FILE = Path(__file__).with_name("data") / "bridge_words.txt"
BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}


def split_of(word: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"word-recall|{word}".encode()).digest()[:8], "big") % 100
    return next(s for s, (lo, hi) in BUCKETS.items() if lo <= h < hi)


def words_equal(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def first_word(text: str) -> str | None:
    """The first whitespace-separated word, stripped of surrounding punctuation and quotes."""
    for tok in text.split():
        w = tok.strip(".,;:!?\"'()[]{}`*")
        if w:
            return w
    return None


class WordRecallTask(Task):
    name = "word-recall"
    version = "1"
    splits = ("train", "validation", "test")

    def __init__(self, seed: int = 0, n_train: int = 0, n_validation: int = 0, n_test: int = 0, fewshot: int = 6,
                 **kw):
        super().__init__(fewshot=fewshot, **kw)
        self.seed = seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.extractors = ("first-word",)
        self.primary = "first-word"
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split not in self._cache:
            words = [w for w in WORDS_FILE.read_text().split() if split_of(w) == split]
            random.Random(f"{self.seed}/{split}").shuffle(words)
            n = self.sizes[split]
            if n and n > len(words):
                raise TaskError(f"word-recall: the {split} split has only {len(words)} words; ask for fewer "
                                f"(n_{split})")
            words = words[:n] if n else words
            self._cache[split] = [Example(f"word-recall/{split}/{w}", w, w, None, {}) for w in words]
        return self._cache[split]

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        if style == "default":  # completion style; the shots show the format
            shots = "".join(f"Word: {e.question}\nAgain: {e.gold}\n\n" for e in self.shots(example))
            return f"{shots}Word: {example.question}\nAgain:"
        return qa_prompt(f"Repeat this word: {example.question}", style,
                         [(f"Repeat this word: {e.question}", e.gold) for e in self.shots(example)])

    def score(self, output: str, example: Example) -> Score:
        key = "first-word@1"  # the task's own extractor, versioned like eval.extract's
        ans = first_word(output)
        correct = ans is not None and words_equal(ans, example.gold)
        return Score(ans, correct, ans is not None, key, {key: ans}, {key: correct})
