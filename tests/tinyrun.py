"""Tiny real training loops that write run folders through reasonlab.runs.Run (the recipe contract): each is healthy
or carries ONE bug a real recipe could have. What the detectors see is what training did with the bug (a loss term
with no gradient, a PPO ratio that drifts, a constant output, a frozen module that moves), never a number written
into the folder by hand. Each loop takes well under a second or two on one CPU thread.

    from tinyrun import classifier_run
    run_dir = classifier_run(tmp_path, "zero-grad", extra_term="float_diversity")

Loops: classifier_run (loss terms, leakage, eval power and schedule, pass@k ceiling, killed/crashed runs),
lora_kl_run (a LoRA policy whose KL is exactly 0 at its reference point; float and identically-zero terms),
ppo_run, repetition_run, bridge_run (controls), freeze_run, memorize_run, grid_run (TRM-style per-task pass@k: task
subsets, evaluation demonstrations in training). Used by test_detectors.py and test_report.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn

from reasonlab.config import BaseConfig, EvalConfig, F, TrackingConfig, TrainConfig
from reasonlab.watch import (WatchConfig, Watcher, encoder_stats, group_reward_stats, record_train_ids,
                                         rollout_stats)
from reasonlab.eval.metrics import accuracy, mean_metric, pass_at_k_metric
from reasonlab.rl.audit import audit_terms
from reasonlab.runs import Run, open_checkpoint

HERE = Path(__file__).resolve().parent
DIM, CLASSES = 16, 8


@dataclass
class QuietTracking(TrackingConfig):
    tensorboard: bool = F(False, "metrics.jsonl only (no TensorBoard files in tests)")


@dataclass
class TinyConfig(BaseConfig):
    method: str = F("tiny", "test recipes in tests/tinyrun.py")
    recipe: str = F("classifier", "which tiny loop")
    variant: dict = F({}, "this run's switches (the seeded bug, or none)")
    tracking: QuietTracking = F(QuietTracking, "metrics.jsonl only")
    watch: WatchConfig = F(WatchConfig, "online alerts and auto-stop")


@contextlib.contextmanager
def one_thread():
    """Tiny ops are slower with 2 threads on a shared 2-core machine (spin-waiting); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def open_run(root: Path, name: str, recipe: str, steps: int, lr: float, stop_on=("nan",), watch: dict | None = None,
             method: str = "tiny", eval_every: int = 0, **variant) -> Run:
    """A Run whose config.yaml holds this loop's switches; `watch` = extra watch: settings (thresholds too); `method`
    = the recipe the detectors should judge it as (e.g. "bridge": its evals need controls)."""
    cfg = TinyConfig(method=method, recipe=recipe, variant=variant, eval=EvalConfig(every=eval_every),
                     train=TrainConfig(steps=steps, lr=lr, keep_checkpoints=5),
                     watch=WatchConfig(**{"stop_on": list(stop_on), "audit_every": 10, "patience": 2, **(watch or {})}))
    argv = ["reasonlab", "run", f"tests/tinyrun.py:{recipe}", *[f"variant.{k}={v}" for k, v in variant.items()]]
    return Run(cfg, Path(root) / name, command=argv, install_signals=False)


def teacher(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """x ~ N(0, I_16), y = argmax(x W) for one fixed random W (8 classes); ids '<split>/<i>'. Same data every call."""
    w = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split]))
    return x, (x @ w).argmax(1), [f"{split}/{i}" for i in range(n)]


def write_eval(run: Run, tag: str, ids, preds, golds, *, split: str, step: int, final: bool = False,
               texts=None, denominator: int | None = None, **extra) -> dict:
    """evals/<tag>.jsonl + .json per the run-folder contract; `denominator` reproduces an evaluator that divides a
    subset's correct count by the full split size (TRM's subset bug)."""
    preds, golds = [None if p is None else int(p) for p in preds], [int(g) for g in golds]
    correct = [p == g for p, g in zip(preds, golds)]
    texts = texts or [f"The answer is {p}." for p in preds]
    records = [{"id": i, "prompt": f"question {i}", "output": t, "extracted": None if p is None else str(p),
                "gold": str(g), "correct": c, "valid": p is not None, "extractor": "argmax@1"}
               for i, t, p, g, c in zip(ids, texts, preds, golds, correct)]
    acc = accuracy(correct).to_dict()
    if denominator:
        acc = {**acc, "value": sum(correct) / denominator, "n": denominator}
    run.write_eval(tag, records, {"split": split, "step": step, "final": final, "task": "teacher",
                                  "metrics": {"acc": acc}, **extra})
    return acc


# ---------------------------------------------------------------------------------------------------------------------


