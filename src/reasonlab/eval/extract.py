"""Answer extractors: named, versioned, pure functions text -> answer string | None (None = nothing found = invalid).

    extract("flexible-extract", "so she pays $1,234.")   # -> "1234"
    qualified("flexible-extract")                        # -> "flexible-extract@1"  (what results record)
    answers_equal("3.50", "3.5")                         # -> True (numeric compare)

Numeric (GSM8K-style) — the lm-eval ones are regex + filter exactly as lm_eval/tasks/gsm8k/gsm8k.yaml (version 3.0):
  strict-match      `#### (\\-?[0-9\\.\\,]+)`, first match.
  flexible-extract  `(-?[$0-9.,]{2,})|(-?[0-9]+)`, LAST match (group_select -1), first non-empty group.
  cot-strict-match  gsm8k-cot's `The answer is (\\-?[0-9\\.\\,]+).`, first match.
  Each returns the match after lm-eval's exact_match normalization (regexes_to_ignore ",", "\\$", "(?s).*#### ", "\\.$",
  then lower-case), i.e. the string lm-eval compares. lm-eval compares strings, so it scores "3.50" != "3.5"; we compare
  numbers (answers_equal), which only ever turns such formatting mismatches into matches.
  anchor            Markovian: first number after an answer label (FINAL ANSWER / CORRECT ANSWER / ANSWER, optional
                    IS / = / :), else the last "=" segment holding a number, else the first number anywhere.
  simple            Markovian: the first number after the last "=" (whole text if there is no "=").
  The Markovian originals read integers only (`-?\\d+`, so "3.5" reads 3); ours read decimals too (version 1).

Multiple choice (letters A-E):
  legacy            first A-E anywhere in the upper-cased text. Biased on purpose (kept for comparability with
                    Markovian's accuracy_legacy): "THE answer is B" reads E.
  word_boundary     first `\\b[A-E]\\b` in the upper-cased text; the article "a" reads A.
  answer_is         lm-eval's MMLU flan-CoT strict-match: the text after "The answer is " / "the answer is " /
                    "The answer: " / "The final answer: " up to the line's last character, normalized as lm-eval's
                    exact_match (ignore_case, ignore_punctuation) and upper-cased: "The answer is (B)." -> "B",
                    "The answer is (B) since ..." -> "B SINCE ..." (wrong, as in lm-eval).

Free-form:
  equation          countdown: the arithmetic expression after the last "Answer:"/"answer is", else the last line
                    holding one; a trailing "= N" is dropped; "×"/"÷" read as "*"/"/".
  continuation      wiki: the output, whitespace-normalized (None when empty).
  sum-terms         subset-sum: the whole output must be positive integers joined by "+" ("3 + 5 + 12"); returned as
                    written without spaces ("3+5+12"); anything else (a stray word, a trailing "+") is None.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from typing import Callable

# ---------------------------------------------------------------------------------------------------------------
# lm-eval patterns, verbatim
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
MMLU_COT_STRICT = re.compile(
    r"((?<=The answer is )(.*)(?=.)|(?<=the answer is )(.*)(?=.)|(?<=The answer: )(.*)(?=.)|(?<=The final answer: )(.*)(?=.))"
)
_PUNCT = str.maketrans("", "", string.punctuation)  # lm-eval exact_match(ignore_punctuation): ASCII punctuation

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str | None:
    """lm-eval's RegexFilter: findall, pick one match, first non-empty group of a tuple, strip; None = '[invalid]'."""
    found = pattern.findall(text)
    if not found:
        return None
    m = found[group_select]
    if isinstance(m, tuple):
        nonempty = [g for g in m if g]
        if not nonempty:  # lm-eval raises IndexError here; we call it invalid
            return None
        m = nonempty[0]
    return m.strip()


def lm_eval_gsm8k_normalize(s: str) -> str:
    """lm-eval exact_match preprocessing for gsm8k: regexes_to_ignore, then ignore_case."""
    for r in GSM8K_IGNORE:
        s = re.sub(r, "", s)
    return s.lower()


# ---------------------------------------------------------------------------------------------------------------
# numeric extractors
def strict_match(text: str) -> str | None:
    m = _regex_filter(GSM8K_STRICT, text, 0)
    return None if m is None else lm_eval_gsm8k_normalize(m)


def flexible_extract(text: str) -> str | None:
    m = _regex_filter(GSM8K_FLEXIBLE, text, -1)
    return None if m is None else lm_eval_gsm8k_normalize(m)


def cot_strict_match(text: str) -> str | None:
    m = _regex_filter(GSM8K_COT_STRICT, text, 0)
    return None if m is None else lm_eval_gsm8k_normalize(m)


_ANCHOR = re.compile(r"(?i)(?:FINAL\s+ANSWER|CORRECT\s+ANSWER|ANSWER)\s*(?:IS|=|:)?\s*(-?\d+(?:\.\d+)?)")


