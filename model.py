"""The network: GPTConfig, init_weights, causal attention with a KV cache, dense MLP, the MoE
layer, and GPT (forward, parameter and FLOP accounting, cached generation).

Owns: the forward pass and the MoE layer's state (router weights, expert bank, and running
statistics as buffers, so a checkpoint captures everything).
Does not own: routing math (router.py), expert compute (experts.py), regrouping experts
(cluster.py), training (train.py). Shapes: B batch, T time, C = n_embd (experts.py's d).

`moe` picks the feed-forward: 'dense' (one MLP, width top_k * ffn_hidden, so it computes the
same FFN FLOPs per token as top-k MoE), 'topk' (E experts, top-k), or 'clustered' (trains as
top-k until cluster.recluster first converts each layer to a ClusteredBank with a
hierarchical router).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import clustered_expert_params
from experts import MATMULS, ClusteredBank, ExpertBank, gelu, resolve_combine, resolve_matmul
from router import Routing, bias_update, hierarchical_route, topk_route

MOE_KINDS = ("dense", "topk", "clustered")
BALANCE = ("aux", "bias")


@dataclass
class GPTConfig:
    vocab_size: int = 50304      # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    moe: str = "topk"
    ffn_hidden: int = 768        # hidden width of one expert (the dense MLP is top_k times wider)
    n_experts: int = 32
    top_k: int = 2
    n_clusters: int = 8
    rank: int = 16
    balance: str = "aux"          # aux: the Switch loss (aux_loss_coef) | bias: DeepSeek-V3's
                                  # per-expert bias that steers the choice, no loss needed
    bias_rate: float = 1e-3       # balance=bias: the bias step after each optimizer step
    aux_loss_coef: float = 0.01   # the Switch balance loss's weight (also usable beside bias)
    z_loss_coef: float = 0.001
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes at most cf*N*k/E slots
    moe_impl: str = "auto"        # auto (grouped on sm90+ CUDA, else loop) | grouped | loop | triton
                                  # (triton: auto's matmuls + fast/triton_combine.py's kernel, CUDA)
    # The paper's ablations (moe=clustered): False drops one part of the method.
    compress: bool = True         # shared base + rank-r residuals; False: full separate experts
    hierarchical: bool = True     # token -> cluster -> experts; False: flat top-k over all E
    cluster_scores: str = "prototype"  # stage-1 logits: prototype (a learned row per cluster,
                                  # the paper's) | experts (logsumexp of the members' logits)
    stats_rate: float = 0.05      # EMA rate of each expert's mean routed input (paper: 0.05)
    probe_tokens: int = 256       # recent layer inputs kept for cluster.py's similarity

    def validate(self):
        """Raise ValueError naming the field and the rule for any inconsistent setting."""
        rules = [
            (self.moe in MOE_KINDS, f"moe must be one of {MOE_KINDS}, got {self.moe!r}"),
            (self.moe_impl in ("auto", "triton", *MATMULS),
             f"moe_impl must be auto|triton|{'|'.join(MATMULS)}, got {self.moe_impl!r}"),
            (self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.ffn_hidden) > 0,
             "n_layer, n_head, n_embd, block_size, ffn_hidden must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.cluster_scores in ("prototype", "experts"), "cluster_scores must be prototype|experts"),
            (self.balance in BALANCE, f"balance must be one of {'|'.join(BALANCE)}, got {self.balance!r}"),
            (self.bias_rate >= 0 and self.aux_loss_coef >= 0, "bias_rate and aux_loss_coef must be >= 0"),
            (self.capacity_factor >= 0, "capacity_factor must be >= 0 (0 = dropless)"),
        ]
        if self.moe != "dense":
            rules.append((self.top_k <= self.n_experts,
                          f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})"))
        if self.moe == "clustered":
            rules += [
                (self.n_clusters >= 1 and self.n_experts % self.n_clusters == 0,
                 f"n_experts ({self.n_experts}) must be divisible by n_clusters ({self.n_clusters})"),
                (self.top_k <= self.n_experts // max(self.n_clusters, 1),
                 f"top_k ({self.top_k}) must be <= experts per cluster "
                 f"(n_experts / n_clusters = {self.n_experts // max(self.n_clusters, 1)})"),
                (1 <= self.rank <= min(self.n_embd, self.ffn_hidden),
                 f"rank ({self.rank}) must be in [1, min(n_embd, ffn_hidden) = "
                 f"{min(self.n_embd, self.ffn_hidden)}]"),
            ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"bad model config: {message}")
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cache=None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(layer, k, v)                               # (B, H, past + T, hd)
        # is_causal puts the mask's diagonal at the top-left corner: right only when queries
        # and keys start at the same position (no past). One new query may see every cached
        # key (no mask); a chunk after a past needs the offset form: query i sees keys <= past + i.
        mask = None
        if cache is not None and cache.positions is not None:  # static: (T, block_size)
            mask = torch.arange(cache.block_size, device=x.device) <= cache.positions.unsqueeze(1)
        elif past and T > 1:
            mask = (torch.arange(past + T, device=x.device)
                    <= past + torch.arange(T, device=x.device).unsqueeze(1))  # (T, past + T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=past == 0 and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d, hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.proj(gelu(self.fc(x))), x.new_zeros(())


class MoE(nn.Module):
    """Router + expert bank + statistics. Returns (y, aux_loss)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d, n_experts = cfg.n_embd, cfg.n_experts
        self.router = nn.Linear(d, n_experts, bias=False)   # rows = expert embeddings
        self.bank = ExpertBank(n_experts, d, cfg.ffn_hidden, cfg.capacity_factor)
        self.register_parameter("cluster_router", None)   # (G, d), set when clustered
        self.offload = None                                 # an offload.ClusterOffloader, if attached
        # Running statistics, read by train.py (load CV) and cluster.py (activation similarity).
        self.register_buffer("expert_counts", torch.zeros(n_experts))
        self.register_buffer("cluster_counts", torch.zeros(max(cfg.n_clusters, 1)))
        self.register_buffer("input_mean", torch.zeros(n_experts, d))
        self.register_buffer("expert_ids", torch.arange(n_experts))  # original id in each slot
        self.register_buffer("n_reclusters", torch.zeros((), dtype=torch.long))
        # balance=bias: added to the router's probabilities only to choose (router.py); loads
        # summed over one optimizer step's micro-batches drive the update (balance_step).
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.register_buffer("cluster_bias", torch.zeros(max(cfg.n_clusters, 1)))
        self.register_buffer("step_counts", torch.zeros(n_experts), persistent=False)
        self.register_buffer("step_cluster_counts", torch.zeros(max(cfg.n_clusters, 1)), persistent=False)
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
    def clustered(self) -> bool:
        return isinstance(self.bank, ClusteredBank)

    @property
    def has_clusters(self) -> bool:
        """Whether experts are grouped (a cluster router exists), compressed or not."""
        return self.cluster_router is not None

    def make_clustered(self):
        """Add the (empty) cluster router and, with compress, swap in an empty ClusteredBank;
        cluster.py fills them. Without compress the experts stay full (cluster.py reorders)."""
        cfg, device = self.cfg, self.router.weight.device
        if cfg.compress:
            self.bank = ClusteredBank(cfg.n_clusters, cfg.n_experts // cfg.n_clusters, cfg.n_embd,
                                      cfg.ffn_hidden, cfg.rank).to(device)
        self.cluster_router = nn.Parameter(torch.zeros(cfg.n_clusters, cfg.n_embd, device=device))
        self._resolve_impl()

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

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                           # (N, C)
        routing = self.route(x)
        if self.offload is not None:
            y = self.offload.run(self, x, routing)
        elif self.clustered and routing.cluster_idx is None:
            y = self._flat_over_clusters(x, routing)
        else:
            y = self.bank(x, routing)
        self._record(x, routing)
        return y.view(B, T, C), routing.aux_loss

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


