"""ETRM: encoder variants (shapes, scale, prefix layout, demo masking/order), gradient and per-ACT-step recomputation
through TRM's conditioning seam, decoder loading errors, frozen-decoder checksum verification across checkpoints
(in the run and with `reasonlab verify-frozen`), and a 2-step grid-rules smoke test with golden losses."""

import json
import math
from pathlib import Path

import pytest
import torch

from reasonlab.models.etrm import build_encoder, load_decoder_weights
from reasonlab.models.trm import TRM, TRMConfig, act_loss

ROOT = Path(__file__).resolve().parents[1]


def dec_cfg(**kw) -> TRMConfig:
    base = dict(vocab_size=12, seq_len=49, hidden_size=32, num_heads=2, expansion=2, ffn_multiple=16, H_cycles=2,
                L_cycles=1, num_puzzle_ids=0, puzzle_emb_len=4, halt_max_steps=3, halt_exploration_prob=0.0,
                pos_encodings="learned")
    return TRMConfig(**{**base, **kw})


def demo_batch(B=3, K=3, L=49, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(0, 12, (B, L), generator=g), "labels": torch.randint(1, 12, (B, L), generator=g),
            "puzzle_ids": torch.zeros(B, dtype=torch.long),
            "demo_inputs": torch.randint(0, 12, (B, K, L), generator=g),
            "demo_outputs": torch.randint(0, 12, (B, K, L), generator=g), "demo_mask": torch.ones(B, K, dtype=torch.bool)}


@pytest.mark.parametrize("variant", ["pair", "cross"])
def test_encoder_shapes_scale_and_prefix_layout(variant):
    torch.manual_seed(0)
    d = dec_cfg()
    enc = build_encoder(d, variant=variant, hidden_size=16, num_heads=2, output_norm=2.5)
    b = demo_batch()
    c = enc.conditioning(b)
    assert c.shape == (3, 4, 32)
    assert torch.allclose(c.norm(dim=-1), torch.full((3, 4), 2.5), atol=1e-3)  # before the decoder's sqrt(D) scale
    one = build_encoder(d, variant=variant, hidden_size=16, num_heads=2, n_tokens=1)(
        b["demo_inputs"], b["demo_outputs"], b["demo_mask"])
    assert one[:, 1:].abs().sum() == 0 and (one[:, 0].norm(dim=-1) - 1).abs().max() < 1e-3  # as a puzzle-id prefix
    other = demo_batch(seed=1)
    assert not torch.allclose(c, enc.conditioning(other))  # reads the demos


def test_pair_encoder_ignores_demo_order_and_absent_demos():
    torch.manual_seed(0)
    enc = build_encoder(dec_cfg(), variant="pair", hidden_size=16, num_heads=2)
    b = demo_batch(K=3)
    base = enc(b["demo_inputs"], b["demo_outputs"], b["demo_mask"])
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(base, enc(b["demo_inputs"][:, perm], b["demo_outputs"][:, perm], b["demo_mask"]), atol=1e-5)
    pad = torch.zeros(3, 1, 49, dtype=torch.long)  # a 4th, absent demo
    mask = torch.cat((b["demo_mask"], torch.zeros(3, 1, dtype=torch.bool)), 1)
    more = enc(torch.cat((b["demo_inputs"], pad), 1), torch.cat((b["demo_outputs"], pad), 1), mask)
    assert torch.allclose(base, more, atol=1e-5)


def test_cross_encoder_ignores_absent_demos():
    torch.manual_seed(0)
    enc = build_encoder(dec_cfg(), variant="cross", hidden_size=16, num_heads=2)
    b = demo_batch(K=2)
    base = enc(b["demo_inputs"], b["demo_outputs"], b["demo_mask"])
    junk = torch.randint(0, 12, (3, 1, 49))
    mask = torch.cat((b["demo_mask"], torch.zeros(3, 1, dtype=torch.bool)), 1)
    assert torch.allclose(base, enc(torch.cat((b["demo_inputs"], junk), 1), torch.cat((b["demo_outputs"], junk), 1),
                                     mask), atol=1e-5)


