"""The tree as architecture: no import circle in src/, files of about 400 lines at most (src, tests, benchmarks,
tools), and the import paths from before the move into subpackages (qlora_fsdp.train) still working."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "qlora_fsdp"
MAX_LINES = 400


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in it (function-level imports too: a lazy import is
    still a dependency). `from .pkg import name` counts pkg.name when that is a module."""
    files = {module_name(p, src): p for p in (src / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_lazy_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import x\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")  # lazy, and through `from package import module`
    (pkg / "sub" / "b.py").write_text("from ..a import f\nx = 1\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and {"pkg.a", "pkg.sub.b"} <= set(cycle), cycle
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_src_has_no_import_circle():
    graph = import_graph()
    assert {"qlora_fsdp.training.loop", "qlora_fsdp.training.pipeline_loop", "qlora_fsdp.cli"} <= set(graph)
    assert "qlora_fsdp.training.loop" in graph["qlora_fsdp.training.pipeline_loop"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_files_have_about_400_lines_at_most():
    root = SRC.parent
    folders = (SRC / PACKAGE, root / "tests", root / "benchmarks", root / "tools")
    files = [p for folder in folders for p in folder.rglob("*.py")]
    assert len(files) > 100 and any(p.name == "test_layout.py" for p in files)
    long = {str(p.relative_to(root)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_old_import_paths_still_work(monkeypatch):
    import qlora_fsdp
    import qlora_fsdp.train as old
    import qlora_fsdp.training as training
    from qlora_fsdp.training import TrainConfig, TrainError

    assert old.TrainConfig is TrainConfig and qlora_fsdp.TrainConfig is TrainConfig and old.TrainError is TrainError
    assert qlora_fsdp.TrainLoop is old.TrainLoop and issubclass(old.TrainLoop, training.TrainLoop)
    # TrainLoop(cfg) with cfg.pp > 1 builds the pipeline loop, as it did before; the new TrainLoop says what to call
    built = []
    fake = lambda cfg, *a, **k: built.append((cfg, a, k)) or "pipeline loop"  # noqa: E731
    monkeypatch.setattr(training, "PipelineTrainLoop", fake)
    cfg = TrainConfig(nproc=2, pp=2, grad_accum=2, precision="bf16")
    assert old.TrainLoop(cfg, model="m") == "pipeline loop" and built == [(cfg, (), {"model": "m"})]
    with pytest.raises(TrainError, match=r"--pp 2 runs in the pipeline loop: build the loop with .*make_loop"):
        training.TrainLoop(cfg)
