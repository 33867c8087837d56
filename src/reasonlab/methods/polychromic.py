"""Polychromic set-level RL: reward SETS of samples for being correct and diverse, with a gradient that exists.

Paper: Hamid et al., "Polychromic Objectives for Reinforcement Learning", arXiv 2509.25424 (set objective
f(Y) = mean reward(Y) x diversity(Y); Poly-PPO's subset estimator). What is implemented (and nothing more):

- Rollouts: each step takes `train.batch_size` prompts (a seeded permutation, a pure function of (seed, step)) and
  samples `rollout.n` = N completions per prompt from the current policy (`rollout.backend`: the own decode loop with
  the prompt prefilled once per group | hf | vllm with the policy's weights handed over after every update),
  temperature `rollout.temperature`, cut at `rollout.stop`; each prompt's samples and subsets are seeded by (seed,
  step, its place in the global batch), so they do not depend on how prompts are spread over processes. Reward per
  completion = the task's own scorer (1.0 if correct else 0.0) or a user function `reward.fn: module:function`,
  f(completions, examples) -> list[float|None] (None counts as 0.0 and is logged as rollout/reward_none_frac).
- Set-level advantage per completion (reasonlab.rl.setlevel), per prompt: diversity d = fraction of distinct answers
  (each extracted answer first put in the task's canonical form, `Task.canonical_answer`: countdown's "9+3" and "3+9"
  are one answer) | Distinct-n of the texts | MiniLM semantic distance; set score f = mean(r) x d ("product") or
  mean(r) + w x d ("sum"), or `set.objective: poly_epo` (Poly-EPO as publicly restated: the product over answer
  classes, 0 for a set of one class, with normalize none: its marginal set advantage); estimator "subset" (M random size-n subsets of the N samples, all of them when M = 0 or M >= C(N, n);
  baseline = mean subset score; A_i = mean of (f - baseline) over the subsets containing i) or "loo"
  (A_i = f(Y) - f(Y without y_i)); then standardized within the prompt (`set.normalize: std`) or kept raw.
- Loss, all on the sampled completion tokens, on-policy (one gradient step per rollout, so the PPO ratio is 1 and the
  clipped objective equals REINFORCE; there is no PPO epoch loop):
      pg_set    = pg_loss(logp, A_set)     the set-level, diversity-bearing term
      pg_reward = pg_loss(logp, A_reward)  with A_reward = group-standardized reward (GRPO, mean/std detached)
      kl        = k3 on the sampled tokens, pi_ref = the same model with the LoRA adapter disabled (an estimate of
                  KL(pi || pi_ref) whose gradient as a loss is that of KL(pi_ref || pi))
  with logp the sampled tokens' log-probs under softmax(logits / rollout.temperature), the policy that sampled them.
  `set.mode`: polychromic = set.weight x pg_set + kl (the paper's objective: the set term alone); grpo =
  reward_weight x pg_reward + kl (the standard group-baseline run: its twin differs in this one knob and spends
  identical compute on sampling; the set statistics are computed and logged in every mode); polychromic_plus_grpo =
  both policy-gradient terms (what the first measured "polychromic" arm trained: in the regime where groups hold 0-1
  correct samples and all-distinct answers every subset scores diversity 1 and the set advantage is GRPO's up to a
  scale, so that arm was GRPO at twice the step).
- Gradient audit (reasonlab.rl.audit) every `watch.audit_every` steps: grad/term/pg_reward, grad/term/pg_set,
  grad/term/kl, each term's gradient norm alone. The seed-002 bug (diversity as a Python float: zero gradient) shows up
  there as grad/term/pg_set == 0, and the watcher raises `zero_grad_term`. A rollout in which every group's rewards
  tie has all advantages exactly 0 (no policy-gradient signal; rollout/frac_zero_std says so), so a due audit waits
  for the next rollout with a non-zero advantage instead of reporting that trivial zero as a dead term.
- Start: the configured model, or `model.init_from` (another run's best checkpoint, e.g. a GRPO phase to branch both
  arms from, or the SFT'd scratch model of the subset-sum testbed).
- Evaluation: `eval.samples` samples per prompt at `eval.temperature`; pass@1, unbiased pass@k, distinct-correct@k and
  (for a task that enumerates its solutions) coverage@k, Distinct-1/2, Self-BLEU
  (nltk semantics), unique-answer ratio, optional MiniLM semantic diversity, each with n and a 95% CI (eval.harness).
  Validation before training, every `eval.every` steps and at the end; the `best` checkpoint is chosen on validation by
  `eval.select_on`; test is evaluated once, at the end, on that checkpoint.
- Compute (reasonlab.training): train.device / train.precision; under `accelerate launch` each process takes an equal
  shard of the step's prompts and DDP averages the gradients (train.agg seq_mean / seq_sum: the update equals the
  one-process update; token_mean weighs each process's tokens alone); rollout statistics are computed over the whole
  global batch; evaluation is split over the processes.
- Run-folder contract: metrics, events (watcher), checkpoints (the LoRA adapter), --time-limit, SIGTERM (an
  evaluation stops at its next generation batch, redone on resume), --dry-run, report.md (written by `reasonlab run`
  at the end). Resume is exact: the adapter, AdamW, the schedule, the RNG streams, the validation choice, the
  watcher's windows and a gradient audit still waiting for a rollout with a non-zero advantage are checkpointed;
  prompts, samples and subsets of a step are functions of (seed, step, slot).

    reasonlab run configs/polychromic/countdown-smollm2.yaml
    reasonlab run configs/polychromic/countdown-smollm2.yaml set.mode=grpo     # the twin
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from reasonlab import training
from reasonlab.config import BaseConfig, ConfigError, EvalConfig, F, TrainConfig
from reasonlab.watch import WatchConfig, Watcher, group_reward_stats, record_train_ids, rollout_stats
from reasonlab.eval.generate import Backend
from reasonlab.eval.packed import packed
from reasonlab.models.lm import ModelConfig, count_parameters, is_available_offline, load_for_config, reference
from reasonlab.rl import setlevel as S
from reasonlab.rl.audit import audit_terms
from reasonlab.rl.policy import (entropy_from_logits, group_standardize, kl_k3, masked_mean, pg_loss,
                                 shared_prompt_logprobs)
from reasonlab.runs import Run, batch_indices


@dataclass
class DataConfig:
    task: str = F("countdown", "task name (reasonlab data lists them); its scorer gives rewards and answers")
    task_args: dict = F({}, "constructor arguments of the task, e.g. {n_numbers: 3, max_number: 10, fewshot: 2}")
    style: str = F("default", "prompt style: default | cot | markovian")
    chat: bool = F(False, "wrap the prompt in the tokenizer's chat template")
    n_train: int = F(0, "use the first N training examples (0: all)")
    val_split: str = F("validation", "split for periodic evals and checkpoint choice")
    test_split: str = F("test", "split evaluated once at the end on the best-on-validation checkpoint")


@dataclass
class RolloutConfig:
    n: int = F(8, "N: completions sampled per prompt (the set the advantages are computed over)")
    temperature: float = F(1.0, "sampling temperature of the rollouts")
    top_p: float = F(1.0, "nucleus sampling mass of the rollouts")
    max_new_tokens: int = F(24, "generation budget per completion")
    stop: list[str] = F(["\n"], "stop strings: a completion ends before the first one (also used by evals)")
    backend: Backend = F("auto", "who samples (rollouts and evals): auto (vllm on CUDA when installed, else own) | "
                         "own | hf | vllm")

    def __post_init__(self):
        if self.n < 2:
            raise ValueError("rollout.n must be >= 2: a set of one sample has no diversity and no group baseline")
        if self.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0: greedy rollouts are N copies of one completion")


@dataclass
class RewardConfig:
    fn: str = F("task", "'task' (the task scorer: 1 correct, 0 otherwise) or 'module:function' with "
                        "f(completions, examples) -> list[float | None]")


@dataclass
class SetConfig:
    objective: Literal["polychromic", "poly_epo"] = F(
        "polychromic", "the set score f: polychromic (f from diversity and combine) | poly_epo (Poly-EPO as restated "
        "publicly: mean reward x distinct answers / n, and 0 for a set of one answer class; use with estimator "
        "subset, n_subsets 0, normalize none: the marginal set advantage)")
    mode: Literal["polychromic", "grpo", "polychromic_plus_grpo"] = F(
        "polychromic", "polychromic: the set-level term alone (the paper) | grpo: the group-baseline reward term alone "
        "(the twin; same sampling and logging) | polychromic_plus_grpo: both terms")
    weight: float = F(1.0, "lambda: weight of the set-level term pg_set (modes polychromic, polychromic_plus_grpo)")
    reward_weight: float = F(1.0, "weight of the group-baseline reward term pg_reward (modes grpo, "
                                  "polychromic_plus_grpo)")
    diversity: Literal["answers", "distinct", "semantic"] = F("answers", "d(Y): fraction of distinct extracted "
                                                              "answers | Distinct-n of the texts | MiniLM distance")
    ngram: int = F(2, "n of Distinct-n when diversity is 'distinct'")
    combine: Literal["product", "sum"] = F("product", "f(Y) = mean reward x d (paper) | mean reward + "
                                                      "combine_weight x d")
    combine_weight: float = F(1.0, "w in f = mean reward + w x d (combine: sum)")
    estimator: Literal["subset", "loo"] = F("subset", "subset: Poly-PPO subsets of size subset_size; loo: "
                                                      "f(Y) - f(Y without y_i)")
    subset_size: int = F(4, "n: size of the scored subsets (subset estimator)")
    n_subsets: int = F(0, "M: random subsets per prompt; 0 or >= C(N, n) uses all of them (exact)")
    normalize: Literal["std", "none"] = F("std", "standardize the set advantages within each prompt (std) or "
                                                 "use them raw (none)")

    def __post_init__(self):
        if self.subset_size < 1:
            raise ValueError("set.subset_size must be >= 1")
        if self.ngram < 1:
            raise ValueError("set.ngram must be >= 1")
        if self.objective == "poly_epo" and (self.diversity != "answers" or self.combine != "product" or
                                             self.estimator != "subset" or self.normalize != "none"):
            raise ValueError("set.objective=poly_epo is Poly-EPO's marginal set advantage over answer classes: it "
                             "needs set.diversity=answers, set.combine=product, set.estimator=subset and "
                             "set.normalize=none")


@dataclass
class PolyTrain(TrainConfig):
    kl_coef: float = F(0.0, "beta: weight of the k3 KL(pi || pi_ref) term; pi_ref = the adapter-disabled model")
    agg: Literal["seq_mean", "token_mean", "seq_sum"] = F("seq_mean", "how token losses reduce (rl.policy)")


@dataclass
class PolyEval(EvalConfig):
    samples: int = F(8, "samples per prompt in every eval (pass@k for k <= samples, diversity)")
    temperature: float = F(1.0, "eval sampling temperature")
    top_p: float = F(1.0, "eval nucleus sampling mass")
    max_new_tokens: int = F(24, "eval generation budget per sample")
    batch_size: int = F(32, "rows decoded together in evals")
    test_limit: int = F(0, "test examples in the final eval (0: all)")
    seed: int = F(1234, "sampling seed of every eval (the same at each step, so curves differ by the model only)")
    select_on: str = F("pass@8", "validation metric that picks the best checkpoint ('accuracy' = pass@1, "
                                 "'pass@k', 'distinct_2' ...) or 'last'")
    semantic: bool = F(False, "also compute MiniLM semantic diversity in the final test eval")

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError("eval.samples must be >= 1")


@dataclass
class Config(BaseConfig):
    method: str = F("polychromic", "recipe name")
    model: ModelConfig = F(ModelConfig, "policy model (LoRA r > 0 needed when train.kl_coef > 0)")
    data: DataConfig = F(DataConfig, "task and prompt format")
    rollout: RolloutConfig = F(RolloutConfig, "sampling during training")
    reward: RewardConfig = F(RewardConfig, "reward of one completion")
    set: SetConfig = F(SetConfig, "set score, diversity and advantage estimator")
    train: PolyTrain = F(PolyTrain, "optimization; train.batch_size = prompts per step")
    eval: PolyEval = F(PolyEval, "evaluation")
    watch: WatchConfig = F(WatchConfig, "online alerts, auto-stop and the gradient-audit schedule")

    def __post_init__(self):
        if self.set.estimator == "subset" and self.set.subset_size >= self.rollout.n:
            raise ValueError(f"set.subset_size {self.set.subset_size} >= rollout.n {self.rollout.n}: the only subset "
                             "is the whole set, so every set advantage is exactly 0; use a subset_size below rollout.n "
                             "or set.estimator=loo")
        if self.set.estimator == "loo" and self.set.n_subsets:
            raise ValueError(f"set.n_subsets={self.set.n_subsets} with set.estimator=loo: leave-one-out uses no random "
                             "subsets; drop set.n_subsets or use set.estimator=subset")
        if self.train.kl_coef > 0 and self.model.lora.r <= 0:
            raise ValueError("train.kl_coef > 0 needs model.lora.r > 0 (the reference is the adapter-disabled model)")


# ----------------------------------------------------------------------------------------------------------------------
# helpers (pure or nearly; copied rather than shared between recipes)


def load_reward_fn(spec: str):
    """'module:function' (or 'path/to/file.py:function') -> the callable; every mistake is one ConfigError line."""
    if spec.count(":") < 1 or spec.endswith(":") or spec.startswith(":"):
        raise ConfigError(f"reward.fn '{spec}' must be 'task' or 'module:function' (e.g. mypkg.rewards:score)")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser()
            if not path.exists():
                raise ConfigError(f"reward.fn: file {path} does not exist")
            sp = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"reward.fn: cannot import module '{mod_name}' ({e}); put it on PYTHONPATH or give a "
                          f"file path, e.g. rewards.py:{fn_name}") from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"reward.fn: importing '{mod_name}' raised {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ConfigError(f"reward.fn: module '{mod_name}' has no attribute '{fn_name}'")
    if not callable(fn):
        raise ConfigError(f"reward.fn: '{spec}' is not callable")
    return fn


def call_reward_fn(fn, spec: str, completions: list[str], examples: list) -> tuple[list[float], int]:
    """Rewards from a user function; (rewards with None -> 0.0, how many were None). Bad output is one line."""
    out = fn(completions, examples)
    try:
        out = list(out)
    except TypeError:
        raise ConfigError(f"reward.fn '{spec}' returned {type(out).__name__}; it must return a list of floats "
                          f"(or None) with one entry per completion") from None
    if len(out) != len(completions):
        raise ConfigError(f"reward.fn '{spec}' returned {len(out)} rewards for {len(completions)} completions")
    rewards, n_none = [], 0
    for v in out:
        if v is None:
            n_none += 1
            rewards.append(0.0)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"reward.fn '{spec}' returned {v!r}; rewards must be numbers or None") from None
        if not math.isfinite(x):
            raise ConfigError(f"reward.fn '{spec}' returned a non-finite reward {x}")
        rewards.append(x)
    return rewards, n_none


def rollout_logprobs(model, prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int,
                     return_logits: bool = False, temperature: float = 1.0):
    """log pi of P prompts x N completions at the sampling `temperature`, each prompt run once and shared across its N
    completions (rl.policy.shared_prompt_logprobs), stacked: lp (P*N, K), mask (P*N, K) [, float logits (P*N, K, V)],
    K = the longest completion; columns past a completion's end are masked."""
    K = max(1, max(len(c) for g in completions for c in g))
    lps, masks, logits = [], [], []
    for prompt, group in zip(prompts, completions):
        out = shared_prompt_logprobs(model, prompt, group, pad_id=pad_id, return_logits=return_logits,
                                     temperature=temperature)
        lps.append(torch.nn.functional.pad(out[0], (0, K - out[0].shape[1])))  # (N, K)
        masks.append(torch.nn.functional.pad(out[1], (0, K - out[1].shape[1])))
        if return_logits:
            logits.append(torch.nn.functional.pad(out[2], (0, 0, 0, K - out[2].shape[1])))  # (N, K, V)
    lp, mask = torch.cat(lps), torch.cat(masks)  # (P*N, K) x2
    return (lp, mask, torch.cat(logits)) if return_logits else (lp, mask)


