"""The script behind graph_step_default_h200.txt and graph_step_more_h200.txt, as run on one
NVIDIA H200 (torch 2.11.0+cu130) on 2026-12-02 with the code of commit f6435e2, in two calls
(the rows of the first file, then those of the second). Each model alone, random tokens,
BenchConfig's batch 16 x block 256, benchmarks/layers.train_speed: the median of 10 steps
(forward, backward, clipping, fused AdamW, the balancing step) after 3 warm-up steps (+3 for
compiled or graphed steps). In the first call a failed capture (top-k, compiled + graph) left
the CUDA generator in capture state, so every clustered row after it failed with "Offset
increment outside graph capture"; the second call ran the clustered rows in a fresh process.
At that commit bench.py still held `_model_config`; today it is benchmarks/sections.model_config.
"""
import dataclasses
import time

import torch

from bench import BenchConfig, _model_config
from bench_layers import train_speed

dev = torch.device("cuda")
first = [(moe, mode) for moe in ("dense", "topk", "clustered")
         for mode in ({}, {"cuda_graph": True}, {"compile": True}, {"compile": True, "cuda_graph": True})]
second = [("", "clustered", {}), ("", "clustered", {"cuda_graph": True}), ("", "clustered", {"compile": True}),
          ("paper", "topk", {}), ("paper", "topk", {"cuda_graph": True}), ("paper", "clustered", {}),
          ("paper", "clustered", {"cuda_graph": True}), ("paper", "dense", {}), ("paper", "dense", {"cuda_graph": True})]
for preset, moe, mode in [("", m, o) for m, o in first] + second:
    tc = dataclasses.replace(_model_config(BenchConfig(preset=preset), moe), **mode)
    t0 = time.time()
    try:
        r = train_speed(tc, dev, 10, 3)
        print(preset or "default", moe, mode, f"{r['train_tokens_per_sec']:.0f} tok/s",
              f"peak {r['train_peak_mib']:.0f} MiB", f"first_recluster {r.get('first_recluster_s', 0):.2f}s",
              f"{time.time() - t0:.0f}s", flush=True)
    except Exception as e:
        print(preset or "default", moe, mode, "FAILED", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
