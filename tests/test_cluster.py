"""cluster.py: planted clusters are recovered, balanced and stable; the similarity views
weigh as documented. (Applying a grouping to a layer: tests/test_regroup.py.)"""
import pytest
import torch

from cluster import balanced_kmeans, cosine_matrix, expert_similarity, flat_weights, specific_weights


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


@pytest.mark.parametrize("similarity", ["weights+routed", "specific+centroids", "outputs+scores"])
def test_expert_similarity_weights_the_two_views(similarity):
    torch.manual_seed(2)
    w1, w2 = torch.randn(4, 3, 5), torch.randn(4, 5, 3)
    means, router, probe = torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3)
    groups = torch.tensor([0, 0, 1, 1])
    sim = lambda alpha: expert_similarity(w1, w2, means, router, probe, groups, alpha, similarity)
    torch.testing.assert_close(sim(0.25), 0.25 * sim(1.0) + 0.75 * sim(0.0))
    torch.testing.assert_close(sim(1.0).diagonal(), torch.ones(4))
    with pytest.raises(ValueError, match="PARAM\\+ACT"):
        expert_similarity(w1, w2, means, router, similarity="weights")


def test_specific_view_is_blind_to_how_far_apart_the_bases_are():
    # Moving every cluster's base further from the others (experts' own parts unchanged)
    # raises the plain weight cosine within clusters towards 1; the specific view stays put.
    torch.manual_seed(3)
    groups = torch.arange(8) // 4
    bases, own = torch.randn(2, 5, 6), torch.randn(8, 5, 6)
    own = own - own.view(2, 4, 5, 6).mean(1).repeat_interleave(4, 0)   # sums to 0 per cluster
    w2 = torch.zeros(8, 6, 5)
    views = {}
    for spread in (1.0, 10.0):
        w1 = spread * bases[groups] + own
        views[spread] = [cosine_matrix(flat_weights(w1, w2)),
                         cosine_matrix(specific_weights(w1, w2, groups))]
    assert views[10.0][0][0, 1] > views[1.0][0][0, 1] + 0.1
    torch.testing.assert_close(views[10.0][1], views[1.0][1])


def test_all_groupings_are_every_balanced_split_once():
    import itertools
    from cluster import all_groupings, canonical, n_groupings
    for n_experts, n_clusters in ((8, 2), (6, 3), (8, 4)):
        found = [canonical(g) for g in all_groupings(n_experts, n_clusters)]
        m = n_experts // n_clusters
        brute = set()     # every ordering of the experts cut into runs of m, labels forgotten
        for perm in itertools.permutations(range(n_experts)):
            labels = [0] * n_experts
            for slot, expert in enumerate(perm):
                labels[expert] = slot // m
            brute.add(canonical(torch.tensor(labels)))
        assert len(found) == len(set(found)) == len(brute) == n_groupings(n_experts, n_clusters)
        assert set(found) == brute


def test_rank_and_margin_of_a_grouping_among_all_of_them():
    from cluster import all_groupings, rank_among, within_similarity
    torch.manual_seed(3)
    feats = torch.randn(8, 5)
    sim = cosine_matrix(feats)
    scores = sorted((within_similarity(sim, g) for g in all_groupings(8, 2)), reverse=True)
    for grouping in list(all_groupings(8, 2))[:6]:
        rank, of, margin = rank_among(sim, grouping, [], 2)
        score = within_similarity(sim, grouping)
        assert of == 35 and rank == 1 + sum(s > score + 1e-9 for s in scores)
        best_other = max(s for s in scores if abs(s - score) > 1e-12) if rank == 1 else scores[0]
        assert margin == pytest.approx(score - best_other)
