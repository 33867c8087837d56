"""The vLLM generation backend: rollouts from an in-process vLLM engine that samples the policy's CURRENT weights.

    sampler = VLLMSampler(policy, tok, model_path="HuggingFaceTB/SmolLM2-135M", gpu_memory_utilization=0.3)
    samples = sampler.generate(prompt_ids, GenConfig(n=8, temperature=1.0, max_new_tokens=256))   # samples[i][j]
    optimizer.step()
    sampler.sync(policy)                                      # the engine now samples the updated policy

What is implemented (the way TRL's GRPOTrainer runs vLLM in "colocate" mode: the engine lives in the training process,
on the training GPU, and is handed the policy's weights after every update):
- `VLLMSampler(model, tok, model_path=...)` builds `vllm.LLM` on `model_path` (the HF folder or hub id the policy's
  base weights were loaded from) with the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so weights
  are handed over by reference, not serialized), then `sync(model)`.
- `generate` is the OwnSampler / HFSampler interface: token-id prompts (`TokensPrompt`), one `SamplingParams` per
  prompt (n, temperature (0 = greedy), top_p, max_tokens, min_tokens, stop strings, the EOS ids of `eos_ids` as
  stop_token_ids, the prompt's seed), results in the caller's order as `Sample`s with the own loop's conventions:
  token ids without the EOS token, text decoded with `tok` (special tokens skipped) and cut before the first stop
  string, finish "eos" | "stop" | "length".
- `sync(model)` computes `merged_weights(model)` (pure, CPU-testable): for a PEFT LoRA model the merged weight
  W + scaling * B @ A of every adapted layer computed with peft's own `get_delta_weight` on a copy (the training model
  is never modified, so it stays bit-identical), under the base HF model's parameter names (no `base_model.model.`,
  no `.base_layer`, no lora_* tensors); for a plain model its named parameters. DistributedDataParallel and
  torch.compile wrappers are unwrapped first. The tensors go to the engine's model through `LLM.apply_model(fn)`
  (fn calls the vLLM model's `load_weights`, which maps HF names onto vLLM's fused layers), falling back to
  `llm.llm_engine.model_executor.driver_worker.model_runner.model` (TRL's path) where `apply_model` is missing; then
  `LLM.reset_prefix_cache()` so no KV cached under the old weights is reused.

Written for vLLM 0.33.0 (the V1 engine) and its offline API: `LLM.apply_model`, `LLM.reset_prefix_cache`,
`LLMEngine.model_executor` (set only when the engine core is in-process), `Worker.apply_model`, the model's
`load_weights`, `SamplingParams(n, temperature, top_p, max_tokens, min_tokens, stop, stop_token_ids, seed)`,
`TokensPrompt`, `CompletionOutput(index, token_ids, finish_reason, stop_reason)`. These were read in vLLM's recent
source (the V1 engine with the weight-transfer API) and its docs up to v0.32, and cross-checked with TRL's colocate
sync (trl/generation/vllm_generation.py, which TRL supports for vLLM 0.17 - 0.25). vLLM 0.33 itself could not be
installed or run here (no GPU): the tests run against a fake `vllm` module.

Limits:
- one process per GPU: a single process, or DDP (each rank builds its own engine with vLLM's "external_launcher"
  executor, as TRL does; tensor parallelism 1). FSDP / DeepSpeed ZeRO-3 sharded parameters are not gathered.
- one engine per process (vLLM's in-process engine owns process-wide distributed state).
- LoRA is merged on every sync (a full weight copy of each adapted layer passes through memory, one at a time);
  vLLM's own LoRA serving is not used. DoRA and the other LoRA variants, and non-LoRA PEFT tuners, are refused.
- the engine only ever holds the policy: the reference policy (the adapter switched off) is never sampled by vLLM.
- no sleep mode: the engine keeps `gpu_memory_utilization` of the GPU for weights + KV cache the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from reasonlab.eval.generate import BackendUnavailable, GenConfig, Sample, eos_ids, prompt_seeds

INSTALL_HINT = 'pip install "reasonlab[vllm]"'


# ----------------------------------------------------------------------------- the policy's weights, HF names

def unwrap(model):
    """The module whose parameters are the policy: through DistributedDataParallel (`.module`) and torch.compile
    (`._orig_mod`) wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _hf_root(model):
    """The Hugging Face model inside a PEFT wrapper (PeftModel -> LoraModel -> the HF model with LoRA layers
    injected), or the model itself."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # no peft: nothing can be wrapped
        return model
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _merged_lora(layer) -> dict[str, torch.Tensor]:
    """{'weight': W + sum of deltas, 'bias': ...} of a LoRA layer's base layer, computed out of place exactly as
    peft's `merge()` computes it in place (`weight += get_delta_weight(adapter)` per active, not yet merged adapter),
    so the result equals merge_and_unload() bit for bit and the layer itself is untouched."""
    base = layer.get_base_layer()
    if layer.disable_adapters:
        if layer.merged:
            raise NotImplementedError("a LoRA layer has its adapter disabled while merged into the base weights: "
                                      "unmerge it before syncing the vLLM engine")
        return {}
    todo = [a for a in layer.active_adapters if a not in layer.merged_adapters and a in _adapter_names(layer)]
    variants = getattr(layer, "lora_variant", {}) or {}
    if any(a in variants for a in todo):
        raise NotImplementedError("the vLLM backend's weight sync merges plain LoRA only (not DoRA or other LoRA "
                                  "variants): use the own backend")
    if not todo:
        return {}
    lora_bias = getattr(layer, "lora_bias", {}) or {}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["weight"] = base.weight.detach().clone()
        for a in todo:
            out["weight"] += layer.get_delta_weight(a)
            if lora_bias.get(a, False):
                if getattr(base, "bias", None) is None:
                    raise RuntimeError("LoRA with lora_bias=True on a layer without bias cannot be merged")
                if "bias" not in out:
                    out["bias"] = base.bias.detach().clone()
                out["bias"] += layer.lora_B[a].bias * layer.scaling[a]
    return out


def _adapter_names(layer) -> set[str]:
    names: set[str] = set()
    for attr in ("lora_A", "lora_embedding_A"):
        d = getattr(layer, attr, None)
        if d is not None:
            names.update(d.keys())
    return names


def _walk(module, prefix: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, detached tensor) for every parameter under `module`, in named_parameters() order, with PEFT layers
    replaced by what they compute: a LoRA layer by its merged base layer, a modules_to_save wrapper by its active
    copy. Shared (tied) parameters come once, as named_parameters() gives them."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        LoraLayer = BaseTunerLayer = AuxiliaryTrainingWrapper = ModulesToSaveWrapper = ()  # type: ignore[assignment]

    replace: dict[str, torch.Tensor] = {}
    if LoraLayer and isinstance(module, LoraLayer):
        replace = _merged_lora(module)
        module = module.get_base_layer()
    elif ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters
        inner = module.modules_to_save[active[0]] if active else module.original_module
        yield from _walk(inner, prefix, seen)
        return
    elif (BaseTunerLayer and isinstance(module, BaseTunerLayer)) or (
            AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper)):
        raise NotImplementedError(f"the vLLM backend's weight sync handles LoRA adapters only, not "
                                  f"{type(module).__name__} ({prefix.rstrip('.') or 'root'})")

    for name, p in module.named_parameters(recurse=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield prefix + name, replace.get(name, p.detach())
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", seen)


def iter_merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """merged_weights one tensor at a time (only one merged layer in memory at once): what sync() streams."""
    yield from _walk(_hf_root(unwrap(model)), "", set())


def merged_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The policy's current weights as (Hugging Face parameter name, tensor) pairs, as the base HF model names them
    (`model.layers.0.self_attn.q_proj.weight`): for a PEFT LoRA model every adapted layer's W + scaling * B @ A (the
    model itself is not modified), for a plain model its named parameters. Tensors are detached; unmerged ones are
    views of the live parameters, so use them before the next optimizer step."""
    return list(iter_merged_weights(model))


