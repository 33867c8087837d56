"""Polychromic set-level RL: reward SETS of samples for being correct and diverse, with a gradient that exists.

Paper: Hamid et al., "Polychromic Objectives for Reinforcement Learning", arXiv 2509.25424 (set objective
f(Y) = mean reward(Y) x diversity(Y); Poly-PPO's subset estimator). What is implemented (and nothing more):

- Rollouts: each step takes `train.batch_size` prompts (a seeded permutation, a pure function of (seed, step)) and
  samples `rollout.n` = N completions per prompt from the current policy (own decode loop, prompt prefilled once per
  group), temperature `rollout.temperature`, cut at `rollout.stop`. Reward per completion = the task's own scorer
  (1.0 if correct else 0.0) or a user function `reward.fn: module:function`, f(completions, examples) -> list[float|None]
  (None counts as 0.0 and is logged as rollout/reward_none_frac).
- Set-level advantage per completion (reasonlab.rl.setlevel), per prompt: diversity d = fraction of distinct extracted
  answers | Distinct-n of the texts | MiniLM semantic distance; set score f = mean(r) x d ("product") or mean(r) + w x d
  ("sum"); estimator "subset" (M random size-n subsets of the N samples, all of them when M = 0 or M >= C(N, n);
  baseline = mean subset score; A_i = mean of (f - baseline) over the subsets containing i) or "loo"
  (A_i = f(Y) - f(Y without y_i)); then standardized within the prompt (`set.normalize: std`) or kept raw.
- Loss, all on the sampled completion tokens, on-policy (one gradient step per rollout, so the PPO ratio is 1 and the
  clipped objective equals REINFORCE; there is no PPO epoch loop):
      pg_reward = pg_loss(logp, A_reward)  with A_reward = group-standardized reward (GRPO, mean/std detached)
      pg_set    = pg_loss(logp, A_set)     the set-level, diversity-bearing term
      kl        = k3 estimate of KL(pi || pi_ref), pi_ref = the same model with the LoRA adapter disabled
      loss = reward_weight x pg_reward + set.weight x pg_set + train.kl_coef x kl
  `set.mode: grpo` drops pg_set (the standard group-baseline run), so a polychromic run and its grpo twin differ in one
  knob and spend identical compute on sampling (the set statistics are computed and logged in both modes).
  `reward_weight: 0` gives the paper's pure set objective.
- Gradient audit (reasonlab.rl.audit) every `watch.audit_every` steps: grad/term/pg_reward, grad/term/pg_set,
  grad/term/kl, each term's gradient norm alone. The seed-002 bug (diversity as a Python float: zero gradient) shows up
  there as grad/term/pg_set == 0, and the watcher raises `zero_grad_term`. A rollout in which every group's rewards
  tie has all advantages exactly 0 (no policy-gradient signal; rollout/frac_zero_std says so), so a due audit waits
  for the next rollout with a non-zero advantage instead of reporting that trivial zero as a dead term.
- Evaluation: `eval.samples` samples per prompt at `eval.temperature`; pass@1, unbiased pass@k, Distinct-1/2, Self-BLEU
  (nltk semantics), unique-answer ratio, optional MiniLM semantic diversity, each with n and a 95% CI (eval.harness).
  Validation before training, every `eval.every` steps and at the end; the `best` checkpoint is chosen on validation by
  `eval.select_on`; test is evaluated once, at the end, on that checkpoint.
- Run-folder contract: metrics, events (watcher), checkpoints (the LoRA adapter), resume, --time-limit, SIGTERM,
  --dry-run, report.md (written by `reasonlab run` at the end). One process (no multi-process support yet).

    reasonlab run configs/polychromic/countdown-smollm2.yaml
    reasonlab run configs/polychromic/countdown-smollm2.yaml set.mode=grpo     # the twin
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from reasonlab import dist
from reasonlab.config import BaseConfig, ConfigError, EvalConfig, F, TrainConfig
from reasonlab.diagnostics.watch import WatchConfig, Watcher, group_reward_stats, record_train_ids, rollout_stats
from reasonlab.models.lm import ModelConfig, count_parameters, is_available_offline, load_for_config, reference
from reasonlab.rl import setlevel as S
from reasonlab.rl.audit import audit_terms
from reasonlab.rl.policy import group_standardize, kl_k3, masked_mean, pg_loss
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
    mode: Literal["polychromic", "grpo"] = F("polychromic", "polychromic: add the set-level term; grpo: the "
                                             "standard group-baseline run (no set term; same sampling and logging)")
    weight: float = F(1.0, "lambda: weight of the set-level policy-gradient term pg_set (ignored in grpo mode)")
    reward_weight: float = F(1.0, "weight of the group-baseline reward term pg_reward (0: the paper's pure set "
                                  "objective)")
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
        if self.set.estimator == "subset" and self.set.subset_size > self.rollout.n:
            raise ValueError(f"set.subset_size {self.set.subset_size} > rollout.n {self.rollout.n}: a subset cannot "
                             f"be larger than the set")
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


def group_logprobs(model, prompt: list[int], completions: list[list[int]], pad_id: int,
                   return_logits: bool = False):
    """log pi of each of N completions of ONE prompt, running the prompt once and sharing its keys/values.

    Returns lp (N, K) [and float32 logits (N, K, V)], K = the longest completion; column j scores completion token j;
    columns past a completion's end hold the pad token's log-prob (mask them: `completion_mask`). Exact: the prompt's
    keys/values are repeated across the group with a differentiable repeat_interleave, so gradients reach the prompt
    activations from all N completions, as in a padded batch of N full rows (tested against rl.policy.token_logprobs),
    for (Tp + N*K) token positions instead of N*(Tp + K): on CPU with a 3-shot prompt that is ~4x less work.
    """
    from transformers import DynamicCache

    N, K, Tp = len(completions), max(1, max(len(c) for c in completions)), len(prompt)
    if Tp < 1:
        raise ValueError("the prompt needs at least one token")
    p = torch.tensor([prompt], dtype=torch.long)  # (1, Tp)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=p, attention_mask=torch.ones_like(p), position_ids=torch.arange(Tp)[None],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1:].float().expand(N, 1, -1)  # (N, 1, V): predicts completion token 0
    targets = torch.full((N, K), pad_id, dtype=torch.long)  # (N, K) right-padded completions
    for i, c in enumerate(completions):
        targets[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    if K > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(N)  # (1, H, Tp, d) -> (N, H, Tp, d), differentiable
        x = targets[:, :-1]  # (N, K-1): token j predicts token j+1; padding sits after every real token (causal)
        out2 = model(input_ids=x, attention_mask=torch.ones(N, Tp + K - 1, dtype=torch.long),
                     position_ids=(Tp + torch.arange(K - 1))[None].expand(N, -1), past_key_values=cache,
                     use_cache=True)
        logits = torch.cat([logits, out2.logits.float()], dim=1)  # (N, K, V)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, K)
    return (lp, logits) if return_logits else lp


def completion_mask(completions: list[list[int]], K: int) -> torch.Tensor:
    """(N, K) float: 1 on the tokens of each right-padded completion."""
    m = torch.zeros(len(completions), K)
    for i, c in enumerate(completions):
        m[i, :len(c)] = 1.0
    return m


def rollout_logprobs(model, prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int,
                     return_logits: bool = False):
    """group_logprobs for P prompts x N completions, stacked: lp (P*N, K), mask (P*N, K) [, logits (P*N, K, V)]."""
    K = max(1, max(len(c) for g in completions for c in g))
    lps, logits = [], []
    for prompt, group in zip(prompts, completions):
        out = group_logprobs(model, prompt, group, pad_id, return_logits)
        lp, lg = out if return_logits else (out, None)
        lps.append(torch.nn.functional.pad(lp, (0, K - lp.shape[1])))  # (N, K)
        if return_logits:
            logits.append(torch.nn.functional.pad(lg, (0, 0, 0, K - lg.shape[1])))  # (N, K, V)
    mask = torch.cat([completion_mask(g, K) for g in completions])  # (P*N, K)
    lp = torch.cat(lps)  # (P*N, K)
    return (lp, mask, torch.cat(logits)) if return_logits else (lp, mask)


def set_level(rewards: list[list[float]], answers: list[list[str | None]], texts: list[list[str]], sc: SetConfig,
              gen: torch.Generator, encoder=None) -> dict:
    """Set advantages and statistics for P prompts x N samples. Returns tensors (P, N) and per-prompt stats."""
    adv, base, full, div_full, ans_div = [], [], [], [], []
    for p, (r, a, t) in enumerate(zip(rewards, answers, texts)):
        distance = None
        if sc.diversity == "semantic":
            emb = torch.as_tensor(encoder.encode(list(t), convert_to_numpy=True, show_progress_bar=False))  # (N, D)
            distance = S.pairwise_cosine_distance(emb)  # (N, N)
        score, div = S.make_set_scorer(r, diversity=sc.diversity, answers=a, texts=t, distance=distance,
                                       ngram=sc.ngram, how=sc.combine, weight=sc.combine_weight)
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
                   semantic: bool = False):
    """eval.samples samples per prompt, scored by the task; writes evals/<tag>.jsonl/.json; returns the summary."""
    from reasonlab.eval.harness import EvalSettings, evaluate

    e = cfg.eval
    s = EvalSettings(style=cfg.data.style, chat=cfg.data.chat, samples=e.samples, temperature=e.temperature,
                     top_p=e.top_p, max_new_tokens=e.max_new_tokens, stop=tuple(cfg.rollout.stop),
                     batch_size=e.batch_size, seed=e.seed, mode="generate", semantic=semantic, progress=False)
    records, summary = evaluate(model, tok, task, split=split, examples=examples, settings=s,
                                model_id=cfg.model.name)
    summary.update({"tag": tag, "step": step, "method": "polychromic", "set_mode": cfg.set.mode, "seed": cfg.seed})
    run.write_eval(tag, records, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config, run: Run) -> dict:
    from reasonlab.eval.generate import GenConfig, encode, format_prompt, generate
    from reasonlab.eval.harness import flat_metrics
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    if dist.world_size() > 1:
        raise ConfigError("the polychromic recipe runs in one process; launch it without accelerate/torchrun")
    dist.seed_everything(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train = task.examples("train")
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val = task.examples(cfg.data.val_split)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    test = task.examples(cfg.data.test_split)
    test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
    reward_fn = None if cfg.reward.fn == "task" else load_reward_fn(cfg.reward.fn)
    encoder = None
    if cfg.set.diversity == "semantic":
        from reasonlab.eval.diversity import load_encoder

        encoder = load_encoder()
    stand_in = run.dry_run and not is_available_offline(cfg.model.name)
    model, tok = load_for_config(cfg.model, stand_in=stand_in)
    model.train()
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / cfg.train.warmup_steps if s < cfg.train.warmup_steps else 1.0)
    polychromic = cfg.set.mode == "polychromic"
    N, P = cfg.rollout.n, cfg.train.batch_size
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_text = [format_prompt(tok, task.prompt(e, cfg.data.style), cfg.data.chat) for e in train]
    watcher = Watcher(run, cfg.watch)
    record_train_ids(run, [e.id for e in train])
    dist.print0(f"model {cfg.model.name}{' (tiny stand-in)' if stand_in else ''}: {trainable:,} trainable / "
                f"{total:,} parameters; task {task.name}: {len(train)} train, {len(val)} validation, {len(test)} test; "
                f"mode {cfg.set.mode}; {P} prompts x {N} samples per step")

    def rollout(step: int):
        """Sample N completions for each of this step's P prompts and score them."""
        idx = batch_indices(step, P, len(train), cfg.seed)
        exs = [train[i] for i in idx]
        p_ids = encode(tok, [prompt_text[i] for i in idx], cfg.data.chat)
        gc = GenConfig(n=N, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                       max_new_tokens=cfg.rollout.max_new_tokens, stop=tuple(cfg.rollout.stop), batch_size=P * N,
                       seed=cfg.seed * 1_000_003 + step, progress=False)
        samples = generate(model, tok, p_ids, gc)  # samples[p][j]
        texts = [[s.text for s in g] for g in samples]  # (P, N)
        scores = [[task.score(t, e) for t in g] for g, e in zip(texts, exs)]
        answers = [[s.extracted for s in g] for g in scores]  # (P, N)
        correct = [[float(s.correct) for s in g] for g in scores]
        n_none = 0
        if reward_fn is None:
            rewards = correct
        else:
            flat, n_none = call_reward_fn(reward_fn, cfg.reward.fn, [t for g in texts for t in g],
                                          [e for e in exs for _ in range(N)])
            rewards = [flat[p * N:(p + 1) * N] for p in range(P)]
        eos = tok.eos_token_id
        comp = [[s.token_ids + ([eos] if s.finish == "eos" else []) for s in g] for g in samples]  # (P, N) lists
        return exs, samples, texts, answers, correct, rewards, n_none, p_ids, comp

    def loss_terms(step: int, ro) -> tuple[dict, dict]:
        """Weighted loss terms {name: (weight, loss)} and detached statistics for one rollout."""
        exs, samples, texts, answers, correct, rewards, n_none, p_ids, comp = ro
        r = torch.tensor(rewards, dtype=torch.float32)  # (P, N)
        a_reward = group_standardize(r.view(-1), group_size=N).view(P, N)  # (P, N), mean/std detached
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        sl = set_level(rewards, answers, texts, cfg.set, gen, encoder)  # set statistics in both modes
        lp, mask, logits = rollout_logprobs(model, p_ids, comp, pad_id, return_logits=True)  # (B, K) x2, (B, K, V)
        terms = {"pg_reward": (cfg.set.reward_weight, pg_loss(lp, a_reward.view(-1), mask, cfg.train.agg))}
        if polychromic:
            terms["pg_set"] = (cfg.set.weight, pg_loss(lp, sl["adv"].view(-1), mask, cfg.train.agg))
        kl_tok = None
        if cfg.train.kl_coef > 0:
            with torch.no_grad(), reference(model):
                ref_lp, _ = rollout_logprobs(model, p_ids, comp, pad_id)  # (B, K)
            kl_tok = kl_k3(lp, ref_lp)  # (B, K)
            terms["kl"] = (cfg.train.kl_coef, masked_mean(kl_tok, mask, cfg.train.agg))
        with torch.no_grad():
            m = mask.bool()
            logp_all = torch.log_softmax(logits[m], dim=-1)  # (n_tokens, V)
            entropy = float(-(logp_all.exp() * logp_all).sum(-1).mean()) if m.any() else 0.0
            del logp_all
            c = torch.tensor(correct)  # (P, N)
            raw, adv = sl["raw"], sl["adv"]
            wrong = c.view(-1) == 0
            flat_texts = [t for g in texts for t in g]
            stats = {
                **rollout_stats(flat_texts, [x for g in answers for x in g]),
                **group_reward_stats(r),
                "rollout/correct": float(c.mean()),
                "rollout/pass_at_n": float((c.max(dim=1).values > 0).float().mean()),
                "rollout/entropy": entropy,
                "rollout/len_tokens": float(mask.sum(1).mean()),
                "rollout/truncation_rate": sum(s.truncated for g in samples for s in g) / (P * N),
                "rollout/reward_none_frac": n_none / (P * N),
                "set/score": sum(sl["baseline"]) / P,
                "set/score_full": sum(sl["full"]) / P,
                "set/diversity": sum(sl["diversity"]) / P,
                "set/answer_diversity": sum(sl["answer_diversity"]) / P,
                "adv/reward_mean": float(a_reward.mean()), "adv/reward_std": float(a_reward.std(unbiased=False)),
                "adv/set_raw_mean": float(raw.mean()), "adv/set_raw_std": float(raw.std(unbiased=False)),
                "adv/set_mean": float(adv.mean()), "adv/set_std": float(adv.std(unbiased=False)),
                "adv/set_min": float(adv.min()), "adv/set_max": float(adv.max()),
                "adv/reward_abs_max": float(a_reward.abs().max()), "adv/set_abs_max": float(adv.abs().max()),
                # wrong samples the set term pushes UP (novel answers in an otherwise repetitive set)
                "adv/set_wrong_positive_frac": float((raw.view(-1)[wrong] > 1e-9).float().mean()) if wrong.any()
                else 0.0,
                "adv/frac_zero_set": float((raw.abs().amax(dim=1) <= 1e-9).float().mean()),
            }
            if kl_tok is not None:
                stats["train/kl_token_mean"] = float((kl_tok * mask).sum() / mask.sum().clamp(min=1))
        return terms, stats

    if run.dry_run:
        ro = rollout(0)
        terms, stats = loss_terms(0, ro)
        audit = audit_terms(terms, params)
        dist.print0(f"dry run: one rollout of {P} x {N} samples; loss terms:\n{audit.table()}\nnothing trained")
        return {"dry_run": True, "trainable_params": trainable, "total_params": total,
                "grad_terms": {k: t.grad_norm for k, t in audit.terms.items()}}

    start, best = 0, {"value": -math.inf, "step": -1}
    if run.resume_from is not None:
        state = run.resume_from.restore(modules={"model": model}, optimizer=opt, scheduler=sched)
        start, best = state["step"], state["best"]
        dist.print0(f"resumed from {run.resume_from.path} at step {start}")

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules={"model": model}, optimizer=opt, scheduler=sched,
                            state={"best": best}, name=name)

    def validate(step: int) -> float:
        with run.phase("eval"):
            s = evaluate_split(model, tok, task, val, cfg.data.val_split, cfg, f"val_step{step}", step, run)
        run.log(step, flat_metrics(s, f"eval/{task.name}"))
        m = s["metrics"]
        k = cfg.eval.samples
        line = f"step {step}: validation pass@1 {m['accuracy']['value']:.3f}"
        if f"pass@{k}" in m:
            line += (f", pass@{k} {m[f'pass@{k}']['value']:.3f}, distinct-2 {m['distinct_2']['value']:.3f}, "
                     f"self-BLEU {m['self_bleu']['value']:.3f}")
        dist.print0(f"{line} (n={m['accuracy']['n']})")
        if cfg.eval.select_on == "last":
            return float(step)
        if cfg.eval.select_on not in m:
            raise ConfigError(f"eval.select_on '{cfg.eval.select_on}' is not a validation metric; choose 'last' or "
                              f"one of {', '.join(sorted(m))}")
        return float(m[cfg.eval.select_on]["value"])

    def consider(step: int, value: float):
        nonlocal best
        if value > best["value"]:
            best = {"value": value, "step": step}
            save(step, name="best")

    run.final_eval_scale = 1.0 + len(test) / max(1, len(val))
    if start == 0 and cfg.eval.every >= 0:
        consider(0, validate(0))

    # ---- train ---------------------------------------------------------------------------------------------------
    step = start
    cpu_total, audit_due = 0.0, False
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        t0, c0 = time.perf_counter(), time.process_time()
        ro = rollout(step)
        t_gen = time.perf_counter() - t0
        terms, stats = loss_terms(step, ro)
        metrics = dict(stats)
        if cfg.watch.audit_every and step % cfg.watch.audit_every == 0:
            audit_due = True
        if audit_due and (stats["adv/reward_abs_max"] > 0 or (polychromic and stats["adv/set_abs_max"] > 0)):
            metrics.update(audit_terms(terms, params).metrics())
            audit_due = False
        loss = sum(w * l for w, l in terms.values() if w != 0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        cpu = time.process_time() - c0
        cpu_total += cpu
        metrics.update({"train/loss": float(loss.detach()), "train/grad_norm": float(gnorm),
                        "train/lr": sched.get_last_lr()[0], "time/step_s": time.perf_counter() - t0,
                        "time/gen_s": t_gen, "time/step_cpu_s": cpu,
                        **{f"train/{k}": float(l.detach()) if torch.is_tensor(l) else float(l)
                           for k, (w, l) in terms.items()}})
        if step % cfg.train.log_every == 0 or "grad/total_norm_audit" in metrics:
            run.log(step, metrics)
        if watcher.step(step, metrics):
            break
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            consider(step, validate(step))
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save(step)

    # ---- final: checkpoint, validation, test once on the best-on-validation checkpoint ---------------------------
    save(step)
    if run.stop_reason in ("SIGTERM", "SIGINT"):  # asked to leave: the checkpoint is what matters
        return {"final_step": step, "stopped": run.stop_reason}
    if best["step"] != step:
        consider(step, validate(step))
    from reasonlab.runs import open_checkpoint

    if best["step"] != step:
        open_checkpoint(run.dir / "checkpoints" / "best").restore(modules={"model": model}, rng=False)
    with run.phase("eval"):
        s = evaluate_split(model, tok, task, test, cfg.data.test_split, cfg, f"test_best_step{best['step']}", step, run,
                           semantic=cfg.eval.semantic)
    run.log(step, flat_metrics(s, f"test/{task.name}"))
    m = s["metrics"]
    k = cfg.eval.samples
    keys = ["accuracy", f"pass@{k}", "distinct_2", "self_bleu", "semantic_diversity", "unique_answer_ratio"]
    result = {key: m[key] for key in keys if key in m}
    dist.print0(f"test (checkpoint chosen on validation {cfg.eval.select_on}, step {best['step']}): " +
                ", ".join(f"{key} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})"
                          for key, v in result.items() if v.get("lo") is not None))
    # `reasonlab run` writes report.md once the run folder says how the run ended
    return {"final_step": step, "best_step": best["step"], "best_val": best["value"], "select_on": cfg.eval.select_on,
            "test": result, "train_cpu_s": round(cpu_total, 1)}
