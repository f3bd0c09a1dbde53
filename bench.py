"""The paper's comparison, measured.  `python bench.py` (GPU), `python bench.py --smoke` (CPU).

Owns: BenchConfig and the sections:
  layers     one FFN layer forward+backward: dense, top-k and clustered, grouped and loop
             (DESIGN.md's hot-path table), optionally torch.compile'd (bench_layers.py)
  profile    the CUDA kernels that dominate each MoE layer's step (bench_layers.py)
  models     whole models at train.py's default size: parameters, train and inference
             tokens/s, peak memory in training
  inference  dense, top-k, clustered, clustered+INT4, clustered+INT4+offload: inference
             tokens/s and peak memory, at the default size and a larger one
  quality    short real trainings of each model on the same data and seed (train.py), then
             val perplexity, expert-load CV/variance, heatmaps, the all-to-all volume that
             expert parallelism would move, INT4 and offload perplexity
and the closing table that marks each of the paper's claims met or not, with the ratio.
Does not own: model code (model.py, train.py), plotting (plots.py).
"""
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
from bench_layers import bench_layers, profile_layers, timed
from cluster import recluster_model
from model import GPT
from offload import ClusterOffloader
from quant import quantize_model
from train import TrainConfig, evaluate, load_model, parse_config, train


@dataclass
class BenchConfig:
    out_dir: str = "bench_out"
    device: str = "auto"
    smoke: bool = False
    sections: str = "layers,models,inference,quality"
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
    compile_layers: bool = True    # also time torch.compile'd layers (CUDA)
    # whole models: train.py's defaults, plus this larger size for inference
    batch_size: int = 16
    big_layers: int = 8
    big_embd: int = 1024
    big_hidden: int = 2048
    offload_clusters: int = 4      # offload budget, in cluster entries
    # quality
    dataset: str = "shakespeare"
    data_dir: str = "data"
    train_iters: int = 1000
    eval_iters: int = 20
    routing_batches: int = 8       # val batches for load statistics and all-to-all volume

    def shrink(self):
        """--smoke: tiny sizes so the whole bench runs in seconds on CPU."""
        self.tokens, self.n_embd, self.ffn_hidden = 256, 32, 64
        self.n_experts, self.n_clusters, self.rank = 8, 2, 4
        self.repeats, self.warmup, self.compile_layers = 2, 1, False
        self.batch_size, self.big_layers, self.big_embd, self.big_hidden = 2, 1, 32, 64
        self.train_iters, self.eval_iters, self.routing_batches = 4, 1, 1
        return self


