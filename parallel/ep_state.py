"""The state of an expert-parallel GPT (ep.py's layers): what must be gathered from, or
re-sliced to, the ranks that hold the shards.

Owns: `full_state_dict` (a parallelized GPT -> the single-process state_dict a checkpoint
holds), the shards' optimizer moments gathered / re-sliced (`gather_optimizer_state`,
`shard_optimizer_state`: checkpoints and resume on any number of ranks), and reclustering
under expert parallelism (`recluster_model`: gather each layer and its moments, regroup with
regroup.recluster identically on every rank, keep this rank's slice again).
Also `ExpertParallel`, the training loop's strategy for it (train.py's hooks: parallelize
the model, sync and clip gradients, recluster, gather checkpoints).
Does not own: the layer, placement or the exchange (ep.py), the regrouping (regroup.py).
"""
import os
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

from regroup import Recluster, carry_optimizer_state, recluster
from parallel import ep
from parallel.ep import ExpertParallelMoE, gather_state
from moe import MoE
from parallel.ddp import DataParallel


def full_state_dict(model) -> dict:
    """A parallelized GPT's state_dict with every layer's bank gathered (collective: every
    rank of each expert-parallel group calls it): what a single-process GPT loads."""
    state = model.state_dict()
    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, ExpertParallelMoE):
            prefix = f"blocks.{i}.ffn."
            for name in [k for k in state if k.startswith(prefix)]:
                del state[name]
            state.update({prefix + k: v for k, v in gather_state(block.ffn).items()})
    return state


def _gather_rows(state: dict, group) -> dict:
    """One shard's optimizer state -> the full layer's (collective): moments concatenated over
    the group's ranks in rank order, scalars (the step count) kept."""
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts)
        out[key] = value
    return out


def _rows_of(state: dict, rank: int, world: int) -> dict:
    return {key: value.chunk(world)[rank].clone() if torch.is_tensor(value) and value.dim() > 0
            else value for key, value in state.items()}


@torch.no_grad()
def recluster_layer(layer: "ExpertParallelMoE", optimizer, settings, seed: int):
    """regroup.recluster for an expert-parallel layer, with its optimizer state: every rank
    gathers the full layer and the shards' moments, regroups it the same way (same
    statistics, same seed: the result is identical on every rank), and keeps its slice
    again. Experts that move to a cluster on another rank arrive there with their weights
    (in the new factorization) and their state rows: the gathered moments are permuted and
    re-zeroed by recluster's carry / reset exactly as one process would, then re-sliced.
    -> (recluster's Regrouping, whose parameters are the
    temporary full layer's; whether this layer's parameters were replaced, the first
    clustering, so the optimizer must be rebuilt: their carried state is in optimizer.state)."""
    full = MoE(layer.cfg).to(layer.router.weight.device)
    if layer.cluster_router is not None:
        full.make_clustered()
    full.load_state_dict(gather_state(layer))
    # The full layer's optimizer state: replicated parameters' as they are, shards' gathered.
    params = dict(full.named_parameters())
    moments = SimpleNamespace(state={})
    for name, param in layer.named_parameters():
        if param in optimizer.state:   # the same on every rank: all step together
            state = optimizer.state[param]
            if name.startswith("bank.") and layer.world > 1:
                state = _gather_rows(state, layer.group)
            moments.state[params[name]] = state
    result = recluster(full, settings, seed)
    carry_optimizer_state(moments, result)      # exactly what one process does to its optimizer
    states = {name: moments.state[p] for name, p in full.named_parameters() if p in moments.state}
    for param in layer.parameters():
        optimizer.state.pop(param, None)
    created = layer.adopt(full)
    for name, param in layer.named_parameters():
        if name in states:
            state = states[name]
            optimizer.state[param] = _rows_of(state, layer.rank, layer.world) \
                if name.startswith("bank.") else state
    return result, created


def recluster_model(model, optimizer, settings, seed: int = 0) -> Recluster:
    """regroup.recluster_model for a parallelized GPT (collective); the optimizer state is
    already carried."""
    total = Recluster()
    for i, layer in enumerate(model.moe_layers()):
        regrouping, created = recluster_layer(layer, optimizer, settings, seed + i)
        regrouping.reset, regrouping.carry = [], {}  # the temporary full layer's: carried already
        total.add(regrouping, created)
    return total


