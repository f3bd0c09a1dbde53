"""Expert parallelism: a MoE layer's experts split over ranks, tokens sent to them and back
(ep), the state of such a model and the training loop's strategy for it (ep_state), and DDP
(ddp). train.py loads it only under torchrun. Its benchmark is benchmarks/expert_parallel.py
(`torchrun --nproc_per_node=N -m benchmarks.expert_parallel`)."""
