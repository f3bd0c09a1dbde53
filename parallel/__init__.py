"""Expert parallelism: a MoE layer's experts split over ranks, tokens sent to them and back
(ep), the state of such a model and train.py's strategy for it (ep_state), and its benchmark
(bench_ep: `torchrun --nproc_per_node=N -m parallel.bench_ep`). train.py loads it only under
--expert_parallel."""
