"""bench.py's `paper` section: the runs of the paper's comparison at its size, built in parts.

Owns: the plan and the runs behind README's paper table. Dense, top-k and clustered
(both MoE models with bias balancing) at --paper_size (train.PRESETS['paper'] by default), in
a regime of --tokens_per_step (32K by default: batch 32 x 256 x grad_accum 4; 8K shows where
top-k trails dense): the same lr sweep for each model (widened past an edge that wins), then
each at its best lr with seeds. Each final checkpoint is measured before it is deleted: held-out load CV,
inference memory (and, for the clustered model, INT4 and INT4 + offload), GLUE. Clustered +
INT4 is the clustered checkpoint quantized, not a separate training. Once every final is kept,
the paper's ablations of the clustered model follow (one seed each, the finals' budget), and a
beyond-paper variant when clustered trails top-k by more than 5%.

A GPU session holds less time than the table needs, so the section works in parts: every
finished run's small raw files (config.json, log.jsonl, reclusters.jsonl, measures.json) are
copied to `keep`/<size>-<tokens per step> (results/paper/runs/paper-32k) as soon as it ends,
and a later call trains only what is missing there. `--models` and `--max_runs` choose what
one call starts. Checkpoints stay in `out_dir`, where a run cut short on the same machine
resumes. Runs take compiled steps by default (`--paper_step`), as every kept run of the
table did; runs whose step is replayed from a CUDA graph trained measurably worse at the paper
size (results/paper/README.md) and are kept apart, in <size>-<tokens>-eager (eager kernels) or
<size>-<tokens>-graphed (compiled kernels).
Does not own: training (train.py), running grids (quality.py), the table (paper_table.py),
the models section's timings.
"""
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import data
from benchmarks.layers import free_memory, peak_mib, train_speed
from benchmarks.quality import ROOT, _pool, routing_stats, run_grid
from checkpoint import load_model
from train import PRESETS, TrainConfig
from train_log import evaluate, peak_flops

MODELS = {"dense": {"moe": "dense"},
          "topk": {"moe": "topk", "balance": "bias", "aux_loss_coef": 0.0},
          "clustered": {"moe": "clustered", "balance": "bias", "aux_loss_coef": 0.0}}
# The paper's ablations of the clustered model, and the beyond-paper variant (G=4: the small size's
# ablations had it ahead of G=8) that runs when clustered trails top-k by more than VARIANT_GAP.
ABLATIONS = {"static": {"cluster_mode": "static"}, "random": {"cluster_mode": "random"},
             "no_compression": {"compress": False}, "flat_routing": {"hierarchical": False}}
VARIANTS = {"G4": {"n_clusters": 4}}
VARIANT_GAP = 0.05
# The regime and budgets of the table (the smoke test shrinks them). Budgets are in tokens, so
# both regimes see the same data: 500 and 2,000 steps of 32K tokens, 2,000 and 8,000 of 8K.
REGIME = dict(lrs=(3e-4, 6e-4, 1e-3), sweep_tokens=500 * 32768, tokens=2000 * 32768, eval_iters=50,
              glue_tasks="cola,sst2,stsb", glue_epochs=2, glue_max_examples=10000)
SEEDS = {"paper": 2, "small": 3}   # final runs per model
WIDEN = 2                          # lrs the sweep may add past an edge of the grid that wins
KEPT_FILES = ("config.json", "log.jsonl", "reclusters.jsonl", "diverged.json", "measures.json")

