"""Train a dense, top-k MoE, or clustered MoE GPT.  `python train.py --help` lists the flags.

Owns: TrainConfig and its `--field=value` parsing, the training loop (AdamW, warmup +
cosine LR, clipping, accumulation, bf16 autocast, optional torch.compile, DDP under
torchrun), evaluation and log.jsonl, atomic checkpoints and exact resume, and the
reclustering schedule (train as top-k for `warmup_iters`, then cluster + compress, then
recluster every `recluster_interval`, rebuilding the optimizer with surviving state).
Also the small helpers other entry points reuse: `parse_config`, `load_model`.
"""
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from cluster import recluster_model
from model import GPT, GPTConfig
from router import load_cv


@dataclass
class TrainConfig:
    # data and I/O
    dataset: str = "shakespeare"   # shakespeare | wikitext103 | path to a folder/.zip of .txt
    data_dir: str = "data"
    out_dir: str = "out"
    resume: bool = False
    seed: int = 1337
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = False
    # model (see model.GPTConfig)
    moe: str = "clustered"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.1
    ffn_hidden: int = 768
    n_experts: int = 32
    top_k: int = 2
    n_clusters: int = 8
    rank: int = 16
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    capacity_factor: float = 0.0
    moe_impl: str = "auto"
    # clustering schedule (moe=clustered)
    warmup_iters: int = 200        # train as top-k MoE this long, then cluster + compress
    recluster_interval: int = 200
    alpha: float = 0.5             # weight of parameter vs activation similarity
    # optimization
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup: int = 50
    lr_decay_iters: int = 0        # 0 = max_iters; set it to stop early yet keep the schedule
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10

    def model_config(self) -> GPTConfig:
        names = {f.name for f in fields(GPTConfig)}
        return GPTConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def validate(self):
        self.model_config().validate()
        rules = [
            (self.max_iters >= 1, "max_iters must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.eval_interval >= 1 and self.eval_iters >= 1 and self.log_interval >= 1,
             "eval_interval, eval_iters and log_interval must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.warmup_iters >= 0 and self.recluster_interval >= 1,
             "warmup_iters must be >= 0 and recluster_interval >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
            (self.dataset in ("shakespeare", "wikitext103") or Path(self.dataset).exists(),
             f"dataset {self.dataset!r} is not shakespeare|wikitext103 nor an existing path"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"bad train config: {message}")
        if self.resume and not (Path(self.out_dir) / "ckpt.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {Path(self.out_dir) / 'ckpt.pt'}")
        return self


def parse_config(cls, argv: list[str]):
    """`--field=value` overrides for any dataclass; unknown keys list the valid ones."""
    valid = {f.name: f for f in fields(cls)}
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"usage: --field=value, fields and defaults:\n" + "\n".join(
                f"  --{f.name}={f.default}" for f in fields(cls)))
            sys.exit(0)
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in valid:
            raise ValueError(f"unknown argument {arg!r}; valid keys: {', '.join(valid)}")
        kind = type(valid[key].default)
        if kind is bool:
            if raw.lower() not in ("", "1", "0", "true", "false"):
                raise ValueError(f"--{key} expects true/false, got {raw!r}")
            values[key] = raw.lower() in ("", "1", "true")
        else:
            try:
                values[key] = kind(raw)
            except ValueError:
                raise ValueError(f"--{key} expects {kind.__name__}, got {raw!r}") from None
    return cls(**values)


def resolve_device(device: str, dtype: str):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but CUDA is not available; use --device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def load_checkpoint(path, device="cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error} (corrupt or not ours?)") from None


def load_model(path, device="cpu"):
    """-> (GPT with the checkpoint's weights and bank types, checkpoint dict)."""
    ckpt = load_checkpoint(path, device)
    model = GPT(TrainConfig(**ckpt["config"]).model_config())
    model.prepare_state_dict(ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def build_optimizer(model, cfg: TrainConfig, old=None, reset=()):
    """AdamW, decay on matrices only; carry state from `old` for params not in `reset`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)
    if old is not None:
        reset_ids = {id(p) for p in reset}
        for p in params:
            if id(p) not in reset_ids and p in old.state:
                optimizer.state[p] = old.state[p]
    return optimizer


def lr_at(it: int, cfg: TrainConfig) -> float:
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.lr_warmup:
        return cfg.lr * (it + 1) / cfg.lr_warmup
    progress = min(1.0, (it - cfg.lr_warmup) / max(1, decay_iters - cfg.lr_warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def recluster_due(it: int, cfg: TrainConfig) -> bool:
    return cfg.moe == "clustered" and it >= cfg.warmup_iters and \
        (it - cfg.warmup_iters) % cfg.recluster_interval == 0


def save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(batch_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@torch.no_grad()
def evaluate(model, val, cfg: TrainConfig, device, autocast) -> float:
    """Mean LM loss on the same eval_iters val batches every time (fixed generator)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = data.get_batch(val, cfg.batch_size, cfg.block_size, device, gen)
        with autocast:
            losses.append(model(x, y)[1])
    model.train()
    return torch.stack(losses).mean().item()


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the last eval record."""
    cfg.validate()
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
        dtype = resolve_device("cuda", cfg.dtype)[1]
    else:
        rank, world = 0, 1
        device, dtype = resolve_device(cfg.device, cfg.dtype)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    out_dir = Path(cfg.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        folder = data.prepare(cfg.dataset, cfg.data_dir)
    if ddp:
        dist.barrier()
        folder = data.prepare(cfg.dataset, cfg.data_dir)
    train_tokens, val_tokens = data.load_split(folder, "train"), data.load_split(folder, "val")

    batch_gen = torch.Generator().manual_seed(cfg.seed + rank)
    start_iter, history = 0, []
    if cfg.resume:
        model, ckpt = load_model(out_dir / "ckpt.pt", device)
        start_iter = ckpt["iter"]
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        batch_gen.set_state(ckpt["rng"]["batches"].cpu())
        if "cuda" in ckpt["rng"] and device.startswith("cuda"):
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    else:
        model = GPT(cfg.model_config()).to(device)
    optimizer = build_optimizer(model, cfg)
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])

    # Compile once: after a recluster swaps a layer's bank, dynamo's guards retrace by themselves.
    compiled = torch.compile(model) if cfg.compile else model
    wrap = lambda: DDP(compiled, device_ids=[device]) if ddp else compiled
    runner = wrap()
    autocast = torch.autocast("cuda", torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    layers = model.moe_layers()
    load_acc = [torch.zeros_like(l.expert_counts) for l in layers]
    cluster_acc = [torch.zeros_like(l.cluster_counts) for l in layers]
    loss_acc, loss_steps, moved_since_eval = torch.zeros((), device=device), 0, 0
    record, t0, iters_timed, recluster_s = {}, time.perf_counter(), 0, 0.0
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not master, dynamic_ncols=True)
    for it in bar:
        if recluster_due(it, cfg):
            if ddp:  # every rank must regroup from identical statistics
                for layer in layers:
                    for buf in layer.buffers():
                        dist.broadcast(buf, 0)
            t_recluster = time.perf_counter()
            result = recluster_model(model, cfg.alpha, seed=cfg.seed + it)
            moved_since_eval += result["moved"]
            if master:  # membership[layer][expert] = cluster of each original expert
                m = cfg.n_experts // cfg.n_clusters
                membership = [[0] * cfg.n_experts for _ in layers]
                for row, layer in zip(membership, layers):
                    for slot, expert in enumerate(layer.expert_ids.tolist()):
                        row[expert] = slot // m
                with open(out_dir / "reclusters.jsonl", "a") as f:
                    f.write(json.dumps({"iter": it, "moved": result["moved"],
                                        "membership": membership}) + "\n")
            optimizer = build_optimizer(model, cfg, optimizer, result["reset"])
            runner = wrap()  # DDP must see the new parameter set
            for acc in load_acc + cluster_acc:  # slots were permuted: count afresh
                acc.zero_()
            recluster_s += time.perf_counter() - t_recluster
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, y = data.get_batch(train_tokens, cfg.batch_size, cfg.block_size, device, batch_gen)
            sync = nullcontext() if not ddp or micro == cfg.grad_accum - 1 else runner.no_sync()
            with sync, autocast:
                _, lm_loss, aux = runner(x, y)
                loss = (lm_loss + aux) / cfg.grad_accum
            loss.backward()
            loss_acc += lm_loss.detach() / cfg.grad_accum
            for acc, cacc, layer in zip(load_acc, cluster_acc, layers):
                acc += layer.expert_counts
                cacc += layer.cluster_counts
        loss_steps += 1
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iters_timed += 1

        last = it == cfg.max_iters - 1
        if (it + 1) % cfg.log_interval == 0 or last or (it + 1) % cfg.eval_interval == 0:
            train_loss = (loss_acc / loss_steps).item()  # one sync per log_interval
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"non-finite loss {train_loss} at iteration {it}; "
                                         f"the last good checkpoint in {out_dir} is kept")
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}")
        if ((it + 1) % cfg.eval_interval == 0 or last) and master:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            val_loss = evaluate(model, val_tokens, cfg, device, autocast)
            record = {"iter": it + 1, "train_loss": train_loss, "val_loss": val_loss,
                      "val_ppl": math.exp(min(val_loss, 50)), "lr": lr,
                      "tokens_per_sec": iters_timed * tokens_per_iter / elapsed,
                      "recluster_s": recluster_s,  # inside elapsed (and so in tokens_per_sec)
                      "load_cv": sum(load_cv(a).item() for a in load_acc) / max(1, len(layers)),
                      **model.param_counts(),
                      "n_reclusters": int(layers[0].n_reclusters) if layers else 0,
                      "experts_moved": moved_since_eval}
            if layers and layers[0].clustered:
                record["cluster_load_cv"] = sum(load_cv(a).item() for a in cluster_acc) / len(layers)
            history.append(record)
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.write(f"iter {it + 1}: train {train_loss:.4f} val {val_loss:.4f} "
                      f"ppl {record['val_ppl']:.1f} tok/s {record['tokens_per_sec']:.0f} "
                      f"load_cv {record['load_cv']:.3f}")
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "config": asdict(cfg), "iter": it + 1, "rng": rng_state(batch_gen)},
                        out_dir / "ckpt.pt")
            for acc in load_acc + cluster_acc:
                acc.zero_()
            loss_acc.zero_()
            loss_steps, moved_since_eval, iters_timed, recluster_s = 0, 0, 0, 0.0
            t0 = time.perf_counter()
    if ddp:
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    try:
        config = parse_config(TrainConfig, sys.argv[1:]).validate()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    train(config)
