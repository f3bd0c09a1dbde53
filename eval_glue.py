"""Fine-tune a pretrained checkpoint on GLUE and report each task's own metric.

Owns: GlueConfig and its `--field=value` CLI, the classifier (the pretrained GPT plus a
linear head on the last real token), padding and batching of encoded examples, the
fine-tuning loop (AdamW, linear warmup then linear decay, clipping, bf16 autocast on CUDA,
the MoE aux loss kept on), evaluation on the task's eval splits, and the results: one JSON
line per task and split in `out`, and a markdown table at the end.
Does not own: task formats, pair encoding, metrics, downloads (glue.py); the network
(model.py); reading checkpoints (train.py). It never reclusters: a clustered checkpoint is
fine-tuned with the clusters it was saved with (cluster.py is not imported).
Usage: python eval_glue.py --ckpt=out/ckpt.pt --task=sst2 (or --task=all --download)
"""
import copy
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import glue
from train import load_model, parse_config, resolve_device


@dataclass
class GlueConfig:
    ckpt: str = "out/ckpt.pt"
    task: str = "sst2"              # a GLUE task (see glue.TASKS) or 'all'
    data_dir: str = "data/glue"     # GLUE root holding SST-2/, CoLA/, ... or one task's folder
    download: bool = False          # fetch missing task data with glue.fetch (sha256-checked)
    out: str = "glue_results.jsonl"
    seed: int = 1337
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = "auto"             # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    epochs: int = 3
    lr: float = 1e-4                # above BERT's 2e-5..5e-5: our checkpoints are small
    batch_size: int = 32
    eval_batch_size: int = 64
    max_len: int = 128              # tokens per example, capped at the checkpoint's block_size
    weight_decay: float = 0.01
    warmup: float = 0.1             # fraction of the steps spent in linear warmup
    grad_clip: float = 1.0          # 0 = off
    max_train_examples: int = 0     # 0 = all; else a seeded random subset (quick runs)

    def validate(self):
        if self.task != "all":
            glue.get_task(self.task)  # its error lists the valid tasks
        rules = [
            (self.epochs >= 1 and self.lr > 0, "need epochs >= 1 and lr > 0"),
            (min(self.batch_size, self.eval_batch_size) >= 1, "batch sizes must be >= 1"),
            (self.max_len >= 2, "max_len must be >= 2 (a pair needs its separator)"),
            (min(self.weight_decay, self.grad_clip) >= 0, "weight_decay, grad_clip must be >= 0"),
            (0 <= self.warmup < 1, "warmup is a fraction of the steps, in [0, 1)"),
            (self.max_train_examples >= 0, "max_train_examples must be >= 0 (0 = all)"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"bad glue config: {message}")
        return self


class GlueClassifier(nn.Module):
    """The pretrained GPT + a linear head on the hidden state of each sequence's last real token.

    Pooling: attention is causal, so only the last token has seen the whole input (for a pair,
    both sentences); any earlier position is blind to what follows it. GPT-1 and GPT-2
    classify from the last token for this reason. Mean pooling over real tokens would also
    work, but it averages in states that saw only a prefix. Right padding is free: pad
    positions come after every real token, so they change no real token's state.
    """

    def __init__(self, gpt, n_labels: int):
        super().__init__()
        self.gpt, self.head = gpt, nn.Linear(gpt.cfg.n_embd, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)  # small, like the GPT's own init
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, lengths):
        """idx (B, T) right-padded, lengths (B,) -> (logits (B, n_labels) float32, aux loss)."""
        hidden, aux = self.gpt.hidden_states(idx)                                   # (B, T, C)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]   # (B, C)
        return self.head(last).float(), aux


def encode(examples, max_len: int) -> list[list[int]]:
    # An empty sentence encodes to no ids, but pooling needs one position: give it <|endoftext|>.
    enc = data.get_encoding()
    return [glue.encode_pair(enc, ex.text_a, ex.text_b, max_len) or [data.EOT] for ex in examples]


