"""Markovian chain-of-thought training: a CoT is rewarded by how much it alone makes the answer likely.

What is implemented (Viteri et al., "Markovian Transformers for Informative Language Modeling"; anchors in
shared/ANCHORS.md, seed 003; pure pieces in reasonlab/rl/markovian.py and reasonlab/rl/policy.py):
- Rollout: per question, G = `rl.group_size` CoTs of exactly K = `data.cot_tokens` tokens sampled from the policy given
  the task's Markovian prompt ("... Question: {q}\\nReasoning:"), EOS masked while sampling (the paper's
  min_new_tokens = K). A step holds train.batch_size / G questions ("parallel" mode: G = batch_size, one question).
  Sampling seeds are a pure function of (seed, step, question slot), so a resumed or 2-process run samples the same CoTs.
- Reward: R = ln pi(answer | CoT) - ln pi_ref(answer | CoT_ref). The answer is scored after
  "<prompt with the question replaced by <Redacted>> CoT\\nAnswer:" (rl.markovian=false: the question stays visible —
  the non_markovian ablation), averaged (rl.answer_logprob=mean, as the public code) or summed over its tokens.
  pi_ref = the same model with the LoRA adapter disabled; CoT_ref = its greedy CoT (cached per question: the reference
  never changes), a fresh sample, or none (rl.ref_cot). Within a group the baseline is a constant and cancels in the
  standardization; it matters for logging and for G = 1 (distinct questions, standardized over the global batch).
- Advantage: A = (R - mean) / (max(std, rl.min_std) + eps) over the group, mean/std DETACHED (rl.markovian.group_stats).
- Loss (paper eq.): pg + actor_reward_weight * (-mean A) + kl_coef * KL(pi || pi_ref) on the CoT tokens, where pg is
  REINFORCE -A.detach() * ln pi(CoT | q) and the -mean(A) term's gradient flows through ln pi(answer | CoT), i.e.
  -mean(dR)/denom. The public code had this term identically zero (answer log-probs under no_grad, mean/std not
  detached); rl.actor_reward_grad=false reproduces that on purpose (the no_reward_grad ablation: the audit shows 0).
  KL is exact over the vocabulary (rl.kl_estimator=exact, paper) or k3 on the sampled tokens.
- rl.loss=ppo: rl.ppo_epochs passes over the rollout in rl.minibatches minibatches of whole groups, one optimizer step
  each; ratio = pi / pi_old with pi_old = the policy THAT SAMPLED the rollout (log-probs recorded before any update, so
  the first minibatch has ratio exactly 1 — logged as ppo/ratio_first_mean), clipped, with dual-clip (Ye et al. 2020,
  verl clip_ratio_c) and a clamped log-ratio. (The public code took the ratio against the frozen base model.)
  The actor-reward term is recomputed on every minibatch at the current parameters with the rollout's group statistics.
- rl.loss=ei: expert-iteration baseline: NLL of the CoTs whose advantage is >= rl.ei_min_adv within their group
  (+ KL). The public code thresholded against a running mean + k std of past rewards; ours is per group, stateless.
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
- Data parallel: processes take whole question groups; gradients are all-reduced (mean) by hand, so the update equals
  the 1-process update on the same global batch. Evaluation runs on rank 0.
- Not implemented: the paper's EMA reward baseline (rl `r`), CoT-length curricula, the wiki perturbation analyses.

    reasonlab run configs/markovian/arithmetic-smollm2.yaml
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from reasonlab import dist
from reasonlab.config import BaseConfig, ConfigError, EvalConfig, F, TrainConfig
from reasonlab.diagnostics.watch import WatchConfig, Watcher, group_reward_stats, record_train_ids, rollout_stats
from reasonlab.models.lm import LoraConfig, ModelConfig, count_parameters, is_available_offline, load_for_config, reference
from reasonlab.rl import markovian as M
from reasonlab.rl.policy import entropy_from_logits, kl_exact, kl_k3, masked_mean, pg_loss, ppo_loss
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
    temperature: float = F(1.0, "CoT sampling temperature (paper 1.0; wiki 1.5)")
    top_p: float = F(1.0, "nucleus mass of CoT sampling (1.0 = off)")
    markovian: bool = F(True, "score the answer with the question redacted; false = the non_markovian ablation")
    actor_reward_weight: float = F(1.0, "weight of the -mean(A) term whose gradient flows through ln pi(answer|CoT)")
    actor_reward_grad: bool = F(True, "false = the no_reward_grad ablation: ln pi(answer|CoT) without gradient, so "
                                "the actor-reward term contributes exactly 0 (the public code's behaviour)")
    kl_coef: float = F(0.1, "weight of KL(pi || pi_ref) on the CoT tokens (paper 0.1)")
    kl_estimator: str = F("exact", "exact (summed over the vocabulary, paper) | k3 (sampled tokens)")
    ref_cot: str = F("greedy", "CoT_ref of the baseline ln pi_ref(answer|CoT_ref): greedy (cached per question) | "
                     "sampled | none")
    answer_logprob: str = F("mean", "mean | sum of the answer tokens' log-probs (public code: mean)")
    share_prefix: bool = F(True, "run a group's common prompt once and share its keys/values (with gradient) across "
                           "its G rows; false = every row carries a copy (same numbers up to rounding, more compute)")
    min_std: float = F(0.01, "floor of the group std in the advantage denominator (0 = none)")
    adv_eps: float = F(1e-6, "epsilon added to the advantage denominator")
    agg: str = F("seq_mean", "token aggregation of the pg/ppo/ei/kl terms: seq_mean | seq_sum | token_mean")
    loss: str = F("pg", "pg (REINFORCE + actor reward) | ppo (clipped ratio vs the sampling policy) | ei (expert "
                  "iteration)")
    ppo_epochs: int = F(1, "passes over one rollout batch (loss=ppo)")
    minibatches: int = F(1, "minibatches of whole groups per rollout and process; pg/ei accumulate them into one "
                         "optimizer step, ppo steps on each")
    clip_eps: float = F(0.2, "PPO clip range")
    dual_clip: float = F(3.0, "PPO dual-clip bound c (> 1) for negative advantages; 0 = off")
    ei_min_adv: float = F(1.0, "expert iteration keeps CoTs with standardized advantage >= this")

    def __post_init__(self):
        choices = {"kl_estimator": ("exact", "k3"), "ref_cot": ("greedy", "sampled", "none"),
                   "answer_logprob": ("mean", "sum"), "agg": ("seq_mean", "seq_sum", "token_mean"),
                   "loss": ("pg", "ppo", "ei")}
        for key, ok in choices.items():
            if getattr(self, key) not in ok:
                raise ValueError(f"rl.{key} must be one of {list(ok)}, got {getattr(self, key)!r}")
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
    schedule: str = F("constant", "learning-rate schedule after warm-up: constant | cosine")
    threads: int = F(0, "torch CPU threads per process (0: torch's default)")


@dataclass
class Config(BaseConfig):
    method: str = F("markovian", "recipe name")
    model: MarkovianModel = F(MarkovianModel, "policy model; reference = the same model with the adapter disabled")
    data: DataConfig = F(DataConfig, "task, prompt lengths")
    rl: RLConfig = F(RLConfig, "rollouts, reward, losses")
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


class NoEOS(torch.nn.Module):
    """The policy with EOS logits at -inf: sampling runs exactly max_new_tokens (the paper's min_new_tokens = K)."""

    def __init__(self, model, eos_ids):
        super().__init__()
        self.model = model
        self.eos = sorted(eos_ids)

    @property
    def config(self):
        return self.model.config

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.eos] = float("-inf")  # (B, T, V)
        return out


