"""The mechanics every recipe shares, one function each (the loops stay in the recipes, one file per method).

    compute = training.setup(cfg.train, run)              # device, precision, processes -> env.json, warnings
    model, opt = compute.prepare(model, opt)              # on the device; DDP across processes (accelerate)
    sched = training.lr_schedule(opt, cfg.train)          # constant | linear | cosine after a linear warm-up
    with compute.autocast():                              # bf16 / fp16 autocast (fp32: nothing)
        loss = ...
    compute.backward(loss)                                # fp16: scaled
    gnorm = compute.clip_grad_norm(params, cfg.train.grad_clip)
    opt.step()
    records = training.sharded(compute, examples, fn)     # evaluation split over processes, gathered in order
    start, best, state = training.resume(run, "accuracy", modules=..., optimizer=opt, scheduler=sched)
    if training.evals_pending(run, start):                # before training (or what a signal interrupted)
        training.evals_at(run, start, cfg.train, cfg.eval.every, offer, save)
    ... after each step: training.evals_at(run, step, cfg.train, cfg.eval.every, offer, save)
    result = training.final_eval(run, step, best, modules=..., validate=..., save=..., test=...)

Interruption: SIGTERM/SIGINT set the run's stop flag. Training stops at the next step boundary; an evaluation stops at
its next batch (its loops call check_stop / generate_checked, and `sharded` makes every process stop together) by
raising EvalInterrupted, which evals_at / final_eval turn into a checkpoint from which --resume redoes it, exactly.

Distributed: `reasonlab run` under `accelerate launch` (or torchrun) starts one process per device; `setup` builds an
accelerate `Accelerator` on the process group and `prepare` wraps the trainable modules in DistributedDataParallel, so
gradients are averaged by DDP's hooks during backward (no gradient all-reduce by hand). Every rank takes an equal
contiguous shard of each global batch (reasonlab.dist.shard) and losses are means over equal shards, so the update
equals the one-process update on the same global batch. Only rank 0 writes the run folder.

FSDP and DeepSpeed are not offered: every LLM recipe here runs several forwards of one module before one backward (a
shared prompt's KV cache reused across its group, the answer scored after the CoT, the reference), and FSDP2 cannot
backpropagate through that (measured with torch 2.13, 2 gloo processes: "setStorage ... storage of size 0").
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from reasonlab import dist
from reasonlab.errors import UserError

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # ours -> accelerate's mixed_precision
SIGNALS = ("SIGTERM", "SIGINT")


class ComputeError(UserError, RuntimeError):
    """A device / precision / process request this machine cannot serve (one line naming the fix)."""


class EvalInterrupted(Exception):
    """SIGTERM/SIGINT arrived during an evaluation: it stopped at its next batch and wrote no result."""


def check_stop(stop: Callable[[], bool] | None) -> None:
    """Evaluation loops call this before each batch with `stop` = Run.signalled: EvalInterrupted once it is True."""
    if stop is not None and stop():
        raise EvalInterrupted()


def generate_checked(sampler, prompts: list[list[int]], gc, seeds: list[int] | None = None,
                     stop: Callable[[], bool] | None = None) -> list:
    """sampler.generate(prompts, gc, seeds) with `stop` polled between calls. The own loop sorts the prompts by
    length; grouped, it streams them through gc.batch_size rows (continuous batching), so each call here takes
    STREAM_BATCHES batches' worth of the sorted prompts; ungrouped, the calls are exactly its static batches. A
    prompt's samples come from its own generator whatever shares its rows, so they are those of one call
    (tests/test_resume.py checks it). The hf backend decodes prompt by prompt anyway; vLLM schedules its own batches, so it gets larger
    calls (its numbers do not depend on the call size only up to its batch invariance)."""
    from reasonlab.eval.generate import prompt_seeds

    if stop is None or not prompts:
        return sampler.generate(prompts, gc, seeds=seeds)
    seeds = prompt_seeds(gc.seed, len(prompts)) if seeds is None else list(seeds)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if getattr(sampler, "name", "own") == "vllm":
        per = VLLM_CHUNK
    elif gc.grouped:  # the own loop streams prompts through batch_size rows: a call spans several batches' worth
        per = max(1, STREAM_BATCHES * gc.batch_size // gc.n)
    else:  # rows of one prompt are adjacent: whole batches of rows end on a prompt boundary every lcm(n, batch) rows
        per = gc.batch_size // math.gcd(gc.n, gc.batch_size)
    out: list = [None] * len(prompts)
    for c in range(0, len(order), per):
        check_stop(stop)
        idx = order[c:c + per]
        for i, r in zip(idx, sampler.generate([prompts[i] for i in idx], gc, seeds=[seeds[i] for i in idx])):
            out[i] = r
    return out


VLLM_CHUNK = 256  # prompts per vLLM call between two polls of the stop flag
STREAM_BATCHES = 4  # the own loop's batches of prompts per call between two polls (refills happen inside a call)


# ----------------------------------------------------------------------------------------------------------- device

def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' / 'cuda:N' need a CUDA device; several processes take one GPU
    each (LOCAL_RANK), so 'cuda:N' is for one process only."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ComputeError(f"train.device={spec} but torch {torch.__version__} sees no CUDA device (a CPU build, "
                               "or no GPU here): use train.device=auto or cpu")
        if ":" in spec:
            index = int(spec.split(":")[1])
            if dist.world_size() > 1:
                raise ComputeError(f"train.device={spec} with {dist.world_size()} processes: each process takes its "
                                   "own GPU; use train.device=cuda (and CUDA_VISIBLE_DEVICES to choose them)")
            if index >= torch.cuda.device_count():
                raise ComputeError(f"train.device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist")
            return torch.device("cuda", index)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ComputeError(f"train.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ComputeError("train.precision=fp16 needs a CUDA device (loss scaling); on CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ComputeError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16: use fp16")


def gpu_expectation(tc, device: torch.device) -> str | None:
    """A one-line warning when the config is sized for GPUs this run does not have, else None."""
    if not tc.gpus:
        return None
    want = f"{tc.gpus} GPU{'s' if tc.gpus > 1 else ''}" + (f" with >= {tc.gpu_memory_gb} GB" if tc.gpu_memory_gb else "")
    if device.type != "cuda":
        return (f"this config is sized for {want} (train.gpus) but runs on the CPU: expect it to be far too slow and "
                "large for this machine; run it on a GPU machine")
    have = torch.cuda.device_count()
    mem = torch.cuda.get_device_properties(device).total_memory / 2**30
    if tc.gpu_memory_gb and mem < tc.gpu_memory_gb:
        return f"this config is sized for {want} but {torch.cuda.get_device_name(device)} has {mem:.0f} GB"
    if dist.world_size() < tc.gpus <= have:
        return f"this config is sized for {want} but runs in {dist.world_size()} process(es): use accelerate launch"
    return None


# ---------------------------------------------------------------------------------------------------------- compute

@dataclass
class Compute:
    """Where and how a recipe computes: one device, one precision, `world_size` processes (accelerate underneath)."""

    accelerator: Any
    device: torch.device
    precision: str
    world_size: int
    rank: int
    warning: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> str:
        return "ddp" if self.world_size > 1 else "none"

    def describe(self) -> dict:
        """What env.json and the report record: the device and precision actually used."""
        d = {"device": str(self.device), "precision": self.precision, "world_size": self.world_size,
             "distributed": self.distributed, "backend": dist_backend()}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
            d["gpu_memory_gb"] = round(torch.cuda.get_device_properties(self.device).total_memory / 2**30, 1)
        if self.warning:
            d["warning"] = self.warning
        return d

    def line(self) -> str:
        d = self.describe()
        gpu = f" ({d['gpu']}, {d['gpu_memory_gb']} GB)" if "gpu" in d else ""
        return (f"compute: {d['device']}{gpu}, {d['precision']}, {self.world_size} process"
                f"{'es' if self.world_size > 1 else ''}{' (DDP, ' + d['backend'] + ')' if self.world_size > 1 else ''}")

    # --- models and optimizers
    def prepare(self, *objs, find_unused: bool = False):
        """Modules to the device (DDP-wrapped when there are several processes and the module trains), optimizers
        wrapped for loss scaling. Returns the objects in order (one object: that object). `find_unused`: some
        trainable parameters may get no gradient in a step (an auxiliary head with weight 0); by default every
        recipe's loss touches every trainable parameter, and a term that does not is the gradient audit's business."""
        from accelerate.utils import DistributedDataParallelKwargs

        self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=find_unused)
        out = []
        for o in objs:
            if isinstance(o, torch.nn.Module) and not any(p.requires_grad for p in o.parameters()):
                out.append(o.to(self.device))  # nothing to synchronize: DDP refuses modules without gradients
            else:
                out.append(self.accelerator.prepare(o))
        return out[0] if len(out) == 1 else tuple(out)

    def unwrap(self, model):
        """The module under the DDP wrapper (for generation, the reference policy, checkpoints)."""
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=True)

    def autocast(self):
        return self.accelerator.autocast() if self.precision != "fp32" else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """Clip the global gradient norm to max_norm (0: no clipping) and return the norm before clipping (fp16
        gradients unscaled first)."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return 0.0
        return float(self.accelerator.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else math.inf))

    def no_sync(self, model):
        """Accumulate gradients locally (no DDP all-reduce) for all but the last backward of an optimizer step."""
        return self.accelerator.no_sync(model) if self.world_size > 1 else contextlib.nullcontext()

    # --- data
    def to(self, x):
        """Tensors (also inside dicts, lists, tuples and objects with `.to`) onto the device."""
        if torch.is_tensor(x) or hasattr(x, "to") and not isinstance(x, torch.nn.Module):
            return x.to(self.device)
        if isinstance(x, dict):
            return {k: self.to(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self.to(v) for v in x)
        return x

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global batch (its size must divide over the processes)."""
        return dist.shard(items, self.rank, self.world_size)

    # --- metrics
    def mean(self, value) -> float:
        """The mean of a per-rank scalar over ranks (every rank gets it)."""
        return float(dist.all_reduce_mean(torch.as_tensor(float(value), dtype=torch.float64)))

    def sum(self, value) -> float:
        return float(dist.all_reduce_sum(torch.as_tensor(float(value), dtype=torch.float64)))

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        return dist.gather_object(obj)


def autocast_of(compute: Compute | None):
    """compute.autocast(), or nothing when there is no Compute (library callers, tests)."""
    return compute.autocast() if compute is not None else contextlib.nullcontext()


def dist_backend() -> str | None:
    import torch.distributed as td

    return td.get_backend() if dist.is_dist() else None


def auto_threads() -> int:
    """CPU threads per process when none are set (train.threads 0, no --threads): the cores not already busy (the
    1-minute load average counts other jobs' runnable threads) shared among this machine's processes, at least 1.
    OpenMP threads that outnumber the free cores wait on each other at every op: an eval measured 1.3-1.7 tokens/s
    with 2 threads on a 2-core machine another job kept busy, against 14.5 with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, int(cores - busy + 0.5) // procs)


MALLOC_KEEP = 1 << 30  # bytes: allocations below this come from (and go back to) the heap, not fresh mappings
_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Keep memory that torch frees in the process heap for its next allocation (glibc only; once per process).

    glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh pages from
    the kernel and unmaps them on free, so each training step on the CPU faults in its activations page by page
    again: SmolLM2-135M's three Markovian forwards + backward (8 x 120 positions) spent 2-7 s of system time per step
    in page faults. With the mmap threshold at 1 GiB and trimming off, the second step's system time is 0.01 s and
    its forwards 1.2-2.6x faster (benchmarks/README.md). The cost: resident memory stays at the peak. Returns whether
    it was applied; REASONLAB_MALLOC=glibc keeps glibc's defaults."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("REASONLAB_MALLOC", "") == "glibc" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _MALLOC_TUNED = bool(mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MALLOC_KEEP))) and bool(
        mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
    return _MALLOC_TUNED


def init_processes(tc) -> None:
    """Start the process group before anything collective (`reasonlab run` calls it before naming the run folder):
    gloo when the processes compute on the CPU, NCCL on GPUs."""
    dist.init(cpu=tc.device == "cpu" or not torch.cuda.is_available())


def setup(tc, run=None) -> Compute:
    """Device, precision and processes for a recipe from its `train` section (reasonlab.config.TrainConfig): threads,
    an accelerate Accelerator on the process group, what was chosen written to env.json and printed, and a one-line
    warning (printed, in events.jsonl and the report) when the config is sized for GPUs this run does not have."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if tc.threads:  # 0: what the command line chose (reasonlab run: auto_threads()) or torch's default
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    check_precision(tc.precision, device)
    cpu = device.type == "cpu"
    if cpu:
        keep_freed_memory()
    init_processes(tc)
    if not dist.is_dist():  # one process: forget an earlier Accelerator of this process (tests run several recipes)
        AcceleratorState._reset_state(reset_partial_state=True)
        if device.type == "cuda":
            os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)
    acc = Accelerator(cpu=cpu, mixed_precision=PRECISIONS[tc.precision])
    os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
    kind = str(acc.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ComputeError(f"launched with {kind}, which reasonlab's recipes do not support (they run several forwards "
                           "of one module per backward): launch with --config_file configs/accelerate/ddp.yaml")
    if acc.num_processes != dist.world_size():
        raise ComputeError(f"accelerate sees {acc.num_processes} process(es) but the launcher started "
                           f"{dist.world_size()}: launch with `accelerate launch` or torchrun")
    compute = Compute(acc, acc.device if not cpu else torch.device("cpu"), tc.precision, dist.world_size(),
                      dist.rank(), gpu_expectation(tc, acc.device))
    if run is not None:
        run.record_env(compute=compute.describe())
        if compute.warning:
            run.event(0, "gpu_expected", compute.warning, severity="warning")
    dist.print0(compute.line())
    if compute.warning:
        dist.print0(f"warning: {compute.warning}")
    if run is not None:
        progress_start(run, tc.steps)  # model loading and the first evaluation are not silent either
    return compute


def check_inputs(cfg, dry_run: bool = False) -> None:
    """What a config names that may not exist here, checked before a run folder is made or any model loads, each
    problem one UserError line: the task and its arguments, its data files (tasks that read files; a dry run leaves
    missing data to the recipe, which may stand in examples), and every language model it loads (a dry run stands
    in a tiny model for one that is not available offline)."""
    from reasonlab.config import ConfigError
    from reasonlab.tasks import get_task

    data = getattr(cfg, "data", None)
    name = getattr(data, "task", None)
    if isinstance(name, str) and name:
        try:
            task = get_task(name, **(getattr(data, "task_args", None) or {}))
        except TypeError as e:
            if "argument" not in str(e):
                raise
            raise ConfigError(f"data.task_args for {name}: {str(e).split('.')[-1].strip()} (see the task's "
                              f"constructor: `reasonlab data {name}` lists its examples)") from None
        if not dry_run and hasattr(task, "data_dir"):  # a task that reads files: are they here?
            for split in dict.fromkeys(("train", getattr(data, "val_split", None), getattr(data, "test_split", None))):
                if split:
                    task.examples(split)
    if dry_run:
        return
    from reasonlab.eval.harness import _check_base

    for section in ("model", "source", "target"):
        spec = getattr(getattr(cfg, section, None), "name", None)
        if isinstance(spec, str) and spec:
            _check_base(spec)


def seed_everything(seed: int) -> None:
    """The same seed on every rank: identical initialization and data order everywhere."""
    dist.seed_everything(seed)


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (on a terminal, below the training progress line, which redraws itself after)."""
    if dist.is_main():
        Progress.clear_line()
    dist.print0(*args, **kwargs)


def vllm_settings(mc, seed: int) -> dict:
    """The vLLM engine of a causal-LM model config (reasonlab.models.lm.ModelConfig): the same base weights the policy
    was loaded from, in the policy's dtype."""
    from reasonlab.models.lm import resolve_model_path

    path = mc.name if mc.name == "tiny-random" else resolve_model_path(mc.name)[0]
    return {"model_path": path, "dtype": mc.dtype, "gpu_memory_utilization": mc.vllm_memory,
            "max_model_len": mc.vllm_max_len, "seed": seed}


def sync_sparse_grads(params, compute: Compute) -> None:
    """Average SPARSE gradients (a puzzle-id embedding table) over the processes. DDP all-reduces dense buckets only
    and NCCL has no sparse all-reduce, so each process's touched rows (indices, values) are all-gathered and summed /
    world size — what the official TRM does for its puzzle embedding. Keep such tables out of DDP
    (`ddp_ignore`); dense parameters never come here."""
    if compute.world_size == 1:
        return
    for p in params:
        g = p.grad
        if g is not None and not g.is_sparse:
            raise ValueError("sync_sparse_grads is for sparse gradients; DDP synchronizes dense ones")
        g = g.coalesce() if g is not None else None
        local = (g.indices().cpu(), g.values().cpu()) if g is not None else None
        parts = [x for x in compute.gather(local) if x is not None]
        if not parts:
            continue
        idx = torch.cat([i for i, _ in parts], dim=1)  # (1, n_rows_all)
        vals = torch.cat([v for _, v in parts]) / compute.world_size  # (n_rows_all, D)
        p.grad = torch.sparse_coo_tensor(idx, vals, p.shape, check_invariants=False).coalesce().to(p.device)


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """Parameters DDP must leave alone (synchronized another way, e.g. sync_sparse_grads)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


# --------------------------------------------------------------------------------------------------------- schedule

def lr_factor(step: int, tc) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warm-up over train.warmup_steps, then constant, or a
    linear / cosine decay to train.min_lr_ratio at train.steps."""
    w = tc.warmup_steps
    if step < w:
        return (step + 1) / w
    if tc.schedule == "constant":
        return 1.0
    t = min(1.0, (step - w) / max(1, tc.steps - w))
    lo = tc.min_lr_ratio
    if tc.schedule == "linear":
        return lo + (1.0 - lo) * (1.0 - t)
    if tc.schedule == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"train.schedule must be constant | linear | cosine, got {tc.schedule!r}")


def lr_schedule(opt, tc) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over lr_factor; step it once per optimizer step (its state goes into every checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))


