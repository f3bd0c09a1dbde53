"""offload.py: same output as without offload, LRU under a byte budget, exact counters and
next-layer predictions on scripted routing, CUDA path with copy timing."""
import pytest
import torch

from regroup import recluster_model
from generate import generate
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


def _scripted(actual=(1, 2, 3), guessed=(None, 2, 0)):
    """A clustered model whose routing is known: every MoE input is the constant e_l (ln2
    weight 0, bias e_l), layer l's cluster router scores cluster actual[l] with e_l, and
    layer l+1's router scores guessed[l+1] with e_l, so the predictor guesses it."""
    _, model = _pair(quantized=True)
    with torch.no_grad():
        for l, (block, layer) in enumerate(zip(model.blocks, model.moe_layers())):
            block.ln2.weight.zero_()
            block.ln2.bias.zero_()[l] = 1.0
            layer.cluster_router.zero_()[actual[l], l] = 1.0
            if guessed[l] is not None:
                layer.cluster_router[guessed[l], l - 1] = 1.0
    return model


@pytest.mark.parametrize("entries, hits, misses, prefetches, evictions", [
    (12, 7, 2, 2, 0),    # all fit: the first step misses layers 0 and 2; the guess for 1 is right
    (2, 3, 6, 6, 10),    # per step: miss 0, right guess for 1 (a hit), wrong guess for 2 (a miss)
    (1, 0, 9, 0, 8),     # no room for a guess next to the cluster in use: every lookup misses
])
def test_ffn_input_guesses_and_counters_are_exact_on_scripted_routing(entries, hits, misses, prefetches,
                                                              evictions):
    model = _scripted()
    cache = ClusterOffloader(model, 0, "cpu", predict_at="ffn")
    entry = cache.entry_bytes((0, 0))
    cache.budget = entries * entry
    prompt = torch.tensor([[3, 5]])
    generate(model, prompt, 3, temperature=0)   # forwards of 2, 1 and 1 tokens
    stats = cache.stats
    assert (stats["hits"], stats["misses"]) == (hits, misses)
    assert (stats["prefetches"], stats["evictions"]) == (prefetches, evictions)
    assert stats["bytes_moved"] == (misses + prefetches) * entry
    # Layer 1's guess (cluster 2) is always right, layer 2's (cluster 0, actual 3) never.
    assert stats["layer_predictions"] == [0, 4, 4] and stats["layer_correct"] == [0, 4, 0]
    assert (stats["predictions"], stats["correct"]) == (8, 4)
    assert cache.prediction_accuracy() == (0.5, [None, 1.0, 0.0])
    assert cache.timing() == {"copy_ms": None, "stall_ms": None, "hidden_fraction": None}


@pytest.mark.parametrize("entries, prefetches, evictions", [(12, 3, 0), (1, 9, 8)])
def test_block_input_guesses_are_scored_and_counted_exactly(entries, prefetches, evictions):
    """predict_at="block": each block guesses its own clusters from its LayerNorm'd input
    before attention. In the scripted model that input is its router's input, so every guess
    is right, every lookup hits, and only the guesses move bytes; with room for one entry,
    each guess evicts the layer before's."""
    model = _scripted()
    cache = ClusterOffloader(model, 0, "cpu", predict_at="block")
    entry = cache.entry_bytes((0, 0))
    cache.budget = entries * entry
    generate(model, torch.tensor([[3, 5]]), 3, temperature=0)
    stats = cache.stats
    assert (stats["hits"], stats["misses"], stats["stalls"]) == (9, 0, 0)
    assert (stats["prefetches"], stats["evictions"]) == (prefetches, evictions)
    assert stats["bytes_moved"] == prefetches * entry
    assert stats["layer_predictions"] == [4, 4, 4] and stats["layer_correct"] == [4, 4, 4]
    with pytest.raises(ValueError, match="predict_at"):
        ClusterOffloader(_scripted(), 0, "cpu", predict_at="later")


def test_no_prediction_without_prefetch_and_reset_stats():
    model = _scripted()
    cache = ClusterOffloader(model, 10**9, "cpu", prefetch=False)
    with torch.no_grad():
        model(torch.tensor([[3, 5]]))
    assert cache.stats["predictions"] == 0 and cache.stats["prefetches"] == 0
    resident = cache.stats["resident_bytes"]
    cache.reset_stats()
    assert cache.stats["misses"] == 0 and cache.stats["resident_bytes"] == resident > 0
    cache.evict_all()
    assert not cache.resident and cache.stats["resident_bytes"] == 0


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
    timing = cache.timing()
    assert timing["copy_ms"] > 0 and 0 <= timing["hidden_fraction"] <= 1
    assert timing["stall_ms"] >= 0
