"""Quality runs for bench.py: a declared grid of (variant, seed) trainings and their summary.

Owns: running train.py once per (variant, seed) -- in-process one after another, or as
`parallel` subprocesses sharing one GPU (a small model leaves most of a GPU idle, so quality
runs overlap well; their tokens/s then mean nothing and bench.py takes speed from its
`models` section instead) -- skipping finished runs and resuming those cut short from their
checkpoint, so a bench stopped halfway picks up where it stopped; held-out routing statistics of a trained
checkpoint; mean and spread over seeds, and the noise test every quality claim goes through.
Also the declared grids (GRIDS: the baseline study, the paper's ablations, the routing
question), one dict of TrainConfig overrides per variant.
Does not own: the sections (sections.py) or what is claimed (claims.py), training (train.py).
"""
import ctypes
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

import data
from benchmarks.layers import train_speed
from checkpoint import load_model
from model import GPT
from train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, eval_glue.py


def read_log(tc: TrainConfig) -> list[dict]:
    path = Path(tc.out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def diverged(tc: TrainConfig) -> int | None:
    """The iteration where a run's loss became non-finite (train.py's diverged.json), or None."""
    path = Path(tc.out_dir) / "diverged.json"
    return json.loads(path.read_text())["iter"] if path.exists() else None


def finished(tc: TrainConfig) -> bool:
    """Trained to max_iters, or diverged on the way (a result too: the lr was too high)."""
    log = read_log(tc)
    return diverged(tc) is not None or (bool(log) and log[-1]["iter"] >= tc.max_iters)


def _flags(tc: TrainConfig) -> list[str]:
    return [f"--{f.name}={getattr(tc, f.name)}" for f in fields(tc)]


def _continue(tc: TrainConfig) -> TrainConfig:
    """A run cut short resumes from its last checkpoint (train.py drops what it logged after
    it); one with no checkpoint starts over."""
    folder = Path(tc.out_dir)
    if read_log(tc) and (folder / "ckpt.pt").exists():
        print(f"resume: {tc.out_dir} from iteration {read_log(tc)[-1]['iter']}")
        return replace(tc, resume=True)
    for name in ("log.jsonl", "reclusters.jsonl", "ckpt.pt", "diverged.json"):
        (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return tc


def run_grid(runs: list[TrainConfig], parallel: int = 1, done=None) -> None:
    """Train every config not yet finished, resuming those cut short; `parallel` > 1 runs
    that many train.py processes at once. done(tc), if given, is called as each run ends
    (and for runs already finished), so its results are kept even if a later one fails. A
    failed run is an error that quotes the end of its output."""
    done = done or (lambda tc: None)
    todo = [tc for tc in runs if not finished(tc)]
    for tc in runs:
        if tc not in todo:
            print(f"skip (finished): {tc.out_dir}")
            done(tc)
    if parallel <= 1:
        for tc in todo:
            try:
                train(_continue(tc))
            except FloatingPointError as error:  # diverged: recorded, the grid goes on
                print(f"diverged: {tc.out_dir}: {error}")
            done(tc)
        return
    # Tokenize once, before the workers start, so they do not race on preparing the data.
    for tc in todo:
        data.prepare(tc.dataset, tc.data_dir, val_split=tc.val_split)

    def start(tc):
        tc = _continue(tc)
        return [ROOT / "train.py", *_flags(tc)], Path(tc.out_dir) / "train.out"
    _pool(todo, start, parallel, "training",
          ok=lambda log_path: (log_path.parent / "diverged.json").exists(), done=done)


def _pool(jobs: list, start, parallel: int, what: str, ok=lambda log_path: False,
          done=lambda job: None) -> None:
    """Run `parallel` subprocesses at once, one per job: start(job) -> (script and flags, log
    file); done(job) after each that ends well. A job that fails stops the others (unless
    ok(its log file) says the failure is a result); the error quotes the end of its log. If
    this process stops for any reason (an error, Ctrl-C, SIGTERM, even SIGKILL), the running
    jobs stop too, so none goes on writing where a rerun resumes."""
    todo, active = list(jobs), []
    try:
        while todo or active:
            while todo and len(active) < max(1, parallel):
                job = todo.pop(0)
                argv, log_path = start(job)
                log = open(log_path, "a")
                # Its own session: a Ctrl-C at the terminal or `timeout`'s signal to the group
                # reaches it only through _stop, once, so it ends its step and checkpoints it.
                proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_stop_with_parent)
                active.append((proc, log, log_path, job, time.time()))
                print(f"{what}: started {log_path.parent} ({time.strftime('%H:%M:%S')})", flush=True)
            time.sleep(0.5)
            for item in [a for a in active if a[0].poll() is not None]:
                proc, log, log_path, job, began = item
                log.close()
                active.remove(item)
                print(f"{what}: {log_path.parent} ended (exit {proc.returncode}) after "
                      f"{time.time() - began:.0f} s", flush=True)
                if proc.returncode != 0 and not ok(log_path):
                    raise RuntimeError(f"{what} ({log_path.parent}) failed (exit {proc.returncode}):\n"
                                       f"{log_path.read_text()[-2000:]}")
                done(job)
    finally:
        _stop([(proc, log) for proc, log, *_ in active])


try:  # looked up here, not in the forked child: a child of a threaded process should not dlopen
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # Linux
except (OSError, AttributeError):
    _PRCTL = None


def _stop_with_parent() -> None:
    """In a child, before it starts (Linux): SIGTERM it when the process that started it dies,
    even killed outright, where _stop cannot run; elsewhere nothing."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


def _stop(running: list, grace_s: float = 60.0) -> None:
    """Stop (process, log) pairs with SIGTERM, which our entry points take as Ctrl-C (a run
    checkpoints the step under way and says so in its log); kill any still running after
    grace_s, or at once on a second Ctrl-C or SIGTERM here."""
    for proc, _ in running:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace_s
    try:
        for proc, _ in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc, log in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def summarize(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), and n."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def beyond_noise(a: list[float], b: list[float]) -> bool:
    """Whether mean(a) - mean(b) exceeds two standard errors of the difference. With one
    value per side there is no spread to test against, so every gap counts as a difference
    (and the report says n=1)."""
    sa, sb = summarize(a), summarize(b)
    se = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
    return abs(sa["mean"] - sb["mean"]) > 2 * se


@torch.no_grad()
def routing_stats(model: GPT, val, tc: TrainConfig, device, n_batches: int) -> dict:
    """Expert loads per layer on held-out text and, from the same routing decisions, how
    many devices each token's activation must visit if each cluster's worth of experts sat
    on its own device (top-k: experts round-robin over G devices; clustered: cluster g on
    device g)."""
    layers = model.moe_layers()
    loads = torch.zeros(len(layers), tc.n_experts)
    devices_per_token, captured = [], []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
             for layer in layers]
    gen = torch.Generator().manual_seed(tc.seed + 2)
    model.eval()
    m = tc.n_experts // tc.n_clusters
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
                device_of = routing.expert_idx // m if layer.has_clusters else routing.expert_idx % tc.n_clusters
                distinct = (device_of.sort(-1).values.diff(dim=-1) != 0).sum(-1) + 1
                devices_per_token.append(distinct.float().mean().item())
    for hook in hooks:
        hook.remove()
    fractions = loads / loads.sum(-1, keepdim=True)
    cv = (fractions.std(-1, unbiased=False) / fractions.mean(-1)).mean().item()
    variance = (fractions * tc.n_experts).var(-1, unbiased=False).mean().item()
    return {"load_cv": cv, "load_variance": variance, "loads": loads.tolist(),
            "devices_per_token": sum(devices_per_token) / len(devices_per_token)}


def _glue_summary(path: Path) -> float | None:
    """The task score of a finished fine-tuning's glue.jsonl, or None if it has none."""
    for line in reversed(_lines(path)):
        record = json.loads(line)
        if record.get("summary") and record["task"] != "average":
            return record["score"]["mean"]
    return None


def glue_scores(runs: list[TrainConfig], glue: dict, parallel: int = 1) -> list[float]:
    """Fine-tune each trained run's checkpoint once on one GLUE task (eval_glue.py as a
    subprocess, `parallel` at a time, fine-tuning seed = training seed) -> official scores.
    Resumable: a run whose glue.jsonl holds a summary is not fine-tuned again."""
    def start(tc):
        out = Path(tc.out_dir) / "glue.jsonl"
        out.unlink(missing_ok=True)
        flags = {**glue, "ckpt": Path(tc.out_dir) / "ckpt.pt", "seeds": 1, "seed": tc.seed,
                 "out": out, "device": tc.device}
        return [ROOT / "eval_glue.py", *[f"--{k}={v}" for k, v in flags.items()]], \
            Path(tc.out_dir) / "glue.out"
    alive = [tc for tc in runs if diverged(tc) is None]  # a diverged run has no final checkpoint
    _pool([tc for tc in alive if _glue_summary(Path(tc.out_dir) / "glue.jsonl") is None], start,
          parallel, "GLUE fine-tuning")
    return [_glue_summary(Path(tc.out_dir) / "glue.jsonl") if tc in alive else None for tc in runs]


def run_variants(base: TrainConfig, variants: dict[str, dict], seeds: int, out: Path,
                 parallel: int = 1, glue: dict | None = None, speed: bool = True,
                 heldout_batches: int = 0) -> list[dict]:
    """A declared grid: each named variant (TrainConfig overrides of `base`) trained with
    `seeds` seeds; one row per variant with final val perplexity and load CV as mean and
    std over seeds, tokens, experts moved and reclusters. Finished runs are skipped.
    `glue` (eval_glue.GlueConfig fields, one task): also fine-tune every seed's checkpoint
    once (fine-tuning seed = training seed) and report the task's score as mean and std.
    speed: each variant's train tokens/s (False: not measured). heldout_batches > 0: each
    MoE checkpoint's load CV on that many held-out batches (routing_stats), mean and std."""
    grid = {}
    for name, overrides in variants.items():
        for i in range(seeds):
            slug = "".join(c if c.isalnum() else "_" for c in name)
            grid[name, i] = TrainConfig(**{**base.__dict__, **overrides, "seed": base.seed + i,
                                           "out_dir": str(out / f"{slug}_s{i}")})
    run_grid(list(grid.values()), parallel)
    if glue:
        runs = list(grid.values())
        scores_by_run = {tc.out_dir: v for tc, v in zip(runs, glue_scores(runs, glue, parallel))}
    rows = []
    for name in variants:
        logs = [read_log(grid[name, i]) for i in range(seeds)]
        tc = grid[name, 0]
        row = {"variant": name, "seeds": seeds, "iters": tc.max_iters,
               "tokens": tc.max_iters * tc.batch_size * tc.block_size * tc.grad_accum}
        gone = {i: diverged(grid[name, i]) for i in range(seeds) if diverged(grid[name, i]) is not None}
        if gone:  # summaries are over the seeds that finished; a diverged seed scores inf
            row["diverged"] = [f"seed {i} at iteration {at}" for i, at in gone.items()]
            logs = [log for i, log in enumerate(logs) if i not in gone]
        for key in ("val_ppl", "load_cv", "cluster_load_cv"):
            values = [log[-1][key] for log in logs if key in log[-1]]
            if values:
                s = summarize(values)
                row[key], row[key + "_std"], row[key + "_seeds"] = s["mean"], s["std"], values
        if not logs:
            row["val_ppl"] = math.inf
        row["experts_moved"] = sum(r.get("experts_moved", 0) for log in logs for r in log) / seeds
        events = [json.loads(line) for i in range(seeds)
                  for line in _lines(Path(grid[name, i].out_dir) / "reclusters.jsonl")]
        shocks = [e["shock"] for e in events if e.get("shock") is not None]
        row["reclusters"] = len(events) / seeds
        row["shock"] = statistics.fmean(shocks) if shocks else None          # nats, mean over events
        row["shock_max"] = max(shocks, key=abs) if shocks else None
        kept = [i for i in range(seeds) if i not in gone]
        if speed and logs:
            speeds = [statistics.median([r["tokens_per_sec"] for r in log[1:]] or
                                        [log[-1]["tokens_per_sec"]]) for log in logs]
            # Parallel runs share the GPU, so their logged speed means nothing: time the variant
            # alone instead (same model and batch, random tokens), eager: compiling every
            # variant would cost more than the timing (bench.py's models section compiles).
            row["train_tokens_per_sec"] = statistics.fmean(speeds) if parallel <= 1 else \
                train_speed(replace(tc, compile=False), torch.device(tc.device))["train_tokens_per_sec"]
            row["speed_measured"] = "from the training log" if parallel <= 1 else "alone, eager"
        if heldout_batches and tc.moe != "dense" and kept:
            values = [_heldout_load_cv(grid[name, i], heldout_batches) for i in kept]
            s = summarize(values)
            row["heldout_load_cv"], row["heldout_load_cv_std"] = s["mean"], s["std"]
        if glue and kept:
            scores = [scores_by_run[grid[name, i].out_dir] for i in kept]
            s = summarize(scores)
            row["glue"], row["glue_std"], row["glue_seeds"] = s["mean"], s["std"], scores
        row["val_loss_curve"] = [[r["iter"], r["val_loss"]] for r in logs[0]] if logs else []
        rows.append(row)
    return rows


def _heldout_load_cv(tc: TrainConfig, n_batches: int) -> float:
    """A finished run's load CV over its checkpoint's routing of held-out batches."""
    device = torch.device(tc.device if tc.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(Path(tc.out_dir) / "ckpt.pt", device)
    val = data.load_split(data.prepare(tc.dataset, tc.data_dir, val_split=tc.val_split), "val")
    cv = routing_stats(model, val, tc, device, n_batches)["load_cv"]
    del model
    return cv


def lr_sweep(base: TrainConfig, variants: dict[str, dict], lrs: list[float], sweep_iters: int,
             iters: int, seeds: int, out: Path, parallel: int = 1, heldout_batches: int = 0,
             reference: str = "dense") -> list[dict]:
    """The same learning-rate sweep for every variant, then each at its own best lr.

    Phase 1 ("sweep"): every variant at every lr (min_lr = lr / 10), one seed, sweep_iters.
    Phase 2 ("final"): each variant at the lr with the lowest sweep perplexity, `seeds`
    seeds, `iters` iterations; a final run equal to a sweep run (same lr, seed and budget) is
    that run, not a second one. Final rows say their gap to `reference` and whether it is
    beyond the noise of the seeds (two standard errors). -> sweep rows, then final rows."""
    def at(overrides, lr, n):
        return {**overrides, "lr": lr, "min_lr": lr / 10, "max_iters": n,
                "eval_interval": max(1, n // 5)}
    label = lambda name, lr, n: f"{name}, lr {lr:g}, {n} iters"  # noqa: E731 (names the run folder)
    sweep = {label(name, lr, sweep_iters): at(ov, lr, sweep_iters)
             for name, ov in variants.items() for lr in lrs}
    rows = [{"phase": "sweep", "lr": v["lr"], **r}
            for r, v in zip(run_variants(base, sweep, 1, out, parallel, speed=False), sweep.values())]
    best = {name: min((r for r in rows if r["variant"].startswith(name + ", lr")),
                      key=lambda r: r["val_ppl"])["lr"] for name in variants}
    final = {label(name, best[name], iters): at(ov, best[name], iters) for name, ov in variants.items()}
    finals = [{"phase": "final", "lr": v["lr"], "model": name, **r} for name, r, v in
              zip(variants, run_variants(base, final, seeds, out, parallel, speed=False,
                                         heldout_batches=heldout_batches), final.values())]
    ref = next((r for r in finals if r["model"] == reference), None)
    for row in finals if ref else []:
        row[f"vs_{reference}"] = row["val_ppl"] / ref["val_ppl"] - 1
        row["noise"] = "beyond noise" if beyond_noise(row["val_ppl_seeds"], ref["val_ppl_seeds"]) \
            else "within noise"
    return rows + finals


# Declared grids of TrainConfig overrides, trained `seeds` times each (run_variants).
GRIDS = {
    # The baselines, each tuned alike (bench.py's baseline section sweeps lr for every row):
    # dense of equal active width, top-k with either balancing, and the clustered model with
    # the balancing top-k gets.
    "baseline": {
        "dense": {"moe": "dense"},
        "topk-aux": {"moe": "topk", "balance": "aux"},
        "topk-bias": {"moe": "topk", "balance": "bias", "aux_loss_coef": 0.0},
        "clustered-bias": {"moe": "clustered", "balance": "bias", "aux_loss_coef": 0.0},
    },
    # The paper's ablations (its Table: dynamic vs static clustering, no online clustering, no
    # low-rank compression, no hierarchical routing) next to the two baselines.
    "ablation": {
        "full method": {"moe": "clustered"},
        "static clustering": {"moe": "clustered", "cluster_mode": "static"},
        "random groups": {"moe": "clustered", "cluster_mode": "random"},
        "no compression": {"moe": "clustered", "compress": False},
        "no hierarchical routing": {"moe": "clustered", "hierarchical": False},
        "top-k": {"moe": "topk"}, "dense": {"moe": "dense"},
        # the balance claim on equal terms: both routers without a balance loss
        "full method aux=0": {"moe": "clustered", "aux_loss_coef": 0.0},
        "top-k aux=0": {"moe": "topk", "aux_loss_coef": 0.0},
        # dynamic clustering unlocked: the router-score view alone moves experts (the parameter
        # view holds every grouping in place: docs/design.md), alone and judged in loss units
        "alpha 0 (router scores only)": {"moe": "clustered", "alpha": 0.0},
        "alpha 0, loss rule": {"moe": "clustered", "alpha": 0.0, "regroup_rule": "loss"},
    },
    # Is it the one-cluster restriction or the learned cluster prototypes that costs quality?
    "routing": {
        "full method, cluster scores from experts": {"moe": "clustered", "cluster_scores": "experts"},
        "no compression, cluster scores from experts": {"moe": "clustered", "compress": False,
                                                        "cluster_scores": "experts"},
    },
}