@dataclass
class Ctx:
    """What the helpers share: model, sampler, tokenizer, task, config, and the reference-baseline cache."""

    model: object
    sampler: NoEOS
    tok: object
    task: object
    cfg: Config
    ref_cache: dict = field(default_factory=dict)  # example id -> ln pi_ref(answer | greedy CoT_ref)

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


def sample_cots(ctx: Ctx, prompt: list[int], n: int, temperature: float, seed: int) -> list[list[int]]:
    from reasonlab.eval.generate import GenConfig, generate

    gc = GenConfig(n=n, temperature=temperature, top_p=ctx.cfg.rl.top_p, max_new_tokens=ctx.cfg.data.cot_tokens,
                   batch_size=n, seed=seed, progress=False)
    return [s.token_ids for s in generate(ctx.sampler, ctx.tok, [prompt], gc)[0]]


@torch.no_grad()
def ref_answer_logp(ctx: Ctx, e: Example, step: int, slot: int) -> float:
    """ln pi_ref(answer | CoT_ref), CoT_ref sampled from / greedy under the reference and scored by the reference."""
    rc = ctx.cfg.rl.ref_cot
    if rc == "none":
        return 0.0
    if rc == "greedy" and e.id in ctx.ref_cache:
        return ctx.ref_cache[e.id]
    with reference(ctx.model):
        temp, seed = (0.0, 0) if rc == "greedy" else (ctx.cfg.rl.temperature, M.sample_seed(ctx.cfg.seed, step, slot, 1))
        cot = sample_cots(ctx, ctx.question_ids(e), 1, temp, seed)[0]
        value = float(M.segment_logprob(ctx.model, ctx.answer_rows([e], [cot]), 3, ctx.cfg.rl.answer_logprob))
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
    """G CoTs per question (slot = the question's position in the global batch: it seeds the sampling)."""
    exs, cots, ref = [], [], []
    for slot, e in zip(slots, questions):
        p = ctx.question_ids(e)
        group = sample_cots(ctx, p, G, ctx.cfg.rl.temperature, M.sample_seed(ctx.cfg.seed, step, slot))
        r = ref_answer_logp(ctx, e, step, slot)
        exs += [e] * G
        cots += group
        ref += [r] * G
    cot_rows = M.pack_rows([(ctx.question_ids(e), c) for e, c in zip(exs, cots)], ctx.tok.pad_token_id)
    if any(len(c) != ctx.cfg.data.cot_tokens for c in cots):  # EOS is masked and there are no stop strings
        raise RuntimeError(f"a CoT is not {ctx.cfg.data.cot_tokens} tokens long")
    return Rollout(G, exs, cots, torch.tensor(cots), cot_rows, ctx.answer_rows(exs, cots), torch.tensor(ref))


