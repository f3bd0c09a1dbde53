"""Online expert clustering: expert similarity, balanced k-means, and reclustering a layer.

Owns: the expert similarities (parameter views and activation views, fused), a balanced
k-means into G equal clusters (k-means++ seeding with a seed, warm start from the previous
assignment), `recluster`, which regroups one MoE layer and re-factorizes its experts, and
`carry_optimizer_state`, which moves the optimizer's state along with the experts.
Does not own: when to recluster (train.py) or the factorization math (compress.py).

Similarity of experts i, j: an E x E matrix, s = alpha * s_param + (1 - alpha) * s_act, each
a cosine in [-1, 1]; `similarity="PARAM+ACT"` picks one view of each:
  PARAM  weights   cos of the flat weights W_e minus the mean over all experts
         specific  the same vectors, W_e - mean = (B_g - mean) + R_e, with the part shared by
                   the cluster (B_g - mean) scaled to the size of the experts' own parts R_e
         outputs   cos of the experts' outputs on the probe batch, minus the mean expert's
  ACT    routed    mean of cos(mean input routed to i, to j) and cos(router row i, row j)
         centroids cos of the mean inputs routed to i and j (the paper's S_task)
         scores    cos of the columns of softmax(probe @ router.T) over all E experts, each
                   minus its mean over the probe: which of the same tokens would pick i and j
Once clustered, the members of a cluster share a base, so their weights and outputs agree
through it, and they see only the tokens routed to the cluster, so their input means agree:
with weights or outputs as the parameter view, a recluster never moved an expert.
Why the default is "specific+scores" (alpha 0.7): a planted layer (like tests/test_cluster.py's
`_planted`: 8 experts in 2 families, and 32 in 8; d=32, h=64, r=4; 8 seeds each), clustered,
then (i) left alone, (ii) given 10% noise on every factor and router row, or (iii) two experts
of different clusters switch family: residuals aimed at the other family's weights (as far as
rank r allows), router rows traded, statistics refreshed by training forwards. Experts moved:
  - weights or outputs with any activation view, alpha 0.5 or 0.7: none even after (iii),
    but for outputs+scores at alpha 0.5 (the two, in 3 of 16 runs).
  - specific+scores: none after (i), (ii); exactly the two after (iii) in 16 of 16 runs, gain
    0.19-0.22 (E=8) and 0.11-0.12 (E=32), the widest margin over min_gain of the fused views
    (specific+routed 0.13-0.16 / 0.10-0.11, specific+centroids 0.06-0.08 / 0.07-0.10).
  - activation alone (alpha 0) when only router rows change: scores 16/16, gain 0.26-0.40 /
    0.05-0.07; routed 15/16, 0.05-0.16 / 0.02-0.03; centroids 0/16 (routed tokens only).
k-means restarts: with 0, the first clustering missed the planted families in 3 of 8 seeds
(E=32, specific+scores); with 8, in none.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import cluster_order, factorize, refactorize

PARAM_VIEWS = ("weights", "specific", "outputs")
ACT_VIEWS = ("routed", "centroids", "scores")
DEFAULT_SIMILARITY = "specific+scores"


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """(E, D) -> (E, E) pairwise cosine similarity (a zero row is similar to nothing)."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.t()