def regime(cfg) -> dict:
    """REGIME with the steps its token budgets take at cfg.tokens_per_step, and the seeds."""
    r = {**REGIME, "seeds": SEEDS.get(cfg.paper_size, 2), "sweep_iters": REGIME["sweep_tokens"] // cfg.tokens_per_step,
         "iters": REGIME["tokens"] // cfg.tokens_per_step}
    return {**r, "lrs": (3e-4, 1e-3), "sweep_iters": 4, "iters": 6, "eval_iters": 1,
            "glue_epochs": 1, "glue_max_examples": 16} if cfg.smoke else r


def base_config(cfg, device) -> TrainConfig:
    """The size's preset, with grad_accum set for tokens_per_step; tiny under --smoke."""
    if cfg.paper_size not in PRESETS:
        raise ValueError(f"paper_size must be one of {sorted(PRESETS)}, got {cfg.paper_size!r}")
    r, size = regime(cfg), PRESETS[cfg.paper_size]
    if cfg.smoke:
        size = {**size, "n_layer": 1, "n_head": 2, "n_embd": 32, "ffn_hidden": 64, "block_size": 32,
                "n_experts": 8, "n_clusters": 2, "rank": 4, "batch_size": 2, "burn_in": 2,
                "recluster_interval": 2, "warmup_iters": 1}
    micro = size["batch_size"] * size["block_size"]
    if cfg.tokens_per_step % micro and not cfg.smoke:
        raise ValueError(f"tokens_per_step must be a multiple of {micro} (batch {size['batch_size']} x "
                         f"block {size['block_size']}), got {cfg.tokens_per_step}")
    return TrainConfig(**{**size, "preset": cfg.paper_size, "grad_accum": 2 if cfg.smoke else cfg.tokens_per_step // micro,
                          "dataset": cfg.dataset, "data_dir": cfg.data_dir, "eval_iters": r["eval_iters"],
                          "seed": cfg.seed, "sample_tokens": 0, "final_ckpt": "weights",
                          "device": str(device), **step_flags(cfg.paper_step, device)})


STEPS = ("compiled", "graphed", "compiled+graphed")


def step_flags(step: str, device) -> dict:
    """--paper_step -> train.py's compile and cuda_graph (both off on a CPU)."""
    if step not in STEPS:
        raise ValueError(f"paper_step must be one of {', '.join(STEPS)}, got {step!r}")
    cuda = device.type == "cuda"
    return {"compile": cuda and "compiled" in step, "cuda_graph": cuda and "graphed" in step}


def keep_dir(cfg) -> Path:
    """Where this size and regime's runs are kept: `keep`/<size>-<tokens per step>, with
    `-eager` (--paper_step=graphed) or `-graphed` (compiled+graphed) for steps replayed from a
    CUDA graph, which trained apart from compiled ones (results/paper/README.md): the kinds of
    step never share a table."""
    root = Path(cfg.keep) if cfg.keep else Path(cfg.out_dir) / "paper_runs"
    kind = {"compiled": "", "graphed": "-eager", "compiled+graphed": "-graphed"}.get(cfg.paper_step, "")
    return root / f"{cfg.paper_size}-{cfg.tokens_per_step / 1024:g}k{kind}"


def planned(cfg, device, keep: Path) -> list[TrainConfig]:
    """Every run of the table: the sweep (model x lr, one seed), then each model's finals at
    its best sweep lr (only once its sweep is complete in `keep`), then, once every final is
    kept, the ablations at the clustered lr (and the variant, if clustered trails top-k)."""
    r, base, out = regime(cfg), base_config(cfg, device), Path(cfg.out_dir) / "paper" / keep.name

    def run(phase, model, lr, iters, seed):
        name = f"{model}_lr{lr:g}" + (f"_s{seed - cfg.seed}" if phase == "final" else "")
        interval = max(1, iters // 5)  # checkpoints come at evaluations: --ckpt_interval rounds up to one
        ckpt = -(-cfg.ckpt_interval // interval) * interval if cfg.ckpt_interval else iters
        return replace(base, **MODELS[model], lr=lr, min_lr=lr / 10, max_iters=iters, seed=seed,
                       eval_interval=interval, ckpt_interval=ckpt,
                       out_dir=str(out / phase / name))
    runs = [run("sweep", m, lr, r["sweep_iters"], cfg.seed) for m in MODELS for lr in sweep_lrs(keep, m, r["lrs"])]
    best = {model: best_lr(keep, model, r["lrs"]) for model in MODELS}
    finals = [run("final", m, lr, r["iters"], cfg.seed + i) for m, lr in best.items() if lr is not None
              for i in range(r["seeds"])]
    runs += finals
    if len(finals) < len(MODELS) * r["seeds"] or not all(done_in(keep, tc) for tc in finals):
        return runs  # the ablations wait for the main table
    lr, extra = best["clustered"], dict(ABLATIONS)
    ppl = {m: statistics.fmean(_final_ppl(_kept(keep, tc)) for tc in finals if tc.moe == MODELS[m]["moe"])
           for m in ("topk", "clustered")}
    if ppl["clustered"] > (1 + VARIANT_GAP) * ppl["topk"]:
        extra.update(VARIANTS)
    for name, change in extra.items():
        runs.append(replace(run("ablation", "clustered", lr, r["iters"], cfg.seed), **change,
                            out_dir=str(out / "ablation" / f"{name}_lr{lr:g}")))
    return runs


def _kept(keep: Path, tc: TrainConfig) -> Path:
    return keep / Path(tc.out_dir).parent.name / Path(tc.out_dir).name


def _final_ppl(folder: Path) -> float | None:
    """A kept run's last validation perplexity; inf if it diverged; None if not kept."""
    if (folder / "diverged.json").exists():
        return math.inf
    log = folder / "log.jsonl"
    return json.loads(log.read_text().splitlines()[-1])["val_ppl"] if log.exists() else None


def _best(keep: Path, model: str, lrs) -> float | None:
    ppl = {lr: _final_ppl(keep / "sweep" / f"{model}_lr{lr:g}") for lr in lrs}
    return None if None in ppl.values() else min(ppl, key=ppl.get)


def sweep_lrs(keep: Path, model: str, lrs) -> list[float]:
    """A model's sweep: the grid, plus up to WIDEN lrs past whichever edge keeps winning
    (2x past the top, 1/2 past the bottom): a best at the edge is not yet a best. The same
    rule for every model keeps the tuning fair."""
    grid = sorted(lrs)
    for _ in range(WIDEN):
        best = _best(keep, model, grid)
        if best is None or min(grid) < best < max(grid):
            break
        grid = [best / 2, *grid] if best == min(grid) else [*grid, best * 2]
    return grid


def best_lr(keep: Path, model: str, lrs) -> float | None:
    """The lr with the lowest sweep perplexity, once every lr of the model's sweep is kept."""
    grid = sweep_lrs(keep, model, lrs)
    best = _best(keep, model, grid)
    widened = len(grid) - len(lrs) < WIDEN
    return best if best is not None and (min(grid) < best < max(grid) or not widened) else None


# Fields a kept run may differ in from the plan: where it ran and how often it saved. Not
# `compile` or `cuda_graph`: at the paper size, steps replayed from a graph trained measurably
# worse than compiled ones (results/paper/README.md), so how a run stepped is part of it.
PLACE = {"out_dir", "device", "compile_mode", "dataset", "data_dir", "resume", "overwrite",
         "ckpt_interval"}


def done_in(keep: Path, tc: TrainConfig) -> bool:
    """Whether `keep` holds this run finished (and, for a final, measured). A kept run trained
    with other settings than the plan's is an error, not a result to reuse."""
    folder = _kept(keep, tc)
    if (folder / "config.json").exists():
        kept = json.loads((folder / "config.json").read_text())["config"]
        # A field the kept config lacks came later, and its default keeps the old behaviour.
        defaults = asdict(TrainConfig())
        differ = sorted(k for k, v in asdict(tc).items() if k not in PLACE and kept.get(k, defaults[k]) != v)
        if differ:
            raise ValueError(f"{folder} was trained with other settings than this plan ("
                             + ", ".join(f"{k}: kept {kept.get(k, defaults[k])!r}, plan {getattr(tc, k)!r}" for k in differ[:3])
                             + "); move it away to train it again")
    if (folder / "diverged.json").exists():
        return True
    log = folder / "log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1]) if log.exists() else {}
    phase_done = folder.parent.name == "sweep" or (folder / "measures.json").exists()
    return last.get("iter", 0) >= tc.max_iters and phase_done


def measure(cfg, tc: TrainConfig, device) -> dict:
    """What a final checkpoint shows before it is deleted: held-out load CV, inference peak
    memory (bf16 weights), for the clustered model INT4 and INT4 + offload perplexity and
    memory, and GLUE (when cfg.glue_dir is set). An ablation's: held-out load CV and memory."""
    from offload import ClusterOffloader  # inference machinery: only for this measurement
    from quant import quantize_model
    path = Path(tc.out_dir) / "ckpt.pt"
    val = data.load_split(data.prepare(tc.dataset, tc.data_dir, val_split=tc.val_split), "val")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    result = {"heldout_batches": cfg.routing_batches, "infer_batch": [cfg.batch_size, tc.block_size]}
    free_memory(device)
    model, _ = load_model(path, device)
    n_params = sum(p.numel() for p in model.parameters())
    if tc.moe != "dense":
        result["heldout_load_cv"] = routing_stats(model, val, tc, device, cfg.routing_batches)["load_cv"]
    x = torch.randint(0, tc.vocab_size, (cfg.batch_size, tc.block_size), device=device)

    def infer_peak(m) -> float:
        free_memory(device)
        with torch.no_grad():
            m(x)
        return peak_mib(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["val_loss"] = evaluate(model, val, tc, str(device), autocast)
    result["infer_peak_mib"] = infer_peak(model.to(dtype))
    ablation = Path(tc.out_dir).parent.name == "ablation"  # perplexity and load only
    if tc.moe == "clustered" and not ablation:  # INT4 from the float weights, not the bf16 copy
        del model
        model, _ = load_model(path, device)
        quantize_model(model, base_dtype=dtype)
        result["val_loss_int4"] = evaluate(model, val, tc, str(device), autocast)
        result["infer_peak_mib_int4"] = infer_peak(model)
        cache = ClusterOffloader(model, 0, device)
        cache.budget = cfg.offload_clusters * cache.entry_bytes((0, 0))
        result["val_loss_int4_offload"] = evaluate(model, val, tc, str(device), autocast)
        result["infer_peak_mib_int4_offload"] = infer_peak(model)
        del cache
    del model
    free_memory(device)
    if cfg.glue_dir and not ablation:
        result.update(glue_scores(cfg, tc, device, n_params))
    return result


def glue_at_once(device, n_params: int, n_tasks: int) -> int:
    """How many GLUE tasks fine-tune side by side: one fine-tuning is a small load (batches of
    32 x 128 tokens), so as many as the free memory holds (weights, gradients and AdamW's two
    moments: 16 bytes a parameter, and 4 GiB for activations and the process)."""
    if device.type != "cuda":
        return max(1, min(n_tasks, os.cpu_count() or 1))
    need = 16 * n_params + 4 * 2**30
    return max(1, min(n_tasks, torch.cuda.mem_get_info(device)[0] // need))


def glue_scores(cfg, tc: TrainConfig, device, n_params: int) -> dict:
    """GLUE from a final checkpoint: each task fine-tuned by eval_glue.py in its own process
    (glue_<task>.jsonl, .out), side by side as glue_at_once allows. A measure cut short (a
    call's time limit) goes on with the tasks that have no summary yet."""
    r, folder = regime(cfg), Path(tc.out_dir)
    flags = {"ckpt": folder / "ckpt.pt", "data_dir": cfg.glue_dir, "seeds": 1, "seed": tc.seed,
             "epochs": r["glue_epochs"], "device": tc.device, "max_train_examples": r["glue_max_examples"]}

    def out(task) -> Path:
        return folder / f"glue_{task}.jsonl"

    def summary(task) -> dict | None:
        lines = out(task).read_text().splitlines() if out(task).exists() else []
        return next((rec for rec in map(json.loads, lines)
                     if rec.get("summary") and rec["task"] == task), None)

    def start(task):
        args = {**flags, "task": task, "out": out(task)}
        return [ROOT / "eval_glue.py", *[f"--{k}={v}" for k, v in args.items()]], folder / f"glue_{task}.out"
    tasks = r["glue_tasks"].split(",")
    todo = [task for task in tasks if summary(task) is None]
    for task in todo:  # a task cut short starts again
        out(task).unlink(missing_ok=True)
    _pool(todo, start, glue_at_once(device, n_params, len(todo)), "GLUE fine-tuning")
    return {"glue": {task: s["score"]["mean"] for task in tasks if (s := summary(task))},
            "glue_setting": {k: flags[k] for k in ("epochs", "max_train_examples", "seed")}}


def keep_run(cfg, keep: Path, tc: TrainConfig, device) -> None:
    """A run just ended: measure a final checkpoint, copy the small files to `keep`, and
    delete the checkpoint (it is too large to keep, and the disk holds few)."""
    folder, target, began = Path(tc.out_dir), _kept(keep, tc), time.time()
    if done_in(keep, tc):
        return
    if folder.parent.name != "sweep" and not (folder / "diverged.json").exists():
        (folder / "measures.json").write_text(json.dumps(measure(cfg, tc, device), indent=1))
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, target / name)
    (folder / "ckpt.pt").unlink(missing_ok=True)
    print(f"kept: {target} (measured and copied in {time.time() - began:.0f} s)", flush=True)


def train_missing(cfg, device) -> None:
    """Train what `keep` lacks (the sweep, widened where an edge wins, the finals it decides,
    then the ablations), at most cfg.max_runs runs of cfg.models in this call; once every final
    is kept, each model's training speed alone."""
    keep = keep_dir(cfg)
    chosen = cfg.models.split(",") if cfg.models else list(MODELS)
    if set(chosen) - set(MODELS):
        raise ValueError(f"models must name some of {','.join(MODELS)}, got {cfg.models!r}")
    started, previous = 0, None
    while True:  # each round's results may plan more: a widened sweep, then the finals
        todo = [tc for tc in planned(cfg, device, keep) if tc.moe in chosen and not done_in(keep, tc)]
        todo = todo[:max(0, cfg.max_runs - started)] if cfg.max_runs else todo
        if not todo or todo == previous:
            break
        started, previous = started + len(todo), todo
        run_grid(todo, cfg.parallel, done=lambda tc: keep_run(cfg, keep, tc, device))
    finals = [tc for tc in planned(cfg, device, keep) if "/final/" in tc.out_dir]
    if len(finals) == len(MODELS) * regime(cfg)["seeds"] and all(done_in(keep, tc) for tc in finals):
        speed_alone(cfg, keep, device)


def speed_alone(cfg, keep: Path, device) -> None:
    """Each model's train step alone on this GPU (its final config, random tokens, the step as
    --paper_step takes it): tokens/s, MFU, peak MiB; kept in speed.json by device name,
    measured once per GPU."""
    path = keep / "speed.json"
    speeds = json.loads(path.read_text()) if path.exists() else {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if name in speeds:
        return
    speeds[name] = {}
    for tc in (tc for tc in planned(cfg, device, keep) if tc.out_dir.endswith("_s0")):
        speeds[name][tc.moe] = {**train_speed(tc, device, cfg.repeats, cfg.warmup, peak_flops(device)),
                                 "step": cfg.paper_step}
    path.write_text(json.dumps(speeds, indent=1))


