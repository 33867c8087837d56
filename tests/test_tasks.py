"""Tasks: registry, the Score contract, generated tasks (determinism, split disjointness, countdown verifier), local
loaders on ../shared/data, hub-record mapping through hub-format export folders, and the log-likelihood interface."""

import json
import sys
import types
from pathlib import Path

import pytest

from reasonlab.tasks import TASKS, get_task, list_tasks
from reasonlab.tasks.base import TaskError
from reasonlab.tasks.loaders import DataUnavailable, carve, load_hub

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("REASONLAB_DATA", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# registry
def test_registry_names():
    want = {"gsm8k", "svamp", "aqua", "mathqa", "mmlu", "arc-easy", "arc-challenge", "wiki", "arithmetic", "countdown",
            "sudoku", "arc-agi-1", "arc-agi-2", "grid-rules", "counting", "word-recall", "subset-sum", "number-words"}
    assert set(list_tasks()) == want
    assert TASKS["arc-agi-2"] == "reasonlab.tasks.arc_agi:ArcAgiTask"


def test_unknown_task_is_one_line_with_closest_name():
    with pytest.raises(TaskError) as e:
        get_task("gsm8")
    msg = str(e.value)
    assert "\n" not in msg and "did you mean 'gsm8k'" in msg


def test_unknown_split_and_style():
    t = get_task("arithmetic", n_train=10, n_validation=10, n_test=10)
    with pytest.raises(TaskError, match="no split 'dev'"):
        t.examples("dev")
    with pytest.raises(TaskError, match="unknown prompt style"):
        t.prompt(t.examples("test")[0], "fancy")


# ---------------------------------------------------------------------------------------------------------------
# arithmetic
def _small_arith(**kw):
    return get_task("arithmetic", n_train=400, n_validation=100, n_test=100, **kw)


def test_arithmetic_deterministic_and_seeded():
    a, b, c = _small_arith(seed=3), _small_arith(seed=3), _small_arith(seed=4)
    for split in ("train", "validation", "test"):
        assert a.examples(split) == b.examples(split)
    assert [e.question for e in a.examples("test")] != [e.question for e in c.examples("test")]


def test_arithmetic_splits_disjoint_across_seeds():
    qs = {s: set() for s in ("train", "validation", "test")}
    for seed in (0, 1):
        # 9^3 = 729 possible questions: a small space, so a leak across splits would show up
        t = get_task("arithmetic", seed=seed, n_terms=3, digits=1, n_train=400, n_validation=50, n_test=50)
        for s in qs:
            ex = t.examples(s)
            assert len({e.question for e in ex}) == len(ex)  # no repeats within a split
            assert len({e.id for e in ex}) == len(ex)
            qs[s] |= {e.question for e in ex}
    assert not (qs["train"] & qs["test"]) and not (qs["train"] & qs["validation"]) and not (qs["validation"] & qs["test"])


def test_arithmetic_gold_and_precedence():
    t = _small_arith(ops="+-*", n_terms=4, digits=2)
    for e in t.examples("test"):
        assert int(e.gold) == eval(e.question)  # trusted generated string; the task itself never evals
    with pytest.raises(TaskError, match="distinct test questions"):
        get_task("arithmetic", n_terms=2, digits=1, n_test=500).examples("test")


def test_arithmetic_max_value_bounds_every_number():
    t = _small_arith(n_terms=2, max_value=40)
    nums = [n for e in t.examples("train") for n in e.meta["numbers"]]
    assert min(nums) >= 1 and max(nums) == 40  # 1..40, not 1..99 as digits=2 alone would give
    with pytest.raises(TaskError, match="max_value must be >= 2"):
        get_task("arithmetic", max_value=1)


def test_arithmetic_score_contract():
    t = _small_arith()
    e = t.examples("test")[0]
    s = t.score(f"Adding them up. The answer is {e.gold}.", e)
    assert s.valid and s.correct and s.extractor == "anchor@1" and s.extracted == e.gold
    assert set(s.extractions) == {"anchor@1", "simple@1", "flexible-extract@1", "cot-strict-match@1"}
    assert s.correct_by["cot-strict-match@1"] is True
    bad = t.score("I cannot tell.", e)
    assert not bad.valid and not bad.correct and bad.extracted is None
    assert t.reward(f"Answer: {e.gold}", e) == 1.0 and t.reward("Answer: -1", e) == 0.0
    p = t.prompt(e, "markovian")
    assert p.endswith(f"Question: {e.question}\nReasoning:")
    assert "<Redacted>" in t.markovian_answer_prompt(e, "some reasoning") and e.question not in t.markovian_answer_prompt(e, "x")


def test_fewshot_excludes_the_example_itself():
    t = get_task("arithmetic", n_train=50, n_validation=10, n_test=10, fewshot=3)
    e = t.examples("test")[0]
    shots = t.shots(e)
    assert len(shots) == 3 and all(s.id.startswith("arithmetic/train/") for s in shots)
    assert t.shots(e) == shots  # fixed, not re-drawn per call
    for pooled in shots:  # a pooled example as the query still gets 3 shots, none of them itself
        assert len(t.shots(pooled)) == 3 and pooled not in t.shots(pooled)
    assert t.prompt(e).count("Question:") == 4 and t.prompt(e, "markovian").count("Question:") == 1


# ---------------------------------------------------------------------------------------------------------------
# countdown
@pytest.mark.parametrize(
    "expr,numbers,target,ok",
    [("(25 - 5) * 3", [25, 5, 3, 7], 60, True),
     ("7 * (3 + 5) - 25", [25, 5, 3, 7], 31, True),
     ("100 / (7 - 3)", [100, 7, 3, 1], 25, True),
     ("6 / 4 * 2", [6, 4, 2, 9], 3, True),           # exact fractions: 6/4 is 3/2
     ("6 / 4", [6, 4, 2, 9], 1, False),              # no integer division
     ("25 * 3", [25, 5, 3, 7], 60, False),            # wrong value
     ("25 - 5 * 3", [25, 5, 3, 7], 60, False),        # precedence respected
     ("5 * 3 * 4", [25, 5, 3, 7], 60, False),         # 4 is not available
     ("3 * 3 + 51", [3, 51, 6, 8], 60, False),        # 3 used twice
     ("-3 + 63", [3, 63, 1, 2], 60, False),           # no unary minus
     ("2 ** 6", [2, 6, 1, 1], 64, False),             # no power
     ("7 / (3 - 3)", [7, 3, 3, 1], 1, False),         # division by zero is an error, not a crash
     ("__import__('os')", [1, 2, 3, 4], 1, False),    # not parsed, never evaluated
     ("(25 - 5 * 3", [25, 5, 3, 7], 10, False),
     (None, [1, 2], 3, False)],
)
def test_countdown_verifier(expr, numbers, target, ok):
    from reasonlab.tasks.countdown import verify

    assert verify(expr, numbers, target)[0] is ok


def test_countdown_generator_solvable_deterministic_disjoint():
    from reasonlab.tasks.countdown import verify

    a = get_task("countdown", n_train=300, n_validation=60, n_test=60)
    b = get_task("countdown", n_train=300, n_validation=60, n_test=60)
    keys = {}
    for s in a.splits:
        ex = a.examples(s)
        assert ex == b.examples(s)
        assert all(verify(e.gold, e.meta["numbers"], e.meta["target"])[0] for e in ex)
        assert all(e.meta["target"] not in e.meta["numbers"] for e in ex)
        keys[s] = {(tuple(sorted(e.meta["numbers"])), e.meta["target"]) for e in ex}
        assert len(keys[s]) == len(ex)
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    e = a.examples("test")[0]
    assert a.score(f"Let me try.\nAnswer: {e.gold} = {e.meta['target']}", e).correct
    e = next(e for e in a.examples("test") if len(set(e.meta["numbers"])) == len(e.meta["numbers"]))
    n = e.meta["numbers"]
    twice = f"Answer: {n[0]} + {n[0]}"
    assert a.score(twice, e).valid and not a.score(twice, e).correct and "at most once" in a.check(twice, e)
    assert not a.score("I give up", e).valid


# ---------------------------------------------------------------------------------------------------------------
# local loaders on ../shared/data
@needs_data
def test_gsm8k_local():
    t = get_task("gsm8k", data_dir=DATA)
    tr, va, te = (t.examples(s) for s in ("train", "validation", "test"))
    assert (len(tr), len(va), len(te)) == (7473 - 500, 500, 1319)
    assert te[0].id == "gsm8k/test/0" and te[0].gold == "18" and te[0].question.startswith("Janet")
    assert not ({e.question for e in tr} & {e.question for e in va})
    assert {e.meta["source"] for e in va} <= {f"train:{i}" for i in range(7473)}
    s = t.score("She makes 9 * 2 = $18 every day.\n#### 18", te[0])
    assert s.correct and s.extractions["strict-match@1"] == "18" and s.extractor == "flexible-extract@1"
    assert "<<" not in t.examples("train")[0].meta["rationale"]


@needs_data
def test_env_var_is_the_fallback_root(monkeypatch):
    monkeypatch.setenv("REASONLAB_DATA", str(DATA))
    assert len(get_task("svamp").examples("test")) == 300


@needs_data
def test_svamp_local_splits():
    t = get_task("svamp", data_dir=DATA)
    ids = {s: {e.id.split("/")[-1] for e in t.examples(s)} for s in t.splits}
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [600, 100, 300]
    assert not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"]) and not (ids["train"] & ids["validation"])
    for e in t.examples("test"):
        assert not e.gold.endswith(".0")  # SVAMP's 51.0 becomes the canonical "51"
    e = t.examples("test")[0]
    assert t.score(f"The answer is {e.gold}.", e).correct and t.score(f"The answer is {e.gold}.5", e).correct is False


@needs_data
def test_aqua_local():
    t = get_task("aqua", data_dir=DATA)
    va, te = t.examples("validation"), t.examples("test")
    assert len(va) == len(te) == 254
    e = te[0]
    assert e.gold in "ABCDE" and len(e.choices) == 5 and not e.choices[0].startswith("A)")
    assert t.score("The answer is (A).", e).extractions == {"word_boundary@1": "A", "legacy@1": "E", "answer_is@1": "A"}
    assert t.choice_continuations(e) == [" A", " B", " C", " D", " E"] and t.gold_index(e) == "ABCDE".index(e.gold)
    with pytest.raises(DataUnavailable, match="use fewshot=0"):  # no local train split for AQuA
        get_task("aqua", data_dir=DATA, fewshot=1).prompt(e)


def test_missing_data_is_one_clear_line(tmp_path):
    for name in ("gsm8k", "svamp", "aqua", "mmlu", "arc-easy", "mathqa", "wiki"):
        with pytest.raises(DataUnavailable) as e:
            get_task(name).examples("test")
        msg = str(e.value)
        assert "\n" not in msg and "REASONLAB_DATA" in msg and "data_dir" in msg, msg
    with pytest.raises(DataUnavailable, match="is not a directory"):
        get_task("gsm8k", data_dir=tmp_path / "nope").examples("test")


# ---------------------------------------------------------------------------------------------------------------
# hub records: the same mapping runs on hub-format export folders (<root>/<task>/<split>.jsonl)
def _write_jsonl(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


MMLU_REC = {"question": "What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}
ARC_REC = {"id": "Mercury_7175875", "question": "Which gas do plants absorb?",
           "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["1", "2", "3"]}, "answerKey": "2"}
MATHQA_REC = {"Problem": "a train covers 10 km in 2 hours . speed ?", "Rationale": "\"10 / 2 = 5\"",
              "options": "a ) 5 km / h , b ) 1,000 , c ) 3 , d ) 2 , e ) none of these", "correct": "a",
              "annotated_formula": "divide(10,2)", "linear_formula": "divide(n0,n1)|", "category": "physics"}


def test_hub_exports_mmlu_arc_mathqa(tmp_path):
    _write_jsonl(tmp_path / "mmlu" / "test.jsonl", [MMLU_REC])
    _write_jsonl(tmp_path / "arc-challenge" / "test.jsonl", [ARC_REC])
    _write_jsonl(tmp_path / "mathqa" / "test.jsonl", [MATHQA_REC])

    mmlu = get_task("mmlu", data_dir=tmp_path)
    e = mmlu.examples("test")[0]
    assert (e.gold, e.choices, e.meta["subject"]) == ("B", ["3", "4", "5", "22"], "elementary_mathematics")
    assert mmlu.context(e) == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                               "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")  # lm-eval's mmlu default template
    assert mmlu.choice_continuations(e) == [" A", " B", " C", " D"] and mmlu.gold_index(e) == 1

    arc = get_task("arc-challenge", data_dir=tmp_path)
    e = arc.examples("test")[0]
    assert (e.id, e.gold, e.choices) == ("arc-challenge/test/Mercury_7175875", "B", ["oxygen", "carbon dioxide", "helium"])
    assert arc.context(e) == "Question: Which gas do plants absorb?\nAnswer:"  # lm-eval arc: options not shown
    assert arc.choice_continuations(e) == [" oxygen", " carbon dioxide", " helium"] and arc.gold_index(e) == 1
    assert "C. helium" in arc.prompt(e) and arc.score("B", e).correct

    mq = get_task("mathqa", data_dir=tmp_path)
    e = mq.examples("test")[0]
    assert e.choices == ["5 km / h", "1,000", "3", "2", "none of these"] and e.gold == "A"
    assert mq.choice_continuations(e)[0] == " 5 km / h" and mq.context(e).startswith("Question: a train")


def test_hub_exports_gsm8k_svamp_aqua_wiki(tmp_path):
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    _write_jsonl(tmp_path / "svamp" / "train.jsonl", [{"ID": f"chal-{i}", "Body": f"Tom has {i} apples", "Question": "How many?",
                                                         "Equation": f"( {i}.0 )", "Answer": float(i), "Type": "Common-Division",
                                                         "question_concat": "..."} for i in range(1, 201)])
    _write_jsonl(tmp_path / "svamp" / "test.jsonl", [{"ID": "chal-900", "Body": "Ann has 3 pens.", "Question": "How many?",
                                                        "Equation": "( 3.0 )", "Answer": 3.0, "Type": "Common-Division"}])
    _write_jsonl(tmp_path / "aqua" / "train.jsonl", [{"question": "q?", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"],
                                                       "rationale": "r", "correct": "D"}])
    text = " = Alpha = \n" + " ".join(f"w{i}" for i in range(300)) + "\n = = Sec = = \n"
    _write_jsonl(tmp_path / "wiki" / "test.jsonl", [{"text": line} for line in text.splitlines(keepends=True)])

    g = get_task("gsm8k", data_dir=tmp_path).examples("test")[0]
    assert g.gold == "2" and g.meta["rationale"] == "1+1=2"
    sv = get_task("svamp", data_dir=tmp_path)
    assert [len(sv.examples(s)) for s in ("train", "validation", "test")] == [100, 100, 1]
    assert sv.examples("test")[0].question == "Ann has 3 pens. How many?" and sv.examples("test")[0].gold == "3"
    a = get_task("aqua", data_dir=tmp_path).examples("train")[0]
    assert a.choices == ["1", "2", "3", "4", "5"] and a.gold == "D"
    w = get_task("wiki", data_dir=tmp_path, context_words=100, target_words=50).examples("test")
    assert len(w) == 2 and w[0].question.split()[0] == "w0" and w[0].gold.split()[0] == "w100"


def test_load_hub_calls_datasets_with_path_name_split(monkeypatch):
    """With `datasets` importable, load_hub calls load_dataset(path, name, split=split) and returns plain dicts;
    without it, a one-line DataUnavailable. (`datasets` is not installed here, so a stand-in module records the call.)"""
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if split == "missing":
            raise ValueError('Unknown split "missing". Should be one of [\'train\', \'test\'].\nmore')
        return [{"question": "q", "answer": "#### 4"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert get_task("gsm8k").examples("test")[0].gold == "4"
    assert calls == [("openai/gsm8k", "main", "test")]
    with pytest.raises(DataUnavailable) as e:
        load_hub("openai/gsm8k", "main", "missing")
    assert "\n" not in str(e.value) and "Unknown split" in str(e.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataUnavailable, match="not installed"):
        load_hub("openai/gsm8k", "main", "test")


def test_carve_is_deterministic_and_order_free():
    recs = [{"k": f"q{i}"} for i in range(100)]
    rest, held = carve(recs, lambda r: r["k"], 10, "salt")
    rest2, held2 = carve(list(reversed(recs)), lambda r: r["k"], 10, "salt")
    assert len(held) == 10 and len(rest) == 90 and {r["k"] for r in held} == {r["k"] for r in held2}
    assert not ({r["k"] for r in held} & {r["k"] for r in rest})


# ---------------------------------------------------------------------------------------------------------------
# wiki scoring
def test_wiki_score_and_reward():
    from reasonlab.tasks.wiki import WikiTask, token_f1

    t = WikiTask(context_words=20, target_words=10)
    lines = [" = Title = \n", " ".join(f"t{i}" for i in range(60)) + "\n"]
    e = t.from_lines(lines, "test")[0]
    assert t.context(e) == e.question and t.continuation(e) == " " + e.gold
    assert t.score(e.gold + " and more beyond the target", e).correct  # truncated to the target length
    half = " ".join(e.gold.split()[:5] + ["zz"] * 5)
    assert t.reward(half, e) == pytest.approx(token_f1(half, e.gold)) == pytest.approx(0.5)
    assert not t.score("   ", e).valid and t.reward("", e) == 0.0


def test_mmlu_fewshot_is_first_n_of_same_subject(tmp_path):
    dev = [{**MMLU_REC, "question": f"dev {s} {i}", "subject": s} for s in ("anatomy", "elementary_mathematics") for i in range(4)]
    _write_jsonl(tmp_path / "mmlu" / "train.jsonl", dev)  # the "train" split is MMLU's dev (few-shot pool)
    _write_jsonl(tmp_path / "mmlu" / "test.jsonl", [MMLU_REC])
    t = get_task("mmlu", data_dir=tmp_path, fewshot=2)
    e = t.examples("test")[0]
    assert [s.question for s in t.shots(e)] == ["dev elementary_mathematics 0", "dev elementary_mathematics 1"]
    ctx = t.context(e)
    assert ctx.startswith("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                          "dev elementary_mathematics 0\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: B\n\n")
    assert ctx.count("Answer:") == 3 and ctx.endswith("What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
