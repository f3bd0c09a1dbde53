"""One FFN layer, timed: DESIGN.md's hot-path table.  Used by bench.py (--sections=layers,profile).

Owns: `timed` (CUDA events, warm-up, median of repeats; perf_counter on CPU), the layer
variants at one setting (dense FFN, top-k and clustered MoE, grouped and loop paths),
their forward+backward timing, optionally torch.compile'd, and a torch.profiler table of
the kernels that dominate each grouped layer.
Does not own: the setting itself (bench.BenchConfig: tokens, n_embd, ffn_hidden,
n_experts, top_k, n_clusters, rank, repeats, warmup, seed, compile_layers) or whole models.
"""
import statistics
import time
from dataclasses import asdict

import torch

from cluster import recluster
from model import MLP, MoE, GPTConfig


def timed(fn, device, repeats: int, warmup: int) -> float:
    """Median milliseconds of fn(); CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _layer_variants(cfg, device):
    """(name, module, impl) for each FFN layer variant at the benchmark's setting."""
    torch.manual_seed(cfg.seed)
    gpt_cfg = GPTConfig(n_embd=cfg.n_embd, ffn_hidden=cfg.ffn_hidden, n_experts=cfg.n_experts,
                        top_k=cfg.top_k, n_clusters=cfg.n_clusters, rank=cfg.rank, moe="clustered")
    variants = [("dense FFN d->k*h->d", MLP(cfg.n_embd, cfg.top_k * cfg.ffn_hidden), None)]
    impls = ["grouped", "loop"] if device.type == "cuda" else ["loop"]
    for kind in ("top-k", "clustered"):
        for impl in impls:
            layer = MoE(GPTConfig(**{**asdict(gpt_cfg), "moe_impl": impl}), 0.02)
            if kind == "clustered":
                layer.input_mean.normal_()
                recluster(layer)
            variants.append((f"{kind} MoE, {impl}", layer.to(device), impl))
    return [(n, m.to(device), i) for n, m, i in variants]


def _step_fn(layer, x, grad, device):
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            y, aux = layer(x)
        if aux.requires_grad:
            y = y + 0 * aux  # the aux loss's backward is part of the layer's cost
        y.backward(grad.to(y.dtype))
    return step


def bench_layers(cfg, device) -> list[dict]:
    """One FFN layer, forward + backward on (tokens, d) inputs, bf16 autocast on CUDA."""
    x = torch.randn(1, cfg.tokens, cfg.n_embd, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    variants = _layer_variants(cfg, device)
    if cfg.compile_layers:
        variants += [(f"{n}, compiled", torch.compile(m), i) for n, m, i in variants if i != "loop"]
    rows = []
    for name, layer, _ in variants:
        try:
            ms = timed(_step_fn(layer, x, grad, device), device, cfg.repeats, cfg.warmup)
        except Exception as error:  # a compile failure is a result to report, not a crash
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        rows.append({"layer": name, "ms": ms, "tokens_per_sec": cfg.tokens / ms * 1e3})
    ref = next((r["ms"] for r in rows if r["layer"].startswith("top-k")), rows[0]["ms"])
    for row in rows:
        row["speed_vs_topk"] = ref / row["ms"]
    return rows


def profile_layers(cfg, device, top: int = 12) -> dict:
    """Top kernels by device time for each grouped MoE layer: where the milliseconds go."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(1, cfg.tokens, cfg.n_embd, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    tables = {}
    for name, layer, impl in _layer_variants(cfg, device):
        if impl == "loop":
            continue
        step = _step_fn(layer, x, grad, device)
        for _ in range(cfg.warmup):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)
        print(f"\n== {name}: 5 steps ==\n{tables[name]}")
    return tables
