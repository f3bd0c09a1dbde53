"""model.py: shapes, parameter accounting against hand formulas, config errors."""
import pytest
import torch

from model import GPT, GPTConfig

SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, ffn_hidden=24, n_experts=4,
             top_k=2, n_clusters=2, rank=2, vocab_size=64)


@pytest.mark.parametrize("moe", ["dense", "topk", "clustered"])
def test_forward_shapes_and_loss(moe):
    torch.manual_seed(0)
    model = GPT(GPTConfig(moe=moe, **SMALL))
    idx = torch.randint(0, 64, (3, 8))
    logits, loss, aux = model(idx, idx)
    assert logits.shape == (3, 8, 64) and loss.shape == () and aux.shape == ()
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5   # near-uniform at init
    last, none, _ = model(idx)
    assert last.shape == (3, 1, 64) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_parameter_accounting():
    d, h, E, L, k, V, T = 16, 24, 4, 2, 2, 64, 8
    shared = V * d + T * d + L * (4 * d * d + 4 * d) + 2 * d               # emb, attn, norms
    dense = GPT(GPTConfig(moe="dense", **SMALL)).param_counts()
    assert dense["total_params"] == shared + L * 2 * d * (k * h) and dense["expert_params"] == 0
    topk = GPT(GPTConfig(moe="topk", **SMALL)).param_counts()
    assert topk["expert_params"] == L * E * 2 * d * h
    assert topk["total_params"] == shared + L * (E * d + E * 2 * d * h)
    assert topk["active_params"] == dense["total_params"] + L * E * d   # + router rows


def test_config_errors_name_the_rule():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT(GPTConfig(n_embd=10, n_head=3))
    with pytest.raises(ValueError, match="top_k"):
        GPT(GPTConfig(moe="topk", top_k=5, n_experts=4))
    with pytest.raises(ValueError, match="divisible by n_clusters"):
        GPT(GPTConfig(moe="clustered", n_experts=10, n_clusters=4))
    with pytest.raises(ValueError, match="experts per cluster"):
        GPT(GPTConfig(moe="clustered", n_experts=8, n_clusters=4, top_k=3))
    with pytest.raises(ValueError, match="rank"):
        GPT(GPTConfig(moe="clustered", rank=10_000))
    with pytest.raises(ValueError, match="moe must be"):
        GPT(GPTConfig(moe="sparse"))
    with pytest.raises(ValueError, match="block_size"):
        GPT(GPTConfig(**SMALL))(torch.zeros(1, 9, dtype=torch.long))


def test_clustered_state_dict_round_trip():
    from regroup import recluster_model
    torch.manual_seed(0)
    model = GPT(GPTConfig(moe="clustered", **SMALL))
    recluster_model(model)
    fresh = GPT(GPTConfig(moe="clustered", **SMALL))
    state = model.state_dict()
    fresh.prepare_state_dict(state)
    fresh.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(fresh(idx, idx)[1], model(idx, idx)[1])
    counts = fresh.param_counts()
    assert counts["expert_params"] == 2 * (2 * 2 * 16 * 24 + 4 * 2 * 2 * (16 + 24))