# ------------------------------------------------------------------------------------------------------- evaluation

def eval_due(every: int, step: int, steps: int) -> bool:
    """A periodic validation after `step` (1-based count of steps done)? Never at the last step: the final
    validation covers it. every <= 0: no periodic evaluation."""
    return every > 0 and step % every == 0 and step < steps


def sharded(compute: Compute | None, items: list, fn: Callable[[list, int], list]) -> list:
    """fn(local_items, offset) on each rank's contiguous slice of `items` (offset = the slice's first global index,
    for per-example seeds), the per-item results concatenated in the global order on every rank. Slices may differ
    in size by one, so nothing inside fn may be collective."""
    if compute is None or compute.world_size == 1:
        return list(fn(list(items), 0))
    n, k = len(items), compute.world_size
    bounds = [round(i * n / k) for i in range(k + 1)]
    a, b = bounds[compute.rank], bounds[compute.rank + 1]
    try:
        local, stopped = list(fn(list(items[a:b]), a)), False
    except EvalInterrupted:  # this process saw the signal: the gather below tells the others
        local, stopped = [], True
    parts = compute.gather((stopped, local))
    if any(s for s, _ in parts):
        raise EvalInterrupted()
    if len(local) != b - a:
        raise RuntimeError(f"sharded: fn returned {len(local)} results for {b - a} items")
    return [r for _, part in parts for r in part]


