"""Grid-rule puzzle families: a seeded generator where generalization to unseen rules can be measured honestly.

A *rule* is a composition of up to three primitive slots, applied in this order:

    move   : none | gravity_{down,up,left,right}          (non-background cells slide to one side, order kept)
    geo    : id | rot90 | rot180 | rot270 | flip_ud | flip_lr | transpose | anti_transpose   (the dihedral group)
    colour : none | map | fill                            (map: a random bijection palette -> new colours;
                                                           fill: background -> one random colour)
             | swap_a_b                                   (colours a and b trade places, 1 <= a < b <= 9; the
                                                           shorthand "swap" enables all 36)
             | swap_ab_cd                                 (two disjoint swaps at once, e.g. swap_12_34; "swap2"
                                                           enables all 378)

e.g. "gravity_left+rot90+map". A *puzzle instance* is one rule with instance-specific random parameters (the colour
map, the fill colour, the grids' palette and sizes): `n_demos` demonstration pairs plus `n_tests` test pairs. The colour
parameters differ per instance, so even a training rule can only be solved by reading the demos; a puzzle id cannot
carry them to a new instance.

Splits are made by RULE: `heldout_rules` compositions never appear in training in any instance. The held-out rules are
chosen among compositions whose primitives (and, with `pair_coverage`, every pair of whose non-trivial steps) do appear
in training rules, so they are unseen compositions of seen parts: that is what makes generalization possible at all.
Swaps have no per-instance parameters, so a held-out swap is a function no training instance ever computed (colour
augmentation must then be off: permuting colours turns one swap into another). A single swap's parts are its two
colours (held-out swap_3_7 needs 3 and 7 each swapped with other partners in training); a double swap's parts are its
two pairs (held-out swap_12_34 needs (1 2) and (3 4) each trained inside other double swaps).
Splits:
    train    instances of training rules                      (demos + tests may be used for training)
    val      fresh instances of training rules                 (held-out instances, seen rules)
    heldout  instances of held-out rules                       (rules never seen in training)

Every instance is checked to be *identifiable*: `solve()` (a brute-force oracle over all rules and parameters) must
reproduce every test output from the demos alone, otherwise the instance is resampled. `leakage_check()` proves the
held-out split is clean: no shared instance ids, no shared grids, no shared rule names, and no held-out rule that is
functionally equal to a training rule on probe grids (two different names can be one function, e.g. flip_ud∘rot180 =
flip_lr; the rule list is deduplicated by function, and the check re-verifies it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from reasonlab.tasks.base import Example, Score, Task

MOVES = ("none", "gravity_down", "gravity_up", "gravity_left", "gravity_right")
GEOS = ("id", "rot90", "rot180", "rot270", "flip_ud", "flip_lr", "transpose", "anti_transpose")
COLOURS = ("none", "map", "fill")
SWAPS = tuple(f"swap_{a}_{b}" for a in range(1, 10) for b in range(a + 1, 10))  # fixed colour transpositions
_PAIRS = [(a, b) for a in range(1, 10) for b in range(a + 1, 10)]
SWAPS2 = tuple(f"swap_{a}{b}_{c}{d}" for (a, b), (c, d) in itertools.combinations(_PAIRS, 2)
               if len({a, b, c, d}) == 4)  # two disjoint transpositions at once
ALL_SWAPS = frozenset(SWAPS + SWAPS2)
N_COLOURS = 10  # 0 = background, 1..9 = colours (ARC's palette)

Grid = np.ndarray  # (H, W) int8 in 0..9


# ----------------------------------------------------------------------------- primitives

def geo(g: Grid, name: str) -> Grid:
    if name == "id":
        return g.copy()
    if name == "rot90":  # counter-clockwise, as np.rot90
        return np.rot90(g, 1).copy()
    if name == "rot180":
        return np.rot90(g, 2).copy()
    if name == "rot270":
        return np.rot90(g, 3).copy()
    if name == "flip_ud":
        return g[::-1].copy()
    if name == "flip_lr":
        return g[:, ::-1].copy()
    if name == "transpose":
        return g.T.copy()
    if name == "anti_transpose":
        return np.rot90(g, 2).T.copy()
    raise ValueError(f"unknown geo {name!r}; valid: {GEOS}")


def gravity(g: Grid, direction: str) -> Grid:
    """Non-zero cells slide towards `direction` keeping their order; background fills the rest."""
    # Reduce every direction to "down" by rotating, sliding each column, and rotating back.
    k = {"down": 0, "left": 1, "up": 2, "right": 3}[direction]
    r = np.rot90(g, k)  # (H', W')
    out = np.zeros_like(r)
    for j in range(r.shape[1]):
        col = r[:, j][r[:, j] != 0]
        if len(col):
            out[-len(col):, j] = col
    return np.rot90(out, -k).copy()


def move(g: Grid, name: str) -> Grid:
    if name == "none":
        return g.copy()
    return gravity(g, name.split("_", 1)[1])


def swap_pairs(name: str) -> list[tuple[int, int]]:
    """'swap_3_7' -> [(3, 7)]; 'swap_12_34' -> [(1, 2), (3, 4)]."""
    parts = name.split("_")[1:]
    if all(len(p) == 1 for p in parts):
        return [(int(parts[0]), int(parts[1]))]
    return [(int(p[0]), int(p[1])) for p in parts]


def recolour(g: Grid, kind: str, params: dict) -> Grid:
    if kind == "none":
        return g.copy()
    if kind in ALL_SWAPS:
        lut = np.arange(N_COLOURS, dtype=g.dtype)
        for a, b in swap_pairs(kind):
            lut[a], lut[b] = b, a
        return lut[g]
    if kind == "map":
        lut = np.arange(N_COLOURS, dtype=g.dtype)
        for a, b in params["map"].items():
            lut[int(a)] = b
        return lut[g]
    if kind == "fill":
        out = g.copy()
        out[g == 0] = params["fill"]
        return out
    raise ValueError(f"unknown colour op {kind!r}; valid: {COLOURS}")


@dataclass(frozen=True)
class Rule:
    move: str = "none"
    geo: str = "id"
    colour: str = "none"

    @property
    def name(self) -> str:
        parts = [p for p, trivial in ((self.move, "none"), (self.geo, "id"), (self.colour, "none")) if p != trivial]
        return "+".join(parts) or "identity"

    @property
    def steps(self) -> tuple[str, ...]:
        """The non-trivial primitives, e.g. ('gravity_left', 'rot90', 'map')."""
        return tuple(self.name.split("+")) if self.name != "identity" else ()

    def apply(self, g: Grid, params: dict) -> Grid:
        return recolour(geo(move(g, self.move), self.geo), self.colour, params)

    @staticmethod
    def parse(name: str) -> "Rule":
        kw = {}
        for part in name.split("+"):
            slot = ("move" if part in MOVES else "geo" if part in GEOS else
                    "colour" if part in COLOURS or part in ALL_SWAPS else None)
            if slot is None:
                raise ValueError(f"unknown primitive {part!r} in rule {name!r}")
            kw[slot] = part
        return Rule(**kw)


# ----------------------------------------------------------------------------- rule sets and splits

def _probe_grids(n: int = 6, seed: int = 12345) -> list[Grid]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in [(4, 5), (5, 5), (6, 4), (5, 7), (7, 6), (6, 6)][:n]:
        g = rng.integers(1, 5, size=(h, w)) * (rng.random((h, w)) < 0.45)
        out.append(g.astype(np.int8))
    # every colour 1..9 present, so each swap_a_b has its own signature
    out.append(np.concatenate([np.arange(10), np.arange(10)[::-1]]).reshape(4, 5).astype(np.int8))
    return out


_PROBE_PARAMS = {"map": {1: 5, 2: 6, 3: 7, 4: 8}, "fill": 9}


def rule_signature(rule: Rule) -> str:
    """A hash of the rule's outputs on fixed probe grids: equal signatures = the same function (for these params)."""
    h = hashlib.sha1()
    for g in _probe_grids():
        o = rule.apply(g, _PROBE_PARAMS)
        h.update(str(o.shape).encode() + o.astype(np.int8).tobytes())
    return h.hexdigest()[:16]


