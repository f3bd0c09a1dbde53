"""Routing decisions from router logits: top-k (Switch/Mixtral) and cluster -> expert.

Owns: turning logits into (expert index, gate) per token, the two ways to balance the load
(the Switch auxiliary loss, and DeepSeek-V3's auxiliary-loss-free bias: a per-expert bias
that changes which experts are chosen but not their gates, nudged after every optimizer step
by `bias_update`), the router z-loss (at both stages for the hierarchical router), and the
per-expert / per-cluster token counts the MoE layer records.
Does not own: router parameters (the MoE layer in model.py holds them) or expert compute.

All functions take plain tensors, so tests compare them against a loop over tokens.
Convention for the hierarchical router: experts are stored cluster-major, expert e lives in
cluster e // m with m = E / G experts per cluster (cluster.py keeps the bank in that order).
"""
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    expert_idx: torch.Tensor     # (N, k) long, global expert ids
    gates: torch.Tensor          # (N, k) mixing weights, sum to 1 per token (before dropping)
    aux_loss: torch.Tensor       # () weighted balance + z-loss, add to the LM loss
    expert_counts: torch.Tensor  # (E,) float, token-slot assignments per expert
    cluster_idx: torch.Tensor | None = None     # (N,) long, hierarchical only
    cluster_counts: torch.Tensor | None = None  # (G,) float, hierarchical only


