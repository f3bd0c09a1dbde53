"""The train step of train.py's quick model on a CPU, timed: `python results/first_run/threads.py
N` prints the median of 12 steps (after 2) with N torch threads. threads.txt holds what it
measured, idle and beside a busy process, with OMP_WAIT_POLICY unset and PASSIVE."""
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from model import GPT  # noqa: E402
from train import TrainConfig, build_optimizer  # noqa: E402

threads = int(sys.argv[1])
torch.set_num_threads(threads)
cfg = TrainConfig(n_layer=4, n_head=4, n_embd=128, ffn_hidden=256, n_experts=8, n_clusters=2, rank=8,
                  block_size=128, batch_size=8, moe="topk", device="cpu")
model = GPT(cfg.model_config())
optimizer = build_optimizer(model, cfg)
x = torch.randint(0, 50257, (8, 129))
times = []
for _ in range(14):
    start = time.perf_counter()
    _, loss, aux = model(x[:, :-1], x[:, 1:])
    (loss + aux).backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
print(threads, "threads", f"median step {sorted(times[2:])[6]:.3f}s")
