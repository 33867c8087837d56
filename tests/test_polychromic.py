"""Polychromic set-level RL: the subset estimator vs brute-force enumeration, leave-one-out, the diversity measures,
a wrong-but-novel sample's positive advantage, the gradient audit (the set term has a gradient; seed 002's float
term has none), user reward functions, and a 2-step recipe smoke test with golden losses on a tiny random model."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from reasonlab.rl import setlevel as S

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "polychromic" / "countdown-tiny.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes run faster on one thread, and much faster on a machine whose cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------------
# the subset estimator


def brute_force_subset_advantage(rewards, answers, n):
    """Poly-PPO's definition written as plainly as possible: every size-n subset, f = mean reward x distinct/n,
    baseline = mean f, A_i = mean over subsets containing i of (f - baseline)."""
    N = len(rewards)
    subsets = list(itertools.combinations(range(N), n))
    f = {s: (sum(rewards[i] for i in s) / n) * (len({answers[i] for i in s}) / n) for s in subsets}
    base = sum(f.values()) / len(f)
    adv = []
    for i in range(N):
        mine = [f[s] - base for s in subsets if i in s]
        adv.append(sum(mine) / len(mine))
    return adv, base


@pytest.mark.parametrize("N", [2, 3, 4, 5, 6])
def test_subset_advantage_equals_brute_force_enumeration(N):
    rng = random.Random(N)
    for n in range(1, N + 1):
        for _ in range(5):
            rewards = [rng.choice([0.0, 1.0, 0.5]) for _ in range(N)]
            answers = [rng.choice("abc") for _ in range(N)]
            score, _ = S.make_set_scorer(rewards, diversity="answers", answers=answers)
            out = S.set_advantages(rewards, score, n=n, M=0)
            want, base = brute_force_subset_advantage(rewards, answers, n)
            assert out["n_subsets"] == math.comb(N, n)
            assert out["baseline"] == pytest.approx(base, abs=1e-6)
            assert out["adv"].tolist() == pytest.approx(want, abs=1e-6)


def test_random_subsets_match_their_own_enumeration_and_converge_to_the_exact_advantage():
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    answers = ["a", "a", "b", "c", "b", "a"]
    score, _ = S.make_set_scorer(rewards, diversity="answers", answers=answers)
    g = torch.Generator().manual_seed(0)
    member = S.random_subsets(6, 3, 7, g)  # (7, 6), duplicates allowed
    assert member.shape == (7, 6) and bool((member.sum(1) == 3).all())
    subsets = S.subsets_as_indices(member)
    f = torch.tensor([score(s) for s in subsets], dtype=torch.float64)
    adv, base = S.subset_advantage(member, f)
    b = sum(f.tolist()) / len(subsets)
    for i in range(6):
        mine = [f[m].item() - b for m, s in enumerate(subsets) if i in s]
        assert adv[i].item() == pytest.approx(sum(mine) / len(mine) if mine else 0.0, abs=1e-6)
    exact = S.set_advantages(rewards, score, n=3, M=0)["adv"]
    many = S.set_advantages(rewards, score, n=3, M=19, generator=g)  # C(6,3)=20 > 19: the random path
    assert many["n_subsets"] == 19
    approx = S.set_advantages(rewards, score, n=3, M=20_000, generator=g)  # M >= C(6,3): enumerated exactly
    assert approx["n_subsets"] == 20 and torch.allclose(approx["adv"], exact)
    member = S.random_subsets(6, 3, 20_000, g)
    f = torch.tensor([score(s) for s in S.subsets_as_indices(member)], dtype=torch.float64)
    assert torch.allclose(S.subset_advantage(member, f)[0], exact, atol=0.01)


def test_leave_one_out_advantage():
    rewards, answers = [1.0, 1.0, 0.0], ["x", "x", "y"]
    score, _ = S.make_set_scorer(rewards, diversity="answers", answers=answers)
    out = S.set_advantages(rewards, score, n=2, estimator="loo")
    full = (2 / 3) * (2 / 3)
    want = [full - 0.5 * 1.0, full - 0.5 * 1.0, full - 1.0 * 0.5]  # removing a correct x: {x, y}; removing y: {x, x}
    assert out["full"] == pytest.approx(full)
    assert out["adv"].tolist() == pytest.approx(want, abs=1e-6)


def test_wrong_but_novel_sample_receives_a_positive_advantage():
    """Four correct samples with the same answer and one wrong sample with a new answer: GRPO pushes the wrong one
    down; the set objective pushes it UP, because sets containing it are more diverse (mean r x distinct/n)."""
    from reasonlab.rl.policy import group_standardize

    rewards, answers = [1.0, 1.0, 1.0, 1.0, 0.0], ["3*7", "3 * 7", "3*7", "3*7", "9+3"]
    score, _ = S.make_set_scorer(rewards, diversity="answers", answers=answers)
    adv = S.set_advantages(rewards, score, n=3, M=0)["adv"]
    # subsets with the wrong one: r = 2/3, d = 2/3 -> 4/9; without it: r = 1, d = 1/3 -> 1/3
    assert adv[4].item() == pytest.approx(4 / 9 - (6 * 4 / 9 + 4 * 1 / 3) / 10, abs=1e-6)
    assert adv[4].item() > 0
    assert group_standardize(torch.tensor(rewards))[4].item() < 0
    assert S.standardize(adv)[4].item() > 0
    loo = S.set_advantages(rewards, score, n=3, estimator="loo")["adv"]
    assert loo[4].item() > 0  # f(Y) = 0.8 x 0.4 = 0.32 > f(Y without it) = 1 x 0.25


def test_diversity_measures():
    assert S.answer_diversity(["1+2", "1 + 2", None, None]) == 0.5  # whitespace ignored; None is one class
    texts = ["a b c", "a b d", "x y z", "a b c"]
    _, div = S.make_set_scorer([0.0] * 4, diversity="distinct", texts=texts, ngram=2)
    assert div((0, 3)) == 0.5 and div((0, 2)) == 1.0 and div((0, 1)) == pytest.approx(3 / 4)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    dist = S.pairwise_cosine_distance(emb)  # 1 - cos, clipped to [0, 1]
    score, div = S.make_set_scorer([1.0, 1.0, 0.0, 1.0], diversity="semantic", distance=dist)
    assert div((0, 1)) == 0.0 and div((0, 2)) == pytest.approx(1.0) and div((0, 3)) == pytest.approx(1.0)
    assert div((0, 1, 2)) == pytest.approx(2 / 3)
    assert score((0, 2)) == pytest.approx(0.5)
    s_sum, _ = S.make_set_scorer([1.0, 0.0], diversity="answers", answers=["a", "b"], how="sum", weight=0.5)
    assert s_sum((0, 1)) == pytest.approx(0.5 + 0.5 * 1.0)
    with pytest.raises(ValueError, match="diversity must be one of"):
        S.make_set_scorer([1.0], diversity="colour", answers=["a"])


# ----------------------------------------------------------------------------------------------------------------------
# recipe pieces on a tiny model


@pytest.fixture(scope="module")
def tiny_lora():
    from reasonlab.models.lm import LoraConfig, add_lora, tiny_causal_lm

    model, tok = tiny_causal_lm(seed=0)
    return add_lora(model, LoraConfig(r=4, alpha=8)), tok


def test_group_logprobs_equal_full_rows_in_values_and_gradients(tiny_lora):
    """Sharing one prompt's keys/values across its N completions is exact: the same log-probs as N left-padded full
    rows through rl.policy.token_logprobs, and the same gradient of a policy-gradient loss."""
    from reasonlab.methods.polychromic import rollout_logprobs
    from reasonlab.rl.policy import pg_loss, token_logprobs

    model, tok = tiny_lora
    with torch.no_grad():  # move LoRA B off zero so the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    prompts = [tok("Numbers: 1, 2, 3. Target: 7.")["input_ids"], tok("Hi")["input_ids"]]
    comps = [[[11, 12, 13], [14], [15, 16]], [[17, 18], [19, 20, 21, 22]]]
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])
    lp, mask = rollout_logprobs(model, prompts, comps, tok.pad_token_id)  # (5, 4), (5, 4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    g_group = torch.autograd.grad(pg_loss(lp, adv, mask), params)

    rows = [(p, c) for p, g in zip(prompts, comps) for c in g]
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((5, T), tok.pad_token_id)
    attn = torch.zeros(5, T, dtype=torch.long)
    for b, (p, c) in enumerate(rows):  # left-padded full rows: completion tokens at the end
        ids[b, T - len(p) - len(c):] = torch.tensor(p + c)
        attn[b, T - len(p) - len(c):] = 1
    full = token_logprobs(model, ids, attn)  # (5, T-1)
    ref = torch.zeros(5, 4)
    for b, (p, c) in enumerate(rows):
        ref[b, :len(c)] = full[b, T - 1 - len(c):]
    assert torch.allclose(lp * mask, ref * mask, atol=1e-5)
    g_full = torch.autograd.grad(pg_loss(ref, adv, mask), params)
    for a, b in zip(g_group, g_full):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_gradient_audit_shows_the_set_term_nonzero_and_the_seed_002_float_term_zero(tiny_lora):
    """Every sample is correct, so the group-baseline (GRPO) advantage is exactly 0 and pg_reward has no gradient; the
    answers differ in how often they repeat, so the set term still pushes toward the rarer answers: its gradient is
    non-zero. The seed-002 formulation (loss - lambda * <Python float diversity>) gets exactly 0."""
    from reasonlab.methods.polychromic import SetConfig, rollout_logprobs, set_level
    from reasonlab.rl.audit import audit_terms
    from reasonlab.rl.policy import group_standardize, pg_loss

    model, tok = tiny_lora
    params = [p for p in model.parameters() if p.requires_grad]
    prompt = tok("Numbers: 3, 7, 9. Target: 21.\nAnswer:")["input_ids"]
    answers = ["3*7", "3*7", "3*7", "9+9+3", "7*3", "3*7"]
    texts = [f" {a}" for a in answers]
    rewards = [[1.0] * 6]
    sl = set_level(rewards, [answers], [texts], SetConfig(subset_size=3), torch.Generator().manual_seed(0))
    assert sl["adv"].abs().max() > 0
    comps = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    lp, mask = rollout_logprobs(model, [prompt], [comps], tok.pad_token_id)  # (6, K)
    a_reward = group_standardize(torch.tensor(rewards[0]), group_size=6)
    assert a_reward.abs().max() == 0
    diversity_float = float(sl["diversity"][0])  # what reply-guyd did: a number computed from text
    terms = {"pg_reward": (1.0, pg_loss(lp, a_reward, mask)), "pg_set": (1.0, pg_loss(lp, sl["adv"].view(-1), mask)),
             "seed002_diversity": (0.3, -torch.tensor(diversity_float))}
    audit = audit_terms(terms, params)
    m = audit.metrics()
    assert m["grad/term/pg_set"] > 1e-4
    assert m["grad/term/pg_reward"] == 0.0
    assert m["grad/term/seed002_diversity"] == 0.0
    assert set(audit.dead_terms()) == {"pg_reward", "seed002_diversity"}


# ----------------------------------------------------------------------------------------------------------------------
# user reward functions


def digit_reward(completions, examples):
    """A toy reward for the tiny model's random text: the share of its characters that are ASCII letters."""
    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]


