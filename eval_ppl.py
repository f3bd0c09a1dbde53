"""Perplexity of a train.py checkpoint on any plain-text file.
`python eval_ppl.py --ckpt=out/ckpt.pt --text=FILE [--device=auto --batch_size=8 --dtype=auto]`

Owns: PplConfig and the text -> GPT-2 tokens -> windows -> summed cross-entropy loop.
The tokens are cut into non-overlapping windows of the model's block size: a window predicts
its tokens 1..T from 0..T-1, the next window starts at the last token of this one, so every
token after the first is predicted exactly once (the last, shorter window included). A token
early in a window sees little context, so this is cheaper and a little more pessimistic than
a sliding window; it is the same rule for every file and checkpoint.
Does not own: models and checkpoints (train.py), tokenization (data.py).
"""
# cli first: it sets the CPU thread policy, which OpenMP reads once, as torch loads.
from cli import UsageError, check_rules, parse_config, resolve_device, run
from checkpoint import load_model
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data


@dataclass
class PplConfig:
    ckpt: str = "out/ckpt.pt"      # a train.py checkpoint
    text: str = ""                 # the plain-text file to score (required)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    batch_size: int = 8            # windows per forward pass
    dtype: str = "auto"            # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16

    def validate(self):
        check_rules([(self.batch_size >= 1, "batch_size must be >= 1"),
                     (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto|float32|bfloat16"),
                     (bool(self.text), "--text=FILE is required")], "eval_ppl")
        for name in ("text", "ckpt"):
            if not Path(getattr(self, name)).is_file():
                raise FileNotFoundError(f"--{name}: no file at {getattr(self, name)}")
        return self


def read_text(path) -> str:
    """A file's text; a binary file (NUL bytes, or not UTF-8) is refused: it has no perplexity."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"--text={path} is not UTF-8 text (byte {error.start} is "
                         f"{raw[error.start]:#04x}); give a plain-text file") from None
    if "\0" in text:
        raise UsageError(f"--text={path} holds NUL bytes (first at byte {raw.index(0)}): a binary "
                         f"file, not text; give a plain-text file")
    return text


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) per window: inputs tokens[start:start+length], targets one later."""
    return [(s, min(block_size, n_tokens - 1 - s)) for s in range(0, n_tokens - 1, block_size)]


@torch.no_grad()
def main(cfg: PplConfig) -> dict:
    cfg.validate()
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    text = read_text(cfg.text)
    tokens = torch.from_numpy(np.asarray(data.get_encoding().encode_ordinary(text), np.int64))
    if len(tokens) < 2:
        raise ValueError(f"{cfg.text} has {len(tokens)} tokens; perplexity needs at least 2")
    model, _ = load_model(cfg.ckpt, device)
    model.eval()
    spans = windows(len(tokens), model.cfg.block_size)
    full = [s for s in spans if s[1] == model.cfg.block_size]
    # Full windows stack into batches; the one shorter last window runs on its own.
    batches = [full[i:i + cfg.batch_size] for i in range(0, len(full), cfg.batch_size)]
    batches += [[s] for s in spans if s[1] < model.cfg.block_size]
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16) \
        if dtype == "bfloat16" else nullcontext()
    total_nll, n_predicted = 0.0, 0
    with tqdm(total=len(tokens) - 1, unit="tok", desc="eval_ppl") as bar:
        for batch in batches:
            rows = torch.stack([tokens[s:s + length + 1] for s, length in batch]).to(device)
            x, y = rows[:, :-1], rows[:, 1:]                              # (B, T)
            with autocast:
                logits, _, _ = model(x, y)                                # (B, T, V)
            total_nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                         reduction="sum").item()
            n_predicted += y.numel()
            bar.update(y.numel())
    loss = total_nll / n_predicted
    result = {"tokens": n_predicted, "loss": loss, "ppl": math.exp(loss)}
    print(f"{cfg.text}: {n_predicted:,} tokens, loss {loss:.4f}, ppl {result['ppl']:.3f} "
          f"({cfg.ckpt}, block_size {model.cfg.block_size}, {dtype})")
    return result


if __name__ == "__main__":
    run(lambda argv: main(parse_config(PplConfig, argv).validate()), sys.argv[1:])
