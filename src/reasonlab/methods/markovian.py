"""Markovian chain-of-thought training: a CoT is rewarded by how much it alone makes the answer likely.

What is implemented (Viteri et al., "Markovian Transformers for Informative Language Modeling"; anchors in
shared/ANCHORS.md, seed 003; pure pieces in reasonlab/rl/markovian.py and reasonlab/rl/policy.py):
- Rollout: per question, G = `rl.group_size` CoTs of exactly K = `data.cot_tokens` tokens sampled from the policy given
  the task's Markovian prompt ("... Question: {q}\\nReasoning:"), EOS masked while sampling (the paper's
  min_new_tokens = K). A step holds train.batch_size / G questions ("parallel" mode: G = batch_size, one question).
  Sampling seeds are a pure function of (seed, step, question slot), so a resumed or 2-process run samples the same
  CoTs; evaluation CoTs are seeded per question the same way (eval.seed).
- Reward: R = ln pi(answer | CoT) - ln pi_ref(answer | CoT_ref). The answer is scored after
  "<prompt with the question replaced by <Redacted>> CoT\\nAnswer:" (rl.markovian=false: the question stays visible —
  the non_markovian ablation), averaged (rl.answer_logprob=mean, as the public code) or summed over its tokens.
  pi_ref = the same model with the LoRA adapter disabled; CoT_ref = its greedy CoT (cached per question: the reference
  never changes), a fresh sample, or none (rl.ref_cot). Within a group the baseline is a constant and cancels in the
  standardization; it matters for logging and for G = 1 (distinct questions, standardized over the global batch).
- Advantage: A = (R - mean) / (max(std, rl.min_std) + eps) over the group, mean/std DETACHED (rl.policy.group_stats).
- Loss (paper eq.): pg + actor_reward_weight * (-mean A) + kl_coef * KL(pi || pi_ref) on the CoT tokens, where pg is
  REINFORCE -A.detach() * ln pi(CoT | q), ln pi(CoT | q) the SUM over the K CoT tokens (rl.agg=seq_sum; seq_mean, a
  per-token mean, divides the policy gradient by K against the actor-reward term), and the -mean(A) term's gradient
  flows through ln pi(answer | CoT), i.e. -mean(dR)/denom. Temperatures: the CoT log-probs in the policy gradient,
  the PPO ratio, the KL and the logged entropy are those of softmax(logits / T) with T = rl.temperature, the
  distribution the CoTs were sampled from (the EOS mask of sampling aside: ln pi is over the whole vocabulary); the
  answer log-prob R is at T = 1, the model's own likelihood of the answer, which the greedy answer decoding at
  evaluation reads. KL: exact KL(pi_T || ref_T) over the vocabulary at every CoT position (rl.kl_estimator=exact),
  summed over the CoT with rl.agg; k3 on the sampled tokens is an estimate of that value whose gradient as a loss is
  that of KL(ref || pi). The public code had this term identically zero (answer log-probs under no_grad, mean/std not
  detached); rl.actor_reward_grad=false reproduces that on purpose (the no_reward_grad ablation: the audit shows 0).
- rl.loss=ppo: rl.ppo_epochs passes over the rollout in rl.minibatches minibatches of whole groups, one optimizer step
  each; ratio = pi / pi_old with pi_old = the policy THAT SAMPLED the rollout (log-probs recorded before any update, so
  the first minibatch has ratio exactly 1 — logged as ppo/ratio_first_mean), clipped, with dual-clip (Ye et al. 2020,
  verl clip_ratio_c) and a clamped log-ratio. (The public code took the ratio against the frozen base model.)
  The actor-reward term is recomputed on every minibatch at the current parameters with the rollout's group statistics.
- rl.loss=ei: expert-iteration baseline: NLL of the CoTs whose advantage is >= rl.ei_min_adv within their group,
  aggregated by rl.agg (seq_sum: the CoT's log-likelihood), averaged over the selected CoTs (+ KL). The public code thresholded against a running mean + k std of past rewards; ours is per group, stateless.
- Evaluation (as the paper): sample one CoT (eval.cot_temperature), then decode the answer greedily (<= data.answer_tokens,
  stop at data.answer_stop) after the same redacted prompt; every extractor of the task is recorded, accuracy with a
  Wilson 95% CI. The untrained model is evaluated on validation and (eval.test_baseline) on test before training;
  validation every eval.every steps chooses the `best` checkpoint; test runs once at the end on it, and the result is
  compared with the untrained model's test eval by a paired bootstrap over the same example ids.
- Logs: train/* (loss, terms, lr, grad norm), rollout/* (reward mean/std, frac zero-std groups, unique ratio, repeated
  n-gram rate, longest character run, lengths, answer-in-CoT rate, entropy), train/answer_logp{,_ref}, ppo/*,
  grad/term/{pg,actor_reward,kl} (rl.audit: each weighted term's gradient alone, every watch.audit_every steps, on
  the first minibatch), eval/<task>/*, time/* (wall and process CPU seconds). The online watcher raises events;
  report.md is written at the end by `reasonlab run`.
- Compute (reasonlab.training): train.device / train.precision; under `accelerate launch` the processes take whole
  question groups and DDP averages the gradients, so the update equals the 1-process update on the same global batch;
  evaluation is split over the processes. CoTs are sampled by `rollout.backend` (own loop | hf | vllm with the
  policy's weights handed over after every update); the reference CoT is always decoded by the own loop, with the
  own backend in the same batch as the policy's CoTs (its rows with the adapter off: one pass over the weights).
- Resume is exact: the adapter, AdamW, the schedule, the RNG streams, the validation choice and the watcher's windows
  are checkpointed; the questions and CoT seeds of a step are functions of (seed, step, slot). The cache of ln
  pi_ref(answer | greedy CoT_ref) is not saved: each entry is the reference (the frozen base) decoding the question
  greedily (in the rollout's batch, on rows of its own), so a resumed run recomputes the same CoT. SIGTERM during an
  evaluation stops it at its next generation batch; --resume redoes it.
- Not implemented: the paper's EMA reward baseline (rl `r`), CoT-length curricula, the wiki perturbation analyses.

    reasonlab run configs/markovian/arithmetic-smollm2.yaml
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from reasonlab import training
from reasonlab.config import BaseConfig, ConfigError, EvalConfig, F, TrainConfig
from reasonlab.watch import WatchConfig, Watcher, group_reward_stats, record_train_ids, rollout_stats
from reasonlab.eval.generate import Backend, GenConfig, Group, OwnSampler, generate, prompt_seeds, streams
from reasonlab.eval.packed import packed
from reasonlab.models.lm import LoraConfig, ModelConfig, count_parameters, is_available_offline, load_for_config, reference
from reasonlab.rl import markovian as M
from reasonlab.rl.policy import (entropy_from_logits, group_stats, kl_exact_entropy, kl_k3, masked_mean, pg_loss,
                                 ppo_loss, shared_prompt_logprobs)
from reasonlab.runs import Run, batch_indices
from reasonlab.tasks.base import Example


@dataclass
class MarkovianModel(ModelConfig):
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16), metadata={
        "help": "LoRA adapter (paper: r 8, alpha 16, all-linear); the reference policy is the model with it disabled"})


@dataclass
class DataConfig:
    task: str = F("arithmetic", "task name: gsm8k | svamp | aqua | mathqa | mmlu | arc-challenge | arithmetic | wiki ...")
    task_args: dict = F({}, "task constructor args, e.g. {n_terms: 3, digits: 2} or {data_dir: /path/to/data}")
    cot_tokens: int = F(150, "K: every CoT is exactly K tokens (paper: GSM8K 100, MMLU 150, SVAMP 50, ARC 50, arith 150)")
    answer_tokens: int = F(10, "greedy answer budget at evaluation (paper: <= 10)")
    answer_stop: list[str] = F(["\n"], "stop strings of the greedy answer")
    n_train: int = F(0, "use the first N training examples (0: all)")
    val_split: str = F("validation", "split for periodic evals and checkpoint choice")
    test_split: str = F("test", "split evaluated once at the end on the best-on-validation checkpoint")

    def __post_init__(self):
        if self.cot_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("data.cot_tokens and data.answer_tokens must be >= 1")


@dataclass
class RLConfig:
    group_size: int = F(12, "G: CoTs per question (paper 'parallel': G = batch size); 1 = distinct questions, "
                        "standardized over the global batch")
    temperature: float = F(1.0, "CoT sampling temperature T (paper 1.0; wiki 1.5); the CoT log-probs of the policy "
                           "gradient, the PPO ratio and the KL are those of softmax(logits / T), the policy that "
                           "sampled")
    top_p: float = F(1.0, "nucleus mass of CoT sampling (1.0 = off)")
    markovian: bool = F(True, "score the answer with the question redacted; false = the non_markovian ablation")
    actor_reward_weight: float = F(1.0, "weight of the -mean(A) term whose gradient flows through ln pi(answer|CoT)")
    actor_reward_grad: bool = F(True, "false = the no_reward_grad ablation: ln pi(answer|CoT) without gradient, so "
                                "the actor-reward term contributes exactly 0 (the public code's behaviour)")
    kl_coef: float = F(0.1, "weight of KL(pi || pi_ref) on the CoT tokens (paper 0.1)")
    kl_estimator: Literal["exact", "k3"] = F("exact", "exact: KL(pi_T || ref_T) summed over the vocabulary at every "
                                             "CoT position (the paper's) | k3: Schulman's estimator on the sampled "
                                             "tokens, whose gradient as a loss is that of KL(ref || pi), the reverse")
    ref_cot: Literal["greedy", "sampled", "none"] = F("greedy", "CoT_ref of the baseline ln pi_ref(answer|CoT_ref): "
                                                      "greedy (cached per question) | sampled | none")
    answer_logprob: Literal["mean", "sum"] = F("mean", "mean | sum of the answer tokens' log-probs (public code: mean)")
    share_prefix: bool = F(True, "run a group's common prompt once and share its keys/values (with gradient) across "
                           "its G rows; false = every row carries a copy (same numbers up to rounding, more compute)")
    min_std: float = F(0.01, "floor of the group std in the advantage denominator (0 = none)")
    adv_eps: float = F(1e-6, "epsilon added to the advantage denominator")
    agg: Literal["seq_sum", "seq_mean", "token_mean"] = F(
        "seq_sum", "token aggregation of the pg/ppo/kl terms: seq_sum (the paper: ln pi(CoT | q) is the SUM over the K "
        "CoT tokens, the REINFORCE estimate of the reward's gradient) | seq_mean (per-token mean: the policy gradient "
        "shrinks by 1/K against the actor-reward term, which is a per-answer quantity) | token_mean")
    loss: Literal["pg", "ppo", "ei"] = F("pg", "pg (REINFORCE + actor reward) | ppo (clipped ratio vs the sampling "
                                         "policy) | ei (expert iteration)")
    ppo_epochs: int = F(1, "passes over one rollout batch (loss=ppo)")
    minibatches: int = F(1, "minibatches of whole groups per rollout and process; pg/ei accumulate them into one "
                         "optimizer step, ppo steps on each")
    clip_eps: float = F(0.2, "PPO clip range")
    dual_clip: float = F(3.0, "PPO dual-clip bound c (> 1) for negative advantages; 0 = off")
    ei_min_adv: float = F(1.0, "expert iteration keeps CoTs with standardized advantage >= this")

    def __post_init__(self):
        if self.group_size < 1 or self.ppo_epochs < 1 or self.minibatches < 1:
            raise ValueError("rl.group_size, rl.ppo_epochs and rl.minibatches must be >= 1")
        if self.ppo_epochs > 1 and self.loss != "ppo":
            raise ValueError(f"rl.ppo_epochs={self.ppo_epochs} needs rl.loss=ppo (reusing a rollout needs the ratio)")
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ValueError(f"rl.dual_clip must be > 1 (verl uses 3.0) or 0 to disable, got {self.dual_clip}")
        if self.temperature <= 0:
            raise ValueError("rl.temperature must be > 0: the policy gradient needs sampled CoTs")


@dataclass
class MarkovianEval(EvalConfig):
    test_limit: int = F(0, "test examples in the final eval (0: all)")
    batch_size: int = F(16, "rows per generation batch")
    cot_temperature: float = F(1.0, "temperature of the one CoT sampled per question (paper: sampled; 0 = greedy)")
    seed: int = F(1234, "sampling seed of evaluation CoTs (the same for every eval: paired comparisons)")
    test_baseline: bool = F(True, "evaluate the untrained model on test before training (the 'before' number; "
                            "never used for any choice)")


@dataclass
class MarkovianTrain(TrainConfig):
    batch_size: int = F(12, "CoTs per step, global (paper: 12 = one question x 12 CoTs); questions = batch / rl.group_size")


@dataclass
class RolloutConfig:
    backend: Backend = F("auto", "who samples the CoTs (training and evaluation): auto (vllm on CUDA when installed, "
                         "else own) | own | hf | vllm")


@dataclass
class Config(BaseConfig):
    method: str = F("markovian", "recipe name")
    model: MarkovianModel = F(MarkovianModel, "policy model; reference = the same model with the adapter disabled")
    data: DataConfig = F(DataConfig, "task, prompt lengths")
    rl: RLConfig = F(RLConfig, "rollouts, reward, losses")
    rollout: RolloutConfig = F(RolloutConfig, "the generation backend")
    train: MarkovianTrain = F(MarkovianTrain, "optimization (steps = rollout batches)")
    eval: MarkovianEval = F(MarkovianEval, "evaluation")
    watch: WatchConfig = F(WatchConfig, "online alerts and auto-stop")

    def __post_init__(self):
        if self.model.lora.r <= 0:
            raise ValueError("markovian needs model.lora.r > 0: the reference policy is the model with its adapter "
                             "disabled")
        if self.model.lora.dropout != 0:
            raise ValueError("markovian needs model.lora.dropout: 0 (the scored policy must be the sampling policy "
                             "for REINFORCE and for the PPO ratio)")
        if self.rl.share_prefix and self.model.gradient_checkpointing:
            raise ValueError("rl.share_prefix needs a KV cache, which gradient checkpointing turns off: set "
                             "rl.share_prefix: false or model.gradient_checkpointing: false")
        if self.train.batch_size % self.rl.group_size:
            raise ValueError(f"train.batch_size {self.train.batch_size} must be a multiple of rl.group_size "
                             f"{self.rl.group_size}")


# ----------------------------------------------------------------------------------------------------------------------
# helpers: prompts as token segments, sampling without EOS, one rollout, the loss terms, evaluation


@dataclass
class Ctx:
    """What the helpers share. `model` is the PEFT model itself (generation, the reference = its adapter disabled,
    checkpoints); `policy` the module the gradient forwards go through (the DDP wrapper of `model` under several
    processes, else `model`); `sampler` samples policy CoTs (reasonlab.eval.generate backends)."""

    model: object
    tok: object
    task: object
    cfg: Config
    policy: object = None
    sampler: object = None
    ref_cache: dict = field(default_factory=dict)  # example id -> ln pi_ref(answer | greedy CoT_ref)

    def __post_init__(self):
        self.policy = self.model if self.policy is None else self.policy
        self.sampler = OwnSampler(self.model, self.tok) if self.sampler is None else self.sampler

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def ids(self, text: str, first: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def question_ids(self, e: Example) -> list[int]:
        return self.ids(self.task.prompt(e, "markovian"), first=True)

    def scoring_prefix_ids(self, e: Example) -> list[int]:
        """The prompt the answer is scored after: question replaced by <Redacted> (options too) unless non-Markovian."""
        shown = Example(e.id, "<Redacted>", e.gold, None, e.meta) if self.cfg.rl.markovian else e
        return self.ids(self.task.prompt(shown, "markovian"), first=True)

    def answer_rows(self, exs: list[Example], cots: list[list[int]]) -> M.Rows:
        """(scoring prefix, CoT, '\\nAnswer:', ' gold') per row; segment 3 is the answer."""
        sep = self.ids("\nAnswer:")
        return M.pack_rows([(self.scoring_prefix_ids(e), c, sep, self.ids(" " + e.gold)) for e, c in zip(exs, cots)],
                           self.tok.pad_token_id)


def cot_config(ctx: Ctx, n: int, temperature: float, seed: int = 0, batch_size: int | None = None) -> GenConfig:
    """Exactly K = data.cot_tokens tokens: EOS is masked for all of them (the paper's min_new_tokens = K)."""
    K = ctx.cfg.data.cot_tokens
    return GenConfig(n=n, temperature=temperature, top_p=ctx.cfg.rl.top_p, max_new_tokens=K, min_new_tokens=K,
                     batch_size=batch_size or n, seed=seed, progress=False)


def sample_cots(ctx: Ctx, prompt: list[int], n: int, temperature: float, seed: int) -> list[list[int]]:
    """n policy CoTs of one prompt, drawn by the rollout backend from a generator seeded with `seed`."""
    return [s.token_ids for s in ctx.sampler.generate([prompt], cot_config(ctx, n, temperature), seeds=[seed])[0]]


@torch.no_grad()
def ref_answer_logp(ctx: Ctx, e: Example, step: int, slot: int) -> float:
    """ln pi_ref(answer | CoT_ref), CoT_ref sampled from / greedy under the reference and scored by the reference (the
    own loop on the adapter-disabled model: a vLLM engine holds the policy's weights, not the reference's)."""
    rc = ctx.cfg.rl.ref_cot
    if rc == "none":
        return 0.0
    if rc == "greedy" and e.id in ctx.ref_cache:
        return ctx.ref_cache[e.id]
    with reference(ctx.model):
        temp, seed = (0.0, 0) if rc == "greedy" else (ctx.cfg.rl.temperature,
                                                      M.sample_seed(ctx.cfg.seed, step, slot, 1))
        cot = generate(ctx.model, ctx.tok, [ctx.question_ids(e)], cot_config(ctx, 1, temp),
                       seeds=[seed])[0][0].token_ids
        rows = ctx.answer_rows([e], [cot]).to(ctx.device)
        value = float(M.segment_logprob(ctx.model, rows, 3, ctx.cfg.rl.answer_logprob))
    if rc == "greedy":
        ctx.ref_cache[e.id] = value
    return value


@dataclass
class Rollout:
    G: int  # CoTs per question (rows of one group are adjacent)
    exs: list[Example]  # one per row (B,)
    cots: list[list[int]]  # (B, K) sampled CoT token ids
    cot_t: torch.Tensor  # the same as a (B, K) tensor
    cot_rows: M.Rows  # (question prompt, CoT); segment 1 = CoT, the last K tokens of every row
    ans_rows: M.Rows  # (scoring prefix, CoT, "\nAnswer:", " gold"); segment 3 = answer
    ref_logp: torch.Tensor  # (B,) ln pi_ref(answer | CoT_ref) of the row's question


def rollout(ctx: Ctx, step: int, slots: list[int], questions: list[Example], G: int) -> Rollout:
    """G CoTs per question (slot = the question's position in the global batch: it seeds the sampling). With the own
    loop and greedy reference CoTs, the reference's CoTs of the questions not yet cached decode in the same batch as
    the policy's (one pass over the weights for both: generate's mixed groups, the adapter off on those rows)."""
    rl = ctx.cfg.rl
    seeds = [M.sample_seed(ctx.cfg.seed, step, slot) for slot in slots]
    if rl.ref_cot == "greedy" and getattr(ctx.sampler, "name", None) == "own" and streams(ctx.model):
        todo = list({e.id: e for e in questions if e.id not in ctx.ref_cache}.values())
        groups = [Group(G, rl.temperature)] * len(questions) + [Group(1, 0.0, "__base__")] * len(todo)
        out = ctx.sampler.generate([ctx.question_ids(e) for e in questions + todo],
                                   cot_config(ctx, G, rl.temperature, batch_size=sum(g.n for g in groups)),
                                   seeds=seeds + [0] * len(todo), groups=groups)
        if todo:
            ref_rows = ctx.answer_rows(todo, [g[0].token_ids for g in out[len(questions):]]).to(ctx.device)
            with torch.no_grad(), reference(ctx.model):
                values = M.segment_logprob(ctx.model, ref_rows, 3, rl.answer_logprob)  # (len(todo),)
            ctx.ref_cache.update({e.id: float(v) for e, v in zip(todo, values)})
        groups_out = [[s.token_ids for s in g] for g in out[:len(questions)]]
    else:
        groups_out = [sample_cots(ctx, ctx.question_ids(e), G, rl.temperature, seed)
                      for e, seed in zip(questions, seeds)]
    exs, cots, ref = [], [], []
    for slot, e, group in zip(slots, questions, groups_out):
        r = ref_answer_logp(ctx, e, step, slot)
        exs += [e] * G
        cots += group
        ref += [r] * G
    cot_rows = M.pack_rows([(ctx.question_ids(e), c) for e, c in zip(exs, cots)], ctx.tok.pad_token_id)
    if any(len(c) != ctx.cfg.data.cot_tokens for c in cots):  # EOS is masked and there are no stop strings
        raise RuntimeError(f"a CoT is not {ctx.cfg.data.cot_tokens} tokens long")
    dev = ctx.device
    return Rollout(G, exs, cots, torch.tensor(cots, device=dev), cot_rows.to(dev), ctx.answer_rows(exs, cots).to(dev),
                   torch.tensor(ref, device=dev))


def forward_terms(ctx: Ctx, ro: Rollout, rows: list[int], *, actor_grad: bool, with_ref: bool = True) -> dict:
    """Policy forwards on rollout rows `rows` (whole groups): CoT token log-probs + logits at the sampling temperature
    (grad), answer reward R at T = 1 (grad when actor_grad), and the reference's CoT log-probs/logits at the same
    temperature (no grad) for the KL. Shapes: lp/mask (b, K), logits (b, K, V) (divided by T), R (b,). With
    rl.share_prefix a group's common prompt is run once (rl.policy.shared_prompt_logprobs)."""
    rl, K, T = ctx.cfg.rl, ctx.cfg.data.cot_tokens, ctx.cfg.rl.temperature
    act = actor_grad and torch.is_grad_enabled()
    out: dict[str, list] = {"lp": [], "logits": [], "R": [], "ref_lp": [], "ref_logits": []}
    if rl.share_prefix and ro.G > 1:
        sep = torch.tensor(ctx.ids("\nAnswer:"), device=ctx.device)
        for start in range(0, len(rows), ro.G):
            g = rows[start:start + ro.G]
            e, cots = ro.exs[g[0]], ro.cot_t[g]  # (G, K)
            q = ctx.question_ids(e)
            lp, _, logits = shared_prompt_logprobs(ctx.policy, q, cots, return_logits=True,
                                                   temperature=T)  # (G, K), (G, K, V)
            ans = torch.tensor(ctx.ids(" " + e.gold), device=ctx.device)
            suffix = torch.cat([cots, sep.expand(len(g), -1), ans.expand(len(g), -1)], dim=1)  # (G, K + |sep| + |ans|)
            with torch.set_grad_enabled(act):
                alp, _ = shared_prompt_logprobs(ctx.policy, ctx.scoring_prefix_ids(e), suffix,
                                                score_from=K + len(sep))  # (G, |ans|)
            out["R"].append(alp.mean(-1) if rl.answer_logprob == "mean" else alp.sum(-1))
            out["lp"].append(lp)
            out["logits"].append(logits)
            if with_ref:
                with torch.no_grad(), reference(ctx.model):
                    rlp, _, rlogits = shared_prompt_logprobs(ctx.model, q, cots, return_logits=True, temperature=T)
                out["ref_lp"].append(rlp)
                out["ref_logits"].append(rlogits)
        res = {k: torch.cat(v) for k, v in out.items() if v}
        res["mask"] = torch.ones(res["lp"].shape, device=ctx.device)  # (b, K) float32 as pack_rows masks: K tokens each
        return res
    cr, ar = ro.cot_rows.select(rows), ro.ans_rows.select(rows)
    _, lp, logits, mask = M.segment_logprob(ctx.policy, cr, 1, return_tokens=True, temperature=T)  # (b, K), (b, K, V)
    with torch.set_grad_enabled(act):
        R = M.segment_logprob(ctx.policy, ar, 3, rl.answer_logprob)  # (b,)
    res = {"lp": lp, "logits": logits, "mask": mask, "R": R}
    if with_ref:
        with torch.no_grad(), reference(ctx.model):
            _, ref_lp, ref_logits, _ = M.segment_logprob(ctx.model, cr, 1, return_tokens=True, temperature=T)
        res.update(ref_lp=ref_lp, ref_logits=ref_logits)
    return res


def loss_terms(ctx: Ctx, f: dict, ref_logp: torch.Tensor, mean: torch.Tensor, denom: torch.Tensor, adv: torch.Tensor,
               old_lp: torch.Tensor | None = None) -> tuple[dict, dict]:
    """The three weighted-loss ingredients for one minibatch: {"pg", "actor_reward", "kl"} (unweighted scalars) and
    stats. adv (b,) is the fixed (detached) advantage; the actor term is rebuilt from f["R"] so its gradient is dR."""
    rl = ctx.cfg.rl
    a_actor = (f["R"] - ref_logp - mean) / denom  # (b,): value == adv at the rollout's parameters, gradient dR/denom
    stats = {}
    if rl.loss == "ppo":
        pg, st = ppo_loss(f["lp"], old_lp, adv, f["mask"], clip_eps=rl.clip_eps, dual_clip=rl.dual_clip or None,
                          agg=rl.agg)
        stats.update({f"ppo/{k}": v for k, v in st.items()})
    elif rl.loss == "ei":
        keep = M.expert_iteration_mask(adv, rl.ei_min_adv)  # (b,)
        # NLL of the selected CoTs, aggregated like the other terms (seq_sum: the CoT's log-likelihood, on the same
        # scale as the summed KL it is regularized by), averaged over the selected CoTs
        sel = keep.nonzero().squeeze(-1)  # (n_sel,)
        pg = masked_mean(-f["lp"][sel], f["mask"][sel], rl.agg) if sel.numel() else (f["lp"] * 0.0).sum()
        stats["ei/selected_frac"] = keep.mean()
    else:
        pg = pg_loss(f["lp"], adv, f["mask"], rl.agg)
    terms = {"pg": pg, "actor_reward": M.actor_reward_loss(a_actor)}
    ent = None
    if rl.kl_coef != 0:  # at kl_coef 0 there is no reference forward (forward_terms skips it) and no KL term
        if rl.kl_estimator == "exact":  # one fused pass over the (b, K, V) logits gives the entropy too
            kl_tok, ent = kl_exact_entropy(f["logits"], f["ref_logits"])  # (b, K) x2
        else:
            kl_tok = kl_k3(f["lp"], f["ref_lp"])  # (b, K)
        terms["kl"] = masked_mean(kl_tok, f["mask"], rl.agg)
    with torch.no_grad():
        ent = entropy_from_logits(f["logits"].detach()) if ent is None else ent  # (b, K)
        stats["rollout/entropy"] = masked_mean(ent, f["mask"], "token_mean")
    return terms, stats


def weighted(ctx: Ctx, terms: dict) -> dict[str, tuple[float, torch.Tensor]]:
    w = {"pg": (1.0, terms["pg"]), "actor_reward": (ctx.cfg.rl.actor_reward_weight, terms["actor_reward"])}
    if "kl" in terms:
        w["kl"] = (ctx.cfg.rl.kl_coef, terms["kl"])
    return w


@torch.no_grad()
def evaluate(ctx: Ctx, examples: list[Example], tag: str, step: int, run: Run, compute=None) -> dict:
    """The paper's protocol: one sampled CoT per question (seeded per question), then the answer decoded greedily
    after the (redacted) prompt + CoT; every extractor recorded. The questions are split over the processes. Writes
    evals/<tag>.jsonl/.json (rank 0); returns the summary on every rank."""
    from reasonlab.eval.harness import eval_summary, sample_record
    from reasonlab.eval.metrics import accuracy

    cfg, tok = ctx.cfg, ctx.tok
    t0 = time.time()
    sep = ctx.ids("\nAnswer:")
    answer_cfg = GenConfig(n=1, temperature=0.0, max_new_tokens=cfg.data.answer_tokens,
                           stop=tuple(cfg.data.answer_stop), batch_size=cfg.eval.batch_size, progress=False)

    stop = getattr(run, "signalled", None)  # SIGTERM: stop at the next generation batch

    def answer(exs: list[Example], offset: int) -> list[dict]:
        prompts = [ctx.question_ids(e) for e in exs]
        gc = cot_config(ctx, 1, cfg.eval.cot_temperature, batch_size=cfg.eval.batch_size)
        cots = training.generate_checked(ctx.sampler, prompts, gc, seeds=prompt_seeds(cfg.eval.seed, len(exs), offset),
                                         stop=stop)
        ctxs = [ctx.scoring_prefix_ids(e) + c[0].token_ids + sep for e, c in zip(exs, cots)]
        answers = training.generate_checked(ctx.sampler, ctxs, answer_cfg, stop=stop)
        return [sample_record(ctx.task, e, a[0], prompt=tok.decode(p), cot=c[0].text,
                              answer_in_cot=M.answer_in_text(e.gold, c[0].text))
                for e, p, c, a in zip(exs, prompts, cots, answers)]

    records = training.sharded(compute, examples, answer)
    summary = eval_summary(records, ctx.task, tag=tag, step=step, protocol="one sampled CoT, greedy answer",
                           cot_tokens=cfg.data.cot_tokens, cot_temperature=cfg.eval.cot_temperature,
                           answer_tokens=cfg.data.answer_tokens, redacted=cfg.rl.markovian, eval_seed=cfg.eval.seed,
                           backend=ctx.sampler.name, wall_time_s=round(time.time() - t0, 2))
    summary["metrics"]["answer_in_cot_rate"] = accuracy(r["answer_in_cot"] for r in records).to_dict()
    run.write_eval(tag, records, summary)
    return summary


def stand_in_examples(task) -> list[Example]:
    """Two examples in the task's format, for --dry-run when its data is not available offline."""
    if hasattr(task, "choice_continuations"):
        return [Example(f"stand-in/{i}", "Which of these is a primary colour?", "B", ["green", "red", "purple",
                                                                                     "orange"]) for i in range(2)]
    if task.name == "wiki":
        text = "The river rises in the hills north of the town and flows south through farmland before it joins the sea"
        return [Example(f"stand-in/{i}", text, "near the old harbour where boats still land fish") for i in range(2)]
    return [Example(f"stand-in/{i}", "Tom has 3 apples and buys 4 more. How many apples does he have?", "7")
            for i in range(2)]


def load_split(task, split: str, dry_run: bool) -> tuple[list[Example], str | None]:
    from reasonlab.tasks.loaders import DataUnavailable

    try:
        return task.examples(split), None
    except DataUnavailable as e:
        if not dry_run:
            raise
        return stand_in_examples(task), str(e)


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config, run: Run) -> dict:
    from reasonlab.eval.generate import make_sampler, resolve_backend
    from reasonlab.eval.harness import eval_log
    from reasonlab.rl.audit import audit_terms
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    cpu0, wall0 = time.process_time(), time.time()
    compute = training.setup(cfg.train, run)
    backend = resolve_backend(cfg.rollout.backend, compute.device)  # a missing vLLM fails here, before any model loads
    training.seed_everything(cfg.seed)
    rl = cfg.rl
    # a dry run executes one rollout of 1 question x min(G, 2) CoTs (at the configured K) on the stand-in model
    G = min(rl.group_size, 2) if run.dry_run else rl.group_size
    n_q = compute.world_size if run.dry_run else cfg.train.batch_size // G  # questions per step, global
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train, missing = load_split(task, "train", run.dry_run)
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val, _ = load_split(task, cfg.data.val_split, run.dry_run)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    if n_q % compute.world_size:
        raise ConfigError(f"{n_q} questions per step (train.batch_size / rl.group_size) must divide over "
                          f"{compute.world_size} processes")
    n_mb = 1 if run.dry_run else rl.minibatches
    if (n_q // compute.world_size) % n_mb:
        raise ConfigError(f"{n_q // compute.world_size} question group(s) per process do not split into "
                          f"rl.minibatches={n_mb}")
    stand_in = run.dry_run and not is_available_offline(cfg.model.name)
    model, tok = load_for_config(cfg.model, device=compute.device, stand_in=stand_in,
                                 vocab=task.vocabulary() if hasattr(task, "vocabulary") else None)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = training.lr_schedule(opt, cfg.train)
    policy, opt = compute.prepare(model, opt)  # `policy` takes the gradient forwards (DDP); `model` is the same weights
    sampler = make_sampler(backend, model, tok, device=compute.device,
                           vllm=training.vllm_settings(cfg.model, cfg.seed))
    ctx = Ctx(model, tok, task, cfg, policy=policy, sampler=sampler)
    training.print0(f"model {cfg.model.name}{' (tiny stand-in)' if stand_in else ''}: {trainable:,} trainable / "
                    f"{total:,} parameters; task {task.name}: {len(train)} train, {len(val)} validation; {n_q} "
                    f"question(s) x {G} CoTs of {cfg.data.cot_tokens} tokens per step; loss {rl.loss}; generation "
                    f"backend {sampler.name}")

    def local_questions(step: int) -> tuple[list[int], list[Example]]:
        idx = batch_indices(step, n_q, len(train), cfg.seed)  # global batch of question indices
        slots = compute.shard(list(range(n_q)))  # this process's whole question groups
        return slots, [train[idx[s]] for s in slots]

    def update(step: int, audit: bool) -> dict:
        # frozen base linears on packed weights in every forward and backward of the step (reasonlab.eval.packed)
        with packed(model):
            return update_step(step, audit)

    def update_step(step: int, audit: bool) -> dict:
        """One rollout batch -> one (pg, ei) or epochs x minibatches (ppo) optimizer steps. Returns metrics."""
        t0 = time.time()
        model.eval()
        slots, qs = local_questions(step)
        with compute.autocast():
            ro = rollout(ctx, step, slots, qs, G)
        t_roll = time.time() - t0
        model.train()
        B = len(ro.exs)
        groups = [list(range(g * G, (g + 1) * G)) for g in range(B // G)]  # rows of each question group
        mbs = [sum((groups[g] for g in mb), []) for mb in M.minibatch_groups(len(groups), n_mb)]  # rows per minibatch
        actor_grad = rl.actor_reward_grad and rl.actor_reward_weight != 0
        # Pre-pass (no grad) when the advantage is needed before the update: ppo (pi_old, fixed A) and G = 1 (global
        # statistics). pg/ei with groups compute A inside the one pass; the value is the same.
        prepass = rl.loss == "ppo" or G == 1
        need_ref = rl.kl_coef != 0  # the reference's CoT log-probs only feed the KL term
        cache: dict[int, dict] = {}
        R_all = torch.zeros(B, device=compute.device)
        if prepass:
            with torch.no_grad(), compute.autocast():
                for i, rows in enumerate(mbs):
                    f = forward_terms(ctx, ro, rows, actor_grad=False, with_ref=need_ref)
                    cache[i] = {"old_lp": f["lp"], **{k: f[k] for k in ("ref_logits", "ref_lp") if k in f}}
                    R_all[rows] = f["R"]
            rew = R_all - ro.ref_logp  # (B,)
            if G == 1:  # standardize over the global batch
                every = torch.cat(compute.gather(rew.cpu()))  # (B_global,)
                m, d = group_stats(every, None, min_std=rl.min_std, eps=rl.adv_eps)
                mean, denom = torch.full_like(rew, float(m[0])), torch.full_like(rew, float(d[0]))
            else:
                mean, denom = group_stats(rew, G, min_std=rl.min_std, eps=rl.adv_eps)
            adv = (rew - mean) / denom
        plan = [(e, i) for e in range(rl.ppo_epochs) for i in (torch.randperm(
            len(mbs), generator=torch.Generator().manual_seed(M.sample_seed(cfg.seed, step, e, 2))).tolist()
            if rl.ppo_epochs > 1 else range(len(mbs)))]
        sums: dict[str, float] = {}
        audit_metrics: dict[str, float] = {}
        first_ratio = None
        gnorms = []
        for k, (epoch, i) in enumerate(plan):
            rows = mbs[i]
            steps_now = rl.loss == "ppo" or k == len(plan) - 1  # an optimizer step follows this backward
            # pg/ei accumulate their minibatches locally and synchronize the gradient once, on the last one
            with contextlib.nullcontext() if steps_now else compute.no_sync(policy):
                with compute.autocast():
                    f = forward_terms(ctx, ro, rows, actor_grad=actor_grad, with_ref=need_ref and not prepass)
                    if prepass:
                        f.update({k: v for k, v in cache[i].items() if k != "old_lp"})
                        mb_mean, mb_denom, mb_adv = mean[rows], denom[rows], adv[rows]
                    else:
                        rew_mb = f["R"].detach() - ro.ref_logp[rows]
                        mb_mean, mb_denom = group_stats(rew_mb, G, min_std=rl.min_std, eps=rl.adv_eps)
                        mb_adv = (rew_mb - mb_mean) / mb_denom
                        R_all[rows] = f["R"].detach()
                    terms, st = loss_terms(ctx, f, ro.ref_logp[rows], mb_mean, mb_denom, mb_adv,
                                           cache[i]["old_lp"] if prepass else None)
                    w = weighted(ctx, terms)
                    loss = sum(wt * t for wt, t in w.values())
                if k == 0 and "ppo/ratio_mean" in st:
                    first_ratio = float(st["ppo/ratio_mean"])
                if k == 0 and audit:
                    audit_metrics = audit_terms(w, params).metrics()
                scale = 1.0 / len(mbs) if rl.loss != "ppo" else 1.0  # pg/ei: accumulate minibatches into one step
                compute.backward(loss * scale)
            for name, v in [("train/loss", loss), *[(f"train/{n}_loss", t) for n, t in terms.items()], *st.items()]:
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / len(plan)
            if steps_now:
                gnorms.append(compute.clip_grad_norm(params, cfg.train.grad_clip))
                opt.step()
                opt.zero_grad(set_to_none=True)
        sched.step()
        sampler.sync(model)  # a vLLM engine samples the next rollout from the updated policy
        model.eval()
        # ---- metrics (global over processes) ----
        rew = torch.cat(compute.gather((R_all - ro.ref_logp).cpu()))
        texts = sum(compute.gather([tok.decode(c, skip_special_tokens=True) for c in ro.cots]), [])
        golds = sum(compute.gather([e.gold for e in ro.exs]), [])
        metrics = {k: compute.mean(v) for k, v in sums.items()}
        metrics.update(group_reward_stats(rew, group_size=G if G > 1 else None))
        metrics.update(rollout_stats(texts))
        metrics.update({
            "rollout/len_tokens": float(sum(len(c) for c in ro.cots) / B),
            "rollout/answer_in_cot": sum(M.answer_in_text(g, t) for g, t in zip(golds, texts)) / len(texts),
            "train/answer_logp": compute.mean(R_all.mean()),
            "train/answer_logp_ref": compute.mean(ro.ref_logp.mean()),
            "train/grad_norm": sum(gnorms) / len(gnorms), "train/lr": sched.get_last_lr()[0],
            "time/rollout_s": t_roll, "time/update_s": time.time() - t0 - t_roll,
        })
        if first_ratio is not None:
            metrics["ppo/ratio_first_mean"] = compute.mean(first_ratio)
        if audit_metrics:
            metrics.update({k: compute.mean(v) for k, v in audit_metrics.items()})
        return metrics

    if run.dry_run:
        note = f" (data not available offline: {missing}; using {len(train)} stand-in examples)" if missing else ""
        t0 = time.time()
        m = update(0, audit=True)
        training.print0(f"dry run{note}: one rollout of {n_q} question(s) x {G} CoTs (configured: "
                        f"{cfg.train.batch_size // rl.group_size} x {rl.group_size}) -> loss {m['train/loss']:.4f} "
                        f"(pg {m['train/pg_loss']:.4f}, actor_reward {m['train/actor_reward_loss']:.4f}, kl "
                        f"{m.get('train/kl_loss', 0.0):.4f}); grad/term pg {m['grad/term/pg']:.3g}, actor_reward "
                        f"{m['grad/term/actor_reward']:.3g}, kl {m.get('grad/term/kl', 0.0):.3g}; "
                        f"{time.time() - t0:.1f}s; "
                        f"nothing trained")
        return {"dry_run": True, "trainable_params": trainable, "total_params": total, **m, **compute.describe(),
                "backend": sampler.name}

    watcher = Watcher(run, cfg.watch)
    record_train_ids(run, [e.id for e in train])
    start, best, _ = training.resume(run, "accuracy", modules={"model": model}, optimizer=opt, scheduler=sched,
                                     watcher=watcher)
    if run.resume_from is not None:
        sampler.sync(model)  # a vLLM engine samples the resumed weights

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules={"model": model}, optimizer=opt, scheduler=sched, name=name,
                            state={"best": best.state(), "watcher": training.watcher_state(watcher)})

    def eval_on(examples, tag: str, step: int, prefix: str) -> dict:
        with run.phase("eval"), compute.autocast():
            s = evaluate(ctx, examples, tag, step, run, compute)
        a = s["metrics"]["accuracy"]
        run.log(step, eval_log(s, f"{prefix}/{task.name}"))
        training.print0(f"step {step}: {tag} accuracy {a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] (n={a['n']}, "
                        f"{s['extractor']}); answer in CoT {s['metrics']['answer_in_cot_rate']['value']:.3f}")
        return s

    def validate(step: int) -> float:
        return eval_on(val, f"val_step{step}", step, "eval")["metrics"]["accuracy"]["value"]

    test = task.examples(cfg.data.test_split)
    test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
    def evals(step: int) -> None:  # before training: also the untrained model on test (the "before" number)
        best.offer(step, validate(step), save)
        if step == 0 and cfg.eval.test_baseline:
            eval_on(test, "test_base_step0", 0, "test_base")

    run.final_eval_scale = 1.0 + len(test) / max(1, len(val))  # final = validation + test
    if training.evals_pending(run, start):
        training.evals_at(run, start, cfg.train, cfg.eval.every, evals, save)

    # ---- train ---------------------------------------------------------------------------------------------------
    step = start
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        audit = bool(cfg.watch.audit_every) and step % cfg.watch.audit_every == 0
        t0 = time.time()
        metrics = update(step, audit)
        step += 1
        metrics.update({"time/step_s": time.time() - t0, "time/cpu_s": time.process_time() - cpu0,
                        "time/wall_s": time.time() - wall0})
        if step % cfg.train.log_every == 0 or audit:
            run.log(step, metrics)
        training.progress(run, step, cfg.train.steps, metrics)
        if watcher.step(step, metrics):
            break
        training.evals_at(run, step, cfg.train, cfg.eval.every, evals, save)

    # ---- final: checkpoint, validation, test once on the best-on-validation checkpoint ---------------------------
    def test_once(best_step: int) -> dict:
        return eval_on(test, f"test_best_step{best_step}", step, "test")["metrics"]["accuracy"]

    m = training.final_eval(run, step, best, modules={"model": model}, validate=validate, save=save, test=test_once,
                            on_restore=lambda: sampler.sync(model))
    if m is None:
        return {"final_step": step, "stopped": run.stop_reason}
    result = {"final_step": step, "best_step": best.step, "best_val_accuracy": best.value, "test_accuracy": m,
              "cpu_s": round(time.process_time() - cpu0, 1), "wall_s": round(time.time() - wall0, 1),
              "ranks": compute.gather(compute.rank)}
    base = run.dir / "evals" / "test_base_step0.jsonl"
    if compute.is_main and base.exists():
        from reasonlab.eval.metrics import compare_eval_files

        d = compare_eval_files(base, run.dir / "evals" / f"test_best_step{best.step}.jsonl")
        result["test_vs_base"] = d.to_dict()
        run.log(step, {f"test/{task.name}/delta_vs_base": d.diff, f"test/{task.name}/delta_lo": d.lo,
                       f"test/{task.name}/delta_hi": d.hi, f"test/{task.name}/delta_p": d.p_value})
        training.print0(f"test: untrained {d.mean_a:.3f} -> trained (step {best.step}) {d.mean_b:.3f}, difference "
                        f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], paired bootstrap p = {d.p_value:.4f} (n={d.n})")
    return result  # `reasonlab run` writes report.md once the run folder says how the run ended
