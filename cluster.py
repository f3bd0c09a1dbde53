"""Online expert clustering: which experts belong together.

Owns: the expert similarities (parameter and activation views, fused), a balanced k-means
into G equal clusters (k-means++ seeding with a seed, warm start from the current groups,
which is itself a candidate), `ClusterSettings` (how a grouping is proposed: built once from
the run's config), `propose` (a pure function: one layer's tensors -> similarity -> grouping
-> gain), and how the grouping kept ranks among the others (`rank_among`: among every
balanced grouping where they are few enough to count).
Does not own: applying a grouping to a layer (regroup.py), when to recluster (train.py),
factor math (compress.py).

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
Once clustered, the members of a cluster share a base and see only the cluster's tokens, so
their weights, outputs and input means agree through the cluster itself; "specific" scales
that shared part down and "scores" asks the flat router about the same probe tokens, so a
cluster cannot lock its members in. docs/design.md gives the measurements behind the default.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PARAM_VIEWS = ("weights", "specific", "outputs")
ACT_VIEWS = ("routed", "centroids", "scores")


@dataclass(frozen=True)
class ClusterSettings:
    """How a grouping is proposed; the defaults of train.py's flags are these."""
    alpha: float = 0.7                   # weight of the parameter view vs the activation view
    similarity: str = "specific+scores"  # PARAM+ACT: one view of each (the module docstring)
    min_gain: float = 0.01               # keep the groups unless regrouping gains this much
    restarts: int = 8                    # k-means++ restarts beside the warm start
    random_groups: bool = False          # the first grouping drawn at random (an ablation)

    @classmethod
    def of(cls, cfg) -> "ClusterSettings":
        """From a train.TrainConfig."""
        return cls(cfg.alpha, cfg.similarity, cfg.min_gain, cfg.kmeans_restarts,
                   cfg.cluster_mode == "random")


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
                      alpha: float = ClusterSettings.alpha,
                      similarity: str = ClusterSettings.similarity) -> torch.Tensor:
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


