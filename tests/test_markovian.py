"""Markovian CoT recipe: the actor-reward gradient is real (finite differences) and the no_reward_grad ablation kills it
exactly; PPO's ratio is 1 at the first minibatch and dual-clip bounds the loss; golden losses of a 2-step run; the same
run under 2 processes is in tests/test_distributed.py; every shipped markovian config dry-runs."""

import json
from pathlib import Path

import pytest
import torch

from reasonlab.config import load_config
from reasonlab.methods import markovian as MK
from reasonlab.models.lm import load_for_config
from reasonlab.rl import markovian as M
from reasonlab.rl.audit import audit_terms
from reasonlab.rl.policy import group_standardize, group_stats
from reasonlab.runs import Run
from reasonlab.tasks import get_task

from conftest import ROOT, SHARED_DATA

TINY = ROOT / "configs" / "markovian" / "arithmetic-tiny.yaml"


def tiny_ctx(*overrides: str, dtype=torch.float64) -> MK.Ctx:
    """The recipe's context on the tiny random model, LoRA B perturbed so the policy differs from the reference."""
    cfg = load_config(TINY, list(overrides))
    model, tok = load_for_config(cfg.model)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    task = get_task(cfg.data.task, **cfg.data.task_args)
    return MK.Ctx(model, tok, task, cfg)


def one_rollout(ctx: MK.Ctx, n_questions: int = 1) -> MK.Rollout:
    exs = ctx.task.examples("train")[:n_questions]
    ctx.model.eval()
    return MK.rollout(ctx, 0, list(range(n_questions)), exs, ctx.cfg.rl.group_size)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_pack_rows_and_group_stats_match_group_standardize():
    rows = M.pack_rows([([1, 2], [3, 4, 5]), ([7], [8, 9, 10])], pad_id=0)
    assert rows.ids.tolist() == [[1, 2, 3, 4, 5], [0, 7, 8, 9, 10]]
    assert rows.seg_mask[1].tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]  # targets 3,4,5 / 8,9,10 on the (B, T-1) grid
    assert M.segment_span(rows, 1) == 3
    r = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.0, 0.001])
    mean, denom = group_stats(r, 2, min_std=0.01)
    torch.testing.assert_close((r - mean) / denom, group_standardize(r, 2, min_std=0.01))
    assert ((r - mean) / denom)[6:].abs().max() < 0.06  # a near-tied group is floored, not blown up to +-1
    assert M.answer_in_text("135", "so 68 + 67 = 135.") and not M.answer_in_text("135", "1350 or 2135")
    assert M.answer_in_text("C", "the answer is C") and not M.answer_in_text("C", "CAT")


def test_token_logprobs_last_n_equals_the_tail_of_the_full_computation():
    from reasonlab.rl.policy import token_logprobs

    ctx = tiny_ctx()
    rows = M.pack_rows([([5, 17, 42], [9, 3, 8]), ([11], [12, 13, 14])], ctx.tok.pad_token_id)
    full, full_logits = token_logprobs(ctx.model, rows.ids, rows.attn, return_logits=True)  # (2, 5), (2, 5, V)
    tail, tail_logits = token_logprobs(ctx.model, rows.ids, rows.attn, return_logits=True, last=3)  # (2, 3)
    torch.testing.assert_close(tail, full[:, -3:])
    torch.testing.assert_close(tail_logits, full_logits[:, -3:])
    r = M.segment_logprob(ctx.model, rows, 1, "sum")
    torch.testing.assert_close(r, (full * rows.seg_mask[1]).sum(-1))


def test_shared_prefix_forward_equals_one_copy_per_row_values_and_gradients():
    ctx = tiny_ctx()
    ro = one_rollout(ctx, n_questions=2)
    rows = list(range(len(ro.exs)))
    params = trainable(ctx.model)
    res = {}
    for share in (True, False):
        ctx.cfg.rl.share_prefix = share
        f = MK.forward_terms(ctx, ro, rows, actor_grad=True)
        total = f["lp"].sum() + f["R"].sum()
        res[share] = f, torch.autograd.grad(total, params)
    (a, ga), (b, gb) = res[True], res[False]
    for k in ("lp", "logits", "R", "ref_lp", "ref_logits", "mask"):
        torch.testing.assert_close(a[k], b[k], atol=1e-9, rtol=1e-7, msg=k)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)  # the float32 RMSNorm inside the model


