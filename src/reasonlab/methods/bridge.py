"""Latent bridge: a frozen source model's hidden states -> trainable translator -> soft tokens a frozen target reads.

What is implemented (models in reasonlab/models/bridge.py; peers: LatentWire = seed 001, C2C arXiv 2510.03215,
Interlat arXiv 2511.09149):
- Source: any HF model, decoder or encoder, frozen, read at `source.layers` (concatenated or averaged). It reads the
  question (or the task's full prompt, `source.text: prompt`).
- Translator: a cross-attention resampler (K learned queries), a per-token MLP, or LatentWire's DiT (`dit`: K soft
  tokens by Euler steps of a rectified flow from seeded noise conditioned on the source, trained through the steps and
  by its own flow loss `loss.flow`); soft tokens RMS-normalized and scaled to the target's embedding RMS. Optional
  flow-matching DiT auxiliary (`dit.enabled`, weight `loss.dit`).
- KV fusion (`translator.kind: kv_fusion` + `bridge.mode: kv_fusion`, models/bridge_fusion.py, C2C-style): no soft
  tokens; the target reads its own text prompt and the source's per-layer states are fused into that prompt's keys and
  values per target layer through gates (zero-initialized projection: the plain target at the start and whenever the
  gates are 0). The source may read text the target lacks (`source.text: source_text`, half the question).
- A frozen target's few-shot prefix shared by every row runs once per run (PrefixKV), in training and evaluation.
- Target: frozen (LoRA optional, `target.lora.r`). Its prompt is the task's prompt with the question replaced by the
  soft tokens (soft_only: the target never sees the question text) or by soft tokens followed by the question
  (soft_plus_text). Curriculum: with `bridge.curriculum_steps` N, each training row shows the text with probability
  1 - step/N (soft_plus_text -> soft_only); evaluation always uses `bridge.mode`.
- Losses (each weighted, each in the gradient audit, each added exactly once): nll (answer teacher: NLL of the gold
  answer), kl (prompt teacher: KL(target reading the REAL question text || bridged target) over the first k gold
  answer tokens; the teacher is never a question-free prior — seed 001's was), align (soft tokens vs the target's
  embeddings of the question tokens: cosine of the pooled vectors, or chamfer = nearest-neighbour cosine both ways),
  infonce (symmetric InfoNCE of the pooled soft tokens vs the pooled question embeddings over the batch), separation (the gold answer must be `margin` nats/token likelier under the true source than under
  a shuffled one), dit (flow-matching loss of the DiT reconstructing the question embeddings from the soft tokens).
- Evaluation (validation before training, every `eval.every` steps, at the end; test ONCE at the end on the
  best-on-validation checkpoint), all greedy, all scored by the task's scorer, every accuracy with a Wilson 95% CI,
  on the same items: bridged; controls zero_source (the soft tokens replaced by zero vectors), shuffled_source (each
  row gets the soft tokens of another row of its batch: a derangement), target_text (the target alone on the real
  text); source alone when the source can generate. Unique-output ratio, invalid count, answer entropy, and soft-token
  statistics (encoder/pairwise_cos, encoder/cross_sample_var ...) for every eval; the copy baseline (how often the
  answer occurs in the question text: high = the controls cannot fail, detector copy_task) and paired bootstrap
  differences of bridged against every other condition (summary["paired"]).
- Compute (reasonlab.training): train.device / train.precision; under `accelerate launch` each process takes an
  equal shard of every batch and DDP averages the translator's (and a target LoRA's) gradients. The batch-contrastive
  terms (infonce, separation) and the DiT noise are computed within each process's shard, so with them on a
  multi-process run is not the one-process run of the same global batch; nll, kl and align are. Evaluation is split
  over the processes by chunks of eval.batch_size rows (the shuffled control permutes within a chunk).
- Run contract: metrics (train/*, grad/term/* via rl.audit every watch.audit_every steps, encoder/* soft-token stats,
  eval/*, time/cpu_s = process CPU seconds), evals/<split>.<task>@step_N[+control=NAME], checkpoints of the bridge
  (+ LoRA), --time-limit, SIGTERM (an evaluation stops at its next chunk, redone on resume), --dry-run (tiny stand-in
  models when the configured ones are not available offline), report.md at the end (written by `reasonlab run` after
  the run folder records how it ended). Resume is exact: besides weights, AdamW, schedule, RNG streams, the
  validation choice and the watcher's windows, a checkpoint holds the cached frozen-model eval records (target_text
  without LoRA, source alone): recomputing them would put the target's text rows back into the decode batches of the
  other conditions and change their padding.

    reasonlab run configs/bridge/minilm-to-smollm2.yaml
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from reasonlab import training
from reasonlab.config import BaseConfig, ConfigError, EvalConfig, F, TrainConfig
from reasonlab.watch import WatchConfig, Watcher, encoder_stats, record_train_ids
from reasonlab.models.bridge import (Bridge, BridgeError, DiTConfig, PrefixKV, Row, SourceConfig, TranslatorConfig,
                                     answer_logits, answer_nll, assemble, ctc_alignment, curriculum_text_prob,
                                     derangement, eval_chunks, info_nce, kl_first_k, load_source, prompt_alignment,
                                     separation, split_prefix)
from reasonlab.eval.generate import hf_config
from reasonlab.eval.metrics import accuracy
from reasonlab.models.lm import ModelConfig, count_parameters, is_available_offline, load_for_config, reference
from reasonlab.rl.audit import audit_terms
from reasonlab.runs import Run, batch_indices

SENTINEL = "\u2063BRIDGE_QUESTION\u2063"  # stands in for the question when the prompt template is split


@dataclass
class DataConfig:
    task: str = F("word-arithmetic", "task name (reasonlab data lists them)")
    task_args: dict = F({}, "constructor arguments of the task")
    style: str = F("default", "prompt style: default | cot | markovian")
    chat: bool = F(False, "wrap the target's prompt in its chat template")
    answer: str = F("{gold}", "answer text the answer teacher scores; fields: gold and the example's meta keys")
    max_answer_tokens: int = F(16, "teacher-forced answer tokens (longer answers are cut; EOS is appended)")
    n_train: int = F(0, "use the first N training examples (0: all)")
    val_split: str = F("validation", "split for periodic evals and checkpoint choice")
    test_split: str = F("test", "split evaluated once at the end, on the best-on-validation checkpoint")


MODES = ("soft_only", "soft_plus_text", "kv_fusion")
SOFT_TERMS = ("kl", "align", "infonce", "dit", "flow")  # terms of soft tokens / the text teacher: not for kv_fusion


@dataclass
class MethodConfig:
    mode: str = F("soft_only", "soft_only (the target never sees the question text) | soft_plus_text | kv_fusion "
                               "(the target reads its own text prompt; the source is fused into its keys/values: "
                               "translator.kind kv_fusion)")
    curriculum_steps: int = F(0, "soft_only: show the text with probability 1 - step/N during training (0: never)")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"bridge.mode must be {' | '.join(MODES)}, got {self.mode!r}")
        if self.curriculum_steps < 0:
            raise ValueError("bridge.curriculum_steps must be >= 0")


@dataclass
class LossConfig:
    nll: float = F(1.0, "answer teacher: NLL of the gold answer given the soft tokens")
    kl: float = F(0.0, "prompt teacher: KL(target reading the real question || bridged target)")
    kl_tokens: int = F(4, "KL over the first k gold answer tokens")
    kl_temperature: float = F(1.0, "temperature of both distributions in the KL")
    align: float = F(0.0, "prompt alignment: soft tokens vs the target's embeddings of the question tokens")
    align_mode: str = F("mean", "mean (cos of pooled vectors) | chamfer (nearest-neighbour cos, both directions) | "
                                "ctc (the soft tokens spell the question's target tokens in order; needs K >= L)")
    align_tau: float = F(0.05, "ctc alignment: temperature of the cosine logits over the target vocabulary")
    infonce: float = F(0.0, "InfoNCE between pooled soft tokens and pooled question embeddings (one term)")
    infonce_tau: float = F(0.1, "InfoNCE temperature")
    separation: float = F(0.0, "true-vs-shuffled-source separation of the gold-answer NLL")
    separation_margin: float = F(1.0, "separation margin in nats/token")
    dit: float = F(0.0, "flow-matching DiT auxiliary (needs dit.enabled)")
    flow: float = F(0.0, "translator.kind dit: its rectified-flow loss toward the question's target embeddings")

    def __post_init__(self):
        for k in ("nll", "kl", "align", "infonce", "separation", "dit", "flow"):
            if getattr(self, k) < 0:
                raise ValueError(f"loss.{k} must be >= 0")
        if self.align_mode not in ("mean", "chamfer", "ctc"):
            raise ValueError(f"loss.align_mode must be mean | chamfer | ctc, got {self.align_mode!r}")
        if self.kl_tokens < 1 or self.kl_temperature <= 0 or self.infonce_tau <= 0:
            raise ValueError("loss.kl_tokens must be >= 1 and loss.kl_temperature, loss.infonce_tau > 0")


@dataclass
class BridgeEval(EvalConfig):
    test_limit: int = F(0, "test examples in the final eval (0: all)")
    max_new_tokens: int = F(8, "greedy decoding budget per answer")
    batch_size: int = F(32, "rows per generation batch; the shuffled control permutes sources within one batch")
    stop: list[str] = F(["\n"], "stop strings: the output is cut before the first")
    source_alone: bool = F(True, "also evaluate the source alone on the text when it can generate")


@dataclass
class Config(BaseConfig):
    method: str = F("bridge", "recipe name")
    source: SourceConfig = F(SourceConfig, "frozen source model")
    target: ModelConfig = F(ModelConfig, "frozen target model (LoRA optional)")
    translator: TranslatorConfig = F(TranslatorConfig, "source states -> soft tokens")
    dit: DiTConfig = F(DiTConfig, "flow-matching DiT auxiliary")
    bridge: MethodConfig = F(MethodConfig, "soft_only | soft_plus_text and the curriculum")
    loss: LossConfig = F(LossConfig, "loss weights (each term audited)")
    data: DataConfig = F(DataConfig, "task and prompt format")
    train: TrainConfig = F(TrainConfig, "optimization and compute")
    eval: BridgeEval = F(BridgeEval, "evaluation")
    watch: WatchConfig = F(WatchConfig, "online alerts; watch.audit_every schedules the gradient audit")

    def __post_init__(self):
        if self.loss.dit > 0 and not self.dit.enabled:
            raise ValueError("loss.dit > 0 needs the DiT: set dit.enabled: true (or loss.dit: 0)")
        if (self.loss.separation > 0 or self.loss.infonce > 0) and self.train.batch_size < 2:
            raise ValueError("loss.separation and loss.infonce compare rows of a batch: train.batch_size must be >= 2")
        if self.eval.batch_size < 2:
            raise ValueError("eval.batch_size must be >= 2 (the shuffled-source control permutes within a batch)")
        fusion = self.translator.kind == "kv_fusion"
        if fusion != (self.bridge.mode == "kv_fusion"):
            raise ValueError("translator.kind kv_fusion and bridge.mode kv_fusion go together: set both (C2C-style "
                             "fusion into the target's text prompt) or neither (soft tokens)")
        if fusion and self.source.combine != "concat":
            raise ValueError("kv_fusion reads each source layer on its own: set source.combine: concat")
        if fusion and (bad := [k for k in SOFT_TERMS if getattr(self.loss, k) > 0]):
            raise ValueError(f"kv_fusion has no soft tokens and no text teacher: set loss.{bad[0]}: 0 "
                             "(it trains on loss.nll and loss.separation)")
        if self.loss.flow > 0 and self.translator.kind != "dit":
            raise ValueError("loss.flow is the DiT translator's own loss: set translator.kind: dit (or loss.flow: 0)")


# ----------------------------------------------------------------------------------------------------------------------
# prompts: the target's text prompt, and the same prompt split around the question


class Prompter:
    """Token ids of every input the recipe builds for an example (target tokenizer), cached per example id."""

    def __init__(self, task, tok, cfg: Config):
        self.task, self.tok, self.cfg = task, tok, cfg
        self.eos = tok.eos_token_id
        self._cache: dict[str, dict] = {}

    def render(self, prompt: str) -> str:
        if self.cfg.data.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return prompt

    def ids(self, text: str, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def get(self, e) -> dict:
        if e.id in self._cache:
            return self._cache[e.id]
        from dataclasses import replace

        dc = self.cfg.data
        text_prompt = self.render(self.task.prompt(e, dc.style))
        template = self.render(self.task.prompt(replace(e, question=SENTINEL), dc.style))
        if template.count(SENTINEL) != 1:
            raise BridgeError(f"task {self.task.name!r}: its prompt does not contain the question exactly once, so the "
                              "bridge cannot put soft tokens in its place; use a task whose prompt quotes the question")
        before, after = template.split(SENTINEL)
        try:
            answer = dc.answer.format(gold=e.gold, **e.meta)
        except KeyError as k:
            raise BridgeError(f"data.answer uses {k} but examples of {self.task.name!r} only have gold and "
                              f"{sorted(e.meta)}") from None
        special = not dc.chat
        entry = {
            "text": self.ids(text_prompt, special),  # the target alone / the prompt teacher read this
            "before": self.ids(before.rstrip(" "), special),
            "after": self.ids(after),
            "question": self.ids(" " + e.question),  # soft_plus_text; alignment/InfoNCE/DiT targets
            "answer": self.ids(" " + answer.strip())[: dc.max_answer_tokens] + [self.eos],
            "shown": before.rstrip(" ") + "[soft]" + after,
            "text_prompt": text_prompt,
        }
        self._cache[e.id] = entry
        return entry

    def row(self, e, soft: torch.Tensor | None, show_text: bool, answer: bool) -> Row:
        p = self.get(e)
        return Row(p["before"], soft, p["question"] if show_text else [], p["after"], p["answer"] if answer else [])

    def text_row(self, e, answer: bool) -> Row:
        p = self.get(e)
        return Row(p["text"], None, [], [], p["answer"] if answer else [])


def source_texts(e_list, task, cfg: Config) -> list[str]:
    if cfg.source.text == "question":
        return [e.question for e in e_list]
    if cfg.source.text == "source_text":
        return [e.meta["source_text"] for e in e_list]
    return [task.prompt(e, cfg.data.style) for e in e_list]


def copy_baseline(exs, task, cfg: Config) -> list[bool]:
    """Per example: can the gold answer be read off the question text alone (it occurs in what the source or the
    target reads, as a whole word, case-folded)? A task where it can (word-recall: the answer IS the question) cannot
    fail its controls in a meaningful way: bridged beating them shows vocabulary translation, not transfer."""
    import re

    out = []
    for e, src in zip(exs, source_texts(exs, task, cfg)):
        gold = str(e.gold).strip().lower()
        text = f"{e.question} {src}".lower()
        out.append(bool(gold) and re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", text) is not None)
    return out


def question_ids(prompter: Prompter, exs, device) -> torch.Tensor:
    """The question's target token ids, right-padded with 0: (B, L) (the mask comes from question_embeddings)."""
    rows = [prompter.get(e)["question"] for e in exs]
    L = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (L - len(r)) for r in rows], device=device)


