"""TRM: the paper's parameter count, recursion with gradient through the last cycle only, ACT halting and carry
swap-in, stablemax, sign-SGD, the conditioning seam, and a 2-step recipe smoke test with golden losses."""

import json
from pathlib import Path

import pytest
import torch

from reasonlab.models.trm import (TRM, SignSGD, TRMConfig, act_loss, act_loss_terms, log_stablemax,
                                  token_cross_entropy)

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw) -> TRMConfig:
    base = dict(vocab_size=6, seq_len=16, hidden_size=32, num_heads=2, expansion=2, ffn_multiple=16, H_cycles=2,
                L_cycles=2, num_puzzle_ids=3, puzzle_emb_len=2, halt_max_steps=3, halt_exploration_prob=0.0)
    return TRMConfig(**{**base, **kw})


def batch(B=4, L=16, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(1, V, (B, L), generator=g), "labels": torch.randint(2, V, (B, L), generator=g),
            "puzzle_ids": torch.randint(0, 3, (B,), generator=g)}


# ----------------------------------------------------------------------------------------------------- architecture

def test_paper_arc_config_counts_6829058_parameters_excluding_the_puzzle_embedding():
    torch.manual_seed(0)
    m = TRM(TRMConfig(vocab_size=12, seq_len=900, num_puzzle_ids=5))  # defaults = the paper's ARC net
    c = m.count_parameters()
    assert c["total_ex_puzzle_emb"] == 6_829_058
    assert c["net"] == 2 * 3_407_872 and c["puzzle_emb"] == 5 * 512
    m.requires_grad_(False)  # a frozen decoder still counts its parameters
    assert m.count_parameters()["total_ex_puzzle_emb"] == 6_829_058


def test_paper_arc_yaml_builds_the_paper_net():
    from reasonlab.config import load_config

    cfg = load_config(ROOT / "configs" / "trm" / "arc1-paper.yaml")
    fields = {f: getattr(cfg.model, f) for f in TRMConfig.__dataclass_fields__}
    m = TRM(TRMConfig(**{**fields, "vocab_size": 12, "seq_len": 900, "num_puzzle_ids": 1}))
    assert m.count_parameters()["total_ex_puzzle_emb"] == 6_829_058
    assert (cfg.model.H_cycles, cfg.model.L_cycles, cfg.model.halt_max_steps, cfg.model.puzzle_emb_len) == (3, 4, 16, 16)


def test_gradient_flows_only_through_the_last_h_cycle():
    cfg = tiny(H_cycles=3, L_cycles=2)
    m = TRM(cfg)
    grad_on = []
    m.net.register_forward_hook(lambda mod, inp, out: grad_on.append(torch.is_grad_enabled()))
    m.train()
    carry = m.initial_carry(batch())
    carry, out = m(carry, batch())
    # (T-1) * (n + 1) net calls without a graph, then n + 1 with one
    assert grad_on == [False] * 2 * 3 + [True] * 3
    assert not carry.y.requires_grad and not carry.z.requires_grad  # deep supervision: detached carry
    loss, _ = act_loss(out, carry, cfg)
    loss.backward()
    assert all(p.grad is not None for p in m.net.parameters())


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_shapes_and_puzzle_prefix_layout(mixer):
    cfg = tiny(mixer=mixer, pos_encodings="learned" if mixer == "mlp" else "rope")
    m = TRM(cfg)
    with torch.no_grad():
        m.puzzle_emb.weight.normal_()
    b = batch()
    prefix = m.puzzle_conditioning(b)
    assert prefix.shape == (4, 2, 32) and prefix[:, 1:].abs().sum() == 0  # only token 0 holds the id
    carry, out = m(m.initial_carry(b), b)
    assert out["logits"].shape == (4, 16, 6) and out["q_halt_logits"].shape == (4,)


# --------------------------------------------------------------------------------------------------------------- ACT

def test_act_halting_train_and_eval_and_carry_swap_in():
    cfg = tiny(halt_max_steps=3)
    m = TRM(cfg)
    b1, b2 = batch(seed=1), batch(seed=2)
    m.eval()  # evaluation: nobody halts before halt_max_steps
    carry = m.initial_carry(b1)
    for s in range(3):
        carry, _ = m(carry, b1)
        assert carry.halted.all() == (s == 2)
    m.train()
    with torch.no_grad():
        m.q_head.bias.fill_(10.0)  # q_halt > 0: every sample halts after one step
    carry, _ = m(m.initial_carry(b1), b1)
    assert carry.halted.all() and (carry.steps == 1).all()
    carry, _ = m(carry, b2)  # halted slots take the next batch's samples and restart from the initial state
    assert torch.equal(carry.data["inputs"], b2["inputs"]) and (carry.steps == 1).all()
    with torch.no_grad():
        m.q_head.bias.fill_(-10.0)
    carry, _ = m(m.initial_carry(b1), b1)
    y1 = carry.y.clone()
    carry, _ = m(carry, b2)  # not halted: keeps working on b1 from its carried state
    assert torch.equal(carry.data["inputs"], b1["inputs"]) and (carry.steps == 2).all()
    assert not torch.equal(carry.y, y1)


