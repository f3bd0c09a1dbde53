"""The paper's comparison, measured.  `python bench.py` (GPU), `python bench.py --smoke` (CPU).

Owns: BenchConfig, timing (CUDA events, warm-up, median of repeats), and the tables:
  layers  one FFN layer forward+backward: dense, top-k (grouped / loop), clustered
          (grouped / loop), as in DESIGN.md's hot-path table.
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


def bench_layers(cfg: BenchConfig, device) -> list[dict]:
    """One FFN layer, forward + backward on (tokens, d) inputs, bf16 autocast on CUDA."""
    torch.manual_seed(cfg.seed)
    gpt_cfg = GPTConfig(n_embd=cfg.n_embd, ffn_hidden=cfg.ffn_hidden, n_experts=cfg.n_experts,
                        top_k=cfg.top_k, n_clusters=cfg.n_clusters, rank=cfg.rank, moe="clustered")
    x = torch.randn(1, cfg.tokens, cfg.n_embd, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    variants = [("dense FFN d->k*h->d", MLP(cfg.n_embd, cfg.top_k * cfg.ffn_hidden), None)]
    impls = ["grouped", "loop"] if device.type == "cuda" else ["loop"]
    for impl in impls:
        variants.append((f"top-k MoE, {impl}", MoE(gpt_cfg, 0.02), impl))
    for impl in impls:
        layer = MoE(gpt_cfg, 0.02)
        layer.input_mean.normal_()
        recluster(layer)
        variants.append((f"clustered MoE, {impl}", layer, impl))
    rows = []
    for name, layer, impl in variants:
        layer.to(device)
        if impl:
            layer.cfg = GPTConfig(**{**asdict(gpt_cfg), "moe_impl": impl})

        def step():
            with autocast:
                y, aux = layer(x)
            if aux.requires_grad:
                y = y + 0 * aux  # the aux loss's backward is part of the layer's cost
            y.backward(grad.to(y.dtype))
        ms = timed(step, device, cfg.repeats, cfg.warmup)
        rows.append({"layer": name, "ms": ms, "tokens_per_sec": cfg.tokens / ms * 1e3})
    ref = next((r["ms"] for r in rows if r["layer"].startswith("top-k")), rows[0]["ms"])
    for row in rows:
        row["speed_vs_topk"] = ref / row["ms"]
    return rows


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
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    try:
        config = parse_config(BenchConfig, sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    main(config)
