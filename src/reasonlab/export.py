"""`reasonlab export`: a run's checkpoint as a folder that other tools load, with a model card.

    reasonlab export runs/<id> --out exports/<id>                  # checkpoints/best (chosen on validation)
    reasonlab export runs/<id> --step 500 --out DIR --merge        # that step, LoRA merged into the base weights
    reasonlab export runs/<id> --out DIR --push-to-hub you/name    # and upload the folder (needs the hub)

What a run becomes (the run's `method` and `model.lora.r` decide):
- LoRA language-model run (sft, markovian, polychromic with model.lora.r > 0): a PEFT adapter folder
  (adapter_config.json + adapter_model.safetensors + the tokenizer), loadable with peft.PeftModel.from_pretrained on
  the base model; with --merge the adapter is merged into the base weights (merge_and_unload) and the folder is a full
  Hugging Face model (config.json, model.safetensors, generation_config.json, tokenizer) that
  AutoModelForCausalLM.from_pretrained(DIR) loads with no reasonlab and no PEFT.
- Full fine-tune language-model run (lora.r = 0): the full Hugging Face model folder (there is nothing to merge).
- TRM / ETRM run: model.safetensors (the TRM's state dict; ETRM: + encoder.safetensors) and config.json (the
  architecture, the data-derived sizes, the task); `load_trm_export(DIR)` rebuilds the modules from it.
Every export carries README.md (a model card: the run's eval table with n and 95% CI, the training command, the
config) and reasonlab_export.json (what was exported from which checkpoint; `reasonlab eval --model DIR` reads it).

Everything the user can get wrong (not a run folder, no such step, --merge on a run without LoRA, --out that is a file
or a non-empty folder, --push-to-hub offline) is checked by `plan_export` before any model loads; the folder is
written under a temporary name beside --out and renamed at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from reasonlab.errors import UserError

EXPORT_META = "reasonlab_export.json"
EXPORT_FORMAT = 1
LM_METHODS = ("sft", "markovian", "polychromic")
TRM_METHODS = ("trm",)
ExportKind = Literal["adapter", "merged", "full", "trm", "etrm"]
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class ExportError(UserError, ValueError):
    """Bad export input (one line naming the fix)."""


# ------------------------------------------------------------------------------------------------ the run's checkpoint

def open_run(run_dir: str | Path):
    """(config, Path) of a run folder, or a one-line ExportError."""
    from reasonlab.config import load_config

    p = Path(run_dir)
    if not (p / "config.yaml").is_file():
        what = "no such directory" if not p.exists() else "no config.yaml"
        raise ExportError(f"{p} is not a run folder ({what}): pass runs/<run_id>, the folder `reasonlab run` wrote")
    try:
        cfg = load_config(p / "config.yaml")
    except UserError as e:
        raise ExportError(f"{p}/config.yaml does not load with this reasonlab ({e})") from None
    return cfg, p


def run_checkpoint(run_dir: Path, step: int | None = None, step_flag: str = "--step N"):
    """checkpoints/best (step None: the checkpoint chosen on validation) or checkpoints/step_<step>, verified against
    its sha256 manifest. `step_flag`: how the caller's user picks a step (named in the error)."""
    from reasonlab.runs import list_checkpoints, open_checkpoint

    steps = sorted(c.step for c in list_checkpoints(run_dir))
    best = run_dir / "checkpoints" / "best"
    have = (f"it has step_N checkpoints for steps {steps}" if steps else "it has no step_N checkpoints") + \
        (" and checkpoints/best" if (best / "manifest.json").exists() else "")
    if step is None:
        if not (best / "manifest.json").exists():
            raise ExportError(f"{run_dir} has no checkpoints/best (the checkpoint chosen on validation); {have}: "
                              f"pass {step_flag}")
        ck = open_checkpoint(best)
    else:
        path = run_dir / "checkpoints" / f"step_{step}"
        if not (path / "manifest.json").exists():
            raise ExportError(f"{run_dir} has no checkpoint of step {step}; {have}")
        ck = open_checkpoint(path)
    if not ck.verify():
        raise ExportError(f"{ck.path} does not match its sha256 manifest (a file is missing, changed or truncated): "
                          "export another checkpoint")
    return ck


def lm_kind(cfg) -> Literal["lora", "full"] | None:
    """How a language-model run trained its weights, or None when the run is no language-model run."""
    if cfg.method not in LM_METHODS:
        return None
    return "lora" if cfg.model.lora.r > 0 else "full"