def classifier_run(root: Path, name: str = "healthy", *, steps: int = 60, lr: float = 0.2,
                   extra_term: str = "entropy", leak: int = 0, n_test: int = 500, test_subset: int = 0,
                   select_on: str = "val", eval_every: int = 20, kill_at: int = 0, crash_at: int = 0,
                   stop_on=("nan",), report: bool = False, eval_samples: int = 1, lenient: bool = False,
                   watch: dict | None = None) -> Path:
    """Linear-teacher classification: a frozen random feature layer, a trainable MLP head, SGD with momentum.
    loss = CE + weighted extra term, both audited (rl.audit) every 10 steps. Healthy: the extra term is an entropy
    bonus on the batch-mean prediction (a tensor with a gradient). Bugs, one switch each:
      extra_term="float_diversity"     the diversity bonus is a Python float from argmax predictions (seed 002)
      extra_term="standardized_reward" mean of a reward standardized with non-detached mean/std: sums to 0 (seed 003)
      leak=k             the first k test examples are also trained on
      n_test=30          a 30-item test set; test_subset=k: k items scored, divided by n_test (TRM's subset score)
      select_on="test"   no validation: test is evaluated periodically and the best test checkpoint is kept
      lr=1e4             diverges to inf/NaN; the Watcher (stop_on nan) stops the run
      kill_at=s          the process is SIGKILLed at step s (a scheduler timeout): no final eval, no summary.json
      crash_at=s         the loop raises at step s; the run ends as `reasonlab run` ends it: finish("failed", error)
      eval_every=0       no evaluation during training (seed 003's eval_frequency: null), only before and after
      eval_samples=k, lenient=True   test = k samples per question scored by a checker that accepts any class
                         within 3 of the gold (seed 002's length heuristic): pass@k at its ceiling while pass@1 is not
    watch: the run's watch: settings (thresholds included), e.g. {"min_eval_n": 20}.
    """
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "classifier", steps, lr, stop_on=stop_on, watch=watch, extra_term=extra_term,
                       eval_every=eval_every, leak=leak, n_test=n_test, test_subset=test_subset, select_on=select_on,
                       kill_at=kill_at, eval_samples=eval_samples, lenient=lenient)
        xtr, ytr, idtr = teacher("train", 512)
        xva, yva, idva = teacher("val", 500)
        xte, yte, idte = teacher("test", n_test)
        if leak:  # the split bug: test examples also in the training pool
            xtr, ytr, idtr = torch.cat([xtr, xte[:leak]]), torch.cat([ytr, yte[:leak]]), idtr + idte[:leak]
        record_train_ids(run, idtr)
        features = torch.nn.Linear(DIM, 64)
        features.requires_grad_(False)  # frozen on purpose: checksummed, must never change
        head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))
        model = torch.nn.Sequential(features, torch.nn.Tanh(), head)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
        watcher = Watcher(run, run.cfg.watch)
        weight = {"entropy": 0.05, "float_diversity": 0.3, "standardized_reward": 1.0}[extra_term]

        @torch.no_grad()
        def predict(x):
            return model(x).argmax(1)

        def sampled_eval(x, y, ids, tag: str, step: int) -> dict:
            """eval_samples predictions per question sampled from the softmax; pass@k over questions."""
            with torch.no_grad():
                probs = model(x).softmax(-1)  # (N, C)
            draws = torch.multinomial(probs, eval_samples, replacement=True,
                                      generator=torch.Generator().manual_seed(5))  # (N, k)
            ok = (draws - y[:, None]).abs() <= 3 if lenient else draws == y[:, None]  # (N, k)
            records = [{"id": i, "sample": j, "prompt": f"question {i}", "output": f"The answer is {int(p)}.",
                        "extracted": str(int(p)), "gold": str(int(g)), "correct": bool(c), "valid": True,
                        "extractor": "lenient@1" if lenient else "argmax@1"}
                       for i, row, okrow, g in zip(ids, draws, ok, y) for j, (p, c) in enumerate(zip(row, okrow))]
            counts = [(eval_samples, int(r.sum())) for r in ok]
            mets = {"acc": mean_metric([c / n for n, c in counts]).to_dict()}
            for kk in sorted({2, eval_samples}):
                mets[f"pass@{kk}"] = pass_at_k_metric(counts, kk).to_dict()
            run.write_eval(tag, records, {"split": "test", "step": step, "final": True, "task": "teacher",
                                          "metrics": mets, "samples": eval_samples})
            return mets["acc"]

        def evaluate(split: str, step: int, final: bool = False) -> float:
            x, y, ids = {"val": (xva, yva, idva), "test": (xte, yte, idte)}[split]
            k = test_subset if split == "test" and test_subset else len(ids)
            tag = f"{split}@final" if final else f"{split}@step_{step}"
            if split == "test" and eval_samples > 1:
                return sampled_eval(x, y, ids, tag, step)["value"]
            acc = write_eval(run, tag, ids[:k], predict(x[:k]), y[:k], split=split, step=step, final=final,
                             denominator=n_test if k < len(ids) else None)
            run.log(step, {f"eval/{split}/acc": acc["value"], f"eval/{split}/acc_lo": acc["lo"],
                           f"eval/{split}/acc_hi": acc["hi"], f"eval/{split}/n": acc["n"]})
            return acc["value"]

        def save(step: int, name: str | None = None, **state):
            run.save_checkpoint(step, modules={"model": model}, optimizer=opt, state=state, name=name)

        best = (evaluate(select_on, 0), 0)
        save(0, "best", **({"selected_on": "val", "metric": "acc"} if select_on == "val" else {}))
        step = 0
        try:
            for step in range(1, steps + 1):
                if run.should_stop(step):
                    break
                if crash_at and step == crash_at:
                    raise RuntimeError(f"CUDA out of memory (simulated at step {step})")
                idx = torch.randint(0, len(ytr), (64,))
                hidden = torch.tanh(features(xtr[idx]))  # (64, 64)
                logits = head(hidden)  # (64, CLASSES)
                ce = Fn.cross_entropy(logits, ytr[idx])
                if extra_term == "entropy":  # keep the batch-mean prediction spread over classes
                    mean_p = logits.softmax(-1).mean(0)
                    extra = (mean_p * mean_p.clamp_min(1e-9).log()).sum()
                elif extra_term == "float_diversity":  # a score of sampled outputs: a Python float, no graph
                    with torch.no_grad():
                        extra = -len(set(logits.argmax(1).tolist())) / CLASSES
                else:  # reward = log p(gold); the advantage is standardized with mean/std NOT detached, so sum(A) = 0
                    r = -Fn.cross_entropy(logits, ytr[idx], reduction="none")
                    extra = -((r - r.mean()) / (r.std() + 1e-6)).mean()
                terms = {"ce": (1.0, ce), extra_term: (weight, extra)}
                loss = ce + weight * extra
                metrics = {"train/loss": loss.item(), "train/acc": (logits.argmax(1) == ytr[idx]).float().mean().item()}
                if step == 1 or step % run.cfg.watch.audit_every == 0:
                    metrics.update(audit_terms(terms, head.parameters()).metrics())
                    metrics.update(encoder_stats(hidden))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                metrics["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(head.parameters(), float("inf")))
                opt.step()
                run.log(step, metrics)
                if watcher.step(step, metrics):
                    break  # the Watcher asked to stop: checkpoint and final eval below, as for a time limit
                if kill_at and step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if eval_every and step % eval_every == 0 and step < steps:
                    save(step)
                    acc = evaluate(select_on, step)
                    if acc > best[0]:
                        best = (acc, step)
                        save(step, "best", **({"selected_on": "val", "metric": "acc"} if select_on == "val" else {}))
        except Exception as e:  # as `reasonlab run` does: the folder records how the run ended
            run.finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        save(step)
        if select_on == "val":
            acc = evaluate("val", step, final=True)
            if acc > best[0]:
                best = (acc, step)
                save(step, "best", selected_on="val", metric="acc")
        open_checkpoint(run.dir / "checkpoints" / "best").restore(modules={"model": model}, rng=False)
        evaluate("test", step, final=True)
        run.finish("stopped" if run.stop_reason else "completed", results={"final_step": step, "best_step": best[1]})
        if report:
            from reasonlab.diagnostics.report import write_report

            write_report(run.dir)
        return run.dir


def killed_classifier_run(root: Path, name: str = "killed", kill_at: int = 30) -> Path:
    """classifier_run in a child process that is SIGKILLed at step `kill_at`, as a scheduler timeout would."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import tinyrun; "
            f"tinyrun.classifier_run(Path({str(root)!r}), {name!r}, kill_at={kill_at})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    return Path(root) / name


def ppo_run(root: Path, name: str = "ppo", *, ratio_against: str = "pi_old", rollouts: int = 30,
            stop_on=("nan",)) -> Path:
    """Contextual bandit: 16 prompts x 16 actions, reward 1 for each prompt's target action; a tabular softmax policy;
    8 samples per prompt, group-normalized advantages, PPO-clip (eps 0.2) with 4 epochs per rollout.
    ppo/ratio_first_mean is the mean ratio on the first epoch of each fresh rollout, before any update on it.
    Bug: ratio_against="base" takes the ratio against the frozen initial policy, not the policy that sampled
    (the public Markovian PPO, seed 003)."""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "ppo", rollouts, 0.1, stop_on=stop_on, ratio_against=ratio_against)
        n_prompts, n_actions, group = 16, 16, 8
        target = torch.randint(0, n_actions, (n_prompts,))
        policy = torch.nn.Embedding(n_prompts, n_actions)
        torch.nn.init.zeros_(policy.weight)
        base = policy.weight.detach().clone()  # the reference (initial) policy
        opt = torch.optim.Adam(policy.parameters(), lr=0.1)
        watcher = Watcher(run, run.cfg.watch)
        prompts = torch.arange(n_prompts).repeat_interleave(group)  # (P*G,)
        step = 0
        for step in range(1, rollouts + 1):
            if run.should_stop(step):
                break
            with torch.no_grad():
                logits = policy(prompts)  # (P*G, A)
                actions = torch.distributions.Categorical(logits=logits).sample()
                lp_old = logits.log_softmax(-1).gather(1, actions[:, None]).squeeze(1)
                lp_base = base[prompts].log_softmax(-1).gather(1, actions[:, None]).squeeze(1)
                entropy = torch.distributions.Categorical(logits=logits).entropy().mean().item()
            reward = (actions == target[prompts]).float().view(n_prompts, group)  # (P, G)
            adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)).view(-1)
            ratios, clipped = [], []
            for epoch in range(4):
                lp = policy(prompts).log_softmax(-1).gather(1, actions[:, None]).squeeze(1)
                ratio = torch.exp(lp - (lp_old if ratio_against == "pi_old" else lp_base))
                loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ratios.append(ratio.detach())
                clipped.append(((ratio - 1).abs() > 0.2).float().mean().item())
            r_all = torch.cat(ratios)
            metrics = {"train/loss": loss.item(), "ppo/ratio_first_mean": ratios[0].mean().item(),
                       "ppo/ratio_mean": r_all.mean().item(), "ppo/ratio_max": r_all.max().item(),
                       "ppo/clip_frac": sum(clipped) / len(clipped),
                       "ppo/approx_kl": (lp_old - lp.detach()).mean().item(), "rollout/entropy": entropy,
                       **group_reward_stats(reward)}
            run.log(step, metrics)
            if watcher.step(step, metrics):
                break
        run.save_checkpoint(step, modules={"policy": policy}, optimizer=opt)
        with torch.no_grad():  # greedy action of every prompt
            greedy = policy(torch.arange(n_prompts)).argmax(1)
        write_eval(run, "val@final", [f"prompt/{i}" for i in range(n_prompts)], greedy, target, split="val",
                   step=step, final=True)
        run.finish("stopped" if run.stop_reason else "completed", results={"final_step": step})
        return run.dir


def repetition_run(root: Path, name: str = "repetition", *, steps: int = 50) -> Path:
    """A position-wise policy over 12 characters (24 positions sampled independently), REINFORCE with group-
    normalized advantages over 16 samples. The reward is the share of the character '4' in the sample: a reward a
    degenerate string maximizes, so the policy collapses to '4444...' (seed 003's ARC run). Logs the rollout stats
    of watch.rollout_stats / group_reward_stats and the policy entropy; the final greedy outputs go to evals/."""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "repetition", steps, 0.3, stop_on=())
        vocab, length, group = "0123456789+ ", 24, 16
        table = torch.nn.Parameter(torch.zeros(length, len(vocab)))
        opt = torch.optim.Adam([table], lr=0.3)
        watcher = Watcher(run, run.cfg.watch)
        decode = lambda row: "".join(vocab[int(t)] for t in row)  # noqa: E731
        step = 0
        for step in range(1, steps + 1):
            if run.should_stop(step):
                break
            with torch.no_grad():
                toks = torch.multinomial(table.softmax(-1), group, replacement=True).T  # (G, T)
            logp = table.log_softmax(-1)  # (T, V)
            lp = logp.gather(1, toks.T).T.sum(1)  # (G,)
            reward = (toks == vocab.index("4")).float().mean(1)  # (G,)
            adv = (reward - reward.mean()) / (reward.std() + 1e-6)
            loss = -(lp * adv).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            texts = [decode(r) for r in toks]
            metrics = {"train/loss": loss.item(), "rollout/entropy": -(logp.exp() * logp).sum(-1).mean().item(),
                       **rollout_stats(texts), **group_reward_stats(reward)}
            run.log(step, metrics)
            watcher.step(step, metrics)
        run.save_checkpoint(step, modules={"policy": torch.nn.ParameterDict({"table": table})})
        greedy = decode(table.argmax(-1))  # the policy ignores the prompt: one output for every question
        ids = [f"q/{i}" for i in range(40)]
        golds = [i + 10 for i in range(40)]
        answer = int(greedy.split()[-1]) if greedy.split() and greedy.split()[-1].isdigit() else None
        write_eval(run, "test@final", ids, [answer] * 40, golds, split="test", step=step, final=True,
                   texts=[greedy] * 40)
        run.finish("completed", results={"final_step": step})
        return run.dir


class Translator(torch.nn.Module):
    """Source features -> one soft token in the target's embedding space, plus a learned soft prompt."""

    def __init__(self, d_src: int, d_emb: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_src, d_emb)
        self.prompt = torch.nn.Parameter(torch.zeros(d_emb))


def bridge_run(root: Path, name: str = "bridge", *, teacher_sees: str = "question", translator_grad: bool = True,
               steps: int = 150, controls: bool = True, source_alone: bool = False) -> Path:
    """Latent bridge in miniature: a frozen target head (stand-in for the frozen target LM; 8-dim embedding, 16
    answers) reads one soft token = translator(source features) + a learned soft prompt. loss = KL(teacher || target).
    Healthy: the teacher is the target given the true question. Bugs:
      teacher_sees="prior"    the teacher sees only the answer text: a question-independent prior (seed 001), which
                              the translator matches by emitting the same soft token for every input
      translator_grad=False   soft tokens come from a no_grad helper (the generation path reused in training), so
                              the translator never trains and accuracy is no better than the shuffled-source control
      controls=False          the evals skip the shuffled-source and zero-source controls altogether
    source_alone=True adds, as the bridge recipe does, a reference eval of another model (summary role
    "source_alone": a nearest-centroid classifier on the source features), which needs no controls of its own.
    Logs encoder/* (watch.encoder_stats of the soft tokens); evals on val and test with the shuffled-source and
    zero-source controls on the same items."""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "bridge", steps, 0.05, stop_on=(), method="bridge", teacher_sees=teacher_sees,
                       translator_grad=translator_grad, controls=controls)
        d_src, d_emb, n_ans = 16, 8, 16
        target = torch.nn.Linear(d_emb, n_ans)
        target.requires_grad_(False)
        true_map = torch.randn(d_emb, d_src) / 2  # what a perfect translator would do
        x = torch.randn(1536, d_src)  # source-model features of 1536 questions
        with torch.no_grad():
            teacher_logits = target(x @ true_map.T)  # (N, n_ans): the target given the real question
            gold = teacher_logits.argmax(1)
            prior = teacher_logits.softmax(-1).mean(0)  # the answer distribution alone
        translator = Translator(d_src, d_emb)
        modules = {"translator": translator, "target": target}
        opt = torch.optim.Adam(translator.parameters(), lr=0.05)
        ids = [f"q/{i}" for i in range(len(x))]
        train_idx, val_idx, test_idx = range(0, 1024), range(1024, 1280), range(1280, 1536)
        record_train_ids(run, [ids[i] for i in train_idx])

        def soft_tokens(src):  # (B, d_emb)
            if translator_grad:
                return translator.proj(src) + translator.prompt
            with torch.no_grad():  # the bug: a generation helper's no_grad reused on the training path
                proj = translator.proj(src)
            return proj + translator.prompt

        step = 0
        for step in range(1, steps + 1):
            idx = torch.randint(0, 1024, (64,))
            soft = soft_tokens(x[idx])  # (64, d_emb)
            logq = target(soft).log_softmax(-1)
            p = prior.expand_as(logq) if teacher_sees == "prior" else teacher_logits[idx].softmax(-1)
            loss = (p * (p.clamp_min(1e-9).log() - logq)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            metrics = {"train/loss": loss.item(), **encoder_stats(soft)}
            run.log(step, metrics)
            if step == steps // 2:
                run.save_checkpoint(step, modules=modules)
        run.save_checkpoint(step, modules=modules)
        with torch.no_grad():
            for split, rows in (("val", list(val_idx)), ("test", list(test_idx))):
                src = x[rows]
                shuffled = src[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))]
                conds = ((None, src), ("shuffled_source", shuffled), ("zero_source", torch.zeros_like(src)))
                for control, s in conds if controls else conds[:1]:
                    pred = target(translator.proj(s) + translator.prompt).argmax(1)
                    tag = f"{split}@final" + (f"+control={control}" if control else "")
                    extra = {"control": control, "base": f"{split}@final"} if control else {}
                    write_eval(run, tag, [ids[i] for i in rows], pred, gold[rows], split=split, step=step,
                               final=True, **extra)
                if source_alone:
                    tr = list(train_idx)
                    cent = torch.stack([x[tr][gold[tr] == c].mean(0) if (gold[tr] == c).any() else
                                        torch.zeros(d_src) for c in range(n_ans)])  # (n_ans, d_src)
                    pred = torch.cdist(src, cent).argmin(1)
                    write_eval(run, f"{split}.source@final", [ids[i] for i in rows], pred, gold[rows], split=split,
                               step=step, final=True, role="source_alone")
        run.finish("completed", results={"final_step": step})
        return run.dir


