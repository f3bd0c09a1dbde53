"""regroup.py: a recluster that preserves the function, a planted change of truth that moves
exactly the changed experts, and the state (router rows, biases, optimizer moments, whole
experts) that follows them; the lock compression puts on the grouping; how a proposal's gain
is counted. Regrouping inside a training run: tests/test_regroup_in_training.py."""
import pytest
import torch

from cluster import ClusterSettings, propose
from compress import align_gauge, factorize
from model import GPTConfig, init_weights
from moe import MoE
from regroup import carry_optimizer_state, carry_rows, recluster


def _same_partition(a, b):
    groups = lambda x: sorted(sorted(torch.nonzero(x == c).flatten().tolist()) for c in x.unique())
    return groups(a) == groups(b)


def _layer(rank):
    cfg = GPTConfig(moe="clustered", n_embd=8, ffn_hidden=8, n_experts=8, n_clusters=2,
                    rank=rank, top_k=2)
    torch.manual_seed(0)
    layer = MoE(cfg)
    init_weights(layer, n_layer=1)
    layer.bank.w2.data.normal_(0, 0.3)  # outputs large enough to compare
    layer.input_mean.normal_()
    return layer


def test_recluster_full_rank_unchanged_assignment_preserves_output():
    layer = _layer(rank=8).eval()
    recluster(layer)                                                 # top-k -> clustered
    x = torch.randn(2, 5, 8)
    before = layer(x)[0]
    ids = layer.expert_ids.clone()
    result = recluster(layer)                                        # same groups again
    assert result.moved == 0 and result.skipped and torch.equal(layer.expert_ids, ids)
    torch.testing.assert_close(layer(x)[0], before, rtol=1e-4, atol=1e-5)


