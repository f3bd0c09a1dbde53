"""The paper's comparison, measured.  `python bench.py` (GPU), `python bench.py --smoke` (CPU).

Owns: BenchConfig, timing (CUDA events, warm-up, median of repeats), and the tables:
  layers  one FFN layer forward+backward: dense, top-k (grouped / loop), clustered
          (grouped / loop), as in DESIGN.md's hot-path table.
  profile the CUDA kernels that dominate each MoE layer's step (torch.profiler).
Does not own: any model code; it builds models through model.py and trains through train.py.
"""
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster import recluster
from model import MLP, MoE, GPTConfig
from train import parse_config


@dataclass
class BenchConfig:
    out_dir: str = "bench_out"
    device: str = "auto"
    smoke: bool = False
    sections: str = "layers"
    # layer benchmark (DESIGN.md's setting)
    tokens: int = 16384
    n_embd: int = 512
    ffn_hidden: int = 2048
    n_experts: int = 32
    top_k: int = 2
    n_clusters: int = 8
    rank: int = 16
    repeats: int = 20
    warmup: int = 5
    seed: int = 0
    compile_layers: bool = False   # also time torch.compile'd layers

    def shrink(self):
        """--smoke: tiny sizes so the whole bench runs in seconds on CPU."""
        self.tokens, self.n_embd, self.ffn_hidden = 256, 32, 64
        self.n_experts, self.n_clusters, self.rank = 8, 2, 4
        self.repeats, self.warmup = 2, 1
        return self


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


def _layer_variants(cfg: BenchConfig, device):
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


def bench_layers(cfg: BenchConfig, device) -> list[dict]:
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


def profile_layers(cfg: BenchConfig, device, top: int = 12) -> dict:
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


def markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(cfg: BenchConfig) -> dict:
    if cfg.smoke:
        cfg.shrink()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python bench.py " + " ".join(sys.argv[1:])}
    results = {"env": env, "config": asdict(cfg)}
    sections = cfg.sections.split(",")
    if "layers" in sections:
        results["layers"] = bench_layers(cfg, device)
        print(f"\nOne FFN layer, forward+backward, {cfg.tokens} tokens, d={cfg.n_embd}, "
              f"h={cfg.ffn_hidden}, E={cfg.n_experts}, top-{cfg.top_k}, G={cfg.n_clusters}, "
              f"r={cfg.rank} ({env['device']}, torch {env['torch']}):")
        print(markdown(results["layers"], ["layer", "ms", "tokens_per_sec", "speed_vs_topk"]))
    if "profile" in sections:
        results["profile"] = profile_layers(cfg, device)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    try:
        config = parse_config(BenchConfig, sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    main(config)
