"""rl/policy.py: log-probs vs a direct forward, KL estimators, detached standardization, PG and PPO dual-clip losses."""

import pytest
import torch

from reasonlab.models.lm import tiny_causal_lm
from reasonlab.rl.policy import (entropy_from_logits, group_standardize, kl_exact, kl_exact_entropy, kl_k3,
                                 masked_mean, pg_loss, ppo_loss, token_logprobs)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_causal_lm(seed=0)
    return model.eval(), tok


def test_token_logprobs_match_direct_forward_and_ignore_left_padding(tiny):
    model, tok = tiny
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    lp = token_logprobs(model, ids, torch.ones_like(ids))
    logits = model(input_ids=ids).logits.float()
    want = torch.log_softmax(logits[0, :-1], -1)[torch.arange(4), ids[0, 1:]]
    torch.testing.assert_close(lp[0], want, atol=1e-5, rtol=0)
    # the same row left-padded by 2 gives the same log-probs on its real tokens
    pad = tok.pad_token_id
    ids2 = torch.tensor([[pad, pad, 5, 17, 42, 9, 3]])
    attn2 = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    lp2 = token_logprobs(model, ids2, attn2)
    torch.testing.assert_close(lp2[0, 2:], want, atol=1e-5, rtol=0)


def test_kl_exact_matches_torch_and_k3_is_unbiased():
    torch.manual_seed(0)
    p, q = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    want = torch.nn.functional.kl_div(torch.log_softmax(q, -1), torch.log_softmax(p, -1), log_target=True,
                                      reduction="none").sum(-1)
    torch.testing.assert_close(kl_exact(p, q), want, atol=1e-6, rtol=0)
    assert torch.all(kl_exact(p, p).abs() < 1e-6)
    # k3 on samples from p averages to KL(p || q)
    lp, lq = torch.log_softmax(p[0, 0], -1), torch.log_softmax(q[0, 0], -1)
    x = torch.distributions.Categorical(logits=lp).sample((200_000,), )
    est = kl_k3(lp[x], lq[x]).mean()
    assert abs(est.item() - kl_exact(p[0, 0], q[0, 0]).item()) < 0.02
    assert torch.all(kl_k3(lp[x], lq[x]) >= 0)


def test_fused_kl_entropy_equals_the_composed_ops_and_their_gradients():
    torch.manual_seed(0)
    zp, zq = torch.randn(3, 5, 97) * 3, torch.randn(3, 5, 97) * 3  # 15 positions: chunks of 4 and a ragged last one
    kl, ent = kl_exact_entropy(zp, zq)
    lp = torch.log_softmax(zp, -1)
    assert torch.equal(kl, kl_exact(zp, zq))  # the same ops per row: bit for bit
    assert torch.equal(ent, -(lp.exp() * lp).sum(-1))
    assert torch.equal(entropy_from_logits(zp), ent)  # the chunked no-grad entropy too
    # gradients to both inputs against autograd through the composed ops, float64
    a, b = zp.double().requires_grad_(), zq.double().requires_grad_()
    w = torch.rand(3, 5, dtype=torch.float64)
    (kl_exact_entropy(a, b)[0] * w).sum().backward()
    a2, b2 = zp.double().requires_grad_(), zq.double().requires_grad_()
    la, lb = torch.log_softmax(a2, -1), torch.log_softmax(b2, -1)  # kl_exact's ops (it computes in float32)
    ((la.exp() * (la - lb)).sum(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x, y: kl_exact_entropy(x, y)[0], (a.detach()[:1, :2].requires_grad_(),
                                                                             b.detach()[:1, :2].requires_grad_()))
    assert not ent.requires_grad and kl_exact_entropy(a, b)[0].requires_grad
    with pytest.raises(ValueError, match="shapes differ"):
        kl_exact_entropy(zp, zq[:, :4])


def test_group_standardize_detaches_statistics_but_keeps_reward_gradient():
    r = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0], requires_grad=True)
    a = group_standardize(r, group_size=3)
    g0 = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(a[:3], (g0 - g0.mean()) / (g0.std(unbiased=False) + 1e-6))
    assert torch.all(a[3:] == 0)  # a zero-std group carries no advantage
    # the bug the paper's public code had: with mean/std NOT detached, d/dr sum(A) == 0
    a.sum().backward()
    assert r.grad.abs().sum() > 0
    r2 = r.detach().clone().requires_grad_(True)
    g = r2.view(2, 3)
    ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True, unbiased=False) + 1e-6)).sum().backward()
    assert r2.grad.abs().max() < 1e-5
    with pytest.raises(ValueError, match="groups of 4"):
        group_standardize(torch.ones(6), group_size=4)