def test_unchanged_groups_refactorize_like_an_svd_of_the_materialized_experts():
    layer = _layer(rank=2)
    recluster(layer)
    with torch.no_grad():  # as training does: residuals drift to rank up to m*r, off-centre
        for p in layer.bank.parameters():
            p.add_(0.01 * torch.randn_like(p))
    w1, w2 = layer.bank.weights()
    old = [f.detach().clone() for f in layer.bank.factors()]
    ids = layer.expert_ids.clone()
    result = recluster(layer)
    assert result.moved == 0 and torch.equal(layer.expert_ids, ids)
    assert result.reset == [] and result.carry == {}          # every state survives
    # brute force: centre and truncate the materialized experts with a full SVD; the factors
    # come in the basis nearest the old ones, not the SVD's own (order, signs), so the
    # optimizer state built on the old factors still fits
    u1, v1, u2, v2 = layer.bank.factors()
    for i, (w, base, u, v) in enumerate(((w1, layer.bank.base1, u1, v1), (w2, layer.bank.base2, u2, v2))):
        _, ref_base, ref_u, ref_v = factorize(w, torch.arange(8) // 4, 2, rank=2)
        torch.testing.assert_close(base, ref_base, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u @ v, ref_u @ ref_v, rtol=1e-4, atol=1e-5)
        old_u, old_v = old[2 * i], old[2 * i + 1]
        change = lambda a, b: torch.cat([(a - old_u).flatten(), (b - old_v).flatten()]).norm()
        size = torch.cat([old_u.flatten(), old_v.flatten()]).norm()
        assert change(u, v) <= change(ref_u, ref_v) + 1e-5 and change(u, v) < 0.25 * size


def test_align_gauge_keeps_the_product_and_recovers_a_rotation():
    torch.manual_seed(4)
    u, v = torch.randn(3, 6, 2), torch.randn(3, 2, 5)
    rotation = torch.linalg.qr(torch.randn(3, 2, 2)).Q
    u_al, v_al = align_gauge(u, v, u @ rotation, rotation.transpose(1, 2) @ v)
    torch.testing.assert_close(u_al @ v_al, u @ v)
    torch.testing.assert_close(u_al, u @ rotation)


def test_first_recluster_keeps_experts_and_permutes_router_with_them():
    layer = _layer(rank=8)
    w1_before = layer.bank.w1.detach().clone()
    router_before = layer.router.weight.detach().clone()
    result = recluster(layer)
    assert layer.compressed and int(layer.n_reclusters) == 1
    w1_after, _ = layer.bank.weights()
    ids = layer.expert_ids
    torch.testing.assert_close(w1_after, w1_before[ids], rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.router.weight, router_before[ids])
    # cluster router rows are the mean of their members' router rows
    torch.testing.assert_close(layer.cluster_router, layer.router.weight.view(2, 4, -1).mean(1))
    assert {id(p) for p in result.reset} == {id(p) for p in layer.bank.parameters()} | \
        {id(layer.cluster_router)}


# A planted structure: G families of 4 experts. Experts of a family have weights near the
# family's W1, W2 and router rows pointing at the family's tokens, N(mu_f, I). Families are
# interleaved over the slots, so the first clustering has to find them.
D, H, RANK = 16, 32, 2


def _planted(n_families, seed=0, compress=True):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *shape: torch.randn(*shape, generator=gen)
    n_experts = 4 * n_families
    cfg = GPTConfig(moe="clustered", n_embd=D, ffn_hidden=H, n_experts=n_experts,
                    n_clusters=n_families, rank=RANK, top_k=2, compress=compress)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    family = torch.arange(n_experts) % n_families
    mu = rn(n_families, D)
    mu = 2 * mu / mu.norm(dim=1, keepdim=True)
    fam_w1, fam_w2 = rn(n_families, D, H) / D ** 0.5, rn(n_families, H, D) / H ** 0.5
    with torch.no_grad():
        layer.bank.w1.copy_(fam_w1[family] + 0.3 * rn(n_experts, D, H) / D ** 0.5)
        layer.bank.w2.copy_(fam_w2[family] + 0.3 * rn(n_experts, H, D) / H ** 0.5)
        layer.router.weight.copy_(0.75 * mu[family] + rn(n_experts, D) / D ** 0.5)

    def run(steps=40):  # training forwards: input means (EMA) and the probe fill up
        layer.train()
        for _ in range(steps):
            layer((mu[torch.randint(n_families, (192,), generator=gen)] + rn(192, D)).view(1, -1, D))

    def swap(slot_a, slot_b):
        """Experts in slot_a and slot_b change family: each one's own part (its residual, as far
        as rank r allows) now points at the other's family, and they trade router rows."""
        fam = family[layer.expert_ids]
        bank = layer.bank
        with torch.no_grad():
            rows = layer.router.weight
            rows[[slot_a, slot_b]] = rows[[slot_b, slot_a]].clone()
            if not compress:  # full experts: the whole expert is re-planted
                for slot, target in ((slot_a, int(fam[slot_b])), (slot_b, int(fam[slot_a]))):
                    bank.w1[slot], bank.w2[slot] = fam_w1[target], fam_w2[target]
                return
        factors = [f.detach().clone() for f in bank.factors()]
        for slot, target in ((slot_a, int(fam[slot_b])), (slot_b, int(fam[slot_a]))):
            for base, u, v, w in ((bank.base1, factors[0], factors[1], fam_w1[target]),
                                  (bank.base2, factors[2], factors[3], fam_w2[target])):
                us, s, vh = torch.linalg.svd(w - base[slot // 4].detach(), full_matrices=False)
                u[slot], v[slot] = us[:, :RANK] * s[:RANK].sqrt(), s[:RANK].sqrt()[:, None] * vh[:RANK]
        bank.load_factors(bank.base1.detach().clone(), factors[0], factors[1],
                          bank.base2.detach().clone(), factors[2], factors[3])

    run()
    recluster(layer)
    assert all(family[layer.expert_ids].view(n_families, 4)[g].unique().numel() == 1
               for g in range(n_families)), "the first clustering finds the families"
    run()
    return layer, run, swap


def _moved_ids(layer, ids_before):
    m = 4
    cluster_of = lambda ids: {int(e): slot // m for slot, e in enumerate(ids)}
    before, after = cluster_of(ids_before), cluster_of(layer.expert_ids)
    return {e for e in before if before[e] != after[e]}


@pytest.mark.parametrize("similarity, moves", [("specific+scores", True),
                                               ("weights+routed", False)])
def test_planted_change_moves_exactly_the_changed_experts(similarity, moves):
    layer, run, swap = _planted(n_families=2)
    ids = layer.expert_ids.clone()
    result = recluster(layer, ClusterSettings(similarity=similarity))                 # nothing changed
    assert result.moved == 0 and result.skipped and result.gain < 0.01
    assert torch.equal(layer.expert_ids, ids)
    swap(0, 4)
    run()
    planted = {int(ids[0]), int(ids[4])}
    result = recluster(layer, ClusterSettings(similarity=similarity))
    if moves:
        assert result.moved == 2 and not result.skipped and result.gain >= 0.01
        assert _moved_ids(layer, ids) == planted
    else:  # the old default: the shared base and routed-token means hold every expert in place
        assert result.moved == 0 and result.skipped


def test_balancing_biases_follow_their_experts():
    layer, run, swap = _planted(n_families=2)
    swap(0, 4)
    run()
    ids = layer.expert_ids.clone()
    with torch.no_grad():  # a bias that names its expert, and one per cluster
        layer.expert_bias.copy_(ids.float())
        layer.cluster_bias.copy_(torch.tensor([0.5, -0.5]))
    result = recluster(layer)
    assert result.moved == 2
    assert torch.equal(layer.expert_bias, layer.expert_ids.float())   # moved with its expert
    assert not layer.cluster_bias.any()          # both clusters changed members: biases restart
    result = recluster(layer)                    # nothing changes: every cluster keeps its bias
    with torch.no_grad():
        layer.cluster_bias.copy_(torch.tensor([0.5, -0.5]))
    assert recluster(layer).skipped
    assert torch.equal(layer.cluster_bias, torch.tensor([0.5, -0.5]))


def test_gain_threshold_decides_whether_a_regrouping_is_taken():
    layer, run, swap = _planted(n_families=2)
    swap(0, 4)
    run()
    ids = layer.expert_ids.clone()
    result = recluster(layer, ClusterSettings(min_gain=10.0))                         # gain can never reach it
    assert result.skipped and result.moved == 0 and result.gain >= 0.01
    assert torch.equal(layer.expert_ids, ids)


def test_optimizer_state_follows_the_experts():
    layer, run, swap = _planted(n_families=3)                        # clusters 0, 1 trade; 2 stays
    params = list(layer.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    layer((torch.randn(1, 64, D)))[0].square().mean().backward()
    optimizer.step()
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    kept_state = optimizer.state[layer.router.weight]

    result = recluster(layer)                                        # nothing changed: all kept
    carry_optimizer_state(optimizer, result)
    assert result.skipped and optimizer.state[layer.router.weight] is kept_state

    ids = layer.expert_ids.clone()
    swap(0, 4)
    run()
    result = recluster(layer)
    assert result.moved == 2 and result.reset == []
    assert all(p is q for p, q in zip(layer.parameters(), params))  # same parameter objects
    carry_optimizer_state(optimizer, result)
    # router rows follow their expert: new slot i holds the expert that sat in old slot `old`
    old = torch.tensor([int((ids == e).nonzero()) for e in layer.expert_ids])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[layer.router.weight][key],
                           before[layer.router.weight][key][old])
        for p in list(layer.bank.parameters()) + [layer.cluster_router]:
            state = optimizer.state[p][key]
            assert torch.equal(state[2], before[p][key][2])          # unchanged cluster: kept
            assert not state[:2].any()                               # changed clusters: fresh
    assert torch.equal(optimizer.state[layer.bank.base1]["step"], before[layer.bank.base1]["step"])
    layer((torch.randn(1, 64, D)))[0].square().mean().backward()
    optimizer.step()                                                 # shapes still fit


def test_without_compression_whole_experts_and_their_state_move():
    layer, run, swap = _planted(n_families=2, compress=False)
    assert layer.has_clusters and not layer.compressed                # full experts, grouped
    optimizer = torch.optim.AdamW(list(layer.parameters()), lr=1e-3)
    layer((torch.randn(1, 64, D)))[0].square().mean().backward()
    optimizer.step()
    swap(0, 4)
    run()
    ids, w1 = layer.expert_ids.clone(), layer.bank.w1.detach().clone()
    w1_state = optimizer.state[layer.bank.w1]["exp_avg"].clone()
    result = recluster(layer)
    assert result.moved == 2 and _moved_ids(layer, ids) == {int(ids[0]), int(ids[4])}
    carry_optimizer_state(optimizer, result)
    old = torch.tensor([int((ids == e).nonzero()) for e in layer.expert_ids])
    assert torch.equal(layer.bank.w1, w1[old])                       # experts moved whole
    assert torch.equal(optimizer.state[layer.bank.w1]["exp_avg"], w1_state[old])


def test_carry_rows_permutes_and_zeroes_moments_only():
    state = {"step": torch.tensor(7.0), "exp_avg": torch.arange(6.0).view(3, 2)}
    out = carry_rows(state, torch.tensor([2, 0, 1]), torch.tensor([True, False, True]))
    assert torch.equal(out["exp_avg"], torch.tensor([[4.0, 5.0], [0.0, 0.0], [2.0, 3.0]]))
    assert out["step"] is state["step"]
    assert carry_rows(state, None, None) is state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recluster_on_cuda_matches_cpu():
    cpu_layer = _layer(rank=4)
    gpu_layer = _layer(rank=4).cuda()
    for _ in range(2):
        moved_cpu = recluster(cpu_layer).moved
        assert recluster(gpu_layer).moved == moved_cpu
    assert torch.equal(gpu_layer.expert_ids.cpu(), cpu_layer.expert_ids)
    torch.testing.assert_close(gpu_layer.bank.base1.cpu(), cpu_layer.bank.base1, rtol=1e-4, atol=1e-4)


def test_propose_is_pure_and_recluster_applies_what_it_proposes():
    layer, run, swap = _planted(n_families=2)
    swap(0, 4)
    run()
    w1, w2 = (w.detach() for w in layer.bank.weights())
    probe = layer.probe[:min(int(layer.probe_seen), layer.probe.shape[0])]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    groups = torch.arange(8) // 4
    proposal = propose(w1, w2, layer.input_mean, layer.router.weight, probe, groups, 2)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())   # untouched
    assert not proposal.skipped and proposal.gain >= 0.01
    ids = layer.expert_ids.clone()
    result = recluster(layer)
    assert result.gain == proposal.gain and result.moved == 2
    # each expert now sits in the cluster the proposal gave its old slot
    cluster_of = {int(e): slot // 4 for slot, e in enumerate(layer.expert_ids)}
    assert _same_partition(torch.tensor([cluster_of[int(e)] for e in ids]), proposal.assignment)


def test_compression_locks_the_grouping_whatever_the_weights():
    """Random experts, compressed into a random grouping with no training: the parameter view
    sees +1/3 within a cluster and -1/2 across (E=8, G=2), so the grouping is the best of all
    35 and is kept. (Own parts sum to zero within a cluster, shared parts across clusters, and
    the shared part is scaled to the size of the own parts: docs/design.md.)"""
    from cluster import cosine_matrix, specific_weights
    from regroup import first_clustering
    for seed in range(3):
        torch.manual_seed(seed)
        layer = MoE(GPTConfig(moe="clustered", n_embd=32, ffn_hidden=64, n_experts=8, n_clusters=2,
                              rank=4, top_k=2))
        init_weights(layer, n_layer=1)
        w1, w2 = (w.detach().clone() for w in layer.bank.weights())
        first_clustering(layer, torch.randperm(8) % 2, 0.0, w1, w2)
        w1, w2 = (w.detach() for w in layer.bank.weights())
        groups = torch.arange(8) // 4
        sim = cosine_matrix(specific_weights(w1, w2, groups))
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(8, dtype=torch.bool)
        assert sim[same].mean().item() == pytest.approx(1 / 3, abs=0.01)
        assert sim[(groups[:, None] != groups[None, :])].mean().item() == pytest.approx(-1 / 2, abs=0.01)
        for alpha in (1.0, 0.7):      # the parameter view weighs in: nothing can beat the groups
            proposal = propose(w1, w2, layer.input_mean, layer.router.weight, layer.probe[:0], groups, 2,
                               ClusterSettings(alpha=alpha, similarity="specific+centroids"))
            assert proposal.skipped and proposal.gain == 0 and (proposal.rank, proposal.of) == (1, 35)
            assert proposal.margin > 0.1


def test_a_proposal_never_loses_to_the_current_grouping():
    """The current grouping is a candidate, so a later proposal's gain is never negative."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        w1, w2 = torch.randn(8, 6, 5, generator=gen), torch.randn(8, 5, 6, generator=gen)
        means, router = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
        groups = torch.randperm(8, generator=gen) % 2
        proposal = propose(w1, w2, means, router, torch.randn(16, 6, generator=gen), groups, 2,
                           ClusterSettings(restarts=2), seed)
        assert proposal.gain >= 0


def test_the_first_clustering_gain_is_over_a_random_grouping():
    from cluster import expert_similarity, within_similarity
    layer = _layer(rank=2)
    w1, w2 = (w.detach() for w in layer.bank.weights())
    proposal = propose(w1, w2, layer.input_mean, layer.router.weight, layer.probe[:0], None, 2)
    with torch.no_grad():
        sim = expert_similarity(w1, w2, layer.input_mean, layer.router.weight, layer.probe[:0])
    chance = sim[~torch.eye(8, dtype=torch.bool)].mean().item()      # any pair, equally likely
    assert proposal.gain == pytest.approx(within_similarity(sim, proposal.assignment) - chance)
