"""What every entry point shares: `--field=value` flags, devices, and checkpoint files.

Owns: `parse_config` (any dataclass; unknown keys are an error listing the valid ones; named
presets with explicit flags winning), `resolve_device`, `save_atomic` (temp file + rename,
so a crash never leaves a half-written checkpoint), and reading checkpoints safely
(`weights_only=True`: a checkpoint from elsewhere cannot run code) into a GPT.
Does not own: any config's fields (each entry point's dataclass) or the training loop.
"""
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch

from model import GPT, GPTConfig


def parse_config(cls, argv: list[str], presets: dict | None = None):
    """`--field=value` overrides for any dataclass; unknown keys list the valid ones.

    With `presets` and a `--preset=NAME` flag, NAME's values are applied first and explicit
    flags win over them.
    """
    valid = {f.name: f for f in fields(cls)}
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print("usage: --field=value, fields and defaults:\n" + "\n".join(
                f"  --{f.name}={f.default}" for f in fields(cls)))
            sys.exit(0)
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in valid:
            raise ValueError(f"unknown argument {arg!r}; valid keys: {', '.join(valid)}")
        kind = type(valid[key].default)
        if kind is bool:
            if raw.lower() not in ("", "1", "0", "true", "false"):
                raise ValueError(f"--{key} expects true/false, got {raw!r}")
            values[key] = raw.lower() in ("", "1", "true")
        else:
            try:
                values[key] = kind(raw)
            except ValueError:
                raise ValueError(f"--{key} expects {kind.__name__}, got {raw!r}") from None
    if presets is not None and values.get("preset"):
        if values["preset"] not in presets:
            raise ValueError(f"unknown preset {values['preset']!r}; valid: {', '.join(presets)}")
        values = {**presets[values["preset"]], **values}
    return cls(**values)


def resolve_device(device: str, dtype: str):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but CUDA is not available; use --device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def load_checkpoint(path, device="cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error} (corrupt or not ours?)") from None


def load_model(path, device="cpu"):
    """-> (GPT with the checkpoint's weights and bank types, checkpoint dict). The checkpoint's
    config holds model and training fields (train.TrainConfig); the model takes its own."""
    ckpt = load_checkpoint(path, device)
    model_fields = {f.name for f in fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in ckpt["config"].items() if k in model_fields}))
    model.prepare_state_dict(ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written; the last good one is still in place."""


def state_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) checkpoint dict: about its size on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def save_atomic(obj, path: Path):
    """torch.save to a temp file, then rename: a crash or a full disk never leaves a
    half-written checkpoint, and the previous one stays until the new one is complete
    (so the disk must hold both for a moment)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    need, free = state_bytes(obj), shutil.disk_usage(path.parent).free
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    where = f"cannot write checkpoint {path}: it needs about {gib(need)}, {gib(free)} free"
    if need > free:
        raise CheckpointError(f"{where}; the last good checkpoint is kept")
    try:
        torch.save(obj, tmp)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{where} ({error.strerror or error}); the last good checkpoint "
                              f"is kept") from None
    os.replace(tmp, path)
