"""ep.py and ep_state.py: an expert-parallel layer on W CPU processes (gloo) against the
single-process moe.MoE layer on the concatenated tokens: outputs, gradients, bytes sent,
gathered state, and a recluster under expert parallelism (state, optimizer moments)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest

from cluster import ClusterSettings
from regroup import recluster
from parallel.ep import ExpertParallelMoE, gather_state
from model import GPTConfig, init_weights
from moe import MoE

D, H, E, G, K = 16, 24, 8, 4, 2
B, T = 2, 16                                   # 32 tokens per rank


def _layer(kind):
    torch.manual_seed(0)
    extra = {"n_clusters": G, "rank": 4} if kind == "clustered" else {}
    cfg = GPTConfig(moe=kind, n_embd=D, ffn_hidden=H, n_experts=E, top_k=K, moe_impl="loop",
                    **extra)
    layer = MoE(cfg)
    init_weights(layer, n_layer=1)
    layer.bank.w2.data.normal_(0, 0.3)         # outputs large enough to compare
    if kind == "clustered":
        layer.input_mean.normal_()
        recluster(layer)
    return layer


def _tokens(world):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(world * B, T, D, generator=gen), torch.randn(world * B, T, D, generator=gen)


def _expected_rows(ep, x_all, world):
    """From the routing alone: rows each rank sends to other ranks (dispatch) and receives
    from them (combine = the rows it sends back). A token visits each DISTINCT owner once."""
    sent, received = [0] * world, [0] * world
    for src in range(world):
        x = x_all[src * B:(src + 1) * B].reshape(-1, D)
        routing = ep.route(x)
        if routing.cluster_idx is not None:   # clustered: exactly one rank, the cluster's owner
            owners = (routing.cluster_idx // (G // world)).unsqueeze(1)
        else:
            owners = routing.expert_idx // (E // world)
        for token_owners in owners.tolist():
            for dst in set(token_owners) - {src}:
                sent[src] += 1
                received[dst] += 1
    return sent, received


def _check(kind, rank, world):
    layer = _layer(kind)
    ep = ExpertParallelMoE(layer)              # default group
    x_all, w_all = _tokens(world)
    mine = slice(rank * B, (rank + 1) * B)

    # The gathered shards are the single-process layer's parameters, exactly.
    gathered = gather_state(ep)
    full = {n: p for n, p in layer.state_dict().items() if n in gathered}
    assert set(gathered) == set(full) and len(gathered) >= 3
    for name, value in full.items():
        assert torch.equal(gathered[name], value), name

    x_ref = x_all.clone().requires_grad_()
    y_ref, _ = layer(x_ref)
    (y_ref * w_all).sum().backward()

    x = x_all[mine].clone().requires_grad_()
    y, _ = ep(x)
    (y * w_all[mine]).sum().backward()

    torch.testing.assert_close(y, y_ref[mine].detach())
    torch.testing.assert_close(x.grad, x_ref.grad[mine])
    for name, shard in ep.bank.named_parameters():
        n = shard.shape[0]
        full_grad = getattr(layer.bank, name).grad[rank * n:(rank + 1) * n]
        torch.testing.assert_close(shard.grad, full_grad, msg=lambda m: f"{kind} bank.{name}: {m}")
    replicated = [(ep.router.weight, layer.router.weight)]
    if kind == "clustered":
        replicated.append((ep.cluster_router, layer.cluster_router))
    for mine_p, full_p in replicated:               # each rank saw its own tokens: sum them
        grad = mine_p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, full_p.grad)

    sent, received = _expected_rows(ep, x_all, world)
    assert sum(sent) > 0
    assert ep.bytes_sent == {"dispatch": sent[rank] * D * 4, "combine": received[rank] * D * 4}, \
        (kind, ep.bytes_sent, sent, received)


def _worker(rank, world, init_file, kinds):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for kind in kinds:
            _check(kind, rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,kinds", [(2, ("topk", "clustered")), (4, ("topk", "clustered"))])
def test_expert_parallel_matches_one_process(tmp_path, world, kinds):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), kinds), nprocs=world)


@pytest.mark.parametrize("kind", ["topk", "clustered"])
def test_world_one_is_the_local_layer(kind):
    layer = _layer(kind)
    ep = ExpertParallelMoE(layer)
    x = torch.randn(B, T, D)
    torch.testing.assert_close(ep(x)[0], layer(x)[0], rtol=0, atol=0)
    assert gather_state(ep)["bank.base1" if kind == "clustered" else "bank.w1"].shape[0] == \
        (G if kind == "clustered" else E)


def test_refuses_what_it_cannot_split():
    layer = _layer("topk")
    layer.cfg.capacity_factor = 1.0           # a capacity limit needs every rank's queues
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertParallelMoE(layer)


def _moments(name: str, shape) -> dict:
    """Made-up AdamW state for a full parameter, distinct per row so moves are visible."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return {"step": torch.tensor(7.0), "exp_avg": torch.randn(shape, generator=gen),
            "exp_avg_sq": torch.rand(shape, generator=gen)}