def question_embeddings(embedding, prompter: Prompter, exs) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embeddings of each question's tokens: (B, L, Dt) right-padded, mask (B, L)."""
    rows = [prompter.get(e)["question"] for e in exs]
    L = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=embedding.weight.device)  # (B, L)
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=ids.device).bool()
    return embedding(ids), mask


# ----------------------------------------------------------------------------------------------------------------------
# one training batch -> weighted loss terms


def target_logits(ctx: dict, model, rows: list[Row]):
    """answer_logits of `model` on `rows`. With a frozen target (ctx["prefix_kv"] set) the prefix every row shares
    runs once per run, not once per row and step."""
    past, rows = shared_prefix(ctx, rows)
    embeds, attn, labels = assemble(ctx["target_module"].get_input_embeddings(), rows,
                                    ctx["prompter"].tok.pad_token_id or 0)  # (B, T, Dt), (B, T), (B, T)
    return answer_logits(model, embeds, attn, labels, *(past or (None, None)))


def shared_prefix(ctx: dict, rows: list[Row]) -> tuple[tuple | None, list[Row]]:
    """((cache, mask (B, P)) of the prefix all rows share, the rows without it) with a frozen target; (None, rows)
    otherwise or when the rows share nothing."""
    if ctx.get("prefix_kv") is None:
        return None, rows
    pre, rest = split_prefix(rows)
    if not pre:
        return None, rows
    dev = ctx["target_module"].get_input_embeddings().weight.device
    return (ctx["prefix_kv"].cache(ctx["target_module"], pre, len(rows)),
            torch.ones(len(rows), len(pre), dtype=torch.long, device=dev)), rest


