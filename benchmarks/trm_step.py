"""Our TRM (reasonlab.models.trm) vs the OFFICIAL model code (SamsungSAILMontreal/TinyRecursiveModels,
models/recursive_reasoning/trm.py + models/losses.py ACTLossHead), one training step each as both codes train:
one ACT supervision step forward + loss + backward + optimizer step (AdamW on the dense weights, sign-SGD on the
puzzle-id rows), in one process, alternating repeats, at two configs:

  sudoku  the sudoku-sized attention net: hidden 128, 2 heads, 2 layers, T=3 x n=6 cycles, 9x9 = 81 tokens (vocab 11),
          16-token puzzle prefix, batch 64
  arc     the ARC paper net (configs/trm/arc1-paper.yaml; official config/arch/trm.yaml with the README's ARC-AGI-1
          overrides L_layers=2 H_cycles=3 L_cycles=4): hidden 512, 8 heads, 30x30 = 900 tokens (vocab 12), batch 8

Before timing, the same weights are loaded into both (official state-dict names mapped to ours) and the two codes must
give the same logits, Q-halt logits and loss on the same batch and carry over two ACT steps (float32, --tol).

The official checkout is passed by path and never copied in (get it with
`git --git-dir=<fetched bare repo> archive HEAD | tar -x -C /tmp/trm_official`). Import-time shims, inside this
process only: `flash_attn` / `flash_attn_interface` stubs over torch's scaled_dot_product_attention, and an `einops`
stub (`rearrange` for pure axis permutations, all the model uses) when einops is not installed. Both sides run eager
fp32 on the CPU (the official forward_dtype is set to float32; its pretrain.py would torch.compile on CUDA and use
AdamATan2 — here both use torch AdamW, so the comparison is the model code).

    .venv/bin/python benchmarks/trm_step.py --official /tmp/trm_official [--configs sudoku,arc] [--repeats 3]
        [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("reasonlab") is None:  # not installed: this checkout's src/ (PYTHONPATH still wins)
    sys.path.insert(0, str(ROOT / "src"))

from reasonlab.models.trm import TRM, SignSGD, TRMConfig, act_loss  # noqa: E402

DEFAULT_OFFICIAL = os.environ.get("REASONLAB_TRM_OFFICIAL", "/tmp/trm_official")

CONFIGS = {
    "sudoku": dict(vocab_size=11, seq_len=81, hidden_size=128, num_heads=2, num_layers=2, H_cycles=3, L_cycles=6,
                   puzzle_emb_len=16, num_puzzle_ids=1, halt_max_steps=16, batch=64),
    "arc": dict(vocab_size=12, seq_len=900, hidden_size=512, num_heads=8, num_layers=2, H_cycles=3, L_cycles=4,
                puzzle_emb_len=16, num_puzzle_ids=1000, halt_max_steps=16, batch=8),
    "small": dict(vocab_size=10, seq_len=24, hidden_size=64, num_heads=4, num_layers=2, H_cycles=2, L_cycles=3,
                  puzzle_emb_len=4, num_puzzle_ids=7, halt_max_steps=4, batch=6),  # the parity test's
}


# ------------------------------------------------------------------------------------------------- official import

def _rearrange(t: torch.Tensor, pattern: str) -> torch.Tensor:
    """einops.rearrange for a pure permutation of named axes ('B S H D -> B H S D'), the only use in the model."""
    left, right = (side.split() for side in pattern.split("->"))
    if sorted(left) != sorted(right) or len(left) != t.ndim:
        raise NotImplementedError(f"einops stub: only axis permutations, got {pattern!r}")
    return t.permute(*(left.index(a) for a in right))


def _install_shims() -> list[str]:
    """Stub modules for what the official code imports and this machine lacks; returns the names added (removed
    again once the official modules are imported, so nothing else in the process sees a stub)."""
    added = []
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = types.SimpleNamespace(rearrange=_rearrange, __name__="einops")
        added.append("einops")

    def flash_attn_func(q, k, v, causal=False, **_):  # (B, S, H, D) in and out, as flash-attn
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    for name in ("flash_attn", "flash_attn_interface"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(flash_attn_func=flash_attn_func, __name__=name)
            added.append(name)
    return added


def load_official(path: str | os.PathLike):
    """(TinyRecursiveReasoningModel_ACTV1, ACTLossHead, CastedSparseEmbeddingSignSGD_Distributed) from a checkout."""
    path = Path(path)
    if not (path / "models" / "recursive_reasoning" / "trm.py").exists():
        raise FileNotFoundError(f"no official TinyRecursiveModels checkout at {path} "
                                "(models/recursive_reasoning/trm.py missing)")
    added = _install_shims()
    sys.path.insert(0, str(path))
    try:
        trm = importlib.import_module("models.recursive_reasoning.trm")
        losses = importlib.import_module("models.losses")
        sparse = importlib.import_module("models.sparse_embedding")
    finally:
        sys.path.remove(str(path))
        for name in added:  # the official modules hold their own reference
            sys.modules.pop(name, None)
    return trm.TinyRecursiveReasoningModel_ACTV1, losses.ACTLossHead, sparse.CastedSparseEmbeddingSignSGD_Distributed


# ------------------------------------------------------------------------------------------- the same net, twice

def build_pair(official_path, name_or_cfg, seed: int = 0, exploration: float = 0.1, randomize: bool = True):
    """(ours TRM, official ACT model, official loss head, config dict) with the official's weights copied into ours.
    randomize: the zero-initialised puzzle table and Q head get random values first, so they are compared too."""
    OfficialTRM, ACTLossHead, _ = load_official(official_path)
    c = dict(CONFIGS[name_or_cfg]) if isinstance(name_or_cfg, str) else dict(name_or_cfg)
    torch.manual_seed(seed)
    off = OfficialTRM(dict(batch_size=c["batch"], seq_len=c["seq_len"], puzzle_emb_ndim=c["hidden_size"],
                           num_puzzle_identifiers=c["num_puzzle_ids"], vocab_size=c["vocab_size"],
                           H_cycles=c["H_cycles"], L_cycles=c["L_cycles"], H_layers=0, L_layers=c["num_layers"],
                           hidden_size=c["hidden_size"], expansion=4, num_heads=c["num_heads"],
                           pos_encodings="rope", halt_max_steps=c["halt_max_steps"],
                           halt_exploration_prob=exploration, forward_dtype="float32", mlp_t=False,
                           puzzle_emb_len=c["puzzle_emb_len"], no_ACT_continue=True))
    inner = off.inner
    if randomize:
        with torch.no_grad():
            inner.puzzle_emb.weights.normal_(0, 1.0 / c["hidden_size"] ** 0.5)
            inner.q_head.weight.normal_(0, 1.0 / c["hidden_size"] ** 0.5)
    ours = TRM(TRMConfig(vocab_size=c["vocab_size"], seq_len=c["seq_len"], hidden_size=c["hidden_size"],
                         num_heads=c["num_heads"], expansion=4, ffn_multiple=256, num_layers=c["num_layers"],
                         H_cycles=c["H_cycles"], L_cycles=c["L_cycles"], mixer="attention", pos_encodings="rope",
                         num_puzzle_ids=c["num_puzzle_ids"], puzzle_emb_len=c["puzzle_emb_len"],
                         halt_max_steps=c["halt_max_steps"], halt_exploration_prob=exploration,
                         loss_type="stablemax", q_loss_weight=0.5))
    copy_official_into_ours(off, ours)
    return ours, off, ACTLossHead(off, "stablemax_cross_entropy"), c


def official_to_ours_names(n_layers: int) -> dict[str, str]:
    m = {"inner.embed_tokens.embedding_weight": "embed_tokens.weight", "inner.lm_head.weight": "lm_head.weight",
         "inner.q_head.weight": "q_head.weight", "inner.q_head.bias": "q_head.bias",
         "inner.puzzle_emb.weights": "puzzle_emb.weight", "inner.H_init": "y_init", "inner.L_init": "z_init"}
    for i in range(n_layers):
        o, u = f"inner.L_level.layers.{i}.", f"net.layers.{i}."
        m |= {o + "self_attn.qkv_proj.weight": u + "attn.qkv.weight",
              o + "self_attn.o_proj.weight": u + "attn.o.weight",
              o + "mlp.gate_up_proj.weight": u + "mlp.gate_up.weight",
              o + "mlp.down_proj.weight": u + "mlp.down.weight"}
    return m


def copy_official_into_ours(off, ours) -> None:
    names = official_to_ours_names(len(off.inner.L_level.layers))
    src = off.state_dict()
    dst = ours.state_dict()
    missing = set(src) - set(names)
    if missing:
        raise KeyError(f"official tensors without a mapping: {sorted(missing)}")
    if set(dst) - set(names.values()):
        raise KeyError(f"our tensors nobody fills: {sorted(set(dst) - set(names.values()))}")
    with torch.no_grad():
        for o, u in names.items():
            if dst[u].shape != src[o].shape:
                raise ValueError(f"{o} {tuple(src[o].shape)} -> {u} {tuple(dst[u].shape)}")
            dst[u].copy_(src[o])


def make_batch(c: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, L, V = c["batch"], c["seq_len"], c["vocab_size"]
    labels = torch.randint(1, V, (B, L), generator=g)
    labels[:, -3:] = -100  # some ignored positions
    return {"inputs": torch.randint(0, V, (B, L), generator=g), "labels": labels,
            "puzzle_ids": torch.randint(0, c["num_puzzle_ids"], (B,), generator=g)}


def to_official(b: dict) -> dict:
    return {"inputs": b["inputs"].to(torch.int32), "labels": b["labels"].to(torch.int32),
            "puzzle_identifiers": b["puzzle_ids"].to(torch.int32)}


# ------------------------------------------------------------------------------------------------------- parity

def parity(official_path, name_or_cfg="small", seed: int = 0, act_steps: int = 2,
           batch: int | None = None) -> dict[str, float]:
    """Max abs differences (relative to the max abs value, for logits) between the two codes over `act_steps` ACT
    steps from the initial (all-halted) carry, in training mode without halting exploration (so halting is
    deterministic); plus the loss and the gradient of every dense weight on the last step. batch: fewer rows than
    the config's (the ARC config's full batch takes minutes on a CPU)."""
    c = dict(CONFIGS[name_or_cfg]) if isinstance(name_or_cfg, str) else dict(name_or_cfg)
    if batch:
        c["batch"] = min(batch, c["batch"])
    ours, off, head, c = build_pair(official_path, c, seed, exploration=0.0)
    ours.train(), head.train()
    names = official_to_ours_names(c["num_layers"])
    b = make_batch(c, seed)
    ob = to_official(b)
    carry, ocarry = ours.initial_carry(b), head.initial_carry(ob)
    worst = {"logits": 0.0, "q_halt": 0.0, "loss": 0.0, "grad": 0.0}
    for step in range(act_steps):
        ours.zero_grad(set_to_none=True), off.zero_grad(set_to_none=True)
        carry, out = ours(carry, b)
        loss, _ = act_loss(out, carry, ours.cfg)
        ocarry, oloss, _, oout, _ = head(carry=ocarry, batch=ob, return_keys=["logits", "q_halt_logits"])
        oloss = oloss / c["batch"]  # pretrain.py: (1 / global_batch_size) * loss
        loss.backward(), oloss.backward()
        scale = oout["logits"].abs().max().item()
        worst["logits"] = max(worst["logits"], (out["logits"] - oout["logits"]).abs().max().item() / scale)
        worst["q_halt"] = max(worst["q_halt"], (out["q_halt_logits"] - oout["q_halt_logits"]).abs().max().item())
        worst["loss"] = max(worst["loss"], abs(loss.item() - oloss.item()) / abs(oloss.item()))
        assert torch.equal(carry.halted, ocarry.halted) and torch.equal(carry.steps, ocarry.steps.long())
    ours_p = dict(ours.named_parameters())
    for o, p in off.named_parameters():
        g, og = ours_p[names[o]].grad, p.grad
        if og is None:
            continue
        g = g.to_dense() if g.is_sparse else g
        worst["grad"] = max(worst["grad"], ((g - og).abs().max() / og.abs().max().clamp_min(1e-12)).item())
    return worst


# ------------------------------------------------------------------------------------------------------- timing

def trainers(ours, off, head, c: dict, lr: float = 1e-4):
    """Two closures, one training step each, each as its code trains (our recipe's loop; official pretrain.py)."""
    OfficialSignSGD = sys.modules["models.sparse_embedding"].CastedSparseEmbeddingSignSGD_Distributed
    b = make_batch(c, 1)
    ob = to_official(b)
    dense = [p for n, p in ours.named_parameters() if not n.startswith("puzzle_emb")]
    opt = torch.optim.AdamW(dense, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sign = SignSGD([ours.puzzle_emb.weight], lr=1e-2, weight_decay=0.1)
    oopt = torch.optim.AdamW(off.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    osign = OfficialSignSGD(off.inner.puzzle_emb.buffers(), world_size=1, lr=1e-2, weight_decay=0.1)
    state = {"carry": None, "ocarry": None}

    def ours_step():
        if state["carry"] is None:
            state["carry"] = ours.initial_carry(b)
        state["carry"], out = ours(state["carry"], b)
        loss, _ = act_loss(out, state["carry"], ours.cfg)
        opt.zero_grad(set_to_none=True), sign.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sign.step()

    def official_step():
        if state["ocarry"] is None:
            state["ocarry"] = head.initial_carry(ob)
        state["ocarry"], loss, _, _, _ = head(carry=state["ocarry"], batch=ob, return_keys=[])
        ((1 / c["batch"]) * loss).backward()
        for o in (oopt, osign):
            o.step()
            o.zero_grad()

    return ours_step, official_step


def bench(official_path, name: str, repeats: int, steps: int) -> dict:
    ours, off, head, c = build_pair(official_path, name, seed=0)
    ours.train(), head.train()
    fns = dict(zip(("ours", "official"), trainers(ours, off, head, c)))
    for fn in fns.values():  # warm-up (allocator, first-step carry)
        fn()
    times = {k: [] for k in fns}
    for r in range(repeats):  # alternate, and swap who goes first, so machine noise hits both
        order = ("ours", "official") if r % 2 == 0 else ("official", "ours")
        for k in order:
            t = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            times[k].append((time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    eps = {k: c["batch"] / med[k] for k in med}
    return {"config": name, "batch": c["batch"], "step_s": med, "best_step_s": best, "all_step_s": times,
            "examples_per_s": eps, "ratio": eps["ours"] / eps["official"],
            "ratio_best": best["official"] / best["ours"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", default=DEFAULT_OFFICIAL, help="path of the official TinyRecursiveModels checkout")
    ap.add_argument("--configs", default="sudoku,arc", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed repeats per side (median reported)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed repeat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative logit / abs q-halt difference allowed")
    ap.add_argument("--no-parity", action="store_true", help="skip the parity check at each config")
    ap.add_argument("--parity-batch", type=int, default=4, help="rows of the parity batch (the config's widths)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), official checkout {args.official}")
    for name in args.configs.split(","):
        c = CONFIGS[name]
        print(f"\n[{name}] hidden {c['hidden_size']}, {c['num_heads']} heads, {c['num_layers']} layers, "
              f"T={c['H_cycles']} x n={c['L_cycles']}, seq {c['seq_len']}+{c['puzzle_emb_len']}, batch {c['batch']}")
        if not args.no_parity:
            t = time.perf_counter()
            d = parity(args.official, name, batch=args.parity_batch)
            ok = d["logits"] <= args.tol and d["q_halt"] <= args.tol and d["loss"] <= args.tol
            print(f"  parity (same weights, batch of {min(args.parity_batch, c['batch'])}, carry; 2 ACT steps, "
                  f"fp32): max rel logits {d['logits']:.2e}, "
                  f"max abs q_halt {d['q_halt']:.2e}, rel loss {d['loss']:.2e}, max rel grad {d['grad']:.2e} "
                  f"-> {'OK' if ok else 'FAIL'} (tol {args.tol:g}; {time.perf_counter() - t:.0f}s)")
            if not ok:
                raise SystemExit(f"parity failed at {name}: {d}")
        r = bench(args.official, name, args.repeats, args.steps)
        fmt = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v) + "]"  # noqa: E731
        print(f"  step (fwd ACT step + loss + backward + optimizer), median of {args.repeats} x {args.steps}: "
              f"ours {r['step_s']['ours']:.3f}s, official {r['step_s']['official']:.3f}s "
              f"(all: ours {fmt(r['all_step_s']['ours'])}, official {fmt(r['all_step_s']['official'])})")
        print(f"  examples/s: ours {r['examples_per_s']['ours']:.2f}, official {r['examples_per_s']['official']:.2f} "
              f"-> ours/official {r['ratio']:.3f}x (best-of: {r['ratio_best']:.3f}x)")


if __name__ == "__main__":
    main()
