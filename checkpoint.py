"""A run's files: its checkpoints, and the out_dir they live in.

Owns: `save_atomic` (temp file + rename, so a crash, a full disk or Ctrl-C never leaves a
half-written checkpoint), reading checkpoints safely (`weights_only=True`: a checkpoint from
elsewhere cannot run code; older field names are upgraded) into a GPT (`load_model`), the
RNG streams a resumed run takes up, and the run's out_dir: one run at a time holds it
(`OutDirClaim`), a fresh run never lands on another's checkpoint, and --resume continues the
checkpoint's config with only the flags that may change (`check_out_dir`); `Progress`, what
Ctrl-C reports.
Does not own: what a checkpoint holds (train.save_checkpoint), flags and one-line errors (cli.py).
"""
# cli first: it sets the CPU thread policy, which OpenMP reads once, as torch loads.
from cli import CheckpointError, UsageError, given_flags
import fcntl
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from model import GPT, GPTConfig


def upgrade_config(config: dict) -> dict:
    """A checkpoint's config under today's names: `warmup_iters` was the clustering burn-in
    and `lr_warmup` the LR warmup (now burn_in and warmup_iters); moe_impl 'fused' is 'triton'."""
    config = dict(config)
    if "lr_warmup" in config:
        config["burn_in"] = config.pop("warmup_iters", 200)
        config["warmup_iters"] = config.pop("lr_warmup")
    if config.get("moe_impl") == "fused":
        config["moe_impl"] = "triton"
    return config


def load_checkpoint(path, device="cpu", mmap: bool = False) -> dict:
    """mmap: tensors are read only when touched (the config of a large checkpoint, quickly)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as error:
        first = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
        raise UsageError(f"cannot read checkpoint {path}: corrupt, truncated or not one of "
                         f"ours ({first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UsageError(f"{path} is not a train.py checkpoint (no model and config in it)")
    ckpt["config"] = upgrade_config(ckpt["config"])
    return ckpt


def load_model(path, device="cpu", resume: bool = False):
    """-> (GPT with the checkpoint's weights and bank types, checkpoint dict). The checkpoint's
    config holds model and training fields (train.TrainConfig); the model takes its own.
    resume: the checkpoint must hold optimizer state too."""
    ckpt = load_checkpoint(path, device)
    if resume and ckpt.get("optimizer") is None:
        raise UsageError(f"--resume: {path} holds weights only (final_ckpt=weights), no optimizer "
                         f"state to resume from")
    model_fields = {f.name for f in fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in ckpt["config"].items() if k in model_fields}))
    model.prepare_state_dict(ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def state_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) checkpoint dict: about its size on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


# The files a training run writes into its out_dir.
RUN_FILES = ("ckpt.pt", "log.jsonl", "reclusters.jsonl", "config.json", "diverged.json")
# Fields that are this invocation's, never the checkpoint's: where the run is and how it starts.
INVOCATION = ("out_dir", "resume", "overwrite")
# What --resume may change in a train.py run: how long and how fast it learns, how it is
# watched, where it runs; any other field given that contradicts the checkpoint is refused.
RESUMABLE = ("max_iters", "lr", "min_lr", "warmup_iters", "lr_decay_iters", "eval_interval",
             "eval_iters", "log_interval", "ckpt_interval", "final_ckpt", "sample_tokens",
             "shock_iters", "device", "dtype", "compile", "compile_mode", "cuda_graph",
             "expert_parallel", "dataset", "data_dir")


def check_out_dir(cfg, may_change=RESUMABLE) -> None:
    """Before any work, for a training config: no run still going holds out_dir; a fresh run
    never lands on another's checkpoint (a run stopped before its first one has nothing to
    resume: a fresh run replaces it).
    --resume continues the checkpoint's run: cfg takes the checkpoint's config, but for the
    flags given (given_flags) in `may_change`; another flag given that contradicts it is refused."""
    out, path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    # Rank 0 alone asks (it alone claims): under torchrun another rank's look could meet rank
    # 0's own claim, or hold the lock at the moment rank 0 takes it.
    if (out / OutDirClaim.NAME).exists() and os.environ.get("RANK", "0") == "0":
        with OutDirClaim(out, probe=True):  # refused here if a run still holds it
            pass
    if path.exists() and not (cfg.resume or cfg.overwrite):
        held = [name for name in RUN_FILES if (out / name).exists()]
        raise ValueError(f"{out} holds a run ({', '.join(held)}); pass --resume to continue it "
                         f"or --overwrite to start over (its files are replaced)")
    if not cfg.resume:
        return
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (a run stopped before its "
                                f"first checkpoint has none: start it again without --resume)")
    ckpt = load_checkpoint(path, mmap=True)
    if ckpt.get("optimizer") is None:
        raise UsageError(f"--resume: {path} holds weights only (final_ckpt=weights), no optimizer "
                         f"state to resume from")
    given = given_flags(cfg)
    for field in fields(cfg):
        name, mine = field.name, getattr(cfg, field.name)
        theirs = ckpt["config"].get(name, field.default)
        if name in INVOCATION or mine == theirs:
            continue
        if name not in given:
            setattr(cfg, name, theirs)
        elif name not in may_change:
            raise UsageError(f"--resume: --{name}={mine} contradicts the checkpoint's {name}="
                             f"{theirs or repr(theirs)} ({path}); drop the flag to continue that run, or start "
                             f"a new one in another --out_dir")
    if ckpt["iter"] >= cfg.max_iters:
        raise UsageError(f"--resume: {path} is at iteration {ckpt['iter']}, the run's max_iters="
                         f"{cfg.max_iters}: nothing to do; pass a larger --max_iters to go on")


class OutDirClaim:
    """One training run's hold on its out_dir, from before its files are touched until its
    loop ends: a second train.py there (another terminal, a rerun with --resume or
    --overwrite) is refused while this one runs, rather than both writing one run's files.
    An OS lock (flock) on a file in out_dir, so a run that dies, however it dies, lets go."""

    NAME = ".train.lock"

    def __init__(self, out_dir, probe: bool = False):
        """probe: only ask (refused if held), and write nothing."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / self.NAME, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "unknown"
            self.file.close()
            raise UsageError(f"{out} is in use by a training run still going (pid {pid}); wait "
                             f"for it, stop it (Ctrl-C checkpoints its step), or choose another "
                             f"--out_dir") from None
        if not probe:  # what a refused run names
            self.file.truncate(0)
            self.file.write(str(os.getpid()))
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()  # which lets go of the lock


