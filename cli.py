"""What every entry point shares: `--field=value` flags, errors, devices, checkpoint files.

Owns: the CPU thread policy (set as it loads: entry points import cli before torch),
`parse_config` (any dataclass; unknown keys are an error listing the valid ones; named
presets with explicit flags winning; `--help` prints every flag with the comment beside its
field, under the group comments of its dataclass), `check_rules` (a config's rules -> one
error), `run` (an entry point's errors in its input, and Ctrl-C or SIGTERM, become one line;
`--debug` shows the traceback), `StopAtStep` (a loop stops at a step's end, to checkpoint
it), `resolve_device`, `save_atomic` (temp file + rename, so a crash, a full disk or Ctrl-C
never leaves a half-written checkpoint), reading checkpoints safely
(`weights_only=True`: a checkpoint from elsewhere cannot run code; older field names are
upgraded) into a GPT, and the run's out_dir (one run at a time holds it; what --resume
continues: the checkpoint's config, with only the flags that may change).
Does not own: any config's fields (each entry point's dataclass) or the training loop.
"""
import os
# Idle OpenMP threads sleep instead of spinning, so a busy machine is not slowed further
# (measured: docs/results.md, the first run). OpenMP reads it once, as torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fcntl
import inspect
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import torch

from model import GPT, GPTConfig