def loss_terms(ctx: dict, exs, step: int, gen: torch.Generator, rows_of: slice | None = None) -> tuple[dict, dict]:
    """{name: (weight, scalar loss)} for every term with a non-zero weight, and batch info (soft tokens, nll).
    The total loss is sum(w * L) over this dict: each term is counted exactly once. `rows_of`: the slice of the global
    batch `exs` is (a process's shard), so the curriculum's per-row draws are those of the one-process run."""
    cfg, source, bridge, target, prompter = ctx["cfg"], ctx["source"], ctx["bridge"], ctx["target"], ctx["prompter"]
    lw = cfg.loss
    emb = ctx["target_module"].get_input_embeddings()
    B = len(exs)
    states, smask = source.encode(source_texts(exs, ctx["task"], cfg))  # (B, S, Ds), (B, S)
    if cfg.bridge.mode == "kv_fusion":
        return fusion_terms(ctx, exs, states, smask, gen)
    # draws from gen in a fixed order: curriculum, derangement, then the DiT's (t, x0) inside the bridge's forward
    p_text = curriculum_text_prob(step, cfg.bridge.mode, cfg.bridge.curriculum_steps)
    draws = torch.rand(cfg.train.batch_size if rows_of is not None else B, generator=gen)  # (B_global,)
    show = (draws[rows_of if rows_of is not None else slice(None)] < p_text).tolist()
    perm = derangement(B, gen).tolist() if lw.separation > 0 else None
    q_emb = q_mask = None
    if lw.align > 0 or lw.infonce > 0 or lw.dit > 0 or lw.flow > 0:
        with torch.no_grad():
            q_emb, q_mask = question_embeddings(emb, prompter, exs)  # (B, L, Dt), (B, L)
    # one forward of the (DDP-wrapped) bridge gives the soft tokens and every term that reads its parameters
    soft, soft_mask, aux = bridge(states, smask, dit_target=(q_emb, q_mask) if lw.dit > 0 else None,
                                  flow_target=(q_emb, q_mask) if lw.flow > 0 else None,
                                  generator=gen, with_aux=True)  # (B, K, Dt), (B, K)
    rows = [prompter.row(e, soft[i][soft_mask[i]], show[i], answer=True) for i, e in enumerate(exs)]
    if perm is not None:  # the same rows with another row's soft tokens, in the same forward
        rows += [prompter.row(e, soft[perm[i]][soft_mask[perm[i]]], show[i], answer=True) for i, e in enumerate(exs)]
    logits, tgt, amask = target_logits(ctx, target, rows)  # (B', A, V), (B', A), (B', A); B' = B or 2B
    nll_all = answer_nll(logits, tgt, amask)  # (B',)
    nll = nll_all[:B]
    terms: dict[str, tuple[float, torch.Tensor]] = {}
    if lw.nll > 0:
        terms["nll"] = (lw.nll, nll.mean())
    if lw.kl > 0:  # the teacher reads the REAL question text (never a question-free prior)
        with torch.no_grad():
            t_rows = [prompter.text_row(e, answer=True) for e in exs]
            tm = ctx["target_module"]
            if hasattr(tm, "disable_adapter"):
                with reference(tm):
                    t_logits, _, _ = target_logits(ctx, tm, t_rows)
            else:
                t_logits, _, _ = target_logits(ctx, tm, t_rows)
        terms["kl"] = (lw.kl, kl_first_k(logits[:B], t_logits, amask[:B], lw.kl_tokens, lw.kl_temperature))
    if lw.align > 0 and lw.align_mode == "ctc":
        q_ids = question_ids(prompter, exs, soft.device)
        terms["align"] = (lw.align, ctc_alignment(soft, soft_mask, q_ids, q_mask, emb.weight, aux["blank"],
                                                  lw.align_tau))
    elif lw.align > 0:
        terms["align"] = (lw.align, prompt_alignment(soft, soft_mask, q_emb, q_mask, lw.align_mode))
    if lw.infonce > 0:
        terms["infonce"] = (lw.infonce, info_nce(soft, soft_mask, q_emb, q_mask, lw.infonce_tau))
    if lw.dit > 0:
        terms["dit"] = (lw.dit, aux["dit"])
    if lw.flow > 0:
        terms["flow"] = (lw.flow, aux["flow"])
    if lw.separation > 0:
        terms["separation"] = (lw.separation, separation(nll, nll_all[B:], lw.separation_margin))
    info = {"soft": soft.detach(), "nll": nll.detach(), "nll_shuffled": nll_all[B:].detach() if perm else None,
            "p_text": p_text, "shown_text": sum(show) / B}
    return terms, info