def expand_colours(colours) -> tuple[str, ...]:
    """The colour ops a config enables, with the shorthands 'swap' (all 36 swap_a_b) and 'swap2' (all 378 swap_ab_cd)
    expanded."""
    out: list[str] = []
    for c in colours:
        for name in {"swap": SWAPS, "swap2": SWAPS2}.get(c, (c,)):
            if name not in COLOURS and name not in ALL_SWAPS:
                raise ValueError(f"unknown colour op {name!r}; valid: {', '.join(COLOURS)}, swap, swap2, swap_a_b, "
                                 "swap_ab_cd")
            if name not in out:
                out.append(name)
    return tuple(out)


def atoms(rule: Rule) -> set[str]:
    """The parts training must show for a held-out rule to be an unseen composition of seen parts: each step, except
    that a single swap's parts are its colours (swap_3_7 -> {'swap:3', 'swap:7'}) and a double swap's its pairs
    (swap_12_34 -> {'swap:1-2', 'swap:3-4'})."""
    out = set()
    for s in rule.steps:
        if s in SWAPS:
            out |= {f"swap:{c}" for c in swap_pairs(s)[0]}
        elif s in ALL_SWAPS:
            out |= {f"swap:{a}-{b}" for a, b in swap_pairs(s)}
        else:
            out.add(s)
    return out


