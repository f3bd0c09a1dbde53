"""Train a dense, top-k MoE, or clustered MoE GPT.  `python train.py --help` lists the flags.

Owns: TrainConfig and its presets, the training loop (AdamW, warmup + cosine LR, clipping,
accumulation, bf16 autocast, optional torch.compile), atomic checkpoints and exact resume (a
Ctrl-C or SIGTERM ends the step under way and checkpoints it), and the reclustering schedule
(train as top-k for `burn_in`, then cluster + compress, then recluster every
`recluster_interval`; the optimizer state follows the experts).
The loop calls its hooks on a strategy object (strategy.py's OneProcess; under torchrun,
parallel/'s DataParallel or ExpertParallel). What a run records and prints is train_log.py's;
flags and devices are cli.py's; checkpoint files and the out_dir, checkpoint.py's.
"""
# cli first: it sets the CPU thread policy, which OpenMP reads once, as torch loads.
from cli import StopAtStep, Terminated, UsageError, check_rules, parse_config, resolve_device, run
from checkpoint import (Progress, check_out_dir, claim_out_dir, load_model, restore_rng, rng_state,
                        save_atomic)
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import data
from cluster import ClusterSettings, parse_similarity
from model import GPT, GPTConfig
from regroup import restore, snapshot
from strategy import OneProcess
from train_log import (Interval, close_interval, diverged, log_record, log_recluster,
                       sample_text, startup_summary, trim_logs, val_losses, write_config)


# Named sizes in the comparison regime, 32K tokens a step (32 x 256 x grad_accum 4): with 8K
# top-k MoE trails dense. Explicit --field=value flags win over a preset's values.
SMALL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, ffn_hidden=768, n_experts=32,
             top_k=2, n_clusters=8, rank=16, batch_size=32, grad_accum=4, max_iters=2000, burn_in=200,
             recluster_interval=100, warmup_iters=50, eval_interval=100, eval_iters=20, lr=1e-3, min_lr=1e-4)
PRESETS = {
    # lr 1e-3: every model's best at 8K tokens a step (docs/results.md); 32K is not swept yet.
    "small": SMALL,
    # The paper's setting (12 layers, d=768, E=32, G=8, r=16, top-2). It does not state the
    # expert width; ffn_hidden=1536 is our choice: top-k then holds 0.97B parameters, near
    # the paper's 875M Switch top-2, and the dense baseline (2 x 1536) is GPT-2 small. lr
    # 6e-4: dense's best in the 32K-token sweep (results/paper), clustered's best so far.
    "paper": {**SMALL, "n_layer": 12, "n_head": 12, "n_embd": 768, "ffn_hidden": 1536,
              "lr": 6e-4, "min_lr": 6e-5},
}
CLUSTER_MODES = ("dynamic", "static", "random")


