"""offload.py: same output as without offload, LRU under a byte budget, counters, CUDA path."""
import pytest
import torch

from cluster import recluster_model
from model import GPT, GPTConfig
from offload import ClusterOffloader
from quant import quantize_model

CFG = dict(n_layer=3, n_head=2, n_embd=16, block_size=16, ffn_hidden=32, n_experts=8, top_k=2,
           n_clusters=4, rank=2, vocab_size=64, moe="clustered")


def _pair(quantized: bool, device="cpu"):
    """Two identical clustered models (optionally INT4) in eval mode."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**CFG))
        for layer in model.moe_layers():
            layer.input_mean.normal_()
        recluster_model(model)
        if quantized:
            quantize_model(model)
        models.append(model.to(device).eval())
    return models


@pytest.mark.parametrize("quantized", [False, True])
def test_offloaded_forward_equals_resident(quantized):
    plain, offloaded = _pair(quantized)
    entry = ClusterOffloader(_pair(quantized)[1], 0, "cpu").entry_bytes((0, 0))
    cache = ClusterOffloader(offloaded, budget_bytes=2 * entry, device="cpu")
    assert all(p.device.type == "meta" for l in offloaded.moe_layers() for p in l.bank.parameters())
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(idx, idx)[1], plain(idx, idx)[1])
        torch.testing.assert_close(offloaded(idx)[0], plain(idx)[0])
    stats = cache.stats
    assert stats["misses"] > 0 and stats["evictions"] > 0
    assert stats["peak_resident_bytes"] <= 2 * entry    # the budget: streaming, never stacking
    assert stats["bytes_moved"] == (stats["misses"] + stats["prefetches"]) * entry


def test_budget_large_enough_gives_hits_and_no_moves_second_time():
    _, model = _pair(quantized=True)
    cache = ClusterOffloader(model, budget_bytes=10**9, device="cpu", prefetch=False)
    idx = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(idx)
        moved, misses = cache.stats["bytes_moved"], cache.stats["misses"]
        model(idx)
    assert cache.stats["bytes_moved"] == moved and cache.stats["misses"] == misses
    assert cache.stats["hits"] >= misses and cache.stats["evictions"] == 0


def test_lru_evicts_least_recently_used_within_budget():
    _, model = _pair(quantized=False)
    cache = ClusterOffloader(model, budget_bytes=0, device="cpu", prefetch=False)
    entry = cache.entry_bytes((0, 0))
    cache.budget = 2 * entry
    for cluster in (0, 1, 0, 2):       # 1 is least recently used when 2 arrives
        cache.weights_for(0, cluster, torch.float32, {(0, cluster)})
    assert list(cache.resident) == [(0, 0), (0, 2)]
    assert cache.stats["resident_bytes"] == 2 * entry <= cache.budget
    assert cache.stats["hits"] == 1 and cache.stats["misses"] == 3


def test_int4_entry_bytes_match_the_storage_formula():
    _, plain = _pair(quantized=False)
    _, quantized = _pair(quantized=True)
    d, h, m, r = 16, 32, 2, 2
    float_bytes = ClusterOffloader(plain, 0, "cpu").entry_bytes((0, 0))
    assert float_bytes == 4 * (2 * d * h + 2 * m * r * (d + h))
    # INT4 factor stored (out, in): groups of 64 along `in` (zero-padded): out*pad/2 bytes of
    # nibbles + out*pad/64 fp16 scales. Bases: FP16.
    pad = lambda n: -(-n // 64) * 64
    int4 = lambda out, inp: out * pad(inp) // 2 + 2 * out * pad(inp) // 64
    expected = 2 * 2 * d * h + int4(m * r, d) + int4(h, m * r) + int4(m * r, h) + int4(d, m * r)
    assert ClusterOffloader(quantized, 0, "cpu").entry_bytes((0, 0)) == expected


def test_needs_clustered_layers():
    with pytest.raises(ValueError, match="clustered"):
        ClusterOffloader(GPT(GPTConfig(**{**CFG, "moe": "topk"})), 1, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_matches_resident_and_frees_gpu_memory():
    plain, offloaded = _pair(quantized=True, device="cuda")
    before = torch.cuda.memory_allocated()
    cache = ClusterOffloader(offloaded, budget_bytes=1, device="cuda")
    assert torch.cuda.memory_allocated() < before
    idx = torch.randint(0, 64, (4, 16), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        a, b = offloaded(idx, idx)[1], plain(idx, idx)[1]
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    assert cache.stats["bytes_moved"] > 0
