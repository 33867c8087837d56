"""Generation: grouped greedy == HF generate token for token; seeded sampling reproducible; stop strings;
log-likelihood scoring == a direct per-choice forward pass; acc/acc_norm as lm-eval."""

import pytest
import torch

from reasonlab.eval import generate as G

PROMPTS = ["Question: What is 2 + 3?\nAnswer:", "Hello", "The quick brown fox jumps over the lazy dog and then"]


@pytest.fixture(scope="module")
def tiny():
    from reasonlab.models.lm import tiny_causal_lm

    torch.set_num_threads(2)
    model, tok = tiny_causal_lm(hidden=64, layers=2, heads=4, seed=3)
    with torch.no_grad():  # let the blocks outweigh the tied embedding so greedy paths change token (a harder test)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(30)
            layer.self_attn.o_proj.weight.mul_(30)
    return model.eval(), tok


def hf_greedy(model, tok, prompt, n_new):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc.input_ids.shape[1]:].tolist()


def test_grouped_greedy_equals_hf_generate(tiny):
    model, tok = tiny
    n_new = 12
    refs = [hf_greedy(model, tok, p, n_new) for p in PROMPTS]
    assert all(len(set(r)) > 1 for r in refs)  # the greedy paths are not one repeated token
    for grouped in (True, False):
        out = G.generate(model, tok, PROMPTS, n=3, max_new_tokens=n_new, batch_size=6, grouped=grouped,
                         progress=False)
        for ref, group in zip(refs, out):
            assert len(group) == 3
            for s in group:
                # EOS ends our sample while HF pads after it: compare up to our length
                assert s.token_ids == ref[: len(s.token_ids)]
                assert s.finish == "eos" or s.token_ids == ref