def test_conditioning_is_called_on_every_act_step_with_the_current_samples():
    cfg = tiny()
    m = TRM(cfg)
    seen = []

    def cond(data):
        seen.append(data["inputs"].clone())
        return torch.zeros(data["inputs"].shape[0], cfg.puzzle_emb_len, cfg.hidden_size)

    m.eval()
    b = batch()
    carry = m.initial_carry(b)
    for _ in range(cfg.halt_max_steps):
        carry, _ = m(carry, b, conditioning=cond)
    assert len(seen) == cfg.halt_max_steps and all(torch.equal(x, b["inputs"]) for x in seen)


# -------------------------------------------------------------------------------------------------------------- loss

def test_stablemax_normalizes_and_matches_its_definition():
    x = torch.tensor([[2.0, -1.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(log_stablemax(x), torch.log(s / s.sum()))
    assert torch.allclose(log_stablemax(torch.randn(5, 7, dtype=torch.float64)).exp().sum(-1),
                          torch.ones(5, dtype=torch.float64))
    labels = torch.tensor([[0, -100]])
    nll = token_cross_entropy(torch.tensor([[[2.0, -1.0, 0.0]] * 2]), labels, "stablemax")
    assert nll[0, 1] == 0 and nll[0, 0] == pytest.approx(-float(torch.log(s / s.sum())[0]))


def test_stablemax_gradient_is_finite_at_a_logit_of_exactly_one():
    x = torch.tensor([[1.0, -0.5, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    log_stablemax(x)[0, 1].backward()  # the 1/(1-x) branch is not taken at x = 1: its gradient must not leak
    assert torch.isfinite(x.grad).all()


def test_act_loss_is_the_sum_of_its_weighted_terms():
    cfg = tiny(q_loss_weight=0.5)
    m = TRM(cfg)
    carry, out = m(m.initial_carry(batch()), batch())
    loss, met = act_loss(out, carry, cfg)
    terms = act_loss_terms(out, carry, cfg)
    assert terms["q_halt"][0] == 0.5 and terms["lm"][0] == 1.0
    assert loss.item() == pytest.approx(terms["lm"][1].item() + 0.5 * terms["q_halt"][1].item())
    assert met["count"] == 0  # nobody halted on step 1 (q ~ -5): metrics count halted samples only


def test_sign_sgd_moves_only_rows_in_the_batch_by_lr_times_sign():
    emb = torch.nn.Embedding(4, 3, sparse=True)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    opt = SignSGD([emb.weight], lr=0.1, weight_decay=0.5)
    (emb(torch.tensor([1, 1, 3])) * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    opt.step()
    w = emb.weight.detach()
    assert torch.equal(w[0], torch.ones(3)) and torch.equal(w[2], torch.ones(3))
    assert torch.allclose(w[1], torch.full((3,), 1 * (1 - 0.05)) - 0.1 * torch.tensor([1.0, -1.0, 1.0]))


# ------------------------------------------------------------------------------------------------------ recipe smoke

SMOKE = {"method": "trm", "seed": 0,
         "data": {"task": "sudoku", "task_args": {"size": 4, "n_train": 40, "n_val": 8, "n_test": 8}},
         "model": {"hidden_size": 32, "num_heads": 2, "num_layers": 2, "expansion": 4, "ffn_multiple": 16,
                   "H_cycles": 2, "L_cycles": 2, "mixer": "attention", "pos_encodings": "rope", "puzzle_emb_len": 1,
                   "halt_max_steps": 2, "loss_type": "stablemax"},
         "train": {"steps": 2, "lr": 1e-3, "batch_size": 8, "log_every": 1, "warmup_steps": 0, "weight_decay": 0.1,
                   "puzzle_emb_lr": 1e-4},
         "eval": {"every": 0, "train_limit": 4, "select": "pass@1", "ks": [1, 2]},
         "watch": {"audit_every": 1}, "tracking": {"tensorboard": False}}


def smoke_config(tmp_path, spec=SMOKE):
    from reasonlab.config import load_config

    path = tmp_path / "smoke.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return load_config(path)


def test_recipe_two_steps_golden_loss_and_run_folder(tmp_path):
    from reasonlab.methods import trm
    from reasonlab.runs import Run

    cfg = smoke_config(tmp_path)
    run = Run(cfg, tmp_path / "run", install_signals=False)
    res = trm.main(cfg, run)
    run.finish(results=res)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses == pytest.approx(GOLDEN_SUDOKU_LOSSES, abs=1e-4)
    first = rows[0]
    for key in ("grad/term/lm", "grad/term/q_halt", "grad/module/decoder", "grad/module/heads", "time/cpu_s"):
        assert key in first
    assert first["grad/term/lm"] > 0 and first["grad/term/q_halt"] > 0
    evals = sorted(p.name for p in (tmp_path / "run" / "evals").glob("*.json"))
    assert evals == ["test_best_step2.json", "train_best_step2.json", "val_step2.json"]
    test = json.loads((tmp_path / "run" / "evals" / "test_best_step2.json").read_text())
    assert test["final"] and test["selected_on"] == "val" and test["n_tasks"] == 8
    assert all(k in test["metrics"]["pass@1"] for k in ("value", "n", "lo", "hi"))
    ids = (tmp_path / "run" / "data" / "train_ids.txt").read_text().split()
    recs = [json.loads(x)["id"] for x in (tmp_path / "run" / "evals" / "test_best_step2.jsonl").read_text().split("\n")
            if x]
    assert len(ids) == 40 and not set(ids) & set(recs)


GOLDEN_SUDOKU_LOSSES = [2.0109004974365234, 1.9562894105911255]


# ------------------------------------------------------------------------------------ EMA checkpoints, eval.select last

TINY = ROOT / "configs" / "trm" / "sudoku4-tiny.yaml"


def _tiny_run(tmp_path, name, overrides, resume=False):
    from reasonlab.config import load_config
    from reasonlab.methods import trm
    from reasonlab.runs import Run

    cfg = load_config(TINY, ["tracking.tensorboard=false", *overrides])
    run = Run(cfg, tmp_path / name, install_signals=False, resume=resume)
    try:
        res = trm.main(cfg, run)
    finally:
        run.close()
    return res, tmp_path / name


def _tensors(run_dir, ckpt, module):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / ckpt / f"module.{module}.safetensors"))


def test_ema_is_in_every_step_checkpoint_and_a_resumed_run_ends_with_the_uninterrupted_runs_ema(tmp_path):
    # halt_max_steps 1: every sample halts after each step, so the ACT carry (not checkpointed) is empty at any step
    # boundary and a resumed run computes exactly what the uninterrupted one does
    common = ["train.ema=0.9", "model.halt_max_steps=1", "eval.every=0", "train.lr=0.01"]
    _, straight = _tiny_run(tmp_path, "straight", common + ["train.steps=6"])
    _, resumed = _tiny_run(tmp_path, "resumed", common + ["train.steps=3"])
    mid_ema, mid_live = _tensors(resumed, "step_3", "ema"), _tensors(resumed, "step_3", "model")
    assert mid_ema and all(k.startswith("trm/") for k in mid_ema)  # parameter names, "." -> "/"
    assert "trm/puzzle_emb/weight" not in mid_ema  # the puzzle-id table is not averaged (as the official EMA)
    # not vacuous: an EMA restarted from the step-3 weights would end 0.9^3 * (ema - live) away from this one
    assert any(not torch.equal(v, mid_live[k[len("trm/"):].replace("/", ".")]) for k, v in mid_ema.items())
    _tiny_run(tmp_path, "resumed", common + ["train.steps=6"], resume=True)
    a, b = _tensors(straight, "step_6", "ema"), _tensors(resumed, "step_6", "ema")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _tensors(straight, "step_6", "model"), _tensors(resumed, "step_6", "model")
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the live weights, as before
    # the evaluated ('best') weights are the EMA; they hold no second copy of it
    best = _tensors(straight, "best", "model")
    ema = _tensors(straight, "step_6", "ema")
    assert all(torch.equal(best[k[len("trm/"):].replace("/", ".")], v) for k, v in ema.items())
    assert not (straight / "checkpoints" / "best" / "module.ema.safetensors").exists()


def test_select_last_without_a_validation_split_tests_the_final_weights_and_never_chooses(tmp_path):
    res, d = _tiny_run(tmp_path, "last", ["eval.select=last", "data.val_split=", "train.ema=0.9", "train.steps=4",
                                          "eval.every=2", "train.checkpoint_every=2"])
    evals = sorted(p.name for p in (d / "evals").glob("*.json"))
    assert evals == ["test_last_step4.json", "train_last_step4.json"]  # no validation eval at all
    test = json.loads((d / "evals" / "test_last_step4.json").read_text())
    assert test["final"] and test["best_step"] == 4 and test["selected_on"].startswith("last")
    assert res["best_step"] == 4 and res["best_val"] is None
    state = json.loads((d / "checkpoints" / "best" / "state.json").read_text())
    assert state["step"] == 4 and "test" not in state["selected_on"]
    best, ema = _tensors(d, "best", "model"), _tensors(d, "step_4", "ema")
    assert all(torch.equal(best[k[len("trm/"):].replace("/", ".")], v) for k, v in ema.items())


def test_select_last_with_a_validation_split_keeps_its_curve_but_not_its_choice(tmp_path):
    res, d = _tiny_run(tmp_path, "lastval", ["eval.select=last", "train.steps=4", "eval.every=2"])
    evals = sorted(p.name for p in (d / "evals").glob("*.json"))
    assert evals == ["test_last_step4.json", "train_last_step4.json", "val_step2.json", "val_step4.json"]
    assert res["best_step"] == 4


def test_a_choice_without_validation_data_is_refused_at_load(tmp_path):
    from reasonlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.select: last"):
        load_config(TINY, ["data.val_split=", "eval.select=pass@1"])
    with pytest.raises(ConfigError, match="chosen on test"):
        load_config(TINY, ["data.val_split=test"])
    with pytest.raises(ConfigError, match="eval.select must be one of"):
        load_config(TINY, ["eval.select=pass@2"])  # ks: [1]