def test_actor_reward_gradient_is_nonzero_and_matches_finite_differences():
    ctx = tiny_ctx()
    ro = one_rollout(ctx)
    rows = list(range(len(ro.exs)))
    params = trainable(ctx.model)

    def term(stats=None):
        f = MK.forward_terms(ctx, ro, rows, actor_grad=True)
        rew = f["R"].detach() - ro.ref_logp
        mean, denom = stats or group_stats(rew, ctx.cfg.rl.group_size, min_std=ctx.cfg.rl.min_std)
        terms, _ = MK.loss_terms(ctx, f, ro.ref_logp, mean, denom, (rew - mean) / denom)
        return terms["actor_reward"], (mean, denom)

    loss, stats = term()
    grads = torch.autograd.grad(loss, params)
    g_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert g_norm > 1e-3, "the actor-reward term must send gradient into the adapter"
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, v))
    eps = 1e-4  # truncation error ~eps^2 vs the float32 RMSNorm inside the model (~1e-7 / eps): 1e-4 balances them
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
        up = term(stats)[0]
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
        down = term(stats)[0]
        for p, d in zip(params, v):
            p.add_(eps * d)
    numeric = (up - down) / (2 * eps)
    assert abs(analytic.item()) > 1e-4
    assert numeric.item() == pytest.approx(analytic.item(), rel=1e-3)


def test_cot_log_probs_are_those_of_the_sampling_temperature_and_the_answer_is_at_t1():
    """Every CoT log-prob that enters the policy gradient, the PPO ratio or the KL is log_softmax(logits / T) at the
    rollout temperature, on both forward paths; the answer reward is ln pi(answer | CoT) at T = 1."""
    for share in (True, False):
        ctx = tiny_ctx("rl.temperature=0.7", f"rl.share_prefix={str(share).lower()}")
        ro = one_rollout(ctx, n_questions=2)
        rows = list(range(len(ro.exs)))
        with torch.no_grad():
            f = MK.forward_terms(ctx, ro, rows, actor_grad=False)
            logits = ctx.model(input_ids=ro.cot_rows.ids, attention_mask=ro.cot_rows.attn,
                               position_ids=(ro.cot_rows.attn.cumsum(-1) - 1).clamp(min=0)).logits
            K = ctx.cfg.data.cot_tokens
            want = torch.log_softmax(logits[:, -K - 1:-1].double() / 0.7, -1).gather(
                -1, ro.cot_t[..., None]).squeeze(-1)  # (b, K): the last K tokens of every row are its CoT
            torch.testing.assert_close(f["lp"], want.to(f["lp"].dtype), atol=1e-7, rtol=1e-6)
            assert torch.allclose(f["logits"].double(), logits[:, -K - 1:-1].double() / 0.7, atol=1e-6)
            R = M.segment_logprob(ctx.model, ro.ans_rows, 3, ctx.cfg.rl.answer_logprob)  # T = 1
            torch.testing.assert_close(f["R"], R, atol=1e-7, rtol=1e-6)


def test_the_summed_objective_is_the_default_and_its_gradient_matches_finite_differences():
    ctx = tiny_ctx()
    assert ctx.cfg.rl.agg == "seq_sum"
    ro = one_rollout(ctx)
    rows = list(range(len(ro.exs)))
    params = trainable(ctx.model)

    def loss(stats=None):
        """The weighted loss; `stats` = the rollout's (mean, denom, A), held fixed as the update holds them."""
        f = MK.forward_terms(ctx, ro, rows, actor_grad=True)
        if stats is None:
            rew = f["R"].detach() - ro.ref_logp
            mean, denom = group_stats(rew, ctx.cfg.rl.group_size, min_std=ctx.cfg.rl.min_std)
            stats = (mean, denom, (rew - mean) / denom)
        mean, denom, adv = stats
        terms, _ = MK.loss_terms(ctx, f, ro.ref_logp, mean, denom, adv)
        # the pg term is -mean_i(A_i * sum_t ln pi(cot_it)): a sum over the CoT, not a per-token mean
        torch.testing.assert_close(terms["pg"], -(adv.detach() * (f["lp"] * f["mask"]).sum(-1)).mean())
        w = MK.weighted(ctx, terms)
        return sum(wt * t for wt, t in w.values()), stats

    total, stats = loss()
    grads = torch.autograd.grad(total, params)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, v))
    eps = 1e-4
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
        up = loss(stats)[0]
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
        down = loss(stats)[0]
        for p, d in zip(params, v):
            p.add_(eps * d)
    assert abs(analytic.item()) > 1e-4
    assert ((up - down) / (2 * eps)).item() == pytest.approx(analytic.item(), rel=1e-3)