def test_encoder_is_recomputed_every_act_step_and_receives_gradient():
    torch.manual_seed(0)
    d = dec_cfg()
    trm, enc = TRM(d), build_encoder(d, variant="pair", hidden_size=16, num_heads=2)
    calls = []
    enc.register_forward_hook(lambda m, i, o: calls.append(o.requires_grad))
    trm.train()
    b = demo_batch()
    carry = trm.initial_carry(b)
    for _ in range(3):
        carry, out = trm(carry, b, conditioning=enc.conditioning)
        loss, _ = act_loss(out, carry, d)
        enc.zero_grad()
        loss.backward()
        g = math.sqrt(sum(float(p.grad.square().sum()) for p in enc.parameters() if p.grad is not None))
        assert g > 0
    assert calls == [True, True, True]


def test_unknown_encoder_key_and_bad_decoder_checkpoint_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'hidden_size'") as e:
        build_encoder(dec_cfg(), hiden_size=8)
    assert "\n" not in str(e.value)
    from safetensors.torch import save_file

    other = TRM(dec_cfg(hidden_size=16))
    save_file({f"model.{k}": v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="other shapes") as e:
        load_decoder_weights(TRM(dec_cfg()), tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="train a TRM first"):
        load_decoder_weights(TRM(dec_cfg()), tmp_path / "nope.safetensors")


# -------------------------------------------------------------------------------------------------- recipe + frozen

GRID = {"method": "trm", "seed": 0,
        "data": {"task": "grid-rules", "task_args": {"n_train": 12, "n_val": 3, "n_heldout": 3, "heldout_rules": 2,
                                                    "max_size": 5},
                 "n_aug": 2, "dihedral": False, "translate": False, "canvas": 6, "max_demos": 3,
                 "test_split": "heldout"},
        "model": {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "expansion": 2, "ffn_multiple": 16,
                  "H_cycles": 2, "L_cycles": 1, "pos_encodings": "learned", "puzzle_emb_len": 2, "halt_max_steps": 2},
        "train": {"steps": 2, "lr": 1e-3, "encoder_lr": 1e-3, "batch_size": 6, "log_every": 1, "warmup_steps": 0},
        "eval": {"every": 0, "train_limit": 2, "ks": [1, 2], "batch_size": 16},
        "watch": {"audit_every": 1}, "tracking": {"tensorboard": False}}


def run_recipe(tmp_path, name, spec):
    from reasonlab.config import load_config
    from reasonlab.methods import trm
    from reasonlab.runs import Run

    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    cfg = load_config(path)
    run = Run(cfg, tmp_path / name, install_signals=False)
    res = trm.main(cfg, run)
    run.finish(results=res)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return run.dir, rows


def with_(spec, **sections):
    out = json.loads(json.dumps(spec))
    for sec, kv in sections.items():
        out[sec].update(kv)
    return out


def test_etrm_smoke_golden_loss_and_encoder_metrics(tmp_path):
    d, rows = run_recipe(tmp_path, "etrm", with_(GRID, model={"conditioning": "encoder", "encoder": {
        "variant": "pair", "hidden_size": 16, "num_heads": 2, "num_layers": 1}}))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses == pytest.approx(GOLDEN_ETRM_LOSSES, abs=1e-4)
    first = rows[0]
    for key in ("encoder/token_std", "encoder/cross_sample_var", "encoder/pairwise_cos", "encoder/output_norm",
                "grad/module/encoder", "grad/module/decoder", "grad/term/lm"):
        assert key in first, key
    assert first["grad/module/encoder"] > 0
    assert first["encoder/output_norm"] == pytest.approx(math.sqrt(32), rel=1e-3)  # norm 1 x the decoder's sqrt(D)
    test = json.loads((d / "evals" / "test_best_step2.json").read_text())
    assert test["split"] == "heldout" and test["split_mode"] == "heldout" and "by_rule" in test
    assert "identity_pass@1" in test["metrics"] and (d / "evals" / "submission_test_best_step2.json").exists()
    ctrl = json.loads((d / "evals" / "test_best_step2+control=shuffled_demos.json").read_text())
    assert ctrl["control"] == "shuffled_demos" and ctrl["base"] == "test_best_step2"
    assert ctrl["n_tasks"] == test["n_tasks"]  # the same tasks, each reading another task's demonstrations


def test_frozen_decoder_is_verified_at_every_checkpoint_and_by_the_cli(tmp_path):
    from conftest import cli
    from reasonlab.runs import compare_frozen

    trm_dir, _ = run_recipe(tmp_path, "trm", GRID)
    spec = with_(GRID, model={"conditioning": "encoder", "init_from": str(trm_dir / "checkpoints" / "best"),
                              "freeze_decoder": True,
                              "encoder": {"hidden_size": 16, "num_heads": 2, "n_tokens": 1, "output_norm": 0}},
                 train={"checkpoint_every": 1, "keep_checkpoints": 5})
    d, rows = run_recipe(tmp_path, "frozen", spec)
    checks = [r for r in rows if "frozen/decoder_matched" in r]
    assert len(checks) >= 3 and all(r["frozen/decoder_matched"] == r["frozen/decoder_total"] > 0 for r in checks)
    a, b = d / "checkpoints" / "step_1", d / "checkpoints" / "step_2"
    matched, total, diffs = compare_frozen(a, b, "decoder")
    assert matched == total > 0 and not diffs
    assert compare_frozen(a, b, "encoder")[2]  # the encoder did train
    p = cli("verify-frozen", str(a), str(b), "--module", "decoder")
    assert p.stdout.strip().splitlines()[0] == f"decoder: {total}/{total} tensors match"
    # a decoder that trains is caught
    d2, _ = run_recipe(tmp_path, "unfrozen", with_(spec, model={"freeze_decoder": False},
                                                   train={"decoder_lr": 1e-3}))
    p = cli("verify-frozen", str(d2 / "checkpoints" / "step_1"), str(d2 / "checkpoints" / "step_2"), "--module",
            "decoder", check=False)
    assert p.returncode == 1 and "differs: decoder." in p.stdout


GOLDEN_ETRM_LOSSES = [2.479675769805908, 2.711721181869507]  # leave-one-out demos


def test_shuffled_demos_control_feeds_every_task_the_next_tasks_demos(tmp_path):
    import dataclasses

    import torch

    from reasonlab.config import load_config
    from reasonlab.methods import trm as recipe
    from reasonlab.models.trm import TRM, TRMConfig

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(with_(GRID, model={"conditioning": "encoder"})))
    cfg = load_config(path)
    _, ds = recipe.build_data(cfg)
    mcfg = dataclasses.replace(cfg.model, vocab_size=ds.vocab_size, seq_len=ds.seq_len, num_puzzle_ids=0)
    model = TRM(TRMConfig(**{f.name: getattr(mcfg, f.name) for f in dataclasses.fields(TRMConfig)}))
    seen: list[torch.Tensor] = []

    def conditioning(data):  # records what the encoder would read; the decoder gets a zero prefix
        seen.append(data["demo_inputs"].clone())
        return torch.zeros(data["demo_inputs"].shape[0], mcfg.puzzle_emb_len, mcfg.hidden_size)

    recipe.evaluate(model, ds, "heldout", cfg, conditioning)
    own = seen[0]  # (Q, K, L): first ACT step of the one eval batch
    seen.clear()
    recipe.evaluate(model, ds, "heldout", cfg, conditioning, shuffle_demos=True)
    shuffled = seen[0]
    tasks = ds.evals["heldout"].task
    order = list(dict.fromkeys(tasks))
    first = {t: tasks.index(t) for t in order}
    assert len(order) > 1
    for q, t in enumerate(tasks):
        donor = order[(order.index(t) + 1) % len(order)]
        assert torch.equal(shuffled[q], own[first[donor]])
        assert not torch.equal(shuffled[q], own[q])  # never its own demonstrations