def bad_length_reward(completions, examples):
    return [1.0]


def test_reward_fn_errors_are_one_line():
    from reasonlab.config import ConfigError
    from reasonlab.methods.polychromic import call_reward_fn, load_reward_fn

    cases = {"nocolon": "must be 'task' or 'module:function'",
             "no_such_module_xyz:f": "cannot import module 'no_such_module_xyz'",
             "math:no_such_fn": "module 'math' has no attribute 'no_such_fn'",
             "math:pi": "is not callable",
             "/nonexistent/r.py:f": "does not exist"}
    for spec, msg in cases.items():
        with pytest.raises(ConfigError, match=msg) as e:
            load_reward_fn(spec)
        assert "\n" not in str(e.value)
    fn = load_reward_fn("test_polychromic:bad_length_reward")
    with pytest.raises(ConfigError, match="returned 1 rewards for 2 completions"):
        call_reward_fn(fn, "x:y", ["a", "b"], [None, None])
    with pytest.raises(ConfigError, match="must be numbers or None"):
        call_reward_fn(lambda c, e: ["high", 1.0], "x:y", ["a", "b"], [None, None])
    assert call_reward_fn(lambda c, e: [None, 2], "x:y", ["a", "b"], [None, None]) == ([0.0, 2.0], 1)
    assert load_reward_fn(f"{__file__}:digit_reward")(["ab1"], [None]) == [pytest.approx(2 / 3)]