def all_rules(moves=MOVES, geos=GEOS, colours=COLOURS) -> list[Rule]:
    """Every composition of the enabled primitives, minus identity, deduplicated by function (first name wins)."""
    seen, rules = set(), []
    for m, g, c in itertools.product(moves, geos, expand_colours(colours)):
        r = Rule(m, g, c)
        if r.name == "identity":
            continue
        sig = rule_signature(r)
        if sig not in seen:
            seen.add(sig)
            rules.append(r)
    return rules


def split_rules(rules: list[Rule], n_heldout: int, seed: int, min_steps: int = 2,
                pair_coverage: bool = True) -> tuple[list[Rule], list[Rule]]:
    """Pick `n_heldout` compositions (>= min_steps primitives) to hold out so that every atom (see atoms()), and with
    pair_coverage every pair of a held-out rule's primitives, still appears in some training rule."""
    rng = np.random.default_rng(seed)
    candidates = [r for r in rules if len(r.steps) >= min_steps]
    order = rng.permutation(len(candidates))
    held: list[Rule] = []
    for i in order:
        if len(held) == n_heldout:
            break
        trial = held + [candidates[i]]
        train = [r for r in rules if r not in trial]
        seen_atoms = set().union(*(atoms(r) for r in train))
        seen_pairs = {p for r in train for p in itertools.combinations(r.steps, 2)}
        ok = all(atoms(r) <= seen_atoms for r in trial)
        if pair_coverage:
            ok = ok and all(set(itertools.combinations(r.steps, 2)) <= seen_pairs for r in trial)
        if ok:
            held = trial
    if len(held) < n_heldout:
        raise ValueError(f"only {len(held)} of heldout_rules={n_heldout} rules can be held out with every primitive"
                         f"{' and pair' if pair_coverage else ''} still covered in training; lower heldout_rules")
    return [r for r in rules if r not in held], held


# ----------------------------------------------------------------------------- instances

@dataclass
class Puzzle:
    id: str
    rule: str
    params: dict
    demos: list[tuple[Grid, Grid]]
    tests: list[tuple[Grid, Grid]]


def _random_grid(rng: np.random.Generator, palette: list[int], min_size: int, max_size: int,
                 density: tuple[float, float]) -> Grid:
    h, w = rng.integers(min_size, max_size + 1, size=2)
    g = np.zeros((h, w), dtype=np.int8)
    mask = rng.random((h, w)) < rng.uniform(*density)
    g[mask] = rng.choice(palette, size=int(mask.sum()))
    # every palette colour present at least once, so a colour map is readable from every demo
    cells = rng.choice(h * w, size=len(palette), replace=False)
    g.flat[cells] = palette
    return g


def _sample_params(rule: Rule, rng: np.random.Generator, palette: list[int]) -> dict:
    params: dict = {}
    if rule.colour == "map":
        targets = rng.choice(np.arange(1, N_COLOURS), size=len(palette), replace=False)
        while all(int(t) == p for t, p in zip(targets, palette)):  # never the identity map
            targets = rng.choice(np.arange(1, N_COLOURS), size=len(palette), replace=False)
        params["map"] = {int(p): int(t) for p, t in zip(palette, targets)}
    if rule.colour == "fill":
        params["fill"] = int(rng.choice([c for c in range(1, N_COLOURS) if c not in palette]))
    return params