def forward_terms(ctx: Ctx, ro: Rollout, rows: list[int], *, actor_grad: bool, with_ref: bool = True) -> dict:
    """Policy forwards on rollout rows `rows` (whole groups): CoT token log-probs + logits (grad), answer reward R (grad
    when actor_grad), and the reference's CoT log-probs/logits (no grad) for the KL. Shapes: lp/mask (b, K), logits
    (b, K, V), R (b,). With rl.share_prefix a group's common prompt is run once (rl.markovian.shared_prefix_logprobs)."""
    rl, K = ctx.cfg.rl, ctx.cfg.data.cot_tokens
    act = actor_grad and torch.is_grad_enabled()
    out: dict[str, list] = {"lp": [], "logits": [], "R": [], "ref_lp": [], "ref_logits": []}
    if rl.share_prefix and ro.G > 1:
        sep = torch.tensor(ctx.ids("\nAnswer:"))
        for start in range(0, len(rows), ro.G):
            g = rows[start:start + ro.G]
            e, cots = ro.exs[g[0]], ro.cot_t[g]  # (G, K)
            q = ctx.question_ids(e)
            lp, logits = M.shared_prefix_logprobs(ctx.model, q, cots, K)  # (G, K), (G, K, V)
            ans = torch.tensor(ctx.ids(" " + e.gold))
            suffix = torch.cat([cots, sep.expand(len(g), -1), ans.expand(len(g), -1)], dim=1)  # (G, K + |sep| + |ans|)
            with torch.set_grad_enabled(act):
                alp, _ = M.shared_prefix_logprobs(ctx.model, ctx.scoring_prefix_ids(e), suffix, len(ans))  # (G, |ans|)
            out["R"].append(alp.mean(-1) if rl.answer_logprob == "mean" else alp.sum(-1))
            out["lp"].append(lp)
            out["logits"].append(logits)
            if with_ref:
                with torch.no_grad(), reference(ctx.model):
                    rlp, rlogits = M.shared_prefix_logprobs(ctx.model, q, cots, K)
                out["ref_lp"].append(rlp)
                out["ref_logits"].append(rlogits)
        res = {k: torch.cat(v) for k, v in out.items() if v}
        res["mask"] = torch.ones(res["lp"].shape)  # (b, K) float, as pack_rows masks: every CoT is exactly K tokens
        return res
    cr, ar = ro.cot_rows.select(rows), ro.ans_rows.select(rows)
    _, lp, logits, mask = M.segment_logprob(ctx.model, cr, 1, return_tokens=True)  # (b, K), (b, K, V), (b, K)
    with torch.set_grad_enabled(act):
        R = M.segment_logprob(ctx.model, ar, 3, rl.answer_logprob)  # (b,)
    res = {"lp": lp, "logits": logits, "mask": mask, "R": R}
    if with_ref:
        with torch.no_grad(), reference(ctx.model):
            _, ref_lp, ref_logits, _ = M.segment_logprob(ctx.model, cr, 1, return_tokens=True)
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
        nll = -(f["lp"] * f["mask"]).sum(-1) / f["mask"].sum(-1).clamp(min=1.0)  # (b,)
        pg = (nll * keep).sum() / keep.sum().clamp(min=1.0)
        stats["ei/selected_frac"] = keep.mean()
    else:
        pg = pg_loss(f["lp"], adv, f["mask"], rl.agg)
    if rl.kl_estimator == "exact":
        kl_tok = kl_exact(f["logits"], f["ref_logits"])  # (b, K)
    else:
        kl_tok = kl_k3(f["lp"], f["ref_lp"])  # (b, K)
    kl = masked_mean(kl_tok, f["mask"], rl.agg)
    with torch.no_grad():
        stats["rollout/entropy"] = masked_mean(entropy_from_logits(f["logits"]), f["mask"], "token_mean")
    return {"pg": pg, "actor_reward": M.actor_reward_loss(a_actor), "kl": kl}, stats