def freeze_run(root: Path, name: str = "freeze", *, set_to_none: bool = True, steps: int = 40,
               freeze_at: int = 20) -> Path:
    """Curriculum: encoder and decoder train together for `freeze_at` steps, then the decoder is frozen
    (requires_grad_(False)) while the encoder trains on. Checkpoints (params="trainable") at the freeze and the end.
    Bug: set_to_none=False leaves zero .grad tensors on the frozen decoder, and AdamW (momentum + weight decay)
    keeps moving it."""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "freeze", steps, 0.01, stop_on=(), set_to_none=set_to_none, freeze_at=freeze_at)
        xtr, ytr, _ = teacher("train", 512)
        encoder = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh())
        decoder = torch.nn.Linear(32, CLASSES)
        model = torch.nn.Sequential(encoder, decoder)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
        for step in range(1, steps + 1):
            if step == freeze_at + 1:
                decoder.requires_grad_(False)
            idx = torch.randint(0, len(ytr), (64,))
            loss = Fn.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=set_to_none)
            loss.backward()
            opt.step()
            run.log(step, {"train/loss": loss.item()})
            if step == freeze_at:
                decoder.requires_grad_(False)  # frozen from here on; the checkpoint records it as such
                run.save_checkpoint(step, modules={"model": model})
        run.save_checkpoint(steps, modules={"model": model})
        run.finish("completed", results={"final_step": steps})
        return run.dir