def solve(demos: list[tuple[Grid, Grid]], test_inputs: list[Grid], rules: list[Rule]) -> list[list[Grid]]:
    """Brute-force oracle: for every rule, infer colour parameters from the demos; return the distinct predictions
    (one list per consistent hypothesis) for the test inputs. One distinct answer = the instance is identifiable."""
    answers: dict[bytes, list[Grid]] = {}
    for rule in rules:
        base = Rule(rule.move, rule.geo, "none")
        params: dict = {}
        ok = True
        for x, y in demos:
            s = base.apply(x, {})
            if s.shape != y.shape:
                ok = False
                break
            if rule.colour == "none" or rule.colour in ALL_SWAPS:
                ok = np.array_equal(recolour(s, rule.colour, {}), y)
            elif rule.colour == "fill":
                ok = np.array_equal(s[s != 0], y[s != 0]) and len(np.unique(y[s == 0])) <= 1
                if ok and (s == 0).any():
                    c = int(y[s == 0][0])
                    ok = c != 0 and params.setdefault("fill", c) == c
            else:  # map: a consistent function colour -> colour; background stays background
                m = params.setdefault("map", {})
                for a, b in set(zip(s.flat, y.flat)):
                    a, b = int(a), int(b)
                    if (a == 0) != (b == 0) or m.setdefault(a, b) != b:
                        ok = False
                        break
            if not ok:
                break
        if not ok:
            continue
        if rule.colour == "map" and params["map"] and all(a == b for a, b in params["map"].items() if a):
            continue  # an identity map is not a "map" rule
        preds = []
        for x in test_inputs:
            s = base.apply(x, {})
            if rule.colour == "map" and not set(np.unique(s).tolist()) - {0} <= set(params["map"]):
                preds = None  # a test colour the demos never mapped: this hypothesis cannot answer
                break
            preds.append(recolour(s, rule.colour, params) if rule.colour != "fill" or "fill" in params else None)
        if preds is None or any(p is None for p in preds):
            continue
        answers.setdefault(b"".join(str(p.shape).encode() + p.tobytes() for p in preds), preds)
    return list(answers.values())


def sample_puzzle(rule: Rule, rng: np.random.Generator, pid: str, n_demos: int = 3, n_tests: int = 1,
                  min_size: int = 4, max_size: int = 6, palette_size: tuple[int, int] = (2, 3),
                  density: tuple[float, float] = (0.3, 0.5), check_rules: list[Rule] | None = None,
                  max_tries: int = 50) -> Puzzle:
    """One identifiable instance of `rule` (resampled until the oracle over `check_rules` has one answer)."""
    for _ in range(max_tries):
        palette = sorted(int(c) for c in rng.choice(np.arange(1, N_COLOURS), size=int(rng.integers(
            palette_size[0], palette_size[1] + 1)), replace=False))
        if rule.colour in ALL_SWAPS:  # every swapped colour in every grid (palette colours always are), + 0-1 others
            swapped = {c for pair in swap_pairs(rule.colour) for c in pair}
            others = [c for c in palette if c not in swapped]
            palette = sorted(swapped | set(others[: len(palette) - 2]))  # len(palette) is 2-3: 0-1 unswapped colours
        params = _sample_params(rule, rng, palette)
        grids = [_random_grid(rng, palette, min_size, max_size, density) for _ in range(n_demos + n_tests)]
        pairs = [(g, rule.apply(g, params)) for g in grids]
        if any(np.array_equal(x, y) for x, y in pairs):
            continue  # a demo the rule leaves unchanged teaches nothing and makes rules ambiguous
        demos, tests = pairs[:n_demos], pairs[n_demos:]
        if check_rules is not None:
            sols = solve(demos, [x for x, _ in tests], check_rules)
            if len(sols) != 1:
                continue
        return Puzzle(pid, rule.name, params, demos, tests)
    raise RuntimeError(f"could not sample an identifiable instance of {rule.name} in {max_tries} tries; "
                       "use more demos or larger grids")