def _shard_entries(optimizer, shards):
    """The indices of the shard parameters in optimizer.state_dict()['state']."""
    shard_ids = {id(p) for p in shards}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if id(p) in shard_ids]


def gather_optimizer_state(optimizer, shards: list, ep_group) -> dict:
    """optimizer.state_dict() with each shard's moments gathered into the full layer's
    (collective over ep_group): the state a single-process optimizer loads."""
    state = optimizer.state_dict()
    state["state"] = dict(state["state"])
    for i in _shard_entries(optimizer, shards):
        if i in state["state"]:
            state["state"][i] = _gather_rows(state["state"][i], ep_group)
    return state


def shard_optimizer_state(state: dict, optimizer, shards: list, ep_group) -> dict:
    """The inverse of gather_optimizer_state: this rank's rows of each shard's moments."""
    state = {**state, "state": dict(state["state"])}
    size, me = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for i in _shard_entries(optimizer, shards):
        if i in state["state"]:
            state["state"][i] = _rows_of(state["state"][i], me, size)
    return state


def config_rules(cfg) -> list[tuple[bool, str]]:
    """train.TrainConfig.validate's rules for --expert_parallel > 1: (holds, message)."""
    size = cfg.expert_parallel
    return [
        (cfg.moe in ("topk", "clustered"), "--expert_parallel needs a MoE (topk or clustered)"),
        (cfg.moe != "clustered" or cfg.n_clusters % size == 0,
         f"n_clusters ({cfg.n_clusters}) must be divisible by expert_parallel ({size}): each "
         f"rank holds whole clusters"),
        (cfg.moe != "clustered" or not cfg.compress or cfg.hierarchical,
         "a compressed clustered model under expert parallelism needs hierarchical routing "
         "(one cluster, so one rank, per token)"),
        (cfg.n_experts % size == 0,
         f"n_experts ({cfg.n_experts}) must be divisible by expert_parallel ({size})"),
        (cfg.capacity_factor == 0, "expert parallelism is dropless: capacity_factor must be 0"),
        ("RANK" in os.environ, "--expert_parallel > 1 needs torchrun (RANK is not set)"),
    ]


class ExpertParallel(DataParallel):
    """train.py's strategy for --expert_parallel=N under torchrun: no DDP wrapper; each MoE
    layer's bank is split over groups of N ranks (ep.py), the rest is replicated. Every rank
    evaluates (each forward needs its whole group); load CV is over rank 0's tokens, and the
    parameter counts in log.jsonl are one rank's (its slice of each bank)."""
    everyone_evaluates = True

    def __init__(self, device: str, dtype: str, size: int):
        super().__init__(device, dtype)
        self.ep_group, self.replica_group = ep.expert_parallel_groups(self.rank, self.world, size)
        self.shards = []

    def _refresh(self, model):
        self.shards = [p for layer in model.moe_layers() for p in layer.bank.parameters()]

    def prepare(self, model):
        """Every rank starts from rank 0's weights, then keeps only its shard of each bank."""
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
        ep.parallelize(model, self.ep_group)
        self._refresh(model)

    def wrap(self, model):
        return model

    def no_sync(self, runner, last_micro: bool):
        return nullcontext()

    def sync_grads(self, model):
        ep.sync_grads(model, self.shards, self.world, self.replica_group)

    def clip(self, model, max_norm: float):
        ep.clip_grad_norm(model, self.shards, max_norm, self.ep_group)

    def _regroup(self, model, optimizer, settings, seed: int):
        result = recluster_model(model, optimizer, settings, seed)
        self._refresh(model)
        return result

    def checkpoint_state(self, model, optimizer) -> tuple[dict, dict]:
        return full_state_dict(model), gather_optimizer_state(optimizer, self.shards, self.ep_group)

    def load_optimizer_state(self, optimizer, state: dict):
        optimizer.load_state_dict(shard_optimizer_state(state, optimizer, self.shards, self.ep_group))
