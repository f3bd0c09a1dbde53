"""Train a dense, top-k MoE, or clustered MoE GPT.  `python train.py --help` lists the flags.

Owns: TrainConfig and its presets, the training loop (AdamW, warmup +
cosine LR, clipping, accumulation, bf16 autocast, optional torch.compile, DDP under
torchrun), writing log.jsonl, atomic checkpoints and exact resume, and the reclustering
schedule (train as top-k for `warmup_iters`, then cluster + compress, then recluster every
`recluster_interval`; the optimizer state follows the experts). What an eval interval
records (val loss, tokens/s, MFU, load CV) is train_log.py's; the helpers every entry point
shares (flag parsing, devices, checkpoints) live in cli.py.

Expert parallelism (`--expert_parallel=N` under torchrun, top-k or clustered): no DDP
wrapper; ep.py splits each bank (experts, or whole clusters) over groups of N ranks and syncs
gradients; ep_state.py reclusters (gather, regroup, re-slice, optimizer state included) and
gathers full checkpoints. Every rank evaluates then; load CV is over rank 0's tokens, and
the parameter counts in log.jsonl are one rank's (its slice of each bank).
"""
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
import ep
import ep_state
from cli import CheckpointError, load_model, parse_config, resolve_device, save_atomic
from cluster import carry_optimizer_state, parse_similarity, recluster_model
from model import GPT, GPTConfig
from train_log import Interval, close_interval, evaluate, startup_summary, trim_logs


# Named model sizes; explicit --field=value flags win over a preset's values.
PRESETS = {
    # The paper's setting (12 layers, d=768, E=32, G=8, r=16, top-2). It does not state the
    # expert width; ffn_hidden=1536 is our choice: top-k then holds 0.97B parameters, near
    # the paper's 875M Switch top-2, and the dense baseline (2 x 1536) is GPT-2 small.
    "paper": dict(n_layer=12, n_head=12, n_embd=768, n_experts=32, n_clusters=8, rank=16,
                  top_k=2, ffn_hidden=1536),
}


CLUSTER_MODES = ("dynamic", "static", "random")


