"""The paper's comparison, measured.  `python bench.py` (GPU), `python bench.py --smoke` (CPU).

Owns: BenchConfig, the table of sections (name -> function; `--sections=a,b` picks them):
  layers     one FFN layer forward+backward: dense, top-k and clustered, grouped and loop
             (DESIGN.md's hot-path table), optionally torch.compile'd (bench_layers.py)
  profile    the CUDA kernels that dominate each MoE layer's step (bench_layers.py)
  models     whole models: parameters, train and inference tokens/s, peak memory in training
  inference  dense, top-k, clustered, clustered+INT4, clustered+INT4+offload: inference
             tokens/s and peak memory, at the default size and a larger one
  decode     generation (KV cache) with INT4 and offload budgets (bench_decode.py)
  baseline   is the top-k baseline sound? one change at a time against it (GRIDS)
  quality    `seeds` real trainings of each model on the same data (bench_quality.py), then
             val perplexity and load CV as mean +- std, heatmaps, the all-to-all volume that
             expert parallelism would move, INT4 and offload perplexity
and the closing table that marks each of the paper's claims met, not met, or within noise.
`--preset=paper` runs the whole-model sections at the paper's size (train.PRESETS).
Does not own: model code (model.py, train.py), plotting (plots.py).
"""
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
from benchmarks import decode as bench_decode
from benchmarks.layers import (bench_layers, build_model, free_memory, peak_mib, profile_layers, timed,
                          train_speed)
from benchmarks.quality import (GRIDS, beyond_noise, lr_sweep, read_log, routing_stats, run_grid,
                           run_variants, summarize)
from cli import load_model, parse_config, run
from offload import ClusterOffloader
from quant import quantize_model
from train import PRESETS, TrainConfig
from train_log import evaluate, peak_flops


@dataclass
class BenchConfig:
    out_dir: str = "bench_out"
    device: str = "auto"
    smoke: bool = False
    sections: str = "layers,models,inference,quality"
    preset: str = ""               # '' | paper: whole-model sections at that size (train.PRESETS)
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
    model_blocks: str = ""         # models section: block sizes, comma-separated ('' = the preset's)
    model_modes: str = "eager,compiled,graphed,reduce-overhead"  # models section, how each train
                                   # step runs: eager | compiled (torch.compile) | graphed (compiled,
                                   # the whole step replayed from one CUDA graph: graph_step.py) |
                                   # reduce-overhead (torch.compile's own CUDA graphs); CPU: eager
    # quality
    dataset: str = "shakespeare"   # as train.py: a name, or folders/zips of .txt, comma-separated
    data_dir: str = "data"
    train_iters: int = 1000
    sweep_iters: int = 0           # baseline: the lr sweep's budget (0 = train_iters)
    lrs: str = "3e-4,6e-4,1e-3"    # baseline: the learning rates every model is swept over
    models: str = ""               # baseline: which of its models, comma-separated ('' = all)
    ckpt_interval: int = 0         # baseline: train.py's (0: a checkpoint at every eval; large
                                   # models may need fewer: each holds weights and AdamW moments)
    eval_iters: int = 20
    seeds: int = 3                 # trainings per model; quality is reported as mean +- std
    parallel: int = 1              # train.py processes at once on the one device (see bench_quality)
    routing_batches: int = 8       # val batches for load statistics and all-to-all volume
    decode_ckpt: str = ""          # a train.py checkpoint: decode prediction accuracy on real text
    decode_repeats: int = 3        # timed generations per decode row (median)
    glue_dir: str = ""             # GLUE root: grid sections also fine-tune each run on glue_task
    glue_task: str = "sst2"
    glue_max_examples: int = 10000 # training examples per fine-tuning (0 = all), 2 epochs

    def shrink(self):
        """--smoke: tiny sizes so the whole bench runs in seconds on CPU."""
        self.tokens, self.n_embd, self.ffn_hidden = 256, 32, 64
        self.n_experts, self.n_clusters, self.rank = 8, 2, 4
        self.repeats, self.warmup, self.compile_layers = 2, 1, False
        self.batch_size, self.big_layers, self.big_embd, self.big_hidden = 2, 1, 32, 64
        self.train_iters, self.eval_iters, self.routing_batches, self.seeds = 4, 1, 1, 2
        return self


