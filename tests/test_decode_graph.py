"""Decoding: the KV cache against the uncached reference, offloaded against resident
decoding, and benchmarks/decode.py's smoke run."""
from dataclasses import asdict

import pytest
import torch

import bench
from benchmarks.decode import COLUMNS, bench_decode
from regroup import recluster_model
from fast.decode_graph import GraphedDecodeStep, graph_unsupported
from generate import KVCache, generate
from model import GPT, GPTConfig
from offload import ClusterOffloader
from quant import quantize_model
from train import TrainConfig

CFG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, ffn_hidden=32, n_experts=4, top_k=2,
           n_clusters=2, rank=2, vocab_size=64)


def _model(moe, quantized=False, device="cpu"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(moe=moe, **CFG))
    if moe == "clustered":
        for layer in model.moe_layers():
            layer.input_mean.normal_()
        recluster_model(model)
    if quantized:
        quantize_model(model)
    return model.to(device).eval()


def _generate(model, prompt, new, temperature, use_cache=True):
    generator = torch.Generator(prompt.device).manual_seed(1)
    return generate(model, prompt, new, temperature, None, generator, use_cache=use_cache)


@pytest.mark.parametrize("moe", ["dense", "topk", "clustered"])
def test_cached_generation_equals_uncached(moe):
    model = _model(moe)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 1.0):   # greedy, and sampling with the same seed
        # 5 + 20 tokens: past block_size 16 the cached path re-prefills its window.
        cached = _generate(model, prompt, 20, temperature)
        assert torch.equal(cached, _generate(model, prompt, 20, temperature, use_cache=False))
    assert len(set(cached[0, 5:].tolist())) > 3   # sampling really varies the context


@pytest.mark.parametrize("moe", ["dense", "clustered"])
def test_cached_hidden_states_match_full_forward(moe):
    """Prefill 4, one token at a time for 3, then a chunk of 3 (the offset-mask path)."""
    model = _model(moe)
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model.hidden_states(idx)
        cache = KVCache(model.cfg.n_layer, model.cfg.block_size)
        parts = [model.hidden_states(idx[:, :4], cache)[0]]
        parts += [model.hidden_states(idx[:, t:t + 1], cache)[0] for t in range(4, 7)]
        parts.append(model.hidden_states(idx[:, 7:], cache)[0])
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model.hidden_states(idx[:, :7], cache)       # 10 + 7 > 16


def _static_vs_dynamic_logits(model, step_static, device="cpu"):
    """Prefill 5, then 8 teacher-forced decode steps: the dynamic cache's logits and those of
    `step_static(token, cache)` (static mode, eager or graphed) on a second cache."""
    idx = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(5)).to(device)
    dynamic, static = (KVCache(model.cfg.n_layer, model.cfg.block_size) for _ in range(2))
    with torch.no_grad():
        model(idx[:, :5], cache=dynamic)
        model(idx[:, :5], cache=static)
        pairs = [(model(idx[:, t:t + 1], cache=dynamic)[0],
                  step_static(idx[:, t:t + 1], static).clone()) for t in range(5, 13)]
    assert dynamic.length == static.length == 13
    return pairs


def _eager_static(model):
    def step(token, cache):
        cache.positions = torch.full((1,), cache.length, device=token.device)
        logits = model(token, cache=cache)[0]
        cache.positions = None
        return logits
    return step


