"""Which clusters live on the GPU: an LRU cache of cluster weights under a byte budget.

Owns: `ClusterOffloader`, which takes every clustered expert bank of a model off the GPU
into pinned CPU memory (one entry per (layer, cluster): FP16 bases and INT4 or float
factors), copies a cluster in on a side CUDA stream when the router selects it, evicts the
least recently used clusters to stay within the budget, prefetches the clusters the next
layer's router is likely to pick, and counts bytes moved, hits, misses and stalls.
Does not own: what a cluster computes (experts.py) or how it is quantized (quant.py).

Inference only. The one host sync per layer is the routing decision itself (how many tokens
each cluster got); the prefetch guess for the next layer costs a second one. Clusters are
computed one at a time over contiguous slices of cluster-sorted tokens, so the next
cluster's copy overlaps the current one's compute. On a CPU "device"
the same code runs with plain copies, which is how the tests check it without a GPU.
"""
from collections import OrderedDict

import torch

from quant import Int4Tensor
from router import Routing


def _nbytes(value) -> int:
    return value.nbytes if isinstance(value, Int4Tensor) else value.numel() * value.element_size()


def _move(value, device, non_blocking):
    return value.to(device, non_blocking=non_blocking)


class ClusterOffloader:
    """Attach with `ClusterOffloader(model, budget_bytes, device)`; detach with `.close()`.

    Residency stays within the budget except for the two clusters in use (the one computing
    and the next one copying in); any excess is recorded in `stats['over_budget_bytes']`.
    """

    def __init__(self, model, budget_bytes: int, device, prefetch: bool = True):
        self.device = torch.device(device)
        self.budget = int(budget_bytes)
        self.prefetch_enabled = prefetch
        self.layers = [layer for layer in model.moe_layers() if layer.clustered]
        if not self.layers:
            raise ValueError("offload needs clustered MoE layers (train with --moe=clustered "
                             "past warmup_iters, or run cluster.recluster_model first)")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.cpu = {}  # (layer, cluster) -> {name: pinned CPU tensor or Int4Tensor}
        for index, layer in enumerate(self.layers):
            for cluster in range(layer.bank.n_clusters):
                entry = {n: _move(v, "cpu", False) for n, v in layer.bank.cluster_tensors(cluster).items()}
                self.cpu[index, cluster] = {n: v.pin_memory() if cuda else v for n, v in entry.items()}
            # The bank's own storage leaves the device: only the cache holds GPU copies now.
            layer.bank.to("meta")
            layer.offload, layer.offload_index = self, index
        self.resident = OrderedDict()  # (layer, cluster) -> (tensors on device, nbytes, event)
        self.stats = {"bytes_moved": 0, "hits": 0, "misses": 0, "stalls": 0, "evictions": 0,
                      "prefetches": 0, "resident_bytes": 0, "peak_resident_bytes": 0,
                      "over_budget_bytes": 0}

    def entry_bytes(self, key) -> int:
        return sum(_nbytes(v) for v in self.cpu[key].values())

    def _evict_for(self, incoming: int, keep: set):
        for key in list(self.resident):
            if self.stats["resident_bytes"] + incoming <= self.budget:
                return
            if key not in keep:
                self.stats["resident_bytes"] -= self.resident.pop(key)[1]
                self.stats["evictions"] += 1

    def _fits(self, incoming: int, keep: set) -> bool:
        """Whether `incoming` bytes fit the budget once every entry outside `keep` is evicted."""
        pinned = sum(n for key, (_, n, _) in self.resident.items() if key in keep)
        return pinned + incoming <= self.budget

    def _load(self, key, keep: set, speculative: bool = False):
        """Start copying one cluster in (side stream on CUDA); no wait here. A speculative
        load (a guess about the next layer) is skipped unless it fits the budget."""
        if key in self.resident:
            return
        nbytes = self.entry_bytes(key)
        if speculative and not self._fits(nbytes, keep):
            return
        self._evict_for(nbytes, keep)
        cuda = self.stream is not None
        if cuda:
            # The copy may not start before the compute stream stops using evicted memory.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                tensors = {n: _move(v, self.device, True) for n, v in self.cpu[key].items()}
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            tensors, event = {n: _move(v, self.device, False) for n, v in self.cpu[key].items()}, None
        self.resident[key] = (tensors, nbytes, event)
        self.stats["bytes_moved"] += nbytes
        self.stats["resident_bytes"] += nbytes
        self.stats["peak_resident_bytes"] = max(self.stats["peak_resident_bytes"],
                                                self.stats["resident_bytes"])
        over = self.stats["resident_bytes"] - self.budget
        self.stats["over_budget_bytes"] = max(self.stats["over_budget_bytes"], over)

    def prefetch(self, index: int, clusters: list[int], keep: set | None = None,
                 speculative: bool = False):
        """Start copies of these clusters of layer `index`; `keep` may not be evicted for them."""
        keep = keep or {(index, c) for c in clusters}
        for cluster in clusters:
            if (index, cluster) not in self.resident:
                self._load((index, cluster), keep, speculative)
                self.stats["prefetches"] += (index, cluster) in self.resident

    def weights_for(self, index: int, cluster: int, dtype, keep: set) -> dict:
        """One cluster's forward weights, shaped (1, ...) as the bank expects; waits for its
        copy (a stall if it is still in flight)."""
        key = (index, cluster)
        if key in self.resident:
            self.stats["hits"] += 1
        else:
            self.stats["misses"] += 1
            self._load(key, keep)
        tensors, _, event = self.resident[key]
        self.resident.move_to_end(key)
        if event is not None:
            if not event.query():
                self.stats["stalls"] += 1
            torch.cuda.current_stream(self.device).wait_event(event)
        unpacked = self.layers[index].bank.unpack(tensors, dtype)
        return {n: v.unsqueeze(0) for n, v in unpacked.items()}

    def run(self, layer, x: torch.Tensor, routing: Routing, grouped: bool) -> torch.Tensor:
        """The clustered bank's forward, streamed one cluster at a time: tokens are sorted by
        cluster once; while cluster c computes on its slice, cluster c+1 is copying in. Only
        the budget plus the clusters in use are resident, never a stack of them all."""
        index, m = layer.offload_index, layer.bank.m
        counts = routing.cluster_counts.tolist()  # the routing decision itself: one host sync
        clusters = [c for c, n in enumerate(counts) if n > 0]
        if self.prefetch_enabled and index + 1 < len(self.layers):
            self._prefetch_next(index + 1, x, {(index, c) for c in clusters})
        dtype = torch.get_autocast_dtype(x.device.type) if \
            torch.is_autocast_enabled(x.device.type) else x.dtype
        order = routing.cluster_idx.argsort(stable=True)
        xs, expert_idx, gates = x[order], routing.expert_idx[order], routing.gates[order]
        out = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=dtype)  # (N, d)
        start = 0
        for i, cluster in enumerate(clusters):
            keep = {(index, c) for c in clusters[i:i + 2]}
            if i + 1 < len(clusters):
                self.prefetch(index, clusters[i + 1:i + 2], keep)  # overlaps this cluster's compute
            weights = self.weights_for(index, cluster, dtype, keep)
            rows = slice(start, start + int(counts[cluster]))
            start = rows.stop
            local = expert_idx[rows] - cluster * m            # within-cluster ids, as cluster 0
            zeros = torch.zeros_like(local[:, 0])
            subset = Routing(local, gates[rows], routing.aux_loss, routing.expert_counts, zeros,
                             routing.cluster_counts[cluster:cluster + 1])
            out[rows] = layer.bank(xs[rows], subset, grouped, weights).to(dtype)
        return torch.empty_like(out).index_copy_(0, order, out)

    def _prefetch_next(self, index: int, x: torch.Tensor, current: set):
        """Guess the next layer's clusters from this layer's input (the residual stream
        changes little between layers) and start their copies now, only into budget that
        this layer's own clusters (`current`) do not need: a guess never evicts them."""
        layer = self.layers[index]
        logits = torch.nn.functional.linear(x, layer.cluster_router.to(x.dtype))
        guess = torch.unique(logits.argmax(-1)).tolist()
        self.prefetch(index, guess, current | {(index, c) for c in guess}, speculative=True)

    def close(self):
        """Detach from the layers; their banks stay on 'meta' (reload the checkpoint to use
        the model without offload)."""
        for layer in self.layers:
            layer.offload = None
        self.resident.clear()