def fused_forward(ctx: dict, exs, variants: list[torch.Tensor], smask: torch.Tensor):
    """KV fusion: the frozen target prefills its text prompts once; each source variant (B, S, Ds) is fused into a
    copy of the prompt's keys/values in ONE bridge call (under DDP the bridge runs once per step). -> (cache of
    len(variants) * B rows, its mask, the prompts' held-back last tokens repeated)."""
    from reasonlab.models.bridge_fusion import own_kv, prefill, rebuild

    tm, prompter = ctx["target_module"], ctx["prompter"]
    n = len(variants)
    cache, pmask, P, last = prefill(tm, ctx.get("prefix_kv"), [prompter.get(e)["text"] for e in exs],
                                    prompter.tok.pad_token_id or 0)
    kv = [(k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)) for k, v in own_kv(cache, P)]  # (n*B, Hkv, L, d)
    fused = ctx["bridge"](torch.cat(variants), smask.repeat(n, 1), kv=kv)  # the same shapes, source mixed in
    prefix = [(layer.keys[:, :, :P].repeat(n, 1, 1, 1), layer.values[:, :, :P].repeat(n, 1, 1, 1))
              for layer in cache.layers]  # (n*B, Hkv, P, d): the shared few-shot block, unfused
    return rebuild(tm, prefix, fused), pmask.repeat(n, 1), last.repeat(n)


def fusion_terms(ctx: dict, exs, states, smask, gen) -> tuple[dict, dict]:
    """nll of the gold answer with the source fused into the target's prompt (+ the separation term: the same with
    another row's source, in the same forward)."""
    cfg, prompter = ctx["cfg"], ctx["prompter"]
    lw, B = cfg.loss, len(exs)
    perm = derangement(B, gen).tolist() if lw.separation > 0 else None
    variants = [states] + ([states[perm]] if perm else [])
    cache, pmask, last = fused_forward(ctx, exs, variants, smask)
    rows = [Row([int(last[i])], None, [], [], prompter.get(exs[i % B])["answer"]) for i in range(len(last))]
    embeds, attn, labels = assemble(ctx["target_module"].get_input_embeddings(), rows, prompter.tok.pad_token_id or 0)
    logits, tgt, amask = answer_logits(ctx["target"], embeds, attn, labels, cache, pmask)
    nll_all = answer_nll(logits, tgt, amask)  # (n*B,)
    nll = nll_all[:B]
    terms = {}
    if lw.nll > 0:
        terms["nll"] = (lw.nll, nll.mean())
    if lw.separation > 0:
        terms["separation"] = (lw.separation, separation(nll, nll_all[B:], lw.separation_margin))
    gates = torch.tanh(ctx["bridge_module"].translator.gate.detach())  # (n_fused, 2)
    info = {"soft": None, "nll": nll.detach(), "nll_shuffled": nll_all[B:].detach() if perm else None,
            "p_text": 1.0, "shown_text": 1.0, "gates": gates}
    return terms, info


