"""What every entry point shares: `--field=value` flags, errors, Ctrl-C, devices.

Owns: the CPU thread policy (set as it loads: entry points import cli before torch),
`parse_config` (any dataclass; unknown keys are an error listing the valid ones; named
presets with explicit flags winning; `--help` prints every flag with the comment beside its
field, under the group comments of its dataclass), `check_rules` (a config's rules -> one
error), `run` (an entry point's errors in its input, and Ctrl-C or SIGTERM, become one line;
`--debug` shows the traceback), `StopAtStep` (a loop stops at a step's end, to checkpoint
it), `resolve_device`.
Does not own: any config's fields (each entry point's dataclass), the training loop, or a
run's files (checkpoint.py).
"""
import os
# Idle OpenMP threads sleep instead of spinning, so a busy machine is not slowed further
# (measured: docs/results.md, the first run). OpenMP reads it once, as torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import inspect
import re
import signal
import sys
import threading
from dataclasses import fields, is_dataclass

import torch


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
