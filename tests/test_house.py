"""The house rules docs/design.md states, checked on the source: the core at the top never
imports the machinery in the folders at module level, every file stays within its room, and
what `python train.py` reads on one GPU stays small."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("fast", "parallel", "benchmarks")
TOP = sorted(p for p in ROOT.glob("*.py"))


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


def test_every_file_fits_its_room():
    files = [p for p in ROOT.rglob("*.py") if "tests" not in p.parts and ".carry" not in p.parts]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
    for path in files:                    # each opens with a docstring saying what it owns
        assert ast.get_docstring(ast.parse(path.read_text())), path


def test_what_a_one_gpu_training_run_reads():
    files = _followed("train.py")
    names = {p.name for p in files}
    assert "train.py" in names and not any(p.parent.name in FOLDERS for p in files)
    lines = sum(len(p.read_text().splitlines()) for p in files)
    assert len(files) <= 10, names
    assert lines <= 2635, lines          # the goal was 2,400: docs/design.md says why not
