"""Paths that exist only for speed, each beside the plain PyTorch path it must match: the
Triton combine of the clustered layer (triton_combine), the decode step replayed from a CUDA
graph (decode_graph), the whole train step replayed from one (train_graph). The core loads
them only when a flag asks for them (moe_impl=triton, sample.py on CUDA, --cuda_graph)."""
