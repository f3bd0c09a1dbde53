"""moe.py's record of what it routed: the loads every MoE layer keeps (for bias balancing),
and, in clustered models only, what regrouping reads (mean inputs, a ring of recent inputs)."""
import torch

from model import GPTConfig, init_weights
from moe import MoE


def test_probe_keeps_recent_inputs_in_a_ring_during_training_only():
    cfg = GPTConfig(moe="clustered", n_embd=8, ffn_hidden=8, n_experts=8, n_clusters=2, rank=2)
    layer = MoE(cfg)
    init_weights(layer, n_layer=1)
    n = layer.probe.shape[0]
    x = torch.randn(1, n + 40, 8)
    layer.train()
    layer(x[:, :100])
    torch.testing.assert_close(layer.probe[:100], x[0, :100])
    layer(x[:, 100:])                                                # n - 60 rows: wraps around
    torch.testing.assert_close(layer.probe[100:], x[0, 100:n])
    torch.testing.assert_close(layer.probe[:40], x[0, n:])
    assert int(layer.probe_seen) == n + 40
    layer.eval()
    layer(torch.randn(1, 10, 8))
    assert int(layer.probe_seen) == n + 40


def test_a_top_k_model_keeps_no_clustering_statistics_and_its_loads_still():
    """Mean inputs and the probe are what regrouping reads: a top-k layer, which never
    regroups, does not compute them; its loads (for balancing) it records as before."""
    cfg = GPTConfig(moe="topk", n_embd=8, ffn_hidden=8, n_experts=8, balance="bias")
    layer = MoE(cfg)
    init_weights(layer, n_layer=1)
    layer.train()
    layer(torch.randn(2, 50, 8))
    assert not layer.input_mean.any() and not layer.probe.any() and int(layer.probe_seen) == 0
    assert layer.step_counts.sum() == 2 * 50 * cfg.top_k