def flat_weights(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(E, d, h), (E, h, d) -> (E, 2dh) minus the mean expert: the part all experts share
    (and, once clustered, the mean of the shared bases) would otherwise dominate."""
    flat = torch.cat([w1.flatten(1), w2.flatten(1)], dim=1).float()
    return flat - flat.mean(0)


def specific_weights(w1, w2, groups: torch.Tensor | None) -> torch.Tensor:
    """flat_weights with each cluster's shared part rescaled to the mean size of the experts'
    own parts, so a cluster's base counts as much as one expert's residual, not more.

    centred W_e = S_g + R_e, S_g = mean over the members of g, R_e = the rest (sums to zero
    over a cluster). groups (E,) cluster of each expert, None before the first clustering.
    """
    centred = flat_weights(w1, w2)
    if groups is None:
        return centred
    one_hot = F.one_hot(groups.to(centred.device), int(groups.max()) + 1).float()  # (E, G)
    shared = one_hot @ (one_hot.t() @ centred / one_hot.sum(0).unsqueeze(-1))       # (E, D)
    own = centred - shared
    scale = own.norm(dim=1).mean() / shared.norm(dim=1).clamp(min=1e-12)             # (E,)
    return own + scale.unsqueeze(-1) * shared


def probe_outputs(w1, w2, probe: torch.Tensor) -> torch.Tensor:
    """Every expert on the same probe tokens (n, d) -> (E, n*d) minus the mean expert."""
    x = probe.float()
    out = F.gelu(x @ w1.float(), approximate="tanh") @ w2.float()      # (E, n, d)
    flat = out.flatten(1)
    return flat - flat.mean(0)


def probe_scores(probe: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Flat router scores over all E experts on the probe (n, d) -> (E, n): softmax columns
    minus their mean over the probe tokens."""
    probs = (probe.float() @ router_weight.float().t()).softmax(-1)    # (n, E)
    return (probs - probs.mean(0)).t()


def parse_similarity(similarity: str) -> tuple[str, str]:
    """'PARAM+ACT' -> (PARAM, ACT); a ValueError naming the valid views otherwise."""
    param, _, act = similarity.partition("+")
    if param not in PARAM_VIEWS or act not in ACT_VIEWS:
        raise ValueError(f"similarity must be PARAM+ACT with PARAM in {PARAM_VIEWS} and ACT in "
                         f"{ACT_VIEWS}, got {similarity!r}")
    return param, act


def expert_similarity(w1, w2, input_mean, router_weight, probe=None, groups=None,
                     alpha: float = 0.7, similarity: str = DEFAULT_SIMILARITY) -> torch.Tensor:
    """Expert weights (E,d,h), (E,h,d), input means (E,d), router rows (E,d), probe (n,d) or
    None, clusters (E,) or None -> (E, E). With no probe rows, outputs falls back to weights
    and scores to routed (a layer that has not been trained yet)."""
    param, act = parse_similarity(similarity)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if probe is None or probe.shape[0] == 0:
        param, act = param.replace("outputs", "weights"), act.replace("scores", "routed")
    s_param = cosine_matrix({"weights": lambda: flat_weights(w1, w2),
                             "specific": lambda: specific_weights(w1, w2, groups),
                             "outputs": lambda: probe_outputs(w1, w2, probe)}[param]())
    if act == "scores":
        s_act = cosine_matrix(probe_scores(probe, router_weight))
    elif act == "centroids":
        s_act = cosine_matrix(input_mean)
    else:
        s_act = (cosine_matrix(input_mean) + cosine_matrix(router_weight)) / 2
    return alpha * s_param + (1 - alpha) * s_act


def within_similarity(similarity: torch.Tensor, assignment: torch.Tensor) -> float:
    """Mean similarity over the pairs i != j that share a cluster."""
    same = assignment.unsqueeze(0) == assignment.unsqueeze(1)
    same.fill_diagonal_(False)
    return float(similarity.cpu()[same].mean()) if bool(same.any()) else 0.0


def _balanced_assign(affinity: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy: take (expert, cluster) pairs by falling affinity while the cluster has room."""
    n_experts, n_clusters = affinity.shape
    assignment, room, left = [-1] * n_experts, [size] * n_clusters, n_experts
    for flat in affinity.flatten().argsort(descending=True, stable=True).tolist():
        expert, cluster = divmod(flat, n_clusters)
        if assignment[expert] < 0 and room[cluster] > 0:
            assignment[expert] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(assignment)


def _kmeanspp_seeds(similarity: torch.Tensor, n_clusters: int, generator) -> list[int]:
    """k-means++ on the distance 1 - s: each next seed drawn with probability ~ distance^2."""
    n_experts = similarity.shape[0]
    seeds = [int(torch.randint(n_experts, (1,), generator=generator))]
    nearest = similarity[:, seeds[0]]                                     # (E,) to the nearest seed
    while len(seeds) < n_clusters:
        dist = (1 - nearest).clamp(min=0).square()
        dist[seeds] = 0
        if dist.sum() <= 0:  # all remaining experts identical to a seed: pick uniformly
            dist = torch.ones(n_experts)
            dist[seeds] = 0
        seeds.append(int(torch.multinomial(dist, 1, generator=generator)))
        nearest = torch.maximum(nearest, similarity[:, seeds[-1]])
    return seeds


def _kmeans_from(similarity: torch.Tensor, assignment: torch.Tensor, n_clusters: int,
                 max_iter: int) -> torch.Tensor:
    """Balanced kernel k-means iterations from `assignment` until a fixed point."""
    size = similarity.shape[0] // n_clusters
    off_diagonal = 1 - torch.eye(similarity.shape[0])
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


def balanced_kmeans(similarity: torch.Tensor, n_clusters: int, init: torch.Tensor | None = None,
                    seed: int = 0, max_iter: int = 50, restarts: int = 0) -> torch.Tensor:
    """Kernel k-means on a similarity matrix with every cluster holding exactly E/G experts.

    An expert's affinity to a cluster is its mean similarity to the cluster's other members.
    Runs from `init` (previous assignment) when given, and from `restarts` k-means++ seedings
    (at least one without init); returns the result with the highest mean within-cluster
    similarity, the earliest on ties (so the warm start wins unless beaten). Returns (E,) long
    cluster ids; a fixed point of the update, so a second call from its own output returns it
    unchanged (with restarts=0).
    """
    similarity = similarity.detach().float().cpu()
    n_experts = similarity.shape[0]
    if n_experts % n_clusters:
        raise ValueError(f"{n_experts} experts cannot form {n_clusters} equal clusters")
    starts = [] if init is None else [init.detach().cpu().long().clone()]
    generator = torch.Generator().manual_seed(seed)
    while len(starts) < restarts + (init is not None) or not starts:
        seeds = _kmeanspp_seeds(similarity, n_clusters, generator)
        starts.append(_balanced_assign(similarity[:, seeds], n_experts // n_clusters))
    results = [_kmeans_from(similarity, start, n_clusters, max_iter) for start in starts]
    scores = [within_similarity(similarity, r) for r in results]
    return next(r for r, score in zip(results, scores) if score >= max(scores) - 1e-9)


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


@torch.no_grad()
def recluster(layer, alpha: float = 0.7, seed: int = 0, similarity: str = DEFAULT_SIMILARITY,
              min_gain: float = 0.01, restarts: int = 8, random_groups: bool = False) -> dict:
    """Regroup one model.MoE layer and re-factorize it into a shared base + rank-r residuals.

    Materializes W = B + UV (or takes the dense experts on the first call) and clusters by
    fused similarity, warm-started from the current groups. A regrouping is taken only if it
    raises the mean within-cluster similarity by at least `min_gain` (the paper's 0.01);
    otherwise the groups stay. Either way every cluster is re-factorized (re-centred and
    re-truncated; skipping that cost quality in an earlier 1000-step run on the Gutenberg
    books: +6.4% perplexity vs top-k instead of -0.9%), and clusters whose members did not change keep their factors' basis
    (align_gauge), so their optimizer state stays meaningful. Per-expert quantities (router
    rows, input means, ids) follow their expert into the new cluster-major slot order.

    random_groups: the first call draws equal groups at random (seeded) instead.
    Returns {'moved': experts that changed cluster, 'gain': the within-cluster similarity
    gain of the proposed groups, 'skipped': True when it was below min_gain,
    'reset': parameters created by this call (no state to carry: the first clustering's bank
    and cluster router), 'carry': {parameter: (index, keep)} for parameters that survive:
    new row i of the optimizer state is old row index[i] (None: same rows), and rows where
    keep is False start from zero (None: all kept)}. carry_optimizer_state applies it.
    """
    cfg = layer.cfg
    n_clusters, m, n_experts = cfg.n_clusters, cfg.n_experts // cfg.n_clusters, cfg.n_experts
    current = torch.arange(n_experts) // m                          # slots are cluster-major
    first = not layer.has_clusters
    w1, w2 = (w.detach() for w in layer.bank.weights())
    probe = layer.probe[:min(int(layer.probe_seen), layer.probe.shape[0])]
    sim = expert_similarity(w1, w2, layer.input_mean, layer.router.weight, probe,
                           None if first else current, alpha, similarity).cpu()
    assignment = balanced_kmeans(sim, n_clusters, None if first else current, seed, restarts=restarts)
    if random_groups and first:  # the 'no online clustering' ablation: equal groups by chance
        assignment = torch.randperm(n_experts, generator=torch.Generator().manual_seed(seed)) % n_clusters
    gain = within_similarity(sim, assignment) - within_similarity(sim, current)
    skipped = not first and gain < min_gain
    if skipped:
        assignment = current
    order = cluster_order(assignment, n_clusters)                   # new slot i <- old order[i]
    # Old cluster that each new cluster equals (same members), -1 where the members changed.
    old_of = current[order].view(n_clusters, m)
    source = torch.where((old_of == old_of[:, :1]).all(1), old_of[:, 0], -1)
    if first:
        source.fill_(-1)
    if cfg.compress:
        factors = _refactor(layer, w1, w2, assignment, current, order, source, first)
    old_cluster_rows = None if first else layer.cluster_router.detach().clone()
    if first:
        layer.make_clustered()
    permuted = not torch.equal(order, torch.arange(n_experts))
    order_dev = order.to(layer.router.weight.device)
    per_expert = [layer.router.weight, layer.input_mean, layer.expert_ids, layer.expert_counts,
                  layer.expert_bias]
    if cfg.compress:
        layer.bank.load_factors(*factors)
    else:  # the 'no compression' ablation: full experts, only their slots change
        per_expert += list(layer.bank.parameters())
    if permuted:
        for tensor in per_expert:
            tensor.copy_(tensor[order_dev])
    rows = layer.router.weight.view(n_clusters, m, -1).mean(1)      # (G, d) member means
    old_bias, bias = layer.cluster_bias.clone(), torch.zeros_like(layer.cluster_bias)
    if not first:  # a cluster whose members stayed keeps its prototype and balancing bias
        keep = source >= 0
        rows[keep.to(rows.device)] = old_cluster_rows[source[keep].to(rows.device)]
        bias[keep.to(bias.device)] = old_bias[source[keep].to(bias.device)]
    layer.cluster_router.copy_(rows)
    layer.cluster_bias.copy_(bias)
    layer.n_reclusters += 1

    carry = {}
    if permuted:  # rows that belong to one expert follow it, and so do their state rows
        for param in [layer.router.weight] + ([] if cfg.compress else list(layer.bank.parameters())):
            carry[param] = (order, None)
    reset = [layer.cluster_router] if first else []
    if first and cfg.compress:
        reset += list(layer.bank.parameters())
    if not first and not bool((source == torch.arange(n_clusters)).all()):
        index, keep = torch.where(source >= 0, source, torch.arange(n_clusters)), source >= 0
        for param in ([layer.cluster_router] +
                      (list(layer.bank.parameters()) if cfg.compress else [])):
            carry[param] = (index, keep)
    moved = 0 if first else int((current[order] != assignment[order]).sum())
    return {"moved": moved, "gain": gain, "skipped": skipped, "reset": reset, "carry": carry}


def _refactor(layer, w1, w2, assignment, current, order, source, first):
    """New shared bases and residuals, cluster-major (compress.factorize's outputs): an SVD
    of the materialized experts where groups changed, else compress.refactorize in factored
    form; clusters whose members stayed keep their factors' basis (align_gauge)."""
    cfg = layer.cfg
    n_clusters, m = cfg.n_clusters, cfg.n_experts // cfg.n_clusters
    if first or not torch.equal(assignment, current):
        _, base1, u1, v1 = factorize(w1, assignment.to(w1.device), n_clusters, cfg.rank)
        _, base2, u2, v2 = factorize(w2, assignment.to(w2.device), n_clusters, cfg.rank)
    else:  # same groups: identical to an SVD of the materialized experts, without one
        bank = layer.bank
        u1, v1, u2, v2 = bank.factors()
        base1, u1, v1 = refactorize(bank.base1, u1, v1, cfg.rank)
        base2, u2, v2 = refactorize(bank.base2, u2, v2, cfg.rank)
    if not first and bool((source >= 0).any()):
        kept = (source >= 0).repeat_interleave(m).to(w1.device)      # (E,) slots of kept clusters
        new, old = [u1, v1, u2, v2], [f[order.to(w1.device)] for f in layer.bank.factors()]
        for i in (0, 2):
            u_al, v_al = align_gauge(new[i][kept], new[i + 1][kept], old[i][kept], old[i + 1][kept])
            new[i][kept], new[i + 1][kept] = u_al, v_al
        u1, v1, u2, v2 = new
    return base1, u1, v1, base2, u2, v2


def recluster_model(model: nn.Module, alpha: float = 0.7, seed: int = 0,
                    similarity: str = DEFAULT_SIMILARITY, min_gain: float = 0.01,
                    restarts: int = 8, random_groups: bool = False) -> dict:
    """recluster every MoE layer of a GPT -> {'moved': total, 'gain': [per layer],
    'skipped': [per layer], 'reset': [...], 'carry': {...}} (see recluster)."""
    total = {"moved": 0, "gain": [], "skipped": [], "reset": [], "carry": {}}
    for i, layer in enumerate(model.moe_layers()):
        result = recluster(layer, alpha, seed + i, similarity, min_gain, restarts, random_groups)
        total["moved"] += result["moved"]
        total["gain"].append(result["gain"])
        total["skipped"].append(result["skipped"])
        total["reset"] += result["reset"]
        total["carry"].update(result["carry"])
    return total


def carry_rows(state: dict, index: torch.Tensor | None, keep: torch.Tensor | None) -> dict:
    """One parameter's optimizer state (e.g. AdamW's step, exp_avg, exp_avg_sq) -> the state
    for the regrouped parameter: tensors shaped like it take rows `index` along dim 0, rows
    where `keep` is False become zero; scalars (the step count) stay. Zeroed moments under an
    advanced step count (no bias correction left) make a row's update m / sqrt(v) start at
    (1 - beta1) / sqrt(1 - beta2) of a fresh optimizer's: 0.45x with train.py's betas
    (0.9, 0.95), at most 1.1x later, a gentle restart (with beta2 = 0.999 it would be 3.2x)."""
    if index is None and keep is None:
        return state
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if index is not None:
                value = value[index.to(value.device)]
            if keep is not None:
                mask = keep.to(value.device).view(-1, *[1] * (value.dim() - 1))
                value = torch.where(mask, value, torch.zeros((), dtype=value.dtype,
                                                            device=value.device))
        out[key] = value
    return out


def carry_optimizer_state(optimizer: torch.optim.Optimizer, result: dict) -> None:
    """Apply a recluster(_model) result to an optimizer's state, in place: drop the state of
    `reset` parameters, permute and zero rows of `carry` parameters. Parameters are the same
    objects before and after a recluster (the bank is filled in place), so the optimizer
    itself survives; only the first clustering creates parameters (rebuild it then)."""
    for param in result["reset"]:
        optimizer.state.pop(param, None)
    for param, (index, keep) in result["carry"].items():
        if param in optimizer.state:
            optimizer.state[param] = carry_rows(optimizer.state[param], index, keep)
