"""Expert weights <-> a shared base per cluster plus a rank-r residual per expert.

Owns: `factorize` (base = mean of the cluster's members, residual = truncated SVD of each
member's difference from the base), `low_rank` (that SVD, exact or randomized), `refactorize`
(the same, for experts that are already in factored form, without materializing them),
`align_gauge` and `refactor` (the factors of a regrouped layer, in the basis its optimizer
state was built on), `materialize` (W_e = B[g(e)] + U_e V_e), and the parameter counts of
both storages. Pure functions on tensors.
Does not own: which experts form a cluster (cluster.py), the forward pass (experts.py).

Shapes: E experts of matrices (a, b); G equal clusters of m = E / G; rank r.
The SVD split is balanced, U = U_svd * sqrt(S), V = sqrt(S) * Vh, so both factors start at
the same scale and neither dominates the optimizer's updates.
"""
import torch


def cluster_order(assignment: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Expert ids sorted cluster-major (stable); checks the clusters are equal-sized."""
    sizes = torch.bincount(assignment, minlength=n_clusters)
    if sizes.numel() != n_clusters or not bool((sizes == sizes[0]).all()):
        raise ValueError(f"clusters must be equal-sized, got sizes {sizes.tolist()}")
    return assignment.argsort(stable=True)


def low_rank(residual: torch.Tensor, rank: int, method: str = "randomized",
             oversample: int = 16, power_iters: int = 2, seed: int = 0):
    """Rank-r truncated SVD of each residual (E, a, b) -> U (E,a,r), S (E,r), Vh (E,r,b).

    "svd": the exact truncated SVD. "randomized" (Halko, Martinsson & Tropp 2011, algs. 4.4
    and 5.1): Q = orth(A Omega) for a Gaussian Omega (b, r + oversample), refined by
    `power_iters` rounds of Q = orth(A orth(A^T Q)) (re-orthonormalised by QR each time,
    so the small directions survive float32), then the SVD of the small (r + p, b) matrix
    Q^T A. Cost O(E a b (r + p)) instead of O(E a b min(a, b)), with an error within 1% of the
    exact tail (tests/test_compress.py checks it). When r + p reaches min(a, b) the sketch
    would be the whole matrix, and the exact SVD runs instead. `seed` makes Omega, hence the
    result, repeatable.
    """
    if method not in ("svd", "randomized"):
        raise ValueError(f"method must be 'svd' or 'randomized', got {method!r}")
    n, a, b = residual.shape
    width = rank + oversample
    if method == "svd" or width >= min(a, b):
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)   # (E,a,q), (E,q), (E,q,b)
        return u[..., :rank], s[:, :rank], vh[:, :rank]
    generator = torch.Generator(device=residual.device).manual_seed(seed)
    omega = torch.randn(n, b, width, generator=generator, device=residual.device,
                        dtype=residual.dtype)                          # (E, b, r+p)
    q = torch.linalg.qr(residual @ omega).Q                            # (E, a, r+p)
    for _ in range(power_iters):
        q = torch.linalg.qr(residual.mT @ q).Q                         # (E, b, r+p)
        q = torch.linalg.qr(residual @ q).Q                            # (E, a, r+p)
    u_small, s, vh = torch.linalg.svd(q.mT @ residual, full_matrices=False)  # (E,r+p,r+p) ...
    return q @ u_small[..., :rank], s[:, :rank], vh[:, :rank]


def factorize(weights: torch.Tensor, assignment: torch.Tensor, n_clusters: int, rank: int,
              method: str = "randomized", seed: int = 0):
    """weights (E, a, b), assignment (E,) -> (order, base (G,a,b), U (E,a,r), V (E,r,b)).

    The returned experts are in cluster-major `order`: row i of U/V is expert order[i],
    member of cluster i // m. With method="svd" the approximation error of expert e is the
    SVD tail sqrt(sum_{j>=r} s_j^2) of (W_e - base), the best any rank-r residual can do;
    "randomized", the default because an exact SVD per expert is slow at large sizes, comes
    within 1% of it, see `low_rank`.
    """
    n_experts, rows, cols = weights.shape
    if rank < 1 or rank > min(rows, cols):
        raise ValueError(f"rank={rank} must be in [1, min(a, b) = {min(rows, cols)}]")
    order = cluster_order(assignment, n_clusters)
    m = n_experts // n_clusters
    # SVD in at least float32 (bf16 weights would lose the small residual directions).
    work = torch.promote_types(weights.dtype, torch.float32)
    grouped = weights[order].to(work).view(n_clusters, m, rows, cols)
    base = grouped.mean(1)                                            # (G, a, b)
    residual = (grouped - base.unsqueeze(1)).view(n_experts, rows, cols)
    u_r, s, vh = low_rank(residual, rank, method, seed=seed)
    root = s.sqrt()
    u = u_r * root.unsqueeze(1)                                       # (E, a, r)
    v = root.unsqueeze(-1) * vh                                       # (E, r, b)
    return order, base.to(weights.dtype), u.to(weights.dtype), v.to(weights.dtype)


def refactorize(base: torch.Tensor, u: torch.Tensor, v: torch.Tensor, rank: int):
    """factorize(materialize(base, u, v)) for unchanged clusters, without an (a x b) SVD per expert.

    Training moves each U_e V_e freely, so the members' residuals drift off a common mean
    and their imbalance grows. Re-centring (the mean of the residuals joins the base) and
    re-truncating to the best rank-r residual is what a full re-factorization would do, but
    all residuals of a cluster live in span(U_1..U_m) x span(V_1..V_m): with thin QRs
    [U_1..U_m] = Q1 R1 and [V_1; ..; V_m]^T = Q2 R2, expert e's centred residual is
    Q1 (R1 C_e R2^T) Q2^T, C_e = diag(delta_ej - 1/m per rank block), so an SVD of the
    (m*r x m*r) core gives it exactly. Cost: the mean, two thin QRs per cluster and E small
    SVDs. Shapes as factorize's outputs, cluster-major.
    """
    g, (n_experts, a, r), b = base.shape[0], u.shape, v.shape[-1]
    m = n_experts // g
    work = torch.promote_types(u.dtype, torch.float32)
    big_u = u.to(work).view(g, m, a, r).permute(0, 2, 1, 3).reshape(g, a, m * r)   # [U_1..U_m]
    big_v = v.to(work).reshape(g, m * r, b)                                       # [V_1;..;V_m]
    mean = big_u @ big_v / m                                                      # (G, a, b)
    q1, r1 = torch.linalg.qr(big_u)                                 # (G,a,k1), (G,k1,mr)
    q2, r2 = torch.linalg.qr(big_v.transpose(1, 2))                 # (G,b,k2), (G,k2,mr)
    coef = (torch.eye(m, dtype=work, device=u.device) - 1 / m).repeat_interleave(r, dim=1)  # (m, mr)
    core = (r1.unsqueeze(1) * coef[None, :, None, :]) @ r2.transpose(1, 2).unsqueeze(1)  # (G,m,k1,k2)
    p, s, wh = torch.linalg.svd(core)
    root = s[..., :rank].sqrt()
    new_u = q1.unsqueeze(1) @ (p[..., :rank] * root.unsqueeze(-2))               # (G, m, a, rank)
    new_v = (root.unsqueeze(-1) * wh[..., :rank, :]) @ q2.transpose(1, 2).unsqueeze(1)
    return ((base.to(work) + mean).to(base.dtype), new_u.reshape(n_experts, a, rank).to(u.dtype),
            new_v.reshape(n_experts, rank, b).to(v.dtype))


def align_gauge(u: torch.Tensor, v: torch.Tensor, u_ref: torch.Tensor, v_ref: torch.Tensor):
    """Rotate each expert's factors (U Q, Q^T V), Q orthogonal (r, r), as close as possible to
    (u_ref, v_ref): the product U V and the balance U^T U = V V^T are unchanged.

    A re-factorization picks its own basis (SVD order and signs), so without this a factor's
    columns would not be the columns its optimizer state was built on. Q is the polar factor
    of U^T U_ref + V V_ref^T, the orthogonal Procrustes solution. u (E, a, r), v (E, r, b).
    """
    p, _, qh = torch.linalg.svd(u.float().transpose(1, 2) @ u_ref.float()
                                + v.float() @ v_ref.float().transpose(1, 2))
    rotation = p @ qh                                                     # (E, r, r)
    return (u.float() @ rotation).to(u.dtype), (rotation.transpose(1, 2) @ v.float()).to(v.dtype)


def refactor(w1, w2, bases, factors, order, kept, rank: int):
    """A regrouped layer's new bases and residuals, cluster-major (factorize's outputs): an SVD
    of the materialized experts w1 (E, d, h), w2 (E, h, d) where the groups changed, else
    refactorize in factored form (the same result without an SVD per expert); clusters whose
    members stayed (kept (G,) True) keep their factors' basis (align_gauge), so the optimizer
    state built on those factors still fits. bases (B1, B2) and factors (U1, V1, U2, V2, per
    expert) are the bank's before the regroup; order (E,): new slot i holds old slot order[i]."""
    n_clusters = bases[0].shape[0]
    m = w1.shape[0] // n_clusters
    if not torch.equal(order, torch.arange(len(order))):
        assignment = torch.empty_like(order)
        assignment[order] = torch.arange(len(order)) // m                # new cluster of each old slot
        _, base1, u1, v1 = factorize(w1, assignment.to(w1.device), n_clusters, rank)
        _, base2, u2, v2 = factorize(w2, assignment.to(w2.device), n_clusters, rank)
    else:  # same groups: identical to an SVD of the materialized experts, without one
        base1, u1, v1 = refactorize(bases[0], factors[0], factors[1], rank)
        base2, u2, v2 = refactorize(bases[1], factors[2], factors[3], rank)
    if bool(kept.any()):
        slots = kept.repeat_interleave(m).to(w1.device)               # (E,) slots of kept clusters
        new, old = [u1, v1, u2, v2], [f[order.to(w1.device)] for f in factors]
        for i in (0, 2):
            u_al, v_al = align_gauge(new[i][slots], new[i + 1][slots], old[i][slots], old[i + 1][slots])
            new[i][slots], new[i + 1][slots] = u_al, v_al
        u1, v1, u2, v2 = new
    return base1, u1, v1, base2, u2, v2


def materialize(base: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """base (G, a, b), U (E, a, r), V (E, r, b) -> full expert weights (E, a, b)."""
    m = u.shape[0] // base.shape[0]
    return base.repeat_interleave(m, dim=0) + u @ v


def dense_expert_params(n_experts: int, d: int, h: int) -> int:
    """Two matrices (d x h, h x d) per expert."""
    return n_experts * 2 * d * h


def clustered_expert_params(n_experts: int, n_clusters: int, d: int, h: int, rank: int) -> int:
    """Two shared bases per cluster plus rank-r (U, V) pairs for both matrices of each expert."""
    return n_clusters * 2 * d * h + n_experts * 2 * rank * (d + h)
