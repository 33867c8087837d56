"""The task contract: a task loads examples, builds prompts, and scores outputs; RL rewards call the same scorer.

    task = get_task("gsm8k")
    ex = task.examples("test")[0]
    text = task.prompt(ex, style="markovian")       # "... Question: {q}\nReasoning:"
    s = task.score(model_output, ex)                 # Score(extracted, correct, valid, extractor, extractions, correct_by)

Every applicable extractor is run on every output and recorded side by side (lm-eval reports strict-match and
flexible-extract together); the task names one of them primary, and `correct`/`valid` follow the primary one.
An output the primary extractor cannot read is invalid and counted as wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from reasonlab.errors import UserError

STYLES = ("default", "markovian", "cot")
LETTERS = "ABCDEFGHIJ"


class TaskError(UserError, ValueError):
    """A task was asked for something it cannot give (unknown split, style, missing data); the message names the fix
    (a UserError: the CLI prints it as one line, exit 2)."""


@dataclass
class Example:
    id: str  # stable, unique within the task+split (e.g. "gsm8k/test/17"); used for pairing & leakage checks
    question: str  # the problem text (for wiki: the context; for grids: a text rendering)
    gold: str  # canonical gold answer string ("18", "C", a grid string ...)
    choices: list[str] | None = None  # MCQ options in order; labels A, B, C ... are implied by position
    meta: dict = field(default_factory=dict)  # anything else (rationale, source, numbers, target ...)


@dataclass
class Score:
    extracted: str | None  # primary extractor's answer; None = invalid
    correct: bool
    valid: bool  # False when the primary extractor found nothing (counted as invalid, and wrong)
    extractor: str  # "name@version" of the primary extractor
    extractions: dict[str, str | None]  # every applicable extractor "name@version" -> its answer, side by side
    correct_by: dict[str, bool]  # every extractor -> correct?


def score_with(
    output: str,
    gold: str,
    extractors: Sequence[str],
    primary: str,
    equal: Callable[[str, str], bool],
) -> Score:
    """Run every named extractor on `output`, compare each to `gold` with `equal`, and report the primary one."""
    from reasonlab.eval import extract as X  # lazy: base.py stays importable on its own

    if primary not in extractors:
        raise TaskError(f"primary extractor {primary!r} is not among {list(extractors)}")
    extractions: dict[str, str | None] = {}
    correct_by: dict[str, bool] = {}
    primary_key = ""
    for name in extractors:
        key = X.qualified(name)
        ans = X.extract(name, output)
        extractions[key] = ans
        correct_by[key] = ans is not None and equal(ans, gold)
        if name == primary:
            primary_key = key
    ans = extractions[primary_key]
    return Score(ans, correct_by[primary_key], ans is not None, primary_key, extractions, correct_by)


def format_choices(choices: Sequence[str]) -> str:
    """'A. first\\nB. second ...' — the lm-eval MMLU layout."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


MARKOVIAN_TEMPLATE = "You will be given a question. Reason step by step before answering.\nQuestion: {question}\nReasoning:"


def qa_prompt(question: str, style: str, shots: Sequence[tuple[str, str]] = (), instruction: str = "") -> str:
    """Shared layout. default: [instruction] + shots 'Question: q\\nAnswer: a' + 'Question: q\\nAnswer:';
    cot: same, ending "Answer: Let's think step by step."; markovian: the Markovian template (no shots, no instruction).
    `shots` are (question, target) pairs already written in the style's answer format."""
    if style == "markovian":
        return MARKOVIAN_TEMPLATE.format(question=question)
    head = f"{instruction}\n\n" if instruction else ""
    body = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    tail = " Let's think step by step." if style == "cot" else ""
    return f"{head}{body}Question: {question}\nAnswer:{tail}"