def _model_config(cfg: BenchConfig, moe: str, big: bool = False) -> TrainConfig:
    """train.py's default model (or the larger inference size), shrunk under --smoke."""
    tc = TrainConfig(moe=moe, dataset=cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size,
                     eval_iters=cfg.eval_iters, max_iters=cfg.train_iters, seed=cfg.seed)
    if big:
        tc.n_layer, tc.n_embd, tc.ffn_hidden, tc.n_head = (cfg.big_layers, cfg.big_embd,
                                                           cfg.big_hidden, cfg.big_embd // 64)
    if cfg.smoke:
        tc.n_layer, tc.n_head, tc.n_embd, tc.ffn_hidden, tc.block_size = 1, 2, 32, 64, 32
        tc.n_experts, tc.n_clusters, tc.rank = 8, 2, 4
        tc.warmup_iters, tc.recluster_interval, tc.eval_interval = 2, 1, 2
    else:
        tc.eval_interval = max(1, cfg.train_iters // 5)
        tc.warmup_iters = tc.recluster_interval = max(1, cfg.train_iters // 5)
    return tc


def _build(tc: TrainConfig, device, dtype=None) -> GPT:
    """A model on `device`; clustered ones are clustered + compressed right away."""
    torch.manual_seed(tc.seed)
    with torch.device(device):
        model = GPT(tc.model_config())
    if tc.moe == "clustered":
        for layer in model.moe_layers():
            layer.input_mean.normal_()
        recluster_model(model)
    return model.to(dtype) if dtype else model


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def bench_models(cfg: BenchConfig, device) -> list[dict]:
    """Default-size models: parameters, train step (fwd+bwd+AdamW) and inference tokens/s."""
    rows = []
    for moe in ("dense", "topk", "clustered"):
        _free(device)
        tc = _model_config(cfg, moe)
        model = _build(tc, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        tokens = torch.randint(0, 50257, (tc.batch_size, tc.block_size + 1), device=device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with autocast:
                _, loss, aux = model(x, y)
            (loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def infer():
            with torch.no_grad(), autocast:
                model(x)
        train_ms = timed(step, device, cfg.repeats, cfg.warmup)
        row = {"model": moe, **model.param_counts(), "train_tokens_per_sec": x.numel() / train_ms * 1e3,
               "train_peak_mib": _peak_mib(device)}
        model.eval()
        row["infer_tokens_per_sec"] = x.numel() / timed(infer, device, cfg.repeats, cfg.warmup) * 1e3
        rows.append(row)
        del model, optimizer
    return rows


def bench_inference(cfg: BenchConfig, device) -> list[dict]:
    """Prefill of (batch, block) tokens, bf16 weights on CUDA; peak memory counts weights."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for size, big in (("default", False), ("large", True)):
        for variant in ("dense", "topk", "clustered", "clustered+int4", "clustered+int4+offload"):
            _free(device)
            tc = _model_config(cfg, variant.split("+")[0], big)
            model = _build(tc, device, dtype).eval()
            cache = None
            if "int4" in variant:  # 16-bit bases in the forward's dtype: no per-step cast
                quantize_model(model, base_dtype=dtype)
            if "offload" in variant:
                cache = ClusterOffloader(model, 0, device)
                cache.budget = cfg.offload_clusters * cache.entry_bytes((0, 0))
            _free(device)  # the peak below starts from what stays resident: weights, cache
            x = torch.randint(0, 50257, (cfg.batch_size, tc.block_size), device=device)
            with torch.no_grad():
                ms = timed(lambda: model(x), device, cfg.repeats, cfg.warmup)
            row = {"size": size, "model": variant, "n_layer": tc.n_layer, "n_embd": tc.n_embd,
                   "infer_tokens_per_sec": x.numel() / ms * 1e3, "peak_mib": _peak_mib(device)}
            if cache:
                row.update({k: cache.stats[k] for k in ("bytes_moved", "hits", "misses", "stalls")})
            rows.append(row)
            del model, cache
    return rows


@torch.no_grad()
def routing_stats(model: GPT, val, tc: TrainConfig, device, n_batches: int) -> dict:
    """Expert loads per layer and, from the same real routing decisions, how many devices
    each token's activation must visit if each cluster's worth of experts sat on its own
    device (top-k: experts round-robin over G devices; clustered: cluster g on device g)."""
    layers = model.moe_layers()
    loads = torch.zeros(len(layers), tc.n_experts)
    devices_per_token, captured = [], []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
             for layer in layers]
    gen = torch.Generator().manual_seed(tc.seed + 2)
    model.eval()
    for _ in range(n_batches):
        x, _ = data.get_batch(val, tc.batch_size, tc.block_size, device, gen)
        captured.clear()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            model(x)
            for i, (layer, inp) in enumerate(captured):
                routing = layer.route(inp.reshape(-1, inp.shape[-1]))
                # Loads by original expert identity, so heatmaps compare like with like.
                loads[i].index_add_(0, layer.expert_ids[routing.expert_idx.flatten()].cpu(),
                                    torch.ones(routing.expert_idx.numel()))
                m = tc.n_experts // tc.n_clusters
                device_of = routing.expert_idx // m if layer.clustered else routing.expert_idx % tc.n_clusters
                distinct = (device_of.sort(-1).values.diff(dim=-1) != 0).sum(-1) + 1
                devices_per_token.append(distinct.float().mean().item())
    for hook in hooks:
        hook.remove()
    fractions = loads / loads.sum(-1, keepdim=True)
    cv = (fractions.std(-1, unbiased=False) / fractions.mean(-1)).mean().item()
    variance = (fractions * tc.n_experts).var(-1, unbiased=False).mean().item()
    return {"load_cv": cv, "load_variance": variance, "loads": loads.tolist(),
            "devices_per_token": sum(devices_per_token) / len(devices_per_token)}


def bench_quality(cfg: BenchConfig, device, out: Path) -> dict:
    """Same data, seed and token budget for each model; then held-out quality and routing."""
    results = {"runs": {}}
    for moe in ("dense", "topk", "clustered"):
        tc = _model_config(cfg, moe)
        tc.out_dir, tc.device = str(out / f"train_{moe}"), str(device)
        tc.compile = device.type == "cuda"
        log_path = Path(tc.out_dir) / "log.jsonl"
        log_path.unlink(missing_ok=True)
        (Path(tc.out_dir) / "reclusters.jsonl").unlink(missing_ok=True)
        _free(device)
        train(tc)
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        # Steady state: the first interval holds compilation, later ones may hold a recluster.
        speeds = [r["tokens_per_sec"] for r in log[1:]] or [log[0]["tokens_per_sec"]]
        run = {"val_loss": log[-1]["val_loss"], "val_ppl": log[-1]["val_ppl"],
               "train_tokens_per_sec": statistics.median(speeds), "train_peak_mib": _peak_mib(device),
               "total_params": log[-1]["total_params"], "expert_params": log[-1]["expert_params"],
               "active_params": log[-1]["active_params"], "log": log}
        model, _ = load_model(Path(tc.out_dir) / "ckpt.pt", device)
        val = data.load_split(data.prepare(tc.dataset, tc.data_dir), "val")
        if moe != "dense":
            run.update(routing_stats(model, val, tc, device, cfg.routing_batches))
            run["routing_candidates"] = tc.n_experts if moe == "topk" else \
                tc.n_clusters + tc.n_experts // tc.n_clusters
        if moe == "clustered":
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
            run["val_loss_float"] = evaluate(model, val, tc, device, autocast)
            # Model-only checkpoints, float and INT4, and the INT4 one read back through the
            # same loader train.py uses: the quantized model is measured after a round trip.
            paths = {"float": out / "clustered_float.pt", "int4": out / "clustered_int4.pt"}
            torch.save({"model": model.state_dict(), "config": dataclasses.asdict(tc)}, paths["float"])
            quantize_model(model)
            torch.save({"model": model.state_dict(), "config": dataclasses.asdict(tc)}, paths["int4"])
            model, _ = load_model(paths["int4"], device)
            for kind, path in paths.items():
                run[f"ckpt_mib_{kind}"] = path.stat().st_size / 2**20
            run["val_loss_int4"] = evaluate(model, val, tc, device, autocast)
            cache = ClusterOffloader(model, 0, device)
            cache.budget = cfg.offload_clusters * cache.entry_bytes((0, 0))
            run["val_loss_int4_offload"] = evaluate(model, val, tc, device, autocast)
            run["int4_ppl_change"] = math.exp(run["val_loss_int4"] - run["val_loss_float"]) - 1
            reclusters = Path(tc.out_dir) / "reclusters.jsonl"
            run["reclusters"] = [json.loads(l) for l in reclusters.read_text().splitlines()]
        results["runs"][moe] = run
        del model
    return results


def markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def claims(results: dict) -> list[dict]:
    """Each of the paper's headline claims against what this run measured."""
    rows = []

    def add(claim, paper, value, met):
        rows.append({"claim": claim, "paper": paper, "measured": value, "met": "yes" if met else "no"})
    runs = results.get("quality", {}).get("runs", {})
    top, clu = runs.get("topk"), runs.get("clustered")
    if top and clu:
        ratio = clu["total_params"] / top["total_params"]
        add("total parameters vs top-k", "about 80% fewer", f"{1 - ratio:.0%} fewer ({ratio:.2f}x)", ratio <= 0.25)
        ratio = clu["expert_params"] / top["expert_params"]
        add("expert parameters vs top-k", "up to 5x fewer", f"{1 / ratio:.2f}x fewer", 1 / ratio >= 4)
        speed = clu["train_tokens_per_sec"] / top["train_tokens_per_sec"]
        add("train throughput vs top-k (compiled, steady state)", "+10-20%", f"{speed:.2f}x", speed >= 1.1)
        var = top["load_variance"] / max(clu["load_variance"], 1e-12)
        add("expert-load variance vs top-k", ">3x lower", f"{var:.2f}x lower (CV {top['load_cv']:.3f} -> "
            f"{clu['load_cv']:.3f})", var >= 3)
        ppl = clu["val_ppl"] / top["val_ppl"] - 1
        add("val perplexity vs top-k", "matches", f"{ppl:+.1%} ({top['val_ppl']:.1f} -> {clu['val_ppl']:.1f})",
            abs(ppl) <= 0.03)
        add("routing candidates per token", "E -> G + E/G", f"{top['routing_candidates']} -> "
            f"{clu['routing_candidates']}", clu["routing_candidates"] < top["routing_candidates"])
        add("devices per token under expert parallelism", "k -> 1", f"{top['devices_per_token']:.2f} -> "
            f"{clu['devices_per_token']:.2f}", clu["devices_per_token"] < top["devices_per_token"])
        add("INT4 perplexity change", "small", f"{clu['int4_ppl_change']:+.2%}", abs(clu["int4_ppl_change"]) <= 0.01)
    infer = {(r["size"], r["model"]): r for r in results.get("inference", [])}
    for size in ("default", "large"):
        off, top_r, den_r = (infer.get((size, m)) for m in ("clustered+int4+offload", "topk", "dense"))
        if off and top_r and den_r and not math.isnan(off["peak_mib"]):
            vs_top, vs_dense = off["peak_mib"] / top_r["peak_mib"], off["peak_mib"] / den_r["peak_mib"]
            add(f"inference peak memory vs top-k ({size})", "about 50% lower", f"{vs_top:.2f}x", vs_top <= 0.5)
            add(f"inference peak memory vs dense ({size})", "close to dense", f"{vs_dense:.2f}x", vs_dense <= 1.1)
    return rows


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
    unknown = set(sections) - {"layers", "profile", "models", "inference", "quality"}
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; valid: layers,profile,models,inference,quality")

    def save():  # after every section, so a run cut short still leaves what it measured
        (out / "bench.json").write_text(json.dumps(results, indent=1))
    if "layers" in sections:
        results["layers"] = bench_layers(cfg, device)
        print(f"\nOne FFN layer, forward+backward, {cfg.tokens} tokens, d={cfg.n_embd}, "
              f"h={cfg.ffn_hidden}, E={cfg.n_experts}, top-{cfg.top_k}, G={cfg.n_clusters}, "
              f"r={cfg.rank} ({env['device']}, torch {env['torch']}):")
        print(markdown(results["layers"], ["layer", "ms", "tokens_per_sec", "speed_vs_topk"]))
        save()
    if "profile" in sections:
        results["profile"] = profile_layers(cfg, device)
        save()
    if "models" in sections:
        results["models"] = bench_models(cfg, device)
        print("\nWhole models, default size, eager (train = fwd+bwd+AdamW step):")
        print(markdown(results["models"], ["model", "total_params", "active_params", "expert_params",
                                           "train_tokens_per_sec", "infer_tokens_per_sec", "train_peak_mib"]))
        save()
    if "inference" in sections:
        results["inference"] = bench_inference(cfg, device)
        print(f"\nInference (prefill {cfg.batch_size} x block tokens, bf16 weights on CUDA; "
              f"offload budget {cfg.offload_clusters} clusters):")
        print(markdown(results["inference"], ["size", "model", "infer_tokens_per_sec", "peak_mib",
                                              "bytes_moved", "hits", "misses", "stalls"]))
        save()
    if "quality" in sections:
        results["quality"] = bench_quality(cfg, device, out)
        runs = [{"model": k, **{c: v for c, v in r.items() if not isinstance(v, (list, dict))}}
                for k, r in results["quality"]["runs"].items()]
        print(f"\nShort trainings on {cfg.dataset}, {cfg.train_iters} iterations each, same seed:")
        print(markdown(runs, ["model", "val_ppl", "train_tokens_per_sec", "load_cv", "load_variance",
                              "devices_per_token", "total_params", "expert_params"]))
        save()
    results["claims"] = claims(results)
    try:
        import plots
        results["plots"] = plots.make_all(results, out)
    except ImportError as error:
        print(f"plots skipped: {error} (pip install matplotlib)")
    save()
    if results["claims"]:
        print(f"\nThe paper's claims, measured ({env['device']}, torch {env['torch']}, {env['date']}; "
              f"`{env['command']}`):")
        print(markdown(results["claims"], ["claim", "paper", "measured", "met"]))
    return results


if __name__ == "__main__":
    try:
        config = parse_config(BenchConfig, sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    try:
        main(config)
    except ValueError as error:
        sys.exit(f"error: {error}")
