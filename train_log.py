"""What one eval interval of train.py records: the validation loss, tokens/s, model FLOPs
utilization, load balance, parameter counts.

Owns: `evaluate` (mean LM loss on fixed val batches; `val_losses` per batch), the bf16 peak table and `peak_flops`,
`Interval` (what the loop accumulates between two evals) and `close_interval` (the
log.jsonl record). Does not own: the loop, checkpoints or the schedule (train.py).
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
from router import load_cv


@torch.no_grad()
def val_losses(model, val, cfg, device, autocast, iters: int | None = None) -> torch.Tensor:
    """LM loss of each of the same val batches every time (fixed generator): the first
    `iters` (default eval_iters) of one fixed sequence -> (iters,)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters if iters is None else iters):
        x, y = data.get_batch(val, cfg.batch_size, cfg.block_size, device, gen)
        with autocast:
            losses.append(model(x, y)[1])
    model.train()
    return torch.stack(losses)


def evaluate(model, val, cfg, device, autocast, iters: int | None = None) -> float:
    """Mean LM loss on the fixed val batches (val_losses)."""
    return val_losses(model, val, cfg, device, autocast, iters).mean().item()


# bf16 dense tensor-core peaks (FLOP/s), matched by substring of the device name, first hit
# wins; model FLOPs utilization is reported only for these.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12))


def peak_flops(device) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


@dataclass
class Interval:
    """What the loop accumulates between two evals (every rank); reset() when one closes."""
    loss_sum: torch.Tensor                 # () summed LM loss of the interval's steps
    loads: list[torch.Tensor]              # per MoE layer, (E,) token-slot counts
    cluster_loads: list[torch.Tensor]      # per MoE layer, (G,) token counts
    steps: int = 0
    moved: int = 0                         # experts that changed cluster at reclusters
    recluster_s: float = 0.0               # seconds spent reclustering (inside the timing)
    paused_s: float = 0.0                  # measurement inside the interval (left out of the timing)
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, layers, device) -> "Interval":
        return cls(torch.zeros((), device=device), [torch.zeros_like(l.expert_counts) for l in layers],
                   [torch.zeros_like(l.cluster_counts) for l in layers])

    def add_loads(self, layers):
        """One step's loads (every micro-batch of it: moe.MoE's step_counts), on the device."""
        for acc, cacc, layer in zip(self.loads, self.cluster_loads, layers):
            acc += layer.step_counts
            cacc += layer.step_cluster_counts

    def reset_loads(self):
        """After a recluster the expert slots were permuted: count afresh."""
        for acc in self.loads + self.cluster_loads:
            acc.zero_()

    def state(self) -> dict:
        """What a checkpoint taken inside the interval keeps, so the resumed run logs what the
        unbroken one would: the sums, the counts and the time spent so far."""
        return {"loss_sum": self.loss_sum.detach().cpu(), "loads": [a.cpu() for a in self.loads],
                "cluster_loads": [a.cpu() for a in self.cluster_loads], "steps": self.steps,
                "moved": self.moved, "recluster_s": self.recluster_s,
                "elapsed_s": time.perf_counter() - self.t0 - self.paused_s}

    def restore(self, state: dict):
        """Put back state(), in place: a captured CUDA graph adds into these very tensors."""
        for acc, saved in zip([self.loss_sum, *self.loads, *self.cluster_loads],
                              [state["loss_sum"], *state["loads"], *state["cluster_loads"]]):
            acc.copy_(saved)
        self.steps, self.moved, self.recluster_s = state["steps"], state["moved"], state["recluster_s"]
        self.paused_s, self.t0 = 0.0, time.perf_counter() - state["elapsed_s"]

    def reset(self):
        self.reset_loads()
        self.loss_sum.zero_()
        self.steps, self.moved, self.recluster_s, self.paused_s = 0, 0, 0.0, 0.0
        self.t0 = time.perf_counter()


