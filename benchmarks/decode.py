"""Decoding, measured: the KV cache, INT4 experts, offload and next-layer cluster prediction.
Used by bench.py (`--sections=decode`) through `bench_decode(cfg, device, out)`.

Owns: the decode benchmark. Batch 1, `NEW_TOKENS` sampled (temperature 1, fixed seed) after a
random `PROMPT_TOKENS` prompt, prefill included in the time, median of `REPEATS` runs after
one warm-up run. Rows, for the size of --preset (train.PRESETS):
  dense (no KV cache)   the reference generate, re-running the context every token
  dense, topk, clustered, clustered+int4          with the KV cache, weights resident, eager
  clustered+int4+offload NN%                      expert weights in CPU memory, a budget
                                                  of NN% of the n_layer * n_clusters entries
  dense, ..., clustered+int4, graph               CUDA only: the cached decode step replayed
                                                  from a CUDA graph (fast/decode_graph.py)
Columns (offload rows only for hit_rate onwards):
  decode_tokens_per_sec, vs_no_cache (over the uncached dense row), vs_resident (offload rows,
  over the eager resident clustered+int4 row), peak_mib (NaN on CPU), peak_vs_dense (over
  the cached dense row: the dense model of equal active size), hit_rate (cluster lookups
  found resident), prediction_accuracy (tokens whose next-layer cluster was predicted,
  offload.py), bytes_moved_per_token, stalls_per_token (lookups whose copy was still in
  flight), hidden_fraction (share of copy time overlapped with compute, decode runs; None on
  CPU), prefill_hidden_fraction (the same for one prefill of the prompt on an emptied cache:
  the double-buffered path).
Random-init models (clustered ones clustered at once, as bench.py does) are fine for speed;
their routing is not a trained model's, so with `decode_ckpt` set on the config the trained
checkpoint adds rows with per-layer prediction accuracy on its held-out text, for each place
the guess is made (offload.PREDICT_AT): a prefill of val windows (every token scored) and a
decode from a val prompt.
Does not own: the model, generation, the cache of clusters or the timing helper (model.py,
generate.py, offload.py, layers.timed); bench.py owns BenchConfig and the printed tables.
"""

import sys

import torch

import data
from benchmarks.layers import build_model, free_memory, peak_mib, timed
from checkpoint import load_model
from fast.decode_graph import GraphedDecodeStep
from generate import generate
from offload import PREDICT_AT, ClusterOffloader
from quant import quantize_model
from train import PRESETS, TrainConfig

PROMPT_TOKENS, NEW_TOKENS, REPEATS = 128, 256, 3
SMOKE_PROMPT_TOKENS, SMOKE_NEW_TOKENS, SMOKE_REPEATS = 4, 8, 1
BUDGETS = (0.25, 0.5, 1.0)        # offload budget, as a fraction of all (layer, cluster) entries
CKPT_BUDGET, CKPT_WINDOWS = 0.5, 8
COLUMNS = ["size", "model", "decode_tokens_per_sec", "vs_no_cache", "vs_resident", "peak_mib",
           "peak_vs_dense", "hit_rate", "prediction_accuracy", "bytes_moved_per_token", "stalls_per_token", "hidden_fraction",
           "prefill_hidden_fraction", "layer_prediction_accuracy"]


def title(cfg, env) -> str:
    prompt, new, _ = _workload(cfg)
    return (f"Decoding (batch 1, {new} new tokens after a {prompt}-token prompt, prefill included, "
            f"{'bf16' if env['device'] != 'cpu' else 'fp32'}, {env['device']}):")


def _workload(cfg):
    return (SMOKE_PROMPT_TOKENS, SMOKE_NEW_TOKENS, SMOKE_REPEATS) if cfg.smoke else \
        (PROMPT_TOKENS, NEW_TOKENS, getattr(cfg, "decode_repeats", REPEATS))


def _config(cfg, moe: str, preset: str, window: int) -> TrainConfig:
    """train.py's model at `preset`; tiny under --smoke (two layers, so one is predicted)."""
    tc = TrainConfig(**{**PRESETS.get(preset, {}), "moe": moe, "seed": cfg.seed})
    if cfg.smoke:
        tc.n_layer, tc.n_head, tc.n_embd, tc.ffn_hidden, tc.vocab_size = 2, 2, 32, 64, 256
        tc.n_experts, tc.n_clusters, tc.rank = 8, 2, 4
    # Past block_size every step re-prefills the window (generate.generate: learned absolute
    # positions), so the window is made long enough for prompt + new tokens.
    tc.block_size = max(tc.block_size, window)
    return tc