def count(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of 0..n-1 in idx, as float (n,). Unlike torch.bincount, no host sync on CUDA."""
    flat = idx.flatten()
    return torch.zeros(n, device=idx.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def load_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """Switch loss n * sum_i f_i * P_i; equals 1 when routing is perfectly uniform.

    probs (N, n): router probabilities; expert_idx (N, k): chosen ids. f_i is the fraction
    of the N*k assignments that went to i (no gradient), P_i the mean probability of i.
    """
    n = probs.shape[-1]
    fraction = count(expert_idx, n) / expert_idx.numel()
    return n * (fraction * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition; keeps logits small and bf16-safe."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _choose(probs: torch.Tensor, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Indices (N, k) of the top k of probs (+ bias). The bias only steers the choice: the
    gates come from the router's scores alone (DeepSeek-V3)."""
    return (probs if bias is None else probs + bias).topk(k, dim=-1).indices


def _renormalized(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The chosen experts' probabilities renormalized to sum to 1: a softmax over their logits
    (log space: when a bias overrules the router, every chosen probability may underflow to 0,
    and p / sum(p) would be 0 / 0)."""
    return logits.gather(-1, idx).softmax(-1)


def topk_route(logits: torch.Tensor, k: int, balance_coef: float = 0.01,
               z_coef: float = 0.001, bias: torch.Tensor | None = None) -> Routing:
    """Softmax over E experts, keep the top k (of probs + bias, if given), renormalize their
    gates."""
    logits = logits.float()
    probs = logits.softmax(-1)                                 # (N, E)
    expert_idx = _choose(probs, k, bias)                       # (N, k)
    gates = _renormalized(logits, expert_idx)
    aux = balance_coef * load_balance_loss(probs, expert_idx) + z_coef * z_loss(logits)
    return Routing(expert_idx, gates, aux, count(expert_idx, logits.shape[-1]))


def within_cluster_balance_loss(within_probs: torch.Tensor, cluster_idx: torch.Tensor,
                                expert_counts: torch.Tensor, cluster_counts: torch.Tensor,
                                k: int) -> torch.Tensor:
    """The Switch loss inside each cluster, over the tokens it received, averaged over the
    clusters that received any. within_probs (N, m): each token's softmax over its cluster's
    m experts; cluster_idx (N,); expert_counts (E,), cluster_counts (G,) as `count` gives."""
    n_clusters, m = cluster_counts.shape[0], within_probs.shape[-1]
    prob_sum = torch.zeros(n_clusters, m, device=within_probs.device).index_add_(
        0, cluster_idx, within_probs)                                      # (G, m)
    tokens_in = cluster_counts.clamp(min=1).unsqueeze(-1)                 # (G, 1)
    fraction = expert_counts.view(n_clusters, m) / (k * tokens_in)        # (G, m)
    within = m * (fraction * prob_sum / tokens_in).sum(-1)                # (G,)
    used = (cluster_counts > 0).float()                                   # no boolean indexing:
    return (within * used).sum() / used.sum()                             # it would sync


def hierarchical_route(cluster_logits: torch.Tensor, expert_logits: torch.Tensor, k: int,
                       balance_coef: float = 0.01, z_coef: float = 0.001,
                       cluster_bias: torch.Tensor | None = None,
                       expert_bias: torch.Tensor | None = None) -> Routing:
    """Token -> top-1 cluster (softmax over G) -> top-k of the m experts inside it.

    cluster_logits (N, G); expert_logits (N, E), cluster-major. The within-cluster gates are
    renormalized to sum to 1, so the layer's output scale matches a top-k MoE (and does not
    jump when a trained top-k layer is first clustered). The cluster router still needs a
    gradient from the LM loss: gates are multiplied by p_g / p_g.detach(), which is 1 in
    value and passes d(loss)/d(gate) on to the chosen cluster's probability (straight-through;
    as exp(log p_g - log p_g.detach()), which stays 1 when a bias picks a cluster whose p_g
    underflows). Biases (G,) and (E,), if given, steer both choices and leave every gate as it was.
    """
    n_tokens, n_clusters = cluster_logits.shape
    n_experts = expert_logits.shape[-1]
    m = n_experts // n_clusters
    # Stage 1: one cluster per token.
    cluster_logp = cluster_logits.float().log_softmax(-1)                 # (N, G)
    cluster_probs = cluster_logp.exp()
    cluster_idx = _choose(cluster_probs, 1, cluster_bias).squeeze(-1)     # (N,)
    # Stage 2: the top k of the m experts inside that cluster.
    within_logits = expert_logits.float().view(n_tokens, n_clusters, m)
    within_logits = within_logits.gather(1, cluster_idx.view(-1, 1, 1).expand(-1, 1, m)).squeeze(1)  # (N, m)
    within_probs = within_logits.softmax(-1)
    within_bias = None if expert_bias is None else expert_bias.view(n_clusters, m)[cluster_idx]
    local_idx = _choose(within_probs, k, within_bias)                     # (N, k)
    chosen_logp = cluster_logp.gather(-1, cluster_idx.unsqueeze(-1))      # (N, 1)
    gates = _renormalized(within_logits, local_idx) * (chosen_logp - chosen_logp.detach()).exp()
    expert_idx = cluster_idx.unsqueeze(-1) * m + local_idx                # (N, k) global

    cluster_counts = count(cluster_idx, n_clusters)
    expert_counts = count(expert_idx, n_experts)
    balance = load_balance_loss(cluster_probs, cluster_idx.unsqueeze(-1)) + \
        within_cluster_balance_loss(within_probs, cluster_idx, expert_counts, cluster_counts, k)
    aux = balance_coef * balance + z_coef * (z_loss(cluster_logits) + z_loss(within_logits))
    return Routing(expert_idx, gates, aux, expert_counts, cluster_idx, cluster_counts)


def bias_update(counts: torch.Tensor, rate: float, n_groups: int = 1) -> torch.Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3): one step's loads (n,) -> the change of the
    bias (n,): +rate where a load is under the mean of its group, -rate where it is over, then
    centred so a group's biases keep their mean. Groups are consecutive runs of n / n_groups
    (the experts of one cluster compete only with each other)."""
    loads = counts.float().view(n_groups, -1)
    delta = rate * torch.sign(loads.mean(-1, keepdim=True) - loads)
    return (delta - delta.mean(-1, keepdim=True)).flatten()


def load_cv(counts: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation (std / mean) of a load vector; 0 means perfectly even."""
    counts = counts.float()
    return counts.std(unbiased=False) / counts.mean().clamp(min=1e-9)
