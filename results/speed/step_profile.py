"""Where a whole train step's device time goes, by kind of kernel: dense, top-k and clustered
at a preset's size, each alone, one step of `tokens_per_step` tokens (forward and backward of
every micro-batch, clipping, fused AdamW, the balancing step), profiled over a few steps.
Every kernel's self time falls in the first bucket whose pattern its name holds (BUCKETS,
in order); prints per model the milliseconds a step spends in each bucket and the whole.
Why kernel names and not module ranges: backward kernels carry no forward range, and most of
a MoE step's extra time is in backward (the grouped matmuls' gradients, the scatter's).
usage (from the repository root): python -m results.speed.step_profile [preset] [moe,...] [flags]
  flags: --compile, --cuda_graph (a graph replays as one launch: buckets still count kernels),
         --steps=N (profiled steps, default 3), --tokens_per_step=N (default 32768)
On a CPU it runs (tiny preset advised) and buckets CPU operator time instead.
"""
import sys
from collections import defaultdict
from dataclasses import replace

import torch

from benchmarks.layers import free_memory, train_step_fn
from train import PRESETS, TrainConfig

# (bucket, name fragments); lower-case match, first bucket wins.
BUCKETS = [
    ("optimizer (AdamW, clip)", ("adam", "multi_tensor", "foreach", "norm_kernel", "clip")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("grouped matmul", ("grouped", "group_gemm", "_mm_grouped", "ptr_array")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "matmul", "mm", "addmm", "bmm", "sm90", "sm80")),
    ("sort, top-k, cumsum", ("sort", "radix", "topk", "cumsum", "scan", "bincount", "histogram")),
    ("gather, scatter, index", ("index", "scatter", "gather", "take", "put_", "embedding")),
    ("softmax, cross-entropy", ("softmax", "log_softmax", "nll", "cross_entropy")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copies, casts", ("copy", "cast", "convert", "to_copy", "memcpy", "memset", "fill", "zero")),
    ("reductions", ("reduce", "sum", "mean", "max", "min", "argmax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "gelu", "mul", "add", "div", "pointwise",
                     "triton")),
]


def bucket(name: str) -> str:
    low = name.lower()
    return next((b for b, frags in BUCKETS if any(f in low for f in frags)), "other")


def profile_step(tc: TrainConfig, device, steps: int) -> dict[str, float]:
    """-> {bucket: device ms per step} (CPU: operator ms), plus 'whole step' (wall ms)."""
    from torch.profiler import ProfilerActivity, profile
    free_memory(device)
    step, _, _ = train_step_fn(tc, device)
    cuda = device.type == "cuda"
    for _ in range(3 + (3 if tc.compile or tc.cuda_graph else 0)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
    with profile(activities=activities) as prof:
        if cuda:
            start.record()
        for _ in range(steps):
            step()
        if cuda:
            end.record()
        sync()
    totals = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and (cuda or not event.key.startswith(("ProfilerStep", "aten::to"))):
            totals[bucket(event.key)] += us / 1e3 / steps
    if cuda:
        totals["whole step"] = start.elapsed_time(end) / steps
    return dict(totals)  # the model goes with this frame; the next call frees the memory first


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], None) for a in argv if a.startswith("--"))
    unknown = set(flags) - {"compile", "cuda_graph", "steps", "tokens_per_step"}
    if unknown:
        sys.exit(f"error: unknown flags {sorted(unknown)}; valid: --compile --cuda_graph --steps= --tokens_per_step=")
    preset = args[0] if args else "paper"
    models = args[1].split(",") if len(args) > 1 else ["dense", "topk", "clustered"]
    if preset not in PRESETS:
        sys.exit(f"error: preset must be one of {sorted(PRESETS)}, got {preset!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = TrainConfig(**{**PRESETS[preset], "preset": preset, "device": str(device)})
    micro = base.batch_size * base.block_size
    accum = max(1, int(flags.get("tokens_per_step", 32768)) // micro)
    rows = {}
    for moe in models:
        tc = replace(base, moe=moe, grad_accum=accum, compile="compile" in flags and device.type == "cuda",
                     cuda_graph="cuda_graph" in flags and device.type == "cuda")
        rows[moe] = profile_step(tc, device, int(flags.get("steps", 3)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (operator time)"
    print(f"ms a step by kernel kind: --preset={preset}, {micro * accum} tokens a step "
          f"({base.batch_size} x {base.block_size} x {accum}), {' '.join(f'--{k}' + ('' if v is None else f'={v}') for k, v in flags.items())}; {name}, "
          f"torch {torch.__version__}")
    kinds = [b for b, _ in BUCKETS] + ["other"] + (["whole step"] if device.type == "cuda" else [])
    print("| kind | " + " | ".join(models) + " |")
    print("| --- |" + " --- |" * len(models))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{rows[m].get(kind, 0.0):.2f}" for m in models) + " |")
    print("| sum of kernels | " + " | ".join(f"{sum(v for k, v in rows[m].items() if k != 'whole step'):.2f}"
                                       for m in models) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
