"""One RL step of reasonlab against TRL's GRPOTrainer, in one process, at the same shapes (issue #20).

Both sides train the embedded SmolLM2-135M (the converted fp32 folder, `reasonlab.models.embedded.resolve`) with a
LoRA adapter r 8 / alpha 16 on every linear layer (peft, dropout 0), 1 prompt x 8 samples x exactly 64 new tokens
(EOS masked until the 64th token on both sides: TRL `generation_kwargs={"min_new_tokens": 64}`, ours
`min_new_tokens = max_new_tokens` on the rollout sampler), temperature 1, at KL 0 and KL 0.04 (TRL `beta`). The prompt
is the Markovian arithmetic prompt ("... Question: 14 + 1 + 26 + ... \\nReasoning:") with --terms 9 terms, 53-56
tokens; step s takes the same question on every side (the recipes' `batch_indices(s, 1, ...)`; TRL reads the same
prompts in order, `shuffle_dataset=False`), so no side re-uses a cache the others cannot.

Paths (`--paths`, run in this order once per --runs, alternating so machine load hits every side alike):
  trl-b0      TRL GRPOTrainer, beta 0 (no reference forward)
  trl-b0.04   TRL GRPOTrainer, beta 0.04 (reference = the adapter disabled)
  poly-kl0    reasonlab polychromic recipe, `set.mode=grpo`, train.kl_coef=0
  poly-kl0.04 the same, train.kl_coef=0.04 (k3 on the sampled tokens, as TRL)
  mk-kl0.04   reasonlab markovian recipe (configs/markovian/arithmetic-smollm2.yaml), 64-token CoTs, rl.kl_coef=0.04
              (its default exact KL over the vocabulary), greedy reference CoT per question (cached per question; every
              step here has a new question, as in training), decoded in the rollout's batch with the adapter off on its
              row, so its time is inside gen
  mk-kl0      the same at rl.kl_coef=0
Ours run through their normal entry points: load_config(yaml, overrides) -> Run(cfg, dir) -> main(cfg, run). Only the
evaluations before/after training and the final checkpoint are switched off (training.evals_at / final_eval replaced
by no-ops in this process), and the gradient audit (watch.audit_every=0: TRL has none).

Allocator: our recipes keep freed memory in the heap on the CPU (reasonlab.training.keep_freed_memory, glibc's
mallopt, once per process), which also holds for the TRL runs that come after our first run in this process. So
with the default order, run 1's TRL paths have glibc's defaults (each library as it ships) and run 2's have the
tuned allocator (the same allocator on both sides); the per-run ratios show both.

Per path it prints the median over steps 2..N (step 1 pays one-time costs) of each run, and the split:
  gen    sampling the rollouts (ours: the recipe's sampler.generate; TRL: _generate_single_turn, HF generate)
  refgen markovian only: the reference's greedy CoT when it is decoded apart from the rollout (backends other
         than own, rl.ref_cot=sample); with the own loop it rides in the rollout's batch and counts in gen
  fwd    model forwards outside generation (hooks on the causal LM, its decoder and its lm_head; nested calls count
         once): policy, reference and answer forwards; TRL's fused log-prob/entropy head is inside its forward
  bwd    torch.autograd.backward
  other  step - gen - refgen - fwd - bwd: log-softmax/KL/entropy outside the forward, rewards, the optimizer, glue
fwd is split further into fwd_grad (with autograd) and fwd_nograd (reference / no-grad answer forwards).
The step seconds of ours are the recipes' own `time/step_s` from the run folder's metrics.jsonl (polychromic:
`time/gen_s` too, markovian: `time/rollout_s`, which also holds the reference CoT and its answer forward); TRL's are
the wall time between the trainer's on_step_begin and on_step_end. Ratios: poly-kl0 / trl-b0, poly-kl0.04 / trl-b0.04,
mk-kl0.04 / trl-b0.04, mk-kl0 / trl-b0, per run (run i of ours over run i of TRL).

`--profile` runs the last step of each of our paths under torch.profiler and prints its top operators by self CPU
time (that step's timings then include the profiler's overhead: profile in a separate invocation).

TRL is a benchmark-only extra (`pip install -e .[bench]`, or `pip install trl==1.16.0 --no-deps` plus datasets, pandas,
pyarrow); without it the script prints that hint and exits 2.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rl_step.py --steps 3 --runs 2 [--json steps.json]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rl_step.py --paths poly-kl0.04,mk-kl0.04 --steps 3 --runs 1 --profile

GPU variant: `--device cuda --vllm` puts vLLM on both sides (ours: rollout.backend=vllm, train.device=cuda,
train.precision=bf16; TRL: use_vllm=True, vllm_mode="colocate", bf16=True) and lets --threads default to torch's.
It is coded but has NOT been run: the machine this script was written on (2026-12-03) has no GPU and no vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLY_YAML = ROOT / "configs" / "polychromic" / "countdown-smollm2.yaml"
MK_YAML = ROOT / "configs" / "markovian" / "arithmetic-smollm2.yaml"
PATHS = ["trl-b0", "trl-b0.04", "poly-kl0", "poly-kl0.04", "mk-kl0.04", "mk-kl0"]
PAIRS = {"poly-kl0": "trl-b0", "poly-kl0.04": "trl-b0.04", "mk-kl0.04": "trl-b0.04", "mk-kl0": "trl-b0"}
KEYS = ["gen", "refgen", "fwd", "bwd", "fwd_grad", "fwd_nograd"]
KEYS = KEYS + [f"cpu_{k}" for k in KEYS]  # the same in process CPU seconds (load on a shared machine cancels)
INSTALL_HINT = "TRL is missing: pip install -e '.[bench]'  (or: pip install trl==1.16.0 --no-deps datasets pandas pyarrow)"


# ----------------------------------------------------------------------------------------------------------------------
# timing: one accumulator for the whole process, snapshotted at each step's end


class Split:
    """Seconds spent generating, in forwards outside generation and in backward, since the last `take()`."""

    def __init__(self):
        self.acc = dict.fromkeys(KEYS, 0.0)
        self.gen_depth = 0
        self.fwd_depth = 0
        self.fwd_t0 = 0.0
        self.fwd_grad = False
        self.handles = []

    def take(self) -> dict:
        out, self.acc = self.acc, dict.fromkeys(KEYS, 0.0)
        return out

    def add(self, key: str, t: float, c: float) -> None:
        self.acc[key] += time.perf_counter() - t
        self.acc["cpu_" + key] += time.process_time() - c

    @contextlib.contextmanager
    def generating(self, key: str = "gen"):
        t, c = time.perf_counter(), time.process_time()
        self.gen_depth += 1
        try:
            yield
        finally:
            self.gen_depth -= 1
            if self.gen_depth == 0:
                self.add(key, t, c)

    def hook(self, modules) -> None:
        import torch

        def pre(_m, _a):
            if self.gen_depth:
                return
            if self.fwd_depth == 0:
                self.fwd_t0, self.fwd_c0 = time.perf_counter(), time.process_time()
                self.fwd_grad = torch.is_grad_enabled()
            self.fwd_depth += 1

        def post(_m, _a, _o):
            if self.gen_depth:
                return
            self.fwd_depth -= 1
            if self.fwd_depth == 0:
                self.add("fwd", self.fwd_t0, self.fwd_c0)
                self.add("fwd_grad" if self.fwd_grad else "fwd_nograd", self.fwd_t0, self.fwd_c0)

        for m in modules:
            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def unhook(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.fwd_depth = 0


SPLIT = Split()


def install_backward_timer() -> None:
    import torch

    real = torch.autograd.backward
    if getattr(real, "_rl_step_timer", False):
        return

    def backward(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return real(*a, **k)
        finally:
            SPLIT.add("bwd", t, c)

    backward._rl_step_timer = True
    torch.autograd.backward = backward


def lm_modules(model) -> list:
    """The causal LM under PEFT / DDP wrappers, its decoder and its lm_head: the modules every forward passes."""
    m = model
    for attr in ("module",):
        m = getattr(m, attr, m)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    mods = [m]
    if hasattr(m, "model"):
        mods.append(m.model)
    if hasattr(m, "lm_head"):
        mods.append(m.lm_head)
    return mods


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(rows: list[dict]) -> dict:
    """Median of steps 2..N (all steps if there is only one) of each key."""
    use = rows[1:] if len(rows) > 1 else rows
    out = {k: med([r[k] for r in use]) for k in use[0]}
    out["other"] = out["step"] - out["gen"] - out["refgen"] - out["fwd"] - out["bwd"]
    out["cpu_other"] = out["cpu_step"] - out["cpu_gen"] - out["cpu_refgen"] - out["cpu_fwd"] - out["cpu_bwd"]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the prompts every side sees


def task_args(args) -> dict:
    return {"n_terms": args.terms, "max_value": 40, "ops": "+", "n_train": 1200, "n_validation": 140, "n_test": 140,
            "extractor": "anchor"}


def step_examples(args) -> list:
    from reasonlab.runs import batch_indices
    from reasonlab.tasks import get_task

    task = get_task("arithmetic", **task_args(args))
    train = task.examples("train")
    if args.same_question:
        train = train[:1]
    return task, [train[batch_indices(s, 1, len(train), args.seed)[0]] for s in range(args.steps)]


# ----------------------------------------------------------------------------------------------------------------------
# TRL


def run_trl(args, beta: float, work: Path) -> list[dict]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reasonlab.models.embedded import resolve

    path = str(resolve("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(path)
    task, exs = step_examples(args)
    by_prompt = {task.prompt(e, "markovian"): e for e in exs}
    ds = Dataset.from_dict({"prompt": [task.prompt(e, "markovian") for e in exs]})

    def reward(prompts, completions, **_):  # the task's own scorer, as our recipes' rewards
        return [float(task.score(c, by_prompt[p]).correct) for p, c in zip(prompts, completions)]

    cuda = args.device == "cuda"
    cfg = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=args.steps, learning_rate=1e-4, per_device_train_batch_size=args.samples,
        num_generations=args.samples, generation_batch_size=args.samples, gradient_accumulation_steps=1,
        max_completion_length=args.new, generation_kwargs={"min_new_tokens": args.new}, temperature=1.0, top_p=1.0,
        beta=beta, shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not cuda, bf16=cuda, seed=args.seed, dataloader_num_workers=0, log_completions=False,
        use_vllm=args.vllm, **({"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if args.vllm else {}))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            with SPLIT.generating():
                return super()._generate_single_turn(*a, **k)

    rows: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            SPLIT.take()
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *_a, **_k):
            rows.append({"step": time.perf_counter() - self.t, "cpu_step": time.process_time() - self.c,
                         **SPLIT.take()})
            print(f"    step {len(rows)}: {rows[-1]['step']:.2f} s", flush=True)

    trainer = Timed(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                    peft_config=lora, callbacks=[Clock()])
    SPLIT.hook(lm_modules(trainer.model))
    try:
        trainer.train()
    finally:
        SPLIT.unhook()
    del trainer, model
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# ours


class TimedSampler:
    """The recipe's sampler with generation timed and (polychromic) EOS masked until the last token."""

    def __init__(self, inner, force_min: bool):
        self.inner, self.force_min = inner, force_min

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, gc, *a, **k):
        if self.force_min:
            gc = dataclasses.replace(gc, min_new_tokens=gc.max_new_tokens)
        with SPLIT.generating():
            return self.inner.generate(prompts, gc, *a, **k)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def ours_overrides(args, path: str) -> tuple[Path, list[str]]:
    kl = "0.04" if path.endswith("0.04") else "0"
    common = ["tracking.tensorboard=false", "watch.audit_every=0", f"train.steps={args.steps}", "train.log_every=1",
              f"train.threads={args.threads}", f"seed={args.seed}", "train.checkpoint_every=0"]
    if args.device == "cuda":
        common += ["train.device=cuda", "train.precision=bf16"]
    if args.vllm:
        common += ["rollout.backend=vllm"]
    else:
        common += ["rollout.backend=own"]
    ta = json.dumps(task_args(args))
    n_train = ["data.n_train=1"] if args.same_question else []
    if path.startswith("poly"):
        return POLY_YAML, common + n_train + [
            "set.mode=grpo", "data.task=arithmetic", f"data.task_args={ta}", "data.style=markovian", "data.chat=false",
            "model.lora={r: 8, alpha: 16, dropout: 0.0}", f"rollout.n={args.samples}", f"rollout.max_new_tokens={args.new}",
            "rollout.stop=[]", "rollout.temperature=1.0", "train.batch_size=1", f"train.kl_coef={kl}"]
    return MK_YAML, common + n_train + [
        f"data.task_args={ta}", f"data.cot_tokens={args.new}", "model.lora={r: 8, alpha: 16, dropout: 0.0}",
        f"rl.group_size={args.samples}", f"train.batch_size={args.samples}", "rl.temperature=1.0", f"rl.kl_coef={kl}",
        "eval.test_baseline=false"]