def close_interval(model, cfg, it: int, lr: float, train_loss: float,
                   interval: Interval, val_tokens, meta: dict, world: int, device, autocast) -> dict:
    """Rank 0 only: evaluate and build the interval's log.jsonl record (tokens/s, MFU, load
    CV, parameter counts). Timing stops before the evaluation."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - interval.t0 - interval.paused_s
    val_loss = evaluate(model, val_tokens, cfg, device, autocast)
    layers = model.moe_layers()
    tokens_per_sec = interval.steps * cfg.batch_size * cfg.block_size * cfg.grad_accum * world / elapsed
    peak = peak_flops(device)
    record = {"iter": it + 1, "time": round(time.time(), 1), "train_loss": train_loss,
              "val_loss": val_loss,
              "val_ppl": math.exp(min(val_loss, 50)), "lr": lr, "tokens_per_sec": tokens_per_sec,
              "mfu": model.flops_per_token() * tokens_per_sec / world / peak if peak else None,
              "recluster_s": interval.recluster_s,  # inside elapsed (and so in tokens_per_sec)
              "load_cv": sum(load_cv(a).item() for a in interval.loads) / max(1, len(layers)),
              **model.param_counts(),
              "n_reclusters": int(layers[0].n_reclusters) if layers else 0,
              "experts_moved": interval.moved, "val_split": meta.get("val_split")}
    if layers and layers[0].has_clusters:
        record["cluster_load_cv"] = sum(load_cv(a).item() for a in interval.cluster_loads) / len(layers)
    return record


def trim_logs(out_dir: Path, done: int) -> None:
    """On resume from iteration `done`: drop log.jsonl and reclusters.jsonl lines past it
    (written after the checkpoint by a run that then stopped), so each iteration is logged once."""
    # log.jsonl counts iterations done (1-based); a recluster event is logged at the start of
    # iteration `iter` (0-based), so the resumed run redoes the one at `done`.
    for name, last in (("log.jsonl", done), ("reclusters.jsonl", done - 1)):
        path = Path(out_dir) / name
        if path.exists():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["iter"] <= last]
            if len(kept) < len(lines):  # via a temp file: Ctrl-C here never truncates the log
                path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
                path.with_suffix(".tmp").replace(path)


def resume_line(ckpt: dict, cfg) -> str:
    """What a resumed run continues, and which of its settings the flags changed."""
    changed = [f"{name} {old} -> {getattr(cfg, name)}" for name, old in ckpt["config"].items()
               if name not in ("resume", "overwrite") and old != getattr(cfg, name, old)]
    return (f"resume: {cfg.out_dir}/ckpt.pt from iteration {ckpt['iter']}; "
            + (f"changed: {', '.join(changed)}" if changed else "no setting changed"))


def startup_summary(cfg, model, meta: dict, device, dtype: str, world: int = 1,
                    resumed: dict | None = None) -> str:
    """What a run is about to do, in a few lines: model kind and size, data, token budget,
    device, output folder and checkpoint size; first, for a resumed run, its checkpoint and
    which settings the flags changed."""
    counts = model.param_counts()
    kind = {"dense": "dense GPT", "topk": f"top-{cfg.top_k} MoE, E={cfg.n_experts}",
            "clustered": f"clustered MoE, E={cfg.n_experts} in G={cfg.n_clusters}, rank {cfg.rank}, "
                         f"top-{cfg.top_k}"}[cfg.moe]
    if cfg.moe != "dense":
        kind += f", balance={cfg.balance}"
    params = sum(p.numel() for p in model.parameters())
    # fp32 weights plus AdamW's two moments; what the final checkpoint keeps if weights only.
    full, weights = 3 * 4 * params, 4 * params
    tokens = cfg.max_iters * cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    split = meta.get("tokens", {})
    step = ", ".join([dtype] + ["compiled"] * cfg.compile + ["one CUDA graph a step"] * cfg.cuda_graph)
    data_line = (f"data:   {cfg.dataset} ({split.get('train', 0):,} train / {split.get('val', 0):,} "
                 f"val tokens, val split: {meta.get('val_split')})")
    lines = [
        f"model:  {kind}; {cfg.n_layer} layers, d={cfg.n_embd}; {counts['total_params'] / 1e6:.1f}M "
        f"parameters, {counts['active_params'] / 1e6:.1f}M active per token",
        data_line,
        f"train:  {cfg.max_iters:,} iterations x {cfg.batch_size * cfg.grad_accum * world} x "
        f"{cfg.block_size} = {tokens / 1e6:.1f}M tokens, lr {cfg.lr:g}, on {device} ({step})",
        f"output: {cfg.out_dir}/ (checkpoint about {full / 2**20:,.0f} MiB with optimizer state"
        + (f", the last one {weights / 2**20:,.0f} MiB" if cfg.final_ckpt == "weights" else "")
        + (", smaller once clustered" if cfg.moe == "clustered" else "") + ")",
    ]
    return "\n".join(([resume_line(resumed, cfg)] if resumed else []) + lines)


def write_config(out_dir: Path, cfg, meta: dict) -> None:
    """config.json: what this run is, beside its logs (flags, data, split, token counts); a
    resumed run rewrites it with its config and adds its command line to `resumed`."""
    path = Path(out_dir) / "config.json"
    first = json.loads(path.read_text()) if cfg.resume and path.exists() else {}
    path.write_text(json.dumps(
        {"argv": first.get("argv", sys.argv),
         "resumed": first.get("resumed", []) + ([sys.argv] if cfg.resume else []),
         "config": asdict(cfg), "data": meta.get("sources", cfg.dataset),
         "val_split": meta.get("val_split"), "tokens": meta.get("tokens")}, indent=1))


def log_record(out_dir: Path, record: dict) -> None:
    """An eval interval's record: one line of log.jsonl, one printed line."""
    with open(Path(out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(f"iter {record['iter']}: train {record['train_loss']:.4f} val "
               f"{record['val_loss']:.4f} ppl {record['val_ppl']:.1f} tok/s "
               f"{record['tokens_per_sec']:.0f} load_cv {record['load_cv']:.3f}")


def log_recluster(out_dir: Path, model, it: int, result, before, after) -> None:
    """A recluster event: one line of reclusters.jsonl (experts moved, per-layer gain and
    skip, seconds, the shock, and membership[layer][expert] = the cluster of each original
    expert), one printed line."""
    layers, cfg = model.moe_layers(), model.cfg
    m = cfg.n_experts // cfg.n_clusters
    membership = [[0] * cfg.n_experts for _ in layers]
    for row, layer in zip(membership, layers):
        for slot, expert in enumerate(layer.expert_ids.tolist()):
            row[expert] = slot // m
    with open(Path(out_dir) / "reclusters.jsonl", "a") as f:
        f.write(json.dumps({"iter": it, "moved": result.moved, "gain": result.gain,
                            "skipped": result.skipped, "rank": result.rank, "of": result.of,
                            "margin": result.margin, "rule": result.rule, "seconds": result.seconds,
                            "val_loss_before": before, "val_loss_after": after,
                            "shock": None if before is None else after - before,
                            "membership": membership}) + "\n")
    tqdm.write(recluster_line(it, result, before, after, cfg.n_experts, cfg.n_clusters))


def diverged(out_dir: Path, it: int, loss: float, master: bool) -> FloatingPointError:
    """A non-finite loss: recorded as diverged.json (grids count it a result, not a crash),
    -> the error that stops the run; the last good checkpoint stays."""
    if master:
        (Path(out_dir) / "diverged.json").write_text(json.dumps({"iter": it, "loss": str(loss)}))
    return FloatingPointError(f"non-finite loss {loss} at iteration {it}; the last good "
                              f"checkpoint in {out_dir} is kept")


def _span(values, fmt: str = "{:.3f}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)} to {fmt.format(high)}"


def recluster_line(it: int, result, before, after, n_experts: int, n_clusters: int) -> str:
    """One printed line per recluster event, saying why each layer kept or changed its
    grouping in numbers a reader can check (reclusters.jsonl holds them per layer)."""
    layers, shock = len(result.gain), "" if before is None else f"; val loss {before:.3f} -> {after:.3f}"
    if result.created:
        return (f"first clustering at iteration {it}: {n_experts} experts grouped into {n_clusters} "
                f"clusters in {layers} layers (mean similarity {_span(result.gain, '{:+.3f}')} over a random "
                f"grouping; the grouping ranks {_span(result.rank, '{}')} of {max(result.of)}){shock}, "
                f"{result.seconds:.1f} s")
    kept = [i for i, skipped in enumerate(result.skipped) if skipped]
    changed = [i for i in range(layers) if i not in kept]
    why = []
    if changed:
        why.append(f"{len(changed)} of {layers} layers regrouped (similarity gain "
                   f"{_span([result.gain[i] for i in changed])} >= min_gain)")
    best = [i for i in kept if result.rank[i] == 1]
    if best:
        margins = [result.margin[i] for i in best if result.margin[i] is not None]
        why.append(f"{len(best)} kept a grouping that ranks first of {max(result.of[i] for i in best)}"
                   + (f" (by {_span(margins)})" if margins else ""))
    short = [i for i in kept if result.rank[i] > 1 and result.gain[i] > 0]
    if short:
        why.append(f"{len(short)} kept one that k-means beat by less than min_gain "
                   f"(gain {_span([result.gain[i] for i in short])})")
    missed = [i for i in kept if result.rank[i] > 1 and result.gain[i] <= 0]
    if missed:
        why.append(f"{len(missed)} kept one k-means found nothing better than (it ranks "
                   f"{_span([result.rank[i] for i in missed], '{}')} of {max(result.of)})")
    rule = result.rule
    if rule:
        why.append(f"loss rule: val loss {rule['rise']:+.3f} +- {rule['noise']:.3f} nats, "
                   + ("within noise: kept" if rule["kept"] else
                      f"beyond noise: taken back ({rule['proposed_moved']} moves)"))
    return (f"recluster at iteration {it}: {result.moved} experts moved; {'; '.join(why)}{shock}, "
            f"{result.seconds:.1f} s")


@torch.no_grad()
def sample_text(model, cfg, device, autocast, prompt: str = "\n") -> str:
    """A short sample from the trained model (temperature 0.8, top 200 tokens, seeded)."""
    from generate import generate   # generation is sample.py's; only this taste is train.py's
    enc = data.get_encoding()
    idx = torch.tensor([enc.encode(prompt)], device=device)
    model.eval()
    with autocast:
        out = generate(model, idx, cfg.sample_tokens, 0.8, 200,
                       torch.Generator(device=device).manual_seed(cfg.seed))
    model.train()
    text = enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])
    return f"sample ({cfg.sample_tokens} tokens):\n{text.strip()}\n"
