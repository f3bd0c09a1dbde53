"""Expert parallelism: each rank holds 1/W of a MoE layer's experts, and tokens travel to the
ranks that own their experts and back (a torchtitan-style token dispatcher).

Owns: the differentiable all-to-all (`AllToAll`), the counts exchange, the process groups
(`expert_parallel_groups`), expert placement
(contiguous blocks of E/W experts per rank; for the clustered bank whole clusters, G/W per
rank), `ExpertParallelMoE` (one moe.MoE layer spread over a process group),
`shard_state` / `gather_state` (a layer's bank <-> one rank's slice of it), and for a whole
GPT: `parallelize` and the gradient sync and clipping that replace DDP's (train.py sets up
the groups). The state of a parallelized GPT (full checkpoints, optimizer moments,
reclustering) is ep_state.py's.
Does not own: routing math (router.py), expert compute (experts.py: the shard runs the same
ExpertBank / ClusteredBank forward on a smaller bank), the router's gradient all-reduce (the
router is replicated: it is a data-parallel parameter like attention's), running statistics
(moe.MoE's code, on this rank's tokens).

Shapes: N local tokens, d model width, h expert width, E experts, G clusters, m = E / G,
r rank, k experts per token, W world size, E_r = E / W experts per rank, S rows this rank
sends (one per token and destination rank), R rows it receives.

One forward, on every rank:
    route locally -> owner rank of each (token, slot) = expert // E_r
    one row per (token, owner rank): a clustered token goes to ONE rank with its k expert
        ids and gates; a top-k token goes to each distinct rank among its k experts, once,
        carrying the ids and gates of the experts that rank holds
    counts exchange (the one host sync) -> all-to-all of rows, gates and local expert ids
    the local bank computes each received row's gated sum over the slots it holds
    reverse all-to-all, one row back per row received -> sum over the ranks a token visited
Dropless only: a capacity limit depends on every rank's queue, which no rank sees.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from cli import check_rules
from experts import ClusteredBank, ExpertBank
from moe import MoE
from router import Routing, count


# benchmarks/expert_parallel.py sets this to a list to time every exchange: (start, end) CUDA events around each.
COMM_EVENTS = None
# And this to True to time the transfer alone: a 1-element all-reduce before each exchange
# lines the ranks up, so `start` follows the slowest rank's arrival and the wait for it
# (load imbalance, slower compute elsewhere) falls outside the events.
ALIGN_BEFORE_EXCHANGE = False


def _all_to_all(out, x, recv_counts=None, send_counts=None, group=None):
    timing = COMM_EVENTS is not None and x.is_cuda
    if timing:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if ALIGN_BEFORE_EXCHANGE:
            dist.all_reduce(torch.zeros(1, device=x.device), group=group)
        start.record()
    dist.all_to_all_single(out, x, recv_counts, send_counts, group=group)
    if timing:
        end.record()
        COMM_EVENTS.append((start, end))


def _exchange(x, send_counts: list[int], recv_counts: list[int], group):
    """Rows of x in destination order -> rows received, in source-rank order."""
    out = x.new_empty(sum(recv_counts), *x.shape[1:])
    _all_to_all(out, x.contiguous(), recv_counts, send_counts, group)
    return out


class AllToAll(torch.autograd.Function):
    """x (S, ...) -> (R, ...): the first send_counts[0] rows go to rank 0, the next
    send_counts[1] to rank 1, ...; recv_counts[j] rows arrive from rank j, in rank order.
    The backward is the same exchange reversed: each gradient row goes home."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return _exchange(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return _exchange(grad, recv_counts, send_counts, ctx.group), None, None, None


def exchange_counts(send: torch.Tensor, group) -> tuple[list, list]:
    """send (W, c) int64, c counts per destination rank -> (what this rank sends, what it
    receives from each rank) as host lists of (W, c). all_to_all_single's split sizes are
    host integers, so this .tolist() is the forward's one host sync."""
    recv = torch.empty_like(send)
    _all_to_all(recv, send.contiguous(), group=group)               # row j to / from rank j
    both = torch.stack([send, recv]).tolist()
    return both[0], both[1]


def shard_state(layer: MoE, rank: int, world: int) -> dict:
    """This rank's slice of layer.bank's state: rows [rank*n, (rank+1)*n) of every bank
    tensor, n = E / W experts (ExpertBank) or G / W clusters (ClusteredBank)."""
    state = layer.bank.state_dict()
    n = next(iter(state.values())).shape[0] // world
    return {name: t[rank * n:(rank + 1) * n].detach().clone() for name, t in state.items()}


@torch.no_grad()
def gather_state(ep: "ExpertParallelMoE") -> dict:
    """The full layer's state, in moe.MoE's state_dict names (router.weight, cluster_router,
    bank.*, the statistics buffers), gathered from every rank's shard: what a checkpoint holds."""
    state = {"router.weight": ep.router.weight.detach().clone()}
    state.update({name: buf.clone() for name, buf in ep._buffers.items()
                  if name not in ep._non_persistent_buffers_set})
    if ep.cluster_router is not None:
        state["cluster_router"] = ep.cluster_router.detach().clone()
    for name, shard in ep.bank.state_dict().items():
        if ep.world == 1:
            state["bank." + name] = shard.clone()
            continue
        parts = [torch.empty_like(shard) for _ in range(ep.world)]
        dist.all_gather(parts, shard.contiguous(), group=ep.group)
        state["bank." + name] = torch.cat(parts)
    return state