# ----------------------------------------------------------------------------------------------------------- planning

@dataclass
class ExportPlan:
    run_dir: Path
    cfg: object
    checkpoint: object  # reasonlab.runs.Checkpoint
    which: str  # "best" | "step_N"
    kind: ExportKind
    out: Path
    push_to_hub: str | None = None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def plan_export(run_dir: str | Path, out: str | Path, *, step: int | None = None, best: bool = False,
                merge: bool = False, push_to_hub: str | None = None) -> ExportPlan:
    """Every check of an export, before any model loads and before anything is written."""
    if step is not None and best:
        raise ExportError("give --step N or --best, not both (--best = the checkpoint chosen on validation, the "
                          "default)")
    if push_to_hub is not None:
        if not REPO_RE.fullmatch(push_to_hub):
            raise ExportError(f"--push-to-hub {push_to_hub!r} is not a hub repo id: use owner/name")
        if _offline():
            raise ExportError(f"--push-to-hub {push_to_hub} needs the Hugging Face hub but HF_HUB_OFFLINE=1: export "
                              f"without it and upload later with `huggingface-cli upload {push_to_hub} {out}`")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty: give a new folder (an export never overwrites)")
    cfg, run_dir = open_run(run_dir)
    lm = lm_kind(cfg)
    if lm is None and cfg.method not in TRM_METHODS:
        raise ExportError(f"{run_dir} is a {cfg.method} run; export handles language-model runs "
                          f"({', '.join(LM_METHODS)}) and trm/etrm runs")
    if merge and lm != "lora":
        what = ("trained every weight, so its export is already a full model folder" if lm == "full"
                else f"is a {cfg.method} run: it exports safetensors + config")
        raise ExportError(f"--merge merges a LoRA adapter, but {run_dir} {what}: drop --merge")
    if lm is not None:
        from reasonlab.models.lm import ModelUnavailable, is_available_offline, resolve_model_path

        if not is_available_offline(cfg.model.name) and _offline():
            try:
                resolve_model_path(cfg.model.name)
            except ModelUnavailable as e:
                raise ExportError(f"the run's base model: {e}") from None
            raise ExportError(f"the run's base model '{cfg.model.name}' is not in the local Hugging Face cache and "
                              f"HF_HUB_OFFLINE=1: run `huggingface-cli download {cfg.model.name}` where there is "
                              "internet")
    ck = run_checkpoint(run_dir, step)
    kind: ExportKind
    if lm == "lora":
        kind = "merged" if merge else "adapter"
    elif lm == "full":
        kind = "full"
    else:
        kind = "etrm" if cfg.model.conditioning == "encoder" else "trm"
    which = "best" if step is None else f"step_{step}"
    return ExportPlan(run_dir, cfg, ck, which, kind, out, push_to_hub)


# ------------------------------------------------------------------------------------------------------------ writing

