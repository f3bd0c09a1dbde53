"""One FFN layer timed (docs/design.md's hot-path table), and one whole model timed alone.

Owns: `timed` (CUDA events, warm-up, median of repeats; perf_counter on CPU) and the
helpers every bench section uses (`free_memory`, `peak_mib`, `build_model`), the layer
variants at one setting (dense FFN, `MinimalTopK` as the yardstick, top-k and clustered MoE,
grouped and loop paths, the clustered layer with fast/triton_combine.py on CUDA), their
forward+backward timing, optionally torch.compile'd, and a torch.profiler table of the
kernels that dominate each grouped layer.
Also `train_speed`: one whole model's train step timed alone (bench.py's models section,
and the per-variant speed of a grid whose runs shared the GPU).
Does not own: the setting (bench.BenchConfig: tokens, repeats, warmup, seed, compile_layers;
the layer's shape is its --preset's) or the tables of whole models (sections.py).
"""
import gc
import math
import statistics
import time
from dataclasses import asdict

import torch
import torch.nn as nn

from regroup import recluster, recluster_model
from experts import gelu, grouped_available, in_compute_dtype, resolve_matmul
from fast.triton_combine import combine_available
from model import GPT, MLP, GPTConfig, init_weights
from moe import MoE


def free_memory(device):
    """Collect garbage and reset the peak counter: a measurement starts from what stays resident."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def build_model(tc, device, dtype=None, timings: dict | None = None) -> GPT:
    """A random-init model of a train.TrainConfig on `device`; clustered ones are clustered +
    compressed right away (random input means stand in for the statistics training collects).
    timings, if given, gets 'first_recluster_s': the wall time of that first clustering."""
    torch.manual_seed(tc.seed)
    with torch.device(device):
        model = GPT(tc.model_config())
    if tc.moe == "clustered":
        for layer in model.moe_layers():
            layer.input_mean.normal_()
        t0 = time.perf_counter()
        recluster_model(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if timings is not None:
            timings["first_recluster_s"] = time.perf_counter() - t0
    return model.to(dtype) if dtype else model


def train_step_fn(tc, device, timings: dict | None = None):
    """A model of a TrainConfig on the device and its whole train step on random tokens, as
    train.py runs it (train.train_step: forward and backward of every micro-batch, clipping,
    fused AdamW, the balancing step; bf16 autocast on CUDA; torch.compile if tc.compile;
    replayed from a CUDA graph if tc.cuda_graph) -> (step(), model, tokens a step)."""
    from strategy import OneProcess
    from train import build_optimizer, train_step
    from train_log import Interval
    model = build_model(tc, device, timings=timings)
    optimizer = build_optimizer(model, tc)
    cuda = device.type == "cuda"
    runner = torch.compile(model, mode=tc.compile_mode) if tc.compile and cuda else model
    tokens = torch.randint(0, tc.vocab_size, (tc.batch_size, tc.block_size + 1), device=device)
    batches = [(tokens[:, :-1], tokens[:, 1:])] * tc.grad_accum
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cuda, cache_enabled=not tc.cuda_graph)
    strategy, interval = OneProcess(str(device), "bfloat16" if cuda else "float32"), \
        Interval.start(model.moe_layers(), device)

    def eager(batches):
        train_step(runner, model, optimizer, batches, tc, autocast, strategy, interval)
    if tc.cuda_graph and cuda:
        from fast.train_graph import GraphedTrainStep
        graphed = GraphedTrainStep(eager, model)
        return (lambda: graphed(batches)), model, batches[0][0].numel() * len(batches)

    def step():
        eager(batches)
        optimizer.zero_grad(set_to_none=True)
    return step, model, batches[0][0].numel() * len(batches)


def train_speed(tc, device, repeats: int = 20, warmup: int = 5, peak: float | None = None) -> dict:
    """One model of a TrainConfig alone on the device: the median step of train_step_fn ->
    train tokens/s, peak MiB, MFU (model FLOPs over `peak` FLOP/s, None without one),
    parameters, and for clustered models the first clustering's seconds."""
    free_memory(device)
    timings = {}
    step, model, tokens = train_step_fn(tc, device, timings)
    slow_start = device.type == "cuda" and (tc.compile or tc.cuda_graph)  # compiling, capturing
    ms = timed(step, device, repeats, warmup + (3 if slow_start else 0))
    rate = tokens / ms * 1e3
    result = {**model.param_counts(), "train_tokens_per_sec": rate, "train_peak_mib": peak_mib(device),
              "mfu": model.flops_per_token() * rate / peak if peak else None, **timings}
    del step, model
    free_memory(device)
    return result


