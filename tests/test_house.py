"""The house rules docs/design.md states, checked on the source: the core at the top never
imports the machinery in the folders at module level, no module imports in a circle (but the
documented Triton seam), every file says what it owns, what `python train.py` reads on one
GPU is a known list, and one MoE forward pass reads only the four files of the layer."""
import ast
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("fast", "parallel", "benchmarks")
TOP = sorted(p for p in ROOT.glob("*.py"))
SOURCES = sorted(p for p in ROOT.rglob("*.py") if not {"tests", "results", ".carry"} &
                 set(p.relative_to(ROOT).parts))
# What a learner opens following `python train.py` (docs/design.md: which lines and why).
LEARNER_PATH = {"train.py", "model.py", "moe.py", "router.py", "experts.py", "compress.py",
                "cluster.py", "regroup.py", "strategy.py", "train_log.py", "cli.py", "checkpoint.py",
                "data.py"}
# The one circle allowed: experts.py loads fast/triton_combine.py for moe_impl=triton, and the
# op falls back on experts.py's PyTorch reference where Triton cannot run.
SEAMS = {frozenset({"experts", "fast.triton_combine"})}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _module_imports(path: Path) -> set[str]:
    """Modules imported at module level (try/if blocks included, function bodies not)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        for sub in ast.walk(node) if isinstance(node, (ast.Try, ast.If)) else [node]:
            if isinstance(sub, ast.Import):
                names |= {alias.name for alias in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.add(sub.module)
    return names


def _all_imports(path: Path) -> set[str]:
    """The repository's modules a file imports anywhere (function bodies included)."""
    known, names = {_module(p) for p in SOURCES}, set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known} - {_module(path)}


def _followed(start: str) -> list[Path]:
    """The repository's files a run of `start` imports at module level, transitively."""
    seen, todo = set(), [ROOT / start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _module_imports(path):
            for candidate in (ROOT / (name.replace(".", "/") + ".py"),
                              ROOT / name.replace(".", "/") / "__init__.py"):
                if candidate.exists():
                    todo.append(candidate)
    return sorted(seen)


def test_the_core_never_imports_the_machinery_at_module_level():
    assert {p.stem for p in TOP} >= {"model", "moe", "router", "experts", "train", "bench"}
    for path in TOP:
        bad = {name for name in _module_imports(path) if name.split(".")[0] in FOLDERS}
        assert not bad, f"{path.name} imports {sorted(bad)} at module level"


def test_no_module_imports_in_a_circle_but_the_triton_seam():
    graph = {_module(p): _all_imports(p) for p in SOURCES}
    circles = set()

    def walk(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                circles.add(frozenset(path))
            elif nxt not in path and nxt > start:
                walk(start, nxt, path + [nxt])
    for module in graph:
        walk(module, module, [module])
    assert circles == SEAMS, circles
    assert not {m for p in SOURCES if _module(p).startswith("parallel.") for m in _all_imports(p)
                if m == "train"}, "parallel/ imports from train.py"


def test_the_layer_as_it_runs_imports_only_routing_and_experts():
    moe = ROOT / "moe.py"
    assert _all_imports(moe) == {"router", "experts"}
    assert len(moe.read_text().splitlines()) <= 210
    assert "moe" not in _all_imports(ROOT / "cluster.py")


def test_every_file_says_what_it_owns():
    for path in SOURCES:
        assert ast.get_docstring(ast.parse(path.read_text())), path


def test_what_a_one_gpu_training_run_reads():
    files = _followed("train.py")
    assert {p.name for p in files} == LEARNER_PATH and all(p.parent == ROOT for p in files)


def test_one_moe_forward_pass_reads_only_the_layer_files():
    """A clustered model's forward, traced: the functions it calls live in model.py, moe.py,
    router.py and experts.py, none in a rebuilding or machinery file."""
    from model import GPT, GPTConfig
    from regroup import recluster_model
    torch.manual_seed(0)
    model = GPT(GPTConfig(moe="clustered", n_layer=1, n_head=2, n_embd=16, ffn_hidden=16,
                          n_experts=4, n_clusters=2, rank=2, block_size=8, vocab_size=64))
    recluster_model(model)
    x = torch.randint(0, 64, (2, 8))
    called = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(ROOT)):
            called.add(Path(frame.f_code.co_filename).relative_to(ROOT).as_posix())
    sys.setprofile(profile)
    try:
        model(x)
    finally:
        sys.setprofile(None)
    assert called == {"model.py", "moe.py", "router.py", "experts.py"}, called
