"""Which clusters live on the GPU: an LRU cache of cluster weights under a byte budget, fed
ahead of need by double buffering and a next-layer cluster predictor.

Owns: `ClusterOffloader`, which takes every clustered expert bank of a model off the GPU
into pinned CPU memory (one entry per (layer, cluster): FP16 bases and INT4 or float
factors), copies a cluster in on a side CUDA stream when the router selects it, evicts the
least recently used clusters to stay within the budget, predicts the next layer's clusters
and starts their copies early, and counts bytes moved, hits, misses, stalls, predictions
and how long copies stayed hidden behind compute.
Does not own: what a cluster computes (experts.py) or how it is quantized (quant.py).

Inference only. One host sync per layer: the routing decision (how many tokens each cluster
got), fetched together with the prediction's score (and, guessing at "ffn", the next layer's
guesses); guessing at "block" adds one sync per layer for the guesses.

Double buffering (prefill). Tokens are sorted by cluster once and clusters are computed one
at a time; while cluster c computes, cluster c+1 is already copying in.

Next-layer prediction (decode and prefill alike), two places to guess (PREDICT_AT):
- "block" (default): before layer l's attention, its block calls `anticipate` with its own
  LayerNorm'd input; layer l's cluster router gives each token's guess, and the guessed
  clusters, most-guessed first, start copying at once, overlapping the attention (no
  cluster is in use then, so a guess may evict any entry). The guess has seen every earlier
  FFN; the first layer's is made from the embeddings.
- "ffn" (Pre-gated MoE, the paper's predictor): while layer l runs, layer l+1's cluster
  router is applied to layer l's FFN input (the residual stream changes little between
  layers); the copies start once layer l's own are queued, into budget that layer l's
  clusters in use do not need: a guess never evicts them. The first layer is never guessed.
When a layer routes, each token scores one prediction, correct when its guessed cluster is
the cluster it is routed to: stats['predictions'] and stats['correct'], per layer in
stats['layer_predictions'] and stats['layer_correct']. With one token per step (decoding)
"per token" is "per step". docs/results.md compares the two places on held-out text.

Transfer timing (CUDA). Each copy records an event on the side stream before and after it,
and one on the compute stream when its cluster is first needed. Per copy: copy = end - start,
wait = max(0, end - needed) (how long compute waited for it), hidden = copy - min(wait, copy).
`timing()` sums them: copy_ms, stall_ms (the waits) and hidden_fraction = hidden / copy;
None on a CPU "device", where copies are plain and synchronous. That is how the tests check
the same code without a GPU.

Memory safety without serializing: a copy never waits for the compute stream. A cluster's
device tensors are marked used by the compute stream (`record_stream`), so the allocator
reuses an evicted cluster's memory only once the compute that read it has finished.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch

from experts import autocast_dtype
from quant import Int4Tensor
from router import Routing, count


def _nbytes(value) -> int:
    return value.nbytes if isinstance(value, Int4Tensor) else value.numel() * value.element_size()


def _move(value, device, non_blocking):
    return value.to(device, non_blocking=non_blocking)


def _record_stream(value, stream):
    tensors = [value.packed, value.scale, value.zero] if isinstance(value, Int4Tensor) else [value]
    for tensor in tensors:
        if tensor is not None:
            tensor.record_stream(stream)


# Where layer l+1's clusters are guessed: "ffn", from layer l's FFN input while layer l
# computes (the copy overlaps layer l's experts and layer l+1's attention); "block" (the
# default), from layer l+1's block input, i.e. after layer l's FFN (the copy overlaps only
# layer l+1's attention and costs a second host sync per layer, but the guess has seen layer
# l's FFN).
PREDICT_AT = ("ffn", "block")


@dataclass
class _Entry:
    """One resident cluster: its tensors on the device and, on CUDA, its copy's events."""
    tensors: dict
    nbytes: int
    ready: object = None     # torch.cuda.Event recorded after the copy
    started: object = None   # torch.cuda.Event recorded before it; None once the copy is timed