def test_sampling_reproducible_with_seed(tiny):
    model, tok = tiny
    kw = dict(n=4, temperature=1.0, top_p=0.9, max_new_tokens=8, batch_size=8, progress=False)
    a = G.generate(model, tok, PROMPTS[:2], seed=7, **kw)
    b = G.generate(model, tok, PROMPTS[:2], seed=7, **kw)
    c = G.generate(model, tok, PROMPTS[:2], seed=8, **kw)
    ids = lambda out: [[s.token_ids for s in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert len({tuple(s.token_ids) for s in a[0]}) > 1  # samples within a group differ


def test_stop_strings_truncation_and_row_pruning(tiny):
    model, tok = tiny
    refs = [g[0] for g in G.generate(model, tok, PROMPTS, max_new_tokens=10, progress=False)]
    ref = refs[0]
    assert ref.finish in ("length", "eos") and ref.truncated == (ref.finish == "length")
    stop = ref.text[2:5]
    assert len(stop) == 3 and all(stop not in r.text for r in refs[1:]), "pick another prompt set for this model"
    # prompt 0 stops early; its rows are dropped from the batch and cache while the others keep decoding
    out = G.generate(model, tok, PROMPTS, n=2, max_new_tokens=10, stop=(stop,), batch_size=6, progress=False)
    for s in out[0]:
        assert s.finish == "stop" and s.stopped and not s.truncated
        assert s.text == ref.text[: ref.text.find(stop)] and len(s.token_ids) < len(ref.token_ids)
    for r, group in zip(refs[1:], out[1:]):
        for s in group:
            assert s.token_ids == r.token_ids and s.finish == r.finish


def test_chat_template_prompt(tiny):
    _, tok = tiny
    text = G.format_prompt(tok, "2+2?", chat=True)
    assert "2+2?" in text and text != "2+2?"
    assert G.format_prompt(tok, "2+2?", chat=False) == "2+2?"


def test_loglikelihood_matches_direct_forward(tiny):
    model, tok = tiny
    ctx = "Question: Which is a colour?\nAnswer:"
    choices = ["red", "a table", "seventeen dogs", "Z"]
    reqs = [(ctx, " " + c) for c in choices] + [("Short context ", "x y"), ("", "hello world")]
    got = G.loglikelihood(model, tok, reqs, batch_size=3)
    for (c, x), (ll, greedy) in zip(reqs, got):
        cids, xids = G._split_request(tok, c, x)
        ids = torch.tensor([cids + xids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # (T, V)
        pos = torch.arange(len(cids) - 1, len(cids) + len(xids) - 1)
        ref = logp[pos, torch.tensor(xids)].sum().item()
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(xids)).all())
    # trailing space of the context moves into the continuation (lm-eval)
    assert G._split_request(tok, "Answer: ", "4") == G._split_request(tok, "Answer:", " 4")


def test_choice_predictions_lm_eval_rule():
    # acc picks the highest summed log-likelihood; acc_norm divides by len(choice) in characters
    lls = [-4.0, -6.0, -30.0]
    choices = ["ab", "abcdefghij", "x" * 100]
    acc, acc_norm = G.choice_predictions(lls, choices)
    assert acc == 0 and acc_norm == 2  # -4/2=-2, -6/10=-0.6, -30/100=-0.3


# ----------------------------------------------------------------------------- backends behind one interface

def test_own_and_hf_backends_give_the_same_greedy_tokens(tiny):
    model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    own, hf = G.make_sampler("own", model, tok), G.make_sampler("hf", model, tok)
    assert (own.name, hf.name) == ("own", "hf")
    for cfg in (G.GenConfig(max_new_tokens=10, progress=False),
                G.GenConfig(n=2, max_new_tokens=8, min_new_tokens=8, progress=False),  # EOS masked: exactly 8
                G.GenConfig(max_new_tokens=10, stop=(" ",), progress=False)):
        a, b = own.generate(prompts, cfg), hf.generate(prompts, cfg)
        assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
        assert [[s.text for s in g] for g in a] == [[s.text for s in g] for g in b]
        if cfg.min_new_tokens:
            assert all(len(s.token_ids) == 8 and s.finish == "length" for g in a for s in g)


def test_sampling_is_seeded_per_prompt_whatever_shares_its_batch(tiny):
    model, tok = tiny
    a, b = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[2])["input_ids"]
    cfg = G.GenConfig(n=3, temperature=1.0, max_new_tokens=6, batch_size=8, progress=False)
    alone = G.generate(model, tok, [a], cfg, seeds=[11])
    with_other = G.generate(model, tok, [b, a], cfg, seeds=[5, 11])  # another prompt first, sorted differently
    assert [s.token_ids for s in alone[0]] == [s.token_ids for s in with_other[1]]
    ungrouped = G.generate(model, tok, [b, a], G.GenConfig(**{**cfg.to_dict(), "grouped": False, "progress": False}),
                           seeds=[5, 11])
    assert [s.token_ids for s in ungrouped[1]] == [s.token_ids for s in alone[0]]
    # the default seeds are by position: one prompt with seed s samples as a generator seeded with s
    assert G.prompt_seeds(7, 3)[0] == 7 and len(set(G.prompt_seeds(7, 3))) == 3


def test_backend_choice_and_a_missing_vllm_is_one_line(tiny, monkeypatch):
    model, tok = tiny
    assert G.resolve_backend("auto", "cpu") == "own"  # vLLM only ever on CUDA
    monkeypatch.setattr(G, "vllm_installed", lambda: False)
    with pytest.raises(G.BackendUnavailable) as e:
        G.make_sampler("vllm", model, tok, device="cpu")
    assert "\n" not in str(e.value) and 'pip install "reasonlab[vllm]"' in str(e.value)
    monkeypatch.setattr(G, "vllm_installed", lambda: True)
    with pytest.raises(G.BackendUnavailable, match="needs a CUDA device"):
        G.resolve_backend("vllm", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        G.resolve_backend("vlm", "cpu")


def test_the_decode_loop_passes_the_cache_under_the_name_this_transformers_reads(tiny):
    import warnings

    import transformers
    from packaging.version import Version

    model, tok = tiny
    want = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert G._cache_kwarg() == want
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        G.generate(model, tok, PROMPTS[:2], n=2, max_new_tokens=4, progress=False)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_the_recipe_cli_refuses_vllm_on_cpu_before_loading_anything(tmp_path):
    from conftest import cli

    p = cli("run", "configs/markovian/arithmetic-tiny.yaml", "rollout.backend=vllm", "--out", str(tmp_path),
            check=False)
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "vllm" in err[0], p.stderr
    assert not any(tmp_path.iterdir())


def test_continuous_batching_refills_rows_and_gives_each_prompt_its_own_samples(tiny, monkeypatch):
    """With fewer rows than samples, finished rows are refilled by the next prompts (spliced into the running cache,
    left-padded either way); every prompt's samples equal those of the prompt decoded alone, greedy and seeded, with
    EOS masked for min_new_tokens and stop strings per row."""
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (int(n),), generator=g).tolist() for n in (3, 17, 6, 11, 2, 9, 14)]
    spliced = []
    real = G._splice
    monkeypatch.setattr(G, "_splice", lambda *a: spliced.append(a[1].shape) or real(*a))
    for kw in (dict(n=1, temperature=0.0, batch_size=2), dict(n=2, temperature=1.0, batch_size=4),
               dict(n=3, temperature=1.0, top_p=0.8, batch_size=3, min_new_tokens=4),
               dict(n=1, temperature=1.0, batch_size=4, stop=(" ",))):
        cfg = G.GenConfig(max_new_tokens=9, seed=3, progress=False, **kw)
        seeds = G.prompt_seeds(3, len(prompts))
        together = G.generate(model, tok, prompts, cfg, seeds=seeds)
        alone = [G.generate(model, tok, [p], cfg, seeds=[s])[0] for p, s in zip(prompts, seeds)]
        assert [[(x.token_ids, x.finish, x.text) for x in grp] for grp in together] == \
               [[(x.token_ids, x.finish, x.text) for x in grp] for grp in alone], kw
        lengths = {len(x.token_ids) for grp in together for x in grp}
        assert min(lengths) >= kw.get("min_new_tokens", 0)
    assert spliced  # rows were refilled mid-batch, not only run in static batches
    # a model whose cache cannot be spliced falls back to static batches with the same samples
    monkeypatch.setattr(G, "streams", lambda m: False)
    static = G.generate(model, tok, prompts, cfg, seeds=seeds)
    assert [[x.token_ids for x in grp] for grp in static] == [[x.token_ids for x in grp] for grp in together]