def total_loss(terms: dict) -> torch.Tensor:
    return sum(w * v for w, v in terms.values())


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: bridged + controls on the same items


def decode_rows(ctx: dict, rows: list[Row]) -> list[str]:
    """Greedy answers of the target from each row's embeddings (the own decode loop, reasonlab.eval.generate), cut at
    eval.stop."""
    from reasonlab.eval.generate import GenConfig, generate_from_embeds

    cfg, target, prompter = ctx["cfg"], ctx["target_module"], ctx["prompter"]
    gc = GenConfig(max_new_tokens=cfg.eval.max_new_tokens, stop=tuple(s for s in cfg.eval.stop if s), progress=False)
    texts = []
    for i in range(0, len(rows), cfg.eval.batch_size):
        past, part = shared_prefix(ctx, rows[i:i + cfg.eval.batch_size])  # the shared few-shot block runs once
        embeds, attn, _ = assemble(target.get_input_embeddings(), part, prompter.tok.pad_token_id or 0)
        texts += [smp.text for smp in generate_from_embeds(target, prompter.tok, embeds, attn, gc, past=past)]
    return texts


def score_records(task, exs, outputs: list[str], prompts: list[str], extra: list[dict] | None = None) -> list[dict]:
    from reasonlab.eval.harness import score_record

    return [score_record(task, e, out, prompt=p, **(extra[i] if extra else {}))
            for i, (e, out, p) in enumerate(zip(exs, outputs, prompts))]


def summarize(records: list[dict], task) -> dict:
    """The shared eval metrics (reasonlab.eval.harness) plus two descriptive counts of the bridged outputs."""
    from reasonlab.eval.harness import summarize_records

    m = summarize_records(records, task)["metrics"]
    outs = [r["output"] for r in records]
    m["invalid_count"] = sum(not r["valid"] for r in records)
    m["unique_output_ratio"] = {"value": len(set(outs)) / max(1, len(outs)), "n": len(outs), "lo": None, "hi": None,
                                "method": "none"}  # distinct outputs / outputs (descriptive)
    return m


