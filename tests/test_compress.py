"""compress.py: exactness at full rank, SVD-tail error at rank r, the randomized SVD against
the exact one, parameter formulas."""
import pytest
import torch

from compress import (clustered_expert_params, cluster_order, dense_expert_params, factorize,
                      low_rank, materialize, refactorize)


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
        order, base, u, v = factorize(w, assignment, 2, rank, method="svd")
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


def _spectrum_cases(e=8, a=96, b=192):
    """Plain Gaussian matrices (flat spectrum: the hardest case for a sketch) and rank-32
    matrices with singular values decaying 1 -> 0.01 plus 1e-3 noise (a trained residual)."""
    g = torch.Generator().manual_seed(4)
    gaussian = torch.randn(e, a, b, generator=g)
    k = 32
    left = torch.linalg.qr(torch.randn(e, a, k, generator=g)).Q
    right = torch.linalg.qr(torch.randn(e, b, k, generator=g)).Q
    decaying = (left * torch.logspace(0, -2, k)) @ right.mT + 1e-3 * torch.randn(e, a, b, generator=g)
    return {"gaussian": gaussian, "decaying": decaying}


def test_randomized_error_close_to_exact_svd():
    # Measured max ratio over the 8 experts: 1.0045 (Gaussian), 1.00005 (decaying); at E=32,
    # 384x768, r=16 (gaussian / decaying spectrum of 64): 1.0064 / 1.0017.
    bounds = {"gaussian": 1.02, "decaying": 1.001}
    assignment = torch.arange(8) // 4
    for name, w in _spectrum_cases().items():
        errors = {}
        for method in ("svd", "randomized"):
            order, base, u, v = factorize(w, assignment, 2, rank=8, method=method)
            assert base.shape == (2, 96, 192) and u.shape == (8, 96, 8) and v.shape == (8, 8, 192)
            assert u.dtype == v.dtype == w.dtype
            torch.testing.assert_close(u.norm(dim=1), v.norm(dim=2))      # balanced split
            errors[method] = (materialize(base, u, v) - w[order]).norm(dim=(1, 2))
        ratio = errors["randomized"] / errors["svd"]
        assert bool((ratio >= 1 - 1e-5).all()) and ratio.max() < bounds[name], (name, ratio)


def test_randomized_is_deterministic_given_seed():
    w = _spectrum_cases()["gaussian"]
    assignment = torch.arange(8) // 4
    first, again, other = (factorize(w, assignment, 2, rank=8, seed=s)[2] for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_randomized_matches_svd_when_sketch_covers_the_matrix():
    w = _weights()                                  # 6 x 10: rank + oversample >= 6
    for rank in (2, 6):
        exact = factorize(w, torch.arange(8) // 4, 2, rank, method="svd")
        fast = factorize(w, torch.arange(8) // 4, 2, rank, method="randomized")
        for a, b in zip(exact, fast):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="method"):
        low_rank(w, 2, method="qr")