def set_level(rewards: list[list[float]], answers: list[list[str | None]], texts: list[list[str]], sc: SetConfig,
              gens: list[torch.Generator] | torch.Generator, encoder=None) -> dict:
    """Set advantages and statistics for P prompts x N samples (`gens`: one subset generator per prompt, or one shared
    by all). Returns tensors (P, N) and per-prompt stats."""
    adv, base, full, div_full, ans_div = [], [], [], [], []
    for p, (r, a, t) in enumerate(zip(rewards, answers, texts)):
        gen = gens[p] if isinstance(gens, (list, tuple)) else gens
        distance = None
        if sc.diversity == "semantic":
            emb = torch.as_tensor(encoder.encode(list(t), convert_to_numpy=True, show_progress_bar=False))  # (N, D)
            distance = S.pairwise_cosine_distance(emb)  # (N, N)
        score, div = S.make_set_scorer(r, diversity=sc.diversity, answers=a, texts=t, distance=distance,
                                       ngram=sc.ngram, how=sc.combine, weight=sc.combine_weight,
                                       objective=sc.objective)
        out = S.set_advantages(r, score, n=sc.subset_size, M=sc.n_subsets, estimator=sc.estimator, generator=gen)
        adv.append(out["adv"])
        base.append(out["baseline"])
        full.append(out["full"])
        div_full.append(div(tuple(range(len(r)))))
        ans_div.append(S.answer_diversity(a))
    raw = torch.stack(adv)  # (P, N)
    return {"raw": raw, "adv": S.standardize(raw) if sc.normalize == "std" else raw, "baseline": base, "full": full,
            "diversity": div_full, "answer_diversity": ans_div}