def timed(fn, device, repeats: int, warmup: int) -> float:
    """Median milliseconds of fn(); CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class MinimalTopK(nn.Module):
    """The yardstick for our top-k layer: the least a dropless top-k MoE must do. Router linear,
    softmax top-k, one argsort of the expert ids, the two grouped matmuls (torch._grouped_mm on
    sm90+ CUDA, the loop elsewhere), gates applied in expert order and one index_add back to
    tokens; no aux loss, no statistics, no capacity."""

    def __init__(self, n_experts: int, d: int, h: int, k: int, device):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(n_experts, d, h) * 0.02)
        self.w2 = nn.Parameter(torch.randn(n_experts, h, d) * 0.02 / math.sqrt(2))
        self.matmul = resolve_matmul("auto", device)

    def forward(self, x):
        shape, n_experts = x.shape, self.w1.shape[0]
        x = x.reshape(-1, shape[-1])                                      # (N, d)
        x = in_compute_dtype(x)
        probs = self.router(x).float().softmax(-1)                        # (N, E)
        gates, expert_idx = probs.topk(self.k, dim=-1)                    # (N, k)
        gates = gates / gates.sum(-1, keepdim=True)
        flat = expert_idx.flatten()
        order = flat.argsort()                                            # (N*k,) slots by expert
        offs = torch.searchsorted(flat[order], torch.arange(n_experts, device=x.device),
                                  right=True).to(torch.int32)
        token = order // self.k
        hidden = gelu(self.matmul(x.index_select(0, token), self.w1, offs))   # (N*k, h)
        out = self.matmul(hidden, self.w2, offs) * gates.flatten()[order].unsqueeze(-1).to(x.dtype)
        y = x.new_zeros(x.shape).index_add(0, token, out)               # (N, d)
        return y.view(shape), y.new_zeros(())


def _moe_layer(gpt_cfg, kind: str, impl: str):
    layer = MoE(GPTConfig(**{**asdict(gpt_cfg), "moe_impl": impl}))
    init_weights(layer, n_layer=1)
    if kind == "clustered":
        layer.input_mean.normal_()
        recluster(layer)
    return layer


def _layer_variants(cfg, shape, device):
    """(name, module, impl) for each FFN layer variant at the shape of a model config."""
    torch.manual_seed(cfg.seed)
    gpt_cfg = GPTConfig(n_embd=shape.n_embd, ffn_hidden=shape.ffn_hidden, n_experts=shape.n_experts,
                        top_k=shape.top_k, n_clusters=shape.n_clusters, rank=shape.rank, moe="clustered")
    impls = ["grouped", "loop"] if device.type == "cuda" else ["loop"]
    variants = [("dense FFN d->k*h->d", MLP(shape.n_embd, shape.top_k * shape.ffn_hidden), None),
                ("minimal top-k", MinimalTopK(shape.n_experts, shape.n_embd, shape.ffn_hidden,
                                              shape.top_k, device), impls[0])]
    for kind in ("top-k", "clustered"):
        for impl in impls:
            variants.append((f"{kind} MoE, {impl}", _moe_layer(gpt_cfg, kind, impl), impl))
    if grouped_available(device) and combine_available(device):
        variants.append(("clustered MoE, triton", _moe_layer(gpt_cfg, "clustered", "triton"), "triton"))
    return [(n, m.to(device), i) for n, m, i in variants]


def _step_fn(layer, x, grad, device):
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            y, aux = layer(x)
        # The aux loss's backward is part of the layer's cost. In training it is a scalar added
        # to the loss, so it is a second root here, not `y + 0 * aux` (an extra (N, d) pass).
        roots, grads = [y], [grad.to(y.dtype)]
        if aux.requires_grad:
            roots, grads = roots + [aux], grads + [torch.ones_like(aux)]
        torch.autograd.backward(roots, grads)
    return step


def bench_layers(cfg, shape, device) -> list[dict]:
    """One FFN layer of `shape` (a model config), forward + backward on (cfg.tokens, d)
    inputs, bf16 autocast on CUDA."""
    x = torch.randn(1, cfg.tokens, shape.n_embd, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    variants = _layer_variants(cfg, shape, device)
    if cfg.compile_layers:
        variants += [(f"{n}, compiled", torch.compile(m), i) for n, m, i in variants if i != "loop"]
    rows = []
    for name, layer, _ in variants:
        try:
            ms = timed(_step_fn(layer, x, grad, device), device, cfg.repeats, cfg.warmup)
        except Exception as error:  # a compile failure is a result to report, not a crash
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        rows.append({"layer": name, "ms": ms, "tokens_per_sec": cfg.tokens / ms * 1e3})
    ref = next((r["ms"] for r in rows if r["layer"].startswith("top-k")), rows[0]["ms"])
    minimal = next((r["ms"] for r in rows if r["layer"] == "minimal top-k"), float("nan"))
    for row in rows:
        row["speed_vs_topk"] = ref / row["ms"]
        row["ms_vs_minimal"] = row["ms"] / minimal   # the least a dropless top-k layer does
    return rows


def profile_layers(cfg, shape, device, top: int = 12) -> dict:
    """Top kernels by device time for each grouped MoE layer: where the milliseconds go."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(1, cfg.tokens, shape.n_embd, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    tables = {}
    for name, layer, impl in _layer_variants(cfg, shape, device):
        if impl == "loop":
            continue
        step = _step_fn(layer, x, grad, device)
        for _ in range(cfg.warmup):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)
        print(f"\n== {name}: 5 steps ==\n{tables[name]}")
    return tables