def _check(layer: MoE, world: int):
    bank, cfg = layer.bank, layer.cfg
    n_groups = bank.n_clusters if isinstance(bank, ClusteredBank) else cfg.n_experts
    rules = [
        (layer.offload is None, "an offloaded layer cannot be expert-parallel"),
        (not getattr(bank, "quantized", False), "a quantized bank is for inference"),
        (cfg.capacity_factor == 0, "expert parallelism is dropless: capacity_factor must be 0"),
        (n_groups % world == 0,
         f"{'clusters' if isinstance(bank, ClusteredBank) else 'experts'} ({n_groups}) "
         f"must be divisible by the world size ({world})"),
        (not isinstance(bank, ClusteredBank) or cfg.hierarchical,
         "a clustered bank needs hierarchical routing (one cluster per token)"),
    ]
    check_rules(rules, "expert-parallel")


def _local_bank(layer: MoE, rank: int, world: int):
    """Rank `rank`'s slice of a full layer's bank, as a bank of the same kind."""
    bank, cfg = layer.bank, layer.cfg
    if isinstance(bank, ClusteredBank):
        local = ClusteredBank(bank.n_clusters // world, bank.m, cfg.n_embd, cfg.ffn_hidden, bank.rank)
    else:
        local = ExpertBank(cfg.n_experts // world, cfg.n_embd, cfg.ffn_hidden)
    local.load_state_dict(shard_state(layer, rank, world))
    return local.to(layer.router.weight.device)


class ExpertParallelMoE(MoE):
    """A moe.MoE layer spread over a process group: router (and cluster router) replicated,
    the bank sharded (memory per rank ~ 1/W). It is a MoE: routing, the running statistics
    (of this rank's tokens), balancing and the state a checkpoint holds are the parent's;
    only `dispatch`, where tokens meet their experts, differs. aux_loss is over this rank's
    tokens. Built from a full layer; the layer itself is not kept.

    bytes_sent: after each forward, {'dispatch', 'combine'} bytes this rank sent to OTHER
    ranks (rows * d * element size; the rows a rank keeps for itself are not counted).
    """

    def __init__(self, layer: MoE, group=None):
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        _check(layer, world)
        super().__init__(layer.cfg, bank=_local_bank(layer, rank, world))
        self.group, self.world, self.rank = group, world, rank
        self.experts_per_rank = layer.cfg.n_experts // world                # E_r
        self.bytes_sent = {"dispatch": 0, "combine": 0}
        self.to(layer.router.weight.device)
        with torch.no_grad():
            self.router.weight.copy_(layer.router.weight)
            if layer.cluster_router is not None:
                self.cluster_router = nn.Parameter(layer.cluster_router.detach().clone())
            # train.py broadcasts rank 0's statistics before a recluster, as under DDP.
            for name, buf in layer.named_buffers(recurse=False):
                getattr(self, name).copy_(buf)

    @torch.no_grad()
    def adopt(self, layer: MoE) -> bool:
        """Take a full layer's new state (after a recluster): replicated tensors whole, the
        bank's rows of this rank, in place where the parameters exist, so an optimizer keeps
        them. -> whether parameters were created (the first clustering: a new bank and the
        cluster router), which an optimizer must then be rebuilt for."""
        created = False
        if layer.cluster_router is not None and self.cluster_router is None:
            self.cluster_router, created = nn.Parameter(layer.cluster_router.detach().clone()), True
        elif layer.cluster_router is not None:
            self.cluster_router.copy_(layer.cluster_router)
        if type(layer.bank) is not type(self.bank):
            self.bank, created = _local_bank(layer, self.rank, self.world), True
            self._resolve_impl()
        else:
            self.bank.load_state_dict(shard_state(layer, self.rank, self.world))
        self.router.weight.copy_(layer.router.weight)
        for name, buf in layer.named_buffers(recurse=False):
            getattr(self, name).copy_(buf)
        return created

    def dispatch(self, x, routing):
        """Tokens go to the ranks that hold their experts and come back (one process: the bank)."""
        return self.bank(x, routing) if self.world == 1 else self._parallel(x, routing)

    def _parallel(self, x, routing):
        W = self.world
        owner = routing.expert_idx // self.experts_per_rank                # (N, k) slot -> rank
        # One row per (token, destination rank), sorted by destination then token, with no
        # host sync: unvisited pairs get key W and sort past the S rows that are sent.
        visit = torch.zeros(x.shape[0], W, dtype=torch.bool, device=x.device)
        visit.scatter_(1, owner, True)                                     # (N, W)
        key = torch.where(visit, torch.arange(W, device=x.device), W).flatten()  # (N*W,)
        pair = key.argsort(stable=True)
        counts = torch.stack([visit.sum(0), count(owner, W).long()], 1)    # (W, 2) rows, slots
        send, recv = exchange_counts(counts, self.group)
        send_rows, recv_rows = [c[0] for c in send], [c[0] for c in recv]
        pair = pair[:sum(send_rows)]
        token, dest = pair // W, pair % W                                  # (S,) each
        mine = owner[token] == dest.unsqueeze(1)                           # (S, k) slots dest holds
        first = (dest * self.experts_per_rank).unsqueeze(1)               # dest's first expert
        ids = torch.where(mine, routing.expert_idx[token] - first, -1)    # (S, k) local ids
        gates = routing.gates[token] * mine                                # (S, k)

        group = self.group
        x_in = AllToAll.apply(x[token], send_rows, recv_rows, group)      # (R, d)
        gates_in = AllToAll.apply(gates, send_rows, recv_rows, group)     # (R, k)
        ids_in = _exchange(ids, send_rows, recv_rows, group)              # (R, k), -1: not here
        y_in = self._local(x_in, ids_in, gates_in, sum(c[1] for c in recv))
        y_back = AllToAll.apply(y_in, recv_rows, send_rows, group)        # (S, d)
        y = y_back.new_zeros(x.shape).index_add(0, token, y_back)         # (N, d)

        d, me = x.shape[1], self.rank
        self.bytes_sent = {"dispatch": (len(token) - send_rows[me]) * d * x.element_size(),
                           "combine": (len(y_in) - recv_rows[me]) * d * y_in.element_size()}
        return y

    def _local(self, x, ids, gates, n_slots: int):
        """Received rows (R, d) -> each row's gated sum over the slots this rank holds (R, d)."""
        if isinstance(self.bank, ClusteredBank):  # one cluster per token: all k slots are here
            return self.bank(x, Routing(ids, gates, None, None, ids[:, 0] // self.bank.m))
        # Top-k: a row holds 1..k valid slots; compute exactly those, each as a k=1 row.
        k = ids.shape[1]
        slot = (ids < 0).flatten().int().argsort(stable=True)[:n_slots]  # valid first
        row = slot // k
        one = Routing(ids.flatten()[slot, None], gates.flatten()[slot, None], None, None)
        out = self.bank(x[row], one)                                       # (slots, d) gated
        return out.new_zeros(x.shape[0], out.shape[1]).index_add(0, row, out)


def parallelize(model, group) -> None:
    """Swap every moe.MoE of a GPT for an ExpertParallelMoE over `group` (in place; the full
    banks are dropped)."""
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            block.ffn = ExpertParallelMoE(block.ffn, group)


def sync_grads(model, shards: list, world: int, replica_group):
    """Make every gradient that of the mean loss over all ranks (the loss is a mean per rank).
    Replicated parameters saw only this rank's tokens: average over all ranks. A shard's
    gradient already sums the losses of every rank in its expert-parallel group (their tokens
    came to it): sum over its replicas and divide by the world size. Each kind goes as one
    flat bucket (one all-reduce, as DDP's buckets do, not one per tensor); a replica group of
    one rank needs no all-reduce at all."""
    shard_ids = {id(p) for p in shards}
    for p in model.parameters():
        if p.grad is None:          # every rank must join every all-reduce
            p.grad = torch.zeros_like(p)
    replicated = [p.grad for p in model.parameters() if id(p) not in shard_ids]
    sharded = [p.grad for p in shards]
    alone = replica_group is not None and dist.get_world_size(replica_group) == 1
    for grads, group, reduce in ((replicated, None, True), (sharded, replica_group, not alone)):
        for dtype in {g.dtype for g in grads}:
            bucket = [g for g in grads if g.dtype == dtype]
            if reduce:
                flat = torch.cat([g.flatten() for g in bucket])
                dist.all_reduce(flat, group=group)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
            for g in bucket:
                g.div_(world)


def clip_grad_norm(model, shards: list, max_norm: float, ep_group):
    """clip_grad_norm_ over the whole model while the shards are split over ep_group: the
    replicated part is the same on every rank, the shards' squares are summed over the group."""
    shard_ids = {id(p) for p in shards}
    replicated = sum(p.grad.float().pow(2).sum() for p in model.parameters() if id(p) not in shard_ids)
    split = sum(p.grad.float().pow(2).sum() for p in shards)
    dist.all_reduce(split, group=ep_group)
    coef = (max_norm / ((replicated + split).sqrt() + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        p.grad.mul_(coef.to(p.grad.dtype))


def expert_parallel_groups(rank: int, world: int, size: int):
    """-> (this rank's expert-parallel group: `size` consecutive ranks that split the experts,
    its replica group: the ranks at the same position in every expert-parallel group, which
    hold the same shard). new_group is collective: every rank creates every group, in order."""
    if world % size:
        raise ValueError(f"world size ({world}) must be a multiple of expert_parallel ({size})")
    ep_groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    replicas = [dist.new_group(list(range(pos, world, size))) for pos in range(size)]
    return ep_groups[rank // size], replicas[rank % size]
