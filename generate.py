"""Text from a model, one token at a time: the KV cache, the decode loop and sampling.

Owns: `KVCache` (every layer's keys and values, written in place), `generate` (prefill the
prompt once, then one token per step against the cache; without a cache, the slow reference
that re-runs the whole context, which the cached path is tested against) and `sample_next`
(temperature, top-k). `generate` takes the decode step as a function, so a faster one can be
plugged in: sample.py passes fast/decode_graph.py's CUDA-graph replay on CUDA.
Does not own: the network (model.py; its attention reads and writes the cache), checkpoints
and the command line (sample.py).
"""
import torch


class KVCache:
    """Every layer's keys and values for the tokens generated so far (generate).

    Buffers (n_layer, B, n_head, block_size, head_dim) are allocated at the first write, in
    the dtype attention produces, and written in place: a decode step stores one position
    instead of concatenating the history. `length` counts cached positions; model.GPT.hidden_states
    advances it once every layer has written.

    Static mode (fast/decode_graph.py's CUDA graph): with `positions` set, a device tensor (T,) of the
    step's positions, keys are written there and attention spans the whole buffer under a
    mask, so every step has the same shapes and no host-side value enters the kernels.
    """

    def __init__(self, n_layer: int, block_size: int):
        self.n_layer, self.block_size = n_layer, block_size
        self.k = self.v = None
        self.length = 0
        self.positions = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, hd) after the cached positions -> this layer's keys and values
        so far, (B, H, length + T, hd) each."""
        if self.k is None:
            B, H, _, hd = k.shape
            # Zeros, not empty: static mode reads the whole buffer, and a masked NaN still
            # poisons softmax @ V.
            self.k = k.new_zeros(self.n_layer, B, H, self.block_size, hd)
            self.v = v.new_zeros(self.n_layer, B, H, self.block_size, hd)
        if self.positions is not None:
            self.k[layer].index_copy_(2, self.positions, k)
            self.v[layer].index_copy_(2, self.positions, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]



@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True, step=None):
    """idx (B, T) -> (B, T + max_new_tokens). temperature 0 is greedy (argmax).

    use_cache: run the prompt once (prefill), then feed one token per step against a
    KVCache. Without it every step re-runs the last block_size tokens: the slow reference
    the cached path is tested against.
    step(token (B, 1), cache) -> logits (B, 1, V): the cached decode step; default the plain
    forward, model(token, cache=cache).
    """
    block = model.cfg.block_size
    cache = KVCache(model.cfg.n_layer, block) if use_cache else None
    step = step or (lambda token, kv: model(token, cache=kv)[0])
    for i in range(max_new_tokens):
        if cache is None:
            logits, _, _ = model(idx[:, -block:])
        elif i > 0 and cache.length < block:
            logits = step(idx[:, -1:], cache)
        else:
            # Prefill; or the cache is full. Positions are learned and absolute, so sliding
            # the window by one token moves every token to a new position and stales every
            # cached key: re-prefill the last block_size tokens, which is exactly what the
            # reference computes. Past block_size each step therefore costs a prefill.
            cache.length = 0
            logits, _, _ = model(idx[:, -block:], cache=cache)
        idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
    return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Last-position logits (B, V) -> next tokens (B, 1): argmax when temperature <= 0, else
    a draw from softmax(logits / temperature), restricted to the top_k most likely tokens."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