def _recluster_check(rank, world):
    """Two reclusters (the first clustering, then one that moves experts) of an expert-parallel
    layer and of one full layer: same state, same optimizer moments, same outputs."""
    from types import SimpleNamespace
    from regroup import carry_optimizer_state
    from parallel.ep_state import _gather_rows, recluster_layer
    torch.manual_seed(0)
    cfg = GPTConfig(moe="clustered", n_embd=D, ffn_hidden=H, n_experts=E, top_k=K, n_clusters=G,
                    rank=4, moe_impl="loop")
    ref = MoE(cfg)
    init_weights(ref, n_layer=1)
    ref.input_mean.normal_()
    ref.probe.normal_()
    ref.probe_seen.fill_(ref.probe.shape[0])
    layer = ExpertParallelMoE(ref)               # a copy: the full layer stays the reference
    ref_opt, ep_opt = SimpleNamespace(state={}), SimpleNamespace(state={})
    for name, p in ref.named_parameters():
        ref_opt.state[p] = _moments(name, p.shape)
    for name, p in layer.named_parameters():
        full = _moments(name, ref.get_parameter(name).shape)
        ep_opt.state[p] = {k: v.chunk(world)[rank] if name.startswith("bank.") and v.dim() else v
                           for k, v in full.items()}

    for round_, settings in enumerate([ClusterSettings(), ClusterSettings(alpha=0.0, min_gain=-1.0)]):
        if round_ == 1:  # swap two experts' router rows across clusters (on both): they must move
            for lay in (ref, layer):
                rows = lay.router.weight.data
                rows[[0, E // G]] = rows[[E // G, 0]]
        result = recluster(ref, settings, seed=3)
        carry_optimizer_state(ref_opt, result)
        got, created = recluster_layer(layer, ep_opt, settings, seed=3)
        assert got.moved == result.moved
        assert created == (round_ == 0)
        if round_ == 1:
            assert result.moved > 0
        gathered = gather_state(layer)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(gathered[name], value, msg=lambda m: f"{round_} {name}: {m}")
        for name, p in layer.named_parameters():
            ref_p = ref.get_parameter(name)
            if ref_p not in ref_opt.state:
                assert p not in ep_opt.state, name
                continue
            state = _gather_rows(ep_opt.state[p], layer.group) if name.startswith("bank.") else ep_opt.state[p]
            for key, value in ref_opt.state[ref_p].items():
                torch.testing.assert_close(state[key], value, msg=lambda m: f"{round_} {name} {key}: {m}")
    x_all, _ = _tokens(world)
    with torch.no_grad():
        torch.testing.assert_close(layer(x_all[rank * B:(rank + 1) * B])[0],
                                   ref(x_all)[0][rank * B:(rank + 1) * B])


def _recluster_worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _recluster_check(rank, world)
    finally:
        dist.destroy_process_group()


def test_recluster_under_expert_parallelism_matches_one_process(tmp_path):
    mp.spawn(_recluster_worker, args=(2, str(tmp_path / "store")), nprocs=2)
