"""router.py against loops over tokens and hand-computed losses."""
import math

import pytest
import torch

from model import GPTConfig, init_weights
from moe import MoE
from router import bias_update, hierarchical_route, load_balance_loss, load_cv, topk_route, z_loss


def test_topk_matches_per_token_loop():
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    r = topk_route(logits, 3)
    for t in range(50):
        probs = torch.softmax(logits[t], -1)
        order = sorted(range(8), key=lambda e: -probs[e].item())[:3]
        assert r.expert_idx[t].tolist() == order
        top = probs[order]
        torch.testing.assert_close(r.gates[t], top / top.sum())
    assert r.expert_counts.sum() == 150
    assert r.expert_counts.tolist() == [float((r.expert_idx == e).sum()) for e in range(8)]


def test_load_balance_hand_computed():
    # 2 tokens, 2 experts, k=1. probs rows (0.75, 0.25) and (0.25, 0.75); token0 -> e0,
    # token1 -> e1. f = (0.5, 0.5), P = (0.5, 0.5): loss = 2 * (0.25 + 0.25) = 1.0.
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    idx = torch.tensor([[0], [1]])
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.0)
    # Both tokens to e0: f = (1, 0), P = (0.75, 0.25) with probs rows (0.75,.25),(0.75,.25)
    # -> 2 * 0.75 = 1.5.
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert load_balance_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.5)


def test_z_loss_and_aux_weighting():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4; mean of squares.
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    r = topk_route(logits, 1, balance_coef=0.0, z_coef=2.0)
    assert r.aux_loss.item() == pytest.approx(2 * expected, rel=1e-5)


def _hierarchical_reference(cluster_logits, expert_logits, k):
    n, g = cluster_logits.shape
    m = expert_logits.shape[1] // g
    out_idx, out_gates, out_cluster = [], [], []
    for t in range(n):
        cp = torch.softmax(cluster_logits[t], -1)
        c = int(cp.argmax())
        within = torch.softmax(expert_logits[t, c * m:(c + 1) * m], -1)
        local = sorted(range(m), key=lambda j: -within[j].item())[:k]
        top = within[local]
        out_idx.append([c * m + j for j in local])
        out_gates.append((top / top.sum()).tolist())
        out_cluster.append(c)
    return torch.tensor(out_idx), torch.tensor(out_gates), torch.tensor(out_cluster)


def test_hierarchical_matches_per_token_loop():
    torch.manual_seed(1)
    cl, el = torch.randn(40, 4), torch.randn(40, 16)
    r = hierarchical_route(cl, el, k=2)
    idx, gates, cluster = _hierarchical_reference(cl, el, 2)
    assert torch.equal(r.expert_idx, idx)
    assert torch.equal(r.cluster_idx, cluster)
    torch.testing.assert_close(r.gates, gates)
    assert r.cluster_counts.tolist() == [float((cluster == c).sum()) for c in range(4)]
    assert r.expert_counts.sum() == 80