def claim_out_dir(out_dir, fresh: bool) -> OutDirClaim:
    """Claim out_dir (OutDirClaim: refused while another run holds it); a fresh run then
    removes an earlier run's files (--overwrite, or a run stopped before its first
    checkpoint), so logs never mix. Hold the claim for as long as the run writes there."""
    claim = OutDirClaim(out_dir)
    out = Path(out_dir)
    old = [name for name in RUN_FILES if fresh and (out / name).exists()]
    if old and not (out / "ckpt.pt").exists():
        print(f"{out}: replacing a run stopped before its first checkpoint ({', '.join(old)})")
    for name in old:
        (out / name).unlink()
    return claim


@dataclass
class Progress:
    """Where a training run is, for the line Ctrl-C prints (run's `interrupted`): its out_dir
    and the iteration under way (0-based; None before the first), printed 1-based like log.jsonl."""
    out_dir: str = ""
    it: int | None = None

    def line(self) -> str:
        if not self.out_dir:  # still reading its flags
            return "interrupted before training started"
        where = "before the first iteration" if self.it is None else f"at iteration {self.it + 1}"
        try:
            kept = load_checkpoint(Path(self.out_dir) / "ckpt.pt", mmap=True)["iter"]
        except (FileNotFoundError, UsageError):
            return (f"interrupted {where}; no checkpoint yet in {self.out_dir}, nothing to "
                    f"resume: run the same command again to start afresh")
        return (f"interrupted {where}; the checkpoint of iteration {kept} is kept; resume with: "
                f"python train.py --resume --out_dir={self.out_dir}")


def rng_state(batch_gen: torch.Generator) -> dict:
    """Every random stream a run draws from: torch's, CUDA's, and its batch generator."""
    state = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(ckpt: dict, rank: int, world: int, batch_gen: torch.Generator, device: str):
    """Put back rank `rank`'s streams from a checkpoint (rank 0's if it came from another
    world size), so a resumed run draws exactly what the unbroken one would have."""
    rngs = ckpt.get("rng_ranks", [])
    rng = rngs[rank] if len(rngs) == world else ckpt["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    batch_gen.set_state(rng["batches"].cpu())
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


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
    except BaseException as error:  # a full disk, or Ctrl-C mid-write: no half file stays
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"{where} ({error.strerror or error}); the last good "
                                  f"checkpoint is kept") from None
        raise
    os.replace(tmp, path)