@dataclass
class Best:
    """The checkpoint chosen on validation (the highest `metric` so far; a tie keeps the earlier step). Saved as
    checkpoints/best; the test split is evaluated once, at the end, on it — never used to choose."""

    metric: str
    value: float = -math.inf
    step: int = -1
    last_offered: int | None = field(default=None, compare=False)

    def offer(self, step: int, value: float, save: Callable[..., Any]) -> bool:
        """A validation result of the weights at `step`; a new best is saved as checkpoints/best (collective)."""
        self.last_offered = step
        if value > self.value:
            self.value, self.step = float(value), step
            save(step, name="best")
            return True
        return False

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "last_offered": self.last_offered}

    @classmethod
    def from_state(cls, state: dict, metric: str) -> "Best":
        """From a checkpoint's state (older checkpoints stored {"acc" | "value", "step"})."""
        s = state.get("best") or {}
        value = s.get("value", s.get("acc", -math.inf))
        return cls(s.get("metric", metric), -math.inf if value is None else float(value), int(s.get("step", -1)),
                   s.get("last_offered"))


def checkpoint_due(tc, step: int) -> bool:
    """A periodic step_N checkpoint after `step` (train.checkpoint_every; 0: only at the end and on stop)?"""
    return tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0


def evals_at(run, step: int, tc, every: int, evaluate: Callable[[int], Any], save: Callable[..., Any]) -> None:
    """What follows `step` steps: the evaluations due then (step 0: before training, unless eval.every < 0; later:
    eval_due), `evaluate(step)` (e.g. best.offer(step, validate(step), save)), then train.checkpoint_every's
    checkpoint. The evaluations are one resume point: a signal during them (EvalInterrupted) checkpoints the weights
    of `step` with the run folder as it was before them (Run.begin_evals), so --resume redoes them whole, and the run
    leaves at its next should_stop."""
    if (every >= 0) if step == 0 else eval_due(every, step, tc.steps):
        run.begin_evals(step)
        try:
            evaluate(step)
        except EvalInterrupted:
            run.eval_interrupted(step, f"the evaluations after step {step}")
            save(step)
            return
        finally:
            run.end_evals()
    if step > 0 and checkpoint_due(tc, step):
        save(step)


