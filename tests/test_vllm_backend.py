"""The vLLM backend without vLLM: the weight hand-over (LoRA merged, HF names), the engine calls and the mapping of
vLLM's outputs onto Samples, against a fake `vllm` module shaped like vLLM 0.33's offline API."""

import copy
import sys
import types

import pytest
import torch

from reasonlab.eval.generate import BackendUnavailable, GenConfig, prompt_seeds
from reasonlab.eval.vllm_backend import VLLMSampler, merged_weights
from reasonlab.models.lm import LoraConfig, add_lora, tiny_causal_lm, load_tokenizer

SIZE = dict(hidden=32, layers=2, heads=4)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def lora_model(tok, seed=0):
    model, _ = tiny_causal_lm(tok, **SIZE)
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    perturb_lora(model, seed)
    return model


def perturb_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def base_param_names(tok):
    model, _ = tiny_causal_lm(tok, **SIZE)
    return [n for n, _ in model.named_parameters()]


# ----------------------------------------------------------------------------- a fake vllm module

class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw
        for k, v in kw.items():
            setattr(self, k, v)


def fake_tokens_prompt(**kw):  # vLLM's TokensPrompt is a TypedDict: calling it gives a dict
    return dict(kw)


class FakeCompletion:  # vllm.outputs.CompletionOutput
    def __init__(self, index, text, token_ids, finish_reason, stop_reason=None):
        self.index, self.text, self.token_ids = index, text, token_ids
        self.finish_reason, self.stop_reason = finish_reason, stop_reason
        self.cumulative_logprob, self.logprobs = None, None


class FakeRequestOutput:  # vllm.outputs.RequestOutput
    def __init__(self, request_id, prompt_token_ids, outputs):
        self.request_id, self.prompt_token_ids, self.outputs = request_id, prompt_token_ids, outputs
        self.finished = True


class FakeVLLMModel:
    def __init__(self, events):
        self.loads: list[list[tuple[str, torch.Tensor]]] = []
        self.events = events

    def load_weights(self, weights):
        got = [(n, t.detach().clone()) for n, t in weights]
        self.loads.append(got)
        self.events.append("load")
        return {n for n, _ in got}


class FakeLLM:
    instances: list["FakeLLM"] = []
    respond = None  # (prompt_token_ids, sampling_params) -> list[FakeCompletion]

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.events: list[str] = []
        self.model = FakeVLLMModel(self.events)
        runner = types.SimpleNamespace(model=self.model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))
        self.generate_calls = []
        FakeLLM.instances.append(self)

    def apply_model(self, func):
        self.events.append("apply_model")
        return [func(self.model)]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.events.append("reset_prefix_cache")
        return True

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, **kw):
        self.generate_calls.append(dict(prompts=prompts, sampling_params=sampling_params, use_tqdm=use_tqdm))
        return [FakeRequestOutput(str(i), p["prompt_token_ids"], type(self).respond(p["prompt_token_ids"], sp))
                for i, (p, sp) in enumerate(zip(prompts, sampling_params))]


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.33.0"
    mod.LLM, mod.SamplingParams, mod.TokensPrompt = FakeLLM, FakeSamplingParams, fake_tokens_prompt
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test; the sampler must set 0
    FakeLLM.instances, FakeLLM.respond = [], None
    return mod


# ----------------------------------------------------------------------------- 1. merged weights