@dataclass
class TrainConfig(GPTConfig):
    """Every model.GPTConfig field (model shape, routing, moe_impl) plus the training ones.
    One model default differs for training: the clustered model."""
    moe: str = "clustered"
    preset: str = ""               # '' | a key of PRESETS; applied by parse_config
    # data and I/O
    dataset: str = "shakespeare"   # shakespeare | wikitext103 | folders/zips of .txt, comma-separated
                                   # (a folder of zips means all of them)
    val_split: str = "auto"        # auto | tail | documents (text collections; see data.py)
    data_dir: str = "data"
    out_dir: str = "out"
    resume: bool = False
    seed: int = 1337
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = False
    expert_parallel: int = 1       # ranks that split each MoE layer's experts (torchrun; 1 = off)
    # clustering schedule (moe=clustered); the paper's settings
    warmup_iters: int = 200        # train as top-k MoE this long (burn-in), then cluster + compress
    recluster_interval: int = 100
    cluster_mode: str = "dynamic"  # dynamic (recluster every interval) | static (cluster once at
                                   # warmup_iters) | random (equal random groups, never regrouped)
    alpha: float = 0.7             # weight of parameter vs activation similarity
    similarity: str = "specific+scores"  # PARAM+ACT views, see cluster.py
    min_gain: float = 0.01         # keep the groups unless regrouping gains this much similarity
    kmeans_restarts: int = 8
    shock_iters: int = 10          # val batches scored just before and after each recluster
                                   # (the recluster shock in reclusters.jsonl); 0 = not measured
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
    final_ckpt: str = "full"       # what the last checkpoint keeps: full (optimizer state too, so
                                   # --resume can extend the run) | weights (about 1/3 of the bytes
                                   # with fp32 AdamW; enough to evaluate, fine-tune and sample)

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})

    def validate(self):
        self.model_config().validate()
        rules = [
            (self.preset in ("", *PRESETS), f"preset must be '' or one of {sorted(PRESETS)}"),
            (self.max_iters >= 1, "max_iters must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.eval_interval >= 1 and self.eval_iters >= 1 and self.log_interval >= 1,
             "eval_interval, eval_iters and log_interval must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.warmup_iters >= 0 and self.recluster_interval >= 1,
             "warmup_iters must be >= 0 and recluster_interval >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
            (self.cluster_mode in CLUSTER_MODES, f"cluster_mode must be one of {CLUSTER_MODES}"),
            (self.kmeans_restarts >= 0, "kmeans_restarts must be >= 0"),
            (self.expert_parallel >= 1, "expert_parallel must be >= 1"),
            (self.shock_iters >= 0, "shock_iters must be >= 0"),
            (self.final_ckpt in ("full", "weights"), "final_ckpt must be full|weights"),
        ]
        if self.expert_parallel > 1:
            rules += [
                (self.moe in ("topk", "clustered"), "--expert_parallel needs a MoE (topk or clustered)"),
                (self.moe != "clustered" or self.n_clusters % self.expert_parallel == 0,
                 f"n_clusters ({self.n_clusters}) must be divisible by expert_parallel "
                 f"({self.expert_parallel}): each rank holds whole clusters"),
                (self.moe != "clustered" or not self.compress or self.hierarchical,
                 "a compressed clustered model under expert parallelism needs hierarchical "
                 "routing (one cluster, so one rank, per token)"),
                (self.n_experts % self.expert_parallel == 0,
                 f"n_experts ({self.n_experts}) must be divisible by expert_parallel "
                 f"({self.expert_parallel})"),
                (self.capacity_factor == 0, "expert parallelism is dropless: capacity_factor must be 0"),
                ("RANK" in os.environ, "--expert_parallel > 1 needs torchrun (RANK is not set)"),
            ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"bad train config: {message}")
        data.check_dataset(self.dataset, self.val_split)
        parse_similarity(self.similarity)
        if self.resume and not (Path(self.out_dir) / "ckpt.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {Path(self.out_dir) / 'ckpt.pt'}")
        return self


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
    if cfg.moe != "clustered" or it < cfg.warmup_iters:
        return False
    if cfg.cluster_mode != "dynamic":
        return it == cfg.warmup_iters
    return (it - cfg.warmup_iters) % cfg.recluster_interval == 0


def rng_state(batch_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def setup_distributed(cfg: TrainConfig):
    """-> (ddp, rank, world, device, dtype). Distributed when launched by torchrun (RANK is
    set): gloo on --device=cpu, else NCCL with one GPU per process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return (False, 0, 1, *resolve_device(cfg.device, cfg.dtype))
    if cfg.device == "cpu":
        dist.init_process_group("gloo")
        return True, dist.get_rank(), dist.get_world_size(), "cpu", resolve_device("cpu", cfg.dtype)[1]
    dist.init_process_group("nccl")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device, resolve_device("cuda", cfg.dtype)[1]


def load_data(cfg: TrainConfig, master: bool, ddp: bool):
    """Rank 0 prepares (downloads, tokenizes) while the others wait; all then memory-map."""
    if master:
        folder = data.prepare(cfg.dataset, cfg.data_dir, val_split=cfg.val_split)
    if ddp:
        dist.barrier()
        folder = data.prepare(cfg.dataset, cfg.data_dir, val_split=cfg.val_split)
    return data.load_split(folder, "train"), data.load_split(folder, "val"), data.read_meta(folder)


def balance_loads(layers, cfg: TrainConfig, ddp: bool) -> None:
    """After an optimizer step: each MoE layer's loads over the step, summed over every rank
    (the router is replicated under DDP and expert parallelism alike, so every replica's
    biases must move the same way), drive its bias update (model.MoE.balance_step)."""
    if ddp and layers and cfg.balance == "bias":
        counts = [c for layer in layers for c in (layer.step_counts, layer.step_cluster_counts)]
        flat = torch.cat(counts)
        dist.all_reduce(flat)
        for c, part in zip(counts, flat.split([c.numel() for c in counts])):
            c.copy_(part)
    for layer in layers:
        layer.balance_step()


def recluster_event(model, cfg: TrainConfig, it: int, ddp: bool, master: bool, out_dir: Path,
                    shock_eval=None, regroup=recluster_model) -> dict:
    """Regroup and re-factorize every MoE layer (all ranks, from rank 0's statistics, so
    every replica regroups identically). Rank 0 appends one line to reclusters.jsonl: experts
    moved, per-layer similarity gain and whether the regrouping was skipped, seconds, the
    membership, and the validation loss just before and after (`shock_eval`, the recluster
    shock; its time is reported apart; every rank that gets one calls it). regroup:
    cluster.recluster_model, or ep_state.recluster_model bound to the optimizer."""
    layers = model.moe_layers()
    if ddp:
        for layer in layers:
            for buf in layer.buffers():
                dist.broadcast(buf, 0)
    measure = shock_eval is not None and layers[0].has_clusters and cfg.shock_iters > 0
    t_shock = time.perf_counter()
    before = shock_eval() if measure else None
    t0 = time.perf_counter()
    result = regroup(model, alpha=cfg.alpha, seed=cfg.seed + it, similarity=cfg.similarity,
                     min_gain=cfg.min_gain, restarts=cfg.kmeans_restarts,
                     random_groups=cfg.cluster_mode == "random")
    t1 = time.perf_counter()
    after = shock_eval() if measure else None
    result["seconds"], result["shock_s"] = t1 - t0, (t0 - t_shock) + (time.perf_counter() - t1)
    if master:
        m = cfg.n_experts // cfg.n_clusters  # membership[layer][expert] = cluster of each original expert
        membership = [[0] * cfg.n_experts for _ in layers]
        for row, layer in zip(membership, layers):
            for slot, expert in enumerate(layer.expert_ids.tolist()):
                row[expert] = slot // m
        with open(out_dir / "reclusters.jsonl", "a") as f:
            f.write(json.dumps({"iter": it, "moved": result["moved"], "gain": result["gain"],
                                "skipped": result["skipped"], "seconds": result["seconds"],
                                "val_loss_before": before, "val_loss_after": after,
                                "shock": None if before is None else after - before,
                                "membership": membership}) + "\n")
    return result


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the last eval record."""
    cfg.validate()
    ddp, rank, world, device, dtype = setup_distributed(cfg)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    out_dir = Path(cfg.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_tokens, val_tokens, meta = load_data(cfg, master, ddp)

    # Model, optimizer and RNG streams: fresh, or exactly where the checkpoint left them.
    batch_gen = torch.Generator().manual_seed(cfg.seed + rank)
    start_iter = 0
    if cfg.resume:
        model, ckpt = load_model(out_dir / "ckpt.pt", device)
        start_iter = ckpt["iter"]
        # Each rank's own streams (older checkpoints, or another world size: rank 0's).
        rngs = ckpt.get("rng_ranks", [])
        rng = rngs[rank] if len(rngs) == world else ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        batch_gen.set_state(rng["batches"].cpu())
        if "cuda" in rng and device.startswith("cuda"):
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        if master:  # what was logged after the checkpoint is redone: keep one copy of it
            trim_logs(out_dir, start_iter)
    else:
        model = GPT(cfg.model_config()).to(device)
    if master:
        print(startup_summary(cfg, model, meta, device, dtype, world))

    # Expert parallelism: every rank starts from rank 0's weights (no DDP to broadcast them),
    # then keeps only its shard of each bank.
    expert_parallel = cfg.expert_parallel > 1
    shards = []
    shard_params = lambda: [p for layer in model.moe_layers() for p in layer.bank.parameters()]
    if expert_parallel:
        ep_group, replica_group = ep.expert_parallel_groups(rank, world, cfg.expert_parallel)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
        ep.parallelize(model, ep_group)
        shards = shard_params()
    optimizer = build_optimizer(model, cfg)
    if cfg.resume:
        state = ckpt["optimizer"]
        if state is None:
            raise ValueError(f"--resume: {out_dir / 'ckpt.pt'} holds weights only (final_ckpt="
                             f"weights), no optimizer state to resume from")
        if expert_parallel:
            state = ep_state.shard_optimizer_state(state, optimizer, shards, ep_group)
        optimizer.load_state_dict(state)

    # Compile once: after a recluster swaps a layer's bank, dynamo's guards retrace by themselves.
    compiled = torch.compile(model) if cfg.compile else model
    use_ddp = ddp and not expert_parallel
    device_ids = [device] if device.startswith("cuda") else None
    wrap = lambda: DDP(compiled, device_ids=device_ids) if use_ddp else compiled
    runner = wrap()
    autocast = torch.autocast("cuda", torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    layers = model.moe_layers()
    interval, record = Interval.start(layers, device), {}
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not master, dynamic_ncols=True)
    for it in bar:
        # Recluster event (all ranks): the parameter set changes, so optimizer and DDP follow.
        # Optimizer state follows the experts (carry_optimizer_state); only the first
        # clustering creates parameters, so only then are the optimizer and DDP rebuilt.
        if recluster_due(it, cfg):
            t_recluster = time.perf_counter()
            shock = (lambda: evaluate(model, val_tokens, cfg, device, autocast, cfg.shock_iters)) \
                if master or expert_parallel else None      # EP: each forward needs every rank
            if expert_parallel:  # ep_state carries the optimizer state through gather and re-slice
                regroup = lambda model, **kw: ep_state.recluster_model(model, optimizer, **kw)
                result = recluster_event(model, cfg, it, ddp, master, out_dir, shock, regroup)
                if result["created"]:
                    optimizer, shards = build_optimizer(model, cfg, optimizer), shard_params()
            else:
                result = recluster_event(model, cfg, it, ddp, master, out_dir, shock)
                carry_optimizer_state(optimizer, result)
                if result["reset"]:
                    optimizer = build_optimizer(model, cfg, optimizer, result["reset"])
                    runner = wrap()
            interval.moved += result["moved"]
            interval.reset_loads()
            interval.recluster_s += time.perf_counter() - t_recluster - result["shock_s"]
            interval.paused_s += result["shock_s"]  # a measurement, not training: untimed

        # One optimizer step (all ranks): grad_accum micro-batches, gradients synced on the last.
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, y = data.get_batch(train_tokens, cfg.batch_size, cfg.block_size, device, batch_gen)
            sync = nullcontext() if not use_ddp or micro == cfg.grad_accum - 1 else runner.no_sync()
            with sync, autocast:
                _, lm_loss, aux = runner(x, y)
                loss = (lm_loss + aux) / cfg.grad_accum
            loss.backward()
            interval.add_micro_step(lm_loss, layers, cfg.grad_accum)
        interval.steps += 1
        if expert_parallel:
            ep.sync_grads(model, shards, world, replica_group)
        if cfg.grad_clip > 0 and expert_parallel:
            ep.clip_grad_norm(model, shards, cfg.grad_clip, ep_group)
        elif cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balance_loads(layers, cfg, ddp)

        # Progress and the non-finite check (all ranks): one host sync per log_interval.
        last = it == cfg.max_iters - 1
        eval_now = (it + 1) % cfg.eval_interval == 0 or last
        if (it + 1) % cfg.log_interval == 0 or eval_now:
            train_loss = (interval.loss_sum / interval.steps).item()
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"non-finite loss {train_loss} at iteration {it}; "
                                         f"the last good checkpoint in {out_dir} is kept")
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}")

        # Close the eval interval: rank 0 evaluates, logs and checkpoints; every rank restarts
        # its interval (and the clock). Under expert parallelism every rank evaluates (each
        # forward needs its whole group) and gathers the full model and optimizer state.
        if eval_now:
            if master or expert_parallel:
                record = close_interval(model, cfg, it, lr, train_loss, interval, val_tokens, meta,
                                        world, device, autocast)
            if expert_parallel:
                model_state = ep_state.full_state_dict(model)
                optimizer_state = ep_state.gather_optimizer_state(optimizer, shards, ep_group)
            else:
                model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
            rngs = [rng_state(batch_gen)]
            if ddp:
                rngs = [None] * world
                dist.all_gather_object(rngs, rng_state(batch_gen))
            if last and cfg.final_ckpt == "weights":
                optimizer_state = None
            if master:
                with open(out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.write(f"iter {it + 1}: train {train_loss:.4f} val {record['val_loss']:.4f} "
                          f"ppl {record['val_ppl']:.1f} tok/s {record['tokens_per_sec']:.0f} "
                          f"load_cv {record['load_cv']:.3f}")
                save_atomic({"model": model_state, "optimizer": optimizer_state,
                             "config": asdict(cfg), "iter": it + 1, "rng": rngs[0],
                             "rng_ranks": rngs}, out_dir / "ckpt.pt")
            interval.reset()
    if ddp:
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    try:
        train(parse_config(TrainConfig, sys.argv[1:], PRESETS).validate())
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as error:
        sys.exit(f"error: {error}")
