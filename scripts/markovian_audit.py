"""One-step gradient audit of a Markovian config: each weighted loss term's gradient norm alone, on a few rollout
batches of the untrained model, under the objective as the recipe computes it now and as it was computed before
(ln pi(CoT | q) as a per-token MEAN, CoT log-probs at T = 1 although the CoTs were sampled at rl.temperature).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/markovian_audit.py configs/markovian/arithmetic-smollm2.yaml --batches 3

The same CoTs (sampled once per batch, at the config's temperature) are scored by every variant, so the rows differ by
the objective only. Prints a markdown table (docs/markovian.md keeps the one it printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reasonlab.config import load_config  # noqa: E402
from reasonlab.methods import markovian as MK  # noqa: E402
from reasonlab.models.lm import load_for_config  # noqa: E402
from reasonlab.rl.audit import audit_terms  # noqa: E402
from reasonlab.rl.policy import group_stats  # noqa: E402
from reasonlab.runs import batch_indices  # noqa: E402
from reasonlab.tasks import get_task  # noqa: E402

VARIANTS = {  # name -> (rl.agg, temperature of the CoT log-probs: None = the sampling temperature)
    "before: per-token mean, log-probs at T=1": ("seq_mean", 1.0),
    "now: sum over the CoT, log-probs at the sampling T": ("seq_sum", None),
}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train = task.examples("train")
    model, tok = load_for_config(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    G = cfg.rl.group_size
    n_q = cfg.train.batch_size // G
    rows = []
    for b in range(args.batches):
        ctx = MK.Ctx(model, tok, task, cfg)
        qs = [train[i] for i in batch_indices(b, n_q, len(train), cfg.seed)]
        model.eval()
        ro = MK.rollout(ctx, b, list(range(n_q)), qs, G)  # sampled at cfg.rl.temperature, once for every variant
        model.train()
        for name, (agg, T) in VARIANTS.items():
            rl = dataclasses.replace(cfg.rl, agg=agg, temperature=T or cfg.rl.temperature)
            vctx = MK.Ctx(model, tok, task, dataclasses.replace(cfg, rl=rl), ref_cache=ctx.ref_cache)
            f = MK.forward_terms(vctx, ro, list(range(len(ro.exs))), actor_grad=True)
            rew = f["R"].detach() - ro.ref_logp
            mean, denom = group_stats(rew, G, min_std=rl.min_std, eps=rl.adv_eps)
            terms, _ = MK.loss_terms(vctx, f, ro.ref_logp, mean, denom, (rew - mean) / denom)
            audit = audit_terms(MK.weighted(vctx, terms), params)
            rows.append({"batch": b, "variant": name, **{k: t.grad_norm for k, t in audit.terms.items()}})
    print("| objective | batch | grad pg | grad actor_reward | grad kl | pg / actor_reward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["pg"] / r["actor_reward"] if r["actor_reward"] else float("nan")
        print(f"| {r['variant']} | {r['batch']} | {r['pg']:.3f} | {r['actor_reward']:.3f} | {r['kl']:.2e} | "
              f"{ratio:.2f} |")
    return rows


if __name__ == "__main__":
    main()
