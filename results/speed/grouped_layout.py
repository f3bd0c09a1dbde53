"""Does the expert weights' memory layout set the grouped matmuls' speed? One MoE layer's two
grouped matmuls at a preset's shapes (N*k token slots spread evenly over E experts), forward and
backward, with each weight cast to bf16 as the bank casts it (experts.grouped_mm): row-major
per expert as stored, (E, d, h), or cast into column-major per expert (each expert's matrix
transposed in memory, the layout torchtitan's experts hand torch._grouped_mm). Beside them, the
dense MLP's two matmuls of the same FLOPs as the yardstick. Prints one table: ms a layer (median
of `repeats`), and each against the dense pair.
usage (from the repository root): python -m results.speed.grouped_layout [preset] [tokens] [repeats]
  e.g. python -m results.speed.grouped_layout paper 32768 20   (a GPU; on a CPU: tiny shapes)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from train import PRESETS


def layouts(w: torch.Tensor, dtype) -> dict:
    """The bank's cast (row-major per expert), and the same values cast into column-major."""
    return {"row-major (as stored)": lambda: w.to(dtype),
            "column-major": lambda: w.mT.to(dtype, memory_format=torch.contiguous_format).mT}


def grouped_layer(x, w1, w2, offs, cast1, cast2):
    """The bank's middle: gelu(x W1[e]) W2[e] per group, from freshly cast weights."""
    return torch._grouped_mm(F.gelu(torch._grouped_mm(x, cast1(), offs=offs)), cast2(), offs=offs)


def dense_layer(x, w1, w2):
    return F.gelu(x @ w1.to(x.dtype)) @ w2.to(x.dtype)


def median_ms(fn, repeats: int, device) -> float:
    cuda = device.type == "cuda"
    times = []
    for i in range(repeats + 3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:  # warm-up first
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(preset="paper", tokens=32768, repeats=20):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = PRESETS[preset]
    d, h, n_experts, k = size["n_embd"], size["ffn_hidden"], size["n_experts"], size["top_k"]
    if device.type == "cpu":  # a smoke run: the shapes' kinds, not their sizes
        d, h, tokens = 64, 128, 512
    dtype = torch.bfloat16
    rows = tokens * k
    offs = torch.arange(1, n_experts + 1, device=device, dtype=torch.int32) * (rows // n_experts)
    x = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(n_experts, d, h, device=device, requires_grad=True)
    w2 = torch.randn(n_experts, h, d, device=device, requires_grad=True)
    dense_w1 = torch.randn(d, k * h, device=device, requires_grad=True)  # k experts' width a token
    dense_w2 = torch.randn(k * h, d, device=device, requires_grad=True)
    xd = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)

    reference = grouped_layer(x, w1, w2, offs, *(layouts(w, dtype)["row-major (as stored)"] for w in (w1, w2)))
    cases = {"dense MLP, equal FLOPs": lambda: dense_layer(xd, dense_w1, dense_w2)}
    for name in layouts(w1, dtype):
        casts = [layouts(w, dtype)[name] for w in (w1, w2)]
        out = grouped_layer(x, w1, w2, offs, *casts)
        torch.testing.assert_close(out, reference)  # a layout changes the speed, never the result
        cases[f"grouped, {name}"] = lambda casts=casts: grouped_layer(x, w1, w2, offs, *casts)

    results = []
    for name, fn in cases.items():
        forward = median_ms(lambda: fn(), repeats, device)
        both = median_ms(lambda: fn().float().square().mean().backward(), repeats, device)
        results.append((name, forward, both))
    name0, fwd0, both0 = results[0]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny shapes)"
    print(f"grouped matmul layouts: --preset={preset} shapes, {tokens} tokens x top-{k} over {n_experts} "
          f"experts, d={d}, h={h}, bf16; {where}, torch {torch.__version__}; median of {repeats}")
    print("| layer | forward ms | vs dense | forward + backward ms | vs dense |")
    print("| --- | --- | --- | --- | --- |")
    for name, forward, both in results:
        print(f"| {name} | {forward:.2f} | {forward / fwd0:.2f}x | {both:.2f} | {both / both0:.2f}x |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "paper", int(args[1]) if len(args) > 1 else 32768,
         int(args[2]) if len(args) > 2 else 20)
