"""Safe loading: no pickle anywhere in the code, torch.load only with weights_only=True,
yaml only via safe_load, trust_remote_code off unless a recipe sets it, and run folders /
bundles never open a .bin/.pt/.pkl file even when one is planted there."""
from __future__ import annotations

import ast
import builtins
import inspect
import pickle
import shutil
from pathlib import Path

import pytest


pytestmark = pytest.mark.usefixtures("one_torch_thread")


REPO = Path(__file__).resolve().parents[1]
SCANNED = ("mood_data", "train", "eval", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe-loading construct in ``source`` as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            elif name.endswith("torch.load") and not _kw_is(node, "weights_only", True):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                found.append(f"{where}: {name} (use yaml.safe_load)")
            elif name.split(".")[-1] in ("read_pickle", "to_pickle"):
                found.append(f"{where}: {name}")
            elif name.split(".")[-1] == "load" and _kw_is(node, "allow_pickle", True):
                found.append(f"{where}: {name}(allow_pickle=True)")
            if _kw_is(node, "trust_remote_code", True):
                found.append(f"{where}: trust_remote_code=True literal")
        elif isinstance(node, ast.Name) and node.id in ("pickle", "cPickle"):
            found.append(f"{where}: uses {node.id}")
    return found


def test_scanner_flags_each_unsafe_construct():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch, yaml, numpy as np\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\neval('1')\nexec('x=1')\n"
        "f(trust_remote_code=True)\nnp.load(p, allow_pickle=True)\n"
    )
    hits = unsafe_calls(bad)
    assert len(hits) == 9, hits
    ok = ("import torch, yaml\ntorch.load(p, weights_only=True)\nyaml.safe_load(t)\nmodel.eval()\n"
          "f(trust_remote_code=recipe.trust_remote_code)\n")
    assert unsafe_calls(ok) == []


def test_code_has_no_unsafe_loading():
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    found = [hit for p in files for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == []


def test_trust_remote_code_defaults_off():
    from eval.engine.forward import SharedBackbone
    from train.modeling import load_tokenizer
    from train.recipe import load_recipe
    from train.recipe_files import list_recipes
    from train.recipe_schema import Recipe

    assert Recipe.__dataclass_fields__["trust_remote_code"].default is False
    for fn in (SharedBackbone.from_pretrained, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    recipes = list_recipes()
    assert len(recipes) >= 10
    assert [r for r in recipes if load_recipe(r).trust_remote_code] == []


class _Planted:
    """A pickle whose loading would create ``marker`` (it must never be loaded)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(folder: Path, rels: list[str], marker: Path) -> None:
    payload = pickle.dumps(_Planted(marker))
    for rel in rels:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(payload)


@pytest.fixture
def watch_opens(monkeypatch):
    """Record every path opened through Python; make pickle/torch.load unusable."""
    import io

    import torch

    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)

    def forbidden(*a, **k):
        raise AssertionError("pickle loading attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    return opened


def test_bundle_ignores_planted_pickles(bundle, tmp_path, watch_opens):  # noqa: F811
    from eval.run.bundle import Monitor, write_manifest
    from mood_data.errors import BundleError

    folder, _, _ = bundle
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    marker = tmp_path / "PWNED"
    plant(copy, ["guard/adapter_model.bin", "lm/adapter_model.bin", "stats/maha-layer-1.pt",
                 "fusion.pkl", "tokenizer/training_args.bin"], marker)
    write_manifest(copy)  # even listed in the manifest, a pickle-format file is refused unopened
    watch_opens.clear()
    with pytest.raises(BundleError, match="pickle-format file in a bundle"):
        Monitor.load(copy)
    assert not marker.exists()
    assert [p for p in watch_opens if p.endswith(PICKLE_SUFFIXES)] == []
    for p in copy.rglob("*"):  # without them the bundle scores, opening no pickle
        if p.name.endswith(PICKLE_SUFFIXES):
            p.unlink()
    write_manifest(copy)
    watch_opens.clear()
    mon = Monitor.load(copy)
    scores = mon.score(["<start_of_turn>user\nhi<end_of_turn>\n"])
    assert len(scores) == 1 and not marker.exists()
    assert [p for p in watch_opens if p.endswith(PICKLE_SUFFIXES)] == []


def test_run_folder_ignores_planted_pickles(bundle, tmp_path, watch_opens):  # noqa: F811
    from eval.run.fitting import fit_detectors
    from eval.report.runfolder import reanalyze
    from train.recipe import load_recipe

    _, eval_dir, recipe_path = bundle
    run = tmp_path / "run"
    shutil.copytree(eval_dir.parents[1], run)
    marker = tmp_path / "PWNED"
    stats = sorted(d for d in (run / "stats").iterdir() if not d.name.startswith("calibration"))
    plant(run, ["guard/adapter_model.bin", "lm/adapter_model.bin", "guard/training_args.bin",
                f"stats/{stats[0].name}/maha.pt", "eval/guard/results.pkl"], marker)
    watch_opens.clear()
    recipe = load_recipe(recipe_path, [f"output_dir={run}"])
    out = fit_detectors(recipe)  # cache hits: reads the stats + calibration folders, loads the adapters
    assert out["calibration"].parent == run / "stats"
    reanalyze(run / "eval" / "guard", plots=False)
    assert not marker.exists()
    assert [p for p in watch_opens if p.endswith(PICKLE_SUFFIXES)] == []