def memorize_run(root: Path, name: str = "memorize", *, steps: int = 250) -> Path:
    """TRM/ETRM in miniature: each puzzle maps 64 input symbols through its own permutation; the model sees a
    puzzle-id embedding (zero-init, as TRM's) and the input symbol. Trained on 16 puzzles; validation and test are
    16 held-out puzzles each, whose id embeddings never receive a gradient: the model memorizes the training
    puzzles (train accuracy -> 1) and has nothing to go on for new ones (seed 004)."""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "memorize", steps, 0.01, stop_on=())
        n_puz, n_sym = 16, 64
        perms = torch.stack([torch.randperm(n_sym) for _ in range(3 * n_puz)])  # train | val | test puzzles
        puzzle_emb = torch.nn.Embedding(3 * n_puz, 32)
        torch.nn.init.zeros_(puzzle_emb.weight)
        symbol_emb = torch.nn.Embedding(n_sym, 32)
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, n_sym))
        modules = {"puzzle_emb": puzzle_emb, "symbol_emb": symbol_emb, "mlp": mlp}
        opt = torch.optim.Adam([p for m in modules.values() for p in m.parameters()], lr=0.01)
        pz, sym = torch.meshgrid(torch.arange(n_puz), torch.arange(n_sym), indexing="ij")
        pz, sym = pz.flatten(), sym.flatten()  # (512,) every (puzzle, symbol) pair

        def forward(p, s):
            return mlp(torch.cat([puzzle_emb(p), symbol_emb(s)], -1))

        record_train_ids(run, [f"puzzle{int(p)}/sym{int(s)}" for p, s in zip(pz, sym)])
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(pz), (128,))
            logits = forward(pz[idx], sym[idx])
            y = perms[pz[idx], sym[idx]]
            loss = Fn.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.log(step, {"train/loss": loss.item(), "train/acc": (logits.argmax(1) == y).float().mean().item()})
        run.save_checkpoint(steps, modules=modules)
        with torch.no_grad():
            for k, split in ((1, "val"), (2, "test")):
                p = pz + k * n_puz
                write_eval(run, f"{split}@final", [f"puzzle{int(a)}/sym{int(b)}" for a, b in zip(p, sym)],
                           forward(p, sym).argmax(1), perms[p, sym], split=split, step=steps, final=True)
        run.finish("completed", results={"final_step": steps})
        return run.dir


