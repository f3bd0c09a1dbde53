"""bench.py's sections that train or time whole models, and the rows their tables print.

Owns: `bench_models` (each model alone: train tokens/s in each step mode, MFU, peak memory,
first clustering, inference), `bench_inference` (prefill with INT4 and offload, at two sizes),
`bench_quality` (seeded trainings of dense, top-k and clustered, then held-out quality and
routing, INT4 and offload perplexity), `bench_grid` (a declared grid of quality.GRIDS),
`bench_baseline` (the same lr sweep for every baseline, then each at its best lr).
Also SECTIONS, the table bench.py runs: name -> (function, title, table columns).
Does not own: the configuration (bench.py), timing one layer or one model (layers.py),
running grids (quality.py), the claims (claims.py).
"""
import dataclasses
import json
import math
import statistics
from pathlib import Path

import torch

import data
from benchmarks import decode as bench_decode
from benchmarks import paper, paper_table
from benchmarks.layers import (bench_layers, build_model, free_memory, peak_mib, profile_layers, timed,
                               train_speed)
from benchmarks.quality import GRIDS, lr_sweep, read_log, routing_stats, run_grid, run_variants, summarize
from checkpoint import load_model
from offload import ClusterOffloader
from quant import quantize_model
from train import TrainConfig
from train_log import evaluate, peak_flops


def model_config(cfg, moe: str, preset: str | None = None) -> TrainConfig:
    """The model of a bench config: a train.PRESETS size (cfg.preset unless named), the
    bench's data, batch and budget; shrunk to tiny sizes under --smoke."""
    from train import PRESETS
    name = cfg.preset if preset is None else preset
    tc = TrainConfig(**{**PRESETS.get(name, {}), "moe": moe, "dataset": cfg.dataset,
                        "data_dir": cfg.data_dir, "batch_size": cfg.batch_size,
                        "eval_iters": cfg.eval_iters, "max_iters": cfg.train_iters, "seed": cfg.seed,
                        "sample_tokens": 0, "preset": name})
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


# How a models-section step runs: eager kernels, compiled ones, and either replayed from one
# CUDA graph (train.py's --cuda_graph).
MODES = {"eager": {}, "compiled": {"compile": True}, "graphed": {"cuda_graph": True},
         "compiled+graphed": {"compile": True, "cuda_graph": True}}