def content_id(p: Puzzle) -> str:
    """An instance's id from its content (rule and every grid): equal content <=> equal id, in any split."""
    h = hashlib.sha1(p.rule.encode())
    for x, y in p.demos + p.tests:
        h.update(grid_key(x).encode() + b">" + grid_key(y).encode() + b";")
    return f"gr-{h.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- leakage

def grid_key(g: Grid) -> str:
    return f"{g.shape[0]}x{g.shape[1]}:" + "".join(map(str, g.flatten().tolist()))


def leakage_check(train: list[Puzzle], heldout: list[Puzzle], allow_same_rules: bool = False) -> list[str]:
    """Everything the held-out split shares with training, as a list of one-line problems (empty = clean).
    Checks instance ids, rule names, rule functions (probe signatures), and any shared input->output pair."""
    problems = []
    ids = {p.id for p in train} & {p.id for p in heldout}
    if ids:
        problems.append(f"{len(ids)} puzzle ids in both splits, e.g. {sorted(ids)[:3]}")
    if not allow_same_rules:
        names = {p.rule for p in train} & {p.rule for p in heldout}
        if names:
            problems.append(f"{len(names)} held-out rules also in training: {sorted(names)[:5]}")
        sig_train = {rule_signature(Rule.parse(r)): r for r in {p.rule for p in train}}
        for r in sorted({p.rule for p in heldout}):
            s = rule_signature(Rule.parse(r))
            if s in sig_train and sig_train[s] != r:
                problems.append(f"held-out rule {r} is functionally identical to training rule {sig_train[s]}")
    train_pairs = {grid_key(x) + "->" + grid_key(y) for p in train for x, y in p.demos + p.tests}
    shared = [p.id for p in heldout for x, y in p.demos + p.tests if grid_key(x) + "->" + grid_key(y) in train_pairs]
    if shared:
        problems.append(f"{len(shared)} held-out input->output pairs also appear in training, e.g. in {shared[:3]}")
    return problems


# ----------------------------------------------------------------------------- the Task

def render(g: Grid) -> str:
    return "\n".join("".join(str(int(v)) for v in row) for row in g)


def parse_grid(text: str) -> Grid | None:
    rows = [r.strip() for r in text.strip().splitlines() if r.strip()]
    if not rows or any(not r.isdigit() or len(r) != len(rows[0]) for r in rows):
        return None
    return np.array([[int(c) for c in r] for r in rows], dtype=np.int8)


@dataclass
class GridRulesConfig:
    seed: int = field(default=0, metadata={"help": "generator seed (rules split + instances)"})
    moves: tuple[str, ...] = field(default=MOVES, metadata={"help": "enabled move primitives ('none' = optional)"})
    geos: tuple[str, ...] = field(default=GEOS, metadata={"help": "enabled dihedral transforms ('id' = optional)"})
    colours: tuple[str, ...] = field(default=COLOURS, metadata={"help": "enabled colour ops ('none' = optional; "
                                                                    "'swap' / 'swap2' = all single / double swaps)"})
    heldout_rules: int = field(default=8, metadata={"help": "rules held out of training entirely"})
    heldout_min_steps: int = field(default=2, metadata={"help": "a held-out rule composes at least this many steps"})
    pair_coverage: bool = field(default=True, metadata={"help": "every step pair of a held-out rule seen in training"})
    n_train: int = field(default=2000, metadata={"help": "training instances"})
    n_val: int = field(default=100, metadata={"help": "held-out instances of training rules"})
    n_heldout: int = field(default=200, metadata={"help": "instances of held-out rules"})
    n_demos: int = field(default=3, metadata={"help": "demonstration pairs per instance"})
    n_tests: int = field(default=1, metadata={"help": "test pairs per instance"})
    min_size: int = field(default=4, metadata={"help": "smallest grid side"})
    max_size: int = field(default=6, metadata={"help": "largest grid side"})


