"""The written-out Llama decode step (reasonlab.eval.decode_step) against transformers' own forward: bit for bit with
and without padding, with GQA, with a LoRA adapter and with per-row adapter switching (PEFT's adapter_names); the
stacked packed projections to float rounding; declined where it does not apply; generate() gives the same samples
with it and without it."""

import pytest
import torch

from reasonlab.eval import decode_step as DS
from reasonlab.eval.generate import GenConfig, Group, generate, lm_forward, new_cache
from reasonlab.eval.packed import packed, packer_for
from reasonlab.models.lm import LoraConfig, add_lora


def llama(hidden=64, layers=2, heads=4, kv=2, vocab=300, seed=0, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def with_lora(model, seed=1):
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide every LoRA term
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()


def run(model, rows: list[list[int]], steps: int, fast: bool, adapters: list[str] | None = None):
    """Left-padded prefill through transformers, then `steps` greedy decode steps through the written-out step
    (fast) or transformers' forward; returns every step's logits (b, V)."""
    L = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])  # (b, L)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {} if adapters is None else {"adapter_names": adapters}
    out = []
    with torch.no_grad(), packed(model):
        cache = new_cache(model)
        logits = lm_forward(model, cache=cache, input_ids=ids, attention_mask=mask, position_ids=pos,
                            **extra).logits[:, -1]
        step = DS.for_model(model, cache, mixed=adapters is not None) if fast else None
        assert (step is not None) == fast
        rowmask = None if adapters is None else torch.tensor([float(a != "__base__") for a in adapters])
        nxt_pos = pos[:, -1:] + 1
        for _ in range(steps):
            nxt = logits.argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if fast:
                logits = step(nxt, cache, mask, nxt_pos, rowmask)
            else:
                logits = lm_forward(model, cache=cache, input_ids=nxt[:, None], attention_mask=mask,
                                    position_ids=nxt_pos, **extra).logits[:, -1]
            nxt_pos = nxt_pos + 1
            out.append(logits)
    return out


SAME = [[5, 17, 42, 9, 3], [7, 1, 99, 12, 4]]
PADDED = [[5, 17, 42, 9, 3], [7, 1], [250, 8, 8]]


@pytest.mark.parametrize("rows", [SAME, PADDED], ids=["no-padding", "left-padded"])
@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "lora"])
def test_the_step_equals_transformers_bit_for_bit(rows, adapter):
    model = llama()
    model = with_lora(model) if adapter else model
    want, got = run(model, rows, 6, fast=False), run(model, rows, 6, fast=True)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_per_row_adapter_switching_equals_peft_mixed_batches():
    model = with_lora(llama())
    names = ["default", "__base__", "default"]
    want, got = run(model, PADDED, 5, fast=False, adapters=names), run(model, PADDED, 5, fast=True, adapters=names)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # and the base rows really are the base model's: the adapter disabled gives the same logits on row 1
    with model.disable_adapter():
        base = run(model, PADDED, 5, fast=True)
    assert torch.equal(got[-1][1], base[-1][1]) and not torch.allclose(got[-1][0], base[-1][0])


def test_stacked_packed_projections_equal_the_forward_to_rounding():
    model = with_lora(llama(hidden=512, heads=8, kv=2, vocab=500))  # q/k/v stacked: 768 x 512 >= MIN_NUMEL
    want, got = run(model, PADDED, 4, fast=False), run(model, PADDED, 4, fast=True)
    assert any(isinstance(k, tuple) for k in packer_for(model).cache)  # the stacked weights were packed
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_it_declines_where_it_does_not_apply(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert DS.for_model(llama()) is not None
    assert DS.for_model(llama().train()) is None  # dropout would differ
    assert DS.for_model(llama(attn="eager")) is None  # another attention kernel: other rounding
    assert DS.for_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).eval()) is None
    lora = with_lora(llama())
    assert DS.for_model(lora, mixed=True) is not None
    with lora.disable_adapter():  # the reference: fine alone, not for per-row switching
        assert DS.for_model(lora) is not None and DS.for_model(lora, mixed=True) is None
    monkeypatch.setenv("REASONLAB_DECODE_STEP", "0")
    assert DS.for_model(llama()) is None


def test_generate_gives_the_same_samples_with_and_without_the_step(monkeypatch):
    from reasonlab.models.lm import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    model = with_lora(llama(vocab=len(tok)))
    prompts = [tok("Question: 3 + 4 =")["input_ids"], tok("The capital of France is")["input_ids"]]
    cfg = GenConfig(n=3, temperature=1.0, max_new_tokens=10, batch_size=4, progress=False)

    def both():
        plain = generate(model, tok, prompts, cfg, seeds=[1, 2])
        mixed = generate(model, tok, prompts, cfg, seeds=[1, 2], groups=[Group(3, 1.0), Group(1, 0.0, "__base__")])
        return [[s.token_ids for s in g] for g in plain + mixed]

    on = both()
    monkeypatch.setenv("REASONLAB_DECODE_STEP", "0")
    assert both() == on