class UsageError(ValueError):
    """A problem with the input (a file, a device, a checkpoint): one line, no traceback."""


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written; the last good one is still in place."""


# What `run` reports in one line: bad flags and configs (ValueError, UsageError), missing
# files, a checkpoint that cannot be written, a run whose loss became non-finite.
INPUT_ERRORS = (ValueError, FileNotFoundError, CheckpointError, FloatingPointError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler's stop), raised where the program is, like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


class StopAtStep:
    """A loop's clean stop. Inside `with StopAtStep() as stop:` a first Ctrl-C or SIGTERM is
    held in `stop.requested` (a notice is printed) for the loop to act on where its state is
    whole, at the end of a step: checkpoint there, then `raise stop.requested`. A second one
    is raised at once. Off the main thread (which alone may take signals) it holds nothing.
    `notice=False` holds without a word (a torchrun rank other than 0); `ranks` > 1 says that
    the ranks stop together at a later step (torchrun's own second signal is a kill)."""

    def __init__(self, notice: bool = True, ranks: int = 1):
        self.notice, self.requested, self._previous = notice, None, {}
        self.line = ("stopping at the end of this step, to checkpoint it (again to stop at once)"
                     if ranks == 1 else "stopping at the next log step, where every rank checkpoints it")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._hold)
                              for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _hold(self, signum, frame):
        stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if self.requested is not None:
            raise stop
        self.requested = stop
        if self.notice:
            print("\n" + self.line, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(main, argv: list[str], interrupted=lambda: "interrupted"):
    """main(argv) for an entry point: an input error prints `error: <one line>` on stderr
    and exits with status 1; Ctrl-C or SIGTERM prints `interrupted()` (one line: what is kept,
    how to go on) and exits with status 130 or 143; with --debug both raise, traceback and
    all. Any other exception is a bug and keeps its traceback. SIGTERM takes Ctrl-C's path, so
    the same cleanup runs: no half-written checkpoint, child processes stopped, not orphaned."""
    debug = "--debug" in argv
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main([arg for arg in argv if arg != "--debug"])
    except INPUT_ERRORS as error:
        if debug:
            raise
        sys.exit("error: " + " ".join(str(error).split()))
    except KeyboardInterrupt as stop:
        if debug:
            raise
        line, status = interrupted(), 143 if isinstance(stop, Terminated) else 130
    # Printed once the except is left: the interrupted frames are freed, so a progress bar
    # has closed its line first.
    print(line, file=sys.stderr)
    sys.exit(status)


def check_rules(rules: list[tuple[bool, str]], what: str) -> None:
    """A config's rules, (holds, message) each -> a ValueError for the first that fails."""
    for ok, message in rules:
        if not ok:
            raise ValueError(f"bad {what} config: {message}")


def describe(cls) -> list[tuple[str, str, str]]:
    """(group, field, description) for each field of a dataclass, from its source: the
    comment after a field (and the comment lines under it) describes it; a line `# group:`
    starts a group. A subclass's field overrides its base's."""
    found = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        group, last = "", None
        for line in inspect.getsource(klass).splitlines()[1:]:
            header = re.match(r"\s+# (\w[\w ,-]*):$", line)
            field = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
            more = re.match(r"\s{8,}#\s*(.*)$", line)
            if header:
                group = header.group(1)
            elif field:
                last = field.group(1)
                found[last] = [group, (field.group(2) or "").strip()]
            elif more and last:
                found[last][1] += " " + more.group(1).strip()
            else:
                last = None
    return [(*found.get(f.name, ["", ""])[:1], f.name, found.get(f.name, ["", ""])[1])
            for f in fields(cls)]


def help_text(cls, presets: dict | None = None) -> str:
    lines = [f"usage: --field=value ...{' --preset=' + '|'.join(presets) if presets else ''}"
             f" [--debug: tracebacks instead of one-line errors]"]
    defaults = {f.name: f.default for f in fields(cls)}
    rows = describe(cls)
    first = {where: i for i, (where, _, _) in reversed(list(enumerate(rows)))}
    group = None
    for where, name, text in sorted(rows, key=lambda row: (row[0] == "", first[row[0]])):
        if where != group:
            group = where
            lines.append(f"\n{where or 'other'}:")
        lines.append(f"  --{name}={defaults[name]!r}".ljust(34) + f" {text}".rstrip())
    return "\n".join(lines)


def parse_config(cls, argv: list[str], presets: dict | None = None):
    """`--field=value` overrides for any dataclass; unknown keys list the valid ones.

    With `presets` and a `--preset=NAME` flag, NAME's values are applied first and explicit
    flags win over them. The config's `given` attribute holds the fields the flags named
    (`--preset` itself, not the values it brought): see given_flags.
    """
    valid = {f.name: f for f in fields(cls)}
    values = {}
    for i, arg in enumerate(argv):
        if arg in ("-h", "--help"):
            print(help_text(cls, presets))
            sys.exit(0)
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") and i and argv[i - 1].startswith("--") and "=" not in argv[i - 1]:
            raise ValueError(f"write {argv[i - 1]}={arg}, not {argv[i - 1]} {arg}")  # a bool flag
        if not arg.startswith("--") or key not in valid:
            raise ValueError(f"unknown argument {arg!r}; valid keys: {', '.join(valid)}")
        kind = type(valid[key].default)
        if kind is not bool and not eq:
            spaced = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            raise ValueError(f"write --{key}={spaced}, not --{key} {spaced}" if spaced else
                             f"--{key} needs a value: write --{key}=VALUE")
        if kind is bool:
            if raw.lower() not in ("", "1", "0", "true", "false"):
                raise ValueError(f"--{key} expects true/false, got {raw!r}")
            values[key] = raw.lower() in ("", "1", "true")
        else:
            try:
                values[key] = kind(raw)
            except ValueError:
                raise ValueError(f"--{key} expects {kind.__name__}, got {raw!r}") from None
    given = set(values)
    if presets is not None and values.get("preset"):
        if values["preset"] not in presets:
            raise ValueError(f"unknown preset {values['preset']!r}; valid: {', '.join(presets)}")
        values = {**presets[values["preset"]], **values}
    config = cls(**values)
    config.given = given
    return config


def given_flags(config) -> set[str]:
    """The fields its command line named (parse_config records them); for a config built in
    code, those that differ from their defaults."""
    return getattr(config, "given", None) or {f.name for f in fields(config)
                                              if getattr(config, f.name) != f.default}


def resolve_device(device: str, dtype: str):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device} but CUDA is not available; use --device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


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
    if (out / OutDirClaim.NAME).exists():
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