def evals_pending(run, start: int) -> bool:
    """Before the training loop: are the evaluations after `start` still to do? A new run: those before training; a
    resumed one: those a signal interrupted (its checkpoint says "redo_evals")."""
    ck = getattr(run, "resume_from", None)
    if ck is None:
        return start == 0
    return (ck.state.get("run_folder") or {}).get("redo_evals") == start


def resume(run, metric: str, *, modules: dict, optimizer=None, scheduler=None, watcher=None) -> tuple[int, Best, dict]:
    """(start step, the validation choice, the checkpoint's recipe state) from the checkpoint `--resume` picked:
    weights, optimizer, schedule, every process's RNG streams, Best, the watcher's windows; a new run: (0, Best, {})."""
    if run.resume_from is None:
        return 0, Best(metric), {}
    state = run.resume_from.restore(modules=modules, optimizer=optimizer, scheduler=scheduler)
    if watcher is not None:
        load_watcher_state(watcher, state.get("watcher"))
    redo = (state.get("run_folder") or {}).get("redo_evals") is not None
    print0(f"resumed from {run.resume_from.path} at step {state['step']}"
           + (" (redoing the evaluations a signal interrupted)" if redo else ""))
    return int(state["step"]), Best.from_state(state, metric), state


def watcher_state(w) -> dict:
    """What reasonlab.watch.Watcher carries between steps (streaks toward `patience`, raised conditions, whether the
    policy moved), for checkpoints. Its stop_reason is not kept: a resumed run is asked to go on."""
    return {"streak": dict(w.streak), "active": sorted(w.active), "moved": bool(w.moved)}


