"""Embedded models load offline; LoRA reference = the same model with its adapter disabled; offline hub ids fail in
one line."""

import os

import pytest
import torch

from reasonlab.models import embedded
from reasonlab.models.lm import (LoraConfig, ModelUnavailable, add_lora, count_parameters, load_causal_lm, reference,
                                 tiny_causal_lm)


@pytest.mark.slow
def test_smollm2_loads_offline_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_causal_lm("smollm2-135m")
    _, total = count_parameters(model)
    assert 134_000_000 < total < 136_000_000  # SmolLM2-135M, tied embeddings counted once
    assert embedded.resolve("smollm2-135m").joinpath("config.json").exists()  # converted once, cached as an HF folder
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_runs_started_together_convert_the_gguf_once(monkeypatch, tmp_path):
    """Two runs started at once on a fresh machine: one converts, the other waits and uses its folder (before the
    lock, the second converter deleted the folder the first run was loading: 'not in the local cache')."""
    import threading
    import time

    monkeypatch.setenv("REASONLAB_CACHE", str(tmp_path))
    calls = []

    def fake_convert(out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return out

    monkeypatch.setattr(embedded, "_convert_smollm2", fake_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(embedded.smollm2_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [tmp_path / "models" / "smollm2-135m"] * 2


def test_uncached_hub_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailable) as e:
        load_causal_lm("meta-llama/Llama-3.1-8B-Instruct")
    msg = str(e.value)
    assert "\n" not in msg and "meta-llama/Llama-3.1-8B-Instruct" in msg and "local Hugging Face cache" in msg


def test_reference_is_the_adapter_disabled_model():
    model, tok = tiny_causal_lm(seed=1)
    _, n_base = count_parameters(model)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        base = model(input_ids=ids).logits.clone()
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # make the adapter change the output
        policy = peft_model(input_ids=ids).logits
        with reference(peft_model) as ref:
            ref_logits = ref(input_ids=ids).logits
    assert not torch.allclose(policy, base)
    torch.testing.assert_close(ref_logits, base)
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert count_parameters(peft_model)[1] == n_base + n_lora  # no second copy of the base weights
    with pytest.raises(ValueError, match="LoRA adapter"):
        with reference(tiny_causal_lm(seed=1)[0]):
            pass
