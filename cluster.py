"""Online expert clustering: fused similarity, balanced k-means, and reclustering a layer.

Owns: the fused expert similarity (parameter cosine + activation cosine), a balanced
k-means into G equal clusters (k-means++ seeding with a seed, warm start from the previous
assignment), and `recluster`, which regroups one MoE layer and re-factorizes its experts.
Does not own: when to recluster (train.py) or the factorization math (compress.py).

Similarity of experts i, j (each an E x E matrix, cosine in [-1, 1]):
  s_param = cos(flat(W_i) - mean, flat(W_j) - mean)   centred: the shared part of all
            experts (and, once clustered, the shared bases) would otherwise dominate
  s_act   = (cos(mean input routed to i, to j) + cos(router row i, router row j)) / 2
  s       = alpha * s_param + (1 - alpha) * s_act
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import factorize, refactorize


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """(E, D) -> (E, E) pairwise cosine similarity."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.t()


def fused_similarity(w1, w2, input_mean, router_weight, alpha: float = 0.5) -> torch.Tensor:
    """Expert weights (E, d, h), (E, h, d); input means (E, d); router rows (E, d) -> (E, E)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    flat = torch.cat([w1.flatten(1), w2.flatten(1)], dim=1).float()
    s_param = cosine_matrix(flat - flat.mean(0))
    s_act = (cosine_matrix(input_mean) + cosine_matrix(router_weight)) / 2
    return alpha * s_param + (1 - alpha) * s_act


def _balanced_assign(affinity: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy: take (expert, cluster) pairs by falling affinity while the cluster has room."""
    n_experts, n_clusters = affinity.shape
    assignment = torch.full((n_experts,), -1, dtype=torch.long)
    room = [size] * n_clusters
    for flat in affinity.flatten().argsort(descending=True, stable=True).tolist():
        expert, cluster = divmod(flat, n_clusters)
        if assignment[expert] < 0 and room[cluster] > 0:
            assignment[expert] = cluster
            room[cluster] -= 1
    return assignment


def _kmeanspp_seeds(similarity: torch.Tensor, n_clusters: int, generator) -> list[int]:
    """k-means++ on the distance 1 - s: each next seed drawn with probability ~ distance^2."""
    n_experts = similarity.shape[0]
    seeds = [int(torch.randint(n_experts, (1,), generator=generator))]
    while len(seeds) < n_clusters:
        dist = (1 - similarity[:, seeds].max(1).values).clamp(min=0).square()
        dist[seeds] = 0
        if dist.sum() <= 0:  # all remaining experts identical to a seed: pick uniformly
            dist = torch.ones(n_experts)
            dist[seeds] = 0
        seeds.append(int(torch.multinomial(dist, 1, generator=generator)))
    return seeds


def balanced_kmeans(similarity: torch.Tensor, n_clusters: int, init: torch.Tensor | None = None,
                    seed: int = 0, max_iter: int = 50) -> torch.Tensor:
    """Kernel k-means on a similarity matrix with every cluster holding exactly E/G experts.

    An expert's affinity to a cluster is its mean similarity to the cluster's other members.
    Warm-started from `init` (previous assignment) when given, else from k-means++ seeds.
    Returns (E,) long cluster ids; a fixed point of the update, so a second call from its
    own output returns it unchanged.
    """
    similarity = similarity.detach().float().cpu()
    n_experts = similarity.shape[0]
    if n_experts % n_clusters:
        raise ValueError(f"{n_experts} experts cannot form {n_clusters} equal clusters")
    size = n_experts // n_clusters
    if init is None:
        seeds = _kmeanspp_seeds(similarity, n_clusters, torch.Generator().manual_seed(seed))
        assignment = _balanced_assign(similarity[:, seeds], size)
    else:
        assignment = init.detach().cpu().long().clone()
    off_diagonal = 1 - torch.eye(n_experts)
    for _ in range(max_iter):
        members = F.one_hot(assignment, n_clusters).float()                  # (E, G)
        counts = members.sum(0) - members                                     # others in cluster
        affinity = (similarity * off_diagonal) @ members / counts.clamp(min=1)
        affinity = affinity + 1e-6 * members  # ties keep the current cluster: stability
        new = _balanced_assign(affinity, size)
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment


