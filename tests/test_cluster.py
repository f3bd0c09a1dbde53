"""cluster.py: planted clusters, stability, and a recluster that preserves the function."""
import pytest
import torch

from cluster import balanced_kmeans, fused_similarity, recluster
from compress import factorize
from model import MoE, GPTConfig


def _same_partition(a, b):
    groups = lambda x: sorted(sorted(torch.nonzero(x == c).flatten().tolist()) for c in x.unique())
    return groups(a) == groups(b)


def test_recovers_planted_clusters_and_is_balanced():
    torch.manual_seed(0)
    truth = torch.randperm(16) % 4                                   # 4 planted groups of 4
    centres = torch.randn(4, 32) * 3
    features = centres[truth] + 0.3 * torch.randn(16, 32)
    unit = torch.nn.functional.normalize(features, dim=-1)
    found = balanced_kmeans(unit @ unit.t(), 4, seed=3)
    assert _same_partition(found, truth)
    assert torch.bincount(found).tolist() == [4, 4, 4, 4]


def test_stable_when_nothing_changed():
    torch.manual_seed(1)
    features = torch.randn(12, 10)
    unit = torch.nn.functional.normalize(features, dim=-1)
    sim = unit @ unit.t()
    first = balanced_kmeans(sim, 3, seed=0)
    assert torch.equal(balanced_kmeans(sim, 3, init=first), first)
    assert torch.equal(balanced_kmeans(sim, 3, seed=0), first)       # seeded: reproducible


def test_fused_similarity_weights_the_two_views():
    torch.manual_seed(2)
    w1, w2 = torch.randn(4, 3, 5), torch.randn(4, 5, 3)
    means, router = torch.randn(4, 3), torch.randn(4, 3)
    s_param = fused_similarity(w1, w2, means, router, alpha=1.0)
    s_act = fused_similarity(w1, w2, means, router, alpha=0.0)
    torch.testing.assert_close(fused_similarity(w1, w2, means, router, 0.25),
                               0.25 * s_param + 0.75 * s_act)
    torch.testing.assert_close(s_param.diagonal(), torch.ones(4))


def _layer(rank):
    cfg = GPTConfig(moe="clustered", n_embd=8, ffn_hidden=8, n_experts=8, n_clusters=2,
                    rank=rank, top_k=2)
    torch.manual_seed(0)
    layer = MoE(cfg, out_std=0.3)
    layer.input_mean.normal_()
    return layer


def test_recluster_full_rank_unchanged_assignment_preserves_output():
    layer = _layer(rank=8).eval()
    recluster(layer)                                                 # top-k -> clustered
    x = torch.randn(2, 5, 8)
    before = layer(x)[0]
    ids = layer.expert_ids.clone()
    result = recluster(layer)                                        # same groups again
    assert result["moved"] == 0 and torch.equal(layer.expert_ids, ids)
    torch.testing.assert_close(layer(x)[0], before, rtol=1e-4, atol=1e-5)


def test_unchanged_groups_refactorize_like_an_svd_of_the_materialized_experts():
    layer = _layer(rank=2)
    recluster(layer)
    with torch.no_grad():  # as training does: residuals drift to rank up to m*r, off-centre
        for p in layer.bank.parameters():
            p.add_(0.1 * torch.randn_like(p))
    w1, w2 = layer.bank.weights()
    ids = layer.expert_ids.clone()
    result = recluster(layer)
    assert result["moved"] == 0 and torch.equal(layer.expert_ids, ids)
    assert {id(p) for p in result["reset"]} == {id(p) for p in layer.bank.parameters()}
    # brute force: centre and truncate the materialized experts with a full SVD
    u1, v1, u2, v2 = layer.bank.factors()
    for w, base, u, v in ((w1, layer.bank.base1, u1, v1), (w2, layer.bank.base2, u2, v2)):
        _, ref_base, ref_u, ref_v = factorize(w, torch.arange(8) // 4, 2, rank=2)
        torch.testing.assert_close(base, ref_base, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u @ v, ref_u @ ref_v, rtol=1e-4, atol=1e-5)


def test_first_recluster_keeps_experts_and_permutes_router_with_them():
    layer = _layer(rank=8)
    w1_before = layer.bank.w1.detach().clone()
    router_before = layer.router.weight.detach().clone()
    recluster(layer)
    assert layer.clustered and int(layer.n_reclusters) == 1
    w1_after, _ = layer.bank.weights()
    ids = layer.expert_ids
    torch.testing.assert_close(w1_after, w1_before[ids], rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.router.weight, router_before[ids])
    # cluster router rows are the mean of their members' router rows
    torch.testing.assert_close(layer.cluster_router, layer.router.weight.view(2, 4, -1).mean(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recluster_on_cuda_matches_cpu():
    cpu_layer = _layer(rank=4)
    gpu_layer = _layer(rank=4).cuda()
    for _ in range(2):
        moved_cpu = recluster(cpu_layer)["moved"]
        assert recluster(gpu_layer)["moved"] == moved_cpu
    assert torch.equal(gpu_layer.expert_ids.cpu(), cpu_layer.expert_ids)
    torch.testing.assert_close(gpu_layer.bank.base1.cpu(), cpu_layer.bank.base1, rtol=1e-4, atol=1e-4)
