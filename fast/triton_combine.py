"""The clustered hot path's elementwise middle, fused: add the shared base, GELU, gate, sum over k.

For each token n (N of them, in cluster order), each of its k slots i and each hidden unit j:

    s[n,i,j] = pre[n,i,j] + u[n,j]             pre: the slot's low-rank term (x U1_i) V1_i
    a[n,i,j] = gelu(s[n,i,j])                  u: the cluster's shared base x B1[g], once a token
    z[n,j]   = sum_i gates[n,i] * a[n,i,j]

with the tanh GELU of experts.gelu, gelu(s) = s * sigmoid(2c (s + 0.044715 s^3)), c = sqrt(2/pi).
Both a (N, k, h) and z (N, h) are returned: z feeds the second base, a the rank-r path a U2_i.
Given grad_a and grad_z, the backward is

    ds[n,i,j]     = (grad_a[n,i,j] + gates[n,i] * grad_z[n,j]) * gelu'(s[n,i,j])
    grad_pre      = ds                          grad_u[n,j] = sum_i ds[n,i,j]
    grad_gates[n,i] = sum_j grad_z[n,j] * a[n,i,j]

Unfused, PyTorch writes and reads s, a, the gated copy and their gradients as separate (N, k, h)
tensors; here one pass reads pre and u and writes a and z, and one pass back reads pre, u,
grad_a, grad_z and writes grad_pre, grad_u, grad_gates (s and a are recomputed, not stored).

Owns: the backward's plain PyTorch formulas (`combine_backward_reference`; the forward's
are experts.combine_reference), the Triton kernels and their launchers, and `gelu_combine`, the op `clustermoe::gelu_combine`
(torch.library.custom_op with a fake shape function and a registered backward, so
torch.compile traces it as one node). On CPU, or without Triton, or for float64, the op runs
`combine_reference` and `combine_backward_reference` instead of the kernels.
Does not own: choosing it (experts.resolve_combine) or the matmuls around it (experts.py).
Pattern: torchtitan's fused SwiGLU (kernel -> launcher -> custom_op + fake + autograd).
"""
import math

import torch

from experts import combine_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path runs instead
    triton = None

GELU_SCALE = 2 * math.sqrt(2 / math.pi)  # gelu(s) = s * sigmoid(GELU_SCALE (s + 0.044715 s^3))
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def combine_backward_reference(pre, u, gates, grad_a, grad_z):
    """The backward formulas of the module docstring, in plain PyTorch (float32 at least)."""
    work = torch.promote_types(pre.dtype, torch.float32)
    s = (pre.to(work) + u.to(work).unsqueeze(1))                       # (N, k, h)
    inner = torch.sigmoid(GELU_SCALE * (s + 0.044715 * s ** 3))
    a = s * inner
    d_gelu = inner + s * inner * (1 - inner) * GELU_SCALE * (1 + 3 * 0.044715 * s ** 2)
    grad_a, grad_z = grad_a.to(work), grad_z.to(work)
    grad_s = (grad_a + gates.to(work).unsqueeze(-1) * grad_z.unsqueeze(1)) * d_gelu   # (N, k, h)
    grad_gates = (grad_z.unsqueeze(1) * a).sum(-1)                     # (N, k)
    return grad_s.to(pre.dtype), grad_s.sum(1).to(u.dtype), grad_gates.to(gates.dtype)