def weighted(ctx: Ctx, terms: dict) -> dict[str, tuple[float, torch.Tensor]]:
    return {"pg": (1.0, terms["pg"]), "actor_reward": (ctx.cfg.rl.actor_reward_weight, terms["actor_reward"]),
            "kl": (ctx.cfg.rl.kl_coef, terms["kl"])}


@torch.no_grad()
def evaluate(ctx: Ctx, examples: list[Example], tag: str, step: int, run: Run) -> dict:
    """The paper's protocol: one sampled CoT per question, then the answer decoded greedily after the (redacted)
    prompt + CoT; every extractor recorded. Writes evals/<tag>.jsonl/.json; returns the summary."""
    from reasonlab.eval.generate import GenConfig, generate
    from reasonlab.eval.harness import summarize_records
    from reasonlab.eval.metrics import accuracy

    cfg, tok = ctx.cfg, ctx.tok
    t0 = time.time()
    prompts = [ctx.question_ids(e) for e in examples]
    cots = generate(ctx.sampler, tok, prompts, GenConfig(
        n=1, temperature=cfg.eval.cot_temperature, top_p=cfg.rl.top_p, max_new_tokens=cfg.data.cot_tokens,
        batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, progress=False))
    sep = ctx.ids("\nAnswer:")
    ctxs = [ctx.scoring_prefix_ids(e) + c[0].token_ids + sep for e, c in zip(examples, cots)]
    answers = generate(ctx.model, tok, ctxs, GenConfig(
        n=1, temperature=0.0, max_new_tokens=cfg.data.answer_tokens, stop=tuple(cfg.data.answer_stop),
        batch_size=cfg.eval.batch_size, progress=False))
    records = []
    for e, p, c, a in zip(examples, prompts, cots, answers):
        s = ctx.task.score(a[0].text, e)
        records.append({"id": e.id, "sample": 0, "prompt": tok.decode(p), "cot": c[0].text, "output": a[0].text,
                        "extracted": s.extracted, "gold": e.gold, "correct": bool(s.correct), "valid": bool(s.valid),
                        "extractor": s.extractor, "extractions": s.extractions, "correct_by": s.correct_by,
                        "finish": a[0].finish, "new_tokens": len(a[0].token_ids),
                        "answer_in_cot": M.answer_in_text(e.gold, c[0].text)})
    summary = summarize_records(records, ctx.task, "generate")
    summary["metrics"]["answer_in_cot_rate"] = accuracy(r["answer_in_cot"] for r in records).to_dict()
    summary.update({"tag": tag, "step": step, "task": ctx.task.name, "task_version": ctx.task.version,
                    "n": len(records), "protocol": "one sampled CoT, greedy answer", "cot_tokens": cfg.data.cot_tokens,
                    "cot_temperature": cfg.eval.cot_temperature, "answer_tokens": cfg.data.answer_tokens,
                    "redacted": cfg.rl.markovian, "eval_seed": cfg.eval.seed, "wall_time_s": round(time.time() - t0, 2)})
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
    from reasonlab.eval.generate import eos_ids
    from reasonlab.eval.harness import flat_metrics
    from reasonlab.rl.audit import audit_terms
    from reasonlab.runs import open_checkpoint
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    cpu0, wall0 = time.process_time(), time.time()
    dist.seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rl = cfg.rl
    # a dry run executes one rollout of 1 question x min(G, 2) CoTs (at the configured K) on the stand-in model
    G = min(rl.group_size, 2) if run.dry_run else rl.group_size
    n_q = 1 if run.dry_run else cfg.train.batch_size // G  # questions per step, global
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train, missing = load_split(task, "train", run.dry_run)
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val, _ = load_split(task, cfg.data.val_split, run.dry_run)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    stand_in = run.dry_run and not is_available_offline(cfg.model.name)
    model, tok = load_for_config(cfg.model, stand_in=stand_in)
    ctx = Ctx(model, NoEOS(model, eos_ids(model, tok)), tok, task, cfg)
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
    if n_q % dist.world_size():
        raise ConfigError(f"{n_q} questions per step (train.batch_size / rl.group_size) must divide over "
                         f"{dist.world_size()} processes")
    n_mb = 1 if run.dry_run else rl.minibatches
    if (n_q // dist.world_size()) % n_mb:
        raise ConfigError(f"{n_q // dist.world_size()} question group(s) per process do not split into "
                          f"rl.minibatches={n_mb}")
    dist.print0(f"model {cfg.model.name}{' (tiny stand-in)' if stand_in else ''}: {trainable:,} trainable / "
                f"{total:,} parameters; task {task.name}: {len(train)} train, {len(val)} validation; {n_q} question(s) "
                f"x {G} CoTs of {cfg.data.cot_tokens} tokens per step; loss {rl.loss}")

    def local_questions(step: int) -> tuple[list[int], list[Example]]:
        idx = batch_indices(step, n_q, len(train), cfg.seed)  # global batch of question indices
        slots = dist.shard(list(range(n_q)))
        return slots, [train[idx[s]] for s in slots]

    def update(step: int, audit: bool) -> dict:
        """One rollout batch -> one (pg, ei) or epochs x minibatches (ppo) optimizer steps. Returns metrics."""
        t0 = time.time()
        model.eval()
        slots, qs = local_questions(step)
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
        cache: dict[int, dict] = {}
        R_all = torch.zeros(B)
        if prepass:
            with torch.no_grad():
                for i, rows in enumerate(mbs):
                    f = forward_terms(ctx, ro, rows, actor_grad=False)
                    cache[i] = {"old_lp": f["lp"], "ref_logits": f["ref_logits"], "ref_lp": f["ref_lp"]}
                    R_all[rows] = f["R"]
            rew = R_all - ro.ref_logp  # (B,)
            if G == 1:  # standardize over the global batch
                every = torch.cat(dist.gather_object(rew))  # (B_global,)
                m, d = M.group_stats(every, every.numel(), min_std=rl.min_std, eps=rl.adv_eps)
                mean, denom = torch.full((B,), float(m[0])), torch.full((B,), float(d[0]))
            else:
                mean, denom = M.group_stats(rew, G, min_std=rl.min_std, eps=rl.adv_eps)
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
            f = forward_terms(ctx, ro, rows, actor_grad=actor_grad, with_ref=not prepass)
            if prepass:
                f.update(ref_logits=cache[i]["ref_logits"], ref_lp=cache[i]["ref_lp"])
                mb_mean, mb_denom, mb_adv = mean[rows], denom[rows], adv[rows]
            else:
                rew_mb = f["R"].detach() - ro.ref_logp[rows]
                mb_mean, mb_denom = M.group_stats(rew_mb, G, min_std=rl.min_std, eps=rl.adv_eps)
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
            (loss * scale).backward()
            for name, v in [("train/loss", loss), *[(f"train/{n}_loss", t) for n, t in terms.items()], *st.items()]:
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / len(plan)
            if rl.loss == "ppo" or k == len(plan) - 1:
                if dist.is_dist():
                    for p in params:
                        if p.grad is not None:
                            p.grad = dist.all_reduce_mean(p.grad)
                gnorms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))))
                opt.step()
                opt.zero_grad(set_to_none=True)
        sched.step()
        model.eval()
        # ---- metrics (global over processes) ----
        rew = torch.cat(dist.gather_object(R_all - ro.ref_logp))
        texts = sum(dist.gather_object([tok.decode(c, skip_special_tokens=True) for c in ro.cots]), [])
        golds = sum(dist.gather_object([e.gold for e in ro.exs]), [])
        metrics = {k: dist.all_reduce_mean(torch.tensor(v)).item() for k, v in sums.items()}
        metrics.update(group_reward_stats(rew, group_size=G if G > 1 else None))
        metrics.update(rollout_stats(texts))
        metrics.update({
            "rollout/len_tokens": float(sum(len(c) for c in ro.cots) / B),
            "rollout/answer_in_cot": sum(M.answer_in_text(g, t) for g, t in zip(golds, texts)) / len(texts),
            "train/answer_logp": dist.all_reduce_mean(R_all.mean()).item(),
            "train/answer_logp_ref": dist.all_reduce_mean(ro.ref_logp.mean()).item(),
            "train/grad_norm": sum(gnorms) / len(gnorms), "train/lr": sched.get_last_lr()[0],
            "time/rollout_s": t_roll, "time/update_s": time.time() - t0 - t_roll,
        })
        if first_ratio is not None:
            metrics["ppo/ratio_first_mean"] = dist.all_reduce_mean(torch.tensor(first_ratio)).item()
        if audit_metrics:
            metrics.update({k: dist.all_reduce_mean(torch.tensor(v)).item() for k, v in audit_metrics.items()})
        return metrics

    if run.dry_run:
        note = f" (data not available offline: {missing}; using {len(train)} stand-in examples)" if missing else ""
        t0 = time.time()
        m = update(0, audit=True)
        dist.print0(f"dry run{note}: one rollout of {n_q} question x {G} CoTs (configured: "
                    f"{cfg.train.batch_size // rl.group_size} x {rl.group_size}) -> loss {m['train/loss']:.4f} "
                    f"(pg {m['train/pg_loss']:.4f}, actor_reward {m['train/actor_reward_loss']:.4f}, kl "
                    f"{m['train/kl_loss']:.4f}); grad/term pg {m['grad/term/pg']:.3g}, actor_reward "
                    f"{m['grad/term/actor_reward']:.3g}, kl {m['grad/term/kl']:.3g}; {time.time() - t0:.1f}s; "
                    f"nothing trained")
        return {"dry_run": True, "trainable_params": trainable, "total_params": total, **m}

    watcher = Watcher(run, cfg.watch)
    record_train_ids(run, [e.id for e in train])
    start, best = 0, {"acc": -1.0, "step": -1}
    if run.resume_from is not None:
        state = run.resume_from.restore(modules={"model": model}, optimizer=opt, scheduler=sched)
        start, best = state["step"], state["best"]
        dist.print0(f"resumed from {run.resume_from.path} at step {start}")

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules={"model": model}, optimizer=opt, scheduler=sched, state={"best": best},
                            name=name)

    def eval_on(examples, tag: str, step: int, prefix: str) -> dict:
        with run.phase("eval"):
            s = evaluate(ctx, examples, tag, step, run) if dist.is_main() else None
        s = dist.gather_object(s)[0]
        a = s["metrics"]["accuracy"]
        run.log(step, {**flat_metrics(s, f"{prefix}/{task.name}"), f"{prefix}/{task.name}/acc": a["value"],
                       f"{prefix}/{task.name}/acc_lo": a["lo"], f"{prefix}/{task.name}/acc_hi": a["hi"],
                       f"{prefix}/{task.name}/n": a["n"]})
        dist.print0(f"step {step}: {tag} acc {a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] (n={a['n']}, "
                    f"{s['extractor']}); answer in CoT {s['metrics']['answer_in_cot_rate']['value']:.3f}")
        return s

    test = task.examples(cfg.data.test_split)
    test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
    run.final_eval_scale = 1.0 + len(test) / max(1, len(val))  # final = validation + test
    if start == 0 and cfg.eval.every >= 0:
        best = {"acc": eval_on(val, "val_step0", 0, "eval")["metrics"]["accuracy"]["value"], "step": 0}
        if cfg.eval.test_baseline:
            eval_on(test, "test_base_step0", 0, "test_base")
        save(0, name="best")

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
        if watcher.step(step, metrics):
            break
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            acc = eval_on(val, f"val_step{step}", step, "eval")["metrics"]["accuracy"]["value"]
            if acc > best["acc"]:
                best = {"acc": acc, "step": step}
                save(step, name="best")
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save(step)

    # ---- final: checkpoint, validation, test once on the best-on-validation checkpoint ---------------------------
    save(step)
    if run.stop_reason in ("SIGTERM", "SIGINT"):
        return {"final_step": step, "stopped": run.stop_reason}
    if step != 0 or best["step"] != 0:
        acc = eval_on(val, f"val_step{step}", step, "eval")["metrics"]["accuracy"]["value"]
        if acc > best["acc"]:
            best = {"acc": acc, "step": step}
            save(step, name="best")
    if best["step"] != step and dist.is_main():
        open_checkpoint(run.dir / "checkpoints" / "best").restore(modules={"model": model}, rng=False)
    s = eval_on(test, f"test_best_step{best['step']}", step, "test")
    result = {"final_step": step, "best_step": best["step"], "best_val_acc": best["acc"],
              "test_acc": s["metrics"]["accuracy"], "cpu_s": round(time.process_time() - cpu0, 1),
              "wall_s": round(time.time() - wall0, 1)}
    base = run.dir / "evals" / "test_base_step0.jsonl"
    if dist.is_main() and base.exists():
        from reasonlab.eval.metrics import compare_eval_files

        d = compare_eval_files(base, run.dir / "evals" / f"test_best_step{best['step']}.jsonl")
        result["test_vs_base"] = d.to_dict()
        run.log(step, {f"test/{task.name}/delta_vs_base": d.diff, f"test/{task.name}/delta_lo": d.lo,
                       f"test/{task.name}/delta_hi": d.hi, f"test/{task.name}/delta_p": d.p_value})
        dist.print0(f"test: untrained {d.mean_a:.3f} -> trained (step {best['step']}) {d.mean_b:.3f}, difference "
                    f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], paired bootstrap p = {d.p_value:.4f} (n={d.n})")
    return result  # `reasonlab run` writes report.md once the run folder says how the run ended
