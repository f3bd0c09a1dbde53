"""Bit-identity proof for a refactor: train dense, top-k and clustered (reclusters included)
on a CPU with fixed seeds and write every logged train and validation loss and a hash of the
final weights. Run it against a checkout before and after; the outputs must be equal byte for
byte. Usage: python results/house/losses.py <repository> <out.json>. It knows both names of
the clustering burn-in and the LR warmup (burn_in / warmup_iters now; warmup_iters / lr_warmup
before the renames)."""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(repo))
import torch  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
renamed = hasattr(train.TrainConfig, "burn_in")
TINY = dict(n_layer=2, n_head=2, n_embd=32, ffn_hidden=32, n_experts=8, n_clusters=2, rank=2,
            block_size=32, batch_size=4, eval_iters=2, device="cpu", lr=3e-3, max_iters=30,
            eval_interval=5, log_interval=5, min_lr=1e-4, top_k=2, dropout=0.0,
            dataset="shakespeare", seed=1337, weight_decay=0.1, grad_clip=1.0, grad_accum=1,
            aux_loss_coef=0.01, z_loss_coef=0.001, kmeans_restarts=8, shock_iters=10,
            vocab_size=50304, **({"warmup_iters": 2} if renamed else {"lr_warmup": 2}))
BURN = {"burn_in": 10} if renamed else {"warmup_iters": 10}
RUNS = {"dense": dict(moe="dense"), "topk": dict(moe="topk"),
        "topk_bias": dict(moe="topk", balance="bias", bias_rate=0.01),
        "clustered": dict(moe="clustered", recluster_interval=5, **BURN),
        "clustered_bias": dict(moe="clustered", balance="bias", recluster_interval=5, **BURN),
        # router scores alone: regroups that move experts, so the moving path is covered too
        "clustered_alpha0": dict(moe="clustered", alpha=0.0, recluster_interval=5, **BURN)}

out = {}
with tempfile.TemporaryDirectory() as tmp:
    for name, extra in RUNS.items():
        train.train(train.TrainConfig(**TINY, **extra, out_dir=f"{tmp}/{name}", data_dir=f"{tmp}/data"))
        log = [json.loads(line) for line in Path(f"{tmp}/{name}/log.jsonl").read_text().splitlines()]
        weights = torch.load(f"{tmp}/{name}/ckpt.pt", weights_only=True)["model"]
        digest = hashlib.sha256()
        for key in sorted(weights):
            digest.update(key.encode())
            digest.update(weights[key].float().numpy().tobytes())
        moved = [r.get("experts_moved", 0) for r in log]
        out[name] = {"train_loss": [r["train_loss"] for r in log], "experts_moved": moved,
                     "val_loss": [r["val_loss"] for r in log], "weights_sha256": digest.hexdigest()}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