def load_watcher_state(w, state: dict | None) -> None:
    if state:
        w.streak, w.active, w.moved = dict(state["streak"]), set(state["active"]), bool(state["moved"])


def final_eval(run, step: int, best: Best, *, modules: dict, validate: Callable[[int], float],
               save: Callable[..., Any], test: Callable[[int], Any],
               on_restore: Callable[[], Any] | None = None) -> Any | None:
    """The end of every recipe: checkpoint the final weights; after SIGTERM/SIGINT stop there (the checkpoint is what
    a preempted job needs; after evaluations a signal interrupted, evals_at already wrote it); validate the final
    weights unless they were just validated; load checkpoints/best (the validation choice) into `modules` on every
    process, then `on_restore()` (e.g. hand the weights to a vLLM engine); evaluate the test split ONCE on it.
    Returns test(best.step), or None after a signal (also one during these evaluations: no result is written, and
    --resume from the checkpoint written here redoes them)."""
    from reasonlab.runs import open_checkpoint

    if getattr(run, "interrupted_eval", None) is None:  # else evals_at's checkpoint (redo the evals) is the one
        save(step)
    if run.stop_reason in SIGNALS:
        return None
    try:  # a signal from here on: the checkpoint just written is the resume point (the final evals are redone)
        if best.last_offered != step:
            best.offer(step, validate(step), save)
        # always reload: checkpoints/best holds the evaluated weights (an EMA, when the recipe evaluates one)
        open_checkpoint(run.dir / "checkpoints" / "best").restore(modules=modules, rng=False)
        if on_restore is not None:
            on_restore()
        return test(best.step)
    except EvalInterrupted:
        run.eval_interrupted(step, "the final evaluations")
        return None


