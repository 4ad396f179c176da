"""The project's import graph (read with ``ast``, nothing imported): layers only point down
(mood_data <- train <- eval <- moodguard) and no module imports itself round a loop, counting
imports inside functions too (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mood_data", "train", "eval", "moodguard")  # bottom -> top
LAYER = {p: i for i, p in enumerate(PACKAGES)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from x import y`` counts x.y when that
    is a module, else x)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS, colours)."""
    colour = {n: 0 for n in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def package_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a.split(".")[0], b.split(".")[0]) for a, deps in graph.items() for b in deps
            if a.split(".")[0] != b.split(".")[0]}


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_module_import_cycle():
    graph = import_graph()
    # a package's __init__ importing its own submodules (re-exports) is not a loop through
    # the submodule's parent: drop the implicit child -> parent edge only
    graph = {n: {d for d in deps if d not in _ancestors(n)} for n, deps in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_only_point_down():
    up = sorted((a, b) for a, b in package_edges(import_graph()) if LAYER[b] > LAYER[a])
    assert not up, f"imports pointing up a layer: {up}"


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _detector_names() -> set[str]:
    """Detector names that name nothing else ("guard" and "judge" are also the adapters, the
    training kinds and the forward passes, so those strings are everywhere for other reasons)."""
    from train.detector_table import FORWARDS, NAMES

    return set(NAMES) - set(FORWARDS)


def test_detector_names_only_in_the_table():
    """No list / tuple / set / dict literal holding two or more detector names, and no comparison
    against a detector name, outside train/detector_table.py: everything else asks the table
    (by field: forward pass, fitted, ...)."""
    det = _detector_names()
    bad = []
    for name, path in project_modules().items():
        if name == "train.detector_table":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                elts = node.keys if isinstance(node, ast.Dict) else node.elts
                hits = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in det]
                if len(hits) >= 2:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {hits}")
            elif isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                hits = [c for c in consts if c in det]
                if hits:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: compares with {hits}")
    assert not bad, "detector names outside the table:\n" + "\n".join(bad)


def test_table_drives_parsing_recipes_and_help():
    from mood_data.errors import RecipeError
    from train.detector_table import NAMES, help_text, names, needed, parse_monitor, parse_monitors

    assert parse_monitors("guard + maha,ppl") == ["guard+maha", "ppl"]
    assert needed(["ppl+guard", "knn"]) == [n for n in NAMES if n in {"ppl", "guard", "knn"}]
    assert set(names(fitted=True)) == {"maha", "knn"}
    for bad in ("guard+nope", "guard+guard", ""):
        try:
            parse_monitor(bad)
        except RecipeError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    assert all(n in help_text() for n in NAMES)


def test_monitors_flag_goes_through_the_recipe_check(tmp_path, capsys):
    from moodguard.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: embedded:tiny-s\noutput_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    assert main(["evaluate", "--recipe", str(recipe), "--monitors", "guard+nope"]) == 2
    err = capsys.readouterr().err
    assert "eval.monitors[0]" in err and "guard+nope" in err and "Traceback" not in err


def test_adding_a_detector_is_one_entry(monkeypatch):
    """docs/architecture.md's worked example: one table entry (its module exists) and the
    monitor parser and the one guard pass score it."""
    import numpy as np

    from eval.engine.detectors.logits import guard_logprob
    from eval.engine.scoring import logit_detectors
    from train import detector_table as dt

    entry = dt.Detector("logprob", "guard", False, (), "eval.engine.detectors.logits:guard_logprob")
    monkeypatch.setitem(dt.DETECTORS, entry.name, entry)
    assert dt.parse_monitor("guard+logprob") == ("guard", "logprob")
    logits = np.array([[0.5, -1.0], [2.0, 0.1], [-0.3, 0.3]])
    out = logit_detectors(logits, ["guard", "logprob"])
    assert list(out) == ["guard", "logprob"]
    assert np.allclose(out["logprob"], guard_logprob(logits))


REPORTING = ("eval.report.runfolder", "eval.report.caveats", "eval.report.plots", "eval.report.scaling",
             "eval.report.report", "eval.report.compare")

# a child interpreter in which ``import torch`` (and every torch submodule) fails. A finder is used
# rather than ``sys.modules["torch"] = None``: scipy's array-API probe reads ``sys.modules["torch"]``
# when it is present and would itself fail on None, which says nothing about our modules
_NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def _run_without_torch(code: str, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", _NO_TORCH + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_reporting_works_without_torch(tmp_path):
    """Charts, report, compare and run folders import and run with torch unimportable: a reader of
    results never needs the model stack."""
    code = f"""
import importlib
for name in {REPORTING!r}:
    importlib.import_module(name)
from pathlib import Path
from test_sweep_fixtures import make_sweep
from eval.report.compare import compare_roots
from eval.report.report import write_report
from eval.report.runfolder import reanalyze
from eval.report.scaling import make_chart
root = make_sweep(Path("sweep"))
chart = make_chart(root, fpr=0.01)
report = write_report(root, fpr=0.01)
deltas = compare_roots(root, root, n_boot=10)
analysis = reanalyze(root / "tiny-s" / "eval" / "guard", n_boot=10)  # run folder: analysis, summary, plots
assert "torch" not in sys.modules, "torch was imported"
print("OK", sorted(chart.files), sorted(report), len(deltas), sorted(analysis["groups"])[:1])
"""
    out = _run_without_torch(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK ['csv', 'md', 'png', 'svg'] ['html', 'md']"), out.stdout


def test_torch_blocker_blocks(tmp_path):
    """The blocker of the test above really makes torch unimportable (a test that cannot fail is
    no test)."""
    out = _run_without_torch("import eval.engine.forward\n", tmp_path)
    assert out.returncode != 0 and "No module named 'torch' (blocked)" in out.stderr
