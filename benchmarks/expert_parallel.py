"""Expert parallelism, measured: one training step of top-k and clustered models under torchrun.

    torchrun --nproc_per_node=2 -m benchmarks.expert_parallel --preset=paper   # 2 GPUs, NCCL
    torchrun --nproc_per_node=1 -m benchmarks.expert_parallel --preset=paper   # the one-GPU baseline

Owns: the expert-parallel benchmark. Every rank builds the same random-init model (clustered
ones clustered at once, as bench.py does), ep.parallelize splits each bank over all ranks
(expert-parallel group = the world; one rank: no split, no all-to-all), and times `steps`
training steps (forward, backward, ep.sync_grads, fused AdamW; bf16 autocast on CUDA) on
`batch_size` x block random tokens per rank. Per model, averaged over ranks:
  step_ms              median step time (CUDA events)
  tokens_per_sec       world * batch * block / step time
  a2a_ms               time inside the exchanges of a step (the counts exchange and every
                       all_to_all_single, forward and backward, CUDA events around each),
                       waiting for the slowest rank included
  a2a_wire_ms          the same exchanges without the wait: `steps` further steps in which a
                       1-element all-reduce lines the ranks up before each exchange (CUDA,
                       world > 1); what the bytes cost on the wire
  a2a_mib              activation bytes a rank sends to OTHER ranks per step, forward
                       (dispatch + combine rows, ExpertParallelMoE.bytes_sent); the backward
                       sends the same again; the small gate / id exchanges are not counted
  bytes_vs_topk        a2a_mib over top-k's in the same run
  scaling              tokens/s over `--baseline` (a one-GPU run's tokens/s, by model)
A rank's tokens are its own random draw; routing of a random-init model is not a trained
one's, so the byte counts are a property of the routing rule (one cluster vs k experts)
more than of learned balance.
Does not own: the layer, its exchange or its accounting (ep.py), the models (model.py).
"""
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from benchmarks.layers import build_model
from parallel import ep
from cli import parse_config
from train import PRESETS, TrainConfig


@dataclass
class EPBenchConfig:
    preset: str = ""               # '' (train.py's default model) | paper
    models: str = "topk,clustered"
    batch_size: int = 16           # sequences per rank
    block_size: int = 0            # 0 = the preset's
    steps: int = 20
    warmup: int = 5
    baseline: str = ""             # a one-GPU run's jsonl (this script, nproc 1): scaling column
    out: str = "bench_ep.jsonl"    # rank 0 appends one JSON line per model
    tiny: bool = False             # a 2-layer toy model: a quick CPU check (tests), no measurement


def _exchange_ms() -> float:
    """Milliseconds inside the exchanges ep.COMM_EVENTS recorded (the step has synchronized)."""
    return sum(a.elapsed_time(b) for a, b in ep.COMM_EVENTS)


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def bench_model(cfg: EPBenchConfig, moe: str, rank: int, world: int, device) -> dict:
    tc = TrainConfig(**{**PRESETS.get(cfg.preset, {}), "moe": moe, "dropout": 0.0, "seed": 0,
                        "batch_size": cfg.batch_size})
    tc.block_size = cfg.block_size or tc.block_size
    if cfg.tiny:
        tc.n_layer, tc.n_head, tc.n_embd, tc.ffn_hidden, tc.vocab_size = 2, 2, 32, 64, 512
        tc.n_experts, tc.n_clusters, tc.rank, tc.moe_impl = 8, 2, 4, "loop"
    model = build_model(tc, device)                       # same seed: the same model on every rank
    ep_group, replica_group = ep.expert_parallel_groups(rank, world, world) if world > 1 else (None, None)
    if world > 1:
        ep.parallelize(model, ep_group)
    shards = [p for layer in model.moe_layers() for p in layer.bank.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    tokens = torch.randint(0, tc.vocab_size, (tc.batch_size, tc.block_size + 1), device=device,
                           generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            _, loss, aux = model(x, y)
        (loss + aux).backward()
        if world > 1:
            ep.sync_grads(model, shards, world, replica_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(cfg.warmup):
        step()
    cuda = device.type == "cuda"
    wire_ms = []
    if cuda and world > 1:  # separate steps, so the aligning all-reduces cost the others nothing
        ep.ALIGN_BEFORE_EXCHANGE = True
        for _ in range(cfg.steps):
            ep.COMM_EVENTS = []
            step()
            torch.cuda.synchronize(device)
            wire_ms.append(_exchange_ms())
        ep.ALIGN_BEFORE_EXCHANGE = False
    step_ms, a2a_ms, a2a_bytes = [], [], []
    for _ in range(cfg.steps):
        ep.COMM_EVENTS = []
        if cuda:
            start, end = _events()
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            step_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            step_ms.append(1e3 * (time.perf_counter() - t0))
        a2a_ms.append(_exchange_ms() if cuda else float("nan"))
        a2a_bytes.append(sum(sum(layer.bytes_sent.values()) for layer in model.moe_layers()
                             if isinstance(layer, ep.ExpertParallelMoE)))
    ep.COMM_EVENTS = None
    local = torch.tensor([statistics.median(step_ms), statistics.median(a2a_ms),
                          statistics.fmean(a2a_bytes),
                          statistics.median(wire_ms) if wire_ms else float("nan")],
                         device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(local)
        local /= world
    step_time, comm, sent, wire = local.tolist()
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"model": moe, "preset": cfg.preset or "default", "world": world,
            "batch_per_rank": tc.batch_size, "block_size": tc.block_size, "step_ms": step_time,
            "tokens_per_sec": world * x.numel() / step_time * 1e3, "a2a_ms": comm,
            "a2a_wire_ms": None if math.isnan(wire) else wire,
            "a2a_mib": sent / 2**20, "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


def main(argv) -> list[dict]:
    cfg = parse_config(EPBenchConfig, argv)
    if "RANK" not in os.environ:
        sys.exit("error: run it under torchrun: torchrun --nproc_per_node=N -m benchmarks.expert_parallel")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:  # gloo on CPU: a check that it runs (a2a_ms is not timed there), not a measurement
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rows = [bench_model(cfg, moe, rank, world, device) for moe in cfg.models.split(",")]
    baseline = {}
    if cfg.baseline:
        with open(cfg.baseline) as f:
            baseline = {(r["model"], r["preset"]): r for r in map(json.loads, f) if r["world"] == 1}
    top = next((r for r in rows if r["model"] == "topk"), None)
    for row in rows:
        row["bytes_vs_topk"] = row["a2a_mib"] / top["a2a_mib"] if top and top["a2a_mib"] else None
        one = baseline.get((row["model"], row["preset"]))
        row["scaling"] = row["tokens_per_sec"] / one["tokens_per_sec"] if one else None
    if rank == 0:
        columns = ["model", "preset", "world", "block_size", "step_ms", "tokens_per_sec", "a2a_ms",
                   "a2a_wire_ms", "a2a_mib", "bytes_vs_topk", "scaling"]
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"Expert parallelism, {world} x {rows[0]['device']}, batch {cfg.batch_size} per rank:")
        print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
        for row in rows:
            print("| " + " | ".join(fmt(row[c]) for c in columns) + " |")
        with open(cfg.out, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