def init_weights(root: nn.Module, n_layer: int) -> None:
    """Every weight's starting value, in one place (GPT-2's scheme). For a GPT or a bare layer.

    - token and position embeddings, attention qkv, dense MLP fc, router rows, expert W1:
      N(0, 0.02)
    - projections that write into the residual stream (attention proj, dense MLP proj,
      expert W2): N(0, 0.02 / sqrt(2 * n_layer)), so the stream's variance does not grow
      with depth (two writes per block)
    - LayerNorm: weight 1, bias 0
    - the cluster router and a clustered bank: zeros; cluster.recluster fills them from the
      trained experts (the paper clusters trained experts, it does not start clustered)
    """
    out_std = 0.02 / math.sqrt(2 * n_layer)
    for name, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=out_std if name.endswith("proj") else 0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ExpertBank):
            nn.init.normal_(module.w1, std=0.02)
            nn.init.normal_(module.w2, std=out_std)
        elif isinstance(module, ClusteredBank):
            for p in module.parameters():
                nn.init.zeros_(p)
        elif isinstance(module, MoE) and module.cluster_router is not None:
            nn.init.zeros_(module.cluster_router)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        if cfg.moe == "dense":
            self.ffn = MLP(cfg.n_embd, cfg.top_k * cfg.ffn_hidden)
        else:
            self.ffn = MoE(cfg)

    def forward(self, x, cache=None, layer: int = 0):
        offload = getattr(self.ffn, "offload", None)
        if offload is not None and offload.predict_at == "block":
            offload.anticipate(self.ffn.offload_index, self.ln2(x))  # copies overlap attention
        x = x + self.attn(self.ln1(x), cache, layer)
        y, aux = self.ffn(self.ln2(x))
        return x + y, aux


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        init_weights(self, cfg.n_layer)

    def moe_layers(self) -> list[MoE]:
        """Every block's MoE layer (a model.MoE, or ep.ExpertParallelMoE once parallelized)."""
        return [b.ffn for b in self.blocks if not isinstance(b.ffn, MLP)]

    def hidden_states(self, idx, cache=None):
        """idx (B, T) -> final-norm hidden states (B, T, C) and the summed MoE aux loss.
        With a cache, idx continues the cached tokens: positions start at cache.length."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.cfg.block_size}")
        static = cache is not None and cache.positions is not None
        pos = cache.positions if static else torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))                      # (B, T, C)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, layer_aux = block(x, cache, i)
            aux = aux + layer_aux
        if cache is not None:
            cache.length += T
        return self.ln_f(x), aux

    def forward(self, idx, targets=None, cache=None):
        """-> (logits, lm_loss or None, aux_loss). Train on lm_loss + aux_loss."""
        x, aux = self.hidden_states(idx, cache)
        if targets is None:
            return x[:, -1:] @ self.wte.weight.t(), None, aux             # (B, 1, V)
        logits = x @ self.wte.weight.t()                                   # (B, T, V), tied
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, aux

    def prepare_state_dict(self, state_dict: dict):
        """Give each MoE layer the bank type (clustered, quantized) the checkpoint holds,
        before load_state_dict."""
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}.ffn."
            if isinstance(block.ffn, MoE):  # checkpoints older than these buffers
                for name in ("probe", "probe_seen", "expert_bias", "cluster_bias"):
                    state_dict.setdefault(prefix + name, torch.zeros_like(getattr(block.ffn, name)))
            if isinstance(block.ffn, MoE) and prefix + "cluster_router" in state_dict:
                if not block.ffn.has_clusters:
                    block.ffn.make_clustered()
                if prefix + "bank.u1_q.packed" in state_dict:
                    block.ffn.bank.quantize_(base_dtype=state_dict[prefix + "bank.base1"].dtype)

    def param_counts(self) -> dict:
        """total, expert (all expert banks), and active (touched per token; embedding once)."""
        cfg = self.cfg
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for m in self.moe_layers() for p in m.bank.parameters())
        active = total - expert
        d, h, k = cfg.n_embd, cfg.ffn_hidden, cfg.top_k
        for layer in self.moe_layers():
            if layer.clustered:
                per_expert = clustered_expert_params(1, 1, d, h, cfg.rank) - 2 * d * h
                active += 2 * d * h + k * per_expert
            else:
                active += k * 2 * d * h
        return {"total_params": total, "expert_params": expert, "active_params": active}

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per active weight that is a matmul
        operand (the position table is a lookup, the tied token table is the LM head) plus
        attention's scores and mixing over a full block, 12 * n_layer * n_embd * block_size
        (the PaLM appendix's count)."""
        cfg = self.cfg
        matmul_params = self.param_counts()["active_params"] - self.wpe.weight.numel()
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