def test_kl_coef_zero_runs_no_reference_forward_and_leaves_the_other_terms_unchanged(monkeypatch):
    """At rl.kl_coef 0 the reference forward and the KL are skipped (they only fed a term of weight 0); pg and the
    actor term are the values computed with the KL on, on the same rollout."""
    got = {}
    ctx = tiny_ctx("rl.kl_coef=0.1", dtype=torch.float32)
    ro = one_rollout(ctx)
    for coef in ("0.1", "0"):
        ctx.cfg.rl.kl_coef = float(coef)
        calls = []
        real = MK.reference
        monkeypatch.setattr(MK, "reference", lambda m: calls.append(1) or real(m))
        rows = list(range(len(ro.exs)))
        f = MK.forward_terms(ctx, ro, rows, actor_grad=True, with_ref=ctx.cfg.rl.kl_coef != 0)
        monkeypatch.setattr(MK, "reference", real)
        rew = f["R"].detach() - ro.ref_logp
        mean, denom = group_stats(rew, ctx.cfg.rl.group_size, min_std=ctx.cfg.rl.min_std)
        terms, _ = MK.loss_terms(ctx, f, ro.ref_logp, mean, denom, (rew - mean) / denom)
        got[coef] = (terms, MK.weighted(ctx, terms), len(calls))
    (on, w_on, calls_on), (off, w_off, calls_off) = got["0.1"], got["0"]
    assert calls_on > 0 and calls_off == 0
    assert "kl" in w_on and "kl" not in w_off and "ref_lp" not in off
    for k in ("pg", "actor_reward"):
        torch.testing.assert_close(off[k], on[k])


def test_no_reward_grad_makes_the_actor_term_gradient_exactly_zero_and_the_audit_says_so():
    for grad_on in (True, False):
        ctx = tiny_ctx(f"rl.actor_reward_grad={str(grad_on).lower()}", dtype=torch.float32)
        ro = one_rollout(ctx)
        rows = list(range(len(ro.exs)))
        f = MK.forward_terms(ctx, ro, rows, actor_grad=ctx.cfg.rl.actor_reward_grad)
        rew = f["R"].detach() - ro.ref_logp
        mean, denom = group_stats(rew, ctx.cfg.rl.group_size, min_std=ctx.cfg.rl.min_std)
        terms, _ = MK.loss_terms(ctx, f, ro.ref_logp, mean, denom, (rew - mean) / denom)
        audit = audit_terms(MK.weighted(ctx, terms), trainable(ctx.model))
        a = audit.terms["actor_reward"]
        assert audit.terms["pg"].grad_norm > 0 and audit.terms["kl"].grad_norm > 0
        if grad_on:
            assert a.grad_norm > 0 and audit.dead_terms() == []
        else:
            assert a.grad_norm == 0.0 and not a.requires_grad and audit.dead_terms() == ["actor_reward"]
    # the public code's other mistake: statistics that carry gradient make sum(A) = 0 and the term's gradient vanish
    r = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bad = -((r - r.mean()) / r.std(unbiased=False)).mean()
    assert torch.autograd.grad(bad, r)[0].abs().max() < 1e-12


def test_ppo_ratio_is_exactly_one_at_the_first_minibatch_and_dual_clip_bounds_the_loss():
    ctx = tiny_ctx("rl.loss=ppo", "rl.ppo_epochs=2", "rl.minibatches=2", dtype=torch.float32)
    ro = one_rollout(ctx, n_questions=2)
    ctx.model.train()
    rows = list(range(4))  # the first minibatch (question 0's group)
    with torch.no_grad():
        old = MK.forward_terms(ctx, ro, rows, actor_grad=False)
    f = MK.forward_terms(ctx, ro, rows, actor_grad=True)
    rew = old["R"] - ro.ref_logp[rows]
    mean, denom = group_stats(rew, 4)
    terms, st = MK.loss_terms(ctx, f, ro.ref_logp[rows], mean, denom, (rew - mean) / denom, old["lp"])
    assert st["ppo/ratio_mean"].item() == 1.0 and st["ppo/ratio_max"].item() == 1.0
    assert st["ppo/clip_frac"].item() == 0.0
    # a policy that drifted 5 nats/token away from pi_old: for A < 0 the dual-clip caps the per-token loss at c |A|
    adv = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    terms, st = MK.loss_terms(ctx, f, ro.ref_logp[rows], mean, denom, adv, old["lp"] - 5.0)
    assert st["ppo/ratio_max"].item() > 100
    K = ctx.cfg.data.cot_tokens  # seq_sum: each CoT's K capped tokens add up
    assert terms["pg"].item() == pytest.approx(3.0 * adv.abs().mean().item() * K, rel=1e-5)


