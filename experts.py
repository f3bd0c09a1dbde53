"""Expert compute for routed tokens: the top-k expert bank and the clustered bank.

Owns: the grouped-matmul primitives (torch._grouped_mm on CUDA, a loop over groups as the
portable fallback) and `resolve_matmul`, which turns `moe_impl` into the one function a bank
calls; `ExpertBank` (E independent GELU MLPs, the top-k baseline) and `ClusteredBank` (per
cluster a shared base, per expert rank-r residuals) with the forward docs/design.md calls the hot
path. Both banks take (x, routing[, weights]) and return (N, d).
Does not own: routing (router.py), factorization math (compress.py), regrouping (regroup.py),
initial values (model.init_weights: banks are created empty).

Shapes: N tokens, d model width (n_embd), h expert hidden width (ffn_hidden), E experts,
G clusters of m = E / G experts, r residual rank, k experts per token.
Tokens are put in expert (or cluster) order with one argsort + searchsorted, no Python loop
over tokens and no host sync. The fallback loops over the G or E groups only.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import materialize
from router import Routing


def gelu(x):
    return F.gelu(x, approximate="tanh")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on x's device, or None when autocast is off there."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x cast once to the autocast dtype (when on), before it is permuted, not in every matmul."""
    dtype = autocast_dtype(x)
    return x if dtype is None else x.to(dtype)