def run_ours(args, path: str, work: Path) -> tuple[list[dict], list[dict]]:
    import torch

    from reasonlab import training
    from reasonlab.config import load_config
    from reasonlab.eval import generate as G
    from reasonlab.runs import Run

    if path.startswith("poly"):
        from reasonlab.methods import polychromic as recipe
    else:
        from reasonlab.methods import markovian as recipe
    yaml_path, overrides = ours_overrides(args, path)
    cfg = load_config(yaml_path, overrides)
    run_dir = work / path
    run = Run(cfg, run_dir, install_signals=False)
    rows: list[dict] = []
    real_make = G.make_sampler
    real_log = run.log
    prof = {"p": None}
    clock = {"c": time.process_time()}

    def make_sampler(*a, **k):
        s = TimedSampler(real_make(*a, **k), force_min=path.startswith("poly"))
        SPLIT.hook(lm_modules(a[1] if len(a) > 1 else k["model"]))
        SPLIT.take()
        clock["c"] = time.process_time()
        return s

    def log(step, metrics):
        if "time/step_s" in metrics:
            now = time.process_time()
            rows.append({**SPLIT.take(), "cpu_step": now - clock["c"]})
            clock["c"] = now
            print(f"    step {step}: {metrics['time/step_s']:.2f} s", flush=True)
            if args.profile and step == args.steps - 1:  # the next one is the last: profile it
                prof["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof["p"].__enter__()
            elif prof["p"] is not None and step == args.steps:
                prof["p"].__exit__(None, None, None)
        return real_log(step, metrics)

    run.log = log
    real_generate = getattr(recipe, "generate", None)

    def ref_generate(*a, **k):  # markovian: the reference's greedy CoT (own loop)
        with SPLIT.generating("refgen"):
            return real_generate(*a, **k)

    with contextlib.ExitStack() as st:
        st.enter_context(patched(G, "make_sampler", make_sampler))
        st.enter_context(patched(training, "evals_at", lambda *a, **k: None))
        st.enter_context(patched(training, "final_eval", lambda *a, **k: None))
        if real_generate is not None:
            st.enter_context(patched(recipe, "generate", ref_generate))
        try:
            recipe.main(cfg, run)
        finally:
            SPLIT.unhook()
            run.close()
    if prof["p"] is not None:
        print(prof["p"].key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows), flush=True)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "time/step_s" in r]
    out = []
    for r, m in zip(rows, logged):
        out.append({"step": m["time/step_s"], "cpu_step": r["cpu_step"], **{k: r[k] for k in KEYS}})
    recipe_times = [{k: v for k, v in m.items() if k.startswith("time/")} for m in logged]
    gc.collect()
    return out, recipe_times


