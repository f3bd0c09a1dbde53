"""experts.py: banks against per-token brute force with materialized expert weights."""
import pytest
import torch

from experts import (ClusteredBank, ExpertBank, gelu, grouped_available, grouped_mm,
                     grouped_mm_loop, resolve_matmul)
from router import hierarchical_route, topk_route


def _reference(x, routing, w1, w2):
    """Loop over tokens and their k experts: y_t = sum_i g_ti * MLP_{e_ti}(x_t)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, g in zip(routing.expert_idx[t].tolist(), routing.gates[t]):
            out[t] += g * (gelu(x[t] @ w1[e]) @ w2[e])
    return out


def test_grouped_mm_loop_matches_per_group_matmul():
    torch.manual_seed(0)
    x, w = torch.randn(10, 8), torch.randn(3, 8, 4)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # middle group empty
    y = grouped_mm_loop(x, w, offs)
    torch.testing.assert_close(y, torch.cat([x[:3] @ w[0], x[3:] @ w[2]]))
    if hasattr(torch, "_grouped_mm"):  # the fused op's CPU forward, where this torch has it
        try:
            fused = grouped_mm(x, w, offs)
        except RuntimeError:
            pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
        torch.testing.assert_close(fused, y)


def test_grouped_mm_loop_backward_fills_no_full_size_tensor_per_group():
    # Indexing x[s:e] and w[g] would zero-fill a full-size gradient for every group (E^2 work
    # in the expert count); split and unbind write each group's into one shared tensor.
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(16, 8, 4, requires_grad=True)
    offs = torch.arange(4, 65, 4, dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        grouped_mm_loop(x, w, offs).square().sum().backward()
    full = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")
            and e.input_shapes and e.input_shapes[0] in (list(x.shape), list(w.shape))]
    assert len(full) <= 2, [(e.name, e.input_shapes[0]) for e in full]
    torch.testing.assert_close(w.grad[5], 2 * x[20:24].T @ (x[20:24] @ w[5]))


def test_grouped_mm_pads_unaligned_widths_exactly():
    """Widths the kernel cannot take (12 and 4 bf16 values) are zero-padded, not looped over:
    the loop reads group sizes on the host, which a CUDA graph cannot capture."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    torch.manual_seed(0)
    x = torch.randn(10, 12, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 12, 4, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    try:
        fused = grouped_mm(x, w, offs)
    except RuntimeError:
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    assert fused.shape == (10, 4)
    fused.float().square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    loop = grouped_mm_loop(x, w, offs)
    loop.float().square().sum().backward()
    torch.testing.assert_close(fused, loop)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def _expert_bank(n_experts, d, h, std, capacity_factor=0.0):
    bank = ExpertBank(n_experts, d, h, capacity_factor)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, std)
    return bank


def test_resolve_matmul_picks_one_function_per_impl():
    assert resolve_matmul("loop", "cpu") is grouped_mm_loop
    assert resolve_matmul("grouped", "cpu") is grouped_mm
    assert resolve_matmul("auto", "cpu") is grouped_mm_loop  # no sm90 kernel on CPU
    with pytest.raises(ValueError, match="moe_impl"):
        resolve_matmul("triton", "cpu")


def test_expert_bank_matches_brute_force():
    torch.manual_seed(0)
    bank = _expert_bank(6, 8, 12, 0.1)
    x = torch.randn(30, 8)
    routing = topk_route(torch.randn(30, 6), 2)
    torch.testing.assert_close(bank(x, routing),
                               _reference(x, routing, bank.w1, bank.w2))


def test_expert_bank_gradients_match_brute_force():
    """Each token's k slots are read from x directly; their gradients must still sum back."""
    torch.manual_seed(3)
    bank = _expert_bank(6, 8, 12, 0.1)
    x = torch.randn(30, 8, requires_grad=True)
    logits = torch.randn(30, 6, requires_grad=True)
    grad_out = torch.randn(30, 8)
    grads = []
    for forward in (bank, lambda x, r: _reference(x, r, bank.w1, bank.w2)):
        (forward(x, topk_route(logits, 3)) * grad_out).sum().backward()
        grads.append([t.grad.clone() for t in (x, logits, bank.w1, bank.w2)])
        for t in (x, logits, bank.w1, bank.w2):
            t.grad = None
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_expert_bank_capacity_drops_overflow_slots():
    torch.manual_seed(0)
    bank = _expert_bank(4, 8, 8, 0.1, capacity_factor=0.5)
    x = torch.randn(16, 8)
    logits = torch.zeros(16, 4)
    logits[:, 0] = 5.0  # everybody wants expert 0 first
    routing = topk_route(logits, 1)
    # capacity = ceil(0.5 * 16 / 4) = 2: only the first 2 tokens (stable order) keep expert 0
    y = bank(x, routing)
    ref = _reference(x, routing, bank.w1, bank.w2)
    torch.testing.assert_close(y[:2], ref[:2])
    assert torch.all(y[2:] == 0)


