"""Expert compute for routed tokens: the top-k expert bank and the clustered bank.

Owns: the grouped-matmul primitive (torch._grouped_mm on CUDA, a loop over groups as the
portable fallback), `ExpertBank` (E independent GELU MLPs, the top-k baseline) and
`ClusteredBank` (per cluster a shared base, per expert rank-r residuals) with the forward
DESIGN.md calls the hot path. Both take a `router.Routing` and return (N, d).
Does not own: routing (router.py), factorization math (compress.py), regrouping (cluster.py).

Tokens are put in expert (or cluster) order with one argsort + bincount; no Python loop
over tokens. The fallback loops over the G or E groups only.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import materialize
from router import Routing


def gelu(x):
    return F.gelu(x, approximate="tanh")


def grouped_available(device) -> bool:
    """torch._grouped_mm's fast CUDA kernels need Hopper (sm90) or newer."""
    device = torch.device(device)
    return (hasattr(torch, "_grouped_mm") and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, grouped: bool):
    """Rows offs[g-1]:offs[g] of x (N, K) times w[g] (K, M) -> (N, M).

    offs: (G,) int32 cumulative row ends, offs[-1] == N. The fused kernel has no autocast
    rule, so operands are cast to the autocast dtype here.
    """
    if grouped:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), w.to(dtype)
        return torch._grouped_mm(x, w, offs=offs)
    ends = offs.tolist()  # one host sync per call: acceptable in the fallback only
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


def _offsets(group_of_row: torch.Tensor, n_groups: int):
    """Sort rows by group: (order, counts, int32 cumulative ends)."""
    order = group_of_row.argsort(stable=True)
    counts = torch.bincount(group_of_row, minlength=n_groups)
    return order, counts, counts.cumsum(0).to(torch.int32)


