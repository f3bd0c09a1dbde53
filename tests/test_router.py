"""router.py against loops over tokens and hand-computed losses."""
import math

import pytest
import torch

from router import hierarchical_route, load_balance_loss, load_cv, topk_route, z_loss


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