# ----------------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    ap.add_argument("--steps", type=int, default=3, help="steps per run; the median is over steps 2..N")
    ap.add_argument("--runs", type=int, default=2, help="runs per path, alternating between paths")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (1 prompt per step)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sample (exactly: EOS masked)")
    ap.add_argument("--terms", type=int, default=9, help="terms of the arithmetic question (9: 53-56 prompt tokens)")
    ap.add_argument("--same-question", action="store_true", help="one question for every step (markovian's "
                    "reference CoT is then cached after step 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU, torch's on CUDA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vllm", action="store_true", help="vLLM sampling on both sides (CUDA only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the last step of our paths")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--out", default=None, help="folder for the run folders (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write every step's numbers to this JSON file")
    args = ap.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        ap.error(f"unknown path {bad[0]}; choose from {', '.join(PATHS)}")
    if args.profile and args.steps < 2:
        ap.error("--profile profiles the last step and needs --steps >= 2")
    if args.vllm and args.device != "cuda":
        ap.error("--vllm needs --device cuda")
    if any(p.startswith("trl") for p in paths):
        try:
            import trl  # noqa: F401
        except ImportError:
            print(INSTALL_HINT)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    install_backward_timer()
    import trl as _trl  # noqa: F401 (versions for the header)

    task, exs = step_examples(args)
    from transformers import AutoTokenizer

    from reasonlab.models.embedded import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m")))
    lens = [len(tok(task.prompt(e, "markovian"))["input_ids"]) for e in exs]
    import peft

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"trl {sys.modules['trl'].__version__}; {torch.get_num_threads()} thread(s); device {args.device}"
          f"{' + vLLM' if args.vllm else ''}")
    print(f"1 prompt x {args.samples} samples x {args.new} new tokens per step; prompt tokens per step {lens}; "
          f"{args.steps} steps x {args.runs} runs per path", flush=True)
    work_ctx = tempfile.TemporaryDirectory() if args.out is None else contextlib.nullcontext(args.out)
    results: dict[str, list[dict]] = {p: [] for p in paths}  # path -> one summary per run
    every: dict[str, list] = {p: [] for p in paths}
    with work_ctx as work:
        for r in range(args.runs):
            for p in paths:
                print(f"[run {r + 1}/{args.runs}] {p}", flush=True)
                wdir = Path(work) / f"run{r}"
                wdir.mkdir(parents=True, exist_ok=True)
                if p.startswith("trl"):
                    rows, extra = run_trl(args, 0.04 if p.endswith("0.04") else 0.0, wdir), None
                else:
                    rows, extra = run_ours(args, p, wdir)
                gc.collect()
                s = summarize(rows)
                results[p].append(s)
                every[p].append({"steps": rows, "recipe_time_metrics": extra})
                for pre, name in (("", "wall"), ("cpu_", "cpu")):
                    print(f"    median steps 2..{args.steps} ({name} s): step {s[pre + 'step']:.2f} | gen "
                          f"{s[pre + 'gen']:.2f} refgen {s[pre + 'refgen']:.2f} fwd {s[pre + 'fwd']:.2f} (grad "
                          f"{s[pre + 'fwd_grad']:.2f}, no-grad {s[pre + 'fwd_nograd']:.2f}) bwd {s[pre + 'bwd']:.2f} "
                          f"other {s[pre + 'other']:.2f}", flush=True)
    for pre, name in (("", "wall-clock"), ("cpu_", "process CPU")):
        print(f"\n{name} seconds per step (CPU seconds do not count time the process waited for a core)")
        print("| path | step s (per run) | ratio vs TRL (per run) | gen | refgen | fwd (grad / no-grad) | bwd | other |")
        print("|---|---|---|---|---|---|---|---|")
        for p in paths:
            runs = results[p]
            steps = " / ".join(f"{x[pre + 'step']:.1f}" for x in runs)
            ratio = ""
            peer = PAIRS.get(p)
            if peer in results and results[peer]:
                rs = [a[pre + "step"] / b[pre + "step"] for a, b in zip(runs, results[peer])]
                ratio = " / ".join(f"{r:.2f}" for r in rs) + f"x {peer}"
            m = {k: med([x[k] for x in runs]) for k in runs[0]}
            print(f"| {p} | {steps} | {ratio} | {m[pre + 'gen']:.1f} | {m[pre + 'refgen']:.1f} | {m[pre + 'fwd']:.1f} "
                  f"({m[pre + 'fwd_grad']:.1f} / {m[pre + 'fwd_nograd']:.1f}) | {m[pre + 'bwd']:.1f} | "
                  f"{m[pre + 'other']:.1f} |")
    print("(split columns: the median over runs of each run's median over steps 2..N)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "prompt_tokens": lens, "summary": results,
                                               "steps": every}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
