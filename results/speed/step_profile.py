"""Where a whole train step's device time goes, by kind of kernel: dense, top-k and clustered
at a preset's size, each alone, one step of `tokens_per_step` tokens (forward and backward of
every micro-batch, clipping, fused AdamW, the balancing step), profiled over a few steps.
Every kernel's self time falls in the first bucket whose pattern its name holds (BUCKETS,
in order); prints per model the milliseconds a step spends in each bucket and the whole.
Why kernel names and not module ranges: backward kernels carry no forward range, and most of
a MoE step's extra time is in backward (the grouped matmuls' gradients, the scatter's).
usage (from the repository root): python -m results.speed.step_profile [preset] [moe,...] [flags]
  flags: --compile, --cuda_graph (a graph replays as one launch: buckets still count kernels),
         --steps=N (profiled steps, default 3), --tokens_per_step=N (default 32768),
         --batch_size=N (the micro-batch; default the preset's)
On a CPU it runs (the small preset: minutes) and buckets CPU operator time instead.
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
    ("grouped matmul", ("grouped", "group_gemm", "_mm_grouped", "ptr_array", "ptrarray", "groupproblemshape")),
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


def event_times(events, cuda: bool, steps: int) -> dict[str, float]:
    """Profiler events -> {name: ms per step}: kernel time on CUDA, operator time on CPU."""
    from torch.autograd import DeviceType
    times = defaultdict(float)
    for event in events:
        # On CUDA only the kernels themselves: an operator's self device time is its kernels'
        # time again, and a range on the GPU's timeline (record_function, as AdamW's step
        # makes) spans its kernels, so counting either would count those kernels twice.
        if cuda and event.device_type != DeviceType.CPU and not getattr(event, "is_user_annotation", False):
            times[event.key] += event.self_device_time_total / 1e3 / steps
        elif not cuda and not event.key.startswith(("ProfilerStep", "aten::to")):
            times[event.key] += event.self_cpu_time_total / 1e3 / steps
    return {name: ms for name, ms in times.items() if ms > 0}


def bucket_times(events, cuda: bool, steps: int) -> dict[str, float]:
    """Profiler events -> {bucket: ms per step}."""
    totals = defaultdict(float)
    for name, ms in event_times(events, cuda, steps).items():
        totals[bucket(name)] += ms
    return dict(totals)


def operator_times(events, cuda: bool, steps: int) -> dict[str, float]:
    """Events grouped by input shape -> {"operator [shapes]": ms per step}: each operator's
    own kernels' time on CUDA (which op, at which shapes, a copy kernel came from), its
    operator time on CPU."""
    from torch.autograd import DeviceType
    times = defaultdict(float)
    for event in events:
        if event.device_type == DeviceType.CPU and not getattr(event, "is_user_annotation", False):
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            times[f"{event.key} {event.input_shapes}"] += us / 1e3 / steps
    return {name: ms for name, ms in times.items() if ms > 0}


def profile_step(tc: TrainConfig, device, steps: int) -> tuple[dict[str, float], dict[str, float],
                                                                 dict[str, float]]:
    """-> ({bucket: device ms per step} (CPU: operator ms), plus 'whole step' (wall ms);
    {kernel or operator name: ms per step}; {operator and its input shapes: ms per step})."""
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
    with profile(activities=activities, record_shapes=True) as prof:
        if cuda:
            start.record()
        for _ in range(steps):
            step()
        if cuda:
            end.record()
        sync()
    events = prof.key_averages()
    totals, names = bucket_times(events, cuda, steps), event_times(events, cuda, steps)
    ops = operator_times(prof.key_averages(group_by_input_shape=True), cuda, steps)
    if cuda:
        totals["whole step"] = start.elapsed_time(end) / steps
    return totals, names, ops  # the model goes with this frame; the next call frees the memory first


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], None) for a in argv if a.startswith("--"))
    unknown = set(flags) - {"compile", "cuda_graph", "steps", "tokens_per_step", "batch_size"}
    if unknown:
        sys.exit(f"error: unknown flags {sorted(unknown)}; valid: --compile --cuda_graph --steps= --tokens_per_step= "
                 "--batch_size=")
    preset = args[0] if args else "paper"
    models = args[1].split(",") if len(args) > 1 else ["dense", "topk", "clustered"]
    if preset not in PRESETS:
        sys.exit(f"error: preset must be one of {sorted(PRESETS)}, got {preset!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = TrainConfig(**{**PRESETS[preset], "preset": preset, "device": str(device)})
    base.batch_size = int(flags.get("batch_size") or base.batch_size)
    micro = base.batch_size * base.block_size
    accum = max(1, int(flags.get("tokens_per_step", 32768)) // micro)
    rows, names, ops = {}, {}, {}
    for moe in models:
        tc = replace(base, moe=moe, grad_accum=accum, compile="compile" in flags and device.type == "cuda",
                     cuda_graph="cuda_graph" in flags and device.type == "cuda")
        rows[moe], names[moe], ops[moe] = profile_step(tc, device, int(flags.get("steps", 3)))
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
    for m in models:  # what each bucket holds, for checking the name patterns
        print(f"\nlargest kernels, {m}: " + "; ".join(f"{ms:.2f} ms [{bucket(n)}] {n[:100]}" for n, ms in
                                                      sorted(names[m].items(), key=lambda kv: -kv[1])[:10]))
        # "Command Buffer Full" holds the kernels launched while the launch queue was full, so
        # an operator's figure is a lower bound.
        print(f"\nlargest operators, {m} (their own kernels' time, by input shapes): " + "; ".join(
            f"{ms:.2f} ms {n[:160]}" for n, ms in sorted(ops[m].items(), key=lambda kv: -kv[1])[:15]))


if __name__ == "__main__":
    main(sys.argv[1:])