def _offload(model, fraction: float, device) -> ClusterOffloader:
    cache = ClusterOffloader(model, 0, device)
    entries = len(cache.cpu)
    cache.budget = max(1, round(fraction * entries)) * cache.entry_bytes((0, 0))
    return cache


def _cache_columns(cache: ClusterOffloader, tokens: int) -> dict:
    stats = cache.stats
    looked_up = stats["hits"] + stats["misses"]
    overall, per_layer = cache.prediction_accuracy()
    timing = cache.timing()
    per_token = lambda ms: None if ms is None else ms / tokens
    return {"hit_rate": stats["hits"] / looked_up if looked_up else float("nan"),
            "prediction_accuracy": overall, "bytes_moved_per_token": stats["bytes_moved"] / tokens,
            "stalls_per_token": stats["stalls"] / tokens, "hidden_fraction": timing["hidden_fraction"],
            "copy_ms_per_token": per_token(timing["copy_ms"]),
            "stall_ms_per_token": per_token(timing["stall_ms"]),
            "layer_prediction_accuracy": ", ".join("-" if a is None else f"{a:.2f}" for a in per_layer),
            "layer_prediction_values": per_layer, "bytes_moved": stats["bytes_moved"],
            "hits": stats["hits"], "misses": stats["misses"], "stalls": stats["stalls"],
            "budget_bytes": cache.budget}


def _decode(model, prompt, new: int, device, repeats: int, use_cache=True, cache=None,
            graph=False) -> dict:
    """Warm-up (which also captures the graph); with offload, one prefill of the prompt on an
    emptied cache and a second warm-up; then the timed decode runs."""
    def run():
        generator = torch.Generator(device).manual_seed(0)
        step = GraphedDecodeStep(model) if graph else None
        generate(model, prompt, new, temperature=1.0, generator=generator, use_cache=use_cache,
                 step=step)
    with torch.no_grad():
        run()
        row = {}
        if cache is not None:
            cache.evict_all()
            cache.reset_stats()
            model(prompt)
            row["prefill_hidden_fraction"] = cache.timing()["hidden_fraction"]
            run()
            cache.reset_stats()
        free_memory(device)
        ms = timed(run, device, repeats, warmup=0)
    row.update({"decode_tokens_per_sec": new / ms * 1e3, "peak_mib": peak_mib(device)})
    if cache is not None:
        row.update(_cache_columns(cache, repeats * new))
    return row


def _variants(device) -> list[tuple]:
    """(row name, moe, int4, offload fraction or None, KV cache, CUDA graph). Eager rows come
    first; with CUDA the resident models decode again from a CUDA graph (fast/decode_graph.py). Offload
    cannot be graphed, so its rows compare with the eager resident INT4 row."""
    rows = [("dense (no KV cache)", "dense", False, None, False, False)]
    rows += [(name, moe, "int4" in name, None, True, False) for name, moe in (
        ("dense", "dense"), ("topk", "topk"), ("clustered", "clustered"),
        ("clustered+int4", "clustered"))]
    rows += [(f"clustered+int4+offload {f:.0%}", "clustered", True, f, True, False)
             for f in BUDGETS]
    if torch.device(device).type == "cuda":
        rows += [(name + ", graph", moe, int4, None, True, True)
                 for name, moe, int4, fraction, cached, _ in rows[1:5]]
    return rows


