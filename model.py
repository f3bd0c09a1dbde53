"""The network: GPTConfig, init_weights, causal attention (reading and writing a KV cache
when generating), the dense MLP, Block and GPT (forward, parameter and FLOP accounting).

Owns: the forward pass around the feed-forward and every weight's starting value.
Does not own: the MoE layer and its state (moe.py), routing math (router.py), expert compute
(experts.py), the cache and the decode loop (generate.py), training (train.py).
Shapes: B batch, T time, C = n_embd (experts.py's d).

`moe` picks the feed-forward: 'dense' (one MLP, width top_k * ffn_hidden, so it computes the
same FFN FLOPs per token as top-k MoE), 'topk' (E experts, top-k), or 'clustered' (trains as
top-k until regroup.recluster first converts each layer to a ClusteredBank with a
hierarchical router).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import clustered_expert_params
from experts import MATMULS, ClusteredBank, ExpertBank, gelu
from moe import MoE

MOE_KINDS = ("dense", "topk", "clustered")
BALANCE = ("aux", "bias")


@dataclass
class GPTConfig:
    """The network. The defaults are the quick model `python train.py` trains in minutes on
    a CPU; train.PRESETS holds the sizes the results use."""
    # model:
    moe: str = "topk"             # the feed-forward: dense | topk | clustered
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # model width d
    block_size: int = 128         # context length in tokens
    vocab_size: int = 50304       # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    dropout: float = 0.0          # on embeddings and attention (GLUE fine-tuning sets its own)
    ffn_hidden: int = 256         # hidden width of one expert (the dense MLP is top_k times wider)
    n_experts: int = 8            # experts per MoE layer (E)
    top_k: int = 2                # experts per token (k)
    # routing:
    balance: str = "aux"          # aux: the Switch loss (aux_loss_coef) | bias: DeepSeek-V3's
                                  # per-expert bias that steers the choice, no loss needed
    bias_rate: float = 1e-3       # balance=bias: the bias step after each optimizer step
    aux_loss_coef: float = 0.01   # the Switch balance loss's weight (also usable beside bias)
    z_loss_coef: float = 0.001    # the router z-loss's weight (keeps logits small)
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes at most cf*N*k/E slots
    moe_impl: str = "auto"        # auto (grouped on sm90+ CUDA, else loop) | grouped | loop |
                                  # triton (auto's matmuls + fast/triton_combine.py's kernel)
    # clustering:
    n_clusters: int = 2           # clusters per layer (G), each of n_experts / G experts
    rank: int = 8                 # rank r of each expert's residual from its cluster's base
    compress: bool = True         # shared base + rank-r residuals; false: full experts (ablation)
    hierarchical: bool = True     # token -> cluster -> experts; false: flat top-k (ablation)
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


def init_weights(root: nn.Module, n_layer: int) -> None:
    """Every weight's starting value, in one place (GPT-2's scheme). For a GPT or a bare layer.

    - token and position embeddings, attention qkv, dense MLP fc, router rows, expert W1:
      N(0, 0.02)
    - projections that write into the residual stream (attention proj, dense MLP proj,
      expert W2): N(0, 0.02 / sqrt(2 * n_layer)), so the stream's variance does not grow
      with depth (two writes per block)
    - LayerNorm: weight 1, bias 0
    - the cluster router and a clustered bank: zeros; regroup.recluster fills them from the
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
        if isinstance(self.ffn, MoE) and self.ffn.anticipates:
            self.ffn.anticipate(self.ln2(x))  # an offloader's copies overlap the attention
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
        """Every block's MoE layer (a moe.MoE, or parallel/ep.py's ExpertParallelMoE)."""
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
            if layer.compressed:
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