def test_ablations_non_markovian_prompt_and_expert_iteration_selection():
    ctx = tiny_ctx(dtype=torch.float32)
    e = ctx.task.examples("train")[0]
    redacted = ctx.tok.decode(ctx.scoring_prefix_ids(e))
    assert "<Redacted>" in redacted and e.question not in redacted
    ctx_nm = tiny_ctx("rl.markovian=false", dtype=torch.float32)
    shown = ctx_nm.tok.decode(ctx_nm.scoring_prefix_ids(e))
    assert e.question in shown and "<Redacted>" not in shown
    ei = tiny_ctx("rl.loss=ei", "rl.ei_min_adv=0.5", "rl.actor_reward_weight=0", dtype=torch.float32)
    ro = one_rollout(ei)
    f = MK.forward_terms(ei, ro, list(range(4)), actor_grad=False)
    adv = torch.tensor([1.2, -0.3, 0.6, -1.5])
    terms, st = MK.loss_terms(ei, f, ro.ref_logp, torch.zeros(4), torch.ones(4), adv)
    nll = -(f["lp"] * f["mask"]).sum(-1)  # (4,): the selected CoTs' log-likelihoods (rl.agg=seq_sum)
    assert terms["pg"].item() == pytest.approx(((nll[0] + nll[2]) / 2).item(), rel=1e-6)
    assert st["ei/selected_frac"].item() == 0.5


def run_recipe(tmp: Path, *overrides: str) -> tuple[Path, dict]:
    cfg = load_config(TINY, list(overrides))
    run = Run(cfg, tmp, install_signals=False)
    result = MK.main(cfg, run)
    run.finish("completed", results=result)
    return tmp, result


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


# after steps 1 and 2 of configs/markovian/arithmetic-tiny.yaml (1 process, 1 thread). The actor-reward VALUE is ~0 by
# construction (-mean of a centred advantage); its GRADIENT (the audit) is what moves the adapter. KL is exactly 0 at
# step 1 (policy == reference before the first update). Re-measured when ln pi(CoT | q) became the paper's sum over
# the K = 8 CoT tokens (rl.agg=seq_sum): the pg and kl terms are 8x the earlier per-token means.
GOLDEN = {1: {"train/loss": 0.16110712, "train/pg_loss": 0.16110712, "train/actor_reward_loss": 0.0,
              "train/kl_loss": 0.0, "grad/term/actor_reward": 60.450963, "grad/term/pg": 1.7755249,
              "train/answer_logp": -10.838052},
          2: {"train/loss": 0.14555585, "train/pg_loss": 0.14553833, "train/actor_reward_loss": 0.0,
              "train/kl_loss": 0.00017516233, "grad/term/actor_reward": 60.656818, "grad/term/pg": 1.5433951,
              "train/answer_logp": -10.895268}}


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    return run_recipe(tmp_path_factory.mktemp("golden") / "run")


