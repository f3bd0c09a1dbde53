"""bench.py's `paper` section: the paper's comparison at the paper's size, built in parts.

Owns: the runs behind README's paper table and the table itself. Dense, top-k and clustered
(both MoE models with bias balancing) at --paper_size (train.PRESETS['paper'] by default), in
a regime of --tokens_per_step (32K by default: batch 32 x 256 x grad_accum 4; 8K shows where
top-k trails dense): the same lr sweep for each model (widened past an edge that wins), then
each at its best lr with seeds. Each final checkpoint is measured before it is deleted: held-out load CV,
inference memory (and, for the clustered model, INT4 and INT4 + offload), GLUE. Clustered +
INT4 is the clustered checkpoint quantized, not a separate training.

A GPU session holds less time than the table needs, so the section works in parts: every
finished run's small raw files (config.json, log.jsonl, reclusters.jsonl, measures.json) are
copied to `keep`/<size>-<tokens per step> (results/paper/runs/paper-32k) as soon as it ends, and a later call trains only what
is missing there. `--models` and `--max_runs` choose what one call starts. Checkpoints stay
in `out_dir`, where a run cut short on the same machine resumes.
Does not own: training (train.py), running grids (quality.py), the models section's timings.
"""
import json
import math
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch

import data
from benchmarks.layers import free_memory, peak_mib, train_speed
from benchmarks.quality import ROOT, _pool, beyond_noise, routing_stats, run_grid, summarize
from cli import load_model
from train import PRESETS, TrainConfig
from train_log import evaluate, peak_flops

MODELS = {"dense": {"moe": "dense"},
          "topk": {"moe": "topk", "balance": "bias", "aux_loss_coef": 0.0},
          "clustered": {"moe": "clustered", "balance": "bias", "aux_loss_coef": 0.0}}
# The regime and budgets of the table (the smoke test shrinks them). Budgets are in tokens, so
# both regimes see the same data: 500 and 2,000 steps of 32K tokens, 2,000 and 8,000 of 8K.
REGIME = dict(lrs=(3e-4, 6e-4, 1e-3), sweep_tokens=500 * 32768, tokens=2000 * 32768, eval_iters=50,
              glue_tasks="cola,sst2,stsb", glue_epochs=2, glue_max_examples=10000)
SEEDS = {"paper": 2, "small": 3}   # final runs per model
WIDEN = 2                          # lrs the sweep may add past an edge of the grid that wins
KEPT_FILES = ("config.json", "log.jsonl", "reclusters.jsonl", "diverged.json", "measures.json")
# The paper's own figures (../shared/paper.md: its WikiText-103 setting, 2 x A100).
PAPER_ROWS = [
    {"model": "paper: Switch top-2", "total_params": "875M", "val_ppl": "24.5",
     "train_tok_s": "7.2k", "peak_gb": "33.1", "load_cv": "0.36"},
    {"model": "paper: clustered", "total_params": "188M", "val_ppl": "26.8",
     "train_tok_s": "8.5k", "peak_gb": "19.2", "load_cv": "0.12"},
    {"model": "paper: clustered + INT4", "total_params": "188M", "val_ppl": "27.5",
     "train_tok_s": "8.8k", "peak_gb": "15.7 (16.5 offload)", "load_cv": ""},
    {"model": "paper: dense", "total_params": "", "val_ppl": "", "train_tok_s": "",
     "peak_gb": "15.4", "load_cv": ""},
]


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
                          "device": str(device), "compile": device.type == "cuda"})


def keep_dir(cfg) -> Path:
    """Where this size and regime's runs are kept: `keep`/<size>-<tokens per step>."""
    root = Path(cfg.keep) if cfg.keep else Path(cfg.out_dir) / "paper_runs"
    return root / f"{cfg.paper_size}-{cfg.tokens_per_step / 1024:g}k"