def test_merged_weights_equal_merge_and_unload_and_leave_the_model_untouched(tok):
    model = lora_model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    pairs = merged_weights(model)

    names = [n for n, _ in pairs]
    assert names == base_param_names(tok)  # HF names: no base_model.model., no .base_layer, no lora_*
    assert len(set(names)) == len(names)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for n, t in pairs:
        assert torch.equal(t, merged[n]), n
    assert not torch.equal(dict(pairs)["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])  # merged
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert torch.equal(p, before[n]), n  # bit-identical: the training model is never merged in place
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_merged_weights_of_a_plain_model_are_its_parameters(tok):
    model, _ = tiny_causal_lm(tok, **SIZE)
    pairs = merged_weights(model)
    params = list(model.named_parameters())
    assert [n for n, _ in pairs] == [n for n, _ in params]
    assert all(torch.equal(t, p) and not t.requires_grad for (_, t), (_, p) in zip(pairs, params))

    # through a DistributedDataParallel wrapper (built without a process group: only `.module` matters here)
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    torch.nn.Module.__init__(ddp)
    ddp.module = lora_model(tok)
    assert [n for n, _ in merged_weights(ddp)] == [n for n, _ in params]


def test_merged_weights_modules_to_save_and_dora(tok):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from reasonlab.models.lm import _peft_reads_deprecated_alias  # PEFT's own FutureWarning, as in add_lora

    model, _ = tiny_causal_lm(tok, **SIZE)
    with _peft_reads_deprecated_alias():
        model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     modules_to_save=["norm"]))
    perturb_lora(model, 1)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.add_(1.0)
    pairs = merged_weights(model)
    assert [n for n, _ in pairs] == base_param_names(tok)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert all(torch.equal(t, merged[n]) for n, t in pairs)
    assert torch.equal(dict(pairs)["model.norm.weight"], torch.full((SIZE["hidden"],), 2.0))

    dora, _ = tiny_causal_lm(tok, **SIZE)
    with _peft_reads_deprecated_alias():
        dora = get_peft_model(dora, PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        merged_weights(dora)


# ----------------------------------------------------------------------------- 2. sync

def test_sync_hands_the_engine_exactly_the_merged_weights_then_resets_the_prefix_cache(tok, fake_vllm):
    import os

    model = lora_model(tok)
    sampler = VLLMSampler(model, tok, model_path="/models/base", dtype="float32", gpu_memory_utilization=0.25,
                          seed=7, enforce_eager=True)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # engine core in this process
    (llm,) = FakeLLM.instances
    assert llm.kwargs == dict(model="/models/base", dtype="float32", gpu_memory_utilization=0.25, seed=7,
                              enforce_eager=True, tensor_parallel_size=1)  # max_model_len 0: the model's own
    assert llm.events == ["apply_model", "load", "reset_prefix_cache"]  # __init__ synced the policy

    perturb_lora(model, 5)  # an "update"
    expected = merged_weights(model)
    sampler.sync(model)
    assert llm.events[3:] == ["apply_model", "load", "reset_prefix_cache"]
    got = llm.model.loads[-1]
    assert [n for n, _ in got] == [n for n, _ in expected] == base_param_names(tok)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(got, llm.model.loads[0]))  # the new weights

    VLLMSampler(model, tok, model_path="/models/base", max_model_len=512)
    assert FakeLLM.instances[-1].kwargs["max_model_len"] == 512


def test_sync_without_apply_model_uses_the_driver_worker_and_refuses_an_out_of_process_engine(tok, fake_vllm):
    class OldLLM(FakeLLM):
        apply_model = property(lambda self: (_ for _ in ()).throw(AttributeError("apply_model")))

    fake_vllm.LLM = OldLLM
    model = lora_model(tok)
    sampler = VLLMSampler(model, tok, model_path="/models/base")
    llm = FakeLLM.instances[-1]
    assert llm.events == ["load", "reset_prefix_cache"]
    assert [n for n, _ in llm.model.loads[0]] == base_param_names(tok)

    del llm.llm_engine.model_executor  # what LLMEngine looks like with the engine core in another process
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        sampler.sync(model)


# ----------------------------------------------------------------------------- 3. generate