@pytest.mark.parametrize("moe", ["dense", "topk", "clustered"])
def test_static_cache_step_equals_dynamic(moe):
    """The static mode a CUDA graph replays (keys at a device-side position, attention over
    the whole buffer under a mask) computes the dynamic cache's logits."""
    model = _model(moe)
    for dynamic, static in _static_vs_dynamic_logits(model, _eager_static(model)):
        torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)
    assert "CUDA" in graph_unsupported(model)
    with pytest.raises(ValueError, match="CUDA graph"):
        GraphedDecodeStep(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("moe,int4", [("dense", False), ("topk", False), ("clustered", False),
                                      ("clustered", True)])
def test_cuda_graph_decode_equals_eager(moe, int4):
    """bf16, as decoding runs: the replayed graph gives the eager static step's logits (the
    same kernels), and greedy generation matches the eager cached path."""
    model = _model(moe, device="cuda").to(torch.bfloat16)
    if int4:
        quantize_model(model, base_dtype=torch.bfloat16)
    assert graph_unsupported(model) is None
    graphed = _static_vs_dynamic_logits(model, GraphedDecodeStep(model), "cuda")
    eager = _static_vs_dynamic_logits(model, _eager_static(model), "cuda")
    for (_, g), (_, e) in zip(graphed, eager):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    if moe == "dense":  # fp32 end to end: graph against the eager dynamic cache, greedy
        fp32, prompt = _model(moe, device="cuda"), torch.randint(0, 64, (1, 6), device="cuda")
        assert torch.equal(generate(fp32, prompt, 20, 0.0, step=GraphedDecodeStep(fp32)),
                           generate(fp32, prompt, 20, 0.0))


@pytest.mark.parametrize("predict_at", ["ffn", "block"])
def test_offloaded_decoding_equals_resident_int4(predict_at):
    resident, offloaded = _model("clustered", True), _model("clustered", True)
    cache = ClusterOffloader(offloaded, 0, "cpu", predict_at=predict_at)
    cache.budget = 2 * cache.entry_bytes((0, 0))     # half of the 2 x 2 entries
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    for temperature in (0.0, 1.0):
        assert torch.equal(_generate(offloaded, prompt, 14, temperature),
                           _generate(resident, prompt, 14, temperature))
    stats = cache.stats
    assert stats["misses"] > 0 and stats["predictions"] > 0
    assert stats["peak_resident_bytes"] <= cache.budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("predict_at", ["ffn", "block"])
def test_cuda_offloaded_decoding_equals_resident(predict_at):
    resident, offloaded = _model("clustered", True, "cuda"), _model("clustered", True, "cuda")
    cache = ClusterOffloader(offloaded, 0, "cuda", predict_at=predict_at)
    cache.budget = 2 * cache.entry_bytes((0, 0))
    prompt = torch.randint(0, 64, (1, 6), device="cuda")
    assert torch.equal(_generate(offloaded, prompt, 14, 0.0), _generate(resident, prompt, 14, 0.0))
    timing = cache.timing()
    assert timing["copy_ms"] > 0 and 0 <= timing["hidden_fraction"] <= 1
    for moe in ("dense", "clustered"):
        model = _model(moe, device="cuda")
        assert torch.equal(_generate(model, prompt, 20, 0.0), _generate(model, prompt, 20, 0.0, False))


def test_bench_decode_smoke_returns_every_row(tmp_path):
    cfg = bench.BenchConfig(smoke=True).shrink()
    # A trained checkpoint adds per-layer prediction accuracy on held-out text (untrained here).
    torch.manual_seed(0)
    tc = TrainConfig(moe="clustered", sample_tokens=0, data_dir=str(tmp_path / "data"), n_layer=3, n_head=2,
                     n_embd=16, ffn_hidden=16, n_experts=4, n_clusters=2, rank=2, block_size=16)
    model = GPT(tc.model_config())
    recluster_model(model)
    torch.save({"model": model.state_dict(), "config": asdict(tc)}, tmp_path / "ckpt.pt")
    cfg.decode_ckpt = str(tmp_path / "ckpt.pt")
    rows = bench_decode(cfg, torch.device("cpu"), None)
    names = [r["model"] for r in rows]
    assert names == ["dense (no KV cache)", "dense", "topk", "clustered", "clustered+int4",
                     "clustered+int4+offload 25%", "clustered+int4+offload 50%",
                     "clustered+int4+offload 100%"] + [
                     f"checkpoint int4+offload 50%, guess at {at}: {what}"
                     for at in ("ffn", "block") for what in ("val prefill", "decode")]
    for (prefill, decode), at in zip((rows[-4:-2], rows[-2:]), ("ffn", "block")):
        per_layer = prefill["layer_prediction_values"]  # "ffn" never guesses the first layer
        assert len(per_layer) == 3 and (per_layer[0] is None) == (at == "ffn")
        assert all(0 <= a <= 1 for a in per_layer[1:])
        assert decode["decode_tokens_per_sec"] > 0 and decode["prediction_accuracy"] is not None
    rows = rows[:-4]
    assert all(r["decode_tokens_per_sec"] > 0 and set(COLUMNS[:4]) <= set(r) for r in rows)
    offload = {r["model"]: r for r in rows if "offload" in r["model"]}
    assert [r["budget_entries"] for r in offload.values()] == [1, 2, 4]
    full = offload["clustered+int4+offload 100%"]
    assert full["hit_rate"] == 1.0 and full["bytes_moved_per_token"] == 0  # warm, all resident
    assert all(0 <= r["prediction_accuracy"] <= 1 and r["hidden_fraction"] is None
               for r in offload.values())