def bench_models(cfg, device) -> list[dict]:
    """Whole models, each alone on the device (train.py's default size, or --preset's), at
    each of `model_blocks` and in each of `model_modes`, a step of `tokens_per_step` tokens
    (micro-batches of batch_size x the preset's block tokens, grad_accum making up the rest):
    parameters, train tokens/s, the ratio to top-k in the same mode and block, MFU, peak
    memory in training, the first clustering's seconds, and eager inference (prefill) tokens/s."""
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
            tc = model_config(cfg, overrides["moe"])
            tc.moe_impl = overrides.get("moe_impl", tc.moe_impl)
            micro = tc.batch_size * tc.block_size
            tc.block_size = block or tc.block_size
            tc.batch_size = max(1, micro // tc.block_size)
            tc.grad_accum = 1 if cfg.smoke else max(1, cfg.tokens_per_step // (tc.batch_size * tc.block_size))
            for mode in modes:
                timed_tc = dataclasses.replace(tc, **MODES[mode])
                row = {"model": name, "mode": mode, "block_size": tc.block_size,
                       "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
                       "tokens_per_step": tc.batch_size * tc.block_size * tc.grad_accum,
                       **train_speed(timed_tc, device, cfg.repeats, cfg.warmup, peak)}
                block_rows.append(row)
            model = build_model(tc, device).eval()
            x = torch.randint(0, tc.vocab_size, (tc.batch_size, tc.block_size), device=device)
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
            with torch.no_grad(), autocast:
                ms = timed(lambda: model(x), device, cfg.repeats, cfg.warmup)
            for row in (r for r in block_rows if r["model"] == name):
                row["infer_tokens_per_sec"] = x.numel() / ms * 1e3
            del model
        for mode in modes:
            top = next(r for r in block_rows if r["model"] == "topk" and r["mode"] == mode)
            for row in (r for r in block_rows if r["mode"] == mode):
                row["speed_vs_topk"] = row["train_tokens_per_sec"] / top["train_tokens_per_sec"]
                row["infer_vs_topk"] = row["infer_tokens_per_sec"] / top["infer_tokens_per_sec"]
        rows += block_rows
    return rows


def bench_inference(cfg, device) -> list[dict]:
    """Prefill of (batch, block) tokens at each of `inference_sizes` (train.PRESETS), bf16
    weights on CUDA; peak memory counts weights."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for size in cfg.inference_sizes.split(","):
        for variant in ("dense", "topk", "clustered", "clustered+int4", "clustered+int4+offload"):
            free_memory(device)
            tc = model_config(cfg, variant.split("+")[0], size)
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


def bench_quality(cfg, device, out: Path) -> dict:
    """`seeds` trainings of each model on the same data and token budget; then held-out
    quality and routing per run, summarized as mean +- std; INT4 and offload on seed 0."""
    grid = {}
    for moe in ("dense", "topk", "clustered"):
        for i in range(cfg.seeds):
            tc = model_config(cfg, moe)
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
    def run(cfg, device, out: Path) -> list[dict]:
        base = model_config(cfg, "topk")
        base.eval_interval, base.burn_in, base.recluster_interval = (
            (max(1, cfg.train_iters // 5), 200, 100) if not cfg.smoke else (2, 2, 1))
        base.device, base.compile = str(device), device.type == "cuda"
        glue = cfg.glue_dir and {"task": cfg.glue_task, "data_dir": cfg.glue_dir, "epochs": 2,
                                 "max_train_examples": cfg.glue_max_examples}
        return run_variants(base, GRIDS[name], cfg.seeds, out / name, cfg.parallel, glue or None)
    return run


def bench_baseline(cfg, device, out: Path) -> list[dict]:
    """The baselines tuned alike: GRIDS['baseline'] (dense, top-k with each balancing,
    clustered) swept over `lrs` for sweep_iters, then each at its best lr with `seeds` seeds
    for train_iters; held-out load CV of every final MoE checkpoint."""
    base = model_config(cfg, "topk")
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


def _int4_and_offload(model, tc: TrainConfig, val, cfg, device, out: Path) -> dict:
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


# Each section: (function(cfg, device, out) -> result, title(cfg, env), table columns).
SECTIONS = {
    "layers": (lambda cfg, device, out: bench_layers(cfg, model_config(cfg, "clustered"), device),
               lambda cfg, env: (lambda s: f"One FFN layer, forward+backward, {cfg.tokens} tokens, "
                                 f"d={s.n_embd}, h={s.ffn_hidden}, E={s.n_experts}, top-{s.top_k}, "
                                 f"G={s.n_clusters}, r={s.rank} ({env['device']}, torch {env['torch']}):")(
                                     model_config(cfg, "clustered")),
               ["layer", "ms", "tokens_per_sec", "speed_vs_topk", "ms_vs_minimal"]),
    "profile": (lambda cfg, device, out: profile_layers(cfg, model_config(cfg, "clustered"), device),
                None, None),
    "models": (lambda cfg, device, out: bench_models(cfg, device),
               lambda cfg, env: f"Whole models ({cfg.preset or 'default'} size, each alone, train = "
                                f"fwd+bwd+AdamW, {cfg.tokens_per_step} tokens a step; {env['device']}):",
               ["model", "mode", "block_size", "batch_size", "grad_accum", "total_params", "active_params", "train_tokens_per_sec",
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


def bench_paper(cfg, device, out: Path) -> list[dict]:
    """Train what the paper's table still lacks (paper.py), then its rows from every kept run."""
    paper.train_missing(cfg, device)
    return paper_table.table(cfg)


SECTIONS["paper"] = (bench_paper, paper_table.title, paper_table.COLUMNS)