if triton is not None:
    @triton.jit
    def _gelu_parts(s):
        """gelu_tanh(s) and its derivative, in float32 (0.79788... = sqrt(2/pi))."""
        inner = tl.sigmoid(2.0 * 0.7978845608028654 * (s + 0.044715 * s * s * s))
        d_inner = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s * s)
        return s * inner, inner + s * inner * (1.0 - inner) * d_inner

    @triton.jit
    def _combine_fwd_kernel(pre_ptr, u_ptr, gates_ptr, a_ptr, z_ptr, H: tl.constexpr,
                            K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program per token: its k slots as a (BLOCK_K, BLOCK_H) tile, stepping along H."""
        n = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, BLOCK_K)
        gates = tl.load(gates_ptr + n * K + slot, mask=slot < K, other=0.0).to(tl.float32)
        for start in range(0, H, BLOCK_H):
            col = start + tl.arange(0, BLOCK_H)
            mask = (slot[:, None] < K) & (col[None, :] < H)
            tile = (n * K + slot[:, None]) * H + col[None, :]                 # (BLOCK_K, BLOCK_H)
            u = tl.load(u_ptr + n * H + col, mask=col < H, other=0.0).to(tl.float32)
            s = tl.load(pre_ptr + tile, mask=mask, other=0.0).to(tl.float32) + u[None, :]
            a, _ = _gelu_parts(s)
            tl.store(a_ptr + tile, a.to(a_ptr.dtype.element_ty), mask=mask)
            z = tl.sum(a * gates[:, None], axis=0)
            tl.store(z_ptr + n * H + col, z.to(z_ptr.dtype.element_ty), mask=col < H)

    @triton.jit
    def _combine_bwd_kernel(pre_ptr, u_ptr, gates_ptr, grad_a_ptr, grad_z_ptr, grad_pre_ptr,
                            grad_u_ptr, grad_gates_ptr, H: tl.constexpr, K: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program per token; grad_gates is a dot product over H, summed as it goes."""
        n = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, BLOCK_K)
        gates = tl.load(gates_ptr + n * K + slot, mask=slot < K, other=0.0).to(tl.float32)
        grad_gates = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            col = start + tl.arange(0, BLOCK_H)
            mask = (slot[:, None] < K) & (col[None, :] < H)
            tile = (n * K + slot[:, None]) * H + col[None, :]
            u = tl.load(u_ptr + n * H + col, mask=col < H, other=0.0).to(tl.float32)
            grad_z = tl.load(grad_z_ptr + n * H + col, mask=col < H, other=0.0).to(tl.float32)
            s = tl.load(pre_ptr + tile, mask=mask, other=0.0).to(tl.float32) + u[None, :]
            a, d_gelu = _gelu_parts(s)
            grad_a = tl.load(grad_a_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            grad_s = (grad_a + gates[:, None] * grad_z[None, :]) * d_gelu   # 0 where masked
            tl.store(grad_pre_ptr + tile, grad_s.to(grad_pre_ptr.dtype.element_ty), mask=mask)
            grad_u = tl.sum(grad_s, axis=0)
            tl.store(grad_u_ptr + n * H + col, grad_u.to(grad_u_ptr.dtype.element_ty), mask=col < H)
            grad_gates += tl.sum(a * grad_z[None, :], axis=1)
        tl.store(grad_gates_ptr + n * K + slot, grad_gates.to(grad_gates_ptr.dtype.element_ty),
                 mask=slot < K)


def _use_kernel(*tensors) -> bool:
    return (triton is not None and tensors[0].is_cuda and tensors[0].numel() > 0
            and all(t.dtype in KERNEL_DTYPES for t in tensors))


def _blocks(k: int, h: int):
    """(BLOCK_K, BLOCK_H): one program covers a token's k slots and up to 2048 hidden units,
    enough to keep both kernels near the bandwidth bound (docs/design.md)."""
    return triton.next_power_of_2(k), min(triton.next_power_of_2(h), 2048)


@torch.library.custom_op("clustermoe::gelu_combine", mutates_args=())
def gelu_combine(pre: torch.Tensor, u: torch.Tensor,
                 gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """combine_reference(pre, u, gates) -> (a (N, k, h), z (N, h)), by one Triton kernel on CUDA."""
    u = u.to(pre.dtype)  # a and z come out in pre's dtype on every path, as the fake says
    if not _use_kernel(pre, u, gates):
        a, z = combine_reference(pre, u, gates)
        return a.contiguous(), z.contiguous()
    pre, u, gates = pre.contiguous(), u.contiguous(), gates.contiguous()
    n_tokens, k, h = pre.shape
    a, z = torch.empty_like(pre), pre.new_empty(n_tokens, h)
    block_k, block_h = _blocks(k, h)
    _combine_fwd_kernel[(n_tokens,)](pre, u, gates, a, z, H=h, K=k, BLOCK_K=block_k,
                                     BLOCK_H=block_h)
    return a, z


@gelu_combine.register_fake
def _(pre, u, gates):
    return torch.empty_like(pre), pre.new_empty(pre.shape[0], pre.shape[2])


@torch.library.custom_op("clustermoe::gelu_combine_backward", mutates_args=())
def gelu_combine_backward(pre: torch.Tensor, u: torch.Tensor, gates: torch.Tensor,
                          grad_a: torch.Tensor, grad_z: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_pre, grad_u, grad_gates) of gelu_combine, by one Triton kernel on CUDA."""
    if not _use_kernel(pre, u, gates, grad_a, grad_z):
        return combine_backward_reference(pre, u, gates, grad_a, grad_z)
    pre, u, gates = pre.contiguous(), u.contiguous(), gates.contiguous()
    grad_a, grad_z = grad_a.contiguous(), grad_z.contiguous()
    n_tokens, k, h = pre.shape
    grad_pre, grad_u, grad_gates = (torch.empty_like(t) for t in (pre, u, gates))
    block_k, block_h = _blocks(k, h)
    _combine_bwd_kernel[(n_tokens,)](pre, u, gates, grad_a, grad_z, grad_pre, grad_u,
                                     grad_gates, H=h, K=k, BLOCK_K=block_k, BLOCK_H=block_h)
    return grad_pre, grad_u, grad_gates


@gelu_combine_backward.register_fake
def _(pre, u, gates, grad_a, grad_z):
    return torch.empty_like(pre), torch.empty_like(u), torch.empty_like(gates)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)       # pre, u, gates: a and s are recomputed in the backward


def _backward(ctx, grad_a, grad_z):
    pre, u, gates = ctx.saved_tensors
    # Autograd hands zeros for an output that got no gradient (materialized grads).
    return gelu_combine_backward(pre, u, gates, grad_a, grad_z)


gelu_combine.register_autograd(_backward, setup_context=_setup_context)


def combine_available(device) -> bool:
    """Whether gelu_combine runs its Triton kernels on this device."""
    return triton is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