@dataclass
class TrainConfig(GPTConfig):
    """Every model.GPTConfig field plus the training ones. The defaults are a quick run (a
    few minutes on a CPU) of the method itself, the clustered model."""
    # model:
    moe: str = "clustered"         # the feed-forward: dense | topk | clustered
    preset: str = ""               # small | paper: a size from PRESETS (flags given win)
    # clustering:
    burn_in: int = 100             # train as a top-k MoE this long, then cluster + compress
    recluster_interval: int = 100  # iterations between reclusters after that
    cluster_mode: str = "dynamic"  # dynamic | static (cluster once) | random (random groups, kept)
    alpha: float = ClusterSettings.alpha  # weight of the parameter view vs the activation view
    similarity: str = ClusterSettings.similarity  # PARAM+ACT views of the expert similarity (cluster.py)
    min_gain: float = ClusterSettings.min_gain  # keep the groups unless regrouping gains this much
    kmeans_restarts: int = ClusterSettings.restarts  # k-means++ restarts beside the warm start
    shock_iters: int = 10          # val batches scored around each recluster (its shock; 0 = off)
    regroup_rule: str = "similarity"  # similarity (min_gain decides) | loss (and a regroup that
                                   # raised the shock's val loss beyond noise is taken back)
    # data:
    dataset: str = "shakespeare"   # shakespeare | wikitext103 | folders, .zips of .txt (a,b,...)
    val_split: str = "auto"        # auto | tail | documents: what text collections hold out
    data_dir: str = "data"         # where prepared tokens are kept
    # training:
    batch_size: int = 8            # sequences per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step
    max_iters: int = 250           # optimizer steps
    lr: float = 2e-3               # peak learning rate (AdamW)
    min_lr: float = 2e-4           # the cosine schedule's floor
    warmup_iters: int = 20         # linear LR warmup
    lr_decay_iters: int = 0        # 0 = max_iters; set it to stop early yet keep the schedule
    weight_decay: float = 0.1      # AdamW's, on matrices only
    grad_clip: float = 1.0         # global gradient norm limit (0 = off)
    seed: int = 1337               # weights, batches and clustering
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = False          # torch.compile the model
    compile_mode: str = "default"  # default | max-autotune (for CUDA graphs: --cuda_graph)
    cuda_graph: bool = False       # the whole step replayed from one CUDA graph (CUDA; with --compile
                                   # too; at the paper size such runs trained worse: docs/results.md)
    expert_parallel: int = 1       # ranks that split each MoE layer's experts (torchrun; 1 = off)
    # logging:
    out_dir: str = "out"           # log.jsonl, reclusters.jsonl, config.json and ckpt.pt go here
    resume: bool = False           # continue the run in out_dir from its checkpoint
    overwrite: bool = False        # start afresh in an out_dir that holds a run (its files go)
    eval_interval: int = 10        # iterations between evaluations (and checkpoints)
    eval_iters: int = 3            # validation batches per evaluation
    log_interval: int = 10         # iterations between progress-bar updates (one host sync)
    ckpt_interval: int = 0         # iterations between checkpoints, a multiple of eval_interval
                                   # (0: every eval; the last always)
    final_ckpt: str = "full"       # full (with optimizer state) | weights (1/3 the bytes, no resume)
    sample_tokens: int = 60        # tokens generated from the trained model at the end (0 = none)

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})

    def validate(self):
        if self.resume:  # first: --resume takes the checkpoint's config, which is then checked
            check_out_dir(self)
        self.model_config().validate()
        rules = [
            (self.preset in ("", *PRESETS), f"preset must be '' or one of {sorted(PRESETS)}"),
            (min(self.max_iters, self.batch_size, self.grad_accum) >= 1,
             "max_iters, batch_size and grad_accum must be >= 1"),
            (self.eval_interval >= 1 and self.eval_iters >= 1 and self.log_interval >= 1,
             "eval_interval, eval_iters and log_interval must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.burn_in >= 0 and self.recluster_interval >= 1,
             "burn_in must be >= 0 and recluster_interval >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
            (self.cluster_mode in CLUSTER_MODES, f"cluster_mode must be one of {CLUSTER_MODES}"),
            (self.expert_parallel >= 1, "expert_parallel must be >= 1"),
            (min(self.kmeans_restarts, self.shock_iters, self.ckpt_interval, self.sample_tokens) >= 0,
             "kmeans_restarts, shock_iters, ckpt_interval and sample_tokens must be >= 0"),
            (self.eval_interval < 1 or self.ckpt_interval % self.eval_interval == 0,
             f"ckpt_interval ({self.ckpt_interval}) must be 0 or a multiple of eval_interval "
             f"({self.eval_interval}): checkpoints are written at evaluations"),
            (self.final_ckpt in ("full", "weights"), "final_ckpt must be full|weights"),
            (self.compile_mode in ("default", "max-autotune"),
             "compile_mode must be default|max-autotune (reduce-overhead's graphs overwrite outputs "
             "a train step still reads; --compile --cuda_graph graphs the whole step)"),
            (self.regroup_rule in ("similarity", "loss"), "regroup_rule must be similarity|loss"),
            (self.regroup_rule != "loss" or (self.shock_iters > 0 and "RANK" not in os.environ),
             "regroup_rule=loss needs shock_iters > 0 and one process (not torchrun)"),
        ]
        if self.cuda_graph:  # machinery: its rules load only when it is asked for
            from fast.train_graph import config_rules
            rules += config_rules(self)
        if self.expert_parallel > 1:
            from parallel.ep_state import config_rules
            rules += config_rules(self)
        check_rules(rules, "train")
        data.check_dataset(self.dataset, self.val_split)
        parse_similarity(self.similarity)
        if not self.resume:  # a bad flag is named before the out_dir is looked at
            check_out_dir(self)
        return self


def build_optimizer(model, cfg: TrainConfig, old=None):
    """AdamW, decay on matrices only; state carried from `old` where it has some (a recluster
    creates parameters: they start fresh). --cuda_graph: capturable, lr a device tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cuda = next(model.parameters()).is_cuda
    graphed = cfg.cuda_graph and cuda
    lr = torch.tensor(cfg.lr, device=next(model.parameters()).device) if graphed else cfg.lr
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=cuda, capturable=graphed)
    if old is not None:
        for p in params:
            if p in old.state:
                optimizer.state[p] = old.state[p]
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_at(it: int, cfg: TrainConfig) -> float:
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def recluster_due(it: int, cfg: TrainConfig) -> bool:
    if cfg.moe != "clustered" or it < cfg.burn_in:
        return False
    if cfg.cluster_mode != "dynamic":
        return it == cfg.burn_in
    return (it - cfg.burn_in) % cfg.recluster_interval == 0


def make_strategy(cfg: TrainConfig) -> OneProcess:
    """One process, or (launched by torchrun: RANK is set) DDP or expert parallelism."""
    if "RANK" not in os.environ:
        return OneProcess(*resolve_device(cfg.device, cfg.dtype))
    from parallel.ddp import DataParallel, join  # several processes: machinery, loaded only then
    device, dtype = join(cfg)
    if cfg.expert_parallel > 1:
        from parallel.ep_state import ExpertParallel
        return ExpertParallel(device, dtype, cfg.expert_parallel)
    return DataParallel(device, dtype)


def load_data(cfg: TrainConfig, strategy: OneProcess):
    """Rank 0 prepares (downloads, tokenizes) while the others wait; all then memory-map."""
    for turn in ("master", "others"):
        if strategy.master == (turn == "master"):
            try:
                folder = data.prepare(cfg.dataset, cfg.data_dir, val_split=cfg.val_split)
            except (OSError, RuntimeError) as error:  # a download, a disk: the user's to fix
                raise UsageError(f"preparing {cfg.dataset}: {error}") from None
        strategy.barrier()
    return *(data.load_split(folder, s, cfg.block_size) for s in ("train", "val")), data.read_meta(folder)


def train_step(runner, model, optimizer, batches, cfg: TrainConfig, autocast, strategy,
               interval: Interval) -> None:
    """One optimizer step on the device alone (no host sync, so a CUDA graph can capture it
    whole): grad_accum micro-batches (gradients synced on the last), clipping, AdamW, the
    interval's loss and loads, then the balancing biases (loads summed over micro-batches
    and ranks). The caller zeroes the gradients (an eager step) or keeps them (a graph)."""
    for micro, (x, y) in enumerate(batches):
        with strategy.no_sync(runner, micro == len(batches) - 1), autocast:
            _, lm_loss, aux = runner(x, y)
            loss = (lm_loss + aux) / cfg.grad_accum
        loss.backward()
        interval.loss_sum += lm_loss.detach() / cfg.grad_accum
    strategy.sync_grads(model)
    if cfg.grad_clip > 0:
        strategy.clip(model, cfg.grad_clip)
    optimizer.step()
    layers = model.moe_layers()
    interval.add_loads(layers)
    if cfg.balance == "bias":
        strategy.sum_over_ranks([c for l in layers for c in (l.step_counts, l.step_cluster_counts)])
    for layer in layers:
        layer.balance_step()


def make_step(runner, model, optimizer, cfg: TrainConfig, autocast, strategy, interval: Interval):
    """The step the loop calls, bound to this runner and optimizer (a recluster makes a new
    one): train_step itself, or with --cuda_graph its replay from one CUDA graph."""
    def step(batches):
        train_step(runner, model, optimizer, batches, cfg, autocast, strategy, interval)
    if not cfg.cuda_graph:
        return step
    from fast.train_graph import GraphedTrainStep  # machinery, loaded only when asked for
    return GraphedTrainStep(step, model)


def save_checkpoint(out_dir: Path, model, optimizer, cfg: TrainConfig, done: int, batch_gen,
                    strategy, with_optimizer=True, interval=None) -> None:
    """ckpt.pt after `done` iterations (every rank gathers; rank 0 writes, atomically: the last
    good checkpoint stays until this one is whole). `interval`: the open eval interval's state."""
    model_state, optimizer_state = strategy.checkpoint_state(model, optimizer)
    rngs = strategy.all_rngs(rng_state(batch_gen))
    if strategy.master:
        save_atomic({"model": model_state, "optimizer": optimizer_state if with_optimizer else None,
                     "config": asdict(cfg), "iter": done, "rng": rngs[0], "rng_ranks": rngs,
                     "interval": interval}, out_dir / "ckpt.pt")