def test_hierarchical_balance_loss_hand_computed():
    # 2 clusters of m=2, k=1. token0 -> cluster 0, token1 -> cluster 1, with cluster probs
    # (0.75, 0.25), (0.25, 0.75): cluster-level loss = 1.0 (as in the flat case).
    cl = torch.log(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    # Within: token0 in cluster 0 has probs (0.75, 0.25) -> expert 0; token1 in cluster 1
    # has (0.5, 0.5) -> expert 2 (first of ties). Per cluster with one token each:
    # cluster 0: f = (1, 0), P = (0.75, 0.25) -> 2 * 0.75 = 1.5;
    # cluster 1: f = (1, 0), P = (0.5, 0.5) -> 2 * 0.5 = 1.0. Mean = 1.25. Total = 2.25.
    el = torch.log(torch.tensor([[0.75, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]))
    r = hierarchical_route(cl, el, k=1, balance_coef=1.0, z_coef=0.0)
    assert r.expert_idx.flatten().tolist() == [0, 2]
    assert r.aux_loss.item() == pytest.approx(2.25, rel=1e-5)


def test_hierarchical_gates_pass_gradient_to_cluster_router():
    torch.manual_seed(2)
    cl = torch.randn(10, 4, requires_grad=True)
    el = torch.randn(10, 16, requires_grad=True)
    r = hierarchical_route(cl, el, k=2, balance_coef=0.0, z_coef=0.0)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(10))  # value: renormalized
    (r.gates * torch.randn(10, 2)).sum().backward()
    assert cl.grad.abs().sum() > 0 and el.grad.abs().sum() > 0


def test_load_cv():
    assert load_cv(torch.tensor([5.0, 5.0, 5.0])).item() == 0
    # counts (1, 3): mean 2, population std 1 -> 0.5
    assert load_cv(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.5)


def test_bias_steers_the_choice_and_leaves_the_gates():
    torch.manual_seed(3)
    logits, bias = torch.randn(60, 8), 0.3 * torch.randn(8)
    r = topk_route(logits, 2, bias=bias)
    for t in range(60):
        probs = torch.softmax(logits[t], -1)
        chosen = sorted(range(8), key=lambda e: -(probs[e] + bias[e]).item())[:2]
        assert r.expert_idx[t].tolist() == chosen
        torch.testing.assert_close(r.gates[t], probs[chosen] / probs[chosen].sum())
    plain = topk_route(logits, 2)
    same = (r.expert_idx == plain.expert_idx).all(-1)
    assert 0 < same.sum() < 60                                # the bias changed some choices,
    assert torch.equal(r.gates[same], plain.gates[same])      # never the gates of a choice


def test_hierarchical_bias_steers_both_stages_and_leaves_the_gates():
    torch.manual_seed(4)
    cl, el = torch.randn(40, 4), torch.randn(40, 16)
    cb, eb = 0.2 * torch.randn(4), 0.2 * torch.randn(16)
    r = hierarchical_route(cl, el, k=2, cluster_bias=cb, expert_bias=eb)
    for t in range(40):
        c = int((torch.softmax(cl[t], -1) + cb).argmax())
        within = torch.softmax(el[t, c * 4:(c + 1) * 4], -1)
        local = sorted(range(4), key=lambda j: -(within[j] + eb[c * 4 + j]).item())[:2]
        assert r.cluster_idx[t] == c and r.expert_idx[t].tolist() == [c * 4 + j for j in local]
        torch.testing.assert_close(r.gates[t], within[local] / within[local].sum())


def test_bias_update_signs_and_groups():
    delta = bias_update(torch.tensor([4.0, 0.0, 2.0, 2.0]), rate=0.1)
    torch.testing.assert_close(delta, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # Two groups of two: each expert is compared with its own group's mean only.
    delta = bias_update(torch.tensor([3.0, 1.0, 10.0, 10.0]), rate=0.1, n_groups=2)
    torch.testing.assert_close(delta, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # Centred: a lone underloaded expert gains what the others lose together.
    delta = bias_update(torch.tensor([0.0, 1.0, 1.0, 1.0]), rate=0.1)
    torch.testing.assert_close(delta.sum(), torch.tensor(0.0))
    assert delta[0] > 0 and (delta[1:] < 0).all()


def _planted_layer(balance="bias"):
    """A MoE layer whose router strongly prefers experts 0 and 1: a planted imbalance."""
    torch.manual_seed(5)
    cfg = GPTConfig(n_embd=16, ffn_hidden=16, n_experts=8, top_k=2, n_clusters=2, rank=2,
                    moe="topk", balance=balance, bias_rate=0.003, aux_loss_coef=0.0)
    layer = MoE(cfg)
    init_weights(layer, 1)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[:2] += 0.15      # every token leans toward experts 0 and 1
    return layer.train()


def _balance(layer, steps):
    cvs = []
    for step in range(steps):
        x = torch.randn(1, 2048, 16, generator=torch.Generator().manual_seed(step)).abs()
        layer(x)
        cvs.append(load_cv(layer.step_counts).item())
        layer.balance_step()
    return cvs


def test_planted_imbalance_is_removed_by_the_bias_alone():
    layer = _planted_layer()
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    cvs = _balance(layer, 300)
    assert cvs[0] > 1.0 and sum(cvs[-50:]) / 50 < 0.1, (cvs[0], cvs[-50:])
    assert all(torch.equal(p, weights[n]) for n, p in layer.named_parameters())  # no training
    off = _planted_layer(balance="aux")  # the same layer without the bias stays imbalanced
    assert min(_balance(off, 50)) > 1.0 and not off.expert_bias.any()


def test_planted_imbalance_inside_clusters_is_removed_at_both_stages():
    from cluster import ClusterSettings
    from regroup import recluster
    layer = _planted_layer()
    recluster(layer, ClusterSettings(restarts=0))                       # 2 clusters of 4, hierarchical routing
    with torch.no_grad():
        layer.cluster_router[0] += 0.15                # and every token leans to cluster 0
    cvs, cluster_cvs = [], []
    for step in range(400):
        x = torch.randn(1, 2048, 16, generator=torch.Generator().manual_seed(step)).abs()
        layer(x)
        cvs.append(load_cv(layer.step_counts).item())
        cluster_cvs.append(load_cv(layer.step_cluster_counts).item())
        layer.balance_step()
    assert cluster_cvs[0] > 0.5 and sum(cluster_cvs[-50:]) / 50 < 0.1, cluster_cvs[::40]
    assert cvs[0] > 0.5 and sum(cvs[-50:]) / 50 < 0.1, cvs[::40]


def test_a_bias_that_overrules_the_router_leaves_gates_finite():
    # The router puts cluster 1 and experts 5, 6 some 100 logits below the rest, so their
    # probabilities underflow to 0 in float32; the biases pick them anyway.
    cl = torch.tensor([[60.0, -60.0]], requires_grad=True)
    el = torch.tensor([[0.0, 0.0, 0.0, 0.0, 50.0, -60.0, -70.0, 0.0]], requires_grad=True)
    r = hierarchical_route(cl, el, k=2, cluster_bias=torch.tensor([0.0, 1.5]),
                           expert_bias=torch.tensor([0.0, 0, 0, 0, 0, 1.5, 1.5, 0]))
    assert r.cluster_idx.tolist() == [1] and r.expert_idx.tolist() == [[5, 6]]
    want = torch.softmax(torch.tensor([-60.0, -70.0]), -1)      # the chosen pair, renormalized
    torch.testing.assert_close(r.gates[0], want)
    (r.gates * torch.tensor([[1.0, 2.0]])).sum().backward()
    assert torch.isfinite(cl.grad).all() and torch.isfinite(el.grad).all()
    flat = topk_route(torch.tensor([[80.0, -40.0, -50.0, 0.0]]), 2, bias=torch.tensor([0.0, 2.0, 2.0, 0.0]))
    assert flat.expert_idx.tolist() == [[1, 2]] and torch.isfinite(flat.gates).all()
    torch.testing.assert_close(flat.gates[0], torch.softmax(torch.tensor([-40.0, -50.0]), -1))