def planned(cfg, device, keep: Path) -> list[TrainConfig]:
    """Every run of the table: the sweep (model x lr, one seed), then each model's finals at
    its best sweep lr (only once its sweep is complete in `keep`)."""
    r, base, out = regime(cfg), base_config(cfg, device), Path(cfg.out_dir) / "paper" / keep.name

    def run(phase, model, lr, iters, seed):
        name = f"{model}_lr{lr:g}" + (f"_s{seed - cfg.seed}" if phase == "final" else "")
        interval = max(1, iters // 5)
        return replace(base, **MODELS[model], lr=lr, min_lr=lr / 10, max_iters=iters, seed=seed,
                       eval_interval=interval, ckpt_interval=cfg.ckpt_interval or iters,
                       out_dir=str(out / phase / name))
    runs = [run("sweep", m, lr, r["sweep_iters"], cfg.seed) for m in MODELS for lr in sweep_lrs(keep, m, r["lrs"])]
    for model in MODELS:
        lr = best_lr(keep, model, r["lrs"])
        if lr is not None:
            runs += [run("final", model, lr, r["iters"], cfg.seed + i) for i in range(r["seeds"])]
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


# Fields a kept run may differ in from the plan: where and how fast it ran, how often it saved.
PLACE = {"out_dir", "device", "compile", "compile_mode", "cuda_graph", "dataset", "data_dir", "resume",
         "overwrite", "ckpt_interval"}


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
    phase_done = "final" not in tc.out_dir or (folder / "measures.json").exists()
    return last.get("iter", 0) >= tc.max_iters and phase_done


def measure(cfg, tc: TrainConfig, device) -> dict:
    """What a final checkpoint shows before it is deleted: held-out load CV, inference peak
    memory (bf16 weights), for the clustered model INT4 and INT4 + offload perplexity and
    memory, and GLUE (when cfg.glue_dir is set)."""
    from offload import ClusterOffloader  # inference machinery: only for this measurement
    from quant import quantize_model
    r, path = regime(cfg), Path(tc.out_dir) / "ckpt.pt"
    val = data.load_split(data.prepare(tc.dataset, tc.data_dir, val_split=tc.val_split), "val")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    result = {"heldout_batches": cfg.routing_batches, "infer_batch": [cfg.batch_size, tc.block_size]}
    free_memory(device)
    model, _ = load_model(path, device)
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
    if tc.moe == "clustered":  # INT4 from the float weights, not from the bf16 copy just timed
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
    if cfg.glue_dir:
        out = Path(tc.out_dir) / "glue.jsonl"
        flags = {"ckpt": path, "task": r["glue_tasks"], "data_dir": cfg.glue_dir, "seeds": 1,
                 "seed": tc.seed, "epochs": r["glue_epochs"], "out": out, "device": tc.device,
                 "max_train_examples": r["glue_max_examples"]}
        out.unlink(missing_ok=True)
        _pool([None], lambda _: ([ROOT / "eval_glue.py", *[f"--{k}={v}" for k, v in flags.items()]],
                                 Path(tc.out_dir) / "glue.out"), 1, "GLUE fine-tuning")
        result["glue"] = {rec["task"]: rec["score"]["mean"] for rec in map(json.loads, out.read_text().splitlines())
                          if rec.get("summary") and rec["task"] != "average"}
        result["glue_setting"] = {k: flags[k] for k in ("epochs", "max_train_examples", "seed")}
    return result


def keep_run(cfg, keep: Path, tc: TrainConfig, device) -> None:
    """A run just ended: measure a final checkpoint, copy the small files to `keep`, and
    delete the checkpoint (it is too large to keep, and the disk holds few)."""
    folder, target = Path(tc.out_dir), _kept(keep, tc)
    if done_in(keep, tc):
        return
    if "final" in str(folder.parent.name) and not (folder / "diverged.json").exists():
        (folder / "measures.json").write_text(json.dumps(measure(cfg, tc, device), indent=1))
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, target / name)
    (folder / "ckpt.pt").unlink(missing_ok=True)
    print(f"kept: {target}")


def bench_paper(cfg, device, out: Path) -> dict:
    """Train what `keep` lacks (the sweep, widened where an edge wins, then the finals it
    decides), at most cfg.max_runs runs of cfg.models in this call; then, once every final is kept, each
    model's training speed alone; -> the table's rows from everything kept."""
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
    return table(cfg)