def evaluate_split(model, tok, task, examples, split: str, cfg: Config, tag: str, step: int, run: Run,
                   semantic: bool = False, compute=None, sampler=None):
    """eval.samples samples per prompt (split over the processes), scored by the task; writes evals/<tag>.jsonl/.json
    (rank 0); returns the summary on every rank."""
    from reasonlab.eval.harness import EvalSettings, evaluate

    e = cfg.eval
    s = EvalSettings(style=cfg.data.style, chat=cfg.data.chat, samples=e.samples, temperature=e.temperature,
                     top_p=e.top_p, max_new_tokens=e.max_new_tokens, stop=tuple(cfg.rollout.stop),
                     batch_size=e.batch_size, seed=e.seed, mode="generate", semantic=semantic, progress=False)
    with training.autocast_of(compute):
        records, summary = evaluate(model, tok, task, split=split, examples=examples, settings=s,
                                    model_id=cfg.model.name, compute=compute, sampler=sampler,
                                    stop=getattr(run, "signalled", None))
    summary.update({"tag": tag, "step": step, "method": "polychromic", "set_mode": cfg.set.mode, "seed": cfg.seed})
    run.write_eval(tag, records, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config, run: Run) -> dict:
    from reasonlab.eval.generate import GenConfig, encode, format_prompt, make_sampler, prompt_seeds, resolve_backend
    from reasonlab.eval.harness import flat_metrics
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    compute = training.setup(cfg.train, run)
    backend = resolve_backend(cfg.rollout.backend, compute.device)  # a missing vLLM fails here, before any model loads
    training.seed_everything(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train = task.examples("train")
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val = task.examples(cfg.data.val_split)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    test = task.examples(cfg.data.test_split)
    test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
    reward_fn = None if cfg.reward.fn == "task" else load_reward_fn(cfg.reward.fn)
    with_set = cfg.set.mode in ("polychromic", "polychromic_plus_grpo")  # which policy-gradient terms the loss has
    with_reward = cfg.set.mode in ("grpo", "polychromic_plus_grpo")
    N, P = cfg.rollout.n, cfg.train.batch_size
    if P % compute.world_size:
        raise ConfigError(f"train.batch_size {P} prompts per step must divide over {compute.world_size} processes")
    encoder = None
    if cfg.set.diversity == "semantic":
        from reasonlab.eval.diversity import load_encoder

        encoder = load_encoder(device=str(compute.device))
    stand_in = run.dry_run and not is_available_offline(cfg.model.name)
    model, tok = load_for_config(cfg.model, device=compute.device, stand_in=stand_in,
                                 vocab=task.vocabulary() if hasattr(task, "vocabulary") else None)
    model.train()
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = training.lr_schedule(opt, cfg.train)
    policy, opt = compute.prepare(model, opt)  # `policy` takes the gradient forwards (DDP); `model` is the same weights
    sampler = make_sampler(backend, model, tok, device=compute.device,
                           vllm=training.vllm_settings(cfg.model, cfg.seed))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_text = [format_prompt(tok, task.prompt(e, cfg.data.style), cfg.data.chat) for e in train]
    watcher = Watcher(run, cfg.watch)
    record_train_ids(run, [e.id for e in train])
    training.print0(f"model {cfg.model.name}{' (tiny stand-in)' if stand_in else ''}: {trainable:,} trainable / "
                    f"{total:,} parameters; task {task.name}: {len(train)} train, {len(val)} validation, {len(test)} "
                    f"test; mode {cfg.set.mode}; {P} prompts x {N} samples per step; generation backend {sampler.name}")

    def rollout(step: int):
        """Sample N completions for each of this process's prompts of the step and score them."""
        slots = compute.shard(list(range(P)))  # this process's places in the global batch
        idx = [batch_indices(step, P, len(train), cfg.seed)[k] for k in slots]
        exs = [train[i] for i in idx]
        p_ids = encode(tok, [prompt_text[i] for i in idx], cfg.data.chat)
        gc = GenConfig(n=N, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                       max_new_tokens=cfg.rollout.max_new_tokens, stop=tuple(cfg.rollout.stop), batch_size=P * N,
                       progress=False)
        seeds = prompt_seeds(cfg.seed * 1_000_003 + step, P)  # per global slot: the same samples in any sharding
        with compute.autocast():
            samples = sampler.generate(p_ids, gc, seeds=[seeds[k] for k in slots])  # samples[p][j]
        texts = [[s.text for s in g] for g in samples]  # (P_local, N)
        scores = [[task.score(t, e) for t in g] for g, e in zip(texts, exs)]
        canon = getattr(task, "canonical_answer", None)  # "9+3" == "3+9" for countdown
        answers = [[canon(s.extracted) if canon else s.extracted for s in g] for g in scores]  # (P_local, N)
        correct = [[float(s.correct) for s in g] for g in scores]
        n_none = 0
        if reward_fn is None:
            rewards = correct
        else:
            flat, n_none = call_reward_fn(reward_fn, cfg.reward.fn, [t for g in texts for t in g],
                                          [e for e in exs for _ in range(N)])
            rewards = [flat[p * N:(p + 1) * N] for p in range(len(exs))]
        eos = tok.eos_token_id
        comp = [[s.token_ids + ([eos] if s.finish == "eos" else []) for s in g] for g in samples]  # (P_local, N) lists
        return slots, exs, samples, texts, answers, correct, rewards, n_none, p_ids, comp

    def loss_terms(step: int, ro) -> tuple[dict, dict]:
        """Weighted loss terms {name: (weight, loss)} of this process's prompts, and detached statistics of the whole
        global rollout (gathered from every process)."""
        slots, exs, samples, texts, answers, correct, rewards, n_none, p_ids, comp = ro
        Pl = len(exs)
        r = torch.tensor(rewards, dtype=torch.float32, device=compute.device)  # (P_local, N)
        a_reward = group_standardize(r.view(-1), group_size=N).view(Pl, N)  # (P_local, N), mean/std detached
        gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + k) for k in slots]
        sl = set_level(rewards, answers, texts, cfg.set, gens, encoder)  # set statistics in both modes
        a_set = sl["adv"].to(compute.device)  # (P_local, N)
        with compute.autocast():
            T = cfg.rollout.temperature
            lp, mask, logits = rollout_logprobs(policy, p_ids, comp, pad_id, return_logits=True,
                                                temperature=T)  # (B, K) x2, (B, K, V)
            terms = {}
            if with_set:
                terms["pg_set"] = (cfg.set.weight, pg_loss(lp, a_set.view(-1), mask, cfg.train.agg))
            if with_reward:
                terms["pg_reward"] = (cfg.set.reward_weight, pg_loss(lp, a_reward.view(-1), mask, cfg.train.agg))
            kl_tok = None
            if cfg.train.kl_coef > 0:
                with torch.no_grad(), reference(model):
                    ref_lp, _ = rollout_logprobs(model, p_ids, comp, pad_id, temperature=T)  # (B, K)
                kl_tok = kl_k3(lp, ref_lp)  # (B, K)
                terms["kl"] = (cfg.train.kl_coef, masked_mean(kl_tok, mask, cfg.train.agg))
        with torch.no_grad():
            ent_sum = float((entropy_from_logits(logits.detach()) * mask).sum())  # chunked, no (n_tokens, V) copies
            n_tok = compute.sum(mask.sum())
            # the whole global rollout, as one process would see it
            g = lambda x: sum(compute.gather(x), [])  # noqa: E731
            all_rewards, all_correct, all_answers, all_texts = g(rewards), g(correct), g(answers), g(texts)
            raw, adv = torch.cat(compute.gather(sl["raw"])), torch.cat(compute.gather(sl["adv"]))  # (P, N)
            c = torch.tensor(all_correct)  # (P, N)
            rg = torch.tensor(all_rewards, dtype=torch.float32)  # (P, N)
            a_reward_all = group_standardize(rg.view(-1), group_size=N).view(-1, N)
            wrong = c.view(-1) == 0
            flat_texts = [t for gr in all_texts for t in gr]
            Pg = len(all_texts)
            stats = {
                **rollout_stats(flat_texts, [x for gr in all_answers for x in gr]),
                **group_reward_stats(rg),
                "rollout/correct": float(c.mean()),
                "rollout/pass_at_n": float((c.max(dim=1).values > 0).float().mean()),
                # groups with <= 1 correct sample: there (with all-distinct answers) the set advantage is GRPO's
                "rollout/frac_le1_correct": float((c.sum(dim=1) <= 1).float().mean()),
                "rollout/distinct_correct": sum(len({a for a, ok in zip(ans, cor) if ok})
                                                for ans, cor in zip(all_answers, all_correct)) / Pg,
                "rollout/entropy": compute.sum(ent_sum) / max(n_tok, 1.0),
                "rollout/len_tokens": n_tok / (Pg * N),
                "rollout/truncation_rate": compute.sum(sum(s.truncated for gr in samples for s in gr)) / (Pg * N),
                "rollout/reward_none_frac": compute.sum(n_none) / (Pg * N),
                "set/score": sum(g(sl["baseline"])) / Pg,
                "set/score_full": sum(g(sl["full"])) / Pg,
                "set/diversity": sum(g(sl["diversity"])) / Pg,
                "set/answer_diversity": sum(g(sl["answer_diversity"])) / Pg,
                "adv/reward_mean": float(a_reward_all.mean()),
                "adv/reward_std": float(a_reward_all.std(unbiased=False)),
                "adv/set_raw_mean": float(raw.mean()), "adv/set_raw_std": float(raw.std(unbiased=False)),
                "adv/set_mean": float(adv.mean()), "adv/set_std": float(adv.std(unbiased=False)),
                "adv/set_min": float(adv.min()), "adv/set_max": float(adv.max()),
                "adv/reward_abs_max": float(a_reward_all.abs().max()), "adv/set_abs_max": float(adv.abs().max()),
                # wrong samples the set term pushes UP (novel answers in an otherwise repetitive set)
                "adv/set_wrong_positive_frac": float((raw.view(-1)[wrong] > 1e-9).float().mean()) if wrong.any()
                else 0.0,
                "adv/frac_zero_set": float((raw.abs().amax(dim=1) <= 1e-9).float().mean()),
            }
            if kl_tok is not None:
                stats["train/kl_token_mean"] = compute.sum((kl_tok * mask).sum()) / max(n_tok, 1.0)
        return terms, stats

    if run.dry_run:
        ro = rollout(0)
        terms, stats = loss_terms(0, ro)
        audit = audit_terms(terms, params)
        training.print0(f"dry run: one rollout of {P} x {N} samples; loss terms:\n{audit.table()}\nnothing trained")
        return {"dry_run": True, "trainable_params": trainable, "total_params": total,
                "grad_terms": {k: t.grad_norm for k, t in audit.terms.items()}, **compute.describe(),
                "backend": sampler.name}

    start, best, state = training.resume(run, cfg.eval.select_on, modules={"model": model}, optimizer=opt,
                                         scheduler=sched, watcher=watcher)
    if run.resume_from is not None:
        sampler.sync(model)  # a vLLM engine samples the resumed weights
    audit_due = bool(state.get("audit_due", False))  # an audit waiting for a rollout with a non-zero advantage

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules={"model": model}, optimizer=opt, scheduler=sched, name=name,
                            state={"best": best.state(), "watcher": training.watcher_state(watcher),
                                   "audit_due": audit_due})

    def validate(step: int) -> float:
        with run.phase("eval"):
            s = evaluate_split(model, tok, task, val, cfg.data.val_split, cfg, f"val_step{step}", step, run,
                               compute=compute, sampler=sampler)
        run.log(step, flat_metrics(s, f"eval/{task.name}"))
        m = s["metrics"]
        k = cfg.eval.samples
        line = f"step {step}: validation pass@1 {m['accuracy']['value']:.3f}"
        if f"pass@{k}" in m:
            line += (f", pass@{k} {m[f'pass@{k}']['value']:.3f}, distinct-2 {m['distinct_2']['value']:.3f}, "
                     f"self-BLEU {m['self_bleu']['value']:.3f}")
        training.print0(f"{line} (n={m['accuracy']['n']})")
        if cfg.eval.select_on == "last":
            return float(step)
        if cfg.eval.select_on not in m:
            raise ConfigError(f"eval.select_on '{cfg.eval.select_on}' is not a validation metric; choose 'last' or "
                              f"one of {', '.join(sorted(m))}")
        return float(m[cfg.eval.select_on]["value"])

    def offer(step: int) -> None:
        best.offer(step, validate(step), save)

    run.final_eval_scale = 1.0 + len(test) / max(1, len(val))
    if training.evals_pending(run, start):
        training.evals_at(run, start, cfg.train, cfg.eval.every, offer, save)

    # ---- train ---------------------------------------------------------------------------------------------------
    step = start
    cpu_total = 0.0
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        t0, c0 = time.perf_counter(), time.process_time()
        # frozen base linears on packed weights in the forwards and the backward (reasonlab.eval.packed)
        with packed(model):
            ro = rollout(step)
            t_gen = time.perf_counter() - t0
            terms, stats = loss_terms(step, ro)
            metrics = dict(stats)
            if cfg.watch.audit_every and step % cfg.watch.audit_every == 0:
                audit_due = True
            # (a decision every process takes alike: the stats are global)
            if audit_due and ((with_reward and stats["adv/reward_abs_max"] > 0) or
                              (with_set and stats["adv/set_abs_max"] > 0)):
                metrics.update({k: compute.mean(v) for k, v in audit_terms(terms, params).metrics().items()})
                audit_due = False
            loss = sum(w * l for w, l in terms.values() if w != 0)
            compute.backward(loss)
        gnorm = compute.clip_grad_norm(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sampler.sync(model)  # a vLLM engine samples the next rollout from the updated policy
        step += 1
        cpu = time.process_time() - c0
        cpu_total += cpu
        metrics.update({"train/loss": compute.mean(loss.detach()), "train/grad_norm": gnorm,
                        "train/lr": sched.get_last_lr()[0], "time/step_s": time.perf_counter() - t0,
                        "time/gen_s": t_gen, "time/step_cpu_s": cpu,
                        **{f"train/{k}": compute.mean(l.detach()) if torch.is_tensor(l) else float(l)
                           for k, (w, l) in terms.items()}})
        if step % cfg.train.log_every == 0 or "grad/total_norm_audit" in metrics:
            run.log(step, metrics)
        training.progress(run, step, cfg.train.steps, metrics)
        if watcher.step(step, metrics):
            break
        training.evals_at(run, step, cfg.train, cfg.eval.every, offer, save)

    # ---- final: checkpoint, validation, test once on the best-on-validation checkpoint ---------------------------
    def test_once(best_step: int) -> dict:
        with run.phase("eval"):
            s = evaluate_split(model, tok, task, test, cfg.data.test_split, cfg, f"test_best_step{best_step}", step,
                               run, semantic=cfg.eval.semantic, compute=compute, sampler=sampler)
        run.log(step, flat_metrics(s, f"test/{task.name}"))
        return s

    s = training.final_eval(run, step, best, modules={"model": model}, validate=validate, save=save, test=test_once,
                            on_restore=lambda: sampler.sync(model))
    if s is None:  # asked to leave: the checkpoint is what matters
        return {"final_step": step, "stopped": run.stop_reason}
    m = s["metrics"]
    k = cfg.eval.samples
    keys = ["accuracy", f"pass@{k}", f"distinct_correct@{k}", f"coverage@{k}", "distinct_2", "self_bleu",
            "semantic_diversity", "unique_answer_ratio"]
    result = {key: m[key] for key in keys if key in m}
    training.print0(f"test (checkpoint chosen on validation {cfg.eval.select_on}, step {best.step}): " +
                    ", ".join(f"{key} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})"
                              for key, v in result.items() if v.get("lo") is not None))
    # `reasonlab run` writes report.md once the run folder says how the run ended
    return {"final_step": step, "best_step": best.step, "best_val": best.value, "select_on": cfg.eval.select_on,
            "test": result, "train_cpu_s": round(cpu_total, 1), "ranks": compute.gather(compute.rank)}