def test_masked_mean_aggregations():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, m, "seq_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert masked_mean(x, m, "token_mean").item() == pytest.approx(10.0 / 4)
    assert masked_mean(x, m, "seq_sum").item() == pytest.approx((6.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="agg"):
        masked_mean(x, m, "sum")


def test_ppo_ratio_is_one_at_pi_old_and_gradient_equals_pg():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    old = logp.detach().clone()  # the sampling policy's own log-probs
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    mask = torch.ones(4, 6)
    loss, st = ppo_loss(logp, old, adv, mask)
    assert st["ratio_mean"].item() == 1.0 and st["ratio_max"].item() == 1.0 and st["clip_frac"].item() == 0.0
    g_ppo, = torch.autograd.grad(loss, logits)
    g_pg, = torch.autograd.grad(pg_loss(torch.log_softmax(logits, -1), adv, mask), logits)
    torch.testing.assert_close(g_ppo, g_pg)  # d ratio / d theta at ratio 1 = d log pi / d theta


def test_dual_clip_bounds_the_loss_for_negative_advantages():
    adv = torch.tensor([-2.0, -2.0, 1.0])
    mask = torch.ones(3, 1)
    old = torch.zeros(3, 1)
    logp = torch.tensor([[3.1], [0.0], [3.1]])  # ratio e^3.1 ~ 22: the seed report's 21.75
    loss_dc, st = ppo_loss(logp, old, adv, mask, dual_clip=3.0, agg="token_mean")
    loss_nodc, _ = ppo_loss(logp, old, adv, mask, dual_clip=None, agg="token_mean")
    # per token: row0 capped at 3*2=6 (unbounded: 2*22.2=44.4); row1 ratio 1 -> 2; row2 A>0 clipped -> -1.2
    assert loss_dc.item() == pytest.approx((6.0 + 2.0 - 1.2) / 3, abs=1e-5)
    assert loss_nodc.item() == pytest.approx((2.0 * torch.exp(torch.tensor(3.1)).item() + 2.0 - 1.2) / 3, abs=1e-4)
    assert st["dual_clip_frac"].item() == pytest.approx(1 / 3)
    # the bound holds for any ratio
    for lr in (5.0, 10.0, 50.0):
        l, _ = ppo_loss(torch.tensor([[lr]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
        assert l.item() <= 3.0 + 1e-6
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_loss(logp, old, adv, mask, dual_clip=0.5)


def test_k3_as_a_loss_has_the_gradient_of_the_reverse_kl():
    """On tokens sampled from pi, E_pi[grad k3] = grad KL(ref || pi), not grad KL(pi || ref): exact expectations over a
    small vocabulary (the sum over tokens weighted by pi replaces sampling)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    expected_k3 = (pi * kl_k3(logp, ref)).sum()  # E_pi[k3] with pi's weights held fixed: E_pi[grad k3]
    grad_k3 = torch.autograd.grad(expected_k3, theta)[0]
    reverse = (ref.exp() * (ref - torch.log_softmax(theta, -1))).sum()  # KL(ref || pi)
    forward = (torch.log_softmax(theta, -1).exp() * (torch.log_softmax(theta, -1) - ref)).sum()  # KL(pi || ref)
    g_rev = torch.autograd.grad(reverse, theta)[0]
    g_fwd = torch.autograd.grad(forward, theta)[0]
    torch.testing.assert_close(grad_k3, g_rev)
    assert not torch.allclose(grad_k3, g_fwd, atol=1e-3)
    # and its value is an unbiased estimate of KL(pi || ref)
    assert float((pi * kl_k3(logp, ref)).sum().detach()) == pytest.approx(float(forward.detach()), rel=1e-9)


def test_token_logprobs_at_a_temperature_are_those_of_the_scaled_softmax(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()  # (T-1, V)
    for T in (0.7, 1.5):
        lp, lg = token_logprobs(model, ids, torch.ones_like(ids), return_logits=True, temperature=T)
        want = torch.log_softmax(logits / T, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        torch.testing.assert_close(lp[0], want)
        torch.testing.assert_close(lg[0], logits / T)