class ClusterOffloader:
    """Attach with `ClusterOffloader(model, budget_bytes, device)`; detach with `.close()`.

    Residency stays within the budget except for the two clusters in use (the one computing
    and the next one copying in); any excess is recorded in `stats['over_budget_bytes']`.
    `prefetch=False` turns off the next-layer predictor (double buffering within a layer stays).
    """

    def __init__(self, model, budget_bytes: int, device, prefetch: bool = True,
                 predict_at: str = "block"):
        if predict_at not in PREDICT_AT:
            raise ValueError(f"predict_at must be one of {PREDICT_AT}, got {predict_at!r}")
        self.device = torch.device(device)
        self.budget = int(budget_bytes)
        self.prefetch_enabled = prefetch
        self.predict_at = predict_at
        self.layers = [layer for layer in model.moe_layers() if layer.compressed]
        if not self.layers:
            raise ValueError("offload needs clustered MoE layers (train with --moe=clustered "
                             "past burn_in, or run regroup.recluster_model first)")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.cpu = {}  # (layer, cluster) -> {name: pinned CPU tensor or Int4Tensor}
        for index, layer in enumerate(self.layers):
            for cluster in range(layer.bank.n_clusters):
                entry = {n: _move(v, "cpu", False) for n, v in layer.bank.cluster_tensors(cluster).items()}
                self.cpu[index, cluster] = {n: v.pin_memory() if cuda else v for n, v in entry.items()}
            # The bank's own storage leaves the device: only the cache holds GPU copies now.
            layer.bank.to("meta")
            layer.attach_offload(self, index)
        self.resident = OrderedDict()  # (layer, cluster) -> _Entry, least recently used first
        self.predicted = {}            # layer index -> (N,) clusters predicted for its tokens
        self.reset_stats()

    def reset_stats(self):
        """Zero every counter; resident_bytes describes the cache and is kept."""
        n = len(self.layers)
        resident = sum(entry.nbytes for entry in self.resident.values())
        self.stats = {"bytes_moved": 0, "hits": 0, "misses": 0, "stalls": 0, "evictions": 0,
                      "prefetches": 0, "resident_bytes": resident, "peak_resident_bytes": resident,
                      "over_budget_bytes": 0, "predictions": 0, "correct": 0,
                      "layer_predictions": [0] * n, "layer_correct": [0] * n,
                      "copy_ms": 0.0, "stall_ms": 0.0, "hidden_ms": 0.0}
        self._timings = []  # (started, ready, needed) events of copies not yet summed

    def evict_all(self):
        """Empty the cache (e.g. to measure a cold start); counters are kept."""
        self.stats["evictions"] += len(self.resident)
        self.stats["resident_bytes"] = 0
        self.resident.clear()
        self.predicted.clear()

    def entry_bytes(self, key) -> int:
        return sum(_nbytes(v) for v in self.cpu[key].values())

    def prediction_accuracy(self) -> tuple[float | None, list[float | None]]:
        """(overall, per layer) fraction of tokens whose next-layer cluster was predicted."""
        rate = lambda right, total: right / total if total else None
        return (rate(self.stats["correct"], self.stats["predictions"]),
                [rate(c, p) for c, p in zip(self.stats["layer_correct"], self.stats["layer_predictions"])])

    def timing(self) -> dict:
        """copy_ms, stall_ms and hidden_fraction of every copy used so far (see the module
        docstring); synchronizes the device. All None on CPU."""
        if self.stream is None:
            return {"copy_ms": None, "stall_ms": None, "hidden_fraction": None}
        torch.cuda.synchronize(self.device)
        for started, ready, needed in self._timings:
            copy = started.elapsed_time(ready)
            wait = max(needed.elapsed_time(ready), 0.0)
            self.stats["copy_ms"] += copy
            self.stats["stall_ms"] += wait
            self.stats["hidden_ms"] += copy - min(wait, copy)
        self._timings.clear()
        copy_ms = self.stats["copy_ms"]
        return {"copy_ms": copy_ms, "stall_ms": self.stats["stall_ms"],
                "hidden_fraction": self.stats["hidden_ms"] / copy_ms if copy_ms > 0 else None}

    def _evict_for(self, incoming: int, keep: set):
        for key in list(self.resident):
            if self.stats["resident_bytes"] + incoming <= self.budget:
                return
            if key not in keep:
                self.stats["resident_bytes"] -= self.resident.pop(key).nbytes
                self.stats["evictions"] += 1

    def _load(self, key, keep: set):
        """Start copying one cluster in (side stream on CUDA); no wait here. Least recently
        used entries outside `keep` are evicted to make room."""
        nbytes = self.entry_bytes(key)
        self._evict_for(nbytes, keep)
        if self.stream is None:
            entry = _Entry({n: _move(v, self.device, False) for n, v in self.cpu[key].items()}, nbytes)
        else:
            with torch.cuda.stream(self.stream):
                started = torch.cuda.Event(enable_timing=True)
                started.record(self.stream)
                tensors = {n: _move(v, self.device, True) for n, v in self.cpu[key].items()}
                ready = torch.cuda.Event(enable_timing=True)
                ready.record(self.stream)
            entry = _Entry(tensors, nbytes, ready, started)
        self.resident[key] = entry
        self.stats["bytes_moved"] += nbytes
        self.stats["resident_bytes"] += nbytes
        self.stats["peak_resident_bytes"] = max(self.stats["peak_resident_bytes"],
                                                self.stats["resident_bytes"])
        over = self.stats["resident_bytes"] - self.budget
        self.stats["over_budget_bytes"] = max(self.stats["over_budget_bytes"], over)

    def prefetch(self, index: int, clusters: list[int], keep: set | None = None):
        """Start copies of these clusters of layer `index`; `keep` may not be evicted for them."""
        keep = keep or {(index, c) for c in clusters}
        for cluster in clusters:
            if (index, cluster) not in self.resident:
                self._load((index, cluster), keep)
                self.stats["prefetches"] += 1

    def _speculate(self, index: int, guess_counts: list[float], keep: set):
        """Start copies of layer `index`'s predicted clusters, most-predicted first, while they
        fit the budget next to `keep` (the clusters in use now): a guess never evicts them."""
        reserved = sum(self.entry_bytes(key) for key in keep)
        guesses = sorted((c for c, n in enumerate(guess_counts) if n > 0), key=lambda c: -guess_counts[c])
        for cluster in guesses:
            key = (index, cluster)
            reserved += self.entry_bytes(key)
            if reserved > self.budget:
                return
            keep = keep | {key}
            if key in self.resident:
                self.resident.move_to_end(key)   # a predicted cluster outlives older entries
            else:
                self._load(key, keep)
                self.stats["prefetches"] += 1

    def weights_for(self, index: int, cluster: int, dtype, keep: set) -> dict:
        """One cluster's forward weights, shaped (1, ...) as the bank expects; makes the
        compute stream wait for its copy (a stall if it is still in flight)."""
        key = (index, cluster)
        if key in self.resident:
            self.stats["hits"] += 1
        else:
            self.stats["misses"] += 1
            self._load(key, keep)
        entry = self.resident[key]
        self.resident.move_to_end(key)
        if entry.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            if not entry.ready.query():
                self.stats["stalls"] += 1
            if entry.started is not None:  # first use of this copy: when compute needs it
                needed = torch.cuda.Event(enable_timing=True)
                needed.record(stream)
                self._timings.append((entry.started, entry.ready, needed))
                entry.started = None
                if len(self._timings) >= 4096:  # sum them now and then: events are not free
                    self.timing()
            stream.wait_event(entry.ready)
            for value in entry.tensors.values():
                _record_stream(value, stream)
        unpacked = self.layers[index].bank.unpack(entry.tensors, dtype)
        return {n: v.unsqueeze(0) for n, v in unpacked.items()}

    def anticipate(self, index: int, h: torch.Tensor):
        """predict_at="block": layer `index`'s block calls this with its LayerNorm'd input
        (before attention); its router's guess starts the copies at once, into budget that
        the clusters of the layer before no longer need."""
        if self.predict_at != "block" or not self.prefetch_enabled:
            return
        layer = self.layers[index]
        guess = layer.cluster_logits(h.reshape(-1, h.shape[-1])).argmax(-1)     # (N,)
        self.predicted[index] = guess
        self._speculate(index, count(guess, layer.bank.n_clusters).tolist(), set())

    def _route_on_host(self, index: int, x: torch.Tensor, routing: Routing):
        """The one host sync of a layer -> (tokens per cluster, tokens per predicted cluster of
        the next layer or None). Scores the prediction made for this layer on the way."""
        predicted = self.predicted.pop(index, None)
        scored = predicted is not None and predicted.shape == routing.cluster_idx.shape
        parts = [routing.cluster_counts.float()]
        if scored:
            parts.append((predicted == routing.cluster_idx).sum().float().view(1))
        predicting = self.prefetch_enabled and self.predict_at == "ffn" and index + 1 < len(self.layers)
        if predicting:
            following = self.layers[index + 1]
            guess = following.cluster_logits(x).argmax(-1)  # (N,)
            self.predicted[index + 1] = guess
            parts.append(count(guess, following.bank.n_clusters))
        host = torch.cat(parts).tolist()
        n_clusters = routing.cluster_counts.numel()
        if scored:
            tokens, correct = predicted.numel(), int(host[n_clusters])
            self.stats["predictions"] += tokens
            self.stats["correct"] += correct
            self.stats["layer_predictions"][index] += tokens
            self.stats["layer_correct"][index] += correct
        return host[:n_clusters], host[n_clusters + scored:] if predicting else None

    def run(self, layer, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The clustered bank's forward, streamed one cluster at a time: tokens are sorted by
        cluster once; while cluster c computes on its slice, cluster c+1 is copying in, and
        after this layer's last copy is queued the next layer's predicted clusters follow.
        Only the budget plus the clusters in use are resident, never a stack of them all."""
        index, m = layer.offload_index, layer.bank.m
        counts, guess_counts = self._route_on_host(index, x, routing)
        clusters = [c for c, n in enumerate(counts) if n > 0]
        dtype = autocast_dtype(x) or x.dtype
        order = routing.cluster_idx.argsort(stable=True)
        xs, expert_idx, gates = x[order], routing.expert_idx[order], routing.gates[order]
        out = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=dtype)  # (N, d)
        start = 0
        for i, cluster in enumerate(clusters):
            keep = {(index, c) for c in clusters[i:i + 2]}
            weights = self.weights_for(index, cluster, dtype, keep)
            if i + 1 < len(clusters):
                self.prefetch(index, clusters[i + 1:i + 2], keep)  # overlaps this cluster's compute
            if guess_counts is not None and i + 2 >= len(clusters):
                self._speculate(index + 1, guess_counts, keep)   # behind this layer's last copy
                guess_counts = None
            rows = slice(start, start + int(counts[cluster]))
            start = rows.stop
            local = expert_idx[rows] - cluster * m            # within-cluster ids, as cluster 0
            zeros = torch.zeros_like(local[:, 0])
            subset = Routing(local, gates[rows], routing.aux_loss, routing.expert_counts, zeros,
                             routing.cluster_counts[cluster:cluster + 1])
            out[rows] = layer.bank(xs[rows], subset, weights).to(dtype)
        return torch.empty_like(out).index_copy_(0, order, out)

    def close(self):
        """Detach from the layers; their banks stay on 'meta' (reload the checkpoint to use
        the model without offload)."""
        for layer in self.layers:
            layer.attach_offload(None)
        self.resident.clear()
        self.predicted.clear()