def _size_rows(cfg, size: str, preset: str, device, dtype) -> list[dict]:
    prompt_len, new, repeats = _workload(cfg)
    rows = []
    for name, moe, int4, fraction, cached, graph in _variants(device):
        free_memory(device)
        tc = _config(cfg, moe, preset, prompt_len + new)
        model = build_model(tc, device, dtype).eval()
        if int4:  # 16-bit bases in the forward's dtype: no per-step cast
            quantize_model(model, base_dtype=dtype if dtype != torch.float32 else torch.float16)
        cache = _offload(model, fraction, device) if fraction is not None else None
        prompt = torch.randint(0, min(tc.vocab_size, 50257), (1, prompt_len), device=device,
                               generator=torch.Generator(device).manual_seed(cfg.seed))
        row = {"size": size, "model": name, "n_layer": tc.n_layer, "n_embd": tc.n_embd,
               "block_size": tc.block_size}
        if cache is not None:
            row["budget_entries"] = cache.budget // cache.entry_bytes((0, 0))
        row.update(_decode(model, prompt, new, device, repeats, cached, cache, graph))
        rows.append(row)
        print(f"decode row {row}", file=sys.stderr, flush=True)  # survives a timed-out run
        del model, cache
    speed = {row["model"]: row["decode_tokens_per_sec"] for row in rows}
    dense_mib = next(row["peak_mib"] for row in rows if row["model"] == "dense")
    for row in rows:
        row["vs_no_cache"] = row["decode_tokens_per_sec"] / speed["dense (no KV cache)"]
        row["peak_vs_dense"] = row["peak_mib"] / dense_mib
        if "offload" in row["model"]:  # against the eager resident model: neither is graphed
            row["vs_resident"] = row["decode_tokens_per_sec"] / speed["clustered+int4"]
    return rows


def _checkpoint_rows(path: str, cfg, device, dtype) -> list[dict]:
    """A trained clustered checkpoint, INT4 + offload at CKPT_BUDGET: per-layer prediction
    accuracy on held-out text, over a prefill of val windows and over a decode."""
    prompt_len, new, repeats = _workload(cfg)
    free_memory(device)
    model, ckpt = load_model(path, device)
    model.eval()
    if not any(layer.compressed for layer in model.moe_layers()):
        raise ValueError(f"decode_ckpt {path} is not clustered (moe={model.cfg.moe}); "
                         f"next-layer prediction needs clustered MoE layers")
    tc = TrainConfig(**ckpt["config"])
    val = data.load_split(data.prepare(tc.dataset, tc.data_dir, val_split=tc.val_split), "val")
    block = tc.block_size
    if len(val) < CKPT_WINDOWS * block:
        raise ValueError(f"{tc.dataset}'s val split has {len(val)} tokens; need {CKPT_WINDOWS * block}")
    # Weights in the compute dtype, as the random-init rows; an INT4 checkpoint keeps float16
    # scales, which a blanket .to() would break: autocast then.
    stored_int4 = any(layer.compressed and layer.bank.quantized for layer in model.moe_layers())
    if not stored_int4:
        model.to(dtype)
    quantize_model(model, base_dtype=dtype if dtype != torch.float32 else torch.float16)
    cache = _offload(model, CKPT_BUDGET, device)
    autocast = torch.autocast(device.type, dtype, enabled=stored_int4 and dtype != torch.float32)
    stride = len(val) // CKPT_WINDOWS
    windows = torch.stack([torch.from_numpy(val[i * stride:i * stride + block].astype("int64"))
                           for i in range(CKPT_WINDOWS)]).to(device)          # (W, block)
    # Within the window: past block_size every step would re-prefill it (model.generate).
    prompt = windows[:1, :min(prompt_len, block // 2)]
    new = min(new, block - prompt.shape[1])
    rows = []
    for predict_at in PREDICT_AT:
        cache.predict_at, name = predict_at, f"checkpoint int4+offload {CKPT_BUDGET:.0%}, guess at {predict_at}"
        cache.evict_all()
        cache.reset_stats()
        with torch.no_grad(), autocast:
            model(windows)
        rows.append({"size": "checkpoint", "model": f"{name}: val prefill",
                     **_cache_columns(cache, windows.numel())})
        cache.reset_stats()
        with autocast:
            row = _decode(model, prompt, new, device, repeats, cache=cache)
        rows.append({"size": "checkpoint", "model": f"{name}: decode", **row})
    return rows


def bench_decode(cfg, device, out=None) -> list[dict]:
    """All rows; `out` is unused (bench.py saves the results)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # One size per run: at the paper's size the eight variants take minutes (decoding is a
    # host-bound loop of small kernels), so the default size is its own run.
    sizes = [(cfg.preset or "quick", cfg.preset)]
    rows = [row for size, preset in sizes for row in _size_rows(cfg, size, preset, device, dtype)]
    path = getattr(cfg, "decode_ckpt", "")
    if path:
        rows += _checkpoint_rows(path, cfg, device, dtype)
    return rows