def lora_kl_run(root: Path, name: str = "lora-kl", *, steps: int = 3, audit_every: int = 1, kl_weight: float = 0.1,
                pg_weight: float = 1.0, extra: str = "none", lr: float = 0.05, tied: bool = False) -> Path:
    """A LoRA policy on a contextual bandit (128 prompts x 16 actions): logits = base[p] + B A[:, p] with B
    zero-initialised, so before the first update the policy IS its reference (the adapter disabled), as in the
    markovian and polychromic recipes. loss = pg_weight * group-normalized REINFORCE + kl_weight * exact KL(pi || ref)
    (+ one extra term): the KL and its gradient are exactly 0 at initialisation, by construction. Audits at step 1 and
    every `audit_every` steps. Bugs (extra=):
      "float"         a diversity bonus that is a Python float (seed 002), weight 0.3: a visible value, no gradient
      "standardized"  the mean of advantages standardized with non-detached mean/std (seed 003), weight 1:
                      identically 0, so value and gradient stay ~0 after the policy has moved
      tied=True       every sample gets the same reward (a task the policy never solves): advantages are all 0
                      and the KL is 0 at the reference, so no update ever happens
    Healthy (extra="none"): nothing but the KL is ~0, and only before the first update."""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "lora_kl", steps, lr, stop_on=(), extra=extra, kl_weight=kl_weight,
                       pg_weight=pg_weight, audit_every=audit_every, tied=tied)
        n_prompts, n_actions, rank, group, batch = 128, 16, 2, 4, 16
        g = torch.Generator().manual_seed(7)
        base = torch.randn(n_prompts, n_actions, generator=g)  # the frozen base policy's logits
        target = torch.randint(0, n_actions, (n_prompts,), generator=g)
        lora_a = torch.nn.Parameter(torch.randn(rank, n_prompts, generator=g) / rank ** 0.5)
        lora_b = torch.nn.Parameter(torch.zeros(n_actions, rank))  # zero: adapter on == adapter off at step 0
        params = [lora_a, lora_b]
        opt = torch.optim.Adam(params, lr=lr)
        watcher = Watcher(run, run.cfg.watch)
        record_train_ids(run, [f"prompt/{i}" for i in range(n_prompts)])

        def policy_logits(p):  # (B,) -> (B, A)
            return base[p] + (lora_b @ lora_a[:, p]).T

        modules = {"lora": torch.nn.ParameterDict({"a": lora_a, "b": lora_b})}
        run.save_checkpoint(0, modules=modules)
        step = 0
        for step in range(1, steps + 1):
            prompts = torch.randint(0, n_prompts, (batch,)).repeat_interleave(group)  # (B*G,)
            logits = policy_logits(prompts)  # (B*G, A)
            logp = logits.log_softmax(-1)
            with torch.no_grad():
                actions = torch.distributions.Categorical(logits=logits).sample()  # (B*G,)
                ref_logp = base[prompts].log_softmax(-1)  # the reference: adapter disabled
            reward = -(actions - target[prompts]).abs().float() / n_actions  # (B*G,) dense: groups rarely tie
            if tied:
                reward = torch.zeros_like(reward)  # never solved: every group ties
            r = reward.view(batch, group)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
            lp = logp.gather(1, actions[:, None]).squeeze(1)
            pg = -(lp * adv.detach()).mean()
            kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
            terms = {"pg": (pg_weight, pg), "kl": (kl_weight, kl)}
            if extra == "float":
                terms["diversity"] = (0.3, -len(set(actions.tolist())) / n_actions)
            elif extra == "standardized":  # the reward carries the graph; its standardization does not detach
                rg = (lp * reward).view(batch, group)
                terms["actor"] = (1.0, -((rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-6)).mean())
            loss = sum(w * t for w, t in terms.values())
            metrics = {"train/loss": loss.item(), "train/kl": kl.item(), **group_reward_stats(r)}
            if step == 1 or step % audit_every == 0:
                metrics.update(audit_terms(terms, params).metrics())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            metrics["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
            opt.step()
            run.log(step, metrics)
            watcher.step(step, metrics)
        run.save_checkpoint(step, modules=modules)
        with torch.no_grad():
            greedy = policy_logits(torch.arange(n_prompts)).argmax(1)
        write_eval(run, "val@final", [f"val/prompt/{i}" for i in range(n_prompts)], greedy, target, split="val",
                   step=step, final=True)
        run.finish("completed", results={"final_step": step})
        return run.dir


def grid_run(root: Path, name: str = "grid", *, n_eval_tasks: int = 400, subset: int = 0,
             denominator: str = "evaluated", eval_demos_trained: bool = False, split_mode: str = "heldout",
             steps: int = 300) -> Path:
    """ETRM in miniature: a task is a shift rule y = (x + s) mod 8 shown by 4 demonstration pairs; the model reads one
    demonstration and a query and predicts the answer (it must infer s from the demo), so it can solve tasks it never
    saw. Training tasks contribute demos and tests ("<task>/demo<j>", "<task>/<j>"); evaluation tasks' test pairs are
    scored per task as TRM does (records carry "task", "correct", "correct@2" and grid outputs; pass@k = mean task
    credit). Bugs:
      subset=k, denominator="split"   only k tasks evaluated, their credits divided by every task of the split and n
                                      reported as the split size (TRM's official evaluator; seed 004)
      eval_demos_trained=True         the evaluation tasks' demonstrations are also training samples; with
                                      split_mode="heldout" the eval still claims held-out tasks (ETRM's claim), with
                                      "transductive" it says what it is (TRM's protocol)"""
    with one_thread():
        torch.manual_seed(0)
        run = open_run(root, name, "grid", steps, 0.01, stop_on=(), subset=subset, denominator=denominator,
                       eval_demos_trained=eval_demos_trained, split_mode=split_mode)
        V, n_demo, n_test = 8, 4, 2
        g = torch.Generator().manual_seed(11)

        def make(prefix: str, n: int) -> list[dict]:
            tasks = []
            for t in range(n):
                s = int(torch.randint(0, V, (1,), generator=g))
                xs = torch.randint(0, V, (n_demo + n_test,), generator=g)
                tasks.append({"id": f"{prefix}{t:03d}", "x": xs, "y": (xs + s) % V})
            return tasks

        train_tasks, eval_tasks = make("train", 64), make("eval", n_eval_tasks)
        model = torch.nn.Sequential(torch.nn.Linear(3 * V, 128), torch.nn.ReLU(), torch.nn.Linear(128, V))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        onehot = lambda v: Fn.one_hot(v, V).float()  # noqa: E731

        def inputs(dx, dy, q):  # (B,) x3 -> (B, 3V): one demonstration pair and the query
            return torch.cat([onehot(dx), onehot(dy), onehot(q)], -1)

        # training samples: (task, demo index d, query index q), the query never its own demo
        samples, ids = [], []
        for t in train_tasks:
            ids += [f"{t['id']}/demo{j}" for j in range(n_demo)] + [f"{t['id']}/{j}" for j in range(n_test)]
            samples += [(t, d, q) for d in range(n_demo) for q in range(n_demo + n_test) if q != d]
        if eval_demos_trained:  # the demos alone: the scored test pairs stay out
            for t in eval_tasks:
                ids += [f"{t['id']}/demo{j}" for j in range(n_demo)]
                samples += [(t, d, q) for d in range(n_demo) for q in range(n_demo) if q != d]
        record_train_ids(run, ids)
        dx = torch.tensor([int(t["x"][d]) for t, d, _ in samples])
        dy = torch.tensor([int(t["y"][d]) for t, d, _ in samples])
        qx = torch.tensor([int(t["x"][q]) for t, _, q in samples])
        qy = torch.tensor([int(t["y"][q]) for t, _, q in samples])
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(samples), (128,))
            logits = model(inputs(dx[idx], dy[idx], qx[idx]))
            loss = Fn.cross_entropy(logits, qy[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.log(step, {"train/loss": loss.item(), "train/acc": (logits.argmax(1) == qy[idx]).float().mean().item()})
        run.save_checkpoint(steps, modules={"model": model})
        evaluated = eval_tasks[:subset] if subset else eval_tasks
        records, credit1, credit2 = [], [], []
        with torch.no_grad():
            for t in evaluated:
                hits1, hits2 = [], []
                for j in range(n_test):
                    q = n_demo + j
                    logits = model(inputs(t["x"][:1], t["y"][:1], t["x"][q:q + 1]))[0]  # demo 0 as the example
                    top = logits.topk(2).indices.tolist()
                    gold = int(t["y"][q])
                    hits1.append(top[0] == gold)
                    hits2.append(gold in top)
                    # as TRM's records: the top-2 candidates as grids (here the answer painted on a 5x5 canvas)
                    records.append({"id": f"{t['id']}/{j}", "task": t["id"], "test_index": j,
                                    "output": [[[c] * 5] * 5 for c in top[:2]],
                                    "extracted": str(top[0]), "gold": str(gold), "correct": top[0] == gold,
                                    "correct@2": gold in top, "valid": True, "extractor": "argmax@1"})
                credit1.append(sum(hits1) / n_test)
                credit2.append(sum(hits2) / n_test)
        metrics = {}
        for k, credit in (("pass@1", credit1), ("pass@2", credit2)):
            m = (accuracy([c == 1.0 for c in credit]) if all(c in (0.0, 1.0) for c in credit)
                 else mean_metric(credit)).to_dict()
            if denominator == "split":  # the official evaluator: sum of credits over EVERY task of the split
                m = {**m, "value": sum(credit) / n_eval_tasks, "n": n_eval_tasks}
            metrics[k] = m
        run.write_eval("test@final", records, {"split": "test", "step": steps, "final": True, "task": "shift-rules",
                                               "metrics": metrics, "n_tasks": metrics["pass@1"]["n"],
                                               "split_mode": split_mode})
        run.finish("completed", results={"final_step": steps})
        return run.dir
