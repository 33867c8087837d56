"""Countdown: reach a target with some of the given numbers, each used at most once, using + - * / and parentheses.

Many answers are valid, so scoring never compares strings: the `equation` extractor pulls the expression out of the
output and `verify` parses it with a small recursive-descent parser (no eval), checks every number is one of the given
ones (as a multiset: each at most once), and evaluates exactly with fractions (6 / 4 is 3/2, not 1).

Generation guarantees solvability: the target is built by combining a random subset of the numbers with random
operations whose intermediate results stay positive integers; that construction is kept as meta["solution"] (and as
`gold`, one valid answer among many). Splits are hash-bucketed on the puzzle (sorted numbers + target), independent of
the seed, so no puzzle appears in two splits (same scheme as arithmetic).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from reasonlab.eval.extract import extract, qualified
from reasonlab.tasks.arithmetic import split_of
from reasonlab.tasks.base import Example, Score, Task, TaskError, qa_prompt

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")
MAX_EXPR_CHARS = 256


class ExprError(ValueError):
    pass


def parse_tree(expr: str):
    """The expression as a tree: an int, or (op, left, right) with op in + - * /. Grammar: expr := term (("+"|"-")
    term)* ; term := factor (("*"|"/") factor)* ; factor := INT | "(" expr ")" (left-associative). No unary minus, no
    decimals, no other characters. Raises ExprError with the reason."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[str | int] = []
    for num, ch in _TOKEN.findall(expr.strip()):
        if num:
            tokens.append(int(num))
        elif ch in "+-*/()":
            tokens.append(ch)
        elif not ch.isspace():
            raise ExprError(f"unexpected character {ch!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def factor():
        t = take() if pos < len(tokens) else None
        if isinstance(t, int):
            return t
        if t == "(":
            v = expr_()
            if (take() if pos < len(tokens) else None) != ")":
                raise ExprError("missing ')'")
            return v
        raise ExprError(f"expected a number or '(', got {t!r}")

    def chain(operand, ops):
        v = operand()
        while peek() in ops:
            op = take()
            v = (op, v, operand())
        return v

    def term():
        return chain(factor, ("*", "/"))

    def expr_():
        return chain(term, ("+", "-"))

    if not tokens:
        raise ExprError("empty expression")
    tree = expr_()
    if pos != len(tokens):
        raise ExprError(f"unexpected {tokens[pos]!r} after a complete expression")
    return tree


def _evaluate(tree, used: list[int]) -> Fraction:
    if isinstance(tree, int):
        used.append(tree)
        return Fraction(tree)
    op, a, b = tree
    x, y = _evaluate(a, used), _evaluate(b, used)
    if op == "/" and y == 0:
        raise ExprError("division by zero")
    return x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y


def parse(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an expression over non-negative integers with + - * / and parentheses, and the numbers used (in
    order). Raises ExprError with the reason (see parse_tree)."""
    used: list[int] = []
    return _evaluate(parse_tree(expr), used), used


def canonical(expr: str) -> str:
    """One spelling for expressions that differ only by commutativity and associativity (and the sign / reciprocal
    bookkeeping they imply): sums become sorted added terms then sorted subtracted ones, products sorted multiplied
    factors then sorted divisors. "9+3" -> "3+9", "1+2*3" == "(2*3)+1", "10-(3-2)" == "10+2-3". Raises ExprError."""

    def flat(tree, ops, sign, out):
        """Signed operands of a chain of +- (or */) through parentheses: a-(b-c) -> +a, -b, +c."""
        if not isinstance(tree, int) and tree[0] in ops:
            op, a, b = tree
            flat(a, ops, sign, out)
            flat(b, ops, sign if op == ops[0] else not sign, out)
        else:
            out.append((sign, tree))
        return out

    def canon(tree, inside_product: bool = False) -> str:
        if isinstance(tree, int):
            return str(tree)
        if tree[0] in "+-":
            parts = flat(tree, "+-", True, [])
            pos = sorted(canon(t) for s, t in parts if s)
            neg = sorted(canon(t) for s, t in parts if not s)
            text = "+".join(pos) + "".join("-" + t for t in neg)
            return f"({text})" if inside_product else text
        parts = flat(tree, "*/", True, [])
        num = sorted(canon(t, True) for s, t in parts if s)
        den = sorted(canon(t, True) for s, t in parts if not s)
        return "*".join(num) + "".join("/" + t for t in den)

    return canon(parse_tree(expr))


def verify(expr: str | None, numbers: list[int], target: int) -> tuple[bool, str]:
    """(ok, reason): the expression parses, uses each given number at most once, and equals target exactly."""
    if expr is None:
        return False, "no expression"
    try:
        value, used = parse(expr)
    except ExprError as e:
        return False, str(e)
    pool = list(numbers)
    for n in used:
        if n not in pool:
            return False, f"{n} is not available (numbers {numbers}, each at most once)"
        pool.remove(n)
    if value != target:
        return False, f"evaluates to {value}, not {target}"
    return True, "ok"


def generate(
    rng: random.Random, n_numbers: int, max_number: int, max_target: int, min_used: int = 3
) -> tuple[list[int], int, str]:
    """Numbers, a target reachable from a random subset (>= min_used of them), and that construction."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        k = rng.randint(min(max(min_used, 2), n_numbers), n_numbers)
        items = [(n, str(n)) for n in rng.sample(numbers, k)]
        while len(items) > 1:  # intermediate values stay positive integers (exact division only)
            (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            val = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
            items.append((val, f"({ea} {op} {eb})"))
        value, text = items[0]
        if 1 <= value <= max_target and value not in numbers:
            return numbers, value, text[1:-1]


class CountdownTask(Task):
    name = "countdown"
    version = "1"
    splits = ("train", "validation", "test")

    def __init__(
        self,
        n_numbers: int = 4,
        max_number: int = 99,
        max_target: int = 999,
        min_used: int = 3,
        seed: int = 0,
        n_train: int = 10000,
        n_validation: int = 500,
        n_test: int = 1000,
        fewshot: int = 0,
        **kw,
    ):
        super().__init__(fewshot=fewshot, **kw)
        if n_numbers < 2 or max_number < 2:
            raise TaskError(f"countdown needs n_numbers >= 2 and max_number >= 2, got {n_numbers}, {max_number}")
        self.n_numbers, self.max_number, self.max_target, self.seed = n_numbers, max_number, max_target, seed
        self.min_used = min_used  # the generator's construction uses at least this many numbers (no "a + b" puzzles)
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        self.check_split(split)
        if split in self._cache:
            return self._cache[split]
        n, rng = self.sizes[split], random.Random(f"countdown/{self.seed}/{split}")
        seen: set[str] = set()
        out: list[Example] = []
        budget = 40 * n + 1000
        while len(out) < n and budget > 0:
            budget -= 1
            numbers, target, solution = generate(rng, self.n_numbers, self.max_number, self.max_target, self.min_used)
            key = f"{sorted(numbers)}->{target}"
            if key in seen or split_of(key, "countdown") != split:
                continue
            seen.add(key)
            q = f"Numbers: {', '.join(map(str, numbers))}. Target: {target}."
            meta = {"numbers": numbers, "target": target, "solution": solution}
            out.append(Example(f"countdown/{split}/{len(out)}", q, solution, None, meta))
        if len(out) < n:
            raise TaskError(f"countdown: only {len(out)} distinct {split} puzzles; ask for fewer (n_{split}) or larger numbers")
        self._cache[split] = out
        return out

    def prompt(self, example: Example, style: str = "default") -> str:
        self.check_style(style)
        rules = (
            "Use some of the numbers, each at most once, with + - * / and parentheses, to make the target. "
            "Write the expression after 'Answer:'."
        )
        if style == "markovian":
            return qa_prompt(f"{rules}\n{example.question}", style)
        tgt = lambda e: f"{e.gold}" if style == "default" else f"Try combining the numbers. The answer is {e.gold}."
        shots = [(e.question, tgt(e)) for e in self.shots(example)]
        return qa_prompt(example.question, style, shots, rules)

    def score(self, output: str, example: Example) -> Score:
        key = qualified("equation")
        expr = extract("equation", output)
        ok, _ = verify(expr, example.meta["numbers"], example.meta["target"])
        return Score(expr, ok, expr is not None, key, {key: expr}, {key: ok})

    def canonical_answer(self, answer: str | None) -> str | None:
        """The expression's canonical spelling (countdown.canonical), so "9+3" and "3+9" are one answer for diversity;
        an unparsable one stays as written."""
        if answer is None:
            return None
        try:
            return canonical(answer)
        except ExprError:
            return answer.strip()

    def check(self, output: str, example: Example) -> str:
        """Why an output is right or wrong, in words (for reports and debugging)."""
        return verify(extract("equation", output), example.meta["numbers"], example.meta["target"])[1]
