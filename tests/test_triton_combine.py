"""fast/triton_combine.py: the reference against ClusteredBank's two original lines, the op's backward by
gradcheck, its registration (opcheck, torch.compile); the Triton kernels against the reference
on CUDA (skipped without CUDA and Triton)."""
import pytest
import torch

from experts import ClusteredBank, combine_reference, gelu, resolve_combine
from fast.triton_combine import combine_available, gelu_combine
from router import hierarchical_route

CUDA = combine_available("cuda")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")


def _inputs(n=7, k=2, h=12, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    pre = torch.randn(n, k, h, generator=g, device=device).to(dtype)
    u = torch.randn(n, h, generator=g, device=device).to(dtype)
    gates = torch.rand(n, k, generator=g, device=device, dtype=torch.float64)
    gates = (gates / gates.sum(-1, keepdim=True)).to(torch.float64 if dtype == torch.float64
                                                      else torch.float32)
    return pre, u, gates


def _original(pre, u, gates):
    """The two lines ClusteredBank.forward had before the combine step (gates (N, k, 1))."""
    gates = gates.unsqueeze(-1)
    a = gelu(pre + u.unsqueeze(1))
    z = (a * gates.to(a.dtype)).sum(1)
    return a, z


def _grads(fn, inputs, grad_a, grad_z):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    a, z = fn(*inputs)
    torch.autograd.backward([a, z], [grad_a, grad_z])
    return (a.detach(), z.detach()), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_original_two_lines_exactly(dtype):
    pre, u, gates = _inputs(dtype=dtype)
    grad_a, grad_z = torch.randn(pre.shape).to(dtype), torch.randn(u.shape).to(dtype)
    ref_out, ref_grads = _grads(combine_reference, (pre, u, gates), grad_a, grad_z)
    old_out, old_grads = _grads(_original, (pre, u, gates), grad_a, grad_z)
    for new, old in zip(list(ref_out) + ref_grads, list(old_out) + old_grads):
        assert new.dtype == old.dtype and torch.equal(new, old)


def test_reference_and_op_backward_pass_gradcheck():
    inputs = [t.requires_grad_(True) for t in _inputs()]
    assert torch.autograd.gradcheck(combine_reference, inputs)
    # On CPU the op runs combine_reference forward and the hand-written backward formula
    # (combine_backward_reference, the Triton backward kernel's spec): check it numerically.
    assert torch.autograd.gradcheck(gelu_combine, inputs)
    for a, b in zip(gelu_combine(*inputs), combine_reference(*inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_backward_formula_with_odd_k_and_mixed_dtypes():
    pre, u, gates = _inputs(n=5, k=3, h=10, dtype=torch.float32, seed=1)
    grad_a, grad_z = torch.randn(pre.shape), torch.randn(u.shape)
    ref_out, ref_grads = _grads(combine_reference, (pre, u, gates), grad_a, grad_z)
    op_out, op_grads = _grads(gelu_combine, (pre, u, gates), grad_a, grad_z)
    for a, b in zip(list(op_out) + op_grads, list(ref_out) + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_op_registration_opcheck_and_compile_on_cpu():
    pre, u, gates = (t.float().requires_grad_(True) for t in _inputs())
    torch.library.opcheck(gelu_combine, (pre, u, gates))         # schema, fake, autograd
    compiled = torch.compile(gelu_combine, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(pre, u, gates), gelu_combine(pre, u, gates)):
        torch.testing.assert_close(a, b)


def test_resolve_combine_and_bank_wiring():
    assert resolve_combine("triton", "cpu") is combine_reference
    assert resolve_combine("grouped", "cpu") is combine_reference
    torch.manual_seed(0)
    bank = ClusteredBank(3, 4, 8, 12, 2)
    assert bank.combine is combine_reference
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(40, 8)
    routing = hierarchical_route(torch.randn(40, 3), torch.randn(40, 12), 2)
    y_ref = bank(x, routing)
    bank.combine = gelu_combine                                  # its CPU path
    torch.testing.assert_close(bank(x, routing), y_ref, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,h", [(2, 1536), (2, 2048), (3, 100), (1, 3072)])
def test_triton_matches_reference_on_cuda(dtype, k, h):
    pre, u, gates = _inputs(n=300, k=k, h=h, dtype=dtype, device="cuda")
    grad_a, grad_z = torch.randn_like(pre), torch.randn_like(u)
    op_out, op_grads = _grads(gelu_combine, (pre, u, gates), grad_a, grad_z)
    # The reference in float32 from the same (rounded) inputs: the kernel computes in float32
    # and rounds once, so bf16 results differ from it by about one bf16 rounding.
    ref_out, ref_grads = _grads(combine_reference, [t.float() for t in (pre, u, gates)],
                                grad_a.float(), grad_z.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, want in zip(("a", "z", "grad_pre", "grad_u", "grad_gates"),
                               list(op_out) + op_grads, list(ref_out) + ref_grads):
        assert got.dtype == (gates.dtype if name == "grad_gates" else dtype), name
        err = (got.float() - want).norm() / want.norm()
        assert err < tol, (name, err.item())


@needs_cuda
def test_triton_op_under_torch_compile():
    pre, u, gates = _inputs(n=256, k=2, h=1536, dtype=torch.bfloat16, device="cuda")
    grad_a, grad_z = torch.randn_like(pre), torch.randn_like(u)

    def step(pre, u, gates):  # the op between other work, as in ClusteredBank.forward
        a, z = gelu_combine(pre * 2, u, gates)
        return a * 3, z + 1
    eager_out, eager_grads = _grads(step, (pre, u, gates), grad_a, grad_z)
    compiled = torch.compile(step, fullgraph=True)
    out, grads = _grads(compiled, (pre, u, gates), grad_a, grad_z)
    for got, want in zip(list(out) + grads, list(eager_out) + eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@needs_cuda
def test_clustered_bank_fused_matches_reference_on_cuda():
    torch.manual_seed(0)
    bank = ClusteredBank(4, 4, 64, 128, 8).cuda()
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(512, 64, device="cuda")
    routing = hierarchical_route(torch.randn(512, 4, device="cuda"),
                                 torch.randn(512, 16, device="cuda"), 2)
    assert resolve_combine("triton", "cuda") is gelu_combine
    results = []
    for impl in ("grouped", "triton"):
        bank.zero_grad()
        bank.combine = resolve_combine(impl, "cuda")
        with torch.autocast("cuda", torch.bfloat16):
            y = bank(x, routing)
        y.float().square().sum().backward()
        results.append([y.float()] + [p.grad.float().clone() for p in bank.parameters()])
    for ref, got in zip(*results):
        assert (ref - got).norm() / ref.norm().clamp(min=1e-12) < 2e-2
