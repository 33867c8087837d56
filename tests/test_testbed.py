"""The polychromic testbed: subset-sum's exact solution enumeration, the from-scratch word-level model, coverage and
distinct-correct@k by hand and by brute force, branching a run from another run's checkpoint (model.init_from: the
exact weights), and the report's warning when the set term cannot differ from GRPO."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import cli
from test_polychromic import _one_thread  # noqa: F401 (autouse: tiny shapes run faster on one thread)

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "configs" / "polychromic" / "subset-sum-testbed.yaml"
# a seconds-sized testbed: a 1-layer scratch model, 4 samples, 2 steps
SMALL = ["model.scratch.hidden=32", "model.scratch.layers=1", "data.task_args.n_train=64",
         "data.task_args.n_validation=4", "data.task_args.n_test=4", "rollout.n=4", "set.subset_size=2",
         "train.steps=2", "train.batch_size=2", "train.log_every=1", "eval.every=0", "eval.samples=4",
         "eval.batch_size=16", "watch.audit_every=1", "tracking.tensorboard=false"]


# ----------------------------------------------------------------------------------------------------------------------
# the task


def test_solutions_are_enumerated_exactly_on_small_cases():
    from reasonlab.tasks.subset_sum import solutions, sums_by_count

    assert solutions([1, 2, 3, 4], 5) == [(1, 4), (2, 3)]
    assert solutions([4, 2, 3, 1], 6) == [(1, 2, 3), (2, 4)]  # order of the given numbers does not matter
    assert solutions([1, 2, 3, 4], 10) == [(1, 2, 3, 4)]
    assert solutions([1, 2, 3, 4], 4) == [(1, 3)]  # a single number is not an answer (at least two terms)
    assert solutions([1, 2, 3, 4], 4, min_terms=1) == [(1, 3), (4,)]
    assert solutions([1, 2, 3, 4], 11) == []
    counts = sums_by_count([1, 2, 3, 4])
    assert counts == {3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 1, 9: 1, 10: 1}
    # against a brute force over bitmasks
    rng = random.Random(0)
    for _ in range(20):
        nums = sorted(rng.sample(range(1, 20), 6))
        target = rng.randint(3, 40)
        want = sorted(tuple(sorted(nums[i] for i in range(6) if m >> i & 1)) for m in range(64)
                      if bin(m).count("1") >= 2 and sum(nums[i] for i in range(6) if m >> i & 1) == target)
        assert solutions(nums, target) == want


def test_task_examples_scoring_and_canonical_answers():
    from reasonlab.tasks import get_task
    from reasonlab.tasks.subset_sum import solutions, spell

    task = get_task("subset-sum", n_train=300, n_validation=30, n_test=30)
    ids = {s: {e.question for e in task.examples(s)} for s in task.splits}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    vocab = set(task.vocabulary())
    for e in task.examples("test"):
        nums, target = e.meta["numbers"], e.meta["target"]
        sols = [spell(s) for s in solutions(nums, target)]
        assert e.meta["solutions"] == sols and e.meta["n_solutions"] == len(sols)
        assert 4 <= len(sols) <= 16 and target not in nums and len(set(nums)) == 8
        assert task.score(e.gold, e).correct
        assert set(task.prompt(e).split()) <= vocab and set(e.gold.split()) <= vocab
    e = task.examples("test")[0]
    first = e.meta["solutions"][0].split("+")
    assert task.score(" + ".join(reversed(first)), e).correct  # any order
    assert task.canonical_answer(" + ".join(reversed(first)).replace(" ", "")) == e.meta["solutions"][0]
    not_given = next(i for i in range(1, 17) if i not in e.meta["numbers"])
    wrong = {f"{first[0]} + {first[0]}": True, f"{not_given} + {e.meta['target'] - not_given}": True,
             first[0]: True, "+ 3": False, f"{first[0]} +": False, "": False}
    for out, valid in wrong.items():
        sc = task.score(out, e)
        assert not sc.correct and sc.valid == valid, out
    with pytest.raises(Exception, match="one prompt style"):
        task.prompt(e, "cot")


def test_gold_is_a_uniformly_random_solution():
    """SFT fits uniformly random solutions: the gold's rank among its puzzle's sorted solutions is uniform, so its
    mean relative rank is 1/2 and the first solution is chosen 1/n_solutions of the time."""
    from reasonlab.tasks import get_task

    exs = get_task("subset-sum", n_train=3000, n_validation=10, n_test=10).examples("train")
    ranks = [e.meta["solutions"].index(e.gold.replace(" ", "")) for e in exs]
    rel = [(r + 0.5) / e.meta["n_solutions"] for r, e in zip(ranks, exs)]
    assert abs(sum(rel) / len(rel) - 0.5) < 0.02
    first = sum(r == 0 for r in ranks) / len(exs)
    expect = sum(1 / e.meta["n_solutions"] for e in exs) / len(exs)
    assert abs(first - expect) < 0.03


def test_word_tokenizer_and_scratch_model():
    from reasonlab.models.lm import ModelConfig, ScratchConfig, load_for_config
    from reasonlab.tasks import get_task

    task = get_task("subset-sum", n_train=10, n_validation=10, n_test=10)
    mc = ModelConfig(name="scratch", scratch=ScratchConfig(hidden=32, layers=1, heads=2))
    model, tok = load_for_config(mc, vocab=task.vocabulary())
    text = task.prompt(task.examples("test")[0])
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.split()) and tok.unk_token_id not in ids  # one word, one token; nothing added
    assert tok.decode(ids) == text
    assert tok.decode(tok("5 + 16")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "5 + 16"
    assert tok("5 plus 16")["input_ids"][1] == tok.unk_token_id
    assert model.config.vocab_size == len(task.vocabulary()) + 4 and model.get_input_embeddings().weight.shape[1] == 32
    with pytest.raises(Exception, match="closed vocabulary"):
        load_for_config(mc)


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def brute_distinct_correct(answers, correct, k):
    subsets = list(itertools.combinations(range(len(answers)), k))
    return sum(len({answers[i] for i in s if correct[i]}) for s in subsets) / len(subsets)


def test_distinct_correct_at_k_by_hand_and_by_brute_force():
    from reasonlab.eval.metrics import distinct_correct_at_k, pass_at_k

    a, c = ["x", "x", "y", "w"], [True, True, True, False]
    assert distinct_correct_at_k(a, c, 4) == 2
    assert distinct_correct_at_k(a, c, 1) == pytest.approx(0.75)  # = pass@1
    assert distinct_correct_at_k(a, c, 2) == pytest.approx(4 / 3)  # x: 1 - 1/6, y: 1 - 3/6
    assert distinct_correct_at_k(["x"] * 4, [True] * 4, 2) == 1.0
    assert distinct_correct_at_k(["x", None], [False, False], 2) == 0.0
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(2, 8)
        a = [rng.choice("abcd") for _ in range(n)]
        c = [rng.random() < 0.6 for _ in range(n)]
        for k in range(1, n + 1):
            assert distinct_correct_at_k(a, c, k) == pytest.approx(brute_distinct_correct(a, c, k)), (a, c, k)
        assert distinct_correct_at_k(a, c, 1) == pytest.approx(pass_at_k(n, sum(c), 1))


def test_eval_summary_has_coverage_and_distinct_correct():
    from reasonlab.eval.harness import sample_record, summarize_records
    from reasonlab.eval.generate import Sample
    from reasonlab.tasks import get_task

    task = get_task("subset-sum", n_train=10, n_validation=10, n_test=10)
    e1, e2 = task.examples("test")[:2]
    s1, s2 = e1.meta["solutions"], e2.meta["solutions"]
    outs = [(e1, [s1[0], s1[0].replace("+", " + "), s1[1], "1 + 1"]),  # 2 distinct correct (one written twice)
            (e2, [s2[0], "junk", "2 +", s2[0]])]  # 1 distinct correct
    recs = [sample_record(task, e, Sample(text=o, token_ids=[1], finish="eos"), prompt="p", sample=j)
            for e, os_ in outs for j, o in enumerate(os_)]
    assert recs[0]["answer_key"] == recs[1]["answer_key"] and recs[0]["n_solutions"] == len(s1)
    m = summarize_records(recs, task)["metrics"]
    assert m["distinct_correct@4"]["value"] == pytest.approx(1.5) and m["distinct_correct@4"]["n"] == 2
    assert m["coverage@4"]["value"] == pytest.approx((2 / len(s1) + 1 / len(s2)) / 2)
    assert m["coverage@2"]["value"] < m["coverage@4"]["value"]
    # a task without enumerated solutions: distinct-correct, no coverage
    for r in recs:
        r.pop("n_solutions")
    m = summarize_records(recs, task)["metrics"]
    assert "distinct_correct@4" in m and "coverage@4" not in m


# ----------------------------------------------------------------------------------------------------------------------
# the recipe on the testbed, branching from a checkpoint


def varied_reward(completions, examples):
    """A reward a random model earns sometimes (its subset-sum reward is 0 everywhere), so the parent run trains."""
    return [float(len(c.split()) % 3 == 0) for c in completions]


def _run(tmp_path, name, overrides):
    from reasonlab.config import load_config
    from reasonlab.methods.polychromic import main
    from reasonlab.runs import Run

    cfg = load_config(TESTBED, [*SMALL, *overrides])
    run = Run(cfg, tmp_path / name, install_signals=False)
    try:
        result = main(cfg, run)
    finally:
        run.close()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows, run.dir


def test_testbed_recipe_logs_coverage_and_branches_from_the_exact_weights(tmp_path):
    from safetensors.torch import load_file

    from reasonlab.config import load_config
    from reasonlab.models.lm import load_for_config
    from reasonlab.tasks import get_task

    result, rows, run_dir = _run(tmp_path, "a", ["reward.fn=test_testbed:varied_reward"])
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 0 <= r["rollout/frac_le1_correct"] <= 1 and r["rollout/distinct_correct"] >= 0
    test = json.loads(next((run_dir / "evals").glob("test_best_step*.json")).read_text())["metrics"]
    for key in ("pass@4", "distinct_correct@4", "coverage@4", "coverage@2"):
        assert test[key]["n"] == 4 and test[key]["lo"] is not None, key
    assert result["best_step"] == 2  # select_on: last

    # model.init_from = the run folder: its best checkpoint's weights, exactly
    cfg = load_config(TESTBED, [*SMALL, f"model.init_from={run_dir}"])
    model, _ = load_for_config(cfg.model, vocab=get_task(cfg.data.task, **cfg.data.task_args).vocabulary())
    saved = load_file(str(run_dir / "checkpoints" / "best" / "module.model.safetensors"))
    own = model.state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    fresh, _ = load_for_config(load_config(TESTBED, SMALL).model, vocab=get_task(cfg.data.task,
                                                                                 **cfg.data.task_args).vocabulary())
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())  # training moved them
    # a branched run starts from them: its step-0 validation equals the parent's final one (same eval seed)
    _, _, child = _run(tmp_path, "b", [f"model.init_from={run_dir}", "train.steps=1"])
    parent_val = json.loads((run_dir / "evals" / "val_step2.json").read_text())["metrics"]["accuracy"]
    child_val = json.loads((child / "evals" / "val_step0.json").read_text())["metrics"]["accuracy"]
    assert child_val == parent_val


def test_init_from_a_lora_run_restores_the_adapter(tmp_path):
    from reasonlab.models.lm import LoraConfig, ModelConfig, load_for_config
    from reasonlab.runs import save_checkpoint_dir

    mc = ModelConfig(name="tiny-random", lora=LoraConfig(r=4, alpha=8))
    model, _ = load_for_config(mc)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p))
    save_checkpoint_dir(tmp_path / "run" / "checkpoints" / "step_3", 3, modules={"model": model})
    branched, _ = load_for_config(ModelConfig(name="tiny-random", lora=LoraConfig(r=4, alpha=8),
                                              init_from=str(tmp_path / "run")))
    a, b = model.state_dict(), branched.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_init_from_is_one_line_before_any_model_loads(tmp_path):
    p = cli("run", str(TESTBED), f"model.init_from={tmp_path / 'nope'}", "--out", str(tmp_path / "out"), check=False)
    assert p.returncode == 2 and "init_from" in p.stderr and "does not exist" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    p = cli("run", str(TESTBED), f"model.init_from={tmp_path / 'empty'}", "--out", str(tmp_path / "out"), check=False)
    assert p.returncode == 2 and "neither a checkpoint nor a run folder" in p.stderr


# ----------------------------------------------------------------------------------------------------------------------
# the report


def _fake_run(tmp_path, name, mode, le1):
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(f"method: polychromic\nset: {{mode: {mode}}}\n")
    rows = [{"step": s, "rollout/frac_le1_correct": v} for s, v in enumerate(le1, 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_report_warns_when_the_set_term_cannot_differ_from_grpo(tmp_path):
    from reasonlab.diagnostics.detectors import detect_reward_signal
    from reasonlab.diagnostics.runfolder import RunFolder
    from reasonlab.watch import Thresholds

    th = Thresholds()
    codes = lambda d: [f.code for f in detect_reward_signal(RunFolder(d), th)]  # noqa: E731
    assert "set_term_is_grpo" in codes(_fake_run(tmp_path, "poly", "polychromic", [0.9] * 10))
    assert "set_term_is_grpo" not in codes(_fake_run(tmp_path, "mixed", "polychromic", [0.9] * 5 + [0.3] * 5))
    assert "set_term_is_grpo" not in codes(_fake_run(tmp_path, "healthy", "polychromic", [0.4] * 10))
    assert "set_term_is_grpo" not in codes(_fake_run(tmp_path, "grpo", "grpo", [0.9] * 10))  # no set term to judge
    f = next(f for f in detect_reward_signal(RunFolder(tmp_path / "poly"), th) if f.code == "set_term_is_grpo")
    assert f.severity == "warning" and "cannot differ from GRPO" in f.title and math.isclose(f.evidence["values"][-1],
                                                                                              0.9)