# ----------------------------------------------------------------------------- the engine

def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise BackendUnavailable(f"the vllm generation backend needs vLLM, which is not installed: {INSTALL_HINT} "
                                 f"(CUDA machines), or use the own backend") from None
    return vllm


def _driver_model(llm):
    """The vLLM nn.Module of an in-process engine (TRL's colocate path), or None when the engine core runs in another
    process (LLMEngine.model_executor only exists in-process)."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    runner = getattr(getattr(executor, "driver_worker", None), "model_runner", None)
    return getattr(runner, "model", None)


def _load_weights(llm, weights) -> int:
    """Copy (name, tensor) pairs into the engine's model with the model's own `load_weights` (HF names -> vLLM's fused
    qkv / gate_up parameters, dtype cast on copy). Returns how many tensors went in."""
    if getattr(getattr(llm, "llm_engine", None), "model_executor", None) is None:
        raise RuntimeError("the vLLM engine core runs in a separate process, so the policy's weights cannot be handed "
                           "over in place: build it with VLLM_ENABLE_V1_MULTIPROCESSING=0 (VLLMSampler sets it)")
    sent, first = 0, None

    def counted():
        nonlocal sent, first
        for name, t in weights:
            sent += 1
            first = first or name
            yield name, t

    def load(vllm_model):
        return vllm_model.load_weights(counted())

    with torch.no_grad():
        if hasattr(llm, "apply_model"):
            results = llm.apply_model(load)  # one result per worker; in-process: the function runs here
            loaded = results[0] if isinstance(results, list) and results else results
        else:
            model = _driver_model(llm)
            if model is None:
                raise RuntimeError("cannot reach the vLLM engine's model to load weights (no LLM.apply_model and no "
                                   "llm_engine.model_executor.driver_worker.model_runner.model)")
            loaded = load(model)
    if sent == 0:
        raise RuntimeError("weight sync found no parameters in the policy model")
    if isinstance(loaded, set) and not loaded:
        raise RuntimeError(f"vLLM matched none of the {sent} policy tensors to its parameters: the parameter names "
                           f"are not the base model's (first: {first})")
    return sent


class VLLMSampler:
    """Rollouts from an in-process vLLM engine holding the policy's current weights (see the module docstring)."""

    name = "vllm"

    def __init__(self, model, tok, *, model_path: str, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 0, seed: int = 0, enforce_eager: bool = False, **engine_kwargs: Any):
        # the engine core must live in this process: weights are handed over by reference and load_weights runs here
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = _import_vllm()
        if not model_path or model_path == "tiny-random":
            raise BackendUnavailable(f"the vllm backend needs the policy's base weights on disk or on the hub "
                                     f"(model_path={model_path!r}); the tiny random model has none: use own")
        self._vllm = vllm
        self.model, self.tok = model, tok
        kwargs: dict[str, Any] = dict(model=str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                      seed=seed, enforce_eager=enforce_eager, tensor_parallel_size=1)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if _multi_process():
            # DDP: one engine per rank on that rank's GPU, inside the existing process group (TRL's colocate setup)
            import torch.distributed as td

            os.environ.setdefault("RANK", str(td.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(td.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.sync(model)

    def sync(self, model=None) -> None:
        """Hand the policy's current weights (LoRA merged) to the engine and drop its prefix cache."""
        model = self.model if model is None else model
        _load_weights(self.llm, iter_merged_weights(model))
        ok = self.llm.reset_prefix_cache()
        if ok is False:  # vLLM refuses while requests are running
            raise RuntimeError("vLLM did not reset its prefix cache after the weight update (requests still running)")
        self.model = model

    def _sampling_params(self, cfg: GenConfig, seed: int, stop_ids: list[int]):
        return self._vllm.SamplingParams(n=cfg.n, temperature=float(cfg.temperature), top_p=float(cfg.top_p),
                                         max_tokens=cfg.max_new_tokens, min_tokens=cfg.min_new_tokens,
                                         stop=list(cfg.stop), stop_token_ids=stop_ids, seed=int(seed))

    def generate(self, prompts: list[list[int]], cfg: GenConfig, seeds: list[int] | None = None) -> list[list[Sample]]:
        if not prompts:
            return []
        seeds = prompt_seeds(cfg.seed, len(prompts)) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        stop = eos_ids(self.model, self.tok)
        stop_ids = sorted(stop)
        make_prompt = getattr(self._vllm, "TokensPrompt", None) or dict
        requests = [make_prompt(prompt_token_ids=list(p)) for p in prompts]
        params = [self._sampling_params(cfg, s, stop_ids) for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        results = []
        for i, out in enumerate(outputs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != cfg.n:
                raise RuntimeError(f"vLLM returned {len(comps)} samples for prompt {i}, expected {cfg.n}")
            results.append([self._sample(c, stop, cfg) for c in comps])
        return results

    def _sample(self, c, stop: set[int], cfg: GenConfig) -> Sample:
        """A vLLM CompletionOutput in the own loop's conventions. vLLM keeps the EOS / stop token in token_ids and
        reports finish_reason 'stop' for it with stop_reason None (EOS) or the token id (stop_token_ids), and
        finish_reason 'stop' with stop_reason = the string for a stop string (token ids kept, text already cut)."""
        ids = list(c.token_ids)
        reason, stop_reason = c.finish_reason, getattr(c, "stop_reason", None)
        if reason == "length":
            finish = "length"
        elif reason == "stop" and isinstance(stop_reason, str):
            finish = "stop"
        elif reason == "stop":
            finish = "eos"
            if ids and (ids[-1] in stop or ids[-1] == stop_reason):
                ids = ids[:-1]
        else:
            raise RuntimeError(f"vLLM finished a sample with reason {reason!r} (aborted?)")
        # decode with our tokenizer as own / hf do, so texts agree across backends; cut before the first stop string
        text = self.tok.decode(ids, skip_special_tokens=True)
        cut = min((k for k in (text.find(s) for s in cfg.stop) if k >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return Sample(text, ids, finish)


def _multi_process() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1
