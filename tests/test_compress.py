"""compress.py: exactness at full rank, SVD-tail error at rank r, parameter formulas."""
import pytest
import torch

from compress import (clustered_expert_params, cluster_order, dense_expert_params, factorize,
                      materialize, refactorize)


def _weights(seed=0, e=8, a=6, b=10):
    torch.manual_seed(seed)
    return torch.randn(e, a, b, dtype=torch.float64)


def test_full_rank_reconstructs_exactly():
    w = _weights()
    assignment = torch.tensor([1, 0, 1, 0, 2, 3, 2, 3])
    order, base, u, v = factorize(w, assignment, 4, rank=6)
    torch.testing.assert_close(materialize(base, u, v), w[order], rtol=0, atol=1e-10)
    assert order.tolist() == [1, 3, 0, 2, 4, 6, 5, 7]


def test_error_falls_with_rank_and_equals_svd_tail():
    w = _weights(1)
    assignment = torch.arange(8) // 4
    errors = []
    for rank in range(1, 7):
        order, base, u, v = factorize(w, assignment, 2, rank)
        err = (materialize(base, u, v) - w[order]).square().sum(dim=(1, 2))     # (E,)
        # independent reference: the residual's singular values from numpy-free math
        mean = w.view(2, 4, 6, 10).mean(1).repeat_interleave(4, 0)
        s = torch.linalg.svdvals(w[order] - mean)
        torch.testing.assert_close(err, s[:, rank:].square().sum(-1), rtol=1e-8, atol=1e-10)
        errors.append(err.sum().item())
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-18


def test_base_is_member_mean_and_factors_balanced():
    w = _weights(2)
    order, base, u, v = factorize(w, torch.arange(8) // 2, 4, rank=2)
    torch.testing.assert_close(base, w.view(4, 2, 6, 10).mean(1))
    # balanced split: column norms of U equal row norms of V (both sqrt(s))
    torch.testing.assert_close(u.norm(dim=1), v.norm(dim=2))


def test_bad_inputs():
    w = _weights()
    with pytest.raises(ValueError, match="equal-sized"):
        cluster_order(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 2)
    with pytest.raises(ValueError, match="rank"):
        factorize(w, torch.arange(8) // 4, 2, rank=7)


def test_parameter_formulas():
    assert dense_expert_params(32, 512, 2048) == 32 * 2 * 512 * 2048
    # per cluster two d*h bases, per expert U1 (d,r) V1 (r,h) U2 (h,r) V2 (r,d)
    assert clustered_expert_params(32, 8, 512, 2048, 16) == 8 * 2 * 512 * 2048 + 32 * 4 * 16 * 2560 // 2


def test_refactorize_equals_factorize_of_materialized():
    torch.manual_seed(3)
    for a, b, rank in ((6, 10, 2), (12, 5, 3)):      # m*r above and below min(a, b)
        base = torch.randn(3, a, b, dtype=torch.float64)
        u, v = torch.randn(12, a, rank, dtype=torch.float64), torch.randn(12, rank, b, dtype=torch.float64)
        _, ref_base, ref_u, ref_v = factorize(materialize(base, u, v), torch.arange(12) // 4, 3, rank)
        new_base, new_u, new_v = refactorize(base, u, v, rank)
        torch.testing.assert_close(new_base, ref_base)
        torch.testing.assert_close(new_u @ new_v, ref_u @ ref_v)
        torch.testing.assert_close(new_u.norm(dim=1), new_v.norm(dim=2))   # balanced split
