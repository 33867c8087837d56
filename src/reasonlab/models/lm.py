"""Causal language models: one loader for hub ids, local folders and embedded aliases; LoRA; the reference policy.

    model, tok = load_causal_lm("smollm2-135m")                     # embedded, offline
    model, tok = load_causal_lm("meta-llama/Llama-3.1-8B-Instruct")  # hub (cache first, then network)
    model = add_lora(model, LoraConfig(r=8, alpha=16))
    with reference(model):                                           # adapter disabled = pi_ref, no second copy
        ref_logits = model(ids).logits

The reference policy of every RL recipe is the same weights with the LoRA adapter switched off, so memory holds one
model and the reference can never drift (a separately loaded copy can silently be a different revision).
"""

from __future__ import annotations

from reasonlab.errors import UserError

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reasonlab.models import embedded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailable(UserError, RuntimeError):
    """The configured model cannot be loaded here (not cached while offline, package missing, bad path)."""


@dataclass
class LoraConfig:
    r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full model"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: str = field(default="all-linear", metadata={"help": "PEFT target_modules; 'all-linear' or comma list"})


@dataclass
class ScratchConfig:
    hidden: int = field(default=128, metadata={"help": "hidden size of the from-scratch Llama"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    seed: int = field(default=0, metadata={"help": "seed of the random initialization"})

    def __post_init__(self):
        if self.hidden < 1 or self.layers < 1 or self.heads < 1 or self.hidden % self.heads:
            raise ValueError(f"model.scratch: hidden {self.hidden} must be a positive multiple of heads {self.heads}, "
                             f"layers >= 1")


@dataclass
class ModelConfig:
    name: str = field(default="smollm2-135m", metadata={"help": "embedded alias, local HF folder, hub id, or "
                                                        "'scratch' (a random Llama over the task's closed vocabulary)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter (r=0: full fine-tune)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    scratch: ScratchConfig = field(default_factory=ScratchConfig, metadata={"help": "model.name=scratch: its size"})
    init_from: str = field(default="", metadata={"help": "start from these weights: a checkpoint folder, or a run "
                                                 "folder (its best-on-validation checkpoint, else its latest)"})
    vllm_memory: float = field(default=0.3, metadata={"help": "vLLM backend: fraction of the GPU its engine may take "
                                                      "(the rest is for training)"})
    vllm_max_len: int = field(default=0, metadata={"help": "vLLM backend: the engine's max sequence length (0: the "
                                                   "model's)"})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.vllm_memory < 1 or self.vllm_max_len < 0:
            raise ValueError("model.vllm_memory must be in (0, 1) and model.vllm_max_len >= 0")
        if self.init_from:  # a wrong path fails here, at config time, before any model loads
            from reasonlab.checkpoints import init_checkpoint

            init_checkpoint(self.init_from)


TINY = "tiny-random"  # a random 2-layer Llama with SmolLM2's tokenizer: tests and smoke runs
SCRATCH = "scratch"  # a random Llama over a task's closed vocabulary (word-level tokenizer): the polychromic testbed


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model_path(spec: str) -> tuple[str, dict]:
    """Map a model spec to (path_or_id, extra from_pretrained kwargs)."""
    if spec in embedded.EMBEDDED:
        try:
            return str(embedded.resolve(spec)), {}
        except embedded.EmbeddedModelMissing as e:
            raise ModelUnavailable(str(e)) from None
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelUnavailable(f"model folder {p} has no config.json: point model.name at a saved HF model folder")
        return str(p), {}
    if spec.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model path {spec} does not exist")
    return spec, {}


def is_available_offline(spec: str) -> bool:
    """True when `spec` loads without a network: an embedded alias whose package is installed, a folder, or a hub id
    already in the local HF cache."""
    if spec == TINY:
        return embedded.package_path("smollm2-135m") is not None
    if spec == SCRATCH:
        return True
    if spec in embedded.EMBEDDED:
        return embedded.package_path(spec) is not None
    if Path(spec).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:
        return False


def load_tokenizer(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, _ = resolve_model_path(spec)
    hub = {"revision": revision} if revision and path == spec else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=_offline() or path != spec,
                                            trust_remote_code=trust_remote_code, **hub)
    except OSError as e:
        raise ModelUnavailable(_hub_hint(spec, e)) from None
    return _fix_padding(tok)


def _fix_padding(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation batches are left-padded so every row's last token is real
    return tok


def _hub_hint(spec: str, err: Exception) -> str:
    if _offline() or "offline" in str(err).lower() or "connect" in str(err).lower():
        return (f"model '{spec}' is not in the local Hugging Face cache and the hub is unreachable: run "
                f"`huggingface-cli download {spec}` where there is internet, or use a local folder or an embedded "
                f"alias ({', '.join(embedded.EMBEDDED)})")
    return f"could not load model '{spec}': {str(err).splitlines()[0]}"


def load_causal_lm(spec: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
                   revision: str | None = None, trust_remote_code: bool = False):
    """Load (model, tokenizer). Hub ids try the local cache first so an offline machine never waits on the network.
    `revision` (a hub branch, tag or commit) applies to hub ids only; `trust_remote_code` runs the model repo's own
    code, as in transformers."""
    from transformers import AutoModelForCausalLM

    path, kwargs = resolve_model_path(spec)
    local = path != spec
    if revision and local:
        raise ModelUnavailable(f"revision={revision} is for hub ids, but '{spec}' is a local folder or an embedded "
                               "alias: drop revision=")
    kwargs = {**kwargs, "trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True, **kwargs)
        except OSError:
            if local or _offline():
                raise
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    except OSError as e:
        raise ModelUnavailable(_hub_hint(spec, e)) from None
    tok = load_tokenizer(spec, revision=revision, trust_remote_code=trust_remote_code)
    return model.to(device), tok


def tiny_causal_lm(tokenizer=None, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A randomly initialised Llama-shaped model for tests and --dry-run stand-ins.

    Uses SmolLM2's tokenizer by default (embedded, offline) so prompts and chat templates behave as in real runs.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = f"tiny-random-llama(h={hidden},l={layers})"
    return model, tok


def word_tokenizer(vocab: list[str]):
    """A word-level fast tokenizer over `vocab` (whitespace-split; decode joins words with spaces), with <pad> <s>
    </s> <unk> first. Nothing is added to encoded text: a prompt is exactly its words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [w for w in dict.fromkeys(vocab) if w not in specials]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    return _fix_padding(tok)


def scratch_causal_lm(vocab: list[str], sc: ScratchConfig):
    """A randomly initialised Llama over a closed vocabulary (word_tokenizer), seeded by sc.seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(vocab)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=sc.hidden, intermediate_size=sc.hidden * 4, num_hidden_layers=sc.layers,
        num_attention_heads=sc.heads, num_key_value_heads=sc.heads, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(sc.seed)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = f"scratch-llama(h={sc.hidden},l={sc.layers},v={len(tok)})"
    return model, tok


def load_for_config(mc: ModelConfig, *, device="cpu", stand_in: bool = False, vocab: list[str] | None = None):
    """Model + tokenizer for a recipe. `stand_in=True` (used by --dry-run when the configured model is not available
    offline) builds a tiny random model with the same code path, so a paper-scale config can be checked on a laptop.
    `vocab`: the task's closed vocabulary, needed by model.name=scratch. `mc.init_from` weights are loaded after
    the adapter is added (so a LoRA run continues from another run's adapter)."""
    if mc.name == SCRATCH:
        if vocab is None:
            raise ModelUnavailable("model.name=scratch needs a task with a closed vocabulary (e.g. subset-sum); "
                                   "use an embedded alias, a folder or a hub id for this task")
        model, tok = scratch_causal_lm(vocab, mc.scratch)
    elif stand_in or mc.name == TINY:
        model, tok = tiny_causal_lm()
    else:
        model, tok = load_causal_lm(mc.name, dtype=mc.dtype, device=device)
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if mc.lora.r > 0:
        model = add_lora(model, mc.lora)
    if mc.init_from:
        from reasonlab.checkpoints import init_checkpoint

        init_checkpoint(mc.init_from).restore(modules={"model": model}, rng=False)
    return model.to(device), tok


def add_lora(model, lc: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = lc.target_modules if lc.target_modules == "all-linear" else [t.strip() for t in lc.target_modules.split(",")]
    pc = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    with _peft_reads_deprecated_alias():
        return get_peft_model(model, pc)


def load_adapter(model, path: str, *, revision: str | None = None):
    """`model` with the PEFT adapter saved at `path` (a folder with adapter_config.json, or a hub id) on top."""
    from peft import PeftModel

    try:
        with _peft_reads_deprecated_alias():
            return PeftModel.from_pretrained(model, path, **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as e:
        raise ModelUnavailable(f"could not load the PEFT adapter '{path}': {str(e).splitlines()[0]} (a folder "
                               "with adapter_config.json + adapter_model.safetensors, e.g. from `reasonlab export`)"
                               ) from None


@contextlib.contextmanager
def _peft_reads_deprecated_alias():
    """PEFT (<= 0.21) builds a PeftModel by reading `model.is_gradient_checkpointing`, which transformers 5 deprecated
    in favour of `is_activation_checkpointing` (same value): a FutureWarning on every LoRA run that is PEFT's call, not
    ours. Exactly that warning is silenced, only around our PEFT calls; PEFT versions that read the new name need
    nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def reference(model):
    """pi_ref: the same model with its LoRA adapter disabled. Without an adapter there is no cheap reference; we refuse
    rather than silently use the policy itself as its own reference."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("a reference policy needs a LoRA adapter (set model.lora.r > 0) — the reference is the model "
                         "with its adapter disabled")
    with model.disable_adapter():
        yield model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