@torch.no_grad()
def evaluate(ctx: dict, exs, split: str, step: int, final: bool, cache: dict) -> dict:
    """Bridged, zero_source, shuffled_source and target_text (and source alone) on the same `exs`; writes one eval
    file each and returns {condition: summary}. `cache` keeps frozen-model results (target_text without LoRA, source
    alone) per split so they are computed once. Chunks of eval.batch_size rows are split over the processes."""
    cfg, task, source, prompter, run = ctx["cfg"], ctx["task"], ctx["source"], ctx["prompter"], ctx["run"]
    bridge = ctx["bridge_module"]
    bridge.eval()
    show = cfg.bridge.mode == "soft_plus_text"
    spans = eval_chunks(len(exs), cfg.eval.batch_size)

    def run_chunks(part: list[tuple[int, int]], offset: int) -> list[dict]:
        """Every condition's rows of each chunk, decoded. One result per chunk."""
        out = []
        for c, (a, b) in enumerate(part, start=offset):
            training.check_stop(getattr(run, "signalled", None))  # SIGTERM: stop before the next chunk
            chunk = exs[a:b]
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * 104_729 + c)  # per chunk: any sharding
            states, smask = source.encode(source_texts(chunk, task, cfg))
            perm = derangement(len(chunk), gen).tolist()  # row i reads row perm[i]'s source
            if cfg.bridge.mode == "kv_fusion":
                out.append(fusion_chunk(ctx, chunk, states, smask, perm, split, cache))
                continue
            soft, soft_mask = bridge(states, smask, generator=gen)  # (b, K, Dt), (b, K)
            rows = {"bridged": [], "zero_source": [], "shuffled_source": []}
            for i, e in enumerate(chunk):
                rows["bridged"].append(prompter.row(e, soft[i][soft_mask[i]], show, answer=False))
                rows["zero_source"].append(prompter.row(e, torch.zeros_like(soft[i][soft_mask[i]]), show, answer=False))
                rows["shuffled_source"].append(prompter.row(e, soft[perm[i]][soft_mask[perm[i]]], show, answer=False))
            if not (cfg.target.lora.r == 0 and ("target_text", split) in cache):
                rows["target_text"] = [prompter.text_row(e, answer=False) for e in chunk]
            texts = decode_rows(ctx, [r for rs in rows.values() for r in rs])
            outs = {k: texts[j * len(chunk):(j + 1) * len(chunk)] for j, k in enumerate(rows)}
            out.append({"outputs": outs, "src_of": [chunk[j].id for j in perm], "soft": soft.cpu()})
        return out

    with training.autocast_of(ctx.get("compute")):
        parts = training.sharded(ctx.get("compute"), spans, run_chunks)
    outputs = {k: sum((p["outputs"][k] for p in parts), []) for k in parts[0]["outputs"]}
    src_of = sum((p["src_of"] for p in parts), [])
    softs = [p["soft"] for p in parts if p["soft"] is not None]
    bridge.train()

    frozen_text = cfg.target.lora.r == 0
    shown = [prompter.get(e)["text_prompt" if cfg.bridge.mode == "kv_fusion" else "shown"] for e in exs]
    recs = {"bridged": score_records(task, exs, outputs["bridged"], shown),
            "zero_source": score_records(task, exs, outputs["zero_source"], shown,
                                         [{"soft": "zeros"} for _ in exs]),
            "shuffled_source": score_records(task, exs, outputs["shuffled_source"], shown,
                                             [{"source_id": s} for s in src_of])}
    if "target_text" in outputs:
        recs["target_text"] = score_records(task, exs, outputs["target_text"],
                                            [prompter.get(e)["text_prompt"] for e in exs])
        if frozen_text:
            cache[("target_text", split)] = recs["target_text"]
    else:
        recs["target_text"] = cache[("target_text", split)]
    if cfg.eval.source_alone and source.can_generate:
        if ("source", split) not in cache:
            with training.autocast_of(ctx.get("compute")):
                cache[("source", split)] = training.sharded(ctx.get("compute"), exs,
                                                            lambda part, _: source_alone(ctx, part,
                                                                                         getattr(run, "signalled",
                                                                                                 None)))
        recs["source_alone"] = cache[("source", split)]

    split_name = "val" if split == cfg.data.val_split else ("test" if split == cfg.data.test_split else split)
    base = f"{split_name}.{task.name}@{'final' if final else f'step_{step}'}"
    soft_stats = encoder_stats(torch.cat(softs)) if len(exs) >= 2 and softs else {}
    copy = copy_baseline(exs, task, cfg)
    for r, c in zip(recs["bridged"], copy):
        r["answer_in_question"] = c
    common = {"split": split_name, "step": step, "final": final, "task": task.name, "task_version": task.version,
              "mode": cfg.bridge.mode, "decoding": "greedy", "max_new_tokens": cfg.eval.max_new_tokens,
              "source": cfg.source.name, "target": cfg.target.name}
    paired = paired_vs_conditions(recs)
    out = {}
    for cond, rs in recs.items():
        summary = {**common, "tag": base, "condition": cond, "metrics": summarize(rs, task)}
        if cond == "bridged":
            tag = base
            summary["soft_tokens"] = soft_stats
            # how often the answer can be read off the question alone: high = the controls cannot fail here
            summary["metrics"]["copy_baseline"] = accuracy(copy).to_dict()
            summary["paired"] = paired  # bridged - each other condition on the same items (paired bootstrap)
            if cfg.bridge.mode == "kv_fusion":
                g = torch.tanh(bridge.translator.gate.detach()).abs()  # (n_fused, 2)
                summary["fusion"] = {"layers": bridge.translator.layers, "gate_k": g[:, 0].tolist(),
                                     "gate_v": g[:, 1].tolist()}
        elif cond == "source_alone":
            tag = f"{split_name}.{task.name}.source@{'final' if final else f'step_{step}'}"
            summary.update(tag=tag, role="source_alone", note="the source model alone on the text; not a control")
        else:  # control naming per diagnostics/runfolder.py: "<base>+control=<name>", summary control + base
            tag = f"{base}+control={cond}"
            summary.update(tag=tag, control=cond, base=base)
            if cond == "shuffled_source":
                summary["note"] = "each row read the soft tokens of another row of its eval batch (source_id)"
            if cond == "zero_source":
                summary["note"] = "soft tokens replaced by zero vectors"
        run.write_eval(tag, rs, summary)
        out[cond] = summary
    out["soft_stats"] = soft_stats
    return out


def fusion_chunk(ctx: dict, chunk, states, smask, perm: list[int], split: str, cache: dict) -> dict:
    """KV fusion's eval rows of one chunk: bridged (its own source fused in), zero_source (zero source states),
    shuffled_source (another row's), decoded greedily from the fused caches in one batch; target_text (the plain
    target on the same text prompt) through the soft-token path's text rows."""
    from reasonlab.eval.generate import GenConfig, generate_from_embeds

    cfg, target, prompter = ctx["cfg"], ctx["target_module"], ctx["prompter"]
    b = len(chunk)
    cache, pmask, last = fused_forward(ctx, chunk, [states, torch.zeros_like(states), states[perm]], smask)
    embeds = target.get_input_embeddings()(last)[:, None]  # (3b, 1, Dt): each prompt's held-back last token
    gc = GenConfig(max_new_tokens=cfg.eval.max_new_tokens, stop=tuple(x for x in cfg.eval.stop if x), progress=False)
    texts = [smp.text for smp in generate_from_embeds(target, prompter.tok, embeds, torch.ones_like(last)[:, None],
                                                      gc, past=(cache, pmask))]
    outs = {"bridged": texts[:b], "zero_source": texts[b:2 * b], "shuffled_source": texts[2 * b:]}
    if not (cfg.target.lora.r == 0 and ("target_text", split) in cache):
        outs["target_text"] = decode_rows(ctx, [prompter.text_row(e, answer=False) for e in chunk])
    return {"outputs": outs, "src_of": [chunk[j].id for j in perm], "soft": None}


def paired_vs_conditions(recs: dict) -> dict:
    """{condition: bridged minus that condition's accuracy, paired over the same items} (eval.metrics
    paired_bootstrap: diff, 95% CI, two-sided p, n)."""
    from reasonlab.eval.metrics import paired_bootstrap

    def scores(rs):
        return {r["id"]: float(r["correct"]) for r in rs}

    ours = scores(recs["bridged"])
    return {c: paired_bootstrap(scores(rs), ours).to_dict() for c, rs in recs.items() if c != "bridged"}


def source_alone(ctx: dict, exs, stop=None) -> list[dict]:
    """The source model answering the task prompt itself (greedy, same budget and stop strings)."""
    from reasonlab.eval.generate import GenConfig, OwnSampler, encode

    from dataclasses import replace

    cfg, task, source = ctx["cfg"], ctx["task"], ctx["source"]
    if cfg.source.text == "source_text":  # the source alone has only its part of the question
        exs = [replace(e, question=e.meta["source_text"]) for e in exs]
    prompts = [task.prompt(e, cfg.data.style) for e in exs]
    gc = GenConfig(max_new_tokens=cfg.eval.max_new_tokens, stop=tuple(cfg.eval.stop), batch_size=cfg.eval.batch_size,
                   progress=False)
    samples = training.generate_checked(OwnSampler(source.model, source.tok), encode(source.tok, prompts, False), gc,
                                        stop=stop)
    return score_records(task, exs, [s[0].text for s in samples], prompts)


