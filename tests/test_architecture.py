"""The project's import graph (read with ``ast``, nothing imported): layers only point down
(mood_data <- train <- eval <- moodguard; inside eval: engine <- report <- run, with the
detectors a leaf of the engine) and no module imports itself round a loop, at any level:
imports inside functions count (a lazy import is still a dependency), a package ``__init__`` is
a module like any other (``from . import x`` in a submodule is an edge to its package), and a
module named by a string that ``importlib`` loads (the lazy public API, the CLI dispatcher) is
an edge too. Also: the detector table, the forward planner, the resolved configuration and
torch-free reporting."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mood_data", "train", "eval", "moodguard")  # bottom -> top
LAYER = {p: i for i, p in enumerate(PACKAGES)}
EVAL_LAYERS = ("eval.engine", "eval.report", "eval.run")  # bottom -> top inside eval


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _uses_importlib(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from x import y`` counts x.y when that
    is a module, else x -- so ``from . import helper`` in a submodule is an edge to its package);
    in a module that calls ``importlib.import_module``, every string constant naming a project
    module is an edge as well."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    dynamic = _uses_importlib(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
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
        elif dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            targets = [node.value]
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


def _eval_layer(module: str) -> int | None:
    return next((i for i, p in enumerate(EVAL_LAYERS) if module == p or module.startswith(p + ".")), None)


def test_no_import_cycle_at_any_level():
    """Package inits included: no edge is dropped (a submodule importing its own package while the
    package imports the submodule is the cycle this finds)."""
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_graph_sees_package_inits_and_importlib_strings(tmp_path):
    """The edges the cycle test relies on exist: a package init importing its submodule, a
    submodule's ``from . import x`` to its package, a string the dispatcher loads."""
    graph = import_graph()
    assert "moodguard.cli_evaluate" in graph["moodguard.cli"]  # COMMANDS, loaded with importlib
    assert "eval.run.evaluate" in graph["eval"]  # the lazy public API
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .child import f\nHELPER = 1\n")
    (pkg / "child.py").write_text("from . import HELPER\ndef f(): return HELPER\n")
    known = {"pkg", "pkg.child"}
    g = {"pkg": imports_of("pkg", pkg / "__init__.py", known), "pkg.child": imports_of("pkg.child", pkg / "child.py", known)}
    assert find_cycle(g) == ["pkg", "pkg.child", "pkg"]


def test_layers_only_point_down():
    up = sorted((a, b) for a, b in package_edges(import_graph()) if LAYER[b] > LAYER[a])
    assert not up, f"imports pointing up a layer: {up}"


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_eval_layers_point_down_and_detectors_are_a_leaf():
    """Inside eval: engine <- report <- run (reporting never imports the run orchestration; the
    engine neither); the detectors import nothing of eval but each other."""
    bad = []
    for a, deps in import_graph().items():
        la = _eval_layer(a)
        for b in deps:
            lb = _eval_layer(b)
            if la is not None and lb is not None and lb > la:
                bad.append(f"{a} -> {b}")
            if a.startswith("eval.engine.detectors") and b.startswith("eval") and not b.startswith("eval.engine.detectors"):
                bad.append(f"{a} -> {b} (detectors are a leaf)")
    assert not bad, "imports pointing up inside eval:\n" + "\n".join(sorted(bad))


def _detector_names() -> set[str]:
    """Detector names that name nothing else ("guard" and "judge" are also the adapters, the
    training kinds and the forward passes, so those strings are everywhere for other reasons)."""
    from eval.engine.planner import PASSES
    from eval.engine.table import NAMES

    return set(NAMES) - set(PASSES)


def test_detector_names_only_in_the_table():
    """No list / tuple / set / dict literal holding two or more detector names, and no comparison
    against a detector name, outside the detector classes: everything else asks the table (by
    class attribute) or the planner (by pass)."""
    det = _detector_names()
    bad = []
    for name, path in project_modules().items():
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


def test_the_table_is_a_dict_of_detector_classes():
    """No importlib and no "module:attribute" strings in the table: it imports its classes."""
    from eval.engine.detectors.base import NEEDS, Detector
    from eval.engine.table import DETECTORS

    path = ROOT / "eval" / "engine" / "table.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and "importlib" in ast.dump(n) for n in ast.walk(tree))
    assert not [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and ":" in n.value and "." in n.value.split(":")[0]]
    assert DETECTORS and all(isinstance(c, type) and issubclass(c, Detector) for c in DETECTORS.values())
    assert all(name == cls.name and cls.needs in NEEDS for name, cls in DETECTORS.items())


