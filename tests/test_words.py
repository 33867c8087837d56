"""word-recall (the latent bridge's CPU task): splits, prompt, scoring, and the word list's one-token property."""

import pytest
from transformers import AutoTokenizer

from reasonlab.models import embedded
from reasonlab.tasks import get_task
from reasonlab.tasks.words import WORDS_FILE, first_word, split_of


def test_splits_are_disjoint_fixed_by_the_word_and_seeded_in_order():
    t = get_task("word-recall")
    sets = {s: {e.question for e in t.examples(s)} for s in t.splits}
    assert sum(len(v) for v in sets.values()) == len(WORDS_FILE.read_text().split())
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert all(split_of(w) == s for s, ws in sets.items() for w in ws)
    a, b = get_task("word-recall", seed=1), get_task("word-recall", seed=2)
    assert {e.id for e in a.examples("test")} == {e.id for e in b.examples("test")}
    assert [e.id for e in a.examples("test")] != [e.id for e in b.examples("test")]
    small = get_task("word-recall", n_test=10)
    assert [e.id for e in small.examples("test")] == [e.id for e in t.examples("test")][:10]


def test_prompt_quotes_the_question_once_after_training_shots_and_scoring():
    t = get_task("word-recall")
    e = t.examples("test")[0]
    p = t.prompt(e)
    assert p.endswith(f"Word: {e.question}\nAgain:") and p.count(e.question) == 1
    shots = [line[len("Word: "):] for line in p.splitlines() if line.startswith("Word: ")][:-1]
    assert len(shots) == 6 and all(split_of(w) == "train" for w in shots)
    assert t.score(f" {e.gold}\n\nWord:", e).correct
    assert t.score(f' "{e.gold.upper()}."', e).correct
    assert not t.score(" something", e).correct and not t.score("   ", e).valid
    assert first_word(" ...  (castle), keep") == "castle"


@pytest.mark.slow
def test_every_word_is_one_token_for_both_embedded_tokenizers():
    src = AutoTokenizer.from_pretrained(str(embedded.minilm_dir()))
    tgt = AutoTokenizer.from_pretrained(str(embedded.smollm2_dir()))
    words = WORDS_FILE.read_text().split()
    assert len(words) == 11659 and words == sorted(set(words))
    for w in words[::97]:
        assert src.tokenize(w) == [w], w
        assert len(tgt(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
