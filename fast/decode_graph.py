"""Decoding without the host in the loop: generate.generate's decode step as a CUDA graph.

Owns: `GraphedDecodeStep`, the step that feeds one new token per sequence against the KV cache,
recorded once as a CUDA graph and replayed for every later token; `graph_unsupported`, why a
model cannot use it. Why it exists: at batch 1 a small model's decode step is a few hundred
tiny kernels, and eager PyTorch spends longer launching them than the GPU spends running them,
so a KV cache alone barely beats re-running the whole context (bench.py --sections=decode
shows both). A replay launches the whole step at once.
What a graph needs: CUDA; the same shapes every step (generate.KVCache's static mode: keys written
at a device-side position, attention over the whole buffer under a mask); no host sync and no
host-side decision inside the step. So not with offload (offload.py decides on the host which
cluster to copy) and not with the loop fallback of the grouped matmul (it reads group sizes on
the host): those decode eagerly.
Does not own: the cache or the model (generate.py, model.py), sampling (generate.sample_next, outside the graph).
"""
import torch

from experts import grouped_mm_loop


def graph_unsupported(model) -> str | None:
    """None if `model`'s decode step can be captured, else the reason it cannot."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA model, this one is on {device}"
    for layer in model.moe_layers():
        if getattr(layer, "offload", None) is not None:
            return "offload decides on the host which clusters to copy, every step"
        if getattr(layer.bank, "matmul", None) is grouped_mm_loop:
            return "the grouped-matmul loop fallback reads group sizes on the host (moe_impl)"
    return None


class GraphedDecodeStep:
    """step(token (B, 1), cache) -> logits (B, 1, V), as model(token, cache=cache) computes
    them, from a graph captured at the first call. The cache's buffers must exist (the prefill
    allocates them) and keep their batch size; the returned logits are overwritten by the next
    step, so read them first."""

    def __init__(self, model):
        reason = graph_unsupported(model)
        if reason:
            raise ValueError(f"cannot decode with a CUDA graph: {reason}")
        self.model, self.graph = model, None

    def _capture(self, token, cache):
        self.token = token.clone()
        self.positions = torch.full((token.shape[1],), cache.length, device=token.device)
        cache.positions, length = self.positions, cache.length
        # Autocast's weight-cast cache would hold tensors made during capture; graphs need it off.
        dtype = torch.get_autocast_dtype("cuda")
        autocast = torch.autocast("cuda", dtype, enabled=torch.is_autocast_enabled("cuda"),
                                  cache_enabled=False)
        # Warm up on a side stream first (cuBLAS handles, lazy inits), as torch.cuda.graph asks.
        # The warm-up writes this token's keys at `length`, which the replay rewrites alike.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                self.model(self.token, cache=cache)
                cache.length = length
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast:
            self.logits, _, _ = self.model(self.token, cache=cache)
        cache.length, cache.positions = length, None  # eager calls (a re-prefill) stay dynamic

    def __call__(self, token, cache):
        if self.graph is None:
            self._capture(token, cache)
        self.token.copy_(token)
        self.positions.fill_(cache.length)
        self.graph.replay()
        cache.length += token.shape[1]
        return self.logits