# --------------------------------------------------------------------------------------------------------- progress

PROGRESS_KEYS = {  # what the progress line shows, from the first key a recipe logs
    "loss": ("train/loss",),
    "reward": ("rollout/reward_mean",),
    "acc": ("train/exact_accuracy", "train/acc", "train/accuracy", "rollout/accuracy", "train/token_accuracy"),
}


def progress(run, step: int, total: int, metrics: dict | None = None) -> None:
    """The training progress of `run`, one call per loop iteration after its step (`step` = steps done): on a terminal
    one line redrawn in place (step/total, loss, reward or accuracy, step time, ETA, and a clock while a step or an
    eval runs); in a log file a plain line at the first step, at the last and at most every PROGRESS_EVERY_S seconds
    between, and never more than that apart while the run is open (a heartbeat thread says what is still running).
    Rank 0 only; metric values may be tensors (read only when a line is drawn). Nothing is written to the run folder:
    metrics.jsonl is the record, this is for the person watching."""
    p = progress_start(run, total)
    if p is not None:
        p.update(step, metrics or {})


def progress_start(run, total: int) -> "Progress | None":
    """The progress of `run`, its heartbeat running from now on (training.setup calls this: the time before the first
    step, model loading and the first evaluation, has its heartbeat too). None off rank 0 and in dry runs."""
    if not dist.is_main() or getattr(run, "dry_run", False):
        return None
    p = _PROGRESS.get(id(run))
    if p is None or p.run is not run:
        p = _PROGRESS[id(run)] = Progress(run, total)
        p.start()
    return p