class GridRulesTask(Task):
    """Task view of the generator. An Example is one (instance, test pair); `meta` holds the demos as lists."""

    name = "grid-rules"
    version = "1"
    splits = ("train", "val", "heldout")

    def __init__(self, **kwargs):
        from reasonlab.tasks.base import TaskError

        known = set(GridRulesConfig.__dataclass_fields__)
        bad = sorted(set(kwargs) - known)
        if bad:
            raise TaskError(f"grid-rules has no argument {bad[0]!r}; valid: {', '.join(sorted(known))}")
        self.cfg = GridRulesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
        c = self.cfg
        try:
            self.rules = all_rules(c.moves, c.geos, c.colours)
            self.train_rules, self.heldout_rules = split_rules(self.rules, c.heldout_rules, c.seed,
                                                               c.heldout_min_steps, c.pair_coverage)
        except ValueError as e:
            raise TaskError(str(e)) from None
        self._cache: dict[str, list[Puzzle]] = {}

    def puzzles(self, split: str) -> list[Puzzle]:
        if split not in self.splits:
            raise ValueError(f"grid-rules has splits {self.splits}, not {split!r}")
        if split not in self._cache:
            c = self.cfg
            n = {"train": c.n_train, "val": c.n_val, "heldout": c.n_heldout}[split]
            rules = self.heldout_rules if split == "heldout" else self.train_rules
            # one independent stream per split: adding training instances never changes the evaluation sets
            rng = np.random.default_rng([c.seed, self.splits.index(split) + 1])
            out = []
            for i in range(n):
                p = sample_puzzle(rules[i % len(rules)], rng, "", c.n_demos, c.n_tests, c.min_size, c.max_size,
                                  check_rules=self.rules)
                p.id = content_id(p)
                out.append(p)
            self._cache[split] = out
        return self._cache[split]

    # ---- the TRM recipe's grid interface (as tasks.arc_agi)
    split_mode = "heldout"

    def grid_tasks(self, split: str) -> list:
        """GridTask views (id, demos, tests) of a split's instances, for tasks.grids.build_grid_dataset."""
        from reasonlab.tasks.arc_agi import GridTask

        return [GridTask(p.id, list(p.demos), list(p.tests), {"rule": p.rule}) for p in self.puzzles(split)]

    def leakage(self) -> dict:
        """Proves the held-out split is clean against training (ids, rules, rule functions, input/output pairs) and
        that val shares no instance or pair with training; raises LeakageError naming the first problem."""
        from reasonlab.tasks.arc_agi import LeakageError

        train = self.puzzles("train")
        out = {}
        for split, same_rules in (("val", True), ("heldout", False)):
            problems = leakage_check(train, self.puzzles(split), allow_same_rules=same_rules)
            if problems:
                raise LeakageError(f"grid-rules {split} leaks into training: {problems[0]}")
            out[split] = {"problems": 0, "n": len(self.puzzles(split)),
                          "rules": sorted({p.rule for p in self.puzzles(split)}) if split == "heldout" else
                          len({p.rule for p in self.puzzles(split)})}
        out["train_rules"] = len(self.train_rules)
        return out

    def examples(self, split: str) -> list[Example]:
        out = []
        for p in self.puzzles(split):
            for t, (x, y) in enumerate(p.tests):
                q = "\n\n".join(f"Example {i + 1} input:\n{render(a)}\nExample {i + 1} output:\n{render(b)}"
                                for i, (a, b) in enumerate(p.demos)) + f"\n\nTest input:\n{render(x)}"
                out.append(Example(id=f"{p.id}/{t}", question=q, gold=render(y), meta={
                    "puzzle": p.id, "rule": p.rule, "params": json.loads(json.dumps(p.params)),
                    "demos": [(a.tolist(), b.tolist()) for a, b in p.demos], "test_input": x.tolist()}))
        return out

    def prompt(self, example: Example, style: str = "default") -> str:
        if style == "markovian":
            return f"Infer the rule from the examples and apply it.\nQuestion: {example.question}\nReasoning:"
        head = "Infer the grid rule from the examples and give the test output grid, one row per line."
        if style == "cot":
            return f"{head}\n\n{example.question}\n\nThink step by step, then give the output grid."
        return f"{head}\n\n{example.question}\n\nTest output:\n"

    def score(self, output: str, example: Example) -> Score:
        pred = parse_grid(output)
        extracted = None if pred is None else render(pred)
        correct = extracted == example.gold
        key = "grid@1"
        return Score(extracted=extracted, correct=correct, valid=pred is not None, extractor=key,
                     extractions={key: extracted}, correct_by={key: correct})