def speed_alone(cfg, keep: Path, device) -> None:
    """Each model's train step alone on this GPU (its final config, random tokens, compiled on
    CUDA): tokens/s, MFU, peak MiB; kept in speed.json by device name, measured once per GPU."""
    path = keep / "speed.json"
    speeds = json.loads(path.read_text()) if path.exists() else {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if name in speeds:
        return
    speeds[name] = {}
    for tc in (tc for tc in planned(cfg, device, keep) if tc.out_dir.endswith("_s0")):
        speeds[name][tc.moe] = train_speed(tc, device, cfg.repeats, cfg.warmup, peak_flops(device))
    path.write_text(json.dumps(speeds, indent=1))


def _runs(keep: Path, phase: str, names: list[str]) -> list[tuple[dict, list[dict], dict, list[dict]]]:
    """The kept runs of a phase, by name: (config, log, measures, recluster events)."""
    found = []
    for folder in (keep / phase / name for name in names):
        if not (folder / "config.json").exists():
            continue
        read = lambda name: (folder / name).read_text().splitlines() if (folder / name).exists() else []
        found.append((json.loads((folder / "config.json").read_text())["config"],
                      [json.loads(line) for line in read("log.jsonl")],
                      json.loads("".join(read("measures.json")) or "{}"),
                      [json.loads(line) for line in read("reclusters.jsonl")]))
    return found


def _stat(values: list[float], digits: int = 1) -> str:
    values = [v for v in values if math.isfinite(v)]  # CPU memory figures are nan
    if not values:
        return ""
    s = summarize(values)
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def _budget(conf: dict, seeds: int) -> dict:
    step = conf["batch_size"] * conf["block_size"] * conf["grad_accum"]
    return {"tokens_per_step": step, "steps": conf["max_iters"], "seeds": seeds,
            "tokens": f"{step * conf['max_iters'] / 1e6:.1f}M"}


def _final_row(model: str, lr: float, runs: list, speeds: dict, tasks: list[str]) -> dict:
    """One model's finals -> its table row; `numbers` holds the raw values claims are made from."""
    logs, measures = [run[1] for run in runs], [run[2] for run in runs]
    events = [e for run in runs for e in run[3][1:]]  # after the first clustering
    speed = {gpu: s[model] for gpu, s in speeds.items() if model in s}
    numbers = {"val_ppl": [log[-1]["val_ppl"] for log in logs], "total_params": logs[0][-1]["total_params"],
               "active_params": logs[0][-1]["active_params"], "speed": speed,
               **{key: [m[key] for m in measures if key in m] for key in
                  ("heldout_load_cv", "infer_peak_mib", "val_loss", "val_loss_int4", "val_loss_int4_offload",
                   "infer_peak_mib_int4", "infer_peak_mib_int4_offload")},
               "glue": {task: [m["glue"][task] for m in measures if task in m.get("glue", {})] for task in tasks}}
    row = {"phase": "final", "model": model, "lr": f"{lr:g}", **_budget(runs[0][0], len(runs)),
           "total_params": f"{numbers['total_params'] / 1e6:.1f}M",
           "active_params": f"{numbers['active_params'] / 1e6:.1f}M", "val_ppl": _stat(numbers["val_ppl"]),
           "heldout_load_cv": _stat(numbers["heldout_load_cv"], 3),
           "moved_per_recluster": f"{statistics.fmean(e['moved'] for e in events):.2f}" if events else "",
           "infer_peak_mib": _stat(numbers["infer_peak_mib"], 0),
           "train_tok_s": "; ".join(f"{s['train_tokens_per_sec'] / 1e3:.0f}k ({gpu})" for gpu, s in speed.items())
           or "not yet measured",
           "train_peak_mib": "; ".join(f"{s['train_peak_mib']:.0f} ({gpu})" for gpu, s in speed.items()),
           **{task: _stat([100 * v for v in numbers["glue"][task]]) or "not yet run" for task in tasks},
           "numbers": numbers, "logs": logs}
    return row


def table(cfg) -> list[dict]:
    """Rows from everything kept: the sweep (model x lr), then one row per model at its best lr
    (mean ± std over the seeds kept, gaps with their noise call), clustered + INT4 from the same
    checkpoints, and the paper's own rows."""
    r, rows, keep = regime(cfg), [], keep_dir(cfg)
    speeds = json.loads((keep / "speed.json").read_text()) if (keep / "speed.json").exists() else {}
    for model in MODELS:
        lrs = sweep_lrs(keep, model, r["lrs"])
        for lr, run in zip(lrs, _runs(keep, "sweep", [f"{model}_lr{lr:g}" for lr in lrs])):
            rows.append({"phase": "sweep", "model": model, "lr": f"{lr:g}", **_budget(run[0], 1),
                         "val_ppl": _final_ppl(keep / "sweep" / f"{model}_lr{lr:g}")})
    finals = {}
    for model in MODELS:
        lr = best_lr(keep, model, r["lrs"])
        names = [f"{model}_lr{lr:g}_s{i}" for i in range(r["seeds"])] if lr is not None else []
        runs = [run for run in _runs(keep, "final", names) if run[1] and run[1][-1]["iter"] >= run[0]["max_iters"]]
        if runs:
            finals[model] = _final_row(model, lr, runs, speeds, r["glue_tasks"].split(","))
            rows.append(finals[model])
    clustered = finals.get("clustered", {}).get("numbers", {})
    if clustered and len(clustered["val_loss_int4"]) == len(clustered["val_ppl"]):
        rows.append({**{k: finals["clustered"][k] for k in ("phase", "lr", "tokens_per_step", "steps", "tokens",
                                                           "seeds", "total_params", "active_params")},
                     "model": "clustered + INT4 (same checkpoints)",
                     "val_ppl": _stat([math.exp(v) for v in clustered["val_loss_int4"]]),
                     "val_ppl_offload": _stat([math.exp(v) for v in clustered["val_loss_int4_offload"]]),
                     "infer_peak_mib": _stat(clustered["infer_peak_mib_int4"], 0),
                     "infer_peak_mib_offload": _stat(clustered["infer_peak_mib_int4_offload"], 0)})
    for model, row in finals.items():
        row.update(_gaps(model, {m: f["numbers"]["val_ppl"] for m, f in finals.items()}))
    return rows + curve(finals) + [{"phase": "paper", **row} for row in PAPER_ROWS]


def _gaps(model: str, ppl: dict[str, list[float]]) -> dict:
    """vs_dense, vs_topk: the model's mean perplexity against theirs, with its noise call."""
    gaps = {}
    for ref in ("dense", "topk"):
        if ref in ppl and model != ref:
            a, b = ppl[model], ppl[ref]
            noise = "n=1" if min(len(a), len(b)) == 1 else ("beyond noise" if beyond_noise(a, b) else "within noise")
            gaps[f"vs_{ref}"] = f"{statistics.fmean(a) / statistics.fmean(b) - 1:+.1%} ({noise})"
    return gaps


def curve(finals: dict) -> list[dict]:
    """The finals' gaps against tokens: each model's perplexity at every evaluation its seeds
    share (mean ± std) with the final rows' gaps: where one overtakes, whether a gap still closes."""
    at = {}  # model -> {iter: [ppl per seed]}
    for model, row in finals.items():
        logs = row["logs"]
        shared = set.intersection(*({e["iter"] for e in log} for log in logs))
        at[model] = {i: [next(e["val_ppl"] for e in log if e["iter"] == i) for log in logs] for i in sorted(shared)}
    rows = []
    for model, points in at.items():
        for i, ppl in points.items():
            others = {m: p[i] for m, p in at.items() if i in p}
            rows.append({"phase": "curve", "model": model, "lr": finals[model]["lr"],
                         "tokens_per_step": finals[model]["tokens_per_step"], "steps": i,
                         "tokens": f"{i * finals[model]['tokens_per_step'] / 1e6:.1f}M", "seeds": len(ppl),
                         "val_ppl": _stat(ppl), **_gaps(model, others)})
    return rows


COLUMNS = ["phase", "model", "lr", "tokens_per_step", "steps", "tokens", "seeds", "total_params",
           "active_params", "val_ppl", "vs_dense", "vs_topk", "heldout_load_cv", "moved_per_recluster",
           "cola", "sst2", "stsb", "train_tok_s", "train_peak_mib", "infer_peak_mib", "val_ppl_offload",
           "infer_peak_mib_offload", "peak_gb", "load_cv"]


def title(cfg, env) -> str:
    return (f"The paper's comparison at --preset={cfg.paper_size} on {cfg.dataset}, {cfg.tokens_per_step:,} "
            f"tokens a step (kept runs in {keep_dir(cfg)}; this call on {env['device']}):")
