"""The paper's ablations as real variants: each trains on CPU and has the structure it claims."""
import json

import pytest
import torch

import train
from experts import ClusteredBank, ExpertBank
from train import TrainConfig, load_model

TINY = dict(sample_tokens=0, n_layer=2, n_head=2, n_embd=32, ffn_hidden=32, n_experts=8, n_clusters=2, rank=2,
            block_size=32, batch_size=4, eval_iters=1, device="cpu", warmup_iters=2, moe="clustered",
            max_iters=8, eval_interval=4, burn_in=2, recluster_interval=2)


def _train(tmp_path, **overrides):
    cfg = TrainConfig(**{**TINY, **overrides}, out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"))
    train.train(cfg)
    model, _ = load_model(tmp_path / "out" / "ckpt.pt")
    events = [json.loads(l) for l in (tmp_path / "out" / "reclusters.jsonl").read_text().splitlines()]
    return model, events


def test_dynamic_reclusters_every_interval_and_logs_the_shock(tmp_path):
    model, events = _train(tmp_path)
    assert [e["iter"] for e in events] == [2, 4, 6]
    assert events[0]["shock"] is None                      # the first clustering has no "before"
    for e in events[1:]:
        assert e["shock"] == pytest.approx(e["val_loss_after"] - e["val_loss_before"])
        assert len(e["gain"]) == 2 and e["seconds"] > 0


@pytest.mark.parametrize("mode", ["static", "random"])
def test_static_and_random_cluster_once(tmp_path, mode):
    model, events = _train(tmp_path, cluster_mode=mode)
    assert [e["iter"] for e in events] == [2]
    assert all(int(layer.n_reclusters) == 1 for layer in model.moe_layers())


def test_random_groups_are_not_the_kmeans_groups(tmp_path):
    _, kmeans = _train(tmp_path / "a", cluster_mode="static")
    _, random = _train(tmp_path / "b", cluster_mode="random")
    assert kmeans[0]["membership"] != random[0]["membership"]
    for row in random[0]["membership"]:                    # still equal-sized clusters
        assert sorted(row.count(c) for c in range(2)) == [4, 4]


def test_no_compression_keeps_full_experts_behind_a_cluster_router(tmp_path):
    model, _ = _train(tmp_path, compress=False)
    for layer in model.moe_layers():
        assert isinstance(layer.bank, ExpertBank) and layer.has_clusters
        routing = layer.route(torch.randn(64, 32))
        assert torch.equal(routing.expert_idx // 4, routing.cluster_idx.unsqueeze(-1).expand(-1, 2))


def test_no_hierarchical_routing_lets_every_expert_compete(tmp_path):
    model, _ = _train(tmp_path, hierarchical=False)
    layer = model.moe_layers()[0]
    assert isinstance(layer.bank, ClusteredBank)
    routing = layer.route(torch.randn(512, 32))
    assert routing.cluster_idx is None
    # a token's two experts may sit in two clusters: the flat top-k over all E
    assert bool(((routing.expert_idx[:, 0] // 4) != (routing.expert_idx[:, 1] // 4)).any())
    # and the layer computes the mixture of the materialized experts it picked
    x = torch.randn(1, 5, 32)
    w1, w2 = layer.bank.weights()
    routing = layer.route(x.view(5, 32))
    ref = torch.zeros(5, 32)
    for t in range(5):
        for e, g in zip(routing.expert_idx[t].tolist(), routing.gates[t]):
            ref[t] += g * (torch.nn.functional.gelu(x[0, t] @ w1[e], approximate="tanh") @ w2[e])
    torch.testing.assert_close(layer(x)[0].view(5, 32), ref, rtol=1e-4, atol=1e-5)


def test_cluster_scores_from_experts_pick_the_cluster_with_most_flat_probability(tmp_path):
    model, _ = _train(tmp_path, cluster_scores="experts")
    layer = model.moe_layers()[0]
    x = torch.randn(256, 32)
    probs = layer.router(x).softmax(-1).view(256, 2, 4).sum(-1)         # (N, G) flat mass
    assert torch.equal(layer.route(x).cluster_idx, probs.argmax(-1))