def collate(seqs: list[list[int]], pad_id: int = data.EOT):
    """Right-pad to the longest sequence -> (idx (B, T) long, lengths (B,) long).

    The pad id is never read: causal attention keeps pads out of real tokens' view and the
    head reads position length-1. With capacity_factor > 0, though, pads would compete with
    real tokens for expert slots; our checkpoints default to dropless routing (0).
    """
    lengths = torch.tensor([len(seq) for seq in seqs])
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        idx[row, :len(seq)] = torch.tensor(seq)
    return idx, lengths


def build_batches(seqs, labels, batch_size: int, generator=None):
    """-> [(idx, lengths, labels)] in order, or shuffled by `generator` (a new order per call);
    labels are class ids (long) or STS-B scores (float32), as torch.tensor infers."""
    order = list(range(len(seqs))) if generator is None else \
        torch.randperm(len(seqs), generator=generator).tolist()
    chunks = (order[start:start + batch_size] for start in range(0, len(order), batch_size))
    return [(*collate([seqs[i] for i in chunk]), torch.tensor([labels[i] for i in chunk]))
            for chunk in chunks]


def task_loss(logits, labels, regression: bool):
    return F.mse_loss(logits.squeeze(-1), labels) if regression else F.cross_entropy(logits, labels)


def lr_factor(step: int, n_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at n_steps (BERT/GPT-1 fine-tuning)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (n_steps - step) / max(1, n_steps - warmup_steps)


def make_optimizer(model, cfg: GlueConfig, device: str):
    # Decay matrices only; biases and LayerNorm gains stay free, as in train.py.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.startswith("cuda"))


def has_data(task: str, data_dir) -> bool:
    folder = glue.task_dir(task, data_dir)
    return all((folder / f"{split}.tsv").is_file() for split in glue.get_task(task).splits)


def load_pretrained(path: Path):
    """-> (GPT on CPU, checkpoint dict); a clear error for any checkpoint we cannot use."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train one with train.py "
                                f"or pass --ckpt=PATH")
    try:
        return load_model(path, "cpu")
    except (KeyError, TypeError) as error:  # no 'model'/'config', or fields train.py lacks
        raise RuntimeError(f"cannot use checkpoint {path}: {error!r}; is it from this "
                           f"project's train.py?") from None
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise  # train.load_model's own 'cannot read checkpoint' is clear already
        detail = (str(error).splitlines()[1:2] or [""])[0].strip()
        raise RuntimeError(f"checkpoint of another shape: the weights in {path} do not fit "
                           f"its own config ({detail})") from None


def prepare(cfg: GlueConfig) -> dict:
    """Every check that can fail, before any fine-tuning: device, checkpoint, data.
    The checkpoint is read first, so a bad one fails before a long download, not after."""
    cfg.validate()
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    gpt, ckpt = load_pretrained(Path(cfg.ckpt))
    tasks, skipped = [], []
    for task in glue.TASKS if cfg.task == "all" else [glue.get_task(cfg.task).name]:
        if not has_data(task, cfg.data_dir) and cfg.download:
            glue.fetch(task, cfg.data_dir)
        (tasks if has_data(task, cfg.data_dir) else skipped).append(task)
    if not tasks:  # the one task asked for is missing, or with 'all', every task is
        where = cfg.data_dir if cfg.task == "all" else glue.task_dir(cfg.task, cfg.data_dir)
        raise FileNotFoundError(
            f"no GLUE data for task={cfg.task} in {where} (need train.tsv and the dev split "
            f"files); run with --download to fetch it, or pass --data_dir pointing at a GLUE "
            f"folder (one holding SST-2/, RTE/, ...) or at the task's own folder")
    autocast = torch.autocast("cuda", torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    return {"gpt": gpt, "ckpt": ckpt, "device": device, "autocast": autocast, "tasks": tasks,
            "skipped": skipped}


@torch.no_grad()
def predict(model, batches, regression: bool, device, autocast, desc: str) -> np.ndarray:
    """Regression output for STS-B, argmax class id otherwise."""
    model.eval()
    preds = []
    for idx, lengths, _ in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
        with autocast:
            logits, _ = model(idx.to(device), lengths.to(device))
        preds.append(logits[:, 0] if regression else logits.argmax(-1))
    model.train()
    return torch.cat(preds).cpu().numpy()


def finetune(model, seqs, labels, cfg: GlueConfig, regression: bool, device, autocast,
             generator, desc: str) -> None:
    """Train in place: `epochs` of freshly shuffled batches, linear warmup then decay."""
    optimizer = make_optimizer(model, cfg, device)
    n_steps = cfg.epochs * math.ceil(len(seqs) / cfg.batch_size)
    warmup_steps = int(cfg.warmup * n_steps)
    model.train()
    bar, step = tqdm(total=n_steps, desc=desc, dynamic_ncols=True), 0
    for epoch in range(cfg.epochs):
        for idx, lengths, targets in build_batches(seqs, labels, cfg.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, n_steps, warmup_steps)
            with autocast:
                logits, aux = model(idx.to(device), lengths.to(device))
            # The aux loss stays on, as in pretraining: the task loss alone lets the routers
            # drift onto a few experts. Pads are routed and counted too, a small bias we accept.
            loss = task_loss(logits, targets.to(device), regression) + aux.float()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if step % 20 == 0 or step == n_steps:  # .item() syncs the GPU: only now and then
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"{desc}: non-finite loss {value} at step {step}")
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
    bar.close()


def run_task(task: str, cfg: GlueConfig, plan: dict) -> list[dict]:
    """Fine-tune a fresh copy of the pretrained GPT on `task`; one record per eval split."""
    spec, gpt, device, autocast = glue.get_task(task), plan["gpt"], plan["device"], plan["autocast"]
    regression, max_len = spec.n_labels == 1, min(cfg.max_len, gpt.cfg.block_size)
    # Seed per task, so a task's result does not depend on which tasks ran before it.
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_examples = glue.load_examples(task, "train", cfg.data_dir)
    if 0 < cfg.max_train_examples < len(train_examples):
        keep = torch.randperm(len(train_examples), generator=generator)[:cfg.max_train_examples]
        train_examples = [train_examples[i] for i in sorted(keep.tolist())]
    model = GlueClassifier(copy.deepcopy(gpt), spec.n_labels).to(device)
    finetune(model, encode(train_examples, max_len), [ex.label for ex in train_examples],
             cfg, regression, device, autocast, generator, f"{task} fine-tune")
    records = []
    clustered = any(layer.clustered for layer in gpt.moe_layers())
    for split in spec.eval_splits:
        examples = glue.load_examples(task, split, cfg.data_dir)
        labels = [ex.label for ex in examples]
        batches = build_batches(encode(examples, max_len), labels, cfg.eval_batch_size)
        preds = predict(model, batches, regression, device, autocast, f"{task} {split}")
        records.append({
            "task": task, "split": split, "metrics": glue.compute_metrics(task, preds, labels),
            "n_train": len(train_examples), "n_eval": len(examples), "ckpt": str(cfg.ckpt),
            "moe": plan["ckpt"]["config"].get("moe"), "clustered": clustered, "seed": cfg.seed,
            "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "max_len": max_len})
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| task | split | metrics | n_train | n_eval |", "| --- | --- | --- | --- | --- |"]
    for rec in records:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in rec["metrics"].items())
        lines.append(f"| {rec['task']} | {rec['split']} | {metrics} | {rec['n_train']} "
                     f"| {rec['n_eval']} |")
    return "\n".join(lines)


def finetune_and_evaluate(cfg: GlueConfig, plan: dict | None = None) -> list[dict]:
    """Fine-tune a fresh copy of the checkpoint per task; append each result to cfg.out."""
    plan = prepare(cfg) if plan is None else plan
    if plan["skipped"]:
        print(f"skipping (no data in {cfg.data_dir}; use --download or --data_dir): "
              f"{', '.join(plan['skipped'])}")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for task in plan["tasks"]:
        records = run_task(task, cfg, plan)
        with open(cfg.out, "a") as f:  # per task, so a late failure keeps the finished tasks
            f.writelines(json.dumps(record) + "\n" for record in records)
        results += records
    print(format_table(results))
    if plan["skipped"]:
        print(f"skipped for missing data: {', '.join(plan['skipped'])}")
    return results


def main(argv: list[str]) -> list[dict]:
    try:
        cfg = parse_config(GlueConfig, argv)
        plan = prepare(cfg)
    except (ValueError, OSError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    return finetune_and_evaluate(cfg, plan)


if __name__ == "__main__":
    main(sys.argv[1:])
