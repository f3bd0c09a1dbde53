"""sample.py: generation from a tiny checkpoint, with --int4 and --offload_budget, on CPU."""
from dataclasses import asdict

import pytest
import torch

import sample
from regroup import recluster_model
from model import GPT
from quant import quantize_model
from train import TrainConfig, parse_config

TINY = dict(sample_tokens=0, n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_experts=4, n_clusters=2, rank=2,
            block_size=32)


def _checkpoint(tmp_path, moe: str):
    torch.manual_seed(0)
    tc = TrainConfig(moe=moe, **TINY)
    model = GPT(tc.model_config())
    if moe == "clustered":
        for layer in model.moe_layers():
            layer.input_mean.normal_()
        recluster_model(model)
    path = tmp_path / f"{moe}.pt"
    torch.save({"model": model.state_dict(), "config": asdict(tc)}, path)
    return path


def _config(path, *flags):
    return parse_config(sample.SampleConfig, [f"--ckpt={path}", "--device=cpu", "--num_samples=1",
                                              "--max_new_tokens=6", "--prompt=Hello", *flags])


def test_int4_and_offload_print_speed_and_counters(tmp_path, capsys):
    path = _checkpoint(tmp_path, "clustered")
    result = sample.main(_config(path, "--int4", "--offload_budget=2", "--temperature=0"))
    out = capsys.readouterr().out
    assert "tokens/s" in out and "hits" in out and "MiB moved" in out and "prediction" in out
    assert result["tokens_per_sec"] > 0 and result["texts"][0].startswith("Hello")
    offload = result["offload"]
    assert offload["misses"] + offload["prefetches"] > 0 and offload["bytes_moved"] > 0
    assert offload["predictions"] > 0
    assert offload["hidden_fraction"] is None                       # CPU: no copy timing
    # Greedy text is the same without offload, INT4 alone, and without the KV cache.
    plain = sample.main(_config(path, "--int4", "--temperature=0"))
    uncached = sample.main(_config(path, "--int4", "--temperature=0", "--use_cache=false"))
    assert result["texts"] == plain["texts"] == uncached["texts"] and plain["offload"] is None


def test_bfloat16_for_float_and_int4_checkpoints(tmp_path):
    """A float checkpoint is cast to bf16; a stored INT4 one keeps fp16 scales under autocast."""
    path = _checkpoint(tmp_path, "clustered")
    ckpt = torch.load(path, weights_only=True)
    model = GPT(TrainConfig(**ckpt["config"]).model_config())
    model.prepare_state_dict(ckpt["model"])
    model.load_state_dict(ckpt["model"])
    quantize_model(model)
    torch.save({"model": model.state_dict(), "config": ckpt["config"]}, tmp_path / "int4.pt")
    for checkpoint in (path, tmp_path / "int4.pt"):
        result = sample.main(_config(checkpoint, "--int4", "--offload_budget=1", "--dtype=bfloat16"))
        assert result["offload"]["misses"] > 0 and result["texts"][0].startswith("Hello")


def test_clear_errors(tmp_path):
    path = _checkpoint(tmp_path, "topk")
    with pytest.raises(ValueError, match="offload_budget needs a clustered checkpoint"):
        sample.main(_config(path, "--offload_budget=2"))
    with pytest.raises(ValueError, match="int4 needs a clustered checkpoint"):
        sample.main(_config(path, "--int4"))
    with pytest.raises(ValueError, match="offload_budget must be >= 0"):
        sample.main(_config(path, "--offload_budget=-1"))
    with pytest.raises(ValueError, match="valid keys"):
        parse_config(sample.SampleConfig, ["--offload=2"])
