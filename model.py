"""The network: GPTConfig, causal attention, dense MLP, the MoE layer, and GPT.

Owns: the forward pass, parameter accounting, and the MoE layer's state (router weights,
expert bank, and running statistics as buffers, so a checkpoint captures everything).
Does not own: routing math (router.py), expert compute (experts.py), regrouping experts
(cluster.py), training (train.py).

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
from experts import ClusteredBank, ExpertBank, gelu, grouped_available
from router import hierarchical_route, topk_route

MOE_KINDS = ("dense", "topk", "clustered")


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
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes at most cf*N*k/E slots
    moe_impl: str = "auto"        # auto | grouped | loop

    def validate(self):
        """Raise ValueError naming the field and the rule for any inconsistent setting."""
        rules = [
            (self.moe in MOE_KINDS, f"moe must be one of {MOE_KINDS}, got {self.moe!r}"),
            (self.moe_impl in ("auto", "grouped", "loop"), "moe_impl must be auto|grouped|loop"),
            (self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.ffn_hidden) > 0,
             "n_layer, n_head, n_embd, block_size, ffn_hidden must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.top_k >= 1, "top_k must be >= 1"),
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

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
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

    def __init__(self, cfg: GPTConfig, out_std: float):
        super().__init__()
        self.cfg = cfg
        d, n_experts = cfg.n_embd, cfg.n_experts
        self.router = nn.Linear(d, n_experts, bias=False)   # rows = expert embeddings
        self.bank = ExpertBank(n_experts, d, cfg.ffn_hidden, out_std)
        self.register_parameter("cluster_router", None)   # (G, d), set when clustered
        self.offload = None                                 # an offload.ClusterOffloader, if attached
        # Running statistics, read by train.py (load CV) and cluster.py (activation similarity).
        self.register_buffer("expert_counts", torch.zeros(n_experts))
        self.register_buffer("cluster_counts", torch.zeros(max(cfg.n_clusters, 1)))
        self.register_buffer("input_mean", torch.zeros(n_experts, d))
        self.register_buffer("expert_ids", torch.arange(n_experts))  # original id in each slot
        self.register_buffer("n_reclusters", torch.zeros((), dtype=torch.long))
        self.stats_momentum = 0.99

    @property
    def clustered(self) -> bool:
        return isinstance(self.bank, ClusteredBank)

    def make_clustered(self):
        """Swap in an (empty) ClusteredBank and cluster router; cluster.py fills them."""
        cfg = self.cfg
        self.bank = ClusteredBank(cfg.n_clusters, cfg.n_experts // cfg.n_clusters, cfg.n_embd,
                                  cfg.ffn_hidden, cfg.rank).to(self.router.weight.device)
        self.cluster_router = nn.Parameter(torch.zeros(cfg.n_clusters, cfg.n_embd,
                                                       device=self.router.weight.device))

    def route(self, x):
        cfg = self.cfg
        logits = self.router(x)                                           # (N, E)
        if self.clustered:
            return hierarchical_route(F.linear(x, self.cluster_router), logits, cfg.top_k,
                                      cfg.aux_loss_coef, cfg.z_loss_coef)
        return topk_route(logits, cfg.top_k, cfg.aux_loss_coef, cfg.z_loss_coef)

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                           # (N, C)
        routing = self.route(x)
        impl = self.cfg.moe_impl
        grouped = impl == "grouped" or (impl == "auto" and grouped_available(x.device))
        if self.offload is not None:
            y = self.offload.run(self, x, routing, grouped)
        elif self.clustered:
            y = self.bank(x, routing, grouped)
        else:
            y = self.bank(x, routing, grouped, self.cfg.capacity_factor)
        self._record(x, routing)
        return y.view(B, T, C), routing.aux_loss

    @torch.no_grad()
    def _record(self, x, routing):
        self.expert_counts.copy_(routing.expert_counts)
        if routing.cluster_counts is not None:
            self.cluster_counts.copy_(routing.cluster_counts)
        if self.training:
            # Mean input routed to each expert, as one small matmul (no scatter), then an EMA;
            # experts that got no token this step keep their old mean.
            dispatch = torch.zeros(x.shape[0], self.router.out_features, device=x.device,
                                   dtype=x.dtype).scatter_(1, routing.expert_idx, 1.0)
            mean = (dispatch.t() @ x).float() / routing.expert_counts.clamp(min=1).unsqueeze(-1)
            decay = torch.where(routing.expert_counts > 0, self.stats_momentum, 1.0).unsqueeze(-1)
            self.input_mean.mul_(decay).add_((1 - decay) * mean)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        if cfg.moe == "dense":
            self.ffn = MLP(cfg.n_embd, cfg.top_k * cfg.ffn_hidden)
        else:
            self.ffn = MoE(cfg, out_std)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
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
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def hidden_states(self, idx):
        """idx (B, T) -> final-norm hidden states (B, T, C) and the summed MoE aux loss."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))                      # (B, T, C)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, layer_aux = block(x)
            aux = aux + layer_aux
        return self.ln_f(x), aux

    def forward(self, idx, targets=None):
        """-> (logits, lm_loss or None, aux_loss). Train on lm_loss + aux_loss."""
        x, aux = self.hidden_states(idx)
        if targets is None:
            return x[:, -1:] @ self.wte.weight.t(), None, aux             # (B, 1, V)
        logits = x @ self.wte.weight.t()                                   # (B, T, V), tied
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, aux

    def prepare_state_dict(self, state_dict: dict):
        """Give each MoE layer the bank type (clustered, quantized) the checkpoint holds,
        before load_state_dict."""
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}.ffn.bank."
            if isinstance(block.ffn, MoE) and prefix + "base1" in state_dict:
                if not block.ffn.clustered:
                    block.ffn.make_clustered()
                if prefix + "u1_q.packed" in state_dict:
                    block.ffn.bank.quantize_(base_dtype=state_dict[prefix + "base1"].dtype)

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

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        for _ in range(max_new_tokens):
            logits, _, _ = self(idx[:, -self.cfg.block_size:])
            logits = logits[:, -1].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
