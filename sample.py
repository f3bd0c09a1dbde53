"""Generate text from a train.py checkpoint.  `python sample.py --ckpt=out/ckpt.pt`.

Owns: SampleConfig and the prompt -> tokens -> generate -> text loop, with two inference
options for a clustered checkpoint: `--int4` (FP16 bases, INT4 residual factors) and
`--offload_budget=N` (expert weights stay in CPU memory; at most N (layer, cluster) entries
live on the device). On CUDA the decode step replays from a CUDA graph where it can
(fast/decode_graph.py; not with offload). Prints tokens/s and, with offload, the cache's counters.
Nothing else: the KV cache is model.py's, quantization quant.py's, the cluster cache and
its next-layer predictor offload.py's.
"""
# cli first: it sets the CPU thread policy, which OpenMP reads once, as torch loads.
from cli import check_rules, parse_config, resolve_device, run
from checkpoint import load_model
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import data
from generate import generate
from offload import PREDICT_AT, ClusterOffloader
from quant import quantize_model


@dataclass
class SampleConfig:
    ckpt: str = "out/ckpt.pt"    # a train.py checkpoint
    prompt: str = "\n"           # the text the samples continue
    num_samples: int = 2         # samples, one after another
    max_new_tokens: int = 200    # tokens generated per sample
    temperature: float = 0.8     # 0 = greedy (argmax)
    top_k: int = 200             # 0 = no limit
    seed: int = 1337             # the sampling generator's seed
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    dtype: str = "auto"          # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    use_cache: bool = True       # KV cache; false re-runs the whole context every token
    int4: bool = False           # clustered checkpoints: store the expert banks INT4
    offload_budget: int = 0      # clustered checkpoints: cluster entries on the device; 0 = off
    predict_at: str = "block"    # offload: where the next layer's clusters are guessed (offload.PREDICT_AT)
    cuda_graph: bool = True      # replay the decode step from a CUDA graph where one can run
                                 # (CUDA, KV cache, no offload: fast/decode_graph.py); else eager

    def validate(self):
        rules = [
            (self.num_samples >= 1 and self.max_new_tokens >= 1,
             "num_samples and max_new_tokens must be >= 1"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = no limit)"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
            (self.offload_budget >= 0, "offload_budget must be >= 0 cluster entries (0 = no offload)"),
            (self.predict_at in PREDICT_AT, f"predict_at must be one of {'|'.join(PREDICT_AT)}"),
        ]
        check_rules(rules, "sample")
        return self


def prepare(model, cfg: SampleConfig, device: str, dtype: str):
    """The compute dtype, --int4 and --offload_budget applied to a loaded model ->
    (the offloader or None, whether the forward needs bf16 autocast)."""
    clustered = any(layer.compressed for layer in model.moe_layers())
    stored_int4 = any(layer.compressed and layer.bank.quantized for layer in model.moe_layers())
    # bf16 weights rather than autocast over float32 ones (a cast per op and per step); an
    # INT4 checkpoint keeps float16 scales, which a blanket .to() would break: autocast then.
    autocast = dtype == "bfloat16" and stored_int4
    if dtype == "bfloat16" and not stored_int4:
        model.to(torch.bfloat16)
    for flag, on in (("--int4", cfg.int4), ("--offload_budget", cfg.offload_budget > 0)):
        if on and not clustered:
            raise ValueError(f"{flag} needs a clustered checkpoint (train with --moe=clustered past "
                             f"burn_in); {cfg.ckpt} holds moe={model.cfg.moe}, not clustered")
    if cfg.int4:  # bases in the forward's dtype, so no cast per step
        quantize_model(model, base_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    if cfg.offload_budget == 0:
        return None, autocast
    cache = ClusterOffloader(model, 0, device, predict_at=cfg.predict_at)
    cache.budget = cfg.offload_budget * cache.entry_bytes((0, 0))
    return cache, autocast


def report(cache: ClusterOffloader, new_tokens: int) -> dict:
    """The offload counters, printed and returned."""
    stats = cache.stats
    overall, per_layer = cache.prediction_accuracy()
    timing = cache.timing()
    looked_up = stats["hits"] + stats["misses"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1%}"
    print(f"offload: {stats['hits']} hits, {stats['misses']} misses "
          f"(hit rate {fmt(stats['hits'] / looked_up if looked_up else None)}), "
          f"{stats['bytes_moved'] / 2**20:.2f} MiB moved ({stats['bytes_moved'] / new_tokens / 2**10:.1f} "
          f"KiB per new token), {stats['stalls']} stalls, copies hidden behind compute: "
          f"{fmt(timing['hidden_fraction'])}")
    print(f"next-layer cluster prediction: {fmt(overall)} of {stats['predictions']} tokens; "
          f"per layer: {', '.join(fmt(a) for a in per_layer)}")
    return {**stats, **timing, "prediction_accuracy": overall, "layer_prediction_accuracy": per_layer}


def main(cfg: SampleConfig) -> dict:
    """-> {'texts', 'tokens_per_sec', 'offload' (counters, or None)}."""
    cfg.validate()
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    model, _ = load_model(cfg.ckpt, device)
    model.eval()
    cache, use_autocast = prepare(model, cfg, device, dtype)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16) if use_autocast \
        else nullcontext()
    enc = data.get_encoding()
    prompt = torch.tensor([enc.encode(cfg.prompt, allowed_special="all")], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    graph = None  # the graphed decode step, where one can run (fast/decode_graph.py)
    if cfg.cuda_graph and cfg.use_cache and device.startswith("cuda"):
        from fast.decode_graph import GraphedDecodeStep, graph_unsupported
        graph = GraphedDecodeStep if graph_unsupported(model) is None else None
    texts, seconds = [], 0.0
    for _ in range(cfg.num_samples):
        start = time.perf_counter()
        with autocast:
            out = generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                           generator, use_cache=cfg.use_cache, step=graph and graph(model))
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        # The vocabulary is padded past the tokenizer's last id; an untrained model may pick those.
        texts.append(enc.decode([t for t in out[0].tolist() if t < enc.n_vocab]))
        print(texts[-1], f"\n--------------- {cfg.max_new_tokens / elapsed:.1f} tokens/s")
    new_tokens = cfg.num_samples * cfg.max_new_tokens
    tokens_per_sec = new_tokens / seconds
    print(f"{new_tokens} new tokens in {seconds:.2f} s: {tokens_per_sec:.1f} tokens/s, the first "
          f"sample's warm-up included "
          f"(batch 1, prompt {prompt.shape[1]} tokens, {'KV cache' if cfg.use_cache else 'no cache'}"
          f"{', CUDA graph' if graph else ''}{', INT4' if cfg.int4 else ''}, {device})")
    offload = report(cache, new_tokens) if cache is not None else None
    return {"texts": texts, "tokens_per_sec": tokens_per_sec, "offload": offload}


if __name__ == "__main__":
    run(lambda argv: main(parse_config(SampleConfig, argv)), sys.argv[1:])
