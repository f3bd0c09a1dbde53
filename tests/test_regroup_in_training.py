"""regroup.py inside train.py's loop: a tiny clustered run whose experts move when the router
scores say so, a regroup taken back leaving every tensor and moment as it was, and the loss
rule, which takes back a regroup that raised the validation loss beyond noise."""
import json

import pytest
import torch

from cluster import ClusterSettings
from model import GPTConfig
from regroup import carry_optimizer_state


def _tiny_run(tmp_path, **extra) -> list[dict]:
    """A tiny clustered training (E=8, G=2, 30 steps, a recluster every 5) -> its recluster events."""
    import train
    cfg = train.TrainConfig(n_layer=2, n_head=2, n_embd=32, ffn_hidden=32, n_experts=8, n_clusters=2,
                            rank=2, block_size=32, batch_size=4, eval_iters=2, device="cpu", lr=3e-3,
                            max_iters=30, eval_interval=5, warmup_iters=2, burn_in=10, recluster_interval=5,
                            sample_tokens=0, out_dir=str(tmp_path / "o"), data_dir=str(tmp_path / "d"),
                            **extra)
    train.train(cfg)
    return [json.loads(line) for line in (tmp_path / "o" / "reclusters.jsonl").read_text().splitlines()]


def test_router_scores_alone_move_a_trained_layers_experts(tmp_path):
    """alpha 0 (the router-score view only): training moves experts at a recluster."""
    events = _tiny_run(tmp_path, alpha=0.0)
    assert len(events) == 4 and sum(e["moved"] for e in events[1:]) > 0
    for e in events[1:]:          # a layer that regrouped was not the best grouping any more
        for gain, skipped, rank in zip(e["gain"], e["skipped"], e["rank"]):
            assert gain >= 0 and (skipped or rank > 1)


def test_a_regroup_taken_back_leaves_every_tensor_and_moment_as_it_was():
    from model import GPT
    from regroup import recluster_model, restore, snapshot
    torch.manual_seed(0)
    model = GPT(GPTConfig(moe="clustered", n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_experts=8,
                          n_clusters=2, rank=2, block_size=8, vocab_size=64, balance="bias"))
    recluster_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, 64, (4, 8))
        _, loss, aux = model(x, x)
        (loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer in model.moe_layers():
            layer.balance_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    saved = snapshot(model, optimizer)
    for layer in model.moe_layers():   # scramble the router rows: a regroup must move experts
        layer.router.weight.data = layer.router.weight.data[torch.randperm(8)]
    result = recluster_model(model, ClusterSettings(alpha=0.0, min_gain=-1.0), seed=1)
    carry_optimizer_state(optimizer, result)
    assert result.moved > 0
    restore(model, optimizer, saved)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert moments.keys() == optimizer.state.keys()
    assert all(torch.equal(moments[p][k], optimizer.state[p][k]) for p in moments for k in moments[p])


@pytest.mark.parametrize("worse", [0.0, 1.0])
def test_the_loss_rule_takes_back_a_regroup_that_raised_the_validation_loss(tmp_path, capsys, monkeypatch,
                                                                          worse):
    """As measured, and with every regroup made to look `worse` nats worse: those are taken back."""
    import train
    calls, measured = [], train.val_losses

    def shock(*args):  # the second of each before/after pair is the after
        calls.append(1)
        return measured(*args) + (worse if len(calls) % 2 == 0 else 0.0)
    monkeypatch.setattr(train, "val_losses", shock)
    events = _tiny_run(tmp_path, alpha=0.0, regroup_rule="loss", shock_iters=4)
    judged = [e for e in events if e["rule"]]
    assert judged, "no regroup moved an expert, so the rule never had to decide"
    printed = capsys.readouterr().out
    for e in judged:
        rule = e["rule"]
        rise = e["val_loss_after"] - e["val_loss_before"]
        assert rule["rise"] == pytest.approx(rise, abs=1e-5) and rule["proposed_moved"] > 0
        assert rule["kept"] == (rule["rise"] <= rule["noise"])
        assert e["moved"] == (rule["proposed_moved"] if rule["kept"] else 0)
        assert ("beyond noise: taken back" if not rule["kept"] else "within noise: kept") in printed
        assert rule["kept"] == (worse == 0.0)


def test_the_loss_rule_needs_the_shock_measurement(tmp_path):
    import train
    with pytest.raises(ValueError, match="regroup_rule=loss needs shock_iters > 0"):
        train.TrainConfig(regroup_rule="loss", shock_iters=0, out_dir=str(tmp_path / "o")).validate()
