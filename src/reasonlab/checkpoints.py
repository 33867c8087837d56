"""Checkpoints: write a folder of safetensors + JSON atomically (temp sibling, fsync, rename), verify it by the
sha256 manifest, restore modules / optimizer / scheduler / RNG, find the latest valid one, repair a half-replaced
one, and resolve `init_from`. Nothing is ever unpickled. `reasonlab.runs` re-exports every name here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reasonlab import dist
from reasonlab.errors import UserError

CHECKPOINT_FORMAT = 1


class RunError(UserError, RuntimeError):
    """A run-folder problem the user can fix (bad --resume path, no valid checkpoint)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's exact bytes (dtype and shape included), for frozen-weight verification."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _checkpoint_step(path: Path) -> int | None:
    try:
        return open_checkpoint(path).step
    except RunError:
        return None


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    sd = opt.state_dict()
    tensors, state_json = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                state_json.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": state_json}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    st = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
          "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuplify(st["python"]))
    np_state = st["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _module_tensors(module: torch.nn.Module, params: str) -> dict[str, torch.Tensor]:
    if params == "all":
        sd = module.state_dict()
    elif params == "trainable":
        sd = {n: p for n, p in module.named_parameters() if p.requires_grad}
    else:
        raise ValueError("params must be 'trainable' or 'all'")
    # safetensors refuses shared storage (tied embeddings); clone makes each entry its own tensor
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict = field(default_factory=dict)

    @property
    def state(self) -> dict:
        return json.loads((self.path / "state.json").read_text())

    def verify(self) -> bool:
        """Every file the manifest names exists with its sha256; nothing else counts."""
        return self.problem() is None

    def problem(self) -> str | None:
        """Why this checkpoint cannot be trusted (a missing file, a sha256 mismatch), or None when it verifies."""
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        if not isinstance(files, dict) or not files:
            return "manifest.json lists no files"
        for name, digest in files.items():
            try:
                if sha256_file(self.path / name) != digest:
                    return f"{name} does not match its sha256"
            except OSError:
                return f"{name} is missing"
        return None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / f"{name}.safetensors"))

    def restore(self, modules: dict[str, torch.nn.Module] | None = None, optimizer=None, scheduler=None,
                rng: bool = True) -> dict:
        """Load module weights (strictly: every saved tensor must land), optimizer, scheduler and RNG; returns the
        recipe state (data position etc.)."""
        for name, module in (modules or {}).items():
            saved = self.tensors(f"module.{name}")
            own = module.state_dict()
            unknown = [k for k in saved if k not in own]
            if unknown:
                raise RunError(f"checkpoint {self.path} has weights the model lacks (e.g. {unknown[0]}); "
                               "was it saved from another config?")
            module.load_state_dict(saved, strict=False)
        if optimizer is not None and (self.path / "optimizer.json").exists():
            meta = json.loads((self.path / "optimizer.json").read_text())
            optimizer.load_state_dict(_optimizer_from_files(self.tensors("optimizer"), meta))
        if scheduler is not None and (self.path / "scheduler.json").exists():
            scheduler.load_state_dict(json.loads((self.path / "scheduler.json").read_text()))
        if rng and (self.path / "rng.json").exists():
            states = json.loads((self.path / "rng.json").read_text())
            rank = dist.rank()
            set_rng_state(states[rank] if rank < len(states) else states[0])
        return self.state

    def frozen_checksums(self) -> dict[str, str]:
        p = self.path / "checksums.json"
        return json.loads(p.read_text()) if p.exists() else {}


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise RunError(f"{path} is not a checkpoint (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
        step = int(manifest.get("step", -1))
    except (OSError, ValueError, AttributeError, TypeError) as e:  # a JSONDecodeError is a ValueError
        raise RunError(f"{mf} is unreadable ({type(e).__name__})") from None
    return Checkpoint(path, step, manifest)


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """step_N checkpoints with a readable manifest, newest first (unverified)."""
    return [ck for _, _, ck, _ in scan_checkpoints(run_dir) if ck is not None]


def scan_checkpoints(run_dir: str | Path,
                     verify: bool = False) -> list[tuple[Path, int, Checkpoint | None, str | None]]:
    """Every checkpoints/step_N folder, newest first: (path, N, the checkpoint or None, why it cannot be used or
    None). Without `verify` only the manifest is read; with it every file's sha256 is checked too."""
    d = Path(run_dir) / "checkpoints"
    out = []
    for p in d.glob("step_*") if d.exists() else []:
        if not (re.fullmatch(r"step_\d+", p.name) and p.is_dir()):
            continue
        ck, why = None, None
        if not (p / "manifest.json").exists():
            why = "no manifest.json (not completely written)"
        else:
            try:
                ck = open_checkpoint(p)
            except RunError:
                why = "manifest.json unreadable"
        if ck is not None and verify:
            why = ck.problem()
        out.append((p, int(p.name.split("_")[1]), ck, why))
    return sorted(out, key=lambda x: x[1], reverse=True)


def latest_valid_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    for _, _, ck, why in scan_checkpoints(run_dir, verify=True):
        if ck is not None and why is None:
            return ck
    return None


def init_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint `model.init_from` names: a checkpoint folder itself, or a run folder, meaning its `best`
    (chosen on validation) when it has one, else its latest complete step. It must verify (every file's sha256);
    anything else is one RunError line naming the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RunError(f"init_from {p} does not exist: give a run folder or one of its checkpoints/<name> folders")
    if (p / "manifest.json").exists():
        ck = open_checkpoint(p)
    elif (p / "checkpoints" / "best" / "manifest.json").exists():
        ck = open_checkpoint(p / "checkpoints" / "best")
    else:
        ck = latest_valid_checkpoint(p)
        if ck is None:
            raise RunError(f"init_from {p} is neither a checkpoint nor a run folder with a complete checkpoint")
    why = ck.problem()
    if why:
        raise RunError(f"init_from checkpoint {ck.path} cannot be trusted ({why}); point init_from at another one")
    return ck


def save_checkpoint_dir(target: Path, step: int, *, modules: dict[str, torch.nn.Module] | None = None,
                        optimizer=None, scheduler=None, state: dict | None = None, params: str = "trainable",
                        rng_states: list[dict] | None = None, checksums: bool = True,
                        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                        keep_replaced: Path | None = None) -> Checkpoint:
    """Write a checkpoint into a temp sibling, fsync, then rename to `target` (replacing an older one: a process
    killed between the two renames leaves the new one complete under .tmp-*, which repair_checkpoints puts back).
    `tensors`: further named tensor files (<name>.safetensors, e.g. a recipe's carried state); `keep_replaced`: move a
    replaced checkpoint there instead of deleting it."""
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        sums: dict[str, str] = {}
        for name, module in (modules or {}).items():
            save_file(_module_tensors(module, params), str(tmp / f"module.{name}.safetensors"))
            if checksums:  # every parameter, so a frozen module can be proven unchanged between checkpoints
                for pname, p in module.named_parameters():
                    sums[f"{name}.{pname}"] = tensor_sha256(p)
        for name, ts in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in ts.items()}, str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_to_files(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        if scheduler is not None:
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "rng.json").write_text(json.dumps(rng_states if rng_states is not None else [rng_state()]))
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))
        if checksums:
            (tmp / "checksums.json").write_text(json.dumps(sums))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        manifest = {"format": CHECKPOINT_FORMAT, "step": step, "created": time.time(), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            if keep_replaced is not None:
                shutil.rmtree(keep_replaced, ignore_errors=True)
                os.replace(old, keep_replaced)
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Checkpoint(target, step, manifest)


def repair_checkpoints(run_dir: str | Path) -> list[str]:
    """Finish what a process killed inside save_checkpoint_dir left behind: a checkpoint name that is missing while
    its complete new (.tmp-) or previous (.old-) folder exists gets the newest of those that verifies; every other
    leftover is deleted. Returns what was done (for the resume event)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    notes, by_name = [], {}
    for p in sorted(d.iterdir()):
        m = re.fullmatch(r"\.(tmp|old)-(.+)-[A-Za-z0-9_]+", p.name)
        if m and p.is_dir():
            by_name.setdefault(m.group(2), []).append((m.group(1), p))
    for name, found in by_name.items():
        target = d / name
        if not target.exists():
            good = []
            for kind, p in found:
                try:
                    ck = open_checkpoint(p)
                except RunError:
                    continue
                if ck.verify():
                    good.append((kind == "tmp", ck.manifest.get("created", 0), p))
            if good:
                src = max(good)[2]  # the new one when it is complete, else the one it was replacing
                os.replace(src, target)
                notes.append(f"{name} restored from {src.name} (a process was killed while replacing it)")
        for kind, p in found:
            step = _checkpoint_step(p) if p.exists() and name == "best" and kind == "old" else None
            if step is not None and not (d / f"best@step_{step}").exists():  # the best it replaced, as Run keeps it
                os.replace(p, d / f"best@step_{step}")
            elif p.exists():
                shutil.rmtree(p, ignore_errors=True)
    return notes