def test_a_prefix_shared_by_every_prompt_is_prefilled_once_and_changes_no_sample(tiny, monkeypatch):
    """A few-shot block every prompt starts with is prefilled once (its keys/values copied into each prefill run);
    the samples equal those of each prompt decoded alone (where there is no shared prefix)."""
    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    head = torch.randint(5, 200, (24,), generator=g).tolist()
    prompts = [head + torch.randint(5, 200, (int(n),), generator=g).tolist() for n in (1, 7, 3, 12, 5)]
    shared = []
    real = G._shared_prefix
    monkeypatch.setattr(G, "_shared_prefix", lambda *a: shared.append(real(*a)[1]) or real(*a))
    for kw in (dict(n=1, temperature=0.0, batch_size=2), dict(n=2, temperature=1.0, batch_size=4)):
        cfg = G.GenConfig(max_new_tokens=8, seed=5, progress=False, **kw)
        seeds = G.prompt_seeds(5, len(prompts))
        together = G.generate(model, tok, prompts, cfg, seeds=seeds)
        alone = [G.generate(model, tok, [p], cfg, seeds=[s])[0] for p, s in zip(prompts, seeds)]
        assert [[x.token_ids for x in grp] for grp in together] == [[x.token_ids for x in grp] for grp in alone]
    assert 24 in shared and shared.count(0) == len(shared) - shared.count(24)  # the calls of one prompt share none


def test_mixed_groups_decode_the_policy_and_its_reference_in_one_batch_as_each_alone(tiny):
    """The Markovian rollout's shape: a prompt's 3 policy samples (T = 1) and the same prompt's greedy decode by the
    reference (adapter off) in one call give the samples each gives alone, in as many forwards as the longer one."""
    import copy

    from reasonlab.models.lm import LoraConfig, add_lora, reference

    model, tok = tiny
    peft = add_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    cfg = G.GenConfig(n=3, temperature=1.0, max_new_tokens=10, min_new_tokens=10, batch_size=8, progress=False)
    alone_pol = G.generate(peft, tok, prompts, cfg, seeds=[5, 6])
    with reference(peft):
        alone_ref = G.generate(peft, tok, prompts, G.GenConfig(n=1, max_new_tokens=10, min_new_tokens=10,
                                                              progress=False))
    calls = []
    # counted at the embedding: the model's forward and the written-out decode step (decode_step) both run it once
    hook = peft.get_base_model().model.embed_tokens.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        mixed = G.generate(peft, tok, prompts + prompts, cfg, seeds=[5, 6, 0, 0],
                           groups=[G.Group(3, 1.0)] * 2 + [G.Group(1, 0.0, "__base__")] * 2)
    finally:
        hook.remove()
    ids = lambda groups: [[s.token_ids for s in g] for g in groups]  # noqa: E731
    assert ids(mixed[:2]) == ids(alone_pol)
    assert ids(mixed[2:]) == ids(alone_ref)
    assert ids(alone_ref) != [[g[0]] for g in ids(alone_pol)]  # the adapter changes the tokens: a real test
    assert len(calls) == 2 + 9  # a prefill per prompt length (2: both adapters in each) + 9 decode steps
    with pytest.raises(ValueError, match="one per prompt"):
        G.generate(peft, tok, prompts, cfg, groups=[G.Group(1, 0.0)])