class ExpertBank(nn.Module):
    """E GELU MLPs d -> h -> d, stored as two (E, d, h) / (E, h, d) tensors."""

    def __init__(self, n_experts: int, d: int, h: int, out_std: float):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, d, h) * 0.02)
        self.w2 = nn.Parameter(torch.randn(n_experts, h, d) * out_std)

    def forward(self, x: torch.Tensor, routing: Routing, grouped: bool,
                capacity_factor: float = 0.0) -> torch.Tensor:
        n_tokens, k = routing.expert_idx.shape
        n_experts = self.w1.shape[0]
        flat = routing.expert_idx.flatten()                              # (N*k,)
        order, counts, offs = _offsets(flat, n_experts)
        xs = x[order // k]                                               # (N*k, d) by expert
        out = grouped_mm(gelu(grouped_mm(xs, self.w1, offs, grouped)), self.w2, offs, grouped)
        gates = routing.gates.flatten()[order]
        if capacity_factor > 0:
            # Position of each slot inside its expert's queue; slots past capacity are dropped
            # (their contribution is zero, the residual stream carries the token on).
            capacity = math.ceil(capacity_factor * flat.numel() / n_experts)
            start = (offs - counts)[flat[order]]
            position = torch.arange(flat.numel(), device=x.device) - start
            gates = gates * (position < capacity)
        out = out * gates.to(out.dtype).unsqueeze(-1)
        slots = torch.empty_like(out).index_put_((order,), out)         # back to token order
        return slots.view(n_tokens, k, -1).sum(1)

    def weights(self):
        """(W1 (E, d, h), W2 (E, h, d)): the full expert matrices."""
        return self.w1, self.w2


class ClusteredBank(nn.Module):
    """Per cluster g: bases B1[g] (d, h), B2[g] (h, d). Per expert e: U1 (d, r), V1 (r, h),
    U2 (h, r), V2 (r, d), with W1_e = B1[g] + U1_e V1_e and W2_e = B2[g] + U2_e V2_e.

    The m experts of a cluster keep their factors side by side: u1 (G, d, m*r) is
    [U1_e for e in cluster] concatenated along the rank axis, v1 (G, m*r, h) stacked. Then
    one grouped matmul gives every member's rank-r code for each token, in cluster order,
    with no per-expert sort. Expert e = g*m + j owns columns j*r:(j+1)*r.
    """

    def __init__(self, n_clusters: int, m: int, d: int, h: int, rank: int):
        super().__init__()
        self.n_clusters, self.m, self.rank = n_clusters, m, rank
        self.base1 = nn.Parameter(torch.zeros(n_clusters, d, h))
        self.base2 = nn.Parameter(torch.zeros(n_clusters, h, d))
        self.u1 = nn.Parameter(torch.zeros(n_clusters, d, m * rank))
        self.v1 = nn.Parameter(torch.zeros(n_clusters, m * rank, h))
        self.u2 = nn.Parameter(torch.zeros(n_clusters, h, m * rank))
        self.v2 = nn.Parameter(torch.zeros(n_clusters, m * rank, d))

    def load_factors(self, base1, u1, v1, base2, u2, v2):
        """Per-expert factors from compress.factorize (cluster-major) -> side-by-side layout."""
        g, m, r = self.n_clusters, self.m, self.rank
        with torch.no_grad():
            self.base1.copy_(base1)
            self.base2.copy_(base2)
            self.u1.copy_(u1.view(g, m, -1, r).permute(0, 2, 1, 3).reshape(g, -1, m * r))
            self.u2.copy_(u2.view(g, m, -1, r).permute(0, 2, 1, 3).reshape(g, -1, m * r))
            self.v1.copy_(v1.reshape(g, m * r, -1))
            self.v2.copy_(v2.reshape(g, m * r, -1))

    def factors(self):
        """Per-expert (U1 (E,d,r), V1 (E,r,h), U2 (E,h,r), V2 (E,r,d)), cluster-major."""
        g, m, r = self.n_clusters, self.m, self.rank
        per_expert_u = lambda u: u.view(g, u.shape[1], m, r).permute(0, 2, 1, 3).reshape(g * m, -1, r)
        return (per_expert_u(self.u1), self.v1.reshape(g * m, r, -1),
                per_expert_u(self.u2), self.v2.reshape(g * m, r, -1))

    def weights(self):
        """(W1 (E, d, h), W2 (E, h, d)): every expert materialized, W = B + U V."""
        u1, v1, u2, v2 = self.factors()
        return materialize(self.base1, u1, v1), materialize(self.base2, u2, v2)

    def forward(self, x: torch.Tensor, routing: Routing, grouped: bool,
                tensors: dict | None = None) -> torch.Tensor:
        """The shared base runs once per token; only rank-r paths run per chosen expert.

            u   = x B1[g]                        a_i = gelu(u + (x U1_i) V1_i)
            z   = sum_i p_i a_i                  y   = z B2[g] + sum_i p_i (a_i U2_i) V2_i

        `tensors` may supply the six weights (e.g. dequantized or offloaded copies) in place
        of the parameters. Capacity limits do not apply: the clustered layer is dropless.
        """
        w = tensors or dict(self.named_parameters())
        n_tokens, k = routing.expert_idx.shape
        g, m, r = self.n_clusters, self.m, self.rank
        order, _, offs = _offsets(routing.cluster_idx, g)
        xs = x[order]                                                     # (N, d) by cluster
        local = (routing.expert_idx - routing.cluster_idx.unsqueeze(-1) * m)[order]  # (N, k)
        gates = routing.gates[order]                                      # (N, k)
        u = grouped_mm(xs, w["base1"], offs, grouped)                     # (N, h)
        codes = grouped_mm(xs, w["u1"], offs, grouped).view(n_tokens, m, r)
        # Masking the other members' codes lets slot i reuse the cluster's stacked V1 in one
        # grouped matmul (m*r-wide, cheap) instead of re-sorting tokens by expert.
        select = F.one_hot(local, m).to(codes.dtype).unsqueeze(-1)        # (N, k, m, 1)
        z, low = 0, 0
        for i in range(k):
            gate = gates[:, i].to(u.dtype).unsqueeze(-1)                  # (N, 1)
            code_i = (codes * select[:, i]).view(n_tokens, m * r)
            a = gelu(u + grouped_mm(code_i, w["v1"], offs, grouped))      # (N, h)
            z = z + gate * a
            back = grouped_mm(a, w["u2"], offs, grouped).view(n_tokens, m, r)
            low = low + back * (select[:, i] * gate.unsqueeze(-1))        # (N, m, r)
        y = grouped_mm(z, w["base2"], offs, grouped) + \
            grouped_mm(low.view(n_tokens, m * r).to(z.dtype), w["v2"], offs, grouped)
        return torch.empty_like(y).index_put_((order,), y)
