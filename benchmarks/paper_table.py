"""The paper section's table, read from the kept runs alone (benchmarks/paper.py trains them).

Owns: the rows README's paper table prints: the sweep (model x lr), each model's finals at its
best lr (mean ± std over seeds, gaps to dense and top-k with their noise call), clustered +
INT4 from the same checkpoints, the curve of the gaps against tokens, the ablations, and the
paper's own rows beside ours. Reading never trains: a table of a partial plan shows what is kept.
Does not own: what is planned or trained (paper.py), the claims (claims.py).
"""
import json
import math
import statistics
from pathlib import Path

from benchmarks.paper import ABLATIONS, MODELS, VARIANTS, _final_ppl, best_lr, keep_dir, regime, sweep_lrs
from benchmarks.quality import beyond_noise, summarize

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
    ppl = {m: f["numbers"]["val_ppl"] for m, f in finals.items()}
    for model, row in finals.items():
        row.update(_gaps(model, ppl))
    return rows + ablations(keep, finals, ppl) + curve(finals) + [{"phase": "paper", **row} for row in PAPER_ROWS]


def ablations(keep, finals: dict, ppl: dict[str, list[float]]) -> list[dict]:
    """The kept ablations and variant (one seed each, the clustered finals' lr and budget), with
    their gaps to the clustered finals and to top-k."""
    rows = []
    if "clustered" not in finals:
        return rows
    lr = float(finals["clustered"]["lr"])
    for name in (*ABLATIONS, *VARIANTS):
        for conf, log, measures, events in _runs(keep, "ablation", [f"{name}_lr{lr:g}"]):
            if not log or log[-1]["iter"] < conf["max_iters"]:
                continue
            moved = [e["moved"] for e in events[1:]]
            last, cv = log[-1], measures.get("heldout_load_cv")
            rows.append({"phase": "ablation" if name in ABLATIONS else "variant", "model": f"clustered, {name}",
                         "lr": f"{lr:g}", **_budget(conf, 1),
                         "total_params": f"{last['total_params'] / 1e6:.1f}M",
                         "active_params": f"{last['active_params'] / 1e6:.1f}M",
                         "val_ppl": _final_ppl(keep / "ablation" / f"{name}_lr{lr:g}"),
                         "heldout_load_cv": _stat([cv] if cv is not None else [], 3),
                         "moved_per_recluster": f"{statistics.fmean(moved):.2f}" if moved else "",
                         "infer_peak_mib": _stat([measures["infer_peak_mib"]] if measures else [], 0),
                         **_gaps(name, {**ppl, name: [last["val_ppl"]]}, ("clustered", "topk"))})
    return rows


def _gaps(model: str, ppl: dict[str, list[float]], refs=("dense", "topk")) -> dict:
    """vs_<ref> for each ref: the model's mean perplexity against the ref's, with its noise call."""
    gaps = {}
    for ref in refs:
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
           "active_params", "val_ppl", "vs_dense", "vs_topk", "vs_clustered", "heldout_load_cv",
           "moved_per_recluster", "cola", "sst2", "stsb", "train_tok_s", "train_peak_mib", "infer_peak_mib",
           "val_ppl_offload", "infer_peak_mib_offload", "peak_gb", "load_cv"]


def title(cfg, env) -> str:
    return (f"The paper's comparison at --preset={cfg.paper_size} on {cfg.dataset}, {cfg.tokens_per_step:,} "
            f"tokens a step (kept runs in {keep_dir(cfg)}; this call on {env['device']}):")
