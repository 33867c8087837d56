"""Latent bridge, second part: the number-words task (answers computed, never in the question), the copy baseline and
its report flag, C2C-style KV fusion (equals the plain target with its gates at 0; decoding from the fused cache
equals the teacher-forced logits), LatentWire's DiT translator, and every new loss term in the gradient audit."""

import dataclasses

import pytest
import torch

from reasonlab.config import from_dict, load_config
from reasonlab.eval.generate import GenConfig, generate, generate_from_embeds
from reasonlab.methods import bridge as M
from reasonlab.models.bridge import Bridge, TranslatorConfig, answer_logits, assemble, load_source
from reasonlab.models.bridge_fusion import own_kv, prefill, prefix_of, rebuild
from reasonlab.models.lm import tiny_causal_lm
from reasonlab.rl.audit import audit_terms
from reasonlab.tasks import get_task
from reasonlab.tasks.number_words import in_words

from conftest import ROOT


def test_number_words_spells_numbers_and_keeps_splits_apart():
    assert [in_words(n) for n in (0, 7, 13, 20, 47, 100, 405, 412, 999)] == [
        "zero", "seven", "thirteen", "twenty", "forty-seven", "one hundred", "four hundred five",
        "four hundred twelve", "nine hundred ninety-nine"]
    t = get_task("number-words")
    golds = {s: {e.gold for e in t.examples(s)} for s in t.splits}
    assert sum(map(len, golds.values())) == 999 and not (golds["train"] & golds["test"])
    assert len(golds["test"]) >= 300  # the acceptance's n
    for e in t.examples("test")[:50]:
        assert not any(ch.isdigit() for ch in e.question) and str(int(e.gold)) == e.gold
        assert t.score(f" {e.gold}\n", e).correct and not t.score(" 1000", e).correct
    half = get_task("number-words", split_question=True)
    e = half.examples("test")[0]
    n = int(e.gold)
    assert n >= 100 and n % 100 and e.question.startswith(in_words(n // 100 * 100))
    assert e.meta["source_text"] == in_words(n % 100) and e.meta["source_text"] not in half.prompt(e)


def test_copy_baseline_is_one_for_word_recall_and_zero_for_number_words():
    cfg = load_config(ROOT / "configs" / "bridge" / "number-words-smollm2.yaml")
    nw = get_task("number-words")
    assert not any(M.copy_baseline(nw.examples("test"), nw, cfg))
    wr = get_task("word-recall", n_test=50)
    assert all(M.copy_baseline(wr.examples("test"), wr, cfg))
    half = get_task("number-words", split_question=True)
    fcfg = load_config(ROOT / "configs" / "bridge" / "number-words-fusion.yaml")
    assert not any(M.copy_baseline(half.examples("test"), half, fcfg))


def test_copy_task_detector_flags_a_bridge_whose_answers_are_in_the_question(tmp_path):
    from reasonlab.diagnostics.detectors import detect_copy_task, thresholds_from_config
    from reasonlab.diagnostics.runfolder import RunFolder
    from reasonlab.runs import write_eval

    def folder(copy_share: float):
        root = tmp_path / str(copy_share)
        n = 100
        recs = [{"id": str(i), "correct": i < 40} for i in range(n)]
        metrics = {"accuracy": {"value": 0.4, "n": n, "lo": 0.31, "hi": 0.5, "method": "wilson"},
                   "copy_baseline": {"value": copy_share, "n": n, "lo": None, "hi": None, "method": "wilson"}}
        write_eval(root, "test.x@final", recs, {"split": "test", "final": True, "metrics": metrics})
        rf = RunFolder(root)
        return detect_copy_task(rf, thresholds_from_config(rf.config))

    flagged = folder(1.0)
    assert [f.code for f in flagged] == ["copy_task"] and "cannot fail" in flagged[0].title
    assert folder(0.0) == []


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    target, tok = tiny_causal_lm()
    for p in target.parameters():
        p.requires_grad_(False)
    target.eval()
    source = load_source(M.SourceConfig(name="tiny-random", layers=[1, -1], text="source_text"))
    return target, tok, source


def fusion_ctx(tiny, **over):
    target, tok, source = tiny
    cfg = from_dict(M.Config, {
        "source": {"name": "tiny-random", "layers": [1, -1], "text": "source_text"},
        "translator": {"kind": "kv_fusion", "hidden": 16, "heads": 2}, "bridge": {"mode": "kv_fusion"},
        "loss": {"nll": 1.0, "separation": 0.5},
        "data": {"task": "number-words", "task_args": {"split_question": True, "fewshot": 2}},
        "train": {"batch_size": 4}, **over})
    task = get_task(cfg.data.task, **cfg.data.task_args)
    torch.manual_seed(1)
    bridge = Bridge(source.dim, target.get_input_embeddings().weight, cfg.translator,
                    target_config=target.config, source_layers=2)
    return {"cfg": cfg, "task": task, "source": source, "target": target, "target_module": target, "bridge": bridge,
            "bridge_module": bridge, "prompter": M.Prompter(task, tok, cfg), "prefix_kv": M.PrefixKV()}


def plain_answer_logits(ctx, exs):
    pr = ctx["prompter"]
    emb, attn, lab = assemble(ctx["target"].get_input_embeddings(), [pr.text_row(e, answer=True) for e in exs],
                              pr.tok.pad_token_id or 0)
    return answer_logits(ctx["target"], emb, attn, lab)


def fused_answer_logits(ctx, exs):
    states, smask = ctx["source"].encode(M.source_texts(exs, ctx["task"], ctx["cfg"]))
    cache, pmask, last = M.fused_forward(ctx, exs, [states], smask)
    pr = ctx["prompter"]
    rows = [M.Row([int(last[i])], None, [], [], pr.get(e)["answer"]) for i, e in enumerate(exs)]
    emb, attn, lab = assemble(ctx["target"].get_input_embeddings(), rows, pr.tok.pad_token_id or 0)
    return answer_logits(ctx["target"], emb, attn, lab, cache, pmask)


def test_kv_fusion_is_the_plain_target_when_its_gates_are_zero(tiny):
    ctx = fusion_ctx(tiny)
    fuser = ctx["bridge"].translator
    exs = ctx["task"].examples("train")[:4]
    plain = plain_answer_logits(ctx, exs)
    at_init = fused_answer_logits(ctx, exs)  # the projector's output starts at 0
    torch.testing.assert_close(at_init[0], plain[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for o in fuser.out:
            o.weight.normal_(0, 0.5)
            o.bias.normal_(0, 0.5)
    opened = fused_answer_logits(ctx, exs)
    assert (opened[0] - plain[0]).abs().max() > 1e-2  # the gates open: the source changes the answer logits
    with torch.no_grad():
        fuser.gate.zero_()
    closed = fused_answer_logits(ctx, exs)
    torch.testing.assert_close(closed[0], plain[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(closed[1], plain[1]) and torch.equal(closed[2], plain[2])


def test_decoding_from_the_fused_cache_follows_its_logits(tiny):
    """Greedy decoding from a fused cache (the eval path) gives the argmax of the teacher-forced fused logits at the
    first answer position, and with gates 0 the plain target's greedy answer."""
    ctx = fusion_ctx(tiny)
    fuser = ctx["bridge"].translator
    with torch.no_grad():
        for o in fuser.out:
            o.weight.normal_(0, 0.5)
    exs = ctx["task"].examples("validation")[:3]
    states, smask = ctx["source"].encode(M.source_texts(exs, ctx["task"], ctx["cfg"]))
    gc = GenConfig(max_new_tokens=3, progress=False)
    emb = ctx["target"].get_input_embeddings()

    def fused_greedy():
        cache, pmask, last = M.fused_forward(ctx, exs, [states], smask)
        return generate_from_embeds(ctx["target"], ctx["prompter"].tok, emb(last)[:, None],
                                    torch.ones_like(last)[:, None], gc, past=(cache, pmask))

    first = fused_answer_logits(ctx, exs)[0][:, 0].argmax(-1).tolist()  # (B,)
    assert [s.token_ids[0] for s in fused_greedy()] == first
    with torch.no_grad():
        fuser.gate.zero_()
    plain = generate(ctx["target"], ctx["prompter"].tok, [ctx["prompter"].get(e)["text"] for e in exs],
                     dataclasses.replace(gc, batch_size=8))
    assert [s.token_ids for s in fused_greedy()] == [s[0].token_ids for s in plain]


def test_prefill_then_rebuild_keeps_the_prompt_cache(tiny):
    target, tok, _ = tiny
    prompts = [list(range(5, 20)) + [30, 31], list(range(5, 20)) + [40]]
    cache, mask, P, last = prefill(target, M.PrefixKV(), prompts, 0)
    assert P == 15 and mask.shape == (2, 16) and mask[1, 15] == 0 and last.tolist() == [31, 40]
    again = rebuild(target, prefix_of(cache, P), own_kv(cache, P))
    for a, b in zip(cache.layers, again.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_new_loss_terms_are_in_the_gradient_audit(tiny):
    ctx = fusion_ctx(tiny)
    exs = ctx["task"].examples("train")[:4]
    gen = torch.Generator().manual_seed(0)
    states, smask = ctx["source"].encode(M.source_texts(exs, ctx["task"], ctx["cfg"]))
    terms, info = M.fusion_terms(ctx, exs, states, smask, gen)
    assert set(terms) == {"nll", "separation"} and info["gates"].shape == (2, 2)
    audit = audit_terms(terms, list(ctx["bridge"].parameters()))
    assert audit.dead_terms() == [] and all(t.grad_norm > 1e-8 for t in audit.terms.values()), audit.table()

    # the DiT translator: soft tokens from noise by Euler steps (trained through them) + its own flow loss
    target, tok, source = tiny
    cfg = from_dict(M.Config, {"source": {"name": "tiny-random", "layers": [1, -1]},
                               "translator": {"kind": "dit", "num_queries": 3, "hidden": 16, "heads": 2, "layers": 1,
                                              "flow_steps": 2},
                               "loss": {"nll": 1.0, "flow": 0.5, "separation": 0.1},
                               "data": {"task": "number-words", "task_args": {"fewshot": 2}},
                               "train": {"batch_size": 4}})
    task = get_task("number-words", fewshot=2)
    torch.manual_seed(2)
    bridge = Bridge(source.dim, target.get_input_embeddings().weight, cfg.translator)
    dctx = {"cfg": cfg, "task": task, "source": source, "target": target, "target_module": target, "bridge": bridge,
            "bridge_module": bridge, "prompter": M.Prompter(task, tok, cfg)}
    terms, info = M.loss_terms(dctx, task.examples("train")[:4], 0, torch.Generator().manual_seed(0))
    assert set(terms) == {"nll", "flow", "separation"} and info["soft"].shape[:2] == (4, 3)
    audit = audit_terms(terms, list(bridge.parameters()))
    assert audit.dead_terms() == [] and all(t.grad_norm > 1e-8 for t in audit.terms.values()), audit.table()
    # seeded noise: the same generator gives the same soft tokens, another one different ones
    st, sm = source.encode(["one", "two"])
    a = bridge(st, sm, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, bridge(st, sm, generator=torch.Generator().manual_seed(5))[0])
    assert not torch.allclose(a, bridge(st, sm, generator=torch.Generator().manual_seed(6))[0])


def test_dit_translator_flow_loss_learns_a_fixed_target(tiny):
    """A few hundred Adam steps of the flow loss alone bring the sampled soft tokens close to their flow target."""
    torch.manual_seed(0)
    from reasonlab.models.bridge import DiTTranslator, resample_tokens

    tc = TranslatorConfig(kind="dit", num_queries=2, hidden=32, heads=2, layers=1, flow_steps=8)
    dit = DiTTranslator(8, 6, tc)
    states, mask = torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool)
    x1 = torch.randn(4, 5, 6)
    q_mask = torch.ones(4, 5, dtype=torch.bool)
    goal = resample_tokens(x1, q_mask, 2)  # (4, 2, 6)
    g = torch.Generator().manual_seed(0)
    before = (dit(states, mask, torch.Generator().manual_seed(1))[0] - goal).pow(2).mean().item()
    opt = torch.optim.Adam(dit.parameters(), lr=3e-3)
    for _ in range(300):
        loss = dit.flow_loss(x1, q_mask, states, mask, 1.0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = (dit(states, mask, torch.Generator().manual_seed(1))[0] - goal).pow(2).mean().item()
    assert float(after) < 0.25 * float(before), (float(before), float(after))


def test_fusion_config_errors_are_one_line():
    with pytest.raises(ValueError, match="go together"):
        from_dict(M.Config, {"translator": {"kind": "kv_fusion"}})
    with pytest.raises(ValueError, match="loss.align: 0"):
        from_dict(M.Config, {"translator": {"kind": "kv_fusion"}, "bridge": {"mode": "kv_fusion"},
                             "loss": {"align": 0.5}})
    with pytest.raises(ValueError, match="translator.kind: dit"):
        from_dict(M.Config, {"loss": {"flow": 1.0}})
    with pytest.raises(ValueError, match="translator.kind must be"):
        from_dict(M.Config, {"translator": {"kind": "fusion"}})
    with pytest.raises(ValueError, match="source.text must be"):
        from_dict(M.Config, {"source": {"text": "half"}})


def test_tiny_fusion_run_writes_every_condition_the_copy_baseline_and_gates(tmp_path):
    import json

    from conftest import cli, only_run_dir, read_json

    cli("run", str(ROOT / "configs" / "bridge" / "tiny-fusion.yaml"), "--out", str(tmp_path), timeout=900)
    run = only_run_dir(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("grad/term/nll", 0) > 0 and r.get("grad/term/separation", 0) > 0 for r in rows)
    assert any("train/gate_k" in r for r in rows)
    evals = {p.name for p in (run / "evals").glob("*.json")}
    for suffix in ("", "+control=zero_source", "+control=shuffled_source", "+control=target_text"):
        assert f"test.number-words@final{suffix}.json" in evals, sorted(evals)
    final = read_json(run / "evals" / "test.number-words@final.json")
    assert final["mode"] == "kv_fusion" and final["metrics"]["copy_baseline"]["value"] == 0.0
    assert len(final["fusion"]["gate_k"]) == 2 and final["metrics"]["accuracy"]["n"] == 8
    src = read_json(run / "evals" / "test.number-words.source@final.json")  # the source alone, on its half
    assert src["role"] == "source_alone"
    assert set(final["paired"]) == {"zero_source", "shuffled_source", "target_text", "source_alone"}
    assert all(0 < d["p_value"] <= 1 and d["n"] == 8 for d in final["paired"].values())
    assert read_json(run / "summary.json")["status"] == "completed"