def _clustered_setup(seed=0, n_tokens=40, g=3, m=4, d=8, h=12, r=2, k=2):
    torch.manual_seed(seed)
    bank = ClusteredBank(g, m, d, h, r)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(n_tokens, d)
    routing = hierarchical_route(torch.randn(n_tokens, g), torch.randn(n_tokens, g * m), k)
    return bank, x, routing


def test_clustered_bank_equals_materialized_experts():
    bank, x, routing = _clustered_setup()
    w1, w2 = bank.weights()
    torch.testing.assert_close(bank(x, routing), _reference(x, routing, w1, w2))


def test_clustered_bank_gradients_match_materialized():
    bank, x, routing = _clustered_setup(seed=1)
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape)
    (bank(x, routing) * grad_out).sum().backward()
    fast = [p.grad.clone() for p in bank.parameters()] + [x.grad.clone()]
    bank.zero_grad()
    x.grad = None
    w1, w2 = bank.weights()
    (_reference(x, routing, w1, w2) * grad_out).sum().backward()
    slow = [p.grad for p in bank.parameters()] + [x.grad]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clustered_bank_factor_layout_round_trips():
    bank, _, _ = _clustered_setup(seed=2)
    copy = ClusteredBank(3, 4, 8, 12, 2)
    u1, v1, u2, v2 = bank.factors()
    copy.load_factors(bank.base1, u1, v1, bank.base2, u2, v2)
    for a, b in zip(copy.parameters(), bank.parameters()):
        assert torch.equal(a, b)
    # expert e = g*m + j owns columns j*r:(j+1)*r of u1[g]
    assert torch.equal(u1[5], bank.u1[1][:, 2:4])


@pytest.mark.skipif(not torch.cuda.is_available() or not grouped_available("cuda"),
                    reason="needs CUDA with torch._grouped_mm (sm90+)")
def test_grouped_path_matches_loop_on_cuda():
    torch.manual_seed(0)
    for bank_kind in ("topk", "clustered"):
        if bank_kind == "topk":
            bank = _expert_bank(8, 64, 128, 0.05).cuda()
            x = torch.randn(256, 64, device="cuda")
            routing = topk_route(torch.randn(256, 8, device="cuda"), 2)
        else:
            bank, x, routing = _clustered_setup(n_tokens=256, g=4, m=4, d=64, h=128, r=8)
            bank, x = bank.cuda(), x.cuda()
            routing = hierarchical_route(torch.randn(256, 4, device="cuda"),
                                         torch.randn(256, 16, device="cuda"), 2)
        outs, grads = [], []
        for impl in ("loop", "grouped"):
            bank.zero_grad()
            bank.matmul = resolve_matmul(impl, "cuda")
            with torch.autocast("cuda", torch.bfloat16):
                y = bank(x, routing)
            y.float().square().sum().backward()
            outs.append(y.float())
            grads.append([p.grad.float().clone() for p in bank.parameters()])
        err = (outs[0] - outs[1]).norm() / outs[0].norm()
        assert err < 2e-2, (bank_kind, err)
        for a, b in zip(*grads):
            assert (a - b).norm() / a.norm().clamp(min=1e-12) < 5e-2


@pytest.mark.parametrize("kind", ["experts", "clustered"])
def test_banks_take_zero_tokens(kind):
    """An expert-parallel rank can receive no token: (0, d) in, (0, d) out, backward runs."""
    if kind == "clustered":
        bank, x, routing = _clustered_setup()
    else:
        bank = ExpertBank(4, 8, 12)
        torch.nn.init.normal_(bank.w1)
        torch.nn.init.normal_(bank.w2)
        x = torch.randn(5, 8)
        routing = topk_route(torch.randn(5, 4), 2, 0.0, 0.0)
    cluster = None if routing.cluster_idx is None else routing.cluster_idx[:0]
    empty = type(routing)(routing.expert_idx[:0], routing.gates[:0], None, None, cluster)
    x0 = x[:0].clone().requires_grad_(True)
    y = bank(x0, empty)
    assert y.shape == (0, x.shape[1])
    y.sum().backward()
    assert x0.grad.shape == (0, x.shape[1])
