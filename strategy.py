"""The seam between the training loop and parallelism: what one process does at each hook.

Owns: `OneProcess`: train.py's loop calls its hooks (wrap the model, sync gradients, clip,
sum loads over ranks, recluster and carry the optimizer, checkpoint state, wait for the other
ranks, agree on a stop), and on one device each does what one process does. Under torchrun
parallel/ddp.py's DataParallel and parallel/ep_state.py's ExpertParallel override them. The
idea is torchtitan's: parallelize a plain model from outside.
Does not own: the loop and which strategy it takes (train.py), the process group and DDP
(parallel/ddp.py), expert parallelism (parallel/ep.py, parallel/ep_state.py), regrouping
(regroup.py).
"""
from contextlib import nullcontext

import torch

from cluster import ClusterSettings
from regroup import Recluster, carry_optimizer_state, recluster_model


class OneProcess:
    """How the loop runs on one device: each hook is what one process does at that point of the
    loop. parallel/ddp.py's DataParallel and parallel/ep_state.py's ExpertParallel override them."""
    rank, world, master, everyone_evaluates = 0, 1, True, False

    def __init__(self, device: str, dtype: str):
        self.device, self.dtype = device, dtype

    def prepare(self, model):                 # after the model is built or loaded
        pass

    def wrap(self, model):                    # the module the loop calls (DDP wraps it)
        return model

    def no_sync(self, runner, last_micro: bool):
        return nullcontext()

    def sync_grads(self, model):              # after the last backward of a step
        pass

    def clip(self, model, max_norm: float):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def sum_over_ranks(self, tensors: list):  # in place
        pass

    def any_rank(self, flag: bool) -> bool:   # whether any rank's flag is set
        return flag

    def recluster(self, model, optimizer, settings: ClusterSettings, seed: int) -> Recluster:
        """regroup.recluster_model, then the optimizer state follows the experts (when
        parameters were created, `created` says the optimizer must be rebuilt)."""
        result = recluster_model(model, settings, seed)
        carry_optimizer_state(optimizer, result)
        return result

    def checkpoint_state(self, model, optimizer) -> tuple[dict, dict]:
        return model.state_dict(), optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict):
        optimizer.load_state_dict(state)

    def all_rngs(self, rng: dict) -> list:
        return [rng]

    def barrier(self):                        # every rank waits here for the others
        pass

    def close(self):
        pass