def recluster_event(model, optimizer, cfg: TrainConfig, it: int, strategy, shock_eval=None):
    """Regroup every MoE layer (every rank alike), with the validation loss of each shock batch
    just before and after (`shock_eval`). With regroup_rule=loss, a regroup that moved experts
    and raised that loss beyond noise (two standard errors of the per-batch rise) is taken
    back, exactly. -> (the strategy's Recluster with its timings and rule, loss before, after)."""
    measure = shock_eval is not None and model.moe_layers()[0].has_clusters and cfg.shock_iters > 0
    t_shock = time.perf_counter()
    before = shock_eval() if measure else None
    saved = snapshot(model, optimizer) if measure and cfg.regroup_rule == "loss" else None
    t0 = time.perf_counter()
    result = strategy.recluster(model, optimizer, ClusterSettings.of(cfg), cfg.seed + it)
    t1 = time.perf_counter()
    after = shock_eval() if measure else None
    if saved is not None and result.moved:
        rise = (after - before).float()
        noise = 2 * rise.std().item() / math.sqrt(len(rise)) if len(rise) > 1 else 0.0
        result.rule = {"rise": rise.mean().item(), "noise": noise, "proposed_moved": result.moved,
                       "kept": rise.mean().item() <= noise}
        if not result.rule["kept"]:
            restore(model, optimizer, saved)
            result.moved = 0
    result.seconds, result.shock_s = t1 - t0, (t0 - t_shock) + (time.perf_counter() - t1)
    mean = lambda losses: None if losses is None else losses.mean().item()  # noqa: E731
    return result, mean(before), mean(after)


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict:
    """Run one training job; returns the last eval record. `progress` follows it, for Ctrl-C."""
    cfg.validate()
    progress = progress or Progress()
    progress.out_dir = cfg.out_dir
    strategy = make_strategy(cfg)
    device, dtype, master = strategy.device, strategy.dtype, strategy.master
    torch.manual_seed(cfg.seed + strategy.rank)
    out_dir = Path(cfg.out_dir)
    train_tokens, val_tokens, meta = load_data(cfg, strategy)  # a bad dataset stops us here
    claim = claim_out_dir(out_dir, fresh=not cfg.resume) if master else nullcontext()

    # Model, optimizer and RNG streams (all ranks): fresh, or where the checkpoint left them.
    batch_gen = torch.Generator().manual_seed(cfg.seed + strategy.rank)
    start_iter, ckpt = 0, None
    if cfg.resume:
        model, ckpt = load_model(out_dir / "ckpt.pt", device, resume=True)
        start_iter = ckpt["iter"]
        restore_rng(ckpt, strategy.rank, strategy.world, batch_gen, device)
        if master:  # what was logged after the checkpoint is redone: keep one copy of it
            trim_logs(out_dir, start_iter)
    else:
        model = GPT(cfg.model_config()).to(device)
    if master:
        print(startup_summary(cfg, model, meta, device, dtype, strategy.world, ckpt))
        write_config(out_dir, cfg, meta)
    strategy.prepare(model)
    optimizer = build_optimizer(model, cfg)
    if cfg.resume:
        strategy.load_optimizer_state(optimizer, ckpt["optimizer"])

    # Compile once: after a recluster swaps a layer's bank, dynamo's guards retrace by themselves.
    compiled = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    runner = strategy.wrap(compiled)
    # A CUDA graph cannot hold autocast's cache of cast weights (tensors made in capture).
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16,
                              cache_enabled=not cfg.cuda_graph) if dtype == "bfloat16" else nullcontext()
    interval, record = Interval.start(model.moe_layers(), device), {}
    if ckpt and ckpt.get("interval"):  # stopped inside an interval: it goes on from there
        interval.restore(ckpt["interval"])
    step = make_step(runner, model, optimizer, cfg, autocast, strategy, interval)
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not master, dynamic_ncols=True)
    with claim, StopAtStep(notice=master, ranks=strategy.world) as stop:
        for it in bar:
            progress.it = it
            # Recluster event (all ranks): optimizer state follows the experts; the first
            # clustering creates parameters, so then the optimizer and the wrapper are rebuilt,
            # and the step is bound to them anew (a CUDA graph is captured again).
            if recluster_due(it, cfg):
                t_recluster = time.perf_counter()
                evaluates = master or strategy.everyone_evaluates
                shock = (lambda: val_losses(model, val_tokens, cfg, device, autocast,
                                            cfg.shock_iters)) if evaluates else None
                result, before, after = recluster_event(model, optimizer, cfg, it, strategy, shock)
                if master:
                    log_recluster(out_dir, model, it, result, before, after)
                if result.created:
                    optimizer = build_optimizer(model, cfg, optimizer)
                    runner = strategy.wrap(compiled)
                step = make_step(runner, model, optimizer, cfg, autocast, strategy, interval)
                interval.moved += result.moved
                interval.reset_loads()
                interval.recluster_s += time.perf_counter() - t_recluster - result.shock_s
                interval.paused_s += result.shock_s  # a measurement, not training: untimed

            # One optimizer step (all ranks), eager or replayed from the graph.
            lr = lr_at(it, cfg)
            set_lr(optimizer, lr)
            step([data.get_batch(train_tokens, cfg.batch_size, cfg.block_size, device, batch_gen)
                  for _ in range(cfg.grad_accum)])
            if not cfg.cuda_graph:
                optimizer.zero_grad(set_to_none=True)
            interval.steps += 1

            # Progress and the non-finite check (all ranks): one host sync per log_interval.
            last = it == cfg.max_iters - 1
            eval_now = (it + 1) % cfg.eval_interval == 0 or last
            log_now = (it + 1) % cfg.log_interval == 0 or eval_now
            if log_now:
                train_loss = (interval.loss_sum / interval.steps).item()
                if not math.isfinite(train_loss):
                    raise diverged(out_dir, it, train_loss, master)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}")

            # Close the eval interval: rank 0 (expert parallel: every rank) evaluates; rank 0 logs.
            if eval_now:
                if master or strategy.everyone_evaluates:
                    record = close_interval(model, cfg, it, lr, train_loss, interval, val_tokens,
                                            meta, strategy.world, device, autocast)
                save = last or not cfg.ckpt_interval or (it + 1) % cfg.ckpt_interval == 0
                if master:
                    log_record(out_dir, record)
                if save:
                    save_checkpoint(out_dir, model, optimizer, cfg, it + 1, batch_gen, strategy,
                                    with_optimizer=not (last and cfg.final_ckpt == "weights"))
                interval.reset()
            # A Ctrl-C or SIGTERM held by `stop` ends the run here, its step checkpointed. Ranks
            # stop at one step: they agree at log steps, and one rank's stop is every rank's.
            if (strategy.world == 1 or log_now) and strategy.any_rank(stop.requested is not None):
                if not (eval_now and save):
                    save_checkpoint(out_dir, model, optimizer, cfg, it + 1, batch_gen, strategy,
                                    interval=interval.state())
                raise stop.requested or Terminated()
    if cfg.sample_tokens and (master or strategy.everyone_evaluates):  # a taste of the model
        text = sample_text(model, cfg, device, autocast)
        print(text if master else "", end="")
    strategy.close()
    return record


if __name__ == "__main__":
    where = Progress()  # train() keeps it current: what a Ctrl-C reports
    run(lambda argv: train(parse_config(TrainConfig, argv, PRESETS), where), sys.argv[1:], where.line)
