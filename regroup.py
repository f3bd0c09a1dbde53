"""How a MoE layer changes its experts: the first clustering, later regroups, and what follows
an expert when it moves.

Owns: `recluster` (cluster.py proposes a grouping for one layer; this applies it), the two ways
to apply it (`first_clustering`: a trained top-k layer becomes clustered and compressed;
`regroup`: a clustered layer takes new groups and is re-factorized), `follow` (an expert's
router row, statistics, bias and, uncompressed, its weights move with it), `Regrouping` (what
changed), `recluster_model` (every layer of a GPT), the optimizer carry (`carry_rows`,
`carry_optimizer_state`: AdamW's moments follow their rows), and taking a regroup back
(`snapshot`, `restore`: --regroup_rule=loss rejects one that raised the validation loss).
Does not own: which experts belong together (cluster.py), factor math (compress.py), the layer
as it runs (moe.py), when to recluster (train.py).

One regrouping has one representation, `order` (E,): new slot i holds old slot order[i].
Slots are cluster-major (expert slot s sits in cluster s // m), so `order` is the grouping:
new cluster g is old slots order[g*m:(g+1)*m]. Everything else is derived from it.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from cluster import ClusterSettings, propose
from compress import cluster_order, factorize, refactor


@dataclass
class Regrouping:
    """What one layer's regroup changed; carry_optimizer_state applies it to an optimizer."""
    moved: int                       # experts that changed cluster
    gain: float                      # within-cluster similarity gain of the proposal
    skipped: bool                    # the proposal kept the old groups (gain below min_gain)
    reset: list = field(default_factory=list)   # parameters created: no state to carry
    carry: dict = field(default_factory=dict)   # parameter -> (index, keep): new row i of its
    # optimizer state is old row index[i] (None: same rows); rows where keep is False restart
    rank: int = 1                    # the proposal's: the old grouping's rank among `of`
    of: int = 1                      # groupings (the first clustering: the grouping taken)
    margin: float | None = None      # its similarity minus the best other grouping's