def test_generate_sampling_params_and_sample_mapping(tok, fake_vllm):
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    stop = "\n\nQuestion:"

    def respond(prompt, sp):
        tag = tok.decode(prompt[-1:])  # each prompt ends in its own word: the replies say which prompt they answer
        replies = {
            " apple": [(enc(" one two") + [eos], "stop", None),            # EOS: stripped, finish eos
                       (enc(" three four five"), "length", None)],        # max_tokens: truncated
            " pear": [(enc(" 42" + stop + " next"), "stop", stop),          # stop string: text cut, tokens kept
                      (enc(" seven") + [eos], "stop", eos)],               # a stop_token_ids hit: EOS stripped
            " plum": [(enc(" nine"), "length", None), (enc(" ten") + [eos], "stop", None)],
        }[tag]
        comps = [FakeCompletion(j, "vllm-text", ids, fr, sr) for j, (ids, fr, sr) in enumerate(replies)]
        return comps[::-1]  # vLLM's order inside a request is not promised: the index is

    FakeLLM.respond = staticmethod(respond)
    model = lora_model(tok)
    sampler = VLLMSampler(model, tok, model_path="/models/base")
    prompts = [enc("Name a fruit: apple"), enc("A longer prompt about a pear"), enc("Last: plum")]
    cfg = GenConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=12, min_new_tokens=2, stop=(stop,), seed=3)

    out = sampler.generate(prompts, cfg)

    (call,) = FakeLLM.instances[-1].generate_calls
    assert call["use_tqdm"] is False
    assert [p["prompt_token_ids"] for p in call["prompts"]] == prompts
    sps = call["sampling_params"]
    assert len(sps) == len(prompts)
    for sp, seed in zip(sps, prompt_seeds(3, len(prompts))):
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.min_tokens, sp.stop, sp.seed) == (
            2, 0.7, 0.9, 12, 2, [stop], seed)
        assert eos in sp.stop_token_ids

    assert [[s.finish for s in row] for row in out] == [["eos", "length"], ["stop", "eos"], ["length", "eos"]]
    assert out[0][0].token_ids == enc(" one two") and out[0][0].text == " one two"
    assert out[0][1].token_ids == enc(" three four five") and out[0][1].truncated
    assert out[1][0].text == " 42" and out[1][0].token_ids == enc(" 42" + stop + " next")
    assert out[1][1].token_ids == enc(" seven") and out[1][1].text == " seven"
    assert out[2][1].text == " ten" and eos not in out[2][1].token_ids
    assert all(stop not in s.text for row in out for s in row)

    # explicit seeds, greedy
    FakeLLM.instances[-1].generate_calls.clear()
    out = sampler.generate(prompts[:2], GenConfig(n=2, temperature=0.0, max_new_tokens=4), seeds=[11, 12])
    sps = FakeLLM.instances[-1].generate_calls[0]["sampling_params"]
    assert [sp.seed for sp in sps] == [11, 12] and all(sp.temperature == 0.0 and sp.stop == [] for sp in sps)
    assert sampler.generate([], cfg) == []
    with pytest.raises(ValueError, match="seeds"):
        sampler.generate(prompts, cfg, seeds=[1])


# ----------------------------------------------------------------------------- 4. no vllm

def test_missing_vllm_is_one_line_naming_the_extra(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    model, _ = tiny_causal_lm(tok, **SIZE)
    with pytest.raises(BackendUnavailable) as e:
        VLLMSampler(model, tok, model_path="/models/base")
    msg = str(e.value)
    assert "reasonlab[vllm]" in msg and "\n" not in msg


def test_the_tiny_random_model_has_no_weights_for_vllm(tok, fake_vllm):
    model, _ = tiny_causal_lm(tok, **SIZE)
    with pytest.raises(BackendUnavailable, match="use own"):
        VLLMSampler(model, tok, model_path="tiny-random")
    assert FakeLLM.instances == []


def test_make_sampler_builds_it_from_the_recipe_settings(tok, fake_vllm, monkeypatch):
    from reasonlab.eval import generate

    monkeypatch.setattr(generate, "resolve_backend", lambda backend, device: "vllm")  # as on a CUDA machine
    model = lora_model(tok)
    settings = {"model_path": "/models/base", "dtype": "bfloat16", "gpu_memory_utilization": 0.3, "max_model_len": 0,
                "seed": 1}
    sampler = generate.make_sampler("vllm", model, tok, device="cuda", vllm=settings)
    assert isinstance(sampler, VLLMSampler) and sampler.name == "vllm"
    assert FakeLLM.instances[-1].kwargs["model"] == "/models/base"