class Task:
    """Base class. Subclasses set name/version/splits and implement examples(), prompt() and score().

    `fewshot` = number of solved examples prepended to each prompt (drawn deterministically from `fewshot_split`, never
    the example itself). Versions are strings; bump one whenever examples, prompts or scoring change meaning.
    """

    name: str = "task"
    version: str = "0"
    splits: tuple[str, ...] = ("train", "validation", "test")
    fewshot_split: str = "train"

    def __init__(self, fewshot: int = 0, fewshot_seed: int = 1234):
        if fewshot < 0:
            raise TaskError(f"fewshot must be >= 0, got {fewshot}")
        self.fewshot = fewshot
        self.fewshot_seed = fewshot_seed
        self._fewshot_pool: list[Example] | None = None

    # --- the contract -------------------------------------------------------------------------------------------
    def examples(self, split: str) -> list[Example]:
        raise NotImplementedError

    def prompt(self, example: Example, style: str = "default") -> str:
        raise NotImplementedError

    def score(self, output: str, example: Example) -> Score:
        raise NotImplementedError

    def reward(self, output: str, example: Example) -> float:
        return float(self.score(output, example).correct)

    def canonical_answer(self, answer: str | None) -> str | None:
        """The form in which two extracted answers count as the same answer (set-level diversity). A task whose
        answers have many spellings of one answer overrides it (countdown: "9+3" and "3+9")."""
        return answer.strip() if isinstance(answer, str) else answer

    # --- helpers shared by subclasses ---------------------------------------------------------------------------
    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise TaskError(f"task {self.name!r} has no split {split!r}; choose one of {list(self.splits)}")

    def check_style(self, style: str) -> None:
        if style not in STYLES:
            raise TaskError(f"unknown prompt style {style!r}; choose one of {list(STYLES)}")

    def shots(self, example: Example) -> list[Example]:
        """The `fewshot` solved examples for this prompt: a fixed seeded sample of the few-shot split, minus `example`."""
        if self.fewshot == 0:
            return []
        if self._fewshot_pool is None:
            try:
                pool = self.examples(self.fewshot_split)
            except TaskError as e:
                raise type(e)(f"{e} (needed for fewshot={self.fewshot}; use fewshot=0)") from None
            rng = random.Random(self.fewshot_seed)
            k = min(len(pool), self.fewshot + 1)  # one spare in case the example itself is drawn
            self._fewshot_pool = [pool[i] for i in sorted(rng.sample(range(len(pool)), k))]
        return [e for e in self._fewshot_pool if e.id != example.id][: self.fewshot]

    def markovian_answer_prompt(self, example: Example, reasoning: str, redact: bool = True) -> str:
        """The Markovian scoring prompt: question (and MCQ options) redacted, the CoT, then 'Answer:' + answer tokens.

        Paper: R = ln pi(ans | CoT) with the question replaced by "<Redacted>", so the answer must come from the CoT.
        """
        shown = Example(example.id, "<Redacted>", example.gold, None, example.meta) if redact else example
        return f"{self.prompt(shown, 'markovian')} {reasoning.strip()}\nAnswer:"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, fewshot={self.fewshot})"


class NumericTask(Task):
    """A task whose answer is a number; every numeric extractor is recorded, `extractor` picks the primary one.

    Subclasses load examples with `gold` = canonical number string and, optionally, meta["rationale"] (worked
    solution, used by few-shot cot targets).
    """

    extractors: tuple[str, ...] = ("strict-match", "flexible-extract", "cot-strict-match", "anchor", "simple")
    default_extractor = "flexible-extract"
    instruction = ""

    def __init__(self, extractor: str | None = None, fewshot: int = 0, **kw):
        super().__init__(fewshot=fewshot, **kw)
        self.primary = extractor or self.default_extractor
        if self.primary not in self.extractors:
            raise TaskError(f"{self.name}: extractor must be one of {list(self.extractors)}, got {self.primary!r}")

    def shot_target(self, e: Example, style: str) -> str:
        why = e.meta.get("rationale", "").strip()
        if style == "cot":
            return f"{why} The answer is {e.gold}." if why else f"The answer is {e.gold}."
        return e.gold

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        shots = [(e.question, self.shot_target(e, style)) for e in self.shots(example)] if style != "markovian" else []
        return qa_prompt(example.question, style, shots, self.instruction)

    def score(self, output: str, example: Example) -> Score:
        from reasonlab.eval.extract import answers_equal

        return score_with(output, example.gold, self.extractors, self.primary, answers_equal)


