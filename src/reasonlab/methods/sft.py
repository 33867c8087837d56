"""Supervised fine-tuning on a task's gold answers — the baseline every RL recipe here should beat.

What is implemented (and nothing more):
- Data: any registered task (`data.task`, constructor args in `data.task_args`); prompt = task.prompt(example, style),
  target = " " + gold answer + EOS. Loss = next-token NLL on the target tokens only, averaged per example, then over the
  batch (so the global loss is the mean of equal-sized per-process shards, and 2 processes match 1 exactly).
- Order: a seeded permutation per epoch; the batch for step s is a pure function of (seed, s), so resuming at step s
  reproduces the uninterrupted run bit for bit.
- Evaluation: greedy decoding scored by the task's own scorer (every extractor recorded), accuracy with a Wilson 95% CI.
  Validation before training, every `eval.every` steps and at the end; the `best` checkpoint is chosen on validation;
  test is evaluated once, at the end, on that checkpoint.
- Run-folder contract: metrics, checkpoints (params="trainable": the LoRA adapter when r > 0), resume, --time-limit,
  SIGTERM, --dry-run (tiny stand-in model when the configured one is not available offline).

    reasonlab run configs/sft/arithmetic-smollm2.yaml
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from reasonlab import dist
from reasonlab.config import BaseConfig, EvalConfig, F, TrainConfig
from reasonlab.models.lm import ModelConfig, count_parameters, is_available_offline, load_for_config
from reasonlab.runs import Run, batch_indices


@dataclass
class DataConfig:
    task: str = F("arithmetic", "task name (reasonlab data lists them)")
    task_args: dict = F({}, "constructor arguments of the task, e.g. {n_terms: 3, digits: 2}")
    style: str = F("default", "prompt style: default | cot | markovian")
    chat: bool = F(False, "wrap the prompt in the tokenizer's chat template")
    n_train: int = F(0, "use the first N training examples (0: all)")
    max_len: int = F(256, "truncate prompt+target to this many tokens (from the left)")
    val_split: str = F("validation", "split for periodic evals and checkpoint choice")
    test_split: str = F("test", "split evaluated once at the end on the best-on-validation checkpoint")


@dataclass
class SFTEval(EvalConfig):
    test_limit: int = F(0, "test examples in the final eval (0: all)")
    max_new_tokens: int = F(16, "greedy decoding budget per answer")
    batch_size: int = F(16, "prompts per generation batch")


@dataclass
class SFTTrain(TrainConfig):
    schedule: str = F("constant", "learning-rate schedule after warm-up: constant | cosine")


@dataclass
class Config(BaseConfig):
    method: str = F("sft", "recipe name")
    model: ModelConfig = F(ModelConfig, "policy model")
    data: DataConfig = F(DataConfig, "task and prompt format")
    train: SFTTrain = F(SFTTrain, "optimization")
    eval: SFTEval = F(SFTEval, "evaluation")


# ----------------------------------------------------------------------------------------------------------------------


def render(tok, prompt: str, chat: bool) -> str:
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt


def collate(tok, prompts: list[str], targets: list[str], max_len: int):
    """Right-padded (input_ids, attention_mask, labels) with labels = -100 outside the target. Shapes (B, T)."""
    rows, labels = [], []
    for p, t in zip(prompts, targets):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        t_ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p_ids + t_ids)[-max_len:]
        lab = ([-100] * len(p_ids) + t_ids)[-max_len:]
        rows.append(ids)
        labels.append(lab)
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (T - len(r)) for r in labels])
    return input_ids, attn, lab


def per_example_nll(model, input_ids, attn, labels) -> torch.Tensor:
    """Mean NLL of each example's target tokens. (B,)"""
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
    tgt = labels[:, 1:]  # (B, T-1)
    mask = tgt != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return -(tok_lp * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def greedy_eval(model, tok, task, examples, cfg: Config, tag: str, step: int, run: Run) -> dict:
    """Greedy answers for `examples`, scored by the task; writes evals/<tag>.jsonl/.json; returns the summary."""
    from reasonlab.eval.metrics import accuracy, invalid_rate

    model.eval()
    records = []
    bs = cfg.eval.batch_size
    for i in range(0, len(examples), bs):
        chunk = examples[i:i + bs]
        prompts = [render(tok, task.prompt(e, cfg.data.style), cfg.data.chat) for e in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)  # left-padded
        out = model.generate(**enc, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # (B,) new text only
        for e, p, text in zip(chunk, prompts, texts):
            s = task.score(text, e)
            records.append({"id": e.id, "prompt": p, "output": text, "extracted": s.extracted, "gold": e.gold,
                            "correct": s.correct, "valid": s.valid, "extractor": s.extractor,
                            "extractions": s.extractions, "correct_by": s.correct_by})
    model.train()
    acc = accuracy(r["correct"] for r in records)
    inv = invalid_rate(r["valid"] for r in records)
    summary = {"tag": tag, "step": step, "task": task.name, "task_version": task.version, "n": len(records),
               "metrics": {"acc": acc.to_dict(), "invalid_rate": inv.to_dict()}, "decoding": "greedy",
               "max_new_tokens": cfg.eval.max_new_tokens, "style": cfg.data.style, "chat": cfg.data.chat}
    run.write_eval(tag, records, summary)
    return summary


def main(cfg: Config, run: Run) -> dict:
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    dist.seed_everything(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train = task.examples("train")
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val = task.examples(cfg.data.val_split)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    stand_in = run.dry_run and not is_available_offline(cfg.model.name)
    model, tok = load_for_config(cfg.model, stand_in=stand_in)
    model.train()
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.train.warmup_steps:
            return (step + 1) / cfg.train.warmup_steps
        if cfg.train.schedule == "cosine":
            t = (step - cfg.train.warmup_steps) / max(1, cfg.train.steps - cfg.train.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_dist() else model
    if cfg.train.batch_size % dist.world_size():
        raise ValueError(f"train.batch_size {cfg.train.batch_size} must divide over {dist.world_size()} processes")

    def batch_for(step: int):
        idx = dist.shard(batch_indices(step, cfg.train.batch_size, len(train), cfg.seed))
        exs = [train[i] for i in idx]
        prompts = [render(tok, task.prompt(e, cfg.data.style), cfg.data.chat) for e in exs]
        return collate(tok, prompts, [" " + e.gold for e in exs], cfg.data.max_len)

    dist.print0(f"model {cfg.model.name}{' (tiny stand-in)' if stand_in else ''}: {trainable:,} trainable / "
                f"{total:,} parameters; task {task.name}: {len(train)} train, {len(val)} validation")
    if run.dry_run:
        ids, attn, lab = batch_for(0)
        loss = per_example_nll(model, ids, attn, lab).mean()
        dist.print0(f"dry run: one batch {tuple(ids.shape)} -> loss {loss.item():.4f}; optimizer AdamW over "
                    f"{len(params)} tensors; nothing trained")
        return {"dry_run": True, "trainable_params": trainable, "total_params": total}

    start, best = 0, {"acc": -1.0, "step": -1}
    if run.resume_from is not None:
        state = run.resume_from.restore(modules={"model": model}, optimizer=opt, scheduler=sched)
        start, best = state["step"], state["best"]
        dist.print0(f"resumed from {run.resume_from.path} at step {start}")

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules={"model": model}, optimizer=opt, scheduler=sched,
                            state={"best": best}, name=name)

    def validate(step: int) -> float:
        with run.phase("eval"):
            s = greedy_eval(model, tok, task, val, cfg, f"val_step{step}", step, run) if dist.is_main() else None
        s = dist.gather_object(s)[0]
        m = s["metrics"]["acc"]
        run.log(step, {f"eval/{task.name}/acc": m["value"], f"eval/{task.name}/acc_lo": m["lo"],
                       f"eval/{task.name}/acc_hi": m["hi"], f"eval/{task.name}/n": m["n"],
                       f"eval/{task.name}/invalid_rate": s["metrics"]["invalid_rate"]["value"]})
        dist.print0(f"step {step}: validation acc {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] (n={m['n']})")
        return m["value"]

    n_test = cfg.eval.test_limit or len(task.examples(cfg.data.test_split))
    run.final_eval_scale = 1.0 + n_test / max(1, len(val))  # final = validation + test
    if start == 0 and cfg.eval.every >= 0:
        acc0 = validate(0)
        best = {"acc": acc0, "step": 0}
        save(0, name="best")

    # ---- train ---------------------------------------------------------------------------------------------------
    step = start
    t_last = time.time()
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        ids, attn, lab = batch_for(step)
        loss = per_example_nll(ddp, ids, attn, lab).mean()  # DDP averages the shard means = the global mean
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.train.log_every == 0:
            now = time.time()
            run.log(step, {"train/loss": dist.all_reduce_mean(loss.detach()).item(), "train/grad_norm": gnorm.item(),
                           "train/lr": sched.get_last_lr()[0], "time/step_s": (now - t_last) / cfg.train.log_every})
            t_last = now
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            acc = validate(step)
            if acc > best["acc"]:
                best = {"acc": acc, "step": step}
                save(step, name="best")
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save(step)

    # ---- final: checkpoint, validation, test once on the best-on-validation checkpoint ---------------------------
    save(step)
    if run.stop_reason in ("SIGTERM", "SIGINT"):  # asked to leave: the checkpoint is what matters
        return {"final_step": step, "stopped": run.stop_reason}
    acc = validate(step)
    if acc > best["acc"]:
        best = {"acc": acc, "step": step}
        save(step, name="best")
    best_ck = run.dir / "checkpoints" / "best"
    from reasonlab.runs import open_checkpoint

    if best["step"] != step and dist.is_main():
        open_checkpoint(best_ck).restore(modules={"model": model}, rng=False)
    test = task.examples(cfg.data.test_split)
    test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
    with run.phase("eval"):
        s = greedy_eval(model, tok, task, test, cfg, f"test_best_step{best['step']}", step, run) \
            if dist.is_main() else None
    s = dist.gather_object(s)[0]
    m = s["metrics"]["acc"]
    run.log(step, {f"test/{task.name}/acc": m["value"], f"test/{task.name}/acc_lo": m["lo"],
                   f"test/{task.name}/acc_hi": m["hi"], f"test/{task.name}/n": m["n"]})
    dist.print0(f"test (checkpoint chosen on validation, step {best['step']}): acc {m['value']:.3f} "
                f"[{m['lo']:.3f}, {m['hi']:.3f}] (n={m['n']})")
    return {"final_step": step, "best_step": best["step"], "best_val_acc": best["acc"], "test_acc": m}
