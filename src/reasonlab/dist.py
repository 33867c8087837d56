"""Low-level distributed helpers (rank, collectives on Python objects). Recipes run unchanged under `accelerate launch`
(or torchrun): one process per device, gloo on CPU, NCCL on GPU. Everything here is a no-op in a single process; the
training mechanics built on it (DDP, precision, sharded evaluation) are in reasonlab.training.

    dist.init(cpu=True)            # before anything collective; `reasonlab run` calls it
    dist.print0("only rank 0")
    seed_everything(cfg.seed)      # same seed on every rank: identical init and identical data permutation
    local = dist.shard(batch)      # this rank's slice of a global batch
"""

from __future__ import annotations

import os
import random
import sys
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as td

_STARTED = False  # set by init() when it starts a process group


def init(cpu: bool | None = None) -> None:
    """Initialise the process group when launched with several processes (WORLD_SIZE > 1): gloo when the processes
    compute on the CPU (`cpu`, default: no CUDA device), NCCL on GPUs. accelerate only takes the CPU path when told so:
    without it, processes on a machine without CUDA silently run as independent single processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)
        global _STARTED
        _STARTED = True
        import atexit

        atexit.register(shutdown)  # a backstop: `reasonlab run` shuts down itself once the run folder is final


def shutdown() -> None:
    """Destroy the process group while the interpreter is fully alive (the command line then leaves through
    exit_now, which is what keeps a finished run from aborting at exit). No barrier: after a failure on one rank the
    others must not wait for it. Idempotent."""
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def started() -> bool:
    """This process started a process group (it may since have been destroyed)."""
    return _STARTED


def exit_now(code: int) -> NoReturn:
    """End a process that ran collectives without interpreter teardown: the atexit handlers run (progress line, the
    process-group backstop, logging), stdout and stderr are flushed, then os._exit. Why: gloo's worker thread drops
    the last collective's tensors after the caller has moved on, and dropping a tensor that has a Python object takes
    the GIL; when that happens after the interpreter began finalizing, CPython ends the thread with pthread_exit
    inside a noexcept frame and the whole process aborts ("terminate called without an active exception", exit -6):
    4 in 25 finished 2-process TRM runs on a 2-core machine, after everything was written, 0 in 50 with it (core: the
    main thread in Py_FinalizeEx, a gloo runLoop thread in ~AsyncAllgatherWork -> take_gil -> pthread_exit).
    shutdown() before it was not enough: the core dump shows gloo's threads still alive after destroy_process_group
    (the group is still referenced, e.g. by DDP's reducer), and so they outlive it."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def is_dist() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return td.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_dist():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    return _reduce(t, td.ReduceOp.SUM)


def _comm_device() -> torch.device:
    """Where collective tensors must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    x = t.detach().to(_comm_device(), copy=True)
    td.all_reduce(x, op=op)
    return x.to(t.device)


def any_true(flag: bool) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if not is_dist():
        return flag
    return bool(_reduce(torch.tensor([1.0 if flag else 0.0]), td.ReduceOp.MAX).item() > 0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    return _reduce(t, td.ReduceOp.SUM) / world_size()


def gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def shard(items, r: int | None = None, n: int | None = None):
    """Rank r's contiguous slice of a global batch whose size is divisible by the world size."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    if len(items) % n:
        raise ValueError(f"global batch of {len(items)} does not split over {n} processes; make train.batch_size a "
                         f"multiple of {n}")
    k = len(items) // n
    return items[r * k:(r + 1) * k]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
