"""Training without the host in the loop: the whole train step replayed from one CUDA graph.

Owns: `GraphedTrainStep`, which wraps train.train_step (forward and backward of every
micro-batch, clipping, AdamW, the interval's loss and loads, the balancing biases) and, after
a few eager warm-up steps, records it once as a CUDA graph; every later step copies its
batches into the graph's input tensors and replays it. Why: a MoE step is hundreds of small
kernels (routing, sorting, grouped matmuls, statistics), and eager PyTorch can spend longer
launching them than the GPU spends running them; a replay launches the whole step at once.
What a graph needs, and how the step provides it: the same shapes every step (dropless
grouped matmuls keep group sizes on the device), no host sync inside (routing counts and
aux losses stay tensors), a capturable AdamW whose lr is a device tensor
(train.build_optimizer), autocast without its weight-cast cache, and gradients that stay
allocated between replays (never set to None). A recluster replaces parameters or optimizer
state, so train.py makes a new step (or `reset()` one): the next steps warm up and capture again.
tests/test_train_graph.py (CUDA) holds dense, top-k and clustered models across reclusters to
this: with eager kernels the graphed run trains as the eager one, tensor for tensor; with
compiled kernels, to its losses (recompiled bf16 kernels may route a near-tied token
elsewhere). Which cases have passed on which GPU: results/speed/README.md.
Does not own: the step itself (train.train_step) or when to recluster (train.py).
"""
import os

import torch


def config_rules(cfg) -> list[tuple[bool, str]]:
    """train.TrainConfig.validate's rules for --cuda_graph: (holds, message)."""
    return [
        (cfg.device != "cpu" and torch.cuda.is_available(), "--cuda_graph needs CUDA"),
        ("RANK" not in os.environ, "--cuda_graph runs in one process (not under torchrun)"),
        (cfg.moe_impl != "loop", "--cuda_graph needs device-side grouped matmuls (moe_impl=loop "
         "reads group sizes on the host)"),
    ]


class GraphedTrainStep:
    """step(batches) as step_fn(batches) computes it for `model`: the first `warmup` calls
    after construction or reset() run eagerly on a side stream (as capture asks: lazy inits,
    compilation, cuBLAS workspaces), the next one captures, and that and every later call
    replays. batches: a list of (x, y) of the same shapes every call."""

    def __init__(self, step_fn, model, warmup: int = 2):
        self.step_fn, self.model, self.warmup = step_fn, model, warmup
        self.captures = 0
        self.reset()

    def reset(self):
        """Drop the graph (parameters or optimizer state were replaced): warm up and capture again."""
        self.graph, self.static, self.eager_left = None, None, self.warmup

    def _clear_grads(self):
        for p in self.model.parameters():
            p.grad = None

    def __call__(self, batches):
        # Warm-up, capture and replay all read the same input tensors: a compiled model guards
        # on its inputs' strides, and one that recompiled inside the capture would fail there.
        if self.static is None:
            self.static = [(x.clone(), y.clone()) for x, y in batches]
        for (sx, sy), (x, y) in zip(self.static, batches):
            sx.copy_(x)
            sy.copy_(y)
        if self.graph is None and self.eager_left > 0:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # The step accumulates into .grad: a replaced graph's last gradients must not join in.
            self._clear_grads()
            with torch.cuda.stream(side):
                self.step_fn(self.static)
                self._clear_grads()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_left -= 1
            return
        if self.graph is None:
            self._clear_grads()  # gradients are born inside the graph's memory pool
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step_fn(self.static)
            self.captures += 1
        self.graph.replay()