def _model_config(cfg: BenchConfig, moe: str, big: bool = False) -> TrainConfig:
    """train.py's default model (or the larger inference size), shrunk under --smoke."""
    tc = TrainConfig(moe=moe, dataset=cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size,
                     eval_iters=cfg.eval_iters, max_iters=cfg.train_iters, seed=cfg.seed,
                     **PRESETS.get(cfg.preset, {}))
    if big:
        tc.n_layer, tc.n_embd, tc.ffn_hidden, tc.n_head = (cfg.big_layers, cfg.big_embd,
                                                           cfg.big_hidden, cfg.big_embd // 64)
    if cfg.smoke:
        tc.n_layer, tc.n_head, tc.n_embd, tc.ffn_hidden, tc.block_size = 1, 2, 32, 64, 32
        tc.n_experts, tc.n_clusters, tc.rank = 8, 2, 4
        tc.burn_in, tc.recluster_interval, tc.eval_interval = 2, 1, 2
    else:
        tc.eval_interval = max(1, cfg.train_iters // 5)
        tc.burn_in = tc.recluster_interval = max(1, cfg.train_iters // 5)
    return tc


MODEL_VARIANTS = (("dense", {"moe": "dense"}), ("topk", {"moe": "topk"}),
                  ("clustered", {"moe": "clustered"}),
                  ("clustered, triton", {"moe": "clustered", "moe_impl": "triton"}))


MODES = {"eager": {}, "compiled": {"compile": True}, "graphed": {"compile": True, "cuda_graph": True},
         "reduce-overhead": {"compile": True, "compile_mode": "reduce-overhead"}}


def bench_models(cfg: BenchConfig, device) -> list[dict]:
    """Whole models, each alone on the device (train.py's default size, or --preset's), at
    each of `model_blocks` and in each of `model_modes`: parameters, train tokens/s, the
    ratio to top-k in the same mode and block, MFU, peak memory in training, the first
    clustering's seconds, and eager inference (prefill) tokens/s."""
    rows = []
    peak = peak_flops(device)
    blocks = [int(b) for b in cfg.model_blocks.split(",")] if cfg.model_blocks else [0]
    modes = [m for m in cfg.model_modes.split(",") if device.type == "cuda" or m == "eager"]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown model_modes {sorted(unknown)}; valid: {','.join(MODES)}")
    for block in blocks:
        block_rows = []
        for name, overrides in MODEL_VARIANTS:
            if overrides.get("moe_impl") == "triton" and device.type != "cuda":
                continue  # the Triton combine is CUDA-only; CPU would time the reference twice
            tc = _model_config(cfg, overrides["moe"])
            tc.moe_impl = overrides.get("moe_impl", tc.moe_impl)
            tc.block_size = block or tc.block_size
            for mode in modes:
                timed_tc = dataclasses.replace(tc, **MODES[mode])
                row = {"model": name, "mode": mode, "block_size": tc.block_size,
                       "batch_size": tc.batch_size,
                       **train_speed(timed_tc, device, cfg.repeats, cfg.warmup, peak)}
                block_rows.append(row)
            model = build_model(tc, device).eval()
            x = torch.randint(0, tc.vocab_size, (tc.batch_size, tc.block_size), device=device)
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
            with torch.no_grad(), autocast:
                ms = timed(lambda: model(x), device, cfg.repeats, cfg.warmup)
            for row in block_rows[-len(modes):]:
                row["infer_tokens_per_sec"] = x.numel() / ms * 1e3
            del model
        for mode in modes:
            top = next(r for r in block_rows if r["model"] == "topk" and r["mode"] == mode)
            for row in (r for r in block_rows if r["mode"] == mode):
                row["speed_vs_topk"] = row["train_tokens_per_sec"] / top["train_tokens_per_sec"]
                row["infer_vs_topk"] = row["infer_tokens_per_sec"] / top["infer_tokens_per_sec"]
        rows += block_rows
    return rows


def bench_inference(cfg: BenchConfig, device) -> list[dict]:
    """Prefill of (batch, block) tokens, bf16 weights on CUDA; peak memory counts weights."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for size, big in (("default", False), ("large", True)):
        for variant in ("dense", "topk", "clustered", "clustered+int4", "clustered+int4+offload"):
            free_memory(device)
            tc = _model_config(cfg, variant.split("+")[0], big)
            model = build_model(tc, device, dtype).eval()
            cache = None
            if "int4" in variant:  # 16-bit bases in the forward's dtype: no per-step cast
                quantize_model(model, base_dtype=dtype)
            if "offload" in variant:
                cache = ClusterOffloader(model, 0, device)
                cache.budget = cfg.offload_clusters * cache.entry_bytes((0, 0))
            free_memory(device)  # the peak below starts from what stays resident: weights, cache
            x = torch.randint(0, 50257, (cfg.batch_size, tc.block_size), device=device)
            with torch.no_grad():
                ms = timed(lambda: model(x), device, cfg.repeats, cfg.warmup)
            row = {"size": size, "model": variant, "n_layer": tc.n_layer, "n_embd": tc.n_embd,
                   "infer_tokens_per_sec": x.numel() / ms * 1e3, "peak_mib": peak_mib(device)}
            if cache:
                row.update({k: cache.stats[k] for k in ("bytes_moved", "hits", "misses", "prefetches", "stalls")})
                # Double buffering: the share of copy time spent behind compute (None on CPU).
                row["hidden_fraction"] = cache.timing()["hidden_fraction"]
                row["vs_resident"] = row["infer_tokens_per_sec"] / rows[-1]["infer_tokens_per_sec"]
            rows.append(row)
            del model, cache
    return rows


def bench_quality(cfg: BenchConfig, device, out: Path) -> dict:
    """`seeds` trainings of each model on the same data and token budget; then held-out
    quality and routing per run, summarized as mean +- std; INT4 and offload on seed 0."""
    grid = {}
    for moe in ("dense", "topk", "clustered"):
        for i in range(cfg.seeds):
            tc = _model_config(cfg, moe)
            tc.seed, tc.out_dir, tc.device = cfg.seed + i, str(out / f"train_{moe}_s{i}"), str(device)
            tc.compile = device.type == "cuda"
            grid[moe, i] = tc
    run_grid(list(grid.values()), cfg.parallel)
    results = {"runs": {}, "parallel": cfg.parallel, "seeds": cfg.seeds}
    for moe in ("dense", "topk", "clustered"):
        per_seed = []
        for i in range(cfg.seeds):
            tc = grid[moe, i]
            log = read_log(tc)
            # Steady state: the first interval holds compilation, later ones may hold a recluster.
            speeds = [r["tokens_per_sec"] for r in log[1:]] or [log[0]["tokens_per_sec"]]
            run = {"seed": tc.seed, "val_loss": log[-1]["val_loss"], "val_ppl": log[-1]["val_ppl"],
                   "train_tokens_per_sec": statistics.median(speeds), "log": log,
                   **{k: log[-1][k] for k in ("total_params", "expert_params", "active_params")}}
            free_memory(device)
            model, _ = load_model(Path(tc.out_dir) / "ckpt.pt", device)
            val = data.load_split(data.prepare(tc.dataset, tc.data_dir, val_split=tc.val_split), "val")
            if moe != "dense":
                run.update(routing_stats(model, val, tc, device, cfg.routing_batches))
                run["routing_candidates"] = tc.n_experts if moe == "topk" else \
                    tc.n_clusters + tc.n_experts // tc.n_clusters
            if moe == "clustered" and i == 0:
                run.update(_int4_and_offload(model, tc, val, cfg, device, out))
            per_seed.append(run)
            del model
        summary = dict(per_seed[0])  # seed 0's details (logs, loads) feed the plots
        for key in ("val_ppl", "val_loss", "train_tokens_per_sec", "load_cv", "load_variance"):
            if key in per_seed[0]:
                values = [r[key] for r in per_seed]
                summary[key + "_seeds"] = values
                summary[key + "_mean"], summary[key + "_std"] = (summarize(values)[s] for s in ("mean", "std"))
        summary["n_seeds"] = cfg.seeds
        results["runs"][moe] = summary
    return results


def bench_grid(name: str):
    """A section that trains GRIDS[name] on the quality data (schedule: train.py's defaults)."""
    def run(cfg: BenchConfig, device, out: Path) -> list[dict]:
        base = _model_config(cfg, "topk")
        base.eval_interval, base.burn_in, base.recluster_interval = (
            (max(1, cfg.train_iters // 5), 200, 100) if not cfg.smoke else (2, 2, 1))
        base.device, base.compile = str(device), device.type == "cuda"
        glue = cfg.glue_dir and {"task": cfg.glue_task, "data_dir": cfg.glue_dir, "epochs": 2,
                                 "max_train_examples": cfg.glue_max_examples}
        return run_variants(base, GRIDS[name], cfg.seeds, out / name, cfg.parallel, glue or None)
    return run


def bench_baseline(cfg: BenchConfig, device, out: Path) -> list[dict]:
    """The baselines tuned alike: GRIDS['baseline'] (dense, top-k with each balancing,
    clustered) swept over `lrs` for sweep_iters, then each at its best lr with `seeds` seeds
    for train_iters; held-out load CV of every final MoE checkpoint."""
    base = _model_config(cfg, "topk")
    base.burn_in, base.recluster_interval = (200, 100) if not cfg.smoke else (2, 1)
    base.device, base.compile, base.final_ckpt = str(device), device.type == "cuda", "weights"
    base.ckpt_interval = cfg.ckpt_interval
    lrs = [float(lr) for lr in cfg.lrs.split(",")]
    models = {name: v for name, v in GRIDS["baseline"].items()
              if not cfg.models or name in cfg.models.split(",")}
    if cfg.models and len(models) != len(cfg.models.split(",")):
        raise ValueError(f"models must name some of {','.join(GRIDS['baseline'])}, got {cfg.models!r}")
    return lr_sweep(base, models, lrs, cfg.sweep_iters or cfg.train_iters,
                    cfg.train_iters, cfg.seeds, out / "baseline", cfg.parallel, cfg.routing_batches)


def _int4_and_offload(model, tc: TrainConfig, val, cfg: BenchConfig, device, out: Path) -> dict:
    """Float vs INT4 (after a checkpoint round trip) vs INT4 + offload, same val batches."""
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    run = {"val_loss_float": evaluate(model, val, tc, device, autocast)}
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
    return run


def markdown(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _verdict(met: bool, noisy: bool = False) -> str:
    return "within noise" if noisy else ("met" if met else "not met")


def claims(results: dict) -> list[dict]:
    """Each of the paper's headline claims against what this run measured. A quality claim
    whose gap is within two standard errors over seeds says "within noise"."""
    rows = []

    def add(claim, paper, value, verdict):
        rows.append({"claim": claim, "paper": paper, "measured": value, "met": verdict})
    quality = results.get("quality", {})
    runs = quality.get("runs", {})
    top, clu = runs.get("topk"), runs.get("clustered")
    if top and clu:
        n = clu["n_seeds"]
        ratio = clu["total_params"] / top["total_params"]
        add("total parameters vs top-k", "about 80% fewer", f"{1 - ratio:.0%} fewer ({ratio:.2f}x)",
            _verdict(ratio <= 0.25))
        ratio = clu["expert_params"] / top["expert_params"]
        add("expert parameters vs top-k", "up to 5x fewer", f"{1 / ratio:.2f}x fewer", _verdict(1 / ratio >= 4))
        if quality.get("parallel", 1) <= 1:  # parallel runs share the GPU: their speed means nothing
            speed = clu["train_tokens_per_sec_mean"] / top["train_tokens_per_sec_mean"]
            add("train throughput vs top-k (compiled, steady state)", "+10-20%", f"{speed:.2f}x",
                _verdict(speed >= 1.1))
        var = top["load_variance_mean"] / max(clu["load_variance_mean"], 1e-12)
        add("expert-load variance vs top-k (held-out)", ">3x lower",
            f"{var:.2f}x lower (CV {top['load_cv_mean']:.3f} -> {clu['load_cv_mean']:.3f}, n={n})",
            _verdict(var >= 3))
        gap = clu["val_ppl_mean"] / top["val_ppl_mean"] - 1
        noisy = not beyond_noise(clu["val_ppl_seeds"], top["val_ppl_seeds"])
        add("val perplexity vs top-k", "matches",
            f"{gap:+.1%} ({top['val_ppl_mean']:.1f} +- {top['val_ppl_std']:.1f} -> "
            f"{clu['val_ppl_mean']:.1f} +- {clu['val_ppl_std']:.1f}, n={n})",
            _verdict(abs(gap) <= 0.03, noisy))
        add("routing candidates per token", "E -> G + E/G", f"{top['routing_candidates']} -> "
            f"{clu['routing_candidates']}", _verdict(clu["routing_candidates"] < top["routing_candidates"]))
        add("devices per token under expert parallelism", "k -> 1", f"{top['devices_per_token']:.2f} -> "
            f"{clu['devices_per_token']:.2f}", _verdict(clu["devices_per_token"] < top["devices_per_token"]))
        add("INT4 perplexity change", "small", f"{clu['int4_ppl_change']:+.2%}",
            _verdict(abs(clu["int4_ppl_change"]) <= 0.01))
    models = {(r["model"], r["block_size"], r["mode"]): r for r in results.get("models", [])}
    row_modes = list(dict.fromkeys(mode for _, _, mode in models))
    for (name, block, mode), row in models.items():
        top, dense = models.get(("topk", block, mode)), models.get(("dense", block, mode))
        how = f"block {block}, {row['mode']}"
        paper = results.get("config", {}).get("preset") == "paper"
        goal = 1.15 if paper else 1.0     # ours: the paper's +10-20% at its size, parity below it
        if name.startswith("clustered") and top:
            add(f"train throughput vs top-k ({name}, {how})", f"+10-20% (ours: >= {goal}x)",
                f"{row['speed_vs_topk']:.2f}x", _verdict(row["speed_vs_topk"] >= goal))
            if mode == row_modes[0]:  # inference is timed once per model
                add(f"inference (prefill) vs top-k ({name}, block {block})", "faster",
                    f"{row['infer_vs_topk']:.2f}x", _verdict(row["infer_vs_topk"] >= 1.0))
        if name == "topk" and dense:
            speed = row["train_tokens_per_sec"] / dense["train_tokens_per_sec"]
            add(f"top-k vs dense of equal active width ({how})", "(ours: >= 0.8x)", f"{speed:.2f}x",
                _verdict(speed >= 0.8))
        if name == "dense" and row.get("mfu") is not None:
            add(f"dense model FLOPs utilization ({how})", "(ours: >= 45%)", f"{row['mfu']:.1%}",
                _verdict(row["mfu"] >= 0.45))
        if name == "clustered" and "first_recluster_s" in row and paper and mode == row_modes[0]:
            add(f"first clustering, wall time (block {block})", "(ours: <= 3 s at the paper's size)",
                f"{row['first_recluster_s']:.2f} s", _verdict(row["first_recluster_s"] <= 3))
    infer = {(r["size"], r["model"]): r for r in results.get("inference", [])}
    for size in ("default", "large"):
        off, top_r, den_r = (infer.get((size, m)) for m in ("clustered+int4+offload", "topk", "dense"))
        if off and top_r and den_r and not math.isnan(off["peak_mib"]):
            vs_top, vs_dense = off["peak_mib"] / top_r["peak_mib"], off["peak_mib"] / den_r["peak_mib"]
            add(f"inference peak memory vs top-k ({size})", "about 50% lower", f"{vs_top:.2f}x",
                _verdict(vs_top <= 0.5))
            add(f"inference peak memory vs dense ({size})", "close to dense", f"{vs_dense:.2f}x",
                _verdict(vs_dense <= 1.1))
    return rows


# Each section: (function(cfg, device, out) -> result, title(cfg, env), table columns).
def _quality_rows(quality: dict) -> list[dict]:
    rows = []
    for name, run in quality["runs"].items():
        row = {"model": name}
        for key in ("val_ppl", "load_cv", "train_tokens_per_sec"):
            if key + "_mean" in run:
                row[key] = f"{run[key + '_mean']:.4g} +- {run[key + '_std']:.2g}"
        row.update({k: run.get(k, "") for k in ("devices_per_token", "total_params", "expert_params")})
        rows.append(row)
    return rows


SECTIONS = {
    "layers": (lambda cfg, device, out: bench_layers(cfg, device),
               lambda cfg, env: f"One FFN layer, forward+backward, {cfg.tokens} tokens, d={cfg.n_embd}, "
                                f"h={cfg.ffn_hidden}, E={cfg.n_experts}, top-{cfg.top_k}, G={cfg.n_clusters}, "
                                f"r={cfg.rank} ({env['device']}, torch {env['torch']}):",
               ["layer", "ms", "tokens_per_sec", "speed_vs_topk", "ms_vs_minimal"]),
    "profile": (lambda cfg, device, out: profile_layers(cfg, device), None, None),
    "models": (lambda cfg, device, out: bench_models(cfg, device),
               lambda cfg, env: f"Whole models ({cfg.preset or 'default'} size, each alone, train = "
                                f"fwd+bwd+AdamW, batch {cfg.batch_size}; {env['device']}):",
               ["model", "mode", "block_size", "total_params", "active_params", "train_tokens_per_sec",
                "speed_vs_topk", "mfu", "train_peak_mib", "first_recluster_s", "infer_tokens_per_sec",
                "infer_vs_topk"]),
    "inference": (lambda cfg, device, out: bench_inference(cfg, device),
                  lambda cfg, env: f"Inference (prefill {cfg.batch_size} x block tokens, bf16 weights "
                                   f"on CUDA; offload budget {cfg.offload_clusters} clusters):",
                  ["size", "model", "infer_tokens_per_sec", "vs_resident", "peak_mib",
                   "bytes_moved", "hits", "misses", "prefetches", "stalls", "hidden_fraction"]),
    "quality": (bench_quality,
                lambda cfg, env: f"Trainings on {cfg.dataset}, {cfg.train_iters} iterations x "
                                 f"{cfg.batch_size} x block tokens each, {cfg.seeds} seeds (mean +- std):",
                ["model", "val_ppl", "load_cv", "train_tokens_per_sec", "devices_per_token",
                 "total_params", "expert_params"]),
}
SECTIONS["baseline"] = (bench_baseline,
                        lambda cfg, env: f"Baselines on {cfg.dataset}, {cfg.preset or 'default'} size: "
                                         f"an lr sweep (one seed), then each model at its best lr "
                                         f"with {cfg.seeds} seeds, mean (std) ({env['device']}):",
                        ["phase", "variant", "tokens", "val_ppl", "val_ppl_std", "load_cv",
                         "heldout_load_cv", "vs_dense", "noise"])
SECTIONS["decode"] = (bench_decode.bench_decode, bench_decode.title, bench_decode.COLUMNS)
SECTIONS["ablation"] = (bench_grid("ablation"),
                        lambda cfg, env: f"Ablations on {cfg.dataset}, {cfg.train_iters} iterations, "
                                         f"{cfg.seeds} seeds, mean (std) ({env['device']}):",
                        ["variant", "val_ppl", "val_ppl_std", "load_cv", "cluster_load_cv",
                         "experts_moved", "shock", "train_tokens_per_sec", "glue", "glue_std"])
SECTIONS["routing"] = (bench_grid("routing"), SECTIONS["ablation"][1], SECTIONS["ablation"][2])
TABLE_ROWS = {"quality": _quality_rows}


def main(cfg: BenchConfig) -> dict:
    if cfg.smoke:
        cfg.shrink()
    if cfg.preset not in ("", *PRESETS):
        raise ValueError(f"preset must be '' or one of {sorted(PRESETS)}, got {cfg.preset!r}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python bench.py " + " ".join(sys.argv[1:])}
    results = {"env": env, "config": asdict(cfg)}
    sections = cfg.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; valid: {','.join(SECTIONS)}")

    def save():  # after every section, so a run cut short still leaves what it measured
        (out / "bench.json").write_text(json.dumps(results, indent=1))
    for name in sections:
        run, title, columns = SECTIONS[name]
        results[name] = run(cfg, device, out)
        if title is not None:
            rows = TABLE_ROWS.get(name, lambda r: r)(results[name])
            print(f"\n{title(cfg, env)}\n{markdown(rows, columns)}")
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
    run(lambda argv: main(parse_config(BenchConfig, argv)), sys.argv[1:])