def _same_partition(assignment: torch.Tensor, previous: torch.Tensor, n_clusters: int) -> bool:
    """Whether every new cluster holds exactly the members of one old cluster."""
    return all(previous[assignment == c].unique().numel() == 1 for c in range(n_clusters))


@torch.no_grad()
def recluster(layer, alpha: float = 0.5, seed: int = 0) -> dict:
    """Regroup one model.MoE layer and re-factorize it into a shared base + rank-r residuals.

    Materializes W = B + UV (or takes the dense experts on the first call) and clusters by
    fused similarity. If the groups came out unchanged, it re-factorizes each cluster in
    factored form and moves nothing. Otherwise it re-factorizes and permutes every
    per-expert quantity (router rows, input means, ids) into the new cluster-major order.
    Cluster router rows are kept for clusters whose members did not change, and set to the
    mean of the member experts' router rows otherwise. Returns {'moved': experts that changed cluster, 'reset': the
    parameters whose values were re-created, so their optimizer state must start fresh}.
    """
    cfg = layer.cfg
    n_clusters, m = cfg.n_clusters, cfg.n_experts // cfg.n_clusters
    w1, w2 = (w.detach() for w in layer.bank.weights())
    similarity = fused_similarity(w1, w2, layer.input_mean, layer.router.weight, alpha)
    previous = torch.arange(cfg.n_experts) // m if layer.clustered else None
    assignment = balanced_kmeans(similarity, n_clusters, previous, seed=seed)
    if previous is not None and _same_partition(assignment, previous, n_clusters):
        # Same groups (perhaps relabelled): keep the slot order and re-factorize in factored
        # form (compress.refactorize), identical to an SVD of the materialized experts but
        # without one. Skipping this step instead, keeping the drifted factors and their
        # Adam state, cost quality: +6.4% perplexity vs top-k instead of -0.9% (README).
        bank, rank = layer.bank, cfg.rank
        u1, v1, u2, v2 = bank.factors()
        base1, u1, v1 = refactorize(bank.base1, u1, v1, rank)
        base2, u2, v2 = refactorize(bank.base2, u2, v2, rank)
        bank.load_factors(base1, u1, v1, base2, u2, v2)
        layer.n_reclusters += 1
        return {"moved": 0, "reset": list(bank.parameters())}
    order, base1, u1, v1 = factorize(w1, assignment.to(w1.device), n_clusters, cfg.rank)
    _, base2, u2, v2 = factorize(w2, assignment.to(w2.device), n_clusters, cfg.rank)
    order = order.cpu()

    old_cluster_rows = layer.cluster_router.detach().clone() if layer.clustered else None
    if not layer.clustered:
        layer.make_clustered()
    layer.bank.load_factors(base1, u1, v1, base2, u2, v2)
    order_dev = order.to(layer.router.weight.device)
    permuted = not torch.equal(order.cpu(), torch.arange(cfg.n_experts))
    for tensor in (layer.router.weight, layer.input_mean, layer.expert_ids, layer.expert_counts):
        tensor.copy_(tensor[order_dev])
    sorted_assignment = assignment[order]                                    # (E,) = e // m
    expert_rows = layer.router.weight.view(n_clusters, m, -1)
    rows = expert_rows.mean(1)                                                # (G, d)
    moved = 0
    if previous is not None:
        moved = int((previous[order] != sorted_assignment).sum())
        for c in range(n_clusters):
            if torch.equal(torch.sort(order[c * m:(c + 1) * m]).values,
                           torch.arange(c * m, (c + 1) * m)):
                rows[c] = old_cluster_rows[c]
    layer.cluster_router.copy_(rows)
    layer.n_reclusters += 1
    reset = list(layer.bank.parameters()) + [layer.cluster_router]
    if permuted:
        reset.append(layer.router.weight)
    return {"moved": moved, "reset": reset}


def recluster_model(model: nn.Module, alpha: float = 0.5, seed: int = 0) -> dict:
    """recluster every MoE layer of a GPT; -> {'moved': total experts moved, 'reset': [...]}."""
    moved, reset = 0, []
    for i, layer in enumerate(model.moe_layers()):
        result = recluster(layer, alpha, seed + i)
        moved += result["moved"]
        reset += result["reset"]
    return {"moved": moved, "reset": reset}