def sources(order: torch.Tensor, m: int) -> torch.Tensor:
    """(G,) the old cluster each new cluster equals (all its members came from it), -1 where
    its members changed."""
    old_of = (order // m).view(-1, m)                                 # old cluster of each member
    return torch.where((old_of == old_of[:, :1]).all(1), old_of[:, 0], -1)


def moved(order: torch.Tensor, m: int) -> int:
    """Experts whose cluster index changed."""
    return int((order // m != torch.arange(len(order)) // m).sum())


@torch.no_grad()
def follow(layer, order: torch.Tensor) -> dict:
    """Per-expert state follows its expert to slot i <- order[i]: router rows, statistics,
    biases, and the whole experts when they are not compressed. -> the optimizer carry for
    the parameters among them."""
    whole = [] if layer.cfg.compress else list(layer.bank.parameters())
    per_expert = [layer.router.weight, layer.input_mean, layer.expert_ids, layer.expert_counts,
                  layer.expert_bias] + whole
    if torch.equal(order, torch.arange(len(order))):
        return {}
    on_device = order.to(layer.router.weight.device)
    for tensor in per_expert:
        tensor.copy_(tensor[on_device])
    return {param: (order, None) for param in [layer.router.weight] + whole}


@torch.no_grad()
def first_clustering(layer, assignment: torch.Tensor, gain: float, w1, w2) -> Regrouping:
    """The trained top-k experts w1 (E, d, h), w2 (E, h, d) go into the G groups of
    `assignment` (E,), each factorized into a shared base + rank-r residuals
    (compress.factorize); per-expert state follows its expert into cluster-major slots; each
    cluster's router row starts as the mean of its members' rows."""
    cfg = layer.cfg
    order = cluster_order(assignment, cfg.n_clusters)
    if cfg.compress:
        factors = [t for w in (w1, w2)
                   for t in factorize(w, assignment.to(w.device), cfg.n_clusters, cfg.rank)[1:]]
    layer.make_clustered()
    if cfg.compress:
        layer.bank.load_factors(*factors)
    carry = follow(layer, order)
    layer.cluster_router.copy_(layer.router.weight.view(cfg.n_clusters, -1, cfg.n_embd).mean(1))
    layer.cluster_bias.zero_()
    layer.n_reclusters += 1
    created = [layer.cluster_router] + (list(layer.bank.parameters()) if cfg.compress else [])
    return Regrouping(0, gain, False, created, carry)


@torch.no_grad()
def regroup(layer, order: torch.Tensor, gain: float, skipped: bool, w1, w2) -> Regrouping:
    """A clustered layer takes the groups of `order` (the identity when the proposal was
    skipped) and every cluster is re-factorized from the materialized experts w1, w2
    (compress.refactor: re-centred and re-truncated, in the old basis where its members
    stayed). A cluster whose members stayed keeps its router row, balancing bias and
    optimizer state; a changed one starts from its members' mean row and a zero bias."""
    cfg = layer.cfg
    n_clusters, m = cfg.n_clusters, cfg.n_experts // cfg.n_clusters
    source = sources(order, m)
    keep = source >= 0
    if cfg.compress:
        bank = layer.bank
        bank.load_factors(*refactor(w1, w2, (bank.base1, bank.base2), bank.factors(), order, keep,
                                    cfg.rank))
    old_rows, old_bias = layer.cluster_router.detach().clone(), layer.cluster_bias.clone()
    carry = follow(layer, order)
    rows = layer.router.weight.view(n_clusters, m, -1).mean(1)          # (G, d) member means
    bias = torch.zeros_like(old_bias)
    rows[keep.to(rows.device)] = old_rows[source[keep].to(rows.device)]
    bias[keep.to(bias.device)] = old_bias[source[keep].to(bias.device)]
    layer.cluster_router.copy_(rows)
    layer.cluster_bias.copy_(bias)
    layer.n_reclusters += 1
    if not bool((source == torch.arange(n_clusters)).all()):  # clusters' state rows follow
        index = torch.where(keep, source, torch.arange(n_clusters))
        for param in [layer.cluster_router] + (list(layer.bank.parameters()) if cfg.compress else []):
            carry[param] = (index, keep)
    return Regrouping(moved(order, m), gain, skipped, [], carry)


@torch.no_grad()
def recluster(layer, settings: ClusterSettings = ClusterSettings(), seed: int = 0) -> Regrouping:
    """Propose a grouping from one moe.MoE layer's weights and statistics (cluster.propose),
    then apply it: first_clustering the first time, regroup after (every cluster is
    re-factorized even when the groups stay: training moves each residual off the shared
    mean, and re-centring puts it back)."""
    cfg = layer.cfg
    first = not layer.has_clusters
    w1, w2 = (w.detach() for w in layer.bank.weights())
    probe = layer.probe[:min(int(layer.probe_seen), layer.probe.shape[0])]
    groups = None if first else torch.arange(cfg.n_experts) // (cfg.n_experts // cfg.n_clusters)
    proposal = propose(w1, w2, layer.input_mean, layer.router.weight, probe, groups,
                       cfg.n_clusters, settings, seed)
    if first:
        result = first_clustering(layer, proposal.assignment, proposal.gain, w1, w2)
    else:
        order = cluster_order(proposal.assignment, cfg.n_clusters)
        result = regroup(layer, order, proposal.gain, proposal.skipped, w1, w2)
    result.rank, result.of, result.margin = proposal.rank, proposal.of, proposal.margin
    return result


@dataclass
class Recluster:
    """One recluster event over a model's layers."""
    moved: int = 0                                   # experts that changed cluster, all layers
    gain: list = field(default_factory=list)         # per layer
    skipped: list = field(default_factory=list)      # per layer
    rank: list = field(default_factory=list)         # per layer: see Regrouping
    of: list = field(default_factory=list)           # per layer
    margin: list = field(default_factory=list)       # per layer
    reset: list = field(default_factory=list)        # parameters created (no optimizer state)
    carry: dict = field(default_factory=dict)        # see Regrouping
    created: bool = False                            # parameters were replaced: rebuild the optimizer
    seconds: float = 0.0                             # the regrouping's wall time (train.py)
    shock_s: float = 0.0                             # the shock measurement's wall time (train.py)
    rule: dict | None = None                         # --regroup_rule=loss: its numbers (train.py)

    def add(self, layer: Regrouping, created: bool | None = None):
        self.moved += layer.moved
        for name in ("gain", "skipped", "rank", "of", "margin"):
            getattr(self, name).append(getattr(layer, name))
        self.reset += layer.reset
        self.carry.update(layer.carry)
        self.created |= bool(layer.reset) if created is None else created


def recluster_model(model: nn.Module, settings: ClusterSettings = ClusterSettings(),
                    seed: int = 0) -> Recluster:
    """recluster every MoE layer of a GPT (layer i with seed + i)."""
    total = Recluster()
    for i, layer in enumerate(model.moe_layers()):
        total.add(recluster(layer, settings, seed + i))
    return total


def carry_rows(state: dict, index: torch.Tensor | None, keep: torch.Tensor | None) -> dict:
    """One parameter's optimizer state (e.g. AdamW's step, exp_avg, exp_avg_sq) -> the state
    for the regrouped parameter: tensors shaped like it take rows `index` along dim 0, rows
    where `keep` is False become zero; scalars (the step count) stay. Zeroed moments under an
    advanced step count (no bias correction left) make a row's update m / sqrt(v) start at
    (1 - beta1) / sqrt(1 - beta2) of a fresh optimizer's: 0.45x with train.py's betas
    (0.9, 0.95), at most 1.1x later, a gentle restart (with beta2 = 0.999 it would be 3.2x)."""
    if index is None and keep is None:
        return state
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if index is not None:
                value = value[index.to(value.device)]
            if keep is not None:
                mask = keep.to(value.device).view(-1, *[1] * (value.dim() - 1))
                value = torch.where(mask, value, torch.zeros((), dtype=value.dtype,
                                                            device=value.device))
        out[key] = value
    return out


def carry_optimizer_state(optimizer: torch.optim.Optimizer, result) -> None:
    """Apply a recluster(_model) result to an optimizer's state, in place: drop the state of
    `reset` parameters, permute and zero rows of `carry` parameters. Parameters are the same
    objects before and after a regroup (the bank is filled in place), so the optimizer
    itself survives; only the first clustering creates parameters (rebuild it then)."""
    for param in result.reset:
        optimizer.state.pop(param, None)
    for param, (index, keep) in result.carry.items():
        if param in optimizer.state:
            optimizer.state[param] = carry_rows(optimizer.state[param], index, keep)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every MoE layer's parameters and buffers and their optimizer state, cloned: what
    `restore` puts back when a regroup is rejected (--regroup_rule=loss)."""
    tensors = [dict(layer.named_parameters()) | dict(layer.named_buffers()) for layer in model.moe_layers()]
    return {"tensors": [{name: t.detach().clone() for name, t in layer.items()} for layer in tensors],
            "optimizer": {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                          for layer in model.moe_layers() for p in layer.parameters() if p in optimizer.state}}


@torch.no_grad()
def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put back what `snapshot` took, in place: a regroup keeps its parameter objects, so the
    optimizer and the compiled model still hold the right ones."""
    for layer, tensors in zip(model.moe_layers(), saved["tensors"]):
        current = dict(layer.named_parameters()) | dict(layer.named_buffers())
        for name, value in tensors.items():
            current[name].copy_(value)
        for p in layer.parameters():
            optimizer.state.pop(p, None)
    for p, state in saved["optimizer"].items():
        optimizer.state[p] = state

