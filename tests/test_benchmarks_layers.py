"""benchmarks/layers.py: the minimal top-k yardstick computes what our top-k layer computes."""
import torch

from benchmarks.layers import MinimalTopK
from model import GPTConfig, init_weights
from moe import MoE


def test_minimal_topk_equals_our_topk_layer():
    torch.manual_seed(0)
    layer = MoE(GPTConfig(moe="topk", n_embd=16, ffn_hidden=24, n_experts=6, top_k=2))
    init_weights(layer, n_layer=1)
    minimal = MinimalTopK(6, 16, 24, 2, "cpu")
    with torch.no_grad():
        minimal.router.weight.copy_(layer.router.weight)
        minimal.w1.copy_(layer.bank.w1)
        minimal.w2.copy_(layer.bank.w2)
    x = torch.randn(2, 9, 16, requires_grad=True)
    ours, mine = layer(x)[0], minimal(x)[0]
    torch.testing.assert_close(mine, ours)
    grad = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, [x, layer.bank.w1], grad)
    g_mine = torch.autograd.grad(mine, [x, minimal.w1], grad)
    for a, b in zip(g_ours, g_mine):
        torch.testing.assert_close(a, b)