def export(plan: ExportPlan) -> Path:
    """Write the export folder (atomically: a temporary sibling renamed to plan.out) and return its path."""
    from transformers.utils import logging as hf_logging

    plan.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{plan.out.name}-", dir=plan.out.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for a second's work, ending without a newline
    try:
        if plan.kind in ("adapter", "merged", "full"):
            files = _write_lm(plan, tmp)
        else:
            files = _write_trm(plan, tmp)
        meta = _meta(plan, files)
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(plan, meta))
        if plan.out.is_dir():  # an empty folder the user made (plan_export refused a non-empty one)
            plan.out.rmdir()
        os.replace(tmp, plan.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if plan.push_to_hub:
        push(plan.out, plan.push_to_hub)
    return plan.out


def build_lm(cfg, checkpoint, *, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) of a language-model run at `checkpoint`: the base model, the run's LoRA adapter (when it has
    one) and the checkpoint's trained weights, in eval mode. `dtype` overrides the run's model.dtype."""
    from reasonlab.models.lm import load_for_config

    mc = cfg.model if dtype is None else dataclasses.replace(cfg.model, dtype=dtype)
    mc = dataclasses.replace(mc, gradient_checkpointing=False)  # a training-memory setting, not part of the model
    model, tok = load_for_config(mc, device=device)
    checkpoint.restore(modules={"model": model}, rng=False)
    return model.eval(), tok


def _base_model_id(name: str) -> str:
    """What an adapter names as its base: the hub id or folder as configured; an embedded alias resolves to its
    converted local folder (the GGUF-dequantized weights the run trained on, which differ from the hub's)."""
    from reasonlab.models import embedded
    from reasonlab.models.lm import TINY, resolve_model_path

    if name in embedded.EMBEDDED:
        return resolve_model_path(name)[0]
    if name == TINY:
        return TINY
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def _write_lm(plan: ExportPlan, tmp: Path) -> list[str]:
    model, tok = build_lm(plan.cfg, plan.checkpoint)
    if plan.kind == "adapter":
        model.peft_config["default"].base_model_name_or_path = _base_model_id(plan.cfg.model.name)
        # adapter_config.json + adapter_model.safetensors, the adapter only: our LoRA never resizes the vocabulary,
        # so no embedding matrix goes in (PEFT's "auto" would look the base model up to decide, on the hub if need be)
        model.save_pretrained(str(tmp), save_embedding_layers=False)
    else:
        full = model.merge_and_unload() if plan.kind == "merged" else model
        full.config.use_cache = True  # gradient checkpointing may have switched it off for training
        gc = full.generation_config
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):  # what generate() needs from the tokenizer
            if getattr(gc, key, None) is None and getattr(tok, key, None) is not None:
                setattr(gc, key, getattr(tok, key))
        full.save_pretrained(str(tmp))  # config.json, model.safetensors, generation_config.json
    tok.save_pretrained(str(tmp))
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT writes its own template card; ours replaces it
    return sorted(p.name for p in tmp.iterdir())


def trm_config(cfg, tensors: dict) -> dict:
    """The TRMConfig a TRM run built: the recipe's model section with the sizes it took from the data (vocabulary and
    puzzle-id rows from the weights' shapes, sequence length from the task)."""
    from reasonlab.models.trm import TRMConfig

    if cfg.data.task == "sudoku":
        from reasonlab.tasks import get_task

        seq_len = get_task("sudoku", **cfg.data.task_args).size ** 2
    else:
        seq_len = cfg.data.canvas * cfg.data.canvas
    emb = tensors.get("puzzle_emb.weight")
    fields = {f.name for f in dataclasses.fields(TRMConfig)}
    out = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k in fields}
    out.update(vocab_size=int(tensors["embed_tokens.weight"].shape[0]), seq_len=seq_len,
               num_puzzle_ids=int(emb.shape[0]) if emb is not None else 0)
    return out


def _encoder_args(cfg) -> dict:
    """model.encoder of an ETRM run with output_norm resolved: 0 means 'the mean norm of the decoder checkpoint's
    trained puzzle-embedding rows' (or 1 when it has none), which the recipe read from model.init_from at setup; the
    export records the number."""
    from safetensors.torch import load_file

    args = dict(cfg.model.encoder)
    if args.get("output_norm", 1.0) != 0:
        return args
    src = Path(cfg.model.init_from) if cfg.model.init_from else None
    files = (sorted(src.glob("*.safetensors")) if src.is_dir() else [src]) if src and src.exists() else []
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise ExportError(f"model.encoder.output_norm=0 takes its value from the safetensors of model.init_from "
                          f"({cfg.model.init_from or 'unset'}), which are not there: restore them to export this run")
    norm = 0.0
    for f in files:
        sd = load_file(str(f))
        emb = next((sd[k] for k in ("puzzle_emb.weight", "model.puzzle_emb.weight") if k in sd), None)
        if emb is not None:
            n = emb.float().norm(dim=-1)
            norm = float(n[n > 0].mean()) if (n > 0).any() else 0.0
            break
    args["output_norm"] = norm or 1.0  # as the recipe: `loaded["puzzle_emb_norm"] or 1.0`
    return args