class MCQTask(Task):
    """Multiple choice with lettered options. Generation is scored by the MCQ extractors (legacy, word_boundary,
    answer_is side by side); log-likelihood scoring (lm-eval acc / acc_norm) uses context(), choice_continuations() and
    gold_index(): acc = argmax_i ll_i == gold, acc_norm = argmax_i ll_i / len(choice_continuations[i].strip()) (lm-eval
    normalizes by the character length of the choice string)."""

    extractors: tuple[str, ...] = ("word_boundary", "legacy", "answer_is")
    default_extractor = "word_boundary"
    instruction = "Answer with the letter of the correct option."
    # lm-eval continuation style: "letters" (" A", " B" ... after "Answer:", MMLU) or "texts" (" <choice text>", ARC)
    loglik_choices = "letters"

    def __init__(self, extractor: str | None = None, fewshot: int = 0, **kw):
        super().__init__(fewshot=fewshot, **kw)
        self.primary = extractor or self.default_extractor
        if self.primary not in self.extractors:
            raise TaskError(f"{self.name}: extractor must be one of {list(self.extractors)}, got {self.primary!r}")

    def render(self, example: Example) -> str:
        """Question plus lettered options (options omitted when redacted)."""
        if not example.choices:
            return example.question
        return f"{example.question.strip()}\n{format_choices(example.choices)}"

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        if style == "markovian":
            return qa_prompt(self.render(example), style)
        if style == "cot":
            shots = [(self.render(e), f"{e.meta.get('rationale', '').strip()} The answer is ({e.gold}).".strip()) for e in self.shots(example)]
            return qa_prompt(self.render(example), style, shots, self.instruction + " End with 'The answer is (X).'")
        shots = [(self.render(e), e.gold) for e in self.shots(example)]
        return qa_prompt(self.render(example), style, shots, self.instruction)

    def score(self, output: str, example: Example) -> Score:
        from reasonlab.eval.extract import letters_equal

        return score_with(output, example.gold, self.extractors, self.primary, letters_equal)

    # --- log-likelihood interface (lm-eval multiple_choice) --------------------------------------------------------
    def description(self, example: Example) -> str:
        """Text placed once before the few-shot block (lm-eval's `description`); MMLU names the subject here."""
        return ""

    def context(self, example: Example) -> str:
        """The text the choices are appended to: description, few-shot (each shot ends with its gold continuation)."""
        shots = "".join(f"{self.loglik_text(e)}{self.choice_continuations(e)[self.gold_index(e)]}\n\n" for e in self.shots(example))
        return self.description(example) + shots + self.loglik_text(example)

    def loglik_text(self, example: Example) -> str:
        """lm-eval doc_to_text: letters-style tasks show the options (MMLU); texts-style tasks do not (ARC, MathQA)."""
        if self.loglik_choices == "texts":
            return f"Question: {example.question.strip()}\nAnswer:"
        return f"{self.render(example)}\nAnswer:"

    def choice_continuations(self, example: Example) -> list[str]:
        """Continuations scored by log-likelihood, each with lm-eval's target_delimiter ' ' in front."""
        if self.loglik_choices == "texts":
            return [f" {c}" for c in example.choices or []]
        return [f" {LETTERS[i]}" for i in range(len(example.choices or []))]

    def gold_index(self, example: Example) -> int:
        return LETTERS.index(example.gold)