def grouped_available(device) -> bool:
    """torch._grouped_mm's fast CUDA kernels need Hopper (sm90) or newer."""
    device = torch.device(device)
    return (hasattr(torch, "_grouped_mm") and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] of x (N, K) times w[g] (K, M) -> (N, M), one matmul per group.

    offs: (G,) int32 cumulative row ends, offs[-1] == N. The portable reference.
    """
    ends = offs.tolist()  # one host sync per call: acceptable in the fallback only
    sizes = [end - start for start, end in zip([0] + ends[:-1], ends)]
    # split and unbind, not x[s:e] and w[g]: their backward writes each group's gradient into
    # one shared tensor, where indexing's writes every group's into a zero-filled full-size one.
    return torch.cat([xg @ wg for xg, wg in zip(x.split(sizes), w.unbind(0))])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm_loop's result from one torch._grouped_mm kernel. It has no autocast rule,
    so operands are cast to the autocast dtype here."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, w = x.to(dtype), w.to(dtype)
    # The kernel needs 16-byte aligned rows (multiples of 8 bf16 values). Tiny or odd widths
    # are zero-padded rather than sent to the loop: the loop reads group sizes on the host,
    # which a CUDA graph cannot capture. Zero columns of x meet zero rows of w, so the padded
    # product sliced back is exact.
    step = 16 // x.element_size()
    pad_k, pad_m = -x.shape[-1] % step, -w.shape[-1] % step
    if pad_k or pad_m:
        x, w = F.pad(x, (0, pad_k)), F.pad(w, (0, pad_m, 0, pad_k))
        return torch._grouped_mm(x, w, offs=offs)[:, :w.shape[-1] - pad_m]
    return torch._grouped_mm(x, w, offs=offs)


MATMULS = {"grouped": grouped_mm, "loop": grouped_mm_loop}


def resolve_matmul(impl: str, device):
    """`moe_impl` -> the grouped-matmul function a bank calls; 'auto' picks by device."""
    if impl == "auto":
        impl = "grouped" if grouped_available(device) else "loop"
    if impl not in MATMULS:
        raise ValueError(f"moe_impl must be auto or one of {sorted(MATMULS)}, got {impl!r}")
    return MATMULS[impl]


def combine_reference(pre: torch.Tensor, u: torch.Tensor, gates: torch.Tensor):
    """The clustered bank's elementwise middle: pre (N, k, h), u (N, h), gates (N, k) ->
    a = gelu(pre + u) (N, k, h) and z = sum over k of gates * a (N, h)."""
    a = gelu(pre + u.unsqueeze(1))
    z = (a * gates.to(a.dtype).unsqueeze(-1)).sum(1)
    return a, z


def resolve_combine(impl: str, device):
    """`moe_impl` -> the clustered bank's "add base, GELU, gate, sum over k" step: for
    'triton' on CUDA with Triton, fast.triton_combine's fused op (loaded only then), else the
    plain PyTorch combine_reference above."""
    if impl == "triton":
        from fast.triton_combine import combine_available, gelu_combine
        if combine_available(device):
            return gelu_combine
    return combine_reference


class _PermuteRows(torch.autograd.Function):
    """Row s of the result is row perm[s] // k of x: x[perm] for k = 1, and for k > 1 the
    k slots of each token read straight from x (no (N*k, d) copy of x first). Its backward is
    the gather g[inverse] (summed over each token's k slots). Plain indexing would
    backpropagate through index_put_(accumulate=True), which sorts the indices again."""

    @staticmethod
    def forward(ctx, x, perm, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[perm // k] if k > 1 else x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.k > 1:
            grad = grad.view(-1, ctx.k, grad.shape[-1]).sum(1)
        return grad, None, None, None


def permute_rows(x, perm, inverse, k: int = 1):
    return _PermuteRows.apply(x, perm, inverse, k)


def _sort_rows(group_of_row: torch.Tensor, n_groups: int):
    """Sort rows by group -> (order, inverse, int32 cumulative ends); no host sync."""
    order = group_of_row.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    ends = torch.searchsorted(group_of_row[order],
                              torch.arange(n_groups, device=order.device), right=True)
    return order, inverse, ends.to(torch.int32)


class ExpertBank(nn.Module):
    """E GELU MLPs d -> h -> d, stored as two (E, d, h) / (E, h, d) tensors.

    capacity_factor 0 is dropless; else each expert takes at most cf * N * k / E slots.
    """

    def __init__(self, n_experts: int, d: int, h: int, capacity_factor: float = 0.0):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d, h))
        self.w2 = nn.Parameter(torch.empty(n_experts, h, d))
        self.capacity_factor = capacity_factor
        self.matmul = grouped_mm_loop  # moe.MoE sets it from moe_impl (resolve_matmul)

    def forward(self, x: torch.Tensor, routing: Routing, tensors: dict | None = None) -> torch.Tensor:
        """y_t = sum_i g_ti * W2[e_ti] gelu(W1[e_ti] x_t); `tensors` may replace w1, w2."""
        w1, w2 = (tensors["w1"], tensors["w2"]) if tensors else (self.w1, self.w2)
        n_tokens, k = routing.expert_idx.shape
        n_experts = w1.shape[0]
        flat = routing.expert_idx.flatten()                              # (N*k,) token-slot order
        order, inverse, offs = _sort_rows(flat, n_experts)
        xs = permute_rows(in_compute_dtype(x), order, inverse, k)        # (N*k, d) by expert
        out = self.matmul(gelu(self.matmul(xs, w1, offs)), w2, offs)
        out = permute_rows(out, inverse, order).view(n_tokens, k, out.shape[-1])  # token order
        gates = routing.gates
        if self.capacity_factor > 0:
            # Rank of each slot inside its expert's queue (in token order); slots past capacity
            # are dropped: their contribution is zero and the residual carries the token on.
            capacity = math.ceil(self.capacity_factor * flat.numel() / n_experts)
            start = torch.cat([offs.new_zeros(1), offs[:-1]]).long()[flat]
            position = inverse - start
            gates = gates * (position < capacity).view(n_tokens, k)
        return (out * gates.to(out.dtype).unsqueeze(-1)).sum(1)

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
    Created empty (zeros): regroup.recluster fills it from trained experts.
    """

    BASES, FACTORS = ("base1", "base2"), ("u1", "v1", "u2", "v2")

    def __init__(self, n_clusters: int, m: int, d: int, h: int, rank: int):
        super().__init__()
        self.n_clusters, self.m, self.rank = n_clusters, m, rank
        self.quantized = False
        self.matmul = grouped_mm_loop  # moe.MoE sets it from moe_impl (resolve_matmul)
        self.combine = combine_reference  # and this (resolve_combine)
        self.base1 = nn.Parameter(torch.zeros(n_clusters, d, h))
        self.base2 = nn.Parameter(torch.zeros(n_clusters, h, d))
        self.u1 = nn.Parameter(torch.zeros(n_clusters, d, m * rank))
        self.v1 = nn.Parameter(torch.zeros(n_clusters, m * rank, h))
        self.u2 = nn.Parameter(torch.zeros(n_clusters, h, m * rank))
        self.v2 = nn.Parameter(torch.zeros(n_clusters, m * rank, d))

    def forward(self, x: torch.Tensor, routing: Routing, tensors: dict | None = None) -> torch.Tensor:
        """The shared base runs once per token; only rank-r paths run per chosen expert.

            u   = x B1[g]                        a_i = gelu(u + (x U1_i) V1_i)
            z   = sum_i p_i a_i                  y   = z B2[g] + sum_i p_i (a_i U2_i) V2_i

        `tensors` may supply the six weights (e.g. dequantized or offloaded copies) in place
        of the parameters. Capacity limits do not apply: the clustered layer is dropless.
        """
        if tensors is None:
            tensors = self.weight_tensors(autocast_dtype(x) or x.dtype)
        w, mm = tensors, self.matmul
        n_tokens, k = routing.expert_idx.shape
        g, m, r = w["base1"].shape[0], self.m, self.rank  # g < G when offload.py passes a subset
        order, inverse, offs = _sort_rows(routing.cluster_idx, g)         # (N,), (N,), (g,) row ends
        xs = permute_rows(in_compute_dtype(x), order, inverse)            # (N, d) by cluster
        local = (routing.expert_idx - routing.cluster_idx.unsqueeze(-1) * m)[order]  # (N, k) in-cluster ids
        gates = routing.gates[order].unsqueeze(-1)                        # (N, k, 1)
        u = mm(xs, w["base1"], offs)                                      # (N, h) once per token
        codes = mm(xs, w["u1"], offs).view(n_tokens, 1, m, r)             # (N, 1, m, r) every member's code
        # Slot i of a token keeps only its expert's rank-r code (the other members' columns are
        # zeroed), so all k slots share the cluster's stacked V1 in ONE grouped matmul over
        # (N*k) rows: token-major rows stay contiguous per cluster, with offsets k * offs.
        select = F.one_hot(local, m).to(codes.dtype).unsqueeze(-1)        # (N, k, m, 1)
        slot_codes = (codes * select).view(n_tokens * k, m * r)           # (N*k, m*r)
        offs_k = offs * k                                                 # (g,) row ends of N*k rows
        # Explicit sizes, not -1: an expert-parallel rank may receive no token at all.
        pre = mm(slot_codes, w["v1"], offs_k).view(n_tokens, k, u.shape[-1])  # (N, k, h)
        a, z = self.combine(pre, u, gates[..., 0])                        # (N, k, h), (N, h) mixed
        back = mm(a.view(n_tokens * k, a.shape[-1]), w["u2"], offs_k)    # (N*k, m*r)
        low = (back.view(n_tokens, k, m, r) * (select * gates.unsqueeze(-1).to(back.dtype))).sum(1)  # (N, m, r)
        y = mm(z, w["base2"], offs) + mm(low.reshape(n_tokens, m * r), w["v2"], offs)  # (N, d)
        return permute_rows(y, inverse, order)                            # (N, d) in token order

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
        if self.quantized:
            raise RuntimeError("a quantized bank is for inference; recluster the float model")
        u1, v1, u2, v2 = self.factors()
        return materialize(self.base1, u1, v1), materialize(self.base2, u2, v2)

    def quantize_(self, group_size: int = 64, symmetric: bool = True, base_dtype=torch.float16):
        """Inference storage (paper: heterogeneous precision): bases become 16-bit buffers
        (FP16 as in the paper; pass bfloat16 to match a bf16 forward and skip a per-step cast),
        residual factors packed INT4 with groups along each matrix's input dimension."""
        from quant import Int4Store, quantize_int4  # INT4 storage is for inference only
        if self.quantized:
            return self
        for name in self.BASES:
            value = getattr(self, name).detach().to(base_dtype)
            delattr(self, name)
            self.register_buffer(name, value)
        for name in self.FACTORS:
            value = getattr(self, name).detach().transpose(-1, -2).contiguous()  # (G, out, in)
            delattr(self, name)
            self.add_module(name + "_q", Int4Store(quantize_int4(value, group_size, symmetric)))
        self.quantized = True
        return self

    def weight_tensors(self, dtype=None) -> dict:
        """The six weights the forward uses: parameters, or dequantized INT4 / FP16 buffers."""
        if not self.quantized:
            return {name: getattr(self, name) for name in self.BASES + self.FACTORS}
        stored = {name: getattr(self, name) for name in self.BASES}
        stored.update({name: getattr(self, name + "_q").tensor() for name in self.FACTORS})
        return self.unpack(stored, dtype or torch.float32)

    @staticmethod
    def unpack(stored: dict, dtype) -> dict:
        """Stored form -> compute form: INT4 factors (kept as (out, in) so groups run along
        the input dimension) dequantized and transposed back; float tensors cast."""
        from quant import Int4Tensor
        return {n: v.dequantize(dtype).transpose(-1, -2) if isinstance(v, Int4Tensor)
                else v.to(dtype) for n, v in stored.items()}

    def cluster_tensors(self, cluster: int) -> dict:
        """One cluster's stored form (FP16 bases and INT4 slices, or float slices), for
        offload.py; `unpack` turns a stack of them into forward weights."""
        if not self.quantized:
            return {n: t[cluster].detach() for n, t in self.weight_tensors().items()}
        from quant import Int4Tensor
        out = {name: getattr(self, name)[cluster] for name in self.BASES}
        for name in self.FACTORS:
            q = getattr(self, name + "_q").tensor()
            out[name] = Int4Tensor(q.packed[cluster], q.scale[cluster],
                                   None if q.zero is None else q.zero[cluster], q.shape[1:],
                                   q.group_size, q.symmetric)
        return out

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in list(self.parameters()) + list(self.buffers()))