def test_bad_reward_fn_in_a_config_is_one_line_from_the_cli(tmp_path):
    from conftest import cli

    p = cli("run", str(TINY), "reward.fn=nonexistent_pkg_xyz:score", "--out", str(tmp_path), check=False)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cannot import module 'nonexistent_pkg_xyz'" in err[0]
    assert not any(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------------------------------------------------
# the recipe


def test_configs_parse_and_twins_differ_in_one_knob():
    from reasonlab.config import load_config, to_dict

    for path in sorted((ROOT / "configs" / "polychromic").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.method == "polychromic"
        first = path.read_text().splitlines()[0]
        assert first.startswith("# reasonlab run configs/polychromic/"), path
    a = to_dict(load_config(ROOT / "configs" / "polychromic" / "countdown-smollm2.yaml"))
    b = to_dict(load_config(ROOT / "configs" / "polychromic" / "countdown-smollm2.yaml", ["set.mode=grpo"]))
    diff = [k for k in a["set"] if a["set"][k] != b["set"][k]]
    assert diff == ["mode"] and {k: v for k, v in a.items() if k != "set"} == {k: v for k, v in b.items() if k != "set"}


# Golden values: the tiny config with the toy reward above, seed 0 (torch 2.13 CPU). A change here means the sampling,
# the advantages or the loss changed: check why before updating them.
# (Re-measured when sampling became seeded per prompt, so a prompt's samples no longer depend on its batch.)
GOLDEN = {1: {"train/loss": -0.0250282, "train/pg_set": -0.0125122, "train/pg_reward": -0.0125160, "train/kl": 0.0},
          2: {"train/loss": 0.1450448, "train/pg_set": 0.0724788, "train/pg_reward": 0.0724790, "train/kl": 0.0017398}}


def _run(tmp_path, name, overrides, resume=False):
    from reasonlab.config import load_config
    from reasonlab.methods.polychromic import main
    from reasonlab.runs import Run

    cfg = load_config(TINY, ["reward.fn=test_polychromic:digit_reward", "tracking.tensorboard=false", *overrides])
    run = Run(cfg, tmp_path / name, install_signals=False, resume=resume)
    try:
        result = main(cfg, run)
    finally:
        run.close()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, {r["step"]: r for r in rows if "train/loss" in r}, run.dir


def test_recipe_two_steps_golden_losses_audit_run_folder_resume_and_twin(tmp_path):
    result, train, run_dir = _run(tmp_path, "poly", [])
    assert sorted(train) == [1, 2]
    for step, want in GOLDEN.items():
        for key, value in want.items():
            assert train[step][key] == pytest.approx(value, abs=1e-5), (step, key)
    for step in (1, 2):
        row = train[step]
        assert row["grad/term/pg_set"] > 0 and row["grad/term/pg_reward"] > 0 and row["grad/term/kl"] >= 0
        assert row["weight/term/pg_set"] == 1.0
        for key in ("set/score", "set/diversity", "adv/set_std", "rollout/entropy", "rollout/reward_std"):
            assert math.isfinite(row[key]), key
    evals = sorted(p.name for p in (run_dir / "evals").iterdir())
    assert evals == ["test_best_step0.json", "test_best_step0.jsonl", "val_step0.json", "val_step0.jsonl",
                     "val_step2.json", "val_step2.jsonl"] or "test_best_step2.json" in evals
    test_file = next((run_dir / "evals").glob("test_best_step*.json"))
    summ = json.loads(test_file.read_text())
    for key in ("accuracy", "pass@2", "distinct_2", "self_bleu"):
        m = summ["metrics"][key]
        assert m["n"] == 4 and m["lo"] is not None, key
    assert (run_dir / "checkpoints" / "best" / "manifest.json").exists()
    assert result["test"]["accuracy"]["n"] == 4 and result["train_cpu_s"] > 0

    # stop after step 1, resume to step 2: the same step-2 loss and the same adapter weights as the straight run
    _run(tmp_path, "resumed", ["train.steps=1"])
    _, resumed, _ = _run(tmp_path, "resumed", [], resume=True)
    assert resumed[2]["train/loss"] == pytest.approx(train[2]["train/loss"], abs=1e-7)
    from safetensors.torch import load_file

    a = load_file(str(run_dir / "checkpoints" / "step_2" / "module.model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_2" / "module.model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    _, twin, _ = _run(tmp_path, "grpo", ["set.mode=grpo"])
    assert "grad/term/pg_set" not in twin[1] and "train/pg_set" not in twin[1]
    assert twin[1]["set/score"] == pytest.approx(train[1]["set/score"])  # same first rollout, same statistics
    assert twin[1]["train/pg_reward"] == pytest.approx(train[1]["train/pg_reward"])
    # the paper's objective: the set term alone (no reward term in the loss, nor in the audit)
    _, pure, _ = _run(tmp_path, "pure", ["set.mode=polychromic", "train.steps=1"])
    assert "train/pg_reward" not in pure[1] and "grad/term/pg_reward" not in pure[1]
    assert pure[1]["train/pg_set"] == pytest.approx(train[1]["train/pg_set"])
    assert pure[1]["train/loss"] == pytest.approx(pure[1]["train/pg_set"] + 0.05 * pure[1]["train/kl"])


def test_compare_script_pairs_runs_by_seed_and_questions(tmp_path):
    import importlib.util

    from reasonlab.eval.metrics import pass_at_k

    spec = importlib.util.spec_from_file_location("polychromic_compare", ROOT / "scripts" / "polychromic_compare.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    correct = {"a": {"q0": 1, "q1": 0, "q2": 2}, "b": {"q0": 3, "q1": 1, "q2": 2}}  # correct samples out of 8
    outputs = {"a": ["1 + 2"] * 8, "b": [f"{i} + 2" for i in range(8)]}
    for side in "ab":
        run = tmp_path / side
        (run / "evals").mkdir(parents=True)
        (run / "config.yaml").write_text("seed: 0\n")
        rows = [{"id": q, "sample": j, "output": outputs[side][j], "correct": j < c}
                for q, c in correct[side].items() for j in range(8)]
        (run / "evals" / "test_best_step0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = cmp.main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--k", "4", "--n-boot", "200"])
    p1 = rep["pooled"]["pass@1"]
    assert p1["n"] == 3 and p1["diff"] == pytest.approx((2 + 1 + 0) / 8 / 3)
    pk = rep["pooled"]["pass@k"]
    want = sum(pass_at_k(8, correct["b"][q], 4) - pass_at_k(8, correct["a"][q], 4) for q in correct["a"]) / 3
    assert pk["diff"] == pytest.approx(want)
    assert rep["pooled"]["distinct_2"]["mean_a"] == pytest.approx(2 / 16)  # 2 distinct bigrams of 16
    assert rep["pooled"]["self_bleu"]["mean_a"] == pytest.approx(1.0) and rep["pooled"]["self_bleu"]["diff"] < 0


def test_semantic_diversity_alone_drives_the_set_term_in_a_dry_run(tmp_path):
    """combine: sum with MiniLM semantic diversity: the tiny model's random text earns no reward, yet the set term has
    a gradient (from the embedding distances alone) and the reward term has none."""
    from reasonlab.config import load_config
    from reasonlab.methods.polychromic import main
    from reasonlab.runs import Run

    cfg = load_config(TINY, ["set.diversity=semantic", "set.combine=sum", "tracking.tensorboard=false"])
    run = Run(cfg, tmp_path / "dry", install_signals=False, dry_run=True)
    out = main(cfg, run)
    run.close()
    assert out["dry_run"] and out["grad_terms"]["pg_set"] > 0 and out["grad_terms"]["pg_reward"] == 0.0


def test_config_holes_are_errors():
    from reasonlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="every set advantage is exactly 0"):
        load_config(TINY, ["set.subset_size=4"])  # rollout.n is 4: one subset, the whole set
    with pytest.raises(ConfigError, match="leave-one-out uses no random subsets"):
        load_config(TINY, ["set.estimator=loo", "set.n_subsets=8"])
    with pytest.raises(ConfigError, match="did you mean 'polychromic"):
        load_config(TINY, ["set.mode=polychromatic"])


def test_countdown_answers_are_compared_in_canonical_form():
    from reasonlab.tasks import get_task
    from reasonlab.tasks.countdown import canonical, parse

    assert canonical("3+9") == canonical("9+3") == "3+9"
    assert canonical("(2*3)+1") == canonical("1+2*3") == canonical("1 + (3 * 2)")
    assert canonical("10-(3-2)") == canonical("10+2-3") and canonical("8/(4/2)") == canonical("8*2/4")
    assert canonical("3*(4+5)") == canonical("(5+4)*3") != canonical("3*4+5")
    assert canonical("3-9") != canonical("9-3") and canonical("8/2") != canonical("2/8")  # order that matters stays
    for e in ("3+9", "1+2*3", "10-(3-2)", "8/(4/2)", "(5+4)*3"):  # the canonical spelling has the same value
        assert parse(canonical(e))[0] == parse(e)[0] and sorted(parse(canonical(e))[1]) == sorted(parse(e)[1])
    task = get_task("countdown")
    assert task.canonical_answer("9 + 3") == task.canonical_answer("3+9") and task.canonical_answer(None) is None
    assert task.canonical_answer("not an expression") == "not an expression"
    from reasonlab.rl.setlevel import answer_diversity

    answers = [task.canonical_answer(a) for a in ("3+9", "9+3", "(9+3)", "3*9")]
    assert answer_diversity(answers) == 0.5  # two distinct answers among four samples


def test_poly_epo_marginal_set_advantage_equals_its_definition():
    """Poly-EPO as publicly restated: f(G) = mean reward x distinct/n x 1[more than one answer class]; the marginal
    advantage of y sums f(G) - mean f over the sets G containing y; with all subsets and no normalization our subset
    estimator is that sum divided by the C(N-1, n-1) sets each sample is in."""
    from reasonlab.config import ConfigError, load_config

    rng = random.Random(7)
    for N, n in ((4, 2), (6, 3), (8, 4)):
        for _ in range(5):
            rewards = [float(rng.random() < 0.5) for _ in range(N)]
            answers = [rng.choice("aab") for _ in range(N)]
            subsets = list(itertools.combinations(range(N), n))
            f = {g: (sum(rewards[i] for i in g) / n) * (len({answers[i] for i in g}) / n)
                 * (len({answers[i] for i in g}) > 1) for g in subsets}
            base = sum(f.values()) / len(f)
            marginal = [sum(f[g] - base for g in subsets if i in g) for i in range(N)]
            score, _ = S.make_set_scorer(rewards, diversity="answers", answers=answers, objective="poly_epo")
            out = S.set_advantages(rewards, score, n=n, M=0)
            assert out["adv"].tolist() == pytest.approx([m / math.comb(N - 1, n - 1) for m in marginal], abs=1e-6)
    # a set of one answer class scores 0 under poly_epo, 1/n under the plain product
    same = ["x"] * 4
    epo, _ = S.make_set_scorer([1.0] * 4, diversity="answers", answers=same, objective="poly_epo")
    plain, _ = S.make_set_scorer([1.0] * 4, diversity="answers", answers=same)
    assert epo((0, 1)) == 0.0 and plain((0, 1)) == 0.5
    with pytest.raises(ValueError, match="diversity 'answers'"):
        S.make_set_scorer([1.0] * 2, diversity="distinct", texts=["a", "b"], objective="poly_epo")
    good = ["set.objective=poly_epo", "set.normalize=none"]
    assert load_config(TINY, [*good, "set.diversity=answers", "set.combine=product"]).set.objective == "poly_epo"
    with pytest.raises(ConfigError, match="set.normalize=none"):
        load_config(TINY, ["set.objective=poly_epo", "set.diversity=answers", "set.combine=product"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(TINY, ["set.objective=polyepo"])