def test_needs_are_read_only_by_the_planner():
    """What a detector needs from a forward pass (``.needs``) and which pass that is are read in
    ONE module, the forward planner; everything else asks the plan."""
    allowed = {"eval.engine.planner"}
    bad = []
    for name, path in project_modules().items():
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("needs", "forward") and isinstance(node.ctx, ast.Load):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "torch", "model"):
                    continue  # nn.Module.forward, a detector's own attribute
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.Name) and node.id in ("PASS_OF_NEED", "pass_name") and name != "eval.engine.planner":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.id}")
    assert not bad, "the kind of forward pass read outside the planner:\n" + "\n".join(bad)


# the functions that may receive the whole Recipe in eval: the resolver and the public entry points
RECIPE_ENTRIES = {("eval.run.context", "resolve"), ("eval.run.context", "parse_recipe_monitors"),
                  ("eval.run.context", "resolve_cascade"),  # the resolver of the recipe's cascade: section
                  ("eval.run.evaluate", "evaluate_recipe"),
                  ("eval.run.fitting", "fit_detectors"), ("eval.run.bundle", "export_bundle")}


def test_no_function_below_the_entry_points_receives_the_recipe():
    """In eval only the resolver and the public entry points take a ``recipe``; everything below
    them receives the resolved context (or plain values)."""
    bad = []
    for name, path in project_modules().items():
        if not name.startswith("eval"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = [a.arg for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
                if "recipe" in params and (name, node.name) not in RECIPE_ENTRIES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}(recipe, ...)")
    assert not bad, "functions below the entry points taking the whole recipe:\n" + "\n".join(bad)


def test_table_drives_parsing_and_help():
    from eval.engine.planner import help_text
    from eval.engine.table import NAMES, fitted, needed, parse_monitor, parse_monitors
    from mood_data.errors import RecipeError

    assert parse_monitors("guard + maha,ppl") == ["guard+maha", "ppl"]
    assert needed(["ppl+guard", "knn"]) == [n for n in NAMES if n in {"ppl", "guard", "knn"}]
    assert set(fitted()) == {"maha", "knn"}
    for bad in ("guard+nope", "guard+guard", ""):
        try:
            parse_monitor(bad)
        except RecipeError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    assert all(n in help_text() for n in NAMES) and "maha (guard pass, fitted)" in help_text()


def test_the_planner_plans_one_pass_per_kind():
    from eval.engine.planner import plan

    p = plan(["ppl", "guard", "maha", "energy", "ensemble-min", "judge-uncertainty"])
    assert p.guard == ("guard", "maha", "energy") and p.features == ("maha",) and p.lm == ("ppl",)
    assert p.members == ("ensemble-min",) and p.judge == ("judge-uncertainty",)
    assert p.shared == ("ppl", "guard", "maha", "energy")  # the order asked for
    assert p.needs_lm_adapter and not plan(["guard", "knn"]).needs_lm_adapter and not plan(["guard"]).features
    assert [p.timing_key(n) for n in ("guard", "maha", "ppl", "ensemble-min", "judge-uncertainty")] == \
        ["guard", "guard", "ppl", "ensemble", "judge"]


def test_monitors_flag_goes_through_the_recipe_check(tmp_path, capsys):
    from moodguard.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: embedded:tiny-s\noutput_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    assert main(["evaluate", "--recipe", str(recipe), "--monitors", "guard+nope"]) == 2
    err = capsys.readouterr().err
    assert "eval.monitors[0]" in err and "guard+nope" in err and "Traceback" not in err


REPORTING = ("eval.report.runfolder", "eval.report.caveats", "eval.report.plots", "eval.report.scaling",
             "eval.report.report", "eval.report.compare", "eval.report.cost")

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
from eval.report.cost import make_cost_chart
root = make_sweep(Path("sweep"))
chart = make_chart(root, fpr=0.01)
cost = make_cost_chart(root, fpr=0.01)
assert sorted(cost.files) == ["csv", "md", "png", "svg"]
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