PROGRESS_EVERY_S = 30.0
_PROGRESS: dict[int, "Progress"] = {}


class Progress:
    """The state behind `progress()` for one run; a daemon thread keeps a line coming while nothing else does."""

    _open_line: "Progress | None" = None  # the progress whose line is on the terminal now (print0 clears it)
    _lock = None

    def __init__(self, run, total: int, stream=None, every_s: float | None = None, tty: bool | None = None):
        import sys
        import threading
        import time

        if Progress._lock is None:
            Progress._lock = threading.RLock()
        self.run, self.total = run, int(total)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.step = self.first_step = self.t_first = self.t_last_line = None
        self.t_last_step = time.monotonic()  # before the first step: since the progress began
        self.dts: list[float] = []
        self.values: dict = {}
        self._thread = threading.Thread(target=self._heartbeat, name="reasonlab-progress", daemon=True)
        self._stop = threading.Event()

    # --- the main thread
    def update(self, step: int, metrics: dict) -> None:
        import time

        now = time.monotonic()
        with Progress._lock:
            if self.step is not None and step > self.step:
                self.dts.append((now - self.t_last_step) / (step - self.step))
                self.dts = self.dts[-50:]
            if self.step is None:
                self.first_step, self.t_first = step, now
                self.start()
            self.step, self.t_last_step = step, now
            for name, keys in PROGRESS_KEYS.items():
                k = next((k for k in keys if k in metrics), None)
                if k is not None:
                    self.values[name] = metrics[k]
            done = step >= self.total
            since = None if self.t_last_line is None else now - self.t_last_line
            # a terminal redraws at most 5 times a second (drawing reads the values: a device sync on GPUs)
            if done or step == self.first_step or since is None or since >= (0.2 if self.tty else self.every_s):
                self._emit(self.line(now), final=done)

    def start(self) -> None:
        import atexit

        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
            # joined before the interpreter tears torch down: a daemon thread still inside a torch call (the line
            # reads tensor values) at exit aborted a finished run ("terminate called without an active exception")
            atexit.register(self.stop)

    def stop(self) -> None:
        import threading

        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    # --- the line
    def line(self, now: float, waiting: float | None = None) -> str:
        if self.step is None:
            return f"train 0/{self.total} | setup (model, data, first evaluation) running for {_dur(waiting or 0.0)}"
        parts = [f"train {self.step}/{self.total}"]
        for name, v in self.values.items():
            try:
                x = float(v.detach().float().mean()) if hasattr(v, "detach") else float(v)
            except (TypeError, ValueError):
                continue
            parts.append(f"{name} {x:.4g}")
        if self.dts:
            recent = sorted(self.dts[-20:])
            parts.append(f"{_dur(recent[len(recent) // 2], fine=True)}/step")
            done = self.step - self.first_step
            per = (self.t_last_step - self.t_first) / done if done > 0 else recent[len(recent) // 2]
            if self.step < self.total:  # mean time per step so far: periodic evals included
                parts.append(f"ETA {_dur(per * (self.total - self.step))}")
        if waiting is not None:
            what = "final evaluation and checkpoint" if self.step >= self.total else f"step {self.step + 1} or an eval"
            parts.append(f"{what} running for {_dur(waiting)}")
        return " | ".join(parts)

    def _emit(self, text: str, final: bool = False) -> None:
        import time

        with Progress._lock:
            if self.tty:
                self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
                Progress._open_line = None if final else self
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
            self.t_last_line = time.monotonic()

    @classmethod
    def clear_line(cls) -> None:
        """Take an open terminal progress line off the screen (the heartbeat redraws it within a second)."""
        if cls._lock is None:
            return
        with cls._lock:
            p = cls._open_line
            if p is not None:
                p.stream.write("\r\x1b[K")
                p.stream.flush()
                cls._open_line = None

    # --- the heartbeat thread
    def _alive(self) -> bool:
        """Until the run is closed (Run.close drops its tracker) or asked to stop."""
        run = self.run
        return getattr(run, "tracker", None) is not None and getattr(run, "stop_reason", None) is None

    def _heartbeat(self) -> None:
        import time

        while True:
            stopped = self._stop.wait(1.0)
            with Progress._lock:
                if stopped or not self._alive():
                    if self.tty and Progress._open_line is self:
                        self.stream.write("\n")
                        self.stream.flush()
                        Progress._open_line = None
                    _PROGRESS.pop(id(self.run), None)
                    return
                now = time.monotonic()
                waiting = now - self.t_last_step
                quiet = now - (self.t_last_line if self.t_last_line is not None else self.t_last_step)
                if self.tty and self.step is not None:
                    if waiting >= 2.0:  # a clock while nothing else moves the line
                        self._emit(self.line(now, waiting))
                elif quiet >= self.every_s:  # a log, or a terminal still showing model loading's own bars
                    self._emit(self.line(now, waiting))


def _dur(seconds: float, fine: bool = False) -> str:
    """3.2s | 420ms | 4m05s | 2h13m"""
    if fine and seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if fine and seconds < 10 else f"{seconds:.0f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"