def kmeans_candidates(similarity: torch.Tensor, n_clusters: int, init: torch.Tensor | None = None,
                      seed: int = 0, max_iter: int = 50, restarts: int = 0) -> list[torch.Tensor]:
    """The groupings balanced k-means considers: `init` itself (the current grouping), the
    fixed point reached from it, and one from each of `restarts` k-means++ seedings (at least
    one without init). (E,) long cluster ids each, the warm ones first."""
    similarity = similarity.detach().float().cpu()
    n_experts = similarity.shape[0]
    if n_experts % n_clusters:
        raise ValueError(f"{n_experts} experts cannot form {n_clusters} equal clusters")
    starts = [] if init is None else [init.detach().cpu().long().clone()]
    generator = torch.Generator().manual_seed(seed)
    while len(starts) < restarts + (init is not None) or not starts:
        seeds = _kmeanspp_seeds(similarity, n_clusters, generator)
        starts.append(_balanced_assign(similarity[:, seeds], n_experts // n_clusters))
    return starts[:init is not None] + [_kmeans_from(similarity, start, n_clusters, max_iter)
                                        for start in starts]


def balanced_kmeans(similarity: torch.Tensor, n_clusters: int, init: torch.Tensor | None = None,
                    seed: int = 0, max_iter: int = 50, restarts: int = 0) -> torch.Tensor:
    """Kernel k-means on a similarity matrix with every cluster holding exactly E/G experts.

    An expert's affinity to a cluster is its mean similarity to the cluster's other members.
    Runs from `init` (previous assignment) when given, and from `restarts` k-means++ seedings
    (at least one without init); returns the candidate (kmeans_candidates, `init` among them)
    with the highest mean within-cluster similarity, the earliest on ties (so the current
    grouping stays unless beaten). Returns (E,) long cluster ids; a fixed point of the update,
    so a second call from its own output returns it unchanged (with restarts=0).
    """
    return best_of(similarity, kmeans_candidates(similarity, n_clusters, init, seed, max_iter, restarts))


def best_of(similarity: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """The candidate with the highest mean within-cluster similarity, the earliest on ties."""
    scores = [within_similarity(similarity, c) for c in candidates]
    return next(c for c, score in zip(candidates, scores) if score >= max(scores) - 1e-9)


def canonical(assignment: torch.Tensor) -> tuple:
    """A grouping without its labels: clusters numbered by their first member."""
    first = {}
    return tuple(first.setdefault(int(c), len(first)) for c in assignment)


def n_groupings(n_experts: int, n_clusters: int) -> int:
    """Balanced groupings of E experts into G unlabeled clusters: E! / ((E/G)!^G G!)."""
    m = n_experts // n_clusters
    return math.factorial(n_experts) // (math.factorial(m) ** n_clusters * math.factorial(n_clusters))


def all_groupings(n_experts: int, n_clusters: int):
    """Every balanced grouping, each once, as (E,) cluster ids in canonical form."""
    m, assignment, sizes = n_experts // n_clusters, [0] * n_experts, [0] * n_clusters

    def place(expert: int, opened: int):
        if expert == n_experts:
            yield torch.tensor(assignment)
            return
        for cluster in range(min(opened + 1, n_clusters)):  # a new cluster only in order
            if sizes[cluster] < m:
                assignment[expert], sizes[cluster] = cluster, sizes[cluster] + 1
                yield from place(expert + 1, max(opened, cluster + 1))
                sizes[cluster] -= 1
    yield from place(0, 0)


@dataclass
class Proposal:
    """A grouping for one layer's experts, whether it is worth taking, and the numbers why."""
    assignment: torch.Tensor   # (E,) cluster of each expert slot (the current groups if skipped)
    gain: float                # mean within-cluster similarity gained over the current groups
    # (the first clustering: over a random grouping, whose expectation is the mean similarity)
    skipped: bool              # gain < min_gain: keep the groups (never for the first clustering)
    rank: int                  # of the current grouping (the first clustering: the one taken)
    of: int                    # ... among this many: every balanced grouping where they are at
    # most ENUMERATE, else the distinct ones k-means reached
    margin: float | None       # its score minus the best other's (> 0: it is the best by that)


ENUMERATE = 10_000  # up to this many balanced groupings, rank among all of them


def rank_among(sim: torch.Tensor, grouping: torch.Tensor, candidates: list[torch.Tensor],
               n_clusters: int) -> tuple[int, int, float | None]:
    """grouping's (rank, of, margin) by mean within-cluster similarity: among every balanced
    grouping when there are at most ENUMERATE, else among the distinct candidates."""
    if n_groupings(len(grouping), n_clusters) <= ENUMERATE:
        candidates = all_groupings(len(grouping), n_clusters)
    mine, others = canonical(grouping), {}
    for c in candidates:
        others.setdefault(canonical(c), within_similarity(sim, c))
    score = others.pop(mine, within_similarity(sim, grouping))
    rank = 1 + sum(other > score + 1e-9 for other in others.values())
    return rank, len(others) + 1, (score - max(others.values())) if others else None


@torch.no_grad()
def propose(w1, w2, input_mean, router_weight, probe, groups, n_clusters: int,
            settings: ClusterSettings = ClusterSettings(), seed: int = 0) -> Proposal:
    """Expert weights (E,d,h), (E,h,d), input means (E,d), router rows (E,d), probe (n,d),
    current groups (E,) or None before the first clustering -> the balanced k-means grouping
    of their fused similarity, warm-started from the current groups (a pure function).
    settings.random_groups: the first grouping is drawn at random (seeded) instead, the 'no
    online clustering' ablation."""
    n_experts = w1.shape[0]
    first = groups is None
    sim = expert_similarity(w1, w2, input_mean, router_weight, probe, groups, settings.alpha,
                            settings.similarity).cpu()
    candidates = kmeans_candidates(sim, n_clusters, groups, seed, restarts=settings.restarts)
    assignment = best_of(sim, candidates)
    if settings.random_groups and first:
        assignment = torch.randperm(n_experts, generator=torch.Generator().manual_seed(seed)) % n_clusters
    off_diagonal = ~torch.eye(n_experts, dtype=torch.bool)
    before = float(sim[off_diagonal].mean()) if first else within_similarity(sim, groups)
    gain = within_similarity(sim, assignment) - before
    skipped = not first and gain < settings.min_gain
    rank, of, margin = rank_among(sim, assignment if first else groups, candidates, n_clusters)
    return Proposal(groups if skipped else assignment, gain, skipped, rank, of, margin)
