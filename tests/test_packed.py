"""CPU linears on oneDNN-packed weights (reasonlab.eval.packed): equal to F.linear to rounding, gradients equal to
autograd's where they run under grad, repacked when a weight changes, routing undone after the block; generation with
them equals generation without them."""

import pytest
import torch
import torch.nn.functional as F

from reasonlab.eval import packed as P

pytestmark = pytest.mark.skipif(not P.available(), reason="this torch has no oneDNN packed-linear ops")


def big_linear(bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(640, 512, bias=bias)  # 327,680 weights >= MIN_NUMEL


def test_packed_linear_equals_f_linear_to_rounding_and_falls_back_for_trained_weights():
    lin, packer = big_linear(), P.Packer()
    x = torch.randn(3, 5, 640)  # (B, T, D): any leading shape
    with packer.on(lin):
        with torch.no_grad():
            y = lin(x)
        assert len(packer.cache) == 1  # the weight was packed
        xg = x.clone().requires_grad_()
        yg = lin(xg)  # a weight that takes gradients: the plain F.linear, so the backward is autograd's own
    ref = F.linear(x, lin.weight, lin.bias)
    assert y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(yg, F.linear(xg, lin.weight, lin.bias)) and yg.requires_grad
    assert "forward" not in lin.__dict__  # routing undone after the block


def test_a_frozen_weight_runs_packed_forward_and_backward_with_autograds_gradients():
    """A LoRA base under grad: the input's gradient through the packed transpose equals autograd's to rounding, and
    the forward is exactly the no-grad packed forward (a zero adapter's policy == its reference, bit for bit)."""
    lin, packer = big_linear(), P.Packer()
    lin.requires_grad_(False)
    x = torch.randn(3, 5, 640)
    w = torch.randn(3, 5, 512)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with packer.on(lin):
        y = lin(xg)
        with torch.no_grad():
            y0 = lin(x)
    (y * w).sum().backward()
    (F.linear(xr, lin.weight, lin.bias) * w).sum().backward()
    assert torch.equal(y.detach(), y0) and y.requires_grad
    assert len(packer.tcache) == 1  # the transpose was packed for the backward
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert not torch.equal(xg.grad, torch.zeros_like(xg.grad))


def test_trained_weights_run_packed_under_trained_true_with_autograds_gradients():
    lin, packer = big_linear(), P.Packer()
    x = torch.randn(3, 5, 640, requires_grad=True)
    w = torch.randn(3, 5, 512)
    with packer.on(lin):
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # trained: F.linear by default
    with packer.on(lin, trained=True):
        y = lin(x)
        y += 1.0  # an in-place residual add into the output, as TRM's blocks do (autograd must allow it)
    (y * w).sum().backward()
    got = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = lin.weight.grad = lin.bias.grad = None
    (F.linear(x, lin.weight, lin.bias) * w).sum().backward()
    for a, b in zip(got, (x.grad, lin.weight.grad, lin.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert not packer.trained and id(lin.weight) in packer.tcache
    with packer.on(lin, trained=True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast keeps its own linear


def test_a_packed_weight_is_reused_while_unchanged_and_repacked_after_an_update():
    lin, packer = big_linear(bias=False), P.Packer()
    x = torch.randn(8, 640)
    with torch.no_grad(), packer.on(lin):
        lin(x)
        first = packer.cache[id(lin.weight)][1]
        lin(x)
        assert packer.cache[id(lin.weight)][1] is first  # reused
        lin.weight.mul_(2.0)  # an optimizer step is in place too: the version counter moves
        y = lin(x)
        assert packer.cache[id(lin.weight)][1] is not first
    assert torch.allclose(y, F.linear(x, lin.weight), rtol=1e-5, atol=1e-4)


def test_small_linears_nested_blocks_and_the_switch(monkeypatch):
    small = torch.nn.Linear(64, 8)
    assert not P.eligible(small) and P.eligible(big_linear())  # LoRA-sized matrices stay on F.linear
    lin, packer = big_linear(), P.Packer()
    with packer.on(lin):
        with packer.on(lin):
            pass
        assert "forward" in lin.__dict__  # the inner block did not undo the outer one's routing
    assert "forward" not in lin.__dict__
    monkeypatch.setenv("REASONLAB_PACKED_LINEARS", "0")
    with torch.no_grad(), packer.on(lin):
        assert "forward" not in lin.__dict__


def test_generation_on_packed_weights_gives_the_tokens_of_generation_without(monkeypatch):
    from reasonlab.eval.generate import GenConfig, generate
    from reasonlab.models.lm import tiny_causal_lm

    model, tok = tiny_causal_lm(hidden=64, layers=2, heads=4, seed=5)  # its tied lm_head (49152 x 64) is packed
    assert any(P.eligible(m) for m in model.modules())
    prompts = ["Question: 3 + 4 =", "The capital of"]
    cfg = GenConfig(n=3, temperature=1.0, max_new_tokens=12, progress=False)
    on = generate(model, tok, prompts, cfg) + generate(model, tok, prompts, GenConfig(max_new_tokens=12,
                                                                                       progress=False))
    monkeypatch.setenv("REASONLAB_PACKED_LINEARS", "0")
    off = generate(model, tok, prompts, cfg) + generate(model, tok, prompts, GenConfig(max_new_tokens=12,
                                                                                        progress=False))
    assert [[s.token_ids for s in g] for g in on] == [[s.token_ids for s in g] for g in off]