def eval_metrics(res: dict, prefix: str) -> dict:
    m = {}
    for cond, s in res.items():
        if cond == "soft_stats":
            m.update(s)
            continue
        acc = s["metrics"]["accuracy"]
        p = prefix if cond == "bridged" else f"{prefix}/{cond}"
        m.update({f"{p}/acc": acc["value"], f"{p}/acc_lo": acc["lo"], f"{p}/acc_hi": acc["hi"], f"{p}/n": acc["n"],
                  f"{p}/invalid_count": s["metrics"]["invalid_count"],
                  f"{p}/unique_output_ratio": s["metrics"]["unique_output_ratio"]["value"]})
    return m


def fmt(res: dict) -> str:
    parts = []
    for cond in ("bridged", "zero_source", "shuffled_source", "target_text", "source_alone"):
        if cond in res:
            a = res[cond]["metrics"]["accuracy"]
            parts.append(f"{cond} {a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]")
    n = res["bridged"]["metrics"]["accuracy"]["n"]
    uo = res["bridged"]["metrics"]["unique_output_ratio"]["value"]
    return f"{'; '.join(parts)} (n={n}); bridged unique outputs {uo:.2f}"


# ----------------------------------------------------------------------------------------------------------------------


def main(cfg: Config, run: Run) -> dict:
    from reasonlab.tasks import get_task

    # ---- setup ---------------------------------------------------------------------------------------------------
    cpu0, wall0 = time.process_time(), time.time()
    compute = training.setup(cfg.train, run)
    training.seed_everything(cfg.seed)
    if cfg.train.batch_size % compute.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must divide over {compute.world_size} processes")
    task = get_task(cfg.data.task, **cfg.data.task_args)
    train = task.examples("train")
    train = train[: cfg.data.n_train] if cfg.data.n_train else train
    val = task.examples(cfg.data.val_split)
    val = val[: cfg.eval.limit] if cfg.eval.limit else val
    if cfg.source.text == "source_text" and not all("source_text" in e.meta for e in train[:1] + val[:1]):
        raise ConfigError(f"source.text: source_text needs examples with meta['source_text'] and {task.name!r} has "
                          "none; use a task that splits its question (number-words split_question: true) or "
                          "source.text: question")
    src_stand_in = run.dry_run and not is_available_offline(cfg.source.name)
    tgt_stand_in = run.dry_run and not is_available_offline(cfg.target.name)
    device = compute.device
    source = load_source(cfg.source, device=device, stand_in=src_stand_in)
    target_module, tok = load_for_config(cfg.target, device=device, stand_in=tgt_stand_in)
    for n, p in target_module.named_parameters():  # frozen; with LoRA only the adapter trains
        p.requires_grad_("lora_" in n)
    target_module.eval()  # no dropout in the frozen target
    torch.manual_seed(cfg.seed)  # the bridge's init does not depend on what loading consumed
    bridge_module = Bridge(source.dim, target_module.get_input_embeddings().weight, cfg.translator, cfg.dit,
                           ctc_blank=cfg.loss.align > 0 and cfg.loss.align_mode == "ctc",
                           target_config=hf_config(target_module), source_layers=len(source.cfg.layers)).to(device)
    prompter = Prompter(task, tok, cfg)
    params = [p for p in bridge_module.parameters() if p.requires_grad] + \
             [p for p in target_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = training.lr_schedule(opt, cfg.train)
    # the translator (and a target LoRA) under DDP; find_unused: a DiT or CTC blank with weight 0 gets no gradient
    bridge, target, opt = compute.prepare(bridge_module, target_module, opt, find_unused=True)
    ctx = {"cfg": cfg, "task": task, "source": source, "target": target, "target_module": target_module,
           "bridge": bridge, "bridge_module": bridge_module, "prompter": prompter, "run": run, "compute": compute,
           "prefix_kv": PrefixKV() if cfg.target.lora.r == 0 else None}  # a trained target recomputes its prefix

    def step_gen(step: int) -> torch.Generator:  # curriculum draws, shuffles, DiT noise: a function of (seed, step)
        return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)

    n_bridge = sum(p.numel() for p in bridge_module.parameters())
    t_train, t_total = count_parameters(target_module)
    training.print0(f"source {cfg.source.name}{' (tiny stand-in)' if src_stand_in else ''} (dim {source.dim}, "
                    f"layers {source.cfg.layers}); target {cfg.target.name}{' (tiny stand-in)' if tgt_stand_in else ''}"
                    f" ({t_train:,} trainable / {t_total:,}); bridge {cfg.translator.kind} {n_bridge:,} parameters; "
                    f"task {task.name}: {len(train)} train, {len(val)} validation; mode {cfg.bridge.mode}; generation "
                    f"backend own (decoding from soft-token embeddings)")

    def batch_for(step: int) -> tuple[list, slice]:
        """This process's shard of the step's global batch, and where it sits in it."""
        idx = batch_indices(step, cfg.train.batch_size, len(train), cfg.seed)
        k = cfg.train.batch_size // compute.world_size
        rows = slice(compute.rank * k, (compute.rank + 1) * k)
        return [train[i] for i in idx[rows]], rows

    if run.dry_run:  # two examples (the fewest the shuffled/contrastive terms need): a laptop check, not a benchmark
        exs = batch_for(0)[0][:2]
        with compute.autocast():
            terms, info = loss_terms(ctx, exs, 0, step_gen(0))
        audit = audit_terms(terms, params)
        loss = float(total_loss(terms).detach())
        shown = prompter.get(exs[0])["shown"]
        what = "fused layers" if info["soft"] is None else "soft tokens"
        shape = tuple(info["gates"].shape) if info["soft"] is None else tuple(info["soft"].shape)
        training.print0(f"dry run: {what} {shape}, loss {loss:.4f}\n{audit.table()}\n"
                        f"bridged prompt (end): {('...' if len(shown) > 300 else '') + shown[-300:]!r}\n"
                        "nothing trained")
        return {"dry_run": True, "bridge_params": n_bridge, "loss": loss, **compute.describe(), "backend": "own",
                "terms": {k: float(v.detach()) for k, (_, v) in terms.items()}}

    record_train_ids(run, [e.id for e in train])
    watcher = Watcher(run, cfg.watch)
    modules = {"bridge": bridge_module} | ({"target": target_module} if cfg.target.lora.r > 0 else {})
    start, best, state = training.resume(run, "accuracy", modules=modules, optimizer=opt, scheduler=sched,
                                         watcher=watcher)
    cache: dict = {(c, s): recs for c, s, recs in state.get("eval_cache", [])}  # frozen-model eval records

    def save(step: int, name: str | None = None):
        run.save_checkpoint(step, modules=modules, optimizer=opt, scheduler=sched, name=name,
                            state={"best": best.state(), "selected_on": "val", "metric": f"eval/{task.name}/acc",
                                   "watcher": training.watcher_state(watcher),
                                   "eval_cache": [[c, s, recs] for (c, s), recs in cache.items()]})

    def validate(step: int) -> float:
        with run.phase("eval"):
            res = evaluate(ctx, val, cfg.data.val_split, step, False, cache)
        run.log(step, {**eval_metrics(res, f"eval/{task.name}"), "time/cpu_s": time.process_time() - cpu0})
        training.print0(f"step {step}: validation {fmt(res)}")
        return res["bridged"]["metrics"]["accuracy"]["value"]

    def offer(step: int) -> None:
        best.offer(step, validate(step), save)

    n_test = cfg.eval.test_limit or len(task.examples(cfg.data.test_split))
    run.final_eval_scale = 1.0 + n_test / max(1, len(val))
    if training.evals_pending(run, start):
        training.evals_at(run, start, cfg.train, cfg.eval.every, offer, save)

    # ---- train ---------------------------------------------------------------------------------------------------
    step, t_last = start, time.time()
    bridge.train()
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        exs, rows_of = batch_for(step)
        with compute.autocast():
            terms, info = loss_terms(ctx, exs, step, step_gen(step), rows_of)
        metrics = {}
        if cfg.watch.audit_every and step % cfg.watch.audit_every == 0:  # each weighted term's gradient alone
            metrics.update({k: compute.mean(v) for k, v in audit_terms(terms, params).metrics().items()})
        loss = total_loss(terms)
        compute.backward(loss)
        gnorm = compute.clip_grad_norm(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.train.log_every == 0 or step == 1:
            now = time.time()
            if info["soft"] is not None:
                soft = torch.cat(compute.gather(info["soft"].float().cpu()))  # (B_global, K, Dt)
                metrics.update(encoder_stats(soft))
            else:  # kv_fusion: how open the gates are (|tanh g| over the fused layers)
                metrics.update({"train/gate_k": float(info["gates"][:, 0].abs().mean()),
                                "train/gate_v": float(info["gates"][:, 1].abs().mean())})
            metrics.update({"train/loss": compute.mean(loss.detach()), "train/grad_norm": gnorm,
                            "train/lr": sched.get_last_lr()[0], "train/p_text": info["p_text"],
                            "train/nll": compute.mean(info["nll"].mean()), "time/step_s": (now - t_last),
                            "time/cpu_s": time.process_time() - cpu0, "time/wall_s": now - wall0,
                            **{f"train/term/{k}": compute.mean(v.detach()) for k, (_, v) in terms.items()}})
            if info["nll_shuffled"] is not None:
                metrics["train/nll_shuffled"] = compute.mean(info["nll_shuffled"].mean())
        t_last = time.time()
        training.progress(run, step, cfg.train.steps, {"train/loss": loss.detach(), **metrics})
        if metrics:
            run.log(step, metrics)
            if watcher.step(step, metrics):
                break
        training.evals_at(run, step, cfg.train, cfg.eval.every, offer, save)

    # ---- final: validation, then test once on the best-on-validation checkpoint ----------------------------------
    def test_once(best_step: int) -> dict:
        test = task.examples(cfg.data.test_split)
        test = test[: cfg.eval.test_limit] if cfg.eval.test_limit else test
        with run.phase("eval"):
            return evaluate(ctx, test, cfg.data.test_split, best_step, True, cache)

    res = training.final_eval(run, step, best, modules=modules, validate=validate, save=save, test=test_once)
    if res is None:
        return {"final_step": step, "stopped": run.stop_reason}
    cpu = time.process_time() - cpu0
    run.log(step, {**eval_metrics(res, f"test/{task.name}"), "time/cpu_s": cpu, "time/wall_s": time.time() - wall0})
    paired = res["bridged"]["paired"]
    training.print0(f"test (checkpoint chosen on validation, step {best.step}): {fmt(res)}; "
                    f"process CPU {cpu / 60:.1f} min\npaired, bridged minus: " + "; ".join(
                        f"{c} {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] p={d['p_value']:.4f}"
                        for c, d in paired.items()))
    # `reasonlab run` writes report.md once the run folder says how the run ended
    return {"final_step": step, "best_step": best.step, "best_val_acc": best.value, "cpu_s": round(cpu, 1),
            "test": {c: res[c]["metrics"]["accuracy"] for c in res if c != "soft_stats"},
            "test_unique_output_ratio": res["bridged"]["metrics"]["unique_output_ratio"]["value"],
            "test_copy_baseline": res["bridged"]["metrics"]["copy_baseline"]["value"],
            "test_paired": {c: {k: d[k] for k in ("diff", "lo", "hi", "p_value", "n")} for c, d in paired.items()},
            "ranks": compute.gather(compute.rank)}
