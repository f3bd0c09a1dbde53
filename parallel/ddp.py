"""Data parallelism under torchrun: the process group, and the training loop's strategy for DDP.

Owns: `join` (join the process group: gloo on --device=cpu, NCCL with one GPU per process
otherwise) and `DataParallel` (every rank holds the whole model and its own batches; gradients are
averaged on the last micro-batch of a step; reclusters regroup from rank 0's statistics).
Does not own: the loop and which strategy it takes (train.py), expert parallelism (ep.py,
ep_state.py).
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import resolve_device
from regroup import Recluster
from strategy import OneProcess


class DataParallel(OneProcess):
    """DDP under torchrun: every rank holds the whole model and its own batches; gradients
    are averaged on the last micro-batch of a step."""
    def __init__(self, device: str, dtype: str):
        super().__init__(device, dtype)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.master = self.rank == 0

    def wrap(self, model):
        return DDP(model, device_ids=[self.device] if self.device.startswith("cuda") else None)

    def no_sync(self, runner, last_micro: bool):
        return nullcontext() if last_micro else runner.no_sync()

    def sum_over_ranks(self, tensors: list):
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def any_rank(self, flag: bool) -> bool:
        flags = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags.item())

    def recluster(self, model, optimizer, settings, seed: int) -> Recluster:
        # Every rank regroups from rank 0's statistics, so every replica regroups alike.
        for layer in model.moe_layers():
            for buf in layer.buffers():
                dist.broadcast(buf, 0)
        return self._regroup(model, optimizer, settings, seed)

    def _regroup(self, model, optimizer, settings, seed: int) -> Recluster:
        return OneProcess.recluster(self, model, optimizer, settings, seed)

    def all_rngs(self, rng: dict) -> list:
        rngs = [None] * self.world
        dist.all_gather_object(rngs, rng)
        return rngs

    def barrier(self):
        dist.barrier()

    def close(self):
        dist.destroy_process_group()


def join(cfg) -> tuple[str, str]:
    """Join torchrun's process group -> this rank's (device, dtype)."""
    if cfg.device == "cpu":
        dist.init_process_group("gloo")
        device = "cpu"
    else:
        dist.init_process_group("nccl")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return device, resolve_device("cpu" if device == "cpu" else "cuda", cfg.dtype)[1]