def anchor(text: str) -> str | None:
    text = (text or "").replace(",", "")
    m = _ANCHOR.search(text)
    if m:
        return m.group(1)
    if "=" in text:
        last = None
        for seg in text.split("=")[1:]:  # the last "=" that is followed by a number (the final calculation)
            n = NUMBER.search(seg)
            if n:
                last = n.group(0)
        if last is not None:
            return last
    n = NUMBER.search(text)
    return n.group(0) if n else None


def simple(text: str) -> str | None:
    text = (text or "").replace(",", "")
    if "=" in text:
        text = text.split("=")[-1]
    n = NUMBER.search(text)
    return n.group(0) if n else None


# ---------------------------------------------------------------------------------------------------------------
# multiple-choice extractors
def legacy(text: str) -> str | None:
    m = re.search(r"[A-E]", (text or "").upper())
    return m.group(0) if m else None


def word_boundary(text: str) -> str | None:
    m = re.search(r"\b([A-E])\b", (text or "").upper())
    return m.group(1) if m else None


def answer_is(text: str) -> str | None:
    m = _regex_filter(MMLU_COT_STRICT, text or "", 0)
    if m is None:
        return None
    m = m.lower().translate(_PUNCT).upper()  # exact_match(ignore_case, ignore_punctuation), then upper
    return m or None


# ---------------------------------------------------------------------------------------------------------------
# free-form
_EXPR = re.compile(r"[0-9+\-*/×÷() .]*[0-9)][0-9+\-*/×÷() .]*")


def equation(text: str) -> str | None:
    text = text or ""
    anchors = list(re.finditer(r"(?i)(?:answer\s*(?:is|:)|answer\s*=)", text))
    candidates = [text[anchors[-1].end():].split("\n")[0]] if anchors else []
    candidates += [line for line in reversed(text.splitlines()) if line.strip()]
    for cand in candidates:
        cand = cand.split("=")[0]  # "3 * 4 + 2 = 14" -> "3 * 4 + 2"
        best = None
        for m in _EXPR.finditer(cand):
            s = m.group(0).strip().rstrip(".").strip()
            if re.search(r"\d", s) and re.search(r"[+\-*/×÷]", s.lstrip("-")):
                best = s  # keep the last expression on the line
        if best:
            return best.replace("×", "*").replace("÷", "/")
    return None


_SUM_TERMS = re.compile(r"\s*\d+(?:\s*\+\s*\d+)*\s*")


def sum_terms(text: str) -> str | None:
    text = text or ""
    return re.sub(r"\s+", "", text) if _SUM_TERMS.fullmatch(text) else None


def continuation(text: str) -> str | None:
    """wiki: the output itself, whitespace-normalized (the task truncates it to the target's length)."""
    out = " ".join((text or "").split())
    return out or None


# ---------------------------------------------------------------------------------------------------------------
# registry: name -> (fn, version). Bump a version whenever an extractor's output can change for some input.
EXTRACTORS: dict[str, tuple[Callable[[str], str | None], str]] = {
    "strict-match": (strict_match, "1"),
    "flexible-extract": (flexible_extract, "1"),
    "cot-strict-match": (cot_strict_match, "1"),
    "anchor": (anchor, "1"),
    "simple": (simple, "1"),
    "legacy": (legacy, "1"),
    "word_boundary": (word_boundary, "1"),
    "answer_is": (answer_is, "1"),
    "equation": (equation, "1"),
    "continuation": (continuation, "1"),
    "sum-terms": (sum_terms, "1"),
}
NUMERIC = ("strict-match", "flexible-extract", "cot-strict-match", "anchor", "simple")
MCQ = ("legacy", "word_boundary", "answer_is")


def _get(name: str):
    if name not in EXTRACTORS:
        import difflib

        close = difflib.get_close_matches(name, EXTRACTORS, n=1, cutoff=0.0)
        raise KeyError(f"unknown extractor {name!r}; did you mean {close[0]!r}? valid: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def extract(name: str, text: str) -> str | None:
    fn, _ = _get(name)
    return fn(text or "")


def qualified(name: str) -> str:
    """'name@version', the form recorded in results."""
    return f"{name}@{_get(name)[1]}"


# ---------------------------------------------------------------------------------------------------------------
# answer comparison
def normalize_number(s: str | None) -> str | None:
    """Canonical decimal string, or None if `s` is not a number: '$1,234.' -> '1234', '3.50' -> '3.5', '-0' -> '0'."""
    if s is None:
        return None
    t = s.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", t):
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    return out


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """Numbers compare as numbers (1,234 == 1234, 3.50 == 3.5, '$18.' == 18); anything else case-insensitively."""
    if pred is None or gold is None:
        return False
    a, b = normalize_number(pred), normalize_number(gold)
    if a is not None and b is not None:
        return a == b
    norm = lambda x: " ".join(x.strip().lower().split())
    return norm(pred) == norm(gold)


def letters_equal(pred: str | None, gold: str | None) -> bool:
    return pred is not None and gold is not None and pred.strip().upper() == gold.strip().upper()