def _write_trm(plan: ExportPlan, tmp: Path) -> list[str]:
    from safetensors.torch import save_file

    ck = plan.checkpoint
    etrm = plan.kind == "etrm"
    dec = ck.tensors("module.decoder" if etrm else "module.model")
    conf = {"format": EXPORT_FORMAT, "architecture": plan.kind, "trm": trm_config(plan.cfg, dec),
            "task": plan.cfg.data.task, "task_args": dict(plan.cfg.data.task_args),
            "canvas": plan.cfg.data.canvas}
    if plan.cfg.data.task == "sudoku":
        conf["tokens"] = "0 PAD, 1 blank, token d+1 = digit d (row-major cells)"
    if etrm:
        conf["encoder"] = _encoder_args(plan.cfg)
    model, encoder = build_trm(conf)  # the weights must load strictly into the architecture the config names
    model.load_state_dict(dec, strict=True)
    save_file(dec, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if etrm:
        enc = ck.tensors("module.encoder")
        encoder.load_state_dict(enc, strict=True)
        save_file(enc, str(tmp / "encoder.safetensors"), metadata={"format": "pt"})
    if (ck.path / "module.ema.safetensors").exists():  # step_N of an EMA run: the average, to evaluate as the run did
        shutil.copyfile(ck.path / "module.ema.safetensors", tmp / "ema.safetensors")
        conf["ema"] = "ema.safetensors holds the exponential moving average the run evaluates (model.safetensors: " \
                      "the live weights of this step)"
    (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return sorted(p.name for p in tmp.iterdir())


def build_trm(conf: dict):
    """(TRM, DemoEncoder | None) with fresh weights from an export's config.json."""
    from reasonlab.models.trm import TRM, TRMConfig

    model = TRM(TRMConfig(**conf["trm"]))
    encoder = None
    if conf["architecture"] == "etrm":
        from reasonlab.models.etrm import build_encoder

        encoder = build_encoder(model.cfg, **conf["encoder"])
    return model, encoder


def load_trm_export(path: str | Path):
    """(TRM, DemoEncoder | None, config) from a TRM/ETRM export folder, weights loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    p = Path(path)
    conf = json.loads((p / "config.json").read_text())
    if conf.get("architecture") not in ("trm", "etrm"):
        raise ExportError(f"{p} is not a TRM/ETRM export (config.json architecture {conf.get('architecture')!r})")
    model, encoder = build_trm(conf)
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    if encoder is not None:
        encoder.load_state_dict(load_file(str(p / "encoder.safetensors")), strict=True)
        encoder.eval()
    return model.eval(), encoder, conf


def read_export(path: str | Path) -> dict | None:
    """The reasonlab_export.json of an export folder, or None when `path` is not one."""
    p = Path(path) / EXPORT_META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise ExportError(f"{p} is not valid JSON: re-export the run") from None


def _meta(plan: ExportPlan, files: list[str]) -> dict:
    from reasonlab.runs import git_info

    state = plan.checkpoint.state
    env = _json(plan.run_dir / "env.json")
    return {"format": EXPORT_FORMAT, "kind": plan.kind, "method": plan.cfg.method, "run": str(plan.run_dir.resolve()),
            "run_id": plan.run_dir.name, "checkpoint": plan.which, "step": plan.checkpoint.step,
            "selected_on": state.get("selected_on", "validation" if plan.which == "best" else None),
            "best": state.get("best"), "checkpoint_manifest": plan.checkpoint.manifest.get("files"),
            "base_model": plan.cfg.model.name if plan.kind in ("adapter", "merged", "full") else None,
            "lora": dataclasses.asdict(plan.cfg.model.lora) if plan.kind in ("adapter", "merged") else None,
            "dtype": getattr(plan.cfg.model, "dtype", None), "files": files, "run_git": env.get("git"),
            "export_git": git_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------------------------------- model card

def eval_rows(run_dir: Path) -> list[list[str]]:
    """One row per eval of the run: tag, split, step, headline metric, value, 95% CI, n, CI method."""
    from reasonlab.diagnostics.runfolder import RunFolder

    rows = []
    for e in RunFolder(run_dir).evals:
        p = e.primary
        if p is None:
            continue
        name, m = p
        lo, hi = m.get("lo"), m.get("hi")
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "none (n too small or a constant)"
        role = e.control and f"control: {e.control}" or e.reference or ""
        rows.append([e.tag + (f" ({role})" if role else ""), e.split or "?", "" if e.step is None else str(e.step),
                     name, f"{float(m['value']):.3f}", ci, str(m.get("n")), str(m.get("method", ""))])
    return rows


LOAD_SNIPPETS = {
    "merged": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "model = AutoModelForCausalLM.from_pretrained(\"{dir}\")\ntok = AutoTokenizer.from_pretrained(\"{dir}\")",
    "full": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"{dir}\")\ntok = AutoTokenizer.from_pretrained(\"{dir}\")",
    "adapter": "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
               "model = AutoPeftModelForCausalLM.from_pretrained(\"{dir}\")  # loads base_model_name_or_path first\n"
               "tok = AutoTokenizer.from_pretrained(\"{dir}\")",
    "trm": "from reasonlab.export import load_trm_export\nmodel, encoder, config = load_trm_export(\"{dir}\")",
    "etrm": "from reasonlab.export import load_trm_export\nmodel, encoder, config = load_trm_export(\"{dir}\")",
}
WHAT = {"adapter": "a PEFT LoRA adapter (apply it to the base model below)",
        "merged": "a full Hugging Face causal LM: the LoRA adapter merged into the base weights",
        "full": "a full Hugging Face causal LM (every weight fine-tuned)",
        "trm": "a Tiny Recursive Model: its state dict (safetensors) and config",
        "etrm": "an ETRM (Tiny Recursive Model + demonstration encoder): state dicts (safetensors) and config"}


def model_card(plan: ExportPlan, meta: dict) -> str:
    from reasonlab.config import to_yaml

    env = _json(plan.run_dir / "env.json")
    lm = plan.kind in ("adapter", "merged", "full")
    front = ["---", f"library_name: {'peft' if plan.kind == 'adapter' else 'transformers' if lm else 'reasonlab'}",
             f"tags: [reasonlab, {plan.cfg.method}]"]
    base = plan.cfg.model.name if lm else None
    if base and "/" in base and not Path(base).exists():
        front.append(f"base_model: {base}")
    front.append("---\n")
    b = meta.get("best") or {}
    on = f" ({b['metric']} {b['value']:.3f})" if isinstance(b.get("value"), (int, float)) and b.get("metric") else ""
    chosen = (f"`checkpoints/best`: chosen on validation{on}, the weights of step {meta['step']}"
              if plan.which == "best" else f"`checkpoints/{plan.which}` (not chosen on validation: the weights of "
                                           f"step {meta['step']})")
    lines = [*front, f"# {plan.run_dir.name}\n",
             f"Exported by `reasonlab export` from the run folder `{plan.run_dir.name}` ({plan.cfg.method} recipe): "
             f"{WHAT[plan.kind]}.\n",
             f"- checkpoint: {chosen}",
             f"- files: {', '.join(meta['files'])}"]
    if lm:
        lines.append(f"- base model: `{plan.cfg.model.name}` ({plan.cfg.model.dtype})")
        if plan.kind in ("adapter", "merged"):
            lc = plan.cfg.model.lora
            lines.append(f"- LoRA: r={lc.r}, alpha={lc.alpha}, dropout={lc.dropout}, "
                         f"target_modules={lc.target_modules}")
        if plan.cfg.model.name == "tiny-random":
            lines.append("- the base is reasonlab's seeded random test model `tiny-random` (for tests), built by "
                         "reasonlab.models.lm.tiny_causal_lm()")
    git = env.get("git") or {}
    if git.get("sha"):
        lines.append(f"- code: reasonlab git {git['sha']}{' (uncommitted changes)' if git.get('dirty') else ''}")
    rows = eval_rows(plan.run_dir)
    lines.append("\n## Evaluation (from the run folder's evals/)\n")
    if rows:
        head = ["eval", "split", "step", "metric", "value", "95% CI", "n", "CI method"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        lines.append("\nn = units evaluated (questions, puzzles or tasks). Test splits are evaluated once, on the "
                     "checkpoint chosen on validation.")
    else:
        lines.append("The run wrote no evals.")
    lines.append("\n## Load\n")
    where = plan.push_to_hub or str(plan.out)
    lines.append("```python\n" + LOAD_SNIPPETS[plan.kind].format(dir=where) + "\n```")
    if lm:
        lines.append(f"\nIn reasonlab: `reasonlab eval --model {where} --task TASK` (or `--model {plan.run_dir}`, the "
                     "run folder itself, which evaluates its checkpoints/best).")
    lines.append("\n## Training command\n")
    lines.append("```bash\n" + (env.get("command") or "(not recorded)") + "\n```")
    lines.append("\n## Config (the run's resolved config.yaml)\n")
    lines.append("```yaml\n" + to_yaml(plan.cfg).rstrip() + "\n```\n")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------- hub

def push(folder: Path, repo: str) -> str:
    """Upload an export folder to the hub repo `repo` (created when missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo,
                             commit_message=f"reasonlab export of {folder.name}")
    return str(getattr(info, "commit_url", f"https://huggingface.co/{repo}"))