def test_two_step_run_matches_golden_losses_and_writes_the_contract(golden_run):
    run_dir, result = golden_run
    rows = {r["step"]: r for r in metrics_rows(run_dir) if "train/loss" in r}
    for s, want in GOLDEN.items():
        for k, v in want.items():
            assert rows[s][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (s, k, rows[s][k])
    r1 = rows[1]
    for key in ("grad/term/pg", "grad/term/actor_reward", "grad/term/kl", "rollout/frac_zero_std",
                "rollout/unique_ratio", "rollout/repeat_ngram_rate", "rollout/max_char_run", "rollout/answer_in_cot",
                "train/answer_logp", "train/answer_logp_ref", "time/cpu_s"):
        assert key in r1, key
    assert r1["grad/term/actor_reward"] > 0 and r1["rollout/len_tokens"] == 8.0
    evals = sorted(p.name for p in (run_dir / "evals").glob("*.json"))
    assert evals == ["test_base_step0.json", f"test_best_step{result['best_step']}.json", "val_step0.json",
                     "val_step2.json"]
    rec = json.loads((run_dir / "evals" / "val_step0.jsonl").read_text().splitlines()[0])
    assert {"cot", "output", "extractions", "correct_by", "answer_in_cot"} <= set(rec)
    assert set(rec["extractions"]) == {"anchor@1", "simple@1", "flexible-extract@1", "cot-strict-match@1"}
    assert "test_vs_base" in result and result["test_vs_base"]["n"] == 4
    assert (run_dir / "checkpoints" / "best" / "manifest.json").exists()


PAPER_CONFIGS = ["gsm8k", "svamp", "aqua", "mathqa", "mmlu", "arc", "arithmetic", "wiki"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_parse_and_dry_run(name, tmp_path, monkeypatch):
    path = ROOT / "configs" / "markovian" / f"{name}-llama3.1-8b.yaml"
    cfg = load_config(path)
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 16 and cfg.train.lr == 1e-4
    assert cfg.rl.kl_coef == 0.1 and cfg.train.batch_size == 12 and cfg.rl.temperature in (1.0, 1.5)
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("REASONLAB_DATA", str(SHARED_DATA))
    run = Run(cfg, tmp_path / "dry", dry_run=True, install_signals=False)
    result = MK.main(cfg, run)
    assert result["dry_run"] and result["grad/term/actor_reward"] > 0 and math_finite(result["train/loss"])
    # what it would use, and on this CPU machine a one-line warning that the config is sized for a GPU
    assert (result["precision"], result["world_size"], result["backend"]) == ("bf16", 1, "own")
    if not torch.cuda.is_available():
        assert result["device"] == "cpu" and result["warning"].startswith("this config is sized for 1 GPU")


def test_paper_config_dry_run_prints_device_precision_processes_backend_and_the_gpu_warning(tmp_path):
    from conftest import cli

    p = cli("run", "configs/markovian/gsm8k-llama3.1-8b.yaml", "--dry-run")
    out = p.stdout
    assert "compute: " in out and ", bf16, 1 process" in out and "generation backend " in out
    if not torch.cuda.is_available():
        warn = [line for line in out.splitlines() if line.startswith("warning: this config is sized for 1 GPU")]
        assert len(warn) == 1 and "runs on the CPU" in warn[0]


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_compare_script_pairs_seeds_and_pools_over_questions(tmp_path):
    """scripts/markovian_compare.py on hand-made run folders: per-run trained - untrained, per-seed variant -
    reference, and the pooled difference of per-question means over seeds, all paired by question id."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("markovian_compare",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "markovian_compare.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    qs = [f"q{i}" for i in range(10)]
    right = {("full", 0): {0, 1, 2, 3}, ("full", 1): {0, 1, 2}, ("ei", 0): {0, 1, 2, 3, 4, 5}, ("ei", 1): {0, 1, 5}}
    dirs: dict[str, list[str]] = {}
    for (name, seed), ok in right.items():
        run = tmp_path / f"{name}-s{seed}"
        (run / "evals").mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: {seed}\n")
        for tag, good in (("test_base_step0", {0}), ("test_best_step40", ok)):
            rows = [{"id": q, "correct": i in good} for i, q in enumerate(qs)]
            (run / "evals" / f"{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.setdefault(name, []).append(str(run))
    rep = cmp.main([f"--runs=full={','.join(dirs['full'])}", f"--runs=ei={','.join(dirs['ei'])}",
                    "--reference", "full", "--n-boot", "200"])
    r = rep["runs"]["ei/seed0"]
    assert r["best_step"] == 40 and r["trained"]["value"] == pytest.approx(0.6)
    assert r["trained_minus_untrained"]["diff"] == pytest.approx(0.5)
    assert rep["per_seed"]["ei/seed0"]["diff"] == pytest.approx(0.2)
    assert rep["per_seed"]["ei/seed1"]["diff"] == pytest.approx(0.0)  # {0,1,5} vs {0,1,2}: same count, paired
    assert rep["pooled"]["full"]["mean"]["value"] == pytest.approx(0.35)
    assert rep["pooled"]["ei"]["minus_reference"]["diff"] == pytest.approx(0.1)
    with pytest.raises(SystemExit):
        cmp.main([f"--runs=ei={dirs['ei'][0]}", "--reference", "full"])
