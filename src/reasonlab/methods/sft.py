"""Supervised fine-tuning on a task's gold answers — the baseline every RL recipe here should beat.

What is implemented (and nothing more):
- Data: any registered task (`data.task`, constructor args in `data.task_args`); prompt = task.prompt(example, style),
  target = " " + gold answer + EOS. Loss = next-token NLL on the target tokens only, averaged per example, then over the
  batch (so the global loss is the mean of equal-sized per-process shards, and 2 processes match 1 exactly).
- Order: a seeded permutation per epoch; the batch for step s is a pure function of (seed, s), so resuming at step s
  reproduces the uninterrupted run bit for bit.
- Compute (reasonlab.training): train.device / train.precision, DDP across the processes `accelerate launch` starts
  (each takes an equal shard of every global batch), schedule constant | linear | cosine after warm-up.
- Evaluation: greedy decoding (`eval.backend`: own loop | hf generate | vllm) scored by the task's own scorer (every
  extractor recorded), accuracy with a Wilson 95% CI, the examples split over the processes. Validation before
  training, every `eval.every` steps and at the end; the `best` checkpoint is chosen on validation; test is evaluated
  once, at the end, on that checkpoint.
- Run-folder contract: metrics, checkpoints (params="trainable": the LoRA adapter when r > 0), --time-limit, SIGTERM
  (an evaluation stops at its next generation batch and is redone on resume), --dry-run (tiny stand-in model when the
  configured one is not available offline). Resume is exact: the weights, AdamW, the schedule, the RNG streams and the
  validation choice are checkpointed, and the batch of a step is a function of (seed, step); nothing else carries
  from one step to the next.

    reasonlab run configs/sft/arithmetic-smollm2.yaml
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from reasonlab import training
from reasonlab.config import BaseConfig, EvalConfig, F, TrainConfig
from reasonlab.eval.generate import Backend
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
    backend: Backend = F("auto", "generation backend: auto (vllm on CUDA when installed, else own) | own | hf | vllm")


@dataclass
class Config(BaseConfig):
    method: str = F("sft", "recipe name")
    model: ModelConfig = F(ModelConfig, "policy model")
    data: DataConfig = F(DataConfig, "task and prompt format")
    train: TrainConfig = F(TrainConfig, "optimization and compute")
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
def greedy_eval(sampler, tok, task, examples, cfg: Config, tag: str, step: int, run: Run, compute) -> dict:
    """Greedy answers for `examples` (split over the processes), scored by the task; writes evals/<tag>.jsonl/.json
    (rank 0); returns the summary on every rank."""
    from reasonlab.eval.generate import GenConfig
    from reasonlab.eval.harness import eval_summary, sample_record

    gc = GenConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, progress=False)

    def answer(exs, offset):
        prompts = [render(tok, task.prompt(e, cfg.data.style), cfg.data.chat) for e in exs]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        with compute.autocast():
            out = training.generate_checked(sampler, ids, gc, stop=run.signalled)
        return [sample_record(task, e, g[0], prompt=p) for e, p, g in zip(exs, prompts, out)]

    records = training.sharded(compute, examples, answer)
    summary = eval_summary(records, task, tag=tag, step=step, decoding="greedy", backend=sampler.name,
                           max_new_tokens=cfg.eval.max_new_tokens, style=cfg.data.style, chat=cfg.data.chat)
    run.write_eval(tag, records, summary)
    return summary


def main(cfg: Config, run: Run) -> dict:
    from reasonlab.eval.generate import make_sampler, resolve_backend
    from reasonlab.eval.harness import eval_log
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    compute = training.setup(cfg.train, run)
    backend = resolve_backend(cfg.eval.backend, compute.device)  # a missing vLLM fails here, before any model loads
    training.seed_everything(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train = task.examples("train")
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val = task.examples(cfg.data.val_split)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    test = task.examples(cfg.data.test_split)
    test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
    stand_in = run.dry_run and not is_available_offline(cfg.model.name)
    model, tok = load_for_config(cfg.model, device=compute.device, stand_in=stand_in,
                                 vocab=task.vocabulary() if hasattr(task, "vocabulary") else None)
    model.train()
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = training.lr_schedule(opt, cfg.train)
    ddp, opt = compute.prepare(model, opt)  # `ddp` trains; `model` (the same weights) generates and is saved
    sampler = make_sampler(backend, model, tok, device=compute.device,
                           vllm=training.vllm_settings(cfg.model, cfg.seed))

    def batch_for(step: int):
        idx = compute.shard(batch_indices(step, cfg.train.batch_size, len(train), cfg.seed))
        exs = [train[i] for i in idx]
        prompts = [render(tok, task.prompt(e, cfg.data.style), cfg.data.chat) for e in exs]
        return compute.to(collate(tok, prompts, [" " + e.gold for e in exs], cfg.data.max_len))

    training.print0(f"model {cfg.model.name}{' (tiny stand-in)' if stand_in else ''}: {trainable:,} trainable / "
                    f"{total:,} parameters; task {task.name}: {len(train)} train, {len(val)} validation; generation "
                    f"backend {sampler.name}")
    if run.dry_run:
        ids, attn, lab = batch_for(0)
        with compute.autocast():
            loss = per_example_nll(ddp, ids, attn, lab).mean()
        training.print0(f"dry run: one batch {tuple(ids.shape)} -> loss {loss.item():.4f}; optimizer AdamW over "
                        f"{len(params)} tensors; nothing trained")
        return {"dry_run": True, "trainable_params": trainable, "total_params": total, **compute.describe(),
                "backend": sampler.name}

    start, best, _ = training.resume(run, "accuracy", modules={"model": model}, optimizer=opt, scheduler=sched)

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules={"model": model}, optimizer=opt, scheduler=sched,
                            state={"best": best.state()}, name=name)

    def evaluate(examples, tag: str, step: int, prefix: str) -> dict:
        with run.phase("eval"):
            sampler.sync(model)
            s = greedy_eval(sampler, tok, task, examples, cfg, tag, step, run, compute)
        m = s["metrics"]["accuracy"]
        run.log(step, eval_log(s, f"{prefix}/{task.name}"))
        training.print0(f"step {step}: {tag} accuracy {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] (n={m['n']})")
        return s

    def validate(step: int) -> float:
        return evaluate(val, f"val_step{step}", step, "eval")["metrics"]["accuracy"]["value"]

    def offer(step: int) -> None:
        best.offer(step, validate(step), save)

    run.final_eval_scale = 1.0 + len(test) / max(1, len(val))  # final = validation + test
    if training.evals_pending(run, start):
        training.evals_at(run, start, cfg.train, cfg.eval.every, offer, save)

    # ---- train ---------------------------------------------------------------------------------------------------
    step = start
    t_last = time.time()
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        ids, attn, lab = batch_for(step)
        with compute.autocast():
            loss = per_example_nll(ddp, ids, attn, lab).mean()  # DDP averages the shard means = the global mean
        compute.backward(loss)
        gnorm = compute.clip_grad_norm(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.train.log_every == 0:
            now = time.time()
            run.log(step, {"train/loss": compute.mean(loss.detach()), "train/grad_norm": gnorm,
                           "train/lr": sched.get_last_lr()[0], "time/step_s": (now - t_last) / cfg.train.log_every})
            t_last = now
        training.progress(run, step, cfg.train.steps, {"train/loss": loss.detach()})
        training.evals_at(run, step, cfg.train, cfg.eval.every, offer, save)

    # ---- final: checkpoint, validation, test once on the best-on-validation checkpoint ---------------------------
    def test_once(best_step: int) -> dict:
        return evaluate(test, f"test_best_step{best_step}", step, "test")["metrics"]["accuracy"]

    m = training.final_eval(run, step, best, modules={"model": model}, validate=validate, save=save, test=test_once,
                            on_restore=lambda: sampler.sync(model))
    if m is None:  # asked to leave: the checkpoint is what matters
        return {"final_step": step, "stopped": run.stop_reason}
    return {"final_step": step, "best_step": best.step, "best_val_accuracy": best.value, "test_accuracy": m,
            "ranks": compute.gather(compute.rank)}
