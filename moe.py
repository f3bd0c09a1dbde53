"""The MoE layer as it runs: a router, an expert bank, and the state it keeps about its experts.

Owns: `MoE` (route -> dispatch -> record), its state as parameters and buffers so a checkpoint
captures everything (router rows, the bank, the cluster router once clustered, running loads,
the balancing biases, and for clustered models what regrouping reads: each expert's mean
input and a probe of recent inputs), the bias update after each step (`balance_step`), and
its two shapes: top-k, or clustered (`make_clustered`).
Also the hooks the machinery plugs into: `dispatch` (expert parallelism replaces it) and an
offloader attached with `attach_offload` (offload.py).
Does not own: routing math (router.py), expert compute (experts.py), how its experts are
regrouped (cluster.py proposes, regroup.py applies), the network around it (model.py).
Shapes: N tokens, C = d = n_embd, E experts, G clusters of m = E / G, k experts per token.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import ClusteredBank, ExpertBank, resolve_combine, resolve_matmul
from router import Routing, bias_update, hierarchical_route, topk_route


class MoE(nn.Module):
    """Router + expert bank + statistics. forward(x (B, T, C)) -> (y, aux_loss)."""

    def __init__(self, cfg, bank: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        d, n_experts, n_clusters = cfg.n_embd, cfg.n_experts, max(cfg.n_clusters, 1)
        self.router = nn.Linear(d, n_experts, bias=False)   # rows = expert embeddings
        self.bank = bank if bank is not None else \
            ExpertBank(n_experts, d, cfg.ffn_hidden, cfg.capacity_factor)
        self.register_parameter("cluster_router", None)   # (G, d), set by the first clustering
        self.offload, self.offload_index = None, 0          # attach_offload's hook
        # Running statistics, read by train.py (load CV) and cluster.py (activation similarity).
        self.register_buffer("expert_counts", torch.zeros(n_experts))
        self.register_buffer("cluster_counts", torch.zeros(n_clusters))
        self.register_buffer("input_mean", torch.zeros(n_experts, d))
        self.register_buffer("expert_ids", torch.arange(n_experts))  # original id in each slot
        self.register_buffer("n_reclusters", torch.zeros((), dtype=torch.long))
        # balance=bias: added to the router's probabilities only to choose (router.py); loads
        # summed over one optimizer step's micro-batches drive the update (balance_step).
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.register_buffer("cluster_bias", torch.zeros(n_clusters))
        self.register_buffer("step_counts", torch.zeros(n_experts), persistent=False)
        self.register_buffer("step_cluster_counts", torch.zeros(n_clusters), persistent=False)
        # The paper's EMA of activation centroids, mu <- (1 - rate) mu + rate * mean(x), rate 0.05.
        self.stats_rate = cfg.stats_rate
        # A probe batch of recent layer inputs (any cluster's tokens), so cluster.py can compare
        # every expert on the same tokens; a ring buffer, probe_seen = rows written so far.
        self.register_buffer("probe", torch.zeros(cfg.probe_tokens, d))
        self.register_buffer("probe_seen", torch.zeros((), dtype=torch.long))
        self._resolve_impl()

    def _resolve_impl(self):
        """moe_impl -> the functions the bank calls, once per build or move, not per forward."""
        impl, device = self.cfg.moe_impl, self.router.weight.device
        self.bank.matmul = resolve_matmul("auto" if impl == "triton" else impl, device)
        if isinstance(self.bank, ClusteredBank):
            self.bank.combine = resolve_combine(impl, device)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda(): the device may have changed
        super()._apply(fn, *args, **kwargs)
        self._resolve_impl()
        return self

    @property
    def compressed(self) -> bool:
        """Whether the bank is a ClusteredBank (shared bases + rank-r residuals)."""
        return isinstance(self.bank, ClusteredBank)

    @property
    def has_clusters(self) -> bool:
        """Whether experts are grouped (a cluster router exists), compressed or not."""
        return self.cluster_router is not None

    # ----- the forward pass: route, dispatch, record -----

    def cluster_logits(self, x, expert_logits=None):
        """Stage-1 scores (N, G). 'experts': log of each cluster's share of the flat softmax over
        all E experts, so the chosen cluster is the one the flat router likes most in total."""
        if self.cfg.cluster_scores == "experts":
            logits = self.router(x) if expert_logits is None else expert_logits
            return logits.view(x.shape[0], self.cfg.n_clusters, -1).logsumexp(-1)
        return F.linear(x, self.cluster_router.to(x.dtype))

    def route(self, x):
        cfg = self.cfg
        logits = self.router(x)                                           # (N, E)
        bias = cfg.balance == "bias"
        if self.has_clusters and cfg.hierarchical:
            return hierarchical_route(self.cluster_logits(x, logits), logits, cfg.top_k,
                                      cfg.aux_loss_coef, cfg.z_loss_coef,
                                      self.cluster_bias if bias else None,
                                      self.expert_bias if bias else None)
        return topk_route(logits, cfg.top_k, cfg.aux_loss_coef, cfg.z_loss_coef,
                          self.expert_bias if bias else None)

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                           # (N, C)
        routing = self.route(x)
        y = self.dispatch(x, routing)
        self._record(x, routing)
        return y.view(B, T, C), routing.aux_loss

    def dispatch(self, x, routing):
        """Tokens (N, C) and their routing -> each token's gated sum of its experts (N, C):
        the bank here, or an attached offloader's copies, or (the no-hierarchy ablation) the
        bank once per (token, slot). parallel/ep.py overrides it to send tokens to other ranks."""
        if self.offload is not None:
            return self.offload.run(self, x, routing)
        if self.compressed and routing.cluster_idx is None:
            return self._flat_over_clusters(x, routing)
        return self.bank(x, routing)

    def _flat_over_clusters(self, x, routing):
        """The 'no hierarchical routing' ablation: a token's k experts may sit in k different
        clusters, so each (token, slot) pair is its own row with one expert, and computes its
        cluster's base for itself (k bases per token: what the hierarchy saves)."""
        n_tokens, k = routing.expert_idx.shape
        m = self.cfg.n_experts // self.cfg.n_clusters
        expert_idx = routing.expert_idx.reshape(-1, 1)                    # (N*k, 1)
        slots = Routing(expert_idx, torch.ones_like(expert_idx, dtype=routing.gates.dtype),
                        routing.aux_loss, routing.expert_counts, expert_idx.squeeze(1) // m)
        y = self.bank(x.repeat_interleave(k, dim=0), slots).view(n_tokens, k, -1)
        return (y * routing.gates.to(y.dtype).unsqueeze(-1)).sum(1)

    @torch.no_grad()
    def _record(self, x, routing):
        self.expert_counts.copy_(routing.expert_counts)
        if routing.cluster_counts is not None:
            self.cluster_counts.copy_(routing.cluster_counts)
        elif self.has_clusters:  # flat routing over clustered experts: slots per cluster
            self.cluster_counts.copy_(routing.expert_counts.view(self.cfg.n_clusters, -1).sum(1))
        if self.training:
            self.step_counts.add_(routing.expert_counts)
            self.step_cluster_counts.add_(self.cluster_counts)
        if self.training and self.cfg.moe == "clustered":  # what regrouping reads; top-k never regroups
            # Mean input routed to each expert, as one small matmul (no scatter), then an EMA;
            # experts that got no token this step keep their old mean.
            dispatch = torch.zeros(x.shape[0], self.router.out_features, device=x.device,
                                   dtype=x.dtype).scatter_(1, routing.expert_idx, 1.0)
            mean = (dispatch.t() @ x).float() / routing.expert_counts.clamp(min=1).unsqueeze(-1)
            decay = torch.where(routing.expert_counts > 0, 1 - self.stats_rate, 1.0).unsqueeze(-1)
            self.input_mean.mul_(decay).add_((1 - decay) * mean)
            # Probe: a strided sample of this step's tokens (all sequences and positions) into
            # the ring, with slots computed on the device (no host sync).
            n_probe = self.probe.shape[0]
            take = min(n_probe, x.shape[0])
            rows = x[::x.shape[0] // take][:take]                          # (take, C)
            slots = (self.probe_seen + torch.arange(take, device=x.device)) % n_probe
            self.probe.index_copy_(0, slots, rows.to(self.probe.dtype))
            self.probe_seen.add_(take)

    @torch.no_grad()
    def balance_step(self):
        """After each optimizer step, with the step's loads in step_counts (every micro-batch;
        train.py sums them over ranks first): balance=bias nudges each bias toward an even
        load, experts within their cluster once clustered (router.bias_update). Then the
        counts start afresh."""
        cfg = self.cfg
        if cfg.balance == "bias":
            hierarchical = self.has_clusters and cfg.hierarchical
            self.expert_bias.add_(bias_update(self.step_counts, cfg.bias_rate,
                                              cfg.n_clusters if hierarchical else 1))
            if hierarchical:
                self.cluster_bias.add_(bias_update(self.step_cluster_counts, cfg.bias_rate))
        self.step_counts.zero_()
        self.step_cluster_counts.zero_()

    # ----- the hooks offload.py uses -----

    def attach_offload(self, offloader, index: int = 0):
        """Let `offloader` (offload.ClusterOffloader, or None to detach) serve this layer's
        clusters: dispatch goes through its run(), and with anticipates its Block hands it
        the block's input before attention."""
        self.offload, self.offload_index = offloader, index

    @property
    def anticipates(self) -> bool:
        return self.offload is not None and self.offload.predict_at == "block"

    def anticipate(self, h):
        """h: this block's LayerNorm'd input (B, T, C), seen before attention runs."""
        self.offload.anticipate(self.offload_index, h)

    # ----- its clustered shape (regroup.py fills it) -----

    def make_clustered(self):
        """Add the (empty) cluster router and, with compress, swap in an empty ClusteredBank;
        regroup.first_clustering fills them. Without compress the experts stay full."""
        cfg, device = self.cfg, self.router.weight.device
        if cfg.compress:
            self.bank = ClusteredBank(cfg.n_clusters, cfg.n_experts // cfg.n_clusters, cfg.n_embd,
                                      cfg.ffn_hidden, cfg.rank).to(device)
        self.cluster_router = nn.Parameter(torch.zeros(cfg.n_clusters, cfg.n_embd, device=device))
        self._resolve_impl()
